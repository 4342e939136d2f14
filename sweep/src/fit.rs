//! Scaling-law fits with bootstrap confidence intervals.
//!
//! - [`fit_chinchilla`]: Chinchilla's `L(N, D) = E + A/N^α + B/D^β`
//!   (Hoffmann et al. 2022, approach 3), fitted as Hoffmann et al. and
//!   Besiroglu et al. (2024) do: in `(a, b, e) = log (A, B, E)` the log-loss
//!   is `LSE(a − α log N, b − β log D, e)`; the Huber loss (δ = 10⁻³) of
//!   its residuals against the observed log-losses is minimized by L-BFGS
//!   (argmin, Moré–Thuente line search) from every start of a grid, and
//!   the best minimum kept.
//! - [`fit_power_law`]: `y = c · Πᵢ xᵢ^pᵢ` by least squares in logs, as
//!   Step Law fits the optimal learning rate and batch size to N and D.
//! - [`bootstrap`]: percentile intervals of any fit's constants over
//!   resamples of its points (with replacement, seeded).
//!
//! Inputs that cannot determine a law are refused saying why (too few
//! points, a non-positive or non-finite value with its index, a variable
//! that never changes, two that move together) rather than fitted to NaN.

use argmin::core::{CostFunction, Executor, Gradient};
use argmin::solver::linesearch::MoreThuenteLineSearch;
use argmin::solver::quasinewton::LBFGS;
use serde::Serialize;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FitError {
    #[error("{what}: {n} points; the fit needs at least {needed}")]
    TooFew {
        what: &'static str,
        n: usize,
        needed: usize,
    },
    #[error("{what}: point {index}: {field} = {value} (must be finite and positive)")]
    BadValue {
        what: &'static str,
        index: usize,
        field: &'static str,
        value: f64,
    },
    #[error("{what}: every point has the same {field} ({value}), so its exponent is undetermined")]
    Constant {
        what: &'static str,
        field: String,
        value: f64,
    },
    #[error("{what}: {why}")]
    Degenerate { what: &'static str, why: String },
}

impl FitError {
    fn degenerate(what: &'static str, why: impl Into<String>) -> FitError {
        FitError::Degenerate {
            what,
            why: why.into(),
        }
    }
}

/// One run of a sweep as Chinchilla's law sees it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct LossPoint {
    /// Parameters (Step Law's N: without embeddings, or all; say which).
    pub n: f64,
    /// Training tokens.
    pub d: f64,
    /// Final (evaluation) loss.
    pub loss: f64,
}

/// `L(N, D) = E + A/N^α + B/D^β`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Chinchilla {
    pub e: f64,
    pub a: f64,
    pub b: f64,
    pub alpha: f64,
    pub beta: f64,
}

impl Chinchilla {
    /// The predicted loss.
    pub fn loss(&self, n: f64, d: f64) -> f64 {
        self.e + self.a / n.powf(self.alpha) + self.b / d.powf(self.beta)
    }

    /// The compute-optimal split of `c` FLOPs (`C = 6·N·D`): minimizing
    /// `L` on that curve gives `N* = G·(C/6)^(β/(α+β))` with
    /// `G = (αA / βB)^(1/(α+β))`, and `D* = (C/6)/N*`.
    pub fn optimal(&self, c: f64) -> (f64, f64) {
        let s = self.alpha + self.beta;
        let g = (self.alpha * self.a / (self.beta * self.b)).powf(1.0 / s);
        let n = g * (c / 6.0).powf(self.beta / s);
        (n, c / 6.0 / n)
    }

    /// The exponent of `N* ∝ C^a` (`β/(α+β)`); `D*`'s is `1 − a`.
    pub fn n_exponent(&self) -> f64 {
        self.beta / (self.alpha + self.beta)
    }

