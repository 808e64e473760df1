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
