//! One round's work, below [`Planner::round`]: forecasts, each region's profile decision and
//! warm distribution, the proposals and which of them the rate limit lets through, the plans
//! sent, and the views.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use rustc_hash::{FxHashMap, FxHashSet};

use framecast_shared::gpu::GpuMode;
use framecast_shared::ids::{GameId, NodeId, RegionName, TierName};
use framecast_shared::protocol::{GpuPlan, PoolPlan, WarmTarget};
use framecast_shared::time::Timestamp;

use super::demand::{Rates, ceil_u32};
use super::fleet::{GpuKey, SGpu, Snapshot};
use super::profiles::{Persistence, ProfileDecision, ProfileInput, SteerPlan};
use super::warm::{self, Distribution, WarmByGpu};
use super::{
    DEFAULT_SESSION_LENGTH, DemandKey, GpuIntent, Planner, ProfileView, Steer, TargetView,
    WarmBounds,
};

/// One demand's figures for a round.
#[derive(Debug, Clone)]
pub(super) struct Forecast {
    rates: Rates,
    rate_plan: f64,
    rate_peak: f64,
    length_s: f64,
    desired: u16,
    desired_plan: u16,
    desired_peak: u16,
    tier: Option<usize>,
}

/// A running mean.
#[derive(Debug, Clone, Copy, Default)]
struct Mean {
    sum: f64,
    n: u32,
}

impl Mean {
    fn add(&mut self, x: f64) {
        self.sum += x;
        self.n += 1;
    }

    fn get(&self) -> Option<f64> {
        (self.n > 0).then(|| self.sum / f64::from(self.n))
    }
}

/// A GPU whose plan or steering would change.
#[derive(Debug, Clone)]
pub(super) struct Proposal {
    gi: usize,
    tier: Option<TierName>,
    plan: GpuPlan,
    plan_changed: bool,
    steer: Option<SteerChange>,
    class: u8,
}

#[derive(Debug, Clone)]
enum SteerChange {
    Away(Steer),
    Back,
}

impl Planner {
    /// Drops intents and steering of GPUs that left or whose node takes no sessions: plans
    /// are made only for present nodes.
    pub(super) fn forget_unusable(&mut self, snap: &Snapshot<'_>) {
        let usable: FxHashSet<&GpuKey> = snap
            .gpus
            .iter()
            .filter(|g| g.usable)
            .map(|g| &g.key)
            .collect();
        self.intents.retain(|k, _| usable.contains(k));
        self.steering.retain(|k, _| usable.contains(k));
        self.idle_rounds.retain(|k, _| usable.contains(k));
        let nodes: BTreeSet<&NodeId> = snap.gpus.iter().map(|g| &g.node.node_id).collect();
        self.sent_to.retain(|n, _| nodes.contains(n));
    }

