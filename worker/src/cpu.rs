//! Kernels the CPU backend runs on its own buffers instead of burn's
//! op-by-op path, where that path costs a multiple of the arithmetic.
//!
//! The head and its cross-entropy are most of a small model's step
//! (4 layers at d = 64 with a 50k vocabulary: 40 of 42 GFLOP). Op by op,
//! every elementwise pass of the softmax streams the `[rows, vocab]`
//! logits through memory again, each op allocates and zeroes its output,
//! and `exp` is libm's scalar one: measured on 2 cores, the head took
//! 0.8 s of a 1.1 s step. [`head_cross_entropy`] does it with three
//! gemm calls per chunk of rows and one fused, vectorized pass over each
//! row of logits while the row is in cache.
//!
//! AdamW ([`adamw`]) is the other: flex runs each of its dozen scalar and
//! elementwise operations on one thread, a pass over memory each; the
//! kernel does one parallel pass per bucket, in the same f32 arithmetic
//! in the same order, so its results are bit-identical.
//!
//! SwiGLU ([`swiglu`]), `silu(a) ⊙ b`, is a third: op by op it is a
//! sigmoid, two products and, backward, half a dozen more serial passes
//! over `[tokens, d_ffn]`; here it is one parallel pass each way, an
//! autodiff operation of its own on `Autodiff<Flex>`.
//!
//! RMSNorm ([`rms_norm`]) likewise: one pass over the rows each way.
//! The projections' products ([`matmul`]) skip flex's zeroed and then
//! realigned outputs and its copies of transposed views.
//!
//! Attention ([`causal_attention`]) is the fifth: rotary embeddings,
//! causal scores, softmax and the product with the values as one
//! operation, in parallel over sequences and heads (see its module).
//!
//! Flex tensors are reached through [`as_flex`]: a downcast of the float
//! primitive, so the same trainer code runs everywhere and only the CPU
//! backend takes this path. Nothing is copied: a contiguous tensor's
//! storage is read in place, and the results become tensors by moving
//! their vectors.

use std::any::Any;

use burn::tensor::backend::{Backend, BackendTypes};
use burn::tensor::{DType, Tensor, TensorData, TensorPrimitive};
use burn_autodiff::NodeId;
use burn_autodiff::checkpoint::base::Checkpointer;
use burn_autodiff::checkpoint::strategy::NoCheckpointing;
use burn_autodiff::grads::Gradients;
use burn_autodiff::ops::{Backward, Ops, OpsKind};
use burn_flex::FlexTensor;
use rayon::prelude::*;

mod attention;
mod linear;
mod norm;

pub use attention::{Qkv, RopeTables, causal_attention};
pub use linear::{matmul, matmul_grads};
pub use norm::rms_norm;

/// Rows of logits per chunk. Each chunk adds a `[vocab, d]` product into
/// `dW`, read and written once, so fewer, larger chunks save that
/// traffic until the chunk's logits leave the cache for good: measured on
/// 2 cores at d = 64 and vocabulary 50k, 64 rows 3,530 tokens/s, 128
/// rows 3,750, 256 rows 3,970, 512 rows 3,540; at d = 768 no difference
/// between 256 and 768.
const HEAD_ROWS: usize = 256;

/// How the head's weight holds its vocabulary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadLayout {
    /// `[vocab, d]`: the tied embedding's rows.
    Rows,
    /// `[d, vocab]`: an untied head, applied as `y · W`.
    Columns,
}

impl HeadLayout {
    /// The weight's strides along the vocabulary and along the features.
    fn strides(self, v: usize, d: usize) -> (isize, isize) {
        match self {
            HeadLayout::Rows => (d as isize, 1),
            HeadLayout::Columns => (1, v as isize),
        }
    }
}

/// Whether `X`'s float tensors are `P`s.
pub(crate) fn primitive_is<X: Backend, P: 'static>() -> bool {
    std::any::TypeId::of::<X::FloatTensorPrimitive>() == std::any::TypeId::of::<P>()
}

/// The tensor's own float primitive as the `P` it is (no other owner is
/// added). Panics unless [`primitive_is::<X, P>`](primitive_is).
pub(crate) fn into_primitive<P: 'static, X: Backend, const D: usize>(t: Tensor<X, D>) -> P {
    let primitive: Box<dyn Any> = Box::new(t.into_primitive().tensor());
    *primitive
        .downcast::<P>()
        .expect("the backend's primitive: checked by primitive_is")
}

