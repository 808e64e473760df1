//! The messages agents and brokers exchange.
//!
//! Compatibility rules (see `docs/PROTOCOL.md`): messages are CBOR maps with named fields, so
//! a receiver skips fields it does not know; every field added after version 1 is an
//! `Option` or has `#[serde(default)]`, so an older sender's messages still decode; a message
//! type a receiver does not know decodes as [`Message::Unknown`], which it ignores.

use serde::{Deserialize, Serialize};

use crate::gpu::{GpuMode, GpuSpec};
use crate::ids::{GameId, GenreName, GpuId, NodeId, RegionName, SessionId, TierName};
use crate::state::{EndReason, SessionState};
use crate::time::Timestamp;
use crate::units::{ComputeShare, EncoderUnits, Megabytes};

/// Every message on the agent↔broker link, tagged by `type` on the wire.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub enum Message {
    /// Agent → broker, first on every connection.
    Hello(Hello),
    /// Broker → agent: the hello was accepted.
    Welcome(Welcome),
    /// Agent → broker, every heartbeat interval.
    Heartbeat(Heartbeat),
    /// Broker → agent: the profile each GPU should hold and the warm instances to keep.
    PoolPlan(PoolPlan),
    /// Broker → agent: hold a slot for a session.
    Reserve(Reserve),
    /// Agent → broker: the slot is held.
    Reserved(Reserved),
    /// Agent → broker: the reservation could not be made.
    Rejected(Rejected),
    /// Broker → agent: end a session and free its slot.
    Release(Release),
    /// Agent → broker: a session changed state on the node.
    SessionUpdate(SessionUpdate),
    /// Broker → agent: take no new sessions; end the running ones at the deadline.
    Drain(Drain),
    /// Broker → agent: an operator cancelled the drain; take sessions again.
    Resume(Resume),
    /// Either side, last on a connection: why it is closing.
    Goodbye(Goodbye),
    /// A message type this build does not know, from a newer peer; receivers ignore it.
    #[serde(other)]
    Unknown,
}

impl Message {
    /// The message's type name as it appears on the wire, for logs and errors.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Hello(_) => "hello",
            Self::Welcome(_) => "welcome",
            Self::Heartbeat(_) => "heartbeat",
            Self::PoolPlan(_) => "pool-plan",
            Self::Reserve(_) => "reserve",
            Self::Reserved(_) => "reserved",
            Self::Rejected(_) => "rejected",
            Self::Release(_) => "release",
            Self::SessionUpdate(_) => "session-update",
            Self::Drain(_) => "drain",
            Self::Resume(_) => "resume",
            Self::Goodbye(_) => "goodbye",
            Self::Unknown => "unknown",
        }
    }
}

/// Agent → broker, first on every connection: who the node is, what it has and what runs on it.
///
/// The agent is the source of truth for what runs on its node, so a broker that restarted
/// rebuilds its view from these.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct Hello {
    /// The protocol version the agent speaks; see [`super::handshake`].
    pub protocol_version: u32,
    /// The agent's build, e.g. `0.1.0`, for logs.
    pub agent_version: String,
    /// The node.
    pub node_id: NodeId,
    /// The region the node serves.
    pub region: RegionName,
    /// Increases every time the agent starts; the broker ignores messages from an older
    /// generation of the same node and fences such a connection.
    pub generation: u64,
    /// The node's GPUs.
    #[cfg_attr(test, proptest(strategy = "crate::test_support::small_vec()"))]
    pub gpus: Vec<GpuInventory>,
    /// Sessions running on the node now.
    #[cfg_attr(test, proptest(strategy = "crate::test_support::small_vec()"))]
    pub sessions: Vec<RunningSession>,
    /// Idle warm game instances, ready for a session of their game and tier.
    #[serde(default)]
    #[cfg_attr(test, proptest(strategy = "crate::test_support::small_vec()"))]
    pub warm: Vec<WarmInstance>,
    /// Host CPU available to game instances, in thousandths of a core, where known.
    #[serde(default)]
    pub cpu_millicores: Option<u32>,
    /// The base URL of the node's WHEP endpoint players connect to
    /// (`https://gpu-host-01.example.net:8443`); the broker appends the session's path.
    #[serde(default)]
    pub whep_url: Option<String>,
    /// The deadline of the drain the agent is under (it refuses new sessions), from a `drain`
    /// no `resume` has cancelled since the agent started; `None` when it is not draining, and
    /// from an agent too old to say. The broker takes it as observed state: a node it holds no
    /// decision about is put into draining, so placements stop going where they are refused.
    #[serde(default)]
    pub draining: Option<Timestamp>,
}

