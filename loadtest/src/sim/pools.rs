//! Warm game instances in the `sim` engine: one simulated node agent per node that keeps the
//! warm instances its pool plan asks for, and the policies that write those plans (`fixed`,
//! the baseline, and `planner`, the broker's pool planner).
//!
//! The agent does what `framecast-agent` does with a [`PoolPlan`]: per GPU it starts the warm
//! instances of each (game, tier) the plan asks for in free slots of the GPU's profile (the
//! highest free slot first, so the engine, which fills a GPU from its lowest free slot, takes
//! them last), reports each once it is ready `launch_s` later through a heartbeat, and starts a
//! replacement when a player takes one. An equal-size GPU whose plan names another profile
//! takes it once no session is left on it (the planner steers it away from new sessions so it
//! drains).
//!
//! A player placed on a ready warm instance of its game and tier (`Placement::warm`) starts at
//! once: a warm hit. Any other placement is a cold start: the player waits for the game to
//! launch, holding the slot meanwhile; one placed on a slot where an instance of its game and
//! tier is still starting waits only for the rest of that start, and an instance of anything
//! else there is stopped.

use std::time::Duration;

use hdrhistogram::Histogram;
use rustc_hash::FxHashMap;

use framecast_broker::placement::catalog::{ProfileIdx, TierIdx};
use framecast_broker::placement::fleet::{Fleet, Gpu, GpuIdx, NodeIdx, Slot};
use framecast_broker::placement::{Engine, Placement};
use framecast_broker::planner::{DemandKey, Planner};
use framecast_shared::gpu::GpuMode;
use framecast_shared::ids::{GameId, GpuId, NodeId, RegionName, TierName};
use framecast_shared::protocol::{GpuUsage, Heartbeat, PoolPlan, WarmInstance};
use framecast_shared::time::Timestamp;
use framecast_shared::units::{EncoderUnits, Megabytes};

use super::calendar::Calendar;
use super::{Event, SimError};
use crate::report::{Percentiles, Report, Sample};
use crate::scenario::{PoolPolicy, Scenario};

/// The warm pools of a run whose policy is not `none`.
pub(super) struct Pools {
    policy: Policy,
    /// How long a game instance takes to start, ms.
    launch_ms: u64,
    /// How often the plan is made again, ms.
    round_every_ms: u64,
    /// (tier, game) pairs seen, by [`Key`].
    keys: Vec<KeyInfo>,
    key_idx: FxHashMap<(TierIdx, GameId), Key>,
    /// One per node of the engine's fleet, by its [`NodeIdx`].
    agents: Vec<Agent>,
    /// The fleet's regions, in the order of their first node.
    regions: Vec<RegionName>,
    /// Nodes whose ready warm instances changed since their last heartbeat.
    dirty: Vec<NodeIdx>,
    /// The last instance number given.
    serial: u32,
    tally: Tally,
    /// Cold-started players' waits for their game, ms.
    waits: Histogram<u64>,
}

/// A (tier, game) the pools keep warm instances of: an index into [`Pools::keys`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(super) struct Key(u16);

/// Where a placed session runs, as the agents know it: a node and the GPU's position on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Site {
    node: NodeIdx,
    gpu: u8,
}

/// What a run with warm pools found, for the report.
#[derive(Debug, Default)]
pub(super) struct PoolFigures {
    pub(super) policy: String,
    pub(super) warm_hits: u64,
    pub(super) cold_starts: u64,
    pub(super) unqueued: u64,
    pub(super) unqueued_hits: u64,
    pub(super) preempted: u64,
    pub(super) cold_start_wait_s: Percentiles,
    pub(super) reprofiles: u64,
}

#[derive(Debug, Default)]
struct Tally {
    warm_hits: u64,
    cold_starts: u64,
    /// Since the last sample.
    minute_hits: u64,
    minute_colds: u64,
    reprofiles: u64,
    /// Idle warm instances, starting ones included, and their framebuffer, MB.
    idle: u64,
    starting: u64,
    idle_fb_mb: u64,
    /// Framebuffer of the warm instances the engine holds (it counts them as used), MB.
    reported_fb_mb: u64,
    /// Ready instances the engine would not take (a session took the room first): stopped.
    refused: u64,
    /// Instances not yet reported whose slot a session of another game or tier took.
    preempted: u64,
    /// Starting instances a session of their game and tier took over.
    handed_over: u64,
    /// Placements of requests that did not queue, and the warm hits among them.
    unqueued: u64,
    unqueued_hits: u64,
}

struct KeyInfo {
    tier: TierName,
    tier_idx: TierIdx,
    game: GameId,
}

struct Agent {
    id: NodeId,
    /// Its region, an index into [`Pools::regions`].
    region: usize,
    /// False once the node is lost: it runs and reports nothing more.
    alive: bool,
    gpus: Vec<AgentGpu>,
    /// In [`Pools::dirty`].
    dirty: bool,
    seq: u64,
    /// The newest plan applied.
    plan_generation: Option<u64>,
}

struct AgentGpu {
    idx: GpuIdx,
    id: GpuId,
    /// Warm instances the plan asks for.
    targets: Vec<(Key, u16)>,
    /// The equal-size profile the plan asks for, if any.
    plan_profile: Option<ProfileIdx>,
    instances: Vec<Instance>,
    /// Its ready instances changed since the last heartbeat.
    dirty: bool,
}

#[derive(Debug, Clone, Copy)]
struct Instance {
    slot: u16,
    key: Key,
    serial: u32,
    /// When it is (or was) ready, ms into the run.
    ready_at: u64,
    ready: bool,
    /// The engine holds it as a warm slot.
    reported: bool,
    /// The framebuffer and MIG slices it holds.
    fb_mb: u64,
    slices: u16,
}

enum Policy {
    Fixed(Fixed),
    Planner(Box<Planner>),
}

/// The fixed-buffer baseline: `per_key` warm instances of every (tier, game) of the demand in
/// each region, on GPUs with room of the right profile, never re-profiled for them. Each round
/// tops the buffer up: a target on a GPU that has no room left moves to the next GPU (in fleet
/// order, from where the last search stopped) that has.
#[derive(Default)]
struct Fixed {
    per_key: u16,
    keys: Vec<Key>,
    regions: Vec<FixedRegion>,
}

struct FixedRegion {
    gpus: Vec<Site>,
    cursor: usize,
    /// Per entry of [`Fixed::keys`], the GPUs whose targets hold it.
    holders: Vec<Vec<Site>>,
}

/// The most GPUs the fixed buffer looks at to place one warm instance: a large region full of
/// GPUs without room would otherwise be scanned whole for every instance, every round.
const FIXED_SCAN: usize = 1024;

