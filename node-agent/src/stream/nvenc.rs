//! NVENC H.264, the encoder of GPU hosts (cargo feature `nvenc`).
//!
//! [`NvencH264`] opens one NVENC session per stream on a CUDA device, set up for interactive
//! streaming: preset P1 with ultra-low-latency tuning, CBR at the tier's bitrate with a
//! one-picture VBV, no B-frames, an infinite GOP (IDR pictures only when asked for), SPS and PPS
//! before every IDR, one slice per picture, and the Baseline profile (CAVLC, and none of the
//! FMO, ASO or redundant slices that Constrained Baseline excludes), which fits what `rtc`
//! offers players (`profile-level-id=42e01f;packetization-mode=1`).
//!
//! Pictures come in two ways:
//! - [`VideoEncoder::encode`], a picture in CPU memory (the synthetic scene, a CPU capture): it
//!   is packed as NV12 into a pitched host buffer and copied once into device memory that the
//!   session registered at start;
//! - [`NvencH264::encode_device`], the zero-copy path: on a GPU host the game's capture hands
//!   over the rendered frame as exported device memory (already NV12, converted on the GPU),
//!   which is imported into this encoder's CUDA context and registered with the session once
//!   ([`NvencH264::register_device_input`]); every later picture is encoded from it in place.
//!
//! The Video Codec SDK's session, buffers and registered resources borrow one another and are
//! not `Send`, so each encoder keeps them on a thread of its own and [`NvencH264`] talks to it
//! over channels; dropping the encoder closes its session before `drop` returns.
//!
//! Opening never panics on a host without the driver: the CUDA driver library is looked for
//! before anything loads it (cudarc panics when it cannot), and the first CUDA and NVENC calls
//! run under `catch_unwind`, since the SDK also panics on a driver older than its headers
//! (NVENC API 12.1). Every failure is an [`EncodeError`].

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::PathBuf;
use std::sync::{Arc, mpsc};
use std::thread;

use cudarc::driver::{CudaContext, DriverError, MappedBuffer};

use super::encode::{EncodeError, EncodedFrame, EncoderSettings, VideoEncoder};
use super::scene::I420Frame;

/// The backend's name, in logs, metrics and errors.
const NAME: &str = "nvenc";

/// What [`NvencH264::register_device_input`] runs on the encoder's thread to bring a captured
/// frame into the encoder's CUDA context: typically `CudaContext::import_external_memory` on
/// the file descriptor the capture exported, then `ExternalMemory::map_all`.
pub type ImportDeviceInput =
    Box<dyn FnOnce(&Arc<CudaContext>) -> Result<MappedBuffer, DriverError> + Send>;

/// A GPU-resident picture registered with one encoder's NVENC session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DeviceInputId(u32);

/// H.264 on NVENC, fed from CPU pictures ([`VideoEncoder::encode`]) or from device memory a
/// game's capture registered ([`NvencH264::encode_device`]).
pub struct NvencH264 {
    settings: EncoderSettings,
    device: String,
    /// Bytes per row of the NV12 picture the session reads CPU pictures from.
    pitch: usize,
    /// The host-side NV12 picture, handed to the encoder thread and back for each picture.
    staging: Option<Vec<u8>>,
    next_input: u32,
    requests: Option<mpsc::Sender<Request>>,
    replies: mpsc::Receiver<Reply>,
    thread: Option<thread::JoinHandle<()>>,
}

impl std::fmt::Debug for NvencH264 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NvencH264")
            .field("settings", &self.settings)
            .field("device", &self.device)
            .finish_non_exhaustive()
    }
}

impl NvencH264 {
    /// An encoder for `settings` on CUDA device `cuda_device` (a CUDA ordinal, which follows
    /// NVML's index only with `CUDA_DEVICE_ORDER=PCI_BUS_ID`).
    ///
    /// Fails with [`EncodeError::Setup`] where there is no NVIDIA driver, no such device, no
    /// NVENC on the GPU (A100, H100), no H.264 or NV12 input, or no free session.
    pub fn new(settings: EncoderSettings, cuda_device: u32) -> Result<Self, EncodeError> {
        check_settings(settings)?;
        let found = find_cuda_driver().map_err(|looked| {
            setup(format!(
                "no NVIDIA driver on this host: the CUDA driver library (libcuda.so.1) is in none \
                 of {looked}"
            ))
        })?;
        tracing::debug!(library = %found, cuda_device, "opening an NVENC session");
        let ordinal = usize::try_from(cuda_device)
            .map_err(|_| setup(format!("CUDA device {cuda_device} is out of range")))?;
        let ctx = open_cuda(ordinal)?;
        let device = match ctx.name() {
            Ok(name) => format!("{ordinal} ({name})"),
            Err(_) => ordinal.to_string(),
        };
        Self::start(settings, ctx, device)
    }

    /// The CUDA device the session runs on, with its name.
    pub fn device(&self) -> &str {
        &self.device
    }

