//! What a `live` run will do, decided before anything starts: which broker it talks to (its
//! own in-process deployment or an existing one), which game stands for each genre, how
//! simulated time maps onto the wall clock, and how the broker's timers are scaled to match.
//! Everything here is plain data and pure functions; the run itself is in `super`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use framecast_broker::dev::DevOptions;
use framecast_shared::config::BrokerConfig;
use framecast_shared::config::inventory::{SimulatedGpuGroup, SimulatedGpus};
use framecast_shared::ids::{GameId, GenreName};

use super::{GameFor, LiveError, LiveOptions};
use crate::scenario::{Arrivals, Fault, PoolPolicy, Pools, Scenario};

/// The fastest time compression accepted: beyond it the broker's timers (whole seconds, a
/// 200 ms driver tick) no longer resolve a simulated minute.
pub(crate) const MAX_SPEED: f64 = 1000.0;
/// The slowest.
pub(crate) const MIN_SPEED: f64 = 0.01;
/// How long the reservation TTL, the idle timeout and the longest session outlast the run's
/// wall-clock length (sessions are released by the run; these timers must never fire).
const KEEP_MARGIN_S: u64 = 600;
/// The longest the broker's configuration allows those timers (its validation's bound).
const MAX_KEEP_S: u64 = 7 * 24 * 3600;
/// The broker's shortest heartbeat interval (its configuration's lower bound).
const MIN_HEARTBEAT_MS: u32 = 100;

/// A validated `live` run.
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    /// Where the broker is.
    pub target: Target,
    /// Simulated seconds per wall second.
    pub speed: f64,
    /// The game requested for each genre of the demand.
    pub games: BTreeMap<GenreName, GameId>,
    /// Keep-alive connections for the short calls.
    pub connections: usize,
    /// Whether requests may queue (the scenario's `demand.queue`).
    pub queue: bool,
    /// The scenario's simulated length, ms.
    pub duration_ms: u64,
    /// Who keeps warm instances (the scenario's `[pools]`, `--pools` applied): the tool's own
    /// broker runs its pool planner to match ([`plan_pools`]); an existing broker plans as it
    /// is configured.
    pub pools: Pools,
}

/// The broker a run talks to.
#[derive(Debug, Clone)]
pub(crate) enum Target {
    /// The tool starts a broker and agents in-process.
    Own {
        /// Agents.
        nodes: usize,
        /// GPUs per agent.
        gpus_per_node: usize,
        /// Each agent's simulated GPUs, a `gpus.toml` document.
        gpus_toml: String,
        /// Where their state goes (a temp dir inside it); the system's temp dir when absent.
        data_dir: Option<PathBuf>,
    },
    /// An existing broker.
    External {
        /// `host:port`.
        authority: String,
        /// Its API key.
        api_key: String,
    },
}

