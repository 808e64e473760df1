//! The `sim` engine: a discrete-event simulation on a virtual clock that drives the real
//! placement engine in-process. No sockets, no threads, no wall clock: the same scenario and
//! seed give the same report, and a simulated day of a 10 000-node fleet runs in seconds.
//!
//! Every second of simulated time the engine's timers run (queue timeouts, node-loss grace)
//! and what it did on its own (queued requests placed, sessions ended) is taken in; every
//! minute the fleet's use is sampled for the timeline.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};

use rustc_hash::FxHashMap;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use framecast_broker::placement::request::EngineEvent;
use framecast_broker::placement::{
    Decision, Engine, EngineConfig, PlaceRequest, Priority, RegionRtt, bound, simulated, strategy,
};
use framecast_shared::genre::GenreProfile;
use framecast_shared::ids::{GameId, GenreName, NodeId, RegionName, SessionId, TenantId, TierName};
use framecast_shared::state::{EndReason, SessionState};
use framecast_shared::tier::TierPreset;
use framecast_shared::time::Timestamp;

use crate::report::{Percentiles, Report, Sample, SloCheck};
use crate::scenario::{Arrivals, Fault, LogNormal, Scenario};

/// The simulation's epoch: its second 0.
const T0: Timestamp = Timestamp::from_millis(1_800_000_000_000);
/// How often the fleet's use is sampled, simulated seconds.
const SAMPLE_EVERY_S: u64 = 60;
/// Round-trip time from a player to its own region, ms.
const HOME_RTT_MS: u32 = 15;
/// Round-trip time to every other region, ms (within the default genres' caps, so a full
/// home region spills over).
const AWAY_RTT_MS: u32 = 40;
/// The session length of a genre the scenario does not describe.
const DEFAULT_LENGTH: LogNormal = LogNormal {
    median: 30.0,
    sigma: 0.6,
};

