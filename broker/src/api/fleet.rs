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
    Ok(Json(
        views
            .into_iter()
            .map(|n| NodeBody {
                connected: state.broker.connected(&n.node_id),
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
    state.broker.cordon(&node_id(&id)?)?;
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
}

/// Pools per region and tier: free, warm, reserved, active and queued.
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
    Json(
        views
            .into_iter()
            .map(|p| PoolBody {
                region: p.region.to_string(),
                tier: p.tier.to_string(),
                free: p.free,
                warm: p.warm,
                reserved: p.reserved,
                active: p.active,
                queued: p.queued,
            })
            .collect(),
    )
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
