//! What clients ask of jobs: submit (validated first, against the
//! inventory and the dataset), cancel, resume from a checkpoint (on the
//! same layout or another), and branch a cooldown from a stable-phase
//! checkpoint. Reading object storage (a dataset's manifest, the
//! checkpoints) happens before the lock is taken.

use std::sync::Arc;
use std::time::{Duration, Instant};

use strata_dataplane::checkpoint::{self as ckpt, Manifest};
use strata_dataplane::hf_model::HfModel;
use strata_dataplane::loader::{LoaderConfig, Planner};
use strata_dataplane::memory::{MemoryInputs, MemoryPlan};
use strata_dataplane::reader::read_manifest;
use strata_dataplane::store::Location;
use strata_recipe::{DeviceKind, InitFrom, Recipe};

use super::{Engine, Result, State};
use crate::error::EngineError;
use crate::job::{BranchOf, CheckpointRecord, JobId, JobKind, JobRecord, JobState, now_unix_ms};
use crate::store::Write;
use strata_dataplane::parts::DecomposeJob;

/// A cooldown branch to make of a job.
#[derive(Debug, Clone, Default)]
pub struct BranchRequest {
    pub parent: String,
    /// The parent's checkpoint to start from (a complete one).
    pub from_step: u64,
    /// The decay's length, in tokens: the branch ends there.
    pub decay_tokens: u64,
    /// The decay's shape; `None` keeps the parent's.
    pub decay_shape: Option<String>,
    /// The LR at the end as a fraction of the decay's start.
    pub final_lr_fraction: Option<f64>,
    /// The branch's name; `None`: the parent's with the decay's tokens.
    pub name: Option<String>,
    /// A mixture's weights for the branch, by source name (an anneal on
    /// another mix); empty keeps the parent's.
    pub weights: Vec<(String, f64)>,
}

/// A resume of an ended job.
#[derive(Debug, Clone, Default)]
pub struct ResumeRequest {
    pub job: String,
    /// The checkpoint's step; 0 for the latest complete one.
    pub from_step: u64,
    /// Another layout; `None` keeps the job's.
    pub tp: Option<u32>,
    pub pp: Option<u32>,
    pub dp: Option<u32>,
    /// Delete the checkpoints after `from_step`.
    pub discard_newer: bool,
    /// A mixture's new weights (by source name) from the checkpoint on;
    /// empty keeps the recipe's.
    pub weights: Vec<(String, f64)>,
}

/// A branch's recipe — the parent's, its decay starting at the tokens
/// the chosen checkpoint had seen and lasting `decay_tokens`, the run
/// ending there — and that checkpoint.
fn branch_spec(parent: &JobRecord, req: &BranchRequest) -> Result<(String, CheckpointRecord)> {
    let refuse = |m: String| Err(EngineError::Precondition(m));
    let Some(ck) = parent.checkpoints.iter().find(|c| c.step == req.from_step) else {
        let have: Vec<String> = parent
            .checkpoints
            .iter()
            .map(|c| c.step.to_string())
            .collect();
        return refuse(format!(
            "job {}: no complete checkpoint at step {} (it has: {})",
            parent.job_id,
            req.from_step,
            if have.is_empty() {
                "none".into()
            } else {
                have.join(", ")
            }
        ));
    };
    let recipe = parent.recipe.as_ref().ok_or_else(|| {
        EngineError::Invalid(format!("job {}'s recipe no longer parses", parent.job_id))
    })?;
    let Some(decay) = recipe.schedule.decay() else {
        return refuse(format!(
            "job {} follows a {} schedule; a branch decays the stable phase of a wsd or power run",
            parent.job_id,
            recipe.schedule.name()
        ));
    };
    if decay.tokens > 0 && ck.tokens > decay.start_tokens {
        return refuse(format!(
            "step {} of job {} ({} tokens) is past the start of its decay ({} tokens): branch from a stable-phase checkpoint",
            ck.step, parent.job_id, ck.tokens, decay.start_tokens
        ));
    }
    if req.decay_tokens == 0 {
        return Err(EngineError::Invalid(
            "decay_tokens: must be positive".into(),
        ));
    }
    let name = req
        .name
        .clone()
        .unwrap_or_else(|| format!("{}-cooldown-{}", parent.name, req.decay_tokens));
    let decay = strata_recipe::resume::BranchDecay {
        start_tokens: ck.tokens,
        tokens: req.decay_tokens,
        shape: req.decay_shape.clone(),
        final_lr_fraction: req.final_lr_fraction,
    };
    let text = strata_recipe::resume::branch(&parent.spec_toml, &decay, &name)
        .map_err(|e| EngineError::Invalid(format!("job {}'s recipe: {e}", parent.job_id)))?;
    let end = ck.tokens.saturating_add(req.decay_tokens);
    let text = strata_recipe::resume::branch_weights(&text, recipe, (ck.tokens, end), &req.weights)
        .map_err(|e| EngineError::Invalid(format!("weights: {e}")))?;
    Ok((text, ck.clone()))
}

