//! What the API says about a session, and what it is asked.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::store::StoredSession;

/// `POST /v1/sessions`: a player wants to play.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSession {
    /// The game, one of the broker's `[[games]]`.
    #[schema(example = "arena-shooter")]
    pub game: String,
    /// The quality tier: `720p`, `1080p`, `4k` or another configured one.
    #[schema(example = "1080p")]
    pub tier: String,
    /// The genre; the game's own when absent.
    #[serde(default)]
    #[schema(example = "fps")]
    pub genre: Option<String>,
    /// The platform's id for the player (for its own records and the audit log).
    #[schema(example = "player-42")]
    pub player_id: String,
    /// Candidate regions with the player's round-trip time to each, best first; the broker's
    /// own region at 0 ms when absent.
    #[serde(default)]
    pub regions: Vec<RegionRttBody>,
    /// `low`, `normal` (default) or `high`: the order in which queued requests are served.
    #[serde(default)]
    #[schema(example = "normal")]
    pub priority: Option<String>,
    /// Wait in the queue when nothing is free (default), or fail at once with 503.
    #[serde(default)]
    pub queue: Option<bool>,
    /// Fallbacks allowed, in order: `next-region`, `tier-up`.
    #[serde(default)]
    pub fallbacks: Vec<String>,
}

/// A region and the player's round-trip time to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RegionRttBody {
    /// The region.
    #[schema(example = "eu-west")]
    pub name: String,
    /// Round-trip time, ms.
    #[schema(example = 12)]
    pub rtt_ms: u32,
}

/// A session as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SessionView {
    /// The session's id (a UUIDv7).
    pub session_id: String,
    /// `queued`, `reserved`, `connecting`, `active`, `reconnecting` or `ended`.
    pub state: String,
    /// Why it ended, once it has.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub end_reason: Option<String>,
    /// The game.
    pub game: String,
    /// The tier served (higher than asked after a `tier-up` fallback).
    pub tier: String,
    /// The genre.
    pub genre: String,
    /// The platform's player id.
    pub player_id: String,
    /// The node, once placed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_id: Option<String>,
    /// The GPU, once placed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpu: Option<String>,
    /// Where the player's client posts its WHEP offer, once placed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub whep_url: Option<String>,
    /// The bearer token for the WHEP endpoint, once placed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// When a reservation lapses if the player has not connected (RFC 3339).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    /// Requests ahead in the queue (0 = next), while queued.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue_position: Option<usize>,
    /// Estimated seconds until placed, while queued, once the broker has seen releases.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eta_seconds: Option<u32>,
    /// When the request arrived (RFC 3339).
    pub created_at: String,
}

impl SessionView {
    /// The view of `record`, with the token and URL where the session has them.
    pub fn of(record: &StoredSession, token: Option<&str>, whep_url: Option<&str>) -> Self {
        let (state, end_reason) = super::state_words(record.state);
        Self {
            session_id: record.session_id.to_string(),
            state: state.to_owned(),
            end_reason,
            game: record.game.to_string(),
            tier: record.tier.to_string(),
            genre: record.genre.to_string(),
            player_id: record.player_id.clone(),
            node_id: record.node.as_ref().map(ToString::to_string),
            gpu: record.gpu.as_ref().map(ToString::to_string),
            whep_url: whep_url.map(str::to_owned),
            token: token.map(str::to_owned),
            expires_at: record.expires_at.map(|t| t.rfc3339()),
            queue_position: None,
            eta_seconds: None,
            created_at: record.created_at.rfc3339(),
        }
    }
}
