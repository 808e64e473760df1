//! The node's live streams: one per session whose player is connected or connecting.
//!
//! [`Streams`] is the async shell between the WHEP endpoint, the WebRTC peers and the core:
//! it checks a player's token against the core, answers the offer, starts the session's
//! pipeline, turns what happens on the connection into session states for the broker
//! (`connecting`, `active`, `reconnecting`), hands input to the game, and stops the stream
//! whenever the session ends, whatever ended it.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{Notify, mpsc};

use framecast_shared::ids::SessionId;
use framecast_shared::protocol::Message;
use framecast_shared::state::{EndReason, SessionState};
use framecast_shared::time::Timestamp;

use super::capture::{self, CaptureSource};
use super::encode::{self, EncoderChoice, EncoderSettings};
use super::input::InputMessage;
use super::pipeline::PipelineHandle;
use super::rtc::{Peer, PeerEvent, PeerState, RtcEngine, RtcError, RtcOptions};
use super::scene::SyntheticScene;
use super::source::FrameSource;
use crate::core::{AgentCore, StreamSpec, TokenRefusal};
use crate::metrics;

/// How the node streams.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamOptions {
    /// How peers reach players.
    pub rtc: RtcOptions,
    /// The highest frame rate a software-encoded stream runs at; a tier asking for more is
    /// streamed at this rate (one core encodes 720p in roughly 10–17 ms a picture).
    pub software_max_fps: u16,
    /// Where game processes listen for their stream (`<data_dir>/capture`); without it, a
    /// process game cannot be streamed.
    pub capture_dir: Option<PathBuf>,
    /// Which encoder streams use.
    pub encoder: EncoderChoice,
    /// How long a player may take from its offer to a connected stream (ICE and DTLS) before
    /// the agent gives the connection up; the session then waits for a new offer as
    /// `reconnecting`, within the broker's grace window.
    pub connect_timeout: Duration,
}

impl Default for StreamOptions {
    fn default() -> Self {
        Self {
            rtc: RtcOptions::default(),
            software_max_fps: 30,
            capture_dir: None,
            encoder: EncoderChoice::Auto,
            connect_timeout: Duration::from_secs(30),
        }
    }
}

/// Why a player's request was refused; the WHEP endpoint maps each to an HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// The node cannot check tokens yet.
    #[error("the node has no token key yet (no broker has welcomed it); retry shortly")]
    NoKey,
    /// Missing, forged, expired, for another node or for another session.
    #[error("{0}")]
    Unauthorized(String),
    /// The node does not hold the session, or the stream is unknown.
    #[error("{0}")]
    NotFound(String),
    /// The session's player is connected already.
    #[error("{0}")]
    Conflict(String),
    /// The offer or candidate fragment is unusable.
    #[error("{0}")]
    BadRequest(String),
    /// The node is shutting down.
    #[error("{0}")]
    Unavailable(String),
    /// The node failed.
    #[error("{0}")]
    Internal(String),
}

/// Input messages queued per stream; a player who sends faster than the game takes them
/// loses the excess (counted in `framecast_stream_input_rejected_total`).
const INPUT_QUEUE: usize = 256;

/// A new stream: its id (for the WHEP resource) and the SDP answer.
#[derive(Debug, Clone)]
pub struct Answer {
    /// The stream's id on this node.
    pub stream: u64,
    /// The SDP answer.
    pub sdp: String,
}

/// The node's live streams. Cheap to clone.
#[derive(Clone)]
pub struct Streams {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Streams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Streams")
            .field("live", &self.live_count())
            .finish_non_exhaustive()
    }
}

struct Inner {
    core: Arc<Mutex<AgentCore>>,
    engine: RtcEngine,
    outbox: mpsc::UnboundedSender<Message>,
    live: Mutex<BTreeMap<SessionId, Live>>,
    next_id: AtomicU64,
    options: StreamOptions,
    /// Set by [`Streams::stop_all`]: no new stream starts.
    closed: std::sync::atomic::AtomicBool,
}

struct Live {
    id: u64,
    peer: Arc<Peer>,
    connected: bool,
    stop: Arc<Notify>,
}

