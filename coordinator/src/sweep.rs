//! A sweep as the store keeps it: the sweep file and each point's job.

use serde::{Deserialize, Serialize};
use strata_sweep::spec::Point;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SweepState {
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl SweepState {
    pub fn name(self) -> &'static str {
        match self {
            SweepState::Running => "running",
            SweepState::Succeeded => "succeeded",
            SweepState::Failed => "failed",
            SweepState::Cancelled => "cancelled",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SweepRecord {
    pub sweep_id: String,
    pub name: String,
    /// The sweep file, its base recipe inlined.
    pub spec_toml: String,
    pub state: SweepState,
    pub max_concurrent: u32,
    pub submitted_unix_ms: i64,
    pub finished_unix_ms: i64,
    pub points: Vec<PointRecord>,
    /// Why it failed or was cancelled.
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PointRecord {
    pub point: Point,
    pub job_id: Option<String>,
    /// Jobs of earlier tries, oldest first.
    pub earlier_jobs: Vec<String>,
    /// Why the point cannot start; empty while it can.
    pub blocked: String,
}
