//! The Llama-style decoder strata trains, generic over the burn backend:
//! token embedding, blocks of RMSNorm → grouped-query causal attention with
//! rotary position embeddings → RMSNorm → SwiGLU MLP, a final RMSNorm and
//! an output head, optionally tied to the embedding.
//!
//! Parameters are initialised on the host from the run's seed and each
//! parameter's name, so the same recipe gives the same weights whatever the
//! backend, device or parallel layout.

use burn::module::{Module, Param};
use burn::tensor::activation::{silu, softmax};
use burn::tensor::backend::Backend;
use burn::tensor::{Bool, Int, Tensor, TensorData};
use strata_dataplane::rng::SplitMix64;
use strata_recipe::ModelConfig;

/// RMSNorm's epsilon (Llama's).
pub const NORM_EPS: f64 = 1e-5;
/// Standard deviation of the initial weights (GPT-2, Megatron).
pub const INIT_STD: f64 = 0.02;

#[derive(Module, Debug)]
pub struct Block<B: Backend> {
    attn_norm: Param<Tensor<B, 1>>,
    /// `[d_model, n_heads·head_dim]`
    wq: Param<Tensor<B, 2>>,
    /// `[d_model, n_kv_heads·head_dim]`
    wk: Param<Tensor<B, 2>>,
    wv: Param<Tensor<B, 2>>,
    /// `[n_heads·head_dim, d_model]`
    wo: Param<Tensor<B, 2>>,
    mlp_norm: Param<Tensor<B, 1>>,
    /// `[d_model, d_ffn]`
    w_gate: Param<Tensor<B, 2>>,
    w_up: Param<Tensor<B, 2>>,
    /// `[d_ffn, d_model]`
    w_down: Param<Tensor<B, 2>>,
}

#[derive(Module, Debug)]
pub struct Llama<B: Backend> {
    /// `[padded_vocab, d_model]`
    embed: Param<Tensor<B, 2>>,
    blocks: Vec<Block<B>>,
    final_norm: Param<Tensor<B, 1>>,
    /// `[d_model, padded_vocab]`; `None` when tied to the embedding.
    head: Option<Param<Tensor<B, 2>>>,
    /// Rotary tables, `[max_seq_len, head_dim/2]` (constants).
    cos: Tensor<B, 2>,
    sin: Tensor<B, 2>,
    n_heads: usize,
    n_kv_heads: usize,
    head_dim: usize,
}

/// Deterministic N(0, std²) values for the parameter `name`.
fn normal(seed: u64, name: &str, n: usize, std: f64) -> Vec<f32> {
    let key = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    let mut rng = SplitMix64::for_key(seed, key);
    let mut out = Vec::with_capacity(n + 1);
    while out.len() < n {
        // Box–Muller: two normals from two uniforms in (0, 1].
        let u1 = 1.0 - rng.next_f64();
        let u2 = rng.next_f64();
        let r = (-2.0 * u1.ln()).sqrt() * std;
        let a = std::f64::consts::TAU * u2;
        out.push((r * a.cos()) as f32);
        out.push((r * a.sin()) as f32);
    }
    out.truncate(n);
    out
}

fn weight<B: Backend>(
    seed: u64,
    name: &str,
    shape: [usize; 2],
    std: f64,
    device: &B::Device,
) -> Param<Tensor<B, 2>> {
    let values = normal(seed, name, shape[0] * shape[1], std);
    Param::from_tensor(Tensor::from_data(TensorData::new(values, shape), device))
}

fn ones<B: Backend>(n: usize, device: &B::Device) -> Param<Tensor<B, 1>> {
    Param::from_tensor(Tensor::ones([n], device))
}

/// RMSNorm over the last dimension with gain `g`.
fn rms_norm<B: Backend>(x: Tensor<B, 2>, g: &Param<Tensor<B, 1>>) -> Tensor<B, 2> {
    let inv = (x.clone().square().mean_dim(1) + NORM_EPS).sqrt().recip();
    x * inv * g.val().unsqueeze::<2>()
}

impl<B: Backend> Llama<B> {
    pub fn new(cfg: &ModelConfig, seed: u64, device: &B::Device) -> Llama<B> {
        let d = cfg.d_model as usize;
        let (h, kv) = (cfg.n_heads as usize, cfg.n_kv_heads as usize);
        let hd = cfg.head_dim() as usize;
        let f = cfg.d_ffn as usize;
        let v = cfg.padded_vocab_size as usize;
        // Residual-stream projections scaled by 1/√(2L) (GPT-2).
        let out_std = INIT_STD / (2.0 * cfg.n_layers as f64).sqrt();
        let blocks = (0..cfg.n_layers as usize)
            .map(|l| {
                let w = |name: &str, shape, std| {
                    weight(seed, &format!("blocks.{l}.{name}"), shape, std, device)
                };
                Block {
                    attn_norm: ones(d, device),
                    wq: w("wq", [d, h * hd], INIT_STD),
                    wk: w("wk", [d, kv * hd], INIT_STD),
                    wv: w("wv", [d, kv * hd], INIT_STD),
                    wo: w("wo", [h * hd, d], out_std),
                    mlp_norm: ones(d, device),
                    w_gate: w("w_gate", [d, f], INIT_STD),
                    w_up: w("w_up", [d, f], INIT_STD),
                    w_down: w("w_down", [f, d], out_std),
                }
            })
            .collect();
        let (cos, sin) = rope_tables(cfg.max_seq_len as usize, hd, cfg.rope_theta);
        let half = hd / 2;
        let table = |t: Vec<f32>| {
            Tensor::from_data(TensorData::new(t, [cfg.max_seq_len as usize, half]), device)
        };
        Llama {
            embed: weight(seed, "embed", [v, d], INIT_STD, device),
            blocks,
            final_norm: ones(d, device),
            head: (!cfg.tie_embeddings).then(|| weight(seed, "head", [d, v], INIT_STD, device)),
            cos: table(cos),
            sin: table(sin),
            n_heads: h,
            n_kv_heads: kv,
            head_dim: hd,
        }
    }

