//! Built-in table of real GPU models, for simulated inventories and capacity planning.
//!
//! Figures come from vendor specifications, cited on each entry. Where a figure is derived
//! rather than read from a source, the entry says how. Two figures are model assumptions and
//! should be calibrated on real hardware (NVML's `encoder_stats` average fps and
//! `encoder_utilization`):
//!
//! - **Encoder capacity per NVENC engine**: [`UNITS_PER_NVENC_ENGINE`] 1080p60 low-latency
//!   H.264 streams. Calibrated against Amazon GameLift Streams, which sells up to 12 1080p60
//!   sessions on one NVIDIA L4 (`gen6n_small`, AWS CloudFormation `StreamGroup.StreamClass`),
//!   an L4 having 2 engines.
//! - **Mixed-size maxima**: NVIDIA's vGPU documentation gives, for L4 C-series types,
//!   equal-size/mixed-size maxima of 24C 1/1, 12C 2/2, 8C 3/2, 6C 4/4, 4C 6/4 (and A10-8C 3/2,
//!   A10-4C 6/4): mixed-size mode places vGPUs in power-of-two slots. [`mixed_size_max`]
//!   applies that rule to the Q-series profiles of the same framebuffer sizes.
//!
//! vGPU Q-series equal-size maxima are the framebuffer divided by the profile's size, capped
//! by the model's `max_vgpus`. MIG profiles and instance counts are from NVIDIA's MIG user
//! guide ("Supported MIG Profiles"); nominal memory sizes are used.

use std::num::NonZeroU16;

use super::{GpuMode, GpuSpec, VgpuClass, VgpuProfile};
use crate::tier::Codec;
use crate::units::{ComputeShare, EncoderUnits, FramebufferSize, Megabytes};

/// Assumed encoder throughput of one NVENC engine (Turing or later) in 1080p60 low-latency
/// H.264 streams. See the module documentation for its source.
pub const UNITS_PER_NVENC_ENGINE: u32 = 6;

/// The model names in the built-in table, in the order [`all`] returns them.
pub const NAMES: [&str; 9] = [
    "NVIDIA L4",
    "NVIDIA L40S",
    "NVIDIA A10",
    "Tesla T4",
    "NVIDIA GeForce RTX 4090",
    "NVIDIA A100-SXM4-40GB",
    "NVIDIA H100 80GB HBM3",
    "NVIDIA H100 PCIe",
    "NVIDIA H200",
];

/// Every built-in GPU model.
pub fn all() -> Vec<GpuSpec> {
    vec![
        l4(),
        l40s(),
        a10(),
        t4(),
        rtx_4090(),
        a100_40gb(),
        h100_80gb("NVIDIA H100 80GB HBM3"),
        h100_80gb("NVIDIA H100 PCIe"),
        h200(),
    ]
}

/// The built-in model named `model`, matched without regard to case, or by a unique suffix
/// (`l4` finds `NVIDIA L4`, `h100` is ambiguous).
pub fn find(model: &str) -> Option<GpuSpec> {
    let wanted = model.trim().to_ascii_lowercase();
    let models = all();
    if let Some(exact) = models
        .iter()
        .find(|m| m.model.to_ascii_lowercase() == wanted)
    {
        return Some(exact.clone());
    }
    let mut suffix = models.into_iter().filter(|m| {
        let name = m.model.to_ascii_lowercase();
        name.ends_with(&format!(" {wanted}")) || name.ends_with(&format!("-{wanted}"))
    });
    match (suffix.next(), suffix.next()) {
        (Some(only), None) => Some(only),
        _ => None,
    }
}

/// NVIDIA L4 (AD104, Ada Lovelace): 24 GB GDDR6, 2 NVENC with AV1, no MIG.
///
/// Source: NVIDIA L4 Tensor Core GPU datasheet ("24GB GDDR6", "NVENC | NVDEC | JPEG decoders:
/// 2 | 4 | 4", "AV1 encode and decode"); vGPU support via NVIDIA vGPU software (L4-1Q … 24Q);
/// not in the MIG user guide's list of MIG-capable GPUs.
pub fn l4() -> GpuSpec {
    data_center(
        "NVIDIA L4",
        24,
        2,
        vec![Codec::H264, Codec::Hevc, Codec::Av1],
        32,
        &[1, 2, 3, 4, 6, 8, 12, 24],
        true,
    )
}

/// NVIDIA L40S (AD102, Ada Lovelace): 48 GB GDDR6, 3 NVENC with AV1, no MIG.
///
/// Source: NVIDIA L40S datasheet ("48GB GDDR6 with ECC", "NVENC | NVDEC: 3x | 3x (includes
/// AV1 encode and decode)", "vGPU software support: NVIDIA vPC/vApps, RTX vWS"); not
/// MIG-capable.
pub fn l40s() -> GpuSpec {
    data_center(
        "NVIDIA L40S",
        48,
        3,
        vec![Codec::H264, Codec::Hevc, Codec::Av1],
        32,
        &[1, 2, 3, 4, 6, 8, 12, 16, 24, 48],
        true,
    )
}

