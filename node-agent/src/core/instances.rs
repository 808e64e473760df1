//! The core's side of game instances: which slot each holds, the warm targets per GPU, and
//! the commands the runner executes.
//!
//! Every GPU has one [`Supervisor`]. Its warm targets come from the pool plan, clamped to the
//! slots no session holds (and to none while the node drains). A warm instance takes the
//! lowest free slot and a vGPU no other instance uses; a session's instance takes the slot the
//! broker chose.

use std::time::Duration;

use framecast_shared::config::agent::AgentGameConfig;
use framecast_shared::gpu::GpuMode;
use framecast_shared::ids::{GameId, GpuId, TierName};
use framecast_shared::protocol::{Message, PoolPlan, Reserve, WarmInstance};
use framecast_shared::time::Timestamp;

use super::AgentCore;
use crate::instances::launch::{LaunchSpec, ProcessId};
use crate::instances::runner::{InstanceCommand, InstanceHost, InstanceKey};
use crate::instances::supervisor::{Action, InstanceId, InstanceState};

impl AgentCore {
    /// Whether this node can run `game` at `tier`; the reason in words when not.
    pub(super) fn runnable(&self, game: &GameId, tier: &TierName) -> Result<(), String> {
        if !self.tiers.iter().any(|t| &t.name == tier) {
            return Err(format!("unknown tier {tier}"));
        }
        match self.game_config(game) {
            None => Err(format!("{game} is not in this node's catalogue")),
            Some(g) if !g.tiers.is_empty() && !g.tiers.contains(tier) => {
                Err(format!("{game} does not run at {tier} on this node"))
            }
            Some(_) => Ok(()),
        }
    }

    /// The game's launch settings: from the catalogue, or the synthetic game when the node
    /// has no catalogue.
    pub(super) fn game_config(&self, game: &GameId) -> Option<AgentGameConfig> {
        if self.games.is_empty() {
            return Some(AgentGameConfig {
                id: game.clone(),
                command: None,
                args: Vec::new(),
                env: Default::default(),
                tiers: Vec::new(),
            });
        }
        self.games.iter().find(|g| &g.id == game).cloned()
    }

    /// Takes the warm instance in the reserved slot if it fits the session, else starts a
    /// fresh one there (stopping whatever else held the slot). Returns whether it was warm.
    pub(super) fn instance_for(&mut self, r: &Reserve) -> bool {
        let in_slot = self
            .instance_slots
            .iter()
            .find(|(k, (slot, _))| k.gpu == r.gpu && *slot == r.slot)
            .map(|(k, _)| k.id);
        if let Some(id) = in_slot
            && let Some(sup) = self.supervisors.get_mut(&r.gpu)
        {
            let fits = sup.instances().any(|(i, game, tier, state)| {
                i == id && game == &r.game && tier == &r.tier && state == InstanceState::Warm
            });
            if fits && sup.assign_instance(id, r.session_id) {
                return true;
            }
            // The broker's view was older than ours: the slot holds something else. It stops;
            // its slot and vGPU stay recorded until it has exited, and the session's own
            // instance waits for them (see `launch_spec`).
            sup.evict(id);
        }
        let Some(sup) = self.supervisors.get_mut(&r.gpu) else {
            // Unreachable: reserve checked the GPU. Start nothing rather than panic.
            return false;
        };
        let id = sup.start_for_session(r.game.clone(), r.tier.clone(), r.session_id);
        let key = InstanceKey {
            gpu: r.gpu.clone(),
            id,
        };
        self.instance_slots.insert(key, (r.slot, None));
        self.prune_slots();
        self.wake.notify_one();
        false
    }

