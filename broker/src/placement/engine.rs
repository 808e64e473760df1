//! The placement engine: decisions, timers, reconciliation. Sans IO; time is an argument.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::time::Duration;

use rustc_hash::FxHashMap;

use framecast_shared::config::BrokerConfig;
use framecast_shared::genre::GenreProfile;
use framecast_shared::gpu::GpuMode;
use framecast_shared::ids::{GameId, GpuId, NodeId, SessionId, TierName};
use framecast_shared::protocol::{Heartbeat, Hello, RunningSession, WarmInstance};
use framecast_shared::state::{EndReason, NodeState, SessionState};
use framecast_shared::tier::TierPreset;
use framecast_shared::time::Timestamp;

use super::catalog::{Catalog, GameIdx, GenreIdx, RegionIdx, TierIdx};
use super::fleet::{Demand, Fleet, GpuIdx, Infeasible, Node, NodeIdx, Slot, SlotChoice, to_usize};
use super::queue::{Queues, Waiting};
use super::request::{
    AttemptExplanation, Decision, EngineEvent, Explanation, Fallback, PlaceRequest, Placement,
    Priority, QueuedInfo, RejectReason,
};
use super::score::{ScoreContext, Weights};
use super::strategy::{Ask, Choice, Strategy};

/// The engine's knobs.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineConfig {
    /// A reservation the player has not connected to expires after this.
    pub reservation_ttl: Duration,
    /// A queued request is dropped (`expired`) after this, per priority class.
    pub queue_timeout: [Duration; 3],
    /// A reconnecting session keeps its slot this long.
    pub reconnect_grace: Duration,
    /// Sessions on a node that went down end with `node-lost` after this.
    pub node_lost_grace: Duration,
    /// A reservation the agent has not confirmed yet survives reports without it this long.
    pub intent_grace: Duration,
    /// A queued request's RTT cap grows by the genre's cap for every this much waiting...
    pub rtt_relax_every: Duration,
    /// ...up to this multiple of the cap.
    pub rtt_max_factor: f64,
    /// Score weights.
    pub weights: Weights,
    /// Candidates taken from each index set per attempt.
    pub candidates: usize,
    /// Most requests waiting per tier; past it requests are rejected.
    pub max_queue_per_tier: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            reservation_ttl: Duration::from_secs(60),
            queue_timeout: [Duration::from_secs(120); 3],
            reconnect_grace: Duration::from_secs(120),
            node_lost_grace: Duration::from_secs(30),
            intent_grace: Duration::from_secs(10),
            rtt_relax_every: Duration::from_secs(60),
            rtt_max_factor: 2.0,
            weights: Weights::default(),
            candidates: 8,
            max_queue_per_tier: 100_000,
        }
    }
}

impl EngineConfig {
    /// The engine settings a broker configuration implies.
    pub fn from_broker(config: &BrokerConfig) -> Self {
        let t = &config.timers;
        Self {
            reservation_ttl: Duration::from_secs(u64::from(t.reservation_ttl_s)),
            queue_timeout: [Duration::from_secs(u64::from(t.queue_timeout_s)); 3],
            reconnect_grace: Duration::from_secs(u64::from(t.reconnect_grace_s)),
            node_lost_grace: Duration::from_millis(u64::from(config.control.node_lost_grace_ms)),
            ..Self::default()
        }
    }
}

/// Errors of calls that name something the engine does not have.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    /// No such session, placed or queued.
    #[error("unknown session {0}")]
    UnknownSession(SessionId),
    /// No such node.
    #[error("unknown node {0}")]
    UnknownNode(NodeId),
    /// The node has no such GPU.
    #[error("node {node} has no GPU {gpu}")]
    UnknownGpu {
        /// The node.
        node: NodeId,
        /// The GPU it does not have.
        gpu: GpuId,
    },
    /// The node reported a GPU model that cannot be interned.
    #[error("too many GPU models, regions or games")]
    CatalogFull,
    /// A transition the lifecycle does not allow.
    #[error(transparent)]
    Transition(#[from] framecast_shared::state::TransitionError),
}

/// Why a report changed nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReconcileOutcome {
    /// The report was applied.
    Applied {
        /// Sessions the engine did not know and took from the report.
        adopted: usize,
        /// Sessions the engine had on the node that the report does not hold, now ended.
        ended: usize,
        /// Reported sessions the engine could not take: an unknown GPU, tier or slot, or more
        /// than the GPU holds in its mode. The service should tell the agent to end them.
        refused: usize,
    },
    /// The report came from an older generation than one already seen; it was ignored.
    Stale {
        /// The newest generation seen.
        current: u64,
    },
}

/// How the engine got to know a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    /// The engine reserved it; the agent has not reported it yet.
    Intent { made_at: Timestamp, generation: u64 },
    /// The agent reported it.
    Observed,
}

/// A session that holds a slot.
#[derive(Debug, Clone)]
struct Allocation {
    gpu: GpuIdx,
    slot: u16,
    demand: Demand,
    state: SessionState,
    origin: Origin,
    /// When the current state began.
    since: Timestamp,
    /// When a reservation lapses.
    expires_at: Option<Timestamp>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Timer {
    ReservationExpiry,
    ReconnectGrace,
}

/// Fleet-wide figures, for the simulator and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Stats {
    /// Nodes known.
    pub nodes: usize,
    /// GPUs known and present.
    pub gpus: usize,
    /// GPUs holding at least one session.
    pub gpus_in_use: usize,
    /// Sessions holding slots.
    pub sessions: usize,
    /// Requests queued.
    pub queued: usize,
    /// Framebuffer of GPUs that can stream, MB.
    pub fb_total_mb: u64,
    /// Framebuffer occupied, MB.
    pub fb_used_mb: u64,
    /// Encoder capacity, thousandths of a unit.
    pub encoder_total: u64,
    /// Encoder in use, thousandths of a unit.
    pub encoder_used: u64,
    /// Compute in use, thousandths of a sixteenth, over all GPUs.
    pub compute_used: u64,
    /// Free framebuffer, MB, on GPUs where not one more session of the smallest waiting tier
    /// fits (the smallest tier of all when nobody waits): what fragmentation strands.
    pub fb_stranded_mb: u64,
    /// Framebuffer of the GPUs holding at least one session, MB.
    pub fb_of_gpus_in_use_mb: u64,
    /// The most sessions one GPU holds.
    pub max_sessions_per_gpu: u16,
}

use serde::Serialize;

/// The placement engine.
#[derive(Debug)]
pub struct Engine {
    fleet: Fleet,
    config: EngineConfig,
    strategy: Box<dyn Strategy>,
    sessions: FxHashMap<SessionId, Allocation>,
    timers: BinaryHeap<Reverse<(Timestamp, Timer, SessionId)>>,
    queue: Queues,
    events: VecDeque<EngineEvent>,
    /// Expected share of requests per tier (exponentially weighted).
    tier_mix: Vec<f64>,
    /// Nodes that went down, and when their sessions are lost.
    lost: Vec<(Timestamp, NodeIdx)>,
    /// Draining nodes and their deadlines.
    draining: Vec<(Timestamp, NodeIdx)>,
    /// Per tier, the highest class whose queued head last failed for want of capacity; a new
    /// request of that class or lower joins the queue behind it instead of taking capacity.
    queue_blocked: Vec<Option<Priority>>,
}

/// Weight of one request in the tier-mix estimate.
const MIX_ALPHA: f64 = 0.01;

impl Engine {
    /// An engine for `tiers` and `genres`, deciding with `strategy`.
    pub fn new(
        tiers: Vec<TierPreset>,
        genres: Vec<GenreProfile>,
        config: EngineConfig,
        strategy: Box<dyn Strategy>,
    ) -> Self {
        let catalog = Catalog::new(tiers, genres);
        let n = catalog.tiers().len();
        Self {
            fleet: Fleet::new(catalog),
            config,
            strategy,
            sessions: FxHashMap::default(),
            timers: BinaryHeap::new(),
            queue: Queues::new(n),
            events: VecDeque::new(),
            tier_mix: vec![1.0 / n.max(1) as f64; n],
            lost: Vec::new(),
            draining: Vec::new(),
            queue_blocked: vec![None; n],
        }
    }

