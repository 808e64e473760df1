//! `/v1/nodes`, `/v1/pools` and `/v1/placement/explain`: the fleet as operators see it.

use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use framecast_shared::ids::{NodeId, SessionId, TenantId};
use framecast_shared::time::Timestamp;

use super::problem::Problem;
use super::{ApiState, Caller};
use crate::placement::{PlaceRequest, RegionRtt};
use crate::service::ServiceError;
use crate::service::planning::PlanView;
use crate::service::view::CreateSession;

/// A node, its state and its GPUs.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub(super) struct NodeBody {
    /// The node.
    node_id: String,
    /// Its region.
    region: String,
    /// `ready`, `cordoned`, `draining` or `down`.
    state: String,
    /// An operator cordoned it.
    cordoned: bool,
    /// Its heartbeats are late.
    suspect: bool,
    /// Its agent has a control link now.
    connected: bool,
    /// Its agent's generation.
    generation: u64,
    /// The newest pool-plan generation its agent reports applied (0 before it reported one).
    plan_generation: u64,
    /// The pool-plan generation last sent to it; null while the planner has not planned it.
    /// Equal to `plan_generation` once the agent has the plan.
    plan_generation_sent: Option<u64>,
    /// Its GPUs.
    gpus: Vec<GpuBody>,
}

/// One GPU.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub(super) struct GpuBody {
    /// The GPU.
    gpu: String,
    /// Its model.
    model: String,
    /// `exclusive`, `equal-size`, `mixed-size` or `mig`.
    mode: String,
    /// The vGPU profile its slots use, if any.
    profile: Option<String>,
    /// Usable slots.
    slots: u16,
    /// Slots holding sessions.
    sessions: u16,
    /// Slots holding warm instances.
    warm: u16,
    /// Framebuffer, MB.
    framebuffer_mb: u64,
    /// Framebuffer occupied, MB.
    framebuffer_used_mb: u64,
    /// Encoder units leased.
    encoder_used: f64,
    /// The pool planner steered it away: no new session until it has emptied and changed
    /// profile.
    steered: bool,
}

/// The fleet's nodes.
#[utoipa::path(
    get,
    path = "/v1/nodes",
    tag = "fleet",
    responses(
        (status = 200, body = Vec<NodeBody>),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 403, body = Problem, content_type = "application/problem+json"),
    ),
    security(("api_key" = []))
)]
pub(super) async fn nodes(
    State(state): State<ApiState>,
    Caller(tenant): Caller,
) -> Result<Json<Vec<NodeBody>>, Problem> {
    admin(&tenant)?;
    let views = state.broker.with_engine(|e| e.node_views());
    let plans = state.broker.plan_generations();
    Ok(Json(
        views
            .into_iter()
            .map(|n| NodeBody {
                connected: state.broker.connected(&n.node_id),
                plan_generation: plans.get(&n.node_id).map_or(0, |p| p.1),
                plan_generation_sent: plans.get(&n.node_id).and_then(|p| p.0),
                node_id: n.node_id.to_string(),
                region: n.region.to_string(),
                state: match n.state {
                    framecast_shared::state::NodeState::Ready => "ready",
                    framecast_shared::state::NodeState::Cordoned => "cordoned",
                    framecast_shared::state::NodeState::Draining { .. } => "draining",
                    framecast_shared::state::NodeState::Down => "down",
                }
                .into(),
                cordoned: n.cordoned,
                suspect: n.suspect,
                generation: n.generation,
                gpus: n
                    .gpus
                    .into_iter()
                    .map(|g| GpuBody {
                        gpu: g.gpu.to_string(),
                        model: g.model,
                        mode: g.mode.to_string(),
                        profile: g.profile,
                        slots: g.slots,
                        sessions: g.sessions,
                        warm: g.warm,
                        framebuffer_mb: g.framebuffer_mb,
                        framebuffer_used_mb: g.framebuffer_used_mb,
                        encoder_used: g.encoder_used,
                        steered: g.steered,
                    })
                    .collect(),
            })
            .collect(),
    ))
}

fn admin(tenant: &framecast_shared::config::broker::TenantConfig) -> Result<(), Problem> {
    if tenant.admin {
        Ok(())
    } else {
        Err(ServiceError::Forbidden(format!(
            "tenant {} may not operate nodes (set admin = true on an operator's tenant)",
            tenant.id
        ))
        .into())
    }
}

fn node_id(raw: &str) -> Result<NodeId, Problem> {
    NodeId::new(raw).map_err(|e| Problem::not_found(format!("{raw:?} is not a node id: {e}")))
}