/// Why a simulation could not run.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// A name in the scenario is not a valid id, or the engine refused the fleet.
    #[error("{0}")]
    Setup(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Event {
    /// A player asks for a session.
    Arrival,
    /// Session `n` (by arrival number) is over.
    End(u64),
    /// A queued player gives up.
    Abandon(u64),
    /// The engine's timers.
    Tick,
    /// Sample the fleet.
    Sample,
    /// Fault `i` of the scenario.
    Fault(usize),
}

struct Live {
    id: SessionId,
    tier: usize,
    /// When it was queued, for the queue wait; `None` once placed.
    queued_at: Option<u64>,
    /// Its length, drawn at arrival.
    length_ms: u64,
}

/// Runs `scenario` with `strategy_name` (the scenario's when `None`) and reports.
pub fn run(scenario: &Scenario, strategy_name: Option<&str>) -> Result<Report, SimError> {
    let started = Instant::now();
    let strategy_name = strategy_name.unwrap_or(&scenario.strategy).to_owned();
    let setup = |e: &dyn std::fmt::Display| SimError::Setup(e.to_string());
    let strategy = strategy::by_name(&strategy_name, scenario.seed)
        .ok_or_else(|| SimError::Setup(format!("unknown strategy {strategy_name}")))?;
    let tiers = TierPreset::defaults();
    let mut engine = Engine::new(
        tiers.clone(),
        GenreProfile::defaults(),
        EngineConfig::default(),
        strategy,
    );

    // The fleet, and the nodes a node-loss fault takes (the first ones).
    let mut nodes: Vec<NodeId> = Vec::new();
    // Players come from each region in proportion to its GPUs; each lists its own region
    // first and the others as farther fallbacks.
    let mut regions: Vec<(RegionName, f64)> = Vec::new();
    let mut gpus = 0usize;
    for group in &scenario.fleet {
        let spec = Scenario::model(group)
            .ok_or_else(|| SimError::Setup(format!("unknown model {}", group.model)))?;
        for i in 0..group.nodes {
            let name = format!("{}-node-{i:05}", group.region);
            let hello = simulated::hello(
                &name,
                &group.region,
                &spec,
                group.mode,
                group.gpus_per_node,
                1,
            )
            .map_err(|e| setup(&e))?;
            engine.reconcile(&hello, T0).map_err(|e| setup(&e))?;
            nodes.push(hello.node_id);
        }
        gpus += group.nodes * group.gpus_per_node;
        let region = RegionName::new(&group.region).map_err(|e| setup(&e))?;
        let weight = (group.nodes * group.gpus_per_node) as f64;
        match regions.iter_mut().find(|(r, _)| *r == region) {
            Some((_, w)) => *w += weight,
            None => regions.push((region, weight)),
        }
    }
    // The engine counts compute in thousandths of a sixteenth of a GPU.
    let compute_total = gpus as u64 * 16 * 1000;
    let tenant = TenantId::new("loadtest").map_err(|e| setup(&e))?;
    let tier_names: Vec<(TierName, f64)> =
        weighted(&scenario.demand.tiers, |t| TierName::new(t)).map_err(|e| setup(&e))?;
    let genre_names: Vec<(GenreName, f64)> =
        weighted(&scenario.demand.genres, |g| GenreName::new(g)).map_err(|e| setup(&e))?;
    let games: Vec<GameId> = genre_names
        .iter()
        .map(|(g, _)| GameId::new(format!("game-{g}")))
        .collect::<Result<_, _>>()
        .map_err(|e| setup(&e))?;

    let mut rng = fastrand::Rng::with_seed(scenario.seed);
    let end_ms = scenario.duration_s * 1000;
    let mut heap: BinaryHeap<Reverse<(u64, u64, Event)>> = BinaryHeap::new();
    let mut order = 0u64;
    let mut push = |heap: &mut BinaryHeap<Reverse<(u64, u64, Event)>>, at: u64, e: Event| {
        order += 1;
        heap.push(Reverse((at, order, e)));
    };
    if let Some(first) = next_arrival(&scenario.demand.arrivals, 0, end_ms, &mut rng) {
        push(&mut heap, first, Event::Arrival);
    }
    push(&mut heap, 1000, Event::Tick);
    push(&mut heap, 0, Event::Sample);
    for (i, f) in scenario.faults.iter().enumerate() {
        let Fault::NodeLoss { at_s, .. } = f;
        push(&mut heap, at_s * 1000, Event::Fault(i));
    }

    let mut stats = Counts::default();
    // Fx hashing: the maps are keyed by our own counters and ids, and are on the hot path.
    let mut live: FxHashMap<u64, Live> = FxHashMap::default();
    let mut by_id: FxHashMap<SessionId, u64> = FxHashMap::default();
    let mut waits = Histogram::<u64>::new(3).map_err(|e| setup(&e))?;
    let mut timeline = Vec::new();
    let mut arrivals = 0u64;
    let mut place_calls = 0u64;
    let mut place_time = Duration::ZERO;
    let mut peak = PeakSample::default();
    let mut live_per_tier = vec![0u32; tiers.len()];

    while let Some(Reverse((at, _, event))) = heap.pop() {
        if at > end_ms {
            break;
        }
        let now = T0.saturating_add(Duration::from_millis(at));
        match event {
            Event::Arrival => {
                arrivals += 1;
                let n = arrivals;
                if let Some(next) = next_arrival(&scenario.demand.arrivals, at, end_ms, &mut rng) {
                    push(&mut heap, next, Event::Arrival);
                }
                let Some((tier, _)) = tier_names.get(pick_index(&tier_names, &mut rng)) else {
                    continue;
                };
                let genre_idx = pick_index(&genre_names, &mut rng);
                let (Some((genre, _)), Some(game)) =
                    (genre_names.get(genre_idx), games.get(genre_idx))
                else {
                    continue;
                };
                let length = scenario
                    .demand
                    .session_minutes
                    .get(genre.as_str())
                    .copied()
                    .unwrap_or(DEFAULT_LENGTH);
                let length_ms = to_ms(draw_log_normal(length, &mut rng) * 60_000.0);
                // Drawn for every request, queued or not, so the demand (and every later
                // draw) is the same whatever the strategy does with it.
                let gives_up = abandon_after(scenario.demand.abandon_per_minute, &mut rng);
                let id = SessionId::new(now, u128::from(n));
                let request = PlaceRequest {
                    session_id: id,
                    tenant: tenant.clone(),
                    game: game.clone(),
                    tier: tier.clone(),
                    genre: genre.clone(),
                    priority: Priority::Normal,
                    regions: {
                        let home = pick_index(&regions, &mut rng);
                        let mut list: Vec<RegionRtt> = regions
                            .iter()
                            .enumerate()
                            .map(|(i, (r, _))| RegionRtt {
                                region: r.clone(),
                                rtt_ms: if i == home { HOME_RTT_MS } else { AWAY_RTT_MS },
                            })
                            .collect();
                        list.sort_by_key(|r| r.rtt_ms);
                        list
                    },
                    fallbacks: Vec::new(),
                    queue: scenario.demand.queue,
                };
                let tier_idx = tiers.iter().position(|t| &t.name == tier).unwrap_or(0);
                let timer = Instant::now();
                let decision = engine.place(request, now);
                place_time += timer.elapsed();
                place_calls += 1;
                stats.requests += 1;
                match decision {
                    Decision::Placed(p) => {
                        stats.placed += 1;
                        stats.placed_at_once += 1;
                        waits.record(0).map_err(|e| setup(&e))?;
                        activate(&mut engine, &p.node, &id, now);
                        if let Some(c) = live_per_tier.get_mut(tier_idx) {
                            *c += 1;
                        }
                        live.insert(
                            n,
                            Live {
                                id,
                                tier: tier_idx,
                                queued_at: None,
                                length_ms,
                            },
                        );
                        by_id.insert(id, n);
                        push(&mut heap, at + length_ms.max(1), Event::End(n));
                    }
                    Decision::Queued(_) => {
                        stats.queued += 1;
                        live.insert(
                            n,
                            Live {
                                id,
                                tier: tier_idx,
                                queued_at: Some(at),
                                length_ms,
                            },
                        );
                        by_id.insert(id, n);
                        if let Some(after) = gives_up {
                            push(&mut heap, at + after, Event::Abandon(n));
                        }
                    }
                    Decision::Rejected { reason } => {
                        *stats.rejected.entry(kebab(&reason)).or_default() += 1;
                    }
                }
            }
            Event::End(n) => {
                if let Some(s) = live.remove(&n) {
                    by_id.remove(&s.id);
                    if s.queued_at.is_none() {
                        untally(&mut live_per_tier, s.tier);
                    }
                    if engine.release(&s.id, EndReason::Released, now).is_ok() {
                        *stats.ended.entry("released".into()).or_default() += 1;
                    }
                }
            }
            Event::Abandon(n) => {
                let still_queued = live.get(&n).is_some_and(|s| s.queued_at.is_some());
                if still_queued && let Some(s) = live.remove(&n) {
                    by_id.remove(&s.id);
                    let _ = engine.release(&s.id, EndReason::Released, now);
                    stats.abandoned += 1;
                }
            }
            Event::Tick => {
                engine.expire(now);
                if at + 1000 <= end_ms {
                    push(&mut heap, at + 1000, Event::Tick);
                }
            }
            Event::Sample => {
                let s = engine.stats();
                let sample = Sample {
                    t_s: at / 1000,
                    sessions: s.sessions as u64,
                    queued: s.queued as u64,
                    gpus_in_use: s.gpus_in_use as u64,
                    framebuffer: ratio(s.fb_used_mb, s.fb_total_mb),
                    encoder: ratio(s.encoder_used, s.encoder_total),
                    compute: ratio(s.compute_used, compute_total),
                };
                if sample.framebuffer >= peak.sample.framebuffer {
                    peak = PeakSample {
                        sample: sample.clone(),
                        per_tier: live_per_tier.clone(),
                    };
                }
                timeline.push(sample);
                if at + SAMPLE_EVERY_S * 1000 <= end_ms {
                    push(&mut heap, at + SAMPLE_EVERY_S * 1000, Event::Sample);
                }
            }
            Event::Fault(i) => {
                if let Some(Fault::NodeLoss { nodes: count, .. }) = scenario.faults.get(i) {
                    for node in nodes.iter().take(*count) {
                        let _ = engine.node_down(node, now);
                    }
                    stats.nodes_lost += *count as u64;
                }
            }
        }
        // What the engine did on its own: queued requests placed, sessions ended.
        while let Some(e) = engine.poll_event() {
            match e {
                EngineEvent::Placed(p) => {
                    let Some(&n) = by_id.get(&p.session_id) else {
                        continue;
                    };
                    let Some(s) = live.get_mut(&n) else { continue };
                    if let Some(q) = s.queued_at.take() {
                        stats.placed += 1;
                        waits.record(at.saturating_sub(q)).map_err(|e| setup(&e))?;
                        if let Some(c) = live_per_tier.get_mut(s.tier) {
                            *c += 1;
                        }
                        let end = at + s.length_ms.max(1);
                        activate(&mut engine, &p.node, &p.session_id, now);
                        push(&mut heap, end, Event::End(n));
                    }
                }
                EngineEvent::Ended {
                    session_id, reason, ..
                } => {
                    if let Some(n) = by_id.remove(&session_id)
                        && let Some(s) = live.remove(&n)
                        && s.queued_at.is_none()
                    {
                        untally(&mut live_per_tier, s.tier);
                    }
                    *stats.ended.entry(reason.to_string()).or_default() += 1;
                }
            }
        }
    }

    let wall = started.elapsed();
    // How many GPUs the busiest moment's sessions need at least (the first fleet group's
    // model and mode), against how many it used.
    let gpus_needed = scenario.fleet.first().and_then(|g| {
        let spec = Scenario::model(g)?;
        bound::lower_bound(&spec, g.mode, &tiers, &peak.per_tier)
            .map(|b| b.exact.unwrap_or(b.volume))
    });
    let mut report = Report {
        schema: crate::report::SCHEMA,
        scenario: scenario.name.clone(),
        engine: "sim".into(),
        strategy: strategy_name,
        seed: scenario.seed,
        duration_s: scenario.duration_s,
        nodes: nodes.len() as u64,
        gpus: gpus as u64,
        requests: stats.requests,
        placed: stats.placed,
        placed_at_once: stats.placed_at_once,
        queued: stats.queued,
        rejected: stats.rejected,
        abandoned: stats.abandoned,
        ended: stats.ended,
        nodes_lost: stats.nodes_lost,
        queue_wait_s: Percentiles::of_millis(&waits),
        peak: peak.sample.clone(),
        peak_sessions_per_gpu_in_use: if peak.sample.gpus_in_use == 0 {
            0.0
        } else {
            peak.sample.sessions as f64 / peak.sample.gpus_in_use as f64
        },
        mean_framebuffer: if timeline.is_empty() {
            0.0
        } else {
            timeline.iter().map(|s| s.framebuffer).sum::<f64>() / timeline.len() as f64
        },
        lower_bound_gpus_at_peak: gpus_needed,
        timeline,
        wall_seconds: wall.as_secs_f64(),
        placements_per_wall_second: if place_time.is_zero() {
            0.0
        } else {
            place_calls as f64 / place_time.as_secs_f64()
        },
        slo: Vec::new(),
        ok: true,
    };
    report.slo = SloCheck::all(&scenario.slo, &report);
    report.ok = report.slo.iter().all(|c| c.ok);
    Ok(report)
}

#[derive(Default)]
struct Counts {
    requests: u64,
    placed: u64,
    placed_at_once: u64,
    queued: u64,
    rejected: BTreeMap<String, u64>,
    abandoned: u64,
    ended: BTreeMap<String, u64>,
    nodes_lost: u64,
}

#[derive(Default)]
struct PeakSample {
    sample: Sample,
    per_tier: Vec<u32>,
}

/// A placed session connects and plays, as its agent would report.
fn activate(engine: &mut Engine, node: &NodeId, id: &SessionId, now: Timestamp) {
    for state in [SessionState::Connecting, SessionState::Active] {
        let _ = engine.observe_session(node, 1, id, state, now);
    }
}

/// Milliseconds from a non-negative float: rounded down, negative and NaN as 0, saturating.
// The one float → integer conversion of the simulation, range-checked here.
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
fn to_ms(x: f64) -> u64 {
    if x.is_finite() && x > 0.0 {
        x.min(u64::MAX as f64) as u64
    } else {
        0
    }
}

fn untally(per_tier: &mut [u32], tier: usize) {
    if let Some(c) = per_tier.get_mut(tier) {
        *c = c.saturating_sub(1);
    }
}

fn ratio(used: u64, total: u64) -> f64 {
    if total == 0 {
        0.0
    } else {
        used as f64 / total as f64
    }
}

fn kebab(reason: &impl serde::Serialize) -> String {
    serde_json::to_value(reason)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_else(|| "other".into())
}

fn weighted<T, E>(
    weights: &BTreeMap<String, f64>,
    make: impl Fn(&str) -> Result<T, E>,
) -> Result<Vec<(T, f64)>, E> {
    weights
        .iter()
        .filter(|(_, w)| **w > 0.0)
        .map(|(k, w)| Ok((make(k)?, *w)))
        .collect()
}

fn pick_index<T>(items: &[(T, f64)], rng: &mut fastrand::Rng) -> usize {
    let total: f64 = items.iter().map(|(_, w)| w).sum();
    let mut x = rng.f64() * total;
    for (i, (_, w)) in items.iter().enumerate() {
        if x < *w {
            return i;
        }
        x -= w;
    }
    items.len().saturating_sub(1)
}

/// A log-normal draw (Box–Muller for the normal).
fn draw_log_normal(d: LogNormal, rng: &mut fastrand::Rng) -> f64 {
    let u1 = rng.f64().max(f64::MIN_POSITIVE);
    let u2 = rng.f64();
    let z = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
    d.median * (d.sigma * z).exp()
}

/// When a queued player gives up, ms after queueing, for a per-minute probability `p`.
fn abandon_after(p: f64, rng: &mut fastrand::Rng) -> Option<u64> {
    if p <= 0.0 {
        return None;
    }
    if p >= 1.0 {
        return Some(60_000);
    }
    let per_ms = -(1.0 - p).ln() / 60_000.0;
    let u = rng.f64().max(f64::MIN_POSITIVE);
    Some(to_ms(-u.ln() / per_ms))
}

/// The arrival rate at `t_ms`, per second.
fn rate_at(arrivals: &Arrivals, t_ms: u64, end_ms: u64) -> f64 {
    match *arrivals {
        Arrivals::Poisson { rate_per_s } => rate_per_s,
        Arrivals::Ramp {
            from_per_s,
            to_per_s,
        } => {
            let f = t_ms as f64 / end_ms.max(1) as f64;
            from_per_s + (to_per_s - from_per_s) * f
        }
        Arrivals::Daily {
            trough_per_s,
            peak_per_s,
            trough_hour,
        } => {
            let hours = t_ms as f64 / 3_600_000.0;
            let phase = (hours - trough_hour) / 24.0 * std::f64::consts::TAU;
            trough_per_s + (peak_per_s - trough_per_s) * (1.0 - phase.cos()) / 2.0
        }
    }
}

/// The next arrival after `t_ms` (thinning a Poisson process at the highest rate), or `None`
/// past the end.
fn next_arrival(
    arrivals: &Arrivals,
    t_ms: u64,
    end_ms: u64,
    rng: &mut fastrand::Rng,
) -> Option<u64> {
    let max = match *arrivals {
        Arrivals::Poisson { rate_per_s } => rate_per_s,
        Arrivals::Ramp {
            from_per_s,
            to_per_s,
        } => from_per_s.max(to_per_s),
        Arrivals::Daily {
            peak_per_s,
            trough_per_s,
            ..
        } => peak_per_s.max(trough_per_s),
    };
    if max <= 0.0 {
        return None;
    }
    let mut t = t_ms as f64;
    loop {
        let u = rng.f64().max(f64::MIN_POSITIVE);
        t += -u.ln() / max * 1000.0;
        if t > end_ms as f64 {
            return None;
        }
        if rng.f64() * max <= rate_at(arrivals, to_ms(t), end_ms) {
            return Some(to_ms(t).max(t_ms + 1));
        }
    }
}
