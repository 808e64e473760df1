//! The demand of a scenario as a stream of requests: when each player asks, for which tier and
//! game, for how long, whether and when they give up waiting, where they are and whether their
//! stream drops. Every engine draws the same stream from the same scenario and seed, and the
//! draws never depend on what the engine does with a request, so every placement strategy
//! (and `sim` and `live`) sees the same demand.

use std::collections::BTreeMap;

use framecast_shared::ids::{GameId, GenreName, RegionName, TierName};

use crate::scenario::{Arrivals, LogNormal, Scenario, TraceRow};

/// The session length of a genre the scenario does not describe.
pub const DEFAULT_LENGTH: LogNormal = LogNormal {
    median: 30.0,
    sigma: 0.6,
};

/// One player's request.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// Its arrival number, from 1.
    pub n: u64,
    /// When it is made, ms into the run.
    pub at_ms: u64,
    /// The tier asked for.
    pub tier: TierName,
    /// The genre played.
    pub genre: GenreName,
    /// The game: `game-<genre>` (an engine with a real catalogue maps the genre to a game).
    pub game: GameId,
    /// How long the session lasts once placed, ms (at least 1).
    pub length_ms: u64,
    /// After how long in the queue the player gives up, ms; `None`: never.
    pub gives_up_after_ms: Option<u64>,
    /// The player's region: an index into [`DemandStream::regions`].
    pub home: usize,
    /// Whether the stream drops during the session.
    pub drop: Option<StreamDrop>,
}

/// A stream that drops once during its session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamDrop {
    /// When, ms after the session was placed.
    pub after_ms: u64,
    /// When the player is back, ms after the drop; `None`: never.
    pub back_after_ms: Option<u64>,
}

/// Why a scenario's demand cannot be drawn.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct DemandError(String);

/// The requests of a scenario, in time order.
#[derive(Debug)]
pub struct DemandStream {
    arrivals: Arrivals,
    rng: fastrand::Rng,
    /// The last arrival, ms (with its fraction, so that high rates are not rounded away).
    t_ms: f64,
    end_ms: u64,
    n: u64,
    tiers: Vec<(TierName, f64)>,
    genres: Vec<(GenreName, f64)>,
    games: Vec<GameId>,
    lengths: BTreeMap<String, LogNormal>,
    regions: Vec<(RegionName, f64)>,
    abandon_per_minute: f64,
    reconnect_probability: f64,
    reconnect_success: f64,
}

impl DemandStream {
    /// The demand of `scenario` with its seed.
    pub fn new(scenario: &Scenario) -> Result<Self, DemandError> {
        let err = |e: &dyn std::fmt::Display| DemandError(e.to_string());
        let d = &scenario.demand;
        let tiers = weighted(&d.tiers, |t| TierName::new(t)).map_err(|e| err(&e))?;
        let genres = weighted(&d.genres, |g| GenreName::new(g)).map_err(|e| err(&e))?;
        let games = genres
            .iter()
            .map(|(g, _)| GameId::new(format!("game-{g}")))
            .collect::<Result<_, _>>()
            .map_err(|e| err(&e))?;
        // Players come from each region in proportion to its GPUs.
        let mut regions: Vec<(RegionName, f64)> = Vec::new();
        for group in &scenario.fleet {
            let region = RegionName::new(&group.region).map_err(|e| err(&e))?;
            let weight = (group.nodes * group.gpus_per_node) as f64;
            match regions.iter_mut().find(|(r, _)| *r == region) {
                Some((_, w)) => *w += weight,
                None => regions.push((region, weight)),
            }
        }
        if let Arrivals::Trace { rows, .. } = &d.arrivals {
            for (i, row) in rows.iter().enumerate() {
                check_row(row, i).map_err(DemandError)?;
            }
        }
        Ok(Self {
            arrivals: d.arrivals.clone(),
            rng: fastrand::Rng::with_seed(scenario.seed),
            t_ms: 0.0,
            end_ms: scenario.duration_s.saturating_mul(1000),
            n: 0,
            tiers,
            genres,
            games,
            lengths: d.session_minutes.clone(),
            regions,
            abandon_per_minute: d.abandon_per_minute,
            reconnect_probability: d.reconnect_probability,
            reconnect_success: d.reconnect_success,
        })
    }

