//! The broker service: the placement engine behind a lock, the agents' control links, the
//! durable store, session tokens, and the operations the HTTP API offers.
//!
//! The engine stays a sans-IO core: every call passes `now`, and what it decides on its own
//! (a queued request placed, a reservation expired, a node lost) comes out as events that
//! [`driver`] turns into messages to agents, store writes and session events. The lock on it
//! is a plain mutex, held for engine calls only and never across an `.await`.
//!
//! - [`control`]: the QUIC control plane agents connect to;
//! - [`driver`]: timers, node liveness and the engine's events;
//! - [`planning`]: the pool planner's inputs, rounds and plans;
//! - [`tenants`]: API keys and rate limits;
//! - [`view`]: what the API shows of a session;
//! - [`webhook`]: the fleet recommendation posted to an autoscaler.

pub mod control;
pub mod driver;
pub mod planning;
pub mod tenants;
pub mod view;
pub mod webhook;
mod writer;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use dashmap::DashMap;
use tokio::sync::{Notify, broadcast, mpsc, oneshot, watch};

use framecast_shared::config::BrokerConfig;
use framecast_shared::config::broker::TenantConfig;
use framecast_shared::ids::{GameId, GenreName, NodeId, RegionName, SessionId, TierName};
use framecast_shared::protocol::{Message, Release, Reserve};
use framecast_shared::state::{EndReason, NodeState, SessionState};
use framecast_shared::tier::TierPreset;
use framecast_shared::time::Timestamp;
use framecast_shared::token::{Claims, TokenSigner};

use crate::placement::{
    Decision, Engine, EngineConfig, EngineEvent, Fallback, PlaceRequest, Placement, Priority,
    RegionRtt, RejectReason, strategy,
};
use crate::store::{
    Claim, IdempotencyRecord, Store, StoreError, StoredNode, StoredSession, Write, Written,
};
use tenants::{RateLimits, Tenants};
use view::{CreateSession, SessionView};

/// How long the broker waits for an agent to confirm a reservation.
pub const RESERVE_TIMEOUT: Duration = Duration::from_secs(5);
/// Placements tried for one request when agents refuse what the engine chose.
const PLACE_ATTEMPTS: usize = 3;
/// Ended sessions kept in memory for `GET /v1/sessions/{id}`.
const ENDED_KEPT: usize = 10_000;
/// Idempotency keys are kept this long.
pub const IDEMPOTENCY_TTL: Duration = Duration::from_secs(24 * 3600);

/// Why an operation failed, in terms the API maps to status codes.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ServiceError {
    /// The request is malformed (400).
    #[error("{0}")]
    BadRequest(String),
    /// The caller may not do this (403).
    #[error("{0}")]
    Forbidden(String),
    /// No such session or node (404).
    #[error("{0}")]
    NotFound(String),
    /// The request conflicts with an earlier one (409).
    #[error("{0}")]
    Conflict(String),
    /// The request names something the broker does not have (422).
    #[error("{detail}")]
    Unprocessable {
        /// The body field at fault.
        field: &'static str,
        /// Why.
        detail: String,
    },
    /// The tenant's rate or session quota is used up (429).
    #[error("{detail}")]
    TooMany {
        /// Why.
        detail: String,
        /// When to try again, s.
        retry_after_s: u32,
    },
    /// No capacity and queueing was not allowed, or the fleet refused (503).
    #[error("{detail}")]
    Unavailable {
        /// Why.
        detail: String,
        /// When trying again may help, s.
        retry_after_s: Option<u32>,
    },
    /// The broker failed (500).
    #[error("{0}")]
    Internal(String),
}

/// How a created session came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Created {
    /// It holds a slot (201).
    Reserved,
    /// It waits in the queue (202).
    Queued,
}

/// A change to a session, for `GET /v1/sessions/{id}/events`.
#[derive(Debug, Clone)]
pub struct SessionEvent {
    /// The session's tenant (events are only shown to it).
    pub tenant: framecast_shared::ids::TenantId,
    /// The session as it is now.
    pub view: SessionView,
}

/// One session the broker tracks.
#[derive(Debug, Clone)]
struct Entry {
    record: StoredSession,
    token: Option<String>,
    whep_url: Option<String>,
    /// The player's last input, as the agent reported it.
    last_input: Option<Timestamp>,
    /// Placed before a broker restart, and not yet reported by its node's agent: the engine
    /// does not hold it until that agent's hello does.
    awaiting_agent: bool,
}

/// A connected agent.
#[derive(Debug, Clone)]
pub(crate) struct Link {
    generation: u64,
    /// Frames to send to the agent.
    tx: mpsc::Sender<Message>,
    /// The connection's number, so a closing connection removes only itself.
    conn: u64,
    whep_url: Option<String>,
}

/// When an agent was last heard, and what its silence made of it.
#[derive(Debug, Clone, Copy)]
struct Seen {
    last: Instant,
    suspect: bool,
    down: bool,
}

/// Why a placement could not be held.
#[derive(Debug)]
enum Hold {
    /// The agent refused or did not answer.
    Refused(String),
    /// The session ended meanwhile.
    Gone,
}

/// What an agent answered to a `reserve`.
#[derive(Debug, Clone)]
enum Answer {
    Reserved { warm: bool },
    Rejected(String),
}

struct State {
    engine: Engine,
    sessions: BTreeMap<SessionId, Entry>,
    /// The last sessions that ended, newest last, so `GET` answers for them without the
    /// audit log.
    ended: std::collections::VecDeque<(framecast_shared::ids::TenantId, SessionView)>,
    limits: RateLimits,
    /// Queued sessions from before a restart that the engine could not queue yet (no agent
    /// had said hello, so it knew no region); tried again every tick.
    requeue: Vec<SessionId>,
    /// Placements made outside a request (a requeue) waiting to be reserved on their agents.
    engine_placed: Vec<Placement>,
    /// The pool planner, beside the engine it reads; `None` when `planner.enabled` is off.
    planning: Option<planning::Planning>,
    /// Operators' cordons and drains from before a restart, by node, not yet re-applied to
    /// the engine: each is applied when its node's agent first says hello.
    restore_nodes: HashMap<NodeId, StoredNode>,
}

/// Everything the service shares between its tasks.
pub(crate) struct Inner {
    config: BrokerConfig,
    tiers: Vec<TierPreset>,
    tenants: Tenants,
    state: Mutex<State>,
    links: DashMap<NodeId, Link>,
    seen: DashMap<NodeId, Seen>,
    store: Store,
    /// Every store write goes through it (group commit).
    writer: writer::StoreWriter,
    signer: TokenSigner,
    events: broadcast::Sender<SessionEvent>,
    pending: DashMap<u64, oneshot::Sender<Answer>>,
    next_id: AtomicU64,
    /// Wakes the driver after a change that may have produced engine events.
    wake: Notify,
    /// When this process started (sessions of agents that never come back end after a grace).
    started: Instant,
    /// The planner's newest fleet recommendation, for the webhook.
    recommendation: watch::Sender<webhook::Latest>,
}

/// The broker, cheap to clone.
#[derive(Clone)]
pub struct Broker {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("region", &self.inner.config.region)
            .field("links", &self.inner.links.len())
            .finish_non_exhaustive()
    }
}

