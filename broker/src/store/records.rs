//! The rows the store keeps: live sessions, idempotency claims, audit records and the
//! operators' standing decisions about nodes.
//!
//! Every record is stored as CBOR (through the store's one encoding helper), so its serde
//! field names are its on-disk schema. Records only grow: a field added later must carry
//! `#[serde(default)]` (an `Option` field defaults to `None` by itself) so that rows written by
//! an older broker still decode, and an older broker ignores fields it does not know. Renaming
//! or removing a field needs a schema-version bump in [`super`].

use serde::{Deserialize, Serialize};

use framecast_shared::ids::{
    GameId, GenreName, GpuId, NodeId, RegionName, SessionId, TenantId, TierName,
};
use framecast_shared::state::{EndReason, SessionState};
use framecast_shared::time::Timestamp;

/// A live session as the broker last wrote it: everything needed to rebuild the placement
/// engine's view after a restart.
///
/// Fields added after the first release must be `#[serde(default)]` so that older rows still
/// decode (see the module documentation).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredSession {
    /// The session's id; its UUIDv7 bytes are the row's key, so rows sort by creation time.
    pub session_id: SessionId,
    /// The platform that asked for it.
    pub tenant: TenantId,
    /// The game it plays.
    pub game: GameId,
    /// The quality tier it was placed for.
    pub tier: TierName,
    /// The game's genre, which weighs the placement score.
    pub genre: GenreName,
    /// The platform's id for the player, opaque to the broker.
    pub player_id: String,
    /// The request's priority class, as the API spelled it.
    pub priority: String,
    /// The regions the player can reach, with the measured round-trip time in milliseconds.
    pub regions: Vec<(RegionName, u32)>,
    /// Where the session is in its life.
    pub state: SessionState,
    /// The node holding its slot, once placed.
    pub node: Option<NodeId>,
    /// The GPU on that node, once placed.
    pub gpu: Option<GpuId>,
    /// The slot on that GPU, once placed.
    pub slot: Option<u32>,
    /// When the request was accepted.
    pub created_at: Timestamp,
    /// When a slot was first held for it (the start of billing).
    pub placed_at: Option<Timestamp>,
    /// When the player's stream first became active.
    pub active_at: Option<Timestamp>,
    /// When the current reservation or grace period runs out, if one is running.
    pub expires_at: Option<Timestamp>,
    /// The `Idempotency-Key` the request carried, if any.
    pub idempotency_key: Option<String>,
    /// Framebuffer the slot holds, in MiB.
    pub framebuffer_mb: u64,
    /// Compute the slot holds, in sixteenths of one GPU.
    pub compute_sixteenths: u8,
}

/// A claimed `Idempotency-Key`: which request body first used it and which session it made.
///
/// Keyed by (tenant, key): two tenants may use the same key. Fields added later must be
/// `#[serde(default)]` (see the module documentation).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IdempotencyRecord {
    /// The tenant that sent the key.
    pub tenant: TenantId,
    /// The key as the client sent it.
    pub key: String,
    /// SHA-256 of the request body that first used the key. A retry with the same body gets
    /// the same session; a different body under the same key is a conflict (409).
    pub request_sha256: [u8; 32],
    /// The session the first request created.
    pub session_id: SessionId,
    /// When the key was first claimed; the key expires a TTL (24 h in the broker) after this.
    pub created_at: Timestamp,
}

/// One ended session, as billed: written in the same transaction that removes the live
/// session, and never changed afterwards.
///
/// Keyed by (end time in Unix milliseconds, session id), so a time range is a range scan.
/// Fields added later must be `#[serde(default)]` (see the module documentation).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// The session's id.
    pub session_id: SessionId,
    /// The platform billed for it.
    pub tenant: TenantId,
    /// The game it played.
    pub game: GameId,
    /// Its quality tier.
    pub tier: TierName,
    /// Its game's genre.
    pub genre: GenreName,
    /// The node it ran on, if it was ever placed.
    pub node: Option<NodeId>,
    /// The GPU it ran on, if it was ever placed.
    pub gpu: Option<GpuId>,
    /// When the request was accepted.
    pub created_at: Timestamp,
    /// When it first held a slot (its placement): the start of billing. `None` for a session
    /// that never left the queue.
    pub started_at: Option<Timestamp>,
    /// When it ended.
    pub ended_at: Timestamp,
    /// Why it ended.
    pub end_reason: EndReason,
    /// Seconds from `started_at` to `ended_at`; zero when it never held a slot.
    pub session_seconds: f64,
    /// The billing unit: the share of one GPU's compute the slot held
    /// (`compute_sixteenths / 16`) times `session_seconds`.
    pub gpu_seconds: f64,
    /// Framebuffer the slot held, in MiB.
    pub framebuffer_mb: u64,
    /// Compute the slot held, in sixteenths of one GPU.
    pub compute_sixteenths: u8,
}

