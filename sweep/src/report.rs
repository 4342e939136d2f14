//! A sweep's report: the fits of its succeeded runs (Chinchilla's
//! L(N, D) with its compute-optimal frontier, the optimal learning rate
//! and batch as power laws, bootstrap intervals), as text and JSON, and
//! its plots. `strata sweep report` writes them; the coordinator's
//! dashboard shows them.

use std::collections::BTreeMap;

use serde_json::json;

use crate::chart::{Chart, PALETTE, Series};
use crate::fit::{
    ChinchillaOptions, Hyper, Interval, LossPoint, RunPoint, chinchilla_intervals, fit_chinchilla,
    fit_optimal, power_law_intervals,
};
use crate::format::{count, sci};
use crate::results::ResultRow;

/// Bootstrap resamples for the fits' 95% intervals, by default.
pub const BOOTSTRAP: usize = 200;
/// Runs within this relative loss of their (N, D) group's best count as
/// near-optimal for the learning-rate and batch laws, by default.
pub const TOLERANCE: f64 = 0.0025;

/// A point's row in the report: the results table's row, and where it
/// sits in the sweep.
pub struct Run {
    pub row: ResultRow,
    /// The size axis' value, or N.
    pub size: String,
    pub kind: String,
    pub fraction: Option<f64>,
    /// The held-out loss along training: (tokens, eval loss).
    pub evals: Vec<(f64, f64)>,
}

pub fn size_of(label: &str, row: &ResultRow) -> String {
    label
        .split(' ')
        .find_map(|kv| kv.strip_prefix("size="))
        .map_or_else(|| format!("N={}", count(row.n as f64)), str::to_string)
}

/// The fits of a sweep's succeeded runs; each `Err` says why it was not
/// fitted.
pub struct Fits {
    /// (N, D) groups whose best learning rate is the smallest or largest
    /// swept, and the groups.
    pub lr_at_edge: (usize, usize),
    /// The fitted compute-optimal frontier from the sweep's smallest
    /// compute to 100× its largest: (C, N*, D*, L).
    pub frontier: Vec<(f64, f64, f64, f64)>,
    pub chinchilla: Result<(crate::fit::ChinchillaFit, Option<Vec<Interval>>), String>,
    pub lr: Result<(crate::fit::PowerLaw, Option<Vec<Interval>>, usize), String>,
    pub batch: Result<(crate::fit::PowerLaw, Option<Vec<Interval>>, usize), String>,
}

/// For each (N, D), the best loss of its runs: Chinchilla's points (a
/// run with a poor learning rate says nothing about L(N, D)).
pub fn best_per_size_and_tokens(runs: &[&Run]) -> Vec<LossPoint> {
    let mut best: BTreeMap<(u64, u64), f64> = BTreeMap::new();
    for r in runs {
        if let Some(l) = r.row.loss() {
            let e = best.entry((r.row.n, r.row.d)).or_insert(l);
            *e = e.min(l);
        }
    }
    best.into_iter()
        .map(|((n, d), loss)| LossPoint {
            n: n as f64,
            d: d as f64,
            loss,
        })
        .collect()
}

