//! Scatter and line charts as self-contained SVG (linear or log axes, a
//! legend): the sweep report's plots, written by `strata sweep report`
//! and served by the coordinator's dashboard.

use std::fmt::Write as _;

use crate::format::count;

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

/// Text made safe inside SVG (or HTML).
pub fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// "Nice" tick spacing: 1, 2 or 5 times a power of ten, about `n` ticks.
pub fn tick_step(max: f64, n: f64) -> f64 {
    let raw = max / n;
    let mag = 10f64.powf(raw.log10().floor());
    let r = raw / mag;
    let m = if r <= 1.0 {
        1.0
    } else if r <= 2.0 {
        2.0
    } else if r <= 5.0 {
        5.0
    } else {
        10.0
    };
    m * mag
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
}
