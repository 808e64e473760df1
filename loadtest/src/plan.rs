//! Capacity planning: the smallest fleet that meets a scenario's SLO for its demand, found by
//! running `sim` on fleets of different sizes.
//!
//! The fleet keeps its shape (the share of nodes in each `[[fleet]]` group) and is scaled as a
//! whole. The search assumes that more nodes never do worse: it doubles the fleet until the SLO
//! holds (or the ceiling is reached), then bisects between the largest failing and the
//! smallest passing size until they are within 1% (or one node) of each other.

use serde::{Deserialize, Serialize};

use crate::report::{Report, SCHEMA};
use crate::scenario::{Fault, Scenario};
use crate::sim::{self, SimError};

/// Why a plan could not be made.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// The scenario sets no SLO, so no fleet size is better than another.
    #[error(
        "{0}: no max_rejected_ratio or max_queue_wait_p99_s to plan for (add one to [slo], or pass --slo)"
    )]
    NoSlo(String),
    /// A run failed.
    #[error(transparent)]
    Sim(#[from] SimError),
}

/// One fleet size tried.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Probe {
    /// Nodes in the fleet.
    pub nodes: u64,
    /// GPUs in the fleet.
    pub gpus: u64,
    /// Whether every SLO held.
    pub ok: bool,
    /// The SLO checks that failed.
    pub failed: Vec<String>,
    /// The run.
    pub report: Report,
}

/// The search and what it found.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    /// The report schema version (probes hold reports of that schema).
    pub schema: u32,
    /// The scenario's name.
    pub scenario: String,
    /// The strategy every probe ran.
    pub strategy: String,
    /// The fleet the scenario describes, nodes.
    pub scenario_nodes: u64,
    /// Every size tried, in the order tried.
    pub probes: Vec<Probe>,
    /// SLO thresholds of the scenario the search leaves out (see [`plan`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ignored: Vec<String>,
    /// The smallest size that met the SLO, nodes; `None` when even the ceiling failed.
    pub smallest_nodes: Option<u64>,
    /// Its GPUs.
    pub smallest_gpus: Option<u64>,
}

/// The most nodes one fleet group may have (as in a scenario file).
pub const MAX_GROUP_NODES: u64 = 100_000;

/// Finds the smallest fleet for `scenario` of at most `max_nodes` nodes; `progress` counts
/// probes.
///
/// `min_peak_framebuffer_utilization` is left out of the search: it falls as the fleet grows,
/// so it bounds the fleet from above, and a smallest fleet that meets the others is the one
/// that comes closest to it. The plan says so in [`Plan::ignored`].
pub fn plan(
    scenario: &Scenario,
    strategy: Option<&str>,
    max_nodes: u64,
    progress: &indicatif::ProgressBar,
) -> Result<Plan, PlanError> {
    let mut scenario = scenario.clone();
    let mut ignored = Vec::new();
    if scenario
        .slo
        .min_peak_framebuffer_utilization
        .take()
        .is_some()
    {
        ignored.push("min_peak_framebuffer_utilization".to_owned());
    }
    let slo = &scenario.slo;
    if slo.max_rejected_ratio.is_none() && slo.max_queue_wait_p99_s.is_none() {
        return Err(PlanError::NoSlo(scenario.name.clone()));
    }
    let scenario = &scenario;
    let groups = scenario.fleet.len() as u64;
    let own: u64 = scenario.fleet.iter().map(|g| g.nodes as u64).sum();
    // Every group keeps a node, and none grows past a scenario's limit.
    let floor = groups.max(1);
    let max_nodes = max_nodes.clamp(floor, MAX_GROUP_NODES.saturating_mul(floor));
    let mut out = Plan {
        schema: SCHEMA,
        scenario: scenario.name.clone(),
        strategy: strategy.unwrap_or(&scenario.strategy).to_owned(),
        scenario_nodes: own,
        ignored,
        ..Plan::default()
    };
    let probe = |nodes: u64, out: &mut Plan| -> Result<bool, PlanError> {
        let sized = resized(scenario, nodes);
        progress.set_message(format!("{nodes} nodes"));
        let report = sim::run(&sized, strategy)?;
        progress.inc(1);
        let failed: Vec<String> = report
            .slo
            .iter()
            .filter(|c| !c.ok)
            .map(|c| c.name.clone())
            .collect();
        let ok = failed.is_empty();
        out.probes.push(Probe {
            nodes: report.nodes,
            gpus: report.gpus,
            ok,
            failed,
            report,
        });
        Ok(ok)
    };
    // The largest size known to fail (below the floor: none tried) and the smallest known to
    // pass; every size is one `resized` gives exactly.
    let mut fail = floor - 1;
    let mut pass = None;
    let mut n = own.clamp(floor, max_nodes);
    loop {
        if probe(n, &mut out)? {
            pass = Some(n);
            break;
        }
        fail = n;
        if n >= max_nodes {
            break;
        }
        n = n.saturating_mul(2).min(max_nodes);
    }
    if let Some(mut hi) = pass {
        if fail < floor && hi > floor {
            // The scenario's own fleet passes: look below it.
            let lo = (hi / 8).max(floor);
            if probe(lo, &mut out)? {
                hi = lo;
            } else {
                fail = lo;
            }
        }
        while hi - fail > (hi / 100).max(1) {
            let mid = fail + (hi - fail) / 2;
            if probe(mid, &mut out)? {
                hi = mid;
            } else {
                fail = mid;
            }
        }
        out.smallest_nodes = Some(hi);
        out.smallest_gpus = out.probes.iter().find(|p| p.nodes == hi).map(|p| p.gpus);
    }
    Ok(out)
}

