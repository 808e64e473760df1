//! The agent binary end to end: `framecast-agent run` on simulated GPUs dials a test control
//! endpoint over QUIC with mutual TLS, reports its GPUs, and comes back with a new generation
//! after a restart.

// In a test, a failed unwrap is a failed test.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::time::timeout;

use framecast_agent::link::frames::{read_message, write_message};
use framecast_shared::protocol::{DEFAULT_MAX_FRAME, Message, PROTOCOL_VERSION};

use common::{Pki, accept, pki, test_broker, welcome};

const LIMIT: Duration = Duration::from_secs(30);

/// Kills the agent process when the test ends, however it ends.
struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn write_config(dir: &Path, pki: &Pki, broker: std::net::SocketAddr) -> PathBuf {
    for (name, text) in [
        ("ca.pem", &pki.ca.cert.cert_pem),
        ("agent.pem", &pki.agent.cert_pem),
        ("agent.key", &pki.agent.key_pem),
    ] {
        std::fs::write(dir.join(name), text).unwrap();
    }
    std::fs::write(
        dir.join("gpus.toml"),
        "[[gpus]]\nmodel = \"l4\"\ncount = 2\n\n[[gpus]]\nmodel = \"rtx 4090\"\n",
    )
    .unwrap();
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
"#,
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

fn start(config: &Path) -> Agent {
    Agent(
        Command::new(env!("CARGO_BIN_EXE_framecast-agent"))
            .args(["run", "--config", config.to_str().unwrap()])
            .env_remove("FRAMECAST_CONFIG")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

#[tokio::test]
async fn the_agent_reports_its_gpus_over_mutual_tls_and_bumps_its_generation_on_restart() {
    let pki = pki();
    let (endpoint, addr) = test_broker(&pki);
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &pki, addr);

    for expected_generation in [1, 2] {
        let agent = start(&config);
        timeout(LIMIT, async {
            let (_conn, mut send, mut recv, hello) = accept(&endpoint).await;
            assert_eq!(hello.node_id.as_str(), "gpu-host-1");
            assert_eq!(hello.generation, expected_generation);
            let models: Vec<&str> = hello.gpus.iter().map(|g| g.spec.model.as_str()).collect();
            assert_eq!(
                models,
                ["NVIDIA L4", "NVIDIA L4", "NVIDIA GeForce RTX 4090"]
            );
            write_message(
                &mut send,
                &welcome(expected_generation, PROTOCOL_VERSION),
                DEFAULT_MAX_FRAME,
            )
            .await
            .unwrap();
            let Some(Message::Heartbeat(hb)) =
                read_message(&mut recv, DEFAULT_MAX_FRAME).await.unwrap()
            else {
                panic!("no heartbeat")
            };
            assert_eq!((hb.generation, hb.gpus.len()), (expected_generation, 3));
        })
        .await
        .unwrap();
        drop(agent);
    }
}

#[test]
fn run_without_tls_says_what_is_missing() {
    let dir = tempfile::tempdir().unwrap();
    let gpus = dir.path().join("gpus.toml");
    std::fs::write(&gpus, "[[gpus]]\nmodel = \"l4\"\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_framecast-agent"))
        .args([
            "run",
            "--simulate",
            gpus.to_str().unwrap(),
            "--set",
            "node_id=n1",
        ])
        .env_remove("FRAMECAST_CONFIG")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("broker.tls is required"), "{err}");
}
