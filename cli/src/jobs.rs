//! The coordinator, the worker and the client commands: submit, status,
//! list, cancel, metrics.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use strata_coordinator::job::JobState;
use strata_coordinator::rpc::convert::state_from_pb;
use strata_coordinator::startup::{
    self, CoordinatorOptions, LauncherChoice, ServeError, SlurmChoice,
};
use strata_proto::auth::{Bearer, WithBearer};
use strata_proto::v1 as pb;
use strata_proto::v1::job_service_client::JobServiceClient;
use tonic::transport::Channel;

use crate::UserError;

pub const DEFAULT_COORDINATOR: &str = "http://127.0.0.1:7070";

#[derive(Args, Clone)]
pub struct Connect {
    /// The coordinator's URL [default: $STRATA_COORDINATOR, then http://127.0.0.1:7070].
    #[arg(long)]
    pub coordinator: Option<String>,
    /// A file holding the coordinator's bearer token [default:
    /// $STRATA_TOKEN, then the one a coordinator of this user's on this
    /// machine left in ~/.config/strata/tokens].
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// The token itself, for a client in the coordinator's own process.
    #[arg(skip)]
    pub token: Option<String>,
    /// The CA (PEM) an https coordinator is trusted by [default: $STRATA_CA,
    /// then the one a coordinator of this user's on this machine left
    /// beside its token].
    #[arg(long)]
    pub ca: Option<PathBuf>,
}

pub type Client = JobServiceClient<WithBearer<Channel>>;

impl Connect {
    pub fn url(&self) -> String {
        self.coordinator
            .clone()
            .or_else(|| std::env::var("STRATA_COORDINATOR").ok())
            .unwrap_or_else(|| DEFAULT_COORDINATOR.to_string())
    }

    fn token(&self) -> anyhow::Result<Option<String>> {
        if let Some(t) = &self.token {
            return Ok(Some(t.clone()));
        }
        if let Some(path) = &self.token_file {
            return startup::read_token_file(path)
                .map(Some)
                .map_err(|e| UserError(e.to_string()).into());
        }
        if let Some(t) = std::env::var("STRATA_TOKEN").ok().filter(|t| !t.is_empty()) {
            return Ok(Some(t));
        }
        Ok(startup::published_token(&self.url()))
    }

    /// The CA to trust an https coordinator by.
    fn ca(&self) -> anyhow::Result<Option<String>> {
        let path = self.ca.clone().or_else(|| {
            std::env::var_os("STRATA_CA")
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        });
        match path {
            Some(p) => std::fs::read_to_string(&p)
                .map(Some)
                .map_err(|e| UserError(format!("cannot read the CA {}: {e}", p.display())).into()),
            None => Ok(startup::published_ca(&self.url())),
        }
    }

    pub async fn client(&self) -> anyhow::Result<Client> {
        let url = self.url();
        let token = Bearer::new(self.token()?.as_deref())
            .ok_or_else(|| UserError("the token is not valid header text".into()))?;
        let channel = strata_proto::auth::endpoint(&url, self.ca()?.as_deref())
            .map_err(|e| UserError(e.to_string()))?
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await
            .with_context(|| {
                format!("cannot reach the coordinator at {url} (is `strata coordinator` running?)")
            })?;
        Ok(JobServiceClient::with_interceptor(channel, token))
    }
}

/// A failed call as the user should see it: their mistakes exit 2.
pub fn status_error(call: &str, s: tonic::Status) -> anyhow::Error {
    use tonic::Code::*;
    match s.code() {
        InvalidArgument | NotFound | FailedPrecondition | ResourceExhausted | Unauthenticated => {
            UserError(s.message().to_string()).into()
        }
        _ => anyhow::anyhow!("{call}: {} ({:?})", s.message(), s.code()),
    }
}

pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("tokio runtime")
}

// --------------------------------------------------------- coordinator ---

