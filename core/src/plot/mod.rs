//! Plots as PNG files: runs write loss curves, evaluations write bar charts. Drawn with
//! `plotters` on an RGB buffer (text in the embedded DejaVu Sans, so no system font is
//! needed), encoded with `png`.

use std::sync::OnceLock;

use plotters::coord::combinators::BindKeyPoints;
use plotters::prelude::*;

use crate::error::{Error, Result};

const WIDTH: u32 = 900;
const HEIGHT: u32 = 520;
/// A bar chart's x units per group.
const SLOT: i32 = 1000;
/// The font family every text uses; registered once from the embedded bytes.
const FONT: &str = "sans-serif";

/// The series colours, in order (matplotlib's tab10, which readers know from the paper's plots).
const SERIES: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

fn series_color(i: usize) -> RGBColor {
    SERIES[i % SERIES.len()]
}

fn register_font() -> Result<()> {
    static REGISTERED: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            plotters::style::register_font(FONT, FontStyle::Normal, dejavu::sans::regular())
                .map_err(|_| "the embedded DejaVu Sans font does not parse".to_string())
        })
        .clone()
        .map_err(Error::msg)
}

fn drawing<E: std::error::Error>(e: E) -> Error {
    Error::msg(format!("drawing a plot: {e}"))
}

/// Draws on a white canvas with `draw` and encodes the result as a PNG.
fn render(draw: impl FnOnce(&DrawingArea<BitMapBackend, plotters::coord::Shift>) -> Result<()>) -> Result<Vec<u8>> {
    register_font()?;
    let mut rgb = vec![0u8; (WIDTH * HEIGHT * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut rgb, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(drawing)?;
        draw(&root)?;
        root.present().map_err(drawing)?;
    }
    let mut out = Vec::new();
    let mut encoder = png::Encoder::new(&mut out, WIDTH, HEIGHT);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header().map_err(drawing)?;
    writer.write_image_data(&rgb).map_err(drawing)?;
    writer.finish().map_err(drawing)?;
    Ok(out)
}

/// "no data" in the corner of an empty plot: a run's first checkpoint has no curve yet.
fn empty(root: &DrawingArea<BitMapBackend, plotters::coord::Shift>, what: &str) -> Result<()> {
    root.draw(&Text::new(what, (40, 40), (FONT, 20).into_font())).map_err(drawing)
}

fn padded(lo: f64, hi: f64) -> std::ops::Range<f64> {
    let pad = ((hi - lo) * 0.05).max(1e-6);
    lo - pad..hi + pad
}

/// A PNG of line series `(name, points)` against a shared x axis; points that are not
/// finite are left out.
pub fn line_chart(title: &str, x_label: &str, series: &[(&str, Vec<(f64, f64)>)]) -> Result<Vec<u8>> {
    let finite: Vec<Vec<(f64, f64)>> = series
        .iter()
        .map(|(_, p)| p.iter().copied().filter(|(x, y)| x.is_finite() && y.is_finite()).collect())
        .collect();
    let bounds = |f: fn(&(f64, f64)) -> f64| {
        finite.iter().flatten().map(f).fold((f64::MAX, f64::MIN), |(lo, hi), v| (lo.min(v), hi.max(v)))
    };
    let ((x_lo, x_hi), (y_lo, y_hi)) = (bounds(|p| p.0), bounds(|p| p.1));
    render(|root| {
        if x_lo > x_hi {
            return empty(root, "no data yet");
        }
        let mut chart =
            framed(root, title).build_cartesian_2d(padded(x_lo, x_hi), padded(y_lo, y_hi)).map_err(drawing)?;
        chart.configure_mesh().x_desc(x_label).label_style((FONT, 15)).draw().map_err(drawing)?;
        for (i, ((name, _), points)) in series.iter().zip(finite).enumerate() {
            let color = series_color(i);
            chart
                .draw_series(LineSeries::new(points, color.stroke_width(2)))
                .map_err(drawing)?
                .label(*name)
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color.stroke_width(3)));
        }
        legend(&mut chart)
    })
}