    /// Every demand's rates, session length and warm buffers at `now`.
    pub(super) fn forecasts(
        &mut self,
        snap: &Snapshot<'_>,
        now: Timestamp,
    ) -> BTreeMap<DemandKey, Forecast> {
        let c = &self.config;
        let warm_ahead = c.launch_time.saturating_add(c.round_every);
        let plan_ahead = c.short_window.max(warm_ahead);
        let peak_ahead = c.long_window.max(plan_ahead);
        let launch_s = c.launch_time.as_secs_f64();
        let profile = |ahead: Duration| c.daily_profile.then_some(ahead);
        // Session length: the demand's own, else the mean of its region and tier's, else of its
        // region's, else of all, else the default.
        let mut by_tier: BTreeMap<(RegionName, TierName), Mean> = BTreeMap::new();
        let mut by_region: BTreeMap<RegionName, Mean> = BTreeMap::new();
        let mut all = Mean::default();
        for (k, d) in &self.demand {
            if let Some(l) = d.length_s {
                by_tier
                    .entry((k.region.clone(), k.tier.clone()))
                    .or_default()
                    .add(l);
                by_region.entry(k.region.clone()).or_default().add(l);
                all.add(l);
            }
        }
        let mut out = BTreeMap::new();
        for (key, d) in &mut self.demand {
            d.profile.roll(now);
            let rates = d.rates(now, c.short_window, c.long_window, profile(warm_ahead));
            let plan = d.rates(now, c.short_window, c.long_window, profile(plan_ahead));
            let peak = d.rates(now, c.short_window, c.long_window, profile(peak_ahead));
            let length_s = d
                .length_s
                .or_else(|| {
                    by_tier
                        .get(&(key.region.clone(), key.tier.clone()))
                        .and_then(Mean::get)
                })
                .or_else(|| by_region.get(&key.region).and_then(Mean::get))
                .or_else(|| all.get())
                .unwrap_or(DEFAULT_SESSION_LENGTH.as_secs_f64());
            let b = self
                .bounds
                .get(&(key.tier.clone(), Some(key.game.clone())))
                .or_else(|| self.bounds.get(&(key.tier.clone(), None)))
                .copied()
                .unwrap_or(WarmBounds {
                    min: c.min_warm,
                    max: c.max_warm,
                });
            let buffer = |rate: f64| warm::buffer(rate, launch_s, c.safety_z, b.min, b.max);
            let raw = warm::buffer_raw(rates.forecast(), launch_s, c.safety_z);
            let settled = warm::settle(
                (d.warm_target, d.below_rounds),
                buffer(rates.forecast()),
                raw.map_or(b.min, |r| buffer_of_raw(r + 0.5, b)),
                c.hysteresis_rounds,
            );
            (d.warm_target, d.below_rounds) = settled;
            let desired = d.warm_target;
            let desired_plan = desired.max(buffer(plan.forecast()));
            out.insert(
                key.clone(),
                Forecast {
                    rates,
                    rate_plan: plan.forecast(),
                    rate_peak: peak.forecast(),
                    length_s: length_s.max(0.0),
                    desired,
                    desired_plan,
                    desired_peak: desired_plan.max(buffer(peak.forecast())),
                    tier: snap.tier(&key.tier),
                },
            );
        }
        out
    }

