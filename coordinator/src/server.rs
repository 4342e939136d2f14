//! The coordinator's engine and its two gRPC services.
//!
//! One mutex guards the in-memory mirror of the store and the running
//! jobs' processes; it is never held across an `.await`. Every change is
//! committed to the [`Store`] before the call that made it is answered.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::Stream;
use strata_cluster::{
    Inventory, LaunchSpec, Launcher, LocalHandle, LocalLauncher, Slot, WorkerHandle,
};
use strata_dataplane::checkpoint::{self as ckpt, Manifest, ShardRecord};
use strata_dataplane::loader::{LoaderConfig, Planner};
use strata_dataplane::reader::read_manifest;
use strata_dataplane::store::Location;
use strata_proto::auth::bearer_token;
use strata_proto::v1 as pb;
use strata_proto::v1::control_service_server::{ControlService, ControlServiceServer};
use strata_proto::v1::job_service_server::{JobService, JobServiceServer};
use strata_recipe::{DeviceKind, Layout, Rank, Recipe};
use tokio::sync::{Notify, broadcast};
use tonic::{Request, Response, Status};

use crate::convert::{checkpoint_to_pb, job_to_pb, state_from_pb, step_from_pb, step_to_pb};
use crate::job::{
    AttemptRecord, CheckpointRecord, JobRecord, JobState, StepRecord, now_unix_ms, random_token,
};
use crate::placement::place;
use crate::store::{Store, StoreError};

/// How a coordinator runs.
#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    pub listen: SocketAddr,
    pub state_dir: PathBuf,
    /// Where workers may run: this machine's CPU slots (processes; they may
    /// oversubscribe the cores), or one slot per GPU.
    pub inventory: Inventory,
    /// The program workers run (the `strata` binary) and the arguments
    /// before the worker's own (`["worker"]`).
    pub worker_program: PathBuf,
    pub worker_args: Vec<String>,
    /// Extra environment for workers (e.g. `RUST_LOG`, `AWS_*`).
    pub worker_env: Vec<(String, String)>,
    /// The bearer token clients must present; `None` when the coordinator
    /// listens on loopback only.
    pub client_token: Option<String>,
    /// A worker silent for this long fails its job.
    pub heartbeat_timeout: Duration,
}

/// What watchers of a job hear.
#[derive(Debug, Clone)]
pub enum Event {
    Job(JobRecord),
    Step(StepRecord),
}

struct Running {
    /// The slots (and GPUs) leased to the job's ranks, in rank order.
    slots: Vec<Slot>,
    handles: Vec<LocalHandle>,
    addrs: Vec<Option<String>>,
    heartbeat: Vec<Instant>,
    done: Vec<bool>,
    /// Checkpoints some ranks have written their files of, by step.
    checkpoints: BTreeMap<u64, PendingCheckpoint>,
}

/// A checkpoint being written: what each rank reported.
#[derive(Default)]
struct PendingCheckpoint {
    reported: HashSet<u32>,
    /// Rank 0's manifest, without shards.
    manifest: Option<Manifest>,
    shards: Vec<ShardRecord>,
    failures: Vec<String>,
    stall_s: f64,
    write_s: f64,
}

impl Running {
    /// The first rank (other than `except`) whose process ended before it
    /// finished, with its exit status and last log lines.
    fn ended_early(&mut self, except: Option<usize>) -> Option<String> {
        for (r, h) in self.handles.iter_mut().enumerate() {
            if Some(r) == except || self.done[r] {
                continue;
            }
            match h.try_wait() {
                Ok(Some(exit)) => {
                    return Some(format!(
                        "rank {r} ended ({exit}) before finishing; last log lines:\n{}",
                        h.log_tail(20).join("\n")
                    ));
                }
                Ok(None) => {}
                Err(e) => return Some(e.to_string()),
            }
        }
        None
    }
}

#[derive(Default)]
struct State {
    jobs: BTreeMap<String, JobRecord>,
    /// Submission order of queued jobs.
    queue: Vec<String>,
    running: HashMap<String, Running>,
    /// Workers of ended jobs, reaped (or killed after a grace period).
    draining: Vec<(LocalHandle, Instant)>,
    watchers: HashMap<String, broadcast::Sender<Event>>,
}

pub struct Engine {
    cfg: CoordinatorConfig,
    store: Store,
    state: Mutex<State>,
    /// Woken when a job's registrations or state change.
    changed: Notify,
    /// The URL workers reach the coordinator at.
    worker_url: Mutex<String>,
    /// Set once shutting down: nothing new is launched.
    stopping: std::sync::atomic::AtomicBool,
}

fn store_status(e: StoreError) -> Status {
    tracing::error!(error = %e, "job store failure");
    Status::internal(e.to_string())
}

impl Engine {
    /// Opens the store in `cfg.state_dir`. Jobs that were running when the
    /// coordinator last stopped are failed (their workers are gone); queued
    /// jobs stay queued.
    pub fn open(cfg: CoordinatorConfig) -> Result<Arc<Engine>, StoreError> {
        let store = Store::open(&cfg.state_dir)?;
        let mut state = State::default();
        let mut jobs = store.jobs()?;
        jobs.sort_by_key(|j| (j.submitted_unix_ms, j.job_id.clone()));
        for mut job in jobs {
            if job.state == JobState::Running {
                job.state = JobState::Failed;
                job.failure_reason = "the coordinator stopped while the job ran, and its workers with it; resubmit the job".into();
                job.finished_unix_ms = now_unix_ms();
                store.put_job(&job)?;
                tracing::warn!(job = %job.job_id, "failed a job left running by the previous coordinator");
            }
            if job.state == JobState::Queued {
                state.queue.push(job.job_id.clone());
            }
            state.jobs.insert(job.job_id.clone(), job);
        }
        Ok(Arc::new(Engine {
            worker_url: Mutex::new(format!("http://{}", cfg.listen)),
            cfg,
            store,
            state: Mutex::new(state),
            changed: Notify::new(),
            stopping: std::sync::atomic::AtomicBool::new(false),
        }))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("coordinator state lock")
    }

