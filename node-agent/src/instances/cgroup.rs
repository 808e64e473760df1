//! CPU and memory limits for game instances through cgroup v2, where the host allows it.
//!
//! The agent places each instance in `<root>/<instance>` with `cpu.max` and `memory.max` set.
//! `root` is a cgroup the operator delegates to the agent (systemd `Delegate=yes`); on a host
//! without cgroup v2 there, instances run unlimited and the agent says so once.
//!
//! A game must be inside its cgroup before it runs its first instruction, or a fork bomb at
//! start-up escapes the limits. The agent therefore launches games through itself
//! (`framecast-agent exec-in-cgroup <dir> -- <program> <args>`): the helper writes its own pid
//! to the cgroup's `cgroup.procs` and then `exec`s the game, which keeps the pid, the process
//! group and the cgroup. Where no helper is configured (tests, embedders), the process is
//! moved in right after it starts instead.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

/// Limits for one instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// CPU, thousandths of a core.
    pub cpu_millicores: u32,
    /// Memory, MiB.
    pub memory_mb: u64,
}

/// The cgroup v2 subtree instances go into, if there is one.
#[derive(Debug)]
pub struct Cgroups {
    root: Option<PathBuf>,
    warned: AtomicBool,
    /// The agent's own binary, which moves itself into a cgroup and then runs the game.
    exec_helper: Option<PathBuf>,
}

/// The period `cpu.max` quotas are expressed against, µs.
const PERIOD_US: u64 = 100_000;

impl Cgroups {
    /// The subtree at `root` if it is a cgroup v2 directory (it has `cgroup.controllers`).
    pub fn detect(root: &Path) -> Self {
        let v2 = root.join("cgroup.controllers").is_file();
        if !v2 {
            tracing::warn!(root = %root.display(), "no cgroup v2 subtree here: game instances run without CPU and memory limits");
        } else if let Err(e) = std::fs::write(root.join("cgroup.subtree_control"), "+cpu +memory") {
            // Without the controllers enabled for children, cpu.max and memory.max do not exist.
            tracing::warn!(root = %root.display(), error = %e, "could not enable the cpu and memory controllers");
        }
        Self {
            root: v2.then(|| root.to_owned()),
            warned: AtomicBool::new(!v2),
            exec_helper: None,
        }
    }

    /// Launches games through `helper` (the agent binary's `exec-in-cgroup`), so they start
    /// inside their cgroup.
    pub fn with_exec_helper(mut self, helper: PathBuf) -> Self {
        self.exec_helper = Some(helper);
        self
    }

    /// The helper to launch a game through, when cgroups are in use.
    pub fn exec_helper(&self) -> Option<&Path> {
        self.root.as_ref().and(self.exec_helper.as_deref())
    }

    /// Creates the cgroup `name` with `limits`, for a process that moves itself in. `None`
    /// when cgroups are not available (logged once).
    pub fn prepare(&self, name: &str, limits: Limits) -> io::Result<Option<PathBuf>> {
        let Some(root) = &self.root else {
            if !self.warned.swap(true, Ordering::Relaxed) {
                tracing::warn!("cgroup v2 unavailable: instance limits not applied");
            }
            return Ok(None);
        };
        check_name(name)?;
        let dir = root.join(name);
        std::fs::create_dir_all(&dir)?;
        // The kernel refuses quotas under 1 ms.
        let quota = (u64::from(limits.cpu_millicores) * PERIOD_US / 1000).max(1000);
        std::fs::write(dir.join("cpu.max"), format!("{quota} {PERIOD_US}\n"))?;
        std::fs::write(
            dir.join("memory.max"),
            format!("{}\n", limits.memory_mb.saturating_mul(1024 * 1024)),
        )?;
        Ok(Some(dir))
    }

    /// No cgroup subtree configured: instances run without limits, which is logged now.
    pub fn disabled() -> Self {
        tracing::warn!(
            "instances.cgroup_root is not set: game instances run without CPU and memory limits"
        );
        Self {
            root: None,
            warned: AtomicBool::new(true),
            exec_helper: None,
        }
    }

    /// Whether limits are applied.
    pub fn enabled(&self) -> bool {
        self.root.is_some()
    }

    /// Puts process `pid` into a cgroup named `name` with `limits`. `Ok(false)` when cgroups
    /// are not available (logged once).
    pub fn place(&self, name: &str, pid: u32, limits: Limits) -> io::Result<bool> {
        let Some(dir) = self.prepare(name, limits)? else {
            return Ok(false);
        };
        join(&dir, pid)?;
        Ok(true)
    }

