//! The agent's Prometheus metrics.
//!
//! Gauges are computed from the core's state just before each scrape ([`record_state`]), so
//! they cannot drift from it; counters are incremented where the events happen. Every name is
//! listed in [`NAMES`], which the operations docs and dashboards are checked against.

use framecast_shared::protocol::Message;

use crate::core::AgentCore;
use crate::link::LinkState;

/// Framebuffer of the GPU, MiB, per `gpu`.
pub const FRAMEBUFFER_TOTAL: &str = "framecast_agent_framebuffer_total_megabytes";
/// Framebuffer held by vGPUs, MiB, per `gpu`.
pub const FRAMEBUFFER_USED: &str = "framecast_agent_framebuffer_used_megabytes";
/// Encoder throughput of the GPU, in units (one unit: one 1080p60 H.264 stream), per `gpu`.
pub const ENCODER_CAPACITY: &str = "framecast_agent_encoder_capacity_units";
/// Encoder throughput leased by streams, per `gpu`.
pub const ENCODER_USED: &str = "framecast_agent_encoder_used_units";
/// Encoder leases held, per `gpu`.
pub const ENCODER_SESSIONS: &str = "framecast_agent_encoder_sessions";
/// Game instances per `tier` and `state` (`warm`, `active`).
pub const INSTANCES: &str = "framecast_agent_instances";
/// Sessions the node holds.
pub const SESSIONS: &str = "framecast_agent_sessions";
/// 1 while the control link is up.
pub const LINK_UP: &str = "framecast_agent_link_up";
/// 1 while the node drains.
pub const DRAINING: &str = "framecast_agent_draining";
/// Reservations answered, per `outcome` (`warm`, `cold`, `rejected`).
pub const RESERVATIONS: &str = "framecast_agent_reservations_total";
/// Sessions ended on the node, per `reason`.
pub const SESSIONS_ENDED: &str = "framecast_agent_sessions_ended_total";
/// Game instances that exited unasked, per `state` (`warm`, `active`).
pub const INSTANCE_CRASHES: &str = "framecast_agent_instance_crashes_total";

/// Frames per second a stream sends, per `session_id`.
pub const STREAM_FPS: &str = "framecast_stream_fps";
/// Video bitrate a stream sends, bit/s, per `session_id`.
pub const STREAM_BITRATE: &str = "framecast_stream_bitrate_bits_per_second";
/// Round-trip time to the player, seconds, per `session_id` (RTCP receiver reports, else ICE).
pub const STREAM_RTT: &str = "framecast_stream_rtt_seconds";
/// Fraction of packets lost in the player's latest report, per `session_id`.
pub const STREAM_LOSS: &str = "framecast_stream_loss_ratio";
/// Encoder units a stream holds (one unit: one 1080p60 H.264 stream), per `session_id`.
pub const STREAM_ENCODER_UNITS: &str = "framecast_stream_encoder_units";
/// Share of a frame interval spent rendering and encoding, per `session_id`; near 1 the
/// stream cannot keep its frame rate.
pub const STREAM_BUSY: &str = "framecast_stream_busy_ratio";
/// Streams running on the node.
pub const STREAMS: &str = "framecast_stream_streams";
/// WHEP offers, per `outcome` (`answered`, or the HTTP status refusing it).
pub const STREAM_OFFERS: &str = "framecast_stream_offers_total";
/// Offer → connected (ICE and DTLS done), seconds.
pub const STREAM_CONNECT: &str = "framecast_stream_connect_seconds";
/// Input events from players, per `kind`.
pub const STREAM_INPUTS: &str = "framecast_stream_input_events_total";
/// Input messages dropped as malformed.
pub const STREAM_INPUT_REJECTED: &str = "framecast_stream_input_rejected_total";
/// Pictures skipped because a stream fell behind its frame rate.
pub const STREAM_LATE_FRAMES: &str = "framecast_stream_late_frames_total";

/// Every metric the agent exports.
pub const NAMES: [&str; 24] = [
    FRAMEBUFFER_TOTAL,
    FRAMEBUFFER_USED,
    ENCODER_CAPACITY,
    ENCODER_USED,
    ENCODER_SESSIONS,
    INSTANCES,
    SESSIONS,
    LINK_UP,
    DRAINING,
    RESERVATIONS,
    SESSIONS_ENDED,
    INSTANCE_CRASHES,
    STREAM_FPS,
    STREAM_BITRATE,
    STREAM_RTT,
    STREAM_LOSS,
    STREAM_ENCODER_UNITS,
    STREAM_BUSY,
    STREAMS,
    STREAM_OFFERS,
    STREAM_CONNECT,
    STREAM_INPUTS,
    STREAM_INPUT_REJECTED,
    STREAM_LATE_FRAMES,
];

