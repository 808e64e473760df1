//! The `webrtc` engine: real WebRTC players against dev mode, to find how many concurrent
//! streams a node holds.
//!
//! The engine starts dev mode (a real broker and in-process agents on simulated GPUs, whose
//! streams are encoded in software with OpenH264, all on loopback), then steps up the number
//! of concurrent players: 1, 2, 3, … up to `--max-streams`. In each step every player
//! allocates a session (`POST /v1/sessions`), connects over WHEP with a webrtc-rs peer
//! connection, and receives RTP video; once all have their first frame (or failed), they play
//! together for `--step-seconds`, then every session is released (`DELETE /v1/sessions/{id}`)
//! and the broker must show no session before the next step.
//!
//! Per stream it measures the time to first frame (allocation request to the first complete
//! frame, an RTP marker), frames per second over the play window and freezes (gaps between
//! frames longer than [`frames::FREEZE_INTERVALS`] frame intervals and
//! [`frames::FREEZE_MIN_GAP`]). A step passes when every stream connected, every stream held
//! at least `--fps-floor` × the target frame rate and no stream froze, and fails too when the
//! broker still shows its sessions after their release. The node holds the largest passing
//! step before the first failing one; stepping stops at that failure.
//!
//! The broker is called through [`crate::http_client`], as `live` calls it: the same
//! rejection names, `no-answer-<kind>` for a request with no usable answer.
//!
//! The players run on the same machine as the agents' encoders, so the figure is what this
//! machine holds with both; the target frame rate is the tier's capped by the agents'
//! software encoder (`whep.software_max_fps`, 30).

pub mod frames;
mod http;
mod player;
mod step;
pub mod streams;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use indicatif::ProgressBar;

use framecast_broker::dev::{DevOptions, Tune, start_dev};
use framecast_shared::config::BrokerConfig;
use framecast_shared::config::agent::AgentConfig;
use framecast_shared::config::broker::TierConfig;
use framecast_shared::ids::TierName;
use framecast_shared::tier::{Codec, TierPreset};

use crate::http_client::{self, FleetError, histogram, record_micros};
use crate::report::{self, Percentiles, Report};

pub use streams::{StepResult, StreamsReport};

use frames::FreezeRule;
use http::Broker;
use step::{Step, StepContext};
use streams::PassRule;

/// The small tier dev mode gets for this engine: 640×360 at 30 fps.
pub const SMALL_TIER: &str = "360p";
/// The development API key of the engine's dev deployment.
pub const API_KEY: &str = "loadtest-webrtc-key";
/// The GPUs of each dev node: two simulated L4s (placement room is not what this engine
/// measures: two L4s hold dozens of 360p sessions).
pub const GPUS_TOML: &str = "[[gpus]]\nmodel = \"l4\"\ncount = 2\n";
/// The dev agents' nodes must connect to the broker within this.
const AGENTS_LIMIT: Duration = Duration::from_secs(30);
/// The broker must show every session of a step gone within this after their release.
const RELEASE_LIMIT: Duration = Duration::from_secs(15);
/// How often the broker's fleet is polled while waiting for the release.
const POLL: Duration = Duration::from_millis(50);
/// The longest dev mode takes to stop.
const STOP_LIMIT: Duration = Duration::from_secs(60);
/// Why a step whose sessions the broker still shows after their release fails.
const NOT_RELEASED: &str = "sessions not released";

/// The `webrtc` engine's settings (the `webrtc` subcommand's flags).
#[derive(Debug, Clone, PartialEq, clap::Args)]
pub struct WebrtcOptions {
    /// The tier the players ask for: one of dev mode's (360p, 720p, 1080p, 4k).
    #[arg(long, default_value = SMALL_TIER)]
    pub tier: String,
    /// The game the players ask for (dev mode has arena-shooter, lane-battle, open-world).
    #[arg(long, default_value = "open-world")]
    pub game: String,
    /// The largest step: concurrent players go 1, 2, 3, … up to this (1..=256).
    #[arg(long, default_value_t = 16)]
    pub max_streams: u32,
    /// How long each step plays once all its players have their first frame, seconds
    /// (0.5..=600).
    #[arg(long, default_value_t = 3.0)]
    pub step_seconds: f64,
    /// The share of the target frame rate every stream must hold for a step to pass (0..=1).
    #[arg(long, default_value_t = 0.9)]
    pub fps_floor: f64,
    /// How long a player may take from its allocation request to its first frame, seconds
    /// (1..=120).
    #[arg(long, default_value_t = 20.0)]
    pub connect_seconds: f64,
    /// Dev nodes (1..=16). They all run in this process, on this machine's CPUs: more nodes
    /// spread the sessions, not the work.
    #[arg(long, default_value_t = 1)]
    pub nodes: u32,
}

