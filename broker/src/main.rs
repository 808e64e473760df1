//! `framecast-broker`: matches player sessions to GPU slots on the fleet's nodes.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use framecast_shared::config::BrokerConfig;
use framecast_shared::config::cli::CheckConfigArgs;

/// Framecast session broker: places cloud-gaming sessions on shared GPUs.
#[derive(Debug, Parser)]
#[command(name = "framecast-broker", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Load and validate broker.toml (defaults, then the file, then FRAMECAST_* variables,
    /// then --set flags) and report every broken rule with its field.
    CheckConfig(CheckConfigArgs),
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::CheckConfig(args) => args.run::<BrokerConfig>(),
    }
}
