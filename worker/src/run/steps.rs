//! The step loop: the rank's model part built, its data opened (resumed
//! from a checkpoint when asked), then step after step: agree to go on,
//! train the step, evaluate when due, report, maybe checkpoint.

use std::sync::Arc;
use std::time::{Duration, Instant};

use burn::tensor::backend::AutodiffBackend;
use strata_dataplane::checkpoint::SourceState;
use strata_dataplane::loader::{Batch, Loader, LoaderConfig, LoaderError, Planner};
use strata_dataplane::manifest::Manifest;
use strata_dataplane::reader::read_holdout;
use strata_dataplane::store::Location;
use strata_recipe::{Coords, Recipe};

use super::checkpoints::{Checkpoints, Run};
use super::eval::EvalSet;
use super::heartbeat::{Pulse, Stop};
use super::rendezvous::Members;
use super::report::{Activity, LastStep, Reporter, SourceStep, StepReport, StepTimes};
use super::{WorkerArgs, WorkerError};
use crate::params::ParamTable;
use crate::train::{DeviceDp, Groups, LocalBatch, StepStats, TrainError, Trainer};

/// What a worker's steps need once its groups are joined and its data
/// is open.
pub(super) struct Session<'a> {
    pub(super) rt: &'a tokio::runtime::Runtime,
    pub(super) reporter: Reporter,
    pub(super) args: &'a WorkerArgs,
    pub(super) recipe: Recipe,
    /// The recipe's text, as checkpoints record it.
    pub(super) spec_toml: String,
    /// Continue from a checkpoint: its step, 0 for the newest.
    pub(super) resume: Option<u64>,
    /// The job whose checkpoint to resume from, when not this one's (a
    /// branch's parent).
    pub(super) resume_job: Option<String>,
    pub(super) coords: Coords,
    pub(super) groups: Groups,
    pub(super) members: Members,
    /// Each source's dataset and manifest, in the recipe's order.
    pub(super) data: Vec<(Location, strata_dataplane::manifest::Manifest)>,
    pub(super) pulse: Arc<Pulse>,
    pub(super) stop: Arc<Stop>,
    /// Every device's peak FLOP/s together, when known (MFU's denominator).
    pub(super) peak_flops: Option<f64>,
}

/// Builds the rank's model part on `device` (its data-parallel sums on
/// `dp_device` when given) and trains it to the end.
pub(super) fn train<B: AutodiffBackend>(
    s: Session<'_>,
    device: B::Device,
    dp_device: Option<DeviceDp<B>>,
) -> Result<(), WorkerError> {
    Steps::<B>::start(s, device, dp_device)?.run()
}

/// The fault injection of the recovery tests: the step each strikes at.
struct Faults {
    /// `STRATA_FAULT_HANG_AT = "JOB:ATTEMPT:RANK:STEP"`: that rank of that
    /// attempt stops training before that step while its heartbeats go on
    /// (a hung collective or kernel, as the coordinator sees it).
    hang_at: Option<u64>,
    /// `STRATA_FAULT_STOP_AFTER = "JOB:ATTEMPT:STEP"`: every rank asks
    /// itself to stop after that step, as a SIGTERM then would.
    stop_after: Option<u64>,
}

impl Faults {
    fn of(args: &WorkerArgs) -> Faults {
        Faults {
            hang_at: fault_at("STRATA_FAULT_HANG_AT", args, true),
            stop_after: fault_at("STRATA_FAULT_STOP_AFTER", args, false),
        }
    }
}

/// The variable's step, when it names this worker's job and attempt (and
/// rank, `per_rank`).
pub(super) fn fault_at(var: &str, args: &WorkerArgs, per_rank: bool) -> Option<u64> {
    let spec = std::env::var(var).ok()?;
    let (job, rest) = spec.split_once(':')?;
    let parts: Vec<u64> = rest.split(':').filter_map(|p| p.parse().ok()).collect();
    let (attempt, rank, step) = match (per_rank, &parts[..]) {
        (true, &[attempt, rank, step]) => (attempt, Some(rank), step),
        (false, &[attempt, step]) => (attempt, None, step),
        _ => return None,
    };
    (job == args.job
        && attempt == u64::from(args.attempt)
        && rank.is_none_or(|r| r == u64::from(args.rank)))
    .then_some(step)
}

