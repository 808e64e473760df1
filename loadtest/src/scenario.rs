//! Scenario files: the fleet, the demand on it, faults, and the SLO a run must meet, in TOML.
//! Every engine (`sim` today) runs the same file. See `loadtest/scenarios/` for examples and
//! `docs/OPERATIONS.md` ("Load tests") for the format.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use framecast_broker::planner::PlannerConfig;
use framecast_shared::gpu::{GpuMode, GpuSpec, models};

/// One scenario.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// A short name for reports.
    pub name: String,
    /// Seed of every random draw: the same seed gives the same run.
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Simulated length of the run, seconds.
    pub duration_s: u64,
    /// The placement strategy (`genre-weighted`, `first-fit`, `round-robin`, `random`,
    /// `exclusive`); `--strategy` overrides it.
    #[serde(default = "default_strategy")]
    pub strategy: String,
    /// The GPU nodes, per region.
    pub fleet: Vec<FleetGroup>,
    /// Who asks for sessions, when and for how long.
    pub demand: Demand,
    /// Things that go wrong during the run.
    #[serde(default)]
    pub faults: Vec<Fault>,
    /// What the run must achieve; a miss makes the command exit with status 1.
    #[serde(default)]
    pub slo: Slo,
    /// Warm game instances: who keeps them and how long one takes to start.
    #[serde(default)]
    pub pools: Pools,
}

fn default_seed() -> u64 {
    1
}

fn default_strategy() -> String {
    "genre-weighted".into()
}

/// `[[fleet]]`: identical nodes in one region.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetGroup {
    /// The region.
    pub region: String,
    /// How many nodes.
    pub nodes: usize,
    /// The GPU model of every GPU (a built-in model name, e.g. `l4`).
    pub model: String,
    /// GPUs per node.
    pub gpus_per_node: usize,
    /// How the GPUs are shared.
    #[serde(default = "default_mode")]
    pub mode: GpuMode,
}

fn default_mode() -> GpuMode {
    GpuMode::EqualSize
}

/// `[demand]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Demand {
    /// How requests arrive.
    pub arrivals: Arrivals,
    /// Share of requests per tier (weights, any scale).
    pub tiers: BTreeMap<String, f64>,
    /// Share of requests per genre (weights, any scale).
    pub genres: BTreeMap<String, f64>,
    /// How long sessions last, per genre (log-normal); a genre without an entry uses
    /// `default`.
    #[serde(default)]
    pub session_minutes: BTreeMap<String, LogNormal>,
    /// Whether requests that find no room wait in the queue (else they are rejected).
    #[serde(default = "yes")]
    pub queue: bool,
    /// Probability that a queued player gives up, per minute of waiting.
    #[serde(default)]
    pub abandon_per_minute: f64,
    /// Probability that a session's stream drops once, at a random moment of its length (the
    /// session waits in `reconnecting`, holding its GPU).
    #[serde(default)]
    pub reconnect_probability: f64,
    /// Probability that a player whose stream dropped comes back (within 2–30 s); the others
    /// never do and their session ends when the broker's reconnect grace runs out.
    #[serde(default = "one")]
    pub reconnect_success: f64,
}

fn one() -> f64 {
    1.0
}

fn yes() -> bool {
    true
}

/// A log-normal distribution given by its median and the standard deviation of its log.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogNormal {
    /// The median.
    pub median: f64,
    /// σ of the logarithm (0: always the median).
    pub sigma: f64,
}

/// `[demand.arrivals]`: the arrival rate over time (requests per second); arrivals are a
/// Poisson process at that rate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Arrivals {
    /// A constant rate.
    Poisson {
        /// Requests per second.
        rate_per_s: f64,
    },
    /// A rate rising linearly from `from_per_s` to `to_per_s` over the run.
    Ramp {
        /// At the start.
        from_per_s: f64,
        /// At the end.
        to_per_s: f64,
    },
    /// A daily curve: a cosine between `trough_per_s` (at `trough_hour`) and `peak_per_s`
    /// twelve hours later; the run starts at midnight.
    Daily {
        /// The lowest rate.
        trough_per_s: f64,
        /// The highest rate.
        peak_per_s: f64,
        /// The hour of the lowest rate (0–24).
        #[serde(default = "default_trough_hour")]
        trough_hour: f64,
    },
    /// Recorded arrivals: a CSV file (its path relative to the scenario's) with a header and
    /// one row per request: `t_s` (seconds into the run, required), and optionally `tier`,
    /// `genre` and `minutes` (else drawn from the mix and the genre's length).
    Trace {
        /// The CSV file.
        path: String,
        /// Its rows, read when the scenario is loaded.
        #[serde(skip)]
        rows: Vec<TraceRow>,
    },
}

