//! `framecast-broker`: matches player sessions to GPU slots on the fleet's nodes.
//!
//! The [`placement`] engine is the heart of it: a deterministic core that the service, the
//! load-test simulator and the benchmarks drive.

pub mod placement;