    /// One region's profile decision, warm distribution and, per tier, the sessions plus warm
    /// instances the forecast peak needs.
    pub(super) fn plan_region(
        &mut self,
        snap: &Snapshot<'_>,
        region: &RegionName,
        gpus: &[usize],
        forecasts: &BTreeMap<DemandKey, Forecast>,
    ) -> (ProfileDecision, WarmByGpu, Vec<f64>) {
        let tiers = snap.tiers.len();
        let mut sessions = vec![0.0f64; tiers];
        let mut sessions_peak = vec![0.0f64; tiers];
        let mut warm_plan = vec![0u32; tiers];
        let mut warm_peak = vec![0u32; tiers];
        let mut desired: BTreeMap<(GameId, usize), u16> = BTreeMap::new();
        for (key, f) in forecasts.iter().filter(|(k, _)| &k.region == region) {
            let Some(t) = f.tier else { continue };
            if let (Some(s), Some(p), Some(w), Some(wp)) = (
                sessions.get_mut(t),
                sessions_peak.get_mut(t),
                warm_plan.get_mut(t),
                warm_peak.get_mut(t),
            ) {
                *s += f.rate_plan * f.length_s;
                *p += f.rate_peak * f.length_s;
                *w += u32::from(f.desired_plan);
                *wp += u32::from(f.desired_peak);
            }
            if f.desired > 0 {
                desired.insert((key.game.clone(), t), f.desired);
            }
        }
        let mut running = vec![0u32; tiers];
        let mut running_flex = vec![0u32; tiers];
        for g in gpus.iter().filter_map(|&gi| snap.gpu(gi)) {
            for t in 0..tiers {
                let n = u32::from(g.held_of(t));
                if let Some(r) = running.get_mut(t) {
                    *r += n;
                }
                if g.mode() != GpuMode::EqualSize
                    && let Some(r) = running_flex.get_mut(t)
                {
                    *r += n;
                }
            }
        }
        let mut queued = vec![0u32; tiers];
        for ((r, t, _), n) in &snap.queued {
            if r == region
                && let Some(q) = queued.get_mut(*t)
            {
                *q += n;
            }
        }
        let at = |v: &[u32], t: usize| v.get(t).copied().unwrap_or(0);
        let at_f = |v: &[f64], t: usize| v.get(t).copied().unwrap_or(0.0);
        let need: Vec<u32> = (0..tiers)
            .map(|t| {
                let now = at(&running, t).saturating_add(at(&queued, t));
                let all = ceil_u32(at_f(&sessions, t))
                    .max(now)
                    .saturating_add(at(&warm_plan, t));
                all.saturating_sub(at(&running_flex, t))
            })
            .collect();
        let peak: Vec<f64> = (0..tiers)
            .map(|t| {
                let now = f64::from(at(&running, t) + at(&queued, t));
                at_f(&sessions_peak, t).max(now) + f64::from(at(&warm_peak, t))
            })
            .collect();

        let key_of = |gi: usize| snap.gpu(gi).map(|g| &g.key);
        let mut planned = BTreeMap::new();
        let mut steered = BTreeMap::new();
        let mut idle = BTreeMap::new();
        let mut previous: WarmByGpu = BTreeMap::new();
        for &gi in gpus {
            let Some(key) = key_of(gi) else { continue };
            if let Some(i) = self.intents.get(key) {
                if let Some(t) = i.tier.as_ref().and_then(|t| snap.tier(t)) {
                    planned.insert(gi, t);
                }
                for w in &i.plan.warm {
                    if let Some(t) = snap.tier(&w.tier) {
                        *previous
                            .entry(gi)
                            .or_default()
                            .entry((w.game.clone(), t))
                            .or_default() += w.count;
                    }
                }
            }
            if self.steering.is_empty() {
                continue;
            }
            if let Some(s) = self.steering.get(key)
                && let (Some(from), Some(to)) = (snap.tier(&s.from), snap.tier(&s.to))
            {
                steered.insert(gi, SteerPlan { from, to });
            }
            if let Some(&r) = self.idle_rounds.get(key) {
                idle.insert(gi, r);
            }
        }
        let mut persistence = Persistence::default();
        for name in &snap.tiers {
            let k = (region.clone(), name.clone());
            persistence
                .deficit_rounds
                .push(self.deficit_rounds.get(&k).copied().unwrap_or(0));
            persistence
                .surplus_rounds
                .push(self.surplus_rounds.get(&k).copied().unwrap_or(0));
        }
        let running_equal: Vec<u32> = (0..tiers)
            .map(|t| at(&running, t).saturating_sub(at(&running_flex, t)))
            .collect();
        let decision = ProfileInput {
            snap,
            gpus,
            need: &need,
            warm: &warm_plan,
            running: &running_equal,
            planned: &planned,
            steered: &steered,
            idle_rounds: &idle,
            hysteresis: self.config.hysteresis_rounds,
        }
        .decide(&mut persistence);
        for (t, name) in snap.tiers.iter().enumerate() {
            let k = (region.clone(), name.clone());
            self.deficit_rounds.insert(
                k.clone(),
                persistence.deficit_rounds.get(t).copied().unwrap_or(0),
            );
            self.surplus_rounds
                .insert(k, persistence.surplus_rounds.get(t).copied().unwrap_or(0));
        }
        let no_warm: BTreeSet<usize> = decision.steered.keys().copied().collect();
        let warm = Distribution {
            snap,
            gpus,
            tier_of: &decision.tier_of,
            no_warm: &no_warm,
            previous: &previous,
            desired: &desired,
        }
        .run();
        (decision, warm, peak)
    }

