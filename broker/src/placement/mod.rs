//! The placement engine: where each player session runs.
//!
//! A deterministic, sans-IO core — no sockets, no clock; every call that depends on time takes
//! `now` — that the broker service, the load-test simulator and the benchmarks all drive.
//!
//! - [`catalog`]: tiers, genres, GPU models and which profile serves which tier;
//! - [`fleet`]: nodes, GPUs, slots and their accounting;
//! - [`index`]: the indices that keep a decision from scanning the fleet, over [`dense_set`];
//! - [`score`]: the genre-weighted score;
//! - [`strategy`]: the scorer and the baselines behind one trait;
//! - [`queue`]: per-tier queues with priority classes;
//! - [`bound`]: the fewest GPUs any placement could use for a demand;
//! - [`simulated`]: reports of simulated nodes;
//! - [`engine`]: decisions, timers and reconciliation of observed state with intents.

pub mod bound;
pub mod catalog;
pub mod dense_set;
pub mod engine;
pub mod fleet;
pub mod index;
pub mod queue;
pub mod request;
pub mod score;
pub mod simulated;
pub mod strategy;
pub mod views;

pub use engine::{Engine, EngineConfig, EngineError, ReconcileOutcome, Stats};
pub use request::{
    AttemptExplanation, CandidateExplanation, Decision, EngineEvent, Explanation, Fallback,
    PlaceRequest, Placement, Priority, QueuedInfo, RegionRtt, RejectReason,
};
pub use score::{ScoreBreakdown, Weights};
pub use strategy::Strategy;