/// An idle game instance kept warm in a vGPU slot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct WarmInstance {
    /// Its GPU.
    pub gpu: GpuId,
    /// Its slot on that GPU.
    pub slot: u32,
    /// The game it runs.
    pub game: GameId,
    /// The tier it was started for.
    pub tier: TierName,
}

/// One GPU as an agent reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct GpuInventory {
    /// The GPU.
    pub gpu: GpuId,
    /// What the GPU is and can do.
    pub spec: GpuSpec,
    /// The sharing mode it is in now.
    pub mode: GpuMode,
    /// The vGPU or MIG profile it holds now, if any.
    pub profile: Option<String>,
    /// Framebuffer not allocated to any vGPU or process.
    pub free_framebuffer: Megabytes,
    /// Encoder throughput not leased to a stream.
    pub free_encoder: EncoderUnits,
    /// vGPUs created on it, in use or not.
    pub vgpus: u16,
}

/// A session an agent has on its node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct RunningSession {
    /// The session.
    pub session_id: SessionId,
    /// Its GPU.
    pub gpu: GpuId,
    /// Its slot on that GPU.
    pub slot: u32,
    /// Its game.
    pub game: GameId,
    /// Its tier.
    pub tier: TierName,
    /// Its genre, so a broker that restarted can weigh it as a neighbour again.
    #[serde(default)]
    pub genre: Option<GenreName>,
    /// Its state on the node.
    pub state: SessionState,
    /// When the state began.
    pub since: Timestamp,
}

/// Broker → agent: the hello was accepted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct Welcome {
    /// The protocol version both sides will speak.
    pub protocol_version: u32,
    /// The broker's build, for logs.
    pub broker_version: String,
    /// The region the broker serves.
    pub region: RegionName,
    /// The generation the broker accepted; echoed so the agent can tell a stale welcome.
    pub generation: u64,
    /// How often the agent must send a heartbeat, in milliseconds.
    pub heartbeat_interval_ms: u32,
    /// The broker's Ed25519 public key (32 bytes), with which the agent verifies session
    /// tokens offline.
    #[serde(with = "serde_bytes_compat")]
    pub token_public_key: Vec<u8>,
    /// The broker's quality tiers, so agents launch and check sessions of tiers configured
    /// only on the broker. Empty from older brokers: the agent keeps its built-in tiers.
    #[serde(default)]
    #[cfg_attr(test, proptest(value = "Vec::new()"))]
    pub tiers: Vec<crate::tier::TierPreset>,
}

/// Agent → broker, every heartbeat interval: liveness and what changed on the node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct Heartbeat {
    /// The agent's generation.
    pub generation: u64,
    /// Increases by one per heartbeat within a generation.
    pub seq: u64,
    /// The agent's clock when it sent this.
    pub sent_at: Timestamp,
    /// Current free capacity per GPU.
    #[cfg_attr(test, proptest(strategy = "crate::test_support::small_vec()"))]
    pub gpus: Vec<GpuUsage>,
    /// The node's idle warm instances now, the whole set (warm instances start and stop
    /// between hellos). Absent from agents that keep no warm instances.
    #[serde(default)]
    #[cfg_attr(
        test,
        proptest(strategy = "proptest::option::of(crate::test_support::small_vec())")
    )]
    pub warm: Option<Vec<WarmInstance>>,
    /// The newest pool plan the agent has applied (all of it or in part; `gpus` shows what
    /// was built).
    #[serde(default)]
    pub plan_generation: Option<u64>,
    /// When each playing session last got input from its player, for the broker's idle
    /// timeout (sessions with no input since the last heartbeat may be left out).
    #[serde(default)]
    #[cfg_attr(test, proptest(strategy = "crate::test_support::small_vec()"))]
    pub inputs: Vec<SessionInput>,
}

/// A session's latest player input.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct SessionInput {
    /// The session.
    pub session_id: SessionId,
    /// When its player's last input arrived.
    pub at: Timestamp,
}

/// Free capacity of one GPU at a heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct GpuUsage {
    /// The GPU.
    pub gpu: GpuId,
    /// Framebuffer not allocated.
    pub free_framebuffer: Megabytes,
    /// Encoder throughput not leased.
    pub free_encoder: EncoderUnits,
    /// Encoder utilisation NVML reports, in percent, where known.
    pub encoder_utilization_pct: Option<u8>,
    /// GPU utilisation NVML reports, in percent, where known.
    pub gpu_utilization_pct: Option<u8>,
    /// vGPUs that exist on the GPU now: how far pre-allocation has come.
    #[serde(default)]
    pub vgpus: Option<u16>,
    /// The profile those vGPUs use (equal-size), if any.
    #[serde(default)]
    pub profile: Option<String>,
}

