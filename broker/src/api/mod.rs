//! The HTTP API under `/v1` (axum), with bearer API keys per tenant and RFC 9457 problems for
//! every error; plus `/openapi.json`, `/metrics`, `/livez` and `/readyz`.
//!
//! - [`sessions`]: allocate, look up, list, end and follow sessions;
//! - [`fleet`]: nodes (operators only), pools and placement dry runs;
//! - [`problem`]: errors as `application/problem+json`.

pub mod fleet;
pub mod problem;
pub mod sessions;
mod status;

use std::sync::Arc;

use axum::Router;
use axum::extract::{DefaultBodyLimit, FromRequestParts};
use axum::http::request::Parts;
use axum::http::{Method, header};
use axum::routing::{get, post};
use utoipa::OpenApi;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};

use framecast_shared::config::broker::TenantConfig;
use framecast_shared::ops;

use crate::service::Broker;
use problem::Problem;

/// What every handler gets.
#[derive(Clone)]
pub struct ApiState {
    /// The broker.
    pub broker: Broker,
}

/// The calling tenant, from `Authorization: Bearer <key>`.
#[derive(Debug, Clone)]
pub struct Caller(pub TenantConfig);

impl FromRequestParts<ApiState> for Caller {
    type Rejection = Problem;

    async fn from_request_parts(parts: &mut Parts, state: &ApiState) -> Result<Self, Problem> {
        let header = parts
            .headers
            .get(header::AUTHORIZATION)
            .ok_or_else(|| Problem::unauthorized("send Authorization: Bearer <API key>"))?;
        let key = header
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .ok_or_else(|| {
                Problem::unauthorized("the Authorization header is not Bearer <API key>")
            })?;
        state
            .broker
            .tenants()
            .authenticate(key)
            .cloned()
            .map(Caller)
            .ok_or_else(|| Problem::unauthorized("unknown API key"))
    }
}

/// The OpenAPI document, generated from the handlers and types.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "Framecast broker API",
        description = "Allocate cloud-gaming sessions on shared GPUs. Errors are RFC 9457 problem documents.",
    ),
    paths(
        sessions::create,
        sessions::get_one,
        sessions::delete,
        sessions::list,
        sessions::events,
        fleet::nodes,
        fleet::cordon,
        fleet::uncordon,
        fleet::drain,
        fleet::pools,
        fleet::explain,
    ),
    modifiers(&BearerAuth),
    tags(
        (name = "sessions", description = "Player sessions"),
        (name = "fleet", description = "Nodes, pools and placement"),
    )
)]
pub struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("A tenant's API key"))
                    .build(),
            ),
        );
    }
}

/// Optional parts of the router.
#[derive(Debug, Clone, Copy, Default)]
pub struct RouterOptions {
    /// Serve the dev status page at `/` (it shows the fleet without a key).
    pub status_page: bool,
}

/// The whole router: `/v1`, `/openapi.json` and the operations endpoints.
pub fn router(broker: Broker, metrics: ops::PrometheusHandle, options: RouterOptions) -> Router {
    let state = ApiState {
        broker: broker.clone(),
    };
    let max_body = usize::try_from(broker.config().http.max_body_bytes).unwrap_or(usize::MAX);
    let mut v1 = Router::new()
        .route("/v1/sessions", post(sessions::create).get(sessions::list))
        .route(
            "/v1/sessions/{id}",
            get(sessions::get_one).delete(sessions::delete),
        )
        .route("/v1/sessions/{id}/events", get(sessions::events))
        .route("/v1/nodes", get(fleet::nodes))
        .route("/v1/nodes/{id}/cordon", post(fleet::cordon))
        .route("/v1/nodes/{id}/uncordon", post(fleet::uncordon))
        .route("/v1/nodes/{id}/drain", post(fleet::drain))
        .route("/v1/pools", get(fleet::pools))
        .route("/v1/placement/explain", post(fleet::explain));
    if options.status_page {
        v1 = v1.route("/", get(status::page));
    }
    let v1 = v1
        .route(
            "/openapi.json",
            get(|| async { axum::Json(ApiDoc::openapi()) }),
        )
        .fallback(|method: Method, uri: axum::http::Uri| async move {
            Problem::not_found(format!("no route for {method} {uri}"))
        })
        .method_not_allowed_fallback(|method: Method, uri: axum::http::Uri| async move {
            Problem::new(
                axum::http::StatusCode::METHOD_NOT_ALLOWED,
                "method-not-allowed",
                "Method not allowed",
                format!("{uri} does not take {method}"),
            )
        })
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(state);
    let ready_broker = broker.clone();
    let ready: ops::Readiness = Arc::new(move || ready_broker.ready());
    let hook: ops::ScrapeHook = Arc::new(move || crate::metrics::record_state(&broker));
    v1.merge(ops::router(metrics, ready, Some(hook)))
}
