//! Sets of small dense integers (GPU indices) for the placement indices, which move a GPU
//! between sets on every placement and release:
//!
//! - [`DenseSet`]: ascending order, as a two-level bitmap: insert and remove in O(1),
//!   iteration from any value upwards, skipping empty stretches 4 096 values at a time (with
//!   tens of thousands of GPUs a balanced tree spent most of a decision on rebalancing);
//! - [`SampleSet`]: insertion order with swap-removal and O(1) access by position (uniform
//!   sampling), positions kept in an array by value instead of a hash table.

/// A set of `u32` values, ascending.
#[derive(Debug, Clone, Default)]
pub struct DenseSet {
    /// Bit `v % 64` of `words[v / 64]` is set when `v` is a member.
    words: Vec<u64>,
    /// Bit `w % 64` of `summary[w / 64]` is set when `words[w]` is not zero.
    summary: Vec<u64>,
    len: usize,
}

impl DenseSet {
    /// Adds `v`; returns whether it was new.
    pub fn insert(&mut self, v: u32) -> bool {
        let (w, bit) = split(v);
        if self.words.len() <= w {
            self.words.resize(w + 1, 0);
            self.summary.resize(w / 64 + 1, 0);
        }
        let (Some(word), Some(sum)) = (self.words.get_mut(w), self.summary.get_mut(w / 64)) else {
            return false;
        };
        if *word & bit != 0 {
            return false;
        }
        *word |= bit;
        *sum |= 1 << (w % 64);
        self.len += 1;
        true
    }

    /// Removes `v`; returns whether it was a member.
    pub fn remove(&mut self, v: u32) -> bool {
        let (w, bit) = split(v);
        let (Some(word), Some(sum)) = (self.words.get_mut(w), self.summary.get_mut(w / 64)) else {
            return false;
        };
        if *word & bit == 0 {
            return false;
        }
        *word &= !bit;
        if *word == 0 {
            *sum &= !(1 << (w % 64));
        }
        self.len -= 1;
        true
    }

    /// Whether `v` is a member.
    pub fn contains(&self, v: u32) -> bool {
        let (w, bit) = split(v);
        self.words.get(w).is_some_and(|word| word & bit != 0)
    }

    /// How many members.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there are no members.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Members from `from` upwards, ascending.
    pub fn iter_from(&self, from: u32) -> Iter<'_> {
        let (w, _) = split(from);
        let first = self
            .words
            .get(w)
            .map_or(0, |word| word & (!0u64 << (from % 64)));
        Iter {
            set: self,
            word: w,
            bits: first,
        }
    }

    /// Members, ascending.
    pub fn iter(&self) -> Iter<'_> {
        self.iter_from(0)
    }

    /// The first non-zero word after `w`, by the summary.
    fn next_word(&self, w: usize) -> Option<usize> {
        let start = w.checked_add(1)?;
        let mut s = start / 64;
        let mut mask = !0u64 << (start % 64);
        while let Some(&sum) = self.summary.get(s) {
            let live = sum & mask;
            if live != 0 {
                return Some(s * 64 + live.trailing_zeros() as usize);
            }
            s += 1;
            mask = !0;
        }
        None
    }
}

/// Ascending members of a [`DenseSet`].
#[derive(Debug, Clone)]
pub struct Iter<'a> {
    set: &'a DenseSet,
    word: usize,
    /// The members of `word` not yet returned.
    bits: u64,
}

impl Iterator for Iter<'_> {
    type Item = u32;

    fn next(&mut self) -> Option<u32> {
        while self.bits == 0 {
            self.word = self.set.next_word(self.word)?;
            self.bits = self.set.words.get(self.word).copied().unwrap_or(0);
        }
        let bit = self.bits.trailing_zeros();
        self.bits &= self.bits - 1;
        u32::try_from(self.word * 64).ok().map(|base| base + bit)
    }
}

/// A set of `u32` values in insertion order, where removing one moves the last into its
/// place (as `IndexSet::swap_remove`).
#[derive(Debug, Clone, Default)]
pub struct SampleSet {
    items: Vec<u32>,
    /// `pos[v]`: where `v` is in `items`, [`ABSENT`] when it is not a member.
    pos: Vec<u32>,
}

const ABSENT: u32 = u32::MAX;