#[derive(Args)]
pub struct CoordinatorArgs {
    /// Where to listen. Every client needs the token; off loopback the
    /// coordinator serves TLS only.
    #[arg(long, default_value = "127.0.0.1:7070")]
    pub listen: SocketAddr,
    /// Serve HTTP here too: the dashboard at / and Prometheus metrics at
    /// /metrics. Off loopback (this address or --listen's) they need the
    /// client token, as gRPC does.
    #[arg(long)]
    pub http_listen: Option<SocketAddr>,
    /// Where the job store and the runs' files live.
    #[arg(long, default_value = "strata-state")]
    pub state_dir: PathBuf,
    /// Local worker slots for CPU jobs (processes; they may oversubscribe
    /// the cores). Default 8, or one per GPU on a GPU machine.
    #[arg(long)]
    pub slots: Option<u32>,
    /// This machine's GPUs, one worker slot each (GPUs 0..N): what
    /// `[device] backend = "cuda"` jobs lease, never two ranks on one GPU.
    /// Default: the GPUs the driver reports, when strata is built with
    /// the `cuda` feature; none otherwise.
    #[arg(long)]
    pub gpus: Option<u32>,
    /// The clients' bearer token. Off loopback without it, one is generated
    /// into STATE_DIR/token.
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// Seconds of silence after which a worker fails its attempt.
    #[arg(long, default_value_t = 60)]
    pub heartbeat_timeout_s: u64,
    /// Seconds the workers of a cancelled or failed attempt get between
    /// SIGTERM (they save a checkpoint and leave) and SIGKILL; under Slurm
    /// also how long before the time limit Slurm sends SIGTERM.
    #[arg(long, default_value_t = 30)]
    pub stop_grace_s: u64,
    /// Where workers run: `local` (processes on this machine), `slurm`
    /// (one allocation per attempt, from this machine as a submit host)
    /// or `sim` (a rank simulator plays them: `strata sim serve`).
    #[arg(long, value_enum, default_value_t = LauncherKind::Local)]
    pub launcher: LauncherKind,
    /// Heartbeats a second asked of all ranks together: past this many
    /// ranks each rank beats less often than once a second.
    #[arg(long, default_value_t = strata_coordinator::config::DEFAULT_HEARTBEATS_PER_S)]
    pub heartbeats_per_s: u32,
    /// The URL workers reach this coordinator at [default: the listening
    /// address; on 0.0.0.0 under Slurm, this machine's name].
    #[arg(long)]
    pub advertise_url: Option<String>,
    /// How workers publish their collective address, for workers on other
    /// machines (Slurm): an IP or `iface:NAME` [default: the address their
    /// node reaches the coordinator from].
    #[arg(long)]
    pub worker_advertise: Option<String>,
    /// TLS on gRPC and HTTP with this certificate chain (PEM, leaf
    /// first). Without it, a coordinator off loopback (or given --tls)
    /// makes its own CA in STATE_DIR/tls and a certificate from it.
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// The CA clients and workers trust [default: --tls-cert's last
    /// certificate].
    #[arg(long, requires = "tls_cert")]
    pub tls_ca: Option<PathBuf>,
    /// Serve TLS on loopback too.
    #[arg(long)]
    pub tls: bool,
    #[command(flatten)]
    pub slurm: SlurmArgs,
    #[command(flatten)]
    pub sim: SimArgs,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LauncherKind {
    Local,
    Slurm,
    Sim,
}

/// `--launcher slurm`'s settings; a recipe's `[slurm]` section overrides
/// partition, account, qos and time for its job.
#[derive(Args)]
pub struct SlurmArgs {
    /// The Slurm partition [default: the cluster's default partition].
    #[arg(long)]
    pub partition: Option<String>,
    #[arg(long)]
    pub account: Option<String>,
    #[arg(long)]
    pub qos: Option<String>,
    /// Each allocation's time limit (Slurm's formats: HH:MM:SS, D-HH:MM, …).
    #[arg(long)]
    pub time: Option<String>,
    /// GPUs per node, one rank each [default: what Slurm reports (Gres)].
    #[arg(long)]
    pub gpus_per_node: Option<u32>,
    /// CPUs each rank gets; a CPU node offers CPUs / this many slots.
    #[arg(long, default_value_t = 1)]
    pub cpus_per_task: u32,
}

/// `--launcher sim`'s settings: a rank simulator (`strata sim serve`)
/// plays the workers.
#[derive(Args)]
pub struct SimArgs {
    /// The simulator's control address.
    #[arg(long = "sim", value_name = "ADDR")]
    pub sim_addr: Option<SocketAddr>,
    /// The simulated inventory's nodes.
    #[arg(long, default_value_t = 2048)]
    pub sim_nodes: u32,
    /// GPUs per simulated node, one rank each.
    #[arg(long, default_value_t = 8)]
    pub sim_gpus_per_node: u32,
}

/// The options `strata coordinator`'s flags say.
fn options(args: &CoordinatorArgs) -> anyhow::Result<CoordinatorOptions> {
    let mut o = CoordinatorOptions::new(
        args.listen,
        args.state_dir.clone(),
        std::env::current_exe().context("the strata binary's path")?,
    );
    o.http_listen = args.http_listen;
    o.slots = args.slots;
    o.gpus = args.gpus;
    o.detected_gpus = if args.launcher == LauncherKind::Local && args.gpus.is_none() {
        detected_gpus()
    } else {
        0
    };
    o.token_file = args.token_file.clone();
    o.heartbeat_timeout = Duration::from_secs(args.heartbeat_timeout_s);
    o.stop_grace = Duration::from_secs(args.stop_grace_s);
    o.heartbeats_per_s = args.heartbeats_per_s;
    o.advertise_url = args.advertise_url.clone();
    o.tls_cert = args.tls_cert.clone();
    o.tls_key = args.tls_key.clone();
    o.tls_ca = args.tls_ca.clone();
    o.tls = args.tls;
    o.launcher = match args.launcher {
        LauncherKind::Local => LauncherChoice::Local,
        LauncherKind::Slurm => {
            let s = &args.slurm;
            LauncherChoice::Slurm(SlurmChoice {
                partition: s.partition.clone(),
                account: s.account.clone(),
                qos: s.qos.clone(),
                time: s.time.clone(),
                gpus_per_node: s.gpus_per_node,
                cpus_per_task: s.cpus_per_task,
                worker_advertise: args.worker_advertise.clone(),
            })
        }
        LauncherKind::Sim => LauncherChoice::Sim {
            addr: args.sim.sim_addr.ok_or_else(|| {
                UserError("--launcher sim needs --sim ADDR (a `strata sim serve`)".into())
            })?,
            nodes: args.sim.sim_nodes,
            gpus_per_node: args.sim.sim_gpus_per_node,
        },
    };
    Ok(o)
}

/// The GPUs the driver reports (0 without a driver), when built with
/// CUDA.
#[cfg(feature = "cuda")]
fn detected_gpus() -> u32 {
    match strata_worker::cuda::device_count() {
        Ok(n) => n as u32,
        Err(e) => {
            tracing::info!(reason = %e, "no GPUs: CPU slots only");
            0
        }
    }
}

#[cfg(not(feature = "cuda"))]
fn detected_gpus() -> u32 {
    0
}

pub fn coordinator(args: CoordinatorArgs) -> anyhow::Result<()> {
    let o = options(&args)?;
    runtime()?.block_on(async move {
        match startup::serve(o, shutdown_signal()).await {
            Ok(()) => Ok(()),
            Err(ServeError::Options(e)) => Err(UserError(e.to_string()).into()),
            Err(e) => Err(e.into()),
        }
    })
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}

// -------------------------------------------------------------- worker ---

#[derive(Args)]
pub struct WorkerArgs {
    #[arg(long)]
    pub coordinator: String,
    #[arg(long)]
    pub job: String,
    /// The worker's world rank (launchers set STRATA_RANK: one command
    /// starts every rank of a Slurm allocation).
    #[arg(long, env = "STRATA_RANK")]
    pub rank: u32,
    /// The job's attempt this worker belongs to (the coordinator refuses
    /// calls of any other).
    #[arg(long, default_value_t = 1)]
    pub attempt: u32,
    /// The address the collective listener binds (port 0: any free one).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub collective_bind: SocketAddr,
    /// The address other ranks reach this one's collective listener at,
    /// when it binds all interfaces (0.0.0.0): an IP, or `iface:NAME` for
    /// that network interface's IPv4 address. Default: the address this
    /// machine reaches the coordinator from.
    #[arg(long)]
    pub advertise: Option<String>,
}

pub fn worker(args: WorkerArgs) -> anyhow::Result<()> {
    // A worker holds a connection per collective peer.
    strata_coordinator::cluster::limits::ensure_open_files(1024, "the collective's peers");
    let token = std::env::var("STRATA_JOB_TOKEN").map_err(|_| {
        UserError("STRATA_JOB_TOKEN is not set (workers are started by the coordinator)".into())
    })?;
    let rank = args.rank;
    // Every span of this process sits under this one, in the trace of
    // the launch that started it.
    let span = tracing::info_span!("worker", job = %args.job, rank, attempt = args.attempt);
    crate::telemetry::join_parent_trace(&span);
    let _in = span.enter();
    match strata_worker::run::run(strata_worker::run::WorkerArgs {
        coordinator: args.coordinator,
        job: args.job,
        rank,
        attempt: args.attempt,
        token,
        coordinator_ca: std::env::var(strata_coordinator::cluster::COORDINATOR_CA_ENV)
            .ok()
            .filter(|c| !c.is_empty()),
        collective_bind: args.collective_bind,
        advertise: args.advertise,
    }) {
        Ok(()) => Ok(()),
        // Stopped on request (SIGTERM, or the coordinator's), its last
        // step saved: the conventional status of a SIGTERM'd process, which
        // launchers read as "stopped", not "failed".
        Err(e @ strata_worker::run::WorkerError::Stopped(_)) => {
            tracing::warn!(rank, "{e}");
            Err(crate::ExitWith(strata_coordinator::cluster::STOPPED_STATUS as u8).into())
        }
        Err(e) => Err(anyhow::anyhow!("rank {rank}: {e}")),
    }
}

// ------------------------------------------------------------- clients ---

#[derive(Args)]
pub struct SubmitArgs {
    /// The job recipe (TOML).
    pub recipe: PathBuf,
    #[command(flatten)]
    pub sets: crate::Sets,
    /// Follow the job: a progress bar with step, loss, tokens/s and ETA.
    #[arg(long)]
    pub watch: bool,
    #[command(flatten)]
    pub connect: Connect,
}

pub fn submit(args: SubmitArgs) -> anyhow::Result<()> {
    // Check locally first: the same validation, with the file's name.
    let (_, text) = crate::load_recipe(&args.recipe, &args.sets)?;
    let stem = args
        .recipe
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    runtime()?.block_on(async move {
        let mut client = args.connect.client().await?;
        let id = submit_text(&mut client, text, stem).await?;
        println!("{id}");
        if args.watch {
            let job = watch(&mut client, &id, true).await?;
            finish_line(&job)?;
        }
        Ok(())
    })
}

pub async fn submit_text(
    client: &mut Client,
    spec_toml: String,
    default_name: String,
) -> anyhow::Result<String> {
    Ok(client
        .submit_job(pb::SubmitJobRequest {
            spec_toml,
            default_name,
            ..Default::default()
        })
        .await
        .map_err(|s| status_error("SubmitJob", s))?
        .into_inner()
        .job_id)
}

/// Follows a job to its end; returns it as it ended.
pub async fn watch(client: &mut Client, id: &str, bar: bool) -> anyhow::Result<pb::Job> {
    let mut stream = client
        .watch_job(pb::WatchJobRequest {
            job_id: id.to_string(),
            from_step: 0,
        })
        .await
        .map_err(|s| status_error("WatchJob", s))?
        .into_inner();
    let pb_bar = if bar {
        let b = ProgressBar::new(0);
        b.set_style(
            ProgressStyle::with_template(
                "{spinner} {prefix} [{bar:30}] step {pos}/{len} {msg} ETA {eta}",
            )
            .expect("template")
            .progress_chars("=> "),
        );
        b.set_prefix(id.to_string());
        b
    } else {
        ProgressBar::hidden()
    };
    let mut last = None;
    while let Some(ev) = stream.next().await {
        let ev = ev.map_err(|s| status_error("WatchJob", s))?;
        match ev.event {
            Some(pb::job_event::Event::Job(j)) => {
                pb_bar.set_length(j.steps_total);
                pb_bar.set_message(state_name(j.state).to_string());
                let end = is_final(j.state);
                last = Some(j);
                if end {
                    break;
                }
            }
            Some(pb::job_event::Event::Step(s)) => {
                pb_bar.set_position(s.step);
                pb_bar.set_message(format!("loss {:.3}  {:.0} tok/s", s.loss, s.tokens_per_s));
            }
            None => {}
        }
    }
    pb_bar.finish_and_clear();
    last.ok_or_else(|| anyhow::anyhow!("the coordinator closed the watch of {id}"))
}

fn finish_line(job: &pb::Job) -> anyhow::Result<()> {
    match job.state() {
        pb::JobState::Succeeded => {
            eprintln!(
                "{} succeeded: {} steps, {} tokens, last loss {}",
                job.job_id,
                job.steps_done,
                job.tokens_done,
                job.last_loss.map_or("-".into(), |l| format!("{l:.4}"))
            );
            Ok(())
        }
        s => anyhow::bail!(
            "{} {}: {}",
            job.job_id,
            state_name(s as i32),
            job.failure_reason
        ),
    }
}

/// A wire job state as the coordinator names it.
pub fn state_name(s: i32) -> &'static str {
    job_state(s).map_or("unknown", JobState::name)
}