    /// The proposals of one region: every GPU whose new plan differs from the one sent, or
    /// whose steering changes.
    pub(super) fn propose(
        &self,
        snap: &Snapshot<'_>,
        gpus: &[usize],
        decision: &ProfileDecision,
        warm: &WarmByGpu,
        proposals: &mut Vec<Proposal>,
        retier: &mut Vec<(usize, Option<TierName>, GpuPlan)>,
    ) {
        let empty = BTreeMap::new();
        for &gi in gpus {
            let Some(g) = snap.gpu(gi) else { continue };
            let tier = match g.mode() {
                GpuMode::EqualSize => decision.tier_of.get(&gi).copied().flatten(),
                _ => None,
            };
            let entries = warm.get(&gi).unwrap_or(&empty);
            let intent = self.intents.get(&g.key);
            let steering = decision.new_steers.contains(&gi) || decision.released.contains(&gi);
            // Most GPUs of a large fleet are neither planned nor changing: what they hold is
            // their plan, and nothing needs building.
            let implied = if g.held() > 0 { g.observed_tier } else { None };
            if intent.is_none() && entries.is_empty() && !steering && tier == implied {
                continue;
            }
            let plan = build_plan(snap, g, tier, entries);
            let baseline_plan;
            let current = match intent {
                Some(i) => &i.plan,
                None => {
                    baseline_plan = baseline(snap, g);
                    &baseline_plan
                }
            };
            let tier_name = tier.and_then(|t| snap.tiers.get(t).cloned());
            let old_tier = match intent {
                Some(i) => i.tier.clone(),
                None => implied.and_then(|t| snap.tiers.get(t).cloned()),
            };
            let steer = if decision.new_steers.contains(&gi) {
                decision.steered.get(&gi).and_then(|s| {
                    Some(SteerChange::Away(Steer {
                        from: snap.tiers.get(s.from)?.clone(),
                        to: snap.tiers.get(s.to)?.clone(),
                    }))
                })
            } else if decision.released.contains(&gi) {
                Some(SteerChange::Back)
            } else {
                None
            };
            let plan_changed = &plan != current;
            if !plan_changed && steer.is_none() {
                if old_tier != tier_name {
                    retier.push((gi, tier_name, plan));
                }
                continue;
            }
            let adds = total_warm(&plan) > total_warm(current)
                || (tier_name.is_some() && tier_name != old_tier);
            let class = if decision.urgent.contains(&gi)
                || (adds && !matches!(steer, Some(SteerChange::Away(_))))
            {
                0
            } else if steer.is_some() {
                1
            } else {
                2
            };
            proposals.push(Proposal {
                gi,
                tier: tier_name,
                plan,
                plan_changed,
                steer,
                class,
            });
        }
    }

    /// Takes the most urgent proposals up to the round's limit and records them as intent.
    /// Returns the changes made and the nodes whose plan changed.
    pub(super) fn apply(
        &mut self,
        snap: &Snapshot<'_>,
        mut proposals: Vec<Proposal>,
        retier: Vec<(usize, Option<TierName>, GpuPlan)>,
        idle_rounds: BTreeMap<GpuKey, u32>,
    ) -> (usize, BTreeSet<NodeId>) {
        proposals.sort_by_key(|p| (p.class, p.gi));
        proposals.truncate(self.config.max_changes_per_round);
        let mut nodes = BTreeSet::new();
        let changes = proposals.len();
        for p in proposals {
            let Some(g) = snap.gpu(p.gi) else { continue };
            let reprofiles = g.mode() == GpuMode::EqualSize
                && g.held() == 0
                && g.view.profile.is_some()
                && p.plan.profile.is_some()
                && p.plan.profile != g.view.profile
                && !matches!(p.steer, Some(SteerChange::Back));
            match p.steer {
                Some(SteerChange::Away(s)) => {
                    self.counters.steered += 1;
                    self.steering.insert(g.key.clone(), s);
                    self.idle_rounds.remove(&g.key);
                }
                Some(SteerChange::Back) => {
                    self.steering.remove(&g.key);
                    self.idle_rounds.remove(&g.key);
                }
                None => {}
            }
            self.counters.steered += u64::from(reprofiles);
            if p.plan_changed {
                nodes.insert(g.key.0.clone());
            }
            self.intents.insert(
                g.key.clone(),
                GpuIntent {
                    tier: p.tier,
                    plan: p.plan,
                },
            );
        }
        for (gi, tier, plan) in retier {
            let Some(g) = snap.gpu(gi) else { continue };
            match self.intents.get_mut(&g.key) {
                Some(i) => i.tier = tier,
                None => {
                    self.intents.insert(g.key.clone(), GpuIntent { tier, plan });
                }
            }
        }
        for (key, r) in idle_rounds {
            if self.steering.contains_key(&key) {
                self.idle_rounds.insert(key, r);
            }
        }
        (changes, nodes)
    }

