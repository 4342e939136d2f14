//! `strata sweep`: submit a sweep file, follow it, cancel or resubmit it,
//! and report it (results table, law fits, plots).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Subcommand};
use serde_json::json;
use strata_proto::v1 as pb;
use strata_sweep::results::{ResultRow, to_csv, to_parquet};
use strata_sweep::spec::{base_path, expand, inline_base};

use crate::UserError;
use crate::chart::png;
use crate::format::count;
use crate::jobs::{Client, Connect, fetch_metrics, runtime, state_name, status_error};
use strata_sweep::report::{Run, fits, fits_json, fits_text, plots, size_of, sizes};

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
    /// Overrides of the base recipe's fields, before the axes apply.
    #[command(flatten)]
    pub sets: crate::Sets,
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
    #[arg(long, default_value_t = strata_sweep::report::BOOTSTRAP)]
    pub bootstrap: usize,
    /// Runs within this relative loss of their (N, D) group's best count
    /// as near-optimal for the learning-rate and batch laws.
    #[arg(long, default_value_t = strata_sweep::report::TOLERANCE)]
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

/// The sweep file with its base recipe inlined and `sets` written into
/// it, checked as the coordinator will check it.
pub fn read_sweep(path: &Path, sets: &crate::Sets) -> anyhow::Result<String> {
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
    let text = with_overrides(&text, &sets.sets).map_err(|e| UserError(format!("{shown}: {e}")))?;
    expand(&text).map_err(|e| UserError(format!("{shown}: {e}")))?;
    Ok(text)
}

/// A sweep's text with `sets` written into its recipe: each override
/// checked against the recipe's keys and types here, the recipe as a
/// whole when the axes complete it.
fn with_overrides(text: &str, sets: &[strata_recipe::Override]) -> anyhow::Result<String> {
    use strata_recipe::overrides;
    if sets.is_empty() {
        return Ok(text.to_string());
    }
    let mut doc: toml::Table = text.parse()?;
    let Some(toml::Value::Table(recipe)) = doc.get_mut("recipe") else {
        anyhow::bail!("--set: the sweep has no recipe (`base` or `[recipe]`) to override");
    };
    overrides::apply(recipe, sets)?;
    overrides::check_structure(&toml::to_string(recipe)?, sets)?;
    Ok(format!(
        "{}{}",
        overrides::header(sets),
        toml::to_string(&doc)?
    ))
}

fn submit(args: SubmitArgs) -> anyhow::Result<()> {
    let Some(file) = &args.file else {
        return Err(UserError(
            "give a sweep file (`strata sweep SWEEP.toml`) or a subcommand (status, list, cancel, resubmit, report)"
                .into(),
        )
        .into());
    };
    let text = read_sweep(file, &args.sets)?;
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
                size: size_of(&p.label, &row),
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
