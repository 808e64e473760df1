//! Indices over the fleet, so a decision looks at a handful of GPUs instead of scanning.
//!
//! Every GPU that can take a session sits in the sets below that describe it; a mutation
//! takes the GPU out of all of them, changes it, and puts it back where it now belongs
//! ([`Indices::remove`], [`Indices::insert`]). Each set exists twice: an insertion-ordered
//! [`SampleSet`] for O(1) sampling and a [`DenseSet`] for the lowest index (first-fit,
//! round-robin).

use indexmap::IndexSet;
use rustc_hash::{FxBuildHasher, FxHashMap};

use super::catalog::{GameIdx, ProfileIdx, RegionIdx, SpecIdx, TierIdx};
use super::dense_set::{DenseSet, SampleSet};
use super::fleet::GpuIdx;

type FxIndexSet<T> = IndexSet<T, FxBuildHasher>;

/// Which sets a GPU belongs to. Stored on the GPU so removal needs no search.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Membership {
    /// Equal-size GPU with a profile and `free` unoccupied slots (at least one).
    pub partial: Option<(ProfileIdx, u16)>,
    /// No slot occupied: may take any profile, or a whole-GPU session.
    pub empty: bool,
    /// Mixed-size or MIG GPU with room for another vGPU.
    pub flex: bool,
}

/// GPUs of one (region, model, profile), bucketed by free slots.
///
/// Within a bucket GPUs are handed out lowest index first. That stable order matters: new
/// sessions keep going to the same GPUs, so the others drain and can empty out and change
/// profile, as under first-fit; an arbitrary order would scatter sessions and strand capacity.
#[derive(Debug, Default)]
pub struct Buckets {
    /// `by_free[n]` holds the GPUs with `n` free slots; `by_free[0]` stays empty.
    by_free: Vec<DenseSet>,
    /// Bit `n` is set when `by_free[n]` is not empty.
    mask: u64,
    ordered: DenseSet,
    /// The same members, for O(1) uniform sampling.
    items: SampleSet,
}

impl Buckets {
    fn insert(&mut self, gpu: GpuIdx, free: u16) {
        let n = bucket(free);
        if self.by_free.len() <= n {
            self.by_free.resize_with(n + 1, DenseSet::default);
        }
        if let Some(set) = self.by_free.get_mut(n) {
            set.insert(gpu);
            self.mask |= 1 << n;
        }
        self.ordered.insert(gpu);
        self.items.insert(gpu);
    }

    fn remove(&mut self, gpu: GpuIdx, free: u16) {
        let n = bucket(free);
        if let Some(set) = self.by_free.get_mut(n) {
            set.remove(gpu);
            if set.is_empty() {
                self.mask &= !(1 << n);
            }
        }
        self.ordered.remove(gpu);
        self.items.remove(gpu);
    }

    /// Up to `k` GPUs, fullest first (fewest free slots) when `fullest_first`, else emptiest
    /// first.
    pub fn take(&self, k: usize, fullest_first: bool, out: &mut Vec<GpuIdx>) {
        let mut mask = self.mask;
        let mut taken = 0;
        while mask != 0 && taken < k {
            let n = if fullest_first {
                mask.trailing_zeros()
            } else {
                63 - mask.leading_zeros()
            };
            mask &= !(1u64 << n);
            let Some(set) = usize::try_from(n).ok().and_then(|n| self.by_free.get(n)) else {
                continue;
            };
            for gpu in set.iter().take(k - taken) {
                out.push(gpu);
                taken += 1;
            }
        }
    }

    /// GPUs in this set, counted over every bucket.
    pub fn len(&self) -> usize {
        self.ordered.len()
    }

    /// Whether no GPU is in this set.
    pub fn is_empty(&self) -> bool {
        self.ordered.is_empty()
    }

    /// The `i`-th GPU in insertion order (for uniform sampling).
    pub fn nth(&self, i: usize) -> Option<GpuIdx> {
        self.items.get_index(i)
    }

    /// GPUs numbered `from` or more, lowest first.
    pub fn iter_from(&self, from: GpuIdx) -> impl Iterator<Item = GpuIdx> + '_ {
        self.ordered.iter_from(from)
    }
}

/// The bucket for `free` slots: GPUs with 63 or more share the last one, so the 64-bit mask
/// covers every bucket.
fn bucket(free: u16) -> usize {
    usize::from(free.min(63))
}

/// A plain set with both an order of insertion and an order of index.
#[derive(Debug, Default)]
pub struct Set {
    items: SampleSet,
    ordered: DenseSet,
}

impl Set {
    fn insert(&mut self, gpu: GpuIdx) {
        self.items.insert(gpu);
        self.ordered.insert(gpu);
    }

    fn remove(&mut self, gpu: GpuIdx) {
        self.items.remove(gpu);
        self.ordered.remove(gpu);
    }

    /// Up to `k` members, in insertion order.
    pub fn take(&self, k: usize, out: &mut Vec<GpuIdx>) {
        out.extend(self.items.iter().take(k));
    }

    /// Members.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether the set has no members.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// The `i`-th member in insertion order.
    pub fn nth(&self, i: usize) -> Option<GpuIdx> {
        self.items.get_index(i)
    }

    /// Members numbered `from` or more, lowest first.
    pub fn iter_from(&self, from: GpuIdx) -> impl Iterator<Item = GpuIdx> + '_ {
        self.ordered.iter_from(from)
    }
}

