//! The control link: a QUIC connection with mutual TLS from the agent to its broker.
//!
//! On every connection the agent sends `Hello` with its full state (GPUs, running sessions,
//! warm instances) and its generation, waits for `Welcome` (or a `Goodbye` that says why not),
//! then sends heartbeats at the interval the broker asked for while it executes the broker's
//! messages. When the link drops it keeps its sessions running and reconnects with capped
//! exponential backoff, sending its full state again. A `Goodbye` for an incompatible version,
//! a stale generation or a failed authorisation stops it: retrying would not help.

/// Protocol frames over the link's QUIC stream.
pub mod frames {
    pub use framecast_shared::protocol::quic::*;
}
pub mod generation;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::{mpsc, watch};

use framecast_shared::protocol::handshake::accept_welcome;
use framecast_shared::protocol::{
    GoodbyeReason, Heartbeat, Hello, MIN_SUPPORTED_VERSION, Message, PROTOCOL_VERSION, Welcome,
};

use framecast_shared::protocol::quic::{FrameIoError, read_message, write_message};

/// What the link needs from the rest of the agent.
pub trait AgentState: Send {
    /// The full `hello` for `generation`: GPUs, running sessions, warm instances.
    fn hello(&self, generation: u64) -> Hello;
    /// A heartbeat.
    fn heartbeat(&self, generation: u64, seq: u64) -> Heartbeat;
    /// Executes a message from the broker (`reserve`, `release`, `pool-plan`, `drain`) and
    /// returns the messages to send back.
    fn handle(&mut self, message: Message) -> Vec<Message>;
    /// The broker welcomed the agent (its token key may have changed).
    fn welcomed(&mut self, _welcome: &Welcome) {}
}

/// How to reach the broker.
#[derive(Debug, Clone)]
pub struct LinkConfig {
    /// The broker's QUIC address.
    pub broker: SocketAddr,
    /// The name its certificate must carry.
    pub server_name: String,
    /// TLS: the CA, the agent's certificate and key.
    pub tls: Arc<rustls::ClientConfig>,
    /// Largest frame accepted from the broker.
    pub max_frame: u32,
    /// First reconnect delay; it doubles up to `backoff_max`.
    pub backoff_min: Duration,
    /// Longest reconnect delay.
    pub backoff_max: Duration,
}

/// Where the link is, for `/readyz` and metrics.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkState {
    /// Dialling the broker.
    Connecting,
    /// Welcomed; heartbeats flow.
    Connected,
    /// The last attempt failed; the next one starts after a delay.
    Backoff {
        /// Why the last attempt failed.
        error: String,
    },
    /// The broker refused the agent for good, or the agent shut down.
    Stopped,
}

/// Why the link stopped for good.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The broker said goodbye for a reason retrying cannot fix.
    #[error("the broker refused this agent ({reason:?}): {message}")]
    Refused {
        /// The broker's reason.
        reason: GoodbyeReason,
        /// The broker's words.
        message: String,
    },
    /// The broker chose a protocol version this agent does not speak.
    #[error(transparent)]
    Version(#[from] framecast_shared::protocol::VersionError),
    /// The TLS configuration cannot be used for QUIC.
    #[error("TLS configuration unusable for QUIC: {0}")]
    Tls(String),
    /// The local UDP socket could not be opened.
    #[error("cannot open a UDP socket: {0}")]
    Socket(std::io::Error),
}

/// How one connection ended, when it was not fatal.
#[derive(Debug)]
enum Ended {
    /// Worth another attempt; the reason is logged.
    Retry(String),
    /// The agent is shutting down.
    Shutdown,
}

type Shared = Arc<Mutex<dyn AgentState>>;

/// QUIC keep-alive interval.
const KEEP_ALIVE: Duration = Duration::from_secs(5);
/// A frame the broker does not take within this long means the link is stuck.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Writes a message, bounded by [`WRITE_TIMEOUT`].
async fn send_bounded(
    send: &mut quinn::SendStream,
    message: &Message,
    max_frame: u32,
) -> Result<(), String> {
    match tokio::time::timeout(WRITE_TIMEOUT, write_message(send, message, max_frame)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!(
            "the broker took no data for {} s",
            WRITE_TIMEOUT.as_secs()
        )),
    }
}