    /// Keeps the newest plan's warm targets and applies them.
    pub(super) fn set_warm_plan(&mut self, plan: &PoolPlan) {
        for g in &plan.gpus {
            if !self.supervisors.contains_key(&g.gpu) {
                continue;
            }
            let targets = g
                .warm
                .iter()
                .filter(|t| match self.runnable(&t.game, &t.tier) {
                    Ok(()) => true,
                    Err(why) => {
                        tracing::warn!(gpu = %g.gpu, game = %t.game, tier = %t.tier, %why, "warm target ignored");
                        false
                    }
                })
                .cloned()
                .collect();
            self.warm_plan.insert(g.gpu.clone(), targets);
            self.refresh_targets(&g.gpu);
        }
    }

    /// Slots on `gpu` instances can use: one per vGPU where the GPU is sliced, one on an
    /// exclusive GPU, none otherwise (a sliced GPU without vGPUs waits for its plan).
    pub(super) fn slot_capacity(&self, gpu: &GpuId) -> u32 {
        let vgpus = self.pool.vgpus(gpu).len();
        let exclusive = self
            .gpu(gpu)
            .is_some_and(|g| g.found.mode == GpuMode::Exclusive);
        if vgpus > 0 {
            u32::try_from(vgpus).unwrap_or(u32::MAX)
        } else {
            u32::from(exclusive)
        }
    }

    /// Gives `gpu`'s supervisor its warm targets: the plan's, within the slots sessions leave
    /// free, first targets first; none while draining.
    pub(super) fn refresh_targets(&mut self, gpu: &GpuId) {
        let sessions = self.sessions.values().filter(|h| &h.gpu == gpu).count();
        let mut free = if self.draining.is_some() {
            0
        } else {
            usize::try_from(self.slot_capacity(gpu))
                .unwrap_or(usize::MAX)
                .saturating_sub(sessions)
        };
        let targets: Vec<_> = self
            .warm_plan
            .get(gpu)
            .into_iter()
            .flatten()
            .map(|t| {
                let n = usize::from(t.count).min(free);
                free -= n;
                (
                    (t.game.clone(), t.tier.clone()),
                    u16::try_from(n).unwrap_or(u16::MAX),
                )
            })
            .collect();
        if let Some(sup) = self.supervisors.get_mut(gpu) {
            sup.set_targets(targets);
            // Instances dropped without ever running (a start cancelled, a restart no longer
            // wanted) leave no exit behind: forget their slots now.
            self.prune_slots();
            self.wake.notify_one();
        }
    }

    /// The lowest slot of `gpu` that no session and no instance holds, with a vGPU no
    /// instance uses (where the GPU has vGPUs).
    fn free_slot(&self, gpu: &GpuId) -> Option<(u32, Option<uuid::Uuid>)> {
        let taken = |slot: u32| {
            self.sessions
                .values()
                .any(|h| &h.gpu == gpu && h.slot == slot)
                || self
                    .instance_slots
                    .iter()
                    .any(|(k, (s, _))| &k.gpu == gpu && *s == slot)
        };
        let slot = (0..self.slot_capacity(gpu)).find(|s| !taken(*s))?;
        Some((slot, self.free_vgpu(gpu)))
    }

    /// A vGPU of `gpu` that no instance uses.
    fn free_vgpu(&self, gpu: &GpuId) -> Option<uuid::Uuid> {
        self.pool.vgpus(gpu).into_iter().map(|v| v.uuid).find(|u| {
            !self
                .instance_slots
                .iter()
                .any(|(k, (_, v))| &k.gpu == gpu && v.as_ref() == Some(u))
        })
    }

