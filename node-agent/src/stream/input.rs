//! The compact binary format of the `input` data channel (docs/PROTOCOL.md, "The input
//! channel"), without I/O: bytes in, [`InputMessage`] out, and back.
//!
//! Every message is one event: a 9-byte header (`kind`, `seq`, `t_ms`, little-endian) and a
//! payload whose length depends on the kind. Bytes after the payload are ignored, so a later
//! client may append fields without breaking this agent.

/// Length of the header every message starts with: kind (1), seq (4), t_ms (4).
pub const HEADER_LEN: usize = 9;

/// The kind bytes of the input channel.
pub mod kind {
    /// A key was pressed.
    pub const KEY_DOWN: u8 = 0x01;
    /// A key was released.
    pub const KEY_UP: u8 = 0x02;
    /// The mouse moved (relative).
    pub const MOUSE_MOVE: u8 = 0x03;
    /// A mouse button was pressed.
    pub const MOUSE_DOWN: u8 = 0x04;
    /// A mouse button was released.
    pub const MOUSE_UP: u8 = 0x05;
    /// The wheel turned.
    pub const WHEEL: u8 = 0x06;
    /// A gamepad button changed.
    pub const PAD_BUTTON: u8 = 0x07;
    /// A gamepad axis changed.
    pub const PAD_AXIS: u8 = 0x08;
    /// The client times the input path.
    pub const PING: u8 = 0x09;
    /// The agent's answer to a ping.
    pub const PONG: u8 = 0x0A;
}

/// USB HID usages (keyboard page 0x07) the synthetic game reacts to.
pub mod hid {
    /// The A key.
    pub const A: u16 = 0x04;
    /// The D key.
    pub const D: u16 = 0x07;
    /// The S key.
    pub const S: u16 = 0x16;
    /// The W key.
    pub const W: u16 = 0x1A;
    /// The space bar.
    pub const SPACE: u16 = 0x2C;
    /// The right arrow.
    pub const RIGHT: u16 = 0x4F;
    /// The left arrow.
    pub const LEFT: u16 = 0x50;
    /// The down arrow.
    pub const DOWN: u16 = 0x51;
    /// The up arrow.
    pub const UP: u16 = 0x52;
}

/// One player event, as the client sent it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum InputEvent {
    /// A key was pressed; `code` is a USB HID usage of page 0x07.
    KeyDown {
        /// The HID usage.
        code: u16,
    },
    /// A key was released.
    KeyUp {
        /// The HID usage.
        code: u16,
    },
    /// The mouse moved, in pixels of the stream.
    MouseMove {
        /// Horizontal movement, right is positive.
        dx: i16,
        /// Vertical movement, down is positive.
        dy: i16,
    },
    /// A mouse button was pressed.
    MouseDown {
        /// 0 left, 1 middle, 2 right.
        button: u8,
    },
    /// A mouse button was released.
    MouseUp {
        /// 0 left, 1 middle, 2 right.
        button: u8,
    },
    /// The wheel turned.
    Wheel {
        /// Horizontal scroll.
        dx: i16,
        /// Vertical scroll.
        dy: i16,
    },
    /// A gamepad button changed.
    PadButton {
        /// Which gamepad.
        pad: u8,
        /// W3C standard gamepad button index.
        button: u8,
        /// Pressure, 0..=255.
        value: u8,
    },
    /// A gamepad axis changed.
    PadAxis {
        /// Which gamepad.
        pad: u8,
        /// W3C standard gamepad axis index.
        axis: u8,
        /// Position, -32767..=32767.
        value: i16,
    },
    /// The client asks for a pong, to time the input path.
    Ping,
    /// The agent's answer to a ping.
    Pong,
}

/// One message of the input channel: the header and its event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct InputMessage {
    /// The client's event counter (starts at 1, +1 per event).
    pub seq: u32,
    /// The client's clock in milliseconds (wraps); echoed back by a pong.
    pub t_ms: u32,
    /// What happened.
    pub event: InputEvent,
}

/// Why bytes from the input channel are not a message. The message is dropped and counted;
/// the stream goes on.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InputError {
    /// The message has no bytes at all.
    #[error("empty input message")]
    Empty,
    /// The first byte is not a known kind.
    #[error("unknown input kind 0x{0:02x}")]
    UnknownKind(u8),
    /// The message is shorter than its kind needs.
    #[error("input message of kind 0x{kind:02x} needs {need} bytes, got {got}")]
    Short {
        /// The kind byte.
        kind: u8,
        /// How many bytes the kind needs (header included).
        need: usize,
        /// How many bytes the message has.
        got: usize,
    },
}

