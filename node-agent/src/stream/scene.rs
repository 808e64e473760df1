//! The synthetic game's picture, drawn straight into I420 (docs/PROTOCOL.md, "Picture
//! markers").
//!
//! The picture has a scrolling background, a box that bounces on its own, the player's square
//! that input moves, and at the top-left a panel with the two marker rows a client reads (the
//! frame counter and the newest applied input `seq`) and the same numbers as digits. Every
//! shape is a run of row `fill`s or `copy_from_slice`s: a 1280×720 frame costs a fraction of
//! a millisecond, so the synthetic game never limits the stream.

use crate::stream::input::{InputEvent, InputMessage, hid};

/// The smallest picture width an [`I420Frame`] accepts.
pub const MIN_WIDTH: u16 = 64;
/// The largest picture side an [`I420Frame`] accepts (8K is 7680×4320).
pub const MAX_SIDE: u16 = 8192;
/// The smallest picture height an [`I420Frame`] accepts.
pub const MIN_HEIGHT: u16 = 36;
/// How many blocks a marker row has: the numbers are sent modulo 2²⁴.
pub const MARKER_BITS: usize = 24;

/// Luma of a marker block that reads 0.
const MARKER_ZERO: u8 = 16;
/// Luma of a marker block that reads 1.
const MARKER_ONE: u8 = 235;
/// Chroma that carries no colour.
const NEUTRAL: u8 = 128;
/// Luma of the panel behind the markers and digits: unlike black it shows the zero blocks.
const PANEL_LUMA: u8 = 64;
/// Luma of the digits.
const DIGIT_LUMA: u8 = 235;

/// One picture in I420 (planar YUV 4:2:0): Y (width×height), then U and V (each
/// (width/2)×(height/2)).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct I420Frame {
    width: u16,
    height: u16,
    // Invariant: `data.len() == luma_len + 2 * chroma_len` for `width` and `height`, both even.
    data: Vec<u8>,
}

/// Why a picture or a scene cannot be made or drawn.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SceneError {
    /// I420 subsamples chroma by two in both directions, so both sides must be even.
    #[error("picture size {width}x{height}: width and height must both be even")]
    OddSize {
        /// The width asked for.
        width: u16,
        /// The height asked for.
        height: u16,
    },
    /// The picture is too small for what must be drawn in it.
    #[error("picture size {width}x{height} is too small: needs at least {min_width}x{min_height}")]
    TooSmall {
        /// The width asked for.
        width: u16,
        /// The height asked for.
        height: u16,
        /// The smallest width that works (at this height, for a scene).
        min_width: u16,
        /// The smallest height that works.
        min_height: u16,
    },
    /// The picture is larger than any stream this agent sends.
    #[error("picture size {width}x{height} is too large: each side must be at most {max}")]
    TooLarge {
        /// The width asked for.
        width: u16,
        /// The height asked for.
        height: u16,
        /// The largest side allowed.
        max: u16,
    },
    /// The frame to draw into does not have the scene's size.
    #[error("frame is {got_width}x{got_height} but the scene is {width}x{height}")]
    SizeMismatch {
        /// The scene's width.
        width: u16,
        /// The scene's height.
        height: u16,
        /// The frame's width.
        got_width: u16,
        /// The frame's height.
        got_height: u16,
    },
}

impl I420Frame {
    /// A black picture (luma 16, neutral chroma) of the given size. Both sides must
    /// be even, at least [`MIN_WIDTH`]×[`MIN_HEIGHT`] and at most [`MAX_SIDE`].
    pub fn new(width: u16, height: u16) -> Result<Self, SceneError> {
        if !width.is_multiple_of(2) || !height.is_multiple_of(2) {
            return Err(SceneError::OddSize { width, height });
        }
        if width < MIN_WIDTH || height < MIN_HEIGHT {
            return Err(SceneError::TooSmall {
                width,
                height,
                min_width: MIN_WIDTH,
                min_height: MIN_HEIGHT,
            });
        }
        if width > MAX_SIDE || height > MAX_SIDE {
            return Err(SceneError::TooLarge {
                width,
                height,
                max: MAX_SIDE,
            });
        }
        let luma = luma_len(width, height);
        let mut data = vec![MARKER_ZERO; luma + 2 * chroma_len(width, height)];
        if let Some(chroma) = data.get_mut(luma..) {
            chroma.fill(NEUTRAL);
        }
        Ok(I420Frame {
            width,
            height,
            data,
        })
    }

    /// The picture's width in pixels.
    pub fn width(&self) -> u16 {
        self.width
    }

    /// The picture's height in pixels.
    pub fn height(&self) -> u16 {
        self.height
    }

