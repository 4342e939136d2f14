//! The Llama family's mathematics, on any backend and on any rank's share
//! of the weights.
//!
//! The model is token embedding, blocks of RMSNorm → grouped-query causal
//! attention with rotary position embeddings (rotate-half) → RMSNorm →
//! SwiGLU MLP, a final RMSNorm and an output head, optionally tied to the
//! embedding. A branch computed from a tensor-parallel rank's heads and
//! columns is that rank's partial sum (Megatron's column- then
//! row-parallel pair; [`crate::tp`] ties the shares together), so the
//! same functions serve the whole model and every shard of it. Where the
//! CPU backend has a kernel ([`crate::cpu`]) a function runs it, and
//! tensor operations elsewhere.

use burn::tensor::activation::softmax;
use burn::tensor::backend::Backend;
use burn::tensor::{Bool, DType, Int, Tensor};
use strata_dataplane::family::Llama;

use crate::cpu::{self, HeadLayout, HeadPass};
use crate::params::BlockParam;
use crate::tensors::{accumulate, from_vec, in_dtype, to_vec, token_ids};

/// RMSNorm's epsilon.
pub const NORM_EPS: f64 = Llama::NORM_EPS;

/// RMSNorm over the last dimension with gain `g` (`[1, d]`): one
/// operation on the CPU backend ([`cpu::rms_norm`]), tensor operations
/// elsewhere.
pub fn rms_norm<X: Backend>(x: Tensor<X, 2>, g: Tensor<X, 2>) -> Tensor<X, 2> {
    let (x, g) = match cpu::rms_norm(x, g, NORM_EPS as f32) {
        Ok(y) => return y,
        Err(inputs) => inputs,
    };
    // Under mixed precision the norm is taken in f32.
    let dtype = x.dtype();
    if dtype != DType::F32 {
        let y = rms_norm(in_dtype(x, DType::F32), in_dtype(g, DType::F32));
        return in_dtype(y, dtype);
    }
    let inv = (x.clone().square().mean_dim(1) + NORM_EPS).sqrt().recip();
    x * inv * g
}

/// Sizes of this rank's part of the model.
#[derive(Debug, Clone, Copy)]
pub struct Dims {
    pub d_model: usize,
    /// Query and KV heads on this rank.
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// This rank's vocabulary rows: `vocab_start..vocab_start + vocab_len`.
    pub vocab_start: usize,
    pub vocab_len: usize,
}

/// The rotary embedding's tables for every position up to the model's
/// length: `cos` and `sin` of each position's angles, `[positions,
/// head_dim]` (each half-dimension's angle twice, as rotate-half pairs
/// them), and `rot` (`[head_dim, head_dim]`), the signed permutation with
/// `x · rot = cat(−x₂, x₁)`. The rotation is then two contiguous
/// products with tables broadcast over the batch, and one small matrix
/// product: no strided half-views (the CPU backends walk those element
/// by element).
///
/// The CPU kernel ([`cpu::causal_attention`]) reads the same tables from
/// the host (`tables`).
pub struct Rope<X: Backend> {
    cos: Tensor<X, 2>,
    sin: Tensor<X, 2>,
    rot: Tensor<X, 2>,
    tables: cpu::RopeTables,
}

impl<X: Backend> Rope<X> {
    pub fn new(max_seq_len: usize, head_dim: usize, theta: f64, device: &X::Device) -> Rope<X> {
        let half = head_dim / 2;
        let mut cos = Vec::with_capacity(max_seq_len * head_dim);
        let mut sin = Vec::with_capacity(max_seq_len * head_dim);
        for pos in 0..max_seq_len {
            let angles: Vec<f64> = (0..half)
                .map(|j| pos as f64 * theta.powf(-2.0 * j as f64 / head_dim as f64))
                .collect();
            for _ in 0..2 {
                cos.extend(angles.iter().map(|a| a.cos() as f32));
                sin.extend(angles.iter().map(|a| a.sin() as f32));
            }
        }
        let mut rot = vec![0f32; head_dim * head_dim];
        for j in 0..half {
            rot[(j + half) * head_dim + j] = -1.0;
            rot[j * head_dim + j + half] = 1.0;
        }
        Rope {
            cos: from_vec(cos.clone(), [max_seq_len, head_dim], device),
            sin: from_vec(sin.clone(), [max_seq_len, head_dim], device),
            rot: from_vec(rot, [head_dim, head_dim], device),
            tables: cpu::RopeTables::new(cos, sin, head_dim),
        }
    }

