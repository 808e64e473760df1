//! The broker's Prometheus metrics. Gauges come from the engine just before each scrape
//! ([`record_state`]); counters and histograms are recorded where things happen. Every name
//! is in [`NAMES`], or in [`POOL_NAMES`] for the pool planner's (most appear after its first
//! round).

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

/// Reservations that took a warm instance, per `region`, `tier` and `game` (as the agent
/// answered).
pub const POOL_WARM_HITS: &str = "framecast_pool_warm_hits_total";
/// Reservations that launched their game cold, per `region`, `tier` and `game`.
pub const POOL_COLD_STARTS: &str = "framecast_pool_cold_starts_total";
/// GPUs given a new vGPU profile, per `cause`: `placement` (a session's placement re-profiled
/// an empty GPU) or `plan` (a pool plan changed a GPU's profile).
pub const POOL_REPROFILES: &str = "framecast_pool_reprofiles_total";
/// Idle warm instances per `region`, `tier` and `game`, as the last planner round observed.
pub const POOL_WARM_IDLE: &str = "framecast_pool_warm_idle_instances";
/// Framebuffer held by idle warm instances over the framebuffer of the region's GPUs, per
/// `region` (0..=1).
pub const POOL_WARM_IDLE_RATIO: &str = "framecast_pool_warm_idle_ratio";
/// The newest pool-plan generation sent to agents.
pub const POOL_PLAN_GENERATION: &str = "framecast_pool_plan_generation";
/// Planned nodes whose agent had not reported its newest plan back at the last round.
pub const POOL_PLAN_LAGGING: &str = "framecast_pool_plan_lagging_nodes";
/// Time one planner round holds the engine, s.
pub const POOL_ROUND_SECONDS: &str = "framecast_pool_round_duration_seconds";
/// Nodes the demand needs, per `region` and GPU `model` (the fleet recommendation).
pub const FLEET_RECOMMENDED_NODES: &str = "framecast_fleet_recommended_nodes";
/// Nodes present, per `region` and GPU `model`, as the recommendation counted them.
pub const FLEET_NODES: &str = "framecast_fleet_nodes";
/// Fleet-recommendation webhook posts that failed (refused, timed out, not 2xx).
pub const FLEET_WEBHOOK_FAILURES: &str = "framecast_fleet_webhook_failures_total";

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

/// The pool planner's metrics. The counters appear with their first event, the gauges after
/// the planner's first round (or, for the ratio, once GPUs are known).
pub const POOL_NAMES: [&str; 11] = [
    POOL_WARM_HITS,
    POOL_COLD_STARTS,
    POOL_REPROFILES,
    POOL_WARM_IDLE,
    POOL_WARM_IDLE_RATIO,
    POOL_PLAN_GENERATION,
    POOL_PLAN_LAGGING,
    POOL_ROUND_SECONDS,
    FLEET_RECOMMENDED_NODES,
    FLEET_NODES,
    FLEET_WEBHOOK_FAILURES,
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
    record_pools(broker, &nodes, &pools);
}

/// The pool planner's gauges: idle warm framebuffer now, and the last round's targets,
/// generation and recommendation.
fn record_pools(
    broker: &Broker,
    nodes: &[crate::placement::views::NodeView],
    pools: &[crate::placement::views::PoolView],
) {
    let mut fb_total = std::collections::BTreeMap::<String, u64>::new();
    for n in nodes {
        *fb_total.entry(n.region.to_string()).or_default() +=
            n.gpus.iter().map(|g| g.framebuffer_mb).sum::<u64>();
    }
    let mut fb_warm = std::collections::BTreeMap::<String, u64>::new();
    for p in pools {
        // A warm instance holds its tier's framebuffer (on an equal-size GPU its vGPU may be
        // larger: the ratio is a lower bound there).
        let per = broker
            .tier_presets()
            .iter()
            .find(|t| t.name == p.tier)
            .map_or(0, |t| t.framebuffer.megabytes().get());
        *fb_warm.entry(p.region.to_string()).or_default() += u64::from(p.warm) * per;
    }
    for (region, total) in fb_total {
        let warm = fb_warm.get(&region).copied().unwrap_or(0);
        let ratio = if total == 0 {
            0.0
        } else {
            warm as f64 / total as f64
        };
        metrics::gauge!(POOL_WARM_IDLE_RATIO, "region" => region).set(ratio);
    }
    let Some(plan) = broker.plan_view() else {
        return;
    };
    metrics::gauge!(POOL_PLAN_GENERATION).set(plan.generation as f64);
    metrics::gauge!(POOL_PLAN_LAGGING).set(plan.lagging as f64);
    for t in &plan.targets {
        metrics::gauge!(
            POOL_WARM_IDLE,
            "region" => t.key.region.to_string(),
            "tier" => t.key.tier.to_string(),
            "game" => t.key.game.to_string(),
        )
        .set(f64::from(t.observed_warm));
    }
    for r in &plan.recommendation {
        let labels = [("region", r.region.to_string()), ("model", r.model.clone())];
        metrics::gauge!(FLEET_RECOMMENDED_NODES, &labels).set(f64::from(r.nodes_needed));
        metrics::gauge!(FLEET_NODES, &labels).set(f64::from(r.nodes_present));
    }
}
