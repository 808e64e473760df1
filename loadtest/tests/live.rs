//! The `live` engine against real brokers on loopback: it agrees with `sim` on the smoke
//! scenario, it drives an existing broker and leaves nothing behind, a broker that gives no
//! usable answer fails the run's rejection SLO, and it refuses what it cannot run with errors
//! that name the scenario's field.

// Tests: a failed unwrap is a failed test.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use common::fake_broker;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;
use indicatif::ProgressBar;

use framecast_broker::dev::{DevOptions, start_dev};
use framecast_loadtest::live::{self, LiveOptions};
use framecast_loadtest::scenario::Scenario;
use framecast_loadtest::sim;

fn load(name: &str) -> Scenario {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("scenarios")
        .join(name);
    Scenario::load(&path).unwrap_or_else(|e| panic!("{e}"))
}

/// The agreement tolerance between `sim` and `live` on one scenario: the same requests
/// exactly (both draw them from the same stream); placed, queued and rejected (all reasons
/// together) each within max(2, 5% of the requests). The rest of the difference is timing:
/// the real broker's timers tick every 200 ms (12 simulated seconds at speed 60), node and
/// session state travels over QUIC, and a session placed or ended a tick apart can decide the
/// next request's fate when the fleet is nearly full.
fn tolerance(requests: u64) -> u64 {
    (requests * 5).div_ceil(100).max(2)
}

#[test]
fn sim_and_live_agree_on_the_smoke_scenario() {
    let scenario = load("smoke.toml");
    let sim = sim::run(&scenario, None).unwrap();
    // 1800 simulated seconds in 30 wall seconds.
    let opts = LiveOptions {
        speed: 60.0,
        ..LiveOptions::default()
    };
    let live = live::run_detailed(&scenario, &opts, &ProgressBar::hidden()).unwrap();
    let r = &live.report;
    eprintln!("sim:  {}", sim.summary());
    eprintln!("live: {}", r.summary());
    assert_eq!(r.engine, "live");
    assert_eq!(
        r.requests, sim.requests,
        "both engines draw the same demand"
    );
    assert!(
        r.requests > 10,
        "smoke makes a few dozen requests: {}",
        r.requests
    );
    let tol = tolerance(r.requests);
    let rejected = |rep: &framecast_loadtest::report::Report| rep.rejected.values().sum::<u64>();
    for (what, a, b) in [
        ("placed", sim.placed, r.placed),
        ("queued", sim.queued, r.queued),
        ("rejected", rejected(&sim), rejected(r)),
    ] {
        assert!(
            a.abs_diff(b) <= tol,
            "{what}: sim {a}, live {b}, tolerance {tol}"
        );
    }
    // Every request was answered, and its latency recorded from its due time.
    assert!(live.failed.is_empty(), "{:?}", live.failed);
    let latency = r.allocation_latency_ms.as_ref().unwrap();
    assert_eq!(latency.count, r.requests);
    assert!(latency.p50 > 0.0 && latency.p99 >= latency.p50);
    assert!(r.allocations_per_s.unwrap() > 0.0);
    // A sample once a simulated minute (best effort: most of them at least).
    assert!(r.timeline.len() >= 25, "{} samples", r.timeline.len());
    assert!(
        r.peak.sessions > 0 && r.peak.framebuffer > 0.0 && r.peak.max_sessions_per_gpu > 0,
        "{:?}",
        r.peak
    );
    // The last sample is taken at the end, before the run releases what it holds.
    let last = r.timeline.last().unwrap();
    assert_eq!(last.t_s, scenario.duration_s);
    assert!(
        last.sessions >= live.released_at_end && last.sessions > 0,
        "{last:?}, {} released at the end",
        live.released_at_end
    );
    assert_eq!(r.placed_per_tier.values().sum::<u64>(), r.placed);
    // Sessions whose length ended within the run were released as in sim; the rest at the end.
    let released =
        |rep: &framecast_loadtest::report::Report| rep.ended.get("released").copied().unwrap_or(0);
    assert!(
        released(&sim).abs_diff(released(r)) <= tol,
        "released: sim {}, live {}",
        released(&sim),
        released(r)
    );
    assert_eq!(live.release_failures, 0);
    assert_eq!(r.queue_wait_s.count, r.placed);
}

