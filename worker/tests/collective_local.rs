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
