//! The gRPC adapters: `JobService` for clients and `ControlService` for
//! workers, thin over the engine. They check the client token, convert
//! the wire types ([`convert`], the one place that does) and map the
//! engine's errors to statuses.

pub mod convert;
pub mod timing;

use std::ops::ControlFlow;
use std::pin::Pin;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use strata_proto::auth::bearer_token;
use strata_proto::checkpoint::{manifest_from_pb, shard_from_pb};
use strata_proto::v1 as pb;
use strata_proto::v1::control_service_server::ControlService;
use strata_proto::v1::job_service_server::JobService;
use tonic::{Request, Response, Status};

use crate::engine::watch::{WatchItem, WatchOptions};
use crate::engine::{Engine, HeartbeatIn, WorkerCall};
use crate::error::EngineError;
use crate::job::{JobKind, StepRecord};
use crate::store::StoreError;
use convert::{
    activity_from_pb, assignment_to_pb, checkpoint_to_pb, job_to_pb, node_to_pb, rank_step_from_pb,
    state_from_pb, step_from_pb, step_to_pb, sweep_to_pb,
};

/// The client-facing service.
#[derive(Clone)]
pub struct Jobs(pub Arc<Engine>);

/// The worker-facing service.
#[derive(Clone)]
pub struct Control(pub Arc<Engine>);

/// Most steps one `GetMetrics` page holds, and the bytes it stays under
/// (tonic refuses messages over 4 MiB by default).
const PAGE_STEPS: usize = 100_000;
const PAGE_BYTES: usize = 2 << 20;

impl Jobs {
    fn authorize<T>(&self, req: &Request<T>) -> Result<(), Status> {
        if let Some(token) = &self.0.config().client_token
            && !bearer_token(req.metadata())
                .is_some_and(|t| crate::engine::same_token(t.as_bytes(), token.as_bytes()))
        {
            tracing::warn!(peer = ?req.remote_addr(), "client call with a wrong or missing token");
            return Err(EngineError::Unauthenticated(
                "wrong or missing bearer token (see the coordinator's --token-file)".into(),
            )
            .into());
        }
        Ok(())
    }

    fn job_pb(&self, id: &str) -> Result<pb::Job, Status> {
        let v = self.0.job_view(id)?;
        Ok(job_to_pb(&v.job, v.waiting.as_deref()))
    }

