//! The rank simulator: one process that hosts thousands of simulated
//! ranks as tasks, each speaking the real worker protocol (real gRPC, a
//! connection of its own) to a real coordinator, with no training. It is
//! how the coordinator is measured at the scale users run (16,384 ranks
//! on 2,048 nodes) on a machine that has neither.
//!
//! The simulator listens on a TCP address for [`SimRequest`]s (one JSON
//! line in, one out): the coordinator's [`SimJobLauncher`] starts and
//! stops allocations of ranks through it; the Slurm stand-ins
//! ([`slurm`]) do the same for the real Slurm launcher; the benchmark and
//! the tests inject faults (a silent rank, a hung step, an exit, a lost
//! node, a launcher command that hangs) and read the measurements
//! ([`stats`]: rendezvous times, heartbeat round trips).
//!
//! [`SimJobLauncher`]: strata_cluster::SimJobLauncher

pub mod fixture;
mod rank;
pub mod slurm;
pub mod stats;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use strata_cluster::NodeStatus;
use strata_cluster::sim::{AllocView, SimFault, SimRequest, SimResponse, SimStart, sim_node_name};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use rank::{AllocShared, Barrier, RankCtl};
use stats::Stats;

/// How the simulator plays its ranks and nodes.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// How long each simulated step takes.
    pub step_time: Duration,
    /// The inventory `sinfo` reports: nodes of `gpus_per_node` GPUs.
    pub nodes: u32,
    pub gpus_per_node: u32,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            step_time: Duration::from_secs(1),
            nodes: 2048,
            gpus_per_node: 8,
        }
    }
}

struct RankSlot {
    ctl: Arc<RankCtl>,
    node: String,
    task: Option<tokio::task::AbortHandle>,
}

struct Alloc {
    job: String,
    attempt: u32,
    name: String,
    comment: String,
    started: Instant,
    ranks: Vec<RankSlot>,
    exits: Vec<Option<(i32, bool)>>,
    state: &'static str,
    reason: String,
    lost_nodes: Vec<String>,
    exit_dir: Option<PathBuf>,
}

impl Alloc {
    fn view(&self, id: u64) -> AllocView {
        AllocView {
            alloc: id.to_string(),
            job: self.job.clone(),
            attempt: self.attempt,
            state: self.state.to_string(),
            reason: self.reason.clone(),
            exits: self
                .exits
                .iter()
                .enumerate()
                .filter_map(|(r, e)| e.map(|(c, s)| (r as u32, c, s)))
                .collect(),
            elapsed_s: self.started.elapsed().as_secs(),
            lost_nodes: self.lost_nodes.clone(),
            name: self.name.clone(),
            comment: self.comment.clone(),
        }
    }

    fn running(&self) -> bool {
        self.state == "RUNNING"
    }

    /// Records rank `r`'s end (once), writes its exit file where the
    /// Slurm wrapper would, and ends the allocation when every rank has.
    fn ended(&mut self, r: usize, code: i32, signal: bool) {
        if self.exits[r].is_some() {
            return;
        }
        self.exits[r] = Some((code, signal));
        self.ranks[r].task = None;
        if let Some(dir) = &self.exit_dir {
            // What the wrapper's `wait` returns: 128 + the signal.
            let rc = if signal { 128 + code } else { code };
            let tmp = dir.join(format!("rank-{r}.exit.tmp"));
            if std::fs::write(&tmp, format!("{rc}\n")).is_ok() {
                let _ = std::fs::rename(&tmp, dir.join(format!("rank-{r}.exit")));
            }
        }
        if self.running() && self.exits.iter().all(Option::is_some) {
            let ok = self.exits.iter().flatten().all(|&(c, s)| c == 0 && !s);
            self.state = if ok { "COMPLETED" } else { "FAILED" };
        }
    }
}

