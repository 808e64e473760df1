//! One scenario per placement rule, on a virtual clock.

// In a test, a failed unwrap is a failed test.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use framecast_broker::placement::strategy::{self, GenreWeighted};
use framecast_broker::placement::{
    Decision, Engine, EngineEvent, Fallback, PlaceRequest, Priority, ReconcileOutcome, RegionRtt,
    RejectReason, simulated,
};
use framecast_shared::genre::{GenreProfile, PlacementStrategy};
use framecast_shared::gpu::{GpuMode, GpuSpec, models};
use framecast_shared::ids::{
    GameId, GenreName, GpuId, NodeId, RegionName, SessionId, TenantId, TierName,
};
use framecast_shared::protocol::{GpuUsage, Heartbeat, Hello, RunningSession, WarmInstance};
use framecast_shared::state::{EndReason, NodeState, SessionState};
use framecast_shared::tier::Codec;
use framecast_shared::units::EncoderUnits;

use common::{T0, at, events, placed, sid};

fn genres() -> Vec<GenreProfile> {
    let mut g = GenreProfile::defaults();
    g.push(GenreProfile {
        name: GenreName::new("sim-heavy").unwrap(),
        load_weight: 4.0,
        rtt_cap_ms: 100,
        strategy: PlacementStrategy::Pack,
        neighbour_penalty: 0.5,
    });
    g
}

fn engine() -> Engine {
    common::engine_with(Box::new(GenreWeighted::default()), genres())
}

fn add_node(e: &mut Engine, node: &str, region: &str, spec: &GpuSpec, mode: GpuMode, gpus: usize) {
    let hello = simulated::hello(node, region, spec, mode, gpus, 1).unwrap();
    assert!(matches!(
        e.reconcile(&hello, T0).unwrap(),
        ReconcileOutcome::Applied { .. }
    ));
}

struct Req {
    seq: u128,
    game: &'static str,
    tier: &'static str,
    genre: &'static str,
    priority: Priority,
    regions: Vec<(&'static str, u32)>,
    fallbacks: Vec<Fallback>,
    queue: bool,
}

impl Req {
    fn new(seq: u128, tier: &'static str, genre: &'static str) -> Self {
        Self {
            seq,
            game: "arena",
            tier,
            genre,
            priority: Priority::Normal,
            regions: vec![("eu", 10)],
            fallbacks: vec![],
            queue: false,
        }
    }
    fn build(&self) -> PlaceRequest {
        PlaceRequest {
            session_id: sid(self.seq),
            tenant: TenantId::new("acme").unwrap(),
            game: GameId::new(self.game).unwrap(),
            tier: TierName::new(self.tier).unwrap(),
            genre: GenreName::new(self.genre).unwrap(),
            priority: self.priority,
            regions: self
                .regions
                .iter()
                .map(|(r, rtt)| RegionRtt {
                    region: RegionName::new(*r).unwrap(),
                    rtt_ms: *rtt,
                })
                .collect(),
            fallbacks: self.fallbacks.clone(),
            queue: self.queue,
        }
    }
}

#[test]
fn fps_sessions_spread_across_gpus() {
    let mut e = engine();
    add_node(&mut e, "n1", "eu", &models::l4(), GpuMode::EqualSize, 4);
    let gpus: Vec<String> = (0..4)
        .map(|i| {
            placed(e.place(Req::new(i, "720p", "fps").build(), T0))
                .gpu
                .to_string()
        })
        .collect();
    let mut distinct = gpus.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), 4, "{gpus:?}");
    e.audit().unwrap();
}

#[test]
fn rpg_sessions_pack_onto_one_gpu() {
    let mut e = engine();
    add_node(&mut e, "n1", "eu", &models::l4(), GpuMode::EqualSize, 4);
    let gpus: Vec<String> = (0..5)
        .map(|i| {
            placed(e.place(Req::new(i, "720p", "rpg").build(), T0))
                .gpu
                .to_string()
        })
        .collect();
    assert!(gpus.iter().all(|g| g == &gpus[0]), "{gpus:?}");
}

#[test]
fn a_warm_instance_is_preferred_over_a_cold_slot() {
    let mut e = engine();
    let mut hello = simulated::hello("n1", "eu", &models::l4(), GpuMode::EqualSize, 3, 1).unwrap();
    hello.gpus[2].profile = Some("L4-2Q".into());
    hello.gpus[2].vgpus = 12;
    hello.warm.push(WarmInstance {
        gpu: GpuId::new("n1-gpu2").unwrap(),
        slot: 5,
        game: GameId::new("arena").unwrap(),
        tier: TierName::new("720p").unwrap(),
    });
    e.reconcile(&hello, T0).unwrap();
    let p = placed(e.place(Req::new(1, "720p", "fps").build(), T0));
    assert_eq!((p.gpu.as_str(), p.slot, p.warm), ("n1-gpu2", 5, true));
    assert!(p.score.warm > 0.0);
    // The warm instance is used up: the next session of that game goes cold.
    let p = placed(e.place(Req::new(2, "720p", "fps").build(), T0));
    assert!(!p.warm);
    e.audit().unwrap();
}

