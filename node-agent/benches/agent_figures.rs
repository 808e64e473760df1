//! The agent's figures for `docs/BENCHMARKS.md`: its memory at idle and per warm instance, and
//! the time from `reserve` to `reserved` on loopback.
//!
//! `cargo bench -p framecast-agent --bench agent_figures`
//!
//! Runs the real `framecast-agent` binary on 8 simulated NVIDIA L4s against an in-process
//! control endpoint (QUIC, mutual TLS, loopback). Memory is the agent process's resident set
//! (`VmRSS`) once it is welcomed, then after a pool plan asks for warm instances of the
//! synthetic game on every GPU. Latency is measured at the endpoint: 1 000 `reserve`s, each
//! sent after the previous `reserved` arrived, each followed by a `release`; only the
//! reserve→reserved round trip is recorded. `FRAMECAST_BENCH_RESERVES=N` changes the count.

// A benchmark is a test of sorts: a failed unwrap is a failed run.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stdout,
    clippy::indexing_slicing,
    // Loop counters of a fixed, small run.
    clippy::cast_possible_truncation
)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use framecast_agent::link::frames::{read_message, write_message};
use framecast_shared::gpu::GpuMode;
use framecast_shared::ids::{GameId, GpuId, RegionName, SessionId, TierName};
use framecast_shared::protocol::{
    DEFAULT_MAX_FRAME, GpuPlan, Message, PROTOCOL_VERSION, PoolPlan, Release, Reserve, WarmTarget,
    Welcome,
};
use framecast_shared::state::EndReason;
use framecast_shared::time::Timestamp;
use framecast_shared::units::{ComputeShare, EncoderUnits, Megabytes};

const GPUS: u32 = 8;
/// L4-4Q: six 1080p slots per L4.
const SLOTS: u16 = 6;

struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

async fn next_non_heartbeat(recv: &mut quinn::RecvStream) -> Message {
    loop {
        match read_message(recv, DEFAULT_MAX_FRAME).await.unwrap() {
            Some(Message::Heartbeat(_)) => continue,
            Some(m) => return m,
            None => panic!("the agent closed the stream"),
        }
    }
}

/// Waits for a heartbeat that reports `want` ready warm instances.
async fn until_warm(recv: &mut quinn::RecvStream, want: usize) {
    loop {
        if let Some(Message::Heartbeat(hb)) = read_message(recv, DEFAULT_MAX_FRAME).await.unwrap()
            && hb.warm.as_ref().map(Vec::len) == Some(want)
        {
            return;
        }
    }
}