/// A `P` as a tensor of `X`. Panics unless
/// [`primitive_is::<X, P>`](primitive_is).
pub(crate) fn from_primitive<P: 'static, X: Backend, const D: usize>(p: P) -> Tensor<X, D> {
    let primitive: Box<dyn Any> = Box::new(p);
    let primitive = *primitive
        .downcast::<X::FloatTensorPrimitive>()
        .expect("the backend's primitive: checked by primitive_is");
    Tensor::from_primitive(TensorPrimitive::Float(primitive))
}

/// Whether both tensors are f32, the only dtype the kernels take (under
/// mixed precision the rest goes through burn's operations).
fn f32_pair<X: Backend, const D: usize, const E: usize>(
    a: &Tensor<X, D>,
    b: &Tensor<X, E>,
) -> bool {
    a.dtype() == DType::F32 && b.dtype() == DType::F32
}

/// Whether `X` is the flex backend.
pub fn is_flex<X: Backend>() -> bool {
    primitive_is::<X, FlexTensor>()
}

/// The tensor's flex primitive, when `X` is the flex backend; shares
/// storage with `t`.
pub fn as_flex<X: Backend, const D: usize>(t: &Tensor<X, D>) -> Option<FlexTensor> {
    is_flex::<X>().then(|| into_flex(t.clone()))
}

/// Appends `t`'s values to `out` in one copy, reading flex's storage in
/// place; false (nothing appended) on other backends.
pub fn extend_host<X: Backend, const D: usize>(t: &Tensor<X, D>, out: &mut Vec<f32>) -> bool {
    match as_flex(t) {
        Some(f) if f.dtype() == burn::tensor::DType::F32 => {
            let v = values(&f);
            crate::tensors::count_transfer(v.len());
            out.extend_from_slice(&v);
            true
        }
        _ => false,
    }
}

fn into_flex<X: Backend, const D: usize>(t: Tensor<X, D>) -> FlexTensor {
    into_primitive(t)
}

fn from_flex<X: Backend, const D: usize>(t: FlexTensor) -> Tensor<X, D> {
    from_primitive(t)
}

/// The trainer's CPU backend with autodiff, whose SwiGLU is [`swiglu`]'s
/// own operation.
type AutodiffFlex = burn::backend::Autodiff<burn::backend::Flex>;

/// Its tensors (burn-autodiff does not export the type's name).
type AutodiffTensor = <AutodiffFlex as BackendTypes>::FloatTensorPrimitive;

/// Elements per parallel task of the elementwise kernels.
const ELEMENTWISE_CHUNK: usize = 1 << 15;

/// `silu(a) ⊙ b` (SwiGLU's gate times its up projection), `a` and `b`
/// of one shape. On flex, with or without autodiff, one parallel pass
/// forward and one backward; elsewhere burn's `silu` and a product.
pub fn swiglu<X: Backend>(a: Tensor<X, 2>, b: Tensor<X, 2>) -> Tensor<X, 2> {
    if !f32_pair(&a, &b) {
        return burn::tensor::activation::silu(a) * b;
    }
    if is_flex::<X>() {
        return from_flex(swiglu_forward(&into_flex(a), &into_flex(b)));
    }
    if primitive_is::<X, AutodiffTensor>() {
        let out = swiglu_autodiff(into_primitive(a), into_primitive(b));
        return from_primitive(out);
    }
    burn::tensor::activation::silu(a) * b
}

/// SwiGLU's backward: from the checkpointed `a` and `b` and the output's
/// gradient, both inputs' gradients in one pass.
#[derive(Debug)]
struct SwiGluBackward;

impl Backward<burn::backend::Flex, 2> for SwiGluBackward {
    type State = (NodeId, NodeId);

    fn backward(
        self,
        ops: Ops<Self::State, 2>,
        grads: &mut Gradients,
        checkpointer: &mut Checkpointer,
    ) {
        let (a, b) = ops.state;
        let a: FlexTensor = checkpointer.retrieve_node_output(a);
        let b: FlexTensor = checkpointer.retrieve_node_output(b);
        let grad: FlexTensor = grads.consume::<burn::backend::Flex>(&ops.node);
        let (da, db) = swiglu_backward(&a, &b, &grad);
        let [node_a, node_b] = ops.parents;
        if let Some(node) = node_a {
            grads.register::<burn::backend::Flex>(node.id, da);
        }
        if let Some(node) = node_b {
            grads.register::<burn::backend::Flex>(node.id, db);
        }
    }
}