/// A name as job and sweep ids spell it.
pub fn slug(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect()
}

/// Refuses `[init] from` weights that cannot start this model: a Hugging
/// Face folder whose `config.json` differs from `[model]` (every field
/// named) or whose tokenizer is not the datasets', or a checkpoint of
/// another model.
async fn check_init(
    from: &InitFrom,
    model: &strata_recipe::ModelConfig,
    datasets: &[strata_dataplane::manifest::Manifest],
) -> Result<()> {
    let bad = |e: &dyn std::fmt::Display| EngineError::Invalid(format!("init.from: {e}"));
    match from {
        InitFrom::HuggingFace(url) => {
            let hf = HfModel::open_checked(url, model)
                .await
                .map_err(|e| bad(&e))?;
            let tokenizers: Vec<_> = datasets.iter().map(|d| &d.tokenizer).collect();
            if !hf.check_tokenizer(&tokenizers).await.map_err(|e| bad(&e))? {
                tracing::warn!(
                    from = %from,
                    "the folder has no tokenizer.json: its tokenizer is not checked against the dataset's"
                );
            }
        }
        InitFrom::Checkpoint(url) => {
            ckpt::open_step_of(url, model).await.map_err(|e| bad(&e))?;
        }
    }
    Ok(())
}

impl Engine {
    /// Job `id` as it is now (a shared snapshot, not a copy).
    pub fn job(&self, id: &str) -> Result<Arc<JobRecord>> {
        self.lock()
            .jobs
            .get(id)
            .cloned()
            .ok_or_else(|| EngineError::NotFound(format!("no job {id}")))
    }

