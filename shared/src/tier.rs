//! Quality tiers: what a session at 720p, 1080p or 4K needs from a GPU.
//!
//! A tier is configuration (`[tiers.<name>]` in `broker.toml`); the defaults follow the
//! framebuffer presets of the design: 720p → 2 GB, 1080p → 4 GB, 4K → 8 GB.

use std::fmt;
use std::num::NonZeroU16;

use serde::{Deserialize, Serialize};

use crate::ids::TierName;
use crate::units::{ComputeShare, EncoderUnits, FramebufferSize};

/// A video codec a GPU can encode and a browser can decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[cfg_attr(test, derive(proptest_derive::Arbitrary))]
pub enum Codec {
    /// H.264/AVC: every NVENC generation and every WebRTC browser.
    H264,
    /// H.265/HEVC.
    Hevc,
    /// AV1: NVENC from Ada Lovelace (L4, L40S, RTX 40) on.
    Av1,
}

impl fmt::Display for Codec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::H264 => "h264",
            Self::Hevc => "hevc",
            Self::Av1 => "av1",
        })
    }
}

/// A frame size in pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resolution {
    /// Width in pixels.
    pub width: u16,
    /// Height in pixels.
    pub height: u16,
}

impl Resolution {
    /// Pixels in one frame.
    pub fn pixels(self) -> u32 {
        u32::from(self.width) * u32::from(self.height)
    }
}

impl fmt::Display for Resolution {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}x{}", self.width, self.height)
    }
}

/// What one session of a quality tier needs: its vGPU profile (framebuffer, compute share),
/// its encoder cost, and how it is streamed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TierPreset {
    /// The tier's name, e.g. `1080p`.
    pub name: TierName,
    /// Frame size of the stream.
    pub resolution: Resolution,
    /// Frames per second of the stream.
    pub fps: u16,
    /// vGPU framebuffer a session of this tier needs.
    pub framebuffer: FramebufferSize,
    /// Share of the GPU's compute a session of this tier needs.
    pub compute_share: ComputeShare,
    /// Encoder throughput one stream of this tier costs.
    pub encoder_cost: EncoderUnits,
    /// Codecs in order of preference; the first one that both the GPU and the player support
    /// is used. Never empty.
    pub codecs: Vec<Codec>,
    /// Target video bitrate in kbit/s.
    pub bitrate_kbps: u32,
    /// Host CPU a session needs (game logic, capture, networking), in thousandths of a core.
    pub cpu_millicores: u32,
}

impl TierPreset {
    /// The default CPU demand for a stream of `encoder_cost`: one core per 1080p60 of pixel
    /// rate, at least one core (Amazon GameLift Streams gives its smallest 2 GB class one vCPU).
    pub fn cpu_for(encoder_cost: EncoderUnits) -> u32 {
        encoder_cost.milli().max(1000)
    }

    /// The encoder cost of a stream of `resolution` at `fps` in units of one 1080p60 stream,
    /// from the pixel rate. 720p60 comes out at 0.444, 4K60 at 4.
    pub fn encoder_cost_for(resolution: Resolution, fps: u16) -> EncoderUnits {
        const PIXEL_RATE_1080P60: u64 = 1920 * 1080 * 60;
        let rate = u64::from(resolution.pixels()) * u64::from(fps);
        let milli = (rate * 1000).div_ceil(PIXEL_RATE_1080P60);
        EncoderUnits::from_milli(u32::try_from(milli).unwrap_or(u32::MAX))
    }

    /// The built-in 720p, 1080p and 4K presets, all at 60 fps.
    ///
    /// Framebuffers are the design's presets. Compute shares (1, 2 and 4 sixteenths) are what
    /// an average session needs; the placer multiplies them by the genre's load weight, so on
    /// an L4 the vGPU profile binds first for average genres and compute for heavy ones.
    /// Bitrates follow common
    /// cloud-gaming guidance for low-latency CBR H.264: 720p60 about 5 Mbit/s, 1080p60 about
    /// 10 Mbit/s; 4K prefers AV1, where a GPU has it, at about 35 Mbit/s.
    pub fn defaults() -> Vec<TierPreset> {
        vec![
            preset("720p", 1280, 720, 2, 1, vec![Codec::H264], 5_000),
            preset("1080p", 1920, 1080, 4, 2, vec![Codec::H264], 10_000),
            preset(
                "4k",
                3840,
                2160,
                8,
                4,
                vec![Codec::Av1, Codec::H264],
                35_000,
            ),
        ]
    }
}

/// One built-in 60 fps preset. Only called with literal, valid arguments.
fn preset(
    name: &str,
    width: u16,
    height: u16,
    framebuffer_gb: u16,
    compute_sixteenths: u8,
    codecs: Vec<Codec>,
    bitrate_kbps: u32,
) -> TierPreset {
    let resolution = Resolution { width, height };
    let encoder_cost = TierPreset::encoder_cost_for(resolution, 60);
    TierPreset {
        // The literals above are valid names and non-zero sizes in 1..=16.
        name: TierName::new(name).unwrap_or_else(|_| unreachable!("built-in tier name {name}")),
        resolution,
        fps: 60,
        framebuffer: FramebufferSize::from_gb(
            NonZeroU16::new(framebuffer_gb).unwrap_or(NonZeroU16::MIN),
        ),
        compute_share: ComputeShare::from_fraction(u32::from(compute_sixteenths), 16),
        encoder_cost,
        codecs,
        bitrate_kbps,
        cpu_millicores: TierPreset::cpu_for(encoder_cost),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::units::Megabytes;

    #[test]
    fn defaults_follow_the_design_presets() {
        let tiers = TierPreset::defaults();
        let fb: Vec<(&str, Megabytes)> = tiers
            .iter()
            .map(|t| (t.name.as_str(), t.framebuffer.megabytes()))
            .collect();
        assert_eq!(
            fb,
            [
                ("720p", Megabytes::new(2048)),
                ("1080p", Megabytes::new(4096)),
                ("4k", Megabytes::new(8192))
            ]
        );
        assert!(tiers.iter().all(|t| !t.codecs.is_empty() && t.fps == 60));
    }

    #[test]
    fn encoder_cost_follows_the_pixel_rate() {
        let cost = |w, h, fps| {
            TierPreset::encoder_cost_for(
                Resolution {
                    width: w,
                    height: h,
                },
                fps,
            )
        };
        assert_eq!(cost(1920, 1080, 60), EncoderUnits::ONE);
        assert_eq!(cost(1280, 720, 60).milli(), 445);
        assert_eq!(cost(3840, 2160, 60).milli(), 4000);
        assert_eq!(cost(1920, 1080, 120).milli(), 2000);
    }
}
