//! Launching game instances: a process with its GPU, vGPU and limits in its environment, or
//! the built-in synthetic game.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};
use tokio::sync::oneshot;
use uuid::Uuid;

use framecast_shared::config::agent::AgentGameConfig;
use framecast_shared::ids::GpuId;
use framecast_shared::tier::TierPreset;

use super::cgroup::{Cgroups, Limits};

/// The user and group game processes run as (`instances.user`) instead of the agent's. The
/// agent, as root, joins the game's cgroup first and then drops to them (supplementary groups
/// cleared) just before it runs the game.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GameUser {
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
}

/// Why `instances.user` names no user.
#[derive(Debug, thiserror::Error)]
#[error("instances.user = {spec:?}: {reason}")]
pub struct GameUserError {
    spec: String,
    reason: String,
}

impl GameUser {
    /// Resolves `spec`: a user name (with its primary group), `user:group` (names or numbers),
    /// or numeric `uid:gid`. Names are looked up in the host's user database.
    pub fn resolve(spec: &str) -> Result<Self, GameUserError> {
        let fail = |reason: String| GameUserError {
            spec: spec.to_owned(),
            reason,
        };
        let (user, group) = match spec.split_once(':') {
            Some((u, g)) => (u.trim(), Some(g.trim())),
            None => (spec.trim(), None),
        };
        let (uid, primary) = match user.parse::<u32>() {
            Ok(uid) => (uid, None),
            Err(_) => match nix::unistd::User::from_name(user) {
                Ok(Some(u)) => (u.uid.as_raw(), Some(u.gid.as_raw())),
                Ok(None) => return Err(fail(format!("no user {user} on this host"))),
                Err(e) => return Err(fail(format!("looking up user {user}: {e}"))),
            },
        };
        let gid = match group {
            None => primary
                .ok_or_else(|| fail("a numeric user needs its group too: uid:gid".to_owned()))?,
            Some(g) => match g.parse::<u32>() {
                Ok(gid) => gid,
                Err(_) => match nix::unistd::Group::from_name(g) {
                    Ok(Some(grp)) => grp.gid.as_raw(),
                    Ok(None) => return Err(fail(format!("no group {g} on this host"))),
                    Err(e) => return Err(fail(format!("looking up group {g}: {e}"))),
                },
            },
        };
        Ok(Self { uid, gid })
    }
}

/// Everything needed to launch one instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchSpec {
    /// A name for logs and the cgroup (`instance-<id>`).
    pub name: String,
    /// The program; `None` runs the built-in synthetic game.
    pub command: Option<PathBuf>,
    /// Its arguments.
    pub args: Vec<String>,
    /// Its environment, on top of the agent's.
    pub env: BTreeMap<String, String>,
    /// CPU and memory limits.
    pub limits: Limits,
}

impl LaunchSpec {
    /// The spec for an instance of `game` at `tier` on `gpu` (and `vgpu`, where one is
    /// assigned). The game's own environment comes first; the agent's `FRAMECAST_*` variables
    /// and the GPU selection are set over it.
    pub fn new(
        name: String,
        game: &AgentGameConfig,
        tier: &TierPreset,
        gpu: &GpuId,
        vgpu: Option<Uuid>,
    ) -> Self {
        let mut env = game.env.clone();
        env.extend(instance_env(gpu, vgpu, tier));
        Self {
            name,
            command: game.command.clone(),
            args: game.args.clone(),
            env,
            limits: Limits {
                cpu_millicores: tier.cpu_millicores,
                // Host memory: the tier's framebuffer again as a working set, at least 2 GiB.
                memory_mb: tier.framebuffer.megabytes().get().max(2048),
            },
        }
    }
}

/// Variables of the agent's own environment a game may see; everything else (the agent's
/// `FRAMECAST_*` settings, credentials) stays out.
pub const PASSED_THROUGH: [&str; 8] = [
    "PATH",
    "HOME",
    "USER",
    "LANG",
    "LC_ALL",
    "TZ",
    "TMPDIR",
    "XDG_RUNTIME_DIR",
];