/// Broker → agent: how each GPU should be sliced and which warm instances to keep.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct PoolPlan {
    /// Increases with every plan the broker sends; an agent applies only the newest.
    pub plan_generation: u64,
    /// One entry per GPU of the node.
    #[cfg_attr(test, proptest(strategy = "crate::test_support::small_vec()"))]
    pub gpus: Vec<GpuPlan>,
}

/// The target for one GPU.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct GpuPlan {
    /// The GPU.
    pub gpu: GpuId,
    /// The mode it should be in.
    pub mode: GpuMode,
    /// The profile it should hold (equal-size and MIG), if any.
    pub profile: Option<String>,
    /// vGPUs to create ahead of demand.
    pub vgpus: u16,
    /// Warm game instances to keep.
    #[cfg_attr(test, proptest(strategy = "crate::test_support::small_vec()"))]
    pub warm: Vec<WarmTarget>,
}

/// Keep `count` warm instances of a game at a tier.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct WarmTarget {
    /// The game.
    pub game: GameId,
    /// The tier.
    pub tier: TierName,
    /// How many.
    pub count: u16,
}

/// Broker → agent: hold a slot on a GPU for a session until `expires_at`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct Reserve {
    /// Matches the reply to the request.
    pub request_id: u64,
    /// The session.
    pub session_id: SessionId,
    /// The game.
    pub game: GameId,
    /// The tier.
    pub tier: TierName,
    /// The GPU chosen by the placer.
    pub gpu: GpuId,
    /// The slot on that GPU chosen by the placer.
    pub slot: u32,
    /// Framebuffer the session gets.
    pub framebuffer: Megabytes,
    /// Compute share the session gets.
    pub compute_share: ComputeShare,
    /// Encoder throughput to lease for the stream.
    pub encoder: EncoderUnits,
    /// When the reservation lapses if the player has not connected.
    pub expires_at: Timestamp,
}

/// Agent → broker: the reservation is held.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct Reserved {
    /// The request this answers.
    pub request_id: u64,
    /// The session.
    pub session_id: SessionId,
    /// Whether a warm instance was assigned (no launch delay).
    pub warm: bool,
}

/// Why an agent could not make a reservation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub enum RejectReason {
    /// The slot is already taken or the GPU has no room (the broker's view was stale).
    NoCapacity,
    /// No free encoder units or sessions on the GPU.
    EncoderBusy,
    /// The node is draining or shutting down.
    Draining,
    /// The GPU named is not on this node.
    UnknownGpu,
    /// The game is not in the node's catalogue.
    UnknownGame,
    /// The message came from a stale broker view (older plan or generation).
    Stale,
    /// Anything else; see `detail`.
    #[serde(other)]
    Other,
}

/// Agent → broker: the reservation was not made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct Rejected {
    /// The request this answers.
    pub request_id: u64,
    /// The session.
    pub session_id: SessionId,
    /// Why.
    pub reason: RejectReason,
    /// Words for an operator.
    pub detail: String,
}

/// Broker → agent: end a session and free its slot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct Release {
    /// The session.
    pub session_id: SessionId,
    /// Why it ends.
    pub reason: EndReason,
}

/// Agent → broker: a session changed state on the node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct SessionUpdate {
    /// The agent's generation.
    pub generation: u64,
    /// The session.
    pub session_id: SessionId,
    /// Its new state.
    pub state: SessionState,
    /// When it changed, on the agent's clock.
    pub at: Timestamp,
}

/// Broker → agent: take no new sessions; end running ones with `drained` at `deadline`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct Drain {
    /// When remaining sessions are ended.
    pub deadline: Timestamp,
}

/// Broker → agent: the drain is cancelled (added in protocol version 1 as a new message type;
/// an agent that does not know it stays draining until it restarts).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct Resume {
    /// Why, for the agent's log.
    #[serde(default)]
    pub reason: String,
}

/// Why a side closes the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub enum GoodbyeReason {
    /// The sender is shutting down.
    Shutdown,
    /// The peers speak no common protocol version.
    IncompatibleVersion,
    /// A newer generation of this node is connected; this connection is fenced.
    StaleGeneration,
    /// The peer broke the protocol (bad frame, message out of order).
    ProtocolError,
    /// The peer failed authentication or authorisation.
    Unauthorized,
    /// A reason this build does not know.
    #[serde(other)]
    Other,
}

/// Either side, last on a connection: why it is closing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct Goodbye {
    /// Why.
    pub reason: GoodbyeReason,
    /// Words for an operator, e.g. what to upgrade.
    pub message: String,
}

/// Serialises `Vec<u8>` as a CBOR byte string rather than an array of integers.
mod serde_bytes_compat {
    use serde::{Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(bytes)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a byte string")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                Ok(v.to_vec())
            }
            fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
                Ok(v)
            }
        }
        d.deserialize_byte_buf(Visitor)
    }
}