    /// Tells `job`'s watchers; once it has ended, its channel is dropped
    /// (watchers still get what was sent, then the stream ends).
    fn publish(state: &mut State, job: &JobRecord) {
        if let Some(tx) = state.watchers.get(&job.job_id) {
            let _ = tx.send(Event::Job(job.clone()));
        }
        if job.state.is_final() {
            state.watchers.remove(&job.job_id);
        }
    }

    /// Commits `job`, mirrors it and tells its watchers.
    fn save(&self, state: &mut State, job: JobRecord) -> Result<(), StoreError> {
        self.store.put_job(&job)?;
        state.jobs.insert(job.job_id.clone(), job.clone());
        Engine::publish(state, &job);
        self.changed.notify_waiters();
        Ok(())
    }

    /// The slots running jobs hold.
    fn leased(state: &State) -> HashSet<Slot> {
        state
            .running
            .values()
            .flat_map(|r| r.slots.iter().cloned())
            .collect()
    }

    fn free_slots(&self, state: &State) -> u32 {
        let leased = Engine::leased(state).len() as u32;
        self.cfg.inventory.total_slots().saturating_sub(leased)
    }

    /// Starts queued jobs, first come first served, while they fit.
    fn schedule(&self, state: &mut State) {
        if self.stopping.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        while let Some(id) = state.queue.first().cloned() {
            let Some(job) = state.jobs.get(&id).cloned() else {
                state.queue.remove(0);
                continue;
            };
            if job.state != JobState::Queued {
                state.queue.remove(0);
                continue;
            }
            if job.layout.world_size() > self.free_slots(state) {
                break;
            }
            state.queue.remove(0);
            if let Err(e) = self.launch(state, job) {
                tracing::error!(job = %id, error = %e, "job store failure while launching");
            }
        }
    }