/// What kind of room a GPU has for a warm instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Room {
    /// It has the instance's profile already (or its mode needs none).
    Profiled,
    /// It is empty and would take the instance's profile.
    Empty,
}

/// How a placed player starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Start {
    /// At once: a warm instance of its game and tier was ready.
    Now,
    /// After this many ms: its game must launch first.
    After(u64),
}

impl Pools {
    /// Pools for `scenario`'s policy over the fleet `engine` holds; `None` for `none`.
    pub(super) fn new(scenario: &Scenario, engine: &Engine) -> Result<Option<Self>, SimError> {
        let setup = |e: &dyn std::fmt::Display| SimError::Setup(e.to_string());
        let fleet = engine.fleet();
        let mut regions: Vec<RegionName> = Vec::new();
        let mut agents = Vec::with_capacity(fleet.nodes.len());
        for node in &fleet.nodes {
            let region = fleet
                .catalog
                .region(node.region)
                .cloned()
                .ok_or_else(|| SimError::Setup("a node without a region".into()))?;
            let r = match regions.iter().position(|x| *x == region) {
                Some(r) => r,
                None => {
                    regions.push(region);
                    regions.len() - 1
                }
            };
            let gpus = node
                .gpus
                .iter()
                .filter_map(|&g| {
                    Some(AgentGpu {
                        idx: g,
                        id: fleet.gpu(g)?.id.clone(),
                        targets: Vec::new(),
                        plan_profile: None,
                        instances: Vec::new(),
                        dirty: false,
                    })
                })
                .collect::<Vec<_>>();
            if gpus.len() > usize::from(u8::MAX) {
                return Err(SimError::Setup(format!(
                    "{}: more GPUs than the simulated agent handles",
                    node.id
                )));
            }
            agents.push(Agent {
                id: node.id.clone(),
                region: r,
                alive: true,
                gpus,
                dirty: false,
                seq: 0,
                plan_generation: None,
            });
        }
        let mut pools = Self {
            policy: Policy::Fixed(Fixed::default()),
            launch_ms: scenario.pools.launch_s.saturating_mul(1000),
            round_every_ms: scenario.pools.round_every_s.saturating_mul(1000),
            keys: Vec::new(),
            key_idx: FxHashMap::default(),
            agents,
            regions,
            dirty: Vec::new(),
            serial: 0,
            tally: Tally::default(),
            waits: Histogram::<u64>::new(3).map_err(|e| setup(&e))?,
        };
        pools.policy = match scenario.pools.policy {
            PoolPolicy::None => return Ok(None),
            PoolPolicy::Fixed => Policy::Fixed(pools.fixed(scenario, fleet)?),
            PoolPolicy::Planner => {
                let config = scenario.pools.planner_config();
                config.validate().map_err(|e| setup(&e))?;
                Policy::Planner(Box::new(Planner::new(config)))
            }
        };
        Ok(Some(pools))
    }

    /// The fixed buffer's keys: every tier and genre of the demand's mix (each genre's game is
    /// `game-<genre>`, as [`crate::demand`] names it).
    fn fixed(&mut self, scenario: &Scenario, fleet: &Fleet) -> Result<Fixed, SimError> {
        let setup = |e: &dyn std::fmt::Display| SimError::Setup(e.to_string());
        let mut keys = Vec::new();
        for (tier, w) in &scenario.demand.tiers {
            if *w <= 0.0 {
                continue;
            }
            let tier = TierName::new(tier.as_str()).map_err(|e| setup(&e))?;
            for (genre, w) in &scenario.demand.genres {
                if *w <= 0.0 {
                    continue;
                }
                let game = GameId::new(format!("game-{genre}")).map_err(|e| setup(&e))?;
                if let Some(k) = self.key(fleet, &tier, &game) {
                    keys.push(k);
                }
            }
        }
        let mut regions: Vec<FixedRegion> = (0..self.regions.len())
            .map(|_| FixedRegion {
                gpus: Vec::new(),
                cursor: 0,
                holders: vec![Vec::new(); keys.len()],
            })
            .collect();
        for (n, agent) in self.agents.iter().enumerate() {
            let node = NodeIdx::try_from(n).map_err(|e| setup(&e))?;
            if let Some(r) = regions.get_mut(agent.region) {
                for g in 0..agent.gpus.len() {
                    let gpu = u8::try_from(g).map_err(|e| setup(&e))?;
                    r.gpus.push(Site { node, gpu });
                }
            }
        }
        Ok(Fixed {
            per_key: scenario.pools.fixed_per_key,
            keys,
            regions,
        })
    }

    /// The key of `tier` and `game`, interned on first sight; `None` for a tier the engine
    /// does not know.
    fn key(&mut self, fleet: &Fleet, tier: &TierName, game: &GameId) -> Option<Key> {
        let tier_idx = fleet.catalog.tier_idx(tier)?;
        if let Some(k) = self.key_idx.get(&(tier_idx, game.clone())) {
            return Some(*k);
        }
        let k = Key(u16::try_from(self.keys.len()).ok()?);
        self.keys.push(KeyInfo {
            tier: tier.clone(),
            tier_idx,
            game: game.clone(),
        });
        self.key_idx.insert((tier_idx, game.clone()), k);
        Some(k)
    }

    /// The key of a request for `tier` and `game`.
    pub(super) fn request_key(
        &mut self,
        engine: &Engine,
        tier: &TierName,
        game: &GameId,
    ) -> Option<Key> {
        self.key(engine.fleet(), tier, game)
    }

    /// A player of `key` from `region` asked for a session at `at` (the planner's demand).
    pub(super) fn observe_request(&mut self, region: &RegionName, key: Option<Key>, at: u64) {
        if let Policy::Planner(planner) = &mut self.policy
            && let Some(k) = key.and_then(|k| self.keys.get(usize::from(k.0)))
        {
            let key = DemandKey::new(region.clone(), k.tier.clone(), k.game.clone());
            planner.observe_request(&key, super::Sim::now(at));
        }
    }

    /// How often [`Pools::round`] runs, ms.
    pub(super) fn round_every_ms(&self) -> u64 {
        self.round_every_ms
    }

