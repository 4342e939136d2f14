//! `strata bench coordinator`: the coordinator at the scale users run,
//! measured with the rank simulator. The simulator runs in this process;
//! the coordinator is a `strata coordinator` process of its own (the
//! local or the Slurm launcher through stand-ins), so its CPU and memory
//! are its own. For each size: the time from the last `Register` to every
//! rank holding its assignment, heartbeat round trips, the engine lock's
//! holds, the coordinator's CPU and memory, store bytes per step,
//! `/metrics` and the job page scraped every second, and from injected
//! faults to their detection and to the next attempt fully assigned.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use serde::Serialize;
use strata_coordinator::cluster::sim::{SimFault, SimRequest, SimResponse};
use strata_proto::auth::{Bearer, WithBearer};
use strata_proto::v1 as pb;
use strata_proto::v1::job_service_client::JobServiceClient;
use strata_sim::stats::{AttemptStats, StatsReport};
use strata_sim::{SimConfig, Simulator, fixture};
use tonic::transport::Channel;

/// A job client carrying the coordinator's token.
type Cl = JobServiceClient<WithBearer<Channel>>;

use crate::format::table;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BenchLauncher {
    /// The simulator's own launcher.
    Sim,
    /// The real Slurm launcher, through Slurm stand-ins.
    Slurm,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BenchFault {
    /// A rank killed (signal 9).
    Exit,
    /// A whole node lost at once.
    Node,
    /// A rank gone silent (no heartbeat).
    Silent,
    /// A rank's step hung, its heartbeats going on.
    Hang,
}

#[derive(Args)]
pub struct CoordinatorBenchArgs {
    /// Ranks per job, one run per size.
    #[arg(long, value_delimiter = ',', default_values_t = [1024u32, 4096, 16384])]
    pub ranks: Vec<u32>,
    /// Jobs at once, each of that many ranks.
    #[arg(long, default_value_t = 1)]
    pub jobs: u32,
    /// One JSON object per run instead of a table.
    #[arg(long)]
    pub json: bool,
    #[arg(long, value_enum, default_value_t = BenchLauncher::Sim)]
    pub launcher: BenchLauncher,
    /// Milliseconds per simulated step.
    #[arg(long, default_value_t = 1000)]
    pub step_ms: u64,
    /// Seconds of steady state measured.
    #[arg(long, default_value_t = 30)]
    pub steady_s: u64,
    /// How often `/metrics` and the job page are scraped.
    #[arg(long, default_value_t = 1.0)]
    pub scrape_every_s: f64,
    /// The coordinator's --heartbeat-timeout-s (a silent rank's
    /// detection; the heartbeat period is at most a sixth of it).
    #[arg(long, default_value_t = 60)]
    pub heartbeat_timeout_s: u64,
    /// Steps between checkpoints (every rank reports each one).
    #[arg(long, default_value_t = 100)]
    pub checkpoint_every: u64,
    /// The recipe's [fault] hang_timeout_s (a hung step's detection cap).
    #[arg(long, default_value_t = 20)]
    pub hang_timeout_s: u64,
    /// Faults injected into the first job, one after another.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [BenchFault::Exit])]
    pub faults: Vec<BenchFault>,
    /// With more than one job: a job submitted after the steady window
    /// whose launcher command hangs this long, while the other jobs'
    /// heartbeats are measured (0: skip).
    #[arg(long, default_value_t = 0.0)]
    pub hang_launcher_s: f64,
    /// Where the runs' files go [default: a temporary folder].
    #[arg(long)]
    pub dir: Option<PathBuf>,
}

/// One run's measurements.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Run {
    pub ranks: u32,
    pub jobs: u32,
    pub layout: String,
    pub launcher: String,
    pub step_s: f64,
    /// From the last rank's `Register` to every rank holding its
    /// assignment (the slowest job).
    pub assigned_after_last_register_s: f64,
    /// From the coordinator's launch to every rank registered.
    pub all_registered_s: f64,
    pub heartbeat_period_s: f64,
    pub heartbeats_per_s: f64,
    pub heartbeat_p50_ms: f64,
    pub heartbeat_p99_ms: f64,
    pub heartbeat_max_ms: f64,
    /// The heartbeat's p99 at the coordinator's service (its own time,
    /// without the network and the simulator's scheduling; the upper edge
    /// of a histogram bucket, buckets 2× apart).
    pub heartbeat_server_p99_ms: f64,
    /// The worst job's heartbeat p99 (with several jobs).
    pub worst_job_heartbeat_p99_ms: f64,
    /// The engine lock's holds in the steady window (p99 as the upper
    /// edge of its histogram bucket, buckets 1.5× apart).
    pub lock_hold_p99_ms: f64,
    pub lock_hold_max_ms: f64,
    pub coordinator_cpu_cores: f64,
    pub coordinator_rss_mib: f64,
    pub coordinator_peak_rss_mib: f64,
    pub store_bytes_per_step: f64,
    pub metrics_scrape_ms: f64,
    pub metrics_bytes: usize,
    pub job_api_ms: f64,
    pub job_api_bytes: usize,
    pub rpc_errors: u64,
    /// Each injected fault: its kind, detection and the next attempt's
    /// rendezvous, from the fault.
    pub faults: Vec<FaultRun>,
    /// The first fault's, for the table.
    pub fault_detected_s: Option<f64>,
    pub fault_reassigned_s: Option<f64>,
    /// With a launcher command hung: the other jobs' heartbeats meanwhile.
    pub hung_launcher: Option<HungLauncher>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct FaultRun {
    pub kind: String,
    pub detected_s: f64,
    /// From the fault to the next attempt's launch reaching the
    /// simulator, and to its last rank's `Register`.
    pub next_launched_s: f64,
    pub next_registered_s: f64,
    pub reassigned_s: f64,
    /// From the detection to every rank of the next attempt assigned.
    pub reassigned_after_detection_s: f64,
    /// CPU seconds the coordinator spent from the fault to the next
    /// attempt assigned (the rest of that time is the simulator's own
    /// work, 16,384 connections made on the same cores).
    pub coordinator_cpu_s: f64,
    pub cause: String,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct HungLauncher {
    pub hung_s: f64,
    /// The other jobs' heartbeats while the command hung, all together,
    /// and the worst job's p99 (compare with the steady window's).
    pub heartbeat_p50_ms: f64,
    pub heartbeat_p99_ms: f64,
    pub heartbeat_max_ms: f64,
    pub worst_job_heartbeat_p99_ms: f64,
    /// The longest hold of the engine's lock meanwhile (the upper edge of
    /// its histogram bucket).
    pub lock_hold_max_ms: f64,
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A process's CPU seconds so far, resident and peak resident KiB.
fn proc_usage(pid: u32) -> anyhow::Result<(f64, u64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after = stat.rsplit_once(')').map_or("", |s| s.1);
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>()? + f[12].parse::<u64>()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // Linux's USER_HZ is 100 on every architecture strata runs on.
    Ok((ticks as f64 / 100.0, kib("VmRSS:"), kib("VmHWM:")))
}

/// Histogram `name`'s cumulative bucket counts in a scrape, for the
/// series whose labels include `with` (e.g. `method="Heartbeat"`).
fn buckets(metrics: &str, name: &str, with: &str) -> Vec<(f64, f64)> {
    let prefix = format!("{name}_bucket{{");
    metrics
        .lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(&prefix)?;
            let (labels, value) = rest.split_once('}')?;
            if !labels.contains(with) {
                return None;
            }
            let le = labels.split(',').find_map(|kv| kv.strip_prefix("le=\""))?;
            let le = le.trim_end_matches('"');
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, value.trim().parse().ok()?))
        })
        .collect()
}

