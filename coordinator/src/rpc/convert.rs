//! Domain types ↔ wire types: every protobuf conversion of the
//! coordinator, in one place. The engine below knows nothing of them.

use std::sync::Arc;

use strata_proto::v1 as pb;
use tonic::Status;

use crate::engine::{Activity, Assignment, NodeView, RankStep};
use crate::error::EngineError;
use crate::job::{
    AttemptRecord, CheckpointRecord, JobKind, JobRecord, JobState, SampleWeights, SourceRecord,
    StageTimes, StepRecord, StepTimes,
};
use crate::sweep::{SweepRecord, SweepState};
use strata_recipe::{Layout, Rank};
use strata_sweep::spec::PointKind;

impl From<EngineError> for Status {
    fn from(e: EngineError) -> Status {
        match e {
            EngineError::NotFound(m) => Status::not_found(m),
            EngineError::Invalid(m) => Status::invalid_argument(m),
            EngineError::Precondition(m) => Status::failed_precondition(m),
            EngineError::Unauthenticated(m) => Status::unauthenticated(m),
            EngineError::Exhausted(m) => Status::resource_exhausted(m),
            EngineError::AlreadyExists(m) => Status::already_exists(m),
            EngineError::Unavailable(m) => Status::unavailable(m),
            EngineError::Store(e) => {
                tracing::error!(error = %e, "job store failure");
                Status::internal(e.to_string())
            }
        }
    }
}

pub fn state_to_pb(s: JobState) -> pb::JobState {
    match s {
        JobState::Queued => pb::JobState::Queued,
        JobState::Running => pb::JobState::Running,
        JobState::Restarting => pb::JobState::Restarting,
        JobState::Succeeded => pb::JobState::Succeeded,
        JobState::Failed => pb::JobState::Failed,
        JobState::Cancelled => pb::JobState::Cancelled,
    }
}

pub fn kind_to_pb(k: JobKind) -> pb::JobKind {
    match k {
        JobKind::Train => pb::JobKind::Train,
        JobKind::Decompose => pb::JobKind::Decompose,
    }
}

pub fn kind_from_pb(k: i32) -> Option<JobKind> {
    match pb::JobKind::try_from(k).ok()? {
        pb::JobKind::Train => Some(JobKind::Train),
        pb::JobKind::Decompose => Some(JobKind::Decompose),
    }
}

pub fn state_from_pb(s: pb::JobState) -> Option<JobState> {
    match s {
        pb::JobState::Unspecified => None,
        pb::JobState::Queued => Some(JobState::Queued),
        pb::JobState::Running => Some(JobState::Running),
        pb::JobState::Restarting => Some(JobState::Restarting),
        pb::JobState::Succeeded => Some(JobState::Succeeded),
        pb::JobState::Failed => Some(JobState::Failed),
        pb::JobState::Cancelled => Some(JobState::Cancelled),
    }
}

/// A job as clients see it, with what its live attempt waits for.
pub fn job_to_pb(j: &JobRecord, waiting: Option<&str>) -> pb::Job {
    let e = &j.earlier_attempts;
    pb::Job {
        job_id: j.job_id.to_string(),
        name: j.name.clone(),
        state: state_to_pb(j.state) as i32,
        layout: Some(pb::Layout {
            tp: j.layout.tp,
            pp: j.layout.pp,
            dp: j.layout.dp,
            microbatches: j.microbatches,
            world_size: j.layout.world_size(),
        }),
        steps_done: j.steps_done,
        steps_total: j.steps_total,
        tokens_done: j.tokens_done,
        last_loss: j.last_loss,
        failure_reason: j.failure_reason.clone(),
        submitted_unix_ms: j.submitted_unix_ms,
        started_unix_ms: j.started_unix_ms,
        finished_unix_ms: j.finished_unix_ms,
        run_dir: j.run_dir.clone(),
        attempts: j.attempts.iter().map(attempt_to_pb).collect(),
        last_checkpoint_step: j.last_checkpoint(),
        checkpoint_errors: j.checkpoint_errors.clone(),
        parent_job: j.parent.as_ref().map_or(String::new(), |p| p.job.clone()),
        parent_step: j.parent.as_ref().map_or(0, |p| p.step),
        spec_toml: j.spec_toml.clone(),
        waiting: waiting.unwrap_or_default().to_string(),
        earlier_attempts: (!e.is_empty()).then_some(pb::AttemptsSummary {
            attempts: e.attempts,
            failed: e.failed,
            interrupted: e.interrupted,
            steps_lost: e.steps_lost,
            first_started_unix_ms: e.first_started_unix_ms,
        }),
        first_started_unix_ms: j.first_started_unix_ms(),
        blamed_nodes: j
            .blamed_nodes
            .iter()
            .map(|b| pb::BlamedNode {
                node: b.node.clone(),
                attempt: b.attempt,
                reason: b.reason.clone(),
            })
            .collect(),
        kind: kind_to_pb(j.kind) as i32,
    }
}

