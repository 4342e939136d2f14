//! Attempts: the queue, placing and launching a job's ranks, ending a
//! job, failing an attempt and restarting it away from the nodes it
//! failed on. Everything here runs under the engine's lock and only
//! decides: the launches and stops it decides are actions.

use std::sync::Arc;
use std::time::Duration;

use strata_cluster::{Inventory, Node, Slot};

use super::actions::{Action, LaunchPlan, RanksHandle, StopKind};
use super::supervisor::{AssignmentBase, Failure, Supervisor};
use super::{Engine, Result, State};
use crate::job::{
    AttemptRecord, BlamedNode, JobId, JobRecord, JobState, now_unix_ms, random_token,
};
use crate::placement::place;
use crate::store::{Ticket, Write};

/// How long the workers of a failed attempt get between SIGTERM and
/// SIGKILL.
pub(crate) const FAILED_GRACE: Duration = Duration::from_secs(2);

/// Closes `job`'s current attempt: how it ended, why, and the steps done
/// past its last complete checkpoint.
pub(crate) fn close_attempt(job: &mut JobRecord, end: JobState, cause: &str, interrupted: bool) {
    let last_checkpoint = job.last_checkpoint().unwrap_or(0);
    let steps_done = job.steps_done;
    if let Some(a) = job.attempts.last_mut()
        && a.end_state.is_none()
    {
        a.end_state = Some(end);
        a.cause = cause.to_string();
        a.ended_unix_ms = now_unix_ms();
        a.last_step = steps_done;
        a.steps_lost = steps_done.saturating_sub(last_checkpoint.max(a.from_step));
        a.interrupted = interrupted;
    }
}

/// An ended attempt whose workers were still finishing (a cancel's grace
/// period) reported more steps or a checkpoint: its record follows.
pub(crate) fn settle_attempt(job: &mut JobRecord, attempt: u32) {
    let last_checkpoint = job.last_checkpoint().unwrap_or(0);
    let steps_done = job.steps_done;
    if let Some(a) = job.attempts.last_mut()
        && a.number == attempt
        && a.end_state.is_some()
    {
        a.last_step = steps_done;
        a.steps_lost = steps_done.saturating_sub(last_checkpoint.max(a.from_step));
    }
}

/// Readies `job` for its next attempt: from the latest checkpoint when it
/// has one, otherwise from scratch, forgetting the steps after that point.
/// The step whose later steps the store must forget. Called when that
/// attempt is launched, once every process of the last one has ended and
/// no commit of its checkpoints is in flight: a checkpoint its ranks
/// completed on their way out is where the next one resumes, and the
/// steps up to it stay.
pub(crate) fn prepare_restart(job: &mut JobRecord) -> u64 {
    let from = job.restart_step();
    job.state = JobState::Restarting;
    // The latest own checkpoint the record holds, or a branch's parent's
    // step: named, not "the newest in storage". A checkpoint whose commit
    // reached storage but not the record (the coordinator killed in
    // between) is newer than the history kept, and resuming from it would
    // leave the steps before it out of the history for good.
    job.resume_from = from;
    let step = from.unwrap_or(0);
    let tps = job.tokens_done.checked_div(job.steps_done).unwrap_or(0);
    job.steps_done = step;
    job.tokens_done = step * tps;
    step
}

/// The inventory `job` is placed on: without its blamed nodes while it
/// fits there, the whole inventory otherwise (a job that can only run on
/// a node it failed on runs there rather than not at all).
pub(crate) fn inventory_for(inventory: &Inventory, job: &JobRecord) -> Inventory {
    if job.blamed_nodes.is_empty() {
        return inventory.clone();
    }
    let kept: Vec<Node> = inventory
        .nodes()
        .iter()
        .filter(|n| !job.blamed_nodes.iter().any(|b| b.node == n.name))
        .cloned()
        .collect();
    let tp = job.layout.tp;
    let fit: u32 = kept.iter().map(|n| n.slots / tp * tp).sum();
    match Inventory::new(kept) {
        Ok(inv) if fit >= job.layout.world_size() => inv,
        _ => inventory.clone(),
    }
}

