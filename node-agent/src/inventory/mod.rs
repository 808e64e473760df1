//! What GPUs this host has.
//!
//! One trait, two implementations: [`nvml::NvmlInventory`] reads the NVIDIA driver through
//! NVML (loaded at run time, so the agent builds and starts everywhere), and
//! [`simulated::SimulatedInventory`] builds GPUs from the model table for hosts without a
//! driver. [`open`] picks one as `inventory.source` says: with `auto`, NVML when its library
//! loads, else the simulated inventory if one is configured, else an error that says what to
//! install or which flag to pass.

pub mod nvml;
pub mod simulated;

use std::path::{Path, PathBuf};

use serde::Serialize;

use framecast_shared::config::ConfigError;
use framecast_shared::config::agent::{InventoryConfig, InventorySource};
use framecast_shared::gpu::{GpuMode, GpuSpec};
use framecast_shared::ids::GpuId;
use framecast_shared::units::Megabytes;

/// One GPU as the host reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DiscoveredGpu {
    /// The NVML UUID (`GPU-…`), or a simulated name.
    pub id: GpuId,
    /// NVML's device index.
    pub index: u32,
    /// The device name NVML reports (`NVIDIA L4`).
    pub name: String,
    /// PCI bus id (`00000000:3B:00.0`), where known.
    pub pci_bus_id: Option<String>,
    /// The model as the placer sees it: from the built-in table when the name matches one,
    /// else built from what NVML reports.
    pub spec: GpuSpec,
    /// The sharing mode it is in.
    pub mode: GpuMode,
    /// Framebuffer NVML reports in total and in use.
    pub memory_total: Megabytes,
    /// Framebuffer in use.
    pub memory_used: Megabytes,
    /// Encoder facts.
    pub encoder: EncoderFacts,
    /// MIG mode, where the GPU supports it.
    pub mig: Option<MigFacts>,
    /// vGPU types the driver offers on this GPU (empty without the vGPU host driver).
    pub vgpu_types: Vec<VgpuTypeFacts>,
}

/// What NVML says about the encoder.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct EncoderFacts {
    /// Remaining H.264 encoder capacity, percent.
    pub h264_capacity_pct: Option<u32>,
    /// Remaining HEVC encoder capacity, percent.
    pub hevc_capacity_pct: Option<u32>,
    /// Remaining AV1 encoder capacity, percent; `None` where the GPU or driver has no AV1
    /// query. nvml-wrapper 0.13 has no AV1 `EncoderType`, so NVML reads it with a raw call.
    pub av1_capacity_pct: Option<u32>,
    /// Encoder sessions running.
    pub sessions: Option<u32>,
}

/// MIG state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MigFacts {
    /// MIG is enabled now.
    pub enabled: bool,
    /// MIG will be enabled after the next GPU reset.
    pub pending: bool,
    /// Most MIG devices the GPU can hold.
    pub max_devices: u32,
}

/// One vGPU type the driver offers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VgpuTypeFacts {
    /// E.g. `NVIDIA L4-4Q`.
    pub name: String,
    /// E.g. `Quadro`, `NVS`, `Compute`.
    pub class: String,
    /// Framebuffer of one instance.
    pub framebuffer: Megabytes,
    /// Most instances per GPU.
    pub max_instances: u32,
}

/// Why no inventory could be opened or read.
#[derive(Debug, thiserror::Error)]
pub enum InventoryError {
    /// NVML's library did not load or the driver did not answer, and no simulated inventory is
    /// configured.
    #[error(
        "no GPU inventory: NVML is unavailable ({reason}). Install the NVIDIA driver (it provides \
         libnvidia-ml.so.1), or run on simulated GPUs with --simulate gpus.toml \
         (inventory.simulate in agent.toml)"
    )]
    NvmlUnavailable {
        /// What NVML said.
        reason: String,
    },
    /// `inventory.source = "simulated"` without a file.
    #[error(
        "inventory.source = \"simulated\" needs a simulated inventory: pass --simulate gpus.toml"
    )]
    NoSimulation,
    /// The simulated inventory file is not valid.
    #[error("simulated inventory {}: {error}", path.display())]
    Simulation {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        error: ConfigError,
    },
    /// NVML answered with an error while reading a device.
    #[error("NVML: {0}")]
    Nvml(String),
}

/// A source of GPU facts.
pub trait Inventory: Send + Sync {
    /// `nvml` or `simulated`.
    fn source(&self) -> &'static str;

    /// The GPUs, in device-index order.
    fn gpus(&self) -> Result<Vec<DiscoveredGpu>, InventoryError>;
}

/// Opens the inventory `config` asks for; `simulate` (the `--simulate` flag) overrides
/// `config.simulate`.
pub fn open(
    config: &InventoryConfig,
    simulate: Option<&Path>,
) -> Result<Box<dyn Inventory>, InventoryError> {
    let simulate = simulate.or(config.simulate.as_deref());
    let simulated = |path: Option<&Path>| -> Result<Box<dyn Inventory>, InventoryError> {
        let path = path.ok_or(InventoryError::NoSimulation)?;
        Ok(Box::new(simulated::SimulatedInventory::load(path)?))
    };
    match config.source {
        InventorySource::Simulated => simulated(simulate),
        InventorySource::Nvml => Ok(Box::new(nvml::NvmlInventory::open()?)),
        InventorySource::Auto => match nvml::NvmlInventory::open() {
            Ok(inv) => Ok(Box::new(inv)),
            Err(InventoryError::NvmlUnavailable { reason }) if simulate.is_some() => {
                tracing::info!(%reason, "NVML unavailable; using the simulated inventory");
                simulated(simulate)
            }
            Err(e) => Err(e),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_falls_back_to_the_simulation_only_when_nvml_is_missing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gpus.toml");
        std::fs::write(&path, "[[gpus]]\nmodel = \"l4\"\ncount = 2\n").unwrap();
        let auto = InventoryConfig {
            source: InventorySource::Auto,
            simulate: None,
        };
        match open(&auto, Some(&path)) {
            // A host with the NVIDIA driver uses it even when a simulation is configured.
            Ok(inv) if inv.source() == "nvml" => {}
            Ok(inv) => {
                assert_eq!(inv.source(), "simulated");
                assert_eq!(inv.gpus().unwrap().len(), 2);
            }
            Err(e) => panic!("{e}"),
        }
        if let Err(e) = open(&auto, None) {
            let text = e.to_string();
            assert!(
                text.contains("Install the NVIDIA driver") && text.contains("--simulate"),
                "{text}"
            );
        }
    }

    #[test]
    fn simulated_without_a_file_says_which_flag_to_pass() {
        let cfg = InventoryConfig {
            source: InventorySource::Simulated,
            simulate: None,
        };
        let err = open(&cfg, None).err().unwrap();
        assert!(err.to_string().contains("--simulate gpus.toml"), "{err}");
    }
}
