//! Sweeps: a sweep file's points run as jobs. The record keeps each
//! point's job (and the jobs of earlier tries); an advancer, called every
//! half second and after every sweep call, starts what may start — a
//! grid point or stable run while fewer than `max_concurrent` of the
//! sweep's jobs are live, a cooldown branch once its stable run has the
//! checkpoint it branches from — and ends the sweep once every point has
//! ended. What to do is decided under the engine's lock from the records
//! ([`next_steps`], pure); submitting is done outside it, one advancer at
//! a time.

use std::collections::BTreeMap;
use std::sync::Arc;

use strata_recipe::resume::BranchDecay;
use strata_sweep::spec::{PointKind, expand};

use super::jobs::{BranchRequest, slug};
use super::{Engine, Result};
use crate::error::EngineError;
use crate::job::{JobId, JobRecord, JobState, now_unix_ms};
use crate::store::Write;
use crate::sweep::{PointRecord, SweepRecord, SweepState};

/// A sweep and the job of each of its points, as they are now.
pub type SweepView = (Arc<SweepRecord>, Vec<Option<Arc<JobRecord>>>);

/// What the advancer does next for a sweep.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// Submit point `point`'s recipe as a job.
    Submit { point: usize },
    /// Branch point `point` from job `parent`'s checkpoint.
    Branch {
        point: usize,
        parent: String,
        from_step: u64,
        decay: BranchDecay,
    },
    /// Point `point` can never start.
    Block { point: usize, why: String },
    /// Every point has ended.
    Finish { state: SweepState, reason: String },
}

/// The steps that advance `sweep`, given the jobs as they are.
pub fn next_steps(sweep: &SweepRecord, jobs: &BTreeMap<JobId, Arc<JobRecord>>) -> Vec<Step> {
    if sweep.state != SweepState::Running {
        return Vec::new();
    }
    let job_of = |p: &PointRecord| p.job_id.as_deref().and_then(|id| jobs.get(id));
    let live = sweep
        .points
        .iter()
        .filter(|p| job_of(p).is_some_and(|j| !j.state.is_final()))
        .count();
    let mut room = (sweep.max_concurrent as usize).saturating_sub(live);
    let mut steps = Vec::new();
    let mut waiting = 0;
    for (i, p) in sweep.points.iter().enumerate() {
        if p.job_id.is_some() || !p.blocked.is_empty() {
            continue;
        }
        match &p.point.kind {
            PointKind::Run | PointKind::Stable => {
                waiting += 1;
                if room > 0 {
                    room -= 1;
                    steps.push(Step::Submit { point: i });
                }
            }
            PointKind::Branch {
                stable,
                from_step,
                decay,
            } => {
                let Some(sp) = sweep.points.get(*stable) else {
                    steps.push(Step::Block {
                        point: i,
                        why: format!("its stable point {stable} does not exist"),
                    });
                    continue;
                };
                let parent = job_of(sp);
                match parent {
                    None if !sp.blocked.is_empty() => steps.push(Step::Block {
                        point: i,
                        why: format!("its stable run ({}) could not start", sp.point.label),
                    }),
                    None => waiting += 1,
                    Some(job) if job.checkpoints.iter().any(|c| c.step == *from_step) => {
                        waiting += 1;
                        if room > 0 {
                            room -= 1;
                            steps.push(Step::Branch {
                                point: i,
                                parent: job.job_id.to_string(),
                                from_step: *from_step,
                                decay: decay.clone(),
                            });
                        }
                    }
                    Some(job) if job.state.is_final() => steps.push(Step::Block {
                        point: i,
                        why: format!(
                            "its stable run {} ended {} without a checkpoint at step {from_step}",
                            job.job_id,
                            job.state.name()
                        ),
                    }),
                    Some(_) => waiting += 1,
                }
            }
        }
    }
    if live == 0 && waiting == 0 {
        let mut bad = Vec::new();
        for p in &sweep.points {
            match job_of(p) {
                Some(j) if j.state == JobState::Succeeded => {}
                Some(j) => bad.push(format!(
                    "{} ({}): job {} {}",
                    p.point.label,
                    p.point.name,
                    j.job_id,
                    j.state.name()
                )),
                None if !p.blocked.is_empty() => bad.push(format!(
                    "{} ({}): {}",
                    p.point.label, p.point.name, p.blocked
                )),
                None => {}
            }
        }
        // Points blocked in this round are not in the records yet.
        for s in &steps {
            if let Step::Block { point, why } = s {
                let p = &sweep.points[*point];
                bad.push(format!("{} ({}): {why}", p.point.label, p.point.name));
            }
        }
        let (state, reason) = if bad.is_empty() {
            (SweepState::Succeeded, String::new())
        } else {
            (
                SweepState::Failed,
                format!(
                    "{} of {} points did not succeed:\n{}",
                    bad.len(),
                    sweep.points.len(),
                    bad.join("\n")
                ),
            )
        };
        steps.push(Step::Finish { state, reason });
    }
    steps
}

