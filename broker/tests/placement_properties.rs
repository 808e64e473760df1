//! Random event sequences against the placement engine: whatever happens, it never
//! over-commits a resource, never puts two sessions in one slot, ends every reservation,
//! keeps queue order, and lets no request wait past its class's timeout.
//!
//! A simulated agent per node mirrors what the engine told it, so its reports can be checked
//! against the engine: a faithful report must change nothing, a stale one must be ignored, and
//! a restarted agent's empty report must end exactly the sessions it had.

// In a test, a failed unwrap is a failed test.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::collections::BTreeMap;
use std::time::Duration;

use proptest::prelude::*;

use framecast_broker::placement::{
    Decision, Engine, EngineConfig, EngineEvent, Fallback, PlaceRequest, Placement, Priority,
    ReconcileOutcome, RegionRtt, simulated, strategy,
};
use framecast_shared::genre::GenreProfile;
use framecast_shared::gpu::{GpuMode, GpuSpec, models};
use framecast_shared::ids::{
    GameId, GenreName, GpuId, NodeId, RegionName, SessionId, TenantId, TierName,
};
use framecast_shared::protocol::{Hello, RunningSession};
use framecast_shared::state::{EndReason, SessionState};
use framecast_shared::tier::{Codec, TierPreset};
use framecast_shared::time::Timestamp;
use framecast_shared::units::EncoderUnits;

const T0: Timestamp = Timestamp::from_millis(1_800_000_000_000);
const TIERS: [&str; 3] = ["720p", "1080p", "4k"];
const GENRES: [&str; 3] = ["fps", "moba", "rpg"];
const QUEUE_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Debug, Clone)]
enum Op {
    Place {
        tier: usize,
        genre: usize,
        regions: usize,
        priority: usize,
        queue: bool,
        fallbacks: usize,
        game: usize,
    },
    Release(usize),
    Advance(u64),
    Connect(usize),
    Reconnect(usize),
    Report {
        node: usize,
        stale: bool,
    },
    Restart(usize),
    NodeDown(usize),
    Cordon(usize),
    Uncordon(usize),
    Drain {
        node: usize,
        secs: u64,
    },
    Explain {
        tier: usize,
        genre: usize,
    },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (0..3usize, 0..3usize, 0..4usize, 0..3usize, any::<bool>(), 0..4usize, 0..3usize).prop_map(
            |(tier, genre, regions, priority, queue, fallbacks, game)| Op::Place { tier, genre, regions, priority, queue, fallbacks, game }
        ),
        3 => any::<usize>().prop_map(Op::Release),
        3 => (1..90u64).prop_map(Op::Advance),
        2 => any::<usize>().prop_map(Op::Connect),
        1 => any::<usize>().prop_map(Op::Reconnect),
        2 => (0..NODES.len(), any::<bool>()).prop_map(|(node, stale)| Op::Report { node, stale }),
        1 => (0..NODES.len()).prop_map(Op::Restart),
        1 => (0..NODES.len()).prop_map(Op::NodeDown),
        1 => (0..NODES.len()).prop_map(Op::Cordon),
        1 => (0..NODES.len()).prop_map(Op::Uncordon),
        1 => (0..NODES.len(), 1..120u64).prop_map(|(node, secs)| Op::Drain { node, secs }),
        1 => (0..3usize, 0..3usize).prop_map(|(tier, genre)| Op::Explain { tier, genre }),
    ]
}

fn mig_with_nvenc() -> GpuSpec {
    let mut spec = models::h100_80gb("Test MIG GPU with NVENC");
    spec.nvenc_engines = 4;
    spec.encode_codecs = vec![Codec::H264];
    spec.encoder_capacity = EncoderUnits::from_milli(24_000);
    spec
}

fn capped_l4() -> GpuSpec {
    let mut spec = models::l4();
    spec.model = "Test L4 with a session cap".into();
    spec.encoder_session_cap = Some(3);
    spec
}