    /// Brings a captured frame into the session, once per capture buffer: `import` runs on the
    /// encoder's thread and returns the frame's device memory mapped into the encoder's CUDA
    /// context, which the session registers (`register_cuda_resource`, an
    /// `NV_ENC_INPUT_RESOURCE_TYPE_CUDADEVICEPTR` resource).
    ///
    /// The memory holds an NV12 picture of the encoder's size: `pitch` bytes per row (a
    /// multiple of 4, at least the width), the luma rows, then the interleaved chroma rows.
    /// The registration lasts until [`NvencH264::unregister_device_input`] or the encoder's end.
    pub fn register_device_input(
        &mut self,
        pitch: u32,
        import: ImportDeviceInput,
    ) -> Result<DeviceInputId, EncodeError> {
        let width = u32::from(self.settings.width);
        if !pitch.is_multiple_of(4) || pitch < width {
            return Err(failed(format!(
                "a device picture's pitch must be a multiple of 4 and at least {width} bytes, \
                 not {pitch}"
            )));
        }
        let input = DeviceInputId(self.next_input);
        self.next_input = self.next_input.wrapping_add(1);
        match self.call(Request::Register {
            input,
            pitch,
            import,
        })? {
            Reply::Registered(result) => result.map(|()| input),
            other => Err(unexpected(&other)),
        }
    }

    /// Encodes the picture now in a registered device input; `keyframe` forces an IDR picture.
    ///
    /// This is the zero-copy path of GPU hosts: the frame never leaves the GPU. The caller
    /// makes sure the GPU work that wrote the frame has finished (a CUDA or Vulkan semaphore
    /// the capture waited on) and that nothing writes it until this returns.
    pub fn encode_device(
        &mut self,
        input: DeviceInputId,
        keyframe: bool,
    ) -> Result<EncodedFrame, EncodeError> {
        match self.call(Request::Device { input, keyframe })? {
            Reply::Encoded { result, .. } => result,
            other => Err(unexpected(&other)),
        }
    }

    /// Unregisters a device input; its memory mapping is released on the encoder's thread.
    pub fn unregister_device_input(&mut self, input: DeviceInputId) -> Result<(), EncodeError> {
        match self.call(Request::Unregister { input })? {
            Reply::Unregistered(result) => result,
            other => Err(unexpected(&other)),
        }
    }

    /// Starts the session's thread and waits until the session is open.
    fn start(
        settings: EncoderSettings,
        ctx: Arc<CudaContext>,
        device: String,
    ) -> Result<Self, EncodeError> {
        let pitch = input_pitch(settings.width);
        let (requests, request_rx) = mpsc::channel();
        let (reply_tx, replies) = mpsc::channel();
        let span = tracing::Span::current();
        let thread = thread::Builder::new()
            .name(format!("nvenc-{}", ctx.ordinal()))
            .spawn(move || {
                span.in_scope(|| run_session(ctx, settings, pitch, &request_rx, &reply_tx));
            })
            .map_err(|e| setup(format!("the encoder thread did not start: {e}")))?;
        let mut encoder = Self {
            settings,
            device,
            pitch,
            staging: None,
            next_input: 0,
            requests: Some(requests),
            replies,
            thread: Some(thread),
        };
        let error = match encoder.replies.recv() {
            Ok(Reply::Ready) => return Ok(encoder),
            Ok(Reply::Failed(e)) => e,
            Ok(other) => unexpected(&other),
            Err(_) => setup("the encoder thread stopped while opening the session"),
        };
        encoder.stop();
        Err(error)
    }

    /// Sends one request to the encoder's thread and waits for its answer.
    fn call(&mut self, request: Request) -> Result<Reply, EncodeError> {
        let gone = || failed("the encoder thread has stopped");
        self.requests
            .as_ref()
            .ok_or_else(gone)?
            .send(request)
            .map_err(|_| gone())?;
        match self.replies.recv() {
            Ok(Reply::Failed(e)) => Err(e),
            Ok(reply) => Ok(reply),
            Err(_) => Err(gone()),
        }
    }

    /// Closes the session: the thread sees its request channel close, drops the session and
    /// ends.
    fn stop(&mut self) {
        self.requests = None;
        if let Some(thread) = self.thread.take() {
            // A thread that panicked has reported it already (`Reply::Failed`).
            let _ = thread.join();
        }
    }
}

impl Drop for NvencH264 {
    fn drop(&mut self) {
        self.stop();
    }
}

impl VideoEncoder for NvencH264 {
    fn name(&self) -> &'static str {
        NAME
    }

    fn encode(&mut self, frame: &I420Frame, keyframe: bool) -> Result<EncodedFrame, EncodeError> {
        self.settings.check_size(frame)?;
        let mut picture = self.staging.take().unwrap_or_default();
        pack_nv12(frame, self.pitch, &mut picture);
        match self.call(Request::Host { picture, keyframe })? {
            Reply::Encoded { result, picture } => {
                self.staging = picture;
                result
            }
            other => Err(unexpected(&other)),
        }
    }
}

/// The encoder thread's body: the NVENC session.
#[cfg(not(feature = "nvenc-check"))]
fn run_session(
    ctx: Arc<CudaContext>,
    settings: EncoderSettings,
    pitch: usize,
    requests: &mpsc::Receiver<Request>,
    replies: &mpsc::Sender<Reply>,
) {
    worker::run(ctx, settings, pitch, requests, replies);
}

