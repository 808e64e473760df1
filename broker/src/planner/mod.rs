//! The pool planner: how each GPU is sliced and how many warm game instances of each game and
//! tier wait on it, so a player almost never waits for a game to launch and few GPUs idle.
//!
//! A sans-IO core like the [placement engine](crate::placement): every call takes `now`, and
//! [`Planner::round`] reads the engine (never changes it) and returns what to tell the agents.
//! Each round reconciles intent (the plans sent) with what the engine observes:
//!
//! - demand: per (region, tier, game), arrival rates as exponentially weighted
//!   averages over a short and a long window, a daily profile of 24 hour-of-day buckets, and
//!   the mean session length; the forecast is the largest of them;
//! - warm buffer: the arrivals expected during one instance launch plus `safety_z` standard
//!   deviations, within the configured bounds;
//! - profile plan: equal-size GPUs per tier by Little's law (forecast rate × mean session
//!   length, plus the warm buffer, over the sessions one GPU holds); empty GPUs take tiers in
//!   deficit, and when none are left, GPUs of a tier in lasting surplus with the fewest
//!   sessions are steered away ([`Engine::steer_away`]) until their sessions end — no session
//!   is ever evicted;
//! - warm placement on GPUs with room: equal-size GPUs of the tier, then mixed-size, MIG and
//!   exclusive GPUs within their framebuffer, slice and instance rules;
//! - at most [`PlannerConfig::max_changes_per_round`] GPUs change per round;
//! - a recommendation of nodes per region and GPU model for the forecast peak.
//!
//! A driver (the broker service, the load-test simulator) calls [`Planner::round`] every
//! [`PlannerConfig::round_every`], applies [`Round::steer_away`] and [`Round::steer_back`] to
//! the engine ([`Round::apply_steering`]) and sends each [`Round::plans`] entry to its node.

mod demand;
mod fleet;
mod profiles;
mod recommend;
mod round;
mod warm;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::time::Duration;

use rustc_hash::FxHashMap;
use serde::Serialize;

use framecast_shared::ids::{GameId, GpuId, NodeId, RegionName, TierName};
use framecast_shared::protocol::{GpuPlan, PoolPlan};
use framecast_shared::time::Timestamp;

use crate::placement::{Engine, EngineError};

use demand::DemandState;
use fleet::{GpuKey, Snapshot};

/// The mean session length assumed for a demand until sessions of it, of its region and tier,
/// of its region or anywhere have been seen to end.
pub const DEFAULT_SESSION_LENGTH: Duration = Duration::from_secs(30 * 60);

/// The planner's knobs.
#[derive(Debug, Clone, PartialEq)]
pub struct PlannerConfig {
    /// How often the driver runs a round.
    pub round_every: Duration,
    /// Time constant of the short arrival-rate average: catches a rise fast.
    pub short_window: Duration,
    /// Time constant of the long arrival-rate average: keeps the buffer through a dip.
    pub long_window: Duration,
    /// How long a game instance takes to start.
    pub launch_time: Duration,
    /// Standard deviations of arrivals during one launch added to the warm buffer.
    pub safety_z: f64,
    /// Fewest warm instances per (region, tier, game) with any demand seen.
    pub min_warm: u16,
    /// Most warm instances per (region, tier, game).
    pub max_warm: u16,
    /// Most GPUs whose plan (warm targets, profile) or steering changes in one round.
    pub max_changes_per_round: usize,
    /// Rounds a deficit and a surplus must last before a GPU is steered away, a steered GPU's
    /// new tier must not need it before it is steered back, and a lower warm buffer must last
    /// before warm instances are cut.
    pub hysteresis_rounds: u32,
    /// Learn a daily profile (24 hour-of-day buckets, UTC) and plan for its rate ahead.
    pub daily_profile: bool,
}

/// The defaults of `[planner]` in `broker.toml`: one set of defaults for the service, the
/// simulator and the tests.
impl Default for PlannerConfig {
    fn default() -> Self {
        Self::from(&framecast_shared::config::planner::PlannerConfig::default())
    }
}

