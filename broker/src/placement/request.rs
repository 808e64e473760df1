//! What callers ask of the engine and what it answers.

use serde::Serialize;

use framecast_shared::ids::{
    GameId, GenreName, GpuId, NodeId, RegionName, SessionId, TenantId, TierName,
};
use framecast_shared::state::EndReason;
use framecast_shared::time::Timestamp;

use super::score::ScoreBreakdown;

/// A tenant's priority class; higher classes are served first from the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    /// Served after the others.
    Low = 0,
    /// The default.
    Normal = 1,
    /// Served first.
    High = 2,
}

impl Priority {
    /// Every class, highest first.
    pub const HIGHEST_FIRST: [Priority; 3] = [Priority::High, Priority::Normal, Priority::Low];

    /// The class's position in per-class arrays.
    pub fn index(self) -> usize {
        self as usize
    }
}

/// A way a request may be served other than exactly as asked, tried in the order given.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Fallback {
    /// The next region in the request's list (by RTT, within the genre's cap).
    NextRegion,
    /// The next tier up (a 720p request served with a 1080p slot).
    TierUp,
}

/// The player's round trip to one region.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RegionRtt {
    /// The region.
    pub region: RegionName,
    /// Round-trip time in milliseconds.
    pub rtt_ms: u32,
}

/// A request for a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlaceRequest {
    /// The session's id, chosen by the caller.
    pub session_id: SessionId,
    /// Who asks.
    pub tenant: TenantId,
    /// The game.
    pub game: GameId,
    /// The tier asked for.
    pub tier: TierName,
    /// The game's genre.
    pub genre: GenreName,
    /// The tenant's priority class.
    pub priority: Priority,
    /// Candidate regions in order of preference, with the player's RTT to each.
    pub regions: Vec<RegionRtt>,
    /// Fallbacks allowed, in the order to try them.
    pub fallbacks: Vec<Fallback>,
    /// Wait in the queue when nothing fits, instead of being rejected.
    pub queue: bool,
}

/// The engine's answer to a request.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "decision", rename_all = "kebab-case")]
pub enum Decision {
    /// A slot was reserved.
    Placed(Placement),
    /// The request waits in its tier's queue.
    Queued(QueuedInfo),
    /// The request cannot be served.
    Rejected {
        /// Why.
        reason: RejectReason,
    },
}

/// Where a session was placed.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Placement {
    /// The session.
    pub session_id: SessionId,
    /// The region.
    pub region: RegionName,
    /// The node.
    pub node: NodeId,
    /// The GPU.
    pub gpu: GpuId,
    /// The vGPU slot on the GPU.
    pub slot: u32,
    /// The tier served (higher than asked after a tier-up fallback).
    pub tier: TierName,
    /// A warm instance was taken.
    pub warm: bool,
    /// The GPU takes a new vGPU profile for it.
    pub reprofile: bool,
    /// When the reservation lapses if the player has not connected.
    pub expires_at: Timestamp,
    /// Why this GPU.
    pub score: ScoreBreakdown,
}

/// A request's place in the queue.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct QueuedInfo {
    /// The session.
    pub session_id: SessionId,
    /// Requests ahead of it in its tier (0 = next).
    pub position: usize,
    /// Estimated seconds until placed, from the tier's recent release rate; `None` until
    /// releases have been seen.
    pub eta_seconds: Option<u32>,
}

/// Why a request was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RejectReason {
    /// The tier is not configured.
    UnknownTier,
    /// The genre is not configured.
    UnknownGenre,
    /// The request names no region, or none the engine knows.
    NoRegion,
    /// Every region is beyond the genre's RTT cap.
    RttTooHigh,
    /// Nothing fits and queueing was not allowed.
    NoCapacity,
    /// A session with this id exists already.
    DuplicateSession,
}

/// Something the engine did on its own (a timer, a reconcile, freed capacity) that the
/// service must act on. Drain them with `Engine::poll_event`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum EngineEvent {
    /// A queued request was placed.
    Placed(Placement),
    /// A session ended (reservation expired, queue timeout, node lost, drain deadline,
    /// reconnect grace passed, or the agent no longer reports it).
    Ended {
        /// The session.
        session_id: SessionId,
        /// The node it was on; `None` for a request that never left the queue.
        node: Option<NodeId>,
        /// Why.
        reason: EndReason,
    },
}

/// One candidate the strategy weighed.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CandidateExplanation {
    /// The node.
    pub node: NodeId,
    /// The GPU.
    pub gpu: GpuId,
    /// The slot it would use, if feasible.
    pub slot: Option<u32>,
    /// It would take a warm instance.
    pub warm: bool,
    /// It would re-profile the GPU.
    pub reprofile: bool,
    /// Why it cannot, if it cannot.
    pub infeasible: Option<&'static str>,
    /// Its score, if feasible.
    pub score: Option<ScoreBreakdown>,
}

/// One (region, tier) the engine tried.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AttemptExplanation {
    /// The region.
    pub region: RegionName,
    /// The tier.
    pub tier: TierName,
    /// The player's RTT to the region.
    pub rtt_ms: u32,
    /// The genre's cap, relaxed by time already queued.
    pub rtt_cap_ms: u32,
    /// Why the attempt was skipped without looking at GPUs.
    pub skipped: Option<&'static str>,
    /// The candidates weighed, best last chosen.
    pub candidates: Vec<CandidateExplanation>,
}

/// The answer to "why there?": every attempt with its candidates, and the decision.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Explanation {
    /// The strategy that decided.
    pub strategy: &'static str,
    /// The attempts in order.
    pub attempts: Vec<AttemptExplanation>,
    /// What the engine would decide now.
    pub decision: Decision,
}
