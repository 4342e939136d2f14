//! A worker process's life: register with the coordinator, get the
//! assignment, join the collective groups, train, report, finish.
//!
//! The worker is handed a coordinator URL, a job, a rank and the job's
//! token; it never learns which launcher started it.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tracing::Instrument;

use burn::backend::Autodiff;
use burn::tensor::backend::AutodiffBackend;
use strata_dataplane::loader::{Loader, LoaderConfig};
use strata_dataplane::reader::{read_holdout, read_manifest};
use strata_dataplane::store::Location;
use strata_proto::auth::{Bearer, WithBearer};
use strata_proto::checkpoint::{manifest_to_pb, shard_to_pb};
use strata_proto::v1 as pb;
use strata_proto::v1::control_service_client::ControlServiceClient;
use strata_recipe::{Coords, DeviceKind, Layout, Recipe};
use tonic::transport::Channel;

use crate::checkpoint;
use crate::collective::{Collective, TcpEndpoint, TcpOptions};
use crate::params::ParamTable;
use crate::train::{GroupKind, Groups, LocalBatch, TrainError, Trainer};

/// The CPU backend workers train on: burn-flex (gemm matmuls with AVX-512
/// where the CPU has it, SIMD elementwise kernels, rayon threads) with
/// autodiff, and strata's own kernels for the head, attention, RMSNorm,
/// SwiGLU, the projections and AdamW (`cpu`); 8.3× NdArray's tokens/s on
/// the 4-layer shape and 3.1× on the 124M one (`bench/cpu-pair.sh`, 2
/// cores).
pub type CpuBackend = Autodiff<burn::backend::Flex>;

/// What a worker is started with.
#[derive(Debug, Clone)]
pub struct WorkerArgs {
    pub coordinator: String,
    pub job: String,
    pub rank: u32,
    /// The job's attempt this worker was started for.
    pub attempt: u32,
    /// The job's worker token (`STRATA_JOB_TOKEN`).
    pub token: String,
    /// The CA (PEM) a TLS coordinator is trusted by
    /// (`STRATA_COORDINATOR_CA`); needed when `coordinator` is https.
    pub coordinator_ca: Option<String>,
    /// The address this worker's collective listener binds (port 0: any).
    pub collective_bind: SocketAddr,
    /// What to publish as the listener's address when it binds every
    /// interface: an IP, or `iface:NAME`; `None`: the address this machine
    /// reaches the coordinator from.
    pub advertise: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("coordinator {url}: {source}")]
    Connect {
        url: String,
        source: tonic::transport::Error,
    },
    #[error("coordinator call {call}: {status}")]
    Rpc {
        call: &'static str,
        status: Box<tonic::Status>,
    },
    #[error("{0}")]
    Setup(String),
    #[error("{0}")]
    Data(String),
    #[error("step {step}: {what}")]
    Collective { step: u64, what: String },
    #[error("stopped by the coordinator: {0}")]
    Stopped(String),
}

type Client = ControlServiceClient<WithBearer<Channel>>;

/// The heartbeat period the coordinator asked for (0: a second), at
/// least a second and at most a minute.
fn period_ms(asked: u32) -> u64 {
    if asked == 0 {
        1000
    } else {
        u64::from(asked).clamp(1000, 60_000)
    }
}

/// A worker whose coordinator has been unreachable this long stops: its
/// attempt is over (a restarted coordinator starts a new one).
const ORPHAN_AFTER: Duration = Duration::from_secs(120);

/// Whether a failed call means the coordinator will not have this worker
/// (an ended attempt, a job it does not know, another token).
fn refused(e: &tonic::Status) -> bool {
    use tonic::Code::*;
    matches!(e.code(), FailedPrecondition | NotFound | Unauthenticated)
}

/// A request to stop, from the coordinator or a signal; the first reason
/// is kept.
#[derive(Default)]
struct Stop {
    flag: AtomicBool,
    reason: Mutex<String>,
    leaving: AtomicBool,
    /// The attempt is over for the coordinator: nothing is saved on the
    /// way out (no manifest would be committed for it).
    abandoned: AtomicBool,
}

impl Stop {
    fn request(&self, reason: &str) {
        let mut r = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        if !self.flag.swap(true, Ordering::SeqCst) {
            tracing::info!(reason, "asked to stop");
            *r = reason.to_string();
        }
    }

    /// Stops without saving: this attempt has ended.
    fn abandon(&self, reason: &str) {
        self.abandoned.store(true, Ordering::SeqCst);
        self.request(reason);
    }

    fn requested(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }

    fn reason(&self) -> String {
        self.reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Ends the process after `grace` unless it has left by then (a rank
    /// hung in a step, or waiting on a peer that is gone, never reaches
    /// the step boundary where stops are agreed).
    fn leave_after(&self, grace: Duration) {
        if self.leaving.swap(true, Ordering::SeqCst) {
            return;
        }
        std::thread::spawn(move || {
            std::thread::sleep(grace);
            tracing::error!("did not stop within {} s; exiting", grace.as_secs());
            std::process::exit(3);
        });
    }
}

fn rpc(call: &'static str) -> impl FnOnce(tonic::Status) -> WorkerError {
    move |status| WorkerError::Rpc {
        call,
        status: Box::new(status),
    }
}

/// Runs the worker to the end of its job. Reports failures to the
/// coordinator before returning them.
pub fn run(args: WorkerArgs) -> Result<(), WorkerError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| WorkerError::Setup(format!("tokio runtime: {e}")))?;
    let token = Bearer::new(Some(&args.token))
        .ok_or_else(|| WorkerError::Setup("the job token is not valid header text".into()))?;
    let endpoint = strata_proto::auth::endpoint(&args.coordinator, args.coordinator_ca.as_deref())
        .map_err(|e| WorkerError::Setup(e.to_string()))?;
    let channel = rt.block_on(async {
        endpoint
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
            })
    })?;
    let client = ControlServiceClient::with_interceptor(channel, token);
    let result = train(&rt, client.clone(), &args);
    let (ok, error) = match &result {
        Ok(()) => (true, String::new()),
        Err(WorkerError::Stopped(_)) => return result,
        Err(e) => (false, e.to_string()),
    };
    let mut c = client;
    let done = rt.block_on(c.report_done(pb::ReportDoneRequest {
        job_id: args.job.clone(),
        rank: args.rank,
        ok,
        error,
        attempt: args.attempt,
    }));
    result?;
    done.map(|_| ()).map_err(rpc("ReportDone"))
}