fn lock_buckets(metrics: &str) -> Vec<(f64, f64)> {
    buckets(metrics, "strata_engine_lock_hold_seconds", "")
}

fn heartbeat_buckets(metrics: &str) -> Vec<(f64, f64)> {
    buckets(metrics, "strata_rpc_seconds", "method=\"Heartbeat\"")
}

/// The gauge `name` (no labels) in a scrape.
fn gauge(metrics: &str, name: &str) -> Option<f64> {
    metrics.lines().find_map(|l| {
        let rest = l.strip_prefix(name)?.strip_prefix(' ')?;
        rest.trim().parse().ok()
    })
}

/// The `q` quantile's bucket edge (seconds) of the holds between two
/// scrapes.
fn hold_quantile(before: &[(f64, f64)], after: &[(f64, f64)], q: f64) -> f64 {
    let delta: Vec<(f64, f64)> = after
        .iter()
        .map(|(le, n)| {
            let was = before
                .iter()
                .find(|(l, _)| l == le)
                .map_or(0.0, |(_, n)| *n);
            (*le, n - was)
        })
        .collect();
    let total = delta.last().map_or(0.0, |d| d.1);
    if total <= 0.0 {
        return 0.0;
    }
    delta
        .iter()
        .find(|(_, n)| *n >= q * total)
        .map_or(f64::NAN, |(le, _)| *le)
}

