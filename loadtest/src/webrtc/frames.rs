//! Frame and freeze accounting of one stream, without I/O: RTP packets go in with their
//! arrival time, a stream's figures over a window come out.
//!
//! A frame is complete when a packet with the RTP marker bit arrives (the last packet of an
//! H.264 access unit); a marker on a timestamp already counted (a duplicate or a late copy) is
//! not a new frame. Times are offsets from an epoch the caller chose.

use std::collections::VecDeque;
use std::time::Duration;

/// How many recent frame timestamps are kept to recognise a repeated marker.
const RECENT: usize = 16;
/// The shortest gap between two frames that counts as a freeze, whatever the frame rate.
pub const FREEZE_MIN_GAP: Duration = Duration::from_millis(200);
/// A gap longer than this many frame intervals (at the target rate) is a freeze, when that is
/// longer than [`FREEZE_MIN_GAP`].
pub const FREEZE_INTERVALS: u32 = 3;

/// When a gap between two frames is a freeze.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FreezeRule {
    /// A gap longer than this is a freeze.
    pub threshold: Duration,
}

impl FreezeRule {
    /// The rule at `target_fps`: a gap longer than [`FREEZE_INTERVALS`] frame intervals and
    /// than [`FREEZE_MIN_GAP`]. A rate that is not a positive number gives the minimum gap.
    pub fn for_fps(target_fps: f64) -> Self {
        let intervals = if target_fps.is_finite() && target_fps > 0.0 {
            Duration::from_secs_f64(f64::from(FREEZE_INTERVALS) / target_fps)
        } else {
            Duration::ZERO
        };
        Self {
            threshold: intervals.max(FREEZE_MIN_GAP),
        }
    }
}

/// What one stream did over a window.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StreamStats {
    /// Frames completed inside the window.
    pub frames: u64,
    /// Frames per second over the window.
    pub fps: f64,
    /// Gaps longer than the freeze threshold (the window's ends count as frames, so a stream
    /// that stopped is frozen until the window closes).
    pub freezes: u32,
    /// The freezes' gaps added up.
    pub frozen: Duration,
}

/// The frames of one stream, as they arrive.
#[derive(Debug, Clone, Default)]
pub struct FrameLog {
    /// When each frame completed, in arrival order.
    frames: Vec<Duration>,
    /// The RTP timestamps of the newest frames.
    recent: VecDeque<u32>,
    /// Video RTP packets seen.
    packets: u64,
}

impl FrameLog {
    /// An empty log.
    pub fn new() -> Self {
        Self::default()
    }

    /// A video RTP packet arrived at `at` with RTP `timestamp` and `marker` bit. Returns
    /// whether it completed a new frame.
    pub fn handle_packet(&mut self, at: Duration, timestamp: u32, marker: bool) -> bool {
        self.packets += 1;
        if !marker || self.recent.contains(&timestamp) {
            return false;
        }
        if self.recent.len() == RECENT {
            self.recent.pop_front();
        }
        self.recent.push_back(timestamp);
        self.frames.push(at);
        true
    }

    /// Video RTP packets seen.
    pub fn packets(&self) -> u64 {
        self.packets
    }

    /// Frames completed so far.
    pub fn frames(&self) -> u64 {
        self.frames.len() as u64
    }

    /// When the first frame completed.
    pub fn first_frame(&self) -> Option<Duration> {
        self.frames.iter().min().copied()
    }