fn job_state(s: i32) -> Option<JobState> {
    pb::JobState::try_from(s).ok().and_then(state_from_pb)
}

pub fn is_final(s: i32) -> bool {
    job_state(s).is_some_and(JobState::is_final)
}

pub fn job_json(j: &pb::Job) -> serde_json::Value {
    let l = j.layout.unwrap_or_default();
    json!({
        "job_id": j.job_id,
        "name": j.name,
        "state": state_name(j.state),
        "steps_done": j.steps_done,
        "steps_total": j.steps_total,
        "tokens_done": j.tokens_done,
        "last_loss": j.last_loss,
        "failure_reason": j.failure_reason,
        "layout": {"tp": l.tp, "pp": l.pp, "dp": l.dp, "microbatches": l.microbatches, "world_size": l.world_size},
        "submitted_unix_ms": j.submitted_unix_ms,
        "started_unix_ms": j.started_unix_ms,
        "finished_unix_ms": j.finished_unix_ms,
        "run_dir": j.run_dir,
        "last_checkpoint_step": j.last_checkpoint_step,
        "checkpoint_errors": j.checkpoint_errors,
        "parent": (!j.parent_job.is_empty()).then(|| json!({"job": j.parent_job, "step": j.parent_step})),
        "waiting": (!j.waiting.is_empty()).then(|| j.waiting.clone()),
        "first_started_unix_ms": j.first_started_unix_ms,
        "earlier_attempts": j.earlier_attempts.as_ref().map(|e| json!({
            "attempts": e.attempts,
            "failed": e.failed,
            "interrupted": e.interrupted,
            "steps_lost": e.steps_lost,
        })),
        "blamed_nodes": j.blamed_nodes.iter().map(|b| json!({
            "node": b.node,
            "attempt": b.attempt,
            "reason": b.reason,
        })).collect::<Vec<_>>(),
        "attempts": j.attempts.iter().map(|a| json!({
            "number": a.number,
            "started_unix_ms": a.started_unix_ms,
            "ended_unix_ms": a.ended_unix_ms,
            "from_step": a.from_step,
            "end_state": if a.end_state == 0 { None } else { Some(state_name(a.end_state)) },
            "cause": a.cause,
            "steps_lost": a.steps_lost,
            "last_step": a.last_step,
        })).collect::<Vec<_>>(),
    })
}

