//! Causal self-attention with rotary embeddings as one operation on flex.
//!
//! Op by op, a layer's attention on flex is a dozen passes over
//! `[b·h, t, t]` scores and `[b, t, h, hd]` activations, each on one
//! thread, with the heads swapped into a batch dimension and back by
//! copies. Here each (sequence, head) is a task of its own, run in
//! parallel: it rotates its queries and keys into scratch rows, then for
//! each block of query rows takes the scores against the keys up to the
//! block's last row (the causal triangle, so long sequences skip the
//! upper half), their softmax, and the product with the values, written
//! straight into the `[b, t, h, hd]` output the output projection reads.
//!
//! Only the output and each row's log-sum-exp are kept for backward,
//! as FlashAttention does: backward recomputes a block's probabilities
//! from them, so no `[t, t]` matrix outlives its task (at sequence 2048
//! and 16 heads a stored one is 256 MiB per sequence per layer).

use std::sync::Arc;

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use burn_autodiff::checkpoint::base::Checkpointer;
use burn_autodiff::checkpoint::strategy::NoCheckpointing;
use burn_autodiff::grads::Gradients;
use burn_autodiff::ops::{Backward, Ops, OpsKind};
use burn_flex::FlexTensor;
use rayon::prelude::*;

use super::{
    AutodiffTensor, Strided, exp, exp_shifted_in_place, f32_pair, flex_of, from_flex,
    from_primitive, gemm_into, into_flex, into_primitive, is_flex, max_of, primitive_is, values,
};

/// Query rows per block: the scores of a block are `[BLOCK, t]`.
const BLOCK: usize = 128;

/// The rotary embedding's tables on the host, `[positions, head_dim]`,
/// each half-dimension's angle twice (rotate-half pairs dimension `j`
/// with `j + head_dim/2`).
#[derive(Debug, Clone)]
pub struct RopeTables {
    cos: Arc<[f32]>,
    sin: Arc<[f32]>,
    head_dim: usize,
}

impl RopeTables {
    pub fn new(cos: Vec<f32>, sin: Vec<f32>, head_dim: usize) -> RopeTables {
        assert!(
            head_dim.is_multiple_of(2),
            "rotary embeddings pair dimensions"
        );
        assert_eq!(cos.len(), sin.len(), "one angle table each");
        assert_eq!(cos.len() % head_dim, 0, "whole rows of head_dim");
        RopeTables {
            cos: cos.into(),
            sin: sin.into(),
            head_dim,
        }
    }

    fn positions(&self) -> usize {
        self.cos.len() / self.head_dim
    }
}

/// The inputs [`causal_attention`] hands back when it does not run.
pub type Qkv<X> = (Tensor<X, 4>, Tensor<X, 4>, Tensor<X, 4>);

/// `softmax(mask(rope(q)·rope(k)ᵀ · scale)) · v` per head, causal: `q`
/// is `[b, t, h, hd]`, `k` and `v` `[b, t, kv, hd]` (query head `i` reads
/// KV head `i / (h / kv)`), positions from 0; the result is `[b, t, h,
/// hd]`. On flex (with or without autodiff) and f32; `Err` with the
/// inputs otherwise.
pub fn causal_attention<X: Backend>(
    q: Tensor<X, 4>,
    k: Tensor<X, 4>,
    v: Tensor<X, 4>,
    rope: &RopeTables,
    scale: f32,
) -> Result<Tensor<X, 4>, Qkv<X>> {
    let kernel = is_flex::<X>() || primitive_is::<X, AutodiffTensor>();
    if !kernel || !f32_pair(&q, &k) || !f32_pair(&q, &v) {
        return Err((q, k, v));
    }
    let [b, t, h, hd] = q.dims();
    let [kb, kt, kv, khd] = k.dims();
    assert_eq!([kb, kt, khd], [b, t, hd], "keys match the queries");
    assert_eq!(v.dims(), k.dims(), "values match the keys");
    assert!(kv > 0 && h % kv == 0, "{h} query heads over {kv} KV heads");
    assert_eq!(rope.head_dim, hd, "rotary tables for head_dim {hd}");
    assert!(rope.positions() >= t, "rotary tables cover {t} positions");
    let shape = Shape { b, t, h, kv, hd };
    let config = Config {
        shape,
        rope: rope.clone(),
        scale,
    };
    if is_flex::<X>() {
        let (q, k, v) = (into_flex(q), into_flex(k), into_flex(v));
        let (out, _) = config.forward(&values(&q), &values(&k), &values(&v));
        return Ok(from_flex(flex_of(out, &q)));
    }
    let q: AutodiffTensor = into_primitive(q);
    let k: AutodiffTensor = into_primitive(k);
    let v: AutodiffTensor = into_primitive(v);
    let prep = AttentionBackward
        .prepare::<NoCheckpointing>([q.node.clone(), k.node.clone(), v.node.clone()])
        .compute_bound()
        .stateful();
    let (out, lse) = config.forward(
        &values(&q.primitive),
        &values(&k.primitive),
        &values(&v.primitive),
    );
    let out = flex_of(out, &q.primitive);
    Ok(from_primitive(match prep {
        OpsKind::Tracked(prep) => {
            let state = Saved {
                q: q.primitive,
                k: k.primitive,
                v: v.primitive,
                out: out.clone(),
                lse: lse.into(),
                config,
            };
            prep.finish(state, out)
        }
        OpsKind::UnTracked(prep) => prep.finish(out),
    }))
}