struct Inner {
    cfg: SimConfig,
    allocs: Mutex<BTreeMap<u64, Alloc>>,
    next: AtomicU64,
    /// Launcher commands to hold: (command, job, seconds).
    hangs: Mutex<Vec<(String, String, f64)>>,
    stats: Arc<Stats>,
    alive: Arc<AtomicU64>,
    /// Connections being made at once, all allocations together.
    connects: Arc<tokio::sync::Semaphore>,
}

/// Connections the simulated ranks make at once, at most.
pub const CONNECTS_IN_FLIGHT: usize = 2048;

/// A running simulator.
pub struct Simulator {
    pub addr: SocketAddr,
    inner: Arc<Inner>,
    task: tokio::task::JoinHandle<()>,
}

impl Simulator {
    /// Listens on `listen` and serves until dropped.
    pub async fn start(listen: SocketAddr, cfg: SimConfig) -> std::io::Result<Simulator> {
        let listener = tokio::net::TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let inner = Arc::new(Inner {
            cfg,
            allocs: Mutex::new(BTreeMap::new()),
            next: AtomicU64::new(1000),
            hangs: Mutex::new(Vec::new()),
            stats: Arc::new(Stats::default()),
            alive: Arc::new(AtomicU64::new(0)),
            connects: Arc::new(tokio::sync::Semaphore::new(CONNECTS_IN_FLIGHT)),
        });
        let serving = inner.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                let inner = serving.clone();
                tokio::spawn(async move {
                    let (read, mut write) = stream.into_split();
                    let mut line = String::new();
                    if BufReader::new(read).read_line(&mut line).await.is_err() {
                        return;
                    }
                    let answer = match serde_json::from_str::<SimRequest>(&line) {
                        Ok(req) => inner.handle(req).await,
                        Err(e) => SimResponse::Error {
                            message: format!("bad request {line:?}: {e}"),
                        },
                    };
                    let mut out = serde_json::to_vec(&answer).expect("an answer serialises");
                    out.push(b'\n');
                    let _ = write.write_all(&out).await;
                });
            }
        });
        Ok(Simulator { addr, inner, task })
    }

    /// Ranks alive now.
    pub fn ranks_alive(&self) -> u64 {
        self.inner.alive.load(Ordering::Relaxed)
    }

    /// Handles one request in this process (the benchmark and tests).
    pub async fn call(&self, req: SimRequest) -> SimResponse {
        self.inner.handle(req).await
    }

    pub fn stats(&self, reset: bool) -> stats::StatsReport {
        self.inner
            .stats
            .report(reset, self.inner.alive.load(Ordering::Relaxed))
    }
}

impl Drop for Simulator {
    fn drop(&mut self) {
        self.task.abort();
        let mut allocs = self.inner.allocs.lock().unwrap_or_else(|e| e.into_inner());
        for a in allocs.values_mut() {
            for r in &mut a.ranks {
                if let Some(t) = r.task.take() {
                    t.abort();
                }
            }
        }
    }
}