/// NVIDIA A10 (GA102, Ampere): 24 GB GDDR6, 1 NVENC (H.264/HEVC, no AV1 encode), no MIG.
///
/// Source: NVIDIA A10 datasheet ("24GB GDDR6", "1 encoder, 2 decoder (+AV1 decode)"); NVIDIA
/// vGPU documentation for A10-1Q … 24Q and the A10-8C/4C mixed-size maxima.
pub fn a10() -> GpuSpec {
    data_center(
        "NVIDIA A10",
        24,
        1,
        vec![Codec::H264, Codec::Hevc],
        32,
        &[1, 2, 3, 4, 6, 8, 12, 24],
        true,
    )
}

/// NVIDIA T4 (TU104, Turing): 16 GB GDDR6, 1 NVENC (H.264/HEVC), equal-size vGPU only.
///
/// Source: NVIDIA T4 datasheet ("16 GB GDDR6"; one Turing NVENC per TU104 per the Video
/// Codec SDK support matrix); NVIDIA vGPU documentation: T4-1Q … 16Q, and Turing "does not
/// support mixed-size mode".
pub fn t4() -> GpuSpec {
    data_center(
        "Tesla T4",
        16,
        1,
        vec![Codec::H264, Codec::Hevc],
        16,
        &[1, 2, 4, 8, 16],
        false,
    )
}

/// GeForce RTX 4090 (AD102, Ada Lovelace): 24 GB GDDR6X, 2 NVENC with AV1, no vGPU.
///
/// Source: NVIDIA GeForce RTX 4090 specifications ("24 GB GDDR6X", "2x NVENC (8th gen)",
/// AV1 encode). GeForce drivers cap concurrent NVENC sessions: 8 since driver 550
/// (January 2024; measured system-wide, not per GPU, on Linux 555.42 — keylase/nvidia-patch
/// issues #776 and #797). GeForce cards do not support NVIDIA vGPU, so they run one session
/// at a time.
pub fn rtx_4090() -> GpuSpec {
    GpuSpec {
        model: "NVIDIA GeForce RTX 4090".into(),
        framebuffer: Megabytes::from_gb(24),
        nvenc_engines: 2,
        encode_codecs: vec![Codec::H264, Codec::Hevc, Codec::Av1],
        encoder_capacity: engine_capacity(2),
        encoder_session_cap: Some(8),
        max_vgpus: 1,
        modes: vec![GpuMode::Exclusive],
        vgpu_profiles: Vec::new(),
        mig_profiles: Vec::new(),
        mig_compute_slices: 0,
    }
}

/// NVIDIA A100 40 GB (GA100, Ampere): MIG 7-way, **no NVENC**, so no session may stream
/// from it.
///
/// Source: NVIDIA A100 datasheet ("40GB HBM2", "MIG: up to 7 instances @ 5GB"); NVIDIA MIG
/// user guide, A100-SXM4-40GB profiles 1g.5gb ×7, 1g.10gb ×4, 2g.10gb ×3, 3g.20gb ×2,
/// 4g.20gb ×1, 7g.40gb ×1; NVDEC application note: GA100 has NVDEC only, and the Video Codec
/// SDK support matrix lists 0 NVENC for A100.
pub fn a100_40gb() -> GpuSpec {
    mig_only(
        "NVIDIA A100-SXM4-40GB",
        40,
        &[
            ("1g.5gb", 1, 5, 7),
            ("1g.10gb", 1, 10, 4),
            ("2g.10gb", 2, 10, 3),
            ("3g.20gb", 3, 20, 2),
            ("4g.20gb", 4, 20, 1),
            ("7g.40gb", 7, 40, 1),
        ],
    )
}

/// NVIDIA H100 80 GB (GH100, Hopper), SXM5 (`NVIDIA H100 80GB HBM3`) or PCIe: MIG 7-way,
/// **no NVENC**.
///
/// Source: NVIDIA H100 datasheet ("80GB", "MIG: up to 7 MIGs @ 10GB each", "7 NVDEC, 7 JPEG"
/// and no encoder); NVIDIA MIG user guide, H100 80GB profiles 1g.10gb ×7, 1g.20gb ×4,
/// 2g.20gb ×3, 3g.40gb ×2, 4g.40gb ×1, 7g.80gb ×1.
pub fn h100_80gb(model: &str) -> GpuSpec {
    mig_only(
        model,
        80,
        &[
            ("1g.10gb", 1, 10, 7),
            ("1g.20gb", 1, 20, 4),
            ("2g.20gb", 2, 20, 3),
            ("3g.40gb", 3, 40, 2),
            ("4g.40gb", 4, 40, 1),
            ("7g.80gb", 7, 80, 1),
        ],
    )
}

