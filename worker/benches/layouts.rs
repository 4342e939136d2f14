//! Training throughput and the 1F1B bubble under parallel layouts, printed
//! as JSON lines: `cargo bench -p strata-worker --bench layouts`.
//!
//! Every rank runs on its own thread with its groups joined over TCP on
//! loopback (as worker processes are), f32 on NdArray (one core per rank),
//! sequences of 128 tokens, 2,048 tokens per step. Each configuration runs
//! `WARMUP` steps, then `STEPS` measured ones (`STRATA_BENCH_STEPS`, 4 by
//! default); a line reports the median step's tokens/s and, per stage,
//! the measured bubble (time blocked on the neighbouring stages over the
//! schedule's wall time) beside 1F1B's theory (p − 1)/(m + p − 1).
//!
//! Two shapes:
//! - `tiny-4l` (4 layers, d = 64, 4 query and 2 KV heads, SwiGLU 176, a
//!   tied 50,304-row vocabulary): the shape strata's throughput is
//!   measured on, for tp = 2 and pp = 2 against one process. Its 50k-row
//!   head is most of the compute and sits on the last stage, so pipeline
//!   stages are far from equal here.
//! - `balanced-8l` (8 layers, d = 128, 8 query and 4 KV heads, SwiGLU
//!   352, 256-row vocabulary): stages of nearly equal cost, where the
//!   measured bubble can be held against the theory, with plain and
//!   interleaved (2 chunks per stage) 1F1B. With more ranks than cores,
//!   ranks share cores, which shows in the measurement too.

use std::time::Instant;

use burn::backend::{Autodiff, NdArray};
use strata_recipe::{AdamWConfig, Layout, ModelConfig};
use strata_worker::collective::Collective;
use strata_worker::collective::tcp::loopback_group;
use strata_worker::params::ParamTable;
use strata_worker::train::{Groups, LocalBatch, StageStats, Trainer};

type B = Autodiff<NdArray<f32>>;

/// The worker binary's allocator, so that allocation costs are the
/// product's.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

const WARMUP: usize = 1;
const TOKENS: usize = 2048;
const SEQ: usize = 128;

fn tiny_4l() -> ModelConfig {
    ModelConfig {
        n_layers: 4,
        d_model: 64,
        n_heads: 4,
        n_kv_heads: 2,
        d_ffn: 176,
        vocab_size: 50257,
        padded_vocab_size: 50304,
        max_seq_len: SEQ as u64,
        rope_theta: 10000.0,
        tie_embeddings: true,
    }
}

fn balanced_8l() -> ModelConfig {
    ModelConfig {
        n_layers: 8,
        d_model: 128,
        n_heads: 8,
        n_kv_heads: 4,
        d_ffn: 352,
        vocab_size: 256,
        padded_vocab_size: 256,
        max_seq_len: SEQ as u64,
        rope_theta: 10000.0,
        tie_embeddings: true,
    }
}

fn tokens(step: usize, n: usize, vocab: u64) -> Vec<u32> {
    let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ step as u64;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % vocab) as u32
        })
        .collect()
}

struct Measured {
    tokens_per_s: f64,
    stages: Vec<StageStats>,
}

