//! Protocol frames over QUIC streams (feature `quic`): the async shell around the sans-IO
//! framing, shared by the agent's link and the broker's control plane.
//!
//! [`read_message`] is not cancel-safe (a cancelled read loses a partial frame): give the
//! receive side to one task that only reads.

use super::framing::parse_header;
use super::{FrameError, HEADER_LEN, Message, decode_message, encode_frame};

/// Why a frame could not be sent or received.
#[derive(Debug, thiserror::Error)]
pub enum FrameIoError {
    /// The frame or message was invalid.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The stream failed.
    #[error("stream: {0}")]
    Stream(String),
}

/// Writes one message as a frame.
pub async fn write_message(
    send: &mut quinn::SendStream,
    message: &Message,
    max_frame: u32,
) -> Result<(), FrameIoError> {
    let frame = encode_frame(message, max_frame)?;
    send.write_all(&frame)
        .await
        .map_err(|e| FrameIoError::Stream(e.to_string()))
}

/// Reads one message; `None` when the peer finished the stream cleanly between frames.
/// The header is checked against `max_frame` before the body is read.
pub async fn read_message(
    recv: &mut quinn::RecvStream,
    max_frame: u32,
) -> Result<Option<Message>, FrameIoError> {
    let mut header = [0u8; HEADER_LEN];
    match recv.read_exact(&mut header).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(e) => return Err(FrameIoError::Stream(e.to_string())),
    }
    let len = parse_header(header, max_frame)?;
    let mut body = vec![0u8; len];
    recv.read_exact(&mut body)
        .await
        .map_err(|e| FrameIoError::Stream(e.to_string()))?;
    Ok(Some(decode_message(&body)?))
}
