//! The fleet as one round sees it: the engine's [`PoolFleetView`] flattened into a list of
//! GPUs, each with what it can hold of every tier, grouped by region.

use std::collections::BTreeMap;

use framecast_shared::gpu::GpuMode;
use framecast_shared::ids::{GameId, GpuId, NodeId, RegionName, TierName};
use framecast_shared::state::NodeState;

use crate::placement::views::{
    PoolFleetView, PoolGpuView, PoolModelView, PoolNodeView, PoolProfileFit, PoolTierFit,
};

/// A GPU across rounds: its node and its id.
pub(super) type GpuKey = (NodeId, GpuId);

/// One round's view of the fleet.
#[derive(Debug)]
pub(super) struct Snapshot<'v> {
    /// Tier names in the engine's order (smallest first); tiers are indices into this.
    pub(super) tiers: Vec<TierName>,
    /// Every GPU its agent reports, usable or not.
    pub(super) gpus: Vec<SGpu<'v>>,
    /// Usable GPUs per region, as indices into `gpus`, in the engine's order.
    pub(super) regions: BTreeMap<RegionName, Vec<usize>>,
    /// Requests waiting per (region, tier, game).
    pub(super) queued: BTreeMap<(RegionName, usize, GameId), u32>,
}

/// One GPU of the snapshot.
#[derive(Debug)]
pub(super) struct SGpu<'v> {
    pub(super) key: GpuKey,
    pub(super) node: &'v PoolNodeView,
    pub(super) view: &'v PoolGpuView,
    pub(super) model: Option<&'v PoolModelView>,
    /// Its node is ready (suspect or not: a late heartbeat is no reason to re-plan) and the
    /// GPU itself can take sessions.
    pub(super) usable: bool,
    /// The tier its observed profile serves (equal-size).
    pub(super) observed_tier: Option<usize>,
    /// Sessions per tier.
    pub(super) held_by_tier: Vec<u16>,
    /// Idle warm instances the engine knows of.
    pub(super) warm_observed: u16,
}

impl<'v> Snapshot<'v> {
    /// Flattens `view`.
    pub(super) fn new(view: &'v PoolFleetView) -> Self {
        let tiers: Vec<TierName> = view
            .models
            .first()
            .map(|m| m.tiers.iter().map(|t| t.tier.clone()).collect())
            .unwrap_or_default();
        let tier_idx = |name: &TierName| tiers.iter().position(|t| t == name);
        let mut gpus = Vec::new();
        let mut regions: BTreeMap<RegionName, Vec<usize>> = BTreeMap::new();
        for node in &view.nodes {
            for gpu in &node.gpus {
                let model = view.models.get(gpu.model_index);
                let usable = node.state == NodeState::Ready
                    && gpu.accepting
                    && model.is_some_and(|m| m.can_stream);
                let mut held_by_tier = vec![0u16; tiers.len()];
                for (name, n) in &gpu.sessions_by_tier {
                    if let Some(h) = tier_idx(name).and_then(|t| held_by_tier.get_mut(t)) {
                        *h += n;
                    }
                }
                if usable {
                    regions
                        .entry(node.region.clone())
                        .or_default()
                        .push(gpus.len());
                }
                gpus.push(SGpu {
                    key: (node.node_id.clone(), gpu.gpu.clone()),
                    node,
                    view: gpu,
                    model,
                    usable,
                    observed_tier: gpu.profile_tier.as_ref().and_then(tier_idx),
                    held_by_tier,
                    warm_observed: u16::try_from(gpu.warm.len()).unwrap_or(u16::MAX),
                });
            }
        }
        let mut queued = BTreeMap::new();
        for q in &view.queued {
            if let Some(t) = tier_idx(&q.tier) {
                *queued
                    .entry((q.region.clone(), t, q.game.clone()))
                    .or_default() += q.count;
            }
        }
        Self {
            tiers,
            gpus,
            regions,
            queued,
        }
    }

    /// The index of the tier named `name`.
    pub(super) fn tier(&self, name: &TierName) -> Option<usize> {
        self.tiers.iter().position(|t| t == name)
    }

    /// A GPU by index.
    pub(super) fn gpu(&self, gi: usize) -> Option<&SGpu<'v>> {
        self.gpus.get(gi)
    }
}

impl SGpu<'_> {
    /// Sessions on it.
    pub(super) fn held(&self) -> u16 {
        self.view.sessions
    }

    /// Its sharing mode.
    pub(super) fn mode(&self) -> GpuMode {
        self.view.mode
    }

    /// How tier `t` fits its model.
    pub(super) fn fit(&self, t: usize) -> Option<&PoolTierFit> {
        self.model?.tiers.get(t)
    }

    /// The profile (or MIG shape) a session of tier `t` takes on it in its mode.
    pub(super) fn profile_fit(&self, t: usize) -> Option<&PoolProfileFit> {
        let fit = self.fit(t)?;
        match self.mode() {
            GpuMode::EqualSize => fit.equal.as_ref(),
            GpuMode::MixedSize => fit.mixed.as_ref(),
            GpuMode::Mig => fit.mig.as_ref(),
            GpuMode::Exclusive => None,
        }
    }

    /// Streams of tier `t` it holds when it holds only that tier (0 if it cannot hold any).
    pub(super) fn sessions_cap(&self, t: usize) -> u16 {
        match self.mode() {
            GpuMode::Exclusive => self.fit(t).map_or(0, |f| f.exclusive_sessions),
            _ => self.profile_fit(t).map_or(0, |p| p.sessions),
        }
    }

    /// Equal-size: vGPU slots of tier `t`'s profile.
    pub(super) fn slots_for(&self, t: usize) -> u16 {
        self.fit(t)
            .and_then(|f| f.equal.as_ref())
            .map_or(0, |p| p.instances)
    }

    /// Sessions of tier `t` on it.
    pub(super) fn held_of(&self, t: usize) -> u16 {
        self.held_by_tier.get(t).copied().unwrap_or(0)
    }

    /// Its region.
    pub(super) fn region(&self) -> &RegionName {
        &self.node.region
    }
}
