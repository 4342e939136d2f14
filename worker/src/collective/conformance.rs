//! The conformance suite every [`Collective`] backend must pass.
//!
//! A backend's tests call [`check_backend`] with a function that builds a
//! group of a given size; the suite runs each member on its own thread and
//! panics with the operation, group size and member on the first wrong
//! answer. Inputs are whole numbers so that sums are exact in any order.

use std::sync::atomic::{AtomicUsize, Ordering};

use super::{Collective, CollectiveError, Tag};

/// Runs `f` on every member of `group`, each on its own thread, and returns
/// the members' results in rank order.
pub fn on_group<C, R, F>(group: Vec<C>, f: F) -> Vec<R>
where
    C: Collective,
    R: Send,
    F: Fn(&mut C) -> R + Sync,
{
    std::thread::scope(|s| {
        let handles: Vec<_> = group
            .into_iter()
            .map(|mut member| {
                let f = &f;
                s.spawn(move || f(&mut member))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a group member panicked"))
            .collect()
    })
}

/// A member's input: whole numbers in [−64, 64], distinct per rank and index.
fn value(rank: usize, i: usize, salt: usize) -> f32 {
    let mut x = (rank as u64 + 1)
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add((i as u64).wrapping_mul(0xBF58_476D_1CE4_E5B9))
        .wrapping_add(salt as u64);
    x ^= x >> 31;
    x = x.wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^= x >> 29;
    ((x % 129) as i64 - 64) as f32
}

fn input(rank: usize, len: usize, salt: usize) -> Vec<f32> {
    (0..len).map(|i| value(rank, i, salt)).collect()
}

/// Runs every check on groups of each size in `sizes`.
pub fn check_backend<C: Collective>(make_group: impl Fn(usize) -> Vec<C>, sizes: &[usize]) {
    for &n in sizes {
        let group = make_group(n);
        assert_eq!(
            group.len(),
            n,
            "make_group({n}) built {} members",
            group.len()
        );
        for (r, m) in group.iter().enumerate() {
            assert_eq!(
                (m.rank(), m.size()),
                (r, n),
                "member {r} of {n}: wrong rank or size"
            );
        }
        all_reduce(make_group(n));
        all_reduce_max(make_group(n));
        reduce_scatter(make_group(n));
        all_gather(make_group(n));
        broadcast(make_group(n));
        point_to_point(make_group(n));
        barrier(make_group(n));
        bad_buffers(make_group(n));
        mixed_sequence(make_group(n));
        pipeline_messages(make_group(n));
        wrong_tag(make_group(n));
    }
}

fn all_reduce_max<C: Collective>(group: Vec<C>) {
    let n = group.len();
    let lens = [0, 1, n, 7, 1001];
    let results = on_group(group, |c| {
        lens.iter()
            .map(|&len| {
                let mut buf = input(c.rank(), len, len + 5);
                c.all_reduce_max(&mut buf).expect("all_reduce_max");
                buf
            })
            .collect::<Vec<_>>()
    });
    for (r, per_len) in results.iter().enumerate() {
        for (buf, &len) in per_len.iter().zip(&lens) {
            let expected: Vec<f32> = (0..len)
                .map(|i| {
                    (0..n)
                        .map(|q| value(q, i, len + 5))
                        .fold(f32::NEG_INFINITY, f32::max)
                })
                .collect();
            assert_eq!(
                buf, &expected,
                "all_reduce_max, group of {n}, member {r}, {len} elements"
            );
        }
    }
}

/// A pipeline's pattern: every member sends activations forward and
/// gradients back, tagged, several microbatches ahead of the receiver,
/// while collectives run on the same links in between.
fn pipeline_messages<C: Collective>(group: Vec<C>) {
    let n = group.len();
    let mbs = 5u32;
    let act = |from: usize, mb: u32| input(from, 6, 1000 + mb as usize);
    let grad = |from: usize, mb: u32| input(from, 6, 2000 + mb as usize);
    let results = on_group(group, |c| {
        let me = c.rank();
        // Sends first (they never wait), then the receives.
        for mb in 0..mbs {
            if me + 1 < n {
                c.send_tagged(me + 1, Tag::activation(9, me as u32 + 1, mb), &act(me, mb))
                    .expect("send activation");
            }
            if me > 0 {
                c.send_tagged(me - 1, Tag::gradient(9, me as u32 - 1, mb), &grad(me, mb))
                    .expect("send gradient");
            }
        }
        let mut got = Vec::new();
        for mb in 0..mbs {
            let mut a = vec![f32::NAN; 6];
            let mut g = vec![f32::NAN; 6];
            if me > 0 {
                c.recv_tagged(me - 1, Tag::activation(9, me as u32, mb), &mut a)
                    .expect("recv activation");
            }
            if me + 1 < n {
                c.recv_tagged(me + 1, Tag::gradient(9, me as u32, mb), &mut g)
                    .expect("recv gradient");
            }
            got.push((a, g));
        }
        let mut sum = [1.0f32];
        c.all_reduce_sum(&mut sum)
            .expect("all_reduce after pipeline traffic");
        (got, sum[0])
    });
    for (me, (got, sum)) in results.iter().enumerate() {
        assert_eq!(
            *sum, n as f32,
            "all_reduce after pipeline traffic, member {me}"
        );
        for (mb, (a, g)) in got.iter().enumerate() {
            let mb = mb as u32;
            if me > 0 {
                assert_eq!(a, &act(me - 1, mb), "activation {mb} at member {me} of {n}");
            }
            if me + 1 < n {
                assert_eq!(g, &grad(me + 1, mb), "gradient {mb} at member {me} of {n}");
            }
        }
    }
}

/// A receive that expects another message than the one sent fails, naming
/// the peer and both tags.
fn wrong_tag<C: Collective>(group: Vec<C>) {
    let n = group.len();
    if n < 2 {
        return;
    }
    let results = on_group(group, |c| match c.rank() {
        0 => {
            c.send_tagged(1, Tag::activation(3, 1, 1), &[1.0, 2.0])
                .expect("send");
            None
        }
        1 => Some(c.recv_tagged(0, Tag::activation(3, 1, 0), &mut [0.0; 2])),
        _ => None,
    });
    match &results[1] {
        Some(Err(e @ CollectiveError::WrongMessage { peer: 0, .. })) => {
            let text = e.to_string();
            assert!(
                text.contains("step 3, microbatch 1") && text.contains("step 3, microbatch 0"),
                "{text}"
            );
        }
        other => panic!("a wrongly tagged message, group of {n}: {other:?}"),
    }
}

fn all_reduce<C: Collective>(group: Vec<C>) {
    let n = group.len();
    let lens = [0, 1, n.saturating_sub(1), n, 7, 1000, 4099];
    let results = on_group(group, |c| {
        lens.iter()
            .map(|&len| {
                let mut buf = input(c.rank(), len, len);
                c.all_reduce_sum(&mut buf).expect("all_reduce_sum");
                buf
            })
            .collect::<Vec<_>>()
    });
    for (r, per_len) in results.iter().enumerate() {
        for (buf, &len) in per_len.iter().zip(&lens) {
            let expected: Vec<f32> = (0..len)
                .map(|i| (0..n).map(|q| value(q, i, len)).sum())
                .collect();
            assert_eq!(
                buf, &expected,
                "all_reduce_sum, group of {n}, member {r}, {len} elements"
            );
        }
    }
}

fn reduce_scatter<C: Collective>(group: Vec<C>) {
    let n = group.len();
    let parts = [0, 1, 3, 257];
    let results = on_group(group, |c| {
        parts
            .iter()
            .map(|&m| {
                let inp = input(c.rank(), m * n, m);
                let mut out = vec![f32::NAN; m];
                c.reduce_scatter_sum(&inp, &mut out)
                    .expect("reduce_scatter_sum");
                out
            })
            .collect::<Vec<_>>()
    });
    for (r, per) in results.iter().enumerate() {
        for (out, &m) in per.iter().zip(&parts) {
            let expected: Vec<f32> = (0..m)
                .map(|i| (0..n).map(|q| value(q, r * m + i, m)).sum())
                .collect();
            assert_eq!(
                out, &expected,
                "reduce_scatter_sum, group of {n}, member {r}, parts of {m}"
            );
        }
    }
}

fn all_gather<C: Collective>(group: Vec<C>) {
    let n = group.len();
    let parts = [0, 1, 5, 300];
    let results = on_group(group, |c| {
        parts
            .iter()
            .map(|&m| {
                let inp = input(c.rank(), m, m + 1);
                let mut out = vec![f32::NAN; m * n];
                c.all_gather(&inp, &mut out).expect("all_gather");
                out
            })
            .collect::<Vec<_>>()
    });
    for (r, per) in results.iter().enumerate() {
        for (out, &m) in per.iter().zip(&parts) {
            let expected: Vec<f32> = (0..n).flat_map(|q| input(q, m, m + 1)).collect();
            assert_eq!(
                out, &expected,
                "all_gather, group of {n}, member {r}, parts of {m}"
            );
        }
    }
}

fn broadcast<C: Collective>(group: Vec<C>) {
    let n = group.len();
    let results = on_group(group, |c| {
        (0..n)
            .flat_map(|root| [1usize, 1000].map(move |len| (root, len)))
            .map(|(root, len)| {
                let mut buf = if c.rank() == root {
                    input(root, len, 7)
                } else {
                    vec![f32::NAN; len]
                };
                c.broadcast(root, &mut buf).expect("broadcast");
                buf
            })
            .collect::<Vec<_>>()
    });
    for (r, per) in results.iter().enumerate() {
        let cases = (0..n).flat_map(|root| [1usize, 1000].map(move |len| (root, len)));
        for (buf, (root, len)) in per.iter().zip(cases) {
            assert_eq!(
                buf,
                &input(root, len, 7),
                "broadcast from {root}, group of {n}, member {r}"
            );
        }
    }
}

/// Every ordered pair exchanges a distinct message; the lower rank sends
/// first, so no backend can deadlock on it.
fn point_to_point<C: Collective>(group: Vec<C>) {
    let n = group.len();
    let msg = |from: usize, to: usize| input(from, 3 + to, 100 + to);
    let results = on_group(group, |c| {
        let me = c.rank();
        let mut got = vec![Vec::new(); n];
        for peer in (0..n).filter(|&p| p != me) {
            let mut buf = vec![f32::NAN; 3 + me];
            if me < peer {
                c.send(peer, &msg(me, peer)).expect("send");
                c.recv(peer, &mut buf).expect("recv");
            } else {
                c.recv(peer, &mut buf).expect("recv");
                c.send(peer, &msg(me, peer)).expect("send");
            }
            got[peer] = buf;
        }
        got
    });
    for (me, got) in results.iter().enumerate() {
        for peer in (0..n).filter(|&p| p != me) {
            assert_eq!(
                got[peer],
                msg(peer, me),
                "recv by {me} from {peer}, group of {n}"
            );
        }
    }
}

fn barrier<C: Collective>(group: Vec<C>) {
    let n = group.len();
    let entered = AtomicUsize::new(0);
    on_group(group, |c| {
        for round in 1..=5 {
            entered.fetch_add(1, Ordering::SeqCst);
            c.barrier().expect("barrier");
            // Nobody leaves round k before all n entered it.
            assert!(
                entered.load(Ordering::SeqCst) >= n * round,
                "barrier, group of {n}: member {} left round {round} early",
                c.rank()
            );
            c.barrier().expect("barrier");
        }
    });
}

fn bad_buffers<C: Collective>(group: Vec<C>) {
    let n = group.len();
    on_group(group, |c| {
        let mut out = vec![0f32; 2];
        match c.reduce_scatter_sum(&vec![0f32; 2 * n + 1], &mut out) {
            Err(CollectiveError::BadBuffer {
                op: "reduce_scatter",
                ..
            }) => {}
            other => panic!("reduce_scatter with a wrong input length, group of {n}: {other:?}"),
        }
        let mut out = vec![0f32; 2 * n + 1];
        match c.all_gather(&[0.0, 0.0], &mut out) {
            Err(CollectiveError::BadBuffer {
                op: "all_gather", ..
            }) => {}
            other => panic!("all_gather with a wrong output length, group of {n}: {other:?}"),
        }
        match c.broadcast(n, &mut [0.0]) {
            Err(CollectiveError::NoSuchPeer { peer, .. }) if peer == n => {}
            other => panic!("broadcast from a root outside the group of {n}: {other:?}"),
        }
    });
}

/// Operations of different kinds back to back must not mix their messages.
fn mixed_sequence<C: Collective>(group: Vec<C>) {
    let n = group.len();
    let results = on_group(group, |c| {
        let mut a = input(c.rank(), 33, 1);
        c.all_reduce_sum(&mut a).unwrap();
        let mut b = if c.rank() == n - 1 {
            input(9, 5, 2)
        } else {
            vec![0.0; 5]
        };
        c.broadcast(n - 1, &mut b).unwrap();
        let mut g = vec![0.0; 4 * n];
        c.all_gather(&input(c.rank(), 4, 3), &mut g).unwrap();
        c.all_reduce_sum(&mut a).unwrap();
        (a, b, g)
    });
    let once: Vec<f32> = (0..33)
        .map(|i| (0..n).map(|q| value(q, i, 1)).sum())
        .collect();
    let twice: Vec<f32> = once.iter().map(|x| x * n as f32).collect();
    let gathered: Vec<f32> = (0..n).flat_map(|q| input(q, 4, 3)).collect();
    for (r, (a, b, g)) in results.iter().enumerate() {
        assert_eq!(
            a, &twice,
            "mixed sequence, group of {n}, member {r}: all_reduce"
        );
        assert_eq!(
            b,
            &input(9, 5, 2),
            "mixed sequence, group of {n}, member {r}: broadcast"
        );
        assert_eq!(
            g, &gathered,
            "mixed sequence, group of {n}, member {r}: all_gather"
        );
    }
}
