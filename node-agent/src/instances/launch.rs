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
    /// The synthetic game runs in the agent; the sender stops it.
    Synthetic(Option<oneshot::Sender<()>>, oneshot::Receiver<()>),
}

/// How an instance ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exit {
    /// Exit code, if the process exited normally.
    pub code: Option<i32>,
    /// How long it ran.
    pub ran: Duration,
}

/// Launches `spec`, placing a process in its cgroup where cgroups are available.
pub fn launch(spec: &LaunchSpec, cgroups: &Cgroups) -> Result<Running, LaunchError> {
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
            let child = Command::new(program)
                .args(&spec.args)
                .env_clear()
                .envs(inherited)
                .envs(&spec.env)
                // Its own process group, so stopping it stops everything it started.
                .process_group(0)
                .stdin(Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .map_err(err)?;
            if let Some(pid) = child.id()
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

    /// The OS process id, for a process instance that is still running.
    pub fn pid(&self) -> Option<u32> {
        match &self.kind {
            Kind::Process(c) => c.id(),
            Kind::Synthetic(..) => None,
        }
    }

    /// Waits until the instance ends.
    pub async fn wait(&mut self) -> Exit {
        let code = match &mut self.kind {
            Kind::Process(child) => child.wait().await.ok().and_then(|s| s.code()),
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
            Kind::Synthetic(stop, _) => {
                if let Some(tx) = stop.take() {
                    let _ = tx.send(());
                }
            }
        }
    }
}