/// An operator's standing decision about a node: it is out of service (cordoned), and, when
/// `drain_deadline` is set, draining until then. The row's presence is the cordon; an
/// uncordon removes it. This is intent: what the broker re-applies to a node when its agent
/// says hello after a broker restart.
///
/// Keyed by the node id. Fields added later must be `#[serde(default)]` (see the module
/// documentation).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredNode {
    /// The node; also the row's key.
    pub node_id: NodeId,
    /// When the node's running sessions end with `drained`, if an operator drained it. A
    /// deadline in the past means the drain has finished and the node is only cordoned.
    pub drain_deadline: Option<Timestamp>,
    /// When the operator (or, for a drain the broker learnt from the agent, the broker)
    /// made the decision; for operators reading the store, not used by the broker.
    pub since: Timestamp,
}

impl AuditRecord {
    /// The audit record for `session` ending at `ended_at` for `reason`.
    ///
    /// Billing runs from the first time a slot was held (`placed_at`) to `ended_at`; a session
    /// that was never placed, or whose end is not after its placement, bills zero seconds.
    pub fn from_session(session: &StoredSession, ended_at: Timestamp, reason: EndReason) -> Self {
        let session_seconds = session.placed_at.map_or(0.0, |placed| {
            ended_at.saturating_since(placed).as_secs_f64()
        });
        let gpu_seconds = session_seconds * f64::from(session.compute_sixteenths) / 16.0;
        Self {
            session_id: session.session_id,
            tenant: session.tenant.clone(),
            game: session.game.clone(),
            tier: session.tier.clone(),
            genre: session.genre.clone(),
            node: session.node.clone(),
            gpu: session.gpu.clone(),
            created_at: session.created_at,
            started_at: session.placed_at,
            ended_at,
            end_reason: reason,
            session_seconds,
            gpu_seconds,
            framebuffer_mb: session.framebuffer_mb,
            compute_sixteenths: session.compute_sixteenths,
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A placed, active session created at `created_ms`, placed a second later.
    pub(crate) fn session(created_ms: u64, random: u128) -> StoredSession {
        let created_at = Timestamp::from_millis(created_ms);
        StoredSession {
            session_id: SessionId::new(created_at, random),
            tenant: TenantId::new("acme").unwrap(),
            game: GameId::new("arena-shooter").unwrap(),
            tier: TierName::new("1080p").unwrap(),
            genre: GenreName::new("fps").unwrap(),
            player_id: "player, \"one\"\n".to_owned(),
            priority: "standard".to_owned(),
            regions: vec![
                (RegionName::new("eu-west").unwrap(), 18),
                (RegionName::new("eu-central").unwrap(), 31),
            ],
            state: SessionState::Active,
            node: Some(NodeId::new("gpu-host-01").unwrap()),
            gpu: Some(GpuId::new("GPU-8f0c2a4e-1d2b-4c3d-9e8f-0a1b2c3d4e5f").unwrap()),
            slot: Some(3),
            created_at,
            placed_at: Some(Timestamp::from_millis(created_ms + 1_000)),
            active_at: Some(Timestamp::from_millis(created_ms + 4_000)),
            expires_at: None,
            idempotency_key: Some("key-1".to_owned()),
            framebuffer_mb: 4_096,
            compute_sixteenths: 4,
        }
    }

    #[test]
    fn billing_runs_from_placement_and_scales_by_the_compute_share() {
        let s = session(1_700_000_000_000, 7);
        let ended = Timestamp::from_millis(1_700_000_000_000 + 1_000 + 90_500);
        let audit = AuditRecord::from_session(&s, ended, EndReason::Released);
        assert_eq!(audit.started_at, s.placed_at);
        assert_eq!(audit.session_seconds, 90.5);
        assert_eq!(audit.gpu_seconds, 90.5 * 4.0 / 16.0);
        assert_eq!(audit.end_reason, EndReason::Released);
        assert_eq!(audit.node, s.node);
        assert_eq!(audit.compute_sixteenths, 4);
    }

    #[test]
    fn a_session_that_never_held_a_slot_bills_nothing() {
        let mut s = session(1_700_000_000_000, 7);
        s.placed_at = None;
        s.node = None;
        s.gpu = None;
        s.state = SessionState::Queued;
        let ended = Timestamp::from_millis(1_800_000_000_000);
        let audit = AuditRecord::from_session(&s, ended, EndReason::Expired);
        assert_eq!(audit.started_at, None);
        assert_eq!(audit.session_seconds, 0.0);
        assert_eq!(audit.gpu_seconds, 0.0);
    }

    #[test]
    fn an_end_before_placement_bills_nothing_rather_than_going_negative() {
        let s = session(1_700_000_000_000, 7);
        let audit = AuditRecord::from_session(&s, s.created_at, EndReason::Error);
        assert_eq!(audit.session_seconds, 0.0);
        assert_eq!(audit.gpu_seconds, 0.0);
    }
}