    /// The strategy's name.
    pub fn strategy_name(&self) -> &'static str {
        self.strategy.name()
    }

    /// The fleet, read-only (for reports and tests).
    pub fn fleet(&self) -> &Fleet {
        &self.fleet
    }

    /// The next thing the engine did on its own, if any.
    pub fn poll_event(&mut self) -> Option<EngineEvent> {
        self.events.pop_front()
    }

    /// Sessions holding slots.
    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    /// A session's state, if it holds a slot; `Queued` if it waits.
    pub fn session_state(&self, session: &SessionId) -> Option<SessionState> {
        if self.queue.contains(session) {
            return Some(SessionState::Queued);
        }
        self.sessions.get(session).map(|a| a.state)
    }

    /// Where a queued request stands.
    pub fn queue_position(&self, session: &SessionId) -> Option<usize> {
        self.queue.position(session)
    }

    /// Estimated seconds until a queued request is placed, from its tier's release rate.
    pub fn queue_eta(&self, session: &SessionId) -> Option<u32> {
        let tier = self.queue.get(session)?.tier;
        self.queue.eta_seconds(tier, self.queue.position(session)?)
    }

    /// Requests queued.
    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    // ---- decisions --------------------------------------------------------------------

    /// Decides where `request` goes: a reserved slot, a place in the queue, or a rejection.
    pub fn place(&mut self, request: PlaceRequest, now: Timestamp) -> Decision {
        let (tier, genre) = match self.validate(&request) {
            Ok(v) => v,
            Err(reason) => return Decision::Rejected { reason },
        };
        if self.beyond_any_rtt_cap(&request, genre) {
            return Decision::Rejected {
                reason: RejectReason::RttTooHigh,
            };
        }
        self.observe_tier(tier);
        let game = self.fleet.catalog.intern_game(&request.game);
        // Freed capacity serves the queue first: a request joins behind equal or higher
        // classes already waiting for its tier.
        let mut waits_for_capacity = true;
        if !self.blocked_by_queue(tier, request.priority) {
            let result = self.with_strategy(|engine, strategy| {
                engine.attempt(&request, tier, genre, game, Duration::ZERO, strategy, None)
            });
            match result {
                Ok((choice, region, served)) => {
                    return match self.commit(&request, choice, region, served, now) {
                        Some(placement) => Decision::Placed(placement),
                        None => Decision::Rejected {
                            reason: RejectReason::NoCapacity,
                        },
                    };
                }
                Err(reason) if !request.queue => return Decision::Rejected { reason },
                // Queue it: capacity may free up, and the RTT cap relaxes while it waits.
                Err(reason) => waits_for_capacity = reason == RejectReason::NoCapacity,
            }
        } else if !request.queue {
            return Decision::Rejected {
                reason: RejectReason::NoCapacity,
            };
        }
        if self.queue.ahead_of(tier, Priority::Low) >= self.config.max_queue_per_tier {
            return Decision::Rejected {
                reason: RejectReason::NoCapacity,
            };
        }
        let session_id = request.session_id;
        if waits_for_capacity && let Some(b) = self.queue_blocked.get_mut(usize::from(tier)) {
            *b = (*b).max(Some(request.priority));
        }
        let position = self.queue.push(Waiting {
            request,
            tier,
            genre,
            since: now,
        });
        Decision::Queued(QueuedInfo {
            session_id,
            position,
            eta_seconds: self.queue.eta_seconds(tier, position),
        })
    }

    /// What [`Engine::place`] would decide now, with every candidate weighed and the terms of
    /// each score; changes nothing.
    pub fn explain(&self, request: &PlaceRequest) -> Explanation {
        let strategy_name = self.strategy.name();
        let (tier, genre) = match self.validate(request) {
            Ok(v) => v,
            Err(reason) => {
                return Explanation {
                    strategy: strategy_name,
                    attempts: Vec::new(),
                    decision: Decision::Rejected { reason },
                };
            }
        };
        let game = self.fleet.catalog.game_idx(&request.game);
        let mut strategy = self.strategy.box_clone();
        let mut attempts = Vec::new();
        let result = self.attempt(
            request,
            tier,
            genre,
            game,
            Duration::ZERO,
            &mut *strategy,
            Some(&mut attempts),
        );
        let decision = match result {
            Ok((choice, region, served)) => {
                let placement = self.placement_of(
                    request.session_id,
                    &choice,
                    region,
                    served,
                    Timestamp::EPOCH,
                );
                match placement {
                    Some(p) => Decision::Placed(p),
                    None => Decision::Rejected {
                        reason: RejectReason::NoCapacity,
                    },
                }
            }
            Err(_) if request.queue => {
                let position = self.queue.ahead_of(tier, request.priority);
                Decision::Queued(QueuedInfo {
                    session_id: request.session_id,
                    position,
                    eta_seconds: self.queue.eta_seconds(tier, position),
                })
            }
            Err(reason) => Decision::Rejected { reason },
        };
        Explanation {
            strategy: strategy_name,
            attempts,
            decision,
        }
    }

    fn validate(&self, request: &PlaceRequest) -> Result<(TierIdx, GenreIdx), RejectReason> {
        if self.sessions.contains_key(&request.session_id)
            || self.queue.contains(&request.session_id)
        {
            return Err(RejectReason::DuplicateSession);
        }
        let tier = self
            .fleet
            .catalog
            .tier_idx(&request.tier)
            .ok_or(RejectReason::UnknownTier)?;
        let genre = self
            .fleet
            .catalog
            .genre_idx(&request.genre)
            .ok_or(RejectReason::UnknownGenre)?;
        // Without the next-region fallback only the first region listed counts.
        let considered = if request.fallbacks.contains(&Fallback::NextRegion) {
            usize::MAX
        } else {
            1
        };
        if !request
            .regions
            .iter()
            .take(considered)
            .any(|r| self.fleet.catalog.region_idx(&r.region).is_some())
        {
            return Err(RejectReason::NoRegion);
        }
        Ok((tier, genre))
    }

    /// Whether queued requests of `tier` at `priority` or above wait for capacity, so a new
    /// request must queue behind them. Requests that wait only for their RTT cap to relax do
    /// not hold others back.
    fn blocked_by_queue(&self, tier: TierIdx, priority: Priority) -> bool {
        self.queue.ahead_of(tier, priority) > 0
            && self
                .queue_blocked
                .get(usize::from(tier))
                .copied()
                .flatten()
                .is_some_and(|p| p >= priority)
    }

    /// Whether every region the request may use is beyond the genre's RTT cap even fully
    /// relaxed: such a request could wait in the queue only to time out.
    fn beyond_any_rtt_cap(&self, request: &PlaceRequest, genre: GenreIdx) -> bool {
        let Some(g) = self.fleet.catalog.genre(genre) else {
            return true;
        };
        let max = relaxed_cap(g.rtt_cap_ms, Duration::MAX, &self.config);
        let considered = if request.fallbacks.contains(&Fallback::NextRegion) {
            usize::MAX
        } else {
            1
        };
        request
            .regions
            .iter()
            .take(considered)
            .filter(|r| self.fleet.catalog.region_idx(&r.region).is_some())
            .all(|r| r.rtt_ms > max)
    }

    fn observe_tier(&mut self, tier: TierIdx) {
        for (i, share) in self.tier_mix.iter_mut().enumerate() {
            let hit = if i == usize::from(tier) { 1.0 } else { 0.0 };
            *share += MIX_ALPHA * (hit - *share);
        }
    }

    /// Runs the request's attempts in fallback order until the strategy finds a GPU.
    #[allow(clippy::too_many_arguments)]
    fn attempt(
        &self,
        request: &PlaceRequest,
        tier: TierIdx,
        genre_idx: GenreIdx,
        game: Option<GameIdx>,
        waited: Duration,
        strategy: &mut dyn Strategy,
        mut explain: Option<&mut Vec<AttemptExplanation>>,
    ) -> Result<(Choice, RegionIdx, TierIdx), RejectReason> {
        let genre = self
            .fleet
            .catalog
            .genre(genre_idx)
            .ok_or(RejectReason::UnknownGenre)?;
        let cap = relaxed_cap(genre.rtt_cap_ms, waited, &self.config);
        // Without the next-region fallback only the first region listed counts, known or not.
        let regions: Vec<(RegionIdx, u32)> = request
            .regions
            .iter()
            .take(if request.fallbacks.contains(&Fallback::NextRegion) {
                usize::MAX
            } else {
                1
            })
            .filter_map(|r| Some((self.fleet.catalog.region_idx(&r.region)?, r.rtt_ms)))
            .collect();
        let mut tiers = vec![tier];
        // A tier-up fallback takes capacity of the tier above only when nobody of an equal
        // or higher class waits for that tier.
        if request.fallbacks.contains(&Fallback::TierUp)
            && self.fleet.catalog.tier(tier + 1).is_some()
            && self.queue.ahead_of(tier + 1, request.priority) == 0
        {
            tiers.push(tier + 1);
        }
        let tier_first = request
            .fallbacks
            .iter()
            .position(|f| *f == Fallback::TierUp)
            < request
                .fallbacks
                .iter()
                .position(|f| *f == Fallback::NextRegion)
                .or(Some(usize::MAX));
        let mut order = Vec::with_capacity(regions.len() * tiers.len());
        if tier_first && tiers.len() > 1 && request.fallbacks.first() == Some(&Fallback::TierUp) {
            for &(r, rtt) in &regions {
                for &t in &tiers {
                    order.push((r, rtt, t));
                }
            }
        } else {
            for &t in &tiers {
                for &(r, rtt) in &regions {
                    order.push((r, rtt, t));
                }
            }
        }
        let mut any_within_rtt = false;
        for (region, rtt, t) in order {
            let mut scratch = explain.as_ref().map(|_| Vec::new());
            let mut skipped = None;
            let mut found = None;
            if rtt > cap {
                skipped = Some("player RTT above the genre's cap");
            } else {
                any_within_rtt = true;
                let ask = Ask {
                    region,
                    tier: t,
                    genre: genre_idx,
                    game,
                    score: ScoreContext {
                        weights: &self.config.weights,
                        genre,
                        tier_mix: &self.tier_mix,
                        rtt_share: f64::from(rtt) / f64::from(cap.max(1)),
                        empty_share: self.fleet.indices.empty_share(region),
                    },
                    candidates: self.config.candidates,
                };
                found = strategy.choose(&self.fleet, &ask, scratch.as_mut());
            }
            let names = self
                .fleet
                .catalog
                .region(region)
                .zip(self.fleet.catalog.tier(t));
            if let (Some(out), Some((region_name, preset))) = (explain.as_deref_mut(), names) {
                out.push(AttemptExplanation {
                    region: region_name.clone(),
                    tier: preset.name.clone(),
                    rtt_ms: rtt,
                    rtt_cap_ms: cap,
                    skipped,
                    candidates: scratch.unwrap_or_default(),
                });
            }
            if let Some(choice) = found {
                return Ok((choice, region, t));
            }
        }
        Err(if any_within_rtt {
            RejectReason::NoCapacity
        } else {
            RejectReason::RttTooHigh
        })
    }

    fn placement_of(
        &self,
        session_id: SessionId,
        choice: &Choice,
        region: RegionIdx,
        served: TierIdx,
        expires_at: Timestamp,
    ) -> Option<Placement> {
        let gpu = self.fleet.gpu(choice.gpu)?;
        let node = self.fleet.node(gpu.node)?;
        Some(Placement {
            session_id,
            region: self.fleet.catalog.region(region)?.clone(),
            node: node.id.clone(),
            gpu: gpu.id.clone(),
            slot: u32::from(choice.plan.slot),
            tier: self.fleet.catalog.tier(served)?.name.clone(),
            warm: choice.plan.warm,
            reprofile: choice.plan.reprofile,
            expires_at,
            score: choice.score,
        })
    }

    /// Reserves the chosen slot. `None` only if the choice names a GPU the fleet lacks.
    fn commit(
        &mut self,
        request: &PlaceRequest,
        choice: Choice,
        region: RegionIdx,
        served: TierIdx,
        now: Timestamp,
    ) -> Option<Placement> {
        let expires_at = now.saturating_add(self.config.reservation_ttl);
        let placement =
            self.placement_of(request.session_id, &choice, region, served, expires_at)?;
        let generation = self
            .fleet
            .gpu(choice.gpu)
            .and_then(|g| self.fleet.node(g.node))
            .map_or(0, |n| n.generation);
        self.fleet
            .occupy(choice.gpu, choice.plan, request.session_id, &choice.demand);
        self.sessions.insert(
            request.session_id,
            Allocation {
                gpu: choice.gpu,
                slot: choice.plan.slot,
                demand: choice.demand,
                state: SessionState::Reserved,
                origin: Origin::Intent {
                    made_at: now,
                    generation,
                },
                since: now,
                expires_at: Some(expires_at),
            },
        );
        self.timers.push(Reverse((
            expires_at,
            Timer::ReservationExpiry,
            request.session_id,
        )));
        Some(placement)
    }
}