    fn constants(&self) -> Vec<(&'static str, f64)> {
        vec![
            ("E", self.e),
            ("A", self.a),
            ("B", self.b),
            ("alpha", self.alpha),
            ("beta", self.beta),
            ("n_opt_exponent", self.n_exponent()),
        ]
    }
}

/// A fitted Chinchilla law and how well it fits.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ChinchillaFit {
    pub law: Chinchilla,
    /// The Huber objective at the minimum.
    pub objective: f64,
    /// Root mean square of the log-loss residuals.
    pub rms_log_residual: f64,
    pub points: usize,
    /// Grid starts whose L-BFGS run ended at a finite minimum.
    pub starts_converged: usize,
    pub starts: usize,
}

/// How [`fit_chinchilla`] searches.
#[derive(Debug, Clone, PartialEq)]
pub struct ChinchillaOptions {
    pub delta: f64,
    /// Starting values of `(a, b, e, α, β)`: every combination is a start.
    pub grid: [Vec<f64>; 5],
    pub max_iters: u64,
}

impl Default for ChinchillaOptions {
    /// Besiroglu et al.'s grid: α, β ∈ {0, 0.5, …, 2}, e ∈ {−1, −0.5, …,
    /// 1}, a, b ∈ {0, 5, …, 25} (4,500 starts).
    fn default() -> Self {
        let steps = |from: f64, to: f64, by: f64| {
            let n = ((to - from) / by).round() as usize;
            (0..=n).map(|i| from + by * i as f64).collect::<Vec<_>>()
        };
        ChinchillaOptions {
            delta: 1e-3,
            grid: [
                steps(0.0, 25.0, 5.0),
                steps(0.0, 25.0, 5.0),
                steps(-1.0, 1.0, 0.5),
                steps(0.0, 2.0, 0.5),
                steps(0.0, 2.0, 0.5),
            ],
            max_iters: 1000,
        }
    }
}

const CHINCHILLA: &str = "Chinchilla fit";

fn check_positive(
    what: &'static str,
    index: usize,
    field: &'static str,
    v: f64,
) -> Result<(), FitError> {
    if v.is_finite() && v > 0.0 {
        Ok(())
    } else {
        Err(FitError::BadValue {
            what,
            index,
            field,
            value: v,
        })
    }
}

fn check_varies(
    what: &'static str,
    field: &'static str,
    xs: impl Iterator<Item = f64>,
) -> Result<(), FitError> {
    let xs: Vec<f64> = xs.collect();
    let first = xs[0];
    if xs.iter().all(|&x| (x - first).abs() <= 1e-12 * first.abs()) {
        return Err(FitError::Constant {
            what,
            field: field.to_string(),
            value: first,
        });
    }
    Ok(())
}

/// The Huber objective of `(a, b, e, α, β)` over log-space points.
struct HuberLse<'p> {
    /// `(log N, log D, log L)`.
    points: &'p [(f64, f64, f64)],
    delta: f64,
}

impl HuberLse<'_> {
    /// Objective and gradient.
    fn eval(&self, p: &[f64]) -> (f64, [f64; 5]) {
        // Off the finite numbers (a start at infinity, a line search
        // overshooting): no descent there, never a NaN.
        if !p.iter().all(|x| x.is_finite()) {
            return (f64::INFINITY, [0.0; 5]);
        }
        let (a, b, e, alpha, beta) = (p[0], p[1], p[2], p[3], p[4]);
        let mut f = 0.0;
        let mut g = [0.0; 5];
        for &(ln_n, ln_d, ln_l) in self.points {
            let t = [a - alpha * ln_n, b - beta * ln_d, e];
            let m = t[0].max(t[1]).max(t[2]);
            let w: Vec<f64> = t.iter().map(|x| (x - m).exp()).collect();
            let sum: f64 = w.iter().sum();
            let pred = m + sum.ln();
            let r = pred - ln_l;
            let (h, dh) = if r.abs() <= self.delta {
                (0.5 * r * r, r)
            } else {
                (
                    self.delta * (r.abs() - 0.5 * self.delta),
                    self.delta * r.signum(),
                )
            };
            f += h;
            let s = [w[0] / sum, w[1] / sum, w[2] / sum];
            g[0] += dh * s[0];
            g[1] += dh * s[1];
            g[2] += dh * s[2];
            g[3] -= dh * s[0] * ln_n;
            g[4] -= dh * s[1] * ln_d;
        }
        if !f.is_finite() || !g.iter().all(|x| x.is_finite()) {
            return (f64::INFINITY, [0.0; 5]);
        }
        (f, g)
    }
}

