//! Memory-efficient causal attention on burn's op-by-op backends (the
//! device path: CUDA and wgpu through cubecl, and NdArray or flex under
//! mixed precision): FlashAttention's blocking, in tensor operations.
//!
//! The queries go in blocks of rows; each block's scores against the keys
//! up to its last row (`[b, h, rows, ≤ t]`, f32) are taken, softmaxed and
//! multiplied with the values, and dropped: only the output and each
//! row's log-sum-exp are kept. The backward (an autodiff operation of its
//! own, through burn-autodiff's public `Backward` API) takes the blocks
//! again, recomputing each one's probabilities from the log-sum-exp, and
//! sums the keys' and values' gradients over the blocks. No `[t, t]` score
//! tensor exists at once; the most alive is one block's few copies.
//! Blocks are sized by [`attention_block_rows`], which the memory plan
//! reads too.

use std::marker::PhantomData;

use burn::backend::Autodiff;
use burn::tensor::backend::{Backend, BackendTypes};
use burn::tensor::{Bool, DType, Tensor, TensorPrimitive};
use burn_autodiff::checkpoint::base::Checkpointer;
use burn_autodiff::checkpoint::strategy::NoCheckpointing;
use burn_autodiff::grads::Gradients;
use burn_autodiff::ops::{Backward, Ops, OpsKind};
pub use strata_dataplane::memory::attention_block_rows;

use crate::cpu::{from_primitive, into_primitive, primitive_is};
use crate::tensors::in_dtype;

/// `X`'s tensors when it is burn's autodiff over `I`.
type Tracked<I> = <Autodiff<I> as BackendTypes>::FloatTensorPrimitive;

/// Causal attention of `q` over `k` and `v`, each `[b, h, t, hd]` (rotary
/// embeddings and the 1/√hd scale already in `q` and `k`; grouped KV heads
/// already expanded to `h`): `[b, h, t, hd]`, blocked as the module says,
/// `rows` query rows per block. Handed back when `X` is burn's autodiff
/// over a backend this module does not know (the caller then takes the
/// plain path).
#[allow(clippy::type_complexity)]
pub fn causal<X: Backend>(
    q: Tensor<X, 4>,
    k: Tensor<X, 4>,
    v: Tensor<X, 4>,
    rows: usize,
) -> Result<Tensor<X, 4>, (Tensor<X, 4>, Tensor<X, 4>, Tensor<X, 4>)> {
    if !X::ad_enabled(&q.device()) {
        return Ok(forward(q, k, v, rows).0);
    }
    let (q, k, v) = match tracked::<X, burn::backend::NdArray>(q, k, v, rows) {
        Ok(out) => return Ok(out),
        Err(qkv) => qkv,
    };
    let (q, k, v) = match tracked::<X, burn::backend::Flex>(q, k, v, rows) {
        Ok(out) => return Ok(out),
        Err(qkv) => qkv,
    };
    #[cfg(feature = "cuda")]
    let (q, k, v) = match tracked::<X, crate::cuda::CudaFused>(q, k, v, rows) {
        Ok(out) => return Ok(out),
        Err(qkv) => qkv,
    };
    #[cfg(feature = "wgpu")]
    let (q, k, v) = match tracked::<X, crate::wgpu::WgpuFused>(q, k, v, rows) {
        Ok(out) => return Ok(out),
        Err(qkv) => qkv,
    };
    Err((q, k, v))
}

/// Says once per process that attention on `X` takes the whole `[t, t]`
/// scores (a backend [`causal`] does not know: the memory plan counts a
/// block, so a long sequence can exceed it). Every backend strata trains
/// on is known; this names the one that is not, should one be added
/// without its line in [`causal`] (as wgpu once was).
pub fn warn_whole<X: Backend>(t: usize, device: &X::Device) {
    static ONCE: std::sync::Once = std::sync::Once::new();
    if X::ad_enabled(device) {
        ONCE.call_once(|| {
            tracing::warn!(
                backend = std::any::type_name::<X>(),
                seq = t,
                "attention takes whole [t, t] scores on this backend, not blocks: memory grows with the square of the sequence"
            )
        });
    }
}

