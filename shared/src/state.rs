//! Session and node lifecycles, and which transitions between their states are allowed.
//!
//! ```text
//! session:  queued ─→ reserved ─→ connecting ─→ active ⇄ reconnecting
//!              │          │            │           │          │
//!              └──────────┴────────────┴───────────┴──────────┴─→ ended(reason)
//!
//! node:     ready ⇄ cordoned,  ready/cordoned ─→ draining(deadline) ─→ cordoned,
//!           any ─→ down ─→ ready/cordoned (the agent came back)
//! ```
//!
//! A session also goes from `connecting` to `reconnecting` when its stream drops before it
//! played.
//!
//! The broker and the agent both call [`SessionState::transition`] and
//! [`NodeState::transition`]; a transition that is not allowed is an error value, so a bug or
//! a confused peer cannot move a session backwards.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::time::Timestamp;

/// Why a session ended. Recorded for billing and shown to the platform.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub enum EndReason {
    /// The platform or the player released it.
    Released,
    /// A reservation was not used before its TTL, or a queued request waited too long.
    Expired,
    /// The player sent no input for longer than the idle timeout.
    Idle,
    /// The session reached its maximum length.
    MaxLength,
    /// The node stopped answering and the grace period passed.
    NodeLost,
    /// The node was drained and the deadline passed.
    Drained,
    /// The game instance or the stream failed.
    Error,
}

impl EndReason {
    /// Every reason, in declaration order.
    pub const ALL: [EndReason; 7] = [
        Self::Released,
        Self::Expired,
        Self::Idle,
        Self::MaxLength,
        Self::NodeLost,
        Self::Drained,
        Self::Error,
    ];

    /// Whether a session that never left the queue can end this way: it holds no GPU, so it
    /// cannot be idle, too long, or lost with a node.
    fn applies_to_queued(self) -> bool {
        matches!(self, Self::Released | Self::Expired | Self::Error)
    }
}

impl fmt::Display for EndReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Released => "released",
            Self::Expired => "expired",
            Self::Idle => "idle",
            Self::MaxLength => "max-length",
            Self::NodeLost => "node-lost",
            Self::Drained => "drained",
            Self::Error => "error",
        })
    }
}

/// Where a session is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "state", content = "reason", rename_all = "kebab-case")]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub enum SessionState {
    /// Waiting for a slot.
    Queued,
    /// A slot is held for the player until the reservation's TTL.
    Reserved,
    /// The player's client is negotiating the stream.
    Connecting,
    /// The player is playing.
    Active,
    /// The stream dropped; the slot is held for the reconnect grace period.
    Reconnecting,
    /// The session is over.
    Ended(EndReason),
}

/// A transition that the lifecycle does not allow.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a {kind} cannot go from {from} to {to}")]
pub struct TransitionError {
    /// `session` or `node`.
    pub kind: &'static str,
    /// The state it was in.
    pub from: String,
    /// The state asked for.
    pub to: String,
}

impl SessionState {
    /// Whether a session in this state may move to `next`.
    pub fn allows(self, next: SessionState) -> bool {
        use SessionState::*;
        match (self, next) {
            (Queued, Reserved)
            | (Reserved, Connecting)
            | (Connecting, Active)
            // The stream dropped before it played: the slot is held for the grace period,
            // as for a player who lost an established stream.
            | (Connecting | Active, Reconnecting)
            | (Reconnecting, Active) => true,
            (Queued, Ended(reason)) => reason.applies_to_queued(),
            (Reserved | Connecting | Active | Reconnecting, Ended(_)) => true,
            _ => false,
        }
    }

    /// `next` if the lifecycle allows it, else an error naming both states.
    pub fn transition(self, next: SessionState) -> Result<SessionState, TransitionError> {
        if self.allows(next) {
            Ok(next)
        } else {
            Err(TransitionError {
                kind: "session",
                from: self.to_string(),
                to: next.to_string(),
            })
        }
    }

    /// Whether the session is over.
    pub fn is_ended(self) -> bool {
        matches!(self, Self::Ended(_))
    }

    /// Whether the session holds a slot on a GPU.
    pub fn holds_slot(self) -> bool {
        matches!(
            self,
            Self::Reserved | Self::Connecting | Self::Active | Self::Reconnecting
        )
    }
}

impl fmt::Display for SessionState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Queued => f.write_str("queued"),
            Self::Reserved => f.write_str("reserved"),
            Self::Connecting => f.write_str("connecting"),
            Self::Active => f.write_str("active"),
            Self::Reconnecting => f.write_str("reconnecting"),
            Self::Ended(reason) => write!(f, "ended({reason})"),
        }
    }
}

/// Where a node is in its life, as the broker sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "kebab-case")]
pub enum NodeState {
    /// Takes new sessions.
    Ready,
    /// Takes no new sessions; running ones go on.
    Cordoned,
    /// Takes no new sessions; running ones end with `drained` at the deadline.
    Draining {
        /// When the remaining sessions are ended.
        deadline: Timestamp,
    },
    /// Its agent is gone; its sessions end with `node-lost` after the grace period.
    Down,
}

