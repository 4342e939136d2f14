//! What the training tests share: a tiny model, AdamW's settings and a
//! deterministic stream of batches whose sequence length changes from step
//! to step.

#![allow(dead_code)]

use burn::tensor::backend::AutodiffBackend;
use strata_recipe::{AdamWConfig, ModelConfig};
use strata_worker::params::ParamTable;
use strata_worker::tensors::host_transfers;
use strata_worker::train::{Groups, LocalBatch, Trainer};

pub const LR: f64 = 3e-3;

pub fn tiny(tie: bool) -> ModelConfig {
    ModelConfig {
        n_layers: 3,
        d_model: 32,
        n_heads: 4,
        n_kv_heads: 2,
        d_ffn: 88,
        vocab_size: 250,
        padded_vocab_size: 256,
        max_seq_len: 32,
        rope_theta: 10000.0,
        tie_embeddings: tie,
    }
}

pub fn adamw() -> AdamWConfig {
    AdamWConfig::default()
}

/// A global batch of `rows` sequences: a noisy repeating pattern, so there
/// is something to learn.
pub fn batch(step: usize, rows: usize, seq: usize) -> (Vec<u32>, Vec<u32>) {
    let mut inputs = Vec::new();
    let mut targets = Vec::new();
    for r in 0..rows {
        let mut x = (step * 7919 + r * 104_729) as u64;
        let row: Vec<u32> = (0..=seq)
            .map(|i| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let noise = (x >> 60) as u32;
                (((i + r) % 17) as u32 * 13 + if noise == 0 { 5 } else { 0 }) % 250
            })
            .collect();
        inputs.extend_from_slice(&row[..seq]);
        targets.extend_from_slice(&row[1..]);
    }
    (inputs, targets)
}

/// The sequence length of a step: the curriculum's bucket changes.
pub fn seq_of(step: usize) -> usize {
    [16, 8, 32, 8, 16, 32][step % 6]
}

/// Data-parallel rank `dp_rank`'s share (of `dp`) of step `step`'s batch
/// of `tokens`: its inputs and targets, and the sequence length.
pub fn rank_batch(
    step: usize,
    tokens: usize,
    dp: u32,
    dp_rank: u32,
) -> (Vec<u32>, Vec<u32>, usize) {
    let seq = seq_of(step);
    let rows = tokens / seq;
    let (inputs, targets) = batch(step, rows, seq);
    let per = rows / dp as usize * seq;
    let mine = dp_rank as usize * per..(dp_rank as usize + 1) * per;
    (inputs[mine.clone()].to_vec(), targets[mine].to_vec(), seq)
}

/// [`rank_batch`] dealt by microbatch, as the loader deals a reweighted
/// step: the step is cut into `m` blocks and the rank takes its D-th of
/// each, so that microbatch k of every replica, in rank order, is block k.
pub fn rank_batch_by_microbatch(
    step: usize,
    tokens: usize,
    (dp, dp_rank): (u32, u32),
    m: usize,
) -> (Vec<u32>, Vec<u32>, usize) {
    let seq = seq_of(step);
    let rows = tokens / seq;
    let (inputs, targets) = batch(step, rows, seq);
    let per = rows / m / dp as usize * seq;
    let (mut i, mut t) = (Vec::new(), Vec::new());
    for k in 0..m {
        let at = (k * dp as usize + dp_rank as usize) * per;
        i.extend_from_slice(&inputs[at..at + per]);
        t.extend_from_slice(&targets[at..at + per]);
    }
    (i, t, seq)
}

/// `m` equal microbatches of a rank's share.
pub fn micro<'a>(
    inputs: &'a [u32],
    targets: &'a [u32],
    m: usize,
    seq: usize,
) -> Vec<LocalBatch<'a>> {
    let mb = inputs.len() / m;
    (0..m)
        .map(|i| LocalBatch {
            inputs: &inputs[i * mb..(i + 1) * mb],
            targets: &targets[i * mb..(i + 1) * mb],
            seq_len: seq,
            groups: &[],
        })
        .collect()
}

/// The small tied model the device backends' tests (CUDA, wgpu) train.
pub fn device_tiny() -> ModelConfig {
    ModelConfig {
        n_layers: 2,
        d_model: 64,
        n_heads: 4,
        n_kv_heads: 2,
        d_ffn: 176,
        vocab_size: 500,
        padded_vocab_size: 512,
        max_seq_len: 32,
        rope_theta: 10000.0,
        tie_embeddings: true,
    }
}

/// [`device_tiny`] trained `steps` steps of 4 × 32 tokens (a repeating
/// pattern) on `device`: each step's loss, the most host elements one step
/// moved, and what `memory` read after each step.
pub fn device_run<B: AutodiffBackend>(
    device: B::Device,
    steps: usize,
    memory: impl Fn() -> Option<u64>,
) -> (Vec<f64>, u64, Vec<Option<u64>>) {
    let cfg = device_tiny();
    let mut trainer = Trainer::<B>::new(
        &cfg,
        ParamTable::whole(&cfg),
        5,
        adamw(),
        Groups::single(),
        device,
    );
    let (rows, seq) = (4, 32);
    let (mut losses, mut moved, mut read) = (Vec::new(), 0, Vec::new());
    for step in 1..=steps {
        let row: Vec<u32> = (0..rows * (seq + 1))
            .map(|i| ((i * 7 + step) % 31 * 11 % 500) as u32)
            .collect();
        let (inputs, targets): (Vec<u32>, Vec<u32>) = row
            .chunks(seq + 1)
            .flat_map(|r| r[..seq].iter().copied().zip(r[1..].iter().copied()))
            .unzip();
        let micro = [LocalBatch {
            inputs: &inputs,
            targets: &targets,
            seq_len: seq,
            groups: &[],
        }];
        let before = host_transfers();
        let stats = trainer
            .step(step as u64, &micro, (rows * seq) as u64, 3e-3)
            .unwrap();
        moved = moved.max(host_transfers() - before);
        losses.push(stats.loss);
        read.push(memory());
    }
    (losses, moved, read)
}
