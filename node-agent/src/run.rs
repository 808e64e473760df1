//! `framecast-agent run`: the agent process, wiring inventory, encoder slots, the vGPU pool,
//! the core state and the control link together.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::sync::watch;

use framecast_shared::config::AgentConfig;
use framecast_shared::config::agent::VgpuBackendKind;
use framecast_shared::ids::NodeId;
use framecast_shared::time::Timestamp;
use framecast_shared::{ops, tls};

use crate::core::{AgentCore, CoreGpu, InstancePolicy, Snapshot};
use crate::encoder::EncoderSlots;
use crate::instances::cgroup::Cgroups;
use crate::instances::launch::GameUser;
use crate::instances::runner;
use crate::instances::supervisor::Backoff;
use crate::inventory;
use crate::link::{self, AgentState, LinkChannels, LinkConfig, LinkState};
use crate::stream::{self, StreamOptions, Streams};
use crate::vgpu::mdev::MdevBackend;
use crate::vgpu::mig;
use crate::vgpu::simulated::SimulatedBackend;
use crate::vgpu::{GpuHandle, VgpuBackend, VgpuPool, sysfs_pci};

/// Runs the agent until the process is interrupted or the broker refuses it.
pub async fn run(config: AgentConfig, simulate: Option<&Path>) -> anyhow::Result<()> {
    let (stop_tx, stop) = watch::channel(false);
    tokio::spawn(async move {
        ops::terminated().await;
        tracing::info!("shutting down");
        let _ = stop_tx.send(true);
    });
    run_until(config, simulate, stop).await
}

