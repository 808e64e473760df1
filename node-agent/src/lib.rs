//! `framecast-agent`: runs on every GPU host; keeps the vGPU pool and streams games.
//!
//! - [`inventory`]: what GPUs the host has (NVML or a simulated inventory);
//! - [`core`]: the agent's state and how it executes the broker's messages;
//! - [`datadir`]: crash-safe files in the data directory;
//! - [`encoder`]: NVENC encoder slots and the leases streams hold;
//! - [`instances`]: warm game instances, their launch and limits;
//! - [`vgpu`]: creating and removing vGPUs (simulated, Linux mdev, MIG) within each model's limits;
//! - [`link`]: the QUIC control link to the broker, with mutual TLS;
//! - [`metrics`]: what the agent exports on `/metrics`;
//! - [`stream`]: WHEP, the media pipeline and player input;
//! - [`run`]: the agent process that ties them together.

pub mod core;
pub mod datadir;
pub mod encoder;
pub mod instances;
pub mod inventory;
pub mod link;
pub mod metrics;
mod nvml_ffi;
pub mod run;
pub mod stream;
pub mod vgpu;
