//! The agent's state as the control link sees it: what it reports in `hello` and heartbeats,
//! and how it executes `reserve`, `release`, `pool-plan` and `drain`.
//!
//! Each session holds its [`EncoderLease`] for its whole life, so every path that ends a
//! session — a release, a failed reservation, a crashed instance, an agent shutting down —
//! gives the encoder slot back by dropping it.
//!
//! Game instances are decided here too: one supervisor per GPU keeps the
//! warm instances the pool plan asks for in the GPU's free slots, and a reservation takes the
//! warm instance in its slot or starts a fresh one. The runner executes what the core decides.

mod instances;
mod persist;

pub use persist::{Adoption, SessionRecord, Snapshot};

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use tokio::sync::Notify;

use framecast_shared::config::agent::AgentGameConfig;
use framecast_shared::ids::{GameId, GpuId, NodeId, RegionName, SessionId, TierName};
use framecast_shared::protocol::{
    GpuInventory, GpuUsage, Heartbeat, Hello, Message, PROTOCOL_VERSION, PoolPlan, RejectReason,
    Rejected, Reserve, Reserved, RunningSession, SessionUpdate, WarmTarget,
};
use framecast_shared::state::{EndReason, SessionState};
use framecast_shared::tier::TierPreset;
use framecast_shared::time::Timestamp;
use framecast_shared::token::{Claims, TokenError, TokenVerifier};
use framecast_shared::units::{EncoderUnits, Megabytes};

use crate::encoder::{EncoderError, EncoderLease, EncoderSlots};
use crate::instances::launch::ProcessId;
use crate::instances::runner::{InstanceCommand, InstanceKey};
use crate::instances::supervisor::{Backoff, Supervisor};
use crate::inventory::DiscoveredGpu;
use crate::link::AgentState;
use crate::vgpu::{VgpuPool, plan};

/// One GPU the agent runs sessions on.
#[derive(Debug)]
pub struct CoreGpu {
    /// What the inventory found.
    pub found: DiscoveredGpu,
    /// Its encoder slots.
    pub encoder: EncoderSlots,
}

#[derive(Debug)]
struct Held {
    gpu: GpuId,
    slot: u32,
    game: GameId,
    tier: TierName,
    state: SessionState,
    since: Timestamp,
    /// When the player's newest input arrived; the broker's idle timeout counts from it.
    last_input: Option<Timestamp>,
    _lease: EncoderLease,
}

/// What a player's stream needs to know about its session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamSpec {
    /// The session's tier: the stream's resolution, frame rate, bitrate and codecs.
    pub tier: TierPreset,
    /// The game it plays.
    pub game: GameId,
    /// The GPU it runs on.
    pub gpu: GpuId,
    /// Where the session is.
    pub state: SessionState,
    /// The name of the session's game process, whose frames come through the capture
    /// interface; `None` for the built-in synthetic game.
    pub capture_instance: Option<String>,
    /// The CUDA ordinal of the session's GPU (NVML's index) where NVML found it; `None` on a
    /// simulated GPU.
    pub cuda_device: Option<u32>,
}

/// One GPU's use, for metrics.
#[derive(Debug, Clone)]
pub struct GpuGauges {
    /// The GPU.
    pub gpu: GpuId,
    /// Its framebuffer.
    pub framebuffer_total: Megabytes,
    /// Framebuffer held by vGPUs.
    pub framebuffer_used: Megabytes,
    /// Its encoder.
    pub encoder: crate::encoder::EncoderUsage,
}

/// Why a player's token was refused.
#[derive(Debug, thiserror::Error)]
pub enum TokenRefusal {
    /// No broker has welcomed the agent yet, so it has no key to check with.
    #[error("the node has no token key yet (no broker has welcomed it)")]
    NoKey,
    /// Forged, malformed, expired or for another node.
    #[error(transparent)]
    Invalid(TokenError),
    /// A valid token for a session this node does not hold.
    #[error("session {0} is not on this node")]
    UnknownSession(SessionId),
}

