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

use serde::{Deserialize, Serialize};
use strata_proto::v1 as pb;
use strata_recipe::resume::BranchDecay;
use strata_sweep::spec::{Point, PointKind, expand};

use crate::convert::state_to_pb;
use crate::error::EngineError;
use crate::job::{JobRecord, JobState, now_unix_ms};
use crate::server::Jobs;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SweepState {
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl SweepState {
    pub fn name(self) -> &'static str {
        match self {
            SweepState::Running => "running",
            SweepState::Succeeded => "succeeded",
            SweepState::Failed => "failed",
            SweepState::Cancelled => "cancelled",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SweepRecord {
    pub sweep_id: String,
    pub name: String,
    /// The sweep file, its base recipe inlined.
    pub spec_toml: String,
    pub state: SweepState,
    pub max_concurrent: u32,
    pub submitted_unix_ms: i64,
    pub finished_unix_ms: i64,
    pub points: Vec<PointRecord>,
    /// Why it failed or was cancelled.
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PointRecord {
    pub point: Point,
    pub job_id: Option<String>,
    /// Jobs of earlier tries, oldest first.
    pub earlier_jobs: Vec<String>,
    /// Why the point cannot start; empty while it can.
    pub blocked: String,
}

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
pub fn next_steps(sweep: &SweepRecord, jobs: &BTreeMap<String, JobRecord>) -> Vec<Step> {
    if sweep.state != SweepState::Running {
        return Vec::new();
    }
    let job_of = |p: &PointRecord| p.job_id.as_ref().and_then(|id| jobs.get(id));
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
                                parent: job.job_id.clone(),
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

fn sweep_state_to_pb(s: SweepState) -> pb::SweepState {
    match s {
        SweepState::Running => pb::SweepState::Running,
        SweepState::Succeeded => pb::SweepState::Succeeded,
        SweepState::Failed => pb::SweepState::Failed,
        SweepState::Cancelled => pb::SweepState::Cancelled,
    }
}

/// The sweep as clients see it, its points' jobs' states from `jobs`.
pub fn sweep_to_pb(s: &SweepRecord, jobs: &BTreeMap<String, JobRecord>) -> pb::Sweep {
    let mut out = pb::Sweep {
        sweep_id: s.sweep_id.clone(),
        name: s.name.clone(),
        state: 0,
        max_concurrent: s.max_concurrent,
        spec_toml: s.spec_toml.clone(),
        submitted_unix_ms: s.submitted_unix_ms,
        finished_unix_ms: s.finished_unix_ms,
        points: s
            .points
            .iter()
            .map(|p| {
                let (kind, stable, from_step) = match &p.point.kind {
                    PointKind::Run => ("run", 0, 0),
                    PointKind::Stable => ("stable", 0, 0),
                    PointKind::Branch {
                        stable, from_step, ..
                    } => ("branch", *stable as u32, *from_step),
                };
                let mut pp = pb::SweepPoint {
                    label: p.point.label.clone(),
                    name: p.point.name.clone(),
                    kind: kind.into(),
                    fraction: p.point.fraction,
                    job_id: p.job_id.clone().unwrap_or_default(),
                    job_state: 0,
                    earlier_jobs: p.earlier_jobs.clone(),
                    blocked: p.blocked.clone(),
                    stable_point: stable,
                    from_step,
                };
                if let Some(j) = p.job_id.as_ref().and_then(|id| jobs.get(id)) {
                    pp.set_job_state(state_to_pb(j.state));
                }
                pp
            })
            .collect(),
        reason: s.reason.clone(),
    };
    out.set_state(sweep_state_to_pb(s.state));
    out
}

type Result<T, E = EngineError> = std::result::Result<T, E>;

impl Jobs {
    fn sweep(&self, id: &str) -> Result<SweepRecord> {
        self.0
            .lock()
            .sweeps
            .get(id)
            .cloned()
            .ok_or_else(|| EngineError::NotFound(format!("no sweep {id}")))
    }

    pub(crate) fn sweep_pb(&self, id: &str) -> Result<pb::Sweep> {
        let state = self.0.lock();
        let s = state
            .sweeps
            .get(id)
            .ok_or_else(|| EngineError::NotFound(format!("no sweep {id}")))?;
        Ok(sweep_to_pb(s, &state.jobs))
    }

    pub(crate) fn list_sweeps_pb(&self) -> Vec<pb::Sweep> {
        let state = self.0.lock();
        let mut sweeps: Vec<&SweepRecord> = state.sweeps.values().collect();
        sweeps.sort_by_key(|s| (s.submitted_unix_ms, s.sweep_id.clone()));
        sweeps
            .into_iter()
            .map(|s| sweep_to_pb(s, &state.jobs))
            .collect()
    }

    /// Applies `f` to sweep `id`'s record and commits it.
    fn update_sweep(&self, id: &str, f: impl FnOnce(&mut SweepRecord)) -> Result<SweepRecord> {
        let engine = &self.0;
        let mut state = engine.lock();
        let mut s = state
            .sweeps
            .get(id)
            .cloned()
            .ok_or_else(|| EngineError::NotFound(format!("no sweep {id}")))?;
        f(&mut s);
        engine.store().put_sweep(&s)?;
        state.sweeps.insert(id.to_string(), s.clone());
        Ok(s)
    }

    /// Expands and checks a sweep file (every point as a job would be
    /// checked: recipe, slots, dataset), then records the sweep and starts
    /// what may start.
    pub(crate) async fn submit_sweep(&self, text: &str) -> Result<String> {
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
        let _one = self.0.advancing.lock().await;
        let n = self.0.store().next_job_number()?;
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
        self.0.store().put_sweep(&record)?;
        self.0.lock().sweeps.insert(sweep_id.clone(), record);
        tracing::info!(sweep = %sweep_id, "sweep submitted");
        self.advance_locked().await;
        Ok(sweep_id)
    }

    /// Cancels the sweep's live jobs; it ends CANCELLED.
    pub(crate) async fn cancel_sweep(&self, id: &str, reason: &str) -> Result<()> {
        let _one = self.0.advancing.lock().await;
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
                self.cancel_live(job, &reason)?;
            }
        }
        self.update_sweep(id, |s| {
            s.state = SweepState::Cancelled;
            s.finished_unix_ms = now_unix_ms();
            s.reason = reason.clone();
        })?;
        tracing::info!(sweep = %id, "sweep cancelled");
        Ok(())
    }

    /// Runs again what did not succeed of an ended sweep.
    pub(crate) async fn resubmit_sweep(&self, id: &str) -> Result<()> {
        let _one = self.0.advancing.lock().await;
        let s = self.sweep(id)?;
        if s.state == SweepState::Running {
            return Err(EngineError::Precondition(format!(
                "sweep {id} is running; resubmit it once it has ended (or cancel it)"
            )));
        }
        let again: Vec<usize> = {
            let state = self.0.lock();
            s.points
                .iter()
                .enumerate()
                .filter(|(_, p)| match &p.job_id {
                    None => true,
                    Some(j) => state
                        .jobs
                        .get(j)
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
        })?;
        tracing::info!(sweep = %id, points = again.len(), "sweep resubmitted");
        self.advance_locked().await;
        Ok(())
    }

    /// Advances every running sweep; one advancer at a time.
    pub(crate) async fn advance_sweeps(&self) {
        let _one = self.0.advancing.lock().await;
        self.advance_locked().await;
    }

    async fn advance_locked(&self) {
        if self.0.is_stopping() {
            return;
        }
        let work: Vec<(String, Vec<Step>)> = {
            let state = self.0.lock();
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
                self.update_sweep(id, |s| {
                    s.state = state;
                    s.finished_unix_ms = now_unix_ms();
                    s.reason = reason;
                })?;
                return Ok(());
            }
            Step::Block { point, why } => {
                tracing::warn!(sweep = %id, point, reason = %why, "sweep point cannot start");
                return self
                    .update_sweep(id, |s| s.points[point].blocked = why)
                    .map(|_| ());
            }
            Step::Submit { point } => {
                let p = &s.points[point].point;
                let queued = async {
                    let recipe = self.validate(&p.recipe, &p.name).await?;
                    self.queue_new(&recipe, p.recipe.clone(), None)
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
                let req = pb::BranchJobRequest {
                    parent_id: parent,
                    from_step,
                    decay_tokens: decay.tokens,
                    decay_shape: decay.shape.clone().unwrap_or_default(),
                    final_lr_fraction: decay.final_lr_fraction,
                    name: p.name.clone(),
                };
                (point, self.branch(&req).await)
            }
        };
        match started {
            (point, Ok(job)) => {
                tracing::info!(sweep = %id, point, job = %job, "sweep point started");
                self.update_sweep(id, |s| s.points[point].job_id = Some(job))?;
            }
            // The store failing is the coordinator's problem, not the point's.
            (_, Err(e @ EngineError::Store(_))) => return Err(e),
            (point, Err(e)) => {
                tracing::warn!(sweep = %id, point, error = %e, "sweep point refused");
                self.update_sweep(id, |s| s.points[point].blocked = format!("refused: {e}"))?;
            }
        }
        Ok(())
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::CheckpointRecord;

    fn job(id: &str, state: JobState, checkpoints: &[u64]) -> JobRecord {
        JobRecord {
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
        }
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
        jobs.insert("a".into(), job("a", JobState::Running, &[]));
        jobs.insert("b".into(), job("b", JobState::Succeeded, &[]));
        assert_eq!(next_steps(&s, &jobs), [Step::Submit { point: 2 }]);
        s.points[2].job_id = Some("c".into());
        s.points[3].job_id = Some("d".into());
        jobs.insert("c".into(), job("c", JobState::Failed, &[]));
        jobs.insert("d".into(), job("d", JobState::Queued, &[]));
        assert_eq!(next_steps(&s, &jobs), []);
        jobs.insert("a".into(), job("a", JobState::Succeeded, &[]));
        jobs.insert("d".into(), job("d", JobState::Succeeded, &[]));
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
        jobs.insert("st".into(), job("st", JobState::Running, &[20]));
        assert_eq!(next_steps(&s, &jobs), []);
        jobs.insert("st".into(), job("st", JobState::Running, &[20, 40]));
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
        jobs.insert("b1".into(), job("b1", JobState::Succeeded, &[]));
        // The stable run fails before step 80: that branch never starts,
        // and the sweep ends failed, saying why.
        jobs.insert("st".into(), job("st", JobState::Failed, &[20, 40]));
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