/// `state` and `end_reason` words for the API.
pub fn state_words(state: SessionState) -> (&'static str, Option<String>) {
    match state {
        SessionState::Queued => ("queued", None),
        SessionState::Reserved => ("reserved", None),
        SessionState::Connecting => ("connecting", None),
        SessionState::Active => ("active", None),
        SessionState::Reconnecting => ("reconnecting", None),
        SessionState::Ended(r) => ("ended", Some(r.to_string())),
    }
}

impl Broker {
    /// A broker for `config` over `store`, signing tokens with `signer`. Sessions the store
    /// holds from before a restart are taken back: queued ones re-enter the queue, placed ones
    /// wait for their agents' hellos.
    pub fn new(
        config: BrokerConfig,
        store: Store,
        signer: TokenSigner,
    ) -> Result<Self, ServiceError> {
        let tiers = config.tier_presets();
        let engine = Engine::new(
            tiers.clone(),
            config.genre_profiles(),
            EngineConfig::from_broker(&config),
            strategy::by_name("genre-weighted", 0)
                .ok_or_else(|| ServiceError::Internal("no genre-weighted strategy".into()))?,
        );
        let (events, _) = broadcast::channel(1024);
        let tenants = Tenants::new(&config.tenants);
        let planning = planning::Planning::new(
            &config.planner,
            Duration::from_millis(u64::from(config.control.heartbeat_interval_ms)),
        )
        .map_err(|e| ServiceError::Internal(format!("[planner]: {e}")))?;
        let broker = Self {
            inner: Arc::new(Inner {
                tiers,
                tenants,
                state: Mutex::new(State {
                    engine,
                    sessions: BTreeMap::new(),
                    ended: std::collections::VecDeque::new(),
                    limits: RateLimits::default(),
                    requeue: Vec::new(),
                    engine_placed: Vec::new(),
                    planning,
                    restore_nodes: HashMap::new(),
                }),
                links: DashMap::new(),
                seen: DashMap::new(),
                writer: writer::StoreWriter::start(store.clone())
                    .map_err(|e| ServiceError::Internal(format!("store writer: {e}")))?,
                store,
                signer,
                events,
                pending: DashMap::new(),
                next_id: AtomicU64::new(1),
                wake: Notify::new(),
                started: Instant::now(),
                recommendation: watch::Sender::new(None),
                config,
            }),
        };
        broker.recover()?;
        Ok(broker)
    }

    /// The configuration.
    pub fn config(&self) -> &BrokerConfig {
        &self.inner.config
    }

    /// The tenants.
    pub fn tenants(&self) -> &Tenants {
        &self.inner.tenants
    }

    /// The key agents verify session tokens with.
    pub fn token_public_key(&self) -> [u8; 32] {
        self.inner.signer.public_key()
    }

    /// Subscribes to session changes.
    pub fn subscribe(&self) -> broadcast::Receiver<SessionEvent> {
        self.inner.events.subscribe()
    }

    /// Follows the pool planner's fleet recommendation: a new value whenever it changes.
    pub fn recommendations(&self) -> watch::Receiver<webhook::Latest> {
        self.inner.recommendation.subscribe()
    }

    /// The tier presets, smallest framebuffer first.
    pub fn tier_presets(&self) -> &[TierPreset] {
        &self.inner.tiers
    }