fn run(cfg: ModelConfig, layout: Layout, m: usize, chunks: u32, steps: usize) -> Measured {
    let world = Groups::world(layout, cfg.tie_embeddings, chunks, |name, size| {
        loopback_group(name, size)
            .expect("a loopback group")
            .into_iter()
            .map(|c| Box::new(c) as Box<dyn Collective>)
            .collect()
    });
    let adamw = AdamWConfig::default();
    let results = std::thread::scope(|s| {
        let handles: Vec<_> = world
            .into_iter()
            .map(|(c, groups)| {
                let cfg = &cfg;
                s.spawn(move || {
                    let table = ParamTable::interleaved(cfg, layout, c, chunks);
                    let mut t = Trainer::<B>::new(cfg, table, 1, adamw, groups, Default::default());
                    let mut out = Vec::new();
                    for step in 0..WARMUP + steps {
                        let rows = TOKENS / SEQ;
                        let all = tokens(step, rows * (SEQ + 1), cfg.vocab_size);
                        let per = rows / layout.dp as usize;
                        let mine = &all[c.dp as usize * per * (SEQ + 1)..][..per * (SEQ + 1)];
                        let inputs: Vec<u32> = mine
                            .chunks(SEQ + 1)
                            .flat_map(|r| r[..SEQ].to_vec())
                            .collect();
                        let targets: Vec<u32> =
                            mine.chunks(SEQ + 1).flat_map(|r| r[1..].to_vec()).collect();
                        let mb = inputs.len() / m;
                        let micro: Vec<LocalBatch<'_>> = (0..m)
                            .map(|i| LocalBatch {
                                inputs: &inputs[i * mb..(i + 1) * mb],
                                targets: &targets[i * mb..(i + 1) * mb],
                                seq_len: SEQ,
                                groups: &[],
                            })
                            .collect();
                        let t0 = Instant::now();
                        let st = t
                            .step(step as u64 + 1, &micro, TOKENS as u64, 1e-3)
                            .unwrap();
                        if step >= WARMUP {
                            out.push((t0.elapsed().as_secs_f64(), st.stages));
                        }
                    }
                    out
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a rank panicked"))
            .collect::<Vec<_>>()
    });
    // Rank 0's view (it holds every stage's timings); the step's wall time
    // is the slowest rank's.
    let mut walls: Vec<f64> = (0..steps)
        .map(|i| results.iter().map(|r| r[i].0).fold(0.0, f64::max))
        .collect();
    walls.sort_by(f64::total_cmp);
    let median = walls[steps / 2];
    let n = layout.pp as usize;
    let stages = (0..n)
        .map(|s| {
            let mean = |f: fn(&StageStats) -> f64| {
                results[0].iter().map(|(_, st)| f(&st[s])).sum::<f64>() / steps as f64
            };
            StageStats {
                forward_s: mean(|x| x.forward_s),
                backward_s: mean(|x| x.backward_s),
                wait_s: mean(|x| x.wait_s),
                pipeline_s: mean(|x| x.pipeline_s),
                tp_comm_s: mean(|x| x.tp_comm_s),
            }
        })
        .collect();
    Measured {
        tokens_per_s: TOKENS as f64 / median,
        stages,
    }
}

fn main() {
    let steps = std::env::var("STRATA_BENCH_STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(4usize);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    for (shape, tp, pp, dp, m, v) in [
        ("tiny-4l", 1, 1, 1, 1, 1),
        ("tiny-4l", 2, 1, 1, 1, 1),
        ("tiny-4l", 1, 2, 1, 4, 1),
        ("balanced-8l", 1, 1, 1, 1, 1),
        ("balanced-8l", 1, 2, 1, 4, 1),
        ("balanced-8l", 1, 2, 1, 8, 1),
        ("balanced-8l", 1, 4, 1, 8, 1),
        ("balanced-8l", 1, 2, 1, 4, 2),
        ("balanced-8l", 1, 4, 1, 8, 2),
    ] {
        let cfg = if shape == "tiny-4l" {
            tiny_4l()
        } else {
            balanced_8l()
        };
        let layout = Layout::new(tp, pp, dp);
        let r = run(cfg, layout, m, v, steps);
        let stages: Vec<serde_json::Value> = r
            .stages
            .iter()
            .enumerate()
            .map(|(i, s)| {
                serde_json::json!({
                    "stage": i,
                    "bubble": s.bubble(),
                    "wait_s": s.wait_s,
                    "forward_s": s.forward_s,
                    "backward_s": s.backward_s,
                    "pipeline_s": s.pipeline_s,
                    "tp_comm_s": s.tp_comm_s,
                })
            })
            .collect();
        let line = serde_json::json!({
            "bench": "layouts",
            "shape": shape,
            "tp": tp, "pp": pp, "dp": dp, "microbatches": m, "virtual_stages": v,
            "ranks": layout.world_size(), "cores": cores,
            "tokens_per_step": TOKENS, "seq_len": SEQ, "steps": steps,
            "tokens_per_s": r.tokens_per_s,
            "bubble_theory": layout.bubble_fraction(m as u32, v),
            "stages": stages,
        });
        println!("{line}");
    }
}