impl Engine {
    /// Starts waiting jobs in queue order while they fit; a restarting job
    /// waits for its previous attempt's processes to be gone.
    pub(crate) fn schedule(&self, state: &mut State) {
        if self.is_stopping() || state.queue.is_empty() {
            return;
        }
        let inventory = self.inventory();
        while let Some(id) = state.queue.first().cloned() {
            let Some(job) = state.jobs.get(&id).cloned() else {
                state.queue.remove(0);
                continue;
            };
            if !matches!(job.state, JobState::Queued | JobState::Restarting) {
                state.queue.remove(0);
                continue;
            }
            // The last attempt's processes, or a commit of its checkpoint,
            // still going: the next one would not see where it ended.
            if state.attempts.contains_key(&id) || state.committing.contains_key(&id) {
                break;
            }
            let inv = inventory_for(&inventory, &job);
            if job.layout.world_size() > state.leased.free_on(&inv) {
                break;
            }
            state.queue.remove(0);
            if let Err(e) = self.launch(state, &job, &inv) {
                tracing::error!(job = %id, error = %e, "job store failure while launching");
            }
        }
    }

    /// Places `job`'s ranks and decides its next attempt; the ranks are
    /// started by an action, outside the lock.
    fn launch(&self, state: &mut State, job: &Arc<JobRecord>, inventory: &Inventory) -> Result<()> {
        let world = job.layout.world_size();
        let attempt = job.attempt() + 1;
        let span = tracing::info_span!(
            "launch",
            job = %job.job_id,
            attempt,
            world,
            layout = %job.layout
        );
        let placed = span.in_scope(|| {
            tracing::info_span!("place")
                .in_scope(|| place(job.layout, inventory, state.leased.slots()))
        });
        let token = if job.worker_token.is_empty() {
            random_token().map_err(|e| format!("no random source for the job's worker token: {e}"))
        } else {
            Ok(String::new())
        };
        let (placement, token) = match (placed.map_err(|e| e.to_string()), token) {
            (Ok(p), Ok(t)) => (p, t),
            (Err(why), _) | (_, Err(why)) => {
                tracing::error!(job = %job.job_id, reason = %why, "job failed to start");
                let _ = self.update(state, job.job_id.as_str(), |job| {
                    close_attempt(job, JobState::Failed, &why, false);
                    job.state = JobState::Failed;
                    job.failure_reason = why.clone();
                    job.finished_unix_ms = now_unix_ms();
                })?;
                return Ok(());
            }
        };
        let slots: Vec<Slot> = placement.assignments.into_iter().map(|a| a.slot).collect();
        let mut record = (**job).clone();
        if record.state == JobState::Restarting {
            let step = prepare_restart(&mut record);
            // Queued behind the steps it cuts: none lands after it.
            let _ = self
                .store
                .submit(Write::Truncate(record.job_id.clone(), step))?;
        }
        // A new job, or one whose secret the last coordinator took with it
        // (the store keeps only its digest).
        if record.worker_token.is_empty() {
            record.set_worker_token(token);
        }
        record.state = JobState::Running;
        record.started_unix_ms = now_unix_ms();
        record.push_attempt(AttemptRecord {
            number: attempt,
            started_unix_ms: record.started_unix_ms,
            ended_unix_ms: 0,
            from_step: if record.resume_from.is_some() {
                record.steps_done
            } else {
                0
            },
            end_state: None,
            cause: String::new(),
            steps_lost: 0,
            last_step: record.steps_done,
            interrupted: false,
        });
        let base = Arc::new(AssignmentBase {
            job_id: record.job_id.clone(),
            layout: record.layout,
            microbatches: record.microbatches,
            spec_toml: Arc::from(record.spec_toml.as_str()),
            run_dir: record.run_dir.clone(),
            attempt,
            resume_from: record.resume_from,
            // A branch without checkpoints of its own starts from its
            // parent's.
            resume_from_job: match &record.parent {
                Some(p) if record.checkpoints.is_empty() => Some(p.job.clone()),
                _ => None,
            },
            kind: record.kind,
        });
        let handle = Arc::new(RanksHandle::launching());
        let hang = Duration::from_secs(record.fault().hang_timeout_s);
        let sup = Supervisor::new(base, slots.clone(), handle.clone(), record.steps_done, hang);
        state.leased.add(&slots);
        state.live_ranks += slots.len();
        state.attempts.insert(record.job_id.clone(), sup);
        // Workers on this machine share its cores: each CPU backend gets
        // its share of threads (oversubscribed, two workers on two cores
        // trained 12% slower), unless the operator chose a count.
        let threads = (self.launcher().shares_this_machine()
            && std::env::var_os("RAYON_NUM_THREADS").is_none()
            && !self
                .cfg
                .worker_env
                .iter()
                .any(|(k, _)| k == "RAYON_NUM_THREADS"))
        .then(|| std::thread::available_parallelism().map_or(1, |n| n.get()) / slots.len().max(1));
        let record = Arc::new(record);
        let plan = LaunchPlan {
            job: record.clone(),
            attempt,
            slots,
            worker_url: self.worker_url(),
            worker_program: self.cfg.worker_program.clone(),
            worker_args: self.cfg.worker_args.clone(),
            worker_env: self.cfg.worker_env.clone(),
            threads,
            // The workers' spans join this launch's trace.
            traceparent: traceparent(&span),
        };
        let recorded = self.save(state, (*record).clone())?;
        self.act(Action::Launch {
            plan: Box::new(plan),
            handle,
            span,
            recorded,
            before: job.clone(),
        });
        Ok(())
    }