pub fn fits(runs: &[&Run], bootstrap: usize, tolerance: f64) -> Fits {
    let points = best_per_size_and_tokens(runs);
    let opts = ChinchillaOptions::default();
    let chinchilla = fit_chinchilla(&points, &opts)
        .map(|f| {
            let ci = (bootstrap > 0)
                .then(|| chinchilla_intervals(&points, &f, &opts, bootstrap, 0))
                .flatten();
            (f, ci)
        })
        .map_err(|e| e.to_string());
    let rp: Vec<RunPoint> = runs
        .iter()
        .filter_map(|r| {
            Some(RunPoint {
                n: r.row.n as f64,
                d: r.row.d as f64,
                lr: r.row.lr,
                batch: r.row.batch as f64,
                loss: r.row.loss()?,
            })
        })
        .collect();
    let hyper = |what: Hyper| {
        fit_optimal(&rp, what, tolerance)
            .map(|(near, law)| {
                let xs: Vec<Vec<f64>> = near
                    .iter()
                    .map(|&i| {
                        law.variables
                            .iter()
                            .map(|v| if v == "N" { rp[i].n } else { rp[i].d })
                            .collect()
                    })
                    .collect();
                let ys: Vec<f64> = near
                    .iter()
                    .map(|&i| match what {
                        Hyper::Lr => rp[i].lr,
                        Hyper::Batch => rp[i].batch,
                    })
                    .collect();
                let ci = (bootstrap > 0)
                    .then(|| power_law_intervals(&xs, &ys, &law, bootstrap, 0))
                    .flatten();
                (law, ci, near.len())
            })
            .map_err(|e| e.to_string())
    };
    let frontier = match &chinchilla {
        Ok((fit, _)) => {
            let (lo, hi) = runs
                .iter()
                .map(|r| chinchilla_compute(&r.row))
                .filter(|c| *c > 0.0)
                .fold((f64::INFINITY, 0f64), |(a, b), c| (a.min(c), b.max(c)));
            if lo.is_finite() {
                let hi = hi * 100.0;
                (0..=8)
                    .map(|i| {
                        let c = lo * (hi / lo).powf(i as f64 / 8.0);
                        let (n, d) = fit.law.optimal(c);
                        (c, n, d, fit.law.loss(n, d))
                    })
                    .collect()
            } else {
                Vec::new()
            }
        }
        Err(_) => Vec::new(),
    };
    Fits {
        lr_at_edge: lr_at_edge(&rp),
        frontier,
        chinchilla,
        lr: hyper(Hyper::Lr),
        batch: hyper(Hyper::Batch),
    }
}

/// How many (N, D) groups have their best run at the smallest or largest
/// learning rate the group tried (of the groups that tried three or more).
pub fn lr_at_edge(runs: &[RunPoint]) -> (usize, usize) {
    let mut groups: BTreeMap<(u64, u64), Vec<&RunPoint>> = BTreeMap::new();
    for r in runs {
        groups.entry((r.n as u64, r.d as u64)).or_default().push(r);
    }
    let mut edge = 0;
    let mut tried = 0;
    for g in groups.values() {
        let mut lrs: Vec<f64> = g.iter().map(|r| r.lr).collect();
        lrs.sort_by(f64::total_cmp);
        lrs.dedup();
        if lrs.len() < 3 {
            continue;
        }
        tried += 1;
        let best = g
            .iter()
            .min_by(|a, b| a.loss.total_cmp(&b.loss))
            .expect("a group has runs");
        if best.lr == lrs[0] || best.lr == lrs[lrs.len() - 1] {
            edge += 1;
        }
    }
    (edge, tried)
}

pub fn interval_text(ci: &Option<Vec<Interval>>, i: usize) -> String {
    ci.as_ref()
        .and_then(|c| c.get(i))
        .map_or(String::new(), |c| {
            format!("  [{}, {}]", sci(c.low), sci(c.high))
        })
}

pub fn fits_text(f: &Fits, bootstrap: usize) -> String {
    let mut out = String::new();
    match &f.chinchilla {
        Ok((fit, ci)) => {
            let l = &fit.law;
            out += &format!(
                "L(N, D) = E + A/N^alpha + B/D^beta over {} (N, D) points, the best run of each (rms log residual {:.4}; 95% intervals of {bootstrap} bootstrap resamples):\n",
                fit.points, fit.rms_log_residual
            );
            for (i, (name, v)) in [
                ("E", l.e),
                ("A", l.a),
                ("B", l.b),
                ("alpha", l.alpha),
                ("beta", l.beta),
            ]
            .iter()
            .enumerate()
            {
                out += &format!("  {name:<6} {:>12}{}\n", sci(*v), interval_text(ci, i));
            }
            out += &format!(
                "  compute-optimal: N* ~ C^{:.3}, D* ~ C^{:.3}\n",
                l.n_exponent(),
                1.0 - l.n_exponent()
            );
            for (c, n, d, loss) in &f.frontier {
                out += &format!(
                    "  at C = {} (6·N·D): N* = {}, D* = {}, L = {loss:.4}\n",
                    sci(*c),
                    sci(*n),
                    sci(*d)
                );
            }
        }
        Err(why) => out += &format!("L(N, D): not fitted: {why}\n"),
    }
    for (what, r) in [("lr", &f.lr), ("batch", &f.batch)] {
        match r {
            Ok((law, ci, near)) => {
                out += &format!(
                    "optimal {what} = c·{} over {near} near-optimal runs (R² in logs {:.4}):\n  c      {:>12}{}\n",
                    law.variables
                        .iter()
                        .map(|v| format!("{v}^p_{v}"))
                        .collect::<Vec<_>>()
                        .join("·"),
                    law.r2_log,
                    sci(law.coefficient),
                    interval_text(ci, 0)
                );
                for (i, (v, p)) in law.variables.iter().zip(&law.exponents).enumerate() {
                    out += &format!(
                        "  p_{v:<4} {:>12}{}\n",
                        format!("{p:.4}"),
                        interval_text(ci, i + 1)
                    );
                }
            }
            Err(why) => out += &format!("optimal {what}: not fitted: {why}\n"),
        }
    }
    let (edge, groups) = f.lr_at_edge;
    if edge > 0 {
        out += &format!(
            "warning: in {edge} of {groups} (N, D) groups the best learning rate is the smallest or largest swept: the optimum may lie outside the grid; widen it\n"
        );
    }
    out
}

