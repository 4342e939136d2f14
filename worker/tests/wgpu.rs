//! The wgpu backend (feature `wgpu`), on whatever adapter wgpu finds (CI:
//! Mesa's lavapipe on the CPU): 20 steps give the CPU's losses, only token
//! ids and scalars cross the host per step, and the device pools stop
//! growing once every step shape has run. Without an adapter it says it
//! was skipped, unless `STRATA_REQUIRE_WGPU` is set (then it fails).
#![cfg(feature = "wgpu")]

use burn::backend::{Autodiff, Flex};
use burn::tensor::backend::AutodiffBackend;
use strata_recipe::ModelConfig;
use strata_worker::params::ParamTable;
use strata_worker::tensors::host_transfers;
use strata_worker::train::{Groups, LocalBatch, Trainer};
use strata_worker::wgpu;

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

/// Per-step losses, the most host elements one step moved, and what
/// `memory` read after each step, for 20 steps of 4 × 32 tokens.
fn run<B: AutodiffBackend>(
    device: B::Device,
    memory: impl Fn() -> Option<u64>,
) -> (Vec<f64>, u64, Vec<Option<u64>>) {
    let cfg = tiny();
    let mut trainer = Trainer::<B>::new(
        &cfg,
        ParamTable::whole(&cfg),
        5,
        Default::default(),
        Groups::single(),
        device,
    );
    let (rows, seq) = (4, 32);
    let (mut losses, mut moved, mut reserved) = (Vec::new(), 0, Vec::new());
    for step in 1..=20 {
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
        losses.push(stats.loss);
        reserved.push(memory());
    }
    (losses, moved, reserved)
}

#[test]
fn training_on_wgpu_follows_the_cpu_and_its_memory_stays_put() {
    let info = match wgpu::probe() {
        Ok(info) => info,
        Err(e) => {
            assert!(
                std::env::var_os("STRATA_REQUIRE_WGPU").is_none(),
                "STRATA_REQUIRE_WGPU is set: {e}"
            );
            eprintln!("SKIPPED: {e}");
            return;
        }
    };
    eprintln!("training on {info:?}");
    let (cpu, _, _) = run::<Autodiff<Flex>>(Default::default(), || None);
    let device = wgpu::device();
    let (gpu, moved, reserved) =
        run::<Autodiff<wgpu::WgpuFused>>(device.clone(), || wgpu::memory_reserved(&device));
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
