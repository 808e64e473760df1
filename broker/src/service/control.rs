//! The QUIC control plane: agents connect with mutual TLS, say `hello`, and keep one
//! bidirectional stream open for heartbeats, reservations and updates.
//!
//! Per connection: the `hello` is checked (protocol version, region, generation) and reconciled
//! with the engine; an older connection of the same node is closed (fenced); the broker answers
//! `welcome` with its token key and heartbeat interval; then a writer task drains the link's
//! queue while the reader applies what the agent sends. A connection from an older generation
//! than one already seen gets `goodbye { stale-generation }`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};

use framecast_shared::ids::SessionId;
use framecast_shared::protocol::handshake::negotiate;
use framecast_shared::protocol::quic::{FrameIoError, read_message, write_message};
use framecast_shared::protocol::{Drain, Resume};
use framecast_shared::protocol::{Goodbye, GoodbyeReason, Hello, Message, Release, Welcome};
use framecast_shared::state::{EndReason, NodeState, SessionState};
use framecast_shared::time::Timestamp;

use super::{Answer, Broker, Link, Seen, node_write};
use crate::placement::{Engine, ReconcileOutcome};
use crate::store::StoredNode;

/// How long an agent has to say hello after connecting.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// Frames queued for one agent before senders wait.
const LINK_QUEUE: usize = 256;

static CONNECTIONS: AtomicU64 = AtomicU64::new(1);

/// Why the control plane could not start.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The TLS configuration cannot be used for QUIC.
    #[error("control.tls cannot be used for QUIC: {0}")]
    Tls(String),
    /// The UDP socket could not be bound.
    #[error("control.listen {addr}: {error}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        error: std::io::Error,
    },
}

/// A bound QUIC endpoint.
#[derive(Debug)]
pub struct ControlPlane {
    endpoint: quinn::Endpoint,
}

impl ControlPlane {
    /// Binds `addr` with `tls` (a server config that requires client certificates).
    pub fn bind(addr: SocketAddr, tls: Arc<rustls::ServerConfig>) -> Result<Self, ControlError> {
        let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
            .map_err(|e| ControlError::Tls(e.to_string()))?;
        let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
        let mut transport = quinn::TransportConfig::default();
        transport.keep_alive_interval(Some(Duration::from_secs(5)));
        server.transport_config(Arc::new(transport));
        let endpoint = quinn::Endpoint::server(server, addr)
            .map_err(|error| ControlError::Bind { addr, error })?;
        Ok(Self { endpoint })
    }

    /// The bound address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// Accepts agents until `shutdown` turns true, then closes every connection.
    pub async fn serve(self, broker: Broker, mut shutdown: watch::Receiver<bool>) {
        loop {
            tokio::select! {
                incoming = self.endpoint.accept() => {
                    let Some(incoming) = incoming else { break };
                    let broker = broker.clone();
                    tokio::spawn(async move {
                        match incoming.await {
                            Ok(conn) => connection(broker, conn).await,
                            Err(e) => tracing::info!(error = %e, "an agent's handshake failed"),
                        }
                    });
                }
                _ = shutdown.wait_for(|s| *s) => break,
            }
        }
        self.endpoint.close(0u32.into(), b"shutdown");
        let _ = tokio::time::timeout(Duration::from_secs(1), self.endpoint.wait_idle()).await;
    }
}