/// The core's settings from `[planner]` (its webhook settings are the service's).
impl From<&framecast_shared::config::planner::PlannerConfig> for PlannerConfig {
    fn from(s: &framecast_shared::config::planner::PlannerConfig) -> Self {
        Self {
            round_every: s.round_every(),
            short_window: s.short_window(),
            long_window: s.long_window(),
            launch_time: s.launch_time(),
            safety_z: s.safety_z,
            min_warm: s.min_warm,
            max_warm: s.max_warm,
            max_changes_per_round: usize::try_from(s.max_changes_per_round).unwrap_or(usize::MAX),
            hysteresis_rounds: s.hysteresis_rounds,
            daily_profile: s.daily_profile,
        }
    }
}

/// A planner setting out of its allowed range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("planner setting `{field}` {reason}")]
pub struct PlannerConfigError {
    /// The field.
    pub field: &'static str,
    /// What it must be.
    pub reason: &'static str,
}

impl PlannerConfig {
    /// Checks every field's range. The planner never panics on a bad value (it clamps), but a
    /// configuration should say what is wrong at start.
    pub fn validate(&self) -> Result<(), PlannerConfigError> {
        let bad = |field, reason| Err(PlannerConfigError { field, reason });
        if self.round_every.is_zero() {
            return bad("round_every", "must be positive");
        }
        if self.short_window.is_zero() {
            return bad("short_window", "must be positive");
        }
        if self.long_window < self.short_window {
            return bad("long_window", "must be at least short_window");
        }
        if self.launch_time.is_zero() {
            return bad("launch_time", "must be positive");
        }
        if !self.safety_z.is_finite() || !(0.0..=10.0).contains(&self.safety_z) {
            return bad("safety_z", "must be between 0 and 10");
        }
        if self.min_warm > self.max_warm {
            return bad("min_warm", "must not exceed max_warm");
        }
        if self.max_changes_per_round == 0 {
            return bad("max_changes_per_round", "must be at least 1");
        }
        Ok(())
    }
}

/// What demand is counted by: region, tier and game.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct DemandKey {
    /// The region.
    pub region: RegionName,
    /// The tier.
    pub tier: TierName,
    /// The game.
    pub game: GameId,
}

impl DemandKey {
    /// The key of `region`, `tier` and `game`.
    pub fn new(region: RegionName, tier: TierName, game: GameId) -> Self {
        Self { region, tier, game }
    }
}

/// Bounds on the warm buffer of a tier (or of one game at a tier), overriding
/// [`PlannerConfig::min_warm`] and [`PlannerConfig::max_warm`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct WarmBounds {
    /// Fewest warm instances.
    pub min: u16,
    /// Most warm instances.
    pub max: u16,
}

/// The pool planner. See the [module documentation](self).
#[derive(Debug, Clone)]
pub struct Planner {
    config: PlannerConfig,
    bounds: BTreeMap<(TierName, Option<GameId>), WarmBounds>,
    demand: BTreeMap<DemandKey, DemandState>,
    /// The plan each GPU was last sent, and the tier it was planned for.
    intents: FxHashMap<GpuKey, GpuIntent>,
    /// Per node, the agent generation that has our plan.
    sent_to: BTreeMap<NodeId, u64>,
    steering: FxHashMap<GpuKey, Steer>,
    /// Rounds each steered GPU has not been needed for its new tier.
    idle_rounds: FxHashMap<GpuKey, u32>,
    /// Per region and tier: rounds a deficit empty GPUs could not cover has lasted.
    deficit_rounds: BTreeMap<(RegionName, TierName), u32>,
    /// Per region and tier: rounds the tier could have spared a GPU.
    surplus_rounds: BTreeMap<(RegionName, TierName), u32>,
    generation: u64,
    counters: PlannerCounters,
}

#[derive(Debug, Clone)]
struct GpuIntent {
    tier: Option<TierName>,
    plan: GpuPlan,
}

#[derive(Debug, Clone)]
struct Steer {
    from: TierName,
    to: TierName,
}

/// What one round decided.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Round {
    /// The plan generation: increases with every round that sends a plan.
    pub generation: u64,
    /// Pool plans for the nodes whose plan changed (or whose agent restarted and lost it),
    /// each with an entry for every GPU of the node and `plan_generation` = `generation`.
    pub plans: Vec<(NodeId, PoolPlan)>,
    /// GPUs that must take no new session (so they empty and can change profile); apply with
    /// [`Engine::steer_away`]`(.., true)`. Lists again any the engine does not have steered.
    pub steer_away: Vec<(NodeId, GpuId)>,
    /// GPUs released from steering; apply with [`Engine::steer_away`]`(.., false)`.
    pub steer_back: Vec<(NodeId, GpuId)>,
    /// Per demand key: forecast, warm buffer and what is planned and observed.
    pub targets: Vec<TargetView>,
    /// Per region, GPU model and tier: equal-size GPUs planned and observed with its profile.
    pub profiles: Vec<ProfileView>,
    /// Per region and GPU model: nodes the forecast peak needs.
    pub recommendation: Vec<Recommendation>,
    /// GPUs whose plan or steering changed this round (at most `max_changes_per_round`).
    pub changes: usize,
}

