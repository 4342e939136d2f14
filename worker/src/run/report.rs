//! The worker's side of the control protocol, and the only place in the
//! worker that connects to the coordinator or builds or reads protobuf: the rest of `run` speaks in
//! the domain's terms (an [`Assignment`], a [`StepReport`], a
//! [`Beat`]) and [`Reporter`] converts them, here and nowhere else.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use strata_proto::auth::{Bearer, WithBearer};
use strata_proto::checkpoint::{manifest_to_pb, shard_to_pb};
use strata_proto::v1 as pb;
use strata_proto::v1::control_service_client::ControlServiceClient;
use strata_recipe::Coords;
use tonic::transport::Channel;

use super::{WorkerArgs, WorkerError};
use crate::checkpoint;
use crate::collective::Member;
use crate::train::StageStats;

type Client = ControlServiceClient<WithBearer<Channel>>;

fn rpc(call: &'static str) -> impl FnOnce(tonic::Status) -> WorkerError {
    move |status| WorkerError::Rpc {
        call,
        status: Box::new(status),
    }
}

/// What a rank is busy with, for the coordinator's hang clock (a step may
/// be judged hung sooner than an evaluation or a checkpoint save).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Activity {
    Setup,
    Step,
    Eval,
    Checkpoint,
}

/// An [`Activity`] shared between the training thread and the heartbeats.
#[derive(Debug)]
pub struct ActivityCell(AtomicU8);

impl ActivityCell {
    pub fn new(a: Activity) -> ActivityCell {
        ActivityCell(AtomicU8::new(a as u8))
    }

    pub fn set(&self, a: Activity) {
        self.0.store(a as u8, Ordering::Relaxed);
    }

    pub fn get(&self) -> Activity {
        match self.0.load(Ordering::Relaxed) {
            0 => Activity::Setup,
            1 => Activity::Step,
            2 => Activity::Eval,
            _ => Activity::Checkpoint,
        }
    }
}

/// Where a step's time went on this rank, in seconds.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StepTimes {
    pub data_s: f64,
    pub forward_s: f64,
    pub backward_s: f64,
    pub all_reduce_s: f64,
    pub optimizer_s: f64,
}

/// This rank's last finished step, for the heartbeats.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LastStep {
    pub step: u64,
    pub times: StepTimes,
    /// The step's wall time (the phases and what they leave out: waiting
    /// for pipeline neighbours).
    pub wall_s: f64,
}

/// One heartbeat's news.
pub struct Beat {
    /// The step the rank last finished.
    pub step: u64,
    pub last: Option<LastStep>,
    pub activity: Activity,
}

/// The coordinator's answer to a heartbeat.
pub struct BeatReply {
    /// Stop, and why (the job was cancelled, another rank failed).
    pub stop: Option<String>,
    /// The period the coordinator asks for from now on (0: keep it).
    pub interval_ms: u32,
}

/// Why a heartbeat failed.
pub enum BeatError {
    /// The coordinator will not have this worker (an ended attempt, a job
    /// it does not know, another token): the attempt is over.
    Refused(String),
    /// The call did not get through.
    Failed(String),
}

/// The members of the three groups the coordinator assigned, each in
/// group order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AssignedGroups {
    pub tensor: Vec<Member>,
    pub pipeline: Vec<Member>,
    pub data: Vec<Member>,
}

/// What the coordinator gives a registered rank to train.
pub struct Assignment {
    /// The recipe, as submitted (a decomposition's description).
    pub spec_toml: String,
    /// The job decomposes a corpus: this rank writes its part.
    pub decompose: bool,
    pub coords: Coords,
    pub groups: AssignedGroups,
    /// Continue from a checkpoint: its step, 0 for the newest.
    pub resume: Option<u64>,
    /// The job whose checkpoint to resume from, when not this one's (a
    /// branch's parent).
    pub resume_job: Option<String>,
}

/// A step as rank 0 reports it.
pub struct StepReport<'a> {
    pub step: u64,
    /// Tokens seen at the end of the step.
    pub tokens: u64,
    pub loss: f64,
    pub lr: f64,
    pub tokens_per_s: f64,
    pub grad_norm: f64,
    /// The bucket (sequence length 2^seq_log2) the step drew from.
    pub seq_log2: u32,
    pub times: StepTimes,
    /// Every pipeline stage's timings, first stage first.
    pub stages: &'a [StageStats],
    pub bubble_theory: f64,
    pub eval_loss: Option<f64>,
    pub peak_flops: Option<f64>,
    /// A mixture's sources in the step; empty for one dataset.
    pub sources: Vec<SourceStep>,
    /// Under loss-based reweighting: how the step's multipliers spread.
    pub weights: Option<strata_recipe::WeightSpread>,
}

