//! The load-test binary as an operator meets it.

// In a test, a failed unwrap is a failed test.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::process::Command;

#[test]
fn help_version_and_models() {
    let bin = env!("CARGO_BIN_EXE_framecast-loadtest");
    let out = Command::new(bin).arg("--help").output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("models"));
    let out = Command::new(bin).arg("--version").output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("framecast-loadtest {}", env!("CARGO_PKG_VERSION"))
    );

    let out = Command::new(bin)
        .args(["models", "--set", "tiers.1080p.framebuffer_mb=6144"])
        .env_remove("FRAMECAST_CONFIG")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table = String::from_utf8_lossy(&out.stdout);
    let l4 = table.lines().find(|l| l.starts_with("NVIDIA L4 ")).unwrap();
    assert!(
        l4.contains("4 (L4-6Q)"),
        "a 6 GB 1080p tier takes the 6Q profile: {l4}"
    );
}

fn scenario(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("scenarios")
        .join(format!("{name}.toml"))
}

#[test]
fn sim_is_deterministic_and_writes_its_report() {
    let bin = env!("CARGO_BIN_EXE_framecast-loadtest");
    let dir = tempfile::tempdir().unwrap();
    let mut reports = Vec::new();
    for run in 0..2 {
        let json = dir.path().join(format!("r{run}.json"));
        let out = Command::new(bin)
            .args(["sim", scenario("node-loss").to_str().unwrap(), "--json"])
            .arg(&json)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let summary = String::from_utf8_lossy(&out.stdout);
        assert!(summary.contains("node-loss (sim engine"), "{summary}");
        let mut report: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
        // Wall-clock figures differ between runs; everything simulated must not.
        report["wall_seconds"] = 0.into();
        report["placements_per_wall_second"] = 0.into();
        reports.push(report);
    }
    assert_eq!(
        reports[0], reports[1],
        "same scenario and seed, same report"
    );
    let r = &reports[0];
    // The schema's fields, as docs/OPERATIONS.md lists them.
    for field in [
        "schema",
        "scenario",
        "engine",
        "strategy",
        "seed",
        "duration_s",
        "nodes",
        "gpus",
        "requests",
        "placed",
        "placed_at_once",
        "queued",
        "rejected",
        "abandoned",
        "ended",
        "nodes_lost",
        "queue_wait_s",
        "peak",
        "peak_sessions_per_gpu_in_use",
        "mean_framebuffer",
        "lower_bound_gpus_at_peak",
        "timeline",
        "wall_seconds",
        "placements_per_wall_second",
        "slo",
        "ok",
        "placed_per_tier",
        "reconnects",
        "broker_restarts",
        "retried_after_restart",
        "mean_real_use",
        "queue_wait_cdf",
    ] {
        assert!(r.get(field).is_some(), "report lacks {field}");
    }
    let sample = &r["timeline"][0];
    for field in [
        "t_s",
        "sessions",
        "queued",
        "gpus_in_use",
        "framebuffer",
        "encoder",
        "compute",
        "fragmentation",
        "real_use",
        "max_sessions_per_gpu",
    ] {
        assert!(sample.get(field).is_some(), "a sample lacks {field}");
    }
    // The queue-wait distribution rises to 1.
    let cdf = r["queue_wait_cdf"].as_array().unwrap();
    assert!(!cdf.is_empty() && cdf.len() <= 200);
    assert!((cdf.last().unwrap()["quantile"].as_f64().unwrap() - 1.0).abs() < 1e-9);
    assert_eq!(r["schema"], 1);
    assert_eq!(r["nodes_lost"], 4);
    assert!(
        r["ended"]["node-lost"].as_u64().unwrap() > 0,
        "the lost nodes' sessions ended"
    );
    assert!(r["placed"].as_u64().unwrap() > 1000);
    // Another seed, another run.
    let out = Command::new(bin)
        .args([
            "sim",
            scenario("node-loss").to_str().unwrap(),
            "--seed",
            "10",
        ])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_ne!(
        String::from_utf8_lossy(&out.stdout).lines().nth(2),
        Some(format!("requests         {}", r["requests"]).as_str())
    );
}

#[test]
fn a_failed_slo_or_a_bad_scenario_sets_the_exit_status() {
    let bin = env!("CARGO_BIN_EXE_framecast-loadtest");
    let dir = tempfile::tempdir().unwrap();
    // The smoke scenario with a utilisation its light load cannot reach.
    let text = std::fs::read_to_string(scenario("smoke")).unwrap()
        + "min_peak_framebuffer_utilization = 0.99\n";
    let strict = dir.path().join("strict.toml");
    std::fs::write(&strict, text).unwrap();
    let out = Command::new(bin).arg("sim").arg(&strict).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("FAILED"));

    let broken = dir.path().join("broken.toml");
    std::fs::write(&broken, "name = \"x\"\nduration_s = 0\n").unwrap();
    let out = Command::new(bin).arg("sim").arg(&broken).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("broken.toml"), "{err}");

    let out = Command::new(bin)
        .args([
            "sim",
            scenario("smoke").to_str().unwrap(),
            "--strategy",
            "best",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("first-fit"));
}

