//! Views of the engine's state for clients, the dashboard and `/metrics`:
//! shared snapshots of records (an `Arc` each, never a copy), each live
//! job's last step from memory (no store read per scrape), and ranks
//! summed up — by node, by pipeline stage, the slowest — so that a job of
//! 16,384 ranks reads as a page, not as 16,384 rows.

use std::collections::BTreeMap;
use std::sync::Arc;

use strata_cluster::NodeStatus;

use super::supervisor::{RankRow, RanksSnapshot};
use super::{Engine, Result};
use crate::error::EngineError;
use crate::job::{JobRecord, StepRecord};

/// A job as views show it.
#[derive(Debug, Clone)]
pub struct JobView {
    pub job: Arc<JobRecord>,
    /// What its live attempt waits for (a launcher's queue).
    pub waiting: Option<String>,
    /// Its last reported step, while it is live.
    pub last_step: Option<StepRecord>,
}

/// Every job as it is now, and the coordinator's totals.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub jobs: Vec<JobView>,
    pub queue_length: usize,
    pub slots_leased: usize,
    pub live_ranks: usize,
}

/// A node as `strata nodes` shows it.
#[derive(Debug, Clone)]
pub struct NodeView {
    pub status: NodeStatus,
    /// Slots this coordinator's jobs hold on it.
    pub leased: u32,
    /// Jobs that keep it out of their placements, and why.
    pub excluded: Vec<String>,
}

/// A summary of one group of ranks (a node, a pipeline stage).
#[derive(Debug, Clone, serde::Serialize)]
pub struct GroupSummary {
    pub name: String,
    pub ranks: u32,
    pub min_step: u64,
    pub max_step: u64,
    /// The slowest and the mean of their last steps' wall times.
    pub max_step_s: Option<f64>,
    pub mean_step_s: Option<f64>,
    /// The longest since a heartbeat of theirs.
    pub max_heartbeat_age_s: f64,
    pub done: u32,
}

/// A live attempt's ranks, summed up.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RankSummary {
    pub ranks: u32,
    pub registered: u32,
    pub done: u32,
    pub nodes: u32,
    pub min_step: u64,
    pub max_step: u64,
    /// Quantiles of the ranks' last step times: p50, p90, p99, max.
    pub step_s_quantiles: Option<[f64; 4]>,
    /// The nodes, worst first (slowest step, then the longest silence),
    /// at most `NODES_SHOWN`.
    pub by_node: Vec<GroupSummary>,
    pub by_stage: Vec<GroupSummary>,
    /// The slowest ranks by their last step's wall time.
    pub slowest: Vec<u32>,
    /// The ranks furthest behind (lowest step), at most a few.
    pub behind: Vec<u32>,
}

/// Nodes a summary lists, worst first.
pub const NODES_SHOWN: usize = 16;
/// Ranks a summary names as slowest or behind.
pub const RANKS_SHOWN: usize = 8;

/// `q`-quantile of sorted `v` (nearest rank).
pub fn quantile(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let i = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1;
    v[i]
}

fn group(name: String, rows: &[&RankRow]) -> GroupSummary {
    let walls: Vec<f64> = rows
        .iter()
        .filter_map(|r| r.last_step.map(|s| s.wall_s))
        .collect();
    GroupSummary {
        name,
        ranks: rows.len() as u32,
        min_step: rows.iter().map(|r| r.step).min().unwrap_or(0),
        max_step: rows.iter().map(|r| r.step).max().unwrap_or(0),
        max_step_s: walls.iter().copied().reduce(f64::max),
        mean_step_s: (!walls.is_empty()).then(|| walls.iter().sum::<f64>() / walls.len() as f64),
        max_heartbeat_age_s: rows.iter().map(|r| r.heartbeat_age_s).fold(0.0, f64::max),
        done: rows.iter().filter(|r| r.done).count() as u32,
    }
}

