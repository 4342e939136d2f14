//! The wgpu backend (feature `wgpu`), on whatever adapter wgpu finds (CI:
//! Mesa's lavapipe on the CPU): 20 steps give the CPU's losses, only token
//! ids and scalars cross the host per step, and the device pools stop
//! growing once every step shape has run. Without an adapter it says it
//! was skipped, unless `STRATA_REQUIRE_WGPU` is set (then it fails).
#![cfg(feature = "wgpu")]

mod common;

use burn::backend::{Autodiff, Flex};
use common::device_run;
use strata_worker::wgpu;

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