impl SampleSet {
    /// Adds `v` at the end; returns whether it was new.
    pub fn insert(&mut self, v: u32) -> bool {
        let i = v as usize;
        if self.pos.len() <= i {
            self.pos.resize(i + 1, ABSENT);
        }
        let Ok(at) = u32::try_from(self.items.len()) else {
            return false;
        };
        match self.pos.get_mut(i) {
            Some(p) if *p == ABSENT => {
                *p = at;
                self.items.push(v);
                true
            }
            _ => false,
        }
    }

    /// Removes `v`, moving the last member into its place; returns whether it was a member.
    pub fn remove(&mut self, v: u32) -> bool {
        let Some(p) = self.pos.get_mut(v as usize) else {
            return false;
        };
        if *p == ABSENT {
            return false;
        }
        let at = *p as usize;
        *p = ABSENT;
        self.items.swap_remove(at);
        if let Some(&moved) = self.items.get(at)
            && let Some(mp) = self.pos.get_mut(moved as usize)
        {
            *mp = u32::try_from(at).unwrap_or(ABSENT);
        }
        true
    }

    /// The member at position `i`.
    pub fn get_index(&self, i: usize) -> Option<u32> {
        self.items.get(i).copied()
    }

    /// Members in their order.
    pub fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        self.items.iter().copied()
    }

    /// How many members.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether there are no members.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
}

/// The word of `v` and its bit in it.
fn split(v: u32) -> (usize, u64) {
    // u32 → usize is lossless on every target this builds for (32 and 64 bits).
    (v as usize / 64, 1u64 << (v % 64))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// Any sequence of inserts and removes leaves the same members, in the same order, as
        /// a BTreeSet, from any starting point.
        #[test]
        fn behaves_like_an_ordered_set(
            ops in proptest::collection::vec((any::<bool>(), 0u32..20_000), 0..400),
            from in 0u32..21_000,
        ) {
            let mut dense = DenseSet::default();
            let mut tree = BTreeSet::new();
            for (add, v) in ops {
                if add {
                    prop_assert_eq!(dense.insert(v), tree.insert(v));
                } else {
                    prop_assert_eq!(dense.remove(v), tree.remove(&v));
                }
                prop_assert_eq!(dense.len(), tree.len());
            }
            prop_assert_eq!(dense.iter().collect::<Vec<_>>(), tree.iter().copied().collect::<Vec<_>>());
            prop_assert_eq!(
                dense.iter_from(from).collect::<Vec<_>>(),
                tree.range(from..).copied().collect::<Vec<_>>()
            );
            for v in [0, 63, 64, 4095, 4096, 19_999] {
                prop_assert_eq!(dense.contains(v), tree.contains(&v));
            }
        }
    }

    proptest! {
        /// The same members in the same order as an `IndexSet` with swap-removal.
        #[test]
        fn sample_set_behaves_like_an_index_set(
            ops in proptest::collection::vec((any::<bool>(), 0u32..300), 0..400),
        ) {
            let mut mine = SampleSet::default();
            let mut theirs = indexmap::IndexSet::<u32>::new();
            for (add, v) in ops {
                if add {
                    prop_assert_eq!(mine.insert(v), theirs.insert(v));
                } else {
                    prop_assert_eq!(mine.remove(v), theirs.swap_remove(&v));
                }
                prop_assert_eq!(mine.iter().collect::<Vec<_>>(), theirs.iter().copied().collect::<Vec<_>>());
            }
            for i in 0..theirs.len() + 1 {
                prop_assert_eq!(mine.get_index(i), theirs.get_index(i).copied());
            }
        }
    }

    #[test]
    fn far_apart_members_and_the_edges_of_words() {
        let mut s = DenseSet::default();
        for v in [0, 63, 64, 4095, 4096, 1_000_000] {
            assert!(s.insert(v));
        }
        assert!(!s.insert(64));
        assert_eq!(
            s.iter().collect::<Vec<_>>(),
            [0, 63, 64, 4095, 4096, 1_000_000]
        );
        assert_eq!(s.iter_from(65).collect::<Vec<_>>(), [4095, 4096, 1_000_000]);
        assert!(s.remove(4095) && !s.remove(4095) && !s.remove(7));
        assert_eq!(s.iter_from(4095).next(), Some(4096));
        assert_eq!(s.len(), 5);
        assert_eq!(DenseSet::default().iter_from(5).next(), None);
    }
}
