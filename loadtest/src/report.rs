//! What a run found: the JSON report (its schema is `docs/OPERATIONS.md`, "Load tests"), the
//! terminal summary, and the SLO checks that set the exit status.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::scenario::Slo;

/// The report's schema version; fields are only added within a version.
pub const SCHEMA: u32 = 1;

/// One run's report.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// The schema version ([`SCHEMA`]).
    pub schema: u32,
    /// The scenario's name.
    pub scenario: String,
    /// The engine that ran it (`sim`, `live`, `webrtc`).
    pub engine: String,
    /// The placement strategy.
    pub strategy: String,
    /// The seed of every random draw.
    pub seed: u64,
    /// Simulated length, seconds.
    pub duration_s: u64,
    /// Nodes in the fleet.
    pub nodes: u64,
    /// GPUs in the fleet.
    pub gpus: u64,
    /// Session requests made.
    pub requests: u64,
    /// Requests placed, at once or after queueing.
    pub placed: u64,
    /// Requests placed without queueing.
    pub placed_at_once: u64,
    /// Requests placed, per tier.
    #[serde(default)]
    pub placed_per_tier: BTreeMap<String, u64>,
    /// Requests that had to queue.
    pub queued: u64,
    /// Requests rejected, per reason.
    pub rejected: BTreeMap<String, u64>,
    /// Queued players who gave up.
    pub abandoned: u64,
    /// Sessions that ended, per reason (`released`: played to the end).
    pub ended: BTreeMap<String, u64>,
    /// Nodes lost to faults.
    pub nodes_lost: u64,
    /// Streams that dropped (the session went `reconnecting`).
    #[serde(default)]
    pub reconnects: u64,
    /// Broker restarts (faults).
    #[serde(default)]
    pub broker_restarts: u64,
    /// Requests made while the broker was away, retried by their clients when it was back.
    #[serde(default)]
    pub retried_after_restart: u64,
    /// Time from request to placement of placed requests, seconds (0 for those placed at once).
    pub queue_wait_s: Percentiles,
    /// The sample with the highest framebuffer use.
    pub peak: Sample,
    /// Sessions per GPU in use at that sample.
    pub peak_sessions_per_gpu_in_use: f64,
    /// Framebuffer use averaged over the samples (0–1).
    pub mean_framebuffer: f64,
    /// Real use averaged over the samples (see [`Sample::real_use`]).
    #[serde(default)]
    pub mean_real_use: f64,
    /// The fewest GPUs of the fleet's (first) model that could hold the peak's sessions (the
    /// placement engine's lower bound); compare with `peak.gpus_in_use`.
    pub lower_bound_gpus_at_peak: Option<u64>,
    /// The fleet's use, once a simulated minute.
    pub timeline: Vec<Sample>,
    /// Wall-clock seconds the run took (not part of the simulated result).
    pub wall_seconds: f64,
    /// Placement decisions per wall-clock second of `place` calls.
    pub placements_per_wall_second: f64,
    /// The scenario's SLO checks.
    pub slo: Vec<SloCheck>,
    /// Whether every SLO check passed.
    pub ok: bool,
    /// The queue wait's distribution for charts: (seconds, share of placed requests at or
    /// below it), at most [`CDF_POINTS`] points.
    #[serde(default)]
    pub queue_wait_cdf: Vec<CdfPoint>,
    /// Time from a request's intended send time to its answer, milliseconds (`live` and
    /// `webrtc`; the `sim` engine has no network).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocation_latency_ms: Option<Percentiles>,
    /// The allocation latency's distribution for charts (milliseconds, share).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allocation_latency_cdf: Vec<CdfPoint>,
    /// Answers per wall-clock second over the run (`live`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocations_per_s: Option<f64>,
    /// Concurrent WebRTC streams, step by step, and how many a node holds (`webrtc`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub streams: Option<crate::webrtc::StreamsReport>,
    /// Who kept warm game instances (`none`, `fixed`, `planner`; empty from engines that do
    /// not model them). With `none` the warm figures below are zero and not meaningful.
    #[serde(default)]
    pub pools: String,
    /// Placements on an already-warm instance of the session's game and tier: the player
    /// starts at once.
    #[serde(default)]
    pub warm_hits: u64,
    /// Placements on a slot without one: the player waits for the game to start.
    #[serde(default)]
    pub cold_starts: u64,
    /// `warm_hits` over all placements (0–1); absent with no warm pools or no placements.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warm_hit_ratio: Option<f64>,
    /// `warm_hits` over the placements of requests that did not queue (0–1): the fleet had
    /// room when they came. In a full fleet every freed slot goes to a queued player, cold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warm_hit_ratio_unqueued: Option<f64>,
    /// Starting warm instances whose slot the engine gave to a session of another game or
    /// tier (the engine sees a warm instance only once it is ready): stopped.
    #[serde(default)]
    pub warm_preempted: u64,
    /// What cold-started players waited for their game, from placement to play, seconds
    /// (queue wait not included).
    #[serde(default)]
    pub cold_start_wait_s: Percentiles,
    /// GPUs steered away from new sessions so they could drain and take another profile.
    #[serde(default)]
    pub reprofiles: u64,
    /// Idle warm capacity averaged over the samples: see [`Sample::warm_idle_share`] (0–1).
    #[serde(default)]
    pub mean_warm_idle_share: f64,
    /// The highest idle warm capacity of any sample (0–1).
    #[serde(default)]
    pub peak_warm_idle_share: f64,
}

