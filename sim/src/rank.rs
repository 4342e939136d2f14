//! One simulated rank: a task that does what a worker does on the wire
//! and nothing else. It connects to the coordinator (a connection of its
//! own, as a worker process has), registers, waits for its assignment,
//! beats at the period the coordinator asks for, and steps: a step is a
//! wait of the simulator's step time, then a barrier with the
//! allocation's other ranks (a collective: one rank that stops holds up
//! all the others, as in a real job). Rank 0 reports each step's metrics
//! with a record per pipeline stage; every rank reports its part of each
//! checkpoint the recipe asks for (rank 0 with the manifest, which the
//! coordinator commits to object storage); the end is reported. A stop
//! (SIGTERM, or the coordinator's) saves the last step and leaves with
//! status 143, as a worker does.

use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use strata_cluster::sim::SimStart;
use strata_dataplane::checkpoint::{self as ckpt, Manifest, SavedLayout};
use strata_dataplane::params::ParamTable;
use strata_dataplane::store::Location;
use strata_proto::auth::{Bearer, WithBearer};
use strata_proto::checkpoint::{manifest_to_pb, shard_to_pb};
use strata_proto::v1 as pb;
use strata_proto::v1::control_service_client::ControlServiceClient;
use strata_recipe::{Rank as WorldRank, Recipe};
use tokio::sync::Notify;
use tonic::transport::Channel;

use crate::stats::Stats;

/// Signals to one rank (what a process gets from its launcher), and the
/// faults it plays.
#[derive(Default)]
pub(crate) struct RankCtl {
    /// SIGTERM (or the coordinator's stop): save the last step and leave.
    pub term: AtomicBool,
    /// The coordinator refused this attempt: leave without saving.
    pub abandon: AtomicBool,
    /// Stop everything and stay (a stopped process, a machine cut off).
    pub silent: AtomicBool,
    /// The step stops moving; heartbeats go on.
    pub hang: AtomicBool,
    pub wake: Notify,
}

impl RankCtl {
    pub fn signal(&self, flag: &AtomicBool) {
        flag.store(true, Ordering::SeqCst);
        self.wake.notify_waiters();
    }
}

/// A collective: every rank of the allocation arrives before any goes
/// on. Once a rank stops (SIGTERM) while others wait, the barrier closes
/// and every waiter stops after the same step.
pub(crate) struct Barrier {
    world: usize,
    state: Mutex<(usize, u64, bool)>,
    notify: Notify,
}

impl Barrier {
    pub fn new(world: usize) -> Barrier {
        Barrier {
            world,
            state: Mutex::new((0, 0, false)),
            notify: Notify::new(),
        }
    }

    /// Arrives and waits for the others; false when the barrier closed (a
    /// stop) before every rank arrived.
    async fn wait(&self, ctl: &RankCtl) -> bool {
        let generation = {
            let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
            if s.2 {
                return false;
            }
            s.0 += 1;
            if s.0 == self.world {
                s.0 = 0;
                s.1 += 1;
                self.notify.notify_waiters();
                return true;
            }
            s.1
        };
        loop {
            let released = self.notify.notified();
            let woken = ctl.wake.notified();
            {
                let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
                if s.1 > generation {
                    return true;
                }
                if s.2 {
                    return false;
                }
                if ctl.term.load(Ordering::SeqCst) {
                    s.2 = true;
                    self.notify.notify_waiters();
                    return false;
                }
            }
            tokio::select! {
                _ = released => {}
                _ = woken => {}
            }
        }
    }
}

/// What the allocation's ranks share: its spec, its barrier, the recipe
/// (parsed once, from the first assignment) and the step it resumes from
/// (looked up once).
pub(crate) struct AllocShared {
    pub start: SimStart,
    pub barrier: Barrier,
    /// The recipe, parsed once, and its text.
    pub recipe: OnceLock<(Arc<Recipe>, String)>,
    pub resume: tokio::sync::OnceCell<u64>,
    pub step_time: Duration,
    /// Connections being made at once, at most: 16,384 processes do not
    /// start in the same millisecond, and a burst past the coordinator's
    /// accept backlog only measures the kernel's SYN retries.
    pub connects: Arc<tokio::sync::Semaphore>,
}

/// How a simulated rank ended: a status code, or a signal.
pub(crate) type Ended = (i32, bool);

fn refused(e: &tonic::Status) -> bool {
    use tonic::Code::*;
    matches!(e.code(), FailedPrecondition | NotFound | Unauthenticated)
}

