//! The wgpu backend (feature `wgpu`), on whatever adapter wgpu finds (CI:
//! Mesa's lavapipe on the CPU): 20 steps give the CPU's losses, only token
//! ids and scalars cross the host per step, and the device pools stop
//! growing once every step shape has run; the blocked attention runs there
//! and never holds a sequence's whole scores. Without an adapter each test
//! says it was skipped, unless `STRATA_REQUIRE_WGPU` is set (then it
//! fails).
#![cfg(feature = "wgpu")]

mod common;

use burn::backend::{Autodiff, Flex};
use burn::tensor::{Distribution, Tensor, TensorData};
use common::device_run;
use strata_worker::wgpu;

/// The adapter, or `None` after saying the test was skipped.
fn adapter() -> Option<wgpu::AdapterInfo> {
    match wgpu::probe() {
        Ok(info) => Some(info),
        Err(e) => {
            assert!(
                std::env::var_os("STRATA_REQUIRE_WGPU").is_none(),
                "STRATA_REQUIRE_WGPU is set: {e}"
            );
            eprintln!("SKIPPED: {e}");
            None
        }
    }
}

#[test]
fn training_on_wgpu_follows_the_cpu_and_its_memory_stays_put() {
    let Some(info) = adapter() else { return };
    eprintln!("training on {info:?}");
    let (cpu, _, _) = device_run::<Autodiff<Flex>>(Default::default(), 20, || None);
    let device = wgpu::device();
    let (gpu, moved, reserved) =
        device_run::<Autodiff<wgpu::WgpuFused>>(device.clone(), 20, || {
            wgpu::memory_reserved(&device)
        });
    for (step, (c, g)) in cpu.iter().zip(&gpu).enumerate() {
        let rel = (c - g).abs() / c.abs();
        assert!(rel < 1e-4, "step {}: cpu {c} wgpu {g}", step + 1);
    }
    assert!(gpu[19] < gpu[0], "the wgpu run did not learn: {gpu:?}");
    assert!(
        moved <= 2 * 4 * 32 + 2,
        "a step moved {moved} host elements"
    );
    let reserved: Vec<u64> = reserved
        .into_iter()
        .map(|r| r.expect("memory statistics"))
        .collect();
    eprintln!("wgpu pools reserved after each step: {reserved:?}");
    assert!(
        reserved[4..].iter().all(|&r| r == reserved[4]),
        "the device pools grow after step 5: {reserved:?}"
    );
}

type Z = Autodiff<wgpu::WgpuFused>;

/// The device path's blocked attention on the adapter. It is taken there
/// (wgpu was once missing from its backends, and attention on wgpu then
/// held whole `[t, t]` scores, 4.3 GB per copy at 8,192 tokens and 16
/// heads), it equals the whole-scores formulation with every input's
/// gradient, and at 8,192 tokens the device pools never reserve as much as
/// one copy of the whole scores.
#[test]
fn blocked_attention_runs_on_wgpu_and_never_holds_whole_scores() {
    if adapter().is_none() {
        return;
    }
    let device = wgpu::device();
    let [b, h, t, hd] = [2, 3, 40, 8];
    let dims = [b, h, t, hd];
    let noise = |seed: u64| -> Vec<f32> {
        (0..b * h * t * hd)
            .map(|i| {
                let x = (i as u64 ^ seed.wrapping_mul(0x9E37_79B9)).wrapping_mul(2654435761) % 2001;
                x as f32 / 1000.0 - 1.0
            })
            .collect()
    };
    let [q, k, v, up] = [1, 2, 3, 4].map(noise);
    let leaf = |x: &[f32]| {
        Tensor::<Z, 4>::from_data(TensorData::new(x.to_vec(), dims), &device).require_grad()
    };
    let to_vec = |x: Tensor<Z, 4>| x.into_data().to_vec::<f32>().unwrap();
    let run = |blocked: Option<usize>| {
        let (ql, kl, vl) = (leaf(&q), leaf(&k), leaf(&v));
        let out = match blocked {
            Some(rows) => {
                strata_worker::attention::causal(ql.clone(), kl.clone(), vl.clone(), rows)
                    .unwrap_or_else(|_| {
                        panic!("wgpu's autodiff is not a known backend of the blocked attention")
                    })
            }
            None => {
                let mask = Tensor::<Z, 2, burn::tensor::Bool>::tril_mask([t, t], 0, &device);
                let bias = Tensor::<Z, 2>::zeros([t, t], &device)
                    .mask_fill(mask, -1e9)
                    .reshape([1, 1, t, t]);
                let scores = ql.clone().matmul(kl.clone().swap_dims(2, 3)) + bias;
                burn::tensor::activation::softmax(scores, 3).matmul(vl.clone())
            }
        };
        let g = (out.clone()
            * Tensor::<Z, 4>::from_data(TensorData::new(up.clone(), dims), &device))
        .sum()
        .backward();
        let grads = [&ql, &kl, &vl].map(|x| {
            let g = x.grad(&g).unwrap();
            g.into_data().to_vec::<f32>().unwrap()
        });
        (to_vec(out), grads)
    };
    let rel = |a: &[f32], b: &[f32]| {
        let num: f64 = a.iter().zip(b).map(|(x, y)| f64::from(x - y).powi(2)).sum();
        let den: f64 = b.iter().map(|y| f64::from(*y).powi(2)).sum();
        (num / den).sqrt()
    };
    let (want, want_grads) = run(None);
    for rows in [1, 7, 16, t] {
        let (out, grads) = run(Some(rows));
        assert!(
            rel(&out, &want) < 1e-5,
            "{rows} rows: out {:e}",
            rel(&out, &want)
        );
        for (name, (g, w)) in ["dq", "dk", "dv"].iter().zip(grads.iter().zip(&want_grads)) {
            assert!(rel(g, w) < 1e-4, "{rows} rows: {name} {:e}", rel(g, w));
        }
    }

    // A thread of its own has its own stream, so its own pools: what
    // they reserve is this attention's alone.
    std::thread::spawn(move || {
        let [h, t, hd] = [4, 8192, 16];
        let rows = strata_worker::attention::attention_block_rows(1, h, t);
        let x = |_| Tensor::<Z, 4>::random([1, h, t, hd], Distribution::Normal(0.0, 1.0), &device).require_grad();
        let [q, k, v] = [0, 1, 2].map(x);
        let out = strata_worker::attention::causal(q.clone(), k.clone(), v.clone(), rows)
            .unwrap_or_else(|_| panic!("the blocked attention on wgpu"));
        let g = out.sum().backward();
        let total: f32 = [&q, &k, &v]
            .map(|z| z.grad(&g).unwrap().sum().into_scalar())
            .iter()
            .sum();
        assert!(total.is_finite(), "gradients {total}");
        let reserved = wgpu::memory_reserved(&device).expect("memory statistics");
        let whole = (h * t * t * 4) as u64;
        eprintln!(
            "attention at {t} tokens, {h} heads, blocks of {rows} rows: the pools reserved {reserved} bytes; one copy of the whole scores is {whole}"
        );
        assert!(
            reserved < whole,
            "the pools reserved {reserved} bytes, as much as one copy of the whole [{h}, {t}, {t}] scores ({whole})"
        );
    })
    .join()
    .unwrap();
}
