//! The genre-weighted score: how good one GPU is for one session.
//!
//! Higher is better. Each term is normalised to about `0..=1` and multiplied by a weight:
//!
//! - **alignment** — Tetris-style: the cosine between the session's demand vector
//!   (framebuffer, compute, encoder, CPU, each as a share of the GPU's or node's capacity) and
//!   what the GPU has left; a GPU whose spare capacity has the shape of the demand scores high.
//! - **fill** — the GPU's occupancy after placement; rewarded for `pack` genres, penalised
//!   for `spread` ones while the region has empty GPUs to spare (the penalty turns into a
//!   reward as they run out, so a full region keeps GPUs that can empty out and change
//!   profile).
//! - **fragmentation** — the growth of capacity that the expected tier mix cannot use (as in
//!   fragmentation-gradient scheduling): profiling an empty equal-size GPU strands its other
//!   slots for every tier that does not use the profile; filling a partial GPU shrinks the
//!   stranded part. Spread genres weigh it less, since spreading is what they want.
//! - **neighbour** — contention: the genre's sensitivity times the load already on the GPU,
//!   plus the genre's load times the sensitivity of the sessions already there.
//! - **warm** — a warm instance of the game is waiting: no launch time.
//! - **reprofile** — an empty equal-size GPU holding vGPUs of another profile must destroy
//!   and recreate them.
//! - **overcommit** — compute past the GPU's whole on modes where compute is soft.
//! - **drain** — while empty GPUs are scarce, refilling a GPU with few sessions left costs
//!   the chance of it running empty and taking any profile; convex in its free share, so the
//!   nearly empty ones are spared most.
//! - **rtt** — the player's round trip to the region as a share of the genre's cap.

use serde::Serialize;

use framecast_shared::genre::{GenreProfile, PlacementStrategy};
use framecast_shared::gpu::GpuMode;

use super::catalog::{Catalog, TierIdx};
use super::fleet::{Demand, FULL_COMPUTE, Gpu, Node, SlotPlan};

/// Weights of the score's terms.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Weights {
    /// Tetris alignment.
    pub alignment: f64,
    /// Fill (sign set by the genre's strategy).
    pub fill: f64,
    /// Fragmentation growth.
    pub fragmentation: f64,
    /// Neighbour contention.
    pub neighbour: f64,
    /// Warm instance bonus.
    pub warm: f64,
    /// Re-profiling cost.
    pub reprofile: f64,
    /// Soft compute oversubscription.
    pub overcommit: f64,
    /// Keeping nearly empty GPUs draining while empty GPUs are scarce.
    pub drain: f64,
    /// Player RTT.
    pub rtt: f64,
    /// Factor on the fragmentation weight for `spread` genres while the region has plenty of
    /// empty GPUs; it rises to 1 as they run out.
    pub spread_fragmentation_factor: f64,
    /// Share of a region's GPUs that may stay empty before `spread` genres stop spreading:
    /// above it they spread fully, below it they lean to packing in proportion.
    pub spread_reserve: f64,
}

impl Default for Weights {
    fn default() -> Self {
        Self {
            alignment: 0.5,
            fill: 1.0,
            fragmentation: 1.0,
            neighbour: 1.0,
            warm: 3.0,
            reprofile: 0.5,
            overcommit: 2.0,
            drain: 8.0,
            rtt: 0.5,
            spread_fragmentation_factor: 0.25,
            spread_reserve: 0.2,
        }
    }
}

/// The terms of one candidate's score, already weighted, and their sum.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct ScoreBreakdown {
    /// Weighted alignment.
    pub alignment: f64,
    /// Weighted fill.
    pub fill: f64,
    /// Weighted fragmentation growth (≤ 0 when it grows).
    pub fragmentation: f64,
    /// Weighted neighbour contention (≤ 0).
    pub neighbour: f64,
    /// Weighted warm bonus.
    pub warm: f64,
    /// Weighted re-profiling cost (≤ 0).
    pub reprofile: f64,
    /// Weighted oversubscription (≤ 0).
    pub overcommit: f64,
    /// Weighted cost of refilling a GPU that is draining (≤ 0).
    pub drain: f64,
    /// Weighted RTT (≤ 0).
    pub rtt: f64,
    /// The sum.
    pub total: f64,
}

