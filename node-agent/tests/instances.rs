//! Game instances as real processes: their environment, exits, stops, and the synthetic game.

// In a test, a failed unwrap is a failed test.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    clippy::print_stderr
)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use tokio::time::timeout;
use uuid::Uuid;

use framecast_agent::instances::cgroup::Cgroups;
use framecast_agent::instances::launch::{GameUser, LaunchSpec, launch};
use framecast_shared::config::agent::AgentGameConfig;
use framecast_shared::ids::{GameId, GpuId};
use framecast_shared::tier::TierPreset;

const LIMIT: Duration = Duration::from_secs(20);

fn shell_game(script: &str, env: &[(&str, &str)]) -> AgentGameConfig {
    AgentGameConfig {
        id: GameId::new("shell").unwrap(),
        command: Some(PathBuf::from("/bin/sh")),
        args: vec!["-c".into(), script.into()],
        env: env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<BTreeMap<_, _>>(),
        tiers: Vec::new(),
    }
}

fn tier_720p() -> TierPreset {
    TierPreset::defaults().remove(0)
}

fn no_cgroups() -> Cgroups {
    Cgroups::detect(&std::env::temp_dir().join("framecast-no-cgroup-here"))
}

#[tokio::test]
async fn an_instance_finds_its_gpu_vgpu_and_tier_in_its_environment() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("env.txt");
    let game = shell_game(
        "env > \"$OUT_FILE\"",
        &[("OUT_FILE", out.to_str().unwrap())],
    );
    let vgpu = Uuid::new_v4();
    let gpu = GpuId::new("GPU-8f0c2a4e-1d2b-4c3d-9e8f-0a1b2c3d4e5f").unwrap();
    let spec = LaunchSpec::new("instance-1".into(), &game, &tier_720p(), &gpu, Some(vgpu));
    let mut running = launch(&spec, &no_cgroups(), None).unwrap();
    let exit = timeout(LIMIT, running.wait()).await.unwrap();
    assert_eq!(exit.code, Some(0));
    let env = std::fs::read_to_string(&out).unwrap();
    // The agent's own environment stays out, but for a short allow-list.
    if std::env::var_os("CARGO_MANIFEST_DIR").is_some() {
        assert!(!env.contains("CARGO_MANIFEST_DIR="), "{env}");
    }
    assert!(env.lines().any(|l| l.starts_with("PATH=")), "{env}");
    for line in [
        format!("FRAMECAST_GPU={gpu}"),
        format!("FRAMECAST_VGPU={vgpu}"),
        format!("CUDA_VISIBLE_DEVICES={gpu}"),
        "FRAMECAST_TIER=720p".to_owned(),
        "FRAMECAST_WIDTH=1280".to_owned(),
        "FRAMECAST_FRAMEBUFFER_MB=2048".to_owned(),
    ] {
        assert!(
            env.lines().any(|l| l == line),
            "{line} missing from:\n{env}"
        );
    }
}

#[tokio::test]
async fn a_crash_reports_its_exit_code() {
    let spec = LaunchSpec::new(
        "instance-2".into(),
        &shell_game("exit 3", &[]),
        &tier_720p(),
        &GpuId::new("sim-0").unwrap(),
        None,
    );
    let mut running = launch(&spec, &no_cgroups(), None).unwrap();
    assert_eq!(timeout(LIMIT, running.wait()).await.unwrap().code, Some(3));
}

#[tokio::test]
async fn a_stopped_instance_is_killed() {
    let spec = LaunchSpec::new(
        "instance-3".into(),
        &shell_game("sleep 600", &[]),
        &tier_720p(),
        &GpuId::new("sim-0").unwrap(),
        None,
    );
    let mut running = launch(&spec, &no_cgroups(), None).unwrap();
    assert!(running.pid().is_some());
    running.stop().await;
    assert_eq!(
        timeout(LIMIT, running.wait()).await.unwrap().code,
        None,
        "ended by a signal"
    );
}

