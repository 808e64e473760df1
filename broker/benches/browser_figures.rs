//! Players in a real headless Chromium, for `docs/BENCHMARKS.md`: time to first frame (Play →
//! first decoded frame, allocation included) split into its steps, and input → frame latency.
//!
//! `cargo bench -p framecast-broker --bench browser_figures`
//!
//! Starts dev mode (a broker and one in-process agent on a simulated L4, on loopback), then
//! plays `FRAMECAST_BENCH_SESSIONS` (20) sessions one after another, each in a fresh Chromium
//! with the player page's test mode: 720p (the software encoder's 30 fps), a few seconds of
//! play with key presses, then Stop. Each page measures its own marks from the Play moment and
//! reads the input marker out of the decoded pictures; this program collects the reports.
//! Needs Debian's `chromium` (`scripts/install-test-deps.sh`).

// A benchmark is a test of sorts: a failed unwrap is a failed run.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stdout,
    clippy::indexing_slicing,
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss
)]

#[path = "../tests/chromium/mod.rs"]
mod chromium;

use std::net::SocketAddr;
use std::time::Duration;

use framecast_broker::dev::{DevOptions, start_dev};

fn env<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn quantile(values: &mut [f64], q: f64) -> f64 {
    values.sort_by(f64::total_cmp);
    if values.is_empty() {
        return f64::NAN;
    }
    let i = ((values.len() - 1) as f64 * q).round() as usize;
    values[i.min(values.len() - 1)]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let sessions: usize = env("FRAMECAST_BENCH_SESSIONS", 20);
    let seconds: u32 = env("FRAMECAST_BENCH_SECONDS", 3);
    let tier: String = env("FRAMECAST_BENCH_TIER", "720p".to_owned());
    let browser = chromium::find().expect("chromium (scripts/install-test-deps.sh)");
    let dev = start_dev(DevOptions {
        nodes: 1,
        gpus_toml: "[[gpus]]\nmodel = \"l4\"\ncount = 1\n".into(),
        http: SocketAddr::from(([127, 0, 0, 1], 0)),
        data_dir: None,
        api_key: "dev-key".into(),
        tune: None,
    })
    .await
    .unwrap();
    let addr = dev.broker().http;
    // Let the agent connect.
    tokio::time::sleep(Duration::from_secs(2)).await;

    let steps = [
        "allocated",
        "offer_sent",
        "answer",
        "ice_connected",
        "connected",
        "first_frame",
    ];
    let mut marks: Vec<Vec<f64>> = vec![Vec::new(); steps.len()];
    let mut ttff = Vec::new();
    let mut latency = Vec::new();
    let mut decoded_share = Vec::new();
    let mut failed = 0;
    let sink = chromium::ReportSink::bind().await;
    for n in 0..sessions {
        let url = chromium::page_url(
            addr,
            "arena-shooter",
            &tier,
            "fps",
            seconds,
            10,
            &sink.url(),
        );
        let _browser = chromium::Browser::open(&browser, &url);
        let r = sink.next(Duration::from_secs(60)).await;
        if r["ok"] != true {
            failed += 1;
            println!("run {n}: failed: {}", r["error"]);
            continue;
        }
        for (i, step) in steps.iter().enumerate() {
            if let Some(v) = r["marks"][step].as_f64() {
                marks[i].push(v);
            }
        }
        ttff.push(r["ttff_ms"].as_f64().unwrap());
        for l in r["input"]["latency_ms"].as_array().unwrap() {
            latency.push(l.as_f64().unwrap());
        }
        let fps = 30.0;
        decoded_share.push(
            r["video"]["frames_decoded"].as_f64().unwrap()
                / (fps * r["play_seconds"].as_f64().unwrap()),
        );
        println!(
            "run {n}: first frame {:.0} ms, input→frame median {:.0} ms",
            r["ttff_ms"].as_f64().unwrap(),
            quantile(
                &mut r["input"]["latency_ms"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_f64().unwrap())
                    .collect::<Vec<_>>(),
                0.5
            )
        );
    }
    println!(
        "\n{} sessions ({failed} failed), {tier}, {seconds} s each",
        sessions
    );
    println!(
        "time to first frame (Play → first decoded frame): p50 {:.0} ms, p99 {:.0} ms",
        quantile(&mut ttff.clone(), 0.5),
        quantile(&mut ttff, 0.99)
    );
    println!("steps, ms after Play (p50 / p99):");
    let mut previous = 0.0;
    for (i, step) in steps.iter().enumerate() {
        let p50 = quantile(&mut marks[i].clone(), 0.5);
        println!(
            "  {step:<14} {p50:>6.0} / {:>6.0}   (+{:.0} from the step before, at p50)",
            quantile(&mut marks[i], 0.99),
            p50 - previous
        );
        previous = p50;
    }
    println!(
        "input → frame over {} inputs: p50 {:.0} ms, p99 {:.0} ms",
        latency.len(),
        quantile(&mut latency.clone(), 0.5),
        quantile(&mut latency, 0.99)
    );
    println!(
        "frames decoded / (30 fps × seconds): min {:.2}",
        decoded_share.iter().copied().fold(f64::INFINITY, f64::min)
    );
    dev.stop().await;
}
