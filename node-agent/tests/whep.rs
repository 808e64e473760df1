//! The WHEP endpoint over real HTTP, with a real WebRTC client (webrtc-rs): an agent on
//! simulated GPUs, welcomed by a test control endpoint that signs the session tokens, streams
//! H.264 to the client, takes its input, reports `connecting` → `active` → `reconnecting` →
//! `active`, and refuses every bad request with the status the protocol names.

// In a test, a failed unwrap is a failed test.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, watch};
use tokio::time::timeout;
use webrtc::api::APIBuilder;
use webrtc::api::interceptor_registry::register_default_interceptors;
use webrtc::api::media_engine::MediaEngine;
use webrtc::api::setting_engine::SettingEngine;
use webrtc::data_channel::RTCDataChannel;
use webrtc::data_channel::data_channel_init::RTCDataChannelInit;
use webrtc::interceptor::registry::Registry;
use webrtc::peer_connection::RTCPeerConnection;
use webrtc::peer_connection::configuration::RTCConfiguration;
use webrtc::peer_connection::peer_connection_state::RTCPeerConnectionState;
use webrtc::peer_connection::sdp::session_description::RTCSessionDescription;
use webrtc::rtp_transceiver::RTCRtpTransceiverInit;
use webrtc::rtp_transceiver::rtp_codec::RTPCodecType;
use webrtc::rtp_transceiver::rtp_transceiver_direction::RTCRtpTransceiverDirection;

use framecast_agent::link::frames::{read_message, write_message};
use framecast_agent::stream::input::{InputEvent, InputMessage};
use framecast_shared::config::TlsConfig;
use framecast_shared::config::agent::{
    AgentConfig, AgentGameConfig, InventorySource, VgpuBackendKind,
};
use framecast_shared::ids::{GameId, GpuId, NodeId, RegionName, SessionId, TierName};
use framecast_shared::protocol::{
    DEFAULT_MAX_FRAME, Message, PROTOCOL_VERSION, Release, Reserve, SessionInput, Welcome,
};
use framecast_shared::state::{EndReason, SessionState};
use framecast_shared::time::Timestamp;
use framecast_shared::token::{Claims, TokenSigner};
use framecast_shared::units::{ComputeShare, EncoderUnits, Megabytes};

use common::{accept, pki, test_broker};

const LIMIT: Duration = Duration::from_secs(20);

/// An agent run in-process, welcomed by a test broker that signs tokens.
struct Node {
    whep: SocketAddr,
    signer: TokenSigner,
    /// To the agent.
    send: quinn::SendStream,
    /// Session updates and heartbeat inputs from the agent.
    updates: mpsc::UnboundedReceiver<(SessionId, SessionState)>,
    inputs: Arc<Mutex<Vec<SessionInput>>>,
    stop: watch::Sender<bool>,
    _conn: quinn::Connection,
    _dir: tempfile::TempDir,
}

impl Node {
    async fn start() -> Self {
        Self::start_with(Vec::new(), |_| {}).await
    }

