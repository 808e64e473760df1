//! Read-only views of the engine for the API: nodes with their GPUs, pools per region and
//! tier, where a session sits, and what the pool planner needs to see of the fleet.

use std::collections::BTreeMap;

use serde::Serialize;

use framecast_shared::gpu::{GpuMode, GpuSpec};
use framecast_shared::ids::{GameId, GpuId, NodeId, RegionName, SessionId, TierName};
use framecast_shared::state::{NodeState, SessionState};
use framecast_shared::tier::TierPreset;
use framecast_shared::time::Timestamp;

use super::catalog::{Catalog, SpecIdx, TierFit, TierIdx};
use super::engine::Engine;
use super::fleet::{Gpu, Slot, to_usize};

/// A node as operators see it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NodeView {
    /// The node.
    pub node_id: NodeId,
    /// Its region.
    pub region: RegionName,
    /// Its lifecycle state (`ready`, `cordoned`, `draining`, `down`).
    pub state: NodeState,
    /// An operator cordoned it.
    pub cordoned: bool,
    /// Its heartbeats are late.
    pub suspect: bool,
    /// Its agent's generation.
    pub generation: u64,
    /// Its GPUs.
    pub gpus: Vec<GpuView>,
}

/// One GPU of a node.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GpuView {
    /// The GPU.
    pub gpu: GpuId,
    /// Its model.
    pub model: String,
    /// Its sharing mode.
    pub mode: GpuMode,
    /// The vGPU profile its slots use (equal-size), if any.
    pub profile: Option<String>,
    /// Usable slots.
    pub slots: u16,
    /// Slots holding sessions.
    pub sessions: u16,
    /// Slots holding warm instances.
    pub warm: u16,
    /// Framebuffer, MB.
    pub framebuffer_mb: u64,
    /// Framebuffer of occupied slots, MB.
    pub framebuffer_used_mb: u64,
    /// Encoder units leased, in 1080p60 streams.
    pub encoder_used: f64,
    /// The pool planner steered it away: it takes no new session until steered back.
    pub steered: bool,
}

/// One (region, tier) pool.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PoolView {
    /// The region.
    pub region: RegionName,
    /// The tier.
    pub tier: TierName,
    /// Sessions of this tier more that fit now on accepting GPUs (each GPU counted as if it
    /// took only this tier).
    pub free: u32,
    /// Idle warm instances of this tier.
    pub warm: u32,
    /// Sessions of this tier reserved, not yet playing.
    pub reserved: u32,
    /// Sessions of this tier connecting, playing or reconnecting.
    pub active: u32,
    /// Requests of this tier waiting.
    pub queued: u32,
}

/// The fleet as the pool planner sees it: GPU models with how each tier fits them, every node
/// with its GPUs (sessions, idle warm instances, profile, steering), and the queue. Read-only;
/// see [`Engine::pool_view`].
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct PoolFleetView {
    /// GPU models the fleet has reported, indexed by [`PoolGpuView::model_index`].
    pub models: Vec<PoolModelView>,
    /// Every node, in the order they first reported (down ones included: see
    /// [`PoolNodeView::accepts_sessions`]).
    pub nodes: Vec<PoolNodeView>,
    /// Requests waiting, per first known region, tier and game.
    pub queued: Vec<PoolQueuedView>,
}

/// One GPU model and how each tier fits it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PoolModelView {
    /// Its name, e.g. `NVIDIA L4`.
    pub model: String,
    /// Framebuffer of one GPU, MB.
    pub framebuffer_mb: u64,
    /// MIG compute slices of one GPU (0 without MIG).
    pub mig_slices: u8,
    /// Most vGPUs one GPU hosts.
    pub max_vgpus: u16,
    /// Whether it can stream at all (has NVENC).
    pub can_stream: bool,
    /// How each tier fits, in the engine's tier order (smallest first).
    pub tiers: Vec<PoolTierFit>,
}

/// How one tier fits one GPU model, per sharing mode.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PoolTierFit {
    /// The tier.
    pub tier: TierName,
    /// Equal-size: the profile a GPU of this tier holds.
    pub equal: Option<PoolProfileFit>,
    /// Mixed-size: the profile a session of this tier gets.
    pub mixed: Option<PoolProfileFit>,
    /// MIG: the smallest instance shape that holds the tier.
    pub mig: Option<PoolProfileFit>,
    /// Streams of this tier a GPU in exclusive mode holds (0 or 1).
    pub exclusive_sessions: u16,
}

