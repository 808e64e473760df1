//! GPUs built from the model table, as `gpus.toml` lists them.

use std::path::Path;

use framecast_shared::config::inventory::SimulatedGpus;
use framecast_shared::config::{Sources, load};
use framecast_shared::ids::GpuId;
use framecast_shared::units::Megabytes;

use super::{DiscoveredGpu, EncoderFacts, Inventory, InventoryError, MigFacts};

/// A simulated inventory.
#[derive(Debug, Clone)]
pub struct SimulatedInventory {
    gpus: Vec<DiscoveredGpu>,
}

impl SimulatedInventory {
    /// Reads and validates `path`.
    pub fn load(path: &Path) -> Result<Self, InventoryError> {
        // Only the file: FRAMECAST_* variables configure the agent, not its simulated GPUs.
        let sources = Sources {
            file: Some(path),
            env: Some(Vec::new()),
            flags: Vec::new(),
        };
        let file: SimulatedGpus = load(&sources).map_err(|error| InventoryError::Simulation {
            path: path.to_owned(),
            error,
        })?;
        Ok(Self::from_file(&file))
    }

    /// The GPUs a validated file describes, named `sim-<index>`.
    pub fn from_file(file: &SimulatedGpus) -> Self {
        let mut gpus = Vec::new();
        for group in &file.gpus {
            let Some((spec, mode)) = group.resolve() else {
                continue;
            };
            for _ in 0..group.count {
                let index = u32::try_from(gpus.len()).unwrap_or(u32::MAX);
                let Ok(id) = GpuId::new(format!("sim-{index}")) else {
                    continue;
                };
                gpus.push(DiscoveredGpu {
                    id,
                    index,
                    name: spec.model.clone(),
                    pci_bus_id: None,
                    mode,
                    memory_total: spec.framebuffer,
                    memory_used: Megabytes::ZERO,
                    encoder: EncoderFacts::default(),
                    mig: spec
                        .supports(framecast_shared::gpu::GpuMode::Mig)
                        .then_some(MigFacts {
                            enabled: mode == framecast_shared::gpu::GpuMode::Mig,
                            pending: false,
                            max_devices: u32::from(spec.max_vgpus),
                        }),
                    vgpu_types: Vec::new(),
                    spec: spec.clone(),
                });
            }
        }
        Self { gpus }
    }
}

impl Inventory for SimulatedInventory {
    fn source(&self) -> &'static str {
        "simulated"
    }

    fn gpus(&self) -> Result<Vec<DiscoveredGpu>, InventoryError> {
        Ok(self.gpus.clone())
    }
}

#[cfg(test)]
mod tests {
    use framecast_shared::gpu::GpuMode;

    use super::*;

    #[test]
    fn a_file_becomes_numbered_gpus() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gpus.toml");
        std::fs::write(&path, "[[gpus]]\nmodel = \"l4\"\ncount = 2\n\n[[gpus]]\nmodel = \"h100 pcie\"\nmode = \"mig\"\n").unwrap();
        let gpus = SimulatedInventory::load(&path).unwrap().gpus().unwrap();
        let summary: Vec<(String, String, GpuMode)> = gpus
            .iter()
            .map(|g| (g.id.to_string(), g.name.clone(), g.mode))
            .collect();
        assert_eq!(
            summary,
            [
                ("sim-0".into(), "NVIDIA L4".into(), GpuMode::EqualSize),
                ("sim-1".into(), "NVIDIA L4".into(), GpuMode::EqualSize),
                ("sim-2".into(), "NVIDIA H100 PCIe".into(), GpuMode::Mig),
            ]
        );
        assert_eq!(gpus[2].mig.as_ref().map(|m| m.enabled), Some(true));
        assert_eq!(gpus[0].memory_total, Megabytes::from_gb(24));
    }

    #[test]
    fn a_bad_file_names_the_file_and_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gpus.toml");
        std::fs::write(&path, "[[gpus]]\nmodel = \"l4\"\ncount = 99\n").unwrap();
        let err = SimulatedInventory::load(&path).unwrap_err().to_string();
        assert!(
            err.contains("gpus.toml: gpus.0.count = 99: must be in 1..=64"),
            "{err}"
        );
    }
}