#[test]
fn an_equal_size_gpu_keeps_its_profile_until_it_is_empty() {
    let mut e = engine();
    add_node(&mut e, "n1", "eu", &models::l4(), GpuMode::EqualSize, 1);
    let first = placed(e.place(Req::new(1, "720p", "rpg").build(), T0));
    assert!(
        first.reprofile,
        "an unprofiled GPU takes the tier's profile"
    );
    assert_eq!(
        e.place(Req::new(2, "1080p", "rpg").build(), T0),
        Decision::Rejected {
            reason: RejectReason::NoCapacity
        }
    );
    e.release(&first.session_id, EndReason::Released, at(1))
        .unwrap();
    let p = placed(e.place(Req::new(3, "1080p", "rpg").build(), at(1)));
    assert!(p.reprofile, "empty again, the GPU may take the 4Q profile");
    e.audit().unwrap();
}

#[test]
fn an_equal_size_gpu_holds_no_more_than_its_profile_allows() {
    let mut e = engine();
    add_node(&mut e, "n1", "eu", &models::l4(), GpuMode::EqualSize, 1);
    for i in 0..3 {
        placed(e.place(Req::new(i, "4k", "rpg").build(), T0));
    }
    assert_eq!(
        e.place(Req::new(9, "4k", "rpg").build(), T0),
        Decision::Rejected {
            reason: RejectReason::NoCapacity
        }
    );
}

#[test]
fn an_exclusive_mode_gpu_holds_one_session() {
    let mut e = engine();
    add_node(
        &mut e,
        "n1",
        "eu",
        &models::rtx_4090(),
        GpuMode::Exclusive,
        1,
    );
    placed(e.place(Req::new(1, "1080p", "fps").build(), T0));
    assert_eq!(
        e.place(Req::new(2, "720p", "fps").build(), T0),
        Decision::Rejected {
            reason: RejectReason::NoCapacity
        }
    );
}

#[test]
fn gpus_without_nvenc_are_never_streamed_from() {
    let mut e = engine();
    add_node(
        &mut e,
        "n1",
        "eu",
        &models::h100_80gb("NVIDIA H100 PCIe"),
        GpuMode::Mig,
        8,
    );
    add_node(
        &mut e,
        "n2",
        "eu",
        &models::a100_40gb(),
        GpuMode::Exclusive,
        8,
    );
    for (i, tier) in ["720p", "1080p", "4k"].iter().enumerate() {
        assert_eq!(
            e.place(Req::new(i as u128, tier, "rpg").build(), T0),
            Decision::Rejected {
                reason: RejectReason::NoCapacity
            }
        );
    }
}

/// A MIG GPU that can encode (as the RTX PRO 6000 Blackwell can): sessions get instance shapes
/// until the GPU's compute slices run out.
#[test]
fn a_mig_gpu_with_an_encoder_fills_its_instance_shapes() {
    let mut spec = models::h100_80gb("Test MIG GPU with NVENC");
    spec.nvenc_engines = 4;
    spec.encode_codecs = vec![Codec::H264];
    spec.encoder_capacity = EncoderUnits::from_milli(24_000);
    let mut e = engine();
    add_node(&mut e, "n1", "eu", &spec, GpuMode::Mig, 1);
    // 720p (2 GB) takes the 1g.10gb shape: 7 fit (7 slices).
    for i in 0..7 {
        placed(e.place(Req::new(i, "720p", "rpg").build(), T0));
    }
    assert_eq!(
        e.place(Req::new(99, "720p", "rpg").build(), T0),
        Decision::Rejected {
            reason: RejectReason::NoCapacity
        }
    );
    e.audit().unwrap();
}

#[test]
fn a_mixed_size_gpu_hosts_tiers_side_by_side_within_its_limits() {
    let mut e = engine();
    add_node(&mut e, "n1", "eu", &models::l4(), GpuMode::MixedSize, 1);
    // 2 × 8Q (16 GB) + 4 × 2Q (8 GB) = 24 GB.
    for i in 0..2 {
        placed(e.place(Req::new(i, "4k", "rpg").build(), T0));
    }
    for i in 2..6 {
        placed(e.place(Req::new(i, "720p", "rpg").build(), T0));
    }
    assert_eq!(
        e.place(Req::new(9, "720p", "rpg").build(), T0),
        Decision::Rejected {
            reason: RejectReason::NoCapacity
        }
    );
    e.audit().unwrap();
}

