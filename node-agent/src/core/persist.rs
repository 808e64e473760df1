//! What the core keeps across an agent restart: each running session with its slot, encoder
//! lease and game process, so the next agent adopts the processes instead of orphaning them.
//!
//! The runner writes the snapshot to the data directory whenever it changes; the next agent
//! reads it before it says hello. A session whose process is gone (or was the in-process
//! synthetic game) is not adopted: the broker learns from the hello that it ended.

use serde::{Deserialize, Serialize};

use framecast_shared::ids::{GameId, GpuId, SessionId, TierName};
use framecast_shared::state::SessionState;
use framecast_shared::time::Timestamp;
use framecast_shared::units::EncoderUnits;

use super::{AgentCore, Held};
use crate::instances::launch::ProcessId;
use crate::instances::runner::{InstanceCommand, InstanceKey};
use crate::instances::supervisor::InstanceState;

/// The contents of the sessions file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Snapshot {
    /// The sessions running when it was written.
    #[serde(default)]
    pub sessions: Vec<SessionRecord>,
}

/// One running session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionRecord {
    /// The session.
    pub session_id: SessionId,
    /// Its GPU.
    pub gpu: GpuId,
    /// Its slot.
    pub slot: u32,
    /// Its game.
    pub game: GameId,
    /// Its tier.
    pub tier: TierName,
    /// Where it was.
    pub state: SessionState,
    /// Since when.
    pub since: Timestamp,
    /// Its encoder lease.
    pub encoder: EncoderUnits,
    /// Its vGPU, where the GPU is sliced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vgpu: Option<uuid::Uuid>,
    /// Its game process; absent for the synthetic game, which does not outlive the agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub process: Option<ProcessId>,
    /// Its instance's name, which is also its cgroup's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
}

/// What adopting a snapshot did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Adoption {
    /// Sessions whose process was found and taken over.
    pub adopted: Vec<SessionId>,
    /// Sessions left behind, with why.
    pub dropped: Vec<(SessionId, String)>,
    /// Game processes of dropped sessions that still run: nothing will ever stop them, so the
    /// caller kills them.
    pub orphans: Vec<ProcessId>,
}

impl AgentCore {
    /// The snapshot of the running sessions now.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            sessions: self
                .sessions
                .iter()
                .map(|(id, h)| {
                    let key = self.instance_of(&h.gpu, id);
                    let placed = key.as_ref().and_then(|k| self.instance_slots.get(k));
                    SessionRecord {
                        session_id: *id,
                        gpu: h.gpu.clone(),
                        slot: h.slot,
                        game: h.game.clone(),
                        tier: h.tier.clone(),
                        state: h.state,
                        since: h.since,
                        encoder: h._lease.units(),
                        vgpu: placed.and_then(|(_, v)| *v),
                        instance: key.as_ref().map(|k| self.instance_name(k)),
                        process: key.and_then(|k| self.instance_processes.get(&k).copied()),
                    }
                })
                .collect(),
        }
    }

    /// Takes over the sessions of `snapshot` whose game process still runs (`alive` says
    /// which), before the first hello. The runner is told to watch each adopted process.
    pub fn adopt(&mut self, snapshot: Snapshot, alive: &dyn Fn(&ProcessId) -> bool) -> Adoption {
        let mut out = Adoption::default();
        for r in snapshot.sessions {
            match self.adopt_one(&r, alive) {
                Ok(()) => out.adopted.push(r.session_id),
                Err(why) => {
                    tracing::warn!(session_id = %r.session_id, %why, "session not adopted");
                    if let Some(p) = r.process.filter(|p| alive(p)) {
                        out.orphans.push(p);
                    }
                    out.dropped.push((r.session_id, why));
                }
            }
        }
        self.dirty = true;
        out
    }

    fn adopt_one(
        &mut self,
        r: &SessionRecord,
        alive: &dyn Fn(&ProcessId) -> bool,
    ) -> Result<(), String> {
        let Some(process) = r.process else {
            return Err("its game ran inside the previous agent".into());
        };
        if !alive(&process) {
            return Err(format!("its game process {} is gone", process.pid));
        }
        if self.sessions.contains_key(&r.session_id) {
            return Err("already held".into());
        }
        let lease = self
            .gpu(&r.gpu)
            .ok_or_else(|| format!("{} is no longer on this node", r.gpu))?
            .encoder
            .lease(r.encoder)
            .map_err(|e| e.to_string())?;
        let sup = self
            .supervisors
            .get_mut(&r.gpu)
            .ok_or_else(|| format!("{} has no supervisor", r.gpu))?;
        let id = sup.adopt_active(r.game.clone(), r.tier.clone(), r.session_id);
        let key = InstanceKey {
            gpu: r.gpu.clone(),
            id,
        };
        self.instance_slots.insert(key.clone(), (r.slot, r.vgpu));
        self.instance_processes.insert(key.clone(), process);
        if let Some(name) = &r.instance {
            self.instance_names.insert(key.clone(), name.clone());
        }
        self.adoptions.push_back(InstanceCommand::Adopt {
            name: self.instance_name(&key),
            key,
            process,
        });
        self.sessions.insert(
            r.session_id,
            Held {
                gpu: r.gpu.clone(),
                slot: r.slot,
                game: r.game.clone(),
                tier: r.tier.clone(),
                // A player's stream does not survive the agent: a playing session waits for
                // its player to reconnect, within the broker's grace window.
                state: match r.state {
                    SessionState::Connecting | SessionState::Active => SessionState::Reconnecting,
                    other => other,
                },
                since: r.since,
                last_input: None,
                _lease: lease,
            },
        );
        tracing::info!(session_id = %r.session_id, gpu = %r.gpu, slot = r.slot, pid = process.pid, "session adopted");
        self.wake.notify_one();
        Ok(())
    }

    /// The instance running `session` on `gpu`.
    pub(super) fn instance_of(&self, gpu: &GpuId, session: &SessionId) -> Option<InstanceKey> {
        let sup = self.supervisors.get(gpu)?;
        sup.instances()
            .find(|(_, _, _, state)| *state == InstanceState::Active(*session))
            .map(|(id, ..)| InstanceKey {
                gpu: gpu.clone(),
                id,
            })
    }
}