fn train(
    rt: &tokio::runtime::Runtime,
    mut client: Client,
    args: &WorkerArgs,
) -> Result<(), WorkerError> {
    let endpoint = TcpEndpoint::bind(args.collective_bind, args.token.as_bytes()).map_err(|e| {
        WorkerError::Setup(format!(
            "collective listener on {}: {e}",
            args.collective_bind
        ))
    })?;
    let bound = endpoint
        .local_addr()
        .map_err(|e| WorkerError::Setup(format!("collective listener: {e}")))?;
    let addr = advertised(bound, args.advertise.as_deref(), &args.coordinator)?;
    tracing::info!(%bound, %addr, "collective listener");
    let registered = rt
        .block_on(client.register(pb::RegisterRequest {
            job_id: args.job.clone(),
            rank: args.rank,
            host: hostname(),
            pid: std::process::id(),
            collective_addr: addr.to_string(),
            attempt: args.attempt,
        }))
        .map_err(rpc("Register"))?
        .into_inner();
    // The coordinator spaces heartbeats out as its ranks grow.
    let period = Arc::new(AtomicU64::new(period_ms(registered.heartbeat_interval_ms)));
    // What this rank is busy with, for the coordinator's hang clock.
    let activity = Arc::new(AtomicI32::new(pb::WorkerActivity::Setup as i32));

    // Heartbeats from the runtime's threads, whatever the training thread
    // is doing; a stop request (the coordinator's, or SIGTERM) is seen at
    // the next step, where every rank agrees to stop after the same one.
    let step_now = Arc::new(AtomicU64::new(0));
    // This rank's last finished step and its split, for the heartbeats.
    let last_times: LastTimes = Arc::new(Mutex::new(None));
    let stop = Arc::new(Stop::default());
    {
        let stop = stop.clone();
        rt.spawn(async move {
            use tokio::signal::unix::{SignalKind, signal};
            match signal(SignalKind::terminate()) {
                Ok(mut term) => {
                    term.recv().await;
                    stop.request("SIGTERM");
                }
                Err(e) => tracing::warn!(error = %e, "cannot watch for SIGTERM"),
            }
        });
    }
    {
        let (mut c, job, rank, attempt) =
            (client.clone(), args.job.clone(), args.rank, args.attempt);
        let (step_now, stop, last_times) = (step_now.clone(), stop.clone(), last_times.clone());
        let (period, activity) = (period.clone(), activity.clone());
        rt.spawn(async move {
            let mut unreachable_since: Option<Instant> = None;
            loop {
                tokio::time::sleep(Duration::from_millis(period.load(Ordering::Relaxed))).await;
                let last = *last_times.lock().unwrap_or_else(|e| e.into_inner());
                let req = pb::HeartbeatRequest {
                    job_id: job.clone(),
                    rank,
                    step: step_now.load(Ordering::Relaxed),
                    attempt,
                    times: last.map(|l| l.1),
                    times_step: last.map_or(0, |l| l.0),
                    step_wall_s: last.map_or(0.0, |l| l.2),
                    activity: activity.load(Ordering::Relaxed),
                };
                match c.heartbeat(req).await {
                    Ok(r) if r.get_ref().stop => {
                        stop.request(&r.into_inner().stop_reason);
                    }
                    Ok(r) => {
                        unreachable_since = None;
                        if r.get_ref().heartbeat_interval_ms > 0 {
                            period.store(
                                period_ms(r.get_ref().heartbeat_interval_ms),
                                Ordering::Relaxed,
                            );
                        }
                    }
                    Err(e) if refused(&e) => {
                        // This attempt has ended: leave, even from a hung step.
                        stop.abandon(&format!(
                            "the coordinator refused this attempt: {}",
                            e.message()
                        ));
                        stop.leave_after(Duration::from_secs(30));
                    }
                    Err(e) => {
                        let since = *unreachable_since.get_or_insert_with(Instant::now);
                        tracing::warn!(error = %e, "heartbeat failed");
                        if since.elapsed() > ORPHAN_AFTER {
                            stop.abandon(&format!(
                                "the coordinator has been unreachable for {} s",
                                ORPHAN_AFTER.as_secs()
                            ));
                            stop.leave_after(Duration::from_secs(30));
                        }
                    }
                }
            }
        });
    }

    let assignment = rt
        .block_on(client.get_assignment(pb::GetAssignmentRequest {
            job_id: args.job.clone(),
            rank: args.rank,
            attempt: args.attempt,
        }))
        .map_err(rpc("GetAssignment"))?
        .into_inner();
    let recipe = Recipe::from_toml_str(&assignment.spec_toml, &args.job)
        .map_err(|e| WorkerError::Setup(e.to_string()))?;
    // The device before anything else, so that a rank without its GPU
    // fails before its peers wait for it in the groups.
    let (device, gpu) = Device::open(recipe.device, args.rank)?;
    // Every device's peak together (the layout's devices alike), for MFU.
    let peak_flops = crate::peak::device_peak_flops(&recipe, gpu.as_deref())
        .map(|p| p * f64::from(recipe.parallel.layout.world_size()));
    let coords = assignment.coords.unwrap_or_default();
    let coords = Coords {
        dp: coords.dp,
        pp: coords.pp,
        tp: coords.tp,
    };
    let layout = recipe.parallel.layout;
    // Group names carry the attempt: a worker of an ended attempt cannot
    // join the next one's groups.
    let (groups, members) = join_groups(
        &endpoint,
        &format!("{}/a{}", args.job, args.attempt),
        coords,
        layout,
        &assignment.groups,
        recipe.model.tie_embeddings,
        recipe.parallel.virtual_stages > 1,
    )?;
    tracing::info!(
        rank = args.rank,
        tp = coords.tp,
        pp = coords.pp,
        dp = coords.dp,
        %layout,
        "joined the process groups"
    );

    let url = recipe.data.dataset.clone();
    let loc = Location::parse(&url, false).map_err(|e| WorkerError::Data(e.to_string()))?;
    let manifest = rt
        .block_on(read_manifest(&loc))
        .map_err(|e| WorkerError::Data(e.to_string()))?;
    let session = Session {
        rt,
        client,
        args,
        recipe,
        spec_toml: assignment.spec_toml.clone(),
        resume: assignment.resume.then_some(assignment.resume_from_step),
        resume_job: (!assignment.resume_from_job.is_empty())
            .then(|| assignment.resume_from_job.clone()),
        coords,
        groups,
        members,
        data: (loc, manifest),
        url,
        step_now,
        stop,
        peak_flops,
        last_times,
        activity,
    };
    match device {
        Device::Cpu => steps::<CpuBackend>(session, Default::default(), None),
        #[cfg(feature = "cuda")]
        Device::Cuda(index) => {
            let mut session = session;
            // Gradients are summed over dp by NCCL on the GPUs; the id
            // travels over the host dp group this attempt's rendezvous set
            // up.
            let dp: Option<crate::train::DeviceDp<Autodiff<crate::cuda::CudaFused>>> =
                if session.groups.dp.size() > 1 {
                    let nccl = crate::nccl::NcclGroup::over(session.groups.dp.as_mut(), index)
                        .map_err(|e| {
                            WorkerError::Setup(format!(
                                "NCCL for the data-parallel group on {}: {e}",
                                hostname()
                            ))
                        })?;
                    tracing::info!(rank = session.args.rank, "data-parallel sums over NCCL");
                    Some(Box::new(nccl))
                } else {
                    None
                };
            steps::<Autodiff<crate::cuda::CudaFused>>(session, crate::cuda::device(index), dp)
        }
    }
}