pub fn fits_json(f: &Fits) -> serde_json::Value {
    let err = |e: &String| json!({ "not_fitted": e });
    json!({
        "lr_at_grid_edge": { "groups": f.lr_at_edge.1, "at_edge": f.lr_at_edge.0 },
        "chinchilla": match &f.chinchilla {
            Ok((fit, ci)) => json!({
                "fit": fit,
                "intervals": ci,
                "frontier": f.frontier.iter().map(|(c, n, d, l)| json!({ "compute": c, "n": n, "d": d, "loss": l })).collect::<Vec<_>>(),
            }),
            Err(e) => err(e),
        },
        "lr": match &f.lr {
            Ok((law, ci, near)) => json!({ "fit": law, "intervals": ci, "near_optimal_runs": near }),
            Err(e) => err(e),
        },
        "batch": match &f.batch {
            Ok((law, ci, near)) => json!({ "fit": law, "intervals": ci, "near_optimal_runs": near }),
            Err(e) => err(e),
        },
    })
}

/// The sizes in order of N, each with its colour.
pub fn sizes(runs: &[&Run]) -> Vec<(String, u64, &'static str)> {
    let mut out: Vec<(String, u64)> = Vec::new();
    for r in runs {
        if !out.iter().any(|(s, _)| *s == r.size) {
            out.push((r.size.clone(), r.row.n));
        }
    }
    out.sort_by_key(|(_, n)| *n);
    out.into_iter()
        .enumerate()
        .map(|(i, (s, n))| (s, n, PALETTE[i % PALETTE.len()]))
        .collect()
}

/// Chinchilla's compute, the x of its frontier: 6·N·D with N the
/// non-embedding parameters (the table's `flops` also counts attention
/// and the head).
pub fn chinchilla_compute(r: &ResultRow) -> f64 {
    6.0 * r.n as f64 * r.d as f64
}

