//! Plots as PNG files, drawn with no dependency: a palette canvas, lines, rectangles and a
//! bitmap font. Runs write loss curves; evaluations write bar charts.

mod font;
mod png;

const PALETTE: [[u8; 3]; 13] = [
    [255, 255, 255], // background
    [40, 40, 40],    // axes and text
    [220, 220, 220], // grid
    [31, 119, 180],  // series, in order
    [255, 127, 14],
    [44, 160, 44],
    [214, 39, 40],
    [148, 103, 189],
    [140, 86, 75],
    [227, 119, 194],
    [127, 127, 127],
    [188, 189, 34],
    [23, 190, 207],
];
const INK: u8 = 1;
const GRID: u8 = 2;
/// Palette index of series `i`.
fn series_color(i: usize) -> u8 {
    3 + (i % 10) as u8
}

struct Canvas {
    width: usize,
    height: usize,
    pixels: Vec<u8>,
}

impl Canvas {
    fn new(width: usize, height: usize) -> Self {
        Self { width, height, pixels: vec![0; width * height] }
    }

    fn set(&mut self, x: i64, y: i64, color: u8) {
        if x >= 0 && y >= 0 && (x as usize) < self.width && (y as usize) < self.height {
            self.pixels[y as usize * self.width + x as usize] = color;
        }
    }

    fn rect(&mut self, x0: i64, y0: i64, x1: i64, y1: i64, color: u8) {
        for y in y0.min(y1)..=y0.max(y1) {
            for x in x0.min(x1)..=x0.max(x1) {
                self.set(x, y, color);
            }
        }
    }

    /// A line two pixels wide.
    fn line(&mut self, (x0, y0): (f64, f64), (x1, y1): (f64, f64), color: u8) {
        let steps = (x1 - x0).abs().max((y1 - y0).abs()).ceil().max(1.0) as usize;
        for i in 0..=steps {
            let t = i as f64 / steps as f64;
            let (x, y) = ((x0 + (x1 - x0) * t).round() as i64, (y0 + (y1 - y0) * t).round() as i64);
            self.rect(x, y, x + 1, y + 1, color);
        }
    }

    /// Text at scale 2 (10 x 14 pixels a character, 12 apart), top-left at `(x, y)`.
    fn text(&mut self, x: i64, y: i64, text: &str, color: u8) {
        for (i, c) in text.chars().enumerate() {
            for (row, bits) in font::glyph(c).iter().enumerate() {
                for col in 0..5 {
                    if bits & (0x10 >> col) != 0 {
                        let (px, py) = (x + i as i64 * 12 + col * 2, y + row as i64 * 2);
                        self.rect(px, py, px + 1, py + 1, color);
                    }
                }
            }
        }
    }

    fn png(&self) -> Vec<u8> {
        png::encode(self.width as u32, self.height as u32, &PALETTE, &self.pixels)
    }
}

fn text_width(text: &str) -> i64 {
    text.chars().count() as i64 * 12
}

/// A short label for an axis value.
fn label(v: f64) -> String {
    match v.abs() {
        a if a >= 1e4 || (a > 0.0 && a < 1e-2) => format!("{v:.1e}"),
        a if a >= 100.0 => format!("{v:.0}"),
        _ => format!("{v:.2}"),
    }
}

/// The plot area and the value ranges it shows.
struct Frame {
    left: f64,
    top: f64,
    right: f64,
    bottom: f64,
    x: (f64, f64),
    y: (f64, f64),
}

impl Frame {
    fn at(&self, x: f64, y: f64) -> (f64, f64) {
        let fx = (x - self.x.0) / (self.x.1 - self.x.0).max(1e-12);
        let fy = (y - self.y.0) / (self.y.1 - self.y.0).max(1e-12);
        (self.left + fx * (self.right - self.left), self.bottom - fy * (self.bottom - self.top))
    }

    /// Axes, horizontal grid lines with their values, the title and the x label.
    fn draw(&self, canvas: &mut Canvas, title: &str, x_label: &str) {
        for i in 0..=4 {
            let v = self.y.0 + (self.y.1 - self.y.0) * i as f64 / 4.0;
            let (_, py) = self.at(self.x.0, v);
            canvas.rect(self.left as i64, py as i64, self.right as i64, py as i64, GRID);
            let text = label(v);
            canvas.text(self.left as i64 - 10 - text_width(&text), py as i64 - 7, &text, INK);
        }
        canvas.rect(self.left as i64, self.top as i64, self.left as i64 + 1, self.bottom as i64, INK);
        canvas.rect(self.left as i64, self.bottom as i64, self.right as i64, self.bottom as i64 + 1, INK);
        canvas.text((canvas.width as i64 - text_width(title)) / 2, 12, title, INK);
        canvas.text((canvas.width as i64 - text_width(x_label)) / 2, canvas.height as i64 - 24, x_label, INK);
    }
}

