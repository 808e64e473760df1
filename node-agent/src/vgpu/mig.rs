//! vGPUs as MIG (Multi-Instance GPU) devices on A100- and H100-class GPUs, through NVML.
//!
//! One vGPU is one GPU instance of a profile (`1g.10gb`) holding one compute instance that
//! spans it, which is what `nvidia-smi mig -cgi <profile> -C` makes. Its [`Vgpu::uuid`] is the
//! UUID of the MIG device the driver creates for it (`MIG-<uuid>` in NVML, `nvidia-smi -L` and
//! `CUDA_VISIBLE_DEVICES`; [`visible_device`] spells it). The driver picks that UUID, so the one
//! [`VgpuBackend::create`] is given is not used. A vGPU's type id is `mig-<profile id>`.
//!
//! Driver access goes through [`MigDevice`], so the tests put an in-memory GPU behind the same
//! code; [`open`] returns the backend over NVML. nvml-wrapper 0.13 wraps MIG mode and MIG
//! device handles but not creating or destroying instances: those calls are in
//! `crate::nvml_ffi`, the agent's one module with `unsafe` code.
//!
//! The backend refuses a GPU whose MIG mode is off and names the command that turns it on. It
//! adopts, and removes, only the MIG devices it created: their UUIDs are recorded in a registry
//! directory, as the mdev backend does, so instances an operator made for other uses on the same
//! GPU are left alone. A create that fails half-way takes back what it made.

use std::io;
use std::path::PathBuf;

use nvml_wrapper::error::NvmlError;
use nvml_wrapper::{Device, Nvml};
use uuid::Uuid;

use framecast_shared::ids::GpuId;
use framecast_shared::units::Megabytes;

use super::{GpuHandle, Vgpu, VgpuBackend, VgpuError, VgpuType, bare_type_name};
use crate::nvml_ffi;

/// Loads NVML and returns a MIG backend over it that records its instances in `registry`; an
/// error, never a panic, where the NVIDIA driver's `libnvidia-ml.so.1` is absent or does not
/// initialise.
pub fn open(registry: impl Into<PathBuf>) -> Result<MigBackend, NvmlUnavailable> {
    let nvml = Nvml::init().map_err(|e| NvmlUnavailable {
        reason: e.to_string(),
    })?;
    Ok(MigBackend::with_device(
        registry,
        Box::new(NvmlMig { nvml }),
    ))
}

/// NVML could not be loaded or initialised.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the MIG backend needs NVML (libnvidia-ml.so.1, from the NVIDIA driver): {reason}")]
pub struct NvmlUnavailable {
    /// What NVML said.
    pub reason: String,
}

/// The `CUDA_VISIBLE_DEVICES` / `NVIDIA_VISIBLE_DEVICES` name of the MIG device `uuid`.
pub fn visible_device(uuid: Uuid) -> String {
    format!("MIG-{}", uuid.hyphenated())
}

/// The UUID in a MIG device name (`MIG-<uuid>`); `None` for anything else, including the
/// `MIG-GPU-<uuid>/<gi>/<ci>` form of old drivers.
pub fn mig_uuid(name: &str) -> Option<Uuid> {
    let uuid = name.trim().strip_prefix("MIG-")?;
    // `Uuid::parse_str` also takes the simple, braced and URN forms, which no driver prints.
    if uuid.len() != 36 {
        return None;
    }
    Uuid::parse_str(uuid).ok()
}

/// A MIG profile name without the prefixes drivers and the pool put on it: `MIG 1g.10gb` and
/// `NVIDIA 1g.10gb` become `1g.10gb`.
pub fn mig_profile_name(name: &str) -> &str {
    let name = bare_type_name(name);
    name.strip_prefix("MIG ").unwrap_or(name).trim()
}

/// A GPU instance profile id, as the driver numbers them on a GPU (the ID column of
/// `nvidia-smi mig -lgip`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MigProfileId(pub u32);

/// A GPU instance id on its GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GpuInstanceId(pub u32);

/// A compute instance id within its GPU instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ComputeInstanceId(pub u32);

/// A GPU's MIG mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MigStatus {
    /// The GPU's NVML index, the one `nvidia-smi -i` takes.
    pub index: u32,
    /// MIG mode is on now.
    pub enabled: bool,
    /// MIG mode will be on after the next GPU reset.
    pub pending: bool,
}

/// A GPU instance profile a GPU offers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigProfile {
    /// The driver's id for it.
    pub id: MigProfileId,
    /// Its name without the `MIG ` prefix: `1g.10gb`.
    pub name: String,
    /// Compute slices (of 7) it takes.
    pub slices: u32,
    /// Its memory.
    pub memory: Megabytes,
    /// How many more instances of it the driver would create now.
    pub available: u32,
}

/// A MIG device: a GPU instance and a compute instance in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigInstance {
    /// The GPU instance.
    pub gpu_instance: GpuInstanceId,
    /// The compute instance.
    pub compute_instance: ComputeInstanceId,
    /// The GPU instance's profile.
    pub profile: MigProfileId,
    /// The MIG device's name as the driver reports it (`MIG-<uuid>`).
    pub uuid: String,
}

/// Why the driver did not do a MIG operation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MigDriverError {
    /// The GPU or the loaded driver does not support it.
    #[error("not supported: {0}")]
    NotSupported(String),
    /// No such GPU or instance.
    #[error("not found: {0}")]
    NotFound(String),
    /// The GPU has no room for another instance of that profile.
    #[error("no room on the GPU: {0}")]
    NoCapacity(String),
    /// Anything else, in the driver's words.
    #[error("{0}")]
    Failed(String),
}