/// The variables an instance finds in its environment.
pub fn instance_env(
    gpu: &GpuId,
    vgpu: Option<Uuid>,
    tier: &TierPreset,
) -> BTreeMap<String, String> {
    let mut env = BTreeMap::from([
        ("FRAMECAST_GPU".to_owned(), gpu.to_string()),
        ("FRAMECAST_TIER".to_owned(), tier.name.to_string()),
        (
            "FRAMECAST_WIDTH".to_owned(),
            tier.resolution.width.to_string(),
        ),
        (
            "FRAMECAST_HEIGHT".to_owned(),
            tier.resolution.height.to_string(),
        ),
        ("FRAMECAST_FPS".to_owned(), tier.fps.to_string()),
        (
            "FRAMECAST_FRAMEBUFFER_MB".to_owned(),
            tier.framebuffer.megabytes().get().to_string(),
        ),
        (
            "FRAMECAST_COMPUTE_SIXTEENTHS".to_owned(),
            tier.compute_share.sixteenths().to_string(),
        ),
        (
            "FRAMECAST_BITRATE_KBPS".to_owned(),
            tier.bitrate_kbps.to_string(),
        ),
    ]);
    if let Some(v) = vgpu {
        env.insert("FRAMECAST_VGPU".to_owned(), v.hyphenated().to_string());
    }
    // CUDA and the NVIDIA container runtime select a GPU by its NVML UUID.
    if gpu.as_str().starts_with("GPU-") {
        env.insert("CUDA_VISIBLE_DEVICES".to_owned(), gpu.to_string());
        env.insert("NVIDIA_VISIBLE_DEVICES".to_owned(), gpu.to_string());
    }
    env
}

/// Why an instance could not be launched.
#[derive(Debug, thiserror::Error)]
#[error("launching {name}: {error}")]
pub struct LaunchError {
    /// The instance.
    pub name: String,
    /// What failed.
    pub error: std::io::Error,
}

/// A launched instance.
#[derive(Debug)]
pub struct Running {
    name: String,
    started: Instant,
    kind: Kind,
}

#[derive(Debug)]
enum Kind {
    Process(Child),
    /// A process an earlier agent launched, found again after a restart: not our child, so
    /// its exit is noticed by polling.
    Adopted(ProcessId),
    /// The synthetic game runs in the agent; the sender stops it.
    Synthetic(Option<oneshot::Sender<()>>, oneshot::Receiver<()>),
}

/// A process, told apart from a later one that reuses its pid by its start time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ProcessId {
    /// The pid (also its process group: instances lead their own group).
    pub pid: u32,
    /// Its start time in clock ticks after boot (`/proc/<pid>/stat`, field 22).
    pub start_ticks: u64,
}

impl ProcessId {
    /// The process `pid` as it is now, if it exists.
    pub fn of(pid: u32) -> Option<Self> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        Some(Self {
            pid,
            start_ticks: start_ticks(&stat)?,
        })
    }

    /// Kills the process group this process leads, if this very process still runs (a pid
    /// reused by another process is left alone).
    pub fn kill_group(&self) -> Result<(), nix::Error> {
        if !self.alive() {
            return Ok(());
        }
        let pgid = i32::try_from(self.pid).map_err(|_| nix::Error::EINVAL)?;
        nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(pgid),
            nix::sys::signal::Signal::SIGKILL,
        )
    }

    /// Whether this very process still runs (not a zombie, not a newer process on the pid).
    pub fn alive(&self) -> bool {
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{}/stat", self.pid)) else {
            return false;
        };
        let zombie = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state == "Z" || state == "X");
        !zombie && start_ticks(&stat) == Some(self.start_ticks)
    }
}

/// Field 22 of `/proc/<pid>/stat`; the command name before it may hold spaces and ')'.
fn start_ticks(stat: &str) -> Option<u64> {
    let (_, rest) = stat.rsplit_once(')')?;
    // `rest` starts at field 3 (state); starttime is field 22.
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// How an instance ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exit {
    /// Exit code, if the process exited normally.
    pub code: Option<i32>,
    /// How long it ran.
    pub ran: Duration,
}

/// How often an adopted process is checked for its exit.
const ADOPTED_POLL: Duration = Duration::from_millis(250);

