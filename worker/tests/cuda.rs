//! The CUDA backend (feature `cuda`): on a machine without the driver or a
//! GPU, every entry point is an error that names what is missing, not a
//! panic; on a machine with a GPU, a small model trains on it with the
//! losses of the CPU run, step for step, and nothing model-sized crosses
//! the host; NCCL conforms on every GPU present (or its absence is an
//! error naming the library). `.ci/run` runs this file (where there is no GPU, the GPU test
//! says that it was skipped and why).
#![cfg(feature = "cuda")]

mod common;

use burn::backend::{Autodiff, Flex};
use common::device_run;
use strata_worker::cuda::{self, CudaError, CudaFused};

/// Says a test was skipped, past the test harness's capture: the suite's
/// log shows it even though the test passes.
fn skipped(why: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "skipped: {why}");
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
    let (cpu, _, _) = device_run::<Autodiff<Flex>>(Default::default(), 20, || None);
    let (gpu, moved, _) = device_run::<Autodiff<CudaFused>>(cuda::device(0), 20, || None);
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
