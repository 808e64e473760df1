//! The broker's HTTP API as the network engines (`live`, `webrtc`) call it: one client, one
//! way to name a refusal, one node list and one wait for the agents, so that both engines
//! count what they measure the same way. Crate-internal: its items are the engines' own.
//!
//! - `Api`: a pool of keep-alive HTTP/1.1 connections with the tenant's key, a bound on the
//!   calls in flight, retries with backoff while the broker cannot be reached, and a
//!   connection of its own for each long-lived stream (`Api::stream`);
//! - `call_once`: one call on a fresh connection (a WHEP offer to an agent);
//! - every answer body is read up to 16 MiB, every call ends within 10 s;
//! - `rejection_reason` and `CallError::rejection`: the names refusals and unanswered
//!   requests are counted under in a report's `rejected` (`no-capacity`, `too-many-requests`,
//!   …, `no-answer-<kind>`);
//! - `NodeBody`, `nodes` and `wait_for_agents`: `GET /v1/nodes`;
//! - `histogram`: the histogram both engines record latencies in.

use std::net::SocketAddr;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, HOST, HeaderValue};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

use framecast_shared::ids::SessionId;

/// One call taking longer than this (the wait for a free connection and the connection
/// included) is a failed call.
pub(crate) const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest answer body read (the node list of a big fleet is the largest).
pub(crate) const MAX_BODY: usize = 16 * 1024 * 1024;
/// Connecting taking longer than this is a failed call.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The first wait before a retry; it doubles up to [`BACKOFF_MAX`].
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// How often the node list is read while waiting for the agents.
const AGENTS_POLL: Duration = Duration::from_millis(100);

type Sender = SendRequest<Full<Bytes>>;

/// The broker's API, as one tenant.
#[derive(Debug)]
pub(crate) struct Api {
    addr: SocketAddr,
    host: HeaderValue,
    auth: HeaderValue,
    /// Bounds the calls in flight to the pool's size.
    slots: Semaphore,
    idle: Mutex<Vec<Sender>>,
}

/// An answer.
#[derive(Debug, Clone)]
pub(crate) struct Reply {
    /// Its status.
    pub status: StatusCode,
    /// Its body, at most [`MAX_BODY`] bytes.
    pub body: Bytes,
}

/// A call that got no answer the caller can use.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CallError {
    /// The connection could not be made.
    #[error("connecting to {0}")]
    Connect(String),
    /// The connection failed during the call.
    #[error("HTTP: {0}")]
    Http(#[from] hyper::Error),
    /// No answer in time.
    #[error("no answer within {} s", .0.as_secs())]
    Timeout(Duration),
    /// The request could not be built (a bad header value).
    #[error("request: {0}")]
    Request(String),
    /// The answer body is larger than the client reads.
    #[error("the answer is larger than {MAX_BODY} bytes")]
    TooLarge,
    /// The answer does not say what it should (a body that does not parse).
    #[error("bad answer: {0}")]
    BadAnswer(String),
}

impl CallError {
    /// A short name for counts: `connect`, `http`, `timeout`, `request` or `bad-answer`.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Self::Connect(_) => "connect",
            Self::Http(_) => "http",
            Self::Timeout(_) => "timeout",
            Self::Request(_) => "request",
            Self::TooLarge | Self::BadAnswer(_) => "bad-answer",
        }
    }

    /// The name a request that got no usable answer is counted under in a report's
    /// `rejected`: `no-answer-<kind>`.
    pub(crate) fn rejection(&self) -> String {
        no_answer(self.kind())
    }

    /// Whether trying again may help (the broker restarting, a connection closed under us).
    fn transient(&self) -> bool {
        matches!(self, Self::Connect(_) | Self::Http(_) | Self::Timeout(_))
    }
}

/// `no-answer-<kind>`: how a request that got no usable answer is counted in `rejected`.
pub(crate) fn no_answer(kind: &str) -> String {
    format!("no-answer-{kind}")
}

