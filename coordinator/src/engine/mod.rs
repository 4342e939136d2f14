//! The engine: the one owner of the coordinator's state — the jobs (a
//! mirror of the store), the queue, one [`Supervisor`] per attempt whose
//! processes are alive, the sweeps, and each job's watchers.
//!
//! One mutex guards that state, and it is held for bookkeeping only:
//! deciding. Nothing slow or external runs under it. Starting ranks,
//! stopping them and looking at their processes are [`Action`]s run on
//! blocking threads after the lock is released; store writes are queued
//! under it and waited for outside it (`Store::durable`); each call's
//! hold of the lock is measured. A call that changes a job makes the
//! whole change to the record under one hold of the lock, and the call is
//! answered only once that record is durable. A panic under the lock does
//! not poison later calls.
//!
//! A job moves QUEUED → RUNNING → (RESTARTING → RUNNING …) → SUCCEEDED,
//! FAILED or CANCELLED. Each RUNNING spell is an attempt: a failure (a
//! process that ended, a silent or hung rank, a rank's own report) stops
//! the attempt's workers and, within `[fault] max_restarts` per
//! `restart_window_s`, starts the next attempt from the latest complete
//! checkpoint, away from the nodes blamed for it while the job fits
//! without them. Worker calls carry their attempt; calls of an ended
//! attempt are refused.
//!
//! The engine knows nothing of gRPC or HTTP: `rpc` and `http` adapt it.

pub(crate) mod actions;
mod attempts;
mod checkpoints;
mod jobs;
mod monitor;
mod supervisor;
pub(crate) mod sweeps;
pub mod views;
pub(crate) mod watch;
mod worker;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use strata_cluster::{Inventory, JobLauncher, NodeStatus};
use tokio::sync::{broadcast, mpsc};

use crate::config::CoordinatorConfig;
use crate::error::EngineError;
use crate::job::{JobId, JobRecord, JobState, StepRecord};
use crate::placement::Leases;
use crate::store::{Store, Ticket, Write};
use crate::sweep::SweepRecord;
pub(crate) use actions::{Action, RanksHandle, StopKind};
pub use jobs::{BranchRequest, ResumeRequest, slug};
use supervisor::Supervisor;
pub use supervisor::{Activity, Assignment, AssignmentBase, RankRow, RankStep, RanksSnapshot};
pub use views::{JobView, NodeView, RankSummary, Snapshot};
pub use worker::{HeartbeatIn, HeartbeatOut, WorkerCall, same as same_token};

pub(crate) type Result<T, E = EngineError> = std::result::Result<T, E>;

/// What watchers of a job hear.
#[derive(Debug, Clone)]
pub enum Event {
    Job(Arc<JobRecord>),
    Step(Arc<StepRecord>),
}

#[derive(Default)]
pub(crate) struct State {
    pub(crate) jobs: BTreeMap<JobId, Arc<JobRecord>>,
    /// Every sweep (a mirror of the store).
    pub(crate) sweeps: BTreeMap<String, Arc<SweepRecord>>,
    /// Jobs waiting for slots, in the order they start: restarting jobs
    /// first, then queued ones by submission.
    queue: Vec<JobId>,
    /// The attempt of each job whose processes are alive (being started,
    /// running or stopping); it holds their slots until they are gone.
    attempts: HashMap<JobId, Supervisor>,
    watchers: HashMap<JobId, broadcast::Sender<Event>>,
    /// Each live job's last reported step (for views: no store read).
    last_steps: HashMap<JobId, StepRecord>,
    /// The slots whose processes are alive, kept as attempts come and go.
    leased: Leases,
    /// Ranks of running attempts, all jobs together.
    live_ranks: usize,
    /// Checkpoint commits in flight, by job: from the report that
    /// completes a checkpoint until its manifest is written (or refused).
    pub(crate) committing: HashMap<JobId, usize>,
    /// The next job number.
    next_job: u64,
}

/// A gRPC method's label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct MethodLabel {
    pub method: &'static str,
}