fn swiglu_autodiff(a: AutodiffTensor, b: AutodiffTensor) -> AutodiffTensor {
    match SwiGluBackward
        .prepare::<NoCheckpointing>([a.node.clone(), b.node.clone()])
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(mut prep) => {
            let state = (prep.checkpoint(&a), prep.checkpoint(&b));
            prep.finish(state, swiglu_forward(&a.primitive, &b.primitive))
        }
        OpsKind::UnTracked(prep) => prep.finish(swiglu_forward(&a.primitive, &b.primitive)),
    }
}

/// Contiguous f32 storage of a flex tensor of `n` elements (copied when
/// it is a strided view).
fn values(t: &FlexTensor) -> std::borrow::Cow<'_, [f32]> {
    match t.as_slice::<f32>() {
        Some(x) => std::borrow::Cow::Borrowed(x),
        None => std::borrow::Cow::Owned(
            t.to_contiguous()
                .as_slice::<f32>()
                .expect("contiguous")
                .to_vec(),
        ),
    }
}

fn flex_of(values: Vec<f32>, like: &FlexTensor) -> FlexTensor {
    let shape = like.layout().shape().clone();
    FlexTensor::from_data(TensorData::new(values, shape))
}

fn swiglu_forward(a: &FlexTensor, b: &FlexTensor) -> FlexTensor {
    let (av, bv) = (values(a), values(b));
    assert_eq!(av.len(), bv.len(), "SwiGLU's inputs have one shape");
    let mut out = vec![0f32; av.len()];
    out.par_chunks_mut(ELEMENTWISE_CHUNK)
        .zip(av.par_chunks(ELEMENTWISE_CHUNK))
        .zip(bv.par_chunks(ELEMENTWISE_CHUNK))
        .for_each(|((o, a), b)| swiglu_forward_chunk(o, a, b));
    flex_of(out, a)
}

fn swiglu_backward(a: &FlexTensor, b: &FlexTensor, g: &FlexTensor) -> (FlexTensor, FlexTensor) {
    let (av, bv, gv) = (values(a), values(b), values(g));
    assert!(av.len() == bv.len() && av.len() == gv.len(), "one shape");
    let mut da = vec![0f32; av.len()];
    let mut db = vec![0f32; av.len()];
    da.par_chunks_mut(ELEMENTWISE_CHUNK)
        .zip(db.par_chunks_mut(ELEMENTWISE_CHUNK))
        .zip(av.par_chunks(ELEMENTWISE_CHUNK))
        .zip(bv.par_chunks(ELEMENTWISE_CHUNK))
        .zip(gv.par_chunks(ELEMENTWISE_CHUNK))
        .for_each(|((((da, db), a), b), g)| swiglu_backward_chunk(da, db, a, b, g));
    (flex_of(da, a), flex_of(db, a))
}

/// `1 / (1 + e^(−x))`.
#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp((-x).min(88.0)))
}

fn swiglu_forward_chunk(out: &mut [f32], a: &[f32], b: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the feature was detected.
        #[allow(unsafe_code)]
        return unsafe { swiglu_forward_avx512(out, a, b) };
    }
    swiglu_forward_portable(out, a, b);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn swiglu_forward_avx512(out: &mut [f32], a: &[f32], b: &[f32]) {
    swiglu_forward_portable(out, a, b);
}

#[inline(always)]
fn swiglu_forward_portable(out: &mut [f32], a: &[f32], b: &[f32]) {
    for ((o, &a), &b) in out.iter_mut().zip(a).zip(b) {
        *o = a * sigmoid(a) * b;
    }
}

fn swiglu_backward_chunk(da: &mut [f32], db: &mut [f32], a: &[f32], b: &[f32], g: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the feature was detected.
        #[allow(unsafe_code)]
        return unsafe { swiglu_backward_avx512(da, db, a, b, g) };
    }
    swiglu_backward_portable(da, db, a, b, g);
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn swiglu_backward_avx512(da: &mut [f32], db: &mut [f32], a: &[f32], b: &[f32], g: &[f32]) {
    swiglu_backward_portable(da, db, a, b, g);
}

