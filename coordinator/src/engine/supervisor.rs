//! One supervisor per attempt whose processes are alive: the engine's
//! bookkeeping of its ranks (registrations, heartbeats, progress, exits
//! as the last look saw them, the checkpoints being reported) and the
//! decisions that follow (a rank that ended, went silent or hung). It
//! never calls the launcher: its [`RanksHandle`] is used outside the
//! lock, by the actions and the monitor's looks.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use strata_cluster::{Exit, Lost, Slot};
use strata_dataplane::checkpoint::{Manifest, ShardRecord};
use strata_recipe::Layout;
use tokio::sync::watch;

use super::actions::{Observation, RanksHandle};
use crate::job::JobId;
use crate::ranges::ranks_named;

/// A checkpoint being written: what each rank reported.
#[derive(Default)]
pub(crate) struct PendingCheckpoint {
    pub reported: HashSet<u32>,
    /// Rank 0's manifest, without shards.
    pub manifest: Option<Manifest>,
    pub shards: Vec<ShardRecord>,
    pub failures: Vec<String>,
    pub stall_s: f64,
    pub write_s: f64,
}

/// Where an attempt's processes are in their life.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Phase {
    /// Being started by the launcher, or running.
    Running,
    /// Asked to stop (SIGTERM at `since`); killed at `kill_at`.
    Stopping {
        since: Instant,
        kill_at: Instant,
        killed: bool,
    },
}

/// What a rank is busy with, as its heartbeats say.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Activity {
    #[default]
    Step,
    Setup,
    Eval,
    Checkpoint,
}

/// What every rank of an attempt is told, the same for all: built once
/// per attempt.
#[derive(Debug, Clone)]
pub struct AssignmentBase {
    pub job_id: JobId,
    pub layout: Layout,
    pub microbatches: u32,
    pub spec_toml: Arc<str>,
    pub run_dir: String,
    pub attempt: u32,
    /// Continue from a checkpoint: its step (0: the latest complete one).
    pub resume_from: Option<u64>,
    /// The job whose checkpoint it is, when not this one's.
    pub resume_from_job: Option<String>,
    pub kind: crate::job::JobKind,
}

/// A rank's assignment: the attempt's base and its address table, built
/// once when the last rank registered.
#[derive(Debug, Clone)]
pub struct Assignment {
    pub base: Arc<AssignmentBase>,
    /// Every rank's collective endpoint, by rank.
    pub addrs: Arc<Vec<String>>,
    pub rank: u32,
}

/// The rendezvous to publish: its channel and the address table.
pub(crate) type Publish = (Arc<watch::Sender<Rendezvous>>, Arc<Vec<String>>);

/// The rendezvous as waiters see it.
#[derive(Debug, Clone)]
pub(crate) enum Rendezvous {
    Waiting,
    Ready(Arc<Vec<String>>),
    /// The attempt ended before every rank registered.
    Ended(String),
}

/// Where one rank's step went, in seconds.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct RankStep {
    pub step: u64,
    pub wall_s: f64,
    pub data_s: f64,
    pub forward_s: f64,
    pub backward_s: f64,
    pub all_reduce_s: f64,
    pub optimizer_s: f64,
}

/// One rank of a live attempt, copied out of the lock for views.
#[derive(Debug, Clone, Copy)]
pub struct RankRow {
    pub rank: u32,
    /// Index into [`RanksSnapshot::nodes`].
    pub node: u32,
    pub gpu: Option<u32>,
    pub registered: bool,
    pub heartbeat_age_s: f64,
    pub step: u64,
    pub step_age_s: f64,
    pub done: bool,
    pub activity: Activity,
    pub last_step: Option<RankStep>,
}

/// Every rank of a live attempt, as it is now.
#[derive(Debug, Clone, Default)]
pub struct RanksSnapshot {
    pub layout: Option<Layout>,
    pub nodes: Vec<Arc<str>>,
    pub rows: Vec<RankRow>,
    /// Each rank's collective endpoint (empty before it registered).
    pub addrs: Vec<String>,
}

