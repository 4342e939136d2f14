//! Committing checkpoints: once every rank has reported a step's files,
//! the coordinator writes its manifest (which makes it exist) and prunes
//! what `keep_last` lets go, on object storage and outside the lock; then
//! it records the checkpoint on the job.

use std::sync::Arc;

use strata_dataplane::checkpoint::{self as ckpt, Manifest};
use strata_dataplane::store::Location;
use strata_recipe::{Layout, ModelConfig};
use tracing::Instrument;

use super::supervisor::PendingCheckpoint;
use super::{Engine, Result};
use crate::error::EngineError;
use crate::job::{CheckpointRecord, JobId, JobRecord, now_unix_ms};

impl Engine {
    /// The steps of job `id`'s checkpoints that its branches still start
    /// from: a branch that has not ended and has no checkpoint of its own
    /// loads its parent's, which pruning must then keep (a manual branch
    /// of a running job names a step `keep_last` would soon let go).
    pub(crate) fn branch_pins(&self, id: &JobId) -> Vec<u64> {
        let state = self.lock();
        state
            .jobs
            .values()
            .filter(|j| !j.state.is_final() && j.checkpoints.is_empty())
            .filter_map(|j| j.parent.as_ref())
            .filter(|p| p.job == id.as_str())
            .map(|p| p.step)
            .collect()
    }

    /// Commits checkpoint `step` of `job` from every rank's reports; its
    /// record is durable when this returns. Whether it was committed.
    pub(crate) async fn commit_checkpoint(
        &self,
        job: &Arc<JobRecord>,
        attempt: u32,
        step: u64,
        layout: Layout,
        p: PendingCheckpoint,
    ) -> Result<bool> {
        let cfg = job
            .recipe
            .as_ref()
            .and_then(|r| r.checkpoint.clone())
            .ok_or_else(|| {
                EngineError::Precondition(format!("job {} has no [checkpoint] section", job.job_id))
            })?;
        let outcome = match (p.failures.is_empty(), p.manifest) {
            (false, _) => Err(p.failures.join("; ")),
            (true, None) => Err("rank 0 sent no manifest".to_string()),
            (true, Some(mut m)) => {
                m.shards = p.shards;
                m.shards.sort_by(|a, b| a.key.cmp(&b.key));
                m.written_at = (now_unix_ms() / 1000) as u64;
                let model = job.recipe.as_ref().map(|r| r.model);
                match check_manifest(&m, job.job_id.as_str(), attempt, step, layout, model) {
                    Ok(()) => write_and_prune(
                        &cfg,
                        job.job_id.as_str(),
                        &m,
                        &self.branch_pins(&job.job_id),
                    )
                    .instrument(tracing::info_span!(
                        "checkpoint_commit",
                        job = %job.job_id,
                        step = m.step
                    ))
                    .await
                    .map(|pruned| (m, pruned)),
                    Err(why) => Err(why),
                }
            }
        };
        let (committed, ticket) = {
            let mut state = self.lock();
            if !state.jobs.contains_key(job.job_id.as_str()) {
                return Ok(false);
            }
            let mut committed = false;
            let t = self.update(&mut state, job.job_id.as_str(), |job| match outcome {
                // Committed out of order behind newer ones, and at once
                // past `keep_last`: its own prune deleted it.
                Ok((m, pruned)) if pruned.contains(&m.step) => {
                    tracing::info!(job = %job.job_id, step = m.step, "checkpoint committed behind newer ones and pruned at once");
                    job.checkpoints.retain(|c| !pruned.contains(&c.step));
                }
                Ok((m, pruned)) => {
                    tracing::info!(job = %job.job_id, step = m.step, bytes = m.bytes(), stall_s = p.stall_s, write_s = p.write_s, "checkpoint complete");
                    job.checkpoints
                        .retain(|c| !pruned.contains(&c.step) && c.step != m.step);
                    job.checkpoints.push(CheckpointRecord {
                        step: m.step,
                        tokens: m.tokens_seen,
                        bytes: m.bytes(),
                        attempt: m.attempt,
                        written_unix_ms: now_unix_ms(),
                        stall_s: p.stall_s,
                        write_s: p.write_s,
                        url: format!(
                            "{}/{}/{}",
                            cfg.dir.trim_end_matches('/'),
                            job.job_id,
                            ckpt::step_dir(m.step)
                        ),
                    });
                    job.checkpoints.sort_by_key(|c| c.step);
                    super::attempts::settle_attempt(job, attempt);
                    committed = true;
                }
                Err(why) => {
                    let why = format!("step {step}: {why}");
                    tracing::warn!(job = %job.job_id, reason = %why, "checkpoint not completed");
                    job.checkpoint_errors.push(why);
                    let n = job.checkpoint_errors.len();
                    job.checkpoint_errors.drain(..n.saturating_sub(10));
                }
            })?;
            (committed, t)
        };
        self.store.durable(ticket).await?;
        Ok(committed)
    }
}

