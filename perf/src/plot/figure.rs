//! Figures: panels of lines, bars and levels, drawn as SVG with plotters.
//!
//! The charts describe what to draw (this module's types); this module alone
//! knows plotters. Axes are labelled at chosen ticks only: the measured x
//! values (clone counts 1, 8, 32 rather than 1, 10, 100) and round y values.

use std::ops::Range;

use anyhow::{Context, Result};
use plotters::coord::Shift;
use plotters::coord::ranged1d::{DefaultFormatting, KeyPointHint, Ranged};
use plotters::element::DashedPathElement;
use plotters::prelude::*;

/// A median and the range of the values it summarizes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stroke {
    Solid,
    Dashed,
    Dotted,
}

impl Stroke {
    /// The strokes in the order charts hand them out.
    pub const ALL: [Stroke; 3] = [Stroke::Solid, Stroke::Dashed, Stroke::Dotted];
}

#[derive(Debug, Clone, PartialEq)]
pub enum Shape {
    /// Medians joined in x order, with their ranges as whiskers.
    Line(Vec<(f64, Spread)>),
    /// A bar per category index; `slot` of `slots` bars side by side.
    Bars {
        slot: usize,
        slots: usize,
        values: Vec<(usize, Spread)>,
    },
    /// A horizontal line across the panel (a ceiling), its range shaded.
    Level(Spread),
}

/// One named series: its legend entry is its name, colour and stroke.
#[derive(Debug, Clone, PartialEq)]
pub struct Mark {
    pub name: String,
    /// An index into the palette.
    pub color: usize,
    pub stroke: Stroke,
    pub shape: Shape,
}

