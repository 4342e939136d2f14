//! The memory plan: what each rank of a layout holds at its step's peak,
//! in bytes, from the named parameter table and the 1F1B schedule — the
//! numbers `strata plan` prints and the coordinator checks a job against
//! before it launches anything.
//!
//! It counts what the trainer allocates, part by part: the f32 master
//! weights (which are the parameters at f32; a bf16 compute copy beside
//! them under mixed precision), the f32 gradient sums, AdamW's two moments
//! (sharded over the data-parallel group under ZeRO-1), every microbatch's
//! saved activations while it is in flight (1F1B keeps up to `pp − stage`
//! of them; more when interleaved), the largest transient buffer of the
//! step, and, on the CPU where host memory is the device's, the host copy a
//! checkpoint is written from. What is not counted: the process itself
//! (code, threads, the allocator's slack), which `strata bench train`
//! measures apart.

use serde::Serialize;
use strata_recipe::{Coords, DeviceKind, Layout, ModelConfig, Precision, Recipe, Recompute};

use crate::params::ParamTable;

const GIB: f64 = (1u64 << 30) as f64;

/// Rows of logits the CPU head takes at once (`worker::cpu`'s chunk).
const HEAD_ROWS: u64 = 256;
/// The trainer's largest collective call, in f32 elements (16 MiB).
const BUCKET_ELEMS: u64 = 4 << 20;

/// What the plan is computed for: a recipe's model and layout, or one
/// rank's benchmark shape.
#[derive(Debug, Clone, PartialEq)]
pub struct MemoryInputs {
    pub model: ModelConfig,
    pub layout: Layout,
    pub microbatches: u32,
    pub virtual_stages: u32,
    /// Tokens of one microbatch on one data-parallel rank (`rows · seq`,
    /// the same for every bucket of the curriculum).
    pub tokens_per_microbatch: u64,
    pub device: DeviceKind,
    pub precision: Precision,
    pub shard_optimizer: bool,
    pub recompute: Recompute,
    pub checkpoints: bool,
    /// Each device's memory, when known.
    pub device_bytes: Option<u64>,
    /// The recipe field that memory comes from, for messages.
    pub device_from: String,
    /// Attention runs on the CPU backend's fused kernel (flex at f32)
    /// rather than as tensor operations.
    pub attention_kernel: bool,
}

impl MemoryInputs {
    pub fn of(recipe: &Recipe) -> MemoryInputs {
        let p = &recipe.parallel;
        let memory = recipe.device_memory();
        MemoryInputs {
            model: recipe.model,
            layout: p.layout,
            microbatches: p.microbatches,
            virtual_stages: p.virtual_stages,
            tokens_per_microbatch: recipe.data.tokens_per_step
                / u64::from(p.layout.dp * p.microbatches).max(1),
            device: recipe.device,
            precision: recipe.precision,
            shard_optimizer: p.shard_optimizer,
            recompute: recipe.recompute,
            checkpoints: recipe.checkpoint.is_some(),
            device_bytes: memory.as_ref().map(|(g, _)| (g * GIB) as u64),
            device_from: memory.map_or_else(|| "device.memory_gib".into(), |(_, from)| from),
            attention_kernel: attention_on_kernel(recipe.device, recipe.precision),
        }
    }
}

/// Whether attention runs on the CPU backend's fused kernel (the CPU at
/// f32) rather than as tensor operations.
pub fn attention_on_kernel(device: DeviceKind, precision: Precision) -> bool {
    device == DeviceKind::Cpu && precision == Precision::F32
}