/// Why a stream's state change was not applied.
#[derive(Debug, thiserror::Error)]
pub enum StreamStateError {
    /// The node does not hold the session (it ended meanwhile).
    #[error("session {0} is not on this node")]
    UnknownSession(SessionId),
    /// The lifecycle does not allow the move.
    #[error(transparent)]
    Transition(#[from] framecast_shared::state::TransitionError),
}

/// How instances are supervised.
#[derive(Debug, Clone, Copy)]
pub struct InstancePolicy {
    /// Restart backoff of crashed warm instances.
    pub backoff: Backoff,
    /// A warm instance that ran this long before crashing counts as healthy again.
    pub healthy_after: std::time::Duration,
}

impl Default for InstancePolicy {
    fn default() -> Self {
        Self {
            backoff: Backoff::default(),
            healthy_after: std::time::Duration::from_secs(30),
        }
    }
}

/// The agent's state.
pub struct AgentCore {
    node_id: NodeId,
    region: RegionName,
    cpu_millicores: Option<u32>,
    gpus: Vec<CoreGpu>,
    tiers: Vec<TierPreset>,
    games: Vec<AgentGameConfig>,
    pool: VgpuPool,
    sessions: BTreeMap<SessionId, Held>,
    plan_generation: u64,
    draining: Option<Timestamp>,
    /// This process's generation, stamped on session updates.
    generation: u64,
    clock: Box<dyn Fn() -> Timestamp + Send>,
    /// One instance supervisor per GPU.
    supervisors: BTreeMap<GpuId, Supervisor>,
    /// The warm instances the newest pool plan asks for, per GPU.
    warm_plan: BTreeMap<GpuId, Vec<WarmTarget>>,
    /// The slot each live instance occupies, and its vGPU where the GPU is sliced.
    instance_slots: BTreeMap<InstanceKey, (u32, Option<uuid::Uuid>)>,
    /// The OS process of each live process instance.
    instance_processes: BTreeMap<InstanceKey, ProcessId>,
    /// The newest pool plan, not applied yet because instances still run on GPUs it
    /// re-slices (those GPUs listed).
    pending_plan: Option<(PoolPlan, Vec<GpuId>)>,
    /// Names of adopted instances (they keep the name, and so the cgroup, they started with).
    instance_names: BTreeMap<InstanceKey, String>,
    /// Warm starts waiting for a slot to free up.
    deferred_starts: Vec<(InstanceKey, GameId, TierName)>,
    /// Adopted processes the runner must start watching.
    adoptions: VecDeque<InstanceCommand>,
    /// Sessions changed since the last snapshot.
    dirty: bool,
    policy: InstancePolicy,
    /// Notified whenever instance commands are queued.
    wake: Arc<Notify>,
    /// Where players reach this node's WHEP endpoint, for the hello.
    whep_url: Option<String>,
    /// Verifies players' session tokens with the key of the broker that welcomed the agent.
    tokens: Option<TokenVerifier>,
    /// Told the id of every session that ends, so its stream stops.
    stream_stops: Option<tokio::sync::mpsc::UnboundedSender<SessionId>>,
}

impl std::fmt::Debug for AgentCore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentCore")
            .field("node_id", &self.node_id)
            .field("gpus", &self.gpus.len())
            .field("sessions", &self.sessions.len())
            .finish_non_exhaustive()
    }
}

