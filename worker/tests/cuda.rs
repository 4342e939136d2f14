//! The CUDA backend (feature `cuda`): on a machine without the driver or a
//! GPU, every entry point is an error that names what is missing, not a
//! panic; on a machine with a GPU, a small model trains on it with the
//! losses of the CPU run, step for step, and nothing model-sized crosses
//! the host; NCCL conforms on every GPU present (or its absence is an
//! error naming the library). `.ci/run` runs this file (where there is no GPU, the GPU test
//! says that it was skipped and why).
#![cfg(feature = "cuda")]

use burn::backend::{Autodiff, Flex};
use burn::tensor::backend::AutodiffBackend;
use strata_recipe::{AdamWConfig, ModelConfig};
use strata_worker::cuda::{self, CudaError, CudaFused};
use strata_worker::params::ParamTable;
use strata_worker::tensors::host_transfers;
use strata_worker::train::{Groups, LocalBatch, Trainer};

/// Says a test was skipped, past the test harness's capture: the suite's
/// log shows it even though the test passes.
fn skipped(why: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "skipped: {why}");
}

fn tiny() -> ModelConfig {
    ModelConfig {
        n_layers: 2,
        d_model: 64,
        n_heads: 4,
        n_kv_heads: 2,
        d_ffn: 176,
        vocab_size: 500,
        padded_vocab_size: 512,
        max_seq_len: 32,
        rope_theta: 10000.0,
        tie_embeddings: true,
    }
}

fn adamw() -> AdamWConfig {
    AdamWConfig::default()
}

/// Per-step losses and host elements moved of `steps` steps of 4 × 32
/// tokens (a repeating pattern) on `device`.
fn losses<B: AutodiffBackend>(device: B::Device, steps: usize) -> (Vec<f64>, u64) {
    let cfg = tiny();
    let mut trainer = Trainer::<B>::new(
        &cfg,
        ParamTable::whole(&cfg),
        5,
        adamw(),
        Groups::single(),
        device,
    );
    let (rows, seq) = (4, 32);
    let mut out = Vec::new();
    let mut moved = 0;
    for step in 1..=steps {
        let row: Vec<u32> = (0..rows * (seq + 1))
            .map(|i| ((i * 7 + step) % 31 * 11 % 500) as u32)
            .collect();
        let (inputs, targets): (Vec<u32>, Vec<u32>) = row
            .chunks(seq + 1)
            .flat_map(|r| r[..seq].iter().copied().zip(r[1..].iter().copied()))
            .unzip();
        let micro = [LocalBatch {
            inputs: &inputs,
            targets: &targets,
            seq_len: seq,
            groups: &[],
        }];
        let before = host_transfers();
        let stats = trainer
            .step(step as u64, &micro, (rows * seq) as u64, 3e-3)
            .unwrap();
        moved = moved.max(host_transfers() - before);
        out.push(stats.loss);
    }
    (out, moved)
}

/// Without a driver the probe says so; with one, a GPU past the last is
/// named with the count.
#[test]
fn a_missing_driver_or_gpu_is_an_error_that_names_it() {
    match cuda::device_count() {
        Err(CudaError::NoDriver) => {
            assert!(!cuda::driver_present());
            let e = cuda::probe(0).unwrap_err();
            assert!(e.to_string().contains("libcuda.so"), "{e}");
        }
        Err(e) => panic!("the driver loads but cannot count its GPUs: {e}"),
        Ok(n) => {
            let e = cuda::probe(n).unwrap_err();
            assert!(
                matches!(e, CudaError::NoSuchDevice { index, count, .. } if index == n && count == n),
                "{e}"
            );
        }
    }
}

/// 20 steps on GPU 0 against the same 20 on the CPU: the same losses
/// within f32 reassociation (kernels sum in another order), and only
/// token ids and scalars cross the host per step.
#[test]
fn training_on_the_gpu_follows_the_cpu() {
    let info = match cuda::probe(0) {
        Ok(info) => info,
        Err(e) => {
            skipped(&format!("no CUDA GPU to train on ({e})"));
            return;
        }
    };
    eprintln!("training on {} ({:?})", info.name, info.capability);
    let (cpu, _) = losses::<Autodiff<Flex>>(Default::default(), 20);
    let (gpu, moved) = losses::<Autodiff<CudaFused>>(cuda::device(0), 20);
    for (step, (c, g)) in cpu.iter().zip(&gpu).enumerate() {
        let rel = (c - g).abs() / c.abs();
        assert!(rel < 1e-3, "step {}: cpu {c} gpu {g}", step + 1);
    }
    assert!(gpu[19] < gpu[0], "the GPU run did not learn: {gpu:?}");
    assert!(
        moved <= 2 * 4 * 32 + 2,
        "a step moved {moved} host elements"
    );
}

#[test]
fn nccl_conforms_on_every_gpu_or_its_absence_is_named() {
    use strata_worker::nccl;
    if !nccl::library_present() {
        let e = nccl::NcclId::new().err().expect("no NCCL, no id");
        assert!(e.to_string().contains("libnccl.so.2"), "{e}");
        let e = nccl::conformance(1).unwrap_err();
        assert!(e.to_string().contains("LD_LIBRARY_PATH"), "{e}");
        skipped(&format!("NCCL conformance ({e})"));
        return;
    }
    match cuda::device_count() {
        Ok(n) if n > 0 => {
            let report = nccl::conformance(n).expect("NCCL conformance runs");
            assert!(report.pass, "{report:?}");
            assert_eq!(report.checks.len(), 8 * n);
        }
        other => skipped(&format!("NCCL is here but no GPU ({other:?})")),
    }
}