/// How many points a distribution keeps for charts.
pub const CDF_POINTS: usize = 200;

/// One point of a cumulative distribution.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct CdfPoint {
    /// The value (in the unit of the field that holds it).
    pub value: f64,
    /// The share of values at or below it (0–1).
    pub quantile: f64,
}

/// The distribution of `h` in at most [`CDF_POINTS`] points, values divided by `scale`.
pub fn cdf(h: &Histogram<u64>, scale: f64) -> Vec<CdfPoint> {
    if h.is_empty() {
        return Vec::new();
    }
    let mut out: Vec<CdfPoint> = h
        .iter_quantiles(4)
        .map(|v| CdfPoint {
            value: h.highest_equivalent(v.value_iterated_to()) as f64 / scale,
            quantile: v.quantile_iterated_to(),
        })
        .collect();
    // One point per value: the highest share reached at it.
    out.dedup_by(|later, kept| {
        let same = later.value == kept.value;
        if same {
            kept.quantile = kept.quantile.max(later.quantile);
        }
        same
    });
    if out.len() > CDF_POINTS {
        let step = out.len().div_ceil(CDF_POINTS);
        let last = out.last().copied();
        out = out.into_iter().step_by(step).collect();
        if let Some(last) = last
            && out.last() != Some(&last)
        {
            out.push(last);
        }
    }
    out
}

/// The fleet at one moment.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    /// Seconds into the run.
    pub t_s: u64,
    /// Sessions placed.
    pub sessions: u64,
    /// Requests queued.
    pub queued: u64,
    /// GPUs holding at least one session.
    pub gpus_in_use: u64,
    /// Framebuffer held by sessions, share of the fleet's (0–1).
    pub framebuffer: f64,
    /// Encoder units held, share of the fleet's (0–1).
    pub encoder: f64,
    /// Compute held (sixteenths of a GPU, weighted by genre), share of the fleet's (0–1).
    pub compute: f64,
    /// Fragmentation: framebuffer that is free but that the smallest waiting tier (the
    /// smallest tier when nobody waits) cannot use, share of the fleet's (0–1).
    #[serde(default)]
    pub fragmentation: f64,
    /// Real use of the GPUs in use: the framebuffer the sessions' tiers need, share of the
    /// framebuffer of the GPUs holding them (0–1). A whole GPU per player leaves most of each
    /// GPU idle; pooling fills it.
    #[serde(default)]
    pub real_use: f64,
    /// The most sessions one GPU holds.
    #[serde(default)]
    pub max_sessions_per_gpu: u64,
    /// Idle warm instances: started (or starting) ahead of demand and not yet taken by a
    /// player.
    #[serde(default)]
    pub warm_idle: u64,
    /// Of those, still starting.
    #[serde(default)]
    pub warm_starting: u64,
    /// Warm instances the pool plans ask for; more than `warm_idle` while GPUs lack the room
    /// (or the time) to start them.
    #[serde(default)]
    pub warm_planned: u64,
    /// Idle warm capacity: framebuffer held by idle warm instances (starting ones included),
    /// share of the fleet's (0–1). `framebuffer` counts sessions only.
    #[serde(default)]
    pub warm_idle_share: f64,
    /// Warm hits over placements in the minute before this sample (0–1); absent with no warm
    /// pools or no placements in that minute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warm_hit_ratio: Option<f64>,
}