    /// The pool plans to send: nodes whose plan changed, and nodes whose agent restarted since
    /// it was sent one. Each lists every GPU of its node.
    pub(super) fn emit(
        &mut self,
        snap: &Snapshot<'_>,
        changed: &BTreeSet<NodeId>,
    ) -> Vec<(NodeId, PoolPlan)> {
        let mut nodes: Vec<&SGpu<'_>> = Vec::new();
        let mut to_send: BTreeSet<&NodeId> = changed.iter().collect();
        for g in &snap.gpus {
            let n = &g.node.node_id;
            if g.usable
                && self
                    .sent_to
                    .get(n)
                    .is_some_and(|&sent| sent != g.node.generation)
            {
                to_send.insert(n);
            }
            nodes.push(g);
        }
        if to_send.is_empty() {
            return Vec::new();
        }
        self.generation = self.generation.saturating_add(1);
        let generation = self.generation;
        let mut plans: BTreeMap<NodeId, (u64, Vec<GpuPlan>)> = BTreeMap::new();
        let mut order: Vec<NodeId> = Vec::new();
        for g in nodes {
            let n = &g.node.node_id;
            if !to_send.contains(n) {
                continue;
            }
            let plan = match self.intents.get_mut(&g.key) {
                // A plan that was not to change this round rides along as it was sent, its
                // warm instances cut to what the GPU holds now: sessions may have filled it
                // since. The agent would keep to its free slots anyway, so this is no change.
                Some(i) => {
                    i.plan = fit_to_gpu(snap, g, &i.plan);
                    i.plan.clone()
                }
                None => {
                    let plan = baseline(snap, g);
                    if g.usable {
                        let tier = if g.held() > 0 {
                            g.observed_tier.and_then(|t| snap.tiers.get(t).cloned())
                        } else {
                            None
                        };
                        self.intents.insert(
                            g.key.clone(),
                            GpuIntent {
                                tier,
                                plan: plan.clone(),
                            },
                        );
                    }
                    plan
                }
            };
            let e = plans.entry(n.clone()).or_insert_with(|| {
                order.push(n.clone());
                (g.node.generation, Vec::new())
            });
            e.1.push(plan);
        }
        order
            .into_iter()
            .filter_map(|n| {
                let (agent_generation, gpus) = plans.remove(&n)?;
                self.sent_to.insert(n.clone(), agent_generation);
                Some((
                    n,
                    PoolPlan {
                        plan_generation: generation,
                        gpus,
                    },
                ))
            })
            .collect()
    }

    /// Steering the engine must apply: intents it does not have yet, and steering it has that
    /// the planner no longer wants (or never did: a planner restarted).
    pub(super) fn steering_to_apply(&self, snap: &Snapshot<'_>) -> (Vec<GpuKey>, Vec<GpuKey>) {
        let mut away = Vec::new();
        let mut back = Vec::new();
        for g in &snap.gpus {
            let wanted = self.steering.contains_key(&g.key);
            if wanted && !g.view.steered {
                away.push(g.key.clone());
            } else if !wanted && g.view.steered {
                back.push(g.key.clone());
            }
        }
        (away, back)
    }

