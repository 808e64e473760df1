//! The `streams` part of a `webrtc` report, and the rule that says whether a step of N
//! concurrent streams held. No I/O: the step's stream outcomes go in, its result comes out.

use std::fmt::Write as _;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::http_client::{histogram, record_micros};
use crate::report::Percentiles;

use super::frames::{FreezeRule, StreamStats};

/// At most this many distinct stream errors are kept per step.
pub(crate) const ERRORS_KEPT: usize = 5;

/// What the `webrtc` engine found: how many concurrent streams a node held, step by step.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StreamsReport {
    /// The tier the players asked for.
    pub tier: String,
    /// The tier's frame size, `WIDTHxHEIGHT`.
    pub resolution: String,
    /// The frame rate a stream should hold: the tier's, capped by the agents' software
    /// encoder (`whep.software_max_fps`).
    pub target_fps: f64,
    /// The share of `target_fps` every stream must hold for its step to pass.
    pub fps_floor: f64,
    /// A gap between two frames longer than this is a freeze, milliseconds.
    pub freeze_threshold_ms: f64,
    /// How long every step played, seconds (after all its streams had their first frame).
    pub step_seconds: f64,
    /// Nodes in the dev fleet (they all share this machine's CPUs).
    pub nodes: u64,
    /// CPUs this process may use: players, agents and encoders all run on them.
    #[serde(default)]
    pub cpus: u64,
    /// The machine's 1-minute load average when the run started (Linux), to tell a busy
    /// machine's figures from a quiet one's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_average: Option<f64>,
    /// The pass rule, in words.
    pub rule: String,
    /// Each step run, in order: 1 stream, 2, 3, …
    pub steps: Vec<StepResult>,
    /// Streams a node holds: the largest passing step before the first failing one (0 when
    /// the first step failed).
    pub holds: u32,
    /// Streams in the first step that failed; absent when every step up to `--max-streams`
    /// passed (the node holds at least `holds`).
    pub first_failing: Option<u32>,
}

/// One step: N players at once.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StepResult {
    /// Players in the step.
    pub streams: u32,
    /// Players that received a first frame.
    pub connected: u32,
    /// Time to first frame of the connected players (allocation request to the first
    /// complete frame), milliseconds.
    pub ttff_ms: Percentiles,
    /// Frames per second over the play window, mean over connected players.
    pub fps_mean: f64,
    /// Frames per second of the slowest connected player (0 when none connected).
    pub fps_min: f64,
    /// Freezes over all connected players.
    pub freezes: u32,
    /// Time frozen over all connected players, milliseconds.
    pub frozen_ms: f64,
    /// Whether the step held by the rule.
    pub passed: bool,
    /// The parts of the rule it broke, in words (empty when it passed).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failed_because: Vec<String>,
    /// Why players failed to connect, the first few distinct reasons (and, when the broker
    /// still showed the step's sessions after their release, how many).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<String>,
}

/// How one player of a step did.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum StreamOutcome {
    /// It got its first frame `ttff` after its allocation request and played the window.
    Played {
        /// Allocation request to first complete frame.
        ttff: Duration,
        /// Its figures over the play window.
        stats: StreamStats,
    },
    /// It never got a frame.
    Failed {
        /// What failed.
        error: String,
    },
}

/// The rule a step must meet.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct PassRule {
    /// Frames per second a stream should hold.
    pub(crate) target_fps: f64,
    /// The share of `target_fps` every stream must hold.
    pub(crate) fps_floor: f64,
    /// When a gap is a freeze.
    pub(crate) freeze: FreezeRule,
}

impl PassRule {
    /// The least frame rate a stream may have.
    pub(crate) fn min_fps(&self) -> f64 {
        self.fps_floor * self.target_fps
    }

    /// The rule in words, for the report.
    pub(crate) fn describe(&self) -> String {
        format!(
            "a step passes when every stream connected (got a first frame within the connect \
             limit), every stream held at least {:.1} fps ({} x {} fps) over the play window, \
             and no stream froze (no gap between frames over {} ms)",
            self.min_fps(),
            self.fps_floor,
            self.target_fps,
            self.freeze.threshold.as_millis()
        )
    }