/// The encoder thread's body in an `nvenc-check` build, which compiles this backend without
/// linking libnvidia-encode: it has no session to open. Everything else is the same code,
/// and the session code ([`worker`]) is compiled and linted all the same, only not linked.
#[cfg(feature = "nvenc-check")]
fn run_session(
    _ctx: Arc<CudaContext>,
    _settings: EncoderSettings,
    _pitch: usize,
    _requests: &mpsc::Receiver<Request>,
    replies: &mpsc::Sender<Reply>,
) {
    let _ = replies.send(Reply::Failed(setup(
        "this agent was built with the `nvenc-check` feature, which compiles NVENC without \
         linking libnvidia-encode; build GPU hosts with `--features nvenc` alone",
    )));
}

/// What the encoder's thread is asked to do.
enum Request {
    /// Upload an NV12 picture (`pitch` bytes a row) and encode it.
    Host { picture: Vec<u8>, keyframe: bool },
    /// Import and register a device picture.
    Register {
        input: DeviceInputId,
        pitch: u32,
        import: ImportDeviceInput,
    },
    /// Encode a registered device picture.
    Device {
        input: DeviceInputId,
        keyframe: bool,
    },
    /// Unregister a device picture.
    Unregister { input: DeviceInputId },
}

/// What the encoder's thread answers.
enum Reply {
    /// The session is open.
    Ready,
    /// The session did not open, or the thread panicked.
    Failed(EncodeError),
    /// A picture was encoded; a host picture's buffer comes back for the next one.
    Encoded {
        result: Result<EncodedFrame, EncodeError>,
        picture: Option<Vec<u8>>,
    },
    /// A device picture was registered.
    Registered(Result<(), EncodeError>),
    /// A device picture was unregistered.
    Unregistered(Result<(), EncodeError>),
}

/// The session's thread: everything that touches NVENC.
#[cfg_attr(
    feature = "nvenc-check",
    allow(
        dead_code,
        reason = "an `nvenc-check` build compiles the session code but never runs it"
    )
)]
mod worker {
    use std::ffi::c_void;
    use std::panic::{AssertUnwindSafe, catch_unwind};
    use std::sync::{Arc, mpsc};
    use std::time::Duration;

    use bytes::Bytes;
    use cudarc::driver::{
        CudaContext, CudaSlice, CudaStream, DevicePtr, DeviceSlice, MappedBuffer,
    };
    use nvidia_video_codec_sdk::sys::nvEncodeAPI::{
        NV_ENC_BUFFER_FORMAT, NV_ENC_CODEC_CONFIG, NV_ENC_CODEC_H264_GUID, NV_ENC_CONFIG,
        NV_ENC_CONFIG_H264, NV_ENC_H264_ENTROPY_CODING_MODE, NV_ENC_H264_PROFILE_BASELINE_GUID,
        NV_ENC_INPUT_RESOURCE_TYPE, NV_ENC_PARAMS_RC_MODE, NV_ENC_PIC_PARAMS_H264, NV_ENC_PIC_TYPE,
        NV_ENC_PRESET_P1_GUID, NV_ENC_TUNING_INFO, NVENC_INFINITE_GOPLENGTH,
    };
    use nvidia_video_codec_sdk::{
        Bitstream, CodecPictureParams, EncodePictureParams, Encoder, EncoderInitParams,
        EncoderInput, ErrorKind, RegisteredResource, Session,
    };

    use super::{DeviceInputId, Reply, Request, failed, panic_text, setup};
    use crate::stream::encode::{EncodeError, EncodedFrame, EncoderSettings};

    /// The preset: the fastest, so that one NVENC engine carries the most streams; P2 buys a
    /// little quality for speed if a tier ever needs it.
    const PRESET: nvidia_video_codec_sdk::sys::nvEncodeAPI::GUID = NV_ENC_PRESET_P1_GUID;
    /// The tuning: no look-ahead, no reordering, the smallest encode latency.
    const TUNING: NV_ENC_TUNING_INFO = NV_ENC_TUNING_INFO::NV_ENC_TUNING_INFO_ULTRA_LOW_LATENCY;
    /// How often a busy encoder is asked again, a millisecond apart, before giving up.
    const BUSY_RETRIES: u32 = 20;

    /// Runs the session until the encoder hangs up. A panic in the SDK (it panics on a driver
    /// older than its headers, and in its `Drop`s when the driver fails) ends the thread with
    /// a [`Reply::Failed`] rather than taking the process down.
    pub(super) fn run(
        ctx: Arc<CudaContext>,
        settings: EncoderSettings,
        pitch: usize,
        requests: &mpsc::Receiver<Request>,
        replies: &mpsc::Sender<Reply>,
    ) {
        let mut opened = false;
        let served = catch_unwind(AssertUnwindSafe(|| {
            serve(&ctx, settings, pitch, requests, replies, &mut opened)
        }));
        let error = match served {
            Ok(Ok(())) => return,
            Ok(Err(e)) => e,
            Err(payload) => {
                let text = panic_text(payload.as_ref());
                tracing::error!(error = %text, opened, "the NVENC library panicked");
                if opened {
                    failed(format!(
                        "the NVENC library panicked ({text}); the session is gone"
                    ))
                } else {
                    setup(format!(
                        "the NVENC library failed ({text}); the driver must support NVENC API \
                         12.1 (R530 or later)"
                    ))
                }
            }
        };
        // The encoder may have hung up already; then nobody is waiting for the answer.
        let _ = replies.send(Reply::Failed(error));
    }