#[derive(Debug, Clone, Copy)]
struct Shape {
    b: usize,
    t: usize,
    h: usize,
    kv: usize,
    hd: usize,
}

#[derive(Debug, Clone)]
struct Config {
    shape: Shape,
    rope: RopeTables,
    scale: f32,
}

/// What backward reads: the inputs, the output and each query row's
/// log-sum-exp (`[b, h, t]`).
#[derive(Debug, Clone)]
struct Saved {
    q: FlexTensor,
    k: FlexTensor,
    v: FlexTensor,
    out: FlexTensor,
    lse: Arc<[f32]>,
    config: Config,
}

#[derive(Debug)]
struct AttentionBackward;

impl Backward<burn::backend::Flex, 3> for AttentionBackward {
    type State = Saved;

    fn backward(
        self,
        ops: Ops<Self::State, 3>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let s = ops.state;
        let grad: FlexTensor = grads.consume::<burn::backend::Flex>(&ops.node);
        let (dq, dk, dv) = s.config.backward(
            &values(&s.q),
            &values(&s.k),
            &values(&s.v),
            &values(&s.out),
            &s.lse,
            &values(&grad),
        );
        let [node_q, node_k, node_v] = ops.parents;
        for (node, g, like) in [(node_q, dq, &s.q), (node_k, dk, &s.k), (node_v, dv, &s.v)] {
            if let Some(node) = node {
                grads.register::<burn::backend::Flex>(node.id, flex_of(g, like));
            }
        }
    }
}

/// A pointer that parallel tasks write through, each to its own
/// elements.
#[derive(Clone, Copy)]
struct Shared(*mut f32);

// SAFETY: tasks holding it write disjoint elements (each its own heads),
// and the buffer outlives the parallel loop that borrows it.
#[allow(unsafe_code)]
unsafe impl Send for Shared {}
#[allow(unsafe_code)]
unsafe impl Sync for Shared {}

impl Config {
    /// The output `[b, t, h, hd]` and the log-sum-exp `[b, h, t]`.
    fn forward(&self, q: &[f32], k: &[f32], v: &[f32]) -> (Vec<f32>, Vec<f32>) {
        let Shape { b, t, h, kv, hd } = self.shape;
        assert_eq!(q.len(), b * t * h * hd, "q is [b, t, h, hd]");
        assert_eq!(k.len(), b * t * kv * hd, "k is [b, t, kv, hd]");
        assert_eq!(v.len(), k.len(), "v is [b, t, kv, hd]");
        let mut out = vec![0f32; q.len()];
        let mut lse = vec![0f32; b * h * t];
        let dst = Shared(out.as_mut_ptr());
        lse.par_chunks_mut(t.max(1))
            .enumerate()
            .for_each(|(task, lse)| {
                // SAFETY: task (bi, head) writes only its head's columns
                // of `out`, which lives until the loop ends.
                #[allow(unsafe_code)]
                unsafe {
                    forward_task(self, [q, k, v], task, lse, dst)
                }
            });
        (out, lse)
    }

    /// `dq`, `dk`, `dv` from the output's gradient `dout`.
    fn backward(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        out: &[f32],
        lse: &[f32],
        dout: &[f32],
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let Shape { b, kv, .. } = self.shape;
        assert_eq!(dout.len(), q.len(), "the gradient has the output's shape");
        let mut dq = vec![0f32; q.len()];
        let mut dk = vec![0f32; k.len()];
        let mut dv = vec![0f32; v.len()];
        let dst = [
            Shared(dq.as_mut_ptr()),
            Shared(dk.as_mut_ptr()),
            Shared(dv.as_mut_ptr()),
        ];
        let inputs = Inputs {
            q,
            k,
            v,
            out,
            lse,
            dout,
        };
        (0..b * kv).into_par_iter().for_each(|task| {
            // SAFETY: task (bi, kv head) writes only the columns of its KV
            // head in dk and dv and of its query heads in dq, all of which
            // live until the loop ends.
            #[allow(unsafe_code)]
            unsafe {
                backward_task(self, &inputs, task, dst)
            }
        });
        (dq, dk, dv)
    }