/// Why an attempt cannot go on, and the ranks to blame (none when the
/// whole attempt went).
#[derive(Debug, Clone)]
pub(crate) struct Failure {
    pub cause: String,
    pub culprits: Vec<u32>,
    pub interruption: bool,
}

/// How long a rank's own failure report waits for a peer's exit to show
/// (a broken link is usually the symptom of a peer that died).
const REPORT_GRACE: Duration = Duration::from_secs(1);

/// The shortest hang timeout the adaptive clock uses: a step may stall
/// for a slow data read or a garbage collection.
pub(crate) const HANG_FLOOR: Duration = Duration::from_secs(60);
/// A step is hung once it takes this many times the slowest recent step.
pub(crate) const HANG_MULTIPLE: f64 = 10.0;
/// Step durations remembered for the hang clock.
const RECENT_STEPS: usize = 100;

pub(crate) struct Supervisor {
    pub attempt: u32,
    pub world: usize,
    /// The slots (and GPUs) leased to the attempt's ranks, in rank order,
    /// until its processes are gone.
    pub slots: Vec<Slot>,
    /// Each rank's node, as an index into `nodes`.
    node_of: Vec<u32>,
    pub nodes: Vec<Arc<str>>,
    pub handle: Arc<RanksHandle>,
    pub phase: Phase,
    /// Whether the launcher has handed over the processes.
    pub launched: bool,
    pub base: Arc<AssignmentBase>,
    addrs: Vec<Option<String>>,
    registered: usize,
    /// The attempt's address table, once every rank has registered.
    table: Option<Arc<Vec<String>>>,
    pub rendezvous: Arc<watch::Sender<Rendezvous>>,
    heartbeat: Vec<Instant>,
    /// Each rank's last reported step and when it last moved.
    progress: Vec<(u64, Instant)>,
    activity: Vec<Activity>,
    pub done: Vec<bool>,
    done_count: usize,
    /// Each rank's last finished step's split, as its heartbeats said.
    pub last_steps: Vec<Option<RankStep>>,
    /// How each rank's process ended, as the last look saw it.
    exits: Vec<Option<Exit>>,
    tails: BTreeMap<usize, Vec<String>>,
    lost: Option<Lost>,
    pub all_ended: bool,
    /// Ranks that reported their own failure, and when.
    reports: Vec<(u32, String, Instant)>,
    pub checkpoints: BTreeMap<u64, PendingCheckpoint>,
    /// Why the ranks have not started, while they wait.
    pub waiting: Option<String>,
    /// The launcher took the ranks back on its schedule (a time limit, a
    /// preemption): the attempt ends without counting as a failure.
    pub interruption: bool,
    /// The recipe's hang timeout: the adaptive clock's cap.
    hang_cap: Duration,
    /// Recent steps' durations, and when the job's step last moved.
    recent: VecDeque<f64>,
    last_report: Option<(u64, Instant)>,
    /// When the ranks were last scanned for silence and hangs (once a
    /// second: the timeouts are tens of seconds).
    scanned: Option<Instant>,
    /// Since when ranks of several nodes are seen ended at once.
    mass_exit: Option<Instant>,
}

/// How long ranks of several nodes that ended at once wait for their
/// launcher to say why (a node failure, a preemption) before their exits
/// are the cause: the cluster's word names what happened, the exits only
/// that it did.
const MASS_EXIT_GRACE: Duration = Duration::from_secs(2);

/// How often the ranks are scanned for silence and hangs.
const SCAN: Duration = Duration::from_secs(1);