    /// The launch spec for instance `id` on `gpu`, recording its slot and vGPU. `None` when
    /// there is no room (the instance is dropped) or its game or tier is gone.
    fn launch_spec(
        &mut self,
        gpu: &GpuId,
        id: InstanceId,
        game: &GameId,
        tier: &TierName,
    ) -> Option<LaunchSpec> {
        let key = InstanceKey {
            gpu: gpu.clone(),
            id,
        };
        let preset = self.tiers.iter().find(|t| &t.name == tier)?.clone();
        let config = self.game_config(game)?;
        let (slot, vgpu) = match self.instance_slots.get(&key).copied() {
            // A session's instance: its slot is the reserved one. It waits while an instance
            // that held the slot is still stopping, and takes a vGPU no instance uses.
            Some((slot, None)) => {
                let held_by_another = self
                    .instance_slots
                    .iter()
                    .any(|(k, (s, _))| k != &key && k.gpu == *gpu && *s == slot);
                let vgpu = self.free_vgpu(gpu);
                let sliced = !self.pool.vgpus(gpu).is_empty();
                if held_by_another || (sliced && vgpu.is_none()) {
                    return None;
                }
                (slot, vgpu)
            }
            Some(placed) => placed,
            None => self.free_slot(gpu)?,
        };
        self.instance_slots.insert(key.clone(), (slot, vgpu));
        let name = self.instance_name(&key);
        let mut spec = LaunchSpec::new(name, &config, &preset, gpu, vgpu);
        if let (Some(v), "mig") = (vgpu, self.pool.backend_kind()) {
            // CUDA and the container runtime address a MIG slice by its own device name.
            let device = crate::vgpu::mig::visible_device(v);
            spec.env
                .insert("CUDA_VISIBLE_DEVICES".to_owned(), device.clone());
            spec.env.insert("NVIDIA_VISIBLE_DEVICES".to_owned(), device);
        }
        Some(spec)
    }

    /// An instance's name, also its cgroup's: unique across agent restarts (the generation is
    /// part of it), or the name an adopted instance had.
    pub(super) fn instance_name(&self, key: &InstanceKey) -> String {
        self.instance_names
            .get(key)
            .cloned()
            .unwrap_or_else(|| format!("instance-{}-{}-{}", self.generation, key.id, key.gpu))
    }

    /// Forgets an instance's slot and process.
    fn forget(&mut self, key: &InstanceKey) {
        self.instance_slots.remove(key);
        self.instance_names.remove(key);
        if self.instance_processes.remove(key).is_some() {
            self.dirty = true;
        }
    }

    /// Forgets the slots of instances the supervisors no longer know.
    fn prune_slots(&mut self) {
        let sups = &self.supervisors;
        let known = |k: &InstanceKey| {
            sups.get(&k.gpu)
                .is_some_and(|s| s.instances().any(|(i, ..)| i == k.id))
        };
        self.instance_slots.retain(|k, _| known(k));
        self.instance_names.retain(|k, _| known(k));
        let before = self.instance_processes.len();
        self.instance_processes.retain(|k, _| known(k));
        if self.instance_processes.len() != before {
            self.dirty = true;
        }
    }

    /// Ready warm instances, for `hello` and heartbeats.
    pub(super) fn warm_instances(&self) -> Vec<WarmInstance> {
        let mut out = Vec::new();
        for (gpu, sup) in &self.supervisors {
            for (id, game, tier, state) in sup.instances() {
                if state != InstanceState::Warm {
                    continue;
                }
                let key = InstanceKey {
                    gpu: gpu.clone(),
                    id,
                };
                if let Some((slot, _)) = self.instance_slots.get(&key) {
                    out.push(WarmInstance {
                        gpu: gpu.clone(),
                        slot: *slot,
                        game: game.clone(),
                        tier: tier.clone(),
                    });
                }
            }
        }
        out
    }

    /// Instances per state and tier, for metrics: (tier, warm, active).
    pub fn instance_counts(&self) -> Vec<(TierName, u32, u32)> {
        let mut counts: std::collections::BTreeMap<TierName, (u32, u32)> = self
            .tiers
            .iter()
            .map(|t| (t.name.clone(), (0, 0)))
            .collect();
        for sup in self.supervisors.values() {
            for (_, _, tier, state) in sup.instances() {
                let entry = counts.entry(tier.clone()).or_default();
                match state {
                    InstanceState::Warm => entry.0 += 1,
                    InstanceState::Active(_) => entry.1 += 1,
                    _ => {}
                }
            }
        }
        counts
            .into_iter()
            .map(|(tier, (warm, active))| (tier, warm, active))
            .collect()
    }
}

