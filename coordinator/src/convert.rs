//! Domain types ↔ wire types, at the service edge only.

use strata_proto::v1 as pb;

use crate::job::{
    AttemptRecord, CheckpointRecord, JobRecord, JobState, StageTimes, StepRecord, StepTimes,
};

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

pub fn job_to_pb(j: &JobRecord) -> pb::Job {
    pb::Job {
        job_id: j.job_id.clone(),
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
        waiting: String::new(),
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
    }
}
