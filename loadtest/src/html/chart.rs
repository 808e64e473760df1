//! The report's charts as inline SVG: a line chart (time series and distributions) and a
//! grouped bar chart, each with axes, ticks, grid lines and an HTML legend, wrapped in a
//! `<figure>`. Plain string building: no scripts, no fonts, nothing outside the document.
//!
//! Every chart draws in one coordinate system ([`W`] × [`H`], the `viewBox`) that the browser
//! scales to the page's width; the text sizes live in the document's CSS, so that a phone can
//! set them larger.

use std::fmt::{self, Write as _};

use super::Esc;

/// The most points one line keeps: a longer series is downsampled (see [`downsample`]).
pub(super) const MAX_POINTS: usize = 600;

/// The Okabe–Ito palette, which stays distinct under the common colour-vision deficiencies;
/// its yellow is left out, too pale on white.
const PALETTE: [&str; 7] = [
    "#0072B2", "#E69F00", "#009E73", "#D55E00", "#56B4E9", "#CC79A7", "#000000",
];
/// Stroke dash patterns (SVG, CSS border style), taken in turn each time the palette wraps
/// round, so that the eighth line still differs from the first.
const DASHES: [(&str, &str); 3] = [("", "solid"), ("8 4", "dashed"), ("2 3", "dotted")];

// The drawing's coordinate system and the plot area's margins within it: room for the tick
// labels on the left and below, and for the y axis's label above the plot.
const W: f64 = 640.0;
const H: f64 = 330.0;
const LEFT: f64 = 64.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 36.0;
const BOTTOM: f64 = 56.0;
/// At most this many ticks on an axis, so that the labels do not run into each other.
const MAX_TICKS: f64 = 7.0;

/// The colour of series `i`.
pub(super) fn colour(i: usize) -> &'static str {
    PALETTE.get(i % PALETTE.len()).copied().unwrap_or("#000000")
}

/// The dash pattern of series `i`: (SVG `stroke-dasharray`, CSS `border-style`).
fn dash(i: usize) -> (&'static str, &'static str) {
    DASHES
        .get((i / PALETTE.len()) % DASHES.len())
        .copied()
        .unwrap_or(("", "solid"))
}

/// A legend swatch for series `i` (an HTML element, so that it reads at any width).
pub(super) fn swatch(out: &mut String, i: usize) -> fmt::Result {
    write!(
        out,
        r#"<span class="swatch" style="border-top-color:{};border-top-style:{}"></span>"#,
        colour(i),
        dash(i).1
    )
}

/// How an axis's values read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Unit {
    /// Seconds into the run, labelled as a time (`45m`, `6h`, `1h30`).
    Time,
    /// A share (0–1), labelled in percent.
    Share,
    /// A count: ticks are whole numbers.
    Count,
    /// Any other quantity.
    Number,
}

/// One axis: its unit, its label and, optionally, a fixed range.
#[derive(Debug, Clone)]
pub(super) struct Axis {
    unit: Unit,
    label: String,
    range: Option<(f64, f64)>,
}

impl Axis {
    /// An axis whose range follows the data, from 0 (or below, for negative data).
    pub(super) fn new(unit: Unit, label: &str) -> Self {
        Self {
            unit,
            label: label.to_owned(),
            range: None,
        }
    }

    /// The same axis over `lo..=hi` whatever the data.
    pub(super) fn range(mut self, lo: f64, hi: f64) -> Self {
        if lo.is_finite() && hi.is_finite() && hi > lo {
            self.range = Some((lo, hi));
        }
        self
    }
}

/// How a line joins its points.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Shape {
    /// Straight segments: a time series.
    Line,
    /// Flat until the next point, then up, and flat to the right edge after the last: a
    /// cumulative distribution.
    Step,
}

/// One named line.
#[derive(Debug, Clone)]
struct Series {
    name: String,
    colour: usize,
    points: Vec<(f64, f64)>,
}

/// A line chart of one or more series over shared axes.
#[derive(Debug, Clone)]
pub(super) struct LineChart {
    title: String,
    x: Axis,
    y: Axis,
    shape: Shape,
    series: Vec<Series>,
    note: Option<String>,
}

