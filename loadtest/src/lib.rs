//! `framecast-loadtest` as a library: scenarios, the engines that run them and their reports,
//! for the binary, the tests and anyone who wants to drive a run from code.
//!
//! - [`scenario`]: the scenario files;
//! - [`sim`]: the discrete-event engine over the real placement engine;
//! - [`report`]: the JSON report, the terminal summary and the SLO checks.

pub mod report;
pub mod scenario;
pub mod sim;