/// The link's channels to the rest of the agent.
#[derive(Debug)]
pub struct LinkChannels {
    /// Turns true when the agent shuts down.
    pub shutdown: watch::Receiver<bool>,
    /// Where the link publishes its state.
    pub state: watch::Sender<LinkState>,
    /// Messages the agent sends on its own (a session that ended on the node). Those queued
    /// while the link is down are dropped: the next `hello` carries the full state.
    pub outbox: mpsc::UnboundedReceiver<Message>,
}

/// Runs the link until the broker refuses the agent or `shutdown` turns true.
pub async fn run(
    config: LinkConfig,
    agent: Shared,
    generation: u64,
    channels: LinkChannels,
) -> Result<(), LinkError> {
    let LinkChannels {
        mut shutdown,
        state: state_tx,
        mut outbox,
    } = channels;
    let endpoint = client_endpoint(&config)?;
    let mut delay = config.backoff_min;
    loop {
        let _ = state_tx.send(LinkState::Connecting);
        while outbox.try_recv().is_ok() {}
        let mut welcomed_at = None;
        let outcome = tokio::select! {
            r = session(&endpoint, Ctx { config: &config, agent: &agent, generation, state_tx: &state_tx, welcomed_at: &mut welcomed_at, outbox: &mut outbox }) => r,
            _ = shutdown.changed() => Ok(Ended::Shutdown),
        };
        match outcome {
            Ok(Ended::Shutdown) => {
                let _ = state_tx.send(LinkState::Stopped);
                // A QUIC close with reason "shutdown" tells the broker this is a clean exit;
                // wait briefly so the close frame leaves.
                endpoint.close(0u32.into(), b"shutdown");
                let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
                return Ok(());
            }
            Err(fatal) => {
                let _ = state_tx.send(LinkState::Stopped);
                return Err(fatal);
            }
            Ok(Ended::Retry(error)) => {
                // Only a link that stayed up a while earns a fresh start; a broker that welcomes
                // and drops at once is retried ever more slowly.
                if welcomed_at
                    .is_some_and(|t: std::time::Instant| t.elapsed() >= config.backoff_max)
                {
                    delay = config.backoff_min;
                }
                tracing::warn!(%error, retry_in_ms = delay.as_millis(), "control link down");
                let _ = state_tx.send(LinkState::Backoff { error });
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = shutdown.changed() => {
                        let _ = state_tx.send(LinkState::Stopped);
                        return Ok(());
                    }
                }
                delay = (delay * 2).min(config.backoff_max);
            }
        }
    }
}

fn client_endpoint(config: &LinkConfig) -> Result<quinn::Endpoint, LinkError> {
    let bind: SocketAddr = if config.broker.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        ([0u16; 8], 0).into()
    };
    let mut endpoint = quinn::Endpoint::client(bind).map_err(LinkError::Socket)?;
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(Arc::clone(&config.tls))
        .map_err(|e| LinkError::Tls(e.to_string()))?;
    let mut client = quinn::ClientConfig::new(Arc::new(crypto));
    // Keep-alives hold the connection open whatever heartbeat interval the broker asks for
    // (quinn's idle timeout is 30 s).
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(KEEP_ALIVE));
    client.transport_config(Arc::new(transport));
    endpoint.set_default_client_config(client);
    Ok(endpoint)
}

/// What one connection works with.
struct Ctx<'a> {
    config: &'a LinkConfig,
    agent: &'a Shared,
    generation: u64,
    state_tx: &'a watch::Sender<LinkState>,
    /// Set when the broker welcomes the agent.
    welcomed_at: &'a mut Option<std::time::Instant>,
    outbox: &'a mut mpsc::UnboundedReceiver<Message>,
}

/// One connection, from dialling to its end.
async fn session(endpoint: &quinn::Endpoint, ctx: Ctx<'_>) -> Result<Ended, LinkError> {
    let Ctx {
        config,
        agent,
        generation,
        ..
    } = ctx;
    let retry = |what: &str, e: &dyn std::fmt::Display| Ok(Ended::Retry(format!("{what}: {e}")));
    let connecting = match endpoint.connect(config.broker, &config.server_name) {
        Ok(c) => c,
        Err(e) => return retry("connect", &e),
    };
    let conn = match connecting.await {
        Ok(c) => c,
        Err(e) => return retry("handshake", &e),
    };
    let (mut send, recv) = match conn.open_bi().await {
        Ok(s) => s,
        Err(e) => return retry("open stream", &e),
    };
    // Whatever the agent queued before this point is part of the hello's full state.
    let hello = {
        let agent = lock(agent);
        while ctx.outbox.try_recv().is_ok() {}
        agent.hello(generation)
    };
    if let Err(e) = send_bounded(&mut send, &Message::Hello(hello), config.max_frame).await {
        return retry("send hello", &e);
    }

    // The reader owns the receive side, so no read is ever cancelled half-way through a frame.
    let (tx, mut rx) = mpsc::channel::<Result<Option<Message>, FrameIoError>>(64);
    let max_frame = config.max_frame;
    let reader = tokio::spawn(async move {
        let mut recv = recv;
        loop {
            let r = read_message(&mut recv, max_frame).await;
            let stop = !matches!(r, Ok(Some(_)));
            if tx.send(r).await.is_err() || stop {
                return;
            }
        }
    });
    let ended = converse(&mut send, &mut rx, ctx).await;
    reader.abort();
    conn.close(0u32.into(), b"bye");
    ended
}

