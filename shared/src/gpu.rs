//! Physical GPUs and the ways they can be shared.
//!
//! A [`GpuSpec`] describes a GPU model: its framebuffer, its NVENC engines and encoder
//! capacity, and the sharing modes it supports with their [`VgpuProfile`]s. The agent builds
//! one from NVML on real hardware, or takes it from the built-in [`models`] table for a
//! simulated inventory; the placer reads the same type either way.

pub mod models;

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::tier::{Codec, TierPreset};
use crate::units::{ComputeShare, EncoderUnits, FramebufferSize, Megabytes};

/// How the sessions on one physical GPU share it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
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
    ///
    /// Equal-size GPUs count as enforcing because Framecast runs them under NVIDIA's fixed- or
    /// equal-share vGPU scheduler; under the driver's default best-effort scheduler the share
    /// would not hold. Mixed-size mode cannot use the fixed-share scheduler at all.
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
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
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
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
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
    /// For a MIG shape, the compute slices it takes (the `1` of `1g.10gb`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mig_slices: Option<u8>,
}

/// A GPU model as the placer sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub struct GpuSpec {
    /// Marketing name, e.g. `NVIDIA L4`; matched against NVML's device name.
    pub model: String,
    /// Total framebuffer.
    pub framebuffer: Megabytes,
    /// Number of NVENC engines; 0 on GPUs that cannot encode video (A100, H100).
    pub nvenc_engines: u8,
    /// Codecs NVENC encodes on this GPU; empty when it has no NVENC.
    #[cfg_attr(test, proptest(strategy = "crate::test_support::small_vec()"))]
    pub encode_codecs: Vec<Codec>,
    /// Encoder throughput of the whole GPU in 1080p60 H.264 streams.
    pub encoder_capacity: EncoderUnits,
    /// Concurrent NVENC sessions the driver allows, where it caps them (GeForce cards).
    pub encoder_session_cap: Option<u16>,
    /// Most vGPUs the GPU hosts at once, whatever their profile (the SR-IOV virtual function
    /// count on GPUs that use SR-IOV for vGPU).
    pub max_vgpus: u16,
    /// Sharing modes the GPU supports.
    #[cfg_attr(test, proptest(strategy = "crate::test_support::small_vec()"))]
    pub modes: Vec<GpuMode>,
    /// vGPU types for the equal-size and mixed-size modes.
    #[cfg_attr(test, proptest(strategy = "crate::test_support::small_vec()"))]
    pub vgpu_profiles: Vec<VgpuProfile>,
    /// MIG instance shapes; empty unless `modes` has [`GpuMode::Mig`].
    #[cfg_attr(test, proptest(strategy = "crate::test_support::small_vec()"))]
    pub mig_profiles: Vec<VgpuProfile>,
    /// Compute slices a MIG-capable GPU divides into (7 on A100 and H100); 0 without MIG.
    #[serde(default)]
    pub mig_compute_slices: u8,
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

/// What bounds the number of sessions of one tier a GPU holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CapacityLimit {
    /// The GPU has no NVENC, so it cannot stream at all.
    NoEncoder,
    /// No profile of the mode holds the tier's framebuffer.
    NoProfile,
    /// The vGPU profile's instance count.
    Profile,
    /// Compute share, where the mode enforces it.
    Compute,
    /// Encoder throughput.
    Encoder,
    /// The driver's cap on concurrent encoder sessions.
    SessionCap,
}

/// How many sessions of one tier a GPU holds when it serves only that tier.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TierCapacity {
    /// Sessions per GPU.
    pub sessions: u16,
    /// The profile the GPU would hold (none in exclusive mode).
    pub profile: Option<String>,
    /// What stops it holding more.
    pub limit: CapacityLimit,
}

impl GpuSpec {
    /// Sessions of `tier` one GPU holds when it holds only that tier: in equal-size mode with
    /// the smallest virtual-workstation profile that fits the tier, or one session in exclusive
    /// mode where the GPU has no vGPU profiles; then bounded by encoder throughput and any
    /// session cap, and by the tier's compute share (every mode this uses enforces it).
    pub fn single_tier_capacity(&self, tier: &TierPreset) -> TierCapacity {
        let none = |limit| TierCapacity {
            sessions: 0,
            profile: None,
            limit,
        };
        if !self.can_stream() {
            return none(CapacityLimit::NoEncoder);
        }
        let (by_profile, profile) = if self.supports(GpuMode::EqualSize) {
            match self.smallest_profile_for(
                GpuMode::EqualSize,
                VgpuClass::VirtualWorkstation,
                tier.framebuffer,
            ) {
                Some(p) => (p.max_instances, Some(p.id.clone())),
                None => return none(CapacityLimit::NoProfile),
            }
        } else if tier.framebuffer.megabytes() <= self.framebuffer {
            (1, None)
        } else {
            return none(CapacityLimit::NoProfile);
        };
        let cost = tier.encoder_cost.milli().max(1);
        let by_encoder = u16::try_from(self.encoder_capacity.milli() / cost).unwrap_or(u16::MAX);
        let by_cap = self.encoder_session_cap.unwrap_or(u16::MAX);
        let by_compute = u16::from(16 / tier.compute_share.sixteenths());
        let (sessions, limit) = [
            (by_profile, CapacityLimit::Profile),
            (by_compute, CapacityLimit::Compute),
            (by_encoder, CapacityLimit::Encoder),
            (by_cap, CapacityLimit::SessionCap),
        ]
        .into_iter()
        .min_by_key(|(n, _)| *n)
        .unwrap_or((0, CapacityLimit::Profile));
        TierCapacity {
            sessions,
            profile,
            limit,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tier(name: &str) -> TierPreset {
        TierPreset::defaults()
            .into_iter()
            .find(|t| t.name.as_str() == name)
            .unwrap()
    }

    #[test]
    fn single_tier_capacity_on_an_l4() {
        let l4 = models::l4();
        // 720p: 2Q holds 12, and 12 units of encoder at 0.445 each allow 26.
        let c = l4.single_tier_capacity(&tier("720p"));
        assert_eq!(
            (c.sessions, c.profile.as_deref(), c.limit),
            (12, Some("L4-2Q"), CapacityLimit::Profile)
        );
        // 4K: 8Q holds 3, and 12 units at 4 each allow 3: the profile is named first.
        let c = l4.single_tier_capacity(&tier("4k"));
        assert_eq!((c.sessions, c.profile.as_deref()), (3, Some("L4-8Q")));
    }

    #[test]
    fn single_tier_capacity_limits() {
        let a100 = models::a100_40gb();
        assert_eq!(
            a100.single_tier_capacity(&tier("720p")).limit,
            CapacityLimit::NoEncoder
        );
        let rtx = models::rtx_4090();
        let c = rtx.single_tier_capacity(&tier("1080p"));
        assert_eq!(
            (c.sessions, c.profile, c.limit),
            (1, None, CapacityLimit::Profile)
        );
        // A10's single engine: 6 units hold one 4K stream at 4 units, though 8Q fits 3.
        let c = models::a10().single_tier_capacity(&tier("4k"));
        assert_eq!((c.sessions, c.limit), (1, CapacityLimit::Encoder));
    }

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
