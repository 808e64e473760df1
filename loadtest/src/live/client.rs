//! The HTTP client of a `live` run: a pool of keep-alive HTTP/1.1 connections for the short
//! calls (allocate, look up, end, sample), a connection of its own for each event stream, and
//! retries with backoff while the broker cannot be reached (a restart).

use std::net::SocketAddr;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
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

use super::sse::SseParser;

/// One call taking longer than this is a failed call (retried when the caller allows).
pub(crate) const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Connecting taking longer than this is a failed call.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The first wait before a retry; it doubles up to [`BACKOFF_MAX`].
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// The largest answer body read (the node list of a big fleet is the largest).
const MAX_BODY: usize = 16 * 1024 * 1024;

type Sender = SendRequest<Full<Bytes>>;

/// The broker's API.
#[derive(Debug)]
pub(crate) struct Api {
    addr: SocketAddr,
    host: HeaderValue,
    auth: HeaderValue,
    /// Bounds the short calls in flight to the pool's size.
    slots: Semaphore,
    idle: Mutex<Vec<Sender>>,
}

/// An answer.
#[derive(Debug, Clone)]
pub(crate) struct Reply {
    /// Its status.
    pub status: StatusCode,
    /// Its body.
    pub body: Bytes,
}

/// A call that got no answer.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CallError {
    /// The connection could not be made.
    #[error("connecting to the broker: {0}")]
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
}

impl CallError {
    /// A short name for counts.
    pub(crate) fn kind(&self) -> &'static str {
        match self {
            Self::Connect(_) => "connect",
            Self::Http(_) => "http",
            Self::Timeout(_) => "timeout",
            Self::Request(_) => "request",
            Self::TooLarge => "too-large",
        }
    }

    /// Whether trying again may help (the broker restarting, a connection closed under us).
    fn transient(&self) -> bool {
        matches!(self, Self::Connect(_) | Self::Http(_) | Self::Timeout(_))
    }
}

/// A session as the broker shows it: the fields a run reads.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct View {
    /// Its id.
    pub session_id: String,
    /// `queued`, `reserved`, …, `ended`.
    pub state: String,
    /// Why it ended.
    #[serde(default)]
    pub end_reason: Option<String>,
    /// Its node, once placed.
    #[serde(default)]
    pub node_id: Option<String>,
}

impl Api {
    /// The API at `addr`, named `host` in requests, with `api_key` and at most `connections`
    /// short calls in flight.
    pub(crate) fn new(
        addr: SocketAddr,
        host: &str,
        api_key: &str,
        connections: usize,
    ) -> Result<Self, CallError> {
        let header = |v: String, what: &str| {
            HeaderValue::from_str(&v)
                .map_err(|_| CallError::Request(format!("{what} is not a valid header value")))
        };
        let mut auth = header(format!("Bearer {api_key}"), "the API key")?;
        auth.set_sensitive(true);
        Ok(Self {
            addr,
            host: header(host.to_owned(), "the broker's host")?,
            auth,
            slots: Semaphore::new(connections),
            idle: Mutex::new(Vec::with_capacity(connections)),
        })
    }