/// The engine's own measurements, for `/metrics` and the benchmark.
pub struct EngineMetrics {
    /// Seconds each gRPC call took the coordinator, by method.
    pub rpc: prometheus_client::metrics::family::Family<MethodLabel, Histogram, fn() -> Histogram>,
    /// Seconds between a rank's heartbeats, every job's.
    pub heartbeat_gaps: Histogram,
    /// Seconds each hold of the engine's lock lasted.
    pub lock_hold: Histogram,
    /// The longest hold so far, in nanoseconds.
    pub lock_hold_max_ns: AtomicU64,
    /// Sweep reports (fits and plots) the dashboard has made.
    pub sweep_reports: prometheus_client::metrics::counter::Counter,
}

impl EngineMetrics {
    fn new() -> EngineMetrics {
        fn rpc_histogram() -> Histogram {
            // 10 µs to about 40 s.
            Histogram::new(exponential_buckets(1e-5, 2.0, 22))
        }
        EngineMetrics {
            rpc: prometheus_client::metrics::family::Family::new_with_constructor(rpc_histogram),
            heartbeat_gaps: Histogram::new(exponential_buckets(0.25, 2.0, 9)),
            // 1 µs to about 10 s, each bucket 1.5 times the one before.
            lock_hold: Histogram::new(exponential_buckets(1e-6, 1.5, 40)),
            lock_hold_max_ns: AtomicU64::new(0),
            sweep_reports: Default::default(),
        }
    }

    pub fn observe_rpc(&self, method: &'static str, took: Duration) {
        self.rpc
            .get_or_create(&MethodLabel { method })
            .observe(took.as_secs_f64());
    }
}

pub struct Engine {
    pub(crate) cfg: CoordinatorConfig,
    pub(crate) store: Store,
    launcher: Arc<dyn JobLauncher>,
    /// The slots placement uses, and the nodes as the launcher last
    /// reported them (a lock of its own: refreshed off the engine's).
    inventory: Mutex<(Inventory, Vec<NodeStatus>)>,
    state: Mutex<State>,
    /// The URL workers reach the coordinator at.
    worker_url: Mutex<String>,
    /// Set once shutting down: nothing new is launched.
    stopping: AtomicBool,
    /// Becomes true when the server starts shutting down; watch streams
    /// end then.
    closing: tokio::sync::watch::Sender<bool>,
    /// Held by whoever advances or changes sweeps: one at a time.
    pub(crate) advancing: tokio::sync::Mutex<()>,
    pub metrics: Arc<EngineMetrics>,
    /// Recipes parsed so far, by text and default name.
    parsed: Mutex<HashMap<(String, String), Arc<strata_recipe::Recipe>>>,
    /// Actions decided under the lock, for the executor.
    actions: mpsc::UnboundedSender<Action>,
    actions_rx: Mutex<Option<mpsc::UnboundedReceiver<Action>>>,
    /// Each job's TensorBoard event files, written off the lock.
    tensorboard: Arc<crate::tensorboard::TensorBoard>,
}

/// The engine's state under its lock; the hold is measured when it ends.
pub(crate) struct Locked<'a> {
    guard: Option<MutexGuard<'a, State>>,
    since: Instant,
    metrics: &'a EngineMetrics,
    /// Who took it, for the log of a long hold.
    at: &'static std::panic::Location<'static>,
}

/// A hold of the engine's lock this long is logged, with where it was
/// taken: every other call waited that long.
const LONG_HOLD: Duration = Duration::from_millis(20);

impl std::ops::Deref for Locked<'_> {
    type Target = State;
    fn deref(&self) -> &State {
        self.guard.as_ref().expect("held")
    }
}

impl std::ops::DerefMut for Locked<'_> {
    fn deref_mut(&mut self) -> &mut State {
        self.guard.as_mut().expect("held")
    }
}

