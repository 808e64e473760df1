//! Frame sources: where a stream's pictures come from.
//!
//! The synthetic game renders its picture on the CPU straight into the encoder's input. A
//! real game renders on its vGPU; on a GPU host its frames reach NVENC as GPU-resident
//! surfaces through the capture interface (see `docs/ARCHITECTURE.md`, "Streaming"), and the
//! same trait carries them.

use super::input::InputMessage;
use super::scene::{I420Frame, SceneError, SyntheticScene};

/// Where pictures come from, and where the player's input goes.
pub trait FrameSource: Send {
    /// The source's name, for logs (`synthetic`, `capture`).
    fn name(&self) -> &'static str;

    /// Draws picture number `frame` into `out`.
    fn render(&mut self, frame: u64, out: &mut I420Frame) -> Result<(), SceneError>;

    /// Delivers one input event of the player to the game.
    fn input(&mut self, event: &InputMessage);
}

impl FrameSource for SyntheticScene {
    fn name(&self) -> &'static str {
        "synthetic"
    }

    fn render(&mut self, frame: u64, out: &mut I420Frame) -> Result<(), SceneError> {
        SyntheticScene::render(self, frame, out)
    }

    fn input(&mut self, event: &InputMessage) {
        self.apply(event);
    }
}
