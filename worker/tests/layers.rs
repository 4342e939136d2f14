//! Megatron's tensor-parallel pieces against their unsharded selves on the
//! same weights: a transformer block (attention and MLP, with and without
//! grouped KV heads, KV heads shared when tp exceeds them) for tp = 2 and
//! 4, forward output and every gradient;
//! the vocabulary-parallel cross-entropy against the plain one; and the
//! fused head (chunked logits and loss) against autodiff; the CPU
//! kernels (SwiGLU, RMSNorm, attention, projections) against burn's
//! tensor operations.

use burn::backend::{Autodiff, Flex, NdArray};
use burn::tensor::{Int, Tensor, TensorData};
use strata_recipe::{Coords, Layout, ModelConfig, Recompute};
use strata_worker::collective::conformance::on_group;
use strata_worker::collective::{Collective, local_group};
use strata_worker::model::{
    HeadLayout, Micro, PerToken, Rope, StageForward, StageInput, StageModel, causal_attention,
    cross_entropy, fused_head_cross_entropy, rms_norm,
};
use strata_worker::params::ParamTable;
use strata_worker::segment::GradAccum;
use strata_worker::tensors::{from_vec, to_vec};
use strata_worker::tp::{Tp, parallel_cross_entropy};

type B = Autodiff<NdArray<f32>>;
type I = NdArray<f32>;

/// Deterministic values in about [−1, 1).
fn noise(seed: u64, n: usize) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            ((x >> 40) as f32 / (1u64 << 23) as f32) - 1.0
        })
        .collect()
}

/// `‖a − b‖∞ / ‖b‖∞`.
fn rel(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f32, |m, x| m.max(x.abs()));
    let diff = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    diff / scale
}

fn cfg(heads: u64, kv: u64) -> ModelConfig {
    ModelConfig {
        n_layers: 3,
        d_model: 32,
        n_heads: heads,
        n_kv_heads: kv,
        d_ffn: 64,
        vocab_size: 256,
        padded_vocab_size: 256,
        max_seq_len: 16,
        rope_theta: 10000.0,
        tie_embeddings: false,
    }
}

/// The middle stage of a 3-stage pipeline holds exactly one block: its
/// forward output, input gradient and (gathered) parameter gradients on
/// `tp` tensor-parallel ranks.
/// Full tensors by name.
type Named = Vec<(String, Vec<f32>)>;

fn block(cfg: &ModelConfig, tp: u32) -> (Vec<f32>, Vec<f32>, Named) {
    block_with(cfg, tp, Recompute::None)
}

/// [`block`] with activations recomputed as `recompute` says.
fn block_with(cfg: &ModelConfig, tp: u32, recompute: Recompute) -> (Vec<f32>, Vec<f32>, Named) {
    let (rows, seq, d) = (2, 8, cfg.d_model as usize);
    let whole = ParamTable::whole(cfg);
    // Random weights, gains included, so every gradient is exercised.
    let full: Vec<f32> = noise(1, whole.total).iter().map(|x| x * 0.3).collect();
    let h = noise(2, rows * seq * d);
    let dh = noise(3, rows * seq * d);
    let layout = Layout::new(tp, 3, 1);
    let results = on_group(local_group(tp as usize), |g| {
        let c = Coords {
            dp: 0,
            pp: 1,
            tp: g.rank() as u32,
        };
        let table = ParamTable::new(cfg, layout, c);
        let values: Vec<f32> = table
            .slots
            .iter()
            .flat_map(|s| ParamTable::shard_of(s, &full[whole.get(&s.spec.name).unwrap().range()]))
            .collect();
        let mut model = StageModel::<B>::new(cfg, table.clone(), &values, &Default::default());
        model.set_recompute(recompute);
        let mut tp = Tp::new(g);
        let input =
            StageInput::Activation(from_vec(h.clone(), [rows * seq, d], &Default::default()));
        let tape = model
            .forward(
                0,
                input,
                &Micro {
                    rows,
                    seq,
                    targets: None,
                    denominator: 1.0,
                    per_row: false,
                    reweigh: None,
                },
                &mut tp,
            )
            .unwrap();
        let out = to_vec(tape.output.clone().unwrap());
        let mut acc = GradAccum::<I>::new(table.slots.len());
        let upstream = from_vec(dh.clone(), [rows * seq, d], &Default::default());
        let dx = model
            .backward(tape, Some(upstream), &mut acc, &mut tp)
            .unwrap();
        let grads: Vec<(usize, Vec<f32>)> = acc
            .grads
            .into_iter()
            .enumerate()
            .map(|(i, g)| (i, to_vec(g.expect("every block parameter has a gradient"))))
            .collect();
        (table, out, to_vec(dx.unwrap()), grads)
    });
    for (_, out, dx, _) in &results {
        assert_eq!(out, &results[0].1, "tp ranks disagree on the output");
        assert_eq!(dx, &results[0].2, "tp ranks disagree on the input gradient");
    }
    let mut grads: Vec<(String, Vec<f32>)> = Vec::new();
    for (table, _, _, g) in &results {
        for (i, values) in g {
            let slot = &table.slots[*i];
            let name = slot.spec.name.clone();
            let len = slot.spec.full_shape.iter().product();
            if !grads.iter().any(|(n, _)| *n == name) {
                grads.push((name.clone(), vec![f32::NAN; len]));
            }
            let full = &mut grads.iter_mut().find(|(n, _)| *n == name).unwrap().1;
            let mut mine = vec![f32::NAN; len];
            ParamTable::place_shard(slot, values, &mut mine);
            for (f, m) in full.iter_mut().zip(mine) {
                if m.is_nan() {
                    continue;
                } else if f.is_nan() {
                    *f = m;
                } else if slot.partial_grad {
                    // A KV head shared by several ranks: each has the part
                    // from its own query heads (the trainer sums them).
                    *f += m;
                } else {
                    // A replicated gain's gradient is identical on every rank.
                    assert_eq!(f.to_bits(), m.to_bits(), "{name} differs between tp ranks");
                }
            }
        }
    }
    let (_, out, dx, _) = results.into_iter().next().unwrap();
    (out, dx, grads)
}