/// One recorded arrival.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TraceRow {
    /// Seconds into the run.
    pub t_s: f64,
    /// The tier asked for; drawn from the mix when absent.
    #[serde(default)]
    pub tier: Option<String>,
    /// The genre played; drawn from the mix when absent.
    #[serde(default)]
    pub genre: Option<String>,
    /// How long the session lasts, minutes; drawn from the genre's length when absent.
    #[serde(default)]
    pub minutes: Option<f64>,
}

fn default_trough_hour() -> f64 {
    8.0
}

/// `[[faults]]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Fault {
    /// `nodes` nodes (the first ones of the fleet) stop answering at `at_s`; their sessions
    /// end `node-lost` after the broker's grace period.
    NodeLoss {
        /// When, seconds into the run.
        at_s: u64,
        /// How many nodes.
        nodes: usize,
    },
    /// The broker stops at `at_s` and is back `down_s` later with its state (its store and
    /// the agents' reports): requests made meanwhile are retried by their clients when it is
    /// back, sessions that end meanwhile free their GPUs only then, and queued requests wait
    /// longer.
    BrokerRestart {
        /// When, seconds into the run.
        at_s: u64,
        /// How long the broker is away, seconds.
        #[serde(default = "default_down_s")]
        down_s: u64,
    },
}

fn default_down_s() -> u64 {
    10
}

impl Fault {
    /// When it happens, seconds into the run.
    pub fn at_s(&self) -> u64 {
        match *self {
            Self::NodeLoss { at_s, .. } | Self::BrokerRestart { at_s, .. } => at_s,
        }
    }
}

/// `[slo]`: thresholds a run must meet. Absent ones are not checked.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Slo {
    /// The largest share of requests rejected (0–1).
    pub max_rejected_ratio: Option<f64>,
    /// The longest p99 queue wait, seconds, over placed requests (those placed at once count as
    /// 0).
    pub max_queue_wait_p99_s: Option<f64>,
    /// The lowest framebuffer utilisation at the busiest sample (0–1).
    pub min_peak_framebuffer_utilization: Option<f64>,
}

/// `[pools]`: warm game instances kept ahead of demand, so a player starts at once instead of
/// waiting for a game to launch.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pools {
    /// Who keeps warm instances; `--pools` overrides it.
    #[serde(default)]
    pub policy: PoolPolicy,
    /// Seconds from starting a game instance to its being ready: what a player placed on a
    /// slot without a warm instance of its game waits.
    #[serde(default = "default_launch_s")]
    pub launch_s: u64,
    /// `fixed`: warm instances per tier and game in each region.
    #[serde(default = "default_fixed_per_key")]
    pub fixed_per_key: u16,
    /// How often the pool plan is made again (the planner's round, the fixed buffer's
    /// top-up), seconds.
    #[serde(default = "default_round_every_s")]
    pub round_every_s: u64,
    /// `planner`: settings of the planner other than its defaults.
    #[serde(default)]
    pub planner: PlannerKnobs,
}

/// `[pools.planner]`: the pool planner's settings (`framecast_broker::planner::PlannerConfig`)
/// a scenario changes; absent ones keep the planner's defaults. Its launch time and round are
/// `launch_s` and `round_every_s`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlannerKnobs {
    /// Standard deviations of arrivals during one launch added to the warm buffer.
    pub safety_z: Option<f64>,
    /// Fewest warm instances per (region, tier, game) with any demand seen.
    pub min_warm: Option<u16>,
    /// Most warm instances per (region, tier, game).
    pub max_warm: Option<u16>,
    /// Most GPUs whose plan or steering changes in one round.
    pub max_changes_per_round: Option<usize>,
    /// Rounds a deficit and a surplus must last before a GPU is steered away.
    pub hysteresis_rounds: Option<u32>,
    /// Learn a daily profile of the demand and plan for its rate ahead.
    pub daily_profile: Option<bool>,
}