impl Plan {
    /// Checks `scenario` and `opts` against what a live run can do.
    pub(crate) fn new(scenario: &Scenario, opts: &LiveOptions) -> Result<Self, LiveError> {
        let speed = opts.speed;
        if !(speed.is_finite() && (MIN_SPEED..=MAX_SPEED).contains(&speed)) {
            return Err(LiveError::Option {
                flag: "speed",
                value: speed.to_string(),
                rule: format!(
                    "must be {MIN_SPEED}..={MAX_SPEED} simulated seconds per wall second"
                ),
            });
        }
        if !(1..=1024).contains(&opts.connections) {
            return Err(LiveError::Option {
                flag: "connections",
                value: opts.connections.to_string(),
                rule: "must be 1..=1024".into(),
            });
        }
        // One broker serves one region: the demand's players must all be in it.
        let regions: Vec<&str> = scenario.fleet.iter().map(|g| g.region.as_str()).collect();
        if let Some(other) = regions
            .iter()
            .find(|r| **r != regions.first().copied().unwrap_or(""))
        {
            return Err(invalid(
                "fleet",
                &format!("regions {}", join_unique(&regions)),
                &format!(
                    "live runs one broker, which serves one region; region {other} is a second \
                     one (run multi-region scenarios with sim)"
                ),
            ));
        }
        let games = game_map(scenario, &opts.games)?;
        let target = match &opts.broker {
            Some(url) => {
                let api_key = opts
                    .api_key
                    .clone()
                    .filter(|k| !k.is_empty())
                    .ok_or_else(|| LiveError::Option {
                        flag: "api-key",
                        value: "(none)".into(),
                        rule:
                            "--broker needs the broker's API key (--api-key or FRAMECAST_API_KEY)"
                                .into(),
                    })?;
                if let Some((i, f)) = scenario.faults.iter().enumerate().next() {
                    let kind = match f {
                        Fault::NodeLoss { .. } => "node-loss",
                        Fault::BrokerRestart { .. } => "broker-restart",
                    };
                    return Err(invalid(
                        &format!("faults.{i}"),
                        kind,
                        "needs the tool's own broker and agents, which --broker replaces: \
                         leave out --broker, or run a scenario without faults",
                    ));
                }
                Target::External {
                    authority: authority(url)?,
                    api_key,
                }
            }
            None => {
                let own = own_fleet(scenario, opts)?;
                keeps_within_the_timers(scenario.duration_s, speed)?;
                own
            }
        };
        let mut pools = scenario.pools.clone();
        if let Some(policy) = opts.pools {
            pools.policy = policy;
        }
        Ok(Self {
            target,
            speed,
            games,
            connections: opts.connections,
            queue: scenario.demand.queue,
            duration_ms: scenario.duration_s.saturating_mul(1000),
            pools,
        })
    }

    /// The run's wall-clock length.
    pub(crate) fn wall_length(&self) -> Duration {
        wall_of(self.duration_ms, self.speed)
    }
}

/// Wall-clock time for `sim_ms` simulated milliseconds at `speed`.
pub(crate) fn wall_of(sim_ms: u64, speed: f64) -> Duration {
    Duration::from_secs_f64(sim_ms as f64 / 1000.0 / speed)
}

/// Maps simulated time onto the wall clock: simulated ms 0 is `start`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Clock {
    /// When simulated time 0 is.
    pub start: Instant,
    /// Simulated seconds per wall second.
    pub speed: f64,
}

impl Clock {
    /// When simulated `ms` falls.
    pub(crate) fn wall(&self, ms: u64) -> Instant {
        self.start + wall_of(ms, self.speed)
    }

    /// Simulated ms at wall time `t` (0 before the start).
    pub(crate) fn sim_ms(&self, t: Instant) -> u64 {
        crate::demand::to_ms(
            t.saturating_duration_since(self.start).as_secs_f64() * 1000.0 * self.speed,
        )
    }

    /// A wall-clock duration in simulated ms.
    pub(crate) fn sim_of(&self, d: Duration) -> u64 {
        crate::demand::to_ms(d.as_secs_f64() * 1000.0 * self.speed)
    }
}

/// Scales `config`'s timers for a run at `speed` that lasts `run` on the wall clock. The timers
/// the simulation models (queue timeout, reconnect grace, heartbeats and node-loss detection,
/// node-lost grace) are divided by the speed; those that would end sessions the run holds on
/// purpose (reservation TTL: nobody connects over WHEP; idle timeout; longest session) are set
/// past the run's end.
///
/// A run too long for the timers' bound is refused by [`Plan::new`]; the bound applied here is
/// only the configuration's limit, never reached by a planned run.
pub(crate) fn scale_timers(config: &mut BrokerConfig, speed: f64, run: Duration) {
    let keep = u32::try_from(run.as_secs().saturating_add(KEEP_MARGIN_S).min(MAX_KEEP_S))
        .unwrap_or(u32::MAX);
    let t = &mut config.timers;
    t.reservation_ttl_s = keep;
    t.idle_timeout_s = keep;
    t.max_session_s = keep;
    t.queue_timeout_s = scaled(t.queue_timeout_s, speed, 1);
    t.reconnect_grace_s = scaled(t.reconnect_grace_s, speed, 1);
    let c = &mut config.control;
    c.heartbeat_interval_ms = scaled(c.heartbeat_interval_ms, speed, MIN_HEARTBEAT_MS);
    // The broker requires heartbeat < suspect < down; keep a heartbeat or two between them.
    c.suspect_after_ms = scaled(c.suspect_after_ms, speed, 1).max(c.heartbeat_interval_ms * 2);
    c.down_after_ms =
        scaled(c.down_after_ms, speed, 1).max(c.suspect_after_ms + c.heartbeat_interval_ms);
    c.node_lost_grace_ms = scaled(c.node_lost_grace_ms, speed, 1);
    for tier in config.tiers.values_mut() {
        tier.max_session_s = None;
    }
}

