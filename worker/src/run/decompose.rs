//! A decomposition's worker: rank `r` decomposes part `r` of the job's
//! files into the dataset's `parts/` folder ([`strata_dataplane::parts`]);
//! the coordinator commits the dataset's manifest once every part is in.
//! Its heartbeats carry the batches written as the step (the
//! coordinator's hang clock watches them move), and a stop request
//! (cancel, SIGTERM, another worker lost) ends it at the next batch,
//! leaving the part unfinished: a later attempt writes it again.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use strata_dataplane::corpus::{CorpusError, Progress};
use strata_dataplane::parts::{self, DecomposeJob, PartOutcome, PartsError};

use super::WorkerArgs;
use super::WorkerError;
use super::heartbeat::{Pulse, Stop};
use super::report::Activity;
use super::steps::fault_at;

/// The part's progress as the heartbeats and the stop request see it.
struct PartProgress {
    pulse: Arc<Pulse>,
    stop: Arc<Stop>,
    batches: AtomicU64,
    /// `STRATA_FAULT_HANG_AT = "JOB:ATTEMPT:RANK:BATCH"`: this rank stops
    /// working after that batch while its heartbeats go on (the recovery
    /// test kills it there, mid-part).
    hang_after: Option<u64>,
}

impl Progress for PartProgress {
    fn batch_written(&self) -> Result<(), CorpusError> {
        let n = self.batches.fetch_add(1, Ordering::Relaxed) + 1;
        self.pulse.advanced(n);
        if self.hang_after == Some(n) {
            tracing::warn!(
                batch = n,
                "STRATA_FAULT_HANG_AT: hanging here, heartbeats go on"
            );
            while !self.stop.requested() {
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
        }
        if self.stop.requested() {
            return Err(CorpusError::Stopped(self.stop.reason()));
        }
        Ok(())
    }
}

/// Decomposes this rank's part of the job `spec` describes (unless an
/// earlier attempt finished it).
pub(super) fn run_part(
    rt: &tokio::runtime::Runtime,
    args: &WorkerArgs,
    spec: &str,
    pulse: Arc<Pulse>,
    stop: Arc<Stop>,
) -> Result<(), WorkerError> {
    let job = DecomposeJob::parse(spec).map_err(|e| WorkerError::Setup(e.to_string()))?;
    let part = args.rank as usize;
    pulse.busy(Activity::Step);
    let progress = PartProgress {
        pulse,
        stop,
        batches: AtomicU64::new(0),
        hang_after: fault_at("STRATA_FAULT_HANG_AT", args, true),
    };
    match rt.block_on(parts::run_part(&job, part, args.attempt, &progress)) {
        Ok(PartOutcome::AlreadyDone { manifest, attempt }) => {
            tracing::info!(
                part,
                by_attempt = attempt,
                documents = manifest.n_documents,
                "part finished by an earlier attempt: not redone"
            );
            Ok(())
        }
        Ok(PartOutcome::Written(s)) => {
            tracing::info!(
                part,
                documents = s.manifest.n_documents,
                tokens = s.manifest.n_tokens_in,
                bytes = s.input_bytes,
                elapsed_s = s.elapsed_s,
                tokens_per_s = s.tokens_per_s,
                "part written"
            );
            Ok(())
        }
        Err(PartsError::Corpus(CorpusError::Stopped(why))) => Err(WorkerError::Stopped(why)),
        Err(e) => Err(WorkerError::Data(format!("part {part}: {e}"))),
    }
}