/// The device a worker trains on, found before it joins its groups.
enum Device {
    Cpu,
    /// A GPU, by its index among the visible ones.
    #[cfg(feature = "cuda")]
    Cuda(usize),
}

impl Device {
    /// Opens what the recipe asks for: the CPU, or the first GPU this
    /// worker sees (its launcher sets `CUDA_VISIBLE_DEVICES` to the one
    /// GPU its slot leases). A missing GPU, driver or CUDA build is an
    /// error that names the device and the host (the coordinator adds the
    /// rank).
    /// The device, and the GPU's name when it is one.
    fn open(kind: DeviceKind, rank: u32) -> Result<(Device, Option<String>), WorkerError> {
        match kind {
            DeviceKind::Cpu => Ok((Device::Cpu, None)),
            DeviceKind::Cuda => Device::cuda(rank),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda(rank: u32) -> Result<(Device, Option<String>), WorkerError> {
        let visible = std::env::var("CUDA_VISIBLE_DEVICES").unwrap_or_else(|_| "unset".into());
        let info = crate::cuda::probe(0).map_err(|e| {
            WorkerError::Setup(format!(
                "GPU 0 of CUDA_VISIBLE_DEVICES={visible} on {}: {e}",
                hostname()
            ))
        })?;
        tracing::info!(
            rank,
            gpu = %info.name,
            memory_gib = info.memory_bytes as f64 / f64::from(1u32 << 30),
            visible = %visible,
            "training on CUDA"
        );
        Ok((Device::Cuda(0), Some(info.name)))
    }

    #[cfg(not(feature = "cuda"))]
    fn cuda(_rank: u32) -> Result<(Device, Option<String>), WorkerError> {
        Err(WorkerError::Setup(format!(
            "on {}: the recipe trains on cuda ([device] backend) but this strata was built without CUDA; rebuild it with `cargo build --release --features cuda`",
            hostname()
        )))
    }
}

/// What a worker's steps need once its groups are joined and its data
/// is open.
struct Session<'a> {
    rt: &'a tokio::runtime::Runtime,
    client: Client,
    args: &'a WorkerArgs,
    recipe: Recipe,
    /// The recipe's text, as checkpoints record it.
    spec_toml: String,
    /// Continue from a checkpoint: its step, 0 for the latest.
    resume: Option<u64>,
    /// The job whose checkpoint to resume from, when not this one's (a
    /// branch's parent).
    resume_job: Option<String>,
    coords: Coords,
    groups: Groups,
    members: Members,
    /// The dataset and its manifest.
    data: (Location, strata_dataplane::manifest::Manifest),
    url: String,
    step_now: Arc<AtomicU64>,
    /// What the rank is busy with (`pb::WorkerActivity`), for heartbeats.
    activity: Arc<AtomicI32>,
    stop: Arc<Stop>,
    /// Every device's peak FLOP/s together, when known (MFU's denominator).
    peak_flops: Option<f64>,
    last_times: LastTimes,
}

/// A rank's last finished step, where its time went, and its wall time.
type LastTimes = Arc<Mutex<Option<(u64, pb::StepTimes, f64)>>>;

/// Builds the rank's model part on `device` and trains it to the end.
fn steps<B: AutodiffBackend>(
    s: Session<'_>,
    device: B::Device,
    dp_device: Option<crate::train::DeviceDp<B>>,
) -> Result<(), WorkerError> {
    let Session {
        rt,
        mut client,
        args,
        recipe,
        spec_toml,
        resume,
        resume_job,
        coords,
        groups,
        members,
        data,
        url,
        step_now,
        stop,
        peak_flops,
        last_times,
        activity,
    } = s;
    let busy = |a: pb::WorkerActivity| activity.store(a as i32, Ordering::Relaxed);
    let layout = recipe.parallel.layout;
    let chunks = recipe.parallel.virtual_stages;
    let table = ParamTable::interleaved(&recipe.model, layout, coords, chunks);
    let mut trainer = Trainer::<B>::new(
        &recipe.model,
        table,
        recipe.seed,
        recipe.optimizer,
        groups,
        device,
    )
    .with_precision(recipe.precision)
    .with_sharded_optimizer(recipe.parallel.shard_optimizer)
    .with_recompute(recipe.recompute);
    if let Some(dp) = dp_device {
        trainer = trainer.with_device_dp(dp);
    }
    let layers = trainer.table().chunks.clone();
    tracing::info!(
        params = trainer.n_params(),
        precision = %recipe.precision,
        stage = coords.pp,
        layers = ?layers,
        steps = recipe.data.n_steps(),
        "model part built"
    );

    let tps = recipe.data.tokens_per_step;
    let (data_loc, dataset) = data;
    let fingerprint = dataset.fingerprint();
    let eval = match recipe.eval {
        None => None,
        Some(ev) => {
            let tokens = rt
                .block_on(read_holdout(&data_loc, &dataset))
                .map_err(|e| WorkerError::Data(format!("{url}: {e}")))?
                .ok_or_else(|| {
                    WorkerError::Data(format!(
                        "{url}: [eval] needs a held-out split (decompose with --holdout-fraction)"
                    ))
                })?;
            Some(EvalSet::new(
                &tokens,
                ev,
                recipe.model.max_seq_len as usize,
                coords.dp,
                layout.dp,
                recipe.parallel.microbatches.max(1) as usize,
            )?)
        }
    };
    let mut checkpoints = Checkpoints::open(&recipe, &args.job, args.attempt, rt.handle())?;
    let resumed = match (&mut checkpoints, resume) {
        (Some(ck), Some(from)) => {
            let root = resume_job.as_deref().unwrap_or(&args.job);
            Some(ck.resume(rt, &mut trainer, (root, from), &recipe, &url, fingerprint)?)
        }
        (Some(ck), None) => {
            ck.refuse_existing(rt)?;
            None
        }
        (None, Some(_)) => {
            return Err(WorkerError::Setup(
                "asked to resume, but the recipe has no [checkpoint] section".into(),
            ));
        }
        (None, None) => None,
    };
    let first_step = resumed.as_ref().map_or(1, |(step, _)| step + 1);
    let loader_cfg = LoaderConfig::for_recipe(&recipe, coords.dp);
    let mut loader = Loader::new(
        data_loc,
        dataset,
        &loader_cfg,
        resumed.map(|(_, cursor)| cursor),
    )
    .map_err(|e| WorkerError::Data(format!("{url}: {e}")))?;
    let mut resumed_from = (first_step > 1).then_some(first_step - 1);

    let microbatches = recipe.parallel.microbatches.max(1) as usize;
    let report = coords.dp == 0 && coords.pp == 0 && coords.tp == 0;
    let n_steps = recipe.data.n_steps();
    let hang_at = fault_at("STRATA_FAULT_HANG_AT", args, true);
    let stop_after = fault_at("STRATA_FAULT_STOP_AFTER", args, false);
    let about = Run {
        job: &args.job,
        attempt: args.attempt,
        tps,
        recipe: &recipe,
        spec_toml: &spec_toml,
        dataset: &url,
        fingerprint,
    };
    let mut saved_at = first_step - 1;
    busy(pb::WorkerActivity::Step);
    for step in first_step..=n_steps {
        // The step's span (exported as a trace when configured): data,
        // the pipeline's forward and backward passes, the all-reduce, the
        // optimizer, evaluation, the report and the checkpoint's copy.
        let _step_span = tracing::info_span!("step", step).entered();
        // Every rank stops after the same step, so that they can save it
        // together: any rank's request stops them all.
        let go_on = trainer
            .all_ok(!stop.requested())
            .map_err(|e| WorkerError::Collective {
                step,
                what: members.describe(&e),
            })?;
        if !go_on {
            let done = step - 1;
            if let Some(ck) = &mut checkpoints
                && !stop.abandoned.load(Ordering::SeqCst)
            {
                busy(pb::WorkerActivity::Checkpoint);
                if done > saved_at {
                    let header = report.then(|| about.manifest(done, &trainer, loader.cursor()));
                    ck.save(done, &mut trainer, coords.dp, header)
                        .map_err(|e| WorkerError::Collective {
                            step: done,
                            what: format!("checkpoint: {}", members.describe(&e)),
                        })?;
                }
                // The save of the step it stopped after, or one the
                // interval started just before the stop, is written and
                // reported before the worker leaves.
                ck.report(rt, &mut client, args, true)?;
            }
            let reason = if stop.requested() {
                stop.reason()
            } else {
                "another rank was asked to stop".to_string()
            };
            return Err(WorkerError::Stopped(reason));
        }
        if hang_at == Some(step) {
            tracing::warn!(step, "STRATA_FAULT_HANG_AT: hanging here, heartbeats go on");
            loop {
                std::thread::sleep(Duration::from_secs(3600));
            }
        }
        let t0 = Instant::now();
        let batch = tracing::info_span!("data")
            .in_scope(|| rt.block_on(loader.next_batch()))
            .map_err(|e| WorkerError::Data(format!("{url}: {e}")))?;
        let data_s = t0.elapsed().as_secs_f64();
        let seq = batch.seq_len as usize;
        let rows = batch.inputs.len() / seq;
        let per = rows / microbatches * seq;
        let micro: Vec<LocalBatch<'_>> = (0..microbatches)
            .map(|m| LocalBatch {
                inputs: &batch.inputs[m * per..(m + 1) * per],
                targets: &batch.targets[m * per..(m + 1) * per],
                seq_len: seq,
            })
            .collect();
        let tokens_before = (step - 1) * tps;
        let lr = recipe.schedule.lr_for_step(tokens_before, tps);
        let stats = trainer
            .step(step, &micro, tps, lr)
            .map_err(|e| WorkerError::Collective {
                step,
                what: members.describe(&e),
            })?;
        step_now.store(step, Ordering::Relaxed);
        let times = pb::StepTimes {
            data_s,
            forward_s: stats.forward.as_secs_f64(),
            backward_s: stats.backward.as_secs_f64(),
            all_reduce_s: stats.all_reduce.as_secs_f64(),
            optimizer_s: stats.optimizer.as_secs_f64(),
        };
        *last_times.lock().unwrap_or_else(|e| e.into_inner()) =
            Some((step, times, t0.elapsed().as_secs_f64()));
        let eval_loss = match &eval {
            Some(e) if step % e.every == 0 || step == n_steps => {
                busy(pb::WorkerActivity::Eval);
                let loss = tracing::info_span!("eval", tokens = e.tokens)
                    .in_scope(|| trainer.evaluate(step, &e.micro(), e.tokens))
                    .map_err(|err| WorkerError::Collective {
                        step,
                        what: format!("evaluation: {}", members.describe(&err)),
                    })?;
                busy(pb::WorkerActivity::Step);
                Some(loss)
            }
            _ => None,
        };
        if !stats.loss.is_finite() {
            return Err(WorkerError::Data(format!(
                "step {step}: the loss is {} (lr {lr:e}, gradient norm {:e})",
                stats.loss, stats.grad_norm
            )));
        }
        if report {
            let wall = t0.elapsed().as_secs_f64();
            let metrics = pb::StepMetrics {
                step,
                tokens: step * tps,
                loss: stats.loss,
                lr,
                tokens_per_s: tps as f64 / wall,
                grad_norm: stats.grad_norm,
                seq_log2: batch.log2,
                times: Some(times),
                stages: stats
                    .stages
                    .iter()
                    .enumerate()
                    .map(|(i, s)| pb::StageMetrics {
                        stage: i as u32,
                        forward_s: s.forward_s,
                        backward_s: s.backward_s,
                        wait_s: s.wait_s,
                        pipeline_s: s.pipeline_s,
                        bubble: s.bubble(),
                        tp_comm_s: s.tp_comm_s,
                    })
                    .collect(),
                bubble_theory: layout.bubble_fraction(microbatches as u32, chunks),
                eval_loss,
                peak_flops,
            };
            rt.block_on(
                client
                    .report_metrics(pb::ReportMetricsRequest {
                        job_id: args.job.clone(),
                        rank: args.rank,
                        steps: vec![metrics],
                        attempt: args.attempt,
                        resumed_from_step: resumed_from.take(),
                    })
                    .instrument(tracing::info_span!("report")),
            )
            .map_err(rpc("ReportMetrics"))?;
        }
        if let Some(ck) = &mut checkpoints {
            if ck.cfg.saves_at(step, n_steps) {
                busy(pb::WorkerActivity::Checkpoint);
                let header = report.then(|| about.manifest(step, &trainer, loader.cursor()));
                ck.save(step, &mut trainer, coords.dp, header)
                    .map_err(|e| WorkerError::Collective {
                        step,
                        what: format!("checkpoint: {}", members.describe(&e)),
                    })?;
                saved_at = step;
                busy(pb::WorkerActivity::Step);
            }
            ck.report(rt, &mut client, args, false)?;
        }
        if stop_after == Some(step) {
            tracing::warn!(step, "STRATA_FAULT_STOP_AFTER: stopping after this step");
            stop.request("STRATA_FAULT_STOP_AFTER");
        }
    }
    if let Some(ck) = &mut checkpoints {
        busy(pb::WorkerActivity::Checkpoint);
        ck.report(rt, &mut client, args, true)?;
    }
    Ok(())
}

/// This replica's share of the held-out evaluation batch: the split's
/// first `[eval] tokens` in windows of `max_seq_len + 1` (inputs, and
/// targets one token on), rows dealt to the data-parallel replicas in
/// contiguous runs (sizes differing by at most one) and each replica's
/// rows to its microbatches alike: every layout evaluates the same
/// windows.
struct EvalSet {
    every: u64,
    seq: usize,
    inputs: Vec<u32>,
    targets: Vec<u32>,
    /// Each microbatch's first row and row count.
    parts: Vec<(usize, usize)>,
    /// Target tokens of the whole batch, every replica's.
    tokens: u64,
}

impl EvalSet {
    fn new(
        held_out: &[u32],
        ev: strata_recipe::EvalConfig,
        seq: usize,
        replica: u32,
        replicas: u32,
        microbatches: usize,
    ) -> Result<EvalSet, WorkerError> {
        let window = seq + 1;
        let rows = (ev.rows(seq as u64) as usize).min(held_out.len() / window);
        let need = replicas as usize * microbatches;
        if rows < need {
            return Err(WorkerError::Data(format!(
                "[eval] the held-out split ({} tokens) makes {rows} windows of {window} tokens; {replicas} data-parallel replicas of {microbatches} microbatches need {need}",
                held_out.len()
            )));
        }
        let deal = |n: usize, parts: usize, k: usize| (k * n / parts, (k + 1) * n / parts);
        let (first, last) = deal(rows, replicas as usize, replica as usize);
        let (mut inputs, mut targets) = (Vec::new(), Vec::new());
        for r in first..last {
            inputs.extend_from_slice(&held_out[r * window..r * window + seq]);
            targets.extend_from_slice(&held_out[r * window + 1..(r + 1) * window]);
        }
        let mine = last - first;
        let parts = (0..microbatches)
            .map(|k| {
                let (a, b) = deal(mine, microbatches, k);
                (a, b - a)
            })
            .collect();
        Ok(EvalSet {
            every: ev.every_steps,
            seq,
            inputs,
            targets,
            parts,
            tokens: (rows * seq) as u64,
        })
    }