/// The MIG side of the driver for the host's GPUs, each addressed by its NVML UUID.
pub trait MigDevice: Send {
    /// The GPU's MIG mode.
    fn status(&self, gpu: &GpuId) -> Result<MigStatus, MigDriverError>;

    /// The GPU instance profiles the GPU offers, with what is left of each.
    fn profiles(&self, gpu: &GpuId) -> Result<Vec<MigProfile>, MigDriverError>;

    /// The MIG devices on the GPU: every GPU instance that holds a compute instance.
    fn instances(&self, gpu: &GpuId) -> Result<Vec<MigInstance>, MigDriverError>;

    /// Creates a GPU instance of `profile` where the driver places it.
    fn create_gpu_instance(
        &mut self,
        gpu: &GpuId,
        profile: MigProfileId,
    ) -> Result<GpuInstanceId, MigDriverError>;

    /// Creates in `gpu_instance` one compute instance that spans all of it.
    fn create_compute_instance(
        &mut self,
        gpu: &GpuId,
        gpu_instance: GpuInstanceId,
    ) -> Result<ComputeInstanceId, MigDriverError>;

    /// Destroys `compute_instance` (where given), then `gpu_instance`.
    fn destroy(
        &mut self,
        gpu: &GpuId,
        gpu_instance: GpuInstanceId,
        compute_instance: Option<ComputeInstanceId>,
    ) -> Result<(), MigDriverError>;
}

/// The MIG backend.
pub struct MigBackend {
    registry: PathBuf,
    device: Box<dyn MigDevice>,
}

impl std::fmt::Debug for MigBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MigBackend")
            .field("registry", &self.registry)
            .finish_non_exhaustive()
    }
}

impl MigBackend {
    /// A backend over `device` that records its instances in `registry`.
    pub fn with_device(registry: impl Into<PathBuf>, device: Box<dyn MigDevice>) -> Self {
        Self {
            registry: registry.into(),
            device,
        }
    }

    /// Refuses a GPU whose MIG mode is not on now, naming the fix.
    fn check_enabled(&self, gpu: &GpuHandle) -> Result<(), VgpuError> {
        let status = self
            .device
            .status(&gpu.id)
            .map_err(|e| io_error(gpu, "reading MIG mode", e))?;
        if status.enabled {
            return Ok(());
        }
        let i = status.index;
        let detail = if status.pending {
            format!(
                "MIG mode on GPU {i} takes effect at its next reset; reset it with \
                 `nvidia-smi -i {i} -r` while nothing runs on it"
            )
        } else {
            format!(
                "MIG mode is not enabled on GPU {i}; enable it with `nvidia-smi -i {i} -mig 1` \
                 (as root, while nothing runs on the GPU; some GPUs then need a reset)"
            )
        };
        Err(VgpuError::Io {
            gpu: gpu.id.clone(),
            op: "checking MIG mode",
            detail,
        })
    }

    fn profiles(&self, gpu: &GpuHandle) -> Result<Vec<MigProfile>, VgpuError> {
        self.device
            .profiles(&gpu.id)
            .map_err(|e| io_error(gpu, "reading MIG profiles", e))
    }

    /// The MIG devices on `gpu` with their UUIDs; devices whose name holds no UUID are skipped.
    fn live(&self, gpu: &GpuHandle) -> Result<Vec<(Uuid, MigInstance)>, VgpuError> {
        let instances = self
            .device
            .instances(&gpu.id)
            .map_err(|e| io_error(gpu, "listing MIG devices", e))?;
        Ok(instances
            .into_iter()
            .filter_map(|i| match mig_uuid(&i.uuid) {
                Some(uuid) => Some((uuid, i)),
                None => {
                    tracing::warn!(
                        gpu = %gpu.id,
                        name = %i.uuid,
                        "skipping a MIG device whose name holds no UUID"
                    );
                    None
                }
            })
            .collect())
    }

    /// Destroys what a failed create made, or says loudly that it could not.
    fn take_back(
        &mut self,
        gpu: &GpuHandle,
        gpu_instance: GpuInstanceId,
        compute_instance: Option<ComputeInstanceId>,
    ) {
        if let Err(e) = self.device.destroy(&gpu.id, gpu_instance, compute_instance) {
            tracing::error!(
                gpu = %gpu.id,
                gpu_instance = gpu_instance.0,
                error = %e,
                "could not take back a half-made MIG instance; \
                 remove it with `nvidia-smi mig -dci` and `-dgi`"
            );
        }
    }

    fn registry_file(&self, uuid: Uuid) -> PathBuf {
        self.registry.join(uuid.hyphenated().to_string())
    }

    fn record(&self, uuid: Uuid, type_id: &str) -> io::Result<()> {
        std::fs::create_dir_all(&self.registry)?;
        std::fs::write(self.registry_file(uuid), type_id)
    }

    fn recorded(&self, uuid: Uuid) -> bool {
        self.registry_file(uuid).is_file()
    }

    fn forget(&self, uuid: Uuid) {
        let _ = std::fs::remove_file(self.registry_file(uuid));
    }
}