impl InputMessage {
    /// Parses one message. Bytes after the kind's payload are ignored (the format only grows).
    pub fn decode(bytes: &[u8]) -> Result<Self, InputError> {
        let Some(&kind) = bytes.first() else {
            return Err(InputError::Empty);
        };
        let payload_len = payload_len(kind).ok_or(InputError::UnknownKind(kind))?;
        let need = HEADER_LEN + payload_len;
        let short = InputError::Short {
            kind,
            need,
            got: bytes.len(),
        };
        if bytes.len() < need {
            return Err(short);
        }
        // The length check above makes every read succeed; `Reader` still returns `None`
        // rather than panicking, which would surface as the same `Short` error.
        read_message(kind, Reader { bytes, at: 1 }).ok_or(short)
    }

    /// The message's bytes, as a client sends them.
    pub fn encode(&self) -> Vec<u8> {
        let kind = self.event.kind();
        let mut out = Vec::with_capacity(HEADER_LEN + payload_len(kind).unwrap_or(0));
        out.push(kind);
        out.extend_from_slice(&self.seq.to_le_bytes());
        out.extend_from_slice(&self.t_ms.to_le_bytes());
        match self.event {
            InputEvent::KeyDown { code } | InputEvent::KeyUp { code } => {
                out.extend_from_slice(&code.to_le_bytes());
            }
            InputEvent::MouseMove { dx, dy } | InputEvent::Wheel { dx, dy } => {
                out.extend_from_slice(&dx.to_le_bytes());
                out.extend_from_slice(&dy.to_le_bytes());
            }
            InputEvent::MouseDown { button } | InputEvent::MouseUp { button } => out.push(button),
            InputEvent::PadButton { pad, button, value } => {
                out.extend_from_slice(&[pad, button, value]);
            }
            InputEvent::PadAxis { pad, axis, value } => {
                out.extend_from_slice(&[pad, axis]);
                out.extend_from_slice(&value.to_le_bytes());
            }
            InputEvent::Ping | InputEvent::Pong => {}
        }
        out
    }

    /// The reply a ping gets (kind 0x0A, seq and t_ms echoed), None for other events.
    pub fn pong(&self) -> Option<[u8; 9]> {
        if self.event != InputEvent::Ping {
            return None;
        }
        let [s0, s1, s2, s3] = self.seq.to_le_bytes();
        let [t0, t1, t2, t3] = self.t_ms.to_le_bytes();
        Some([kind::PONG, s0, s1, s2, s3, t0, t1, t2, t3])
    }

    /// Whether the event counts as player activity (everything but ping/pong).
    pub fn is_activity(&self) -> bool {
        !matches!(self.event, InputEvent::Ping | InputEvent::Pong)
    }
}

impl InputEvent {
    /// The kind byte that introduces this event on the wire.
    pub fn kind(&self) -> u8 {
        match self {
            InputEvent::KeyDown { .. } => kind::KEY_DOWN,
            InputEvent::KeyUp { .. } => kind::KEY_UP,
            InputEvent::MouseMove { .. } => kind::MOUSE_MOVE,
            InputEvent::MouseDown { .. } => kind::MOUSE_DOWN,
            InputEvent::MouseUp { .. } => kind::MOUSE_UP,
            InputEvent::Wheel { .. } => kind::WHEEL,
            InputEvent::PadButton { .. } => kind::PAD_BUTTON,
            InputEvent::PadAxis { .. } => kind::PAD_AXIS,
            InputEvent::Ping => kind::PING,
            InputEvent::Pong => kind::PONG,
        }
    }

    /// The event's name as docs/PROTOCOL.md writes it ("key-down", ...), for metric labels.
    pub fn name(&self) -> &'static str {
        match self {
            InputEvent::KeyDown { .. } => "key-down",
            InputEvent::KeyUp { .. } => "key-up",
            InputEvent::MouseMove { .. } => "mouse-move",
            InputEvent::MouseDown { .. } => "mouse-down",
            InputEvent::MouseUp { .. } => "mouse-up",
            InputEvent::Wheel { .. } => "wheel",
            InputEvent::PadButton { .. } => "pad-button",
            InputEvent::PadAxis { .. } => "pad-axis",
            InputEvent::Ping => "ping",
            InputEvent::Pong => "pong",
        }
    }
}