    pub(super) fn targets(
        &self,
        snap: &Snapshot<'_>,
        forecasts: &BTreeMap<DemandKey, Forecast>,
    ) -> Vec<TargetView> {
        let mut region_of: FxHashMap<&GpuKey, &RegionName> = FxHashMap::default();
        let mut observed: BTreeMap<DemandKey, u32> = BTreeMap::new();
        for g in &snap.gpus {
            region_of.insert(&g.key, g.region());
            for (game, tier) in &g.view.warm {
                let k = DemandKey::new(g.region().clone(), tier.clone(), game.clone());
                *observed.entry(k).or_default() += 1;
            }
        }
        let mut planned: BTreeMap<DemandKey, u32> = BTreeMap::new();
        for (key, i) in &self.intents {
            let Some(region) = region_of.get(key) else {
                continue;
            };
            for w in &i.plan.warm {
                let k = DemandKey::new((*region).clone(), w.tier.clone(), w.game.clone());
                *planned.entry(k).or_default() += u32::from(w.count);
            }
        }
        forecasts
            .iter()
            .map(|(k, f)| {
                let d = self.demand.get(k);
                TargetView {
                    key: k.clone(),
                    forecast_rate: f.rates.forecast(),
                    short_rate: f.rates.short,
                    long_rate: f.rates.long,
                    profile_rate: f.rates.profile,
                    mean_session_s: f.length_s,
                    desired_warm: f.desired,
                    planned_warm: planned.get(k).copied().unwrap_or(0),
                    observed_warm: observed.get(k).copied().unwrap_or(0),
                    queued: f.tier.map_or(0, |t| {
                        snap.queued
                            .get(&(k.region.clone(), t, k.game.clone()))
                            .copied()
                            .unwrap_or(0)
                    }),
                    warm_hits: d.map_or(0, |d| d.warm_hits),
                    cold_starts: d.map_or(0, |d| d.cold_starts),
                }
            })
            .collect()
    }

    pub(super) fn profile_views(&self, snap: &Snapshot<'_>) -> Vec<ProfileView> {
        let mut views: BTreeMap<(&RegionName, &str, usize), ProfileView> = BTreeMap::new();
        for g in snap.gpus.iter().filter(|g| g.usable) {
            if g.mode() != GpuMode::EqualSize {
                continue;
            }
            let Some(model) = g.model else { continue };
            let planned = self
                .intents
                .get(&g.key)
                .and_then(|i| i.tier.as_ref())
                .and_then(|t| snap.tier(t))
                .or(if g.held() > 0 { g.observed_tier } else { None });
            let steered = self.steering.get(&g.key).and_then(|s| snap.tier(&s.from));
            let mut bump = |t: usize, f: &mut dyn FnMut(&mut ProfileView)| {
                let (Some(tier), Some(fit)) = (snap.tiers.get(t), model.tiers.get(t)) else {
                    return;
                };
                let v = views
                    .entry((g.region(), model.model.as_str(), t))
                    .or_insert_with(|| ProfileView {
                        region: g.region().clone(),
                        model: model.model.clone(),
                        tier: tier.clone(),
                        profile: fit.equal.as_ref().map(|p| p.profile.clone()),
                        gpus_planned: 0,
                        gpus_observed: 0,
                        gpus_steered: 0,
                    });
                f(v);
            };
            if let Some(t) = planned {
                bump(t, &mut |v| v.gpus_planned += 1);
            }
            if let Some(t) = g.observed_tier {
                bump(t, &mut |v| v.gpus_observed += 1);
            }
            if let Some(t) = steered {
                bump(t, &mut |v| v.gpus_steered += 1);
            }
        }
        views.into_values().collect()
    }
}

/// Adds the forecast peak of regions with demand but no usable GPU to `need_peak`: they still
/// count towards the recommendation.
pub(super) fn add_unserved_peaks(
    snap: &Snapshot<'_>,
    forecasts: &BTreeMap<DemandKey, Forecast>,
    need_peak: &mut BTreeMap<RegionName, Vec<f64>>,
) {
    for (key, f) in forecasts {
        let (Some(t), false) = (f.tier, snap.regions.contains_key(&key.region)) else {
            continue;
        };
        let v = need_peak
            .entry(key.region.clone())
            .or_insert_with(|| vec![0.0; snap.tiers.len()]);
        if let Some(n) = v.get_mut(t) {
            *n += f.rate_peak * f.length_s + f64::from(f.desired_peak);
        }
    }
}

/// A raw buffer rounded up within `b`.
fn buffer_of_raw(raw: f64, b: WarmBounds) -> u16 {
    u16::try_from(ceil_u32(raw))
        .unwrap_or(u16::MAX)
        .max(b.min)
        .min(b.max.max(b.min))
}

