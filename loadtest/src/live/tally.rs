//! The counts of a `live` run, defined as the `sim` engine defines them, and the fleet samples
//! read from the broker's API. No I/O: the run's tasks report what happened, and the report
//! is assembled from the tally at the end.

use std::collections::BTreeMap;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Deserialize;

use framecast_shared::gpu::models;
use framecast_shared::tier::TierPreset;

use crate::http_client::{NodeBody, histogram, no_answer, record_micros};
use crate::report::{self, Percentiles, Report, Sample, SloCheck};
use crate::scenario::Scenario;

/// What every request came to.
#[derive(Debug)]
pub(crate) struct Tally {
    /// Requests made.
    pub requests: u64,
    /// Placed, at once or after queueing.
    pub placed: u64,
    /// Placed by the first answer (201 without a retry).
    pub placed_at_once: u64,
    /// Had to queue (202).
    pub queued: u64,
    /// Placed, per tier.
    pub placed_per_tier: BTreeMap<String, u64>,
    /// Refused, per reason; requests that got no usable answer are here too, as
    /// `no-answer-<kind>`.
    pub rejected: BTreeMap<String, u64>,
    /// Queued players who gave up.
    pub abandoned: u64,
    /// Sessions that ended, per reason.
    pub ended: BTreeMap<String, u64>,
    /// Requests that got no usable answer, per kind of failure (`connect`, `http`, `timeout`,
    /// `bad-answer`).
    pub failed: BTreeMap<String, u64>,
    /// Requests answered only after a retry.
    pub retried: u64,
    /// Requests first tried while the broker was restarting.
    pub retried_after_restart: u64,
    /// Sessions released when the run ended (still held or queued then).
    pub released_at_end: u64,
    /// Sessions the run could not release (left to the broker's timers).
    pub release_failures: u64,
    /// Nodes lost to faults.
    pub nodes_lost: u64,
    /// Broker restarts.
    pub broker_restarts: u64,
    /// Queue waits of placed requests, simulated ms.
    waits: Histogram<u64>,
    /// Allocation latency, µs from the due time to the answer.
    latency: Histogram<u64>,
    /// Wall time from the start to the last answer.
    last_answer: Duration,
    /// Framebuffer the held sessions' tiers need, MB (for the real use of the samples).
    needed_fb_mb: u64,
    tier_fb: BTreeMap<String, u64>,
    /// Who kept warm instances (`none`, `fixed`, `planner`): the policy the tool's own broker
    /// plans with, or, against an existing broker, `planner` once its plan reads enabled.
    pub pools: String,
    /// The broker's pool counters summed over its restarts (each restart counts from 0).
    warm: WarmCounts,
    /// The totals at the previous sample, for the per-minute warm-hit ratio.
    warm_at_last_sample: WarmCounts,
    /// The counters as the broker last reported them (since its start).
    warm_reported: WarmCounts,
}

/// The broker's pool counters: placements on a warm instance, placements without one, and
/// GPUs steered away for a re-profile.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct WarmCounts {
    hits: u64,
    cold: u64,
    steered: u64,
    /// The planner's rounds: they rise every round, so a lower count means a restart even
    /// when the other counters happen to be higher again by the next sample.
    rounds: u64,
}

impl Tally {
    /// An empty tally.
    pub(crate) fn new() -> Self {
        Self {
            requests: 0,
            placed: 0,
            placed_at_once: 0,
            queued: 0,
            placed_per_tier: BTreeMap::new(),
            rejected: BTreeMap::new(),
            abandoned: 0,
            ended: BTreeMap::new(),
            failed: BTreeMap::new(),
            retried: 0,
            retried_after_restart: 0,
            released_at_end: 0,
            release_failures: 0,
            nodes_lost: 0,
            broker_restarts: 0,
            waits: histogram(),
            latency: histogram(),
            last_answer: Duration::ZERO,
            needed_fb_mb: 0,
            tier_fb: TierPreset::defaults()
                .into_iter()
                .map(|t| (t.name.to_string(), t.framebuffer.megabytes().get()))
                .collect(),
            pools: String::new(),
            warm: WarmCounts::default(),
            warm_at_last_sample: WarmCounts::default(),
            warm_reported: WarmCounts::default(),
        }
    }

    /// The broker's pool counters as `GET /v1/pools/plan` reports them now. They count from
    /// its start: a value below the last one means it restarted, and the last ones are kept.
    fn observe_warm(&mut self, c: &PlanCounters) {
        let now = WarmCounts {
            hits: c.warm_hits,
            cold: c.cold_starts,
            steered: c.steered,
            rounds: c.rounds,
        };
        let was = self.warm_reported;
        let restarted = now.rounds < was.rounds
            || now.hits < was.hits
            || now.cold < was.cold
            || now.steered < was.steered;
        let base = |total: u64, was: u64| if restarted { total } else { total - was };
        self.warm = WarmCounts {
            hits: base(self.warm.hits, was.hits) + now.hits,
            cold: base(self.warm.cold, was.cold) + now.cold,
            steered: base(self.warm.steered, was.steered) + now.steered,
            rounds: now.rounds,
        };
        self.warm_reported = now;
    }