/// One rank's bytes at its step's peak. Data-parallel replicas hold the
/// same, so a rank stands for its (stage, tp rank) on every replica.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RankMemory {
    pub stage: u32,
    pub tp_rank: u32,
    /// The world rank of this (stage, tp rank) on replica 0.
    pub rank: u32,
    /// Parameter elements the rank holds (its table's total).
    pub params: u64,
    /// f32 master weights: the parameters themselves at f32.
    pub weights_bytes: u64,
    /// The bf16 copy the step computes with under mixed precision.
    pub compute_copy_bytes: u64,
    /// f32 gradient sums held at the peak (none when it comes before the
    /// first backward).
    pub grads_bytes: u64,
    /// AdamW's two f32 moments (this rank's shard under ZeRO-1).
    pub optimizer_bytes: u64,
    /// One microbatch's saved activations on this stage.
    pub activations_per_microbatch_bytes: u64,
    /// Microbatches (model-chunk microbatches when interleaved) in flight
    /// at the schedule's peak.
    pub in_flight: u32,
    /// Activations held at the step's peak (the gradients already summed
    /// counted apart).
    pub activations_bytes: u64,
    /// The largest buffer that lives only inside one operation.
    pub transient_bytes: u64,
    pub transient: &'static str,
    /// The host copy a checkpoint is written from (replica 0; counted in
    /// the total on the CPU, where it shares the device's memory).
    pub checkpoint_bytes: u64,
    /// What the device's memory pools hold beyond the bytes in use, on
    /// wgpu: they hand out slices of whole pages, so up to one part-used
    /// page of each sliced pool, and the rest of the page of each live
    /// transient buffer over half a page (no two of those share a page).
    /// (On CUDA cubecl's own pools, which strata cannot configure there,
    /// are not counted.)
    pub pool_pages_bytes: u64,
    pub total_bytes: u64,
}

