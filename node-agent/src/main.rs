//! `framecast-agent`: runs on every GPU host; keeps the vGPU pool and streams games.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use framecast_agent::inventory;
use framecast_shared::config::cli::{CheckConfigArgs, report};
use framecast_shared::config::{AgentConfig, ConfigArgs};

/// Framecast node agent: GPU inventory, vGPU pool, encoder slots, game instances, streaming.
#[derive(Debug, Parser)]
#[command(name = "framecast-agent", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Load and validate agent.toml (defaults, then the file, then FRAMECAST_* variables,
    /// then --set flags) and report every broken rule with its field.
    CheckConfig(CheckConfigArgs),
    /// Run the agent: read the GPUs, keep the vGPU pool, and serve the broker over the control
    /// link until interrupted.
    Run {
        #[command(flatten)]
        config: ConfigArgs,
        /// A simulated inventory (gpus.toml) to use where NVML is unavailable.
        #[arg(long, value_name = "FILE")]
        simulate: Option<PathBuf>,
    },
    /// Internal: move this process into the cgroup DIR, then run PROGRAM in its place (how the
    /// agent starts a game inside its limits).
    #[command(hide = true)]
    ExecInCgroup {
        /// Run the program as this user id (after joining the cgroup).
        #[arg(long, requires = "gid")]
        uid: Option<u32>,
        /// ... and this group id (supplementary groups are cleared).
        #[arg(long, requires = "uid")]
        gid: Option<u32>,
        /// The instance's cgroup directory.
        dir: PathBuf,
        /// The game and its arguments.
        #[arg(last = true, required = true)]
        program: Vec<std::ffi::OsString>,
    },
    /// Print the GPUs this host has, as the agent sees them: NVML when the driver is
    /// present, else the simulated inventory.
    Inventory {
        #[command(flatten)]
        config: ConfigArgs,
        /// A simulated inventory (gpus.toml) to use where NVML is unavailable.
        #[arg(long, value_name = "FILE")]
        simulate: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::CheckConfig(args) => args.run::<AgentConfig>(),
        Command::Run { config, simulate } => run(&config, simulate.as_deref()),
        Command::ExecInCgroup {
            uid,
            gid,
            dir,
            program,
        } => exec_in_cgroup(&dir, uid.zip(gid), &program),
        Command::Inventory { config, simulate } => {
            let listing = config
                .load::<AgentConfig>()
                .map_err(|e| e.to_string())
                .and_then(|cfg| {
                    let inv = inventory::open(&cfg.inventory, simulate.as_deref())
                        .map_err(|e| e.to_string())?;
                    let gpus = inv.gpus().map_err(|e| e.to_string())?;
                    #[derive(serde::Serialize)]
                    struct Listing {
                        source: &'static str,
                        gpus: Vec<inventory::DiscoveredGpu>,
                    }
                    toml::to_string_pretty(&Listing {
                        source: inv.source(),
                        gpus,
                    })
                    .map_err(|e| e.to_string())
                });
            report(listing.map_err(|message| {
                framecast_shared::config::ConfigError::Parse(vec![
                    framecast_shared::config::ParseError {
                        field: String::new(),
                        message,
                        source: None,
                    },
                ])
            }))
        }
    }
}

#[allow(clippy::print_stderr)] // the process's last words
fn exec_in_cgroup(
    dir: &Path,
    user: Option<(u32, u32)>,
    program: &[std::ffi::OsString],
) -> ExitCode {
    use std::os::unix::process::CommandExt;
    let Some((program, args)) = program.split_first() else {
        eprintln!("error: exec-in-cgroup needs a program");
        return ExitCode::from(127);
    };
    if let Err(e) = framecast_agent::instances::cgroup::join(dir, std::process::id()) {
        eprintln!("error: cannot join cgroup {}: {e}", dir.display());
        return ExitCode::from(127);
    }
    let mut command = std::process::Command::new(program);
    command.args(args);
    if let Some((uid, gid)) = user {
        // Run as root, the standard library clears the supplementary groups too.
        command.uid(uid).gid(gid);
    }
    // Only returns on failure; the environment and process group carry over.
    let e = command.exec();
    eprintln!("error: cannot run {}: {e}", Path::new(program).display());
    ExitCode::from(127)
}

#[allow(clippy::print_stderr)] // the process's last words
fn run(config: &ConfigArgs, simulate: Option<&Path>) -> ExitCode {
    framecast_shared::ops::init_logging();
    let cfg = match config.load::<AgentConfig>() {
        Ok(cfg) => cfg,
        Err(e) => return report(Err(e)),
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(framecast_agent::run::run(cfg, simulate)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