    fn micro(&self) -> Vec<LocalBatch<'_>> {
        self.parts
            .iter()
            .map(|&(first, rows)| {
                let span = first * self.seq..(first + rows) * self.seq;
                LocalBatch {
                    inputs: &self.inputs[span.clone()],
                    targets: &self.targets[span],
                    seq_len: self.seq,
                }
            })
            .collect()
    }
}

/// Fault injection for the recovery tests, the step it strikes at.
/// `STRATA_FAULT_HANG_AT = "JOB:ATTEMPT:RANK:STEP"` makes that rank of
/// that attempt of that job stop training before that step while its
/// heartbeats go on (a hung collective or kernel, as the coordinator sees
/// it). `STRATA_FAULT_STOP_AFTER = "JOB:ATTEMPT:STEP"` makes every rank
/// ask itself to stop after that step, as a SIGTERM then would.
fn fault_at(var: &str, args: &WorkerArgs, per_rank: bool) -> Option<u64> {
    let spec = std::env::var(var).ok()?;
    let (job, rest) = spec.split_once(':')?;
    let parts: Vec<u64> = rest.split(':').filter_map(|p| p.parse().ok()).collect();
    let (attempt, rank, step) = match (per_rank, &parts[..]) {
        (true, &[attempt, rank, step]) => (attempt, Some(rank), step),
        (false, &[attempt, step]) => (attempt, None, step),
        _ => return None,
    };
    (job == args.job
        && attempt == u64::from(args.attempt)
        && rank.is_none_or(|r| r == u64::from(args.rank)))
    .then_some(step)
}