impl Streams {
    /// Streams for the sessions of `core`; updates for the broker go to `outbox`.
    pub fn new(
        core: Arc<Mutex<AgentCore>>,
        outbox: mpsc::UnboundedSender<Message>,
        options: StreamOptions,
    ) -> Result<Self, RtcError> {
        Ok(Self {
            inner: Arc::new(Inner {
                engine: RtcEngine::new(&options.rtc)?,
                core,
                outbox,
                live: Mutex::new(BTreeMap::new()),
                next_id: AtomicU64::new(1),
                options,
                closed: std::sync::atomic::AtomicBool::new(false),
            }),
        })
    }

    /// Streams running now.
    pub fn live_count(&self) -> usize {
        self.live().len()
    }

    /// Answers a player's WHEP offer for `session`, authenticated by `token`.
    ///
    /// Everything that can fail — the answer, the encoder, the frame source — is set up
    /// before the stream is registered and the session reported `connecting`; a failure
    /// closes the new peer and changes nothing else.
    pub async fn offer(
        &self,
        session: SessionId,
        token: &str,
        offer: &str,
    ) -> Result<Answer, StreamError> {
        if self.inner.closed.load(Ordering::Relaxed) {
            return Err(StreamError::Unavailable(
                "the node is shutting down".to_owned(),
            ));
        }
        let spec = self.authorize(&session, token)?;
        if self.live().get(&session).is_some_and(|l| l.connected) {
            return Err(StreamError::Conflict(format!(
                "session {session} is connected already; DELETE its stream first"
            )));
        }
        let started = Instant::now();
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let span =
            tracing::info_span!("stream", session_id = %session, stream = id, gpu = %spec.gpu);
        let (events_tx, events) = mpsc::unbounded_channel();
        let (inputs_tx, inputs) = mpsc::channel(INPUT_QUEUE);
        let (peer, sdp) = self
            .inner
            .engine
            .answer(offer, events_tx, inputs_tx)
            .await
            .map_err(|e| match e {
                RtcError::BadOffer(_) | RtcError::NoVideo | RtcError::BadCandidate(_) => {
                    StreamError::BadRequest(e.to_string())
                }
                RtcError::Config(_) | RtcError::Stack(_) => StreamError::Internal(e.to_string()),
            })?;
        let peer = Arc::new(peer);
        // Opening an encoder can block (NVENC creates a CUDA context): off the runtime.
        let built = {
            let (options, spec, peer, span) = (
                self.inner.options.clone(),
                spec.clone(),
                Arc::clone(&peer),
                span.clone(),
            );
            let runtime = tokio::runtime::Handle::current();
            tokio::task::spawn_blocking(move || {
                let _entered = span.enter();
                build_pipeline(&options, &session, &spec, peer, runtime, id)
            })
            .await
            .unwrap_or_else(|e| Err(StreamError::Internal(e.to_string())))
        };
        let pipeline = match built {
            Ok(p) => p,
            Err(e) => {
                peer.close().await;
                return Err(e);
            }
        };
        // Registered under the core's lock (core, then live: the one order both are taken
        // in), so a session that ended while the offer was answered gets no stream.
        let stop = Arc::new(Notify::new());
        let registered = {
            let core = self.core();
            let mut live = self.live();
            if core.stream_spec(&session).is_none() {
                Err(StreamError::NotFound(format!(
                    "session {session} ended while its offer was answered"
                )))
            } else if live.get(&session).is_some_and(|l| l.connected) {
                Err(StreamError::Conflict(format!(
                    "session {session} connected meanwhile"
                )))
            } else {
                Ok(live.insert(
                    session,
                    Live {
                        id,
                        peer: Arc::clone(&peer),
                        connected: false,
                        stop: Arc::clone(&stop),
                    },
                ))
            }
        };
        let replaced = match registered {
            Ok(replaced) => replaced,
            Err(e) => {
                drop(pipeline);
                peer.close().await;
                return Err(e);
            }
        };
        if let Some(old) = replaced {
            // The player came back while its old connection was still going down.
            old.stop.notify_one();
        }
        if spec.state == SessionState::Reserved {
            self.report_if_current(&session, id, SessionState::Connecting);
        }
        let task = StreamTask {
            streams: self.clone(),
            session,
            id,
            peer,
            pipeline,
            started,
            encoder_units: spec.tier.encoder_cost.milli(),
            last_input: None,
        };
        tokio::spawn(tracing::Instrument::instrument(
            task.run(events, inputs, stop),
            span,
        ));
        metrics::stream_offer("answered");
        tracing::info!(session_id = %session, stream = id, "offer answered");
        Ok(Answer { stream: id, sdp })
    }