/// A session as the broker shows it (`201`, `202`, `GET /v1/sessions/{id}`, its events): the
/// fields the engines read.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct SessionView {
    /// Its id.
    pub session_id: SessionId,
    /// `queued`, `reserved`, …, `ended`.
    pub state: String,
    /// Why it ended.
    #[serde(default)]
    pub end_reason: Option<String>,
    /// Its node, once placed.
    #[serde(default)]
    pub node_id: Option<String>,
    /// Where its player connects over WHEP, once placed.
    #[serde(default)]
    pub whep_url: Option<String>,
    /// The bearer token for that URL (never logged).
    #[serde(default)]
    pub token: Option<String>,
}

impl Api {
    /// The API at `addr`, named `host` in requests, with `api_key` and at most `connections`
    /// calls in flight.
    pub(crate) fn new(
        addr: SocketAddr,
        host: &str,
        api_key: &str,
        connections: usize,
    ) -> Result<Self, CallError> {
        Ok(Self {
            addr,
            host: header(host, "the broker's host")?,
            auth: bearer(api_key, "the API key")?,
            slots: Semaphore::new(connections),
            idle: Mutex::new(Vec::with_capacity(connections)),
        })
    }

    /// One call over a pooled connection, bounded by [`CALL_TIMEOUT`] (the wait for a free
    /// connection included). A body is sent as JSON.
    pub(crate) async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Bytes>,
        idempotency_key: Option<&str>,
    ) -> Result<Reply, CallError> {
        let attempt = async {
            let _slot = self
                .slots
                .acquire()
                .await
                .map_err(|_| CallError::Request("the pool is closed".into()))?;
            let pooled = self
                .idle
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .pop();
            let mut sender = match pooled {
                Some(s) if !s.is_closed() => s,
                _ => handshake(self.addr).await?.0,
            };
            let content_type = body
                .is_some()
                .then(|| HeaderValue::from_static("application/json"));
            let mut request = build(
                method,
                path,
                &self.host,
                &self.auth,
                content_type,
                body.unwrap_or_default(),
            )?;
            if let Some(k) = idempotency_key {
                request
                    .headers_mut()
                    .insert("idempotency-key", header(k, "the idempotency key")?);
            }
            let reply = exchange(&mut sender, request).await?;
            if !sender.is_closed() {
                self.idle
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(sender);
            }
            Ok(reply)
        };
        tokio::time::timeout(CALL_TIMEOUT, attempt)
            .await
            .map_err(|_| CallError::Timeout(CALL_TIMEOUT))?
    }

    /// [`Api::call`] again after transient failures, with backoff, until `deadline`; the
    /// answer and how many times the call was retried.
    pub(crate) async fn call_retrying(
        &self,
        method: Method,
        path: &str,
        body: Option<Bytes>,
        idempotency_key: Option<&str>,
        deadline: Instant,
    ) -> Result<(Reply, u32), CallError> {
        let mut retries = 0u32;
        let mut backoff = BACKOFF_MIN;
        loop {
            match self
                .call(method.clone(), path, body.clone(), idempotency_key)
                .await
            {
                Ok(reply) => return Ok((reply, retries)),
                Err(e) if e.transient() && Instant::now() + backoff < deadline => {
                    tracing::debug!(%path, error = %e, retries, "retrying a call");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    retries += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Opens `GET path` (accepting `accept`) as a long-lived stream on a connection of its
    /// own, outside the pool; a status other than `200` is an error.
    pub(crate) async fn stream(
        &self,
        path: &str,
        accept: &'static str,
    ) -> Result<BodyStream, CallError> {
        let open = async {
            let (mut sender, conn) = handshake(self.addr).await?;
            let mut request = build(
                Method::GET,
                path,
                &self.host,
                &self.auth,
                None,
                Bytes::new(),
            )?;
            request
                .headers_mut()
                .insert(ACCEPT, HeaderValue::from_static(accept));
            sender.ready().await?;
            let response = sender.send_request(request).await?;
            let status = response.status();
            if status != StatusCode::OK {
                conn.abort();
                let body = read_body(response.into_body()).await.unwrap_or_default();
                return Err(CallError::BadAnswer(format!(
                    "GET {path}: {status} {}",
                    problem_detail(&body)
                )));
            }
            Ok(BodyStream {
                body: response.into_body(),
                conn,
            })
        };
        tokio::time::timeout(CALL_TIMEOUT, open)
            .await
            .map_err(|_| CallError::Timeout(CALL_TIMEOUT))?
    }
}

/// One call on a fresh connection to `addr` with the bearer `token` (never logged), bounded
/// by [`CALL_TIMEOUT`]; the body is sent as `content_type`.
pub(crate) async fn call_once(
    addr: SocketAddr,
    method: Method,
    path: &str,
    token: &str,
    content_type: &'static str,
    body: Bytes,
) -> Result<Reply, CallError> {
    let attempt = async {
        let request = build(
            method,
            path,
            &header(&addr.to_string(), "the host")?,
            &bearer(token, "the token")?,
            Some(HeaderValue::from_static(content_type)),
            body,
        )?;
        // The connection ends when the sender is dropped, at the end of this call.
        let (mut sender, _conn) = handshake(addr).await?;
        exchange(&mut sender, request).await
    };
    tokio::time::timeout(CALL_TIMEOUT, attempt)
        .await
        .map_err(|_| CallError::Timeout(CALL_TIMEOUT))?
}

/// A long-lived answer's body, read as it comes; its connection closes when it is dropped.
#[derive(Debug)]
pub(crate) struct BodyStream {
    body: Incoming,
    conn: JoinHandle<()>,
}

impl BodyStream {
    /// The next bytes; `Ok(None)` when the stream ended.
    pub(crate) async fn next_chunk(&mut self) -> Result<Option<Bytes>, CallError> {
        loop {
            match self.body.frame().await {
                None => return Ok(None),
                Some(frame) => {
                    if let Ok(data) = frame?.into_data() {
                        return Ok(Some(data));
                    }
                }
            }
        }
    }
}

impl Drop for BodyStream {
    fn drop(&mut self) {
        // The connection serves this stream only.
        self.conn.abort();
    }
}

/// The parts of an RFC 9457 problem document the engines read.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct Problem {
    /// `https://framecast.dev/problems/<slug>`.
    #[serde(default, rename = "type")]
    pub kind: String,
    /// What went wrong.
    #[serde(default)]
    pub detail: String,
    /// The request field at fault (422).
    #[serde(default)]
    pub field: Option<String>,
}

/// The `detail` of a problem document, or the body's start as text.
pub(crate) fn problem_detail(body: &[u8]) -> String {
    serde_json::from_slice::<Problem>(body)
        .ok()
        .filter(|p| !p.detail.is_empty())
        .map(|p| p.detail)
        .unwrap_or_else(|| String::from_utf8_lossy(body).chars().take(200).collect())
}

/// Why a request was refused, named as the `sim` engine names the placement engine's
/// rejections (`no-capacity`, `rtt-too-high`, `no-region`, `unknown-tier`, `unknown-genre`),
/// or by the problem's kind (`unknown-game`, `too-many-requests`, `conflict`, …), or
/// `http-<status>` when the body is no problem document.
pub(crate) fn rejection_reason(status: StatusCode, body: &[u8]) -> String {
    let Ok(p) = serde_json::from_slice::<Problem>(body) else {
        return format!("http-{}", status.as_u16());
    };
    let slug = p.kind.rsplit('/').next().unwrap_or_default();
    match (slug, p.field.as_deref()) {
        ("unprocessable", Some("regions")) if p.detail.contains("round-trip") => {
            "rtt-too-high".into()
        }
        ("unprocessable", Some("regions")) => "no-region".into(),
        ("unprocessable", Some(field @ ("tier" | "genre" | "game"))) => format!("unknown-{field}"),
        ("", _) => format!("http-{}", status.as_u16()),
        (slug, _) => slug.to_owned(),
    }
}

/// A node of `GET /v1/nodes`: the fields the engines read.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct NodeBody {
    /// `ready`, `cordoned`, `draining` or `down`.
    #[serde(default)]
    pub state: String,
    /// Whether its agent is connected now.
    #[serde(default)]
    pub connected: bool,
    /// Its GPUs.
    #[serde(default)]
    pub gpus: Vec<GpuBody>,
}

/// A GPU of a [`NodeBody`].
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct GpuBody {
    /// Its model.
    #[serde(default)]
    pub model: String,
    /// Slots holding sessions.
    #[serde(default)]
    pub sessions: u64,
    /// Framebuffer, MB.
    #[serde(default)]
    pub framebuffer_mb: u64,
    /// Framebuffer occupied, MB.
    #[serde(default)]
    pub framebuffer_used_mb: u64,
    /// Encoder units leased.
    #[serde(default)]
    pub encoder_used: f64,
}

/// A node list in three figures.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Fleet {
    /// Nodes whose agent is connected.
    pub connected: u64,
    /// GPUs of those nodes.
    pub gpus: u64,
    /// Sessions on every node's GPUs.
    pub sessions: u64,
}