/// Launches `spec`, placing a process in its cgroup where cgroups are available, as `user`
/// where one is given.
pub fn launch(
    spec: &LaunchSpec,
    cgroups: &Cgroups,
    user: Option<GameUser>,
) -> Result<Running, LaunchError> {
    let err = |error| LaunchError {
        name: spec.name.clone(),
        error,
    };
    let kind = match &spec.command {
        None => {
            let (stop_tx, stop_rx) = oneshot::channel::<()>();
            let (done_tx, done_rx) = oneshot::channel::<()>();
            // The synthetic game idles until stopped; rendering and input arrive with the
            // streaming pipeline.
            tokio::spawn(async move {
                let _ = stop_rx.await;
                let _ = done_tx.send(());
            });
            Kind::Synthetic(Some(stop_tx), done_rx)
        }
        Some(program) => {
            let inherited = PASSED_THROUGH
                .iter()
                .filter_map(|k| std::env::var_os(k).map(|v| (*k, v)));
            // Inside its cgroup from its first instruction where the agent can do that.
            let mut placed = false;
            let mut command = match cgroups.exec_helper() {
                Some(helper) => match cgroups.prepare(&spec.name, spec.limits) {
                    Ok(Some(dir)) => {
                        placed = true;
                        let mut c = Command::new(helper);
                        c.arg("exec-in-cgroup");
                        // The helper joins the cgroup as the agent, then drops to the user.
                        if let Some(u) = user {
                            c.arg("--uid")
                                .arg(u.uid.to_string())
                                .arg("--gid")
                                .arg(u.gid.to_string());
                        }
                        c.arg(dir).arg("--").arg(program);
                        c
                    }
                    Ok(None) => Command::new(program),
                    Err(e) => {
                        tracing::warn!(instance = %spec.name, error = %e, "could not prepare the cgroup");
                        Command::new(program)
                    }
                },
                None => Command::new(program),
            };
            if let (Some(u), false) = (user, placed) {
                command.uid(u.uid).gid(u.gid);
            }
            let child = command
                .args(&spec.args)
                .env_clear()
                .envs(inherited)
                .envs(&spec.env)
                // Its own process group, so stopping it stops everything it started.
                .process_group(0)
                .stdin(Stdio::null())
                // A session's game outlives an agent restart; the runner stops what must stop.
                .kill_on_drop(false)
                .spawn()
                .map_err(err)?;
            if !placed
                && let Some(pid) = child.id()
                && let Err(e) = cgroups.place(&spec.name, pid, spec.limits)
            {
                tracing::warn!(instance = %spec.name, error = %e, "could not apply cgroup limits");
            }
            Kind::Process(child)
        }
    };
    Ok(Running {
        name: spec.name.clone(),
        started: Instant::now(),
        kind,
    })
}

impl Running {
    /// The instance's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Takes over a process an earlier agent launched.
    pub fn adopt(name: String, process: ProcessId) -> Self {
        Self {
            name,
            started: Instant::now(),
            kind: Kind::Adopted(process),
        }
    }

    /// The OS process, for a process instance that is still running.
    pub fn process(&self) -> Option<ProcessId> {
        match &self.kind {
            Kind::Process(c) => c.id().and_then(ProcessId::of),
            Kind::Adopted(p) => Some(*p),
            Kind::Synthetic(..) => None,
        }
    }

    /// The OS process id, for a process instance that is still running.
    pub fn pid(&self) -> Option<u32> {
        match &self.kind {
            Kind::Process(c) => c.id(),
            Kind::Adopted(p) => Some(p.pid),
            Kind::Synthetic(..) => None,
        }
    }

    /// Waits until the instance ends.
    pub async fn wait(&mut self) -> Exit {
        let code = match &mut self.kind {
            Kind::Process(child) => child.wait().await.ok().and_then(|s| s.code()),
            Kind::Adopted(p) => {
                while p.alive() {
                    tokio::time::sleep(ADOPTED_POLL).await;
                }
                None
            }
            Kind::Synthetic(_, done) => {
                let _ = done.await;
                Some(0)
            }
        };
        Exit {
            code,
            ran: self.started.elapsed(),
        }
    }

    /// Asks the instance to stop (the process is killed; the synthetic game ends).
    pub async fn stop(&mut self) {
        match &mut self.kind {
            Kind::Process(child) => match child.id().and_then(|pid| i32::try_from(pid).ok()) {
                Some(pgid) => {
                    if let Err(e) = nix::sys::signal::killpg(
                        nix::unistd::Pid::from_raw(pgid),
                        nix::sys::signal::Signal::SIGKILL,
                    ) {
                        tracing::warn!(instance = %self.name, error = %e, "could not kill the process group");
                        let _ = child.start_kill();
                    }
                }
                None => {
                    let _ = child.start_kill();
                }
            },
            Kind::Adopted(p) => {
                if let Err(e) = p.kill_group() {
                    tracing::warn!(instance = %self.name, error = %e, "could not kill the adopted process group");
                }
            }
            Kind::Synthetic(stop, _) => {
                if let Some(tx) = stop.take() {
                    let _ = tx.send(());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_start_time_is_read_past_a_command_name_with_spaces_and_parens() {
        let stat = "4242 (my game (x)) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 50";
        assert_eq!(start_ticks(stat), Some(987_654));
        assert_eq!(start_ticks("garbage"), None);
    }

    #[test]
    fn this_process_is_alive_and_a_changed_start_time_is_not() {
        let me = ProcessId::of(std::process::id()).unwrap();
        assert!(me.alive());
        let reused = ProcessId {
            start_ticks: me.start_ticks + 1,
            ..me
        };
        assert!(
            !reused.alive(),
            "a pid reused by a newer process is not ours"
        );
    }
}
