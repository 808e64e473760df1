//! The async shell around the supervisor: launches and stops instances as the agent's core
//! asks, waits for them to exit, and tells the core what happened.
//!
//! The core decides (it is sans IO, see [`super::supervisor`]); the runner only executes.
//! Whatever the core wants to tell the broker as a result (a session that ended because its
//! instance crashed) goes to the link's outbox.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::{Notify, mpsc, oneshot, watch};

use framecast_shared::ids::GpuId;
use framecast_shared::protocol::Message;
use framecast_shared::time::Timestamp;

use super::cgroup::Cgroups;
use super::launch::{Exit, GameUser, LaunchSpec, ProcessId, Running, launch};
use super::supervisor::InstanceId;
use crate::stream::capture;

/// An instance on the node: its GPU and its number within that GPU's supervisor.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct InstanceKey {
    /// The GPU.
    pub gpu: GpuId,
    /// The instance.
    pub id: InstanceId,
}

impl std::fmt::Display for InstanceKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.gpu, self.id)
    }
}

/// What the core asks the runner to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InstanceCommand {
    /// Launch an instance.
    Start {
        /// Which.
        key: InstanceKey,
        /// How.
        spec: LaunchSpec,
    },
    /// Stop an instance (the exit is reported as usual).
    Stop {
        /// Which.
        key: InstanceKey,
    },
    /// Watch a process an earlier agent launched (found again after a restart).
    Adopt {
        /// Which.
        key: InstanceKey,
        /// Its name, also its cgroup's.
        name: String,
        /// The process.
        process: ProcessId,
    },
}

/// Where the runner keeps what must survive the agent.
#[derive(Debug)]
pub struct RunnerConfig {
    /// Limits for instances.
    pub cgroups: Cgroups,
    /// The data directory the host's snapshots go to (see [`InstanceHost::take_snapshot`]),
    /// and the games' capture sockets (see [`crate::stream::capture`]); `None` keeps nothing
    /// and gives games no capture socket.
    pub data_dir: Option<PathBuf>,
    /// The user game processes run as; the agent's own when `None`.
    pub game_user: Option<GameUser>,
}

/// The file in the data directory that lists running sessions and their processes.
pub const SESSIONS_FILE: &str = "sessions.toml";

/// What the runner needs from the agent's core.
pub trait InstanceHost: Send {
    /// The next command at `now`, if any.
    fn poll_command(&mut self, now: Timestamp) -> Option<InstanceCommand>;
    /// The instance was launched; `process` is its process, `None` for the synthetic game.
    fn started(&mut self, key: &InstanceKey, process: Option<ProcessId>);
    /// The instance ended at `now` after running for `ran` (or could not be launched, with
    /// `ran` zero). Returns messages for the broker.
    fn exited(&mut self, key: &InstanceKey, now: Timestamp, ran: Duration) -> Vec<Message>;
    /// When the core next wants to be polled even if nothing happens (a restart backoff).
    fn next_deadline(&self) -> Option<Timestamp>;
    /// Whether the instance keeps running when the agent shuts down (a session's game
    /// process, which the next agent adopts); others are stopped.
    fn keep_on_shutdown(&self, key: &InstanceKey) -> bool;
    /// What must survive a restart, when it changed since the last call: the contents of
    /// [`SESSIONS_FILE`].
    fn take_snapshot(&mut self) -> Option<String>;
}

