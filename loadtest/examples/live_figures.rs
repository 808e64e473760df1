//! The `live` engine's figures: allocations per second and allocation latency of the real
//! broker with in-process agents on this machine.
//!
//! ```text
//! cargo run --release -p framecast-loadtest --example live_figures -- [SCENARIO] [--rates R,R,...] [live options]
//! ```
//!
//! Runs `live` on SCENARIO (default `loadtest/scenarios/smoke.toml`) and prints the report's
//! summary, then allocations/s and the allocation latency (from each request's due time to
//! its answer). Without `--speed`, the run is compressed to take at most 30 wall seconds.
//! `--rates` runs the scenario once per Poisson arrival rate given (requests per simulated
//! second) and ends with one table row per rate: the way to find where latency turns up.
//! `FRAMECAST_LOG=info` (an `EnvFilter` directive) shows the broker's and agents' log.

// An example prints its figures; a failed run is a failed example.
#![allow(clippy::print_stdout, clippy::print_stderr)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser, parser::ValueSource};
use indicatif::ProgressBar;

use framecast_loadtest::live::{self, LiveOptions, LiveRun};
use framecast_loadtest::scenario::{Arrivals, Scenario};

/// The longest a run takes without `--speed`, wall seconds.
const DEFAULT_WALL_S: u64 = 30;

/// Live-engine figures.
#[derive(Debug, Parser)]
struct Args {
    /// The scenario.
    #[arg(default_value = "loadtest/scenarios/smoke.toml")]
    scenario: PathBuf,
    /// Run once per Poisson arrival rate (requests per simulated second) instead of the
    /// scenario's arrivals.
    #[arg(long, value_delimiter = ',')]
    rates: Vec<f64>,
    #[command(flatten)]
    live: LiveOptions,
}

fn main() -> ExitCode {
    // The broker's and agents' log, when asked for (`FRAMECAST_LOG=info`).
    if std::env::var_os("FRAMECAST_LOG").is_some() {
        framecast_shared::ops::init_logging();
    }
    let matches = Args::command().get_matches();
    let mut args = match Args::from_arg_matches(&matches) {
        Ok(a) => a,
        Err(e) => e.exit(),
    };
    let scenario = match Scenario::load(&args.scenario) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    if matches.value_source("speed") != Some(ValueSource::CommandLine) {
        args.live.speed = (scenario.duration_s as f64 / DEFAULT_WALL_S as f64).max(1.0);
    }
    println!(
        "live on {} CPUs, speed {} (simulated s per wall s), {} connections",
        std::thread::available_parallelism().map_or(0, std::num::NonZero::get),
        args.live.speed,
        args.live.connections
    );
    let runs: Vec<(Option<f64>, Scenario)> = if args.rates.is_empty() {
        vec![(None, scenario)]
    } else {
        args.rates
            .iter()
            .map(|&rate| {
                let mut s = scenario.clone();
                s.demand.arrivals = Arrivals::Poisson { rate_per_s: rate };
                (Some(rate), s)
            })
            .collect()
    };
    let mut rows = Vec::new();
    for (rate, s) in &runs {
        let run = match live::run_detailed(s, &args.live, &ProgressBar::hidden()) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        };
        println!();
        if let Some(rate) = rate {
            println!("== Poisson {rate} requests per simulated second");
        }
        print!("{}", run.report.summary());
        let row = figures(&run, args.live.speed);
        println!("{row}");
        rows.push((rate.unwrap_or(0.0), row));
    }
    if rows.len() > 1 {
        println!();
        for (rate, row) in rows {
            println!("rate {rate:>7} /s: {row}");
        }
    }
    ExitCode::SUCCESS
}

/// One line: answers per wall second, the latency percentiles, and what went wrong.
fn figures(run: &LiveRun, speed: f64) -> String {
    let r = &run.report;
    let lat = r.allocation_latency_ms.clone().unwrap_or_default();
    let rejected: u64 = r.rejected.values().sum();
    format!(
        "allocations/s {:.0} (offered {:.0}/s)  latency ms p50 {:.2} p90 {:.2} p99 {:.2} p99.9 {:.2} max {:.2}  \
         requests {} placed {} rejected {} {:?}  no answer {:?}  retried {}  release failures {}",
        r.allocations_per_s.unwrap_or(0.0),
        r.requests as f64 / (r.duration_s as f64 / speed),
        lat.p50,
        lat.p90,
        lat.p99,
        lat.p999,
        lat.max,
        r.requests,
        r.placed,
        rejected,
        r.rejected,
        run.failed,
        run.retried,
        run.release_failures
    )
}
