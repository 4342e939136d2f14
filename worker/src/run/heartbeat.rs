//! What runs beside the training thread: heartbeats to the coordinator
//! (from the runtime's threads, whatever the step is doing) and the
//! watch for SIGTERM; both end in a [`Stop`] request, which the step loop
//! agrees on with every rank.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::report::{Activity, ActivityCell, Beat, BeatError, LastStep, Reporter};

/// The heartbeat period the coordinator asked for (0: a second), at
/// least a second and at most a minute.
pub(super) fn period_ms(asked: u32) -> u64 {
    if asked == 0 {
        1000
    } else {
        u64::from(asked).clamp(1000, 60_000)
    }
}

/// A worker whose coordinator has been unreachable this long stops: its
/// attempt is over (a restarted coordinator starts a new one).
const ORPHAN_AFTER: Duration = Duration::from_secs(120);

/// A rank that must leave on its own (its attempt is over) exits after
/// this long if it has not left by then.
const LEAVE_WITHIN: Duration = Duration::from_secs(30);

/// A request to stop, from the coordinator or a signal; the first reason
/// is kept.
#[derive(Default)]
pub(super) struct Stop {
    flag: AtomicBool,
    reason: Mutex<String>,
    leaving: AtomicBool,
    /// The attempt is over for the coordinator: nothing is saved on the
    /// way out (no manifest would be committed for it).
    abandoned: AtomicBool,
}

impl Stop {
    pub(super) fn request(&self, reason: &str) {
        let mut r = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        if !self.flag.swap(true, Ordering::SeqCst) {
            tracing::info!(reason, "asked to stop");
            *r = reason.to_string();
        }
    }

    /// Stops without saving: this attempt has ended.
    fn abandon(&self, reason: &str) {
        self.abandoned.store(true, Ordering::SeqCst);
        self.request(reason);
    }

    pub(super) fn requested(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }

    pub(super) fn abandoned(&self) -> bool {
        self.abandoned.load(Ordering::SeqCst)
    }

    pub(super) fn reason(&self) -> String {
        self.reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Ends the process after `grace` unless it has left by then (a rank
    /// hung in a step, or waiting on a peer that is gone, never reaches
    /// the step boundary where stops are agreed).
    fn leave_after(&self, grace: Duration) {
        if self.leaving.swap(true, Ordering::SeqCst) {
            return;
        }
        std::thread::spawn(move || {
            std::thread::sleep(grace);
            tracing::error!("did not stop within {} s; exiting", grace.as_secs());
            std::process::exit(3);
        });
    }
}

/// What the training thread tells the heartbeats.
pub(super) struct Pulse {
    /// The step the rank last finished.
    step: AtomicU64,
    last: Mutex<Option<LastStep>>,
    activity: ActivityCell,
}

impl Pulse {
    pub(super) fn new() -> Pulse {
        Pulse {
            step: AtomicU64::new(0),
            last: Mutex::new(None),
            activity: ActivityCell::new(Activity::Setup),
        }
    }

    pub(super) fn busy(&self, a: Activity) {
        self.activity.set(a);
    }

    /// Work item `n` is done (a decomposition's batch): no step split.
    pub(super) fn advanced(&self, n: u64) {
        self.step.store(n, Ordering::Relaxed);
    }

    /// Step `last.step` is done.
    pub(super) fn finished(&self, last: LastStep) {
        self.step.store(last.step, Ordering::Relaxed);
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = Some(last);
    }

    fn beat(&self) -> Beat {
        Beat {
            step: self.step.load(Ordering::Relaxed),
            last: *self.last.lock().unwrap_or_else(|e| e.into_inner()),
            activity: self.activity.get(),
        }
    }
}

/// Sends heartbeats every period the coordinator asks for (`first_ms` to
/// begin with), turning its stop requests, a refusal (this attempt has
/// ended) and a coordinator unreachable for [`ORPHAN_AFTER`] into `stop`.
pub(super) fn spawn_heartbeats(
    rt: &tokio::runtime::Runtime,
    mut reporter: Reporter,
    first_ms: u32,
    pulse: Arc<Pulse>,
    stop: Arc<Stop>,
) {
    rt.spawn(async move {
        let mut period = period_ms(first_ms);
        let mut unreachable_since: Option<Instant> = None;
        loop {
            tokio::time::sleep(Duration::from_millis(period)).await;
            match reporter.heartbeat(&pulse.beat()).await {
                Ok(r) => {
                    unreachable_since = None;
                    if let Some(reason) = r.stop {
                        stop.request(&reason);
                    } else if r.interval_ms > 0 {
                        period = period_ms(r.interval_ms);
                    }
                }
                Err(BeatError::Refused(why)) => {
                    // This attempt has ended: leave, even from a hung step.
                    stop.abandon(&format!("the coordinator refused this attempt: {why}"));
                    stop.leave_after(LEAVE_WITHIN);
                }
                Err(BeatError::Failed(error)) => {
                    let since = *unreachable_since.get_or_insert_with(Instant::now);
                    tracing::warn!(%error, "heartbeat failed");
                    if since.elapsed() > ORPHAN_AFTER {
                        stop.abandon(&format!(
                            "the coordinator has been unreachable for {} s",
                            ORPHAN_AFTER.as_secs()
                        ));
                        stop.leave_after(LEAVE_WITHIN);
                    }
                }
            }
        }
    });
}

/// Turns SIGTERM into a stop request: the ranks agree to stop after the
/// same step and save it.
pub(super) fn watch_sigterm(rt: &tokio::runtime::Runtime, stop: Arc<Stop>) {
    rt.spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                term.recv().await;
                stop.request("SIGTERM");
            }
            Err(e) => tracing::warn!(error = %e, "cannot watch for SIGTERM"),
        }
    });
}
