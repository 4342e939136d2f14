//! The in-process backend passes the collective conformance suite.

use strata_worker::collective::conformance::{check_backend, on_group};
use strata_worker::collective::{Collective, CollectiveError, local_group};

#[test]
fn local_backend_conforms_for_groups_of_1_to_4() {
    check_backend(local_group, &[1, 2, 3, 4]);
}

#[test]
fn local_backend_conforms_for_a_large_group() {
    check_backend(local_group, &[7]);
}

#[test]
fn a_departed_member_is_named() {
    let mut group = local_group(2);
    let gone = group.pop().unwrap();
    drop(gone);
    let err = on_group(group, |c| c.recv(1, &mut [0.0f32]).unwrap_err())
        .pop()
        .unwrap();
    assert!(
        matches!(err, CollectiveError::PeerGone { peer: 1 }),
        "{err}"
    );
    assert_eq!(
        err.to_string(),
        "group rank 1 is gone (its end of the link closed)"
    );
}

#[test]
fn all_reduce_of_real_gradients_matches_a_plain_sum() {
    // Non-integer values: the ring's order differs from a left-to-right sum
    // by rounding only.
    let n = 4;
    let len = 10_007;
    let grad = |r: usize, i: usize| ((r * 31 + i) as f32 * 0.37).sin() * 1e-3;
    let results = on_group(local_group(n), |c| {
        let mut g: Vec<f32> = (0..len).map(|i| grad(c.rank(), i)).collect();
        c.all_reduce_sum(&mut g).unwrap();
        g
    });
    for i in 0..len {
        let exact: f64 = (0..n).map(|r| f64::from(grad(r, i))).sum();
        for r in &results {
            assert!((f64::from(r[i]) - exact).abs() <= 1e-9, "element {i}");
        }
        // Every member holds bit-identical results.
        assert!(
            results
                .iter()
                .all(|r| r[i].to_bits() == results[0][i].to_bits())
        );
    }
}

#[test]
fn staged_device_collectives_give_the_host_results_in_the_input_dtype() {
    use burn::backend::Flex;
    use burn::tensor::{DType, FloatDType, Tensor};
    use strata_worker::collective::{DeviceCollective, Staged};
    use strata_worker::tensors::{from_vec, to_vec};

    let n = 3;
    // Whole numbers: every sum is exact in any order, and in bf16 (8 bits
    // of mantissa) too.
    let part = |r: usize| -> Vec<f32> { (0..6).map(|i| (r * 10 + i) as f32).collect() };
    for dtype in [FloatDType::F32, FloatDType::BF16] {
        let results = on_group(local_group(n), |c| {
            let r = c.rank();
            let device = Default::default();
            let t = || from_vec::<Flex, 1>(part(r), [6], &device).cast(dtype);
            // Chunks of 4 elements: the 6-element bucket takes two calls.
            let mut g = Staged::new(c, 4);
            let sum: Tensor<Flex, 1> = g.all_reduce_sum(t()).unwrap();
            let scattered = g.reduce_scatter_sum(t()).unwrap();
            let gathered = g.all_gather(t()).unwrap();
            let root = g.broadcast(2, t()).unwrap();
            let dtypes = [&sum, &scattered, &gathered, &root].map(|x| x.dtype());
            (r, [sum, scattered, gathered, root].map(to_vec), dtypes)
        });
        let total: Vec<f32> = (0..6).map(|i| (0..n).map(|r| part(r)[i]).sum()).collect();
        for (r, [sum, scattered, gathered, root], dtypes) in results {
            assert_eq!(dtypes, [DType::from(dtype); 4], "rank {r}: dtypes");
            assert_eq!(sum, total, "rank {r}: all-reduce");
            assert_eq!(
                scattered,
                total[r * 2..r * 2 + 2],
                "rank {r}: reduce-scatter"
            );
            let all: Vec<f32> = (0..n).flat_map(part).collect();
            assert_eq!(gathered, all, "rank {r}: all-gather");
            assert_eq!(root, part(2), "rank {r}: broadcast from 2");
        }
    }
}