/// `scenario` with its fleet scaled to `nodes` nodes (at least one per group, at most
/// [`MAX_GROUP_NODES`] each), every group keeping its share as nearly as whole nodes allow
/// (largest remainders), faults clamped to the new fleet.
pub fn resized(scenario: &Scenario, nodes: u64) -> Scenario {
    let mut s = scenario.clone();
    let groups = s.fleet.len();
    let own: u64 = s.fleet.iter().map(|g| g.nodes as u64).sum();
    let nodes = nodes.max(groups as u64);
    // One node for every group first, then the rest by share.
    let rest = nodes - groups as u64;
    let shares: Vec<f64> = s
        .fleet
        .iter()
        .map(|g| g.nodes as f64 / own.max(1) as f64 * rest as f64)
        .collect();
    let mut counts: Vec<u64> = shares.iter().map(|x| whole(x.floor())).collect();
    let mut left = rest.saturating_sub(counts.iter().sum());
    let mut by_remainder: Vec<usize> = (0..groups).collect();
    by_remainder.sort_by(|&a, &b| {
        let frac = |i: usize| shares.get(i).map_or(0.0, |x| x - x.floor());
        frac(b).total_cmp(&frac(a)).then(a.cmp(&b))
    });
    for i in by_remainder.iter().cycle().take(groups * 2) {
        if left == 0 {
            break;
        }
        if let Some(c) = counts.get_mut(*i) {
            *c += 1;
            left -= 1;
        }
    }
    for (g, c) in s.fleet.iter_mut().zip(counts) {
        g.nodes = usize::try_from((c + 1).min(MAX_GROUP_NODES)).unwrap_or(1);
    }
    let total: usize = s.fleet.iter().map(|g| g.nodes).sum();
    for f in &mut s.faults {
        if let Fault::NodeLoss { nodes, .. } = f {
            *nodes = (*nodes).min(total).max(1);
        }
    }
    s
}

/// `x` (a whole non-negative number) as a count; negative and NaN as 0.
// Node counts are far below 2^52, where f64 holds every integer.
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
fn whole(x: f64) -> u64 {
    if x.is_finite() && x > 0.0 {
        x.min(u64::MAX as f64) as u64
    } else {
        0
    }
}

