//! Every use of the `webrtc` crate (webrtc-rs 0.17, the classic `RTCPeerConnection` API) is in
//! this module, behind [`RtcEngine`] and [`Peer`]: moving to another WebRTC stack (webrtc-rs
//! 0.2x, str0m) replaces this file and nothing else.
//!
//! A peer is the agent's half of one player's connection: the answering side of a WHEP offer,
//! one H.264 video track it sends, and the `input` data channel the player opens. What happens
//! on the connection comes out as [`PeerEvent`]s on a channel; the caller decides what they
//! mean for the session.

use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use tokio::sync::mpsc;
use webrtc::api::API;
use webrtc::api::APIBuilder;
use webrtc::api::interceptor_registry::register_default_interceptors;
use webrtc::api::media_engine::{MIME_TYPE_H264, MediaEngine};
use webrtc::api::setting_engine::SettingEngine;
use webrtc::data_channel::RTCDataChannel;
use webrtc::data_channel::data_channel_message::DataChannelMessage;
use webrtc::ice::udp_network::{EphemeralUDP, UDPNetwork};
use webrtc::ice_transport::ice_candidate::RTCIceCandidateInit;
use webrtc::ice_transport::ice_candidate_type::RTCIceCandidateType;
use webrtc::interceptor::registry::Registry;
use webrtc::media::Sample;
use webrtc::peer_connection::RTCPeerConnection;
use webrtc::peer_connection::configuration::RTCConfiguration;
use webrtc::peer_connection::peer_connection_state::RTCPeerConnectionState;
use webrtc::peer_connection::sdp::session_description::RTCSessionDescription;
use webrtc::rtcp::payload_feedbacks::full_intra_request::FullIntraRequest;
use webrtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication;
use webrtc::rtp_transceiver::RTCPFeedback;
use webrtc::rtp_transceiver::rtp_codec::{
    RTCRtpCodecCapability, RTCRtpCodecParameters, RTPCodecType,
};
use webrtc::stats::StatsReportType;
use webrtc::track::track_local::TrackLocal;
use webrtc::track::track_local::track_local_static_sample::TrackLocalStaticSample;

/// The label of the data channel that carries player input.
pub const INPUT_CHANNEL: &str = "input";

/// The H.264 format the agent sends: Constrained Baseline, fragmented NAL units.
const H264_FMTP: &str = "level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42e01f";

/// How peers reach players.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RtcOptions {
    /// Offer loopback candidates too. Off in production (ICE forbids them); on in dev mode and
    /// tests, where the player runs on the same host, possibly with nothing but loopback.
    pub loopback_candidates: bool,
    /// Addresses players reach this host at when they differ from the interfaces' (a host
    /// behind 1:1 NAT); offered as host candidates instead of the local ones.
    pub public_ips: Vec<IpAddr>,
    /// The UDP ports media may use (inclusive), for firewalls; any free port when absent.
    pub udp_ports: Option<(u16, u16)>,
}

/// Why a peer could not be set up or used.
#[derive(Debug, thiserror::Error)]
pub enum RtcError {
    /// The offer is not usable SDP.
    #[error("the offer is not a usable SDP offer: {0}")]
    BadOffer(String),
    /// The offer asks for no video.
    #[error("the offer has no video section (add a recvonly video transceiver)")]
    NoVideo,
    /// A trickled candidate fragment is not usable.
    #[error("the ICE fragment is not usable: {0}")]
    BadCandidate(String),
    /// The configuration cannot be used.
    #[error("WebRTC settings: {0}")]
    Config(String),
    /// The WebRTC stack failed.
    #[error("WebRTC: {0}")]
    Stack(String),
}

/// The connection's state, as the W3C `RTCPeerConnectionState` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerState {
    /// ICE and DTLS are being negotiated.
    Connecting,
    /// Media flows.
    Connected,
    /// The connection dropped; it may come back by itself.
    Disconnected,
    /// The connection is lost.
    Failed,
    /// The connection was closed.
    Closed,
}

