//! `strata results`: the results table of a set of jobs, for fits.

use std::path::PathBuf;

use clap::Args;
use strata_proto::v1 as pb;
use strata_recipe::Recipe;
use strata_recipe::plan::Plan;
use strata_sweep::results::{ResultRow, to_csv, to_parquet};

use crate::UserError;
use crate::jobs::{Connect, fetch_metrics, runtime, state_name, status_error};

#[derive(Args)]
pub struct ResultsArgs {
    /// The jobs [default: every succeeded job].
    pub jobs: Vec<String>,
    /// Write the table as CSV (the columns `strata fit` reads).
    #[arg(long)]
    pub csv: Option<PathBuf>,
    /// Write the table as Parquet.
    #[arg(long)]
    pub parquet: Option<PathBuf>,
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub connect: Connect,
}

/// A job's row: its recipe's sizes and schedule, its last losses.
pub(crate) fn row(j: &pb::Job, steps: &[pb::StepMetrics]) -> anyhow::Result<ResultRow> {
    let recipe = Recipe::from_toml_str(&j.spec_toml, &j.name)
        .map_err(|e| UserError(format!("job {}: its recipe: {e}", j.job_id)))?;
    let plan = Plan::new(&recipe);
    let ended = if j.finished_unix_ms > 0 {
        j.finished_unix_ms
    } else {
        j.started_unix_ms
    };
    let first_start = j
        .attempts
        .first()
        .map_or(j.started_unix_ms, |a| a.started_unix_ms);
    Ok(ResultRow {
        job: j.job_id.clone(),
        name: j.name.clone(),
        state: state_name(j.state).to_string(),
        parent: j.parent_job.clone(),
        parent_step: j.parent_step,
        n: plan.params.non_embedding,
        n_total: plan.params.total,
        d: j.tokens_done,
        flops: plan.flops_per_token * j.tokens_done as f64,
        lr: recipe.schedule.max_lr(),
        batch: recipe.data.tokens_per_step,
        train_loss: steps.last().map(|s| s.loss),
        eval_loss: steps.iter().rev().find_map(|s| s.eval_loss),
        wall_s: (ended - first_start).max(0) as f64 / 1e3,
    })
}

pub fn run(args: ResultsArgs) -> anyhow::Result<()> {
    runtime()?.block_on(async move {
        let mut c = args.connect.client().await?;
        let jobs: Vec<pb::Job> = if args.jobs.is_empty() {
            c.list_jobs(pb::ListJobsRequest {
                states: vec![pb::JobState::Succeeded as i32],
            })
            .await
            .map_err(|s| status_error("ListJobs", s))?
            .into_inner()
            .jobs
        } else {
            let mut out = Vec::new();
            for id in &args.jobs {
                out.push(
                    c.get_job(pb::GetJobRequest { job_id: id.clone() })
                        .await
                        .map_err(|s| status_error("GetJob", s))?
                        .into_inner(),
                );
            }
            out
        };
        let mut rows = Vec::with_capacity(jobs.len());
        for j in &jobs {
            let steps = fetch_metrics(&mut c, &j.job_id).await?;
            rows.push(row(j, &steps)?);
        }
        if let Some(path) = &args.csv {
            std::fs::write(path, to_csv(&rows))
                .map_err(|e| UserError(format!("cannot write {}: {e}", path.display())))?;
        }
        if let Some(path) = &args.parquet {
            let bytes = to_parquet(&rows).map_err(|e| anyhow::anyhow!("parquet: {e}"))?;
            std::fs::write(path, bytes)
                .map_err(|e| UserError(format!("cannot write {}: {e}", path.display())))?;
        }
        if args.json {
            println!("{}", serde_json::to_string_pretty(&rows)?);
        } else if args.csv.is_none() && args.parquet.is_none() {
            print!("{}", to_csv(&rows));
        }
        Ok(())
    })
}