impl LineChart {
    /// An empty chart.
    pub(super) fn new(title: &str, x: Axis, y: Axis, shape: Shape) -> Self {
        Self {
            title: title.to_owned(),
            x,
            y,
            shape,
            series: Vec::new(),
            note: None,
        }
    }

    /// Adds a line in palette colour `colour`; points that are not finite are left out, and a
    /// long series is downsampled to at most [`MAX_POINTS`] drawn points.
    pub(super) fn series(
        &mut self,
        name: &str,
        colour: usize,
        points: impl IntoIterator<Item = (f64, f64)>,
    ) -> &mut Self {
        let points: Vec<(f64, f64)> = points
            .into_iter()
            .filter(|(x, y)| x.is_finite() && y.is_finite())
            .collect();
        // A step doubles its points (and adds one), so it keeps half as many.
        let max = match self.shape {
            Shape::Line => MAX_POINTS,
            Shape::Step => (MAX_POINTS - 1) / 2,
        };
        self.series.push(Series {
            name: name.to_owned(),
            colour,
            points: downsample(&points, max),
        });
        self
    }

    /// A line of text under the chart.
    pub(super) fn note(&mut self, note: &str) -> &mut Self {
        self.note = Some(note.to_owned());
        self
    }

    /// The chart as a `<figure>`: caption, SVG, legend, note.
    pub(super) fn write(&self, out: &mut String) -> fmt::Result {
        figure_start(out, &self.title)?;
        let all = || self.series.iter().flat_map(|s| s.points.iter());
        match bounds(all()) {
            None => no_data(out, &self.title)?,
            Some((x_lo, x_hi, y_lo, y_hi)) => {
                let x = Scale::fit(&self.x, x_lo, x_hi, true);
                let y = Scale::fit(&self.y, y_lo, y_hi, false);
                svg_start(out, &self.title)?;
                y_grid(out, &y)?;
                for &t in &x.ticks {
                    let px = x.px(t);
                    write!(
                        out,
                        r#"<line class="axis" x1="{px:.1}" x2="{px:.1}" y1="{:.1}" y2="{:.1}"/><text class="tick" x="{px:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
                        H - BOTTOM,
                        H - BOTTOM + 5.0,
                        H - BOTTOM + 20.0,
                        x.label(t)
                    )?;
                }
                axes(out, &self.x.label, &self.y.label)?;
                // Earlier lines are drawn wider, so that a later one drawn over an equal one
                // leaves it showing on both sides.
                let n = self.series.len();
                for (i, s) in self.series.iter().enumerate() {
                    let width = 2.0 + 0.7 * (n - 1 - i).min(2) as f64;
                    self.line(out, s, width, &x, &y)?;
                }
                out.push_str("</svg>");
            }
        }
        out.push_str(r#"<ul class="legend">"#);
        for s in &self.series {
            out.push_str("<li>");
            swatch(out, s.colour)?;
            write!(out, "{}", Esc(&s.name))?;
            if s.points.is_empty() {
                out.push_str(r#" <span class="muted">(no data)</span>"#);
            }
            out.push_str("</li>");
        }
        out.push_str("</ul>");
        figure_end(out, self.note.as_deref())
    }

    fn line(&self, out: &mut String, s: &Series, width: f64, x: &Scale, y: &Scale) -> fmt::Result {
        let mut points = Vec::with_capacity(2 * s.points.len() + 1);
        match self.shape {
            Shape::Line => points.extend_from_slice(&s.points),
            Shape::Step => {
                let mut prev: Option<(f64, f64)> = None;
                for &(px, py) in &s.points {
                    if let Some((_, qy)) = prev {
                        points.push((px, qy));
                    }
                    points.push((px, py));
                    prev = Some((px, py));
                }
                if let Some((px, py)) = prev
                    && px < x.hi
                {
                    points.push((x.hi, py));
                }
            }
        }
        let colour = colour(s.colour);
        match points.as_slice() {
            [] => Ok(()),
            [(px, py)] => write!(
                out,
                r#"<circle cx="{:.1}" cy="{:.1}" r="3.5" fill="{colour}"><title>{}</title></circle>"#,
                x.px(*px),
                y.px(*py),
                Esc(&s.name)
            ),
            _ => {
                write!(
                    out,
                    r#"<polyline class="series" fill="none" stroke="{colour}" stroke-width="{width:.1}""#
                )?;
                let dash = dash(s.colour).0;
                if !dash.is_empty() {
                    write!(out, r#" stroke-dasharray="{dash}""#)?;
                }
                out.push_str(r#" points=""#);
                for (i, (px, py)) in points.iter().enumerate() {
                    if i > 0 {
                        out.push(' ');
                    }
                    write!(out, "{:.1},{:.1}", x.px(*px), y.px(*py))?;
                }
                write!(out, r#""><title>{}</title></polyline>"#, Esc(&s.name))
            }
        }
    }
}

/// A grouped bar chart: for each group (a measure), one bar per series (a run).
#[derive(Debug, Clone)]
pub(super) struct BarChart {
    title: String,
    y: Axis,
    groups: Vec<String>,
    series: Vec<Series>,
    note: Option<String>,
}

impl BarChart {
    /// An empty chart whose groups are named `groups`, left to right.
    pub(super) fn new(title: &str, y: Axis, groups: &[&str]) -> Self {
        Self {
            title: title.to_owned(),
            y,
            groups: groups.iter().map(|g| (*g).to_owned()).collect(),
            series: Vec::new(),
            note: None,
        }
    }

    /// Adds a series: its value in each group, in the groups' order (a missing or non-finite
    /// value draws no bar).
    pub(super) fn series(&mut self, name: &str, colour: usize, values: &[f64]) -> &mut Self {
        self.series.push(Series {
            name: name.to_owned(),
            colour,
            points: values
                .iter()
                .enumerate()
                .filter(|(_, v)| v.is_finite())
                .map(|(i, v)| (i as f64, *v))
                .collect(),
        });
        self
    }

    /// A line of text under the chart.
    pub(super) fn note(&mut self, note: &str) -> &mut Self {
        self.note = Some(note.to_owned());
        self
    }

    /// The chart as a `<figure>`: caption, SVG, legend, note.
    pub(super) fn write(&self, out: &mut String) -> fmt::Result {
        figure_start(out, &self.title)?;
        let all = || self.series.iter().flat_map(|s| s.points.iter());
        match bounds(all()) {
            Some((_, _, y_lo, y_hi)) if !self.groups.is_empty() => {
                let y = Scale::fit(&self.y, y_lo, y_hi, false);
                svg_start(out, &self.title)?;
                y_grid(out, &y)?;
                let group_w = (W - LEFT - RIGHT) / self.groups.len() as f64;
                let bar_w = 0.86 * group_w / self.series.len().max(1) as f64;
                // Values on the bars when every one fits over its bar (a character of
                // them is about 6.3 units wide), on none otherwise.
                let widest = all()
                    .map(|(_, v)| y.value_label(*v).chars().count())
                    .max()
                    .unwrap_or(0);
                let values = 6.3 * widest as f64 <= bar_w;
                for (g, name) in self.groups.iter().enumerate() {
                    let gx = LEFT + g as f64 * group_w;
                    write!(
                        out,
                        r#"<text class="group" x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
                        gx + group_w / 2.0,
                        H - BOTTOM + 20.0,
                        Esc(name)
                    )?;
                    for (i, s) in self.series.iter().enumerate() {
                        let Some(&(_, v)) = s.points.iter().find(|(x, _)| *x == g as f64) else {
                            continue;
                        };
                        let x0 = gx + 0.07 * group_w + i as f64 * bar_w;
                        let (top, base) = (y.px(v.max(y.lo)), y.px(y.lo.max(0.0)));
                        let label = y.value_label(v);
                        write!(
                            out,
                            r#"<rect x="{x0:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="{}"><title>{} — {}: {label}</title></rect>"#,
                            top.min(base),
                            0.9 * bar_w,
                            (base - top).abs(),
                            colour(s.colour),
                            Esc(&s.name),
                            Esc(name),
                        )?;
                        if values {
                            write!(
                                out,
                                r#"<text class="barval" x="{:.1}" y="{:.1}" text-anchor="middle">{label}</text>"#,
                                x0 + 0.45 * bar_w,
                                top.min(base) - 4.0
                            )?;
                        }
                    }
                }
                axes(out, "", &self.y.label)?;
                out.push_str("</svg>");
            }
            _ => no_data(out, &self.title)?,
        }
        out.push_str(r#"<ul class="legend">"#);
        for s in &self.series {
            out.push_str("<li>");
            swatch(out, s.colour)?;
            write!(out, "{}</li>", Esc(&s.name))?;
        }
        out.push_str("</ul>");
        figure_end(out, self.note.as_deref())
    }
}

/// At most `max` (at least 4) of `points`, in order: the first, the last and, in between, the
/// lowest and the highest of each of equal runs of the rest, so that spikes survive. The same
/// input always gives the same output.
pub(super) fn downsample(points: &[(f64, f64)], max: usize) -> Vec<(f64, f64)> {
    let max = max.max(4);
    let (Some((first, rest)), true) = (points.split_first(), points.len() > max) else {
        return points.to_vec();
    };
    let Some((last, inner)) = rest.split_last() else {
        return points.to_vec();
    };
    let buckets = (max - 2) / 2;
    let mut out = Vec::with_capacity(max);
    out.push(*first);
    for chunk in inner.chunks(inner.len().div_ceil(buckets)) {
        let (mut lo, mut hi) = (0, 0);
        let (mut lo_v, mut hi_v) = (f64::INFINITY, f64::NEG_INFINITY);
        for (i, &(_, v)) in chunk.iter().enumerate() {
            if v < lo_v {
                (lo, lo_v) = (i, v);
            }
            if v > hi_v {
                (hi, hi_v) = (i, v);
            }
        }
        out.extend(chunk.get(lo.min(hi)).copied());
        if lo != hi {
            out.extend(chunk.get(lo.max(hi)).copied());
        }
    }
    out.push(*last);
    out
}

/// An axis fitted to its data: its range, ticks and how to draw and label a value.
#[derive(Debug, Clone)]
struct Scale {
    unit: Unit,
    lo: f64,
    hi: f64,
    step: f64,
    ticks: Vec<f64>,
    /// The drawing's coordinates of `lo` and `hi`.
    from: f64,
    to: f64,
}

impl Scale {
    /// Fits `axis` to data in `data_lo..=data_hi`: from 0 (or the data's lowest, when
    /// negative) to the data's highest rounded up to a tick, a share to 100 % at least.
    fn fit(axis: &Axis, data_lo: f64, data_hi: f64, horizontal: bool) -> Self {
        let (lo, mut hi) = axis.range.unwrap_or_else(|| {
            let lo = data_lo.min(0.0);
            let hi = match axis.unit {
                Unit::Share => data_hi.max(1.0),
                _ => data_hi,
            };
            (lo, hi)
        });
        if hi.partial_cmp(&lo) != Some(std::cmp::Ordering::Greater) {
            hi = lo + if axis.unit == Unit::Time { 60.0 } else { 1.0 };
        }
        let step = match axis.unit {
            Unit::Time => time_step(hi - lo),
            Unit::Count => nice_step((hi - lo) / (MAX_TICKS - 2.0), true).max(1.0),
            Unit::Share | Unit::Number => nice_step((hi - lo) / (MAX_TICKS - 2.0), false),
        };
        if axis.range.is_none() && axis.unit != Unit::Time {
            hi = lo + ((hi - lo) / step).ceil() * step;
        }
        let first = (lo / step).ceil();
        let ticks = (0..)
            .map(|k| (first + f64::from(k)) * step)
            .take_while(|t| *t <= hi + step * 1e-9)
            .take(64)
            .collect();
        let (from, to) = if horizontal {
            (LEFT, W - RIGHT)
        } else {
            (H - BOTTOM, TOP)
        };
        Self {
            unit: axis.unit,
            lo,
            hi,
            step,
            ticks,
            from,
            to,
        }
    }

    /// `v`'s coordinate in the drawing.
    fn px(&self, v: f64) -> f64 {
        let f = ((v - self.lo) / (self.hi - self.lo)).clamp(0.0, 1.0);
        self.from + f * (self.to - self.from)
    }

    /// A tick's label.
    fn label(&self, v: f64) -> String {
        match self.unit {
            Unit::Time => clock(v),
            Unit::Share => format!(
                "{}%",
                trim(&format!("{:.*}", decimals(self.step * 100.0), v * 100.0))
            ),
            Unit::Count | Unit::Number => compact(v, self.step),
        }
    }

    /// A value's label (on a bar).
    fn value_label(&self, v: f64) -> String {
        match self.unit {
            Unit::Time => clock(v),
            Unit::Share if v.abs() >= 0.1 => format!("{:.0}%", v * 100.0),
            Unit::Share => format!("{}%", trim(&format!("{:.1}", v * 100.0))),
            Unit::Count | Unit::Number if v.abs() >= 100.0 => compact(v, 1.0),
            Unit::Count | Unit::Number => compact(v, 0.1),
        }
    }
}

/// The lowest and highest x and y of `points`; `None` when there are none.
fn bounds<'a>(points: impl Iterator<Item = &'a (f64, f64)>) -> Option<(f64, f64, f64, f64)> {
    points.fold(None, |acc, &(x, y)| match acc {
        None => Some((x, x, y, y)),
        Some((x_lo, x_hi, y_lo, y_hi)) => {
            Some((x_lo.min(x), x_hi.max(x), y_lo.min(y), y_hi.max(y)))
        }
    })
}

fn figure_start(out: &mut String, title: &str) -> fmt::Result {
    write!(
        out,
        r#"<figure class="chart"><figcaption>{}</figcaption>"#,
        Esc(title)
    )
}

fn figure_end(out: &mut String, note: Option<&str>) -> fmt::Result {
    if let Some(note) = note {
        write!(out, r#"<p class="note">{}</p>"#, Esc(note))?;
    }
    out.push_str("</figure>\n");
    Ok(())
}

fn svg_start(out: &mut String, title: &str) -> fmt::Result {
    write!(
        out,
        r#"<svg viewBox="0 0 {W} {H}" width="100%" role="img" aria-label="{}">"#,
        Esc(title)
    )
}

/// An empty frame that says so.
fn no_data(out: &mut String, title: &str) -> fmt::Result {
    svg_start(out, title)?;
    write!(
        out,
        r#"<rect class="frame" x="{LEFT}" y="{TOP}" width="{:.1}" height="{:.1}"/><text class="nodata" x="{:.1}" y="{:.1}" text-anchor="middle">no data</text></svg>"#,
        W - LEFT - RIGHT,
        H - TOP - BOTTOM,
        (LEFT + W - RIGHT) / 2.0,
        (TOP + H - BOTTOM) / 2.0 + 6.0
    )
}

/// The y axis's grid lines and tick labels.
fn y_grid(out: &mut String, y: &Scale) -> fmt::Result {
    for &t in &y.ticks {
        let py = y.px(t);
        write!(
            out,
            r#"<line class="grid" x1="{LEFT}" x2="{:.1}" y1="{py:.1}" y2="{py:.1}"/><text class="tick" x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
            W - RIGHT,
            LEFT - 6.0,
            py + 4.5,
            y.label(t)
        )?;
    }
    Ok(())
}

/// The two axis lines and their labels: the y axis's above it, the x axis's below the ticks.
fn axes(out: &mut String, x_label: &str, y_label: &str) -> fmt::Result {
    write!(
        out,
        r#"<path class="axis" d="M{LEFT} {TOP}V{:.1}H{:.1}"/>"#,
        H - BOTTOM,
        W - RIGHT
    )?;
    if !y_label.is_empty() {
        write!(
            out,
            r#"<text class="axis-label" x="4" y="{:.1}">{}</text>"#,
            TOP - 16.0,
            Esc(y_label)
        )?;
    }
    if !x_label.is_empty() {
        write!(
            out,
            r#"<text class="axis-label" x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            (LEFT + W - RIGHT) / 2.0,
            H - 6.0,
            Esc(x_label)
        )?;
    }
    Ok(())
}

/// The smallest of 1, 2, 2.5, 5 × a power of ten that is at least `raw` (not 2.5 below 10
/// when `whole`: the ticks of a count are whole numbers).
fn nice_step(raw: f64, whole: bool) -> f64 {
    if !(raw.is_finite() && raw > 0.0) {
        return 1.0;
    }
    let magnitude = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 2.5, 5.0, 10.0]
        .into_iter()
        .filter(|m| !(whole && *m == 2.5 && magnitude < 10.0))
        .map(|m| m * magnitude)
        .find(|s| *s >= raw * (1.0 - 1e-9))
        .unwrap_or(10.0 * magnitude)
}

/// A tick step for a time axis `span` seconds long: a round number of seconds, minutes,
/// hours or days that gives at most [`MAX_TICKS`] ticks.
fn time_step(span: f64) -> f64 {
    const STEPS: [f64; 19] = [
        1.0, 2.0, 5.0, 10.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 900.0, 1800.0, 3600.0, 7200.0,
        10800.0, 14400.0, 21600.0, 43200.0, 86400.0,
    ];
    STEPS
        .into_iter()
        .find(|s| span / s <= MAX_TICKS - 1.0)
        .unwrap_or_else(|| 86400.0 * nice_step(span / 86400.0 / (MAX_TICKS - 1.0), true))
}

/// Seconds into the run as a short time: `0`, `45s`, `15m`, `1m30s`, `2h`, `1h15`, `24h`,
/// and in days from the second day on (`2d`, `2d12h`).
fn clock(t: f64) -> String {
    let t = t.round();
    if t == 0.0 {
        return "0".to_owned();
    }
    let (d, h, m, s) = (
        (t / 86400.0).floor(),
        // Hours of the day in days, of the run before.
        if t >= 2.0 * 86400.0 {
            (t % 86400.0 / 3600.0).floor()
        } else {
            (t / 3600.0).floor()
        },
        (t % 3600.0 / 60.0).floor(),
        t % 60.0,
    );
    match (d >= 2.0, t >= 3600.0, t >= 60.0) {
        (true, _, _) if t % 86400.0 == 0.0 => format!("{d:.0}d"),
        (true, _, _) => format!("{d:.0}d{h:.0}h"),
        (_, true, _) if m == 0.0 => format!("{h:.0}h"),
        (_, true, _) => format!("{h:.0}h{m:02.0}"),
        (_, _, true) if s == 0.0 => format!("{m:.0}m"),
        (_, _, true) => format!("{m:.0}m{s:02.0}s"),
        _ => format!("{s:.0}s"),
    }
}

/// `v` shortened: `950`, `12.5k`, `1.2M`; with the decimals a tick step of `step` needs.
fn compact(v: f64, step: f64) -> String {
    let a = v.abs();
    if a >= 1e6 {
        format!("{}M", trim(&format!("{:.2}", v / 1e6)))
    } else if a >= 1e4 {
        format!("{}k", trim(&format!("{:.1}", v / 1e3)))
    } else {
        trim(&format!("{v:.*}", decimals(step)))
    }
}

/// How many decimals tell apart values `step` apart (at most 6).
fn decimals(step: f64) -> usize {
    let mut s = step.abs();
    for d in 0..6 {
        if s == 0.0 || (s - s.round()).abs() < 1e-6 * s.max(1.0) {
            return d;
        }
        s *= 10.0;
    }
    6
}

/// A decimal number without trailing zeros after its point.
fn trim(s: &str) -> String {
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_owned()
    } else {
        s.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn day() -> Vec<(f64, f64)> {
        (0..1440)
            .map(|i| (f64::from(i) * 60.0, (f64::from(i) / 100.0).sin()))
            .collect()
    }

    #[test]
    fn downsample_keeps_first_and_last_and_bounds_the_count() {
        let mut points = day();
        points[700].1 = 5.0; // a spike
        for max in [4, 5, 10, 99, 600] {
            let d = downsample(&points, max);
            assert!(d.len() <= max, "{} points for max {max}", d.len());
            assert_eq!(d.first(), points.first());
            assert_eq!(d.last(), points.last());
            assert!(d.windows(2).all(|w| w[0].0 < w[1].0), "in order");
            assert!(d.contains(&points[700]), "the spike survives (max {max})");
        }
        assert_eq!(downsample(&points, 600), downsample(&points, 600));
    }

    #[test]
    fn downsample_leaves_short_series_alone() {
        let points = vec![(0.0, 1.0), (1.0, 2.0), (2.0, 0.5)];
        assert_eq!(downsample(&points, 600), points);
        assert_eq!(downsample(&[], 600), vec![]);
        assert_eq!(downsample(&day()[..600], 600).len(), 600);
    }

    #[test]
    fn time_axes_tick_at_round_times() {
        let axis = Axis::new(Unit::Time, "time").range(0.0, 86400.0);
        let s = Scale::fit(&axis, 0.0, 86400.0, true);
        let labels: Vec<String> = s.ticks.iter().map(|t| s.label(*t)).collect();
        assert_eq!(labels, ["0", "4h", "8h", "12h", "16h", "20h", "24h"]);
        let axis = Axis::new(Unit::Time, "time").range(0.0, 1800.0);
        let s = Scale::fit(&axis, 0.0, 1800.0, true);
        let labels: Vec<String> = s.ticks.iter().map(|t| s.label(*t)).collect();
        assert_eq!(labels, ["0", "5m", "10m", "15m", "20m", "25m", "30m"]);
        assert_eq!(clock(5400.0), "1h30");
        assert_eq!(clock(90.0), "1m30s");
        assert_eq!(clock(45.0), "45s");
        assert_eq!(clock(3.0 * 86400.0), "3d");
        assert_eq!(clock(2.5 * 86400.0), "2d12h");
    }

    #[test]
    fn value_axes_round_up_to_a_tick() {
        let s = Scale::fit(&Axis::new(Unit::Count, "n"), 0.0, 1234.0, false);
        assert_eq!(s.hi, 1250.0);
        assert_eq!(s.ticks.first(), Some(&0.0));
        assert_eq!(s.ticks.last(), Some(&1250.0));
        let s = Scale::fit(&Axis::new(Unit::Count, "n"), 0.0, 12.0, false);
        assert!(s.ticks.iter().all(|t| t.fract() == 0.0), "{:?}", s.ticks);
        let s = Scale::fit(&Axis::new(Unit::Count, "n"), 0.0, 0.0, false);
        assert_eq!(s.ticks, [0.0, 1.0]);
        let s = Scale::fit(&Axis::new(Unit::Share, "%"), 0.0, 0.4, false);
        let labels: Vec<String> = s.ticks.iter().map(|t| s.label(*t)).collect();
        assert_eq!(labels, ["0%", "20%", "40%", "60%", "80%", "100%"]);
        let s = Scale::fit(&Axis::new(Unit::Number, "s"), 0.0, 0.03, false);
        let labels: Vec<String> = s.ticks.iter().map(|t| s.label(*t)).collect();
        assert_eq!(labels, ["0", "0.01", "0.02", "0.03"]);
        assert_eq!(compact(125_000.0, 25_000.0), "125k");
        assert_eq!(compact(2_500_000.0, 500_000.0), "2.5M");
    }

    #[test]
    fn a_chart_without_points_says_no_data() {
        let mut chart = LineChart::new(
            "t",
            Axis::new(Unit::Time, "time"),
            Axis::new(Unit::Count, "n"),
            Shape::Line,
        );
        chart.series("a", 0, []);
        let mut out = String::new();
        chart.write(&mut out).unwrap();
        assert!(out.contains("no data"));
        assert!(!out.contains("<polyline"));
    }
}
