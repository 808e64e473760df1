//! Requests waiting for capacity: one queue per tier, priority classes, FIFO within a class.

use std::collections::VecDeque;

use rustc_hash::FxHashMap;

use framecast_shared::ids::SessionId;
use framecast_shared::time::Timestamp;

use super::catalog::{GenreIdx, TierIdx};
use super::request::{PlaceRequest, Priority};

/// A request in the queue.
#[derive(Debug, Clone)]
pub struct Waiting {
    /// The request as made.
    pub request: PlaceRequest,
    /// Its tier.
    pub tier: TierIdx,
    /// Its genre.
    pub genre: GenreIdx,
    /// When it joined.
    pub since: Timestamp,
}

/// The rate at which a tier's sessions end, for queue ETAs.
#[derive(Debug, Clone, Copy, Default)]
struct ReleaseRate {
    last: Option<Timestamp>,
    /// Exponentially weighted mean of the time between releases, ms.
    mean_interval_ms: Option<f64>,
}

impl ReleaseRate {
    const ALPHA: f64 = 0.1;

    fn observe(&mut self, now: Timestamp) {
        if let Some(last) = self.last {
            let dt = now.saturating_since(last).as_secs_f64() * 1000.0;
            self.mean_interval_ms = Some(match self.mean_interval_ms {
                None => dt,
                Some(m) => m + Self::ALPHA * (dt - m),
            });
        }
        self.last = Some(now);
    }
}

/// Every tier's queue.
#[derive(Debug, Default)]
pub struct Queues {
    /// `by_tier[tier][priority]`.
    by_tier: Vec<[VecDeque<Waiting>; 3]>,
    index: FxHashMap<SessionId, (TierIdx, Priority)>,
    rates: Vec<ReleaseRate>,
}

impl Queues {
    /// Queues for `tiers` tiers.
    pub fn new(tiers: usize) -> Self {
        Self {
            by_tier: (0..tiers).map(|_| Default::default()).collect(),
            index: FxHashMap::default(),
            rates: vec![ReleaseRate::default(); tiers],
        }
    }

    /// Requests waiting, over all tiers.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// The tiers with at least one request waiting.
    pub fn waiting_tiers(&self) -> impl Iterator<Item = TierIdx> + '_ {
        self.by_tier
            .iter()
            .enumerate()
            .filter(|(_, classes)| classes.iter().any(|c| !c.is_empty()))
            .filter_map(|(i, _)| TierIdx::try_from(i).ok())
    }

    /// Whether `session` waits.
    pub fn contains(&self, session: &SessionId) -> bool {
        self.index.contains_key(session)
    }

    /// Requests of `tier` in classes at or above `priority`.
    pub fn ahead_of(&self, tier: TierIdx, priority: Priority) -> usize {
        self.by_tier.get(usize::from(tier)).map_or(0, |classes| {
            Priority::HIGHEST_FIRST
                .iter()
                .filter(|p| **p >= priority)
                .filter_map(|p| classes.get(p.index()))
                .map(VecDeque::len)
                .sum()
        })
    }

    /// Appends `w` to its tier and class; returns its position.
    pub fn push(&mut self, w: Waiting) -> usize {
        let (tier, priority, id) = (w.tier, w.request.priority, w.request.session_id);
        let position = self.ahead_of(tier, priority);
        if let Some(q) = self
            .by_tier
            .get_mut(usize::from(tier))
            .and_then(|c| c.get_mut(priority.index()))
        {
            q.push_back(w);
            self.index.insert(id, (tier, priority));
        }
        position
    }

    /// The position of `session` in its tier: requests of higher classes, then earlier ones of
    /// its own class.
    pub fn position(&self, session: &SessionId) -> Option<usize> {
        let &(tier, priority) = self.index.get(session)?;
        let classes = self.by_tier.get(usize::from(tier))?;
        let higher: usize = Priority::HIGHEST_FIRST
            .iter()
            .filter(|p| **p > priority)
            .filter_map(|p| classes.get(p.index()))
            .map(VecDeque::len)
            .sum();
        let own = classes
            .get(priority.index())?
            .iter()
            .position(|w| &w.request.session_id == session)?;
        Some(higher + own)
    }

    /// Removes `session`, returning it.
    pub fn remove(&mut self, session: &SessionId) -> Option<Waiting> {
        let (tier, priority) = self.index.remove(session)?;
        let q = self
            .by_tier
            .get_mut(usize::from(tier))?
            .get_mut(priority.index())?;
        let i = q.iter().position(|w| &w.request.session_id == session)?;
        q.remove(i)
    }

    /// The sessions of one tier's class, in order.
    pub fn class(&self, tier: TierIdx, priority: Priority) -> Vec<SessionId> {
        self.by_tier
            .get(usize::from(tier))
            .and_then(|c| c.get(priority.index()))
            .map(|q| q.iter().map(|w| w.request.session_id).collect())
            .unwrap_or_default()
    }

    /// A waiting request.
    pub fn get(&self, session: &SessionId) -> Option<&Waiting> {
        let &(tier, priority) = self.index.get(session)?;
        self.by_tier
            .get(usize::from(tier))?
            .get(priority.index())?
            .iter()
            .find(|w| &w.request.session_id == session)
    }

    /// Every waiting request, tier by tier and class by class, in order within a class.
    pub fn iter(&self) -> impl Iterator<Item = &Waiting> + '_ {
        self.by_tier
            .iter()
            .flat_map(|classes| classes.iter().flatten())
    }

    /// The head of one tier's class.
    pub fn front(&self, tier: TierIdx, priority: Priority) -> Option<&Waiting> {
        self.by_tier
            .get(usize::from(tier))?
            .get(priority.index())?
            .front()
    }

    /// Removes the head of one tier's class.
    pub fn pop_front(&mut self, tier: TierIdx, priority: Priority) -> Option<Waiting> {
        let w = self
            .by_tier
            .get_mut(usize::from(tier))?
            .get_mut(priority.index())?
            .pop_front()?;
        self.index.remove(&w.request.session_id);
        Some(w)
    }

    /// Tiers with at least one waiting request.
    pub fn busy_tiers(&self) -> Vec<TierIdx> {
        self.by_tier
            .iter()
            .enumerate()
            .filter(|(_, c)| c.iter().any(|q| !q.is_empty()))
            .filter_map(|(t, _)| TierIdx::try_from(t).ok())
            .collect()
    }

    /// Notes that a session of `tier` ended at `now`.
    pub fn observe_release(&mut self, tier: TierIdx, now: Timestamp) {
        if let Some(r) = self.rates.get_mut(usize::from(tier)) {
            r.observe(now);
        }
    }

    /// Seconds until a request at `position` of `tier` is likely placed, from the recent
    /// release rate; `None` before two releases were seen.
    pub fn eta_seconds(&self, tier: TierIdx, position: usize) -> Option<u32> {
        let mean = self.rates.get(usize::from(tier))?.mean_interval_ms?;
        let secs = (mean * (position as f64 + 1.0) / 1000.0).ceil();
        if secs.is_finite() && secs >= 0.0 && secs <= f64::from(u32::MAX) {
            // In range by the check above.
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            let s = secs as u32;
            Some(s)
        } else {
            None
        }
    }
}