/// [`causal`] as burn-autodiff's operation over `I`, when `X` is
/// `Autodiff<I>`.
#[allow(clippy::type_complexity)]
fn tracked<X: Backend, I: Backend>(
    q: Tensor<X, 4>,
    k: Tensor<X, 4>,
    v: Tensor<X, 4>,
    rows: usize,
) -> Result<Tensor<X, 4>, (Tensor<X, 4>, Tensor<X, 4>, Tensor<X, 4>)> {
    if !primitive_is::<X, Tracked<I>>() {
        return Err((q, k, v));
    }
    let [q, k, v]: [Tracked<I>; 3] = [q, k, v].map(into_primitive::<Tracked<I>, X, 4>);
    let (out, lse) = forward::<I>(
        inner(q.primitive.clone()),
        inner(k.primitive.clone()),
        inner(v.primitive.clone()),
        rows,
    );
    let out_p = out.clone().into_primitive().tensor();
    let prep = BlockedBackward::<I> {
        rows,
        backend: PhantomData,
    }
    .prepare::<NoCheckpointing>([q.node.clone(), k.node.clone(), v.node.clone()])
    .compute_bound()
    .stateful();
    let tracked = match prep {
        OpsKind::Tracked(prep) => {
            let state = Saved {
                q: q.primitive,
                k: k.primitive,
                v: v.primitive,
                out: out_p.clone(),
                lse: lse.into_primitive().tensor(),
            };
            prep.finish(state, out_p)
        }
        OpsKind::UnTracked(prep) => prep.finish(out_p),
    };
    Ok(from_primitive::<Tracked<I>, X, 4>(tracked))
}

fn inner<I: Backend, const D: usize>(p: I::FloatTensorPrimitive) -> Tensor<I, D> {
    Tensor::from_primitive(TensorPrimitive::Float(p))
}

/// What the backward reads: the inputs, the output and the rows'
/// log-sum-exp (`[b, h, t, 1]`, f32).
#[derive(Clone, Debug)]
struct Saved<I: Backend> {
    q: I::FloatTensorPrimitive,
    k: I::FloatTensorPrimitive,
    v: I::FloatTensorPrimitive,
    out: I::FloatTensorPrimitive,
    lse: I::FloatTensorPrimitive,
}

struct BlockedBackward<I> {
    rows: usize,
    backend: PhantomData<fn() -> I>,
}

impl<I> std::fmt::Debug for BlockedBackward<I> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BlockedAttention({} rows)", self.rows)
    }
}

impl<I: Backend> Backward<I, 3> for BlockedBackward<I> {
    type State = Saved<I>;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let s = ops.state;
        let dout = inner(grads.consume::<I>(&ops.node));
        let (dq, dk, dv) = backward::<I>(
            [inner(s.q), inner(s.k), inner(s.v)],
            inner(s.out),
            inner(s.lse),
            dout,
            self.rows,
        );
        for (node, g) in ops.parents.into_iter().zip([dq, dk, dv]) {
            if let Some(node) = node {
                grads.register::<I>(node.id, g.into_primitive().tensor());
            }
        }
    }
}

/// The additive causal bias of query rows `start..start + n` against keys
/// `0..start + n`: `[1, 1, n, start + n]`, −1e9 where a key lies after the
/// row (its probability, and so its gradient, is then 0).
fn bias<Y: Backend>(start: usize, n: usize, device: &Y::Device) -> Tensor<Y, 4> {
    let e = start + n;
    let mask = Tensor::<Y, 2, Bool>::tril_mask([n, e], start as i64, device);
    Tensor::<Y, 2>::zeros([n, e], device)
        .mask_fill(mask, -1e9)
        .reshape([1, 1, n, e])
}

/// The blocks' row ranges, the last rows first. A block's buffers span
/// the keys up to its last row, so they shrink from one block to the
/// next: each fits where the one before was freed. In sequence order
/// they grow, and a device's pooled allocator (cubecl's first-fit pages)
/// can reuse none of the freed ones: on wgpu that held the pools at 1.5×
/// what the step keeps live.
fn blocks(t: usize, rows: usize) -> impl Iterator<Item = std::ops::Range<usize>> {
    let rows = rows.max(1);
    (0..t)
        .step_by(rows)
        .map(move |s| s..(s + rows).min(t))
        .rev()
}

