//! How few GPUs any placement could use for a snapshot of demand.
//!
//! Two bounds for a fleet of one GPU model in one mode:
//!
//! - the **volume bound**: for each resource (framebuffer, compute where enforced, encoder
//!   throughput, encoder sessions, vGPU slots), the total demand divided by one GPU's
//!   capacity, rounded up; the largest of these. No placement can beat the tightest resource.
//! - the **exact** minimum for small cases: enumerate every way one GPU can be filled (a
//!   configuration: how many sessions of each tier) under the mode's rules, then find the
//!   fewest configurations that cover the demand by dynamic programming over the demand
//!   vector — the configuration ILP of bin packing, solved exactly while the state space is
//!   small.
//!
//! The simulator reports a strategy's GPU count against these to show what fragmentation costs.

use serde::Serialize;

use framecast_shared::gpu::{GpuMode, GpuSpec, VgpuClass};
use framecast_shared::tier::TierPreset;

/// Largest number of demand states the exact search visits.
pub const EXACT_STATE_LIMIT: usize = 250_000;

/// Lower bounds on GPUs for one demand snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Bound {
    /// The volume bound.
    pub volume: u64,
    /// The resource that sets it.
    pub binding: &'static str,
    /// The exact minimum, when the case was small enough to solve.
    pub exact: Option<u64>,
}

/// What one session of a tier takes from a GPU of `spec` in `mode`, or `None` if it cannot run
/// there.
#[derive(Debug, Clone, Copy)]
struct Need {
    fb: u64,
    compute: u32,
    encoder: u32,
    profile: Option<usize>,
    per_gpu_limit: u16,
}

fn need(spec: &GpuSpec, mode: GpuMode, tier: &TierPreset) -> Option<Need> {
    if !spec.can_stream() {
        return None;
    }
    let vw = VgpuClass::VirtualWorkstation;
    let compute = u32::from(tier.compute_share.sixteenths());
    let encoder = tier.encoder_cost.milli();
    match mode {
        GpuMode::Exclusive => (tier.framebuffer.megabytes() <= spec.framebuffer).then_some(Need {
            fb: spec.framebuffer.get(),
            compute: 16,
            encoder,
            profile: None,
            per_gpu_limit: 1,
        }),
        GpuMode::EqualSize | GpuMode::MixedSize => {
            let p = spec.smallest_profile_for(mode, vw, tier.framebuffer)?;
            let index = spec.profiles(mode).iter().position(|q| q == p)?;
            let limit = if mode == GpuMode::EqualSize {
                p.max_instances
            } else {
                p.max_instances_mixed?
            };
            Some(Need {
                fb: p.framebuffer.megabytes().get(),
                compute,
                encoder,
                profile: Some(index),
                per_gpu_limit: limit.min(spec.max_vgpus),
            })
        }
        GpuMode::Mig => {
            let p = spec
                .profiles(mode)
                .iter()
                .filter(|p| p.framebuffer >= tier.framebuffer)
                .min_by_key(|p| p.framebuffer)?;
            let index = spec.profiles(mode).iter().position(|q| q == p)?;
            Some(Need {
                fb: p.framebuffer.megabytes().get(),
                compute: u32::from(p.mig_slices.unwrap_or(1)),
                encoder,
                profile: Some(index),
                per_gpu_limit: p.max_instances,
            })
        }
    }
}

/// Whether one GPU holds `counts[t]` sessions of each tier.
fn fits(spec: &GpuSpec, mode: GpuMode, needs: &[Option<Need>], counts: &[u16]) -> bool {
    let mut fb = 0u64;
    let mut compute = 0u32;
    let mut encoder = 0u32;
    let mut sessions = 0u16;
    let mut profiles: Vec<(usize, u16, u16)> = Vec::new();
    for (need, &n) in needs.iter().zip(counts) {
        if n == 0 {
            continue;
        }
        let Some(need) = need else { return false };
        fb += need.fb * u64::from(n);
        compute += need.compute * u32::from(n);
        encoder += need.encoder * u32::from(n);
        sessions += n;
        if let Some(p) = need.profile {
            match profiles.iter_mut().find(|(q, _, _)| *q == p) {
                Some(e) => e.1 += n,
                None => profiles.push((p, n, need.per_gpu_limit)),
            }
        } else if n > need.per_gpu_limit {
            return false;
        }
    }
    let within_profiles = profiles.iter().all(|&(_, n, limit)| n <= limit);
    let one_profile = mode != GpuMode::EqualSize || profiles.len() <= 1;
    let compute_ok = match mode {
        GpuMode::Mig => compute <= u32::from(spec.mig_compute_slices),
        GpuMode::MixedSize => true,
        _ => compute <= 16,
    };
    within_profiles
        && one_profile
        && compute_ok
        && fb <= spec.framebuffer.get()
        && encoder <= spec.encoder_capacity.milli()
        && spec.encoder_session_cap.is_none_or(|c| sessions <= c)
        && sessions <= spec.max_vgpus.max(1)
}