    /// The regions players come from, in the fleet's order.
    pub fn regions(&self) -> impl Iterator<Item = &RegionName> {
        self.regions.iter().map(|(r, _)| r)
    }

    /// The next arrival time after the last, ms, or `None` past the end.
    fn next_time(&mut self) -> Option<(u64, Option<TraceRow>)> {
        if let Arrivals::Trace { rows, .. } = &self.arrivals {
            let row = rows.get(usize::try_from(self.n).ok()?)?.clone();
            let at = to_ms(row.t_s * 1000.0);
            return (at <= self.end_ms).then_some((at, Some(row)));
        }
        let t = next_arrival(&self.arrivals, self.t_ms, self.end_ms, &mut self.rng)?;
        self.t_ms = t;
        Some((to_ms(t), None))
    }
}

impl Iterator for DemandStream {
    type Item = Request;

    fn next(&mut self) -> Option<Request> {
        let (at_ms, row) = self.next_time()?;
        self.n += 1;
        // The draws, always in this order and whatever the row says, so that a request's
        // fields never shift the next one's.
        let tier_idx = pick_index(&self.tiers, &mut self.rng);
        let genre_idx = pick_index(&self.genres, &mut self.rng);
        let mut genre = self.genres.get(genre_idx)?.0.clone();
        let mut game = self.games.get(genre_idx)?.clone();
        let mut tier = self.tiers.get(tier_idx)?.0.clone();
        if let Some(row) = &row {
            // Checked by `check_row` when the stream was made.
            if let Some(t) = row.tier.as_deref().and_then(|t| TierName::new(t).ok()) {
                tier = t;
            }
            if let Some(g) = row.genre.as_deref().and_then(|g| GenreName::new(g).ok()) {
                game = GameId::new(format!("game-{g}")).ok()?;
                genre = g;
            }
        }
        let length = self
            .lengths
            .get(genre.as_str())
            .copied()
            .unwrap_or(DEFAULT_LENGTH);
        let drawn_minutes = draw_log_normal(length, &mut self.rng);
        let minutes = row
            .as_ref()
            .and_then(|r| r.minutes)
            .unwrap_or(drawn_minutes);
        let length_ms = to_ms(minutes * 60_000.0).max(1);
        let gives_up_after_ms = abandon_after(self.abandon_per_minute, &mut self.rng);
        let home = pick_index(&self.regions, &mut self.rng);
        let drop = (self.reconnect_probability > 0.0)
            .then(|| {
                let drops = self.rng.f64() < self.reconnect_probability;
                let after_ms = to_ms(self.rng.f64() * length_ms as f64);
                let back = self.rng.f64() < self.reconnect_success;
                let back_after_ms = self.rng.u64(2_000..=30_000);
                drops.then_some(StreamDrop {
                    after_ms,
                    back_after_ms: back.then_some(back_after_ms),
                })
            })
            .flatten();
        Some(Request {
            n: self.n,
            at_ms,
            tier,
            genre,
            game,
            length_ms,
            gives_up_after_ms,
            home,
            drop,
        })
    }
}

fn check_row(row: &TraceRow, i: usize) -> Result<(), String> {
    // The header is line 1.
    let line = i + 2;
    if let Some(t) = &row.tier {
        TierName::new(t).map_err(|e| format!("trace line {line}: tier = {t}: {e}"))?;
    }
    if let Some(g) = &row.genre {
        GenreName::new(g).map_err(|e| format!("trace line {line}: genre = {g}: {e}"))?;
    }
    Ok(())
}

/// Milliseconds from a non-negative float: rounded down, negative and NaN as 0, saturating.
// The one float → integer conversion of the demand, range-checked here.
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
pub(crate) fn to_ms(x: f64) -> u64 {
    if x.is_finite() && x > 0.0 {
        x.min(u64::MAX as f64) as u64
    } else {
        0
    }
}

fn weighted<T, E>(
    weights: &BTreeMap<String, f64>,
    make: impl Fn(&str) -> Result<T, E>,
) -> Result<Vec<(T, f64)>, E> {
    weights
        .iter()
        .filter(|(_, w)| **w > 0.0)
        .map(|(k, w)| Ok((make(k)?, *w)))
        .collect()
}

