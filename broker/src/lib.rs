//! `framecast-broker`: matches player sessions to GPU slots on the fleet's nodes.
//!
//! The [`placement`] engine is the heart of it: a deterministic core that the service, the
//! load-test simulator and the benchmarks drive.
//!
//! - [`api`]: the HTTP API;
//! - [`run`]: starting a broker; [`dev`]: a broker with simulated nodes in one process;
//! - [`service`]: the running broker: control plane, sessions, tokens, timers;
//! - [`metrics`]: what it exports on `/metrics`;
//! - [`planner`]: the pool planner, sizing each GPU's profile and warm instances to demand;
//! - [`store`]: the durable store (redb) of live sessions, idempotency keys and the audit log.

pub mod api;
pub mod dev;
pub mod metrics;
pub mod placement;
pub mod planner;
pub mod run;
pub mod service;
pub mod store;