/// What a checkpoint's manifest says of the run.
struct Run<'a> {
    job: &'a str,
    attempt: u32,
    tps: u64,
    recipe: &'a Recipe,
    spec_toml: &'a str,
    dataset: &'a str,
    fingerprint: u32,
}

impl Run<'_> {
    /// The manifest of step `step`'s checkpoint as rank 0 sends it (the
    /// coordinator adds every rank's files).
    fn manifest<B: AutodiffBackend>(
        &self,
        step: u64,
        trainer: &Trainer<B>,
        cursor: &strata_dataplane::loader::Cursor,
    ) -> checkpoint::Manifest {
        let l = self.recipe.parallel.layout;
        checkpoint::Manifest {
            format: checkpoint::FORMAT.into(),
            version: checkpoint::VERSION,
            job: self.job.into(),
            attempt: self.attempt,
            step,
            tokens_seen: step * self.tps,
            optimizer_steps: trainer.optimizer_steps(),
            layout: checkpoint::SavedLayout {
                tp: l.tp,
                pp: l.pp,
                dp: l.dp,
                virtual_stages: self.recipe.parallel.virtual_stages,
            },
            model: self.recipe.model,
            recipe: self.spec_toml.into(),
            data: Some(checkpoint::DataState {
                dataset: self.dataset.into(),
                fingerprint: self.fingerprint,
                cursor: cursor.clone(),
            }),
            shards: Vec::new(),
            written_at: 0,
        }
    }
}

