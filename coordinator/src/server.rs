//! The coordinator's engine and its two gRPC services.
//!
//! One mutex guards the in-memory state: the jobs (a mirror of the
//! store), the queue, one [`Supervisor`] per attempt whose processes are
//! alive, and watchers. It is never held across an `.await`, and nothing
//! slow runs under it: processes are signalled, not waited for (a stopping
//! attempt winds down in the monitor's ticks), step metrics are queued to
//! the store's writer thread, checkpoint manifests are written outside it.
//! Every change to a job is made to the record in the map under one hold
//! of the lock and committed to the [`Store`] before the call that made it
//! is answered; a handler never writes back a copy taken earlier. A panic
//! under the lock does not poison later calls.
//!
//! A job moves QUEUED → RUNNING → (RESTARTING → RUNNING …) → SUCCEEDED,
//! FAILED or CANCELLED. Each RUNNING spell is an attempt: a failure (a
//! process that ended, a silent or hung rank, a rank's own report) stops
//! the attempt's workers and, within `[fault] max_restarts` per
//! `restart_window_s`, starts the next attempt from the latest complete
//! checkpoint. Worker calls carry their attempt; calls of an ended attempt
//! are refused.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::Stream;
use strata_cluster::{
    Inventory, JobLauncher, LaunchSpec, LocalJobLauncher, NodeStatus, Slot, SlurmOptions, StartInfo,
};
use strata_dataplane::checkpoint::{self as ckpt, Manifest, ShardRecord};
use strata_dataplane::loader::{LoaderConfig, Planner};
use strata_dataplane::reader::read_manifest;
use strata_dataplane::store::Location;
use strata_proto::auth::bearer_token;
use strata_proto::v1 as pb;
use strata_proto::v1::control_service_server::{ControlService, ControlServiceServer};
use strata_proto::v1::job_service_server::{JobService, JobServiceServer};
use strata_recipe::{DeviceKind, FaultConfig, Layout, Rank, Recipe};
use tokio::sync::{Notify, broadcast};
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::convert::{checkpoint_to_pb, job_to_pb, state_from_pb, step_from_pb, step_to_pb};
use crate::error::EngineError;
use crate::job::{
    AttemptRecord, BranchOf, CheckpointRecord, JobRecord, JobState, StepRecord, now_unix_ms,
    random_token,
};
use crate::placement::place;
use crate::store::{Store, StoreError};
use crate::supervisor::Supervisor;

/// How a coordinator runs.
#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    pub listen: SocketAddr,
    pub state_dir: PathBuf,
    /// Where workers may run: this machine's CPU slots (processes; they may
    /// oversubscribe the cores), or one slot per GPU. A launcher that
    /// reports its nodes (Slurm) replaces it with theirs.
    pub inventory: Inventory,
    /// The URL workers reach the coordinator at; `None`: the listening
    /// address (on all interfaces: this machine's name, or 127.0.0.1 for
    /// workers on this machine).
    pub advertise_url: Option<String>,
    /// The program workers run (the `strata` binary) and the arguments
    /// before the worker's own (`["worker"]`).
    pub worker_program: PathBuf,
    pub worker_args: Vec<String>,
    /// Extra environment for workers (e.g. `RUST_LOG`, `AWS_*`).
    pub worker_env: Vec<(String, String)>,
    /// The bearer token clients must present; `None` when the coordinator
    /// listens on loopback only.
    pub client_token: Option<String>,
    /// A worker silent for this long fails its attempt.
    pub heartbeat_timeout: Duration,
    /// How long the workers of a cancelled or failed attempt get between
    /// SIGTERM (they save a checkpoint and leave) and SIGKILL.
    pub stop_grace: Duration,
    /// Where to serve HTTP (Prometheus `/metrics`), if anywhere; the same
    /// token rule as gRPC.
    pub http_listen: Option<SocketAddr>,
}

/// What watchers of a job hear.
#[derive(Debug, Clone)]
pub enum Event {
    Job(Box<JobRecord>),
    Step(StepRecord),
}

#[derive(Default)]
pub(crate) struct State {
    pub(crate) jobs: BTreeMap<String, JobRecord>,
    /// Every sweep (a mirror of the store).
    pub(crate) sweeps: BTreeMap<String, crate::sweeps::SweepRecord>,
    /// Jobs waiting for slots, in the order they start: restarting jobs
    /// first, then queued ones by submission.
    queue: Vec<String>,
    /// The attempt of each job whose processes are alive (running or
    /// stopping); it holds their slots until they are gone.
    attempts: HashMap<String, Supervisor>,
    watchers: HashMap<String, broadcast::Sender<Event>>,
}

pub struct Engine {
    cfg: CoordinatorConfig,
    store: Store,
    launcher: Arc<dyn JobLauncher>,
    /// The slots placement uses, and the nodes as the launcher last
    /// reported them.
    inventory: Mutex<(Inventory, Vec<NodeStatus>)>,
    state: Mutex<State>,
    /// Woken when a job's registrations or state change.
    changed: Notify,
    /// The URL workers reach the coordinator at.
    worker_url: Mutex<String>,
    /// Set once shutting down: nothing new is launched.
    stopping: std::sync::atomic::AtomicBool,
    /// Becomes true when the server starts shutting down; watch streams
    /// end then.
    closing: Arc<tokio::sync::watch::Sender<bool>>,
    /// Held by whoever advances or changes sweeps: one at a time.
    pub(crate) advancing: tokio::sync::Mutex<()>,
    /// Seconds between a rank's heartbeats, every job's.
    pub(crate) heartbeat_gaps: prometheus_client::metrics::histogram::Histogram,
}

type Result<T, E = EngineError> = std::result::Result<T, E>;

/// How often a launcher's nodes are asked for again.
const INVENTORY_REFRESH: Duration = Duration::from_secs(10);

/// This machine's name.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

/// A fixed inventory's nodes, as a launcher would report them.
fn static_nodes(inventory: &Inventory) -> Vec<NodeStatus> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as u32;
    inventory
        .nodes()
        .iter()
        .map(|n| NodeStatus {
            name: n.name.clone(),
            cpus,
            gpus: n.gpus,
            slots: n.slots,
            state: "up".into(),
        })
        .collect()
}

/// How long a shutting-down server waits for the calls in flight.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);

/// How long the workers of a failed attempt get between SIGTERM and
/// SIGKILL.
const FAILED_GRACE: Duration = Duration::from_secs(2);

/// The job's `[fault]` settings (the defaults for a recipe that no
/// longer parses).
fn fault_of(job: &JobRecord) -> FaultConfig {
    Recipe::from_toml_str(&job.spec_toml, &job.name)
        .map(|r| r.fault)
        .unwrap_or_default()
}

