//! The software stream's figures for `docs/BENCHMARKS.md`: what one picture of the synthetic
//! game costs to render and encode, and how many paced streams one core holds.
//!
//! `taskset -c 0 cargo bench -p framecast-agent --bench stream_figures`
//!
//! Pinning to one core is what makes the second figure "per core". Each stream is the real
//! pipeline's work without the network: the synthetic scene rendered into I420 and encoded by
//! OpenH264 at the tier's bitrate, paced at the stream's frame rate on its own thread. A
//! stream "holds" when it delivers at least 97% of its frame rate. `FRAMECAST_BENCH_TIER`
//! (`720p`, `1080p`), `FRAMECAST_BENCH_FPS` (30) and `FRAMECAST_BENCH_SECONDS` (5) change the
//! run.

// A benchmark is a test of sorts: a failed unwrap is a failed run.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stdout,
    clippy::indexing_slicing,
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss
)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use framecast_agent::stream::encode::{EncoderSettings, SoftwareH264, VideoEncoder};
use framecast_agent::stream::scene::{I420Frame, SyntheticScene};
use framecast_shared::tier::TierPreset;

fn env<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let tier_name: String = env("FRAMECAST_BENCH_TIER", "720p".to_owned());
    let fps: u16 = env("FRAMECAST_BENCH_FPS", 30);
    let seconds: u64 = env("FRAMECAST_BENCH_SECONDS", 5);
    let tier = TierPreset::defaults()
        .into_iter()
        .find(|t| t.name.as_str() == tier_name)
        .unwrap_or_else(|| panic!("no tier {tier_name}"));
    let settings = EncoderSettings {
        width: tier.resolution.width,
        height: tier.resolution.height,
        fps,
        bitrate_kbps: tier.bitrate_kbps,
    };
    println!(
        "software stream: {}x{} at {fps} fps, {} kbit/s, OpenH264 one thread per stream",
        settings.width, settings.height, settings.bitrate_kbps
    );

    // 1. One picture: render + encode, back to back, after a warm-up.
    let mut scene = SyntheticScene::new(settings.width, settings.height).unwrap();
    let mut frame = I420Frame::new(settings.width, settings.height).unwrap();
    let mut encoder = SoftwareH264::new(settings).unwrap();
    let mut render = Histogram::<u64>::new(3).unwrap();
    let mut encode = Histogram::<u64>::new(3).unwrap();
    let mut bytes = 0usize;
    for n in 0..330u64 {
        let t0 = Instant::now();
        scene.render(n, &mut frame).unwrap();
        let t1 = Instant::now();
        let out = encoder.encode(&frame, n == 30).unwrap();
        let t2 = Instant::now();
        if n >= 30 {
            render
                .record(t1.duration_since(t0).as_micros() as u64)
                .unwrap();
            encode
                .record(t2.duration_since(t1).as_micros() as u64)
                .unwrap();
            bytes += out.data.len();
        }
    }
    let ms = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    println!(
        "one picture over 300: render p50 {:.2} ms p99 {:.2} ms; encode p50 {:.2} ms p99 {:.2} ms mean {:.2} ms; {:.0} kbit/s at {fps} fps",
        ms(&render, 0.5),
        ms(&render, 0.99),
        ms(&encode, 0.5),
        ms(&encode, 0.99),
        encode.mean() / 1000.0,
        bytes as f64 * 8.0 / 300.0 * f64::from(fps) / 1000.0,
    );

    // 2. N paced streams at once, N = 1, 2, ... until one falls below 97% of its rate.
    let mut held = 0;
    for n in 1..=16 {
        let achieved = run_streams(n, settings, Duration::from_secs(seconds));
        let worst = achieved.iter().copied().fold(f64::INFINITY, f64::min);
        let mean = achieved.iter().sum::<f64>() / achieved.len() as f64;
        println!("{n} stream(s): mean {mean:.1} fps, worst {worst:.1} fps (of {fps})");
        if worst < 0.97 * f64::from(fps) {
            break;
        }
        held = n;
    }
    println!("streams held at {fps} fps: {held}");
}

/// Runs `n` paced streams for `length`; returns each one's delivered frame rate.
fn run_streams(n: usize, settings: EncoderSettings, length: Duration) -> Vec<f64> {
    let stop = Arc::new(AtomicBool::new(false));
    let counts: Vec<Arc<AtomicU64>> = (0..n).map(|_| Arc::new(AtomicU64::new(0))).collect();
    let threads: Vec<_> = counts
        .iter()
        .map(|count| {
            let (stop, count) = (Arc::clone(&stop), Arc::clone(count));
            std::thread::spawn(move || {
                let mut scene = SyntheticScene::new(settings.width, settings.height).unwrap();
                let mut frame = I420Frame::new(settings.width, settings.height).unwrap();
                let mut encoder = SoftwareH264::new(settings).unwrap();
                let interval = Duration::from_secs(1) / u32::from(settings.fps);
                let mut next = Instant::now();
                let mut number = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    scene.render(number, &mut frame).unwrap();
                    let _ = encoder.encode(&frame, false).unwrap();
                    count.fetch_add(1, Ordering::Relaxed);
                    number += 1;
                    next += interval;
                    let now = Instant::now();
                    if next > now {
                        std::thread::sleep(next - now);
                    } else if now > next + interval {
                        // Behind: skip, as the real pipeline does.
                        next = now;
                    }
                }
            })
        })
        .collect();
    // The first second warms the encoders up; count the rest.
    std::thread::sleep(Duration::from_secs(1));
    let start: Vec<u64> = counts.iter().map(|c| c.load(Ordering::Relaxed)).collect();
    let t0 = Instant::now();
    std::thread::sleep(length);
    let secs = t0.elapsed().as_secs_f64();
    let out = counts
        .iter()
        .zip(start)
        .map(|(c, s)| (c.load(Ordering::Relaxed) - s) as f64 / secs)
        .collect();
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    out
}
