//! Helpers the placement test binaries share.

// Each test binary uses a subset of these.
#![allow(dead_code)]

use std::time::Duration;

use framecast_broker::placement::strategy::Strategy;
use framecast_broker::placement::{Decision, Engine, EngineConfig, EngineEvent, Placement};
use framecast_shared::genre::GenreProfile;
use framecast_shared::ids::SessionId;
use framecast_shared::tier::TierPreset;
use framecast_shared::time::Timestamp;

/// The virtual clock's start.
pub(crate) const T0: Timestamp = Timestamp::from_millis(1_800_000_000_000);

/// `secs` after [`T0`].
pub(crate) fn at(secs: u64) -> Timestamp {
    T0.saturating_add(Duration::from_secs(secs))
}

/// Session number `n`, created at [`T0`].
pub(crate) fn sid(n: u128) -> SessionId {
    SessionId::new(T0, n)
}

/// An engine with the default tiers, `genres` and `strategy`.
pub(crate) fn engine_with(strategy: Box<dyn Strategy>, genres: Vec<GenreProfile>) -> Engine {
    Engine::new(
        TierPreset::defaults(),
        genres,
        EngineConfig::default(),
        strategy,
    )
}

/// The placement of a decision that must be one.
pub(crate) fn placed(d: Decision) -> Placement {
    match d {
        Decision::Placed(p) => p,
        other => panic!("expected a placement, got {other:?}"),
    }
}

/// Every event the engine has queued.
pub(crate) fn events(e: &mut Engine) -> Vec<EngineEvent> {
    std::iter::from_fn(|| e.poll_event()).collect()
}