/// On burn's tensor-op path (NdArray: the `[t, t]` probabilities, burn's
/// own products and their backward), full recomputation gives the
/// block's output, input gradient and every parameter gradient to the
/// bit, with and without tensor parallelism. Selective recomputation
/// gives the output to the bit and the gradients to rounding: it cuts the
/// graph after each norm and after the projections, and burn sums the
/// gradients arriving at a tensor read several times (the norm's input,
/// op by op here; the norm's output, read by Q, K and V) in an order that
/// depends on the graph around them. On the CPU backend the same cuts are
/// bit-identical (`train.rs`), which is what training runs on.
#[test]
fn recomputation_on_the_tensor_op_path_matches() {
    let c = cfg(4, 2);
    for tp in [1, 2] {
        let kept = block_with(&c, tp, Recompute::None);
        for mode in [Recompute::Selective, Recompute::Full] {
            let (out, dx, grads) = block_with(&c, tp, mode);
            let what = format!("tp={tp}, {}", mode.as_str());
            assert_eq!(out, kept.0, "{what}: output");
            let exact = mode == Recompute::Full;
            let same = |a: &[f32], b: &[f32]| {
                if exact {
                    a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
                } else {
                    rel(a, b) < 1e-5
                }
            };
            assert!(same(&dx, &kept.1), "{what}: input gradient");
            for ((name, g), (_, k)) in grads.iter().zip(&kept.2) {
                assert!(same(g, k), "{what}: {name}");
            }
        }
    }
}

fn check_block(heads: u64, kv: u64, tp: u32) {
    let c = cfg(heads, kv);
    let (out1, dx1, g1) = block(&c, 1);
    let (out, dx, g) = block(&c, tp);
    let what = format!("tp={tp}, {heads} heads, {kv} KV heads");
    assert!(
        rel(&out, &out1) < 1e-5,
        "{what}: output {:e}",
        rel(&out, &out1)
    );
    assert!(
        rel(&dx, &dx1) < 1e-5,
        "{what}: input gradient {:e}",
        rel(&dx, &dx1)
    );
    assert_eq!(g.len(), 9, "{what}: a block has nine parameters");
    for ((name, a), (name1, b)) in g.iter().zip(&g1) {
        assert_eq!(name, name1);
        assert!(
            a.iter().all(|x| !x.is_nan()),
            "{what}: {name} not covered by the shards"
        );
        assert!(
            rel(a, b) < 1e-5,
            "{what}: gradient of {name} {:e}",
            rel(a, b)
        );
    }
}

#[test]
fn tensor_parallel_block_matches_the_unsharded_block() {
    check_block(8, 8, 2);
    check_block(8, 2, 2);
    check_block(8, 8, 4);
    check_block(8, 4, 4);
    // More ranks than KV heads: each KV head shared by 2 (or 4) ranks.
    check_block(8, 2, 4);
    check_block(8, 1, 2);
    check_block(8, 1, 4);
}