    /// Adds a player's trickled ICE candidates to stream `stream` of `session`.
    pub async fn add_candidates(
        &self,
        session: SessionId,
        stream: u64,
        token: &str,
        fragment: &str,
    ) -> Result<usize, StreamError> {
        self.authorize(&session, token)?;
        let peer = self.peer(&session, stream)?;
        peer.add_candidates(fragment)
            .await
            .map_err(|e| StreamError::BadRequest(e.to_string()))
    }

    /// Ends stream `stream` of `session` at the player's request; the session ends with it
    /// (reason `released`), freeing its vGPU and encoder slot.
    pub async fn hang_up(
        &self,
        session: SessionId,
        stream: u64,
        token: &str,
    ) -> Result<(), StreamError> {
        self.authorize(&session, token)?;
        self.peer(&session, stream)?;
        // Ending the session in the core stops the stream (see `stop_ended`); stopping it here
        // too makes the answer wait for nothing.
        self.end(&session, EndReason::Released);
        self.stop(&session);
        Ok(())
    }

    /// Stops the streams of sessions that end, as the core reports them on `ended`, until the
    /// channel closes or `shutdown` turns true.
    pub async fn stop_ended(
        self,
        mut ended: mpsc::UnboundedReceiver<SessionId>,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
    ) {
        loop {
            tokio::select! {
                session = ended.recv() => match session {
                    Some(session) => self.stop(&session),
                    None => return,
                },
                _ = shutdown.wait_for(|s| *s) => return,
            }
        }
    }

    /// Stops every stream and takes no new one (the agent is shutting down).
    pub async fn stop_all(&self) {
        self.inner.closed.store(true, Ordering::Relaxed);
        let all: Vec<Live> = std::mem::take(&mut *self.live()).into_values().collect();
        for live in all {
            live.stop.notify_one();
            live.peer.close().await;
        }
    }

    fn stop(&self, session: &SessionId) {
        if let Some(live) = self.live().remove(session) {
            live.stop.notify_one();
        }
    }

    fn live(&self) -> std::sync::MutexGuard<'_, BTreeMap<SessionId, Live>> {
        self.inner
            .live
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn core(&self) -> std::sync::MutexGuard<'_, AgentCore> {
        self.inner
            .core
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn peer(&self, session: &SessionId, stream: u64) -> Result<Arc<Peer>, StreamError> {
        self.live()
            .get(session)
            .filter(|l| l.id == stream)
            .map(|l| Arc::clone(&l.peer))
            .ok_or_else(|| {
                StreamError::NotFound(format!("session {session} has no stream {stream}"))
            })
    }

    /// Checks `token` for `session` and returns what its stream needs.
    fn authorize(&self, session: &SessionId, token: &str) -> Result<StreamSpec, StreamError> {
        let core = self.core();
        let claims = core
            .verify_token(token, Timestamp::now())
            .map_err(|e| match e {
                TokenRefusal::NoKey => StreamError::NoKey,
                TokenRefusal::Invalid(e) => {
                    StreamError::Unauthorized(format!("token refused: {e}"))
                }
                TokenRefusal::UnknownSession(s) => {
                    StreamError::NotFound(format!("session {s} is not on this node"))
                }
            })?;
        if claims.session_id != *session {
            return Err(StreamError::Unauthorized(format!(
                "the token is for session {}, not {session}",
                claims.session_id
            )));
        }
        core.stream_spec(session)
            .ok_or_else(|| StreamError::NotFound(format!("session {session} is not on this node")))
    }