fn main() {
    let reserves: u64 = std::env::var("FRAMECAST_BENCH_RESERVES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(run(reserves));
}

async fn run(reserves: u64) {
    let pki = common::pki();
    let (endpoint, addr) = common::test_broker(&pki);
    let dir = tempfile::tempdir().unwrap();
    let http = std::net::SocketAddr::from(([127, 0, 0, 1], common::free_port()));
    let gpus = format!("[[gpus]]\nmodel = \"l4\"\ncount = {GPUS}\n");
    common::write_agent_config(dir.path(), &pki, addr, http, &gpus, "");
    let agent = Agent(
        Command::new(env!("CARGO_BIN_EXE_framecast-agent"))
            .args([
                "run",
                "--config",
                dir.path().join("agent.toml").to_str().unwrap(),
            ])
            // The agent reads FRAMECAST_* variables as configuration; the benchmark's own
            // (FRAMECAST_BENCH_*) would be unknown fields to it.
            .env_clear()
            .envs(
                std::env::vars_os().filter(|(k, _)| !k.to_string_lossy().starts_with("FRAMECAST_")),
            )
            .env("FRAMECAST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let pid = agent.0.id();

    let (_conn, mut send, mut recv, hello) = common::accept(&endpoint).await;
    let welcome = Message::Welcome(Welcome {
        protocol_version: PROTOCOL_VERSION,
        broker_version: "bench".into(),
        region: RegionName::new("eu").unwrap(),
        generation: hello.generation,
        heartbeat_interval_ms: 200,
        token_public_key: vec![0; 32],
        tiers: Vec::new(),
    });
    write_message(&mut send, &welcome, DEFAULT_MAX_FRAME)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle = rss_kib(pid);

    let gpus: Vec<GpuId> = hello.gpus.iter().map(|g| g.gpu.clone()).collect();
    let plan = Message::PoolPlan(PoolPlan {
        plan_generation: 1,
        gpus: gpus
            .iter()
            .map(|gpu| GpuPlan {
                gpu: gpu.clone(),
                mode: GpuMode::EqualSize,
                profile: Some("L4-4Q".into()),
                vgpus: SLOTS,
                warm: vec![WarmTarget {
                    game: GameId::new("arena").unwrap(),
                    tier: TierName::new("1080p").unwrap(),
                    count: SLOTS,
                }],
            })
            .collect(),
    });
    write_message(&mut send, &plan, DEFAULT_MAX_FRAME)
        .await
        .unwrap();
    let warm = GPUS as usize * usize::from(SLOTS);
    until_warm(&mut recv, warm).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let with_warm = rss_kib(pid);

    let mut hist = Histogram::<u64>::new_with_bounds(1, 10_000_000, 3).unwrap();
    let mut warm_hits = 0u64;
    let started = Instant::now();
    for n in 0..reserves {
        let gpu = gpus[(n % u64::from(GPUS)) as usize].clone();
        let now = Timestamp::now();
        let session_id = SessionId::new(now, u128::from(n));
        let reserve = Message::Reserve(Reserve {
            request_id: n,
            session_id,
            game: GameId::new("arena").unwrap(),
            tier: TierName::new("1080p").unwrap(),
            gpu,
            slot: ((n / u64::from(GPUS)) % u64::from(SLOTS)) as u32,
            framebuffer: Megabytes::new(4096),
            compute_share: ComputeShare::new(4).unwrap(),
            encoder: EncoderUnits::ONE,
            expires_at: now,
        });
        let t0 = Instant::now();
        write_message(&mut send, &reserve, DEFAULT_MAX_FRAME)
            .await
            .unwrap();
        match next_non_heartbeat(&mut recv).await {
            Message::Reserved(r) => {
                hist.record(t0.elapsed().as_micros() as u64).unwrap();
                warm_hits += u64::from(r.warm);
            }
            other => panic!("reservation {n}: {other:?}"),
        }
        let release = Message::Release(Release {
            session_id,
            reason: EndReason::Released,
        });
        write_message(&mut send, &release, DEFAULT_MAX_FRAME)
            .await
            .unwrap();
        match next_non_heartbeat(&mut recv).await {
            Message::SessionUpdate(_) => {}
            other => panic!("release {n}: {other:?}"),
        }
    }
    let elapsed = started.elapsed();
    let after = rss_kib(pid);

    println!("agent on {GPUS} simulated L4, synthetic game");
    println!("  resident memory, welcomed and idle:  {idle:>8} KiB");
    println!(
        "  with {warm} warm instances:            {with_warm:>8} KiB  ({:+.1} KiB per warm instance)",
        (with_warm as f64 - idle as f64) / warm as f64
    );
    println!("  after {reserves} reserve/release cycles: {after:>8} KiB");
    println!("reserve → reserved on loopback, {reserves} reservations (µs):");
    println!(
        "  p50 {}  p90 {}  p99 {}  p99.9 {}  max {}  ({warm_hits} took a warm instance; {:.1} s in all)",
        hist.value_at_quantile(0.50),
        hist.value_at_quantile(0.90),
        hist.value_at_quantile(0.99),
        hist.value_at_quantile(0.999),
        hist.max(),
        elapsed.as_secs_f64()
    );
}