async fn connection(broker: Broker, conn: quinn::Connection) {
    let remote = conn.remote_address();
    let (mut send, mut recv) = match tokio::time::timeout(HELLO_TIMEOUT, conn.accept_bi()).await {
        Ok(Ok(s)) => s,
        _ => {
            tracing::info!(%remote, "an agent opened no stream");
            return;
        }
    };
    let max_frame = broker.inner.config.control.max_frame_bytes;
    let hello = match tokio::time::timeout(HELLO_TIMEOUT, read(&mut recv, max_frame)).await {
        Ok(Ok(Some(Message::Hello(h)))) => h,
        Ok(Ok(other)) => {
            let what = other.as_ref().map_or("nothing", Message::kind);
            bye(
                &mut send,
                GoodbyeReason::ProtocolError,
                &format!("expected hello, got {what}"),
                max_frame,
            )
            .await;
            return;
        }
        Ok(Err(e)) => {
            tracing::info!(%remote, error = %e, "bad first frame from an agent");
            bye(&mut send, GoodbyeReason::ProtocolError, &e, max_frame).await;
            return;
        }
        Err(_) => {
            tracing::info!(%remote, "no hello in time");
            return;
        }
    };
    let node = hello.node_id.clone();
    let span = tracing::info_span!("agent", node_id = %node, generation = hello.generation);
    let _enter = span.enter();
    drop(_enter);
    let version = match negotiate(&hello) {
        Ok(v) => v,
        Err(e) => {
            bye(
                &mut send,
                GoodbyeReason::IncompatibleVersion,
                &e.to_string(),
                max_frame,
            )
            .await;
            return;
        }
    };
    if let Err(why) = certificate_names(&conn, &hello.node_id) {
        bye(&mut send, GoodbyeReason::Unauthorized, &why, max_frame).await;
        return;
    }
    if hello.region != broker.inner.config.region {
        let why = format!(
            "this broker serves region {}, the agent is in {}",
            broker.inner.config.region, hello.region
        );
        bye(&mut send, GoodbyeReason::Unauthorized, &why, max_frame).await;
        return;
    }
    let (tx, mut rx) = mpsc::channel::<Message>(LINK_QUEUE);
    let conn_id = CONNECTIONS.fetch_add(1, Ordering::Relaxed);
    if let Err((reason, why)) = admit(&broker, &hello, tx.clone(), conn_id).await {
        bye(&mut send, reason, &why, max_frame).await;
        return;
    }
    let welcome = Message::Welcome(Welcome {
        protocol_version: version,
        broker_version: env!("CARGO_PKG_VERSION").into(),
        region: broker.inner.config.region.clone(),
        generation: hello.generation,
        heartbeat_interval_ms: broker.inner.config.control.heartbeat_interval_ms,
        token_public_key: broker.token_public_key().to_vec(),
        tiers: broker.inner.tiers.clone(),
    });
    if write(&mut send, &welcome, max_frame).await.is_err() {
        forget(&broker, &node, conn_id);
        return;
    }
    tracing::info!(node_id = %node, generation = hello.generation, %remote, gpus = hello.gpus.len(), sessions = hello.sessions.len(), "agent connected");
    metrics::counter!(crate::metrics::AGENT_CONNECTS).increment(1);

    // The writer owns the send side; everything for the agent goes through the link's queue.
    let writer_conn = conn.clone();
    let writer = tokio::spawn(async move {
        while let Some(m) = rx.recv().await {
            if write(&mut send, &m, max_frame).await.is_err() {
                // A link nothing can be sent on is no link: close it so the reader ends too
                // and the agent reconnects.
                writer_conn.close(0u32.into(), b"write failed");
                break;
            }
        }
        let _ = send.finish();
    });
    let generation = hello.generation;
    loop {
        let message = match read_message(&mut recv, max_frame).await {
            Ok(Some(m)) => m,
            Ok(None) => break,
            // The connection went away (the agent stopped, the network broke): its liveness
            // timers take it from here.
            Err(e @ FrameIoError::Stream(_)) => {
                tracing::info!(node_id = %node, error = %e, "the link closed");
                break;
            }
            Err(e) => {
                tracing::warn!(node_id = %node, error = %e, "closing the link after a bad frame");
                let _ = tx
                    .send(Message::Goodbye(Goodbye {
                        reason: GoodbyeReason::ProtocolError,
                        message: e.to_string(),
                    }))
                    .await;
                break;
            }
        };
        if !current(&broker, &node, conn_id) {
            // A newer connection of this node took over: this one is fenced.
            break;
        }
        if matches!(message, Message::Heartbeat(_)) && marked_down(&broker, &node) {
            // The node was declared down while its link stayed open; only a fresh hello
            // brings it back (with its full state), so ask for one.
            let _ = tx
                .send(Message::Goodbye(Goodbye {
                    reason: GoodbyeReason::Other,
                    message: "this node was marked down; reconnect and say hello again".into(),
                }))
                .await;
            break;
        }
        on_message(&broker, &node, generation, message).await;
    }
    drop(tx);
    forget(&broker, &node, conn_id);
    let _ = tokio::time::timeout(Duration::from_secs(1), writer).await;
    conn.close(0u32.into(), b"bye");
    tracing::info!(node_id = %node, "agent link closed");
}

