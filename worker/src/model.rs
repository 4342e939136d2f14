//! The Llama-style decoder strata trains, as one rank holds it: the layers
//! of its pipeline stage, each tensor-parallel one cut Megatron's way.
//!
//! The model is token embedding, blocks of RMSNorm → grouped-query causal
//! attention with rotary position embeddings (rotate-half) → RMSNorm →
//! SwiGLU MLP, a final RMSNorm and an output head, optionally tied to the
//! embedding. Under tensor parallelism (Shoeybi et al. 2019) Q, K, V, gate
//! and up are column-parallel (each rank its heads and columns), the
//! attention output and down projections row-parallel (each rank a partial
//! sum, all-reduced: the *g* operator), and the inputs of the column-parallel
//! parts are replicated with their gradients all-reduced (the *f* operator,
//! placed after the norm as in Megatron, so norm gains get identical
//! gradients on every rank). The embedding is split by vocabulary rows
//! (a rank looks up the tokens it owns, zeros elsewhere, all-reduced) and
//! the head by vocabulary columns, with a cross-entropy that never gathers
//! the logits (max and sum of exponentials all-reduced; the target logit
//! from the rank that owns it).
//!
//! # Autodiff across collectives and stages
//!
//! A stage's forward is cut into segments ([`crate::segment`]) at every
//! tensor-parallel sum ([`crate::tp`]) and at the stage's input; residual
//! additions across a cut are done by the driver ([`StageModel::backward`]
//! adds the skip gradient). With `tp = 1` nothing needs cutting and the
//! stage is one segment, unless recomputation cuts it at its blocks.

use burn::tensor::activation::softmax;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Bool, DType, Int, Tensor};
use strata_recipe::{ModelConfig, Precision, Recompute};

use crate::collective::CollectiveError;
use crate::cpu;
pub use crate::cpu::HeadLayout;
use crate::params::{BlockParam, ParamSlot, ParamTable, Role};
use crate::segment::{Fan, GradAccum, Segment};
use crate::tensors::{accumulate, from_vec, in_dtype, to_vec, token_ids};
use crate::tp::{Tp, parallel_cross_entropy, vocab_rows};

/// RMSNorm's epsilon (Llama's).
pub const NORM_EPS: f64 = 1e-5;