impl Pools {
    /// The planner's settings for this scenario.
    pub fn planner_config(&self) -> PlannerConfig {
        let d = PlannerConfig::default();
        let k = &self.planner;
        PlannerConfig {
            round_every: Duration::from_secs(self.round_every_s),
            launch_time: Duration::from_secs(self.launch_s),
            safety_z: k.safety_z.unwrap_or(d.safety_z),
            min_warm: k.min_warm.unwrap_or(d.min_warm),
            max_warm: k.max_warm.unwrap_or(d.max_warm),
            max_changes_per_round: k.max_changes_per_round.unwrap_or(d.max_changes_per_round),
            hysteresis_rounds: k.hysteresis_rounds.unwrap_or(d.hysteresis_rounds),
            daily_profile: k.daily_profile.unwrap_or(d.daily_profile),
            ..d
        }
    }
}

impl Default for Pools {
    fn default() -> Self {
        Self {
            policy: PoolPolicy::default(),
            launch_s: default_launch_s(),
            fixed_per_key: default_fixed_per_key(),
            round_every_s: default_round_every_s(),
            planner: PlannerKnobs::default(),
        }
    }
}

fn default_launch_s() -> u64 {
    30
}

fn default_fixed_per_key() -> u16 {
    1
}

fn default_round_every_s() -> u64 {
    10
}

/// Who keeps warm instances.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PoolPolicy {
    /// Nobody: a placed session starts at once, as if its game were always running (the
    /// engine's figures alone; warm figures are not reported).
    #[default]
    None,
    /// The baseline: a fixed number of warm instances per tier and game in each region, on
    /// GPUs that have room of the right profile; GPUs are never re-profiled for them.
    Fixed,
    /// The pool planner (`framecast_broker::planner`): warm instances and GPU profiles
    /// sized from the observed demand.
    Planner,
}

impl PoolPolicy {
    /// Every policy, as the scenario and `--pools` name it.
    pub const NAMES: [&'static str; 3] = ["none", "fixed", "planner"];

    /// Its name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Fixed => "fixed",
            Self::Planner => "planner",
        }
    }
}

impl std::fmt::Display for PoolPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for PoolPolicy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "none" => Ok(Self::None),
            "fixed" => Ok(Self::Fixed),
            "planner" => Ok(Self::Planner),
            other => Err(format!(
                "{other}: must be one of {}",
                Self::NAMES.join(", ")
            )),
        }
    }
}

/// Why a scenario cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    /// The file cannot be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not a scenario.
    #[error("{path}: {source}")]
    Parse {
        /// The file.
        path: String,
        /// Why, with the line.
        source: Box<toml::de::Error>,
    },
    /// An arrival trace cannot be read (with the line of a bad row).
    #[error("{path}: {source}")]
    Trace {
        /// The trace file.
        path: String,
        /// Why.
        source: Box<csv::Error>,
    },
    /// A field has a value the scenario cannot use.
    #[error("{path}: {field} = {value}: {rule}")]
    Invalid {
        /// The file.
        path: String,
        /// The field.
        field: String,
        /// Its value.
        value: String,
        /// The rule it breaks.
        rule: String,
    },
}