/// (node, region, model, mode, GPUs).
type NodeSpec = (&'static str, &'static str, fn() -> GpuSpec, GpuMode, usize);

const NODES: [NodeSpec; 6] = [
    ("n1", "eu", models::l4, GpuMode::EqualSize, 2),
    ("n2", "eu", models::l4, GpuMode::MixedSize, 1),
    ("n3", "us", models::rtx_4090, GpuMode::Exclusive, 2),
    ("n4", "eu", models::a10, GpuMode::EqualSize, 1),
    ("n5", "us", mig_with_nvenc, GpuMode::Mig, 1),
    ("n6", "eu", capped_l4, GpuMode::EqualSize, 1),
];

/// What a simulated agent knows: its generation and the sessions it was told to run.
#[derive(Debug, Default, Clone)]
struct Agent {
    generation: u64,
    sessions: BTreeMap<SessionId, RunningSession>,
}

struct Harness {
    engine: Engine,
    now: Timestamp,
    seq: u128,
    agents: Vec<Agent>,
    /// Live sessions: placement, and whether still a reservation.
    live: BTreeMap<SessionId, (Placement, SessionState)>,
    /// Queued requests per tier: (session, priority, arrival order, since).
    queued: Vec<Vec<(SessionId, Priority, u128, Timestamp)>>,
    /// For queued requests: the RTT of the first region and the genre's cap.
    rtt: BTreeMap<SessionId, (u32, u32)>,
    genre_of: BTreeMap<SessionId, usize>,
}

impl Harness {
    fn new(strategy_name: &str) -> Self {
        let config = EngineConfig {
            queue_timeout: [QUEUE_TIMEOUT; 3],
            ..EngineConfig::default()
        };
        let mut engine = Engine::new(
            TierPreset::defaults(),
            GenreProfile::defaults(),
            config,
            strategy::by_name(strategy_name, 3).unwrap(),
        );
        let mut agents = Vec::new();
        for (node, region, spec, mode, gpus) in NODES {
            let hello = simulated::hello(node, region, &spec(), mode, gpus, 1).unwrap();
            engine.reconcile(&hello, T0).unwrap();
            agents.push(Agent {
                generation: 1,
                sessions: BTreeMap::new(),
            });
        }
        Self {
            engine,
            now: T0,
            seq: 0,
            agents,
            live: BTreeMap::new(),
            queued: vec![Vec::new(); 3],
            genre_of: BTreeMap::new(),
            rtt: BTreeMap::new(),
        }
    }

    fn node_of(&self, node: &NodeId) -> usize {
        NODES.iter().position(|n| n.0 == node.as_str()).unwrap()
    }

    fn hello(&self, i: usize, generation: u64) -> Hello {
        let (node, region, spec, mode, gpus) = NODES[i];
        let mut hello = simulated::hello(node, region, &spec(), mode, gpus, generation).unwrap();
        hello.sessions = self.agents[i].sessions.values().cloned().collect();
        hello
    }

    fn on_placed(&mut self, p: Placement) -> Result<(), TestCaseError> {
        for (other, (q, _)) in &self.live {
            prop_assert!(
                !(q.gpu == p.gpu && q.slot == p.slot),
                "{} and {other} share {} slot {}",
                p.session_id,
                p.gpu,
                p.slot
            );
        }
        let i = self.node_of(&p.node);
        let genre = self.genre_of.get(&p.session_id).copied().unwrap_or(0);
        self.agents[i].sessions.insert(
            p.session_id,
            RunningSession {
                session_id: p.session_id,
                gpu: p.gpu.clone(),
                slot: p.slot,
                game: GameId::new("arena").unwrap(),
                tier: p.tier.clone(),
                genre: Some(GenreName::new(GENRES[genre]).unwrap()),
                state: SessionState::Reserved,
                since: self.now,
            },
        );
        self.live.insert(p.session_id, (p, SessionState::Reserved));
        Ok(())
    }

