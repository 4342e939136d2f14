//! `strata sweep`: submit a sweep file, follow it, cancel or resubmit it,
//! and report it (results table, law fits, plots).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Subcommand};
use serde_json::json;
use strata_proto::v1 as pb;
use strata_sweep::fit::{
    ChinchillaOptions, Hyper, Interval, LossPoint, RunPoint, chinchilla_intervals, fit_chinchilla,
    fit_optimal, power_law_intervals,
};
use strata_sweep::results::{ResultRow, to_csv, to_parquet};
use strata_sweep::spec::{base_path, expand, inline_base};

use crate::UserError;
use crate::chart::{Chart, PALETTE, Series, png};
use crate::format::{count, sci};
use crate::jobs::{Client, Connect, fetch_metrics, runtime, state_name, status_error};

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct SweepArgs {
    #[command(subcommand)]
    pub command: Option<SweepCommand>,
    #[command(flatten)]
    pub submit: SubmitArgs,
}

#[derive(Subcommand)]
pub enum SweepCommand {
    /// Submit a sweep file (what `strata sweep FILE` does).
    Submit(SubmitArgs),
    /// A sweep's points, their jobs and states.
    Status(StatusArgs),
    /// Every sweep.
    List(ListArgs),
    /// Cancel a sweep's running jobs; its points not started stay so.
    Cancel(CancelArgs),
    /// Run again, as new jobs, the points of an ended sweep that did not
    /// succeed.
    Resubmit(ResubmitArgs),
    /// The results table, the law fits with intervals, and plots.
    Report(ReportArgs),
}

#[derive(Args)]
pub struct SubmitArgs {
    /// The sweep file (TOML): a base recipe (`base = "RECIPE.toml"`,
    /// relative to the sweep file) and axes (see README).
    pub file: Option<PathBuf>,
    /// Follow the sweep until it ends (exit 1 if it fails).
    #[arg(long)]
    pub watch: bool,
    #[command(flatten)]
    pub connect: Connect,
}

#[derive(Args)]
pub struct StatusArgs {
    pub sweep: String,
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub connect: Connect,
}

#[derive(Args)]
pub struct ListArgs {
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub connect: Connect,
}

#[derive(Args)]
pub struct CancelArgs {
    pub sweep: String,
    #[arg(long, default_value = "")]
    pub reason: String,
    #[command(flatten)]
    pub connect: Connect,
}

#[derive(Args)]
pub struct ResubmitArgs {
    pub sweep: String,
    #[arg(long)]
    pub watch: bool,
    #[command(flatten)]
    pub connect: Connect,
}

#[derive(Args)]
pub struct ReportArgs {
    pub sweep: String,
    /// Where the table, the fits and the plots go [default: ./SWEEP-report].
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Bootstrap resamples for the 95% intervals (0: none).
    #[arg(long, default_value_t = 200)]
    pub bootstrap: usize,
    /// Runs within this relative loss of their (N, D) group's best count
    /// as near-optimal for the learning-rate and batch laws.
    #[arg(long, default_value_t = 0.0025)]
    pub tolerance: f64,
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub connect: Connect,
}

pub fn run(args: SweepArgs) -> anyhow::Result<()> {
    match args.command {
        None => submit(args.submit),
        Some(SweepCommand::Submit(a)) => submit(a),
        Some(SweepCommand::Status(a)) => status(a),
        Some(SweepCommand::List(a)) => list(a),
        Some(SweepCommand::Cancel(a)) => cancel(a),
        Some(SweepCommand::Resubmit(a)) => resubmit(a),
        Some(SweepCommand::Report(a)) => report(a),
    }
}

