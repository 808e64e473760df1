//! A test control endpoint for the agent's link tests: a dev PKI and a QUIC server with mutual
//! TLS on loopback.

// Each test binary uses a subset of these.
#![allow(dead_code, clippy::unwrap_used, clippy::panic)]

use std::net::SocketAddr;
use std::sync::Arc;

use framecast_agent::link::frames::read_message;
use framecast_shared::ids::RegionName;
use framecast_shared::protocol::{DEFAULT_MAX_FRAME, Hello, Message, Welcome};
use framecast_shared::tls::{DevCa, IssuedCert, Role, server_config};

pub(crate) struct Pki {
    pub ca: DevCa,
    pub broker: IssuedCert,
    pub agent: IssuedCert,
}

pub(crate) fn pki() -> Pki {
    let ca = DevCa::generate("test CA").unwrap();
    let broker = ca
        .issue("broker", &["localhost", "127.0.0.1"], Role::Broker)
        .unwrap();
    let agent = ca
        .issue("gpu-host-1", &["gpu-host-1"], Role::Agent)
        .unwrap();
    Pki { ca, broker, agent }
}

pub(crate) fn test_broker(pki: &Pki) -> (quinn::Endpoint, SocketAddr) {
    let tls = server_config(
        &pki.ca.cert.cert_pem,
        &pki.broker.cert_pem,
        &pki.broker.key_pem,
    )
    .unwrap();
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(Arc::new(tls)).unwrap();
    let endpoint = quinn::Endpoint::server(
        quinn::ServerConfig::with_crypto(Arc::new(crypto)),
        "127.0.0.1:0".parse().unwrap(),
    )
    .unwrap();
    let addr = endpoint.local_addr().unwrap();
    (endpoint, addr)
}

/// Accepts the next connection and its stream, and reads the agent's hello.
pub(crate) async fn accept(
    endpoint: &quinn::Endpoint,
) -> (
    quinn::Connection,
    quinn::SendStream,
    quinn::RecvStream,
    Hello,
) {
    let incoming = endpoint.accept().await.unwrap();
    let conn = incoming.await.unwrap();
    let (send, mut recv) = conn.accept_bi().await.unwrap();
    let Some(Message::Hello(hello)) = read_message(&mut recv, DEFAULT_MAX_FRAME).await.unwrap()
    else {
        panic!("no hello")
    };
    (conn, send, recv, hello)
}

pub(crate) fn welcome(generation: u64, version: u32) -> Message {
    Message::Welcome(Welcome {
        protocol_version: version,
        broker_version: "test".into(),
        region: RegionName::new("eu").unwrap(),
        generation,
        heartbeat_interval_ms: 50,
        token_public_key: vec![0; 32],
        tiers: Vec::new(),
    })
}

/// `GET path` on a loopback HTTP server: (status, body).
pub(crate) async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let status = out.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// A loopback port nothing listens on now (another process could take it before the caller
/// binds it; good enough for tests).
pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Writes the PKI's CA and agent files, a `gpus.toml` of `gpus`, and an `agent.toml` for node
/// `gpu-host-1` on simulated GPUs dialling `broker`, with `/metrics` on `http` and `extra`
/// appended; returns the config's path.
pub(crate) fn write_agent_config(
    dir: &std::path::Path,
    pki: &Pki,
    broker: SocketAddr,
    http: SocketAddr,
    gpus: &str,
    extra: &str,
) -> std::path::PathBuf {
    for (name, text) in [
        ("ca.pem", &pki.ca.cert.cert_pem),
        ("agent.pem", &pki.agent.cert_pem),
        ("agent.key", &pki.agent.key_pem),
    ] {
        std::fs::write(dir.join(name), text).unwrap();
    }
    std::fs::write(dir.join("gpus.toml"), gpus).unwrap();
    let config = format!(
        r#"node_id = "gpu-host-1"
region = "eu"
data_dir = {data:?}

[broker]
address = "{broker}"
server_name = "localhost"
max_frame_bytes = 1048576

[broker.tls]
ca_cert = {ca:?}
cert = {cert:?}
key = {key:?}

[inventory]
source = "simulated"
simulate = {gpus:?}

[vgpu]
backend = "simulated"
sysfs_root = "/sys"

[http]
listen = "{http}"
{whep}
{extra}
"#,
        // Tests run agents side by side: each takes a free port for players.
        whep = if extra.contains("[whep]") {
            ""
        } else {
            "[whep]\nlisten = \"127.0.0.1:0\"\n"
        },
        data = dir.join("data"),
        ca = dir.join("ca.pem"),
        cert = dir.join("agent.pem"),
        key = dir.join("agent.key"),
        gpus = dir.join("gpus.toml"),
    );
    let path = dir.join("agent.toml");
    std::fs::write(&path, config).unwrap();
    path
}
