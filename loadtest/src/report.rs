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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// The schema version ([`SCHEMA`]).
    pub schema: u32,
    /// The scenario's name.
    pub scenario: String,
    /// The engine that ran it (`sim`).
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
    /// Time from request to placement of placed requests, seconds (0 for those placed at once).
    pub queue_wait_s: Percentiles,
    /// The sample with the highest framebuffer use.
    pub peak: Sample,
    /// Sessions per GPU in use at that sample.
    pub peak_sessions_per_gpu_in_use: f64,
    /// Framebuffer use averaged over the samples (0–1).
    pub mean_framebuffer: f64,
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
}

/// Percentiles of a distribution, seconds.
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
    /// From a histogram of milliseconds.
    pub fn of_millis(h: &Histogram<u64>) -> Self {
        let s = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
        Self {
            count: h.len(),
            p50: s(0.5),
            p90: s(0.9),
            p99: s(0.99),
            p999: s(0.999),
            max: h.max() as f64 / 1000.0,
        }
    }
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
        if !self.rejected.is_empty() {
            let _ = writeln!(s, "rejected by      {:?}", self.rejected);
        }
        let _ = writeln!(s, "ended            {:?}", self.ended);
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
            "framebuffer      mean {:.1}% over the run",
            100.0 * self.mean_framebuffer
        );
        let _ = writeln!(
            s,
            "speed            {:.0} placements per wall second",
            self.placements_per_wall_second
        );
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
