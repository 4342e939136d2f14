//! A worker's checkpoints: the manifest it writes of the run, the resume
//! from a checkpoint (checked against the recipe and the dataset), the
//! copy out at a step and the background save, and the reports of saves
//! that finished.

use std::time::Instant;

use burn::tensor::backend::AutodiffBackend;
use strata_dataplane::store::Location;
use strata_recipe::Recipe;

use super::WorkerError;
use super::report::{CheckpointReport, Reporter};
use crate::checkpoint;
use crate::train::{TrainError, Trainer};

/// What a checkpoint's manifest says of the run.
pub(super) struct Run<'a> {
    pub(super) job: &'a str,
    pub(super) attempt: u32,
    pub(super) tps: u64,
    pub(super) recipe: &'a Recipe,
    pub(super) spec_toml: &'a str,
    /// Each source's name, dataset and fingerprint.
    pub(super) sources: &'a [checkpoint::SourceState],
}

impl Run<'_> {
    /// The manifest of step `step`'s checkpoint as rank 0 sends it (the
    /// coordinator adds every rank's files).
    pub(super) fn manifest<B: AutodiffBackend>(
        &self,
        step: u64,
        trainer: &Trainer<B>,
        cursor: &strata_dataplane::loader::Cursor,
    ) -> checkpoint::Manifest {
        let l = self.recipe.parallel.layout;
        checkpoint::Manifest {
            format: checkpoint::FORMAT.into(),
            version: checkpoint::VERSION,
            job: self.job.into(),
            attempt: self.attempt,
            step,
            tokens_seen: step * self.tps,
            optimizer_steps: trainer.optimizer_steps(),
            layout: checkpoint::SavedLayout {
                tp: l.tp,
                pp: l.pp,
                dp: l.dp,
                virtual_stages: self.recipe.parallel.virtual_stages,
            },
            model: self.recipe.model,
            recipe: self.spec_toml.into(),
            data: Some(checkpoint::DataState {
                sources: self.sources.to_vec(),
                cursor: cursor.clone(),
                counts_steps: false,
            }),
            shards: Vec::new(),
            written_at: 0,
        }
    }
}

/// A worker's checkpoints: where they go, the background saver, and the
/// saves not yet reported to the coordinator.
pub(super) struct Checkpoints {
    loc: Location,
    /// The job's folder under `[checkpoint] dir`.
    root: String,
    /// When to save: every N steps, the last, and the kept steps.
    pub(super) cfg: strata_recipe::CheckpointConfig,
    /// This worker's attempt, in its files' names.
    attempt: u32,
    saver: checkpoint::Saver,
    /// Rank 0's manifests of saves in flight, by step.
    headers: std::collections::HashMap<u64, checkpoint::Manifest>,
    /// Each save's stall: the copy out, plus waiting for the save before.
    stalls: std::collections::HashMap<u64, f64>,
    done: Vec<checkpoint::SaveResult>,
}

impl Checkpoints {
    pub(super) fn open(
        recipe: &Recipe,
        job: &str,
        attempt: u32,
        rt: &tokio::runtime::Handle,
    ) -> Result<Option<Checkpoints>, WorkerError> {
        let Some(cfg) = &recipe.checkpoint else {
            return Ok(None);
        };
        let loc = Location::parse(&cfg.dir, true)
            .map_err(|e| WorkerError::Setup(format!("checkpoint.dir: {e}")))?;
        Ok(Some(Checkpoints {
            saver: checkpoint::Saver::new(loc.clone(), job.to_string(), rt.clone()),
            loc,
            root: job.to_string(),
            cfg: cfg.clone(),
            attempt,
            headers: Default::default(),
            stalls: Default::default(),
            done: Vec::new(),
        }))
    }

    /// A job starting from scratch must not find checkpoints of its own
    /// id: they belong to an earlier job (a coordinator whose state was
    /// wiped numbers jobs again from 1) and would be mixed with this one's.
    pub(super) fn refuse_existing(&self, rt: &tokio::runtime::Runtime) -> Result<(), WorkerError> {
        let (found, _) = rt
            .block_on(checkpoint::list(&self.loc, &self.root))
            .map_err(|e| WorkerError::Setup(format!("checkpoint.dir: {e}")))?;
        if found.is_empty() {
            return Ok(());
        }
        let steps: Vec<String> = found.iter().map(|m| m.step.to_string()).collect();
        Err(WorkerError::Setup(format!(
            "checkpoint.dir: {} already holds checkpoints of job {} (steps {}) and this attempt starts from scratch; resume the job (`strata resume`), or give the recipe another [checkpoint] dir",
            self.loc.url_of(&self.root),
            self.root,
            steps.join(", ")
        )))
    }