/// All placement indices of a fleet.
#[derive(Debug, Default)]
pub struct Indices {
    partial: FxHashMap<(RegionIdx, SpecIdx, ProfileIdx), Buckets>,
    empty: FxHashMap<(RegionIdx, SpecIdx), Set>,
    flex: FxHashMap<(RegionIdx, SpecIdx), Set>,
    warm: FxHashMap<(RegionIdx, GameIdx, TierIdx), FxIndexSet<(GpuIdx, u16)>>,
    /// GPU models present in each region, in order of first sight.
    specs: FxHashMap<RegionIdx, Vec<SpecIdx>>,
    /// GPUs per region.
    gpus: FxHashMap<RegionIdx, usize>,
}

impl Indices {
    /// Share of `region`'s GPUs that are empty (and accepting sessions).
    pub fn empty_share(&self, region: RegionIdx) -> f64 {
        let total = self.gpus.get(&region).copied().unwrap_or(0);
        if total == 0 {
            return 0.0;
        }
        let empty: usize = self
            .specs(region)
            .iter()
            .filter_map(|&s| self.empty(region, s))
            .map(Set::len)
            .sum();
        empty as f64 / total as f64
    }

    /// Notes a new GPU of `spec` in `region`.
    pub fn add_gpu(&mut self, region: RegionIdx, spec: SpecIdx) {
        *self.gpus.entry(region).or_default() += 1;
        self.add_spec(region, spec);
    }

    /// Notes that `spec` occurs in `region` (without counting a GPU).
    pub fn add_spec(&mut self, region: RegionIdx, spec: SpecIdx) {
        let specs = self.specs.entry(region).or_default();
        if !specs.contains(&spec) {
            specs.push(spec);
        }
    }

    /// GPU models present in `region`.
    pub fn specs(&self, region: RegionIdx) -> &[SpecIdx] {
        self.specs.get(&region).map_or(&[], Vec::as_slice)
    }

    /// Puts `gpu` into the sets `m` names.
    pub fn insert(&mut self, gpu: GpuIdx, region: RegionIdx, spec: SpecIdx, m: Membership) {
        if let Some((profile, free)) = m.partial {
            self.partial
                .entry((region, spec, profile))
                .or_default()
                .insert(gpu, free);
        }
        if m.empty {
            self.empty.entry((region, spec)).or_default().insert(gpu);
        }
        if m.flex {
            self.flex.entry((region, spec)).or_default().insert(gpu);
        }
    }

    /// Takes `gpu` out of the sets `m` names.
    pub fn remove(&mut self, gpu: GpuIdx, region: RegionIdx, spec: SpecIdx, m: Membership) {
        if let Some((profile, free)) = m.partial
            && let Some(b) = self.partial.get_mut(&(region, spec, profile))
        {
            b.remove(gpu, free);
        }
        if m.empty
            && let Some(s) = self.empty.get_mut(&(region, spec))
        {
            s.remove(gpu);
        }
        if m.flex
            && let Some(s) = self.flex.get_mut(&(region, spec))
        {
            s.remove(gpu);
        }
    }

    /// Adds or removes one warm slot.
    pub fn set_warm(&mut self, key: (RegionIdx, GameIdx, TierIdx), at: (GpuIdx, u16), on: bool) {
        if on {
            self.warm.entry(key).or_default().insert(at);
        } else if let Some(set) = self.warm.get_mut(&key) {
            set.swap_remove(&at);
        }
    }

    /// Equal-size GPUs of a profile.
    pub fn partial(
        &self,
        region: RegionIdx,
        spec: SpecIdx,
        profile: ProfileIdx,
    ) -> Option<&Buckets> {
        self.partial.get(&(region, spec, profile))
    }

    /// GPUs with nothing on them.
    pub fn empty(&self, region: RegionIdx, spec: SpecIdx) -> Option<&Set> {
        self.empty.get(&(region, spec))
    }

    /// Mixed-size and MIG GPUs with room.
    pub fn flex(&self, region: RegionIdx, spec: SpecIdx) -> Option<&Set> {
        self.flex.get(&(region, spec))
    }

    /// Warm slots of a game at a tier.
    pub fn warm(
        &self,
        region: RegionIdx,
        game: GameIdx,
        tier: TierIdx,
    ) -> impl Iterator<Item = (GpuIdx, u16)> + '_ {
        self.warm
            .get(&(region, game, tier))
            .into_iter()
            .flat_map(|s| s.iter().copied())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_hand_out_fullest_or_emptiest_first() {
        let mut b = Buckets::default();
        b.insert(1, 5);
        b.insert(2, 1);
        b.insert(3, 3);
        b.insert(4, 1);
        let mut out = Vec::new();
        b.take(3, true, &mut out);
        assert_eq!(out, [2, 4, 3]);
        out.clear();
        b.take(2, false, &mut out);
        assert_eq!(out, [1, 3]);
        b.remove(2, 1);
        b.remove(4, 1);
        out.clear();
        b.take(1, true, &mut out);
        assert_eq!(out, [3]);
        assert_eq!(b.iter_from(0).collect::<Vec<_>>(), [1, 3]);
        assert_eq!(b.iter_from(2).next(), Some(3));
        assert_eq!(b.len(), 2);
        assert_eq!((b.nth(0), b.nth(1), b.nth(2)), (Some(1), Some(3), None));
        let mut sampled: Vec<_> = (0..b.len()).filter_map(|i| b.nth(i)).collect();
        sampled.sort_unstable();
        assert_eq!(sampled, [1, 3]);
    }
}
