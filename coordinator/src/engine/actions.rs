//! What the engine decides under its lock and does outside it: starting
//! an attempt's ranks (spawning processes, `sbatch`), asking them to stop
//! (signals, `scancel`), killing them, and looking at how they are. Each
//! action runs on a blocking thread of its own; a launcher command that
//! hangs holds that thread and that attempt's handle, nothing else.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use strata_cluster::{Exit, JobLauncher, LaunchSpec, Lost, Ranks, Slot, SlurmOptions, StartInfo};

use crate::job::{JobId, JobRecord};

/// An attempt's processes, as the launcher handed them over. Touched only
/// outside the engine's lock: every call may block.
pub(crate) struct RanksHandle {
    inner: Mutex<HandleState>,
}

enum HandleState {
    /// The launcher is starting the ranks; a stop asked for meanwhile is
    /// done as soon as they are started.
    Launching { stop: Option<StopKind> },
    Started {
        ranks: Box<dyn Ranks>,
        /// Ranks whose exit and log lines were already read.
        seen: HashSet<usize>,
    },
    /// The launcher could not start them: nothing runs.
    Failed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StopKind {
    Terminate,
    Kill,
}

/// How an attempt's processes are, as one look found them.
#[derive(Debug, Default)]
pub(crate) struct Observation {
    pub exits: Vec<(usize, Exit)>,
    /// The last log lines of ranks seen ended for the first time (a few).
    pub tails: Vec<(usize, Vec<String>)>,
    pub lost: Option<Lost>,
    pub waiting: Option<String>,
    pub all_ended: bool,
}

/// Ranks whose log lines one look reads, at most: a node lost at once
/// ends hundreds of ranks, and the first few tell the story.
const TAILS_PER_LOOK: usize = 3;
const TAIL_LINES: usize = 20;

impl RanksHandle {
    pub fn launching() -> RanksHandle {
        RanksHandle {
            inner: Mutex::new(HandleState::Launching { stop: None }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HandleState> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The launcher started the ranks: keep them, and stop them at once
    /// if a stop came meanwhile.
    pub fn started(&self, mut ranks: Box<dyn Ranks>) {
        let mut inner = self.lock();
        if let HandleState::Launching { stop: Some(kind) } = &*inner {
            match kind {
                StopKind::Terminate => ranks.terminate(),
                StopKind::Kill => ranks.kill(),
            }
        }
        *inner = HandleState::Started {
            ranks,
            seen: HashSet::new(),
        };
    }

    pub fn failed(&self) {
        *self.lock() = HandleState::Failed;
    }

    /// SIGTERM (or SIGKILL) to every rank; may block (`scancel`).
    pub fn stop(&self, kind: StopKind) {
        let mut inner = self.lock();
        match &mut *inner {
            HandleState::Launching { stop } => {
                if *stop != Some(StopKind::Kill) {
                    *stop = Some(kind);
                }
            }
            HandleState::Started { ranks, .. } => match kind {
                StopKind::Terminate => ranks.terminate(),
                StopKind::Kill => ranks.kill(),
            },
            HandleState::Failed => {}
        }
    }

    /// One look at the processes, unless another call holds them (a
    /// command in flight) or they are still being started: `None` then,
    /// and the next tick looks again.
    pub fn observe(&self) -> Option<Observation> {
        let mut inner = self.inner.try_lock().ok()?;
        match &mut *inner {
            HandleState::Launching { .. } => None,
            HandleState::Failed => Some(Observation {
                all_ended: true,
                ..Observation::default()
            }),
            HandleState::Started { ranks, seen } => {
                let mut obs = Observation {
                    lost: ranks.lost(),
                    waiting: ranks.waiting(),
                    ..Observation::default()
                };
                match ranks.poll_exits() {
                    Ok(exits) => obs.exits = exits,
                    Err(e) => tracing::warn!(error = %e, "cannot poll the ranks' processes"),
                }
                for (r, _) in &obs.exits {
                    if seen.insert(*r) && obs.tails.len() < TAILS_PER_LOOK {
                        obs.tails.push((*r, ranks.log_tail(*r, TAIL_LINES)));
                    }
                }
                obs.all_ended = obs.exits.len() == ranks.len() || ranks.all_ended();
                Some(obs)
            }
        }
    }
}

/// Everything needed to start an attempt's ranks, decided under the lock;
/// the specs themselves (one per rank: 16,384 command lines) are built
/// outside it.
pub(crate) struct LaunchPlan {
    pub job: Arc<JobRecord>,
    pub attempt: u32,
    pub slots: Vec<Slot>,
    pub worker_url: String,
    pub worker_program: PathBuf,
    pub worker_args: Vec<String>,
    pub worker_env: Vec<(String, String)>,
    /// Each CPU worker's threads, when this machine's cores are shared.
    pub threads: Option<usize>,
    /// The launch span's W3C trace context, for the workers' spans.
    pub traceparent: Option<String>,
}

impl LaunchPlan {
    pub fn specs(&self) -> Vec<LaunchSpec> {
        let job = &self.job;
        let mut on_node: HashMap<&str, u32> = HashMap::new();
        let mut specs = Vec::with_capacity(self.slots.len());
        let dir = PathBuf::from(&job.run_dir).join(format!("attempt-{}", self.attempt));
        for (rank, slot) in self.slots.iter().enumerate() {
            // The rank's index among this job's ranks on its node.
            let local_rank = on_node.entry(slot.node.as_str()).or_default();
            let mut args = self.worker_args.clone();
            args.extend([
                "--coordinator".into(),
                self.worker_url.clone(),
                "--job".into(),
                job.job_id.to_string(),
                "--attempt".into(),
                self.attempt.to_string(),
            ]);
            let mut env = self.worker_env.clone();
            env.push(("STRATA_JOB_TOKEN".into(), job.worker_token.clone()));
            env.push(("STRATA_RANK".into(), rank.to_string()));
            env.push(("STRATA_LOCAL_RANK".into(), local_rank.to_string()));
            *local_rank += 1;
            if let Some(t) = self.threads {
                env.push(("RAYON_NUM_THREADS".into(), t.max(1).to_string()));
            }
            if let Some(parent) = &self.traceparent {
                env.push(("TRACEPARENT".into(), parent.clone()));
            }
            specs.push(LaunchSpec {
                rank: rank as u32,
                slot: slot.clone(),
                program: self.worker_program.clone(),
                args,
                env,
                log_path: dir.join(format!("rank-{rank}.log")),
            });
        }
        specs
    }

    pub fn info(&self) -> StartInfo {
        let slurm = self
            .job
            .recipe
            .as_ref()
            .map(|r| r.slurm.clone())
            .unwrap_or_default();
        StartInfo {
            job: self.job.job_id.to_string(),
            attempt: self.attempt,
            slurm: SlurmOptions {
                partition: slurm.partition,
                account: slurm.account,
                qos: slurm.qos,
                time: slurm.time,
            },
        }
    }
}

/// An action the engine has decided on.
pub(crate) enum Action {
    Launch {
        plan: Box<LaunchPlan>,
        handle: Arc<RanksHandle>,
        span: tracing::Span,
        /// The write that records the attempt: nothing starts before it
        /// is on disk.
        recorded: crate::store::Ticket,
        /// The job's record before the attempt, put back if that write
        /// fails.
        before: Arc<JobRecord>,
    },
    Stop {
        job: JobId,
        handle: Arc<RanksHandle>,
        kind: StopKind,
    },
}

/// Starts an attempt's ranks: the launcher's call, on this (blocking)
/// thread. Returns why it failed, if it did.
pub(crate) fn launch(
    launcher: &dyn JobLauncher,
    plan: &LaunchPlan,
    handle: &RanksHandle,
    span: &tracing::Span,
) -> Result<(), String> {
    let _in = span.enter();
    let specs = plan.specs();
    let started = tracing::info_span!("start_ranks", launcher = %launcher.describe())
        .in_scope(|| launcher.start(&specs, &plan.info()));
    match started {
        Ok(ranks) => {
            tracing::info!(job = %plan.job.job_id, world = specs.len(), attempt = plan.attempt, "launched workers");
            handle.started(ranks);
            Ok(())
        }
        Err(e) => {
            handle.failed();
            Err(e.to_string())
        }
    }
}