async fn connect(url: &str, ca: Option<&str>) -> Result<Channel, String> {
    let ep = strata_proto::auth::endpoint(url, ca)
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(30))
        .http2_keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(20))
        .keep_alive_while_idle(true);
    let mut pause = Duration::from_millis(100);
    for _ in 0..10 {
        match ep.connect().await {
            Ok(c) => return Ok(c),
            Err(e) => {
                tracing::debug!(error = %e, "cannot reach the coordinator yet");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(3));
            }
        }
    }
    Err(format!("cannot reach the coordinator at {url}"))
}

/// A step's synthetic numbers: a loss that falls, the recipe's learning
/// rate, the simulator's step time split into phases.
fn metrics(recipe: &Recipe, step: u64, step_time: Duration) -> pb::StepMetrics {
    let tps = recipe.data.tokens_per_step;
    let wall = step_time.as_secs_f64().max(1e-6);
    let pp = recipe.parallel.layout.pp;
    let share = wall / 5.0;
    pb::StepMetrics {
        step,
        tokens: step * tps,
        loss: 2.0 + 8.0 * (-(step as f64) / 500.0).exp(),
        lr: recipe.schedule.lr_for_step((step - 1) * tps, tps),
        tokens_per_s: tps as f64 / wall,
        grad_norm: 1.0,
        seq_log2: 6,
        times: Some(pb::StepTimes {
            data_s: share,
            forward_s: share,
            backward_s: share,
            all_reduce_s: share,
            optimizer_s: share,
        }),
        stages: (0..pp)
            .map(|stage| pb::StageMetrics {
                stage,
                forward_s: share,
                backward_s: share,
                wait_s: share,
                pipeline_s: 3.0 * share,
                bubble: 1.0 / 3.0,
                tp_comm_s: 0.0,
            })
            .collect(),
        bubble_theory: recipe.parallel.layout.bubble_fraction(
            recipe.parallel.microbatches.max(1),
            recipe.parallel.virtual_stages,
        ),
        eval_loss: None,
        peak_flops: None,
        sources: Vec::new(),
        weights: None,
    }
}

struct Rank {
    shared: Arc<AllocShared>,
    stats: Arc<Stats>,
    ctl: Arc<RankCtl>,
    rank: u32,
    client: ControlServiceClient<WithBearer<Channel>>,
}

impl Rank {
    fn job(&self) -> &str {
        &self.shared.start.job
    }

    fn attempt(&self) -> u32 {
        self.shared.start.attempt
    }

    /// Waits `d`, or less when a signal comes; whether a stop came.
    async fn pause(&self, d: Duration) -> bool {
        let deadline = Instant::now() + d;
        loop {
            if self.ctl.term.load(Ordering::SeqCst) {
                return true;
            }
            let woken = self.ctl.wake.notified();
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            tokio::select! {
                _ = tokio::time::sleep(left) => {}
                _ = woken => {}
            }
        }
    }

    /// Waits while the rank is silent or hung (until a stop).
    async fn stall(&self) {
        while (self.ctl.silent.load(Ordering::SeqCst) || self.ctl.hang.load(Ordering::SeqCst))
            && !self.ctl.term.load(Ordering::SeqCst)
        {
            let woken = self.ctl.wake.notified();
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = woken => {}
            }
        }
    }

    /// Reports this rank's part of checkpoint `step` (rank 0 with the
    /// manifest); errors are counted, not fatal.
    async fn checkpoint(&mut self, recipe: &Recipe, step: u64) {
        let manifest = (self.rank == 0).then(|| {
            let l = recipe.parallel.layout;
            Manifest {
                format: ckpt::FORMAT.into(),
                version: ckpt::VERSION,
                job: self.job().to_string(),
                attempt: self.attempt(),
                step,
                tokens_seen: step * recipe.data.tokens_per_step,
                optimizer_steps: step,
                layout: SavedLayout {
                    tp: l.tp,
                    pp: l.pp,
                    dp: l.dp,
                    virtual_stages: recipe.parallel.virtual_stages,
                },
                model: recipe.model,
                recipe: self.shared.recipe_text(),
                data: None,
                shards: Vec::new(),
                written_at: 0,
            }
        });
        // The files this rank's part would be, described (nothing is
        // written): the coordinator checks that they cover the model.
        let layout = recipe.parallel.layout;
        let shards = layout
            .coords(WorldRank(self.rank))
            .map(|c| {
                let table = ParamTable::interleaved(
                    &recipe.model,
                    layout,
                    c,
                    recipe.parallel.virtual_stages,
                );
                ckpt::describe_shards(&table, self.attempt(), c.dp)
            })
            .unwrap_or_default();
        let req = pb::ReportCheckpointRequest {
            job_id: self.job().to_string(),
            rank: self.rank,
            attempt: self.attempt(),
            step,
            ok: true,
            shards: shards.iter().map(shard_to_pb).collect(),
            manifest: manifest.as_ref().map(manifest_to_pb),
            stall_s: 0.001,
            write_s: 0.01,
            ..Default::default()
        };
        if self.client.report_checkpoint(req).await.is_err() {
            self.stats.error("ReportCheckpoint");
        }
    }
}

