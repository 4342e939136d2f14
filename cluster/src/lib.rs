//! Where workers run: the inventory of slots, and the launchers that start a
//! worker process in a slot.
//!
//! The cluster crate knows processes, nodes and GPUs; it knows nothing of
//! recipes, tensors or gRPC. Every call of a launcher may block (a
//! process to start, a Slurm command): the coordinator makes them off its
//! lock, and every external command has a timeout. A worker is started with a command line and an
//! environment and never learns which launcher started it.

mod command;
mod inventory;
pub mod limits;
mod local;
pub mod sim;
pub mod slurm;

pub use command::run_with_timeout;
pub use inventory::{Inventory, InventoryError, Node, NodeStatus, Slot};
pub use local::{LocalHandle, LocalJobLauncher, LocalLauncher, LocalRanks};
pub use sim::SimJobLauncher;
pub use slurm::{SlurmConfig, SlurmJobLauncher, SlurmOptions};

use std::path::PathBuf;

/// Something a launcher polls for all its allocations at once.
pub(crate) trait Poll: Send + Sync + 'static {
    fn tick(&self);
    fn pause(&self) -> std::time::Duration;
}

/// Polls `p` on a thread of its own until the last other holder of it is
/// gone (the thread holds it only while it ticks).
pub(crate) fn spawn_poller<P: Poll>(name: &str, p: &std::sync::Arc<P>) -> std::io::Result<()> {
    let weak = std::sync::Arc::downgrade(p);
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            while let Some(p) = weak.upgrade() {
                p.tick();
                let pause = p.pause();
                drop(p);
                std::thread::sleep(pause);
            }
        })
        .map(|_| ())
}

/// The exit status of a worker that stopped on request (SIGTERM, or its
/// coordinator's), its last step saved: a SIGTERM'd process's conventional
/// status.
pub const STOPPED_STATUS: i32 = 143;

/// The environment variable that carries a TLS coordinator's CA (PEM) to
/// the ranks its launcher starts.
pub const COORDINATOR_CA_ENV: &str = "STRATA_COORDINATOR_CA";

/// What to start in a slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchSpec {
    /// The worker's world rank, for logs and error messages.
    pub rank: u32,
    pub slot: Slot,
    pub program: PathBuf,
    pub args: Vec<String>,
    /// Extra environment; the launcher adds `CUDA_VISIBLE_DEVICES` for a GPU slot.
    pub env: Vec<(String, String)>,
    /// The file the worker's stdout and stderr go to.
    pub log_path: PathBuf,
}

/// How a worker process ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    /// Exited with this status code.
    Code(i32),
    /// Killed by this signal (Unix).
    Signal(i32),
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Exit::Code(c) => write!(f, "exit status {c}"),
            Exit::Signal(s) => write!(f, "killed by signal {s}"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("rank {rank}: cannot open worker log {path}: {source}")]
    Log {
        rank: u32,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("rank {rank}: cannot start {program} on {node}: {source}")]
    Spawn {
        rank: u32,
        program: PathBuf,
        node: String,
        source: std::io::Error,
    },
    #[error("rank {rank}: {what}: {source}")]
    Control {
        rank: u32,
        what: &'static str,
        source: std::io::Error,
    },
    #[error("rank {rank}: slot on node {node}, which this launcher cannot reach")]
    UnreachableNode { rank: u32, node: String },
    #[error("slurm: {0}")]
    Slurm(String),
    #[error("simulator: {0}")]
    Sim(String),
}

/// Starts workers. Implementations: [`LocalLauncher`] (processes on this
/// machine); Slurm comes later.
pub trait Launcher {
    type Handle: WorkerHandle;
    fn launch(&self, spec: &LaunchSpec) -> Result<Self::Handle, LaunchError>;
}

