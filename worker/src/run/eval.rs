//! The held-out evaluation batch a replica evaluates.

use super::WorkerError;
use crate::train::LocalBatch;

/// This replica's share of the held-out evaluation batch: the split's
/// first `[eval] tokens` in windows of `max_seq_len + 1` (inputs, and
/// targets one token on), rows dealt to the data-parallel replicas in
/// contiguous runs (sizes differing by at most one) and each replica's
/// rows to its microbatches alike: every layout evaluates the same
/// windows.
pub(super) struct EvalSet {
    pub(super) every: u64,
    seq: usize,
    inputs: Vec<u32>,
    targets: Vec<u32>,
    /// Each microbatch's first row and row count.
    parts: Vec<(usize, usize)>,
    /// Target tokens of the whole batch, every replica's.
    pub(super) tokens: u64,
}

impl EvalSet {
    pub(super) fn new(
        held_out: &[u32],
        ev: strata_recipe::EvalConfig,
        seq: usize,
        replica: u32,
        replicas: u32,
        microbatches: usize,
    ) -> Result<EvalSet, WorkerError> {
        let window = seq + 1;
        let rows = (ev.rows(seq as u64) as usize).min(held_out.len() / window);
        let need = replicas as usize * microbatches;
        if rows < need {
            return Err(WorkerError::Data(format!(
                "[eval] the held-out split ({} tokens) makes {rows} windows of {window} tokens; {replicas} data-parallel replicas of {microbatches} microbatches need {need}",
                held_out.len()
            )));
        }
        let deal = |n: usize, parts: usize, k: usize| (k * n / parts, (k + 1) * n / parts);
        let (first, last) = deal(rows, replicas as usize, replica as usize);
        let (mut inputs, mut targets) = (Vec::new(), Vec::new());
        for r in first..last {
            inputs.extend_from_slice(&held_out[r * window..r * window + seq]);
            targets.extend_from_slice(&held_out[r * window + 1..(r + 1) * window]);
        }
        let mine = last - first;
        let parts = (0..microbatches)
            .map(|k| {
                let (a, b) = deal(mine, microbatches, k);
                (a, b - a)
            })
            .collect();
        Ok(EvalSet {
            every: ev.every_steps,
            seq,
            inputs,
            targets,
            parts,
            tokens: (rows * seq) as u64,
        })
    }

    pub(super) fn micro(&self) -> Vec<LocalBatch<'_>> {
        self.parts
            .iter()
            .map(|&(first, rows)| {
                let span = first * self.seq..(first + rows) * self.seq;
                LocalBatch {
                    inputs: &self.inputs[span.clone()],
                    targets: &self.targets[span],
                    seq_len: self.seq,
                    groups: &[],
                }
            })
            .collect()
    }
}