/// Executes the host's commands until `shutdown` turns true. `wake` is notified by the host
/// whenever it has queued commands; messages for the broker go to `outbox`.
///
/// On shutdown every instance the runner launched is stopped. (Instances that must outlive
/// the agent are adopted by the next agent from its data directory instead.)
pub async fn run<H: InstanceHost + ?Sized>(
    host: Arc<Mutex<H>>,
    wake: Arc<Notify>,
    outbox: mpsc::UnboundedSender<Message>,
    config: RunnerConfig,
    mut shutdown: watch::Receiver<bool>,
) {
    let RunnerConfig {
        cgroups,
        data_dir,
        game_user,
    } = config;
    // Game processes bind their capture socket in here (see `stream::capture`).
    let capture_dir = data_dir.as_deref().and_then(|dir| {
        capture::prepare_capture_dir(dir, game_user.map(|u| u.gid))
            .inspect_err(|e| tracing::warn!(dir = %dir.display(), error = %e, "no capture directory; games cannot stream frames"))
            .ok()
    });
    // Snapshots are written by their own task, newest first, so a slow disk never holds up
    // launching and stopping games.
    let (snapshots, snapshots_rx) = watch::channel(None::<String>);
    let persister = data_dir.map(|dir| tokio::spawn(persist(dir, snapshots_rx)));
    let (exit_tx, mut exit_rx) = mpsc::unbounded_channel::<(InstanceKey, Exit)>();
    let mut launched: BTreeMap<InstanceKey, Launched> = BTreeMap::new();
    loop {
        loop {
            let command = lock(&host).poll_command(Timestamp::now());
            let command = command.map(|c| with_capture_socket(c, capture_dir.as_deref()));
            match command {
                None => break,
                Some(InstanceCommand::Start { key, spec }) => {
                    match launch(&spec, &cgroups, game_user) {
                        Ok(running) => {
                            tracing::info!(instance = %key, name = %spec.name, pid = running.pid(), "instance started");
                            lock(&host).started(&key, running.process());
                            launched.insert(key.clone(), watch(key, running, &exit_tx));
                        }
                        Err(e) => {
                            tracing::warn!(instance = %key, error = %e, "instance could not be launched");
                            // Sent under the core's lock, so a hello built meanwhile cannot
                            // overtake it.
                            let mut core = lock(&host);
                            let replies = core.exited(&key, Timestamp::now(), Duration::ZERO);
                            send_all(&outbox, replies);
                            drop(core);
                        }
                    }
                }
                Some(InstanceCommand::Adopt { key, name, process }) => {
                    tracing::info!(instance = %key, pid = process.pid, "watching a game process from before the restart");
                    let running = Running::adopt(name, process);
                    launched.insert(key.clone(), watch(key, running, &exit_tx));
                }
                Some(InstanceCommand::Stop { key }) => match launched.get_mut(&key) {
                    Some(l) => {
                        // Its exit arrives from its watcher.
                        if let Some(stop) = l.stop.take() {
                            let _ = stop.send(());
                        }
                    }
                    None => {
                        // Never launched (or already gone): it ends now.
                        // Sent under the core's lock, so a hello built meanwhile cannot
                        // overtake it.
                        let mut core = lock(&host);
                        let replies = core.exited(&key, Timestamp::now(), Duration::ZERO);
                        send_all(&outbox, replies);
                        drop(core);
                    }
                },
            }
        }
        if let Some(text) = lock(&host).take_snapshot() {
            let _ = snapshots.send(Some(text));
        }
        let deadline = lock(&host).next_deadline();
        let sleep = async {
            match deadline {
                Some(at) => {
                    let wait = Duration::from_millis(
                        at.as_millis().saturating_sub(Timestamp::now().as_millis()),
                    );
                    tokio::time::sleep(wait).await;
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = wake.notified() => {}
            () = sleep => {}
            Some((key, exit)) = exit_rx.recv() => {
                tracing::info!(instance = %key, code = exit.code, ran_ms = exit.ran.as_millis(), "instance exited");
                if let Some(l) = launched.remove(&key) {
                    if let Err(e) = cgroups.remove(&l.name) {
                        tracing::debug!(instance = %key, error = %e, "cgroup not removed");
                    }
                    if let Some(dir) = &capture_dir {
                        capture::remove_socket(dir, &l.name);
                    }
                }
                let mut core = lock(&host);
                let replies = core.exited(&key, Timestamp::now(), exit.ran);
                send_all(&outbox, replies);
                drop(core);
            }
            _ = shutdown.changed() => {
                {
                    let host = lock(&host);
                    for (key, l) in &mut launched {
                        let stop = l.stop.take();
                        if host.keep_on_shutdown(key) {
                            // Dropping the sender unsent leaves the process alone.
                            tracing::info!(instance = %key, "left running for the next agent to adopt");
                        } else if let Some(stop) = stop {
                            let _ = stop.send(());
                        }
                    }
                }
                drop(exit_tx);
                // Give the watchers a moment to kill their process groups.
                let _ = tokio::time::timeout(Duration::from_secs(2), async {
                    while exit_rx.recv().await.is_some() {}
                }).await;
                // The last snapshot lands before the agent exits.
                if let Some(text) = lock(&host).take_snapshot() {
                    let _ = snapshots.send(Some(text));
                }
                drop(snapshots);
                if let Some(p) = persister {
                    let _ = p.await;
                }
                return;
            }
        }
    }
}

/// Writes each newest snapshot to the sessions file until the runner drops its sender (after
/// a last snapshot, which is written too).
async fn persist(dir: PathBuf, mut snapshots: watch::Receiver<Option<String>>) {
    // `changed` still reports a value sent just before the sender was dropped.
    while snapshots.changed().await.is_ok() {
        let text = snapshots.borrow_and_update().clone();
        if let Some(text) = text {
            let dir = dir.clone();
            let written = tokio::task::spawn_blocking(move || {
                crate::datadir::write_atomic(&dir, SESSIONS_FILE, text.as_bytes())
            })
            .await;
            if !matches!(written, Ok(Ok(()))) {
                tracing::error!(result = ?written, "could not record running sessions; an agent restart would lose track of them");
            }
        }
    }
}

/// An instance the runner launched and watches.
struct Launched {
    /// Tells its watcher to stop it; taken once sent.
    stop: Option<oneshot::Sender<()>>,
    /// Its name, which is also its cgroup's.
    name: String,
}

/// Starts watching `running`; what the runner keeps to stop it.
fn watch(
    key: InstanceKey,
    running: Running,
    exits: &mpsc::UnboundedSender<(InstanceKey, Exit)>,
) -> Launched {
    let (stop_tx, stop_rx) = oneshot::channel();
    let name = running.name().to_owned();
    tokio::spawn(watch_instance(key, running, stop_rx, exits.clone()));
    Launched {
        stop: Some(stop_tx),
        name,
    }
}

/// Waits for an instance to exit or to be told to stop, then reports its exit. A stop
/// channel dropped without a message (the agent shuts down and leaves the instance running)
/// ends the watch without touching the instance.
async fn watch_instance(
    key: InstanceKey,
    mut running: Running,
    stop: oneshot::Receiver<()>,
    exits: mpsc::UnboundedSender<(InstanceKey, Exit)>,
) {
    let exit = tokio::select! {
        exit = running.wait() => exit,
        asked = stop => {
            if asked.is_err() {
                return;
            }
            running.stop().await;
            running.wait().await
        }
    };
    let _ = exits.send((key, exit));
}

/// Gives a game process the path of its capture socket in `capture_dir`, where there is one
/// (the synthetic game has no process, hence no socket).
fn with_capture_socket(
    mut command: InstanceCommand,
    capture_dir: Option<&Path>,
) -> InstanceCommand {
    if let (InstanceCommand::Start { spec, .. }, Some(dir)) = (&mut command, capture_dir)
        && spec.command.is_some()
    {
        capture::set_socket_env(&mut spec.env, dir, &spec.name);
    }
    command
}

fn send_all(outbox: &mpsc::UnboundedSender<Message>, messages: Vec<Message>) {
    for m in messages {
        // The link may be gone at shutdown; the next hello carries the full state anyway.
        let _ = outbox.send(m);
    }
}

fn lock<H: ?Sized>(host: &Mutex<H>) -> std::sync::MutexGuard<'_, H> {
    // The core's invariants hold between calls; a panic in one leaves the last completed state.
    host.lock().unwrap_or_else(PoisonError::into_inner)
}