#[derive(Args)]
pub struct JobArgs {
    pub job: String,
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub connect: Connect,
}

pub fn status(args: JobArgs) -> anyhow::Result<()> {
    runtime()?.block_on(async move {
        let mut c = args.connect.client().await?;
        let j = c
            .get_job(pb::GetJobRequest { job_id: args.job })
            .await
            .map_err(|s| status_error("GetJob", s))?
            .into_inner();
        if args.json {
            println!("{}", serde_json::to_string_pretty(&job_json(&j))?);
        } else {
            let l = j.layout.unwrap_or_default();
            println!(
                "{}  {}  step {}/{}  {} tokens  loss {}",
                j.job_id,
                state_name(j.state),
                j.steps_done,
                j.steps_total,
                j.tokens_done,
                j.last_loss.map_or("-".into(), |l| format!("{l:.4}"))
            );
            println!(
                "layout tp={} pp={} dp={} ({} workers)  run dir {}",
                l.tp, l.pp, l.dp, l.world_size, j.run_dir
            );
            if !j.failure_reason.is_empty() {
                println!("reason: {}", j.failure_reason);
            }
            if !j.parent_job.is_empty() {
                println!("branch of {} at step {}", j.parent_job, j.parent_step);
            }
            if !j.waiting.is_empty() {
                println!("waiting: {}", j.waiting);
            }
            match j.last_checkpoint_step {
                Some(step) => println!("last checkpoint: step {step}"),
                None => println!("last checkpoint: none"),
            }
            for e in &j.checkpoint_errors {
                println!("checkpoint not completed: {e}");
            }
            if let Some(e) = &j.earlier_attempts {
                println!(
                    "{} earlier attempts: {} failed, {} interrupted, {} steps lost",
                    e.attempts, e.failed, e.interrupted, e.steps_lost
                );
            }
            for b in &j.blamed_nodes {
                println!(
                    "node {} kept out of its placements (attempt {}: {})",
                    b.node, b.attempt, b.reason
                );
            }
            for a in &j.attempts {
                let from = if a.from_step == 0 {
                    "from scratch".to_string()
                } else {
                    format!("from step {}", a.from_step)
                };
                let end = if a.end_state == 0 {
                    "running".to_string()
                } else {
                    format!(
                        "{} at step {}, {} steps lost",
                        state_name(a.end_state),
                        a.last_step,
                        a.steps_lost
                    )
                };
                let cause = a.cause.lines().next().unwrap_or("");
                println!(
                    "attempt {}: {from}, {end}{}",
                    a.number,
                    if cause.is_empty() {
                        String::new()
                    } else {
                        format!(": {cause}")
                    }
                );
            }
        }
        Ok(())
    })
}