/// A started worker.
pub trait WorkerHandle {
    fn rank(&self) -> u32;
    /// `Some` once the worker has ended; never blocks.
    fn try_wait(&mut self) -> Result<Option<Exit>, LaunchError>;
    /// Stops the worker (if still running) and reaps it.
    fn kill(&mut self) -> Result<Exit, LaunchError>;
    /// Asks the worker to stop (SIGTERM): it may finish what it is doing
    /// (a checkpoint) and exit. Does not wait.
    fn terminate(&mut self) -> Result<(), LaunchError>;
    /// The last `n` lines of the worker's log, for failure reports.
    fn log_tail(&self, n: usize) -> Vec<String>;
}

/// Which attempt of which job a launcher starts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StartInfo {
    pub job: String,
    pub attempt: u32,
    /// The job's own Slurm settings (other launchers ignore them).
    pub slurm: SlurmOptions,
}

/// How an attempt's ranks went as a whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lost {
    pub cause: String,
    /// The cluster took the ranks back on its own schedule (a time limit
    /// reached, a preemption), not because anything failed: such an end
    /// does not count toward a job's restart limit.
    pub interruption: bool,
    /// The nodes that went, when the cluster says (a node failure).
    pub nodes: Vec<String>,
}

/// Something a previous coordinator left running and [`JobLauncher::reclaim`]
/// cancelled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reclaimed {
    /// The job it ran for, when known.
    pub job: Option<String>,
    /// What it was, for messages ("worker pid 4242 (rank 3)").
    pub what: String,
}

/// Starts and stops every rank of one attempt of a job: the coordinator's
/// view of a launcher. Object-safe, so the coordinator holds whichever it
/// was configured with (local processes, Slurm).
pub trait JobLauncher: Send + Sync {
    /// Starts one worker per spec (in rank order). On failure nothing
    /// started is left running.
    fn start(&self, ranks: &[LaunchSpec], info: &StartInfo) -> Result<Box<dyn Ranks>, LaunchError>;

    /// The nodes as the cluster reports them now, for a launcher whose
    /// nodes change (Slurm); `None` for a fixed inventory.
    fn inventory(&self) -> Option<Result<Vec<NodeStatus>, LaunchError>> {
        None
    }

    /// Whether the ranks run on this machine, sharing its cores.
    fn shares_this_machine(&self) -> bool {
        true
    }

    /// Where workers run, for messages.
    fn describe(&self) -> String {
        "this machine".into()
    }

    /// Cancels what a previous coordinator on the same state left running
    /// (its allocations, its processes); what was cancelled, for the record.
    fn reclaim(&self) -> Vec<Reclaimed> {
        Vec::new()
    }
}

/// The worker processes of one attempt.
pub trait Ranks: Send {
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// How rank `rank`'s process ended, `None` while it runs; never blocks.
    fn exit(&mut self, rank: usize) -> Result<Option<Exit>, LaunchError>;
    /// Asks every running rank to stop (SIGTERM).
    fn terminate(&mut self);
    /// Kills every rank still running (SIGKILL) and reaps it.
    fn kill(&mut self);
    /// Why the attempt's ranks are gone as a whole (their allocation
    /// ended: cancelled, preempted, a node lost, a time limit), once known.
    fn lost(&mut self) -> Option<Lost> {
        None
    }
    /// Why the ranks have not started yet (an allocation waiting in a
    /// queue); `None` once they run.
    fn waiting(&mut self) -> Option<String> {
        None
    }
    /// Whether every rank has ended.
    fn all_ended(&mut self) -> bool {
        (0..self.len()).all(|r| !matches!(self.exit(r), Ok(None)))
    }
    /// The ranks whose process has ended, with how; ranks reported by an
    /// earlier call may be reported again. One look for the whole attempt
    /// (a launcher with many ranks lists its exits at once: Slurm reads
    /// one directory), never a wait for a process.
    fn poll_exits(&mut self) -> Result<Vec<(usize, Exit)>, LaunchError> {
        let mut out = Vec::new();
        for r in 0..self.len() {
            if let Some(e) = self.exit(r)? {
                out.push((r, e));
            }
        }
        Ok(out)
    }
    /// The last `n` lines of rank `rank`'s log.
    fn log_tail(&self, rank: usize, n: usize) -> Vec<String>;
}