impl VgpuBackend for MigBackend {
    fn kind(&self) -> &'static str {
        "mig"
    }

    fn types(&self, gpu: &GpuHandle) -> Result<Vec<VgpuType>, VgpuError> {
        self.check_enabled(gpu)?;
        Ok(self
            .profiles(gpu)?
            .into_iter()
            .map(|p| VgpuType {
                id: type_id(p.id),
                name: p.name,
                available: p.available,
            })
            .collect())
    }

    fn existing(&self, gpu: &GpuHandle) -> Result<Vec<Vgpu>, VgpuError> {
        self.check_enabled(gpu)?;
        Ok(self
            .live(gpu)?
            .into_iter()
            .filter(|(uuid, _)| self.recorded(*uuid))
            .map(|(uuid, i)| Vgpu {
                uuid,
                gpu: gpu.id.clone(),
                type_id: type_id(i.profile),
            })
            .collect())
    }

    /// Creates a MIG device of the profile `name` names. `uuid` is not used: the driver picks
    /// the MIG device's UUID, which the returned [`Vgpu`] carries.
    fn create(&mut self, gpu: &GpuHandle, name: &str, uuid: Uuid) -> Result<Vgpu, VgpuError> {
        self.check_enabled(gpu)?;
        let wanted = mig_profile_name(name);
        let profile = self
            .profiles(gpu)?
            .into_iter()
            .find(|p| p.name == wanted)
            .ok_or_else(|| VgpuError::UnknownType {
                gpu: gpu.id.clone(),
                name: name.to_owned(),
            })?;
        let type_id = type_id(profile.id);
        if profile.available == 0 {
            return Err(VgpuError::Exhausted {
                gpu: gpu.id.clone(),
                type_id,
            });
        }
        let gi = match self.device.create_gpu_instance(&gpu.id, profile.id) {
            Ok(gi) => gi,
            // The driver's placement rules are tighter than the counts it reported.
            Err(MigDriverError::NoCapacity(_)) => {
                return Err(VgpuError::Exhausted {
                    gpu: gpu.id.clone(),
                    type_id,
                });
            }
            Err(e) => return Err(io_error(gpu, "creating a MIG GPU instance", e)),
        };
        let ci = match self.device.create_compute_instance(&gpu.id, gi) {
            Ok(ci) => ci,
            Err(e) => {
                self.take_back(gpu, gi, None);
                return Err(io_error(gpu, "creating a MIG compute instance", e));
            }
        };
        let made = match self.device.instances(&gpu.id) {
            Ok(all) => all
                .into_iter()
                .find(|i| i.gpu_instance == gi && i.compute_instance == ci)
                .ok_or_else(|| {
                    format!(
                        "the driver made GPU instance {} but no MIG device appeared",
                        gi.0
                    )
                })
                .and_then(|i| {
                    mig_uuid(&i.uuid).ok_or_else(|| {
                        format!(
                            "the driver names the MIG device {:?}; \
                             only `MIG-<uuid>` names are supported",
                            i.uuid
                        )
                    })
                }),
            Err(e) => Err(format!("listing MIG devices: {e}")),
        };
        let mig = match made {
            Ok(mig) => mig,
            Err(detail) => {
                self.take_back(gpu, gi, Some(ci));
                return Err(io_error(gpu, "creating a MIG device", detail));
            }
        };
        if let Err(e) = self.record(mig, &type_id) {
            // Unrecorded, it would be orphaned at the next restart: take it back now.
            self.take_back(gpu, gi, Some(ci));
            return Err(io_error(gpu, "recording the vGPU", e));
        }
        tracing::info!(
            gpu = %gpu.id,
            uuid = %mig,
            requested = %uuid,
            profile = %profile.name,
            gpu_instance = gi.0,
            compute_instance = ci.0,
            "created MIG vGPU (the driver picks its UUID)"
        );
        Ok(Vgpu {
            uuid: mig,
            gpu: gpu.id.clone(),
            type_id,
        })
    }

    fn remove(&mut self, gpu: &GpuHandle, vgpu: &Vgpu) -> Result<(), VgpuError> {
        let status = self
            .device
            .status(&gpu.id)
            .map_err(|e| io_error(gpu, "reading MIG mode", e))?;
        // With MIG mode off the GPU holds no MIG devices.
        let found = if status.enabled {
            self.live(gpu)?
                .into_iter()
                .find(|(uuid, _)| *uuid == vgpu.uuid)
        } else {
            None
        };
        let Some((_, instance)) = found else {
            self.forget(vgpu.uuid);
            return Err(VgpuError::NotFound(vgpu.uuid));
        };
        if !self.recorded(vgpu.uuid) {
            return Err(VgpuError::Limit {
                gpu: gpu.id.clone(),
                rule: format!(
                    "MIG device {} was not created by this agent; it is left alone",
                    visible_device(vgpu.uuid)
                ),
            });
        }
        match self.device.destroy(
            &gpu.id,
            instance.gpu_instance,
            Some(instance.compute_instance),
        ) {
            Ok(()) => {}
            Err(MigDriverError::NotFound(_)) => {
                self.forget(vgpu.uuid);
                return Err(VgpuError::NotFound(vgpu.uuid));
            }
            Err(e) => return Err(io_error(gpu, "destroying a MIG instance", e)),
        }
        self.forget(vgpu.uuid);
        tracing::info!(gpu = %gpu.id, uuid = %vgpu.uuid, "removed MIG vGPU");
        Ok(())
    }
}

/// A profile's vGPU type id.
fn type_id(profile: MigProfileId) -> String {
    format!("mig-{}", profile.0)
}

fn io_error(gpu: &GpuHandle, op: &'static str, detail: impl ToString) -> VgpuError {
    VgpuError::Io {
        gpu: gpu.id.clone(),
        op,
        detail: detail.to_string(),
    }
}

/// [`MigDevice`] over NVML.
struct NvmlMig {
    nvml: Nvml,
}

impl NvmlMig {
    fn device(&self, gpu: &GpuId) -> Result<Device<'_>, MigDriverError> {
        self.nvml.device_by_uuid(gpu.as_str()).map_err(|e| match e {
            NvmlError::NotFound => MigDriverError::NotFound(format!("no GPU {gpu}")),
            e => driver_error(e),
        })
    }
}

