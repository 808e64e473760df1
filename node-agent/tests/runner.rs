//! The instance runner driving the agent's core with real processes and the synthetic game:
//! warm instances come up from a pool plan, a session's crashed instance ends the session and
//! the broker hears of it; a game process finds its capture socket's path in
//! `FRAMECAST_CAPTURE_SOCKET`, inside a private `capture` directory of the data directory, and
//! its socket file is removed when it exits. Timeouts only bound how long a broken build hangs.

// In a test, a failed unwrap is a failed test.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::timeout;

use framecast_agent::core::{AgentCore, CoreGpu};
use framecast_agent::encoder::EncoderSlots;
use framecast_agent::instances::cgroup::Cgroups;
use framecast_agent::instances::runner;
use framecast_agent::inventory::Inventory;
use framecast_agent::inventory::simulated::SimulatedInventory;
use framecast_agent::link::AgentState;
use framecast_agent::stream::capture::{CAPTURE_SOCKET_ENV, socket_path};
use framecast_agent::vgpu::simulated::SimulatedBackend;
use framecast_agent::vgpu::{GpuHandle, VgpuPool};
use framecast_shared::config::agent::AgentGameConfig;
use framecast_shared::config::inventory::{SimulatedGpuGroup, SimulatedGpus};
use framecast_shared::gpu::GpuMode;
use framecast_shared::ids::{GameId, GpuId, NodeId, RegionName, SessionId, TierName};
use framecast_shared::protocol::{GpuPlan, Message, PoolPlan, Reserve, WarmTarget};
use framecast_shared::state::{EndReason, SessionState};
use framecast_shared::tier::TierPreset;
use framecast_shared::time::Timestamp;
use framecast_shared::units::{ComputeShare, EncoderUnits, Megabytes};

const LIMIT: Duration = Duration::from_secs(20);

fn core(games: Vec<AgentGameConfig>) -> AgentCore {
    let file = SimulatedGpus {
        gpus: vec![SimulatedGpuGroup {
            model: "l4".into(),
            count: 1,
            mode: None,
        }],
    };
    let found = SimulatedInventory::from_file(&file).gpus().unwrap();
    let mut pool = VgpuPool::new(Box::new(SimulatedBackend::default()));
    let gpus = found
        .into_iter()
        .map(|f| {
            pool.add_gpu(
                GpuHandle {
                    id: f.id.clone(),
                    pci: None,
                },
                f.spec.clone(),
                GpuMode::EqualSize,
            )
            .unwrap();
            CoreGpu {
                encoder: EncoderSlots::for_gpu(f.id.clone(), &f.spec, None),
                found: f,
            }
        })
        .collect();
    AgentCore::new(
        NodeId::new("n1").unwrap(),
        RegionName::new("eu").unwrap(),
        None,
        gpus,
        TierPreset::defaults(),
        games,
        pool,
        Box::new(Timestamp::now),
    )
}