    /// Logits `[batch·seq, padded_vocab]` for `tokens` `[batch, seq]`.
    pub fn forward(&self, tokens: Tensor<B, 2, Int>) -> Tensor<B, 2> {
        let [b, t] = tokens.dims();
        let mut x = self.embed.val().select(0, tokens.reshape([b * t]));
        let mask = Tensor::<B, 2, Bool>::tril_mask([t, t], 0, &x.device())
            .unsqueeze::<4>()
            .expand([b, self.n_heads, t, t]);
        for block in &self.blocks {
            let a = self.attention(block, rms_norm(x.clone(), &block.attn_norm), b, t, &mask);
            x = x + a;
            let m = rms_norm(x.clone(), &block.mlp_norm);
            let m = (silu(m.clone().matmul(block.w_gate.val())) * m.matmul(block.w_up.val()))
                .matmul(block.w_down.val());
            x = x + m;
        }
        let x = rms_norm(x, &self.final_norm);
        match &self.head {
            Some(head) => x.matmul(head.val()),
            None => x.matmul(self.embed.val().transpose()),
        }
    }

    fn attention(
        &self,
        block: &Block<B>,
        x: Tensor<B, 2>,
        b: usize,
        t: usize,
        mask: &Tensor<B, 4, Bool>,
    ) -> Tensor<B, 2> {
        let (h, kv, hd) = (self.n_heads, self.n_kv_heads, self.head_dim);
        let heads = |y: Tensor<B, 2>, n: usize| y.reshape([b, t, n, hd]).swap_dims(1, 2);
        let q = self.rope(heads(x.clone().matmul(block.wq.val()), h), t);
        let k = self.rope(heads(x.clone().matmul(block.wk.val()), kv), t);
        let v = heads(x.matmul(block.wv.val()), kv);
        // Query head i reads KV head i / (h / kv).
        let group = |y: Tensor<B, 4>| {
            if kv == h {
                y
            } else {
                y.unsqueeze_dim::<5>(2)
                    .expand([b, kv, h / kv, t, hd])
                    .reshape([b, h, t, hd])
            }
        };
        let (k, v) = (group(k), group(v));
        let scores = q.matmul(k.swap_dims(2, 3)) / (hd as f64).sqrt();
        let probs = softmax(scores.mask_fill(mask.clone(), -1e9), 3);
        probs
            .matmul(v)
            .swap_dims(1, 2)
            .reshape([b * t, h * hd])
            .matmul(block.wo.val())
    }

    /// Rotary embedding of `x` `[b, heads, t, head_dim]` (the rotate-half
    /// form of Llama).
    fn rope(&self, x: Tensor<B, 4>, t: usize) -> Tensor<B, 4> {
        let [b, n, _, hd] = x.dims();
        let half = hd / 2;
        let table = |c: &Tensor<B, 2>| {
            c.clone()
                .narrow(0, 0, t)
                .unsqueeze::<4>()
                .expand([b, n, t, half])
        };
        let (cos, sin) = (table(&self.cos), table(&self.sin));
        let x1 = x.clone().narrow(3, 0, half);
        let x2 = x.narrow(3, half, half);
        Tensor::cat(
            vec![
                x1.clone() * cos.clone() - x2.clone() * sin.clone(),
                x1 * sin + x2 * cos,
            ],
            3,
        )
    }
}

/// `cos` and `sin` of position × frequency, `[max_seq_len, head_dim/2]`
/// row-major, frequencies θ^(−2j/head_dim).
fn rope_tables(max_seq_len: usize, head_dim: usize, theta: f64) -> (Vec<f32>, Vec<f32>) {
    let half = head_dim / 2;
    let mut cos = Vec::with_capacity(max_seq_len * half);
    let mut sin = Vec::with_capacity(max_seq_len * half);
    for pos in 0..max_seq_len {
        for j in 0..half {
            let freq = theta.powf(-2.0 * j as f64 / head_dim as f64);
            let angle = pos as f64 * freq;
            cos.push(angle.cos() as f32);
            sin.push(angle.sin() as f32);
        }
    }
    (cos, sin)
}

/// Summed cross-entropy of `logits` `[n, vocab]` against `targets` `[n]`,
/// divided by `denominator` (the tokens of the whole global step, so that
/// data-parallel gradients add up to the single-process gradient).
pub fn cross_entropy<B: Backend>(
    logits: Tensor<B, 2>,
    targets: Tensor<B, 1, Int>,
    denominator: f64,
) -> Tensor<B, 1> {
    let [n, _] = logits.dims();
    // logsumexp − the target's logit: one vocabulary-wide temporary fewer
    // than log_softmax followed by a gather. The max is a constant shift
    // (no gradient flows through it).
    let max = logits.clone().detach().max_dim(1);
    let lse = (logits.clone() - max.clone()).exp().sum_dim(1).log() + max;
    let picked = logits.gather(1, targets.reshape([n, 1]));
    (lse - picked).sum() / denominator
}