fn legend(canvas: &mut Canvas, names: &[&str], x: i64, y: i64) {
    for (i, name) in names.iter().enumerate() {
        let y = y + i as i64 * 20;
        canvas.rect(x, y + 4, x + 20, y + 8, series_color(i));
        canvas.text(x + 28, y, name, INK);
    }
}

fn padded(lo: f64, hi: f64) -> (f64, f64) {
    let pad = ((hi - lo) * 0.05).max(1e-6);
    (lo - pad, hi + pad)
}

/// A PNG of line series `(name, points)` against a shared x axis.
pub fn line_chart(title: &str, x_label: &str, series: &[(&str, Vec<(f64, f64)>)]) -> Vec<u8> {
    let mut canvas = Canvas::new(900, 520);
    let points = || series.iter().flat_map(|(_, p)| p.iter()).filter(|(x, y)| x.is_finite() && y.is_finite());
    let (x_lo, x_hi) = points().fold((f64::MAX, f64::MIN), |(lo, hi), &(x, _)| (lo.min(x), hi.max(x)));
    let (y_lo, y_hi) = points().fold((f64::MAX, f64::MIN), |(lo, hi), &(_, y)| (lo.min(y), hi.max(y)));
    if x_lo > x_hi {
        canvas.text(40, 40, "no data yet", INK);
        return canvas.png();
    }
    let frame =
        Frame { left: 110.0, top: 50.0, right: 700.0, bottom: 460.0, x: padded(x_lo, x_hi), y: padded(y_lo, y_hi) };
    frame.draw(&mut canvas, title, x_label);
    for (i, (_, pts)) in series.iter().enumerate() {
        let finite: Vec<(f64, f64)> = pts.iter().copied().filter(|(x, y)| x.is_finite() && y.is_finite()).collect();
        for w in finite.windows(2) {
            canvas.line(frame.at(w[0].0, w[0].1), frame.at(w[1].0, w[1].1), series_color(i));
        }
    }
    let names: Vec<&str> = series.iter().map(|(n, _)| *n).collect();
    legend(&mut canvas, &names, 720, 60);
    canvas.png()
}

/// A PNG of grouped bars: for each group (an evaluation set), one bar per series (a model).
pub fn bar_chart(title: &str, groups: &[&str], series: &[(&str, Vec<f64>)]) -> Vec<u8> {
    let mut canvas = Canvas::new(900, 520);
    let values = || series.iter().flat_map(|(_, v)| v.iter().copied()).filter(|v| v.is_finite());
    let hi = values().fold(0.0f64, f64::max);
    if groups.is_empty() || series.is_empty() || hi <= 0.0 {
        canvas.text(40, 40, "no data", INK);
        return canvas.png();
    }
    let frame = Frame {
        left: 110.0,
        top: 50.0,
        right: 640.0,
        bottom: 460.0,
        x: (0.0, groups.len() as f64),
        y: (0.0, hi * 1.05),
    };
    frame.draw(&mut canvas, title, "");
    let slot = (frame.right - frame.left) / groups.len() as f64;
    let bar = slot * 0.8 / series.len() as f64;
    for (g, group) in groups.iter().enumerate() {
        let x0 = frame.left + slot * g as f64 + slot * 0.1;
        for (i, (_, v)) in series.iter().enumerate() {
            let value = v.get(g).copied().filter(|v| v.is_finite()).unwrap_or(0.0);
            let (_, top) = frame.at(0.0, value);
            let x = x0 + bar * i as f64;
            canvas.rect(x as i64, top as i64, (x + bar - 2.0) as i64, frame.bottom as i64, series_color(i));
        }
        let label: String = group.chars().take((slot / 12.0) as usize).collect();
        canvas.text((x0 + slot * 0.4) as i64 - text_width(&label) / 2, frame.bottom as i64 + 8, &label, INK);
    }
    let names: Vec<&str> = series.iter().map(|(n, _)| *n).collect();
    legend(&mut canvas, &names, 660, 60);
    canvas.png()
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_chart_is_a_png_of_the_declared_size() {
        let png = super::line_chart("loss", "step", &[("clm", vec![(1.0, 3.0), (2.0, 2.5)])]);
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        assert_eq!(u32::from_be_bytes(png[16..20].try_into().unwrap()), 900);
        assert_eq!(u32::from_be_bytes(png[20..24].try_into().unwrap()), 520);
    }
}
