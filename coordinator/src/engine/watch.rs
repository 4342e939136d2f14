//! A job's watch stream, for gRPC's `WatchJob` and the dashboard's event
//! stream alike: the job now, its recorded steps in pages read from the
//! store as the stream is consumed (never the whole history in memory),
//! then each change and each new step as they happen, until the job
//! ends. A viewer that falls behind the live channel goes back to the
//! store for what it missed. A long history can be thinned for a chart:
//! one step of every stretch, read with a seek each.

use std::sync::Arc;

use futures::Stream;
use tokio::sync::broadcast;

use super::{Engine, Event, Result};
use crate::error::EngineError;
use crate::job::{JobRecord, JobState, StepRecord};

/// What a watch stream carries.
#[derive(Debug, Clone)]
pub enum WatchItem {
    Job(Arc<JobRecord>),
    /// Steps in step order, each after the last one sent.
    Steps(Vec<StepRecord>),
    /// The job has ended; nothing follows.
    End(JobState),
}

/// How a watch starts.
#[derive(Debug, Clone, Copy, Default)]
pub struct WatchOptions {
    /// The first step of the history to send.
    pub from_step: u64,
    /// At most about this many steps of history (thinned), when set.
    pub points: Option<u64>,
}

/// Steps per page of history.
pub const PAGE: usize = 500;

enum Phase {
    /// The job as it is when the watch starts.
    First(Arc<JobRecord>),
    /// The history, from `next` on (thinned first, when asked).
    History {
        next: u64,
        thin: Option<u64>,
    },
    Live,
    Done,
}

struct Watch {
    engine: Arc<Engine>,
    id: String,
    rx: Option<broadcast::Receiver<Event>>,
    /// The last step sent.
    last: Option<u64>,
    phase: Phase,
    ended: bool,
}

impl Engine {
    /// Job `id`'s watch stream. Subscribed under the lock before the
    /// history is read, so the two meet without a gap or a repeat.
    pub fn watch(
        self: &Arc<Self>,
        id: &str,
        opts: WatchOptions,
    ) -> Result<impl Stream<Item = Result<WatchItem>> + Send + 'static> {
        let (job, rx) = {
            let mut state = self.lock();
            let job = state
                .jobs
                .get(id)
                .cloned()
                .ok_or_else(|| EngineError::NotFound(format!("no job {id}")))?;
            // An ended job's stream ends after its history: no channel.
            let rx = (!job.state.is_final()).then(|| {
                state
                    .watchers
                    .entry(job.job_id.clone())
                    .or_insert_with(|| broadcast::channel(4096).0)
                    .subscribe()
            });
            (job, rx)
        };
        let w = Watch {
            engine: self.clone(),
            id: id.to_string(),
            ended: job.state.is_final(),
            rx,
            last: opts.from_step.checked_sub(1),
            phase: Phase::First(job),
        };
        let thin = opts.points;
        Ok(futures::stream::unfold(
            (w, thin),
            |(mut w, thin)| async move {
                let item = w.next(thin).await?;
                Some((item, (w, thin)))
            },
        ))
    }
}

impl Watch {
    fn from(&self) -> u64 {
        self.last.map_or(0, |l| l + 1)
    }

    async fn read(&self, from: u64, thin: Option<u64>) -> Result<(Vec<StepRecord>, bool)> {
        let engine = self.engine.clone();
        let id = self.id.clone();
        engine.store.flush().await?;
        tokio::task::spawn_blocking(move || {
            let store = &engine.store;
            if let Some(points) = thin {
                let last = store.last_step(&id)?.map_or(0, |s| s.step);
                let span = last.saturating_sub(from) + 1;
                if last >= from && span > points.max(1) {
                    let stride = span.div_ceil(points.max(1));
                    return Ok((store.sample_steps(&id, from, last, stride)?, true));
                }
            }
            Ok((store.steps(&id, from, PAGE)?, false))
        })
        .await
        .map_err(|e| EngineError::Unavailable(format!("reading the history: {e}")))?
    }

    /// The next item, `None` once the stream is over.
    async fn next(&mut self, thin: Option<u64>) -> Option<Result<WatchItem>> {
        loop {
            match std::mem::replace(&mut self.phase, Phase::Done) {
                Phase::Done => return None,
                Phase::First(job) => {
                    self.phase = Phase::History {
                        next: self.from(),
                        thin,
                    };
                    return Some(Ok(WatchItem::Job(job)));
                }
                Phase::History { next, thin } => {
                    let (page, thinned) = match self.read(next, thin).await {
                        Ok(p) => p,
                        Err(e) => return Some(Err(e)),
                    };
                    let full = page.len() == PAGE;
                    if let Some(s) = page.last() {
                        self.last = Some(s.step);
                    }
                    self.phase = if thinned || full {
                        Phase::History {
                            next: self.from(),
                            thin: None,
                        }
                    } else {
                        Phase::Live
                    };
                    if !page.is_empty() {
                        return Some(Ok(WatchItem::Steps(page)));
                    }
                }
                Phase::Live => {
                    let Some(rx) = self.rx.as_mut() else {
                        // An ended job: its history was all.
                        let state = self
                            .engine
                            .job(&self.id)
                            .map_or(JobState::Succeeded, |j| j.state);
                        return Some(Ok(WatchItem::End(state)));
                    };
                    match rx.recv().await {
                        // Already sent from the history.
                        Ok(Event::Step(s)) if self.last.is_some_and(|l| s.step <= l) => {
                            self.phase = Phase::Live;
                        }
                        Ok(Event::Step(s)) => {
                            self.last = Some(s.step);
                            self.phase = Phase::Live;
                            return Some(Ok(WatchItem::Steps(vec![Arc::unwrap_or_clone(s)])));
                        }
                        Ok(Event::Job(j)) => {
                            if j.state.is_final() {
                                self.rx = None;
                                self.ended = true;
                            }
                            self.phase = Phase::Live;
                            return Some(Ok(WatchItem::Job(j)));
                        }
                        // Fell behind the channel: what it missed is in
                        // the store.
                        Err(broadcast::error::RecvError::Lagged(_)) => {
                            self.phase = Phase::History {
                                next: self.from(),
                                thin: None,
                            };
                        }
                        Err(broadcast::error::RecvError::Closed) => {
                            self.rx = None;
                            self.phase = Phase::Live;
                        }
                    }
                }
            }
        }
    }
}