/// What the coordinator checks before a manifest makes a checkpoint
/// exist: it is this job's, of this step and attempt, saved under the
/// attempt's layout, and its files hold every element of the model once.
/// A manifest that fails is never written; the reason is recorded.
pub(crate) fn check_manifest(
    m: &Manifest,
    job: &str,
    attempt: u32,
    step: u64,
    layout: Layout,
    model: Option<ModelConfig>,
) -> Result<(), String> {
    if m.job != job {
        return Err(format!("rank 0's manifest names job `{}`", m.job));
    }
    if m.step != step {
        return Err(format!("rank 0's manifest is of step {}", m.step));
    }
    if m.attempt != attempt {
        return Err(format!("rank 0's manifest is of attempt {}", m.attempt));
    }
    let saved = (m.layout.tp, m.layout.pp, m.layout.dp);
    if saved != (layout.tp, layout.pp, layout.dp) {
        return Err(format!(
            "rank 0's manifest says layout tp={} pp={} dp={}, the attempt ran {layout}",
            saved.0, saved.1, saved.2
        ));
    }
    // The model is the job's (and nothing is sized by a claimed one).
    if model.is_some_and(|model| model != m.model) {
        return Err("rank 0's manifest describes another model than the job's".into());
    }
    let prefix = format!("a{attempt}-");
    if let Some(s) = m.shards.iter().find(|s| {
        !s.key
            .rsplit('/')
            .next()
            .is_some_and(|f| f.starts_with(&prefix))
    }) {
        return Err(format!("file {} is not attempt {attempt}'s", s.key));
    }
    ckpt::check_complete(m).map_err(|e| format!("incomplete: {e}"))
}

/// Writes checkpoint `m`'s manifest under the job's checkpoint folder,
/// then deletes the complete checkpoints beyond the newest `keep_last`
/// (never a `keep_steps` one, nor one a branch still needs). Returns the
/// steps deleted.
async fn write_and_prune(
    cfg: &strata_recipe::CheckpointConfig,
    job: &str,
    m: &Manifest,
    branches: &[u64],
) -> Result<Vec<u64>, String> {
    let loc = Location::parse(&cfg.dir, true).map_err(|e| e.to_string())?;
    ckpt::write_manifest(&loc, job, m)
        .await
        .map_err(|e| format!("writing the manifest: {e}"))?;
    match cfg.keep_last {
        Some(keep) => match ckpt::prune(
            &loc,
            job,
            keep as usize,
            &[&cfg.keep_steps[..], branches].concat(),
        )
        .await
        {
            Ok(pruned) => Ok(pruned),
            Err(e) => {
                // The checkpoint is complete; an old one stays behind.
                tracing::warn!(job, error = %e, "pruning old checkpoints failed");
                Ok(Vec::new())
            }
        },
        None => Ok(Vec::new()),
    }
}