    /// The luma plane, `width` bytes a row.
    pub fn y(&self) -> &[u8] {
        self.split().0
    }

    /// The blue-difference plane, `width / 2` bytes a row.
    pub fn u(&self) -> &[u8] {
        self.split().1
    }

    /// The red-difference plane, `width / 2` bytes a row.
    pub fn v(&self) -> &[u8] {
        self.split().2
    }

    /// The luma plane, writable.
    pub fn y_mut(&mut self) -> &mut [u8] {
        self.planes_mut().0
    }

    /// The three planes (Y, U, V), writable at once.
    pub fn planes_mut(&mut self) -> (&mut [u8], &mut [u8], &mut [u8]) {
        let luma = luma_len(self.width, self.height);
        let chroma = chroma_len(self.width, self.height);
        // Invariant: `data` holds exactly `luma + 2 * chroma` bytes (see the field), so neither
        // split point is past the end.
        let (y, uv) = self.data.split_at_mut(luma);
        let (u, v) = uv.split_at_mut(chroma);
        (y, u, v)
    }

    /// The whole picture as I420 bytes: Y, then U, then V.
    pub fn as_bytes(&self) -> &[u8] {
        &self.data
    }

    fn split(&self) -> (&[u8], &[u8], &[u8]) {
        let luma = luma_len(self.width, self.height);
        let chroma = chroma_len(self.width, self.height);
        // Invariant: `data` holds exactly `luma + 2 * chroma` bytes (see the field).
        let (y, uv) = self.data.split_at(luma);
        let (u, v) = uv.split_at(chroma);
        (y, u, v)
    }
}

/// The synthetic game: its state (the player's square, the newest input applied) and how it
/// draws a frame.
#[derive(Debug, Clone)]
pub struct SyntheticScene {
    width: u16,
    height: u16,
    layout: Layout,
    /// Diagonal background rows: row `y` of a plane is a window of its ramp.
    ramp_y: Vec<u8>,
    ramp_u: Vec<u8>,
    ramp_v: Vec<u8>,
    /// The player's square, top-left corner, always inside the play area.
    player_x: usize,
    player_y: usize,
    colour: usize,
    last_input_seq: u32,
}

impl SyntheticScene {
    /// A scene of the given size, with the player's square in the middle of the play area.
    /// Besides [`I420Frame::new`]'s rules, the picture must hold the marker panel and leave
    /// room below it for the bouncing box.
    pub fn new(width: u16, height: u16) -> Result<Self, SceneError> {
        // The frame's rules come first: they name the more basic problem.
        I420Frame::new(width, height)?;
        let layout = Layout::new(height);
        let (min_width, min_height) = layout.min_size();
        if usize::from(width) < min_width || usize::from(height) < min_height {
            return Err(SceneError::TooSmall {
                width,
                height,
                min_width: u16::try_from(min_width).unwrap_or(u16::MAX),
                min_height: u16::try_from(min_height).unwrap_or(u16::MAX),
            });
        }
        let w = usize::from(width);
        let cw = w / 2;
        let ramp_y = (0..=u8::MAX)
            .cycle()
            .take(w + LUMA_PERIOD)
            .map(|i| 40 + triangle(i, 128))
            .collect();
        let ramp_u = (0..128_u8)
            .cycle()
            .take(cw + CHROMA_PERIOD)
            .map(|i| 96 + triangle(i, 64))
            .collect();
        let ramp_v = (0..128_u8)
            .cycle()
            .take(cw + CHROMA_PERIOD)
            .map(|i| 159 - triangle(i, 64))
            .collect();
        let player = layout.player;
        // `min_size` above leaves room for the square below the panel.
        let player_x = w.saturating_sub(player) / 2;
        let player_y =
            layout.play_top + usize::from(height).saturating_sub(layout.play_top + player) / 2;
        Ok(SyntheticScene {
            width,
            height,
            layout,
            ramp_y,
            ramp_u,
            ramp_v,
            player_x,
            player_y,
            colour: 0,
            last_input_seq: 0,
        })
    }