#[test]
fn vocabulary_parallel_cross_entropy_matches_the_plain_one() {
    let (n, v) = (12, 64);
    let logits: Vec<f32> = noise(4, n * v).iter().map(|x| x * 6.0).collect();
    let targets: Vec<u32> = noise(5, n)
        .iter()
        .map(|x| ((x + 1.0) * 32.0) as u32 % v as u32)
        .collect();
    let denom = 40.0;
    let device = Default::default();
    let multipliers: Vec<f32> = noise(6, n).iter().map(|x| 1.0 + 0.9 * x).collect();
    let want_tokens = token_losses(&logits, &targets, v);
    for weighted in [false, true] {
        let full = Tensor::<B, 2>::from_data(TensorData::new(logits.clone(), [n, v]), &device)
            .require_grad();
        let m = weighted.then_some(multipliers.as_slice());
        let (plain_loss, reference) = weighted_cross_entropy(full.clone(), &targets, m, denom);
        let plain_grad = to_vec(full.grad(&reference.backward()).unwrap());
        for tp in [1usize, 2, 4] {
            let part = v / tp;
            let results = on_group(local_group(tp), |g| {
                let r = g.rank();
                let z = Tensor::<I, 2>::from_data(TensorData::new(logits.clone(), [n, v]), &device)
                    .narrow(1, r * part, part);
                let z = Tensor::<B, 2>::from_inner(z).require_grad();
                let mut tp = Tp::new(g);
                let (mut tokens, mut seen) = (Vec::new(), Vec::new());
                let mut weigh = |losses: &[f64]| {
                    seen = losses.to_vec();
                    multipliers.clone()
                };
                let (loss, surrogate) = parallel_cross_entropy(
                    z.clone(),
                    &targets,
                    r * part,
                    denom,
                    &mut tp,
                    PerToken {
                        losses: Some(&mut tokens),
                        weigh: if weighted { Some(&mut weigh) } else { None },
                    },
                )
                .unwrap();
                let grad = to_vec(z.grad(&surrogate.backward()).unwrap());
                (loss, grad, tokens, seen)
            });
            for (r, (loss, grad, tokens, seen)) in results.iter().enumerate() {
                let lrel = (loss - plain_loss).abs() / plain_loss;
                assert!(lrel < 1e-6, "tp={tp}: loss {loss} vs {plain_loss}");
                assert_close_each(tokens, &want_tokens, &format!("tp={tp} rank {r}"));
                if weighted {
                    // Every rank of the group weighs the same losses.
                    assert_close_each(seen, &want_tokens, &format!("tp={tp} rank {r} weigher"));
                }
                let mine: Vec<f32> = (0..n)
                    .flat_map(|i| plain_grad[i * v + r * part..i * v + (r + 1) * part].to_vec())
                    .collect();
                assert!(
                    rel(grad, &mine) < 1e-5,
                    "tp={tp} rank {r} weighted {weighted}: gradient {:e}",
                    rel(grad, &mine)
                );
            }
        }
    }
}