    /// A request was answered `latency` after its due time, `since_start` into the run.
    pub(crate) fn answered(&mut self, latency: Duration, since_start: Duration) {
        record_micros(&mut self.latency, latency);
        self.last_answer = self.last_answer.max(since_start);
    }

    /// A request of `tier` got a GPU after waiting `wait_ms` simulated ms (0: at once).
    pub(crate) fn placed(&mut self, tier: &str, wait_ms: u64, at_once: bool) {
        self.placed += 1;
        *self.placed_per_tier.entry(tier.to_owned()).or_default() += 1;
        if at_once {
            self.placed_at_once += 1;
        }
        self.waits.saturating_record(wait_ms);
        self.needed_fb_mb += self.tier_fb.get(tier).copied().unwrap_or(0);
    }

    /// A placed session of `tier` is no longer held.
    pub(crate) fn unheld(&mut self, tier: &str) {
        let fb = self.tier_fb.get(tier).copied().unwrap_or(0);
        self.needed_fb_mb = self.needed_fb_mb.saturating_sub(fb);
    }

    /// A request was refused for `reason`.
    pub(crate) fn rejected(&mut self, reason: String) {
        *self.rejected.entry(reason).or_default() += 1;
    }

    /// A session ended for `reason`.
    pub(crate) fn ended(&mut self, reason: String) {
        *self.ended.entry(reason).or_default() += 1;
    }

    /// A request got no usable answer (after its retries): counted by `kind`, and as a
    /// rejection `no-answer-<kind>`, so that a broker that does not answer fails the rejection
    /// SLO instead of vanishing from the counts.
    pub(crate) fn failed(&mut self, kind: &str) {
        *self.failed.entry(kind.to_owned()).or_default() += 1;
        self.rejected(no_answer(kind));
    }

    /// The fleet at `t_s` from the broker's node and pool lists and its pool plan (any may be
    /// missing: the tenant may not list nodes or read the plan).
    pub(crate) fn sample(
        &mut self,
        t_s: u64,
        nodes: Option<&[NodeBody]>,
        pools: Option<&[PoolBody]>,
        plan: Option<&PlanBody>,
    ) -> Sample {
        let mut s = Sample {
            t_s,
            ..Sample::default()
        };
        if let Some(pools) = pools {
            s.queued = pools.iter().map(|p| p.queued).sum();
            s.sessions = pools.iter().map(|p| p.reserved + p.active).sum();
            s.warm_idle = pools.iter().map(|p| p.warm).sum();
        }
        if let Some(plan) = plan {
            if plan.enabled && self.pools.is_empty() {
                self.pools = "planner".into();
            }
            s.warm_planned = plan.targets.iter().map(|t| t.planned_warm).sum();
            if let Some(c) = &plan.counters {
                self.observe_warm(c);
            }
            let (was, now) = (self.warm_at_last_sample, self.warm);
            let placed = (now.hits + now.cold).saturating_sub(was.hits + was.cold);
            s.warm_hit_ratio =
                (placed > 0).then(|| now.hits.saturating_sub(was.hits) as f64 / placed as f64);
            self.warm_at_last_sample = now;
        }
        if let Some(nodes) = nodes {
            let gpus = nodes
                .iter()
                .filter(|n| n.state != "down")
                .flat_map(|n| &n.gpus);
            let (mut fb, mut fb_used, mut enc, mut enc_used, mut fb_in_use) =
                (0u64, 0u64, 0.0, 0.0, 0u64);
            let mut sessions = 0u64;
            let mut in_use = 0u64;
            let mut most = 0u64;
            for g in gpus {
                fb += g.framebuffer_mb;
                fb_used += g.framebuffer_used_mb;
                enc_used += g.encoder_used;
                enc += models::find(&g.model).map_or(0.0, |m| m.encoder_capacity.as_f64());
                sessions += g.sessions;
                most = most.max(g.sessions);
                if g.sessions > 0 {
                    in_use += 1;
                    fb_in_use += g.framebuffer_mb;
                }
            }
            s.sessions = sessions;
            s.gpus_in_use = in_use;
            s.max_sessions_per_gpu = most;
            s.framebuffer = ratio(fb_used as f64, fb as f64);
            s.encoder = ratio(enc_used, enc);
            s.real_use = ratio(self.needed_fb_mb as f64, fb_in_use as f64).min(1.0);
            let warm_fb: u64 = pools
                .unwrap_or_default()
                .iter()
                .map(|p| p.warm * self.tier_fb.get(&p.tier).copied().unwrap_or(0))
                .sum();
            s.warm_idle_share = ratio(warm_fb as f64, fb as f64);
        }
        s
    }