/// A PNG of grouped bars: for each group (an evaluation set), one bar per series (a model);
/// a value that is not finite draws no bar.
pub fn bar_chart(title: &str, groups: &[&str], series: &[(&str, Vec<f64>)], spread: &[Vec<f64>]) -> Result<Vec<u8>> {
    let top = |i: usize, g: usize, v: f64| v + spread.get(i).and_then(|s| s.get(g)).copied().unwrap_or(0.0);
    let hi = series
        .iter()
        .enumerate()
        .flat_map(|(i, (_, v))| v.iter().enumerate().map(move |(g, &x)| top(i, g, x)))
        .filter(|v| v.is_finite())
        .fold(0.0f64, f64::max);
    render(|root| {
        if groups.is_empty() || series.is_empty() || hi <= 0.0 {
            return empty(root, "no data");
        }
        // x in units of 1/SLOT group, so that bars sit between integer key points (plotters
        // draws labels at key points of integer axes only).
        let centers: Vec<i32> = (0..groups.len() as i32).map(|g| g * SLOT + SLOT / 2).collect();
        let mut chart = framed(root, title)
            .build_cartesian_2d((0..groups.len() as i32 * SLOT).with_key_points(centers), 0.0..hi * 1.05)
            .map_err(drawing)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_label_formatter(&|x| groups.get((*x / SLOT) as usize).map(|g| g.to_string()).unwrap_or_default())
            .label_style((FONT, 15))
            .draw()
            .map_err(drawing)?;
        // The bars fill the middle 80% of a group's slot, with a tenth of a bar between two.
        let width = SLOT * 8 / 10 / series.len() as i32;
        for (i, (name, values)) in series.iter().enumerate() {
            let color = series_color(i);
            let bars = values.iter().enumerate().filter(|(g, v)| *g < groups.len() && v.is_finite()).map(|(g, v)| {
                let x = g as i32 * SLOT + SLOT / 10 + width * i as i32;
                Rectangle::new([(x, 0.0), (x + width * 9 / 10, *v)], color.filled())
            });
            chart
                .draw_series(bars)
                .map_err(drawing)?
                .label(*name)
                .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 20, y + 5)], color.filled()));
            // An error bar of +- the series' spread over each bar, when it has one.
            let Some(spread) = spread.get(i) else { continue };
            let whiskers = values.iter().zip(spread).enumerate().filter(|(_, (v, s))| v.is_finite() && s.is_finite());
            let whiskers = whiskers.filter(|(g, _)| *g < groups.len()).map(|(g, (v, s))| {
                let x = g as i32 * SLOT + SLOT / 10 + width * i as i32 + width * 9 / 20;
                PathElement::new(vec![(x, v - s), (x, v + s)], BLACK.stroke_width(2))
            });
            chart.draw_series(whiskers).map_err(drawing)?;
        }
        legend(&mut chart)
    })
}

/// A chart builder with the title and the margins every chart shares.
fn framed<'a, 'b>(
    root: &'a DrawingArea<BitMapBackend<'b>, plotters::coord::Shift>,
    title: &str,
) -> ChartBuilder<'a, 'b, BitMapBackend<'b>> {
    let mut builder = ChartBuilder::on(root);
    builder.caption(title, (FONT, 22)).margin(16).x_label_area_size(40).y_label_area_size(70);
    builder
}

fn legend<'a, CT: CoordTranslate>(chart: &mut ChartContext<'a, BitMapBackend<'a>, CT>) -> Result<()> {
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font((FONT, 15))
        .draw()
        .map_err(drawing)
}

#[cfg(test)]
mod tests {
    /// The PNG's header and the colours of its pixels: a chart with data draws its series'
    /// colour, an empty one does not.
    fn decoded(png: &[u8]) -> (u32, u32, Vec<u8>) {
        let mut reader = png::Decoder::new(std::io::Cursor::new(png)).read_info().unwrap();
        let mut rgb = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut rgb).unwrap();
        (info.width, info.height, rgb)
    }

    fn has_color(rgb: &[u8], c: plotters::style::RGBColor) -> bool {
        rgb.chunks(3).any(|p| p == [c.0, c.1, c.2])
    }

    #[test]
    fn a_chart_is_a_png_of_the_declared_size_with_its_series_drawn() {
        let png = super::line_chart("loss", "step", &[("clm", vec![(1.0, 3.0), (2.0, 2.5)])]).unwrap();
        let (w, h, rgb) = decoded(&png);
        assert_eq!((w, h), (900, 520));
        assert!(has_color(&rgb, super::SERIES[0]));
        let bars =
            super::bar_chart("bpb", &["a", "b"], &[("x", vec![1.0, 2.0]), ("y", vec![1.5, f64::NAN])], &[]).unwrap();
        let (_, _, rgb) = decoded(&bars);
        assert!(has_color(&rgb, super::SERIES[0]) && has_color(&rgb, super::SERIES[1]));
        let (_, _, rgb) = decoded(&super::bar_chart("bpb", &[], &[], &[]).unwrap());
        assert!(!has_color(&rgb, super::SERIES[0]));
    }
}
