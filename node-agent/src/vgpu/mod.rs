//! Creating and removing vGPUs, behind one trait.
//!
//! - [`simulated::SimulatedBackend`]: bookkeeping only, for simulated inventories;
//! - [`mdev::MdevBackend`]: Linux mediated devices through sysfs
//!   (`/sys/class/mdev_bus/<pci>/mdev_supported_types/<type>/create`);
//! - [`mig::MigBackend`]: MIG GPU and compute instances (`1g.10gb`) on A100/H100-class GPUs,
//!   through NVML;
//! - [`plan`]: pre-allocation that brings the pool to the broker's `PoolPlan`.
//!
//! [`VgpuPool`] sits in front of a backend and enforces the GPU model's limits whatever the
//! backend would allow: never more vGPUs than the model's `max_vgpus` or the profile's
//! instance limit, never more framebuffer than the GPU has, and one profile per GPU in
//! equal-size mode.

pub mod mdev;
pub mod mig;
pub mod plan;
pub mod simulated;

use std::collections::BTreeMap;

use uuid::Uuid;

use framecast_shared::gpu::{GpuMode, GpuSpec, VgpuProfile};
use framecast_shared::ids::GpuId;
use framecast_shared::units::Megabytes;

/// A GPU as a backend addresses it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuHandle {
    /// The GPU.
    pub id: GpuId,
    /// Its PCI address in sysfs form (`0000:3b:00.0`), where known.
    pub pci: Option<String>,
}

/// A vGPU type a backend offers on a GPU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VgpuType {
    /// The backend's id for it (`nvidia-558` under mdev).
    pub id: String,
    /// Its name (`NVIDIA L4-4Q`).
    pub name: String,
    /// How many more instances the driver would create now.
    pub available: u32,
}

/// One vGPU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vgpu {
    /// Its UUID.
    pub uuid: Uuid,
    /// Its GPU.
    pub gpu: GpuId,
    /// The backend's type id.
    pub type_id: String,
}

/// Why a vGPU could not be created or removed.
#[derive(Debug, thiserror::Error)]
pub enum VgpuError {
    /// The backend offers no type of that name on the GPU.
    #[error("{gpu}: no vGPU type named {name:?}")]
    UnknownType {
        /// The GPU.
        gpu: GpuId,
        /// The name asked for.
        name: String,
    },
    /// The type has no instances left.
    #[error("{gpu}: vGPU type {type_id} has no instances left")]
    Exhausted {
        /// The GPU.
        gpu: GpuId,
        /// The type.
        type_id: String,
    },
    /// Creating would break one of the model's limits.
    #[error("{gpu}: {rule}")]
    Limit {
        /// The GPU.
        gpu: GpuId,
        /// The limit, in words.
        rule: String,
    },
    /// The GPU has no PCI address, which the backend needs.
    #[error("{0}: no PCI address known")]
    NoPci(GpuId),
    /// The kernel refused or did not do what was asked.
    #[error("{gpu}: {op} failed: {detail}")]
    Io {
        /// The GPU.
        gpu: GpuId,
        /// What was attempted.
        op: &'static str,
        /// What happened.
        detail: String,
    },
    /// No such vGPU.
    #[error("no vGPU {0}")]
    NotFound(Uuid),
}

/// Creates and removes vGPUs on one host.
pub trait VgpuBackend: Send {
    /// `simulated` or `mdev`.
    fn kind(&self) -> &'static str;

    /// The types the driver offers on `gpu`.
    fn types(&self, gpu: &GpuHandle) -> Result<Vec<VgpuType>, VgpuError>;

    /// The vGPUs that exist on `gpu` (after an agent restart, the ones it created before).
    fn existing(&self, gpu: &GpuHandle) -> Result<Vec<Vgpu>, VgpuError>;

    /// Creates a vGPU of the type named `name` (`NVIDIA L4-4Q`) with `uuid`.
    fn create(&mut self, gpu: &GpuHandle, name: &str, uuid: Uuid) -> Result<Vgpu, VgpuError>;