impl InstanceHost for AgentCore {
    fn poll_command(&mut self, now: Timestamp) -> Option<InstanceCommand> {
        if let Some(adopt) = self.adoptions.pop_front() {
            return Some(adopt);
        }
        // Starts that found no free slot wait until an instance leaves one.
        let deferred = std::mem::take(&mut self.deferred_starts);
        let mut found = None;
        for (key, game, tier) in deferred {
            let still_wanted = self.supervisors.get(&key.gpu).is_some_and(|s| {
                s.instances().any(|(i, _, _, st)| {
                    i == key.id && matches!(st, InstanceState::Starting | InstanceState::Active(_))
                })
            });
            if !still_wanted {
                continue;
            }
            if found.is_none()
                && let Some(spec) = self.launch_spec(&key.gpu, key.id, &game, &tier)
            {
                found = Some(InstanceCommand::Start { key, spec });
            } else {
                self.deferred_starts.push((key, game, tier));
            }
        }
        if found.is_some() {
            return found;
        }
        let gpus: Vec<GpuId> = self.supervisors.keys().cloned().collect();
        for gpu in gpus {
            loop {
                let action = self.supervisors.get_mut(&gpu)?.poll_action(now);
                match action {
                    None => break,
                    Some(Action::Stop { id }) => {
                        return Some(InstanceCommand::Stop {
                            key: InstanceKey { gpu, id },
                        });
                    }
                    Some(Action::Start { id, game, tier }) => {
                        match self.launch_spec(&gpu, id, &game, &tier) {
                            Some(spec) => {
                                return Some(InstanceCommand::Start {
                                    key: InstanceKey { gpu, id },
                                    spec,
                                });
                            }
                            // Every slot is held (one of them by an instance still stopping),
                            // or a session's slot is not free yet: it waits for an exit.
                            None => self.deferred_starts.push((
                                InstanceKey {
                                    gpu: gpu.clone(),
                                    id,
                                },
                                game,
                                tier,
                            )),
                        }
                    }
                }
            }
        }
        None
    }

    fn started(&mut self, key: &InstanceKey, process: Option<ProcessId>) {
        if let Some(sup) = self.supervisors.get_mut(&key.gpu) {
            sup.started(key.id);
        }
        if let Some(p) = process {
            self.instance_processes.insert(key.clone(), p);
            self.dirty = true;
        }
    }

    fn keep_on_shutdown(&self, key: &InstanceKey) -> bool {
        let active = self.supervisors.get(&key.gpu).is_some_and(|s| {
            s.instances()
                .any(|(i, _, _, state)| i == key.id && matches!(state, InstanceState::Active(_)))
        });
        active && self.instance_processes.contains_key(key)
    }

    fn take_snapshot(&mut self) -> Option<String> {
        if !std::mem::take(&mut self.dirty) {
            return None;
        }
        match toml::to_string(&self.snapshot()) {
            Ok(text) => Some(text),
            Err(e) => {
                tracing::error!(error = %e, "cannot encode the sessions snapshot");
                self.dirty = true;
                None
            }
        }
    }

