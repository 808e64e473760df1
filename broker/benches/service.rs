//! The broker as a service, end to end on loopback: allocations per second with tail latency,
//! broker memory with many nodes connected, and the time a restarted broker takes to see every
//! node again.
//!
//! `cargo bench -p framecast-broker --bench service`
//!
//! 1. **Allocations.** A broker and 8 agents with 8 simulated NVIDIA L4 each run in this
//!    process (`dev::start_dev`, or light agents: see below). An open-loop generator schedules
//!    `POST /v1/sessions` (game `open-world`, tier `720p`, `queue: false`) at a fixed rate over
//!    a pool of keep-alive HTTP/1.1 connections; request `i` is due at `start + i / rate`, and
//!    its latency is measured from that due time, so a request that waits for a free
//!    connection, or behind a slow one, is charged for the wait (no coordinated omission).
//!    Each `201` covers HTTP, the engine, the store write, the QUIC `reserve` to the agent and
//!    its `reserved`. Every allocated session is released with `DELETE /v1/sessions/{id}` from
//!    separate release tasks on their own connections, asynchronously and untimed, so the
//!    fleet never fills; the broker does that work during the measurement, so the rate is one
//!    of allocate-and-release pairs. The generator, the broker and the agents share the
//!    machine's cores.
//! 2. **Memory.** `framecast-broker serve` runs as a child process (its RSS is its own) with a
//!    PKI made here; N lightweight agents in this process connect with the real agent link
//!    (`framecast_agent::link`), each with its own certificate, and say hello with 2 L4s. The
//!    broker's `VmRSS` is read before the agents connect and after `GET /v1/nodes` shows all
//!    of them connected.
//! 3. **Restart.** The broker is stopped (SIGTERM, then SIGKILL in a second round) and started
//!    again on the same data directory and ports; the time until `GET /v1/nodes` shows every
//!    node connected again is measured. Agents reconnect with backoff 100 ms doubling to 2 s.
//!
//! Every wait is bounded and fails the run loudly; the child broker is killed on every path.
//!
//! Part 1 runs in four configurations: the dev agents (the real node agent, which also
//! rewrites its `sessions.toml` with fsync on every change) or light agents (the real link and
//! an agent that answers `reserve` at once and keeps nothing, so the figure is the broker's),
//! each with the state on the system's temp dir (a disk here) and on `/dev/shm` (tmpfs, where
//! fsync costs nothing). The broker, the agents and the generator share the process's CPUs.
//!
//! Environment: `FRAMECAST_BENCH_RATES=1000,5000` (requests/s per step),
//! `FRAMECAST_BENCH_SECONDS=3` (per step), `FRAMECAST_BENCH_CONNECTIONS=128`,
//! `FRAMECAST_BENCH_RELEASE_CONNECTIONS=32`,
//! `FRAMECAST_BENCH_CONFIGS=dev:/tmp,dev:/dev/shm,light:/tmp,light:/dev/shm` (part 1's
//! configurations, each `dev|light:DIR`), `FRAMECAST_BENCH_NODES=1000` (parts 2 and 3),
//! `FRAMECAST_BENCH_PARTS=alloc,fleet` (which parts run), `FRAMECAST_BENCH_CRASH=0` (skip the
//! SIGKILL round).

// A benchmark is a test of sorts: a failed unwrap is a failed run.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stdout,
    clippy::indexing_slicing,
    clippy::cast_possible_truncation,
    clippy::cast_precision_loss
)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::str::FromStr;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail, ensure};
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::client::conn::http1::SendRequest;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HOST, HeaderValue, LOCATION};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

use framecast_agent::link::{self, AgentState, LinkChannels, LinkConfig, LinkError, LinkState};
use framecast_broker::dev::{Dev, DevOptions, start_dev};
use framecast_broker::placement::simulated;
use framecast_broker::run::{self, Running};
use framecast_broker::service::tenants::{hex, sha256};
use framecast_shared::gpu::{GpuMode, models};
use framecast_shared::protocol::{
    DEFAULT_MAX_FRAME, GpuUsage, Heartbeat, Hello, Message, Reserved,
};
use framecast_shared::time::Timestamp;
use framecast_shared::tls::{DevCa, Role, client_config, server_config};
use framecast_shared::token::TokenSigner;

/// The API key of the benchmark's tenant (an operator, so it may list nodes).
const API_KEY: &str = "bench-key";
/// Part 1's fleet: nodes × L4s, each L4 holding 12 sessions of 720p.
const FLEET_NODES: usize = 8;
const FLEET_GPUS: usize = 8;
/// One allocation taking longer than this counts as a timeout.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Requests not sent this long after a step's last due time are abandoned (and reported).
const STEP_GRACE: Duration = Duration::from_secs(10);
/// The longest the release tasks may lag behind at the end of a step.
const DRAIN_LIMIT: Duration = Duration::from_secs(60);
/// The warm-up step before the sweep, not reported.
const WARMUP_RATE: u32 = 500;
const WARMUP_SECONDS: f64 = 1.0;
/// The agents' reconnect backoff in parts 2 and 3: the restart figure depends on it.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// Bounds for parts 2 and 3.
const BROKER_START_LIMIT: Duration = Duration::from_secs(30);
const REGISTER_LIMIT: Duration = Duration::from_secs(180);
const EXIT_LIMIT: Duration = Duration::from_secs(15);
/// How often `GET /v1/nodes` is polled while waiting for nodes.
const POLL: Duration = Duration::from_millis(100);
/// Let heartbeats settle before memory is read.
const SETTLE: Duration = Duration::from_secs(3);

fn main() {
    let settings = Settings::from_env();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    println!(
        "Framecast service benchmark on {} ({} CPUs visible to this process)",
        cpu_model(),
        std::thread::available_parallelism().map_or(0, std::num::NonZero::get)
    );
    if settings.parts.iter().any(|p| p == "alloc") {
        let result = rt.block_on(allocations(&settings));
        if let Err(e) = result {
            panic!("allocation benchmark failed: {e:#}");
        }
    }
    if settings.parts.iter().any(|p| p == "fleet") {
        let result = rt.block_on(fleet(&settings));
        if let Err(e) = result {
            panic!("fleet benchmark failed: {e:#}");
        }
    }
    // Agents and connections left in the runtime end with it; do not wait for them.
    rt.shutdown_timeout(Duration::from_secs(2));
}

// ---- settings ------------------------------------------------------------------------------

