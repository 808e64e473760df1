//! The agent binary end to end: `framecast-agent run` on simulated GPUs dials a test control
//! endpoint over QUIC with mutual TLS, reports its GPUs, serves its metrics and readiness,
//! and comes back with a new generation after a restart.

// In a test, a failed unwrap is a failed test.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::time::timeout;

use framecast_agent::link::frames::{read_message, write_message};
use framecast_shared::ids::{GameId, GpuId, SessionId, TierName};
use framecast_shared::protocol::{DEFAULT_MAX_FRAME, Message, PROTOCOL_VERSION, Reserve};
use framecast_shared::time::Timestamp;
use framecast_shared::units::{ComputeShare, EncoderUnits, Megabytes};

use common::{Pki, accept, free_port, http_get, pki, test_broker, welcome, write_agent_config};

const LIMIT: Duration = Duration::from_secs(30);

/// Kills the agent process when the test ends, however it ends.
struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Two L4s and an RTX 4090.
const GPUS: &str = "[[gpus]]\nmodel = \"l4\"\ncount = 2\n\n[[gpus]]\nmodel = \"rtx 4090\"\n";

fn write_config(dir: &Path, pki: &Pki, broker: SocketAddr, http: SocketAddr) -> PathBuf {
    write_agent_config(dir, pki, broker, http, GPUS, "")
}

fn write_config_with(
    dir: &Path,
    pki: &Pki,
    broker: SocketAddr,
    http: SocketAddr,
    extra: &str,
) -> PathBuf {
    write_agent_config(dir, pki, broker, http, GPUS, extra)
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
    let http: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let config = write_config(dir.path(), &pki, addr, http);

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
            if expected_generation == 1 {
                operations_endpoint(http, &mut send, &mut recv).await;
            }
        })
        .await
        .unwrap();
        drop(agent);
    }
}

