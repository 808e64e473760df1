//! One stream's media pipeline: frame source → encoder → peer, paced at the stream's frame
//! rate on a thread of its own (rendering and software encoding are CPU work that must not
//! hold up the async runtime).
//!
//! The pipeline idles until the connection is up ([`PipelineHandle::play`]), applies the
//! player's input before each picture (and renders the next picture early when input
//! arrives), and encodes a key frame when asked. Pictures the
//! thread could not render in time are skipped, not queued: a game stream shows the newest
//! picture, never a backlog.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use super::encode::{EncoderSettings, VideoEncoder};
use super::input::InputMessage;
use super::rtc::Peer;
use super::scene::I420Frame;
use super::source::FrameSource;

/// Counters of one pipeline, read by the stream's stats loop.
#[derive(Debug, Default)]
pub struct PipelineCounters {
    /// Pictures sent.
    pub frames: AtomicU64,
    /// Key frames among them.
    pub keyframes: AtomicU64,
    /// Encoded bytes sent.
    pub bytes: AtomicU64,
    /// Pictures skipped because the thread fell behind.
    pub late: AtomicU64,
    /// Time spent rendering and encoding, microseconds.
    pub busy_us: AtomicU64,
    /// Input events applied.
    pub inputs: AtomicU64,
}

/// Controls one running pipeline. Dropping it stops the thread within a frame interval.
#[derive(Debug)]
pub struct PipelineHandle {
    shared: Arc<Shared>,
    inputs: mpsc::Sender<InputMessage>,
    thread: thread::Thread,
}

#[derive(Debug, Default)]
struct Shared {
    stop: AtomicBool,
    playing: AtomicBool,
    keyframe: AtomicBool,
    /// Input arrived since the last picture.
    input_waiting: AtomicBool,
    /// Notified when the thread stops on an error.
    failed: Arc<tokio::sync::Notify>,
    counters: PipelineCounters,
}

impl PipelineHandle {
    /// Starts a pipeline that sends `source`'s pictures, encoded by `encoder`, to `peer`.
    /// `runtime` runs the peer's sends.
    pub fn start(
        settings: EncoderSettings,
        source: Box<dyn FrameSource>,
        encoder: Box<dyn VideoEncoder>,
        peer: Arc<Peer>,
        runtime: tokio::runtime::Handle,
        name: String,
    ) -> std::io::Result<Self> {
        let shared = Arc::new(Shared::default());
        let (inputs, input_rx) = mpsc::channel();
        let worker = Worker {
            settings,
            source,
            encoder,
            peer,
            runtime,
            shared: Arc::clone(&shared),
            inputs: input_rx,
        };
        let span = tracing::Span::current();
        let handle = thread::Builder::new()
            .name(name)
            .spawn(move || span.in_scope(|| worker.run()))?;
        Ok(Self {
            shared,
            inputs,
            thread: handle.thread().clone(),
        })
    }

    /// Starts (`true`) or pauses sending pictures. Starting asks for a key frame, so the
    /// player can decode from the first picture it gets.
    pub fn play(&self, on: bool) {
        if on {
            self.shared.keyframe.store(true, Ordering::Relaxed);
        }
        self.shared.playing.store(on, Ordering::Relaxed);
        self.thread.unpark();
    }

    /// Encodes the next picture as a key frame.
    pub fn request_keyframe(&self) {
        self.shared.keyframe.store(true, Ordering::Relaxed);
    }

    /// Hands one input event to the source; it is applied before the next picture, which
    /// comes early (half a frame interval after the last one at the soonest), so the player
    /// sees the reaction without waiting out the frame clock.
    pub fn input(&self, event: InputMessage) {
        // The thread is gone only after a fatal error, already logged.
        let _ = self.inputs.send(event);
        self.shared.input_waiting.store(true, Ordering::Relaxed);
        self.thread.unpark();
    }

    /// The pipeline's counters.
    pub fn counters(&self) -> &PipelineCounters {
        &self.shared.counters
    }

    /// Notified once if the thread stops on an error (its frame source or encoder failed);
    /// the error is logged.
    pub fn failure(&self) -> Arc<tokio::sync::Notify> {
        Arc::clone(&self.shared.failed)
    }
}

impl Drop for PipelineHandle {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        self.thread.unpark();
    }
}

