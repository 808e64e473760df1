//! The `live` engine: a scenario's requests sent to a real broker over HTTP on loopback, with
//! the broker's agents on simulated GPUs behind it over QUIC.
//!
//! By default the tool starts the broker and one in-process node agent per node of the
//! scenario's fleet (`framecast_broker::dev`: real HTTP API, real QUIC control plane with
//! mutual TLS, real agents on simulated GPUs). With `--broker URL --api-key KEY` it drives an
//! existing broker instead and starts nothing.
//!
//! - **The same demand as `sim`.** Requests come from [`crate::demand::DemandStream`]: the
//!   same arrivals, tiers, genres, lengths and patience for the same scenario and seed.
//! - **Open loop, no coordinated omission.** Request `i` is due at its arrival time divided by
//!   `--speed`; it is sent then whatever earlier requests are still waiting (each request is a
//!   task of its own; `--connections` keep-alive connections carry the calls), and its
//!   latency is measured from that due time to the answer, so time spent waiting for a
//!   connection, behind a slow answer or for a restarting broker is charged to it.
//! - **Time compression.** `--speed F` runs `F` simulated seconds per wall second; the
//!   broker the tool starts has its timers divided by `F` (see `LIVE` in the docs for which and how).
//! - **A request's life.** `201`: placed at once; the session is held for its length, then
//!   released (`DELETE`, ended `released`). `202`: queued; its event stream is followed until
//!   it is placed (the queue wait is measured to that moment), the broker ends it (queue
//!   timeout: ended `expired`), or the player's patience runs out (`DELETE`: abandoned). Any
//!   other answer is a rejection, counted by reason. Calls that cannot reach the broker are
//!   retried with backoff for up to 30 s (an idempotency key makes retries safe); a request
//!   with no usable answer after that is a rejection too, `no-answer-<kind>`.
//! - **The tool's own traffic apart.** Queued requests beyond the event streams, sessions on
//!   lost nodes and the fleet samples are looked up on a small pool of their own, at most
//!   every 250 ms of wall time per session, so that they do not queue in front of the calls
//!   whose latency is measured.
//! - **Faults** (the tool's own deployment only): `node-loss` stops the first nodes' agents;
//!   `broker-restart` restarts the broker on the same addresses and store (it is away for as
//!   long as the restart takes; `down_s` is not modelled).
//! - **Not modelled:** stream drops (`reconnect_probability`): the API has no way to report a
//!   dropped stream without a WHEP connection, so `live` ignores them.

mod fleet;
mod plan;
mod player;
mod sse;
mod tally;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;

use framecast_shared::ids::{GameId, GenreName};

use crate::demand::{DemandError, DemandStream};
use crate::http_client::Api;
use crate::report::Report;
use crate::scenario::Scenario;
use plan::{Clock, Plan, Target};
use tally::Tally;

/// How a `live` run is driven (flattened into the command line by the binary).
#[derive(Debug, Clone, clap::Args)]
pub struct LiveOptions {
    /// An existing broker to drive, `http://HOST:PORT`, instead of starting one with
    /// in-process agents. Its fleet is whatever it has; faults are refused.
    #[arg(long, value_name = "URL")]
    pub broker: Option<String>,
    /// The existing broker's API key (its tenant should be an operator, `admin = true`, for
    /// the timeline's GPU figures).
    #[arg(
        long,
        value_name = "KEY",
        env = "FRAMECAST_API_KEY",
        hide_env_values = true
    )]
    pub api_key: Option<String>,
    /// Simulated seconds per wall-clock second (time compression): 60 runs a simulated hour in
    /// a minute. The broker the tool starts has its timers scaled to match.
    #[arg(long, value_name = "F", default_value_t = 1.0)]
    pub speed: f64,
    /// Keep-alive HTTP connections for the players' calls (allocate, release); requests beyond
    /// them wait for one, and the wait counts in their latency. The tool's own lookups (polls,
    /// fleet samples) have a few connections of their own.
    #[arg(long, value_name = "N", default_value_t = 64)]
    pub connections: usize,
    /// The game to request for each genre, `genre=game,...`, over dev mode's (fps=arena-shooter,
    /// moba=lane-battle, rpg=open-world).
    #[arg(long, value_name = "GENRE=GAME", value_delimiter = ',')]
    pub games: Vec<GameFor>,
    /// The largest fleet started in-process (one agent per node): bigger scenarios are refused.
    #[arg(long, value_name = "N", default_value_t = 64)]
    pub max_nodes: usize,
    /// Where the in-process broker and agents keep their state (a directory of its own inside,
    /// removed at the end); the system's temp dir when absent. A tmpfs (`/dev/shm`) takes the
    /// disk's fsync out of the figures.
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Who keeps warm game instances, instead of the scenario's `[pools] policy`: `none`,
    /// `fixed` or `planner`. The tool's own broker runs its pool planner to match; an existing
    /// broker's planner is as it is configured.
    #[arg(long, value_name = "POLICY")]
    pub pools: Option<crate::scenario::PoolPolicy>,
}