    pub(crate) fn map<Y: Backend>(&self, f: impl Fn(Tensor<X, 2>) -> Tensor<Y, 2>) -> Rope<Y> {
        Rope {
            cos: f(self.cos.clone()),
            sin: f(self.sin.clone()),
            rot: f(self.rot.clone()),
            tables: self.tables.clone(),
        }
    }

    /// Rotates `x` `[b, t, heads, head_dim]` (the projection's own layout,
    /// heads not yet a batch dimension) by each position's angles, times
    /// `scale` (folded into the tables: the attention's 1/√d on the
    /// queries costs no pass of its own).
    fn apply(&self, x: Tensor<X, 4>, scale: f64) -> Tensor<X, 4> {
        let [b, t, n, hd] = x.dims();
        let dtype = x.dtype();
        let table = |c: &Tensor<X, 2>| {
            let c = in_dtype(c.clone().narrow(0, 0, t), dtype);
            let c = if scale == 1.0 { c } else { c.mul_scalar(scale) };
            // [t, n·hd], contiguous: broadcast over the batch only.
            c.reshape([t, 1, hd])
                .expand([t, n, hd])
                .reshape([1, t * n * hd])
        };
        let flat = x.reshape([b * t * n, hd]);
        let rotated = flat.clone().matmul(in_dtype(self.rot.clone(), dtype));
        let out = flat.reshape([b, t * n * hd]) * table(&self.cos)
            + rotated.reshape([b, t * n * hd]) * table(&self.sin);
        out.reshape([b, t, n, hd])
    }
}

/// This rank's attention heads on `y` (`[b·t, d]`, already normed): its
/// share of the output projection, a partial sum under tensor parallelism.
#[allow(clippy::too_many_arguments)]
pub(crate) fn attention<X: Backend>(
    y: Tensor<X, 2>,
    w: [Tensor<X, 2>; 4],
    rope: &Rope<X>,
    b: usize,
    t: usize,
    dims: &Dims,
) -> Tensor<X, 2> {
    let [wq, wk, wv, wo] = w;
    let qkv = [linear(y.clone(), wq), linear(y.clone(), wk), linear(y, wv)];
    linear(attention_core(qkv, rope, b, t, dims), wo)
}

/// `x · w` for a projection: one operation on the CPU backend
/// ([`cpu::matmul`]), burn's product elsewhere.
pub(crate) fn linear<X: Backend>(x: Tensor<X, 2>, w: Tensor<X, 2>) -> Tensor<X, 2> {
    match cpu::matmul(x, w) {
        Ok(y) => y,
        Err((x, w)) => x.matmul(w),
    }
}

/// Causal self-attention of `q` (`[b, t, h, hd]`) over `k` and `v` (`[b,
/// t, kv, hd]`; query head `i` reads KV head `i / (h / kv)`), with rotary
/// embeddings from position 0 and the scale 1/√hd: `[b, t, h, hd]`. On
/// the CPU backend one operation ([`cpu::causal_attention`]); elsewhere
/// tensor operations, blocked ([`crate::attention`]) where the backend
/// allows, whole otherwise.
pub fn causal_attention<X: Backend>(
    q: Tensor<X, 4>,
    k: Tensor<X, 4>,
    v: Tensor<X, 4>,
    rope: &Rope<X>,
) -> Tensor<X, 4> {
    let [b, t, h, hd] = q.dims();
    let kv = k.dims()[2];
    let scale = 1.0 / (hd as f64).sqrt();
    let (q, k, v) = match cpu::causal_attention(q, k, v, &rope.tables, scale as f32) {
        Ok(out) => return out,
        Err(inputs) => inputs,
    };
    let q = rope.apply(q, scale);
    let k = rope.apply(k, 1.0);
    let (q, k, v) = (q.swap_dims(1, 2), k.swap_dims(1, 2), v.swap_dims(1, 2));
    // Query head i reads KV head i / (h / kv).
    let group = |z: Tensor<X, 4>| {
        if kv == h {
            z
        } else {
            z.unsqueeze_dim::<5>(2)
                .expand([b, kv, h / kv, t, hd])
                .reshape([b, h, t, hd])
        }
    };
    let (k, v) = (group(k), group(v));
    // Blocked, so that no [t, t] scores exist at once, where the backend
    // is one the blocked operation knows (every backend strata trains on).
    let rows = crate::attention::attention_block_rows(b, h, t);
    let (q, k, v) = match crate::attention::causal(q, k, v, rows) {
        Ok(out) => return out.swap_dims(1, 2),
        Err(qkv) => qkv,
    };
    crate::attention::warn_whole::<X>(t, &q.device());
    // The causal mask as an additive bias, broadcast over batch and heads:
    // where it is −1e9 the probabilities are 0, and so are their
    // gradients, as with a masked fill.
    let mask = Tensor::<X, 2, Bool>::tril_mask([t, t], 0, &q.device());
    // The sum is taken as [b·h, t·t] + [1, t·t]: a broadcast over one
    // leading dimension, which the CPU backends run as contiguous rows
    // (over two, they walk it element by element).
    let bias = Tensor::<X, 2>::zeros([t, t], &q.device())
        .mask_fill(mask, -1e9)
        .reshape([1, t * t]);
    // Under mixed precision the scores are taken to f32 for the softmax.
    let dtype = q.dtype();
    let scores = in_dtype(q.matmul(k.swap_dims(2, 3)), DType::F32).reshape([b * h, t * t]) + bias;
    let probs = in_dtype(softmax(scores.reshape([b, h, t, t]), 3), dtype);
    probs.matmul(v).swap_dims(1, 2)
}