    /// A player was placed (`p`) at `at` for `key` (`None`: a tier or game without one), after
    /// queueing (`queued`) or not: where it runs and when it starts playing.
    pub(super) fn placed(
        &mut self,
        engine: &Engine,
        p: &Placement,
        key: Option<Key>,
        queued: bool,
        at: u64,
        calendar: &mut Calendar<Event>,
    ) -> (Option<Site>, Start) {
        let fleet = engine.fleet();
        // The tier served, in case it is not the one asked for.
        let key = match key {
            Some(k)
                if self
                    .keys
                    .get(usize::from(k.0))
                    .is_some_and(|i| i.tier == p.tier) =>
            {
                Some(k)
            }
            Some(k) => {
                let game = self.keys.get(usize::from(k.0)).map(|i| i.game.clone());
                game.and_then(|g| self.key(fleet, &p.tier, &g))
            }
            None => None,
        };
        let site = self.site(fleet, &p.node, &p.gpu);
        let mut start = Start::After(self.launch_ms);
        // The instance in the slot, if the agent runs one there.
        let taken = site.zip(u16::try_from(p.slot).ok()).and_then(|(s, slot)| {
            let g = self.gpu_mut(s)?;
            let i = g.instances.iter().position(|x| x.slot == slot)?;
            Some((s, g.instances.swap_remove(i)))
        });
        if let Some((s, inst)) = taken {
            if Some(inst.key) == key {
                // Ready: a warm hit, whether the engine chose it as one or the instance became
                // ready after the agent's last heartbeat.
                start = if inst.ready {
                    Start::Now
                } else {
                    self.tally.handed_over += 1;
                    Start::After(inst.ready_at.saturating_sub(at))
                };
            } else {
                // The engine did not know it (a reported one is a warm slot it hands out only
                // to its game and tier): the session's game replaces it.
                self.tally.preempted += 1;
                if inst.reported {
                    if let Some(g) = self.gpu_mut(s) {
                        g.dirty = true;
                    }
                    self.mark_dirty(s.node);
                }
            }
            self.forget(&inst);
        }
        if !queued {
            self.tally.unqueued += 1;
            self.tally.unqueued_hits += u64::from(start == Start::Now);
        }
        match start {
            Start::Now => {
                self.tally.warm_hits += 1;
                self.tally.minute_hits += 1;
            }
            Start::After(ms) => {
                self.tally.cold_starts += 1;
                self.tally.minute_colds += 1;
                let _ = self.waits.record(ms);
            }
        }
        if let Policy::Planner(planner) = &mut self.policy
            && let Some(k) = key.and_then(|k| self.keys.get(usize::from(k.0)))
        {
            let key = DemandKey::new(p.region.clone(), k.tier.clone(), k.game.clone());
            planner.observe_placement(&key, start == Start::Now, super::Sim::now(at));
        }
        if let Some(s) = site {
            // A replacement, and the GPU's profile may have changed under its instances.
            self.reconcile(fleet, s, at, calendar);
        }
        (site, start)
    }

    /// A session of `key` placed on `site` ended at `at` after holding its slot `held_ms`:
    /// the slot may make room for a warm instance.
    pub(super) fn ended(
        &mut self,
        engine: &Engine,
        site: Site,
        key: Option<Key>,
        held_ms: u64,
        at: u64,
        calendar: &mut Calendar<Event>,
    ) {
        if let Policy::Planner(planner) = &mut self.policy
            && let Some(k) = key.and_then(|k| self.keys.get(usize::from(k.0)))
            && let Some(region) = self
                .agents
                .get(to_usize(site.node))
                .and_then(|a| self.regions.get(a.region))
        {
            let key = DemandKey::new(region.clone(), k.tier.clone(), k.game.clone());
            planner.observe_session_end(&key, Duration::from_millis(held_ms), super::Sim::now(at));
        }
        self.reconcile(engine.fleet(), site, at, calendar);
    }

    /// Instance `serial` on GPU `gpu` of node `node` is ready.
    pub(super) fn ready(&mut self, node: NodeIdx, gpu: u8, serial: u32) {
        let site = Site { node, gpu };
        let Some(g) = self.gpu_mut(site) else {
            return;
        };
        let Some(inst) = g
            .instances
            .iter_mut()
            .find(|i| i.serial == serial && !i.ready)
        else {
            return;
        };
        inst.ready = true;
        g.dirty = true;
        self.tally.starting = self.tally.starting.saturating_sub(1);
        self.mark_dirty(node);
    }

    /// The node `node` stopped answering: its instances are gone, and it reports no more.
    pub(super) fn node_lost(&mut self, node: &NodeId) {
        let Some(a) = self.agents.iter_mut().find(|a| &a.id == node) else {
            return;
        };
        a.alive = false;
        let gone: Vec<Instance> = a
            .gpus
            .iter_mut()
            .flat_map(|g| std::mem::take(&mut g.instances))
            .collect();
        for inst in &gone {
            // The engine keeps the warm slots it was told of (and counts their framebuffer as
            // used), though nobody will take them: the node accepts no sessions.
            self.forget(&Instance {
                reported: false,
                ..*inst
            });
        }
    }

    /// Sends a heartbeat for every node whose ready warm instances changed, as its agent would
    /// (at most once a simulated second: this runs on the engine's tick).
    pub(super) fn heartbeats(
        &mut self,
        engine: &mut Engine,
        at: u64,
        calendar: &mut Calendar<Event>,
    ) {
        let now = super::Sim::now(at);
        for node in std::mem::take(&mut self.dirty) {
            let reported = self.heartbeat(engine, node, now);
            // Slots of instances stopped since the last heartbeat are free only now, and a
            // GPU may have just taken its new profile: what the plans ask for may start.
            for gpu in reported {
                self.reconcile(engine.fleet(), Site { node, gpu }, at, calendar);
            }
        }
    }