/// `d silu(a) / da = σ(a)·(1 + a·(1 − σ(a)))`.
#[inline(always)]
fn swiglu_backward_portable(da: &mut [f32], db: &mut [f32], a: &[f32], b: &[f32], g: &[f32]) {
    for ((((da, db), &a), &b), &g) in da.iter_mut().zip(db.iter_mut()).zip(a).zip(b).zip(g) {
        let s = sigmoid(a);
        *db = g * a * s;
        *da = g * b * s * (1.0 + a * (1.0 - s));
    }
}

/// One AdamW step's scalars, each formed in f64 and rounded once to f32
/// (PyTorch's single-tensor AdamW).
#[derive(Debug, Clone, Copy)]
pub struct AdamWStep {
    /// The gradient's clipping factor (1: none).
    pub clip: f32,
    pub b1_weight: f32,
    pub b2: f32,
    pub b2_weight: f32,
    pub step_size: f32,
    pub bc2_sqrt: f32,
    pub eps: f32,
    /// `1 − lr·wd`, for buckets that decay.
    pub decay: Option<f32>,
}

/// Elements per parallel task of [`adamw`].
const ADAMW_CHUNK: usize = 1 << 15;

/// AdamW on one bucket of flex tensors, in place where a tensor has no
/// other owner: returns the new master, first and second moments. Panics
/// unless [`is_flex::<X>`](is_flex).
pub fn adamw<X: Backend>(
    p: Tensor<X, 1>,
    m: Tensor<X, 1>,
    v: Tensor<X, 1>,
    g: &Tensor<X, 1>,
    s: &AdamWStep,
) -> [Tensor<X, 1>; 3] {
    let n = p.dims()[0];
    // Written through `storage_mut`, which is the whole buffer: a view
    // into a larger one is copied out first.
    let whole = |t: Tensor<X, 1>| {
        let f = contiguous(into_flex(t));
        if f.storage::<f32>().len() == n {
            f
        } else {
            f.to_contiguous()
        }
    };
    let (mut pf, mut mf, mut vf) = (whole(p), whole(m), whole(v));
    let gf = contiguous(into_flex(g.clone()));
    let gs = gf.as_slice::<f32>().expect("contiguous");
    let (ps, ms, vs) = (
        pf.storage_mut::<f32>(),
        mf.storage_mut::<f32>(),
        vf.storage_mut::<f32>(),
    );
    assert!(
        ps.len() == n && ms.len() == n && vs.len() == n && gs.len() == n,
        "a bucket's master, moments and gradient have its length"
    );
    let s = *s;
    ps.par_chunks_mut(ADAMW_CHUNK)
        .zip(ms.par_chunks_mut(ADAMW_CHUNK))
        .zip(vs.par_chunks_mut(ADAMW_CHUNK))
        .zip(gs.par_chunks(ADAMW_CHUNK))
        .for_each(|(((p, m), v), g)| adamw_chunk(p, m, v, g, &s));
    [from_flex(pf), from_flex(mf), from_flex(vf)]
}

/// The tensor-op AdamW's arithmetic, element by element, in its order.
fn adamw_chunk(p: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32], s: &AdamWStep) {
    for (((p, m), v), &g) in p.iter_mut().zip(m).zip(v).zip(g) {
        let g = if s.clip == 1.0 { g } else { g * s.clip };
        *m += (g - *m) * s.b1_weight;
        *v = *v * s.b2 + (g * g) * s.b2_weight;
        let denom = v.sqrt() / s.bc2_sqrt + s.eps;
        let decayed = match s.decay {
            Some(d) => *p * d,
            None => *p,
        };
        *p = decayed - (*m * s.step_size) / denom;
    }
}

/// A contiguous f32 view of a flex tensor (copied only when it is not
/// contiguous already).
fn contiguous(t: FlexTensor) -> FlexTensor {
    if t.as_slice::<f32>().is_some() {
        t
    } else {
        t.to_contiguous()
    }
}