    /// Whether the broker can serve: its store answers.
    pub fn ready(&self) -> Result<(), String> {
        self.inner
            .store
            .session(&SessionId::new(Timestamp::EPOCH, 0))
            .map(|_| ())
            .map_err(|e| format!("store: {e}"))
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // The engine's invariants hold between calls; a panic mid-call is a bug the audit in
        // tests catches, and serving on is better than refusing every request after it.
        self.inner
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `f` on the engine (read-only views for the API).
    pub fn with_engine<T>(&self, f: impl FnOnce(&Engine) -> T) -> T {
        f(&self.state().engine)
    }

    fn recover(&self) -> Result<(), ServiceError> {
        let stored = self
            .inner
            .store
            .sessions()
            .map_err(|e| ServiceError::Internal(e.to_string()))?;
        let nodes = self
            .inner
            .store
            .nodes()
            .map_err(|e| ServiceError::Internal(e.to_string()))?;
        let mut st = self.state();
        for record in stored {
            let queued = record.state == SessionState::Queued;
            if queued {
                st.requeue.push(record.session_id);
            }
            st.sessions.insert(
                record.session_id,
                Entry {
                    record,
                    token: None,
                    whep_url: None,
                    last_input: None,
                    awaiting_agent: !queued,
                },
            );
        }
        for node in nodes {
            st.restore_nodes.insert(node.node_id.clone(), node);
        }
        tracing::info!(
            sessions = st.sessions.len(),
            nodes = st.restore_nodes.len(),
            "sessions and operators' node decisions recovered from the store"
        );
        drop(st);
        self.inner.wake.notify_one();
        Ok(())
    }

    // ---- sessions ---------------------------------------------------------------------

    /// `POST /v1/sessions`.
    ///
    /// The session is tracked and stored (with its idempotency claim) before the engine sees
    /// it, so whatever happens meanwhile — a DELETE, the queue placing it, a restart — finds
    /// it; a request that fails leaves nothing behind.
    pub async fn create_session(
        &self,
        tenant: &TenantConfig,
        body: CreateSession,
        body_sha256: [u8; 32],
        idempotency_key: Option<String>,
    ) -> Result<(Created, SessionView), ServiceError> {
        let now = Timestamp::now();
        let (game, tier, genre) = self.validate(&body)?;
        if let Some(key) = &idempotency_key {
            if key.is_empty() || key.len() > 255 {
                return Err(ServiceError::BadRequest(
                    "Idempotency-Key must be 1 to 255 characters".into(),
                ));
            }
            let existing = self
                .inner
                .store
                .idempotency_get(&tenant.id, key)
                .map_err(internal)?;
            if let Some(claim) = existing {
                return self.replay(&claim, body_sha256);
            }
        }
        let preset = self.preset(&tier)?;
        let record = StoredSession {
            session_id: SessionId::new(now, fastrand::u128(..)),
            tenant: tenant.id.clone(),
            game,
            tier,
            genre,
            player_id: body.player_id.clone(),
            priority: body.priority.clone().unwrap_or_else(|| "normal".into()),
            regions: self.regions(&body)?,
            state: SessionState::Queued,
            node: None,
            gpu: None,
            slot: None,
            created_at: now,
            placed_at: None,
            active_at: None,
            expires_at: None,
            idempotency_key: idempotency_key.clone(),
            framebuffer_mb: preset.framebuffer.megabytes().get(),
            compute_sixteenths: preset.compute_share.sixteenths(),
        };
        let mut request = place_request(&record, body.queue.unwrap_or(true));
        request.priority = parse_priority(body.priority.as_deref())?;
        request.fallbacks = parse_fallbacks(&body.fallbacks)?;
        let id = record.session_id;
        {
            let mut st = self.state();
            if let Err(retry_after_s) = st.limits.take(tenant, now) {
                return Err(ServiceError::TooMany {
                    detail: format!(
                        "tenant {} is over its {} requests per minute",
                        tenant.id,
                        tenant.requests_per_minute.unwrap_or_default()
                    ),
                    retry_after_s,
                });
            }
            if let Some(max) = tenant.max_sessions {
                let live = st
                    .sessions
                    .values()
                    .filter(|e| e.record.tenant == tenant.id)
                    .count();
                if live >= usize::try_from(max).unwrap_or(usize::MAX) {
                    return Err(ServiceError::TooMany {
                        detail: format!("tenant {} holds its quota of {max} sessions", tenant.id),
                        retry_after_s: 30,
                    });
                }
            }
            // Counted against the quota from here on.
            st.sessions.insert(
                id,
                Entry {
                    record: record.clone(),
                    token: None,
                    whep_url: None,
                    last_input: None,
                    awaiting_agent: false,
                },
            );
            // Demand, whether or not it can be served: in this broker's region, the only one
            // its agents may be in.
            if let Some(p) = st.planning.as_mut() {
                p.request(&self.inner.config.region, &record.tier, &record.game);
            }
        }
        let idem = idempotency_key.clone().map(|key| IdempotencyRecord {
            tenant: tenant.id.clone(),
            key,
            request_sha256: body_sha256,
            session_id: id,
            created_at: now,
        });
        let claim = self
            .write(Write::Create {
                session: record.clone(),
                idempotency: idem,
            })
            .await;
        match claim {
            Ok(Written::Created(Claim::Inserted)) => {}
            Ok(Written::Created(Claim::Existing(first))) => {
                // Another request with the same key won the race.
                self.state().sessions.remove(&id);
                return self.replay(&first, body_sha256);
            }
            Ok(other) => {
                self.state().sessions.remove(&id);
                return Err(ServiceError::Internal(format!(
                    "unexpected store answer {other:?}"
                )));
            }
            Err(e) => {
                self.state().sessions.remove(&id);
                return Err(e);
            }
        }
        let started = Instant::now();
        let outcome = self.place(id, request).await;
        metrics::histogram!(crate::metrics::ALLOCATION_SECONDS)
            .record(started.elapsed().as_secs_f64());
        let created = match outcome {
            Ok(created) => created,
            Err(e) => {
                // Never placed: forget it entirely, claim included, so a retry tries again.
                let removed = self.state().sessions.remove(&id).is_some();
                if removed {
                    let _ = self
                        .write(Write::Discard {
                            id,
                            idempotency: idempotency_key.clone().map(|k| (tenant.id.clone(), k)),
                        })
                        .await;
                }
                let outcome = match &e {
                    ServiceError::Unavailable { .. } => "unavailable",
                    _ => "rejected",
                };
                metrics::counter!(crate::metrics::ALLOCATIONS, "outcome" => outcome).increment(1);
                return Err(e);
            }
        };
        let Some(view) = self.live_view(&id) else {
            // Ended meanwhile (a DELETE raced the creation); its end is already recorded.
            return Err(ServiceError::Conflict(format!(
                "session {id} was ended while it was being created"
            )));
        };
        metrics::counter!(crate::metrics::ALLOCATIONS, "outcome" => match created {
            Created::Reserved => "reserved",
            Created::Queued => "queued",
        })
        .increment(1);
        self.publish(tenant.id.clone(), view.clone());
        Ok((created, view))
    }

    /// Writes to the store through the group-commit writer.
    async fn write(&self, write: Write) -> Result<Written, ServiceError> {
        self.inner.writer.write(write).await.map_err(internal)
    }

    /// Records the session's current state, if it is still stored.
    pub(crate) async fn write_update(&self, record: StoredSession) {
        let id = record.session_id;
        if let Err(e) = self.write(Write::Update(record)).await {
            tracing::error!(session_id = %id, error = %e, "could not record a session's state");
        }
    }

    /// The view of a live session.
    fn live_view(&self, id: &SessionId) -> Option<SessionView> {
        let entry = self.state().sessions.get(id).cloned()?;
        Some(self.view_of(&entry))
    }

    /// The answer to a retried request with a claimed idempotency key.
    fn replay(
        &self,
        claim: &IdempotencyRecord,
        body_sha256: [u8; 32],
    ) -> Result<(Created, SessionView), ServiceError> {
        if claim.request_sha256 != body_sha256 {
            return Err(ServiceError::Conflict(
                "this Idempotency-Key was used with another request body".into(),
            ));
        }
        let view = self
            .session_view(&claim.tenant, &claim.session_id)
            .ok_or_else(|| {
                ServiceError::Conflict(format!(
                    "this Idempotency-Key created session {}, which has ended",
                    claim.session_id
                ))
            })?;
        let created = if view.state == "queued" {
            Created::Queued
        } else {
            Created::Reserved
        };
        Ok((created, view))
    }

    /// The game, tier, genre and regions a request names, checked against the configuration.
    pub fn resolve(&self, body: &CreateSession) -> Result<Resolved, ServiceError> {
        let (game, tier, genre) = self.validate(body)?;
        Ok((game, tier, genre, self.regions(body)?))
    }

    fn validate(
        &self,
        body: &CreateSession,
    ) -> Result<(GameId, TierName, GenreName), ServiceError> {
        let config = &self.inner.config;
        let game_cfg = config
            .games
            .iter()
            .find(|g| g.id.as_str() == body.game)
            .ok_or_else(|| ServiceError::Unprocessable {
                field: "game",
                detail: format!("unknown game {:?}", body.game),
            })?;
        let tier = config
            .tiers
            .keys()
            .find(|t| t.as_str() == body.tier)
            .cloned()
            .ok_or_else(|| ServiceError::Unprocessable {
                field: "tier",
                detail: format!(
                    "unknown tier {:?}; this broker has {}",
                    body.tier,
                    config
                        .tiers
                        .keys()
                        .map(|t| t.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            })?;
        if !game_cfg.tiers.is_empty() && !game_cfg.tiers.contains(&tier) {
            return Err(ServiceError::Unprocessable {
                field: "tier",
                detail: format!("{} is not offered at {tier}", game_cfg.id),
            });
        }
        let genre = match &body.genre {
            None => game_cfg.genre.clone(),
            Some(g) => config
                .genres
                .keys()
                .find(|k| k.as_str() == g)
                .cloned()
                .ok_or_else(|| ServiceError::Unprocessable {
                    field: "genre",
                    detail: format!("unknown genre {g:?}"),
                })?,
        };
        if body.player_id.is_empty() || body.player_id.len() > 256 {
            return Err(ServiceError::BadRequest(
                "player_id must be 1 to 256 characters".into(),
            ));
        }
        Ok((game_cfg.id.clone(), tier, genre))
    }

    fn regions(&self, body: &CreateSession) -> Result<Vec<(RegionName, u32)>, ServiceError> {
        if body.regions.is_empty() {
            return Ok(vec![(self.inner.config.region.clone(), 0)]);
        }
        body.regions
            .iter()
            .map(|r| {
                RegionName::new(&r.name)
                    .map(|name| (name, r.rtt_ms))
                    .map_err(|e| ServiceError::Unprocessable {
                        field: "regions",
                        detail: format!("region {:?}: {e}", r.name),
                    })
            })
            .collect()
    }

    fn preset(&self, tier: &TierName) -> Result<TierPreset, ServiceError> {
        self.inner
            .tiers
            .iter()
            .find(|t| &t.name == tier)
            .cloned()
            .ok_or_else(|| ServiceError::Internal(format!("tier {tier} has no preset")))
    }

    /// Places session `id` (already tracked and stored) and holds its slot on the agent; up to
    /// [`PLACE_ATTEMPTS`] placements when agents refuse.
    async fn place(&self, id: SessionId, request: PlaceRequest) -> Result<Created, ServiceError> {
        let mut last_refusal = String::new();
        for _ in 0..PLACE_ATTEMPTS {
            let now = Timestamp::now();
            let decision = self.state().engine.place(request.clone(), now);
            match decision {
                Decision::Queued(q) => {
                    tracing::info!(session_id = %id, position = q.position, "queued");
                    return Ok(Created::Queued);
                }
                Decision::Rejected { reason } => return Err(rejection(reason)),
                Decision::Placed(p) => match self.hold(&p).await {
                    Ok(()) => return Ok(Created::Reserved),
                    Err(Hold::Gone) => return Ok(Created::Reserved),
                    Err(Hold::Refused(why)) => {
                        tracing::warn!(session_id = %id, node = %p.node, %why, "the agent refused the reservation");
                        last_refusal = why;
                        let _ =
                            self.state()
                                .engine
                                .release(&id, EndReason::Error, Timestamp::now());
                    }
                },
            }
        }
        Err(ServiceError::Unavailable {
            detail: format!("the chosen nodes refused the session: {last_refusal}"),
            retry_after_s: Some(5),
        })
    }

    /// Reserves placement `p` on its agent and records it on the session. When the agent
    /// does not confirm, the slot is released there too (it may have held it after all).
    /// `Gone`: the session ended meanwhile; the agent was told to free the slot.
    async fn hold(&self, p: &Placement) -> Result<(), Hold> {
        let record = {
            let mut st = self.state();
            match st.sessions.get(&p.session_id) {
                Some(e) => e.record.clone(),
                None => {
                    // Placed for a request nobody tracks any more: give the slot back.
                    let _ = st
                        .engine
                        .release(&p.session_id, EndReason::Released, Timestamp::now());
                    return Err(Hold::Gone);
                }
            }
        };
        let release = Message::Release(Release {
            session_id: p.session_id,
            reason: EndReason::Released,
        });
        let (entry, warm) = match self.reserve_on_agent(&record, p).await {
            Ok(held) => held,
            Err(why) => {
                self.send(&p.node, release).await;
                return Err(Hold::Refused(why));
            }
        };
        let updated = {
            let mut st = self.state();
            let st = &mut *st;
            match st.sessions.get_mut(&p.session_id) {
                Some(e) => {
                    *e = entry.clone();
                    if let Some(planning) = st.planning.as_mut() {
                        planning.placed(&p.region, &p.tier, &record.game, warm);
                    }
                    true
                }
                None => false,
            }
        };
        if !updated {
            // A DELETE (or a timer) ended it while the agent was answering.
            self.send(&p.node, release).await;
            return Err(Hold::Gone);
        }
        let labels = [
            ("region", p.region.to_string()),
            ("tier", p.tier.to_string()),
            ("game", record.game.to_string()),
        ];
        let counter = if warm {
            crate::metrics::POOL_WARM_HITS
        } else {
            crate::metrics::POOL_COLD_STARTS
        };
        metrics::counter!(counter, &labels).increment(1);
        if p.reprofile {
            metrics::counter!(crate::metrics::POOL_REPROFILES, "cause" => "placement").increment(1);
        }
        self.write_update(entry.record.clone()).await;
        Ok(())
    }

    /// Asks the placement's agent to hold the slot; on success the entry with its token, and
    /// whether the agent gave it a warm instance.
    async fn reserve_on_agent(
        &self,
        record: &StoredSession,
        p: &Placement,
    ) -> Result<(Entry, bool), String> {
        let preset = self.preset(&p.tier).map_err(|e| e.to_string())?;
        let link = self
            .inner
            .links
            .get(&p.node)
            .map(|l| l.clone())
            .ok_or_else(|| format!("{} is not connected", p.node))?;
        let request_id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.inner.pending.insert(request_id, tx);
        let reserve = Message::Reserve(Reserve {
            request_id,
            session_id: record.session_id,
            game: record.game.clone(),
            tier: p.tier.clone(),
            gpu: p.gpu.clone(),
            slot: p.slot,
            framebuffer: preset.framebuffer.megabytes(),
            compute_share: preset.compute_share,
            encoder: preset.encoder_cost,
            expires_at: p.expires_at,
        });
        let sent = link.tx.send(reserve).await;
        let answer = match sent {
            Ok(()) => tokio::time::timeout(RESERVE_TIMEOUT, rx).await,
            Err(_) => {
                self.inner.pending.remove(&request_id);
                return Err(format!("the link to {} closed", p.node));
            }
        };
        self.inner.pending.remove(&request_id);
        let warm = match answer {
            Ok(Ok(Answer::Reserved { warm })) => warm,
            Ok(Ok(Answer::Rejected(why))) => return Err(why),
            Ok(Err(_)) => return Err(format!("the link to {} closed", p.node)),
            Err(_) => {
                return Err(format!(
                    "{} did not answer within {} s",
                    p.node,
                    RESERVE_TIMEOUT.as_secs()
                ));
            }
        };
        let now = Timestamp::now();
        let mut rec = record.clone();
        rec.state = SessionState::Reserved;
        rec.node = Some(p.node.clone());
        rec.gpu = Some(p.gpu.clone());
        rec.slot = Some(p.slot);
        rec.tier = p.tier.clone();
        rec.placed_at = Some(now);
        rec.expires_at = Some(p.expires_at);
        let token = self.inner.signer.sign(&Claims {
            session_id: rec.session_id,
            node_id: p.node.clone(),
            issued_at: now,
            // The token is good for as long as the session may run (reconnects included).
            expires_at: now.saturating_add(self.max_length(&rec)),
        });
        let whep_url = link.whep_url.as_ref().map(|base| {
            format!(
                "{}/whep/sessions/{}",
                base.trim_end_matches('/'),
                rec.session_id
            )
        });
        tracing::info!(session_id = %rec.session_id, node = %p.node, gpu = %p.gpu, slot = p.slot, warm, "reserved");
        Ok((
            Entry {
                record: rec,
                token: Some(token),
                whep_url,
                last_input: None,
                awaiting_agent: false,
            },
            warm,
        ))
    }

    fn view_of(&self, entry: &Entry) -> SessionView {
        let mut v = SessionView::of(
            &entry.record,
            entry.token.as_deref(),
            entry.whep_url.as_deref(),
        );
        if entry.record.state == SessionState::Queued {
            let st = self.state();
            v.queue_position = st.engine.queue_position(&entry.record.session_id);
            v.eta_seconds = st.engine.queue_eta(&entry.record.session_id);
        }
        v
    }

    /// The session `id` of `tenant`, live or recently ended.
    pub fn session_view(
        &self,
        tenant: &framecast_shared::ids::TenantId,
        id: &SessionId,
    ) -> Option<SessionView> {
        let (entry, ended) = {
            let st = self.state();
            let entry = st.sessions.get(id).cloned();
            let ended = if entry.is_none() {
                let id = id.to_string();
                st.ended
                    .iter()
                    .rev()
                    .find(|(_, v)| v.session_id == id)
                    .cloned()
            } else {
                None
            };
            (entry, ended)
        };
        if let Some((owner, view)) = ended {
            return (&owner == tenant).then_some(view);
        }
        // Sessions ended longer ago than the last ENDED_KEPT are in the audit log (see
        // `framecast-broker audit export`), not here.
        match entry {
            Some(e) if &e.record.tenant == tenant => Some(self.view_of(&e)),
            _ => None,
        }
    }

    /// Live sessions of `tenant` matching `filter`, oldest first, after `after`, at most
    /// `limit`.
    pub fn list_sessions(
        &self,
        tenant: &framecast_shared::ids::TenantId,
        filter: &SessionFilter,
    ) -> Vec<SessionView> {
        let entries: Vec<Entry> = {
            let st = self.state();
            st.sessions
                .range((
                    filter
                        .after
                        .map_or(std::ops::Bound::Unbounded, std::ops::Bound::Excluded),
                    std::ops::Bound::Unbounded,
                ))
                .map(|(_, e)| e)
                .filter(|e| &e.record.tenant == tenant)
                .filter(|e| {
                    filter
                        .state
                        .as_deref()
                        .is_none_or(|s| state_words(e.record.state).0 == s)
                })
                .filter(|e| {
                    filter
                        .game
                        .as_deref()
                        .is_none_or(|g| e.record.game.as_str() == g)
                })
                .filter(|e| {
                    filter
                        .tier
                        .as_deref()
                        .is_none_or(|t| e.record.tier.as_str() == t)
                })
                .filter(|e| {
                    filter
                        .node
                        .as_deref()
                        .is_none_or(|n| e.record.node.as_ref().is_some_and(|x| x.as_str() == n))
                })
                .take(filter.limit)
                .cloned()
                .collect()
        };
        entries
            .iter()
            .map(|e| {
                let mut v = self.view_of(e);
                v.token = None;
                v
            })
            .collect()
    }

    /// `DELETE /v1/sessions/{id}`: ends the session (or cancels the queued request).
    pub async fn delete_session(
        &self,
        tenant: &framecast_shared::ids::TenantId,
        id: &SessionId,
    ) -> Result<(), ServiceError> {
        let owned = self
            .state()
            .sessions
            .get(id)
            .is_some_and(|e| &e.record.tenant == tenant);
        if !owned {
            return Err(ServiceError::NotFound(format!("no live session {id}")));
        }
        self.end(id, EndReason::Released, true).await;
        Ok(())
    }

    /// Ends session `id` for `reason`: the engine frees its slot, the agent is told (when
    /// `tell_agent`), the store writes its audit record, and subscribers hear of it.
    pub(crate) async fn end(&self, id: &SessionId, reason: EndReason, tell_agent: bool) {
        let now = Timestamp::now();
        let (entry, queued) = {
            let mut st = self.state();
            let _ = st.engine.release(id, reason, now);
            let entry = st.sessions.remove(id);
            // Queued while the engine's slot is freed under the same lock, so the release
            // reaches the agent before any reservation the engine now gives that slot.
            let queued = match (&entry, tell_agent) {
                (Some(e), true) => e
                    .record
                    .node
                    .as_ref()
                    .is_some_and(|node| self.release_now(node, id, reason)),
                _ => false,
            };
            (entry, queued)
        };
        self.inner.wake.notify_one();
        self.finish(id, entry, reason, tell_agent && !queued, now)
            .await;
    }

    /// Queues a release for the agent of `node` without waiting; false when the link is
    /// missing or its queue is full (then the caller sends it the slow way).
    fn release_now(&self, node: &NodeId, id: &SessionId, reason: EndReason) -> bool {
        self.inner.links.get(node).is_some_and(|l| {
            l.tx.try_send(Message::Release(Release {
                session_id: *id,
                reason,
            }))
            .is_ok()
        })
    }

    /// What follows an end the engine already made.
    async fn finish(
        &self,
        id: &SessionId,
        entry: Option<Entry>,
        reason: EndReason,
        tell_agent: bool,
        now: Timestamp,
    ) {
        let Some(mut entry) = entry else { return };
        entry.record.state = SessionState::Ended(reason);
        let mut view = SessionView::of(&entry.record, None, None);
        view.expires_at = None;
        {
            // Listed as ended before anything is awaited: the session has just left the live
            // map, and a GET in between must not answer 404.
            let mut st = self.state();
            if st.ended.len() >= ENDED_KEPT {
                st.ended.pop_front();
            }
            st.ended
                .push_back((entry.record.tenant.clone(), view.clone()));
            // How long it held a slot, for the planner's forecast of slots coming free.
            if let (Some(planning), Some(placed)) = (st.planning.as_mut(), entry.record.placed_at) {
                planning.ended(
                    &self.inner.config.region,
                    &entry.record.tier,
                    &entry.record.game,
                    now.saturating_since(placed),
                );
            }
        }
        if tell_agent && let Some(node) = &entry.record.node {
            self.send(
                node,
                Message::Release(Release {
                    session_id: *id,
                    reason,
                }),
            )
            .await;
        }
        let written = self
            .write(Write::End {
                id: *id,
                at: now,
                reason,
            })
            .await;
        if let Err(e) = written {
            tracing::error!(session_id = %id, error = %e, "could not record the end of a session");
        }
        metrics::counter!(crate::metrics::SESSIONS_ENDED, "reason" => reason.to_string())
            .increment(1);
        tracing::info!(session_id = %id, %reason, "session ended");
        self.publish(entry.record.tenant.clone(), view);
    }

    fn publish(&self, tenant: framecast_shared::ids::TenantId, view: SessionView) {
        // No subscriber is fine.
        let _ = self.inner.events.send(SessionEvent { tenant, view });
    }

    /// Sends `message` to `node`'s agent, if it is connected.
    async fn send(&self, node: &NodeId, message: Message) {
        let tx = self.inner.links.get(node).map(|l| l.tx.clone());
        if let Some(tx) = tx
            && tx.send(message).await.is_err()
        {
            tracing::debug!(%node, "the link closed before a message could be sent");
        }
    }

    /// The longest `record` may run: the shortest of the global limit, its tier's and its
    /// tenant's.
    pub fn max_length(&self, record: &StoredSession) -> Duration {
        max_length(&self.inner.config, record)
    }

    /// Live sessions per API state word.
    pub fn session_counts(&self) -> Vec<(&'static str, usize)> {
        let st = self.state();
        let mut counts: Vec<(&'static str, usize)> =
            ["queued", "reserved", "connecting", "active", "reconnecting"]
                .into_iter()
                .map(|s| (s, 0))
                .collect();
        for e in st.sessions.values() {
            let word = state_words(e.record.state).0;
            if let Some(c) = counts.iter_mut().find(|(s, _)| *s == word) {
                c.1 += 1;
            }
        }
        counts
    }

    // ---- nodes ------------------------------------------------------------------------

    /// Whether `node`'s agent is connected now.
    pub fn connected(&self, node: &NodeId) -> bool {
        self.inner.links.contains_key(node)
    }

    /// `POST /v1/nodes/{id}/cordon`: no new sessions on the node. Recorded in the store, so a
    /// restarted broker cordons the node again when its agent says hello.
    pub async fn cordon(&self, node: &NodeId) -> Result<(), ServiceError> {
        let recorded = {
            let mut st = self.state();
            st.engine.cordon(node).map_err(node_error)?;
            self.record_node(&st.engine, node)
        };
        self.recorded(node, recorded).await
    }

    /// `POST /v1/nodes/{id}/uncordon`: also cancels a drain, on the agent too; the store
    /// forgets the node's cordon or drain.
    pub async fn uncordon(&self, node: &NodeId) -> Result<(), ServiceError> {
        let (recorded, unsent) = {
            let mut st = self.state();
            st.engine
                .uncordon(node, Timestamp::now())
                .map_err(node_error)?;
            // Whatever the engine says, the agent may still be draining: a drain that reached
            // its deadline leaves the node cordoned here but the agent draining, and a drain
            // may have reached the agent before a broker restart. A resume to an agent that is
            // not draining changes nothing. Queued under the lock, so that it reaches the agent
            // in the order of the operators' calls.
            let resume = Message::Resume(framecast_shared::protocol::Resume {
                reason: "an operator uncordoned the node".into(),
            });
            (
                self.record_node(&st.engine, node),
                self.queue_now(node, resume),
            )
        };
        if let Some(message) = unsent {
            self.send(node, message).await;
        }
        self.inner.wake.notify_one();
        self.recorded(node, recorded).await
    }

    /// `POST /v1/nodes/{id}/drain`: no new sessions; running ones end at `deadline`. Recorded
    /// in the store with its deadline, so a restarted broker drains the node again (or, past
    /// the deadline, cordons it) when its agent says hello.
    pub async fn drain(&self, node: &NodeId, deadline: Timestamp) -> Result<(), ServiceError> {
        let (recorded, unsent) = {
            let mut st = self.state();
            st.engine.drain(node, deadline).map_err(node_error)?;
            let drain = Message::Drain(framecast_shared::protocol::Drain { deadline });
            (
                self.record_node(&st.engine, node),
                self.queue_now(node, drain),
            )
        };
        if let Some(message) = unsent {
            self.send(node, message).await;
        }
        self.recorded(node, recorded).await
    }

    /// Queues the store write that records `node`'s cordon or drain as `engine` now has it
    /// (or forgets it). Called under the state lock, so that the store sees the operators'
    /// decisions in the order the engine took them.
    fn record_node(&self, engine: &Engine, node: &NodeId) -> Result<writer::Pending, StoreError> {
        self.inner
            .writer
            .submit(node_write(engine, node, Timestamp::now()))
    }

    /// Waits for a write queued by [`Broker::record_node`].
    async fn recorded(
        &self,
        node: &NodeId,
        pending: Result<writer::Pending, StoreError>,
    ) -> Result<(), ServiceError> {
        let written = match pending {
            Ok(pending) => pending.wait().await,
            Err(e) => Err(e),
        };
        written.map(|_| ()).map_err(|e| {
            tracing::error!(node_id = %node, error = %e, "could not record a node's cordon or drain");
            ServiceError::Internal(format!(
                "node {node}: the change applies, but the store could not record it, so a \
                 broker restart would forget it: {e}"
            ))
        })
    }

    /// Queues `message` for `node`'s agent without waiting. Gives it back when the link's
    /// queue is full (the caller sends it the slow way); `None` when it was queued, or when
    /// the node has no link (its next hello reconciles the two).
    fn queue_now(&self, node: &NodeId, message: Message) -> Option<Message> {
        let link = self.inner.links.get(node)?;
        match link.tx.try_send(message) {
            Ok(()) | Err(mpsc::error::TrySendError::Closed(_)) => None,
            Err(mpsc::error::TrySendError::Full(message)) => Some(message),
        }
    }

    /// Runs the engine's timers and turns its events into effects; the driver calls this.
    /// Records the player input times `node`'s agent reported (for its own sessions only).
    pub(crate) fn observe_inputs(
        &self,
        node: &NodeId,
        inputs: &[framecast_shared::protocol::SessionInput],
    ) {
        if inputs.is_empty() {
            return;
        }
        let mut st = self.state();
        for i in inputs {
            if let Some(e) = st
                .sessions
                .get_mut(&i.session_id)
                .filter(|e| e.record.node.as_ref() == Some(node))
            {
                e.last_input = Some(e.last_input.map_or(i.at, |t| t.max(i.at)));
            }
        }
    }

    /// Ends sessions past their maximum length or idle for longer than the idle timeout; the
    /// driver calls this on its timed ticks.
    pub(crate) async fn end_overdue(&self, now: Timestamp) {
        let idle = {
            let st = self.state();
            // A session still waiting for its agent after a restart is the hello's to judge.
            past_idle_timeout(
                &self.inner.config,
                st.sessions
                    .values()
                    .filter(|e| !e.awaiting_agent)
                    .map(|e| (&e.record, e.last_input)),
                now,
            )
        };
        for id in idle {
            tracing::info!(session_id = %id, "session idle past the idle timeout");
            self.end(&id, EndReason::Idle, true).await;
        }
        let too_long = {
            let st = self.state();
            past_max_length(
                &self.inner.config,
                st.sessions.values().map(|e| &e.record),
                now,
            )
        };
        for id in too_long {
            tracing::info!(session_id = %id, "session reached its maximum length");
            self.end(&id, EndReason::MaxLength, true).await;
        }
        // The engine times the reservations it made; this also catches one it adopted from
        // an agent's report after a restart, which it gave a fresh TTL. Only while the engine
        // still holds it as reserved (the player may have connected while the record was not
        // told), and never before the agent's hello: a recovered session is the hello's to
        // judge (the orphan sweep ends it if no agent comes back).
        let lapsed = {
            let st = self.state();
            let mut lapsed = past_reservation(
                st.sessions
                    .values()
                    .filter(|e| !e.awaiting_agent)
                    .map(|e| &e.record),
                now,
            );
            lapsed.retain(|id| st.engine.session_state(id) == Some(SessionState::Reserved));
            lapsed
        };
        for id in lapsed {
            tracing::info!(session_id = %id, "reservation lapsed");
            self.end(&id, EndReason::Expired, true).await;
        }
    }

    /// Runs the engine's timers and turns its events into effects.
    pub(crate) async fn tick(&self, now: Timestamp) {
        let mut released = Vec::new();
        let events: Vec<EngineEvent> = {
            let mut st = self.state();
            let st = &mut *st;
            // Queued sessions from before a restart join the queue again, in their order, once
            // the engine knows a region they name.
            let waiting = std::mem::take(&mut st.requeue);
            for id in waiting {
                let Some(record) = st.sessions.get(&id).map(|e| e.record.clone()) else {
                    continue;
                };
                match st.engine.place(place_request(&record, true), now) {
                    Decision::Queued(_) => {}
                    Decision::Placed(p) => st.engine_placed.push(p),
                    Decision::Rejected { .. } => st.requeue.push(id),
                }
            }
            st.engine.expire(now);
            let mut events: Vec<EngineEvent> = st
                .engine_placed
                .drain(..)
                .map(EngineEvent::Placed)
                .collect();
            events.extend(std::iter::from_fn(|| st.engine.poll_event()));
            // Releases are queued under the lock for the same reason as in `end`.
            for e in &events {
                if let EngineEvent::Ended {
                    session_id,
                    node: Some(node),
                    reason,
                } = e
                    && *reason != EndReason::NodeLost
                    && self.release_now(node, session_id, *reason)
                {
                    released.push(*session_id);
                }
            }
            events
        };
        for event in events {
            self.on_event(event, &released).await;
        }
    }

    /// Acts on an engine event; `released` lists ended sessions whose agent was told already.
    async fn on_event(&self, event: EngineEvent, released: &[SessionId]) {
        match event {
            EngineEvent::Ended {
                session_id, reason, ..
            } => {
                let entry = self.state().sessions.remove(&session_id);
                // A lost node cannot hear it; any other is told, so it frees the slot.
                let tell = reason != EndReason::NodeLost && !released.contains(&session_id);
                self.finish(&session_id, entry, reason, tell, Timestamp::now())
                    .await;
            }
            EngineEvent::Placed(p) => {
                let this = self.clone();
                tokio::spawn(async move {
                    match this.hold(&p).await {
                        Ok(()) => {
                            if let Some(view) = this.live_view(&p.session_id) {
                                let tenant = this
                                    .state()
                                    .sessions
                                    .get(&p.session_id)
                                    .map(|e| e.record.tenant.clone());
                                if let Some(tenant) = tenant {
                                    this.publish(tenant, view);
                                }
                            }
                        }
                        Err(Hold::Gone) => {}
                        Err(Hold::Refused(why)) => {
                            tracing::warn!(session_id = %p.session_id, %why, "a session placed from the queue was refused by its agent");
                            this.end(&p.session_id, EndReason::Error, false).await;
                        }
                    }
                });
            }
        }
    }
}

/// A request's game, tier, genre and regions with RTTs.
pub type Resolved = (GameId, TierName, GenreName, Vec<(RegionName, u32)>);

/// Filters of `GET /v1/sessions`.
#[derive(Debug, Clone, Default)]
pub struct SessionFilter {
    /// Only sessions in this state (`queued`, `reserved`, ...).
    pub state: Option<String>,
    /// Only this game.
    pub game: Option<String>,
    /// Only this tier.
    pub tier: Option<String>,
    /// Only on this node.
    pub node: Option<String>,
    /// Only sessions after this one (the previous page's last).
    pub after: Option<SessionId>,
    /// At most this many.
    pub limit: usize,
}

/// The longest `record` may run under `config`: the shortest of `timers.max_session_s`, its
/// tier's `max_session_s` and its tenant's.
pub fn max_length(config: &BrokerConfig, record: &StoredSession) -> Duration {
    let tier = config.tiers.get(&record.tier).and_then(|t| t.max_session_s);
    let tenant = config
        .tenants
        .iter()
        .find(|t| t.id == record.tenant)
        .and_then(|t| t.max_session_s);
    let secs = [Some(config.timers.max_session_s), tier, tenant]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(config.timers.max_session_s);
    Duration::from_secs(u64::from(secs))
}

/// Playing sessions whose player sent no input (since it started playing, when none was
/// reported) for `timers.idle_timeout_s` at `now`.
fn past_idle_timeout<'a>(
    config: &BrokerConfig,
    sessions: impl Iterator<Item = (&'a StoredSession, Option<Timestamp>)>,
    now: Timestamp,
) -> Vec<SessionId> {
    let timeout = Duration::from_secs(u64::from(config.timers.idle_timeout_s));
    sessions
        .filter(|(r, _)| r.state == SessionState::Active)
        .filter_map(|(r, input)| {
            let since = input.or(r.active_at)?;
            (now.saturating_since(since) >= timeout).then_some(r.session_id)
        })
        .collect()
}

/// Sessions in `sessions` that have run past their maximum length at `now`.
fn past_max_length<'a>(
    config: &BrokerConfig,
    sessions: impl Iterator<Item = &'a StoredSession>,
    now: Timestamp,
) -> Vec<SessionId> {
    sessions
        .filter_map(|r| {
            let since = r.placed_at?;
            (now.saturating_since(since) >= max_length(config, r)).then_some(r.session_id)
        })
        .collect()
}

/// Reserved sessions in `sessions` whose reservation (`expires_at`) has lapsed at `now`.
fn past_reservation<'a>(
    sessions: impl Iterator<Item = &'a StoredSession>,
    now: Timestamp,
) -> Vec<SessionId> {
    sessions
        .filter(|r| r.state == SessionState::Reserved)
        .filter(|r| r.expires_at.is_some_and(|at| at <= now))
        .map(|r| r.session_id)
        .collect()
}

/// The store write that records `node`'s cordon or drain as `engine` has it now: the drain's
/// deadline while it drains, a cordon while an operator's cordon stands (a finished drain
/// included), else nothing (the row goes).
fn node_write(engine: &Engine, node: &NodeId, now: Timestamp) -> Write {
    let fleet = engine.fleet();
    let held = fleet.node_idx.get(node).and_then(|&i| fleet.node(i));
    let drain_deadline = match held.map(|n| n.state) {
        Some(NodeState::Draining { deadline }) => Some(deadline),
        _ => None,
    };
    if drain_deadline.is_some() || held.is_some_and(|n| n.cordoned) {
        Write::PutNode(StoredNode {
            node_id: node.clone(),
            drain_deadline,
            since: now,
        })
    } else {
        Write::RemoveNode(node.clone())
    }
}

fn place_request(record: &StoredSession, queue: bool) -> PlaceRequest {
    PlaceRequest {
        session_id: record.session_id,
        tenant: record.tenant.clone(),
        game: record.game.clone(),
        tier: record.tier.clone(),
        genre: record.genre.clone(),
        priority: parse_priority(Some(&record.priority)).unwrap_or(Priority::Normal),
        regions: record
            .regions
            .iter()
            .map(|(region, rtt_ms)| RegionRtt {
                region: region.clone(),
                rtt_ms: *rtt_ms,
            })
            .collect(),
        fallbacks: Vec::new(),
        queue,
    }
}

/// `low`, `normal` or `high` (normal when absent).
pub fn parse_priority(p: Option<&str>) -> Result<Priority, ServiceError> {
    match p {
        None | Some("normal") => Ok(Priority::Normal),
        Some("low") => Ok(Priority::Low),
        Some("high") => Ok(Priority::High),
        Some(other) => Err(ServiceError::Unprocessable {
            field: "priority",
            detail: format!("priority {other:?} is not low, normal or high"),
        }),
    }
}

/// `next-region` and `tier-up`, in order.
pub fn parse_fallbacks(f: &[String]) -> Result<Vec<Fallback>, ServiceError> {
    f.iter()
        .map(|s| match s.as_str() {
            "next-region" => Ok(Fallback::NextRegion),
            "tier-up" => Ok(Fallback::TierUp),
            other => Err(ServiceError::Unprocessable {
                field: "fallbacks",
                detail: format!("fallback {other:?} is not next-region or tier-up"),
            }),
        })
        .collect()
}

fn rejection(reason: RejectReason) -> ServiceError {
    match reason {
        RejectReason::UnknownTier => ServiceError::Unprocessable {
            field: "tier",
            detail: "the tier is not configured".into(),
        },
        RejectReason::UnknownGenre => ServiceError::Unprocessable {
            field: "genre",
            detail: "the genre is not configured".into(),
        },
        RejectReason::NoRegion => ServiceError::Unprocessable {
            field: "regions",
            detail: "no region in the request has GPU nodes".into(),
        },
        RejectReason::RttTooHigh => ServiceError::Unprocessable {
            field: "regions",
            detail: "every region is beyond the genre's round-trip-time cap".into(),
        },
        RejectReason::NoCapacity => ServiceError::Unavailable {
            detail: "no GPU slot is free and the request asked not to queue".into(),
            retry_after_s: Some(10),
        },
        RejectReason::DuplicateSession => {
            ServiceError::Conflict("a session with this id exists".into())
        }
    }
}

fn node_error(e: crate::placement::EngineError) -> ServiceError {
    match e {
        crate::placement::EngineError::UnknownNode(n) => {
            ServiceError::NotFound(format!("no node {n}"))
        }
        other => ServiceError::Conflict(other.to_string()),
    }
}

fn internal(e: impl std::fmt::Display) -> ServiceError {
    ServiceError::Internal(e.to_string())
}

#[cfg(test)]
mod tests {
    use framecast_shared::config::broker::TenantConfig;
    use framecast_shared::ids::TenantId;

    use super::*;

    fn record(tier: &str, tenant: &str, placed_s: Option<u64>) -> StoredSession {
        StoredSession {
            session_id: SessionId::new(Timestamp::from_millis(1), placed_s.unwrap_or(0).into()),
            tenant: TenantId::new(tenant).unwrap(),
            game: GameId::new("g").unwrap(),
            tier: TierName::new(tier).unwrap(),
            genre: GenreName::new("fps").unwrap(),
            player_id: "p".into(),
            priority: "normal".into(),
            regions: Vec::new(),
            state: SessionState::Active,
            node: None,
            gpu: None,
            slot: None,
            created_at: Timestamp::EPOCH,
            placed_at: placed_s.map(|s| Timestamp::from_millis(s * 1000)),
            active_at: None,
            expires_at: None,
            idempotency_key: None,
            framebuffer_mb: 2048,
            compute_sixteenths: 1,
        }
    }

    #[test]
    fn the_shortest_of_the_global_tier_and_tenant_limits_applies() {
        let mut config = BrokerConfig::default();
        config.timers.max_session_s = 3600;
        if let Some(t) = config.tiers.get_mut(&TierName::new("4k").unwrap()) {
            t.max_session_s = Some(1800);
        }
        config.tenants.push(TenantConfig {
            id: TenantId::new("trial").unwrap(),
            api_key_sha256: "0".repeat(64),
            max_sessions: None,
            admin: false,
            max_session_s: Some(600),
            requests_per_minute: None,
        });
        let secs = |r: &StoredSession| max_length(&config, r).as_secs();
        assert_eq!(secs(&record("720p", "acme", None)), 3600);
        assert_eq!(secs(&record("4k", "acme", None)), 1800);
        assert_eq!(secs(&record("4k", "trial", None)), 600);
        // Placed at 0 s, 100 s and never: at 1800 s only the first 4K one is over.
        let rs = [
            record("4k", "acme", Some(0)),
            record("4k", "acme", Some(100)),
            record("4k", "acme", None),
        ];
        let over = past_max_length(&config, rs.iter(), Timestamp::from_millis(1_800_000));
        assert_eq!(over, vec![rs[0].session_id]);
    }

    #[test]
    fn a_reservation_lapses_at_its_expiry_and_only_while_reserved() {
        let at = |s: u64| Timestamp::from_millis(s * 1000);
        let mut reserved = record("720p", "acme", Some(0));
        reserved.state = SessionState::Reserved;
        reserved.expires_at = Some(at(60));
        let mut later = reserved.clone();
        later.session_id = SessionId::new(at(1), 97);
        later.expires_at = Some(at(90));
        // Playing: the expiry no longer applies (the agent's update clears it, but a stale
        // value must not end it either).
        let mut playing = reserved.clone();
        playing.session_id = SessionId::new(at(1), 96);
        playing.state = SessionState::Active;
        let mut no_expiry = reserved.clone();
        no_expiry.session_id = SessionId::new(at(1), 95);
        no_expiry.expires_at = None;
        let all = [&reserved, &later, &playing, &no_expiry];
        assert!(past_reservation(all.into_iter(), at(59)).is_empty());
        assert_eq!(
            past_reservation(all.into_iter(), at(60)),
            vec![reserved.session_id]
        );
        assert_eq!(past_reservation(all.into_iter(), at(1000)).len(), 2);
    }

    #[test]
    fn a_nodes_stored_decision_follows_the_engine() {
        use framecast_shared::gpu::{GpuMode, models};

        let config = BrokerConfig::default();
        let mut engine = Engine::new(
            config.tier_presets(),
            config.genre_profiles(),
            EngineConfig::from_broker(&config),
            strategy::by_name("genre-weighted", 0).unwrap(),
        );
        let now = Timestamp::from_millis(1_800_000_000_000);
        let hello = crate::placement::simulated::hello(
            "gpu-a",
            config.region.as_str(),
            &models::l4(),
            GpuMode::EqualSize,
            1,
            1,
        )
        .unwrap();
        engine.reconcile(&hello, now).unwrap();
        let node = NodeId::new("gpu-a").unwrap();
        let stored = |w: Write| match w {
            Write::PutNode(n) => {
                assert_eq!(n.node_id, node);
                Some(n.drain_deadline)
            }
            Write::RemoveNode(n) => {
                assert_eq!(n, node);
                None
            }
            other => panic!("{other:?}"),
        };
        assert_eq!(stored(node_write(&engine, &node, now)), None, "ready");
        engine.cordon(&node).unwrap();
        assert_eq!(stored(node_write(&engine, &node, now)), Some(None));
        let deadline = now.saturating_add(Duration::from_secs(600));
        engine.drain(&node, deadline).unwrap();
        assert_eq!(
            stored(node_write(&engine, &node, now)),
            Some(Some(deadline))
        );
        // A cordon of a draining node keeps the drain.
        engine.cordon(&node).unwrap();
        assert_eq!(
            stored(node_write(&engine, &node, now)),
            Some(Some(deadline))
        );
        // The drain finishes: the node stays cordoned.
        engine.expire(deadline);
        assert_eq!(stored(node_write(&engine, &node, now)), Some(None));
        engine.uncordon(&node, now).unwrap();
        assert_eq!(stored(node_write(&engine, &node, now)), None);
        // A node the engine does not know has nothing to record.
        let other = NodeId::new("gpu-z").unwrap();
        assert!(matches!(
            node_write(&engine, &other, now),
            Write::RemoveNode(n) if n == other
        ));
    }

    #[test]
    fn playing_sessions_without_input_for_the_idle_timeout_end() {
        let mut config = BrokerConfig::default();
        config.timers.idle_timeout_s = 600;
        let at = |s: u64| Timestamp::from_millis(s * 1000);
        let mut playing = record("720p", "acme", Some(0));
        playing.active_at = Some(at(10));
        let mut with_input = playing.clone();
        with_input.session_id = SessionId::new(at(1), 99);
        let mut reserved = playing.clone();
        reserved.session_id = SessionId::new(at(1), 98);
        reserved.state = SessionState::Reserved;
        let sessions = [
            (&playing, None),
            (&with_input, Some(at(500))),
            (&reserved, None),
        ];
        // 610 s: 600 s since the first started playing; the second had input at 500 s; the
        // third is not playing.
        let idle = past_idle_timeout(&config, sessions.iter().copied(), at(610));
        assert_eq!(idle, vec![playing.session_id]);
        assert!(past_idle_timeout(&config, sessions.iter().copied(), at(609)).is_empty());
        assert_eq!(
            past_idle_timeout(&config, sessions.iter().copied(), at(1100)).len(),
            2
        );
    }
}
