//! `framecast-broker`: matches player sessions to GPU slots on the fleet's nodes.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use framecast_shared::config::{BrokerConfig, ConfigArgs};

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
            framecast_shared::config::cli::report(config.check::<BrokerConfig>(print))
        }
    }
}
