//! vGPUs as Linux mediated devices, through sysfs.
//!
//! ```text
//! <root>/class/mdev_bus/<pci>/mdev_supported_types/<type>/name                 "NVIDIA L4-4Q"
//!                                                       /available_instances  "6"
//!                                                       /create               write a UUID
//!                                                       /devices/<uuid>       one per device
//! <root>/bus/mdev/devices/<uuid>/remove                                       write "1"
//! ```
//!
//! All file access goes through [`Sysfs`], so tests can put a fake kernel behind the same
//! code; [`RealSysfs`] is plain file I/O.

use std::io::{self, Write};
use std::path::{Path, PathBuf};

use uuid::Uuid;

use super::{GpuHandle, Vgpu, VgpuBackend, VgpuError, VgpuType, bare_type_name};

/// File operations on a sysfs tree.
pub trait Sysfs: Send + Sync {
    /// Reads a whole attribute file.
    fn read(&self, path: &Path) -> io::Result<String>;
    /// Writes an attribute file (sysfs writes are one `write` call).
    fn write(&self, path: &Path, data: &str) -> io::Result<()>;
    /// Whether the path exists.
    fn exists(&self, path: &Path) -> bool;
    /// Names of the entries of a directory.
    fn list(&self, path: &Path) -> io::Result<Vec<String>>;
}

/// The real file system.
#[derive(Debug, Default, Clone, Copy)]
pub struct RealSysfs;

impl Sysfs for RealSysfs {
    fn read(&self, path: &Path) -> io::Result<String> {
        std::fs::read_to_string(path)
    }

    fn write(&self, path: &Path, data: &str) -> io::Result<()> {
        let mut f = std::fs::OpenOptions::new().write(true).open(path)?;
        f.write_all(data.as_bytes())
    }

    fn exists(&self, path: &Path) -> bool {
        path.exists()
    }

    fn list(&self, path: &Path) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(path)? {
            names.push(entry?.file_name().to_string_lossy().into_owned());
        }
        names.sort();
        Ok(names)
    }
}

/// The mdev backend. It adopts, and a pool plan may remove, only the vGPUs it created itself:
/// their UUIDs are recorded in a registry directory (in the agent's data directory), so mdevs an
/// operator made for other uses on the same GPU are left alone.
pub struct MdevBackend {
    root: PathBuf,
    registry: PathBuf,
    fs: Box<dyn Sysfs>,
}

impl std::fmt::Debug for MdevBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MdevBackend")
            .field("root", &self.root)
            .finish_non_exhaustive()
    }
}

impl MdevBackend {
    /// A backend on the real sysfs mounted at `root` (`/sys`), recording its vGPUs in
    /// `registry`.
    pub fn new(root: impl Into<PathBuf>, registry: impl Into<PathBuf>) -> Self {
        Self::with_fs(root, registry, Box::new(RealSysfs))
    }

    /// A backend whose sysfs access goes through `fs`.
    pub fn with_fs(
        root: impl Into<PathBuf>,
        registry: impl Into<PathBuf>,
        fs: Box<dyn Sysfs>,
    ) -> Self {
        Self {
            root: root.into(),
            registry: registry.into(),
            fs,
        }
    }

    fn record(&self, uuid: Uuid, type_id: &str) -> io::Result<()> {
        std::fs::create_dir_all(&self.registry)?;
        std::fs::write(self.registry.join(uuid.hyphenated().to_string()), type_id)
    }

    fn recorded(&self, uuid: Uuid) -> bool {
        self.registry.join(uuid.hyphenated().to_string()).is_file()
    }

    fn forget(&self, uuid: Uuid) {
        let _ = std::fs::remove_file(self.registry.join(uuid.hyphenated().to_string()));
    }

    fn types_dir(&self, gpu: &GpuHandle) -> Result<PathBuf, VgpuError> {
        let pci = gpu
            .pci
            .as_deref()
            .ok_or_else(|| VgpuError::NoPci(gpu.id.clone()))?;
        Ok(self
            .root
            .join("class/mdev_bus")
            .join(pci)
            .join("mdev_supported_types"))
    }