impl Engine {
    fn sweep(&self, id: &str) -> Result<Arc<SweepRecord>> {
        self.lock()
            .sweeps
            .get(id)
            .cloned()
            .ok_or_else(|| EngineError::NotFound(format!("no sweep {id}")))
    }

    /// Sweep `id` with the job of each point, as they are now.
    pub fn sweep_view(&self, id: &str) -> Result<SweepView> {
        let state = self.lock();
        let s = state
            .sweeps
            .get(id)
            .cloned()
            .ok_or_else(|| EngineError::NotFound(format!("no sweep {id}")))?;
        let jobs = s
            .points
            .iter()
            .map(|p| p.job_id.as_deref().and_then(|j| state.jobs.get(j).cloned()))
            .collect();
        Ok((s, jobs))
    }

    /// Every sweep (by submission), with its points' jobs.
    pub fn sweeps_view(&self) -> Vec<SweepView> {
        let state = self.lock();
        let mut sweeps: Vec<&Arc<SweepRecord>> = state.sweeps.values().collect();
        sweeps.sort_by_key(|s| (s.submitted_unix_ms, s.sweep_id.clone()));
        sweeps
            .into_iter()
            .map(|s| {
                let jobs = s
                    .points
                    .iter()
                    .map(|p| p.job_id.as_deref().and_then(|j| state.jobs.get(j).cloned()))
                    .collect();
                (s.clone(), jobs)
            })
            .collect()
    }

    /// Applies `f` to sweep `id`'s record and commits it.
    async fn update_sweep(&self, id: &str, f: impl FnOnce(&mut SweepRecord)) -> Result<()> {
        let t = {
            let mut state = self.lock();
            let s = state
                .sweeps
                .get_mut(id)
                .ok_or_else(|| EngineError::NotFound(format!("no sweep {id}")))?;
            f(Arc::make_mut(s));
            self.store.submit(Write::Sweep(s.clone()))?
        };
        self.store.durable(t).await?;
        Ok(())
    }