/// The payload length of a kind, None for an unknown kind.
fn payload_len(kind: u8) -> Option<usize> {
    match kind {
        kind::KEY_DOWN | kind::KEY_UP => Some(2),
        kind::MOUSE_MOVE | kind::WHEEL => Some(4),
        kind::MOUSE_DOWN | kind::MOUSE_UP => Some(1),
        kind::PAD_BUTTON => Some(3),
        kind::PAD_AXIS => Some(4),
        kind::PING | kind::PONG => Some(0),
        _ => None,
    }
}

/// Reads the header fields and the payload of a message whose kind byte is already read.
fn read_message(kind: u8, mut r: Reader<'_>) -> Option<InputMessage> {
    let seq = r.u32()?;
    let t_ms = r.u32()?;
    let event = match kind {
        kind::KEY_DOWN => InputEvent::KeyDown { code: r.u16()? },
        kind::KEY_UP => InputEvent::KeyUp { code: r.u16()? },
        kind::MOUSE_MOVE => InputEvent::MouseMove {
            dx: r.i16()?,
            dy: r.i16()?,
        },
        kind::MOUSE_DOWN => InputEvent::MouseDown { button: r.u8()? },
        kind::MOUSE_UP => InputEvent::MouseUp { button: r.u8()? },
        kind::WHEEL => InputEvent::Wheel {
            dx: r.i16()?,
            dy: r.i16()?,
        },
        kind::PAD_BUTTON => InputEvent::PadButton {
            pad: r.u8()?,
            button: r.u8()?,
            value: r.u8()?,
        },
        kind::PAD_AXIS => InputEvent::PadAxis {
            pad: r.u8()?,
            axis: r.u8()?,
            value: r.i16()?,
        },
        kind::PING => InputEvent::Ping,
        kind::PONG => InputEvent::Pong,
        _ => return None,
    };
    Some(InputMessage { seq, t_ms, event })
}