impl RanksSnapshot {
    /// The ranks summed up (computed outside the lock).
    pub fn summary(&self) -> RankSummary {
        let rows = &self.rows;
        let mut walls: Vec<f64> = rows
            .iter()
            .filter_map(|r| r.last_step.map(|s| s.wall_s))
            .collect();
        walls.sort_by(f64::total_cmp);
        let quantiles = (!walls.is_empty()).then(|| {
            [
                quantile(&walls, 0.5),
                quantile(&walls, 0.9),
                quantile(&walls, 0.99),
                *walls.last().expect("not empty"),
            ]
        });
        let mut per_node: BTreeMap<u32, Vec<&RankRow>> = BTreeMap::new();
        let mut per_stage: BTreeMap<u32, Vec<&RankRow>> = BTreeMap::new();
        for r in rows {
            per_node.entry(r.node).or_default().push(r);
            if let Some(l) = self.layout
                && let Some(c) = l.coords(strata_recipe::Rank(r.rank))
            {
                per_stage.entry(c.pp).or_default().push(r);
            }
        }
        let mut by_node: Vec<GroupSummary> = per_node
            .iter()
            .map(|(n, rs)| group(self.nodes[*n as usize].to_string(), rs))
            .collect();
        by_node.sort_by(|a, b| {
            b.max_step_s
                .unwrap_or(0.0)
                .total_cmp(&a.max_step_s.unwrap_or(0.0))
                .then(b.max_heartbeat_age_s.total_cmp(&a.max_heartbeat_age_s))
                .then(a.name.cmp(&b.name))
        });
        by_node.truncate(NODES_SHOWN);
        let by_stage = per_stage
            .iter()
            .map(|(s, rs)| group(format!("stage {s}"), rs))
            .collect();
        let mut slow: Vec<&RankRow> = rows.iter().filter(|r| r.last_step.is_some()).collect();
        slow.sort_by(|a, b| {
            let wall = |r: &RankRow| r.last_step.map_or(0.0, |s| s.wall_s);
            wall(b).total_cmp(&wall(a)).then(a.rank.cmp(&b.rank))
        });
        let min_step = rows.iter().map(|r| r.step).min().unwrap_or(0);
        let max_step = rows.iter().map(|r| r.step).max().unwrap_or(0);
        RankSummary {
            ranks: rows.len() as u32,
            registered: rows.iter().filter(|r| r.registered).count() as u32,
            done: rows.iter().filter(|r| r.done).count() as u32,
            nodes: self.nodes.len() as u32,
            min_step,
            max_step,
            step_s_quantiles: quantiles,
            by_node,
            by_stage,
            slowest: slow.iter().take(RANKS_SHOWN).map(|r| r.rank).collect(),
            behind: if min_step < max_step {
                rows.iter()
                    .filter(|r| r.step == min_step)
                    .take(RANKS_SHOWN)
                    .map(|r| r.rank)
                    .collect()
            } else {
                Vec::new()
            },
        }
    }
}

impl Engine {
    /// Every job with what its live attempt waits for and its last step,
    /// the queue's length and the slots leased, as they are now.
    pub fn snapshot(&self) -> Snapshot {
        let state = self.lock();
        Snapshot {
            jobs: state
                .jobs
                .values()
                .map(|j| JobView {
                    job: j.clone(),
                    waiting: state
                        .attempts
                        .get(&j.job_id)
                        .and_then(|s| s.waiting.clone()),
                    last_step: state.last_steps.get(&j.job_id).cloned(),
                })
                .collect(),
            queue_length: state.queue.len(),
            slots_leased: state.leased.len(),
            live_ranks: state.live_ranks,
        }
    }

    /// Job `id` with what its live attempt waits for and its last step.
    pub fn job_view(&self, id: &str) -> Result<JobView> {
        let state = self.lock();
        let job = state
            .jobs
            .get(id)
            .cloned()
            .ok_or_else(|| EngineError::NotFound(format!("no job {id}")))?;
        Ok(JobView {
            waiting: state.attempts.get(id).and_then(|s| s.waiting.clone()),
            last_step: state.last_steps.get(id).cloned(),
            job,
        })
    }

    /// The ranks of job `id`'s live attempt, copied out (empty when no
    /// processes are alive).
    pub fn ranks(&self, id: &str) -> RanksSnapshot {
        let state = self.lock();
        match (state.attempts.get(id), state.jobs.get(id)) {
            (Some(sup), Some(job)) => sup.snapshot(job.layout),
            _ => RanksSnapshot::default(),
        }
    }

    /// The ranks of every live job, copied out (for `/metrics`).
    pub fn all_ranks(&self) -> Vec<(String, RanksSnapshot)> {
        let state = self.lock();
        state
            .attempts
            .iter()
            .filter(|(_, s)| s.is_running())
            .filter_map(|(id, s)| {
                let job = state.jobs.get(id)?;
                Some((id.to_string(), s.snapshot(job.layout)))
            })
            .collect()
    }

    /// The nodes as the launcher last reported them, with the slots this
    /// coordinator's jobs lease on each and the jobs that keep them out.
    pub fn nodes(&self) -> Vec<NodeView> {
        let statuses = self.node_statuses();
        let state = self.lock();
        statuses
            .into_iter()
            .map(|n| {
                let excluded = state
                    .jobs
                    .values()
                    .filter(|j| !j.state.is_final())
                    .flat_map(|j| {
                        j.blamed_nodes.iter().filter(|b| b.node == n.name).map(|b| {
                            format!("job {} attempt {}: {}", j.job_id, b.attempt, b.reason)
                        })
                    })
                    .collect();
                NodeView {
                    leased: state.leased.on_node(&n.name),
                    status: n,
                    excluded,
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_take_the_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&v, 0.5), 50.0);
        assert_eq!(quantile(&v, 0.99), 99.0);
        assert_eq!(quantile(&v, 1.0), 100.0);
        assert_eq!(quantile(&[3.0], 0.5), 3.0);
        assert!(quantile(&[], 0.5).is_nan());
    }
}