    /// A node whose catalogue is `games` (empty: every game is the synthetic one), its
    /// configuration changed by `tune`.
    async fn start_with(games: Vec<AgentGameConfig>, tune: fn(&mut AgentConfig)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let pki = pki();
        let (endpoint, broker) = test_broker(&pki);
        for (name, text) in [
            ("ca.pem", &pki.ca.cert.cert_pem),
            ("agent.pem", &pki.agent.cert_pem),
            ("agent.key", &pki.agent.key_pem),
        ] {
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        std::fs::write(
            dir.path().join("gpus.toml"),
            "[[gpus]]\nmodel = \"l4\"\ncount = 1\n",
        )
        .unwrap();
        let mut config = AgentConfig {
            node_id: Some(NodeId::new("gpu-host-1").unwrap()),
            region: RegionName::new("eu").unwrap(),
            data_dir: dir.path().join("data"),
            ..AgentConfig::default()
        };
        config.broker.address = broker.to_string();
        config.broker.server_name = "localhost".into();
        config.broker.tls = Some(TlsConfig {
            ca_cert: dir.path().join("ca.pem"),
            cert: dir.path().join("agent.pem"),
            key: dir.path().join("agent.key"),
        });
        config.inventory.source = InventorySource::Simulated;
        config.inventory.simulate = Some(dir.path().join("gpus.toml"));
        config.vgpu.backend = VgpuBackendKind::Simulated;
        config.http.listen = "127.0.0.1:0".parse().unwrap();
        config.whep.listen = "127.0.0.1:0".parse().unwrap();
        config.whep.loopback_candidates = true;
        config.games = games;
        tune(&mut config);
        // Small pictures keep the debug build's encoder quick.
        let (stop, stop_rx) = watch::channel(false);
        tokio::spawn(framecast_agent::run::run_until(config, None, stop_rx));

        let (conn, mut send, mut recv, hello) = timeout(LIMIT, accept(&endpoint)).await.unwrap();
        let whep: SocketAddr = hello
            .whep_url
            .as_deref()
            .and_then(|u| u.strip_prefix("http://"))
            .expect("the hello names the WHEP endpoint")
            .parse()
            .unwrap();
        assert_ne!(whep.port(), 0, "the hello reports the port bound");
        let signer = TokenSigner::generate().unwrap();
        let mut tiers = framecast_shared::tier::TierPreset::defaults();
        // A small tier, so the debug build's software encoder keeps up.
        tiers[0].resolution.width = 320;
        tiers[0].resolution.height = 180;
        write_message(
            &mut send,
            &Message::Welcome(Welcome {
                protocol_version: PROTOCOL_VERSION,
                broker_version: "test".into(),
                region: RegionName::new("eu").unwrap(),
                generation: hello.generation,
                heartbeat_interval_ms: 100,
                token_public_key: signer.public_key().to_vec(),
                tiers,
            }),
            DEFAULT_MAX_FRAME,
        )
        .await
        .unwrap();
        let (updates_tx, updates) = mpsc::unbounded_channel();
        let inputs = Arc::new(Mutex::new(Vec::new()));
        let seen_inputs = Arc::clone(&inputs);
        tokio::spawn(async move {
            while let Ok(Some(m)) = read_message(&mut recv, DEFAULT_MAX_FRAME).await {
                match m {
                    Message::SessionUpdate(u) => {
                        let _ = updates_tx.send((u.session_id, u.state));
                    }
                    Message::Heartbeat(h) => {
                        seen_inputs.lock().unwrap().extend(h.inputs);
                    }
                    _ => {}
                }
            }
        });
        Self {
            whep,
            signer,
            send,
            updates,
            inputs,
            stop,
            _conn: conn,
            _dir: dir,
        }
    }

    /// Places session `n` on the node and returns its id and a token for it.
    async fn reserve(&mut self, n: u128) -> (SessionId, String) {
        self.reserve_game(n, "arena").await
    }

    /// Places session `n` of `game` on the node and returns its id and a token for it.
    async fn reserve_game(&mut self, n: u128, game: &str) -> (SessionId, String) {
        let now = Timestamp::now();
        let session = SessionId::new(now, n);
        write_message(
            &mut self.send,
            &Message::Reserve(Reserve {
                request_id: u64::try_from(n).unwrap(),
                session_id: session,
                game: GameId::new(game).unwrap(),
                tier: TierName::new("720p").unwrap(),
                gpu: GpuId::new("sim-0").unwrap(),
                slot: u32::try_from(n).unwrap(),
                framebuffer: Megabytes::new(2048),
                compute_share: ComputeShare::MIN,
                encoder: EncoderUnits::from_milli(100),
                expires_at: now.saturating_add(Duration::from_secs(60)),
            }),
            DEFAULT_MAX_FRAME,
        )
        .await
        .unwrap();
        let token = self.token(session, "gpu-host-1", Duration::from_secs(600));
        // The reservation is applied once the agent takes a token for it: then a body that is
        // no offer gets 400 instead of 404 (or 503 before the welcome).
        for _ in 0..200 {
            let (status, _, _) = self
                .post(session, Some(&token), "application/sdp", "x")
                .await;
            if status == 400 {
                return (session, token);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("the agent never took the reservation");
    }

    fn token(&self, session: SessionId, node: &str, valid: Duration) -> String {
        let now = Timestamp::now();
        self.signer.sign(&Claims {
            session_id: session,
            node_id: NodeId::new(node).unwrap(),
            issued_at: now,
            expires_at: now.saturating_add(valid),
        })
    }

    async fn post(
        &self,
        session: SessionId,
        token: Option<&str>,
        content_type: &str,
        body: &str,
    ) -> (u16, String, String) {
        let mut headers = vec![("content-type", content_type.to_owned())];
        if let Some(t) = token {
            headers.push(("authorization", format!("Bearer {t}")));
        }
        http(
            self.whep,
            "POST",
            &format!("/whep/sessions/{session}"),
            &headers,
            body,
        )
        .await
    }

    /// A player that offers for `session` with `token` and is connected.
    async fn connected_player(&self, session: SessionId, token: &str) -> Player {
        let (mut player, offer) = Player::new().await;
        let (status, _, answer) = self
            .post(session, Some(token), "application/sdp", &offer)
            .await;
        assert_eq!(status, 201, "{answer}");
        player.accept(answer).await;
        player.wait_for(RTCPeerConnectionState::Connected).await;
        player
    }

    async fn next_update(&mut self, session: SessionId) -> SessionState {
        loop {
            let (s, state) = timeout(LIMIT, self.updates.recv())
                .await
                .expect("a session update")
                .unwrap();
            if s == session {
                return state;
            }
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// One HTTP/1.1 request; returns the status, the headers (lower-cased) and the body.
async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, String)],
    body: &str,
) -> (u16, String, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nhost: test\r\nconnection: close\r\ncontent-length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let status = out.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    (status, head.to_ascii_lowercase(), body.to_owned())
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines()
        .find_map(|l| l.strip_prefix(&format!("{name}: ")))
        .map(str::trim)
}

/// A player: a webrtc-rs peer with the default codec list (VP8 first, as browsers order
/// theirs), a recvonly video transceiver and the input channel.
struct Player {
    pc: Arc<RTCPeerConnection>,
    input: Arc<RTCDataChannel>,
    state: watch::Receiver<RTCPeerConnectionState>,
    packets: Arc<AtomicU64>,
    codec: Arc<Mutex<Option<String>>>,
    pongs: mpsc::UnboundedReceiver<Bytes>,
    /// Every video RTP packet received.
    rtp: mpsc::UnboundedReceiver<webrtc::rtp::packet::Packet>,
}

impl Player {
    async fn new() -> (Self, String) {
        let mut media = MediaEngine::default();
        media.register_default_codecs().unwrap();
        let registry = register_default_interceptors(Registry::new(), &mut media).unwrap();
        let mut settings = SettingEngine::default();
        settings.set_include_loopback_candidate(true);
        let api = APIBuilder::new()
            .with_media_engine(media)
            .with_interceptor_registry(registry)
            .with_setting_engine(settings)
            .build();
        let pc = Arc::new(
            api.new_peer_connection(RTCConfiguration::default())
                .await
                .unwrap(),
        );
        pc.add_transceiver_from_kind(
            RTPCodecType::Video,
            Some(RTCRtpTransceiverInit {
                direction: RTCRtpTransceiverDirection::Recvonly,
                send_encodings: Vec::new(),
            }),
        )
        .await
        .unwrap();
        let input = pc
            .create_data_channel(
                "input",
                Some(RTCDataChannelInit {
                    ordered: Some(false),
                    max_retransmits: Some(0),
                    ..Default::default()
                }),
            )
            .await
            .unwrap();
        let (pong_tx, pongs) = mpsc::unbounded_channel();
        input.on_message(Box::new(move |m| {
            let _ = pong_tx.send(m.data);
            Box::pin(async {})
        }));
        let (state_tx, state) = watch::channel(RTCPeerConnectionState::New);
        pc.on_peer_connection_state_change(Box::new(move |s| {
            let _ = state_tx.send(s);
            Box::pin(async {})
        }));
        let packets = Arc::new(AtomicU64::new(0));
        let codec = Arc::new(Mutex::new(None));
        let (p, c) = (Arc::clone(&packets), Arc::clone(&codec));
        let (rtp_tx, rtp) = mpsc::unbounded_channel();
        pc.on_track(Box::new(move |track, _, _| {
            *c.lock().unwrap() = Some(track.codec().capability.mime_type.clone());
            let (p, rtp_tx) = (Arc::clone(&p), rtp_tx.clone());
            tokio::spawn(async move {
                while let Ok((packet, _)) = track.read_rtp().await {
                    p.fetch_add(1, Ordering::Relaxed);
                    let _ = rtp_tx.send(packet);
                }
            });
            Box::pin(async {})
        }));
        let offer = pc.create_offer(None).await.unwrap();
        let mut gathered = pc.gathering_complete_promise().await;
        pc.set_local_description(offer).await.unwrap();
        let _ = gathered.recv().await;
        let sdp = pc.local_description().await.unwrap().sdp;
        (
            Self {
                pc,
                input,
                state,
                packets,
                codec,
                pongs,
                rtp,
            },
            sdp,
        )
    }

    async fn accept(&self, answer: String) {
        self.pc
            .set_remote_description(RTCSessionDescription::answer(answer).unwrap())
            .await
            .unwrap();
    }

    async fn wait_for(&mut self, want: RTCPeerConnectionState) {
        timeout(LIMIT, self.state.wait_for(|s| *s == want))
            .await
            .unwrap_or_else(|_| panic!("the player never got {want}"))
            .unwrap();
    }

    async fn wait_for_input_channel(&self) {
        timeout(LIMIT, async {
            while self.input.ready_state()
                != webrtc::data_channel::data_channel_state::RTCDataChannelState::Open
            {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("the input channel opens");
    }

    async fn wait_for_packets(&self, n: u64) {
        timeout(LIMIT, async {
            while self.packets.load(Ordering::Relaxed) < n {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("video packets");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_player_streams_plays_and_hangs_up() {
    let mut node = Node::start().await;
    let (session, token) = node.reserve(1).await;

    let (mut player, offer) = Player::new().await;
    let (status, head, answer) = node
        .post(session, Some(&token), "application/sdp", &offer)
        .await;
    assert_eq!(status, 201, "{answer}");
    assert_eq!(header(&head, "content-type"), Some("application/sdp"));
    assert_eq!(header(&head, "access-control-allow-origin"), Some("*"));
    let location = header(&head, "location").unwrap().to_owned();
    assert!(
        location.starts_with(&format!("/whep/sessions/{session}/streams/")),
        "{location}"
    );
    assert!(answer.contains("a=candidate:"), "full gathering: {answer}");
    assert_eq!(node.next_update(session).await, SessionState::Connecting);

    player.accept(answer).await;
    player.wait_for(RTCPeerConnectionState::Connected).await;
    assert_eq!(node.next_update(session).await, SessionState::Active);
    player.wait_for_packets(20).await;
    assert_eq!(
        player.codec.lock().unwrap().as_deref(),
        Some("video/H264"),
        "H.264, although the player listed VP8 first"
    );

    // Input: a ping is answered, an event counts as activity, garbage is dropped.
    player.wait_for_input_channel().await;
    let ping = InputMessage {
        seq: 7,
        t_ms: 1234,
        event: InputEvent::Ping,
    };
    player
        .input
        .send(&Bytes::from(ping.encode()))
        .await
        .unwrap();
    let pong = timeout(LIMIT, player.pongs.recv()).await.unwrap().unwrap();
    let pong = InputMessage::decode(&pong).unwrap();
    assert_eq!(
        (pong.seq, pong.t_ms, pong.event),
        (7, 1234, InputEvent::Pong)
    );
    player
        .input
        .send(&Bytes::from_static(&[0xee, 1]))
        .await
        .unwrap();
    let key = InputMessage {
        seq: 8,
        t_ms: 1300,
        event: InputEvent::KeyDown { code: 0x4f },
    };
    player.input.send(&Bytes::from(key.encode())).await.unwrap();
    timeout(LIMIT, async {
        while !node
            .inputs
            .lock()
            .unwrap()
            .iter()
            .any(|i| i.session_id == session)
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("heartbeats report the player's input");

    // A second player for the same session while the first is connected: 409.
    let (_other, offer2) = Player::new().await;
    let (status, _, body) = node
        .post(session, Some(&token), "application/sdp", &offer2)
        .await;
    assert_eq!(status, 409, "{body}");

    // Trickle: a candidate fragment is taken; an unknown stream is not.
    let auth = vec![
        ("authorization", format!("Bearer {token}")),
        ("content-type", "application/trickle-ice-sdpfrag".to_owned()),
    ];
    let frag = "a=ice-ufrag:abcd\r\na=ice-pwd:efghijklmnopqrstuvwxyz12\r\nm=video 9 UDP/TLS/RTP/SAVPF 0\r\na=mid:0\r\na=candidate:1 1 udp 2130706431 127.0.0.1 9 typ host\r\na=end-of-candidates\r\n";
    let (status, _, body) = http(node.whep, "PATCH", &location, &auth, frag).await;
    assert_eq!(status, 204, "{body}");
    let (status, _, _) = http(
        node.whep,
        "PATCH",
        &format!("/whep/sessions/{session}/streams/999"),
        &auth,
        frag,
    )
    .await;
    assert_eq!(status, 404);

    // Hanging up ends the session on the node, with reason released.
    let (status, _, body) = http(
        node.whep,
        "DELETE",
        &location,
        &[("authorization", format!("Bearer {token}"))],
        "",
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        node.next_update(session).await,
        SessionState::Ended(EndReason::Released)
    );
    // The session is gone: its token finds nothing.
    let (status, _, _) = node
        .post(session, Some(&token), "application/sdp", &offer2)
        .await;
    assert_eq!(status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_player_who_drops_comes_back_inside_the_grace_window() {
    let mut node = Node::start().await;
    let (session, token) = node.reserve(1).await;
    let first = node.connected_player(session, &token).await;
    assert_eq!(node.next_update(session).await, SessionState::Connecting);
    assert_eq!(node.next_update(session).await, SessionState::Active);

    // The player's connection goes away without a DELETE.
    first.pc.close().await.unwrap();
    assert_eq!(node.next_update(session).await, SessionState::Reconnecting);

    // A reconnect is accepted.
    let mut second = node.connected_player(session, &token).await;
    assert_eq!(node.next_update(session).await, SessionState::Active);
    second.wait_for_packets(10).await;

    // The broker ends the session (its idle or maximum-length timer, or the platform's
    // DELETE): the agent stops the stream and the player's connection goes down.
    write_message(
        &mut node.send,
        &Message::Release(Release {
            session_id: session,
            reason: EndReason::Idle,
        }),
        DEFAULT_MAX_FRAME,
    )
    .await
    .unwrap();
    assert_eq!(
        node.next_update(session).await,
        SessionState::Ended(EndReason::Idle)
    );
    timeout(
        LIMIT,
        second.state.wait_for(|s| {
            matches!(
                s,
                RTCPeerConnectionState::Closed
                    | RTCPeerConnectionState::Disconnected
                    | RTCPeerConnectionState::Failed
            )
        }),
    )
    .await
    .expect("the player's connection goes down")
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_player_who_never_connects_is_given_up_and_may_offer_again() {
    let mut node = Node::start_with(Vec::new(), |c| c.whep.connect_timeout_s = 1).await;
    let (session, token) = node.reserve(1).await;
    // An offer whose answer the player never applies: no ICE, no DTLS.
    let (_silent, offer) = Player::new().await;
    let (status, _, _) = node
        .post(session, Some(&token), "application/sdp", &offer)
        .await;
    assert_eq!(status, 201);
    assert_eq!(node.next_update(session).await, SessionState::Connecting);
    // After the connect timeout the agent closes it; the slot waits for the player.
    assert_eq!(node.next_update(session).await, SessionState::Reconnecting);
    node.connected_player(session, &token).await;
    assert_eq!(node.next_update(session).await, SessionState::Active);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_the_status_the_protocol_names() {
    let mut node = Node::start().await;
    let (session, token) = node.reserve(1).await;
    let (_player, offer) = Player::new().await;
    let sdp = "application/sdp";

    // CORS preflight.
    let (status, head, _) = http(
        node.whep,
        "OPTIONS",
        &format!("/whep/sessions/{session}"),
        &[],
        "",
    )
    .await;
    assert_eq!(status, 204);
    assert!(
        header(&head, "access-control-allow-methods")
            .is_some_and(|m| m.contains("post") && m.contains("delete")),
        "{head}"
    );
    assert!(
        header(&head, "access-control-allow-headers").is_some_and(|h| h.contains("authorization"))
    );

    // 401: no token, a forged one, an expired one, one for another node or another session.
    let forged = TokenSigner::generate().unwrap().sign(&Claims {
        session_id: session,
        node_id: NodeId::new("gpu-host-1").unwrap(),
        issued_at: Timestamp::now(),
        expires_at: Timestamp::now().saturating_add(Duration::from_secs(60)),
    });
    let expired = node.token(session, "gpu-host-1", Duration::ZERO);
    let elsewhere = node.token(session, "gpu-host-2", Duration::from_secs(60));
    let (other, _) = node.reserve(2).await;
    let other_session = node.token(other, "gpu-host-1", Duration::from_secs(60));
    let (status, head, body) = node.post(session, None, sdp, &offer).await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(
        header(&head, "content-type"),
        Some("application/problem+json")
    );
    for t in [
        &forged,
        &expired,
        &elsewhere,
        &other_session,
        &"fc1.nonsense".to_owned(),
    ] {
        let (status, _, body) = node.post(session, Some(t), sdp, &offer).await;
        assert_eq!(status, 401, "{body}");
    }

    // 404: a valid token for a session the node does not hold.
    let unknown = SessionId::new(Timestamp::now(), 99);
    let t = node.token(unknown, "gpu-host-1", Duration::from_secs(60));
    let (status, _, body) = node.post(unknown, Some(&t), sdp, &offer).await;
    assert_eq!(status, 404, "{body}");
    let (status, _, _) = http(node.whep, "POST", "/whep/sessions/not-an-id", &[], "").await;
    assert_eq!(status, 404);

    // 415 and 400: not SDP, or SDP without video.
    let (status, _, body) = node.post(session, Some(&token), "text/plain", &offer).await;
    assert_eq!(status, 415, "{body}");
    let (status, _, body) = node.post(session, Some(&token), sdp, "v=0 nonsense").await;
    assert_eq!(status, 400, "{body}");
    let no_video = offer
        .split("m=")
        .enumerate()
        .filter(|(i, part)| *i == 0 || !part.starts_with("video"))
        .map(|(i, part)| {
            if i == 0 {
                part.to_owned()
            } else {
                format!("m={part}")
            }
        })
        .collect::<String>();
    let (status, _, body) = node.post(session, Some(&token), sdp, &no_video).await;
    assert_eq!(status, 400, "{body}");
    // None of that moved the session.
    assert!(
        timeout(Duration::from_millis(300), node.updates.recv())
            .await
            .is_err(),
        "a refused request changes no session"
    );
}

/// A game process streams through the capture interface: the agent launches it with
/// `FRAMECAST_CAPTURE_SOCKET`, the game (played here by the test, which binds that socket)
/// sends its pictures, the player decodes exactly those pictures, and the player's input
/// reaches the game.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_game_process_streams_its_frames_through_the_capture_interface() {
    use framecast_agent::stream::capture::{FrameHeader, HEADER_LEN};
    use framecast_agent::stream::scene::{I420Frame, SyntheticScene, read_markers};
    use std::io::{Read, Write};

    let dir = tempfile::tempdir().unwrap();
    let told = dir.path().join("socket-path");
    let game = AgentGameConfig {
        id: GameId::new("capture-game").unwrap(),
        command: Some("/bin/sh".into()),
        args: vec![
            "-c".into(),
            "echo \"$FRAMECAST_CAPTURE_SOCKET\" > \"$TELL\"; exec sleep 30 </dev/null >/dev/null 2>&1".into(),
        ],
        env: [("TELL".to_owned(), told.display().to_string())].into(),
        tiers: Vec::new(),
    };
    let mut node = Node::start_with(vec![game], |_| {}).await;
    let (session, token) = node.reserve_game(1, "capture-game").await;
    let socket = timeout(LIMIT, async {
        loop {
            if let Ok(text) = std::fs::read_to_string(&told)
                && !text.trim().is_empty()
            {
                return std::path::PathBuf::from(text.trim());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the game was launched with its capture socket");

    // The game: listen where the agent said, send pictures whose frame marker starts at
    // 5000, and collect the input the agent forwards.
    let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let (width, height) = (320u16, 180u16);
    let (inputs_tx, mut inputs) = mpsc::unbounded_channel();
    std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        let mut reader = conn.try_clone().unwrap();
        std::thread::spawn(move || {
            let mut len = [0u8; 2];
            while reader.read_exact(&mut len).is_ok() {
                let mut event = vec![0u8; usize::from(u16::from_le_bytes(len))];
                if reader.read_exact(&mut event).is_err() {
                    break;
                }
                let _ = inputs_tx.send(InputMessage::decode(&event).unwrap());
            }
        });
        let mut scene = SyntheticScene::new(width, height).unwrap();
        let mut frame = I420Frame::new(width, height).unwrap();
        for n in 5000u64.. {
            scene.render(n, &mut frame).unwrap();
            let header: [u8; HEADER_LEN] = FrameHeader::i420(width, height, n).encode();
            if conn.write_all(&header).is_err() || conn.write_all(frame.as_bytes()).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    });

    let mut player = node.connected_player(session, &token).await;

    // Decode what arrives until a picture carries the game's frame marker.
    let mut builder = webrtc::media::io::sample_builder::SampleBuilder::new(
        64,
        webrtc::rtp::codecs::h264::H264Packet::default(),
        90_000,
    );
    let mut decoder = openh264::decoder::Decoder::new().unwrap();
    let seen = timeout(LIMIT, async {
        loop {
            let packet = player.rtp.recv().await.unwrap();
            builder.push(packet);
            while let Some(sample) = builder.pop() {
                let Ok(Some(picture)) = decoder.decode(&sample.data) else {
                    continue;
                };
                use openh264::formats::YUVSource;
                let (w, h) = picture.dimensions();
                let (stride, _, _) = picture.strides();
                let luma: Vec<u8> = (0..h)
                    .flat_map(|row| picture.y()[row * stride..row * stride + w].to_vec())
                    .collect();
                if let Some((frame, _)) =
                    read_markers(&luma, u16::try_from(w).unwrap(), u16::try_from(h).unwrap())
                    && (5000..1_000_000).contains(&frame)
                {
                    return frame;
                }
            }
        }
    })
    .await
    .expect("the player decodes the game's own pictures");
    assert!(seen >= 5000);

    // Input goes to the game, pings do not.
    player.wait_for_input_channel().await;
    for (seq, event) in [
        (1, InputEvent::Ping),
        (2, InputEvent::KeyDown { code: 0x1a }),
    ] {
        let msg = InputMessage {
            seq,
            t_ms: 10,
            event,
        };
        player.input.send(&Bytes::from(msg.encode())).await.unwrap();
    }
    let got = timeout(LIMIT, inputs.recv()).await.unwrap().unwrap();
    assert_eq!(
        (got.seq, got.event),
        (2, InputEvent::KeyDown { code: 0x1a })
    );
}