    /// Refuses what cannot run: an invalid recipe (a layout that cannot
    /// split the model among them), more ranks than slots, a dataset that
    /// is missing or cannot feed the recipe. The recipe, parsed once.
    pub async fn validate(&self, spec: &str, default_name: &str) -> Result<Arc<Recipe>> {
        let recipe = self.parse(spec, default_name)?;
        // The recipe's validation refused layouts that cannot split the
        // model (heads, KV heads, d_ffn, stages without layers).
        let layout = recipe.parallel.layout;
        let inventory = &self.inventory();
        if let Some(t) = &recipe.slurm.time
            && strata_cluster::slurm::parse_slurm_time(t).is_none()
        {
            return Err(EngineError::Invalid(format!(
                "slurm.time: {t:?} is not a Slurm time limit (MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS)"
            )));
        }
        if recipe.device == DeviceKind::Cuda && !inventory.has_gpus() {
            return Err(EngineError::Precondition(
                "device.backend: the recipe trains on cuda and this coordinator has no GPUs \
                 (start it with --gpus N on a machine with NVIDIA GPUs, from a strata built \
                 with --features cuda)"
                    .into(),
            ));
        }
        // The memory plan, against the device's memory when the recipe
        // gives it: refused before anything launches, naming the rank.
        let memory = MemoryInputs::of(&recipe);
        if let Some(why) = MemoryPlan::new(&memory).refusal(&memory) {
            return Err(EngineError::Invalid(format!("the job does not fit: {why}")));
        }
        self.check_slots(
            layout,
            "parallel",
            &format!("tp·pp·dp = {}·{}·{}", layout.tp, layout.pp, layout.dp),
        )?;
        let data = &recipe.data;
        let field = |i: usize| data.dataset_field(i);
        let mut manifests = Vec::with_capacity(data.sources.len());
        for (i, source) in data.sources.iter().enumerate() {
            let url = &source.dataset;
            let bad_data = |why: String| EngineError::Invalid(format!("{}: {why}", field(i)));
            let loc = Location::parse(url, false).map_err(|e| bad_data(e.to_string()))?;
            let manifest = read_manifest(&loc)
                .await
                .map_err(|e| bad_data(e.to_string()))?;
            if u64::from(manifest.tokenizer.vocab_size) > recipe.model.vocab_size {
                return Err(EngineError::Invalid(format!(
                    "model.vocab_size: {} is smaller than the tokenizer of {url} ({}, {} ids)",
                    recipe.model.vocab_size, manifest.tokenizer.name, manifest.tokenizer.vocab_size
                )));
            }
            if let Some(ev) = &recipe.eval {
                let window = recipe.model.max_seq_len + 1;
                let Some(h) = &manifest.holdout else {
                    return Err(EngineError::Invalid(format!(
                        "eval: the dataset {url} ({}) has no held-out split (decompose it with --holdout-fraction F)",
                        field(i)
                    )));
                };
                let need = u64::from(layout.dp) * u64::from(recipe.parallel.microbatches.max(1));
                let rows = ev.rows(recipe.model.max_seq_len).min(h.n_tokens / window);
                if rows < need {
                    return Err(EngineError::Invalid(format!(
                        "eval.tokens: the held-out split of {url} has {} tokens, {rows} windows of {window} for this evaluation; {need} are needed (dp · microbatches)",
                        h.n_tokens
                    )));
                }
            }
            manifests.push(manifest);
        }
        if let Some(from) = &recipe.init {
            check_init(from, &recipe.model, &manifests).await?;
        }
        let refs: Vec<&strata_dataplane::manifest::Manifest> = manifests.iter().collect();
        let urls: Vec<&str> = data.sources.iter().map(|s| s.dataset.as_str()).collect();
        let where_ = if data.is_mixture() {
            "data.sources"
        } else {
            "data.dataset"
        };
        let planner = Planner::mixture(&refs, &LoaderConfig::for_recipe(&recipe, 0))
            .map_err(|e| EngineError::Invalid(format!("{where_}: {}: {e}", urls.join(", "))))?;
        // A source that must not run out is followed through the whole
        // run now (bookkeeping only), rather than failing the job later.
        if data
            .sources
            .iter()
            .any(|s| s.exhausted == strata_recipe::Exhausted::Stop)
        {
            let mut cursor = planner.start();
            for _ in 0..data.n_steps() {
                planner
                    .next(&mut cursor)
                    .map_err(|e| EngineError::Invalid(format!("{where_}: {e}")))?;
            }
        }
        Ok(recipe)
    }

    /// Refuses a layout with more ranks than the inventory has slots.
    fn check_slots(&self, layout: strata_recipe::Layout, field: &str, why: &str) -> Result<()> {
        let inventory = &self.inventory();
        let slots = inventory.total_slots();
        if layout.world_size() > slots {
            let what = if inventory.has_gpus() {
                "GPUs (one worker each)"
            } else {
                "worker slots"
            };
            let nodes: Vec<String> = inventory
                .nodes()
                .iter()
                .take(8)
                .map(|n| format!("{} {}", n.name, n.slots))
                .collect();
            let more = inventory.nodes().len().saturating_sub(8);
            return Err(EngineError::Exhausted(format!(
                "{field}: the job needs {} worker slots ({why}) and this coordinator has {slots} {what} on {} ({}: {}{})",
                layout.world_size(),
                self.launcher_description(),
                if inventory.nodes().len() == 1 {
                    "1 node"
                } else {
                    "nodes"
                },
                nodes.join(", "),
                if more > 0 {
                    format!(" and {more} more")
                } else {
                    String::new()
                }
            )));
        }
        Ok(())
    }

    /// Parses a recipe once per process: the same text (a sweep point
    /// checked at submission, then again when it starts) is parsed once.
    fn parse(&self, spec: &str, default_name: &str) -> Result<Arc<Recipe>> {
        let key = (spec.to_string(), default_name.to_string());
        let mut parsed = self.parsed.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(r) = parsed.get(&key) {
            return Ok(r.clone());
        }
        let r = Arc::new(
            Recipe::from_toml_str(spec, default_name)
                .map_err(|e| EngineError::Invalid(e.to_string()))?,
        );
        // A bound on what is kept: sweeps of a few hundred points.
        if parsed.len() >= 1024 {
            parsed.clear();
        }
        parsed.insert(key, r.clone());
        Ok(r)
    }