impl RankMemory {
    /// The parts, largest first, with their names.
    pub fn parts(&self) -> Vec<(&'static str, u64)> {
        let mut parts = vec![
            ("activations", self.activations_bytes),
            ("optimizer state", self.optimizer_bytes),
            ("gradients", self.grads_bytes),
            ("master weights", self.weights_bytes),
            ("bf16 compute copy", self.compute_copy_bytes),
            (self.transient, self.transient_bytes),
            ("checkpoint copy", self.checkpoint_bytes),
            ("pool pages", self.pool_pages_bytes),
        ];
        parts.retain(|(_, b)| *b > 0);
        parts.sort_by_key(|p| std::cmp::Reverse(p.1));
        parts
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MemoryPlan {
    pub device_bytes: Option<u64>,
    /// One per (stage, tp rank), stage-major.
    pub ranks: Vec<RankMemory>,
}

impl MemoryPlan {
    pub fn new(inp: &MemoryInputs) -> MemoryPlan {
        let layout = inp.layout;
        let mut ranks = Vec::new();
        for stage in 0..layout.pp {
            for tp_rank in 0..layout.tp {
                let coords = Coords {
                    dp: 0,
                    pp: stage,
                    tp: tp_rank,
                };
                let table = ParamTable::interleaved(&inp.model, layout, coords, inp.virtual_stages);
                let rank = layout.rank(coords).map_or(0, |r| r.0);
                ranks.push(rank_memory(inp, &table, rank));
            }
        }
        MemoryPlan {
            device_bytes: inp.device_bytes,
            ranks,
        }
    }

    /// The rank that needs the most.
    pub fn worst(&self) -> &RankMemory {
        self.ranks
            .iter()
            .max_by_key(|r| r.total_bytes)
            .expect("a layout has a rank")
    }

    /// Whether every rank fits the device's memory (true when unknown).
    pub fn fits(&self) -> bool {
        self.device_bytes
            .is_none_or(|cap| self.worst().total_bytes <= cap)
    }
}

/// Rows of logits the device path's head (tensor operations) takes at
/// once, for `n` rows of width `d` and a vocabulary of `vocab`: twice the
/// width (each chunk adds a `[d, vocab]` product into the head's
/// gradient), at most 2²⁶ logits (256 MiB of f32).
pub fn device_head_rows(n: usize, d: usize, vocab: usize) -> usize {
    (2 * d).min((1 << 26) / vocab.max(1)).clamp(1, n.max(1))
}

/// Pages of the device pools strata configures on wgpu
/// (`worker::wgpu::memory_config`): tensors from 1 MiB to this share
/// pages of this size, and no buffer strata allocates inside an
/// operation is larger.
pub const POOL_PAGE_BYTES: u64 = 64 << 20;
/// Pages of the same pools for tensors under 1 MiB.
pub const SMALL_POOL_PAGE_BYTES: u64 = 8 << 20;

/// The f32 scores of one block of the device path's blocked attention
/// (rows × heads × block rows × keys) stay under this: a page of the
/// device pools.
pub const ATTENTION_BLOCK_BYTES: u64 = POOL_PAGE_BYTES;

/// Query rows per block of the device path's blocked attention, for
/// `rows` sequences of `t` tokens and `heads` heads: the most whose f32
/// scores against every key stay under [`ATTENTION_BLOCK_BYTES`], at least
/// 16 (and at most `t`).
pub fn attention_block_rows(rows: usize, heads: usize, t: usize) -> usize {
    let per_row = (rows * heads * t * 4).max(1) as u64;
    ((ATTENTION_BLOCK_BYTES / per_row) as usize)
        .max(16)
        .min(t.max(1))
}

/// Bytes in GiB, for messages.
pub fn gib(bytes: u64) -> f64 {
    bytes as f64 / GIB
}

fn rank_memory(inp: &MemoryInputs, table: &ParamTable, rank: u32) -> RankMemory {
    let m = &inp.model;
    let layout = inp.layout;
    let (tp, dp) = (u64::from(layout.tp), u64::from(layout.dp));
    let p = table.total as u64;
    let bf16 = inp.precision == Precision::Bf16;
    let cpu = inp.device == DeviceKind::Cpu;
    // Attention on the CPU backend's fused kernel (flex at f32), or as
    // burn's tensor operations, blocked (every other backend and dtype).
    let kernel = inp.attention_kernel;
    // Activations are bf16 under mixed precision (norms, softmax and the
    // loss in f32).
    let e: u64 = if bf16 { 2 } else { 4 };
    let t = inp.tokens_per_microbatch;
    let d = m.d_model;
    let hd = m.head_dim();
    let h = m.n_heads / tp;
    let kv = (m.n_kv_heads / tp).max(1);
    let f = m.d_ffn / tp;
    let vocab = m.padded_vocab_size / tp;
    let seq = m.max_seq_len.min(t).max(1);
    let rows = t / seq;

    // Saved per layer for the backward: the residual stream into each
    // RMSNorm (f32 under mixed precision), each norm's output (read by the
    // projections), Q, K and V, the attention output and its per-head
    // log-sum-exp, the gate and up products and their SwiGLU.
    let norm_in = if bf16 { 4 + e } else { 4 };
    let mut layer = t * (2 * d * norm_in + 2 * d * e + (h + 2 * kv) * hd * e + h * hd * e + h * 4);
    layer += t * 3 * f * e;
    if tp > 1 {
        // The f and g operators start and end segments: the row-parallel
        // outputs' sums and the segments' fresh inputs.
        layer += t * 2 * d * e;
    }
    // One block of the device path's blocked attention: its f32 scores
    // against the keys up to its last row.
    let block_rows = attention_block_rows(rows as usize, h as usize, seq as usize) as u64;
    let attention_block = rows * h * block_rows * seq * 4;
    // What attention's core saves beyond its inputs: its output and
    // log-sum-exp, and on the tensor-op path (not the CPU's fused kernel)
    // the rotated Q and K, and K and V expanded to every query head.
    let mut attention_core = t * (h * hd * e + h * 4);
    if !kernel {
        let extra = t * (h + kv) * hd * e + if kv < h { 2 * t * h * hd * e } else { 0 };
        layer += extra;
        attention_core += extra;
    }
    let (layer, rebuilt) = match inp.recompute {
        Recompute::None => (layer, 0),
        // Each branch keeps its norm's input and output and its
        // projections' outputs; the backward rebuilds one core at a time
        // (attention's, or SwiGLU's product).
        Recompute::Selective => (
            t * (2 * d * norm_in + 2 * d * e + (h + 2 * kv) * hd * e + 2 * f * e),
            attention_core.max(t * f * e),
        ),
        // A block keeps its input only (each of its two residual
        // branches' under tp), and the backward rebuilds one block's saved
        // set at a time.
        Recompute::Full => (t * d * e * if tp > 1 { 2 } else { 1 }, layer),
    };
    let first = table.stage == 0;
    let last = table.stage + 1 == table.pp;
    let chunks = &table.chunks;
    let per_chunk = |c: usize| -> u64 {
        let layers = u64::from(chunks[c].end - chunks[c].start);
        let mut bytes = layers * layer;
        if c == 0 && first {
            bytes += t * d * e; // the embedding's rows
        } else {
            bytes += t * d * 4; // the received activations
        }
        if c + 1 == chunks.len() && last {
            // The final norm's input and output, and the head: at tp = 1
            // its gradients come with the loss (dy, and dW kept until the
            // backward); under tp the vocabulary-parallel logits.
            bytes += t * d * (norm_in + e);
            bytes += if tp == 1 {
                t * d * 4 + vocab * d * 4
            } else {
                2 * t * vocab * 4
            };
        }
        bytes
    };
    let per_micro = (0..chunks.len()).map(per_chunk).max().unwrap_or(0);

    // The schedule's peak: warmup forwards plus one, and whether a
    // backward (so the gradient sums) has happened before a forward
    // brings the count back to it.
    let (pp, v) = (table.pp, chunks.len() as u32);
    let total = inp.microbatches * v;
    let warmup = if v == 1 {
        pp - table.stage - 1
    } else {
        2 * (pp - table.stage - 1) + (v - 1) * pp
    }
    .min(total);
    let in_flight = (warmup + 1).min(total);
    // At the peak: steady 1F1B brings the count back after a backward, so
    // with the gradient sums; otherwise the larger of the last warmup
    // forward (no gradients yet) and one backward later.
    let grads = 4 * p;
    let k = u64::from(in_flight);
    let (activations, grads_at_peak) = if total >= warmup + 2 {
        (per_micro * k, grads)
    } else if per_micro >= grads {
        (per_micro * k, 0)
    } else {
        (per_micro * k.saturating_sub(1), grads)
    };

    let sharded = inp.shard_optimizer && dp > 1;
    let shard = if sharded { p.div_ceil(dp) } else { p };
    let optimizer = 8 * shard;
    let weights = 4 * p;
    let compute_copy = if bf16 { 2 * p } else { 0 };

    // The largest transient: a chunk of logits in the head, a block of
    // attention (tensor ops: at the backward, a block's probabilities,
    // their gradient and one temporary of its size, with the keys' and
    // values' f32 sums; measured on NdArray within 6% at 2,048 and 8,192
    // tokens), or
    // a data-parallel bucket staged through host memory (in and out; the
    // embedding's bucket is whole).
    let embed_elems = table
        .slots
        .iter()
        .map(|s| s.len as u64)
        .max()
        .unwrap_or(0)
        .max(BUCKET_ELEMS.min(p));
    // Each with its largest buffers: (how many live at once, bytes).
    let mut transients = vec![(
        "collective staging",
        if dp > 1 { 2 * 4 * embed_elems } else { 0 },
        (0, 0),
    )];
    if last && tp == 1 {
        let (bytes, chunk) = if kernel {
            (HEAD_ROWS.min(t) * vocab * 4, (0, 0))
        } else {
            // Tensor operations: three copies of a chunk's logits live
            // at once (the logits, their exponents, the probabilities
            // with the target's term; measured on wgpu, the 50k
            // vocabulary of the tiny recipe: 650 MB seen in use against
            // 598 MB planned with two), and the chunk's `[d, vocab]`
            // product with the sum it is added into (the sum so far is
            // counted with the activations).
            let rows = device_head_rows(t as usize, d as usize, vocab as usize) as u64;
            let chunk = rows * vocab * 4;
            (3 * chunk + 2 * d * vocab * 4, (3, chunk))
        };
        transients.push(("logits chunk", bytes, chunk));
    }
    if !kernel {
        transients.push((
            "attention block",
            3 * attention_block + 2 * t * h * hd * 4,
            (3, attention_block),
        ));
    }
    match inp.recompute {
        Recompute::None => {}
        Recompute::Selective => transients.push(("recomputed core", rebuilt, (0, 0))),
        Recompute::Full => transients.push(("recomputed block", rebuilt, (0, 0))),
    }
    let (transient, transient_bytes, (copies, slice)) = transients
        .into_iter()
        .max_by_key(|x| x.1)
        .unwrap_or(("none", 0, (0, 0)));
    let checkpoint = if inp.checkpoints && cpu { 12 * p } else { 0 };
    let pool_pages = if inp.device == DeviceKind::Wgpu {
        // A part-used page per sliced pool, and the tail of the page of
        // each live transient buffer over half a page: no two share one.
        let tails = if slice > POOL_PAGE_BYTES / 2 && slice < POOL_PAGE_BYTES {
            copies * (POOL_PAGE_BYTES - slice)
        } else {
            0
        };
        POOL_PAGE_BYTES + SMALL_POOL_PAGE_BYTES + tails
    } else {
        0
    };
    let total_bytes = pool_pages
        + weights
        + compute_copy
        + optimizer
        + activations
        + grads_at_peak
        + transient_bytes
        + checkpoint;
    RankMemory {
        stage: table.stage,
        tp_rank: table.tp_rank,
        rank,
        params: p,
        weights_bytes: weights,
        compute_copy_bytes: compute_copy,
        grads_bytes: grads_at_peak,
        optimizer_bytes: optimizer,
        activations_per_microbatch_bytes: per_micro,
        in_flight,
        activations_bytes: activations,
        transient_bytes,
        transient,
        checkpoint_bytes: checkpoint,
        pool_pages_bytes: pool_pages,
        total_bytes,
    }
}

impl MemoryPlan {
    /// Why the job cannot run, when its worst rank does not fit the
    /// device: the rank, its total against the device's memory, its
    /// largest parts, and the knobs that would bring it under (or, when
    /// none alone does, down the most), each with its new total.
    pub fn refusal(&self, inp: &MemoryInputs) -> Option<String> {
        let cap = self.device_bytes?;
        let w = self.worst();
        if w.total_bytes <= cap {
            return None;
        }
        let parts: Vec<String> = w
            .parts()
            .into_iter()
            .take(3)
            .map(|(name, b)| {
                if name == "activations" {
                    format!(
                        "activations {:.2} GiB ({} microbatch{} in flight × {:.2} GiB)",
                        gib(b),
                        w.in_flight,
                        if w.in_flight == 1 { "" } else { "es" },
                        gib(w.activations_per_microbatch_bytes)
                    )
                } else {
                    format!("{name} {:.2} GiB", gib(b))
                }
            })
            .collect();
        let mut knobs: Vec<(String, u64)> = Vec::new();
        let mut try_knob = |what: String, changed: MemoryInputs| {
            let total = MemoryPlan::new(&changed).worst().total_bytes;
            if total < w.total_bytes {
                knobs.push((what, total));
            }
        };
        let l = inp.layout;
        if l.dp > 1 && !inp.shard_optimizer {
            try_knob(
                "parallel.shard_optimizer = true".into(),
                MemoryInputs {
                    shard_optimizer: true,
                    ..inp.clone()
                },
            );
        }
        let lighter: &[Recompute] = match inp.recompute {
            Recompute::None => &[Recompute::Selective, Recompute::Full],
            Recompute::Selective => &[Recompute::Full],
            Recompute::Full => &[],
        };
        for &recompute in lighter {
            try_knob(
                format!("model.recompute = \"{}\"", recompute.as_str()),
                MemoryInputs {
                    recompute,
                    ..inp.clone()
                },
            );
        }
        if inp.tokens_per_microbatch >= 2 * inp.model.max_seq_len {
            try_knob(
                format!("parallel.microbatches = {}", inp.microbatches * 2),
                MemoryInputs {
                    microbatches: inp.microbatches * 2,
                    tokens_per_microbatch: inp.tokens_per_microbatch / 2,
                    ..inp.clone()
                },
            );
        }
        let m = &inp.model;
        let tp2 = l.tp * 2;
        if m.n_heads.is_multiple_of(u64::from(tp2)) && m.d_ffn.is_multiple_of(u64::from(tp2)) {
            try_knob(
                format!("parallel.tp = {tp2}"),
                MemoryInputs {
                    layout: Layout::new(tp2, l.pp, l.dp),
                    ..inp.clone()
                },
            );
        }
        let pp2 = l.pp * 2;
        if m.n_layers >= u64::from(pp2 * inp.virtual_stages) {
            try_knob(
                format!("parallel.pp = {pp2}"),
                MemoryInputs {
                    layout: Layout::new(l.tp, pp2, l.dp),
                    ..inp.clone()
                },
            );
        }
        knobs.sort_by_key(|k| k.1);
        let fitting: Vec<&(String, u64)> = knobs.iter().filter(|k| k.1 <= cap).collect();
        let advice = if !fitting.is_empty() {
            let list: Vec<String> = fitting
                .iter()
                .map(|(k, b)| format!("{k} ({:.2} GiB)", gib(*b)))
                .collect();
            format!("it fits with {}", list.join(", or "))
        } else if !knobs.is_empty() {
            let list: Vec<String> = knobs
                .iter()
                .map(|(k, b)| format!("{k} ({:.2} GiB)", gib(*b)))
                .collect();
            format!(
                "no one change makes it fit; these help most: {}",
                list.join(", ")
            )
        } else {
            "no layout change helps; a smaller model or a larger device is needed".into()
        };
        Some(format!(
            "rank {} (pipeline stage {}, tensor-parallel rank {}) needs {:.2} GiB of the device's {:.2} GiB ({}): {}; {advice}",
            w.rank,
            w.stage,
            w.tp_rank,
            gib(w.total_bytes),
            gib(cap),
            inp.device_from,
            parts.join(", "),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> MemoryInputs {
        MemoryInputs {
            model: ModelConfig {
                n_layers: 4,
                d_model: 128,
                n_heads: 4,
                n_kv_heads: 2,
                d_ffn: 352,
                vocab_size: 50257,
                padded_vocab_size: 50304,
                max_seq_len: 256,
                rope_theta: 10000.0,
                tie_embeddings: true,
            },
            layout: Layout::new(1, 1, 2),
            microbatches: 1,
            virtual_stages: 1,
            tokens_per_microbatch: 4096,
            device: DeviceKind::Cpu,
            precision: Precision::F32,
            shard_optimizer: false,
            recompute: Recompute::None,
            checkpoints: false,
            device_bytes: None,
            device_from: "device.memory_gib".into(),
            attention_kernel: true,
        }
    }

    /// [`tiny`] with a small vocabulary, so that a chunk of logits is not
    /// the largest transient.
    fn small_vocab() -> MemoryInputs {
        let t = tiny();
        MemoryInputs {
            model: ModelConfig {
                vocab_size: 1000,
                padded_vocab_size: 1024,
                ..t.model
            },
            ..t
        }
    }

    #[test]
    fn full_recomputation_keeps_each_blocks_input_only() {
        let none = MemoryPlan::new(&small_vocab());
        let full = MemoryPlan::new(&MemoryInputs {
            recompute: Recompute::Full,
            ..small_vocab()
        });
        let (a, b) = (none.worst(), full.worst());
        assert!(b.activations_per_microbatch_bytes * 3 < a.activations_per_microbatch_bytes);
        assert_eq!(b.transient, "recomputed block");
        assert!(b.total_bytes < a.total_bytes);
    }

    #[test]
    fn selective_recomputation_drops_the_cores_and_keeps_the_projections() {
        let gpu = |recompute| MemoryInputs {
            device: DeviceKind::Cuda,
            attention_kernel: false,
            recompute,
            ..small_vocab()
        };
        let [none, selective, full] = [Recompute::None, Recompute::Selective, Recompute::Full]
            .map(|r| MemoryPlan::new(&gpu(r)).worst().clone());
        let act = |m: &RankMemory| m.activations_per_microbatch_bytes;
        assert!(act(&full) < act(&selective) && act(&selective) < act(&none));
        // On the device a block of attention outweighs the rebuilt core;
        // with the CPU's kernel the core is the largest transient.
        assert_eq!(selective.transient, "attention block");
        let cpu = MemoryPlan::new(&MemoryInputs {
            recompute: Recompute::Selective,
            layout: Layout::new(1, 1, 1),
            ..small_vocab()
        });
        assert_eq!(cpu.worst().transient, "recomputed core");
    }

    /// The device path's attention is blocked: what a layer keeps grows
    /// with the tokens, not with the sequence's square, and its largest
    /// transient is one block's (64 MiB of scores, three copies).
    #[test]
    fn device_attention_keeps_no_t_by_t_scores() {
        let at = |seq: u64| {
            MemoryPlan::new(&MemoryInputs {
                device: DeviceKind::Cuda,
                attention_kernel: false,
                model: ModelConfig {
                    max_seq_len: seq,
                    ..small_vocab().model
                },
                tokens_per_microbatch: 8192,
                ..small_vocab()
            })
            .worst()
            .clone()
        };
        let (short, long) = (at(1024), at(8192));
        assert_eq!(
            short.activations_per_microbatch_bytes,
            long.activations_per_microbatch_bytes
        );
        assert_eq!(long.transient, "attention block");
        let block = 3 * ATTENTION_BLOCK_BYTES;
        assert!(long.transient_bytes > block / 2 && long.transient_bytes < block + (16 << 20));
        // At 8,192 tokens and 4 heads one block is 512 query rows.
        assert_eq!(attention_block_rows(1, 4, 8192), 512);
        assert_eq!(attention_block_rows(1, 4, 8), 8);
        assert_eq!(attention_block_rows(64, 64, 131_072), 16);
    }

    /// On wgpu the device pools' pages are counted (one part-used page of
    /// each sliced pool); the parts still sum to the total.
    #[test]
    fn wgpu_counts_the_pools_pages() {
        let on = |device| {
            MemoryPlan::new(&MemoryInputs {
                device,
                attention_kernel: false,
                ..small_vocab()
            })
            .worst()
            .clone()
        };
        let (wgpu, cuda) = (on(DeviceKind::Wgpu), on(DeviceKind::Cuda));
        assert_eq!(cuda.pool_pages_bytes, 0);
        assert_eq!(wgpu.pool_pages_bytes, (64 + 8) << 20);
        assert_eq!(wgpu.total_bytes, cuda.total_bytes + wgpu.pool_pages_bytes);
        let parts: u64 = wgpu.parts().iter().map(|p| p.1).sum();
        assert_eq!(parts, wgpu.total_bytes);

        // The tiny recipe on one rank: its head's three chunks of logits
        // (256 rows of 50,304) each take most of a 64 MiB page, whose
        // tails no other chunk can use. On lavapipe its pools reserved
        // 763,363,328 bytes.
        let tiny = MemoryPlan::new(&MemoryInputs {
            device: DeviceKind::Wgpu,
            attention_kernel: false,
            layout: Layout::new(1, 1, 1),
            tokens_per_microbatch: 8192,
            ..tiny()
        })
        .worst()
        .clone();
        assert_eq!(tiny.transient, "logits chunk");
        let chunk = 256 * 50304 * 4;
        assert_eq!(tiny.pool_pages_bytes, (72 << 20) + 3 * ((64 << 20) - chunk));
        assert!(tiny.total_bytes >= 763_363_328, "{}", tiny.total_bytes);
    }

    #[test]
    fn sharding_the_optimizer_divides_its_state_by_dp() {
        let plain = MemoryPlan::new(&tiny());
        let sharded = MemoryPlan::new(&MemoryInputs {
            shard_optimizer: true,
            ..tiny()
        });
        let (a, b) = (plain.worst(), sharded.worst());
        assert_eq!(a.params, b.params);
        assert_eq!(a.optimizer_bytes, 8 * a.params);
        assert_eq!(b.optimizer_bytes, 8 * a.params.div_ceil(2));
        assert_eq!(
            a.total_bytes - b.total_bytes,
            a.optimizer_bytes - b.optimizer_bytes
        );
    }

    #[test]
    fn the_first_stage_holds_a_microbatch_per_stage_in_flight() {
        let inp = MemoryInputs {
            layout: Layout::new(1, 4, 1),
            microbatches: 8,
            ..tiny()
        };
        let plan = MemoryPlan::new(&inp);
        let flights: Vec<u32> = plan.ranks.iter().map(|r| r.in_flight).collect();
        assert_eq!(flights, [4, 3, 2, 1]);
        // Fewer microbatches than stages: all of them.
        let plan = MemoryPlan::new(&MemoryInputs {
            microbatches: 2,
            ..inp
        });
        assert_eq!(plan.ranks[0].in_flight, 2);
    }

    #[test]
    fn a_job_that_cannot_fit_is_refused_with_its_numbers_and_the_knobs() {
        let inp = MemoryInputs {
            device_bytes: Some(200 << 20),
            device_from: "device.memory_gib".into(),
            attention_kernel: true,
            ..tiny()
        };
        let plan = MemoryPlan::new(&inp);
        assert!(!plan.fits());
        let why = plan.refusal(&inp).expect("refused");
        assert!(
            why.starts_with("rank 0 (pipeline stage 0, tensor-parallel rank 0) needs"),
            "{why}"
        );
        assert!(
            why.contains("of the device's 0.20 GiB (device.memory_gib)"),
            "{why}"
        );
        assert!(why.contains("activations"), "{why}");
        assert!(
            why.contains("it fits with model.recompute = \"full\""),
            "{why}"
        );
        // Already recomputing, and tighter: no one change is enough, and
        // those that help most are named.
        let tight = MemoryInputs {
            device_bytes: Some(120 << 20),
            device_from: "device.memory_gib".into(),
            attention_kernel: true,
            recompute: Recompute::Full,
            ..tiny()
        };
        let why = MemoryPlan::new(&tight).refusal(&tight).expect("refused");
        assert!(why.contains("no one change makes it fit"), "{why}");
        assert!(why.contains("parallel.shard_optimizer = true"), "{why}");
        assert!(why.contains("parallel.pp = 2"), "{why}");
        // Room enough: no refusal.
        let roomy = MemoryInputs {
            device_bytes: Some(1 << 30),
            device_from: "device.memory_gib".into(),
            attention_kernel: true,
            ..tiny()
        };
        assert!(MemoryPlan::new(&roomy).refusal(&roomy).is_none());
    }
}
