//! `framecast-agent`: runs on every GPU host; keeps the vGPU pool and streams games.
//!
//! - [`inventory`]: what GPUs the host has (NVML or a simulated inventory);
//! - [`encoder`]: NVENC encoder slots and the leases streams hold;
//! - [`vgpu`]: creating and removing vGPUs (simulated, Linux mdev) within each model's limits.

pub mod encoder;
pub mod inventory;
pub mod vgpu;