#[derive(Debug, Clone, PartialEq)]
pub enum XAxis {
    /// Numbers labelled at the measured values; log for counts that grow by factors.
    Numbers {
        label: String,
        log: bool,
    },
    Categories {
        label: String,
        names: Vec<String>,
    },
    /// Numbers on a linear axis from 0 labelled at round values: for many
    /// measured values (samples every N cycles).
    Linear {
        label: String,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct Panel {
    pub title: String,
    pub x: XAxis,
    pub y_label: String,
    pub marks: Vec<Mark>,
}

/// Panels side by side (two a row) under one title, with one legend below.
#[derive(Debug, Clone, PartialEq)]
pub struct Figure {
    pub title: String,
    pub panels: Vec<Panel>,
}

/// Colours that stay apart in print and for the common colour blindnesses.
const PALETTE: [RGBColor; 6] = [
    RGBColor(0, 114, 178),
    RGBColor(213, 94, 0),
    RGBColor(0, 158, 115),
    RGBColor(204, 121, 167),
    RGBColor(230, 159, 0),
    RGBColor(86, 180, 233),
];
const FONT: &str = "sans-serif";
const PANEL_HEIGHT: u32 = 400;
const LEGEND_ROW: u32 = 22;
/// Values spanning more than this factor get a log axis.
const LOG_SPAN: f64 = 20.0;
/// What failed when plotters fails.
const DRAWING: &str = "drawing the chart";

fn color(index: usize) -> RGBColor {
    PALETTE[index % PALETTE.len()]
}

/// The dash and gap lengths of a stroke, in pixels; `None` for a solid one.
fn dashes(stroke: Stroke) -> Option<(i32, i32)> {
    match stroke {
        Stroke::Solid => None,
        Stroke::Dashed => Some((6, 3)),
        Stroke::Dotted => Some((2, 3)),
    }
}

impl Figure {
    pub fn to_svg(&self) -> Result<String> {
        let columns = self.panels.len().clamp(1, 2);
        let rows = self.panels.len().div_ceil(columns);
        let panel_width = self.panels.iter().map(panel_width).max().unwrap_or(560);
        // plotters writes font sizes divided by 1.24: the title's 22 is 18 px,
        // at most about 11 px a character.
        let title_width = self.title.chars().count() as u32 * 11 + 40;
        let width = (panel_width * columns as u32).max(title_width);
        let legend = self.legend();
        let label_chars = legend.iter().map(|m| m.name.chars().count()).max();
        // The legend's 15 is 12 px, about 7 px a character; 48 px for the sample.
        let entry_width = label_chars.unwrap_or(0) as u32 * 7 + 48;
        let per_row = (width / entry_width).max(1) as usize;
        let legend_height = legend.len().div_ceil(per_row) as u32 * LEGEND_ROW + 16;
        let title_height = 40;
        let height = title_height + rows as u32 * PANEL_HEIGHT + legend_height;
        let mut svg = String::new();
        {
            let root = SVGBackend::with_string(&mut svg, (width, height)).into_drawing_area();
            root.fill(&WHITE).context(DRAWING)?;
            let body = root.titled(&self.title, (FONT, 22)).context(DRAWING)?;
            let (panels, legend_area) = body.split_vertically(rows as u32 * PANEL_HEIGHT);
            for (panel, area) in self.panels.iter().zip(panels.split_evenly((rows, columns))) {
                draw_panel(panel, &area)?;
            }
            for (i, mark) in legend.iter().enumerate() {
                let x = (i % per_row) as i32 * entry_width as i32 + 16;
                let y = (i / per_row) as i32 * LEGEND_ROW as i32 + 12;
                draw_sample(&legend_area, mark, x, y)?;
                legend_area
                    .draw(&Text::new(
                        mark.name.clone(),
                        (x + 36, y - 7),
                        (FONT, 15).into_font().color(&BLACK),
                    ))
                    .context(DRAWING)?;
            }
            root.present().context(DRAWING)?;
        }
        Ok(svg)
    }

    /// One mark per legend entry: the first of each name, colour and stroke.
    fn legend(&self) -> Vec<&Mark> {
        let mut entries: Vec<&Mark> = Vec::new();
        for mark in self.panels.iter().flat_map(|p| &p.marks) {
            let same = |e: &&Mark| {
                e.name == mark.name
                    && e.color == mark.color
                    && e.stroke == mark.stroke
                    && matches!(e.shape, Shape::Bars { .. })
                        == matches!(mark.shape, Shape::Bars { .. })
            };
            if !entries.iter().any(same) {
                entries.push(mark);
            }
        }
        entries
    }
}

/// Wider panels for many categories, so that their names do not overlap.
fn panel_width(panel: &Panel) -> u32 {
    match &panel.x {
        XAxis::Categories { names, .. } => (names.len() as u32 * 130 + 110).max(560),
        XAxis::Numbers { .. } | XAxis::Linear { .. } => 560,
    }
}

/// A legend entry's sample at (`x`, `y`): a swatch for bars, else a stroke.
fn draw_sample(area: &DrawingArea<SVGBackend, Shift>, mark: &Mark, x: i32, y: i32) -> Result<()> {
    let style = color(mark.color).stroke_width(2);
    let result = match mark.shape {
        Shape::Bars { .. } => area.draw(&Rectangle::new(
            [(x + 4, y - 6), (x + 24, y + 6)],
            color(mark.color).filled(),
        )),
        _ => {
            let path = [(x, y), (x + 28, y)];
            match dashes(mark.stroke) {
                None => area.draw(&PathElement::new(path, style)),
                Some((dash, gap)) => area.draw(&DashedPathElement::new(path, dash, gap, style)),
            }
        }
    };
    result.context(DRAWING)
}

/// An axis with its own ticks: plotters' number axes place labels at round
/// values, which misses the measured clone counts and category centres.
#[derive(Debug, Clone)]
struct Scale {
    range: Range<f64>,
    log: bool,
    ticks: Vec<f64>,
}

impl Scale {
    fn position(&self, v: f64) -> f64 {
        if self.log { v.ln() } else { v }
    }

    /// Linear from 0, or log between decades, with round ticks.
    fn for_values(values: &[f64]) -> Self {
        let (lo, hi) = bounds(values).unwrap_or((0.0, 1.0));
        if lo > 0.0 && hi / lo > LOG_SPAN {
            let (first, last) = (lo.log10().floor() as i32, hi.log10().ceil() as i32);
            let decades: Vec<f64> = (first..=last).map(|k| 10f64.powi(k)).collect();
            let ticks = if decades.len() > 3 {
                decades
            } else {
                decades
                    .iter()
                    .flat_map(|d| [*d, 2.0 * d, 5.0 * d])
                    .filter(|&t| t <= 10f64.powi(last))
                    .collect()
            };
            return Self {
                range: 10f64.powi(first)..10f64.powi(last),
                log: true,
                ticks,
            };
        }
        Self::linear(hi)
    }

    /// From 0 to a round value at least `hi`, with round ticks.
    fn linear(hi: f64) -> Self {
        let step = round_step(hi.max(f64::MIN_POSITIVE) / 6.0);
        let top = (hi / step).ceil().max(1.0) * step;
        let steps = (top / step).round() as u32;
        Self {
            range: 0.0..top,
            log: false,
            ticks: (0..=steps).map(|i| f64::from(i) * step).collect(),
        }
    }

    /// The measured `values` as ticks, with some room on either side.
    fn for_measured(values: &[f64], log: bool) -> Self {
        let mut ticks = values.to_vec();
        ticks.sort_by(f64::total_cmp);
        ticks.dedup();
        let (lo, hi) = bounds(&ticks).unwrap_or((0.0, 1.0));
        let log = log && lo > 0.0;
        let range = if log {
            let pad = (hi / lo).powf(0.08).max(1.3);
            lo / pad..hi * pad
        } else {
            let pad = if hi > lo { (hi - lo) * 0.08 } else { 1.0 };
            lo - pad..hi + pad
        };
        Self { range, log, ticks }
    }

    fn for_categories(count: usize) -> Self {
        Self {
            // One slot at least: an empty axis would have no width.
            range: -0.5..count.max(1) as f64 - 0.5,
            log: false,
            ticks: (0..count).map(|i| i as f64).collect(),
        }
    }
}

impl Ranged for Scale {
    type FormatOption = DefaultFormatting;
    type ValueType = f64;

    fn map(&self, value: &f64, limit: (i32, i32)) -> i32 {
        let (lo, hi) = (
            self.position(self.range.start),
            self.position(self.range.end),
        );
        let share = (self.position(*value) - lo) / (hi - lo);
        limit.0 + (share * f64::from(limit.1 - limit.0)).round() as i32
    }

    fn key_points<H: KeyPointHint>(&self, hint: H) -> Vec<f64> {
        // Grid lines and labels at the ticks only, none between them.
        if hint.weight().allow_light_points() {
            Vec::new()
        } else {
            self.ticks.clone()
        }
    }

    fn range(&self) -> Range<f64> {
        self.range.clone()
    }
}

fn bounds(values: &[f64]) -> Option<(f64, f64)> {
    let finite = values.iter().copied().filter(|v| v.is_finite());
    let lo = finite.clone().min_by(f64::total_cmp)?;
    let hi = finite.max_by(f64::total_cmp)?;
    Some((lo, hi))
}

/// The smallest of 1, 2 or 5 times a power of ten that is at least `v` (> 0).
fn round_step(v: f64) -> f64 {
    let power = 10f64.powf(v.log10().floor());
    [1.0, 2.0, 5.0]
        .into_iter()
        .map(|m| m * power)
        .find(|&step| step >= v)
        .unwrap_or(10.0 * power)
}

/// A tick label: three significant digits at most, k and M for large values.
pub fn number(v: f64) -> String {
    if v == 0.0 || !v.is_finite() {
        return format!("{v}");
    }
    let (scaled, suffix) = match v.abs() {
        a if a >= 1e6 => (v / 1e6, "M"),
        a if a >= 1e4 => (v / 1e3, "k"),
        _ => (v, ""),
    };
    let digits = 10f64.powi(2 - scaled.abs().log10().floor() as i32);
    format!("{}{suffix}", (scaled * digits).round() / digits)
}

fn all_values(panel: &Panel) -> Vec<f64> {
    let spreads = panel.marks.iter().flat_map(|m| match &m.shape {
        Shape::Line(points) => points.iter().map(|p| p.1).collect(),
        Shape::Bars { values, .. } => values.iter().map(|v| v.1).collect(),
        Shape::Level(spread) => vec![*spread],
    });
    spreads.flat_map(|s| [s.min, s.median, s.max]).collect()
}

fn draw_panel(panel: &Panel, area: &DrawingArea<SVGBackend, Shift>) -> Result<()> {
    let y = Scale::for_values(&all_values(panel));
    let (x, x_label, names) = match &panel.x {
        XAxis::Numbers { label, log } => {
            let xs: Vec<f64> = panel
                .marks
                .iter()
                .flat_map(|m| match &m.shape {
                    Shape::Line(points) => points.iter().map(|p| p.0).collect(),
                    _ => Vec::new(),
                })
                .collect();
            (Scale::for_measured(&xs, *log), label, None)
        }
        XAxis::Categories { label, names } => {
            (Scale::for_categories(names.len()), label, Some(names))
        }
        XAxis::Linear { label } => {
            let xs = panel.marks.iter().flat_map(|m| match &m.shape {
                Shape::Line(points) => points.iter().map(|p| p.0).collect(),
                _ => Vec::new(),
            });
            (Scale::linear(xs.fold(0.0, f64::max)), label, None)
        }
    };
    let x_range = x.range.clone();
    let base = y.range.start;
    let mut builder = ChartBuilder::on(area);
    if !panel.title.is_empty() {
        builder.caption(&panel.title, (FONT, 18));
    }
    let mut chart = builder
        .margin(12)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d(x, y)
        .context(DRAWING)?;
    let x_label_of = |v: &f64| match names {
        Some(names) => names.get(v.round() as usize).cloned().unwrap_or_default(),
        None => number(*v),
    };
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc(&panel.y_label)
        .x_label_formatter(&x_label_of)
        .y_label_formatter(&|v| number(*v))
        .label_style((FONT, 14))
        .axis_desc_style((FONT, 16))
        .bold_line_style(RGBColor(225, 225, 225))
        .draw()
        .context(DRAWING)?;
    for mark in &panel.marks {
        let style = color(mark.color).stroke_width(2);
        match &mark.shape {
            Shape::Line(points) => {
                let mut points = points.clone();
                points.sort_by(|a, b| a.0.total_cmp(&b.0));
                let path: Vec<(f64, f64)> = points.iter().map(|(x, s)| (*x, s.median)).collect();
                draw_path(&mut chart, path.clone(), mark.stroke, style)?;
                chart
                    .draw_series(
                        path.iter()
                            .map(|&p| Circle::new(p, 3, color(mark.color).filled())),
                    )
                    .context(DRAWING)?;
                chart
                    .draw_series(points.iter().filter(|(_, s)| s.min < s.max).map(|(x, s)| {
                        ErrorBar::new_vertical(*x, s.min, s.median, s.max, style.stroke_width(1), 8)
                    }))
                    .context(DRAWING)?;
            }
            Shape::Bars {
                slot,
                slots,
                values,
            } => {
                // The bars of a category share 80% of its width.
                let bar = 0.8 / *slots as f64;
                let left = |category: usize| category as f64 - 0.4 + *slot as f64 * bar;
                chart
                    .draw_series(values.iter().map(|(c, s)| {
                        Rectangle::new(
                            [
                                (left(*c) + 0.06 * bar, base),
                                (left(*c) + 0.94 * bar, s.median),
                            ],
                            color(mark.color).filled(),
                        )
                    }))
                    .context(DRAWING)?;
                chart
                    .draw_series(values.iter().filter(|(_, s)| s.min < s.max).map(|(c, s)| {
                        ErrorBar::new_vertical(
                            left(*c) + 0.5 * bar,
                            s.min,
                            s.median,
                            s.max,
                            BLACK.stroke_width(1),
                            6,
                        )
                    }))
                    .context(DRAWING)?;
            }
            Shape::Level(s) => {
                let (start, end) = (x_range.start, x_range.end);
                chart
                    .draw_series(std::iter::once(Rectangle::new(
                        [(start, s.min), (end, s.max)],
                        color(mark.color).mix(0.15).filled(),
                    )))
                    .context(DRAWING)?;
                let path = vec![(start, s.median), (end, s.median)];
                draw_path(&mut chart, path, mark.stroke, style)?;
            }
        }
    }
    Ok(())
}

fn draw_path(
    chart: &mut ChartContext<SVGBackend, Cartesian2d<Scale, Scale>>,
    path: Vec<(f64, f64)>,
    stroke: Stroke,
    style: ShapeStyle,
) -> Result<()> {
    let drawn = match dashes(stroke) {
        None => chart.draw_series(LineSeries::new(path, style)),
        Some((dash, gap)) => chart.draw_series(DashedLineSeries::new(path, dash, gap, style)),
    };
    drawn.context(DRAWING)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tick_labels_are_short() {
        assert_eq!(number(0.0), "0");
        assert_eq!(number(0.35), "0.35");
        assert_eq!(number(1234.5), "1230");
        assert_eq!(number(250_000.0), "250k");
        assert_eq!(number(1_000_000.0), "1M");
        assert_eq!(number(12_500.0), "12.5k");
    }

    #[test]
    fn values_over_decades_get_a_log_axis() {
        let log = Scale::for_values(&[0.35, 4000.0]);
        assert!(log.log);
        assert_eq!(log.range, 0.1..10_000.0);
        assert_eq!(log.ticks, vec![0.1, 1.0, 10.0, 100.0, 1000.0, 10_000.0]);
        let linear = Scale::for_values(&[117.0, 345.0]);
        assert!(!linear.log);
        assert_eq!(linear.range, 0.0..400.0);
        assert_eq!(linear.ticks.first(), Some(&0.0));
        assert_eq!(linear.ticks.last(), Some(&400.0));
    }

    #[test]
    fn measured_values_are_the_ticks() {
        let clones = Scale::for_measured(&[32.0, 1.0, 8.0, 8.0], true);
        assert_eq!(clones.ticks, vec![1.0, 8.0, 32.0]);
        assert!(clones.range.start < 1.0 && clones.range.end > 32.0);
        // A zero cannot go on a log axis: loss percentages stay linear.
        assert!(!Scale::for_measured(&[0.0, 5.0, 20.0], true).log);
    }

    #[test]
    fn log_and_linear_axes_map_to_pixels() {
        let log = Scale::for_values(&[1.0, 1000.0]);
        assert_eq!(log.map(&1.0, (0, 300)), 0);
        assert_eq!(log.map(&10.0, (0, 300)), 100);
        assert_eq!(log.map(&1000.0, (0, 300)), 300);
        let categories = Scale::for_categories(3);
        assert_eq!(categories.map(&1.0, (0, 300)), 150);
    }
}
