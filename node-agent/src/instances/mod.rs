//! Game instances: the warm pool per (game, tier), launching, limits.
//!
//! - [`supervisor`]: the sans-IO core that decides what to start and stop and what a crash
//!   means;
//! - [`launch`]: processes with their GPU, vGPU and tier in the environment, or the built-in
//!   synthetic game;
//! - [`cgroup`]: CPU and memory limits through cgroup v2 where the host delegates a subtree;
//! - [`runner`]: the async shell that executes what the core decides.

pub mod cgroup;
pub mod launch;
pub mod runner;
pub mod supervisor;
