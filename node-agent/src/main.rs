//! `framecast-agent`: runs on every GPU host; keeps the vGPU pool and streams games.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use framecast_shared::config::AgentConfig;
use framecast_shared::config::cli::CheckConfigArgs;

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
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::CheckConfig(args) => args.run::<AgentConfig>(),
    }
}