impl Inner {
    fn allocs(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Alloc>> {
        self.allocs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Holds a launcher command while a `HangCommand` fault says so.
    async fn gate(&self, command: &str, job: &str) {
        let hold = {
            let mut hangs = self.hangs.lock().unwrap_or_else(|e| e.into_inner());
            let i = hangs
                .iter()
                .position(|(c, j, _)| c == command && (j.is_empty() || j == job));
            i.map(|i| hangs.remove(i).2)
        };
        if let Some(s) = hold {
            tracing::warn!(
                command,
                job,
                seconds = s,
                "holding a launcher command (fault)"
            );
            tokio::time::sleep(Duration::from_secs_f64(s)).await;
        }
    }

    async fn handle(self: &Arc<Self>, req: SimRequest) -> SimResponse {
        match req {
            SimRequest::Start(s) => {
                self.gate("start", &s.job).await;
                let id = self.start(s);
                SimResponse::Started {
                    alloc: id.to_string(),
                }
            }
            SimRequest::Gate { command, job } => {
                self.gate(&command, &job).await;
                SimResponse::Ok
            }
            SimRequest::Signal { alloc, kill } => {
                let Ok(id) = alloc.parse::<u64>() else {
                    return SimResponse::Error {
                        message: format!("no allocation {alloc}"),
                    };
                };
                self.signal(id, kill);
                SimResponse::Ok
            }
            SimRequest::Poll { allocs } => {
                let all = self.allocs();
                SimResponse::States {
                    allocs: allocs
                        .iter()
                        .filter_map(|a| {
                            let id = a.parse::<u64>().ok()?;
                            Some(all.get(&id)?.view(id))
                        })
                        .collect(),
                }
            }
            SimRequest::List => {
                let all = self.allocs();
                SimResponse::States {
                    allocs: all.iter().map(|(id, a)| a.view(*id)).collect(),
                }
            }
            SimRequest::Fault(f) => match self.fault(f) {
                Ok(()) => SimResponse::Ok,
                Err(message) => SimResponse::Error { message },
            },
            SimRequest::Stats { reset } => SimResponse::Stats {
                stats: serde_json::to_value(
                    self.stats.report(reset, self.alive.load(Ordering::Relaxed)),
                )
                .expect("stats serialise"),
            },
            SimRequest::Nodes => SimResponse::Nodes {
                nodes: (0..self.cfg.nodes)
                    .map(|i| NodeStatus {
                        name: sim_node_name(i),
                        cpus: 8 * self.cfg.gpus_per_node.max(1),
                        gpus: self.cfg.gpus_per_node,
                        slots: self.cfg.gpus_per_node.max(1),
                        state: "idle".into(),
                    })
                    .collect(),
            },
        }
    }

    /// Starts an allocation's ranks, each a task.
    fn start(self: &Arc<Self>, s: SimStart) -> u64 {
        let id = self.next.fetch_add(1, Ordering::SeqCst);
        let world = s.ranks.len();
        self.stats.started(&s.job, s.attempt, world as u32);
        let shared = Arc::new(AllocShared {
            barrier: Barrier::new(world),
            recipe: OnceLock::new(),
            resume: tokio::sync::OnceCell::new(),
            step_time: self.cfg.step_time,
            connects: self.connects.clone(),
            start: s.clone(),
        });
        let ranks: Vec<RankSlot> = s
            .ranks
            .iter()
            .map(|r| RankSlot {
                ctl: Arc::new(RankCtl::default()),
                node: r.node.clone(),
                task: None,
            })
            .collect();
        let mut alloc = Alloc {
            job: s.job.clone(),
            attempt: s.attempt,
            name: s.name.clone(),
            comment: s.comment.clone(),
            started: Instant::now(),
            exits: vec![None; world],
            ranks,
            state: "RUNNING",
            reason: "None".into(),
            lost_nodes: Vec::new(),
            exit_dir: s.exit_dir.clone(),
        };
        for (i, r) in s.ranks.iter().enumerate() {
            let (inner, shared, ctl) = (self.clone(), shared.clone(), alloc.ranks[i].ctl.clone());
            let (rank, node) = (r.rank, r.node.clone());
            self.alive.fetch_add(1, Ordering::Relaxed);
            let stats = self.stats.clone();
            let task = tokio::spawn(async move {
                let (code, signal) = rank::run(shared, stats, ctl, rank, node).await;
                inner.alive.fetch_sub(1, Ordering::Relaxed);
                if let Some(a) = inner.allocs().get_mut(&id) {
                    a.ended(i, code, signal);
                }
            });
            alloc.ranks[i].task = Some(task.abort_handle());
        }
        tracing::info!(alloc = id, job = %s.job, attempt = s.attempt, ranks = world, "simulated allocation started");
        self.allocs().insert(id, alloc);
        id
    }

    /// Kills rank `r` of `a` now (its task and its connection go).
    fn kill_rank(&self, a: &mut Alloc, r: usize, code: i32, signal: bool) {
        if let Some(t) = a.ranks[r].task.take() {
            t.abort();
            self.alive.fetch_sub(1, Ordering::Relaxed);
        }
        a.ended(r, code, signal);
    }

    fn signal(&self, id: u64, kill: bool) {
        let mut all = self.allocs();
        let Some(a) = all.get_mut(&id) else {
            return;
        };
        if kill {
            for r in 0..a.ranks.len() {
                if a.exits[r].is_none() {
                    self.kill_rank(a, r, 9, true);
                }
            }
            if a.running() || a.state == "FAILED" {
                a.state = "CANCELLED";
            }
        } else {
            for r in &a.ranks {
                r.ctl.signal(&r.ctl.term);
            }
        }
    }

    /// The live allocation of `job`'s latest attempt.
    fn live_of<'a>(all: &'a mut BTreeMap<u64, Alloc>, job: &str) -> Option<&'a mut Alloc> {
        all.values_mut()
            .filter(|a| a.job == job && a.running())
            .max_by_key(|a| a.attempt)
    }

