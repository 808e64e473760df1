//! The self-contained HTML report: one HTML5 document with inline CSS and inline SVG charts
//! (no scripts, fonts, images or links to anything outside it), so that it opens offline from
//! a file and can be attached to a ticket.
//!
//! One [`Report`] renders a single run; several render the same trace under several
//! strategies, or a capacity plan's runs, side by side, each run in its own colour throughout.
//! The document, top to bottom: a header (scenario, engine, strategies, seeds, fleet, simulated
//! length); a summary table, one row per run; rejections and endings per reason; the SLO
//! checks; charts of utilization, sessions and queue depth over time, of the queue wait's (and
//! the allocation latency's) distribution and, for two runs or more, bars comparing the runs.
//!
//! Every string that comes from a report is escaped ([`escape`]); long timelines are
//! downsampled to at most 600 points a line.

mod chart;

use std::fmt::{self, Write as _};

use crate::report::{CdfPoint, Report, Sample};
use chart::{Axis, BarChart, LineChart, Shape, Unit};

/// The report of `reports` as one self-contained HTML document titled `title`.
pub fn render(title: &str, reports: &[Report]) -> String {
    let mut out = String::with_capacity(32 * 1024 + reports.len() * 48 * 1024);
    // Writing into a `String` cannot fail: its `fmt::Write` always returns `Ok`.
    let _ = document(&mut out, title, reports);
    out
}

/// `s` with the characters that HTML gives a meaning (`&`, `<`, `>`, `"`, `'`) replaced by
/// their character references: safe in text and in quoted attribute values.
pub fn escape(s: &str) -> String {
    Esc(s).to_string()
}

/// Displays a string escaped for HTML, without allocating.
struct Esc<'a>(&'a str);

impl fmt::Display for Esc<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut rest = self.0;
        while let Some(i) = rest.find(['&', '<', '>', '"', '\'']) {
            let (plain, special) = rest.split_at(i);
            f.write_str(plain)?;
            let mut chars = special.chars();
            f.write_str(match chars.next() {
                Some('&') => "&amp;",
                Some('<') => "&lt;",
                Some('>') => "&gt;",
                Some('"') => "&quot;",
                _ => "&#39;",
            })?;
            rest = chars.as_str();
        }
        f.write_str(rest)
    }
}

/// One report with what the document calls and colours it.
struct Run<'a> {
    report: &'a Report,
    /// What tells it apart from the other runs (its strategy, fleet, seed…).
    label: String,
    /// Its palette index, the same in every table and chart.
    colour: usize,
}

fn document(out: &mut String, title: &str, reports: &[Report]) -> fmt::Result {
    write!(
        out,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>{}</title>\n<style>{CSS}</style>\n</head>\n<body>\n<main>\n",
        Esc(title)
    )?;
    let runs: Vec<Run<'_>> = labels(reports)
        .into_iter()
        .zip(reports)
        .enumerate()
        .map(|(colour, (label, report))| Run {
            report,
            label,
            colour,
        })
        .collect();
    header(out, title, &runs)?;
    if runs.is_empty() {
        out.push_str("<p class=\"muted\">No runs to report.</p>\n");
    } else {
        summary(out, &runs)?;
        outcomes(out, &runs)?;
        slos(out, &runs)?;
        streams(out, &runs)?;
        charts(out, &runs)?;
    }
    write!(
        out,
        "<footer>framecast-loadtest {}</footer>\n</main>\n</body>\n</html>\n",
        env!("CARGO_PKG_VERSION")
    )
}

/// A name for each report that tells it apart: the fields that differ between them (strategy,
/// fleet, seed…), or its strategy when there is one report.
fn labels(reports: &[Report]) -> Vec<String> {
    if let [r] = reports {
        return vec![or_dash(&r.strategy).to_owned()];
    }
    type Field = fn(&Report) -> String;
    let fields: [Field; 6] = [
        |r| r.scenario.clone(),
        |r| r.engine.clone(),
        |r| r.strategy.clone(),
        |r| format!("{} GPUs", r.gpus),
        |r| format!("seed {}", r.seed),
        |r| duration(r.duration_s),
    ];
    let varying: Vec<Field> = fields
        .into_iter()
        .filter(|f| distinct(reports, f).len() > 1)
        .collect();
    let mut labels: Vec<String> = reports
        .iter()
        .enumerate()
        .map(|(i, r)| match varying.as_slice() {
            [] => format!("run {}", i + 1),
            fields => fields.iter().map(|f| f(r)).collect::<Vec<_>>().join(" · "),
        })
        .collect();
    if distinct(&labels, |l| l.clone()).len() < labels.len() {
        for (i, l) in labels.iter_mut().enumerate() {
            *l = format!("{l} (run {})", i + 1);
        }
    }
    labels
}

