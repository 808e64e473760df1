//! `/v1/sessions`: allocate, look up, list, end, and follow sessions.

use std::convert::Infallible;
use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::stream::{self, Stream};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use framecast_shared::ids::SessionId;

use super::problem::Problem;
use super::{ApiState, Caller};
use crate::service::tenants::sha256;
use crate::service::view::{CreateSession, SessionView};
use crate::service::{Created, SessionFilter};

/// Allocates a session: a GPU slot now (201) or a place in the queue (202).
#[utoipa::path(
    post,
    path = "/v1/sessions",
    tag = "sessions",
    request_body = CreateSession,
    params(("Idempotency-Key" = Option<String>, Header, description = "Retries with the same key and body return the same session")),
    responses(
        (status = 201, description = "A slot is reserved: connect to `whep_url` with `token`", body = SessionView),
        (status = 202, description = "Queued: follow `/v1/sessions/{id}/events`", body = SessionView),
        (status = 400, description = "Malformed body", body = Problem, content_type = "application/problem+json"),
        (status = 401, description = "No or bad API key", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "Idempotency key reused with another body", body = Problem, content_type = "application/problem+json"),
        (status = 413, description = "Body too large", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "Unknown game, tier, genre or region", body = Problem, content_type = "application/problem+json"),
        (status = 429, description = "Tenant rate or session quota", body = Problem, content_type = "application/problem+json"),
        (status = 503, description = "No capacity and queueing not allowed", body = Problem, content_type = "application/problem+json"),
    ),
    security(("api_key" = []))
)]
pub(super) async fn create(
    State(state): State<ApiState>,
    Caller(tenant): Caller,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, Problem> {
    let body = super::problem::body_or_problem(body)?;
    let request: CreateSession = serde_json::from_slice(&body)
        .map_err(|e| Problem::bad_request(format!("the body is not a session request: {e}")))?;
    let key = match headers.get("idempotency-key") {
        None => None,
        Some(v) => Some(
            v.to_str()
                .map_err(|_| Problem::bad_request("Idempotency-Key must be visible ASCII"))?
                .to_owned(),
        ),
    };
    let (created, view) = state
        .broker
        .create_session(&tenant, request, sha256(&body), key)
        .await?;
    let status = match created {
        Created::Reserved => StatusCode::CREATED,
        Created::Queued => StatusCode::ACCEPTED,
    };
    let location = format!("/v1/sessions/{}", view.session_id);
    Ok((status, [("location", location)], Json(view)).into_response())
}

fn session_id(raw: &str) -> Result<SessionId, Problem> {
    raw.parse()
        .map_err(|_| Problem::not_found(format!("{raw:?} is not a session id")))
}

/// One session, live or ended.
#[utoipa::path(
    get,
    path = "/v1/sessions/{id}",
    tag = "sessions",
    params(("id" = String, Path, description = "The session id")),
    responses(
        (status = 200, body = SessionView),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 404, body = Problem, content_type = "application/problem+json"),
    ),
    security(("api_key" = []))
)]
pub(super) async fn get_one(
    State(state): State<ApiState>,
    Caller(tenant): Caller,
    Path(id): Path<String>,
) -> Result<Json<SessionView>, Problem> {
    let id = session_id(&id)?;
    state
        .broker
        .session_view(&tenant.id, &id)
        .map(Json)
        .ok_or_else(|| Problem::not_found(format!("no session {id}")))
}

/// Ends a session (or cancels a queued request); the agent frees the slot.
#[utoipa::path(
    delete,
    path = "/v1/sessions/{id}",
    tag = "sessions",
    params(("id" = String, Path, description = "The session id")),
    responses(
        (status = 204, description = "Ended"),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 404, body = Problem, content_type = "application/problem+json"),
    ),
    security(("api_key" = []))
)]
pub(super) async fn delete(
    State(state): State<ApiState>,
    Caller(tenant): Caller,
    Path(id): Path<String>,
) -> Result<StatusCode, Problem> {
    let id = session_id(&id)?;
    state.broker.delete_session(&tenant.id, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Filters and pagination of the session list.
#[derive(Debug, Clone, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct ListQuery {
    /// Only sessions in this state.
    state: Option<String>,
    /// Only this game.
    game: Option<String>,
    /// Only this tier.
    tier: Option<String>,
    /// Only on this node.
    node: Option<String>,
    /// The previous page's `next` cursor.
    after: Option<String>,
    /// Page size, 1..=1000 (100 by default).
    limit: Option<usize>,
}

/// A page of sessions.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub(super) struct SessionPage {
    /// The sessions, oldest first.
    sessions: Vec<SessionView>,
    /// Pass as `after` for the next page. Present whenever this page is full, so the page
    /// after it may be empty; absent on a page that is not full.
    #[serde(skip_serializing_if = "Option::is_none")]
    next: Option<String>,
}

