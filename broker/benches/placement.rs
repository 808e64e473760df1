//! Placement decisions per second and time per decision, at fleet scale.
//!
//! `cargo bench -p framecast-broker --bench placement`
//!
//! Fleets of 100, 1 000 and 10 000 nodes × 8 NVIDIA L4 (equal-size vGPU) are filled to 50%
//! and 95% of their framebuffer with a 50/35/15 mix of 720p/1080p/4K sessions over the three
//! default genres. Then, in steady state, each step releases a random session and places a
//! new one; only the `place` call is timed. First a percentile pass per configuration (20 000
//! decisions each, HdrHistogram) prints p50/p99/p99.9/max and decisions per second as a
//! table, a turnover pass shows how rejections fall as sessions turn over after a ramp to 95%,
//! and then criterion measures the mean. `FRAMECAST_BENCH_NODES=100,1000` limits the sizes,
//! `FRAMECAST_BENCH_STRATEGIES=genre-weighted` the strategies.

// A benchmark is a test of sorts: a failed unwrap is a failed run.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stdout,
    clippy::indexing_slicing
)]

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput};
use hdrhistogram::Histogram;

use framecast_broker::placement::{
    Decision, Engine, EngineConfig, PlaceRequest, Priority, RegionRtt, simulated, strategy,
};
use framecast_shared::genre::GenreProfile;
use framecast_shared::gpu::{GpuMode, models};
use framecast_shared::ids::{GameId, GenreName, RegionName, SessionId, TenantId, TierName};
use framecast_shared::state::EndReason;
use framecast_shared::tier::TierPreset;
use framecast_shared::time::Timestamp;

const NOW: Timestamp = Timestamp::from_millis(1_800_000_000_000);
const GPUS_PER_NODE: usize = 8;
const PERCENTILE_DECISIONS: usize = 20_000;

struct Bench {
    engine: Engine,
    live: Vec<SessionId>,
    rng: fastrand::Rng,
    seq: u128,
    names: Names,
}

struct Names {
    tenant: TenantId,
    games: [GameId; 3],
    tiers: [TierName; 3],
    genres: [GenreName; 3],
    region: RegionName,
}

impl Bench {
    fn new(nodes: usize, fill: f64, strategy_name: &str) -> Self {
        let mut engine = Engine::new(
            TierPreset::defaults(),
            GenreProfile::defaults(),
            EngineConfig::default(),
            strategy::by_name(strategy_name, 42).unwrap(),
        );
        let l4 = models::l4();
        for n in 0..nodes {
            let hello = simulated::hello(
                &format!("node-{n:05}"),
                "eu",
                &l4,
                GpuMode::EqualSize,
                GPUS_PER_NODE,
                1,
            )
            .unwrap();
            engine.reconcile(&hello, NOW).unwrap();
        }
        let names = Names {
            tenant: TenantId::new("bench").unwrap(),
            games: ["arena", "lanes", "quest"].map(|g| GameId::new(g).unwrap()),
            tiers: ["720p", "1080p", "4k"].map(|t| TierName::new(t).unwrap()),
            genres: ["fps", "moba", "rpg"].map(|g| GenreName::new(g).unwrap()),
            region: RegionName::new("eu").unwrap(),
        };
        let mut b = Self {
            engine,
            live: Vec::new(),
            rng: fastrand::Rng::with_seed(7),
            seq: 0,
            names,
        };
        // Stats walk the whole fleet, so look at them once per batch of placements.
        let mut misses = 0;
        while b.fill() < fill && misses < 1_000 {
            for _ in 0..(nodes * GPUS_PER_NODE / 20).max(1) {
                let req = b.request();
                match b.engine.place(req, NOW) {
                    Decision::Placed(p) => {
                        b.live.push(p.session_id);
                        misses = 0;
                    }
                    _ => misses += 1,
                }
            }
        }
        // Overshoot of the last batch: release back down to the target.
        while b.fill() > fill + 0.01 && !b.live.is_empty() {
            for _ in 0..(nodes * GPUS_PER_NODE / 100).max(1) {
                if let Some(victim) = b.live.pop() {
                    b.engine.release(&victim, EndReason::Released, NOW).unwrap();
                }
            }
        }
        b
    }

    fn fill(&self) -> f64 {
        let s = self.engine.stats();
        s.fb_used_mb as f64 / s.fb_total_mb as f64
    }

    fn request(&mut self) -> PlaceRequest {
        self.seq += 1;
        let tier = match self.rng.u8(..100) {
            0..50 => 0,
            50..85 => 1,
            _ => 2,
        };
        let genre = self.rng.usize(..3);
        PlaceRequest {
            session_id: SessionId::new(NOW, self.seq),
            tenant: self.names.tenant.clone(),
            game: self.names.games[genre].clone(),
            tier: self.names.tiers[tier].clone(),
            genre: self.names.genres[genre].clone(),
            priority: Priority::Normal,
            regions: vec![RegionRtt {
                region: self.names.region.clone(),
                rtt_ms: 10,
            }],
            fallbacks: Vec::new(),
            queue: false,
        }
    }