/// This rank's columns of the SwiGLU MLP on `y`: a partial sum under
/// tensor parallelism.
pub(crate) fn mlp<X: Backend>(y: Tensor<X, 2>, w: [Tensor<X, 2>; 3]) -> Tensor<X, 2> {
    let [gate, up, down] = w;
    linear(cpu::swiglu(linear(y.clone(), gate), linear(y, up)), down)
}

/// Attention's core from the query, key and value projections (`[b·t,
/// h·hd]`, `[b·t, kv·hd]` twice): the heads' outputs `[b·t, h·hd]`, the
/// input of the output projection.
pub(crate) fn attention_core<X: Backend>(
    [q, k, v]: [Tensor<X, 2>; 3],
    rope: &Rope<X>,
    b: usize,
    t: usize,
    dims: &Dims,
) -> Tensor<X, 2> {
    let (h, kv, hd) = (dims.heads, dims.kv_heads, dims.head_dim);
    let split = |z: Tensor<X, 2>, n: usize| z.reshape([b, t, n, hd]);
    let (q, k, v) = (split(q, h), split(k, kv), split(v, kv));
    causal_attention(q, k, v, rope).reshape([b * t, h * hd])
}

/// The gradients of `x · w` from `dy`, `(dx, dw)`, without the product:
/// the kernels autodiff's backward of [`linear`] runs ([`cpu::matmul_grads`]
/// on the CPU backend; elsewhere burn's own, `dy · wᵀ` and `xᵀ · dy`).
pub(crate) fn linear_grads<X: Backend>(
    x: Tensor<X, 2>,
    w: Tensor<X, 2>,
    dy: Tensor<X, 2>,
) -> (Tensor<X, 2>, Tensor<X, 2>) {
    match cpu::matmul_grads(x, w, dy) {
        Ok(grads) => grads,
        Err((x, w, dy)) => (dy.clone().matmul(w.transpose()), x.transpose().matmul(dy)),
    }
}

/// One transformer block on the residual stream `x` (`[b·t, d]`), whole
/// (no tensor parallelism), its parameters read by `weight`.
pub(crate) fn block<X: Backend>(
    x: Tensor<X, 2>,
    mut weight: impl FnMut(BlockParam) -> Tensor<X, 2>,
    rope: &Rope<X>,
    b: usize,
    t: usize,
    dims: &Dims,
) -> Tensor<X, 2> {
    use BlockParam::*;
    let y = rms_norm(x.clone(), weight(AttnNorm));
    let x = x + branch(y, true, &mut weight, rope, b, t, dims);
    let y = rms_norm(x.clone(), weight(MlpNorm));
    x + branch(y, false, weight, rope, b, t, dims)
}

/// A residual branch after its norm, on `y`: attention when `attn`, else
/// the MLP, its weights read by `weight` (this rank's share under tensor
/// parallelism: a partial sum).
pub(crate) fn branch<X: Backend>(
    y: Tensor<X, 2>,
    attn: bool,
    mut weight: impl FnMut(BlockParam) -> Tensor<X, 2>,
    rope: &Rope<X>,
    b: usize,
    t: usize,
    dims: &Dims,
) -> Tensor<X, 2> {
    use BlockParam::*;
    if attn {
        attention(y, [Wq, Wk, Wv, Wo].map(&mut weight), rope, b, t, dims)
    } else {
        mlp(y, [WGate, WUp, WDown].map(weight))
    }
}