    /// Applies one input event: arrows/WASD, mouse moves and pad axes 0/1 move the player's
    /// square (kept inside the play area), a mouse button, space or pad button 0 changes its
    /// colour. Every event but ping/pong then counts as applied: the newest applied `seq`
    /// becomes the largest seen, so a reordered older event never moves the marker back.
    pub fn apply(&mut self, msg: &InputMessage) {
        let step = i64::try_from(self.layout.block).unwrap_or(i64::MAX);
        match msg.event {
            InputEvent::Ping | InputEvent::Pong => return,
            InputEvent::KeyDown { code } => match code {
                hid::LEFT | hid::A => self.move_player(-step, 0),
                hid::RIGHT | hid::D => self.move_player(step, 0),
                hid::UP | hid::W => self.move_player(0, -step),
                hid::DOWN | hid::S => self.move_player(0, step),
                hid::SPACE => self.next_colour(),
                _ => {}
            },
            InputEvent::MouseMove { dx, dy } => self.move_player(i64::from(dx), i64::from(dy)),
            InputEvent::MouseDown { .. } => self.next_colour(),
            InputEvent::PadButton {
                button: 0, value, ..
            } if value >= 128 => self.next_colour(),
            InputEvent::PadAxis { axis, value, .. } => {
                // A full deflection moves one block per event.
                let d = i64::from(value) * step / i64::from(i16::MAX);
                match axis {
                    0 => self.move_player(d, 0),
                    1 => self.move_player(0, d),
                    _ => {}
                }
            }
            InputEvent::KeyUp { .. }
            | InputEvent::MouseUp { .. }
            | InputEvent::Wheel { .. }
            | InputEvent::PadButton { .. } => {}
        }
        self.last_input_seq = self.last_input_seq.max(msg.seq);
    }

    /// Draws frame number `frame` into `out`, which must have this scene's size: the
    /// scrolling background, the bouncing box, the player's square, then the marker panel
    /// (frame counter and newest applied input, modulo 2²⁴) with the same numbers as digits.
    pub fn render(&mut self, frame: u64, out: &mut I420Frame) -> Result<(), SceneError> {
        if out.width != self.width || out.height != self.height {
            return Err(SceneError::SizeMismatch {
                width: self.width,
                height: self.height,
                got_width: out.width,
                got_height: out.height,
            });
        }
        let w = usize::from(self.width);
        let h = usize::from(self.height);
        let l = &self.layout;
        let (y_plane, u_plane, v_plane) = out.planes_mut();

        // Background: a diagonal gradient that scrolls two luma pixels a frame.
        let phase = usize::try_from(frame % 128).unwrap_or(0);
        scroll_fill(y_plane, w, &self.ramp_y, LUMA_PERIOD, phase * 2);
        scroll_fill(u_plane, w / 2, &self.ramp_u, CHROMA_PERIOD, phase);
        scroll_fill(v_plane, w / 2, &self.ramp_v, CHROMA_PERIOD, phase);

        let mut planes = Planes {
            y: y_plane,
            u: u_plane,
            v: v_plane,
            width: w,
        };

        // The bouncing box moves on its own, below the panel.
        let box_x = bounce(frame, 5, w.saturating_sub(l.box_size));
        let box_y = l.play_top + bounce(frame, 3, h.saturating_sub(l.play_top + l.box_size));
        planes.fill(box_x, box_y, l.box_size, l.box_size, BOX_COLOUR);

        // The player's square, with a white rim so every colour stands out.
        let p = l.player;
        let rim = (p / 8).max(1);
        planes.fill(self.player_x, self.player_y, p, p, WHITE);
        let colour = PALETTE
            .get(self.colour % PALETTE.len())
            .copied()
            .unwrap_or(WHITE);
        planes.fill(
            self.player_x + rim,
            self.player_y + rim,
            p - 2 * rim,
            p - 2 * rim,
            colour,
        );

        // The panel last, so nothing ever covers the markers.
        planes.fill(0, 0, l.panel_w, l.panel_h, (PANEL_LUMA, NEUTRAL, NEUTRAL));
        let frame_marker = u32::try_from(frame % (1 << MARKER_BITS)).unwrap_or(0);
        let input_marker = self.last_input_seq % (1 << MARKER_BITS);
        for (row, value) in [frame_marker, input_marker].into_iter().enumerate() {
            for bit in 0..MARKER_BITS {
                let one = (value >> (MARKER_BITS - 1 - bit)) & 1;
                // 0 → 16, 1 → 235, without a branch.
                let luma = MARKER_ZERO + u8::from(one == 1) * (MARKER_ONE - MARKER_ZERO);
                fill_rect(
                    planes.y,
                    w,
                    bit * l.block,
                    row * l.block,
                    l.block,
                    l.block,
                    luma,
                );
            }
        }
        l.draw_line(planes.y, w, l.line0_y, SEG_F, frame_marker);
        l.draw_line(planes.y, w, l.line1_y, SEG_I, input_marker);
        Ok(())
    }

    /// The `seq` of the newest input event applied (the largest seen), 0 before any.
    pub fn last_input_seq(&self) -> u32 {
        self.last_input_seq
    }

    /// The picture's width in pixels.
    pub fn width(&self) -> u16 {
        self.width
    }

    /// The picture's height in pixels.
    pub fn height(&self) -> u16 {
        self.height
    }