#[derive(Args)]
pub struct ResumeArgs {
    pub job: String,
    /// The checkpoint's step (default: the latest complete one; an older
    /// one is passed over when a file of the latest is corrupt).
    #[arg(long)]
    pub from_step: Option<u64>,
    /// Continue on another layout: the checkpoint is resharded.
    #[arg(long)]
    pub tp: Option<u32>,
    #[arg(long)]
    pub pp: Option<u32>,
    #[arg(long)]
    pub dp: Option<u32>,
    /// Delete the checkpoints after --from-step, which the resumed run
    /// would otherwise write over.
    #[arg(long)]
    pub discard_newer: bool,
    /// A mixture's weights from the checkpoint on, every source by name:
    /// `web=0.5,code=0.3,math=0.2`.
    #[arg(long, value_parser = parse_weights)]
    pub weights: Option<Vec<(String, f64)>>,
    #[command(flatten)]
    pub connect: Connect,
}

/// `name=weight,…` as `--weights` takes it.
fn parse_weights(s: &str) -> Result<Vec<(String, f64)>, String> {
    s.split(',')
        .map(|kv| {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| format!("{kv:?}: give source=weight"))?;
            let w: f64 = v
                .trim()
                .parse()
                .map_err(|e| format!("{kv:?}: the weight {v:?} is not a number ({e})"))?;
            Ok((k.trim().to_string(), w))
        })
        .collect()
}

