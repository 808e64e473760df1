//! Agent reports that are odd, late or contradictory, and the edges of warm instances, MIG
//! shapes, queues and fallbacks: the engine keeps its accounting true whatever it is told.

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
use framecast_shared::genre::GenreProfile;
use framecast_shared::gpu::{GpuMode, GpuSpec, models};
use framecast_shared::ids::{GameId, GenreName, GpuId, NodeId, RegionName, TenantId, TierName};
use framecast_shared::protocol::{Hello, RunningSession, WarmInstance};
use framecast_shared::state::{EndReason, NodeState, SessionState};
use framecast_shared::tier::Codec;
use framecast_shared::units::EncoderUnits;

use common::{T0, at, engine_with, placed, sid};

fn engine() -> Engine {
    engine_with(Box::new(GenreWeighted::default()), GenreProfile::defaults())
}

fn first_fit() -> Engine {
    engine_with(Box::new(strategy::FirstFit), GenreProfile::defaults())
}

fn req(n: u128, tier: &str, genre: &str, rtt: u32, queue: bool) -> PlaceRequest {
    PlaceRequest {
        session_id: sid(n),
        tenant: TenantId::new("acme").unwrap(),
        game: GameId::new("arena").unwrap(),
        tier: TierName::new(tier).unwrap(),
        genre: GenreName::new(genre).unwrap(),
        priority: Priority::Normal,
        regions: vec![RegionRtt {
            region: RegionName::new("eu").unwrap(),
            rtt_ms: rtt,
        }],
        fallbacks: vec![],
        queue,
    }
}

fn running(n: u128, gpu: &str, slot: u32, tier: &str, state: SessionState) -> RunningSession {
    RunningSession {
        session_id: sid(n),
        gpu: GpuId::new(gpu).unwrap(),
        slot,
        game: GameId::new("arena").unwrap(),
        tier: TierName::new(tier).unwrap(),
        genre: Some(GenreName::new("moba").unwrap()),
        state,
        since: T0,
    }
}

fn warm(gpu: &str, slot: u32, game: &str, tier: &str) -> WarmInstance {
    WarmInstance {
        gpu: GpuId::new(gpu).unwrap(),
        slot,
        game: GameId::new(game).unwrap(),
        tier: TierName::new(tier).unwrap(),
    }
}

fn hello(spec: &GpuSpec, mode: GpuMode, gpus: usize, generation: u64) -> Hello {
    simulated::hello("n1", "eu", spec, mode, gpus, generation).unwrap()
}

fn applied(out: ReconcileOutcome) -> (usize, usize, usize) {
    match out {
        ReconcileOutcome::Applied {
            adopted,
            ended,
            refused,
        } => (adopted, ended, refused),
        other => panic!("{other:?}"),
    }
}

fn mig_with_nvenc(mut spec: GpuSpec) -> GpuSpec {
    spec.model = format!("{} with NVENC", spec.model);
    spec.nvenc_engines = 4;
    spec.encode_codecs = vec![Codec::H264];
    spec.encoder_capacity = EncoderUnits::from_milli(100_000);
    spec
}

#[test]
fn a_reported_slot_beyond_the_gpu_is_refused() {
    let mut e = engine();
    let mut h = hello(&models::l4(), GpuMode::EqualSize, 1, 1);
    h.sessions
        .push(running(1, "n1-gpu0", 500, "720p", SessionState::Active));
    assert_eq!(applied(e.reconcile(&h, T0).unwrap()), (0, 0, 1));
    e.audit().unwrap();
}

#[test]
fn a_report_with_two_profiles_on_an_equal_size_gpu_is_refused_in_part() {
    let mut e = engine();
    let mut h = hello(&models::l4(), GpuMode::EqualSize, 1, 1);
    h.sessions
        .push(running(1, "n1-gpu0", 0, "4k", SessionState::Active));
    h.sessions
        .push(running(2, "n1-gpu0", 1, "720p", SessionState::Active));
    assert_eq!(applied(e.reconcile(&h, T0).unwrap()), (1, 0, 1));
    for i in 100..120 {
        let _ = e.place(req(i, "720p", "rpg", 10, false), T0);
        e.audit().unwrap();
    }
}

