//! `framecast-broker`: matches player sessions to GPU slots on the fleet's nodes.
//!
//! The [`placement`] engine is the heart of it: a deterministic core that the service, the
//! load-test simulator and the benchmarks drive.
//!
//! - [`store`]: the durable store (redb) of live sessions, idempotency keys and the audit log.

pub mod placement;
pub mod store;
