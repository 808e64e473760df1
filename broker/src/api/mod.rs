//! The HTTP API under `/v1` (axum), with bearer API keys per tenant and RFC 9457 problems for
//! every error; plus `/openapi.json`, `/metrics`, `/livez` and `/readyz`.
//!
//! - [`sessions`]: allocate, look up, list, end and follow sessions;
//! - [`fleet`]: nodes (operators only), pools, the pool plan and placement dry runs;
//! - [`problem`]: errors as `application/problem+json`.
//!
//! Dev mode adds, without a key, the player page at `/` and the status page at `/status`.

pub mod fleet;
mod player;
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
        fleet::plan,
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
#[derive(Clone, Default)]
pub struct RouterOptions {
    /// Serve the dev pages without a key: the player page at `/` (with `/player.js` and
    /// `/player/config.json`) and the status page at `/status`, which shows the fleet.
    pub dev_pages: bool,
    /// The development API key that `/player/config.json` hands to the player page. Only for
    /// dev mode: anyone who can reach the port gets it.
    pub dev_api_key: Option<String>,
}

impl RouterOptions {
    /// Dev mode's options: the dev pages, with `api_key` prefilled on the player page.
    pub fn dev(api_key: &str) -> Self {
        Self {
            dev_pages: true,
            dev_api_key: Some(api_key.to_owned()),
        }
    }
}

// By hand, so that the key never reaches a log line.
impl std::fmt::Debug for RouterOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouterOptions")
            .field("dev_pages", &self.dev_pages)
            .field(
                "dev_api_key",
                &self.dev_api_key.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
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
        .route("/v1/pools/plan", get(fleet::plan))
        .route("/v1/placement/explain", post(fleet::explain));
    if options.dev_pages {
        v1 = v1
            .route("/status", get(status::page))
            .merge(player::routes(&broker, options.dev_api_key.as_deref()));
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