    fn exited(&mut self, key: &InstanceKey, now: Timestamp, ran: Duration) -> Vec<Message> {
        let Some(sup) = self.supervisors.get_mut(&key.gpu) else {
            return Vec::new();
        };
        let crashed = sup.instances().find_map(|(i, _, _, state)| match state {
            _ if i != key.id => None,
            InstanceState::Active(_) => Some("active"),
            InstanceState::Stopping => None,
            _ => Some("warm"),
        });
        if let Some(state) = crashed {
            metrics::counter!(crate::metrics::INSTANCE_CRASHES, "state" => state).increment(1);
        }
        let ended = sup.exited(key.id, now, ran, self.policy.healthy_after);
        if !sup.instances().any(|(i, ..)| i == key.id) {
            self.forget(key);
        }
        self.prune_slots();
        self.apply_pending_plan();
        self.wake.notify_one();
        match ended {
            Some(e) => {
                tracing::warn!(session_id = %e.session, instance = %key, "the session's game instance exited");
                self.end(&e.session, e.reason).into_iter().collect()
            }
            None => Vec::new(),
        }
    }

    fn next_deadline(&self) -> Option<Timestamp> {
        self.supervisors
            .values()
            .filter_map(|s| s.next_deadline())
            .min()
    }
}

#[cfg(test)]
mod tests {
    use framecast_shared::ids::SessionId;
    use framecast_shared::protocol::{Drain, GpuPlan, PoolPlan, RejectReason, WarmTarget};
    use framecast_shared::state::{EndReason, SessionState};

    use super::super::tests::{T0, core, reserve};
    use super::*;
    use crate::link::AgentState;

    fn plan(generation: u64, vgpus: u16, warm: &[(&str, &str, u16)]) -> Message {
        Message::PoolPlan(PoolPlan {
            plan_generation: generation,
            gpus: vec![GpuPlan {
                gpu: GpuId::new("sim-0").unwrap(),
                mode: GpuMode::EqualSize,
                profile: Some("L4-8Q".into()),
                vgpus,
                warm: warm
                    .iter()
                    .map(|(game, tier, count)| WarmTarget {
                        game: GameId::new(*game).unwrap(),
                        tier: TierName::new(*tier).unwrap(),
                        count: *count,
                    })
                    .collect(),
            }],
        })
    }

    /// Runs every queued command the way the runner would, with every launch succeeding.
    fn run_commands(c: &mut AgentCore) -> (Vec<LaunchSpec>, Vec<InstanceKey>) {
        let (mut started, mut stopped) = (Vec::new(), Vec::new());
        while let Some(cmd) = c.poll_command(T0) {
            match cmd {
                InstanceCommand::Start { key, spec } => {
                    c.started(&key, None);
                    started.push(spec);
                }
                InstanceCommand::Stop { key } => stopped.push(key),
                InstanceCommand::Adopt { .. } => panic!("nothing to adopt here"),
            }
        }
        (started, stopped)
    }

    fn warm_slots(c: &AgentCore) -> Vec<(u32, String)> {
        let mut slots: Vec<_> = c
            .hello(1)
            .warm
            .into_iter()
            .map(|w| (w.slot, w.game.to_string()))
            .collect();
        slots.sort();
        slots
    }

    fn reserve_game(n: u128, slot: u32, game: &str) -> Message {
        let Message::Reserve(mut r) = reserve(n, "sim-0", slot, 1000) else {
            unreachable!()
        };
        r.game = GameId::new(game).unwrap();
        Message::Reserve(r)
    }

    #[test]
    fn the_plan_starts_warm_instances_in_free_slots_each_on_its_own_vgpu() {
        let mut c = core();
        c.handle(plan(1, 3, &[("arena", "4k", 2)]));
        let (started, _) = run_commands(&mut c);
        assert_eq!(started.len(), 2);
        let vgpus: Vec<_> = started
            .iter()
            .map(|s| s.env.get("FRAMECAST_VGPU"))
            .collect();
        assert!(vgpus.iter().all(Option::is_some));
        assert_ne!(vgpus[0], vgpus[1], "two instances never share a vGPU");
        assert_eq!(
            warm_slots(&c),
            [(0, "arena".to_owned()), (1, "arena".to_owned())]
        );
        let hb = c.heartbeat(1, 1);
        assert_eq!(hb.warm.map(|w| w.len()), Some(2));
        // Asking for more warm instances than the GPU has vGPUs keeps to the vGPUs.
        c.handle(plan(2, 3, &[("arena", "4k", 5)]));
        run_commands(&mut c);
        assert_eq!(warm_slots(&c).len(), 3);
    }