    /// The write recording attempt `attempt` of `job` failed (a full disk,
    /// say): nothing was started. The attempt is undone (its slots freed,
    /// the job's record as it was) and the job waits in the queue's front
    /// for the next try; a stop asked for meanwhile stands.
    pub(crate) fn unrecorded(&self, before: Arc<JobRecord>, attempt: u32, why: &str) {
        let mut state = self.lock();
        let id = before.job_id.clone();
        let current = state
            .attempts
            .get(&id)
            .is_some_and(|s| s.attempt == attempt);
        if !current {
            return;
        }
        tracing::error!(job = %id, attempt, error = %why, "the attempt could not be recorded; not started, the job waits for the store");
        self.release(&mut state, &id);
        let untouched = state
            .jobs
            .get(&id)
            .is_some_and(|j| j.state == JobState::Running && j.attempt() == attempt);
        if untouched {
            if let Err(e) = self.save(&mut state, (*before).clone()) {
                tracing::error!(job = %id, error = %e, "job store failure");
            }
            if !state.queue.contains(&id) {
                state.queue.insert(0, id);
            }
        }
    }

    /// The launcher has started attempt `attempt` of `job` (or failed
    /// to): its clocks start; a failure fails the job, naming why.
    pub(crate) fn launched(&self, job: &JobId, attempt: u32, result: Result<(), String>) {
        let mut state = self.lock();
        let current = state
            .attempts
            .get(job)
            .is_some_and(|s| s.attempt == attempt);
        if !current {
            return;
        }
        match result {
            Ok(()) => {
                if let Some(sup) = state.attempts.get_mut(job) {
                    sup.launched = true;
                    sup.waiting = None;
                    // Its clocks start now.
                    sup.check(self.cfg.heartbeat_timeout);
                }
            }
            Err(why) => {
                tracing::error!(job = %job, reason = %why, "job failed to start");
                if let Some(sup) = state.attempts.get_mut(job) {
                    sup.launched = true;
                    sup.stop(Duration::ZERO);
                }
                let r = self.update(&mut state, job.as_str(), |j| {
                    if j.state.is_final() || j.attempt() != attempt {
                        return;
                    }
                    close_attempt(j, JobState::Failed, &why, false);
                    j.state = JobState::Failed;
                    j.failure_reason = why.clone();
                    j.finished_unix_ms = now_unix_ms();
                    j.resume_from = None;
                });
                if let Err(e) = r {
                    tracing::error!(job = %job, error = %e, "job store failure");
                }
                state.queue.retain(|q| q != job);
                self.schedule(&mut state);
            }
        }
    }

    /// Asks attempt `sup`'s processes to stop within `grace` (the stop is
    /// an action).
    fn stop_attempt(&self, job: &JobId, sup: &mut Supervisor, grace: Duration) {
        if sup.stop(grace) {
            self.act(Action::Stop {
                job: job.clone(),
                handle: sup.handle.clone(),
                kind: StopKind::Terminate,
            });
        }
    }