#[test]
fn every_strategy_on_one_demand_with_the_headline_and_an_html_report() {
    let bin = env!("CARGO_BIN_EXE_framecast-loadtest");
    let dir = tempfile::tempdir().unwrap();
    let (json, html) = (dir.path().join("c.json"), dir.path().join("c.html"));
    let out = Command::new(bin)
        .args([
            "sim",
            scenario("smoke").to_str().unwrap(),
            "--strategy",
            "all",
            "--json",
        ])
        .arg(&json)
        .arg("--html")
        .arg(&html)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("one GPU per player vs pooling"), "{table}");
    let c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let runs = c["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 5);
    let requests = &runs[0]["requests"];
    assert!(runs.iter().all(|r| &r["requests"] == requests));
    assert_eq!(c["headline"]["exclusive"]["max_sessions_per_gpu"], 1);
    let page = std::fs::read_to_string(&html).unwrap();
    assert!(page.starts_with("<!DOCTYPE html>") && page.contains("<svg"));
    assert!(!page.contains("http://") && !page.contains("https://"));
}

#[test]
fn a_trace_with_a_broker_restart_and_dropped_streams() {
    let bin = env!("CARGO_BIN_EXE_framecast-loadtest");
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("r.json");
    let out = Command::new(bin)
        .args(["sim", scenario("replay").to_str().unwrap(), "--json"])
        .arg(&json)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    // One request per trace row.
    let rows = std::fs::read_to_string(
        scenario("replay")
            .parent()
            .unwrap()
            .join("traces/launch-night.csv"),
    )
    .unwrap()
    .lines()
    .count()
        - 1;
    assert_eq!(
        r["requests"].as_u64().unwrap(),
        u64::try_from(rows).unwrap()
    );
    assert_eq!(r["broker_restarts"], 1);
    // The restart falls in the launch burst (3 requests/s for 15 s).
    let retried = r["retried_after_restart"].as_u64().unwrap();
    assert!((20..=80).contains(&retried), "{retried}");
    // Those requests waited for the broker: up to the 15 s it was away.
    let max_wait = r["queue_wait_s"]["max"].as_f64().unwrap();
    assert!((10.0..=16.0).contains(&max_wait), "{max_wait}");
    assert!(r["reconnects"].as_u64().unwrap() > 100);
    // A tenth of the players whose stream dropped never came back: ended by the grace.
    assert!(r["ended"]["error"].as_u64().unwrap() > 0);

    // A trace row the scenario cannot use names its file and line.
    let bad_dir = dir.path().join("bad");
    std::fs::create_dir_all(bad_dir.join("traces")).unwrap();
    std::fs::write(
        bad_dir.join("traces/launch-night.csv"),
        "t_s,tier\n1.0,720p\n99999,720p\n",
    )
    .unwrap();
    std::fs::copy(scenario("replay"), bad_dir.join("replay.toml")).unwrap();
    let out = Command::new(bin)
        .arg("sim")
        .arg(bad_dir.join("replay.toml"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("launch-night.csv:3: t_s = 99999"), "{err}");
}

#[test]
fn plan_finds_a_fleet_and_says_when_none_will_do() {
    let bin = env!("CARGO_BIN_EXE_framecast-loadtest");
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("p.json");
    let out = Command::new(bin)
        .args([
            "plan",
            scenario("smoke").to_str().unwrap(),
            "--slo",
            "max_queue_wait_p99_s=0",
            "--json",
        ])
        .arg(&json)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let p: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let n = p["smallest_nodes"].as_u64().unwrap();
    assert!((1..=8).contains(&n), "{p}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("smallest fleet meeting the SLO"));

    // No waiting at all, and no more than one node: cannot be met.
    let out = Command::new(bin)
        .args([
            "plan",
            scenario("smoke").to_str().unwrap(),
            "--slo",
            "max_queue_wait_p99_s=0",
            "--max-nodes",
            "1",
        ])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let out = Command::new(bin)
        .args([
            "plan",
            scenario("smoke").to_str().unwrap(),
            "--slo",
            "p99=1",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--slo p99"));
}

/// Runs `sim` with `args` and returns the JSON report and the summary.
fn sim_json(args: &[&str]) -> (serde_json::Value, String) {
    let bin = env!("CARGO_BIN_EXE_framecast-loadtest");
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("r.json");
    let out = Command::new(bin)
        .arg("sim")
        .args(args)
        .arg("--json")
        .arg(&json)
        .output()
        .unwrap();
    assert!(
        out.status.code().is_some_and(|c| c <= 1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    (report, String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn a_fixed_warm_buffer_gives_warm_hits_and_cold_start_waits_and_is_deterministic() {
    let smoke = scenario("smoke");
    let args = [smoke.to_str().unwrap(), "--pools", "fixed"];
    let (mut a, summary) = sim_json(&args);
    let (mut b, _) = sim_json(&args);
    for r in [&mut a, &mut b] {
        r["wall_seconds"] = 0.into();
        r["placements_per_wall_second"] = 0.into();
    }
    assert_eq!(a, b, "same scenario, seed and pools, same report");
    assert_eq!(a["pools"], "fixed");
    let hits = a["warm_hits"].as_u64().unwrap();
    let colds = a["cold_starts"].as_u64().unwrap();
    assert!(hits > 0, "{summary}");
    assert_eq!(hits + colds, a["placed"].as_u64().unwrap());
    let ratio = a["warm_hit_ratio"].as_f64().unwrap();
    assert!((ratio - hits as f64 / (hits + colds) as f64).abs() < 1e-9);
    // Cold-started players waited for their game: 30 s, or the rest of a start under way.
    let waits = &a["cold_start_wait_s"];
    assert_eq!(waits["count"].as_u64().unwrap(), colds);
    assert!(
        colds > 0 && waits["max"].as_f64().unwrap() <= 30.1,
        "{waits}"
    );
    assert!(waits["p50"].as_f64().unwrap() > 0.0);
    assert_eq!(a["reprofiles"], 0, "the fixed buffer never re-profiles");
    // The timeline shows the idle warm instances and what they hold.
    let timeline = a["timeline"].as_array().unwrap();
    assert!(
        timeline
            .iter()
            .any(|s| s["warm_idle"].as_u64().unwrap() > 0)
    );
    assert!(
        timeline
            .iter()
            .all(|s| (0.0..=1.0).contains(&s["warm_idle_share"].as_f64().unwrap()))
    );
    assert!(timeline.iter().any(|s| s["warm_hit_ratio"].is_f64()));
    assert!(summary.contains("warm pools       fixed:"), "{summary}");
    assert!(summary.contains("cold start (s)"), "{summary}");

    // Without pools nobody waits for a game, and the summary says nothing of warm figures.
    let (none, summary) = sim_json(&[smoke.to_str().unwrap()]);
    assert_eq!(none["pools"], "none");
    assert_eq!(none["warm_hits"], 0);
    assert_eq!(none["cold_start_wait_s"]["count"], 0);
    assert!(none.get("warm_hit_ratio").is_none());
    assert!(!summary.contains("warm pools"), "{summary}");
}

#[test]
fn the_pool_planner_keeps_players_warm_with_a_bounded_idle_buffer() {
    // A fleet that holds its load, two simulated hours (the planner learns the demand in the
    // first minutes).
    let (r, summary) = sim_json(&[scenario("pools").to_str().unwrap(), "--pools", "planner"]);
    assert_eq!(r["pools"], "planner");
    let ratio = r["warm_hit_ratio"].as_f64().unwrap();
    assert!(ratio >= 0.85, "warm-hit ratio {ratio}: {summary}");
    let timeline = r["timeline"].as_array().unwrap();
    let peak_idle = timeline
        .iter()
        .map(|s| s["warm_idle_share"].as_f64().unwrap())
        .fold(0.0, f64::max);
    assert!(
        peak_idle > 0.0 && peak_idle <= 0.15,
        "idle warm share {peak_idle}: {summary}"
    );
    assert!((r["peak_warm_idle_share"].as_f64().unwrap() - peak_idle).abs() < 1e-9);
    assert_eq!(r["rejected"].as_object().unwrap().len(), 0, "{summary}");
}

#[test]
fn bad_pools_values_name_the_field() {
    let bin = env!("CARGO_BIN_EXE_framecast-loadtest");
    let dir = tempfile::tempdir().unwrap();
    let smoke = std::fs::read_to_string(scenario("smoke")).unwrap();
    for (pools, want) in [
        ("policy = \"best\"", "policy"),
        ("launch_s = 0", "pools.launch_s = 0: must be 1..=3600"),
        ("fixed_per_key = 0", "pools.fixed_per_key = 0"),
        ("round_every_s = 0", "pools.round_every_s = 0"),
        ("warm = 3", "warm"),
    ] {
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, format!("{smoke}\n[pools]\n{pools}\n")).unwrap();
        let out = Command::new(bin).arg("sim").arg(&path).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{pools}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "{pools}: {err}");
    }
    let out = Command::new(bin)
        .args([
            "sim",
            scenario("smoke").to_str().unwrap(),
            "--pools",
            "some",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--pools") && err.contains("none, fixed, planner"),
        "{err}"
    );
}