/// Runs the agent until `stop` turns true (or the broker refuses it); for agents run
/// in-process by the broker's dev mode and by tests.
pub async fn run_until(
    config: AgentConfig,
    simulate: Option<&Path>,
    mut stop: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let node_id = match &config.node_id {
        Some(id) => id.clone(),
        None => host_name().context(
            "node_id is not set and the host name cannot be used as one; set node_id in agent.toml",
        )?,
    };
    let Some(tls_files) = &config.broker.tls else {
        bail!(
            "broker.tls is required: the control link uses mutual TLS (ca_cert, cert and key of this agent)"
        );
    };
    let (ca, cert, key) = tls::read_files(tls_files)?;
    let client_tls = tls::client_config(&ca, &cert, &key)?;

    #[cfg(feature = "nvenc")]
    if std::env::var("CUDA_DEVICE_ORDER").as_deref() != Ok("PCI_BUS_ID") {
        // NVENC opens the GPU by its CUDA ordinal, taken from NVML's index; the two agree only
        // in PCI bus order.
        tracing::warn!(
            "CUDA_DEVICE_ORDER is not PCI_BUS_ID: NVENC may encode on another GPU than the session's; set CUDA_DEVICE_ORDER=PCI_BUS_ID in the agent's environment"
        );
    }
    let inventory = inventory::open(&config.inventory, simulate)?;
    let found = inventory.gpus()?;
    tracing::info!(
        source = inventory.source(),
        gpus = found.len(),
        "inventory read"
    );

    let backend: Box<dyn VgpuBackend> = match config.vgpu.backend {
        VgpuBackendKind::Simulated => Box::new(SimulatedBackend::default()),
        VgpuBackendKind::Mdev => Box::new(MdevBackend::new(
            &config.vgpu.sysfs_root,
            config.data_dir.join("vgpus"),
        )),
        VgpuBackendKind::Mig => {
            // The MIG backend addresses GPUs by their NVML UUIDs.
            if inventory.source() != "nvml" {
                bail!(
                    "vgpu.backend = \"mig\" needs GPUs found through NVML, but the inventory is {}; \
                     set inventory.source = \"nvml\" on a host with the NVIDIA driver",
                    inventory.source()
                );
            }
            Box::new(mig::open(config.data_dir.join("mig"))?)
        }
    };
    let mut pool = VgpuPool::new(backend);
    let mut gpus = Vec::with_capacity(found.len());
    for f in found {
        let handle = GpuHandle {
            id: f.id.clone(),
            pci: f.pci_bus_id.as_deref().and_then(sysfs_pci),
        };
        let adopted = pool
            .add_gpu(handle, f.spec.clone(), f.mode)
            .with_context(|| format!("adding {} to the vGPU pool", f.id))?;
        if adopted > 0 {
            tracing::info!(gpu = %f.id, adopted, "found this agent's vGPUs from before");
        }
        gpus.push(CoreGpu {
            encoder: EncoderSlots::for_gpu(f.id.clone(), &f.spec, f.encoder.h264_capacity_pct),
            found: f,
        });
    }

    // Bound before the hello is built: with port 0 (dev mode, tests) the hello reports the
    // port the system chose.
    let whep_listener = tokio::net::TcpListener::bind(config.whep.listen)
        .await
        .with_context(|| format!("whep.listen {}: cannot bind", config.whep.listen))?;
    let whep_addr = whep_listener.local_addr()?;
    let generation = link::generation::next(&config.data_dir)
        .with_context(|| format!("generation counter in {}", config.data_dir.display()))?;
    let broker = resolve(&config.broker.address).await?;
    let core = AgentCore::new(
        node_id.clone(),
        config.region.clone(),
        None,
        gpus,
        framecast_shared::tier::TierPreset::defaults(),
        config.games.clone(),
        pool,
        Box::new(Timestamp::now),
    )
    .with_generation(generation)
    .with_whep_url(
        config
            .whep
            .public_url
            .clone()
            .unwrap_or_else(|| format!("http://{whep_addr}")),
    )
    .with_policy(InstancePolicy {
        backoff: Backoff {
            min: Duration::from_millis(config.instances.restart_backoff_min_ms),
            max: Duration::from_millis(config.instances.restart_backoff_max_ms),
        },
        healthy_after: Duration::from_secs(config.instances.healthy_after_s),
    });
    let (stream_stops, ended) = tokio::sync::mpsc::unbounded_channel();
    let mut core = core.with_stream_stops(stream_stops);
    adopt_sessions(&mut core, &config.data_dir)?;
    let wake = core.wake_handle();
    let core = Arc::new(Mutex::new(core));
    let agent: Arc<Mutex<dyn AgentState>> = core.clone();
    let game_user = game_user(&config)?;
    let cgroups = match &config.instances.cgroup_root {
        // /proc/self/exe still runs this binary after a package upgrade replaced the file.
        Some(root) => Cgroups::detect(root).with_exec_helper(PathBuf::from("/proc/self/exe")),
        None => Cgroups::disabled(),
    };

    let link_config = LinkConfig {
        broker,
        server_name: config.broker.server_name.clone(),
        tls: Arc::new(client_tls),
        max_frame: config.broker.max_frame_bytes,
        backoff_min: Duration::from_millis(500),
        backoff_max: Duration::from_secs(30),
    };
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let (state_tx, state_rx) = watch::channel(LinkState::Connecting);
    let (outbox_tx, outbox) = tokio::sync::mpsc::unbounded_channel();
    let streams = Streams::new(
        core.clone(),
        outbox_tx.clone(),
        StreamOptions::from_config(&config.whep, &config.data_dir),
    )
    .context("setting up WebRTC")?;
    tokio::spawn(streams.clone().stop_ended(ended, shutdown_rx.clone()));
    let ops = ops_endpoint(
        &config,
        core.clone(),
        streams.clone(),
        state_rx,
        shutdown_rx.clone(),
    )
    .await?;
    tracing::info!(listen = %whep_addr, "serving WHEP for players");
    let whep = {
        let router = stream::whep::router(streams.clone());
        let shutdown = shutdown_rx.clone();
        tokio::spawn(async move {
            if let Err(e) = ops::serve(whep_listener, router, shutdown).await {
                tracing::error!(error = %e, "WHEP endpoint failed");
            }
        })
    };
    let instances = tokio::spawn(runner::run(
        core,
        wake,
        outbox_tx,
        runner::RunnerConfig {
            cgroups,
            data_dir: Some(config.data_dir.clone()),
            game_user,
        },
        shutdown_rx.clone(),
    ));
    let shutdown_tx_for_exit = shutdown_tx.clone();
    tokio::spawn(async move {
        let _ = stop.wait_for(|s| *s).await;
        let _ = shutdown_tx.send(true);
    });
    tracing::info!(node = %node_id, generation, %broker, "agent starting");
    let linked = link::run(
        link_config,
        agent,
        generation,
        LinkChannels {
            shutdown: shutdown_rx,
            state: state_tx,
            outbox,
        },
    )
    .await;
    // The runner stops the instances it launched once shutdown is signalled; when the link
    // stopped for another reason, signal it here.
    let _ = shutdown_tx_for_exit.send(true);
    streams.stop_all().await;
    let _ = instances.await;
    let _ = ops.await;
    let _ = whep.await;
    linked?;
    Ok(())
}