/// What happened on a peer (input messages come on a channel of their own, bounded).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerEvent {
    /// The connection changed state.
    State(PeerState),
    /// The player lost a picture (PLI) or asked for a full one (FIR): send a key frame.
    KeyframeWanted,
}

/// Transport figures of a peer, from its RTCP receiver reports and ICE.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PeerStats {
    /// Video bytes sent.
    pub bytes_sent: u64,
    /// Video packets sent.
    pub packets_sent: u64,
    /// Packets the player reported lost, in all.
    pub packets_lost: i64,
    /// The fraction lost in the player's latest report.
    pub fraction_lost: f64,
    /// Round-trip time, seconds: from the player's receiver reports, else from ICE.
    pub rtt_s: Option<f64>,
}

/// Builds peers. One per agent: it holds the codecs, interceptors and network settings.
pub struct RtcEngine {
    api: API,
}

impl std::fmt::Debug for RtcEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RtcEngine").finish_non_exhaustive()
    }
}

impl RtcEngine {
    /// An engine for `options`.
    pub fn new(options: &RtcOptions) -> Result<Self, RtcError> {
        let mut media = MediaEngine::default();
        // H.264 only: with the default list VP8 comes first, and a track bound to it would
        // carry H.264 labelled as VP8, which browsers cannot decode.
        let feedback = vec![
            RTCPFeedback {
                typ: "goog-remb".into(),
                parameter: String::new(),
            },
            RTCPFeedback {
                typ: "ccm".into(),
                parameter: "fir".into(),
            },
            RTCPFeedback {
                typ: "nack".into(),
                parameter: String::new(),
            },
            RTCPFeedback {
                typ: "nack".into(),
                parameter: "pli".into(),
            },
        ];
        for (payload_type, fmtp) in [
            (102, H264_FMTP),
            (
                125,
                "level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42001f",
            ),
        ] {
            media
                .register_codec(
                    RTCRtpCodecParameters {
                        capability: RTCRtpCodecCapability {
                            mime_type: MIME_TYPE_H264.to_owned(),
                            clock_rate: 90_000,
                            channels: 0,
                            sdp_fmtp_line: fmtp.to_owned(),
                            rtcp_feedback: feedback.clone(),
                        },
                        payload_type,
                        ..Default::default()
                    },
                    RTPCodecType::Video,
                )
                .map_err(stack)?;
        }
        let registry = register_default_interceptors(Registry::new(), &mut media).map_err(stack)?;
        let mut settings = SettingEngine::default();
        settings.set_include_loopback_candidate(options.loopback_candidates);
        if !options.public_ips.is_empty() {
            settings.set_nat_1to1_ips(
                options.public_ips.iter().map(ToString::to_string).collect(),
                RTCIceCandidateType::Host,
            );
        }
        if let Some((min, max)) = options.udp_ports {
            let ports = EphemeralUDP::new(min, max)
                .map_err(|e| RtcError::Config(format!("udp ports {min}-{max}: {e}")))?;
            settings.set_udp_network(UDPNetwork::Ephemeral(ports));
        }
        let api = APIBuilder::new()
            .with_media_engine(media)
            .with_interceptor_registry(registry)
            .with_setting_engine(settings)
            .build();
        Ok(Self { api })
    }

    /// Answers a player's `offer`: a peer that will send video and take input, and the SDP
    /// answer with all of this host's candidates (gathering host candidates takes
    /// milliseconds, so the answer waits for it). Events go to `events`.
    pub async fn answer(
        &self,
        offer: &str,
        events: mpsc::UnboundedSender<PeerEvent>,
        inputs: mpsc::Sender<Bytes>,
    ) -> Result<(Peer, String), RtcError> {
        if !offer.lines().any(|l| l.starts_with("m=video")) {
            return Err(RtcError::NoVideo);
        }
        let offer = RTCSessionDescription::offer(offer.to_owned())
            .map_err(|e| RtcError::BadOffer(e.to_string()))?;
        let pc = Arc::new(
            self.api
                .new_peer_connection(RTCConfiguration::default())
                .await
                .map_err(stack)?,
        );
        let peer = Peer {
            track: Arc::new(TrackLocalStaticSample::new(
                RTCRtpCodecCapability {
                    mime_type: MIME_TYPE_H264.to_owned(),
                    clock_rate: 90_000,
                    channels: 0,
                    sdp_fmtp_line: H264_FMTP.to_owned(),
                    rtcp_feedback: Vec::new(),
                },
                "video".into(),
                "framecast".into(),
            )),
            input: Arc::new(Mutex::new(None)),
            pc,
        };
        match peer.negotiate(offer, events, inputs).await {
            Ok(answer) => Ok((peer, answer)),
            Err(e) => {
                peer.close().await;
                Err(e)
            }
        }
    }
}