async fn converse(
    send: &mut quinn::SendStream,
    rx: &mut mpsc::Receiver<Result<Option<Message>, FrameIoError>>,
    ctx: Ctx<'_>,
) -> Result<Ended, LinkError> {
    let Ctx {
        config,
        agent,
        generation,
        state_tx,
        welcomed_at,
        outbox,
    } = ctx;
    let interval = match rx.recv().await {
        Some(Ok(Some(Message::Welcome(w)))) => {
            accept_welcome(w.protocol_version, MIN_SUPPORTED_VERSION, PROTOCOL_VERSION)?;
            if w.generation != generation {
                return Ok(Ended::Retry(format!(
                    "welcome for generation {}, this agent is {generation}",
                    w.generation
                )));
            }
            lock(agent).welcomed(&w);
            Duration::from_millis(u64::from(w.heartbeat_interval_ms.max(50)))
        }
        Some(Ok(Some(Message::Goodbye(g)))) => return goodbye(g.reason, g.message),
        Some(Ok(Some(other))) => {
            return Ok(Ended::Retry(format!(
                "expected welcome, got {}",
                other.kind()
            )));
        }
        Some(Ok(None)) | None => {
            return Ok(Ended::Retry(
                "the broker closed the stream before welcome".into(),
            ));
        }
        Some(Err(e)) => return Ok(Ended::Retry(format!("reading welcome: {e}"))),
    };
    let _ = state_tx.send(LinkState::Connected);
    *welcomed_at = Some(std::time::Instant::now());
    tracing::info!(broker = %config.broker, generation, "control link up");
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seq = 0u64;
    loop {
        tokio::select! {
            _ = ticks.tick() => {
                seq += 1;
                let hb = lock(agent).heartbeat(generation, seq);
                if let Err(e) = send_bounded(send, &Message::Heartbeat(hb), config.max_frame).await {
                    return Ok(Ended::Retry(format!("send heartbeat: {e}")));
                }
            }
            Some(own) = outbox.recv() => {
                if let Err(e) = send_bounded(send, &own, config.max_frame).await {
                    return Ok(Ended::Retry(format!("send {}: {e}", own.kind())));
                }
            }
            incoming = rx.recv() => {
                let message = match incoming {
                    Some(Ok(Some(m))) => m,
                    Some(Ok(None)) | None => return Ok(Ended::Retry("the broker closed the stream".into())),
                    Some(Err(e)) => return Ok(Ended::Retry(format!("receive: {e}"))),
                };
                if let Message::Goodbye(g) = message {
                    return goodbye(g.reason, g.message);
                }
                if matches!(message, Message::Unknown) {
                    tracing::debug!("ignoring a message type this build does not know");
                    continue;
                }
                let replies = lock(agent).handle(message);
                for reply in replies {
                    if let Err(e) = send_bounded(send, &reply, config.max_frame).await {
                        return Ok(Ended::Retry(format!("send reply: {e}")));
                    }
                }
            }
        }
    }
}

fn goodbye(reason: GoodbyeReason, message: String) -> Result<Ended, LinkError> {
    match reason {
        GoodbyeReason::IncompatibleVersion
        | GoodbyeReason::StaleGeneration
        | GoodbyeReason::Unauthorized => Err(LinkError::Refused { reason, message }),
        _ => Ok(Ended::Retry(format!(
            "broker said goodbye ({reason:?}): {message}"
        ))),
    }
}

fn lock(agent: &Shared) -> std::sync::MutexGuard<'_, dyn AgentState + 'static> {
    // The agent state's invariants do not depend on a critical section completing: a panic in
    // a handler leaves it as the last completed call left it.
    agent.lock().unwrap_or_else(PoisonError::into_inner)
}