impl CostFunction for HuberLse<'_> {
    type Param = Vec<f64>;
    type Output = f64;
    fn cost(&self, p: &Vec<f64>) -> Result<f64, argmin::core::Error> {
        Ok(self.eval(p).0)
    }
}

impl Gradient for HuberLse<'_> {
    type Param = Vec<f64>;
    type Gradient = Vec<f64>;
    fn gradient(&self, p: &Vec<f64>) -> Result<Vec<f64>, argmin::core::Error> {
        Ok(self.eval(p).1.to_vec())
    }
}

/// L-BFGS from `start`; the minimum and its objective, if finite.
fn lbfgs(problem: HuberLse<'_>, start: Vec<f64>, max_iters: u64) -> Option<(Vec<f64>, f64)> {
    let linesearch = MoreThuenteLineSearch::new();
    let solver = LBFGS::new(linesearch, 10)
        .with_tolerance_grad(1e-14)
        .ok()?
        .with_tolerance_cost(1e-16)
        .ok()?;
    let res = Executor::new(problem, solver)
        .configure(|s| s.param(start).max_iters(max_iters))
        .run()
        .ok()?;
    let best = res.state.best_param?;
    let cost = res.state.best_cost;
    // A minimum whose constants overflow (A = e^a = ∞ balanced by a huge
    // α) is no law: the points do not pin it down.
    let law = to_law(&best);
    let finite = [law.a, law.b, law.e, law.alpha, law.beta]
        .iter()
        .all(|x| x.is_finite() && *x > 0.0);
    (cost.is_finite() && finite).then_some((best, cost))
}

fn log_points(points: &[LossPoint]) -> Vec<(f64, f64, f64)> {
    points
        .iter()
        .map(|p| (p.n.ln(), p.d.ln(), p.loss.ln()))
        .collect()
}

fn check_chinchilla(points: &[LossPoint]) -> Result<(), FitError> {
    if points.len() < 6 {
        return Err(FitError::TooFew {
            what: CHINCHILLA,
            n: points.len(),
            needed: 6,
        });
    }
    for (i, p) in points.iter().enumerate() {
        check_positive(CHINCHILLA, i, "N", p.n)?;
        check_positive(CHINCHILLA, i, "D", p.d)?;
        check_positive(CHINCHILLA, i, "loss", p.loss)?;
    }
    check_varies(CHINCHILLA, "N", points.iter().map(|p| p.n))?;
    check_varies(CHINCHILLA, "D", points.iter().map(|p| p.d))?;
    Ok(())
}

fn to_law(p: &[f64]) -> Chinchilla {
    Chinchilla {
        a: p[0].exp(),
        b: p[1].exp(),
        e: p[2].exp(),
        alpha: p[3],
        beta: p[4],
    }
}

fn summarize(
    points: &[LossPoint],
    p: &[f64],
    objective: f64,
    converged: usize,
    starts: usize,
) -> ChinchillaFit {
    let law = to_law(p);
    let ms = points
        .iter()
        .map(|q| (law.loss(q.n, q.d).ln() - q.loss.ln()).powi(2))
        .sum::<f64>()
        / points.len() as f64;
    ChinchillaFit {
        law,
        objective,
        rms_log_residual: ms.sqrt(),
        points: points.len(),
        starts_converged: converged,
        starts,
    }
}