impl Engine {
    // ---- session lifecycle ------------------------------------------------------------

    /// Ends a session (or cancels a queued request) for `reason`; its slot becomes free and
    /// the queue is served.
    pub fn release(
        &mut self,
        session: &SessionId,
        reason: EndReason,
        now: Timestamp,
    ) -> Result<(), EngineError> {
        if self.queue.remove(session).is_some() {
            return Ok(());
        }
        if !self.end(session, reason, now, false) {
            return Err(EngineError::UnknownSession(*session));
        }
        self.serve_queue(now);
        Ok(())
    }

    /// Applies a session state the agent reported (`session-update`). Stale generations are
    /// ignored; a move the lifecycle does not allow is an error and changes nothing.
    pub fn observe_session(
        &mut self,
        node: &NodeId,
        generation: u64,
        session: &SessionId,
        state: SessionState,
        now: Timestamp,
    ) -> Result<(), EngineError> {
        let &node_idx = self
            .fleet
            .node_idx
            .get(node)
            .ok_or_else(|| EngineError::UnknownNode(node.clone()))?;
        if self
            .fleet
            .node(node_idx)
            .is_some_and(|n| generation < n.generation)
        {
            return Ok(());
        }
        // Only the node a session runs on speaks for it.
        let on_node = self
            .sessions
            .get(session)
            .and_then(|a| self.fleet.gpu(a.gpu))
            .is_some_and(|g| g.node == node_idx);
        if !on_node {
            return Err(EngineError::UnknownSession(*session));
        }
        let alloc = self
            .sessions
            .get_mut(session)
            .ok_or(EngineError::UnknownSession(*session))?;
        if alloc.state == state {
            alloc.origin = Origin::Observed;
            return Ok(());
        }
        alloc.state.transition(state)?;
        if let SessionState::Ended(reason) = state {
            self.end(session, reason, now, false);
            self.serve_queue(now);
            return Ok(());
        }
        alloc.state = state;
        alloc.since = now;
        alloc.origin = Origin::Observed;
        alloc.expires_at = None;
        if state == SessionState::Reconnecting {
            self.timers.push(Reverse((
                now.saturating_add(self.config.reconnect_grace),
                Timer::ReconnectGrace,
                *session,
            )));
        }
        Ok(())
    }

    /// Runs every timer due at `now`: reservations past their TTL, queued requests past their
    /// class's timeout, reconnects past their grace, sessions of nodes down past the grace
    /// period and of drained nodes past the deadline. What ended is reported as events; freed
    /// capacity serves the queue, whose RTT caps relax as requests wait.
    pub fn expire(&mut self, now: Timestamp) {
        while let Some(Reverse((at, timer, session))) = self.timers.peek().copied() {
            if at > now {
                break;
            }
            self.timers.pop();
            let Some(alloc) = self.sessions.get(&session) else {
                continue;
            };
            let due = match timer {
                Timer::ReservationExpiry => {
                    alloc.state == SessionState::Reserved && alloc.expires_at == Some(at)
                }
                Timer::ReconnectGrace => {
                    alloc.state == SessionState::Reconnecting
                        && alloc.since.saturating_add(self.config.reconnect_grace) == at
                }
            };
            if due {
                let reason = match timer {
                    Timer::ReservationExpiry => EndReason::Expired,
                    Timer::ReconnectGrace => EndReason::Error,
                };
                self.end(&session, reason, now, true);
            }
        }
        for tier in self.queue.busy_tiers() {
            for priority in Priority::HIGHEST_FIRST {
                let timeout = self
                    .config
                    .queue_timeout
                    .get(priority.index())
                    .copied()
                    .unwrap_or(Duration::MAX);
                while let Some(w) = self.queue.front(tier, priority) {
                    if w.since.saturating_add(timeout) > now {
                        break;
                    }
                    if let Some(w) = self.queue.pop_front(tier, priority) {
                        self.events.push_back(EngineEvent::Ended {
                            session_id: w.request.session_id,
                            node: None,
                            reason: EndReason::Expired,
                        });
                    }
                }
            }
        }
        let (due, later): (Vec<_>, Vec<_>) =
            self.lost.iter().copied().partition(|(at, _)| *at <= now);
        self.lost = later;
        for (_, node) in due {
            if self
                .fleet
                .node(node)
                .is_some_and(|n| n.state == NodeState::Down)
            {
                self.end_node_sessions(node, EndReason::NodeLost, now);
            }
        }
        let (due, later): (Vec<_>, Vec<_>) = self
            .draining
            .iter()
            .copied()
            .partition(|(at, _)| *at <= now);
        self.draining = later;
        for (at, node) in due {
            let still = self
                .fleet
                .node(node)
                .is_some_and(|n| n.state == NodeState::Draining { deadline: at });
            if still {
                self.end_node_sessions(node, EndReason::Drained, now);
                self.set_node_state(node, NodeState::Cordoned);
                if let Some(n) = self.fleet.nodes.get_mut(to_usize(node)) {
                    n.cordoned = true;
                }
            }
        }
        self.serve_queue(now);
    }