/// Little-endian reads that return `None` past the end instead of panicking.
struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> Option<[u8; N]> {
        let end = self.at.checked_add(N)?;
        let arr = self.bytes.get(self.at..end)?.try_into().ok()?;
        self.at = end;
        Some(arr)
    }

    fn u8(&mut self) -> Option<u8> {
        self.take::<1>().map(|[b]| b)
    }

    fn u16(&mut self) -> Option<u16> {
        self.take().map(u16::from_le_bytes)
    }

    fn i16(&mut self) -> Option<i16> {
        self.take().map(i16::from_le_bytes)
    }

    fn u32(&mut self) -> Option<u32> {
        self.take().map(u32::from_le_bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn every_kind() -> Vec<InputEvent> {
        vec![
            InputEvent::KeyDown { code: hid::A },
            InputEvent::KeyUp { code: 0xBEEF },
            InputEvent::MouseMove { dx: -3, dy: 32767 },
            InputEvent::MouseDown { button: 2 },
            InputEvent::MouseUp { button: 1 },
            InputEvent::Wheel {
                dx: i16::MIN,
                dy: -1,
            },
            InputEvent::PadButton {
                pad: 3,
                button: 17,
                value: 255,
            },
            InputEvent::PadAxis {
                pad: 1,
                axis: 3,
                value: -32767,
            },
            InputEvent::Ping,
            InputEvent::Pong,
        ]
    }

    #[test]
    fn every_kind_round_trips() {
        let events = every_kind();
        let mut kinds: Vec<u8> = events.iter().map(InputEvent::kind).collect();
        kinds.sort_unstable();
        assert_eq!(kinds, (1..=10).collect::<Vec<u8>>());
        for (i, event) in events.into_iter().enumerate() {
            let msg = InputMessage {
                seq: 0x0102_0304 + u32::try_from(i).unwrap(),
                t_ms: u32::MAX - 7,
                event,
            };
            let bytes = msg.encode();
            assert_eq!(bytes.len(), HEADER_LEN + payload_len(event.kind()).unwrap());
            assert_eq!(bytes.first(), Some(&event.kind()));
            assert_eq!(InputMessage::decode(&bytes), Ok(msg), "{}", event.name());
        }
    }

    #[test]
    fn layout_is_little_endian_as_documented() {
        let bytes = [0x08, 0x2A, 0, 0, 0, 0x10, 0x27, 0, 0, 1, 3, 0x01, 0x80];
        let msg = InputMessage::decode(&bytes).unwrap();
        assert_eq!(
            msg,
            InputMessage {
                seq: 42,
                t_ms: 10_000,
                event: InputEvent::PadAxis {
                    pad: 1,
                    axis: 3,
                    value: -32767,
                },
            }
        );
        assert_eq!(msg.encode(), bytes);
        let key = [0x01, 1, 0, 0, 0, 0, 0, 0, 0, 0x2C, 0x00];
        assert_eq!(
            InputMessage::decode(&key).unwrap().event,
            InputEvent::KeyDown { code: hid::SPACE }
        );
    }

    #[test]
    fn trailing_bytes_are_ignored() {
        let msg = InputMessage {
            seq: 9,
            t_ms: 99,
            event: InputEvent::MouseDown { button: 0 },
        };
        let mut bytes = msg.encode();
        bytes.extend_from_slice(&[0xFF; 7]);
        assert_eq!(InputMessage::decode(&bytes), Ok(msg));
    }

    #[test]
    fn short_messages_name_kind_need_and_got() {
        for event in every_kind() {
            let msg = InputMessage {
                seq: 5,
                t_ms: 6,
                event,
            };
            let bytes = msg.encode();
            for got in 1..bytes.len() {
                assert_eq!(
                    InputMessage::decode(bytes.get(..got).unwrap()),
                    Err(InputError::Short {
                        kind: event.kind(),
                        need: bytes.len(),
                        got,
                    }),
                    "{} cut to {got} bytes",
                    event.name()
                );
            }
        }
    }

    #[test]
    fn unknown_kinds_and_empty_are_errors() {
        assert_eq!(InputMessage::decode(&[]), Err(InputError::Empty));
        for kind in [0x00, 0x0B, 0x7F, 0xFF] {
            assert_eq!(
                InputMessage::decode(&[kind, 1, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0]),
                Err(InputError::UnknownKind(kind))
            );
            assert_eq!(
                InputMessage::decode(&[kind]),
                Err(InputError::UnknownKind(kind))
            );
        }
    }

    #[test]
    fn ping_gets_a_pong_echoing_seq_and_t_ms() {
        let ping = InputMessage {
            seq: 0xAABB_CCDD,
            t_ms: 0x1122_3344,
            event: InputEvent::Ping,
        };
        let pong = ping.pong().unwrap();
        assert_eq!(pong, [0x0A, 0xDD, 0xCC, 0xBB, 0xAA, 0x44, 0x33, 0x22, 0x11]);
        let back = InputMessage::decode(&pong).unwrap();
        assert_eq!(back.event, InputEvent::Pong);
        assert_eq!((back.seq, back.t_ms), (ping.seq, ping.t_ms));
        assert_eq!(back.pong(), None);
        assert!(!ping.is_activity());
        assert!(!back.is_activity());
        for event in every_kind() {
            let msg = InputMessage {
                seq: 1,
                t_ms: 1,
                event,
            };
            let is_ping_pong = matches!(event, InputEvent::Ping | InputEvent::Pong);
            assert_eq!(msg.is_activity(), !is_ping_pong, "{}", event.name());
            assert_eq!(msg.pong().is_some(), event == InputEvent::Ping);
        }
    }

    #[test]
    fn names_are_distinct() {
        let mut names: Vec<&str> = every_kind().iter().map(InputEvent::name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), 10);
    }

    /// Checks one decode of outside bytes: no panic, and a success re-encodes to the prefix
    /// it was read from.
    fn check_arbitrary(bytes: &[u8]) {
        match InputMessage::decode(bytes) {
            Ok(msg) => {
                let encoded = msg.encode();
                assert_eq!(bytes.get(..encoded.len()), Some(encoded.as_slice()));
            }
            Err(InputError::Empty) => assert!(bytes.is_empty()),
            Err(InputError::UnknownKind(kind)) => {
                assert_eq!(bytes.first(), Some(&kind));
                assert!(payload_len(kind).is_none());
            }
            Err(InputError::Short { kind, need, got }) => {
                assert_eq!(bytes.first(), Some(&kind));
                assert_eq!(got, bytes.len());
                assert!(got < need);
            }
        }
    }

    #[test]
    fn every_kind_byte_at_every_short_length_never_panics() {
        for kind in 0..=u8::MAX {
            for len in 0..=16_u8 {
                let mut bytes = vec![kind];
                bytes.extend((0..len).map(|i| i.wrapping_mul(37).wrapping_add(kind)));
                bytes.truncate(usize::from(len));
                check_arbitrary(&bytes);
            }
        }
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..40)) {
            check_arbitrary(&bytes);
        }
    }
}