    /// Ends a job for good (succeeded, cancelled, or failed with no
    /// restart left): closes its attempt, asks its workers to stop within
    /// `grace`, records why, and starts whatever now fits. The ticket of
    /// the record's write, when there was one. The workers of a job that
    /// succeeded are not signalled: every rank said it was done and is
    /// leaving by itself (a SIGTERM, or Slurm's `scancel`, would race its
    /// exit and its launcher's record of it); one still there at `grace`'s
    /// end is killed.
    pub(crate) fn end(
        &self,
        state: &mut State,
        id: &str,
        to: JobState,
        reason: String,
        grace: Duration,
    ) -> Result<Option<Ticket>> {
        let Some(job) = state.jobs.get(id) else {
            return Ok(None);
        };
        if !job.state.can_become(to) {
            return Ok(None);
        }
        let job_id = job.job_id.clone();
        if let Some(mut sup) = state.attempts.remove(id) {
            if sup.is_running() {
                state.live_ranks = state.live_ranks.saturating_sub(sup.world);
            }
            if to == JobState::Succeeded {
                sup.stop(grace);
            } else {
                self.stop_attempt(&job_id, &mut sup, grace);
            }
            state.attempts.insert(job_id.clone(), sup);
        }
        state.queue.retain(|q| q != id);
        self.tensorboard.ended(id);
        match to {
            JobState::Failed => tracing::error!(job = %id, reason = %reason, "job failed"),
            _ => tracing::info!(job = %id, state = to.name(), reason = %reason, "job ended"),
        }
        let t = self.update(state, id, |job| {
            close_attempt(job, to, &reason, false);
            job.state = to;
            job.finished_unix_ms = now_unix_ms();
            job.failure_reason = reason;
            job.resume_from = None;
        })?;
        self.schedule(state);
        Ok(Some(t))
    }

    /// Attempt `attempt` of job `id` cannot go on because of `failure`:
    /// its workers are stopped, the nodes to blame are kept out of its
    /// next placements, and the job restarts from its latest checkpoint
    /// unless it has failed `[fault] max_restarts` times within
    /// `restart_window_s` already; then it fails, naming every attempt's
    /// cause.
    pub(crate) fn fail_attempt(
        &self,
        state: &mut State,
        id: &str,
        attempt: u32,
        failure: Failure,
    ) -> Result<()> {
        let Some(job) = state.jobs.get(id).cloned() else {
            return Ok(());
        };
        if job.state != JobState::Running || job.attempt() != attempt {
            return Ok(());
        }
        let cause = failure.cause.clone();
        let fault = job.fault();
        let now = now_unix_ms();
        let window_start = now - (fault.restart_window_s as i64).saturating_mul(1000);
        // A time limit or a preemption is the cluster's schedule, not a
        // failure: it does not count toward the restart limit.
        let interruption = failure.interruption
            || state
                .attempts
                .get(id)
                .is_some_and(|s| s.attempt == attempt && s.interruption);
        // Failures in the window, this one included.
        let failures = usize::from(!interruption)
            + job
                .attempts
                .iter()
                .filter(|a| {
                    a.end_state == Some(JobState::Failed)
                        && !a.interrupted
                        && a.ended_unix_ms >= window_start
                })
                .count();
        if !interruption && failures > fault.max_restarts as usize {
            let mut causes: Vec<String> = job
                .attempts
                .iter()
                .filter(|a| a.end_state.is_some())
                .map(|a| format!("attempt {}: {}", a.number, a.cause))
                .collect();
            causes.push(format!("attempt {attempt}: {cause}"));
            let reason = if fault.max_restarts == 0 {
                cause
            } else {
                format!(
                    "{} attempts failed within {} s ([fault] max_restarts = {}):\n{}",
                    failures,
                    fault.restart_window_s,
                    fault.max_restarts,
                    causes.join("\n")
                )
            };
            self.end(state, id, JobState::Failed, reason, FAILED_GRACE)?;
            return Ok(());
        }
        tracing::warn!(job = %id, attempt, reason = %cause, restart = failures, of = fault.max_restarts, "attempt failed; restarting");
        // The nodes to blame: those of the ranks at fault, when they are
        // not the whole attempt (then the cause is elsewhere).
        let mut blamed: Vec<String> = Vec::new();
        let job_id = job.job_id.clone();
        if let Some(mut sup) = state.attempts.remove(id) {
            if !failure.culprits.is_empty() && failure.culprits.len() < sup.world {
                for &r in &failure.culprits {
                    let node = sup.node_of(r as usize).to_string();
                    if !blamed.contains(&node) {
                        blamed.push(node);
                    }
                }
                // Many nodes at fault at once say more of the cluster (a
                // switch, a preemption) or of the job than of the nodes:
                // blame a few at most.
                if blamed.len() > (sup.nodes.len() / 8).max(2) || blamed.len() == sup.nodes.len() {
                    blamed.clear();
                }
            }
            if sup.is_running() {
                state.live_ranks = state.live_ranks.saturating_sub(sup.world);
            }
            // A failed attempt's group is broken: nothing is left to save,
            // and a stopped or hung rank never answers SIGTERM.
            self.stop_attempt(&job_id, &mut sup, FAILED_GRACE);
            state.attempts.insert(job_id.clone(), sup);
        }
        let first_line = cause.lines().next().unwrap_or("").to_string();
        let mut job = (*job).clone();
        for node in blamed {
            if !job.blamed_nodes.iter().any(|b| b.node == node) {
                tracing::warn!(job = %id, node = %node, attempt, "node blamed: kept out of the job's next placements while it fits without it");
                job.blamed_nodes.push(BlamedNode {
                    node,
                    attempt,
                    reason: first_line.clone(),
                });
            }
        }
        close_attempt(&mut job, JobState::Failed, &cause, interruption);
        job.failure_reason = if interruption {
            format!("attempt {attempt} was interrupted (not counted as a failure): {cause}")
        } else {
            format!(
                "attempt {attempt} failed ({} of {} restarts): {cause}",
                failures, fault.max_restarts
            )
        };
        // Rewound when the next attempt launches (`prepare_restart`): the
        // ranks still leaving may complete a later checkpoint first.
        job.state = JobState::Restarting;
        let _ = self.save(state, job)?;
        state.last_steps.remove(id);
        state.queue.retain(|q| q != id);
        state.queue.insert(0, job_id);
        Ok(())
    }