fn pick_index<T>(items: &[(T, f64)], rng: &mut fastrand::Rng) -> usize {
    let total: f64 = items.iter().map(|(_, w)| w).sum();
    let mut x = rng.f64() * total;
    for (i, (_, w)) in items.iter().enumerate() {
        if x < *w {
            return i;
        }
        x -= w;
    }
    items.len().saturating_sub(1)
}

/// A log-normal draw (Box–Muller for the normal).
fn draw_log_normal(d: LogNormal, rng: &mut fastrand::Rng) -> f64 {
    let u1 = rng.f64().max(f64::MIN_POSITIVE);
    let u2 = rng.f64();
    let z = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
    d.median * (d.sigma * z).exp()
}

/// When a queued player gives up, ms after queueing, for a per-minute probability `p`.
fn abandon_after(p: f64, rng: &mut fastrand::Rng) -> Option<u64> {
    if p <= 0.0 {
        return None;
    }
    if p >= 1.0 {
        return Some(60_000);
    }
    // ln(1 - p) without losing a tiny p to rounding (1 - 1e-17 is 1).
    let per_ms = -(-p).ln_1p() / 60_000.0;
    let u = rng.f64().max(f64::MIN_POSITIVE);
    let after = -u.ln() / per_ms;
    // Patience beyond any run (about 30 years) is none.
    (after.is_finite() && after < 1e12).then(|| to_ms(after))
}

/// The arrival rate at `t_ms`, per second (0 for a trace, which has no rate).
pub fn rate_at(arrivals: &Arrivals, t_ms: u64, end_ms: u64) -> f64 {
    match *arrivals {
        Arrivals::Poisson { rate_per_s } => rate_per_s,
        Arrivals::Ramp {
            from_per_s,
            to_per_s,
        } => {
            let f = t_ms as f64 / end_ms.max(1) as f64;
            from_per_s + (to_per_s - from_per_s) * f
        }
        Arrivals::Daily {
            trough_per_s,
            peak_per_s,
            trough_hour,
        } => {
            let hours = t_ms as f64 / 3_600_000.0;
            let phase = (hours - trough_hour) / 24.0 * std::f64::consts::TAU;
            trough_per_s + (peak_per_s - trough_per_s) * (1.0 - phase.cos()) / 2.0
        }
        Arrivals::Trace { .. } => 0.0,
    }
}