/// Sets the gauges from the core's state, the link's and the number of live `streams`.
pub fn record_state(core: &AgentCore, link: &LinkState, streams: usize) {
    metrics::gauge!(STREAMS).set(streams as f64);
    for g in core.gpu_gauges() {
        let gpu = g.gpu.to_string();
        metrics::gauge!(FRAMEBUFFER_TOTAL, "gpu" => gpu.clone())
            .set(g.framebuffer_total.get() as f64);
        metrics::gauge!(FRAMEBUFFER_USED, "gpu" => gpu.clone())
            .set(g.framebuffer_used.get() as f64);
        metrics::gauge!(ENCODER_CAPACITY, "gpu" => gpu.clone()).set(g.encoder.capacity.as_f64());
        metrics::gauge!(ENCODER_USED, "gpu" => gpu.clone()).set(g.encoder.used.as_f64());
        metrics::gauge!(ENCODER_SESSIONS, "gpu" => gpu).set(f64::from(g.encoder.sessions));
    }
    for (tier, warm, active) in core.instance_counts() {
        metrics::gauge!(INSTANCES, "tier" => tier.to_string(), "state" => "warm")
            .set(f64::from(warm));
        metrics::gauge!(INSTANCES, "tier" => tier.to_string(), "state" => "active")
            .set(f64::from(active));
    }
    metrics::gauge!(SESSIONS).set(core.session_count() as f64);
    metrics::gauge!(LINK_UP).set(if *link == LinkState::Connected {
        1.0
    } else {
        0.0
    });
    metrics::gauge!(DRAINING).set(if core.draining().is_some() { 1.0 } else { 0.0 });
}

/// Counts a reservation's answer.
pub(crate) fn reservation(reply: &Message) {
    let outcome = match reply {
        Message::Reserved(r) if r.warm => "warm",
        Message::Reserved(_) => "cold",
        _ => "rejected",
    };
    metrics::counter!(RESERVATIONS, "outcome" => outcome).increment(1);
}

/// Counts a WHEP offer's outcome.
pub(crate) fn stream_offer(outcome: &'static str) {
    metrics::counter!(STREAM_OFFERS, "outcome" => outcome).increment(1);
}

/// Records how long a player took from offer to connected.
pub(crate) fn stream_connected(after: std::time::Duration) {
    metrics::histogram!(STREAM_CONNECT).record(after.as_secs_f64());
}

/// Counts one input event of `kind`.
pub(crate) fn stream_input(kind: &'static str) {
    metrics::counter!(STREAM_INPUTS, "kind" => kind).increment(1);
}

/// Counts a malformed input message.
pub(crate) fn stream_input_rejected() {
    metrics::counter!(STREAM_INPUT_REJECTED).increment(1);
}

/// Turns a stream's counters into per-second rates, once a second.
///
/// The per-stream gauges carry a `session_id` label; the exporter drops a series a while after
/// its stream stops updating it, so ended sessions do not pile up.
#[derive(Debug, Default)]
pub(crate) struct StreamRates {
    last: Option<(std::time::Instant, u64, u64, u64, u64)>,
}

impl StreamRates {
    /// Records the stream's figures now.
    pub(crate) fn record(
        &mut self,
        session: &framecast_shared::ids::SessionId,
        counters: &crate::stream::pipeline::PipelineCounters,
        peer: &crate::stream::rtc::PeerStats,
        encoder_milli: u32,
    ) {
        use std::sync::atomic::Ordering::Relaxed;
        let now = std::time::Instant::now();
        let frames = counters.frames.load(Relaxed);
        let bytes = counters.bytes.load(Relaxed);
        let busy_us = counters.busy_us.load(Relaxed);
        let late = counters.late.load(Relaxed);
        let id = session.to_string();
        if let Some((then, f0, b0, u0, l0)) = self.last {
            let secs = now.duration_since(then).as_secs_f64().max(1e-3);
            let fps = frames.saturating_sub(f0) as f64 / secs;
            metrics::gauge!(STREAM_FPS, "session_id" => id.clone()).set(fps);
            metrics::gauge!(STREAM_BITRATE, "session_id" => id.clone())
                .set(bytes.saturating_sub(b0) as f64 * 8.0 / secs);
            metrics::gauge!(STREAM_BUSY, "session_id" => id.clone())
                .set(busy_us.saturating_sub(u0) as f64 / 1e6 / secs);
            metrics::counter!(STREAM_LATE_FRAMES).increment(late.saturating_sub(l0));
        }
        if let Some(rtt) = peer.rtt_s {
            metrics::gauge!(STREAM_RTT, "session_id" => id.clone()).set(rtt);
        }
        metrics::gauge!(STREAM_LOSS, "session_id" => id.clone()).set(peer.fraction_lost);
        metrics::gauge!(STREAM_ENCODER_UNITS, "session_id" => id)
            .set(f64::from(encoder_milli) / 1000.0);
        self.last = Some((now, frames, bytes, busy_us, late));
    }
}
