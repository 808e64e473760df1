//! Video encoders: a picture in, one H.264 access unit (Annex-B) out.
//!
//! Two backends sit behind [`VideoEncoder`]: NVENC on GPU hosts, fed GPU-resident frames
//! (see `docs/ARCHITECTURE.md`, "Streaming"), and [`SoftwareH264`] (Cisco's OpenH264, built
//! from bundled source) wherever there is no GPU: in dev mode, tests and CI.

use bytes::Bytes;

use super::scene::I420Frame;

/// What an encoder is asked to produce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EncoderSettings {
    /// Frame width in pixels (even).
    pub width: u16,
    /// Frame height in pixels (even).
    pub height: u16,
    /// Frames per second.
    pub fps: u16,
    /// Target bitrate in kbit/s.
    pub bitrate_kbps: u32,
}

impl EncoderSettings {
    /// `Ok` when `frame` has the size these settings encode.
    pub fn check_size(&self, frame: &I420Frame) -> Result<(), EncodeError> {
        if frame.width() == self.width && frame.height() == self.height {
            Ok(())
        } else {
            Err(EncodeError::WrongSize {
                width: self.width,
                height: self.height,
                got_width: frame.width(),
                got_height: frame.height(),
            })
        }
    }
}

/// One encoded picture.
#[derive(Debug, Clone)]
pub struct EncodedFrame {
    /// The access unit in Annex-B byte-stream format; empty when the encoder skipped the
    /// picture (rate control).
    pub data: Bytes,
    /// Whether it is an IDR picture a decoder can start from.
    pub keyframe: bool,
}

/// Why a picture could not be encoded.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    /// The encoder could not be set up.
    #[error("the {encoder} encoder could not be set up: {detail}")]
    Setup {
        /// Which encoder.
        encoder: &'static str,
        /// What it said.
        detail: String,
    },
    /// The picture does not match the encoder's settings.
    #[error("a {got_width}x{got_height} picture for a {width}x{height} encoder")]
    WrongSize {
        /// The encoder's width.
        width: u16,
        /// The encoder's height.
        height: u16,
        /// The picture's width.
        got_width: u16,
        /// The picture's height.
        got_height: u16,
    },
    /// The encoder failed on a picture.
    #[error("the {encoder} encoder failed: {detail}")]
    Failed {
        /// Which encoder.
        encoder: &'static str,
        /// What it said.
        detail: String,
    },
}

/// A video encoder of one stream.
pub trait VideoEncoder: Send {
    /// The backend's name, for logs and metrics (`openh264`, `nvenc`).
    fn name(&self) -> &'static str;

    /// Encodes `frame`; `keyframe` forces an IDR picture (a new player, a lost picture).
    fn encode(&mut self, frame: &I420Frame, keyframe: bool) -> Result<EncodedFrame, EncodeError>;
}

/// Which backend [`open`] gives a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EncoderChoice {
    /// NVENC where the agent was built with it (feature `nvenc`), the stream has a CUDA device
    /// and a session opens; OpenH264 otherwise.
    #[default]
    Auto,
    /// OpenH264, always.
    Software,
    /// NVENC, or the reason there is none.
    Nvenc,
}

/// The encoder for a stream: `cuda_device` is the CUDA ordinal of the stream's GPU, if it has
/// one, and `prefer` says which backend may be used.
///
/// [`EncoderChoice::Auto`] falls back to OpenH264 when NVENC does not open, with a warning
/// naming the reason; it falls back quietly (a debug line) where NVENC is not an option: an
/// agent built without the `nvenc` feature, or a stream without a GPU.
pub fn open(
    settings: EncoderSettings,
    cuda_device: Option<u32>,
    prefer: EncoderChoice,
) -> Result<Box<dyn VideoEncoder>, EncodeError> {
    match prefer {
        EncoderChoice::Software => software(settings),
        EncoderChoice::Nvenc => nvenc(settings, cuda_device),
        EncoderChoice::Auto if !cfg!(feature = "nvenc") || cuda_device.is_none() => {
            tracing::debug!(
                nvenc_built = cfg!(feature = "nvenc"),
                ?cuda_device,
                "NVENC is not an option for this stream; encoding in software"
            );
            software(settings)
        }
        EncoderChoice::Auto => nvenc(settings, cuda_device).or_else(|e| {
            tracing::warn!(?cuda_device, error = %e, "NVENC did not open; encoding in software");
            software(settings)
        }),
    }
}