    fn forget(&mut self, session: &SessionId) {
        self.live.remove(session);
        for a in &mut self.agents {
            a.sessions.remove(session);
        }
        for q in &mut self.queued {
            q.retain(|(s, ..)| s != session);
        }
    }

    fn drain_events(&mut self) -> Result<(), TestCaseError> {
        while let Some(ev) = self.engine.poll_event() {
            match ev {
                EngineEvent::Placed(p) => {
                    let tier = TIERS.iter().position(|t| *t == p.tier.as_str()).unwrap();
                    // The tier served may be higher than asked; find the request's own queue.
                    let (asked, entry) = self
                        .queued
                        .iter()
                        .enumerate()
                        .find_map(|(t, q)| {
                            q.iter().find(|(s, ..)| *s == p.session_id).map(|e| (t, *e))
                        })
                        .ok_or_else(|| {
                            TestCaseError::fail(format!(
                                "{} placed from the queue but not queued",
                                p.session_id
                            ))
                        })?;
                    prop_assert!(tier >= asked);
                    let (_, prio, order, _) = entry;
                    for &(other, p2, o2, since) in &self.queued[asked] {
                        // A request still beyond its (relaxing) RTT cap does not compete for
                        // capacity, so others may pass it.
                        let (rtt, cap) = self.rtt.get(&other).copied().unwrap_or((0, 1));
                        let waited = self.now.saturating_since(since).as_secs_f64();
                        let relaxed = (f64::from(cap) * (1.0 + waited / 60.0).min(2.0)).round();
                        if f64::from(rtt) > relaxed {
                            continue;
                        }
                        prop_assert!(
                            !(p2 > prio || (p2 == prio && o2 < order)),
                            "{} placed while {other} ({p2:?}, #{o2}) was ahead of it ({prio:?}, #{order})",
                            p.session_id
                        );
                    }
                    self.queued[asked].retain(|(s, ..)| *s != p.session_id);
                    self.on_placed(p)?;
                }
                EngineEvent::Ended {
                    session_id,
                    node,
                    reason,
                } => {
                    if let Some((p, state)) = self.live.get(&session_id) {
                        if *state == SessionState::Reserved && reason == EndReason::Expired {
                            prop_assert!(self.now >= p.expires_at, "{session_id} expired early");
                        }
                        prop_assert_eq!(node.as_ref(), Some(&p.node));
                    } else {
                        prop_assert!(
                            node.is_none(),
                            "ended {session_id} on {node:?}, unknown to the test"
                        );
                        prop_assert_eq!(
                            reason,
                            EndReason::Expired,
                            "only a queue timeout ends a queued request"
                        );
                    }
                    self.forget(&session_id);
                }
            }
        }
        Ok(())
    }

    fn pick(&self, i: usize) -> Option<SessionId> {
        if self.live.is_empty() {
            return None;
        }
        self.live.keys().nth(i % self.live.len()).copied()
    }

