//! The demand model of one (region, tier, game): arrival rates as exponentially weighted
//! moving averages over a short and a long window, a daily profile of 24 hour-of-day buckets,
//! and the mean session length. Plain arithmetic on timestamps passed in.

use std::time::Duration;

use framecast_shared::time::Timestamp;

/// Weight of one day's figure in an hour-of-day bucket.
pub(super) const PROFILE_ALPHA: f64 = 0.3;
/// Weight of one observed session length in the mean.
pub(super) const LENGTH_ALPHA: f64 = 0.1;
/// Session lengths are taken as at most this long (a week): a clock error or a corrupt report
/// must not make one session weigh like years of them.
const MAX_LENGTH_S: f64 = 7.0 * 86_400.0;
/// A bucket learns from an hour only if at least this much of it was observed.
const MIN_OBSERVED_MS: u64 = 10 * 60 * 1000;
const HOUR_MS: u64 = 3_600_000;

/// Events per second, exponentially weighted with time constant `tau`: each event adds
/// `1/tau`, and the value decays by `e^(-dt/tau)`. For Poisson arrivals at rate λ its mean is
/// λ once the window has filled.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(super) struct RateEwma {
    value: f64,
    at: Option<Timestamp>,
}

impl RateEwma {
    /// The rate at `now`.
    pub(super) fn rate(&self, now: Timestamp, tau: Duration) -> f64 {
        match self.at {
            None => 0.0,
            Some(at) => self.value * decay(now.saturating_since(at), tau),
        }
    }

    /// Counts one event at `now`. An event older than the last one counts without decay.
    pub(super) fn event(&mut self, now: Timestamp, tau: Duration) {
        let at = self.at.map_or(now, |at| at.max(now));
        self.value = self.rate(now, tau) + 1.0 / secs(tau);
        self.at = Some(at);
    }
}

/// `e^(-dt/tau)`.
fn decay(dt: Duration, tau: Duration) -> f64 {
    (-dt.as_secs_f64() / secs(tau)).exp()
}

/// A window's length in seconds, at least a millisecond so nothing divides by zero.
pub(super) fn secs(d: Duration) -> f64 {
    d.as_secs_f64().max(0.001)
}

/// Arrival rate per hour of the day (UTC), learned day by day.
#[derive(Debug, Clone, Default, PartialEq)]
pub(super) struct DailyProfile {
    /// Per hour of the day: the exponentially weighted arrival rate, per second.
    buckets: [Option<f64>; 24],
    /// The hour (since the epoch) being counted, its arrivals, and since when it is observed.
    current: Option<(u64, u64, Timestamp)>,
}

impl DailyProfile {
    /// Closes the hours that ended before `now`: the hour being counted teaches its bucket (if
    /// enough of it was observed), hours passed without a call taught nothing arrived.
    pub(super) fn roll(&mut self, now: Timestamp) {
        let hour = now.as_millis() / HOUR_MS;
        let Some((current, count, from)) = self.current else {
            self.current = Some((hour, 0, now));
            return;
        };
        if hour <= current {
            return;
        }
        let end = (current + 1).saturating_mul(HOUR_MS);
        let observed_ms = end.saturating_sub(from.as_millis());
        if observed_ms >= MIN_OBSERVED_MS {
            let rate = count as f64 / (observed_ms as f64 / 1000.0);
            self.learn(current, rate);
        }
        // Whole hours with no call at all: nothing arrived (at most a day of them matters).
        let skipped_from = (current + 1).max(hour.saturating_sub(24));
        for h in skipped_from..hour {
            self.learn(h, 0.0);
        }
        self.current = Some((
            hour,
            0,
            Timestamp::from_millis(hour.saturating_mul(HOUR_MS)),
        ));
    }

    /// Counts one arrival at `now`.
    pub(super) fn event(&mut self, now: Timestamp) {
        self.roll(now);
        if let Some((_, count, _)) = &mut self.current {
            *count += 1;
        }
    }