    fn sweep_pb(&self, id: &str) -> Result<pb::Sweep, Status> {
        let (s, jobs) = self.0.sweep_view(id)?;
        Ok(sweep_to_pb(&s, &jobs))
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<pb::JobEvent, Status>> + Send>>;

#[tonic::async_trait]
impl JobService for Jobs {
    async fn submit_job(
        &self,
        req: Request<pb::SubmitJobRequest>,
    ) -> Result<Response<pb::SubmitJobResponse>, Status> {
        self.authorize(&req)?;
        let req = req.into_inner();
        let default_name = if req.default_name.is_empty() {
            "job"
        } else {
            &req.default_name
        };
        let id = match convert::kind_from_pb(req.kind) {
            Some(JobKind::Train) => self.0.submit(req.spec_toml, default_name).await?,
            Some(JobKind::Decompose) => self.0.submit_decompose(req.spec_toml).await?,
            None => {
                return Err(Status::invalid_argument(format!(
                    "kind: {} is not a job kind this coordinator knows",
                    req.kind
                )));
            }
        };
        Ok(Response::new(pb::SubmitJobResponse {
            job_id: id.to_string(),
        }))
    }

    async fn branch_job(
        &self,
        req: Request<pb::BranchJobRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        self.authorize(&req)?;
        let r = req.into_inner();
        let id = self
            .0
            .branch(&crate::engine::BranchRequest {
                parent: r.parent_id,
                from_step: r.from_step,
                decay_tokens: r.decay_tokens,
                decay_shape: (!r.decay_shape.is_empty()).then_some(r.decay_shape),
                final_lr_fraction: r.final_lr_fraction,
                name: (!r.name.is_empty()).then_some(r.name),
                weights: r.weights.into_iter().collect(),
            })
            .await?;
        Ok(Response::new(self.job_pb(id.as_str())?))
    }

    async fn submit_sweep(
        &self,
        req: Request<pb::SubmitSweepRequest>,
    ) -> Result<Response<pb::Sweep>, Status> {
        self.authorize(&req)?;
        let id = match self.0.submit_sweep(&req.get_ref().sweep_toml).await {
            Ok(id) => id,
            Err(e) => {
                tracing::info!(reason = %e, "refused a sweep");
                return Err(e.into());
            }
        };
        Ok(Response::new(self.sweep_pb(&id)?))
    }

    async fn get_sweep(
        &self,
        req: Request<pb::GetSweepRequest>,
    ) -> Result<Response<pb::Sweep>, Status> {
        self.authorize(&req)?;
        Ok(Response::new(self.sweep_pb(&req.get_ref().sweep_id)?))
    }

    async fn list_sweeps(
        &self,
        req: Request<pb::ListSweepsRequest>,
    ) -> Result<Response<pb::ListSweepsResponse>, Status> {
        self.authorize(&req)?;
        Ok(Response::new(pb::ListSweepsResponse {
            sweeps: self
                .0
                .sweeps_view()
                .iter()
                .map(|(s, jobs)| sweep_to_pb(s, jobs))
                .collect(),
        }))
    }

    async fn cancel_sweep(
        &self,
        req: Request<pb::CancelSweepRequest>,
    ) -> Result<Response<pb::Sweep>, Status> {
        self.authorize(&req)?;
        let req = req.into_inner();
        self.0.cancel_sweep(&req.sweep_id, &req.reason).await?;
        Ok(Response::new(self.sweep_pb(&req.sweep_id)?))
    }

    async fn resubmit_sweep(
        &self,
        req: Request<pb::ResubmitSweepRequest>,
    ) -> Result<Response<pb::Sweep>, Status> {
        self.authorize(&req)?;
        let id = &req.get_ref().sweep_id;
        self.0.resubmit_sweep(id).await?;
        Ok(Response::new(self.sweep_pb(id)?))
    }

    async fn get_job(&self, req: Request<pb::GetJobRequest>) -> Result<Response<pb::Job>, Status> {
        self.authorize(&req)?;
        Ok(Response::new(self.job_pb(&req.get_ref().job_id)?))
    }

    async fn list_jobs(
        &self,
        req: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        self.authorize(&req)?;
        let wanted: Vec<_> = req.get_ref().states().filter_map(state_from_pb).collect();
        let mut jobs = self.0.snapshot().jobs;
        jobs.retain(|v| wanted.is_empty() || wanted.contains(&v.job.state));
        jobs.sort_by(|a, b| {
            (a.job.submitted_unix_ms, &a.job.job_id).cmp(&(b.job.submitted_unix_ms, &b.job.job_id))
        });
        Ok(Response::new(pb::ListJobsResponse {
            jobs: jobs
                .iter()
                .map(|v| job_to_pb(&v.job, v.waiting.as_deref()))
                .collect(),
        }))
    }

    async fn cancel_job(
        &self,
        req: Request<pb::CancelJobRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        self.authorize(&req)?;
        let req = req.into_inner();
        let reason = if req.reason.is_empty() {
            "cancelled by a client".to_string()
        } else {
            format!("cancelled: {}", req.reason)
        };
        let job = self.0.cancel(&req.job_id, reason, false).await?;
        Ok(Response::new(job_to_pb(&job, None)))
    }

    type WatchJobStream = EventStream;

    async fn watch_job(
        &self,
        req: Request<pb::WatchJobRequest>,
    ) -> Result<Response<EventStream>, Status> {
        self.authorize(&req)?;
        let req = req.into_inner();
        let items = self.0.watch(
            &req.job_id,
            WatchOptions {
                from_step: req.from_step,
                points: None,
            },
        )?;
        use pb::job_event::Event as E;
        let events = items
            .map(|item| {
                let events: Vec<Result<pb::JobEvent, Status>> = match item {
                    Ok(WatchItem::Job(j)) => vec![Ok(pb::JobEvent {
                        event: Some(E::Job(job_to_pb(&j, None))),
                    })],
                    Ok(WatchItem::Steps(steps)) => steps
                        .iter()
                        .map(|s| {
                            Ok(pb::JobEvent {
                                event: Some(E::Step(step_to_pb(s))),
                            })
                        })
                        .collect(),
                    Ok(WatchItem::End(_)) => Vec::new(),
                    Err(e) => vec![Err(e.into())],
                };
                futures::stream::iter(events)
            })
            .flatten();
        // Open watch streams end when the coordinator shuts down.
        let mut closing = self.0.closing();
        let stream = events.take_until(Box::pin(async move {
            let _ = closing.wait_for(|c| *c).await;
        }));
        Ok(Response::new(Box::pin(stream)))
    }

    async fn get_metrics(
        &self,
        req: Request<pb::GetMetricsRequest>,
    ) -> Result<Response<pb::GetMetricsResponse>, Status> {
        self.authorize(&req)?;
        let req = req.into_inner();
        self.0.job(&req.job_id)?;
        let engine = self.0.clone();
        let limit = if req.limit == 0 {
            PAGE_STEPS
        } else {
            (req.limit as usize).min(PAGE_STEPS)
        };
        engine.store().flush().await.map_err(EngineError::from)?;
        // Whole steps up to the page's size, read no further than the
        // first that does not fit: its step starts the next page.
        let page = tokio::task::spawn_blocking(move || {
            let mut page = pb::GetMetricsResponse::default();
            let mut bytes = 0;
            engine
                .store()
                .visit_steps(&req.job_id, req.from_step, |s: StepRecord| {
                    let m = step_to_pb(&s);
                    let len = strata_proto::encoded_len(&m) + 8;
                    if page.steps.len() == limit
                        || (bytes + len > PAGE_BYTES && !page.steps.is_empty())
                    {
                        page.next_from_step = s.step;
                        return ControlFlow::Break(());
                    }
                    bytes += len;
                    page.steps.push(m);
                    ControlFlow::Continue(())
                })?;
            Ok::<_, StoreError>(page)
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(EngineError::from)?;
        Ok(Response::new(page))
    }

    async fn resume_job(
        &self,
        req: Request<pb::ResumeJobRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        self.authorize(&req)?;
        let r = req.into_inner();
        let some = |v: u32| (v > 0).then_some(v);
        let job = self
            .0
            .resume(&crate::engine::ResumeRequest {
                job: r.job_id,
                from_step: r.from_step,
                tp: some(r.tp),
                pp: some(r.pp),
                dp: some(r.dp),
                discard_newer: r.discard_newer,
                weights: r.weights.into_iter().collect(),
            })
            .await?;
        Ok(Response::new(job_to_pb(&job, None)))
    }

    async fn list_checkpoints(
        &self,
        req: Request<pb::ListCheckpointsRequest>,
    ) -> Result<Response<pb::ListCheckpointsResponse>, Status> {
        self.authorize(&req)?;
        let job = self.0.job(&req.get_ref().job_id)?;
        Ok(Response::new(pb::ListCheckpointsResponse {
            checkpoints: job.checkpoints.iter().map(checkpoint_to_pb).collect(),
        }))
    }

    async fn list_nodes(
        &self,
        req: Request<pb::ListNodesRequest>,
    ) -> Result<Response<pb::ListNodesResponse>, Status> {
        self.authorize(&req)?;
        Ok(Response::new(pb::ListNodesResponse {
            nodes: self.0.nodes().into_iter().map(node_to_pb).collect(),
            launcher: self.0.launcher_description(),
        }))
    }
}

/// Who is calling, from a worker request's fields and its token.
fn caller<'a>(
    meta: &'a tonic::metadata::MetadataMap,
    job: &'a str,
    rank: u32,
    attempt: u32,
) -> WorkerCall<'a> {
    WorkerCall {
        job,
        rank,
        attempt,
        token: bearer_token(meta),
    }
}

fn interval_ms(d: std::time::Duration) -> u32 {
    d.as_millis().min(u128::from(u32::MAX)) as u32
}

#[tonic::async_trait]
impl ControlService for Control {
    async fn register(
        &self,
        req: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        let (meta, _, r) = req.into_parts();
        let w = caller(&meta, &r.job_id, r.rank, r.attempt);
        let interval = self.0.register(w, r.collective_addr.clone())?;
        tracing::debug!(job = %r.job_id, rank = r.rank, attempt = r.attempt, host = %r.host, pid = r.pid, collective = %r.collective_addr, "worker registered");
        Ok(Response::new(pb::RegisterResponse {
            heartbeat_interval_ms: interval_ms(interval),
        }))
    }

    async fn get_assignment(
        &self,
        req: Request<pb::GetAssignmentRequest>,
    ) -> Result<Response<pb::Assignment>, Status> {
        let (meta, _, r) = req.into_parts();
        let w = caller(&meta, &r.job_id, r.rank, r.attempt);
        let a = self.0.assignment(w).await?;
        Ok(Response::new(assignment_to_pb(&a)))
    }

    async fn heartbeat(
        &self,
        req: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let (meta, _, r) = req.into_parts();
        let w = caller(&meta, &r.job_id, r.rank, r.attempt);
        let out = self.0.heartbeat(
            w,
            HeartbeatIn {
                step: r.step,
                activity: activity_from_pb(r.activity),
                last_step: rank_step_from_pb(&r),
            },
        )?;
        Ok(Response::new(pb::HeartbeatResponse {
            stop: out.stop.is_some(),
            stop_reason: out.stop.unwrap_or_default(),
            heartbeat_interval_ms: interval_ms(out.interval),
        }))
    }

    async fn report_metrics(
        &self,
        req: Request<pb::ReportMetricsRequest>,
    ) -> Result<Response<pb::ReportMetricsResponse>, Status> {
        let (meta, _, r) = req.into_parts();
        let w = caller(&meta, &r.job_id, r.rank, r.attempt);
        let steps = r.steps.iter().map(step_from_pb).collect();
        self.0.report_metrics(w, steps, r.resumed_from_step)?;
        Ok(Response::new(pb::ReportMetricsResponse {}))
    }

    async fn report_done(
        &self,
        req: Request<pb::ReportDoneRequest>,
    ) -> Result<Response<pb::ReportDoneResponse>, Status> {
        let (meta, _, r) = req.into_parts();
        let w = caller(&meta, &r.job_id, r.rank, r.attempt);
        self.0.report_done(w, r.ok, r.error.clone()).await?;
        Ok(Response::new(pb::ReportDoneResponse {}))
    }

    async fn report_checkpoint(
        &self,
        req: Request<pb::ReportCheckpointRequest>,
    ) -> Result<Response<pb::ReportCheckpointResponse>, Status> {
        let (meta, _, r) = req.into_parts();
        let w = caller(&meta, &r.job_id, r.rank, r.attempt);
        let bad = |e: strata_proto::checkpoint::BadCheckpoint| {
            EngineError::Invalid(format!("rank {}: {e}", r.rank))
        };
        let shards = r
            .shards
            .iter()
            .map(shard_from_pb)
            .collect::<Result<Vec<_>, _>>()
            .map_err(bad)?;
        let manifest = r
            .manifest
            .as_ref()
            .map(manifest_from_pb)
            .transpose()
            .map_err(bad)?;
        let committed = self
            .0
            .report_checkpoint(
                w,
                r.step,
                (!r.ok).then(|| r.error.clone()),
                shards,
                manifest,
                r.stall_s,
                r.write_s,
            )
            .await?;
        Ok(Response::new(pb::ReportCheckpointResponse { committed }))
    }
}
