//! The control plane against hand-driven agents on loopback: real QUIC, real mutual TLS.
//! Timeouts only bound how long a broken build hangs.

// In a test, a failed unwrap is a failed test.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::timeout;

use framecast_broker::run::{Running, start};
use framecast_broker::store::Store;
use framecast_shared::config::BrokerConfig;
use framecast_shared::gpu::{GpuMode, models};
use framecast_shared::ids::{NodeId, RegionName};
use framecast_shared::protocol::quic::{read_message, write_message};
use framecast_shared::protocol::{DEFAULT_MAX_FRAME, GoodbyeReason, Hello, Message};
use framecast_shared::state::NodeState;
use framecast_shared::time::Timestamp;
use framecast_shared::tls::{DevCa, IssuedCert, Role, client_config, server_config};
use framecast_shared::token::TokenSigner;

const LIMIT: Duration = Duration::from_secs(20);

struct Broker {
    running: Running,
    ca: DevCa,
    _dir: tempfile::TempDir,
}

async fn broker() -> Broker {
    let dir = tempfile::tempdir().unwrap();
    let ca = DevCa::generate("test CA").unwrap();
    let cert = ca
        .issue("broker", &["localhost", "127.0.0.1"], Role::Broker)
        .unwrap();
    let tls = server_config(&ca.cert.cert_pem, &cert.cert_pem, &cert.key_pem).unwrap();
    let mut config = BrokerConfig {
        data_dir: dir.path().join("data"),
        region: RegionName::new("eu").unwrap(),
        ..BrokerConfig::default()
    };
    config.http.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    config.control.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    let running = start(config, Arc::new(tls), TokenSigner::generate().unwrap())
        .await
        .unwrap();
    Broker {
        running,
        ca,
        _dir: dir,
    }
}

fn hello(node: &str, generation: u64) -> Hello {
    let mut h = framecast_broker::placement::simulated::hello(
        node,
        "eu",
        &models::l4(),
        GpuMode::EqualSize,
        1,
        generation,
    )
    .unwrap();
    h.node_id = NodeId::new(node).unwrap();
    h
}

struct Agent {
    _endpoint: quinn::Endpoint,
    conn: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
}