fn header(out: &mut String, title: &str, runs: &[Run<'_>]) -> fmt::Result {
    write!(
        out,
        "<header>\n<h1>{}</h1>\n<dl class=\"facts\">\n",
        Esc(title)
    )?;
    let reports: Vec<&Report> = runs.iter().map(|r| r.report).collect();
    let mut fact = |name: &str, plural: &str, values: Vec<String>| -> fmt::Result {
        let name = if values.len() > 1 { plural } else { name };
        writeln!(out, "<dt>{name}</dt><dd>{}</dd>", Esc(&values.join(", ")))
    };
    fact(
        "Scenario",
        "Scenarios",
        distinct(&reports, |r| r.scenario.clone()),
    )?;
    fact(
        "Engine",
        "Engines",
        distinct(&reports, |r| r.engine.clone()),
    )?;
    fact(
        "Strategy",
        "Strategies",
        distinct(&reports, |r| r.strategy.clone()),
    )?;
    fact("Seed", "Seeds", distinct(&reports, |r| r.seed.to_string()))?;
    fact(
        "Fleet",
        "Fleets",
        distinct(&reports, |r| {
            format!("{} nodes, {} GPUs", group(r.nodes), group(r.gpus))
        }),
    )?;
    fact(
        "Simulated",
        "Simulated",
        distinct(&reports, |r| duration(r.duration_s)),
    )?;
    if reports.iter().any(|r| r.nodes_lost > 0) {
        fact(
            "Nodes lost",
            "Nodes lost",
            distinct(&reports, |r| group(r.nodes_lost)),
        )?;
    }
    if reports.iter().any(|r| r.broker_restarts > 0) {
        fact(
            "Broker restarts",
            "Broker restarts",
            distinct(&reports, |r| group(r.broker_restarts)),
        )?;
    }
    if !runs.is_empty() {
        let failed = runs.iter().filter(|r| !r.report.ok).count();
        let verdict = match (failed, runs.len()) {
            (0, 1) => "<span class=\"pass\">passed</span>".to_owned(),
            (0, n) => format!("<span class=\"pass\">all {n} runs passed</span>"),
            (_, 1) => "<span class=\"fail\">FAILED</span>".to_owned(),
            (f, n) => format!("<span class=\"fail\">{f} of {n} runs FAILED</span>"),
        };
        writeln!(out, "<dt>SLOs</dt><dd>{verdict}</dd>")?;
    }
    out.push_str("</dl>\n</header>\n");
    Ok(())
}

/// One row per run: the figures that say how it went.
fn summary(out: &mut String, runs: &[Run<'_>]) -> fmt::Result {
    let latency = runs
        .iter()
        .any(|r| r.report.allocation_latency_ms.is_some());
    // No column of strategies: a run's label names its strategy where the runs' differ, and
    // the header names the one they share otherwise.
    let by_strategy = runs.iter().all(|r| r.label == or_dash(&r.report.strategy));
    out.push_str("<section>\n<h2>Summary</h2>\n<div class=\"scroll\"><table>\n<thead><tr>");
    out.push_str(if by_strategy {
        "<th>Strategy</th>"
    } else {
        "<th>Run</th>"
    });
    out.push_str(
        "<th>Requests</th><th>Placed</th><th>Queued</th><th>Rejected</th><th>Abandoned</th>\
         <th>Queue wait p50 / p99</th>",
    );
    if latency {
        out.push_str("<th>Allocation latency p50 / p99</th>");
    }
    out.push_str(
        "<th>Framebuffer peak / mean</th>\
         <th title=\"sessions per GPU in use at the peak / the most sessions one GPU held\">\
         Sessions per GPU, peak / most</th>\
         <th>GPUs at peak / lower bound</th>\
         <th title=\"framebuffer the sessions' tiers need, share of that of the GPUs holding them\">\
         Mean real use</th><th>SLOs</th>\
         </tr></thead>\n<tbody>\n",
    );
    for run in runs {
        let r = run.report;
        let rejected: u64 = r.rejected.values().sum();
        out.push_str("<tr><td>");
        chart::swatch(out, run.colour)?;
        write!(out, "{}</td>", Esc(&run.label))?;
        write!(
            out,
            "<td>{}</td><td title=\"{} placed, {} at once\">{}</td>\
             <td>{}</td><td title=\"{} rejected\">{}</td><td>{}</td><td>{} s / {} s</td>",
            group(r.requests),
            group(r.placed),
            group(r.placed_at_once),
            percent(share(r.placed, r.requests)),
            group(r.queued),
            group(rejected),
            percent(share(rejected, r.requests)),
            group(r.abandoned),
            number(r.queue_wait_s.p50),
            number(r.queue_wait_s.p99),
        )?;
        if latency {
            match &r.allocation_latency_ms {
                Some(p) => {
                    write!(out, "<td>{} ms / {} ms", number(p.p50), number(p.p99))?;
                    if let Some(rate) = r.allocations_per_s {
                        write!(out, "<br><small>{} answers/s</small>", number(rate))?;
                    }
                    out.push_str("</td>");
                }
                None => out.push_str("<td>–</td>"),
            }
        }
        let most_per_gpu = r
            .timeline
            .iter()
            .map(|s| s.max_sessions_per_gpu)
            .max()
            .unwrap_or(0)
            .max(r.peak.max_sessions_per_gpu);
        let lower_bound = r
            .lower_bound_gpus_at_peak
            .map_or_else(|| "–".to_owned(), group);
        writeln!(
            out,
            "<td>{} / {}</td><td>{:.2} / {}</td><td>{} / {lower_bound}</td><td>{}</td>\
             <td>{}</td></tr>",
            percent(r.peak.framebuffer),
            percent(r.mean_framebuffer),
            r.peak_sessions_per_gpu_in_use,
            // 0: a report from before the field, or no session at all.
            if most_per_gpu == 0 {
                "–".to_owned()
            } else {
                group(most_per_gpu)
            },
            group(r.peak.gpus_in_use),
            percent(r.mean_real_use),
            verdict(r.ok),
        )?;
    }
    out.push_str("</tbody></table></div>\n</section>\n");
    Ok(())
}

/// Rejections and session endings per reason: a row per reason, a column per run.
fn outcomes(out: &mut String, runs: &[Run<'_>]) -> fmt::Result {
    let reports: Vec<&Report> = runs.iter().map(|r| r.report).collect();
    let rejected = distinct_many(&reports, |r| r.rejected.keys().cloned().collect());
    let ended = distinct_many(&reports, |r| r.ended.keys().cloned().collect());
    let tiers = distinct_many(&reports, |r| r.placed_per_tier.keys().cloned().collect());
    out.push_str(
        "<section>\n<h2>Rejections and endings</h2>\n<div class=\"scroll\"><table>\n\
         <thead><tr><th>Reason</th>",
    );
    for run in runs {
        out.push_str("<th>");
        chart::swatch(out, run.colour)?;
        write!(out, "{}</th>", Esc(&run.label))?;
    }
    out.push_str("</tr></thead>\n<tbody>\n");
    let row = |out: &mut String, name: String, value: &dyn Fn(&Report) -> u64| {
        write!(out, "<tr><td>{}</td>", Esc(&name))?;
        for r in &reports {
            write!(out, "<td>{}</td>", group(value(r)))?;
        }
        out.push_str("</tr>\n");
        Ok::<(), fmt::Error>(())
    };
    for tier in &tiers {
        row(out, format!("placed: {tier}"), &|r| {
            r.placed_per_tier.get(tier).copied().unwrap_or(0)
        })?;
    }
    row(out, "rejected (all reasons)".into(), &|r| {
        r.rejected.values().sum()
    })?;
    for reason in &rejected {
        row(out, format!("rejected: {reason}"), &|r| {
            r.rejected.get(reason).copied().unwrap_or(0)
        })?;
    }
    row(out, "abandoned in the queue".into(), &|r| r.abandoned)?;
    for reason in &ended {
        row(out, format!("ended: {reason}"), &|r| {
            r.ended.get(reason).copied().unwrap_or(0)
        })?;
    }
    // Faults, where there were any.
    type Count = fn(&Report) -> u64;
    let faults: [(&str, Count); 4] = [
        ("nodes lost", |r| r.nodes_lost),
        ("streams dropped (reconnecting)", |r| r.reconnects),
        ("broker restarts", |r| r.broker_restarts),
        ("requests retried after a restart", |r| {
            r.retried_after_restart
        }),
    ];
    for (name, value) in faults {
        if reports.iter().any(|r| value(r) > 0) {
            row(out, name.into(), &value)?;
        }
    }
    out.push_str("</tbody></table></div>\n</section>\n");
    Ok(())
}

/// Every run's SLO checks, pass or fail.
fn slos(out: &mut String, runs: &[Run<'_>]) -> fmt::Result {
    out.push_str("<section>\n<h2>SLO checks</h2>\n");
    if runs.iter().all(|r| r.report.slo.is_empty()) {
        out.push_str("<p class=\"muted\">The scenario sets no SLO thresholds.</p>\n</section>\n");
        return Ok(());
    }
    let several = runs.len() > 1;
    out.push_str("<div class=\"scroll\"><table>\n<thead><tr>");
    if several {
        out.push_str("<th>Run</th>");
    }
    out.push_str(
        "<th class=\"l\">Check</th><th>Threshold</th><th>Measured</th><th>Result</th></tr></thead>\n\
         <tbody>\n",
    );
    for run in runs {
        for c in &run.report.slo {
            out.push_str("<tr>");
            if several {
                out.push_str("<td>");
                chart::swatch(out, run.colour)?;
                write!(out, "{}</td>", Esc(&run.label))?;
            }
            // The scenario's names say which way a threshold points.
            let bound = if c.name.starts_with("max_") {
                "≤ "
            } else if c.name.starts_with("min_") {
                "≥ "
            } else {
                ""
            };
            writeln!(
                out,
                "<td class=\"l\">{}</td><td>{bound}{}</td><td>{}</td><td>{}</td></tr>",
                Esc(&c.name),
                number(c.threshold),
                number(c.value),
                verdict(c.ok)
            )?;
        }
    }
    out.push_str("</tbody></table></div>\n</section>\n");
    Ok(())
}

/// The `webrtc` engine's step test, for the runs that have one: how many concurrent streams a
/// node held, and each step's figures.
fn streams(out: &mut String, runs: &[Run<'_>]) -> fmt::Result {
    let with: Vec<(&Run<'_>, &crate::webrtc::StreamsReport)> = runs
        .iter()
        .filter_map(|r| r.report.streams.as_ref().map(|s| (r, s)))
        .collect();
    if with.is_empty() {
        return Ok(());
    }
    out.push_str("<section>\n<h2>Streams per node</h2>\n");
    for (run, st) in with {
        if runs.len() > 1 {
            out.push_str("<h3>");
            chart::swatch(out, run.colour)?;
            writeln!(out, "{}</h3>", Esc(&run.label))?;
        }
        let failing = st
            .first_failing
            .map_or_else(|| "none".to_owned(), |n| format!("{n} streams"));
        write!(
            out,
            "<p>A node held <strong>{} streams</strong> of {} ({}) at {} fps or more; first \
             failing step: {}. {} nodes, {} CPUs",
            st.holds,
            Esc(&st.tier),
            Esc(&st.resolution),
            number(st.fps_floor * st.target_fps),
            Esc(&failing),
            st.nodes,
            st.cpus,
        )?;
        if let Some(load) = st.load_average {
            write!(out, ", load average {} at the start", number(load))?;
        }
        writeln!(out, ".</p>\n<p class=\"note\">{}</p>", Esc(&st.rule))?;
        out.push_str(
            "<div class=\"scroll\"><table>\n<thead><tr><th>Streams</th><th>Connected</th>\
             <th>Time to first frame p50 / p99</th><th>fps mean / slowest</th><th>Freezes</th>\
             <th>Frozen</th><th>Result</th><th class=\"l\">Why</th></tr></thead>\n<tbody>\n",
        );
        for step in &st.steps {
            let why: Vec<&str> = step
                .failed_because
                .iter()
                .chain(&step.errors)
                .map(String::as_str)
                .collect();
            writeln!(
                out,
                "<tr><td>{}</td><td>{}</td><td>{} ms / {} ms</td><td>{} / {}</td><td>{}</td>\
                 <td>{} ms</td><td>{}</td><td class=\"l wrap\">{}</td></tr>",
                step.streams,
                step.connected,
                number(step.ttff_ms.p50),
                number(step.ttff_ms.p99),
                number(step.fps_mean),
                number(step.fps_min),
                step.freezes,
                number(step.frozen_ms),
                verdict(step.passed),
                Esc(&why.join("; ")),
            )?;
        }
        out.push_str("</tbody></table></div>\n");
    }
    out.push_str("</section>\n");
    Ok(())
}

/// The charts: over time, distributions and, for several runs, the comparison.
fn charts(out: &mut String, runs: &[Run<'_>]) -> fmt::Result {
    out.push_str("<section>\n<h2>Charts</h2>\n<div class=\"charts\">\n");
    let end = runs
        .iter()
        .map(|r| {
            let last = r.report.timeline.last().map_or(0, |s| s.t_s);
            r.report.duration_s.max(last) as f64
        })
        .fold(0.0, f64::max);
    let time = || {
        let axis = Axis::new(Unit::Time, "time into the run");
        if end > 0.0 {
            axis.range(0.0, end)
        } else {
            axis
        }
    };
    let over_time = |s: &[Sample], f: fn(&Sample) -> f64| {
        s.iter()
            .map(move |s| (s.t_s as f64, f(s)))
            .collect::<Vec<_>>()
    };
    let single = match runs {
        [run] => Some(run),
        _ => None,
    };

    // Utilization: every resource of one run, or the framebuffer of each.
    let share_axis = Axis::new(Unit::Share, "share of the fleet").range(0.0, 1.0);
    if let Some(run) = single {
        let mut c = LineChart::new("Utilization over time", time(), share_axis, Shape::Line);
        let t = &run.report.timeline;
        c.series("framebuffer", 0, over_time(t, |s| s.framebuffer))
            .series("compute", 1, over_time(t, |s| s.compute))
            .series("encoder", 2, over_time(t, |s| s.encoder))
            .series("fragmentation", 3, over_time(t, |s| s.fragmentation))
            .series("real use of GPUs in use", 5, over_time(t, |s| s.real_use))
            .note(
                "Fragmentation: free framebuffer that the smallest waiting tier (the smallest \
                 tier when nobody waits) cannot use. Real use: framebuffer the sessions' tiers \
                 need, share of that of the GPUs holding them (not of the fleet).",
            );
        c.write(out)?;
    } else {
        let mut c = LineChart::new("Framebuffer use over time", time(), share_axis, Shape::Line);
        for run in runs {
            c.series(
                &run.label,
                run.colour,
                over_time(&run.report.timeline, |s| s.framebuffer),
            );
        }
        c.write(out)?;
    }

    // Sessions (and, for one run, the GPUs holding them) and the queue.
    let count = |label: &str| Axis::new(Unit::Count, label);
    if let Some(run) = single {
        let mut c = LineChart::new("Sessions over time", time(), count("count"), Shape::Line);
        let t = &run.report.timeline;
        c.series("sessions", 0, over_time(t, |s| s.sessions as f64))
            .series("GPUs in use", 1, over_time(t, |s| s.gpus_in_use as f64));
        c.write(out)?;
    } else {
        let mut c = LineChart::new("Sessions over time", time(), count("sessions"), Shape::Line);
        for run in runs {
            c.series(
                &run.label,
                run.colour,
                over_time(&run.report.timeline, |s| s.sessions as f64),
            );
        }
        c.write(out)?;
    }
    let mut c = LineChart::new(
        "Queue depth over time",
        time(),
        count("queued requests"),
        Shape::Line,
    );
    for run in runs {
        c.series(
            &run.label,
            run.colour,
            over_time(&run.report.timeline, |s| s.queued as f64),
        );
    }
    c.write(out)?;

    // Distributions.
    let quantile = || Axis::new(Unit::Share, "share at or below").range(0.0, 1.0);
    let cdf = |points: &[CdfPoint]| {
        points
            .iter()
            .map(|p| (p.value, p.quantile))
            .collect::<Vec<_>>()
    };
    let mut c = LineChart::new(
        "Queue wait distribution (CDF)",
        Axis::new(Unit::Number, "queue wait (s)"),
        quantile(),
        Shape::Step,
    );
    for run in runs {
        c.series(&run.label, run.colour, cdf(&run.report.queue_wait_cdf));
    }
    c.note("Share of placed requests that waited at most so long; 0 s for those placed at once.");
    c.write(out)?;
    if runs.iter().any(|r| {
        r.report.allocation_latency_ms.is_some() || !r.report.allocation_latency_cdf.is_empty()
    }) {
        let mut c = LineChart::new(
            "Allocation latency distribution (CDF)",
            Axis::new(Unit::Number, "allocation latency (ms)"),
            quantile(),
            Shape::Step,
        );
        for run in runs {
            c.series(
                &run.label,
                run.colour,
                cdf(&run.report.allocation_latency_cdf),
            );
        }
        c.note("From a request's intended send time to its answer.");
        c.write(out)?;
    }

    // The `webrtc` engine's steps: the frame rate streams held, step by step.
    for run in runs {
        let Some(st) = &run.report.streams else {
            continue;
        };
        let title = match runs.len() {
            1 => "Frame rate per step".to_owned(),
            _ => format!("Frame rate per step: {}", run.label),
        };
        let fps = Axis::new(Unit::Number, "frames per second");
        let mut c = LineChart::new(
            &title,
            Axis::new(Unit::Count, "concurrent streams"),
            fps,
            Shape::Line,
        );
        let steps = |f: fn(&crate::webrtc::StepResult) -> f64| {
            st.steps
                .iter()
                .map(|s| (f64::from(s.streams), f(s)))
                .collect::<Vec<_>>()
        };
        let floor = st.fps_floor * st.target_fps;
        c.series("mean", 0, steps(|s| s.fps_mean))
            .series("slowest stream", 1, steps(|s| s.fps_min))
            .series(
                "floor",
                6,
                st.steps.iter().map(|s| (f64::from(s.streams), floor)),
            )
            .note(&format!(
                "{} ({}) streams; the floor is {} × the target {} fps.",
                st.tier,
                st.resolution,
                number(st.fps_floor),
                number(st.target_fps)
            ));
        c.write(out)?;
    }

    // The comparison of the runs.
    if runs.len() >= 2 {
        let mut c = BarChart::new(
            "Runs compared",
            Axis::new(Unit::Share, "share").range(0.0, 1.0),
            &[
                "placed",
                "rejected",
                "abandoned",
                "peak FB",
                "mean FB",
                "real use",
            ],
        );
        for run in runs {
            let r = run.report;
            let rejected: u64 = r.rejected.values().sum();
            c.series(
                &run.label,
                run.colour,
                &[
                    share(r.placed, r.requests),
                    share(rejected, r.requests),
                    share(r.abandoned, r.requests),
                    r.peak.framebuffer,
                    r.mean_framebuffer,
                    r.mean_real_use,
                ],
            );
        }
        c.note(
            "Placed, rejected and abandoned: share of requests. Peak and mean FB: framebuffer \
             held, share of the fleet's. Real use: mean framebuffer the sessions' tiers need, \
             share of that of the GPUs holding them.",
        );
        c.write(out)?;
        let mut c = BarChart::new(
            "Queue wait compared",
            Axis::new(Unit::Number, "seconds"),
            &["p50", "p90", "p99", "p99.9", "max"],
        );
        for run in runs {
            let q = &run.report.queue_wait_s;
            c.series(
                &run.label,
                run.colour,
                &[q.p50, q.p90, q.p99, q.p999, q.max],
            );
        }
        c.write(out)?;
    }
    out.push_str("</div>\n</section>\n");
    Ok(())
}

/// The distinct values of `f` over `items`, in the order they first appear.
fn distinct<T>(items: &[T], f: impl Fn(&T) -> String) -> Vec<String> {
    distinct_many(items, |i| vec![f(i)])
}

/// The distinct values of all `f`'s lists over `items`, in the order they first appear.
fn distinct_many<T>(items: &[T], f: impl Fn(&T) -> Vec<String>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for v in items.iter().flat_map(f) {
        if !out.contains(&v) {
            out.push(v);
        }
    }
    out
}

fn or_dash(s: &str) -> &str {
    if s.is_empty() { "–" } else { s }
}

fn share(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 / whole as f64
    }
}

/// A share (0–1) in percent, one decimal.
fn percent(share: f64) -> String {
    if share.is_finite() {
        format!("{:.1}%", 100.0 * share)
    } else {
        "–".to_owned()
    }
}

/// A measured value: whole numbers as such, others with a few decimals.
fn number(v: f64) -> String {
    if !v.is_finite() {
        return "–".to_owned();
    }
    let s = if v.abs() >= 100.0 {
        format!("{v:.1}")
    } else if v.abs() >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.4}")
    };
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_owned()
    } else {
        s
    }
}

/// A count with thin spaces between groups of three digits: `12 345`.
fn group(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3 * 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push('\u{202f}');
        }
        out.push(c);
    }
    out
}

/// A simulated length: `45 s`, `30 min`, `2 h`, `1 h 30 min`.
fn duration(s: u64) -> String {
    let (h, m, sec) = (s / 3600, s % 3600 / 60, s % 60);
    match (h, m, sec) {
        (0, 0, sec) => format!("{sec} s"),
        (0, m, 0) => format!("{m} min"),
        (0, m, sec) => format!("{m} min {sec} s"),
        (h, 0, 0) => format!("{h} h"),
        (h, m, _) => format!("{h} h {m} min"),
    }
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "<span class=\"pass\">pass</span>"
    } else {
        "<span class=\"fail\">FAIL</span>"
    }
}