/// The shape a slot's value has in the model: matrices as they are, norm
/// gains as `[1, d]`.
fn slot_shape(s: &ParamSlot) -> [usize; 2] {
    match s.shape[..] {
        [n] => [1, n],
        [r, c] => [r, c],
        _ => unreachable!("parameters have one or two dimensions"),
    }
}

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

    fn map<Y: Backend>(&self, f: impl Fn(Tensor<X, 2>) -> Tensor<Y, 2>) -> Rope<Y> {
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
fn attention<X: Backend>(
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
fn linear<X: Backend>(x: Tensor<X, 2>, w: Tensor<X, 2>) -> Tensor<X, 2> {
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
fn mlp<X: Backend>(y: Tensor<X, 2>, w: [Tensor<X, 2>; 3]) -> Tensor<X, 2> {
    let [gate, up, down] = w;
    linear(cpu::swiglu(linear(y.clone(), gate), linear(y, up)), down)
}

/// Attention's core from the query, key and value projections (`[b·t,
/// h·hd]`, `[b·t, kv·hd]` twice): the heads' outputs `[b·t, h·hd]`, the
/// input of the output projection.
fn attention_core<X: Backend>(
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
fn linear_grads<X: Backend>(
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
fn block<X: Backend>(
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
fn branch<X: Backend>(
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

/// The output head and the cross-entropy, with their gradients, without
/// materializing the logits of all `n` rows: rows go in chunks, each
/// one's logits `y_c · Wᵀ`, softmax and loss computed, then its gradient
/// `(softmax − onehot) / denominator` turned into the chunk's `dy` and its
/// share of `dW` at once. `w` is the head's weight in `layout`. Returns
/// the summed loss over `denominator`, `dy` (`[n, d]`) and the head's
/// gradient in `w`'s shape. One scalar reaches the host. The CPU backend
/// runs [`cpu::head_cross_entropy`]; others, tensor operations.
pub fn fused_head_cross_entropy<X: Backend>(
    y: Tensor<X, 2>,
    w: Tensor<X, 2>,
    layout: HeadLayout,
    targets: &[u32],
    denominator: f64,
    device: &X::Device,
) -> (f64, Tensor<X, 2>, Tensor<X, 2>) {
    if let Some(done) = cpu::flex_head_cross_entropy(&y, &w, layout, targets, denominator, device) {
        return done;
    }
    let w_rows = match layout {
        HeadLayout::Rows => w,
        HeadLayout::Columns => w.transpose(),
    };
    let (loss, dy, dwt) = head_by_tensor_ops(y, w_rows, targets, denominator, device);
    let dw = match layout {
        HeadLayout::Rows => dwt.transpose(),
        HeadLayout::Columns => dwt,
    };
    (loss, dy, dw)
}

/// [`fused_head_cross_entropy`] in tensor operations, for `w_rows`
/// `[vocab, d]`, in chunks of 2·d rows (at most 2²⁶ logits); the head's
/// gradient comes back as `[d, vocab]` (`dWᵀ`). Every matrix product
/// reads contiguous operands (a transposed operand would be copied by
/// some backends), so the head is laid out both ways once per call.
fn head_by_tensor_ops<X: Backend>(
    y: Tensor<X, 2>,
    w_rows: Tensor<X, 2>,
    targets: &[u32],
    denominator: f64,
    device: &X::Device,
) -> (f64, Tensor<X, 2>, Tensor<X, 2>) {
    use burn::tensor::IndexingUpdateOp;
    let [n, d] = y.dims();
    let [v, _] = w_rows.dims();
    assert_eq!(targets.len(), n, "one target per row");
    // Each chunk adds a [d, vocab] product into dWᵀ: chunks of 2d rows keep
    // that at half the chunk's logits traffic, while small models get
    // chunks of a few MiB (measured: 64 to 256 rows of a 50k vocabulary
    // are within noise of each other on 2 cores, 2,048 rows slower).
    let chunk = (2 * d).min((1 << 26) / v.max(1)).clamp(1, n.max(1));
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
        accumulate(&mut loss, (sums.clone().log() + max - picked).sum());
        let p = (e / sums).mul_scalar(scale).scatter(
            1,
            tgt,
            Tensor::full([c, 1], -scale, device),
            IndexingUpdateOp::Add,
        );
        let p = in_dtype(p, dtype);
        dys.push(p.clone().matmul(w_rows.clone()));
        accumulate(&mut dw, yc.transpose().matmul(p));
    }
    let loss = loss.map_or(0.0, |l| f64::from(to_vec(l)[0]) / denominator);
    let dw = dw.unwrap_or_else(|| in_dtype(Tensor::zeros([d, v], device), dtype));
    (loss, Tensor::cat(dys, 0), dw)
}

/// The backward of `h + g(branch(f(norm(h))))` from the stream's gradient
/// `dh`: g's backward is the identity, so the branch starts from `dh`.
fn residual_backward<B: AutodiffBackend>(
    dh: Option<Tensor<B::InnerBackend, 2>>,
    norm: Segment<B>,
    branch: Segment<B>,
    acc: &mut GradAccum<B::InnerBackend>,
    tp: &mut Tp<'_>,
) -> Result<Tensor<B::InnerBackend, 2>, CollectiveError> {
    let skip = dh.expect("a residual block has an upstream gradient");
    let dy = branch
        .backward(Some(skip.clone()), acc)
        .expect("branch input");
    through_norm(skip, dy, norm, acc, tp)
}

/// The rest of a residual branch's backward from `dy`, the gradient at
/// the norm's output on this rank: f's backward (the sum over tp), the
/// norm's, and the skip added.
fn through_norm<B: AutodiffBackend>(
    skip: Tensor<B::InnerBackend, 2>,
    dy: Tensor<B::InnerBackend, 2>,
    norm: Segment<B>,
    acc: &mut GradAccum<B::InnerBackend>,
    tp: &mut Tp<'_>,
) -> Result<Tensor<B::InnerBackend, 2>, CollectiveError> {
    let dy = tp.sum_tensor(dy)?;
    let through = norm.backward(Some(dy), acc).expect("norm input");
    Ok(skip + through)
}

/// What a stage's forward starts from.
pub enum StageInput<'a, I: Backend> {
    /// The first stage: token ids, `rows × seq` row-major.
    Tokens(&'a [u32]),
    /// Later stages: the previous stage's activations `[rows·seq, d]`.
    Activation(Tensor<I, 2>),
}

/// One microbatch as a stage's forward sees it.
pub struct Micro<'a> {
    /// `rows` sequences of `seq` tokens.
    pub rows: usize,
    pub seq: usize,
    /// The next tokens, for the last chunk of the pipeline.
    pub targets: Option<&'a [u32]>,
    /// What the summed loss is divided by: the step's target tokens on
    /// every rank.
    pub denominator: f64,
}

enum Piece<B: AutodiffBackend> {
    /// The whole stage in one graph (tp = 1).
    Whole(Segment<B>),
    /// The vocabulary-parallel lookup; its output is this rank's partial
    /// sum of the embeddings.
    Embed(Segment<B>),
    /// `h + g(branch(f(norm(h))))`: the norm on the replicated stream, then
    /// this rank's share of attention or MLP.
    Residual {
        norm: Segment<B>,
        branch: Segment<B>,
    },
    /// The final norm, then this rank's logit columns and its part of the
    /// parallel cross-entropy.
    Head { norm: Segment<B>, head: Segment<B> },
    /// Under full recomputation (tp = 1): a block kept as its input only;
    /// the backward runs its forward again, tracked, and backpropagates
    /// through that.
    Block {
        slots: BlockSlots,
        input: Tensor<B::InnerBackend, 2>,
        rows: usize,
        seq: usize,
    },
    /// Under selective recomputation: a residual branch as its norm's
    /// segment, its projections' (kept, as is their output) and its core
    /// (attention's, or SwiGLU's and the down projection), run again at
    /// the backward from the projections' output.
    Selective {
        norm: Segment<B>,
        projections: Fan<B>,
        core: Core,
    },
    /// Under full recomputation with tensor parallelism: a residual
    /// branch (norm, then this rank's attention or MLP) kept as its input.
    Branch {
        slots: BlockSlots,
        attn: bool,
        input: Tensor<B::InnerBackend, 2>,
        rows: usize,
        seq: usize,
    },
}

/// A residual branch's core under selective recomputation: the
/// projections' output it starts from, and what rebuilds it.
struct Core {
    slots: BlockSlots,
    attn: bool,
    rows: usize,
    seq: usize,
}

/// One microbatch's forward on this stage, kept for its backward.
pub struct Tape<B: AutodiffBackend> {
    pieces: Vec<Piece<B>>,
    /// On the last stage: the microbatch's summed loss over the step's
    /// denominator.
    pub loss: f64,
    /// On other stages: the activations for the next stage.
    pub output: Option<Tensor<B::InnerBackend, 2>>,
    /// The head's gradient (by slot), when the forward computed it with
    /// the loss.
    head_grad: Option<(usize, Tensor<B::InnerBackend, 2>)>,
}

/// The indices of a block's parameters in the table.
#[derive(Debug, Clone, Copy)]
struct BlockSlots([usize; 9]);

impl BlockSlots {
    fn get(&self, p: BlockParam) -> usize {
        self.0[p as usize]
    }
}

/// One rank's part of the model: its stage's layers, cut for its
/// tensor-parallel rank, with the parameter values it trains.
pub struct StageModel<B: AutodiffBackend> {
    table: ParamTable,
    /// Current values, one per slot, matrices as they are and norm gains
    /// as `[1, d]`.
    params: Vec<Tensor<B::InnerBackend, 2>>,
    rope: Rope<B::InnerBackend>,
    dims: Dims,
    embed: Option<usize>,
    final_norm: Option<usize>,
    /// The head's slot, or the embedding's when tied.
    head: Option<usize>,
    tied: bool,
    /// Each model chunk's blocks (one chunk unless interleaved).
    blocks: Vec<Vec<BlockSlots>>,
    device: B::Device,
    /// The parameters' and activations' dtype: f32, or bf16 under mixed
    /// precision.
    compute: DType,
    recompute: Recompute,
}

impl<B: AutodiffBackend> StageModel<B> {
    /// The model part described by `table`, with the flat `values` (one
    /// run per slot, in table order).
    pub fn new(
        cfg: &ModelConfig,
        table: ParamTable,
        values: &[f32],
        device: &B::Device,
    ) -> StageModel<B> {
        let mut model = StageModel::new_empty(cfg, table, device);
        model.load(values);
        model
    }

    /// The model part described by `table`, its parameters still to be
    /// given by [`StageModel::load`] or [`StageModel::set_params`].
    pub fn new_empty(cfg: &ModelConfig, table: ParamTable, device: &B::Device) -> StageModel<B> {
        let tp = table.tp as usize;
        let v = cfg.padded_vocab_size as usize;
        let dims = Dims {
            d_model: cfg.d_model as usize,
            heads: cfg.n_heads as usize / tp,
            // With more ranks than KV heads, each rank holds the one its
            // query heads read.
            kv_heads: (cfg.n_kv_heads as usize / tp).max(1),
            head_dim: cfg.head_dim() as usize,
            vocab_start: v / tp * table.tp_rank as usize,
            vocab_len: v / tp,
        };
        let rope = Rope::new(
            cfg.max_seq_len as usize,
            dims.head_dim,
            cfg.rope_theta,
            device,
        );
        let embed = table.index(Role::Embed);
        let final_norm = table.index(Role::FinalNorm);
        let head = if cfg.tie_embeddings {
            final_norm.and(embed)
        } else {
            table.index(Role::Head)
        };
        let blocks = table
            .chunks
            .iter()
            .map(|layers| {
                layers
                    .clone()
                    .map(|layer| {
                        BlockSlots(BlockParam::ALL.map(|param| {
                            table
                                .index(Role::Block { layer, param })
                                .expect("the table holds its stage's blocks")
                        }))
                    })
                    .collect()
            })
            .collect();
        StageModel {
            params: Vec::new(),
            rope,
            dims,
            embed,
            final_norm,
            head,
            tied: cfg.tie_embeddings,
            blocks,
            device: device.clone(),
            table,
            compute: DType::F32,
            recompute: Recompute::None,
        }
    }

    pub fn table(&self) -> &ParamTable {
        &self.table
    }

    pub fn dims(&self) -> &Dims {
        &self.dims
    }

    pub fn device(&self) -> &B::Device {
        &self.device
    }

    /// Replaces every parameter's value from the flat host buffer `values`.
    pub fn load(&mut self, values: &[f32]) {
        assert_eq!(values.len(), self.table.total, "flat parameter buffer");
        self.params = self
            .table
            .slots
            .iter()
            .map(|s| from_vec(values[s.range()].to_vec(), slot_shape(s), &self.device))
            .collect();
    }

    /// Replaces every parameter's value with `flat[slot]`, a device tensor
    /// holding the slot's elements in order (a slice of a master bucket).
    pub fn set_params(&mut self, flat: Vec<Tensor<B::InnerBackend, 1>>) {
        assert_eq!(flat.len(), self.table.slots.len(), "one tensor per slot");
        self.params = self
            .table
            .slots
            .iter()
            .zip(flat)
            .map(|(s, t)| in_dtype(t.reshape(slot_shape(s)), self.compute))
            .collect();
    }

    /// Computes in `precision` from the next [`StageModel::set_params`]
    /// on (f32 unless set).
    pub fn set_precision(&mut self, precision: Precision) {
        self.compute = match precision {
            Precision::F32 => DType::F32,
            Precision::Bf16 => DType::BF16,
        };
    }

    /// Keeps only each block's (or residual branch's) input from the
    /// forward when `Full`, rebuilding the rest at the backward.
    pub fn set_recompute(&mut self, recompute: Recompute) {
        self.recompute = recompute;
    }

    /// The dtype the model computes in.
    pub fn compute_dtype(&self) -> DType {
        self.compute
    }

    /// Drops the parameter values, so that the optimizer owns the only
    /// reference to the master buckets they were sliced from (and updates
    /// them in place where the backend can).
    pub fn release_params(&mut self) {
        self.params.clear();
    }

    /// Whether model chunk `chunk` is the first of the whole pipeline (it
    /// embeds the tokens).
    pub fn is_first(&self, chunk: u32) -> bool {
        self.table.stage == 0 && chunk == 0
    }

    /// Whether model chunk `chunk` is the last of the whole pipeline (it
    /// computes the head and the loss).
    pub fn is_last(&self, chunk: u32) -> bool {
        self.table.stage + 1 == self.table.pp && chunk as usize + 1 == self.blocks.len()
    }

    /// This rank's model chunks.
    pub fn chunks(&self) -> u32 {
        self.blocks.len() as u32
    }

    fn leaf(&self, slot: usize, leaves: &mut Vec<(usize, Tensor<B, 2>)>) -> Tensor<B, 2> {
        let t = Tensor::<B, 2>::from_inner(self.params[slot].clone()).require_grad();
        leaves.push((slot, t.clone()));
        t
    }

    /// Parameter `slot` outside any graph: operations on it are not
    /// recorded, but run the same kernels as tracked ones.
    fn untracked(&self, slot: usize) -> Tensor<B, 2> {
        Tensor::from_inner(self.params[slot].clone())
    }

    /// One residual branch of block `b` (attention or MLP) on the stream
    /// `h`: the norm's segment, and the branch's from the norm's output
    /// as a leaf.
    fn residual_segments(
        &self,
        h: Tensor<B::InnerBackend, 2>,
        b: &BlockSlots,
        attn: bool,
        (rows, seq): (usize, usize),
    ) -> (Segment<B>, Segment<B>) {
        use BlockParam::*;
        let (norm, y) = self.norm_segment(h, b.get(if attn { AttnNorm } else { MlpNorm }));
        let mut leaves = Vec::new();
        let y_leaf = Tensor::<B, 2>::from_inner(y.inner()).require_grad();
        let weight = |p| self.leaf(b.get(p), &mut leaves);
        let partial = branch(
            y_leaf.clone(),
            attn,
            weight,
            &self.rope(),
            rows,
            seq,
            &self.dims,
        );
        let branch = Segment {
            input: Some(y_leaf),
            output: partial,
            leaves,
        };
        (norm, branch)
    }

    /// The same branch's output, untracked (nothing kept for a backward).
    fn residual_untracked(
        &self,
        h: Tensor<B::InnerBackend, 2>,
        b: &BlockSlots,
        attn: bool,
        (rows, seq): (usize, usize),
    ) -> Tensor<B::InnerBackend, 2> {
        use BlockParam::*;
        let w = |p| self.untracked(b.get(p));
        let y = rms_norm(
            Tensor::<B, 2>::from_inner(h),
            w(if attn { AttnNorm } else { MlpNorm }),
        );
        branch(y, attn, w, &self.rope(), rows, seq, &self.dims).inner()
    }

    /// One residual branch of block `b` on the stream `h` under selective
    /// recomputation: pushes its piece and returns its (partial) output,
    /// the core run untracked.
    fn residual_selective(
        &self,
        h: Tensor<B::InnerBackend, 2>,
        b: &BlockSlots,
        attn: bool,
        (rows, seq): (usize, usize),
        pieces: &mut Vec<Piece<B>>,
    ) -> Tensor<B::InnerBackend, 2> {
        use BlockParam::*;
        let (norm, y) = self.norm_segment(h, b.get(if attn { AttnNorm } else { MlpNorm }));
        let mut leaves = Vec::new();
        let y_leaf = Tensor::<B, 2>::from_inner(y.inner()).require_grad();
        let which: &[BlockParam] = if attn { &[Wq, Wk, Wv] } else { &[WGate, WUp] };
        let kept: Vec<Tensor<B, 2>> = which
            .iter()
            .map(|&p| linear(y_leaf.clone(), self.leaf(b.get(p), &mut leaves)))
            .collect();
        let core = Core {
            slots: *b,
            attn,
            rows,
            seq,
        };
        let z = self.core_forward(
            &core,
            kept.iter()
                .map(|k| Tensor::from_inner(k.clone().inner()))
                .collect(),
        );
        let partial = linear(z, self.untracked(Self::core_out(&core)));
        pieces.push(Piece::Selective {
            norm,
            projections: Fan {
                inputs: vec![y_leaf],
                outputs: kept,
                leaves,
            },
            core,
        });
        partial.inner()
    }

    /// A selective branch's core on the projections it kept (Q, K and V,
    /// or the gate and up products): the input of its last projection
    /// (attention's heads, or SwiGLU's product).
    fn core_forward(&self, core: &Core, kept: Vec<Tensor<B, 2>>) -> Tensor<B, 2> {
        let mut kept = kept.into_iter();
        let mut next = || kept.next().expect("a kept projection");
        if core.attn {
            let qkv = [next(), next(), next()];
            attention_core(qkv, &self.rope(), core.rows, core.seq, &self.dims)
        } else {
            let (a, b) = (next(), next());
            cpu::swiglu(a, b)
        }
    }

    /// The slot of a selective branch's last projection (output or down).
    fn core_out(core: &Core) -> usize {
        core.slots.get(if core.attn {
            BlockParam::Wo
        } else {
            BlockParam::WDown
        })
    }

    /// The pieces and output of one residual branch of block `b` on `h`,
    /// kept as `self.recompute` says (under full recomputation with
    /// tensor parallelism, and under none or selective at any tp).
    fn residual(
        &self,
        h: Tensor<B::InnerBackend, 2>,
        b: &BlockSlots,
        attn: bool,
        dims: (usize, usize),
        pieces: &mut Vec<Piece<B>>,
    ) -> Tensor<B::InnerBackend, 2> {
        match self.recompute {
            Recompute::Full => {
                pieces.push(Piece::Branch {
                    slots: *b,
                    attn,
                    input: h.clone(),
                    rows: dims.0,
                    seq: dims.1,
                });
                self.residual_untracked(h, b, attn, dims)
            }
            Recompute::Selective => self.residual_selective(h, b, attn, dims, pieces),
            Recompute::None => {
                let (norm, branch) = self.residual_segments(h, b, attn, dims);
                let partial = branch.output.clone().inner();
                pieces.push(Piece::Residual { norm, branch });
                partial
            }
        }
    }

    fn rope(&self) -> Rope<B> {
        self.rope.map(Tensor::from_inner)
    }

    /// A segment that norms the replicated stream `h` with gain `slot`;
    /// its output, the input of a column-parallel part.
    fn norm_segment(
        &self,
        h: Tensor<B::InnerBackend, 2>,
        slot: usize,
    ) -> (Segment<B>, Tensor<B, 2>) {
        let mut leaves = Vec::new();
        let h_leaf = Tensor::<B, 2>::from_inner(h).require_grad();
        let y = rms_norm(h_leaf.clone(), self.leaf(slot, &mut leaves));
        let seg = Segment {
            input: Some(h_leaf),
            output: y.clone(),
            leaves,
        };
        (seg, y)
    }

    fn head_weight(&self, leaves: &mut Vec<(usize, Tensor<B, 2>)>) -> Tensor<B, 2> {
        let w = self.leaf(self.head.expect("the last stage has a head"), leaves);
        if self.tied { w.transpose() } else { w }
    }

    /// Runs model chunk `chunk`'s forward on microbatch `mb`.
    pub fn forward(
        &self,
        chunk: u32,
        input: StageInput<'_, B::InnerBackend>,
        mb: &Micro<'_>,
        tp: &mut Tp<'_>,
    ) -> Result<Tape<B>, CollectiveError> {
        if tp.size() == 1 {
            return Ok(self.forward_whole(chunk, input, mb));
        }
        let (rows, seq, targets, denominator) = (mb.rows, mb.seq, mb.targets, mb.denominator);
        let device = &self.device;
        let mut pieces = Vec::new();
        let mut h = match input {
            StageInput::Tokens(tokens) => {
                let mut leaves = Vec::new();
                let table = self.leaf(self.embed.expect("the first stage embeds"), &mut leaves);
                let (local, mask) =
                    vocab_rows::<B>(tokens, self.dims.vocab_start, self.dims.vocab_len, device);
                let partial = table.select(0, local) * in_dtype(mask, self.compute);
                let h = tp.sum_tensor(partial.clone().inner())?;
                pieces.push(Piece::Embed(Segment {
                    input: None,
                    output: partial,
                    leaves,
                }));
                h
            }
            StageInput::Activation(h) => in_dtype(h, self.compute),
        };
        for b in &self.blocks[chunk as usize] {
            for attn in [true, false] {
                let partial = self.residual(h.clone(), b, attn, (rows, seq), &mut pieces);
                h = h + tp.sum_tensor(partial)?;
            }
        }
        if !self.is_last(chunk) {
            return Ok(Tape {
                pieces,
                loss: 0.0,
                output: Some(h),
                head_grad: None,
            });
        }
        let targets = targets.expect("the last stage has targets");
        let (norm, y) = self.norm_segment(h, self.final_norm.expect("last stage"));
        let mut leaves = Vec::new();
        let y_leaf = Tensor::<B, 2>::from_inner(y.inner()).require_grad();
        let z = y_leaf.clone().matmul(self.head_weight(&mut leaves));
        let (loss, surrogate) =
            parallel_cross_entropy(z, targets, self.dims.vocab_start, denominator, tp)?;
        pieces.push(Piece::Head {
            norm,
            head: Segment {
                input: Some(y_leaf),
                output: surrogate.reshape([1, 1]),
                leaves,
            },
        });
        Ok(Tape {
            pieces,
            loss,
            output: None,
            head_grad: None,
        })
    }

    /// The stage as one graph (no tensor parallelism).
    fn forward_whole(
        &self,
        chunk: u32,
        input: StageInput<'_, B::InnerBackend>,
        mb: &Micro<'_>,
    ) -> Tape<B> {
        if self.recompute != Recompute::None {
            return self.forward_recomputed(chunk, input, mb);
        }
        let (rows, seq) = (mb.rows, mb.seq);
        let mut leaves = Vec::new();
        let rope = self.rope();
        let (mut x, input) = match input {
            StageInput::Tokens(tokens) => {
                let table = self.leaf(self.embed.expect("the first stage embeds"), &mut leaves);
                (table.select(0, token_ids(tokens, &self.device)), None)
            }
            StageInput::Activation(h) => {
                let leaf = Tensor::<B, 2>::from_inner(in_dtype(h, self.compute)).require_grad();
                (leaf.clone(), Some(leaf))
            }
        };
        for b in &self.blocks[chunk as usize] {
            let weight = |p| self.leaf(b.get(p), &mut leaves);
            x = block(x, weight, &rope, rows, seq, &self.dims);
        }
        if !self.is_last(chunk) {
            let output = x.clone().inner();
            return Tape {
                pieces: vec![Piece::Whole(Segment {
                    input,
                    output: x,
                    leaves,
                })],
                loss: 0.0,
                output: Some(output),
                head_grad: None,
            };
        }
        self.fused_head(x, input, leaves, mb)
    }

    /// The stage under recomputation (tp = 1): the embedding as a segment
    /// of its own; each block run untracked and kept as its input (full),
    /// or as its residual branches' selective pieces; the final norm and
    /// the head as one segment from the last block's output.
    fn forward_recomputed(
        &self,
        chunk: u32,
        input: StageInput<'_, B::InnerBackend>,
        mb: &Micro<'_>,
    ) -> Tape<B> {
        let (rows, seq) = (mb.rows, mb.seq);
        let rope = self.rope();
        let mut pieces = Vec::new();
        let mut x = match input {
            StageInput::Tokens(tokens) => {
                let mut leaves = Vec::new();
                let table = self.leaf(self.embed.expect("the first stage embeds"), &mut leaves);
                let e = table.select(0, token_ids(tokens, &self.device));
                pieces.push(Piece::Embed(Segment {
                    input: None,
                    output: e.clone(),
                    leaves,
                }));
                e.inner()
            }
            StageInput::Activation(h) => in_dtype(h, self.compute),
        };
        for b in &self.blocks[chunk as usize] {
            if self.recompute == Recompute::Selective {
                for attn in [true, false] {
                    x = x.clone() + self.residual(x, b, attn, (rows, seq), &mut pieces);
                }
                continue;
            }
            pieces.push(Piece::Block {
                slots: *b,
                input: x.clone(),
                rows,
                seq,
            });
            let weight = |p| self.untracked(b.get(p));
            x = block(
                Tensor::<B, 2>::from_inner(x),
                weight,
                &rope,
                rows,
                seq,
                &self.dims,
            )
            .inner();
        }
        if !self.is_last(chunk) {
            return Tape {
                pieces,
                loss: 0.0,
                output: Some(x),
                head_grad: None,
            };
        }
        let leaf = Tensor::<B, 2>::from_inner(x).require_grad();
        let mut tape = self.fused_head(leaf.clone(), Some(leaf), Vec::new(), mb);
        pieces.append(&mut tape.pieces);
        tape.pieces = pieces;
        tape
    }

    /// The last stage's end on the stream `x` (a graph from `input`,
    /// `leaves` so far): the final norm, then the head and the loss
    /// outside the graph — their gradients are known as soon as the loss
    /// is, so they are computed now, chunk by chunk, and the graph
    /// continues from `sum(y ⊙ dy)`.
    fn fused_head(
        &self,
        x: Tensor<B, 2>,
        input: Option<Tensor<B, 2>>,
        mut leaves: Vec<(usize, Tensor<B, 2>)>,
        mb: &Micro<'_>,
    ) -> Tape<B> {
        let (targets, denominator) = (mb.targets, mb.denominator);
        let g = self.leaf(self.final_norm.expect("last stage"), &mut leaves);
        let y = rms_norm(x, g);
        let slot = self.head.expect("the last stage has a head");
        let layout = if self.tied {
            HeadLayout::Rows
        } else {
            HeadLayout::Columns
        };
        let targets = targets.expect("the last stage has targets");
        let (loss, dy, dw) = fused_head_cross_entropy(
            y.clone().inner(),
            self.params[slot].clone(),
            layout,
            targets,
            denominator,
            &self.device,
        );
        let surrogate = (y * Tensor::from_inner(dy)).sum();
        Tape {
            pieces: vec![Piece::Whole(Segment {
                input,
                output: surrogate.reshape([1, 1]),
                leaves,
            })],
            loss,
            output: None,
            head_grad: Some((slot, dw)),
        }
    }

    /// Backpropagates one microbatch's tape: `upstream` is the gradient of
    /// the stage's output (none on the last stage, whose output is the
    /// loss). Parameter gradients are added to `acc`; returns the gradient
    /// of the stage's input activations (none on the first stage).
    pub fn backward(
        &self,
        tape: Tape<B>,
        upstream: Option<Tensor<B::InnerBackend, 2>>,
        acc: &mut GradAccum<B::InnerBackend>,
        tp: &mut Tp<'_>,
    ) -> Result<Option<Tensor<B::InnerBackend, 2>>, CollectiveError> {
        let mut dh = upstream.map(|d| in_dtype(d, self.compute));
        if let Some((slot, g)) = tape.head_grad {
            acc.add(slot, g);
        }
        for piece in tape.pieces.into_iter().rev() {
            match piece {
                Piece::Whole(seg) => dh = seg.backward(dh, acc),
                Piece::Embed(seg) => {
                    seg.backward(dh.take(), acc);
                }
                Piece::Residual { norm, branch } => {
                    dh = Some(residual_backward(dh, norm, branch, acc, tp)?);
                }
                Piece::Head { norm, head } => {
                    let dy = head.backward(None, acc).expect("head input");
                    let dy = tp.sum_tensor(dy)?;
                    dh = norm.backward(Some(dy), acc);
                }
                Piece::Block {
                    slots,
                    input,
                    rows,
                    seq,
                } => {
                    let leaf = Tensor::<B, 2>::from_inner(input).require_grad();
                    let mut leaves = Vec::new();
                    let weight = |p| self.leaf(slots.get(p), &mut leaves);
                    let output = block(leaf.clone(), weight, &self.rope(), rows, seq, &self.dims);
                    let seg = Segment {
                        input: Some(leaf),
                        output,
                        leaves,
                    };
                    dh = seg.backward(dh, acc);
                }
                Piece::Selective {
                    norm,
                    projections,
                    core,
                } => {
                    let skip = dh.expect("a residual block has an upstream gradient");
                    let kept: Vec<Tensor<B, 2>> = projections
                        .outputs
                        .iter()
                        .map(|k| Tensor::from_inner(k.clone().inner()).require_grad())
                        .collect();
                    let z = self.core_forward(&core, kept.clone());
                    // The last projection's gradients by hand: its output
                    // is not needed, so it is not computed again.
                    let slot = Self::core_out(&core);
                    let (dz, dw) = linear_grads(
                        z.clone().inner(),
                        self.params[slot].clone(),
                        in_dtype(skip.clone(), z.dtype()),
                    );
                    acc.add(slot, dw);
                    let rebuilt = Fan {
                        inputs: kept,
                        outputs: vec![z],
                        leaves: Vec::new(),
                    };
                    let dkept = rebuilt.backward(vec![dz], acc);
                    let dkept = dkept
                        .into_iter()
                        .map(|d| d.expect("a kept projection's gradient"))
                        .collect();
                    let dy = projections
                        .backward(dkept, acc)
                        .pop()
                        .flatten()
                        .expect("branch input");
                    dh = Some(through_norm(skip, dy, norm, acc, tp)?);
                }
                Piece::Branch {
                    slots,
                    attn,
                    input,
                    rows,
                    seq,
                } => {
                    let (norm, branch) = self.residual_segments(input, &slots, attn, (rows, seq));
                    dh = Some(residual_backward(dh, norm, branch, acc, tp)?);
                }
            }
        }
        Ok(dh)
    }

    /// Logits `[rows·seq, padded_vocab]` of the whole model for `tokens`
    /// (inference; only for a rank that holds the whole model).
    pub fn logits(&self, tokens: &[u32], rows: usize, seq: usize) -> Tensor<B::InnerBackend, 2> {
        assert!(
            self.is_first(0) && self.is_last(0) && self.table.tp == 1,
            "logits need the whole model on one rank"
        );
        let p = |slot: usize| self.params[slot].clone();
        let t = token_ids(tokens, &self.device);
        let mut x = p(self.embed.expect("embedding")).select(0, t);
        for b in &self.blocks[0] {
            let weight = |q| p(b.get(q));
            x = block(x, weight, &self.rope, rows, seq, &self.dims);
        }
        let y = rms_norm(x, p(self.final_norm.expect("final norm")));
        let w = p(self.head.expect("head"));
        y.matmul(if self.tied { w.transpose() } else { w })
    }
}