impl NodeState {
    /// Whether a node in this state may move to `next`.
    pub fn allows(self, next: NodeState) -> bool {
        use NodeState::*;
        match (self, next) {
            (Ready, Cordoned) | (Cordoned, Ready) => true,
            (Ready | Cordoned, Draining { .. }) => true,
            // A drain may be cancelled (uncordon), or finish and leave the node cordoned;
            // a new deadline replaces the old one.
            (Draining { .. }, Ready | Cordoned | Draining { .. }) => true,
            (Ready | Cordoned | Draining { .. }, Down) => true,
            // The agent reconnected; an operator's cordon survives the outage.
            (Down, Ready | Cordoned) => true,
            _ => false,
        }
    }

    /// `next` if the lifecycle allows it, else an error naming both states.
    pub fn transition(self, next: NodeState) -> Result<NodeState, TransitionError> {
        if self.allows(next) {
            Ok(next)
        } else {
            Err(TransitionError {
                kind: "node",
                from: self.to_string(),
                to: next.to_string(),
            })
        }
    }

    /// Whether the placer may put new sessions on the node.
    pub fn accepts_sessions(self) -> bool {
        self == Self::Ready
    }
}

impl fmt::Display for NodeState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Ready => f.write_str("ready"),
            Self::Cordoned => f.write_str("cordoned"),
            Self::Draining { deadline } => write!(f, "draining(until {deadline})"),
            Self::Down => f.write_str("down"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_sessions() -> Vec<SessionState> {
        use SessionState::*;
        let mut v = vec![Queued, Reserved, Connecting, Active, Reconnecting];
        v.extend(EndReason::ALL.map(Ended));
        v
    }

    /// The whole table, written out, so a change to the rules shows here.
    #[test]
    fn session_transition_table() {
        use SessionState::*;
        let allowed_live = [
            (Queued, Reserved),
            (Reserved, Connecting),
            (Connecting, Active),
            (Connecting, Reconnecting),
            (Active, Reconnecting),
            (Reconnecting, Active),
        ];
        for from in all_sessions() {
            for to in all_sessions() {
                let expected = match (from, to) {
                    (Ended(_), _) => false,
                    (Queued, Ended(r)) => {
                        matches!(
                            r,
                            EndReason::Released | EndReason::Expired | EndReason::Error
                        )
                    }
                    (_, Ended(_)) => true,
                    pair => allowed_live.contains(&pair),
                };
                assert_eq!(from.allows(to), expected, "{from} -> {to}");
            }
        }
    }

    #[test]
    fn ended_is_final_and_errors_name_both_states() {
        let ended = SessionState::Ended(EndReason::Released);
        let err = ended.transition(SessionState::Active).unwrap_err();
        assert_eq!(
            err.to_string(),
            "a session cannot go from ended(released) to active"
        );
        assert!(ended.is_ended());
        let err = SessionState::Queued.transition(SessionState::Ended(EndReason::NodeLost));
        assert!(err.is_err(), "a queued session holds no node to lose");
    }

    #[test]
    fn a_session_can_reconnect_many_times() {
        let mut s = SessionState::Queued;
        for next in [
            SessionState::Reserved,
            SessionState::Connecting,
            SessionState::Active,
            SessionState::Reconnecting,
            SessionState::Active,
            SessionState::Reconnecting,
            SessionState::Active,
            SessionState::Ended(EndReason::Idle),
        ] {
            s = s.transition(next).unwrap();
        }
        assert_eq!(s, SessionState::Ended(EndReason::Idle));
    }

    #[test]
    fn slot_holding_states() {
        let holding: Vec<SessionState> = all_sessions()
            .into_iter()
            .filter(|s| s.holds_slot())
            .collect();
        assert_eq!(
            holding,
            [
                SessionState::Reserved,
                SessionState::Connecting,
                SessionState::Active,
                SessionState::Reconnecting
            ]
        );
    }

    #[test]
    fn node_transition_table() {
        use NodeState::*;
        let d = Draining {
            deadline: Timestamp::from_millis(10),
        };
        let d2 = Draining {
            deadline: Timestamp::from_millis(20),
        };
        let states = [Ready, Cordoned, d, Down];
        let allowed = [
            (Ready, Cordoned),
            (Ready, d),
            (Ready, Down),
            (Cordoned, Ready),
            (Cordoned, d),
            (Cordoned, Down),
            (d, Ready),
            (d, Cordoned),
            (d, d),
            (d, Down),
            (Down, Ready),
            (Down, Cordoned),
        ];
        for from in states {
            for to in states {
                assert_eq!(
                    from.allows(to),
                    allowed.contains(&(from, to)),
                    "{from} -> {to}"
                );
            }
        }
        assert!(d.allows(d2), "a new deadline replaces the old one");
        assert!(
            Down.transition(d).is_err(),
            "a node that is down cannot drain"
        );
        assert!(Ready.accepts_sessions() && !Cordoned.accepts_sessions() && !d.accepts_sessions());
    }

    #[test]
    fn states_serialize_with_their_reason() {
        let v = toml::Value::try_from(SessionState::Ended(EndReason::NodeLost)).unwrap();
        assert_eq!(v.get("state").and_then(|s| s.as_str()), Some("ended"));
        assert_eq!(v.get("reason").and_then(|s| s.as_str()), Some("node-lost"));
    }
}
