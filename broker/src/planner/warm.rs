//! The warm buffer: how many idle instances each (region, tier, game) should keep, and which
//! GPUs keep them, within what each GPU's rules allow.

use std::collections::{BTreeMap, BTreeSet};

use framecast_shared::gpu::GpuMode;
use framecast_shared::ids::GameId;

use super::demand::ceil_u32;
use super::fleet::{SGpu, Snapshot};

/// The warm buffer for arrivals at `rate` per second when an instance takes `launch_s`
/// seconds to start: the arrivals expected during one launch plus `z` standard deviations of
/// them (Poisson: mean = variance = rate · launch), rounded up, within `min..=max`.
pub(super) fn buffer(rate: f64, launch_s: f64, z: f64, min: u16, max: u16) -> u16 {
    buffer_raw(rate, launch_s, z)
        .map_or(0, |raw| u16::try_from(ceil_u32(raw)).unwrap_or(u16::MAX))
        .max(min)
        .min(max.max(min))
}

/// The buffer before rounding, or `None` when nothing arrives.
pub(super) fn buffer_raw(rate: f64, launch_s: f64, z: f64) -> Option<f64> {
    let mean = rate * launch_s;
    if !mean.is_finite() || mean <= 0.0 {
        return None;
    }
    let z = if z.is_finite() { z.max(0.0) } else { 0.0 };
    Some(mean + z * mean.sqrt())
}

/// The warm buffer to plan, given the one planned so far and its rounds below: it rises to
/// `wanted` at once; it falls only once `lower` (the buffer of a rate half an instance
/// higher) has been below it for `rounds` rounds in a row, and then to `lower`. So a rate that
/// wobbles around a rounding edge, as any short average does between arrivals, moves no warm
/// instance back and forth. Returns the buffer and its rounds below.
pub(super) fn settle(current: (u16, u32), wanted: u16, lower: u16, rounds: u32) -> (u16, u32) {
    let (buffer, below) = current;
    if wanted >= buffer {
        return (wanted, 0);
    }
    if lower >= buffer {
        return (buffer, 0);
    }
    let below = below.saturating_add(1);
    if below >= rounds.max(1) {
        (lower, 0)
    } else {
        (buffer, below)
    }
}

/// What one GPU can still take in warm instances, after its sessions.
#[derive(Debug, Clone)]
pub(super) enum Room {
    /// Nothing (steered, unplanned equal-size, or no room).
    None,
    /// An equal-size GPU planned for `tier` with `free` slots.
    Equal { tier: usize, free: u16 },
    /// An exclusive-mode GPU with `free` (0 or 1) slots.
    Exclusive { free: u16 },
    /// A mixed-size or MIG GPU: slots, framebuffer, MIG slices, and instances per profile.
    Flex {
        free_slots: u16,
        fb_free_mb: u64,
        slices_free: u16,
        per_profile: BTreeMap<String, u16>,
    },
}

impl Room {
    /// The room of `g`, which is planned for `tier` if equal-size.
    pub(super) fn of(g: &SGpu<'_>, tier: Option<usize>) -> Self {
        let free_slots = g.view.slots.saturating_sub(g.held());
        match g.mode() {
            GpuMode::EqualSize => match tier {
                Some(t) => Room::Equal {
                    tier: t,
                    free: g.slots_for(t).saturating_sub(g.held()),
                },
                None => Room::None,
            },
            GpuMode::Exclusive => Room::Exclusive { free: free_slots },
            GpuMode::MixedSize | GpuMode::Mig => {
                let mut per_profile: BTreeMap<String, u16> = BTreeMap::new();
                for (t, n) in g.held_by_tier.iter().enumerate() {
                    if let (Some(p), true) = (g.profile_fit(t), *n > 0) {
                        *per_profile.entry(p.profile.clone()).or_default() += n;
                    }
                }
                let slices = g.model.map_or(0, |m| u16::from(m.mig_slices));
                Room::Flex {
                    free_slots,
                    fb_free_mb: g
                        .view
                        .framebuffer_mb
                        .saturating_sub(g.view.session_framebuffer_mb),
                    slices_free: if g.mode() == GpuMode::Mig {
                        slices.saturating_sub(g.view.session_mig_slices)
                    } else {
                        u16::MAX
                    },
                    per_profile,
                }
            }
        }
    }

    /// Whether a warm instance of tier `t` could go on `g` at all (ignoring what is used).
    pub(super) fn accepts(&self, g: &SGpu<'_>, t: usize) -> bool {
        match self {
            Room::None => false,
            Room::Equal { tier, .. } => *tier == t,
            Room::Exclusive { .. } => g.sessions_cap(t) > 0,
            Room::Flex { .. } => g.profile_fit(t).is_some(),
        }
    }