    fn launch(&self, state: &mut State, mut job: JobRecord) -> Result<(), StoreError> {
        let world = job.layout.world_size();
        let fail = |state: &mut State, mut job: JobRecord, why: String| {
            tracing::error!(job = %job.job_id, reason = %why, "job failed to start");
            job.state = JobState::Failed;
            job.failure_reason = why;
            job.finished_unix_ms = now_unix_ms();
            self.save(state, job)
        };
        let placement = match place(job.layout, &self.cfg.inventory, &Engine::leased(state)) {
            Ok(p) => p,
            Err(e) => return fail(state, job, e.to_string()),
        };
        let url = self.worker_url.lock().expect("url lock").clone();
        // Workers on this machine share its cores: each CPU backend gets
        // its share of threads (oversubscribed, two workers on two cores
        // trained 12% slower), unless the operator chose a count.
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get())
            / placement.assignments.len().max(1);
        let set_threads = std::env::var_os("RAYON_NUM_THREADS").is_none()
            && !self
                .cfg
                .worker_env
                .iter()
                .any(|(k, _)| k == "RAYON_NUM_THREADS");
        let attempt = job.attempt() + 1;
        let mut handles = Vec::with_capacity(world as usize);
        let mut on_node: HashMap<&str, u32> = HashMap::new();
        for a in &placement.assignments {
            let rank = a.rank.0;
            // The rank's index among this job's ranks on its node.
            let local_rank = on_node.entry(a.slot.node.as_str()).or_default();
            let mut args = self.cfg.worker_args.clone();
            args.extend([
                "--coordinator".into(),
                url.clone(),
                "--job".into(),
                job.job_id.clone(),
                "--rank".into(),
                rank.to_string(),
                "--attempt".into(),
                attempt.to_string(),
            ]);
            let mut env = self.cfg.worker_env.clone();
            env.push(("STRATA_JOB_TOKEN".into(), job.worker_token.clone()));
            env.push(("STRATA_LOCAL_RANK".into(), local_rank.to_string()));
            *local_rank += 1;
            if set_threads {
                env.push(("RAYON_NUM_THREADS".into(), threads.max(1).to_string()));
            }
            let spec = LaunchSpec {
                rank,
                slot: a.slot.clone(),
                program: self.cfg.worker_program.clone(),
                args,
                env,
                log_path: PathBuf::from(&job.run_dir).join(format!("rank-{rank}.log")),
            };
            match LocalLauncher.launch(&spec) {
                Ok(h) => handles.push(h),
                Err(e) => {
                    for mut h in handles {
                        let _ = h.kill();
                    }
                    return fail(state, job, e.to_string());
                }
            }
        }
        tracing::info!(job = %job.job_id, world, attempt, "launched workers");
        job.state = JobState::Running;
        job.started_unix_ms = now_unix_ms();
        job.attempts.push(AttemptRecord {
            number: attempt,
            started_unix_ms: job.started_unix_ms,
            ended_unix_ms: 0,
            from_step: match job.resume_from {
                Some(0) => job.last_checkpoint().unwrap_or(0),
                Some(step) => step,
                None => 0,
            },
            end_state: None,
            cause: String::new(),
            steps_lost: 0,
            last_step: job.steps_done,
        });
        let n = world as usize;
        state.running.insert(
            job.job_id.clone(),
            Running {
                slots: placement
                    .assignments
                    .iter()
                    .map(|a| a.slot.clone())
                    .collect(),
                handles,
                addrs: vec![None; n],
                heartbeat: vec![Instant::now(); n],
                done: vec![false; n],
                checkpoints: BTreeMap::new(),
            },
        );
        self.save(state, job)
    }

    /// Ends a running or queued job: stops its workers, records why, and
    /// starts whatever now fits.
    fn end(
        &self,
        state: &mut State,
        id: &str,
        to: JobState,
        reason: String,
    ) -> Result<(), StoreError> {
        let Some(mut job) = state.jobs.get(id).cloned() else {
            return Ok(());
        };
        if !job.state.can_become(to) {
            return Ok(());
        }
        if let Some(run) = state.running.remove(id) {
            let grace = if to == JobState::Succeeded {
                Duration::from_secs(10)
            } else {
                Duration::ZERO
            };
            for h in run.handles {
                state.draining.push((h, Instant::now() + grace));
            }
        }
        state.queue.retain(|q| q != id);
        match to {
            JobState::Failed => tracing::error!(job = %id, reason = %reason, "job failed"),
            _ => tracing::info!(job = %id, state = to.name(), reason = %reason, "job ended"),
        }
        job.state = to;
        job.finished_unix_ms = now_unix_ms();
        let last_checkpoint = job.last_checkpoint().unwrap_or(0);
        let steps_done = job.steps_done;
        if let Some(a) = job.attempts.last_mut()
            && a.end_state.is_none()
        {
            a.end_state = Some(to);
            a.cause = reason.clone();
            a.ended_unix_ms = job.finished_unix_ms;
            a.last_step = steps_done;
            a.steps_lost = steps_done.saturating_sub(last_checkpoint.max(a.from_step));
        }
        job.failure_reason = reason;
        job.resume_from = None;
        self.save(state, job)?;
        self.reap(state);
        self.schedule(state);
        Ok(())
    }

    fn reap(&self, state: &mut State) {
        let now = Instant::now();
        state
            .draining
            .retain_mut(|(h, deadline)| match h.try_wait() {
                Ok(Some(_)) | Err(_) => false,
                Ok(None) if now >= *deadline => {
                    let _ = h.kill();
                    false
                }
                Ok(None) => true,
            });
    }

    /// Checks running jobs' processes and heartbeats; called periodically.
    pub fn monitor(&self) {
        let mut state = self.lock();
        let mut failures = Vec::new();
        for (id, run) in state.running.iter_mut() {
            if let Some(why) = run.ended_early(None) {
                failures.push((id.clone(), why));
                continue;
            }
            for r in 0..run.handles.len() {
                let silent = run.heartbeat[r].elapsed();
                if !run.done[r] && silent > self.cfg.heartbeat_timeout {
                    failures.push((
                        id.clone(),
                        format!(
                            "rank {r} sent no heartbeat for {:.0} s (limit {:.0} s)",
                            silent.as_secs_f64(),
                            self.cfg.heartbeat_timeout.as_secs_f64()
                        ),
                    ));
                    break;
                }
            }
        }
        for (id, why) in failures {
            if let Err(e) = self.end(&mut state, &id, JobState::Failed, why) {
                tracing::error!(job = %id, error = %e, "job store failure");
            }
        }
        self.reap(&mut state);
    }

    /// Stops every running job's workers (the coordinator is shutting
    /// down); they are recorded as failed with the reason.
    pub fn shutdown(&self) {
        self.stopping
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let mut state = self.lock();
        let ids: Vec<String> = state.running.keys().cloned().collect();
        for id in ids {
            let _ = self.end(
                &mut state,
                &id,
                JobState::Failed,
                "the coordinator shut down while the job ran; resubmit the job".into(),
            );
        }
        for (mut h, _) in state.draining.drain(..) {
            let _ = h.kill();
        }
        self.store.close();
    }

    /// Checks a worker call: its job's token, a rank in the world, and the
    /// job's current attempt (a worker of an ended attempt is refused, so
    /// it cannot disturb the next one).
    fn check_worker(
        &self,
        req_meta: &tonic::metadata::MetadataMap,
        job_id: &str,
        rank: u32,
        attempt: u32,
    ) -> Result<JobRecord, Status> {
        let state = self.lock();
        let job = state
            .jobs
            .get(job_id)
            .cloned()
            .ok_or_else(|| Status::not_found(format!("no job {job_id}")))?;
        if bearer_token(req_meta) != Some(job.worker_token.as_str()) {
            tracing::warn!(job = %job_id, rank, "worker call with a wrong or missing job token");
            return Err(Status::unauthenticated(format!(
                "job {job_id}: wrong or missing worker token"
            )));
        }
        if rank >= job.layout.world_size() {
            return Err(Status::invalid_argument(format!(
                "rank {rank} is outside job {job_id}'s world of {}",
                job.layout.world_size()
            )));
        }
        if attempt != job.attempt() {
            tracing::warn!(job = %job_id, rank, attempt, current = job.attempt(), "call from a worker of another attempt");
            return Err(Status::failed_precondition(format!(
                "job {job_id}: attempt {attempt} has ended; the job is on attempt {}",
                job.attempt()
            )));
        }
        Ok(job)
    }
}

/// The client-facing service.
#[derive(Clone)]
pub struct Jobs(pub Arc<Engine>);

/// The worker-facing service.
#[derive(Clone)]
pub struct Control(pub Arc<Engine>);

impl Jobs {
    fn authorize<T>(&self, req: &Request<T>) -> Result<(), Status> {
        if let Some(token) = &self.0.cfg.client_token
            && bearer_token(req.metadata()) != Some(token.as_str())
        {
            tracing::warn!(peer = ?req.remote_addr(), "client call with a wrong or missing token");
            return Err(Status::unauthenticated(
                "wrong or missing bearer token (see the coordinator's --token-file)",
            ));
        }
        Ok(())
    }

