//! The players' HTTP: the broker's session API (allocate, release, the fleet's sessions) over
//! the shared client's pool, and the agent's WHEP endpoint, one call on a fresh loopback
//! connection. Every call ends within [`http_client::CALL_TIMEOUT`] and reads at most
//! [`http_client::MAX_BODY`] bytes.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use bytes::Bytes;
use hyper::{Method, StatusCode, Uri};

use framecast_shared::ids::SessionId;

use crate::http_client::{
    self, Api, CallError, Fleet, FleetError, SessionView, problem_detail, rejection_reason,
};

/// Why an HTTP call failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HttpError {
    /// No usable answer.
    #[error("{what}: {source}")]
    Call { what: String, source: CallError },
    /// An answer with an unexpected status.
    #[error("{what}: {status} {detail}")]
    Status {
        what: String,
        status: StatusCode,
        detail: String,
    },
    /// A WHEP URL this engine will not call: not `http://`, no port, or not on loopback.
    #[error("whep_url {url:?}: {detail}")]
    WhepUrl { url: String, detail: String },
}

impl HttpError {
    fn call(what: &str) -> impl FnOnce(CallError) -> Self + '_ {
        move |source| Self::Call {
            what: what.to_owned(),
            source,
        }
    }

    /// The name a request that failed so is counted under in `rejected`: `no-answer-<kind>`.
    pub(crate) fn rejection(&self) -> String {
        match self {
            Self::Call { source, .. } => source.rejection(),
            Self::Status { .. } | Self::WhepUrl { .. } => http_client::no_answer("bad-answer"),
        }
    }
}

/// A session the broker placed: where and how its player connects.
#[derive(Debug, Clone)]
pub(crate) struct Placed {
    /// The session.
    pub(crate) id: SessionId,
    /// The agent's WHEP URL for it.
    pub(crate) whep_url: String,
    /// The bearer token for that URL (never logged).
    pub(crate) token: String,
}

/// What `POST /v1/sessions` came to.
#[derive(Debug)]
pub(crate) enum Allocation {
    /// 201: a slot is reserved.
    Placed(Placed),
    /// Refused (status 4xx/5xx or a 201/202 without what a player needs): why, and the
    /// session to release if one was created.
    Refused {
        reason: String,
        detail: String,
        session: Option<SessionId>,
    },
}

/// The broker's session API, as one tenant.
#[derive(Debug, Clone)]
pub(crate) struct Broker {
    api: Arc<Api>,
}

impl Broker {
    /// The API at `addr` with the tenant's `api_key`, at most `connections` calls at once.
    pub(crate) fn new(
        addr: SocketAddr,
        api_key: &str,
        connections: usize,
    ) -> Result<Self, CallError> {
        Ok(Self {
            api: Arc::new(Api::new(addr, &addr.to_string(), api_key, connections)?),
        })
    }

    /// The shared client.
    pub(crate) fn api(&self) -> &Api {
        &self.api
    }

    /// `POST /v1/sessions` for `game` at `tier`, without queueing.
    pub(crate) async fn allocate(
        &self,
        game: &str,
        tier: &str,
        player: &str,
    ) -> Result<Allocation, HttpError> {
        let what = "POST /v1/sessions";
        let body = serde_json::json!({
            "game": game,
            "tier": tier,
            "player_id": player,
            "queue": false,
        });
        let reply = self
            .api
            .call(
                Method::POST,
                "/v1/sessions",
                Some(Bytes::from(body.to_string())),
                None,
            )
            .await
            .map_err(HttpError::call(what))?;
        match reply.status {
            StatusCode::CREATED | StatusCode::ACCEPTED => {
                let view: SessionView = serde_json::from_slice(&reply.body).map_err(|e| {
                    HttpError::call(what)(CallError::BadAnswer(format!(
                        "the session view does not parse: {e}"
                    )))
                })?;
                match (view.whep_url, view.token) {
                    (Some(whep_url), Some(token)) if reply.status == StatusCode::CREATED => {
                        Ok(Allocation::Placed(Placed {
                            id: view.session_id,
                            whep_url,
                            token,
                        }))
                    }
                    _ => Ok(Allocation::Refused {
                        reason: format!("unplaced-{}", view.state),
                        detail: format!(
                            "{} {} without whep_url and token",
                            reply.status, view.state
                        ),
                        session: Some(view.session_id),
                    }),
                }
            }
            status => Ok(Allocation::Refused {
                reason: rejection_reason(status, &reply.body),
                detail: format!("{status} {}", problem_detail(&reply.body)),
                session: None,
            }),
        }
    }