    /// Expands and checks a sweep file (every point as a job would be
    /// checked: recipe, slots, dataset), then records the sweep and starts
    /// what may start.
    pub async fn submit_sweep(&self, text: &str) -> Result<String> {
        let plan = expand(text).map_err(|e| EngineError::Invalid(e.to_string()))?;
        let mut problems = Vec::new();
        for (i, p) in plan.points.iter().enumerate() {
            if let Err(e) = self.validate(&p.recipe, &p.name).await {
                problems.push(format!("point {} ({}): {e}", i + 1, p.label));
            }
        }
        if !problems.is_empty() {
            return Err(EngineError::Invalid(format!(
                "invalid sweep ({} of {} points refused):\n  {}",
                problems.len(),
                plan.points.len(),
                problems.join("\n  ")
            )));
        }
        let _one = self.advancing.lock().await;
        let n = {
            let mut state = self.lock();
            let n = state.next_job;
            state.next_job += 1;
            let _ = self.store.submit(Write::NextJob(n + 1))?;
            n
        };
        let sweep_id = format!("{}-sweep-{n}", slug(&plan.name));
        let record = SweepRecord {
            sweep_id: sweep_id.clone(),
            name: plan.name.clone(),
            spec_toml: text.to_string(),
            state: SweepState::Running,
            max_concurrent: plan.max_concurrent,
            submitted_unix_ms: now_unix_ms(),
            finished_unix_ms: 0,
            points: plan
                .points
                .into_iter()
                .map(|point| PointRecord {
                    point,
                    job_id: None,
                    earlier_jobs: Vec::new(),
                    blocked: String::new(),
                })
                .collect(),
            reason: String::new(),
        };
        let record = Arc::new(record);
        let t = {
            let mut state = self.lock();
            state.sweeps.insert(sweep_id.clone(), record.clone());
            self.store.submit(Write::Sweep(record))?
        };
        self.store.durable(t).await?;
        tracing::info!(sweep = %sweep_id, "sweep submitted");
        self.advance_locked().await;
        Ok(sweep_id)
    }

    /// Cancels the sweep's live jobs; it ends CANCELLED.
    pub async fn cancel_sweep(&self, id: &str, reason: &str) -> Result<()> {
        let _one = self.advancing.lock().await;
        let s = self.sweep(id)?;
        if s.state != SweepState::Running {
            return Err(EngineError::Precondition(format!(
                "sweep {id} already {}",
                s.state.name()
            )));
        }
        let reason = if reason.is_empty() {
            format!("sweep {id} cancelled by a client")
        } else {
            format!("sweep {id} cancelled: {reason}")
        };
        for p in &s.points {
            if let Some(job) = &p.job_id {
                self.cancel(job, reason.clone(), true).await?;
            }
        }
        self.update_sweep(id, |s| {
            s.state = SweepState::Cancelled;
            s.finished_unix_ms = now_unix_ms();
            s.reason = reason.clone();
        })
        .await?;
        tracing::info!(sweep = %id, "sweep cancelled");
        Ok(())
    }

    /// Runs again what did not succeed of an ended sweep.
    pub async fn resubmit_sweep(&self, id: &str) -> Result<()> {
        let _one = self.advancing.lock().await;
        let s = self.sweep(id)?;
        if s.state == SweepState::Running {
            return Err(EngineError::Precondition(format!(
                "sweep {id} is running; resubmit it once it has ended (or cancel it)"
            )));
        }
        let again: Vec<usize> = {
            let state = self.lock();
            s.points
                .iter()
                .enumerate()
                .filter(|(_, p)| match &p.job_id {
                    None => true,
                    Some(j) => state
                        .jobs
                        .get(j.as_str())
                        .is_none_or(|j| j.state != JobState::Succeeded),
                })
                .map(|(i, _)| i)
                .collect()
        };
        if again.is_empty() {
            return Err(EngineError::Precondition(format!(
                "sweep {id}: every point succeeded; nothing to resubmit"
            )));
        }
        self.update_sweep(id, |s| {
            for &i in &again {
                let p = &mut s.points[i];
                if let Some(j) = p.job_id.take() {
                    p.earlier_jobs.push(j);
                }
                p.blocked.clear();
            }
            s.state = SweepState::Running;
            s.finished_unix_ms = 0;
            s.reason.clear();
        })
        .await?;
        tracing::info!(sweep = %id, points = again.len(), "sweep resubmitted");
        self.advance_locked().await;
        Ok(())
    }

    /// Advances every running sweep; one advancer at a time.
    pub async fn advance_sweeps(&self) {
        let _one = self.advancing.lock().await;
        self.advance_locked().await;
    }