impl Round {
    /// Applies the round's steering to `engine`. Every entry is tried; the first error (a GPU
    /// that left since the round) is returned.
    pub fn apply_steering(&self, engine: &mut Engine) -> Result<(), EngineError> {
        let mut first = Ok(());
        let steps = self
            .steer_away
            .iter()
            .map(|s| (s, true))
            .chain(self.steer_back.iter().map(|s| (s, false)));
        for ((node, gpu), on) in steps {
            if let Err(e) = engine.steer_away(node, gpu, on)
                && first.is_ok()
            {
                first = Err(e);
            }
        }
        first
    }
}

/// The planner's view of one (region, tier, game).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TargetView {
    /// The region, tier and game (flattened into this object when serialized).
    #[serde(flatten)]
    pub key: DemandKey,
    /// Arrivals per second planned for over the next launch window: the largest of the two
    /// averages and the daily profile.
    pub forecast_rate: f64,
    /// The short-window average, arrivals per second.
    pub short_rate: f64,
    /// The long-window average, arrivals per second.
    pub long_rate: f64,
    /// The daily profile's rate over the next launch window, where learned and enabled.
    pub profile_rate: Option<f64>,
    /// Mean session length used, seconds.
    pub mean_session_s: f64,
    /// Warm instances wanted.
    pub desired_warm: u16,
    /// Warm instances the plans sent ask for.
    pub planned_warm: u32,
    /// Idle warm instances the engine knows of (from the agents' reports).
    pub observed_warm: u32,
    /// Requests waiting.
    pub queued: u32,
    /// Placements onto a warm instance.
    pub warm_hits: u64,
    /// Placements that had to launch an instance.
    pub cold_starts: u64,
}

/// Equal-size GPUs of one model in one region holding one tier's profile.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ProfileView {
    /// The region.
    pub region: RegionName,
    /// The GPU model.
    pub model: String,
    /// The tier.
    pub tier: TierName,
    /// The profile serving the tier on the model.
    pub profile: Option<String>,
    /// GPUs the plan gives the profile.
    pub gpus_planned: u32,
    /// GPUs holding the profile now (as agents report it).
    pub gpus_observed: u32,
    /// GPUs of the profile steered away to empty for another tier.
    pub gpus_steered: u32,
}

/// Nodes one region needs of one GPU model for the forecast peak, with the warm buffer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Recommendation {
    /// The region.
    pub region: RegionName,
    /// The GPU model.
    pub model: String,
    /// GPUs of the model the peak needs.
    pub gpus_needed: u32,
    /// GPUs of the model usable now.
    pub gpus_present: u32,
    /// Nodes the peak needs (`gpus_needed` over `gpus_per_node`, rounded up).
    pub nodes_needed: u32,
    /// Nodes with the model taking sessions now.
    pub nodes_present: u32,
    /// GPUs per node of the model, as the fleet has them.
    pub gpus_per_node: u32,
}

/// Running totals.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct PlannerCounters {
    /// Placements onto a warm instance.
    pub warm_hits: u64,
    /// Placements that had to launch an instance.
    pub cold_starts: u64,
    /// Re-profiles started: GPUs steered away, and empty GPUs planned from one profile to
    /// another.
    pub steered: u64,
    /// Rounds run.
    pub rounds: u64,
}

impl PlannerCounters {
    /// Share of placements that found a warm instance, once there was one.
    pub fn warm_hit_ratio(&self) -> Option<f64> {
        let all = self.warm_hits + self.cold_starts;
        (all > 0).then(|| self.warm_hits as f64 / all as f64)
    }
}

impl Planner {
    /// A planner with `config` and no demand seen.
    pub fn new(config: PlannerConfig) -> Self {
        Self {
            config,
            bounds: BTreeMap::new(),
            demand: BTreeMap::new(),
            intents: FxHashMap::default(),
            sent_to: BTreeMap::new(),
            steering: FxHashMap::default(),
            idle_rounds: FxHashMap::default(),
            deficit_rounds: BTreeMap::new(),
            surplus_rounds: BTreeMap::new(),
            generation: 0,
            counters: PlannerCounters::default(),
        }
    }