impl Default for WebrtcOptions {
    fn default() -> Self {
        Self {
            tier: SMALL_TIER.into(),
            game: "open-world".into(),
            max_streams: 16,
            step_seconds: 3.0,
            fps_floor: 0.9,
            connect_seconds: 20.0,
            nodes: 1,
        }
    }
}

/// Why a `webrtc` run could not be done. A stream that fails is a finding in the report, not
/// an error; these are failures of the run itself.
#[derive(Debug, thiserror::Error)]
pub enum WebrtcError {
    /// An option is out of range or names something dev mode does not have.
    #[error("--{flag}: {detail}")]
    Options {
        /// The flag.
        flag: &'static str,
        /// What is wrong with it.
        detail: String,
    },
    /// The async runtime could not be built.
    #[error("building the async runtime: {0}")]
    Runtime(#[source] std::io::Error),
    /// Dev mode did not start.
    #[error("starting dev mode: {0}")]
    Dev(String),
    /// The broker did not answer as it should outside a player's own calls (its fleet).
    #[error("the broker: {0}")]
    Broker(String),
    /// The dev agents did not connect to the broker in time.
    #[error("{connected} of {want} dev nodes connected within {} s", AGENTS_LIMIT.as_secs())]
    AgentsAbsent {
        /// Nodes connected at the limit.
        connected: u64,
        /// Nodes started.
        want: u64,
    },
}

/// Runs the engine on a dev deployment of its own (started with [`dev_options`], stopped at
/// the end whatever happened) on a runtime of its own, advancing `progress` by a unit per
/// second played (its length is set to `--max-streams` × the step's whole seconds).
///
/// It blocks: call it from plain threads, not from async code (which has [`run_on`]).
pub fn run(opts: &WebrtcOptions, progress: &ProgressBar) -> Result<Report, WebrtcError> {
    let plan = Plan::new(opts)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(WebrtcError::Runtime)?;
    let result = runtime.block_on(async {
        let dev = start_dev(dev_options(opts))
            .await
            .map_err(|e| WebrtcError::Dev(format!("{e:#}")))?;
        let result = run_plan(&plan, dev.broker().http, &dev.api_key, progress).await;
        if tokio::time::timeout(STOP_LIMIT, dev.stop()).await.is_err() {
            tracing::warn!("dev mode did not stop within {} s", STOP_LIMIT.as_secs());
        }
        result
    });
    // Peer connections that did not close in time must not hold the caller up.
    runtime.shutdown_timeout(Duration::from_secs(5));
    result
}

/// Runs the engine against a running dev deployment whose broker's HTTP API is at `http`, with
/// its API key: one started with [`dev_options`]`(opts)`, so that it has the engine's tier and
/// nodes. Every session it allocates is released before it returns.
pub async fn run_on(
    http: SocketAddr,
    api_key: &str,
    opts: &WebrtcOptions,
    progress: &ProgressBar,
) -> Result<Report, WebrtcError> {
    let plan = Plan::new(opts)?;
    run_plan(&plan, http, api_key, progress).await
}

/// What dev mode runs for `opts`: its nodes with [`GPUS_TOML`] each, the HTTP API on a free
/// loopback port, the key [`API_KEY`], and the [`SMALL_TIER`] added to the broker's tiers.
pub fn dev_options(opts: &WebrtcOptions) -> DevOptions {
    DevOptions {
        nodes: opts.nodes as usize,
        gpus_toml: GPUS_TOML.into(),
        http: SocketAddr::from(([127, 0, 0, 1], 0)),
        data_dir: None,
        api_key: API_KEY.into(),
        tune: Some(Tune::new(add_small_tier)),
    }
}

/// Adds the [`SMALL_TIER`] to a broker's tiers: 640×360 at 30 fps, H.264 at 1.2 Mbit/s, a
/// 1 GB framebuffer and one sixteenth of a GPU. The agents take the broker's tiers.
pub fn add_small_tier(config: &mut BrokerConfig) {
    // A literal that is a valid tier name.
    if let Ok(name) = TierName::new(SMALL_TIER) {
        config.tiers.insert(
            name,
            TierConfig {
                width: 640,
                height: 360,
                fps: 30,
                framebuffer_mb: 1024,
                compute_share: 1,
                encoder_units: None,
                codecs: vec![Codec::H264],
                bitrate_kbps: 1_200,
                cpu_millicores: None,
                max_session_s: None,
            },
        );
    }
}

/// The frame rate a stream of `tier` should hold in dev mode: the tier's, capped by the
/// agents' software encoder.
pub fn target_fps(tier: &TierPreset) -> f64 {
    f64::from(tier.fps.min(AgentConfig::default().whep.software_max_fps))
}

/// The options, checked, with what they come to.
#[derive(Debug, Clone)]
struct Plan {
    opts: WebrtcOptions,
    tier: TierPreset,
    /// The placement strategy of the game's genre, for the report.
    strategy: String,
    rule: PassRule,
    step_play: Duration,
    connect: Duration,
}

impl Plan {
    fn new(opts: &WebrtcOptions) -> Result<Self, WebrtcError> {
        let range = |flag, ok: bool, allowed: &str, value: &dyn std::fmt::Display| {
            if ok {
                Ok(())
            } else {
                Err(WebrtcError::Options {
                    flag,
                    detail: format!("{value} is out of range (allowed: {allowed})"),
                })
            }
        };
        range(
            "max-streams",
            (1..=256).contains(&opts.max_streams),
            "1..=256",
            &opts.max_streams,
        )?;
        range(
            "step-seconds",
            (0.5..=600.0).contains(&opts.step_seconds),
            "0.5..=600",
            &opts.step_seconds,
        )?;
        range(
            "fps-floor",
            (0.0..=1.0).contains(&opts.fps_floor),
            "0..=1",
            &opts.fps_floor,
        )?;
        range(
            "connect-seconds",
            (1.0..=120.0).contains(&opts.connect_seconds),
            "1..=120",
            &opts.connect_seconds,
        )?;
        range(
            "nodes",
            (1..=16).contains(&opts.nodes),
            "1..=16",
            &opts.nodes,
        )?;

        // The configuration the dev broker will run with (no file is touched).
        let dev = dev_options(opts);
        let mut config = framecast_broker::dev::broker_config(&dev, Path::new("."))
            .map_err(|e| WebrtcError::Dev(format!("{e:#}")))?;
        add_small_tier(&mut config);
        let presets = config.tier_presets();
        let tier = presets
            .iter()
            .find(|t| t.name.as_str() == opts.tier)
            .cloned()
            .ok_or_else(|| WebrtcError::Options {
                flag: "tier",
                detail: format!(
                    "dev mode has no tier {:?} (it has {})",
                    opts.tier,
                    names(presets.iter().map(|t| t.name.as_str()))
                ),
            })?;
        let game = config
            .games
            .iter()
            .find(|g| g.id.as_str() == opts.game)
            .ok_or_else(|| WebrtcError::Options {
                flag: "game",
                detail: format!(
                    "dev mode has no game {:?} (it has {})",
                    opts.game,
                    names(config.games.iter().map(|g| g.id.as_str()))
                ),
            })?;
        let strategy = config
            .genres
            .get(&game.genre)
            .and_then(|g| serde_json::to_value(g.strategy).ok())
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        let target = target_fps(&tier);
        Ok(Self {
            opts: opts.clone(),
            strategy,
            rule: PassRule {
                target_fps: target,
                fps_floor: opts.fps_floor,
                freeze: FreezeRule::for_fps(target),
            },
            tier,
            step_play: Duration::from_secs_f64(opts.step_seconds),
            connect: Duration::from_secs_f64(opts.connect_seconds),
        })
    }

