//! Placement strategies: the genre-weighted scorer and the baselines it is compared with.
//!
//! A strategy answers one attempt — a region and a tier — by choosing a GPU and slot, using
//! the fleet's indices to find candidates. The engine owns everything else (fallbacks, RTT
//! caps, the queue, committing the choice), so the simulator can run every strategy on the
//! same trace.

use std::fmt;

use super::catalog::{GameIdx, GenreIdx, RegionIdx, TierIdx};
use super::fleet::{Demand, Fleet, GpuIdx, Infeasible, SlotChoice, SlotPlan};
use super::request::CandidateExplanation;
use super::score::{ScoreBreakdown, ScoreContext, score};

/// One attempt: place a session of `tier` and `genre` in `region`.
#[derive(Debug, Clone, Copy)]
pub struct Ask<'a> {
    /// The region.
    pub region: RegionIdx,
    /// The tier.
    pub tier: TierIdx,
    /// The genre.
    pub genre: GenreIdx,
    /// The game, if the catalog has seen it (warm instances are keyed by it).
    pub game: Option<GameIdx>,
    /// Inputs of the score.
    pub score: ScoreContext<'a>,
    /// How many GPUs to take from each index set.
    pub candidates: usize,
}

/// A strategy's choice.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Choice {
    /// The GPU.
    pub gpu: GpuIdx,
    /// What the session takes there.
    pub demand: Demand,
    /// Which slot.
    pub plan: SlotPlan,
    /// The score (zero for baselines that do not score).
    pub score: ScoreBreakdown,
}

/// Copies a boxed strategy; implemented for every `Clone` strategy.
pub trait StrategyClone {
    /// A copy, for dry runs that must not move the strategy's own state.
    fn box_clone(&self) -> Box<dyn Strategy>;
}

impl<T: Strategy + Clone + 'static> StrategyClone for T {
    fn box_clone(&self) -> Box<dyn Strategy> {
        Box::new(self.clone())
    }
}

/// Chooses a GPU for one attempt.
pub trait Strategy: StrategyClone + fmt::Debug + Send {
    /// The strategy's name in reports.
    fn name(&self) -> &'static str;

    /// The GPU and slot for `ask`, or `None` when nothing the strategy looks at fits. When
    /// `explain` is given, every candidate weighed is appended to it.
    fn choose(
        &mut self,
        fleet: &Fleet,
        ask: &Ask<'_>,
        explain: Option<&mut Vec<CandidateExplanation>>,
    ) -> Option<Choice>;

    /// Whether every session takes a whole GPU.
    fn exclusive(&self) -> bool {
        false
    }
}

/// Whether `gpu` can take the ask, and how.
fn evaluate(
    fleet: &Fleet,
    gpu_idx: GpuIdx,
    ask: &Ask<'_>,
    warm: Option<u16>,
    exclusive: bool,
) -> Result<(Demand, SlotPlan), Infeasible> {
    let gpu = fleet.gpu(gpu_idx).ok_or(Infeasible::NotAccepting)?;
    let d = fleet.demand(gpu, ask.tier, ask.genre, exclusive)?;
    let choice = warm.map_or(SlotChoice::Any, SlotChoice::Warm);
    let plan = fleet.check(gpu, &d, choice)?;
    Ok((d, plan))
}

fn record(
    fleet: &Fleet,
    explain: &mut Option<&mut Vec<CandidateExplanation>>,
    gpu_idx: GpuIdx,
    outcome: Result<(SlotPlan, Option<ScoreBreakdown>), Infeasible>,
) {
    let Some(out) = explain.as_deref_mut() else {
        return;
    };
    let Some(gpu) = fleet.gpu(gpu_idx) else {
        return;
    };
    let Some(node) = fleet.node(gpu.node) else {
        return;
    };
    let (slot, warm, reprofile, infeasible, score) = match outcome {
        Ok((plan, score)) => (
            Some(u32::from(plan.slot)),
            plan.warm,
            plan.reprofile,
            None,
            score,
        ),
        Err(why) => (None, false, false, Some(why.as_str()), None),
    };
    out.push(CandidateExplanation {
        node: node.id.clone(),
        gpu: gpu.id.clone(),
        slot,
        warm,
        reprofile,
        infeasible,
        score,
    });
}

/// The genre-weighted scorer: gathers a few candidates from each index set — warm instances
/// of the game, the fullest and the emptiest equal-size GPUs of the tier's profile, empty
/// GPUs, mixed-size and MIG GPUs — and takes the best score (see [`super::score`]).
#[derive(Debug, Clone, Default)]
pub struct GenreWeighted {
    cands: Vec<(GpuIdx, Option<u16>)>,
    gpus: Vec<GpuIdx>,
}

