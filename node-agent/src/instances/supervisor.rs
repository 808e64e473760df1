//! Warm game instances, sans IO: which to start, which to stop, what a crash means.
//!
//! The supervisor keeps, per (game, tier), the number of warm instances the pool plan asks
//! for. It is driven by calls that report what happened (`started`, `exited`) and by
//! [`Supervisor::poll_action`], which says what to do next; time is passed in. A warm instance
//! that crashes is restarted after an exponential backoff; an active one that crashes ends its
//! session with reason `error`; an instance whose session is released is stopped and a fresh
//! warm one replaces it if the target asks.

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use framecast_shared::ids::{GameId, SessionId, TierName};
use framecast_shared::state::EndReason;
use framecast_shared::time::Timestamp;

/// An instance's number, unique for the agent's life.
pub type InstanceId = u64;

/// What the shell must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Launch instance `id` of `game` at `tier`.
    Start {
        /// The instance.
        id: InstanceId,
        /// Its game.
        game: GameId,
        /// Its tier.
        tier: TierName,
    },
    /// Stop instance `id`.
    Stop {
        /// The instance.
        id: InstanceId,
    },
}

/// Where an instance is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InstanceState {
    /// Launch requested, not yet running.
    Starting,
    /// Running, idle, ready for a session.
    Warm,
    /// Running a session.
    Active(SessionId),
    /// Crashed; relaunch after `until`.
    Backoff {
        /// When to relaunch.
        until: Timestamp,
    },
    /// Stop requested.
    Stopping,
}

/// A session ended because its instance did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionEnded {
    /// The session.
    pub session: SessionId,
    /// Why.
    pub reason: EndReason,
}

#[derive(Debug, Clone)]
struct Instance {
    game: GameId,
    tier: TierName,
    state: InstanceState,
    /// Crashes since it last ran long enough to count as healthy.
    crashes: u32,
}

/// Restart backoff: `min`, doubled per consecutive crash, capped at `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// First delay.
    pub min: Duration,
    /// Longest delay.
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            min: Duration::from_secs(1),
            max: Duration::from_secs(60),
        }
    }
}

impl Backoff {
    fn delay(&self, crashes: u32) -> Duration {
        let factor = 2u32.saturating_pow(crashes.saturating_sub(1).min(16));
        self.min.saturating_mul(factor).min(self.max)
    }
}

/// The supervisor core.
#[derive(Debug, Default)]
pub struct Supervisor {
    backoff: Backoff,
    next_id: InstanceId,
    instances: BTreeMap<InstanceId, Instance>,
    targets: BTreeMap<(GameId, TierName), u16>,
    actions: VecDeque<Action>,
}

impl Supervisor {
    /// A supervisor with `backoff` for crashed warm instances.
    pub fn new(backoff: Backoff) -> Self {
        Self {
            backoff,
            ..Self::default()
        }
    }

    /// Sets how many warm instances to keep per (game, tier); pairs not named get none.
    /// Surplus warm instances are stopped; active ones are never touched.
    pub fn set_targets(&mut self, targets: impl IntoIterator<Item = ((GameId, TierName), u16)>) {
        self.targets = targets.into_iter().collect();
        self.reconcile_targets();
    }

    /// Takes a warm instance of `game` at `tier` for `session`, if one is ready.
    pub fn assign(
        &mut self,
        game: &GameId,
        tier: &TierName,
        session: SessionId,
    ) -> Option<InstanceId> {
        let (&id, inst) = self
            .instances
            .iter_mut()
            .find(|(_, i)| &i.game == game && &i.tier == tier && i.state == InstanceState::Warm)?;
        inst.state = InstanceState::Active(session);
        self.reconcile_targets();
        Some(id)
    }

    /// Takes instance `id` for `session`, if it is warm (ready). The caller names the instance
    /// when the broker chose a slot that holds one.
    pub fn assign_instance(&mut self, id: InstanceId, session: SessionId) -> bool {
        match self.instances.get_mut(&id) {
            Some(inst) if inst.state == InstanceState::Warm => {
                inst.state = InstanceState::Active(session);
                self.reconcile_targets();
                true
            }
            _ => false,
        }
    }

    /// Launches a fresh instance of `game` at `tier` for `session` (a cold start: no warm
    /// instance was ready). A crash before or after it is up ends the session.
    pub fn start_for_session(
        &mut self,
        game: GameId,
        tier: TierName,
        session: SessionId,
    ) -> InstanceId {
        let id = self.new_id();
        self.actions.push_back(Action::Start {
            id,
            game: game.clone(),
            tier: tier.clone(),
        });
        self.instances.insert(
            id,
            Instance {
                game,
                tier,
                state: InstanceState::Active(session),
                crashes: 0,
            },
        );
        id
    }

