//! The control link against a test control endpoint on loopback: real QUIC, real mutual TLS.
//! Timeouts below only bound how long a broken build hangs; no test asserts on timing.

// In a test, a failed unwrap is a failed test.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::timeout;

use framecast_agent::link::frames::{read_message, write_message};
use framecast_agent::link::{self, AgentState, LinkChannels, LinkConfig, LinkError, LinkState};
use framecast_shared::ids::{GameId, GpuId, NodeId, RegionName, SessionId, TierName};
use framecast_shared::protocol::{
    DEFAULT_MAX_FRAME, Goodbye, GoodbyeReason, Heartbeat, Hello, Message, PROTOCOL_VERSION,
    Reserve, Reserved, RunningSession, SessionUpdate,
};
use framecast_shared::state::{EndReason, SessionState};
use framecast_shared::time::Timestamp;
use framecast_shared::tls::{DevCa, IssuedCert, Role, client_config};
use framecast_shared::units::{ComputeShare, EncoderUnits, Megabytes};

use common::{Pki, accept, pki, test_broker, welcome};

const LIMIT: Duration = Duration::from_secs(20);

struct TestAgent {
    handled: Vec<String>,
}

fn session() -> RunningSession {
    RunningSession {
        session_id: SessionId::new(Timestamp::from_millis(1_800_000_000_000), 1),
        gpu: GpuId::new("sim-0").unwrap(),
        slot: 0,
        game: GameId::new("arena").unwrap(),
        tier: TierName::new("720p").unwrap(),
        genre: None,
        state: SessionState::Active,
        since: Timestamp::from_millis(1_800_000_000_000),
    }
}

impl AgentState for TestAgent {
    fn hello(&self, generation: u64) -> Hello {
        Hello {
            protocol_version: PROTOCOL_VERSION,
            agent_version: "test".into(),
            node_id: NodeId::new("gpu-host-1").unwrap(),
            region: RegionName::new("eu").unwrap(),
            generation,
            gpus: Vec::new(),
            sessions: vec![session()],
            warm: Vec::new(),
            cpu_millicores: None,
            whep_url: None,
            draining: None,
        }
    }

    fn heartbeat(&self, generation: u64, seq: u64) -> Heartbeat {
        Heartbeat {
            generation,
            seq,
            sent_at: Timestamp::now(),
            gpus: Vec::new(),
            warm: None,
            plan_generation: None,
            inputs: Vec::new(),
        }
    }

    fn handle(&mut self, message: Message) -> Vec<Message> {
        self.handled.push(message.kind().to_owned());
        match message {
            Message::Reserve(r) => vec![Message::Reserved(Reserved {
                request_id: r.request_id,
                session_id: r.session_id,
                warm: false,
            })],
            _ => Vec::new(),
        }
    }
}

fn link_config(pki: &Pki, addr: SocketAddr, agent_cert: &IssuedCert) -> LinkConfig {
    LinkConfig {
        broker: addr,
        server_name: "localhost".into(),
        tls: Arc::new(
            client_config(
                &pki.ca.cert.cert_pem,
                &agent_cert.cert_pem,
                &agent_cert.key_pem,
            )
            .unwrap(),
        ),
        max_frame: DEFAULT_MAX_FRAME,
        backoff_min: Duration::from_millis(20),
        backoff_max: Duration::from_millis(200),
    }
}

struct Running {
    agent: Arc<Mutex<TestAgent>>,
    shutdown: watch::Sender<bool>,
    state: watch::Receiver<LinkState>,
    outbox: mpsc::UnboundedSender<Message>,
    task: tokio::task::JoinHandle<Result<(), LinkError>>,
}

fn start_agent(config: LinkConfig, generation: u64) -> Running {
    let agent = Arc::new(Mutex::new(TestAgent {
        handled: Vec::new(),
    }));
    let (shutdown, shutdown_rx) = watch::channel(false);
    let (state_tx, state) = watch::channel(LinkState::Connecting);
    let (outbox, outbox_rx) = mpsc::unbounded_channel();
    let shared: Arc<Mutex<dyn AgentState>> = agent.clone();
    let task = tokio::spawn(link::run(
        config,
        shared,
        generation,
        LinkChannels {
            shutdown: shutdown_rx,
            state: state_tx,
            outbox: outbox_rx,
        },
    ));
    Running {
        agent,
        shutdown,
        state,
        outbox,
        task,
    }
}