/// Sets the broker's pool planner for `pools` at `speed`, as `sim` models the policy:
///
/// - `none`: the planner is off; no slot is held by an idle warm instance.
/// - `fixed`: the planner keeps exactly `fixed_per_key` warm instances per tier and game that
///   has had demand (its `min_warm` = `max_warm`), never more, never fewer.
/// - `planner`: the scenario's `[pools.planner]` settings over the broker's defaults.
///
/// Its round, demand windows and launch time are divided by the speed (within the broker's
/// bounds). The learned daily profile is switched off: its hours are the wall clock's, which a
/// compressed day does not follow. No webhook.
pub(crate) fn plan_pools(config: &mut BrokerConfig, pools: &Pools, speed: f64) {
    let p = &mut config.planner;
    p.enabled = pools.policy != PoolPolicy::None;
    let k = &pools.planner;
    // The broker's rounds are 0.2 s at the shortest (its driver's tick).
    p.round_every_s = (pools.round_every_s as f64 / speed).max(0.2);
    p.short_window_s = (p.short_window_s / speed).max(p.round_every_s);
    p.long_window_s = (p.long_window_s / speed).max(p.short_window_s);
    p.launch_time_s = (pools.launch_s as f64 / speed).clamp(0.1, 3600.0);
    p.daily_profile = false;
    p.webhook_url = None;
    match pools.policy {
        PoolPolicy::None => {}
        PoolPolicy::Fixed => {
            p.safety_z = 0.0;
            p.min_warm = pools.fixed_per_key;
            p.max_warm = pools.fixed_per_key;
        }
        PoolPolicy::Planner => {
            p.safety_z = k.safety_z.unwrap_or(p.safety_z);
            p.min_warm = k.min_warm.unwrap_or(p.min_warm);
            p.max_warm = k.max_warm.unwrap_or(p.max_warm);
            p.max_changes_per_round = k
                .max_changes_per_round
                .map_or(p.max_changes_per_round, |n| {
                    u32::try_from(n).unwrap_or(u32::MAX)
                });
            p.hysteresis_rounds = k.hysteresis_rounds.unwrap_or(p.hysteresis_rounds);
        }
    }
}

/// `v / speed`, rounded, at least `floor`.
fn scaled(v: u32, speed: f64, floor: u32) -> u32 {
    let x = (f64::from(v) / speed).round();
    // In range: clamped to u32 before the conversion.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let x = x.clamp(0.0, f64::from(u32::MAX)) as u32;
    x.max(floor)
}

/// Refuses a run of `duration_s` simulated seconds at `speed` whose wall length, with the
/// slack the held sessions' timers keep, is longer than those timers may be set to: they would
/// fire in the middle of the run and end sessions it holds.
fn keeps_within_the_timers(duration_s: u64, speed: f64) -> Result<(), LiveError> {
    let wall_s = duration_s as f64 / speed;
    let need_s = wall_s + KEEP_MARGIN_S as f64;
    if need_s <= MAX_KEEP_S as f64 {
        return Ok(());
    }
    // The slowest speed that fits, rounded up to a hundredth.
    let fits = (duration_s as f64 / (MAX_KEEP_S - KEEP_MARGIN_S) as f64 * 100.0).ceil() / 100.0;
    Err(LiveError::Option {
        flag: "speed",
        value: speed.to_string(),
        rule: format!(
            "the run would last {wall_s:.0} s on the wall clock (duration_s {duration_s} / speed \
             {speed}), and the broker's reservation TTL, idle timeout and longest session, which \
             must outlast it by {KEEP_MARGIN_S} s, may be at most {MAX_KEEP_S} s (7 days): use \
             --speed {fits} or more, or a shorter scenario"
        ),
    })
}