    /// Removes an instance's cgroup after it exited. Whatever the game left running in it
    /// (children that outlived their leader, even in another process group) is killed first
    /// through `cgroup.kill` (Linux 5.14+), since the kernel refuses to remove a cgroup that
    /// still holds processes.
    pub fn remove(&self, name: &str) -> io::Result<()> {
        let Some(root) = &self.root else {
            return Ok(());
        };
        check_name(name)?;
        let dir = root.join(name);
        let kill = dir.join("cgroup.kill");
        if kill.exists()
            && let Err(e) = std::fs::write(&kill, "1")
        {
            tracing::warn!(cgroup = %dir.display(), error = %e, "could not kill what the instance left running");
        }
        match std::fs::remove_dir(&dir) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

/// Moves process `pid` into the cgroup directory `dir`.
pub fn join(dir: &Path, pid: u32) -> io::Result<()> {
    std::fs::write(dir.join("cgroup.procs"), format!("{pid}\n"))
}

/// An instance's cgroup is one plain directory below the root: no separators, no dot names.
fn check_name(name: &str) -> io::Result<()> {
    if name.is_empty() || name.contains('/') || name.starts_with('.') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("bad cgroup name {name:?}"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_are_written_where_cgroup_v2_is_delegated() {
        let root = tempfile::tempdir().unwrap();
        std::fs::write(root.path().join("cgroup.controllers"), "cpu memory\n").unwrap();
        let cg = Cgroups::detect(root.path());
        assert!(cg.enabled());
        assert!(
            cg.place(
                "instance-7",
                4242,
                Limits {
                    cpu_millicores: 1500,
                    memory_mb: 4096
                }
            )
            .unwrap()
        );
        let dir = root.path().join("instance-7");
        assert_eq!(
            std::fs::read_to_string(dir.join("cpu.max")).unwrap(),
            "150000 100000\n"
        );
        assert_eq!(
            std::fs::read_to_string(dir.join("memory.max")).unwrap(),
            "4294967296\n"
        );
        assert_eq!(
            std::fs::read_to_string(dir.join("cgroup.procs")).unwrap(),
            "4242\n"
        );
        assert!(
            cg.place(
                "../escape",
                1,
                Limits {
                    cpu_millicores: 1,
                    memory_mb: 1
                }
            )
            .is_err()
        );
        assert!(cg.remove("..").is_err());
        assert!(
            cg.place(
                "tiny",
                1,
                Limits {
                    cpu_millicores: 1,
                    memory_mb: 1
                }
            )
            .unwrap()
        );
        assert_eq!(
            std::fs::read_to_string(root.path().join("tiny/cpu.max")).unwrap(),
            "1000 100000\n"
        );
        assert_eq!(
            std::fs::read_to_string(root.path().join("cgroup.subtree_control")).unwrap(),
            "+cpu +memory"
        );
    }

    #[test]
    fn without_cgroup_v2_instances_run_unlimited() {
        let root = tempfile::tempdir().unwrap();
        let cg = Cgroups::detect(root.path());
        assert!(!cg.enabled());
        assert!(
            !cg.place(
                "instance-1",
                1,
                Limits {
                    cpu_millicores: 1000,
                    memory_mb: 1
                }
            )
            .unwrap()
        );
        assert!(
            std::fs::read_dir(root.path()).unwrap().next().is_none(),
            "nothing written"
        );
    }

    #[test]
    fn removing_an_instance_cgroup_kills_what_it_left_running() {
        let root = tempfile::tempdir().unwrap();
        std::fs::write(root.path().join("cgroup.controllers"), "cpu memory\n").unwrap();
        let cg = Cgroups::detect(root.path());
        let dir = cg
            .prepare(
                "instance-1",
                Limits {
                    cpu_millicores: 500,
                    memory_mb: 512,
                },
            )
            .unwrap()
            .unwrap();
        // The kernel's interface file; a plain file in the fake tree records the write.
        std::fs::write(dir.join("cgroup.kill"), "").unwrap();
        // The fake directory still holds files, so removing it fails as it would with a
        // process left; the kill was written first either way.
        let _ = cg.remove("instance-1");
        assert_eq!(
            std::fs::read_to_string(dir.join("cgroup.kill")).unwrap(),
            "1"
        );
    }
}