    /// Moves `session` to `state` in the core and tells the broker, if stream `id` is still
    /// the session's stream: a replaced stream's late events change nothing.
    fn report_if_current(&self, session: &SessionId, id: u64, state: SessionState) {
        let update = {
            let mut core = self.core();
            let current = self.live().get(session).is_some_and(|l| l.id == id);
            if !current {
                return;
            }
            core.stream_state(session, state)
        };
        match update {
            Ok(Some(update)) => {
                let _ = self.inner.outbox.send(update);
            }
            Ok(None) => {}
            Err(e) => {
                tracing::debug!(session_id = %session, %state, error = %e, "state not reported")
            }
        }
    }

    /// Ends `session` for `reason` in the core and tells the broker; the core's end stops the
    /// stream.
    fn end(&self, session: &SessionId, reason: EndReason) {
        let update = self.core().end_session(session, reason);
        if let Some(update) = update {
            let _ = self.inner.outbox.send(update);
        }
    }
}

/// The pipeline of a stream of `session`: its frame source, its encoder (NVENC or software,
/// as configured and possible) and its thread. Blocking: call it off the async runtime.
fn build_pipeline(
    options: &StreamOptions,
    session: &SessionId,
    spec: &StreamSpec,
    peer: Arc<Peer>,
    runtime: tokio::runtime::Handle,
    id: u64,
) -> Result<PipelineHandle, StreamError> {
    let internal = |e: &dyn std::fmt::Display| StreamError::Internal(e.to_string());
    let tier = &spec.tier;
    let full = EncoderSettings {
        width: tier.resolution.width,
        height: tier.resolution.height,
        fps: tier.fps.max(1),
        bitrate_kbps: tier.bitrate_kbps,
    };
    // One core encodes 720p in software at about 60 fps at most (and holds about three 720p30
    // streams): software streams run at the configured cap.
    let software = EncoderSettings {
        fps: full.fps.min(options.software_max_fps).max(1),
        ..full
    };
    let choice = options.encoder;
    let nvenc_possible =
        cfg!(feature = "nvenc") && spec.cuda_device.is_some() && choice != EncoderChoice::Software;
    let (settings, encoder) = if nvenc_possible {
        let encoder = encode::open(full, spec.cuda_device, choice).map_err(|e| internal(&e))?;
        if encoder.name() == "nvenc" {
            (full, encoder)
        } else {
            let encoder =
                encode::open(software, None, EncoderChoice::Software).map_err(|e| internal(&e))?;
            (software, encoder)
        }
    } else {
        let encoder = encode::open(software, spec.cuda_device, choice).map_err(|e| internal(&e))?;
        (software, encoder)
    };
    let source: Box<dyn FrameSource> = match (&spec.capture_instance, &options.capture_dir) {
        (Some(instance), Some(dir)) => Box::new(CaptureSource::new(
            capture::socket_path(dir, instance),
            settings.width,
            settings.height,
        )),
        (Some(instance), None) => {
            return Err(StreamError::Internal(format!(
                "game instance {instance} has no capture socket: the agent has no data directory"
            )));
        }
        (None, _) => Box::new(
            SyntheticScene::new(settings.width, settings.height).map_err(|e| internal(&e))?,
        ),
    };
    tracing::info!(
        session_id = %session,
        game = %spec.game,
        source = source.name(),
        encoder = encoder.name(),
        width = settings.width,
        height = settings.height,
        fps = settings.fps,
        "stream pipeline"
    );
    PipelineHandle::start(
        settings,
        source,
        encoder,
        peer,
        runtime,
        format!("stream-{id}-{}", short(session)),
    )
    .map_err(|e| internal(&e))
}

/// A session id short enough for a thread name (15 bytes on Linux).
fn short(session: &SessionId) -> String {
    let s = session.to_string();
    // A session id is ASCII (a UUID), so any byte offset is a character boundary.
    s.get(s.len().saturating_sub(8)..).unwrap_or(&s).to_owned()
}

/// One stream's event loop.
struct StreamTask {
    streams: Streams,
    session: SessionId,
    id: u64,
    peer: Arc<Peer>,
    pipeline: PipelineHandle,
    started: Instant,
    encoder_units: u32,
    /// When the newest input arrived, not yet told to the core (it is, once a second).
    last_input: Option<Timestamp>,
}

