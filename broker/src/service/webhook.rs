//! The fleet-recommendation webhook: POSTs the nodes each (region, GPU model) needs to
//! `planner.webhook_url`, so a platform's node-pool autoscaler can add or drain hosts.
//!
//! The driver only publishes the newest recommendation into a `watch` channel, which never
//! blocks; this task posts it, at most once per `planner.webhook_min_interval_s`, and retries a
//! failed post after that interval with whatever is newest by then (a recommendation that was
//! replaced meanwhile is never sent). Every attempt is bounded by [`POST_TIMEOUT`].
//!
//! With `planner.webhook_secret_file`, every post carries
//! `x-framecast-signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>." followed by the body>`,
//! so the receiver can tell the broker's posts from forged ones and refuse old ones replayed.

use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use serde::Serialize;
use tokio::net::TcpStream;
use tokio::sync::watch;

use framecast_shared::config::planner::WebhookUrl;

/// The header that carries a post's signature.
pub const SIGNATURE_HEADER: &str = "x-framecast-signature";

/// The longest one post may take, connection included.
pub const POST_TIMEOUT: Duration = Duration::from_secs(5);
/// The least time between a failed post and its retry, whatever the configured interval.
const MIN_RETRY: Duration = Duration::from_secs(1);

/// One line of the recommendation: the nodes of one GPU model a region's demand needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FleetNeed {
    /// The region.
    pub region: String,
    /// The GPU model, as `GET /v1/nodes` names it.
    pub model: String,
    /// Nodes with this model the demand needs.
    pub nodes_needed: u32,
    /// Nodes with this model the broker knows now.
    pub nodes_present: u32,
    /// When the planner computed it (RFC 3339).
    pub generated_at: String,
}

/// The newest recommendation, as the driver publishes it.
pub(crate) type Latest = Option<Arc<Vec<FleetNeed>>>;

/// Why a post failed.
#[derive(Debug, thiserror::Error)]
pub enum PostError {
    /// The connection could not be made.
    #[error("connecting to {addr}: {error}")]
    Connect {
        /// host:port.
        addr: String,
        /// Why.
        error: std::io::Error,
    },
    /// The HTTP exchange failed.
    #[error("HTTP: {0}")]
    Http(#[from] hyper::Error),
    /// The request could not be built.
    #[error("request: {0}")]
    Request(#[from] axum::http::Error),
    /// The body could not be encoded.
    #[error("encoding the body: {0}")]
    Encode(#[from] serde_json::Error),
    /// The receiver answered with a status other than 2xx.
    #[error("the receiver answered {0}")]
    Status(u16),
    /// No answer within [`POST_TIMEOUT`].
    #[error("no answer within {} s", POST_TIMEOUT.as_secs())]
    Timeout,
}

/// Posts every new recommendation from `latest` to `url` until `shutdown` turns true, signed
/// with `key` where there is one.
pub(crate) async fn run(
    url: WebhookUrl,
    key: Option<ring::hmac::Key>,
    min_interval: Duration,
    mut latest: watch::Receiver<Latest>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            changed = latest.changed() => if changed.is_err() { return },
            _ = shutdown.wait_for(|s| *s) => return,
        }
        // Post the newest, then keep posting while posts fail or newer ones arrived.
        loop {
            let Some(needs) = latest.borrow_and_update().clone() else {
                break;
            };
            let posted = tokio::select! {
                r = post(&url, &needs, key.as_ref()) => r,
                _ = shutdown.wait_for(|s| *s) => return,
            };
            let ok = match posted {
                Ok(()) => {
                    tracing::info!(%url, lines = needs.len(), "fleet recommendation posted");
                    true
                }
                Err(e) => {
                    metrics::counter!(crate::metrics::FLEET_WEBHOOK_FAILURES).increment(1);
                    tracing::warn!(%url, error = %e, "the fleet recommendation webhook failed; it is retried");
                    false
                }
            };
            let wait = if ok {
                min_interval
            } else {
                min_interval.max(MIN_RETRY)
            };
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                _ = shutdown.wait_for(|s| *s) => return,
            }
            if ok && !latest.has_changed().unwrap_or(false) {
                break;
            }
        }
    }
}

/// POSTs `needs` as a JSON array to `url`, within [`POST_TIMEOUT`], signed with `key` (see
/// the module's documentation) where there is one.
pub async fn post(
    url: &WebhookUrl,
    needs: &[FleetNeed],
    key: Option<&ring::hmac::Key>,
) -> Result<(), PostError> {
    let body = serde_json::to_vec(needs)?;
    let signature = key.map(|k| signature(k, framecast_shared::time::Timestamp::now(), &body));
    tokio::time::timeout(POST_TIMEOUT, exchange(url, body, signature))
        .await
        .map_err(|_| PostError::Timeout)?
}

/// The signature header's value for `body` sent at `at`.
pub fn signature(
    key: &ring::hmac::Key,
    at: framecast_shared::time::Timestamp,
    body: &[u8],
) -> String {
    let t = at.as_millis() / 1000;
    let mut ctx = ring::hmac::Context::with_key(key);
    ctx.update(format!("{t}.").as_bytes());
    ctx.update(body);
    format!(
        "t={t},v1={}",
        crate::service::tenants::hex(ctx.sign().as_ref())
    )
}

/// The signing key of a secret (the file's bytes, without a trailing line break).
pub fn key_of(secret: &[u8]) -> ring::hmac::Key {
    ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret)
}

async fn exchange(
    url: &WebhookUrl,
    body: Vec<u8>,
    signature: Option<String>,
) -> Result<(), PostError> {
    let addr = format!("{}:{}", url.host(), url.port());
    let stream = TcpStream::connect((url.host(), url.port()))
        .await
        .map_err(|error| PostError::Connect { addr, error })?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    // The connection ends when the exchange is over; bounded too, so a receiver that never
    // answers cannot keep the socket open.
    tokio::spawn(async move {
        if let Ok(Err(e)) = tokio::time::timeout(POST_TIMEOUT, conn).await {
            tracing::debug!(error = %e, "webhook connection ended");
        }
    });
    let mut request = axum::http::Request::post(url.path());
    if let Some(s) = signature {
        request = request.header(SIGNATURE_HEADER, s);
    }
    let request = request
        .header(axum::http::header::HOST, url.host_header())
        .header(axum::http::header::CONTENT_TYPE, "application/json")
        .header(
            axum::http::header::USER_AGENT,
            concat!("framecast-broker/", env!("CARGO_PKG_VERSION")),
        )
        .body(Full::new(Bytes::from(body)))?;
    let response = sender.send_request(request).await?;
    let status = response.status();
    // Read (and drop) the answer so the receiver sees a clean exchange.
    let _ = response.into_body().collect().await;
    if status.is_success() {
        Ok(())
    } else {
        Err(PostError::Status(status.as_u16()))
    }
}