#[test]
fn a_session_reported_in_a_warm_slot_of_another_tier_takes_its_own_framebuffer() {
    let mut e = engine();
    let mut h = hello(&models::l4(), GpuMode::MixedSize, 1, 1);
    h.warm.push(warm("n1-gpu0", 0, "arena", "720p"));
    e.reconcile(&h, T0).unwrap();
    assert_eq!(e.fleet().gpu(0).unwrap().used.fb_mb, 2048);
    let mut h = hello(&models::l4(), GpuMode::MixedSize, 1, 1);
    h.sessions
        .push(running(1, "n1-gpu0", 0, "4k", SessionState::Active));
    e.reconcile(&h, at(1)).unwrap();
    assert_eq!(e.fleet().gpu(0).unwrap().used.fb_mb, 8192);
    e.audit().unwrap();
    e.release(&sid(1), EndReason::Released, at(2)).unwrap();
    assert_eq!(e.fleet().gpu(0).unwrap().used.fb_mb, 0);
    e.audit().unwrap();
}

#[test]
fn a_session_the_agent_reports_ended_is_ended() {
    let mut e = engine();
    e.reconcile(&hello(&models::l4(), GpuMode::EqualSize, 1, 1), T0)
        .unwrap();
    let p = placed(e.place(req(1, "720p", "moba", 10, false), T0));
    let mut h = hello(&models::l4(), GpuMode::EqualSize, 1, 1);
    h.sessions.push(running(
        1,
        "n1-gpu0",
        p.slot,
        "720p",
        SessionState::Ended(EndReason::Released),
    ));
    e.reconcile(&h, at(1)).unwrap();
    assert_eq!(e.session_state(&sid(1)), None);
    assert_eq!(
        e.poll_event(),
        Some(EngineEvent::Ended {
            session_id: sid(1),
            node: Some(NodeId::new("n1").unwrap()),
            reason: EndReason::Released
        })
    );
}

#[test]
fn a_session_reported_reconnecting_times_out_after_the_grace_period() {
    let mut e = engine();
    e.reconcile(&hello(&models::l4(), GpuMode::EqualSize, 1, 1), T0)
        .unwrap();
    let p = placed(e.place(req(1, "720p", "moba", 10, false), T0));
    let mut h = hello(&models::l4(), GpuMode::EqualSize, 1, 1);
    h.sessions.push(running(
        1,
        "n1-gpu0",
        p.slot,
        "720p",
        SessionState::Reconnecting,
    ));
    h.sessions.push(running(
        2,
        "n1-gpu0",
        p.slot + 1,
        "720p",
        SessionState::Reconnecting,
    ));
    assert_eq!(applied(e.reconcile(&h, at(1)).unwrap()), (1, 0, 0));
    // The default grace is 120 s, counted from the report at 1 s.
    e.expire(at(120));
    assert_eq!(e.session_state(&sid(1)), Some(SessionState::Reconnecting));
    e.expire(at(121));
    assert_eq!(
        (e.session_state(&sid(1)), e.session_state(&sid(2))),
        (None, None)
    );
}

#[test]
fn a_gpu_whose_mode_changes_takes_the_new_mode_once_empty() {
    let mut e = engine();
    e.reconcile(&hello(&models::l4(), GpuMode::EqualSize, 1, 1), T0)
        .unwrap();
    let p = placed(e.place(req(1, "720p", "rpg", 10, false), T0));
    let mut h = hello(&models::l4(), GpuMode::MixedSize, 1, 2);
    h.sessions
        .push(running(1, "n1-gpu0", p.slot, "720p", SessionState::Active));
    e.reconcile(&h, at(1)).unwrap();
    assert_eq!(
        e.fleet().gpu(0).unwrap().mode,
        GpuMode::EqualSize,
        "a session still runs on it"
    );
    assert_eq!(
        e.place(req(2, "720p", "rpg", 10, false), at(1)),
        Decision::Rejected {
            reason: RejectReason::NoCapacity
        }
    );
    e.release(&sid(1), EndReason::Released, at(2)).unwrap();
    e.reconcile(&hello(&models::l4(), GpuMode::MixedSize, 1, 2), at(3))
        .unwrap();
    assert_eq!(e.fleet().gpu(0).unwrap().mode, GpuMode::MixedSize);
    placed(e.place(req(3, "4k", "rpg", 10, false), at(3)));
    placed(e.place(req(4, "720p", "rpg", 10, false), at(3)));
    e.audit().unwrap();
}

