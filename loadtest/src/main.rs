//! `framecast-loadtest`: proves a fleet's capacity and latency before GPUs are bought.

use framecast_loadtest::{scenario, sim};

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use framecast_shared::config::{BrokerConfig, ConfigArgs};
use framecast_shared::gpu::{CapacityLimit, GpuSpec, models};
use framecast_shared::tier::TierPreset;

/// Framecast load-test simulator and capacity planner.
#[derive(Debug, Parser)]
#[command(name = "framecast-loadtest", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// List the built-in GPU models and how many sessions of each tier one GPU holds when it
    /// serves only that tier. Tiers come from broker.toml when --config is given.
    Models {
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// Run a scenario on a virtual clock against the real placement engine, in-process:
    /// prints a summary, writes the JSON report with --json, and exits with status 1 when an
    /// SLO of the scenario fails (2 when the scenario is unusable).
    Sim {
        /// The scenario file (see loadtest/scenarios/).
        scenario: PathBuf,
        /// The placement strategy, instead of the scenario's (`genre-weighted`, `first-fit`,
        /// `round-robin`, `random`, `exclusive`).
        #[arg(long)]
        strategy: Option<String>,
        /// Another seed than the scenario's.
        #[arg(long)]
        seed: Option<u64>,
        /// Write the JSON report here.
        #[arg(long)]
        json: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Models { config } => {
            let tiers = config
                .load::<BrokerConfig>()
                .map(|c| models_table(&models::all(), &c.tier_presets()));
            framecast_shared::config::cli::report(tiers)
        }
        Command::Sim {
            scenario,
            strategy,
            seed,
            json,
        } => sim_command(&scenario, strategy.as_deref(), seed, json.as_deref()),
    }
}

/// `framecast-loadtest sim`.
// A command-line tool's output goes to the terminal.
#[allow(clippy::print_stdout, clippy::print_stderr)]
fn sim_command(
    path: &std::path::Path,
    strategy: Option<&str>,
    seed: Option<u64>,
    json: Option<&std::path::Path>,
) -> ExitCode {
    let mut scenario = match scenario::Scenario::load(path) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(seed) = seed {
        scenario.seed = seed;
    }
    if let Some(name) = strategy
        && framecast_broker::placement::strategy::by_name(name, 0).is_none()
    {
        eprintln!(
            "error: --strategy {name}: must be one of {}",
            framecast_broker::placement::strategy::NAMES.join(", ")
        );
        return ExitCode::from(2);
    }
    let report = match sim::run(&scenario, strategy) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    print!("{}", report.summary());
    if let Some(out) = json {
        let written = serde_json::to_string_pretty(&report)
            .map_err(|e| e.to_string())
            .and_then(|text| std::fs::write(out, text).map_err(|e| e.to_string()));
        if let Err(e) = written {
            eprintln!("error: writing {}: {e}", out.display());
            return ExitCode::from(2);
        }
    }
    if report.ok {
        ExitCode::SUCCESS
    } else {
        eprintln!("an SLO failed");
        ExitCode::from(1)
    }
}

/// One row per GPU model: its resources, then sessions per GPU for each tier.
fn models_table(gpus: &[GpuSpec], tiers: &[TierPreset]) -> String {
    let mut out = format!(
        "{:<26} {:>8} {:>5} {:>7} {:>4}",
        "model", "fb_mb", "nvenc", "enc_u", "cap"
    );
    for t in tiers {
        let _ = write!(out, " {:>14}", t.name);
    }
    out.push('\n');
    for gpu in gpus {
        let cap = gpu
            .encoder_session_cap
            .map_or("-".to_owned(), |c| c.to_string());
        let _ = write!(
            out,
            "{:<26} {:>8} {:>5} {:>7} {:>4}",
            gpu.model,
            gpu.framebuffer.get(),
            gpu.nvenc_engines,
            gpu.encoder_capacity.as_f64(),
            cap
        );
        for t in tiers {
            let c = gpu.single_tier_capacity(t);
            let cell = match (&c.profile, c.limit) {
                (_, CapacityLimit::NoEncoder) => "0 (no nvenc)".to_owned(),
                (_, CapacityLimit::NoProfile) => "0 (too large)".to_owned(),
                (Some(p), _) => format!("{} ({p})", c.sessions),
                (None, _) => c.sessions.to_string(),
            };
            let _ = write!(out, " {cell:>14}");
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_has_a_row_per_model_and_a_column_per_tier() {
        let table = models_table(&models::all(), &TierPreset::defaults());
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 1 + models::NAMES.len());
        assert!(lines[0].contains("720p") && lines[0].contains("4k"));
        let l4 = lines.iter().find(|l| l.starts_with("NVIDIA L4 ")).unwrap();
        assert!(l4.contains("12 (L4-2Q)"), "{l4}");
        let h100 = lines
            .iter()
            .find(|l| l.starts_with("NVIDIA H100 PCIe"))
            .unwrap();
        assert!(h100.contains("0 (no nvenc)"), "{h100}");
    }
}