/// Under 1F1B a stage holds several microbatches' graphs at once, all
/// reading the same parameters. Forwards of two microbatches followed by
/// their backwards in reverse order give the gradients of running each
/// forward-backward alone, with and without tensor parallelism.
#[test]
fn several_microbatches_graphs_live_at_once() {
    let mut c = cfg(8, 4);
    c.tie_embeddings = true;
    let (rows, seq) = (2, 8);
    let whole = ParamTable::whole(&c);
    let full: Vec<f32> = noise(9, whole.total).iter().map(|x| x * 0.3).collect();
    let tokens: Vec<Vec<u32>> = (0..2)
        .map(|k| {
            noise(10 + k, rows * (seq + 1))
                .iter()
                .map(|x| ((x + 1.0) * 128.0) as u32 % 256)
                .collect()
        })
        .collect();
    for tp in [1u32, 2] {
        let layout = Layout::new(tp, 1, 1);
        let run = |interleaved: bool| {
            on_group(local_group(tp as usize), |g| {
                let coords = Coords {
                    dp: 0,
                    pp: 0,
                    tp: g.rank() as u32,
                };
                let table = ParamTable::new(&c, layout, coords);
                let values: Vec<f32> = table
                    .slots
                    .iter()
                    .flat_map(|s| {
                        ParamTable::shard_of(s, &full[whole.get(&s.spec.name).unwrap().range()])
                    })
                    .collect();
                let model = StageModel::<B>::new(&c, table.clone(), &values, &Default::default());
                let mut tp = Tp::new(g);
                let mut acc = GradAccum::<I>::new(table.slots.len());
                let io: Vec<(Vec<u32>, Vec<u32>)> = tokens
                    .iter()
                    .map(|t| {
                        let i = t.chunks(seq + 1).flat_map(|r| r[..seq].to_vec()).collect();
                        let o = t.chunks(seq + 1).flat_map(|r| r[1..].to_vec()).collect();
                        (i, o)
                    })
                    .collect();
                let fwd = |k: usize, tp: &mut Tp<'_>| {
                    model
                        .forward(
                            0,
                            StageInput::Tokens(&io[k].0),
                            &Micro {
                                rows,
                                seq,
                                targets: Some(&io[k].1),
                                denominator: 32.0,
                                per_row: false,
                                reweigh: None,
                            },
                            tp,
                        )
                        .unwrap()
                };
                let mut losses = [0.0; 2];
                if interleaved {
                    let a = fwd(0, &mut tp);
                    let b = fwd(1, &mut tp);
                    losses = [a.loss, b.loss];
                    model.backward(b, None, &mut acc, &mut tp).unwrap();
                    model.backward(a, None, &mut acc, &mut tp).unwrap();
                } else {
                    for (k, loss) in losses.iter_mut().enumerate() {
                        let t = fwd(k, &mut tp);
                        *loss = t.loss;
                        model.backward(t, None, &mut acc, &mut tp).unwrap();
                    }
                }
                let grads: Vec<Vec<f32>> =
                    acc.grads.into_iter().map(|g| to_vec(g.unwrap())).collect();
                (losses, grads)
            })
        };
        let (alone, live) = (run(false), run(true));
        for (r, (a, b)) in alone.iter().zip(&live).enumerate() {
            assert_eq!(a.0, b.0, "tp={tp} rank {r}: losses");
            // Equal up to the order the sums were taken in (a tied
            // embedding's two gradients per microbatch, added in another
            // order when the backwards are reversed).
            for (i, (x, y)) in a.1.iter().zip(&b.1).enumerate() {
                assert!(
                    rel(y, x) < 1e-6,
                    "tp={tp} rank {r}: gradient {i} differs by {:e}",
                    rel(y, x)
                );
            }
        }
    }
}

/// The fused head (logits, cross-entropy and their gradients in row
/// chunks, the logits never whole) against autodiff through the plain
/// matmul and cross-entropy: loss, the hidden states' gradient and the
/// head's, over several chunks and a partial last one, with the head as
/// vocabulary rows (tied) and as columns, in tensor operations (NdArray)
/// and in the CPU kernel (flex).
#[test]
fn fused_head_matches_autodiff_through_the_logits() {
    // Flex takes the kernel; NdArray the tensor operations.
    let probe = |v: Vec<f32>| from_vec::<Flex, 2>(v, [1, 1], &Default::default());
    assert!(strata_worker::cpu::as_flex(&probe(vec![1.0])).is_some());
    let other = from_vec::<I, 2>(vec![1.0], [1, 1], &Default::default());
    assert!(strata_worker::cpu::as_flex(&other).is_none());
    fused_head_case::<I>(70, 4, 300);
    // The kernel's chunks are 256 rows: 600 rows are 2 full and a partial
    // one.
    fused_head_case::<Flex>(600, 4, 300);
    fused_head_case::<Flex>(9, 33, 1000);
}