pub fn attempt_to_pb(a: &AttemptRecord) -> pb::Attempt {
    pb::Attempt {
        number: a.number,
        started_unix_ms: a.started_unix_ms,
        ended_unix_ms: a.ended_unix_ms,
        from_step: a.from_step,
        end_state: a.end_state.map_or(pb::JobState::Unspecified, state_to_pb) as i32,
        cause: a.cause.clone(),
        steps_lost: a.steps_lost,
        last_step: a.last_step,
        interrupted: a.interrupted,
    }
}

pub fn checkpoint_to_pb(c: &CheckpointRecord) -> pb::Checkpoint {
    pb::Checkpoint {
        step: c.step,
        tokens: c.tokens,
        bytes: c.bytes,
        attempt: c.attempt,
        written_unix_ms: c.written_unix_ms,
        stall_s: c.stall_s,
        write_s: c.write_s,
        url: c.url.clone(),
    }
}

pub fn step_to_pb(s: &StepRecord) -> pb::StepMetrics {
    pb::StepMetrics {
        step: s.step,
        tokens: s.tokens,
        loss: s.loss,
        lr: s.lr,
        tokens_per_s: s.tokens_per_s,
        grad_norm: s.grad_norm,
        seq_log2: s.seq_log2,
        times: Some(pb::StepTimes {
            data_s: s.times.data_s,
            forward_s: s.times.forward_s,
            backward_s: s.times.backward_s,
            all_reduce_s: s.times.all_reduce_s,
            optimizer_s: s.times.optimizer_s,
        }),
        stages: s
            .stages
            .iter()
            .map(|t| pb::StageMetrics {
                stage: t.stage,
                forward_s: t.forward_s,
                backward_s: t.backward_s,
                wait_s: t.wait_s,
                pipeline_s: t.pipeline_s,
                bubble: t.bubble,
                tp_comm_s: t.tp_comm_s,
            })
            .collect(),
        bubble_theory: s.bubble_theory,
        eval_loss: s.eval_loss,
        peak_flops: s.peak_flops,
        sources: s
            .sources
            .iter()
            .map(|x| pb::SourceMetrics {
                name: x.name.clone(),
                tokens: x.tokens,
                loss: x.loss,
                eval_loss: x.eval_loss,
            })
            .collect(),
        weights: s.weights.map(|w| pb::SampleWeights {
            std: w.std,
            min: w.min,
            max: w.max,
            effective: w.effective,
        }),
    }
}

pub fn step_from_pb(s: &pb::StepMetrics) -> StepRecord {
    let t = s.times.unwrap_or_default();
    StepRecord {
        step: s.step,
        tokens: s.tokens,
        loss: s.loss,
        lr: s.lr,
        tokens_per_s: s.tokens_per_s,
        grad_norm: s.grad_norm,
        seq_log2: s.seq_log2,
        times: StepTimes {
            data_s: t.data_s,
            forward_s: t.forward_s,
            backward_s: t.backward_s,
            all_reduce_s: t.all_reduce_s,
            optimizer_s: t.optimizer_s,
        },
        stages: s
            .stages
            .iter()
            .map(|t| StageTimes {
                stage: t.stage,
                forward_s: t.forward_s,
                backward_s: t.backward_s,
                wait_s: t.wait_s,
                pipeline_s: t.pipeline_s,
                bubble: t.bubble,
                tp_comm_s: t.tp_comm_s,
            })
            .collect(),
        bubble_theory: s.bubble_theory,
        eval_loss: s.eval_loss,
        peak_flops: s.peak_flops,
        sources: s
            .sources
            .iter()
            .map(|x| SourceRecord {
                name: x.name.clone(),
                tokens: x.tokens,
                loss: x.loss,
                eval_loss: x.eval_loss,
            })
            .collect(),
        weights: s.weights.map(|w| SampleWeights {
            std: w.std,
            min: w.min,
            max: w.max,
            effective: w.effective,
        }),
    }
}

