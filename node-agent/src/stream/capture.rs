//! The capture interface of a game process (docs/PROTOCOL.md, "Game capture interface"): how
//! a real game hands its rendered frames to its stream and receives the player's input.
//!
//! This is the CPU path every host has, and what the software encoder consumes; on GPU hosts
//! the production path hands GPU-resident surfaces to NVENC instead. The game is the server:
//! at launch the agent puts [`CAPTURE_SOCKET_ENV`] in its environment, the game binds a Unix
//! stream socket there and listens, and the stream's [`CaptureSource`] connects to it. The
//! game writes one [`FrameHeader`] and an I420 picture per frame; the agent writes the
//! player's input events, each framed by [`encode_input`].
//!
//! The framing ([`FrameHeader`], [`encode_input`]) does no I/O. [`CaptureSource`] is the thin
//! shell around it: a reader thread that (re)connects and keeps only the newest frame, and a
//! writer thread for input, so neither a slow game nor a fast one ever holds up the stream's
//! pipeline.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use super::input::InputMessage;
use super::scene::{I420Frame, SceneError};
use super::source::FrameSource;

/// The environment variable that tells a game process where to bind its capture socket.
pub const CAPTURE_SOCKET_ENV: &str = "FRAMECAST_CAPTURE_SOCKET";
/// The directory under the agent's data directory that holds the games' capture sockets.
pub const CAPTURE_DIR: &str = "capture";
/// The size of `sun_path` in `sockaddr_un` on Linux, terminating NUL included: a socket path
/// must be shorter than this.
pub const SUN_PATH_MAX: usize = 108;

/// The first four bytes of every frame header.
pub const MAGIC: [u8; 4] = *b"FCF1";
/// The version of the capture protocol this agent speaks.
pub const VERSION: u8 = 1;
/// The pixel format byte of I420 (planar Y, then U, then V; chroma subsampled by two).
pub const FORMAT_I420: u8 = 1;
/// The length of a frame header.
pub const HEADER_LEN: usize = 32;
/// The largest payload the agent reads: a frame header announcing more is refused before
/// anything is allocated for it. (An 8K I420 frame is about 47 MiB.)
pub const MAX_PAYLOAD: usize = 64 << 20;
/// How many input events wait for the game before further ones are dropped.
pub const INPUT_QUEUE: usize = 256;
/// Luma of the neutral grey picture shown until the game's first frame arrives.
pub const WAITING_LUMA: u8 = 128;

/// How often the reader retries connecting, and how often a blocked thread looks at the
/// shutdown flag.
const POLL: Duration = Duration::from_millis(50);
/// How long dropping a source waits for its threads before leaving them to finish alone.
const STOP_WAIT: Duration = Duration::from_secs(1);
/// Chroma that carries no colour.
const NEUTRAL_CHROMA: u8 = 128;

/// The directory the capture sockets of `data_dir`'s agent live in.
pub fn capture_dir(data_dir: &Path) -> PathBuf {
    data_dir.join(CAPTURE_DIR)
}

/// Creates the capture directory of `data_dir` (with its parents) and makes it private to the
/// agent's user (mode 0700): whoever can connect to a game's socket can drive the game. Games
/// that run as another user (`instances.user`) bind their sockets in it too: then it belongs
/// to their group as well (mode 0770), and so does the data directory above it, with search
/// permission only for that group (`g+x`: the games pass through it, they cannot list it).
pub fn prepare_capture_dir(data_dir: &Path, games_gid: Option<u32>) -> io::Result<PathBuf> {
    let dir = capture_dir(data_dir);
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)?;
    let mode = match games_gid {
        Some(gid) => {
            std::os::unix::fs::chown(&dir, None, Some(gid))?;
            std::os::unix::fs::chown(data_dir, None, Some(gid))?;
            let data = std::fs::metadata(data_dir)?.permissions().mode();
            std::fs::set_permissions(
                data_dir,
                std::fs::Permissions::from_mode((data & 0o7707) | 0o010),
            )?;
            0o770
        }
        None => 0o700,
    };
    // An existing directory keeps its mode through `create`.
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode))?;
    Ok(dir)
}

/// The socket of instance `instance` in `capture_dir`: `<capture_dir>/<instance>.sock`. Any
/// character of the name other than ASCII letters, digits, `-`, `_`, `.` and `:` becomes `_`,
/// so the socket always lies directly in the directory.
pub fn socket_path(capture_dir: &Path, instance: &str) -> PathBuf {
    let name: String = instance
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':') {
                c
            } else {
                '_'
            }
        })
        .collect();
    capture_dir.join(format!("{name}.sock"))
}

/// Whether a Unix socket can be bound at `path` (shorter than [`SUN_PATH_MAX`] bytes).
pub fn fits_sun_path(path: &Path) -> bool {
    path.as_os_str().len() < SUN_PATH_MAX
}

/// Sets [`CAPTURE_SOCKET_ENV`] in a game process's environment `env`: the socket of
/// `instance` in `capture_dir`. A path too long to bind is set all the same, with a warning
/// (the game will fail to bind it and say so); a path that is not UTF-8 is not set.
pub fn set_socket_env(env: &mut BTreeMap<String, String>, capture_dir: &Path, instance: &str) {
    let path = socket_path(capture_dir, instance);
    if !fits_sun_path(&path) {
        tracing::warn!(
            instance,
            path = %path.display(),
            len = path.as_os_str().len(),
            max = SUN_PATH_MAX - 1,
            "the capture socket path is too long for a Unix socket; the game cannot stream (use a shorter data_dir)"
        );
    }
    match path.to_str() {
        Some(p) => {
            env.insert(CAPTURE_SOCKET_ENV.to_owned(), p.to_owned());
        }
        None => {
            tracing::warn!(instance, path = %path.display(), "the capture socket path is not UTF-8; the game gets none");
        }
    }
}