/// The agent's side of one player's connection. Dropping it closes the connection (in a
/// task of its own); [`Peer::close`] closes it and waits.
pub struct Peer {
    pc: Arc<RTCPeerConnection>,
    track: Arc<TrackLocalStaticSample>,
    input: Arc<Mutex<Option<Arc<RTCDataChannel>>>>,
}

impl Drop for Peer {
    fn drop(&mut self) {
        // An offer whose HTTP request was cancelled half-way must not leave its connection,
        // sockets and tasks behind. Closing a closed connection does nothing.
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let pc = Arc::clone(&self.pc);
            runtime.spawn(async move {
                let _ = pc.close().await;
            });
        }
    }
}

impl std::fmt::Debug for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peer").finish_non_exhaustive()
    }
}

impl Peer {
    async fn negotiate(
        &self,
        offer: RTCSessionDescription,
        events: mpsc::UnboundedSender<PeerEvent>,
        inputs: mpsc::Sender<Bytes>,
    ) -> Result<String, RtcError> {
        let sender = self
            .pc
            .add_track(Arc::clone(&self.track) as Arc<dyn TrackLocal + Send + Sync>)
            .await
            .map_err(stack)?;
        // RTCP from the player: picture loss and full-picture requests ask for a key frame.
        // The loop ends when the connection closes.
        let rtcp_events = events.clone();
        tokio::spawn(async move {
            while let Ok((packets, _)) = sender.read_rtcp().await {
                let wants_key = packets.iter().any(|p| {
                    let any = p.as_any();
                    any.is::<PictureLossIndication>() || any.is::<FullIntraRequest>()
                });
                if wants_key && rtcp_events.send(PeerEvent::KeyframeWanted).is_err() {
                    break;
                }
            }
        });
        let state_events = events.clone();
        self.pc
            .on_peer_connection_state_change(Box::new(move |s: RTCPeerConnectionState| {
                let state = match s {
                    RTCPeerConnectionState::Connected => Some(PeerState::Connected),
                    RTCPeerConnectionState::Disconnected => Some(PeerState::Disconnected),
                    RTCPeerConnectionState::Failed => Some(PeerState::Failed),
                    RTCPeerConnectionState::Closed => Some(PeerState::Closed),
                    RTCPeerConnectionState::Connecting => Some(PeerState::Connecting),
                    RTCPeerConnectionState::New | RTCPeerConnectionState::Unspecified => None,
                };
                if let Some(state) = state {
                    let _ = state_events.send(PeerEvent::State(state));
                }
                Box::pin(async {})
            }));
        let input = Arc::clone(&self.input);
        self.pc
            .on_data_channel(Box::new(move |dc: Arc<RTCDataChannel>| {
                if dc.label() == INPUT_CHANNEL {
                    let inputs = inputs.clone();
                    dc.on_message(Box::new(move |msg: DataChannelMessage| {
                        // A player who sends faster than the stream takes input loses the
                        // excess rather than growing a queue.
                        if let Err(mpsc::error::TrySendError::Full(_)) = inputs.try_send(msg.data) {
                            crate::metrics::stream_input_rejected();
                        }
                        Box::pin(async {})
                    }));
                    *input.lock().unwrap_or_else(PoisonError::into_inner) = Some(dc);
                }
                Box::pin(async {})
            }));
        self.pc
            .set_remote_description(offer)
            .await
            .map_err(|e| RtcError::BadOffer(e.to_string()))?;
        let answer = self.pc.create_answer(None).await.map_err(stack)?;
        let mut gathered = self.pc.gathering_complete_promise().await;
        self.pc.set_local_description(answer).await.map_err(stack)?;
        let _ = gathered.recv().await;
        let local = self
            .pc
            .local_description()
            .await
            .ok_or_else(|| RtcError::Stack("no local description after the answer".into()))?;
        Ok(local.sdp)
    }