fn software(settings: EncoderSettings) -> Result<Box<dyn VideoEncoder>, EncodeError> {
    Ok(Box::new(SoftwareH264::new(settings)?))
}

#[cfg(feature = "nvenc")]
fn nvenc(
    settings: EncoderSettings,
    cuda_device: Option<u32>,
) -> Result<Box<dyn VideoEncoder>, EncodeError> {
    let device = cuda_device.ok_or_else(|| EncodeError::Setup {
        encoder: "nvenc",
        detail: "the stream has no GPU to encode on".to_owned(),
    })?;
    Ok(Box::new(super::nvenc::NvencH264::new(settings, device)?))
}

#[cfg(not(feature = "nvenc"))]
fn nvenc(
    _settings: EncoderSettings,
    _cuda_device: Option<u32>,
) -> Result<Box<dyn VideoEncoder>, EncodeError> {
    Err(EncodeError::Setup {
        encoder: "nvenc",
        detail: "this agent was built without the `nvenc` feature (build GPU hosts with \
                 `--features nvenc`)"
            .to_owned(),
    })
}

/// H.264 in software (OpenH264), Constrained Baseline, for hosts without NVENC.
///
/// Set up for interactive streaming: bitrate rate control at the tier's bitrate, no
/// B-frames (Baseline has none), a long IDR period (key frames come when a player asks for
/// one), and no frame skipping, so every rendered frame reaches the player.
pub struct SoftwareH264 {
    settings: EncoderSettings,
    encoder: openh264::encoder::Encoder,
}

impl std::fmt::Debug for SoftwareH264 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SoftwareH264")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl SoftwareH264 {
    /// An encoder for `settings`.
    pub fn new(settings: EncoderSettings) -> Result<Self, EncodeError> {
        use openh264::encoder::{
            BitRate, EncoderConfig, FrameRate, IntraFramePeriod, Profile, RateControlMode,
            UsageType,
        };
        let config = EncoderConfig::new()
            .bitrate(BitRate::from_bps(
                settings.bitrate_kbps.saturating_mul(1000),
            ))
            .max_frame_rate(FrameRate::from_hz(f32::from(settings.fps)))
            .rate_control_mode(RateControlMode::Bitrate)
            .usage_type(UsageType::ScreenContentRealTime)
            .profile(Profile::Baseline)
            .skip_frames(false)
            .adaptive_quantization(false)
            .background_detection(false)
            .debug(false)
            .intra_frame_period(IntraFramePeriod::from_num_frames(0))
            .num_threads(1);
        let encoder = openh264::encoder::Encoder::with_api_config(
            openh264::OpenH264API::from_source(),
            config,
        )
        .map_err(|e| EncodeError::Setup {
            encoder: "openh264",
            detail: e.to_string(),
        })?;
        Ok(Self { settings, encoder })
    }
}

impl VideoEncoder for SoftwareH264 {
    fn name(&self) -> &'static str {
        "openh264"
    }

    fn encode(&mut self, frame: &I420Frame, keyframe: bool) -> Result<EncodedFrame, EncodeError> {
        self.settings.check_size(frame)?;
        if keyframe {
            self.encoder.force_intra_frame();
        }
        let stream = self
            .encoder
            .encode(&Planes(frame))
            .map_err(|e| EncodeError::Failed {
                encoder: "openh264",
                detail: e.to_string(),
            })?;
        let keyframe = matches!(stream.frame_type(), openh264::encoder::FrameType::IDR);
        // The encoder's output buffer is reused for the next picture, so the access unit is
        // copied out once; from here on it moves as `Bytes` (reference-counted, sliced by the
        // RTP packetizer without copying).
        let mut data = Vec::new();
        stream.write_vec(&mut data);
        Ok(EncodedFrame {
            data: Bytes::from(data),
            keyframe,
        })
    }
}

/// An [`I420Frame`] as OpenH264 reads it.
struct Planes<'a>(&'a I420Frame);