impl AgentCore {
    /// A core for `node_id` in `region` with `gpus`, the `tiers` it serves, its game catalogue
    /// (empty: any game, as the synthetic game), its vGPU pool, and a clock.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        node_id: NodeId,
        region: RegionName,
        cpu_millicores: Option<u32>,
        gpus: Vec<CoreGpu>,
        tiers: Vec<TierPreset>,
        games: Vec<AgentGameConfig>,
        pool: VgpuPool,
        clock: Box<dyn Fn() -> Timestamp + Send>,
    ) -> Self {
        let supervisors = gpus
            .iter()
            .map(|g| (g.found.id.clone(), Supervisor::new(Backoff::default())))
            .collect();
        Self {
            node_id,
            region,
            cpu_millicores,
            gpus,
            tiers,
            games,
            pool,
            sessions: BTreeMap::new(),
            plan_generation: 0,
            draining: None,
            generation: 0,
            clock,
            supervisors,
            warm_plan: BTreeMap::new(),
            instance_slots: BTreeMap::new(),
            instance_processes: BTreeMap::new(),
            adoptions: VecDeque::new(),
            deferred_starts: Vec::new(),
            instance_names: BTreeMap::new(),
            pending_plan: None,
            dirty: false,
            policy: InstancePolicy::default(),
            wake: Arc::new(Notify::new()),
            whep_url: None,
            tokens: None,
            stream_stops: None,
        }
    }

    /// Sends the id of every session that ends to `stops`, whatever ended it (a release, a
    /// crashed game, the player), so the streaming side stops its stream and lets go of it.
    pub fn with_stream_stops(
        mut self,
        stops: tokio::sync::mpsc::UnboundedSender<SessionId>,
    ) -> Self {
        self.stream_stops = Some(stops);
        self
    }

    /// What a stream of `session` needs, while the node holds the session.
    pub fn stream_spec(&self, session: &SessionId) -> Option<StreamSpec> {
        let held = self.sessions.get(session)?;
        let tier = self.tiers.iter().find(|t| t.name == held.tier)?.clone();
        let process_game = self
            .game_config(&held.game)
            .is_some_and(|g| g.command.is_some());
        let capture_instance = if process_game {
            self.instance_of(&held.gpu, session)
                .map(|key| self.instance_name(&key))
        } else {
            None
        };
        let cuda_device = self
            .gpu(&held.gpu)
            .filter(|g| g.found.pci_bus_id.is_some())
            .map(|g| g.found.index);
        Some(StreamSpec {
            tier,
            game: held.game.clone(),
            gpu: held.gpu.clone(),
            state: held.state,
            capture_instance,
            cuda_device,
        })
    }

    /// Moves `session` to `state` as its stream reports it (`connecting`, `active`,
    /// `reconnecting`), and returns the update for the broker. Reporting the state the session
    /// is in already changes nothing; a move the lifecycle does not allow is an error.
    pub fn stream_state(
        &mut self,
        session: &SessionId,
        state: SessionState,
    ) -> Result<Option<Message>, StreamStateError> {
        let now = (self.clock)();
        let held = self
            .sessions
            .get_mut(session)
            .ok_or(StreamStateError::UnknownSession(*session))?;
        if held.state == state {
            return Ok(None);
        }
        held.state.transition(state)?;
        held.state = state;
        held.since = now;
        self.dirty = true;
        tracing::info!(session_id = %session, %state, "session state");
        Ok(Some(Message::SessionUpdate(SessionUpdate {
            generation: self.generation,
            session_id: *session,
            state,
            at: now,
        })))
    }

    /// Records that the player of `session` sent input at `at`.
    pub fn input_seen(&mut self, session: &SessionId, at: Timestamp) {
        if let Some(held) = self.sessions.get_mut(session)
            && held.last_input.is_none_or(|t| t < at)
        {
            held.last_input = Some(at);
        }
    }

    /// Ends `session` for `reason` (its player hung up: WHEP `DELETE`), and returns the update
    /// for the broker; `None` when the node does not hold it.
    pub fn end_session(&mut self, session: &SessionId, reason: EndReason) -> Option<Message> {
        self.end(session, reason)
    }

    /// Checks a player's session token offline: signed by the broker that welcomed this
    /// agent, for this node, not expired, and for a session the node holds.
    pub fn verify_token(&self, token: &str, now: Timestamp) -> Result<Claims, TokenRefusal> {
        let verifier = self.tokens.as_ref().ok_or(TokenRefusal::NoKey)?;
        let claims = verifier
            .verify(token, &self.node_id, now)
            .map_err(TokenRefusal::Invalid)?;
        if !self.sessions.contains_key(&claims.session_id) {
            return Err(TokenRefusal::UnknownSession(claims.session_id));
        }
        Ok(claims)
    }

    /// Sets the WHEP base URL the hello reports.
    pub fn with_whep_url(mut self, url: String) -> Self {
        self.whep_url = Some(url);
        self
    }

    /// Sets how instances are supervised.
    pub fn with_policy(mut self, policy: InstancePolicy) -> Self {
        self.policy = policy;
        for s in self.supervisors.values_mut() {
            *s = Supervisor::new(policy.backoff);
        }
        self
    }

    /// Notified whenever the core queues instance commands, for the runner.
    pub fn wake_handle(&self) -> Arc<Notify> {
        Arc::clone(&self.wake)
    }

    /// Sets this process's generation (from the data directory), which session updates carry.
    pub fn with_generation(mut self, generation: u64) -> Self {
        self.generation = generation;
        self
    }

    /// Sessions held now.
    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    /// The drain deadline, once the broker asked for one.
    pub fn draining(&self) -> Option<Timestamp> {
        self.draining
    }

    /// Applies the newest pool plan once no instance still runs on a vGPU it would remove;
    /// until then it stays pending and is tried again after every instance exit.
    fn apply_pending_plan(&mut self) {
        let Some((plan, reslicing)) = self.pending_plan.take() else {
            return;
        };
        let waiting = reslicing
            .iter()
            .any(|gpu| self.instance_slots.keys().any(|k| &k.gpu == gpu));
        if waiting {
            self.pending_plan = Some((plan, reslicing));
            return;
        }
        let busy: Vec<GpuId> = self.sessions.values().map(|h| h.gpu.clone()).collect();
        let used: Vec<(GpuId, uuid::Uuid)> = self
            .instance_slots
            .iter()
            .filter_map(|(k, (_, v))| v.map(|v| (k.gpu.clone(), v)))
            .collect();
        let in_use = |gpu: &GpuId, vgpu: uuid::Uuid| {
            busy.contains(gpu) || used.iter().any(|(g, v)| g == gpu && *v == vgpu)
        };
        let progress = plan::apply(&mut self.pool, &plan, &in_use);
        if !progress.complete() {
            tracing::warn!(plan = plan.plan_generation, failures = ?progress.failures, "pool plan applied in part");
        }
        self.set_warm_plan(&plan);
    }

    /// Framebuffer and encoder use per GPU, for metrics.
    pub fn gpu_gauges(&self) -> Vec<GpuGauges> {
        self.gpus
            .iter()
            .map(|g| GpuGauges {
                gpu: g.found.id.clone(),
                framebuffer_total: g.found.spec.framebuffer,
                framebuffer_used: self.pool.framebuffer_used(&g.found.id),
                encoder: g.encoder.usage(),
            })
            .collect()
    }

    /// Framebuffer not held by vGPUs and encoder throughput not leased, on `g`.
    fn free(&self, g: &CoreGpu) -> (Megabytes, EncoderUnits) {
        let usage = g.encoder.usage();
        (
            g.found
                .spec
                .framebuffer
                .saturating_sub(self.pool.framebuffer_used(&g.found.id)),
            usage.capacity.saturating_sub(usage.used),
        )
    }

    fn gpu(&self, id: &GpuId) -> Option<&CoreGpu> {
        self.gpus.iter().find(|g| &g.found.id == id)
    }

    fn reserve(&mut self, r: Reserve) -> Message {
        let reject = |reason, detail: String| {
            Message::Rejected(Rejected {
                request_id: r.request_id,
                session_id: r.session_id,
                reason,
                detail,
            })
        };
        if let Some(held) = self.sessions.get(&r.session_id) {
            // A repeated reserve (the broker retried) for the same slot is answered again.
            return if held.gpu == r.gpu && held.slot == r.slot {
                Message::Reserved(Reserved {
                    request_id: r.request_id,
                    session_id: r.session_id,
                    warm: false,
                })
            } else {
                reject(
                    RejectReason::Other,
                    format!("session already runs on {} slot {}", held.gpu, held.slot),
                )
            };
        }
        if self.draining.is_some() {
            return reject(RejectReason::Draining, "the node is draining".into());
        }
        let Some(gpu) = self.gpu(&r.gpu) else {
            return reject(
                RejectReason::UnknownGpu,
                format!("{} is not on this node", r.gpu),
            );
        };
        if let Err(detail) = self.runnable(&r.game, &r.tier) {
            let reason = if detail.contains("catalogue") {
                RejectReason::UnknownGame
            } else {
                RejectReason::Other
            };
            return reject(reason, detail);
        }
        let capacity = self.slot_capacity(&r.gpu);
        if capacity > 0 && r.slot >= capacity {
            return reject(
                RejectReason::NoCapacity,
                format!(
                    "{} has {capacity} vGPU slots; there is no slot {}",
                    r.gpu, r.slot
                ),
            );
        }
        if self
            .sessions
            .values()
            .any(|h| h.gpu == r.gpu && h.slot == r.slot)
        {
            return reject(
                RejectReason::NoCapacity,
                format!("slot {} of {} is taken", r.slot, r.gpu),
            );
        }
        let lease = match gpu.encoder.lease(r.encoder) {
            Ok(lease) => lease,
            Err(
                e @ (EncoderError::Busy { .. }
                | EncoderError::SessionCap { .. }
                | EncoderError::NoEncoder { .. }),
            ) => {
                return reject(RejectReason::EncoderBusy, e.to_string());
            }
        };
        let warm = self.instance_for(&r);
        tracing::info!(session_id = %r.session_id, gpu = %r.gpu, slot = r.slot, warm, "reserved");
        let gpu_id = r.gpu.clone();
        self.sessions.insert(
            r.session_id,
            Held {
                gpu: r.gpu,
                slot: r.slot,
                game: r.game,
                tier: r.tier,
                state: SessionState::Reserved,
                since: (self.clock)(),
                last_input: None,
                _lease: lease,
            },
        );
        self.refresh_targets(&gpu_id);
        self.dirty = true;
        Message::Reserved(Reserved {
            request_id: r.request_id,
            session_id: r.session_id,
            warm,
        })
    }

    fn end(&mut self, session: &SessionId, reason: EndReason) -> Option<Message> {
        // Dropping the entry drops its encoder lease.
        let held = self.sessions.remove(session)?;
        self.dirty = true;
        if let Some(stops) = &self.stream_stops {
            // The streaming side may be gone already (the agent is stopping).
            let _ = stops.send(*session);
        }
        tracing::info!(session_id = %session, %reason, "session ended");
        metrics::counter!(crate::metrics::SESSIONS_ENDED, "reason" => reason.to_string())
            .increment(1);
        if let Some(sup) = self.supervisors.get_mut(&held.gpu) {
            // Its instance stops (if it still runs); a fresh warm one may take the slot.
            sup.release(session);
        }
        self.refresh_targets(&held.gpu);
        Some(Message::SessionUpdate(SessionUpdate {
            generation: self.generation,
            session_id: *session,
            state: SessionState::Ended(reason),
            at: (self.clock)(),
        }))
    }
}