/// What the score needs beyond the GPU and the demand.
#[derive(Debug, Clone, Copy)]
pub struct ScoreContext<'a> {
    /// The weights.
    pub weights: &'a Weights,
    /// The session's genre.
    pub genre: &'a GenreProfile,
    /// Expected share of each tier among requests, summing to about 1.
    pub tier_mix: &'a [f64],
    /// The player's RTT to the region as a share of the (relaxed) cap.
    pub rtt_share: f64,
    /// Share of the region's GPUs that are empty. Spreading costs whole GPUs, so `spread`
    /// genres spread only as far as empty GPUs are plentiful: as they run out, the fill term
    /// turns from spreading to packing and fragmentation weighs in full.
    pub empty_share: f64,
}

/// Scores placing `d` on `gpu` (of `node`) as `plan` says.
pub fn score(
    catalog: &Catalog,
    gpu: &Gpu,
    node: &Node,
    d: &Demand,
    plan: SlotPlan,
    ctx: &ScoreContext<'_>,
) -> ScoreBreakdown {
    let w = ctx.weights;
    let Some(spec) = catalog.spec(gpu.spec) else {
        return ScoreBreakdown::default();
    };
    let fb_total = spec.framebuffer.get().max(1) as f64;
    let enc_total = f64::from(spec.encoder_capacity.milli().max(1));
    let cpu_total = node.cpu_total.map(|c| f64::from(c.max(1)));

    // Alignment: cosine(demand, remaining), both as shares of capacity.
    let fb_left = fb_total - gpu.used.fb_mb as f64;
    let compute_left = f64::from(FULL_COMPUTE.saturating_sub(gpu.used.compute));
    let enc_left = enc_total - f64::from(gpu.used.encoder);
    let demand_fb = if plan.warm { 0.0 } else { d.fb_mb as f64 };
    let mut dv = [
        demand_fb / fb_total,
        f64::from(d.compute) / f64::from(FULL_COMPUTE),
        f64::from(d.encoder) / enc_total,
        0.0,
    ];
    let mut rv = [
        fb_left / fb_total,
        compute_left / f64::from(FULL_COMPUTE),
        enc_left / enc_total,
        0.0,
    ];
    if let Some(cpu) = cpu_total {
        dv[3] = f64::from(d.cpu) / cpu;
        rv[3] = (cpu - f64::from(node.cpu_used)) / cpu;
    }
    let alignment = cosine(&dv, &rv);

    // Fill before and after placement.
    let (fill_before, fill_after) = match gpu.mode {
        GpuMode::EqualSize if !d.exclusive => {
            let cap = f64::from(
                catalog
                    .fit(gpu.spec, d.tier)
                    .equal
                    .map_or(1, |(_, n)| n.max(1)),
            );
            let before = f64::from(gpu.occupied());
            (
                before / cap,
                (before + if plan.warm { 0.0 } else { 1.0 }) / cap,
            )
        }
        _ => (
            gpu.used.fb_mb as f64 / fb_total,
            (gpu.used.fb_mb as f64 + demand_fb) / fb_total,
        ),
    };
    let plenty = (ctx.empty_share / w.spread_reserve.max(f64::EPSILON)).clamp(0.0, 1.0);
    let fill_sign = match ctx.genre.strategy {
        PlacementStrategy::Pack => 1.0,
        PlacementStrategy::Spread => 1.0 - 2.0 * plenty,
    };

    // Fragmentation growth, equal-size only: free slots are stranded for the tiers that do not
    // use the GPU's profile.
    let frag = if gpu.mode == GpuMode::EqualSize && !d.exclusive {
        fragmentation_delta(catalog, gpu, d, plan, ctx.tier_mix)
    } else {
        0.0
    };
    let frag_weight = match ctx.genre.strategy {
        PlacementStrategy::Pack => w.fragmentation,
        PlacementStrategy::Spread => {
            w.fragmentation * (w.spread_fragmentation_factor * plenty + (1.0 - plenty))
        }
    };

    // Neighbours, per slot of capacity.
    let slots = f64::from(gpu.slot_cap.max(1));
    let neighbour = (ctx.genre.neighbour_penalty * f64::from(gpu.load) / 1000.0
        + ctx.genre.load_weight * f64::from(gpu.sensitivity) / 1000.0)
        / slots;

    let soft = !gpu.mode.enforces_compute_share();
    let over = if soft {
        f64::from((gpu.used.compute + d.compute).saturating_sub(FULL_COMPUTE))
            / f64::from(FULL_COMPUTE)
    } else {
        0.0
    };
    let reprofile = plan.reprofile && gpu.vgpus_created > 0;

    // Draining: when empty GPUs are scarce, a GPU with few sessions left is worth letting run
    // empty (it can then take any profile); convex, so the nearly empty ones are spared most.
    let drain = (1.0 - plenty) * (1.0 - fill_before).clamp(0.0, 1.0).powi(2);

    let mut s = ScoreBreakdown {
        alignment: w.alignment * alignment,
        fill: w.fill * fill_sign * fill_after,
        fragmentation: -frag_weight * frag,
        neighbour: -w.neighbour * neighbour,
        warm: if plan.warm { w.warm } else { 0.0 },
        reprofile: if reprofile { -w.reprofile } else { 0.0 },
        overcommit: -w.overcommit * over,
        drain: -w.drain * drain,
        rtt: -w.rtt * ctx.rtt_share,
        total: 0.0,
    };
    s.total = s.alignment
        + s.fill
        + s.fragmentation
        + s.neighbour
        + s.warm
        + s.reprofile
        + s.overcommit
        + s.drain
        + s.rtt;
    s
}