    /// Progress units (whole seconds) one step plays.
    fn units_per_step(&self) -> u64 {
        whole_seconds(self.opts.step_seconds.ceil()).max(1)
    }
}

/// `seconds` as a whole number, 0 for what is not a duration (negative, NaN, too large).
fn whole_seconds(seconds: f64) -> u64 {
    Duration::try_from_secs_f64(seconds).map_or(0, |d| d.as_secs())
}

fn names<'a>(names: impl Iterator<Item = &'a str>) -> String {
    names.collect::<Vec<_>>().join(", ")
}

/// The steps of `plan` against the broker at `http`, and the report.
async fn run_plan(
    plan: &Plan,
    http: SocketAddr,
    api_key: &str,
    progress: &ProgressBar,
) -> Result<Report, WebrtcError> {
    let started = Instant::now();
    let load_average = load_average();
    // Every player of the largest step allocates at once, and the release is watched beside.
    let broker = Broker::new(http, api_key, plan.opts.max_streams as usize + 1)
        .map_err(|e| WebrtcError::Broker(e.to_string()))?;
    let want = u64::from(plan.opts.nodes);
    let fleet = match http_client::wait_for_agents(broker.api(), want, AGENTS_LIMIT).await {
        Ok(nodes) => http_client::Fleet::of(&nodes),
        Err(FleetError::Absent { connected, .. }) => {
            return Err(WebrtcError::AgentsAbsent { connected, want });
        }
        Err(e) => return Err(WebrtcError::Broker(e.to_string())),
    };
    progress.set_length(u64::from(plan.opts.max_streams) * plan.units_per_step());
    progress.set_position(0);

    let cx = StepContext {
        broker: broker.clone(),
        game: plan.opts.game.clone(),
        tier: plan.tier.name.to_string(),
        rule: plan.rule,
        play: plan.step_play,
        connect: plan.connect,
        units: plan.units_per_step(),
    };
    let mut steps = Vec::new();
    // Microseconds.
    let mut alloc = histogram();
    let mut requests = 0u64;
    let mut placed = 0u64;
    let mut rejected: BTreeMap<String, u64> = BTreeMap::new();
    let mut ended: BTreeMap<String, u64> = BTreeMap::new();
    for n in 1..=plan.opts.max_streams {
        progress.set_message(format!("{n} streams"));
        let Step {
            mut result,
            allocation_latency,
            requests: asked,
            placed: got,
            rejected: refused,
            released,
            already_ended,
        } = step::run(&cx, n, progress).await;
        for d in allocation_latency {
            record_micros(&mut alloc, d);
        }
        requests += asked;
        placed += got;
        for (reason, count) in refused {
            *rejected.entry(reason).or_default() += count;
        }
        *ended.entry("released".into()).or_default() += released;
        if already_ended > 0 {
            *ended.entry("ended-before-release".into()).or_default() += already_ended;
        }
        released_or_failed(&mut result, wait_for_release(&broker).await);
        progress.set_position(u64::from(n) * plan.units_per_step());
        let passed = result.passed;
        steps.push(result);
        if !passed {
            break;
        }
    }

    let (holds, first_failing) = streams::holds(&steps);
    let played = steps.len() as f64 * plan.opts.step_seconds;
    let res = plan.tier.resolution;
    let streams = StreamsReport {
        tier: plan.tier.name.to_string(),
        resolution: res.to_string(),
        target_fps: plan.rule.target_fps,
        fps_floor: plan.rule.fps_floor,
        freeze_threshold_ms: plan.rule.freeze.threshold.as_secs_f64() * 1000.0,
        step_seconds: plan.opts.step_seconds,
        nodes: u64::from(plan.opts.nodes),
        cpus: std::thread::available_parallelism().map_or(0, |n| n.get() as u64),
        load_average,
        rule: plan.rule.describe(),
        steps,
        holds,
        first_failing,
    };
    Ok(Report {
        schema: report::SCHEMA,
        scenario: format!("webrtc-{}", plan.tier.name),
        engine: "webrtc".into(),
        strategy: plan.strategy.clone(),
        duration_s: whole_seconds(played.round()),
        nodes: u64::from(plan.opts.nodes),
        gpus: fleet.gpus,
        requests,
        placed,
        placed_at_once: placed,
        placed_per_tier: if placed > 0 {
            BTreeMap::from([(plan.tier.name.to_string(), placed)])
        } else {
            BTreeMap::new()
        },
        rejected,
        ended,
        wall_seconds: started.elapsed().as_secs_f64(),
        // The run's verdict: the node held at least one stream.
        ok: holds > 0,
        allocation_latency_ms: (!alloc.is_empty()).then(|| Percentiles::scaled(&alloc, 1000.0)),
        allocation_latency_cdf: report::cdf(&alloc, 1000.0),
        streams: Some(streams),
        ..Report::default()
    })
}