    /// Sends node `node`'s heartbeat with the GPUs whose ready instances changed; returns
    /// those GPUs.
    fn heartbeat(&mut self, engine: &mut Engine, node: NodeIdx, now: Timestamp) -> Vec<u8> {
        let Some(agent) = self.agents.get_mut(to_usize(node)) else {
            return Vec::new();
        };
        agent.dirty = false;
        if !agent.alive {
            return Vec::new();
        }
        agent.seq += 1;
        let fleet = engine.fleet();
        let mut gpus = Vec::new();
        let mut warm = Vec::new();
        for g in agent.gpus.iter().filter(|g| g.dirty) {
            let Some(gpu) = fleet.gpu(g.idx) else {
                continue;
            };
            let spec = fleet.catalog.spec(gpu.spec);
            let profile = profile_now(fleet, gpu, g, &self.keys)
                .and_then(|p| fleet.catalog.profile(gpu.spec, gpu.mode, p))
                .map(|p| p.id.clone());
            gpus.push(GpuUsage {
                gpu: g.id.clone(),
                free_framebuffer: Megabytes::new(
                    spec.map_or(0, |s| s.framebuffer.get())
                        .saturating_sub(gpu.used.fb_mb),
                ),
                free_encoder: EncoderUnits::ZERO,
                encoder_utilization_pct: None,
                gpu_utilization_pct: None,
                vgpus: None,
                profile,
            });
            for i in g.instances.iter().filter(|i| i.ready) {
                if let Some(k) = self.keys.get(usize::from(i.key.0)) {
                    warm.push(WarmInstance {
                        gpu: g.id.clone(),
                        slot: u32::from(i.slot),
                        game: k.game.clone(),
                        tier: k.tier.clone(),
                    });
                }
            }
        }
        let heartbeat = Heartbeat {
            generation: 1,
            seq: agent.seq,
            sent_at: now,
            gpus,
            warm: Some(warm),
            plan_generation: agent.plan_generation,
            inputs: Vec::new(),
        };
        let id = agent.id.clone();
        let _ = engine.observe_heartbeat(&id, &heartbeat, now);
        // What the engine took: a ready instance it would not take (a session got the room
        // first) is stopped.
        let fleet = engine.fleet();
        let Some(agent) = self.agents.get_mut(to_usize(node)) else {
            return Vec::new();
        };
        let mut refused = Vec::new();
        let mut reported = Vec::new();
        for (pos, g) in agent.gpus.iter_mut().enumerate().filter(|(_, g)| g.dirty) {
            g.dirty = false;
            if let Ok(pos) = u8::try_from(pos) {
                reported.push(pos);
            }
            let Some(gpu) = fleet.gpu(g.idx) else {
                continue;
            };
            g.instances.retain_mut(|i| {
                if !i.ready {
                    return true;
                }
                let held = matches!(
                    gpu.slots.get(usize::from(i.slot)),
                    Some(Slot::Warm { tier, .. }) if *tier == self.keys.get(usize::from(i.key.0)).map_or(u8::MAX, |k| k.tier_idx)
                );
                if held != i.reported {
                    if held {
                        self.tally.reported_fb_mb += i.fb_mb;
                    } else {
                        self.tally.reported_fb_mb = self.tally.reported_fb_mb.saturating_sub(i.fb_mb);
                    }
                    i.reported = held;
                }
                if !held {
                    refused.push(*i);
                }
                held
            });
        }
        for inst in refused {
            self.tally.refused += 1;
            self.forget(&inst);
        }
        reported
    }

    /// Makes the plan again: the fixed buffer's top-up, or a planner round.
    pub(super) fn round(&mut self, engine: &mut Engine, at: u64, calendar: &mut Calendar<Event>) {
        match &mut self.policy {
            Policy::Fixed(_) => self.fixed_round(engine.fleet(), at, calendar),
            Policy::Planner(planner) => {
                let round = planner.round(engine, super::Sim::now(at));
                // Each GPU the engine had not steered yet is one re-profile begun.
                let fleet = engine.fleet();
                for (node, gpu) in &round.steer_away {
                    if let Some(s) = self.site(fleet, node, gpu)
                        && let Some(g) = self.gpu(s)
                        && fleet.gpu(g.idx).is_some_and(|x| !x.steered)
                    {
                        self.tally.reprofiles += 1;
                    }
                }
                // Only a GPU that left since the round fails; it has nothing to steer.
                let _ = round.apply_steering(engine);
                let fleet = engine.fleet();
                for (node, plan) in &round.plans {
                    self.apply_plan(fleet, node, plan, at, calendar);
                }
                // A GPU steered back may take the warm instances its plan asks for now.
                for (node, gpu) in &round.steer_back {
                    if let Some(s) = self.site(fleet, node, gpu) {
                        self.reconcile(fleet, s, at, calendar);
                    }
                }
            }
        }
    }

    fn fixed_round(&mut self, fleet: &Fleet, at: u64, calendar: &mut Calendar<Event>) {
        let mut fixed = match std::mem::replace(&mut self.policy, Policy::Fixed(Fixed::default())) {
            Policy::Fixed(f) => f,
            other => {
                self.policy = other;
                return;
            }
        };
        for region in &mut fixed.regions {
            for (ki, &key) in fixed.keys.iter().enumerate() {
                let Some(holders) = region.holders.get_mut(ki) else {
                    continue;
                };
                let mut holders = std::mem::take(holders);
                // Targets a GPU can no longer meet are given up, to be placed elsewhere.
                let mut have = 0u32;
                holders.retain(|&site| {
                    let target = self.target(site, key);
                    let running = self.running(site, key);
                    let met = if running < target && !self.has_room(fleet, site, key) {
                        running
                    } else {
                        target
                    };
                    self.set_target(site, key, met);
                    have += u32::from(met);
                    met > 0
                });
                while have < u32::from(fixed.per_key) {
                    let Some(site) = self.fixed_candidate(fleet, region, key) else {
                        break;
                    };
                    let target = self.target(site, key);
                    self.set_target(site, key, target.saturating_add(1));
                    if !holders.contains(&site) {
                        holders.push(site);
                    }
                    have += 1;
                    self.reconcile(fleet, site, at, calendar);
                }
                if let Some(h) = region.holders.get_mut(ki) {
                    *h = holders;
                }
            }
        }
        self.policy = Policy::Fixed(fixed);
    }

    /// The next GPU of `region` (from where the last search stopped) with room for a warm
    /// instance of `key`: among the next [`FIXED_SCAN`] GPUs, the first that already has the
    /// key's profile, else the first empty one, which takes it (as the engine gives an empty
    /// GPU the profile of its first session). A search that finds nothing moves on, so the
    /// next one looks further.
    fn fixed_candidate(&self, fleet: &Fleet, region: &mut FixedRegion, key: Key) -> Option<Site> {
        let n = region.gpus.len();
        let mut empty = None;
        let looked = n.min(FIXED_SCAN);
        for step in 0..looked {
            let i = (region.cursor + step) % n;
            let Some(&site) = region.gpus.get(i) else {
                continue;
            };
            match self.room_class(fleet, site, key) {
                Some(Room::Profiled) => {
                    region.cursor = (i + 1) % n;
                    return Some(site);
                }
                Some(Room::Empty) if empty.is_none() => empty = Some((i, site)),
                _ => {}
            }
        }
        let Some((i, site)) = empty else {
            region.cursor = (region.cursor + looked) % n.max(1);
            return None;
        };
        region.cursor = (i + 1) % n;
        Some(site)
    }

    fn target(&self, site: Site, key: Key) -> u16 {
        self.gpu(site).map_or(0, |g| {
            g.targets
                .iter()
                .find(|(k, _)| *k == key)
                .map_or(0, |(_, n)| *n)
        })
    }

    fn set_target(&mut self, site: Site, key: Key, n: u16) {
        let Some(g) = self.gpu_mut(site) else {
            return;
        };
        match g.targets.iter_mut().find(|(k, _)| *k == key) {
            Some(t) => t.1 = n,
            None if n > 0 => g.targets.push((key, n)),
            None => {}
        }
        g.targets.retain(|(_, n)| *n > 0);
    }