    /// Places queued requests, highest class first, FIFO within a class; a tier stops at the
    /// first head that still does not fit, so no request overtakes one ahead of it.
    fn serve_queue(&mut self, now: Timestamp) {
        if self.queue.is_empty() {
            return;
        }
        self.with_strategy(|engine, strategy| engine.serve_queue_with(strategy, now));
    }

    fn serve_queue_with(&mut self, strategy: &mut dyn Strategy, now: Timestamp) {
        self.queue_blocked.iter_mut().for_each(|b| *b = None);
        for tier in self.queue.busy_tiers() {
            'tier: for priority in Priority::HIGHEST_FIRST {
                for session in self.queue.class(tier, priority) {
                    let Some(w) = self.queue.get(&session) else {
                        continue;
                    };
                    let waited = now.saturating_since(w.since);
                    let game = self.fleet.catalog.game_idx(&w.request.game);
                    match self.attempt(&w.request, w.tier, w.genre, game, waited, strategy, None) {
                        Ok((choice, region, served)) => {
                            let Some(w) = self.queue.remove(&session) else {
                                continue;
                            };
                            if let Some(p) = self.commit(&w.request, choice, region, served, now) {
                                self.events.push_back(EngineEvent::Placed(p));
                            }
                        }
                        // Not competing for capacity yet: its regions are still beyond the
                        // (relaxing) RTT cap. Those behind it may go.
                        Err(RejectReason::RttTooHigh) => {}
                        // Capacity is short: nobody behind it may overtake it.
                        Err(_) => {
                            if let Some(b) = self.queue_blocked.get_mut(usize::from(tier)) {
                                *b = Some(priority);
                            }
                            break 'tier;
                        }
                    }
                }
            }
        }
    }

    /// Runs `f` with the engine's strategy lent out, so `f` can use the strategy mutably
    /// while it reads and changes the rest of the engine.
    fn with_strategy<R>(&mut self, f: impl FnOnce(&mut Self, &mut dyn Strategy) -> R) -> R {
        // A zero-sized placeholder: boxing it does not allocate.
        let mut strategy =
            std::mem::replace(&mut self.strategy, Box::new(super::strategy::FirstFit));
        let result = f(self, &mut *strategy);
        self.strategy = strategy;
        result
    }

    /// Removes a session's allocation and frees its slot. Returns whether it existed.
    fn end(&mut self, session: &SessionId, reason: EndReason, now: Timestamp, emit: bool) -> bool {
        let Some(alloc) = self.sessions.remove(session) else {
            return false;
        };
        self.fleet.vacate(alloc.gpu, alloc.slot, &alloc.demand);
        self.queue.observe_release(alloc.demand.tier, now);
        if emit {
            let node = self
                .fleet
                .gpu(alloc.gpu)
                .and_then(|g| self.fleet.node(g.node))
                .map(|n| n.id.clone());
            self.events.push_back(EngineEvent::Ended {
                session_id: *session,
                node,
                reason,
            });
        }
        true
    }

    fn end_node_sessions(&mut self, node: NodeIdx, reason: EndReason, now: Timestamp) {
        let gpus: Vec<GpuIdx> = self
            .fleet
            .node(node)
            .map(|n| n.gpus.clone())
            .unwrap_or_default();
        let doomed: Vec<SessionId> = self
            .sessions
            .iter()
            .filter(|(_, a)| gpus.contains(&a.gpu))
            .map(|(id, _)| *id)
            .collect();
        for s in doomed {
            self.end(&s, reason, now, true);
        }
    }

    // ---- nodes ------------------------------------------------------------------------

    /// Stops placing on a node; running sessions go on.
    pub fn cordon(&mut self, node: &NodeId) -> Result<(), EngineError> {
        let idx = self.node_index(node)?;
        if let Some(n) = self.fleet.nodes.get_mut(to_usize(idx)) {
            n.cordoned = true;
        }
        let state = self.fleet.node(idx).map(|n| n.state);
        match state {
            Some(NodeState::Ready) => self.try_node_state(idx, NodeState::Cordoned),
            _ => Ok(()),
        }
    }

    /// Lets a cordoned or draining node take sessions again.
    pub fn uncordon(&mut self, node: &NodeId, now: Timestamp) -> Result<(), EngineError> {
        let idx = self.node_index(node)?;
        if let Some(n) = self.fleet.nodes.get_mut(to_usize(idx)) {
            n.cordoned = false;
        }
        let state = self.fleet.node(idx).map(|n| n.state);
        if matches!(
            state,
            Some(NodeState::Cordoned | NodeState::Draining { .. })
        ) {
            self.try_node_state(idx, NodeState::Ready)?;
            self.serve_queue(now);
        }
        Ok(())
    }

    /// Stops placing on a node and ends its sessions with `drained` at `deadline`.
    pub fn drain(&mut self, node: &NodeId, deadline: Timestamp) -> Result<(), EngineError> {
        let idx = self.node_index(node)?;
        self.try_node_state(idx, NodeState::Draining { deadline })?;
        // A drained node stays out of service until an operator uncordons it, even if it goes
        // down and comes back before the deadline.
        if let Some(n) = self.fleet.nodes.get_mut(to_usize(idx)) {
            n.cordoned = true;
        }
        self.draining.retain(|(_, n)| *n != idx);
        self.draining.push((deadline, idx));
        Ok(())
    }

    /// Marks a node down (its agent stopped answering). Its sessions end with `node-lost`
    /// unless it reports them again within the grace period.
    pub fn node_down(&mut self, node: &NodeId, now: Timestamp) -> Result<(), EngineError> {
        let idx = self.node_index(node)?;
        if self
            .fleet
            .node(idx)
            .is_some_and(|n| n.state == NodeState::Down)
        {
            return Ok(());
        }
        self.try_node_state(idx, NodeState::Down)?;
        self.draining.retain(|(_, n)| *n != idx);
        self.lost
            .push((now.saturating_add(self.config.node_lost_grace), idx));
        Ok(())
    }

    fn node_index(&self, node: &NodeId) -> Result<NodeIdx, EngineError> {
        self.fleet
            .node_idx
            .get(node)
            .copied()
            .ok_or_else(|| EngineError::UnknownNode(node.clone()))
    }

    fn try_node_state(&mut self, idx: NodeIdx, next: NodeState) -> Result<(), EngineError> {
        let current = self
            .fleet
            .node(idx)
            .map(|n| n.state)
            .ok_or(EngineError::CatalogFull)?;
        current.transition(next)?;
        self.set_node_state(idx, next);
        Ok(())
    }

    fn set_node_state(&mut self, idx: NodeIdx, next: NodeState) {
        let Some(n) = self.fleet.nodes.get_mut(to_usize(idx)) else {
            return;
        };
        n.state = next;
        let gpus = n.gpus.clone();
        for g in gpus {
            self.fleet.reindex(g);
        }
    }

    /// Where `session` holds a slot: GPU, slot, tier, state and reservation expiry.
    pub(super) fn allocation(
        &self,
        session: &SessionId,
    ) -> Option<(GpuIdx, u16, TierIdx, SessionState, Option<Timestamp>)> {
        self.sessions
            .get(session)
            .map(|a| (a.gpu, a.slot, a.demand.tier, a.state, a.expires_at))
    }

    /// Requests waiting: each one's first region the engine knows, tier and game.
    pub(super) fn queued_requests(&self) -> Vec<(RegionIdx, TierIdx, &GameId)> {
        self.queue
            .iter()
            .filter_map(|w| {
                let region = w
                    .request
                    .regions
                    .iter()
                    .find_map(|r| self.fleet.catalog.region_idx(&r.region))?;
                Some((region, w.tier, &w.request.game))
            })
            .collect()
    }

    /// Requests waiting, per tier name.
    pub(super) fn queued_per_tier(&self) -> Vec<(TierName, u32)> {
        self.fleet
            .catalog
            .tiers()
            .iter()
            .enumerate()
            .filter_map(|(i, t)| {
                let idx = TierIdx::try_from(i).ok()?;
                let n = Priority::HIGHEST_FIRST
                    .iter()
                    .map(|p| self.queue.class(idx, *p).len())
                    .sum::<usize>();
                Some((t.name.clone(), u32::try_from(n).unwrap_or(u32::MAX)))
            })
            .collect()
    }

    // ---- observed state ---------------------------------------------------------------

    /// Steers a GPU away from new work (`on`) or back (`!on`), for the pool planner: while
    /// steered, the GPU takes no new session and its warm instances are not handed out, so it
    /// empties as its sessions end and can then change profile. Sessions already on it run on
    /// untouched; a session its agent reports is still adopted. Queued requests see capacity a
    /// GPU steered back gives at the engine's next event (a heartbeat, a release, `expire`).
    pub fn steer_away(&mut self, node: &NodeId, gpu: &GpuId, on: bool) -> Result<(), EngineError> {
        let idx = self.node_index(node)?;
        let g = self
            .node_gpu(idx, gpu)
            .ok_or_else(|| EngineError::UnknownGpu {
                node: node.clone(),
                gpu: gpu.clone(),
            })?;
        if self.fleet.gpu(g).is_some_and(|x| x.steered != on) {
            self.fleet.set_steered(g, on);
        }
        Ok(())
    }

    /// Marks a node whose heartbeats are late (`suspect`: no new sessions go to it) or on time
    /// again. Its lifecycle state and an operator's cordon are left as they are.
    pub fn set_suspect(
        &mut self,
        node: &NodeId,
        suspect: bool,
        now: Timestamp,
    ) -> Result<(), EngineError> {
        let idx = self.node_index(node)?;
        let Some(n) = self.fleet.nodes.get_mut(to_usize(idx)) else {
            return Err(EngineError::UnknownNode(node.clone()));
        };
        if n.suspect == suspect {
            return Ok(());
        }
        n.suspect = suspect;
        let gpus = n.gpus.clone();
        for g in gpus {
            self.fleet.reindex(g);
        }
        if !suspect {
            self.serve_queue(now);
        }
        Ok(())
    }

    /// Applies a heartbeat: the node is on time, and its warm instances are as reported
    /// (when the agent reports them). A heartbeat of an older generation is ignored.
    pub fn observe_heartbeat(
        &mut self,
        node: &NodeId,
        heartbeat: &Heartbeat,
        now: Timestamp,
    ) -> Result<(), EngineError> {
        let idx = self.node_index(node)?;
        if self
            .fleet
            .node(idx)
            .is_some_and(|n| heartbeat.generation < n.generation)
        {
            return Ok(());
        }
        if let Some(plan) = heartbeat.plan_generation
            && let Some(n) = self.fleet.nodes.get_mut(to_usize(idx))
        {
            n.plan_generation = plan;
        }
        if let Some(warm) = &heartbeat.warm {
            let reported: Vec<(&GpuId, Option<&str>)> = heartbeat
                .gpus
                .iter()
                .map(|g| (&g.gpu, g.profile.as_deref()))
                .collect();
            self.apply_warm(idx, &reported, warm);
        }
        self.set_suspect(node, false, now)?;
        self.serve_queue(now);
        Ok(())
    }

    /// Sets the warm instances of node `idx`'s reported GPUs, each with the profile its vGPUs
    /// use (which an empty equal-size GPU takes).
    fn apply_warm(&mut self, idx: NodeIdx, gpus: &[(&GpuId, Option<&str>)], warm: &[WarmInstance]) {
        for (gpu_id, profile_name) in gpus {
            let Some(g) = self.node_gpu(idx, gpu_id) else {
                continue;
            };
            let profile = self.fleet.gpu(g).and_then(|gpu| {
                let spec = self.fleet.catalog.spec(gpu.spec)?;
                let name = (*profile_name)?;
                spec.profiles(gpu.mode)
                    .iter()
                    .position(|p| p.id == name)
                    .and_then(|i| u8::try_from(i).ok())
            });
            let entries: Vec<(u16, GameIdx, TierIdx)> = warm
                .iter()
                .filter(|w| &&w.gpu == gpu_id)
                .filter_map(|w| {
                    let slot = u16::try_from(w.slot).ok()?;
                    let tier = self.fleet.catalog.tier_idx(&w.tier)?;
                    Some((slot, w.game.clone(), tier))
                })
                .collect::<Vec<_>>()
                .into_iter()
                .filter_map(|(slot, game, tier)| {
                    Some((slot, self.fleet.catalog.intern_game(&game)?, tier))
                })
                .collect();
            self.fleet.set_warm(g, profile, &entries);
        }
    }

    /// Reconciles the engine's view of a node with the agent's full report (its `hello`):
    /// registers the node and its GPUs, adopts sessions the engine did not know (after a
    /// broker restart), ends sessions the agent no longer has (unless the reservation is so
    /// recent the agent may not have seen it), and takes the warm instances as reported. A
    /// report from an older generation than one already seen is ignored.
    pub fn reconcile(
        &mut self,
        hello: &Hello,
        now: Timestamp,
    ) -> Result<ReconcileOutcome, EngineError> {
        let region = self
            .fleet
            .catalog
            .intern_region(&hello.region)
            .ok_or(EngineError::CatalogFull)?;
        let idx = match self.fleet.node_idx.get(&hello.node_id) {
            Some(&idx) => idx,
            None => {
                let idx = NodeIdx::try_from(self.fleet.nodes.len())
                    .map_err(|_| EngineError::CatalogFull)?;
                self.fleet.nodes.push(Node {
                    id: hello.node_id.clone(),
                    region,
                    state: NodeState::Ready,
                    cordoned: false,
                    suspect: false,
                    generation: hello.generation,
                    gpus: Vec::new(),
                    cpu_total: hello.cpu_millicores,
                    cpu_used: 0,
                    plan_generation: 0,
                });
                self.fleet.node_idx.insert(hello.node_id.clone(), idx);
                idx
            }
        };
        let current = self.fleet.node(idx).map_or(0, |n| n.generation);
        if hello.generation < current {
            return Ok(ReconcileOutcome::Stale { current });
        }
        let restarted = hello.generation > current;
        if let Some(n) = self.fleet.nodes.get_mut(to_usize(idx)) {
            n.generation = hello.generation;
            n.cpu_total = hello.cpu_millicores;
        }

        // GPUs: add new ones, update observed profile and vGPU count, mark missing ones gone.
        let mut seen = Vec::with_capacity(hello.gpus.len());
        for inv in &hello.gpus {
            let spec = self
                .fleet
                .catalog
                .intern_spec(&inv.spec)
                .ok_or(EngineError::CatalogFull)?;
            let existing = self.node_gpu(idx, &inv.gpu);
            let g = match existing {
                Some(g) => g,
                None => self
                    .fleet
                    .push_gpu(idx, inv.gpu.clone(), spec, inv.mode)
                    .ok_or(EngineError::CatalogFull)?,
            };
            seen.push(g);
            if let Some(gpu) = self.fleet.gpus.get_mut(to_usize(g)) {
                gpu.present = true;
                gpu.vgpus_created = inv.vgpus;
            }
            self.fleet.reshape(g, spec, inv.mode);
        }
        let node_gpus: Vec<GpuIdx> = self
            .fleet
            .node(idx)
            .map(|n| n.gpus.clone())
            .unwrap_or_default();
        for &g in &node_gpus {
            if !seen.contains(&g)
                && let Some(gpu) = self.fleet.gpus.get_mut(to_usize(g))
            {
                gpu.present = false;
            }
        }

        // Sessions the agent reports. First take every reported session out of a slot other
        // than the one the agent has it in, without reporting an end (it is re-adopted just
        // below), so two sessions that swapped slots do not evict each other.
        let mut adopted = 0;
        let mut refused = 0;
        let mut reported = Vec::with_capacity(hello.sessions.len());
        let mut placed_as_reported = Vec::with_capacity(hello.sessions.len());
        for rs in &hello.sessions {
            reported.push(rs.session_id);
            let at = self.node_gpu(idx, &rs.gpu).zip(u16::try_from(rs.slot).ok());
            let Some(a) = self.sessions.get(&rs.session_id) else {
                continue;
            };
            if at == Some((a.gpu, a.slot)) {
                placed_as_reported.push(rs.session_id);
            } else {
                self.end(&rs.session_id, EndReason::Error, now, false);
            }
        }
        for rs in &hello.sessions {
            if placed_as_reported.contains(&rs.session_id) {
                let grace = self.config.reconnect_grace;
                let Some(a) = self.sessions.get_mut(&rs.session_id) else {
                    continue;
                };
                a.origin = Origin::Observed;
                if let SessionState::Ended(reason) = rs.state {
                    self.end(&rs.session_id, reason, now, true);
                } else if a.state != rs.state && reachable(a.state, rs.state) {
                    a.state = rs.state;
                    a.since = if rs.state == SessionState::Reconnecting {
                        now
                    } else {
                        rs.since
                    };
                    a.expires_at = None;
                    if rs.state == SessionState::Reconnecting {
                        self.timers.push(Reverse((
                            now.saturating_add(grace),
                            Timer::ReconnectGrace,
                            rs.session_id,
                        )));
                    }
                }
                continue;
            }
            if rs.state.is_ended() {
                continue;
            }
            match self.adopt(idx, rs, now) {
                Ok(()) => adopted += 1,
                Err(_) => refused += 1,
            }
        }

        // Sessions the engine has on the node that the agent does not report.
        let grace = self.config.intent_grace;
        let missing: Vec<SessionId> = self
            .sessions
            .iter()
            .filter(|(id, a)| node_gpus.contains(&a.gpu) && !reported.contains(id))
            .filter(|(_, a)| match a.origin {
                Origin::Observed => true,
                Origin::Intent {
                    made_at,
                    generation,
                } => {
                    restarted
                        || generation < hello.generation
                        || now.saturating_since(made_at) >= grace
                }
            })
            .map(|(id, _)| *id)
            .collect();
        let ended = missing.len();
        for s in missing {
            self.end(&s, EndReason::Error, now, true);
        }

        // Warm instances, per GPU, with the observed profile for empty equal-size GPUs.
        let reported: Vec<(&GpuId, Option<&str>)> = hello
            .gpus
            .iter()
            .map(|g| (&g.gpu, g.profile.as_deref()))
            .collect();
        self.apply_warm(idx, &reported, &hello.warm);

        // A node that reports is alive; an operator's cordon stands.
        let (state, cordoned) = self
            .fleet
            .node(idx)
            .map_or((NodeState::Ready, false), |n| (n.state, n.cordoned));
        if state == NodeState::Down {
            let next = if cordoned {
                NodeState::Cordoned
            } else {
                NodeState::Ready
            };
            self.try_node_state(idx, next)?;
            self.lost.retain(|(_, n)| *n != idx);
        } else {
            for g in node_gpus {
                self.fleet.reindex(g);
            }
        }
        self.serve_queue(now);
        Ok(ReconcileOutcome::Applied {
            adopted,
            ended,
            refused,
        })
    }

    /// Takes a session the agent runs into the engine's accounting, in the slot the agent has it
    /// in, if the GPU's rules allow it. A slot the engine had given to an unconfirmed
    /// reservation goes to the session the agent actually runs.
    fn adopt(
        &mut self,
        node: NodeIdx,
        rs: &RunningSession,
        now: Timestamp,
    ) -> Result<(), Infeasible> {
        let g = self
            .node_gpu(node, &rs.gpu)
            .ok_or(Infeasible::NotAccepting)?;
        let slot = u16::try_from(rs.slot).map_err(|_| Infeasible::NoSlot)?;
        let tier = self
            .fleet
            .catalog
            .tier_idx(&rs.tier)
            .ok_or(Infeasible::NoFit)?;
        let genre = rs
            .genre
            .as_ref()
            .and_then(|g| self.fleet.catalog.genre_idx(g))
            .unwrap_or(0);
        let occupant = self
            .fleet
            .gpu(g)
            .and_then(|gpu| gpu.slots.get(usize::from(slot)).copied());
        if let Some(Slot::Held { session }) = occupant {
            self.end(&session, EndReason::Error, now, true);
        }
        let gpu = self.fleet.gpu(g).ok_or(Infeasible::NotAccepting)?;
        let demand = self.fleet.demand(gpu, tier, genre, false)?;
        let plan = self.fleet.check(gpu, &demand, SlotChoice::Exact(slot))?;
        self.fleet.occupy(g, plan, rs.session_id, &demand);
        let (since, expires_at) = match rs.state {
            SessionState::Reserved => (
                rs.since,
                Some(now.saturating_add(self.config.reservation_ttl)),
            ),
            SessionState::Reconnecting => (now, None),
            _ => (rs.since, None),
        };
        self.sessions.insert(
            rs.session_id,
            Allocation {
                gpu: g,
                slot,
                demand,
                state: rs.state,
                origin: Origin::Observed,
                since,
                expires_at,
            },
        );
        match rs.state {
            SessionState::Reserved => {
                if let Some(at) = expires_at {
                    self.timers
                        .push(Reverse((at, Timer::ReservationExpiry, rs.session_id)));
                }
            }
            SessionState::Reconnecting => {
                self.timers.push(Reverse((
                    now.saturating_add(self.config.reconnect_grace),
                    Timer::ReconnectGrace,
                    rs.session_id,
                )));
            }
            _ => {}
        }
        Ok(())
    }

    fn node_gpu(&self, node: NodeIdx, id: &GpuId) -> Option<GpuIdx> {
        self.fleet
            .node(node)?
            .gpus
            .iter()
            .copied()
            .find(|&g| self.fleet.gpu(g).is_some_and(|gpu| &gpu.id == id))
    }

    // ---- reporting --------------------------------------------------------------------

    /// Fleet-wide usage.
    pub fn stats(&self) -> Stats {
        let mut s = Stats {
            nodes: self.fleet.nodes.len(),
            sessions: self.sessions.len(),
            queued: self.queue.len(),
            ..Stats::default()
        };
        let catalog = &self.fleet.catalog;
        let fb_of = |t: &TierIdx| {
            catalog
                .tier(*t)
                .map_or(u64::MAX, |p| p.framebuffer.megabytes().get())
        };
        let smallest = self.queue.waiting_tiers().min_by_key(fb_of).or_else(|| {
            (0..catalog.tiers().len())
                .filter_map(|i| TierIdx::try_from(i).ok())
                .min_by_key(fb_of)
        });
        for (idx, gpu) in self.fleet.gpus.iter().enumerate() {
            if !gpu.present {
                continue;
            }
            let Some(spec) = self.fleet.catalog.spec(gpu.spec) else {
                continue;
            };
            s.gpus += 1;
            if !spec.can_stream() {
                continue;
            }
            if gpu.held > 0 {
                s.gpus_in_use += 1;
                s.fb_of_gpus_in_use_mb += spec.framebuffer.get();
                s.max_sessions_per_gpu = s.max_sessions_per_gpu.max(gpu.held);
            }
            s.fb_total_mb += spec.framebuffer.get();
            s.fb_used_mb += gpu.used.fb_mb;
            s.encoder_total += u64::from(spec.encoder_capacity.milli());
            s.encoder_used += u64::from(gpu.used.encoder);
            s.compute_used += u64::from(gpu.used.compute);
            let free_mb = spec.framebuffer.get().saturating_sub(gpu.used.fb_mb);
            let stranded = smallest.is_some_and(|t| {
                GpuIdx::try_from(idx)
                    .is_ok_and(|g| self.fleet.free_sessions_of_tier(g, t) == Some(0))
            });
            // A steered GPU's free room is held back on purpose, not stranded.
            if free_mb > 0 && stranded && !gpu.steered {
                s.fb_stranded_mb += free_mb;
            }
        }
        s
    }

    /// Checks every accounting invariant from scratch: per GPU, the counters equal what its
    /// slots and sessions add up to, and no resource exceeds its capacity; every session's slot
    /// holds it; every indexed GPU belongs where it is. For tests and the simulator.
    pub fn audit(&self) -> Result<(), String> {
        #[derive(Default)]
        struct Sum {
            fb: u64,
            compute: u32,
            encoder: u32,
            sessions: u16,
            slices: u16,
            load: u32,
            sensitivity: u32,
        }
        let mut per_gpu: FxHashMap<GpuIdx, Sum> = FxHashMap::default();
        let mut cpu: FxHashMap<NodeIdx, u32> = FxHashMap::default();
        for (id, a) in &self.sessions {
            let gpu = self
                .fleet
                .gpu(a.gpu)
                .ok_or_else(|| format!("{id}: no GPU {}", a.gpu))?;
            match gpu.slots.get(usize::from(a.slot)) {
                Some(Slot::Held { session }) if session == id => {}
                other => {
                    return Err(format!(
                        "{id}: slot {} of {} holds {other:?}",
                        a.slot, gpu.id
                    ));
                }
            }
            let e = per_gpu.entry(a.gpu).or_default();
            e.fb += a.demand.fb_mb;
            e.compute += a.demand.compute;
            e.encoder += a.demand.encoder;
            e.sessions += 1;
            e.slices += a.demand.mig_slices;
            e.load += a.demand.load;
            e.sensitivity += a.demand.sensitivity;
            *cpu.entry(gpu.node).or_default() += a.demand.cpu;
        }
        for (i, gpu) in self.fleet.gpus.iter().enumerate() {
            let g = GpuIdx::try_from(i).map_err(|e| e.to_string())?;
            let spec = self.fleet.catalog.spec(gpu.spec).ok_or("unknown spec")?;
            let name = &gpu.id;
            let mut sum = per_gpu.remove(&g).unwrap_or_default();
            let held = gpu
                .slots
                .iter()
                .filter(|s| matches!(s, Slot::Held { .. }))
                .count();
            let mut warm = 0usize;
            for (slot, s) in gpu.slots.iter().enumerate() {
                if matches!(s, Slot::Warm { .. }) {
                    warm += 1;
                    let (fb, slices) = self
                        .fleet
                        .warm_usage(gpu, u16::try_from(slot).map_err(|e| e.to_string())?);
                    sum.fb += fb;
                    sum.slices += slices;
                }
            }
            if usize::from(gpu.held) != held
                || usize::from(gpu.warm) != warm
                || gpu.held != sum.sessions
            {
                return Err(format!(
                    "{name}: held {} warm {} but slots say {held}/{warm}, sessions {}",
                    gpu.held, gpu.warm, sum.sessions
                ));
            }
            let counted = (
                gpu.used.fb_mb,
                gpu.used.compute,
                gpu.used.encoder,
                gpu.used.encoder_sessions,
                gpu.used.mig_slices,
                gpu.load,
                gpu.sensitivity,
            );
            let recomputed = (
                sum.fb,
                sum.compute,
                sum.encoder,
                sum.sessions,
                sum.slices,
                sum.load,
                sum.sensitivity,
            );
            if counted != recomputed {
                return Err(format!(
                    "{name}: counters {counted:?} but sessions and warm slots add up to {recomputed:?}"
                ));
            }
            if gpu.used.fb_mb > spec.framebuffer.get() {
                return Err(format!(
                    "{name}: framebuffer {} > {}",
                    gpu.used.fb_mb,
                    spec.framebuffer.get()
                ));
            }
            if gpu.used.encoder > spec.encoder_capacity.milli() {
                return Err(format!(
                    "{name}: encoder {} > {}",
                    gpu.used.encoder,
                    spec.encoder_capacity.milli()
                ));
            }
            if spec
                .encoder_session_cap
                .is_some_and(|c| gpu.used.encoder_sessions > c)
            {
                return Err(format!("{name}: encoder sessions over the cap"));
            }
            let compute_limit = if gpu.mode.enforces_compute_share() {
                super::fleet::FULL_COMPUTE
            } else {
                super::fleet::SOFT_COMPUTE_LIMIT
            };
            if gpu.used.compute > compute_limit {
                return Err(format!(
                    "{name}: compute {} > {compute_limit}",
                    gpu.used.compute
                ));
            }
            if gpu.mode == GpuMode::EqualSize && !gpu.exclusive && gpu.occupied() > gpu.slot_cap {
                return Err(format!(
                    "{name}: {} slots occupied of {}",
                    gpu.occupied(),
                    gpu.slot_cap
                ));
            }
            if gpu.mode == GpuMode::Mig && gpu.used.mig_slices > u16::from(spec.mig_compute_slices)
            {
                return Err(format!("{name}: MIG slices over"));
            }
            if gpu.exclusive && gpu.occupied() != 1 {
                return Err(format!(
                    "{name}: exclusive with {} occupied",
                    gpu.occupied()
                ));
            }
        }
        for (i, n) in self.fleet.nodes.iter().enumerate() {
            let idx = NodeIdx::try_from(i).map_err(|e| e.to_string())?;
            let expected = cpu.get(&idx).copied().unwrap_or(0);
            if n.cpu_used != expected {
                return Err(format!(
                    "{}: CPU used {} but sessions add up to {expected}",
                    n.id, n.cpu_used
                ));
            }
            if n.cpu_total.is_some_and(|t| n.cpu_used > t) {
                return Err(format!("{}: CPU over", n.id));
            }
        }
        Ok(())
    }
}