/// Removes the socket file of `instance` once its game has exited (a missing file is fine).
pub fn remove_socket(capture_dir: &Path, instance: &str) {
    let path = socket_path(capture_dir, instance);
    if let Err(e) = std::fs::remove_file(&path)
        && e.kind() != io::ErrorKind::NotFound
    {
        tracing::debug!(instance, path = %path.display(), error = %e, "capture socket not removed");
    }
}

/// The number of bytes of an I420 picture of `width`×`height` (both even):
/// width×height×3/2.
pub fn i420_len(width: u16, height: u16) -> usize {
    let luma = usize::from(width) * usize::from(height);
    let chroma = usize::from(width / 2) * usize::from(height / 2);
    luma + 2 * chroma
}

/// The header the game writes before each frame. On the wire (little-endian, 32 bytes):
/// magic `FCF1` (4) | version u8 | format u8 | reserved u16 | width u16 | height u16 |
/// reserved u32 | frame number u64 | payload length u32 | reserved u32. Reserved fields are
/// written as 0 and ignored when read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// The pixel format ([`FORMAT_I420`]).
    pub format: u8,
    /// The picture's width in pixels.
    pub width: u16,
    /// The picture's height in pixels.
    pub height: u16,
    /// The game's own frame counter (for logs; the agent does not require it to grow).
    pub number: u64,
    /// How many payload bytes follow the header.
    pub payload_len: u32,
}

/// Why the bytes a game sent are not a frame the stream can use. The connection is dropped
/// and the agent connects again; the stream goes on.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CaptureError {
    /// The header does not start with `FCF1`.
    #[error("bad magic {0:02x?}: not a Framecast capture frame header")]
    BadMagic([u8; 4]),
    /// A protocol version this agent does not speak.
    #[error("capture protocol version {0}; this agent speaks version {VERSION}")]
    UnsupportedVersion(u8),
    /// A pixel format this agent does not take.
    #[error("pixel format {0}; this agent takes {FORMAT_I420} (I420)")]
    UnsupportedFormat(u8),
    /// The frame's size is not the stream's.
    #[error("frame is {got_width}x{got_height} but the stream is {width}x{height}")]
    SizeMismatch {
        /// The stream's width.
        width: u16,
        /// The stream's height.
        height: u16,
        /// The frame's width.
        got_width: u16,
        /// The frame's height.
        got_height: u16,
    },
    /// The payload length is not that of an I420 picture of the frame's size.
    #[error("payload of {got} bytes, but a {width}x{height} I420 picture has {want}")]
    PayloadLength {
        /// The frame's width.
        width: u16,
        /// The frame's height.
        height: u16,
        /// The length the header announces.
        got: u32,
        /// The length the size needs.
        want: usize,
    },
    /// The stream's pictures are larger than the agent reads from a game.
    #[error("a picture of {0} bytes exceeds the {MAX_PAYLOAD}-byte capture limit")]
    TooLarge(usize),
}

impl FrameHeader {
    /// The header of I420 frame `number` of `width`×`height`.
    pub fn i420(width: u16, height: u16, number: u64) -> Self {
        Self {
            format: FORMAT_I420,
            width,
            height,
            number,
            payload_len: u32::try_from(i420_len(width, height)).unwrap_or(u32::MAX),
        }
    }

    /// The header's bytes, as a game writes them.
    // One line per row of the documented layout; destructuring keeps every offset checked at
    // compile time.
    #[rustfmt::skip]
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let [m0, m1, m2, m3] = MAGIC;
        let [w0, w1] = self.width.to_le_bytes();
        let [h0, h1] = self.height.to_le_bytes();
        let [n0, n1, n2, n3, n4, n5, n6, n7] = self.number.to_le_bytes();
        let [l0, l1, l2, l3] = self.payload_len.to_le_bytes();
        [
            m0, m1, m2, m3,                 // 0: magic
            VERSION, self.format, 0, 0,     // 4: version, format, reserved u16
            w0, w1, h0, h1,                 // 8: width, height
            0, 0, 0, 0,                     // 12: reserved u32
            n0, n1, n2, n3, n4, n5, n6, n7, // 16: frame number
            l0, l1, l2, l3,                 // 24: payload length
            0, 0, 0, 0,                     // 28: reserved u32
        ]
    }

    /// Parses a header: the magic, the version and the format must be known. Whether the
    /// frame fits a stream is [`FrameHeader::check`]'s question.
    #[rustfmt::skip]
    pub fn decode(bytes: &[u8; HEADER_LEN]) -> Result<Self, CaptureError> {
        let [
            m0, m1, m2, m3,
            version, format, _, _,
            w0, w1, h0, h1,
            _, _, _, _,
            n0, n1, n2, n3, n4, n5, n6, n7,
            l0, l1, l2, l3,
            _, _, _, _,
        ] = *bytes;
        let magic = [m0, m1, m2, m3];
        if magic != MAGIC {
            return Err(CaptureError::BadMagic(magic));
        }
        if version != VERSION {
            return Err(CaptureError::UnsupportedVersion(version));
        }
        if format != FORMAT_I420 {
            return Err(CaptureError::UnsupportedFormat(format));
        }
        Ok(Self {
            format,
            width: u16::from_le_bytes([w0, w1]),
            height: u16::from_le_bytes([h0, h1]),
            number: u64::from_le_bytes([n0, n1, n2, n3, n4, n5, n6, n7]),
            payload_len: u32::from_le_bytes([l0, l1, l2, l3]),
        })
    }

    /// Checks that the frame is a picture of a `width`×`height` stream; returns its payload
    /// length, which is then safe to allocate.
    pub fn check(&self, width: u16, height: u16) -> Result<usize, CaptureError> {
        if (self.width, self.height) != (width, height) {
            return Err(CaptureError::SizeMismatch {
                width,
                height,
                got_width: self.width,
                got_height: self.height,
            });
        }
        let want = i420_len(width, height);
        if usize::try_from(self.payload_len).ok() != Some(want) {
            return Err(CaptureError::PayloadLength {
                width,
                height,
                got: self.payload_len,
                want,
            });
        }
        if want > MAX_PAYLOAD {
            return Err(CaptureError::TooLarge(want));
        }
        Ok(want)
    }
}