/// The tenant's live sessions.
#[utoipa::path(
    get,
    path = "/v1/sessions",
    tag = "sessions",
    params(ListQuery),
    responses(
        (status = 200, body = SessionPage),
        (status = 400, body = Problem, content_type = "application/problem+json"),
        (status = 401, body = Problem, content_type = "application/problem+json"),
    ),
    security(("api_key" = []))
)]
pub(super) async fn list(
    State(state): State<ApiState>,
    Caller(tenant): Caller,
    query: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<SessionPage>, Problem> {
    let Query(q) = query.map_err(|e| Problem::bad_request(e.body_text()))?;
    if let Some(s) = &q.state
        && !["queued", "reserved", "connecting", "active", "reconnecting"].contains(&s.as_str())
    {
        return Err(Problem::bad_request(format!(
            "state {s:?} is not queued, reserved, connecting, active or reconnecting"
        )));
    }
    let limit = q.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(Problem::bad_request("limit must be in 1..=1000"));
    }
    let after = match &q.after {
        None => None,
        Some(a) => Some(
            a.parse::<SessionId>()
                .map_err(|_| Problem::bad_request(format!("after {a:?} is not a session id")))?,
        ),
    };
    let sessions = state.broker.list_sessions(
        &tenant.id,
        &SessionFilter {
            state: q.state,
            game: q.game,
            tier: q.tier,
            node: q.node,
            after,
            limit,
        },
    );
    let next = (sessions.len() == limit)
        .then(|| sessions.last().map(|s| s.session_id.clone()))
        .flatten();
    Ok(Json(SessionPage { sessions, next }))
}

/// Server-sent events of the session's state: the current state first, then every change,
/// until it ends. A queued player learns here when it is placed.
#[utoipa::path(
    get,
    path = "/v1/sessions/{id}/events",
    tag = "sessions",
    params(("id" = String, Path, description = "The session id")),
    responses(
        (status = 200, description = "`text/event-stream` of `session` events, each a SessionView", content_type = "text/event-stream"),
        (status = 401, body = Problem, content_type = "application/problem+json"),
        (status = 404, body = Problem, content_type = "application/problem+json"),
    ),
    security(("api_key" = []))
)]
pub(super) async fn events(
    State(state): State<ApiState>,
    Caller(tenant): Caller,
    Path(id): Path<String>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, Problem> {
    let id = session_id(&id)?;
    // Subscribe before reading the current state, so no change falls in between.
    let rx = state.broker.subscribe();
    let first = state
        .broker
        .session_view(&tenant.id, &id)
        .ok_or_else(|| Problem::not_found(format!("no session {id}")))?;
    let done = first.state == "ended";
    let follow = Follow {
        broker: state.broker.clone(),
        tenant: tenant.id.clone(),
        id,
        id_text: id.to_string(),
        rx,
    };
    let events = stream::unfold(
        (Some(first), follow, done),
        |(first, mut f, done)| async move {
            if let Some(view) = first {
                let event = sse_event(&view);
                return Some((Ok(event), (None, f, done)));
            }
            if done {
                return None;
            }
            let view = f.next().await?;
            let ended = view.state == "ended";
            Some((Ok(sse_event(&view)), (None, f, ended)))
        },
    );
    Ok(Sse::new(events).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}

/// One session's changes, from the broker's event channel.
struct Follow {
    broker: crate::service::Broker,
    tenant: framecast_shared::ids::TenantId,
    id: SessionId,
    id_text: String,
    rx: tokio::sync::broadcast::Receiver<crate::service::SessionEvent>,
}

impl Follow {
    /// The session's next state; `None` when the broker is gone.
    async fn next(&mut self) -> Option<SessionView> {
        use tokio::sync::broadcast::error::RecvError;
        loop {
            match self.rx.recv().await {
                Ok(e) if e.tenant == self.tenant && e.view.session_id == self.id_text => {
                    return Some(e.view);
                }
                Ok(_) => continue,
                // Events were missed (a slow client): the current state says where it is.
                Err(RecvError::Lagged(_)) => {
                    return self.broker.session_view(&self.tenant, &self.id);
                }
                Err(RecvError::Closed) => return None,
            }
        }
    }
}

fn sse_event(view: &SessionView) -> Event {
    Event::default()
        .event("session")
        .data(serde_json::to_string(view).unwrap_or_else(|_| "{}".into()))
}