    fn move_player(&mut self, dx: i64, dy: i64) {
        let l = &self.layout;
        let max_x = usize::from(self.width).saturating_sub(l.player);
        let max_y = usize::from(self.height)
            .saturating_sub(l.player)
            .max(l.play_top);
        self.player_x = shift_clamped(self.player_x, dx, 0, max_x);
        self.player_y = shift_clamped(self.player_y, dy, l.play_top, max_y);
    }

    fn next_colour(&mut self) {
        self.colour = (self.colour + 1) % PALETTE.len();
    }
}

/// Reads the two marker rows (frame counter, last input seq) back from a luma plane of
/// `width`×`height`, from the centre of each block; for tests and clients. None when the
/// picture is too small for the markers or the plane shorter than the size says.
pub fn read_markers(y: &[u8], width: u16, height: u16) -> Option<(u32, u32)> {
    let w = usize::from(width);
    let h = usize::from(height);
    let b = block_size(height);
    if w < MARKER_BITS * b || h < 2 * b || y.len() < w.checked_mul(h)? {
        return None;
    }
    let read_row = |row: usize| -> Option<u32> {
        let cy = row * b + b / 2;
        let line = y.get(cy * w..(cy + 1) * w)?;
        (0..MARKER_BITS).try_fold(0_u32, |acc, bit| {
            let luma = *line.get(bit * b + b / 2)?;
            Some((acc << 1) | u32::from(luma >= 128))
        })
    };
    Some((read_row(0)?, read_row(1)?))
}

/// Marker block size in pixels for a picture `height` high: `height / 45`, at least 4.
pub fn block_size(height: u16) -> usize {
    usize::from(height / 45).max(4)
}

/// A colour as (Y, U, V), BT.601 limited range.
type Yuv = (u8, u8, u8);

const WHITE: Yuv = (235, 128, 128);
const BOX_COLOUR: Yuv = (165, 42, 179);
/// The player's colours: red, green, blue, yellow, cyan, magenta.
const PALETTE: [Yuv; 6] = [
    (81, 90, 240),
    (145, 54, 34),
    (41, 240, 110),
    (210, 16, 146),
    (170, 166, 16),
    (106, 202, 222),
];

/// The luma ramp repeats every this many pixels along the diagonal.
const LUMA_PERIOD: usize = 256;
/// The chroma ramps repeat every this many chroma pixels (the same distance as luma).
const CHROMA_PERIOD: usize = 128;

/// Seven-segment masks: bit 0 = a (top), b, c, d (bottom), e, f, bit 6 = g (middle).
const SEG_DIGITS: [u8; 10] = [0x3F, 0x06, 0x5B, 0x4F, 0x66, 0x6D, 0x7D, 0x07, 0x7F, 0x6F];
/// The label of the frame counter line.
const SEG_F: u8 = 0x71;
/// The label of the input line.
const SEG_I: u8 = 0x30;

/// Where everything goes, from the picture height.
#[derive(Debug, Clone)]
struct Layout {
    /// Marker block side.
    block: usize,
    /// The panel at the top-left: markers, then two lines of digits.
    panel_w: usize,
    panel_h: usize,
    /// Digit cell and segment thickness.
    digit_w: usize,
    digit_h: usize,
    thick: usize,
    advance: usize,
    /// Top of each line of digits.
    line0_y: usize,
    line1_y: usize,
    /// Moving shapes stay at or below this row, clear of the panel.
    play_top: usize,
    player: usize,
    box_size: usize,
}

impl Layout {
    fn new(height: u16) -> Self {
        let block = block_size(height);
        let margin = (block / 2).max(2);
        let digit_w = block;
        let digit_h = 2 * block;
        let line0_y = 2 * block + margin;
        let line1_y = line0_y + digit_h + margin;
        // Even edges keep the panel's neutral chroma exactly under it.
        let panel_w = round_even(MARKER_BITS * block + margin);
        let panel_h = round_even(line1_y + digit_h + margin);
        Layout {
            block,
            panel_w,
            panel_h,
            digit_w,
            digit_h,
            thick: (block / 4).max(1),
            advance: digit_w + (block / 2).max(1),
            line0_y,
            line1_y,
            play_top: panel_h,
            player: round_even(2 * block),
            box_size: round_even(3 * block),
        }
    }

    /// The smallest picture that holds the panel and, below it, the box and the square.
    fn min_size(&self) -> (usize, usize) {
        let shape = self.box_size.max(self.player);
        (self.panel_w.max(shape), self.play_top + shape)
    }