/// Percentiles of a distribution (seconds unless the field holding it says otherwise).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Percentiles {
    /// How many values.
    pub count: u64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th.
    pub p99: f64,
    /// 99.9th.
    pub p999: f64,
    /// Largest.
    pub max: f64,
}

impl Percentiles {
    /// From a histogram of milliseconds, in seconds.
    pub fn of_millis(h: &Histogram<u64>) -> Self {
        Self::scaled(h, 1000.0)
    }

    /// From a histogram, values divided by `scale` (1000 for microseconds to milliseconds).
    pub fn scaled(h: &Histogram<u64>, scale: f64) -> Self {
        let s = |q: f64| h.value_at_quantile(q) as f64 / scale;
        Self {
            count: h.len(),
            p50: s(0.5),
            p90: s(0.9),
            p99: s(0.99),
            p999: s(0.999),
            max: h.max() as f64 / scale,
        }
    }
}

/// A share as a percentage, `n/a` when there is none.
fn percent(share: Option<f64>) -> String {
    share.map_or("n/a".to_owned(), |r| format!("{:.1}%", 100.0 * r))
}

/// One SLO threshold and how the run did against it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SloCheck {
    /// The scenario's field.
    pub name: String,
    /// Its threshold.
    pub threshold: f64,
    /// What the run measured.
    pub value: f64,
    /// Whether it passed.
    pub ok: bool,
}

impl SloCheck {
    /// Every threshold `slo` sets, checked against `report`.
    pub fn all(slo: &Slo, report: &Report) -> Vec<SloCheck> {
        let mut out = Vec::new();
        let rejected: u64 = report.rejected.values().sum();
        if let Some(max) = slo.max_rejected_ratio {
            let value = rejected as f64 / report.requests.max(1) as f64;
            out.push(Self::new("max_rejected_ratio", max, value, value <= max));
        }
        if let Some(max) = slo.max_queue_wait_p99_s {
            let value = report.queue_wait_s.p99;
            out.push(Self::new("max_queue_wait_p99_s", max, value, value <= max));
        }
        if let Some(min) = slo.min_peak_framebuffer_utilization {
            let value = report.peak.framebuffer;
            out.push(Self::new(
                "min_peak_framebuffer_utilization",
                min,
                value,
                value >= min,
            ));
        }
        out
    }

    fn new(name: &str, threshold: f64, value: f64, ok: bool) -> Self {
        Self {
            name: name.into(),
            threshold,
            value,
            ok,
        }
    }
}

impl Report {
    /// The report without what depends on the machine (wall-clock figures): equal for equal
    /// scenarios and seeds.
    pub fn simulated_part(&self) -> Report {
        Report {
            wall_seconds: 0.0,
            placements_per_wall_second: 0.0,
            ..self.clone()
        }
    }