impl Supervisor {
    pub fn new(
        base: Arc<AssignmentBase>,
        slots: Vec<Slot>,
        handle: Arc<RanksHandle>,
        first_step: u64,
        hang_cap: Duration,
    ) -> Supervisor {
        let n = slots.len();
        let now = Instant::now();
        let mut nodes: Vec<Arc<str>> = Vec::new();
        let mut index: std::collections::HashMap<&str, u32> = std::collections::HashMap::new();
        let mut node_of = Vec::with_capacity(n);
        for s in &slots {
            let i = *index.entry(s.node.as_str()).or_insert_with(|| {
                nodes.push(Arc::from(s.node.as_str()));
                nodes.len() as u32 - 1
            });
            node_of.push(i);
        }
        Supervisor {
            attempt: base.attempt,
            world: n,
            slots,
            node_of,
            nodes,
            handle,
            phase: Phase::Running,
            launched: false,
            base,
            addrs: vec![None; n],
            registered: 0,
            table: None,
            rendezvous: Arc::new(watch::Sender::new(Rendezvous::Waiting)),
            heartbeat: vec![now; n],
            progress: vec![(first_step, now); n],
            activity: vec![Activity::Setup; n],
            done: vec![false; n],
            done_count: 0,
            last_steps: vec![None; n],
            exits: vec![None; n],
            tails: BTreeMap::new(),
            lost: None,
            all_ended: false,
            reports: Vec::new(),
            checkpoints: BTreeMap::new(),
            waiting: Some("the launcher is starting the ranks".into()),
            interruption: false,
            hang_cap,
            recent: VecDeque::new(),
            last_report: None,
            scanned: None,
            mass_exit: None,
        }
    }

    pub fn is_running(&self) -> bool {
        self.phase == Phase::Running
    }

    pub fn node_of(&self, rank: usize) -> &str {
        &self.nodes[self.node_of[rank] as usize]
    }

    /// Rank `rank` registered with its collective endpoint. Once every
    /// rank has, the address table is made (once, by moving the
    /// endpoints): the caller publishes it to the waiters, outside the
    /// lock (waking 16,384 of them takes a while).
    pub fn register(&mut self, rank: usize, addr: String) -> Option<Publish> {
        if self.table.is_some() {
            // Registered again after the table was made: a rank's second
            // process. Its peers already have the first's endpoint.
            self.beat(rank, None);
            return None;
        }
        if self.addrs[rank].is_none() {
            self.registered += 1;
        }
        self.addrs[rank] = Some(addr);
        self.beat(rank, None);
        if self.registered < self.world {
            return None;
        }
        let table: Vec<String> = std::mem::take(&mut self.addrs)
            .into_iter()
            .map(Option::unwrap_or_default)
            .collect();
        let table = Arc::new(table);
        self.table = Some(table.clone());
        Some((self.rendezvous.clone(), table))
    }

    /// A heartbeat (or any call) from `rank`, at `step`; the time since
    /// its last one.
    pub fn beat(&mut self, rank: usize, step: Option<u64>) -> Duration {
        let now = Instant::now();
        let gap = now.saturating_duration_since(self.heartbeat[rank]);
        self.heartbeat[rank] = now;
        if let Some(step) = step
            && step > self.progress[rank].0
        {
            self.progress[rank] = (step, now);
        }
        gap
    }

    pub fn set_activity(&mut self, rank: usize, a: Activity) {
        self.activity[rank] = a;
    }

    /// Rank `rank` finished its work; whether every rank has now.
    pub fn finish(&mut self, rank: usize) -> bool {
        if !self.done[rank] {
            self.done[rank] = true;
            self.done_count += 1;
        }
        self.done_count == self.world
    }

    /// How many ranks have finished their work.
    pub fn finished(&self) -> usize {
        self.done_count
    }

    /// A rank reported its own failure: the cause, unless a peer's exit
    /// shows within a second (then that is, and this report follows it).
    pub fn report_failure(&mut self, rank: u32, error: String) {
        if !self.reports.iter().any(|r| r.0 == rank) {
            self.reports.push((rank, error, Instant::now()));
        }
    }