impl Scenario {
    /// Reads and checks the scenario in `path`.
    pub fn load(path: &Path) -> Result<Self, ScenarioError> {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ScenarioError::Read {
            path: name.clone(),
            source,
        })?;
        let mut scenario = Self::parse(&text, &name)?;
        if let Arrivals::Trace { path: csv, rows } = &mut scenario.demand.arrivals {
            let file = path.parent().unwrap_or(Path::new(".")).join(&*csv);
            *rows = read_trace(&file, scenario.duration_s)?;
        }
        Ok(scenario)
    }

    /// Parses and checks a scenario; `path` names it in errors. A trace's rows are read by
    /// [`Scenario::load`], which knows where the file is.
    pub fn parse(text: &str, path: &str) -> Result<Self, ScenarioError> {
        let scenario: Scenario = toml::from_str(text).map_err(|e| ScenarioError::Parse {
            path: path.to_owned(),
            source: Box::new(e),
        })?;
        scenario.check(path)?;
        Ok(scenario)
    }

    /// The GPU model of a fleet group.
    pub fn model(group: &FleetGroup) -> Option<GpuSpec> {
        models::find(&group.model)
    }

    fn check(&self, path: &str) -> Result<(), ScenarioError> {
        let bad = |field: &str, value: &dyn std::fmt::Display, rule: &str| {
            Err(ScenarioError::Invalid {
                path: path.to_owned(),
                field: field.to_owned(),
                value: value.to_string(),
                rule: rule.to_owned(),
            })
        };
        if self.duration_s == 0 || self.duration_s > 30 * 86_400 {
            return bad(
                "duration_s",
                &self.duration_s,
                "must be 1..=2592000 (30 days)",
            );
        }
        if framecast_broker::placement::strategy::by_name(&self.strategy, 0).is_none() {
            return bad(
                "strategy",
                &self.strategy,
                &format!(
                    "must be one of {}",
                    framecast_broker::placement::strategy::NAMES.join(", ")
                ),
            );
        }
        if self.fleet.is_empty() {
            return bad("fleet", &"[]", "needs at least one [[fleet]] group");
        }
        for (i, g) in self.fleet.iter().enumerate() {
            if Self::model(g).is_none() {
                return bad(
                    &format!("fleet.{i}.model"),
                    &g.model,
                    "is not a built-in GPU model (see framecast-loadtest models)",
                );
            }
            if g.nodes == 0 || g.nodes > 100_000 {
                return bad(&format!("fleet.{i}.nodes"), &g.nodes, "must be 1..=100000");
            }
            if g.gpus_per_node == 0 || g.gpus_per_node > 16 {
                return bad(
                    &format!("fleet.{i}.gpus_per_node"),
                    &g.gpus_per_node,
                    "must be 1..=16",
                );
            }
        }
        let rate_ok = |r: f64| r.is_finite() && (0.0..=100_000.0).contains(&r);
        let rates = match &self.demand.arrivals {
            Arrivals::Poisson { rate_per_s } => vec![("rate_per_s", *rate_per_s)],
            Arrivals::Ramp {
                from_per_s,
                to_per_s,
            } => vec![("from_per_s", *from_per_s), ("to_per_s", *to_per_s)],
            Arrivals::Daily {
                trough_per_s,
                peak_per_s,
                trough_hour,
            } => {
                if !(0.0..=24.0).contains(trough_hour) {
                    return bad("demand.arrivals.trough_hour", trough_hour, "must be 0..=24");
                }
                vec![("trough_per_s", *trough_per_s), ("peak_per_s", *peak_per_s)]
            }
            Arrivals::Trace { path: csv, .. } => {
                if csv.trim().is_empty() {
                    return bad("demand.arrivals.path", &"\"\"", "must name a CSV file");
                }
                Vec::new()
            }
        };
        for (field, r) in rates {
            if !rate_ok(r) {
                return bad(
                    &format!("demand.arrivals.{field}"),
                    &r,
                    "must be a rate of 0..=100000 per second",
                );
            }
        }
        for (table, weights) in [
            ("tiers", &self.demand.tiers),
            ("genres", &self.demand.genres),
        ] {
            if weights.is_empty() || weights.values().all(|w| *w <= 0.0) {
                return bad(
                    &format!("demand.{table}"),
                    &"{}",
                    "needs at least one positive weight",
                );
            }
            for (k, w) in weights {
                if !w.is_finite() || *w < 0.0 {
                    return bad(&format!("demand.{table}.{k}"), w, "must be a weight ≥ 0");
                }
            }
        }
        for (genre, d) in &self.demand.session_minutes {
            if !(d.median.is_finite() && d.median > 0.0 && d.median <= 24.0 * 60.0) {
                return bad(
                    &format!("demand.session_minutes.{genre}.median"),
                    &d.median,
                    "must be minutes in (0, 1440]",
                );
            }
            if !(d.sigma.is_finite() && (0.0..=3.0).contains(&d.sigma)) {
                return bad(
                    &format!("demand.session_minutes.{genre}.sigma"),
                    &d.sigma,
                    "must be 0..=3",
                );
            }
        }
        for (field, p) in [
            ("abandon_per_minute", self.demand.abandon_per_minute),
            ("reconnect_probability", self.demand.reconnect_probability),
            ("reconnect_success", self.demand.reconnect_success),
        ] {
            if !(0.0..=1.0).contains(&p) {
                return bad(
                    &format!("demand.{field}"),
                    &p,
                    "must be a probability 0..=1",
                );
            }
        }
        let pools = &self.pools;
        if !(1..=3600).contains(&pools.launch_s) {
            return bad(
                "pools.launch_s",
                &pools.launch_s,
                "must be 1..=3600 seconds",
            );
        }
        if !(1..=10_000).contains(&pools.fixed_per_key) {
            return bad(
                "pools.fixed_per_key",
                &pools.fixed_per_key,
                "must be 1..=10000 warm instances",
            );
        }
        if !(1..=3600).contains(&pools.round_every_s) {
            return bad(
                "pools.round_every_s",
                &pools.round_every_s,
                "must be 1..=3600 seconds",
            );
        }
        let planner = pools.planner_config();
        if let Err(e) = planner.validate() {
            let value = match e.field {
                "safety_z" => planner.safety_z.to_string(),
                "min_warm" => format!("{} (max_warm {})", planner.min_warm, planner.max_warm),
                "max_changes_per_round" => planner.max_changes_per_round.to_string(),
                other => other.to_owned(),
            };
            return bad(&format!("pools.planner.{}", e.field), &value, e.reason);
        }
        let total_nodes: usize = self.fleet.iter().map(|g| g.nodes).sum();
        for (i, f) in self.faults.iter().enumerate() {
            if f.at_s() >= self.duration_s {
                return bad(
                    &format!("faults.{i}.at_s"),
                    &f.at_s(),
                    "must fall inside the run",
                );
            }
            if let Fault::BrokerRestart { down_s, .. } = f
                && !(1..=3600).contains(down_s)
            {
                return bad(&format!("faults.{i}.down_s"), down_s, "must be 1..=3600");
            }
            if let Fault::NodeLoss { nodes, .. } = f
                && (*nodes == 0 || *nodes > total_nodes)
            {
                return bad(
                    &format!("faults.{i}.nodes"),
                    nodes,
                    &format!("must be 1..={total_nodes} (the fleet's nodes)"),
                );
            }
        }
        Ok(())
    }
}