    /// The stream's figures over `start..end`: frames completed after `start` and at or
    /// before `end`, their rate, and the freezes among the gaps from `start` to the first of
    /// them, between them, and from the last of them to `end`. An empty window (`end` not
    /// after `start`) has no frames and a rate of 0.
    pub fn stats(&self, start: Duration, end: Duration, rule: FreezeRule) -> StreamStats {
        if end <= start {
            return StreamStats::default();
        }
        let mut inside: Vec<Duration> = self
            .frames
            .iter()
            .copied()
            .filter(|t| *t > start && *t <= end)
            .collect();
        // Arrival order is time order for one reader; sorting keeps the gaps right anyway.
        inside.sort_unstable();
        let mut stats = StreamStats {
            frames: inside.len() as u64,
            fps: inside.len() as f64 / (end - start).as_secs_f64(),
            ..StreamStats::default()
        };
        let mut previous = start;
        for t in inside.iter().copied().chain(std::iter::once(end)) {
            let gap = t.saturating_sub(previous);
            if gap > rule.threshold {
                stats.freezes += 1;
                stats.frozen += gap;
            }
            previous = t;
        }
        stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    /// A 30 fps stream of `frames` frames from `from_ms`, each frame two packets (the second
    /// with the marker), RTP clock 90 kHz.
    fn feed(log: &mut FrameLog, from_ms: u64, frames: u64) {
        for i in 0..frames {
            let at = from_ms + i * 100 / 3;
            let ts = u32::try_from(i * 3000).unwrap();
            assert!(!log.handle_packet(ms(at), ts, false));
            assert!(log.handle_packet(ms(at + 1), ts, true));
        }
    }

    #[test]
    fn a_frame_is_a_marker_on_a_new_timestamp() {
        let mut log = FrameLog::new();
        assert!(!log.handle_packet(ms(10), 1000, false));
        assert_eq!(log.first_frame(), None);
        assert!(log.handle_packet(ms(12), 1000, true));
        // The same marker again (a retransmission) and a late copy of it are not frames.
        assert!(!log.handle_packet(ms(13), 1000, true));
        assert!(log.handle_packet(ms(40), 4000, true));
        assert!(!log.handle_packet(ms(41), 1000, true));
        assert_eq!(log.frames(), 2);
        assert_eq!(log.packets(), 5);
        assert_eq!(log.first_frame(), Some(ms(12)));
    }

    #[test]
    fn a_steady_stream_has_its_rate_and_no_freeze() {
        let mut log = FrameLog::new();
        feed(&mut log, 0, 91);
        let s = log.stats(ms(0), ms(3000), FreezeRule::for_fps(30.0));
        assert_eq!(
            s.frames, 90,
            "frames in (0, 3000]: the 91st completes at 3001"
        );
        assert!((s.fps - 30.0).abs() < 1e-9, "{}", s.fps);
        assert_eq!((s.freezes, s.frozen), (0, Duration::ZERO));
    }

    #[test]
    fn gaps_over_the_threshold_are_freezes_and_their_time_adds_up() {
        let rule = FreezeRule::for_fps(30.0);
        assert_eq!(
            rule.threshold, FREEZE_MIN_GAP,
            "3 intervals at 30 fps is 100 ms"
        );
        let mut log = FrameLog::new();
        let mut ts = 0u32;
        let mut frame = |log: &mut FrameLog, at: u64| {
            ts += 3000;
            assert!(log.handle_packet(ms(at), ts, true));
        };
        for at in [0, 33, 66, 100] {
            frame(&mut log, at);
        }
        // 200 ms exactly is not a freeze; 350 ms is.
        frame(&mut log, 300);
        frame(&mut log, 650);
        frame(&mut log, 683);
        // The stream stops: the gap to the window's end (1000) is a freeze too.
        let s = log.stats(ms(0), ms(1000), rule);
        assert_eq!(
            s.frames, 6,
            "the frame at 0 is the window's start, not inside it"
        );
        assert_eq!(s.freezes, 2);
        assert_eq!(s.frozen, ms(350 + 317));
        assert!((s.fps - 6.0).abs() < 1e-9);
    }

    #[test]
    fn a_stream_that_starts_late_in_the_window_was_frozen_until_then() {
        let mut log = FrameLog::new();
        feed(&mut log, 500, 16);
        let s = log.stats(ms(0), ms(1000), FreezeRule::for_fps(30.0));
        assert_eq!(s.freezes, 1);
        assert_eq!(s.frozen, ms(501));
    }

    #[test]
    fn no_frames_is_one_freeze_over_the_window_and_an_empty_window_is_nothing() {
        let log = FrameLog::new();
        let s = log.stats(ms(100), ms(1100), FreezeRule::for_fps(30.0));
        assert_eq!((s.frames, s.freezes, s.frozen), (0, 1, ms(1000)));
        assert_eq!(s.fps, 0.0);
        assert_eq!(
            log.stats(ms(5), ms(5), FreezeRule::for_fps(30.0)),
            StreamStats::default()
        );
    }

    #[test]
    fn the_threshold_follows_slow_rates_and_survives_nonsense() {
        assert_eq!(FreezeRule::for_fps(10.0).threshold, ms(300));
        assert_eq!(FreezeRule::for_fps(0.0).threshold, FREEZE_MIN_GAP);
        assert_eq!(FreezeRule::for_fps(f64::NAN).threshold, FREEZE_MIN_GAP);
    }

    #[test]
    fn arbitrary_packets_never_panic_and_frames_stay_distinct() {
        let mut rng = fastrand::Rng::with_seed(7);
        let mut log = FrameLog::new();
        for _ in 0..10_000 {
            log.handle_packet(ms(rng.u64(0..60_000)), rng.u32(0..64), rng.bool());
        }
        assert!(log.frames() <= log.packets());
        let s = log.stats(
            ms(rng.u64(0..30_000)),
            ms(60_000),
            FreezeRule::for_fps(30.0),
        );
        assert!(s.frames <= log.frames());
    }
}