    /// Records a validated job and queues it (a branch starts from its
    /// parent's checkpoint: the step and the tokens seen there); its id,
    /// once the record is durable.
    pub async fn queue_new(
        &self,
        recipe: Arc<Recipe>,
        spec_toml: String,
        parent: Option<(BranchOf, u64)>,
    ) -> Result<JobId> {
        let mut job = JobRecord::queued(
            recipe.name.clone(),
            spec_toml,
            recipe.parallel.layout,
            recipe.parallel.microbatches,
            recipe.data.n_steps(),
        );
        job.steps_done = parent.as_ref().map_or(0, |(p, _)| p.step);
        job.tokens_done = parent.as_ref().map_or(0, |(_, tokens)| *tokens);
        job.resume_from = parent.as_ref().map(|(p, _)| p.step);
        job.parent = parent.map(|(p, _)| p);
        job.recipe = Some(recipe);
        self.enqueue(job).await
    }

    /// Gives `job` its id (its name's slug and the counter) and folder,
    /// records it and queues it; its id, once the record is durable.
    async fn enqueue(&self, mut job: JobRecord) -> Result<JobId> {
        let (job_id, ticket) = {
            let mut state = self.lock();
            let n = state.next_job;
            state.next_job += 1;
            let _ = self.store.submit(Write::NextJob(n + 1))?;
            let job_id = JobId::new(format!("{}-{n}", slug(&job.name)));
            let run_dir = self.cfg.state_dir.join("runs").join(job_id.as_str());
            job.job_id = job_id.clone();
            job.run_dir = run_dir.display().to_string();
            job.submitted_unix_ms = now_unix_ms();
            let world = job.layout.world_size();
            let t = self.save(&mut state, job)?;
            state.queue.push(job_id.clone());
            tracing::info!(job = %job_id, world, "job queued");
            self.schedule(&mut state);
            (job_id, t)
        };
        self.store.durable(ticket).await?;
        Ok(job_id)
    }

    /// Validates and queues a decomposition (its description, JSON): one
    /// worker per part, within the inventory's slots, into an output that
    /// holds no complete dataset. Its job id.
    pub async fn submit_decompose(&self, spec: String) -> Result<JobId> {
        let job = DecomposeJob::parse(&spec).map_err(|e| EngineError::Invalid(e.to_string()))?;
        let workers = job.parts.len() as u32;
        let layout = strata_recipe::Layout::new(1, 1, workers);
        self.check_slots(layout, "--workers", "one per part")?;
        let out = job
            .output()
            .map_err(|e| EngineError::Invalid(format!("output: {e}")))?;
        let complete = out
            .exists(strata_dataplane::manifest::MANIFEST_KEY)
            .await
            .map_err(|e| EngineError::Invalid(format!("output: {e}")))?;
        if complete {
            return Err(EngineError::AlreadyExists(format!(
                "output: {} already holds a complete dataset; pass --overwrite to replace it",
                job.output
            )));
        }
        let mut record = JobRecord::queued(job.name.clone(), spec, layout, 1, u64::from(workers));
        record.kind = JobKind::Decompose;
        record.decompose = Some(Arc::new(job));
        let id = self.enqueue(record).await?;
        tracing::info!(job = %id, workers, "decomposition queued");
        Ok(id)
    }

    /// Validates and queues a recipe; its job id.
    pub async fn submit(&self, spec_toml: String, default_name: &str) -> Result<JobId> {
        let span = tracing::info_span!("submit", job = tracing::field::Empty);
        let recipe = match self.validate(&spec_toml, default_name).await {
            Ok(r) => r,
            Err(e) => {
                tracing::info!(reason = %e, "refused a job");
                return Err(e);
            }
        };
        let id = self.queue_new(recipe, spec_toml, None).await?;
        span.record("job", id.as_str());
        Ok(id)
    }

    /// Queues a cooldown branch of `req.parent`; its job id.
    pub async fn branch(&self, req: &BranchRequest) -> Result<JobId> {
        let parent = self.job(&req.parent)?;
        parent.trains("branch from")?;
        let (spec, ck) = branch_spec(&parent, req)?;
        let recipe = match self.validate(&spec, &parent.name).await {
            Ok(r) => r,
            Err(e) => {
                tracing::info!(reason = %e, "refused a branch");
                return Err(EngineError::Invalid(format!("the branch's recipe: {e}")));
            }
        };
        let id = self
            .queue_new(
                recipe,
                spec,
                Some((
                    BranchOf {
                        job: parent.job_id.to_string(),
                        step: ck.step,
                    },
                    ck.tokens,
                )),
            )
            .await?;
        tracing::info!(job = %id, parent = %parent.job_id, from_step = ck.step, "branch queued");
        Ok(id)
    }