    fn job(&self, id: &str) -> Result<JobRecord, Status> {
        self.0
            .lock()
            .jobs
            .get(id)
            .cloned()
            .ok_or_else(|| Status::not_found(format!("no job {id}")))
    }

    /// Refuses what cannot run: an invalid recipe (a layout that cannot
    /// split the model among them), more ranks than slots, a dataset that
    /// is missing or cannot feed the recipe.
    async fn validate(&self, spec: &str, default_name: &str) -> Result<Recipe, Status> {
        let recipe = Recipe::from_toml_str(spec, default_name)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        // The recipe's validation refused layouts that cannot split the
        // model (heads, KV heads, d_ffn, stages without layers).
        let layout = recipe.parallel.layout;
        let inventory = &self.0.cfg.inventory;
        if recipe.device == DeviceKind::Cuda && !inventory.has_gpus() {
            return Err(Status::failed_precondition(
                "device.backend: the recipe trains on cuda and this coordinator has no GPUs \
                 (start it with --gpus N on a machine with NVIDIA GPUs, from a strata built \
                 with --features cuda)",
            ));
        }
        let slots = inventory.total_slots();
        if layout.world_size() > slots {
            let what = if inventory.has_gpus() {
                "GPUs (one worker each)"
            } else {
                "worker slots"
            };
            return Err(Status::resource_exhausted(format!(
                "parallel: the job needs {} worker slots (tp·pp·dp = {}·{}·{}) and this coordinator has {slots} {what}",
                layout.world_size(),
                layout.tp,
                layout.pp,
                layout.dp
            )));
        }
        let url = &recipe.data.dataset;
        let bad_data = |why: String| Status::invalid_argument(format!("data.dataset: {why}"));
        let loc = Location::parse(url, false).map_err(|e| bad_data(e.to_string()))?;
        let manifest = read_manifest(&loc)
            .await
            .map_err(|e| bad_data(e.to_string()))?;
        if u64::from(manifest.tokenizer.vocab_size) > recipe.model.vocab_size {
            return Err(Status::invalid_argument(format!(
                "model.vocab_size: {} is smaller than the dataset's tokenizer ({}, {} ids)",
                recipe.model.vocab_size, manifest.tokenizer.name, manifest.tokenizer.vocab_size
            )));
        }
        Planner::new(&manifest, &LoaderConfig::for_recipe(&recipe, 0))
            .map_err(|e| bad_data(format!("{url}: {e}")))?;
        Ok(recipe)
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
        let recipe = match self.validate(&req.spec_toml, default_name).await {
            Ok(r) => r,
            Err(s) => {
                tracing::info!(code = ?s.code(), message = %s.message(), "refused a job");
                return Err(s);
            }
        };
        let engine = &self.0;
        let n = engine.store.next_job_number().map_err(store_status)?;
        let slug: String = recipe
            .name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '-'
                }
            })
            .collect();
        let job_id = format!("{slug}-{n}");
        let run_dir = engine.cfg.state_dir.join("runs").join(&job_id);
        let job = JobRecord {
            job_id: job_id.clone(),
            name: recipe.name.clone(),
            spec_toml: req.spec_toml,
            state: JobState::Queued,
            layout: recipe.parallel.layout,
            microbatches: recipe.parallel.microbatches,
            steps_total: recipe.data.n_steps(),
            steps_done: 0,
            tokens_done: 0,
            last_loss: None,
            failure_reason: String::new(),
            submitted_unix_ms: now_unix_ms(),
            started_unix_ms: 0,
            finished_unix_ms: 0,
            run_dir: run_dir.display().to_string(),
            worker_token: random_token().map_err(|e| Status::internal(format!("token: {e}")))?,
            attempts: Vec::new(),
            checkpoints: Vec::new(),
            resume_from: None,
            checkpoint_errors: Vec::new(),
        };
        let mut state = engine.lock();
        engine.save(&mut state, job).map_err(store_status)?;
        state.queue.push(job_id.clone());
        tracing::info!(job = %job_id, world = recipe.parallel.layout.world_size(), "job queued");
        engine.schedule(&mut state);
        Ok(Response::new(pb::SubmitJobResponse { job_id }))
    }

    async fn get_job(&self, req: Request<pb::GetJobRequest>) -> Result<Response<pb::Job>, Status> {
        self.authorize(&req)?;
        Ok(Response::new(job_to_pb(&self.job(&req.get_ref().job_id)?)))
    }

    async fn list_jobs(
        &self,
        req: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        self.authorize(&req)?;
        let wanted: Vec<JobState> = req.get_ref().states().filter_map(state_from_pb).collect();
        let state = self.0.lock();
        let mut jobs: Vec<&JobRecord> = state
            .jobs
            .values()
            .filter(|j| wanted.is_empty() || wanted.contains(&j.state))
            .collect();
        jobs.sort_by_key(|j| (j.submitted_unix_ms, j.job_id.clone()));
        Ok(Response::new(pb::ListJobsResponse {
            jobs: jobs.into_iter().map(job_to_pb).collect(),
        }))
    }

    async fn cancel_job(
        &self,
        req: Request<pb::CancelJobRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        self.authorize(&req)?;
        let req = req.into_inner();
        let job = self.job(&req.job_id)?;
        if job.state.is_final() {
            return Err(Status::failed_precondition(format!(
                "job {} already {}",
                job.job_id,
                job.state.name()
            )));
        }
        let reason = if req.reason.is_empty() {
            "cancelled by a client".to_string()
        } else {
            format!("cancelled: {}", req.reason)
        };
        let engine = &self.0;
        let mut state = engine.lock();
        engine
            .end(&mut state, &req.job_id, JobState::Cancelled, reason)
            .map_err(store_status)?;
        let job = state.jobs.get(&req.job_id).cloned().expect("job exists");
        Ok(Response::new(job_to_pb(&job)))
    }

    type WatchJobStream = EventStream;

    async fn watch_job(
        &self,
        req: Request<pb::WatchJobRequest>,
    ) -> Result<Response<EventStream>, Status> {
        self.authorize(&req)?;
        let req = req.into_inner();
        let engine = self.0.clone();
        // Subscribe before reading history so nothing falls in between.
        let (job, rx) = {
            let mut state = engine.lock();
            let job = state
                .jobs
                .get(&req.job_id)
                .cloned()
                .ok_or_else(|| Status::not_found(format!("no job {}", req.job_id)))?;
            // An ended job's stream ends after its history: no channel.
            let rx = if job.state.is_final() {
                broadcast::channel(1).1
            } else {
                state
                    .watchers
                    .entry(req.job_id.clone())
                    .or_insert_with(|| broadcast::channel(4096).0)
                    .subscribe()
            };
            (job, rx)
        };
        let history = engine
            .store
            .steps(&req.job_id, req.from_step, 0)
            .map_err(store_status)?;
        let stream = watch_stream(job, history, rx);
        Ok(Response::new(Box::pin(stream)))
    }

    async fn resume_job(
        &self,
        req: Request<pb::ResumeJobRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        self.authorize(&req)?;
        let req = req.into_inner();
        let job = self.job(&req.job_id)?;
        let (spec, recipe, chosen) = self.plan_resume(&job, &req).await?;
        let engine = &self.0;
        let mut state = engine.lock();
        let Some(mut job) = state.jobs.get(&req.job_id).cloned() else {
            return Err(Status::not_found(format!("no job {}", req.job_id)));
        };
        if !job.state.can_become(JobState::Queued) {
            return Err(Status::failed_precondition(format!(
                "job {} is {}",
                job.job_id,
                job.state.name()
            )));
        }
        job.spec_toml = spec;
        job.layout = recipe.parallel.layout;
        job.microbatches = recipe.parallel.microbatches;
        job.steps_total = recipe.data.n_steps();
        job.state = JobState::Queued;
        job.failure_reason.clear();
        job.finished_unix_ms = 0;
        job.resume_from = Some(req.from_step);
        job.steps_done = chosen.step;
        job.tokens_done = chosen.tokens_seen;
        job.checkpoints.retain(|c| c.step <= chosen.step);
        engine
            .store
            .put_job_truncating(&job, chosen.step)
            .map_err(store_status)?;
        state.jobs.insert(job.job_id.clone(), job.clone());
        Engine::publish(&mut state, &job);
        state.queue.push(job.job_id.clone());
        tracing::info!(job = %job.job_id, from_step = chosen.step, layout = %job.layout, "job resumes");
        engine.schedule(&mut state);
        let job = state.jobs.get(&req.job_id).cloned().expect("job exists");
        Ok(Response::new(job_to_pb(&job)))
    }

    async fn list_checkpoints(
        &self,
        req: Request<pb::ListCheckpointsRequest>,
    ) -> Result<Response<pb::ListCheckpointsResponse>, Status> {
        self.authorize(&req)?;
        let job = self.job(&req.get_ref().job_id)?;
        Ok(Response::new(pb::ListCheckpointsResponse {
            checkpoints: job.checkpoints.iter().map(checkpoint_to_pb).collect(),
        }))
    }

    async fn get_metrics(
        &self,
        req: Request<pb::GetMetricsRequest>,
    ) -> Result<Response<pb::GetMetricsResponse>, Status> {
        self.authorize(&req)?;
        let req = req.into_inner();
        self.job(&req.job_id)?;
        let steps = self
            .0
            .store
            .steps(&req.job_id, req.from_step, req.limit as usize)
            .map_err(store_status)?;
        Ok(Response::new(pb::GetMetricsResponse {
            steps: steps.iter().map(step_to_pb).collect(),
        }))
    }
}