/// NVIDIA H200 (GH100, Hopper), 141 GB HBM3e: MIG 7-way, **no NVENC**.
///
/// Source: NVIDIA H200 Tensor Core GPU datasheet ("141GB", "Up to 7 MIGs @18GB each", "7 NVDEC,
/// 7 JPEG" and no encoder); NVIDIA MIG user guide, H200 141GB profiles 1g.18gb ×7, 1g.35gb ×4,
/// 2g.35gb ×3, 3g.71gb ×2, 4g.71gb ×1, 7g.141gb ×1. Seen through NVML (driver 580.159.04):
/// named `NVIDIA H200`, 143 771 MiB — and NVML's encoder-capacity query answers 100% for H.264
/// and HEVC on it all the same, which is why this entry must say "no encoder" itself.
pub fn h200() -> GpuSpec {
    mig_only(
        "NVIDIA H200",
        141,
        &[
            ("1g.18gb", 1, 18, 7),
            ("1g.35gb", 1, 35, 4),
            ("2g.35gb", 2, 35, 3),
            // 70.5 GB each in fact: whole gigabytes here, rounded down so that two fit.
            ("3g.71gb", 3, 70, 2),
            ("4g.71gb", 4, 70, 1),
            ("7g.141gb", 7, 141, 1),
        ],
    )
}

/// The mixed-size maximum for a profile whose equal-size maximum is `equal`: the largest
/// power of two not above it (see the module documentation).
pub fn mixed_size_max(equal: u16) -> u16 {
    match equal {
        0 => 0,
        n => 1 << (15 - n.leading_zeros()),
    }
}

fn engine_capacity(engines: u8) -> EncoderUnits {
    EncoderUnits::from_milli(u32::from(engines) * UNITS_PER_NVENC_ENGINE * 1000)
}

/// A whole number of gigabytes as a framebuffer size; `gb` is a literal from this table.
fn gb(gb: u16) -> FramebufferSize {
    FramebufferSize::from_gb(NonZeroU16::new(gb).unwrap_or(NonZeroU16::MIN))
}

/// A data-center GPU with NVENC and Q-series vGPU profiles of `q_sizes_gb`.
fn data_center(
    model: &str,
    framebuffer_gb: u16,
    nvenc_engines: u8,
    encode_codecs: Vec<Codec>,
    max_vgpus: u16,
    q_sizes_gb: &[u16],
    mixed_size: bool,
) -> GpuSpec {
    // The profile prefix is the short model name: "NVIDIA L4" -> "L4", "Tesla T4" -> "T4".
    let short = model.rsplit(' ').next().unwrap_or(model);
    let vgpu_profiles = q_sizes_gb
        .iter()
        .map(|&size| {
            let max_instances = (framebuffer_gb / size).min(max_vgpus);
            VgpuProfile {
                id: format!("{short}-{size}Q"),
                framebuffer: gb(size),
                compute_share: ComputeShare::from_fraction(1, u32::from(max_instances)),
                class: VgpuClass::VirtualWorkstation,
                max_instances,
                max_instances_mixed: mixed_size.then(|| mixed_size_max(max_instances)),
                mig_slices: None,
            }
        })
        .collect();
    let mut modes = vec![GpuMode::Exclusive, GpuMode::EqualSize];
    if mixed_size {
        modes.push(GpuMode::MixedSize);
    }
    GpuSpec {
        model: model.into(),
        framebuffer: Megabytes::from_gb(u64::from(framebuffer_gb)),
        nvenc_engines,
        encode_codecs,
        encoder_capacity: engine_capacity(nvenc_engines),
        encoder_session_cap: None,
        max_vgpus,
        modes,
        vgpu_profiles,
        mig_profiles: Vec::new(),
        mig_compute_slices: 0,
    }
}