pub fn plots(name: &str, runs: &[&Run], f: &Fits) -> Vec<(&'static str, Chart)> {
    let sizes = sizes(runs);
    let mut out = Vec::new();
    let loss_name = if runs.iter().all(|r| r.row.eval_loss.is_some()) {
        "held-out loss"
    } else {
        "loss (held-out where measured, else training)"
    };

    // Loss against compute, with the fitted frontier.
    let mut series: Vec<Series> = sizes
        .iter()
        .map(|(s, _, c)| {
            Series::new(
                format!("size {s}"),
                c,
                runs.iter()
                    .filter(|r| r.size == *s)
                    .filter_map(|r| Some((chinchilla_compute(&r.row), r.row.loss()?)))
                    .collect(),
            )
        })
        .collect();
    if let Ok((fit, _)) = &f.chinchilla {
        let (lo, hi) = runs
            .iter()
            .map(|r| chinchilla_compute(&r.row))
            .filter(|x| *x > 0.0)
            .fold((f64::INFINITY, 0f64), |(a, b), x| (a.min(x), b.max(x)));
        if lo.is_finite() {
            let pts = (0..=40)
                .map(|i| {
                    let c = lo * (hi / lo).powf(i as f64 / 40.0);
                    let (n, d) = fit.law.optimal(c);
                    (c, fit.law.loss(n, d))
                })
                .collect();
            series.push(Series::fitted(
                "fitted frontier L(N*(C), D*(C))",
                "#555555",
                pts,
            ));
        }
    }
    out.push((
        "loss_vs_compute",
        Chart {
            title: format!("{name}: loss against training compute"),
            subtitle:
                "each run's final loss; dashed: the compute-optimal frontier of the fitted L(N, D)"
                    .into(),
            x_label: "compute C = 6·N·D (N: parameters without embeddings, as the fit's)".into(),
            y_label: loss_name.into(),
            x_log: true,
            y_log: false,
            series,
        },
    ));

    // Loss against the learning rate per size, with the fitted optimum.
    let lrs: Vec<f64> = runs.iter().map(|r| r.row.lr).collect();
    if lrs.iter().any(|&l| (l - lrs[0]).abs() > 1e-12 * lrs[0]) {
        let mut series = Vec::new();
        for (s, n, c) in &sizes {
            let mut pts: Vec<(f64, f64)> = runs
                .iter()
                .filter(|r| r.size == *s && r.kind != "branch")
                .filter_map(|r| Some((r.row.lr, r.row.loss()?)))
                .collect();
            pts.sort_by(|a, b| a.0.total_cmp(&b.0));
            let (lo, hi) = pts
                .iter()
                .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| {
                    (a.min(p.1), b.max(p.1))
                });
            series.push(Series::new(format!("size {s}"), c, pts).joined());
            if let Ok((law, _, _)) = &f.lr
                && lo.is_finite()
            {
                let d = runs.iter().find(|r| r.size == *s).map_or(0, |r| r.row.d);
                let x: Vec<f64> = law
                    .variables
                    .iter()
                    .map(|v| if v == "N" { *n as f64 } else { d as f64 })
                    .collect();
                let best = law.predict(&x);
                series.push(Series::fitted(
                    format!("fitted optimum, {s}: {}", sci(best)),
                    c,
                    vec![(best, lo), (best, hi)],
                ));
            }
        }
        out.push((
            "loss_vs_lr",
            Chart {
                title: format!("{name}: loss against peak learning rate"),
                subtitle: "per size; dashed: the optimum the fitted power law gives".into(),
                x_label: "peak learning rate".into(),
                y_label: loss_name.into(),
                x_log: true,
                y_log: false,
                series,
            },
        ));
    }

    // Cooldown branches: loss against tokens per size, the stable run's
    // held-out curve beside, and L(N, D) fitted.
    if runs.iter().any(|r| r.kind == "branch") {
        let mut series = Vec::new();
        for (s, n, c) in &sizes {
            let mut ends: Vec<(f64, f64)> = runs
                .iter()
                .filter(|r| r.size == *s && r.fraction.is_some())
                .filter_map(|r| Some((r.row.d as f64, r.row.eval_loss.or(r.row.train_loss)?)))
                .collect();
            ends.sort_by(|a, b| a.0.total_cmp(&b.0));
            if let Some(stable) = runs.iter().find(|r| r.size == *s && r.kind == "stable") {
                let mut curve = Series::new(
                    format!("{s}: stable run, during training"),
                    c,
                    stable.evals.clone(),
                )
                .joined();
                curve.markers = false;
                series.push(curve);
            }
            if let Ok((fit, _)) = &f.chinchilla
                && let (Some(first), Some(last)) = (ends.first(), ends.last())
            {
                let pts = (0..=30)
                    .map(|i| {
                        let d = first.0 * (last.0 / first.0).powf(i as f64 / 30.0);
                        (d, fit.law.loss(*n as f64, d))
                    })
                    .collect();
                series.push(Series::fitted(format!("{s}: fitted L(N, D)"), c, pts));
            }
            series.push(Series::new(format!("{s}: after cooldown"), c, ends));
        }
        out.push((
            "branches",
            Chart {
                title: format!("{name}: cooldown branches"),
                subtitle: "held-out loss at the end of each cooldown (dots), along the stable run (line), and L(N, D) fitted (dashed)".into(),
                x_label: "tokens trained".into(),
                y_label: "held-out loss".into(),
                x_log: true,
                y_log: false,
                series,
            },
        ));
    }
    out
}