/// The sweep file with its base recipe inlined, checked as the
/// coordinator will check it.
pub fn read_sweep(path: &Path) -> anyhow::Result<String> {
    let shown = path.display();
    let text = std::fs::read_to_string(path)
        .map_err(|e| UserError(format!("cannot read sweep file {shown}: {e}")))?;
    let text = match base_path(&text).map_err(|e| UserError(format!("{shown}: {e}")))? {
        Some(base) => {
            let at = path.parent().unwrap_or(Path::new(".")).join(&base);
            let base_text = std::fs::read_to_string(&at).map_err(|e| {
                UserError(format!(
                    "{shown}: base: cannot read recipe {}: {e}",
                    at.display()
                ))
            })?;
            inline_base(&text, &base_text, &base).map_err(|e| UserError(format!("{shown}: {e}")))?
        }
        None => text,
    };
    expand(&text).map_err(|e| UserError(format!("{shown}: {e}")))?;
    Ok(text)
}

fn submit(args: SubmitArgs) -> anyhow::Result<()> {
    let Some(file) = &args.file else {
        return Err(UserError(
            "give a sweep file (`strata sweep SWEEP.toml`) or a subcommand (status, list, cancel, resubmit, report)"
                .into(),
        )
        .into());
    };
    let text = read_sweep(file)?;
    runtime()?.block_on(async move {
        let mut c = args.connect.client().await?;
        let s = c
            .submit_sweep(pb::SubmitSweepRequest { sweep_toml: text })
            .await
            .map_err(|s| status_error("SubmitSweep", s))?
            .into_inner();
        println!("{}", s.sweep_id);
        eprintln!(
            "{} points, at most {} at once",
            s.points.len(),
            s.max_concurrent
        );
        if args.watch {
            finish(&watch(&mut c, &s.sweep_id).await?)?;
        }
        Ok(())
    })
}

async fn get(c: &mut Client, id: &str) -> anyhow::Result<pb::Sweep> {
    Ok(c.get_sweep(pb::GetSweepRequest {
        sweep_id: id.to_string(),
    })
    .await
    .map_err(|s| status_error("GetSweep", s))?
    .into_inner())
}

fn sweep_state(s: &pb::Sweep) -> &'static str {
    match s.state() {
        pb::SweepState::Running => "running",
        pb::SweepState::Succeeded => "succeeded",
        pb::SweepState::Failed => "failed",
        pb::SweepState::Cancelled => "cancelled",
        pb::SweepState::Unspecified => "unknown",
    }
}