    async fn advance_locked(&self) {
        if self.is_stopping() {
            return;
        }
        let work: Vec<(String, Vec<Step>)> = {
            let state = self.lock();
            state
                .sweeps
                .values()
                .map(|s| (s.sweep_id.clone(), next_steps(s, &state.jobs)))
                .filter(|(_, steps)| !steps.is_empty())
                .collect()
        };
        for (id, steps) in work {
            for step in steps {
                if let Err(e) = self.take_step(&id, step).await {
                    tracing::error!(sweep = %id, error = %e, "job store failure while advancing a sweep");
                }
            }
        }
    }

    async fn take_step(&self, id: &str, step: Step) -> Result<()> {
        let s = self.sweep(id)?;
        let started = match step {
            Step::Finish { state, reason } => {
                tracing::info!(sweep = %id, state = state.name(), "sweep ended");
                return self
                    .update_sweep(id, |s| {
                        s.state = state;
                        s.finished_unix_ms = now_unix_ms();
                        s.reason = reason;
                    })
                    .await;
            }
            Step::Block { point, why } => {
                tracing::warn!(sweep = %id, point, reason = %why, "sweep point cannot start");
                return self
                    .update_sweep(id, |s| s.points[point].blocked = why)
                    .await;
            }
            Step::Submit { point } => {
                let p = &s.points[point].point;
                let queued = async {
                    let recipe = self.validate(&p.recipe, &p.name).await?;
                    self.queue_new(recipe, p.recipe.clone(), None).await
                };
                (point, queued.await)
            }
            Step::Branch {
                point,
                parent,
                from_step,
                decay,
            } => {
                let p = &s.points[point].point;
                let req = BranchRequest {
                    parent,
                    from_step,
                    decay_tokens: decay.tokens,
                    decay_shape: decay.shape.clone(),
                    final_lr_fraction: decay.final_lr_fraction,
                    name: Some(p.name.clone()),
                    weights: Vec::new(),
                };
                (point, self.branch(&req).await)
            }
        };
        match started {
            (point, Ok(job)) => {
                tracing::info!(sweep = %id, point, job = %job, "sweep point started");
                self.update_sweep(id, |s| s.points[point].job_id = Some(job.to_string()))
                    .await?;
            }
            // The store failing is the coordinator's problem, not the point's.
            (_, Err(e @ EngineError::Store(_))) => return Err(e),
            (point, Err(e)) => {
                tracing::warn!(sweep = %id, point, error = %e, "sweep point refused");
                self.update_sweep(id, |s| s.points[point].blocked = format!("refused: {e}"))
                    .await?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::CheckpointRecord;
    use strata_sweep::spec::Point;

    fn job(id: &str, state: JobState, checkpoints: &[u64]) -> Arc<JobRecord> {
        Arc::new(JobRecord {
            state,
            checkpoints: checkpoints
                .iter()
                .map(|&step| CheckpointRecord {
                    step,
                    tokens: step * 10,
                    bytes: 0,
                    attempt: 1,
                    stall_s: 0.0,
                    write_s: 0.0,
                    url: String::new(),
                    written_unix_ms: 0,
                })
                .collect(),
            ..JobRecord::for_test(id)
        })
    }

    fn point(label: &str, kind: PointKind) -> PointRecord {
        PointRecord {
            point: Point {
                label: label.into(),
                coords: Vec::new(),
                name: label.into(),
                kind,
                fraction: None,
                recipe: String::new(),
            },
            job_id: None,
            earlier_jobs: Vec::new(),
            blocked: String::new(),
        }
    }

    fn branch(stable: usize, from_step: u64) -> PointKind {
        PointKind::Branch {
            stable,
            from_step,
            decay: BranchDecay {
                start_tokens: from_step * 10,
                tokens: 20,
                shape: None,
                final_lr_fraction: None,
            },
        }
    }

    fn sweep(points: Vec<PointRecord>, max: u32) -> SweepRecord {
        SweepRecord {
            sweep_id: "s".into(),
            name: "s".into(),
            spec_toml: String::new(),
            state: SweepState::Running,
            max_concurrent: max,
            submitted_unix_ms: 0,
            finished_unix_ms: 0,
            points,
            reason: String::new(),
        }
    }

    #[test]
    fn a_grid_starts_at_most_max_concurrent_jobs() {
        let mut s = sweep(
            (0..4)
                .map(|i| point(&format!("p{i}"), PointKind::Run))
                .collect(),
            2,
        );
        let mut jobs = BTreeMap::new();
        assert_eq!(
            next_steps(&s, &jobs),
            [Step::Submit { point: 0 }, Step::Submit { point: 1 }]
        );
        s.points[0].job_id = Some("a".into());
        s.points[1].job_id = Some("b".into());
        jobs.insert(JobId::new("a"), job("a", JobState::Running, &[]));
        jobs.insert(JobId::new("b"), job("b", JobState::Succeeded, &[]));
        assert_eq!(next_steps(&s, &jobs), [Step::Submit { point: 2 }]);
        s.points[2].job_id = Some("c".into());
        s.points[3].job_id = Some("d".into());
        jobs.insert(JobId::new("c"), job("c", JobState::Failed, &[]));
        jobs.insert(JobId::new("d"), job("d", JobState::Queued, &[]));
        assert_eq!(next_steps(&s, &jobs), []);
        jobs.insert(JobId::new("a"), job("a", JobState::Succeeded, &[]));
        jobs.insert(JobId::new("d"), job("d", JobState::Succeeded, &[]));
        match &next_steps(&s, &jobs)[..] {
            [Step::Finish { state, reason }] => {
                assert_eq!(*state, SweepState::Failed);
                assert!(reason.starts_with("1 of 4 points"), "{reason}");
                assert!(reason.contains("p2 (p2): job c failed"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_branch_waits_for_its_checkpoint_and_is_blocked_without_it() {
        let mut s = sweep(
            vec![
                point("stable", PointKind::Stable),
                point("b40", branch(0, 40)),
                point("b80", branch(0, 80)),
            ],
            3,
        );
        let mut jobs = BTreeMap::new();
        assert_eq!(next_steps(&s, &jobs), [Step::Submit { point: 0 }]);
        s.points[0].job_id = Some("st".into());
        jobs.insert(JobId::new("st"), job("st", JobState::Running, &[20]));
        assert_eq!(next_steps(&s, &jobs), []);
        jobs.insert(JobId::new("st"), job("st", JobState::Running, &[20, 40]));
        match &next_steps(&s, &jobs)[..] {
            [
                Step::Branch {
                    point: 1,
                    parent,
                    from_step: 40,
                    ..
                },
            ] => assert_eq!(parent, "st"),
            other => panic!("{other:?}"),
        }
        s.points[1].job_id = Some("b1".into());
        jobs.insert(JobId::new("b1"), job("b1", JobState::Succeeded, &[]));
        // The stable run fails before step 80: that branch never starts,
        // and the sweep ends failed, saying why.
        jobs.insert(JobId::new("st"), job("st", JobState::Failed, &[20, 40]));
        let steps = next_steps(&s, &jobs);
        assert_eq!(steps.len(), 2, "{steps:?}");
        assert_eq!(
            steps[0],
            Step::Block {
                point: 2,
                why: "its stable run st ended failed without a checkpoint at step 80".into()
            }
        );
        let Step::Finish { state, reason } = &steps[1] else {
            panic!("{steps:?}")
        };
        assert_eq!(*state, SweepState::Failed);
        assert!(reason.starts_with("2 of 3 points"), "{reason}");
    }

    #[test]
    fn an_ended_sweep_takes_no_steps() {
        let mut s = sweep(vec![point("p", PointKind::Run)], 1);
        s.state = SweepState::Cancelled;
        assert_eq!(next_steps(&s, &BTreeMap::new()), []);
    }
}
