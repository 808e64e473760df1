//! `framecast-loadtest`: proves a fleet's capacity and latency before GPUs are bought.

use framecast_loadtest::report::Report;
use framecast_loadtest::{compare, html, live, plan, scenario, sim, webrtc};

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use framecast_broker::placement::strategy;
use framecast_shared::config::{BrokerConfig, ConfigArgs};
use framecast_shared::gpu::{CapacityLimit, GpuSpec, models};
use framecast_shared::tier::TierPreset;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

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
    /// prints a summary, writes the reports asked for, and exits with status 1 when an SLO of
    /// the scenario fails (2 when the scenario or a flag is unusable). With several strategies
    /// (`--strategy all`, or a list) the same demand runs under each, side by side, with the
    /// one-GPU-per-player headline when `exclusive` and `genre-weighted` are among them.
    Sim {
        /// The scenario file (see loadtest/scenarios/).
        scenario: PathBuf,
        /// The placement strategy instead of the scenario's: `genre-weighted`, `first-fit`,
        /// `round-robin`, `random`, `exclusive`, a comma-separated list, or `all`.
        #[arg(long)]
        strategy: Option<String>,
        /// Another seed than the scenario's.
        #[arg(long)]
        seed: Option<u64>,
        /// Who keeps warm game instances, instead of the scenario's `[pools] policy`: `none`,
        /// `fixed` (the fixed-buffer baseline) or `planner` (the pool planner).
        #[arg(long, value_name = "POLICY")]
        pools: Option<scenario::PoolPolicy>,
        #[command(flatten)]
        out: Outputs,
    },
    /// Find the smallest fleet (the scenario's, scaled as a whole) that meets the scenario's
    /// SLO for its demand, by running `sim` on fleets of different sizes. Exits 1 when no
    /// fleet up to --max-nodes does.
    Plan {
        /// The scenario file.
        scenario: PathBuf,
        /// SLO thresholds instead of (or besides) the scenario's, e.g.
        /// `--slo max_queue_wait_p99_s=5` (repeatable).
        #[arg(long, value_name = "KEY=VALUE")]
        slo: Vec<String>,
        /// The largest fleet to try, nodes.
        #[arg(long, default_value_t = 100_000)]
        max_nodes: u64,
        /// The placement strategy instead of the scenario's.
        #[arg(long)]
        strategy: Option<String>,
        #[command(flatten)]
        out: Outputs,
    },
    /// Run a scenario against a real broker and agents over HTTP and QUIC on loopback (started
    /// here on simulated GPUs, or an existing broker with --broker), open-loop, with allocation
    /// latency measured from each request's intended send time. Exits 1 when an SLO fails.
    Live {
        /// The scenario file.
        scenario: PathBuf,
        #[command(flatten)]
        options: live::LiveOptions,
        #[command(flatten)]
        out: Outputs,
    },
    /// Real WebRTC players against dev mode: allocate, connect over WHEP, receive video; steps
    /// up the number of streams on one node and reports time to first frame, fps and freezes
    /// per stream, and how many streams the node holds.
    Webrtc {
        #[command(flatten)]
        options: webrtc::WebrtcOptions,
        #[command(flatten)]
        out: Outputs,
    },
}

/// Where the reports go.
#[derive(Debug, Args)]
struct Outputs {
    /// Write the JSON report here (schema in docs/OPERATIONS.md, "Load tests").
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write a self-contained HTML report with charts here (opens offline).
    #[arg(long)]
    html: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The engines' warnings, and the in-process broker's and agents' (FRAMECAST_LOG=info for
    // all of their log).
    framecast_shared::ops::init_logging_or("warn");
    match cli.command {
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
            pools,
            out,
        } => sim_command(&scenario, strategy.as_deref(), seed, pools, &out),
        Command::Plan {
            scenario,
            slo,
            max_nodes,
            strategy,
            out,
        } => plan_command(&scenario, &slo, max_nodes, strategy.as_deref(), &out),
        Command::Live {
            scenario,
            options,
            out,
        } => {
            let scenario = match load(&scenario, None) {
                Ok(s) => s,
                Err(code) => return code,
            };
            let bar = bar(&scenario.name, scenario.duration_s);
            let report = live::run(&scenario, &options, &bar);
            bar.finish_and_clear();
            finish_one(report, &out)
        }
        Command::Webrtc { options, out } => {
            let bar = bar("webrtc", 0);
            let report = webrtc::run(&options, &bar);
            bar.finish_and_clear();
            finish_one(report, &out)
        }
    }
}