    /// The report: the counts, the distributions, the timeline and the SLO checks.
    pub(crate) fn report(
        &self,
        scenario: &Scenario,
        fleet: (u64, u64),
        timeline: Vec<Sample>,
        wall: Duration,
    ) -> Report {
        let peak = timeline
            .iter()
            .fold(None::<&Sample>, |best, s| match best {
                Some(b) if b.framebuffer > s.framebuffer => Some(b),
                _ => Some(s),
            })
            .cloned()
            .unwrap_or_default();
        let mean = |f: fn(&Sample) -> f64| {
            if timeline.is_empty() {
                0.0
            } else {
                timeline.iter().map(f).sum::<f64>() / timeline.len() as f64
            }
        };
        let latency =
            (!self.latency.is_empty()).then(|| Percentiles::scaled(&self.latency, 1000.0));
        let warm_idle_mean = mean(|s| s.warm_idle_share);
        let warm_idle_peak = timeline
            .iter()
            .map(|s| s.warm_idle_share)
            .fold(0.0, f64::max);
        let mut r = Report {
            schema: report::SCHEMA,
            scenario: scenario.name.clone(),
            engine: "live".into(),
            // The broker's own strategy: it is not configurable.
            strategy: "genre-weighted".into(),
            seed: scenario.seed,
            duration_s: scenario.duration_s,
            nodes: fleet.0,
            gpus: fleet.1,
            requests: self.requests,
            placed: self.placed,
            placed_at_once: self.placed_at_once,
            placed_per_tier: self.placed_per_tier.clone(),
            queued: self.queued,
            rejected: self.rejected.clone(),
            abandoned: self.abandoned,
            ended: self.ended.clone(),
            nodes_lost: self.nodes_lost,
            broker_restarts: self.broker_restarts,
            retried_after_restart: self.retried_after_restart,
            queue_wait_s: Percentiles::of_millis(&self.waits),
            queue_wait_cdf: report::cdf(&self.waits, 1000.0),
            peak_sessions_per_gpu_in_use: ratio(peak.sessions as f64, peak.gpus_in_use as f64),
            mean_framebuffer: mean(|s| s.framebuffer),
            mean_real_use: mean(|s| s.real_use),
            peak,
            timeline,
            wall_seconds: wall.as_secs_f64(),
            allocation_latency_ms: latency,
            allocation_latency_cdf: report::cdf(&self.latency, 1000.0),
            allocations_per_s: (!self.last_answer.is_zero())
                .then(|| self.latency.len() as f64 / self.last_answer.as_secs_f64()),
            ..Report::default()
        };
        r.pools = self.pools.clone();
        if !self.pools.is_empty() && self.pools != "none" {
            let w = self.warm;
            r.warm_hits = w.hits;
            r.cold_starts = w.cold;
            r.warm_hit_ratio =
                (w.hits + w.cold > 0).then(|| w.hits as f64 / (w.hits + w.cold) as f64);
            r.reprofiles = w.steered;
            r.mean_warm_idle_share = warm_idle_mean;
            r.peak_warm_idle_share = warm_idle_peak;
        }
        r.slo = SloCheck::all(&scenario.slo, &r);
        r.ok = r.slo.iter().all(|c| c.ok);
        r
    }
}

/// A pool of `GET /v1/pools`.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct PoolBody {
    /// Its tier.
    #[serde(default)]
    pub tier: String,
    /// Idle warm game instances of the tier.
    #[serde(default)]
    pub warm: u64,
    /// Sessions reserved.
    #[serde(default)]
    pub reserved: u64,
    /// Sessions connecting, playing or reconnecting.
    #[serde(default)]
    pub active: u64,
    /// Requests waiting.
    #[serde(default)]
    pub queued: u64,
}

/// `GET /v1/pools/plan`: the pool planner's last round (operators only).
#[derive(Debug, Clone, Default, Deserialize)]
pub(crate) struct PlanBody {
    /// Whether the planner runs.
    #[serde(default)]
    pub enabled: bool,
    /// Its counters since the broker started; null while it is off.
    #[serde(default)]
    pub counters: Option<PlanCounters>,
    /// Per region, tier and game.
    #[serde(default)]
    pub targets: Vec<PlanTarget>,
}

/// The counters of `GET /v1/pools/plan`.
#[derive(Debug, Clone, Default, Deserialize)]
pub(crate) struct PlanCounters {
    /// Placements on a warm instance.
    #[serde(default)]
    pub warm_hits: u64,
    /// Placements without one.
    #[serde(default)]
    pub cold_starts: u64,
    /// GPUs steered away to be re-profiled.
    #[serde(default)]
    pub steered: u64,
    /// Planning rounds run.
    #[serde(default)]
    pub rounds: u64,
}