/// Reconciles a hello with the engine and registers the link; `Err` when it is stale.
async fn admit(
    broker: &Broker,
    hello: &Hello,
    tx: mpsc::Sender<Message>,
    conn: u64,
) -> Result<(), (GoodbyeReason, String)> {
    let now = Timestamp::now();
    let node = &hello.node_id;
    // Reconcile and register under one lock, so two hellos of one node cannot interleave.
    let (unknown, old, not_held, drain_sync, recorded) = {
        let mut st = broker.state();
        let st = &mut *st;
        // Whether the broker knew the node before this hello. If not, it restarted (or the node
        // is new), and what an operator decided about the node is in the store, if anywhere.
        let known = st.engine.fleet().node_idx.contains_key(node);
        let restored = st.restore_nodes.get(node).cloned();
        let decided = known || restored.is_some();
        // A node to come back cordoned or draining is first registered bare (no GPUs) and put
        // out of service, and only then given its full report, so that the queue, which the
        // report serves, is not placed on it in between.
        let early = !known && (restored.is_some() || hello.draining.is_some());
        let mut sync = None;
        if early {
            let bare = Hello {
                gpus: Vec::new(),
                sessions: Vec::new(),
                warm: Vec::new(),
                ..hello.clone()
            };
            reconciled(st.engine.reconcile(&bare, now), hello)?;
            sync = Some(apply_decisions(
                &mut st.engine,
                hello,
                restored.as_ref(),
                decided,
            ));
        }
        let (adopted, ended, refused) = reconciled(st.engine.reconcile(hello, now), hello)?;
        tracing::info!(node_id = %hello.node_id, adopted, ended, refused, "hello reconciled");
        let sync = match sync {
            Some(sync) => sync,
            None => apply_decisions(&mut st.engine, hello, restored.as_ref(), decided),
        };
        st.restore_nodes.remove(node);
        // Sessions the agent runs that no platform asked for here (the store lost them, or
        // the broker ended them while the agent was away) are released.
        let unknown: Vec<_> = hello
            .sessions
            .iter()
            .filter(|s| !matches!(s.state, SessionState::Ended(_)))
            .filter(|s| !st.sessions.contains_key(&s.session_id))
            .map(|s| s.session_id)
            .collect();
        for s in &unknown {
            let _ = st.engine.release(s, EndReason::Error, now);
        }
        // Sessions from before a broker restart placed on this node: the engine holds those
        // the agent reported; the others end now, as a hello ends any session the agent does
        // not report.
        let not_held = recovered_not_held(&mut st.sessions, &st.engine, hello, now);
        // An adopted drain is recorded like an operator's (a restored one is stored already).
        let recorded = matches!(sync, DrainSync::Adopt(_)).then(|| {
            broker
                .inner
                .writer
                .submit(node_write(&st.engine, node, now))
        });
        let old = broker.inner.links.insert(
            hello.node_id.clone(),
            Link {
                generation: hello.generation,
                tx,
                conn,
                whep_url: hello.whep_url.clone(),
            },
        );
        (unknown, old, not_held, sync, recorded)
    };
    if let Some(old) = old {
        tracing::info!(node_id = %hello.node_id, old_generation = old.generation, "a newer connection replaces the node's link");
        let _ = old.tx.try_send(Message::Goodbye(Goodbye {
            reason: GoodbyeReason::StaleGeneration,
            message: "a newer connection of this node took over".into(),
        }));
    }
    broker.inner.seen.insert(
        hello.node_id.clone(),
        Seen {
            last: Instant::now(),
            suspect: false,
            down: false,
        },
    );
    for s in unknown {
        broker
            .send(
                &hello.node_id,
                Message::Release(Release {
                    session_id: s,
                    reason: EndReason::Error,
                }),
            )
            .await;
    }
    match drain_sync {
        DrainSync::Tell(deadline) => {
            broker.send(node, Message::Drain(Drain { deadline })).await;
        }
        DrainSync::Resume => {
            tracing::info!(node_id = %node, "the agent is still draining, but the node's drain was lifted: telling it to resume");
            broker
                .send(
                    node,
                    Message::Resume(Resume {
                        reason: "the node's drain was lifted while the agent was away".into(),
                    }),
                )
                .await;
        }
        DrainSync::Agree | DrainSync::Adopt(_) => {}
    }
    for (id, reason, tell) in not_held {
        tracing::info!(session_id = %id, node_id = %node, %reason, "the node's agent does not hold this session from before the restart");
        broker.end(&id, reason, tell).await;
    }
    if let Some(recorded) = recorded {
        let written = match recorded {
            Ok(pending) => pending.wait().await,
            Err(e) => Err(e),
        };
        if let Err(e) = written {
            tracing::error!(node_id = %node, error = %e, "could not record the node's drain");
        }
    }
    // The node's newest pool plan, queued behind the welcome: an agent that restarted lost
    // it, and one that only reconnected ignores a plan it holds already.
    let plan = broker
        .state()
        .planning
        .as_mut()
        .and_then(|p| p.take_for_hello(&hello.node_id));
    if let Some(plan) = plan {
        broker.send(&hello.node_id, Message::PoolPlan(plan)).await;
    }
    // The reconcile may have ended sessions the agent no longer runs.
    broker.inner.wake.notify_one();
    Ok(())
}