/// [`head_cross_entropy`] on flex tensors: `None` when `X` is another
/// backend. `w` is the head's weight in `layout`; the returned `dW` has
/// its shape. Under [`HeadPass::Losses`] only the tokens' losses are
/// computed, and `dy` and `dW` come back empty (`[0, 0]`).
#[allow(clippy::too_many_arguments)] // the head's operands, then its pass
pub fn flex_head_cross_entropy<X: Backend>(
    y: &Tensor<X, 2>,
    w: &Tensor<X, 2>,
    layout: HeadLayout,
    targets: &[u32],
    denominator: f64,
    device: &X::Device,
    tokens: Option<&mut Vec<f64>>,
    pass: HeadPass<'_>,
) -> Option<(f64, Tensor<X, 2>, Tensor<X, 2>)> {
    if !f32_pair(y, w) {
        return None;
    }
    let (yf, wf) = (contiguous(as_flex(y)?), contiguous(as_flex(w)?));
    let [n, d] = y.dims();
    let w_dims = w.dims();
    let v = match layout {
        HeadLayout::Rows => w_dims[0],
        HeadLayout::Columns => w_dims[1],
    };
    let (loss, dy, dw) = head_cross_entropy(
        yf.as_slice::<f32>()?,
        wf.as_slice::<f32>()?,
        layout,
        [n, d, v],
        targets,
        (1.0 / denominator) as f32,
        tokens,
        pass,
    );
    let (dy_dims, dw_dims) = match pass {
        HeadPass::Losses => ([0, 0], [0, 0]),
        _ => ([n, d], w_dims),
    };
    let dy = Tensor::from_data(TensorData::new(dy, dy_dims), device);
    let dw = Tensor::from_data(TensorData::new(dw, dw_dims), device);
    Some((loss / denominator, dy, dw))
}

/// What a pass of the fused head computes.
#[derive(Debug, Clone, Copy)]
pub enum HeadPass<'a> {
    /// The loss and its gradients, every token's weighing the same.
    Full,
    /// The loss and its gradients, token `i`'s gradient multiplied by
    /// `scales[i]` (loss-based reweighting; the loss stays unweighted).
    Weighted(&'a [f32]),
    /// Only the tokens' losses: the first pass of a reweighted head.
    Losses,
}

impl HeadPass<'_> {
    /// Token `i`'s multiplier of the gradient.
    fn scale(&self, i: usize) -> f32 {
        match self {
            HeadPass::Weighted(s) => s[i],
            _ => 1.0,
        }
    }
}