/// Follows a sweep to its end, a line per point whose job changes state.
pub async fn watch(c: &mut Client, id: &str) -> anyhow::Result<pb::Sweep> {
    let mut seen: Vec<(String, i32, String)> = Vec::new();
    loop {
        let s = get(c, id).await?;
        for (i, p) in s.points.iter().enumerate() {
            let now = (p.job_id.clone(), p.job_state, p.blocked.clone());
            if seen.get(i) != Some(&now) && (!p.job_id.is_empty() || !p.blocked.is_empty()) {
                if p.blocked.is_empty() {
                    eprintln!("[{}] {} {}", p.label, p.job_id, state_name(p.job_state));
                } else {
                    eprintln!("[{}] blocked: {}", p.label, p.blocked);
                }
            }
            if seen.len() <= i {
                seen.push(now);
            } else {
                seen[i] = now;
            }
        }
        if s.state() != pb::SweepState::Running {
            return Ok(s);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

fn finish(s: &pb::Sweep) -> anyhow::Result<()> {
    match s.state() {
        pb::SweepState::Succeeded => {
            eprintln!("{} succeeded: {} points", s.sweep_id, s.points.len());
            Ok(())
        }
        _ => anyhow::bail!("{} {}: {}", s.sweep_id, sweep_state(s), s.reason),
    }
}

fn sweep_json(s: &pb::Sweep, jobs: &BTreeMap<String, pb::Job>) -> serde_json::Value {
    json!({
        "sweep_id": s.sweep_id,
        "name": s.name,
        "state": sweep_state(s),
        "max_concurrent": s.max_concurrent,
        "submitted_unix_ms": s.submitted_unix_ms,
        "finished_unix_ms": s.finished_unix_ms,
        "reason": s.reason,
        "points": s.points.iter().map(|p| {
            let j = jobs.get(&p.job_id);
            json!({
                "label": p.label,
                "name": p.name,
                "kind": p.kind,
                "fraction": p.fraction,
                "job_id": p.job_id,
                "state": if p.job_id.is_empty() { if p.blocked.is_empty() { "waiting" } else { "blocked" } } else { state_name(p.job_state) },
                "steps_done": j.map(|j| j.steps_done),
                "steps_total": j.map(|j| j.steps_total),
                "last_loss": j.and_then(|j| j.last_loss),
                "earlier_jobs": p.earlier_jobs,
                "blocked": p.blocked,
            })
        }).collect::<Vec<_>>(),
    })
}

async fn all_jobs(c: &mut Client) -> anyhow::Result<BTreeMap<String, pb::Job>> {
    Ok(c.list_jobs(pb::ListJobsRequest { states: vec![] })
        .await
        .map_err(|s| status_error("ListJobs", s))?
        .into_inner()
        .jobs
        .into_iter()
        .map(|j| (j.job_id.clone(), j))
        .collect())
}

fn status(args: StatusArgs) -> anyhow::Result<()> {
    runtime()?.block_on(async move {
        let mut c = args.connect.client().await?;
        let s = get(&mut c, &args.sweep).await?;
        let jobs = all_jobs(&mut c).await?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&sweep_json(&s, &jobs))?);
            return Ok(());
        }
        let done = s
            .points
            .iter()
            .filter(|p| p.job_state == pb::JobState::Succeeded as i32)
            .count();
        println!(
            "{} ({}): {}, {done}/{} points succeeded, at most {} at once",
            s.sweep_id,
            s.name,
            sweep_state(&s),
            s.points.len(),
            s.max_concurrent
        );
        if !s.reason.is_empty() {
            println!("{}", s.reason);
        }
        let mut rows = vec![vec![
            "#".to_string(),
            "POINT".into(),
            "KIND".into(),
            "JOB".into(),
            "STATE".into(),
            "STEP".into(),
            "LOSS".into(),
        ]];
        for (i, p) in s.points.iter().enumerate() {
            let j = jobs.get(&p.job_id);
            let state = if !p.blocked.is_empty() {
                format!("blocked: {}", p.blocked)
            } else if p.job_id.is_empty() {
                "waiting".into()
            } else {
                state_name(p.job_state).into()
            };
            rows.push(vec![
                (i + 1).to_string(),
                p.label.clone(),
                p.kind.clone(),
                if p.job_id.is_empty() {
                    "-".into()
                } else {
                    p.job_id.clone()
                },
                state,
                j.map_or("-".into(), |j| {
                    format!("{}/{}", j.steps_done, j.steps_total)
                }),
                j.and_then(|j| j.last_loss)
                    .map_or("-".into(), |l| format!("{l:.4}")),
            ]);
        }
        print!("{}", crate::format::table("", &rows));
        Ok(())
    })
}

fn list(args: ListArgs) -> anyhow::Result<()> {
    runtime()?.block_on(async move {
        let mut c = args.connect.client().await?;
        let sweeps = c
            .list_sweeps(pb::ListSweepsRequest {})
            .await
            .map_err(|s| status_error("ListSweeps", s))?
            .into_inner()
            .sweeps;
        if args.json {
            let jobs = all_jobs(&mut c).await?;
            let v: Vec<_> = sweeps.iter().map(|s| sweep_json(s, &jobs)).collect();
            println!("{}", serde_json::to_string_pretty(&v)?);
            return Ok(());
        }
        let mut rows = vec![vec![
            "SWEEP".to_string(),
            "STATE".into(),
            "POINTS".into(),
            "SUCCEEDED".into(),
        ]];
        for s in &sweeps {
            rows.push(vec![
                s.sweep_id.clone(),
                sweep_state(s).into(),
                s.points.len().to_string(),
                s.points
                    .iter()
                    .filter(|p| p.job_state == pb::JobState::Succeeded as i32)
                    .count()
                    .to_string(),
            ]);
        }
        print!("{}", crate::format::table("", &rows));
        Ok(())
    })
}