impl Fleet {
    /// The figures of `nodes`.
    pub(crate) fn of(nodes: &[NodeBody]) -> Self {
        let connected = nodes.iter().filter(|n| n.connected);
        Self {
            connected: connected.clone().count() as u64,
            gpus: connected.map(|n| n.gpus.len() as u64).sum(),
            sessions: nodes.iter().flat_map(|n| &n.gpus).map(|g| g.sessions).sum(),
        }
    }
}

/// Why the node list could not be had.
#[derive(Debug, thiserror::Error)]
pub(crate) enum FleetError {
    /// No answer.
    #[error("GET /v1/nodes: {0}")]
    Call(#[from] CallError),
    /// An answer other than `200`.
    #[error("GET /v1/nodes: {status} {detail}")]
    Status {
        /// Its status.
        status: StatusCode,
        /// Its problem's detail.
        detail: String,
    },
    /// Fewer agents than wanted connected in time.
    #[error("{connected} of {want} agents connected within {} s", .limit.as_secs())]
    Absent {
        /// Nodes connected at the limit.
        connected: u64,
        /// Nodes wanted.
        want: u64,
        /// The limit.
        limit: Duration,
    },
}

/// `GET /v1/nodes`.
pub(crate) async fn nodes(api: &Api) -> Result<Vec<NodeBody>, FleetError> {
    let reply = api.call(Method::GET, "/v1/nodes", None, None).await?;
    if reply.status != StatusCode::OK {
        return Err(FleetError::Status {
            status: reply.status,
            detail: problem_detail(&reply.body),
        });
    }
    serde_json::from_slice(&reply.body)
        .map_err(|e| CallError::BadAnswer(format!("the node list does not parse: {e}")).into())
}

/// Reads the node list until `want` agents are connected, for at most `limit`; the list then.
/// `want` 0 takes the first list.
pub(crate) async fn wait_for_agents(
    api: &Api,
    want: u64,
    limit: Duration,
) -> Result<Vec<NodeBody>, FleetError> {
    let deadline = Instant::now() + limit;
    loop {
        let list = nodes(api).await?;
        let connected = Fleet::of(&list).connected;
        if connected >= want {
            return Ok(list);
        }
        if Instant::now() >= deadline {
            return Err(FleetError::Absent {
                connected,
                want,
                limit,
            });
        }
        tokio::time::sleep(AGENTS_POLL).await;
    }
}

/// The histogram latencies (µs) and waits (ms) are recorded in: 1 to 2^40 (µs: 12 days; ms:
/// 34 years), 3 significant digits; values beyond saturate.
pub(crate) fn histogram() -> Histogram<u64> {
    // Constant bounds that hdrhistogram accepts (low ≥ 1, high ≥ 2 × low, sigfig ≤ 5).
    Histogram::new_with_bounds(1, 1 << 40, 3).unwrap_or_else(|_| unreachable!("valid bounds"))
}

/// Records `d` in µs (at least 1) in `h`.
pub(crate) fn record_micros(h: &mut Histogram<u64>, d: Duration) {
    h.saturating_record(u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1));
}

