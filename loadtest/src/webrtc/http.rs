//! The players' HTTP: the broker's session API (allocate, release, the fleet's sessions) and
//! the agent's WHEP endpoint, each call on a fresh loopback connection with a time limit.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HOST};
use hyper::{Method, Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tokio::net::TcpStream;

use framecast_shared::ids::SessionId;

/// Every HTTP call, connection included, ends within this.
pub(crate) const CALL_LIMIT: Duration = Duration::from_secs(10);

/// Why an HTTP call failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HttpError {
    /// No connection.
    #[error("{what}: connecting to {addr}: {source}")]
    Connect {
        what: String,
        addr: SocketAddr,
        source: std::io::Error,
    },
    /// The call took longer than [`CALL_LIMIT`].
    #[error("{what}: no answer within {} s", CALL_LIMIT.as_secs())]
    Timeout { what: String },
    /// HTTP failed on the connection.
    #[error("{what}: {source}")]
    Hyper { what: String, source: hyper::Error },
    /// The request could not be built (a bad header value).
    #[error("{what}: {source}")]
    Request {
        what: String,
        source: hyper::http::Error,
    },
    /// An answer with an unexpected status.
    #[error("{what}: {status} {detail}")]
    Status {
        what: String,
        status: StatusCode,
        detail: String,
    },
    /// An answer that does not parse.
    #[error("{what}: {detail}")]
    Body { what: String, detail: String },
    /// A WHEP URL this engine will not call: not `http://`, no port, or not on loopback.
    #[error("whep_url {url:?}: {detail}")]
    WhepUrl { url: String, detail: String },
}