    /// Cancels job `id`; its workers get the grace period to save a
    /// checkpoint and leave. Refused for an ended job unless `quiet`.
    pub async fn cancel(&self, id: &str, reason: String, quiet: bool) -> Result<Arc<JobRecord>> {
        let ticket = {
            let mut state = self.lock();
            let job = state
                .jobs
                .get(id)
                .ok_or_else(|| EngineError::NotFound(format!("no job {id}")))?;
            if job.state.is_final() {
                if quiet {
                    return Ok(job.clone());
                }
                return Err(EngineError::Precondition(format!(
                    "job {} already {}",
                    job.job_id,
                    job.state.name()
                )));
            }
            let grace = self.cfg.stop_grace;
            self.end(&mut state, id, JobState::Cancelled, reason, grace)?
        };
        if let Some(t) = ticket {
            self.store.durable(t).await?;
        }
        self.job(id)
    }

    /// Checks that `job` can continue from a checkpoint and returns its
    /// new recipe text, the recipe, and the checkpoint chosen.
    async fn plan_resume(
        &self,
        job: &JobRecord,
        req: &ResumeRequest,
    ) -> Result<(String, Arc<Recipe>, Manifest)> {
        job.trains("resume from")?;
        let refuse = |m: String| Err(EngineError::Precondition(m));
        if !job.state.is_final() {
            return refuse(format!(
                "job {} is {}; only an ended job resumes (cancel it first)",
                job.job_id,
                job.state.name()
            ));
        }
        let recipe = job.recipe.as_ref().ok_or_else(|| {
            EngineError::Invalid(format!("job {}'s recipe no longer parses", job.job_id))
        })?;
        let Some(cfg) = recipe.checkpoint.clone() else {
            return refuse(format!(
                "job {} has no [checkpoint] section: it saved nothing to resume from",
                job.job_id
            ));
        };
        let loc = Location::parse(&cfg.dir, false)
            .map_err(|e| EngineError::Precondition(format!("checkpoint.dir: {e}")))?;
        let (found, unreadable) = ckpt::list(&loc, job.job_id.as_str())
            .await
            .map_err(|e| EngineError::Unavailable(format!("checkpoint.dir: {e}")))?;
        for (url, why) in &unreadable {
            tracing::warn!(job = %job.job_id, %url, %why, "unreadable checkpoint manifest");
        }
        let steps: Vec<String> = found.iter().map(|m| m.step.to_string()).collect();
        let chosen = if req.from_step == 0 {
            found.last()
        } else {
            found.iter().find(|m| m.step == req.from_step)
        };
        let Some(chosen) = chosen.cloned() else {
            return refuse(format!(
                "job {} has no complete checkpoint{} under {}/{} (complete: {})",
                job.job_id,
                if req.from_step == 0 {
                    String::new()
                } else {
                    format!(" of step {}", req.from_step)
                },
                cfg.dir,
                job.job_id,
                if steps.is_empty() {
                    "none".to_string()
                } else {
                    steps.join(", ")
                }
            ));
        };
        let newer: Vec<&Manifest> = found.iter().filter(|m| m.step > chosen.step).collect();
        if !newer.is_empty() && !req.discard_newer {
            let list: Vec<String> = newer.iter().map(|m| m.step.to_string()).collect();
            return refuse(format!(
                "job {} has checkpoints after step {} (steps {}); resuming from {} abandons them: pass --discard-newer to delete them",
                job.job_id,
                chosen.step,
                list.join(", "),
                chosen.step
            ));
        }
        let mut spec = if req.tp.is_some() || req.pp.is_some() || req.dp.is_some() {
            strata_recipe::resume::relayout(&job.spec_toml, req.tp, req.pp, req.dp)
                .map_err(|e| EngineError::Invalid(format!("changing the layout: {e}")))?
        } else {
            job.spec_toml.clone()
        };
        if !req.weights.is_empty() {
            spec = strata_recipe::resume::reweigh(&spec, recipe, chosen.tokens_seen, &req.weights)
                .map_err(|e| EngineError::Invalid(format!("changing the weights: {e}")))?;
        }
        let now = self.validate(&spec, &job.name).await?;
        if let Ok(saved) = Recipe::from_toml_str(&chosen.recipe, &job.name) {
            let conflicts = strata_recipe::resume_conflicts(&saved, &now);
            if !conflicts.is_empty() {
                let list: Vec<String> = conflicts.iter().map(|p| p.to_string()).collect();
                return refuse(format!(
                    "job {} cannot continue from step {}: {}",
                    job.job_id,
                    chosen.step,
                    list.join("; ")
                ));
            }
        }
        for m in newer {
            ckpt::delete(&loc, job.job_id.as_str(), m)
                .await
                .map_err(|e| EngineError::Unavailable(format!("deleting step {}: {e}", m.step)))?;
            tracing::info!(job = %job.job_id, step = m.step, "deleted a checkpoint the resume abandons");
        }
        Ok((spec, now, chosen))
    }