fn fused_head_case<X: burn::tensor::backend::Backend>(n: usize, d: usize, v: usize) {
    let device = Default::default();
    let y_vals = noise(11, n * d);
    let w_vals: Vec<f32> = noise(12, v * d).iter().map(|x| x * 3.0).collect();
    let targets: Vec<u32> = noise(13, n)
        .iter()
        .map(|x| ((x + 1.0) * 150.0) as u32 % v as u32)
        .collect();
    let denom = 123.0;
    let logits: Vec<f32> = (0..n)
        .flat_map(|i| {
            let (y_vals, w_vals) = (&y_vals, &w_vals);
            (0..v).map(move |t| (0..d).map(|j| y_vals[i * d + j] * w_vals[t * d + j]).sum())
        })
        .collect();
    let want_tokens = token_losses(&logits, &targets, v);
    // Unweighted, then each token's gradient weighed (as loss-based
    // reweighting does) by a multiplier the weigher picks from the losses.
    let multipliers: Vec<f32> = noise(14, n).iter().map(|x| 1.0 + 0.9 * x).collect();
    for weighted in [false, true] {
        let y = from_vec::<B, 2>(y_vals.clone(), [n, d], &device).require_grad();
        let w = from_vec::<B, 2>(w_vals.clone(), [v, d], &device).require_grad();
        let m = weighted.then_some(multipliers.as_slice());
        let (plain_loss, reference) =
            weighted_cross_entropy(y.clone().matmul(w.clone().transpose()), &targets, m, denom);
        let grads = reference.backward();
        let (dy_want, dw_want) = (
            to_vec(y.grad(&grads).unwrap()),
            to_vec(w.grad(&grads).unwrap()),
        );

        let xd = Default::default();
        for layout in [HeadLayout::Rows, HeadLayout::Columns] {
            let w = from_vec::<X, 2>(w_vals.clone(), [v, d], &xd);
            let w = match layout {
                HeadLayout::Rows => w,
                HeadLayout::Columns => w.transpose(),
            };
            let mut tokens = Vec::new();
            let mut seen = Vec::new();
            let mut weigh = |losses: &[f64]| {
                seen = losses.to_vec();
                multipliers.clone()
            };
            let (loss, dy, dw) = fused_head_cross_entropy::<X>(
                from_vec(y_vals.clone(), [n, d], &xd),
                w,
                layout,
                &targets,
                denom,
                &xd,
                PerToken {
                    losses: Some(&mut tokens),
                    weigh: if weighted { Some(&mut weigh) } else { None },
                },
            );
            // The reported loss stays the unweighted mean.
            let lrel = (loss - plain_loss).abs() / plain_loss;
            assert!(lrel < 1e-6, "{layout:?}: loss {loss} vs {plain_loss}");
            // Each row's loss, as a mixture's per-source losses sum them,
            // and as the weigher is given them.
            assert_close_each(&tokens, &want_tokens, &format!("{layout:?}"));
            if weighted {
                assert_close_each(&seen, &want_tokens, &format!("{layout:?} weigher"));
            }
            assert_eq!(dy.dims(), [n, d]);
            let dw = match layout {
                HeadLayout::Rows => dw,
                HeadLayout::Columns => {
                    assert_eq!(dw.dims(), [d, v]);
                    dw.transpose()
                }
            };
            let (ry, rw) = (rel(&to_vec(dy), &dy_want), rel(&to_vec(dw), &dw_want));
            assert!(
                ry < 1e-5 && rw < 1e-5,
                "{layout:?} weighted {weighted}: dy differs by {ry:e}, dW by {rw:e}"
            );
        }
    }
}

/// The plain cross-entropy of `logits` through autodiff, each token's
/// loss multiplied by `m[i]` when given: the unweighted loss, and the
/// (weighted) loss to differentiate.
fn weighted_cross_entropy(
    logits: Tensor<B, 2>,
    targets: &[u32],
    m: Option<&[f32]>,
    denom: f64,
) -> (f64, Tensor<B, 1>) {
    let [n, _] = logits.dims();
    let device = logits.device();
    let t = Tensor::<B, 1, Int>::from_data(
        TensorData::new(
            targets.iter().map(|&x| i64::from(x)).collect::<Vec<_>>(),
            [n],
        ),
        &device,
    );
    let plain = cross_entropy(logits.clone(), t.clone(), denom);
    let plain_loss = f64::from(to_vec(plain.clone().inner())[0]);
    let Some(m) = m else {
        return (plain_loss, plain);
    };
    let max = logits.clone().detach().max_dim(1);
    let lse = (logits.clone() - max.clone()).exp().sum_dim(1).log() + max;
    let each = lse - logits.gather(1, t.reshape([n, 1]));
    let m = from_vec::<B, 2>(m.to_vec(), [n, 1], &device);
    (plain_loss, (each * m).sum() / denom)
}

/// The CPU backend's SwiGLU operation (one parallel pass each way, its
/// own backward) against `silu(a) ⊙ b` through autodiff on NdArray:
/// values and both gradients, over several parallel chunks and inputs far
/// into both tails of the sigmoid.
#[test]
fn swiglu_kernel_matches_silu_times_up_with_gradients() {
    type F = Autodiff<Flex>;
    let (n, f) = (50, 1000);
    let a_vals: Vec<f32> = noise(21, n * f).iter().map(|x| x * 12.0).collect();
    let b_vals = noise(22, n * f);
    let up = noise(23, n * f);
    let device = Default::default();
    let run = |kernel: bool| {
        if kernel {
            swiglu_with_grads::<F>([&a_vals, &b_vals, &up], [n, f])
        } else {
            swiglu_with_grads::<B>([&a_vals, &b_vals, &up], [n, f])
        }
    };
    let (out, (da, db)) = run(true);
    let (out_want, (da_want, db_want)) = run(false);
    let (ro, ra, rb) = (rel(&out, &out_want), rel(&da, &da_want), rel(&db, &db_want));
    assert!(
        ro < 1e-6 && ra < 1e-5 && rb < 1e-6,
        "out {ro:e}, da {ra:e}, db {rb:e}"
    );
    // The inference path (flex without autodiff) is the same kernel.
    let plain = strata_worker::cpu::swiglu(
        from_vec::<Flex, 2>(a_vals.clone(), [n, f], &device),
        from_vec::<Flex, 2>(b_vals.clone(), [n, f], &device),
    );
    assert_eq!(to_vec(plain), out);
}