/// The head's logits `y · Wᵀ` (`y`: `[n, d]` row-major, `W` in `layout`),
/// their cross-entropy against `targets` and its gradients, with the
/// loss gradient scaled by `scale` (one over the step's target tokens)
/// and, under [`HeadPass::Weighted`], by each token's own multiplier.
/// Returns the summed (unscaled, unweighted) loss, `dy` (`[n, d]`) and
/// `dW` (in `layout`); each row's loss is appended to `tokens` when
/// given. Under [`HeadPass::Losses`] no gradient is computed (`dy` and
/// `dW` are empty): one product instead of three. The logits are
/// computed for a chunk of rows at a time and never held whole.
#[allow(unsafe_code)] // gemm's raw-pointer interface
#[allow(clippy::too_many_arguments)] // the head's operands, then its pass
pub fn head_cross_entropy(
    y: &[f32],
    w: &[f32],
    layout: HeadLayout,
    [n, d, v]: [usize; 3],
    targets: &[u32],
    scale: f32,
    mut tokens: Option<&mut Vec<f64>>,
    pass: HeadPass<'_>,
) -> (f64, Vec<f32>, Vec<f32>) {
    assert_eq!(y.len(), n * d, "y is [n, d]");
    assert_eq!(w.len(), v * d, "W holds the vocabulary times d");
    assert_eq!(targets.len(), n, "one target per row");
    assert!(
        targets.iter().all(|&t| (t as usize) < v),
        "a target is outside the vocabulary of {v}"
    );
    if let HeadPass::Weighted(s) = pass {
        assert_eq!(s.len(), n, "one multiplier per row");
    }
    let grads = !matches!(pass, HeadPass::Losses);
    let (sv, sd) = layout.strides(v, d);
    // 256 MiB of logits at most.
    let chunk = HEAD_ROWS.min((1 << 26) / v.max(1)).clamp(1, n.max(1));
    let mut z = vec![0f32; chunk * v];
    let (mut dy, mut dw) = if grads {
        (vec![0f32; n * d], vec![0f32; v * d])
    } else {
        (Vec::new(), Vec::new())
    };
    let threads = rayon::current_num_threads();
    let par = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    let mut loss = 0f64;
    for r0 in (0..n).step_by(chunk) {
        let c = chunk.min(n - r0);
        let yc = &y[r0 * d..(r0 + c) * d];
        let zc = &mut z[..c * v];
        // SAFETY (all three): every pointer, extent and stride describes a
        // live slice checked above, and dst never aliases an operand.
        // z[i, t] = Σ_j y[i, j] W[t, j]
        let z_view = Strided::new(zc.as_mut_ptr(), v as isize, 1);
        unsafe {
            gemm_into(
                [c, v, d],
                z_view,
                Strided::new(yc.as_ptr(), d as isize, 1),
                Strided::new(w.as_ptr(), sd, sv),
                false,
                par,
            );
        }
        // Rows in parallel, their losses summed in row order (rayon's own
        // sum associates as the work was stolen, so its last bits vary).
        let rows: Vec<f64> = zc
            .par_chunks_mut(v)
            .zip(&targets[r0..r0 + c])
            .enumerate()
            .map(|(i, (row, &t))| {
                softmax_cross_entropy_row(row, t as usize, scale * pass.scale(r0 + i))
            })
            .collect();
        loss += rows.iter().sum::<f64>();
        if let Some(t) = tokens.as_deref_mut() {
            t.extend_from_slice(&rows);
        }
        if !grads {
            continue;
        }
        let p = Strided::new(zc.as_ptr(), v as isize, 1);
        // dy[i, j] = Σ_t p[i, t] W[t, j]
        unsafe {
            gemm_into(
                [c, d, v],
                Strided::new(dy[r0 * d..].as_mut_ptr(), d as isize, 1),
                p,
                Strided::new(w.as_ptr(), sv, sd),
                false,
                par,
            );
        }
        // dW[t, j] += Σ_i p[i, t] y[i, j]
        unsafe {
            gemm_into(
                [v, d, c],
                Strided::new(dw.as_mut_ptr(), sv, sd),
                p.transposed(),
                Strided::new(yc.as_ptr(), d as isize, 1),
                r0 > 0,
                par,
            );
        }
    }
    (loss, dy, dw)
}

/// A matrix for gemm: element (i, j) at `ptr + i·row + j·col`.
#[derive(Debug, Clone, Copy)]
struct Strided<P> {
    ptr: P,
    row: isize,
    col: isize,
}

impl<P> Strided<P> {
    fn new(ptr: P, row: isize, col: isize) -> Strided<P> {
        Strided { ptr, row, col }
    }

    fn transposed(self) -> Strided<P> {
        Strided {
            ptr: self.ptr,
            row: self.col,
            col: self.row,
        }
    }
}

/// `dst[m×n] = lhs[m×k] · rhs[k×n]`, or `+=` when `accumulate`.
///
/// # Safety
/// Each view must address live f32 storage over its whole extent, and
/// `dst` must not overlap an operand.
#[allow(unsafe_code)]
unsafe fn gemm_into(
    [m, n, k]: [usize; 3],
    dst: Strided<*mut f32>,
    lhs: Strided<*const f32>,
    rhs: Strided<*const f32>,
    accumulate: bool,
    par: gemm::Parallelism,
) {
    // SAFETY: the caller's contract.
    unsafe {
        gemm::gemm(
            m, n, k, dst.ptr, dst.col, dst.row, accumulate, lhs.ptr, lhs.col, lhs.row, rhs.ptr,
            rhs.col, rhs.row, 1.0, 1.0, false, false, false, par,
        );
    }
}

