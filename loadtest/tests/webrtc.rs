//! The `webrtc` engine for real: dev mode on loopback, webrtc-rs players that allocate,
//! connect over WHEP and receive the agent's OpenH264 video, then release their sessions; and
//! against brokers that misbehave, whose refusals, missing answers and unreleased sessions
//! are findings in the report rather than lost.

// In a test, a failed unwrap is a failed test.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use framecast_broker::dev::start_dev;
use framecast_loadtest::webrtc::{self, WebrtcOptions};

/// `GET path` with the engine's key, as JSON.
async fn get(addr: SocketAddr, path: &str) -> serde_json::Value {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "GET {path} HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer {}\r\nconnection: close\r\n\r\n",
        webrtc::API_KEY
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut out))
        .await
        .expect("the broker answers")
        .unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "GET {path}: {out}");
    let (_, body) = out.split_once("\r\n\r\n").unwrap();
    serde_json::from_str(body).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn players_stream_video_from_a_dev_node_and_release_their_sessions() {
    let opts = WebrtcOptions {
        max_streams: 2,
        step_seconds: 2.0,
        // The debug build's players are slower than the release build's: the test checks that
        // video flows and is measured, the figures are the example's.
        fps_floor: 0.5,
        ..WebrtcOptions::default()
    };
    let dev = start_dev(webrtc::dev_options(&opts)).await.unwrap();
    let addr = dev.broker().http;
    let progress = indicatif::ProgressBar::hidden();
    let report = webrtc::run_on(addr, &dev.api_key, &opts, &progress).await;
    // What the broker holds after the run, before the deployment stops.
    let nodes = get(addr, "/v1/nodes").await;
    let pools = get(addr, "/v1/pools").await;
    dev.stop().await;
    let report = report.unwrap();
    eprintln!("{}", report.summary());

    assert_eq!(report.engine, "webrtc");
    assert_eq!(report.scenario, "webrtc-360p");
    let streams = report.streams.as_ref().expect("the streams part is filled");
    assert_eq!(streams.resolution, "640x360");
    assert_eq!(streams.target_fps, 30.0);
    assert!(!streams.rule.is_empty());
    assert!(streams.cpus > 0);
    assert!(!streams.steps.is_empty());
    let first = &streams.steps[0];
    assert_eq!(
        (first.streams, first.connected),
        (1, 1),
        "the lone player connected: {:?}",
        first.errors
    );
    for step in &streams.steps {
        assert_eq!(step.connected, step.streams, "{:?}", step.errors);
        assert_eq!(step.ttff_ms.count, u64::from(step.streams));
        assert!(step.ttff_ms.p50 > 0.0, "time to first frame recorded");
        assert!(step.ttff_ms.max >= step.ttff_ms.p50);
        assert!(
            step.fps_min > 0.0 && step.fps_mean <= 1.5 * streams.target_fps,
            "frames arrived at a sane rate: mean {} min {}",
            step.fps_mean,
            step.fps_min
        );
    }
    assert_eq!(
        streams.steps.len(),
        2,
        "one player held, so the step of two ran: {:?}",
        first.failed_because
    );
    assert_eq!(
        streams.holds > 0,
        report.ok,
        "ok says whether the node held a stream"
    );

    // Every request was answered, placed and released.
    let requests: u64 = streams.steps.iter().map(|s| u64::from(s.streams)).sum();
    assert_eq!(report.requests, requests);
    assert_eq!(report.placed, requests);
    assert!(report.rejected.is_empty(), "{:?}", report.rejected);
    assert_eq!(report.ended.get("released"), Some(&requests));
    let latency = report.allocation_latency_ms.as_ref().unwrap();
    assert_eq!(latency.count, requests);
    // Not clamped away: a placement over loopback HTTP takes more than 10 µs, and is part
    // of the time to first frame.
    assert!(latency.p50 > 0.01, "{latency:?}");
    let ttff_max = streams
        .steps
        .iter()
        .map(|s| s.ttff_ms.max)
        .fold(0.0, f64::max);
    assert!(latency.max <= ttff_max * 1.01, "{latency:?} vs {ttff_max}");
    assert!(!report.allocation_latency_cdf.is_empty());

    // The broker holds nothing afterwards.
    let held: u64 = nodes
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|n| n["gpus"].as_array().unwrap())
        .map(|g| g["sessions"].as_u64().unwrap())
        .sum();
    assert_eq!(held, 0, "no session left on the node: {nodes}");
    for p in pools.as_array().unwrap() {
        assert_eq!(
            (p["reserved"].as_u64(), p["active"].as_u64()),
            (Some(0), Some(0)),
            "{p}"
        );
    }

    // The report survives its JSON form (floats may differ in their last digit).
    let json = serde_json::to_string(&report).unwrap();
    let back: framecast_loadtest::report::Report = serde_json::from_str(&json).unwrap();
    let back = back.streams.unwrap();
    assert_eq!(
        (back.holds, back.first_failing, back.steps.len()),
        (streams.holds, streams.first_failing, streams.steps.len())
    );
    assert_eq!(back.steps[0].connected, first.connected);
}