/// Fits Chinchilla's law to `points` from every start of the grid.
pub fn fit_chinchilla(
    points: &[LossPoint],
    opts: &ChinchillaOptions,
) -> Result<ChinchillaFit, FitError> {
    check_chinchilla(points)?;
    let logs = log_points(points);
    let g = &opts.grid;
    let mut best: Option<(Vec<f64>, f64)> = None;
    let (mut converged, mut starts) = (0, 0);
    for &a in &g[0] {
        for &b in &g[1] {
            for &e in &g[2] {
                for &alpha in &g[3] {
                    for &beta in &g[4] {
                        starts += 1;
                        let problem = HuberLse {
                            points: &logs,
                            delta: opts.delta,
                        };
                        let Some((p, f)) =
                            lbfgs(problem, vec![a, b, e, alpha, beta], opts.max_iters)
                        else {
                            continue;
                        };
                        converged += 1;
                        if best.as_ref().is_none_or(|(_, bf)| f < *bf) {
                            best = Some((p, f));
                        }
                    }
                }
            }
        }
    }
    let (p, f) = best.ok_or_else(|| {
        FitError::degenerate(
            CHINCHILLA,
            format!(
                "no L-BFGS run of the {starts} starts reached a minimum with finite, positive constants: the points do not determine L(N, D) (sizes or token counts too close, or loss not falling with them)"
            ),
        )
    })?;
    let fit = summarize(points, &p, f, converged, starts);
    if !fit.rms_log_residual.is_finite() {
        return Err(FitError::degenerate(
            CHINCHILLA,
            "the best fit predicts no finite loss at some point",
        ));
    }
    Ok(fit)
}

/// Refits `points` from `start` alone (for bootstrap resamples, as
/// Besiroglu et al. do: from the full fit).
pub fn refit_chinchilla(
    points: &[LossPoint],
    start: &Chinchilla,
    opts: &ChinchillaOptions,
) -> Result<ChinchillaFit, FitError> {
    check_chinchilla(points)?;
    let logs = log_points(points);
    let start: Vec<f64> = vec![
        start.a.ln(),
        start.b.ln(),
        start.e.ln(),
        start.alpha,
        start.beta,
    ];
    let (p, f) = lbfgs(
        HuberLse {
            points: &logs,
            delta: opts.delta,
        },
        start,
        opts.max_iters,
    )
    .ok_or_else(|| FitError::degenerate(CHINCHILLA, "L-BFGS reached no finite minimum"))?;
    Ok(summarize(points, &p, f, 1, 1))
}

/// `y = c · Πᵢ xᵢ^pᵢ`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PowerLaw {
    /// The variables' names (`"N"`, `"D"`).
    pub variables: Vec<String>,
    pub coefficient: f64,
    pub exponents: Vec<f64>,
    /// R² of the fit in logs.
    pub r2_log: f64,
    pub points: usize,
}

impl PowerLaw {
    pub fn predict(&self, x: &[f64]) -> f64 {
        self.coefficient
            * x.iter()
                .zip(&self.exponents)
                .map(|(x, p)| x.powf(*p))
                .product::<f64>()
    }

    fn constants(&self) -> Vec<(String, f64)> {
        std::iter::once(("coefficient".to_string(), self.coefficient))
            .chain(
                self.variables
                    .iter()
                    .zip(&self.exponents)
                    .map(|(v, p)| (format!("exponent_{v}"), *p)),
            )
            .collect()
    }
}

const POWER_LAW: &str = "power-law fit";