#[test]
fn only_the_node_a_session_runs_on_speaks_for_it() {
    let mut e = engine();
    e.reconcile(
        &simulated::hello("n1", "eu", &models::l4(), GpuMode::EqualSize, 1, 1).unwrap(),
        T0,
    )
    .unwrap();
    e.reconcile(
        &simulated::hello("n2", "eu", &models::l4(), GpuMode::EqualSize, 1, 1).unwrap(),
        T0,
    )
    .unwrap();
    let p = placed(e.place(req(1, "720p", "moba", 10, false), T0));
    let other = NodeId::new(if p.node.as_str() == "n1" { "n2" } else { "n1" }).unwrap();
    assert!(
        e.observe_session(
            &other,
            1,
            &sid(1),
            SessionState::Ended(EndReason::Error),
            T0
        )
        .is_err()
    );
    assert_eq!(e.session_state(&sid(1)), Some(SessionState::Reserved));
}

#[test]
fn mig_shapes_with_odd_slice_counts_do_not_overflow() {
    let mut spec = mig_with_nvenc(models::h100_80gb("odd MIG"));
    spec.mig_compute_slices = 255;
    for p in &mut spec.mig_profiles {
        p.mig_slices = Some(200);
    }
    let mut e = first_fit();
    e.reconcile(&hello(&spec, GpuMode::Mig, 1, 1), T0).unwrap();
    placed(e.place(req(1, "720p", "moba", 10, false), T0));
    assert_eq!(
        e.place(req(2, "720p", "moba", 10, false), T0),
        Decision::Rejected {
            reason: RejectReason::NoCapacity
        }
    );
    e.audit().unwrap();
}

#[test]
fn warm_mig_instances_count_against_the_gpus_slices() {
    let mut spec = mig_with_nvenc(models::a100_40gb());
    spec.mig_profiles.retain(|p| p.id != "1g.10gb");
    let mut h = hello(&spec, GpuMode::Mig, 1, 1);
    // Two warm 4K instances take 2g.10gb shapes: 4 of 7 slices.
    h.warm.push(warm("n1-gpu0", 0, "other", "4k"));
    h.warm.push(warm("n1-gpu0", 1, "other", "4k"));
    let mut e = first_fit();
    e.reconcile(&h, T0).unwrap();
    assert_eq!(e.fleet().gpu(0).unwrap().used.mig_slices, 4);
    let placed_count = (0..10)
        .filter(|&i| {
            matches!(
                e.place(req(i, "720p", "rpg", 10, false), T0),
                Decision::Placed(_)
            )
        })
        .count();
    assert_eq!(placed_count, 3, "three 1g.5gb shapes fill the 7 slices");
    e.audit().unwrap();
}

#[test]
fn a_warm_instance_can_be_taken_when_its_profile_is_at_its_limit() {
    let mut h = hello(&models::l4(), GpuMode::MixedSize, 1, 1);
    for s in 0..8 {
        h.warm.push(warm("n1-gpu0", s, "arena", "720p"));
    }
    let mut e = engine();
    e.reconcile(&h, T0).unwrap();
    let p = placed(e.place(req(1, "720p", "moba", 10, false), T0));
    assert!(p.warm);
    e.audit().unwrap();
}

#[test]
fn a_request_beyond_any_relaxed_rtt_cap_is_rejected_and_blocks_nobody() {
    let mut e = engine();
    e.reconcile(&hello(&models::l4(), GpuMode::EqualSize, 4, 1), T0)
        .unwrap();
    // fps caps RTT at 40 ms, relaxing to 80 ms at most.
    assert_eq!(
        e.place(req(1, "720p", "fps", 5000, true), T0),
        Decision::Rejected {
            reason: RejectReason::RttTooHigh
        }
    );
    // One that may become reachable waits, but does not hold back a nearby player.
    assert!(matches!(
        e.place(req(2, "720p", "fps", 70, true), T0),
        Decision::Queued(_)
    ));
    placed(e.place(req(3, "720p", "fps", 10, false), at(1)));
    e.release(&sid(3), EndReason::Released, at(2)).unwrap();
    assert!(
        e.poll_event().is_none(),
        "the far request still waits for its cap to relax"
    );
    e.expire(at(60));
    assert!(matches!(e.poll_event(), Some(EngineEvent::Placed(p)) if p.session_id == sid(2)));
}

#[test]
fn a_tier_up_fallback_does_not_overtake_the_queue_of_the_tier_above() {
    let mut e = first_fit();
    e.reconcile(&hello(&models::l4(), GpuMode::EqualSize, 1, 1), T0)
        .unwrap();
    for i in 0..6 {
        placed(e.place(req(i, "1080p", "rpg", 10, false), T0));
    }
    let mut high = req(10, "1080p", "rpg", 10, true);
    high.priority = Priority::High;
    assert!(matches!(e.place(high, at(1)), Decision::Queued(_)));
    let mut low = req(11, "720p", "rpg", 10, true);
    low.priority = Priority::Low;
    low.fallbacks = vec![Fallback::TierUp];
    assert!(matches!(e.place(low, at(2)), Decision::Queued(_)));
    e.release(&sid(0), EndReason::Released, at(3)).unwrap();
    assert!(matches!(e.poll_event(), Some(EngineEvent::Placed(p)) if p.session_id == sid(10)));
    assert_eq!(e.session_state(&sid(11)), Some(SessionState::Queued));
}