    fn serve(
        ctx: &Arc<CudaContext>,
        settings: EncoderSettings,
        pitch: usize,
        requests: &mpsc::Receiver<Request>,
        replies: &mpsc::Sender<Reply>,
        opened: &mut bool,
    ) -> Result<(), EncodeError> {
        ctx.bind_to_thread()
            .map_err(|e| setup(format!("the CUDA context cannot be used: {e}")))?;
        let session = open_session(ctx, settings)?;
        let stream = ctx.default_stream();
        let mut bitstream = session
            .create_output_bitstream()
            .map_err(|e| setup(format!("no output buffer: {e}")))?;
        let mut host = HostInput::new(&session, &stream, pitch, settings.height)?;
        // Declared after the session, so dropped before it: every registration ends before
        // the session does.
        let mut device: Vec<(DeviceInputId, RegisteredResource<'_, MappedBuffer>)> = Vec::new();
        let mut sequence = Sequence::default();
        if replies.send(Reply::Ready).is_err() {
            return Ok(());
        }
        *opened = true;
        for request in requests {
            let reply = match request {
                Request::Host { picture, keyframe } => {
                    let result = host.upload(&stream, &picture).and_then(|()| {
                        encode(
                            &session,
                            &mut host.registered,
                            &mut bitstream,
                            &mut sequence,
                            keyframe,
                        )
                    });
                    Reply::Encoded {
                        result,
                        picture: Some(picture),
                    }
                }
                Request::Device { input, keyframe } => {
                    let result = match device.iter_mut().find(|(id, _)| *id == input) {
                        Some((_, registered)) => encode(
                            &session,
                            registered,
                            &mut bitstream,
                            &mut sequence,
                            keyframe,
                        ),
                        None => Err(failed(format!("device input {input:?} is not registered"))),
                    };
                    Reply::Encoded {
                        result,
                        picture: None,
                    }
                }
                Request::Register {
                    input,
                    pitch,
                    import,
                } => Reply::Registered(
                    register(ctx, &session, settings, pitch, import)
                        .map(|registered| device.push((input, registered))),
                ),
                Request::Unregister { input } => {
                    let before = device.len();
                    device.retain(|(id, _)| *id != input);
                    Reply::Unregistered(if device.len() < before {
                        Ok(())
                    } else {
                        Err(failed(format!("device input {input:?} is not registered")))
                    })
                }
            };
            if replies.send(reply).is_err() {
                break;
            }
        }
        Ok(())
    }

    /// Opens an H.264 session with the streaming configuration.
    fn open_session(
        ctx: &Arc<CudaContext>,
        settings: EncoderSettings,
    ) -> Result<Session, EncodeError> {
        let encoder = Encoder::initialize_with_cuda(Arc::clone(ctx)).map_err(|e| {
            setup(format!(
                "no NVENC session on this GPU ({e}); GPUs without NVENC (A100, H100) cannot \
                 encode, and consumer GPUs cap concurrent sessions"
            ))
        })?;
        let codecs = encoder
            .get_encode_guids()
            .map_err(|e| setup(format!("the codecs were not listed: {e}")))?;
        if !codecs.contains(&NV_ENC_CODEC_H264_GUID) {
            return Err(setup("this GPU's NVENC does not encode H.264"));
        }
        let formats = encoder
            .get_supported_input_formats(NV_ENC_CODEC_H264_GUID)
            .map_err(|e| setup(format!("the input formats were not listed: {e}")))?;
        if !formats.contains(&NV_ENC_BUFFER_FORMAT::NV_ENC_BUFFER_FORMAT_NV12) {
            return Err(setup("this GPU's NVENC does not take NV12 pictures"));
        }
        // The SDK zero-fills the preset struct before the driver fills it in, and 0 is no
        // valid `frameFieldMode`: a driver that left it 0 would corrupt this `Result` (seen
        // with a stub library; a real driver writes FRAME there).
        let mut config = encoder
            .get_preset_config(NV_ENC_CODEC_H264_GUID, PRESET, TUNING)
            .map_err(|e| setup(format!("no P1 ultra-low-latency preset: {e}")))?
            .presetCfg;
        configure(&mut config, settings);
        let (width, height) = (u32::from(settings.width), u32::from(settings.height));
        let mut params = EncoderInitParams::new(NV_ENC_CODEC_H264_GUID, width, height);
        // Picture type decision stays with us (`enablePTD` is left 0): the SDK's safe
        // `EncodePictureParams` cannot set `NV_ENC_PIC_FLAG_FORCEIDR`, but it can set the
        // picture type, so a key frame is asked for as an IDR picture (see `encode`).
        params
            .preset_guid(PRESET)
            .tuning_info(TUNING)
            .encode_config(&mut config)
            .framerate(u32::from(settings.fps), 1)
            .display_aspect_ratio(width, height);
        encoder
            .start_session(NV_ENC_BUFFER_FORMAT::NV_ENC_BUFFER_FORMAT_NV12, params)
            .map_err(|e| setup(format!("the session did not start: {e}")))
    }

    /// The streaming configuration, over the preset's: CBR with a one-picture VBV (every
    /// picture close to the average size, so none waits behind a large one), an infinite GOP
    /// without B-frames, and the H.264 settings of [`h264_config`].
    pub(super) fn configure(config: &mut NV_ENC_CONFIG, settings: EncoderSettings) {
        let bps = settings.bitrate_kbps.saturating_mul(1000);
        config.profileGUID = NV_ENC_H264_PROFILE_BASELINE_GUID;
        config.gopLength = NVENC_INFINITE_GOPLENGTH;
        config.frameIntervalP = 1;
        let rc = &mut config.rcParams;
        rc.rateControlMode = NV_ENC_PARAMS_RC_MODE::NV_ENC_PARAMS_RC_CBR;
        rc.averageBitRate = bps;
        rc.maxBitRate = bps;
        rc.vbvBufferSize = bps / u32::from(settings.fps.max(1));
        rc.vbvInitialDelay = rc.vbvBufferSize;
        rc.set_zeroReorderDelay(1);
        // The codec settings are written whole: reading the preset's out of the union (to
        // change a few fields) would need `unsafe`.
        config.encodeCodecConfig = NV_ENC_CODEC_CONFIG {
            h264Config: h264_config(),
        };
    }

    /// H.264 for WebRTC players: Baseline tools only (CAVLC; the profile is set in
    /// [`configure`]), IDR pictures only on request, SPS/PPS repeated before each IDR so a
    /// player can join at any key frame, one slice a picture (RTP fragments it, FU-A), 4:2:0,
    /// level chosen by the driver.
    pub(super) fn h264_config() -> NV_ENC_CONFIG_H264 {
        let mut h264 = NV_ENC_CONFIG_H264 {
            idrPeriod: NVENC_INFINITE_GOPLENGTH,
            entropyCodingMode:
                NV_ENC_H264_ENTROPY_CODING_MODE::NV_ENC_H264_ENTROPY_CODING_MODE_CAVLC,
            chromaFormatIDC: 1,
            // sliceMode 3: `sliceModeData` slices a picture.
            sliceMode: 3,
            sliceModeData: 1,
            ..NV_ENC_CONFIG_H264::default()
        };
        h264.set_repeatSPSPPS(1);
        h264
    }

    /// Where the stream is: the next picture's number, and whether it must be an IDR picture
    /// whatever the caller asked: the first one, and the one after a failed picture (a player
    /// may have missed a reference).
    struct Sequence {
        next: u64,
        need_idr: bool,
    }

    impl Default for Sequence {
        fn default() -> Self {
            Self {
                next: 0,
                need_idr: true,
            }
        }
    }

    /// Encodes the picture in `input` into `bitstream` and copies the access unit out.
    fn encode<I: EncoderInput>(
        session: &Session,
        input: &mut I,
        bitstream: &mut Bitstream<'_>,
        sequence: &mut Sequence,
        keyframe: bool,
    ) -> Result<EncodedFrame, EncodeError> {
        let frame = sequence.next;
        sequence.next += 1;
        let idr = keyframe || sequence.need_idr;
        let encoded = encode_picture(session, input, bitstream, frame, idr);
        sequence.need_idr = encoded.is_err();
        encoded
    }

    fn encode_picture<I: EncoderInput>(
        session: &Session,
        input: &mut I,
        bitstream: &mut Bitstream<'_>,
        frame: u64,
        idr: bool,
    ) -> Result<EncodedFrame, EncodeError> {
        let mut tries = 0;
        loop {
            let params = EncodePictureParams {
                input_timestamp: frame,
                picture_type: if idr {
                    NV_ENC_PIC_TYPE::NV_ENC_PIC_TYPE_IDR
                } else {
                    NV_ENC_PIC_TYPE::NV_ENC_PIC_TYPE_P
                },
                // With picture type decision off, a P picture is a reference only when it says
                // so; each one is, as the next picture predicts from it.
                codec_params: Some(CodecPictureParams::H264(NV_ENC_PIC_PARAMS_H264 {
                    refPicFlag: 1,
                    ..NV_ENC_PIC_PARAMS_H264::default()
                })),
            };
            match session.encode_picture(input, bitstream, params) {
                Ok(()) => break,
                Err(e) if e.kind() == ErrorKind::EncoderBusy && tries < BUSY_RETRIES => {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(1));
                }
                // No B-frames and no look-ahead: the encoder never holds a picture back.
                Err(e) => return Err(failed(format!("encoding picture {frame}: {e}"))),
            }
        }
        let lock = bitstream
            .lock()
            .map_err(|e| failed(format!("reading picture {frame}: {e}")))?;
        // The output buffer is reused for the next picture, so the access unit is copied out
        // once; from here on it moves as `Bytes`.
        Ok(EncodedFrame {
            data: Bytes::copy_from_slice(lock.data()),
            keyframe: lock.picture_type() == NV_ENC_PIC_TYPE::NV_ENC_PIC_TYPE_IDR,
        })
    }