#[test]
fn encoder_capacity_limits_4k_on_an_a10() {
    let mut e = engine();
    add_node(&mut e, "n1", "eu", &models::a10(), GpuMode::EqualSize, 2);
    let a = placed(e.place(Req::new(1, "4k", "rpg").build(), T0));
    let b = placed(e.place(Req::new(2, "4k", "rpg").build(), T0));
    assert_ne!(a.gpu, b.gpu, "one NVENC engine holds one 4K stream");
    assert_eq!(
        e.place(Req::new(3, "4k", "rpg").build(), T0),
        Decision::Rejected {
            reason: RejectReason::NoCapacity
        }
    );
}

#[test]
fn a_driver_session_cap_limits_streams() {
    let mut spec = models::l4();
    spec.model = "Test L4 with a session cap".into();
    spec.encoder_session_cap = Some(2);
    let mut e = engine();
    add_node(&mut e, "n1", "eu", &spec, GpuMode::EqualSize, 1);
    placed(e.place(Req::new(1, "720p", "rpg").build(), T0));
    placed(e.place(Req::new(2, "720p", "rpg").build(), T0));
    assert_eq!(
        e.place(Req::new(3, "720p", "rpg").build(), T0),
        Decision::Rejected {
            reason: RejectReason::NoCapacity
        }
    );
}

#[test]
fn compute_share_is_a_hard_limit_on_equal_size_gpus() {
    let mut e = engine();
    add_node(&mut e, "n1", "eu", &models::l4(), GpuMode::EqualSize, 1);
    // A 720p session of a genre with load weight 4 needs 4/16: four fit, not twelve.
    for i in 0..4 {
        placed(e.place(Req::new(i, "720p", "sim-heavy").build(), T0));
    }
    assert_eq!(
        e.place(Req::new(9, "720p", "sim-heavy").build(), T0),
        Decision::Rejected {
            reason: RejectReason::NoCapacity
        }
    );
}

#[test]
fn compute_share_is_soft_on_mixed_size_gpus() {
    let mut e = engine();
    add_node(&mut e, "n1", "eu", &models::l4(), GpuMode::MixedSize, 1);
    // Eight 720p sessions at 4/16 each oversubscribe compute 2×, which mixed-size allows
    // at a cost in the score.
    let mut last = None;
    for i in 0..8 {
        last = Some(placed(
            e.place(Req::new(i, "720p", "sim-heavy").build(), T0),
        ));
    }
    assert!(last.unwrap().score.overcommit < 0.0);
    e.audit().unwrap();
}

#[test]
fn the_rtt_cap_keeps_far_players_out_and_relaxes_while_they_wait() {
    let mut e = engine();
    add_node(&mut e, "n1", "eu", &models::l4(), GpuMode::EqualSize, 1);
    let mut far = Req::new(1, "720p", "fps");
    far.regions = vec![("eu", 70)];
    assert_eq!(
        e.place(far.build(), T0),
        Decision::Rejected {
            reason: RejectReason::RttTooHigh
        }
    );
    far.queue = true;
    assert!(matches!(e.place(far.build(), T0), Decision::Queued(_)));
    // fps caps RTT at 40 ms; after 60 s of waiting the cap has doubled to 80 ms.
    e.expire(at(30));
    assert!(events(&mut e).is_empty());
    e.expire(at(60));
    assert!(
        matches!(events(&mut e).as_slice(), [EngineEvent::Placed(p)] if p.session_id == sid(1))
    );
}

#[test]
fn the_next_region_is_tried_only_when_allowed() {
    let mut e = engine();
    add_node(
        &mut e,
        "n1",
        "eu",
        &models::rtx_4090(),
        GpuMode::Exclusive,
        1,
    );
    add_node(
        &mut e,
        "n2",
        "us",
        &models::rtx_4090(),
        GpuMode::Exclusive,
        1,
    );
    placed(e.place(Req::new(1, "720p", "moba").build(), T0));
    let mut r = Req::new(2, "720p", "moba");
    r.regions = vec![("eu", 10), ("us", 50)];
    assert_eq!(
        e.place(r.build(), T0),
        Decision::Rejected {
            reason: RejectReason::NoCapacity
        }
    );
    r.fallbacks = vec![Fallback::NextRegion];
    assert_eq!(placed(e.place(r.build(), T0)).region.as_str(), "us");
}

#[test]
fn a_tier_up_fallback_takes_a_larger_slot() {
    let mut e = engine();
    add_node(&mut e, "n1", "eu", &models::l4(), GpuMode::EqualSize, 2);
    // GPU 0 becomes 2Q and fills with twelve 720p sessions; GPU 1 becomes 4Q with one 1080p.
    for i in 0..12 {
        placed(e.place(Req::new(i, "720p", "rpg").build(), T0));
    }
    placed(e.place(Req::new(50, "1080p", "rpg").build(), T0));
    let mut r = Req::new(99, "720p", "rpg");
    assert_eq!(
        e.place(r.build(), T0),
        Decision::Rejected {
            reason: RejectReason::NoCapacity
        }
    );
    r.fallbacks = vec![Fallback::TierUp];
    assert_eq!(placed(e.place(r.build(), T0)).tier.as_str(), "1080p");
    e.audit().unwrap();
}

