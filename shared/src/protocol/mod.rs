//! The agent↔broker protocol: message types, framing and the version handshake.
//!
//! An agent opens one QUIC connection to its broker (mutual TLS) and one bidirectional
//! stream on it; each direction carries frames of [`framing`], each frame one [`Message`].
//! The agent speaks first with [`Hello`]; the broker answers [`Welcome`] or [`Goodbye`]. The
//! full contract is in `docs/PROTOCOL.md`.

pub mod framing;
pub mod handshake;
pub mod messages;
#[cfg(feature = "quic")]
pub mod quic;

pub use framing::{
    DEFAULT_MAX_FRAME, FrameDecoder, FrameError, HEADER_LEN, decode_message, encode_frame,
};
pub use handshake::{MIN_SUPPORTED_VERSION, PROTOCOL_VERSION, VersionError, negotiate};
pub use messages::*;

#[cfg(test)]
mod compat_tests;