/// The bounds for `counts[t]` sessions of each of `tiers` on GPUs of `spec` in `mode`.
/// `None` when some demanded tier cannot run on such a GPU at all.
pub fn lower_bound(
    spec: &GpuSpec,
    mode: GpuMode,
    tiers: &[TierPreset],
    counts: &[u32],
) -> Option<Bound> {
    let needs: Vec<Option<Need>> = tiers.iter().map(|t| need(spec, mode, t)).collect();
    let mut totals = [0f64; 5];
    for (need, &n) in needs.iter().zip(counts) {
        if n == 0 {
            continue;
        }
        let need = need.as_ref()?;
        let n = f64::from(n);
        totals[0] += need.fb as f64 * n;
        totals[1] += f64::from(need.compute) * n;
        totals[2] += f64::from(need.encoder) * n;
        totals[3] += n;
        // Slots: one profile per GPU in equal-size (and one session in exclusive), so the
        // shares add up; in mixed-size and MIG each profile's limit binds on its own.
        let share = n / f64::from(need.per_gpu_limit.max(1));
        totals[4] = match mode {
            GpuMode::EqualSize | GpuMode::Exclusive => totals[4] + share,
            GpuMode::MixedSize | GpuMode::Mig => totals[4].max(share),
        };
    }
    let caps = [
        ("framebuffer", spec.framebuffer.get() as f64),
        (
            "compute",
            if mode == GpuMode::MixedSize {
                f64::INFINITY
            } else if mode == GpuMode::Mig {
                f64::from(spec.mig_compute_slices)
            } else {
                16.0
            },
        ),
        ("encoder", f64::from(spec.encoder_capacity.milli())),
        (
            "encoder sessions",
            spec.encoder_session_cap.map_or(f64::INFINITY, f64::from),
        ),
        ("vgpu slots", 1.0),
    ];
    let (binding, volume) = caps
        .iter()
        .zip(totals)
        .map(|((name, cap), total)| {
            (
                *name,
                if cap.is_finite() && *cap > 0.0 {
                    (total / cap - 1e-9).ceil().max(0.0)
                } else {
                    0.0
                },
            )
        })
        .fold(("framebuffer", 0.0f64), |best, cur| {
            if cur.1 > best.1 { cur } else { best }
        });
    // Non-negative and far below u64::MAX for any demand a u32 count can express.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let volume = volume as u64;
    Some(Bound {
        volume,
        binding,
        exact: exact(spec, mode, &needs, counts),
    })
}

/// The exact minimum by dynamic programming over demand vectors, or `None` past
/// [`EXACT_STATE_LIMIT`].
fn exact(spec: &GpuSpec, mode: GpuMode, needs: &[Option<Need>], counts: &[u32]) -> Option<u64> {
    let dims: Vec<usize> = counts
        .iter()
        .map(|&c| usize::try_from(c).ok().map(|c| c + 1))
        .collect::<Option<_>>()?;
    let states = dims
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .filter(|&s| s <= EXACT_STATE_LIMIT)?;
    // Maximal-ish configurations: every vector of per-tier counts, each up to what one GPU
    // could hold of that tier alone and up to the demand, that fits.
    let per_tier_max: Vec<u16> = needs
        .iter()
        .zip(counts)
        .map(|(n, &c)| {
            n.map_or(0, |n| n.per_gpu_limit)
                .min(u16::try_from(c).unwrap_or(u16::MAX))
        })
        .collect();
    let mut configs: Vec<Vec<u16>> = Vec::new();
    let mut current = vec![0u16; needs.len()];
    enumerate(
        spec,
        mode,
        needs,
        &per_tier_max,
        0,
        &mut current,
        &mut configs,
    );
    configs.retain(|c| c.iter().any(|&n| n > 0));
    if configs.is_empty() {
        return counts.iter().all(|&c| c == 0).then_some(0);
    }
    // best[s] = fewest GPUs covering demand vector s (mixed radix over dims).
    let mut best = vec![u32::MAX; states];
    if let Some(b) = best.get_mut(0) {
        *b = 0;
    }
    let mut digits = vec![0usize; dims.len()];
    for s in 1..states {
        decode(s, &dims, &mut digits);
        let mut min = u32::MAX;
        for c in &configs {
            let mut prev = 0usize;
            let mut stride = 1usize;
            for (i, &d) in digits.iter().enumerate() {
                let take = usize::from(c.get(i).copied().unwrap_or(0));
                prev += d.saturating_sub(take) * stride;
                stride *= dims.get(i).copied().unwrap_or(1);
            }
            if prev != s
                && let Some(&v) = best.get(prev)
            {
                min = min.min(v.saturating_add(1));
            }
        }
        if let Some(b) = best.get_mut(s) {
            *b = min;
        }
    }
    best.last()
        .filter(|&&v| v != u32::MAX)
        .map(|&v| u64::from(v))
}