/// `plan` with its warm instances cut, last ones first, to what `g` holds beside its sessions.
fn fit_to_gpu(snap: &Snapshot<'_>, g: &SGpu<'_>, plan: &GpuPlan) -> GpuPlan {
    let mut out = plan.clone();
    let equal_free = if g.held() > 0 && plan.profile != g.view.profile {
        0
    } else {
        plan.vgpus.saturating_sub(g.held())
    };
    // Equal-size: every warm instance is of the tier of the GPU's profile.
    let mut room = match (g.mode(), out.warm.first().and_then(|w| snap.tier(&w.tier))) {
        (GpuMode::EqualSize, Some(tier)) => warm::Room::Equal {
            tier,
            free: equal_free,
        },
        (GpuMode::EqualSize, None) => warm::Room::None,
        _ => warm::Room::of(g, None),
    };
    for w in &mut out.warm {
        let Some(t) = snap.tier(&w.tier) else {
            w.count = 0;
            continue;
        };
        let mut kept = 0;
        while kept < w.count && room.take(g, t) {
            kept += 1;
        }
        w.count = kept;
    }
    out.warm.retain(|w| w.count > 0);
    out
}

/// Warm instances a plan asks for.
fn total_warm(plan: &GpuPlan) -> u32 {
    plan.warm.iter().map(|w| u32::from(w.count)).sum()
}

/// What `g` holds now, as a plan with no warm instances: its observed profile and slots.
fn baseline(snap: &Snapshot<'_>, g: &SGpu<'_>) -> GpuPlan {
    let tier = if g.held() > 0 { g.observed_tier } else { None };
    build_plan(snap, g, tier, &BTreeMap::new())
}

/// The plan for `g`: planned for `tier` (equal-size) with `warm` instances per (game, tier).
fn build_plan(
    snap: &Snapshot<'_>,
    g: &SGpu<'_>,
    tier: Option<usize>,
    warm: &BTreeMap<(GameId, usize), u16>,
) -> GpuPlan {
    let targets: Vec<WarmTarget> = warm
        .iter()
        .filter(|(_, n)| **n > 0)
        .filter_map(|((game, t), &count)| {
            Some(WarmTarget {
                game: game.clone(),
                tier: snap.tiers.get(*t)?.clone(),
                count,
            })
        })
        .collect();
    let (profile, vgpus) = match g.mode() {
        GpuMode::EqualSize => {
            let fit = tier.and_then(|t| g.fit(t)?.equal.as_ref());
            match fit {
                // A GPU with sessions keeps its profile, whatever the plan.
                Some(p) if g.held() == 0 || g.view.profile.as_deref() == Some(&p.profile) => {
                    (Some(p.profile.clone()), p.instances)
                }
                _ => {
                    let vgpus = if g.view.profile.is_some() {
                        g.view.slots
                    } else {
                        0
                    };
                    (g.view.profile.clone(), vgpus)
                }
            }
        }
        GpuMode::MixedSize | GpuMode::Mig => {
            // The wire plan names one profile per GPU: the one most of its instances use.
            let mut per_profile: BTreeMap<&str, u16> = BTreeMap::new();
            for ((_, t), &n) in warm {
                if let Some(p) = g.profile_fit(*t) {
                    *per_profile.entry(&p.profile).or_default() += n;
                }
            }
            for (t, &n) in g.held_by_tier.iter().enumerate() {
                if let (Some(p), true) = (g.profile_fit(t), n > 0) {
                    *per_profile.entry(&p.profile).or_default() += n;
                }
            }
            per_profile
                .into_iter()
                .max_by(|a, b| a.1.cmp(&b.1).then_with(|| b.0.cmp(a.0)))
                .map_or((None, 0), |(p, n)| (Some(p.to_owned()), n))
        }
        GpuMode::Exclusive => (None, 0),
    };
    GpuPlan {
        gpu: g.view.gpu.clone(),
        mode: g.mode(),
        profile,
        vgpus,
        warm: targets,
    }
}
