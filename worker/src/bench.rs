//! The training benchmark behind `strata bench train`: one rank holding
//! the whole model of a recipe trains on synthetic token streams for a
//! number of steps, on a chosen backend, with no coordinator and no
//! dataset. `bench/torch_reference.py` trains the same architecture, size,
//! batch and sequence length in PyTorch and prints the same JSON, so the
//! two can run back to back on one machine.

use std::time::Instant;

use burn::tensor::backend::AutodiffBackend;
use serde::Serialize;
use strata_dataplane::family;
use strata_dataplane::memory::{MemoryInputs, MemoryPlan, RankMemory, attention_on_kernel};
use strata_recipe::{AdamWConfig, DeviceKind, Layout, ModelConfig, Precision, Recipe, Recompute};

use crate::params::ParamTable;
use crate::tensors::host_transfers;
use crate::train::{Groups, LocalBatch, Trainer};

/// What to run.
#[derive(Debug, Clone)]
pub struct TrainBench {
    /// Measured steps, after `warmup` unmeasured ones.
    pub steps: usize,
    pub warmup: usize,
    pub seq_len: usize,
    pub tokens_per_step: usize,
    pub microbatches: usize,
    /// Data-parallel replicas, each on a thread of this process (joined
    /// by the in-process collective): for the memory of a replica, with or
    /// without a sharded optimizer. Times are replica 0's.
    pub dp: usize,
    pub shard_optimizer: bool,
    pub recompute: Recompute,
}

impl TrainBench {
    /// Rows (sequences) per microbatch, or why the shape does not divide.
    /// Rows (sequences) per microbatch on one replica, or why the shape
    /// does not divide.
    pub fn rows(&self) -> Result<usize, String> {
        let per = self.seq_len * self.microbatches * self.dp;
        if per == 0 || !self.tokens_per_step.is_multiple_of(per) {
            return Err(format!(
                "tokens per step ({}) must be a positive multiple of sequence length ({}) × microbatches ({}) × dp ({})",
                self.tokens_per_step, self.seq_len, self.microbatches, self.dp
            ));
        }
        Ok(self.tokens_per_step / per)
    }
}

/// The device's peak rate the MFU is measured against.
#[derive(Debug, Clone, Serialize)]
pub struct Peak {
    pub tflops: f64,
    /// Where the number comes from (a datasheet, or the user).
    pub source: String,
}

/// What a run measured. `bench/torch_reference.py` prints the same fields.
#[derive(Debug, Clone, Serialize)]
pub struct TrainReport {
    pub implementation: &'static str,
    pub backend: String,
    pub device: String,
    /// The dtype matrix products run in.
    pub compute_dtype: String,
    pub n_layers: u64,
    pub d_model: u64,
    pub n_heads: u64,
    pub n_kv_heads: u64,
    pub d_ffn: u64,
    pub vocab: u64,
    pub rope_theta: f64,
    pub tie_embeddings: bool,
    pub params: u64,
    pub seed: u64,
    pub optimizer: AdamWConfig,
    pub seq_len: usize,
    pub tokens_per_step: usize,
    pub microbatches: usize,
    /// Data-parallel replicas in the process, and whether they shard the
    /// optimizer; the heap's peak covers all of them.
    pub dp: usize,
    pub shard_optimizer: bool,
    pub recompute: &'static str,
    pub steps: usize,
    pub warmup: usize,
    pub tokens_per_s: f64,
    /// Median step time, and the mean split of the measured steps.
    pub step_s: f64,
    pub forward_s: f64,
    pub backward_s: f64,
    pub optimizer_s: f64,
    /// Training FLOPs per token (PaLM's 6N + 12·L·H·Q·T) and the rate
    /// they were done at.
    pub flops_per_token: f64,
    pub achieved_tflops: f64,
    pub peak: Option<Peak>,
    pub mfu: Option<f64>,
    /// Peak memory of the device (GPU) or of the process (CPU), in bytes.
    pub peak_memory_bytes: Option<u64>,
    /// The device pools' bytes of live tensors at their highest seen:
    /// sampled every millisecond from another thread through the steps
    /// (cubecl keeps no high-water mark), so a lower bound on the true
    /// peak; `peak_memory_bytes` is what the pools reserve, pages whose
    /// free slices wait for reuse included.
    pub peak_in_use_bytes: Option<u64>,
    /// The same reading just before the model was built: the process (or
    /// the backend's context) without the trainer.
    pub memory_baseline_bytes: Option<u64>,
    /// The peak of the bytes live on the heap from just before the model
    /// was built (CPU): what the memory plan counts, without the
    /// allocator's retained pages that the resident size includes.
    pub peak_heap_bytes: Option<u64>,
    /// The memory plan's bytes for this one rank at this shape, to hold
    /// against `peak_heap_bytes` (or `peak_memory_bytes −
    /// memory_baseline_bytes`).
    pub memory_plan: RankMemory,
    /// Elements moved between host and device per measured step.
    pub host_elems_per_step: f64,
    /// Every step's learning rate and loss, warmup included.
    pub lrs: Vec<f64>,
    pub losses: Vec<f64>,
}