/// Recovered sessions on `hello`'s node that are still waiting for their agent: the ones the
/// engine now holds (the agent reported them) stop waiting; the others are returned to be
/// ended, with the reason the agent gave when it reported them ended, else `error` (and
/// then the agent is told, in case it holds one the engine refused).
fn recovered_not_held(
    sessions: &mut std::collections::BTreeMap<SessionId, super::Entry>,
    engine: &Engine,
    hello: &Hello,
    now: Timestamp,
) -> Vec<(SessionId, EndReason, bool)> {
    let mut not_held = Vec::new();
    for (id, e) in sessions.iter_mut() {
        if !e.awaiting_agent || e.record.node.as_ref() != Some(&hello.node_id) {
            continue;
        }
        if engine.session_state(id).is_some() {
            e.awaiting_agent = false;
            // The player's input before the restart is unknown: the idle timeout counts from
            // the adoption, not from when the session became active.
            e.last_input.get_or_insert(now);
            continue;
        }
        let reported = hello.sessions.iter().find(|s| &s.session_id == id);
        not_held.push(match reported.map(|s| s.state) {
            Some(SessionState::Ended(reason)) => (*id, reason, false),
            _ => (*id, EndReason::Error, true),
        });
    }
    not_held
}

/// The counts of an applied reconcile, or why the hello is refused.
fn reconciled(
    outcome: Result<ReconcileOutcome, crate::placement::EngineError>,
    hello: &Hello,
) -> Result<(usize, usize, usize), (GoodbyeReason, String)> {
    match outcome {
        Ok(ReconcileOutcome::Stale { current }) => Err((
            GoodbyeReason::StaleGeneration,
            format!(
                "generation {} is older than {current}, which this broker has seen",
                hello.generation
            ),
        )),
        Ok(ReconcileOutcome::Applied {
            adopted,
            ended,
            refused,
        }) => Ok((adopted, ended, refused)),
        // Worth another try later (e.g. after an operator fixes the catalogue).
        Err(e) => Err((
            GoodbyeReason::Other,
            format!("the hello could not be applied: {e}"),
        )),
    }
}

/// Puts into the engine, which knows `hello`'s node, what the broker knows of its cordon or
/// drain: first an operator's decision from before a restart (intent), then, where the broker
/// holds none, the agent's own drain (observed). Returns what is left to tell the agent.
fn apply_decisions(
    engine: &mut Engine,
    hello: &Hello,
    restored: Option<&StoredNode>,
    decided: bool,
) -> DrainSync {
    let node = &hello.node_id;
    if let Some(r) = restored {
        restore_node(engine, r);
    }
    let fleet = engine.fleet();
    let state = fleet
        .node_idx
        .get(node)
        .and_then(|&i| fleet.node(i))
        .map_or(NodeState::Ready, |n| n.state);
    let sync = drain_sync(state, decided, hello.draining);
    if let DrainSync::Adopt(deadline) = sync {
        tracing::info!(node_id = %node, deadline = %deadline.rfc3339(), "the agent is draining and the broker held no decision about the node: it drains here too");
        if let Err(e) = engine.drain(node, deadline) {
            tracing::warn!(node_id = %node, error = %e, "the agent's drain could not be applied");
        }
    }
    sync
}