pub fn resume(args: ResumeArgs) -> anyhow::Result<()> {
    runtime()?.block_on(async move {
        let mut c = args.connect.client().await?;
        let j = c
            .resume_job(pb::ResumeJobRequest {
                job_id: args.job,
                from_step: args.from_step.unwrap_or(0),
                tp: args.tp.unwrap_or(0),
                pp: args.pp.unwrap_or(0),
                dp: args.dp.unwrap_or(0),
                discard_newer: args.discard_newer,
                weights: args.weights.unwrap_or_default().into_iter().collect(),
            })
            .await
            .map_err(|s| status_error("ResumeJob", s))?
            .into_inner();
        let l = j.layout.unwrap_or_default();
        println!(
            "{} {} from step {} (attempt {}, tp={} pp={} dp={})",
            j.job_id,
            state_name(j.state),
            j.steps_done,
            j.attempts
                .last()
                .map_or(1, |a| a.number + u32::from(a.end_state != 0)),
            l.tp,
            l.pp,
            l.dp
        );
        Ok(())
    })
}

#[derive(Args)]
pub struct NodesArgs {
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub connect: Connect,
}

pub fn nodes(args: NodesArgs) -> anyhow::Result<()> {
    runtime()?.block_on(async move {
        let mut c = args.connect.client().await?;
        let r = c
            .list_nodes(pb::ListNodesRequest {})
            .await
            .map_err(|s| status_error("ListNodes", s))?
            .into_inner();
        if args.json {
            let nodes: Vec<_> = r
                .nodes
                .iter()
                .map(|n| {
                    json!({
                        "name": n.name,
                        "cpus": n.cpus,
                        "gpus": n.gpus,
                        "slots": n.slots,
                        "leased": n.leased,
                        "state": n.state,
                        "excluded": n.excluded,
                    })
                })
                .collect();
            let v = json!({ "launcher": r.launcher, "nodes": nodes });
            println!("{}", serde_json::to_string_pretty(&v)?);
        } else {
            println!("{}", r.launcher);
            println!(
                "{:<16} {:>5} {:>5} {:>6} {:>7}  STATE",
                "NODE", "CPUS", "GPUS", "SLOTS", "LEASED"
            );
            for n in &r.nodes {
                println!(
                    "{:<16} {:>5} {:>5} {:>6} {:>7}  {}",
                    n.name, n.cpus, n.gpus, n.slots, n.leased, n.state
                );
                for why in &n.excluded {
                    println!("{:<16} excluded by {why}", "");
                }
            }
        }
        Ok(())
    })
}

#[derive(Args)]
pub struct CheckpointsArgs {
    pub job: String,
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub connect: Connect,
}

pub fn checkpoints(args: CheckpointsArgs) -> anyhow::Result<()> {
    runtime()?.block_on(async move {
        let mut c = args.connect.client().await?;
        let list = c
            .list_checkpoints(pb::ListCheckpointsRequest { job_id: args.job })
            .await
            .map_err(|s| status_error("ListCheckpoints", s))?
            .into_inner()
            .checkpoints;
        if args.json {
            let v: Vec<_> = list
                .iter()
                .map(|k| {
                    json!({
                        "step": k.step,
                        "tokens": k.tokens,
                        "bytes": k.bytes,
                        "attempt": k.attempt,
                        "written_unix_ms": k.written_unix_ms,
                        "stall_s": k.stall_s,
                        "write_s": k.write_s,
                        "url": k.url,
                    })
                })
                .collect();
            println!("{}", serde_json::to_string_pretty(&v)?);
        } else {
            println!(
                "{:>8} {:>14} {:>12} {:>8} {:>9} {:>9}  URL",
                "STEP", "TOKENS", "BYTES", "ATTEMPT", "STALL_S", "WRITE_S"
            );
            for k in &list {
                println!(
                    "{:>8} {:>14} {:>12} {:>8} {:>9.3} {:>9.3}  {}",
                    k.step, k.tokens, k.bytes, k.attempt, k.stall_s, k.write_s, k.url
                );
            }
        }
        Ok(())
    })
}

#[derive(Args)]
pub struct ListArgs {
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub connect: Connect,
}

pub fn list(args: ListArgs) -> anyhow::Result<()> {
    runtime()?.block_on(async move {
        let mut c = args.connect.client().await?;
        let jobs = c
            .list_jobs(pb::ListJobsRequest { states: vec![] })
            .await
            .map_err(|s| status_error("ListJobs", s))?
            .into_inner()
            .jobs;
        if args.json {
            let v: Vec<_> = jobs.iter().map(job_json).collect();
            println!("{}", serde_json::to_string_pretty(&v)?);
        } else {
            println!(
                "{:<34} {:<10} {:>12} {:>10}",
                "JOB", "STATE", "STEP", "LOSS"
            );
            // Branches under their parents, as a tree.
            for (j, depth) in tree(&jobs) {
                let name = if depth == 0 {
                    j.job_id.clone()
                } else {
                    format!(
                        "{}└ {} (from {})",
                        "  ".repeat(depth - 1),
                        j.job_id,
                        j.parent_step
                    )
                };
                println!(
                    "{:<34} {:<10} {:>12} {:>10}",
                    name,
                    state_name(j.state),
                    format!("{}/{}", j.steps_done, j.steps_total),
                    j.last_loss.map_or("-".into(), |l| format!("{l:.4}"))
                );
            }
        }
        Ok(())
    })
}

