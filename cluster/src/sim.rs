//! Workers that a rank simulator plays (`strata sim`): the launcher hands
//! each rank's spec (its coordinator, job, attempt, rank and token) to
//! the simulator process, which runs every rank as a task speaking the
//! real worker protocol to the real coordinator. The coordinator cannot
//! tell: it places, starts, watches and stops them as it would processes.
//!
//! The simulator listens on a TCP address and answers one JSON line per
//! connection ([`SimRequest`] in, [`SimResponse`] out). Allocations play
//! the part of Slurm jobs: the Slurm stand-ins (`strata sim slurm sbatch
//! …`) submit through the same calls, so the real Slurm launcher can be
//! driven at scale too.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::{Exit, JobLauncher, LaunchError, LaunchSpec, Lost, NodeStatus, Ranks, StartInfo};

/// One simulated rank, as its launcher hands it over.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SimRank {
    pub rank: u32,
    pub node: String,
}

/// What every rank of an allocation shares.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SimStart {
    /// The allocation's name and comment, as `sbatch` was given them.
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub comment: String,
    /// The coordinator's URL for workers.
    pub coordinator: String,
    pub job: String,
    pub attempt: u32,
    /// The job's worker token.
    pub token: String,
    /// The CA (PEM) a TLS coordinator is trusted by.
    #[serde(default)]
    pub ca: Option<String>,
    pub ranks: Vec<SimRank>,
    /// Where each rank writes `rank-R.exit` when it ends (as the Slurm
    /// wrapper does), if anywhere.
    pub exit_dir: Option<PathBuf>,
}

/// A fault the simulator injects on command.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum SimFault {
    /// The rank stops everything (no heartbeat, no step) but its process
    /// stays: a stopped process, or a machine cut off.
    Silent { job: String, rank: u32 },
    /// The rank's step stops moving while its heartbeats go on: a hung
    /// collective or kernel.
    Hang { job: String, rank: u32 },
    /// The rank's process ends now (`signal` 9: killed).
    Exit {
        job: String,
        rank: u32,
        code: i32,
        signal: bool,
    },
    /// Every rank of the job on `node` goes at once (killed), and the
    /// allocation reports the node failed.
    LoseNode { job: String, node: String },
    /// The next launcher command (`start`, or a Slurm stand-in's name:
    /// `sbatch`, `squeue`, `scancel`) of `job` (any job when empty)
    /// hangs this long before it is answered.
    HangCommand {
        command: String,
        job: String,
        seconds: f64,
    },
}

/// One call to the simulator.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum SimRequest {
    /// Starts an allocation's ranks; answers with its id.
    Start(SimStart),
    /// SIGTERM (the ranks finish their step, save and leave) or SIGKILL
    /// to every rank of an allocation; `cancel` also ends a pending one.
    Signal {
        alloc: String,
        kill: bool,
    },
    /// The states of these allocations, with their ranks' exits.
    Poll {
        allocs: Vec<String>,
    },
    /// Every allocation of a Slurm stand-in's owner comment.
    List,
    Fault(SimFault),
    /// The simulator's measurements (and, with `reset`, a fresh start).
    Stats {
        reset: bool,
    },
    /// The node inventory the simulator plays (for `sinfo`).
    Nodes,
    /// Held for `seconds` before the answer: what a stand-in command
    /// asks before it runs, so a `HangCommand` fault can hold it.
    Gate {
        command: String,
        job: String,
    },
}

/// An allocation as the simulator sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AllocView {
    pub alloc: String,
    pub job: String,
    pub attempt: u32,
    /// Slurm's words: `RUNNING`, `COMPLETED`, `CANCELLED`, `FAILED`,
    /// `NODE_FAIL`, `GONE`.
    pub state: String,
    pub reason: String,
    /// Ranks that ended, with their exit (`code`, or `signal` when
    /// killed).
    pub exits: Vec<(u32, i32, bool)>,
    pub elapsed_s: u64,
    /// Nodes the allocation lost (`NODE_FAIL`).
    #[serde(default)]
    pub lost_nodes: Vec<String>,
    /// The allocation's name and comment (Slurm's `%j` and `%k`).
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub comment: String,
}

/// The simulator's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "answer", rename_all = "snake_case")]
pub enum SimResponse {
    Ok,
    Started {
        alloc: String,
    },
    States {
        allocs: Vec<AllocView>,
    },
    Nodes {
        nodes: Vec<NodeStatus>,
    },
    /// Measurements, as the simulator names them (JSON).
    Stats {
        stats: serde_json::Value,
    },
    Error {
        message: String,
    },
}

