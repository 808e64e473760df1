//! One player: a webrtc-rs peer connection that receives the video track over WHEP, the way a
//! browser does (recvonly video, RTCP feedback from the default interceptors), and logs every
//! RTP packet's arrival into a [`FrameLog`]. It does not decode: a frame counts when its last
//! packet (the RTP marker) arrives.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use webrtc::api::APIBuilder;
use webrtc::api::interceptor_registry::register_default_interceptors;
use webrtc::api::media_engine::MediaEngine;
use webrtc::api::setting_engine::SettingEngine;
use webrtc::ice::mdns::MulticastDnsMode;
use webrtc::ice::network_type::NetworkType;
use webrtc::interceptor::registry::Registry;
use webrtc::peer_connection::RTCPeerConnection;
use webrtc::peer_connection::configuration::RTCConfiguration;
use webrtc::peer_connection::peer_connection_state::RTCPeerConnectionState;
use webrtc::peer_connection::sdp::session_description::RTCSessionDescription;
use webrtc::rtp_transceiver::RTCRtpTransceiverInit;
use webrtc::rtp_transceiver::rtp_codec::RTPCodecType;
use webrtc::rtp_transceiver::rtp_transceiver_direction::RTCRtpTransceiverDirection;

use super::frames::{FrameLog, FreezeRule, StreamStats};

/// ICE gathering (loopback only) ends within this.
const GATHER_LIMIT: Duration = Duration::from_secs(5);
/// Closing a peer connection ends within this.
const CLOSE_LIMIT: Duration = Duration::from_secs(5);
/// How often the first frame is looked for (the frame's time is taken when it arrives, not
/// when it is looked for).
const POLL: Duration = Duration::from_millis(10);

/// Why a player failed.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {detail}")]
pub(crate) struct PlayerError {
    /// The step that failed.
    what: &'static str,
    /// What webrtc-rs or the wait said.
    detail: String,
}

impl PlayerError {
    fn new(what: &'static str, detail: impl std::fmt::Display) -> Self {
        Self {
            what,
            detail: detail.to_string(),
        }
    }
}

/// A webrtc-rs receiver of one stream.
pub(crate) struct Player {
    pc: Arc<RTCPeerConnection>,
    state: watch::Receiver<RTCPeerConnectionState>,
    log: Arc<Mutex<FrameLog>>,
}

impl Player {
    /// A peer with a recvonly video transceiver whose packets are logged as offsets from
    /// `epoch`, and its SDP offer with every (loopback) candidate gathered.
    pub(crate) async fn new(epoch: Instant) -> Result<(Self, String), PlayerError> {
        let mut media = MediaEngine::default();
        media
            .register_default_codecs()
            .map_err(|e| PlayerError::new("registering codecs", e))?;
        let registry = register_default_interceptors(Registry::new(), &mut media)
            .map_err(|e| PlayerError::new("registering interceptors", e))?;
        let mut settings = SettingEngine::default();
        // Loopback only: the agents offer loopback candidates in dev mode, and no packet of a
        // load test should leave the machine.
        settings.set_include_loopback_candidate(true);
        settings.set_ip_filter(Box::new(|ip| ip.is_loopback()));
        settings.set_network_types(vec![NetworkType::Udp4]);
        settings.set_ice_multicast_dns_mode(MulticastDnsMode::Disabled);
        let api = APIBuilder::new()
            .with_media_engine(media)
            .with_interceptor_registry(registry)
            .with_setting_engine(settings)
            .build();
        let pc = Arc::new(
            api.new_peer_connection(RTCConfiguration::default())
                .await
                .map_err(|e| PlayerError::new("creating the peer connection", e))?,
        );
        let player = Self::wire(Arc::clone(&pc), epoch);
        let offer = async {
            pc.add_transceiver_from_kind(
                RTPCodecType::Video,
                Some(RTCRtpTransceiverInit {
                    direction: RTCRtpTransceiverDirection::Recvonly,
                    send_encodings: Vec::new(),
                }),
            )
            .await
            .map_err(|e| PlayerError::new("adding the video transceiver", e))?;
            let offer = pc
                .create_offer(None)
                .await
                .map_err(|e| PlayerError::new("creating the offer", e))?;
            let mut gathered = pc.gathering_complete_promise().await;
            pc.set_local_description(offer)
                .await
                .map_err(|e| PlayerError::new("setting the offer", e))?;
            tokio::time::timeout(GATHER_LIMIT, gathered.recv())
                .await
                .map_err(|_| {
                    PlayerError::new(
                        "gathering ICE candidates",
                        format!("not done within {} s", GATHER_LIMIT.as_secs()),
                    )
                })?;
            pc.local_description()
                .await
                .map(|d| d.sdp)
                .ok_or_else(|| PlayerError::new("the offer", "no local description"))
        }
        .await;
        match offer {
            Ok(sdp) => Ok((player, sdp)),
            Err(e) => {
                player.close().await;
                Err(e)
            }
        }
    }