/// A rank's training, set up.
struct Steps<'a, B: AutodiffBackend> {
    rt: &'a tokio::runtime::Runtime,
    reporter: Reporter,
    args: &'a WorkerArgs,
    recipe: Recipe,
    spec_toml: String,
    coords: Coords,
    members: Members,
    /// What data errors are prefixed with: the dataset's URL, or the
    /// mixture's sources.
    data_label: String,
    /// Each source's name, dataset and fingerprint, as checkpoints record them.
    sources: Vec<SourceState>,
    pulse: Arc<Pulse>,
    stop: Arc<Stop>,
    peak_flops: Option<f64>,
    trainer: Trainer<B>,
    loader: Loader,
    /// Each source's held-out evaluation, with `[eval]`.
    evals: Vec<EvalSet>,
    checkpoints: Option<Checkpoints>,
    first_step: u64,
    /// The checkpoint step this attempt continued from, until rank 0's
    /// first report says so.
    resumed_from: Option<u64>,
    /// The last step a checkpoint was taken of.
    saved_at: u64,
    /// Rank 0 of the world reports the steps.
    reports: bool,
    faults: Faults,
}

impl<'a, B: AutodiffBackend> Steps<'a, B> {
    /// The trainer, the evaluation set, the checkpoints (the trainer
    /// restored from one when resuming) and the loader at its cursor.
    fn start(
        s: Session<'a>,
        device: B::Device,
        dp_device: Option<DeviceDp<B>>,
    ) -> Result<Steps<'a, B>, WorkerError> {
        let Session {
            rt,
            reporter,
            args,
            recipe,
            spec_toml,
            resume,
            resume_job,
            coords,
            groups,
            members,
            data,
            pulse,
            stop,
            peak_flops,
        } = s;
        let layout = recipe.parallel.layout;
        let table = ParamTable::interleaved(
            &recipe.model,
            layout,
            coords,
            recipe.parallel.virtual_stages,
        );
        // A resumed run's weights come from its checkpoint below; a new
        // one starts from `[init] from` or the seed.
        let values = if resume.is_some() {
            table.init(recipe.seed)
        } else {
            rt.block_on(super::init::first_weights(&recipe, &table))?
        };
        let mut trainer = Trainer::<B>::from_values(
            &recipe.model,
            table,
            values,
            recipe.optimizer,
            groups,
            device,
        )
        .with_precision(recipe.precision)
        .with_sharded_optimizer(recipe.parallel.shard_optimizer)
        .with_recompute(recipe.recompute);
        let mixture = recipe.data.is_mixture();
        if mixture {
            trainer = trainer.with_row_groups(recipe.data.sources.len());
        }
        if let Some(dp) = dp_device {
            trainer = trainer.with_device_dp(dp);
        }
        tracing::info!(
            params = trainer.n_params(),
            precision = %recipe.precision,
            stage = coords.pp,
            layers = ?trainer.table().chunks,
            steps = recipe.data.n_steps(),
            "model part built"
        );