    /// Restores the trainer from the checkpoint of step `from` (0: the
    /// newest every rank can read) and returns its step and the loader's
    /// cursor. The recipe and the dataset must be those the checkpoint
    /// continues.
    pub(super) fn resume<B: AutodiffBackend>(
        &mut self,
        rt: &tokio::runtime::Runtime,
        trainer: &mut Trainer<B>,
        (root, from): (&str, u64),
        recipe: &Recipe,
        sources: &[checkpoint::SourceState],
    ) -> Result<(u64, checkpoint::DataState), WorkerError> {
        let setup = |m: String| WorkerError::Setup(format!("resuming: {m}"));
        let (mut found, _) = rt
            .block_on(checkpoint::list(&self.loc, root))
            .map_err(|e| setup(format!("checkpoint.dir: {e}")))?;
        found.retain(|m| if from == 0 { true } else { m.step == from });
        let table = trainer.table().clone();
        let r = checkpoint::resume_agreed(rt.handle(), &self.loc, root, &found, &table, |ok| {
            trainer.all_ok(ok).map_err(|e| e.to_string())
        })
        .map_err(setup)?;
        let Some(r) = r else {
            return Err(setup(format!(
                "no readable checkpoint{} under {}",
                if from == 0 {
                    String::new()
                } else {
                    format!(" of step {from}")
                },
                self.loc.url_of(root)
            )));
        };
        for (step, why) in &r.skipped {
            tracing::warn!(step, reason = %why, "passed over an unreadable checkpoint");
        }
        let m = &r.manifest;
        let saved = Recipe::from_toml_str(&m.recipe, &recipe.name)
            .map_err(|e| setup(format!("the recipe of step {}'s checkpoint: {e}", m.step)))?;
        let conflicts = strata_recipe::resume_conflicts(&saved, recipe);
        if !conflicts.is_empty() {
            let list: Vec<String> = conflicts.iter().map(|p| p.to_string()).collect();
            return Err(setup(list.join("; ")));
        }
        let Some(data) = &m.data else {
            return Err(setup(format!(
                "step {}'s checkpoint has no loader cursor",
                m.step
            )));
        };
        for (i, (now, then)) in sources.iter().zip(&data.sources).enumerate() {
            if now.fingerprint != then.fingerprint {
                let mut field = recipe.data.dataset_field(i);
                if field != "data.dataset" {
                    field.push_str(&format!(" ({})", now.name));
                }
                return Err(setup(format!(
                    "{field}: {} is not the dataset step {}'s checkpoint was trained on ({}; fingerprint {:08x}, now {:08x})",
                    now.dataset, m.step, then.dataset, then.fingerprint, now.fingerprint
                )));
            }
        }
        if data.sources.len() != sources.len() {
            return Err(setup(format!(
                "step {}'s checkpoint read {} datasets, the recipe names {}",
                m.step,
                data.sources.len(),
                sources.len()
            )));
        }
        if data.cursor.step != m.step {
            return Err(setup(format!(
                "step {}'s checkpoint holds a loader cursor at step {}",
                m.step, data.cursor.step
            )));
        }
        trainer.restore(&r.restored.master, &r.restored.state);
        tracing::info!(step = m.step, layout = ?m.layout, "resumed from a checkpoint");
        Ok((m.step, data.clone()))
    }

    /// Copies the trainer's state out (the step's stall) and hands it to
    /// the background saver. Under a sharded optimizer every rank of the
    /// data-parallel group takes part in gathering the moments.
    pub(super) fn save<B: AutodiffBackend>(
        &mut self,
        step: u64,
        trainer: &mut Trainer<B>,
        dp_rank: u32,
        header: Option<checkpoint::Manifest>,
    ) -> Result<(), TrainError> {
        let _span = tracing::info_span!("checkpoint_copy", step).entered();
        let t = Instant::now();
        let gathered = if trainer.shards_optimizer() {
            Some(trainer.optimizer_state()?)
        } else {
            None
        };
        let gather_s = t.elapsed().as_secs_f64();
        let mut snapshot =
            checkpoint::Snapshot::take(step, self.attempt, trainer.table(), dp_rank, || {
                let state = match gathered {
                    Some(state) => state,
                    None => trainer.held_optimizer_state(),
                };
                (trainer.master(), state)
            });
        snapshot.copy_s += gather_s;
        let copy_s = snapshot.copy_s;
        let (done, waited) = self.saver.save(snapshot);
        self.done.extend(done);
        let stall = copy_s + waited.as_secs_f64();
        tracing::info!(
            step,
            stall_s = stall,
            "checkpoint copied out; writing in the background"
        );
        self.stalls.insert(step, stall);
        if let Some(h) = header {
            self.headers.insert(step, h);
        }
        Ok(())
    }

    /// Tells the coordinator about finished saves (all of them, waiting,
    /// when `wait`). A failed save is reported and training goes on.
    pub(super) fn report(
        &mut self,
        rt: &tokio::runtime::Runtime,
        reporter: &mut Reporter,
        wait: bool,
    ) -> Result<(), WorkerError> {
        let mut done = std::mem::take(&mut self.done);
        done.extend(if wait {
            self.saver.wait()
        } else {
            self.saver.finished()
        });
        for result in done {
            let step = match &result {
                Ok(s) => s.step,
                Err(f) => f.step,
            };
            match &result {
                Ok(saved) => tracing::info!(
                    step,
                    bytes = saved.bytes,
                    write_s = saved.write_s,
                    retries = saved.retries,
                    "checkpoint files written"
                ),
                Err(f) => {
                    tracing::error!(step, error = %f, "checkpoint not written; training goes on")
                }
            }
            let manifest = self.headers.remove(&step);
            rt.block_on(reporter.checkpoint(CheckpointReport {
                result: &result,
                stall_s: self.stalls.remove(&step).unwrap_or(0.0),
                manifest: manifest.as_ref(),
            }))?;
        }
        Ok(())
    }
}