/// The next arrival after `t_ms` (thinning a Poisson process at the highest rate), in ms
/// with their fraction, or `None` past the end.
fn next_arrival(
    arrivals: &Arrivals,
    t_ms: f64,
    end_ms: u64,
    rng: &mut fastrand::Rng,
) -> Option<f64> {
    let max = match *arrivals {
        Arrivals::Poisson { rate_per_s } => rate_per_s,
        Arrivals::Ramp {
            from_per_s,
            to_per_s,
        } => from_per_s.max(to_per_s),
        Arrivals::Daily {
            peak_per_s,
            trough_per_s,
            ..
        } => peak_per_s.max(trough_per_s),
        Arrivals::Trace { .. } => return None,
    };
    if max <= 0.0 {
        return None;
    }
    let mut t = t_ms;
    loop {
        let u = rng.f64().max(f64::MIN_POSITIVE);
        t += -u.ln() / max * 1000.0;
        if t > end_ms as f64 {
            return None;
        }
        if rng.f64() * max <= rate_at(arrivals, to_ms(t), end_ms) {
            return Some(t);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scenario(extra: &str, arrivals: &str) -> Scenario {
        let text = format!(
            r#"
name = "t"
duration_s = 3600
[[fleet]]
region = "eu"
nodes = 3
model = "l4"
gpus_per_node = 2
[[fleet]]
region = "us"
nodes = 1
model = "l4"
gpus_per_node = 2
[demand]
arrivals = {arrivals}
tiers = {{ "720p" = 1, "4k" = 1 }}
genres = {{ fps = 1, rpg = 1 }}
{extra}
"#
        );
        Scenario::parse(&text, "t.toml").unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn the_same_seed_draws_the_same_requests_in_time_order() {
        let s = scenario("", "{ kind = \"poisson\", rate_per_s = 1 }");
        let a: Vec<Request> = DemandStream::new(&s).unwrap().collect();
        let b: Vec<Request> = DemandStream::new(&s).unwrap().collect();
        assert_eq!(a, b);
        // About 3600 arrivals in an hour at 1/s.
        assert!((3300..3900).contains(&a.len()), "{}", a.len());
        assert!(a.windows(2).all(|w| w[0].at_ms <= w[1].at_ms));
        assert!(a.iter().all(|r| r.at_ms <= 3_600_000 && r.length_ms >= 1));
        // Regions by GPUs: 3 of 4 players are in eu.
        let eu = a.iter().filter(|r| r.home == 0).count() as f64 / a.len() as f64;
        assert!((0.70..0.80).contains(&eu), "{eu}");
        assert!(
            a.iter()
                .all(|r| r.drop.is_none() && r.gives_up_after_ms.is_none())
        );
    }

    #[test]
    fn a_high_rate_is_offered_in_full() {
        // Several arrivals fall in the same millisecond at 5 000/s.
        let s = scenario("", "{ kind = \"poisson\", rate_per_s = 5000 }");
        let n = DemandStream::new(&s)
            .unwrap()
            .take_while(|r| r.at_ms < 10_000)
            .count();
        assert!((49_000..51_000).contains(&n), "{n}");
    }

    #[test]
    fn drops_and_abandons_follow_their_probabilities() {
        let s = scenario(
            "abandon_per_minute = 0.5\nreconnect_probability = 0.25\nreconnect_success = 0.8",
            "{ kind = \"poisson\", rate_per_s = 2 }",
        );
        let all: Vec<Request> = DemandStream::new(&s).unwrap().collect();
        let drops: Vec<StreamDrop> = all.iter().filter_map(|r| r.drop).collect();
        let share = drops.len() as f64 / all.len() as f64;
        assert!((0.22..0.28).contains(&share), "{share}");
        let back = drops.iter().filter(|d| d.back_after_ms.is_some()).count() as f64;
        assert!((0.75..0.85).contains(&(back / drops.len() as f64)));
        assert!(all.iter().all(|r| {
            r.drop.is_none_or(|d| {
                d.after_ms <= r.length_ms
                    && d.back_after_ms
                        .is_none_or(|b| (2_000..=30_000).contains(&b))
            })
        }));
        // Half give up within a minute.
        let within = all
            .iter()
            .filter(|r| r.gives_up_after_ms.is_some_and(|g| g <= 60_000))
            .count() as f64;
        assert!((0.45..0.55).contains(&(within / all.len() as f64)));
    }

    #[test]
    fn a_trace_gives_its_rows_and_fills_in_what_they_leave_out() {
        let mut s = scenario("", "{ kind = \"trace\", path = \"t.csv\" }");
        if let Arrivals::Trace { rows, .. } = &mut s.demand.arrivals {
            *rows = vec![
                TraceRow {
                    t_s: 1.5,
                    tier: Some("4k".into()),
                    genre: Some("moba".into()),
                    minutes: Some(2.0),
                },
                TraceRow {
                    t_s: 7.0,
                    tier: None,
                    genre: None,
                    minutes: None,
                },
            ];
        }
        let all: Vec<Request> = DemandStream::new(&s).unwrap().collect();
        assert_eq!(all.len(), 2);
        assert_eq!((all[0].at_ms, all[0].length_ms), (1500, 120_000));
        assert_eq!(
            (all[0].tier.as_str(), all[0].genre.as_str()),
            ("4k", "moba")
        );
        assert_eq!(all[0].game.as_str(), "game-moba");
        assert_eq!(all[1].at_ms, 7000);
        assert!(["fps", "rpg"].contains(&all[1].genre.as_str()));
    }

    #[test]
    fn a_daily_curve_peaks_twelve_hours_after_its_trough() {
        let a = Arrivals::Daily {
            trough_per_s: 1.0,
            peak_per_s: 5.0,
            trough_hour: 8.0,
        };
        let day = 86_400_000;
        assert!((rate_at(&a, 8 * 3_600_000, day) - 1.0).abs() < 1e-9);
        assert!((rate_at(&a, 20 * 3_600_000, day) - 5.0).abs() < 1e-9);
    }
}