fn cancel(args: CancelArgs) -> anyhow::Result<()> {
    runtime()?.block_on(async move {
        let mut c = args.connect.client().await?;
        let s = c
            .cancel_sweep(pb::CancelSweepRequest {
                sweep_id: args.sweep,
                reason: args.reason,
            })
            .await
            .map_err(|s| status_error("CancelSweep", s))?
            .into_inner();
        println!("{} {}", s.sweep_id, sweep_state(&s));
        Ok(())
    })
}

fn resubmit(args: ResubmitArgs) -> anyhow::Result<()> {
    runtime()?.block_on(async move {
        let mut c = args.connect.client().await?;
        let s = c
            .resubmit_sweep(pb::ResubmitSweepRequest {
                sweep_id: args.sweep,
            })
            .await
            .map_err(|s| status_error("ResubmitSweep", s))?
            .into_inner();
        let again = s
            .points
            .iter()
            .filter(|p| p.job_id.is_empty() || !p.earlier_jobs.is_empty())
            .count();
        println!("{} {}", s.sweep_id, sweep_state(&s));
        eprintln!("{again} points run again");
        if args.watch {
            finish(&watch(&mut c, &s.sweep_id).await?)?;
        }
        Ok(())
    })
}

// -------------------------------------------------------------- report ---

/// A point's row in the report: the results table's row, and where it
/// sits in the sweep.
struct Run {
    row: ResultRow,
    /// The size axis' value, or N.
    size: String,
    kind: String,
    fraction: Option<f64>,
    /// The held-out loss along training: (tokens, eval loss).
    evals: Vec<(f64, f64)>,
}

fn size_of(p: &pb::SweepPoint, row: &ResultRow) -> String {
    p.label
        .split(' ')
        .find_map(|kv| kv.strip_prefix("size="))
        .map_or_else(|| format!("N={}", count(row.n as f64)), str::to_string)
}

/// The fits of a sweep's succeeded runs; each `Err` says why it was not
/// fitted.
struct Fits {
    /// (N, D) groups whose best learning rate is the smallest or largest
    /// swept, and the groups.
    lr_at_edge: (usize, usize),
    /// The fitted compute-optimal frontier from the sweep's smallest
    /// compute to 100× its largest: (C, N*, D*, L).
    frontier: Vec<(f64, f64, f64, f64)>,
    chinchilla: Result<(strata_sweep::fit::ChinchillaFit, Option<Vec<Interval>>), String>,
    lr: Result<(strata_sweep::fit::PowerLaw, Option<Vec<Interval>>, usize), String>,
    batch: Result<(strata_sweep::fit::PowerLaw, Option<Vec<Interval>>, usize), String>,
}