#[cfg(test)]
mod tests {
    use framecast_shared::protocol::Message;

    use super::super::tests::{T0, core, reserve};
    use super::*;
    use crate::instances::runner::InstanceHost;
    use crate::link::AgentState;

    fn process(pid: u32) -> ProcessId {
        ProcessId {
            pid,
            start_ticks: 77,
        }
    }

    /// A core with two sessions whose processes started (pids 101 and 102).
    fn core_with_sessions() -> AgentCore {
        let mut c = core();
        c.handle(reserve(1, "sim-0", 0, 2000));
        c.handle(reserve(2, "sim-1", 3, 1000));
        let mut pid = 100;
        while let Some(cmd) = c.poll_command(T0) {
            if let InstanceCommand::Start { key, .. } = cmd {
                pid += 1;
                c.started(&key, Some(process(pid)));
            }
        }
        c
    }

    #[test]
    fn a_snapshot_round_trips_through_its_file_format() {
        let mut c = core_with_sessions();
        let text = c.take_snapshot().expect("changed since start");
        assert_eq!(c.take_snapshot(), None, "nothing changed since");
        let back: Snapshot = toml::from_str(&text).unwrap();
        assert_eq!(back, c.snapshot());
        assert_eq!(back.sessions.len(), 2);
        assert!(back.sessions.iter().all(|s| s.process.is_some()));
    }

    #[test]
    fn a_new_core_adopts_sessions_whose_process_lives_and_only_those() {
        let before = core_with_sessions().snapshot();
        let mut after = core();
        let full = after.heartbeat(1, 1).gpus[0].free_encoder;
        let name_before = before.sessions[0].instance.clone();
        assert!(name_before.is_some());
        let adoption = after.adopt(before, &|p| p.pid == 101);
        assert_eq!(adoption.adopted.len(), 1);
        assert_eq!(adoption.dropped.len(), 1);
        assert!(
            adoption.orphans.is_empty(),
            "the dropped one's process is gone"
        );
        // The adopted session holds its encoder units and is in the hello again.
        assert_ne!(after.heartbeat(1, 2).gpus[0].free_encoder, full);
        let hello = after.hello(2);
        assert_eq!(hello.sessions.len(), 1);
        assert_eq!(
            (hello.sessions[0].gpu.as_str(), hello.sessions[0].slot),
            ("sim-0", 0)
        );
        // The runner is told to watch the process, and a release stops it.
        let key = match after.poll_command(T0) {
            Some(InstanceCommand::Adopt { key, process, name }) => {
                assert_eq!(process.pid, 101);
                assert_eq!(Some(name), name_before, "it keeps its name and cgroup");
                key
            }
            other => panic!("{other:?}"),
        };
        assert!(
            after.keep_on_shutdown(&key),
            "a session's process outlives the agent"
        );
        let out = after.handle(Message::Release(framecast_shared::protocol::Release {
            session_id: adoption.adopted[0],
            reason: framecast_shared::state::EndReason::Released,
        }));
        assert_eq!(out.len(), 1);
        assert_eq!(
            after.poll_command(T0),
            Some(InstanceCommand::Stop { key: key.clone() })
        );
        assert!(after.exited(&key, T0, std::time::Duration::ZERO).is_empty());
        assert_eq!(after.heartbeat(1, 3).gpus[0].free_encoder, full);
    }

    #[test]
    fn synthetic_sessions_are_not_adopted() {
        let mut c = core();
        c.handle(reserve(1, "sim-0", 0, 1000));
        while let Some(cmd) = c.poll_command(T0) {
            if let InstanceCommand::Start { key, .. } = cmd {
                c.started(&key, None);
            }
        }
        let mut after = core();
        let adoption = after.adopt(c.snapshot(), &|_| true);
        assert!(adoption.adopted.is_empty());
        assert_eq!(after.session_count(), 0);
    }
}