/// A profile (or MIG shape) serving a tier on a model, and what one GPU holds of it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PoolProfileFit {
    /// The vendor's name for it, e.g. `L4-4Q` or `1g.10gb`.
    pub profile: String,
    /// Framebuffer of one instance, MB.
    pub framebuffer_mb: u64,
    /// Instances of it one GPU holds in this mode: vGPU slots (equal-size), the mixed-size
    /// limit, or the MIG shape's instance count.
    pub instances: u16,
    /// MIG compute slices one instance takes (0 outside MIG).
    pub mig_slices: u8,
    /// Streams of the tier one GPU in this mode holds when it holds only this tier: the
    /// instances, further bounded by encoder throughput, the driver's session cap, the compute
    /// share (where the mode enforces it) and the framebuffer.
    pub sessions: u16,
}

/// One node as the pool planner sees it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PoolNodeView {
    /// The node.
    pub node_id: NodeId,
    /// Its region.
    pub region: RegionName,
    /// Its lifecycle state.
    pub state: NodeState,
    /// Whether it takes new sessions now (ready, not suspect).
    pub accepts_sessions: bool,
    /// Its agent's generation; it changes when the agent restarts (and has lost its plan).
    pub generation: u64,
    /// The newest pool plan its agent reports applied (0 until it says).
    pub plan_generation: u64,
    /// Its GPUs its agent still reports.
    pub gpus: Vec<PoolGpuView>,
}

/// One GPU as the pool planner sees it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PoolGpuView {
    /// The GPU.
    pub gpu: GpuId,
    /// Its model's name.
    pub model: String,
    /// Its model, as an index into [`PoolFleetView::models`].
    pub model_index: usize,
    /// Its sharing mode.
    pub mode: GpuMode,
    /// The profile its vGPUs use now (equal-size), if any.
    pub profile: Option<String>,
    /// The tier that profile serves (the smallest such tier), if any.
    pub profile_tier: Option<TierName>,
    /// Usable slots under the current profile (equal-size), or the GPU's slots (other modes).
    pub slots: u16,
    /// Slots holding sessions.
    pub sessions: u16,
    /// Sessions per tier served, for tiers with any.
    pub sessions_by_tier: Vec<(TierName, u16)>,
    /// Idle warm instances the engine knows of (from the agent's reports), as (game, tier).
    pub warm: Vec<(GameId, TierName)>,
    /// The pool planner steered it away (see [`Engine::steer_away`]).
    pub steered: bool,
    /// Whether the GPU itself could take a new session: reported, not waiting for a new shape,
    /// not held whole, able to stream. Its node's state and steering are not counted here.
    pub accepting: bool,
    /// Framebuffer, MB.
    pub framebuffer_mb: u64,
    /// Framebuffer no session and no warm instance occupies, MB.
    pub framebuffer_free_mb: u64,
    /// Framebuffer sessions occupy, MB (warm instances not counted).
    pub session_framebuffer_mb: u64,
    /// MIG compute slices sessions occupy (warm instances not counted).
    pub session_mig_slices: u16,
    /// vGPUs the agent last reported created.
    pub vgpus_created: u16,
}

/// Requests waiting for one region, tier and game.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PoolQueuedView {
    /// The first region of the request the engine knows.
    pub region: RegionName,
    /// The tier asked for.
    pub tier: TierName,
    /// The game.
    pub game: GameId,
    /// How many wait.
    pub count: u32,
}

/// Where a session is, in the engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionPlace {
    /// Its node.
    pub node: NodeId,
    /// Its GPU.
    pub gpu: GpuId,
    /// Its slot.
    pub slot: u32,
    /// Its tier (the one served).
    pub tier: TierName,
    /// Its state.
    pub state: SessionState,
    /// When a reservation lapses.
    pub expires_at: Option<Timestamp>,
}