    /// `DELETE /v1/sessions/{id}`: whether the broker ended it (204) or had already (404).
    pub(crate) async fn release(&self, session: &SessionId) -> Result<bool, HttpError> {
        let path = format!("/v1/sessions/{session}");
        let reply = self
            .api
            .call(Method::DELETE, &path, None, None)
            .await
            .map_err(HttpError::call(&path))?;
        match reply.status {
            StatusCode::NO_CONTENT => Ok(true),
            StatusCode::NOT_FOUND => Ok(false),
            status => Err(HttpError::Status {
                what: format!("DELETE {path}"),
                status,
                detail: problem_detail(&reply.body),
            }),
        }
    }

    /// `GET /v1/nodes`: nodes connected, their GPUs, and sessions on them.
    pub(crate) async fn fleet(&self) -> Result<Fleet, FleetError> {
        Ok(Fleet::of(&http_client::nodes(&self.api).await?))
    }
}

/// WHEP: posts `offer` to `placed.whep_url` with its token; the SDP answer.
pub(crate) async fn whep_offer(placed: &Placed, offer: String) -> Result<String, HttpError> {
    let what = "WHEP POST";
    let (addr, path) = loopback_target(&placed.whep_url)?;
    let reply = http_client::call_once(
        addr,
        Method::POST,
        &path,
        &placed.token,
        "application/sdp",
        Bytes::from(offer),
    )
    .await
    .map_err(HttpError::call(what))?;
    if reply.status != StatusCode::CREATED {
        return Err(HttpError::Status {
            what: what.into(),
            status: reply.status,
            detail: problem_detail(&reply.body),
        });
    }
    String::from_utf8(reply.body.to_vec()).map_err(|_| {
        HttpError::call(what)(CallError::BadAnswer("the SDP answer is not UTF-8".into()))
    })
}

/// The address and path of an `http://` URL on a loopback IP address: all of this engine's
/// traffic stays on the machine.
fn loopback_target(url: &str) -> Result<(SocketAddr, String), HttpError> {
    let bad = |detail: &str| HttpError::WhepUrl {
        url: url.to_owned(),
        detail: detail.to_owned(),
    };
    let uri: Uri = url.parse().map_err(|_| bad("not a URL"))?;
    if uri.scheme_str() != Some("http") {
        return Err(bad("not http://"));
    }
    let host = uri.host().ok_or_else(|| bad("no host"))?;
    let ip: IpAddr = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse()
        .map_err(|_| bad("the host is not an IP address"))?;
    if !ip.is_loopback() {
        return Err(bad("not a loopback address"));
    }
    let port = uri
        .port_u16()
        .filter(|p| *p != 0)
        .ok_or_else(|| bad("no port"))?;
    let path = uri
        .path_and_query()
        .map_or_else(|| "/".to_owned(), |p| p.as_str().to_owned());
    Ok((SocketAddr::new(ip, port), path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whep_urls_must_be_http_on_loopback_with_a_port() {
        let (addr, path) = loopback_target("http://127.0.0.1:4567/whep/sessions/abc").unwrap();
        assert_eq!(addr, SocketAddr::from(([127, 0, 0, 1], 4567)));
        assert_eq!(path, "/whep/sessions/abc");
        let (addr, _) = loopback_target("http://[::1]:80/x").unwrap();
        assert!(addr.ip().is_loopback());
        for bad in [
            "https://127.0.0.1:1/x",
            "http://10.0.0.1:80/x",
            "http://example.com:80/x",
            "http://127.0.0.1/x",
            "http://127.0.0.1:0/x",
            "not a url at all",
            "",
        ] {
            assert!(loopback_target(bad).is_err(), "{bad}");
        }
    }
}
