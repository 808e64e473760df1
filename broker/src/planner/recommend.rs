//! The fleet recommendation: nodes per (region, GPU model) the forecast peak needs.

use std::collections::{BTreeMap, BTreeSet};

use rustc_hash::FxHashSet;

use framecast_shared::gpu::GpuMode;
use framecast_shared::ids::{NodeId, RegionName};
use framecast_shared::state::NodeState;

use super::Recommendation;
use super::demand::ceil_u32;
use super::fleet::Snapshot;

/// GPUs of one model in one region.
#[derive(Debug, Default)]
struct ModelGroup<'v> {
    name: &'v str,
    /// GPUs reported, on nodes in any state (the shape of the fleet).
    gpus_known: u32,
    nodes_known: FxHashSet<&'v NodeId>,
    /// GPUs usable now, and the ready nodes they are on.
    gpus_present: u32,
    nodes_present: FxHashSet<&'v NodeId>,
    /// GPUs per mode, to take the commonest.
    modes: BTreeMap<GpuMode, u32>,
    /// A GPU of the commonest mode, to read capacities from.
    sample: BTreeMap<GpuMode, usize>,
}

/// Per region and model: the GPUs and nodes that `need` (sessions plus warm instances per
/// tier, at the forecast peak) takes. Each tier's need is shared among the models that can
/// serve it in proportion to their GPUs; equal-size and exclusive GPUs hold one tier each
/// (whole GPUs per tier), mixed-size and MIG GPUs share theirs among tiers.
pub(super) fn recommend<'v>(
    snap: &Snapshot<'v>,
    need: &BTreeMap<RegionName, Vec<f64>>,
) -> Vec<Recommendation> {
    let mut groups: BTreeMap<(&'v RegionName, usize), ModelGroup<'v>> = BTreeMap::new();
    for (gi, g) in snap.gpus.iter().enumerate() {
        let Some(model) = g.model else { continue };
        if !model.can_stream {
            continue;
        }
        let node = &g.node.node_id;
        let e = groups
            .entry((&g.node.region, g.view.model_index))
            .or_default();
        e.name = &model.model;
        e.gpus_known += 1;
        e.nodes_known.insert(node);
        if g.usable {
            e.gpus_present += 1;
        }
        if g.node.state == NodeState::Ready && g.node.accepts_sessions {
            e.nodes_present.insert(node);
        }
        *e.modes.entry(g.mode()).or_default() += 1;
        e.sample.entry(g.mode()).or_insert(gi);
    }
    let mut out = Vec::new();
    let regions: BTreeSet<&RegionName> = groups.keys().map(|(r, _)| *r).collect();
    for region in regions {
        let tiers_need = need.get(region).cloned().unwrap_or_default();
        let models: Vec<(&(&RegionName, usize), &ModelGroup<'_>)> =
            groups.iter().filter(|((r, _), _)| *r == region).collect();
        // Capacity per model and tier, in the model's commonest mode.
        let cap = |g: &ModelGroup<'_>, t: usize| -> (u16, GpuMode) {
            let Some((&mode, _)) = g.modes.iter().max_by_key(|(m, n)| (**n, **m)) else {
                return (0, GpuMode::EqualSize);
            };
            let c = g
                .sample
                .get(&mode)
                .and_then(|&gi| snap.gpu(gi))
                .map_or(0, |s| s.sessions_cap(t));
            (c, mode)
        };
        let mut gpus_needed: BTreeMap<usize, f64> = BTreeMap::new();
        for (t, &n) in tiers_need.iter().enumerate() {
            if n <= 0.0 || !n.is_finite() {
                continue;
            }
            let capable: u32 = models
                .iter()
                .filter(|(_, g)| cap(g, t).0 > 0)
                .map(|(_, g)| g.gpus_known)
                .sum();
            if capable == 0 {
                continue;
            }
            for ((_, m), g) in &models {
                let (c, mode) = cap(g, t);
                if c == 0 {
                    continue;
                }
                let share = n * f64::from(g.gpus_known) / f64::from(capable);
                let gpus = share / f64::from(c);
                let add = match mode {
                    GpuMode::EqualSize | GpuMode::Exclusive => f64::from(ceil_u32(gpus)),
                    GpuMode::MixedSize | GpuMode::Mig => gpus,
                };
                *gpus_needed.entry(*m).or_default() += add;
            }
        }
        for ((_, m), g) in &models {
            let gpus = ceil_u32(gpus_needed.get(m).copied().unwrap_or(0.0));
            let nodes_known = u32::try_from(g.nodes_known.len())
                .unwrap_or(u32::MAX)
                .max(1);
            let per_node = (g.gpus_known / nodes_known).max(1);
            out.push(Recommendation {
                region: region.clone(),
                model: g.name.to_owned(),
                gpus_needed: gpus,
                gpus_present: g.gpus_present,
                nodes_needed: gpus.div_ceil(per_node),
                nodes_present: u32::try_from(g.nodes_present.len()).unwrap_or(u32::MAX),
                gpus_per_node: per_node,
            });
        }
    }
    out
}
