//! The inventory of a host with the NVIDIA driver, read through NVML.
//!
//! `nvml-wrapper` loads `libnvidia-ml.so.1` at run time, so this compiles and the agent starts
//! on any host; without the library, [`NvmlInventory::open`] returns
//! [`InventoryError::NvmlUnavailable`] and the agent falls back or says what to install.

use nvml_wrapper::enum_wrappers::device::EncoderType;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::{Device, Nvml};

use framecast_shared::gpu::models::{self, UNITS_PER_NVENC_ENGINE};
use framecast_shared::gpu::{GpuMode, GpuSpec, VgpuClass, VgpuProfile};
use framecast_shared::ids::GpuId;
use framecast_shared::tier::Codec;
use framecast_shared::units::{ComputeShare, EncoderUnits, FramebufferSize, Megabytes};

use super::{DiscoveredGpu, EncoderFacts, Inventory, InventoryError, MigFacts, VgpuTypeFacts};
use crate::nvml_ffi;

/// The NVML-backed inventory.
pub struct NvmlInventory {
    nvml: Nvml,
}

impl std::fmt::Debug for NvmlInventory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NvmlInventory").finish_non_exhaustive()
    }
}

impl NvmlInventory {
    /// Loads NVML and initialises it.
    pub fn open() -> Result<Self, InventoryError> {
        Nvml::init()
            .map(|nvml| Self { nvml })
            .map_err(|e| InventoryError::NvmlUnavailable {
                reason: e.to_string(),
            })
    }

    fn device(&self, index: u32) -> Result<DiscoveredGpu, InventoryError> {
        let err = |e: NvmlError| InventoryError::Nvml(format!("device {index}: {e}"));
        let device = self.nvml.device_by_index(index).map_err(err)?;
        let name = device.name().map_err(err)?;
        let uuid = device.uuid().map_err(err)?;
        let id = GpuId::new(uuid.as_str()).map_err(|e| {
            InventoryError::Nvml(format!(
                "device {index}: UUID {uuid:?} is not a usable id: {e}"
            ))
        })?;
        let memory = device.memory_info().map_err(err)?;
        let encoder = EncoderFacts {
            h264_capacity_pct: optional(device.encoder_capacity(EncoderType::H264)).map_err(err)?,
            hevc_capacity_pct: optional(device.encoder_capacity(EncoderType::HEVC)).map_err(err)?,
            av1_capacity_pct: av1_capacity(&device).map_err(err)?,
            sessions: optional(device.encoder_stats())
                .map_err(err)?
                .map(|s| s.session_count),
        };
        let mig = match optional(device.mig_mode()).map_err(err)? {
            Some(m) => Some(MigFacts {
                enabled: m.current == 1,
                pending: m.pending == 1,
                max_devices: optional(device.mig_device_count())
                    .map_err(err)?
                    .unwrap_or(0),
            }),
            None => None,
        };
        let vgpu_types = optional(device.vgpu_supported_types())
            .map_err(err)?
            .unwrap_or_default()
            .iter()
            .map(|t| {
                Ok(VgpuTypeFacts {
                    name: t.name()?,
                    class: t.class_name()?,
                    framebuffer: Megabytes::new(t.framebuffer_size()? / (1024 * 1024)),
                    max_instances: t.max_instances()?,
                })
            })
            .collect::<Result<Vec<_>, NvmlError>>()
            .map_err(err)?;
        let mode = match (&mig, vgpu_types.is_empty()) {
            (Some(m), _) if m.enabled => GpuMode::Mig,
            (_, false) => GpuMode::EqualSize,
            _ => GpuMode::Exclusive,
        };
        let memory_total = Megabytes::new(memory.total / (1024 * 1024));
        let spec = models::find(&name).unwrap_or_else(|| {
            tracing::warn!(gpu = %uuid, model = %name, "GPU model not in the built-in table; encoder capacity is an estimate");
            spec_from_nvml(&name, memory_total, &encoder, mig.as_ref(), &vgpu_types)
        });
        Ok(DiscoveredGpu {
            id,
            index,
            name,
            pci_bus_id: optional(device.pci_info()).map_err(err)?.map(|p| p.bus_id),
            spec,
            mode,
            memory_total,
            memory_used: Megabytes::new(memory.used / (1024 * 1024)),
            encoder,
            mig,
            vgpu_types,
        })
    }
}

impl Inventory for NvmlInventory {
    fn source(&self) -> &'static str {
        "nvml"
    }

    fn gpus(&self) -> Result<Vec<DiscoveredGpu>, InventoryError> {
        let count = self
            .nvml
            .device_count()
            .map_err(|e| InventoryError::Nvml(e.to_string()))?;
        // One GPU that fails to answer (lost, no permission) must not hide the others.
        let mut gpus = Vec::new();
        for i in 0..count {
            match self.device(i) {
                Ok(gpu) => gpus.push(gpu),
                Err(e) => tracing::warn!(device = i, error = %e, "skipping a GPU NVML cannot read"),
            }
        }
        Ok(gpus)
    }
}

/// `Ok(None)` for a query the device does not support, so one missing feature does not hide
/// the GPU.
fn optional<T>(r: Result<T, NvmlError>) -> Result<Option<T>, NvmlError> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(
            NvmlError::NotSupported
            | NvmlError::FunctionNotFound
            | NvmlError::FailedToLoadSymbol(_),
        ) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Remaining AV1 encoder capacity, percent; `None` where the GPU or driver has no AV1 encoder