    /// Rank 0's step metrics arrived, up to `step`: the hang clock learns
    /// how long steps take.
    pub fn stepped(&mut self, step: u64) {
        let now = Instant::now();
        if let Some((last, at)) = self.last_report
            && step > last
        {
            let per = now.duration_since(at).as_secs_f64() / (step - last) as f64;
            self.recent.push_back(per);
            if self.recent.len() > RECENT_STEPS {
                self.recent.pop_front();
            }
        }
        if self.last_report.is_none_or(|(last, _)| step > last) {
            self.last_report = Some((step, now));
        }
    }

    /// The hang timeout now: the recipe's value until a few steps have
    /// been seen, then a multiple of the slowest recent step (never below
    /// a minute), capped by the recipe's value.
    pub fn hang_timeout(&self) -> Duration {
        if self.recent.len() < 3 {
            return self.hang_cap;
        }
        let slowest = self.recent.iter().copied().fold(0.0, f64::max);
        let adaptive = HANG_FLOOR.max(Duration::from_secs_f64(HANG_MULTIPLE * slowest));
        adaptive.min(self.hang_cap)
    }

    /// Records a look at the processes (made outside the lock).
    pub fn observe(&mut self, obs: Observation) {
        for (r, e) in obs.exits {
            if r < self.world && self.exits[r].is_none() {
                self.exits[r] = Some(e);
            }
        }
        for (r, t) in obs.tails {
            self.tails.entry(r).or_insert(t);
        }
        if self.lost.is_none() {
            self.lost = obs.lost;
        }
        if self.launched {
            self.waiting = obs.waiting;
        }
        self.all_ended = obs.all_ended;
    }

    /// The attempt's allocation went: the cause, and the ranks on the
    /// nodes the cluster says failed.
    fn lost_failure(&self, lost: &Lost) -> Failure {
        let culprits = (0..self.world)
            .filter(|&r| lost.nodes.iter().any(|n| n == self.node_of(r)))
            .map(|r| r as u32)
            .collect();
        Failure {
            cause: lost.cause.clone(),
            culprits,
            interruption: lost.interruption,
        }
    }

    /// The ranks whose processes ended before they finished, other than
    /// those that reported their own failure, as a cause.
    fn ended_early(&mut self, reporters: &[u32]) -> Option<Failure> {
        if let Some(lost) = &self.lost {
            return Some(self.lost_failure(lost));
        }
        let ended: Vec<(usize, Exit)> = self
            .exits
            .iter()
            .enumerate()
            .filter_map(|(r, e)| Some((r, e.clone()?)))
            .filter(|(r, _)| !self.done[*r] && !reporters.contains(&(*r as u32)))
            .collect();
        let (first, exit) = ended.first().cloned()?;
        let ranks: Vec<u32> = ended.iter().map(|(r, _)| *r as u32).collect();
        let same = ended.iter().all(|(_, e)| *e == exit);
        let several = ended
            .iter()
            .any(|(r, _)| self.node_of[*r] != self.node_of[first]);
        if several {
            let since = *self.mass_exit.get_or_insert_with(Instant::now);
            if since.elapsed() < MASS_EXIT_GRACE {
                return None;
            }
        }
        let nodes = self.nodes_of(&ranks);
        let how = if same {
            exit.to_string()
        } else {
            format!("rank {first}: {exit}")
        };
        let mut cause = if ranks.len() == 1 {
            format!("rank {first} ended ({how}) before finishing")
        } else {
            format!(
                "{} on {nodes} ended ({how}) before finishing",
                ranks_named(ranks.iter().copied()),
            )
        };
        if let Some((r, tail)) = self
            .tails
            .iter()
            .find(|(r, t)| !t.is_empty() && ranks.contains(&(**r as u32)))
        {
            cause.push_str(&format!(
                "; rank {r}'s last log lines:\n{}",
                tail.join("\n")
            ));
        }
        Some(Failure {
            cause,
            culprits: ranks,
            interruption: false,
        })
    }