    /// Releases a random session and returns the next request, untimed.
    fn prepare(&mut self) -> PlaceRequest {
        if !self.live.is_empty() {
            let victim = self.live.swap_remove(self.rng.usize(..self.live.len()));
            self.engine
                .release(&victim, EndReason::Released, NOW)
                .unwrap();
        }
        self.request()
    }

    /// Places `req`, timed.
    fn decide(&mut self, req: PlaceRequest) -> Duration {
        let start = Instant::now();
        let decision = self.engine.place(req, NOW);
        let took = start.elapsed();
        if let Decision::Placed(p) = black_box(decision) {
            self.live.push(p.session_id);
        }
        took
    }
}

fn sizes() -> Vec<usize> {
    std::env::var("FRAMECAST_BENCH_NODES")
        .ok()
        .map(|v| v.split(',').filter_map(|s| s.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![100, 1_000, 10_000])
}

fn strategies() -> Vec<String> {
    std::env::var("FRAMECAST_BENCH_STRATEGIES")
        .ok()
        .map(|v| v.split(',').map(|s| s.trim().to_owned()).collect())
        .unwrap_or_else(|| strategy::NAMES.iter().map(|s| (*s).to_owned()).collect())
}

fn percentiles() {
    println!(
        "| strategy | nodes × GPUs | target fill | reached fill | decisions/s | p50 µs | p99 µs | p99.9 µs | max µs | placed |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    for name in strategies() {
        for nodes in sizes() {
            for fill in [0.5, 0.95] {
                let mut b = Bench::new(nodes, fill, &name);
                let reached = b.fill();
                let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).unwrap();
                let mut total = Duration::ZERO;
                let before = b.live.len();
                let mut placed = 0usize;
                for _ in 0..PERCENTILE_DECISIONS {
                    let req = b.prepare();
                    let n = b.live.len();
                    let took = b.decide(req);
                    placed += usize::from(b.live.len() > n);
                    total += took;
                    hist.record(u64::try_from(took.as_nanos()).unwrap_or(u64::MAX).max(1))
                        .unwrap();
                }
                let _ = before;
                let us = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
                println!(
                    "| {name} | {nodes} × {GPUS_PER_NODE} | {:.0}% | {:.1}% | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} | {:.1}% |",
                    fill * 100.0,
                    reached * 100.0,
                    PERCENTILE_DECISIONS as f64 / total.as_secs_f64(),
                    us(0.5),
                    us(0.99),
                    us(0.999),
                    hist.max() as f64 / 1000.0,
                    placed as f64 * 100.0 / PERCENTILE_DECISIONS as f64,
                );
            }
        }
    }
    println!();
}

/// Rejections after a ramp from idle to 95%, per window of 20 000 decisions, as sessions turn
/// over: how fast a strategy recovers from the fragmentation the ramp left.
fn turnover() {
    const WINDOW: usize = 20_000;
    const WINDOWS: usize = 10;
    let nodes = 1_000;
    println!(
        "Rejected requests per {WINDOW} decisions after a ramp to 95% ({nodes} × {GPUS_PER_NODE} L4):"
    );
    println!();
    println!(
        "| strategy | {} |",
        (1..=WINDOWS)
            .map(|w| format!("w{w}"))
            .collect::<Vec<_>>()
            .join(" | ")
    );
    println!("| --- |{}", " --- |".repeat(WINDOWS));
    for name in ["genre-weighted", "first-fit"] {
        let mut b = Bench::new(nodes, 0.95, name);
        let mut cells = Vec::new();
        for _ in 0..WINDOWS {
            let mut rejected = 0;
            for _ in 0..WINDOW {
                let req = b.prepare();
                let n = b.live.len();
                b.decide(req);
                rejected += usize::from(b.live.len() == n);
            }
            cells.push(format!("{:.1}%", rejected as f64 * 100.0 / WINDOW as f64));
        }
        println!("| {name} | {} |", cells.join(" | "));
    }
    println!();
}

fn criterion_benches(c: &mut Criterion) {
    for name in strategies() {
        let mut group = c.benchmark_group(format!("place/{name}"));
        group.throughput(Throughput::Elements(1));
        for nodes in sizes() {
            for fill in [0.5, 0.95] {
                let mut b = Bench::new(nodes, fill, &name);
                let id = BenchmarkId::from_parameter(format!(
                    "{nodes}x{GPUS_PER_NODE}@{:.0}%",
                    fill * 100.0
                ));
                group.bench_function(id, |bench| {
                    bench.iter_custom(|iters| {
                        let mut total = Duration::ZERO;
                        for _ in 0..iters {
                            let req = b.prepare();
                            total += b.decide(req);
                        }
                        total
                    });
                });
            }
        }
        group.finish();
    }
}

fn main() {
    percentiles();
    turnover();
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30)
        .configure_from_args();
    criterion_benches(&mut c);
    c.final_summary();
}