    /// Rows `0..t` of head `head` of `x` (`[b, t, heads, hd]`, sequence
    /// `bi`) rotated by their positions' angles and times `scale`, into
    /// `dst` (`[t, hd]`).
    #[inline(always)]
    fn rotate(&self, x: &[f32], heads: usize, bi: usize, head: usize, scale: f32, dst: &mut [f32]) {
        let Shape { t, hd, .. } = self.shape;
        let half = hd / 2;
        for i in 0..t {
            let src = &x[((bi * t + i) * heads + head) * hd..][..hd];
            let (cos, sin) = (
                &self.rope.cos[i * hd..][..hd],
                &self.rope.sin[i * hd..][..hd],
            );
            let row = &mut dst[i * hd..][..hd];
            for j in 0..half {
                row[j] = (src[j] * (cos[j] * scale)) + (-src[j + half]) * (sin[j] * scale);
            }
            for j in half..hd {
                row[j] = (src[j] * (cos[j] * scale)) + src[j - half] * (sin[j] * scale);
            }
        }
    }

    /// [`Config::rotate`]'s backward: from `g` (`[t, hd]`, the gradient
    /// of the rotated and scaled rows) the gradient of the unrotated rows,
    /// written to head `head` of `dst` (`[b, t, heads, hd]`, sequence
    /// `bi`). `scale` is the one `rotate` was given.
    ///
    /// # Safety
    /// `dst` addresses `b·t·heads·hd` live elements, and no other thread
    /// touches this head's columns of sequence `bi`.
    #[allow(unsafe_code)]
    #[inline(always)]
    unsafe fn unrotate(
        &self,
        g: &[f32],
        heads: usize,
        bi: usize,
        head: usize,
        scale: f32,
        dst: Shared,
    ) {
        let Shape { t, hd, .. } = self.shape;
        let half = hd / 2;
        for i in 0..t {
            let (cos, sin) = (
                &self.rope.cos[i * hd..][..hd],
                &self.rope.sin[i * hd..][..hd],
            );
            let g = &g[i * hd..][..hd];
            // SAFETY: the caller's contract; these hd elements are this
            // task's.
            let row = unsafe {
                std::slice::from_raw_parts_mut(dst.0.add(((bi * t + i) * heads + head) * hd), hd)
            };
            for j in 0..half {
                row[j] = (g[j] * (cos[j] * scale)) + g[j + half] * (sin[j + half] * scale);
            }
            for j in half..hd {
                row[j] = (g[j] * (cos[j] * scale)) - g[j - half] * (sin[j - half] * scale);
            }
        }
    }
}

/// What backward reads, as slices.
struct Inputs<'a> {
    q: &'a [f32],
    k: &'a [f32],
    v: &'a [f32],
    out: &'a [f32],
    lse: &'a [f32],
    dout: &'a [f32],
}

/// No threads inside a task's products: the tasks are the parallelism.
const SERIAL: gemm::Parallelism = gemm::Parallelism::None;

/// Task `task` = (sequence, query head) of [`Config::forward`], compiled
/// for the widest vector unit present.
///
/// # Safety
/// `out` addresses the `[b, t, h, hd]` output, of which no other thread
/// touches this task's head of this sequence.
#[allow(unsafe_code)]
unsafe fn forward_task(c: &Config, qkv: [&[f32]; 3], task: usize, lse: &mut [f32], out: Shared) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the feature was detected; the rest is the caller's.
            return unsafe { forward_avx512(c, qkv, task, lse, out) };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: as above.
            return unsafe { forward_avx2(c, qkv, task, lse, out) };
        }
    }
    // SAFETY: the caller's contract.
    unsafe { forward_body(c, qkv, task, lse, out) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(unsafe_code)]