#[test]
fn a_reservation_expires_after_its_ttl() {
    let mut e = engine();
    add_node(
        &mut e,
        "n1",
        "eu",
        &models::rtx_4090(),
        GpuMode::Exclusive,
        1,
    );
    let p = placed(e.place(Req::new(1, "720p", "fps").build(), T0));
    assert_eq!(p.expires_at, at(60));
    e.expire(at(59));
    assert!(events(&mut e).is_empty());
    e.expire(at(60));
    assert_eq!(
        events(&mut e),
        [EngineEvent::Ended {
            session_id: sid(1),
            node: Some(NodeId::new("n1").unwrap()),
            reason: EndReason::Expired
        }]
    );
    placed(e.place(Req::new(2, "720p", "fps").build(), at(60)));
}

#[test]
fn a_connected_session_does_not_expire() {
    let mut e = engine();
    add_node(
        &mut e,
        "n1",
        "eu",
        &models::rtx_4090(),
        GpuMode::Exclusive,
        1,
    );
    let n1 = NodeId::new("n1").unwrap();
    placed(e.place(Req::new(1, "720p", "fps").build(), T0));
    e.observe_session(&n1, 1, &sid(1), SessionState::Connecting, at(5))
        .unwrap();
    e.observe_session(&n1, 1, &sid(1), SessionState::Active, at(6))
        .unwrap();
    e.expire(at(3600));
    assert!(events(&mut e).is_empty());
    assert_eq!(e.session_state(&sid(1)), Some(SessionState::Active));
    // The lifecycle refuses to go back.
    assert!(
        e.observe_session(&n1, 1, &sid(1), SessionState::Reserved, at(7))
            .is_err()
    );
}

#[test]
fn a_reconnecting_session_ends_after_the_grace_period() {
    let mut e = engine();
    add_node(
        &mut e,
        "n1",
        "eu",
        &models::rtx_4090(),
        GpuMode::Exclusive,
        1,
    );
    let n1 = NodeId::new("n1").unwrap();
    placed(e.place(Req::new(1, "720p", "fps").build(), T0));
    for s in [
        SessionState::Connecting,
        SessionState::Active,
        SessionState::Reconnecting,
    ] {
        e.observe_session(&n1, 1, &sid(1), s, at(10)).unwrap();
    }
    // The default grace is 120 s from the report at 10 s.
    e.expire(at(129));
    assert!(events(&mut e).is_empty());
    e.expire(at(130));
    assert!(matches!(
        events(&mut e).as_slice(),
        [EngineEvent::Ended {
            reason: EndReason::Error,
            ..
        }]
    ));
}

#[test]
fn freed_capacity_serves_the_queue_before_new_arrivals() {
    let mut e = engine();
    add_node(
        &mut e,
        "n1",
        "eu",
        &models::rtx_4090(),
        GpuMode::Exclusive,
        1,
    );
    placed(e.place(Req::new(1, "720p", "fps").build(), T0));
    let mut waiting = Req::new(2, "720p", "fps");
    waiting.queue = true;
    assert!(matches!(e.place(waiting.build(), T0), Decision::Queued(q) if q.position == 0));
    e.release(&sid(1), EndReason::Released, at(5)).unwrap();
    assert!(
        matches!(events(&mut e).as_slice(), [EngineEvent::Placed(p)] if p.session_id == sid(2))
    );
    let mut late = Req::new(3, "720p", "fps");
    late.queue = true;
    assert!(matches!(e.place(late.build(), at(5)), Decision::Queued(_)));
}

#[test]
fn queue_order_is_priority_then_arrival() {
    let mut e = engine();
    add_node(
        &mut e,
        "n1",
        "eu",
        &models::rtx_4090(),
        GpuMode::Exclusive,
        1,
    );
    placed(e.place(Req::new(100, "720p", "fps").build(), T0));
    let order = [
        (1, Priority::Low),
        (2, Priority::Normal),
        (3, Priority::High),
        (4, Priority::Normal),
    ];
    let mut positions = Vec::new();
    for (seq, priority) in order {
        let mut r = Req::new(seq, "720p", "fps");
        r.priority = priority;
        r.queue = true;
        let Decision::Queued(q) = e.place(r.build(), T0) else {
            panic!()
        };
        positions.push(q.position);
    }
    assert_eq!(
        positions,
        [0, 0, 0, 2],
        "each position counts the requests ahead at arrival"
    );
    assert_eq!(
        [1, 2, 3, 4].map(|s| e.queue_position(&sid(s)).unwrap()),
        [3, 1, 0, 2]
    );
    let mut served = Vec::new();
    let mut holder = sid(100);
    for t in 1..=4 {
        e.release(&holder, EndReason::Released, at(t)).unwrap();
        let Some(EngineEvent::Placed(p)) = e.poll_event() else {
            panic!("nothing placed")
        };
        holder = p.session_id;
        served.push(p.session_id);
    }
    assert_eq!(served, [sid(3), sid(2), sid(4), sid(1)]);
}