/// Tokens of step `step`: each row repeats a random 64-token phrase drawn
/// from the first 4,096 ids, so the loss falls fast from ln(vocab) once
/// the model learns to copy; the same for any backend and implementation.
pub fn synthetic_batch(
    seed: u64,
    step: u64,
    rows: usize,
    seq: usize,
    vocab: u64,
) -> (Vec<u32>, Vec<u32>) {
    let vocab = vocab.min(4096);
    let mut inputs = Vec::with_capacity(rows * seq);
    let mut targets = Vec::with_capacity(rows * seq);
    for r in 0..rows as u64 {
        let phrase: Vec<u32> = (0..64u64)
            .map(|i| (splitmix(seed ^ splitmix(step) ^ splitmix(r << 8 | 1) ^ i) % vocab) as u32)
            .collect();
        let row: Vec<u32> = (0..=seq).map(|i| phrase[i % 64]).collect();
        inputs.extend_from_slice(&row[..seq]);
        targets.extend_from_slice(&row[1..]);
    }
    (inputs, targets)
}

fn splitmix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The process's peak resident memory, from `/proc/self/status`.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Where a backend runs and what it can report.
pub struct Target<B: AutodiffBackend> {
    pub backend: String,
    pub device_name: String,
    /// What the model computes in (mixed precision under bf16).
    pub precision: Precision,
    pub device: B::Device,
    /// The kind of device, for the memory plan.
    pub device_kind: DeviceKind,
    pub peak: Option<Peak>,
    /// Peak memory in bytes so far, when the backend can tell.
    pub peak_memory: Box<dyn Fn() -> Option<u64>>,
    /// Starts counting the heap's live bytes (called just before the
    /// model is built) and returns the reading of their peak since, when
    /// the process can count them.
    pub peak_heap: Box<dyn Fn() -> Box<dyn Fn() -> Option<u64>>>,
    /// The device pools' bytes of live tensors on the training thread,
    /// readable from another (cubecl's backends), sampled through the
    /// steps for [`TrainReport::peak_in_use_bytes`].
    pub in_use: Option<Box<dyn Fn() -> Option<u64> + Send + Sync>>,
}

/// Samples a reading every millisecond on a thread of its own and keeps
/// the largest, until [`Sampler::finish`].
struct Sampler {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<Option<u64>>,
}

impl Sampler {
    fn start(read: Box<dyn Fn() -> Option<u64> + Send + Sync>) -> Sampler {
        use std::sync::atomic::Ordering;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let until = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut peak = None;
            while !until.load(Ordering::Relaxed) {
                peak = peak.max(read());
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            peak.max(read())
        });
        Sampler { stop, thread }
    }

    fn finish(self) -> Option<u64> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().ok().flatten()
    }
}

