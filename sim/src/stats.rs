//! What the simulator measures from the ranks' side: when each attempt's
//! ranks registered and got their assignments, and how long every
//! heartbeat took to be answered.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

pub(crate) fn unix_ms() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64() * 1e3)
}

/// One attempt's rendezvous, as its ranks saw it (Unix milliseconds).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct AttemptStats {
    pub job: String,
    pub attempt: u32,
    pub ranks: u32,
    pub started_ms: f64,
    pub first_register_ms: f64,
    /// When the last rank sent its `Register`.
    pub last_register_ms: f64,
    pub registered: u32,
    /// When the last rank got its assignment.
    pub last_assigned_ms: f64,
    pub assigned: u32,
}

/// A summary of latencies, in milliseconds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Latency {
    pub count: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Latency {
    pub fn of(mut v: Vec<f64>) -> Latency {
        if v.is_empty() {
            return Latency::default();
        }
        v.sort_by(f64::total_cmp);
        let q = |q: f64| v[((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
        Latency {
            count: v.len() as u64,
            p50_ms: q(0.5),
            p99_ms: q(0.99),
            max_ms: *v.last().expect("not empty"),
        }
    }
}

/// The simulator's measurements as it reports them.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StatsReport {
    pub attempts: Vec<AttemptStats>,
    /// Heartbeat round trips since the last reset, all jobs.
    pub heartbeat: Latency,
    /// The same per job.
    pub heartbeat_by_job: BTreeMap<String, Latency>,
    /// Calls that failed, by call.
    pub errors: BTreeMap<String, u64>,
    /// Ranks alive now.
    pub ranks_alive: u64,
}

#[derive(Default)]
struct Inner {
    attempts: BTreeMap<(String, u32), AttemptStats>,
    /// (job, milliseconds) of each heartbeat since the last reset.
    heartbeats: Vec<(u32, f32)>,
    jobs: Vec<String>,
    errors: BTreeMap<String, u64>,
}

#[derive(Default)]
pub struct Stats {
    inner: Mutex<Inner>,
}

impl Stats {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn started(&self, job: &str, attempt: u32, ranks: u32) {
        let mut s = self.lock();
        s.attempts.insert(
            (job.to_string(), attempt),
            AttemptStats {
                job: job.to_string(),
                attempt,
                ranks,
                started_ms: unix_ms(),
                ..AttemptStats::default()
            },
        );
    }

    pub fn registering(&self, job: &str, attempt: u32) {
        let now = unix_ms();
        let mut s = self.lock();
        if let Some(a) = s.attempts.get_mut(&(job.to_string(), attempt)) {
            if a.registered == 0 {
                a.first_register_ms = now;
            }
            a.registered += 1;
            a.last_register_ms = a.last_register_ms.max(now);
        }
    }

    pub fn assigned(&self, job: &str, attempt: u32) {
        let now = unix_ms();
        let mut s = self.lock();
        if let Some(a) = s.attempts.get_mut(&(job.to_string(), attempt)) {
            a.assigned += 1;
            a.last_assigned_ms = a.last_assigned_ms.max(now);
        }
    }

    pub fn heartbeat(&self, job: &str, ms: f64) {
        let mut s = self.lock();
        let i = match s.jobs.iter().position(|j| j == job) {
            Some(i) => i,
            None => {
                s.jobs.push(job.to_string());
                s.jobs.len() - 1
            }
        };
        s.heartbeats.push((i as u32, ms as f32));
    }

    pub fn error(&self, call: &str) {
        *self.lock().errors.entry(call.to_string()).or_default() += 1;
    }

    /// The report, and with `reset` a fresh start of the latencies and
    /// errors (the attempts stay).
    pub fn report(&self, reset: bool, ranks_alive: u64) -> StatsReport {
        let mut s = self.lock();
        let mut by_job: BTreeMap<String, Vec<f64>> = BTreeMap::new();
        for (j, ms) in &s.heartbeats {
            by_job
                .entry(s.jobs[*j as usize].clone())
                .or_default()
                .push(f64::from(*ms));
        }
        let all: Vec<f64> = s.heartbeats.iter().map(|h| f64::from(h.1)).collect();
        let report = StatsReport {
            attempts: s.attempts.values().cloned().collect(),
            heartbeat: Latency::of(all),
            heartbeat_by_job: by_job
                .into_iter()
                .map(|(j, v)| (j, Latency::of(v)))
                .collect(),
            errors: s.errors.clone(),
            ranks_alive,
        };
        if reset {
            s.heartbeats.clear();
            s.errors.clear();
        }
        report
    }
}
