//! A player in a real headless Chromium: dev mode (a broker and an in-process agent on
//! simulated GPUs), the player page served at `/`, Play → `POST /v1/sessions` → WHEP → H.264
//! video → input over the data channel → Stop, and the slot is free again on the broker.
//!
//! Chromium comes from Debian's `chromium` package, which `.ci/run` installs. Where it is
//! missing the test says so and passes, except under CI (`CI=true`), where a missing browser
//! fails it: the gate always plays the stream.

// In a test, a failed unwrap is a failed test.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    clippy::print_stderr
)]

mod chromium;
mod http;

use std::net::SocketAddr;
use std::time::Duration;

use framecast_broker::dev::{DevOptions, start_dev};

const KEY: &str = "dev-key";
const PLAY_SECONDS: u32 = 5;
/// The stream's frame rate: the 720p tier asks for 60, the software encoder's default cap is
/// 30 (`whep.software_max_fps`).
const STREAM_FPS: f64 = 30.0;

async fn get(addr: SocketAddr, path: &str) -> serde_json::Value {
    let r = http::request(
        addr,
        "GET",
        path,
        &[("authorization", &format!("Bearer {KEY}"))],
        b"",
    )
    .await;
    assert_eq!(r.status, 200, "GET {path}: {}", r.body);
    r.json()
}

/// Free slots of the 720p pool, summed over regions.
async fn free_720p(addr: SocketAddr) -> u64 {
    let pools = get(addr, "/v1/pools").await;
    pools
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["tier"] == "720p")
        .map(|p| p["free"].as_u64().unwrap())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_player_plays_in_chromium_and_the_slot_is_freed() {
    let Some(browser) = chromium::find() else {
        assert!(
            std::env::var("CI").is_err(),
            "CI must run the browser test: install chromium (.ci/run does)"
        );
        eprintln!(
            "SKIPPED a_player_plays_in_chromium_and_the_slot_is_freed: no chromium on the PATH \
             (apt-get install chromium, or set FRAMECAST_CHROMIUM)"
        );
        return;
    };
    let dev = start_dev(DevOptions {
        nodes: 1,
        gpus_toml: "[[gpus]]\nmodel = \"l4\"\ncount = 1\n".into(),
        http: SocketAddr::from(([127, 0, 0, 1], 0)),
        data_dir: None,
        api_key: KEY.into(),
        tune: None,
    })
    .await
    .unwrap();
    let addr = dev.broker().http;
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let nodes = get(addr, "/v1/nodes").await;
            if nodes
                .as_array()
                .is_some_and(|n| n.len() == 1 && n[0]["connected"] == true)
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the agent connects");
    let free_before = free_720p(addr).await;

    let sink = chromium::ReportSink::bind().await;
    let url = chromium::page_url(
        addr,
        "arena-shooter",
        "720p",
        "fps",
        PLAY_SECONDS,
        10,
        &sink.url(),
    );
    let _browser = chromium::Browser::open(&browser, &url);
    let r = sink.next(Duration::from_secs(90)).await;
    eprintln!("report: {r:#}");

    assert_eq!(r["ok"], true, "the page failed: {}", r["error"]);
    let video = &r["video"];
    assert_eq!(video["codec"], "video/H264");
    assert_eq!(
        (video["width"].as_u64(), video["height"].as_u64()),
        (Some(1280), Some(720)),
        "the tier's resolution"
    );
    let seconds = r["play_seconds"].as_f64().unwrap();
    let decoded = video["frames_decoded"].as_f64().unwrap();
    assert!(
        decoded >= 0.9 * STREAM_FPS * seconds,
        "{decoded} frames decoded in {seconds} s at {STREAM_FPS} fps"
    );
    assert!(video["key_frames_decoded"].as_u64().unwrap() >= 1);
    let ttff = r["ttff_ms"].as_f64().unwrap();
    assert!(ttff > 0.0, "time to first frame recorded");
    for mark in ["allocated", "answer", "connected", "first_frame"] {
        assert!(r["marks"][mark].is_number(), "mark {mark} recorded");
    }
    // Input reached the game: the picture's input marker moved to what was sent.
    let input = &r["input"];
    let before = input["marker_seq_before"].as_u64().unwrap();
    let after = input["marker_seq_after"].as_u64().unwrap();
    let last = input["last_seq_sent"].as_u64().unwrap();
    assert!(input["sent"].as_u64().unwrap() >= 10);
    assert!(after > before, "the marker changed: {before} -> {after}");
    assert_eq!(after, last, "the last input sent shows in the picture");
    assert!(
        !input["latency_ms"].as_array().unwrap().is_empty(),
        "input-to-frame latency measured"
    );
    // Stop: the session ended as released, and the broker has the slot back.
    assert_eq!(r["ended_state"], "ended");
    assert_eq!(r["end_reason"], "released");
    tokio::time::timeout(Duration::from_secs(10), async {
        while free_720p(addr).await != free_before {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the slot is free again on the broker");
    dev.stop().await;
}