    #[test]
    fn a_reservation_takes_the_warm_instance_in_its_slot_and_a_replacement_starts() {
        let mut c = core();
        c.handle(plan(1, 3, &[("arena", "4k", 1)]));
        run_commands(&mut c);
        let out = c.handle(reserve_game(1, 0, "arena"));
        assert!(
            matches!(out.as_slice(), [Message::Reserved(r)] if r.warm),
            "{out:?}"
        );
        // The warm instance became the session's; another starts in the next free slot.
        let (started, stopped) = run_commands(&mut c);
        assert_eq!((started.len(), stopped.len()), (1, 0));
        assert_eq!(warm_slots(&c), [(1, "arena".to_owned())]);
        // A session for another game in the warm slot: cold start, the warm one is stopped.
        let out = c.handle(reserve_game(2, 1, "puzzle"));
        assert!(
            matches!(out.as_slice(), [Message::Reserved(r)] if !r.warm),
            "{out:?}"
        );
        let (started, stopped) = run_commands(&mut c);
        assert_eq!(stopped.len(), 1, "the warm instance in slot 1 stops");
        // A warm replacement starts in the last free slot; the session's own instance waits
        // until the one stopping in its slot has exited, and then takes its vGPU.
        assert_eq!(started.len(), 1);
        assert_eq!(warm_slots(&c), [(2, "arena".to_owned())]);
        let held: Vec<_> = started
            .iter()
            .filter_map(|s| s.env.get("FRAMECAST_VGPU").cloned())
            .collect();
        for key in stopped {
            assert!(c.exited(&key, T0, Duration::from_secs(5)).is_empty());
        }
        let (started, _) = run_commands(&mut c);
        assert_eq!(started.len(), 1, "the session's instance, now");
        let vgpu = started[0].env.get("FRAMECAST_VGPU").cloned();
        assert!(vgpu.is_some() && !held.contains(vgpu.as_ref().unwrap()));
        // Every slot is taken now: a third session gets no warm instance and none restarts.
        c.handle(reserve_game(3, 2, "arena"));
        let (started, stopped) = run_commands(&mut c);
        assert_eq!((started.len(), stopped.len()), (0, 0));
        assert!(warm_slots(&c).is_empty());
    }

    #[test]
    fn a_crashed_session_instance_ends_the_session_and_frees_its_encoder() {
        let mut c = core();
        let full = c.heartbeat(1, 1).gpus[0].free_encoder;
        c.handle(reserve(1, "sim-0", 0, 2000));
        let key = match c.poll_command(T0) {
            Some(InstanceCommand::Start { key, .. }) => key,
            other => panic!("{other:?}"),
        };
        c.started(
            &key,
            Some(ProcessId {
                pid: 4242,
                start_ticks: 1,
            }),
        );
        assert_ne!(c.heartbeat(1, 2).gpus[0].free_encoder, full);
        let out = c.exited(&key, T0, Duration::from_secs(30));
        assert!(
            matches!(out.as_slice(), [Message::SessionUpdate(u)]
                if u.state == SessionState::Ended(EndReason::Error) && u.session_id == SessionId::new(T0, 1)),
            "{out:?}"
        );
        assert_eq!(c.session_count(), 0);
        assert_eq!(c.heartbeat(1, 3).gpus[0].free_encoder, full);
    }

    #[test]
    fn a_released_session_stops_its_instance() {
        let mut c = core();
        c.handle(reserve(1, "sim-0", 0, 1000));
        run_commands(&mut c);
        c.handle(Message::Release(framecast_shared::protocol::Release {
            session_id: SessionId::new(T0, 1),
            reason: EndReason::Released,
        }));
        let (_, stopped) = run_commands(&mut c);
        assert_eq!(stopped.len(), 1);
    }