/// An output and the gradients of its two inputs.
type Grads2 = (Vec<f32>, (Vec<f32>, Vec<f32>));

/// `swiglu(a, b)` and the gradients of `sum(swiglu(a, b) ⊙ up)` with
/// respect to `a` and `b`, on `Z`.
fn swiglu_with_grads<Z: burn::tensor::backend::AutodiffBackend>(
    [a, b, up]: [&[f32]; 3],
    shape: [usize; 2],
) -> Grads2 {
    let device = Default::default();
    let a = from_vec::<Z, 2>(a.to_vec(), shape, &device).require_grad();
    let b = from_vec::<Z, 2>(b.to_vec(), shape, &device).require_grad();
    let out = strata_worker::cpu::swiglu(a.clone(), b.clone());
    let g = (out.clone() * from_vec::<Z, 2>(up.to_vec(), shape, &device))
        .sum()
        .backward();
    let grads = (to_vec(a.grad(&g).unwrap()), to_vec(b.grad(&g).unwrap()));
    (to_vec(out.inner()), grads)
}

#[test]
fn attention_kernel_matches_tensor_ops_with_gradients() {
    // [b, t, h, kv, hd]: grouped KV heads over two query blocks (128 rows
    // each, the second partial); every head its own KV head in one block.
    for [b, t, h, kv, hd] in [[2, 150, 4, 2, 8], [1, 7, 3, 3, 4], [3, 129, 2, 1, 16]] {
        let q = noise(31, b * t * h * hd)
            .iter()
            .map(|x| x * 3.0)
            .collect::<Vec<_>>();
        let k = noise(32, b * t * kv * hd)
            .iter()
            .map(|x| x * 3.0)
            .collect::<Vec<_>>();
        let v = noise(33, b * t * kv * hd);
        let up = noise(34, b * t * h * hd);
        let inputs = [&q[..], &k[..], &v[..], &up[..]];
        let (out, grads) = attention_with_grads::<Autodiff<Flex>>(inputs, [b, t, h, kv, hd]);
        let (out_want, grads_want) = attention_with_grads::<B>(inputs, [b, t, h, kv, hd]);
        let case = format!("b {b} t {t} h {h} kv {kv} hd {hd}");
        assert!(
            rel(&out, &out_want) < 2e-6,
            "{case}: out {:e}",
            rel(&out, &out_want)
        );
        for (name, (g, want)) in ["dq", "dk", "dv"].iter().zip(grads.iter().zip(&grads_want)) {
            let r = rel(g, want);
            assert!(r < 1e-5, "{case}: {name} {r:e}");
        }
        // The inference path (flex without autodiff) is the same kernel.
        let device = Default::default();
        let rope = Rope::<Flex>::new(t, hd, 10000.0, &device);
        let plain = causal_attention(
            from_vec::<Flex, 4>(q.clone(), [b, t, h, hd], &device),
            from_vec::<Flex, 4>(k.clone(), [b, t, kv, hd], &device),
            from_vec::<Flex, 4>(v.clone(), [b, t, kv, hd], &device),
            &rope,
        );
        assert_eq!(to_vec(plain), out, "{case}: inference path");
    }
}

/// Causal attention's output and the gradients of `sum(out ⊙ up)` with
/// respect to `q`, `k` and `v`, on `Z`.
fn attention_with_grads<Z: burn::tensor::backend::AutodiffBackend>(
    [q, k, v, up]: [&[f32]; 4],
    [b, t, h, kv, hd]: [usize; 5],
) -> (Vec<f32>, [Vec<f32>; 3]) {
    let device = Default::default();
    let rope = Rope::<Z>::new(t, hd, 10000.0, &device);
    let q = from_vec::<Z, 4>(q.to_vec(), [b, t, h, hd], &device).require_grad();
    let k = from_vec::<Z, 4>(k.to_vec(), [b, t, kv, hd], &device).require_grad();
    let v = from_vec::<Z, 4>(v.to_vec(), [b, t, kv, hd], &device).require_grad();
    let out = causal_attention(q.clone(), k.clone(), v.clone(), &rope);
    assert_eq!(out.dims(), [b, t, h, hd]);
    let g = (out.clone() * from_vec::<Z, 4>(up.to_vec(), [b, t, h, hd], &device))
        .sum()
        .backward();
    let grads = [&q, &k, &v].map(|x| to_vec(x.grad(&g).unwrap()));
    (to_vec(out.inner()), grads)
}

