//! `framecast-agent`: runs on every GPU host; keeps the vGPU pool and streams games.

use std::path::PathBuf;
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