/// The memory plan's inputs for one rank at `bench`'s shape.
fn memory_inputs(recipe: &Recipe, bench: &TrainBench) -> MemoryInputs {
    MemoryInputs {
        model: bench_model(recipe, bench),
        layout: Layout::new(1, 1, bench.dp.max(1) as u32),
        microbatches: bench.microbatches as u32,
        virtual_stages: 1,
        tokens_per_microbatch: (bench.tokens_per_step / (bench.microbatches * bench.dp).max(1))
            as u64,
        device: recipe.device,
        precision: recipe.precision,
        shard_optimizer: bench.shard_optimizer,
        recompute: bench.recompute,
        checkpoints: false,
        device_bytes: None,
        device_from: "device.memory_gib".into(),
        attention_kernel: attention_on_kernel(recipe.device, recipe.precision),
    }
}

/// The model `recipe` benchmarks at `bench`'s sequence length.
fn bench_model(recipe: &Recipe, bench: &TrainBench) -> ModelConfig {
    let mut model = recipe.model;
    model.max_seq_len = model.max_seq_len.max(bench.seq_len as u64);
    model
}

/// The report of a run that has not happened: the shape, seed, optimizer
/// and the learning rates of its warmup and measured steps, every
/// measurement NaN (null in JSON). `bench/torch_reference.py --like` reads
/// it when strata's own run cannot happen on this machine; [`train`] fills
/// in what it measured.
pub fn describe(recipe: &Recipe, bench: &TrainBench) -> TrainReport {
    let model = bench_model(recipe, bench);
    let tps = bench.tokens_per_step as u64;
    TrainReport {
        implementation: "strata",
        backend: "none".into(),
        device: "none".into(),
        compute_dtype: "f32".into(),
        n_layers: model.n_layers,
        d_model: model.d_model,
        n_heads: model.n_heads,
        n_kv_heads: model.n_kv_heads,
        d_ffn: model.d_ffn,
        vocab: model.padded_vocab_size,
        rope_theta: model.rope_theta,
        tie_embeddings: model.tie_embeddings,
        params: ParamTable::whole(&model).total as u64,
        seed: recipe.seed,
        optimizer: recipe.optimizer,
        seq_len: bench.seq_len,
        tokens_per_step: bench.tokens_per_step,
        microbatches: bench.microbatches,
        dp: bench.dp.max(1),
        shard_optimizer: bench.shard_optimizer,
        recompute: bench.recompute.as_str(),
        steps: bench.steps,
        warmup: bench.warmup,
        tokens_per_s: f64::NAN,
        step_s: f64::NAN,
        forward_s: f64::NAN,
        backward_s: f64::NAN,
        optimizer_s: f64::NAN,
        flops_per_token: family::of(&model).flops_per_token(&model, bench.seq_len as u64),
        achieved_tflops: f64::NAN,
        peak: None,
        mfu: None,
        peak_memory_bytes: None,
        peak_in_use_bytes: None,
        memory_baseline_bytes: None,
        peak_heap_bytes: None,
        memory_plan: MemoryPlan::new(&memory_inputs(recipe, bench))
            .worst()
            .clone(),
        host_elems_per_step: f64::NAN,
        lrs: (1..=(bench.warmup + bench.steps) as u64)
            .map(|step| recipe.schedule.lr_for_step((step - 1) * tps, tps))
            .collect(),
        losses: Vec::new(),
    }
}