/// `live` runs the broker's real pool planner when the scenario asks for warm pools: its
/// agents build the plans' warm instances, sessions land on them, and the report carries the
/// broker's warm hits, cold starts and the idle warm capacity over time; with `--pools none`
/// the planner is off and nothing is kept warm.
#[test]
fn the_tools_own_broker_runs_the_pool_planner_the_scenario_asks_for() {
    let mut scenario = load("pools.toml");
    // Its first half hour, in 30 wall seconds (as the smoke test runs: faster, the scaled
    // node-loss timers of a busy 2-core machine start losing nodes); the planner's round is
    // 0.2 s of wall time, 12 simulated seconds.
    scenario.duration_s = 1800;
    let opts = LiveOptions {
        speed: 60.0,
        ..LiveOptions::default()
    };
    let r = live::run(&scenario, &opts, &ProgressBar::hidden()).unwrap();
    eprintln!("{}", r.summary());
    assert_eq!(r.pools, "planner");
    assert!(r.placed > 150, "{}", r.placed);
    // The broker's counters, as of its last round before the end: at most every placement.
    let counted = r.warm_hits + r.cold_starts;
    assert!(
        counted <= r.placed && counted * 10 >= r.placed * 9,
        "{} warm hits + {} cold starts against {} placed",
        r.warm_hits,
        r.cold_starts,
        r.placed
    );
    // The first players of each game and tier find nothing warm; once the planner has seen
    // them, most do.
    assert!(r.cold_starts > 0, "{}", r.cold_starts);
    let ratio = r.warm_hit_ratio.unwrap();
    assert!(ratio > 0.5, "warm-hit ratio {ratio}");
    assert!(
        r.timeline
            .iter()
            .any(|s| s.warm_idle > 0 && s.warm_planned > 0),
        "no sample saw warm instances"
    );
    assert!(r.peak_warm_idle_share > 0.0 && r.peak_warm_idle_share < 0.5);
    assert!(r.mean_warm_idle_share <= r.peak_warm_idle_share);
    assert!(
        r.timeline.iter().any(|s| s.warm_hit_ratio.is_some()),
        "no per-minute warm-hit ratio"
    );

    let off = LiveOptions {
        pools: Some(framecast_loadtest::scenario::PoolPolicy::None),
        ..opts
    };
    let r = live::run(&scenario, &off, &ProgressBar::hidden()).unwrap();
    assert_eq!(r.pools, "none");
    assert_eq!((r.warm_hits, r.cold_starts, r.warm_hit_ratio), (0, 0, None));
    assert!(r.timeline.iter().all(|s| s.warm_idle == 0));
}