    /// The terminal summary.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        let rejected: u64 = self.rejected.values().sum();
        let pct = |a: u64| 100.0 * a as f64 / self.requests.max(1) as f64;
        // The webrtc engine measures streams, not a fleet over time.
        let fleet_run = self.streams.is_none();
        if fleet_run {
            let _ = writeln!(
                s,
                "{} ({} engine, {} strategy, seed {}): {} s simulated in {:.1} s",
                self.scenario,
                self.engine,
                self.strategy,
                self.seed,
                self.duration_s,
                self.wall_seconds
            );
        } else {
            let _ = writeln!(
                s,
                "{} ({} engine): {:.1} s",
                self.scenario, self.engine, self.wall_seconds
            );
        }
        let _ = writeln!(
            s,
            "fleet            {} nodes, {} GPUs",
            self.nodes, self.gpus
        );
        let _ = writeln!(
            s,
            "requests         {}  placed {} ({:.1}%, {} at once)  queued {}  rejected {} ({:.1}%)  abandoned {}",
            self.requests,
            self.placed,
            pct(self.placed),
            self.placed_at_once,
            self.queued,
            rejected,
            pct(rejected),
            self.abandoned
        );
        if !self.placed_per_tier.is_empty() {
            let _ = writeln!(s, "placed per tier  {:?}", self.placed_per_tier);
        }
        if !self.rejected.is_empty() {
            let _ = writeln!(s, "rejected by      {:?}", self.rejected);
        }
        let _ = writeln!(s, "ended            {:?}", self.ended);
        if fleet_run {
            let q = &self.queue_wait_s;
            let _ = writeln!(
                s,
                "queue wait (s)   p50 {:.1}  p90 {:.1}  p99 {:.1}  p99.9 {:.1}  max {:.1}",
                q.p50, q.p90, q.p99, q.p999, q.max
            );
            let _ = writeln!(
                s,
                "peak (t={} s)    {} sessions on {} GPUs ({:.2} per GPU in use), framebuffer {:.1}%, compute {:.1}%, encoder {:.1}%, {} queued",
                self.peak.t_s,
                self.peak.sessions,
                self.peak.gpus_in_use,
                self.peak_sessions_per_gpu_in_use,
                100.0 * self.peak.framebuffer,
                100.0 * self.peak.compute,
                100.0 * self.peak.encoder,
                self.peak.queued
            );
            if let Some(lb) = self.lower_bound_gpus_at_peak {
                let _ = writeln!(
                    s,
                    "lower bound      {lb} GPUs would hold the peak's sessions ({} used)",
                    self.peak.gpus_in_use
                );
            }
            let _ = writeln!(
                s,
                "framebuffer      mean {:.1}% over the run; real use of GPUs in use {:.1}% mean, {:.1}% at peak; fragmentation at peak {:.1}%",
                100.0 * self.mean_framebuffer,
                100.0 * self.mean_real_use,
                100.0 * self.peak.real_use,
                100.0 * self.peak.fragmentation
            );
        }
        if fleet_run && !self.pools.is_empty() && self.pools != "none" {
            let c = &self.cold_start_wait_s;
            // `live` reads the broker's counters: it knows no queueing split and no waits.
            let unqueued = self
                .warm_hit_ratio_unqueued
                .map(|r| format!(" ({} without queueing)", percent(Some(r))))
                .unwrap_or_default();
            let _ = writeln!(
                s,
                "warm pools       {}: {} warm hits, {} cold starts, warm-hit ratio {}{unqueued}; idle warm capacity {:.1}% mean, {:.1}% peak; {} re-profiles",
                self.pools,
                self.warm_hits,
                self.cold_starts,
                percent(self.warm_hit_ratio),
                100.0 * self.mean_warm_idle_share,
                100.0 * self.peak_warm_idle_share,
                self.reprofiles
            );
            if c.count > 0 {
                let _ = writeln!(
                    s,
                    "cold start (s)   p50 {:.1}  p90 {:.1}  p99 {:.1}  max {:.1}  ({} cold-started players; {} starting warm instances pre-empted)",
                    c.p50, c.p90, c.p99, c.max, c.count, self.warm_preempted
                );
            }
        }
        if self.reconnects + self.broker_restarts > 0 {
            let _ = writeln!(
                s,
                "faults           {} streams dropped, {} broker restarts ({} requests retried after one)",
                self.reconnects, self.broker_restarts, self.retried_after_restart
            );
        }
        if let Some(l) = &self.allocation_latency_ms {
            let _ = writeln!(
                s,
                "allocation (ms)  p50 {:.1}  p90 {:.1}  p99 {:.1}  p99.9 {:.1}  max {:.1}{}",
                l.p50,
                l.p90,
                l.p99,
                l.p999,
                l.max,
                self.allocations_per_s
                    .map_or(String::new(), |r| format!("  ({r:.0} answers/s)"))
            );
        }
        if self.placements_per_wall_second > 0.0 {
            let _ = writeln!(
                s,
                "speed            {:.0} placements per wall second",
                self.placements_per_wall_second
            );
        }
        if let Some(streams) = &self.streams {
            s.push_str(&streams.table());
        }
        for c in &self.slo {
            let _ = writeln!(
                s,
                "SLO {:<32} {} (threshold {}, measured {:.4})",
                c.name,
                if c.ok { "ok" } else { "FAILED" },
                c.threshold,
                c.value
            );
        }
        s
    }
}