/// One call to the simulator at `addr`, within `timeout`.
pub fn call(
    addr: SocketAddr,
    req: &SimRequest,
    timeout: Duration,
) -> Result<SimResponse, LaunchError> {
    let err = |what: String| LaunchError::Sim(format!("{addr}: {what}"));
    let mut s = TcpStream::connect_timeout(&addr, timeout.min(Duration::from_secs(10)))
        .map_err(|e| err(format!("cannot connect: {e}")))?;
    s.set_read_timeout(Some(timeout))
        .and_then(|_| s.set_write_timeout(Some(timeout)))
        .map_err(|e| err(e.to_string()))?;
    let mut line = serde_json::to_vec(req).expect("a request serialises");
    line.push(b'\n');
    s.write_all(&line)
        .map_err(|e| err(format!("sending: {e}")))?;
    let mut answer = String::new();
    BufReader::new(s)
        .read_line(&mut answer)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
                err(format!("no answer within {} s", timeout.as_secs_f64()))
            }
            _ => err(format!("reading: {e}")),
        })?;
    match serde_json::from_str(&answer) {
        Ok(SimResponse::Error { message }) => Err(err(message)),
        Ok(r) => Ok(r),
        Err(e) => Err(err(format!("answer {answer:?}: {e}"))),
    }
}

/// Starts each attempt's ranks in a simulator.
pub struct SimJobLauncher {
    addr: SocketAddr,
    nodes: Vec<NodeStatus>,
    timeout: Duration,
    poller: Arc<SimPoller>,
}

/// One thread asks the simulator for every live allocation at once.
struct SimPoller {
    addr: SocketAddr,
    allocs: Mutex<BTreeMap<String, Arc<Mutex<Option<AllocView>>>>>,
    poll: Duration,
    timeout: Duration,
}

impl crate::Poll for SimPoller {
    fn pause(&self) -> Duration {
        self.poll
    }

    fn tick(&self) {
        let watched: Vec<(String, Arc<Mutex<Option<AllocView>>>)> = self
            .allocs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if watched.is_empty() {
            return;
        }
        let allocs = watched.iter().map(|w| w.0.clone()).collect();
        match call(self.addr, &SimRequest::Poll { allocs }, self.timeout) {
            Ok(SimResponse::States { allocs }) => {
                for a in allocs {
                    if let Some((_, w)) = watched.iter().find(|w| w.0 == a.alloc) {
                        *w.lock().unwrap_or_else(|e| e.into_inner()) = Some(a);
                    }
                }
            }
            Ok(other) => tracing::warn!(answer = ?other, "unexpected answer to a poll"),
            Err(e) => tracing::warn!(error = %e, "cannot poll the simulator"),
        }
    }
}

impl SimJobLauncher {
    /// A launcher for the simulator at `addr`, whose inventory is
    /// `nodes` nodes of `gpus_per_node` GPUs (one rank each).
    pub fn new(addr: SocketAddr, nodes: u32, gpus_per_node: u32) -> SimJobLauncher {
        let poller = Arc::new(SimPoller {
            addr,
            allocs: Mutex::new(BTreeMap::new()),
            poll: Duration::from_millis(250),
            timeout: Duration::from_secs(30),
        });
        crate::spawn_poller("sim-poller", &poller).expect("a poller thread");
        SimJobLauncher {
            addr,
            nodes: (0..nodes)
                .map(|i| NodeStatus {
                    name: sim_node_name(i),
                    cpus: 8 * gpus_per_node.max(1),
                    gpus: gpus_per_node,
                    slots: gpus_per_node.max(1),
                    state: "idle".into(),
                })
                .collect(),
            timeout: Duration::from_secs(60),
            poller,
        }
    }
}

/// The simulated inventory's node names: `sim0001`, `sim0002`, ….
pub fn sim_node_name(i: u32) -> String {
    format!("sim{:04}", i + 1)
}

/// A value the coordinator put in a rank's command line or environment.
fn arg_after(spec: &LaunchSpec, flag: &str) -> Option<String> {
    spec.args
        .windows(2)
        .find(|w| w[0] == flag)
        .map(|w| w[1].clone())
}

fn env_of(spec: &LaunchSpec, key: &str) -> Option<String> {
    spec.env
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.clone())
}

