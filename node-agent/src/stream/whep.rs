//! The WHEP endpoint (draft-ietf-wish-whep-04) players connect to: `POST` an offer,
//! `PATCH` trickled candidates, `DELETE` to hang up. The contract, statuses included, is in
//! `docs/PROTOCOL.md` ("Player ↔ agent").
//!
//! The session token, not a cookie, authenticates each request, so any origin may play: every
//! answer carries permissive CORS headers and `OPTIONS` answers preflights.

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;

use framecast_shared::ids::SessionId;
use framecast_shared::problem::Problem;

use super::streams::{StreamError, Streams};
use crate::metrics;

/// The largest offer or candidate fragment taken; browser offers are a few kilobytes.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// The routes under `/whep`.
pub fn router(streams: Streams) -> Router {
    Router::new()
        .route("/whep/sessions/{id}", post(offer).options(preflight))
        .route(
            "/whep/sessions/{id}/streams/{stream}",
            axum::routing::patch(candidates)
                .delete(hang_up)
                .options(preflight),
        )
        .fallback(|method: Method, uri: axum::http::Uri| async move {
            Problem::not_found(format!("no route for {method} {uri}"))
        })
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::map_response(cors))
        .with_state(streams)
}

async fn offer(
    State(streams): State<Streams>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    let result = async {
        let session = session_id(&id)?;
        let token = bearer(&headers)?;
        content_type(&headers, "application/sdp")?;
        let offer = text(body)?;
        // Negotiated in a task of its own: a client that hangs up mid-offer cancels this
        // handler, and must not cancel the setup half-way.
        let token = token.to_owned();
        let answer = tokio::spawn(async move { streams.offer(session, &token, &offer).await })
            .await
            .map_err(|e| Problem::from(StreamError::Internal(e.to_string())))??;
        let location = format!("/whep/sessions/{session}/streams/{}", answer.stream);
        Ok::<_, Problem>(
            (
                StatusCode::CREATED,
                [
                    (header::CONTENT_TYPE, "application/sdp".to_owned()),
                    (header::LOCATION, location),
                ],
                answer.sdp,
            )
                .into_response(),
        )
    }
    .await;
    match result {
        Ok(r) => r,
        Err(p) => {
            metrics::stream_offer(status_label(p.status));
            p.into_response()
        }
    }
}

async fn candidates(
    State(streams): State<Streams>,
    Path((id, stream)): Path<(String, String)>,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<StatusCode, Problem> {
    let session = session_id(&id)?;
    let stream = stream_id(&stream)?;
    let token = bearer(&headers)?;
    content_type(&headers, "application/trickle-ice-sdpfrag")?;
    let fragment = text(body)?;
    streams
        .add_candidates(session, stream, token, &fragment)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn hang_up(
    State(streams): State<Streams>,
    Path((id, stream)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<StatusCode, Problem> {
    let session = session_id(&id)?;
    let stream = stream_id(&stream)?;
    let token = bearer(&headers)?;
    streams.hang_up(session, stream, token).await?;
    Ok(StatusCode::OK)
}

async fn preflight() -> StatusCode {
    StatusCode::NO_CONTENT
}

/// The CORS headers every answer carries.
const CORS: [(header::HeaderName, &str); 5] = [
    (header::ACCESS_CONTROL_ALLOW_ORIGIN, "*"),
    (
        header::ACCESS_CONTROL_ALLOW_METHODS,
        "POST, PATCH, DELETE, OPTIONS",
    ),
    (
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        "Authorization, Content-Type, If-Match",
    ),
    (
        header::ACCESS_CONTROL_EXPOSE_HEADERS,
        "Location, Link, ETag",
    ),
    (header::ACCESS_CONTROL_MAX_AGE, "600"),
];

/// Adds the CORS headers to every answer.
async fn cors(mut response: Response) -> Response {
    let headers = response.headers_mut();
    for (name, value) in CORS {
        headers.insert(name, HeaderValue::from_static(value));
    }
    response
}

impl From<StreamError> for Problem {
    fn from(e: StreamError) -> Self {
        let detail = e.to_string();
        match e {
            StreamError::NoKey => Problem {
                retry_after: Some(1),
                ..Problem::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "not-ready",
                    "Not ready",
                    detail,
                )
            },
            StreamError::Unavailable(_) => Problem {
                retry_after: Some(5),
                ..Problem::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "unavailable",
                    "Unavailable",
                    detail,
                )
            },
            StreamError::Unauthorized(_) => Problem::unauthorized(detail),
            StreamError::NotFound(_) => Problem::not_found(detail),
            StreamError::Conflict(_) => Problem::conflict(detail),
            StreamError::BadRequest(_) => Problem::bad_request(detail),
            StreamError::Internal(_) => {
                tracing::error!(%detail, "a WHEP request failed inside the agent");
                Problem::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "Internal error",
                    "the agent failed; the error is in its log",
                )
            }
        }
    }
}

fn session_id(raw: &str) -> Result<SessionId, Problem> {
    raw.parse()
        .map_err(|_| Problem::not_found(format!("{raw:?} is not a session id")))
}

fn stream_id(raw: &str) -> Result<u64, Problem> {
    raw.parse()
        .map_err(|_| Problem::not_found(format!("{raw:?} is not a stream id")))
}

fn bearer(headers: &HeaderMap) -> Result<&str, Problem> {
    let value = headers
        .get(header::AUTHORIZATION)
        .ok_or_else(|| Problem::unauthorized("send Authorization: Bearer <session token>"))?;
    value
        .to_str()
        .ok()
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| {
            Problem::unauthorized("the Authorization header is not Bearer <session token>")
        })
}

fn content_type(headers: &HeaderMap, want: &str) -> Result<(), Problem> {
    let got = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let essence = got.split(';').next().unwrap_or("").trim();
    if essence.eq_ignore_ascii_case(want) {
        Ok(())
    } else {
        Err(Problem::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported-media-type",
            "Unsupported media type",
            format!("send Content-Type: {want} (got {got:?})"),
        ))
    }
}

fn text(body: Result<Bytes, axum::extract::rejection::BytesRejection>) -> Result<String, Problem> {
    let body = framecast_shared::problem::body_or_problem(
        body,
        &format!("a WHEP body is at most {MAX_BODY_BYTES} bytes"),
    )?;
    String::from_utf8(body.to_vec()).map_err(|_| Problem::bad_request("the body is not UTF-8 text"))
}

fn status_label(status: u16) -> &'static str {
    match status {
        400 => "400",
        401 => "401",
        404 => "404",
        409 => "409",
        413 => "413",
        415 => "415",
        503 => "503",
        _ => "other",
    }
}