    fn device_dir(&self, uuid: Uuid) -> PathBuf {
        self.root
            .join("bus/mdev/devices")
            .join(uuid.hyphenated().to_string())
    }

    fn io(gpu: &GpuHandle, op: &'static str, detail: impl ToString) -> VgpuError {
        VgpuError::Io {
            gpu: gpu.id.clone(),
            op,
            detail: detail.to_string(),
        }
    }
}

impl VgpuBackend for MdevBackend {
    fn kind(&self) -> &'static str {
        "mdev"
    }

    fn types(&self, gpu: &GpuHandle) -> Result<Vec<VgpuType>, VgpuError> {
        let dir = self.types_dir(gpu)?;
        let ids = self
            .fs
            .list(&dir)
            .map_err(|e| Self::io(gpu, "listing mdev types", format!("{}: {e}", dir.display())))?;
        ids.into_iter()
            .map(|id| {
                let t = dir.join(&id);
                let name = self
                    .fs
                    .read(&t.join("name"))
                    .map_err(|e| Self::io(gpu, "reading a type name", e))?;
                let available = self
                    .fs
                    .read(&t.join("available_instances"))
                    .map_err(|e| Self::io(gpu, "reading available_instances", e))?;
                let available = available.trim().parse().map_err(|e| {
                    Self::io(
                        gpu,
                        "reading available_instances",
                        format!("{available:?}: {e}"),
                    )
                })?;
                Ok(VgpuType {
                    id,
                    name: name.trim().to_owned(),
                    available,
                })
            })
            .collect()
    }

    fn existing(&self, gpu: &GpuHandle) -> Result<Vec<Vgpu>, VgpuError> {
        let dir = self.types_dir(gpu)?;
        let mut out = Vec::new();
        for t in self.types(gpu)? {
            let devices = self
                .fs
                .list(&dir.join(&t.id).join("devices"))
                .unwrap_or_default();
            out.extend(
                devices
                    .iter()
                    .filter_map(|d| Uuid::parse_str(d).ok())
                    .filter(|u| self.recorded(*u))
                    .map(|uuid| Vgpu {
                        uuid,
                        gpu: gpu.id.clone(),
                        type_id: t.id.clone(),
                    }),
            );
        }
        Ok(out)
    }

    fn create(&mut self, gpu: &GpuHandle, name: &str, uuid: Uuid) -> Result<Vgpu, VgpuError> {
        let t = self
            .types(gpu)?
            .into_iter()
            .find(|t| bare_type_name(&t.name) == bare_type_name(name))
            .ok_or_else(|| VgpuError::UnknownType {
                gpu: gpu.id.clone(),
                name: name.to_owned(),
            })?;
        if t.available == 0 {
            return Err(VgpuError::Exhausted {
                gpu: gpu.id.clone(),
                type_id: t.id,
            });
        }
        let create = self.types_dir(gpu)?.join(&t.id).join("create");
        self.fs
            .write(&create, &uuid.hyphenated().to_string())
            .map_err(|e| Self::io(gpu, "create", e))?;
        if !self.fs.exists(&self.device_dir(uuid)) {
            return Err(Self::io(
                gpu,
                "create",
                format!("the kernel accepted {uuid} but no device appeared"),
            ));
        }
        if let Err(e) = self.record(uuid, &t.id) {
            // Unrecorded, it would be orphaned at the next restart: take it back now.
            let _ = self.fs.write(&self.device_dir(uuid).join("remove"), "1");
            return Err(Self::io(gpu, "recording the vGPU", e));
        }
        tracing::info!(gpu = %gpu.id, %uuid, type_id = %t.id, "created mdev vGPU");
        Ok(Vgpu {
            uuid,
            gpu: gpu.id.clone(),
            type_id: t.id,
        })
    }

    fn remove(&mut self, gpu: &GpuHandle, vgpu: &Vgpu) -> Result<(), VgpuError> {
        let dir = self.device_dir(vgpu.uuid);
        if !self.fs.exists(&dir) {
            self.forget(vgpu.uuid);
            return Err(VgpuError::NotFound(vgpu.uuid));
        }
        self.fs
            .write(&dir.join("remove"), "1")
            .map_err(|e| Self::io(gpu, "remove", e))?;
        if self.fs.exists(&dir) {
            return Err(Self::io(
                gpu,
                "remove",
                format!("{} is still there", vgpu.uuid),
            ));
        }
        tracing::info!(gpu = %gpu.id, uuid = %vgpu.uuid, "removed mdev vGPU");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::fs;

    use framecast_shared::gpu::{GpuMode, models};
    use framecast_shared::ids::GpuId;

    use super::*;
    use crate::vgpu::VgpuPool;

    const PCI: &str = "0000:3b:00.0";

    /// A kernel stand-in: real files in a temp dir, plus what the mdev core does when `create`
    /// or `remove` is written. Types named in `failing` refuse every create.
    struct FakeKernel {
        root: PathBuf,
        failing: Vec<&'static str>,
    }

    impl Sysfs for FakeKernel {
        fn read(&self, path: &Path) -> io::Result<String> {
            RealSysfs.read(path)
        }

        fn write(&self, path: &Path, data: &str) -> io::Result<()> {
            let file = path
                .file_name()
                .and_then(|f| f.to_str())
                .unwrap_or_default();
            let dir = path.parent().unwrap_or(path);
            match file {
                "create" => {
                    let type_id = dir.file_name().and_then(|f| f.to_str()).unwrap_or_default();
                    if self.failing.contains(&type_id) {
                        return Err(io::Error::from_raw_os_error(22)); // EINVAL
                    }
                    let uuid = Uuid::parse_str(data.trim()).map_err(io::Error::other)?;
                    let available: u32 = RealSysfs
                        .read(&dir.join("available_instances"))?
                        .trim()
                        .parse()
                        .map_err(io::Error::other)?;
                    if available == 0 {
                        return Err(io::Error::from_raw_os_error(28)); // ENOSPC
                    }
                    let dev = self.root.join("bus/mdev/devices").join(uuid.to_string());
                    fs::create_dir_all(&dev)?;
                    fs::write(dev.join("remove"), "")?;
                    fs::write(dev.join("mdev_type"), dir.to_string_lossy().as_bytes())?;
                    fs::create_dir_all(dir.join("devices").join(uuid.to_string()))?;
                    fs::write(
                        dir.join("available_instances"),
                        format!("{}\n", available - 1),
                    )
                }
                "remove" => {
                    let type_dir = PathBuf::from(RealSysfs.read(&dir.join("mdev_type"))?);
                    let uuid = dir.file_name().map(|f| f.to_owned()).unwrap_or_default();
                    fs::remove_dir_all(dir)?;
                    fs::remove_dir_all(type_dir.join("devices").join(&uuid))?;
                    let available: u32 = RealSysfs
                        .read(&type_dir.join("available_instances"))?
                        .trim()
                        .parse()
                        .map_err(io::Error::other)?;
                    fs::write(
                        type_dir.join("available_instances"),
                        format!("{}\n", available + 1),
                    )
                }
                _ => RealSysfs.write(path, data),
            }
        }

        fn exists(&self, path: &Path) -> bool {
            RealSysfs.exists(path)
        }

        fn list(&self, path: &Path) -> io::Result<Vec<String>> {
            RealSysfs.list(path)
        }
    }

    /// A tree with three L4 types: 4Q with room, 2Q used up, 8Q whose creates fail.
    fn tree() -> tempfile::TempDir {
        let root = tempfile::tempdir().unwrap();
        let types = root
            .path()
            .join("class/mdev_bus")
            .join(PCI)
            .join("mdev_supported_types");
        for (id, name, available) in [
            ("nvidia-558", "NVIDIA L4-4Q", 20),
            ("nvidia-557", "NVIDIA L4-2Q", 0),
            ("nvidia-560", "NVIDIA L4-8Q", 3),
        ] {
            let t = types.join(id);
            fs::create_dir_all(t.join("devices")).unwrap();
            fs::write(t.join("name"), format!("{name}\n")).unwrap();
            fs::write(t.join("available_instances"), format!("{available}\n")).unwrap();
            fs::write(t.join("create"), "").unwrap();
        }
        fs::create_dir_all(root.path().join("bus/mdev/devices")).unwrap();
        root
    }

    fn gpu() -> GpuHandle {
        GpuHandle {
            id: GpuId::new("GPU-test").unwrap(),
            pci: Some(PCI.into()),
        }
    }

    fn backend(root: &Path) -> MdevBackend {
        let kernel = FakeKernel {
            root: root.to_owned(),
            failing: vec!["nvidia-560"],
        };
        MdevBackend::with_fs(root, root.join("agent-data/vgpus"), Box::new(kernel))
    }

    #[test]
    fn types_are_read_with_their_availability() {
        let root = tree();
        let types = backend(root.path()).types(&gpu()).unwrap();
        let summary: Vec<(&str, &str, u32)> = types
            .iter()
            .map(|t| (t.id.as_str(), t.name.as_str(), t.available))
            .collect();
        assert_eq!(
            summary,
            [
                ("nvidia-557", "NVIDIA L4-2Q", 0),
                ("nvidia-558", "NVIDIA L4-4Q", 20),
                ("nvidia-560", "NVIDIA L4-8Q", 3)
            ]
        );
    }

    #[test]
    fn a_vgpu_is_created_and_removed_through_sysfs() {
        let root = tree();
        let mut pool = VgpuPool::new(Box::new(backend(root.path())));
        pool.add_gpu(gpu(), models::l4(), GpuMode::EqualSize)
            .unwrap();
        let v = pool.create(&gpu().id, "L4-4Q").unwrap();
        let dev = root
            .path()
            .join("bus/mdev/devices")
            .join(v.uuid.to_string());
        assert!(dev.is_dir());
        let avail = root
            .path()
            .join("class/mdev_bus")
            .join(PCI)
            .join("mdev_supported_types/nvidia-558/available_instances");
        assert_eq!(fs::read_to_string(&avail).unwrap().trim(), "19");
        pool.remove(&gpu().id, v.uuid).unwrap();
        assert!(!dev.exists());
        assert_eq!(fs::read_to_string(&avail).unwrap().trim(), "20");
        assert!(pool.vgpus(&gpu().id).is_empty());
    }

    #[test]
    fn a_type_that_ran_out_is_refused_before_writing() {
        let root = tree();
        let mut pool = VgpuPool::new(Box::new(backend(root.path())));
        pool.add_gpu(gpu(), models::l4(), GpuMode::EqualSize)
            .unwrap();
        let err = pool.create(&gpu().id, "L4-2Q").unwrap_err();
        assert!(
            matches!(err, VgpuError::Exhausted { ref type_id, .. } if type_id == "nvidia-557"),
            "{err}"
        );
        assert!(pool.vgpus(&gpu().id).is_empty());
    }

    #[test]
    fn a_failed_create_leaves_nothing_behind() {
        let root = tree();
        let mut pool = VgpuPool::new(Box::new(backend(root.path())));
        pool.add_gpu(gpu(), models::l4(), GpuMode::EqualSize)
            .unwrap();
        let err = pool.create(&gpu().id, "L4-8Q").unwrap_err().to_string();
        assert!(
            err.contains("create failed") && err.contains("os error 22"),
            "{err}"
        );
        assert!(pool.vgpus(&gpu().id).is_empty());
        assert_eq!(
            fs::read_dir(root.path().join("bus/mdev/devices"))
                .unwrap()
                .count(),
            0
        );
    }

    #[test]
    fn a_create_the_kernel_accepts_without_a_device_is_an_error() {
        // Plain files, no kernel behind them: the write succeeds and nothing appears.
        let root = tree();
        let mut plain = MdevBackend::new(root.path(), root.path().join("agent-data/vgpus"));
        let err = plain
            .create(&gpu(), "NVIDIA L4-4Q", Uuid::new_v4())
            .unwrap_err()
            .to_string();
        assert!(err.contains("no device appeared"), "{err}");
    }

    #[test]
    fn a_restarted_agent_finds_its_vgpus_again() {
        let root = tree();
        let created = {
            let mut pool = VgpuPool::new(Box::new(backend(root.path())));
            pool.add_gpu(gpu(), models::l4(), GpuMode::EqualSize)
                .unwrap();
            [
                pool.create(&gpu().id, "L4-4Q").unwrap(),
                pool.create(&gpu().id, "L4-4Q").unwrap(),
            ]
        };
        // An operator's own mdev on the same GPU, made without the agent: not adopted.
        let create = root
            .path()
            .join("class/mdev_bus")
            .join(PCI)
            .join("mdev_supported_types/nvidia-558/create");
        let kernel = FakeKernel {
            root: root.path().to_owned(),
            failing: Vec::new(),
        };
        kernel.write(&create, &Uuid::new_v4().to_string()).unwrap();
        let mut pool = VgpuPool::new(Box::new(backend(root.path())));
        assert_eq!(
            pool.add_gpu(gpu(), models::l4(), GpuMode::EqualSize)
                .unwrap(),
            2,
            "only the agent's own"
        );
        let mut found: Vec<Uuid> = pool.vgpus(&gpu().id).iter().map(|v| v.uuid).collect();
        found.sort();
        let mut expected: Vec<Uuid> = created.iter().map(|v| v.uuid).collect();
        expected.sort();
        assert_eq!(found, expected);
        // The adopted vGPUs count against the pool's limits (L4-4Q: 6 per GPU), though the
        // kernel would create more: 4 more fit, not 6.
        for _ in 0..4 {
            pool.create(&gpu().id, "L4-4Q").unwrap();
        }
        assert!(pool.create(&gpu().id, "L4-4Q").is_err());
    }

    #[test]
    fn a_gpu_without_a_pci_address_is_an_error() {
        let root = tree();
        let b = backend(root.path());
        let no_pci = GpuHandle {
            id: GpuId::new("GPU-x").unwrap(),
            pci: None,
        };
        assert!(matches!(b.types(&no_pci), Err(VgpuError::NoPci(_))));
    }

    #[test]
    fn a_vgpu_removed_behind_the_agents_back_leaves_the_books() {
        let root = tree();
        let mut pool = VgpuPool::new(Box::new(backend(root.path())));
        pool.add_gpu(gpu(), models::l4(), GpuMode::EqualSize)
            .unwrap();
        let v = pool.create(&gpu().id, "L4-4Q").unwrap();
        fs::remove_dir_all(
            root.path()
                .join("bus/mdev/devices")
                .join(v.uuid.to_string()),
        )
        .unwrap();
        pool.remove(&gpu().id, v.uuid).unwrap();
        assert!(pool.vgpus(&gpu().id).is_empty());
        assert!(
            !root
                .path()
                .join("agent-data/vgpus")
                .join(v.uuid.to_string())
                .exists()
        );
    }

    #[test]
    fn grid_named_types_are_found_again_after_a_restart() {
        let root = tempfile::tempdir().unwrap();
        let t = root
            .path()
            .join("class/mdev_bus")
            .join(PCI)
            .join("mdev_supported_types/nvidia-222");
        fs::create_dir_all(t.join("devices")).unwrap();
        fs::write(t.join("name"), "GRID T4-4Q\n").unwrap();
        fs::write(t.join("available_instances"), "4\n").unwrap();
        fs::write(t.join("create"), "").unwrap();
        fs::create_dir_all(root.path().join("bus/mdev/devices")).unwrap();
        {
            let mut pool = VgpuPool::new(Box::new(backend(root.path())));
            pool.add_gpu(gpu(), models::t4(), GpuMode::EqualSize)
                .unwrap();
            pool.create(&gpu().id, "T4-4Q").unwrap();
        }
        let mut pool = VgpuPool::new(Box::new(backend(root.path())));
        assert_eq!(
            pool.add_gpu(gpu(), models::t4(), GpuMode::EqualSize)
                .unwrap(),
            1
        );
    }
}