#[test]
fn a_queued_request_times_out_and_its_eta_follows_the_release_rate() {
    let mut e = engine();
    add_node(
        &mut e,
        "n1",
        "eu",
        &models::rtx_4090(),
        GpuMode::Exclusive,
        1,
    );
    // Two releases 10 s apart teach the engine the tier's release rate.
    for (seq, t) in [(1, 0), (2, 10)] {
        placed(e.place(Req::new(seq, "720p", "fps").build(), at(t)));
        e.release(&sid(seq), EndReason::Released, at(t + 10))
            .unwrap();
    }
    placed(e.place(Req::new(3, "720p", "fps").build(), at(20)));
    let n1 = NodeId::new("n1").unwrap();
    e.observe_session(&n1, 1, &sid(3), SessionState::Connecting, at(21))
        .unwrap();
    let mut w = Req::new(4, "720p", "fps");
    w.queue = true;
    let Decision::Queued(q) = e.place(w.build(), at(20)) else {
        panic!()
    };
    assert_eq!((q.position, q.eta_seconds), (0, Some(10)));
    e.expire(at(20 + 119));
    assert!(
        events(&mut e).iter().all(
            |ev| !matches!(ev, EngineEvent::Ended { session_id, .. } if *session_id == sid(4))
        )
    );
    e.expire(at(20 + 120));
    let ended = events(&mut e);
    assert!(
        ended.contains(&EngineEvent::Ended {
            session_id: sid(4),
            node: None,
            reason: EndReason::Expired
        }),
        "{ended:?}"
    );
    assert_eq!(e.session_state(&sid(4)), None);
}

#[test]
fn a_cordoned_node_takes_no_sessions_until_uncordoned() {
    let mut e = engine();
    add_node(&mut e, "n1", "eu", &models::l4(), GpuMode::EqualSize, 1);
    let n1 = NodeId::new("n1").unwrap();
    placed(e.place(Req::new(1, "720p", "rpg").build(), T0));
    e.cordon(&n1).unwrap();
    assert_eq!(
        e.place(Req::new(2, "720p", "rpg").build(), T0),
        Decision::Rejected {
            reason: RejectReason::NoCapacity
        }
    );
    assert_eq!(
        e.session_state(&sid(1)),
        Some(SessionState::Reserved),
        "running sessions go on"
    );
    e.uncordon(&n1, T0).unwrap();
    placed(e.place(Req::new(2, "720p", "rpg").build(), T0));
}

#[test]
fn a_draining_node_ends_its_sessions_at_the_deadline() {
    let mut e = engine();
    add_node(&mut e, "n1", "eu", &models::l4(), GpuMode::EqualSize, 1);
    let n1 = NodeId::new("n1").unwrap();
    placed(e.place(Req::new(1, "720p", "rpg").build(), T0));
    e.drain(&n1, at(30)).unwrap();
    assert_eq!(
        e.place(Req::new(2, "720p", "rpg").build(), T0),
        Decision::Rejected {
            reason: RejectReason::NoCapacity
        }
    );
    e.expire(at(29));
    assert!(events(&mut e).is_empty());
    e.expire(at(30));
    assert_eq!(
        events(&mut e),
        [EngineEvent::Ended {
            session_id: sid(1),
            node: Some(n1.clone()),
            reason: EndReason::Drained
        }]
    );
    assert_eq!(e.fleet().node(0).unwrap().state, NodeState::Cordoned);
}

#[test]
fn a_node_that_goes_down_loses_its_sessions_after_the_grace_period() {
    let mut e = engine();
    add_node(&mut e, "n1", "eu", &models::l4(), GpuMode::EqualSize, 1);
    add_node(&mut e, "n2", "eu", &models::l4(), GpuMode::EqualSize, 1);
    let n1 = NodeId::new("n1").unwrap();
    let p = placed(e.place(Req::new(1, "720p", "rpg").build(), T0));
    assert_eq!(p.node, n1);
    e.node_down(&n1, at(1)).unwrap();
    assert_eq!(
        placed(e.place(Req::new(2, "720p", "rpg").build(), at(1)))
            .node
            .as_str(),
        "n2"
    );
    e.expire(at(30));
    assert!(events(&mut e).is_empty());
    e.expire(at(31));
    assert_eq!(
        events(&mut e),
        [EngineEvent::Ended {
            session_id: sid(1),
            node: Some(n1),
            reason: EndReason::NodeLost
        }]
    );
    e.audit().unwrap();
}