impl Strategy for GenreWeighted {
    fn name(&self) -> &'static str {
        "genre-weighted"
    }

    fn choose(
        &mut self,
        fleet: &Fleet,
        ask: &Ask<'_>,
        mut explain: Option<&mut Vec<CandidateExplanation>>,
    ) -> Option<Choice> {
        self.cands.clear();
        let k = ask.candidates.max(1);
        if let Some(game) = ask.game {
            self.cands.extend(
                fleet
                    .indices
                    .warm(ask.region, game, ask.tier)
                    .take(k)
                    .map(|(g, s)| (g, Some(s))),
            );
        }
        for &spec in fleet.indices.specs(ask.region) {
            self.gpus.clear();
            let fit = fleet.catalog.fit(spec, ask.tier);
            // Both ends of the partial GPUs: the fullest (to pack, and let the emptiest drain
            // until they can change profile) and the emptiest (to spread); the score decides.
            if let Some((profile, _)) = fit.equal
                && let Some(b) = fleet.indices.partial(ask.region, spec, profile)
            {
                b.take(k, true, &mut self.gpus);
                b.take(k, false, &mut self.gpus);
            }
            if let Some(set) = fleet.indices.empty(ask.region, spec) {
                set.take(k, &mut self.gpus);
            }
            if let Some(set) = fleet.indices.flex(ask.region, spec) {
                set.take(k, &mut self.gpus);
            }
            for &g in &self.gpus {
                if !self.cands.contains(&(g, None)) {
                    self.cands.push((g, None));
                }
            }
        }
        let mut best: Option<Choice> = None;
        for &(gpu_idx, warm) in &self.cands {
            let outcome = evaluate(fleet, gpu_idx, ask, warm, false).and_then(|(d, plan)| {
                let gpu = fleet.gpu(gpu_idx).ok_or(Infeasible::NotAccepting)?;
                let node = fleet.node(gpu.node).ok_or(Infeasible::NotAccepting)?;
                Ok((
                    d,
                    plan,
                    score(&fleet.catalog, gpu, node, &d, plan, &ask.score),
                ))
            });
            record(
                fleet,
                &mut explain,
                gpu_idx,
                outcome
                    .as_ref()
                    .map(|(_, plan, s)| (*plan, Some(*s)))
                    .map_err(|e| *e),
            );
            if let Ok((demand, plan, s)) = outcome
                && best.as_ref().is_none_or(|b| s.total > b.score.total)
            {
                best = Some(Choice {
                    gpu: gpu_idx,
                    demand,
                    plan,
                    score: s,
                });
            }
        }
        best
    }
}

/// Scans the ordered index sets of `ask`'s region from `from` (wrapping once) and returns the
/// lowest-numbered GPU that fits; `exclusive` looks at empty GPUs only. At most `limit` GPUs
/// are examined, so a fleet full of GPUs of the wrong shape cannot make one decision scan it.
fn first_feasible(
    fleet: &Fleet,
    ask: &Ask<'_>,
    from: GpuIdx,
    exclusive: bool,
    limit: usize,
    explain: &mut Option<&mut Vec<CandidateExplanation>>,
) -> Option<Choice> {
    let mut examined = 0;
    for start in [from, 0] {
        let mut best: Option<Choice> = None;
        for &spec in fleet.indices.specs(ask.region) {
            let fit = fleet.catalog.fit(spec, ask.tier);
            let partial = if exclusive {
                None
            } else {
                fit.equal
                    .and_then(|(p, _)| fleet.indices.partial(ask.region, spec, p))
            };
            let sources: [Option<Box<dyn Iterator<Item = GpuIdx> + '_>>; 3] = [
                partial.map(|b| Box::new(b.iter_from(start)) as Box<dyn Iterator<Item = GpuIdx>>),
                fleet
                    .indices
                    .empty(ask.region, spec)
                    .map(|s| Box::new(s.iter_from(start)) as Box<dyn Iterator<Item = GpuIdx>>),
                if exclusive {
                    None
                } else {
                    fleet
                        .indices
                        .flex(ask.region, spec)
                        .map(|s| Box::new(s.iter_from(start)) as Box<dyn Iterator<Item = GpuIdx>>)
                },
            ];
            for source in sources.into_iter().flatten() {
                for gpu_idx in source {
                    if best.is_some_and(|b| b.gpu <= gpu_idx) || examined >= limit {
                        break;
                    }
                    examined += 1;
                    match evaluate(fleet, gpu_idx, ask, None, exclusive) {
                        Ok((demand, plan)) => {
                            record(fleet, explain, gpu_idx, Ok((plan, None)));
                            best = Some(Choice {
                                gpu: gpu_idx,
                                demand,
                                plan,
                                score: ScoreBreakdown::default(),
                            });
                            break;
                        }
                        Err(why) => record(fleet, explain, gpu_idx, Err(why)),
                    }
                }
            }
        }
        if best.is_some() || from == 0 {
            return best;
        }
    }
    None
}

/// How many GPUs a baseline examines at most per attempt.
const BASELINE_SCAN_LIMIT: usize = 4096;

/// First-fit: the lowest-numbered GPU that fits.
#[derive(Debug, Clone, Default)]
pub struct FirstFit;

impl Strategy for FirstFit {
    fn name(&self) -> &'static str {
        "first-fit"
    }

    fn choose(
        &mut self,
        fleet: &Fleet,
        ask: &Ask<'_>,
        mut explain: Option<&mut Vec<CandidateExplanation>>,
    ) -> Option<Choice> {
        first_feasible(fleet, ask, 0, false, BASELINE_SCAN_LIMIT, &mut explain)
    }
}