impl Engine {
    /// Every node, in the order they first reported.
    pub fn node_views(&self) -> Vec<NodeView> {
        let fleet = self.fleet();
        fleet
            .nodes
            .iter()
            .map(|n| NodeView {
                node_id: n.id.clone(),
                region: fleet
                    .catalog
                    .region(n.region)
                    .cloned()
                    .unwrap_or_else(unknown),
                state: n.state,
                cordoned: n.cordoned,
                suspect: n.suspect,
                generation: n.generation,
                gpus: n
                    .gpus
                    .iter()
                    .filter_map(|&g| fleet.gpu(g))
                    .filter(|g| g.present)
                    .map(|g| {
                        let spec = fleet.catalog.spec(g.spec);
                        GpuView {
                            gpu: g.id.clone(),
                            model: spec.map(|s| s.model.clone()).unwrap_or_default(),
                            mode: g.mode,
                            profile: g
                                .profile
                                .and_then(|p| fleet.catalog.profile(g.spec, g.mode, p))
                                .map(|p| p.id.clone()),
                            slots: g.slot_cap,
                            sessions: g.held,
                            warm: g.warm,
                            framebuffer_mb: spec.map_or(0, |s| s.framebuffer.get()),
                            framebuffer_used_mb: g.used.fb_mb,
                            encoder_used: f64::from(g.used.encoder) / 1000.0,
                            steered: g.steered,
                        }
                    })
                    .collect(),
            })
            .collect()
    }

    /// Pools per region and tier.
    pub fn pool_views(&self) -> Vec<PoolView> {
        let fleet = self.fleet();
        let tiers = fleet.catalog.tiers();
        let mut pools: Vec<PoolView> = Vec::new();
        for node in &fleet.nodes {
            let Some(region) = fleet.catalog.region(node.region).cloned() else {
                continue;
            };
            for &g in &node.gpus {
                let Some(gpu) = fleet.gpu(g) else { continue };
                if !gpu.present {
                    continue;
                }
                for (t, preset) in tiers.iter().enumerate() {
                    let pool = pool_of(&mut pools, &region, &preset.name);
                    if node.accepts_sessions()
                        && let Ok(tier) = u8::try_from(t)
                        && let Some(fits) = fleet.free_sessions_of_tier(g, tier)
                    {
                        pool.free += u32::from(fits);
                    }
                }
                for slot in gpu.slots.iter().take(usize::from(gpu.slot_cap)) {
                    match slot {
                        Slot::Warm { tier, .. } => {
                            if let Some(preset) = tiers.get(usize::from(*tier)) {
                                pool_of(&mut pools, &region, &preset.name).warm += 1;
                            }
                        }
                        Slot::Held { session } => {
                            if let Some(place) = self.session_place(session) {
                                let pool = pool_of(&mut pools, &region, &place.tier);
                                if place.state == SessionState::Reserved {
                                    pool.reserved += 1;
                                } else {
                                    pool.active += 1;
                                }
                            }
                        }
                        Slot::Free => {}
                    }
                }
            }
        }
        for (tier, queued) in self.queued_per_tier() {
            if let Some(p) = pools.iter_mut().find(|p| p.tier == tier) {
                p.queued += queued;
            }
        }
        pools.sort_by(|a, b| (&a.region, &a.tier).cmp(&(&b.region, &b.tier)));
        pools
    }

    /// The fleet as the pool planner needs it: models and tier fits, nodes, GPUs with their
    /// sessions per tier, idle warm instances and steering, and the queue per region, tier and
    /// game. Costs one pass over the GPUs and the queue.
    pub fn pool_view(&self) -> PoolFleetView {
        let fleet = self.fleet();
        let catalog = &fleet.catalog;
        let tiers = catalog.tiers();
        let mut models = Vec::new();
        for i in 0..=SpecIdx::MAX {
            let Some(spec) = catalog.spec(i) else { break };
            models.push(model_view(catalog, i, spec));
        }
        let nodes = fleet
            .nodes
            .iter()
            .map(|n| PoolNodeView {
                node_id: n.id.clone(),
                region: catalog.region(n.region).cloned().unwrap_or_else(unknown),
                state: n.state,
                accepts_sessions: n.accepts_sessions(),
                generation: n.generation,
                plan_generation: n.plan_generation,
                gpus: n
                    .gpus
                    .iter()
                    .filter_map(|&g| fleet.gpu(g))
                    .filter(|g| g.present)
                    .map(|g| self.pool_gpu_view(g, tiers))
                    .collect(),
            })
            .collect();
        let mut queued: BTreeMap<(RegionName, TierName, GameId), u32> = BTreeMap::new();
        for (region, tier, game) in self.queued_requests() {
            let (Some(region), Some(tier)) = (catalog.region(region), catalog.tier(tier)) else {
                continue;
            };
            *queued
                .entry((region.clone(), tier.name.clone(), game.clone()))
                .or_default() += 1;
        }
        PoolFleetView {
            models,
            nodes,
            queued: queued
                .into_iter()
                .map(|((region, tier, game), count)| PoolQueuedView {
                    region,
                    tier,
                    game,
                    count,
                })
                .collect(),
        }
    }