/// Fits `y = c · Πᵢ xᵢ^pᵢ` to `(x, y)` points by least squares on
/// `log y = log c + Σ pᵢ log xᵢ`.
pub fn fit_power_law(
    variables: &[&str],
    xs: &[Vec<f64>],
    ys: &[f64],
) -> Result<PowerLaw, FitError> {
    let k = variables.len();
    let n = ys.len();
    if n < k + 2 {
        return Err(FitError::TooFew {
            what: POWER_LAW,
            n,
            needed: k + 2,
        });
    }
    for (i, (x, &y)) in xs.iter().zip(ys).enumerate() {
        if x.len() != k {
            return Err(FitError::degenerate(
                POWER_LAW,
                format!("point {i} has {} variables, not {k}", x.len()),
            ));
        }
        for &v in x {
            check_positive(POWER_LAW, i, "x", v)?;
        }
        check_positive(POWER_LAW, i, "y", y)?;
    }
    // Normal equations over (1, log x₁, …, log x_k), centred for
    // conditioning.
    let lx: Vec<Vec<f64>> = xs
        .iter()
        .map(|x| x.iter().map(|v| v.ln()).collect())
        .collect();
    let ly: Vec<f64> = ys.iter().map(|y| y.ln()).collect();
    let mean_x: Vec<f64> = (0..k)
        .map(|j| lx.iter().map(|r| r[j]).sum::<f64>() / n as f64)
        .collect();
    let mean_y = ly.iter().sum::<f64>() / n as f64;
    for (j, name) in variables.iter().enumerate() {
        if lx.iter().all(|r| (r[j] - mean_x[j]).abs() < 1e-12) {
            return Err(FitError::Constant {
                what: POWER_LAW,
                field: name.to_string(),
                value: xs[0][j],
            });
        }
    }
    let mut m = vec![vec![0.0; k]; k];
    let mut v = vec![0.0; k];
    for (r, &y) in lx.iter().zip(&ly) {
        for i in 0..k {
            v[i] += (r[i] - mean_x[i]) * (y - mean_y);
            for j in 0..k {
                m[i][j] += (r[i] - mean_x[i]) * (r[j] - mean_x[j]);
            }
        }
    }
    let p = solve(m, v).ok_or_else(|| {
        FitError::degenerate(
            POWER_LAW,
            format!(
                "{} move together in these points (one is a power of another), so their exponents cannot be told apart",
                variables.join(" and ")
            ),
        )
    })?;
    let log_c = mean_y - p.iter().zip(&mean_x).map(|(p, x)| p * x).sum::<f64>();
    let (mut ss_res, mut ss_tot) = (0.0, 0.0);
    for (r, &y) in lx.iter().zip(&ly) {
        let pred = log_c + p.iter().zip(r).map(|(p, x)| p * x).sum::<f64>();
        ss_res += (y - pred).powi(2);
        ss_tot += (y - mean_y).powi(2);
    }
    Ok(PowerLaw {
        variables: variables.iter().map(|s| s.to_string()).collect(),
        coefficient: log_c.exp(),
        exponents: p,
        r2_log: if ss_tot > 0.0 {
            1.0 - ss_res / ss_tot
        } else {
            1.0
        },
        points: n,
    })
}

/// Solves `m · x = v` by Gaussian elimination with partial pivoting;
/// `None` when `m` is (numerically) singular.
fn solve(mut m: Vec<Vec<f64>>, mut v: Vec<f64>) -> Option<Vec<f64>> {
    let k = v.len();
    let scale = m.iter().flatten().fold(0f64, |s, x| s.max(x.abs()));
    for col in 0..k {
        let piv = (col..k).max_by(|&a, &b| m[a][col].abs().total_cmp(&m[b][col].abs()))?;
        if m[piv][col].abs() <= 1e-10 * scale {
            return None;
        }
        m.swap(col, piv);
        v.swap(col, piv);
        let (top, below) = m.split_at_mut(col + 1);
        let pivot = &top[col];
        for (i, row) in below.iter_mut().enumerate() {
            let f = row[col] / pivot[col];
            for (x, p) in row[col..].iter_mut().zip(&pivot[col..]) {
                *x -= f * p;
            }
            v[col + 1 + i] -= f * v[col];
        }
    }
    let mut x = vec![0.0; k];
    for r in (0..k).rev() {
        let s: f64 = (r + 1..k).map(|c| m[r][c] * x[c]).sum();
        x[r] = (v[r] - s) / m[r][r];
    }
    Some(x)
}

