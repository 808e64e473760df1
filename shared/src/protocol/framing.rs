//! Length-prefixed framing of CBOR messages, sans IO.
//!
//! A frame is a 4-byte big-endian length `n` followed by `n` bytes holding one CBOR-encoded
//! [`Message`]. The decoder reads the length first and refuses a frame larger than its limit
//! before it allocates anything for it, so a peer cannot make it reserve memory it did not
//! agree to; then it buffers exactly `n` bytes, never more. Inside a frame, decoding allocates
//! only for what the bytes hold (see [`decode_message`]).

use bytes::Bytes;

use super::messages::Message;

/// Bytes in a frame header.
pub const HEADER_LEN: usize = 4;

/// The default largest frame body, 1 MiB: a `Hello` from a node with 16 GPUs and a few
/// hundred sessions is tens of kilobytes.
pub const DEFAULT_MAX_FRAME: u32 = 1 << 20;

/// A frame or message that cannot be encoded or decoded. Any of these ends the connection
/// with a protocol error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The frame's length is larger than the limit.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// The length the header announced, or the encoded length.
        len: u64,
        /// The limit.
        max: u32,
    },
    /// A zero-length frame, which no message encodes to.
    #[error("empty frame")]
    Empty,
    /// The decoder failed earlier and cannot resynchronise.
    #[error("the frame decoder failed earlier; the connection must be closed")]
    Poisoned,
    /// The frame body is not a valid message.
    #[error("malformed message: {0}")]
    Malformed(String),
    /// The message could not be encoded.
    #[error("cannot encode message: {0}")]
    Encode(String),
}

/// Encodes `message` as one frame, refusing it if the body would exceed `max_frame` bytes.
pub fn encode_frame(message: &Message, max_frame: u32) -> Result<Bytes, FrameError> {
    let mut out = vec![0u8; HEADER_LEN];
    ciborium::into_writer(message, &mut out).map_err(|e| FrameError::Encode(e.to_string()))?;
    let len = out.len() - HEADER_LEN;
    let len32 =
        u32::try_from(len)
            .ok()
            .filter(|l| *l <= max_frame)
            .ok_or(FrameError::TooLarge {
                len: len as u64,
                max: max_frame,
            })?;
    if let Some(header) = out.get_mut(..HEADER_LEN) {
        header.copy_from_slice(&len32.to_be_bytes());
    }
    Ok(Bytes::from(out))
}

/// Decodes one message from a frame body (without its header).
///
/// The body is first parsed into a generic CBOR value, which allocates only for items that
/// are actually present: a declared length is never used to reserve memory up front (serde's
/// typed decoders would reserve up to 1 MiB per collection on a peer's word). The value is
/// then mapped onto the message types.
pub fn decode_message(body: &[u8]) -> Result<Message, FrameError> {
    let mut reader = body;
    let value: ciborium::Value =
        ciborium::from_reader(&mut reader).map_err(|e| FrameError::Malformed(e.to_string()))?;
    if !reader.is_empty() {
        return Err(FrameError::Malformed(format!(
            "{} bytes after the message",
            reader.len()
        )));
    }
    value
        .deserialized()
        .map_err(|e| FrameError::Malformed(e.to_string()))
}

/// Checks a frame header and returns the body length it announces.
pub fn parse_header(header: [u8; HEADER_LEN], max_frame: u32) -> Result<usize, FrameError> {
    let len = u32::from_be_bytes(header);
    if len == 0 {
        return Err(FrameError::Empty);
    }
    if len > max_frame {
        return Err(FrameError::TooLarge {
            len: u64::from(len),
            max: max_frame,
        });
    }
    usize::try_from(len).map_err(|_| FrameError::TooLarge {
        len: u64::from(len),
        max: max_frame,
    })
}

/// Splits a byte stream into frame bodies.
///
/// Feed it whatever the transport delivered, in any chunking, with
/// [`FrameDecoder::decode`]; it holds at most one frame's bytes at a time.
#[derive(Debug)]
pub struct FrameDecoder {
    max_frame: u32,
    state: DecodeState,
}