    fn pool_gpu_view(&self, g: &Gpu, tiers: &[TierPreset]) -> PoolGpuView {
        let fleet = self.fleet();
        let catalog = &fleet.catalog;
        let spec = catalog.spec(g.spec);
        let mut by_tier: BTreeMap<TierIdx, u16> = BTreeMap::new();
        let mut warm = Vec::new();
        let (mut warm_fb, mut warm_slices) = (0u64, 0u16);
        for (i, slot) in g.slots.iter().enumerate() {
            match slot {
                Slot::Held { session } => {
                    if let Some((_, _, tier, _, _)) = self.allocation(session) {
                        *by_tier.entry(tier).or_default() += 1;
                    }
                }
                Slot::Warm { game, tier } => {
                    if let (Some(game), Some(t)) = (catalog.game(*game), catalog.tier(*tier)) {
                        warm.push((game.clone(), t.name.clone()));
                    }
                    if let Ok(i) = u16::try_from(i) {
                        let (fb, slices) = fleet.warm_usage(g, i);
                        warm_fb += fb;
                        warm_slices += slices;
                    }
                }
                Slot::Free => {}
            }
        }
        let profile_tier = g.profile.and_then(|p| {
            (0..tiers.len())
                .filter_map(|t| TierIdx::try_from(t).ok())
                .find(|&t| catalog.fit(g.spec, t).equal.map(|(q, _)| q) == Some(p))
                .and_then(|t| catalog.tier(t))
                .map(|t| t.name.clone())
        });
        let framebuffer_mb = spec.map_or(0, |s| s.framebuffer.get());
        PoolGpuView {
            gpu: g.id.clone(),
            model: spec.map(|s| s.model.clone()).unwrap_or_default(),
            model_index: usize::from(g.spec),
            mode: g.mode,
            profile: g
                .profile
                .and_then(|p| catalog.profile(g.spec, g.mode, p))
                .map(|p| p.id.clone()),
            profile_tier,
            slots: g.slot_cap,
            sessions: g.held,
            sessions_by_tier: by_tier
                .into_iter()
                .filter_map(|(t, n)| Some((catalog.tier(t)?.name.clone(), n)))
                .collect(),
            warm,
            steered: g.steered,
            accepting: g.present
                && g.pending_shape.is_none()
                && !g.exclusive
                && spec.is_some_and(GpuSpec::can_stream),
            framebuffer_mb,
            framebuffer_free_mb: framebuffer_mb.saturating_sub(g.used.fb_mb),
            session_framebuffer_mb: g.used.fb_mb.saturating_sub(warm_fb),
            session_mig_slices: g.used.mig_slices.saturating_sub(warm_slices),
            vgpus_created: g.vgpus_created,
        }
    }

    /// Where `session` is, if it holds a slot.
    pub fn session_place(&self, session: &SessionId) -> Option<SessionPlace> {
        let (gpu_idx, slot, tier, state, expires_at) = self.allocation(session)?;
        let fleet = self.fleet();
        let gpu = fleet.gpu(gpu_idx)?;
        let node = fleet.nodes.get(to_usize(gpu.node))?;
        Some(SessionPlace {
            node: node.id.clone(),
            gpu: gpu.id.clone(),
            slot: u32::from(slot),
            tier: fleet.catalog.tier(tier)?.name.clone(),
            state,
            expires_at,
        })
    }

