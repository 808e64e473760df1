//! The same demand under several placement strategies, and the headline of the design: one
//! whole GPU per player against vGPU pooling, at the same demand on the same fleet.

use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use serde::{Deserialize, Serialize};

use crate::report::{Report, SCHEMA};
use crate::scenario::Scenario;
use crate::sim::{self, SimError};

/// The strategy that gives every player a whole GPU.
pub const EXCLUSIVE: &str = "exclusive";
/// The strategy the headline sets against it.
pub const POOLED: &str = "genre-weighted";

/// Several runs of one scenario.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Comparison {
    /// The report schema version (the runs are reports of that schema).
    pub schema: u32,
    /// The scenario's name.
    pub scenario: String,
    /// One report per strategy, in the order asked for.
    pub runs: Vec<Report>,
    /// One GPU per player against pooling, when both ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headline: Option<Headline>,
}

/// One whole GPU per player against vGPU pooling.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Headline {
    /// The `exclusive` run.
    pub exclusive: HeadlineRow,
    /// The `genre-weighted` run.
    pub pooled: HeadlineRow,
}

/// What the headline compares, from one run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HeadlineRow {
    /// The strategy.
    pub strategy: String,
    /// Requests made (the same for both).
    pub requests: u64,
    /// Requests placed.
    pub placed: u64,
    /// Sessions at the busiest sample, and the GPUs holding them.
    pub peak_sessions: u64,
    /// GPUs holding a session then.
    pub peak_gpus_in_use: u64,
    /// Sessions per GPU in use then.
    pub peak_sessions_per_gpu: f64,
    /// The most sessions one GPU held at any sample.
    pub max_sessions_per_gpu: u64,
    /// Real use of the GPUs in use (framebuffer the sessions' tiers need, share of theirs),
    /// at the busiest sample.
    pub peak_real_use: f64,
    /// The same, averaged over the run.
    pub mean_real_use: f64,
}

impl HeadlineRow {
    fn of(r: &Report) -> Self {
        Self {
            strategy: r.strategy.clone(),
            requests: r.requests,
            placed: r.placed,
            peak_sessions: r.peak.sessions,
            peak_gpus_in_use: r.peak.gpus_in_use,
            peak_sessions_per_gpu: r.peak_sessions_per_gpu_in_use,
            max_sessions_per_gpu: r
                .timeline
                .iter()
                .map(|s| s.max_sessions_per_gpu)
                .max()
                .unwrap_or(0),
            peak_real_use: r.peak.real_use,
            mean_real_use: r.mean_real_use,
        }
    }
}

/// Runs `scenario` once per strategy in `strategies` (as many at a time as `threads`), each
/// with its own progress bar from `bar`.
pub fn run(
    scenario: &Scenario,
    strategies: &[String],
    threads: usize,
    bar: impl Fn(&str) -> indicatif::ProgressBar + Sync,
) -> Result<Comparison, SimError> {
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<Result<Report, SimError>>>> =
        Mutex::new(strategies.iter().map(|_| None).collect());
    std::thread::scope(|scope| {
        for _ in 0..threads.clamp(1, strategies.len().max(1)) {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(name) = strategies.get(i) else {
                        break;
                    };
                    let progress = bar(name);
                    let result = sim::run_with_progress(scenario, Some(name), &progress);
                    progress.finish_and_clear();
                    if let Ok(mut all) = results.lock()
                        && let Some(slot) = all.get_mut(i)
                    {
                        *slot = Some(result);
                    }
                }
            });
        }
    });
    let results = results
        .into_inner()
        .map_err(|_| SimError::Setup("a simulation thread failed".into()))?;
    let mut runs = Vec::new();
    for r in results {
        runs.push(r.ok_or_else(|| SimError::Setup("a simulation did not finish".into()))??);
    }
    let find = |name: &str| runs.iter().find(|r| r.strategy == name);
    let headline = match (find(EXCLUSIVE), find(POOLED)) {
        (Some(e), Some(p)) => Some(Headline {
            exclusive: HeadlineRow::of(e),
            pooled: HeadlineRow::of(p),
        }),
        _ => None,
    };
    Ok(Comparison {
        schema: SCHEMA,
        scenario: scenario.name.clone(),
        runs,
        headline,
    })
}

