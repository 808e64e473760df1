//! The broker's Prometheus metrics. Gauges come from the engine just before each scrape
//! ([`record_state`]); counters and histograms are recorded where things happen. Every name
//! is in [`NAMES`].

use crate::service::Broker;

/// Allocation requests answered, per `outcome` (`reserved`, `queued`, `unavailable`,
/// `rejected`).
pub const ALLOCATIONS: &str = "framecast_broker_allocations_total";
/// Time to answer `POST /v1/sessions`, s.
pub const ALLOCATION_SECONDS: &str = "framecast_broker_allocation_duration_seconds";
/// Sessions ended, per `reason`.
pub const SESSIONS_ENDED: &str = "framecast_broker_sessions_ended_total";
/// Agent connections accepted.
pub const AGENT_CONNECTS: &str = "framecast_broker_agent_connects_total";
/// Sessions tracked, per `state`.
pub const SESSIONS: &str = "framecast_broker_sessions";
/// Requests waiting, per `tier`.
pub const QUEUE_DEPTH: &str = "framecast_broker_queue_depth";
/// Nodes per `state` (`ready`, `cordoned`, `draining`, `down`, `suspect`).
pub const NODES: &str = "framecast_broker_nodes";
/// Agents with a live control link.
pub const AGENTS_CONNECTED: &str = "framecast_broker_agents_connected";
/// More sessions that fit now, per `region` and `tier`.
pub const POOL_FREE: &str = "framecast_broker_pool_free_sessions";
/// Idle warm instances, per `region` and `tier`.
pub const POOL_WARM: &str = "framecast_broker_pool_warm_instances";
/// Framebuffer of the fleet's GPUs, MB.
pub const FRAMEBUFFER_TOTAL: &str = "framecast_broker_framebuffer_total_megabytes";
/// Framebuffer occupied, MB.
pub const FRAMEBUFFER_USED: &str = "framecast_broker_framebuffer_used_megabytes";
/// Framebuffer occupied, per `node` and `gpu`, MB.
pub const GPU_FRAMEBUFFER_USED: &str = "framecast_broker_gpu_framebuffer_used_megabytes";
/// Encoder units in use over the fleet.
pub const ENCODER_USED: &str = "framecast_broker_encoder_used_units";
/// Encoder units of the fleet.
pub const ENCODER_TOTAL: &str = "framecast_broker_encoder_total_units";

/// Every metric the broker exports.
pub const NAMES: [&str; 15] = [
    ALLOCATIONS,
    ALLOCATION_SECONDS,
    SESSIONS_ENDED,
    AGENT_CONNECTS,
    SESSIONS,
    QUEUE_DEPTH,
    NODES,
    AGENTS_CONNECTED,
    POOL_FREE,
    POOL_WARM,
    FRAMEBUFFER_TOTAL,
    FRAMEBUFFER_USED,
    GPU_FRAMEBUFFER_USED,
    ENCODER_USED,
    ENCODER_TOTAL,
];

/// Sets the gauges from the broker's state.
pub fn record_state(broker: &Broker) {
    let (stats, nodes, pools) = broker.with_engine(|e| (e.stats(), e.node_views(), e.pool_views()));
    metrics::gauge!(FRAMEBUFFER_TOTAL).set(stats.fb_total_mb as f64);
    metrics::gauge!(FRAMEBUFFER_USED).set(stats.fb_used_mb as f64);
    metrics::gauge!(ENCODER_TOTAL).set(stats.encoder_total as f64 / 1000.0);
    metrics::gauge!(ENCODER_USED).set(stats.encoder_used as f64 / 1000.0);
    let mut by_state = std::collections::BTreeMap::<&str, u32>::new();
    for s in ["ready", "cordoned", "draining", "down", "suspect"] {
        by_state.insert(s, 0);
    }
    for n in &nodes {
        let state = if n.suspect {
            "suspect"
        } else {
            match n.state {
                framecast_shared::state::NodeState::Ready => "ready",
                framecast_shared::state::NodeState::Cordoned => "cordoned",
                framecast_shared::state::NodeState::Draining { .. } => "draining",
                framecast_shared::state::NodeState::Down => "down",
            }
        };
        *by_state.entry(state).or_default() += 1;
        for g in &n.gpus {
            metrics::gauge!(GPU_FRAMEBUFFER_USED, "node" => n.node_id.to_string(), "gpu" => g.gpu.to_string())
                .set(g.framebuffer_used_mb as f64);
        }
    }
    for (state, n) in by_state {
        metrics::gauge!(NODES, "state" => state).set(f64::from(n));
    }
    metrics::gauge!(AGENTS_CONNECTED).set(
        nodes
            .iter()
            .filter(|n| broker.connected(&n.node_id))
            .count() as f64,
    );
    let mut queued = std::collections::BTreeMap::<String, u32>::new();
    for p in &pools {
        let labels = [
            ("region", p.region.to_string()),
            ("tier", p.tier.to_string()),
        ];
        metrics::gauge!(POOL_FREE, &labels).set(f64::from(p.free));
        metrics::gauge!(POOL_WARM, &labels).set(f64::from(p.warm));
        *queued.entry(p.tier.to_string()).or_default() += p.queued;
    }
    for (tier, n) in queued {
        metrics::gauge!(QUEUE_DEPTH, "tier" => tier).set(f64::from(n));
    }
    for (state, n) in broker.session_counts() {
        metrics::gauge!(SESSIONS, "state" => state).set(n as f64);
    }
}