/// Dev mode's games, with their genres, as `framecast_broker::dev` configures them.
pub(crate) fn dev_games() -> Result<Vec<(GenreName, GameId)>, LiveError> {
    let config = framecast_broker::dev::broker_config(&DevOptions::default(), Path::new("."))
        .map_err(|e| LiveError::Deploy(format!("dev mode's configuration: {e:#}")))?;
    Ok(config.games.into_iter().map(|g| (g.genre, g.id)).collect())
}

/// The in-process fleet a scenario asks for: identical nodes (dev mode gives every agent the
/// same simulated GPUs), at most `--max-nodes` of them.
fn own_fleet(scenario: &Scenario, opts: &LiveOptions) -> Result<Target, LiveError> {
    let Some(first) = scenario.fleet.first() else {
        return Err(invalid("fleet", "[]", "needs at least one [[fleet]] group"));
    };
    for (i, g) in scenario.fleet.iter().enumerate().skip(1) {
        if (g.model.as_str(), g.gpus_per_node, g.mode)
            != (first.model.as_str(), first.gpus_per_node, first.mode)
        {
            return Err(invalid(
                &format!("fleet.{i}"),
                &format!("{} x {} {}", g.gpus_per_node, g.model, g.mode),
                &format!(
                    "live starts identical in-process nodes; fleet.0 has {} x {} {}",
                    first.gpus_per_node, first.model, first.mode
                ),
            ));
        }
    }
    let nodes: usize = scenario.fleet.iter().map(|g| g.nodes).sum();
    if nodes > opts.max_nodes {
        return Err(invalid(
            "fleet",
            &format!("{nodes} nodes"),
            &format!(
                "live runs at most {} in-process agents on this machine (--max-nodes); run this \
                 fleet with sim, or point --broker at a deployment that has it",
                opts.max_nodes
            ),
        ));
    }
    let Some(spec) = Scenario::model(first) else {
        return Err(invalid(
            "fleet.0.model",
            &first.model,
            "is not a built-in GPU model",
        ));
    };
    if !spec.supports(first.mode) {
        return Err(invalid(
            "fleet.0.mode",
            &first.mode.to_string(),
            &format!("{} does not support it", spec.model),
        ));
    }
    let gpus = SimulatedGpus {
        gpus: vec![SimulatedGpuGroup {
            model: spec.model.clone(),
            count: u16::try_from(first.gpus_per_node).unwrap_or(u16::MAX),
            mode: Some(first.mode),
        }],
    };
    let gpus_toml = toml::to_string(&gpus).map_err(|e| {
        invalid(
            "fleet.0",
            &first.model,
            &format!("cannot be described to an agent: {e}"),
        )
    })?;
    Ok(Target::Own {
        nodes,
        gpus_per_node: first.gpus_per_node,
        gpus_toml,
        data_dir: opts.data_dir.clone(),
    })
}

/// The game for each genre of the demand, and of its trace's rows: `--games` over dev mode's.
fn game_map(
    scenario: &Scenario,
    given: &[GameFor],
) -> Result<BTreeMap<GenreName, GameId>, LiveError> {
    let dev = dev_games()?;
    let mut map = BTreeMap::new();
    for (genre, game) in &dev {
        // The first game of a genre stands for it.
        map.entry(genre.clone()).or_insert_with(|| game.clone());
    }
    for g in given {
        map.insert(g.genre.clone(), g.game.clone());
    }
    let rule = |genre: &str| {
        let dev = dev
            .iter()
            .map(|(genre, game)| format!("{game} ({genre})"))
            .collect::<Vec<_>>()
            .join(", ");
        format!(
            "live needs a game of genre {genre} on the broker: pass --games {genre}=<game> \
             (dev mode has {dev})"
        )
    };
    let known = |genre: &str| {
        GenreName::new(genre)
            .ok()
            .is_some_and(|g| map.contains_key(&g))
    };
    for (genre, weight) in &scenario.demand.genres {
        if *weight > 0.0 && !known(genre) {
            return Err(invalid(
                &format!("demand.genres.{genre}"),
                &weight.to_string(),
                &rule(genre),
            ));
        }
    }
    if let Arrivals::Trace { path, rows } = &scenario.demand.arrivals {
        let end_ms = scenario.duration_s.saturating_mul(1000);
        let requested = rows
            .iter()
            .enumerate()
            .filter(|(_, row)| crate::demand::to_ms(row.t_s * 1000.0) <= end_ms);
        for (i, row) in requested {
            if let Some(genre) = row.genre.as_deref().filter(|g| !known(g)) {
                // The header is line 1.
                return Err(invalid(
                    &format!("demand.arrivals ({path}, line {}).genre", i + 2),
                    genre,
                    &rule(genre),
                ));
            }
        }
    }
    Ok(map)
}

