//! What workers ask of the engine: register, wait for the assignment,
//! heartbeat, report steps, checkpoints and their end. Each call checks
//! the worker (its job's token, a rank in the world, the job's current
//! attempt) under the lock by reference: nothing is cloned per call.

use std::sync::Arc;
use std::time::Duration;

use strata_dataplane::checkpoint::{Manifest, ShardRecord};

use super::supervisor::{Activity, Assignment, RankStep, Rendezvous, Supervisor};
use super::{Engine, Event, Result, State};
use crate::error::EngineError;
use crate::job::{JobId, JobRecord, JobState, StepRecord};
use crate::store::Write;
use strata_dataplane::parts::DecomposeJob;

/// Who is calling: a worker's job, rank and attempt, and the token it
/// presented.
#[derive(Debug, Clone, Copy)]
pub struct WorkerCall<'a> {
    pub job: &'a str,
    pub rank: u32,
    pub attempt: u32,
    pub token: Option<&'a str>,
}

/// A heartbeat.
#[derive(Debug, Clone)]
pub struct HeartbeatIn {
    pub step: u64,
    pub activity: Activity,
    /// The rank's last finished step's split, once it has one.
    pub last_step: Option<RankStep>,
}

/// The answer to a heartbeat.
#[derive(Debug, Clone)]
pub struct HeartbeatOut {
    /// Stop: the job was cancelled, or the attempt failed.
    pub stop: Option<String>,
    pub interval: Duration,
}

/// Equal without an early exit: how long a comparison takes says nothing
/// of how much of a guess was right.
pub fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

/// Checks a worker call against `job`: its token, a rank in the world, and
/// the job's current attempt (a worker of an ended attempt is refused, so
/// it cannot disturb the next one).
fn check(job: Option<&Arc<JobRecord>>, w: &WorkerCall) -> Result<()> {
    let Some(job) = job else {
        return Err(EngineError::NotFound(format!("no job {}", w.job)));
    };
    if !w.token.is_some_and(|t| job.worker_token_matches(t)) {
        tracing::warn!(job = %w.job, rank = w.rank, "worker call with a wrong or missing job token");
        return Err(EngineError::Unauthenticated(format!(
            "job {}: wrong or missing worker token",
            w.job
        )));
    }
    if w.rank >= job.layout.world_size() {
        return Err(EngineError::Invalid(format!(
            "rank {} is outside job {}'s world of {}",
            w.rank,
            w.job,
            job.layout.world_size()
        )));
    }
    if w.attempt != job.attempt() {
        tracing::warn!(job = %w.job, rank = w.rank, attempt = w.attempt, current = job.attempt(), "call from a worker of another attempt");
        return Err(EngineError::Precondition(format!(
            "job {}: attempt {} has ended; the job is on attempt {}",
            w.job,
            w.attempt,
            job.attempt()
        )));
    }
    Ok(())
}

/// The running attempt `w` belongs to.
fn running<'a>(state: &'a mut State, w: &WorkerCall) -> Result<&'a mut Supervisor> {
    match state.attempts.get_mut(w.job) {
        Some(sup) if sup.is_running() && sup.attempt == w.attempt => Ok(sup),
        _ => Err(EngineError::Precondition(format!(
            "job {} is not running attempt {}",
            w.job, w.attempt
        ))),
    }
}

impl Engine {
    /// A worker announces itself and its collective endpoint; the
    /// heartbeat period it should keep.
    pub fn register(&self, w: WorkerCall, addr: String) -> Result<Duration> {
        let (live, publish) = {
            let mut state = self.lock();
            check(state.jobs.get(w.job), &w)?;
            let live = state.live_ranks;
            let sup = running(&mut state, &w)?;
            (live, sup.register(w.rank as usize, addr))
        };
        // The last rank: every waiter is woken once, off the lock.
        if let Some((tx, table)) = publish {
            tx.send_if_modified(|r| {
                if matches!(r, Rendezvous::Waiting) {
                    *r = Rendezvous::Ready(table);
                    true
                } else {
                    false
                }
            });
        }
        Ok(self.heartbeat_interval(live))
    }

    /// The worker's assignment, once every rank of its attempt has
    /// registered: subscribed under the lock, awaited outside it, built
    /// from the attempt's one address table.
    pub async fn assignment(&self, w: WorkerCall<'_>) -> Result<Assignment> {
        let (mut rx, base) = {
            let mut state = self.lock();
            check(state.jobs.get(w.job), &w)?;
            let sup = running(&mut state, &w)?;
            (sup.rendezvous.subscribe(), sup.base.clone())
        };
        let ended = |why: String| EngineError::Precondition(format!("job {}: {why}", w.job));
        let r = rx
            .wait_for(|r| !matches!(r, Rendezvous::Waiting))
            .await
            .map(|r| r.clone());
        match r {
            Ok(Rendezvous::Ready(addrs)) => Ok(Assignment {
                base,
                addrs,
                rank: w.rank,
            }),
            Ok(Rendezvous::Ended(why)) => Err(ended(why)),
            Ok(Rendezvous::Waiting) | Err(_) => {
                Err(ended(format!("attempt {} has ended", w.attempt)))
            }
        }
    }