impl StreamTask {
    async fn run(
        mut self,
        mut events: mpsc::UnboundedReceiver<PeerEvent>,
        mut inputs: mpsc::Receiver<Bytes>,
        stop: Arc<Notify>,
    ) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut rates = metrics::StreamRates::default();
        let failed = self.pipeline.failure();
        let connect_timeout = self.streams.inner.options.connect_timeout;
        let deadline = tokio::time::sleep(connect_timeout);
        tokio::pin!(deadline);
        let mut connected_once = false;
        loop {
            tokio::select! {
                // A stop comes first: a replaced stream must not act on events queued behind it.
                biased;
                () = stop.notified() => break,
                () = failed.notified() => {
                    tracing::error!(session_id = %self.session, "the stream's pipeline failed; the session ends");
                    self.streams.end(&self.session, EndReason::Error);
                    break;
                }
                () = &mut deadline, if !connected_once => {
                    tracing::info!(session_id = %self.session, timeout = ?connect_timeout, "the player did not connect in time");
                    self.streams.report_if_current(&self.session, self.id, SessionState::Reconnecting);
                    break;
                }
                event = events.recv() => match event {
                    Some(PeerEvent::State(state)) => {
                        connected_once |= state == PeerState::Connected;
                        if !self.on_state(state) {
                            break;
                        }
                    }
                    Some(PeerEvent::KeyframeWanted) => self.pipeline.request_keyframe(),
                    None => break,
                },
                Some(bytes) = inputs.recv() => self.on_input(bytes).await,
                _ = tick.tick() => {
                    if let Some(at) = self.last_input.take() {
                        self.streams.core().input_seen(&self.session, at);
                    }
                    let stats = self.peer.stats().await;
                    rates.record(&self.session, self.pipeline.counters(), &stats, self.encoder_units);
                }
            }
        }
        if let Some(at) = self.last_input.take() {
            self.streams.core().input_seen(&self.session, at);
        }
        drop(self.pipeline);
        self.peer.close().await;
        let mut live = self.streams.live();
        if live.get(&self.session).is_some_and(|l| l.id == self.id) {
            live.remove(&self.session);
        }
        drop(live);
        tracing::info!(session_id = %self.session, stream = self.id, "stream stopped");
    }

    /// Applies a connection state; false when the connection is over.
    fn on_state(&self, state: PeerState) -> bool {
        let set_connected = |on: bool| {
            if let Some(l) = self.streams.live().get_mut(&self.session)
                && l.id == self.id
            {
                l.connected = on;
            }
        };
        match state {
            PeerState::Connecting => true,
            PeerState::Connected => {
                set_connected(true);
                self.pipeline.play(true);
                metrics::stream_connected(self.started.elapsed());
                tracing::info!(session_id = %self.session, after_ms = self.started.elapsed().as_millis(), "player connected");
                self.streams
                    .report_if_current(&self.session, self.id, SessionState::Active);
                true
            }
            // Closed here means the player closed it (a stop of ours ends this loop first).
            PeerState::Disconnected | PeerState::Failed | PeerState::Closed => {
                set_connected(false);
                self.pipeline.play(false);
                tracing::info!(session_id = %self.session, ?state, "player connection lost");
                self.streams
                    .report_if_current(&self.session, self.id, SessionState::Reconnecting);
                // A failed or closed connection does not come back; the player makes a new one.
                state == PeerState::Disconnected
            }
        }
    }

    async fn on_input(&mut self, bytes: Bytes) {
        match InputMessage::decode(&bytes) {
            Ok(msg) => {
                metrics::stream_input(msg.event.name());
                if let Some(pong) = msg.pong() {
                    self.peer.send_input(Bytes::copy_from_slice(&pong)).await;
                }
                if msg.is_activity() {
                    self.last_input = Some(Timestamp::now());
                    self.pipeline.input(msg);
                }
            }
            Err(e) => {
                metrics::stream_input_rejected();
                tracing::debug!(session_id = %self.session, error = %e, "input message dropped");
            }
        }
    }
}