    /// Why a running attempt cannot go on: its allocation went, a process
    /// ended, a rank reported a failure, ranks went silent past
    /// `heartbeat_timeout` (their process stopped or their machine is
    /// gone), or ranks' steps stopped moving for the hang timeout (their
    /// heartbeat thread lives, their training does not).
    pub fn check(&mut self, heartbeat_timeout: Duration) -> Option<Failure> {
        if !self.is_running() {
            return None;
        }
        let now = Instant::now();
        // Ranks not started yet (being launched, or an allocation in
        // Slurm's queue) are not silent, nor hung: their clocks start
        // when they do.
        if !self.launched || self.waiting.is_some() {
            if let Some(lost) = &self.lost {
                return Some(self.lost_failure(lost));
            }
            self.heartbeat.fill(now);
            self.progress.iter_mut().for_each(|p| p.1 = now);
            return None;
        }
        let reporters: Vec<u32> = self.reports.iter().map(|r| r.0).collect();
        if let Some(mut f) = self.ended_early(&reporters) {
            if let Some((r, e, _)) = self.reports.first() {
                f.cause.push_str(&format!("\n(then rank {r}: {e})"));
            }
            return Some(f);
        }
        if let Some((r, e, at)) = self.reports.first()
            && now.duration_since(*at) >= REPORT_GRACE
        {
            return Some(Failure {
                cause: format!("rank {r}: {e}"),
                culprits: Vec::new(),
                interruption: false,
            });
        }
        if self.scanned.is_some_and(|t| now.duration_since(t) < SCAN) {
            return None;
        }
        self.scanned = Some(now);
        // Silent ranks, named as ranges with their nodes.
        let silent: Vec<u32> = (0..self.world)
            .filter(|&r| !self.done[r] && now.duration_since(self.heartbeat[r]) > heartbeat_timeout)
            .map(|r| r as u32)
            .collect();
        if !silent.is_empty() {
            let longest = silent
                .iter()
                .map(|&r| now.duration_since(self.heartbeat[r as usize]))
                .max()
                .unwrap_or_default();
            return Some(Failure {
                cause: format!(
                    "{} sent no heartbeat for {:.0} s (limit {:.0} s; {})",
                    ranks_named(silent.iter().copied()),
                    longest.as_secs_f64(),
                    heartbeat_timeout.as_secs_f64(),
                    self.nodes_of(&silent),
                ),
                culprits: silent,
                interruption: false,
            });
        }
        self.hung(now)
    }

    /// `node n3` or `nodes n3, n4`: where `ranks` run.
    fn nodes_of(&self, ranks: &[u32]) -> String {
        let mut nodes: Vec<&str> = ranks.iter().map(|&r| self.node_of(r as usize)).collect();
        nodes.sort_unstable();
        nodes.dedup();
        let shown: Vec<&str> = nodes.iter().take(8).copied().collect();
        format!(
            "{} {}{}",
            if nodes.len() == 1 { "node" } else { "nodes" },
            shown.join(", "),
            if nodes.len() > 8 {
                format!(" and {} more", nodes.len() - 8)
            } else {
                String::new()
            }
        )
    }