/// A worker's checkpoints: where they go, the background saver, and the
/// saves not yet reported to the coordinator.
struct Checkpoints {
    loc: Location,
    /// The job's folder under `[checkpoint] dir`.
    root: String,
    /// When to save: every N steps, the last, and the kept steps.
    cfg: strata_recipe::CheckpointConfig,
    /// This worker's attempt, in its files' names.
    attempt: u32,
    saver: checkpoint::Saver,
    /// Rank 0's manifests of saves in flight, by step.
    headers: std::collections::HashMap<u64, checkpoint::Manifest>,
    /// Each save's stall: the copy out, plus waiting for the save before.
    stalls: std::collections::HashMap<u64, f64>,
    done: Vec<checkpoint::SaveResult>,
}

impl Checkpoints {
    fn open(
        recipe: &Recipe,
        job: &str,
        attempt: u32,
        rt: &tokio::runtime::Handle,
    ) -> Result<Option<Checkpoints>, WorkerError> {
        let Some(cfg) = &recipe.checkpoint else {
            return Ok(None);
        };
        let loc = Location::parse(&cfg.dir, true)
            .map_err(|e| WorkerError::Setup(format!("checkpoint.dir: {e}")))?;
        Ok(Some(Checkpoints {
            saver: checkpoint::Saver::new(loc.clone(), job.to_string(), rt.clone()),
            loc,
            root: job.to_string(),
            cfg: cfg.clone(),
            attempt,
            headers: Default::default(),
            stalls: Default::default(),
            done: Vec::new(),
        }))
    }

    /// A job starting from scratch must not find checkpoints of its own
    /// id: they belong to an earlier job (a coordinator whose state was
    /// wiped numbers jobs again from 1) and would be mixed with this one's.
    fn refuse_existing(&self, rt: &tokio::runtime::Runtime) -> Result<(), WorkerError> {
        let (found, _) = rt
            .block_on(checkpoint::list(&self.loc, &self.root))
            .map_err(|e| WorkerError::Setup(format!("checkpoint.dir: {e}")))?;
        if found.is_empty() {
            return Ok(());
        }
        let steps: Vec<String> = found.iter().map(|m| m.step.to_string()).collect();
        Err(WorkerError::Setup(format!(
            "checkpoint.dir: {} already holds checkpoints of job {} (steps {}) and this attempt starts from scratch; resume the job (`strata resume`), or give the recipe another [checkpoint] dir",
            self.loc.url_of(&self.root),
            self.root,
            steps.join(", ")
        )))
    }

    /// Restores the trainer from the checkpoint of step `from` (0: the
    /// newest every rank can read) and returns its step and the loader's
    /// cursor. The recipe and the dataset must be those the checkpoint
    /// continues.
    fn resume<B: AutodiffBackend>(
        &mut self,
        rt: &tokio::runtime::Runtime,
        trainer: &mut Trainer<B>,
        (root, from): (&str, u64),
        recipe: &Recipe,
        dataset_url: &str,
        fingerprint: u32,
    ) -> Result<(u64, strata_dataplane::loader::Cursor), WorkerError> {
        let setup = |m: String| WorkerError::Setup(format!("resuming: {m}"));
        let (mut found, _) = rt
            .block_on(checkpoint::list(&self.loc, root))
            .map_err(|e| setup(format!("checkpoint.dir: {e}")))?;
        found.retain(|m| if from == 0 { true } else { m.step == from });
        let table = trainer.table().clone();
        let r = checkpoint::resume_agreed(rt.handle(), &self.loc, root, &found, &table, |ok| {
            trainer.all_ok(ok).map_err(|e| e.to_string())
        })
        .map_err(setup)?;
        let Some(r) = r else {
            return Err(setup(format!(
                "no readable checkpoint{} under {}",
                if from == 0 {
                    String::new()
                } else {
                    format!(" of step {from}")
                },
                self.loc.url_of(root)
            )));
        };
        for (step, why) in &r.skipped {
            tracing::warn!(step, reason = %why, "passed over an unreadable checkpoint");
        }
        let m = &r.manifest;
        let saved = Recipe::from_toml_str(&m.recipe, &recipe.name)
            .map_err(|e| setup(format!("the recipe of step {}'s checkpoint: {e}", m.step)))?;
        let conflicts = strata_recipe::resume_conflicts(&saved, recipe);
        if !conflicts.is_empty() {
            let list: Vec<String> = conflicts.iter().map(|p| p.to_string()).collect();
            return Err(setup(list.join("; ")));
        }
        let Some(data) = &m.data else {
            return Err(setup(format!(
                "step {}'s checkpoint has no loader cursor",
                m.step
            )));
        };
        if data.fingerprint != fingerprint {
            return Err(setup(format!(
                "data.dataset: {dataset_url} is not the dataset step {}'s checkpoint was trained on ({}; fingerprint {:08x}, now {fingerprint:08x})",
                m.step, data.dataset, data.fingerprint
            )));
        }
        if data.cursor.step != m.step {
            return Err(setup(format!(
                "step {}'s checkpoint holds a loader cursor at step {}",
                m.step, data.cursor.step
            )));
        }
        trainer.restore(&r.restored.master, &r.restored.state);
        tracing::info!(step = m.step, layout = ?m.layout, "resumed from a checkpoint");
        Ok((m.step, data.cursor.clone()))
    }

