//! Tensor parallelism's building blocks (Shoeybi et al. 2019), as a
//! stage's model uses them.
//!
//! The linear layers need no code of their own: the parameter table gives
//! each rank its part — Q, K, V, gate and up column-parallel (its heads
//! and columns), the attention output and down projections row-parallel
//! (its rows) — and a plain product of a rank's part is its share. What
//! ties the shares together is here: the *g* operator
//! ([`Tp::sum_tensor`] on a row-parallel output: the partial sums
//! all-reduced; identity backward) and the *f* operator (the same sum on
//! the gradient of a column-parallel input, replicated forward, placed
//! after the norm as in Megatron so norm gains get identical gradients on
//! every rank); the vocabulary-parallel embedding ([`vocab_rows`]: a rank
//! looks up the tokens it owns, zeros elsewhere, then g); and the
//! vocabulary-parallel cross-entropy ([`parallel_cross_entropy`]), which
//! never gathers the logits. The model cuts its autodiff graph at each of
//! these sums ([`crate::segment`]).

use std::time::{Duration, Instant};

use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{DType, Int, Tensor};

use crate::collective::{Collective, CollectiveError};
use crate::model::llama::PerToken;
use crate::tensors::{from_vec, ids, in_dtype, to_vec};

/// A rank's tensor-parallel group, and the time spent in its collectives.
pub struct Tp<'a> {
    pub group: &'a mut dyn Collective,
    pub comm: Duration,
}

impl<'a> Tp<'a> {
    pub fn new(group: &'a mut dyn Collective) -> Tp<'a> {
        Tp {
            group,
            comm: Duration::ZERO,
        }
    }

    pub fn size(&self) -> usize {
        self.group.size()
    }

    pub fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError> {
        let t = Instant::now();
        let r = self.group.all_reduce_sum(buf);
        self.comm += t.elapsed();
        r
    }

    pub fn all_reduce_max(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError> {
        let t = Instant::now();
        let r = self.group.all_reduce_max(buf);
        self.comm += t.elapsed();
        r
    }

    /// The group's sum of `t` (the identity for a group of one), in `t`'s
    /// dtype (summed in f32).
    pub fn sum_tensor<I: Backend>(
        &mut self,
        t: Tensor<I, 2>,
    ) -> Result<Tensor<I, 2>, CollectiveError> {
        if self.size() == 1 {
            return Ok(t);
        }
        let (shape, device, dtype) = (t.dims(), t.device(), t.dtype());
        let mut v = to_vec(t);
        self.all_reduce_sum(&mut v)?;
        Ok(in_dtype(from_vec(v, shape, &device), dtype))
    }
}

/// Token ids as rows of this rank's vocabulary part `start..start + len`:
/// the local row (0 for ids another rank owns) and a `[n, 1]` mask that is
/// 1 where this rank owns the id.
pub fn vocab_rows<X: Backend>(
    ids_: &[u32],
    start: usize,
    len: usize,
    device: &X::Device,
) -> (Tensor<X, 1, Int>, Tensor<X, 2>) {
    let (local, mask): (Vec<i64>, Vec<f32>) = ids_
        .iter()
        .map(|&x| match (x as usize).checked_sub(start) {
            Some(row) if row < len => (row as i64, 1.0),
            _ => (0, 0.0),
        })
        .unzip();
    let n = mask.len();
    (ids::<X>(local, device), from_vec(mask, [n, 1], device))
}

/// The vocabulary-parallel cross-entropy of this rank's logit columns
/// `z_local` (`[n, vocab_len]`, vocabulary rows `vocab_start..`): the
/// summed loss of the `n` tokens divided by `denominator` (the same on
/// every rank), and a scalar whose gradient with respect to `z_local` is
/// this rank's columns of the gradient of that loss, `(softmax(z) −
/// onehot(target)) / denominator`, each token's row multiplied by its
/// weight under reweighting (`per.weigh`, given every token's loss, the
/// same on every rank of the group). The full logits are never gathered:
/// the row maxima are all-reduced with max, the sums of exponentials and
/// the target logits (from the rank that owns each target; zero
/// elsewhere) with sum.
pub fn parallel_cross_entropy<B: AutodiffBackend>(
    z_local: Tensor<B, 2>,
    targets: &[u32],
    vocab_start: usize,
    denominator: f64,
    tp: &mut Tp<'_>,
    per: PerToken<'_>,
) -> Result<(f64, Tensor<B, 1>), CollectiveError> {
    let z_local = in_dtype(z_local, DType::F32);
    let [n, vl] = z_local.dims();
    let device = z_local.device();
    let mut max = to_vec(z_local.clone().inner().max_dim(1));
    tp.all_reduce_max(&mut max)?;
    let max_t = from_vec::<B, 2>(max.clone(), [n, 1], &device);
    let e = (z_local.clone() - max_t).exp();
    // Local sums of exponentials and target logits, reduced in one call.
    let (local, mask) = vocab_rows::<B>(targets, vocab_start, vl, &device);
    let picked = z_local.gather(1, local.reshape([n, 1])) * mask;
    let mut stats = to_vec(e.clone().inner().sum_dim(1));
    stats.extend(to_vec(picked.clone().inner()));
    tp.all_reduce_sum(&mut stats)?;
    let (sums, target) = stats.split_at(n);
    let each: Vec<f64> = (0..n)
        .map(|i| f64::from(sums[i]).ln() + f64::from(max[i]) - f64::from(target[i]))
        .collect();
    let loss = each.iter().sum::<f64>() / denominator;
    let PerToken { losses, weigh } = per;
    let weights = weigh.map(|weigh| weigh(&each));
    if let Some(t) = losses {
        t.extend(&each);
    }
    let sums_t = from_vec::<B, 2>(sums.to_vec(), [n, 1], &device);
    let surrogate = match weights {
        None => ((e / sums_t).sum() - picked.sum()) / denominator,
        Some(m) => {
            assert_eq!(m.len(), n, "one multiplier per token");
            let m = from_vec::<B, 2>(m, [n, 1], &device);
            ((e / sums_t * m.clone()).sum() - (picked * m).sum()) / denominator
        }
    };
    Ok((loss, surrogate))
}