fn enumerate(
    spec: &GpuSpec,
    mode: GpuMode,
    needs: &[Option<Need>],
    max: &[u16],
    i: usize,
    current: &mut Vec<u16>,
    out: &mut Vec<Vec<u16>>,
) {
    if i == needs.len() {
        if fits(spec, mode, needs, current) {
            out.push(current.clone());
        }
        return;
    }
    for n in 0..=max.get(i).copied().unwrap_or(0) {
        if let Some(c) = current.get_mut(i) {
            *c = n;
        }
        // Adding more of this tier only makes it harder to fit.
        if n > 0 && !fits(spec, mode, needs, current) {
            break;
        }
        enumerate(spec, mode, needs, max, i + 1, current, out);
    }
    if let Some(c) = current.get_mut(i) {
        *c = 0;
    }
}

fn decode(mut s: usize, dims: &[usize], digits: &mut [usize]) {
    for (d, &dim) in digits.iter_mut().zip(dims) {
        *d = s % dim;
        s /= dim;
    }
}

#[cfg(test)]
mod tests {
    use framecast_shared::gpu::models;

    use super::*;

    fn b(spec: &GpuSpec, mode: GpuMode, counts: &[u32]) -> Bound {
        lower_bound(spec, mode, &TierPreset::defaults(), counts).unwrap()
    }

    #[test]
    fn equal_size_is_one_profile_per_gpu() {
        let l4 = models::l4();
        // 12 × 720p fill one L4-2Q GPU; 6 × 1080p one L4-4Q GPU.
        assert_eq!(
            b(&l4, GpuMode::EqualSize, &[12, 6, 0]),
            Bound {
                volume: 2,
                binding: "framebuffer",
                exact: Some(2)
            }
        );
        // One 720p and one 4K: framebuffer says one GPU would do, but equal-size needs two.
        let bound = b(&l4, GpuMode::EqualSize, &[1, 0, 1]);
        assert_eq!((bound.volume, bound.exact), (1, Some(2)));
    }

    #[test]
    fn mixed_size_shares_a_gpu_between_tiers() {
        let l4 = models::l4();
        // 2Q ×4 (8 GB) + 8Q ×2 (16 GB) = 24 GB fits one L4 in mixed-size mode.
        assert_eq!(b(&l4, GpuMode::MixedSize, &[4, 0, 2]).exact, Some(1));
        // Mixed-size caps 8Q at 2 per GPU: three 4K sessions need two GPUs.
        assert_eq!(b(&l4, GpuMode::MixedSize, &[0, 0, 3]).exact, Some(2));
    }

    #[test]
    fn encoder_can_bind() {
        // A10: one NVENC engine, 6 units; 4K costs 4, so one 4K stream per GPU. The volume
        // bound (12 units over 6 per GPU) says two; only the exact count sees three.
        let bound = b(&models::a10(), GpuMode::EqualSize, &[0, 0, 3]);
        assert_eq!(
            (bound.volume, bound.binding, bound.exact),
            (2, "encoder", Some(3))
        );
    }

    #[test]
    fn exclusive_is_one_session_per_gpu() {
        assert_eq!(
            b(&models::l4(), GpuMode::Exclusive, &[5, 3, 2]).exact,
            Some(10)
        );
    }

    #[test]
    fn gpus_without_nvenc_hold_nothing() {
        assert_eq!(
            lower_bound(
                &models::h100_80gb("NVIDIA H100 PCIe"),
                GpuMode::Mig,
                &TierPreset::defaults(),
                &[1, 0, 0]
            ),
            None
        );
    }

    #[test]
    fn large_cases_give_the_volume_bound_only() {
        let bound = b(
            &models::l4(),
            GpuMode::EqualSize,
            &[100_000, 100_000, 100_000],
        );
        assert_eq!(bound.exact, None);
        assert!(bound.volume >= 100_000 * 2 / 24 + 100_000 * 4 / 24 + 100_000 * 8 / 24);
    }

    #[test]
    fn the_exact_count_is_never_below_the_volume_bound() {
        let l4 = models::l4();
        for a in 0..14 {
            for c in 0..5 {
                let bound = b(&l4, GpuMode::MixedSize, &[a, 3, c]);
                assert!(bound.exact.unwrap() >= bound.volume, "{a} {c}: {bound:?}");
            }
        }
    }
}