impl MigDevice for NvmlMig {
    fn status(&self, gpu: &GpuId) -> Result<MigStatus, MigDriverError> {
        let device = self.device(gpu)?;
        let index = device.index().map_err(driver_error)?;
        let mode = device.mig_mode().map_err(|e| match e {
            NvmlError::NotSupported => {
                MigDriverError::NotSupported(format!("GPU {index} does not support MIG"))
            }
            e => driver_error(e),
        })?;
        Ok(MigStatus {
            index,
            enabled: mode.current == 1,
            pending: mode.pending == 1,
        })
    }

    fn profiles(&self, gpu: &GpuId) -> Result<Vec<MigProfile>, MigDriverError> {
        let device = self.device(gpu)?;
        let mut out = Vec::new();
        for index in 0..nvml_ffi::NVML_GPU_INSTANCE_PROFILE_COUNT {
            let info = match nvml_ffi::gpu_instance_profile(&device, index) {
                Ok(info) => info,
                // No profile at that index on this GPU.
                Err(NvmlError::NotSupported | NvmlError::InvalidArg) => continue,
                Err(e) => return Err(driver_error(e)),
            };
            let available = nvml_ffi::gpu_instance_remaining_capacity(&device, info.id)
                .map_err(driver_error)?;
            out.push(MigProfile {
                id: MigProfileId(info.id),
                name: mig_profile_name(&info.name).to_owned(),
                slices: info.slices,
                memory: Megabytes::new(info.memory_mb),
                available,
            });
        }
        Ok(out)
    }

    fn instances(&self, gpu: &GpuId) -> Result<Vec<MigInstance>, MigDriverError> {
        let device = self.device(gpu)?;
        let slots = device.mig_device_count().map_err(driver_error)?;
        let mut out = Vec::new();
        for slot in 0..slots {
            let mig = match device.mig_device_by_index(slot) {
                Ok(mig) => mig,
                // An empty slot.
                Err(NvmlError::NotFound) => continue,
                Err(e) => return Err(driver_error(e)),
            };
            let (gi, ci) = nvml_ffi::mig_device_instance_ids(&mig).map_err(driver_error)?;
            let uuid = mig.uuid().map_err(driver_error)?;
            let profile = nvml_ffi::gpu_instance_profile_id(&device, gi).map_err(driver_error)?;
            out.push(MigInstance {
                gpu_instance: GpuInstanceId(gi),
                compute_instance: ComputeInstanceId(ci),
                profile: MigProfileId(profile),
                uuid,
            });
        }
        Ok(out)
    }

    fn create_gpu_instance(
        &mut self,
        gpu: &GpuId,
        profile: MigProfileId,
    ) -> Result<GpuInstanceId, MigDriverError> {
        let device = self.device(gpu)?;
        nvml_ffi::create_gpu_instance(&device, profile.0)
            .map(GpuInstanceId)
            .map_err(driver_error)
    }

    fn create_compute_instance(
        &mut self,
        gpu: &GpuId,
        gpu_instance: GpuInstanceId,
    ) -> Result<ComputeInstanceId, MigDriverError> {
        let device = self.device(gpu)?;
        nvml_ffi::create_compute_instance(&device, gpu_instance.0)
            .map(ComputeInstanceId)
            .map_err(driver_error)
    }

    fn destroy(
        &mut self,
        gpu: &GpuId,
        gpu_instance: GpuInstanceId,
        compute_instance: Option<ComputeInstanceId>,
    ) -> Result<(), MigDriverError> {
        let device = self.device(gpu)?;
        nvml_ffi::destroy_instance(&device, gpu_instance.0, compute_instance.map(|c| c.0))
            .map_err(driver_error)
    }
}