    /// Whether job `id`'s last attempt still has processes (stopping, in
    /// their grace) or a checkpoint commit in flight: then it may still
    /// save a step or commit a manifest.
    fn attempt_lingers(state: &State, id: &str) -> Option<u32> {
        let sup = state.attempts.get(id).map(|s| s.attempt);
        let committing = state.committing.get(id).is_some_and(|&n| n > 0);
        sup.or(committing.then_some(0))
    }

    /// Waits until job `id`'s last attempt has no processes left and no
    /// checkpoint commit in flight: its workers have the stop grace to
    /// save and leave, and are killed after it. A resume plans only then,
    /// so nothing of the old attempt lands after the history was cut.
    async fn wait_attempt_gone(&self, id: &str) -> Result<()> {
        let limit = self.cfg.stop_grace + Duration::from_secs(30);
        let begun = Instant::now();
        loop {
            let lingering = Self::attempt_lingers(&self.lock(), id);
            let Some(attempt) = lingering else {
                return Ok(());
            };
            if begun.elapsed() > limit {
                return Err(EngineError::Unavailable(format!(
                    "job {id}: attempt {attempt}'s workers are still stopping {} s after the resume was asked (stop grace {} s); try again once they have left",
                    limit.as_secs(),
                    self.cfg.stop_grace.as_secs()
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Queues an ended job's next attempt from one of its checkpoints,
    /// once the previous attempt's workers have left.
    pub async fn resume(&self, req: &ResumeRequest) -> Result<Arc<JobRecord>> {
        let job = self.job(&req.job)?;
        if !job.state.is_final() {
            return Err(EngineError::Precondition(format!(
                "job {} is {}; only an ended job resumes (cancel it first)",
                job.job_id,
                job.state.name()
            )));
        }
        self.wait_attempt_gone(&req.job).await?;
        let job = self.job(&req.job)?;
        let (spec, recipe, chosen) = self.plan_resume(&job, req).await?;
        let ticket = {
            let mut state = self.lock();
            let Some(job) = state.jobs.get(req.job.as_str()).cloned() else {
                return Err(EngineError::NotFound(format!("no job {}", req.job)));
            };
            // Another resume may have started an attempt meanwhile.
            if let Some(attempt) = Self::attempt_lingers(&state, &req.job) {
                return Err(EngineError::Precondition(format!(
                    "job {}: attempt {attempt} started while this resume was planned",
                    job.job_id
                )));
            }
            if !job.state.can_become(JobState::Queued) {
                return Err(EngineError::Precondition(format!(
                    "job {} is {}",
                    job.job_id,
                    job.state.name()
                )));
            }
            let mut job = (*job).clone();
            job.spec_toml = spec;
            job.layout = recipe.parallel.layout;
            job.microbatches = recipe.parallel.microbatches;
            job.steps_total = recipe.data.n_steps();
            job.recipe = Some(recipe);
            job.state = JobState::Queued;
            job.failure_reason.clear();
            job.finished_unix_ms = 0;
            job.resume_from = Some(req.from_step);
            job.steps_done = chosen.step;
            job.tokens_done = chosen.tokens_seen;
            job.checkpoints.retain(|c| c.step <= chosen.step);
            // A resume is the user's word that the nodes may serve again.
            job.blamed_nodes.clear();
            let _ = self
                .store
                .submit(Write::Truncate(job.job_id.clone(), chosen.step))?;
            tracing::info!(job = %job.job_id, from_step = chosen.step, layout = %job.layout, "job resumes");
            let id = job.job_id.clone();
            let t = self.save(&mut state, job)?;
            state.queue.push(id);
            self.schedule(&mut state);
            t
        };
        self.store.durable(ticket).await?;
        self.job(&req.job)
    }
}
