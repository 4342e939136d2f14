//! Scatter and line charts as self-contained SVG (linear or log axes, a
//! legend), and their PNG through resvg with the embedded font.

use std::fmt::Write as _;

use crate::format::count;
use crate::plot::{escape, tick_step};

const WIDTH: f64 = 1160.0;
const HEIGHT: f64 = 600.0;
const LEFT: f64 = 90.0;
const RIGHT: f64 = 380.0;
const TOP: f64 = 70.0;
const BOTTOM: f64 = 70.0;
/// Colours that stay apart for the colour-blind (Okabe–Ito).
pub const PALETTE: [&str; 8] = [
    "#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442",
];
/// The font the PNGs' text is drawn with.
const FONT: &[u8] = include_bytes!("../assets/DejaVuSans-subset.ttf");

#[derive(Debug, Clone)]
pub struct Series {
    pub name: String,
    pub color: String,
    pub points: Vec<(f64, f64)>,
    /// Joined by a line (in x order as given).
    pub line: bool,
    pub dashed: bool,
    /// A circle at each point.
    pub markers: bool,
}

impl Series {
    pub fn new(name: impl Into<String>, color: &str, points: Vec<(f64, f64)>) -> Series {
        Series {
            name: name.into(),
            color: color.into(),
            points,
            line: false,
            dashed: false,
            markers: true,
        }
    }

    /// A line, dashed, without markers (a fitted curve).
    pub fn fitted(name: impl Into<String>, color: &str, points: Vec<(f64, f64)>) -> Series {
        Series {
            line: true,
            dashed: true,
            markers: false,
            ..Series::new(name, color, points)
        }
    }

    pub fn joined(mut self) -> Series {
        self.line = true;
        self
    }
}

#[derive(Debug, Clone, Default)]
pub struct Chart {
    pub title: String,
    pub subtitle: String,
    pub x_label: String,
    pub y_label: String,
    pub x_log: bool,
    pub y_log: bool,
    pub series: Vec<Series>,
}

/// An axis: its data range (in log10 where logarithmic) and ticks.
struct Axis {
    log: bool,
    lo: f64,
    hi: f64,
}

impl Axis {
    fn new(values: impl Iterator<Item = f64>, log: bool) -> Axis {
        let (mut lo, mut hi) = (f64::INFINITY, f64::NEG_INFINITY);
        for v in values {
            let v = if log { v.log10() } else { v };
            lo = lo.min(v);
            hi = hi.max(v);
        }
        if !lo.is_finite() || !hi.is_finite() {
            (lo, hi) = (0.0, 1.0);
        }
        if hi - lo < 1e-12 {
            let pad = if log { 0.5 } else { lo.abs().max(1.0) * 0.1 };
            (lo, hi) = (lo - pad, hi + pad);
        }
        let pad = (hi - lo) * 0.06;
        Axis {
            log,
            lo: lo - pad,
            hi: hi + pad,
        }
    }

    /// Where `v` falls, 0 at `lo` and 1 at `hi`.
    fn frac(&self, v: f64) -> f64 {
        let v = if self.log { v.log10() } else { v };
        (v - self.lo) / (self.hi - self.lo)
    }

    /// Tick values (in data units).
    fn ticks(&self) -> Vec<f64> {
        if self.log {
            let (a, b) = (self.lo.floor() as i32, self.hi.ceil() as i32);
            let mults: &[f64] = if self.hi - self.lo <= 2.5 {
                &[1.0, 2.0, 5.0]
            } else {
                &[1.0]
            };
            let mut out = Vec::new();
            for k in a..=b {
                for m in mults {
                    let v = m * 10f64.powi(k);
                    let l = v.log10();
                    if l >= self.lo && l <= self.hi {
                        out.push(v);
                    }
                }
            }
            out
        } else {
            let step = tick_step(self.hi - self.lo, 6.0);
            let mut v = (self.lo / step).ceil() * step;
            let mut out = Vec::new();
            while v <= self.hi + step * 1e-9 {
                out.push(if v.abs() < step * 1e-9 { 0.0 } else { v });
                v += step;
            }
            out
        }
    }
}