/// Summed cross-entropy of `logits` `[n, vocab]` against `targets` `[n]`,
/// divided by `denominator` (the target tokens of the whole global step,
/// so that gradients of every microbatch and rank add up to the gradient of
/// the step's mean loss).
pub fn cross_entropy<X: Backend>(
    logits: Tensor<X, 2>,
    targets: Tensor<X, 1, Int>,
    denominator: f64,
) -> Tensor<X, 1> {
    let [n, _] = logits.dims();
    // logsumexp − the target's logit. The max is a constant shift.
    let max = logits.clone().detach().max_dim(1);
    let lse = (logits.clone() - max.clone()).exp().sum_dim(1).log() + max;
    let picked = logits.gather(1, targets.reshape([n, 1]));
    (lse - picked).sum() / denominator
}

/// What the last stage's loss reports and weighs token by token, beyond
/// the summed loss.
#[derive(Default)]
pub struct PerToken<'a> {
    /// Each token's (undivided, unweighted) loss, appended in row order.
    pub losses: Option<&'a mut Vec<f64>>,
    /// Loss-based reweighting: each token's multiplier of its loss
    /// gradient, from every token's loss. The losses come first (a pass
    /// of their own in the fused head), the gradient after; the
    /// multipliers are constants of the backward, and the reported loss
    /// stays unweighted.
    pub weigh: Option<&'a mut Weigh<'a>>,
}

/// Each token's multiplier of its loss gradient, from every token's loss.
pub type Weigh<'a> = dyn FnMut(&[f64]) -> Vec<f32> + 'a;

/// The output head and the cross-entropy, with their gradients, without
/// materializing the logits of all `n` rows: rows go in chunks, each
/// one's logits `y_c · Wᵀ`, softmax and loss computed, then its gradient
/// `(softmax − onehot) / denominator` turned into the chunk's `dy` and its
/// share of `dW` at once. `w` is the head's weight in `layout`. Returns
/// the summed loss over `denominator`, `dy` (`[n, d]`) and the head's
/// gradient in `w`'s shape. One scalar reaches the host, and each row's
/// (unscaled) loss when `per` asks for them. Under reweighting
/// (`per.weigh`) the losses are computed first, in a pass of one product
/// per chunk, and each token's gradient is then scaled by its
/// multiplier. The CPU backend runs [`cpu::head_cross_entropy`]; others,
/// tensor operations.
pub fn fused_head_cross_entropy<X: Backend>(
    y: Tensor<X, 2>,
    w: Tensor<X, 2>,
    layout: HeadLayout,
    targets: &[u32],
    denominator: f64,
    device: &X::Device,
    per: PerToken<'_>,
) -> (f64, Tensor<X, 2>, Tensor<X, 2>) {
    let PerToken { losses, weigh } = per;
    let scales = weigh.map(|weigh| {
        let mut first = Vec::with_capacity(targets.len());
        head_pass(
            &y,
            &w,
            layout,
            (targets, denominator),
            device,
            Some(&mut first),
            HeadPass::Losses,
        );
        let scales = weigh(&first);
        assert_eq!(scales.len(), targets.len(), "one multiplier per token");
        scales
    });
    let pass = match &scales {
        Some(s) => HeadPass::Weighted(s),
        None => HeadPass::Full,
    };
    head_pass(&y, &w, layout, (targets, denominator), device, losses, pass)
}

/// One pass of [`fused_head_cross_entropy`].
fn head_pass<X: Backend>(
    y: &Tensor<X, 2>,
    w: &Tensor<X, 2>,
    layout: HeadLayout,
    (targets, denominator): (&[u32], f64),
    device: &X::Device,
    mut tokens: Option<&mut Vec<f64>>,
    pass: HeadPass<'_>,
) -> (f64, Tensor<X, 2>, Tensor<X, 2>) {
    if let Some(done) = cpu::flex_head_cross_entropy(
        y,
        w,
        layout,
        targets,
        denominator,
        device,
        tokens.as_deref_mut(),
        pass,
    ) {
        return done;
    }
    let w_rows = match layout {
        HeadLayout::Rows => w.clone(),
        HeadLayout::Columns => w.clone().transpose(),
    };
    let (loss, dy, dwt) = head_by_tensor_ops(
        y.clone(),
        w_rows,
        (targets, denominator),
        device,
        tokens,
        pass,
    );
    let dw = match (layout, pass) {
        (_, HeadPass::Losses) | (HeadLayout::Columns, _) => dwt,
        (HeadLayout::Rows, _) => dwt.transpose(),
    };
    (loss, dy, dw)
}