    fn apply(&mut self, op: &Op) -> Result<(), TestCaseError> {
        match *op {
            Op::Place {
                tier,
                genre,
                regions,
                priority,
                queue,
                fallbacks,
                game,
            } => {
                self.seq += 1;
                let session_id = SessionId::new(self.now, self.seq);
                let regions = match regions {
                    0 => vec![("eu", 20)],
                    1 => vec![("us", 30)],
                    2 => vec![("eu", 35), ("us", 55)],
                    // Beyond the fps cap (40 ms) until it relaxes; within moba's and rpg's.
                    _ => vec![("eu", 58)],
                };
                let fallbacks = match fallbacks {
                    0 => vec![],
                    1 => vec![Fallback::NextRegion],
                    2 => vec![Fallback::TierUp],
                    _ => vec![Fallback::TierUp, Fallback::NextRegion],
                };
                let priority = [Priority::Low, Priority::Normal, Priority::High][priority];
                let request = PlaceRequest {
                    session_id,
                    tenant: TenantId::new("t").unwrap(),
                    game: GameId::new(["arena", "quest", "lanes"][game]).unwrap(),
                    tier: TierName::new(TIERS[tier]).unwrap(),
                    genre: GenreName::new(GENRES[genre]).unwrap(),
                    priority,
                    regions: regions
                        .iter()
                        .map(|(r, rtt)| RegionRtt {
                            region: RegionName::new(*r).unwrap(),
                            rtt_ms: *rtt,
                        })
                        .collect(),
                    fallbacks,
                    queue,
                };
                self.genre_of.insert(session_id, genre);
                match self.engine.place(request, self.now) {
                    Decision::Placed(p) => self.on_placed(p)?,
                    Decision::Queued(q) => {
                        prop_assert!(queue);
                        let cap = [40, 60, 100][genre];
                        self.rtt.insert(q.session_id, (regions[0].1, cap));
                        self.queued[tier].push((q.session_id, priority, self.seq, self.now));
                    }
                    Decision::Rejected { .. } => {}
                }
            }
            Op::Release(i) => {
                if let Some(s) = self.pick(i) {
                    self.engine
                        .release(&s, EndReason::Released, self.now)
                        .unwrap();
                    self.forget(&s);
                    // The freed slot may have gone to a queued request: learn that first.
                    self.drain_events()?;
                }
                // Cancel a queued request now and then, too.
                if i % 3 == 0
                    && let Some((s, ..)) = self.queued.iter().flatten().next().copied()
                {
                    self.engine
                        .release(&s, EndReason::Released, self.now)
                        .unwrap();
                    self.forget(&s);
                }
            }
            Op::Advance(secs) => {
                self.now = self.now.saturating_add(Duration::from_secs(secs));
                self.engine.expire(self.now);
            }
            Op::Connect(i) | Op::Reconnect(i) => {
                let Some(s) = self.pick(i) else { return Ok(()) };
                let (p, state) = self.live[&s].clone();
                let next: &[SessionState] = match (op, state) {
                    (Op::Connect(_), SessionState::Reserved) => {
                        &[SessionState::Connecting, SessionState::Active]
                    }
                    (Op::Connect(_), SessionState::Reconnecting) => &[SessionState::Active],
                    (Op::Reconnect(_), SessionState::Active) => &[SessionState::Reconnecting],
                    _ => &[],
                };
                let i = self.node_of(&p.node);
                for &st in next {
                    self.engine
                        .observe_session(&p.node, self.agents[i].generation, &s, st, self.now)
                        .unwrap();
                    if let Some(rs) = self.agents[i].sessions.get_mut(&s) {
                        rs.state = st;
                        rs.since = self.now;
                    }
                    self.live.insert(s, (p.clone(), st));
                }
            }
            Op::Report { node, stale } => {
                let generation = self.agents[node].generation;
                if stale {
                    let before = self.engine.session_count();
                    let out = self
                        .engine
                        .reconcile(&self.hello(node, generation - 1), self.now)
                        .unwrap();
                    prop_assert_eq!(
                        out,
                        ReconcileOutcome::Stale {
                            current: generation
                        }
                    );
                    prop_assert_eq!(self.engine.session_count(), before);
                } else {
                    let out = self
                        .engine
                        .reconcile(&self.hello(node, generation), self.now)
                        .unwrap();
                    prop_assert_eq!(
                        out,
                        ReconcileOutcome::Applied {
                            adopted: 0,
                            ended: 0,
                            refused: 0
                        },
                        "a faithful report changes nothing"
                    );
                }
            }
            Op::Restart(node) => {
                let had = self.agents[node].sessions.len();
                self.agents[node].generation += 1;
                self.agents[node].sessions.clear();
                let out = self
                    .engine
                    .reconcile(&self.hello(node, self.agents[node].generation), self.now)
                    .unwrap();
                prop_assert_eq!(
                    out,
                    ReconcileOutcome::Applied {
                        adopted: 0,
                        ended: had,
                        refused: 0
                    }
                );
            }
            Op::NodeDown(node) => self
                .engine
                .node_down(&NodeId::new(NODES[node].0).unwrap(), self.now)
                .unwrap(),
            Op::Cordon(node) => self
                .engine
                .cordon(&NodeId::new(NODES[node].0).unwrap())
                .unwrap(),
            Op::Uncordon(node) => self
                .engine
                .uncordon(&NodeId::new(NODES[node].0).unwrap(), self.now)
                .unwrap(),
            Op::Drain { node, secs } => {
                // A node that is down cannot drain; the engine says so and changes nothing.
                let _ = self.engine.drain(
                    &NodeId::new(NODES[node].0).unwrap(),
                    self.now.saturating_add(Duration::from_secs(secs)),
                );
            }
            Op::Explain { tier, genre } => {
                let before = (
                    self.engine.session_count(),
                    self.engine.queued(),
                    self.engine.stats(),
                );
                let request = PlaceRequest {
                    session_id: SessionId::new(self.now, u128::MAX),
                    tenant: TenantId::new("t").unwrap(),
                    game: GameId::new("arena").unwrap(),
                    tier: TierName::new(TIERS[tier]).unwrap(),
                    genre: GenreName::new(GENRES[genre]).unwrap(),
                    priority: Priority::Normal,
                    regions: vec![RegionRtt {
                        region: RegionName::new("eu").unwrap(),
                        rtt_ms: 10,
                    }],
                    fallbacks: vec![],
                    queue: true,
                };
                let _ = self.engine.explain(&request);
                prop_assert_eq!(
                    (
                        self.engine.session_count(),
                        self.engine.queued(),
                        self.engine.stats()
                    ),
                    before
                );
            }
        }
        self.drain_events()?;
        if let Err(e) = self.engine.audit() {
            return Err(TestCaseError::fail(format!("after {op:?}: {e}")));
        }
        prop_assert_eq!(self.engine.session_count(), self.live.len());
        for q in &self.queued {
            for &(s, _, _, since) in q {
                prop_assert!(
                    self.now.saturating_since(since) <= QUEUE_TIMEOUT
                        || !matches!(op, Op::Advance(_)),
                    "{s} waited past its timeout"
                );
            }
        }
        Ok(())
    }