    /// A heartbeat: the rank's step, activity and last step's split.
    pub fn heartbeat(&self, w: WorkerCall, hb: HeartbeatIn) -> Result<HeartbeatOut> {
        let mut state = self.lock();
        let job = state.jobs.get(w.job);
        check(job, &w)?;
        let job_state = job.map_or(JobState::Queued, |j| j.state);
        // The attempt failed and the next one starts from the latest
        // checkpoint: nothing of this one is kept, so its workers leave
        // without saving (a stop would have them write files no manifest
        // will ever name).
        if job_state == JobState::Restarting {
            return Err(EngineError::Precondition(format!(
                "job {}: attempt {} failed; the next attempt starts from the latest checkpoint",
                w.job, w.attempt
            )));
        }
        let live = state.live_ranks;
        let (gap, stop) = match state.attempts.get_mut(w.job) {
            Some(sup) if sup.is_running() && sup.attempt == w.attempt => {
                let r = w.rank as usize;
                let gap = sup.beat(r, Some(hb.step));
                sup.set_activity(r, hb.activity);
                if hb.last_step.is_some() {
                    sup.last_steps[r] = hb.last_step;
                }
                (gap, None)
            }
            _ => (
                Duration::ZERO,
                Some(format!("job {} is {}", w.job, job_state.name())),
            ),
        };
        drop(state);
        if !gap.is_zero() {
            self.metrics.heartbeat_gaps.observe(gap.as_secs_f64());
        }
        Ok(HeartbeatOut {
            stop,
            interval: self.heartbeat_interval(live),
        })
    }

    /// Rank 0's step metrics: progress, the watchers, the store.
    pub fn report_metrics(
        &self,
        w: WorkerCall,
        steps: Vec<StepRecord>,
        resumed_from_step: Option<u64>,
    ) -> Result<()> {
        let Some(last) = steps.last().cloned() else {
            return Ok(());
        };
        let mut state = self.lock();
        check(state.jobs.get(w.job), &w)?;
        // A stopping attempt's steps count too: when the job has ended (a
        // cancel: its workers finish the step they are in, then save it),
        // and when a failed attempt's ranks are still leaving (a checkpoint
        // they complete is where the next attempt starts, so the steps up
        // to it are kept; the next launch cuts any past it).
        match state.attempts.get_mut(w.job) {
            Some(sup) if sup.attempt == w.attempt => {
                sup.beat(w.rank as usize, Some(last.step));
                sup.stepped(last.step);
            }
            _ => {
                return Err(EngineError::Precondition(format!(
                    "job {} has no live attempt {}",
                    w.job, w.attempt
                )));
            }
        }
        // Progress is kept in memory and goes to the store with the steps
        // (the record itself is written at the job's next change).
        let id = {
            let arc = state.jobs.get_mut(w.job).expect("checked");
            let job = Arc::make_mut(arc);
            job.steps_done = last.step;
            job.tokens_done = last.tokens;
            job.last_loss = Some(last.loss);
            if let (Some(step), Some(a)) = (resumed_from_step, job.attempts.last_mut()) {
                a.from_step = step;
            }
            super::attempts::settle_attempt(job, w.attempt);
            self.tensorboard.steps(
                w.job,
                &job.run_dir,
                w.attempt,
                job.recipe.clone(),
                steps.clone(),
            );
            job.job_id.clone()
        };
        let _ = self.store.submit(Write::Steps(id.clone(), steps.clone()))?;
        if let Some(tx) = state.watchers.get(w.job) {
            for s in &steps {
                let _ = tx.send(Event::Step(Arc::new(s.clone())));
            }
        }
        state.last_steps.insert(id, last);
        Ok(())
    }

    /// A rank's end: success, or its own failure (the monitor decides,
    /// within a second, whether a peer's exit is the cause).
    pub async fn report_done(&self, w: WorkerCall<'_>, ok: bool, error: String) -> Result<()> {
        /// What the last rank's report leaves to do outside the lock.
        enum Then {
            /// Wait for the job's end to be durable.
            Durable(Option<crate::store::Ticket>),
            /// Commit the decomposition's dataset, then end the job.
            Commit(Arc<DecomposeJob>),
        }
        let then = {
            let mut state = self.lock();
            check(state.jobs.get(w.job), &w)?;
            let Some(sup) = state.attempts.get_mut(w.job) else {
                return Ok(());
            };
            if !sup.is_running() || sup.attempt != w.attempt {
                return Ok(());
            }
            if !ok {
                sup.report_failure(w.rank, error);
                return Ok(());
            }
            let all = sup.finish(w.rank as usize);
            let finished = sup.finished() as u64;
            let job = state.jobs.get_mut(w.job).expect("checked");
            let decompose = job.decompose.clone();
            if decompose.is_some() {
                // A decomposition's progress: its parts finished (in
                // memory; the record is written at the job's next change).
                Arc::make_mut(job).steps_done = finished;
            }
            if !all {
                return Ok(());
            }
            match decompose {
                Some(d) => {
                    // The dataset's manifest is written outside the lock;
                    // the job ends once it is.
                    *state.committing.entry(JobId::new(w.job)).or_default() += 1;
                    Then::Commit(d)
                }
                None => Then::Durable(self.end(
                    &mut state,
                    w.job,
                    JobState::Succeeded,
                    String::new(),
                    Duration::from_secs(30),
                )?),
            }
        };
        match then {
            Then::Durable(Some(t)) => self.store.durable(t).await?,
            Then::Durable(None) => {}
            Then::Commit(d) => self.commit_dataset(w.job, &d).await?,
        }
        Ok(())
    }