/// One run of a hyperparameter sweep.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct RunPoint {
    pub n: f64,
    pub d: f64,
    pub lr: f64,
    pub batch: f64,
    pub loss: f64,
}

/// The runs near the optimum: in each group of runs with the same N and
/// D, those whose loss is within `tolerance` (relative: 0.0025 is
/// 0.25%) of the group's best. Indices into `runs`, in order.
pub fn near_optimal(runs: &[RunPoint], tolerance: f64) -> Vec<usize> {
    let same = |a: f64, b: f64| (a - b).abs() <= 1e-9 * a.abs().max(b.abs());
    runs.iter()
        .enumerate()
        .filter(|(_, r)| r.loss.is_finite())
        .filter(|(_, r)| {
            let best = runs
                .iter()
                .filter(|o| same(o.n, r.n) && same(o.d, r.d) && o.loss.is_finite())
                .map(|o| o.loss)
                .fold(f64::INFINITY, f64::min);
            r.loss <= best * (1.0 + tolerance)
        })
        .map(|(i, _)| i)
        .collect()
}

/// Which hyperparameter [`fit_optimal`] fits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hyper {
    Lr,
    Batch,
}

/// The optimal learning rate or batch as a power law in N and D, fitted
/// by least squares in logs over the near-optimal runs (as Step Law and
/// DeepSeek do); a variable the sweep does not vary is left out. The
/// runs used, with the law.
pub fn fit_optimal(
    runs: &[RunPoint],
    what: Hyper,
    tolerance: f64,
) -> Result<(Vec<usize>, PowerLaw), FitError> {
    const OPTIMAL: &str = "optimal-hyperparameter fit";
    let value = |r: &RunPoint| match what {
        Hyper::Lr => r.lr,
        Hyper::Batch => r.batch,
    };
    let name = match what {
        Hyper::Lr => "lr",
        Hyper::Batch => "batch",
    };
    if let Some(first) = runs.first()
        && runs.iter().all(|r| value(r) == value(first))
    {
        return Err(FitError::degenerate(
            OPTIMAL,
            format!(
                "every run has {name} = {}: the sweep does not vary it",
                value(first)
            ),
        ));
    }
    let near = near_optimal(runs, tolerance);
    if near.is_empty() {
        return Err(FitError::TooFew {
            what: OPTIMAL,
            n: 0,
            needed: 3,
        });
    }
    let varies = |f: fn(&RunPoint) -> f64| {
        let v0 = f(&runs[near[0]]);
        near.iter()
            .any(|&i| (f(&runs[i]) - v0).abs() > 1e-9 * v0.abs())
    };
    type Var = (&'static str, fn(&RunPoint) -> f64);
    let mut vars: Vec<Var> = Vec::new();
    if varies(|r| r.n) {
        vars.push(("N", |r| r.n));
    }
    if varies(|r| r.d) {
        vars.push(("D", |r| r.d));
    }
    if vars.is_empty() {
        return Err(FitError::degenerate(
            OPTIMAL,
            "every near-optimal run has the same N and D: vary the model size or the tokens",
        ));
    }
    let names: Vec<&str> = vars.iter().map(|v| v.0).collect();
    let xs: Vec<Vec<f64>> = near
        .iter()
        .map(|&i| vars.iter().map(|v| (v.1)(&runs[i])).collect())
        .collect();
    let ys: Vec<f64> = near.iter().map(|&i| value(&runs[i])).collect();
    let law = fit_power_law(&names, &xs, &ys)?;
    Ok((near, law))
}

/// A constant with its bootstrap interval.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Interval {
    pub name: String,
    pub value: f64,
    pub low: f64,
    pub high: f64,
}