fn driver_error(e: NvmlError) -> MigDriverError {
    if nvml_ffi::is_insufficient_resources(&e) {
        return MigDriverError::NoCapacity("NVML_ERROR_INSUFFICIENT_RESOURCES".into());
    }
    match e {
        NvmlError::NotSupported
        | NvmlError::FunctionNotFound
        | NvmlError::FailedToLoadSymbol(_) => MigDriverError::NotSupported(e.to_string()),
        NvmlError::NotFound => MigDriverError::NotFound(e.to_string()),
        NvmlError::NoPermission => MigDriverError::Failed(format!(
            "{e} (NVML lets only a privileged user create or destroy MIG instances)"
        )),
        NvmlError::InUse => MigDriverError::Failed(format!(
            "{e} (a process still uses the instance, \
             or it holds compute instances this agent did not make)"
        )),
        e => MigDriverError::Failed(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::fs;
    use std::path::Path;
    use std::sync::{Arc, Mutex};

    use framecast_shared::gpu::{GpuMode, GpuSpec, models};

    use super::*;
    use crate::vgpu::VgpuPool;

    const GPU: &str = "GPU-5b1c2d3e-4f50-4a61-8b72-93a4b5c6d7e8";

    /// One profile of a fake GPU.
    #[derive(Debug, Clone)]
    struct FakeProfile {
        name: String,
        slices: u32,
        memory_slices: u32,
        memory: Megabytes,
        max: u32,
    }

    /// An in-memory MIG GPU whose profiles are the model table's (NVIDIA's MIG user guide), in
    /// 7 compute slices and 8 memory slices; a profile takes its compute slices and its memory's
    /// share of the memory slices. Capacity is counted, not placed: the real driver also needs
    /// aligned placements, so it may refuse sooner. Profile ids are indices into the table, not
    /// NVIDIA's ids.
    #[derive(Debug, Clone)]
    struct FakeGpu {
        index: u32,
        enabled: bool,
        pending: bool,
        profiles: Vec<FakeProfile>,
        /// GPU instances: id -> (profile index, compute instance id and MIG name once made).
        gpu_instances: BTreeMap<u32, (usize, Option<(u32, String)>)>,
        next_id: u32,
        fail_gpu_instance: Option<MigDriverError>,
        fail_compute_instance: Option<MigDriverError>,
        /// Creates succeed but no MIG device shows.
        hide_devices: bool,
    }

    impl FakeGpu {
        fn new(index: u32, spec: &GpuSpec) -> Self {
            let memory_slice = spec.framebuffer.get() / 8;
            let profiles = spec
                .mig_profiles
                .iter()
                .map(|p| FakeProfile {
                    name: p.id.clone(),
                    slices: u32::from(p.mig_slices.unwrap()),
                    memory_slices: u32::try_from(p.framebuffer.megabytes().get() / memory_slice)
                        .unwrap(),
                    memory: p.framebuffer.megabytes(),
                    max: u32::from(p.max_instances),
                })
                .collect();
            Self {
                index,
                enabled: true,
                pending: false,
                profiles,
                gpu_instances: BTreeMap::new(),
                next_id: 1,
                fail_gpu_instance: None,
                fail_compute_instance: None,
                hide_devices: false,
            }
        }

        fn remaining(&self, profile: usize) -> u32 {
            let (mut compute, mut memory) = (7u32, 8u32);
            let mut same = 0;
            for (p, _) in self.gpu_instances.values() {
                let q = &self.profiles[*p];
                compute -= q.slices;
                memory -= q.memory_slices;
                same += u32::from(*p == profile);
            }
            let p = &self.profiles[profile];
            (p.max - same)
                .min(compute / p.slices)
                .min(memory / p.memory_slices)
        }

        /// Makes a GPU and compute instance the way an operator would, without the agent.
        fn make(&mut self, profile: &str) -> String {
            let p = self
                .profiles
                .iter()
                .position(|q| q.name == profile)
                .unwrap();
            assert!(self.remaining(p) > 0);
            let id = self.next_id;
            self.next_id += 1;
            let name = format!("MIG-{}", Uuid::new_v4());
            self.gpu_instances.insert(id, (p, Some((0, name.clone()))));
            name
        }
    }

    #[derive(Debug, Clone, Default)]
    struct FakeMig(Arc<Mutex<BTreeMap<GpuId, FakeGpu>>>);

    impl FakeMig {
        fn with(gpu: FakeGpu) -> Self {
            let fake = Self::default();
            fake.0.lock().unwrap().insert(GpuId::new(GPU).unwrap(), gpu);
            fake
        }

        fn gpu<T>(&self, f: impl FnOnce(&mut FakeGpu) -> T) -> T {
            f(self
                .0
                .lock()
                .unwrap()
                .get_mut(&GpuId::new(GPU).unwrap())
                .unwrap())
        }

        fn on<T>(
            &self,
            gpu: &GpuId,
            f: impl FnOnce(&mut FakeGpu) -> Result<T, MigDriverError>,
        ) -> Result<T, MigDriverError> {
            let mut gpus = self.0.lock().unwrap();
            let g = gpus
                .get_mut(gpu)
                .ok_or_else(|| MigDriverError::NotFound(format!("no GPU {gpu}")))?;
            f(g)
        }
    }

    impl MigDevice for FakeMig {
        fn status(&self, gpu: &GpuId) -> Result<MigStatus, MigDriverError> {
            self.on(gpu, |g| {
                Ok(MigStatus {
                    index: g.index,
                    enabled: g.enabled,
                    pending: g.pending,
                })
            })
        }

        fn profiles(&self, gpu: &GpuId) -> Result<Vec<MigProfile>, MigDriverError> {
            self.on(gpu, |g| {
                Ok((0..g.profiles.len())
                    .map(|i| MigProfile {
                        id: MigProfileId(u32::try_from(i).unwrap()),
                        name: g.profiles[i].name.clone(),
                        slices: g.profiles[i].slices,
                        memory: g.profiles[i].memory,
                        available: g.remaining(i),
                    })
                    .collect())
            })
        }

        fn instances(&self, gpu: &GpuId) -> Result<Vec<MigInstance>, MigDriverError> {
            self.on(gpu, |g| {
                if g.hide_devices {
                    return Ok(Vec::new());
                }
                Ok(g.gpu_instances
                    .iter()
                    .filter_map(|(gi, (p, ci))| {
                        let (ci, name) = ci.as_ref()?;
                        Some(MigInstance {
                            gpu_instance: GpuInstanceId(*gi),
                            compute_instance: ComputeInstanceId(*ci),
                            profile: MigProfileId(u32::try_from(*p).unwrap()),
                            uuid: name.clone(),
                        })
                    })
                    .collect())
            })
        }

        fn create_gpu_instance(
            &mut self,
            gpu: &GpuId,
            profile: MigProfileId,
        ) -> Result<GpuInstanceId, MigDriverError> {
            self.on(gpu, |g| {
                if let Some(e) = &g.fail_gpu_instance {
                    return Err(e.clone());
                }
                let p = usize::try_from(profile.0).unwrap();
                if p >= g.profiles.len() {
                    return Err(MigDriverError::NotFound(format!("profile {}", profile.0)));
                }
                if g.remaining(p) == 0 {
                    return Err(MigDriverError::NoCapacity("no slices left".into()));
                }
                let id = g.next_id;
                g.next_id += 1;
                g.gpu_instances.insert(id, (p, None));
                Ok(GpuInstanceId(id))
            })
        }

        fn create_compute_instance(
            &mut self,
            gpu: &GpuId,
            gpu_instance: GpuInstanceId,
        ) -> Result<ComputeInstanceId, MigDriverError> {
            self.on(gpu, |g| {
                if let Some(e) = &g.fail_compute_instance {
                    return Err(e.clone());
                }
                let (_, ci) = g
                    .gpu_instances
                    .get_mut(&gpu_instance.0)
                    .ok_or_else(|| MigDriverError::NotFound("GPU instance".into()))?;
                if ci.is_some() {
                    return Err(MigDriverError::NoCapacity("instance is full".into()));
                }
                *ci = Some((0, format!("MIG-{}", Uuid::new_v4())));
                Ok(ComputeInstanceId(0))
            })
        }

        fn destroy(
            &mut self,
            gpu: &GpuId,
            gpu_instance: GpuInstanceId,
            compute_instance: Option<ComputeInstanceId>,
        ) -> Result<(), MigDriverError> {
            self.on(gpu, |g| {
                let (_, ci) = g
                    .gpu_instances
                    .get_mut(&gpu_instance.0)
                    .ok_or_else(|| MigDriverError::NotFound("GPU instance".into()))?;
                if let (Some(want), Some((have, _))) = (compute_instance, ci.as_ref())
                    && want.0 == *have
                {
                    *ci = None;
                }
                if ci.is_some() {
                    return Err(MigDriverError::Failed("In use by another client".into()));
                }
                g.gpu_instances.remove(&gpu_instance.0);
                Ok(())
            })
        }
    }

    fn handle() -> GpuHandle {
        GpuHandle {
            id: GpuId::new(GPU).unwrap(),
            pci: None,
        }
    }

    fn h100() -> GpuSpec {
        models::h100_80gb("NVIDIA H100 80GB HBM3")
    }

    fn backend(fake: &FakeMig, registry: &Path) -> MigBackend {
        MigBackend::with_device(registry.join("mig"), Box::new(fake.clone()))
    }

    fn registered(registry: &Path) -> usize {
        fs::read_dir(registry.join("mig"))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    #[test]
    fn profiles_are_offered_with_what_the_driver_has_left() {
        let fake = FakeMig::with(FakeGpu::new(0, &h100()));
        let dir = tempfile::tempdir().unwrap();
        let mut b = backend(&fake, dir.path());
        let offered = |b: &MigBackend| -> Vec<(String, u32)> {
            b.types(&handle())
                .unwrap()
                .into_iter()
                .map(|t| (t.name, t.available))
                .collect()
        };
        assert_eq!(
            offered(&b),
            [
                ("1g.10gb".to_owned(), 7),
                ("1g.20gb".to_owned(), 4),
                ("2g.20gb".to_owned(), 3),
                ("3g.40gb".to_owned(), 2),
                ("4g.40gb".to_owned(), 1),
                ("7g.80gb".to_owned(), 1),
            ]
        );
        b.create(&handle(), "NVIDIA 4g.40gb", Uuid::nil()).unwrap();
        // 3 compute and 4 memory slices left.
        assert_eq!(
            offered(&b),
            [
                ("1g.10gb".to_owned(), 3),
                ("1g.20gb".to_owned(), 2),
                ("2g.20gb".to_owned(), 1),
                ("3g.40gb".to_owned(), 1),
                ("4g.40gb".to_owned(), 0),
                ("7g.80gb".to_owned(), 0),
            ]
        );
    }

    #[test]
    fn creates_until_the_driver_runs_out_of_a_profile() {
        let fake = FakeMig::with(FakeGpu::new(0, &h100()));
        let dir = tempfile::tempdir().unwrap();
        let mut b = backend(&fake, dir.path());
        let mut uuids = Vec::new();
        for _ in 0..7 {
            let v = b.create(&handle(), "1g.10gb", Uuid::new_v4()).unwrap();
            assert_eq!(v.type_id, "mig-0");
            assert_eq!(v.gpu, handle().id);
            uuids.push(v.uuid);
        }
        uuids.sort();
        uuids.dedup();
        assert_eq!(uuids.len(), 7, "each MIG device has its own UUID");
        let err = b
            .create(&handle(), "MIG 1g.10gb", Uuid::new_v4())
            .unwrap_err();
        assert!(
            matches!(err, VgpuError::Exhausted { ref type_id, .. } if type_id == "mig-0"),
            "{err}"
        );
        assert_eq!(fake.gpu(|g| g.gpu_instances.len()), 7);
        assert_eq!(registered(dir.path()), 7);
    }

    #[test]
    fn the_drivers_placement_is_tighter_than_the_pools_sums() {
        // A100 40GB: 3 × 2g.10gb and a 1g.5gb fill all 7 compute slices with 10 GB of
        // framebuffer unused, so the pool's own checks would allow another 1g.5gb.
        let fake = FakeMig::with(FakeGpu::new(0, &models::a100_40gb()));
        let dir = tempfile::tempdir().unwrap();
        let mut pool = VgpuPool::new(Box::new(backend(&fake, dir.path())));
        pool.add_gpu(handle(), models::a100_40gb(), GpuMode::Mig)
            .unwrap();
        for _ in 0..3 {
            pool.create(&handle().id, "2g.10gb").unwrap();
        }
        pool.create(&handle().id, "1g.5gb").unwrap();
        let err = pool.create(&handle().id, "1g.5gb").unwrap_err();
        assert!(matches!(err, VgpuError::Exhausted { .. }), "{err}");
        assert_eq!(pool.vgpus(&handle().id).len(), 4);
        assert_eq!(pool.framebuffer_used(&handle().id), Megabytes::from_gb(35));
    }

    #[test]
    fn a_driver_that_refuses_room_it_reported_is_exhausted_not_an_error() {
        let fake = FakeMig::with(FakeGpu::new(0, &h100()));
        fake.gpu(|g| g.fail_gpu_instance = Some(MigDriverError::NoCapacity("placement".into())));
        let dir = tempfile::tempdir().unwrap();
        let err = backend(&fake, dir.path())
            .create(&handle(), "1g.10gb", Uuid::nil())
            .unwrap_err();
        assert!(matches!(err, VgpuError::Exhausted { .. }), "{err}");
    }

    #[test]
    fn a_create_that_fails_in_the_driver_leaves_nothing_behind() {
        let fake = FakeMig::with(FakeGpu::new(0, &h100()));
        let dir = tempfile::tempdir().unwrap();
        let mut b = backend(&fake, dir.path());

        fake.gpu(|g| {
            g.fail_gpu_instance = Some(MigDriverError::Failed("Insufficient Permissions".into()));
        });
        let err = b
            .create(&handle(), "1g.10gb", Uuid::nil())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("creating a MIG GPU instance failed: Insufficient Permissions"),
            "{err}"
        );

        // The GPU instance is made, its compute instance is not: the GPU instance goes again.
        fake.gpu(|g| {
            g.fail_gpu_instance = None;
            g.fail_compute_instance = Some(MigDriverError::Failed("Unknown Error".into()));
        });
        let err = b
            .create(&handle(), "2g.20gb", Uuid::nil())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("creating a MIG compute instance failed: Unknown Error"),
            "{err}"
        );

        // Both are made but no MIG device shows: both go again.
        fake.gpu(|g| {
            g.fail_compute_instance = None;
            g.hide_devices = true;
        });
        let err = b
            .create(&handle(), "3g.40gb", Uuid::nil())
            .unwrap_err()
            .to_string();
        assert!(err.contains("no MIG device appeared"), "{err}");

        assert!(fake.gpu(|g| g.gpu_instances.is_empty()));
        assert_eq!(registered(dir.path()), 0);
    }

    #[test]
    fn a_device_named_in_the_old_form_is_taken_back() {
        let fake = FakeMig::with(FakeGpu::new(0, &h100()));
        let dir = tempfile::tempdir().unwrap();
        // Names every device as a driver from before `MIG-<uuid>` names would.
        struct OldNames(FakeMig);
        impl MigDevice for OldNames {
            fn status(&self, gpu: &GpuId) -> Result<MigStatus, MigDriverError> {
                self.0.status(gpu)
            }
            fn profiles(&self, gpu: &GpuId) -> Result<Vec<MigProfile>, MigDriverError> {
                self.0.profiles(gpu)
            }
            fn instances(&self, gpu: &GpuId) -> Result<Vec<MigInstance>, MigDriverError> {
                let mut all = self.0.instances(gpu)?;
                for i in &mut all {
                    i.uuid = format!("MIG-{GPU}/{}/{}", i.gpu_instance.0, i.compute_instance.0);
                }
                Ok(all)
            }
            fn create_gpu_instance(
                &mut self,
                gpu: &GpuId,
                profile: MigProfileId,
            ) -> Result<GpuInstanceId, MigDriverError> {
                self.0.create_gpu_instance(gpu, profile)
            }
            fn create_compute_instance(
                &mut self,
                gpu: &GpuId,
                gpu_instance: GpuInstanceId,
            ) -> Result<ComputeInstanceId, MigDriverError> {
                self.0.create_compute_instance(gpu, gpu_instance)
            }
            fn destroy(
                &mut self,
                gpu: &GpuId,
                gpu_instance: GpuInstanceId,
                compute_instance: Option<ComputeInstanceId>,
            ) -> Result<(), MigDriverError> {
                self.0.destroy(gpu, gpu_instance, compute_instance)
            }
        }
        let mut b =
            MigBackend::with_device(dir.path().join("mig"), Box::new(OldNames(fake.clone())));
        let err = b
            .create(&handle(), "1g.10gb", Uuid::nil())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("only `MIG-<uuid>` names are supported"),
            "{err}"
        );
        assert!(fake.gpu(|g| g.gpu_instances.is_empty()));
    }

    #[test]
    fn a_restarted_agent_adopts_only_its_own_instances() {
        let fake = FakeMig::with(FakeGpu::new(0, &h100()));
        let dir = tempfile::tempdir().unwrap();
        let created = {
            let mut pool = VgpuPool::new(Box::new(backend(&fake, dir.path())));
            pool.add_gpu(handle(), h100(), GpuMode::Mig).unwrap();
            [
                pool.create(&handle().id, "1g.10gb").unwrap(),
                pool.create(&handle().id, "2g.20gb").unwrap(),
            ]
        };
        // An operator's own MIG device on the same GPU, made without the agent.
        let foreign = mig_uuid(&fake.gpu(|g| g.make("1g.10gb"))).unwrap();

        let mut pool = VgpuPool::new(Box::new(backend(&fake, dir.path())));
        assert_eq!(
            pool.add_gpu(handle(), h100(), GpuMode::Mig).unwrap(),
            2,
            "only the agent's own"
        );
        let mut found: Vec<(Uuid, String)> = pool
            .vgpus_with_profile(&handle().id)
            .into_iter()
            .map(|(v, p)| (v.uuid, p))
            .collect();
        found.sort();
        let mut expected = vec![
            (created[0].uuid, "1g.10gb".to_owned()),
            (created[1].uuid, "2g.20gb".to_owned()),
        ];
        expected.sort();
        assert_eq!(found, expected);
        assert!(!found.iter().any(|(u, _)| *u == foreign));
        // 1 + 2 + the operator's 1 compute slices are taken: 3 more 1g.10gb fit, not 5.
        for _ in 0..3 {
            pool.create(&handle().id, "1g.10gb").unwrap();
        }
        assert!(pool.create(&handle().id, "1g.10gb").is_err());
    }

    #[test]
    fn remove_destroys_the_instance_and_forgets_it() {
        let fake = FakeMig::with(FakeGpu::new(0, &h100()));
        let dir = tempfile::tempdir().unwrap();
        let mut b = backend(&fake, dir.path());
        let v = b.create(&handle(), "3g.40gb", Uuid::nil()).unwrap();
        assert_eq!(registered(dir.path()), 1);
        b.remove(&handle(), &v).unwrap();
        assert!(fake.gpu(|g| g.gpu_instances.is_empty()));
        assert_eq!(registered(dir.path()), 0);
        assert!(matches!(
            b.remove(&handle(), &v),
            Err(VgpuError::NotFound(u)) if u == v.uuid
        ));
        // The room is back.
        b.create(&handle(), "3g.40gb", Uuid::nil()).unwrap();
        b.create(&handle(), "3g.40gb", Uuid::nil()).unwrap();
    }

    #[test]
    fn an_instance_removed_behind_the_agents_back_leaves_the_books() {
        let fake = FakeMig::with(FakeGpu::new(0, &h100()));
        let dir = tempfile::tempdir().unwrap();
        let mut pool = VgpuPool::new(Box::new(backend(&fake, dir.path())));
        pool.add_gpu(handle(), h100(), GpuMode::Mig).unwrap();
        let v = pool.create(&handle().id, "1g.20gb").unwrap();
        fake.gpu(|g| g.gpu_instances.clear());
        pool.remove(&handle().id, v.uuid).unwrap();
        assert!(pool.vgpus(&handle().id).is_empty());
        assert_eq!(registered(dir.path()), 0);
    }

    #[test]
    fn an_instance_the_agent_did_not_make_is_never_destroyed() {
        let fake = FakeMig::with(FakeGpu::new(0, &h100()));
        let dir = tempfile::tempdir().unwrap();
        let mut b = backend(&fake, dir.path());
        let foreign = mig_uuid(&fake.gpu(|g| g.make("7g.80gb"))).unwrap();
        let v = Vgpu {
            uuid: foreign,
            gpu: handle().id,
            type_id: "mig-5".into(),
        };
        let err = b.remove(&handle(), &v).unwrap_err().to_string();
        assert!(err.contains("was not created by this agent"), "{err}");
        assert_eq!(fake.gpu(|g| g.gpu_instances.len()), 1);
    }

    #[test]
    fn a_gpu_with_mig_off_is_refused_with_the_command_that_turns_it_on() {
        let mut gpu = FakeGpu::new(3, &h100());
        gpu.enabled = false;
        let fake = FakeMig::with(gpu);
        let dir = tempfile::tempdir().unwrap();
        let mut b = backend(&fake, dir.path());
        for err in [
            b.types(&handle()).unwrap_err(),
            b.existing(&handle()).unwrap_err(),
            b.create(&handle(), "1g.10gb", Uuid::nil()).unwrap_err(),
        ] {
            let err = err.to_string();
            assert!(
                err.contains("MIG mode is not enabled on GPU 3")
                    && err.contains("`nvidia-smi -i 3 -mig 1`"),
                "{err}"
            );
        }
        let mut pool = VgpuPool::new(Box::new(backend(&fake, dir.path())));
        assert!(pool.add_gpu(handle(), h100(), GpuMode::Mig).is_err());

        fake.gpu(|g| g.pending = true);
        let err = b.types(&handle()).unwrap_err().to_string();
        assert!(err.contains("`nvidia-smi -i 3 -r`"), "{err}");
        assert!(fake.gpu(|g| g.gpu_instances.is_empty()));
    }

    #[test]
    fn unknown_profiles_and_gpus_are_errors() {
        let fake = FakeMig::with(FakeGpu::new(0, &h100()));
        let dir = tempfile::tempdir().unwrap();
        let mut b = backend(&fake, dir.path());
        assert!(matches!(
            b.create(&handle(), "1g.5gb", Uuid::nil()),
            Err(VgpuError::UnknownType { .. })
        ));
        let other = GpuHandle {
            id: GpuId::new("GPU-other").unwrap(),
            pci: None,
        };
        let err = b.types(&other).unwrap_err().to_string();
        assert!(err.contains("reading MIG mode failed: not found"), "{err}");
    }

    #[test]
    fn names_and_uuids_are_read_in_every_spelling() {
        for name in ["1g.10gb", "MIG 1g.10gb", "NVIDIA 1g.10gb", " 1g.10gb\n"] {
            assert_eq!(mig_profile_name(name), "1g.10gb", "{name:?}");
        }
        let uuid = Uuid::new_v4();
        assert_eq!(mig_uuid(&visible_device(uuid)), Some(uuid));
        assert_eq!(mig_uuid(&format!("MIG-GPU-{uuid}/1/0")), None);
        assert_eq!(mig_uuid(&format!("GPU-{uuid}")), None);
        assert_eq!(mig_uuid(&format!("MIG-{{{uuid}}}")), None);
        assert_eq!(mig_uuid("MIG-"), None);
    }

    /// On this project's GPU-less CI, `open` fails with a message instead of panicking; on a
    /// host with the driver it opens, and a GPU that is not there is an error too.
    #[test]
    fn open_without_a_driver_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        match open(dir.path().join("mig")) {
            Err(e) => {
                let msg = e.to_string();
                assert!(
                    msg.contains("libnvidia-ml.so.1") && !e.reason.is_empty(),
                    "{msg}"
                );
            }
            Ok(b) => {
                assert_eq!(b.kind(), "mig");
                let missing = GpuHandle {
                    id: GpuId::new("GPU-00000000-0000-0000-0000-000000000000").unwrap(),
                    pci: None,
                };
                assert!(b.types(&missing).is_err());
            }
        }
    }
}