    /// Stops instance `id` if it is not running a session (its slot is wanted for another
    /// session); a replacement starts if the targets still ask for one. Returns whether it was
    /// stopped.
    pub fn evict(&mut self, id: InstanceId) -> bool {
        let Some(inst) = self.instances.get_mut(&id) else {
            return false;
        };
        let queued = self
            .actions
            .iter()
            .position(|a| matches!(a, Action::Start { id: a_id, .. } if *a_id == id));
        match inst.state {
            InstanceState::Active(_) | InstanceState::Stopping => return false,
            InstanceState::Backoff { .. } => {
                self.instances.remove(&id);
            }
            // Never launched: cancel the start rather than launch and stop it.
            InstanceState::Starting if queued.is_some() => {
                if let Some(at) = queued {
                    self.actions.remove(at);
                }
                self.instances.remove(&id);
            }
            InstanceState::Starting | InstanceState::Warm => {
                inst.state = InstanceState::Stopping;
                self.actions.push_back(Action::Stop { id });
            }
        }
        self.reconcile_targets();
        true
    }

    /// Adopts an instance already running `session` (after an agent restart).
    pub fn adopt_active(&mut self, game: GameId, tier: TierName, session: SessionId) -> InstanceId {
        let id = self.new_id();
        self.instances.insert(
            id,
            Instance {
                game,
                tier,
                state: InstanceState::Active(session),
                crashes: 0,
            },
        );
        id
    }

    /// The session ended: stop its instance (a fresh one replaces it per the targets).
    pub fn release(&mut self, session: &SessionId) -> Option<InstanceId> {
        let (&id, inst) = self
            .instances
            .iter_mut()
            .find(|(_, i)| i.state == InstanceState::Active(*session))?;
        inst.state = InstanceState::Stopping;
        self.actions.push_back(Action::Stop { id });
        self.reconcile_targets();
        Some(id)
    }

    /// The shell launched instance `id`.
    pub fn started(&mut self, id: InstanceId) {
        if let Some(inst) = self.instances.get_mut(&id)
            && inst.state == InstanceState::Starting
        {
            inst.state = InstanceState::Warm;
        }
    }

    /// Instance `id` exited at `now`, after running for `ran`. Returns the session that ends
    /// with it, if it was active. A warm instance that ran at least `healthy_after` resets its
    /// crash count.
    pub fn exited(
        &mut self,
        id: InstanceId,
        now: Timestamp,
        ran: Duration,
        healthy_after: Duration,
    ) -> Option<SessionEnded> {
        let inst = self.instances.get_mut(&id)?;
        let ended = match inst.state {
            InstanceState::Stopping => {
                self.instances.remove(&id);
                None
            }
            InstanceState::Active(session) => {
                self.instances.remove(&id);
                Some(SessionEnded {
                    session,
                    reason: EndReason::Error,
                })
            }
            InstanceState::Starting | InstanceState::Warm | InstanceState::Backoff { .. } => {
                inst.crashes = if ran >= healthy_after {
                    1
                } else {
                    inst.crashes.saturating_add(1)
                };
                let until = now.saturating_add(self.backoff.delay(inst.crashes));
                inst.state = InstanceState::Backoff { until };
                None
            }
        };
        self.reconcile_targets();
        ended
    }

    /// The next thing to do at `now`: relaunches whose backoff has passed come out here too.
    pub fn poll_action(&mut self, now: Timestamp) -> Option<Action> {
        for (&id, inst) in &mut self.instances {
            if matches!(inst.state, InstanceState::Backoff { until } if until <= now) {
                inst.state = InstanceState::Starting;
                self.actions.push_back(Action::Start {
                    id,
                    game: inst.game.clone(),
                    tier: inst.tier.clone(),
                });
            }
        }
        self.actions.pop_front()
    }

    /// When the next backoff ends, for the shell's timer.
    pub fn next_deadline(&self) -> Option<Timestamp> {
        self.instances
            .values()
            .filter_map(|i| match i.state {
                InstanceState::Backoff { until } => Some(until),
                _ => None,
            })
            .min()
    }

    /// Instances by state, for metrics and the agent's hello: (game, tier, state).
    pub fn instances(
        &self,
    ) -> impl Iterator<Item = (InstanceId, &GameId, &TierName, InstanceState)> {
        self.instances
            .iter()
            .map(|(id, i)| (*id, &i.game, &i.tier, i.state))
    }