/// query. nvml-wrapper's `EncoderType` has no AV1, so this is a raw call (`crate::nvml_ffi`).
fn av1_capacity(device: &Device<'_>) -> Result<Option<u32>, NvmlError> {
    match nvml_ffi::av1_encoder_capacity(device) {
        // A driver that predates `NVML_ENCODER_QUERY_AV1` refuses the query type itself.
        Err(NvmlError::InvalidArg) => Ok(None),
        r => optional(r),
    }
}

/// A model description from what NVML reports, for a GPU the table does not know. NVML does not
/// say how many NVENC engines a GPU has; one is assumed where the encoder answers at all — and
/// it answers on GPUs without NVENC too (an H200 reports 100% H.264 and HEVC capacity), so the
/// assumption is logged: such a model belongs in the built-in table.
fn spec_from_nvml(
    name: &str,
    memory: Megabytes,
    encoder: &EncoderFacts,
    mig: Option<&MigFacts>,
    vgpu: &[VgpuTypeFacts],
) -> GpuSpec {
    let mut encode_codecs = Vec::new();
    if encoder.h264_capacity_pct.is_some() {
        encode_codecs.push(Codec::H264);
    }
    if encoder.hevc_capacity_pct.is_some() {
        encode_codecs.push(Codec::Hevc);
    }
    if encoder.av1_capacity_pct.is_some() {
        encode_codecs.push(Codec::Av1);
    }
    let nvenc_engines = u8::from(!encode_codecs.is_empty());
    if nvenc_engines > 0 {
        tracing::warn!(
            model = name,
            "a GPU model the built-in table does not know: one NVENC engine is assumed because \
             NVML answers its encoder queries, but NVML answers them on GPUs without NVENC too \
             (the H100 and H200 do); sessions placed here are encoded in software if it has none"
        );
    }
    let vgpu_profiles: Vec<VgpuProfile> = vgpu
        .iter()
        .filter_map(|t| {
            let fb = FramebufferSize::new(t.framebuffer.get() / 64 * 64).ok()?;
            let max_instances = u16::try_from(t.max_instances).unwrap_or(u16::MAX);
            Some(VgpuProfile {
                id: crate::vgpu::bare_type_name(&t.name).to_owned(),
                framebuffer: fb,
                compute_share: ComputeShare::from_fraction(1, u32::from(max_instances)),
                class: match t.class.to_ascii_lowercase().as_str() {
                    "quadro" => VgpuClass::VirtualWorkstation,
                    "compute" => VgpuClass::Compute,
                    _ => VgpuClass::Gaming,
                },
                max_instances,
                max_instances_mixed: None,
                mig_slices: None,
            })
        })
        .collect();
    let mut modes = vec![GpuMode::Exclusive];
    if !vgpu_profiles.is_empty() {
        modes.push(GpuMode::EqualSize);
    }
    if mig.is_some() {
        modes.push(GpuMode::Mig);
    }
    GpuSpec {
        model: name.to_owned(),
        framebuffer: Megabytes::new(memory.get() / 64 * 64),
        nvenc_engines,
        encode_codecs,
        encoder_capacity: EncoderUnits::from_milli(
            u32::from(nvenc_engines) * UNITS_PER_NVENC_ENGINE * 1000,
        ),
        encoder_session_cap: None,
        max_vgpus: vgpu_profiles
            .iter()
            .map(|p| p.max_instances)
            .max()
            .unwrap_or(1),
        modes,
        vgpu_profiles,
        mig_profiles: Vec::new(),
        mig_compute_slices: if mig.is_some() { 7 } else { 0 },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On a host without the driver (this project's CI), opening NVML fails with a message, not
    /// a panic; on a host with one, every GPU reads back with a usable spec.
    #[test]
    fn nvml_opens_or_says_why_not() {
        match NvmlInventory::open() {
            Err(InventoryError::NvmlUnavailable { reason }) => assert!(!reason.is_empty()),
            Err(other) => panic!("unexpected error: {other}"),
            Ok(inv) => {
                for gpu in inv.gpus().unwrap() {
                    assert!(gpu.memory_total > Megabytes::ZERO, "{gpu:?}");
                    assert!(gpu.spec.supports(GpuMode::Exclusive), "{gpu:?}");
                }
            }
        }
    }

    #[test]
    fn an_unknown_model_gets_a_spec_from_nvml_facts() {
        let encoder = EncoderFacts {
            h264_capacity_pct: Some(100),
            hevc_capacity_pct: None,
            av1_capacity_pct: None,
            sessions: Some(0),
        };
        let vgpu = vec![VgpuTypeFacts {
            name: "NVIDIA X-4Q".into(),
            class: "Quadro".into(),
            framebuffer: Megabytes::new(4096),
            max_instances: 6,
        }];
        let spec = spec_from_nvml("Future GPU", Megabytes::new(23_999), &encoder, None, &vgpu);
        assert_eq!(
            spec.framebuffer,
            Megabytes::new(23_936),
            "rounded down to 64 MB"
        );
        assert!(spec.can_stream());
        assert_eq!(spec.modes, [GpuMode::Exclusive, GpuMode::EqualSize]);
        assert_eq!(spec.vgpu_profiles[0].class, VgpuClass::VirtualWorkstation);
        let silent = spec_from_nvml(
            "Compute GPU",
            Megabytes::new(81_920),
            &EncoderFacts::default(),
            Some(&MigFacts {
                enabled: true,
                pending: true,
                max_devices: 7,
            }),
            &[],
        );
        assert!(!silent.can_stream());
        assert!(silent.supports(GpuMode::Mig));
    }
}