#[derive(Debug)]
enum DecodeState {
    Header { buf: [u8; HEADER_LEN], have: usize },
    Body { buf: Vec<u8>, len: usize },
    Failed,
}

impl FrameDecoder {
    /// A decoder that refuses frames longer than `max_frame` bytes.
    pub fn new(max_frame: u32) -> Self {
        Self {
            max_frame,
            state: DecodeState::Header {
                buf: [0; HEADER_LEN],
                have: 0,
            },
        }
    }

    /// Consumes bytes from the front of `input` up to the end of the next frame and returns
    /// that frame's body, or `None` when `input` ran out first (the bytes are kept for the
    /// next call). Call it again while `input` is not empty. After an error the decoder
    /// refuses all further input.
    pub fn decode(&mut self, input: &mut &[u8]) -> Result<Option<Bytes>, FrameError> {
        loop {
            match &mut self.state {
                DecodeState::Failed => return Err(FrameError::Poisoned),
                DecodeState::Header { buf, have } => {
                    let take = (HEADER_LEN - *have).min(input.len());
                    let (head, rest) = input.split_at(take);
                    if let Some(dst) = buf.get_mut(*have..*have + take) {
                        dst.copy_from_slice(head);
                    }
                    *have += take;
                    *input = rest;
                    if *have < HEADER_LEN {
                        return Ok(None);
                    }
                    match parse_header(*buf, self.max_frame) {
                        Ok(len) => {
                            self.state = DecodeState::Body {
                                buf: Vec::with_capacity(len),
                                len,
                            };
                        }
                        Err(e) => {
                            self.state = DecodeState::Failed;
                            return Err(e);
                        }
                    }
                }
                DecodeState::Body { buf, len } => {
                    let take = (*len - buf.len()).min(input.len());
                    let (head, rest) = input.split_at(take);
                    buf.extend_from_slice(head);
                    *input = rest;
                    if buf.len() < *len {
                        return Ok(None);
                    }
                    let body = std::mem::take(buf);
                    self.state = DecodeState::Header {
                        buf: [0; HEADER_LEN],
                        have: 0,
                    };
                    return Ok(Some(Bytes::from(body)));
                }
            }
        }
    }

    /// Like [`FrameDecoder::decode`], then decodes the frame's message.
    pub fn decode_message(&mut self, input: &mut &[u8]) -> Result<Option<Message>, FrameError> {
        match self.decode(input)? {
            Some(body) => decode_message(&body).map(Some).inspect_err(|_| {
                self.state = DecodeState::Failed;
            }),
            None => Ok(None),
        }
    }