pub fn layout_to_pb(l: Layout, microbatches: u32) -> pb::Layout {
    pb::Layout {
        tp: l.tp,
        pp: l.pp,
        dp: l.dp,
        microbatches,
        world_size: l.world_size(),
    }
}

/// Rank `a.rank`'s assignment: its coordinates and its three groups'
/// members, from the attempt's one address table.
pub fn assignment_to_pb(a: &Assignment) -> pb::Assignment {
    let b = &a.base;
    let layout = b.layout;
    let rank = Rank(a.rank);
    let coords = layout.coords(rank).expect("a checked rank");
    let group = |kind: pb::GroupKind, ranks: Vec<Rank>| pb::Group {
        kind: kind as i32,
        members: ranks
            .into_iter()
            .map(|r| pb::Member {
                rank: r.0,
                collective_addr: a.addrs[r.0 as usize].clone(),
            })
            .collect(),
        nccl_unique_id: Vec::new(),
    };
    pb::Assignment {
        job_id: b.job_id.to_string(),
        rank: a.rank,
        coords: Some(pb::Coords {
            dp: coords.dp,
            pp: coords.pp,
            tp: coords.tp,
        }),
        layout: Some(layout_to_pb(layout, b.microbatches)),
        spec_toml: b.spec_toml.to_string(),
        groups: vec![
            group(pb::GroupKind::Tensor, layout.tp_group(rank)),
            group(pb::GroupKind::Pipeline, layout.pp_group(rank)),
            group(pb::GroupKind::Data, layout.dp_group(rank)),
        ],
        run_dir: b.run_dir.clone(),
        attempt: b.attempt,
        resume: b.resume_from.is_some(),
        resume_from_step: b.resume_from.unwrap_or(0),
        resume_from_job: b.resume_from_job.clone().unwrap_or_default(),
        kind: kind_to_pb(b.kind) as i32,
    }
}

pub fn activity_from_pb(a: i32) -> Activity {
    match pb::WorkerActivity::try_from(a) {
        Ok(pb::WorkerActivity::Setup) => Activity::Setup,
        Ok(pb::WorkerActivity::Eval) => Activity::Eval,
        Ok(pb::WorkerActivity::Checkpoint) => Activity::Checkpoint,
        _ => Activity::Step,
    }
}

/// A heartbeat's last step split, once the rank has one.
pub fn rank_step_from_pb(req: &pb::HeartbeatRequest) -> Option<RankStep> {
    req.times.map(|t| RankStep {
        step: req.times_step,
        wall_s: req.step_wall_s,
        data_s: t.data_s,
        forward_s: t.forward_s,
        backward_s: t.backward_s,
        all_reduce_s: t.all_reduce_s,
        optimizer_s: t.optimizer_s,
    })
}

pub fn node_to_pb(n: NodeView) -> pb::NodeInfo {
    pb::NodeInfo {
        name: n.status.name,
        cpus: n.status.cpus,
        gpus: n.status.gpus,
        slots: n.status.slots,
        leased: n.leased,
        state: n.status.state,
        excluded: n.excluded,
    }
}

fn sweep_state_to_pb(s: SweepState) -> pb::SweepState {
    match s {
        SweepState::Running => pb::SweepState::Running,
        SweepState::Succeeded => pb::SweepState::Succeeded,
        SweepState::Failed => pb::SweepState::Failed,
        SweepState::Cancelled => pb::SweepState::Cancelled,
    }
}

/// The sweep as clients see it, each point with its job's state.
pub fn sweep_to_pb(s: &SweepRecord, jobs: &[Option<Arc<JobRecord>>]) -> pb::Sweep {
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
            .zip(jobs)
            .map(|(p, j)| {
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
                if let Some(j) = j {
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