/// The central `level` (0.95: the 2.5th and 97.5th percentiles) interval
/// of each constant of `fit` over `resamples` refits of resampled points.
/// Resamples whose refit fails are skipped; `None` if fewer than half
/// succeeded.
pub fn bootstrap<P: Clone, F>(
    points: &[P],
    resamples: usize,
    level: f64,
    seed: u64,
    constants: &[(String, f64)],
    mut refit: F,
) -> Option<Vec<Interval>>
where
    F: FnMut(&[P]) -> Option<Vec<f64>>,
{
    let mut rng = SplitMix(seed);
    let mut draws: Vec<Vec<f64>> = vec![Vec::new(); constants.len()];
    let mut ok = 0;
    for _ in 0..resamples {
        let sample: Vec<P> = (0..points.len())
            .map(|_| points[(rng.next() % points.len() as u64) as usize].clone())
            .collect();
        if let Some(c) = refit(&sample)
            && c.len() == constants.len()
            && c.iter().all(|x| x.is_finite())
        {
            ok += 1;
            for (d, x) in draws.iter_mut().zip(c) {
                d.push(x);
            }
        }
    }
    if ok * 2 < resamples.max(1) {
        return None;
    }
    let q = |v: &mut Vec<f64>, f: f64| {
        v.sort_by(f64::total_cmp);
        let i = ((v.len() - 1) as f64 * f).round() as usize;
        v[i]
    };
    let tail = (1.0 - level) / 2.0;
    Some(
        constants
            .iter()
            .zip(draws.iter_mut())
            .map(|((name, value), d)| Interval {
                name: name.clone(),
                value: *value,
                low: q(d, tail),
                high: q(d, 1.0 - tail),
            })
            .collect(),
    )
}

/// Bootstrap intervals of a Chinchilla fit's constants (and of the
/// compute-optimal exponent), each resample refitted from the full fit.
pub fn chinchilla_intervals(
    points: &[LossPoint],
    fit: &ChinchillaFit,
    opts: &ChinchillaOptions,
    resamples: usize,
    seed: u64,
) -> Option<Vec<Interval>> {
    let constants: Vec<(String, f64)> = fit
        .law
        .constants()
        .into_iter()
        .map(|(n, v)| (n.to_string(), v))
        .collect();
    bootstrap(points, resamples, 0.95, seed, &constants, |s| {
        let f = refit_chinchilla(s, &fit.law, opts).ok()?;
        Some(f.law.constants().into_iter().map(|c| c.1).collect())
    })
}

/// Bootstrap intervals of a power law's coefficient and exponents.
pub fn power_law_intervals(
    xs: &[Vec<f64>],
    ys: &[f64],
    fit: &PowerLaw,
    resamples: usize,
    seed: u64,
) -> Option<Vec<Interval>> {
    let names: Vec<&str> = fit.variables.iter().map(String::as_str).collect();
    let points: Vec<(Vec<f64>, f64)> = xs.iter().cloned().zip(ys.iter().copied()).collect();
    bootstrap(&points, resamples, 0.95, seed, &fit.constants(), |s| {
        let (x, y): (Vec<Vec<f64>>, Vec<f64>) = s.iter().cloned().unzip();
        let f = fit_power_law(&names, &x, &y).ok()?;
        Some(f.constants().into_iter().map(|c| c.1).collect())
    })
}

/// A small seeded generator (SplitMix64) for resampling.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A standard normal draw (Box–Muller).
    pub fn normal(&mut self) -> f64 {
        let u = ((self.next() >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
        let v = ((self.next() >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
    }
}

/// Seeded standard normal draws, for synthetic data in tests and
/// benchmarks.
pub fn normals(seed: u64, n: usize) -> Vec<f64> {
    let mut r = SplitMix(seed);
    (0..n).map(|_| r.normal()).collect()
}