/// How much the share of the GPU stranded for the expected tier mix grows by this placement.
fn fragmentation_delta(
    catalog: &Catalog,
    gpu: &Gpu,
    d: &Demand,
    plan: SlotPlan,
    mix: &[f64],
) -> f64 {
    let Some(p_new) = d.profile else { return 0.0 };
    let cap_new = catalog
        .fit(gpu.spec, d.tier)
        .equal
        .map_or(1, |(_, n)| n.max(1));
    // Share of demand that cannot use a GPU holding profile `p`.
    let stranded_share = |p| {
        let usable: f64 = (0..mix.len())
            .filter_map(|t| TierIdx::try_from(t).ok())
            .filter(|&t| catalog.fit(gpu.spec, t).equal.map(|(q, _)| q) == Some(p))
            .map(|t| mix.get(usize::from(t)).copied().unwrap_or(0.0))
            .sum();
        (1.0 - usable).max(0.0)
    };
    let before = match gpu.profile {
        // An empty GPU serves every tier.
        _ if gpu.occupied() == 0 => 0.0,
        Some(p) => {
            stranded_share(p) * f64::from(gpu.slot_cap.saturating_sub(gpu.occupied()))
                / f64::from(gpu.slot_cap.max(1))
        }
        None => 0.0,
    };
    let free_after = cap_new.saturating_sub(gpu.occupied() + u16::from(!plan.warm));
    let after = stranded_share(p_new) * f64::from(free_after) / f64::from(cap_new);
    after - before
}

fn cosine(a: &[f64; 4], b: &[f64; 4]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na: f64 = a.iter().map(|x| x * x).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| x * x).sum::<f64>().sqrt();
    if na <= f64::EPSILON || nb <= f64::EPSILON {
        0.0
    } else {
        (dot / (na * nb)).clamp(0.0, 1.0)
    }
}