/// One source of a mixture in a step.
pub struct SourceStep {
    pub name: String,
    /// The step's tokens from it, every rank's.
    pub tokens: u64,
    /// Its mean loss per token in the step; none without a share.
    pub loss: Option<f64>,
    /// Its held-out loss, on steps that evaluated.
    pub eval_loss: Option<f64>,
}

/// A finished (or failed) checkpoint save of this rank's, as reported.
pub struct CheckpointReport<'a> {
    pub result: &'a checkpoint::SaveResult,
    /// The step's stall: the copy out, plus waiting for the save before.
    pub stall_s: f64,
    /// Rank 0's manifest of the step (without its shards).
    pub manifest: Option<&'a checkpoint::Manifest>,
}

/// This worker's calls to the coordinator, each tagged with its job, rank
/// and attempt.
#[derive(Clone)]
pub struct Reporter {
    client: Client,
    job: String,
    rank: u32,
    attempt: u32,
}

impl Reporter {
    /// Connects to the coordinator `args` name (over TLS trusting its CA
    /// when it is https), every call carrying the job's token.
    pub async fn connect(args: WorkerArgs) -> Result<Reporter, WorkerError> {
        let token = Bearer::new(Some(&args.token))
            .ok_or_else(|| WorkerError::Setup("the job token is not valid header text".into()))?;
        let endpoint =
            strata_proto::auth::endpoint(&args.coordinator, args.coordinator_ca.as_deref())
                .map_err(|e| WorkerError::Setup(e.to_string()))?;
        let channel = endpoint
            .connect_timeout(Duration::from_secs(10))
            // A coordinator whose machine went away is noticed, and the
            // connection survives idle stretches behind middleboxes.
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(20))
            .keep_alive_while_idle(true)
            .connect()
            .await
            .map_err(|source| WorkerError::Connect {
                url: args.coordinator.clone(),
                source,
            })?;
        Ok(Reporter {
            client: ControlServiceClient::with_interceptor(channel, token),
            job: args.job,
            rank: args.rank,
            attempt: args.attempt,
        })
    }

    /// Registers the rank and its collective address; returns the
    /// heartbeat period the coordinator asks for (0: a second).
    pub async fn register(
        &mut self,
        host: String,
        collective_addr: SocketAddr,
    ) -> Result<u32, WorkerError> {
        let r = self
            .client
            .register(pb::RegisterRequest {
                job_id: self.job.clone(),
                rank: self.rank,
                host,
                pid: std::process::id(),
                collective_addr: collective_addr.to_string(),
                attempt: self.attempt,
            })
            .await
            .map_err(rpc("Register"))?;
        Ok(r.into_inner().heartbeat_interval_ms)
    }

    /// The rank's assignment, once every rank of the attempt has
    /// registered.
    pub async fn assignment(&mut self) -> Result<Assignment, WorkerError> {
        let a = self
            .client
            .get_assignment(pb::GetAssignmentRequest {
                job_id: self.job.clone(),
                rank: self.rank,
                attempt: self.attempt,
            })
            .await
            .map_err(rpc("GetAssignment"))?
            .into_inner();
        let members = |kind: pb::GroupKind| -> Result<Vec<Member>, WorkerError> {
            let g = a
                .groups
                .iter()
                .find(|g| g.kind == kind as i32)
                .ok_or_else(|| {
                    WorkerError::Setup(format!("the assignment has no {kind:?} group"))
                })?;
            Ok(g.members
                .iter()
                .map(|m| Member {
                    rank: m.rank,
                    addr: m.collective_addr.clone(),
                })
                .collect())
        };
        let groups = AssignedGroups {
            tensor: members(pb::GroupKind::Tensor)?,
            pipeline: members(pb::GroupKind::Pipeline)?,
            data: members(pb::GroupKind::Data)?,
        };
        let c = a.coords.unwrap_or_default();
        Ok(Assignment {
            coords: Coords {
                dp: c.dp,
                pp: c.pp,
                tp: c.tp,
            },
            groups,
            resume: a.resume.then_some(a.resume_from_step),
            resume_job: (!a.resume_from_job.is_empty()).then_some(a.resume_from_job),
            spec_toml: a.spec_toml,
            decompose: a.kind == pb::JobKind::Decompose as i32,
        })
    }

    pub async fn heartbeat(&mut self, beat: &Beat) -> Result<BeatReply, BeatError> {
        let req = pb::HeartbeatRequest {
            job_id: self.job.clone(),
            rank: self.rank,
            step: beat.step,
            attempt: self.attempt,
            times: beat.last.map(|l| times_pb(&l.times)),
            times_step: beat.last.map_or(0, |l| l.step),
            step_wall_s: beat.last.map_or(0.0, |l| l.wall_s),
            activity: activity_pb(beat.activity) as i32,
        };
        match self.client.heartbeat(req).await {
            Ok(r) => {
                let r = r.into_inner();
                Ok(BeatReply {
                    stop: r.stop.then_some(r.stop_reason),
                    interval_ms: r.heartbeat_interval_ms,
                })
            }
            Err(e) if refused(&e) => Err(BeatError::Refused(e.message().to_string())),
            Err(e) => Err(BeatError::Failed(e.to_string())),
        }
    }

    /// Rank 0's step metrics; `resumed_from` on an attempt's first report
    /// when it resumed (the checkpoint step it continued from).
    pub async fn step(
        &mut self,
        s: &StepReport<'_>,
        resumed_from: Option<u64>,
    ) -> Result<(), WorkerError> {
        let metrics = pb::StepMetrics {
            step: s.step,
            tokens: s.tokens,
            loss: s.loss,
            lr: s.lr,
            tokens_per_s: s.tokens_per_s,
            grad_norm: s.grad_norm,
            seq_log2: s.seq_log2,
            times: Some(times_pb(&s.times)),
            stages: s
                .stages
                .iter()
                .enumerate()
                .map(|(i, st)| pb::StageMetrics {
                    stage: i as u32,
                    forward_s: st.forward_s,
                    backward_s: st.backward_s,
                    wait_s: st.wait_s,
                    pipeline_s: st.pipeline_s,
                    bubble: st.bubble(),
                    tp_comm_s: st.tp_comm_s,
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
                std: w.std(),
                min: w.min,
                max: w.max,
                effective: w.effective_fraction(),
            }),
        };
        self.client
            .report_metrics(pb::ReportMetricsRequest {
                job_id: self.job.clone(),
                rank: self.rank,
                steps: vec![metrics],
                attempt: self.attempt,
                resumed_from_step: resumed_from,
            })
            .await
            .map(|_| ())
            .map_err(rpc("ReportMetrics"))
    }

    /// A checkpoint save of this rank's, written or failed.
    pub async fn checkpoint(&mut self, c: CheckpointReport<'_>) -> Result<(), WorkerError> {
        let step = match c.result {
            Ok(s) => s.step,
            Err(f) => f.step,
        };
        let mut req = pb::ReportCheckpointRequest {
            job_id: self.job.clone(),
            rank: self.rank,
            attempt: self.attempt,
            step,
            ok: c.result.is_ok(),
            stall_s: c.stall_s,
            manifest: c.manifest.map(manifest_to_pb),
            ..Default::default()
        };
        match c.result {
            Ok(saved) => {
                req.shards = saved.shards.iter().map(shard_to_pb).collect();
                req.write_s = saved.write_s;
                req.retries = saved.retries;
            }
            Err(f) => req.error = f.to_string(),
        }
        self.client
            .report_checkpoint(req)
            .await
            .map(|_| ())
            .map_err(rpc("ReportCheckpoint"))
    }

    /// The rank's end: finished, or failed with `error`.
    pub async fn done(&mut self, error: Option<String>) -> Result<(), WorkerError> {
        self.client
            .report_done(pb::ReportDoneRequest {
                job_id: self.job.clone(),
                rank: self.rank,
                ok: error.is_none(),
                error: error.unwrap_or_default(),
                attempt: self.attempt,
            })
            .await
            .map(|_| ())
            .map_err(rpc("ReportDone"))
    }
}

/// Whether a failed call means the coordinator will not have this worker
/// (an ended attempt, a job it does not know, another token).
fn refused(e: &tonic::Status) -> bool {
    use tonic::Code::*;
    matches!(e.code(), FailedPrecondition | NotFound | Unauthenticated)
}

fn times_pb(t: &StepTimes) -> pb::StepTimes {
    pb::StepTimes {
        data_s: t.data_s,
        forward_s: t.forward_s,
        backward_s: t.backward_s,
        all_reduce_s: t.all_reduce_s,
        optimizer_s: t.optimizer_s,
    }
}

fn activity_pb(a: Activity) -> pb::WorkerActivity {
    match a {
        Activity::Setup => pb::WorkerActivity::Setup,
        Activity::Step => pb::WorkerActivity::Step,
        Activity::Eval => pb::WorkerActivity::Eval,
        Activity::Checkpoint => pb::WorkerActivity::Checkpoint,
    }
}