    /// Imports a device picture and registers it with the session.
    fn register<'s>(
        ctx: &Arc<CudaContext>,
        session: &'s Session,
        settings: EncoderSettings,
        pitch: u32,
        import: super::ImportDeviceInput,
    ) -> Result<RegisteredResource<'s, MappedBuffer>, EncodeError> {
        let mapped = import(ctx).map_err(|e| failed(format!("importing a device picture: {e}")))?;
        let needed = nv12_len(
            usize::try_from(pitch).unwrap_or(usize::MAX),
            settings.height,
        );
        if mapped.len() < needed {
            return Err(failed(format!(
                "a device picture of {} bytes is smaller than its NV12 picture ({needed} bytes)",
                mapped.len()
            )));
        }
        session
            .register_cuda_resource(pitch, mapped)
            .map_err(|e| failed(format!("registering a device picture: {e}")))
    }

    /// The device memory CPU pictures are copied to, registered with the session once.
    ///
    /// The SDK's own input buffers are written through `BufferLock::write`, which is `unsafe`
    /// (and ignores the pitch), so CPU pictures take the same road as captured frames: device
    /// memory we own, registered as a CUDA device pointer. Its fields drop in order: the
    /// registration ends before the memory is freed.
    struct HostInput<'s> {
        registered: RegisteredResource<'s, ()>,
        memory: CudaSlice<u8>,
    }

    impl<'s> HostInput<'s> {
        fn new(
            session: &'s Session,
            stream: &Arc<CudaStream>,
            pitch: usize,
            height: u16,
        ) -> Result<Self, EncodeError> {
            let memory = stream
                .alloc_zeros::<u8>(nv12_len(pitch, height))
                .map_err(|e| setup(format!("no device memory for the input picture: {e}")))?;
            let address = {
                let (address, _synced) = memory.device_ptr(stream);
                usize::try_from(address)
                    .map_err(|_| setup("a device address wider than a host pointer"))?
            };
            let pitch = u32::try_from(pitch).map_err(|_| setup("the input pitch is too large"))?;
            // A device address, never dereferenced on the host: a pointer without provenance.
            let resource = std::ptr::without_provenance_mut::<c_void>(address);
            let registered = session
                .register_generic_resource(
                    (),
                    NV_ENC_INPUT_RESOURCE_TYPE::NV_ENC_INPUT_RESOURCE_TYPE_CUDADEVICEPTR,
                    resource,
                    pitch,
                )
                .map_err(|e| setup(format!("the input picture was not registered: {e}")))?;
            Ok(Self { registered, memory })
        }

        /// Copies a packed NV12 picture to the device and waits for the copy: NVENC reads the
        /// memory outside the stream's ordering.
        fn upload(&mut self, stream: &Arc<CudaStream>, picture: &[u8]) -> Result<(), EncodeError> {
            if picture.len() != self.memory.len() {
                return Err(failed(format!(
                    "a {}-byte picture for a {}-byte input",
                    picture.len(),
                    self.memory.len()
                )));
            }
            stream
                .memcpy_htod(picture, &mut self.memory)
                .and_then(|()| stream.synchronize())
                .map_err(|e| failed(format!("copying the picture to the GPU: {e}")))
        }
    }

    /// Bytes of an NV12 picture of `height` rows of `pitch` bytes.
    pub(super) fn nv12_len(pitch: usize, height: u16) -> usize {
        let height = usize::from(height);
        pitch.saturating_mul(height + height / 2)
    }

    #[cfg(test)]
    mod tests {
        use nvidia_video_codec_sdk::sys::nvEncodeAPI::{
            NV_ENC_MV_PRECISION, NV_ENC_PARAMS_FRAME_FIELD_MODE, NV_ENC_RC_PARAMS,
        };

        use super::*;

        #[test]
        fn the_configuration_is_cbr_with_an_infinite_gop_and_no_b_frames() {
            // Not `NV_ENC_CONFIG::default()`: the SDK zero-fills it, and 0 is no
            // `NV_ENC_PARAMS_FRAME_FIELD_MODE` (a driver's preset sets FRAME).
            let mut config = NV_ENC_CONFIG {
                version: 0,
                profileGUID: NV_ENC_CODEC_H264_GUID,
                gopLength: 30,
                frameIntervalP: 3,
                monoChromeEncoding: 0,
                frameFieldMode:
                    NV_ENC_PARAMS_FRAME_FIELD_MODE::NV_ENC_PARAMS_FRAME_FIELD_MODE_FRAME,
                mvPrecision: NV_ENC_MV_PRECISION::NV_ENC_MV_PRECISION_DEFAULT,
                rcParams: NV_ENC_RC_PARAMS::default(),
                encodeCodecConfig: NV_ENC_CODEC_CONFIG {
                    h264Config: NV_ENC_CONFIG_H264::default(),
                },
                reserved: [0; 278],
                reserved2: [std::ptr::null_mut(); 64],
            };
            let settings = EncoderSettings {
                width: 1280,
                height: 720,
                fps: 60,
                bitrate_kbps: 6000,
            };
            configure(&mut config, settings);
            assert_eq!(config.profileGUID, NV_ENC_H264_PROFILE_BASELINE_GUID);
            assert_eq!(config.gopLength, NVENC_INFINITE_GOPLENGTH);
            assert_eq!(config.frameIntervalP, 1);
            let rc = &config.rcParams;
            assert_eq!(
                rc.rateControlMode,
                NV_ENC_PARAMS_RC_MODE::NV_ENC_PARAMS_RC_CBR
            );
            assert_eq!((rc.averageBitRate, rc.maxBitRate), (6_000_000, 6_000_000));
            assert_eq!(rc.vbvBufferSize, 100_000, "one picture at 60 fps");
            assert_eq!(rc.zeroReorderDelay(), 1);

            let h264 = h264_config();
            assert_eq!(h264.idrPeriod, NVENC_INFINITE_GOPLENGTH);
            assert_eq!(h264.repeatSPSPPS(), 1);
            assert_eq!(
                h264.entropyCodingMode,
                NV_ENC_H264_ENTROPY_CODING_MODE::NV_ENC_H264_ENTROPY_CODING_MODE_CAVLC
            );
            assert_eq!((h264.sliceMode, h264.sliceModeData), (3, 1));
            assert_eq!(h264.chromaFormatIDC, 1);
        }
    }
}