struct Settings {
    rates: Vec<u32>,
    seconds: f64,
    connections: usize,
    release_connections: usize,
    /// Part 1's configurations: which agents, and where the state lives; one run each.
    configs: Vec<Setup>,
    nodes: usize,
    parts: Vec<String>,
    crash: bool,
}

impl Settings {
    fn from_env() -> Self {
        let rates: Vec<u32> = env_list("FRAMECAST_BENCH_RATES", "1000,2500,5000,7500");
        let settings = Self {
            rates,
            seconds: env_one("FRAMECAST_BENCH_SECONDS", 3.0),
            connections: env_one("FRAMECAST_BENCH_CONNECTIONS", 128),
            release_connections: env_one("FRAMECAST_BENCH_RELEASE_CONNECTIONS", 32),
            configs: match std::env::var("FRAMECAST_BENCH_CONFIGS") {
                Ok(list) => list
                    .split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(|s| {
                        Setup::parse(s).unwrap_or_else(|| {
                            panic!("FRAMECAST_BENCH_CONFIGS: {s:?} is not dev:DIR or light:DIR")
                        })
                    })
                    .collect(),
                Err(_) => Setup::defaults(),
            },
            nodes: env_one("FRAMECAST_BENCH_NODES", 1000),
            parts: env_list("FRAMECAST_BENCH_PARTS", "alloc,fleet"),
            crash: env_one::<u8>("FRAMECAST_BENCH_CRASH", 1) != 0,
        };
        assert!(
            settings.rates.iter().all(|r| *r > 0),
            "FRAMECAST_BENCH_RATES: every rate must be positive"
        );
        assert!(
            settings.seconds > 0.0 && settings.seconds <= 60.0,
            "FRAMECAST_BENCH_SECONDS must be in (0, 60]"
        );
        assert!(
            (1..=1024).contains(&settings.connections),
            "FRAMECAST_BENCH_CONNECTIONS must be in 1..=1024"
        );
        assert!(
            (1..=1024).contains(&settings.release_connections),
            "FRAMECAST_BENCH_RELEASE_CONNECTIONS must be in 1..=1024"
        );
        assert!(
            (1..=5000).contains(&settings.nodes),
            "FRAMECAST_BENCH_NODES must be in 1..=5000"
        );
        settings
    }
}

/// One configuration of part 1: the agents, and the directory whose file system holds the
/// broker's store (and the dev agents' state).
#[derive(Debug, Clone)]
struct Setup {
    agents: AgentKind,
    dir: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AgentKind {
    /// `dev::start_dev`: the real node agent on simulated GPUs, which also writes its
    /// `sessions.toml` (with fsync) on every change.
    Dev,
    /// The real agent link with an agent that answers `reserve` at once and keeps nothing:
    /// the broker's own cost.
    Light,
}

impl Setup {
    fn parse(s: &str) -> Option<Self> {
        let (kind, dir) = s.split_once(':')?;
        let agents = match kind {
            "dev" => AgentKind::Dev,
            "light" => AgentKind::Light,
            _ => return None,
        };
        Some(Self {
            agents,
            dir: PathBuf::from(dir),
        })
    }

    /// Both kinds of agents, each with state on the system's temp dir (a disk here) and on
    /// `/dev/shm` (tmpfs, where fsync costs nothing) when there is one.
    fn defaults() -> Vec<Self> {
        let dirs: Vec<PathBuf> = std::iter::once(std::env::temp_dir())
            .chain(Some(PathBuf::from("/dev/shm")).filter(|p| p.is_dir()))
            .collect();
        [AgentKind::Dev, AgentKind::Light]
            .into_iter()
            .flat_map(|agents| {
                dirs.iter().map(move |dir| Self {
                    agents,
                    dir: dir.clone(),
                })
            })
            .collect()
    }
}

fn env_one<T: FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} does not parse")),
        Err(_) => default,
    }
}

fn env_list<T: FromStr>(name: &str, default: &str) -> Vec<T> {
    let raw = std::env::var(name).unwrap_or_else(|_| default.to_owned());
    raw.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse()
                .unwrap_or_else(|_| panic!("{name}: {s:?} does not parse"))
        })
        .collect()
}

/// User and system CPU time of this process so far, from `/proc/self/stat` (in clock ticks
/// of 1/100 s, the Linux default).
fn process_cpu_seconds() -> f64 {
    cpu_seconds_of("self")
}

/// [`process_cpu_seconds`] of process `pid`.
fn cpu_seconds_of(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which is in parentheses and may hold spaces: the 3rd
    // field of the line is index 0 here, utime (14th) index 11, stime (15th) index 12.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    (ticks(11) + ticks(12)) as f64 / 100.0
}

/// `Udp: RcvbufErrors` from `/proc/net/snmp`: datagrams the kernel dropped because a
/// socket's receive buffer was full (this machine's, all sockets; loopback traffic here is
/// the benchmark's).
fn udp_receive_buffer_errors() -> u64 {
    let snmp = std::fs::read_to_string("/proc/net/snmp").unwrap_or_default();
    let mut udp = snmp.lines().filter(|l| l.starts_with("Udp:"));
    let (Some(names), Some(values)) = (udp.next(), udp.next()) else {
        return 0;
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "RcvbufErrors")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}

/// How long a 4 KiB write and `fdatasync` take in `dir` (the store commits once per session
/// created and once per session ended, each with one `fdatasync`), 200 times, in µs.
fn fsync_probe(dir: &Path) -> anyhow::Result<Histogram<u64>> {
    use std::io::{Seek, Write};
    let path = dir.join("fsync-probe");
    let mut file = std::fs::File::create(&path)?;
    let block = [0x5au8; 4096];
    let mut h = histogram();
    for _ in 0..200 {
        let started = Instant::now();
        file.seek(std::io::SeekFrom::Start(0))?;
        file.write_all(&block)?;
        file.sync_data()?;
        h.saturating_record(micros(started.elapsed()));
    }
    drop(file);
    std::fs::remove_file(&path)?;
    Ok(h)
}

/// The file system type `path` lives on, from `/proc/self/mounts` (the longest mount point
/// that prefixes it).
fn filesystem_of(path: &Path) -> String {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_dev, point, kind) = (f.next()?, f.next()?, f.next()?);
            path.starts_with(point)
                .then(|| (point.len(), kind.to_owned()))
        })
        .max()
        .map_or_else(|| "unknown file system".into(), |(_, kind)| kind)
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_else(|| "an unknown CPU".into())
}