/// [`fused_head_cross_entropy`] in tensor operations, for `w_rows`
/// `[vocab, d]`, in chunks of 2·d rows (at most 2²⁶ logits); the head's
/// gradient comes back as `[d, vocab]` (`dWᵀ`), and under
/// [`HeadPass::Losses`] no gradient at all (`dy` and `dWᵀ` empty). Every
/// matrix product reads contiguous operands (a transposed operand would
/// be copied by some backends), so the head is laid out both ways once
/// per call.
pub(crate) fn head_by_tensor_ops<X: Backend>(
    y: Tensor<X, 2>,
    w_rows: Tensor<X, 2>,
    (targets, denominator): (&[u32], f64),
    device: &X::Device,
    mut tokens: Option<&mut Vec<f64>>,
    pass: HeadPass<'_>,
) -> (f64, Tensor<X, 2>, Tensor<X, 2>) {
    use burn::tensor::IndexingUpdateOp;
    let [n, d] = y.dims();
    let [v, _] = w_rows.dims();
    assert_eq!(targets.len(), n, "one target per row");
    // Each chunk adds a [d, vocab] product into dWᵀ: chunks of 2d rows keep
    // that at half the chunk's logits traffic, while small models get
    // chunks of a few MiB (measured: 64 to 256 rows of a 50k vocabulary
    // are within noise of each other on 2 cores, 2,048 rows slower).
    let chunk = strata_dataplane::memory::device_head_rows(n, d, v);
    let w_rows = w_rows.reshape([v, d]);
    let wt = w_rows.clone().transpose().reshape([d, v]);
    let scale = (1.0 / denominator) as f32;
    let mut loss: Option<Tensor<X, 1>> = None;
    let mut dys = Vec::with_capacity(n.div_ceil(chunk));
    let mut dw: Option<Tensor<X, 2>> = None;
    // Under mixed precision the logits go to f32 for the softmax and the
    // loss, and their gradient back to the compute dtype for the products.
    let dtype = y.dtype();
    for r0 in (0..n).step_by(chunk) {
        let r1 = (r0 + chunk).min(n);
        let c = r1 - r0;
        let yc = y.clone().slice(r0..r1);
        let z = in_dtype(yc.clone().matmul(wt.clone()), DType::F32);
        let max = z.clone().max_dim(1);
        let tgt = token_ids::<X>(&targets[r0..r1], device).reshape([c, 1]);
        let picked = z.clone().gather(1, tgt.clone());
        let e = (z - max.clone()).exp();
        let sums = e.clone().sum_dim(1);
        let rows = sums.clone().log() + max - picked;
        if let Some(t) = tokens.as_deref_mut() {
            t.extend(to_vec(rows.clone()).into_iter().map(f64::from));
        }
        accumulate(&mut loss, rows.sum());
        // Each row's factor: the step's scale, times its own multiplier
        // under reweighting.
        let k = match pass {
            HeadPass::Losses => continue,
            HeadPass::Full => Tensor::full([c, 1], scale, device),
            HeadPass::Weighted(s) => from_vec::<X, 2>(
                s[r0..r1].iter().map(|m| m * scale).collect(),
                [c, 1],
                device,
            ),
        };
        let p = (e / sums)
            .mul(k.clone())
            .scatter(1, tgt, k.neg(), IndexingUpdateOp::Add);
        let p = in_dtype(p, dtype);
        dys.push(p.clone().matmul(w_rows.clone()));
        accumulate(&mut dw, yc.transpose().matmul(p));
    }
    let loss = loss.map_or(0.0, |l| f64::from(to_vec(l)[0]) / denominator);
    if matches!(pass, HeadPass::Losses) {
        let empty = || Tensor::zeros([0, 0], device);
        return (loss, empty(), empty());
    }
    let dw = dw.unwrap_or_else(|| in_dtype(Tensor::zeros([d, v], device), dtype));
    (loss, Tensor::cat(dys, 0), dw)
}