/// Whether the lifecycle leads from `from` to `to` in at most three steps: an agent's report
/// may skip states the broker never heard of (reserved → active after a missed update).
fn reachable(from: SessionState, to: SessionState) -> bool {
    const LIVE: [SessionState; 4] = [
        SessionState::Reserved,
        SessionState::Connecting,
        SessionState::Active,
        SessionState::Reconnecting,
    ];
    from.allows(to)
        || LIVE.iter().any(|&m| {
            from.allows(m) && (m.allows(to) || LIVE.iter().any(|&n| m.allows(n) && n.allows(to)))
        })
}

fn relaxed_cap(cap_ms: u32, waited: Duration, config: &EngineConfig) -> u32 {
    let every = config.rtt_relax_every.as_secs_f64().max(0.001);
    let factor = (1.0 + waited.as_secs_f64() / every).min(config.rtt_max_factor.max(1.0));
    let relaxed = (f64::from(cap_ms) * factor).round();
    if relaxed.is_finite() && relaxed >= 0.0 && relaxed <= f64::from(u32::MAX) {
        // In range by the check above.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let r = relaxed as u32;
        r
    } else {
        cap_ms
    }
}

#[cfg(test)]
mod steering_tests {
    //! Steering a GPU away: it takes no new session and hands out no warm instance, and no
    //! session on it is touched, whatever the sequence of events.

