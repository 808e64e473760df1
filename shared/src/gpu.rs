//! Physical GPUs and the ways they can be shared.
//!
//! A [`GpuSpec`] describes a GPU model: its framebuffer, its NVENC engines and encoder
//! capacity, and the sharing modes it supports with their [`VgpuProfile`]s. The agent builds
//! one from NVML on real hardware, or takes it from the built-in [`models`] table for a
//! simulated inventory; the placer reads the same type either way.

pub mod models;

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::tier::Codec;
use crate::units::{ComputeShare, EncoderUnits, FramebufferSize, Megabytes};

/// How the sessions on one physical GPU share it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum GpuMode {
    /// One session per GPU, no vGPU: the baseline of one GPU per player.
    Exclusive,
    /// Time-sliced vGPUs that all use one profile until the GPU is empty again (NVIDIA's
    /// default vGPU mode).
    EqualSize,
    /// Time-sliced vGPUs of different framebuffer sizes, within lower per-profile limits; the
    /// fixed-share scheduler is not available in this mode.
    MixedSize,
    /// Multi-Instance GPU: fixed hardware partitions from the GPU's MIG profile list.
    Mig,
}

impl GpuMode {
    /// Every mode, in declaration order.
    pub const ALL: [GpuMode; 4] = [Self::Exclusive, Self::EqualSize, Self::MixedSize, Self::Mig];

    /// Whether the mode enforces each vGPU's compute share in hardware or in the scheduler.
    /// Where it does not, the share is a soft dimension for the placer.
    pub fn enforces_compute_share(self) -> bool {
        matches!(self, Self::EqualSize | Self::Mig | Self::Exclusive)
    }
}

impl fmt::Display for GpuMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Exclusive => "exclusive",
            Self::EqualSize => "equal-size",
            Self::MixedSize => "mixed-size",
            Self::Mig => "mig",
        })
    }
}

/// The class of a vGPU type, as NVIDIA's profile suffixes name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VgpuClass {
    /// `Q` profiles (Quadro-like, RTX vWS): full graphics APIs; the class games run on.
    VirtualWorkstation,
    /// `C` profiles and MIG instances (Tesla-like): CUDA compute only, no graphics.
    Compute,
    /// `B`/`A` profiles and GeForce-like gaming profiles: graphics with a frame-rate limiter.
    Gaming,
}

/// One way to slice a GPU: a vGPU type or a MIG instance shape.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VgpuProfile {
    /// The vendor's name for it, e.g. `L4-4Q` or `1g.10gb`.
    pub id: String,
    /// Framebuffer of one instance.
    pub framebuffer: FramebufferSize,
    /// Compute share of one instance.
    pub compute_share: ComputeShare,
    /// The profile's class.
    pub class: VgpuClass,
    /// How many instances of this profile one GPU holds when it holds only this profile
    /// (equal-size mode, or a MIG shape's instance count).
    pub max_instances: u16,
    /// How many instances one GPU holds in mixed-size mode; `None` where the profile cannot be
    /// used in mixed-size mode.
    pub max_instances_mixed: Option<u16>,
}

/// A GPU model as the placer sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuSpec {
    /// Marketing name, e.g. `NVIDIA L4`; matched against NVML's device name.
    pub model: String,
    /// Total framebuffer.
    pub framebuffer: Megabytes,
    /// Number of NVENC engines; 0 on GPUs that cannot encode video (A100, H100).
    pub nvenc_engines: u8,
    /// Codecs NVENC encodes on this GPU; empty when it has no NVENC.
    pub encode_codecs: Vec<Codec>,
    /// Encoder throughput of the whole GPU in 1080p60 H.264 streams.
    pub encoder_capacity: EncoderUnits,
    /// Concurrent NVENC sessions the driver allows, where it caps them (GeForce cards).
    pub encoder_session_cap: Option<u16>,
    /// Most vGPUs the GPU hosts at once, whatever their profile (the SR-IOV virtual function
    /// count on GPUs that use SR-IOV for vGPU).
    pub max_vgpus: u16,
    /// Sharing modes the GPU supports.
    pub modes: Vec<GpuMode>,
    /// vGPU types for the equal-size and mixed-size modes.
    pub vgpu_profiles: Vec<VgpuProfile>,
    /// MIG instance shapes; empty unless `modes` has [`GpuMode::Mig`].
    pub mig_profiles: Vec<VgpuProfile>,
}

impl GpuSpec {
    /// Whether sessions can be streamed from this GPU at all: it needs an NVENC engine.
    /// The placer must never put a streaming session on a GPU where this is false.
    pub fn can_stream(&self) -> bool {
        self.nvenc_engines > 0 && self.encoder_capacity > EncoderUnits::ZERO
    }

    /// Whether the GPU supports `mode`.
    pub fn supports(&self, mode: GpuMode) -> bool {
        self.modes.contains(&mode)
    }

    /// The profiles usable in `mode`: vGPU types for the time-sliced modes, instance shapes
    /// for MIG, none for exclusive use.
    pub fn profiles(&self, mode: GpuMode) -> &[VgpuProfile] {
        if !self.supports(mode) {
            return &[];
        }
        match mode {
            GpuMode::Exclusive => &[],
            GpuMode::EqualSize | GpuMode::MixedSize => &self.vgpu_profiles,
            GpuMode::Mig => &self.mig_profiles,
        }
    }

    /// The smallest profile of `class` in `mode` whose framebuffer holds `need`.
    pub fn smallest_profile_for(
        &self,
        mode: GpuMode,
        class: VgpuClass,
        need: FramebufferSize,
    ) -> Option<&VgpuProfile> {
        self.profiles(mode)
            .iter()
            .filter(|p| p.class == class && p.framebuffer >= need)
            .filter(|p| mode != GpuMode::MixedSize || p.max_instances_mixed.is_some())
            .min_by_key(|p| p.framebuffer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_enforcing_modes_make_compute_a_hard_limit() {
        assert!(GpuMode::EqualSize.enforces_compute_share());
        assert!(GpuMode::Mig.enforces_compute_share());
        assert!(!GpuMode::MixedSize.enforces_compute_share());
    }

    #[test]
    fn modes_serialize_in_kebab_case() {
        let names: Vec<String> = GpuMode::ALL.iter().map(|m| m.to_string()).collect();
        assert_eq!(names, ["exclusive", "equal-size", "mixed-size", "mig"]);
        for m in GpuMode::ALL {
            let v = toml::Value::try_from(m).unwrap();
            assert_eq!(v.as_str(), Some(m.to_string().as_str()));
        }
    }
}
