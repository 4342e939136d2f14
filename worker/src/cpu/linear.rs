//! Two-dimensional matrix products as one operation on flex, for the
//! model's projections.
//!
//! Flex's own product allocates its output zeroed and then copies it once
//! more to align it (on the calling thread, while the other cores wait),
//! and burn-autodiff's backward hands it transposed views, which it
//! copies out before multiplying. Here the output is written by gemm into
//! fresh memory, and backward passes the transposes to gemm as strides.

use burn::tensor::Tensor;
use burn::tensor::backend::Backend;
use burn_autodiff::checkpoint::base::Checkpointer;
use burn_autodiff::checkpoint::strategy::NoCheckpointing;
use burn_autodiff::grads::Gradients;
use burn_autodiff::ops::{Backward, Ops, OpsKind};
use burn_flex::FlexTensor;

use super::{
    AutodiffTensor, Strided, f32_pair, from_flex, from_primitive, gemm_into, into_flex,
    into_primitive, is_flex, primitive_is, values,
};

/// `a · b` for `a` `[n, k]` and `b` `[k, m]` on flex (with or without
/// autodiff), both f32; `Err` with the inputs otherwise.
#[allow(clippy::type_complexity)]
pub fn matmul<X: Backend>(
    a: Tensor<X, 2>,
    b: Tensor<X, 2>,
) -> Result<Tensor<X, 2>, (Tensor<X, 2>, Tensor<X, 2>)> {
    let ([n, k], [kb, m]) = (a.dims(), b.dims());
    if k != kb || !f32_pair(&a, &b) {
        // burn's own product reports the mismatch.
        return Err((a, b));
    }
    if is_flex::<X>() {
        let (a, b) = (into_flex(a), into_flex(b));
        return Ok(from_flex(product(&a, &b, [n, k, m])));
    }
    if !primitive_is::<X, AutodiffTensor>() {
        return Err((a, b));
    }
    let a: AutodiffTensor = into_primitive(a);
    let b: AutodiffTensor = into_primitive(b);
    let prep = MatmulBackward
        .prepare::<NoCheckpointing>([a.node.clone(), b.node.clone()])
        .compute_bound()
        .stateful();
    let c = product(&a.primitive, &b.primitive, [n, k, m]);
    Ok(from_primitive(match prep {
        OpsKind::Tracked(prep) => prep.finish((a.primitive, b.primitive), c),
        OpsKind::UnTracked(prep) => prep.finish(c),
    }))
}

#[derive(Debug)]
struct MatmulBackward;

impl Backward<burn::backend::Flex, 2> for MatmulBackward {
    type State = (FlexTensor, FlexTensor);

    fn backward(
        self,
        ops: Ops<Self::State, 2>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let (a, b) = ops.state;
        let dc: FlexTensor = grads.consume::<burn::backend::Flex>(&ops.node);
        let [node_a, node_b] = ops.parents;
        let (da, db) = product_grads(&a, &b, &dc, [node_a.is_some(), node_b.is_some()]);
        if let (Some(node), Some(da)) = (node_a, da) {
            grads.register::<burn::backend::Flex>(node.id, da);
        }
        if let (Some(node), Some(db)) = (node_b, db) {
            grads.register::<burn::backend::Flex>(node.id, db);
        }
    }
}

/// The gradients of `C = A · B` from `dC`, those asked for: `dA = dC ·
/// Bᵀ` and `dB = Aᵀ · dC`, the transposes passed to gemm as strides.
fn product_grads(
    a: &FlexTensor,
    b: &FlexTensor,
    dc: &FlexTensor,
    [want_a, want_b]: [bool; 2],
) -> (Option<FlexTensor>, Option<FlexTensor>) {
    let (ad, bd) = (a.layout().shape().clone(), b.layout().shape().clone());
    let (n, k, m) = (ad[0], ad[1], bd[1]);
    let (av, bv, dcv) = (values(a), values(b), values(dc));
    let da = want_a.then(|| {
        // SAFETY: views of dC [n, m] and B [k, m], live slices.
        #[allow(unsafe_code)]
        let da = unsafe {
            gemm_new(
                [n, k, m],
                Strided::new(dcv.as_ptr(), m as isize, 1),
                Strided::new(bv.as_ptr(), m as isize, 1).transposed(),
            )
        };
        flex(da, [n, k])
    });
    let db = want_b.then(|| {
        // SAFETY: views of A [n, k] and dC [n, m], live slices.
        #[allow(unsafe_code)]
        let db = unsafe {
            gemm_new(
                [k, m, n],
                Strided::new(av.as_ptr(), k as isize, 1).transposed(),
                Strided::new(dcv.as_ptr(), m as isize, 1),
            )
        };
        flex(db, [k, m])
    });
    (da, db)
}

/// The gradients of `a · b` from `dc` without the product itself: `(dA,
/// dB)` by the kernels [`matmul`]'s backward runs, so they are bit for bit
/// what autodiff would give. On flex (no autodiff) only; `Err` with the
/// inputs otherwise.
#[allow(clippy::type_complexity)]
pub fn matmul_grads<X: Backend>(
    a: Tensor<X, 2>,
    b: Tensor<X, 2>,
    dc: Tensor<X, 2>,
) -> Result<(Tensor<X, 2>, Tensor<X, 2>), (Tensor<X, 2>, Tensor<X, 2>, Tensor<X, 2>)> {
    if !is_flex::<X>() || !f32_pair(&a, &b) || !f32_pair(&a, &dc) {
        return Err((a, b, dc));
    }
    let (a, b, dc) = (into_flex(a), into_flex(b), into_flex(dc));
    let (da, db) = product_grads(&a, &b, &dc, [true, true]);
    Ok((
        from_flex(da.expect("asked for")),
        from_flex(db.expect("asked for")),
    ))
}

fn product(a: &FlexTensor, b: &FlexTensor, [n, k, m]: [usize; 3]) -> FlexTensor {
    let (av, bv) = (values(a), values(b));
    assert!(av.len() == n * k && bv.len() == k * m, "[n, k] · [k, m]");
    // SAFETY: views of A [n, k] and B [k, m], live slices checked above.
    #[allow(unsafe_code)]
    let c = unsafe {
        gemm_new(
            [n, m, k],
            Strided::new(av.as_ptr(), k as isize, 1),
            Strided::new(bv.as_ptr(), m as isize, 1),
        )
    };
    flex(c, [n, m])
}

fn flex(values: Vec<f32>, shape: [usize; 2]) -> FlexTensor {
    FlexTensor::from_data(burn::tensor::TensorData::new(values, shape))
}

/// `lhs[r×inner] · rhs[inner×c]` into a new row-major `[r, c]` buffer,
/// on every thread.
///
/// # Safety
/// `lhs` and `rhs` address live f32 storage over their whole extents.
#[allow(unsafe_code)]
unsafe fn gemm_new(
    [r, c, inner]: [usize; 3],
    lhs: Strided<*const f32>,
    rhs: Strided<*const f32>,
) -> Vec<f32> {
    if inner == 0 {
        return vec![0f32; r * c];
    }
    let mut out: Vec<f32> = Vec::with_capacity(r * c);
    let threads = rayon::current_num_threads();
    let par = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: `out` has room for r·c elements and aliases no operand; the
    // operands are the caller's. gemm without accumulation
    // writes every element of dst and reads none, so the length is set
    // only after all r·c elements were written.
    unsafe {
        gemm_into(
            [r, c, inner],
            Strided::new(out.as_mut_ptr(), c as isize, 1),
            lhs,
            rhs,
            false,
            par,
        );
        out.set_len(r * c);
    }
    out
}