/// A tick's label: short and exact enough.
fn tick_label(v: f64) -> String {
    let a = v.abs();
    if a == 0.0 {
        "0".into()
    } else if (1e-2..1e4).contains(&a) {
        let s = format!("{v:.3}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else if a >= 1e4 {
        count(v)
    } else {
        format!("{v:.0e}")
    }
}

impl Chart {
    fn usable(&self, (x, y): (f64, f64)) -> bool {
        x.is_finite() && y.is_finite() && (!self.x_log || x > 0.0) && (!self.y_log || y > 0.0)
    }

    pub fn svg(&self) -> String {
        let pts = || {
            self.series
                .iter()
                .flat_map(|s| s.points.iter().copied())
                .filter(|&p| self.usable(p))
        };
        let xa = Axis::new(pts().map(|p| p.0), self.x_log);
        let ya = Axis::new(pts().map(|p| p.1), self.y_log);
        let (pw, ph) = (WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM);
        let x = |v: f64| LEFT + pw * xa.frac(v);
        let y = |v: f64| TOP + ph * (1.0 - ya.frac(v));
        let mut svg = String::new();
        let _ = write!(
            svg,
            r##"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="DejaVu Sans, sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{LEFT}" y="30" font-size="17" font-weight="bold">{}</text>
<text x="{LEFT}" y="50" fill="#555">{}</text>
"##,
            escape(&self.title),
            escape(&self.subtitle)
        );
        for t in xa.ticks() {
            let _ = writeln!(
                svg,
                r##"<line x1="{0:.2}" y1="{TOP}" x2="{0:.2}" y2="{1}" stroke="#eee"/><line x1="{0:.2}" y1="{1}" x2="{0:.2}" y2="{2}" stroke="#222"/><text x="{0:.2}" y="{3}" text-anchor="middle">{4}</text>"##,
                x(t),
                TOP + ph,
                TOP + ph + 5.0,
                TOP + ph + 20.0,
                tick_label(t)
            );
        }
        for t in ya.ticks() {
            let _ = writeln!(
                svg,
                r##"<line x1="{LEFT}" y1="{0:.2}" x2="{1}" y2="{0:.2}" stroke="#eee"/><line x1="{2}" y1="{0:.2}" x2="{LEFT}" y2="{0:.2}" stroke="#222"/><text x="{3}" y="{4:.2}" text-anchor="end">{5}</text>"##,
                y(t),
                LEFT + pw,
                LEFT - 5.0,
                LEFT - 8.0,
                y(t) + 4.0,
                tick_label(t)
            );
        }
        let _ = writeln!(
            svg,
            r##"<path d="M{LEFT},{TOP} V{} H{}" fill="none" stroke="#222"/>
<text x="{:.2}" y="{}" text-anchor="middle">{}</text>
<text transform="translate(22 {:.2}) rotate(-90)" text-anchor="middle">{}</text>"##,
            TOP + ph,
            LEFT + pw,
            LEFT + pw / 2.0,
            HEIGHT - 22.0,
            escape(&self.x_label),
            TOP + ph / 2.0,
            escape(&self.y_label)
        );
        let _ = writeln!(
            svg,
            r##"<clipPath id="plot"><rect x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}"/></clipPath><g clip-path="url(#plot)">"##
        );
        for s in &self.series {
            let p: Vec<(f64, f64)> = s
                .points
                .iter()
                .copied()
                .filter(|&p| self.usable(p))
                .collect();
            if s.line && p.len() > 1 {
                let coords: Vec<String> = p
                    .iter()
                    .map(|&(a, b)| format!("{:.2},{:.2}", x(a), y(b)))
                    .collect();
                let _ = writeln!(
                    svg,
                    r##"<polyline fill="none" stroke="{}" stroke-width="2"{} points="{}"/>"##,
                    s.color,
                    if s.dashed {
                        r#" stroke-dasharray="6 4""#
                    } else {
                        ""
                    },
                    coords.join(" ")
                );
            }
            if s.markers {
                for &(a, b) in &p {
                    let _ = writeln!(
                        svg,
                        r##"<circle cx="{:.2}" cy="{:.2}" r="4.5" fill="{}" stroke="white" stroke-width="1"/>"##,
                        x(a),
                        y(b),
                        s.color
                    );
                }
            }
        }
        svg.push_str("</g>\n");
        // The legend, right of the plot.
        let lx = LEFT + pw + 20.0;
        for (i, s) in self.series.iter().enumerate() {
            let ly = TOP + 10.0 + 20.0 * i as f64;
            if s.line {
                let _ = write!(
                    svg,
                    r##"<line x1="{lx}" y1="{ly}" x2="{}" y2="{ly}" stroke="{}" stroke-width="2"{}/>"##,
                    lx + 24.0,
                    s.color,
                    if s.dashed {
                        r#" stroke-dasharray="6 4""#
                    } else {
                        ""
                    }
                );
            }
            if s.markers {
                let _ = write!(
                    svg,
                    r##"<circle cx="{}" cy="{ly}" r="4.5" fill="{}"/>"##,
                    lx + 12.0,
                    s.color
                );
            }
            let _ = writeln!(
                svg,
                r##"<text x="{}" y="{}">{}</text>"##,
                lx + 32.0,
                ly + 4.0,
                escape(&s.name)
            );
        }
        svg.push_str("</svg>\n");
        svg
    }
}

/// `svg` rasterized at twice its size, text in the embedded font.
pub fn png(svg: &str) -> anyhow::Result<Vec<u8>> {
    use resvg::{tiny_skia, usvg};
    let mut opt = usvg::Options::default();
    opt.fontdb_mut().load_font_data(FONT.to_vec());
    opt.font_family = "DejaVu Sans".into();
    let tree = usvg::Tree::from_str(svg, &opt)?;
    let size = tree
        .size()
        .to_int_size()
        .scale_by(2.0)
        .ok_or_else(|| anyhow::anyhow!("empty plot"))?;
    let mut pixmap = tiny_skia::Pixmap::new(size.width(), size.height())
        .ok_or_else(|| anyhow::anyhow!("plot too large"))?;
    resvg::render(
        &tree,
        tiny_skia::Transform::from_scale(2.0, 2.0),
        &mut pixmap.as_mut(),
    );
    Ok(pixmap.encode_png()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_axes_tick_at_decades_and_points_land_inside() {
        let a = Axis::new([1e15, 3e17].into_iter(), true);
        assert_eq!(a.ticks(), [1e15, 1e16, 1e17]);
        let narrow = Axis::new([1e-3, 8e-3].into_iter(), true);
        assert_eq!(narrow.ticks(), [1e-3, 2e-3, 5e-3]);
        assert!(a.frac(1e15) > 0.0 && a.frac(3e17) < 1.0);
        assert_eq!(tick_label(0.003), "3e-3");
        assert_eq!(tick_label(0.05), "0.05");
        assert_eq!(tick_label(2e-5), "2e-5");
        assert_eq!(tick_label(4.5), "4.5");
    }

    #[test]
    fn a_chart_renders_to_svg_and_png_with_its_text() {
        let chart = Chart {
            title: "loss — η".into(),
            x_label: "x".into(),
            y_label: "y".into(),
            x_log: true,
            series: vec![
                Series::new(
                    "runs",
                    PALETTE[0],
                    vec![(1.0, 2.0), (10.0, 1.5), (-1.0, 3.0)],
                ),
                Series::fitted("fit", PALETTE[1], vec![(1.0, 2.1), (10.0, 1.4)]),
            ],
            ..Chart::default()
        };
        let svg = chart.svg();
        // The point at x = -1 cannot sit on a log axis: left out.
        assert_eq!(svg.matches("<circle").count(), 2 + 1);
        assert!(svg.contains("loss — η"));
        let png = png(&svg).unwrap();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        // Twice the SVG's size.
        assert_eq!(u32::from_be_bytes(png[16..20].try_into().unwrap()), 2320);
    }

    /// Text is drawn (no system font needed): a picture of a word alone
    /// has dark pixels.
    #[test]
    fn text_is_drawn_with_the_embedded_font() {
        use resvg::{tiny_skia, usvg};
        let svg = r#"<svg xmlns="http://www.w3.org/2000/svg" width="120" height="40"><rect width="100%" height="100%" fill="white"/><text x="5" y="28" font-family="DejaVu Sans" font-size="24">Loss</text></svg>"#;
        let mut opt = usvg::Options::default();
        opt.fontdb_mut().load_font_data(FONT.to_vec());
        let tree = usvg::Tree::from_str(svg, &opt).unwrap();
        let mut pixmap = tiny_skia::Pixmap::new(120, 40).unwrap();
        resvg::render(&tree, tiny_skia::Transform::default(), &mut pixmap.as_mut());
        let dark = pixmap.pixels().iter().filter(|p| p.red() < 128).count();
        assert!(dark > 100, "{dark} dark pixels");
    }
}