/// A target of `GET /v1/pools/plan`.
#[derive(Debug, Clone, Default, Deserialize)]
pub(crate) struct PlanTarget {
    /// Warm instances the plans sent ask for.
    #[serde(default)]
    pub planned_warm: u64,
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 { a / b } else { 0.0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn smoke() -> Scenario {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios/smoke.toml");
        Scenario::load(&path).unwrap()
    }

    #[test]
    fn counts_and_distributions_reach_the_report() {
        let mut t = Tally::new();
        t.requests = 4;
        t.queued = 1;
        t.placed("720p", 0, true);
        t.placed("4k", 30_000, false);
        t.rejected("no-capacity".into());
        t.ended("released".into());
        for ms in [2, 4, 6] {
            t.answered(Duration::from_millis(ms), Duration::from_secs(3));
        }
        let nodes: Vec<NodeBody> = serde_json::from_str(
            r#"[{"state":"ready","connected":true,"gpus":[
                {"model":"NVIDIA L4","sessions":2,"framebuffer_mb":24576,"framebuffer_used_mb":6144,"encoder_used":1.5},
                {"model":"NVIDIA L4","sessions":0,"framebuffer_mb":24576,"framebuffer_used_mb":0,"encoder_used":0}]},
                {"state":"down","gpus":[{"model":"NVIDIA L4","sessions":1,"framebuffer_mb":24576}]}]"#,
        )
        .unwrap();
        let pools: Vec<PoolBody> =
            serde_json::from_str(r#"[{"reserved":2,"active":0,"queued":1},{"queued":0}]"#).unwrap();
        let sample = t.sample(60, Some(&nodes), Some(&pools), None);
        assert_eq!(
            (
                sample.sessions,
                sample.queued,
                sample.gpus_in_use,
                sample.max_sessions_per_gpu
            ),
            (2, 1, 1, 2)
        );
        assert!((sample.framebuffer - 0.125).abs() < 1e-9, "{sample:?}");
        assert!(sample.encoder > 0.0 && sample.real_use > 0.0);
        let r = t.report(
            &smoke(),
            (4, 8),
            vec![Sample::default(), sample.clone()],
            Duration::from_secs(3),
        );
        assert_eq!(r.engine, "live");
        assert_eq!(
            (r.requests, r.placed, r.placed_at_once, r.queued),
            (4, 2, 1, 1)
        );
        assert_eq!(r.rejected["no-capacity"], 1);
        assert_eq!(
            r.placed_per_tier,
            BTreeMap::from([("4k".to_owned(), 1), ("720p".to_owned(), 1)])
        );
        assert_eq!(r.queue_wait_s.count, 2);
        assert!((r.queue_wait_s.max - 30.0).abs() < 0.1);
        let lat = r.allocation_latency_ms.unwrap();
        assert_eq!(lat.count, 3);
        assert!((lat.p50 - 4.0).abs() < 0.01, "{lat:?}");
        assert_eq!(r.allocations_per_s, Some(1.0));
        assert_eq!(r.peak, sample);
        // smoke.toml allows no rejection.
        assert!(!r.ok);
    }

    #[test]
    fn the_brokers_warm_counters_add_up_across_its_restarts() {
        let mut t = Tally::new();
        t.pools = "planner".into();
        let c = |hits, cold, rounds| PlanCounters {
            warm_hits: hits,
            cold_starts: cold,
            steered: 0,
            rounds,
        };
        t.observe_warm(&c(3, 2, 40));
        t.observe_warm(&c(5, 2, 50));
        // A restart, and by the next sample more hits than before it: the rounds tell.
        t.observe_warm(&c(10, 5, 7));
        t.observe_warm(&c(12, 5, 9));
        let r = t.report(&smoke(), (4, 8), Vec::new(), Duration::from_secs(1));
        assert_eq!((r.warm_hits, r.cold_starts), (5 + 12, 2 + 5));
        assert_eq!(r.warm_hit_ratio, Some(17.0 / 24.0));
    }

    #[test]
    fn requests_without_an_answer_count_as_rejected_and_fail_the_slo() {
        let mut t = Tally::new();
        t.requests = 3;
        t.failed("timeout");
        t.failed("timeout");
        t.failed("bad-answer");
        let r = t.report(&smoke(), (4, 8), Vec::new(), Duration::from_secs(1));
        assert_eq!(r.placed, 0);
        assert_eq!(
            r.rejected,
            BTreeMap::from([
                ("no-answer-bad-answer".to_owned(), 1),
                ("no-answer-timeout".to_owned(), 2)
            ])
        );
        assert_eq!(r.rejected.values().sum::<u64>(), r.requests);
        assert_eq!(t.failed["timeout"], 2);
        assert!(!r.ok, "{:?}", r.slo);
    }
}