/// Trains `recipe`'s model on one rank for `bench.warmup + bench.steps`
/// steps on `target`, with the recipe's seed, optimizer and schedule.
pub fn train<B: AutodiffBackend>(
    recipe: &Recipe,
    bench: &TrainBench,
    mut target: Target<B>,
) -> Result<TrainReport, String> {
    let rows = bench.rows()?;
    let model = bench_model(recipe, bench);
    let table = ParamTable::whole(&model);
    let baseline = (target.peak_memory)();
    let heap_peak = (target.peak_heap)();
    let dp = bench.dp.max(1);
    let mut replicas: Vec<Trainer<B>> =
        Groups::local_world(Layout::new(1, 1, dp as u32), model.tie_embeddings, 1)
            .into_iter()
            .map(|(_, groups)| {
                Trainer::<B>::new(
                    &model,
                    table.clone(),
                    recipe.seed,
                    recipe.optimizer,
                    groups,
                    target.device.clone(),
                )
                .with_precision(target.precision)
                .with_sharded_optimizer(bench.shard_optimizer)
                .with_recompute(bench.recompute)
            })
            .collect();
    let (trainer, others) = replicas.split_first_mut().expect("one replica at least");
    tracing::info!(backend = %target.backend, params = trainer.n_params(), dp, "model built");
    let mut report = describe(recipe, bench);
    report.memory_plan = MemoryPlan::new(&MemoryInputs {
        device: target.device_kind,
        precision: target.precision,
        attention_kernel: target.backend == "flex" && target.precision == Precision::F32,
        ..memory_inputs(recipe, bench)
    })
    .worst()
    .clone();
    let tps = bench.tokens_per_step as u64;
    let mut losses = Vec::new();
    let mut times = Vec::new();
    let (mut fwd, mut bwd, mut opt) = (0.0, 0.0, 0.0);
    let mut moved = 0u64;
    let mut peak_memory = None;
    let sampler = target.in_use.take().map(Sampler::start);
    for (step, &lr) in (1..).zip(&report.lrs) {
        let (inputs, targets) = synthetic_batch(
            recipe.seed,
            step,
            rows * bench.microbatches * dp,
            bench.seq_len,
            model.vocab_size,
        );
        let per = rows * bench.seq_len;
        // Replica r's microbatch m: the batch's (r·microbatches + m)-th run
        // of rows.
        let micro = |r: usize| -> Vec<LocalBatch<'_>> {
            (0..bench.microbatches)
                .map(|m| {
                    let at = (r * bench.microbatches + m) * per;
                    LocalBatch {
                        inputs: &inputs[at..at + per],
                        targets: &targets[at..at + per],
                        seq_len: bench.seq_len,
                        groups: &[],
                    }
                })
                .collect()
        };
        let before = host_transfers();
        let t = Instant::now();
        let stats = std::thread::scope(|s| {
            let rest: Vec<_> = others
                .iter_mut()
                .enumerate()
                .map(|(i, other)| {
                    let micro = micro(i + 1);
                    s.spawn(move || other.step(step, &micro, tps, lr).map(|_| ()))
                })
                .collect();
            let mine = trainer.step(step, &micro(0), tps, lr);
            for h in rest {
                h.join().expect("a replica panicked")?;
            }
            mine
        })
        .map_err(|e| format!("step {step}: {e}"))?;
        let elapsed = t.elapsed().as_secs_f64();
        if !stats.loss.is_finite() {
            return Err(format!("step {step}: the loss is {}", stats.loss));
        }
        tracing::info!(step, loss = stats.loss, secs = elapsed, "bench step");
        losses.push(stats.loss);
        peak_memory = peak_memory.max((target.peak_memory)());
        if step as usize > bench.warmup {
            times.push(elapsed);
            fwd += stats.forward.as_secs_f64();
            bwd += stats.backward.as_secs_f64();
            opt += stats.optimizer.as_secs_f64();
            moved += host_transfers() - before;
        }
    }
    report.peak_in_use_bytes = sampler.and_then(Sampler::finish);
    let n = times.len().max(1) as f64;
    times.sort_by(f64::total_cmp);
    let step_s = times.get(times.len() / 2).copied().unwrap_or(f64::NAN);
    report.tokens_per_s = bench.tokens_per_step as f64 / step_s;
    report.achieved_tflops = report.tokens_per_s * report.flops_per_token / 1e12;
    report.mfu = target
        .peak
        .as_ref()
        .map(|p| report.achieved_tflops / p.tflops);
    report.backend = target.backend;
    report.device = target.device_name;
    report.compute_dtype = target.precision.as_str().into();
    report.peak = target.peak;
    report.step_s = step_s;
    report.forward_s = fwd / n;
    report.backward_s = bwd / n;
    report.optimizer_s = opt / n;
    report.peak_memory_bytes = peak_memory;
    report.memory_baseline_bytes = baseline;
    report.peak_heap_bytes = heap_peak();
    report.host_elems_per_step = moved as f64 / n;
    report.losses = losses;
    Ok(report)
}