fn report_with_session(generation: u64, session: SessionId, state: SessionState) -> Hello {
    let mut hello =
        simulated::hello("n1", "eu", &models::l4(), GpuMode::EqualSize, 1, generation).unwrap();
    hello.gpus[0].profile = Some("L4-2Q".into());
    hello.gpus[0].vgpus = 1;
    hello.sessions.push(RunningSession {
        session_id: session,
        gpu: GpuId::new("n1-gpu0").unwrap(),
        slot: 0,
        game: GameId::new("arena").unwrap(),
        tier: TierName::new("720p").unwrap(),
        genre: Some(GenreName::new("fps").unwrap()),
        state,
        since: T0,
    });
    hello
}

#[test]
fn a_node_that_reports_back_in_time_keeps_its_sessions() {
    let mut e = engine();
    add_node(&mut e, "n1", "eu", &models::l4(), GpuMode::EqualSize, 1);
    let n1 = NodeId::new("n1").unwrap();
    placed(e.place(Req::new(1, "720p", "fps").build(), T0));
    e.node_down(&n1, at(1)).unwrap();
    let out = e
        .reconcile(
            &report_with_session(1, sid(1), SessionState::Active),
            at(10),
        )
        .unwrap();
    assert_eq!(
        out,
        ReconcileOutcome::Applied {
            adopted: 0,
            ended: 0,
            refused: 0
        }
    );
    e.expire(at(100));
    assert_eq!(events(&mut e), []);
    assert_eq!(e.session_state(&sid(1)), Some(SessionState::Active));
    assert_eq!(e.fleet().node(0).unwrap().state, NodeState::Ready);
}

#[test]
fn a_stale_generation_is_ignored() {
    let mut e = engine();
    e.reconcile(&report_with_session(5, sid(1), SessionState::Active), T0)
        .unwrap();
    let stale = simulated::hello("n1", "eu", &models::l4(), GpuMode::EqualSize, 1, 4).unwrap();
    assert_eq!(
        e.reconcile(&stale, at(1)).unwrap(),
        ReconcileOutcome::Stale { current: 5 }
    );
    assert_eq!(
        e.session_state(&sid(1)),
        Some(SessionState::Active),
        "the stale report dropped nothing"
    );
    // Updates from the old generation are ignored too.
    e.observe_session(
        &NodeId::new("n1").unwrap(),
        4,
        &sid(1),
        SessionState::Ended(EndReason::Error),
        at(2),
    )
    .unwrap();
    assert_eq!(e.session_state(&sid(1)), Some(SessionState::Active));
}

#[test]
fn a_restarted_broker_adopts_the_sessions_agents_report() {
    let mut e = engine();
    let out = e
        .reconcile(&report_with_session(1, sid(7), SessionState::Active), T0)
        .unwrap();
    assert_eq!(
        out,
        ReconcileOutcome::Applied {
            adopted: 1,
            ended: 0,
            refused: 0
        }
    );
    assert_eq!(e.session_state(&sid(7)), Some(SessionState::Active));
    e.audit().unwrap();
    // The adopted session counts: the GPU holds 2Q and has 11 slots left.
    for i in 100..111 {
        placed(e.place(Req::new(i, "720p", "rpg").build(), T0));
    }
    assert_eq!(
        e.place(Req::new(99, "720p", "rpg").build(), T0),
        Decision::Rejected {
            reason: RejectReason::NoCapacity
        }
    );
}

#[test]
fn a_reservation_the_agent_has_not_seen_survives_a_short_while() {
    let mut e = engine();
    add_node(&mut e, "n1", "eu", &models::l4(), GpuMode::EqualSize, 1);
    placed(e.place(Req::new(1, "720p", "rpg").build(), T0));
    let empty = simulated::hello("n1", "eu", &models::l4(), GpuMode::EqualSize, 1, 1).unwrap();
    assert_eq!(
        e.reconcile(&empty, at(5)).unwrap(),
        ReconcileOutcome::Applied {
            adopted: 0,
            ended: 0,
            refused: 0
        }
    );
    assert_eq!(
        e.reconcile(&empty, at(10)).unwrap(),
        ReconcileOutcome::Applied {
            adopted: 0,
            ended: 1,
            refused: 0
        }
    );
    assert!(matches!(
        events(&mut e).as_slice(),
        [EngineEvent::Ended {
            reason: EndReason::Error,
            ..
        }]
    ));
    // An agent that restarted (new generation) lost it at once.
    placed(e.place(Req::new(2, "720p", "rpg").build(), at(10)));
    let restarted = simulated::hello("n1", "eu", &models::l4(), GpuMode::EqualSize, 1, 2).unwrap();
    assert_eq!(
        e.reconcile(&restarted, at(11)).unwrap(),
        ReconcileOutcome::Applied {
            adopted: 0,
            ended: 1,
            refused: 0
        }
    );
    e.audit().unwrap();
}