    fn running(&self, site: Site, key: Key) -> u16 {
        self.gpu(site).map_or(0, |g| {
            u16::try_from(g.instances.iter().filter(|i| i.key == key).count()).unwrap_or(u16::MAX)
        })
    }

    /// Whether GPU `site` has room for one more warm instance of `key` now, without
    /// re-profiling a GPU that holds anything.
    fn has_room(&self, fleet: &Fleet, site: Site, key: Key) -> bool {
        self.room_class(fleet, site, key).is_some()
    }

    /// Whether GPU `site` has room for one more warm instance of `key` now, without
    /// re-profiling a GPU that holds anything, and whether it already has the key's profile.
    fn room_class(&self, fleet: &Fleet, site: Site, key: Key) -> Option<Room> {
        let (Some(agent), Some(g)) = (self.agents.get(to_usize(site.node)), self.gpu(site)) else {
            return None;
        };
        let gpu = fleet.gpu(g.idx)?;
        let accepting = fleet
            .node(site.node)
            .is_some_and(framecast_broker::placement::fleet::Node::accepts_sessions);
        if !agent.alive || !accepting {
            return None;
        }
        let profile = profile_now(fleet, gpu, g, &self.keys);
        room(fleet, gpu, g, &self.keys, key, profile)?;
        Some(if gpu.mode == GpuMode::EqualSize && profile.is_none() {
            Room::Empty
        } else {
            Room::Profiled
        })
    }

    /// Applies a new plan to a node's agent, as the agent would: the newest generation only.
    fn apply_plan(
        &mut self,
        fleet: &Fleet,
        node: &NodeId,
        plan: &PoolPlan,
        at: u64,
        calendar: &mut Calendar<Event>,
    ) {
        let Some(&n) = fleet.node_idx.get(node) else {
            return;
        };
        let mut targets = Vec::new();
        for gp in &plan.gpus {
            let mut t = Vec::new();
            for w in &gp.warm {
                if let Some(k) = self.key(fleet, &w.tier, &w.game)
                    && w.count > 0
                {
                    t.push((k, w.count));
                }
            }
            targets.push((gp.gpu.clone(), gp.profile.clone(), t));
        }
        let Some(agent) = self.agents.get_mut(to_usize(n)) else {
            return;
        };
        if agent
            .plan_generation
            .is_some_and(|g| g >= plan.plan_generation)
        {
            return;
        }
        agent.plan_generation = Some(plan.plan_generation);
        let mut touched = Vec::new();
        for (gpu_id, profile, t) in targets {
            let Some(pos) = agent.gpus.iter().position(|g| g.id == gpu_id) else {
                continue;
            };
            let Some(g) = agent.gpus.get_mut(pos) else {
                continue;
            };
            g.targets = t;
            g.plan_profile = profile.and_then(|name| {
                let gpu = fleet.gpu(g.idx)?;
                let spec = fleet.catalog.spec(gpu.spec)?;
                spec.profiles(gpu.mode)
                    .iter()
                    .position(|p| p.id == name)
                    .and_then(|i| ProfileIdx::try_from(i).ok())
            });
            if let Ok(pos) = u8::try_from(pos) {
                touched.push(Site { node: n, gpu: pos });
            }
        }
        for site in touched {
            self.reconcile(fleet, site, at, calendar);
        }
    }

    /// The agent's loop for one GPU: stops the instances its plan no longer asks for (or whose
    /// profile the GPU no longer has) and starts the missing ones where there is room.
    fn reconcile(&mut self, fleet: &Fleet, site: Site, at: u64, calendar: &mut Calendar<Event>) {
        let launch_ms = self.launch_ms;
        let Some(agent) = self.agents.get_mut(to_usize(site.node)) else {
            return;
        };
        if !agent.alive {
            return;
        }
        let accepting = fleet
            .node(site.node)
            .is_some_and(framecast_broker::placement::fleet::Node::accepts_sessions);
        let Some(g) = agent.gpus.get_mut(usize::from(site.gpu)) else {
            return;
        };
        if g.targets.is_empty() && g.instances.is_empty() && g.plan_profile.is_none() {
            return;
        }
        let Some(gpu) = fleet.gpu(g.idx) else {
            return;
        };
        let mut profile = profile_now(fleet, gpu, g, &self.keys);
        // Stop: instances of another profile than the GPU's, and those past the plan's count
        // of their key (the starting ones and the youngest first).
        let keep: Vec<bool> = g
            .instances
            .iter()
            .map(|i| {
                let target = g
                    .targets
                    .iter()
                    .find(|(k, _)| *k == i.key)
                    .map_or(0, |(_, n)| usize::from(*n));
                let better = g
                    .instances
                    .iter()
                    .filter(|j| {
                        j.key == i.key
                            && (j.ready, std::cmp::Reverse(j.serial))
                                > (i.ready, std::cmp::Reverse(i.serial))
                    })
                    .count();
                better < target && fits_profile(fleet, gpu, &self.keys, i.key, profile)
            })
            .collect();
        let mut stopped = Vec::new();
        let mut ready_changed = false;
        let mut n = 0;
        g.instances.retain(|i| {
            let k = keep.get(n).copied().unwrap_or(false);
            n += 1;
            if !k {
                ready_changed |= i.ready;
                stopped.push(*i);
            }
            k
        });
        // Start what is missing, where there is room.
        let mut started = Vec::new();
        if accepting && gpu.present {
            let targets = g.targets.clone();
            for (key, want) in targets {
                let mut have = g.instances.iter().filter(|i| i.key == key).count();
                while have < usize::from(want) {
                    let Some((slot, fb_mb, slices, p)) =
                        room(fleet, gpu, g, &self.keys, key, profile)
                    else {
                        break;
                    };
                    profile = p.or(profile);
                    self.serial = self.serial.wrapping_add(1);
                    let inst = Instance {
                        slot,
                        key,
                        serial: self.serial,
                        ready_at: at.saturating_add(launch_ms),
                        ready: false,
                        reported: false,
                        fb_mb,
                        slices,
                    };
                    g.instances.push(inst);
                    started.push(inst);
                    have += 1;
                }
            }
        }
        // An empty GPU the plan gives another profile takes it now: the engine learns it
        // from the next heartbeat (the planner may wait for it to steer the GPU back).
        let reprofiled = gpu.mode == GpuMode::EqualSize
            && gpu.held == 0
            && g.plan_profile.is_some()
            && gpu.profile != g.plan_profile;
        if ready_changed || reprofiled {
            g.dirty = true;
        }
        for inst in &started {
            calendar.push(
                inst.ready_at,
                Event::WarmReady(site.node, site.gpu, inst.serial),
            );
            self.tally.idle += 1;
            self.tally.starting += 1;
            self.tally.idle_fb_mb += inst.fb_mb;
        }
        for inst in &stopped {
            // A reported instance stays in the engine's accounting until the heartbeat.
            self.forget(inst);
        }
        if ready_changed || reprofiled {
            self.mark_dirty(site.node);
        }
    }