    /// Free slots, for ordering candidates.
    pub(super) fn free(&self) -> u16 {
        match self {
            Room::None => 0,
            Room::Equal { free, .. } | Room::Exclusive { free } => *free,
            Room::Flex { free_slots, .. } => *free_slots,
        }
    }

    /// Takes room for one warm instance of tier `t` on `g`, if there is any.
    pub(super) fn take(&mut self, g: &SGpu<'_>, t: usize) -> bool {
        if !self.accepts(g, t) {
            return false;
        }
        match self {
            Room::None => false,
            Room::Equal { free, .. } | Room::Exclusive { free } => {
                if *free == 0 {
                    return false;
                }
                *free -= 1;
                true
            }
            Room::Flex {
                free_slots,
                fb_free_mb,
                slices_free,
                per_profile,
            } => {
                let Some(p) = g.profile_fit(t) else {
                    return false;
                };
                let slices = if g.mode() == GpuMode::Mig {
                    u16::from(p.mig_slices.max(1))
                } else {
                    0
                };
                let count = per_profile.get(&p.profile).copied().unwrap_or(0);
                if *free_slots == 0
                    || *fb_free_mb < p.framebuffer_mb
                    || *slices_free < slices
                    || count >= p.instances
                {
                    return false;
                }
                *free_slots -= 1;
                *fb_free_mb -= p.framebuffer_mb;
                *slices_free -= slices;
                *per_profile.entry(p.profile.clone()).or_default() += 1;
                true
            }
        }
    }
}

/// Warm instances per GPU: (game, tier) → count.
pub(super) type WarmByGpu = BTreeMap<usize, BTreeMap<(GameId, usize), u16>>;

/// Inputs of one region's warm distribution.
pub(super) struct Distribution<'a, 'v> {
    pub(super) snap: &'a Snapshot<'v>,
    /// The region's usable GPUs.
    pub(super) gpus: &'a [usize],
    /// Tentative tier of each equal-size GPU (absent: unplanned).
    pub(super) tier_of: &'a BTreeMap<usize, Option<usize>>,
    /// GPUs that keep no warm instance (steered away).
    pub(super) no_warm: &'a BTreeSet<usize>,
    /// The warm instances planned before, per GPU.
    pub(super) previous: &'a WarmByGpu,
    /// Desired warm instances per (game, tier).
    pub(super) desired: &'a BTreeMap<(GameId, usize), u16>,
}

