//! The monitor's tick, every 250 ms: look at every live attempt's
//! processes outside the lock (one look per attempt: Slurm's exits are
//! one directory listing, its states one `squeue` for all allocations,
//! made by the launcher's own poller), then decide under the lock (ranks
//! that ended, went silent or hung; stopping attempts that are gone or
//! due for SIGKILL; what the queue can start), then act outside it.

use std::sync::Arc;

use super::actions::{Action, Observation, RanksHandle, StopKind};
use super::{Engine, State};
use crate::job::JobId;

impl Engine {
    /// One tick of the monitor. The looks at processes run on a blocking
    /// thread; a launcher busy with a command (a hung `scancel`) is
    /// skipped this tick, holding up nothing else.
    pub async fn tick(self: &Arc<Self>) {
        let handles: Vec<(JobId, u32, Arc<RanksHandle>)> = {
            let state = self.lock();
            state
                .attempts
                .iter()
                .map(|(id, s)| (id.clone(), s.attempt, s.handle.clone()))
                .collect()
        };
        let looks = if handles.is_empty() {
            Vec::new()
        } else {
            tokio::task::spawn_blocking(move || {
                handles
                    .into_iter()
                    .filter_map(|(id, attempt, h)| Some((id, attempt, h.observe()?)))
                    .collect::<Vec<_>>()
            })
            .await
            .unwrap_or_default()
        };
        let mut state = self.lock();
        self.decide(&mut state, looks);
    }

    /// Applies the looks and decides what follows, under the lock.
    fn decide(&self, state: &mut State, looks: Vec<(JobId, u32, Observation)>) {
        for (id, attempt, obs) in looks {
            if let Some(sup) = state.attempts.get_mut(&id)
                && sup.attempt == attempt
            {
                sup.observe(obs);
            }
        }
        let mut failures = Vec::new();
        let mut gone = Vec::new();
        let mut kills = Vec::new();
        for (id, sup) in state.attempts.iter_mut() {
            if sup.is_running() {
                if let Some(f) = sup.check(self.cfg.heartbeat_timeout) {
                    failures.push((id.clone(), sup.attempt, f));
                }
            } else if sup.all_ended {
                gone.push(id.clone());
            } else if sup.due_for_kill() {
                tracing::warn!(job = %id, attempt = sup.attempt, "workers outlived their grace period; killing them");
                kills.push((id.clone(), sup.handle.clone()));
            }
        }
        for (id, handle) in kills {
            self.act(Action::Stop {
                job: id,
                handle,
                kind: StopKind::Kill,
            });
        }
        for (id, attempt, f) in failures {
            if let Err(e) = self.fail_attempt(state, id.as_str(), attempt, f) {
                tracing::error!(job = %id, error = %e, "job store failure");
            }
        }
        for id in gone {
            self.release(state, &id);
        }
        self.schedule(state);
    }
}
