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
use framecast_shared::config::BrokerConfig;
use framecast_shared::gpu::{GpuMode, models};
use framecast_shared::ids::{NodeId, RegionName};
use framecast_shared::protocol::quic::{read_message, write_message};
use framecast_shared::protocol::{DEFAULT_MAX_FRAME, GoodbyeReason, Hello, Message};
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