#[test]
fn a_drained_node_that_goes_down_comes_back_cordoned() {
    let mut e = engine();
    e.reconcile(&hello(&models::l4(), GpuMode::EqualSize, 1, 1), T0)
        .unwrap();
    let n1 = NodeId::new("n1").unwrap();
    e.drain(&n1, at(1000)).unwrap();
    e.node_down(&n1, at(1)).unwrap();
    e.reconcile(&hello(&models::l4(), GpuMode::EqualSize, 1, 2), at(2))
        .unwrap();
    assert_eq!(e.fleet().node(0).unwrap().state, NodeState::Cordoned);
    assert_eq!(
        e.place(req(1, "720p", "moba", 10, false), at(3)),
        Decision::Rejected {
            reason: RejectReason::NoCapacity
        }
    );
}

#[test]
fn two_sessions_that_swapped_slots_keep_running() {
    let mut e = engine();
    e.reconcile(&hello(&models::l4(), GpuMode::EqualSize, 1, 1), T0)
        .unwrap();
    let a = placed(e.place(req(1, "720p", "rpg", 10, false), T0));
    let b = placed(e.place(req(2, "720p", "rpg", 10, false), T0));
    let mut h = hello(&models::l4(), GpuMode::EqualSize, 1, 1);
    h.sessions
        .push(running(1, "n1-gpu0", b.slot, "720p", SessionState::Active));
    h.sessions
        .push(running(2, "n1-gpu0", a.slot, "720p", SessionState::Active));
    e.reconcile(&h, at(1)).unwrap();
    assert_eq!(e.poll_event(), None, "nothing ended");
    assert_eq!(
        (e.session_state(&sid(1)), e.session_state(&sid(2))),
        (Some(SessionState::Active), Some(SessionState::Active))
    );
    e.audit().unwrap();
}

#[test]
fn an_unknown_first_region_is_not_a_silent_fallback() {
    let mut e = engine();
    e.reconcile(&hello(&models::l4(), GpuMode::EqualSize, 1, 1), T0)
        .unwrap();
    let mut r = req(1, "720p", "moba", 10, false);
    r.regions.insert(
        0,
        RegionRtt {
            region: RegionName::new("mars").unwrap(),
            rtt_ms: 5,
        },
    );
    assert_eq!(
        e.place(r.clone(), T0),
        Decision::Rejected {
            reason: RejectReason::NoRegion
        }
    );
    r.fallbacks = vec![Fallback::NextRegion];
    assert_eq!(placed(e.place(r, T0)).region.as_str(), "eu");
}

#[test]
fn odd_gpu_specs_and_reports_do_not_panic() {
    let mut no_vgpus = models::l4();
    no_vgpus.model = "zero vGPUs".into();
    no_vgpus.max_vgpus = 0;
    let mut no_instances = models::l4();
    no_instances.model = "zero instances".into();
    for p in &mut no_instances.vgpu_profiles {
        p.max_instances = 0;
        p.max_instances_mixed = Some(0);
    }
    let mut e = engine();
    for (i, (spec, mode)) in [
        (&no_vgpus, GpuMode::EqualSize),
        (&no_vgpus, GpuMode::MixedSize),
        (&no_instances, GpuMode::EqualSize),
        (&no_instances, GpuMode::MixedSize),
    ]
    .into_iter()
    .enumerate()
    {
        let mut h = simulated::hello(&format!("m{i}"), "eu", spec, mode, 1, 1).unwrap();
        h.gpus.push(h.gpus[0].clone());
        let gpu = h.gpus[0].gpu.to_string();
        h.warm.push(warm(&gpu, 0, "arena", "720p"));
        h.warm.push(warm(&gpu, u32::MAX, "arena", "720p"));
        h.sessions.push(running(
            1000 + i as u128,
            &gpu,
            3,
            "720p",
            SessionState::Active,
        ));
        e.reconcile(&h, T0).unwrap();
        e.audit().unwrap();
    }
    for i in 0..20 {
        let _ = e.place(req(i, "720p", "moba", 10, true), T0);
    }
    e.expire(at(500));
    e.audit().unwrap();
}