    fn learn(&mut self, hour: u64, rate: f64) {
        let Some(bucket) = self.buckets.get_mut(hour_of_day(hour)) else {
            return;
        };
        *bucket = Some(match *bucket {
            None => rate,
            Some(b) => b + PROFILE_ALPHA * (rate - b),
        });
    }

    /// The highest learned rate of the hours from `now` to `now + ahead`, if any is learned.
    pub(super) fn peak(&self, now: Timestamp, ahead: Duration) -> Option<f64> {
        let first = now.as_millis() / HOUR_MS;
        let last = now.saturating_add(ahead).as_millis() / HOUR_MS;
        let last = last.min(first + 23);
        (first..=last)
            .filter_map(|h| self.buckets.get(hour_of_day(h)).copied().flatten())
            .reduce(f64::max)
    }

    /// Whether any bucket is learned.
    #[cfg(test)]
    pub(super) fn learned(&self) -> bool {
        self.buckets.iter().any(Option::is_some)
    }
}

fn hour_of_day(hour: u64) -> usize {
    usize::try_from(hour % 24).unwrap_or(0)
}

/// Everything the planner knows about the demand of one (region, tier, game).
#[derive(Debug, Clone, Default)]
pub(super) struct DemandState {
    pub(super) short: RateEwma,
    pub(super) long: RateEwma,
    pub(super) profile: DailyProfile,
    /// Mean session length, seconds, once one was observed.
    pub(super) length_s: Option<f64>,
    pub(super) warm_hits: u64,
    pub(super) cold_starts: u64,
    /// The warm buffer last planned (see `warm::settle`).
    pub(super) warm_target: u16,
    /// Rounds in a row the computed buffer has been below `warm_target`.
    pub(super) below_rounds: u32,
}

/// A demand's rates at one moment, per second.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(super) struct Rates {
    pub(super) short: f64,
    pub(super) long: f64,
    /// The daily profile's peak over the look-ahead, where it is used and learned.
    pub(super) profile: Option<f64>,
}

impl Rates {
    /// What the planner plans for: the larger of the windows and the profile.
    pub(super) fn forecast(&self) -> f64 {
        let r = self.short.max(self.long).max(self.profile.unwrap_or(0.0));
        if r.is_finite() { r.max(0.0) } else { 0.0 }
    }
}

impl DemandState {
    /// Counts a request at `now`.
    pub(super) fn request(&mut self, now: Timestamp, short: Duration, long: Duration) {
        self.short.event(now, short);
        self.long.event(now, long);
        self.profile.event(now);
    }

    /// Counts a session that lasted `length`.
    pub(super) fn session_end(&mut self, length: Duration) {
        let l = length.as_secs_f64().min(MAX_LENGTH_S);
        if !l.is_finite() {
            return;
        }
        self.length_s = Some(match self.length_s {
            None => l,
            Some(m) => m + LENGTH_ALPHA * (l - m),
        });
    }

    /// The rates at `now`, with the profile's peak over `now .. now + ahead` if `profile`.
    pub(super) fn rates(
        &self,
        now: Timestamp,
        short: Duration,
        long: Duration,
        profile: Option<Duration>,
    ) -> Rates {
        Rates {
            short: self.short.rate(now, short),
            long: self.long.rate(now, long),
            profile: profile.and_then(|ahead| self.profile.peak(now, ahead)),
        }
    }
}