#[test]
fn rms_norm_kernel_matches_tensor_ops_with_gradients() {
    // 200 rows are three full tasks of 64 and a partial one.
    for [n, d] in [[200, 48], [3, 5]] {
        let x: Vec<f32> = noise(41, n * d).iter().map(|x| x * 4.0 + 0.5).collect();
        let g: Vec<f32> = noise(42, d).iter().map(|x| x + 1.0).collect();
        let up = noise(43, n * d);
        let (y, [dx, dg]) = rms_norm_with_grads::<Autodiff<Flex>>([&x, &g, &up], [n, d]);
        let (y_want, [dx_want, dg_want]) = rms_norm_with_grads::<B>([&x, &g, &up], [n, d]);
        let (ry, rx, rg) = (rel(&y, &y_want), rel(&dx, &dx_want), rel(&dg, &dg_want));
        assert!(
            ry < 1e-6 && rx < 1e-5 && rg < 1e-5,
            "[{n}, {d}]: y {ry:e}, dx {rx:e}, dg {rg:e}"
        );
        let device = Default::default();
        let plain = rms_norm(
            from_vec::<Flex, 2>(x.clone(), [n, d], &device),
            from_vec::<Flex, 2>(g.clone(), [1, d], &device),
        );
        assert_eq!(to_vec(plain), y, "[{n}, {d}]: inference path");
    }
}

/// RMSNorm's output and the gradients of `sum(y ⊙ up)` with respect to
/// `x` and `g`, on `Z`.
fn rms_norm_with_grads<Z: burn::tensor::backend::AutodiffBackend>(
    [x, g, up]: [&[f32]; 3],
    [n, d]: [usize; 2],
) -> (Vec<f32>, [Vec<f32>; 2]) {
    let device = Default::default();
    let x = from_vec::<Z, 2>(x.to_vec(), [n, d], &device).require_grad();
    let g = from_vec::<Z, 2>(g.to_vec(), [1, d], &device).require_grad();
    let y = rms_norm(x.clone(), g.clone());
    let grads = (y.clone() * from_vec::<Z, 2>(up.to_vec(), [n, d], &device))
        .sum()
        .backward();
    let grads = [&x, &g].map(|t| to_vec(t.grad(&grads).unwrap()));
    (to_vec(y.inner()), grads)
}

#[test]
fn matmul_kernel_matches_burns_product_with_gradients() {
    for [n, k, m] in [[70, 48, 33], [1, 5, 1], [300, 7, 129]] {
        let a = noise(51, n * k);
        let b = noise(52, k * m);
        let up = noise(53, n * m);
        let got = matmul_with_grads::<Autodiff<Flex>>([&a, &b, &up], [n, k, m], true);
        let want = matmul_with_grads::<B>([&a, &b, &up], [n, k, m], false);
        for (name, (g, w)) in ["c", "da", "db"].iter().zip(got.iter().zip(&want)) {
            let r = rel(g, w);
            assert!(r < 1e-6, "[{n}, {k}] · [{k}, {m}]: {name} {r:e}");
        }
        let device = Default::default();
        let plain = strata_worker::cpu::matmul(
            from_vec::<Flex, 2>(a.clone(), [n, k], &device),
            from_vec::<Flex, 2>(b.clone(), [k, m], &device),
        );
        assert_eq!(
            to_vec(plain.unwrap_or_else(|_| panic!("flex takes the kernel"))),
            got[0]
        );
    }
    // Other backends are handed their inputs back.
    let device = Default::default();
    let other = strata_worker::cpu::matmul(
        from_vec::<I, 2>(vec![1.0; 6], [2, 3], &device),
        from_vec::<I, 2>(vec![1.0; 3], [3, 1], &device),
    );
    assert!(other.is_err());
}