fn header(value: &str, what: &str) -> Result<HeaderValue, CallError> {
    HeaderValue::from_str(value)
        .map_err(|_| CallError::Request(format!("{what} is not a valid header value")))
}

fn bearer(token: &str, what: &str) -> Result<HeaderValue, CallError> {
    let mut v = header(&format!("Bearer {token}"), what)?;
    v.set_sensitive(true);
    Ok(v)
}

fn build(
    method: Method,
    path: &str,
    host: &HeaderValue,
    auth: &HeaderValue,
    content_type: Option<HeaderValue>,
    body: Bytes,
) -> Result<Request<Full<Bytes>>, CallError> {
    let mut r = Request::builder()
        .method(method)
        .uri(path)
        .header(HOST, host.clone())
        .header(AUTHORIZATION, auth.clone());
    if let Some(ct) = content_type {
        r = r.header(CONTENT_TYPE, ct);
    }
    r.body(Full::new(body))
        .map_err(|e| CallError::Request(e.to_string()))
}

/// A connection to `addr`: its sender, and the task that drives it (it ends when the sender
/// is dropped or the peer closes the connection).
async fn handshake(addr: SocketAddr) -> Result<(Sender, JoinHandle<()>), CallError> {
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| {
            CallError::Connect(format!(
                "{addr}: no connection within {} s",
                CONNECT_TIMEOUT.as_secs()
            ))
        })?
        .map_err(|e| CallError::Connect(format!("{addr}: {e}")))?;
    // Small requests: send each at once.
    let _ = stream.set_nodelay(true);
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    let task = tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok((sender, task))
}

