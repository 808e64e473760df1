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
}

impl Default for StreamOptions {
    fn default() -> Self {
        Self {
            rtc: RtcOptions::default(),
            software_max_fps: 30,
            capture_dir: None,
            encoder: EncoderChoice::Auto,
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
    /// The node failed.
    #[error("{0}")]
    Internal(String),
}

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
            }),
        })
    }

    /// Streams running now.
    pub fn live_count(&self) -> usize {
        self.live().len()
    }

    /// Answers a player's WHEP offer for `session`, authenticated by `token`.
    pub async fn offer(
        &self,
        session: SessionId,
        token: &str,
        offer: &str,
    ) -> Result<Answer, StreamError> {
        let spec = self.authorize(&session, token)?;
        if self.live().get(&session).is_some_and(|l| l.connected) {
            return Err(StreamError::Conflict(format!(
                "session {session} is connected already; DELETE its stream first"
            )));
        }
        let started = Instant::now();
        let (events_tx, events) = mpsc::unbounded_channel();
        let (peer, sdp) =
            self.inner
                .engine
                .answer(offer, events_tx)
                .await
                .map_err(|e| match e {
                    RtcError::BadOffer(_) | RtcError::NoVideo | RtcError::BadCandidate(_) => {
                        StreamError::BadRequest(e.to_string())
                    }
                    RtcError::Config(_) | RtcError::Stack(_) => {
                        StreamError::Internal(e.to_string())
                    }
                })?;
        let peer = Arc::new(peer);
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let stop = Arc::new(Notify::new());
        let replaced = {
            let mut live = self.live();
            if live.get(&session).is_some_and(|l| l.connected) {
                Err(())
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
        let Ok(replaced) = replaced else {
            peer.close().await;
            return Err(StreamError::Conflict(format!(
                "session {session} connected meanwhile"
            )));
        };
        if let Some(old) = replaced {
            // The player came back while its old connection was still going down.
            old.stop.notify_one();
        }
        if spec.state == SessionState::Reserved {
            self.report(&session, SessionState::Connecting);
        }
        let pipeline = self.pipeline(&session, &spec, &peer)?;
        let span =
            tracing::info_span!("stream", session_id = %session, stream = id, gpu = %spec.gpu);
        let task = StreamTask {
            streams: self.clone(),
            session,
            id,
            peer,
            pipeline,
            started,
            encoder_units: spec.tier.encoder_cost.milli(),
        };
        tokio::spawn(tracing::Instrument::instrument(
            task.run(events, stop),
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
        let update = self
            .inner
            .core
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .end_session(&session, EndReason::Released);
        // Ending the session in the core stops the stream (see `stop_ended`).
        if let Some(update) = update {
            let _ = self.inner.outbox.send(update);
        }
        self.stop(&session);
        Ok(())
    }

    /// Stops the streams of sessions that end, as the core reports them on `ended`, until the
    /// channel closes.
    pub async fn stop_ended(self, mut ended: mpsc::UnboundedReceiver<SessionId>) {
        while let Some(session) = ended.recv().await {
            self.stop(&session);
        }
    }

    /// Stops every stream (the agent is shutting down).
    pub async fn stop_all(&self) {
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

    /// Moves `session` to `state` in the core and tells the broker.
    fn report(&self, session: &SessionId, state: SessionState) {
        let update = self.core().stream_state(session, state);
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

    fn pipeline(
        &self,
        session: &SessionId,
        spec: &StreamSpec,
        peer: &Arc<Peer>,
    ) -> Result<PipelineHandle, StreamError> {
        let tier = &spec.tier;
        let full = EncoderSettings {
            width: tier.resolution.width,
            height: tier.resolution.height,
            fps: tier.fps.max(1),
            bitrate_kbps: tier.bitrate_kbps,
        };
        // One core encodes 720p in software at about 60 fps at most: software streams run at
        // the configured cap.
        let software = EncoderSettings {
            fps: full.fps.min(self.inner.options.software_max_fps).max(1),
            ..full
        };
        let choice = self.inner.options.encoder;
        let nvenc_possible = cfg!(feature = "nvenc")
            && spec.cuda_device.is_some()
            && choice != EncoderChoice::Software;
        let (settings, encoder) = if nvenc_possible {
            let encoder = encode::open(full, spec.cuda_device, choice)
                .map_err(|e| StreamError::Internal(e.to_string()))?;
            if encoder.name() == "nvenc" {
                (full, encoder)
            } else {
                (
                    software,
                    encode::open(software, None, EncoderChoice::Software)
                        .map_err(|e| StreamError::Internal(e.to_string()))?,
                )
            }
        } else {
            let encoder = encode::open(software, spec.cuda_device, choice)
                .map_err(|e| StreamError::Internal(e.to_string()))?;
            (software, encoder)
        };
        let internal = |e: &dyn std::fmt::Display| StreamError::Internal(e.to_string());
        let capture_dir = &self.inner.options.capture_dir;
        let source: Box<dyn FrameSource> = match (&spec.capture_instance, capture_dir) {
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
            Arc::clone(peer),
            tokio::runtime::Handle::current(),
            format!("stream-{}", short(session)),
        )
        .map_err(|e| internal(&e))
    }
}

/// A session id short enough for a thread name (15 bytes on Linux).
fn short(session: &SessionId) -> String {
    let s = session.to_string();
    s.chars()
        .rev()
        .take(8)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect()
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
}

impl StreamTask {
    async fn run(self, mut events: mpsc::UnboundedReceiver<PeerEvent>, stop: Arc<Notify>) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut rates = metrics::StreamRates::default();
        loop {
            tokio::select! {
                event = events.recv() => match event {
                    Some(PeerEvent::State(state)) => {
                        if !self.on_state(state) {
                            break;
                        }
                    }
                    Some(PeerEvent::KeyframeWanted) => self.pipeline.request_keyframe(),
                    Some(PeerEvent::Input(bytes)) => self.on_input(bytes).await,
                    None => break,
                },
                () = stop.notified() => break,
                _ = tick.tick() => {
                    let stats = self.peer.stats().await;
                    rates.record(&self.session, self.pipeline.counters(), &stats, self.encoder_units);
                }
            }
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
                self.streams.report(&self.session, SessionState::Active);
                true
            }
            // Closed here means the player closed it (a stop of ours ends this loop first).
            PeerState::Disconnected | PeerState::Failed | PeerState::Closed => {
                set_connected(false);
                self.pipeline.play(false);
                tracing::info!(session_id = %self.session, ?state, "player connection lost");
                self.streams
                    .report(&self.session, SessionState::Reconnecting);
                // A failed or closed connection does not come back; the player makes a new one.
                state == PeerState::Disconnected
            }
        }
    }

    async fn on_input(&self, bytes: Bytes) {
        match InputMessage::decode(&bytes) {
            Ok(msg) => {
                metrics::stream_input(msg.event.name());
                if let Some(pong) = msg.pong() {
                    self.peer.send_input(Bytes::copy_from_slice(&pong)).await;
                }
                if msg.is_activity() {
                    self.streams
                        .core()
                        .input_seen(&self.session, Timestamp::now());
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