    /// Copies the trainer's state out (the step's stall) and hands it to
    /// the background saver. Under a sharded optimizer every rank of the
    /// data-parallel group takes part in gathering the moments.
    fn save<B: AutodiffBackend>(
        &mut self,
        step: u64,
        trainer: &mut Trainer<B>,
        dp_rank: u32,
        header: Option<checkpoint::Manifest>,
    ) -> Result<(), TrainError> {
        let _span = tracing::info_span!("checkpoint_copy", step).entered();
        let t = Instant::now();
        let gathered = if trainer.shards_optimizer() {
            Some(trainer.optimizer_state()?)
        } else {
            None
        };
        let gather_s = t.elapsed().as_secs_f64();
        let mut snapshot =
            checkpoint::Snapshot::take(step, self.attempt, trainer.table(), dp_rank, || {
                let state = match gathered {
                    Some(state) => state,
                    None => trainer.held_optimizer_state(),
                };
                (trainer.master(), state)
            });
        snapshot.copy_s += gather_s;
        let copy_s = snapshot.copy_s;
        let (done, waited) = self.saver.save(snapshot);
        self.done.extend(done);
        let stall = copy_s + waited.as_secs_f64();
        tracing::info!(
            step,
            stall_s = stall,
            "checkpoint copied out; writing in the background"
        );
        self.stalls.insert(step, stall);
        if let Some(h) = header {
            self.headers.insert(step, h);
        }
        Ok(())
    }

    /// Tells the coordinator about finished saves (all of them, waiting,
    /// when `wait`). A failed save is reported and training goes on.
    fn report(
        &mut self,
        rt: &tokio::runtime::Runtime,
        client: &mut Client,
        args: &WorkerArgs,
        wait: bool,
    ) -> Result<(), WorkerError> {
        let mut done = std::mem::take(&mut self.done);
        done.extend(if wait {
            self.saver.wait()
        } else {
            self.saver.finished()
        });
        for r in done {
            let step = match &r {
                Ok(s) => s.step,
                Err(f) => f.step,
            };
            let header = self.headers.remove(&step);
            let stall_s = self.stalls.remove(&step).unwrap_or(0.0);
            let mut req = pb::ReportCheckpointRequest {
                job_id: args.job.clone(),
                rank: args.rank,
                attempt: args.attempt,
                step,
                ok: r.is_ok(),
                stall_s,
                manifest: header.as_ref().map(manifest_to_pb),
                ..Default::default()
            };
            match r {
                Ok(saved) => {
                    tracing::info!(
                        step,
                        bytes = saved.bytes,
                        write_s = saved.write_s,
                        retries = saved.retries,
                        "checkpoint files written"
                    );
                    req.shards = saved.shards.iter().map(shard_to_pb).collect();
                    req.write_s = saved.write_s;
                    req.retries = saved.retries;
                }
                Err(f) => {
                    tracing::error!(step, error = %f, "checkpoint not written; training goes on");
                    req.error = f.to_string();
                }
            }
            rt.block_on(client.report_checkpoint(req))
                .map_err(rpc("ReportCheckpoint"))?;
        }
        Ok(())
    }
}

/// The address the other ranks reach a listener bound at `bound` at: that
/// address itself, unless it is every interface (0.0.0.0 or ::); then the
/// one `advertise` names (an IP, or `iface:NAME`), or else the address of
/// the interface this machine reaches the coordinator through.
pub fn advertised(
    bound: SocketAddr,
    advertise: Option<&str>,
    coordinator: &str,
) -> Result<SocketAddr, WorkerError> {
    let setup = |m: String| WorkerError::Setup(m);
    let ip = match advertise {
        Some(a) => {
            if let Some(name) = a.strip_prefix("iface:") {
                interface_ipv4(name).ok_or_else(|| {
                    setup(format!(
                        "--advertise {a}: no network interface {name} with an IPv4 address"
                    ))
                })?
            } else {
                a.parse::<IpAddr>().map_err(|e| {
                    setup(format!(
                        "--advertise {a:?}: not an IP address or iface:NAME ({e})"
                    ))
                })?
            }
        }
        None if !bound.ip().is_unspecified() => return Ok(bound),
        None => route_to(coordinator).map_err(|e| {
            setup(format!(
                "cannot tell which address reaches the coordinator {coordinator} (give --advertise): {e}"
            ))
        })?,
    };
    Ok(SocketAddr::new(ip, bound.port()))
}

/// This machine's address on the route to `url`'s host: a UDP socket
/// "connected" there (no packet is sent) is bound to it.
fn route_to(url: &str) -> std::io::Result<IpAddr> {
    let host = url
        .split_once("://")
        .map_or(url, |(_, rest)| rest)
        .split('/')
        .next()
        .unwrap_or_default();
    let target = std::net::ToSocketAddrs::to_socket_addrs(host)?
        .next()
        .ok_or_else(|| std::io::Error::other(format!("{host} resolves to no address")))?;
    let any: SocketAddr = if target.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let sock = std::net::UdpSocket::bind(any)?;
    sock.connect(target)?;
    Ok(sock.local_addr()?.ip())
}