impl AgentState for AgentCore {
    fn hello(&self, generation: u64) -> Hello {
        Hello {
            protocol_version: PROTOCOL_VERSION,
            agent_version: env!("CARGO_PKG_VERSION").into(),
            node_id: self.node_id.clone(),
            region: self.region.clone(),
            generation,
            gpus: self
                .gpus
                .iter()
                .map(|g| {
                    let vgpus = self.pool.vgpus_with_profile(&g.found.id);
                    let (free_framebuffer, free_encoder) = self.free(g);
                    GpuInventory {
                        gpu: g.found.id.clone(),
                        spec: g.found.spec.clone(),
                        mode: g.found.mode,
                        profile: vgpus.first().map(|(_, p)| p.clone()),
                        free_framebuffer,
                        free_encoder,
                        vgpus: u16::try_from(vgpus.len()).unwrap_or(u16::MAX),
                    }
                })
                .collect(),
            sessions: self
                .sessions
                .iter()
                .map(|(id, h)| RunningSession {
                    session_id: *id,
                    gpu: h.gpu.clone(),
                    slot: h.slot,
                    game: h.game.clone(),
                    tier: h.tier.clone(),
                    genre: None,
                    state: h.state,
                    since: h.since,
                })
                .collect(),
            warm: self.warm_instances(),
            cpu_millicores: self.cpu_millicores,
            whep_url: self.whep_url.clone(),
            // So a broker that lost the drain (or never recorded it) stops placing here.
            draining: self.draining,
        }
    }