/// `host:port` of an `http://host:port` URL.
fn authority(url: &str) -> Result<String, LiveError> {
    let bad = |rule: &str| LiveError::Option {
        flag: "broker",
        value: url.to_owned(),
        rule: rule.to_owned(),
    };
    let rest = url.strip_prefix("http://").ok_or_else(|| {
        bad("must be http://HOST:PORT (the API over plain HTTP; https is not supported)")
    })?;
    let rest = rest.trim_end_matches('/');
    if rest.is_empty() || rest.contains('/') || rest.contains('@') {
        return Err(bad("must be http://HOST:PORT with no path"));
    }
    let has_port = rest
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
    if !has_port {
        return Err(bad("must name the port: http://HOST:PORT"));
    }
    Ok(rest.to_owned())
}

fn invalid(field: &str, value: &str, rule: &str) -> LiveError {
    LiveError::Scenario {
        field: field.to_owned(),
        value: value.to_owned(),
        rule: rule.to_owned(),
    }
}

fn join_unique(items: &[&str]) -> String {
    let mut seen: Vec<&str> = Vec::new();
    for i in items {
        if !seen.contains(i) {
            seen.push(i);
        }
    }
    seen.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use framecast_shared::gpu::GpuMode;

    fn scenario(fleet: &str, extra: &str) -> Scenario {
        let text = format!(
            r#"
name = "t"
duration_s = 600
{fleet}
[demand]
arrivals = {{ kind = "poisson", rate_per_s = 0.5 }}
tiers = {{ "720p" = 1 }}
genres = {{ fps = 1, rpg = 1 }}
{extra}
"#
        );
        Scenario::parse(&text, "t.toml").unwrap_or_else(|e| panic!("{e}"))
    }

    const ONE: &str = "[[fleet]]\nregion = \"eu\"\nnodes = 3\nmodel = \"l4\"\ngpus_per_node = 2\n";

    #[test]
    fn a_single_region_fleet_becomes_identical_agents() {
        let plan = Plan::new(&scenario(ONE, ""), &LiveOptions::default()).unwrap();
        let Target::Own {
            nodes,
            gpus_per_node,
            gpus_toml,
            ..
        } = &plan.target
        else {
            panic!("{:?}", plan.target)
        };
        assert_eq!((*nodes, *gpus_per_node), (3, 2));
        let back: SimulatedGpus = toml::from_str(gpus_toml).unwrap();
        assert_eq!(back.gpus[0].count, 2);
        assert_eq!(back.gpus[0].mode, Some(GpuMode::EqualSize));
        assert!(gpus_toml.contains(&GpuMode::EqualSize.to_string()));
        assert_eq!(plan.games.len(), 3);
    }

    #[test]
    fn what_live_cannot_run_is_refused_naming_the_field() {
        let two_regions = format!("{ONE}{}", ONE.replace("\"eu\"", "\"us\""));
        let mixed = format!("{ONE}{}", ONE.replace("\"l4\"", "\"a10\""));
        let big = ONE.replace("nodes = 3", "nodes = 65");
        let external = LiveOptions {
            broker: Some("http://127.0.0.1:9".into()),
            api_key: Some("k".into()),
            ..LiveOptions::default()
        };
        let cases: Vec<(Scenario, LiveOptions, &str)> = vec![
            (
                scenario(&two_regions, ""),
                LiveOptions::default(),
                "fleet = regions eu, us",
            ),
            (scenario(&mixed, ""), LiveOptions::default(), "fleet.1 ="),
            (
                scenario(&big, ""),
                LiveOptions::default(),
                "fleet = 65 nodes",
            ),
            (
                scenario(
                    ONE,
                    "[[faults]]\nkind = \"node-loss\"\nat_s = 10\nnodes = 1\n",
                ),
                external.clone(),
                "faults.0 = node-loss",
            ),
            (
                scenario(ONE, "").tap(|s| {
                    s.demand.genres.insert("racing".into(), 1.0);
                }),
                LiveOptions::default(),
                "demand.genres.racing",
            ),
            (
                scenario(ONE, ""),
                LiveOptions {
                    speed: 0.0,
                    ..LiveOptions::default()
                },
                "--speed 0",
            ),
            (
                scenario(ONE, ""),
                LiveOptions {
                    broker: Some("https://x:1".into()),
                    api_key: Some("k".into()),
                    ..LiveOptions::default()
                },
                "--broker https://x:1",
            ),
            (
                scenario(ONE, ""),
                LiveOptions {
                    api_key: None,
                    ..external.clone()
                },
                "--api-key",
            ),
        ];
        for (s, o, want) in cases {
            let err = Plan::new(&s, &o).unwrap_err().to_string();
            assert!(err.contains(want), "{err:?} lacks {want:?}");
        }
        // A trace's own genres, where requested within the run, need games too.
        let row = |t_s: f64, genre: &str| -> crate::scenario::TraceRow {
            serde_json::from_value(serde_json::json!({ "t_s": t_s, "genre": genre })).unwrap()
        };
        let mut traced = scenario(ONE, "");
        traced.demand.arrivals = Arrivals::Trace {
            path: "t.csv".into(),
            rows: vec![row(1.0, "fps"), row(2.0, "racing")],
        };
        let err = Plan::new(&traced, &LiveOptions::default())
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("demand.arrivals (t.csv, line 3).genre = racing:")
                && err.contains("--games racing=<game>")
                && err.contains("open-world (rpg)"),
            "{err}"
        );
        traced.demand.arrivals = Arrivals::Trace {
            path: "t.csv".into(),
            rows: vec![row(1.0, "fps"), row(601.0, "racing")],
        };
        Plan::new(&traced, &LiveOptions::default()).unwrap();
        // Mapped genres and an external broker without faults are fine.
        let mut s = scenario(ONE, "");
        s.demand.genres.insert("racing".into(), 1.0);
        let o = LiveOptions {
            games: vec!["racing=kart".parse().unwrap()],
            ..external
        };
        let plan = Plan::new(&s, &o).unwrap();
        assert!(
            matches!(&plan.target, Target::External { authority, .. } if authority == "127.0.0.1:9")
        );
        assert_eq!(
            plan.games[&GenreName::new("racing").unwrap()].as_str(),
            "kart"
        );
    }

    #[test]
    fn a_run_longer_than_the_timers_may_be_is_refused_naming_the_speed() {
        let mut month = scenario(ONE, "");
        month.duration_s = 30 * 24 * 3600;
        let err = Plan::new(&month, &LiveOptions::default())
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("--speed 1:") && err.contains("use --speed 4.29 or more"),
            "{err}"
        );
        let fast = LiveOptions {
            speed: 4.29,
            ..LiveOptions::default()
        };
        let plan = Plan::new(&month, &fast).unwrap();
        let mut c = BrokerConfig::default();
        scale_timers(&mut c, plan.speed, plan.wall_length());
        let mut errors = Vec::new();
        framecast_shared::config::Validate::validate(&c, &mut errors);
        assert!(errors.is_empty(), "{errors:?}");
        assert!(u64::from(c.timers.reservation_ttl_s) >= plan.wall_length().as_secs() + 600);
        // An existing broker's timers are its own.
        let external = LiveOptions {
            broker: Some("http://127.0.0.1:9".into()),
            api_key: Some("k".into()),
            ..LiveOptions::default()
        };
        Plan::new(&month, &external).unwrap();
    }

    #[test]
    fn the_default_games_are_dev_modes() {
        let games = dev_games().unwrap();
        assert!(games.len() >= 3, "{games:?}");
        let plan = Plan::new(&scenario(ONE, ""), &LiveOptions::default()).unwrap();
        for (genre, game) in &games {
            assert!(plan.games.contains_key(genre), "{genre} ({game})");
        }
    }

    #[test]
    fn timers_are_divided_by_the_speed_and_those_that_must_not_fire_outlast_the_run() {
        let mut c = BrokerConfig::default();
        scale_timers(&mut c, 60.0, Duration::from_secs(30));
        assert_eq!(c.timers.queue_timeout_s, 2);
        assert_eq!(c.timers.reconnect_grace_s, 2);
        assert_eq!(c.control.node_lost_grace_ms, 500);
        assert_eq!(c.control.heartbeat_interval_ms, 100);
        assert!(c.control.suspect_after_ms > c.control.heartbeat_interval_ms);
        assert!(c.control.down_after_ms > c.control.suspect_after_ms);
        assert_eq!(c.timers.reservation_ttl_s, 630);
        assert_eq!(c.timers.idle_timeout_s, 630);
        let mut errors = Vec::new();
        framecast_shared::config::Validate::validate(&c, &mut errors);
        assert!(errors.is_empty(), "{errors:?}");
        // Real time leaves the modelled timers alone.
        let mut real = BrokerConfig::default();
        scale_timers(&mut real, 1.0, Duration::from_secs(3600));
        assert_eq!(real.timers.queue_timeout_s, 120);
        assert_eq!(real.control.down_after_ms, 10_000);
    }

    #[test]
    fn the_pool_policy_sets_the_brokers_planner_at_the_runs_speed() {
        let pools = |policy: &str, knobs: &str| {
            let mut s = scenario(
                ONE,
                &format!("[pools]\npolicy = \"{policy}\"\nfixed_per_key = 7\n{knobs}"),
            );
            s.pools.policy = policy.parse().unwrap();
            s.pools
        };
        let planned = |p: &Pools, speed: f64| {
            let mut c = BrokerConfig::default();
            plan_pools(&mut c, p, speed);
            let mut errors = Vec::new();
            framecast_shared::config::Validate::validate(&c, &mut errors);
            assert!(errors.is_empty(), "{errors:?}");
            c.planner
        };
        assert!(!planned(&pools("none", ""), 60.0).enabled);

        let fixed = planned(&pools("fixed", ""), 60.0);
        assert!(fixed.enabled);
        assert_eq!(
            (fixed.min_warm, fixed.max_warm, fixed.safety_z),
            (7, 7, 0.0)
        );

        let p = planned(
            &pools(
                "planner",
                "[pools.planner]\nsafety_z = 3\nmax_changes_per_round = 40\n",
            ),
            60.0,
        );
        assert!(p.enabled && !p.daily_profile && p.webhook_url.is_none());
        assert_eq!((p.safety_z, p.max_changes_per_round), (3.0, 40));
        // A 10 s round is 0.2 s at speed 60 (1/6 s, raised to the broker's tick); windows
        // and launch divided by the speed.
        assert!((p.round_every_s - 0.2).abs() < 1e-9, "{}", p.round_every_s);
        assert!(
            (p.short_window_s - 5.0).abs() < 1e-9,
            "{}",
            p.short_window_s
        );
        assert!((p.launch_time_s - 0.5).abs() < 1e-9, "{}", p.launch_time_s);
        // At real time, the scenario's own figures.
        let real = planned(&pools("planner", ""), 1.0);
        assert!(
            (real.round_every_s - 10.0).abs() < 1e-9 && (real.launch_time_s - 30.0).abs() < 1e-9
        );
    }

    #[test]
    fn the_clock_compresses_simulated_time() {
        let start = Instant::now();
        let c = Clock { start, speed: 60.0 };
        assert_eq!(c.wall(60_000) - start, Duration::from_secs(1));
        assert_eq!(c.sim_ms(start + Duration::from_millis(500)), 30_000);
        assert_eq!(c.sim_of(Duration::from_millis(10)), 600);
    }

    trait Tap: Sized {
        fn tap(mut self, f: impl FnOnce(&mut Self)) -> Self {
            f(&mut self);
            self
        }
    }
    impl Tap for Scenario {}
}