// ---- HTTP client ---------------------------------------------------------------------------

type Sender = SendRequest<Full<Bytes>>;

/// A keep-alive HTTP/1.1 connection to `addr`.
async fn connect(addr: SocketAddr) -> anyhow::Result<Sender> {
    let stream = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr))
        .await
        .map_err(|_| anyhow!("connecting to {addr} timed out"))??;
    stream.set_nodelay(true)?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        // The connection ends when its sender is dropped or the broker goes away.
        let _ = conn.await;
    });
    Ok(sender)
}

/// What a call returns: the status, the `Location` header and the body.
struct Reply {
    status: StatusCode,
    location: Option<String>,
    body: Bytes,
}

async fn call(
    sender: &mut Sender,
    method: Method,
    path: &str,
    body: Option<Bytes>,
) -> anyhow::Result<Reply> {
    sender.ready().await?;
    let mut request = Request::builder()
        .method(method)
        .uri(path)
        .header(HOST, HeaderValue::from_static("127.0.0.1"))
        .header(
            AUTHORIZATION,
            HeaderValue::from_static(concat!("Bearer ", "bench-key")),
        );
    if body.is_some() {
        request = request.header(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    }
    let request = request.body(Full::new(body.unwrap_or_default()))?;
    let response = sender.send_request(request).await?;
    let status = response.status();
    let location = response
        .headers()
        .get(LOCATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = response.into_body().collect().await?.to_bytes();
    Ok(Reply {
        status,
        location,
        body,
    })
}

/// One request on a fresh connection, bounded.
async fn get_once(addr: SocketAddr, path: &str) -> anyhow::Result<Reply> {
    tokio::time::timeout(Duration::from_secs(10), async {
        let mut sender = connect(addr).await?;
        call(&mut sender, Method::GET, path, None).await
    })
    .await
    .map_err(|_| anyhow!("GET {path} took over 10 s"))?
}

/// Nodes the broker lists, and how many of them are connected.
struct NodeCount {
    listed: usize,
    connected: usize,
}

async fn nodes(addr: SocketAddr) -> anyhow::Result<NodeCount> {
    let reply = get_once(addr, "/v1/nodes").await?;
    ensure!(
        reply.status == StatusCode::OK,
        "GET /v1/nodes: {} {}",
        reply.status,
        String::from_utf8_lossy(&reply.body)
    );
    let list: Vec<serde_json::Value> = serde_json::from_slice(&reply.body)?;
    let connected = list
        .iter()
        .filter(|n| n["connected"] == serde_json::Value::Bool(true))
        .count();
    Ok(NodeCount {
        listed: list.len(),
        connected,
    })
}

/// Polls `GET /v1/nodes` until `want` nodes are connected; the time it took.
async fn wait_connected(
    addr: SocketAddr,
    want: usize,
    limit: Duration,
    what: &str,
    mut alive: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    loop {
        alive().with_context(|| format!("{what}: waiting for {want} nodes"))?;
        let last = match nodes(addr).await {
            Ok(n) if n.connected >= want => return Ok(started.elapsed()),
            Ok(n) => format!("{} listed, {} connected", n.listed, n.connected),
            Err(e) => format!("{e:#}"),
        };
        if started.elapsed() > limit {
            bail!(
                "{what}: {want} nodes not connected within {} s ({last})",
                limit.as_secs()
            );
        }
        tokio::time::sleep(POLL).await;
    }
}

// ---- part 1: allocations -------------------------------------------------------------------

/// The request every allocation sends.
const CREATE_BODY: &str =
    r#"{"game":"open-world","tier":"720p","player_id":"bench-player","queue":false}"#;

async fn allocations(settings: &Settings) -> anyhow::Result<()> {
    for setup in &settings.configs {
        allocations_in(settings, setup).await?;
    }
    Ok(())
}

/// Part 1 in one configuration.
async fn allocations_in(settings: &Settings, setup: &Setup) -> anyhow::Result<()> {
    let parent = &setup.dir;
    println!();
    println!(
        "== 1. Allocations end to end (HTTP POST -> engine -> store -> QUIC reserve -> agent reserved -> 201): {} agents, state under {}",
        match setup.agents {
            AgentKind::Dev => "dev (real node agent, in-process)",
            AgentKind::Light => "light (real link, in-process, no agent state)",
        },
        parent.display()
    );
    let data = tempfile::Builder::new()
        .prefix("framecast-bench-dev-")
        .tempdir_in(parent)
        .with_context(|| format!("a temp dir in {}", parent.display()))?;
    let probe = fsync_probe(data.path())?;
    println!(
        "broker store (redb) in {} ({}); 4 KiB write + fdatasync there now: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        data.path().display(),
        filesystem_of(data.path()),
        probe.value_at_quantile(0.5) as f64 / 1000.0,
        probe.value_at_quantile(0.99) as f64 / 1000.0,
        probe.max() as f64 / 1000.0,
    );
    let options = DevOptions {
        nodes: FLEET_NODES,
        gpus_toml: format!("[[gpus]]\nmodel = \"l4\"\ncount = {FLEET_GPUS}\n"),
        http: SocketAddr::from(([127, 0, 0, 1], 0)),
        data_dir: Some(data.path().to_owned()),
        api_key: API_KEY.into(),
        tune: None,
    };
    let deployment = match setup.agents {
        AgentKind::Dev => Deployment::Dev(Box::new(start_dev(options).await?)),
        AgentKind::Light => start_light(&options, data.path()).await?,
    };
    let outcome = measure_allocations(settings, deployment.http()).await;
    // Bounded: each agent and task gets at most a few seconds.
    if tokio::time::timeout(Duration::from_secs(60), deployment.stop())
        .await
        .is_err()
    {
        println!("(the deployment did not stop within 60 s; left to the runtime's end)");
    }
    outcome
}

/// A broker and its agents in this process.
enum Deployment {
    Dev(Box<Dev>),
    Light(Running, Agents),
}

impl Deployment {
    fn http(&self) -> SocketAddr {
        match self {
            Self::Dev(dev) => dev.broker().http,
            Self::Light(running, _) => running.http,
        }
    }

    async fn stop(self) {
        match self {
            Self::Dev(dev) => dev.stop().await,
            Self::Light(running, agents) => {
                agents.stop().await;
                running.stop().await;
            }
        }
    }
}

/// The dev broker's configuration, started with [`run::start`], and light agents of
/// `FLEET_GPUS` L4s each connected over the real link.
async fn start_light(options: &DevOptions, root: &Path) -> anyhow::Result<Deployment> {
    let config = framecast_broker::dev::broker_config(options, root)?;
    let ca = DevCa::generate("Framecast bench CA")?;
    let cert = ca.issue("broker", &["localhost", "127.0.0.1"], Role::Broker)?;
    let tls = server_config(&ca.cert.cert_pem, &cert.cert_pem, &cert.key_pem)?;
    let signer = TokenSigner::load_or_create(&root.join("token.key"))?;
    let running = run::start(config, Arc::new(tls), signer).await?;
    let names: Vec<String> = (1..=options.nodes)
        .map(|i| format!("bench-node-{i:04}"))
        .collect();
    let tls = names
        .iter()
        .map(|n| {
            let c = ca.issue(n, &[n.as_str()], Role::Agent)?;
            Ok(Arc::new(client_config(
                &ca.cert.cert_pem,
                &c.cert_pem,
                &c.key_pem,
            )?))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let agents = Agents::start(&names, &tls, running.control, FLEET_GPUS)?;
    Ok(Deployment::Light(running, agents))
}

async fn measure_allocations(settings: &Settings, addr: SocketAddr) -> anyhow::Result<()> {
    let took = wait_connected(
        addr,
        FLEET_NODES,
        Duration::from_secs(60),
        "dev fleet",
        || Ok(()),
    )
    .await?;
    println!(
        "fleet: {FLEET_NODES} in-process agents x {FLEET_GPUS} simulated L4 (12 x 720p each: {} sessions at once), all connected after {} ms",
        FLEET_NODES * FLEET_GPUS * 12,
        took.as_millis()
    );
    println!(
        "the load generator, the broker and the agents run in this one process and share its {} CPUs",
        std::thread::available_parallelism().map_or(0, std::num::NonZero::get)
    );
    println!(
        "open loop: latency from each request's due time; {} keep-alive connections; sessions released by {} untimed release connections",
        settings.connections, settings.release_connections
    );
    let mut pool = Vec::with_capacity(settings.connections);
    for _ in 0..settings.connections {
        pool.push(connect(addr).await?);
    }
    let releaser = Releaser::start(addr, settings.release_connections).await?;

    let warm = run_step(&mut pool, addr, &releaser, WARMUP_RATE, WARMUP_SECONDS).await?;
    releaser.drain(DRAIN_LIMIT).await?;
    ensure!(
        warm.ok > 0,
        "the warm-up allocated nothing: {:?}",
        warm.errors
    );

    println!();
    println!(
        "| target/s | sent | 201 | achieved/s | p50 ms | p90 ms | p99 ms | p99.9 ms | max ms | send lag p99 ms | errors | release lag s | CPU cores |"
    );
    println!(
        "|---------:|-----:|----:|-----------:|-------:|-------:|-------:|---------:|-------:|----------------:|--------|--------------:|----------:|"
    );
    let mut results = Vec::new();
    for &rate in &settings.rates {
        let step = run_step(&mut pool, addr, &releaser, rate, settings.seconds).await?;
        let drained = releaser.drain(DRAIN_LIMIT).await?;
        println!("{}", step.row(drained));
        results.push(step);
    }
    println!(
        "(errors: by HTTP status, `timeout` = no answer in {} s, `io` = connection error, `abandoned` = not sent {} s after the step's end; release failures: {})",
        REQUEST_TIMEOUT.as_secs(),
        STEP_GRACE.as_secs(),
        releaser.failed.load(Ordering::Relaxed)
    );
    for s in &results {
        for ((status, _), (count, detail)) in &s.samples {
            println!("  {status} at {}/s, {count} x: {detail}", s.target);
        }
    }
    let met = results.iter().any(|s| {
        s.target >= 5000
            && s.failures() == 0
            && s.achieved() >= 0.99 * 5000.0
            && s.latency.value_at_quantile(0.99) <= 20_000
    });
    println!(
        "target >= 5000 allocations/s with p99 <= 20 ms (no errors) on this machine: {}",
        if met { "MET" } else { "NOT MET" }
    );
    releaser.stop().await;
    Ok(())
}

/// When request `i` of a step is due.
struct Schedule {
    start: Instant,
    rate: f64,
    total: u64,
    next: AtomicU64,
    abandon_at: Instant,
}

impl Schedule {
    fn due(&self, i: u64) -> Instant {
        self.start + Duration::from_secs_f64(i as f64 / self.rate)
    }
}

struct StepResult {
    target: u32,
    total: u64,
    sent: u64,
    ok: u64,
    errors: BTreeMap<String, u64>,
    samples: Samples,
    latency: Histogram<u64>,
    lag: Histogram<u64>,
    start: Instant,
    last_ok: Option<Instant>,
    /// CPU cores this process (generator, broker and agents) kept busy during the step.
    cores: f64,
}

impl StepResult {
    fn achieved(&self) -> f64 {
        match self.last_ok {
            Some(t) if t > self.start => self.ok as f64 / (t - self.start).as_secs_f64(),
            _ => 0.0,
        }
    }

    fn failures(&self) -> u64 {
        self.errors.values().sum::<u64>() + (self.total - self.sent)
    }

    fn row(&self, release_lag: Duration) -> String {
        let ms = |us: u64| us as f64 / 1000.0;
        let q = |x: f64| ms(self.latency.value_at_quantile(x));
        let mut errors: Vec<String> = self
            .errors
            .iter()
            .map(|(k, v)| format!("{k}: {v}"))
            .collect();
        if self.total > self.sent {
            errors.push(format!("abandoned: {}", self.total - self.sent));
        }
        let errors = if errors.is_empty() {
            "0".to_owned()
        } else {
            errors.join(", ")
        };
        format!(
            "| {} | {} | {} | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} | {} | {:.2} | {:.2} |",
            self.target,
            self.sent,
            self.ok,
            self.achieved(),
            q(0.50),
            q(0.90),
            q(0.99),
            q(0.999),
            ms(self.latency.max()),
            ms(self.lag.value_at_quantile(0.99)),
            errors,
            release_lag.as_secs_f64(),
            self.cores,
        )
    }
}

fn histogram() -> Histogram<u64> {
    // Microseconds, 1 µs to 10 min, 3 significant digits.
    Histogram::new_with_bounds(1, 600_000_000, 3).unwrap()
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
}

/// Error answers by (status, kind of detail): how many, and the first detail.
type Samples = BTreeMap<(String, String), (u64, String)>;

/// The `detail` of an RFC 9457 problem, or the body as text when it is not one.
fn problem_detail(body: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["detail"].as_str().map(str::to_owned))
        .unwrap_or_else(|| String::from_utf8_lossy(body).into_owned())
}

/// What one connection's worker did in a step.
struct WorkerOut {
    sent: u64,
    ok: u64,
    errors: BTreeMap<String, u64>,
    /// Error answers by (status, kind of detail): how many, and the first detail.
    samples: Samples,
    latency: Histogram<u64>,
    lag: Histogram<u64>,
    last_ok: Option<Instant>,
}

/// One step at `rate` requests/s for `seconds`, over the connections in `pool`.
async fn run_step(
    pool: &mut Vec<Sender>,
    addr: SocketAddr,
    releaser: &Releaser,
    rate: u32,
    seconds: f64,
) -> anyhow::Result<StepResult> {
    let total =
        (u128::from(rate) * Duration::from_secs_f64(seconds).as_micros() / 1_000_000).max(1) as u64;
    // A little head start so every worker is waiting when the first request is due.
    let start = Instant::now() + Duration::from_millis(20);
    let schedule = Arc::new(Schedule {
        start,
        rate: f64::from(rate),
        total,
        next: AtomicU64::new(0),
        abandon_at: start + Duration::from_secs_f64(seconds) + STEP_GRACE,
    });
    let body = Bytes::from_static(CREATE_BODY.as_bytes());
    let workers: Vec<JoinHandle<anyhow::Result<(Sender, WorkerOut)>>> = pool
        .drain(..)
        .enumerate()
        .map(|(i, sender)| {
            tokio::spawn(worker(
                i,
                sender,
                addr,
                Arc::clone(&schedule),
                body.clone(),
                releaser.handle(),
            ))
        })
        .collect();
    let mut result = StepResult {
        target: rate,
        total,
        sent: 0,
        ok: 0,
        errors: BTreeMap::new(),
        samples: BTreeMap::new(),
        latency: histogram(),
        lag: histogram(),
        start,
        last_ok: None,
        cores: 0.0,
    };
    let cpu_before = process_cpu_seconds();
    // Every worker ends by the abandon time plus one request timeout.
    let limit = Duration::from_secs_f64(seconds) + STEP_GRACE + REQUEST_TIMEOUT * 2;
    for w in workers {
        let (sender, out) = tokio::time::timeout(limit, w)
            .await
            .map_err(|_| anyhow!("a worker did not finish within {} s", limit.as_secs()))???;
        pool.push(sender);
        result.sent += out.sent;
        result.ok += out.ok;
        for (k, v) in out.errors {
            *result.errors.entry(k).or_default() += v;
        }
        for (k, (count, detail)) in out.samples {
            result.samples.entry(k).or_insert((0, detail)).0 += count;
        }
        result.latency.add(&out.latency)?;
        result.lag.add(&out.lag)?;
        result.last_ok = result.last_ok.max(out.last_ok);
    }
    let wall = start.elapsed().as_secs_f64();
    if wall > 0.0 {
        result.cores = (process_cpu_seconds() - cpu_before) / wall;
    }
    Ok(result)
}

async fn worker(
    index: usize,
    mut sender: Sender,
    addr: SocketAddr,
    schedule: Arc<Schedule>,
    body: Bytes,
    releaser: ReleaseHandle,
) -> anyhow::Result<(Sender, WorkerOut)> {
    let mut out = WorkerOut {
        sent: 0,
        ok: 0,
        errors: BTreeMap::new(),
        samples: BTreeMap::new(),
        latency: histogram(),
        lag: histogram(),
        last_ok: None,
    };
    loop {
        let i = schedule.next.fetch_add(1, Ordering::Relaxed);
        if i >= schedule.total {
            break;
        }
        let due = schedule.due(i);
        tokio::time::sleep_until(due.into()).await;
        let now = Instant::now();
        if now > schedule.abandon_at {
            break;
        }
        out.sent += 1;
        out.lag
            .saturating_record(micros(now.saturating_duration_since(due)));
        let answer = tokio::time::timeout(
            REQUEST_TIMEOUT,
            call(
                &mut sender,
                Method::POST,
                "/v1/sessions",
                Some(body.clone()),
            ),
        )
        .await;
        let done = Instant::now();
        let broken = match answer {
            Ok(Ok(reply)) if reply.status == StatusCode::CREATED => {
                out.ok += 1;
                out.latency.saturating_record(micros(done - due));
                out.last_ok = out.last_ok.max(Some(done));
                match reply.location {
                    Some(path) => releaser.release(index, path),
                    None => *out.errors.entry("201 without Location".into()).or_default() += 1,
                }
                false
            }
            Ok(Ok(reply)) => {
                let status = reply.status.as_u16().to_string();
                let detail = problem_detail(&reply.body);
                // "no slot is free" and "the agent refused" are both 503s; tell them apart by
                // the detail's words before the first colon.
                let kind = detail.split(':').next().unwrap_or_default().to_owned();
                out.samples
                    .entry((status.clone(), kind))
                    .or_insert((0, detail))
                    .0 += 1;
                *out.errors.entry(status).or_default() += 1;
                false
            }
            Ok(Err(_)) => {
                *out.errors.entry("io".into()).or_default() += 1;
                true
            }
            Err(_) => {
                *out.errors.entry("timeout".into()).or_default() += 1;
                true
            }
        };
        if broken {
            // A request cut off half-way leaves the connection unusable: open another.
            sender = connect(addr)
                .await
                .context("reconnecting after a failed request")?;
        }
    }
    Ok((sender, out))
}

/// Releases allocated sessions in the background, on its own connections.
struct Releaser {
    handle: ReleaseHandle,
    failed: Arc<AtomicU64>,
    tasks: Vec<JoinHandle<()>>,
}

#[derive(Clone)]
struct ReleaseHandle {
    queues: Arc<Vec<mpsc::UnboundedSender<String>>>,
    pending: Arc<AtomicI64>,
}

impl ReleaseHandle {
    /// Queues `DELETE path` on the release connection for `worker`.
    fn release(&self, worker: usize, path: String) {
        self.pending.fetch_add(1, Ordering::Relaxed);
        let q = &self.queues[worker % self.queues.len()];
        if q.send(path).is_err() {
            self.pending.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Releaser {
    async fn start(addr: SocketAddr, connections: usize) -> anyhow::Result<Self> {
        let pending = Arc::new(AtomicI64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let mut queues = Vec::new();
        let mut tasks = Vec::new();
        for _ in 0..connections {
            let mut sender = connect(addr).await?;
            let (tx, mut rx) = mpsc::unbounded_channel::<String>();
            queues.push(tx);
            let pending = Arc::clone(&pending);
            let failed = Arc::clone(&failed);
            tasks.push(tokio::spawn(async move {
                while let Some(path) = rx.recv().await {
                    let r = tokio::time::timeout(
                        REQUEST_TIMEOUT,
                        call(&mut sender, Method::DELETE, &path, None),
                    )
                    .await;
                    match r {
                        Ok(Ok(reply)) if reply.status == StatusCode::NO_CONTENT => {}
                        Ok(Ok(_)) => {
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                        _ => {
                            failed.fetch_add(1, Ordering::Relaxed);
                            match connect(addr).await {
                                Ok(s) => sender = s,
                                Err(_) => {
                                    pending.fetch_sub(1, Ordering::Relaxed);
                                    return;
                                }
                            }
                        }
                    }
                    pending.fetch_sub(1, Ordering::Relaxed);
                }
            }));
        }
        Ok(Self {
            handle: ReleaseHandle {
                queues: Arc::new(queues),
                pending,
            },
            failed,
            tasks,
        })
    }

    fn handle(&self) -> ReleaseHandle {
        self.handle.clone()
    }

    /// Waits until every queued release is done; how long that took.
    async fn drain(&self, limit: Duration) -> anyhow::Result<Duration> {
        let started = Instant::now();
        while self.handle.pending.load(Ordering::Relaxed) > 0 {
            ensure!(
                started.elapsed() < limit,
                "{} releases still pending after {} s",
                self.handle.pending.load(Ordering::Relaxed),
                limit.as_secs()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(started.elapsed())
    }

    async fn stop(self) {
        drop(self.handle);
        for t in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
        }
    }
}

// ---- parts 2 and 3: a broker process with many nodes ---------------------------------------

async fn fleet(settings: &Settings) -> anyhow::Result<()> {
    let n = settings.nodes;
    println!();
    println!(
        "== 2. Broker memory with {n} simulated nodes connected (broker as a separate process)"
    );
    let dir = tempfile::Builder::new()
        .prefix("framecast-bench-")
        .tempdir()?;
    let root = dir.path();

    let started = Instant::now();
    let ca = DevCa::generate("Framecast bench CA")?;
    let broker_cert = ca.issue("broker", &["localhost", "127.0.0.1"], Role::Broker)?;
    let names: Vec<String> = (1..=n).map(|i| format!("bench-node-{i:04}")).collect();
    let certs = names
        .iter()
        .map(|name| ca.issue(name, &[name.as_str()], Role::Agent))
        .collect::<Result<Vec<_>, _>>()?;
    let issued = started.elapsed();
    let started = Instant::now();
    let tls = certs
        .iter()
        .map(|c| client_config(&ca.cert.cert_pem, &c.cert_pem, &c.key_pem).map(Arc::new))
        .collect::<Result<Vec<_>, _>>()?;
    let configured = started.elapsed();
    println!(
        "PKI: {n} agent certificates issued in {:.2} s ({:.2} ms each); their TLS client configs built in {:.2} s",
        issued.as_secs_f64(),
        issued.as_secs_f64() * 1000.0 / n as f64,
        configured.as_secs_f64()
    );

    let pki = root.join("pki");
    std::fs::create_dir_all(&pki)?;
    write(&pki.join("ca.pem"), &ca.cert.cert_pem)?;
    write(&pki.join("broker.pem"), &broker_cert.cert_pem)?;
    write(&pki.join("broker.key"), &broker_cert.key_pem)?;
    let http = free_tcp_port()?;
    let control = free_udp_port()?;
    // The data directory both broker processes share.
    std::fs::create_dir_all(root.join("data"))?;
    let config = root.join("broker.toml");
    write(&config, &broker_toml(root, &pki, http, control))?;

    let mut broker = BrokerProcess::spawn(&config, &root.join("broker.log"))?;
    let outcome = fleet_steps(settings, &mut broker, http, control, &names, &tls).await;
    if let Err(e) = &outcome {
        println!("broker log (last lines):\n{}", broker.log_tail());
        println!("error: {e:#}");
    }
    drop(broker);
    outcome
}

async fn fleet_steps(
    settings: &Settings,
    broker: &mut BrokerProcess,
    http: SocketAddr,
    control: SocketAddr,
    names: &[String],
    tls: &[Arc<rustls::ClientConfig>],
) -> anyhow::Result<()> {
    let n = names.len();
    let up = wait_connected(http, 0, BROKER_START_LIMIT, "broker start", || {
        broker.running()
    })
    .await?;
    println!(
        "broker process up (HTTP answers) {} ms after spawn",
        up.as_millis()
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = broker.memory()?;
    let own_before = Memory::of("self")?;

    let started = Instant::now();
    let cpu = CpuMeter::start(broker)?;
    let agents = Agents::start(names, tls, control, 2)?;
    let registered = wait_connected(http, n, REGISTER_LIMIT, "first registration", || {
        broker.running()
    })
    .await;
    if let Err(e) = registered {
        bail!("{e:#}; agents: {}", agents.summary());
    }
    let first = started.elapsed();
    println!(
        "all {n} agents registered {:.2} s after they started (a cold start: {n} QUIC + mutual TLS handshakes at once; {})",
        first.as_secs_f64(),
        cpu.report(broker)?
    );
    tokio::time::sleep(SETTLE).await;
    let after = broker.memory()?;
    let own_after = Memory::of("self")?;
    let per_node = |a: u64, b: u64| (a.saturating_sub(b)) as f64 / n as f64;
    println!();
    println!("| broker process | VmRSS MiB | VmHWM MiB |");
    println!("|---|---:|---:|");
    println!(
        "| before agents connect | {:.1} | {:.1} |",
        mib(before.rss_kb),
        mib(before.hwm_kb)
    );
    println!(
        "| {n} nodes connected, {} s after | {:.1} | {:.1} |",
        SETTLE.as_secs(),
        mib(after.rss_kb),
        mib(after.hwm_kb)
    );
    println!(
        "| per node (RSS delta / {n}) | {:.1} KiB | |",
        per_node(after.rss_kb, before.rss_kb)
    );
    println!(
        "(agent side, for scale: this bench process grew by {:.1} MiB for {n} agent links, {:.1} KiB each)",
        mib(own_after.rss_kb.saturating_sub(own_before.rss_kb)),
        per_node(own_after.rss_kb, own_before.rss_kb)
    );

    println!();
    println!(
        "== 3. Broker restart until all {n} nodes are re-registered (agent backoff {} ms doubling to {} s)",
        BACKOFF_MIN.as_millis(),
        BACKOFF_MAX.as_secs()
    );
    println!(
        "| stop | stop -> exit s | spawn -> HTTP up s | spawn -> all connected s | stop -> all connected s | CPU from spawn to all connected |"
    );
    println!("|---|---:|---:|---:|---:|---|");
    let mut rounds = vec![Stop::Term];
    if settings.crash {
        rounds.push(Stop::Kill);
    }
    for how in rounds {
        let r = restart(broker, http, n, how).await;
        match r {
            Ok(row) => println!("{row}"),
            Err(e) => bail!("{e:#}; agents: {}", agents.summary()),
        }
    }
    let last = broker.memory()?;
    println!(
        "(broker VmRSS after the restarts, all nodes connected: {:.1} MiB)",
        mib(last.rss_kb)
    );
    agents.stop().await;
    Ok(())
}

/// CPU time the broker process and this process spend from `start` to `report`.
struct CpuMeter {
    started: Instant,
    broker: f64,
    own: f64,
    udp_drops: u64,
}

impl CpuMeter {
    fn start(broker: &BrokerProcess) -> anyhow::Result<Self> {
        Ok(Self {
            started: Instant::now(),
            broker: cpu_seconds_of(&broker.pid()?.to_string()),
            own: process_cpu_seconds(),
            udp_drops: udp_receive_buffer_errors(),
        })
    }

    fn report(&self, broker: &BrokerProcess) -> anyhow::Result<String> {
        let wall = self.started.elapsed().as_secs_f64().max(1e-3);
        let b = cpu_seconds_of(&broker.pid()?.to_string()) - self.broker;
        let o = process_cpu_seconds() - self.own;
        let drops = udp_receive_buffer_errors().saturating_sub(self.udp_drops);
        Ok(format!(
            "broker {b:.1} CPU-s ({:.2} cores), agents + poller {o:.1} CPU-s ({:.2} cores), {drops} UDP datagrams dropped for a full receive buffer",
            b / wall,
            o / wall
        ))
    }
}

#[derive(Debug, Clone, Copy)]
enum Stop {
    /// SIGTERM: the broker closes every QUIC connection, so agents notice at once.
    Term,
    /// SIGKILL: a crash; agents notice only when their QUIC connection times out.
    Kill,
}

async fn restart(
    broker: &mut BrokerProcess,
    http: SocketAddr,
    n: usize,
    how: Stop,
) -> anyhow::Result<String> {
    let stopped = Instant::now();
    match how {
        Stop::Term => broker.terminate(EXIT_LIMIT)?,
        Stop::Kill => broker.kill()?,
    }
    let exited = stopped.elapsed();
    broker.respawn()?;
    let spawned = Instant::now();
    let cpu = CpuMeter::start(broker)?;
    let up = wait_connected(http, 0, BROKER_START_LIMIT, "broker restart", || {
        broker.running()
    })
    .await?;
    let all = wait_connected(http, n, REGISTER_LIMIT, "re-registration", || {
        broker.running()
    })
    .await?;
    let all = up + all;
    Ok(format!(
        "| {} | {:.2} | {:.2} | {:.2} | {:.2} | {} |",
        match how {
            Stop::Term => "SIGTERM (graceful)",
            Stop::Kill => "SIGKILL (crash)",
        },
        exited.as_secs_f64(),
        up.as_secs_f64(),
        all.as_secs_f64(),
        (spawned - stopped + all).as_secs_f64(),
        cpu.report(broker)?,
    ))
}

fn broker_toml(root: &Path, pki: &Path, http: SocketAddr, control: SocketAddr) -> String {
    let s = |p: PathBuf| toml::Value::String(p.display().to_string()).to_string();
    format!(
        r#"region = "local"
data_dir = {data}

[http]
listen = "{http}"
max_body_bytes = 65536

[control]
listen = "{control}"
heartbeat_interval_ms = 1000
suspect_after_ms = 3000
down_after_ms = 10000
node_lost_grace_ms = 30000
max_frame_bytes = {max_frame}

[control.tls]
ca_cert = {ca}
cert = {cert}
key = {key}

[[tenants]]
id = "bench"
api_key_sha256 = "{key_hash}"
admin = true
"#,
        data = s(root.join("data")),
        max_frame = DEFAULT_MAX_FRAME,
        ca = s(pki.join("ca.pem")),
        cert = s(pki.join("broker.pem")),
        key = s(pki.join("broker.key")),
        key_hash = hex(&sha256(API_KEY.as_bytes())),
    )
}

fn write(path: &Path, text: &str) -> anyhow::Result<()> {
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

fn free_tcp_port() -> anyhow::Result<SocketAddr> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

fn free_udp_port() -> anyhow::Result<SocketAddr> {
    Ok(std::net::UdpSocket::bind("127.0.0.1:0")?.local_addr()?)
}

fn mib(kb: u64) -> f64 {
    kb as f64 / 1024.0
}

/// A process's resident memory, from `/proc/<pid>/status`.
struct Memory {
    rss_kb: u64,
    hwm_kb: u64,
}

impl Memory {
    fn of(pid: &str) -> anyhow::Result<Self> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .with_context(|| format!("reading /proc/{pid}/status"))?;
        let field = |name: &str| -> anyhow::Result<u64> {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                .ok_or_else(|| anyhow!("no {name} in /proc/{pid}/status"))
        };
        Ok(Self {
            rss_kb: field("VmRSS:")?,
            hwm_kb: field("VmHWM:")?,
        })
    }
}

/// The `framecast-broker serve` child; killed when dropped, whatever happened.
struct BrokerProcess {
    config: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl BrokerProcess {
    fn spawn(config: &Path, log: &Path) -> anyhow::Result<Self> {
        let mut p = Self {
            config: config.to_owned(),
            log: log.to_owned(),
            child: None,
        };
        p.respawn()?;
        Ok(p)
    }

    fn respawn(&mut self) -> anyhow::Result<()> {
        ensure!(self.child.is_none(), "the broker still runs");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let mut command = Command::new(env!("CARGO_BIN_EXE_framecast-broker"));
        command
            .arg("serve")
            .arg("-c")
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        // FRAMECAST_* variables are configuration to the broker; the bench's own would be
        // refused as unknown fields.
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("FRAMECAST_") {
                command.env_remove(&k);
            }
        }
        command.env("FRAMECAST_LOG", "warn");
        self.child = Some(command.spawn().context("starting framecast-broker serve")?);
        Ok(())
    }

    fn pid(&self) -> anyhow::Result<u32> {
        self.child
            .as_ref()
            .map(Child::id)
            .ok_or_else(|| anyhow!("the broker is not running"))
    }

    /// An error if the broker is not running (it exited, or was never started).
    fn running(&mut self) -> anyhow::Result<()> {
        let child = self
            .child
            .as_mut()
            .ok_or_else(|| anyhow!("the broker is not running"))?;
        match child.try_wait()? {
            Some(status) => bail!("the broker exited: {status}"),
            None => Ok(()),
        }
    }

    fn memory(&mut self) -> anyhow::Result<Memory> {
        self.running()?;
        Memory::of(&self.pid()?.to_string())
    }

    /// SIGTERM, then waits up to `limit` for the exit (SIGKILL after that, and an error).
    fn terminate(&mut self, limit: Duration) -> anyhow::Result<()> {
        let pid = self.pid()?;
        let status = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .context("running kill -TERM")?;
        ensure!(status.success(), "kill -TERM {pid} failed");
        let started = Instant::now();
        let child = self.child.as_mut().ok_or_else(|| anyhow!("no broker"))?;
        loop {
            if child.try_wait()?.is_some() {
                self.child = None;
                return Ok(());
            }
            if started.elapsed() > limit {
                self.kill()?;
                bail!(
                    "the broker did not exit within {} s of SIGTERM",
                    limit.as_secs()
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// SIGKILL and reap.
    fn kill(&mut self) -> anyhow::Result<()> {
        if let Some(mut c) = self.child.take() {
            c.kill()?;
            c.wait()?;
        }
        Ok(())
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A simulated node's side of the link: answers `reserve` at once.
struct BenchAgent {
    hello: Hello,
    usage: Vec<GpuUsage>,
}

impl AgentState for BenchAgent {
    fn hello(&self, generation: u64) -> Hello {
        let mut hello = self.hello.clone();
        hello.generation = generation;
        hello
    }

    fn heartbeat(&self, generation: u64, seq: u64) -> Heartbeat {
        Heartbeat {
            generation,
            seq,
            sent_at: Timestamp::now(),
            gpus: self.usage.clone(),
            warm: None,
            plan_generation: None,
            inputs: Vec::new(),
        }
    }

    fn handle(&mut self, message: Message) -> Vec<Message> {
        match message {
            Message::Reserve(r) => vec![Message::Reserved(Reserved {
                request_id: r.request_id,
                session_id: r.session_id,
                warm: false,
            })],
            _ => Vec::new(),
        }
    }
}

/// The agents of parts 2 and 3, each running the real link.
struct Agents {
    shutdown: watch::Sender<bool>,
    states: Vec<watch::Receiver<LinkState>>,
    tasks: Vec<JoinHandle<Result<(), LinkError>>>,
}

impl Agents {
    fn start(
        names: &[String],
        tls: &[Arc<rustls::ClientConfig>],
        broker: SocketAddr,
        gpus: usize,
    ) -> anyhow::Result<Self> {
        let (shutdown, shutdown_rx) = watch::channel(false);
        let mut states = Vec::new();
        let mut tasks = Vec::new();
        for (name, tls) in names.iter().zip(tls) {
            let hello =
                simulated::hello(name, "local", &models::l4(), GpuMode::EqualSize, gpus, 1)?;
            let usage = hello
                .gpus
                .iter()
                .map(|g| GpuUsage {
                    gpu: g.gpu.clone(),
                    free_framebuffer: g.free_framebuffer,
                    free_encoder: g.free_encoder,
                    encoder_utilization_pct: None,
                    gpu_utilization_pct: None,
                    vgpus: Some(g.vgpus),
                    profile: None,
                })
                .collect();
            let agent: Arc<Mutex<dyn AgentState>> =
                Arc::new(Mutex::new(BenchAgent { hello, usage }));
            let (state_tx, state_rx) = watch::channel(LinkState::Connecting);
            // Nothing is ever sent on the outbox; the sender is dropped, which the link allows.
            let (_outbox_tx, outbox_rx) = mpsc::unbounded_channel();
            let config = LinkConfig {
                broker,
                server_name: "localhost".into(),
                tls: Arc::clone(tls),
                max_frame: DEFAULT_MAX_FRAME,
                backoff_min: BACKOFF_MIN,
                backoff_max: BACKOFF_MAX,
            };
            states.push(state_rx);
            tasks.push(tokio::spawn(link::run(
                config,
                agent,
                1,
                LinkChannels {
                    shutdown: shutdown_rx.clone(),
                    state: state_tx,
                    outbox: outbox_rx,
                },
            )));
        }
        Ok(Self {
            shutdown,
            states,
            tasks,
        })
    }

    /// How the links stand, for an error message.
    fn summary(&self) -> String {
        let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
        let mut sample = None;
        for s in &self.states {
            let word = match &*s.borrow() {
                LinkState::Connecting => "connecting",
                LinkState::Connected => "connected",
                LinkState::Backoff { error } => {
                    sample.get_or_insert_with(|| error.clone());
                    "backoff"
                }
                LinkState::Stopped => "stopped",
            };
            *counts.entry(word).or_default() += 1;
        }
        let ended = self.tasks.iter().filter(|t| t.is_finished()).count();
        format!(
            "{counts:?}, {ended} link tasks ended, last error: {}",
            sample.unwrap_or_else(|| "none".into())
        )
    }

    async fn stop(self) {
        let _ = self.shutdown.send(true);
        let all = futures_util::future::join_all(self.tasks);
        if tokio::time::timeout(Duration::from_secs(10), all)
            .await
            .is_err()
        {
            println!("(some agent links did not stop within 10 s)");
        }
    }
}