/// One input event as the agent writes it to the game: its length (u16, little-endian), then
/// the event in the input channel's format ([`InputMessage::encode`]).
pub fn encode_input(event: &InputMessage) -> Vec<u8> {
    let mut body = event.encode();
    // Events are at most 13 bytes; the cut only keeps the framing consistent if one ever
    // outgrew the prefix.
    let len = u16::try_from(body.len()).unwrap_or(u16::MAX);
    body.truncate(usize::from(len));
    let mut out = Vec::with_capacity(2 + body.len());
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&body);
    out
}

/// Counters of one capture source, for metrics and tests.
#[derive(Debug, Default)]
pub struct CaptureCounters {
    /// Connections made to the game's socket.
    pub connections: AtomicU64,
    /// Frames read from the game.
    pub frames_received: AtomicU64,
    /// Frames replaced by a newer one before the stream took them (the game is faster than
    /// the stream).
    pub frames_dropped: AtomicU64,
    /// Pictures the stream drew again because no new frame had arrived.
    pub frames_repeated: AtomicU64,
    /// Connections dropped because the game broke the protocol.
    pub protocol_errors: AtomicU64,
    /// Input events written to the game.
    pub inputs_sent: AtomicU64,
    /// Input events dropped: no game connected, the game not reading, or the queue full.
    pub inputs_dropped: AtomicU64,
}

/// Frames from a game process's capture socket, and the player's input to it.
///
/// A reader thread connects (retrying every 50 ms while the game starts), reads frames and
/// keeps only the newest; [`FrameSource::render`] copies it out. Input goes through a bounded
/// queue to a writer thread. Dropping the source stops both threads and closes the
/// connection.
#[derive(Debug)]
pub struct CaptureSource {
    width: u16,
    height: u16,
    shared: Arc<Shared>,
    counters: Arc<CaptureCounters>,
    /// The newest frame the stream took; shown again until a newer one arrives.
    front: Vec<u8>,
    has_frame: bool,
    /// `None` once dropping, or when the writer thread could not start.
    inputs: Option<SyncSender<Vec<u8>>>,
    threads: Vec<JoinHandle<()>>,
    /// Disconnected once every thread has ended.
    done: Receiver<()>,
}

impl CaptureSource {
    /// A source for a `width`×`height` stream from the game whose socket is `path`. Its
    /// threads start now and connect as soon as the game listens.
    pub fn new(path: PathBuf, width: u16, height: u16) -> Self {
        let counters = Arc::new(CaptureCounters::default());
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            slot: Mutex::new(Slot::default()),
            conn: Mutex::new(None),
            counters: Arc::clone(&counters),
            warned: AtomicBool::new(false),
        });
        let (done_tx, done) = mpsc::channel::<()>();
        let (input_tx, input_rx) = mpsc::sync_channel::<Vec<u8>>(INPUT_QUEUE);
        let mut threads = Vec::with_capacity(2);
        let span = tracing::Span::current();

        let reader = {
            let shared = Arc::clone(&shared);
            let done = done_tx.clone();
            let span = span.clone();
            thread::Builder::new()
                .name("capture-read".into())
                .spawn(move || {
                    span.in_scope(|| read_loop(&shared, &path, width, height));
                    drop(done);
                })
        };
        match reader {
            Ok(t) => threads.push(t),
            Err(e) => {
                tracing::error!(error = %e, "could not start the capture reader; the stream shows no game")
            }
        }
        let writer = {
            let shared = Arc::clone(&shared);
            thread::Builder::new()
                .name("capture-write".into())
                .spawn(move || {
                    span.in_scope(|| write_loop(&shared, &input_rx));
                    drop(done_tx);
                })
        };
        let inputs = match writer {
            Ok(t) => {
                threads.push(t);
                Some(input_tx)
            }
            Err(e) => {
                tracing::error!(error = %e, "could not start the capture writer; input is dropped");
                None
            }
        };
        Self {
            width,
            height,
            shared,
            counters,
            front: Vec::new(),
            has_frame: false,
            inputs,
            threads,
            done,
        }
    }

    /// The source's counters; they stay readable after the source moved into a pipeline.
    pub fn counters(&self) -> Arc<CaptureCounters> {
        Arc::clone(&self.counters)
    }

    fn fill_waiting(out: &mut I420Frame) {
        let (y, u, v) = out.planes_mut();
        y.fill(WAITING_LUMA);
        u.fill(NEUTRAL_CHROMA);
        v.fill(NEUTRAL_CHROMA);
    }
}