impl Jobs {
    /// Checks that `job` can continue from a checkpoint and returns its
    /// new recipe text, the recipe, and the checkpoint chosen.
    async fn plan_resume(
        &self,
        job: &JobRecord,
        req: &pb::ResumeJobRequest,
    ) -> Result<(String, Recipe, Manifest), Status> {
        let refuse = |m: String| Err(Status::failed_precondition(m));
        if !job.state.is_final() {
            return refuse(format!(
                "job {} is {}; only an ended job resumes (cancel it first)",
                job.job_id,
                job.state.name()
            ));
        }
        let recipe = Recipe::from_toml_str(&job.spec_toml, &job.name)
            .map_err(|e| Status::internal(e.to_string()))?;
        let Some(cfg) = recipe.checkpoint.clone() else {
            return refuse(format!(
                "job {} has no [checkpoint] section: it saved nothing to resume from",
                job.job_id
            ));
        };
        let loc = Location::parse(&cfg.dir, false)
            .map_err(|e| Status::failed_precondition(format!("checkpoint.dir: {e}")))?;
        let (found, unreadable) = ckpt::list(&loc, &job.job_id)
            .await
            .map_err(|e| Status::unavailable(format!("checkpoint.dir: {e}")))?;
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
        let layout = |v: u32| (v > 0).then_some(v);
        let spec = if req.tp + req.pp + req.dp > 0 {
            strata_recipe::resume::relayout(
                &job.spec_toml,
                layout(req.tp),
                layout(req.pp),
                layout(req.dp),
            )
            .map_err(|e| Status::internal(format!("changing the layout: {e}")))?
        } else {
            job.spec_toml.clone()
        };
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
            ckpt::delete(&loc, &job.job_id, m)
                .await
                .map_err(|e| Status::unavailable(format!("deleting step {}: {e}", m.step)))?;
            tracing::info!(job = %job.job_id, step = m.step, "deleted a checkpoint the resume abandons");
        }
        Ok((spec, now, chosen))
    }
}