    /// Whether the decoder is between frames (no partial frame buffered).
    pub fn is_idle(&self) -> bool {
        matches!(self.state, DecodeState::Header { have: 0, .. })
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::protocol::messages::{Drain, Goodbye, GoodbyeReason};
    use crate::time::Timestamp;

    fn drain() -> Message {
        Message::Drain(Drain {
            deadline: Timestamp::from_millis(42),
        })
    }

    #[test]
    fn a_frame_round_trips_byte_by_byte() {
        let frame = encode_frame(&drain(), DEFAULT_MAX_FRAME).unwrap();
        let mut dec = FrameDecoder::new(DEFAULT_MAX_FRAME);
        let mut got = None;
        for (i, b) in frame.iter().enumerate() {
            let mut input: &[u8] = std::slice::from_ref(b);
            got = dec.decode_message(&mut input).unwrap();
            assert!(input.is_empty());
            assert_eq!(got.is_some(), i == frame.len() - 1);
        }
        assert_eq!(got, Some(drain()));
        assert!(dec.is_idle());
    }

    #[test]
    fn several_frames_in_one_chunk_come_out_one_at_a_time() {
        let bye = Message::Goodbye(Goodbye {
            reason: GoodbyeReason::Shutdown,
            message: "".into(),
        });
        let mut stream = encode_frame(&drain(), 1024).unwrap().to_vec();
        stream.extend_from_slice(&encode_frame(&bye, 1024).unwrap());
        let mut dec = FrameDecoder::new(1024);
        let mut input = stream.as_slice();
        assert_eq!(dec.decode_message(&mut input).unwrap(), Some(drain()));
        assert!(!input.is_empty());
        assert_eq!(dec.decode_message(&mut input).unwrap(), Some(bye));
        assert!(input.is_empty());
    }

    #[test]
    fn oversized_header_is_refused_before_the_body_arrives() {
        let mut dec = FrameDecoder::new(16);
        let mut input: &[u8] = &17u32.to_be_bytes();
        assert_eq!(
            dec.decode(&mut input),
            Err(FrameError::TooLarge { len: 17, max: 16 })
        );
        let mut more: &[u8] = &[0];
        assert_eq!(dec.decode(&mut more), Err(FrameError::Poisoned));
        let mut huge: &[u8] = &u32::MAX.to_be_bytes();
        assert!(matches!(
            FrameDecoder::new(16).decode(&mut huge),
            Err(FrameError::TooLarge { .. })
        ));
    }

    #[test]
    fn empty_frames_and_trailing_bytes_are_malformed() {
        let mut input: &[u8] = &[0, 0, 0, 0];
        assert_eq!(
            FrameDecoder::new(16).decode(&mut input),
            Err(FrameError::Empty)
        );
        let mut body = encode_frame(&drain(), 1024).unwrap()[HEADER_LEN..].to_vec();
        body.push(0);
        assert!(
            matches!(decode_message(&body), Err(FrameError::Malformed(m)) if m.contains("after"))
        );
    }

    #[test]
    fn encoder_refuses_a_message_over_the_limit() {
        let bye = Message::Goodbye(Goodbye {
            reason: GoodbyeReason::Shutdown,
            message: "x".repeat(100),
        });
        assert!(matches!(
            encode_frame(&bye, 64),
            Err(FrameError::TooLarge { max: 64, .. })
        ));
    }

    fn decode_chunked(
        stream: &[u8],
        chunks: &[usize],
        max: u32,
    ) -> Result<Vec<Message>, FrameError> {
        let mut dec = FrameDecoder::new(max);
        let mut out = Vec::new();
        let mut rest = stream;
        let mut sizes = chunks.iter().cycle();
        while !rest.is_empty() {
            let n = (*sizes.next().unwrap_or(&1)).clamp(1, rest.len());
            let (mut chunk, tail) = rest.split_at(n);
            rest = tail;
            while !chunk.is_empty() {
                if let Some(m) = dec.decode_message(&mut chunk)? {
                    out.push(m);
                }
            }
        }
        Ok(out)
    }

    proptest! {
        /// Every message survives encode → any chunking → decode.
        #[test]
        fn every_message_round_trips(
            messages in proptest::collection::vec(any::<Message>(), 1..4),
            chunks in proptest::collection::vec(1usize..64, 1..8),
        ) {
            let mut stream = Vec::new();
            for m in &messages {
                stream.extend_from_slice(&encode_frame(m, DEFAULT_MAX_FRAME).unwrap());
            }
            prop_assert_eq!(decode_chunked(&stream, &chunks, DEFAULT_MAX_FRAME)?, messages);
        }

        /// Arbitrary bytes are an error or a message, never a panic.
        #[test]
        fn arbitrary_bytes_never_panic(
            bytes in proptest::collection::vec(any::<u8>(), 0..2048),
            chunks in proptest::collection::vec(1usize..512, 1..4),
        ) {
            let _ = decode_chunked(&bytes, &chunks, 4096);
            let _ = decode_message(&bytes);
        }

        /// A valid frame with bytes flipped is an error or a message, never a panic.
        #[test]
        fn corrupted_frames_never_panic(
            message in any::<Message>(),
            flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        ) {
            let mut frame = encode_frame(&message, DEFAULT_MAX_FRAME).unwrap().to_vec();
            for (at, byte) in flips {
                let i = at.index(frame.len());
                frame[i] ^= byte;
            }
            let _ = decode_chunked(&frame, &[7], DEFAULT_MAX_FRAME);
        }
    }
}
