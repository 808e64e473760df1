//! `framecast-agent`: runs on every GPU host; keeps the vGPU pool and streams games.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
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
    CheckConfig {
        #[command(flatten)]
        config: ConfigArgs,
        /// Print the effective configuration as TOML.
        #[arg(long)]
        print: bool,
    },
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::CheckConfig { config, print } => {
            framecast_shared::config::cli::report(config.check::<AgentConfig>(print))
        }
    }
}