    fn heartbeat(&self, generation: u64, seq: u64) -> Heartbeat {
        Heartbeat {
            generation,
            seq,
            sent_at: (self.clock)(),
            gpus: self
                .gpus
                .iter()
                .map(|g| {
                    let (free_framebuffer, free_encoder) = self.free(g);
                    let vgpus = self.pool.vgpus_with_profile(&g.found.id);
                    GpuUsage {
                        gpu: g.found.id.clone(),
                        free_framebuffer,
                        free_encoder,
                        encoder_utilization_pct: None,
                        gpu_utilization_pct: None,
                        vgpus: Some(u16::try_from(vgpus.len()).unwrap_or(u16::MAX)),
                        profile: vgpus.first().map(|(_, p)| p.clone()),
                    }
                })
                .collect(),
            warm: Some(self.warm_instances()),
            plan_generation: Some(self.plan_generation),
            inputs: self
                .sessions
                .iter()
                .filter_map(|(id, h)| {
                    h.last_input
                        .map(|at| framecast_shared::protocol::SessionInput {
                            session_id: *id,
                            at,
                        })
                })
                .collect(),
        }
    }

    fn welcomed(&mut self, welcome: &framecast_shared::protocol::Welcome) {
        if !welcome.tiers.is_empty() && welcome.tiers != self.tiers {
            tracing::info!(tiers = welcome.tiers.len(), "tiers from the broker");
            self.tiers = welcome.tiers.clone();
        }
        match TokenVerifier::new(&welcome.token_public_key) {
            Ok(v) => self.tokens = Some(v),
            Err(e) => {
                tracing::error!(error = %e, "the broker's token key is unusable; players cannot connect")
            }
        }
    }