/// An answer: status, body.
#[derive(Debug)]
pub(crate) struct Reply {
    pub(crate) status: StatusCode,
    pub(crate) body: Bytes,
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

/// The part of a session view the players need.
#[derive(Debug, Deserialize)]
struct View {
    session_id: SessionId,
    state: String,
    whep_url: Option<String>,
    token: Option<String>,
}

/// The broker's session API, as one tenant.
#[derive(Debug, Clone)]
pub(crate) struct Broker {
    /// The HTTP API's address.
    pub(crate) addr: SocketAddr,
    /// `Bearer <key>`.
    auth: String,
}

impl Broker {
    /// The API at `addr` with the tenant's `api_key`.
    pub(crate) fn new(addr: SocketAddr, api_key: &str) -> Self {
        Self {
            addr,
            auth: format!("Bearer {api_key}"),
        }
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
        let reply = call(
            self.addr,
            Method::POST,
            "/v1/sessions",
            &self.auth,
            Some("application/json"),
            Bytes::from(body.to_string()),
        )
        .await?;
        match reply.status {
            StatusCode::CREATED | StatusCode::ACCEPTED => {
                let view: View =
                    serde_json::from_slice(&reply.body).map_err(|e| HttpError::Body {
                        what: what.into(),
                        detail: format!("the session view does not parse: {e}"),
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
                reason: match status {
                    StatusCode::SERVICE_UNAVAILABLE => "no-capacity".into(),
                    StatusCode::TOO_MANY_REQUESTS => "rate-limited".into(),
                    s => format!("http-{}", s.as_u16()),
                },
                detail: format!("{status} {}", problem_detail(&reply.body)),
                session: None,
            }),
        }
    }

    /// `DELETE /v1/sessions/{id}`: whether the broker ended it (204) or had already (404).
    pub(crate) async fn release(&self, session: &SessionId) -> Result<bool, HttpError> {
        let path = format!("/v1/sessions/{session}");
        let reply = call(
            self.addr,
            Method::DELETE,
            &path,
            &self.auth,
            None,
            Bytes::new(),
        )
        .await?;
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

    /// `GET /v1/nodes`: nodes connected, and sessions on their GPUs.
    pub(crate) async fn fleet(&self) -> Result<Fleet, HttpError> {
        let what = "GET /v1/nodes";
        let reply = call(
            self.addr,
            Method::GET,
            "/v1/nodes",
            &self.auth,
            None,
            Bytes::new(),
        )
        .await?;
        if reply.status != StatusCode::OK {
            return Err(HttpError::Status {
                what: what.into(),
                status: reply.status,
                detail: problem_detail(&reply.body),
            });
        }
        let nodes: Vec<Node> =
            serde_json::from_slice(&reply.body).map_err(|e| HttpError::Body {
                what: what.into(),
                detail: format!("the node list does not parse: {e}"),
            })?;
        Ok(Fleet {
            connected: nodes.iter().filter(|n| n.connected).count() as u64,
            gpus: nodes.iter().map(|n| n.gpus.len() as u64).sum(),
            sessions: nodes.iter().flat_map(|n| &n.gpus).map(|g| g.sessions).sum(),
        })
    }
}

/// The fleet as `GET /v1/nodes` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Fleet {
    /// Nodes whose agent has a control link.
    pub(crate) connected: u64,
    /// GPUs over all nodes.
    pub(crate) gpus: u64,
    /// Sessions over all GPUs.
    pub(crate) sessions: u64,
}

#[derive(Debug, Deserialize)]
struct Node {
    connected: bool,
    #[serde(default)]
    gpus: Vec<NodeGpu>,
}

#[derive(Debug, Deserialize)]
struct NodeGpu {
    sessions: u64,
}

/// WHEP: posts `offer` to `placed.whep_url` with its token; the SDP answer.
pub(crate) async fn whep_offer(placed: &Placed, offer: String) -> Result<String, HttpError> {
    let (addr, path) = loopback_target(&placed.whep_url)?;
    let reply = call(
        addr,
        Method::POST,
        &path,
        &format!("Bearer {}", placed.token),
        Some("application/sdp"),
        Bytes::from(offer),
    )
    .await?;
    if reply.status != StatusCode::CREATED {
        return Err(HttpError::Status {
            what: "WHEP POST".into(),
            status: reply.status,
            detail: problem_detail(&reply.body),
        });
    }
    String::from_utf8(reply.body.to_vec()).map_err(|_| HttpError::Body {
        what: "WHEP POST".into(),
        detail: "the SDP answer is not UTF-8".into(),
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

/// One request on a fresh connection, bounded by [`CALL_LIMIT`].
async fn call(
    addr: SocketAddr,
    method: Method,
    path: &str,
    auth: &str,
    content_type: Option<&str>,
    body: Bytes,
) -> Result<Reply, HttpError> {
    let what = format!("{method} {path}");
    tokio::time::timeout(
        CALL_LIMIT,
        call_unbounded(addr, method, path, auth, content_type, body, &what),
    )
    .await
    .map_err(|_| HttpError::Timeout { what: what.clone() })?
}

async fn call_unbounded(
    addr: SocketAddr,
    method: Method,
    path: &str,
    auth: &str,
    content_type: Option<&str>,
    body: Bytes,
    what: &str,
) -> Result<Reply, HttpError> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|source| HttpError::Connect {
            what: what.to_owned(),
            addr,
            source,
        })?;
    // Small requests: Nagle would only add delay.
    let _ = stream.set_nodelay(true);
    let hyper_err = |source| HttpError::Hyper {
        what: what.to_owned(),
        source,
    };
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(hyper_err)?;
    // The connection ends when the sender is dropped, at the end of this call.
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let mut request = Request::builder()
        .method(method)
        .uri(path)
        .header(HOST, addr.to_string())
        .header(AUTHORIZATION, auth);
    if let Some(ct) = content_type {
        request = request.header(CONTENT_TYPE, ct);
    }
    let request = request
        .body(Full::new(body))
        .map_err(|source| HttpError::Request {
            what: what.to_owned(),
            source,
        })?;
    let response = sender.send_request(request).await.map_err(hyper_err)?;
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(hyper_err)?
        .to_bytes();
    Ok(Reply { status, body })
}

/// The `detail` of an `application/problem+json` body, else the body's start.
fn problem_detail(body: &[u8]) -> String {
    serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("detail").and_then(|d| d.as_str()).map(str::to_owned))
        .unwrap_or_else(|| String::from_utf8_lossy(body).chars().take(200).collect())
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

    #[test]
    fn problem_details_are_read_and_other_bodies_cut_short() {
        assert_eq!(
            problem_detail(br#"{"title":"x","detail":"no capacity"}"#),
            "no capacity"
        );
        assert_eq!(problem_detail(&[b'a'; 500]).len(), 200);
        assert_eq!(problem_detail(&[0xff, 0xfe]), "\u{fffd}\u{fffd}");
    }
}