async fn connect(addr: SocketAddr, ca: &str, cert: &IssuedCert) -> Result<Agent, String> {
    let tls = client_config(ca, &cert.cert_pem, &cert.key_pem).unwrap();
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(Arc::new(tls)).unwrap();
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
    let conn = endpoint
        .connect(addr, "localhost")
        .unwrap()
        .await
        .map_err(|e| e.to_string())?;
    let (send, recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    Ok(Agent {
        _endpoint: endpoint,
        conn,
        send,
        recv,
    })
}

/// Says hello and returns the broker's first answer.
async fn say_hello(agent: &mut Agent, hello: Hello) -> Option<Message> {
    write_message(&mut agent.send, &Message::Hello(hello), DEFAULT_MAX_FRAME)
        .await
        .unwrap();
    read_message(&mut agent.recv, DEFAULT_MAX_FRAME)
        .await
        .ok()
        .flatten()
}

#[track_caller]
fn goodbye_reason(m: Option<Message>) -> GoodbyeReason {
    match m {
        Some(Message::Goodbye(g)) => g.reason,
        other => panic!("expected goodbye, got {other:?}"),
    }
}

#[tokio::test]
async fn an_agent_is_welcomed_with_the_token_key_and_a_newer_generation_fences_the_older() {
    let b = broker().await;
    let cert = b.ca.issue("gpu-1", &["gpu-1"], Role::Agent).unwrap();
    timeout(LIMIT, async {
        let mut first = connect(b.running.control, &b.ca.cert.cert_pem, &cert)
            .await
            .unwrap();
        match say_hello(&mut first, hello("gpu-1", 1)).await {
            Some(Message::Welcome(w)) => {
                assert_eq!(w.generation, 1);
                assert_eq!(
                    w.token_public_key,
                    b.running.broker.token_public_key().to_vec()
                );
            }
            other => panic!("{other:?}"),
        }
        // The agent restarted (generation 2): the old connection is told it is stale.
        let mut second = connect(b.running.control, &b.ca.cert.cert_pem, &cert)
            .await
            .unwrap();
        assert!(matches!(
            say_hello(&mut second, hello("gpu-1", 2)).await,
            Some(Message::Welcome(_))
        ));
        let told = read_message(&mut first.recv, DEFAULT_MAX_FRAME).await;
        assert!(
            matches!(&told, Ok(Some(Message::Goodbye(g))) if g.reason == GoodbyeReason::StaleGeneration),
            "{told:?}"
        );
        // A late hello of the old generation is refused.
        let mut late = connect(b.running.control, &b.ca.cert.cert_pem, &cert)
            .await
            .unwrap();
        assert_eq!(
            goodbye_reason(say_hello(&mut late, hello("gpu-1", 1)).await),
            GoodbyeReason::StaleGeneration
        );
        drop(second.conn);
    })
    .await
    .unwrap();
    b.running.stop().await;
}

#[tokio::test]
async fn agents_that_are_not_who_they_say_are_refused() {
    let b = broker().await;
    timeout(LIMIT, async {
        // A certificate from another CA fails the TLS handshake.
        let stranger = DevCa::generate("stranger").unwrap();
        let bad = stranger.issue("gpu-1", &["gpu-1"], Role::Agent).unwrap();
        let r = connect(b.running.control, &b.ca.cert.cert_pem, &bad).await;
        let refused = match r {
            Err(_) => true,
            // The server may refuse after the client thinks the handshake is done.
            Ok(mut a) => say_hello(&mut a, hello("gpu-1", 1)).await.is_none(),
        };
        assert!(refused, "a foreign CA's agent got through");
        // A good certificate for gpu-1 cannot speak for gpu-2.
        let cert = b.ca.issue("gpu-1", &["gpu-1"], Role::Agent).unwrap();
        let mut a = connect(b.running.control, &b.ca.cert.cert_pem, &cert)
            .await
            .unwrap();
        assert_eq!(
            goodbye_reason(say_hello(&mut a, hello("gpu-2", 1)).await),
            GoodbyeReason::Unauthorized
        );
        // The wrong region, and a protocol version older than the broker speaks.
        let mut a = connect(b.running.control, &b.ca.cert.cert_pem, &cert)
            .await
            .unwrap();
        let mut h = hello("gpu-1", 1);
        h.region = RegionName::new("us").unwrap();
        assert_eq!(
            goodbye_reason(say_hello(&mut a, h).await),
            GoodbyeReason::Unauthorized
        );
        let mut a = connect(b.running.control, &b.ca.cert.cert_pem, &cert)
            .await
            .unwrap();
        let mut h = hello("gpu-1", 1);
        h.protocol_version = 0; // older than any this broker speaks
        assert_eq!(
            goodbye_reason(say_hello(&mut a, h).await),
            GoodbyeReason::IncompatibleVersion
        );
    })
    .await
    .unwrap();
    b.running.stop().await;
}

#[tokio::test]
async fn truncated_or_oversized_frames_close_that_link_and_the_broker_serves_on() {
    let b = broker().await;
    let cert = b.ca.issue("gpu-1", &["gpu-1"], Role::Agent).unwrap();
    timeout(LIMIT, async {
        // A header announcing more than the frame limit: refused before the body is read.
        let mut a = connect(b.running.control, &b.ca.cert.cert_pem, &cert)
            .await
            .unwrap();
        a.send.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
        let answer = read_message(&mut a.recv, DEFAULT_MAX_FRAME).await;
        assert!(
            matches!(&answer, Ok(Some(Message::Goodbye(g))) if g.reason == GoodbyeReason::ProtocolError)
                || matches!(answer, Ok(None) | Err(_)),
            "{answer:?}"
        );
        // A header announcing 100 bytes, then 3 and the end of the stream.
        let mut a = connect(b.running.control, &b.ca.cert.cert_pem, &cert)
            .await
            .unwrap();
        a.send.write_all(&100u32.to_be_bytes()).await.unwrap();
        a.send.write_all(&[1, 2, 3]).await.unwrap();
        a.send.finish().unwrap();
        let answer = read_message(&mut a.recv, DEFAULT_MAX_FRAME).await;
        assert!(!matches!(answer, Ok(Some(Message::Welcome(_)))), "{answer:?}");
        // Garbage that frames correctly but is not a message.
        let mut a = connect(b.running.control, &b.ca.cert.cert_pem, &cert)
            .await
            .unwrap();
        a.send.write_all(&4u32.to_be_bytes()).await.unwrap();
        a.send.write_all(&[0xff, 0x00, 0x13, 0x37]).await.unwrap();
        let answer = read_message(&mut a.recv, DEFAULT_MAX_FRAME).await;
        assert!(!matches!(answer, Ok(Some(Message::Welcome(_)))), "{answer:?}");
        // After all that, a proper agent is welcomed.
        let mut good = connect(b.running.control, &b.ca.cert.cert_pem, &cert)
            .await
            .unwrap();
        assert!(matches!(
            say_hello(&mut good, hello("gpu-1", 1)).await,
            Some(Message::Welcome(_))
        ));
    })
    .await
    .unwrap();
    b.running.stop().await;
}

/// Reads what the broker sends after its welcome until `wanted` matches one (bounded).
async fn expect_message(agent: &mut Agent, wanted: impl Fn(&Message) -> bool) -> Message {
    timeout(LIMIT, async {
        loop {
            match read_message(&mut agent.recv, DEFAULT_MAX_FRAME).await {
                Ok(Some(m)) if wanted(&m) => return m,
                Ok(Some(_)) => {}
                other => panic!("the link ended first: {other:?}"),
            }
        }
    })
    .await
    .expect("the message comes")
}

fn node_state(b: &Broker, node: &str) -> Option<NodeState> {
    let node = NodeId::new(node).unwrap();
    b.running.broker.with_engine(|e| {
        let fleet = e.fleet();
        fleet
            .node_idx
            .get(&node)
            .and_then(|&i| fleet.node(i))
            .map(|n| n.state)
    })
}

#[tokio::test]
async fn the_agents_drain_and_the_brokers_are_reconciled_at_hello() {
    let b = broker().await;
    let deadline = Timestamp::now().saturating_add(Duration::from_secs(600));
    let gpu1 = b.ca.issue("gpu-1", &["gpu-1"], Role::Agent).unwrap();
    let gpu2 = b.ca.issue("gpu-2", &["gpu-2"], Role::Agent).unwrap();
    let ca = b.ca.cert.cert_pem.clone();
    let control = b.running.control;
    timeout(LIMIT, async {
        // A broker that holds no decision about a node takes its agent's drain (the store
        // of a broker restarted after an upgrade has none), so it stops placing there.
        let mut draining = hello("gpu-1", 1);
        draining.draining = Some(deadline);
        let mut a1 = connect(control, &ca, &gpu1).await.unwrap();
        assert!(matches!(
            say_hello(&mut a1, draining.clone()).await,
            Some(Message::Welcome(_))
        ));
        assert_eq!(
            node_state(&b, "gpu-1"),
            Some(NodeState::Draining { deadline })
        );

        // A node the broker knows as ready whose agent still drains (the resume was lost
        // with its link) is told to resume.
        let mut a2 = connect(control, &ca, &gpu2).await.unwrap();
        assert!(matches!(
            say_hello(&mut a2, hello("gpu-2", 1)).await,
            Some(Message::Welcome(_))
        ));
        let mut still = hello("gpu-2", 1);
        still.draining = Some(deadline);
        let mut a2 = connect(control, &ca, &gpu2).await.unwrap();
        assert!(matches!(
            say_hello(&mut a2, still).await,
            Some(Message::Welcome(_))
        ));
        expect_message(&mut a2, |m| matches!(m, Message::Resume(_))).await;
        assert_eq!(node_state(&b, "gpu-2"), Some(NodeState::Ready));

        // A draining node whose agent restarted (and so forgot the drain) is told again.
        let mut a1 = connect(control, &ca, &gpu1).await.unwrap();
        assert!(matches!(
            say_hello(&mut a1, hello("gpu-1", 2)).await,
            Some(Message::Welcome(_))
        ));
        let told = expect_message(&mut a1, |m| matches!(m, Message::Drain(_))).await;
        assert!(
            matches!(&told, Message::Drain(d) if d.deadline == deadline),
            "{told:?}"
        );
        assert_eq!(
            node_state(&b, "gpu-1"),
            Some(NodeState::Draining { deadline })
        );
    })
    .await
    .unwrap();
    // The drain the broker took from the agent is recorded like an operator's.
    let Broker { running, _dir, .. } = b;
    running.stop().await;
    // The stopped service lets go of the store once its last task has ended.
    let store = timeout(LIMIT, async {
        loop {
            match Store::open(&_dir.path().join("data")) {
                Err(framecast_broker::store::StoreError::Locked { .. }) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                other => return other.unwrap(),
            }
        }
    })
    .await
    .expect("the stopped broker releases its store");
    assert_eq!(
        store
            .node(&NodeId::new("gpu-1").unwrap())
            .unwrap()
            .and_then(|n| n.drain_deadline),
        Some(deadline)
    );
    assert_eq!(store.node(&NodeId::new("gpu-2").unwrap()).unwrap(), None);
}