impl Plan {
    /// The terminal summary: every probe, then the answer.
    pub fn summary(&self) -> String {
        use std::fmt::Write as _;
        let mut s = format!(
            "capacity plan for {} ({} strategy), the scenario's fleet: {} nodes\n{:>8} {:>8} {:>9} {:>10} {:>9}  result\n",
            self.scenario,
            self.strategy,
            self.scenario_nodes,
            "nodes",
            "gpus",
            "rejected%",
            "wait p99 s",
            "peak fb%"
        );
        let mut probes: Vec<&Probe> = self.probes.iter().collect();
        probes.sort_by_key(|p| p.nodes);
        for p in probes {
            let r = &p.report;
            let rejected: u64 = r.rejected.values().sum();
            let _ = writeln!(
                s,
                "{:>8} {:>8} {:>9.2} {:>10.1} {:>9.1}  {}",
                p.nodes,
                p.gpus,
                100.0 * rejected as f64 / r.requests.max(1) as f64,
                r.queue_wait_s.p99,
                100.0 * r.peak.framebuffer,
                if p.ok {
                    "ok".to_owned()
                } else {
                    format!("fails {}", p.failed.join(", "))
                }
            );
        }
        for name in &self.ignored {
            let _ = writeln!(
                s,
                "({name} is left out: it falls as the fleet grows; see each size's peak fb%)"
            );
        }
        match (self.smallest_nodes, self.smallest_gpus) {
            (Some(n), Some(g)) => {
                let _ = writeln!(s, "smallest fleet meeting the SLO: {n} nodes ({g} GPUs)");
            }
            _ => {
                let _ = writeln!(
                    s,
                    "no fleet up to the ceiling meets the SLO (raise --max-nodes)"
                );
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scenario() -> Scenario {
        let text = r#"
name = "plan-test"
duration_s = 3600
[[fleet]]
region = "eu"
nodes = 6
model = "l4"
gpus_per_node = 2
[[fleet]]
region = "us"
nodes = 2
model = "l4"
gpus_per_node = 2
[demand]
arrivals = { kind = "poisson", rate_per_s = 0.1 }
tiers = { "1080p" = 1 }
genres = { rpg = 1 }
session_minutes = { rpg = { median = 30, sigma = 0.3 } }
queue = false
[[faults]]
kind = "node-loss"
at_s = 600
nodes = 3
[slo]
max_rejected_ratio = 0.01
"#;
        Scenario::parse(text, "plan-test.toml").unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn resizing_keeps_the_shape_and_clamps_faults() {
        let sizes = |n: u64| -> Vec<usize> {
            resized(&scenario(), n)
                .fleet
                .iter()
                .map(|g| g.nodes)
                .collect()
        };
        // Each group keeps a node; the fleet is exactly the size asked for.
        assert_eq!(sizes(1), [1, 1]);
        assert_eq!(sizes(2), [1, 1]);
        assert_eq!(sizes(80), [60, 20]);
        for n in 2..200 {
            assert_eq!(
                sizes(n).iter().sum::<usize>(),
                usize::try_from(n).unwrap(),
                "{n}"
            );
        }
        // 6:2 of 14: one node each first, then 9:3 of the other 12.
        assert_eq!(sizes(14), [10, 4]);
        let s = resized(&scenario(), 2);
        assert!(matches!(s.faults[0], Fault::NodeLoss { nodes: 2, .. }));
        assert_eq!(resized(&scenario(), 10_000_000).fleet[0].nodes, 100_000);
    }

    #[test]
    fn the_plan_is_the_smallest_passing_fleet_and_one_less_fails() {
        let s = scenario();
        let p = plan(&s, None, 200, &indicatif::ProgressBar::hidden()).unwrap();
        let n = p.smallest_nodes.unwrap();
        let at = |nodes: u64| p.probes.iter().find(|x| x.nodes == nodes);
        assert!(at(n).unwrap().ok);
        // Every probe below the answer failed and every one at or above passed.
        for probe in &p.probes {
            assert_eq!(probe.ok, probe.nodes >= n, "{}", p.summary());
        }
        // Within one node of the boundary (the fleet is small): one node fewer fails.
        let fewer = sim::run(&resized(&s, n - 1), None).unwrap();
        assert!(!fewer.ok, "{}", p.summary());
        // 360 arrivals an hour of 30-minute 1080p sessions hold ~180 sessions at 6 a GPU
        // (L4-4Q): the answer is around 15 two-GPU nodes plus the three lost.
        assert!((12..=30).contains(&n), "{}", p.summary());
        assert!(p.summary().contains("smallest fleet meeting the SLO"));
    }

    #[test]
    fn no_slo_no_plan_and_a_low_ceiling_finds_nothing() {
        let mut s = scenario();
        s.slo = Default::default();
        s.slo.min_peak_framebuffer_utilization = Some(0.9);
        assert!(matches!(
            plan(&s, None, 100, &indicatif::ProgressBar::hidden()),
            Err(PlanError::NoSlo(_))
        ));
        let p = plan(&scenario(), None, 4, &indicatif::ProgressBar::hidden()).unwrap();
        assert_eq!(p.smallest_nodes, None);
        assert!(p.probes.iter().all(|x| x.nodes <= 4));
        assert!(p.summary().contains("raise --max-nodes"));
    }
}