impl Comparison {
    /// The strategy table, then the headline.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{:<15} {:>9} {:>9} {:>7} {:>9} {:>9} {:>8} {:>8} {:>8} {:>8} {:>5} {:>7} {:>4}",
            "strategy",
            "requests",
            "placed",
            "placed%",
            "rejected",
            "abandoned",
            "wait p99",
            "peak fb%",
            "gpus",
            "bound",
            "s/gpu",
            "frag%",
            "slo"
        );
        for r in &self.runs {
            let rejected: u64 = r.rejected.values().sum();
            let _ = writeln!(
                s,
                "{:<15} {:>9} {:>9} {:>7.2} {:>9} {:>9} {:>8.1} {:>8.1} {:>8} {:>8} {:>5.2} {:>7.1} {:>4}",
                r.strategy,
                r.requests,
                r.placed,
                100.0 * r.placed as f64 / r.requests.max(1) as f64,
                rejected,
                r.abandoned,
                r.queue_wait_s.p99,
                100.0 * r.peak.framebuffer,
                r.peak.gpus_in_use,
                r.lower_bound_gpus_at_peak
                    .map_or("-".to_owned(), |b| b.to_string()),
                r.peak_sessions_per_gpu_in_use,
                100.0 * r.peak.fragmentation,
                if r.ok { "ok" } else { "FAIL" }
            );
        }
        if let Some(h) = &self.headline {
            let _ = writeln!(
                s,
                "\none GPU per player vs pooling, same demand and fleet:\n{:<15} {:>9} {:>9} {:>13} {:>11} {:>10} {:>13} {:>13}",
                "",
                "placed",
                "peak sess",
                "GPUs in use",
                "sess/GPU",
                "max/GPU",
                "use at peak",
                "use (mean)"
            );
            for row in [&h.exclusive, &h.pooled] {
                let _ = writeln!(
                    s,
                    "{:<15} {:>9} {:>9} {:>13} {:>11.2} {:>10} {:>12.1}% {:>12.1}%",
                    row.strategy,
                    row.placed,
                    row.peak_sessions,
                    row.peak_gpus_in_use,
                    row.peak_sessions_per_gpu,
                    row.max_sessions_per_gpu,
                    100.0 * row.peak_real_use,
                    100.0 * row.mean_real_use
                );
            }
        }
        s
    }

    /// The run of the scenario's own strategy (else the first).
    pub fn main_run(&self, strategy: &str) -> Option<&Report> {
        self.runs
            .iter()
            .find(|r| r.strategy == strategy)
            .or_else(|| self.runs.first())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn smoke() -> Scenario {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios/smoke.toml");
        Scenario::load(&path).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn every_strategy_sees_the_same_demand_and_the_headline_compares_two() {
        let s = smoke();
        let names: Vec<String> = framecast_broker::placement::strategy::NAMES
            .iter()
            .map(|n| (*n).to_owned())
            .collect();
        let c = run(&s, &names, 2, |_| indicatif::ProgressBar::hidden()).unwrap();
        assert_eq!(c.runs.len(), names.len());
        for (r, name) in c.runs.iter().zip(&names) {
            assert_eq!(&r.strategy, name);
            assert_eq!(r.requests, c.runs[0].requests, "{name}: same demand");
        }
        let h = c.headline.as_ref().unwrap();
        // A whole GPU per player: one session per GPU in use, and most of each GPU idle.
        assert!(
            (h.exclusive.peak_sessions_per_gpu - 1.0).abs() < 1e-9,
            "{h:?}"
        );
        assert_eq!(h.exclusive.max_sessions_per_gpu, 1);
        assert!(h.exclusive.peak_real_use < 0.35, "{h:?}");
        // Pooling packs several sessions onto a GPU.
        assert!(h.pooled.peak_sessions_per_gpu > 2.0, "{h:?}");
        assert!(h.pooled.peak_real_use > h.exclusive.peak_real_use * 2.0);
        let table = c.table();
        assert!(table.contains("exclusive") && table.contains("one GPU per player"));
        assert_eq!(c.main_run("first-fit").unwrap().strategy, "first-fit");
    }
}