    /// One line of the panel: a label, a space, then `n` in decimal without leading zeros.
    fn draw_line(&self, y: &mut [u8], stride: usize, top: usize, label: u8, n: u32) {
        // Indented by half an advance: a glyph on the picture's edge is easily cut by a
        // player's scaling.
        let left = self.advance / 2;
        self.draw_char(y, stride, left, top, label);
        let mut x = left + 2 * self.advance;
        let mut div = 1_u32;
        while div <= n / 10 {
            div *= 10;
        }
        while div > 0 {
            let digit = usize::try_from(n / div % 10).unwrap_or(0);
            let mask = SEG_DIGITS.get(digit).copied().unwrap_or(0);
            self.draw_char(y, stride, x, top, mask);
            x += self.advance;
            div /= 10;
        }
    }

    fn draw_char(&self, y: &mut [u8], stride: usize, x: usize, top: usize, mask: u8) {
        let (w, h, t) = (self.digit_w, self.digit_h, self.thick);
        let mid = (h - t) / 2;
        // (x, y, width, height) of segments a..g, relative to the cell.
        let segments = [
            (0, 0, w, t),
            (w - t, 0, t, mid + t),
            (w - t, mid, t, h - mid),
            (0, h - t, w, t),
            (0, mid, t, h - mid),
            (0, 0, t, mid + t),
            (0, mid, w, t),
        ];
        for (bit, (sx, sy, sw, sh)) in segments.into_iter().enumerate() {
            if (mask >> bit) & 1 == 1 {
                fill_rect(y, stride, x + sx, top + sy, sw, sh, DIGIT_LUMA);
            }
        }
    }
}

/// The three planes of a frame being drawn.
struct Planes<'a> {
    y: &'a mut [u8],
    u: &'a mut [u8],
    v: &'a mut [u8],
    width: usize,
}

impl Planes<'_> {
    /// Fills a rectangle in luma pixels with a colour; chroma covers every 2×2 cell it touches.
    fn fill(&mut self, x: usize, y: usize, w: usize, h: usize, (cy, cu, cv): Yuv) {
        fill_rect(self.y, self.width, x, y, w, h, cy);
        let (cx0, cy0) = (x / 2, y / 2);
        let cw = (x + w).div_ceil(2) - cx0;
        let ch = (y + h).div_ceil(2) - cy0;
        fill_rect(self.u, self.width / 2, cx0, cy0, cw, ch, cu);
        fill_rect(self.v, self.width / 2, cx0, cy0, cw, ch, cv);
    }
}

/// Fills a rectangle of a plane `stride` bytes a row; the parts outside the plane are skipped.
fn fill_rect(plane: &mut [u8], stride: usize, x: usize, y: usize, w: usize, h: usize, value: u8) {
    if stride == 0 {
        return;
    }
    let x_end = x.saturating_add(w).min(stride);
    if x >= x_end {
        return;
    }
    for row in plane.chunks_exact_mut(stride).skip(y).take(h) {
        if let Some(run) = row.get_mut(x..x_end) {
            run.fill(value);
        }
    }
}

/// Fills a whole plane with a diagonal ramp: row `y` is the ramp from `(y + shift) % period`.
fn scroll_fill(plane: &mut [u8], stride: usize, ramp: &[u8], period: usize, shift: usize) {
    if stride == 0 {
        return;
    }
    for (y, row) in plane.chunks_exact_mut(stride).enumerate() {
        let start = (y + shift) % period;
        if let Some(src) = ramp.get(start..start + stride) {
            row.copy_from_slice(src);
        }
    }
}

/// Position after `frame` steps of `speed` pixels, bouncing between 0 and `range`.
fn bounce(frame: u64, speed: u64, range: usize) -> usize {
    let range = u64::try_from(range).unwrap_or(u64::MAX / 4);
    if range == 0 {
        return 0;
    }
    let period = 2 * range;
    let p = (frame % period) * speed % period;
    let pos = if p <= range { p } else { period - p };
    usize::try_from(pos).unwrap_or(0)
}

/// `pos + delta`, kept within `min..=max`.
fn shift_clamped(pos: usize, delta: i64, min: usize, max: usize) -> usize {
    let pos = i64::try_from(pos).unwrap_or(i64::MAX);
    let moved = pos.saturating_add(delta).max(0);
    usize::try_from(moved).unwrap_or(max).clamp(min, max)
}

/// A triangle wave over `0..2 * half`: rises 0..half, then falls back.
fn triangle(i: u8, half: u8) -> u8 {
    if i < half {
        i
    } else {
        (2 * u16::from(half))
            .saturating_sub(1)
            .saturating_sub(u16::from(i))
            .try_into()
            .unwrap_or(0)
    }
}

fn round_even(n: usize) -> usize {
    n + n % 2
}

fn luma_len(width: u16, height: u16) -> usize {
    usize::from(width) * usize::from(height)
}

