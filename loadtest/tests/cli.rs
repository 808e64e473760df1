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
    ] {
        assert!(r.get(field).is_some(), "report lacks {field}");
    }
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