/// `a · b` and the gradients of `sum((a · b) ⊙ up)` with respect to `a`
/// and `b`, on `Z`, through the kernel or through burn's product.
fn matmul_with_grads<Z: burn::tensor::backend::AutodiffBackend>(
    [a, b, up]: [&[f32]; 3],
    [n, k, m]: [usize; 3],
    kernel: bool,
) -> [Vec<f32>; 3] {
    let device = Default::default();
    let a = from_vec::<Z, 2>(a.to_vec(), [n, k], &device).require_grad();
    let b = from_vec::<Z, 2>(b.to_vec(), [k, m], &device).require_grad();
    let c = if kernel {
        strata_worker::cpu::matmul(a.clone(), b.clone())
            .unwrap_or_else(|_| panic!("autodiff flex takes the kernel"))
    } else {
        a.clone().matmul(b.clone())
    };
    let grads = (c.clone() * from_vec::<Z, 2>(up.to_vec(), [n, m], &device))
        .sum()
        .backward();
    let [da, db] = [&a, &b].map(|t| to_vec(t.grad(&grads).unwrap()));
    [to_vec(c.inner()), da, db]
}

/// The device path's blocked attention (`attention::causal`, as burn's
/// op-by-op backends run it) against the whole-scores formulation written
/// out here in tensor operations: output and every input's gradient, for
/// blocks of one row, of a few rows (the last partial), and of the whole
/// sequence; and the untracked forward equal to the tracked one.
#[test]
fn blocked_attention_matches_whole_scores_with_gradients() {
    use burn::tensor::activation::softmax;
    let [b, h, t, hd] = [2, 3, 23, 8];
    let dims = [b, h, t, hd];
    let q = noise(41, b * h * t * hd);
    let k = noise(42, b * h * t * hd);
    let v = noise(43, b * h * t * hd);
    let up = noise(44, b * h * t * hd);
    let device = Default::default();
    let leaf = |x: &[f32]| from_vec::<B, 4>(x.to_vec(), dims, &device).require_grad();
    let run = |blocked: Option<usize>| {
        let (ql, kl, vl) = (leaf(&q), leaf(&k), leaf(&v));
        let out = match blocked {
            Some(rows) => {
                strata_worker::attention::causal(ql.clone(), kl.clone(), vl.clone(), rows)
                    .unwrap_or_else(|_| panic!("NdArray's autodiff is a known backend"))
            }
            None => {
                let mask = Tensor::<B, 2, burn::tensor::Bool>::tril_mask([t, t], 0, &device);
                let bias = Tensor::<B, 2>::zeros([t, t], &device)
                    .mask_fill(mask, -1e9)
                    .reshape([1, 1, t, t]);
                let scores = ql.clone().matmul(kl.clone().swap_dims(2, 3)) + bias;
                softmax(scores, 3).matmul(vl.clone())
            }
        };
        let g = (out.clone() * from_vec::<B, 4>(up.clone(), dims, &device))
            .sum()
            .backward();
        let grads = [&ql, &kl, &vl].map(|x| to_vec(x.grad(&g).unwrap()));
        (to_vec(out.inner()), grads)
    };
    let (want, want_grads) = run(None);
    for rows in [1, 5, 16, t] {
        let (out, grads) = run(Some(rows));
        assert!(
            rel(&out, &want) < 1e-6,
            "{rows} rows: out {:e}",
            rel(&out, &want)
        );
        for (name, (g, w)) in ["dq", "dk", "dv"].iter().zip(grads.iter().zip(&want_grads)) {
            assert!(rel(g, w) < 1e-5, "{rows} rows: {name} {:e}", rel(g, w));
        }
        let untracked = strata_worker::attention::causal(
            from_vec::<I, 4>(q.clone(), dims, &device),
            from_vec::<I, 4>(k.clone(), dims, &device),
            from_vec::<I, 4>(v.clone(), dims, &device),
            rows,
        )
        .unwrap_or_else(|_| panic!("untracked backends always take it"));
        assert_eq!(to_vec(untracked), out, "{rows} rows: untracked");
    }
}

/// Each row's cross-entropy of `logits` (`[n, v]`) in f64.
fn token_losses(logits: &[f32], targets: &[u32], v: usize) -> Vec<f64> {
    logits
        .chunks(v)
        .zip(targets)
        .map(|(z, &t)| {
            let max = z.iter().fold(f64::MIN, |m, &x| m.max(f64::from(x)));
            let sum: f64 = z.iter().map(|&x| (f64::from(x) - max).exp()).sum();
            sum.ln() + max - f64::from(z[t as usize])
        })
        .collect()
}

fn assert_close_each(got: &[f64], want: &[f64], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: one loss per row");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= 1e-4 * w.abs().max(1.0),
            "{what}: row {i}: {g} vs {w}"
        );
    }
}