        let data_label = if mixture {
            "data.sources".to_string()
        } else {
            recipe.data.first_dataset().to_string()
        };
        let sources: Vec<SourceState> = recipe
            .data
            .sources
            .iter()
            .zip(&data)
            .map(|(s, (_, m))| SourceState {
                name: s.name.clone(),
                dataset: s.dataset.clone(),
                fingerprint: m.fingerprint(),
            })
            .collect();
        let microbatches = recipe.parallel.microbatches.max(1) as usize;
        let mut evals = Vec::new();
        if let Some(ev) = recipe.eval {
            for (source, (loc, manifest)) in recipe.data.sources.iter().zip(&data) {
                let url = &source.dataset;
                let tokens = rt
                    .block_on(read_holdout(loc, manifest))
                    .map_err(|e| WorkerError::Data(format!("{url}: {e}")))?
                    .ok_or_else(|| {
                        WorkerError::Data(format!(
                            "{url}: [eval] needs a held-out split (decompose with --holdout-fraction)"
                        ))
                    })?;
                evals.push(
                    EvalSet::new(
                        &tokens,
                        ev,
                        recipe.model.max_seq_len as usize,
                        coords.dp,
                        layout.dp,
                        microbatches,
                    )
                    .map_err(|e| match e {
                        WorkerError::Data(m) if mixture => {
                            WorkerError::Data(format!("source {}: {m}", source.name))
                        }
                        other => other,
                    })?,
                );
            }
        }
        let mut checkpoints = Checkpoints::open(&recipe, &args.job, args.attempt, rt.handle())?;
        let resumed = match (&mut checkpoints, resume) {
            (Some(ck), Some(from)) => {
                let root = resume_job.as_deref().unwrap_or(&args.job);
                Some(ck.resume(rt, &mut trainer, (root, from), &recipe, &sources)?)
            }
            (Some(ck), None) => {
                ck.refuse_existing(rt)?;
                None
            }
            (None, Some(_)) => {
                return Err(WorkerError::Setup(
                    "asked to resume, but the recipe has no [checkpoint] section".into(),
                ));
            }
            (None, None) => None,
        };
        let first_step = resumed.as_ref().map_or(1, |(step, _)| step + 1);
        let cfg = LoaderConfig::for_recipe(&recipe, coords.dp);
        let bad_data = |e: LoaderError| WorkerError::Data(format!("{data_label}: {e}"));
        let cursor = match resumed.as_ref().map(|(_, d)| d) {
            None => None,
            Some(d) if d.counts_steps => {
                // A checkpoint from before mixtures counted steps per bucket.
                let manifests: Vec<&Manifest> = data.iter().map(|(_, m)| m).collect();
                let planner = Planner::mixture(&manifests, &cfg).map_err(bad_data)?;
                let mut c = d.cursor.clone();
                for s in &mut c.sources {
                    s.used = planner.from_steps(&s.used);
                }
                Some(c)
            }
            Some(d) => Some(d.cursor.clone()),
        };
        let loader = Loader::mixture(data, &cfg, cursor).map_err(bad_data)?;
        Ok(Steps {
            rt,
            reporter,
            args,
            spec_toml,
            members,
            data_label,
            sources,
            pulse,
            stop,
            peak_flops,
            trainer,
            loader,
            evals,
            checkpoints,
            first_step,
            resumed_from: (first_step > 1).then_some(first_step - 1),
            saved_at: first_step - 1,
            reports: coords.dp == 0 && coords.pp == 0 && coords.tp == 0,
            faults: Faults::of(args),
            coords,
            recipe,
        })
    }

    /// Every step to the last, unless the ranks agree to stop first.
    fn run(mut self) -> Result<(), WorkerError> {
        let n_steps = self.recipe.data.n_steps();
        self.pulse.busy(Activity::Step);
        // Whether every rank goes on into the next step: agreed here for
        // the first, then by each step's own reductions.
        let mut go_on = self
            .trainer
            .all_ok(!self.stop.requested())
            .map_err(|e| self.failed(self.first_step, "", &e))?;
        for step in self.first_step..=n_steps {
            // The step's span (exported as a trace when configured): data,
            // the pipeline's forward and backward passes, the all-reduce,
            // the optimizer, evaluation, the report and the checkpoint's
            // copy.
            let _span = tracing::info_span!("step", step).entered();
            if !go_on {
                return self.stop_after(step - 1);
            }
            if self.faults.hang_at == Some(step) {
                tracing::warn!(step, "STRATA_FAULT_HANG_AT: hanging here, heartbeats go on");
                loop {
                    std::thread::sleep(Duration::from_secs(3600));
                }
            }
            let t0 = Instant::now();
            let batch = tracing::info_span!("data")
                .in_scope(|| self.rt.block_on(self.loader.next_batch()))
                .map_err(|e| WorkerError::Data(format!("{}: {e}", self.data_label)))?;
            let data_s = t0.elapsed().as_secs_f64();
            let lr = self.lr(step);
            let stats = self.train_step(step, &batch, lr)?;
            go_on = !stats.stop;
            let times = StepTimes {
                data_s,
                forward_s: stats.forward.as_secs_f64(),
                backward_s: stats.backward.as_secs_f64(),
                all_reduce_s: stats.all_reduce.as_secs_f64(),
                optimizer_s: stats.optimizer.as_secs_f64(),
            };
            self.pulse.finished(LastStep {
                step,
                times,
                wall_s: t0.elapsed().as_secs_f64(),
            });
            let eval = self.evaluate_if_due(step, n_steps)?;
            if !stats.loss.is_finite() {
                return Err(WorkerError::Data(format!(
                    "step {step}: the loss is {} (lr {lr:e}, gradient norm {:e})",
                    stats.loss, stats.grad_norm
                )));
            }
            if self.reports {
                self.report(step, &stats, &batch, times, eval, t0)?;
            }
            self.checkpoint_if_due(step, n_steps)?;
        }
        if let Some(ck) = &mut self.checkpoints {
            self.pulse.busy(Activity::Checkpoint);
            ck.report(self.rt, &mut self.reporter, true)?;
        }
        Ok(())
    }

    /// The learning rate of step `step` (the schedule reads the tokens
    /// seen before it).
    fn lr(&self, step: u64) -> f64 {
        let tps = self.recipe.data.tokens_per_step;
        self.recipe.schedule.lr_for_step((step - 1) * tps, tps)
    }

    /// Trains step `step` on `batch`, agreeing in the step's own
    /// reductions whether to stop after it.
    fn train_step(&mut self, step: u64, batch: &Batch, lr: f64) -> Result<StepStats, WorkerError> {
        let microbatches = self.recipe.parallel.microbatches.max(1) as usize;
        let seq = batch.seq_len as usize;
        let per = batch.inputs.len() / seq / microbatches * seq;
        let rows = per / seq;
        // Each row's source, for a mixture's per-source losses.
        let groups: Vec<u32> = if self.recipe.data.is_mixture() {
            batch
                .runs
                .iter()
                .flat_map(|&(s, n)| std::iter::repeat_n(s as u32, n))
                .collect()
        } else {
            Vec::new()
        };
        let micro: Vec<LocalBatch<'_>> = (0..microbatches)
            .map(|m| LocalBatch {
                inputs: &batch.inputs[m * per..(m + 1) * per],
                targets: &batch.targets[m * per..(m + 1) * per],
                seq_len: seq,
                groups: groups.get(m * rows..(m + 1) * rows).unwrap_or(&[]),
            })
            .collect();
        let (stop, stop_after) = (&self.stop, self.faults.stop_after);
        let wants_stop = || {
            if stop_after == Some(step) {
                tracing::warn!(step, "STRATA_FAULT_STOP_AFTER: stopping after this step");
                stop.request("STRATA_FAULT_STOP_AFTER");
            }
            stop.requested()
        };
        let tps = self.recipe.data.tokens_per_step;
        let reweigh = self.recipe.data.reweighting;
        self.trainer
            .reweigh(reweigh.filter(|r| r.active_at((step - 1) * tps)));
        self.trainer
            .step_agreeing(step, &micro, tps, lr, &wants_stop)
            .map_err(|e| self.failed(step, "", &e))
    }

    /// The held-out loss, on the steps `[eval]` asks for and the last:
    /// the loss, and each source's of a mixture (the loss is their mean
    /// under the step's weights).
    fn evaluate_if_due(&mut self, step: u64, n_steps: u64) -> Result<Option<Eval>, WorkerError> {
        let Some(every) = self.evals.first().map(|e| e.every) else {
            return Ok(None);
        };
        if !step.is_multiple_of(every) && step != n_steps {
            return Ok(None);
        }
        self.pulse.busy(Activity::Eval);
        let mut per_source = Vec::with_capacity(self.evals.len());
        for (i, e) in self.evals.iter().enumerate() {
            let name = &self.recipe.data.sources[i].name;
            let loss = tracing::info_span!("eval", tokens = e.tokens, source = %name)
                .in_scope(|| self.trainer.evaluate(step, &e.micro(), e.tokens))
                .map_err(|err| failed(&self.members, step, "evaluation: ", &err))?;
            per_source.push(loss);
        }
        self.pulse.busy(Activity::Step);
        let tps = self.recipe.data.tokens_per_step;
        let weights = self.recipe.data.weights_at((step - 1) * tps);
        let loss = per_source.iter().zip(&weights).map(|(l, w)| l * w).sum();
        Ok(Some(Eval { loss, per_source }))
    }

    /// Rank 0's report of the step.
    fn report(
        &mut self,
        step: u64,
        stats: &StepStats,
        batch: &Batch,
        times: StepTimes,
        eval: Option<Eval>,
        t0: Instant,
    ) -> Result<(), WorkerError> {
        use tracing::Instrument;
        let tps = self.recipe.data.tokens_per_step;
        let p = &self.recipe.parallel;
        let report = StepReport {
            step,
            tokens: step * tps,
            loss: stats.loss,
            lr: stats.lr,
            tokens_per_s: tps as f64 / t0.elapsed().as_secs_f64(),
            grad_norm: stats.grad_norm,
            seq_log2: batch.log2,
            times,
            stages: &stats.stages,
            bubble_theory: p
                .layout
                .bubble_fraction(p.microbatches.max(1), p.virtual_stages),
            eval_loss: eval.as_ref().map(|e| e.loss),
            peak_flops: self.peak_flops,
            sources: self.source_steps(stats, batch, eval.as_ref()),
            weights: stats.weights,
        };
        let resumed_from = self.resumed_from.take();
        self.rt.block_on(
            self.reporter
                .step(&report, resumed_from)
                .instrument(tracing::info_span!("report")),
        )
    }

    /// Each source's tokens and mean loss in the step (and held-out loss
    /// when it evaluated), for a mixture; none for one dataset.
    fn source_steps(
        &self,
        stats: &StepStats,
        batch: &Batch,
        eval: Option<&Eval>,
    ) -> Vec<SourceStep> {
        if !self.recipe.data.is_mixture() {
            return Vec::new();
        }
        self.recipe
            .data
            .sources
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let tokens = batch.source_sequences[i] * batch.seq_len;
                SourceStep {
                    name: s.name.clone(),
                    tokens,
                    loss: (tokens > 0).then(|| stats.group_loss[i] / tokens as f64),
                    eval_loss: eval.map(|e| e.per_source[i]),
                }
            })
            .collect()
    }

    /// Takes step `step`'s checkpoint when the recipe asks for one, and
    /// reports saves that finished meanwhile.
    fn checkpoint_if_due(&mut self, step: u64, n_steps: u64) -> Result<(), WorkerError> {
        let Some(due) = self
            .checkpoints
            .as_ref()
            .map(|c| c.cfg.saves_at(step, n_steps))
        else {
            return Ok(());
        };
        if due {
            self.pulse.busy(Activity::Checkpoint);
            self.save(step)?;
            self.pulse.busy(Activity::Step);
        }
        let ck = self.checkpoints.as_mut().expect("checked above");
        ck.report(self.rt, &mut self.reporter, false)
    }

    /// Copies step `step`'s checkpoint out for the background saver.
    fn save(&mut self, step: u64) -> Result<(), WorkerError> {
        let about = Run {
            job: &self.args.job,
            attempt: self.args.attempt,
            tps: self.recipe.data.tokens_per_step,
            recipe: &self.recipe,
            spec_toml: &self.spec_toml,
            sources: &self.sources,
        };
        let header = self
            .reports
            .then(|| about.manifest(step, &self.trainer, self.loader.cursor()));
        let ck = self.checkpoints.as_mut().expect("saving with checkpoints");
        ck.save(step, &mut self.trainer, self.coords.dp, header)
            .map_err(|e| failed(&self.members, step, "checkpoint: ", &e))?;
        self.saved_at = step;
        Ok(())
    }

    /// The ranks agreed to stop after step `done`: its checkpoint is
    /// saved (unless this attempt was abandoned) and every save reported
    /// before the worker leaves.
    fn stop_after(mut self, done: u64) -> Result<(), WorkerError> {
        if self.checkpoints.is_some() && !self.stop.abandoned() {
            self.pulse.busy(Activity::Checkpoint);
            if done > self.saved_at {
                self.save(done)?;
            }
            let ck = self.checkpoints.as_mut().expect("checked above");
            ck.report(self.rt, &mut self.reporter, true)?;
        }
        Err(WorkerError::Stopped(if self.stop.requested() {
            self.stop.reason()
        } else {
            "another rank was asked to stop".to_string()
        }))
    }

    fn failed(&self, step: u64, what: &str, e: &TrainError) -> WorkerError {
        failed(&self.members, step, what, e)
    }
}

/// A step's held-out losses.
struct Eval {
    /// Over the sources, weighed as the step weighed them.
    loss: f64,
    per_source: Vec<f64>,
}

/// A collective failure at `step`, naming the peer by its world rank.
fn failed(members: &Members, step: u64, what: &str, e: &TrainError) -> WorkerError {
    WorkerError::Collective {
        step,
        what: format!("{what}{}", members.describe(e)),
    }
}
