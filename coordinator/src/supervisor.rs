//! One supervisor per attempt: its worker processes, their registrations,
//! heartbeats and progress, the checkpoints being written, and the
//! stopping of its processes (SIGTERM, then SIGKILL after a grace period).

use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

use strata_cluster::{Ranks, Slot};
use strata_dataplane::checkpoint::{Manifest, ShardRecord};

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
    Running,
    /// Asked to stop (SIGTERM at `since`); killed at `kill_at`.
    Stopping {
        since: Instant,
        kill_at: Instant,
    },
}

pub(crate) struct Supervisor {
    pub attempt: u32,
    /// The slots (and GPUs) leased to the attempt's ranks, in rank order,
    /// until its processes are gone.
    pub slots: Vec<Slot>,
    ranks: Box<dyn Ranks>,
    /// Each rank's collective endpoint, once registered.
    pub addrs: Vec<Option<String>>,
    heartbeat: Vec<Instant>,
    /// Each rank's last reported step and when it last moved.
    progress: Vec<(u64, Instant)>,
    pub done: Vec<bool>,
    /// Each rank's last finished step's split, as its heartbeats said.
    pub last_steps: Vec<Option<RankStep>>,
    pub checkpoints: BTreeMap<u64, PendingCheckpoint>,
    pub phase: Phase,
    hang_timeout: Duration,
    /// Why the ranks have not started, while they wait.
    pub waiting: Option<String>,
    /// The launcher took the ranks back on its schedule (a time limit, a
    /// preemption): the attempt ends without counting as a failure.
    pub interruption: bool,
}

/// One rank of a live attempt as the dashboard shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct RankView {
    pub rank: u32,
    pub node: String,
    pub gpu: Option<u32>,
    /// Its collective endpoint, once registered.
    pub addr: Option<String>,
    /// Seconds since its last heartbeat.
    pub heartbeat_age_s: f64,
    /// Its last reported step, and seconds since that moved.
    pub step: u64,
    pub step_age_s: f64,
    pub done: bool,
    /// Its last finished step's split, from its heartbeats.
    pub last_step: Option<RankStep>,
}

/// Where one rank's step went, in seconds.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub(crate) struct RankStep {
    pub step: u64,
    pub wall_s: f64,
    pub data_s: f64,
    pub forward_s: f64,
    pub backward_s: f64,
    pub all_reduce_s: f64,
    pub optimizer_s: f64,
}

impl Supervisor {
    pub fn new(
        attempt: u32,
        slots: Vec<Slot>,
        ranks: Box<dyn Ranks>,
        first_step: u64,
        hang_timeout: Duration,
    ) -> Supervisor {
        let n = ranks.len();
        let now = Instant::now();
        Supervisor {
            attempt,
            slots,
            ranks,
            addrs: vec![None; n],
            heartbeat: vec![now; n],
            progress: vec![(first_step, now); n],
            done: vec![false; n],
            last_steps: vec![None; n],
            checkpoints: BTreeMap::new(),
            phase: Phase::Running,
            hang_timeout,
            waiting: None,
            interruption: false,
        }
    }

    /// Each rank's placement, heartbeat and progress, now.
    pub fn ranks_view(&self) -> Vec<RankView> {
        let now = Instant::now();
        (0..self.done.len())
            .map(|r| RankView {
                rank: r as u32,
                node: self
                    .slots
                    .get(r)
                    .map_or_else(String::new, |s| s.node.clone()),
                gpu: self.slots.get(r).and_then(|s| s.gpu),
                addr: self.addrs[r].clone(),
                heartbeat_age_s: now.duration_since(self.heartbeat[r]).as_secs_f64(),
                step: self.progress[r].0,
                step_age_s: now.duration_since(self.progress[r].1).as_secs_f64(),
                done: self.done[r],
                last_step: self.last_steps[r],
            })
            .collect()
    }

    pub fn is_running(&self) -> bool {
        self.phase == Phase::Running
    }

    /// A heartbeat (or any call) from `rank`, at `step`.
    /// Records rank `rank`'s heartbeat; the time since its last one.
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