/// Takes over the game processes of sessions an earlier agent left running, from the
/// sessions file in the data directory. A file that cannot be read as one is moved aside
/// (and logged) rather than stopping the node.
fn adopt_sessions(core: &mut AgentCore, data_dir: &Path) -> anyhow::Result<()> {
    let path = data_dir.join(runner::SESSIONS_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    match toml::from_str::<Snapshot>(&text) {
        Ok(snapshot) => {
            let adoption = core.adopt(snapshot, &|p| p.alive());
            tracing::info!(
                adopted = adoption.adopted.len(),
                dropped = adoption.dropped.len(),
                "sessions from before the restart"
            );
            for orphan in adoption.orphans {
                // A game nothing tracks would hold its vGPU for ever.
                tracing::warn!(
                    pid = orphan.pid,
                    "stopping the game of a session that could not be adopted"
                );
                if let Err(e) = orphan.kill_group() {
                    tracing::warn!(pid = orphan.pid, error = %e, "could not stop it");
                }
            }
        }
        Err(e) => {
            let aside = path.with_extension("toml.unreadable");
            tracing::error!(file = %path.display(), error = %e, moved_to = %aside.display(), "the sessions file is unreadable; game processes it lists are not adopted");
            std::fs::rename(&path, &aside)
                .with_context(|| format!("moving {} aside", path.display()))?;
        }
    }
    Ok(())
}

/// Binds `/metrics`, `/livez` and `/readyz` (ready while the control link is up) and serves
/// them until shutdown.
async fn ops_endpoint(
    config: &AgentConfig,
    core: Arc<Mutex<AgentCore>>,
    streams: Streams,
    link: watch::Receiver<LinkState>,
    shutdown: watch::Receiver<bool>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let handle = ops::recorder()?;
    let listener = tokio::net::TcpListener::bind(config.http.listen)
        .await
        .with_context(|| format!("http.listen {}: cannot bind", config.http.listen))?;
    let ready_link = link.clone();
    let ready: ops::Readiness = Arc::new(move || match &*ready_link.borrow() {
        LinkState::Connected => Ok(()),
        LinkState::Connecting => Err("control link connecting".into()),
        LinkState::Backoff { error } => Err(format!("control link down: {error}")),
        LinkState::Stopped => Err("control link stopped".into()),
    });
    let hook: ops::ScrapeHook = Arc::new(move || {
        let link = link.borrow().clone();
        let core = core
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        crate::metrics::record_state(&core, &link, streams.live_count());
    });
    tracing::info!(listen = %config.http.listen, "serving /metrics, /livez and /readyz");
    let router = ops::router(handle, ready, Some(hook));
    Ok(tokio::spawn(async move {
        if let Err(e) = ops::serve(listener, router, shutdown).await {
            tracing::error!(error = %e, "operations endpoint failed");
        }
    }))
}

/// The host name, as a node id.
fn host_name() -> anyhow::Result<NodeId> {
    let name =
        std::fs::read_to_string("/proc/sys/kernel/hostname").context("reading the host name")?;
    Ok(NodeId::new(name.trim())?)
}

async fn resolve(address: &str) -> anyhow::Result<SocketAddr> {
    tokio::net::lookup_host(address)
        .await
        .with_context(|| format!("resolving broker.address {address:?}"))?
        .next()
        .with_context(|| format!("broker.address {address:?} resolves to nothing"))
}

/// The user games run as (`instances.user`), resolved on this host; a warning when games with
/// a program would run as root.
fn game_user(config: &AgentConfig) -> anyhow::Result<Option<GameUser>> {
    match &config.instances.user {
        Some(spec) => {
            let user = GameUser::resolve(spec)?;
            let (uid, gid) = (nix::unistd::geteuid(), nix::unistd::getegid());
            // Only root may switch to another user (and give the capture dir to its group);
            // without it every game launch would fail later, one by one.
            if !uid.is_root() && (user.uid != uid.as_raw() || user.gid != gid.as_raw()) {
                bail!(
                    "instances.user = {spec:?}: starting games as another user needs the agent \
                     to run as root (it runs as uid {uid}); leave instances.user unset, or run \
                     the agent as root"
                );
            }
            tracing::info!(
                uid = user.uid,
                gid = user.gid,
                "game instances run as their own user"
            );
            Ok(Some(user))
        }
        None => {
            if nix::unistd::geteuid().is_root() && config.games.iter().any(|g| g.command.is_some())
            {
                tracing::warn!(
                    "instances.user is not set: games run as root, the agent's user, and could read its keys and change their own limits"
                );
            }
            Ok(None)
        }
    }
}