/// The IPv4 address of network interface `name`.
#[allow(unsafe_code)]
fn interface_ipv4(name: &str) -> Option<IpAddr> {
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `list` with a linked list that stays valid
    // until freeifaddrs, which is called once below; every pointer read
    // is checked for null first.
    unsafe {
        if libc::getifaddrs(&mut list) != 0 {
            return None;
        }
        let mut found = None;
        let mut cur = list;
        while !cur.is_null() {
            let ifa = &*cur;
            if !ifa.ifa_addr.is_null()
                && i32::from((*ifa.ifa_addr).sa_family) == libc::AF_INET
                && std::ffi::CStr::from_ptr(ifa.ifa_name).to_str() == Ok(name)
            {
                let sin = &*(ifa.ifa_addr as *const libc::sockaddr_in);
                found = Some(IpAddr::from(
                    u32::from_be(sin.sin_addr.s_addr).to_be_bytes(),
                ));
                break;
            }
            cur = ifa.ifa_next;
        }
        libc::freeifaddrs(list);
        found
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

/// The world ranks of each joined group's members, to name a failed peer
/// by its world rank.
struct Members(Vec<(GroupKind, Vec<u32>)>);

impl Members {
    /// A step's failure, naming the group and the peer's world rank.
    fn describe(&self, e: &TrainError) -> String {
        let peer = e.source.peer();
        let world = self
            .0
            .iter()
            .find(|(k, _)| *k == e.group)
            .and_then(|(_, ranks)| ranks.get(peer?));
        match (peer, world) {
            (Some(p), Some(w)) => format!("{e} (group rank {p} is world rank {w})"),
            _ => e.to_string(),
        }
    }
}

/// Joins the tensor-parallel, pipeline and data-parallel groups of the
/// assignment, in that order on every rank (each join waits for its
/// members; connections for groups joined later wait in the endpoint), then
/// on the first and last stages the embedding group of a tied model and the
/// wrap-around group of an interleaved pipeline.
fn join_groups(
    endpoint: &TcpEndpoint,
    job: &str,
    c: Coords,
    layout: Layout,
    groups: &[pb::Group],
    tied: bool,
    interleaved: bool,
) -> Result<(Groups, Members), WorkerError> {
    // A group's members in group order: world rank and collective address.
    let members_of = |kind: pb::GroupKind| -> Result<Vec<(u32, String)>, WorkerError> {
        let g = groups
            .iter()
            .find(|g| g.kind == kind as i32)
            .ok_or_else(|| WorkerError::Setup(format!("the assignment has no {kind:?} group")))?;
        Ok(g.members
            .iter()
            .map(|m| (m.rank, m.collective_addr.clone()))
            .collect())
    };
    let opts = TcpOptions::default();
    let mut joined = Vec::new();
    let mut join = |kind: GroupKind,
                    name: String,
                    members: Vec<(u32, String)>,
                    me: usize|
     -> Result<Box<dyn Collective>, WorkerError> {
        let addrs = members
            .iter()
            .map(|(r, a)| {
                a.parse::<SocketAddr>().map_err(|e| {
                    WorkerError::Setup(format!("rank {r}'s collective address {a:?}: {e}"))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let g = endpoint
            .join(&name, me, &addrs, &opts)
            .map_err(|e| WorkerError::Setup(format!("{kind} group: {e}")))?;
        joined.push((kind, members.into_iter().map(|(r, _)| r).collect()));
        Ok(Box::new(g))
    };
    let tp = join(
        GroupKind::Tensor,
        format!("{job}/tp/dp{}-pp{}", c.dp, c.pp),
        members_of(pb::GroupKind::Tensor)?,
        c.tp as usize,
    )?;
    let stages = members_of(pb::GroupKind::Pipeline)?;
    let ends = vec![stages[0].clone(), stages[stages.len() - 1].clone()];
    let pp = join(
        GroupKind::Pipeline,
        format!("{job}/pp/dp{}-tp{}", c.dp, c.tp),
        stages,
        c.pp as usize,
    )?;
    let dp = join(
        GroupKind::Data,
        format!("{job}/dp/pp{}-tp{}", c.pp, c.tp),
        members_of(pb::GroupKind::Data)?,
        c.dp as usize,
    )?;
    let at_an_end = layout.pp > 1 && (c.pp == 0 || c.pp + 1 == layout.pp);
    let me = usize::from(c.pp != 0);
    let mut end_group = |wanted: bool, kind: GroupKind, name: &str| {
        (wanted && at_an_end)
            .then(|| {
                let name = format!("{job}/{name}/dp{}-tp{}", c.dp, c.tp);
                join(kind, name, ends.clone(), me)
            })
            .transpose()
    };
    let emb = end_group(tied, GroupKind::Embedding, "emb")?;
    let wrap = end_group(interleaved, GroupKind::Wrap, "wrap")?;
    Ok((
        Groups {
            tp,
            pp,
            dp,
            emb,
            wrap,
        },
        Members(joined),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_advertised_address_is_one_peers_can_reach() {
        let bound: SocketAddr = "127.0.0.1:4000".parse().unwrap();
        let any: SocketAddr = "0.0.0.0:4000".parse().unwrap();
        let coord = "http://127.0.0.1:7070";
        // A specific address is published as bound.
        assert_eq!(advertised(bound, None, coord).unwrap(), bound);
        // Every interface: the one that reaches the coordinator, …
        assert_eq!(advertised(any, None, coord).unwrap(), bound);
        // … a named interface's, or an explicit IP, with the bound port.
        assert_eq!(advertised(any, Some("iface:lo"), coord).unwrap(), bound);
        assert_eq!(
            advertised(any, Some("10.1.2.3"), coord).unwrap(),
            "10.1.2.3:4000".parse().unwrap()
        );
        let err = advertised(any, Some("iface:nope0"), coord)
            .unwrap_err()
            .to_string();
        assert!(err.contains("no network interface nope0"), "{err}");
        let err = advertised(any, Some("a host"), coord)
            .unwrap_err()
            .to_string();
        assert!(err.contains("not an IP address or iface:NAME"), "{err}");
    }
}