struct Worker {
    settings: EncoderSettings,
    source: Box<dyn FrameSource>,
    encoder: Box<dyn VideoEncoder>,
    peer: Arc<Peer>,
    runtime: tokio::runtime::Handle,
    shared: Arc<Shared>,
    inputs: mpsc::Receiver<InputMessage>,
}

impl Worker {
    fn run(mut self) {
        let failed = Arc::clone(&self.shared.failed);
        if self.stream().is_err() {
            // Stored as a permit when nobody waits yet.
            failed.notify_one();
        }
    }

    /// Sends pictures until stopped; `Err` after a fatal error (logged).
    fn stream(&mut self) -> Result<(), ()> {
        let interval = Duration::from_secs(1) / u32::from(self.settings.fps.max(1));
        let mut frame = match I420Frame::new(self.settings.width, self.settings.height) {
            Ok(f) => f,
            Err(e) => {
                tracing::error!(error = %e, "the stream cannot start");
                return Err(());
            }
        };
        let shared = Arc::clone(&self.shared);
        let counters = &shared.counters;
        let mut number: u64 = 0;
        let mut next = Instant::now();
        // When the previous picture was started: paces early pictures, and times the RTP clock.
        let mut last: Option<Instant> = None;
        tracing::debug!(
            source = self.source.name(),
            encoder = self.encoder.name(),
            ?interval,
            "pipeline started"
        );
        while !self.shared.stop.load(Ordering::Relaxed) {
            if !self.shared.playing.load(Ordering::Relaxed) {
                self.apply_inputs();
                thread::park_timeout(interval);
                next = Instant::now();
                continue;
            }
            let now = Instant::now();
            if now < next {
                // Wait for the frame clock, or render early for input: at the soonest half an
                // interval after the last picture, so input cannot raise the frame rate past
                // twice the stream's.
                let soonest = last.map_or(now, |l| l + interval / 2);
                if !self.shared.input_waiting.load(Ordering::Relaxed) {
                    thread::park_timeout(next - now);
                    continue;
                }
                if now < soonest {
                    thread::park_timeout(soonest.min(next) - now);
                    continue;
                }
                // The frame clock restarts from this picture.
                next = now;
            }
            self.apply_inputs();
            let started = Instant::now();
            let previous = last.replace(started);
            if let Err(e) = self.source.render(number, &mut frame) {
                tracing::error!(error = %e, "the frame source failed; the stream stops");
                return Err(());
            }
            let keyframe = self.shared.keyframe.swap(false, Ordering::Relaxed);
            let encoded = match self.encoder.encode(&frame, keyframe) {
                Ok(e) => e,
                Err(e) => {
                    tracing::error!(error = %e, "the encoder failed; the stream stops");
                    return Err(());
                }
            };
            let busy = started.elapsed();
            counters.busy_us.fetch_add(
                u64::try_from(busy.as_micros()).unwrap_or(u64::MAX),
                Ordering::Relaxed,
            );
            if !encoded.data.is_empty() {
                counters.bytes.fetch_add(
                    u64::try_from(encoded.data.len()).unwrap_or(u64::MAX),
                    Ordering::Relaxed,
                );
                counters.frames.fetch_add(1, Ordering::Relaxed);
                if encoded.keyframe {
                    counters.keyframes.fetch_add(1, Ordering::Relaxed);
                }
                // The track advances the RTP clock by each picture's duration. Real time since
                // the previous picture keeps it with the wall clock through early pictures and
                // skips (lagging by one picture), where a fixed interval would drift.
                let duration = previous.map_or(interval, |t| started.saturating_duration_since(t));
                let sent = self
                    .runtime
                    .block_on(self.peer.send_video(encoded.data, duration));
                if let Err(e) = sent {
                    tracing::debug!(error = %e, "a picture was not sent");
                }
            }
            number += 1;
            next += interval;
            let now = Instant::now();
            if now > next + interval {
                // Fell behind by more than a picture: skip to now rather than send a burst.
                let behind = now.duration_since(next).as_nanos() / interval.as_nanos().max(1);
                counters
                    .late
                    .fetch_add(u64::try_from(behind).unwrap_or(u64::MAX), Ordering::Relaxed);
                number += u64::try_from(behind).unwrap_or(0);
                next = now;
            }
        }
        Ok(())
    }

    fn apply_inputs(&mut self) {
        self.shared.input_waiting.store(false, Ordering::Relaxed);
        for event in self.inputs.try_iter() {
            self.source.input(&event);
            self.shared.counters.inputs.fetch_add(1, Ordering::Relaxed);
        }
    }
}