/// One row of logits in place: its loss `log Σ exp(z) − z[target]`
/// (returned) and its gradient `(softmax(z) − onehot(target)) · scale`
/// (left in the row), compiled for the widest vector unit present.
#[allow(unsafe_code)] // calling target-feature functions once detected
fn softmax_cross_entropy_row(row: &mut [f32], target: usize, scale: f32) -> f64 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the feature was detected.
            return unsafe { row_avx512(row, target, scale) };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the features were detected.
            return unsafe { row_avx2(row, target, scale) };
        }
    }
    row_portable(row, target, scale)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn row_avx512(row: &mut [f32], target: usize, scale: f32) -> f64 {
    row_portable(row, target, scale)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn row_avx2(row: &mut [f32], target: usize, scale: f32) -> f64 {
    row_portable(row, target, scale)
}

/// Lanes of the vectorizable loops: one AVX-512 register.
const LANES: usize = 16;

#[inline(always)]
fn row_portable(row: &mut [f32], target: usize, scale: f32) -> f64 {
    let picked = row[target];
    let max = max_of(row);
    let sum = exp_shifted_in_place(row, max);
    let k = scale / sum;
    for x in row.iter_mut() {
        *x *= k;
    }
    row[target] -= scale;
    f64::from(sum).ln() + f64::from(max) - f64::from(picked)
}

#[inline(always)]
fn max_of(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let (chunks, rest) = x.as_chunks::<LANES>();
    for c in chunks {
        for (a, &b) in acc.iter_mut().zip(c) {
            *a = if b > *a { b } else { *a };
        }
    }
    rest.iter()
        .chain(&acc)
        .fold(f32::NEG_INFINITY, |m, &b| if b > m { b } else { m })
}

/// `x ← exp(x − shift)`, returning the sum.
#[inline(always)]
fn exp_shifted_in_place(x: &mut [f32], shift: f32) -> f32 {
    let mut acc = [0f32; LANES];
    let (chunks, rest) = x.as_chunks_mut::<LANES>();
    for c in chunks {
        for (a, e) in acc.iter_mut().zip(c.iter_mut()) {
            *e = exp(*e - shift);
            *a += *e;
        }
    }
    let mut sum: f32 = acc.iter().sum();
    for e in rest {
        *e = exp(*e - shift);
        sum += *e;
    }
    sum
}

/// `eˣ` for `x ≤ 0` (and small positive `x`), within 2 ulp: Cephes'
/// `expf` range reduction and polynomial, branch-free so loops over it
/// vectorize; flushes to zero below −87.3.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5 · 2²³: adding it rounds to an integer held in the low mantissa.
    const ROUND: f32 = 12_582_912.0;
    let underflow = x < -87.3;
    let x = x.clamp(-87.3, 88.0);
    let k = x.mul_add(LOG2E, ROUND);
    let n = k - ROUND;
    let r = n.mul_add(-LN2_LO, n.mul_add(-LN2_HI, x));
    let p = 1.987_569_1e-4_f32
        .mul_add(r, 1.398_2e-3)
        .mul_add(r, 8.333_452e-3)
        .mul_add(r, 4.166_579_6e-2)
        .mul_add(r, 1.666_666_5e-1)
        .mul_add(r, 0.5);
    let y = p.mul_add(r * r, r) + 1.0;
    let bits = (k.to_bits() as i32 - ROUND.to_bits() as i32 + 127) << 23;
    let e = y * f32::from_bits(bits as u32);
    if underflow { 0.0 } else { e }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_two_ulp_of_libm() {
        let mut worst = 0f32;
        let mut x = -87.0f32;
        while x < 10.0 {
            let (got, want) = (exp(x), x.exp());
            worst = worst.max((got - want).abs() / want);
            x += 0.000_37;
        }
        assert!(worst < 2.5 * f32::EPSILON, "worst relative error {worst:e}");
        assert_eq!(exp(-100.0), 0.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(0.0), 1.0);
    }

    #[test]
    fn a_row_is_softmax_minus_onehot() {
        let mut row: Vec<f32> = (0..37).map(|i| (i as f32 * 0.7).sin() * 5.0).collect();
        let z = row.clone();
        let loss = softmax_cross_entropy_row(&mut row, 5, 0.5);
        let m = z.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let s: f64 = z.iter().map(|&x| f64::from(x - m).exp()).sum();
        let want = s.ln() + f64::from(m) - f64::from(z[5]);
        assert!((loss - want).abs() < 1e-6, "{loss} vs {want}");
        for (i, (&g, &x)) in row.iter().zip(&z).enumerate() {
            let p = f64::from(x - m).exp() / s;
            let want = (p - if i == 5 { 1.0 } else { 0.0 }) * 0.5;
            assert!((f64::from(g) - want).abs() < 1e-7, "row[{i}] {g} vs {want}");
        }
    }
}