/// Packs `frame` as NV12 in rows of `pitch` bytes: the luma rows, then the chroma rows with U
/// and V interleaved. `out` is reused from picture to picture; the padding stays zero.
fn pack_nv12(frame: &I420Frame, pitch: usize, out: &mut Vec<u8>) {
    let width = usize::from(frame.width());
    let height = usize::from(frame.height());
    let len = pitch.saturating_mul(height + height / 2);
    if out.len() != len {
        out.clear();
        out.resize(len, 0);
    }
    let (luma, chroma) = out.split_at_mut(pitch.saturating_mul(height).min(len));
    for (row, src) in luma
        .chunks_exact_mut(pitch)
        .zip(frame.y().chunks_exact(width))
    {
        if let Some(dst) = row.get_mut(..width) {
            dst.copy_from_slice(src);
        }
    }
    let half = width / 2;
    let rows = chroma
        .chunks_exact_mut(pitch)
        .zip(frame.u().chunks_exact(half))
        .zip(frame.v().chunks_exact(half));
    for ((row, u), v) in rows {
        for ((pair, &u), &v) in row.chunks_exact_mut(2).zip(u).zip(v) {
            if let [cb, cr] = pair {
                *cb = u;
                *cr = v;
            }
        }
    }
}

/// The pitch of the NV12 picture CPU pictures are copied into: rows aligned to 256 bytes, as
/// `cuMemAllocPitch` would give.
fn input_pitch(width: u16) -> usize {
    usize::from(width).next_multiple_of(256)
}

