//! `strata results`: the results table of a set of jobs, for fits.

use std::path::PathBuf;

use clap::Args;
use strata_proto::v1 as pb;
use strata_sweep::results::{JobFacts, ResultRow, to_csv, to_parquet};

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
    let ended = if j.finished_unix_ms > 0 {
        j.finished_unix_ms
    } else {
        j.started_unix_ms
    };
    ResultRow::of(&JobFacts {
        job: &j.job_id,
        name: &j.name,
        state: state_name(j.state),
        parent: &j.parent_job,
        parent_step: j.parent_step,
        spec_toml: &j.spec_toml,
        tokens_done: j.tokens_done,
        first_start_unix_ms: if j.first_started_unix_ms > 0 {
            j.first_started_unix_ms
        } else {
            j.started_unix_ms
        },
        end_unix_ms: ended,
        train_loss: steps.last().map(|s| s.loss),
        eval_loss: steps.iter().rev().find_map(|s| s.eval_loss),
    })
    .map_err(|e| UserError(e).into())
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