    /// Takes a stopped or used instance out of the tallies.
    fn forget(&mut self, inst: &Instance) {
        self.tally.idle = self.tally.idle.saturating_sub(1);
        if !inst.ready {
            self.tally.starting = self.tally.starting.saturating_sub(1);
        }
        self.tally.idle_fb_mb = self.tally.idle_fb_mb.saturating_sub(inst.fb_mb);
        if inst.reported {
            self.tally.reported_fb_mb = self.tally.reported_fb_mb.saturating_sub(inst.fb_mb);
        }
    }

    fn mark_dirty(&mut self, node: NodeIdx) {
        if let Some(a) = self.agents.get_mut(to_usize(node))
            && !a.dirty
        {
            a.dirty = true;
            self.dirty.push(node);
        }
    }

    fn site(&self, fleet: &Fleet, node: &NodeId, gpu: &GpuId) -> Option<Site> {
        let &n = fleet.node_idx.get(node)?;
        let pos = self
            .agents
            .get(to_usize(n))?
            .gpus
            .iter()
            .position(|g| &g.id == gpu)?;
        Some(Site {
            node: n,
            gpu: u8::try_from(pos).ok()?,
        })
    }

    fn gpu(&self, site: Site) -> Option<&AgentGpu> {
        self.agents
            .get(to_usize(site.node))?
            .gpus
            .get(usize::from(site.gpu))
    }

    fn gpu_mut(&mut self, site: Site) -> Option<&mut AgentGpu> {
        self.agents
            .get_mut(to_usize(site.node))?
            .gpus
            .get_mut(usize::from(site.gpu))
    }

    /// Framebuffer of the warm instances the engine holds, MB: the engine counts it as used.
    pub(super) fn reported_fb_mb(&self) -> u64 {
        self.tally.reported_fb_mb
    }

    /// Fills the sample's warm figures (the fleet has `fb_total_mb`), and starts the next
    /// minute's warm-hit count.
    pub(super) fn sample(&mut self, s: &mut Sample, fb_total_mb: u64) {
        s.warm_idle = self.tally.idle;
        s.warm_starting = self.tally.starting;
        s.warm_planned = self
            .agents
            .iter()
            .filter(|a| a.alive)
            .flat_map(|a| &a.gpus)
            .flat_map(|g| &g.targets)
            .map(|(_, n)| u64::from(*n))
            .sum();
        s.warm_idle_share = if fb_total_mb == 0 {
            0.0
        } else {
            self.tally.idle_fb_mb as f64 / fb_total_mb as f64
        };
        let placed = self.tally.minute_hits + self.tally.minute_colds;
        s.warm_hit_ratio = (placed > 0).then(|| self.tally.minute_hits as f64 / placed as f64);
        self.tally.minute_hits = 0;
        self.tally.minute_colds = 0;
    }

    /// The run's warm figures.
    pub(super) fn figures(&self) -> PoolFigures {
        PoolFigures {
            policy: match self.policy {
                Policy::Fixed(_) => PoolPolicy::Fixed.to_string(),
                Policy::Planner(_) => PoolPolicy::Planner.to_string(),
            },
            warm_hits: self.tally.warm_hits,
            cold_starts: self.tally.cold_starts,
            unqueued: self.tally.unqueued,
            unqueued_hits: self.tally.unqueued_hits,
            preempted: self.tally.preempted,
            cold_start_wait_s: Percentiles::of_millis(&self.waits),
            reprofiles: self.tally.reprofiles,
        }
    }
}

impl PoolFigures {
    /// Writes the figures into `report`, with the idle warm capacity of its timeline.
    pub(super) fn fill(self, report: &mut Report) {
        report.pools = self.policy;
        report.warm_hits = self.warm_hits;
        report.cold_starts = self.cold_starts;
        let placed = self.warm_hits + self.cold_starts;
        report.warm_hit_ratio = (placed > 0).then(|| self.warm_hits as f64 / placed as f64);
        report.warm_hit_ratio_unqueued =
            (self.unqueued > 0).then(|| self.unqueued_hits as f64 / self.unqueued as f64);
        report.warm_preempted = self.preempted;
        report.cold_start_wait_s = self.cold_start_wait_s;
        report.reprofiles = self.reprofiles;
        let n = report.timeline.len();
        if n > 0 {
            report.mean_warm_idle_share = report
                .timeline
                .iter()
                .map(|s| s.warm_idle_share)
                .sum::<f64>()
                / n as f64;
            report.peak_warm_idle_share = report
                .timeline
                .iter()
                .map(|s| s.warm_idle_share)
                .fold(0.0, f64::max);
        }
    }
}

/// The equal-size profile GPU `gpu` has, or takes now: the plan's once no session holds it;
/// else the profile of its sessions, or of its warm instances on an otherwise empty GPU.
/// `None` for an empty GPU without instances (any profile will do) and other modes.
fn profile_now(fleet: &Fleet, gpu: &Gpu, g: &AgentGpu, keys: &[KeyInfo]) -> Option<ProfileIdx> {
    if gpu.mode != GpuMode::EqualSize {
        return None;
    }
    if gpu.held > 0 {
        return gpu.profile;
    }
    if g.plan_profile.is_some() {
        return g.plan_profile;
    }
    g.instances.first().and_then(|i| {
        let k = keys.get(usize::from(i.key.0))?;
        fleet
            .catalog
            .fit(gpu.spec, k.tier_idx)
            .equal
            .map(|(p, _)| p)
    })
}

/// Whether an instance of `key` may stay on `gpu` whose profile is `profile`.
fn fits_profile(
    fleet: &Fleet,
    gpu: &Gpu,
    keys: &[KeyInfo],
    key: Key,
    profile: Option<ProfileIdx>,
) -> bool {
    if gpu.mode != GpuMode::EqualSize {
        return true;
    }
    let Some(k) = keys.get(usize::from(key.0)) else {
        return false;
    };
    let p = fleet
        .catalog
        .fit(gpu.spec, k.tier_idx)
        .equal
        .map(|(p, _)| p);
    p.is_some() && (profile.is_none() || p == profile)
}