    /// The result of a step whose players did `outcomes`.
    pub(crate) fn judge(&self, outcomes: &[StreamOutcome]) -> StepResult {
        let mut step = StepResult {
            streams: u32::try_from(outcomes.len()).unwrap_or(u32::MAX),
            ..StepResult::default()
        };
        let mut ttff = histogram();
        let mut fps = Vec::new();
        let mut frozen = Duration::ZERO;
        for o in outcomes {
            match o {
                StreamOutcome::Played { ttff: t, stats } => {
                    step.connected += 1;
                    record_micros(&mut ttff, *t);
                    fps.push(stats.fps);
                    step.freezes += stats.freezes;
                    frozen += stats.frozen;
                }
                StreamOutcome::Failed { error } => {
                    if step.errors.len() < ERRORS_KEPT && !step.errors.contains(error) {
                        step.errors.push(error.clone());
                    }
                }
            }
        }
        if !ttff.is_empty() {
            step.ttff_ms = Percentiles::scaled(&ttff, 1000.0);
        }
        if !fps.is_empty() {
            step.fps_mean = fps.iter().sum::<f64>() / fps.len() as f64;
            step.fps_min = fps.iter().copied().fold(f64::INFINITY, f64::min);
        }
        step.frozen_ms = frozen.as_secs_f64() * 1000.0;

        if step.streams == 0 {
            step.failed_because.push("no streams".into());
        }
        if step.connected < step.streams {
            step.failed_because.push(format!(
                "{} of {} streams did not connect",
                step.streams - step.connected,
                step.streams
            ));
        }
        if step.connected > 0 && step.fps_min < self.min_fps() {
            step.failed_because.push(format!(
                "a stream held {:.1} fps, under {:.1}",
                step.fps_min,
                self.min_fps()
            ));
        }
        if step.freezes > 0 {
            step.failed_because.push(format!(
                "{} freezes, {:.0} ms frozen",
                step.freezes, step.frozen_ms
            ));
        }
        step.passed = step.failed_because.is_empty();
        step
    }
}

/// Streams a node holds after `steps` (in the order run): the largest passing step before the
/// first failing one, and that failing step's size if there was one.
pub(crate) fn holds(steps: &[StepResult]) -> (u32, Option<u32>) {
    let mut held = 0;
    for s in steps {
        if !s.passed {
            return (held, Some(s.streams));
        }
        held = held.max(s.streams);
    }
    (held, None)
}

