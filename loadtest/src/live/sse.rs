//! A reader of server-sent events (the broker's `GET /v1/sessions/{id}/events`): bytes in,
//! complete events out. No I/O; bytes from the network are untrusted, so a line longer than
//! the limit is an error, never a panic.

use std::collections::VecDeque;

/// The longest line (and event) accepted.
pub(crate) const MAX_LINE: usize = 1024 * 1024;

/// One event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SseEvent {
    /// Its `event:` name (`message` when absent).
    pub name: String,
    /// Its `data:` lines, joined with newlines.
    pub data: String,
}

/// The stream broke the format's limits.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("an event-stream line is longer than {MAX_LINE} bytes")]
pub(crate) struct TooLong;

/// Splits a byte stream into events.
#[derive(Debug, Default)]
pub(crate) struct SseParser {
    line: Vec<u8>,
    name: Option<String>,
    data: Option<String>,
    ready: VecDeque<SseEvent>,
}

impl SseParser {
    /// Takes in the next bytes of the stream.
    pub(crate) fn feed(&mut self, bytes: &[u8]) -> Result<(), TooLong> {
        for &b in bytes {
            if b == b'\n' {
                let mut line = std::mem::take(&mut self.line);
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                self.handle_line(&String::from_utf8_lossy(&line));
            } else {
                if self.line.len() >= MAX_LINE
                    || self.data.as_ref().is_some_and(|d| d.len() >= MAX_LINE)
                {
                    return Err(TooLong);
                }
                self.line.push(b);
            }
        }
        Ok(())
    }

    /// The next complete event, if any.
    pub(crate) fn next_event(&mut self) -> Option<SseEvent> {
        self.ready.pop_front()
    }

    fn handle_line(&mut self, line: &str) {
        if line.is_empty() {
            if let Some(data) = self.data.take() {
                self.ready.push_back(SseEvent {
                    name: self.name.take().unwrap_or_else(|| "message".into()),
                    data,
                });
            }
            self.name = None;
            return;
        }
        if line.starts_with(':') {
            return;
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line, ""),
        };
        match field {
            "event" => self.name = Some(value.to_owned()),
            "data" => match &mut self.data {
                Some(d) => {
                    d.push('\n');
                    d.push_str(value);
                }
                None => self.data = Some(value.to_owned()),
            },
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_split_across_chunks_come_out_whole() {
        let stream = b": keep-alive\n\nevent: session\ndata: {\"state\":\"queued\"}\n\nevent: session\r\ndata: a\r\ndata: b\r\n\r\n";
        for chunk in [1, 3, 7, stream.len()] {
            let mut p = SseParser::default();
            let mut out = Vec::new();
            for part in stream.chunks(chunk) {
                p.feed(part).unwrap();
                while let Some(e) = p.next_event() {
                    out.push(e);
                }
            }
            assert_eq!(
                out,
                vec![
                    SseEvent {
                        name: "session".into(),
                        data: "{\"state\":\"queued\"}".into()
                    },
                    SseEvent {
                        name: "session".into(),
                        data: "a\nb".into()
                    },
                ],
                "chunks of {chunk}"
            );
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic_and_endless_lines_are_refused() {
        let mut rng = fastrand::Rng::with_seed(3);
        let mut p = SseParser::default();
        for _ in 0..2000 {
            let bytes: Vec<u8> = (0..rng.usize(0..64)).map(|_| rng.u8(..)).collect();
            let _ = p.feed(&bytes);
            while p.next_event().is_some() {}
        }
        let mut p = SseParser::default();
        let long = vec![b'x'; MAX_LINE + 1];
        assert_eq!(p.feed(&long), Err(TooLong));
    }
}