/// Re-applies an operator's cordon or drain from before a restart to the engine, which has
/// just learnt the node from its hello. A drain past its deadline is applied as it is: the
/// engine's next timer pass ends what still runs there with `drained` and leaves the node
/// cordoned, as it would have had the broker been running.
fn restore_node(engine: &mut Engine, stored: &StoredNode) {
    let node = &stored.node_id;
    let applied = match stored.drain_deadline {
        Some(deadline) => engine.drain(node, deadline),
        None => engine.cordon(node),
    };
    match applied {
        Ok(()) => {
            tracing::info!(node_id = %node, drain_deadline = ?stored.drain_deadline.map(|d| d.rfc3339()), "an operator's cordon or drain from before the restart applies again");
        }
        Err(e) => {
            tracing::warn!(node_id = %node, error = %e, "an operator's cordon or drain from before the restart could not be applied");
        }
    }
}

/// What closes the difference between the broker's drain of a node and its agent's, at the
/// agent's hello.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DrainSync {
    /// They agree, or differ harmlessly: a cordoned node whose agent still drains (it
    /// refuses what the broker does not send; an uncordon sends it a resume).
    Agree,
    /// The agent drains until this deadline and the broker holds no decision about the node
    /// (it restarted without one in its store): the broker drains the node too, so that it
    /// stops choosing a node that refuses.
    Adopt(Timestamp),
    /// The broker drains the node and its agent does not (it restarted): tell the agent.
    Tell(Timestamp),
    /// The agent drains, but the broker had lifted the drain (the resume was lost with the
    /// link): tell the agent to resume.
    Resume,
}

/// Decides [`DrainSync`] from the node's state in the engine after its hello (with the
/// operators' decisions from before a restart applied), whether the broker holds a decision
/// about the node (it knew the node before this hello, or had its cordon or drain stored),
/// and the agent's drain deadline from the hello.
fn drain_sync(broker: NodeState, decided: bool, agent: Option<Timestamp>) -> DrainSync {
    match (broker, agent) {
        (NodeState::Draining { deadline }, None) => DrainSync::Tell(deadline),
        (NodeState::Ready, Some(_)) if decided => DrainSync::Resume,
        (NodeState::Ready, Some(deadline)) => DrainSync::Adopt(deadline),
        _ => DrainSync::Agree,
    }
}

/// Checks that the agent's client certificate (already verified against the fleet's CA) was
/// issued for the node the hello names, so one host's certificate cannot speak for another.
fn certificate_names(
    conn: &quinn::Connection,
    node: &framecast_shared::ids::NodeId,
) -> Result<(), String> {
    let certs = conn
        .peer_identity()
        .and_then(|id| {
            id.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
                .ok()
        })
        .ok_or("the agent presented no certificate")?;
    let leaf = certs.first().ok_or("the agent presented no certificate")?;
    let cert = webpki::EndEntityCert::try_from(leaf)
        .map_err(|e| format!("the agent's certificate cannot be read: {e:?}"))?;
    let name = rustls::pki_types::ServerName::try_from(node.as_str()).map_err(|_| {
        format!("node id {node} is not a DNS name, so no certificate can be bound to it")
    })?;
    cert.verify_is_valid_for_subject_name(&name)
        .map_err(|_| format!("the agent's certificate is not issued for node {node}"))
}

fn marked_down(broker: &Broker, node: &framecast_shared::ids::NodeId) -> bool {
    broker.inner.seen.get(node).is_some_and(|s| s.down)
}

fn current(broker: &Broker, node: &framecast_shared::ids::NodeId, conn: u64) -> bool {
    broker.inner.links.get(node).is_some_and(|l| l.conn == conn)
}

fn forget(broker: &Broker, node: &framecast_shared::ids::NodeId, conn: u64) {
    broker.inner.links.remove_if(node, |_, l| l.conn == conn);
}