impl FrameSource for CaptureSource {
    fn name(&self) -> &'static str {
        "capture"
    }

    /// Copies the newest frame into `out` (the last one again if none arrived since), or
    /// draws the grey "waiting for the game" picture before the first.
    fn render(&mut self, _frame: u64, out: &mut I420Frame) -> Result<(), SceneError> {
        if (out.width(), out.height()) != (self.width, self.height) {
            return Err(SceneError::SizeMismatch {
                width: self.width,
                height: self.height,
                got_width: out.width(),
                got_height: out.height(),
            });
        }
        let fresh = {
            let mut slot = lock(&self.shared.slot);
            let fresh = slot.fresh;
            if fresh {
                // Swapping, not copying, keeps the lock short; the reader reuses the old
                // buffer for a later frame.
                std::mem::swap(&mut slot.buf, &mut self.front);
                slot.fresh = false;
            }
            fresh
        };
        if fresh {
            self.has_frame = true;
        } else if self.has_frame {
            self.counters
                .frames_repeated
                .fetch_add(1, Ordering::Relaxed);
        }
        if !self.has_frame {
            Self::fill_waiting(out);
            return Ok(());
        }
        let (y, u, v) = out.planes_mut();
        // Every frame in `front` was checked to be a picture of this very size.
        let planes = self.front.split_at_checked(y.len()).and_then(|(fy, rest)| {
            let (fu, fv) = rest.split_at_checked(u.len())?;
            (fv.len() == v.len()).then_some((fy, fu, fv))
        });
        match planes {
            Some((fy, fu, fv)) => {
                y.copy_from_slice(fy);
                u.copy_from_slice(fu);
                v.copy_from_slice(fv);
            }
            None => {
                tracing::debug!(
                    len = self.front.len(),
                    "a captured frame has the wrong length"
                );
                Self::fill_waiting(out);
            }
        }
        Ok(())
    }

    /// Queues the event for the writer thread; when the queue is full (the game does not
    /// read its input) the event is dropped and counted rather than holding up the pipeline.
    fn input(&mut self, event: &InputMessage) {
        let queued = self
            .inputs
            .as_ref()
            .is_some_and(|tx| tx.try_send(encode_input(event)).is_ok());
        if !queued {
            self.counters.inputs_dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

impl Drop for CaptureSource {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        // The writer's `recv` ends with its sender.
        self.inputs = None;
        // A thread blocked on the socket wakes; the game sees the connection end.
        if let Some(conn) = lock(&self.shared.conn).as_ref() {
            let _ = conn.stream.shutdown(Shutdown::Both);
        }
        for t in &self.threads {
            t.thread().unpark();
        }
        // Each thread holds a sender until it ends; every blocking call it makes returns
        // within `POLL`, so this wait is short. A thread still stuck after `STOP_WAIT` (a
        // connect to a game whose listen backlog is full) finishes on its own.
        match self.done.recv_timeout(STOP_WAIT) {
            Err(RecvTimeoutError::Timeout) => {
                tracing::warn!("the capture threads did not stop in time; left to finish alone");
            }
            Ok(()) | Err(RecvTimeoutError::Disconnected) => {
                for t in self.threads.drain(..) {
                    let _ = t.join();
                }
            }
        }
    }
}

/// What the source and its threads share.
#[derive(Debug)]
struct Shared {
    stop: AtomicBool,
    /// The newest frame.
    slot: Mutex<Slot>,
    /// The connection to the game, while there is one; the writer writes to a clone.
    conn: Mutex<Option<Conn>>,
    counters: Arc<CaptureCounters>,
    /// Whether a protocol error was logged at warning level yet.
    warned: AtomicBool,
}

/// The newest frame from the game.
#[derive(Debug, Default)]
struct Slot {
    buf: Vec<u8>,
    /// Whether `buf` holds a frame the stream has not taken yet.
    fresh: bool,
}

/// One connection to the game; `id` tells a new connection from the one a clone was made of.
#[derive(Debug)]
struct Conn {
    id: u64,
    stream: UnixStream,
}

/// Why a connection ended.
#[derive(Debug)]
enum End {
    /// The source is being dropped.
    Stopped,
    /// The game closed the connection, or it failed.
    Closed(io::Error),
    /// The game broke the protocol.
    Protocol(CaptureError),
}

/// The reader thread: connects, reads frames until the connection ends, and connects again,
/// until the source is dropped.
fn read_loop(shared: &Shared, path: &Path, width: u16, height: u16) {
    let counters = &shared.counters;
    let mut back = Vec::new();
    let mut id: u64 = 0;
    let mut waiting_logged = false;
    while !shared.stopping() {
        let stream = match UnixStream::connect(path) {
            Ok(s) => s,
            Err(e) => {
                if !waiting_logged {
                    tracing::debug!(path = %path.display(), error = %e, "waiting for the game's capture socket");
                    waiting_logged = true;
                }
                thread::park_timeout(POLL);
                continue;
            }
        };
        waiting_logged = false;
        // Without a timeout the thread would notice a drop only by the socket's shutdown.
        if let Err(e) = stream.set_read_timeout(Some(POLL)) {
            tracing::debug!(error = %e, "no read timeout on the capture socket");
        }
        id += 1;
        {
            let mut conn = lock(&shared.conn);
            // Checked under the lock `drop` takes to shut the connection down, so a
            // connection made while dropping is never left open.
            if shared.stopping() {
                break;
            }
            *conn = match stream.try_clone() {
                Ok(stream) => Some(Conn { id, stream }),
                Err(e) => {
                    tracing::debug!(error = %e, "no clone of the capture socket; input is dropped");
                    None
                }
            };
        }
        counters.connections.fetch_add(1, Ordering::Relaxed);
        tracing::info!(path = %path.display(), "connected to the game's capture socket");
        let end = read_frames(shared, &stream, width, height, &mut back);
        *lock(&shared.conn) = None;
        let _ = stream.shutdown(Shutdown::Both);
        match end {
            End::Stopped => break,
            End::Closed(e) => {
                tracing::info!(error = %e, "the game's capture connection ended");
            }
            End::Protocol(e) => {
                counters.protocol_errors.fetch_add(1, Ordering::Relaxed);
                // A broken game reconnects and fails again; one warning says it all.
                if shared.warned.swap(true, Ordering::Relaxed) {
                    tracing::debug!(error = %e, "the game broke the capture protocol; connection dropped");
                } else {
                    tracing::warn!(error = %e, "the game broke the capture protocol; connection dropped");
                }
            }
        }
        // A game that fails at once must not make this a busy loop.
        thread::park_timeout(POLL);
    }
}

/// Reads frames from `stream` into the shared slot until the connection ends. `back` is the
/// reader's own buffer; it is swapped with the slot's, so at most three frame buffers exist.
fn read_frames(
    shared: &Shared,
    stream: &UnixStream,
    width: u16,
    height: u16,
    back: &mut Vec<u8>,
) -> End {
    let counters = &shared.counters;
    let mut header = [0_u8; HEADER_LEN];
    loop {
        if let Err(end) = read_full(&shared.stop, stream, &mut header) {
            return end;
        }
        let len = match FrameHeader::decode(&header).and_then(|h| h.check(width, height)) {
            Ok(len) => len,
            Err(e) => return End::Protocol(e),
        };
        // `len` is the stream's own picture size (checked above), never a size the game chose.
        if back.len() != len {
            back.clear();
            back.resize(len, 0);
        }
        if let Err(end) = read_full(&shared.stop, stream, back) {
            return end;
        }
        let mut slot = lock(&shared.slot);
        if slot.fresh {
            counters.frames_dropped.fetch_add(1, Ordering::Relaxed);
        }
        std::mem::swap(&mut slot.buf, back);
        slot.fresh = true;
        drop(slot);
        counters.frames_received.fetch_add(1, Ordering::Relaxed);
    }
}

/// Fills `buf` from `stream`, looking at `stop` whenever the read times out.
fn read_full(stop: &AtomicBool, mut stream: &UnixStream, buf: &mut [u8]) -> Result<(), End> {
    let mut at = 0;
    while let Some(rest) = buf.get_mut(at..).filter(|r| !r.is_empty()) {
        if stop.load(Ordering::Relaxed) {
            return Err(End::Stopped);
        }
        match stream.read(rest) {
            Ok(0) => return Err(End::Closed(io::ErrorKind::UnexpectedEof.into())),
            Ok(n) => at += n,
            Err(e) if retry(&e) => {}
            Err(e) => return Err(End::Closed(e)),
        }
    }
    Ok(())
}

/// The writer thread: writes each queued event to the connection the reader holds, and drops
/// it when there is none.
fn write_loop(shared: &Shared, inputs: &Receiver<Vec<u8>>) {
    let counters = &shared.counters;
    let mut current: Option<Conn> = None;
    loop {
        let bytes = match inputs.recv_timeout(POLL) {
            Ok(b) => b,
            Err(RecvTimeoutError::Timeout) => {
                if shared.stopping() {
                    return;
                }
                continue;
            }
            Err(RecvTimeoutError::Disconnected) => return,
        };
        if shared.stopping() {
            return;
        }
        {
            let conn = lock(&shared.conn);
            match conn.as_ref() {
                None => current = None,
                Some(c) if current.as_ref().map(|x| x.id) != Some(c.id) => {
                    current = c.stream.try_clone().ok().map(|stream| {
                        // A game that does not read its input must not block this thread
                        // past a drop of the source.
                        let _ = stream.set_write_timeout(Some(POLL));
                        Conn { id: c.id, stream }
                    });
                }
                Some(_) => {}
            }
        }
        let Some(conn) = &current else {
            counters.inputs_dropped.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        match write_full(&shared.stop, &conn.stream, &bytes) {
            Ok(()) => {
                counters.inputs_sent.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                counters.inputs_dropped.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(error = %e, "an input event did not reach the game");
                current = None;
            }
        }
    }
}

/// Writes all of `bytes`, looking at `stop` whenever the write times out. A timeout never
/// leaves half an event behind: the write goes on where it stopped.
fn write_full(stop: &AtomicBool, mut stream: &UnixStream, bytes: &[u8]) -> io::Result<()> {
    let mut at = 0;
    while let Some(rest) = bytes.get(at..).filter(|r| !r.is_empty()) {
        if stop.load(Ordering::Relaxed) {
            return Err(io::ErrorKind::Interrupted.into());
        }
        match stream.write(rest) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => at += n,
            Err(e) if retry(&e) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Whether an I/O error only means "not yet" (a timeout or a signal).
fn retry(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted
    )
}

impl Shared {
    fn stopping(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section leaves the data whole (a swap, a flag, an assignment).
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixListener;
    use std::time::Instant;

    use super::*;
    use crate::stream::input::{InputEvent, hid};

    const W: u16 = 64;
    const H: u16 = 36;
    /// Bounds how long a broken build hangs; no test asserts on time.
    const LIMIT: Duration = Duration::from_secs(10);

    /// A picture whose every byte depends on `seed` and its position.
    fn picture(seed: u8) -> Vec<u8> {
        (0..i420_len(W, H))
            .map(|i| seed.wrapping_add(u8::try_from(i % 251).unwrap()))
            .collect()
    }

    fn frame_message(number: u64, payload: &[u8]) -> Vec<u8> {
        let mut out = FrameHeader::i420(W, H, number).encode().to_vec();
        out.extend_from_slice(payload);
        out
    }

    fn until(what: &str, mut ok: impl FnMut() -> bool) {
        let deadline = Instant::now() + LIMIT;
        while !ok() {
            assert!(Instant::now() < deadline, "timed out waiting until {what}");
            thread::sleep(Duration::from_millis(2));
        }
    }

    fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }

    fn accept(listener: &UnixListener) -> UnixStream {
        let (conn, _) = listener.accept().unwrap();
        conn.set_read_timeout(Some(LIMIT)).unwrap();
        conn
    }

    /// Reads until the agent closes the connection; panics on a timeout. Linux reports a
    /// close with unread bytes in the closer's queue as a reset, which is an end here too.
    fn read_to_eof(mut conn: &UnixStream) -> Vec<u8> {
        let mut got = Vec::new();
        let mut buf = [0_u8; 4096];
        loop {
            match conn.read(&mut buf) {
                Ok(0) => return got,
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return got,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => panic!("reading until the agent hangs up: {e}"),
            }
        }
    }

    fn rendered(source: &mut CaptureSource) -> I420Frame {
        let mut out = I420Frame::new(W, H).unwrap();
        source.render(0, &mut out).unwrap();
        out
    }

    #[test]
    fn header_layout_is_little_endian_as_documented() {
        let header = FrameHeader {
            format: FORMAT_I420,
            width: 1280,
            height: 720,
            number: 0x0102_0304_0506_0708,
            payload_len: 1_382_400,
        };
        let bytes = header.encode();
        assert_eq!(
            bytes,
            [
                b'F', b'C', b'F', b'1', 1, 1, 0, 0, 0x00, 0x05, 0xD0, 0x02, 0, 0, 0, 0, 8, 7, 6, 5,
                4, 3, 2, 1, 0x00, 0x18, 0x15, 0x00, 0, 0, 0, 0
            ]
        );
        assert_eq!(FrameHeader::decode(&bytes), Ok(header));
        assert_eq!(FrameHeader::i420(1280, 720, header.number), header);
        assert_eq!(i420_len(1280, 720), 1280 * 720 * 3 / 2);
        assert_eq!(header.check(1280, 720), Ok(1_382_400));
    }

    #[test]
    fn reserved_fields_are_ignored() {
        let header = FrameHeader::i420(W, H, 9);
        let mut bytes = header.encode();
        for i in [6, 7, 12, 13, 14, 15, 28, 29, 30, 31] {
            bytes[i] = 0xAA;
        }
        assert_eq!(FrameHeader::decode(&bytes), Ok(header));
    }

    #[test]
    fn bad_headers_name_what_is_wrong() {
        let good = FrameHeader::i420(W, H, 1).encode();
        let mut magic = good;
        magic[0] = b'X';
        assert_eq!(
            FrameHeader::decode(&magic),
            Err(CaptureError::BadMagic(*b"XCF1"))
        );
        let mut version = good;
        version[4] = 2;
        assert_eq!(
            FrameHeader::decode(&version),
            Err(CaptureError::UnsupportedVersion(2))
        );
        let mut format = good;
        format[5] = 2;
        assert_eq!(
            FrameHeader::decode(&format),
            Err(CaptureError::UnsupportedFormat(2))
        );
        assert_eq!(
            FrameHeader::i420(128, 72, 1).check(W, H),
            Err(CaptureError::SizeMismatch {
                width: W,
                height: H,
                got_width: 128,
                got_height: 72,
            })
        );
        for got in [0, 1, 3455, 3457, u32::MAX] {
            let header = FrameHeader {
                payload_len: got,
                ..FrameHeader::i420(W, H, 1)
            };
            assert_eq!(
                header.check(W, H),
                Err(CaptureError::PayloadLength {
                    width: W,
                    height: H,
                    got,
                    want: 3456,
                })
            );
        }
        // A stream whose own pictures exceed the limit takes no frames at all.
        assert_eq!(
            FrameHeader::i420(8192, 8192, 1).check(8192, 8192),
            Err(CaptureError::TooLarge(i420_len(8192, 8192)))
        );
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_header_bytes_never_panic(
            mut bytes in proptest::array::uniform32(proptest::num::u8::ANY),
            header_like in proptest::bool::ANY,
        ) {
            // Half start like a header, so the later checks run too.
            if header_like {
                bytes[..6].copy_from_slice(&[b'F', b'C', b'F', b'1', VERSION, FORMAT_I420]);
            }
            if let Ok(h) = FrameHeader::decode(&bytes) {
                // Re-encoding gives the same bytes, but for reserved ones, written as 0.
                let mut expected = bytes;
                for i in [6, 7, 12, 13, 14, 15, 28, 29, 30, 31] {
                    expected[i] = 0;
                }
                proptest::prop_assert_eq!(h.encode(), expected);
                if let Ok(len) = h.check(h.width, h.height) {
                    proptest::prop_assert_eq!(len, i420_len(h.width, h.height));
                    proptest::prop_assert!(len <= MAX_PAYLOAD);
                }
            } else {
                proptest::prop_assert!(!header_like);
            }
        }
    }

    #[test]
    fn socket_paths_lie_in_the_capture_dir() {
        let dir = Path::new("/var/lib/framecast/capture");
        assert_eq!(
            socket_path(dir, "instance-3-0-sim-0"),
            PathBuf::from("/var/lib/framecast/capture/instance-3-0-sim-0.sock")
        );
        assert_eq!(
            socket_path(dir, "../a/b c"),
            PathBuf::from("/var/lib/framecast/capture/.._a_b_c.sock")
        );
        assert_eq!(
            capture_dir(Path::new("/var/lib/framecast")),
            PathBuf::from(dir)
        );
        let gpu_name = "instance-12-3-GPU-8f0c2a4e-1d2b-4c3d-9e8f-0a1b2c3d4e5f";
        assert!(fits_sun_path(&socket_path(dir, gpu_name)));
        let deep = PathBuf::from(format!("/{}", "d".repeat(60)));
        assert!(!fits_sun_path(&socket_path(&deep, gpu_name)));
        // 107 bytes fit (the NUL makes 108), 108 do not.
        assert!(fits_sun_path(Path::new(&"a".repeat(107))));
        assert!(!fits_sun_path(Path::new(&"a".repeat(108))));
    }

    #[test]
    fn the_env_var_names_the_socket_even_when_too_long() {
        let mut env = BTreeMap::new();
        set_socket_env(&mut env, Path::new("/data/capture"), "instance-1");
        assert_eq!(
            env.get(CAPTURE_SOCKET_ENV).map(String::as_str),
            Some("/data/capture/instance-1.sock")
        );
        let deep = PathBuf::from(format!("/{}", "d".repeat(120)));
        set_socket_env(&mut env, &deep, "instance-1");
        assert_eq!(
            env.get(CAPTURE_SOCKET_ENV),
            Some(&format!("{}/instance-1.sock", deep.display()))
        );
    }

    #[test]
    fn the_capture_dir_is_private() {
        let data = tempfile::tempdir().unwrap();
        let dir = prepare_capture_dir(data.path(), None).unwrap();
        assert_eq!(dir, data.path().join("capture"));
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        // An existing directory with a looser mode is tightened.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        prepare_capture_dir(data.path(), None).unwrap();
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        std::fs::write(socket_path(&dir, "gone"), b"").unwrap();
        remove_socket(&dir, "gone");
        assert!(!socket_path(&dir, "gone").exists());
        remove_socket(&dir, "never-there");
    }

    #[test]
    fn with_a_game_user_the_capture_dir_is_its_groups_too_and_the_data_dir_lets_it_through() {
        use std::os::unix::fs::MetadataExt;
        let data = tempfile::tempdir().unwrap();
        std::fs::set_permissions(data.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        // The agent's own group: any process may give a file it owns to its own group.
        let gid = nix::unistd::getegid().as_raw();
        let dir = prepare_capture_dir(data.path(), Some(gid)).unwrap();
        let meta = std::fs::metadata(&dir).unwrap();
        assert_eq!(
            (meta.gid(), meta.permissions().mode() & 0o777),
            (gid, 0o770)
        );
        let meta = std::fs::metadata(data.path()).unwrap();
        // Search for the group, nothing for others.
        assert_eq!(
            (meta.gid(), meta.permissions().mode() & 0o777),
            (gid, 0o710)
        );
    }

    #[test]
    fn input_framing_is_a_length_then_the_channel_bytes() {
        let msg = InputMessage {
            seq: 7,
            t_ms: 1000,
            event: InputEvent::KeyDown { code: hid::SPACE },
        };
        let framed = encode_input(&msg);
        assert_eq!(framed, [11, 0, 0x01, 7, 0, 0, 0, 0xE8, 3, 0, 0, 0x2C, 0]);
        assert_eq!(InputMessage::decode(&framed[2..]), Ok(msg));
    }

    #[test]
    fn before_the_first_frame_the_picture_is_neutral_grey() {
        let dir = tempfile::tempdir().unwrap();
        let mut source = CaptureSource::new(dir.path().join("none.sock"), W, H);
        assert_eq!(source.name(), "capture");
        let out = rendered(&mut source);
        assert!(out.y().iter().all(|&b| b == WAITING_LUMA));
        assert!(out.u().iter().chain(out.v()).all(|&b| b == NEUTRAL_CHROMA));
        let counters = source.counters();
        assert_eq!(get(&counters.frames_repeated), 0);
        // A frame of another size is the caller's mistake, reported as such.
        let mut wrong = I420Frame::new(128, 72).unwrap();
        assert!(matches!(
            source.render(0, &mut wrong),
            Err(SceneError::SizeMismatch { .. })
        ));
    }

    #[test]
    fn render_copies_the_newest_frame_and_repeats_it_until_another_arrives() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("game.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let (more_tx, more_rx) = mpsc::channel::<()>();
        let game = thread::spawn(move || {
            let mut conn = accept(&listener);
            for n in 1..=3_u8 {
                conn.write_all(&frame_message(u64::from(n), &picture(n)))
                    .unwrap();
            }
            more_rx.recv().unwrap();
            conn.write_all(&frame_message(4, &picture(4))).unwrap();
            read_to_eof(&conn);
        });
        let mut source = CaptureSource::new(path, W, H);
        let counters = source.counters();
        until("three frames arrived", || {
            get(&counters.frames_received) == 3
        });
        assert_eq!(
            get(&counters.frames_dropped),
            2,
            "frames 1 and 2 were never shown"
        );
        let out = rendered(&mut source);
        assert_eq!(out.as_bytes(), picture(3).as_slice());
        let again = rendered(&mut source);
        assert_eq!(again.as_bytes(), picture(3).as_slice());
        assert_eq!(get(&counters.frames_repeated), 1);
        more_tx.send(()).unwrap();
        until("frame 4 arrived", || get(&counters.frames_received) == 4);
        assert_eq!(rendered(&mut source).as_bytes(), picture(4).as_slice());
        assert_eq!(get(&counters.frames_repeated), 1);
        assert_eq!(get(&counters.frames_dropped), 2);
        assert_eq!(get(&counters.protocol_errors), 0);
        assert_eq!(get(&counters.connections), 1);
        drop(source);
        game.join().unwrap();
    }

    #[test]
    fn the_source_connects_once_the_game_listens() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("late.sock");
        let mut source = CaptureSource::new(path.clone(), W, H);
        let counters = source.counters();
        // Let it try a few times against a socket that is not there yet.
        thread::sleep(POLL * 3);
        assert_eq!(get(&counters.connections), 0);
        let listener = UnixListener::bind(&path).unwrap();
        let game = thread::spawn(move || {
            let mut conn = accept(&listener);
            conn.write_all(&frame_message(1, &picture(42))).unwrap();
            read_to_eof(&conn);
        });
        until("the first frame arrived", || {
            get(&counters.frames_received) == 1
        });
        assert_eq!(rendered(&mut source).as_bytes(), picture(42).as_slice());
        drop(source);
        game.join().unwrap();
    }

    #[test]
    fn a_bad_header_drops_the_connection_and_a_good_game_is_read_after() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let game = thread::spawn(move || {
            let mut bad = accept(&listener);
            let mut header = FrameHeader::i420(W, H, 1).encode();
            header[..4].copy_from_slice(b"JUNK");
            bad.write_all(&header).unwrap();
            // The agent hangs up rather than read on; it never gets to see these bytes.
            let _ = bad.write_all(&picture(1));
            read_to_eof(&bad);
            let mut good = accept(&listener);
            good.write_all(&frame_message(2, &picture(2))).unwrap();
            read_to_eof(&good);
        });
        let mut source = CaptureSource::new(path, W, H);
        let counters = source.counters();
        until("a frame from the second connection", || {
            get(&counters.frames_received) == 1
        });
        assert_eq!(get(&counters.protocol_errors), 1);
        assert_eq!(get(&counters.connections), 2);
        assert_eq!(rendered(&mut source).as_bytes(), picture(2).as_slice());
        drop(source);
        game.join().unwrap();
    }

    #[test]
    fn frames_of_the_wrong_size_or_length_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wrong.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let wrong_size = {
            let mut m = FrameHeader::i420(128, 72, 1).encode().to_vec();
            m.extend_from_slice(&[0; 128 * 72 * 3 / 2]);
            m
        };
        // Announces 4 GiB: refused from the header alone, nothing allocated for it.
        let huge = FrameHeader {
            payload_len: u32::MAX,
            ..FrameHeader::i420(W, H, 2)
        }
        .encode()
        .to_vec();
        let attempts = [wrong_size, huge];
        let game = thread::spawn(move || {
            for message in attempts {
                let mut conn = accept(&listener);
                let _ = conn.write_all(&message);
                read_to_eof(&conn);
            }
        });
        let mut source = CaptureSource::new(path, W, H);
        let counters = source.counters();
        until("both games refused", || get(&counters.protocol_errors) == 2);
        game.join().unwrap();
        assert_eq!(get(&counters.frames_received), 0);
        let out = rendered(&mut source);
        assert!(out.y().iter().all(|&b| b == WAITING_LUMA));
    }

    #[test]
    fn input_reaches_the_game_framed_as_documented() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("input.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let events = [
            InputEvent::KeyDown { code: hid::W },
            InputEvent::MouseMove { dx: -5, dy: 300 },
            InputEvent::PadAxis {
                pad: 1,
                axis: 0,
                value: -32767,
            },
            InputEvent::Ping,
        ];
        let messages: Vec<InputMessage> = events
            .iter()
            .zip(1..)
            .map(|(&event, seq)| InputMessage {
                seq,
                t_ms: seq * 16,
                event,
            })
            .collect();
        let (connected_tx, connected_rx) = mpsc::channel::<()>();
        let count = messages.len();
        let game = thread::spawn(move || {
            let mut conn = accept(&listener);
            connected_tx.send(()).unwrap();
            let mut got = Vec::new();
            for _ in 0..count {
                let mut len = [0_u8; 2];
                conn.read_exact(&mut len).unwrap();
                let mut body = vec![0_u8; usize::from(u16::from_le_bytes(len))];
                conn.read_exact(&mut body).unwrap();
                got.push(InputMessage::decode(&body).unwrap());
            }
            // Nothing else was written.
            assert!(read_to_eof(&conn).is_empty());
            got
        });
        let mut source = CaptureSource::new(path, W, H);
        let counters = source.counters();
        connected_rx.recv_timeout(LIMIT).unwrap();
        until("the source holds the connection", || {
            get(&counters.connections) == 1
        });
        for m in &messages {
            source.input(m);
        }
        until("every event was written", || {
            get(&counters.inputs_sent) == 4
        });
        drop(source);
        assert_eq!(game.join().unwrap(), messages);
        assert_eq!(get(&counters.inputs_dropped), 0);
    }

    #[test]
    fn input_without_a_game_is_dropped_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        let mut source = CaptureSource::new(dir.path().join("absent.sock"), W, H);
        let counters = source.counters();
        let msg = InputMessage {
            seq: 1,
            t_ms: 0,
            event: InputEvent::MouseDown { button: 0 },
        };
        source.input(&msg);
        source.input(&msg);
        until("both events dropped", || get(&counters.inputs_dropped) == 2);
        assert_eq!(get(&counters.inputs_sent), 0);
    }

    #[test]
    fn dropping_the_source_ends_its_threads_and_the_connection() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("drop.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let (eof_tx, eof_rx) = mpsc::channel::<usize>();
        let game = thread::spawn(move || {
            let mut conn = accept(&listener);
            conn.write_all(&frame_message(1, &picture(1))).unwrap();
            eof_tx.send(read_to_eof(&conn).len()).unwrap();
            // No new connection follows the drop.
            listener.set_nonblocking(true).unwrap();
            thread::sleep(POLL * 3);
            assert!(listener.accept().is_err());
        });
        let source = CaptureSource::new(path, W, H);
        let counters = source.counters();
        until("the frame arrived", || get(&counters.frames_received) == 1);
        let weak = Arc::downgrade(&source.shared);
        drop(source);
        // Every thread has ended: none holds the shared state any more.
        assert_eq!(weak.strong_count(), 0);
        assert_eq!(eof_rx.recv_timeout(LIMIT).unwrap(), 0);
        game.join().unwrap();
    }
}