/// A slot of `gpu` (whose agent's view is `g`, equal-size profile `profile`) where a warm
/// instance of `key` fits now, as the engine's `set_warm` would take it: (slot, framebuffer,
/// MIG slices, the equal-size profile the GPU then has). The highest such slot: the engine
/// fills a GPU from its lowest free slot.
fn room(
    fleet: &Fleet,
    gpu: &Gpu,
    g: &AgentGpu,
    keys: &[KeyInfo],
    key: Key,
    profile: Option<ProfileIdx>,
) -> Option<(u16, u64, u16, Option<ProfileIdx>)> {
    let k = keys.get(usize::from(key.0))?;
    if !gpu.present || gpu.exclusive || gpu.pending_shape.is_some() {
        return None;
    }
    let spec = fleet.catalog.spec(gpu.spec)?;
    let fit = fleet.catalog.fit(gpu.spec, k.tier_idx);
    let (usable, p, slices) = match gpu.mode {
        GpuMode::EqualSize => {
            let (p, slots) = fit.equal?;
            if profile.is_some_and(|now| now != p) {
                return None;
            }
            // The engine's cap once the GPU has the profile: its own while it keeps it, else
            // the one `set_warm` gives.
            let shape = fleet.catalog.profile(gpu.spec, gpu.mode, p)?;
            let cap = if gpu.profile == Some(p) {
                gpu.slot_cap
            } else {
                shape.max_instances.min(spec.max_vgpus)
            };
            (slots.min(cap), p, 0)
        }
        GpuMode::MixedSize => {
            let (p, _) = fit.mixed?;
            (gpu.slot_cap, p, 0)
        }
        GpuMode::Mig => {
            let p = fit.mig?;
            let shape = fleet.catalog.profile(gpu.spec, gpu.mode, p)?;
            (gpu.slot_cap, p, u16::from(shape.mig_slices.unwrap_or(1)))
        }
        GpuMode::Exclusive => return None,
    };
    let fb_mb = fleet
        .catalog
        .profile(gpu.spec, gpu.mode, p)
        .map_or(0, |s| s.framebuffer.megabytes().get());
    if gpu.mode != GpuMode::EqualSize {
        // Instances the engine does not hold yet take room the engine does not see.
        let (mine_fb, mine_slices) = g
            .instances
            .iter()
            .filter(|i| !i.reported)
            .fold((0u64, 0u16), |(f, s), i| (f + i.fb_mb, s + i.slices));
        if gpu.used.fb_mb + mine_fb + fb_mb > spec.framebuffer.get() {
            return None;
        }
        if gpu.mode == GpuMode::Mig
            && gpu.used.mig_slices + mine_slices + slices > u16::from(spec.mig_compute_slices)
        {
            return None;
        }
    }
    let usable = usize::from(usable).min(gpu.slots.len());
    let slot = (0..usable).rev().find(|&s| {
        gpu.slots.get(s) == Some(&Slot::Free)
            && !g.instances.iter().any(|i| usize::from(i.slot) == s)
    })?;
    let equal = (gpu.mode == GpuMode::EqualSize).then_some(p);
    Some((u16::try_from(slot).ok()?, fb_mb, slices, equal))
}

fn to_usize(i: u32) -> usize {
    framecast_broker::placement::fleet::to_usize(i)
}

#[cfg(test)]
mod tests {
    // In a test, a failed unwrap is a failed test.
    #![allow(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing
    )]

    use framecast_broker::placement::{Decision, PlaceRequest, Priority, RegionRtt};
    use framecast_shared::ids::{GenreName, SessionId, TenantId};

    use super::super::Sim;
    use super::*;

    /// One node with one L4, 4k players of one game: three slots.
    const ONE_GPU: &str = r#"
name = "one-gpu"
duration_s = 3600

[[fleet]]
region = "eu"
nodes = 1
model = "l4"
gpus_per_node = 1

[demand]
arrivals = { kind = "poisson", rate_per_s = 0.001 }
tiers = { "4k" = 1 }
genres = { fps = 1 }