/// Closes `job`'s current attempt: how it ended, why, and the steps done
/// past its last complete checkpoint.
fn close_attempt(job: &mut JobRecord, end: JobState, cause: &str, interrupted: bool) {
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
fn settle_attempt(job: &mut JobRecord, attempt: u32) {
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

/// A branch's recipe — the parent's, its decay starting at the tokens
/// the chosen checkpoint had seen and lasting `decay_tokens`, the run
/// ending there — and that checkpoint.
fn branch_spec(
    parent: &JobRecord,
    req: &pb::BranchJobRequest,
) -> Result<(String, CheckpointRecord)> {
    let refuse = |m: String| Err(EngineError::Precondition(m));
    let Some(ck) = parent.checkpoints.iter().find(|c| c.step == req.from_step) else {
        let have: Vec<String> = parent
            .checkpoints
            .iter()
            .map(|c| c.step.to_string())
            .collect();
        return refuse(format!(
            "job {}: no complete checkpoint at step {} (it has: {})",
            parent.job_id,
            req.from_step,
            if have.is_empty() {
                "none".into()
            } else {
                have.join(", ")
            }
        ));
    };
    let recipe = Recipe::from_toml_str(&parent.spec_toml, &parent.name)
        .map_err(|e| EngineError::Invalid(format!("job {}'s recipe: {e}", parent.job_id)))?;
    let Some(decay) = recipe.schedule.decay() else {
        return refuse(format!(
            "job {} follows a {} schedule; a branch decays the stable phase of a wsd or power run",
            parent.job_id,
            recipe.schedule.name()
        ));
    };
    if decay.tokens > 0 && ck.tokens > decay.start_tokens {
        return refuse(format!(
            "step {} of job {} ({} tokens) is past the start of its decay ({} tokens): branch from a stable-phase checkpoint",
            ck.step, parent.job_id, ck.tokens, decay.start_tokens
        ));
    }
    if req.decay_tokens == 0 {
        return Err(EngineError::Invalid(
            "decay_tokens: must be positive".into(),
        ));
    }
    let name = if req.name.is_empty() {
        format!("{}-cooldown-{}", parent.name, req.decay_tokens)
    } else {
        req.name.clone()
    };
    let decay = strata_recipe::resume::BranchDecay {
        start_tokens: ck.tokens,
        tokens: req.decay_tokens,
        shape: (!req.decay_shape.is_empty()).then(|| req.decay_shape.clone()),
        final_lr_fraction: req.final_lr_fraction,
    };
    let text = strata_recipe::resume::branch(&parent.spec_toml, &decay, &name)
        .map_err(|e| EngineError::Invalid(format!("job {}'s recipe: {e}", parent.job_id)))?;
    Ok((text, ck.clone()))
}

/// Readies `job` for its next attempt: from the latest checkpoint when it
/// has one, otherwise from scratch, forgetting the steps after that point.
fn prepare_restart(store: &Store, job: &mut JobRecord) -> Result<()> {
    let from = job.restart_step();
    job.state = JobState::Restarting;
    // The latest own checkpoint (0), or a branch's parent's step.
    job.resume_from = match (job.last_checkpoint(), from) {
        (Some(_), _) => Some(0),
        (None, from) => from,
    };
    let step = from.unwrap_or(0);
    let tps = job.tokens_done.checked_div(job.steps_done).unwrap_or(0);
    job.steps_done = step;
    job.tokens_done = step * tps;
    store.put_job_truncating(job, step)?;
    Ok(())
}

impl Engine {
    /// Opens the store in `cfg.state_dir`. Jobs that were running when the
    /// coordinator last stopped get a new attempt from their latest
    /// checkpoint (their workers went with that coordinator); queued jobs
    /// stay queued.
    pub fn open(cfg: CoordinatorConfig, launcher: Arc<dyn JobLauncher>) -> Result<Arc<Engine>> {
        let store = Store::open(&cfg.state_dir)?;
        let nodes = match launcher.inventory() {
            Some(Ok(nodes)) => nodes,
            Some(Err(e)) => return Err(EngineError::Unavailable(e.to_string())),
            None => static_nodes(&cfg.inventory),
        };
        let inventory = Inventory::from_status(&nodes).unwrap_or_else(|| cfg.inventory.clone());
        // Allocations a previous coordinator on this state left: their
        // workers are stopped, and their jobs go on from checkpoints.
        let reclaimed = launcher.reclaim();
        let mut state = State::default();
        let mut jobs = store.jobs()?;
        jobs.sort_by_key(|j| (j.submitted_unix_ms, j.job_id.clone()));
        let mut restarting = Vec::new();
        for mut job in jobs {
            // Progress is written with the step metrics, not with every
            // change of the record.
            if let Some(last) = store.last_step(&job.job_id)?
                && last.step > job.steps_done
            {
                job.steps_done = last.step;
                job.tokens_done = last.tokens;
                job.last_loss = Some(last.loss);
            }
            if matches!(job.state, JobState::Running | JobState::Restarting) {
                let cause = if reclaimed.is_empty() {
                    "the coordinator stopped, and the attempt's workers with it".to_string()
                } else {
                    format!(
                        "the coordinator stopped; the next one cancelled what it left running ({})",
                        reclaimed.join(", ")
                    )
                };
                close_attempt(&mut job, JobState::Failed, &cause, true);
                prepare_restart(&store, &mut job)?;
                tracing::warn!(job = %job.job_id, from_step = job.steps_done, "resuming a job the previous coordinator left running");
                restarting.push(job.job_id.clone());
            } else if job.state == JobState::Queued {
                state.queue.push(job.job_id.clone());
            }
            state.jobs.insert(job.job_id.clone(), job);
        }
        restarting.append(&mut state.queue);
        state.queue = restarting;
        for s in store.sweeps()? {
            state.sweeps.insert(s.sweep_id.clone(), s);
        }
        Ok(Arc::new(Engine {
            worker_url: Mutex::new(format!("http://{}", cfg.listen)),
            cfg,
            store,
            launcher,
            inventory: Mutex::new((inventory, nodes)),
            state: Mutex::new(state),
            changed: Notify::new(),
            stopping: std::sync::atomic::AtomicBool::new(false),
            closing: Arc::new(tokio::sync::watch::Sender::new(false)),
            advancing: tokio::sync::Mutex::new(()),
            heartbeat_gaps: crate::http::heartbeat_histogram(),
        }))
    }

    /// The state, even after a panic under the lock: every change to a job
    /// is made whole before it is stored, so what a panic interrupted is at
    /// worst not done, and later calls must still be served.
    pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|poisoned| {
            tracing::error!("a call panicked while holding the coordinator's lock; going on");
            self.state.clear_poison();
            poisoned.into_inner()
        })
    }

    pub(crate) fn store(&self) -> &Store {
        &self.store
    }

    /// Whether the coordinator is shutting down (nothing new starts).
    pub(crate) fn is_stopping(&self) -> bool {
        self.stopping.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Tells `job`'s watchers; once it has ended, its channel is dropped
    /// (watchers still get what was sent, then the stream ends).
    fn publish(state: &mut State, job: &JobRecord) {
        if let Some(tx) = state.watchers.get(&job.job_id) {
            let _ = tx.send(Event::Job(Box::new(job.clone())));
        }
        if job.state.is_final() {
            state.watchers.remove(&job.job_id);
        }
    }

    /// Commits `job`, mirrors it and tells its watchers.
    fn save(&self, state: &mut State, job: JobRecord) -> Result<()> {
        self.store.put_job(&job)?;
        self.mirror(state, job);
        Ok(())
    }

    /// Mirrors `job`, already committed, and tells its watchers.
    fn mirror(&self, state: &mut State, job: JobRecord) {
        Engine::publish(state, &job);
        state.jobs.insert(job.job_id.clone(), job);
        self.changed.notify_waiters();
    }

    /// Applies `f` to job `id`'s record, commits it and tells watchers,
    /// all under the caller's hold of the lock.
    fn update(
        &self,
        state: &mut State,
        id: &str,
        f: impl FnOnce(&mut JobRecord),
    ) -> Result<JobRecord> {
        let mut job = state
            .jobs
            .get(id)
            .cloned()
            .ok_or_else(|| EngineError::NotFound(format!("no job {id}")))?;
        f(&mut job);
        self.save(state, job.clone())?;
        Ok(job)
    }

    /// Every job with what its live attempt waits for, the queue's length
    /// and the slots leased, as they are now (for `/metrics` and the
    /// dashboard).
    pub(crate) fn snapshot(&self) -> (Vec<(JobRecord, Option<String>)>, usize, usize) {
        let state = self.lock();
        let jobs = state
            .jobs
            .values()
            .map(|j| {
                let waiting = state
                    .attempts
                    .get(&j.job_id)
                    .and_then(|s| s.waiting.clone());
                (j.clone(), waiting)
            })
            .collect();
        (jobs, state.queue.len(), Engine::leased(&state).len())
    }

    /// The ranks of job `id`'s live attempt (none when no processes are
    /// alive).
    pub(crate) fn ranks_now(&self, id: &str) -> Vec<crate::supervisor::RankView> {
        self.lock()
            .attempts
            .get(id)
            .map(|s| s.ranks_view())
            .unwrap_or_default()
    }

    /// Job `id`, what its live attempt waits for and that attempt's
    /// ranks (empty when no processes are alive).
    pub(crate) fn job_now(
        &self,
        id: &str,
    ) -> Option<(JobRecord, Option<String>, Vec<crate::supervisor::RankView>)> {
        let state = self.lock();
        let job = state.jobs.get(id)?.clone();
        let sup = state.attempts.get(id);
        Some((
            job,
            sup.and_then(|s| s.waiting.clone()),
            sup.map(|s| s.ranks_view()).unwrap_or_default(),
        ))
    }

    /// Job `id` now and, unless it has ended, a receiver of what happens
    /// to it next: subscribed under the lock, so that history read after
    /// this call misses nothing.
    pub(crate) fn subscribe(&self, id: &str) -> Result<(JobRecord, broadcast::Receiver<Event>)> {
        let mut state = self.lock();
        let job = state
            .jobs
            .get(id)
            .cloned()
            .ok_or_else(|| EngineError::NotFound(format!("no job {id}")))?;
        // An ended job's stream ends after its history: no channel.
        let rx = if job.state.is_final() {
            broadcast::channel(1).1
        } else {
            state
                .watchers
                .entry(id.to_string())
                .or_insert_with(|| broadcast::channel(4096).0)
                .subscribe()
        };
        Ok((job, rx))
    }

    /// Becomes true when the coordinator starts shutting down.
    pub(crate) fn closing(&self) -> tokio::sync::watch::Receiver<bool> {
        self.closing.subscribe()
    }

    /// The slots whose processes are alive.
    fn leased(state: &State) -> HashSet<Slot> {
        state
            .attempts
            .values()
            .flat_map(|s| s.slots.iter().cloned())
            .collect()
    }

    fn free_slots(&self, state: &State) -> u32 {
        let inventory = self.inventory();
        let leased = Engine::leased(state)
            .iter()
            .filter(|s| inventory.nodes().iter().any(|n| n.name == s.node))
            .count() as u32;
        inventory.total_slots().saturating_sub(leased)
    }

    /// Where workers run, in words.
    pub fn launcher_description(&self) -> String {
        self.launcher.describe()
    }

    /// The slots placement uses now.
    pub fn inventory(&self) -> Inventory {
        self.inventory
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .0
            .clone()
    }

    /// The nodes as the launcher last reported them, with the slots this
    /// coordinator's jobs lease on each.
    pub fn nodes(&self) -> Vec<(NodeStatus, u32)> {
        let nodes = self
            .inventory
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .1
            .clone();
        let leased = Engine::leased(&self.lock());
        nodes
            .into_iter()
            .map(|n| {
                let used = leased.iter().filter(|s| s.node == n.name).count() as u32;
                (n, used)
            })
            .collect()
    }

    /// Asks the launcher for its nodes again (Slurm: a drained node takes
    /// no new ranks); called periodically, off the engine's lock.
    pub fn refresh_inventory(&self) {
        match self.launcher.inventory() {
            None => {}
            Some(Ok(nodes)) => {
                let mut inv = self.inventory.lock().unwrap_or_else(|e| e.into_inner());
                match Inventory::from_status(&nodes) {
                    Some(usable) => inv.0 = usable,
                    None => tracing::warn!("no node takes work now; keeping the last inventory"),
                }
                inv.1 = nodes;
            }
            Some(Err(e)) => tracing::warn!(error = %e, "cannot refresh the inventory"),
        }
    }

    /// Starts waiting jobs in queue order while they fit; a restarting job
    /// waits for its previous attempt's processes to be gone.
    fn schedule(&self, state: &mut State) {
        if self.stopping.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        while let Some(id) = state.queue.first().cloned() {
            let Some(job) = state.jobs.get(&id).cloned() else {
                state.queue.remove(0);
                continue;
            };
            if !matches!(job.state, JobState::Queued | JobState::Restarting) {
                state.queue.remove(0);
                continue;
            }
            if state.attempts.contains_key(&id) || job.layout.world_size() > self.free_slots(state)
            {
                break;
            }
            state.queue.remove(0);
            if let Err(e) = self.launch(state, job) {
                tracing::error!(job = %id, error = %e, "job store failure while launching");
            }
        }
    }

    fn launch(&self, state: &mut State, mut job: JobRecord) -> Result<()> {
        let world = job.layout.world_size();
        let span = tracing::info_span!(
            "launch",
            job = %job.job_id,
            attempt = job.attempt() + 1,
            world,
            layout = %job.layout
        );
        let _in = span.enter();
        let fail = |state: &mut State, mut job: JobRecord, why: String| {
            tracing::error!(job = %job.job_id, reason = %why, "job failed to start");
            close_attempt(&mut job, JobState::Failed, &why, false);
            job.state = JobState::Failed;
            job.failure_reason = why;
            job.finished_unix_ms = now_unix_ms();
            self.save(state, job)
        };
        let placed = tracing::info_span!("place")
            .in_scope(|| place(job.layout, &self.inventory(), &Engine::leased(state)));
        let placement = match placed {
            Ok(p) => p,
            Err(e) => return fail(state, job, e.to_string()),
        };
        let url = self
            .worker_url
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        // Workers on this machine share its cores: each CPU backend gets
        // its share of threads (oversubscribed, two workers on two cores
        // trained 12% slower), unless the operator chose a count.
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get())
            / placement.assignments.len().max(1);
        let set_threads = self.launcher.shares_this_machine()
            && std::env::var_os("RAYON_NUM_THREADS").is_none()
            && !self
                .cfg
                .worker_env
                .iter()
                .any(|(k, _)| k == "RAYON_NUM_THREADS");
        let attempt = job.attempt() + 1;
        let mut on_node: HashMap<&str, u32> = HashMap::new();
        let mut specs = Vec::with_capacity(world as usize);
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
                "--attempt".into(),
                attempt.to_string(),
            ]);
            let mut env = self.cfg.worker_env.clone();
            env.push(("STRATA_JOB_TOKEN".into(), job.worker_token.clone()));
            env.push(("STRATA_RANK".into(), rank.to_string()));
            env.push(("STRATA_LOCAL_RANK".into(), local_rank.to_string()));
            *local_rank += 1;
            if set_threads {
                env.push(("RAYON_NUM_THREADS".into(), threads.max(1).to_string()));
            }
            // The workers' spans join this launch's trace.
            if let Some(parent) = traceparent(&span) {
                env.push(("TRACEPARENT".into(), parent));
            }
            specs.push(LaunchSpec {
                rank,
                slot: a.slot.clone(),
                program: self.cfg.worker_program.clone(),
                args,
                env,
                log_path: PathBuf::from(&job.run_dir)
                    .join(format!("attempt-{attempt}"))
                    .join(format!("rank-{rank}.log")),
            });
        }
        let slurm = Recipe::from_toml_str(&job.spec_toml, &job.name)
            .map(|r| r.slurm)
            .unwrap_or_default();
        let info = StartInfo {
            job: job.job_id.clone(),
            attempt,
            slurm: SlurmOptions {
                partition: slurm.partition,
                account: slurm.account,
                qos: slurm.qos,
                time: slurm.time,
            },
        };
        let started = tracing::info_span!("start_ranks", launcher = %self.launcher.describe())
            .in_scope(|| self.launcher.start(&specs, &info));
        let ranks = match started {
            Ok(r) => r,
            Err(e) => return fail(state, job, e.to_string()),
        };
        tracing::info!(job = %job.job_id, world, attempt, from_step = job.steps_done, "launched workers");
        job.state = JobState::Running;
        job.started_unix_ms = now_unix_ms();
        job.attempts.push(AttemptRecord {
            number: attempt,
            started_unix_ms: job.started_unix_ms,
            ended_unix_ms: 0,
            from_step: if job.resume_from.is_some() {
                job.steps_done
            } else {
                0
            },
            end_state: None,
            cause: String::new(),
            steps_lost: 0,
            last_step: job.steps_done,
            interrupted: false,
        });
        let hang = Duration::from_secs(fault_of(&job).hang_timeout_s);
        state.attempts.insert(
            job.job_id.clone(),
            Supervisor::new(
                attempt,
                placement
                    .assignments
                    .iter()
                    .map(|a| a.slot.clone())
                    .collect(),
                ranks,
                job.steps_done,
                hang,
            ),
        );
        self.save(state, job)
    }

    /// Ends a job for good (succeeded, cancelled, or failed with no
    /// restart left): closes its attempt, asks its workers to stop within
    /// `grace`, records why, and starts whatever now fits.
    fn end(
        &self,
        state: &mut State,
        id: &str,
        to: JobState,
        reason: String,
        grace: Duration,
    ) -> Result<()> {
        let Some(job) = state.jobs.get(id) else {
            return Ok(());
        };
        if !job.state.can_become(to) {
            return Ok(());
        }
        if let Some(sup) = state.attempts.get_mut(id) {
            sup.stop(grace);
        }
        state.queue.retain(|q| q != id);
        match to {
            JobState::Failed => tracing::error!(job = %id, reason = %reason, "job failed"),
            _ => tracing::info!(job = %id, state = to.name(), reason = %reason, "job ended"),
        }
        self.update(state, id, |job| {
            close_attempt(job, to, &reason, false);
            job.state = to;
            job.finished_unix_ms = now_unix_ms();
            job.failure_reason = reason;
            job.resume_from = None;
        })?;
        self.schedule(state);
        Ok(())
    }

    /// Attempt `attempt` of job `id` cannot go on because of `cause`: its
    /// workers are stopped, and the job restarts from its latest
    /// checkpoint unless it has failed `[fault] max_restarts` times within
    /// `restart_window_s` already; then it fails, naming every attempt's
    /// cause.
    fn fail_attempt(&self, state: &mut State, id: &str, attempt: u32, cause: String) -> Result<()> {
        let Some(job) = state.jobs.get(id).cloned() else {
            return Ok(());
        };
        if job.state != JobState::Running || job.attempt() != attempt {
            return Ok(());
        }
        let fault = fault_of(&job);
        let now = now_unix_ms();
        let window_start = now - (fault.restart_window_s as i64).saturating_mul(1000);
        // A time limit or a preemption is the cluster's schedule, not a
        // failure: it does not count toward the restart limit.
        let interruption = state
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
            return self.end(state, id, JobState::Failed, reason, FAILED_GRACE);
        }
        tracing::warn!(job = %id, attempt, reason = %cause, restart = failures, of = fault.max_restarts, "attempt failed; restarting");
        // A failed attempt's group is broken: nothing is left to save, and
        // a stopped or hung rank never answers SIGTERM.
        if let Some(sup) = state.attempts.get_mut(id) {
            sup.stop(FAILED_GRACE);
        }
        let mut job = job;
        close_attempt(&mut job, JobState::Failed, &cause, interruption);
        job.failure_reason = if interruption {
            format!("attempt {attempt} was interrupted (not counted as a failure): {cause}")
        } else {
            format!(
                "attempt {attempt} failed ({} of {} restarts): {cause}",
                failures, fault.max_restarts
            )
        };
        prepare_restart(&self.store, &mut job)?;
        self.mirror(state, job);
        state.queue.retain(|q| q != id);
        state.queue.insert(0, id.to_string());
        Ok(())
    }

    /// Checks running attempts (processes, heartbeats, progress), winds
    /// down stopping ones, and starts what fits; called periodically.
    pub fn monitor(&self) {
        let mut state = self.lock();
        let mut failures = Vec::new();
        let mut gone = Vec::new();
        for (id, sup) in state.attempts.iter_mut() {
            if sup.is_running() {
                if let Some(why) = sup.check(self.cfg.heartbeat_timeout) {
                    failures.push((id.clone(), sup.attempt, why));
                }
            } else if sup.wind_down() {
                gone.push(id.clone());
            }
        }
        for (id, attempt, why) in failures {
            if let Err(e) = self.fail_attempt(&mut state, &id, attempt, why) {
                tracing::error!(job = %id, error = %e, "job store failure");
            }
        }
        for id in gone {
            state.attempts.remove(&id);
        }
        self.schedule(&mut state);
    }

    /// Stops every worker (the coordinator is shutting down): SIGTERM,
    /// then SIGKILL for any still there after a few seconds. Their jobs
    /// stay RUNNING in the store, and the next coordinator on this state
    /// folder continues them from their latest checkpoints.
    pub fn shutdown(&self) {
        self.stopping
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let mut state = self.lock();
        for sup in state.attempts.values_mut() {
            sup.stop(Duration::from_secs(3));
        }
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline && !state.attempts.values_mut().all(|s| s.wind_down()) {
            std::thread::sleep(Duration::from_millis(50));
        }
        for sup in state.attempts.values_mut() {
            sup.kill();
        }
        state.attempts.clear();
        drop(state);
        self.store.close();
    }

    /// Checks a worker call: its job's token, a rank in the world, and the
    /// job's current attempt (a worker of an ended attempt is refused, so
    /// it cannot disturb the next one). The job as it is now, to read.
    fn check_worker(
        &self,
        req_meta: &tonic::metadata::MetadataMap,
        job_id: &str,
        rank: u32,
        attempt: u32,
    ) -> Result<JobRecord> {
        let state = self.lock();
        let job = state
            .jobs
            .get(job_id)
            .ok_or_else(|| EngineError::NotFound(format!("no job {job_id}")))?;
        if bearer_token(req_meta) != Some(job.worker_token.as_str()) {
            tracing::warn!(job = %job_id, rank, "worker call with a wrong or missing job token");
            return Err(EngineError::Unauthenticated(format!(
                "job {job_id}: wrong or missing worker token"
            )));
        }
        if rank >= job.layout.world_size() {
            return Err(EngineError::Invalid(format!(
                "rank {rank} is outside job {job_id}'s world of {}",
                job.layout.world_size()
            )));
        }
        if attempt != job.attempt() {
            tracing::warn!(job = %job_id, rank, attempt, current = job.attempt(), "call from a worker of another attempt");
            return Err(EngineError::Precondition(format!(
                "job {job_id}: attempt {attempt} has ended; the job is on attempt {}",
                job.attempt()
            )));
        }
        Ok(job.clone())
    }

    /// A panic under the engine's lock, for the test that later calls are
    /// still served.
    #[cfg(test)]
    fn panic_under_lock(&self) {
        let _state = self.lock();
        panic!("a bug under the lock");
    }
}

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
    fn authorize<T>(&self, req: &Request<T>) -> Result<()> {
        if let Some(token) = &self.0.cfg.client_token
            && bearer_token(req.metadata()) != Some(token.as_str())
        {
            tracing::warn!(peer = ?req.remote_addr(), "client call with a wrong or missing token");
            return Err(EngineError::Unauthenticated(
                "wrong or missing bearer token (see the coordinator's --token-file)".into(),
            ));
        }
        Ok(())
    }

    fn job(&self, id: &str) -> Result<JobRecord> {
        self.0
            .lock()
            .jobs
            .get(id)
            .cloned()
            .ok_or_else(|| EngineError::NotFound(format!("no job {id}")))
    }

    /// Records a validated job and queues it; a branch starts from its
    /// parent's checkpoint (the step and the tokens seen there).
    pub(crate) fn queue_new(
        &self,
        recipe: &Recipe,
        spec_toml: String,
        parent: Option<(BranchOf, u64)>,
    ) -> Result<String> {
        let engine = &self.0;
        let n = engine.store.next_job_number()?;
        let job_id = format!("{}-{n}", crate::sweeps::slug(&recipe.name));
        let run_dir = engine.cfg.state_dir.join("runs").join(&job_id);
        let job = JobRecord {
            job_id: job_id.clone(),
            name: recipe.name.clone(),
            spec_toml,
            state: JobState::Queued,
            layout: recipe.parallel.layout,
            microbatches: recipe.parallel.microbatches,
            steps_total: recipe.data.n_steps(),
            steps_done: parent.as_ref().map_or(0, |(p, _)| p.step),
            tokens_done: parent.as_ref().map_or(0, |(_, tokens)| *tokens),
            last_loss: None,
            failure_reason: String::new(),
            submitted_unix_ms: now_unix_ms(),
            started_unix_ms: 0,
            finished_unix_ms: 0,
            run_dir: run_dir.display().to_string(),
            worker_token: random_token()
                .map_err(|e| EngineError::Unavailable(format!("token: {e}")))?,
            attempts: Vec::new(),
            checkpoints: Vec::new(),
            resume_from: parent.as_ref().map(|(p, _)| p.step),
            checkpoint_errors: Vec::new(),
            parent: parent.as_ref().map(|(p, _)| p.clone()),
        };
        let mut state = engine.lock();
        engine.save(&mut state, job)?;
        state.queue.push(job_id.clone());
        tracing::info!(job = %job_id, world = recipe.parallel.layout.world_size(), "job queued");
        engine.schedule(&mut state);
        Ok(job_id)
    }

    /// Refuses what cannot run: an invalid recipe (a layout that cannot
    /// split the model among them), more ranks than slots, a dataset that
    /// is missing or cannot feed the recipe.
    pub(crate) async fn validate(&self, spec: &str, default_name: &str) -> Result<Recipe> {
        let recipe = Recipe::from_toml_str(spec, default_name)
            .map_err(|e| EngineError::Invalid(e.to_string()))?;
        // The recipe's validation refused layouts that cannot split the
        // model (heads, KV heads, d_ffn, stages without layers).
        let layout = recipe.parallel.layout;
        let inventory = &self.0.inventory();
        if let Some(t) = &recipe.slurm.time
            && strata_cluster::slurm::parse_slurm_time(t).is_none()
        {
            return Err(EngineError::Invalid(format!(
                "slurm.time: {t:?} is not a Slurm time limit (MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS)"
            )));
        }
        if recipe.device == DeviceKind::Cuda && !inventory.has_gpus() {
            return Err(EngineError::Precondition(
                "device.backend: the recipe trains on cuda and this coordinator has no GPUs \
                 (start it with --gpus N on a machine with NVIDIA GPUs, from a strata built \
                 with --features cuda)"
                    .into(),
            ));
        }
        let slots = inventory.total_slots();
        if layout.world_size() > slots {
            let what = if inventory.has_gpus() {
                "GPUs (one worker each)"
            } else {
                "worker slots"
            };
            let nodes: Vec<String> = inventory
                .nodes()
                .iter()
                .map(|n| format!("{} {}", n.name, n.slots))
                .collect();
            return Err(EngineError::Exhausted(format!(
                "parallel: the job needs {} worker slots (tp·pp·dp = {}·{}·{}) and this coordinator has {slots} {what} on {} ({}: {})",
                layout.world_size(),
                layout.tp,
                layout.pp,
                layout.dp,
                self.0.launcher.describe(),
                if nodes.len() == 1 { "1 node" } else { "nodes" },
                nodes.join(", ")
            )));
        }
        let url = &recipe.data.dataset;
        let bad_data = |why: String| EngineError::Invalid(format!("data.dataset: {why}"));
        let loc = Location::parse(url, false).map_err(|e| bad_data(e.to_string()))?;
        let manifest = read_manifest(&loc)
            .await
            .map_err(|e| bad_data(e.to_string()))?;
        if u64::from(manifest.tokenizer.vocab_size) > recipe.model.vocab_size {
            return Err(EngineError::Invalid(format!(
                "model.vocab_size: {} is smaller than the dataset's tokenizer ({}, {} ids)",
                recipe.model.vocab_size, manifest.tokenizer.name, manifest.tokenizer.vocab_size
            )));
        }
        Planner::new(&manifest, &LoaderConfig::for_recipe(&recipe, 0))
            .map_err(|e| bad_data(format!("{url}: {e}")))?;
        if let Some(ev) = &recipe.eval {
            let window = recipe.model.max_seq_len + 1;
            let Some(h) = &manifest.holdout else {
                return Err(EngineError::Invalid(format!(
                    "eval: the dataset {url} has no held-out split (decompose it with --holdout-fraction F)"
                )));
            };
            let need = u64::from(layout.dp) * u64::from(recipe.parallel.microbatches.max(1));
            let rows = ev.rows(recipe.model.max_seq_len).min(h.n_tokens / window);
            if rows < need {
                return Err(EngineError::Invalid(format!(
                    "eval.tokens: the held-out split of {url} has {} tokens, {rows} windows of {window} for this evaluation; {need} are needed (dp · microbatches)",
                    h.n_tokens
                )));
            }
        }
        Ok(recipe)
    }

    /// Queues a cooldown branch of `req.parent_id`; its job id.
    pub(crate) async fn branch(&self, req: &pb::BranchJobRequest) -> Result<String> {
        let parent = self.job(&req.parent_id)?;
        let (spec, ck) = branch_spec(&parent, req)?;
        let recipe = match self.validate(&spec, &parent.name).await {
            Ok(r) => r,
            Err(e) => {
                tracing::info!(reason = %e, "refused a branch");
                return Err(EngineError::Invalid(format!("the branch's recipe: {e}")));
            }
        };
        let id = self.queue_new(
            &recipe,
            spec,
            Some((
                BranchOf {
                    job: parent.job_id.clone(),
                    step: ck.step,
                },
                ck.tokens,
            )),
        )?;
        tracing::info!(job = %id, parent = %parent.job_id, from_step = ck.step, "branch queued");
        Ok(id)
    }

    /// Cancels job `id` unless it has ended; its workers get the grace
    /// period to save a checkpoint and leave.
    pub(crate) fn cancel_live(&self, id: &str, reason: &str) -> Result<()> {
        let engine = &self.0;
        let mut state = engine.lock();
        if state.jobs.get(id).is_some_and(|j| !j.state.is_final()) {
            engine.end(
                &mut state,
                id,
                JobState::Cancelled,
                reason.to_string(),
                engine.cfg.stop_grace,
            )?;
        }
        Ok(())
    }

    /// Checks that `job` can continue from a checkpoint and returns its
    /// new recipe text, the recipe, and the checkpoint chosen.
    async fn plan_resume(
        &self,
        job: &JobRecord,
        req: &pb::ResumeJobRequest,
    ) -> Result<(String, Recipe, Manifest)> {
        let refuse = |m: String| Err(EngineError::Precondition(m));
        if !job.state.is_final() {
            return refuse(format!(
                "job {} is {}; only an ended job resumes (cancel it first)",
                job.job_id,
                job.state.name()
            ));
        }
        let recipe = Recipe::from_toml_str(&job.spec_toml, &job.name)
            .map_err(|e| EngineError::Invalid(format!("the job's recipe: {e}")))?;
        let Some(cfg) = recipe.checkpoint.clone() else {
            return refuse(format!(
                "job {} has no [checkpoint] section: it saved nothing to resume from",
                job.job_id
            ));
        };
        let loc = Location::parse(&cfg.dir, false)
            .map_err(|e| EngineError::Precondition(format!("checkpoint.dir: {e}")))?;
        let (found, unreadable) = ckpt::list(&loc, &job.job_id)
            .await
            .map_err(|e| EngineError::Unavailable(format!("checkpoint.dir: {e}")))?;
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
            .map_err(|e| EngineError::Invalid(format!("changing the layout: {e}")))?
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
                .map_err(|e| EngineError::Unavailable(format!("deleting step {}: {e}", m.step)))?;
            tracing::info!(job = %job.job_id, step = m.step, "deleted a checkpoint the resume abandons");
        }
        Ok((spec, now, chosen))
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
        let span = tracing::info_span!("submit", job = tracing::field::Empty);
        async move {
            let default_name = if req.default_name.is_empty() {
                "job"
            } else {
                &req.default_name
            };
            let recipe = match self.validate(&req.spec_toml, default_name).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::info!(reason = %e, "refused a job");
                    return Err(e.into());
                }
            };
            let job_id = self.queue_new(&recipe, req.spec_toml, None)?;
            tracing::Span::current().record("job", job_id.as_str());
            Ok(Response::new(pb::SubmitJobResponse { job_id }))
        }
        .instrument(span)
        .await
    }

    async fn branch_job(
        &self,
        req: Request<pb::BranchJobRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        self.authorize(&req)?;
        let id = self.branch(&req.into_inner()).await?;
        Ok(Response::new(job_to_pb(&self.job(&id)?)))
    }

    async fn submit_sweep(
        &self,
        req: Request<pb::SubmitSweepRequest>,
    ) -> Result<Response<pb::Sweep>, Status> {
        self.authorize(&req)?;
        let id = match Jobs::submit_sweep(self, &req.get_ref().sweep_toml).await {
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
            sweeps: self.list_sweeps_pb(),
        }))
    }

    async fn cancel_sweep(
        &self,
        req: Request<pb::CancelSweepRequest>,
    ) -> Result<Response<pb::Sweep>, Status> {
        self.authorize(&req)?;
        let req = req.into_inner();
        Jobs::cancel_sweep(self, &req.sweep_id, &req.reason).await?;
        Ok(Response::new(self.sweep_pb(&req.sweep_id)?))
    }

    async fn resubmit_sweep(
        &self,
        req: Request<pb::ResubmitSweepRequest>,
    ) -> Result<Response<pb::Sweep>, Status> {
        self.authorize(&req)?;
        let id = &req.get_ref().sweep_id;
        Jobs::resubmit_sweep(self, id).await?;
        Ok(Response::new(self.sweep_pb(id)?))
    }

    async fn get_job(&self, req: Request<pb::GetJobRequest>) -> Result<Response<pb::Job>, Status> {
        self.authorize(&req)?;
        let state = self.0.lock();
        let id = &req.get_ref().job_id;
        let job = state
            .jobs
            .get(id)
            .ok_or_else(|| EngineError::NotFound(format!("no job {id}")))?;
        Ok(Response::new(live_job_to_pb(&state, job)))
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
            jobs: jobs
                .into_iter()
                .map(|j| live_job_to_pb(&state, j))
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
        let engine = &self.0;
        let mut state = engine.lock();
        let job = state
            .jobs
            .get(&req.job_id)
            .ok_or_else(|| EngineError::NotFound(format!("no job {}", req.job_id)))?;
        if job.state.is_final() {
            return Err(EngineError::Precondition(format!(
                "job {} already {}",
                job.job_id,
                job.state.name()
            ))
            .into());
        }
        // The workers get the grace period to save a checkpoint and leave.
        engine.end(
            &mut state,
            &req.job_id,
            JobState::Cancelled,
            reason,
            engine.cfg.stop_grace,
        )?;
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
        let (job, rx) = engine.subscribe(&req.job_id)?;
        let history = tokio::task::spawn_blocking(move || {
            engine.store.flush()?;
            engine.store.steps(&req.job_id, req.from_step, 0)
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(EngineError::from)?;
        let mut closing = self.0.closing.subscribe();
        let stream = futures::StreamExt::take_until(
            watch_stream(job, history, rx),
            Box::pin(async move {
                let _ = closing.wait_for(|c| *c).await;
            }),
        );
        Ok(Response::new(Box::pin(stream)))
    }

    async fn get_metrics(
        &self,
        req: Request<pb::GetMetricsRequest>,
    ) -> Result<Response<pb::GetMetricsResponse>, Status> {
        self.authorize(&req)?;
        let req = req.into_inner();
        self.job(&req.job_id)?;
        let engine = self.0.clone();
        let limit = if req.limit == 0 {
            PAGE_STEPS
        } else {
            (req.limit as usize).min(PAGE_STEPS)
        };
        // Whole steps up to the page's size, read no further than the
        // first that does not fit: its step starts the next page.
        let page = tokio::task::spawn_blocking(move || {
            engine.store.flush()?;
            let mut page = pb::GetMetricsResponse::default();
            let mut bytes = 0;
            engine.store.visit_steps(&req.job_id, req.from_step, |s| {
                let m = step_to_pb(&s);
                let len = strata_proto::encoded_len(&m) + 8;
                if page.steps.len() == limit || (bytes + len > PAGE_BYTES && !page.steps.is_empty())
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
        let req = req.into_inner();
        let job = self.job(&req.job_id)?;
        let (spec, recipe, chosen) = self.plan_resume(&job, &req).await?;
        let engine = &self.0;
        let mut state = engine.lock();
        let Some(mut job) = state.jobs.get(&req.job_id).cloned() else {
            return Err(EngineError::NotFound(format!("no job {}", req.job_id)).into());
        };
        if !job.state.can_become(JobState::Queued) {
            return Err(EngineError::Precondition(format!(
                "job {} is {}",
                job.job_id,
                job.state.name()
            ))
            .into());
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
            .map_err(EngineError::from)?;
        tracing::info!(job = %job.job_id, from_step = chosen.step, layout = %job.layout, "job resumes");
        state.queue.push(job.job_id.clone());
        engine.mirror(&mut state, job);
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

    async fn list_nodes(
        &self,
        req: Request<pb::ListNodesRequest>,
    ) -> Result<Response<pb::ListNodesResponse>, Status> {
        self.authorize(&req)?;
        let nodes = self
            .0
            .nodes()
            .into_iter()
            .map(|(n, leased)| pb::NodeInfo {
                name: n.name,
                cpus: n.cpus,
                gpus: n.gpus,
                slots: n.slots,
                leased,
                state: n.state,
            })
            .collect();
        Ok(Response::new(pb::ListNodesResponse {
            nodes,
            launcher: self.0.launcher.describe(),
        }))
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
        let sup = running(&mut state, &req.job_id)?;
        sup.addrs[req.rank as usize] = Some(req.collective_addr.clone());
        let _ = sup.beat(req.rank as usize, None);
        tracing::info!(job = %req.job_id, rank = req.rank, attempt = req.attempt, host = %req.host, pid = req.pid, collective = %req.collective_addr, "worker registered");
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
                let mut state = engine.lock();
                let sup = running(&mut state, &req.job_id)?;
                if sup.attempt != req.attempt {
                    return Err(EngineError::Precondition(format!(
                        "job {}: attempt {} has ended",
                        req.job_id, req.attempt
                    ))
                    .into());
                }
                if sup.addrs.iter().all(Option::is_some) {
                    break sup.addrs.iter().flatten().cloned().collect::<Vec<_>>();
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
            // A branch without checkpoints of its own starts from its
            // parent's.
            resume_from_job: match &job.parent {
                Some(p) if job.checkpoints.is_empty() => p.job.clone(),
                _ => String::new(),
            },
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
        match state.attempts.get_mut(&req.job_id) {
            Some(sup) if sup.is_running() => {
                let gap = sup.beat(req.rank as usize, Some(req.step));
                engine.heartbeat_gaps.observe(gap.as_secs_f64());
                if let Some(t) = req.times {
                    sup.last_steps[req.rank as usize] = Some(crate::supervisor::RankStep {
                        step: req.times_step,
                        wall_s: req.step_wall_s,
                        data_s: t.data_s,
                        forward_s: t.forward_s,
                        backward_s: t.backward_s,
                        all_reduce_s: t.all_reduce_s,
                        optimizer_s: t.optimizer_s,
                    });
                }
                Ok(Response::new(pb::HeartbeatResponse {
                    stop: false,
                    stop_reason: String::new(),
                }))
            }
            _ => Ok(Response::new(pb::HeartbeatResponse {
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
        engine.check_worker(&meta, &req.job_id, req.rank, req.attempt)?;
        let steps: Vec<StepRecord> = req.steps.iter().map(step_from_pb).collect();
        let Some(last) = steps.last().cloned() else {
            return Ok(Response::new(pb::ReportMetricsResponse {}));
        };
        let mut state = engine.lock();
        // A stopping attempt's steps count too when the job has ended (a
        // cancel: its workers finish the step they are in, then save it);
        // not when a failed attempt is being replaced, whose next attempt
        // starts from the checkpoint already chosen.
        let restarting = state
            .jobs
            .get(&req.job_id)
            .is_some_and(|j| j.state == JobState::Restarting);
        match state.attempts.get_mut(&req.job_id) {
            Some(sup) if sup.attempt == req.attempt && !restarting => {
                let _ = sup.beat(req.rank as usize, Some(last.step));
            }
            _ => {
                return Err(EngineError::Precondition(format!(
                    "job {} has no live attempt {}",
                    req.job_id, req.attempt
                ))
                .into());
            }
        }
        // Progress is kept in memory and goes to the store with the steps
        // (the record itself is written at the job's next change).
        let job = state
            .jobs
            .get_mut(&req.job_id)
            .expect("a job with a live attempt exists");
        job.steps_done = last.step;
        job.tokens_done = last.tokens;
        job.last_loss = Some(last.loss);
        if let (Some(step), Some(a)) = (req.resumed_from_step, job.attempts.last_mut()) {
            a.from_step = step;
        }
        settle_attempt(job, req.attempt);
        engine
            .store
            .queue_steps(&req.job_id, steps.clone())
            .map_err(EngineError::from)?;
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
            for tries in 0..20 {
                {
                    let mut state = engine.lock();
                    let Some(sup) = state.attempts.get_mut(&req.job_id) else {
                        return Ok(Response::new(pb::ReportDoneResponse {}));
                    };
                    if !sup.is_running() || sup.attempt != req.attempt {
                        return Ok(Response::new(pb::ReportDoneResponse {}));
                    }
                    let cause = sup.ended_early(Some(req.rank as usize));
                    if cause.is_some() || tries == 19 {
                        let why = match cause {
                            Some(c) => format!("{c}\n(then {own})"),
                            None => own,
                        };
                        engine.fail_attempt(&mut state, &req.job_id, req.attempt, why)?;
                        return Ok(Response::new(pb::ReportDoneResponse {}));
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        let mut state = engine.lock();
        let all_done = match state.attempts.get_mut(&req.job_id) {
            Some(sup) if sup.is_running() => {
                sup.done[req.rank as usize] = true;
                sup.done.iter().all(|d| *d)
            }
            _ => false,
        };
        if all_done {
            engine.end(
                &mut state,
                &req.job_id,
                JobState::Succeeded,
                String::new(),
                Duration::from_secs(10),
            )?;
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

/// `span`'s W3C trace context (`traceparent`), when traces are exported
/// (an OpenTelemetry layer and propagator are installed).
fn traceparent(span: &tracing::Span) -> Option<String> {
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let cx = span.context();
    let mut carrier = HashMap::new();
    opentelemetry::global::get_text_map_propagator(|p| p.inject_context(&cx, &mut carrier));
    carrier.remove("traceparent")
}

/// A job as clients see it: its record, and what its live attempt is
/// waiting for.
fn live_job_to_pb(state: &State, job: &JobRecord) -> pb::Job {
    let mut pb = job_to_pb(job);
    if let Some(w) = state
        .attempts
        .get(&job.job_id)
        .and_then(|s| s.waiting.clone())
    {
        pb.waiting = w;
    }
    pb
}

/// The running attempt of job `id`.
fn running<'a>(state: &'a mut State, id: &str) -> Result<&'a mut Supervisor> {
    match state.attempts.get_mut(id) {
        Some(sup) if sup.is_running() => Ok(sup),
        _ => Err(EngineError::Precondition(format!(
            "job {id} is not running"
        ))),
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
    ) -> Result<bool> {
        let engine = &self.0;
        let job = engine.check_worker(meta, &req.job_id, req.rank, req.attempt)?;
        let world = job.layout.world_size();
        let bad = |what: &str, e: serde_json::Error| {
            EngineError::Invalid(format!("rank {}: {what}: {e}", req.rank))
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
            // A stopping attempt still completes the checkpoint its
            // workers save on their way out, unless it failed and is
            // being replaced.
            let restarting = state
                .jobs
                .get(&req.job_id)
                .is_some_and(|j| j.state == JobState::Restarting);
            let sup = match state.attempts.get_mut(&req.job_id) {
                Some(sup) if sup.attempt == req.attempt && !restarting => sup,
                _ => {
                    return Err(EngineError::Precondition(format!(
                        "job {}: attempt {} has no live workers",
                        req.job_id, req.attempt
                    )));
                }
            };
            let p = sup.checkpoints.entry(req.step).or_default();
            if !p.reported.insert(req.rank) {
                return Err(EngineError::AlreadyExists(format!(
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
                sup.checkpoints.remove(&req.step)
            } else {
                None
            }
        };
        let Some(p) = complete else {
            return Ok(false);
        };
        let recipe = Recipe::from_toml_str(&job.spec_toml, &job.name)
            .map_err(|e| EngineError::Invalid(format!("the job's recipe: {e}")))?;
        let Some(cfg) = recipe.checkpoint.clone() else {
            return Err(EngineError::Precondition(format!(
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
                commit_checkpoint(&cfg, &job.job_id, &m)
                    .instrument(tracing::info_span!(
                        "checkpoint_commit",
                        job = %job.job_id,
                        step = m.step
                    ))
                    .await
                    .map(|pruned| (m, pruned))
            }
        };
        let mut state = engine.lock();
        let Some(mut job) = state.jobs.get(&req.job_id).cloned() else {
            return Ok(false);
        };
        // The record as it is now, changed under this one hold of the lock.
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
                settle_attempt(&mut job, req.attempt);
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
        engine.save(&mut state, job)?;
        Ok(committed)
    }
}

/// Writes checkpoint `m`'s manifest under the job's checkpoint folder,
/// then deletes the complete checkpoints beyond the newest `keep_last`
/// (never a `keep_steps` one). Returns the steps deleted.
async fn commit_checkpoint(
    cfg: &strata_recipe::CheckpointConfig,
    job: &str,
    m: &Manifest,
) -> Result<Vec<u64>, String> {
    let loc = Location::parse(&cfg.dir, true).map_err(|e| e.to_string())?;
    ckpt::write_manifest(&loc, job, m)
        .await
        .map_err(|e| format!("writing the manifest: {e}"))?;
    match cfg.keep_last {
        Some(keep) => match ckpt::prune(&loc, job, keep as usize, &cfg.keep_steps).await {
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
    /// Where `/metrics` is served (`--http-listen`), if anywhere.
    pub http_addr: Option<SocketAddr>,
    pub engine: Arc<Engine>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Engine(#[from] EngineError),
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
    /// Binds, opens the store and serves until [`Coordinator::stop`],
    /// launching workers as local processes.
    pub async fn start(cfg: CoordinatorConfig) -> Result<Coordinator, StartError> {
        Coordinator::start_with(cfg, Arc::new(LocalJobLauncher)).await
    }

    /// [`Coordinator::start`] with another launcher.
    pub async fn start_with(
        mut cfg: CoordinatorConfig,
        launcher: Arc<dyn JobLauncher>,
    ) -> Result<Coordinator, StartError> {
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
        let http = match cfg.http_listen {
            Some(at) => Some(
                tokio::net::TcpListener::bind(at)
                    .await
                    .map_err(|source| StartError::Bind { addr: at, source })?,
            ),
            None => None,
        };
        let http_addr = http.as_ref().and_then(|l| l.local_addr().ok());
        let engine = Engine::open(cfg, launcher)?;
        if let Some(listener) = http {
            tokio::spawn(crate::http::serve(
                listener,
                engine.clone(),
                engine.cfg.client_token.clone(),
                engine.closing.subscribe(),
            ));
        }
        let url = match &engine.cfg.advertise_url {
            Some(url) => url.clone(),
            None if !addr.ip().is_unspecified() => format!("http://{addr}"),
            // Workers on other machines reach this one by its name.
            None if !engine.launcher.shares_this_machine() => {
                format!("http://{}:{}", host_name(), addr.port())
            }
            None => format!("http://127.0.0.1:{}", addr.port()),
        };
        *engine.worker_url.lock().unwrap_or_else(|e| e.into_inner()) = url;
        {
            let mut state = engine.lock();
            engine.schedule(&mut state);
        }
        let sweeper = Jobs(engine.clone());
        let sweep_task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            loop {
                tick.tick().await;
                sweeper.advance_sweeps().await;
            }
        });
        let monitor = engine.clone();
        let monitor_task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            let mut refreshed = Instant::now();
            loop {
                tick.tick().await;
                monitor.monitor();
                if refreshed.elapsed() >= INVENTORY_REFRESH {
                    refreshed = Instant::now();
                    let engine = monitor.clone();
                    let _ = tokio::task::spawn_blocking(move || engine.refresh_inventory()).await;
                }
            }
        });
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let incoming = tokio_stream_from(listener);
        let svc_engine = engine.clone();
        let closing = engine.closing.clone();
        let task = tokio::spawn(async move {
            let mut closed = closing.subscribe();
            let serve = tonic::transport::Server::builder()
                .add_service(JobServiceServer::new(Jobs(svc_engine.clone())))
                .add_service(ControlServiceServer::new(Control(svc_engine.clone())))
                .serve_with_incoming_shutdown(incoming, async move {
                    let _ = rx.await;
                    // Open watch streams end now: a graceful shutdown
                    // waits for every call in flight.
                    closing.send_replace(true);
                });
            // A client that stops reading a stream holds its call open
            // past any signal the stream could see: its connection goes
            // after a grace period.
            let result = tokio::select! {
                r = serve => r,
                _ = async {
                    let _ = closed.wait_for(|c| *c).await;
                    tokio::time::sleep(SHUTDOWN_GRACE).await;
                } => {
                    tracing::warn!("calls still open {} s into the shutdown; closing their connections", SHUTDOWN_GRACE.as_secs());
                    Ok(())
                }
            };
            monitor_task.abort();
            sweep_task.abort();
            svc_engine.shutdown();
            result
        });
        tracing::info!(%addr, "coordinator listening");
        Ok(Coordinator {
            addr,
            http_addr,
            engine,
            shutdown: Some(tx),
            task,
        })
    }

    /// Stops serving, stops every worker (their jobs continue under the
    /// next coordinator on this state folder) and waits until the server
    /// is down.
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

#[cfg(test)]
mod tests {
    use super::*;

    fn config(dir: &std::path::Path) -> CoordinatorConfig {
        CoordinatorConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            state_dir: dir.to_path_buf(),
            inventory: Inventory::local(2).unwrap(),
            worker_program: "/bin/false".into(),
            worker_args: Vec::new(),
            worker_env: Vec::new(),
            client_token: None,
            heartbeat_timeout: Duration::from_secs(30),
            stop_grace: Duration::from_secs(1),
            advertise_url: None,
            http_listen: None,
        }
    }

    /// A bug that panics under the engine's lock fails its own call, not
    /// every call after it.
    #[test]
    fn a_panic_under_the_lock_does_not_take_later_calls_down() {
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::open(config(dir.path()), Arc::new(LocalJobLauncher)).unwrap();
        let e = engine.clone();
        assert!(
            std::thread::spawn(move || e.panic_under_lock())
                .join()
                .is_err()
        );
        let rt = tokio::runtime::Runtime::new().unwrap();
        let jobs = rt
            .block_on(
                Jobs(engine.clone())
                    .list_jobs(Request::new(pb::ListJobsRequest { states: Vec::new() })),
            )
            .unwrap();
        assert!(jobs.into_inner().jobs.is_empty());
        engine.monitor();
        engine.shutdown();
    }
}