/// A progress bar of simulated seconds on stderr (drawn only on a terminal).
fn bar(name: &str, len: u64) -> ProgressBar {
    let bar = ProgressBar::new(len);
    if let Ok(style) = ProgressStyle::with_template(
        "{prefix:>15} [{bar:40}] {pos}/{len} s simulated, {elapsed} ({eta} left) {msg}",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_prefix(name.to_owned());
    bar
}

/// Reads the scenario (exit status 2 when it is unusable).
// A command-line tool's errors go to the terminal.
#[allow(clippy::print_stderr)]
fn load(path: &Path, seed: Option<u64>) -> Result<scenario::Scenario, ExitCode> {
    match scenario::Scenario::load(path) {
        Ok(mut s) => {
            if let Some(seed) = seed {
                s.seed = seed;
            }
            Ok(s)
        }
        Err(e) => {
            eprintln!("error: {e}");
            Err(ExitCode::from(2))
        }
    }
}

/// `--strategy`: one name, a comma-separated list or `all`.
fn strategies(arg: Option<&str>, scenario: &scenario::Scenario) -> Result<Vec<String>, String> {
    let Some(arg) = arg else {
        return Ok(vec![scenario.strategy.clone()]);
    };
    if arg == "all" {
        return Ok(strategy::NAMES.iter().map(|n| (*n).to_owned()).collect());
    }
    arg.split(',')
        .map(str::trim)
        .map(|name| {
            if strategy::by_name(name, 0).is_some() {
                Ok(name.to_owned())
            } else {
                Err(format!(
                    "--strategy {name}: must be one of {}, a comma-separated list, or all",
                    strategy::NAMES.join(", ")
                ))
            }
        })
        .collect()
}

/// `framecast-loadtest sim`.
// A command-line tool's output goes to the terminal.
#[allow(clippy::print_stdout, clippy::print_stderr)]
fn sim_command(
    path: &Path,
    strategy: Option<&str>,
    seed: Option<u64>,
    pools: Option<scenario::PoolPolicy>,
    out: &Outputs,
) -> ExitCode {
    let mut scenario = match load(path, seed) {
        Ok(s) => s,
        Err(code) => return code,
    };
    if let Some(policy) = pools {
        scenario.pools.policy = policy;
    }
    let names = match strategies(strategy, &scenario) {
        Ok(n) => n,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    if let [one] = names.as_slice() {
        let bar = bar(&scenario.name, scenario.duration_s);
        let report = sim::run_with_progress(&scenario, Some(one), &bar);
        bar.finish_and_clear();
        return finish_one(report, out);
    }
    let bars = MultiProgress::new();
    let threads = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    let comparison = compare::run(&scenario, &names, threads, |name| {
        bars.add(bar(name, scenario.duration_s))
    });
    let comparison = match comparison {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    for r in &comparison.runs {
        println!("{}", r.summary());
    }
    print!("{}", comparison.table());
    let title = format!("{}: {} strategies", scenario.name, names.len());
    if let Err(code) = write_outputs(out, &comparison, &title, &comparison.runs) {
        return code;
    }
    // The scenario's own strategy decides (the others are for comparison).
    match comparison.main_run(&scenario.strategy) {
        Some(r) if r.ok => ExitCode::SUCCESS,
        Some(r) => {
            eprintln!("an SLO failed under {}", r.strategy);
            ExitCode::from(1)
        }
        None => ExitCode::from(2),
    }
}

/// `framecast-loadtest plan`.
#[allow(clippy::print_stdout, clippy::print_stderr)]
fn plan_command(
    path: &Path,
    slo: &[String],
    max_nodes: u64,
    strategy: Option<&str>,
    out: &Outputs,
) -> ExitCode {
    let mut scenario = match load(path, None) {
        Ok(s) => s,
        Err(code) => return code,
    };
    if let Err(e) = strategies(strategy, &scenario).and_then(|n| match n.as_slice() {
        [_] => Ok(()),
        _ => Err("--strategy: plan takes one strategy".to_owned()),
    }) {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    if let Err(e) = apply_slo(&mut scenario.slo, slo) {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    let bar = ProgressBar::new_spinner();
    if let Ok(style) = ProgressStyle::with_template("{spinner} planning: {pos} fleets tried, {msg}")
    {
        bar.set_style(style);
    }
    bar.enable_steady_tick(std::time::Duration::from_millis(200));
    let result = plan::plan(&scenario, strategy, max_nodes, &bar);
    bar.finish_and_clear();
    let plan = match result {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    print!("{}", plan.summary());
    let reports: Vec<Report> = plan.probes.iter().map(|p| p.report.clone()).collect();
    let title = format!("{}: capacity plan", scenario.name);
    if let Err(code) = write_outputs(out, &plan, &title, &reports) {
        return code;
    }
    if plan.smallest_nodes.is_some() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// `--slo KEY=VALUE` pairs over the scenario's `[slo]`.
fn apply_slo(slo: &mut scenario::Slo, pairs: &[String]) -> Result<(), String> {
    for pair in pairs {
        let (key, value) = pair
            .split_once('=')
            .ok_or_else(|| format!("--slo {pair}: must be KEY=VALUE"))?;
        let value: f64 = value
            .trim()
            .parse()
            .ok()
            .filter(|v: &f64| v.is_finite() && *v >= 0.0)
            .ok_or_else(|| format!("--slo {pair}: {value} is not a number ≥ 0"))?;
        let field = match key.trim() {
            "max_rejected_ratio" => &mut slo.max_rejected_ratio,
            "max_queue_wait_p99_s" => &mut slo.max_queue_wait_p99_s,
            "min_peak_framebuffer_utilization" => &mut slo.min_peak_framebuffer_utilization,
            other => {
                return Err(format!(
                    "--slo {other}: must be max_rejected_ratio, max_queue_wait_p99_s or min_peak_framebuffer_utilization"
                ));
            }
        };
        *field = Some(value);
    }
    Ok(())
}

/// Prints one run's summary, writes its reports, and turns its SLO into the exit status.
#[allow(clippy::print_stdout, clippy::print_stderr)]
fn finish_one<E: std::fmt::Display>(report: Result<Report, E>, out: &Outputs) -> ExitCode {
    let report = match report {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    print!("{}", report.summary());
    let title = format!("{} ({} engine)", report.scenario, report.engine);
    if let Err(code) = write_outputs(out, &report, &title, std::slice::from_ref(&report)) {
        return code;
    }
    if report.ok {
        ExitCode::SUCCESS
    } else {
        eprintln!("an SLO failed");
        ExitCode::from(1)
    }
}

/// Writes `json` and the HTML report of `reports` where `out` asks.
#[allow(clippy::print_stderr)]
fn write_outputs(
    out: &Outputs,
    json: &impl serde::Serialize,
    title: &str,
    reports: &[Report],
) -> Result<(), ExitCode> {
    let mut files = Vec::new();
    if let Some(path) = &out.json {
        match serde_json::to_string_pretty(json) {
            Ok(text) => files.push((path, text)),
            Err(e) => {
                eprintln!("error: writing {}: {e}", path.display());
                return Err(ExitCode::from(2));
            }
        }
    }
    if let Some(path) = &out.html {
        files.push((path, html::render(title, reports)));
    }
    for (path, text) in files {
        if let Err(e) = std::fs::write(path, text) {
            eprintln!("error: writing {}: {e}", path.display());
            return Err(ExitCode::from(2));
        }
    }
    Ok(())
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