unsafe fn forward_avx512(c: &Config, qkv: [&[f32]; 3], task: usize, lse: &mut [f32], out: Shared) {
    // SAFETY: forward_task's contract.
    unsafe { forward_body(c, qkv, task, lse, out) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(unsafe_code)]
unsafe fn forward_avx2(c: &Config, qkv: [&[f32]; 3], task: usize, lse: &mut [f32], out: Shared) {
    // SAFETY: forward_task's contract.
    unsafe { forward_body(c, qkv, task, lse, out) }
}

#[allow(unsafe_code)]
#[inline(always)]
unsafe fn forward_body(
    c: &Config,
    [q, k, v]: [&[f32]; 3],
    task: usize,
    lse: &mut [f32],
    out: Shared,
) {
    let Shape { t, h, kv, hd, .. } = c.shape;
    let (bi, head) = (task / h, task % h);
    let kvh = head / (h / kv);
    let mut qs = vec![0f32; t * hd];
    let mut ks = vec![0f32; t * hd];
    c.rotate(q, h, bi, head, c.scale, &mut qs);
    c.rotate(k, kv, bi, kvh, 1.0, &mut ks);
    let values = Strided::new(
        v[(bi * t * kv + kvh) * hd..].as_ptr(),
        (kv * hd) as isize,
        1,
    );
    let mut s = vec![0f32; BLOCK.min(t) * t];
    for r0 in (0..t).step_by(BLOCK) {
        let r1 = (r0 + BLOCK).min(t);
        let (rows, cols) = (r1 - r0, r1);
        let sb = &mut s[..rows * cols];
        // SAFETY (both products): the views address qs, ks, sb, the
        // values' rows 0..cols and the output's rows r0..r1 of this head,
        // all live; sb aliases no operand.
        unsafe {
            gemm_into(
                [rows, cols, hd],
                Strided::new(sb.as_mut_ptr(), cols as isize, 1),
                Strided::new(qs[r0 * hd..].as_ptr(), hd as isize, 1),
                Strided::new(ks.as_ptr(), 1, hd as isize),
                false,
                SERIAL,
            );
        }
        for (i, row) in sb.chunks_exact_mut(cols).enumerate() {
            let (live, masked) = row.split_at_mut(r0 + i + 1);
            let max = max_of(live);
            let sum = exp_shifted_in_place(live, max);
            let inv = 1.0 / sum;
            for x in live.iter_mut() {
                *x *= inv;
            }
            masked.fill(0.0);
            lse[r0 + i] = max + sum.ln();
        }
        unsafe {
            gemm_into(
                [rows, hd, cols],
                Strided::new(
                    out.0.add(((bi * t + r0) * h + head) * hd),
                    (h * hd) as isize,
                    1,
                ),
                Strided::new(sb.as_ptr(), cols as isize, 1),
                values,
                false,
                SERIAL,
            );
        }
    }
}

/// Task `task` = (sequence, KV head) of [`Config::backward`]: the
/// gradients of that KV head and of the query heads reading it.
///
/// # Safety
/// `dst` (`dq`, `dk`, `dv`) address the inputs' shapes, of which no other
/// thread touches this task's heads of this sequence.
#[allow(unsafe_code)]
unsafe fn backward_task(c: &Config, io: &Inputs<'_>, task: usize, dst: [Shared; 3]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the feature was detected; the rest is the caller's.
            return unsafe { backward_avx512(c, io, task, dst) };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: as above.
            return unsafe { backward_avx2(c, io, task, dst) };
        }
    }
    // SAFETY: the caller's contract.
    unsafe { backward_body(c, io, task, dst) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(unsafe_code)]