struct CoordinatorProcess {
    child: Child,
    grpc: SocketAddr,
    http: SocketAddr,
    state: PathBuf,
    /// The client token it was given.
    token: String,
    web: reqwest::Client,
}

impl CoordinatorProcess {
    /// GET `path` from its HTTP side, with its token: status, body, and
    /// how long it took.
    async fn get(&self, path: &str) -> anyhow::Result<(u16, String, Duration)> {
        let start = Instant::now();
        let response = self
            .web
            .get(format!("http://{}{path}", self.http))
            .bearer_auth(&self.token)
            .timeout(Duration::from_secs(60))
            .send()
            .await?;
        let code = response.status().as_u16();
        let body = response.text().await?;
        Ok((code, body, start.elapsed()))
    }

    async fn client(&self) -> Option<Cl> {
        let channel = Channel::from_shared(format!("http://{}", self.grpc))
            .ok()?
            .connect()
            .await
            .ok()?;
        Some(JobServiceClient::with_interceptor(
            channel,
            Bearer::new(Some(&self.token))?,
        ))
    }
}

impl Drop for CoordinatorProcess {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn until<T>(
    what: &str,
    limit: Duration,
    mut f: impl AsyncFnMut() -> anyhow::Result<Option<T>>,
) -> anyhow::Result<T> {
    let start = Instant::now();
    loop {
        if let Some(v) = f().await? {
            return Ok(v);
        }
        if start.elapsed() > limit {
            bail!("{what}: not within {} s", limit.as_secs());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The highest heartbeat p99 of any one job.
fn worst_job_p99(r: &StatsReport) -> f64 {
    r.heartbeat_by_job
        .values()
        .map(|l| l.p99_ms)
        .fold(0.0, f64::max)
}

fn sim_stats(sim: &Simulator, reset: bool) -> StatsReport {
    sim.stats(reset)
}

fn attempt_of(r: &StatsReport, job: &str, attempt: u32) -> Option<AttemptStats> {
    r.attempts
        .iter()
        .find(|a| a.job == job && a.attempt == attempt)
        .cloned()
}

async fn job(cl: &mut Cl, id: &str) -> anyhow::Result<pb::Job> {
    Ok(cl
        .get_job(pb::GetJobRequest { job_id: id.into() })
        .await
        .context("GetJob")?
        .into_inner())
}

async fn submit(cl: &mut Cl, spec: String) -> anyhow::Result<String> {
    Ok(cl
        .submit_job(pb::SubmitJobRequest {
            spec_toml: spec,
            default_name: "sim".into(),
            ..Default::default()
        })
        .await
        .map_err(|s| anyhow::anyhow!("SubmitJob: {}", s.message()))?
        .into_inner()
        .job_id)
}

/// Waits until every rank of `job`'s attempt `attempt` holds its
/// assignment; that attempt's rendezvous.
async fn assigned(
    sim: &Simulator,
    job: &str,
    attempt: u32,
    limit: Duration,
) -> anyhow::Result<AttemptStats> {
    until(
        &format!("job {job} attempt {attempt} assigned"),
        limit,
        async || {
            Ok(attempt_of(&sim_stats(sim, false), job, attempt)
                .filter(|a| a.ranks > 0 && a.assigned == a.ranks))
        },
    )
    .await
}

fn start_coordinator(
    dir: &Path,
    sim: SocketAddr,
    nodes: u32,
    a: &CoordinatorBenchArgs,
) -> anyhow::Result<CoordinatorProcess> {
    let exe = std::env::current_exe().context("the strata binary's path")?;
    let grpc: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
    let http: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
    let state = dir.join("state");
    let log = std::fs::File::create(dir.join("coordinator.log"))?;
    let token = strata_coordinator::job::random_token()?;
    let token_file = dir.join("token");
    strata_coordinator::startup::write_private(&token_file, token.as_bytes())?;
    let mut cmd = Command::new(&exe);
    cmd.args([
        "coordinator",
        "--listen",
        &grpc.to_string(),
        "--http-listen",
        &http.to_string(),
        "--state-dir",
        &state.display().to_string(),
        "--token-file",
        &token_file.display().to_string(),
        "--heartbeat-timeout-s",
        &a.heartbeat_timeout_s.to_string(),
        "--stop-grace-s",
        "5",
    ])
    .env("RUST_LOG", "warn")
    .stdin(Stdio::null())
    .stdout(Stdio::null())
    .stderr(log);
    match a.launcher {
        BenchLauncher::Sim => {
            cmd.args([
                "--launcher",
                "sim",
                "--sim",
                &sim.to_string(),
                "--sim-nodes",
                &nodes.to_string(),
                "--sim-gpus-per-node",
                "8",
            ]);
        }
        BenchLauncher::Slurm => {
            let bin = dir.join("slurm-bin");
            strata_sim::slurm::write_standins(&bin, &exe)?;
            let path = format!(
                "{}:{}",
                bin.display(),
                std::env::var("PATH").unwrap_or_default()
            );
            cmd.args(["--launcher", "slurm"])
                .env("PATH", path)
                .env(strata_sim::slurm::SIM_ADDR_VAR, sim.to_string());
        }
    }
    let child = cmd.spawn().context("starting the coordinator")?;
    Ok(CoordinatorProcess {
        child,
        grpc,
        http,
        state,
        token,
        web: reqwest::Client::new(),
    })
}

/// One run: `a.jobs` jobs of `ranks` ranks.
async fn run_one(
    a: &CoordinatorBenchArgs,
    ranks: u32,
    data: &str,
    root: &Path,
) -> anyhow::Result<Run> {
    let dir = root.join(format!("run-{ranks}x{}", a.jobs));
    // A run starts afresh: a store left by an earlier run would resume
    // its jobs.
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("clearing {}", dir.display()))?;
    }
    std::fs::create_dir_all(&dir)?;
    // Spare nodes: a job restarted after a lost node has somewhere to go.
    let nodes = (ranks * a.jobs).div_ceil(8) + 8;
    let sim = Simulator::start(
        "127.0.0.1:0".parse()?,
        SimConfig {
            step_time: Duration::from_millis(a.step_ms),
            nodes,
            gpus_per_node: 8,
        },
    )
    .await?;
    let coordinator = start_coordinator(&dir, sim.addr, nodes, a)?;
    let pid = coordinator.child.id();
    let mut cl = until(
        "the coordinator answers",
        Duration::from_secs(60),
        async || Ok(coordinator.client().await),
    )
    .await?;
    let layout = fixture::layout_for(ranks);
    let fault = format!(
        "hang_timeout_s = {}\nrestart_window_s = 3600",
        a.hang_timeout_s
    );
    let mut ids = Vec::new();
    for j in 0..a.jobs {
        let spec = fixture::recipe(
            &format!("sim{j}"),
            data,
            &dir.join("checkpoints"),
            layout,
            1_000_000,
            a.checkpoint_every,
            &fault,
        );
        ids.push(submit(&mut cl, spec).await?);
    }
    let mut worst = 0f64;
    let mut registered = 0f64;
    for id in &ids {
        let s = assigned(&sim, id, 1, Duration::from_secs(600)).await?;
        worst = worst.max((s.last_assigned_ms - s.last_register_ms) / 1e3);
        registered = registered.max((s.last_register_ms - s.started_ms) / 1e3);
    }
    // A few steps, then the steady window.
    tokio::time::sleep(Duration::from_secs(3).max(Duration::from_millis(3 * a.step_ms))).await;
    let steps_of = async |cl: &mut Cl| -> anyhow::Result<u64> {
        let mut n = 0;
        for id in &ids {
            n += job(cl, id).await?.steps_done;
        }
        Ok(n)
    };
    let redb = coordinator.state.join("jobs.redb");
    let (m0, _, _) = coordinator.get("/metrics").await?;
    if m0 != 200 {
        bail!("/metrics answered {m0}");
    }
    let scrape0 = coordinator.get("/metrics").await?.1;
    let (before, hb_before) = (lock_buckets(&scrape0), heartbeat_buckets(&scrape0));
    let (cpu0, _, _) = proc_usage(pid)?;
    let (steps0, bytes0) = (steps_of(&mut cl).await?, std::fs::metadata(&redb)?.len());
    let _ = sim_stats(&sim, true);
    let t0 = Instant::now();
    let mut scrapes: Vec<(Duration, usize)> = Vec::new();
    let mut pages: Vec<(Duration, usize)> = Vec::new();
    while t0.elapsed() < Duration::from_secs(a.steady_s) {
        let tick = Instant::now();
        let (_, body, took) = coordinator.get("/metrics").await?;
        scrapes.push((took, body.len()));
        let (code, body, took) = coordinator.get(&format!("/api/jobs/{}", ids[0])).await?;
        if code != 200 {
            bail!("/api/jobs/{}: {code} {body}", ids[0]);
        }
        pages.push((took, body.len()));
        let pause = Duration::from_secs_f64(a.scrape_every_s).saturating_sub(tick.elapsed());
        tokio::time::sleep(pause).await;
    }
    let wall = t0.elapsed().as_secs_f64();
    let (cpu1, rss, _) = proc_usage(pid)?;
    let (_, last_metrics, _) = coordinator.get("/metrics").await?;
    let after = lock_buckets(&last_metrics);
    let hb_after = heartbeat_buckets(&last_metrics);
    let (steps1, bytes1) = (steps_of(&mut cl).await?, std::fs::metadata(&redb)?.len());
    let hb = sim_stats(&sim, false);
    let mean = |v: &[(Duration, usize)]| {
        v.iter().map(|x| x.0.as_secs_f64()).sum::<f64>() / v.len().max(1) as f64 * 1e3
    };
    let mut run = Run {
        ranks,
        jobs: a.jobs,
        layout: format!("{}·{}·{}", layout.tp, layout.pp, layout.dp),
        launcher: format!("{:?}", a.launcher).to_lowercase(),
        step_s: a.step_ms as f64 / 1e3,
        assigned_after_last_register_s: worst,
        all_registered_s: registered,
        heartbeat_period_s: gauge(&last_metrics, "strata_heartbeat_period_seconds").unwrap_or(0.0),
        heartbeats_per_s: hb.heartbeat.count as f64 / wall,
        heartbeat_p50_ms: hb.heartbeat.p50_ms,
        heartbeat_p99_ms: hb.heartbeat.p99_ms,
        heartbeat_max_ms: hb.heartbeat.max_ms,
        heartbeat_server_p99_ms: hold_quantile(&hb_before, &hb_after, 0.99) * 1e3,
        worst_job_heartbeat_p99_ms: worst_job_p99(&hb),
        lock_hold_p99_ms: hold_quantile(&before, &after, 0.99) * 1e3,
        lock_hold_max_ms: gauge(&last_metrics, "strata_engine_lock_hold_max_seconds")
            .unwrap_or(0.0)
            * 1e3,
        coordinator_cpu_cores: (cpu1 - cpu0) / wall,
        coordinator_rss_mib: rss as f64 / 1024.0,
        store_bytes_per_step: (bytes1.saturating_sub(bytes0)) as f64
            / (steps1.saturating_sub(steps0)).max(1) as f64,
        metrics_scrape_ms: mean(&scrapes),
        metrics_bytes: scrapes.last().map_or(0, |s| s.1),
        job_api_ms: mean(&pages),
        job_api_bytes: pages.last().map_or(0, |s| s.1),
        rpc_errors: hb.errors.values().sum(),
        ..Run::default()
    };

    // A launcher command that hangs: the other jobs' heartbeats meanwhile.
    if a.hang_launcher_s > 0.0 {
        let command = match a.launcher {
            BenchLauncher::Sim => "start",
            BenchLauncher::Slurm => "sbatch",
        };
        sim.call(SimRequest::Fault(SimFault::HangCommand {
            command: command.into(),
            job: String::new(),
            seconds: a.hang_launcher_s,
        }))
        .await;
        let spec = fixture::recipe(
            "hung",
            data,
            &dir.join("checkpoints"),
            fixture::layout_for(8),
            1_000_000,
            20,
            "",
        );
        let _ = sim_stats(&sim, true);
        let held_before = lock_buckets(&coordinator.get("/metrics").await?.1);
        let hung = submit(&mut cl, spec).await?;
        tokio::time::sleep(Duration::from_secs_f64(a.hang_launcher_s * 0.9)).await;
        // Its ranks have not started: every heartbeat is another job's.
        let during = sim_stats(&sim, false);
        let held_after = lock_buckets(&coordinator.get("/metrics").await?.1);
        if job(&mut cl, &hung).await?.steps_done > 0 {
            bail!("job {hung} ran while its launcher command was to hang");
        }
        run.hung_launcher = Some(HungLauncher {
            hung_s: a.hang_launcher_s,
            heartbeat_p50_ms: during.heartbeat.p50_ms,
            heartbeat_p99_ms: during.heartbeat.p99_ms,
            heartbeat_max_ms: during.heartbeat.max_ms,
            worst_job_heartbeat_p99_ms: worst_job_p99(&during),
            lock_hold_max_ms: hold_quantile(&held_before, &held_after, 1.0) * 1e3,
        });
        let _ = cl
            .cancel_job(pb::CancelJobRequest {
                job_id: hung,
                reason: "benchmark".into(),
            })
            .await;
    }

    // Faults on the first job, one after another.
    let id = ids[0].clone();
    let victim = (ranks / 2 + 3) % ranks.max(1);
    for kind in &a.faults {
        let before = job(&mut cl, &id).await?;
        let attempt = before.attempts.last().map_or(1, |x| x.number);
        let node = {
            let (_, body, _) = coordinator
                .get(&format!("/api/jobs/{id}/ranks?offset={victim}&limit=1"))
                .await?;
            let v: serde_json::Value = serde_json::from_str(&body)?;
            v["ranks"][0]["node"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        };
        let fault = match kind {
            BenchFault::Exit => SimFault::Exit {
                job: id.clone(),
                rank: victim,
                code: 9,
                signal: true,
            },
            BenchFault::Node => SimFault::LoseNode {
                job: id.clone(),
                node,
            },
            BenchFault::Silent => SimFault::Silent {
                job: id.clone(),
                rank: victim,
            },
            BenchFault::Hang => SimFault::Hang {
                job: id.clone(),
                rank: victim,
            },
        };
        let (cpu_fault, _, _) = proc_usage(pid)?;
        let t_fault = strata_coordinator::job::now_unix_ms() as f64;
        if let SimResponse::Error { message } = sim.call(SimRequest::Fault(fault)).await {
            bail!("fault {kind:?}: {message}");
        }
        let limit = Duration::from_secs(a.heartbeat_timeout_s.max(a.hang_timeout_s) * 4 + 120);
        let ended = until(&format!("fault {kind:?} detected"), limit, async || {
            let j = job(&mut cl, &id).await?;
            Ok(j.attempts
                .iter()
                .find(|x| x.number == attempt && x.end_state != 0)
                .cloned())
        })
        .await?;
        let next = assigned(&sim, &id, attempt + 1, Duration::from_secs(600)).await?;
        let (cpu_next, _, _) = proc_usage(pid)?;
        let detected = (ended.ended_unix_ms as f64 - t_fault) / 1e3;
        let reassigned = (next.last_assigned_ms - t_fault) / 1e3;
        run.faults.push(FaultRun {
            kind: format!("{kind:?}").to_lowercase(),
            detected_s: detected,
            next_launched_s: (next.started_ms - t_fault) / 1e3,
            next_registered_s: (next.last_register_ms - t_fault) / 1e3,
            reassigned_s: reassigned,
            reassigned_after_detection_s: reassigned - detected,
            coordinator_cpu_s: cpu_next - cpu_fault,
            cause: ended.cause.lines().next().unwrap_or("").to_string(),
        });
        tokio::time::sleep(Duration::from_millis(3 * a.step_ms)).await;
    }
    run.fault_detected_s = run.faults.first().map(|f| f.detected_s);
    run.fault_reassigned_s = run.faults.first().map(|f| f.reassigned_s);
    let (_, _, peak) = proc_usage(pid)?;
    run.coordinator_peak_rss_mib = peak as f64 / 1024.0;
    drop(coordinator);
    drop(sim);
    Ok(run)
}

pub fn coordinator(a: CoordinatorBenchArgs) -> anyhow::Result<()> {
    if a.jobs == 0 || a.ranks.contains(&0) {
        return Err(crate::UserError("--ranks and --jobs must be positive".into()).into());
    }
    // Every simulated rank holds a connection, as the coordinator does.
    strata_coordinator::cluster::limits::ensure_open_files(
        u64::from(a.ranks.iter().max().copied().unwrap_or(0) * a.jobs) + 1024,
        "the simulated ranks",
    );
    let tmp = tempfile_dir(a.dir.as_deref())?;
    let root = tmp.path().to_path_buf();
    crate::jobs::runtime()?.block_on(async move {
        let data = fixture::dataset(&root.join("dataset"))
            .await
            .map_err(|e| anyhow::anyhow!("the dataset: {e}"))?;
        let mut runs = Vec::new();
        for &ranks in &a.ranks {
            eprintln!("bench coordinator: {} job(s) of {ranks} ranks …", a.jobs);
            let run = run_one(&a, ranks, &data, &root).await?;
            if a.json {
                println!("{}", serde_json::to_string(&run)?);
            }
            runs.push(run);
        }
        if !a.json {
            print_table(&runs);
        }
        drop(tmp);
        Ok(())
    })
}

/// A folder for the runs: the one asked for (kept), or a temporary one.
fn tempfile_dir(dir: Option<&Path>) -> anyhow::Result<Kept> {
    match dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            Ok(Kept::At(d.to_path_buf()))
        }
        None => Ok(Kept::Temp(
            tempfile::Builder::new()
                .prefix("strata-bench-coordinator")
                .tempdir()?,
        )),
    }
}

enum Kept {
    At(PathBuf),
    Temp(tempfile::TempDir),
}

impl Kept {
    fn path(&self) -> &Path {
        match self {
            Kept::At(p) => p,
            Kept::Temp(t) => t.path(),
        }
    }
}

fn print_table(runs: &[Run]) {
    let f = |x: f64, d: usize| format!("{x:.d$}");
    let opt = |x: Option<f64>| x.map_or("–".into(), |v| format!("{v:.2}"));
    let header: Vec<String> = [
        "jobs×ranks",
        "tp·pp·dp",
        "assigned s",
        "hb period s",
        "hb p50 ms",
        "hb p99 ms",
        "lock p99 ms",
        "lock max ms",
        "cpu cores",
        "peak MiB",
        "detected s",
        "reassigned s",
        "store B/step",
        "/metrics ms/B",
        "job API ms/B",
    ]
    .map(String::from)
    .to_vec();
    let rows: Vec<Vec<String>> = std::iter::once(header)
        .chain(runs.iter().map(|r| {
            vec![
                format!("{}×{}", r.jobs, r.ranks),
                r.layout.clone(),
                f(r.assigned_after_last_register_s, 3),
                f(r.heartbeat_period_s, 1),
                f(r.heartbeat_p50_ms, 2),
                f(r.heartbeat_p99_ms, 2),
                f(r.lock_hold_p99_ms, 3),
                f(r.lock_hold_max_ms, 1),
                f(r.coordinator_cpu_cores, 2),
                f(r.coordinator_peak_rss_mib, 0),
                opt(r.fault_detected_s),
                opt(r.fault_reassigned_s),
                f(r.store_bytes_per_step, 0),
                format!("{:.1}/{}", r.metrics_scrape_ms, r.metrics_bytes),
                format!("{:.1}/{}", r.job_api_ms, r.job_api_bytes),
            ]
        }))
        .collect();
    println!("{}", table("", &rows));
}