#[tokio::test]
async fn hello_welcome_heartbeats_and_commands_over_mutual_tls() {
    let pki = pki();
    let (endpoint, addr) = test_broker(&pki);
    let running = start_agent(link_config(&pki, addr, &pki.agent), 7);
    timeout(LIMIT, async {
        let (conn, mut send, mut recv, hello) = accept(&endpoint).await;
        assert_eq!(
            (
                hello.generation,
                hello.protocol_version,
                hello.sessions.len()
            ),
            (7, PROTOCOL_VERSION, 1)
        );
        // The agent presented its certificate.
        assert!(conn.peer_identity().is_some());
        write_message(&mut send, &welcome(7, PROTOCOL_VERSION), DEFAULT_MAX_FRAME)
            .await
            .unwrap();
        for expected in 1..=2 {
            let Some(Message::Heartbeat(hb)) =
                read_message(&mut recv, DEFAULT_MAX_FRAME).await.unwrap()
            else {
                panic!()
            };
            assert_eq!((hb.generation, hb.seq), (7, expected));
        }
        let session_id = SessionId::new(Timestamp::from_millis(1_800_000_000_000), 2);
        let reserve = Message::Reserve(Reserve {
            request_id: 42,
            session_id,
            game: GameId::new("arena").unwrap(),
            tier: TierName::new("720p").unwrap(),
            gpu: GpuId::new("sim-0").unwrap(),
            slot: 1,
            framebuffer: Megabytes::new(2048),
            compute_share: ComputeShare::MIN,
            encoder: EncoderUnits::from_milli(445),
            expires_at: Timestamp::from_millis(1_800_000_060_000),
        });
        write_message(&mut send, &reserve, DEFAULT_MAX_FRAME)
            .await
            .unwrap();
        loop {
            match read_message(&mut recv, DEFAULT_MAX_FRAME).await.unwrap() {
                Some(Message::Heartbeat(_)) => continue,
                Some(Message::Reserved(r)) => {
                    assert_eq!((r.request_id, r.session_id), (42, session_id));
                    break;
                }
                other => panic!("{other:?}"),
            }
        }
        // What the agent says on its own (an instance crashed) reaches the broker too.
        running
            .outbox
            .send(Message::SessionUpdate(SessionUpdate {
                generation: 7,
                session_id,
                state: SessionState::Ended(EndReason::Error),
                at: Timestamp::from_millis(1_800_000_001_000),
            }))
            .unwrap();
        loop {
            match read_message(&mut recv, DEFAULT_MAX_FRAME).await.unwrap() {
                Some(Message::Heartbeat(_)) => continue,
                Some(Message::SessionUpdate(u)) => {
                    assert_eq!(u.session_id, session_id);
                    assert_eq!(u.state, SessionState::Ended(EndReason::Error));
                    break;
                }
                other => panic!("{other:?}"),
            }
        }
    })
    .await
    .unwrap();
    assert_eq!(*running.state.borrow(), LinkState::Connected);
    assert_eq!(running.agent.lock().unwrap().handled, ["reserve"]);
    running.shutdown.send(true).unwrap();
    assert!(timeout(LIMIT, running.task).await.unwrap().unwrap().is_ok());
}

#[tokio::test]
async fn an_agent_without_a_certificate_from_the_fleet_ca_is_rejected() {
    let pki = pki();
    let (endpoint, addr) = test_broker(&pki);
    let stranger = DevCa::generate("another CA")
        .unwrap()
        .issue("intruder", &["intruder"], Role::Agent)
        .unwrap();
    let mut running = start_agent(link_config(&pki, addr, &stranger), 1);
    timeout(LIMIT, async {
        // The broker's side of the handshake fails...
        let incoming = endpoint.accept().await.unwrap();
        assert!(
            incoming.await.is_err(),
            "a client certificate from another CA was accepted"
        );
        // ...and the agent backs off to try again later, having sent nothing.
        loop {
            running.state.changed().await.unwrap();
            if let LinkState::Backoff { error } = running.state.borrow().clone() {
                assert!(
                    error.contains("handshake")
                        || error.contains("hello")
                        || error.contains("stream"),
                    "{error}"
                );
                break;
            }
        }
    })
    .await
    .unwrap();
    running.shutdown.send(true).unwrap();
}

#[tokio::test]
async fn a_dropped_link_reconnects_and_sends_the_full_state_again() {
    let pki = pki();
    let (endpoint, addr) = test_broker(&pki);
    let running = start_agent(link_config(&pki, addr, &pki.agent), 3);
    timeout(LIMIT, async {
        let (conn, mut send, _recv, first) = accept(&endpoint).await;
        write_message(&mut send, &welcome(3, PROTOCOL_VERSION), DEFAULT_MAX_FRAME)
            .await
            .unwrap();
        conn.close(1u32.into(), b"broker restarting");
        let (_conn, _send, _recv, second) = accept(&endpoint).await;
        assert_eq!(second.generation, 3, "same process, same generation");
        assert_eq!(
            second.sessions, first.sessions,
            "running sessions are reported again"
        );
    })
    .await
    .unwrap();
    running.shutdown.send(true).unwrap();
}

#[tokio::test]
async fn a_broker_that_refuses_the_agent_stops_the_link() {
    let pki = pki();
    let (endpoint, addr) = test_broker(&pki);
    let running = start_agent(link_config(&pki, addr, &pki.agent), 1);
    let (_conn, mut send, _recv, _hello) = timeout(LIMIT, accept(&endpoint)).await.unwrap();
    let bye = Message::Goodbye(Goodbye {
        reason: GoodbyeReason::IncompatibleVersion,
        message: "upgrade the agent".into(),
    });
    write_message(&mut send, &bye, DEFAULT_MAX_FRAME)
        .await
        .unwrap();
    let result = timeout(LIMIT, running.task).await.unwrap().unwrap();
    let err = result.unwrap_err();
    assert!(
        matches!(
            err,
            LinkError::Refused {
                reason: GoodbyeReason::IncompatibleVersion,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("upgrade the agent"));
}

#[tokio::test]
async fn a_welcome_in_a_version_the_agent_does_not_speak_stops_the_link() {
    let pki = pki();
    let (endpoint, addr) = test_broker(&pki);
    let running = start_agent(link_config(&pki, addr, &pki.agent), 1);
    let (_conn, mut send, _recv, _hello) = timeout(LIMIT, accept(&endpoint)).await.unwrap();
    write_message(
        &mut send,
        &welcome(1, PROTOCOL_VERSION + 1),
        DEFAULT_MAX_FRAME,
    )
    .await
    .unwrap();
    let err = timeout(LIMIT, running.task)
        .await
        .unwrap()
        .unwrap()
        .unwrap_err();
    assert!(matches!(err, LinkError::Version(_)), "{err}");
    assert!(err.to_string().contains("upgrade the agent"), "{err}");
}