/// The document's style: system fonts only, a two-column chart grid on a wide screen, one
/// column and larger chart text on a phone.
const CSS: &str = "\
*{box-sizing:border-box}\
body{margin:0;font:15px/1.45 system-ui,-apple-system,\"Segoe UI\",Roboto,\"Helvetica Neue\",Arial,sans-serif;color:#1b1b1b;background:#fff}\
main{max-width:1280px;margin:0 auto;padding:16px 20px}\
h1{font-size:1.5rem;margin:.2em 0 .5em}\
h3{font-size:1rem;margin:1em 0 .3em}\
h2{font-size:1.15rem;margin:1.5em 0 .5em;padding-bottom:.2em;border-bottom:1px solid #ddd}\
.facts{display:grid;grid-template-columns:max-content 1fr;gap:2px 16px;margin:0}\
.facts dt{color:#555}.facts dd{margin:0}\
.scroll{overflow-x:auto}\
table{border-collapse:collapse;font-variant-numeric:tabular-nums;white-space:nowrap}\
th,td{padding:4px 8px;border-bottom:1px solid #e4e4e4;text-align:right}\
th{background:#f4f4f4;font-weight:600;white-space:normal;vertical-align:bottom;min-width:4.5em}\
th:first-child,td:first-child,.l{text-align:left}\
td:first-child{position:sticky;left:0;background:#fff}th:first-child{position:sticky;left:0}\
.pass{color:#0a6b3d;font-weight:600}.fail{color:#b3261e;font-weight:700}\
.muted{color:#777}td.wrap{white-space:normal;min-width:16em}\
.swatch{display:inline-block;width:16px;height:0;border-top-width:3px;vertical-align:middle;margin-right:6px}\
.charts{display:grid;grid-template-columns:repeat(auto-fit,minmax(min(100%,520px),1fr));gap:18px}\
figure{margin:0;padding:10px 12px;border:1px solid #e4e4e4;border-radius:6px;min-width:0}\
figcaption{font-weight:600;margin-bottom:4px}\
svg{display:block;width:100%;height:auto}\
svg text{fill:#333;font-family:inherit}\
.tick,.group{font-size:13px}.axis-label{font-size:13px;fill:#555}.barval{font-size:11px}.nodata{font-size:18px;fill:#888}\
.grid{stroke:#e6e6e6;stroke-width:1}.axis{stroke:#777;stroke-width:1;fill:none}\
.frame{fill:#fafafa;stroke:#e4e4e4}\
.series{stroke-linejoin:round;vector-effect:non-scaling-stroke}\
.legend{list-style:none;margin:6px 0 0;padding:0;display:flex;flex-wrap:wrap;gap:2px 16px;font-size:.9rem}\
.note{font-size:.85rem;color:#555;margin:4px 0 0}\
footer{margin-top:2em;font-size:.8rem;color:#888}\
@media (max-width:640px){main{padding:10px}body{font-size:14px}.tick,.axis-label{font-size:21px}.group{font-size:16px}.barval{display:none}.nodata{font-size:26px}}\
";

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::path::Path;

    use super::*;
    use crate::report::{Percentiles, SloCheck};
    use crate::scenario::Scenario;

    /// A report such as the `sim` engine writes: `minutes` samples, a queue in the middle.
    // The casts take small non-negative test values (at most 3000) to counts.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    fn report(strategy: &str, minutes: u32) -> Report {
        let timeline: Vec<Sample> = (0..minutes)
            .map(|m| {
                let x = f64::from(m) / f64::from(minutes.max(1));
                let load = (std::f64::consts::PI * x).sin();
                Sample {
                    t_s: u64::from(m) * 60,
                    sessions: (load * 3000.0).round() as u64,
                    queued: if (0.4..0.6).contains(&x) { 120 } else { 0 },
                    gpus_in_use: (load * 1000.0).round() as u64,
                    framebuffer: 0.9 * load,
                    encoder: 0.5 * load,
                    compute: 0.7 * load,
                    fragmentation: 0.05 * load,
                    real_use: 0.8,
                    max_sessions_per_gpu: 4,
                    ..Sample::default()
                }
            })
            .collect();
        Report {
            schema: crate::report::SCHEMA,
            scenario: "evening-peak".into(),
            engine: "sim".into(),
            strategy: strategy.into(),
            seed: 1,
            duration_s: u64::from(minutes) * 60,
            nodes: 250,
            gpus: 2000,
            requests: 10_000,
            placed: 9_700,
            placed_at_once: 9_000,
            queued: 1_000,
            rejected: BTreeMap::from([("no-capacity".to_owned(), 200)]),
            abandoned: 100,
            ended: BTreeMap::from([("released".to_owned(), 9_500), ("expired".to_owned(), 200)]),
            queue_wait_s: Percentiles {
                count: 9_700,
                p50: 0.0,
                p90: 4.0,
                p99: 60.0,
                p999: 110.0,
                max: 120.0,
            },
            queue_wait_cdf: vec![
                CdfPoint {
                    value: 0.0,
                    quantile: 0.9,
                },
                CdfPoint {
                    value: 4.0,
                    quantile: 0.92,
                },
                CdfPoint {
                    value: 60.0,
                    quantile: 0.99,
                },
                CdfPoint {
                    value: 120.0,
                    quantile: 1.0,
                },
            ],
            peak: timeline
                .iter()
                .max_by(|a, b| a.framebuffer.total_cmp(&b.framebuffer))
                .cloned()
                .unwrap_or_default(),
            peak_sessions_per_gpu_in_use: 3.0,
            mean_framebuffer: 0.55,
            mean_real_use: 0.8,
            lower_bound_gpus_at_peak: Some(900),
            timeline,
            slo: vec![SloCheck {
                name: "max_queue_wait_p99_s".into(),
                threshold: 30.0,
                value: 60.0,
                ok: false,
            }],
            ok: false,
            ..Report::default()
        }
    }

    fn count(doc: &str, needle: &str) -> usize {
        doc.matches(needle).count()
    }

    /// The document loads nothing from outside itself.
    fn assert_self_contained(doc: &str) {
        for external in [
            "http://", "https://", "src=", "href=", "url(", "@import", "<script", "<link", "<img",
        ] {
            assert!(
                !doc.contains(external),
                "the document contains {external:?}"
            );
        }
    }

    /// Every polyline's point count.
    fn polyline_points(doc: &str) -> Vec<usize> {
        doc.split("<polyline")
            .skip(1)
            .map(|p| {
                let p = &p[p.find("points=\"").unwrap() + 8..];
                p[..p.find('"').unwrap()].split(' ').count()
            })
            .collect()
    }

    #[test]
    fn escape_replaces_the_five_html_specials() {
        assert_eq!(escape(r#"<script>&"'"#), "&lt;script&gt;&amp;&quot;&#39;");
        assert_eq!(escape("evening-peak é 🎮"), "evening-peak é 🎮");
        assert_eq!(escape(""), "");
        assert_eq!(escape("a&&b"), "a&amp;&amp;b");
    }

    #[test]
    fn one_sim_run_renders_a_self_contained_document_with_four_charts() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios/smoke.toml");
        let scenario = Scenario::load(&path).unwrap();
        let report = crate::sim::run(&scenario, None).unwrap();
        let doc = render("smoke", std::slice::from_ref(&report));
        assert!(doc.starts_with("<!DOCTYPE html>"));
        assert!(doc.ends_with("</html>\n"));
        assert_self_contained(&doc);
        // Utilization, sessions, queue depth, queue wait: no comparison for one run.
        assert_eq!(count(&doc, "<svg"), 4, "{doc}");
        assert_eq!(count(&doc, "<svg"), count(&doc, "</svg>"));
        assert!(!doc.contains("Runs compared"));
        assert!(doc.contains(&report.strategy));
        assert!(doc.contains("<polyline"), "the timeline is drawn");
        assert!(doc.contains("max_rejected_ratio"), "the SLO table");
        // Four resource lines on the utilization chart.
        for line in [
            "framebuffer",
            "compute",
            "encoder",
            "fragmentation",
            "real use of GPUs in use",
        ] {
            assert!(doc.contains(&format!("<title>{line}</title>")), "{line}");
        }
    }

    #[test]
    fn three_runs_render_the_comparison() {
        let reports = [
            report("genre-weighted", 180),
            report("first-fit", 180),
            report("round-robin", 180),
        ];
        let doc = render("evening peak, three strategies", &reports);
        assert!(doc.starts_with("<!DOCTYPE html>"));
        assert_self_contained(&doc);
        // Framebuffer, sessions, queue depth, queue wait, and two comparison charts.
        assert_eq!(count(&doc, "<svg"), 6);
        assert!(doc.contains("Runs compared"));
        for r in &reports {
            assert!(
                doc.contains(&format!("<title>{}</title>", r.strategy)),
                "{}",
                r.strategy
            );
        }
        // One bar per run and measure in each comparison chart.
        assert_eq!(count(&doc, "<rect x="), 3 * 6 + 3 * 5);
        assert!(doc.contains("3 of 3 runs FAILED"));
        assert!(doc.contains("<th>Strategies</th>") || doc.contains("<dt>Strategies</dt>"));
    }

    #[test]
    fn allocation_latency_adds_a_chart_and_a_column() {
        let mut r = report("genre-weighted", 30);
        r.engine = "live".into();
        r.allocation_latency_ms = Some(Percentiles {
            count: 100,
            p50: 3.0,
            p90: 8.0,
            p99: 20.0,
            p999: 40.0,
            max: 45.0,
        });
        r.allocation_latency_cdf = vec![
            CdfPoint {
                value: 1.0,
                quantile: 0.1,
            },
            CdfPoint {
                value: 3.0,
                quantile: 0.5,
            },
            CdfPoint {
                value: 45.0,
                quantile: 1.0,
            },
        ];
        let doc = render("live", &[r]);
        assert_eq!(count(&doc, "<svg"), 5);
        assert!(doc.contains("Allocation latency p50 / p99"));
        assert!(doc.contains("3 ms / 20 ms"));
    }

    #[test]
    fn a_webrtc_step_test_adds_its_table_and_chart() {
        let mut r = report("genre-weighted", 5);
        r.engine = "webrtc".into();
        r.streams = Some(crate::webrtc::StreamsReport {
            tier: "720p".into(),
            resolution: "1280x720".into(),
            target_fps: 30.0,
            fps_floor: 0.9,
            holds: 2,
            first_failing: Some(3),
            rule: "every stream <= rule".into(),
            steps: (1..=3)
                .map(|n| crate::webrtc::StepResult {
                    streams: n,
                    connected: n,
                    fps_mean: 31.0 - f64::from(n),
                    fps_min: 31.0 - 2.0 * f64::from(n),
                    passed: n < 3,
                    failed_because: if n < 3 {
                        vec![]
                    } else {
                        vec!["slow <stream>".into()]
                    },
                    ..crate::webrtc::StepResult::default()
                })
                .collect(),
            ..crate::webrtc::StreamsReport::default()
        });
        let doc = render("webrtc", &[r]);
        assert_eq!(count(&doc, "<svg"), 5);
        assert!(doc.contains("Streams per node"));
        assert!(doc.contains("<strong>2 streams</strong>"));
        assert!(doc.contains("slow &lt;stream&gt;"));
        assert!(doc.contains("every stream &lt;= rule"));
        assert_self_contained(&doc);
    }

    #[test]
    fn strings_from_the_report_are_escaped() {
        let mut r = report("<b>bold</b>", 10);
        r.scenario = r#"<script>&""#.into();
        r.rejected.insert("<img>".into(), 1);
        r.slo[0].name = "<i>".into();
        let doc = render("<title> & more", &[r.clone(), r]);
        assert_self_contained(&doc);
        assert!(doc.contains("&lt;script&gt;&amp;&quot;"));
        assert!(doc.contains("&lt;b&gt;bold&lt;/b&gt;"));
        assert!(doc.contains("&lt;title&gt; &amp; more"));
        for raw in ["<b>", "<i>", "<title> &"] {
            assert!(!doc.contains(raw), "{raw} is not escaped");
        }
    }

    #[test]
    fn empty_timelines_and_distributions_print_no_data() {
        let mut r = report("first-fit", 0);
        r.queue_wait_cdf.clear();
        let doc = render("empty", &[r.clone()]);
        assert_eq!(count(&doc, "<svg"), 4);
        assert_eq!(count(&doc, "no data</text>"), 4);
        assert!(!doc.contains("<polyline"));
        let doc = render("empty", &[r.clone(), r]);
        assert_eq!(count(&doc, "<svg"), 6);
        let doc = render("nothing", &[]);
        assert!(doc.starts_with("<!DOCTYPE html>") && doc.ends_with("</html>\n"));
        assert!(doc.contains("No runs to report."));
    }

    #[test]
    fn a_day_of_samples_per_run_is_downsampled() {
        let reports = [report("a", 1440), report("b", 1440), report("c", 1440)];
        let doc = render("a day", &reports);
        let lines = polyline_points(&doc);
        // Framebuffer, sessions and queue depth per run, and the queue wait per run.
        assert_eq!(lines.len(), 4 * 3);
        assert!(lines.iter().all(|n| *n <= chart::MAX_POINTS), "{lines:?}");
        assert!(
            lines.iter().any(|n| *n > 500),
            "a day keeps its shape: {lines:?}"
        );
        assert!(doc.len() < 1_000_000, "{} bytes", doc.len());
    }

    #[test]
    fn runs_are_labelled_by_what_differs() {
        let mut a = report("first-fit", 10);
        let mut b = a.clone();
        b.gpus = 4000;
        assert_eq!(labels(&[a.clone(), b.clone()]), ["2000 GPUs", "4000 GPUs"]);
        b.strategy = "random".into();
        assert_eq!(
            labels(&[a.clone(), b]),
            ["first-fit · 2000 GPUs", "random · 4000 GPUs"]
        );
        assert_eq!(labels(&[a.clone(), a.clone()]), ["run 1", "run 2"]);
        a.strategy.clear();
        assert_eq!(labels(&[a]), ["–"]);
    }

    #[test]
    fn numbers_read_well() {
        assert_eq!(group(1_234_567), "1\u{202f}234\u{202f}567");
        assert_eq!(group(999), "999");
        assert_eq!(duration(1800), "30 min");
        assert_eq!(duration(86_400), "24 h");
        assert_eq!(duration(5_400), "1 h 30 min");
        assert_eq!(number(5.0), "5");
        assert_eq!(number(0.0125), "0.0125");
        assert_eq!(number(f64::NAN), "–");
        assert_eq!(percent(0.975), "97.5%");
    }
}
