//! A minimal game for the capture interface (docs/PROTOCOL.md, "Game capture interface").
//!
//! It binds the Unix socket the agent names in `$FRAMECAST_CAPTURE_SOCKET`, and for each
//! connection the agent makes draws a bar that moves across a dark picture, in I420 at
//! `$FRAMECAST_WIDTH`×`$FRAMECAST_HEIGHT` and `$FRAMECAST_FPS` (1280×720 at 30 without
//! them), and prints the player's input events it receives. Configure it as a game's
//! `command` in `agent.toml`, or run it by hand:
//!
//! ```text
//! FRAMECAST_CAPTURE_SOCKET=/tmp/game.sock cargo run -p framecast-agent --example capture_game
//! ```

// The point of the example is to show what it receives.
#![allow(clippy::print_stdout)]

use std::io::{self, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::Context;

use framecast_agent::stream::capture::{CAPTURE_SOCKET_ENV, FrameHeader, i420_len};
use framecast_agent::stream::input::InputMessage;

/// Luma of the background.
const BACKGROUND: u8 = 40;
/// Luma of the bar.
const BAR: u8 = 235;
/// Chroma that carries no colour.
const NEUTRAL: u8 = 128;

fn main() -> anyhow::Result<()> {
    let path = PathBuf::from(
        std::env::var_os(CAPTURE_SOCKET_ENV)
            .with_context(|| format!("{CAPTURE_SOCKET_ENV} is not set: run me from the agent"))?,
    );
    let width = env_number("FRAMECAST_WIDTH", 1280)?;
    let height = env_number("FRAMECAST_HEIGHT", 720)?;
    let fps = env_number("FRAMECAST_FPS", 30)?.max(1);
    anyhow::ensure!(
        width.is_multiple_of(2) && height.is_multiple_of(2) && width > 0 && height > 0,
        "I420 needs an even, non-zero size, not {width}x{height}"
    );
    // A socket file left by an earlier run would make the bind fail.
    match std::fs::remove_file(&path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            return Err(e).with_context(|| format!("removing {}", path.display()));
        }
        _ => {}
    }
    let listener =
        UnixListener::bind(&path).with_context(|| format!("binding {}", path.display()))?;
    println!(
        "capture_game: {width}x{height} at {fps} fps on {}",
        path.display()
    );
    let mut picture = Picture::new(width, height);
    let interval = Duration::from_secs(1) / u32::from(fps);
    // One connection at a time: the agent connects again whenever a stream (re)starts.
    for conn in listener.incoming() {
        let conn = match conn {
            Ok(c) => c,
            Err(e) => {
                println!("capture_game: accept failed: {e}");
                continue;
            }
        };
        println!("capture_game: the agent connected");
        match conn.try_clone() {
            Ok(input) => {
                thread::spawn(move || print_input(input));
            }
            Err(e) => println!("capture_game: no input for this connection: {e}"),
        }
        let ended = stream_frames(conn, &mut picture, interval);
        println!("capture_game: the connection ended: {ended}");
    }
    Ok(())
}

/// A `u16` from the environment, `default` when unset.
fn env_number(name: &str, default: u16) -> anyhow::Result<u16> {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .with_context(|| format!("{name}={v:?} is not a number up to 65535")),
        Err(_) => Ok(default),
    }
}

/// Writes a frame every `interval` until the connection fails.
fn stream_frames(mut conn: UnixStream, picture: &mut Picture, interval: Duration) -> io::Error {
    let mut next = Instant::now();
    loop {
        picture.draw();
        let header = FrameHeader::i420(picture.width, picture.height, picture.number).encode();
        if let Err(e) = conn
            .write_all(&header)
            .and_then(|()| conn.write_all(&picture.data))
        {
            return e;
        }
        picture.number += 1;
        next += interval;
        let now = Instant::now();
        match next.checked_duration_since(now) {
            Some(wait) => thread::sleep(wait),
            // Behind: go on from now rather than hurry.
            None => next = now,
        }
    }
}

/// Prints every input event the agent writes: a `u16` length, then the input channel's bytes.
fn print_input(mut conn: UnixStream) {
    let mut body = Vec::new();
    loop {
        let mut len = [0_u8; 2];
        if conn.read_exact(&mut len).is_err() {
            return;
        }
        body.resize(usize::from(u16::from_le_bytes(len)), 0);
        if conn.read_exact(&mut body).is_err() {
            return;
        }
        match InputMessage::decode(&body) {
            Ok(m) => println!(
                "capture_game: input seq {} t_ms {}: {:?}",
                m.seq, m.t_ms, m.event
            ),
            Err(e) => println!("capture_game: undecodable input: {e}"),
        }
    }
}

/// The game's picture: a bar moving left to right over a dark background.
struct Picture {
    width: u16,
    height: u16,
    number: u64,
    /// Y, then U, then V.
    data: Vec<u8>,
}

impl Picture {
    fn new(width: u16, height: u16) -> Self {
        let len = i420_len(width, height);
        let luma = usize::from(width) * usize::from(height);
        let mut data = vec![NEUTRAL; len];
        if let Some(y) = data.get_mut(..luma) {
            y.fill(BACKGROUND);
        }
        Self {
            width,
            height,
            number: 0,
            data,
        }
    }

    /// Draws frame `self.number`: the bar crosses the picture in about four seconds at 30 fps.
    fn draw(&mut self) {
        let w = usize::from(self.width);
        let h = usize::from(self.height);
        let bar = (w / 16).max(2);
        let step = u64::from((self.width / 120).max(1));
        // Below the width, so it fits a usize.
        let x = usize::try_from(self.number.wrapping_mul(step) % u64::from(self.width.max(1)))
            .unwrap_or(0);
        for row in self.data.chunks_exact_mut(w).take(h) {
            row.fill(BACKGROUND);
            if let Some(span) = row.get_mut(x..(x + bar).min(w)) {
                span.fill(BAR);
            }
        }
    }
}