/// `jobs` in submission order with each branch right under its parent
/// (depth-first), and each job's depth; a branch whose parent is not in
/// the list stands at the top.
pub fn tree(jobs: &[pb::Job]) -> Vec<(&pb::Job, usize)> {
    fn visit<'a>(
        jobs: &'a [pb::Job],
        j: &'a pb::Job,
        depth: usize,
        out: &mut Vec<(&'a pb::Job, usize)>,
    ) {
        out.push((j, depth));
        for c in jobs.iter().filter(|c| c.parent_job == j.job_id) {
            visit(jobs, c, depth + 1, out);
        }
    }
    let mut out = Vec::with_capacity(jobs.len());
    for j in jobs {
        if j.parent_job.is_empty() || !jobs.iter().any(|p| p.job_id == j.parent_job) {
            visit(jobs, j, 0, &mut out);
        }
    }
    out
}

#[derive(Args)]
pub struct BranchArgs {
    /// The parent: a job with a WSD or Power schedule.
    pub job: String,
    /// The parent's checkpoint to branch from (in its stable phase).
    #[arg(long)]
    pub from_step: u64,
    /// The decay's length in tokens (e.g. 4e9, "500M"); the branch ends
    /// there.
    #[arg(long, value_parser = parse_tokens)]
    pub decay_tokens: u64,
    /// linear, cosine, one_minus_sqrt, ... [default: the parent's].
    #[arg(long)]
    pub decay_shape: Option<String>,
    /// The LR at the decay's end, as a fraction of its start [default: the
    /// parent's].
    #[arg(long)]
    pub final_lr_fraction: Option<f64>,
    /// The branch's name [default: PARENT-cooldown-TOKENS].
    #[arg(long)]
    pub name: Option<String>,
    /// A mixture's weights for the branch, every source by name:
    /// `web=0.3,code=0.3,math=0.4` [default: the parent's].
    #[arg(long, value_parser = parse_weights)]
    pub weights: Option<Vec<(String, f64)>>,
    #[command(flatten)]
    pub connect: Connect,
}

fn parse_tokens(s: &str) -> Result<u64, String> {
    match strata_recipe::quantity::parse_with_suffix(s) {
        Some(x) if x.is_finite() && x >= 1.0 && x.fract() == 0.0 => Ok(x as u64),
        _ => Err(format!(
            "`{s}` is not a positive whole token count (e.g. 4e9, 500M)"
        )),
    }
}

pub fn branch(args: BranchArgs) -> anyhow::Result<()> {
    runtime()?.block_on(async move {
        let mut c = args.connect.client().await?;
        let j = c
            .branch_job(pb::BranchJobRequest {
                parent_id: args.job,
                from_step: args.from_step,
                decay_tokens: args.decay_tokens,
                decay_shape: args.decay_shape.unwrap_or_default(),
                final_lr_fraction: args.final_lr_fraction,
                name: args.name.unwrap_or_default(),
                weights: args.weights.unwrap_or_default().into_iter().collect(),
            })
            .await
            .map_err(|s| status_error("BranchJob", s))?
            .into_inner();
        println!("{}", j.job_id);
        Ok(())
    })
}

#[derive(Args)]
pub struct CancelArgs {
    pub job: String,
    #[arg(long, default_value = "")]
    pub reason: String,
    #[command(flatten)]
    pub connect: Connect,
}

pub fn cancel(args: CancelArgs) -> anyhow::Result<()> {
    runtime()?.block_on(async move {
        let mut c = args.connect.client().await?;
        let j = c
            .cancel_job(pb::CancelJobRequest {
                job_id: args.job,
                reason: args.reason,
            })
            .await
            .map_err(|s| status_error("CancelJob", s))?
            .into_inner();
        println!("{} {}", j.job_id, state_name(j.state));
        Ok(())
    })
}

#[derive(Args)]
pub struct MetricsArgs {
    pub job: String,
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub connect: Connect,
}