    fn new_id(&mut self) -> InstanceId {
        self.next_id += 1;
        self.next_id
    }

    /// Starts missing warm instances and stops surplus ones, per (game, tier).
    fn reconcile_targets(&mut self) {
        let mut keys: Vec<(GameId, TierName)> = self.targets.keys().cloned().collect();
        for i in self.instances.values() {
            let k = (i.game.clone(), i.tier.clone());
            if !keys.contains(&k) {
                keys.push(k);
            }
        }
        for key in keys {
            let want = usize::from(self.targets.get(&key).copied().unwrap_or(0));
            // Instances that are or will be warm: starting, warm, or waiting to restart.
            let pool: Vec<(InstanceId, InstanceState)> = self
                .instances
                .iter()
                .filter(|(_, i)| (i.game.clone(), i.tier.clone()) == key)
                .filter(|(_, i)| {
                    matches!(
                        i.state,
                        InstanceState::Starting
                            | InstanceState::Warm
                            | InstanceState::Backoff { .. }
                    )
                })
                .map(|(id, i)| (*id, i.state))
                .collect();
            if pool.len() < want {
                for _ in pool.len()..want {
                    let id = self.new_id();
                    self.instances.insert(
                        id,
                        Instance {
                            game: key.0.clone(),
                            tier: key.1.clone(),
                            state: InstanceState::Starting,
                            crashes: 0,
                        },
                    );
                    self.actions.push_back(Action::Start {
                        id,
                        game: key.0.clone(),
                        tier: key.1.clone(),
                    });
                }
            } else {
                // Stop the surplus: those waiting to restart first, then starting, then warm.
                let excess = pool.len() - want;
                let rank = |s: &InstanceState| match s {
                    InstanceState::Backoff { .. } => 0,
                    InstanceState::Starting => 1,
                    _ => 2,
                };
                let mut surplus = pool;
                surplus.sort_by_key(|(id, s)| (rank(s), *id));
                for (id, state) in surplus.into_iter().take(excess) {
                    // A start still queued is cancelled rather than launched and stopped.
                    let queued = self
                        .actions
                        .iter()
                        .position(|a| matches!(a, Action::Start { id: a_id, .. } if *a_id == id));
                    if let Some(inst) = self.instances.get_mut(&id) {
                        if let Some(at) = queued {
                            self.actions.remove(at);
                            self.instances.remove(&id);
                        } else if let InstanceState::Backoff { .. } = state {
                            self.instances.remove(&id);
                        } else {
                            inst.state = InstanceState::Stopping;
                            self.actions.push_back(Action::Stop { id });
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: Timestamp = Timestamp::from_millis(1_800_000_000_000);

    fn key(game: &str, tier: &str) -> (GameId, TierName) {
        (GameId::new(game).unwrap(), TierName::new(tier).unwrap())
    }

    fn drain(s: &mut Supervisor, now: Timestamp) -> Vec<Action> {
        std::iter::from_fn(|| s.poll_action(now)).collect()
    }

    /// The one instance started by the last change.
    fn one_start(s: &mut Supervisor) -> InstanceId {
        match drain(s, T0).as_slice() {
            [Action::Start { id, .. }] => *id,
            other => panic!("expected one start, got {other:?}"),
        }
    }

    fn sid(n: u128) -> SessionId {
        SessionId::new(T0, n)
    }

    fn backoff() -> Backoff {
        Backoff {
            min: Duration::from_secs(1),
            max: Duration::from_secs(8),
        }
    }

    #[test]
    fn targets_start_warm_instances_and_trim_surplus() {
        let mut s = Supervisor::new(backoff());
        s.set_targets([(key("arena", "720p"), 2)]);
        let actions = drain(&mut s, T0);
        assert_eq!(actions.len(), 2);
        for a in &actions {
            let Action::Start { id, .. } = a else {
                panic!("{a:?}")
            };
            s.started(*id);
        }
        s.set_targets([(key("arena", "720p"), 1)]);
        assert!(matches!(
            drain(&mut s, T0).as_slice(),
            [Action::Stop { .. }]
        ));
    }

    #[test]
    fn an_assigned_instance_is_replaced_and_stopped_when_released() {
        let mut s = Supervisor::new(backoff());
        s.set_targets([(key("arena", "720p"), 1)]);
        let id = one_start(&mut s);
        s.started(id);
        let (game, tier) = key("arena", "720p");
        assert_eq!(s.assign(&game, &tier, sid(1)), Some(id));
        assert!(
            s.assign(&game, &tier, sid(2)).is_none(),
            "the replacement is not warm yet"
        );
        assert!(
            matches!(drain(&mut s, T0).as_slice(), [Action::Start { .. }]),
            "a replacement starts"
        );
        assert_eq!(s.release(&sid(1)), Some(id));
        assert_eq!(drain(&mut s, T0), [Action::Stop { id }]);
        assert_eq!(
            s.exited(id, T0, Duration::from_secs(60), Duration::from_secs(10)),
            None
        );
    }

    #[test]
    fn a_crashed_warm_instance_restarts_with_growing_backoff() {
        let mut s = Supervisor::new(backoff());
        s.set_targets([(key("arena", "720p"), 1)]);
        let id = one_start(&mut s);
        let mut now = T0;
        for expected in [1, 2, 4, 8, 8] {
            s.started(id);
            assert_eq!(
                s.exited(id, now, Duration::from_millis(10), Duration::from_secs(10)),
                None
            );
            assert_eq!(
                s.next_deadline(),
                Some(now.saturating_add(Duration::from_secs(expected)))
            );
            assert!(
                drain(&mut s, now).is_empty(),
                "no restart before the backoff ends"
            );
            now = now.saturating_add(Duration::from_secs(expected));
            assert_eq!(
                drain(&mut s, now),
                [Action::Start {
                    id,
                    game: key("arena", "720p").0,
                    tier: key("arena", "720p").1
                }]
            );
        }
        // A run long enough to count as healthy resets the backoff.
        s.started(id);
        s.exited(id, now, Duration::from_secs(30), Duration::from_secs(10));
        assert_eq!(
            s.next_deadline(),
            Some(now.saturating_add(Duration::from_secs(1)))
        );
    }

    #[test]
    fn a_crashed_active_instance_ends_its_session() {
        let mut s = Supervisor::new(backoff());
        s.set_targets([(key("arena", "720p"), 1)]);
        let id = one_start(&mut s);
        s.started(id);
        let (game, tier) = key("arena", "720p");
        s.assign(&game, &tier, sid(7)).unwrap();
        let ended = s.exited(id, T0, Duration::from_secs(5), Duration::from_secs(10));
        assert_eq!(
            ended,
            Some(SessionEnded {
                session: sid(7),
                reason: EndReason::Error
            })
        );
        assert!(s.instances().all(|(i, ..)| i != id));
    }

    #[test]
    fn active_instances_survive_a_target_of_zero() {
        let mut s = Supervisor::new(backoff());
        let id = s.adopt_active(
            GameId::new("arena").unwrap(),
            TierName::new("720p").unwrap(),
            sid(3),
        );
        s.set_targets(std::iter::empty());
        assert!(drain(&mut s, T0).is_empty());
        assert!(
            s.instances()
                .any(|(i, _, _, st)| i == id && st == InstanceState::Active(sid(3)))
        );
    }

    #[test]
    fn a_queued_start_that_becomes_surplus_is_cancelled_not_launched() {
        let mut s = Supervisor::new(backoff());
        s.set_targets([(key("arena", "720p"), 2)]);
        s.set_targets([(key("arena", "720p"), 1)]);
        let actions = drain(&mut s, T0);
        assert!(
            matches!(actions.as_slice(), [Action::Start { .. }]),
            "{actions:?}"
        );
        assert_eq!(s.instances().count(), 1);
    }

    #[test]
    fn sessions_take_named_warm_instances_or_start_their_own() {
        let mut s = Supervisor::new(backoff());
        s.set_targets([(key("arena", "720p"), 1)]);
        let warm = one_start(&mut s);
        assert!(!s.assign_instance(warm, sid(1)), "not ready yet");
        s.started(warm);
        assert!(s.assign_instance(warm, sid(1)));
        let replacement = one_start(&mut s);
        // A cold start for a session is active from the start; its crash ends the session.
        let (game, tier) = key("puzzle", "4k");
        let cold = s.start_for_session(game, tier, sid(2));
        assert!(matches!(drain(&mut s, T0).as_slice(), [Action::Start { id, .. }] if *id == cold));
        let ended = s.exited(cold, T0, Duration::ZERO, Duration::from_secs(30));
        assert_eq!(ended.map(|e| e.session), Some(sid(2)));
        // Evicting the warm replacement stops it and queues another; an active one stays.
        s.started(replacement);
        assert!(s.evict(replacement));
        assert!(!s.evict(warm), "a session's instance is never evicted");
        let actions = drain(&mut s, T0);
        assert!(
            matches!(actions.as_slice(), [Action::Stop { id }, Action::Start { .. }] if *id == replacement),
            "{actions:?}"
        );
    }
}
