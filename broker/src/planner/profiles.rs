//! The profile plan of one region's equal-size GPUs: how many hold each tier's profile, which
//! empty GPUs take a tier in deficit, and which GPUs of a tier in surplus are steered away so
//! they empty and can change profile. Running sessions are never touched: a GPU changes
//! profile only once it is empty.

use std::collections::{BTreeMap, BTreeSet};

use framecast_shared::gpu::GpuMode;

use super::fleet::{SGpu, Snapshot};

/// A GPU steered away from tier `from` so it can serve tier `to` once empty.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct SteerPlan {
    pub(super) from: usize,
    pub(super) to: usize,
}

/// Hysteresis counters of one region, per tier: rounds a deficit (that empty GPUs could not
/// cover) and a surplus (a GPU the tier could do without) have lasted.
#[derive(Debug, Clone, Default)]
pub(super) struct Persistence {
    pub(super) deficit_rounds: Vec<u32>,
    pub(super) surplus_rounds: Vec<u32>,
}

/// Inputs of one region's profile plan.
pub(super) struct ProfileInput<'a, 'v> {
    pub(super) snap: &'a Snapshot<'v>,
    /// The region's usable GPUs.
    pub(super) gpus: &'a [usize],
    /// Sessions (plus warm instances) the region's equal-size GPUs must hold, per tier.
    pub(super) need: &'a [u32],
    /// Of that, the warm buffer, per tier: served first when GPUs are short.
    pub(super) warm: &'a [u32],
    /// Sessions on the region's equal-size GPUs now, per tier.
    pub(super) running: &'a [u32],
    /// The tier each GPU was planned for last (equal-size).
    pub(super) planned: &'a BTreeMap<usize, usize>,
    /// GPUs steered away now.
    pub(super) steered: &'a BTreeMap<usize, SteerPlan>,
    /// Rounds each steered GPU has not been needed for its new tier.
    pub(super) idle_rounds: &'a BTreeMap<usize, u32>,
    /// Rounds a condition must last before steering changes.
    pub(super) hysteresis: u32,
}

/// The decision for one region.
#[derive(Debug, Clone, Default)]
pub(super) struct ProfileDecision {
    /// The tier each equal-size GPU holds or is planned for (`None`: spare).
    pub(super) tier_of: BTreeMap<usize, Option<usize>>,
    /// GPUs steered after this decision (kept and new).
    pub(super) steered: BTreeMap<usize, SteerPlan>,
    /// Steered GPUs released: emptied (and re-planned) or no longer needed.
    pub(super) released: BTreeSet<usize>,
    /// Of those, the ones their own tier needs back at once.
    pub(super) urgent: BTreeSet<usize>,
    /// GPUs newly steered away.
    pub(super) new_steers: BTreeSet<usize>,
    /// Rounds each still-steered GPU has not been needed.
    pub(super) idle_rounds: BTreeMap<usize, u32>,
    /// Capacity per tier after the decision, in sessions (steered GPUs count their sessions).
    pub(super) capacity: Vec<u32>,
}