async fn on_message(
    broker: &Broker,
    node: &framecast_shared::ids::NodeId,
    generation: u64,
    message: Message,
) {
    let now = Timestamp::now();
    match message {
        Message::Heartbeat(hb) => {
            if let Some(mut seen) = broker.inner.seen.get_mut(node) {
                seen.last = Instant::now();
                seen.suspect = false;
                seen.down = false;
            }
            broker.observe_inputs(node, &hb.inputs);
            let r = broker.state().engine.observe_heartbeat(node, &hb, now);
            if let Err(e) = r {
                tracing::warn!(node_id = %node, error = %e, "heartbeat not applied");
            }
        }
        Message::Reserved(r) => {
            if let Some((_, tx)) = broker.inner.pending.remove(&r.request_id) {
                let _ = tx.send(Answer::Reserved { warm: r.warm });
            }
        }
        Message::Rejected(r) => {
            if let Some((_, tx)) = broker.inner.pending.remove(&r.request_id) {
                let _ = tx.send(Answer::Rejected(format!("{:?}: {}", r.reason, r.detail)));
            }
        }
        Message::SessionUpdate(u) => {
            let applied = {
                let mut st = broker.state();
                let r = st
                    .engine
                    .observe_session(node, u.generation, &u.session_id, u.state, now);
                match (&r, u.state) {
                    (Ok(()), SessionState::Ended(_)) => Ok(st.sessions.remove(&u.session_id)),
                    (Ok(()), state) => {
                        let record = st.sessions.get_mut(&u.session_id).map(|e| {
                            e.record.state = state;
                            if state == SessionState::Active && e.record.active_at.is_none() {
                                e.record.active_at = Some(u.at);
                            }
                            e.record.expires_at = None;
                            e.clone()
                        });
                        Ok(record)
                    }
                    (Err(e), _) => Err(e.to_string()),
                }
            };
            match (applied, u.state) {
                (Ok(entry), SessionState::Ended(reason)) => {
                    broker
                        .finish(&u.session_id, entry, reason, false, now)
                        .await;
                }
                (Ok(Some(entry)), _) => {
                    // Only if it is still stored: an end recorded meanwhile stays ended.
                    broker.write_update(entry.record.clone()).await;
                    let view = broker.view_of(&entry);
                    broker.publish(entry.record.tenant.clone(), view);
                }
                (Ok(None), _) => {}
                (Err(e), _) => {
                    tracing::warn!(node_id = %node, session_id = %u.session_id, error = %e, "session update not applied");
                }
            }
            broker.inner.wake.notify_one();
        }
        Message::Goodbye(g) => {
            tracing::info!(node_id = %node, reason = ?g.reason, message = %g.message, "the agent said goodbye");
        }
        Message::Unknown => {}
        other => {
            tracing::warn!(node_id = %node, generation, kind = other.kind(), "unexpected message from an agent");
        }
    }
}

async fn read(recv: &mut quinn::RecvStream, max_frame: u32) -> Result<Option<Message>, String> {
    read_message(recv, max_frame)
        .await
        .map_err(|e| e.to_string())
}

async fn write(send: &mut quinn::SendStream, m: &Message, max_frame: u32) -> Result<(), String> {
    tokio::time::timeout(Duration::from_secs(10), write_message(send, m, max_frame))
        .await
        .map_err(|_| "the agent took no data for 10 s".to_owned())?
        .map_err(|e| e.to_string())
}

async fn bye(send: &mut quinn::SendStream, reason: GoodbyeReason, message: &str, max_frame: u32) {
    tracing::info!(?reason, %message, "refusing an agent");
    let _ = write(
        send,
        &Message::Goodbye(Goodbye {
            reason,
            message: message.to_owned(),
        }),
        max_frame,
    )
    .await;
    let _ = send.finish();
    // Let the goodbye leave before the connection is dropped.
    tokio::time::sleep(Duration::from_millis(100)).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    const AT: Timestamp = Timestamp::from_millis(1_800_000_600_000);

    #[test]
    fn the_brokers_decision_wins_and_the_agents_drain_fills_in_only_where_it_has_none() {
        let draining = NodeState::Draining { deadline: AT };
        // Agreement, or a harmless difference.
        assert_eq!(drain_sync(NodeState::Ready, true, None), DrainSync::Agree);
        assert_eq!(drain_sync(NodeState::Ready, false, None), DrainSync::Agree);
        assert_eq!(drain_sync(draining, true, Some(AT)), DrainSync::Agree);
        assert_eq!(
            drain_sync(NodeState::Cordoned, true, Some(AT)),
            DrainSync::Agree
        );
        assert_eq!(
            drain_sync(NodeState::Cordoned, true, None),
            DrainSync::Agree
        );
        // A restarted broker with nothing stored takes the agent's drain.
        assert_eq!(
            drain_sync(NodeState::Ready, false, Some(AT)),
            DrainSync::Adopt(AT)
        );
        // A broker that lifted the drain tells the agent again; one that drains tells an
        // agent that restarted.
        assert_eq!(
            drain_sync(NodeState::Ready, true, Some(AT)),
            DrainSync::Resume
        );
        assert_eq!(drain_sync(draining, true, None), DrainSync::Tell(AT));
        assert_eq!(drain_sync(draining, false, None), DrainSync::Tell(AT));
    }
}