impl Default for LiveOptions {
    fn default() -> Self {
        Self {
            broker: None,
            api_key: None,
            speed: 1.0,
            connections: 64,
            games: Vec::new(),
            max_nodes: 64,
            data_dir: None,
            pools: None,
        }
    }
}

/// `genre=game`: the game requested for a genre.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GameFor {
    /// The genre of the demand.
    pub genre: GenreName,
    /// The broker's game.
    pub game: GameId,
}

impl FromStr for GameFor {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (genre, game) = s
            .split_once('=')
            .ok_or_else(|| format!("{s:?} is not genre=game"))?;
        Ok(Self {
            genre: GenreName::new(genre.trim()).map_err(|e| format!("genre {genre:?}: {e}"))?,
            game: GameId::new(game.trim()).map_err(|e| format!("game {game:?}: {e}"))?,
        })
    }
}

impl std::fmt::Display for GameFor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}={}", self.genre, self.game)
    }
}

/// Why a live run could not run (a run that ran reports its failures in its counts instead).
#[derive(Debug, thiserror::Error)]
pub enum LiveError {
    /// The scenario asks for something `live` cannot do.
    #[error("{field} = {value}: {rule}")]
    Scenario {
        /// The scenario's field.
        field: String,
        /// Its value.
        value: String,
        /// Why `live` cannot run it.
        rule: String,
    },
    /// An option has a value `live` cannot use.
    #[error("--{flag} {value}: {rule}")]
    Option {
        /// The flag, without dashes.
        flag: &'static str,
        /// Its value.
        value: String,
        /// The rule it breaks.
        rule: String,
    },
    /// The scenario's demand cannot be drawn.
    #[error("demand: {0}")]
    Demand(#[from] DemandError),
    /// The in-process broker and agents could not start.
    #[error("starting the in-process broker and agents: {0}")]
    Deploy(String),
    /// The broker cannot be used (unreachable, or it refused the key).
    #[error("broker: {0}")]
    Broker(String),
    /// A fault could not be applied; the run stopped.
    #[error("fault: {0}")]
    Fault(String),
    /// The async runtime could not start.
    #[error("starting the async runtime: {0}")]
    Runtime(#[source] std::io::Error),
}

/// A live run's report and what only `live` counts.
#[derive(Debug, Clone)]
pub struct LiveRun {
    /// The report (engine `live`).
    pub report: Report,
    /// Requests that got no usable answer (after retries), by kind (`connect`, `http`,
    /// `timeout`, `bad-answer`); the report counts them in `rejected` as `no-answer-<kind>`.
    pub failed: BTreeMap<String, u64>,
    /// Requests answered only after a retry.
    pub retried: u64,
    /// Sessions still held or queued when the run ended, released then.
    pub released_at_end: u64,
    /// Sessions the run could not release when their time came (the final sweep may have
    /// released them since; else they are left to the broker's timers).
    pub release_failures: u64,
    /// Sessions of this run the final sweep found and released (existing broker only; 0 when
    /// every player released its own).
    pub swept: u64,
}

/// Runs `scenario` live and reports; builds its own async runtime (call it outside one).
/// `progress` gets the scenario's length and moves through the simulated seconds.
pub fn run(
    scenario: &Scenario,
    opts: &LiveOptions,
    progress: &indicatif::ProgressBar,
) -> Result<Report, LiveError> {
    run_detailed(scenario, opts, progress).map(|r| r.report)
}

/// [`run`], with what only `live` counts.
pub fn run_detailed(
    scenario: &Scenario,
    opts: &LiveOptions,
    progress: &indicatif::ProgressBar,
) -> Result<LiveRun, LiveError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(LiveError::Runtime)?;
    let out = rt.block_on(run_async(scenario, opts, progress));
    // Agents' and connections' leftovers end with the runtime; do not wait for them long.
    rt.shutdown_timeout(Duration::from_secs(2));
    out
}

/// [`run_detailed`] in a runtime the caller owns.
pub async fn run_async(
    scenario: &Scenario,
    opts: &LiveOptions,
    progress: &indicatif::ProgressBar,
) -> Result<LiveRun, LiveError> {
    let started = Instant::now();
    let plan = Plan::new(scenario, opts)?;
    let demand = DemandStream::new(scenario)?;
    if scenario.strategy != "genre-weighted" {
        tracing::warn!(
            strategy = %scenario.strategy,
            "live uses the broker's own placement strategy (genre-weighted), not the scenario's"
        );
    }
    if scenario.demand.reconnect_probability > 0.0 {
        tracing::warn!("live does not model stream drops (demand.reconnect_probability)");
    }
    let mut deployment = fleet::Deployment::start(&plan).await?;
    let outcome = drive(scenario, &plan, &mut deployment, demand, progress).await;
    deployment.stop().await;
    let mut run = outcome?;
    run.report.wall_seconds = started.elapsed().as_secs_f64();
    Ok(run)
}

/// What every request's task shares.
pub(crate) struct Ctx {
    /// The players' own calls (allocate, release), `--connections` of them.
    api: Api,
    /// The tool's lookups (polls of queued or lost sessions, fleet samples), on a pool of
    /// their own so that they do not delay the players' calls.
    polls: Api,
    clock: Clock,
    /// When the run ends (wall clock).
    end: Instant,
    tally: Mutex<Tally>,
    /// Ends the run (early, when a fault fails).
    end_tx: watch::Sender<bool>,
    /// Turns true when the run ends (or stops early).
    ending: watch::Receiver<bool>,
    /// Says whether the broker is up (false while it restarts).
    up_tx: watch::Sender<bool>,
    /// False while the broker restarts.
    broker_up: watch::Receiver<bool>,
    /// Broker restarts begun so far.
    restarts: AtomicU64,
    /// The nodes node-loss faults took so far.
    lost_nodes: watch::Sender<Vec<String>>,
    /// Set when the run stops early (a fault failed).
    aborted: AtomicBool,
    /// Event streams open at once (one connection each); queued requests beyond poll.
    streams: Semaphore,
    games: BTreeMap<GenreName, GameId>,
    queue: bool,
    /// Prefix of this run's player ids and idempotency keys.
    run_id: String,
}

impl Ctx {
    fn tally(&self) -> MutexGuard<'_, Tally> {
        // Counting goes on after a task panicked while holding it.
        self.tally.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn restarts(&self) -> u64 {
        self.restarts.load(Ordering::Relaxed)
    }

