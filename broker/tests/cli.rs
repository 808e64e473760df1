//! The broker binary as an operator meets it.

// In a test, a failed unwrap is a failed test.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::path::PathBuf;
use std::process::{Command, Output};

fn broker(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_framecast-broker"));
    cmd.args(args).env_remove("FRAMECAST_CONFIG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run framecast-broker")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn example() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/config/broker.toml")
}

#[test]
fn help_and_version() {
    let out = broker(&["--help"], &[]);
    assert!(out.status.success());
    assert!(
        text(&out.stdout).contains("check-config"),
        "{}",
        text(&out.stdout)
    );
    let out = broker(&["--version"], &[]);
    assert_eq!(
        text(&out.stdout).trim(),
        format!("framecast-broker {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn the_example_config_checks_ok() {
    let path = example();
    let out = broker(&["check-config", "--config", path.to_str().unwrap()], &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).ends_with("broker.toml: ok\n"));
}

#[test]
fn a_bad_value_is_refused_with_the_field_named() {
    let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("bad-broker.toml");
    std::fs::write(
        &path,
        "[tiers.4k]\nframebuffer_mb = 8100\n\n[http]\nmax_body_bytes = 1\n",
    )
    .unwrap();
    let out = broker(&["check-config", "-c", path.to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert!(
        err.contains(
            "error: tiers.4k.framebuffer_mb = 8100: must be a multiple of 64 (from TOML file"
        ),
        "{err}"
    );
    assert!(
        err.contains("error: http.max_body_bytes = 1: must be in 1024..=16777216"),
        "{err}"
    );
    assert!(out.stdout.is_empty());
}

#[test]
fn env_and_flags_override_the_file_and_are_named_in_errors() {
    let path = example();
    let path = path.to_str().unwrap();
    let out = broker(
        &["check-config", "-c", path, "--print"],
        &[("FRAMECAST_HTTP__LISTEN", "127.0.0.1:9999")],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("listen = \"127.0.0.1:9999\""));

    let out = broker(
        &["check-config", "-c", path],
        &[("FRAMECAST_TIERS__720P__COMPUTE_SHARE", "0")],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("tiers.720p.compute_share = 0: must be in 1..=16 (from environment variable FRAMECAST_TIERS__720P__COMPUTE_SHARE)"),
        "{}",
        text(&out.stderr)
    );

    let out = broker(
        &[
            "check-config",
            "-c",
            path,
            "--set",
            "control.listen=0.0.0.0:5000",
            "--print",
        ],
        &[("FRAMECAST_CONTROL__LISTEN", "0.0.0.0:4000")],
    );
    assert!(
        text(&out.stdout).contains("listen = \"0.0.0.0:5000\""),
        "flags beat env"
    );
}

#[test]
fn a_missing_config_file_is_named() {
    let out = broker(&["check-config", "-c", "/nonexistent/broker.toml"], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        text(&out.stderr),
        "error: config file /nonexistent/broker.toml: not found\n"
    );
}