impl openh264::formats::YUVSource for Planes<'_> {
    fn dimensions(&self) -> (usize, usize) {
        (usize::from(self.0.width()), usize::from(self.0.height()))
    }

    fn strides(&self) -> (usize, usize, usize) {
        let w = usize::from(self.0.width());
        (w, w / 2, w / 2)
    }

    fn y(&self) -> &[u8] {
        self.0.y()
    }

    fn u(&self) -> &[u8] {
        self.0.u()
    }

    fn v(&self) -> &[u8] {
        self.0.v()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::stream::scene::SyntheticScene;

    /// NAL unit types of an Annex-B access unit.
    fn nal_types(au: &[u8]) -> Vec<u8> {
        openh264::nal_units(au)
            .filter_map(|nal| {
                // Skip the start code (00 00 01 or 00 00 00 01).
                let start = nal.iter().position(|&b| b == 1)? + 1;
                nal.get(start).map(|h| h & 0x1f)
            })
            .collect()
    }

    /// A small stream, quick to encode in a debug build.
    pub(crate) fn settings() -> EncoderSettings {
        EncoderSettings {
            width: 320,
            height: 180,
            fps: 30,
            bitrate_kbps: 1000,
        }
    }

    #[test]
    fn the_first_picture_and_every_forced_one_are_idr_with_parameter_sets() {
        let s = settings();
        let mut enc = SoftwareH264::new(s).unwrap();
        let mut scene = SyntheticScene::new(s.width, s.height).unwrap();
        let mut frame = I420Frame::new(s.width, s.height).unwrap();
        let mut kinds = Vec::new();
        for n in 0..6u64 {
            scene.render(n, &mut frame).unwrap();
            let out = enc.encode(&frame, n == 4).unwrap();
            assert!(!out.data.is_empty(), "frame {n} was skipped");
            kinds.push((out.keyframe, nal_types(&out.data)));
        }
        // SPS (7), PPS (8) and an IDR slice (5) start the stream and every forced key frame.
        assert!(
            kinds[0].0 && kinds[0].1.starts_with(&[7, 8, 5]),
            "{kinds:?}"
        );
        assert!(kinds[4].0 && kinds[4].1.contains(&5), "{kinds:?}");
        for n in [1, 2, 3, 5] {
            assert!(!kinds[n].0, "frame {n} is not a key frame: {kinds:?}");
            assert!(kinds[n].1.contains(&1), "frame {n} has a non-IDR slice");
        }
    }

    #[test]
    fn auto_and_software_give_openh264_without_nvenc() {
        let mut cases = vec![
            (None, EncoderChoice::Auto),
            (None, EncoderChoice::Software),
            (Some(0), EncoderChoice::Software),
            // No such device: with the `nvenc` feature Auto tries NVENC, fails, falls back.
            (Some(u32::MAX), EncoderChoice::Auto),
        ];
        if !cfg!(feature = "nvenc") {
            cases.push((Some(0), EncoderChoice::Auto));
        }
        for (device, prefer) in cases {
            let enc = open(settings(), device, prefer).unwrap();
            assert_eq!(enc.name(), "openh264", "{device:?} {prefer:?}");
        }
    }

    #[test]
    #[cfg(not(feature = "nvenc"))]
    fn nvenc_without_the_feature_is_an_error_that_names_it() {
        for device in [None, Some(0)] {
            let Err(EncodeError::Setup { encoder, detail }) =
                open(settings(), device, EncoderChoice::Nvenc)
            else {
                panic!("NVENC opened in an agent built without it");
            };
            assert_eq!(encoder, "nvenc");
            assert!(detail.contains("`nvenc` feature"), "{detail}");
        }
    }

    #[test]
    #[cfg(feature = "nvenc")]
    fn nvenc_without_a_device_is_an_error() {
        let Err(EncodeError::Setup { encoder, detail }) =
            open(settings(), None, EncoderChoice::Nvenc)
        else {
            panic!("NVENC opened without a device");
        };
        assert_eq!(encoder, "nvenc");
        assert!(detail.contains("no GPU"), "{detail}");
    }

    #[test]
    fn a_picture_of_another_size_is_an_error() {
        let mut enc = SoftwareH264::new(settings()).unwrap();
        let frame = I420Frame::new(640, 360).unwrap();
        assert!(matches!(
            enc.encode(&frame, false),
            Err(EncodeError::WrongSize { got_width: 640, .. })
        ));
    }
}