/// A MIG-capable GPU without NVENC; `shapes` are (name, compute slices of 7, GB, instances).
fn mig_only(model: &str, framebuffer_gb: u16, shapes: &[(&str, u32, u16, u16)]) -> GpuSpec {
    GpuSpec {
        model: model.into(),
        framebuffer: Megabytes::from_gb(u64::from(framebuffer_gb)),
        nvenc_engines: 0,
        encode_codecs: Vec::new(),
        encoder_capacity: EncoderUnits::ZERO,
        encoder_session_cap: None,
        max_vgpus: 7,
        modes: vec![GpuMode::Exclusive, GpuMode::Mig],
        vgpu_profiles: Vec::new(),
        mig_profiles: shapes
            .iter()
            .map(|&(id, slices, size, max_instances)| VgpuProfile {
                id: id.into(),
                framebuffer: gb(size),
                compute_share: ComputeShare::from_fraction(slices, 7),
                class: VgpuClass::Compute,
                max_instances,
                max_instances_mixed: None,
                mig_slices: u8::try_from(slices).ok(),
            })
            .collect(),
        mig_compute_slices: 7,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_match_the_models() {
        let names: Vec<String> = all().into_iter().map(|m| m.model).collect();
        assert_eq!(names, NAMES);
    }

    #[test]
    fn every_profile_fits_its_gpu() {
        for gpu in all() {
            for p in gpu.vgpu_profiles.iter().chain(&gpu.mig_profiles) {
                let used = p.framebuffer.megabytes().get() * u64::from(p.max_instances);
                assert!(used <= gpu.framebuffer.get(), "{} {}", gpu.model, p.id);
                assert!(p.max_instances <= gpu.max_vgpus, "{} {}", gpu.model, p.id);
                if let Some(mixed) = p.max_instances_mixed {
                    assert!(mixed <= p.max_instances);
                }
            }
            assert_eq!(
                gpu.supports(GpuMode::Mig),
                !gpu.mig_profiles.is_empty(),
                "{}",
                gpu.model
            );
        }
    }

    #[test]
    fn mig_gpus_cannot_stream_and_the_rest_can() {
        for gpu in all() {
            assert_eq!(
                gpu.can_stream(),
                !gpu.supports(GpuMode::Mig),
                "{}",
                gpu.model
            );
        }
        assert!(!a100_40gb().can_stream());
        assert!(!h100_80gb("NVIDIA H100 PCIe").can_stream());
    }

    #[test]
    fn l4_matches_its_published_profiles() {
        let l4 = l4();
        let max: Vec<(&str, u16, Option<u16>)> = l4
            .vgpu_profiles
            .iter()
            .map(|p| (p.id.as_str(), p.max_instances, p.max_instances_mixed))
            .collect();
        // Mixed-size maxima as published for the C-series types of the same sizes.
        assert!(max.contains(&("L4-24Q", 1, Some(1))));
        assert!(max.contains(&("L4-12Q", 2, Some(2))));
        assert!(max.contains(&("L4-8Q", 3, Some(2))));
        assert!(max.contains(&("L4-6Q", 4, Some(4))));
        assert!(max.contains(&("L4-4Q", 6, Some(4))));
        assert_eq!(l4.encoder_capacity, EncoderUnits::from_milli(12_000));
    }

    #[test]
    fn consumer_cards_carry_their_session_cap() {
        let rtx = rtx_4090();
        assert_eq!(rtx.encoder_session_cap, Some(8));
        assert_eq!(rtx.modes, [GpuMode::Exclusive]);
    }

    #[test]
    fn t4_has_no_mixed_size_mode() {
        let t4 = t4();
        assert!(!t4.supports(GpuMode::MixedSize));
        assert!(
            t4.vgpu_profiles
                .iter()
                .all(|p| p.max_instances_mixed.is_none())
        );
        assert_eq!(t4.profiles(GpuMode::MixedSize), []);
    }

    #[test]
    fn smallest_profile_for_a_tier() {
        let l4 = l4();
        let four = FramebufferSize::new(4096).unwrap();
        let p = l4.smallest_profile_for(GpuMode::EqualSize, VgpuClass::VirtualWorkstation, four);
        assert_eq!(p.map(|p| p.id.as_str()), Some("L4-4Q"));
        let five = FramebufferSize::new(5120).unwrap();
        let p = l4.smallest_profile_for(GpuMode::EqualSize, VgpuClass::VirtualWorkstation, five);
        assert_eq!(p.map(|p| p.id.as_str()), Some("L4-6Q"));
    }

    #[test]
    fn find_matches_names_and_unique_suffixes() {
        assert_eq!(find("l4").map(|m| m.model), Some("NVIDIA L4".into()));
        assert_eq!(
            find("NVIDIA A10").map(|m| m.model),
            Some("NVIDIA A10".into())
        );
        assert_eq!(find("t4").map(|m| m.model), Some("Tesla T4".into()));
        assert!(
            find("h100").is_none(),
            "two H100 variants, so no unique match"
        );
        assert!(find("voodoo2").is_none());
    }

    #[test]
    fn mixed_size_rule() {
        let got: Vec<u16> = [0, 1, 2, 3, 4, 6, 12, 24].map(mixed_size_max).to_vec();
        assert_eq!(got, [0, 1, 2, 2, 4, 4, 8, 16]);
    }
}