pub fn step_json(s: &pb::StepMetrics) -> serde_json::Value {
    let t = s.times.unwrap_or_default();
    json!({
        "step": s.step,
        "tokens": s.tokens,
        "loss": s.loss,
        "lr": s.lr,
        "tokens_per_s": s.tokens_per_s,
        "grad_norm": s.grad_norm,
        "seq_len": 1u64 << s.seq_log2,
        "times": {
            "data_s": t.data_s,
            "forward_s": t.forward_s,
            "backward_s": t.backward_s,
            "all_reduce_s": t.all_reduce_s,
            "optimizer_s": t.optimizer_s,
        },
        "bubble_theory": s.bubble_theory,
        "eval_loss": s.eval_loss,
        "peak_flops": s.peak_flops,
        "stages": s.stages.iter().map(|st| json!({
            "stage": st.stage,
            "forward_s": st.forward_s,
            "backward_s": st.backward_s,
            "wait_s": st.wait_s,
            "pipeline_s": st.pipeline_s,
            "bubble": st.bubble,
            "tp_comm_s": st.tp_comm_s,
        })).collect::<Vec<_>>(),
        "sources": s.sources.iter().map(|x| json!({
            "name": x.name,
            "tokens": x.tokens,
            "loss": x.loss,
            "eval_loss": x.eval_loss,
        })).collect::<Vec<_>>(),
        "weights": s.weights.map(|w| json!({
            "std": w.std,
            "min": w.min,
            "max": w.max,
            "effective": w.effective,
        })),
    })
}

/// Every recorded step of `job`, following the coordinator's pages.
pub async fn fetch_metrics(c: &mut Client, job: &str) -> anyhow::Result<Vec<pb::StepMetrics>> {
    let mut out = Vec::new();
    let mut from_step = 0;
    loop {
        let page = c
            .get_metrics(pb::GetMetricsRequest {
                job_id: job.to_string(),
                from_step,
                limit: 0,
            })
            .await
            .map_err(|s| status_error("GetMetrics", s))?
            .into_inner();
        out.extend(page.steps);
        if page.next_from_step == 0 {
            return Ok(out);
        }
        from_step = page.next_from_step;
    }
}

pub fn metrics(args: MetricsArgs) -> anyhow::Result<()> {
    runtime()?.block_on(async move {
        let mut c = args.connect.client().await?;
        let steps = fetch_metrics(&mut c, &args.job).await?;
        if args.json {
            let v: Vec<_> = steps.iter().map(step_json).collect();
            println!("{}", serde_json::to_string_pretty(&v)?);
        } else {
            // A mixture's sources get a loss column each.
            let names: Vec<String> = steps
                .iter()
                .find(|s| !s.sources.is_empty())
                .map(|s| s.sources.iter().map(|x| x.name.clone()).collect())
                .unwrap_or_default();
            let mut head: String = names
                .iter()
                .map(|n| format!(" {:>10}", format!("{}", n.chars().take(10).collect::<String>())))
                .collect();
            // Under reweighting: the multipliers' spread and effective size.
            let reweighted = steps.iter().any(|s| s.weights.is_some());
            if reweighted {
                head.push_str(&format!(" {:>7} {:>6}", "W-STD", "W-ESS"));
            }
            println!(
                "{:>6} {:>12} {:>8} {:>9} {:>10} {:>10} {:>6} {:>8} {:>8}{head}",
                "STEP", "TOKENS", "LOSS", "EVAL", "LR", "TOK/S", "SEQ", "BUBBLE", "TP-COMM"
            );
            for s in &steps {
                let mut per_source: String = names
                    .iter()
                    .map(|n| {
                        let l = s.sources.iter().find(|x| &x.name == n).and_then(|x| x.loss);
                        format!(" {:>10}", l.map_or("-".to_string(), |l| format!("{l:.4}")))
                    })
                    .collect();
                if reweighted {
                    per_source.push_str(&match s.weights {
                        Some(w) => format!(" {:>7.4} {:>5.1}%", w.std, 100.0 * w.effective),
                        None => format!(" {:>7} {:>6}", "-", "-"),
                    });
                }
                // The worst stage's bubble, and the largest tp collective
                // time (seconds), beside the theory in the header line.
                let bubble = s.stages.iter().map(|st| st.bubble).fold(0.0, f64::max);
                let tp = s.stages.iter().map(|st| st.tp_comm_s).fold(0.0, f64::max);
                let eval = s.eval_loss.map_or(String::new(), |l| format!("{l:.4}"));
                println!(
                    "{:>6} {:>12} {:>8.4} {:>9} {:>10.3e} {:>10.0} {:>6} {:>7.1}% {:>7.3}s{per_source}",
                    s.step,
                    s.tokens,
                    s.loss,
                    eval,
                    s.lr,
                    s.tokens_per_s,
                    1u64 << s.seq_log2,
                    100.0 * bubble,
                    tp
                );
            }
            if let Some(s) = steps.last()
                && s.stages.len() > 1
            {
                println!("1F1B bubble in theory: {:.1}%", 100.0 * s.bubble_theory);
            }
        }
        Ok(())
    })
}

/// For the demo: the path shown to users, absolute when possible.
pub fn shown(p: &Path) -> String {
    std::fs::canonicalize(p)
        .unwrap_or_else(|_| p.to_path_buf())
        .display()
        .to_string()
}