    #![allow(
        clippy::unwrap_used,
        clippy::panic,
        clippy::indexing_slicing,
        reason = "tests: a failed unwrap is a failed test"
    )]

    use std::collections::{BTreeMap, BTreeSet};

    use proptest::prelude::{any, prop_assert, prop_assert_eq, prop_oneof, proptest};
    use proptest::strategy::Strategy as _;

    use framecast_shared::gpu::models;
    use framecast_shared::ids::{GenreName, RegionName, TenantId};
    use framecast_shared::protocol::GpuUsage;
    use framecast_shared::units::{EncoderUnits, Megabytes};

    use super::*;
    use crate::placement::request::RegionRtt;
    use crate::placement::simulated;
    use crate::placement::strategy::{self, GenreWeighted};

    const T0: Timestamp = Timestamp::from_millis(1_800_000_000_000);
    const TIERS: [&str; 3] = ["720p", "1080p", "4k"];

    fn engine(strategy: Box<dyn super::Strategy>) -> Engine {
        let mut e = Engine::new(
            TierPreset::defaults(),
            GenreProfile::defaults(),
            EngineConfig::default(),
            strategy,
        );
        for (node, mode) in [
            ("n0", GpuMode::EqualSize),
            ("n1", GpuMode::EqualSize),
            ("n2", GpuMode::MixedSize),
        ] {
            let hello = simulated::hello(node, "eu", &models::l4(), mode, 2, 1).unwrap();
            e.reconcile(&hello, T0).unwrap();
        }
        e
    }

    fn request(seq: u128, tier: &str) -> PlaceRequest {
        PlaceRequest {
            session_id: SessionId::new(T0, seq),
            tenant: TenantId::new("t").unwrap(),
            game: GameId::new("arena").unwrap(),
            tier: TierName::new(tier).unwrap(),
            genre: GenreName::new("moba").unwrap(),
            priority: Priority::Normal,
            regions: vec![RegionRtt {
                region: RegionName::new("eu").unwrap(),
                rtt_ms: 10,
            }],
            fallbacks: Vec::new(),
            queue: false,
        }
    }

    /// Every GPU, as (node, gpu).
    fn gpus(e: &Engine) -> Vec<(NodeId, GpuId)> {
        e.pool_view()
            .nodes
            .iter()
            .flat_map(|n| n.gpus.iter().map(|g| (n.node_id.clone(), g.gpu.clone())))
            .collect()
    }

    /// Where every session is: session → (GPU, slot).
    fn places(e: &Engine) -> BTreeMap<SessionId, (GpuId, u32)> {
        e.sessions
            .keys()
            .filter_map(|s| e.session_place(s).map(|p| (*s, (p.gpu, p.slot))))
            .collect()
    }

    #[test]
    fn a_steered_gpu_takes_no_session_until_steered_back() {
        let mut e = engine(Box::new(strategy::FirstFit));
        let all = gpus(&e);
        // Steer every GPU but the last away: sessions go only there.
        for (n, g) in &all[..all.len() - 1] {
            e.steer_away(n, g, true).unwrap();
        }
        let last = &all[all.len() - 1].1;
        for seq in 0..3 {
            match e.place(request(seq, "720p"), T0) {
                Decision::Placed(p) => assert_eq!(&p.gpu, last),
                other => panic!("{other:?}"),
            }
        }
        let steered: Vec<bool> = e
            .pool_view()
            .nodes
            .iter()
            .flat_map(|n| n.gpus.iter().map(|g| g.steered))
            .collect();
        assert_eq!(steered.iter().filter(|s| **s).count(), all.len() - 1);
        assert!(e.node_views()[0].gpus[0].steered);
        // The explanation says why a steered GPU was passed over.
        let explained = e.explain(&request(99, "720p"));
        assert!(
            explained
                .attempts
                .iter()
                .flat_map(|a| a.candidates.iter())
                .all(|c| &c.gpu == last || c.infeasible.is_some())
        );
        // Back: the first GPU takes sessions again.
        let (n, g) = &all[0];
        e.steer_away(n, g, false).unwrap();
        let Decision::Placed(p) = e.place(request(10, "4k"), T0) else {
            panic!("placed")
        };
        assert_eq!(&p.gpu, g);
        assert!(matches!(
            e.steer_away(n, &GpuId::new("nope").unwrap(), true),
            Err(EngineError::UnknownGpu { .. })
        ));
        assert!(matches!(
            e.steer_away(&NodeId::new("nope").unwrap(), g, true),
            Err(EngineError::UnknownNode(_))
        ));
        e.audit().unwrap();
    }

    #[test]
    fn a_steered_gpu_hands_out_no_warm_instance() {
        let mut e = engine(Box::new(GenreWeighted::default()));
        let node = NodeId::new("n0").unwrap();
        let gpu = GpuId::new("n0-gpu0").unwrap();
        let heartbeat = Heartbeat {
            generation: 1,
            seq: 1,
            sent_at: T0,
            gpus: vec![GpuUsage {
                gpu: gpu.clone(),
                free_framebuffer: Megabytes::ZERO,
                free_encoder: EncoderUnits::ZERO,
                encoder_utilization_pct: None,
                gpu_utilization_pct: None,
                vgpus: Some(12),
                profile: Some("L4-2Q".into()),
            }],
            warm: Some(vec![WarmInstance {
                gpu: gpu.clone(),
                slot: 4,
                game: GameId::new("arena").unwrap(),
                tier: TierName::new("720p").unwrap(),
            }]),
            plan_generation: Some(7),
            inputs: Vec::new(),
        };
        e.observe_heartbeat(&node, &heartbeat, T0).unwrap();
        assert_eq!(e.fleet().nodes[0].plan_generation, 7);
        e.steer_away(&node, &gpu, true).unwrap();
        let Decision::Placed(p) = e.place(request(1, "720p"), T0) else {
            panic!("placed")
        };
        assert!(!p.warm && p.gpu != gpu, "{p:?}");
        // The warm instance is still known, and is handed out once the GPU is back.
        assert_eq!(e.pool_view().nodes[0].gpus[0].warm.len(), 1);
        e.steer_away(&node, &gpu, false).unwrap();
        let Decision::Placed(p) = e.place(request(2, "720p"), T0) else {
            panic!("placed")
        };
        assert!(p.warm && p.gpu == gpu, "{p:?}");
    }

    #[derive(Debug, Clone)]
    enum Op {
        Place(usize),
        Release(usize),
        Steer { gpu: usize, on: bool },
        Report(usize),
    }

    fn op() -> impl proptest::strategy::Strategy<Value = Op> {
        prop_oneof![
            6 => (0..3usize).prop_map(Op::Place),
            3 => any::<usize>().prop_map(Op::Release),
            3 => (0..6usize, any::<bool>()).prop_map(|(gpu, on)| Op::Steer { gpu, on }),
            1 => (0..3usize).prop_map(Op::Report),
        ]
    }

    proptest! {
        #[test]
        fn steering_keeps_new_sessions_off_and_running_ones_untouched(
            ops in proptest::collection::vec(op(), 1..80)
        ) {
            let mut weighted = engine(Box::new(GenreWeighted::default()));
            let mut first_fit = engine(Box::new(strategy::FirstFit));
            for e in [&mut weighted, &mut first_fit] {
                let all = gpus(e);
                let mut steered: BTreeSet<GpuId> = BTreeSet::new();
                let mut seq = 0u128;
                for op in &ops {
                    match op {
                        Op::Place(tier) => {
                            seq += 1;
                            if let Decision::Placed(p) = e.place(request(seq, TIERS[*tier]), T0) {
                                prop_assert!(!steered.contains(&p.gpu), "placed on steered {}", p.gpu);
                            }
                        }
                        Op::Release(i) => {
                            let live: Vec<SessionId> = e.sessions.keys().copied().collect();
                            if !live.is_empty() {
                                let s = live[i % live.len()];
                                e.release(&s, EndReason::Released, T0).unwrap();
                            }
                        }
                        Op::Steer { gpu, on } => {
                            let before = places(e);
                            let (n, g) = &all[gpu % all.len()];
                            e.steer_away(n, g, *on).unwrap();
                            if *on {
                                steered.insert(g.clone());
                            } else {
                                steered.remove(g);
                            }
                            prop_assert_eq!(places(e), before, "steering moved a session");
                        }
                        Op::Report(node) => {
                            // The agent reports exactly what the engine has: nothing changes,
                            // steered or not.
                            let before = places(e);
                            let id = NodeId::new(format!("n{node}")).unwrap();
                            let mut hello = simulated::hello(
                                id.as_str(),
                                "eu",
                                &models::l4(),
                                if *node == 2 { GpuMode::MixedSize } else { GpuMode::EqualSize },
                                2,
                                1,
                            )
                            .unwrap();
                            for s in e.sessions_on(&id) {
                                let p = e.session_place(&s).unwrap();
                                hello.sessions.push(RunningSession {
                                    session_id: s,
                                    gpu: p.gpu,
                                    slot: p.slot,
                                    game: GameId::new("arena").unwrap(),
                                    tier: p.tier,
                                    genre: Some(GenreName::new("moba").unwrap()),
                                    state: p.state,
                                    since: T0,
                                });
                            }
                            e.reconcile(&hello, T0).unwrap();
                            prop_assert_eq!(places(e), before);
                        }
                    }
                    prop_assert!(e.audit().is_ok(), "{:?}", e.audit());
                    for (i, g) in e.fleet.gpus.iter().enumerate() {
                        prop_assert_eq!(g.steered, steered.contains(&g.id));
                        if g.steered {
                            let gi = GpuIdx::try_from(i).unwrap();
                            for t in 0..3 {
                                prop_assert_eq!(e.fleet.free_sessions_of_tier(gi, t), Some(0));
                            }
                            prop_assert_eq!(g.membership, crate::placement::index::Membership::default());
                        }
                    }
                }
            }
        }
    }
}