    /// The first rank (other than `except`) whose process ended before it
    /// finished, with its exit status and last log lines.
    pub fn ended_early(&mut self, except: Option<usize>) -> Option<String> {
        // The whole attempt went (its allocation ended): that is the
        // cause, whatever each rank's exit says.
        if let Some(lost) = self.ranks.lost() {
            self.interruption = lost.interruption;
            return Some(lost.cause);
        }
        for r in 0..self.ranks.len() {
            if Some(r) == except || self.done[r] {
                continue;
            }
            match self.ranks.exit(r) {
                Ok(Some(exit)) => {
                    return Some(format!(
                        "rank {r} ended ({exit}) before finishing; last log lines:\n{}",
                        self.ranks.log_tail(r, 20).join("\n")
                    ));
                }
                Ok(None) => {}
                Err(e) => return Some(e.to_string()),
            }
        }
        None
    }

    /// Why a running attempt cannot go on: a process that ended, a rank
    /// silent past `heartbeat_timeout` (the process is stopped or its
    /// machine is gone), or a rank whose step has not moved for the hang
    /// timeout (its heartbeat thread lives, its training does not).
    pub fn check(&mut self, heartbeat_timeout: Duration) -> Option<String> {
        if !self.is_running() {
            return None;
        }
        // Ranks not started yet (an allocation in Slurm's queue) are not
        // silent, nor hung: their clocks start when they do.
        if let Some(why) = self.ranks.waiting() {
            let now = Instant::now();
            if self.waiting.as_deref() != Some(why.as_str()) {
                tracing::info!(attempt = self.attempt, reason = %why, "waiting for the attempt's ranks to start");
                self.waiting = Some(why);
            }
            self.heartbeat.fill(now);
            self.progress.iter_mut().for_each(|p| p.1 = now);
            return None;
        }
        self.waiting = None;
        if let Some(why) = self.ended_early(None) {
            return Some(why);
        }
        for r in 0..self.ranks.len() {
            if self.done[r] {
                continue;
            }
            let silent = self.heartbeat[r].elapsed();
            if silent > heartbeat_timeout {
                return Some(format!(
                    "rank {r} sent no heartbeat for {:.0} s (limit {:.0} s)",
                    silent.as_secs_f64(),
                    heartbeat_timeout.as_secs_f64()
                ));
            }
        }
        self.hung()
    }

    /// Whether a rank's step has not moved for the hang timeout. One hung
    /// rank soon holds up every other in a collective, so the ranks
    /// furthest behind are named: the culprit is among them.
    fn hung(&self) -> Option<String> {
        let live: Vec<(usize, u64, Duration)> = (0..self.progress.len())
            .filter(|&r| !self.done[r])
            .map(|r| (r, self.progress[r].0, self.progress[r].1.elapsed()))
            .collect();
        let longest = live.iter().map(|s| s.2).max()?;
        if longest <= self.hang_timeout {
            return None;
        }
        let lowest = live.iter().map(|s| s.1).min()?;
        let behind: Vec<String> = live
            .iter()
            .filter(|s| s.1 == lowest)
            .map(|s| s.0.to_string())
            .collect();
        Some(format!(
            "hung: the step of rank{} {} has stayed at {lowest} for {:.0} s ([fault] hang_timeout_s = {})",
            if behind.len() == 1 { "" } else { "s" },
            behind.join(", "),
            longest.as_secs_f64(),
            self.hang_timeout.as_secs()
        ))
    }

    /// Asks every process to stop now (SIGTERM) and to be gone within
    /// `grace` (then SIGKILL).
    pub fn stop(&mut self, grace: Duration) {
        if let Phase::Stopping { .. } = self.phase {
            return;
        }
        let now = Instant::now();
        self.ranks.terminate();
        self.phase = Phase::Stopping {
            since: now,
            kill_at: now + grace,
        };
    }

    /// For a stopping attempt: kills what outlived its grace period.
    /// True once every process has ended.
    pub fn wind_down(&mut self) -> bool {
        match self.phase {
            Phase::Running => false,
            Phase::Stopping { since, kill_at } => {
                if self.ranks.all_ended() {
                    tracing::debug!(
                        attempt = self.attempt,
                        after_s = since.elapsed().as_secs_f64(),
                        "every worker of the attempt has ended"
                    );
                    return true;
                }
                if Instant::now() >= kill_at {
                    tracing::warn!(
                        attempt = self.attempt,
                        "workers outlived their grace period; killing them"
                    );
                    self.ranks.kill();
                    return true;
                }
                false
            }
        }
    }

    /// Kills every process now (the coordinator is going away).
    pub fn kill(&mut self) {
        self.ranks.kill();
    }
}