/// The 1-minute load average (`/proc/loadavg`), where there is one.
fn load_average() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Polls the broker until it shows no session, or [`RELEASE_LIMIT`]; the sessions it still
/// shows.
async fn wait_for_release(broker: &Broker) -> Result<u64, FleetError> {
    let deadline = Instant::now() + RELEASE_LIMIT;
    loop {
        let sessions = broker.fleet().await?.sessions;
        if sessions == 0 || Instant::now() >= deadline {
            return Ok(sessions);
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Fails `step` when the broker still showed sessions after their release, or could not say:
/// the next step would not start from an empty node, so stepping stops there, with the steps
/// measured so far kept.
fn released_or_failed(step: &mut StepResult, left: Result<u64, FleetError>) {
    let why = match left {
        Ok(0) => return,
        Ok(sessions) => format!(
            "the broker still shows {sessions} sessions {} s after their release",
            RELEASE_LIMIT.as_secs()
        ),
        Err(e) => format!("the broker's sessions after their release: {e}"),
    };
    tracing::warn!(streams = step.streams, "{why}");
    step.failed_because.push(NOT_RELEASED.into());
    if step.errors.len() < streams::ERRORS_KEPT {
        step.errors.push(why);
    }
    step.passed = false;
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        webrtc: WebrtcOptions,
    }

    #[test]
    fn the_flags_defaults_are_the_default_options() {
        let cli = Cli::try_parse_from(["webrtc"]).unwrap();
        assert_eq!(cli.webrtc, WebrtcOptions::default());
        let cli = Cli::try_parse_from(["webrtc", "--tier", "720p", "--max-streams", "4"]).unwrap();
        assert_eq!(
            (cli.webrtc.tier.as_str(), cli.webrtc.max_streams),
            ("720p", 4)
        );
    }

    #[test]
    fn the_small_tier_is_dev_modes_and_targets_30_fps() {
        let plan = Plan::new(&WebrtcOptions::default()).unwrap();
        assert_eq!(plan.tier.resolution.to_string(), "640x360");
        assert_eq!(plan.rule.target_fps, 30.0);
        assert_eq!(plan.rule.min_fps(), 27.0);
        assert_eq!(plan.strategy, "pack", "open-world is an rpg");
        // 720p asks for 60; the software encoder sends 30.
        let plan = Plan::new(&WebrtcOptions {
            tier: "720p".into(),
            ..WebrtcOptions::default()
        })
        .unwrap();
        assert_eq!(plan.rule.target_fps, 30.0);
        // The tier is valid broker configuration.
        let mut config = BrokerConfig::default();
        add_small_tier(&mut config);
        assert!(
            config
                .tier_presets()
                .iter()
                .any(|t| t.name.as_str() == SMALL_TIER)
        );
    }

    #[test]
    fn options_out_of_range_or_unknown_name_the_flag() {
        let bad = |o: WebrtcOptions| Plan::new(&o).unwrap_err().to_string();
        let d = WebrtcOptions::default;
        assert!(
            bad(WebrtcOptions {
                max_streams: 0,
                ..d()
            })
            .starts_with("--max-streams")
        );
        assert!(
            bad(WebrtcOptions {
                step_seconds: 0.1,
                ..d()
            })
            .starts_with("--step-seconds")
        );
        assert!(
            bad(WebrtcOptions {
                step_seconds: f64::NAN,
                ..d()
            })
            .starts_with("--step-seconds")
        );
        assert!(
            bad(WebrtcOptions {
                fps_floor: 1.5,
                ..d()
            })
            .starts_with("--fps-floor")
        );
        assert!(bad(WebrtcOptions { nodes: 0, ..d() }).starts_with("--nodes"));
        assert!(
            bad(WebrtcOptions {
                connect_seconds: 0.0,
                ..d()
            })
            .starts_with("--connect-seconds")
        );
        let e = bad(WebrtcOptions {
            tier: "8k".into(),
            ..d()
        });
        assert!(e.starts_with("--tier") && e.contains("360p"), "{e}");
        let e = bad(WebrtcOptions {
            game: "chess".into(),
            ..d()
        });
        assert!(e.starts_with("--game") && e.contains("open-world"), "{e}");
    }

    #[test]
    fn sessions_left_after_a_step_fail_it_and_keep_its_figures() {
        let passing = || StepResult {
            streams: 2,
            connected: 2,
            passed: true,
            ..StepResult::default()
        };
        let mut step = passing();
        released_or_failed(&mut step, Ok(0));
        assert_eq!(step, passing());

        let mut step = passing();
        released_or_failed(&mut step, Ok(1));
        assert!(!step.passed);
        assert_eq!(step.failed_because, vec![NOT_RELEASED.to_owned()]);
        assert_eq!(step.connected, 2);
        assert!(step.errors[0].contains("1 sessions"), "{:?}", step.errors);

        let mut step = passing();
        released_or_failed(
            &mut step,
            Err(FleetError::Status {
                status: hyper::StatusCode::BAD_GATEWAY,
                detail: String::new(),
            }),
        );
        assert!(!step.passed);
        assert_eq!(step.failed_because, vec![NOT_RELEASED.to_owned()]);
        assert_eq!(streams::holds(&[passing(), step]), (2, Some(2)));
    }
}