    /// Every part of decomposition `id` is in: merges their manifests
    /// into the dataset's (object storage, outside the lock), then ends
    /// the job: succeeded, or failed naming what could not be committed.
    async fn commit_dataset(&self, id: &str, job: &DecomposeJob) -> Result<()> {
        let committed = strata_dataplane::parts::commit(job).await;
        let ticket = {
            let mut state = self.lock();
            if let Some(n) = state.committing.get_mut(id) {
                *n -= 1;
                if *n == 0 {
                    state.committing.remove(id);
                }
            }
            let (to, reason) = match &committed {
                Ok(m) => {
                    let sequences: u64 = m.buckets.iter().map(|b| b.n_sequences).sum();
                    tracing::info!(job = %id, output = %job.output, sequences, documents = m.n_documents, "dataset committed");
                    (JobState::Succeeded, String::new())
                }
                Err(e) => (
                    JobState::Failed,
                    format!("committing the dataset at {}: {e}", job.output),
                ),
            };
            self.end(&mut state, id, to, reason, Duration::from_secs(30))?
        };
        if let Some(t) = ticket {
            self.store.durable(t).await?;
        }
        Ok(())
    }

    /// Rank `w.rank`'s part of checkpoint `step`; the report that
    /// completes it writes the manifest (outside the lock), prunes what
    /// `keep_last` lets go, and records the checkpoint on the job.
    /// Whether this report committed it.
    #[allow(clippy::too_many_arguments)]
    pub async fn report_checkpoint(
        &self,
        w: WorkerCall<'_>,
        step: u64,
        error: Option<String>,
        shards: Vec<ShardRecord>,
        manifest: Option<Manifest>,
        stall_s: f64,
        write_s: f64,
    ) -> Result<bool> {
        let (job, pending, layout) = {
            let mut state = self.lock();
            let job = state.jobs.get(w.job).cloned();
            check(job.as_ref(), &w)?;
            let job = job.expect("checked");
            // A stopping attempt still completes the checkpoint its
            // workers save on their way out, a failed one too (ranks
            // SIGTERMed by a preemption leave one by one, the first exit
            // fails the attempt): its next attempt starts only once every
            // process of this one has ended and no commit is in flight,
            // so it resumes from that checkpoint.
            let sup = match state.attempts.get_mut(w.job) {
                Some(sup) if sup.attempt == w.attempt => sup,
                _ => {
                    return Err(EngineError::Precondition(format!(
                        "job {}: attempt {} has no live workers",
                        w.job, w.attempt
                    )));
                }
            };
            // Complete against the world that wrote it, which a resume
            // onto another layout may have changed in the job's record.
            let world = sup.world as u32;
            let layout = sup.base.layout;
            if w.rank >= world {
                return Err(EngineError::Invalid(format!(
                    "rank {} is outside attempt {}'s world of {world}",
                    w.rank, w.attempt
                )));
            }
            let p = sup.checkpoints.entry(step).or_default();
            if !p.reported.insert(w.rank) {
                return Err(EngineError::AlreadyExists(format!(
                    "rank {} already reported the checkpoint of step {step}",
                    w.rank
                )));
            }
            if let Some(e) = error {
                p.failures.push(format!("rank {}: {e}", w.rank));
            }
            p.shards.extend(shards);
            if manifest.is_some() {
                p.manifest = manifest;
            }
            p.stall_s = p.stall_s.max(stall_s);
            p.write_s = p.write_s.max(write_s);
            let complete = if p.reported.len() as u32 == world {
                sup.checkpoints.remove(&step)
            } else {
                None
            };
            if complete.is_some() {
                // A resume waits for this commit to end (it must not list
                // the job's checkpoints while a manifest may still land).
                *state.committing.entry(job.job_id.clone()).or_default() += 1;
            }
            (job, complete, layout)
        };
        let Some(p) = pending else {
            return Ok(false);
        };
        let committed = self
            .commit_checkpoint(&job, w.attempt, step, layout, p)
            .await;
        {
            let mut state = self.lock();
            if let Some(n) = state.committing.get_mut(job.job_id.as_str()) {
                *n -= 1;
                if *n == 0 {
                    state.committing.remove(job.job_id.as_str());
                }
            }
        }
        committed
    }
}