#[test]
fn explain_lists_the_candidates_and_the_terms_of_each_score() {
    let mut e = engine();
    add_node(&mut e, "n1", "eu", &models::l4(), GpuMode::EqualSize, 2);
    add_node(&mut e, "n2", "eu", &models::a100_40gb(), GpuMode::Mig, 1);
    placed(e.place(Req::new(1, "720p", "rpg").build(), T0));
    let why = e.explain(&Req::new(2, "720p", "rpg").build());
    assert_eq!(why.strategy, "genre-weighted");
    assert_eq!(why.attempts.len(), 1);
    let cands = &why.attempts[0].candidates;
    assert!(cands.len() >= 2, "{cands:?}");
    assert!(cands.iter().all(|c| c.score.is_some()));
    let Decision::Placed(p) = &why.decision else {
        panic!("{:?}", why.decision)
    };
    let best = cands
        .iter()
        .filter_map(|c| c.score)
        .map(|s| s.total)
        .fold(f64::MIN, f64::max);
    assert_eq!(p.score.total, best);
    assert_eq!(p.gpu.as_str(), "n1-gpu0", "rpg packs onto the GPU in use");
    // Explaining changed nothing.
    assert_eq!(e.session_count(), 1);
    e.audit().unwrap();
}

#[test]
fn the_exclusive_baseline_gives_each_player_a_whole_gpu() {
    let mut e = common::engine_with(strategy::by_name("exclusive", 0).unwrap(), genres());
    add_node(&mut e, "n1", "eu", &models::l4(), GpuMode::EqualSize, 2);
    let a = placed(e.place(Req::new(1, "720p", "rpg").build(), T0));
    let b = placed(e.place(Req::new(2, "720p", "rpg").build(), T0));
    assert_ne!(a.gpu, b.gpu);
    assert_eq!(
        e.place(Req::new(3, "720p", "rpg").build(), T0),
        Decision::Rejected {
            reason: RejectReason::NoCapacity
        }
    );
    assert_eq!(e.stats().fb_used_mb, 2 * 24_576);
    e.audit().unwrap();
}

#[test]
fn every_baseline_places_and_releases_consistently() {
    for name in strategy::NAMES {
        let mut e = common::engine_with(strategy::by_name(name, 7).unwrap(), genres());
        add_node(&mut e, "n1", "eu", &models::l4(), GpuMode::EqualSize, 3);
        let mut placed_count = 0;
        for i in 0..40 {
            let tier = ["720p", "1080p", "4k"][i % 3];
            if let Decision::Placed(_) = e.place(Req::new(i as u128, tier, "moba").build(), T0) {
                placed_count += 1;
            }
            e.audit().unwrap_or_else(|err| panic!("{name}: {err}"));
        }
        assert!(placed_count >= 3, "{name} placed {placed_count}");
        for i in 0..40 {
            let _ = e.release(&sid(i), EndReason::Released, at(1));
        }
        assert_eq!(e.session_count(), 0, "{name}");
        e.audit().unwrap();
    }
}

#[test]
fn bad_requests_are_rejected_with_a_reason() {
    let mut e = engine();
    add_node(&mut e, "n1", "eu", &models::l4(), GpuMode::EqualSize, 1);
    assert_eq!(
        e.place(Req::new(1, "8k", "fps").build(), T0),
        Decision::Rejected {
            reason: RejectReason::UnknownTier
        }
    );
    assert_eq!(
        e.place(Req::new(1, "720p", "racing").build(), T0),
        Decision::Rejected {
            reason: RejectReason::UnknownGenre
        }
    );
    let mut r = Req::new(1, "720p", "fps");
    r.regions = vec![("mars", 10)];
    assert_eq!(
        e.place(r.build(), T0),
        Decision::Rejected {
            reason: RejectReason::NoRegion
        }
    );
    placed(e.place(Req::new(1, "720p", "fps").build(), T0));
    assert_eq!(
        e.place(Req::new(1, "720p", "fps").build(), T0),
        Decision::Rejected {
            reason: RejectReason::DuplicateSession
        }
    );
    assert!(e.release(&sid(42), EndReason::Released, T0).is_err());
}