#[tokio::test]
async fn the_synthetic_game_runs_until_stopped() {
    let mut game = shell_game("", &[]);
    game.command = None;
    let spec = LaunchSpec::new(
        "instance-4".into(),
        &game,
        &tier_720p(),
        &GpuId::new("sim-0").unwrap(),
        None,
    );
    let mut running = launch(&spec, &no_cgroups(), None).unwrap();
    assert!(running.pid().is_none());
    assert!(
        timeout(Duration::from_millis(50), running.wait())
            .await
            .is_err(),
        "still running"
    );
    running.stop().await;
    assert_eq!(timeout(LIMIT, running.wait()).await.unwrap().code, Some(0));
}

#[tokio::test]
async fn a_missing_program_is_a_launch_error() {
    let mut game = shell_game("", &[]);
    game.command = Some(PathBuf::from("/nonexistent/game"));
    let spec = LaunchSpec::new(
        "instance-5".into(),
        &game,
        &tier_720p(),
        &GpuId::new("sim-0").unwrap(),
        None,
    );
    let err = launch(&spec, &no_cgroups(), None).unwrap_err();
    assert!(
        err.to_string().starts_with("launching instance-5:"),
        "{err}"
    );
}

/// Whether process `pid` is gone (or a zombie waiting to be reaped).
fn dead(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z')),
    }
}