    #[test]
    fn crashed_warm_instances_restart_after_a_backoff_in_their_slot() {
        let mut c = core();
        c.handle(plan(1, 2, &[("arena", "4k", 1)]));
        let key = match c.poll_command(T0) {
            Some(InstanceCommand::Start { key, .. }) => key,
            other => panic!("{other:?}"),
        };
        c.started(&key, None);
        assert!(c.exited(&key, T0, Duration::from_millis(10)).is_empty());
        assert!(warm_slots(&c).is_empty());
        assert_eq!(c.poll_command(T0), None, "nothing before the backoff ends");
        let at = c.next_deadline().unwrap();
        assert!(at > T0);
        match c.poll_command(at) {
            Some(InstanceCommand::Start { key: again, .. }) => {
                assert_eq!(again, key);
                c.started(&again, None);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(warm_slots(&c), [(0, "arena".to_owned())]);
    }

    #[test]
    fn draining_stops_warm_instances_and_unknown_targets_are_ignored() {
        let mut c = core();
        c.handle(plan(1, 2, &[("arena", "4k", 1), ("arena", "8k", 1)]));
        let (started, _) = run_commands(&mut c);
        assert_eq!(started.len(), 1, "the 8k target names no tier of this node");
        c.handle(Message::Drain(Drain { deadline: T0 }));
        let (_, stopped) = run_commands(&mut c);
        assert_eq!(stopped.len(), 1);
        assert!(warm_slots(&c).is_empty());
        let out = c.handle(reserve(9, "sim-0", 1, 1000));
        assert!(
            matches!(out.as_slice(), [Message::Rejected(r)] if r.reason == RejectReason::Draining)
        );
    }

    #[test]
    fn the_hello_reports_a_drain_and_a_resume_is_harmless_when_not_draining() {
        let resume = || {
            Message::Resume(framecast_shared::protocol::Resume {
                reason: "an operator uncordoned the node".into(),
            })
        };
        let mut c = core();
        c.handle(plan(1, 2, &[("arena", "4k", 1)]));
        let (started, _) = run_commands(&mut c);
        assert_eq!(started.len(), 1);
        assert_eq!(c.hello(1).draining, None);
        // The broker sends a resume on every uncordon, draining or not: nothing changes.
        assert!(c.handle(resume()).is_empty());
        let (started, stopped) = run_commands(&mut c);
        assert_eq!((started.len(), stopped.len()), (0, 0));
        assert_eq!(warm_slots(&c), [(0, "arena".to_owned())]);
        assert_eq!(c.hello(1).draining, None);
        assert!(matches!(
            c.handle(reserve(9, "sim-1", 0, 1000)).as_slice(),
            [Message::Reserved(_)]
        ));
        // A drain is reported in the hello, so a broker that lost it learns it again...
        let deadline = Timestamp::from_millis(T0.as_millis() + 600_000);
        c.handle(Message::Drain(Drain { deadline }));
        let (_, stopped) = run_commands(&mut c);
        assert_eq!(stopped.len(), 1);
        for key in stopped {
            c.exited(&key, T0, Duration::from_secs(60));
        }
        assert_eq!(c.hello(1).draining, Some(deadline));
        // ...and a resume lifts it: sessions are taken and warm instances come back.
        c.handle(resume());
        assert_eq!(c.hello(1).draining, None);
        let (started, _) = run_commands(&mut c);
        assert_eq!(started.len(), 1);
        assert!(matches!(
            c.handle(reserve(10, "sim-1", 1, 1000)).as_slice(),
            [Message::Reserved(_)]
        ));
    }

    #[test]
    fn a_replacement_waits_for_the_slot_of_an_instance_still_stopping() {
        let mut c = core();
        c.handle(plan(1, 2, &[("arena", "4k", 2)]));
        run_commands(&mut c);
        c.handle(reserve_game(1, 0, "arena"));
        // Slot 0 is the session's, slot 1 warm: no room for the replacement.
        let (started, _) = run_commands(&mut c);
        assert!(started.is_empty());
        c.handle(Message::Release(framecast_shared::protocol::Release {
            session_id: SessionId::new(T0, 1),
            reason: EndReason::Released,
        }));
        let (started, stopped) = run_commands(&mut c);
        assert_eq!(
            (started.len(), stopped.len()),
            (0, 1),
            "slot 0 is still held"
        );
        for key in stopped {
            c.exited(&key, T0, Duration::from_secs(60));
        }
        let (started, _) = run_commands(&mut c);
        assert_eq!(started.len(), 1, "the waiting start takes the freed slot");
        assert_eq!(
            warm_slots(&c),
            [(0, "arena".to_owned()), (1, "arena".to_owned())]
        );
    }

    #[test]
    fn a_restart_that_is_no_longer_wanted_gives_its_slot_back() {
        let mut c = core();
        c.handle(plan(1, 2, &[("arena", "4k", 2)]));
        let (started, _) = run_commands(&mut c);
        assert_eq!(started.len(), 2);
        // The instance in slot 1 crashes and waits for its restart...
        let key = InstanceKey {
            gpu: GpuId::new("sim-0").unwrap(),
            id: 2,
        };
        c.exited(&key, T0, Duration::from_millis(1));
        // ...when the plan wants another game instead: the waiting restart is dropped and
        // its slot goes to the new game.
        c.handle(plan(2, 2, &[("arena", "4k", 1), ("puzzle", "4k", 1)]));
        let (started, _) = run_commands(&mut c);
        assert_eq!(started.len(), 1);
        assert_eq!(
            warm_slots(&c),
            [(0, "arena".to_owned()), (1, "puzzle".to_owned())]
        );
    }

    #[test]
    fn a_reslice_waits_for_the_warm_instances_on_the_old_vgpus() {
        let mut c = core();
        c.handle(plan(1, 3, &[("arena", "4k", 2)]));
        run_commands(&mut c);
        let old: Vec<_> = c.pool.vgpus(&GpuId::new("sim-0").unwrap());
        // A new profile: the warm instances stop first; the vGPUs stay until they exit.
        let Message::PoolPlan(mut p) = plan(2, 6, &[("arena", "1080p", 2)]) else {
            unreachable!()
        };
        p.gpus[0].profile = Some("L4-4Q".into());
        c.handle(Message::PoolPlan(p));
        let (started, stopped) = run_commands(&mut c);
        assert_eq!((started.len(), stopped.len()), (0, 2));
        assert_eq!(c.pool.vgpus(&GpuId::new("sim-0").unwrap()), old);
        for key in stopped {
            c.exited(&key, T0, Duration::from_secs(60));
        }
        // All gone: the GPU is re-sliced and the new warm instances start on new vGPUs.
        assert_eq!(c.hello(1).gpus[0].vgpus, 6);
        assert_eq!(c.hello(1).gpus[0].profile.as_deref(), Some("L4-4Q"));
        let (started, _) = run_commands(&mut c);
        assert_eq!(started.len(), 2);
        assert!(
            started
                .iter()
                .all(|s| s.env.get("FRAMECAST_TIER").map(String::as_str) == Some("1080p"))
        );
    }

    #[test]
    fn a_slot_beyond_the_gpus_vgpus_is_refused() {
        let mut c = core();
        c.handle(plan(1, 2, &[]));
        let out = c.handle(reserve(1, "sim-0", 2, 1000));
        assert!(
            matches!(out.as_slice(), [Message::Rejected(r)] if r.reason == RejectReason::NoCapacity),
            "{out:?}"
        );
        assert_eq!(c.session_count(), 0);
    }
}
