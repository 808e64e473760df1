//! Framecast's shared vocabulary: the domain model, the configuration schema and the
//! agent↔broker protocol.
//!
//! Framecast is a session broker for cloud gaming on shared GPUs. The broker
//! (`framecast-broker`) places player sessions on vGPU slices of GPU hosts; a node agent
//! (`framecast-agent`) on each host keeps the vGPU pool and streams games to players over
//! WebRTC; `framecast-loadtest` proves capacity before GPUs are bought. This crate holds what
//! they all agree on:
//!
//! - [`ids`] and [`units`]: identifiers and units of capacity as newtypes;
//! - [`tier`], [`genre`] and [`gpu`]: quality tiers, genre profiles, GPU models and their
//!   sharing modes, with a built-in table of real GPUs in [`gpu::models`];
//! - [`state`]: the session and node lifecycles;
//! - [`config`]: `broker.toml` and `agent.toml`;
//! - [`protocol`]: messages, framing and the version handshake between agents and brokers;
//! - [`tls`]: certificates and mutual-TLS configurations for the agent↔broker link;
//! - [`token`]: the Ed25519 session tokens the broker signs and node agents check offline;
//! - `ops` (feature `ops`): the `/metrics`, `/livez` and `/readyz` endpoint both services serve.
//!
//! A message goes on the wire as one length-prefixed frame and comes back out of a
//! [`protocol::FrameDecoder`], however the transport splits the bytes:
//!
//! ```
//! use framecast_shared::protocol::{DEFAULT_MAX_FRAME, Drain, FrameDecoder, Message, encode_frame};
//! use framecast_shared::time::Timestamp;
//!
//! let drain = Message::Drain(Drain { deadline: Timestamp::from_millis(1_700_000_000_000) });
//! let frame = encode_frame(&drain, DEFAULT_MAX_FRAME)?;
//!
//! let mut decoder = FrameDecoder::new(DEFAULT_MAX_FRAME);
//! let (first, second) = frame.split_at(3);
//! assert_eq!(decoder.decode_message(&mut &first[..])?, None);
//! assert_eq!(decoder.decode_message(&mut &second[..])?, Some(drain));
//! # Ok::<(), framecast_shared::protocol::FrameError>(())
//! ```

pub mod config;
pub mod genre;
pub mod gpu;
pub mod ids;
#[cfg(feature = "ops")]
pub mod ops;
#[cfg(feature = "ops")]
pub mod problem;
pub mod protocol;
pub mod state;
pub mod tier;
pub mod time;
pub mod tls;
pub mod token;
pub mod units;

#[cfg(test)]
mod test_support;
