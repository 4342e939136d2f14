//! Where workers run: the inventory of slots, and the launchers that start a
//! worker process in a slot.
//!
//! The cluster crate knows processes, nodes and GPUs; it knows nothing of
//! recipes, tensors or gRPC. A worker is started with a command line and an
//! environment and never learns which launcher started it.

mod inventory;
mod local;

pub use inventory::{Inventory, InventoryError, Node, Slot};
pub use local::{LocalHandle, LocalJobLauncher, LocalLauncher, LocalRanks};

use std::path::PathBuf;

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

/// Starts and stops every rank of one attempt of a job: the coordinator's
/// view of a launcher. Object-safe, so the coordinator holds whichever it
/// was configured with (local processes; Slurm later).
pub trait JobLauncher: Send + Sync {
    /// Starts one worker per spec (in rank order). On failure nothing
    /// started is left running.
    fn start(&self, ranks: &[LaunchSpec]) -> Result<Box<dyn Ranks>, LaunchError>;
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
    /// Whether every rank has ended.
    fn all_ended(&mut self) -> bool {
        (0..self.len()).all(|r| !matches!(self.exit(r), Ok(None)))
    }
    /// The last `n` lines of rank `rank`'s log.
    fn log_tail(&self, rank: usize, n: usize) -> Vec<String>;
}