    /// The player around `pc`: its state watched, its video track's packets logged.
    fn wire(pc: Arc<RTCPeerConnection>, epoch: Instant) -> Self {
        let (state_tx, state) = watch::channel(RTCPeerConnectionState::New);
        pc.on_peer_connection_state_change(Box::new(move |s| {
            let _ = state_tx.send(s);
            Box::pin(async {})
        }));
        let log = Arc::new(Mutex::new(FrameLog::new()));
        let sink = Arc::clone(&log);
        pc.on_track(Box::new(move |track, _, _| {
            if track.kind() == RTPCodecType::Video {
                let sink = Arc::clone(&sink);
                // Ends when the track does: the peer connection closed.
                tokio::spawn(async move {
                    while let Ok((packet, _)) = track.read_rtp().await {
                        let at = epoch.elapsed();
                        sink.lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .handle_packet(at, packet.header.timestamp, packet.header.marker);
                    }
                });
            }
            Box::pin(async {})
        }));
        Self { pc, state, log }
    }

    /// Takes the agent's SDP answer.
    pub(crate) async fn accept(&self, answer: String) -> Result<(), PlayerError> {
        let answer = RTCSessionDescription::answer(answer)
            .map_err(|e| PlayerError::new("reading the answer", e))?;
        self.pc
            .set_remote_description(answer)
            .await
            .map_err(|e| PlayerError::new("setting the answer", e))
    }

    /// Waits until the first frame is complete, the connection fails, or `deadline`; the
    /// first frame's time (from the epoch).
    pub(crate) async fn first_frame(&self, deadline: Instant) -> Result<Duration, PlayerError> {
        loop {
            if let Some(t) = self.with_log(FrameLog::first_frame) {
                return Ok(t);
            }
            let state = *self.state.borrow();
            if matches!(
                state,
                RTCPeerConnectionState::Failed | RTCPeerConnectionState::Closed
            ) {
                return Err(PlayerError::new(
                    "waiting for the first frame",
                    format!("the peer connection is {state}"),
                ));
            }
            if Instant::now() >= deadline {
                let packets = self.with_log(FrameLog::packets);
                return Err(PlayerError::new(
                    "waiting for the first frame",
                    format!(
                        "none within the connect limit (connection {state}, {packets} RTP packets)"
                    ),
                ));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// The stream's figures over `start..end` (offsets from the epoch).
    pub(crate) fn stats(&self, start: Duration, end: Duration, rule: FreezeRule) -> StreamStats {
        self.with_log(|log| log.stats(start, end, rule))
    }

    /// Hangs up (bounded; a peer that does not close in time is dropped anyway).
    pub(crate) async fn close(&self) {
        let _ = tokio::time::timeout(CLOSE_LIMIT, self.pc.close()).await;
    }

    fn with_log<T>(&self, f: impl FnOnce(&FrameLog) -> T) -> T {
        // A reader that panicked leaves a log that is still whole: every update is one push.
        f(&self.log.lock().unwrap_or_else(PoisonError::into_inner))
    }
}