/// Stops placing sessions on a node; running ones go on.
#[utoipa::path(
    post,
    path = "/v1/nodes/{id}/cordon",
    tag = "fleet",
    params(("id" = String, Path, description = "The node id")),
    responses(
        (status = 204, description = "Cordoned"),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 403, body = Problem, content_type = "application/problem+json"),
        (status = 404, body = Problem, content_type = "application/problem+json"),
    ),
    security(("api_key" = []))
)]
pub(super) async fn cordon(
    State(state): State<ApiState>,
    Caller(tenant): Caller,
    Path(id): Path<String>,
) -> Result<StatusCode, Problem> {
    admin(&tenant)?;
    state.broker.cordon(&node_id(&id)?).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Lets a cordoned or draining node take sessions again.
#[utoipa::path(
    post,
    path = "/v1/nodes/{id}/uncordon",
    tag = "fleet",
    params(("id" = String, Path, description = "The node id")),
    responses(
        (status = 204, description = "Uncordoned"),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 403, body = Problem, content_type = "application/problem+json"),
        (status = 404, body = Problem, content_type = "application/problem+json"),
    ),
    security(("api_key" = []))
)]
pub(super) async fn uncordon(
    State(state): State<ApiState>,
    Caller(tenant): Caller,
    Path(id): Path<String>,
) -> Result<StatusCode, Problem> {
    admin(&tenant)?;
    state.broker.uncordon(&node_id(&id)?).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /v1/nodes/{id}/drain` body.
#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct DrainBody {
    /// Running sessions end with `drained` after this many seconds (default 600).
    #[serde(default)]
    deadline_s: Option<u32>,
}

/// Takes no new sessions on a node and ends the running ones at the deadline.
#[utoipa::path(
    post,
    path = "/v1/nodes/{id}/drain",
    tag = "fleet",
    params(("id" = String, Path, description = "The node id")),
    request_body(content = DrainBody, description = "Optional; `{}` or no body drains in 600 s"),
    responses(
        (status = 204, description = "Draining"),
        (status = 400, body = Problem, content_type = "application/problem+json"),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 403, body = Problem, content_type = "application/problem+json"),
        (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 413, body = Problem, content_type = "application/problem+json"),
    ),
    security(("api_key" = []))
)]
pub(super) async fn drain(
    State(state): State<ApiState>,
    Caller(tenant): Caller,
    Path(id): Path<String>,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<StatusCode, Problem> {
    admin(&tenant)?;
    let body = super::problem::body_or_problem(body)?;
    let body: DrainBody = if body.is_empty() {
        DrainBody { deadline_s: None }
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| Problem::bad_request(format!("the body is not a drain request: {e}")))?
    };
    let deadline = Timestamp::now().saturating_add(Duration::from_secs(u64::from(
        body.deadline_s.unwrap_or(600),
    )));
    state.broker.drain(&node_id(&id)?, deadline).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// One (region, tier) pool.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub(super) struct PoolBody {
    /// The region.
    region: String,
    /// The tier.
    tier: String,
    /// More sessions of this tier that fit now.
    free: u32,
    /// Idle warm instances of this tier.
    warm: u32,
    /// Sessions reserved, not yet playing.
    reserved: u32,
    /// Sessions connecting, playing or reconnecting.
    active: u32,
    /// Requests waiting.
    queued: u32,
    /// The pool planner's last plan generation; null while the planner is off or has not
    /// run a round yet (then `targets` and `profiles` are empty).
    plan_generation: Option<u64>,
    /// Plan vs observed per game of this pool, as of the planner's last round.
    targets: Vec<TargetBody>,
    /// GPUs holding this tier's profile, per GPU model: planned vs observed.
    profiles: Vec<ProfileBody>,
}

/// Warm instances of one game in one (region, tier): what the planner wants and what the
/// agents report.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub(super) struct TargetBody {
    /// The region.
    region: String,
    /// The tier.
    tier: String,
    /// The game.
    game: String,
    /// Requests per second planned for over the next launch window.
    forecast_rate: f64,
    /// Warm instances the planner wants.
    desired_warm: u32,
    /// Warm instances the plans sent to agents ask for (below `desired_warm` while GPUs with
    /// room are missing, or the round's change limit held some back).
    planned_warm: u32,
    /// Idle warm instances the agents report.
    observed_warm: u32,
    /// Requests waiting.
    queued: u32,
    /// Placements onto a warm instance, since the broker started.
    warm_hits: u64,
    /// Placements that launched their game cold, since the broker started.
    cold_starts: u64,
}

/// GPUs of one model holding one tier's profile in a region: planned vs observed.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub(super) struct ProfileBody {
    /// The region.
    region: String,
    /// The GPU model.
    model: String,
    /// The tier whose profile the GPUs hold.
    tier: String,
    /// The vGPU profile serving the tier on the model, if the model has one.
    profile: Option<String>,
    /// GPUs the plan gives this profile.
    gpus_planned: u32,
    /// GPUs the agents report holding it.
    gpus_observed: u32,
    /// GPUs of this profile steered away (taking no new session) to empty for another tier.
    gpus_steered: u32,
}

/// Nodes of one GPU model a region's demand needs: the fleet recommendation for a
/// node-pool autoscaler.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub(super) struct RecommendationBody {
    /// The region.
    region: String,
    /// The GPU model.
    model: String,
    /// Nodes with this model the forecast peak needs (with the warm buffer).
    nodes_needed: u32,
    /// Nodes with this model taking sessions now.
    nodes_present: u32,
    /// GPUs of the model the peak needs.
    gpus_needed: u32,
    /// GPUs of the model usable now.
    gpus_present: u32,
    /// GPUs per node of the model, as the fleet has them.
    gpus_per_node: u32,
}

/// What the pool planner has counted since the broker started.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub(super) struct PlannerCountersBody {
    /// Placements that took a warm instance.
    warm_hits: u64,
    /// Placements that launched their game cold.
    cold_starts: u64,
    /// Re-profiles started: GPUs steered away to empty, and empty GPUs planned from one
    /// profile to another.
    steered: u64,
    /// Rounds run.
    rounds: u64,
}

/// The pool planner's last round.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub(super) struct PlanBody {
    /// Whether the planner runs (`planner.enabled`).
    enabled: bool,
    /// The generation its plans were sent with; agents report it back (see `GET /v1/nodes`).
    /// Null before the first round.
    plan_generation: Option<u64>,
    /// When the round ran (RFC 3339); null before the first round.
    generated_at: Option<String>,
    /// GPU changes the round made.
    changes: u64,
    /// The planner's counters, up to now (not only to the round); null while it is off.
    counters: Option<PlannerCountersBody>,
    /// Plan vs observed per region, tier and game, as of the round.
    targets: Vec<TargetBody>,
    /// GPUs per region, model and tier profile: planned vs observed.
    profiles: Vec<ProfileBody>,
    /// Nodes needed per region and GPU model.
    recommendation: Vec<RecommendationBody>,
}

/// Pools per region and tier: free, warm, reserved, active and queued, with the pool
/// planner's targets and profiles for each.
#[utoipa::path(
    get,
    path = "/v1/pools",
    tag = "fleet",
    responses(
        (status = 200, body = Vec<PoolBody>),
        (status = 401, body = Problem, content_type = "application/problem+json"),
    ),
    security(("api_key" = []))
)]
pub(super) async fn pools(
    State(state): State<ApiState>,
    Caller(_tenant): Caller,
) -> Json<Vec<PoolBody>> {
    let views = state.broker.with_engine(|e| e.pool_views());
    let plan = state.broker.plan_view();
    let plan = plan.as_deref();
    Json(
        views
            .into_iter()
            .map(|p| {
                let region = p.region.to_string();
                let tier = p.tier.to_string();
                PoolBody {
                    plan_generation: plan.map(|v| v.generation),
                    targets: plan
                        .map(|v| targets(v, Some((&region, &tier))))
                        .unwrap_or_default(),
                    profiles: plan
                        .map(|v| profiles(v, Some((&region, &tier))))
                        .unwrap_or_default(),
                    region,
                    tier,
                    free: p.free,
                    warm: p.warm,
                    reserved: p.reserved,
                    active: p.active,
                    queued: p.queued,
                }
            })
            .collect(),
    )
}

/// The pool planner's last round: plan vs observed per region, tier and game, GPUs per
/// profile, the fleet recommendation, and the planner's counters. Operators only: it sizes
/// the fleet.
#[utoipa::path(
    get,
    path = "/v1/pools/plan",
    tag = "fleet",
    responses(
        (status = 200, body = PlanBody),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 403, body = Problem, content_type = "application/problem+json"),
    ),
    security(("api_key" = []))
)]
pub(super) async fn plan(
    State(state): State<ApiState>,
    Caller(tenant): Caller,
) -> Result<Json<PlanBody>, Problem> {
    admin(&tenant)?;
    let enabled = state.broker.planner_enabled();
    let counters = state
        .broker
        .planner_counters()
        .map(|c| PlannerCountersBody {
            warm_hits: c.warm_hits,
            cold_starts: c.cold_starts,
            steered: c.steered,
            rounds: c.rounds,
        });
    let Some(v) = state.broker.plan_view() else {
        return Ok(Json(PlanBody {
            enabled,
            plan_generation: None,
            generated_at: None,
            changes: 0,
            counters,
            targets: Vec::new(),
            profiles: Vec::new(),
            recommendation: Vec::new(),
        }));
    };
    Ok(Json(PlanBody {
        enabled,
        plan_generation: Some(v.generation),
        generated_at: Some(v.generated_at.rfc3339()),
        changes: u64::try_from(v.changes).unwrap_or(u64::MAX),
        counters,
        targets: targets(&v, None),
        profiles: profiles(&v, None),
        recommendation: v
            .recommendation
            .iter()
            .map(|r| RecommendationBody {
                region: r.region.to_string(),
                model: r.model.clone(),
                nodes_needed: r.nodes_needed,
                nodes_present: r.nodes_present,
                gpus_needed: r.gpus_needed,
                gpus_present: r.gpus_present,
                gpus_per_node: r.gpus_per_node,
            })
            .collect(),
    }))
}

/// The plan's targets, of one (region, tier) pool or all.
fn targets(v: &PlanView, pool: Option<(&str, &str)>) -> Vec<TargetBody> {
    v.targets
        .iter()
        .filter(|t| {
            pool.is_none_or(|(r, tier)| t.key.region.as_str() == r && t.key.tier.as_str() == tier)
        })
        .map(|t| TargetBody {
            region: t.key.region.to_string(),
            tier: t.key.tier.to_string(),
            game: t.key.game.to_string(),
            forecast_rate: t.forecast_rate,
            desired_warm: u32::from(t.desired_warm),
            planned_warm: t.planned_warm,
            observed_warm: t.observed_warm,
            queued: t.queued,
            warm_hits: t.warm_hits,
            cold_starts: t.cold_starts,
        })
        .collect()
}

/// The plan's profiles, of one (region, tier) pool or all.
fn profiles(v: &PlanView, pool: Option<(&str, &str)>) -> Vec<ProfileBody> {
    v.profiles
        .iter()
        .filter(|p| pool.is_none_or(|(r, tier)| p.region.as_str() == r && p.tier.as_str() == tier))
        .map(|p| ProfileBody {
            region: p.region.to_string(),
            model: p.model.clone(),
            tier: p.tier.to_string(),
            profile: p.profile.clone(),
            gpus_planned: p.gpus_planned,
            gpus_observed: p.gpus_observed,
            gpus_steered: p.gpus_steered,
        })
        .collect()
}

/// A dry run of placement: where a request would go and why, with every candidate's score.
/// Nothing is reserved. Operators only: it shows the fleet's nodes and GPUs.
#[utoipa::path(
    post,
    path = "/v1/placement/explain",
    tag = "fleet",
    request_body = CreateSession,
    responses(
        (status = 200, description = "The engine's explanation: attempts, candidates with score breakdowns, and the decision", body = serde_json::Value),
        (status = 400, body = Problem, content_type = "application/problem+json"),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 403, body = Problem, content_type = "application/problem+json"),
        (status = 413, body = Problem, content_type = "application/problem+json"),
        (status = 422, body = Problem, content_type = "application/problem+json"),
    ),
    security(("api_key" = []))
)]
pub(super) async fn explain(
    State(state): State<ApiState>,
    Caller(tenant): Caller,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Json<serde_json::Value>, Problem> {
    admin(&tenant)?;
    let body = super::problem::body_or_problem(body)?;
    let request: CreateSession = serde_json::from_slice(&body)
        .map_err(|e| Problem::bad_request(format!("the body is not a session request: {e}")))?;
    let (game, tier, genre, regions) = state.broker.resolve(&request)?;
    let place = PlaceRequest {
        session_id: SessionId::new(Timestamp::now(), 0),
        tenant: TenantId::clone(&tenant.id),
        game,
        tier,
        genre,
        priority: crate::service::parse_priority(request.priority.as_deref())?,
        regions: regions
            .into_iter()
            .map(|(region, rtt_ms)| RegionRtt { region, rtt_ms })
            .collect(),
        fallbacks: crate::service::parse_fallbacks(&request.fallbacks)?,
        queue: request.queue.unwrap_or(true),
    };
    let explanation = state.broker.with_engine(|e| e.explain(&place));
    serde_json::to_value(&explanation)
        .map(Json)
        .map_err(|e| ServiceError::Internal(e.to_string()).into())
}