/// The watch stream: the job now, its recorded steps, then live events
/// until the job ends.
fn watch_stream(
    job: JobRecord,
    history: Vec<StepRecord>,
    rx: broadcast::Receiver<Event>,
) -> impl Stream<Item = Result<pb::JobEvent, Status>> + Send {
    use pb::job_event::Event as E;
    let done = job.state.is_final();
    let last_step = history.last().map_or(0, |s| s.step);
    let first: Vec<Result<pb::JobEvent, Status>> = std::iter::once(E::Job(job_to_pb(&job)))
        .chain(history.iter().map(|s| E::Step(step_to_pb(s))))
        .map(|e| Ok(pb::JobEvent { event: Some(e) }))
        .collect();
    let live = futures::stream::unfold((rx, done, last_step), |(mut rx, done, last)| async move {
        if done {
            return None;
        }
        loop {
            let (ev, done, last) = match rx.recv().await {
                // Already sent from the history.
                Ok(Event::Step(s)) if s.step <= last => continue,
                Ok(Event::Step(s)) => (E::Step(step_to_pb(&s)), false, s.step),
                Ok(Event::Job(j)) => (E::Job(job_to_pb(&j)), j.state.is_final(), last),
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => return None,
            };
            return Some((Ok(pb::JobEvent { event: Some(ev) }), (rx, done, last)));
        }
    });
    futures::StreamExt::chain(futures::stream::iter(first), live)
}

#[tonic::async_trait]
impl ControlService for Control {
    async fn register(
        &self,
        req: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        let (meta, req) = (req.metadata().clone(), req.into_inner());
        let engine = &self.0;
        engine.check_worker(&meta, &req.job_id, req.rank, req.attempt)?;
        let mut state = engine.lock();
        let run = state.running.get_mut(&req.job_id).ok_or_else(|| {
            Status::failed_precondition(format!("job {} is not running", req.job_id))
        })?;
        run.addrs[req.rank as usize] = Some(req.collective_addr.clone());
        run.heartbeat[req.rank as usize] = Instant::now();
        tracing::info!(job = %req.job_id, rank = req.rank, host = %req.host, pid = req.pid, collective = %req.collective_addr, "worker registered");
        engine.changed.notify_waiters();
        Ok(Response::new(pb::RegisterResponse {}))
    }

    async fn get_assignment(
        &self,
        req: Request<pb::GetAssignmentRequest>,
    ) -> Result<Response<pb::Assignment>, Status> {
        let (meta, req) = (req.metadata().clone(), req.into_inner());
        let engine = &self.0;
        let job = engine.check_worker(&meta, &req.job_id, req.rank, req.attempt)?;
        let addrs = loop {
            let notified = engine.changed.notified();
            {
                let state = engine.lock();
                match state.running.get(&req.job_id) {
                    None => {
                        return Err(Status::failed_precondition(format!(
                            "job {} is not running",
                            req.job_id
                        )));
                    }
                    Some(run) if run.addrs.iter().all(Option::is_some) => {
                        break run.addrs.iter().flatten().cloned().collect::<Vec<_>>();
                    }
                    Some(_) => {}
                }
            }
            // Re-check periodically too: a lost wake-up costs a second.
            let _ = tokio::time::timeout(Duration::from_secs(1), notified).await;
        };
        let layout: Layout = job.layout;
        let rank = Rank(req.rank);
        let coords = layout.coords(rank).expect("rank checked");
        let group = |kind: pb::GroupKind, ranks: Vec<Rank>| pb::Group {
            kind: kind as i32,
            members: ranks
                .into_iter()
                .map(|r| pb::Member {
                    rank: r.0,
                    collective_addr: addrs[r.0 as usize].clone(),
                })
                .collect(),
            nccl_unique_id: Vec::new(),
        };
        Ok(Response::new(pb::Assignment {
            job_id: job.job_id.clone(),
            rank: req.rank,
            coords: Some(pb::Coords {
                dp: coords.dp,
                pp: coords.pp,
                tp: coords.tp,
            }),
            layout: job_to_pb(&job).layout,
            spec_toml: job.spec_toml.clone(),
            groups: vec![
                group(pb::GroupKind::Tensor, layout.tp_group(rank)),
                group(pb::GroupKind::Pipeline, layout.pp_group(rank)),
                group(pb::GroupKind::Data, layout.dp_group(rank)),
            ],
            run_dir: job.run_dir.clone(),
            attempt: job.attempt(),
            resume: job.resume_from.is_some(),
            resume_from_step: job.resume_from.unwrap_or(0),
        }))
    }

    async fn heartbeat(
        &self,
        req: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let (meta, req) = (req.metadata().clone(), req.into_inner());
        let engine = &self.0;
        let job = engine.check_worker(&meta, &req.job_id, req.rank, req.attempt)?;
        let mut state = engine.lock();
        match state.running.get_mut(&req.job_id) {
            Some(run) => {
                run.heartbeat[req.rank as usize] = Instant::now();
                Ok(Response::new(pb::HeartbeatResponse {
                    stop: false,
                    stop_reason: String::new(),
                }))
            }
            None => Ok(Response::new(pb::HeartbeatResponse {
                stop: true,
                stop_reason: format!("job {} is {}", job.job_id, job.state.name()),
            })),
        }
    }