    /// Sessions holding slots on `node`.
    pub fn sessions_on(&self, node: &NodeId) -> Vec<SessionId> {
        let fleet = self.fleet();
        let Some(&idx) = fleet.node_idx.get(node) else {
            return Vec::new();
        };
        let Some(n) = fleet.node(idx) else {
            return Vec::new();
        };
        n.gpus
            .iter()
            .filter_map(|&g| fleet.gpu(g))
            .flat_map(|g| g.slots.iter())
            .filter_map(|s| match s {
                Slot::Held { session } => Some(*session),
                _ => None,
            })
            .collect()
    }
}

/// A model and how each of the catalog's tiers fits it.
fn model_view(catalog: &Catalog, idx: SpecIdx, spec: &GpuSpec) -> PoolModelView {
    let tiers = catalog
        .tiers()
        .iter()
        .enumerate()
        .filter_map(|(t, preset)| {
            let fit = catalog.fit(idx, TierIdx::try_from(t).ok()?);
            Some(tier_fit(catalog, idx, spec, preset, fit))
        })
        .collect();
    PoolModelView {
        model: spec.model.clone(),
        framebuffer_mb: spec.framebuffer.get(),
        mig_slices: spec.mig_compute_slices,
        max_vgpus: spec.max_vgpus,
        can_stream: spec.can_stream(),
        tiers,
    }
}

fn tier_fit(
    catalog: &Catalog,
    idx: SpecIdx,
    spec: &GpuSpec,
    preset: &TierPreset,
    fit: TierFit,
) -> PoolTierFit {
    // What bounds streams whatever the mode: encoder throughput and the driver's session cap.
    let by_encoder =
        u16::try_from(spec.encoder_capacity.milli() / preset.encoder_cost.milli().max(1))
            .unwrap_or(u16::MAX);
    let streams = by_encoder.min(spec.encoder_session_cap.unwrap_or(u16::MAX));
    let by_compute = u16::from(16 / preset.compute_share.sixteenths().max(1));
    let shape = |mode: GpuMode, p: u8, instances: u16| {
        let profile = catalog.profile(idx, mode, p)?;
        let fb = profile.framebuffer.megabytes().get();
        let slices = if mode == GpuMode::Mig {
            profile.mig_slices.unwrap_or(1)
        } else {
            0
        };
        let by_fb = u16::try_from(spec.framebuffer.get() / fb.max(1)).unwrap_or(u16::MAX);
        let by_slices = spec
            .mig_compute_slices
            .checked_div(slices)
            .map_or(u16::MAX, u16::from);
        let compute = if mode.enforces_compute_share() && mode != GpuMode::Mig {
            by_compute
        } else {
            u16::MAX
        };
        let held = instances.min(by_fb).min(by_slices);
        Some(PoolProfileFit {
            profile: profile.id.clone(),
            framebuffer_mb: fb,
            instances: held,
            mig_slices: slices,
            sessions: held.min(streams).min(compute),
        })
    };
    PoolTierFit {
        tier: preset.name.clone(),
        equal: fit.equal.and_then(|(p, n)| shape(GpuMode::EqualSize, p, n)),
        mixed: fit
            .mixed
            .and_then(|(p, n)| shape(GpuMode::MixedSize, p, n.min(spec.max_vgpus))),
        mig: fit.mig.and_then(|p| {
            let n = catalog.profile(idx, GpuMode::Mig, p)?.max_instances;
            shape(GpuMode::Mig, p, n)
        }),
        exclusive_sessions: u16::from(fit.exclusive && streams > 0),
    }
}

/// The pool of `region` and `tier`, added empty if it is not there yet.
fn pool_of<'a>(
    pools: &'a mut Vec<PoolView>,
    region: &RegionName,
    tier: &TierName,
) -> &'a mut PoolView {
    let at = match pools
        .iter()
        .position(|p| &p.region == region && &p.tier == tier)
    {
        Some(i) => i,
        None => {
            pools.push(PoolView {
                region: region.clone(),
                tier: tier.clone(),
                free: 0,
                warm: 0,
                reserved: 0,
                active: 0,
                queued: 0,
            });
            pools.len() - 1
        }
    };
    // `at` is an index just found or just pushed.
    let len = pools.len();
    pools
        .get_mut(at)
        .unwrap_or_else(|| unreachable!("index {at} of {len}"))
}

/// A region name for a node whose region the catalog lost (cannot happen: nodes intern theirs).
fn unknown() -> RegionName {
    RegionName::new("unknown").unwrap_or_else(|_| unreachable!("a valid literal"))
}