/// With the link up the agent is ready, and its metrics show the GPUs, the link and a
/// reservation.
async fn operations_endpoint(
    http: SocketAddr,
    send: &mut quinn::SendStream,
    recv: &mut quinn::RecvStream,
) {
    assert_eq!(http_get(http, "/livez").await.0, 200);
    assert_eq!(http_get(http, "/readyz").await, (200, "ready\n".into()));
    let now = Timestamp::now();
    let reserve = Message::Reserve(Reserve {
        request_id: 1,
        session_id: SessionId::new(now, 1),
        game: GameId::new("arena").unwrap(),
        tier: TierName::new("1080p").unwrap(),
        gpu: GpuId::new("sim-0").unwrap(),
        slot: 0,
        framebuffer: Megabytes::new(4096),
        compute_share: ComputeShare::MIN,
        encoder: EncoderUnits::ONE,
        expires_at: now,
    });
    write_message(send, &reserve, DEFAULT_MAX_FRAME)
        .await
        .unwrap();
    loop {
        match read_message(recv, DEFAULT_MAX_FRAME).await.unwrap() {
            Some(Message::Heartbeat(_)) => continue,
            Some(Message::Reserved(_)) => break,
            other => panic!("{other:?}"),
        }
    }
    let (status, body) = http_get(http, "/metrics").await;
    assert_eq!(status, 200);
    for line in [
        "framecast_agent_link_up 1",
        "framecast_agent_sessions 1",
        "framecast_agent_framebuffer_total_megabytes{gpu=\"sim-0\"}",
        "framecast_agent_encoder_used_units{gpu=\"sim-0\"} 1",
        "framecast_agent_encoder_sessions{gpu=\"sim-0\"} 1",
        "framecast_agent_instances{tier=\"1080p\",state=\"active\"} 1",
        "framecast_agent_reservations_total{outcome=\"cold\"} 1",
    ] {
        assert!(body.contains(line), "{line} missing from\n{body}");
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

/// Kills a game process group the test started through the agent, however the test ends.
struct GameProcess(Option<u32>);

impl Drop for GameProcess {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

async fn eventually<T>(what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
    timeout(LIMIT, async {
        loop {
            if let Some(v) = probe() {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

#[tokio::test]
async fn a_restarted_agent_adopts_the_game_processes_of_running_sessions() {
    let pki = pki();
    let (endpoint, addr) = test_broker(&pki);
    let dir = tempfile::tempdir().unwrap();
    let pid_file = dir.path().join("game.pid");
    let game = format!(
        r#"
[[games]]
id = "sleeper"
command = "/bin/sh"
args = ["-c", "echo $$ > \"$PID_FILE\"; exec sleep 600"]
env = {{ PID_FILE = {pid_file:?} }}
"#
    );
    let http: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let config = write_config_with(dir.path(), &pki, addr, http, &game);
    let mut game_process = GameProcess(None);
    let session_id = SessionId::new(Timestamp::now(), 9);

    // Generation 1: a session starts its game process; then the agent is stopped.
    let agent = start(&config);
    let pid = timeout(LIMIT, async {
        let (_conn, mut send, mut recv, _) = accept(&endpoint).await;
        write_message(&mut send, &welcome(1, PROTOCOL_VERSION), DEFAULT_MAX_FRAME)
            .await
            .unwrap();
        let now = Timestamp::now();
        let reserve = Message::Reserve(Reserve {
            request_id: 1,
            session_id,
            game: GameId::new("sleeper").unwrap(),
            tier: TierName::new("720p").unwrap(),
            gpu: GpuId::new("sim-0").unwrap(),
            slot: 2,
            framebuffer: Megabytes::new(2048),
            compute_share: ComputeShare::MIN,
            encoder: EncoderUnits::ONE,
            expires_at: now,
        });
        write_message(&mut send, &reserve, DEFAULT_MAX_FRAME)
            .await
            .unwrap();
        loop {
            match read_message(&mut recv, DEFAULT_MAX_FRAME).await.unwrap() {
                Some(Message::Heartbeat(_)) => continue,
                Some(Message::Reserved(_)) => break,
                other => panic!("{other:?}"),
            }
        }
        let pid: u32 = eventually("the game's pid file", || {
            std::fs::read_to_string(&pid_file).ok()?.trim().parse().ok()
        })
        .await;
        // The agent has recorded the process before it is asked to stop.
        let sessions = dir.path().join("data/sessions.toml");
        eventually("the sessions file to name the process", || {
            let text = std::fs::read_to_string(&sessions).ok()?;
            text.contains(&format!("pid = {pid}")).then_some(())
        })
        .await;
        pid
    })
    .await
    .unwrap();
    game_process.0 = Some(pid);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent.0.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let mut agent = agent;
    let status = timeout(LIMIT, async {
        loop {
            if let Some(status) = agent.0.try_wait().unwrap() {
                return status;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap();
    assert!(
        status.success(),
        "the agent stops cleanly on SIGTERM: {status}"
    );
    let process = framecast_agent::instances::launch::ProcessId::of(pid).unwrap();
    assert!(process.alive(), "the session's game outlives the agent");

    // Generation 2 reports the session again, and a release stops the adopted process.
    let _agent = start(&config);
    timeout(LIMIT, async {
        let (_conn, mut send, mut recv, hello) = accept(&endpoint).await;
        assert_eq!(hello.generation, 2);
        let ids: Vec<SessionId> = hello.sessions.iter().map(|s| s.session_id).collect();
        assert_eq!(ids, [session_id]);
        assert_eq!(hello.sessions[0].slot, 2);
        write_message(&mut send, &welcome(2, PROTOCOL_VERSION), DEFAULT_MAX_FRAME)
            .await
            .unwrap();
        let release = Message::Release(framecast_shared::protocol::Release {
            session_id,
            reason: framecast_shared::state::EndReason::Released,
        });
        write_message(&mut send, &release, DEFAULT_MAX_FRAME)
            .await
            .unwrap();
        loop {
            match read_message(&mut recv, DEFAULT_MAX_FRAME).await.unwrap() {
                Some(Message::Heartbeat(_)) => continue,
                Some(Message::SessionUpdate(u)) => {
                    assert_eq!(u.session_id, session_id);
                    break;
                }
                other => panic!("{other:?}"),
            }
        }
        eventually("the adopted game process to be stopped", || {
            (!process.alive()).then_some(())
        })
        .await;
    })
    .await
    .unwrap();
}
