//! RMSNorm as one operation on flex: one parallel pass over the rows
//! forward and one backward, where flex runs half a dozen serial passes
//! each way (square, mean, add, sqrt, reciprocal, two products, and their
//! gradients).

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
    AutodiffTensor, f32_pair, flex_of, from_flex, from_primitive, into_flex, into_primitive,
    is_flex, primitive_is, values,
};

/// Rows per parallel task.
const ROWS: usize = 64;

/// `x / √(mean(x²) + eps) · g` over the last dimension of `x` (`[n, d]`),
/// `g` `[1, d]`, on flex (with or without autodiff); `None` elsewhere
/// (the inputs are handed back).
#[allow(clippy::type_complexity)]
pub fn rms_norm<X: Backend>(
    x: Tensor<X, 2>,
    g: Tensor<X, 2>,
    eps: f32,
) -> Result<Tensor<X, 2>, (Tensor<X, 2>, Tensor<X, 2>)> {
    let [n, d] = x.dims();
    if g.dims() != [1, d] || !f32_pair(&x, &g) {
        return Err((x, g));
    }
    if is_flex::<X>() {
        let (x, g) = (into_flex(x), into_flex(g));
        let (y, _) = forward(&values(&x), &values(&g), [n, d], eps);
        return Ok(from_flex(flex_of(y, &x)));
    }
    if !primitive_is::<X, AutodiffTensor>() {
        return Err((x, g));
    }
    let x: AutodiffTensor = into_primitive(x);
    let g: AutodiffTensor = into_primitive(g);
    let prep = NormBackward
        .prepare::<NoCheckpointing>([x.node.clone(), g.node.clone()])
        .compute_bound()
        .stateful();
    let (y, inv) = forward(&values(&x.primitive), &values(&g.primitive), [n, d], eps);
    let y = flex_of(y, &x.primitive);
    Ok(from_primitive(match prep {
        OpsKind::Tracked(prep) => {
            let state = Saved {
                x: x.primitive,
                g: g.primitive,
                inv: inv.into(),
            };
            prep.finish(state, y)
        }
        OpsKind::UnTracked(prep) => prep.finish(y),
    }))
}

/// What backward reads: the input, the gain and each row's `1/rms`.
#[derive(Debug, Clone)]
struct Saved {
    x: FlexTensor,
    g: FlexTensor,
    inv: Arc<[f32]>,
}

#[derive(Debug)]
struct NormBackward;

impl Backward<burn::backend::Flex, 2> for NormBackward {
    type State = Saved;

    fn backward(
        self,
        ops: Ops<Self::State, 2>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let s = ops.state;
        let dy: FlexTensor = grads.consume::<burn::backend::Flex>(&ops.node);
        let (dx, dg) = backward(&values(&s.x), &values(&s.g), &s.inv, &values(&dy));
        let [node_x, node_g] = ops.parents;
        if let Some(node) = node_x {
            grads.register::<burn::backend::Flex>(node.id, flex_of(dx, &s.x));
        }
        if let Some(node) = node_g {
            grads.register::<burn::backend::Flex>(node.id, flex_of(dg, &s.g));
        }
    }
}

/// The normed rows and each row's `1/rms`.
fn forward(x: &[f32], g: &[f32], [n, d]: [usize; 2], eps: f32) -> (Vec<f32>, Vec<f32>) {
    assert_eq!(x.len(), n * d, "x is [n, d]");
    assert_eq!(g.len(), d, "g is [1, d]");
    let mut y = vec![0f32; n * d];
    let mut inv = vec![0f32; n];
    let d1 = d.max(1);
    y.par_chunks_mut(ROWS * d1)
        .zip(inv.par_chunks_mut(ROWS))
        .zip(x.par_chunks(ROWS * d1))
        .for_each(|((y, inv), x)| {
            for ((y, inv), x) in y.chunks_exact_mut(d1).zip(inv).zip(x.chunks_exact(d1)) {
                let ms = x.iter().map(|x| x * x).sum::<f32>() / d as f32;
                *inv = 1.0 / (ms + eps).sqrt();
                for ((y, &x), &g) in y.iter_mut().zip(x).zip(g) {
                    *y = x * *inv * g;
                }
            }
        });
    (y, inv)
}

/// `dx` and `dg` from `dy`: with `u = dy ⊙ g`,
/// `dx = inv·u − x·inv³·(u·x)/d` and `dg = Σ_rows dy ⊙ x·inv`. The
/// gain's sum is taken per task and then over tasks in order, so it does
/// not depend on the threads.
fn backward(x: &[f32], g: &[f32], inv: &[f32], dy: &[f32]) -> (Vec<f32>, Vec<f32>) {
    let d = g.len();
    assert_eq!(x.len(), inv.len() * d, "x is [n, d]");
    assert_eq!(dy.len(), x.len(), "dy has x's shape");
    let mut dx = vec![0f32; x.len()];
    let d1 = d.max(1);
    let partials: Vec<Vec<f32>> = dx
        .par_chunks_mut(ROWS * d1)
        .zip(inv.par_chunks(ROWS))
        .zip(x.par_chunks(ROWS * d1))
        .zip(dy.par_chunks(ROWS * d1))
        .map(|(((dx, inv), x), dy)| {
            let mut dg = vec![0f32; d];
            let rows = dx.chunks_exact_mut(d1).zip(inv).zip(x.chunks_exact(d1));
            for (((dx, &inv), x), dy) in rows.zip(dy.chunks_exact(d1)) {
                let ux: f32 = dy.iter().zip(g).zip(x).map(|((dy, g), x)| dy * g * x).sum();
                let k = inv * inv * inv * ux / d as f32;
                for (((dx, &dy), &g), &x) in dx.iter_mut().zip(dy).zip(g).zip(x) {
                    *dx = inv * (dy * g) - x * k;
                }
                for ((dg, &dy), &x) in dg.iter_mut().zip(dy).zip(x) {
                    *dg += dy * (x * inv);
                }
            }
            dg
        })
        .collect();
    let mut dg = vec![0f32; d];
    for p in partials {
        for (a, b) in dg.iter_mut().zip(p) {
            *a += b;
        }
    }
    (dx, dg)
}