struct Harness {
    core: Arc<Mutex<AgentCore>>,
    outbox: mpsc::UnboundedReceiver<Message>,
    shutdown: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

/// Runs `core`'s instances; `data_dir` holds the capture sockets (none without it).
fn start(core: AgentCore, data_dir: Option<PathBuf>) -> Harness {
    let wake = core.wake_handle();
    let core = Arc::new(Mutex::new(core));
    let (outbox_tx, outbox) = mpsc::unbounded_channel();
    let (shutdown, shutdown_rx) = watch::channel(false);
    let task = tokio::spawn(runner::run(
        core.clone(),
        wake,
        outbox_tx,
        runner::RunnerConfig {
            cgroups: Cgroups::detect(&std::env::temp_dir().join("framecast-no-cgroup-here")),
            data_dir,
            game_user: None,
        },
        shutdown_rx,
    ));
    Harness {
        core,
        outbox,
        shutdown,
        task,
    }
}

fn plan(game: &str, tier: &str, warm: u16) -> Message {
    Message::PoolPlan(PoolPlan {
        plan_generation: 1,
        gpus: vec![GpuPlan {
            gpu: GpuId::new("sim-0").unwrap(),
            mode: GpuMode::EqualSize,
            profile: Some("L4-4Q".into()),
            vgpus: 6,
            warm: vec![WarmTarget {
                game: GameId::new(game).unwrap(),
                tier: TierName::new(tier).unwrap(),
                count: warm,
            }],
        }],
    })
}

fn reserve(n: u128, game: &str, slot: u32) -> Message {
    let now = Timestamp::now();
    Message::Reserve(Reserve {
        request_id: 1,
        session_id: SessionId::new(now, n),
        game: GameId::new(game).unwrap(),
        tier: TierName::new("1080p").unwrap(),
        gpu: GpuId::new("sim-0").unwrap(),
        slot,
        framebuffer: Megabytes::new(4096),
        compute_share: ComputeShare::MIN,
        encoder: EncoderUnits::ONE,
        expires_at: now,
    })
}

async fn until(what: &str, mut ok: impl FnMut() -> bool) {
    timeout(LIMIT, async {
        while !ok() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting until {what}"));
}

#[tokio::test]
async fn warm_synthetic_instances_come_up_and_a_session_takes_one() {
    let h = start(core(Vec::new()), None);
    h.core.lock().unwrap().handle(plan("arena", "1080p", 3));
    until("three warm instances", || {
        h.core.lock().unwrap().hello(1).warm.len() == 3
    })
    .await;
    let warm = h.core.lock().unwrap().hello(1).warm;
    let out = h
        .core
        .lock()
        .unwrap()
        .handle(reserve(1, "arena", warm[0].slot));
    assert!(
        matches!(out.as_slice(), [Message::Reserved(r)] if r.warm),
        "{out:?}"
    );
    // A replacement comes up in another slot.
    until("the warm pool refilled", || {
        h.core.lock().unwrap().hello(1).warm.len() == 3
    })
    .await;
    let slots: Vec<u32> = h
        .core
        .lock()
        .unwrap()
        .hello(1)
        .warm
        .iter()
        .map(|w| w.slot)
        .collect();
    assert!(!slots.contains(&warm[0].slot), "{slots:?}");
    h.shutdown.send(true).unwrap();
    timeout(LIMIT, h.task).await.unwrap().unwrap();
}

#[tokio::test]
async fn a_crashed_game_ends_its_session_and_the_broker_hears_why() {
    let game = AgentGameConfig {
        id: GameId::new("crashy").unwrap(),
        command: Some(PathBuf::from("/bin/sh")),
        args: vec!["-c".into(), "sleep 0.2; exit 3".into()],
        env: Default::default(),
        tiers: Vec::new(),
    };
    let mut h = start(core(vec![game]), None);
    let out = h.core.lock().unwrap().handle(reserve(7, "crashy", 0));
    assert!(
        matches!(out.as_slice(), [Message::Reserved(r)] if !r.warm),
        "{out:?}"
    );
    let update = timeout(LIMIT, h.outbox.recv()).await.unwrap().unwrap();
    match update {
        Message::SessionUpdate(u) => {
            assert_eq!(u.state, SessionState::Ended(EndReason::Error));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(h.core.lock().unwrap().session_count(), 0);
    h.shutdown.send(true).unwrap();
    timeout(LIMIT, h.task).await.unwrap().unwrap();
}

#[tokio::test]
async fn a_game_that_cannot_launch_ends_its_session() {
    let game = AgentGameConfig {
        id: GameId::new("missing").unwrap(),
        command: Some(PathBuf::from("/nonexistent/framecast-game")),
        args: Vec::new(),
        env: Default::default(),
        tiers: Vec::new(),
    };
    let mut h = start(core(vec![game]), None);
    h.core.lock().unwrap().handle(reserve(8, "missing", 0));
    let update = timeout(LIMIT, h.outbox.recv()).await.unwrap().unwrap();
    assert!(
        matches!(&update, Message::SessionUpdate(u) if u.state == SessionState::Ended(EndReason::Error)),
        "{update:?}"
    );
    h.shutdown.send(true).unwrap();
    timeout(LIMIT, h.task).await.unwrap().unwrap();
}

/// A game that writes its capture socket's path (or `unset`) to `out`, creates the socket
/// file the way a game's bind would, and exits after a moment.
fn shell_game(out: &Path) -> AgentGameConfig {
    let script = format!(
        "echo \"${{{CAPTURE_SOCKET_ENV}-unset}}\" > \"$OUT_FILE.tmp\" && mv \"$OUT_FILE.tmp\" \"$OUT_FILE\"; \
         if [ -n \"${CAPTURE_SOCKET_ENV}\" ]; then : > \"${CAPTURE_SOCKET_ENV}\"; fi; sleep 0.3; exit 3"
    );
    AgentGameConfig {
        id: GameId::new("shell").unwrap(),
        command: Some(PathBuf::from("/bin/sh")),
        args: vec!["-c".into(), script],
        env: [("OUT_FILE".to_owned(), out.to_str().unwrap().to_owned())]
            .into_iter()
            .collect(),
        tiers: Vec::new(),
    }
}

async fn file_text(path: &Path) -> String {
    timeout(LIMIT, async {
        loop {
            if let Ok(text) = std::fs::read_to_string(path) {
                return text.trim_end().to_owned();
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for {}", path.display()))
}

/// Runs one session of the shell game and returns what it saw, once its session has ended.
async fn run_game(data_dir: Option<PathBuf>, out: &Path) -> String {
    let mut h = start(core(vec![shell_game(out)]), data_dir);
    h.core.lock().unwrap().handle(reserve(1, "shell", 0));
    let seen = file_text(out).await;
    let update = timeout(LIMIT, h.outbox.recv()).await.unwrap().unwrap();
    assert!(
        matches!(&update, Message::SessionUpdate(u) if u.state == SessionState::Ended(EndReason::Error)),
        "{update:?}"
    );
    h.shutdown.send(true).unwrap();
    timeout(LIMIT, h.task).await.unwrap().unwrap();
    seen
}

#[tokio::test]
async fn a_game_process_finds_its_capture_socket_in_a_private_directory() {
    let data = tempfile::tempdir().unwrap();
    let out = data.path().join("seen.txt");
    let seen = PathBuf::from(run_game(Some(data.path().to_owned()), &out).await);
    let dir = data.path().join("capture");
    assert_eq!(seen.parent(), Some(dir.as_path()), "{}", seen.display());
    let name = seen.file_name().unwrap().to_str().unwrap();
    let instance = name.strip_suffix(".sock").unwrap();
    assert!(instance.starts_with("instance-"), "{name}");
    assert_eq!(socket_path(&dir, instance), seen);
    let mode = std::fs::metadata(&dir).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o700, "{mode:o}");
    // The game made its socket file; the runner removed it once the game had exited.
    assert!(!seen.exists(), "{} left behind", seen.display());
}

#[tokio::test]
async fn without_a_data_dir_a_game_gets_no_capture_socket() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("seen.txt");
    assert_eq!(run_game(None, &out).await, "unset");
}