impl ProfileInput<'_, '_> {
    /// Plans the region's equal-size GPUs; updates the hysteresis counters.
    pub(super) fn decide(&self, persistence: &mut Persistence) -> ProfileDecision {
        let tiers = self.need.len();
        persistence.deficit_rounds.resize(tiers, 0);
        persistence.surplus_rounds.resize(tiers, 0);
        let sess = |gi: usize, t: usize| self.gpu(gi).map_or(0, |g| u32::from(g.sessions_cap(t)));
        let held = |gi: usize| self.gpu(gi).map_or(0, |g| u32::from(g.held()));
        let need = |t: usize| self.need.get(t).copied().unwrap_or(0);

        let mut d = ProfileDecision {
            capacity: vec![0; tiers],
            ..ProfileDecision::default()
        };
        let mut emptied: Vec<(usize, SteerPlan)> = Vec::new();
        for &gi in self.gpus {
            let Some(g) = self.gpu(gi) else { continue };
            if g.mode() != GpuMode::EqualSize {
                continue;
            }
            let tier = if g.held() > 0 {
                g.observed_tier
            } else {
                self.planned.get(&gi).copied()
            };
            match self.steered.get(&gi) {
                Some(&s) if g.held() == 0 => {
                    emptied.push((gi, s));
                    d.tier_of.insert(gi, None);
                }
                Some(&s) => {
                    d.steered.insert(gi, s);
                    d.tier_of.insert(gi, tier);
                }
                None => {
                    d.tier_of.insert(gi, tier);
                }
            }
        }
        let mut pending = vec![0u32; tiers];
        for (&gi, tier) in &d.tier_of {
            let Some(t) = *tier else { continue };
            let add = if d.steered.contains_key(&gi) {
                held(gi)
            } else {
                sess(gi, t)
            };
            if let Some(c) = d.capacity.get_mut(t) {
                *c += add;
            }
        }
        for (&gi, s) in &d.steered {
            if let Some(p) = pending.get_mut(s.to) {
                *p += sess(gi, s.to);
            }
        }

        // A tier has a surplus when one of its GPUs could go and the rest still hold its need.
        for t in 0..tiers {
            let cap = d.capacity.get(t).copied().unwrap_or(0);
            let releasable = d.tier_of.iter().any(|(&gi, tier)| {
                *tier == Some(t)
                    && !d.steered.contains_key(&gi)
                    && cap.saturating_sub(sess(gi, t).saturating_sub(held(gi))) >= need(t)
            });
            if let Some(r) = persistence.surplus_rounds.get_mut(t) {
                *r = if releasable { r.saturating_add(1) } else { 0 };
            }
        }

        // Steered GPUs that have emptied serve the tier they were steered for, if it still
        // needs them.
        for (gi, s) in emptied {
            d.released.insert(gi);
            let cap = d.capacity.get(s.to).copied().unwrap_or(0);
            let pend = pending.get(s.to).copied().unwrap_or(0);
            if u64::from(need(s.to)) > u64::from(cap) + u64::from(pend) && sess(gi, s.to) > 0 {
                d.tier_of.insert(gi, Some(s.to));
                if let Some(c) = d.capacity.get_mut(s.to) {
                    *c += sess(gi, s.to);
                }
            }
        }

        // Steered GPUs their own tier needs back, or that the new tier no longer needs.
        let mut by_sessions: Vec<(usize, SteerPlan)> =
            d.steered.iter().map(|(&gi, &s)| (gi, s)).collect();
        by_sessions.sort_by_key(|&(gi, _)| (std::cmp::Reverse(held(gi)), gi));
        for (gi, s) in by_sessions {
            let cap_from = d.capacity.get(s.from).copied().unwrap_or(0);
            let cap_to = d.capacity.get(s.to).copied().unwrap_or(0);
            let pend = pending.get(s.to).copied().unwrap_or(0);
            let urgent = cap_from < need(s.from);
            // Released only with a GPU to spare besides it: a need that wobbles by a few
            // sessions must not steer the same GPU away and back.
            let unneeded = u64::from(need(s.to)) + 2 * u64::from(sess(gi, s.to))
                <= u64::from(cap_to) + u64::from(pend);
            let rounds = if unneeded {
                self.idle_rounds
                    .get(&gi)
                    .copied()
                    .unwrap_or(0)
                    .saturating_add(1)
            } else {
                0
            };
            if urgent || rounds >= self.hysteresis.max(1) {
                d.steered.remove(&gi);
                d.released.insert(gi);
                if urgent {
                    d.urgent.insert(gi);
                }
                if let Some(c) = d.capacity.get_mut(s.from) {
                    *c = (*c + sess(gi, s.from)).saturating_sub(held(gi));
                }
                if let Some(p) = pending.get_mut(s.to) {
                    *p = p.saturating_sub(sess(gi, s.to));
                }
            } else {
                d.idle_rounds.insert(gi, rounds);
            }
        }

        // Deficits. When GPUs are short, every tier's warm buffer gets room first; then
        // spare GPUs, then empty GPUs of tiers in surplus, go to the largest deficits; then
        // (once the deficit and the surplus have lasted) busy GPUs of tiers in surplus are
        // steered away.
        let deficit = |d: &ProfileDecision, pending: &[u32], t: usize| -> i64 {
            i64::from(need(t))
                - i64::from(d.capacity.get(t).copied().unwrap_or(0))
                - i64::from(pending.get(t).copied().unwrap_or(0))
        };
        for u in 0..tiers {
            let free = i64::from(d.capacity.get(u).copied().unwrap_or(0))
                + i64::from(pending.get(u).copied().unwrap_or(0))
                - i64::from(self.running.get(u).copied().unwrap_or(0));
            let warm = i64::from(self.warm.get(u).copied().unwrap_or(0));
            let short = (warm - free).min(deficit(&d, &pending, u));
            if short > 0 {
                // Empty GPUs of other tiers beyond what those tiers' own sessions and buffers
                // take are fair game here.
                let floor = |t: usize| {
                    let running = self.running.get(t).copied().unwrap_or(0);
                    running.saturating_add(self.warm.get(t).copied().unwrap_or(0))
                };
                let left = self.take_spares(&mut d, u, short);
                self.take_empties(&mut d, u, left, &floor);
            }
        }
        let mut order: Vec<usize> = (0..tiers).collect();
        order.sort_by_key(|&t| (std::cmp::Reverse(deficit(&d, &pending, t)), t));
        for u in order {
            let mut short = deficit(&d, &pending, u);
            if short > 0 {
                short = self.take_spares(&mut d, u, short);
                short = self.take_empties(&mut d, u, short, &need);
            }
            let Some(rounds) = persistence.deficit_rounds.get_mut(u) else {
                continue;
            };
            if short <= 0 {
                *rounds = 0;
                continue;
            }
            *rounds = rounds.saturating_add(1);
            if *rounds < self.hysteresis.max(1) {
                continue;
            }
            // Busy GPUs of tiers in lasting surplus, fewest sessions first.
            let mut busy: Vec<(u32, usize, usize)> =
                d.tier_of
                    .iter()
                    .filter_map(|(&gi, tier)| {
                        let t = (*tier)?;
                        let lasting = persistence
                            .surplus_rounds
                            .get(t)
                            .is_some_and(|&r| r >= self.hysteresis.max(1));
                        (t != u && held(gi) > 0 && lasting && !d.steered.contains_key(&gi))
                            .then_some((held(gi), gi, t))
                    })
                    .collect();
            busy.sort();
            for (h, gi, t) in busy {
                if short <= 0 {
                    break;
                }
                let cap_t = d.capacity.get(t).copied().unwrap_or(0);
                let cap = sess(gi, u);
                let freed = sess(gi, t).saturating_sub(h);
                if cap == 0 || cap_t.saturating_sub(freed) < need(t) {
                    continue;
                }
                let s = SteerPlan { from: t, to: u };
                d.steered.insert(gi, s);
                d.new_steers.insert(gi);
                if let Some(c) = d.capacity.get_mut(t) {
                    *c = c.saturating_sub(freed);
                }
                if let Some(p) = pending.get_mut(u) {
                    *p += cap;
                }
                short -= i64::from(cap);
            }
        }
        d
    }