/// Round-robin: the next GPU that fits after the last one chosen.
#[derive(Debug, Clone, Default)]
pub struct RoundRobin {
    cursor: GpuIdx,
}

impl Strategy for RoundRobin {
    fn name(&self) -> &'static str {
        "round-robin"
    }

    fn choose(
        &mut self,
        fleet: &Fleet,
        ask: &Ask<'_>,
        mut explain: Option<&mut Vec<CandidateExplanation>>,
    ) -> Option<Choice> {
        let choice = first_feasible(
            fleet,
            ask,
            self.cursor,
            false,
            BASELINE_SCAN_LIMIT,
            &mut explain,
        )?;
        self.cursor = choice.gpu.saturating_add(1);
        Some(choice)
    }
}

/// Random: a uniformly drawn GPU among those with room, from a seeded generator so runs
/// repeat.
#[derive(Debug, Clone)]
pub struct Random {
    rng: fastrand::Rng,
}

impl Random {
    /// A random strategy seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Self {
            rng: fastrand::Rng::with_seed(seed),
        }
    }
}

impl Strategy for Random {
    fn name(&self) -> &'static str {
        "random"
    }

    fn choose(
        &mut self,
        fleet: &Fleet,
        ask: &Ask<'_>,
        mut explain: Option<&mut Vec<CandidateExplanation>>,
    ) -> Option<Choice> {
        // Draw up to 16 members of the sets with room; fall back to a scan from a random point.
        let mut sizes = Vec::new();
        for &spec in fleet.indices.specs(ask.region) {
            let fit = fleet.catalog.fit(spec, ask.tier);
            if let Some(b) = fit
                .equal
                .and_then(|(p, _)| fleet.indices.partial(ask.region, spec, p))
            {
                sizes.push((spec, 0u8, b.len()));
            }
            if let Some(s) = fleet.indices.empty(ask.region, spec) {
                sizes.push((spec, 1, s.len()));
            }
            if let Some(s) = fleet.indices.flex(ask.region, spec) {
                sizes.push((spec, 2, s.len()));
            }
        }
        let total: usize = sizes.iter().map(|s| s.2).sum();
        if total == 0 {
            return None;
        }
        for _ in 0..16 {
            let mut i = self.rng.usize(..total);
            let mut pick = None;
            for &(spec, kind, len) in &sizes {
                if i < len {
                    pick =
                        match kind {
                            0 => fleet.catalog.fit(spec, ask.tier).equal.and_then(|(p, _)| {
                                fleet.indices.partial(ask.region, spec, p)?.nth(i)
                            }),
                            1 => fleet.indices.empty(ask.region, spec).and_then(|s| s.nth(i)),
                            _ => fleet.indices.flex(ask.region, spec).and_then(|s| s.nth(i)),
                        };
                    break;
                }
                i -= len;
            }
            let Some(gpu_idx) = pick else { continue };
            match evaluate(fleet, gpu_idx, ask, None, false) {
                Ok((demand, plan)) => {
                    record(fleet, &mut explain, gpu_idx, Ok((plan, None)));
                    return Some(Choice {
                        gpu: gpu_idx,
                        demand,
                        plan,
                        score: ScoreBreakdown::default(),
                    });
                }
                Err(why) => record(fleet, &mut explain, gpu_idx, Err(why)),
            }
        }
        let n = u32::try_from(fleet.gpus.len()).unwrap_or(u32::MAX).max(1);
        let from = self.rng.u32(..n);
        first_feasible(fleet, ask, from, false, BASELINE_SCAN_LIMIT, &mut explain)
    }
}

/// Exclusive: one whole GPU per session, no sharing — the one-GPU-per-player baseline.
#[derive(Debug, Clone, Default)]
pub struct Exclusive;

impl Strategy for Exclusive {
    fn name(&self) -> &'static str {
        "exclusive"
    }

    fn choose(
        &mut self,
        fleet: &Fleet,
        ask: &Ask<'_>,
        mut explain: Option<&mut Vec<CandidateExplanation>>,
    ) -> Option<Choice> {
        first_feasible(fleet, ask, 0, true, BASELINE_SCAN_LIMIT, &mut explain)
    }

    fn exclusive(&self) -> bool {
        true
    }
}

/// The strategy named `name` (`genre-weighted`, `first-fit`, `round-robin`, `random`,
/// `exclusive`), seeded with `seed` where it draws random numbers.
pub fn by_name(name: &str, seed: u64) -> Option<Box<dyn Strategy>> {
    Some(match name {
        "genre-weighted" => Box::new(GenreWeighted::default()),
        "first-fit" => Box::new(FirstFit),
        "round-robin" => Box::new(RoundRobin::default()),
        "random" => Box::new(Random::new(seed)),
        "exclusive" => Box::new(Exclusive),
        _ => return None,
    })
}

/// The names [`by_name`] knows.
pub const NAMES: [&str; 5] = [
    "genre-weighted",
    "first-fit",
    "round-robin",
    "random",
    "exclusive",
];
