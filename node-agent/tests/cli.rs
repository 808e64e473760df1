//! The agent binary as an operator meets it.

// In a test, a failed unwrap is a failed test.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::path::PathBuf;
use std::process::{Command, Output};

fn agent(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_framecast-agent"))
        .args(args)
        .env_remove("FRAMECAST_CONFIG")
        .output()
        .expect("run framecast-agent")
}

#[test]
fn help_version_and_config_check() {
    let out = agent(&["--help"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("check-config"));
    let out = agent(&["--version"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("framecast-agent {}", env!("CARGO_PKG_VERSION"))
    );

    let example = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/config/agent.toml");
    let out = agent(&["check-config", "-c", example.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let out = agent(&["check-config", "--set", "inventory.source=simulated"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("error: inventory.simulate = \"\": must name a simulated inventory file")
    );
}

#[test]
fn inventory_lists_simulated_gpus_or_says_what_to_install() {
    let gpus = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/config/gpus.toml");
    let out = agent(&["inventory", "--simulate", gpus.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listing = String::from_utf8_lossy(&out.stdout);
    // A host with the NVIDIA driver reports its real GPUs instead.
    if listing.contains("source = \"simulated\"") {
        assert_eq!(listing.matches("[[gpus]]").count(), 3, "{listing}");
        assert!(listing.contains("id = \"sim-2\"") && listing.contains("NVIDIA GeForce RTX 4090"));
    }
    let out = agent(&["inventory"]);
    if !out.status.success() {
        assert_eq!(out.status.code(), Some(2));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("Install the NVIDIA driver") && err.contains("--simulate gpus.toml"),
            "{err}"
        );
    }
}