    fn fault(&self, f: SimFault) -> Result<(), String> {
        tracing::warn!(fault = ?f, "injecting a fault");
        if let SimFault::HangCommand {
            command,
            job,
            seconds,
        } = f
        {
            self.hangs
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((command, job, seconds));
            return Ok(());
        }
        let mut all = self.allocs();
        let job = match &f {
            SimFault::Silent { job, .. }
            | SimFault::Hang { job, .. }
            | SimFault::Exit { job, .. }
            | SimFault::LoseNode { job, .. } => job.clone(),
            SimFault::HangCommand { .. } => unreachable!("handled above"),
        };
        let a = Inner::live_of(&mut all, &job)
            .ok_or_else(|| format!("job {job} has no running simulated ranks"))?;
        let rank_of = |a: &Alloc, r: u32| -> Result<usize, String> {
            ((r as usize) < a.ranks.len())
                .then_some(r as usize)
                .ok_or_else(|| format!("job {job} has no rank {r}"))
        };
        match f {
            SimFault::Silent { rank, .. } => {
                let r = rank_of(a, rank)?;
                a.ranks[r].ctl.signal(&a.ranks[r].ctl.silent);
            }
            SimFault::Hang { rank, .. } => {
                let r = rank_of(a, rank)?;
                a.ranks[r].ctl.signal(&a.ranks[r].ctl.hang);
            }
            SimFault::Exit {
                rank, code, signal, ..
            } => {
                let r = rank_of(a, rank)?;
                self.kill_rank(a, r, code, signal);
            }
            SimFault::LoseNode { node, .. } => {
                let on: Vec<usize> = (0..a.ranks.len())
                    .filter(|&r| a.ranks[r].node == node)
                    .collect();
                if on.is_empty() {
                    return Err(format!("job {job} has no rank on node {node}"));
                }
                // The machine went: its ranks stop without a word (their
                // connections drop); the allocation reports the node
                // failed, and its other ranks are killed with it (as
                // Slurm ends a job that lost a node).
                for &r in &on {
                    a.ranks[r].ctl.signal(&a.ranks[r].ctl.silent);
                    if let Some(t) = a.ranks[r].task.take() {
                        t.abort();
                        self.alive.fetch_sub(1, Ordering::Relaxed);
                    }
                }
                a.state = "NODE_FAIL";
                for r in 0..a.ranks.len() {
                    if !on.contains(&r) && a.exits[r].is_none() {
                        self.kill_rank(a, r, 9, true);
                    }
                }
                a.reason = format!("node {node} is not responding");
                a.lost_nodes.push(node);
            }
            SimFault::HangCommand { .. } => unreachable!("handled above"),
        }
        Ok(())
    }
}