[pools]
policy = "fixed"
fixed_per_key = 1
launch_s = 30
"#;

    fn request(n: u128, at_ms: u64) -> PlaceRequest {
        PlaceRequest {
            session_id: SessionId::new(Sim::now(at_ms), n),
            tenant: TenantId::new("t").unwrap(),
            game: GameId::new("game-fps").unwrap(),
            tier: TierName::new("4k").unwrap(),
            genre: GenreName::new("fps").unwrap(),
            priority: Priority::Normal,
            regions: vec![RegionRtt {
                region: RegionName::new("eu").unwrap(),
                rtt_ms: 15,
            }],
            fallbacks: Vec::new(),
            queue: false,
        }
    }

    fn place(sim: &mut Sim<'_>, n: u128, at: u64) -> (Placement, Start) {
        let Decision::Placed(p) = sim.engine.place(request(n, at), Sim::now(at)) else {
            panic!("request {n} not placed");
        };
        let pools = sim.pools.as_mut().unwrap();
        let key = pools.request_key(&sim.engine, &p.tier, &GameId::new("game-fps").unwrap());
        let (_, start) = pools.placed(&sim.engine, &p, key, false, at, &mut sim.calendar);
        (p, start)
    }

    #[test]
    fn a_warm_instance_is_reported_when_ready_taken_at_once_and_replaced() {
        let scenario = Scenario::parse(ONE_GPU, "t.toml").unwrap();
        let mut sim = Sim::new(&scenario, "genre-weighted").unwrap();
        let pools = sim.pools.as_mut().unwrap();
        pools.round(&mut sim.engine, 0, &mut sim.calendar);
        // Started in the highest slot; the engine does not know it yet.
        let inst = pools.agents[0].gpus[0].instances.clone();
        assert_eq!(inst.len(), 1);
        assert_eq!(
            (inst[0].slot, inst[0].ready, inst[0].ready_at),
            (2, false, 30_000)
        );
        assert_eq!((pools.tally.idle, pools.tally.starting), (1, 1));
        assert_eq!(sim.engine.fleet().gpus[0].warm, 0);

        pools.ready(0, 0, inst[0].serial);
        pools.heartbeats(&mut sim.engine, 30_000, &mut sim.calendar);
        let gpu = &sim.engine.fleet().gpus[0];
        assert!(matches!(gpu.slots[2], Slot::Warm { .. }), "{:?}", gpu.slots);
        assert_eq!(pools.tally.reported_fb_mb, 8192);

        // A player of its game and tier takes it and starts at once; a replacement starts in
        // the next free slot from the top.
        let (p, start) = place(&mut sim, 1, 31_000);
        assert!(p.warm);
        assert_eq!((p.slot, start), (2, Start::Now));
        let pools = sim.pools.as_ref().unwrap();
        assert_eq!(pools.tally.reported_fb_mb, 0);
        let inst = &pools.agents[0].gpus[0].instances;
        assert_eq!(inst.len(), 1);
        assert_eq!((inst[0].slot, inst[0].ready_at), (1, 61_000));

        // The next player finds no warm instance: a cold start in the lowest free slot.
        let (p, start) = place(&mut sim, 2, 35_000);
        assert!(!p.warm);
        assert_eq!((p.slot, start), (0, Start::After(30_000)));

        // The one after lands on the starting replacement: it waits only for the rest of it.
        let (p, start) = place(&mut sim, 3, 41_000);
        assert_eq!((p.slot, start), (1, Start::After(20_000)));
        let pools = sim.pools.as_ref().unwrap();
        assert_eq!((pools.tally.handed_over, pools.tally.preempted), (1, 0));
        assert_eq!((pools.tally.warm_hits, pools.tally.cold_starts), (1, 2));
        assert_eq!((pools.tally.idle, pools.tally.starting), (0, 0));
        assert!(pools.agents[0].gpus[0].instances.is_empty());
        sim.engine.audit().unwrap();
    }

    #[test]
    fn an_instance_of_another_profile_is_stopped_when_a_session_reprofiles_its_gpu() {
        let text = ONE_GPU.replace(r#"tiers = { "4k" = 1 }"#, r#"tiers = { "720p" = 1 }"#);
        let scenario = Scenario::parse(&text, "t.toml").unwrap();
        let mut sim = Sim::new(&scenario, "genre-weighted").unwrap();
        let pools = sim.pools.as_mut().unwrap();
        pools.round(&mut sim.engine, 0, &mut sim.calendar);
        // A 720p instance starts on the empty GPU, unknown to the engine...
        assert_eq!(pools.agents[0].gpus[0].instances.len(), 1);
        // ...which gives the GPU the 4k profile for a session: the 720p instance cannot stay
        // and has no room left on the GPU.
        let (_, start) = place(&mut sim, 1, 5_000);
        assert_eq!(start, Start::After(30_000));
        let pools = sim.pools.as_ref().unwrap();
        assert!(pools.agents[0].gpus[0].instances.is_empty());
        assert_eq!((pools.tally.idle, pools.tally.idle_fb_mb), (0, 0));
    }

    #[test]
    fn a_fixed_run_keeps_the_agents_and_the_engine_in_step() {
        let text = ONE_GPU
            .replace("nodes = 1", "nodes = 3")
            .replace("gpus_per_node = 1", "gpus_per_node = 2")
            .replace("rate_per_s = 0.001", "rate_per_s = 0.05")
            .replace(
                r#"tiers = { "4k" = 1 }"#,
                r#"tiers = { "720p" = 2, "1080p" = 2, "4k" = 1 }"#,
            )
            .replace("genres = { fps = 1 }", "genres = { fps = 1, rpg = 1 }")
            .replace("fixed_per_key = 1", "fixed_per_key = 2");
        let scenario = Scenario::parse(&text, "t.toml").unwrap();
        let pools = in_step(&scenario);
        assert!(pools.tally.warm_hits > 0 && pools.tally.cold_starts > 0);
    }

    #[test]
    fn lost_nodes_and_a_broker_restart_keep_the_agents_and_the_engine_in_step() {
        let text = format!(
            "{}\n[[faults]]\nkind = \"node-loss\"\nat_s = 1200\nnodes = 1\n\n[[faults]]\nkind = \"broker-restart\"\nat_s = 1800\ndown_s = 60\n",
            ONE_GPU
                .replace("nodes = 1\n", "nodes = 3\n")
                .replace("gpus_per_node = 1", "gpus_per_node = 2")
                .replace("rate_per_s = 0.001", "rate_per_s = 0.02")
                .replace(
                    r#"tiers = { "4k" = 1 }"#,
                    r#"tiers = { "720p" = 2, "4k" = 1 }"#
                )
        );
        let scenario = Scenario::parse(&text, "t.toml").unwrap();
        for policy in [PoolPolicy::Fixed, PoolPolicy::Planner] {
            let mut s = scenario.clone();
            s.pools.policy = policy;
            let pools = in_step(&s);
            assert!(
                pools.agents[0].instances_none(),
                "{policy}: the lost node runs nothing"
            );
        }
    }

    #[test]
    fn a_planner_run_keeps_the_agents_and_the_engine_in_step() {
        let text = include_str!("../../scenarios/pools.toml")
            .replace("duration_s = 7200", "duration_s = 2400");
        let scenario = Scenario::parse(&text, "pools.toml").unwrap();
        let pools = in_step(&scenario);
        assert!(pools.tally.warm_hits > pools.tally.cold_starts);
    }

    impl Agent {
        fn instances_none(&self) -> bool {
            !self.alive && self.gpus.iter().all(|g| g.instances.is_empty())
        }
    }

    /// Runs `scenario` to its end and checks that the engine's accounting holds and that the
    /// agents' warm instances are the engine's warm slots; returns the pools.
    fn in_step(scenario: &Scenario) -> Pools {
        let mut sim = Sim::new(scenario, "genre-weighted").unwrap();
        sim.simulate(&indicatif::ProgressBar::hidden()).unwrap();
        sim.engine.audit().unwrap();
        let mut pools = sim.pools.take().unwrap();
        // What is still to report, reported.
        pools.heartbeats(
            &mut sim.engine,
            scenario.duration_s * 1000,
            &mut sim.calendar,
        );
        assert_eq!(pools.tally.refused, 0, "the agents' room is the engine's");
        let fleet = sim.engine.fleet();
        let mut ready = 0;
        let mut idle = 0;
        let mut fb = 0;
        for a in &pools.agents {
            for g in &a.gpus {
                for i in &g.instances {
                    idle += 1;
                    fb += i.fb_mb;
                    if i.ready {
                        ready += 1;
                        assert!(i.reported);
                        let slot = fleet.gpus[to_usize(g.idx)].slots[usize::from(i.slot)];
                        assert!(matches!(slot, Slot::Warm { .. }), "{slot:?}");
                    }
                }
            }
        }
        // A lost node's warm slots stay in the engine (its framebuffer counted as used) but
        // nobody takes them.
        let engine_warm: u64 = pools
            .agents
            .iter()
            .filter(|a| a.alive)
            .flat_map(|a| &a.gpus)
            .map(|g| u64::from(fleet.gpus[to_usize(g.idx)].warm))
            .sum();
        assert_eq!(engine_warm, ready);
        assert_eq!(pools.tally.idle, idle);
        assert_eq!(pools.tally.idle_fb_mb, fb);
        assert_eq!(pools.tally.reported_fb_mb, {
            let warm_fb: u64 = fleet
                .gpus
                .iter()
                .flat_map(|g| (0..g.slots.len()).map(move |s| (g, s)))
                .map(|(g, s)| fleet.warm_usage(g, u16::try_from(s).unwrap()).0)
                .sum();
            warm_fb
        });
        assert_eq!(pools.tally.idle - pools.tally.starting, ready);
        pools
    }
}