/// `x` rounded up to a whole number, saturating; 0 for anything not positive or not finite.
pub(super) fn ceil_u32(x: f64) -> u32 {
    if !x.is_finite() || x <= 0.0 {
        0
    } else if x >= f64::from(u32::MAX) {
        u32::MAX
    } else {
        #[allow(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            reason = "finite, positive and below u32::MAX by the checks above"
        )]
        let n = x.ceil() as u32;
        n
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing, reason = "tests")]

    use super::*;

    const T0: Timestamp = Timestamp::from_millis(1_800_000_000_000);

    fn at(s: u64) -> Timestamp {
        T0.saturating_add(Duration::from_secs(s))
    }

    #[test]
    fn a_rate_ewma_converges_to_the_arrival_rate_and_decays() {
        let tau = Duration::from_secs(60);
        let mut r = RateEwma::default();
        assert_eq!(r.rate(T0, tau), 0.0);
        // Two arrivals a second for ten time constants.
        for i in 0..1200 {
            r.event(T0.saturating_add(Duration::from_millis(i * 500)), tau);
        }
        let now = at(600);
        assert!(
            (r.rate(now, tau) - 2.0).abs() < 0.05,
            "{}",
            r.rate(now, tau)
        );
        // One time constant later with no arrivals: e^-1 of it.
        let later = r.rate(at(660), tau);
        assert!((later - 2.0 / std::f64::consts::E).abs() < 0.05, "{later}");
        // An event from the past counts without decaying anything.
        let before = r.rate(at(660), tau);
        r.event(at(10), tau);
        assert!(r.rate(at(660), tau) > before);
    }

    #[test]
    fn a_zero_window_does_not_divide_by_zero() {
        let mut r = RateEwma::default();
        r.event(T0, Duration::ZERO);
        assert!(r.rate(at(1), Duration::ZERO).is_finite());
    }

    #[test]
    fn the_daily_profile_learns_hour_buckets_and_peeks_ahead() {
        let mut p = DailyProfile::default();
        let day0 = (T0.as_millis() / 86_400_000 + 1) * 86_400_000;
        let t = |h: u64, s: u64| Timestamp::from_millis(day0 + h * HOUR_MS + s * 1000);
        // Day one: 360 arrivals in hour 18 (0.1/s), none otherwise.
        p.roll(t(0, 0));
        for i in 0..360 {
            p.event(t(18, i * 10));
        }
        p.roll(t(23, 0));
        assert!(p.learned());
        assert_eq!(p.peak(t(17, 0), Duration::from_secs(60)), Some(0.0));
        let peak = p.peak(t(17, 3590), Duration::from_secs(60)).unwrap();
        assert!((peak - 0.1).abs() < 1e-9, "{peak}");
        // Day two: hour 18 at 0.2/s moves the bucket by PROFILE_ALPHA of the difference.
        for i in 0..720 {
            p.event(t(24 + 18, i * 5));
        }
        p.roll(t(24 + 19, 0));
        let b = p.peak(t(24 + 18, 0), Duration::ZERO).unwrap();
        assert!((b - (0.1 + PROFILE_ALPHA * 0.1)).abs() < 1e-9, "{b}");
    }

    #[test]
    fn a_partly_observed_hour_counts_only_if_long_enough() {
        let mut p = DailyProfile::default();
        let h = T0.as_millis() / HOUR_MS + 1;
        // Started five minutes before the hour's end: too little to learn from.
        p.roll(Timestamp::from_millis((h + 1) * HOUR_MS - 300_000));
        p.event(Timestamp::from_millis((h + 1) * HOUR_MS - 100_000));
        p.roll(Timestamp::from_millis((h + 1) * HOUR_MS + 1));
        assert!(!p.learned());
    }

    #[test]
    fn session_lengths_are_averaged() {
        let mut d = DemandState::default();
        d.session_end(Duration::from_secs(100));
        assert_eq!(d.length_s, Some(100.0));
        d.session_end(Duration::from_secs(200));
        assert!((d.length_s.unwrap() - 110.0).abs() < 1e-9);
    }

    #[test]
    fn ceil_saturates() {
        assert_eq!(ceil_u32(f64::NAN), 0);
        assert_eq!(ceil_u32(-1.0), 0);
        assert_eq!(ceil_u32(0.2), 1);
        assert_eq!(ceil_u32(3.0), 3);
        assert_eq!(ceil_u32(1e20), u32::MAX);
    }
}