    /// One call over a pooled connection, bounded by [`CALL_TIMEOUT`] (the wait for a free
    /// connection included).
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
                _ => self.connect().await?,
            };
            let request = self.request(method, path, body, idempotency_key)?;
            sender.ready().await?;
            let response = sender.send_request(request).await?;
            let status = response.status();
            let body = read_body(response.into_body()).await?;
            if !sender.is_closed() {
                self.idle
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(sender);
            }
            Ok(Reply { status, body })
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

    /// Opens `GET path` as a server-sent event stream on a connection of its own.
    pub(crate) async fn events(&self, path: &str) -> Result<EventStream, CallError> {
        let open = async {
            let stream = self.tcp().await?;
            let (mut sender, conn) =
                hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(stream))
                    .await?;
            let task = tokio::spawn(async move {
                let _ = conn.await;
            });
            let mut request = self.request(Method::GET, path, None, None)?;
            request
                .headers_mut()
                .insert(ACCEPT, HeaderValue::from_static("text/event-stream"));
            sender.ready().await?;
            let response = sender.send_request(request).await?;
            let status = response.status();
            if status != StatusCode::OK {
                task.abort();
                return Ok(Err(Reply {
                    status,
                    body: read_body(response.into_body()).await.unwrap_or_default(),
                }));
            }
            Ok(Ok(EventStream {
                body: response.into_body(),
                parser: SseParser::default(),
                conn: task,
            }))
        };
        match tokio::time::timeout(CALL_TIMEOUT, open).await {
            Err(_) => Err(CallError::Timeout(CALL_TIMEOUT)),
            Ok(Err(e)) => Err(e),
            Ok(Ok(Ok(stream))) => Ok(stream),
            Ok(Ok(Err(reply))) => Err(CallError::Request(format!(
                "GET {path}: {} {}",
                reply.status,
                problem_detail(&reply.body)
            ))),
        }
    }

    fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<Bytes>,
        idempotency_key: Option<&str>,
    ) -> Result<Request<Full<Bytes>>, CallError> {
        let mut r = Request::builder()
            .method(method)
            .uri(path)
            .header(HOST, self.host.clone())
            .header(AUTHORIZATION, self.auth.clone());
        if body.is_some() {
            r = r.header(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        }
        if let Some(k) = idempotency_key {
            r = r.header("idempotency-key", k);
        }
        r.body(Full::new(body.unwrap_or_default()))
            .map_err(|e| CallError::Request(e.to_string()))
    }

    async fn tcp(&self) -> Result<TcpStream, CallError> {
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(self.addr))
            .await
            .map_err(|_| {
                CallError::Connect(format!(
                    "{} did not answer within {} s",
                    self.addr,
                    CONNECT_TIMEOUT.as_secs()
                ))
            })?
            .map_err(|e| CallError::Connect(format!("{}: {e}", self.addr)))?;
        // Small requests: send each at once.
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }

    async fn connect(&self) -> Result<Sender, CallError> {
        let stream = self.tcp().await?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            // Ends when the sender is dropped or the broker closes the connection.
            let _ = conn.await;
        });
        Ok(sender)
    }
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

/// An open event stream of one session.
#[derive(Debug)]
pub(crate) struct EventStream {
    body: Incoming,
    parser: SseParser,
    conn: JoinHandle<()>,
}

impl EventStream {
    /// The next session view the stream carries; `Ok(None)` when the stream ended.
    pub(crate) async fn next_view(&mut self) -> Result<Option<View>, CallError> {
        loop {
            while let Some(event) = self.parser.next_event() {
                if let Ok(view) = serde_json::from_str::<View>(&event.data) {
                    return Ok(Some(view));
                }
            }
            match self.body.frame().await {
                None => return Ok(None),
                Some(frame) => {
                    if let Ok(data) = frame?.into_data() {
                        self.parser
                            .feed(&data)
                            .map_err(|e| CallError::Request(e.to_string()))?;
                    }
                }
            }
        }
    }
}

impl Drop for EventStream {
    fn drop(&mut self) {
        // The connection serves this stream only.
        self.conn.abort();
    }
}

/// The parts of an RFC 9457 problem document a run reads.
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

/// The `detail` of a problem document, or the body as text.
pub(crate) fn problem_detail(body: &[u8]) -> String {
    serde_json::from_slice::<Problem>(body)
        .map(|p| p.detail)
        .unwrap_or_else(|_| String::from_utf8_lossy(body).chars().take(200).collect())
}

/// Why a request was refused, named as the `sim` engine names the placement engine's
/// rejections (`no-capacity`, `rtt-too-high`, `no-region`, `unknown-tier`, `unknown-genre`),
/// or by the problem's kind (`unknown-game`, `too-many-requests`, `conflict`, …).
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

#[cfg(test)]
mod tests {
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
        assert_eq!(problem_detail(br#"{"detail":"d"}"#), "d");
        assert_eq!(problem_detail(b"plain"), "plain");
    }
}