/// The rows of an arrival trace, checked and in time order.
fn read_trace(file: &Path, duration_s: u64) -> Result<Vec<TraceRow>, ScenarioError> {
    let name = file.display().to_string();
    let bad = |line: u64, field: &str, value: &dyn std::fmt::Display, rule: &str| {
        ScenarioError::Invalid {
            path: format!("{name}:{line}"),
            field: field.to_owned(),
            value: value.to_string(),
            rule: rule.to_owned(),
        }
    };
    let mut reader = csv::ReaderBuilder::new()
        .trim(csv::Trim::All)
        .from_path(file)
        .map_err(|e| ScenarioError::Trace {
            path: name.clone(),
            source: Box::new(e),
        })?;
    let mut rows = Vec::new();
    for record in reader.deserialize::<TraceRow>() {
        let row = record.map_err(|e| ScenarioError::Trace {
            path: name.clone(),
            source: Box::new(e),
        })?;
        // The header is line 1.
        let line = rows.len() as u64 + 2;
        if !(row.t_s.is_finite() && row.t_s >= 0.0 && row.t_s < duration_s as f64) {
            return Err(bad(
                line,
                "t_s",
                &row.t_s,
                "must be seconds inside the run (0 ≤ t_s < duration_s)",
            ));
        }
        if let Some(m) = row.minutes
            && !(m.is_finite() && m > 0.0 && m <= 24.0 * 60.0)
        {
            return Err(bad(line, "minutes", &m, "must be minutes in (0, 1440]"));
        }
        rows.push(row);
    }
    if rows.is_empty() {
        return Err(bad(1, "rows", &0, "the trace needs at least one arrival"));
    }
    rows.sort_by(|a, b| a.t_s.total_cmp(&b.t_s));
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMOKE: &str = r#"
name = "t"
duration_s = 600

[[fleet]]
region = "eu"
nodes = 2
model = "l4"
gpus_per_node = 2

[demand]
arrivals = { kind = "poisson", rate_per_s = 0.5 }
tiers = { "720p" = 1 }
genres = { fps = 1 }
"#;

    #[test]
    fn a_minimal_scenario_takes_the_defaults() {
        let s = Scenario::parse(SMOKE, "t.toml").unwrap();
        assert_eq!((s.seed, s.strategy.as_str()), (1, "genre-weighted"));
        assert_eq!(s.fleet[0].mode, GpuMode::EqualSize);
        assert!(s.demand.queue);
        assert_eq!(s.pools, Pools::default());
        assert_eq!(s.pools.policy, PoolPolicy::None);
        let planner = s.pools.planner_config();
        assert_eq!(planner.launch_time, Duration::from_secs(30));
        assert_eq!(planner.round_every, Duration::from_secs(10));
    }

    #[test]
    fn pools_take_a_policy_and_the_planner_settings() {
        let text = format!(
            "{SMOKE}\n[pools]\npolicy = \"planner\"\nlaunch_s = 45\n\n[pools.planner]\nsafety_z = 4\nmax_changes_per_round = 64\n"
        );
        let s = Scenario::parse(&text, "t.toml").unwrap();
        assert_eq!(s.pools.policy, PoolPolicy::Planner);
        let c = s.pools.planner_config();
        assert_eq!(c.launch_time, Duration::from_secs(45));
        assert_eq!((c.safety_z, c.max_changes_per_round), (4.0, 64));
        assert_eq!(c.max_warm, PlannerConfig::default().max_warm);
        for name in PoolPolicy::NAMES {
            let p: PoolPolicy = name.parse().unwrap();
            assert_eq!(p.as_str(), name);
        }
        assert!("warm".parse::<PoolPolicy>().is_err());
    }

    #[test]
    fn errors_name_the_file_the_field_and_the_rule() {
        let cases = [
            (
                SMOKE.replace("\"l4\"", "\"voodoo\""),
                "t.toml: fleet.0.model = voodoo",
            ),
            (
                SMOKE.replace("rate_per_s = 0.5", "rate_per_s = -1"),
                "demand.arrivals.rate_per_s = -1",
            ),
            (
                SMOKE.replace("duration_s = 600", "duration_s = 0"),
                "duration_s = 0",
            ),
            (
                format!("{SMOKE}\n[[faults]]\nkind = \"node-loss\"\nat_s = 10\nnodes = 3\n"),
                "faults.0.nodes = 3: must be 1..=2",
            ),
            (
                format!("strategy = \"best\"\n{SMOKE}"),
                "strategy = best: must be one of",
            ),
            (
                format!("{SMOKE}\n[pools]\nlaunch_s = 0\n"),
                "t.toml: pools.launch_s = 0: must be 1..=3600 seconds",
            ),
            (
                format!("{SMOKE}\n[pools]\npolicy = \"warmest\"\n"),
                "policy = \"warmest\"",
            ),
            (
                format!("{SMOKE}\n[pools.planner]\nsafety_z = 11\n"),
                "pools.planner.safety_z = 11: must be between 0 and 10",
            ),
            (
                format!("{SMOKE}\n[pools.planner]\nmin_warm = 5\nmax_warm = 2\n"),
                "pools.planner.min_warm = 5 (max_warm 2): must not exceed max_warm",
            ),
        ];
        for (text, want) in cases {
            let err = Scenario::parse(&text, "t.toml").unwrap_err().to_string();
            assert!(err.contains(want), "{err} lacks {want}");
        }
        let unknown = Scenario::parse(&format!("colour = 1\n{SMOKE}"), "t.toml").unwrap_err();
        assert!(unknown.to_string().contains("colour"), "{unknown}");
    }

    #[test]
    fn the_shipped_scenarios_load() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
        let mut names = Vec::new();
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_none_or(|e| e != "toml") {
                continue;
            }
            let s = Scenario::load(&path).unwrap_or_else(|e| panic!("{e}"));
            names.push(s.name);
        }
        names.sort();
        for want in [
            "evening-peak",
            "fleet-10k",
            "mixed-tier-stress",
            "node-loss",
            "pools",
            "evening-peak-warm",
            "replay",
            "smoke",
        ] {
            assert!(names.iter().any(|n| n == want), "{want} missing: {names:?}");
        }
    }
}