/// Sends `request` and reads the answer, its body up to [`MAX_BODY`].
async fn exchange(sender: &mut Sender, request: Request<Full<Bytes>>) -> Result<Reply, CallError> {
    sender.ready().await?;
    let response = sender.send_request(request).await?;
    let status = response.status();
    let body = read_body(response.into_body()).await?;
    Ok(Reply { status, body })
}

/// The body, up to [`MAX_BODY`] bytes.
async fn read_body(mut body: Incoming) -> Result<Bytes, CallError> {
    let mut out = Vec::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            if out.len() + data.len() > MAX_BODY {
                return Err(CallError::TooLarge);
            }
            out.extend_from_slice(&data);
        }
    }
    Ok(Bytes::from(out))
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[test]
    fn rejections_are_named_like_the_engines() {
        let cases = [
            (
                503,
                r#"{"type":"https://framecast.dev/problems/no-capacity","detail":"no GPU slot"}"#,
                "no-capacity",
            ),
            (
                422,
                r#"{"type":"https://framecast.dev/problems/unprocessable","detail":"every region is beyond the genre's round-trip-time cap","field":"regions"}"#,
                "rtt-too-high",
            ),
            (
                422,
                r#"{"type":"https://framecast.dev/problems/unprocessable","detail":"no region in the request has GPU nodes","field":"regions"}"#,
                "no-region",
            ),
            (
                422,
                r#"{"type":"https://framecast.dev/problems/unprocessable","detail":"unknown game","field":"game"}"#,
                "unknown-game",
            ),
            (
                429,
                r#"{"type":"https://framecast.dev/problems/too-many-requests"}"#,
                "too-many-requests",
            ),
            (502, "<html>bad gateway</html>", "http-502"),
            (500, r#"{"title":"x"}"#, "http-500"),
        ];
        for (status, body, want) in cases {
            let status = StatusCode::from_u16(status).unwrap();
            assert_eq!(rejection_reason(status, body.as_bytes()), want, "{body}");
        }
    }

    #[test]
    fn problem_details_are_read_and_other_bodies_cut_short() {
        assert_eq!(
            problem_detail(br#"{"title":"x","detail":"no capacity"}"#),
            "no capacity"
        );
        assert_eq!(problem_detail(b"plain"), "plain");
        assert_eq!(problem_detail(&[b'a'; 500]).len(), 200);
        assert_eq!(problem_detail(&[0xff, 0xfe]), "\u{fffd}\u{fffd}");
    }

    #[test]
    fn unanswered_requests_are_named_by_kind() {
        let cases = [
            (CallError::Connect("x".into()), "no-answer-connect"),
            (CallError::Timeout(CALL_TIMEOUT), "no-answer-timeout"),
            (CallError::TooLarge, "no-answer-bad-answer"),
            (CallError::BadAnswer("x".into()), "no-answer-bad-answer"),
        ];
        for (e, want) in cases {
            assert_eq!(e.rejection(), want, "{e}");
        }
        assert!(CallError::Timeout(CALL_TIMEOUT).transient());
        assert!(!CallError::BadAnswer("x".into()).transient());
    }

    #[test]
    fn the_fleet_counts_connected_nodes_gpus_and_every_session() {
        let nodes: Vec<NodeBody> = serde_json::from_str(
            r#"[{"state":"ready","connected":true,"gpus":[{"sessions":2},{"sessions":0}]},
                {"state":"down","gpus":[{"sessions":1}]}]"#,
        )
        .unwrap();
        assert_eq!(
            Fleet::of(&nodes),
            Fleet {
                connected: 1,
                gpus: 2,
                sessions: 3
            }
        );
    }

    #[test]
    fn the_histogram_takes_a_microsecond_to_days() {
        let mut h = histogram();
        record_micros(&mut h, Duration::ZERO);
        record_micros(&mut h, Duration::from_secs(86_400));
        assert_eq!(h.len(), 2);
        assert_eq!(h.min(), 1);
        assert!(h.max() >= 86_400_000_000);
    }

    /// A server that answers every request on a connection with `status` and `body`.
    async fn serve(status: &'static str, body: Vec<u8>) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let body = body.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let _ = s.read(&mut buf).await;
                    let head = format!(
                        "HTTP/1.1 {status}\r\ncontent-length: {}\r\n\r\n",
                        body.len()
                    );
                    let _ = s.write_all(head.as_bytes()).await;
                    let _ = s.write_all(&body).await;
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn answers_are_read_up_to_the_limit() {
        let addr = serve("200 OK", b"{}".to_vec()).await;
        let api = Api::new(addr, &addr.to_string(), "k", 2).unwrap();
        let reply = api
            .call(Method::GET, "/v1/pools", None, None)
            .await
            .unwrap();
        assert_eq!(
            (reply.status, &reply.body[..]),
            (StatusCode::OK, &b"{}"[..])
        );

        let big = serve("200 OK", vec![b'x'; MAX_BODY + 1]).await;
        let api = Api::new(big, &big.to_string(), "k", 2).unwrap();
        let err = api
            .call(Method::GET, "/v1/nodes", None, None)
            .await
            .unwrap_err();
        assert!(matches!(err, CallError::TooLarge), "{err}");
        let err = call_once(
            big,
            Method::POST,
            "/whep",
            "t",
            "application/sdp",
            Bytes::new(),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, CallError::TooLarge), "{err}");
    }
}