    async fn report_metrics(
        &self,
        req: Request<pb::ReportMetricsRequest>,
    ) -> Result<Response<pb::ReportMetricsResponse>, Status> {
        let (meta, req) = (req.metadata().clone(), req.into_inner());
        let engine = &self.0;
        let mut job = engine.check_worker(&meta, &req.job_id, req.rank, req.attempt)?;
        let steps: Vec<StepRecord> = req.steps.iter().map(step_from_pb).collect();
        let Some(last) = steps.last() else {
            return Ok(Response::new(pb::ReportMetricsResponse {}));
        };
        let mut state = engine.lock();
        if !state.running.contains_key(&req.job_id) {
            return Err(Status::failed_precondition(format!(
                "job {} is not running",
                req.job_id
            )));
        }
        if let Some(run) = state.running.get_mut(&req.job_id) {
            run.heartbeat[req.rank as usize] = Instant::now();
        }
        job.steps_done = last.step;
        job.tokens_done = last.tokens;
        job.last_loss = Some(last.loss);
        if let (Some(step), Some(a)) = (req.resumed_from_step, job.attempts.last_mut()) {
            a.from_step = step;
        }
        engine.store.put_steps(&job, &steps).map_err(store_status)?;
        state.jobs.insert(job.job_id.clone(), job);
        if let Some(tx) = state.watchers.get(&req.job_id) {
            for s in steps {
                let _ = tx.send(Event::Step(s));
            }
        }
        Ok(Response::new(pb::ReportMetricsResponse {}))
    }

