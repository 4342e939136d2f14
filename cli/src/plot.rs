//! The learning-rate curve as a self-contained SVG, phases marked.

use std::fmt::Write as _;

use strata_recipe::Recipe;

use crate::format::count;
use strata_sweep::chart::{escape, tick_step};

const WIDTH: f64 = 960.0;
const HEIGHT: f64 = 540.0;
const LEFT: f64 = 90.0;
const RIGHT: f64 = 30.0;
const TOP: f64 = 60.0;
const BOTTOM: f64 = 70.0;
const SAMPLES: usize = 800;
const PHASE_FILLS: [&str; 4] = ["#e8f0fe", "#fef7e0", "#fce8e6", "#e6f4ea"];

/// Renders the recipe's schedule over `[0, total_tokens]`; `marks` are token
/// counts to highlight (those passed to `--at-tokens`).
pub fn schedule_svg(recipe: &Recipe, marks: &[u64]) -> String {
    let s = &recipe.schedule;
    let total = s.total_tokens.max(1) as f64;
    let samples: Vec<(f64, f64)> = (0..=SAMPLES)
        .map(|i| {
            let n = total * i as f64 / SAMPLES as f64;
            (n, s.lr_at_f64(n))
        })
        .collect();
    let y_max = samples
        .iter()
        .map(|(_, lr)| *lr)
        .fold(s.max_lr(), f64::max)
        .max(f64::MIN_POSITIVE)
        * 1.08;
    let plot_w = WIDTH - LEFT - RIGHT;
    let plot_h = HEIGHT - TOP - BOTTOM;
    let x = |n: f64| LEFT + plot_w * n / total;
    let y = |lr: f64| TOP + plot_h * (1.0 - lr / y_max);

    let mut svg = String::new();
    let _ = write!(
        svg,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">
<rect width="100%" height="100%" fill="white"/>
<text x="{LEFT}" y="28" font-size="16" font-weight="bold">{} — {} schedule</text>
<text x="{LEFT}" y="46" fill="#555">LR used for a step = schedule at tokens seen at its end; {} steps of {} tokens</text>
"##,
        escape(&recipe.name),
        s.name(),
        recipe.data.n_steps(),
        recipe.data.tokens_per_step,
    );

    for (i, phase) in s.phases().iter().enumerate() {
        let (x0, x1) = (x(phase.start_tokens as f64), x(phase.end_tokens as f64));
        // A phase too narrow for its label is labelled above the plot.
        let label_y = if x1 - x0 > 7.5 * phase.name.len() as f64 {
            TOP + 16.0
        } else {
            TOP - 4.0
        };
        let _ = writeln!(
            svg,
            r##"<g class="phase"><rect x="{x0:.2}" y="{TOP}" width="{:.2}" height="{plot_h}" fill="{}"/><text x="{:.2}" y="{label_y:.2}" text-anchor="middle" fill="#333">{}</text></g>"##,
            (x1 - x0).max(0.0),
            PHASE_FILLS[i % PHASE_FILLS.len()],
            (x0 + x1) / 2.0,
            escape(phase.name),
        );
    }

    // Axes and ticks.
    let _ = writeln!(
        svg,
        r##"<path d="M{LEFT},{TOP} V{} H{}" fill="none" stroke="#222"/>"##,
        TOP + plot_h,
        LEFT + plot_w
    );
    let x_step = tick_step(total, 6.0);
    let mut t = 0.0;
    while t <= total * 1.0001 {
        let _ = writeln!(
            svg,
            r##"<line x1="{0:.2}" y1="{1}" x2="{0:.2}" y2="{2}" stroke="#222"/><text x="{0:.2}" y="{3}" text-anchor="middle">{4}</text>"##,
            x(t),
            TOP + plot_h,
            TOP + plot_h + 5.0,
            TOP + plot_h + 20.0,
            count(t)
        );
        t += x_step;
    }
    let y_step = tick_step(y_max, 5.0);
    let mut v = 0.0;
    while v <= y_max {
        let _ = writeln!(
            svg,
            r##"<line x1="{0}" y1="{1:.2}" x2="{2}" y2="{1:.2}" stroke="#222"/><line x1="{2}" y1="{1:.2}" x2="{3}" y2="{1:.2}" stroke="#ddd"/><text x="{4}" y="{5:.2}" text-anchor="end">{6:.2e}</text>"##,
            LEFT - 5.0,
            y(v),
            LEFT,
            LEFT + plot_w,
            LEFT - 8.0,
            y(v) + 4.0,
            v
        );
        v += y_step;
    }
    let _ = writeln!(
        svg,
        r##"<text x="{:.2}" y="{}" text-anchor="middle">tokens seen</text><text transform="translate(20 {:.2}) rotate(-90)" text-anchor="middle">learning rate</text>"##,
        LEFT + plot_w / 2.0,
        HEIGHT - 20.0,
        TOP + plot_h / 2.0
    );

    let points: Vec<String> = samples
        .iter()
        .map(|&(n, lr)| format!("{:.2},{:.2}", x(n), y(lr)))
        .collect();
    let _ = writeln!(
        svg,
        r##"<polyline class="lr" fill="none" stroke="#1a73e8" stroke-width="2" points="{}"/>"##,
        points.join(" ")
    );
    for &m in marks {
        let n = (m as f64).min(total);
        let lr = s.lr_at(m);
        let _ = writeln!(
            svg,
            r##"<g class="mark"><circle cx="{:.2}" cy="{:.2}" r="4" fill="#d93025"/><text x="{:.2}" y="{:.2}" fill="#d93025">{}: {:.3e}</text></g>"##,
            x(n),
            y(lr),
            x(n) + 6.0,
            y(lr) - 6.0,
            count(m as f64),
            lr
        );
    }
    svg.push_str("</svg>\n");
    svg
}

#[cfg(test)]
mod tests {
    use super::tick_step;

    #[test]
    fn ticks_are_round() {
        assert_eq!(tick_step(1000.0, 5.0), 200.0);
        assert!((tick_step(3e-3, 5.0) - 1e-3).abs() < 1e-18);
        assert_eq!(tick_step(7.0, 6.0), 2.0);
    }
}