fn chroma_len(width: u16, height: u16) -> usize {
    usize::from(width / 2) * usize::from(height / 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(seq: u32, event: InputEvent) -> InputMessage {
        InputMessage {
            seq,
            t_ms: seq * 16,
            event,
        }
    }

    fn rendered(scene: &mut SyntheticScene, frame: u64) -> I420Frame {
        let mut out = I420Frame::new(scene.width(), scene.height()).unwrap();
        scene.render(frame, &mut out).unwrap();
        out
    }

    #[test]
    fn plane_lengths_follow_i420() {
        for (w, h) in [(1280, 720), (640, 360), (64, 36), (1920, 1080), (66, 38)] {
            let frame = I420Frame::new(w, h).unwrap();
            let (w, h) = (usize::from(w), usize::from(h));
            assert_eq!(frame.y().len(), w * h);
            assert_eq!(frame.u().len(), w / 2 * (h / 2));
            assert_eq!(frame.v().len(), w / 2 * (h / 2));
            assert_eq!(frame.as_bytes().len(), w * h * 3 / 2);
        }
        let mut frame = I420Frame::new(64, 36).unwrap();
        let (y, u, v) = frame.planes_mut();
        y.fill(1);
        u.fill(2);
        v.fill(3);
        frame.y_mut().fill(4);
        assert!(frame.y().iter().all(|&b| b == 4));
        assert!(frame.u().iter().all(|&b| b == 2));
        assert!(frame.v().iter().all(|&b| b == 3));
    }

    #[test]
    fn frame_rejects_odd_small_and_huge_sizes() {
        for (w, h) in [(1281, 720), (1280, 721), (641, 359)] {
            assert_eq!(
                I420Frame::new(w, h),
                Err(SceneError::OddSize {
                    width: w,
                    height: h
                })
            );
        }
        assert!(matches!(
            I420Frame::new(62, 36),
            Err(SceneError::TooSmall { .. })
        ));
        assert!(matches!(
            I420Frame::new(64, 34),
            Err(SceneError::TooSmall { .. })
        ));
        assert!(matches!(
            I420Frame::new(0, 0),
            Err(SceneError::TooSmall { .. })
        ));
        assert!(matches!(
            I420Frame::new(8194, 720),
            Err(SceneError::TooLarge { .. })
        ));
        let err = SyntheticScene::new(1281, 720).unwrap_err();
        assert!(err.to_string().contains("even"), "{err}");
    }

    #[test]
    fn scene_rejects_pictures_without_room_for_the_panel() {
        let err = SyntheticScene::new(64, 36).unwrap_err();
        let SceneError::TooSmall {
            min_width,
            min_height,
            ..
        } = err
        else {
            panic!("expected TooSmall, got {err:?}");
        };
        let mut scene = SyntheticScene::new(min_width, min_height.max(MIN_HEIGHT)).unwrap();
        let out = rendered(&mut scene, 77);
        assert_eq!(
            read_markers(out.y(), out.width(), out.height()),
            Some((77, 0))
        );
    }

    #[test]
    fn markers_read_back_at_720p_and_360p() {
        for (w, h) in [(1280, 720), (640, 360), (1920, 1080), (854, 480)] {
            let mut scene = SyntheticScene::new(w, h).unwrap();
            for (frame, seq) in [(0, 0), (1, 1), (123_456, 42), (0xFF_FFFF, 0xAA_AAAA)] {
                scene.apply(&msg(seq, InputEvent::KeyUp { code: 0 }));
                let out = rendered(&mut scene, frame);
                assert_eq!(
                    read_markers(out.y(), w, h),
                    Some((u32::try_from(frame).unwrap(), seq)),
                    "{w}x{h} frame {frame}"
                );
            }
        }
    }

    #[test]
    fn markers_are_blocks_of_16_at_720p_with_neutral_chroma() {
        let mut scene = SyntheticScene::new(1280, 720).unwrap();
        // 0b1000...0001: the first and last blocks of row 0 are white.
        let out = rendered(&mut scene, (1 << 23) | 1);
        let y = out.y();
        let at = |x: usize, row: usize| y.get(row * 1280 + x).copied().unwrap();
        for x in 0..16 {
            for row in 0..16 {
                assert_eq!(at(x, row), 235);
                assert_eq!(at(16 + x, row), 16);
                assert_eq!(at(23 * 16 + x, row), 235);
                assert_eq!(at(x, 16 + row), 16);
            }
        }
        let (u, v) = (out.u(), out.v());
        for cy in 0..16 {
            for cx in 0..(24 * 16 / 2) {
                assert_eq!(u.get(cy * 640 + cx), Some(&128));
                assert_eq!(v.get(cy * 640 + cx), Some(&128));
            }
        }
    }

    #[test]
    fn markers_wrap_modulo_2_pow_24() {
        let mut scene = SyntheticScene::new(640, 360).unwrap();
        scene.apply(&msg((1 << 24) + 5, InputEvent::MouseUp { button: 0 }));
        for frame in [1_u64 << 24, (1 << 24) + 99, u64::MAX] {
            let out = rendered(&mut scene, frame);
            let want = u32::try_from(frame % (1 << 24)).unwrap();
            assert_eq!(read_markers(out.y(), 640, 360), Some((want, 5)));
        }
        assert_eq!(scene.last_input_seq(), (1 << 24) + 5);
    }

    #[test]
    fn apply_moves_the_square_and_changes_the_picture() {
        let mut scene = SyntheticScene::new(1280, 720).unwrap();
        let before = rendered(&mut scene, 10);
        let (x0, y0) = (scene.player_x, scene.player_y);
        scene.apply(&msg(1, InputEvent::KeyDown { code: hid::RIGHT }));
        scene.apply(&msg(2, InputEvent::KeyDown { code: hid::W }));
        assert_eq!((scene.player_x, scene.player_y), (x0 + 16, y0 - 16));
        let after = rendered(&mut scene, 10);
        assert_ne!(before.y(), after.y());
        assert_eq!(read_markers(after.y(), 1280, 720), Some((10, 2)));

        scene.apply(&msg(3, InputEvent::MouseMove { dx: -40, dy: 7 }));
        assert_eq!((scene.player_x, scene.player_y), (x0 - 24, y0 - 9));
        scene.apply(&msg(
            4,
            InputEvent::PadAxis {
                pad: 0,
                axis: 1,
                value: 32767,
            },
        ));
        assert_eq!(scene.player_y, y0 + 7);

        // Colour changes show in chroma only where the square is.
        let before = rendered(&mut scene, 10);
        scene.apply(&msg(5, InputEvent::MouseDown { button: 0 }));
        let after = rendered(&mut scene, 10);
        assert_ne!(before.u(), after.u());
        assert_eq!(scene.last_input_seq(), 5);
    }

    #[test]
    fn square_stays_in_the_play_area() {
        let mut scene = SyntheticScene::new(640, 360).unwrap();
        for seq in 1..=200 {
            scene.apply(&msg(
                seq,
                InputEvent::MouseMove {
                    dx: i16::MIN,
                    dy: i16::MIN,
                },
            ));
        }
        assert_eq!(scene.player_x, 0);
        assert_eq!(scene.player_y, scene.layout.play_top);
        let out = rendered(&mut scene, 3);
        assert_eq!(read_markers(out.y(), 640, 360), Some((3, 200)));
        scene.apply(&msg(
            201,
            InputEvent::MouseMove {
                dx: i16::MAX,
                dy: i16::MAX,
            },
        ));
        assert_eq!(scene.player_x, 640 - scene.layout.player);
        assert_eq!(scene.player_y, 360 - scene.layout.player);
    }

    #[test]
    fn older_seq_does_not_lower_the_marker_and_ping_does_not_count() {
        let mut scene = SyntheticScene::new(640, 360).unwrap();
        scene.apply(&msg(10, InputEvent::KeyDown { code: hid::A }));
        scene.apply(&msg(7, InputEvent::KeyDown { code: hid::D }));
        assert_eq!(scene.last_input_seq(), 10);
        scene.apply(&msg(50, InputEvent::Ping));
        scene.apply(&msg(51, InputEvent::Pong));
        assert_eq!(scene.last_input_seq(), 10);
        scene.apply(&msg(11, InputEvent::Wheel { dx: 0, dy: 1 }));
        assert_eq!(scene.last_input_seq(), 11);
    }

    /// Whether the panel holds only panel grey, marker and digit luma over neutral chroma.
    fn panel_is_clean(scene: &SyntheticScene, f: &I420Frame) -> bool {
        let l = &scene.layout;
        let w = usize::from(f.width());
        let luma_ok = f.y().chunks_exact(w).take(l.panel_h).all(|row| {
            row.get(..l.panel_w)
                .unwrap()
                .iter()
                .all(|b| [MARKER_ZERO, PANEL_LUMA, MARKER_ONE].contains(b))
        });
        let chroma_ok = [f.u(), f.v()].into_iter().all(|plane| {
            plane.chunks_exact(w / 2).take(l.panel_h / 2).all(|row| {
                row.get(..l.panel_w / 2)
                    .unwrap()
                    .iter()
                    .all(|&b| b == NEUTRAL)
            })
        });
        luma_ok && chroma_ok
    }

    /// The first chroma row holding U value `u` and how many rows hold it.
    fn chroma_rows_with(f: &I420Frame, u: u8) -> (usize, usize) {
        let rows: Vec<usize> = f
            .u()
            .chunks_exact(usize::from(f.width()) / 2)
            .enumerate()
            .filter(|(_, row)| row.contains(&u))
            .map(|(i, _)| i)
            .collect();
        (rows.first().copied().unwrap_or(usize::MAX), rows.len())
    }

    #[test]
    fn moving_shapes_never_touch_the_panel() {
        let mut scene = SyntheticScene::new(640, 360).unwrap();
        let l = scene.layout.clone();
        let (box_u, player_u) = (BOX_COLOUR.1, PALETTE[0].1);
        let inner = l.player - 2 * (l.player / 8).max(1);
        let mut previous = rendered(&mut scene, 0);
        for frame in (1..1500).step_by(7) {
            let out = rendered(&mut scene, frame);
            assert!(panel_is_clean(&scene, &out), "frame {frame}");
            // The whole box shows, below the panel: the panel, drawn last, hides nothing.
            let (first, count) = chroma_rows_with(&out, box_u);
            assert!(
                first >= l.panel_h / 2,
                "frame {frame}: box at chroma row {first}"
            );
            assert!(
                count >= l.box_size / 2,
                "frame {frame}: box clipped to {count} rows"
            );
            assert_ne!(out.y(), previous.y(), "the picture moves");
            previous = out;
        }
        // The square dragged all over, up against the panel too.
        let mut touched_top = false;
        for seq in 1..100 {
            scene.apply(&msg(
                seq,
                InputEvent::MouseMove {
                    dx: if seq % 2 == 0 { 300 } else { -250 },
                    dy: if seq % 3 == 0 { 200 } else { -400 },
                },
            ));
            let out = rendered(&mut scene, u64::from(seq));
            assert!(panel_is_clean(&scene, &out), "seq {seq}");
            let (first, count) = chroma_rows_with(&out, player_u);
            assert!(
                first >= l.panel_h / 2,
                "seq {seq}: square at chroma row {first}"
            );
            assert!(
                count >= inner / 2,
                "seq {seq}: square clipped to {count} rows"
            );
            touched_top |= scene.player_y == l.play_top;
        }
        assert!(touched_top);
    }

    #[test]
    fn render_into_a_frame_of_another_size_is_an_error() {
        let mut scene = SyntheticScene::new(1280, 720).unwrap();
        let mut out = I420Frame::new(640, 360).unwrap();
        let before = out.clone();
        assert_eq!(
            scene.render(1, &mut out),
            Err(SceneError::SizeMismatch {
                width: 1280,
                height: 720,
                got_width: 640,
                got_height: 360,
            })
        );
        assert_eq!(out, before);
    }

    #[test]
    fn read_markers_refuses_what_cannot_hold_them() {
        assert_eq!(read_markers(&[], 1280, 720), None);
        assert_eq!(read_markers(&[0; 100], 10, 10), None);
        // 24 blocks of 4 do not fit in 64 pixels.
        assert_eq!(read_markers(&[0; 64 * 36], 64, 36), None);
        assert_eq!(read_markers(&[0; 96 * 8], 96, 8), Some((0, 0)));
        assert_eq!(
            read_markers(&[255; 96 * 8], 96, 8),
            Some((0xFF_FFFF, 0xFF_FFFF))
        );
    }

    #[test]
    fn digits_are_drawn_below_the_markers() {
        let mut scene = SyntheticScene::new(1280, 720).unwrap();
        let l = scene.layout.clone();
        let bright_in_line = |f: &I420Frame, top: usize| {
            f.y()
                .chunks_exact(1280)
                .skip(top)
                .take(l.digit_h)
                .map(|row| {
                    row.get(..l.panel_w)
                        .unwrap()
                        .iter()
                        .filter(|&&b| b == DIGIT_LUMA)
                        .count()
                })
                .sum::<usize>()
        };
        let one = rendered(&mut scene, 1);
        let many = rendered(&mut scene, 8_888_888);
        // "F 8888888" lights far more segments than "F 1"; the input line shows "I 0" in both.
        assert!(bright_in_line(&many, l.line0_y) > 3 * bright_in_line(&one, l.line0_y));
        assert_eq!(
            bright_in_line(&many, l.line1_y),
            bright_in_line(&one, l.line1_y)
        );
        assert!(bright_in_line(&one, l.line1_y) > 0);
    }

    #[test]
    fn bounce_stays_in_range() {
        for range in [0, 1, 7, 500] {
            for frame in 0..3000 {
                assert!(bounce(frame, 5, range) <= range);
            }
        }
        assert!(bounce(u64::MAX, 5, 100) <= 100);
    }
}