    /// Sends one encoded picture (an H.264 access unit, Annex-B) that is shown for
    /// `duration`. Before the connection is up, pictures go nowhere.
    pub async fn send_video(&self, access_unit: Bytes, duration: Duration) -> Result<(), RtcError> {
        self.track
            .write_sample(&Sample {
                data: access_unit,
                timestamp: SystemTime::now(),
                duration,
                ..Default::default()
            })
            .await
            .map_err(stack)
    }

    /// Sends `message` to the player on the input channel (a pong); dropped while the channel
    /// is not open.
    pub async fn send_input(&self, message: Bytes) {
        let dc = self
            .input
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        if let Some(dc) = dc {
            let _ = dc.send(&message).await;
        }
    }

    /// Adds the player's trickled candidates from an RFC 8840 `application/trickle-ice-sdpfrag`
    /// body; returns how many it added.
    pub async fn add_candidates(&self, fragment: &str) -> Result<usize, RtcError> {
        let mut mid = None;
        let mut ufrag = None;
        let mut candidates = Vec::new();
        for line in fragment.lines().map(str::trim) {
            if let Some(v) = line.strip_prefix("a=mid:") {
                mid = Some(v.to_owned());
            } else if let Some(v) = line.strip_prefix("a=ice-ufrag:") {
                ufrag = Some(v.to_owned());
            } else if let Some(c) = line.strip_prefix("a=") {
                if c.starts_with("candidate:") {
                    candidates.push((c.to_owned(), mid.clone()));
                }
            } else if !line.is_empty() && !line.starts_with("m=") {
                return Err(RtcError::BadCandidate(format!(
                    "unexpected line {line:?} (an sdpfrag holds a=... and m=... lines)"
                )));
            }
        }
        let n = candidates.len();
        for (candidate, mid) in candidates {
            self.pc
                .add_ice_candidate(RTCIceCandidateInit {
                    candidate,
                    sdp_mid: mid.or_else(|| Some("0".into())),
                    sdp_mline_index: None,
                    username_fragment: ufrag.clone(),
                })
                .await
                .map_err(|e| RtcError::BadCandidate(e.to_string()))?;
        }
        Ok(n)
    }

    /// Transport figures now.
    pub async fn stats(&self) -> PeerStats {
        let report = self.pc.get_stats().await;
        let mut out = PeerStats::default();
        let mut ice_rtt = None;
        for r in report.reports.values() {
            match r {
                StatsReportType::OutboundRTP(s) if s.kind == "video" => {
                    out.bytes_sent = s.bytes_sent;
                    out.packets_sent = s.packets_sent;
                }
                StatsReportType::RemoteInboundRTP(s) if s.kind == "video" => {
                    out.packets_lost = s.packets_lost;
                    out.fraction_lost = s.fraction_lost;
                    out.rtt_s = s.round_trip_time;
                }
                StatsReportType::CandidatePair(p) if p.nominated => {
                    ice_rtt = Some(p.current_round_trip_time);
                }
                _ => {}
            }
        }
        out.rtt_s = out.rtt_s.or(ice_rtt);
        out
    }

    /// Closes the connection; the player sees it end.
    pub async fn close(&self) {
        if let Err(e) = self.pc.close().await {
            tracing::debug!(error = %e, "closing a peer connection");
        }
    }
}

fn stack(e: impl std::fmt::Display) -> RtcError {
    RtcError::Stack(e.to_string())
}