    /// A day later every reservation has ended and every queued request is gone.
    fn finish(&mut self) -> Result<(), TestCaseError> {
        self.now = self.now.saturating_add(Duration::from_secs(86_400));
        self.engine.expire(self.now);
        self.drain_events()?;
        for (s, (_, state)) in &self.live {
            prop_assert_ne!(
                *state,
                SessionState::Reserved,
                "{} is still reserved a day later",
                s
            );
            prop_assert_ne!(self.engine.session_state(s), Some(SessionState::Reserved));
        }
        prop_assert_eq!(self.engine.queued(), 0);
        self.engine.audit().map_err(TestCaseError::fail)?;
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn genre_weighted_holds_every_invariant(ops in proptest::collection::vec(op(), 1..80)) {
        let mut h = Harness::new("genre-weighted");
        for op in &ops {
            h.apply(op)?;
        }
        h.finish()?;
    }

    #[test]
    fn every_baseline_holds_every_invariant(ops in proptest::collection::vec(op(), 1..60), which in 0..strategy::NAMES.len()) {
        let mut h = Harness::new(strategy::NAMES[which]);
        for op in &ops {
            h.apply(op)?;
        }
        h.finish()?;
    }
}

#[test]
fn the_gpu_ids_of_the_test_fleet_are_valid() {
    for (node, ..) in NODES {
        GpuId::new(format!("{node}-gpu0")).unwrap();
    }
}
