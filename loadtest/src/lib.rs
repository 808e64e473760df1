//! `framecast-loadtest` as a library: scenarios, the engines that run them and their reports,
//! for the binary, the tests and anyone who wants to drive a run from code.
//!
//! - [`scenario`]: the scenario files;
//! - [`demand`]: a scenario's requests, the same for every engine and strategy;
//! - [`sim`]: the discrete-event engine over the real placement engine;
//! - [`live`]: a real broker and agents on loopback, driven open-loop over HTTP;
//! - [`webrtc`]: real WebRTC players against dev mode: how many streams a node holds;
//! - [`http_client`]: the broker's HTTP API as `live` and `webrtc` call it, and how both
//!   name refusals and unanswered requests;
//! - [`compare`]: one demand under several strategies, and one GPU per player against pooling;
//! - [`plan`]: the smallest fleet that meets a scenario's SLO;
//! - [`report`]: the JSON report, the terminal summary and the SLO checks;
//! - [`html`]: the self-contained HTML report, with its charts, of one run or several.

pub mod compare;
pub mod demand;
pub mod html;
pub mod http_client;
pub mod live;
pub mod plan;
pub mod report;
pub mod scenario;
pub mod sim;
pub mod webrtc;