    /// Its configuration.
    pub fn config(&self) -> &PlannerConfig {
        &self.config
    }

    /// Bounds the warm buffer of `tier` (every game, or only `game`) to `bounds`, overriding
    /// the configured `min_warm`/`max_warm`; a game's bounds win over its tier's.
    pub fn set_warm_bounds(&mut self, tier: TierName, game: Option<GameId>, bounds: WarmBounds) {
        self.bounds.insert((tier, game), bounds);
    }

    /// Counts a request for `key` at `now` (placed, queued or rejected alike: it is demand).
    pub fn observe_request(&mut self, key: &DemandKey, now: Timestamp) {
        let (short, long) = (self.config.short_window, self.config.long_window);
        self.state(key).request(now, short, long);
    }

    /// Counts a placement for `key`: onto a warm instance (`warm`) or one that must launch.
    pub fn observe_placement(&mut self, key: &DemandKey, warm: bool, now: Timestamp) {
        let d = self.state(key);
        d.profile.roll(now);
        if warm {
            d.warm_hits += 1;
            self.counters.warm_hits += 1;
        } else {
            d.cold_starts += 1;
            self.counters.cold_starts += 1;
        }
    }

    /// Counts a session of `key` that ended after `length`.
    pub fn observe_session_end(&mut self, key: &DemandKey, length: Duration, now: Timestamp) {
        let d = self.state(key);
        d.profile.roll(now);
        d.session_end(length);
    }

    /// Running totals.
    pub fn counters(&self) -> PlannerCounters {
        self.counters
    }

    /// The newest plan generation sent.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Makes the next plan's generation greater than `at_least`. Agents keep the newest plan
    /// generation they applied across broker restarts and apply only newer ones, while a new
    /// planner counts from 1: a driver either offsets the generation on the wire (as the
    /// service does, from the wall clock) or raises it here past what agents report
    /// ([`PoolNodeView::plan_generation`](crate::placement::views::PoolNodeView)).
    pub fn raise_generation(&mut self, at_least: u64) {
        self.generation = self.generation.max(at_least);
    }

    fn state(&mut self, key: &DemandKey) -> &mut DemandState {
        self.demand.entry(key.clone()).or_default()
    }

    /// One reconcile round against the engine's fleet: forecasts demand, plans each region's
    /// equal-size profiles and warm instances, and returns the plans that changed (at most
    /// `max_changes_per_round` GPUs), steering, and views. Reads the engine; the caller applies
    /// the steering ([`Round::apply_steering`]) and sends the plans.
    pub fn round(&mut self, engine: &Engine, now: Timestamp) -> Round {
        self.counters.rounds += 1;
        let view = engine.pool_view();
        let snap = Snapshot::new(&view);
        self.forget_unusable(&snap);
        let forecasts = self.forecasts(&snap, now);

        let mut proposals = Vec::new();
        let mut retier: Vec<(usize, Option<TierName>, GpuPlan)> = Vec::new();
        let mut idle_rounds: BTreeMap<GpuKey, u32> = BTreeMap::new();
        let mut need_peak: BTreeMap<RegionName, Vec<f64>> = BTreeMap::new();
        for (region, gpus) in &snap.regions {
            let (decision, warm, peak) = self.plan_region(&snap, region, gpus, &forecasts);
            need_peak.insert(region.clone(), peak);
            for (&gi, &r) in &decision.idle_rounds {
                if let Some(g) = snap.gpu(gi) {
                    idle_rounds.insert(g.key.clone(), r);
                }
            }
            self.propose(&snap, gpus, &decision, &warm, &mut proposals, &mut retier);
        }
        round::add_unserved_peaks(&snap, &forecasts, &mut need_peak);

        let (changes, changed_nodes) = self.apply(&snap, proposals, retier, idle_rounds);
        let plans = self.emit(&snap, &changed_nodes);
        let (steer_away, steer_back) = self.steering_to_apply(&snap);
        Round {
            generation: self.generation,
            plans,
            steer_away,
            steer_back,
            targets: self.targets(&snap, &forecasts),
            profiles: self.profile_views(&snap),
            recommendation: recommend::recommend(&snap, &need_peak),
            changes,
        }
    }
}
