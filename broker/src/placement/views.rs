//! Read-only views of the engine for the API: nodes with their GPUs, pools per region and
//! tier, and where a session sits.

use serde::Serialize;

use framecast_shared::gpu::GpuMode;
use framecast_shared::ids::{GpuId, NodeId, RegionName, SessionId, TierName};
use framecast_shared::state::{NodeState, SessionState};
use framecast_shared::time::Timestamp;

use super::engine::Engine;
use super::fleet::{Slot, to_usize};

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