#[tokio::test]
async fn stopping_an_instance_stops_what_it_started() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("child.pid");
    let script = "sleep 600 & echo $! > \"$OUT_FILE\"; wait";
    let spec = LaunchSpec::new(
        "instance-6".into(),
        &shell_game(script, &[("OUT_FILE", out.to_str().unwrap())]),
        &tier_720p(),
        &GpuId::new("sim-0").unwrap(),
        None,
    );
    let mut running = launch(&spec, &no_cgroups(), None).unwrap();
    let child: u32 = timeout(LIMIT, async {
        loop {
            if let Ok(text) = std::fs::read_to_string(&out)
                && let Ok(pid) = text.trim().parse()
            {
                return pid;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap();
    assert!(!dead(child));
    running.stop().await;
    timeout(LIMIT, running.wait()).await.unwrap();
    timeout(LIMIT, async {
        while !dead(child) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the game's child outlived the stop");
}

#[tokio::test]
async fn a_game_is_in_its_cgroup_before_it_runs() {
    // A delegated cgroup v2 subtree, faked: writing cgroup.procs here is a plain file write,
    // so what the helper wrote is what the test reads back.
    let root = tempfile::tempdir().unwrap();
    std::fs::write(root.path().join("cgroup.controllers"), "cpu memory\n").unwrap();
    let cgroups = Cgroups::detect(root.path())
        .with_exec_helper(PathBuf::from(env!("CARGO_BIN_EXE_framecast-agent")));
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("seen.txt");
    let procs = root.path().join("instance-5/cgroup.procs");
    // The game's first act: read which process its cgroup holds, then say who it is.
    let game = shell_game(
        "cat \"$PROCS\" > \"$OUT_FILE\" 2>&1; echo $$ >> \"$OUT_FILE\"",
        &[
            ("OUT_FILE", out.to_str().unwrap()),
            ("PROCS", procs.to_str().unwrap()),
        ],
    );
    let gpu = GpuId::new("sim-0").unwrap();
    let spec = LaunchSpec::new("instance-5".into(), &game, &tier_720p(), &gpu, None);
    let mut running = launch(&spec, &cgroups, None).unwrap();
    let launched_pid = running.pid().unwrap();
    let exit = timeout(LIMIT, running.wait()).await.unwrap();
    assert_eq!(exit.code, Some(0));
    let seen = std::fs::read_to_string(&out).unwrap();
    let lines: Vec<&str> = seen.lines().collect();
    assert_eq!(
        lines,
        [launched_pid.to_string(), launched_pid.to_string()],
        "the game found itself in its cgroup before it ran anything: {seen}"
    );
    let quota = u64::from(tier_720p().cpu_millicores) * 100;
    assert_eq!(
        std::fs::read_to_string(root.path().join("instance-5/cpu.max")).unwrap(),
        format!("{quota} 100000\n"),
    );
}

/// Whether this test process may switch users (root); outside CI a non-root run skips the
/// game-user tests, loudly. Under CI (as root) they always run.
fn may_switch_users(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{test} needs root under CI, where the gate runs as root"
    );
    eprintln!("SKIPPED {test}: needs root to start a game as another user");
    false
}

/// `id -u`, `id -g` and `id -G` of a game launched as `nobody` (65534:65534), directly or
/// through the cgroup helper, written to a file anyone may write.
async fn ids_of_a_game_run_as_nobody(cgroups: &Cgroups) -> String {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let out = dir.path().join("ids.txt");
    let game = shell_game(
        "{ id -u; id -g; id -G; } > \"$OUT_FILE\"",
        &[("OUT_FILE", out.to_str().unwrap())],
    );
    let gpu = GpuId::new("sim-0").unwrap();
    let spec = LaunchSpec::new("instance-9".into(), &game, &tier_720p(), &gpu, None);
    let user = GameUser::resolve("65534:65534").unwrap();
    let mut running = launch(&spec, cgroups, Some(user)).unwrap();
    let exit = timeout(LIMIT, running.wait()).await.unwrap();
    assert_eq!(exit.code, Some(0));
    std::fs::read_to_string(&out).unwrap()
}

#[tokio::test]
async fn a_game_runs_as_the_configured_user_without_the_agents_groups() {
    if !may_switch_users("a_game_runs_as_the_configured_user_without_the_agents_groups") {
        return;
    }
    let ids = ids_of_a_game_run_as_nobody(&no_cgroups()).await;
    assert_eq!(ids, "65534\n65534\n65534\n", "uid, gid, groups");
}

#[tokio::test]
async fn a_game_joins_its_cgroup_as_the_agent_and_then_runs_as_its_user() {
    if !may_switch_users("a_game_joins_its_cgroup_as_the_agent_and_then_runs_as_its_user") {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    std::fs::write(root.path().join("cgroup.controllers"), "cpu memory\n").unwrap();
    let cgroups = Cgroups::detect(root.path())
        .with_exec_helper(PathBuf::from(env!("CARGO_BIN_EXE_framecast-agent")));
    let ids = ids_of_a_game_run_as_nobody(&cgroups).await;
    assert_eq!(ids, "65534\n65534\n65534\n", "uid, gid, groups");
    // The helper joined the (root-owned) cgroup before it dropped to the user.
    let procs = std::fs::read_to_string(root.path().join("instance-9/cgroup.procs")).unwrap();
    assert!(!procs.trim().is_empty(), "nothing joined the cgroup");
}

#[test]
fn game_users_resolve_by_name_and_number_and_unknown_ones_are_errors() {
    let root = GameUser::resolve("root").unwrap();
    assert_eq!((root.uid, root.gid), (0, 0));
    assert_eq!(
        GameUser::resolve("root:65534").unwrap(),
        GameUser { uid: 0, gid: 65534 }
    );
    assert_eq!(
        GameUser::resolve("1234:5678").unwrap(),
        GameUser {
            uid: 1234,
            gid: 5678
        }
    );
    for (spec, says) in [
        ("no-such-user-here", "no user no-such-user-here"),
        ("1234", "uid:gid"),
        ("root:no-such-group-here", "no group no-such-group-here"),
    ] {
        let e = GameUser::resolve(spec).unwrap_err().to_string();
        assert!(
            e.starts_with("instances.user = ") && e.contains(says),
            "{spec}: {e}"
        );
    }
}
