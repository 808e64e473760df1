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

/// Every metric the agent exports.
pub const NAMES: [&str; 12] = [
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
];

/// Sets the gauges from the core's state and the link's.
pub fn record_state(core: &AgentCore, link: &LinkState) {
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