#[test]
fn the_sync_run_brings_its_own_dev_mode_and_refuses_bad_options_before_starting() {
    let progress = indicatif::ProgressBar::hidden();
    let err = webrtc::run(
        &WebrtcOptions {
            tier: "8k".into(),
            ..WebrtcOptions::default()
        },
        &progress,
    )
    .unwrap_err();
    assert!(err.to_string().starts_with("--tier"), "{err}");

    let report = webrtc::run(
        &WebrtcOptions {
            max_streams: 1,
            step_seconds: 1.0,
            fps_floor: 0.0,
            ..WebrtcOptions::default()
        },
        &progress,
    )
    .unwrap();
    let streams = report.streams.unwrap();
    assert_eq!(streams.steps.len(), 1);
    assert_eq!(
        streams.steps[0].connected, 1,
        "{:?}",
        streams.steps[0].errors
    );
    assert_eq!(report.ended.get("released"), Some(&1));
    assert_eq!(progress.length(), Some(1), "one step of one second");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_and_unusable_answers_are_counted_by_the_names_live_uses() {
    let opts = WebrtcOptions {
        max_streams: 3,
        ..WebrtcOptions::default()
    };
    let progress = indicatif::ProgressBar::hidden();
    for (answer, want) in [
        (
            (201, "not a session".to_owned()),
            "no-answer-bad-answer",
        ),
        (
            (
                429,
                r#"{"type":"https://framecast.dev/problems/too-many-requests","detail":"slow down"}"#
                    .to_owned(),
            ),
            "too-many-requests",
        ),
    ] {
        let addr = fake_broker(0, answer).await;
        let report = webrtc::run_on(addr, "k", &opts, &progress).await.unwrap();
        assert_eq!((report.requests, report.placed), (1, 0), "{want}");
        assert_eq!(
            report.rejected,
            [(want.to_owned(), 1)].into_iter().collect(),
            "{want}"
        );
        let streams = report.streams.unwrap();
        assert_eq!(streams.steps.len(), 1, "stepping stops at the failure");
        assert_eq!(streams.first_failing, Some(1));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_the_broker_keeps_fail_the_step_and_the_steps_are_kept() {
    // The node shows a session whatever is released: the wait for an empty node runs out
    // (15 s).
    let addr = fake_broker(
        1,
        (
            503,
            r#"{"type":"https://framecast.dev/problems/no-capacity","detail":"full"}"#.to_owned(),
        ),
    )
    .await;
    let opts = WebrtcOptions {
        max_streams: 3,
        ..WebrtcOptions::default()
    };
    let progress = indicatif::ProgressBar::hidden();
    let report = webrtc::run_on(addr, "k", &opts, &progress).await.unwrap();
    assert_eq!(report.rejected.get("no-capacity"), Some(&1));
    let streams = report.streams.unwrap();
    assert_eq!(streams.steps.len(), 1);
    let step = &streams.steps[0];
    assert!(!step.passed);
    assert!(
        step.failed_because
            .iter()
            .any(|f| f == "sessions not released"),
        "{:?}",
        step.failed_because
    );
    assert!(!report.ok);
}

/// A broker with one connected node showing `sessions` sessions, answering every
/// `POST /v1/sessions` with `answer` (status, body).
async fn fake_broker(sessions: u64, answer: (u16, String)) -> SocketAddr {
    common::fake_broker(move |method, path| match (method, path) {
        ("GET", "/v1/nodes") => (
            200,
            format!(r#"[{{"connected":true,"gpus":[{{"sessions":{sessions}}}]}}]"#),
        ),
        ("POST", "/v1/sessions") => answer.clone(),
        _ => (404, "{}".to_owned()),
    })
    .await
}