/// For each (N, D), the best loss of its runs: Chinchilla's points (a
/// run with a poor learning rate says nothing about L(N, D)).
fn best_per_size_and_tokens(runs: &[&Run]) -> Vec<LossPoint> {
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

fn fits(runs: &[&Run], bootstrap: usize, tolerance: f64) -> Fits {
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
fn lr_at_edge(runs: &[RunPoint]) -> (usize, usize) {
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

fn interval_text(ci: &Option<Vec<Interval>>, i: usize) -> String {
    ci.as_ref()
        .and_then(|c| c.get(i))
        .map_or(String::new(), |c| {
            format!("  [{}, {}]", sci(c.low), sci(c.high))
        })
}

fn fits_text(f: &Fits, bootstrap: usize) -> String {
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

fn fits_json(f: &Fits) -> serde_json::Value {
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
fn sizes(runs: &[&Run]) -> Vec<(String, u64, &'static str)> {
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
fn chinchilla_compute(r: &ResultRow) -> f64 {
    6.0 * r.n as f64 * r.d as f64
}

fn plots(name: &str, runs: &[&Run], f: &Fits) -> Vec<(&'static str, Chart)> {
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

fn report(args: ReportArgs) -> anyhow::Result<()> {
    runtime()?.block_on(async move {
        let mut c = args.connect.client().await?;
        let s = get(&mut c, &args.sweep).await?;
        let jobs = all_jobs(&mut c).await?;
        let mut runs = Vec::new();
        for p in &s.points {
            let Some(j) = jobs.get(&p.job_id) else {
                continue;
            };
            let steps = fetch_metrics(&mut c, &j.job_id).await?;
            let row = crate::results::row(j, &steps)?;
            runs.push(Run {
                size: size_of(p, &row),
                kind: p.kind.clone(),
                fraction: p.fraction,
                evals: steps
                    .iter()
                    .filter_map(|m| Some((m.tokens as f64, m.eval_loss?)))
                    .collect(),
                row,
            });
        }
        let good: Vec<&Run> = runs.iter().filter(|r| r.row.state == "succeeded").collect();
        if good.is_empty() {
            return Err(UserError(format!(
                "sweep {}: no point has succeeded yet ({}); nothing to report",
                s.sweep_id,
                sweep_state(&s)
            ))
            .into());
        }
        let fits = fits(&good, args.bootstrap, args.tolerance);
        let out = args
            .out
            .clone()
            .unwrap_or_else(|| PathBuf::from(format!("{}-report", s.sweep_id)));
        std::fs::create_dir_all(&out)
            .map_err(|e| UserError(format!("cannot create {}: {e}", out.display())))?;
        let write = |name: &str, bytes: &[u8]| -> anyhow::Result<PathBuf> {
            let path = out.join(name);
            crate::write_atomically(&path, bytes)
                .map_err(|e| UserError(format!("cannot write {}: {e}", path.display())))?;
            Ok(path)
        };
        let rows: Vec<ResultRow> = runs.iter().map(|r| r.row.clone()).collect();
        let mut files = vec![
            write("results.csv", to_csv(&rows).as_bytes())?,
            write(
                "results.parquet",
                &to_parquet(&rows).map_err(|e| anyhow::anyhow!("parquet: {e}"))?,
            )?,
        ];
        let fj = fits_json(&fits);
        files.push(write(
            "fits.json",
            serde_json::to_string_pretty(&fj)?.as_bytes(),
        )?);
        for (stem, chart) in plots(&s.name, &good, &fits) {
            let svg = chart.svg();
            files.push(write(&format!("{stem}.svg"), svg.as_bytes())?);
            files.push(write(&format!("{stem}.png"), &png(&svg)?)?);
        }
        // The cooldowns' losses in token order, per size.
        let mut branches = Vec::new();
        for (size, _, _) in sizes(&good) {
            let mut ends: Vec<(u64, f64, f64)> = good
                .iter()
                .filter(|r| r.size == size && r.fraction.is_some())
                .filter_map(|r| Some((r.row.d, r.fraction?, r.row.loss()?)))
                .collect();
            if ends.len() > 1 {
                ends.sort_by_key(|e| e.0);
                branches.push((size, ends));
            }
        }
        if args.json {
            println!(
                "{}",
                serde_json::to_string_pretty(&json!({
                    "sweep": sweep_json(&s, &jobs),
                    "rows": rows,
                    "fits": fj,
                    "branches": branches.iter().map(|(size, ends)| json!({
                        "size": size,
                        "points": ends.iter().map(|(d, f, l)| json!({ "tokens": d, "fraction": f, "loss": l })).collect::<Vec<_>>(),
                    })).collect::<Vec<_>>(),
                    "files": files,
                }))?
            );
        } else {
            println!(
                "{} ({}): {} of {} points succeeded",
                s.sweep_id,
                sweep_state(&s),
                good.len(),
                s.points.len()
            );
            print!("{}", fits_text(&fits, args.bootstrap));
            for (size, ends) in &branches {
                let parts: Vec<String> = ends
                    .iter()
                    .map(|(d, f, l)| format!("{} tokens (×{f}): {l:.4}", count(*d as f64)))
                    .collect();
                println!("cooldowns, size {size}: {}", parts.join(", "));
            }
            for f in &files {
                println!("wrote {}", f.display());
            }
        }
        Ok(())
    })
}