#[test]
fn an_existing_broker_is_driven_and_left_without_sessions() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let key = "live-test-key";
    let dev = rt
        .block_on(start_dev(DevOptions {
            nodes: 1,
            gpus_toml: "[[gpus]]\nmodel = \"l4\"\ncount = 1\n".into(),
            http: SocketAddr::from(([127, 0, 0, 1], 0)),
            data_dir: None,
            api_key: key.into(),
            tune: None,
        }))
        .unwrap();
    let addr = dev.broker().http;
    rt.block_on(async {
        let started = Instant::now();
        loop {
            let nodes = get(addr, key, "/v1/nodes").await;
            if nodes
                .as_array()
                .unwrap()
                .iter()
                .any(|n| n["connected"] == true)
            {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "no agent: {nodes}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    // One L4 holds three 4K sessions: with about six wanted at once, some queue, some of
    // those give up, and some are still held when the run ends.
    let scenario = Scenario::parse(
        r#"
name = "tiny"
seed = 3
duration_s = 12

[[fleet]]
region = "local"
nodes = 1
model = "l4"
gpus_per_node = 1

[demand]
arrivals = { kind = "poisson", rate_per_s = 2 }
tiers = { "4k" = 1 }
genres = { rpg = 1 }
session_minutes = { rpg = { median = 0.05, sigma = 0.3 } }
abandon_per_minute = 0.9
"#,
        "tiny.toml",
    )
    .unwrap();
    let opts = LiveOptions {
        broker: Some(format!("http://{addr}")),
        api_key: Some(key.into()),
        speed: 2.0,
        connections: 4,
        ..LiveOptions::default()
    };
    // Outside the runtime: `run` builds its own; the broker runs on this one's threads.
    let live = live::run_detailed(&scenario, &opts, &ProgressBar::hidden()).unwrap();
    let r = &live.report;
    eprintln!("{}", r.summary());
    eprintln!(
        "failed {:?}, retried {}, released at end {}, swept {}",
        live.failed, live.retried, live.released_at_end, live.swept
    );
    assert!(r.requests >= 10, "{}", r.requests);
    assert!(live.failed.is_empty(), "{:?}", live.failed);
    assert_eq!(r.allocation_latency_ms.as_ref().unwrap().count, r.requests);
    assert!(
        r.queued > 0,
        "the fleet is small enough that some requests queue"
    );
    // Released sessions made room: queued requests were placed, their waits measured.
    assert!(r.placed > r.placed_at_once, "{r:?}");
    assert!(r.queue_wait_s.max > 0.0, "{:?}", r.queue_wait_s);
    assert_eq!(
        r.placed + r.rejected.values().sum::<u64>() + (r.queued - (r.placed - r.placed_at_once)),
        r.requests,
        "every request was placed, rejected or queued and never placed"
    );
    assert_eq!(live.release_failures, 0);
    // Nothing of the run is left on the broker.
    rt.block_on(async {
        let listed = get(addr, key, "/v1/sessions").await;
        assert_eq!(listed["sessions"], serde_json::json!([]), "{listed}");
        let pools = get(addr, key, "/v1/pools").await;
        for p in pools.as_array().unwrap() {
            assert_eq!(
                (&p["reserved"], &p["active"], &p["queued"]),
                (&0.into(), &0.into(), &0.into()),
                "{p}"
            );
        }
        dev.stop().await;
    });
}

#[test]
fn a_broker_without_usable_answers_fails_the_rejection_slo() {
    // A broker that lists its pools and nodes but answers every allocation with a body that
    // is no session.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let addr = rt.block_on(fake_broker(|method, path| match (method, path) {
        ("GET", "/v1/pools" | "/v1/nodes") => (200, "[]".into()),
        ("POST", "/v1/sessions") => (201, "not a session".into()),
        ("GET", p) if p.starts_with("/v1/sessions?") => (200, r#"{"sessions":[]}"#.into()),
        _ => (404, "{}".into()),
    }));
    let scenario = Scenario::parse(
        r#"
name = "mute"
seed = 5
duration_s = 12

[[fleet]]
region = "local"
nodes = 1
model = "l4"
gpus_per_node = 1

[demand]
arrivals = { kind = "poisson", rate_per_s = 2 }
tiers = { "720p" = 1 }
genres = { rpg = 1 }

[slo]
max_rejected_ratio = 0.01
"#,
        "mute.toml",
    )
    .unwrap();
    let opts = LiveOptions {
        broker: Some(format!("http://{addr}")),
        api_key: Some("k".into()),
        speed: 4.0,
        connections: 4,
        ..LiveOptions::default()
    };
    let live = live::run_detailed(&scenario, &opts, &ProgressBar::hidden()).unwrap();
    let r = &live.report;
    eprintln!("{}", r.summary());
    assert!(r.requests > 5, "{}", r.requests);
    assert_eq!(r.placed, 0);
    assert_eq!(
        r.rejected.get("no-answer-bad-answer").copied(),
        Some(r.requests),
        "{:?}",
        r.rejected
    );
    assert_eq!(live.failed.get("bad-answer").copied(), Some(r.requests));
    let check = r
        .slo
        .iter()
        .find(|c| c.name == "max_rejected_ratio")
        .unwrap();
    assert!(!check.ok && !r.ok, "{check:?}");
    drop(rt);
}

#[test]
fn faults_are_applied_to_the_tools_own_deployment() {
    // Smoke with a node lost and a broker restart, and its state under --data-dir.
    let mut scenario = load("smoke.toml");
    scenario.faults = vec![
        framecast_loadtest::scenario::Fault::NodeLoss {
            at_s: 600,
            nodes: 1,
        },
        framecast_loadtest::scenario::Fault::BrokerRestart {
            at_s: 1200,
            down_s: 0,
        },
    ];
    let data = tempfile::tempdir().unwrap();
    let opts = LiveOptions {
        speed: 90.0,
        data_dir: Some(data.path().to_owned()),
        ..LiveOptions::default()
    };
    let live = live::run_detailed(&scenario, &opts, &ProgressBar::hidden()).unwrap();
    let r = &live.report;
    eprintln!("{}", r.summary());
    assert_eq!((r.nodes_lost, r.broker_restarts), (1, 1));
    assert!(r.placed > 0 && r.placed + r.rejected.values().sum::<u64>() <= r.requests);
    assert_eq!(live.release_failures, 0);
    // The run's own state is gone.
    assert_eq!(std::fs::read_dir(data.path()).unwrap().count(), 0);
}

#[test]
fn what_live_cannot_run_is_refused_before_anything_starts() {
    let hidden = ProgressBar::hidden();
    let mut big = load("smoke.toml");
    big.fleet[0].nodes = 65;
    let err = live::run(&big, &LiveOptions::default(), &hidden)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("fleet = 65 nodes") && err.contains("--max-nodes"),
        "{err}"
    );

    let faults = load("node-loss.toml");
    let external = LiveOptions {
        broker: Some("http://127.0.0.1:9".into()),
        api_key: Some("k".into()),
        ..LiveOptions::default()
    };
    let err = live::run(&faults, &external, &hidden)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("faults.0 = node-loss") && err.contains("--broker"),
        "{err}"
    );

    let mut regions = load("smoke.toml");
    let mut second = regions.fleet[0].clone();
    second.region = "us".into();
    regions.fleet.push(second);
    let err = live::run(&regions, &LiveOptions::default(), &hidden)
        .unwrap_err()
        .to_string();
    assert!(err.starts_with("fleet = regions eu, us"), "{err}");

    let mut month = load("smoke.toml");
    month.duration_s = 30 * 24 * 3600;
    let err = live::run(&month, &LiveOptions::default(), &hidden)
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("--speed 1:") && err.contains("7 days"),
        "{err}"
    );
}

/// `GET path` as JSON, on a connection of its own.
async fn get(addr: SocketAddr, key: &str, path: &str) -> serde_json::Value {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let request = Request::get(path)
        .header("host", addr.to_string())
        .header("authorization", format!("Bearer {key}"))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let response = tokio::time::timeout(Duration::from_secs(10), sender.send_request(request))
        .await
        .unwrap()
        .unwrap();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    serde_json::from_slice(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body:?}"))
}
