//! The simulation's event queue: a calendar of one bucket per simulated second, and a small
//! heap for the second being run. Pushing is O(1) for any later second; events come out in
//! time order, ties in the order they were pushed, so a run is deterministic.
//!
//! A day of a 10 000-node fleet schedules millions of session ends hours ahead; a single
//! binary heap over all of them costs a log factor on every push and pop that this avoids.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use rustc_hash::FxHashMap;

/// Events of type `E` by the millisecond they are due.
#[derive(Debug)]
pub(super) struct Calendar<E: Ord> {
    /// Events due in each later second, unsorted; only seconds that have events have an
    /// entry, so a 30-day run costs nothing for the seconds nobody uses.
    buckets: FxHashMap<u64, Vec<(u64, u64, E)>>,
    /// The current second's events, in order.
    now: BinaryHeap<Reverse<(u64, u64, E)>>,
    /// The second `now` holds.
    second: u64,
    /// The last second of the run: events due later are dropped.
    last: u64,
    /// The time of the last event popped: nothing runs before it.
    clock_ms: u64,
    /// Push order, for ties.
    order: u64,
}

impl<E: Ord + Copy> Calendar<E> {
    /// A calendar for a run of `duration_s` seconds: events due later are dropped.
    pub(super) fn new(duration_s: u64) -> Self {
        Self {
            buckets: FxHashMap::default(),
            now: BinaryHeap::new(),
            second: 0,
            last: duration_s.saturating_add(1),
            clock_ms: 0,
            order: 0,
        }
    }

    /// Schedules `event` at `at_ms`; a time before the last event popped is taken as that
    /// time (time never runs backwards), after what is already due then.
    pub(super) fn push(&mut self, at_ms: u64, event: E) {
        self.order += 1;
        let at_ms = at_ms.max(self.clock_ms);
        let second = at_ms / 1000;
        if second <= self.second {
            self.now.push(Reverse((at_ms, self.order, event)));
        } else if second <= self.last {
            self.buckets
                .entry(second)
                .or_default()
                .push((at_ms, self.order, event));
        }
    }

    /// The next event and when it is due, or `None` when the run is over.
    pub(super) fn pop(&mut self) -> Option<(u64, E)> {
        loop {
            if let Some(Reverse((at, _, e))) = self.now.pop() {
                self.clock_ms = at;
                return Some((at, e));
            }
            if self.second >= self.last {
                return None;
            }
            self.second += 1;
            if let Some(bucket) = self.buckets.remove(&self.second) {
                self.now = bucket.into_iter().map(Reverse).collect();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_come_out_in_time_order_ties_in_push_order() {
        let mut c = Calendar::new(10);
        let mut rng = fastrand::Rng::with_seed(3);
        let mut pushed = Vec::new();
        for i in 0..2000u32 {
            let at = rng.u64(0..10_000);
            c.push(at, i);
            pushed.push((at, i));
        }
        // Ties: the earlier push first.
        c.push(5_000, 9_000);
        c.push(5_000, 9_001);
        pushed.push((5_000, 9_000));
        pushed.push((5_000, 9_001));
        pushed.sort_by_key(|&(at, i)| (at, i));
        let mut out = Vec::new();
        while let Some(x) = c.pop() {
            out.push(x);
        }
        assert_eq!(out, pushed);
    }

    #[test]
    fn a_push_while_running_a_second_lands_in_order_and_late_events_drop() {
        let mut c = Calendar::new(3);
        c.push(1_100, 'a');
        c.push(1_900, 'c');
        assert_eq!(c.pop(), Some((1_100, 'a')));
        // During second 1: an event later in that second, and one in the past, which runs
        // now (time does not go back).
        c.push(1_500, 'b');
        c.push(200, 'z');
        c.push(60_000, 'x');
        assert_eq!(c.pop(), Some((1_100, 'z')));
        assert_eq!(c.pop(), Some((1_500, 'b')));
        assert_eq!(c.pop(), Some((1_900, 'c')));
        assert_eq!(c.pop(), None);
    }
}