/// Settings NVENC cannot take, refused before anything is loaded.
fn check_settings(settings: EncoderSettings) -> Result<(), EncodeError> {
    let EncoderSettings {
        width,
        height,
        fps,
        bitrate_kbps,
    } = settings;
    if width == 0 || height == 0 || !width.is_multiple_of(2) || !height.is_multiple_of(2) {
        return Err(setup(format!(
            "a {width}x{height} picture: NV12 needs a non-zero, even width and height"
        )));
    }
    if fps == 0 || bitrate_kbps == 0 {
        return Err(setup(format!(
            "{fps} fps at {bitrate_kbps} kbit/s: both must be above zero"
        )));
    }
    Ok(())
}

/// Where the CUDA driver library is: `Ok` with the place it was found, or `Err` with the
/// places looked in. cudarc's loader panics where `dlopen` finds none, so this looks first
/// where `dlopen` would: `LD_LIBRARY_PATH`, the loader's cache and the usual directories of
/// distribution packages, the NVIDIA installer, containers (`/usr/local/nvidia`) and WSL.
fn find_cuda_driver() -> Result<String, String> {
    const NAMES: [&str; 2] = ["libcuda.so.1", "libcuda.so"];
    const DIRS: [&str; 10] = [
        "/usr/lib/x86_64-linux-gnu",
        "/usr/lib/aarch64-linux-gnu",
        "/usr/lib64",
        "/usr/lib",
        "/lib/x86_64-linux-gnu",
        "/lib64",
        "/usr/local/nvidia/lib64",
        "/usr/local/nvidia/lib",
        "/usr/lib/wsl/lib",
        "/run/opengl-driver/lib",
    ];
    const CACHE: &str = "/etc/ld.so.cache";
    let from_env: Vec<PathBuf> = std::env::var_os("LD_LIBRARY_PATH")
        .map(|paths| std::env::split_paths(&paths).collect())
        .unwrap_or_default();
    let dirs = from_env
        .iter()
        .cloned()
        .chain(DIRS.iter().map(PathBuf::from));
    for dir in dirs {
        for name in NAMES {
            let path = dir.join(name);
            if path.exists() {
                return Ok(path.display().to_string());
            }
        }
    }
    if let Ok(cache) = std::fs::read(CACHE)
        && cache
            .windows(NAMES[0].len())
            .any(|w| w == NAMES[0].as_bytes())
    {
        return Ok(format!("{} (in {CACHE})", NAMES[0]));
    }
    let env = if from_env.is_empty() {
        String::new()
    } else {
        "LD_LIBRARY_PATH, ".to_owned()
    };
    Err(format!("{env}{CACHE} and {}", DIRS.join(", ")))
}

/// Opens a CUDA context on `ordinal`, turning cudarc's panics (no loadable driver library, a
/// driver without a function its bindings expect) into errors.
fn open_cuda(ordinal: usize) -> Result<Arc<CudaContext>, EncodeError> {
    match catch_unwind(AssertUnwindSafe(|| CudaContext::new(ordinal))) {
        Ok(Ok(ctx)) => Ok(ctx),
        Ok(Err(e)) => Err(setup(format!("CUDA device {ordinal} did not open: {e}"))),
        Err(payload) => Err(setup(format!(
            "the CUDA driver library (libcuda) could not be loaded: {}",
            panic_text(payload.as_ref())
        ))),
    }
}

/// The message of a caught panic.
fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_owned())
}