/// A report of `gpus` L4s (2Q profile where occupied) running `sessions` fps 720p sessions,
/// given as (GPU index, count).
fn fps_fleet(gpus: usize, sessions: &[(usize, u32)]) -> Hello {
    let mut hello =
        simulated::hello("n1", "eu", &models::l4(), GpuMode::EqualSize, gpus, 1).unwrap();
    let mut seq = 1000;
    for &(gpu, count) in sessions {
        hello.gpus[gpu].profile = Some("L4-2Q".into());
        hello.gpus[gpu].vgpus = 12;
        for slot in 0..count {
            seq += 1;
            hello.sessions.push(RunningSession {
                session_id: sid(seq),
                gpu: GpuId::new(format!("n1-gpu{gpu}")).unwrap(),
                slot,
                game: GameId::new("arena").unwrap(),
                tier: TierName::new("720p").unwrap(),
                genre: Some(GenreName::new("fps").unwrap()),
                state: SessionState::Active,
                since: T0,
            });
        }
    }
    hello
}

#[test]
fn fps_spreads_while_empty_gpus_are_plentiful_and_packs_when_they_run_out() {
    // Two GPUs, none empty: the nearly empty one is left to drain so it can change profile.
    let mut e = engine();
    e.reconcile(&fps_fleet(2, &[(0, 6), (1, 1)]), T0).unwrap();
    let p = placed(e.place(Req::new(1, "720p", "fps").build(), T0));
    assert_eq!(p.gpu.as_str(), "n1-gpu0", "{:?}", p.score);
    assert!(
        p.score.drain
            > e.explain(&Req::new(2, "720p", "fps").build()).attempts[0]
                .candidates
                .iter()
                .filter_map(|c| c.score)
                .map(|s| s.drain)
                .fold(0.0, f64::min)
    );

    // The same, with eight empty GPUs beside them: fps spreads away from its neighbours.
    let mut e = engine();
    e.reconcile(&fps_fleet(10, &[(0, 6), (1, 1)]), T0).unwrap();
    let p = placed(e.place(Req::new(1, "720p", "fps").build(), T0));
    assert_ne!(p.gpu.as_str(), "n1-gpu0", "{:?}", p.score);
    assert_eq!(p.score.drain, 0.0);
}

#[test]
fn warm_instances_follow_the_heartbeats() {
    let mut e = engine();
    add_node(&mut e, "n1", "eu", &models::l4(), GpuMode::EqualSize, 2);
    let warm = |slot| WarmInstance {
        gpu: GpuId::new("n1-gpu1").unwrap(),
        slot,
        game: GameId::new("arena").unwrap(),
        tier: TierName::new("720p").unwrap(),
    };
    let heartbeat = |generation, warm: Option<Vec<WarmInstance>>| Heartbeat {
        generation,
        seq: 1,
        sent_at: T0,
        gpus: vec![GpuUsage {
            gpu: GpuId::new("n1-gpu1").unwrap(),
            free_framebuffer: framecast_shared::units::Megabytes::new(24_576),
            free_encoder: EncoderUnits::ONE,
            encoder_utilization_pct: None,
            gpu_utilization_pct: None,
            vgpus: Some(12),
            profile: Some("L4-2Q".into()),
        }],
        warm,
        plan_generation: None,
        inputs: Vec::new(),
    };
    let node = NodeId::new("n1").unwrap();
    e.observe_heartbeat(&node, &heartbeat(1, Some(vec![warm(3)])), T0)
        .unwrap();
    let p = placed(e.place(Req::new(1, "720p", "fps").build(), T0));
    assert_eq!((p.gpu.as_str(), p.slot, p.warm), ("n1-gpu1", 3, true));
    // A heartbeat of an older generation changes nothing; one without a warm list neither.
    e.observe_heartbeat(&node, &heartbeat(0, Some(vec![warm(4)])), T0)
        .unwrap();
    e.observe_heartbeat(&node, &heartbeat(1, None), T0).unwrap();
    assert!(!placed(e.place(Req::new(2, "720p", "fps").build(), T0)).warm);
    e.audit().unwrap();
}

#[test]
fn a_suspect_node_takes_no_new_sessions_until_it_is_heard_again() {
    let mut e = engine();
    add_node(&mut e, "n1", "eu", &models::l4(), GpuMode::EqualSize, 1);
    let node = NodeId::new("n1").unwrap();
    e.cordon(&node).unwrap();
    e.set_suspect(&node, true, T0).unwrap();
    e.uncordon(&node, T0).unwrap();
    assert_eq!(
        e.place(Req::new(1, "720p", "rpg").build(), T0),
        Decision::Rejected {
            reason: RejectReason::NoCapacity
        },
        "suspect, though the operator's cordon is lifted"
    );
    let mut waiting = Req::new(2, "720p", "rpg");
    waiting.queue = true;
    assert!(matches!(e.place(waiting.build(), T0), Decision::Queued(_)));
    e.set_suspect(&node, false, at(1)).unwrap();
    assert!(
        matches!(events(&mut e).as_slice(), [EngineEvent::Placed(p)] if p.session_id == sid(2)),
        "on time again, the queue is served"
    );
    e.audit().unwrap();
}