    fn broker_is_up(&self) -> bool {
        *self.broker_up.borrow()
    }
}

/// Connections for the tool's own lookups (polls and samples).
const POLL_CONNECTIONS: usize = 8;
/// Event streams open at once when the open-file limit is unknown; beyond, queued requests
/// are polled.
const DEFAULT_STREAMS: usize = 256;
/// The most event streams open at once, whatever the open-file limit.
const MAX_STREAMS: usize = 2048;
/// Open files kept for everything but the event streams (the pools, the in-process broker's
/// store and listeners, the agents).
const FILES_RESERVED: u64 = 512;
/// The longest the players take to finish after the run's end (releases included).
const DRAIN_LIMIT: Duration = Duration::from_secs(90);
/// Between the checks of the broker and the first request.
const HEAD_START: Duration = Duration::from_millis(100);
/// How often the progress bar moves.
const PROGRESS_EVERY: Duration = Duration::from_millis(250);

async fn drive(
    scenario: &Scenario,
    plan: &Plan,
    deployment: &mut fleet::Deployment,
    demand: DemandStream,
    progress: &indicatif::ProgressBar,
) -> Result<LiveRun, LiveError> {
    let pool = |connections| {
        Api::new(
            deployment.addr,
            &deployment.host,
            &deployment.api_key,
            connections,
        )
        .map_err(|e| LiveError::Broker(e.to_string()))
    };
    let api = pool(plan.connections)?;
    let polls = pool(POLL_CONNECTIONS)?;
    let (want_nodes, scenario_fleet) = match &plan.target {
        Target::Own {
            nodes,
            gpus_per_node,
            ..
        } => (*nodes, (*nodes as u64, (*nodes * *gpus_per_node) as u64)),
        Target::External { .. } => (0, (0, 0)),
    };
    let fleet_size = fleet::ready(&api, want_nodes, scenario_fleet).await?;
    let streams = stream_limit(
        open_file_limit(),
        plan.connections,
        matches!(plan.target, Target::Own { .. }),
    );

    let (end_tx, ending) = watch::channel(false);
    let (up_tx, broker_up) = watch::channel(true);
    let clock = Clock {
        start: Instant::now() + HEAD_START,
        speed: plan.speed,
    };
    let end = clock.wall(plan.duration_ms);
    let mut tally = Tally::new();
    // An existing broker's policy is read from its plan as the run goes.
    if matches!(plan.target, Target::Own { .. }) {
        tally.pools = plan.pools.policy.as_str().into();
    }
    let ctx = Arc::new(Ctx {
        api,
        polls,
        clock,
        end,
        tally: Mutex::new(tally),
        end_tx,
        ending,
        up_tx,
        broker_up,
        restarts: AtomicU64::new(0),
        lost_nodes: watch::Sender::new(Vec::new()),
        aborted: AtomicBool::new(false),
        streams: Semaphore::new(streams),
        games: plan.games.clone(),
        queue: plan.queue,
        run_id: format!("lt-{}", uuid::Uuid::new_v4().simple()),
    });
    progress.set_length(scenario.duration_s);
    progress.set_position(0);

    let sampler = tokio::spawn(fleet::sample(Arc::clone(&ctx), plan.duration_ms));
    let ticker = tokio::spawn(move_progress(
        Arc::clone(&ctx),
        progress.clone(),
        scenario.duration_s,
    ));

    // The faults borrow the deployment rather than own it: one that overruns its limit is
    // dropped, and the deployment, still the run's, is stopped all the same.
    let faults = async {
        let nodes = deployment.nodes.clone();
        let dev = deployment.dev.as_mut()?;
        let mut ending = ctx.ending.clone();
        let applying = fleet::faults(&ctx, dev, &nodes, scenario.faults.clone());
        let overrun = async {
            let _ = ending.wait_for(|e| *e).await;
            tokio::time::sleep(DRAIN_LIMIT).await;
        };
        tokio::select! {
            error = applying => error,
            () = overrun => Some(format!(
                "a fault did not finish within {} s of the run's end; it was abandoned and the \
                 deployment stopped",
                DRAIN_LIMIT.as_secs()
            )),
        }
    };
    // The open loop, on a task of its own: each request at its due time, whatever the earlier
    // ones (and the faults) are doing.
    let duration_ms = plan.duration_ms;
    let open_loop = tokio::spawn({
        let ctx = Arc::clone(&ctx);
        async move {
            let mut players = JoinSet::new();
            let mut stop = ctx.ending.clone();
            for r in demand {
                let due = ctx.clock.wall(r.at_ms);
                tokio::select! {
                    () = tokio::time::sleep_until(due.into()) => {}
                    // A failed fault ends the run early.
                    Ok(_) = stop.wait_for(|e| *e) => break,
                }
                players.spawn(player::play(Arc::clone(&ctx), r));
                while players.try_join_next().is_some() {}
            }
            let early = tokio::select! {
                () = tokio::time::sleep_until(end.into()) => false,
                Ok(_) = stop.wait_for(|e| *e) => true,
            };
            // The last sample, at the end, is taken before anything is released.
            let mut timeline = sampler.await.unwrap_or_default();
            if !early && let Some(last) = fleet::sample_at(&ctx, duration_ms).await {
                timeline.push(last);
            }
            let _ = ctx.end_tx.send(true);

            // Everything still held or queued is released now.
            let drained = tokio::time::timeout(DRAIN_LIMIT, async {
                while players.join_next().await.is_some() {}
            })
            .await;
            if drained.is_err() {
                tracing::warn!(
                    left = players.len(),
                    "players still busy {} s after the end; stopped",
                    DRAIN_LIMIT.as_secs()
                );
                ctx.tally().release_failures += players.len() as u64;
                players.abort_all();
            }
            timeline
        }
    });
    let open_loop = async {
        let timeline = open_loop.await;
        // Sent already, unless the open loop panicked: the faults must stop all the same.
        let _ = ctx.end_tx.send(true);
        // A panicked open loop loses the timeline, not the counts.
        timeline.unwrap_or_default()
    };
    let (fault_error, timeline) = tokio::join!(faults, open_loop);
    let _ = ticker.await;
    let swept = if matches!(plan.target, Target::External { .. }) {
        fleet::sweep(&ctx.api, &ctx.run_id).await
    } else {
        0
    };
    progress.set_position(scenario.duration_s);
    if let Some(e) = fault_error {
        return Err(LiveError::Fault(e));
    }
    if ctx.aborted.load(Ordering::Relaxed) {
        return Err(LiveError::Fault("the run stopped early".into()));
    }

    let t = ctx.tally();
    if !t.failed.is_empty() || t.release_failures > 0 {
        tracing::warn!(failed = ?t.failed, release_failures = t.release_failures, "some calls failed");
    }
    let wall = ctx.clock.start.elapsed();
    Ok(LiveRun {
        report: t.report(scenario, fleet_size, timeline, wall),
        failed: t.failed.clone(),
        retried: t.retried,
        released_at_end: t.released_at_end,
        release_failures: t.release_failures,
        swept,
    })
}

/// How many event streams a run keeps open at once: what the open-file limit leaves after
/// [`FILES_RESERVED`] and the pools' connections, each stream taking one file, two when the
/// broker is in this process too; at least 16, at most [`MAX_STREAMS`], and
/// [`DEFAULT_STREAMS`] when the limit is unknown.
fn stream_limit(open_files: Option<u64>, connections: usize, in_process: bool) -> usize {
    let Some(files) = open_files else {
        return DEFAULT_STREAMS;
    };
    let per_stream = if in_process { 2 } else { 1 };
    let pools = per_stream * (connections + POLL_CONNECTIONS) as u64;
    let left = files.saturating_sub(FILES_RESERVED + pools) / per_stream;
    usize::try_from(left)
        .unwrap_or(usize::MAX)
        .clamp(16, MAX_STREAMS)
}

/// This process's soft limit on open files (Linux's `/proc/self/limits`), when known.
fn open_file_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    let soft = line
        .trim_start_matches("Max open files")
        .split_whitespace()
        .next()?;
    if soft == "unlimited" {
        return Some(u64::MAX);
    }
    soft.parse().ok()
}

/// Moves `progress` through the simulated seconds until the run ends.
async fn move_progress(ctx: Arc<Ctx>, progress: indicatif::ProgressBar, duration_s: u64) {
    let mut ending = ctx.ending.clone();
    loop {
        let at = ctx.clock.sim_ms(Instant::now()) / 1000;
        progress.set_position(at.min(duration_s));
        tokio::select! {
            () = tokio::time::sleep(PROGRESS_EVERY) => {}
            Ok(_) = ending.wait_for(|e| *e) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_streams_fit_in_the_open_file_limit() {
        assert_eq!(stream_limit(None, 64, true), DEFAULT_STREAMS);
        // The usual soft limit of 1024 with the broker in this process.
        assert_eq!(stream_limit(Some(1024), 64, true), 184);
        assert_eq!(stream_limit(Some(1024), 64, false), 440);
        assert_eq!(stream_limit(Some(100), 64, true), 16);
        assert_eq!(stream_limit(Some(1 << 20), 64, true), MAX_STREAMS);
        assert_eq!(stream_limit(Some(u64::MAX), 1024, true), MAX_STREAMS);
        if std::path::Path::new("/proc/self/limits").exists() {
            assert!(open_file_limit().is_some_and(|n| n > 0));
        }
    }
}