fn setup(detail: impl Into<String>) -> EncodeError {
    EncodeError::Setup {
        encoder: NAME,
        detail: detail.into(),
    }
}

fn failed(detail: impl Into<String>) -> EncodeError {
    EncodeError::Failed {
        encoder: NAME,
        detail: detail.into(),
    }
}

/// An answer that does not fit the request: a bug in this module, reported, not panicked on.
fn unexpected(reply: &Reply) -> EncodeError {
    let kind = match reply {
        Reply::Ready => "ready",
        Reply::Failed(_) => "failed",
        Reply::Encoded { .. } => "encoded",
        Reply::Registered(_) => "registered",
        Reply::Unregistered(_) => "unregistered",
    };
    failed(format!("the encoder thread answered `{kind}` out of turn"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stream::encode::tests::settings;

    /// This machine has no NVIDIA driver: opening is an error that says so, not a panic.
    #[test]
    fn opening_without_the_driver_is_a_setup_error_that_names_it() {
        if find_cuda_driver().is_ok() {
            eprintln!("skipped: this host has the CUDA driver library");
            return;
        }
        let err = NvencH264::new(settings(), 0).unwrap_err();
        let EncodeError::Setup { encoder, detail } = &err else {
            panic!("not a setup error: {err:?}");
        };
        assert_eq!(*encoder, "nvenc");
        assert!(detail.contains("libcuda.so.1"), "{detail}");
        assert!(detail.contains("no NVIDIA driver"), "{detail}");
    }

    /// cudarc panics when it cannot load libcuda; the guard turns that into an error.
    #[test]
    fn a_cuda_library_that_does_not_load_is_an_error_not_a_panic() {
        if find_cuda_driver().is_ok() {
            eprintln!("skipped: this host has the CUDA driver library");
            return;
        }
        let err = open_cuda(0).unwrap_err();
        let EncodeError::Setup { detail, .. } = &err else {
            panic!("not a setup error: {err:?}");
        };
        assert!(detail.contains("could not be loaded"), "{detail}");
        assert!(detail.contains("cuda"), "{detail}");
    }

    #[test]
    fn settings_nvenc_cannot_take_are_refused_first() {
        for bad in [
            EncoderSettings {
                width: 321,
                ..settings()
            },
            EncoderSettings {
                height: 0,
                ..settings()
            },
            EncoderSettings {
                fps: 0,
                ..settings()
            },
            EncoderSettings {
                bitrate_kbps: 0,
                ..settings()
            },
        ] {
            assert!(
                matches!(NvencH264::new(bad, 0), Err(EncodeError::Setup { .. })),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn i420_is_packed_as_pitched_nv12() {
        let (width, height, pitch) = (64usize, 36usize, 80usize);
        let mut frame = I420Frame::new(64, 36).unwrap();
        {
            let (y, u, v) = frame.planes_mut();
            let fill = |plane: &mut [u8], values: std::ops::Range<u8>| {
                plane
                    .iter_mut()
                    .zip(values.cycle())
                    .for_each(|(b, x)| *b = x);
            };
            fill(y, 0..251);
            fill(u, 100..107);
            fill(v, 200..205);
        }
        let mut out = vec![0xff; 3];
        for _ in 0..2 {
            // A new buffer, then the same one again: the same picture.
            pack_nv12(&frame, pitch, &mut out);
            assert_eq!(out.len(), worker::nv12_len(pitch, 36));
            assert_eq!(out.len(), pitch * height * 3 / 2);
            for (r, row) in out.chunks_exact(pitch).enumerate() {
                let (picture, padding) = row.split_at(width);
                assert!(padding.iter().all(|&b| b == 0), "row {r}'s padding");
                if r < height {
                    assert_eq!(picture, &frame.y()[r * width..][..width], "luma row {r}");
                } else {
                    let c = r - height;
                    let u = &frame.u()[c * width / 2..][..width / 2];
                    let v = &frame.v()[c * width / 2..][..width / 2];
                    let interleaved: Vec<u8> =
                        u.iter().zip(v).flat_map(|(&u, &v)| [u, v]).collect();
                    assert_eq!(picture, interleaved, "chroma row {c}");
                }
            }
        }
    }

    #[test]
    fn the_input_pitch_is_aligned_and_holds_a_row() {
        assert_eq!(input_pitch(320), 512);
        assert_eq!(input_pitch(1920), 2048);
        assert_eq!(input_pitch(256), 256);
    }

    #[test]
    #[ignore = "needs an NVIDIA GPU with NVENC and the driver"]
    fn a_gpu_encodes_idr_then_p_pictures_and_idr_on_request() {
        use crate::stream::scene::SyntheticScene;

        let s = settings();
        let mut enc = NvencH264::new(s, 0).unwrap();
        let mut scene = SyntheticScene::new(s.width, s.height).unwrap();
        let mut frame = I420Frame::new(s.width, s.height).unwrap();
        let mut keyframes = Vec::new();
        for n in 0..6u64 {
            scene.render(n, &mut frame).unwrap();
            let out = enc.encode(&frame, n == 4).unwrap();
            assert!(!out.data.is_empty(), "picture {n} is empty");
            assert!(out.data.starts_with(&[0, 0, 0, 1]) || out.data.starts_with(&[0, 0, 1]));
            keyframes.push(out.keyframe);
        }
        assert_eq!(keyframes, [true, false, false, false, true, false]);
    }
}