impl AllocShared {
    fn recipe_text(&self) -> String {
        self.recipe.get().map(|r| r.1.clone()).unwrap_or_default()
    }

    /// The step this attempt continues from: for "the latest", the
    /// newest complete checkpoint in object storage (looked up once).
    async fn resume_step(&self, a: &pb::Assignment, recipe: &Recipe) -> u64 {
        if !a.resume {
            return 0;
        }
        if a.resume_from_step > 0 {
            return a.resume_from_step;
        }
        *self
            .resume
            .get_or_init(|| async {
                let Some(cfg) = &recipe.checkpoint else {
                    return 0;
                };
                let root = if a.resume_from_job.is_empty() {
                    &a.job_id
                } else {
                    &a.resume_from_job
                };
                match Location::parse(&cfg.dir, false) {
                    Ok(loc) => ckpt::list(&loc, root)
                        .await
                        .ok()
                        .and_then(|(found, _)| found.last().map(|m| m.step))
                        .unwrap_or(0),
                    Err(_) => 0,
                }
            })
            .await
    }
}

/// Runs one simulated rank to its end.
pub(crate) async fn run(
    shared: Arc<AllocShared>,
    stats: Arc<Stats>,
    ctl: Arc<RankCtl>,
    rank: u32,
    node: String,
) -> Ended {
    let start = &shared.start;
    let permit = shared.connects.acquire().await;
    let channel = connect(&start.coordinator, start.ca.as_deref()).await;
    drop(permit);
    let channel = match channel {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(rank, error = %e, "simulated rank cannot connect");
            stats.error("Connect");
            return (1, false);
        }
    };
    let Some(bearer) = Bearer::new(Some(&start.token)) else {
        return (1, false);
    };
    let client = ControlServiceClient::with_interceptor(channel, bearer);
    let mut me = Rank {
        shared: shared.clone(),
        stats: stats.clone(),
        ctl: ctl.clone(),
        rank,
        client,
    };
    let (job, attempt) = (start.job.clone(), start.attempt);
    stats.registering(&job, attempt);
    let registered = me
        .client
        .register(pb::RegisterRequest {
            job_id: job.clone(),
            rank,
            host: node.clone(),
            pid: 0,
            collective_addr: format!("{node}:{}", 29500 + rank % 1000),
            attempt,
        })
        .await;
    let period = match registered {
        Ok(r) => r.into_inner().heartbeat_interval_ms,
        Err(e) => {
            stats.error("Register");
            tracing::debug!(rank, error = %e, "register refused");
            return (1, false);
        }
    };
    let step_now = Arc::new(AtomicU64::new(0));
    let activity = Arc::new(AtomicI32::new(pb::WorkerActivity::Setup as i32));
    let beats = {
        let (mut c, stats, ctl) = (me.client.clone(), stats.clone(), ctl.clone());
        let (job, step_now, activity) = (job.clone(), step_now.clone(), activity.clone());
        tokio::spawn(async move {
            let period = AtomicU64::new(u64::from(period).clamp(1000, 60_000));
            loop {
                let woken = ctl.wake.notified();
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(period.load(Ordering::Relaxed))) => {}
                    _ = woken => continue,
                }
                if ctl.silent.load(Ordering::SeqCst) {
                    continue;
                }
                let sent = Instant::now();
                let r = c
                    .heartbeat(pb::HeartbeatRequest {
                        job_id: job.clone(),
                        rank,
                        step: step_now.load(Ordering::Relaxed),
                        attempt,
                        activity: activity.load(Ordering::Relaxed),
                        ..Default::default()
                    })
                    .await;
                match r {
                    Ok(r) => {
                        stats.heartbeat(&job, sent.elapsed().as_secs_f64() * 1e3);
                        let r = r.into_inner();
                        if r.heartbeat_interval_ms > 0 {
                            period.store(
                                u64::from(r.heartbeat_interval_ms).clamp(1000, 60_000),
                                Ordering::Relaxed,
                            );
                        }
                        if r.stop {
                            ctl.signal(&ctl.term);
                        }
                    }
                    Err(e) => {
                        if refused(&e) {
                            ctl.abandon.store(true, Ordering::SeqCst);
                            ctl.signal(&ctl.term);
                        } else {
                            stats.error("Heartbeat");
                        }
                    }
                }
            }
        })
    };
    // The heartbeats end with the rank, however it ends (a kill aborts
    // this task: the guard's drop aborts theirs).
    let _beats = AbortOnDrop(beats);
    steps(&mut me, &job, attempt, step_now, activity).await
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn steps(
    me: &mut Rank,
    job: &str,
    attempt: u32,
    step_now: Arc<AtomicU64>,
    activity: Arc<AtomicI32>,
) -> Ended {
    let rank = me.rank;
    let assignment = tokio::select! {
        a = me.client.get_assignment(pb::GetAssignmentRequest {
            job_id: job.to_string(),
            rank,
            attempt,
        }) => a,
        _ = async {
            while !me.ctl.term.load(Ordering::SeqCst) {
                let w = me.ctl.wake.notified();
                tokio::select! {
                    _ = w => {}
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        } => return (143, false),
    };
    let a = match assignment {
        Ok(a) => a.into_inner(),
        Err(e) => {
            me.stats.error("GetAssignment");
            tracing::debug!(rank, error = %e, "no assignment");
            return (if refused(&e) { 143 } else { 1 }, false);
        }
    };
    me.stats.assigned(job, attempt);
    let recipe = match me.shared.recipe.get() {
        Some(r) => r.0.clone(),
        None => match Recipe::from_toml_str(&a.spec_toml, job) {
            Ok(r) => {
                let r = Arc::new(r);
                let _ = me.shared.recipe.set((r.clone(), a.spec_toml.clone()));
                r
            }
            Err(e) => {
                tracing::error!(rank, error = %e, "the coordinator sent a recipe that does not parse");
                return (1, false);
            }
        },
    };
    let first = me.shared.resume_step(&a, &recipe).await + 1;
    let n_steps = recipe.data.n_steps();
    let mut resumed = (first > 1).then_some(first - 1);
    let step_time = me.shared.step_time;
    activity.store(pb::WorkerActivity::Step as i32, Ordering::Relaxed);
    let mut done = first - 1;
    for step in first..=n_steps {
        me.stall().await;
        if me.pause(step_time).await {
            break;
        }
        me.stall().await;
        if !me.shared.barrier.wait(&me.ctl).await {
            break;
        }
        step_now.store(step, Ordering::Relaxed);
        done = step;
        if rank == 0 {
            let r = me
                .client
                .report_metrics(pb::ReportMetricsRequest {
                    job_id: job.to_string(),
                    rank,
                    steps: vec![metrics(&recipe, step, step_time)],
                    attempt,
                    resumed_from_step: resumed.take(),
                })
                .await;
            if let Err(e) = r {
                me.stats.error("ReportMetrics");
                if refused(&e) {
                    return (143, false);
                }
            }
        }
        if let Some(cfg) = &recipe.checkpoint
            && cfg.saves_at(step, n_steps)
        {
            activity.store(pb::WorkerActivity::Checkpoint as i32, Ordering::Relaxed);
            me.checkpoint(&recipe, step).await;
            activity.store(pb::WorkerActivity::Step as i32, Ordering::Relaxed);
        }
    }
    if me.ctl.term.load(Ordering::SeqCst) {
        // Stopped: the last step is saved on the way out (not when the
        // attempt was refused: nothing of it is kept).
        if recipe.checkpoint.is_some() && done >= first && !me.ctl.abandon.load(Ordering::SeqCst) {
            me.checkpoint(&recipe, done).await;
        }
        return (143, false);
    }
    let r = me
        .client
        .report_done(pb::ReportDoneRequest {
            job_id: job.to_string(),
            rank,
            ok: true,
            error: String::new(),
            attempt,
        })
        .await;
    if r.is_err() {
        me.stats.error("ReportDone");
    }
    (0, false)
}