    /// Forgets a stopped attempt whose processes are all gone: its slots
    /// are free again.
    pub(crate) fn release(&self, state: &mut State, id: &JobId) {
        if let Some(sup) = state.attempts.remove(id) {
            if sup.is_running() {
                state.live_ranks = state.live_ranks.saturating_sub(sup.world);
            }
            state.leased.remove(&sup.slots);
            tracing::debug!(job = %id, attempt = sup.attempt, "every worker of the attempt has ended");
        }
    }
}

/// `span`'s W3C trace context (`traceparent`), when traces are exported
/// (an OpenTelemetry layer and propagator are installed).
fn traceparent(span: &tracing::Span) -> Option<String> {
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let cx = span.context();
    let mut carrier = std::collections::HashMap::new();
    opentelemetry::global::get_text_map_propagator(|p| p.inject_context(&cx, &mut carrier));
    carrier.remove("traceparent")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::CheckpointRecord;

    fn checkpoint(step: u64) -> CheckpointRecord {
        CheckpointRecord {
            step,
            tokens: step * 100,
            bytes: 1,
            attempt: 1,
            written_unix_ms: 1,
            stall_s: 0.0,
            write_s: 0.0,
            url: format!("file:///ck/step-{step}"),
        }
    }

    /// The next attempt is told the step of the record's latest checkpoint,
    /// not "the newest in storage": a checkpoint whose commit reached
    /// storage but not the record (a coordinator killed in between) lies
    /// past the history kept, and resuming from it would leave a hole in
    /// that history (the likely cause of a chaos run that kept 92 of 96
    /// steps).
    #[test]
    fn a_restart_names_the_checkpoint_the_record_holds() {
        let mut job = JobRecord::for_test("j");
        job.checkpoints = vec![checkpoint(4), checkpoint(8)];
        job.steps_done = 10;
        job.tokens_done = 1000;
        assert_eq!(prepare_restart(&mut job), 8);
        assert_eq!(job.resume_from, Some(8));
        assert_eq!((job.steps_done, job.tokens_done), (8, 800));

        let mut fresh = JobRecord::for_test("k");
        fresh.steps_done = 3;
        assert_eq!(prepare_restart(&mut fresh), 0);
        assert_eq!(fresh.resume_from, None);
    }
}