/// The forward on any backend: the output (in `q`'s dtype) and each
/// row's log-sum-exp (f32, `[b, h, t, 1]`).
fn forward<Y: Backend>(
    q: Tensor<Y, 4>,
    k: Tensor<Y, 4>,
    v: Tensor<Y, 4>,
    rows: usize,
) -> (Tensor<Y, 4>, Tensor<Y, 4>) {
    let [b, h, t, hd] = q.dims();
    let dtype = q.dtype();
    let device = q.device();
    let (mut outs, mut lses) = (Vec::new(), Vec::new());
    for r in blocks(t, rows) {
        let e = r.end;
        let qb = q.clone().slice([0..b, 0..h, r.clone(), 0..hd]);
        let kb = k.clone().slice([0..b, 0..h, 0..e, 0..hd]);
        let vb = v.clone().slice([0..b, 0..h, 0..e, 0..hd]);
        let scores = in_dtype(qb.matmul(kb.swap_dims(2, 3)), DType::F32)
            + bias::<Y>(r.start, r.len(), &device);
        let max = scores.clone().max_dim(3);
        let p = (scores - max.clone()).exp();
        let sum = p.clone().sum_dim(3);
        outs.push(in_dtype(p / sum.clone(), dtype).matmul(vb));
        lses.push(max + sum.log());
    }
    outs.reverse();
    lses.reverse();
    (Tensor::cat(outs, 2), Tensor::cat(lses, 2))
}

/// The backward on any backend, FlashAttention-2's: per block of query
/// rows, the probabilities again from the log-sum-exp, then
/// `dV += Pᵀ·dO`, `dS = P ⊙ (dO·Vᵀ − rowsum(dO ⊙ O))`, `dQ = dS·K`,
/// `dK += dSᵀ·Q`; the sums over blocks in f32.
fn backward<Y: Backend>(
    [q, k, v]: [Tensor<Y, 4>; 3],
    out: Tensor<Y, 4>,
    lse: Tensor<Y, 4>,
    dout: Tensor<Y, 4>,
    rows: usize,
) -> (Tensor<Y, 4>, Tensor<Y, 4>, Tensor<Y, 4>) {
    let [b, h, t, hd] = q.dims();
    let dtype = q.dtype();
    let device = q.device();
    let dout = in_dtype(dout, dtype);
    let delta = (in_dtype(dout.clone(), DType::F32) * in_dtype(out, DType::F32)).sum_dim(3);
    let mut dk = Tensor::<Y, 4>::zeros([b, h, t, hd], &device);
    let mut dv = Tensor::<Y, 4>::zeros([b, h, t, hd], &device);
    let mut dqs = Vec::new();
    for r in blocks(t, rows) {
        let e = r.end;
        let rows_of = |z: &Tensor<Y, 4>| z.clone().slice([0..b, 0..h, r.clone(), 0..z.dims()[3]]);
        let upto = |z: &Tensor<Y, 4>| z.clone().slice([0..b, 0..h, 0..e, 0..hd]);
        let (qb, dob) = (rows_of(&q), rows_of(&dout));
        let (kb, vb) = (upto(&k), upto(&v));
        let scores = in_dtype(qb.clone().matmul(kb.clone().swap_dims(2, 3)), DType::F32)
            + bias::<Y>(r.start, r.len(), &device);
        let p = (scores - rows_of(&lse)).exp();
        let dv_part = in_dtype(p.clone(), dtype)
            .swap_dims(2, 3)
            .matmul(dob.clone());
        let dp = in_dtype(dob.matmul(vb.swap_dims(2, 3)), DType::F32);
        let ds = in_dtype(p * (dp - rows_of(&delta)), dtype);
        dqs.push(ds.clone().matmul(kb));
        let dk_part = ds.swap_dims(2, 3).matmul(qb);
        let span = [0..b, 0..h, 0..e, 0..hd];
        dk = dk.clone().slice_assign(
            span.clone(),
            dk.slice(span.clone()) + in_dtype(dk_part, DType::F32),
        );
        dv = dv
            .clone()
            .slice_assign(span.clone(), dv.slice(span) + in_dtype(dv_part, DType::F32));
    }
    dqs.reverse();
    (
        Tensor::cat(dqs, 2),
        in_dtype(dk, dtype),
        in_dtype(dv, dtype),
    )
}