unsafe fn backward_avx512(c: &Config, io: &Inputs<'_>, task: usize, dst: [Shared; 3]) {
    // SAFETY: backward_task's contract.
    unsafe { backward_body(c, io, task, dst) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(unsafe_code)]
unsafe fn backward_avx2(c: &Config, io: &Inputs<'_>, task: usize, dst: [Shared; 3]) {
    // SAFETY: backward_task's contract.
    unsafe { backward_body(c, io, task, dst) }
}

#[allow(unsafe_code)]
#[inline(always)]
unsafe fn backward_body(c: &Config, io: &Inputs<'_>, task: usize, [dq, dk, dv]: [Shared; 3]) {
    let Shape { t, h, kv, hd, .. } = c.shape;
    let group = h / kv;
    let (bi, kvh) = (task / kv, task % kv);
    let mut ks = vec![0f32; t * hd];
    c.rotate(io.k, kv, bi, kvh, 1.0, &mut ks);
    let mut dks = vec![0f32; t * hd];
    let mut dvs = vec![0f32; t * hd];
    let v_row = (kv * hd) as isize;
    let values = Strided::new(io.v[(bi * t * kv + kvh) * hd..].as_ptr(), v_row, 1);
    let mut qs = vec![0f32; t * hd];
    let mut dqs = vec![0f32; t * hd];
    let mut p = vec![0f32; BLOCK.min(t) * t];
    let mut dp = vec![0f32; BLOCK.min(t) * t];
    let mut delta = vec![0f32; t];
    let q_row = h * hd;
    for head in kvh * group..(kvh + 1) * group {
        c.rotate(io.q, h, bi, head, c.scale, &mut qs);
        let lse = &io.lse[(bi * h + head) * t..][..t];
        let base = (bi * t * h + head) * hd;
        // δᵢ = Σⱼ dOᵢⱼ Oᵢⱼ = Σⱼ Pᵢⱼ dPᵢⱼ, the softmax's backward shift.
        for (i, d) in delta.iter_mut().enumerate() {
            let (g, o) = (
                &io.dout[base + i * q_row..][..hd],
                &io.out[base + i * q_row..][..hd],
            );
            *d = g.iter().zip(o).map(|(g, o)| g * o).sum();
        }
        let grad_out = Strided::new(io.dout[base..].as_ptr(), q_row as isize, 1);
        for r0 in (0..t).step_by(BLOCK) {
            let r1 = (r0 + BLOCK).min(t);
            let (rows, cols) = (r1 - r0, r1);
            let (pb, dpb) = (&mut p[..rows * cols], &mut dp[..rows * cols]);
            let q_blk = Strided::new(qs[r0 * hd..].as_ptr(), hd as isize, 1);
            let do_blk = Strided::new(grad_out.ptr.wrapping_add(r0 * q_row), q_row as isize, 1);
            // SAFETY (every product): each view addresses live rows of
            // this task's scratch buffers or of this head's inputs, and
            // no destination aliases an operand.
            unsafe {
                // S = Qs·Ksᵀ over the causal block.
                gemm_into(
                    [rows, cols, hd],
                    Strided::new(pb.as_mut_ptr(), cols as isize, 1),
                    q_blk,
                    Strided::new(ks.as_ptr(), 1, hd as isize),
                    false,
                    SERIAL,
                );
                // dP = dO·Vᵀ.
                gemm_into(
                    [rows, cols, hd],
                    Strided::new(dpb.as_mut_ptr(), cols as isize, 1),
                    do_blk,
                    values.transposed(),
                    false,
                    SERIAL,
                );
            }
            for (i, (prow, dprow)) in pb
                .chunks_exact_mut(cols)
                .zip(dpb.chunks_exact_mut(cols))
                .enumerate()
            {
                let live = r0 + i + 1;
                let (l, d) = (lse[r0 + i], delta[r0 + i]);
                for (p, dp) in prow[..live].iter_mut().zip(&mut dprow[..live]) {
                    *p = exp(*p - l);
                    *dp = *p * (*dp - d);
                }
                prow[live..].fill(0.0);
                dprow[live..].fill(0.0);
            }
            let (p_view, ds_view) = (
                Strided::new(pb.as_ptr(), cols as isize, 1),
                Strided::new(dpb.as_ptr(), cols as isize, 1),
            );
            unsafe {
                // dV += Pᵀ·dO.
                gemm_into(
                    [cols, hd, rows],
                    Strided::new(dvs.as_mut_ptr(), hd as isize, 1),
                    p_view.transposed(),
                    do_blk,
                    true,
                    SERIAL,
                );
                // dQs = dS·Ks.
                gemm_into(
                    [rows, hd, cols],
                    Strided::new(dqs[r0 * hd..].as_mut_ptr(), hd as isize, 1),
                    ds_view,
                    Strided::new(ks.as_ptr(), hd as isize, 1),
                    false,
                    SERIAL,
                );
                // dKs += dSᵀ·Qs.
                gemm_into(
                    [cols, hd, rows],
                    Strided::new(dks.as_mut_ptr(), hd as isize, 1),
                    ds_view.transposed(),
                    q_blk,
                    true,
                    SERIAL,
                );
            }
        }
        // SAFETY: this task's query head of this sequence.
        unsafe { c.unrotate(&dqs, h, bi, head, c.scale, dq) };
    }
    // SAFETY: this task's KV head of this sequence.
    unsafe { c.unrotate(&dks, kv, bi, kvh, 1.0, dk) };
    for (i, row) in dvs.chunks_exact(hd).enumerate() {
        // SAFETY: as above.
        let dst =
            unsafe { std::slice::from_raw_parts_mut(dv.0.add(((bi * t + i) * kv + kvh) * hd), hd) };
        dst.copy_from_slice(row);
    }
}
