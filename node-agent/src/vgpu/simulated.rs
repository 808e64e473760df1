//! vGPUs that exist only in the agent's books, for simulated inventories.

use std::collections::BTreeMap;

use uuid::Uuid;

use framecast_shared::ids::GpuId;

use super::{GpuHandle, Vgpu, VgpuBackend, VgpuError, VgpuType};

/// Bookkeeping only; every type is available, [`super::VgpuPool`] enforces the limits.
#[derive(Debug, Default)]
pub struct SimulatedBackend {
    vgpus: BTreeMap<GpuId, Vec<Vgpu>>,
}

impl VgpuBackend for SimulatedBackend {
    fn kind(&self) -> &'static str {
        "simulated"
    }

    fn types(&self, _gpu: &GpuHandle) -> Result<Vec<VgpuType>, VgpuError> {
        Ok(Vec::new())
    }

    fn existing(&self, gpu: &GpuHandle) -> Result<Vec<Vgpu>, VgpuError> {
        Ok(self.vgpus.get(&gpu.id).cloned().unwrap_or_default())
    }

    fn create(&mut self, gpu: &GpuHandle, name: &str, uuid: Uuid) -> Result<Vgpu, VgpuError> {
        let vgpu = Vgpu {
            uuid,
            gpu: gpu.id.clone(),
            type_id: name.to_owned(),
        };
        self.vgpus
            .entry(gpu.id.clone())
            .or_default()
            .push(vgpu.clone());
        Ok(vgpu)
    }

    fn remove(&mut self, gpu: &GpuHandle, vgpu: &Vgpu) -> Result<(), VgpuError> {
        let list = self
            .vgpus
            .get_mut(&gpu.id)
            .ok_or(VgpuError::NotFound(vgpu.uuid))?;
        let before = list.len();
        list.retain(|v| v.uuid != vgpu.uuid);
        if list.len() == before {
            Err(VgpuError::NotFound(vgpu.uuid))
        } else {
            Ok(())
        }
    }
}