impl Drop for Locked<'_> {
    fn drop(&mut self) {
        let held = self.since.elapsed();
        self.guard.take();
        if held >= LONG_HOLD {
            tracing::warn!(held_ms = held.as_secs_f64() * 1e3, at = %self.at, "the engine's lock was held long");
        }
        self.metrics.lock_hold.observe(held.as_secs_f64());
        self.metrics
            .lock_hold_max_ns
            .fetch_max(held.as_nanos() as u64, Ordering::Relaxed);
    }
}

/// This machine's name.
pub(crate) fn host_name() -> String {
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

impl Engine {
    /// Opens the store in `cfg.state_dir`. Jobs that were running when the
    /// coordinator last stopped get a new attempt from their latest
    /// checkpoint (their workers went with that coordinator); queued jobs
    /// stay queued. Blocks (the store, the launcher's inventory): call it
    /// where a thread may block.
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
        let mut state = State {
            next_job: store.next_job_number()?,
            ..State::default()
        };
        let mut jobs = store.jobs()?;
        jobs.sort_by_key(|j| (j.submitted_unix_ms, j.job_id.clone()));
        let mut restarting = Vec::new();
        for mut job in jobs {
            // Progress is written with the step metrics, not with every
            // change of the record.
            if let Some(last) = store.last_step(job.job_id.as_str())?
                && last.step > job.steps_done
            {
                job.steps_done = last.step;
                job.tokens_done = last.tokens;
                job.last_loss = Some(last.loss);
            }
            if matches!(job.state, JobState::Running | JobState::Restarting) {
                // What was ended of this job's (or of no known job).
                let ended: Vec<&str> = reclaimed
                    .iter()
                    .filter(|r| r.job.as_deref().is_none_or(|j| j == job.job_id.as_str()))
                    .map(|r| r.what.as_str())
                    .collect();
                let cause = if ended.is_empty() {
                    "the coordinator stopped, and the attempt's workers with it".to_string()
                } else {
                    format!(
                        "the coordinator stopped; the next one ended what it left running ({})",
                        ended.join(", ")
                    )
                };
                attempts::close_attempt(&mut job, JobState::Failed, &cause, true);
                let step = attempts::prepare_restart(&mut job);
                store.put_blocking(Write::Truncate(job.job_id.clone(), step))?;
                store.put_blocking(Write::Job(Arc::new(job.clone())))?;
                tracing::warn!(job = %job.job_id, from_step = job.steps_done, "resuming a job the previous coordinator left running");
                restarting.push(job.job_id.clone());
            } else if job.state == JobState::Queued {
                state.queue.push(job.job_id.clone());
            }
            state.jobs.insert(job.job_id.clone(), Arc::new(job));
        }
        restarting.append(&mut state.queue);
        state.queue = restarting;
        for s in store.sweeps()? {
            state.sweeps.insert(s.sweep_id.clone(), Arc::new(s));
        }
        let (tx, rx) = mpsc::unbounded_channel();
        Ok(Arc::new(Engine {
            worker_url: Mutex::new(format!("http://{}", cfg.listen)),
            cfg,
            store,
            launcher,
            inventory: Mutex::new((inventory, nodes)),
            state: Mutex::new(state),
            stopping: AtomicBool::new(false),
            closing: tokio::sync::watch::Sender::new(false),
            advancing: tokio::sync::Mutex::new(()),
            metrics: Arc::new(EngineMetrics::new()),
            parsed: Mutex::new(HashMap::new()),
            actions: tx,
            actions_rx: Mutex::new(Some(rx)),
            tensorboard: crate::tensorboard::TensorBoard::start(),
        }))
    }

    /// The state, even after a panic under the lock: every change to a job
    /// is made whole before it is stored, so what a panic interrupted is at
    /// worst not done, and later calls must still be served.
    #[track_caller]
    pub(crate) fn lock(&self) -> Locked<'_> {
        let at = std::panic::Location::caller();
        let guard = self.state.lock().unwrap_or_else(|poisoned| {
            tracing::error!("a call panicked while holding the coordinator's lock; going on");
            self.state.clear_poison();
            poisoned.into_inner()
        });
        Locked {
            guard: Some(guard),
            since: Instant::now(),
            metrics: &self.metrics,
            at,
        }
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn config(&self) -> &CoordinatorConfig {
        &self.cfg
    }

    /// Whether the coordinator is shutting down (nothing new starts).
    pub(crate) fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// Becomes true when the coordinator starts shutting down.
    pub fn closing(&self) -> tokio::sync::watch::Receiver<bool> {
        self.closing.subscribe()
    }

    pub(crate) fn set_closing(&self) {
        self.closing.send_replace(true);
    }

    pub(crate) fn set_worker_url(&self, url: String) {
        *self.worker_url.lock().unwrap_or_else(|e| e.into_inner()) = url;
    }

    pub(crate) fn worker_url(&self) -> String {
        self.worker_url
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Queues `action` for the executor (never blocks: safe under the
    /// lock).
    fn act(&self, action: Action) {
        if self.actions.send(action).is_err() {
            tracing::error!("the action executor is gone");
        }
    }

    /// Runs the actions decided under the lock, each on a blocking thread
    /// of its own, until the engine is dropped.
    pub(crate) fn start_executor(self: &Arc<Self>) {
        let Some(mut rx) = self
            .actions_rx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        else {
            return;
        };
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            while let Some(action) = rx.recv().await {
                let Some(engine) = weak.upgrade() else {
                    return;
                };
                tokio::task::spawn_blocking(move || engine.run(action));
            }
        });
    }

    /// One action, on this (blocking) thread.
    fn run(&self, action: Action) {
        match action {
            Action::Launch {
                plan,
                handle,
                span,
                recorded,
                before,
            } => {
                // The attempt is on disk before any of its processes
                // exists: a coordinator that dies now finds it (and its
                // processes) at restart; one whose record never made it
                // to disk starts nothing.
                if let Err(e) = self.store.wait(recorded) {
                    handle.failed();
                    self.unrecorded(before, plan.attempt, &e.to_string());
                    return;
                }
                let result = actions::launch(&*self.launcher, &plan, &handle, &span);
                self.launched(&plan.job.job_id, plan.attempt, result);
            }
            Action::Stop { job, handle, kind } => {
                let start = Instant::now();
                handle.stop(kind);
                let took = start.elapsed();
                if took > Duration::from_secs(5) {
                    tracing::warn!(job = %job, ?kind, took_s = took.as_secs_f64(), "stopping the ranks took long");
                }
            }
        }
    }

    /// Tells `job`'s watchers; once it has ended, its channel is dropped
    /// (watchers still get what was sent, then the stream ends).
    fn publish(state: &mut State, job: &Arc<JobRecord>) {
        if let Some(tx) = state.watchers.get(&job.job_id) {
            let _ = tx.send(Event::Job(job.clone()));
        }
        if job.state.is_final() {
            state.watchers.remove(&job.job_id);
            state.last_steps.remove(&job.job_id);
        }
    }

    /// Mirrors `job`, queues its record for the store and tells its
    /// watchers; the ticket says when it is durable.
    fn save(&self, state: &mut State, job: JobRecord) -> Result<Ticket> {
        let job = Arc::new(job);
        let t = self.store.submit(Write::Job(job.clone()))?;
        Engine::publish(state, &job);
        state.jobs.insert(job.job_id.clone(), job);
        Ok(t)
    }

    /// Applies `f` to job `id`'s record and saves it, under the caller's
    /// hold of the lock.
    fn update(
        &self,
        state: &mut State,
        id: &str,
        f: impl FnOnce(&mut JobRecord),
    ) -> Result<Ticket> {
        let arc = state
            .jobs
            .get_mut(id)
            .ok_or_else(|| EngineError::NotFound(format!("no job {id}")))?;
        f(Arc::make_mut(arc));
        let job = arc.clone();
        let t = self.store.submit(Write::Job(job.clone()))?;
        Engine::publish(state, &job);
        Ok(t)
    }

    /// Where workers run, in words.
    pub fn launcher_description(&self) -> String {
        self.launcher.describe()
    }

    pub(crate) fn launcher(&self) -> &Arc<dyn JobLauncher> {
        &self.launcher
    }

    /// The slots placement uses now.
    pub fn inventory(&self) -> Inventory {
        self.inventory
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .0
            .clone()
    }

    fn node_statuses(&self) -> Vec<NodeStatus> {
        self.inventory
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .1
            .clone()
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

    /// How often ranks should beat now: once a second, spaced out when
    /// there are more ranks than `heartbeats_per_s`, never past a sixth
    /// of the heartbeat timeout.
    pub(crate) fn heartbeat_interval(&self, live_ranks: usize) -> Duration {
        let rate = self.cfg.heartbeats_per_s.max(1) as f64;
        let want = Duration::from_secs_f64((live_ranks as f64 / rate).max(1.0));
        want.min((self.cfg.heartbeat_timeout / 6).max(Duration::from_secs(1)))
    }

    /// Stops every worker (the coordinator is shutting down): SIGTERM,
    /// then SIGKILL for any still there after a few seconds. Their jobs
    /// stay RUNNING in the store, and the next coordinator on this state
    /// folder continues them from their latest checkpoints. Blocks.
    pub fn shutdown(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        let handles: Vec<Arc<RanksHandle>> = {
            let mut state = self.lock();
            let handles = state
                .attempts
                .values_mut()
                .map(|s| {
                    s.stop(Duration::from_secs(3));
                    s.handle.clone()
                })
                .collect();
            state.attempts.clear();
            state.leased.clear();
            handles
        };
        for h in &handles {
            h.stop(StopKind::Terminate);
        }
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline
            && !handles
                .iter()
                .all(|h| h.observe().is_some_and(|o| o.all_ended))
        {
            std::thread::sleep(Duration::from_millis(50));
        }
        for h in &handles {
            if !h.observe().is_some_and(|o| o.all_ended) {
                h.stop(StopKind::Kill);
            }
        }
        drop(handles);
        self.store.close();
    }

    /// A panic under the engine's lock, for the test that later calls are
    /// still served.
    #[cfg(test)]
    fn panic_under_lock(&self) {
        let _state = self.lock();
        panic!("a bug under the lock");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use strata_cluster::LocalJobLauncher;

    /// A bug that panics under the engine's lock fails its own call, not
    /// every call after it.
    #[test]
    fn a_panic_under_the_lock_does_not_take_later_calls_down() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = CoordinatorConfig::new(
            "127.0.0.1:0".parse().unwrap(),
            dir.path().to_path_buf(),
            Inventory::local(2).unwrap(),
            "/bin/false".into(),
        );
        let engine = Engine::open(cfg, Arc::new(LocalJobLauncher::default())).unwrap();
        let e = engine.clone();
        assert!(
            std::thread::spawn(move || e.panic_under_lock())
                .join()
                .is_err()
        );
        assert!(engine.snapshot().jobs.is_empty());
        assert!(engine.lock().jobs.is_empty());
        engine.shutdown();
    }

    #[test]
    fn heartbeats_space_out_past_the_rate() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = CoordinatorConfig::new(
            "127.0.0.1:0".parse().unwrap(),
            dir.path().to_path_buf(),
            Inventory::local(2).unwrap(),
            "/bin/false".into(),
        );
        cfg.heartbeats_per_s = 4096;
        cfg.heartbeat_timeout = Duration::from_secs(60);
        let engine = Engine::open(cfg, Arc::new(LocalJobLauncher::default())).unwrap();
        assert_eq!(engine.heartbeat_interval(8), Duration::from_secs(1));
        assert_eq!(engine.heartbeat_interval(16384), Duration::from_secs(4));
        // Never past a sixth of the timeout.
        assert_eq!(engine.heartbeat_interval(1 << 20), Duration::from_secs(10));
        engine.shutdown();
    }
}
