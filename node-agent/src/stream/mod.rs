//! Streaming a game to its player: WHEP signalling, the media pipeline (frame source →
//! encoder → WebRTC H.264 track) and the input data channel.
//!
//! - [`whep`]: the HTTP endpoint players connect to;
//! - [`streams`]: the node's live streams, between WHEP, the peers and the core;
//! - [`rtc`]: every use of the WebRTC stack, behind one small interface;
//! - [`pipeline`]: one stream's paced source → encoder → peer loop;
//! - [`source`]: where pictures come from;
//! - [`capture`]: frames and input between a game process and its stream;
//! - [`encode`]: H.264 encoders (software here; NVENC on GPU hosts);
//! - `nvenc` (feature `nvenc`): the NVENC H.264 encoder of GPU hosts;
//! - [`input`]: the compact binary input format of the `input` data channel;
//! - [`scene`]: the synthetic game's picture, with the markers a client reads.

pub mod capture;
pub mod encode;
pub mod input;
#[cfg(feature = "nvenc")]
pub mod nvenc;
pub mod pipeline;
pub mod rtc;
pub mod scene;
pub mod source;
pub mod streams;
pub mod whep;

pub use streams::{StreamOptions, Streams};

use framecast_shared::config::agent::{StreamEncoder, WhepConfig};

impl StreamOptions {
    /// The options `[whep]` in `agent.toml` sets, for an agent whose data directory is
    /// `data_dir`.
    pub fn from_config(whep: &WhepConfig, data_dir: &std::path::Path) -> Self {
        Self {
            rtc: rtc::RtcOptions {
                loopback_candidates: whep.loopback_candidates,
                public_ips: whep.public_ips.clone(),
                udp_ports: whep.udp_port_min.zip(whep.udp_port_max),
            },
            software_max_fps: whep.software_max_fps,
            capture_dir: Some(capture::capture_dir(data_dir)),
            encoder: match whep.encoder {
                StreamEncoder::Auto => encode::EncoderChoice::Auto,
                StreamEncoder::Software => encode::EncoderChoice::Software,
                StreamEncoder::Nvenc => encode::EncoderChoice::Nvenc,
            },
            connect_timeout: std::time::Duration::from_secs(u64::from(whep.connect_timeout_s)),
        }
    }
}