impl StreamsReport {
    /// The steps as a table for the terminal summary, one line each, then the finding.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "streams          {} at {} (target {:.0} fps, floor {:.0}%, freeze > {:.0} ms), {:.1} s per step",
            self.tier,
            self.resolution,
            self.target_fps,
            100.0 * self.fps_floor,
            self.freeze_threshold_ms,
            self.step_seconds
        );
        let _ = writeln!(
            s,
            "machine          {} CPUs, load average {} at the start",
            self.cpus,
            self.load_average
                .map_or_else(|| "unknown".to_owned(), |l| format!("{l:.2}"))
        );
        let _ = writeln!(
            s,
            "  step  connected  ttff p50/p99/max ms   fps mean/min   freezes  frozen ms  verdict"
        );
        for st in &self.steps {
            let verdict = if st.passed {
                "holds".to_owned()
            } else {
                st.failed_because.join("; ")
            };
            let _ = writeln!(
                s,
                "  {:>4}  {:>4}/{:<4}  {:>6.0} {:>6.0} {:>6.0}  {:>6.1} {:>6.1}  {:>7}  {:>9.0}  {}",
                st.streams,
                st.connected,
                st.streams,
                st.ttff_ms.p50,
                st.ttff_ms.p99,
                st.ttff_ms.max,
                st.fps_mean,
                st.fps_min,
                st.freezes,
                st.frozen_ms,
                verdict
            );
            for e in &st.errors {
                let _ = writeln!(s, "        error: {e}");
            }
        }
        let _ = match self.first_failing {
            Some(n) => writeln!(
                s,
                "a node holds     {} {} streams ({} failed)",
                self.holds, self.tier, n
            ),
            None => writeln!(
                s,
                "a node holds     at least {} {} streams (every step passed)",
                self.holds, self.tier
            ),
        };
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule() -> PassRule {
        PassRule {
            target_fps: 30.0,
            fps_floor: 0.9,
            freeze: FreezeRule::for_fps(30.0),
        }
    }

    fn played(ttff_ms: u64, fps: f64, freezes: u32) -> StreamOutcome {
        StreamOutcome::Played {
            ttff: Duration::from_millis(ttff_ms),
            stats: StreamStats {
                frames: 90,
                fps,
                freezes,
                frozen: Duration::from_millis(u64::from(freezes) * 250),
            },
        }
    }

    #[test]
    fn a_step_of_steady_streams_passes_with_its_figures() {
        let step = rule().judge(&[played(300, 30.0, 0), played(500, 28.0, 0)]);
        assert!(step.passed, "{:?}", step.failed_because);
        assert_eq!((step.streams, step.connected), (2, 2));
        assert!((step.fps_mean - 29.0).abs() < 1e-9);
        assert_eq!(step.fps_min, 28.0);
        assert_eq!(step.ttff_ms.count, 2);
        assert!(
            (step.ttff_ms.max - 500.0).abs() < 1.0,
            "{}",
            step.ttff_ms.max
        );
        assert!(
            (step.ttff_ms.p50 - 300.0).abs() < 1.0,
            "{}",
            step.ttff_ms.p50
        );
    }

    #[test]
    fn one_slow_stream_fails_the_step_even_when_the_mean_is_fine() {
        let step = rule().judge(&[played(300, 31.0, 0), played(300, 26.9, 0)]);
        assert!(step.fps_mean >= 27.0);
        assert!(!step.passed);
        assert_eq!(step.failed_because.len(), 1);
        assert!(
            step.failed_because[0].contains("26.9"),
            "{:?}",
            step.failed_because
        );
        // At the floor exactly is enough.
        assert!(rule().judge(&[played(300, 27.0, 0)]).passed);
    }

    #[test]
    fn one_freeze_or_one_failed_connection_fails_the_step() {
        let step = rule().judge(&[played(300, 30.0, 1), played(300, 30.0, 0)]);
        assert!(!step.passed);
        assert_eq!((step.freezes, step.frozen_ms), (1, 250.0));

        let failed = StreamOutcome::Failed {
            error: "WHEP POST: 503".into(),
        };
        let step = rule().judge(&[played(300, 30.0, 0), failed.clone(), failed]);
        assert!(!step.passed);
        assert_eq!((step.streams, step.connected), (3, 1));
        assert_eq!(
            step.errors,
            vec!["WHEP POST: 503".to_owned()],
            "distinct reasons"
        );
        assert_eq!(step.failed_because, vec!["2 of 3 streams did not connect"]);
    }

    #[test]
    fn no_streams_or_none_connected_is_a_failure_not_a_pass() {
        assert!(!rule().judge(&[]).passed);
        let step = rule().judge(&[StreamOutcome::Failed {
            error: "timeout".into(),
        }]);
        assert!(!step.passed);
        assert_eq!(
            (step.fps_mean, step.fps_min, step.ttff_ms.count),
            (0.0, 0.0, 0)
        );
    }

    #[test]
    fn a_node_holds_the_largest_passing_step_before_the_first_failure() {
        let step = |streams, passed| StepResult {
            streams,
            passed,
            ..StepResult::default()
        };
        assert_eq!(holds(&[]), (0, None));
        assert_eq!(holds(&[step(1, false)]), (0, Some(1)));
        assert_eq!(
            holds(&[step(1, true), step(2, true), step(3, false)]),
            (2, Some(3))
        );
        assert_eq!(holds(&[step(1, true), step(2, true)]), (2, None));
        // A later pass after a failure does not count (stepping stops there anyway).
        assert_eq!(
            holds(&[step(1, true), step(2, false), step(3, true)]),
            (1, Some(2))
        );
    }

    #[test]
    fn the_table_names_the_finding() {
        let r = StreamsReport {
            tier: "360p".into(),
            resolution: "640x360".into(),
            target_fps: 30.0,
            fps_floor: 0.9,
            steps: vec![
                rule().judge(&[played(300, 30.0, 0)]),
                rule().judge(&[played(300, 30.0, 2), played(300, 20.0, 0)]),
            ],
            holds: 1,
            first_failing: Some(2),
            ..StreamsReport::default()
        };
        let t = r.table();
        assert!(
            t.contains("a node holds     1 360p streams (2 failed)"),
            "{t}"
        );
        assert!(t.contains("2 freezes"), "{t}");
    }
}