    async fn report_done(
        &self,
        req: Request<pb::ReportDoneRequest>,
    ) -> Result<Response<pb::ReportDoneResponse>, Status> {
        let (meta, req) = (req.metadata().clone(), req.into_inner());
        let engine = &self.0;
        engine.check_worker(&meta, &req.job_id, req.rank, req.attempt)?;
        if !req.ok {
            // A rank that fails because a peer died reports first more often
            // than not: give the peer's exit a moment to show, and record
            // that as the cause.
            let own = format!("rank {}: {}", req.rank, req.error);
            for attempt in 0..20 {
                {
                    let mut state = engine.lock();
                    let Some(run) = state.running.get_mut(&req.job_id) else {
                        return Ok(Response::new(pb::ReportDoneResponse {}));
                    };
                    let cause = run.ended_early(Some(req.rank as usize));
                    if cause.is_some() || attempt == 19 {
                        let why = match cause {
                            Some(c) => format!("{c}\n(then {own})"),
                            None => own,
                        };
                        engine
                            .end(&mut state, &req.job_id, JobState::Failed, why)
                            .map_err(store_status)?;
                        return Ok(Response::new(pb::ReportDoneResponse {}));
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        let mut state = engine.lock();
        let all_done = match state.running.get_mut(&req.job_id) {
            Some(run) => {
                run.done[req.rank as usize] = true;
                run.done.iter().all(|d| *d)
            }
            None => false,
        };
        if all_done {
            engine
                .end(&mut state, &req.job_id, JobState::Succeeded, String::new())
                .map_err(store_status)?;
        }
        Ok(Response::new(pb::ReportDoneResponse {}))
    }

    async fn report_checkpoint(
        &self,
        req: Request<pb::ReportCheckpointRequest>,
    ) -> Result<Response<pb::ReportCheckpointResponse>, Status> {
        let (meta, req) = (req.metadata().clone(), req.into_inner());
        let committed = self.checkpoint_report(&meta, req).await?;
        Ok(Response::new(pb::ReportCheckpointResponse { committed }))
    }
}

impl Control {
    /// Records rank `req.rank`'s part of a checkpoint; the report that
    /// completes it writes the manifest (outside the lock), prunes what
    /// `keep_last` lets go, and records the checkpoint on the job.
    async fn checkpoint_report(
        &self,
        meta: &tonic::metadata::MetadataMap,
        req: pb::ReportCheckpointRequest,
    ) -> Result<bool, Status> {
        let engine = &self.0;
        let job = engine.check_worker(meta, &req.job_id, req.rank, req.attempt)?;
        let world = job.layout.world_size();
        let bad = |what: &str, e: serde_json::Error| {
            Status::invalid_argument(format!("rank {}: {what}: {e}", req.rank))
        };
        let shards: Vec<ShardRecord> = if req.shards_json.is_empty() {
            Vec::new()
        } else {
            serde_json::from_str(&req.shards_json).map_err(|e| bad("shards_json", e))?
        };
        let manifest: Option<Manifest> = if req.manifest_json.is_empty() {
            None
        } else {
            Some(serde_json::from_str(&req.manifest_json).map_err(|e| bad("manifest_json", e))?)
        };
        let complete = {
            let mut state = engine.lock();
            let run = state.running.get_mut(&req.job_id).ok_or_else(|| {
                Status::failed_precondition(format!("job {} is not running", req.job_id))
            })?;
            let p = run.checkpoints.entry(req.step).or_default();
            if !p.reported.insert(req.rank) {
                return Err(Status::already_exists(format!(
                    "rank {} already reported the checkpoint of step {}",
                    req.rank, req.step
                )));
            }
            if !req.ok {
                p.failures.push(format!("rank {}: {}", req.rank, req.error));
            }
            p.shards.extend(shards);
            if manifest.is_some() {
                p.manifest = manifest;
            }
            p.stall_s = p.stall_s.max(req.stall_s);
            p.write_s = p.write_s.max(req.write_s);
            if p.reported.len() as u32 == world {
                run.checkpoints.remove(&req.step)
            } else {
                None
            }
        };
        let Some(p) = complete else {
            return Ok(false);
        };
        let recipe = Recipe::from_toml_str(&job.spec_toml, &job.name)
            .map_err(|e| Status::internal(e.to_string()))?;
        let Some(cfg) = recipe.checkpoint.clone() else {
            return Err(Status::failed_precondition(format!(
                "job {} has no [checkpoint] section",
                job.job_id
            )));
        };
        let outcome = match (p.failures.is_empty(), p.manifest) {
            (false, _) => Err(p.failures.join("; ")),
            (true, None) => Err("rank 0 sent no manifest".to_string()),
            (true, Some(mut m)) => {
                m.shards = p.shards;
                m.shards.sort_by(|a, b| a.key.cmp(&b.key));
                m.written_at = (now_unix_ms() / 1000) as u64;
                commit_checkpoint(&cfg.dir, &job.job_id, &m, cfg.keep_last)
                    .await
                    .map(|pruned| (m, pruned))
            }
        };
        let mut state = engine.lock();
        let Some(mut job) = state.jobs.get(&req.job_id).cloned() else {
            return Ok(false);
        };
        let committed = match outcome {
            Ok((m, pruned)) => {
                tracing::info!(job = %job.job_id, step = m.step, bytes = m.bytes(), stall_s = p.stall_s, write_s = p.write_s, "checkpoint complete");
                job.checkpoints
                    .retain(|c| !pruned.contains(&c.step) && c.step != m.step);
                job.checkpoints.push(CheckpointRecord {
                    step: m.step,
                    tokens: m.tokens_seen,
                    bytes: m.bytes(),
                    attempt: m.attempt,
                    written_unix_ms: now_unix_ms(),
                    stall_s: p.stall_s,
                    write_s: p.write_s,
                    url: format!(
                        "{}/{}/{}",
                        cfg.dir.trim_end_matches('/'),
                        job.job_id,
                        ckpt::step_dir(m.step)
                    ),
                });
                job.checkpoints.sort_by_key(|c| c.step);
                true
            }
            Err(why) => {
                let why = format!("step {}: {why}", req.step);
                tracing::warn!(job = %job.job_id, reason = %why, "checkpoint not completed");
                job.checkpoint_errors.push(why);
                let n = job.checkpoint_errors.len();
                job.checkpoint_errors.drain(..n.saturating_sub(10));
                false
            }
        };
        engine.save(&mut state, job).map_err(store_status)?;
        Ok(committed)
    }
}

/// Writes checkpoint `m`'s manifest under `dir`/`job`, then deletes the
/// complete checkpoints beyond the newest `keep_last`. Returns the steps
/// deleted.
async fn commit_checkpoint(
    dir: &str,
    job: &str,
    m: &Manifest,
    keep_last: Option<u64>,
) -> Result<Vec<u64>, String> {
    let loc = Location::parse(dir, true).map_err(|e| e.to_string())?;
    ckpt::write_manifest(&loc, job, m)
        .await
        .map_err(|e| format!("writing the manifest: {e}"))?;
    match keep_last {
        Some(keep) => match ckpt::prune(&loc, job, keep as usize).await {
            Ok(pruned) => Ok(pruned),
            Err(e) => {
                // The checkpoint is complete; an old one stays behind.
                tracing::warn!(job, error = %e, "pruning old checkpoints failed");
                Ok(Vec::new())
            }
        },
        None => Ok(Vec::new()),
    }
}

/// A running coordinator: its address, and a handle to stop it.
pub struct Coordinator {
    pub addr: SocketAddr,
    pub engine: Arc<Engine>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("state folder {path}: {source}")]
    StateDir {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl Coordinator {
    /// Binds, opens the store and serves until [`Coordinator::stop`].
    pub async fn start(mut cfg: CoordinatorConfig) -> Result<Coordinator, StartError> {
        std::fs::create_dir_all(&cfg.state_dir).map_err(|source| StartError::StateDir {
            path: cfg.state_dir.clone(),
            source,
        })?;
        let listener = tokio::net::TcpListener::bind(cfg.listen)
            .await
            .map_err(|source| StartError::Bind {
                addr: cfg.listen,
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| StartError::Bind {
            addr: cfg.listen,
            source,
        })?;
        cfg.listen = addr;
        let engine = Engine::open(cfg)?;
        let worker_host = if addr.ip().is_unspecified() {
            SocketAddr::from(([127, 0, 0, 1], addr.port()))
        } else {
            addr
        };
        *engine.worker_url.lock().expect("url lock") = format!("http://{worker_host}");
        {
            let mut state = engine.lock();
            engine.schedule(&mut state);
        }
        let monitor = engine.clone();
        let monitor_task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            loop {
                tick.tick().await;
                monitor.monitor();
            }
        });
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let incoming = tokio_stream_from(listener);
        let svc_engine = engine.clone();
        let task = tokio::spawn(async move {
            let result = tonic::transport::Server::builder()
                .add_service(JobServiceServer::new(Jobs(svc_engine.clone())))
                .add_service(ControlServiceServer::new(Control(svc_engine.clone())))
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = rx.await;
                })
                .await;
            monitor_task.abort();
            svc_engine.shutdown();
            result
        });
        tracing::info!(%addr, "coordinator listening");
        Ok(Coordinator {
            addr,
            engine,
            shutdown: Some(tx),
            task,
        })
    }

    /// Stops serving, stops running jobs' workers (recorded as failed) and
    /// waits until the server is down.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let _ = (&mut self.task).await;
    }

    /// Serves until the server ends (for the `coordinator` command).
    pub async fn wait(mut self) -> Result<(), tonic::transport::Error> {
        match (&mut self.task).await {
            Ok(r) => r,
            Err(_) => Ok(()),
        }
    }

    pub fn shutdown_handle(&mut self) -> Option<tokio::sync::oneshot::Sender<()>> {
        self.shutdown.take()
    }
}

fn tokio_stream_from(
    listener: tokio::net::TcpListener,
) -> impl Stream<Item = Result<tokio::net::TcpStream, std::io::Error>> {
    futures::stream::unfold(listener, |l| async move {
        let r = l.accept().await.map(|(s, _)| {
            let _ = s.set_nodelay(true);
            s
        });
        Some((r, l))
    })
}