    /// Removes a vGPU.
    fn remove(&mut self, gpu: &GpuHandle, vgpu: &Vgpu) -> Result<(), VgpuError>;
}

/// The vGPUs of one host, within each GPU model's limits.
pub struct VgpuPool {
    backend: Box<dyn VgpuBackend>,
    gpus: BTreeMap<GpuId, PoolGpu>,
}

impl std::fmt::Debug for VgpuPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VgpuPool")
            .field("backend", &self.backend.kind())
            .field("gpus", &self.gpus.len())
            .finish()
    }
}

#[derive(Debug)]
struct PoolGpu {
    handle: GpuHandle,
    spec: GpuSpec,
    mode: GpuMode,
    /// vGPUs by UUID, with their profile.
    vgpus: BTreeMap<Uuid, (Vgpu, VgpuProfile)>,
}

impl VgpuPool {
    /// A pool over `backend`, empty until GPUs are added.
    pub fn new(backend: Box<dyn VgpuBackend>) -> Self {
        Self {
            backend,
            gpus: BTreeMap::new(),
        }
    }

    /// The backend's kind: `simulated`, `mdev` or `mig`.
    pub fn backend_kind(&self) -> &'static str {
        self.backend.kind()
    }

    /// Adds a GPU and adopts the vGPUs it already has whose type names a profile of its model.
    pub fn add_gpu(
        &mut self,
        handle: GpuHandle,
        spec: GpuSpec,
        mode: GpuMode,
    ) -> Result<usize, VgpuError> {
        let existing = self.backend.existing(&handle)?;
        let types = self.backend.types(&handle)?;
        let mut vgpus = BTreeMap::new();
        for v in existing {
            let name = types
                .iter()
                .find(|t| t.id == v.type_id)
                .map(|t| t.name.clone())
                .unwrap_or_default();
            if let Some(p) = profile_named(&spec, mode, &name) {
                vgpus.insert(v.uuid, (v, p.clone()));
            }
        }
        let adopted = vgpus.len();
        self.gpus.insert(
            handle.id.clone(),
            PoolGpu {
                handle,
                spec,
                mode,
                vgpus,
            },
        );
        Ok(adopted)
    }

    /// Creates a vGPU of `profile` on `gpu`, unless the model's limits forbid it.
    pub fn create(&mut self, gpu: &GpuId, profile: &str) -> Result<Vgpu, VgpuError> {
        let g = self.gpus.get(gpu).ok_or_else(|| VgpuError::Limit {
            gpu: gpu.clone(),
            rule: "not in the pool".into(),
        })?;
        let p = profile_named(&g.spec, g.mode, profile)
            .ok_or_else(|| VgpuError::UnknownType {
                gpu: gpu.clone(),
                name: profile.into(),
            })?
            .clone();
        check_limits(g, &p)?;
        let vgpu = self
            .backend
            .create(&g.handle, &backend_type_name(&p), Uuid::new_v4())?;
        if let Some(g) = self.gpus.get_mut(gpu) {
            g.vgpus.insert(vgpu.uuid, (vgpu.clone(), p));
        }
        Ok(vgpu)
    }

    /// Removes a vGPU the pool created or adopted. One that is already gone (removed behind
    /// the agent's back) leaves the books too.
    pub fn remove(&mut self, gpu: &GpuId, uuid: Uuid) -> Result<(), VgpuError> {
        let g = self.gpus.get_mut(gpu).ok_or(VgpuError::NotFound(uuid))?;
        let (vgpu, _) = g.vgpus.get(&uuid).ok_or(VgpuError::NotFound(uuid))?;
        match self.backend.remove(&g.handle, vgpu) {
            Ok(()) => {}
            Err(VgpuError::NotFound(_)) => tracing::warn!(%gpu, %uuid, "vGPU was already gone"),
            Err(e) => return Err(e),
        }
        g.vgpus.remove(&uuid);
        Ok(())
    }

    /// Whether `gpu` is in the pool.
    pub fn has_gpu(&self, gpu: &GpuId) -> bool {
        self.gpus.contains_key(gpu)
    }

    /// vGPUs on `gpu` with the id of their profile (`L4-4Q`).
    pub fn vgpus_with_profile(&self, gpu: &GpuId) -> Vec<(Vgpu, String)> {
        self.gpus
            .get(gpu)
            .map(|g| {
                g.vgpus
                    .values()
                    .map(|(v, p)| (v.clone(), p.id.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// vGPUs on `gpu`.
    pub fn vgpus(&self, gpu: &GpuId) -> Vec<Vgpu> {
        self.gpus
            .get(gpu)
            .map(|g| g.vgpus.values().map(|(v, _)| v.clone()).collect())
            .unwrap_or_default()
    }

    /// Framebuffer held by vGPUs on `gpu`.
    pub fn framebuffer_used(&self, gpu: &GpuId) -> Megabytes {
        self.gpus
            .get(gpu)
            .map(|g| {
                g.vgpus.values().fold(Megabytes::ZERO, |acc, (_, p)| {
                    acc + p.framebuffer.megabytes()
                })
            })
            .unwrap_or(Megabytes::ZERO)
    }
}

/// The profile of `spec` in `mode` that a driver's type name (`NVIDIA L4-4Q`, `GRID T4-1Q`, or
/// the bare `L4-4Q`) names.
fn profile_named<'a>(spec: &'a GpuSpec, mode: GpuMode, name: &str) -> Option<&'a VgpuProfile> {
    spec.profiles(mode)
        .iter()
        .find(|p| bare_type_name(&p.id) == bare_type_name(name))
}

/// A vGPU type name without the vendor prefix drivers put on it: `NVIDIA L4-4Q` and
/// `GRID T4-1Q` become `L4-4Q` and `T4-1Q`.
pub fn bare_type_name(name: &str) -> &str {
    let name = name.trim();
    name.strip_prefix("NVIDIA ")
        .or_else(|| name.strip_prefix("GRID "))
        .unwrap_or(name)
}

/// The name the driver gives the profile's type (`NVIDIA L4-4Q`).
fn backend_type_name(p: &VgpuProfile) -> String {
    format!("NVIDIA {}", p.id)
}

fn check_limits(g: &PoolGpu, p: &VgpuProfile) -> Result<(), VgpuError> {
    let fail = |rule: String| {
        Err(VgpuError::Limit {
            gpu: g.handle.id.clone(),
            rule,
        })
    };
    let count = g.vgpus.len();
    if count >= usize::from(g.spec.max_vgpus) {
        return fail(format!(
            "already {count} vGPUs; {} allows {}",
            g.spec.model, g.spec.max_vgpus
        ));
    }
    let same = g.vgpus.values().filter(|(_, q)| q.id == p.id).count();
    let limit = match g.mode {
        GpuMode::MixedSize => p.max_instances_mixed.unwrap_or(0),
        _ => p.max_instances,
    };
    if same >= usize::from(limit) {
        return fail(format!(
            "already {same} × {}; the profile allows {limit} in {} mode",
            p.id, g.mode
        ));
    }
    if g.mode == GpuMode::EqualSize
        && let Some((_, other)) = g.vgpus.values().find(|(_, q)| q.id != p.id)
    {
        return fail(format!(
            "equal-size GPU holds {}; it takes {} only when empty",
            other.id, p.id
        ));
    }
    let used = g.vgpus.values().fold(Megabytes::ZERO, |acc, (_, q)| {
        acc + q.framebuffer.megabytes()
    });
    if used + p.framebuffer.megabytes() > g.spec.framebuffer {
        return fail(format!(
            "{} + {} would exceed the GPU's {}",
            used, p.framebuffer, g.spec.framebuffer
        ));
    }
    Ok(())
}

/// NVML's PCI bus id (`00000000:3B:00.0`) in sysfs form (`0000:3b:00.0`).
pub fn sysfs_pci(nvml_bus_id: &str) -> Option<String> {
    let (domain, rest) = nvml_bus_id.split_once(':')?;
    let domain = u32::from_str_radix(domain, 16).ok()?;
    Some(format!("{domain:04x}:{}", rest.to_ascii_lowercase()))
}

#[cfg(test)]
mod tests {
    use framecast_shared::gpu::models;

    use super::*;

    fn pool(mode: GpuMode) -> (VgpuPool, GpuId) {
        let mut pool = VgpuPool::new(Box::new(simulated::SimulatedBackend::default()));
        let id = GpuId::new("sim-0").unwrap();
        pool.add_gpu(
            GpuHandle {
                id: id.clone(),
                pci: None,
            },
            models::l4(),
            mode,
        )
        .unwrap();
        (pool, id)
    }

    #[test]
    fn equal_size_gpus_hold_one_profile_up_to_its_limit() {
        let (mut pool, gpu) = pool(GpuMode::EqualSize);
        for _ in 0..3 {
            pool.create(&gpu, "L4-8Q").unwrap();
        }
        let err = pool.create(&gpu, "L4-8Q").unwrap_err().to_string();
        assert!(
            err.contains("already 3 vGPUs") || err.contains("allows 3"),
            "{err}"
        );
        let err = pool.create(&gpu, "L4-2Q").unwrap_err().to_string();
        assert!(
            err.contains("only when empty") || err.contains("exceed"),
            "{err}"
        );
        assert_eq!(pool.framebuffer_used(&gpu), Megabytes::from_gb(24));
        for v in pool.vgpus(&gpu) {
            pool.remove(&gpu, v.uuid).unwrap();
        }
        pool.create(&gpu, "L4-2Q").unwrap();
    }

    #[test]
    fn mixed_size_gpus_mix_profiles_within_framebuffer_and_mixed_limits() {
        let (mut pool, gpu) = pool(GpuMode::MixedSize);
        pool.create(&gpu, "L4-8Q").unwrap();
        pool.create(&gpu, "L4-8Q").unwrap();
        let err = pool.create(&gpu, "L4-8Q").unwrap_err().to_string();
        assert!(err.contains("allows 2 in mixed-size mode"), "{err}");
        for _ in 0..4 {
            pool.create(&gpu, "NVIDIA L4-2Q").unwrap();
        }
        let err = pool.create(&gpu, "L4-2Q").unwrap_err().to_string();
        assert!(err.contains("exceed the GPU's 24576 MB"), "{err}");
    }

    #[test]
    fn an_equal_size_gpu_takes_a_second_profile_only_when_empty() {
        let (mut pool, gpu) = pool(GpuMode::EqualSize);
        let v = pool.create(&gpu, "L4-4Q").unwrap();
        // 4 GB + 2 GB would fit the framebuffer: only the one-profile rule refuses it.
        let err = pool.create(&gpu, "L4-2Q").unwrap_err().to_string();
        assert!(
            err.contains("equal-size GPU holds L4-4Q; it takes L4-2Q only when empty"),
            "{err}"
        );
        pool.remove(&gpu, v.uuid).unwrap();
        pool.create(&gpu, "L4-2Q").unwrap();
    }

    #[test]
    fn unknown_profiles_and_gpus_are_errors() {
        let (mut pool, gpu) = pool(GpuMode::EqualSize);
        assert!(matches!(
            pool.create(&gpu, "L4-5Q"),
            Err(VgpuError::UnknownType { .. })
        ));
        assert!(pool.create(&GpuId::new("other").unwrap(), "L4-2Q").is_err());
        assert!(matches!(
            pool.remove(&gpu, Uuid::nil()),
            Err(VgpuError::NotFound(_))
        ));
    }

    #[test]
    fn pci_ids_convert_to_sysfs_form() {
        assert_eq!(
            sysfs_pci("00000000:3B:00.0").as_deref(),
            Some("0000:3b:00.0")
        );
        assert_eq!(
            sysfs_pci("00000001:AF:00.1").as_deref(),
            Some("0001:af:00.1")
        );
        assert_eq!(sysfs_pci("garbage"), None);
    }
}