impl Distribution<'_, '_> {
    /// Where the region's warm instances go: the previous plan where it still fits and is
    /// still wanted (so plans change only where they must), cut back to the desired count on
    /// the GPUs with the fewest sessions first, and what is missing added to GPUs that already
    /// keep that game and tier, then to the GPUs with the most room.
    pub(super) fn run(&self) -> WarmByGpu {
        let mut rooms: BTreeMap<usize, Room> = BTreeMap::new();
        for &gi in self.gpus {
            let Some(g) = self.snap.gpu(gi) else { continue };
            let room = if self.no_warm.contains(&gi) {
                Room::None
            } else {
                Room::of(g, self.tier_of.get(&gi).copied().flatten())
            };
            rooms.insert(gi, room);
        }

        // The previous plan, where the GPU still takes the tier and the key is still wanted.
        let mut seeded: WarmByGpu = BTreeMap::new();
        let mut holders: BTreeMap<(GameId, usize), Vec<usize>> = BTreeMap::new();
        for (&gi, entries) in self.previous {
            let (Some(g), Some(room)) = (self.snap.gpu(gi), rooms.get(&gi)) else {
                continue;
            };
            for (key, &n) in entries {
                let wanted = self.desired.get(key).copied().unwrap_or(0) > 0;
                if n > 0 && wanted && room.accepts(g, key.1) {
                    seeded.entry(gi).or_default().insert(key.clone(), n);
                    holders.entry(key.clone()).or_default().push(gi);
                }
            }
        }

        // Cut keys planned above their buffer, on the GPUs with the fewest sessions first.
        let held = |gi: usize| self.snap.gpu(gi).map_or(0, SGpu::held);
        for (key, gis) in &mut holders {
            let want = u32::from(self.desired.get(key).copied().unwrap_or(0));
            let mut total: u32 = gis
                .iter()
                .filter_map(|gi| seeded.get(gi)?.get(key))
                .map(|&n| u32::from(n))
                .sum();
            gis.sort_by_key(|&gi| (held(gi), gi));
            for &gi in gis.iter() {
                if total <= want {
                    break;
                }
                let Some(n) = seeded.get_mut(&gi).and_then(|e| e.get_mut(key)) else {
                    continue;
                };
                let cut = u32::from(*n).min(total - want);
                *n -= u16::try_from(cut).unwrap_or(*n);
                total -= cut;
            }
        }

        // What still fits each GPU's room.
        let mut out: WarmByGpu = BTreeMap::new();
        let mut planned: BTreeMap<(GameId, usize), u32> = BTreeMap::new();
        for (gi, entries) in &seeded {
            let (Some(g), Some(room)) = (self.snap.gpu(*gi), rooms.get_mut(gi)) else {
                continue;
            };
            for (key, &n) in entries {
                let mut kept = 0u16;
                while kept < n && room.take(g, key.1) {
                    kept += 1;
                }
                if kept > 0 {
                    out.entry(*gi).or_default().insert(key.clone(), kept);
                    *planned.entry(key.clone()).or_default() += u32::from(kept);
                }
            }
        }

        // Add what is missing, biggest shortfall first: on GPUs that keep the key already, then
        // on equal-size GPUs of the tier, then on others, the most room first. Rooms only
        // shrink within a round, so a GPU that cannot take a tier is passed for good.
        let mut short: Vec<((GameId, usize), u32)> = self
            .desired
            .iter()
            .map(|(key, &want)| {
                let have = planned.get(key).copied().unwrap_or(0);
                (key.clone(), u32::from(want).saturating_sub(have))
            })
            .filter(|(_, s)| *s > 0)
            .collect();
        short.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        let mut lists: BTreeMap<usize, (Vec<usize>, usize)> = BTreeMap::new();
        for (key, mut missing) in short {
            let t = key.1;
            let keeps: Vec<usize> = holders.get(&key).cloned().unwrap_or_default();
            for gi in keeps {
                missing = self.fill(&mut rooms, &mut out, gi, &key, missing);
            }
            let (list, cursor) = lists.entry(t).or_insert_with(|| {
                let mut c: Vec<(u8, std::cmp::Reverse<u16>, usize)> = rooms
                    .iter()
                    .filter_map(|(&gi, room)| {
                        let g = self.snap.gpu(gi)?;
                        let group = u8::from(!matches!(room, Room::Equal { .. }));
                        (room.accepts(g, t) && room.free() > 0).then_some((
                            group,
                            std::cmp::Reverse(room.free()),
                            gi,
                        ))
                    })
                    .collect();
                c.sort();
                (c.into_iter().map(|(_, _, gi)| gi).collect(), 0)
            });
            while missing > 0 {
                let Some(&gi) = list.get(*cursor) else { break };
                missing = self.fill(&mut rooms, &mut out, gi, &key, missing);
                if missing > 0 {
                    *cursor += 1;
                }
            }
        }
        out
    }

    /// Adds up to `missing` instances of `key` on `gi` while it has room; returns what is left.
    fn fill(
        &self,
        rooms: &mut BTreeMap<usize, Room>,
        out: &mut WarmByGpu,
        gi: usize,
        key: &(GameId, usize),
        mut missing: u32,
    ) -> u32 {
        let (Some(g), Some(room)) = (self.snap.gpu(gi), rooms.get_mut(&gi)) else {
            return missing;
        };
        let mut added = 0u16;
        while missing > 0 && room.take(g, key.1) {
            added += 1;
            missing -= 1;
        }
        if added > 0 {
            *out.entry(gi).or_default().entry(key.clone()).or_default() += added;
        }
        missing
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_buffer_is_the_mean_plus_z_deviations_within_bounds() {
        // 1/s for 30 s: 30 + 2·√30 = 40.95 → 41.
        assert_eq!(buffer(1.0, 30.0, 2.0, 0, 64), 41);
        assert_eq!(buffer(1.0, 30.0, 2.0, 0, 20), 20);
        assert_eq!(buffer(0.0, 30.0, 2.0, 2, 64), 2);
        assert_eq!(buffer(f64::NAN, 30.0, 2.0, 0, 64), 0);
        assert_eq!(buffer(0.01, 30.0, f64::NAN, 0, 64), 1);
        // A misconfigured min above max keeps the min rather than panicking.
        assert_eq!(buffer(1.0, 30.0, 2.0, 5, 3), 5);
    }

    #[test]
    fn the_buffer_rises_at_once_and_falls_only_after_lasting_rounds() {
        assert_eq!(settle((3, 0), 4, 4, 3), (4, 0));
        // Below for two rounds, then not: stays, and the count restarts.
        assert_eq!(settle((5, 0), 4, 4, 3), (5, 1));
        assert_eq!(settle((5, 1), 4, 4, 3), (5, 2));
        assert_eq!(settle((5, 2), 5, 5, 3), (5, 0));
        // Only the buffer with half an instance to spare counts.
        assert_eq!(settle((5, 2), 4, 5, 3), (5, 0));
        assert_eq!(settle((5, 2), 3, 4, 3), (4, 0));
        assert_eq!(settle((4, 0), 0, 0, 0), (0, 0));
    }
}