    fn handle(&mut self, message: Message) -> Vec<Message> {
        match message {
            Message::Reserve(r) => {
                let reply = self.reserve(r);
                crate::metrics::reservation(&reply);
                vec![reply]
            }
            Message::Release(r) => self.end(&r.session_id, r.reason).into_iter().collect(),
            Message::PoolPlan(p) if p.plan_generation > self.plan_generation => {
                self.plan_generation = p.plan_generation;
                let busy: Vec<GpuId> = self.sessions.values().map(|h| h.gpu.clone()).collect();
                // Warm instances on a GPU whose vGPUs change are stopped first; the plan is
                // applied to it once they have exited, and the new targets start them again
                // on the new vGPUs.
                let mut reslicing = Vec::new();
                for g in &p.gpus {
                    let held = self.pool.vgpus_with_profile(&g.gpu);
                    let reslice = held.first().map(|(_, profile)| profile) != g.profile.as_ref()
                        || held.len() > usize::from(g.vgpus);
                    if reslice && !busy.contains(&g.gpu) && self.pool.has_gpu(&g.gpu) {
                        self.warm_plan.remove(&g.gpu);
                        self.refresh_targets(&g.gpu);
                        reslicing.push(g.gpu.clone());
                    }
                }
                self.pending_plan = Some((p, reslicing));
                self.apply_pending_plan();
                Vec::new()
            }
            Message::PoolPlan(_) => Vec::new(),
            Message::Resume(_) => {
                self.draining = None;
                let gpus: Vec<GpuId> = self.supervisors.keys().cloned().collect();
                for gpu in gpus {
                    self.refresh_targets(&gpu);
                }
                Vec::new()
            }
            Message::Drain(d) => {
                self.draining = Some(d.deadline);
                // No new sessions: warm instances would only hold slots.
                let gpus: Vec<GpuId> = self.supervisors.keys().cloned().collect();
                for gpu in gpus {
                    self.refresh_targets(&gpu);
                }
                Vec::new()
            }
            _ => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use framecast_shared::gpu::GpuMode;
    use framecast_shared::protocol::{Drain, GpuPlan, PoolPlan, Release};
    use framecast_shared::units::{ComputeShare, EncoderUnits, Megabytes};

    use super::*;
    use crate::inventory::Inventory;
    use crate::inventory::simulated::SimulatedInventory;
    use crate::vgpu::GpuHandle;
    use crate::vgpu::simulated::SimulatedBackend;

    pub(super) const T0: Timestamp = Timestamp::from_millis(1_800_000_000_000);

    pub(super) fn core() -> AgentCore {
        let file = framecast_shared::config::inventory::SimulatedGpus {
            gpus: vec![framecast_shared::config::inventory::SimulatedGpuGroup {
                model: "l4".into(),
                count: 2,
                mode: None,
            }],
        };
        let found = SimulatedInventory::from_file(&file).gpus().unwrap();
        let mut pool = VgpuPool::new(Box::new(SimulatedBackend::default()));
        let gpus = found
            .into_iter()
            .map(|f| {
                pool.add_gpu(
                    GpuHandle {
                        id: f.id.clone(),
                        pci: None,
                    },
                    f.spec.clone(),
                    GpuMode::EqualSize,
                )
                .unwrap();
                CoreGpu {
                    encoder: EncoderSlots::for_gpu(f.id.clone(), &f.spec, None),
                    found: f,
                }
            })
            .collect();
        AgentCore::new(
            NodeId::new("n1").unwrap(),
            RegionName::new("eu").unwrap(),
            Some(16_000),
            gpus,
            TierPreset::defaults(),
            Vec::new(),
            pool,
            Box::new(|| T0),
        )
        .with_generation(5)
    }

    pub(super) fn reserve(n: u128, gpu: &str, slot: u32, encoder_milli: u32) -> Message {
        Message::Reserve(Reserve {
            request_id: u64::try_from(n).unwrap(),
            session_id: SessionId::new(T0, n),
            game: GameId::new("arena").unwrap(),
            tier: TierName::new("4k").unwrap(),
            gpu: GpuId::new(gpu).unwrap(),
            slot,
            framebuffer: Megabytes::new(8192),
            compute_share: ComputeShare::MIN,
            encoder: EncoderUnits::from_milli(encoder_milli),
            expires_at: T0,
        })
    }

    /// A broker's welcome with its token key and tiers.
    fn welcome(
        token_public_key: Vec<u8>,
        tiers: Vec<TierPreset>,
    ) -> framecast_shared::protocol::Welcome {
        framecast_shared::protocol::Welcome {
            protocol_version: PROTOCOL_VERSION,
            broker_version: "test".into(),
            region: RegionName::new("eu").unwrap(),
            generation: 5,
            heartbeat_interval_ms: 1000,
            token_public_key,
            tiers,
        }
    }

    fn free_encoder(core: &AgentCore, gpu: usize) -> EncoderUnits {
        core.heartbeat(1, 1).gpus[gpu].free_encoder
    }

    #[test]
    fn every_path_that_ends_a_session_gives_its_encoder_slot_back() {
        let mut c = core();
        let full = free_encoder(&c, 0);
        assert!(matches!(
            c.handle(reserve(1, "sim-0", 0, 4000)).as_slice(),
            [Message::Reserved(_)]
        ));
        assert!(matches!(
            c.handle(reserve(2, "sim-0", 1, 4000)).as_slice(),
            [Message::Reserved(_)]
        ));
        assert_eq!(
            free_encoder(&c, 0),
            EncoderUnits::from_milli(full.milli() - 8000)
        );
        // A reservation the encoder cannot take leaves nothing behind.
        let busy = c.handle(reserve(3, "sim-0", 2, 5000));
        assert!(
            matches!(busy.as_slice(), [Message::Rejected(r)] if r.reason == RejectReason::EncoderBusy),
            "{busy:?}"
        );
        assert_eq!(c.session_count(), 2);
        // A release frees the slot and reports the end.
        let out = c.handle(Message::Release(Release {
            session_id: SessionId::new(T0, 1),
            reason: EndReason::Released,
        }));
        assert!(
            matches!(out.as_slice(), [Message::SessionUpdate(u)] if u.state == SessionState::Ended(EndReason::Released))
        );
        assert_eq!(
            free_encoder(&c, 0),
            EncoderUnits::from_milli(full.milli() - 4000)
        );
        // The agent going away drops every lease with it.
        drop(c);
    }

    #[test]
    fn reservations_are_checked_before_anything_is_held() {
        let mut c = core();
        let reason = |m: Vec<Message>| match m.as_slice() {
            [Message::Rejected(r)] => r.reason,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            reason(c.handle(reserve(1, "sim-9", 0, 1000))),
            RejectReason::UnknownGpu
        );
        assert!(matches!(
            c.handle(reserve(2, "sim-0", 0, 1000)).as_slice(),
            [Message::Reserved(_)]
        ));
        assert_eq!(
            reason(c.handle(reserve(3, "sim-0", 0, 1000))),
            RejectReason::NoCapacity,
            "slot taken"
        );
        // The broker retrying the same reserve gets the same answer, and nothing twice.
        assert!(matches!(
            c.handle(reserve(2, "sim-0", 0, 1000)).as_slice(),
            [Message::Reserved(_)]
        ));
        assert_eq!(c.session_count(), 1);
        c.handle(Message::Drain(Drain { deadline: T0 }));
        assert_eq!(
            reason(c.handle(reserve(4, "sim-1", 0, 1000))),
            RejectReason::Draining
        );
        assert_eq!(
            c.hello(3).sessions.len(),
            1,
            "running sessions are reported in hello"
        );
    }

    #[test]
    fn pool_plans_apply_once_per_generation() {
        let mut c = core();
        let plan = |generation, vgpus| {
            Message::PoolPlan(PoolPlan {
                plan_generation: generation,
                gpus: vec![GpuPlan {
                    gpu: GpuId::new("sim-1").unwrap(),
                    mode: GpuMode::EqualSize,
                    profile: Some("L4-4Q".into()),
                    vgpus,
                    warm: Vec::new(),
                }],
            })
        };
        c.handle(plan(2, 3));
        assert_eq!(c.hello(1).gpus[1].vgpus, 3);
        assert_eq!(
            c.hello(1).gpus[1].free_framebuffer,
            Megabytes::new(24_576 - 3 * 4096)
        );
        c.handle(plan(1, 6));
        assert_eq!(c.hello(1).gpus[1].vgpus, 3, "an older plan is ignored");
        c.handle(plan(3, 1));
        assert_eq!(c.hello(1).gpus[1].vgpus, 1);
        // Heartbeats report how far pre-allocation has come.
        let hb = c.heartbeat(1, 1);
        assert_eq!(hb.plan_generation, Some(3));
        assert_eq!(hb.gpus[1].vgpus, Some(1));
        assert_eq!(hb.gpus[1].profile.as_deref(), Some("L4-4Q"));
        assert_eq!(hb.gpus[0].vgpus, Some(0));
    }

    #[test]
    fn tokens_are_checked_offline_with_the_welcoming_brokers_key() {
        use framecast_shared::token::TokenSigner;
        let mut c = core();
        let broker = TokenSigner::generate().unwrap();
        let claims = |n: u128, node: &str, expires_at| Claims {
            session_id: SessionId::new(T0, n),
            node_id: NodeId::new(node).unwrap(),
            issued_at: T0,
            expires_at,
        };
        let later = Timestamp::from_millis(T0.as_millis() + 60_000);
        let good = broker.sign(&claims(1, "n1", later));
        assert!(matches!(
            c.verify_token(&good, T0),
            Err(TokenRefusal::NoKey)
        ));
        c.welcomed(&welcome(broker.public_key().to_vec(), Vec::new()));
        assert!(matches!(
            c.verify_token(&good, T0),
            Err(TokenRefusal::UnknownSession(_))
        ));
        c.handle(reserve(1, "sim-0", 0, 1000));
        assert_eq!(
            c.verify_token(&good, T0).unwrap().session_id,
            SessionId::new(T0, 1)
        );
        // Forged, for another node, expired: all refused.
        let forged = TokenSigner::generate()
            .unwrap()
            .sign(&claims(1, "n1", later));
        let elsewhere = broker.sign(&claims(1, "n2", later));
        let expired = broker.sign(&claims(1, "n1", T0));
        for t in [forged, elsewhere, expired, "fc1.garbage".into()] {
            assert!(matches!(
                c.verify_token(&t, T0),
                Err(TokenRefusal::Invalid(_))
            ));
        }
    }

    #[test]
    fn the_brokers_tiers_replace_the_built_in_ones() {
        let mut c = core();
        let mut retro = TierPreset::defaults().remove(0);
        retro.name = TierName::new("480p").unwrap();
        let Message::Reserve(mut r) = reserve(1, "sim-0", 0, 1000) else {
            unreachable!()
        };
        r.tier = retro.name.clone();
        let refused = c.handle(Message::Reserve(r.clone()));
        assert!(matches!(refused.as_slice(), [Message::Rejected(_)]));
        c.welcomed(&welcome(vec![0; 32], vec![retro]));
        let taken = c.handle(Message::Reserve(r));
        assert!(
            matches!(taken.as_slice(), [Message::Reserved(_)]),
            "{taken:?}"
        );
    }
}