    /// Whether the job's step has stopped moving for the hang timeout.
    /// One hung rank soon holds up every other in a collective, so the
    /// ranks furthest behind are named: the culprit is among them.
    fn hung(&self, now: Instant) -> Option<Failure> {
        let live: Vec<usize> = (0..self.world).filter(|&r| !self.done[r]).collect();
        let longest = live
            .iter()
            .map(|&r| now.duration_since(self.progress[r].1))
            .max()?;
        // An evaluation or a checkpoint save may take longer than steps
        // do: only the recipe's value judges a rank busy with one.
        let busy = live.iter().any(|&r| {
            matches!(
                self.activity[r],
                Activity::Eval | Activity::Checkpoint | Activity::Setup
            )
        });
        let timeout = if busy {
            self.hang_cap
        } else {
            self.hang_timeout()
        };
        if longest <= timeout {
            return None;
        }
        let lowest = live.iter().map(|&r| self.progress[r].0).min()?;
        let behind: Vec<u32> = live
            .iter()
            .filter(|&&r| self.progress[r].0 == lowest)
            .map(|&r| r as u32)
            .collect();
        let ahead: Vec<u32> = live
            .iter()
            .filter(|&&r| self.progress[r].0 > lowest)
            .map(|&r| r as u32)
            .collect();
        let clock = if timeout < self.hang_cap {
            format!(
                "adapted to {:.0} s: {HANG_MULTIPLE} × the slowest recent step; [fault] hang_timeout_s = {}",
                timeout.as_secs_f64(),
                self.hang_cap.as_secs()
            )
        } else {
            format!("[fault] hang_timeout_s = {}", self.hang_cap.as_secs())
        };
        let cause = if ahead.is_empty() {
            format!(
                "hung: {}{} stayed at step {lowest} for {:.0} s ({clock})",
                ranks_named(behind.iter().copied()),
                if behind.len() > 1 { " all" } else { "" },
                longest.as_secs_f64(),
            )
        } else {
            let waiting_at = live
                .iter()
                .map(|&r| self.progress[r].0)
                .max()
                .unwrap_or(lowest);
            format!(
                "hung: {} waited at step {waiting_at} on {} ({}), whose step stayed at {lowest} for {:.0} s ({clock})",
                ranks_named(ahead.iter().copied()),
                ranks_named(behind.iter().copied()),
                self.nodes_of(&behind),
                longest.as_secs_f64(),
            )
        };
        // The ranks behind are to blame when they are the few.
        let culprits = if behind.len() * 2 < live.len() {
            behind
        } else {
            Vec::new()
        };
        Some(Failure {
            cause,
            culprits,
            interruption: false,
        })
    }

    /// Copies the ranks out for a view.
    pub fn snapshot(&self, layout: Layout) -> RanksSnapshot {
        let now = Instant::now();
        RanksSnapshot {
            layout: Some(layout),
            nodes: self.nodes.clone(),
            rows: (0..self.world)
                .map(|r| RankRow {
                    rank: r as u32,
                    node: self.node_of[r],
                    gpu: self.slots[r].gpu,
                    registered: self.table.is_some() || self.addrs[r].is_some(),
                    heartbeat_age_s: now.duration_since(self.heartbeat[r]).as_secs_f64(),
                    step: self.progress[r].0,
                    step_age_s: now.duration_since(self.progress[r].1).as_secs_f64(),
                    done: self.done[r],
                    activity: self.activity[r],
                    last_step: self.last_steps[r],
                })
                .collect(),
            addrs: match &self.table {
                Some(t) => t.to_vec(),
                None => self
                    .addrs
                    .iter()
                    .map(|a| a.clone().unwrap_or_default())
                    .collect(),
            },
        }
    }

    /// Asks for the processes to stop: the caller sends the stop (outside
    /// the lock); they are killed at `grace`'s end. Waiters for the
    /// rendezvous are told it will not come.
    pub fn stop(&mut self, grace: Duration) -> bool {
        if let Phase::Stopping { .. } = self.phase {
            return false;
        }
        let now = Instant::now();
        self.phase = Phase::Stopping {
            since: now,
            kill_at: now + grace,
            killed: false,
        };
        self.rendezvous.send_if_modified(|r| {
            if matches!(r, Rendezvous::Waiting) {
                *r = Rendezvous::Ended(format!("attempt {} has ended", self.attempt));
                true
            } else {
                false
            }
        });
        true
    }

    /// For a stopping attempt: whether it is time to kill what is left
    /// (once).
    pub fn due_for_kill(&mut self) -> bool {
        match &mut self.phase {
            Phase::Stopping {
                kill_at, killed, ..
            } if !*killed && Instant::now() >= *kill_at => {
                *killed = true;
                true
            }
            _ => false,
        }
    }
}