impl JobLauncher for SimJobLauncher {
    fn start(&self, ranks: &[LaunchSpec], info: &StartInfo) -> Result<Box<dyn Ranks>, LaunchError> {
        let first = ranks
            .first()
            .ok_or_else(|| LaunchError::Sim("an attempt with no ranks".into()))?;
        let missing = |what: &str| {
            LaunchError::Sim(format!(
                "rank {}: its launch spec has no {what}",
                first.rank
            ))
        };
        let start = SimStart {
            name: format!("strata-{}-a{}", info.job, info.attempt),
            comment: String::new(),
            coordinator: arg_after(first, "--coordinator")
                .ok_or_else(|| missing("--coordinator"))?,
            job: info.job.clone(),
            attempt: info.attempt,
            token: env_of(first, "STRATA_JOB_TOKEN").ok_or_else(|| missing("job token"))?,
            ca: env_of(first, crate::COORDINATOR_CA_ENV),
            ranks: ranks
                .iter()
                .map(|s| SimRank {
                    rank: s.rank,
                    node: s.slot.node.clone(),
                })
                .collect(),
            exit_dir: None,
        };
        let alloc = match call(self.addr, &SimRequest::Start(start), self.timeout)? {
            SimResponse::Started { alloc } => alloc,
            other => return Err(LaunchError::Sim(format!("unexpected answer {other:?}"))),
        };
        let view = Arc::new(Mutex::new(None));
        self.poller
            .allocs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(alloc.clone(), view.clone());
        Ok(Box::new(SimRanks {
            alloc,
            n: ranks.len(),
            view,
            poller: self.poller.clone(),
            timeout: self.timeout,
        }))
    }

    fn inventory(&self) -> Option<Result<Vec<NodeStatus>, LaunchError>> {
        Some(Ok(self.nodes.clone()))
    }

    fn shares_this_machine(&self) -> bool {
        false
    }

    fn describe(&self) -> String {
        format!("rank simulator at {}", self.addr)
    }
}

/// One attempt's simulated ranks.
pub struct SimRanks {
    alloc: String,
    n: usize,
    view: Arc<Mutex<Option<AllocView>>>,
    poller: Arc<SimPoller>,
    timeout: Duration,
}

impl SimRanks {
    fn view(&self) -> Option<AllocView> {
        self.view.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn signal(&self, kill: bool) {
        let req = SimRequest::Signal {
            alloc: self.alloc.clone(),
            kill,
        };
        if let Err(e) = call(self.poller.addr, &req, self.timeout) {
            tracing::warn!(alloc = %self.alloc, error = %e, "cannot signal the simulated ranks");
        }
    }
}

fn exit_of(code: i32, signal: bool) -> Exit {
    if signal {
        Exit::Signal(code)
    } else {
        Exit::Code(code)
    }
}

impl Ranks for SimRanks {
    fn len(&self) -> usize {
        self.n
    }

    fn exit(&mut self, rank: usize) -> Result<Option<Exit>, LaunchError> {
        Ok(self.view().and_then(|v| {
            v.exits
                .iter()
                .find(|e| e.0 as usize == rank)
                .map(|e| exit_of(e.1, e.2))
        }))
    }

    fn poll_exits(&mut self) -> Result<Vec<(usize, Exit)>, LaunchError> {
        Ok(self.view().map_or_else(Vec::new, |v| {
            v.exits
                .iter()
                .map(|e| (e.0 as usize, exit_of(e.1, e.2)))
                .collect()
        }))
    }

    fn lost(&mut self) -> Option<Lost> {
        let v = self.view()?;
        (v.state == "NODE_FAIL").then(|| Lost {
            cause: format!(
                "simulated allocation {} lost {} (NODE_FAIL)",
                v.alloc,
                if v.lost_nodes.len() == 1 {
                    format!("node {}", v.lost_nodes[0])
                } else {
                    format!("nodes {}", v.lost_nodes.join(", "))
                }
            ),
            interruption: false,
            nodes: v.lost_nodes.clone(),
        })
    }

    fn terminate(&mut self) {
        self.signal(false);
    }

    fn kill(&mut self) {
        self.signal(true);
    }

    fn all_ended(&mut self) -> bool {
        self.view()
            .is_some_and(|v| v.state != "RUNNING" || v.exits.len() == self.n)
    }

    fn log_tail(&self, _rank: usize, _n: usize) -> Vec<String> {
        Vec::new()
    }
}

impl Drop for SimRanks {
    /// Leaves no simulated rank behind (as local processes are killed and
    /// Slurm allocations cancelled), off the caller's thread.
    fn drop(&mut self) {
        self.poller
            .allocs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.alloc);
        if self.all_ended() {
            return;
        }
        let (addr, alloc, timeout) = (self.poller.addr, self.alloc.clone(), self.timeout);
        std::thread::spawn(move || {
            let _ = call(addr, &SimRequest::Signal { alloc, kill: true }, timeout);
        });
    }
}