    fn gpu(&self, gi: usize) -> Option<&SGpu<'_>> {
        self.snap.gpu(gi)
    }

    fn sess(&self, gi: usize, t: usize) -> u32 {
        self.gpu(gi).map_or(0, |g| u32::from(g.sessions_cap(t)))
    }

    /// Plans spare GPUs for tier `u` until `short` sessions are covered: those that already
    /// hold its profile first, then unsliced ones, the largest first. Returns what is left.
    fn take_spares(&self, d: &mut ProfileDecision, u: usize, mut short: i64) -> i64 {
        let mut spares: Vec<(u8, std::cmp::Reverse<u32>, usize)> = d
            .tier_of
            .iter()
            .filter(|&(&gi, tier)| {
                tier.is_none()
                    && self.gpu(gi).is_some_and(|g| g.held() == 0)
                    && !d.steered.contains_key(&gi)
            })
            .filter_map(|(&gi, _)| {
                let g = self.gpu(gi)?;
                let cap = self.sess(gi, u);
                let rank = match g.observed_tier {
                    Some(t) if t == u => 0,
                    None => 1,
                    Some(_) => 2,
                };
                (cap > 0).then_some((rank, std::cmp::Reverse(cap), gi))
            })
            .collect();
        spares.sort();
        for (_, std::cmp::Reverse(cap), gi) in spares {
            if short <= 0 {
                break;
            }
            d.tier_of.insert(gi, Some(u));
            if let Some(c) = d.capacity.get_mut(u) {
                *c += cap;
            }
            short -= i64::from(cap);
        }
        short
    }

    /// Re-plans empty GPUs of tiers that can spare them (keeping at least `floor` of their
    /// capacity) for tier `u` until `short` sessions are covered, those with the fewest warm
    /// instances first. Returns what is left.
    fn take_empties(
        &self,
        d: &mut ProfileDecision,
        u: usize,
        mut short: i64,
        floor: &dyn Fn(usize) -> u32,
    ) -> i64 {
        if short <= 0 {
            return short;
        }
        let mut empties: Vec<(u16, usize, usize)> = d
            .tier_of
            .iter()
            .filter_map(|(&gi, tier)| {
                let t = (*tier)?;
                let g = self.gpu(gi)?;
                (t != u && g.held() == 0 && !d.steered.contains_key(&gi)).then_some((
                    g.warm_observed,
                    gi,
                    t,
                ))
            })
            .collect();
        empties.sort();
        for (_, gi, t) in empties {
            if short <= 0 {
                break;
            }
            let cap_t = d.capacity.get(t).copied().unwrap_or(0);
            let cap = self.sess(gi, u);
            if cap == 0 || cap_t.saturating_sub(self.sess(gi, t)) < floor(t) {
                continue;
            }
            d.tier_of.insert(gi, Some(u));
            if let Some(c) = d.capacity.get_mut(t) {
                *c = c.saturating_sub(self.sess(gi, t));
            }
            if let Some(c) = d.capacity.get_mut(u) {
                *c += cap;
            }
            short -= i64::from(cap);
        }
        short
    }
}
