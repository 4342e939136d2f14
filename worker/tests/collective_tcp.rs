//! The TCP backend passes the collective conformance suite over loopback,
//! each member with its own endpoint as separate workers would have, and
//! reports peers that leave, stray clients and members that never come.

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use strata_worker::collective::conformance::{check_backend, on_group};
use strata_worker::collective::tcp::{JoinError, loopback_group};
use strata_worker::collective::{
    Collective, CollectiveError, TcpEndpoint, TcpOptions, local_group,
};

fn group(n: usize) -> Vec<strata_worker::collective::TcpCollective> {
    loopback_group("conformance", n).expect("a loopback group")
}

#[test]
fn tcp_backend_conforms_for_groups_of_1_to_4() {
    check_backend(group, &[1, 2, 3, 4]);
}

#[test]
fn tcp_backend_conforms_for_a_large_group() {
    check_backend(group, &[7]);
}

#[test]
fn tcp_and_local_backends_agree_bit_for_bit() {
    let n = 3;
    let len = 100_003;
    let grad = |r: usize, i: usize| ((r * 17 + i) as f32 * 0.113).cos() * 3e-4;
    let run = |c: &mut dyn Collective| {
        let mut g: Vec<f32> = (0..len).map(|i| grad(c.rank(), i)).collect();
        c.all_reduce_sum(&mut g).unwrap();
        g.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
    };
    let tcp = on_group(group(n), |c| run(c));
    let local = on_group(local_group(n), |c| run(c));
    assert_eq!(tcp, local);
}

#[test]
fn a_departed_member_is_named() {
    let mut members = group(3);
    drop(members.pop());
    let mut results = on_group(members, |c| {
        if c.rank() == 0 {
            c.recv(2, &mut [0.0f32; 4]).unwrap_err()
        } else {
            CollectiveError::PeerGone { peer: usize::MAX }
        }
    });
    let err = results.remove(0);
    assert!(
        matches!(err, CollectiveError::PeerGone { peer: 2 }),
        "{err}"
    );
}

#[test]
fn a_size_mismatch_names_the_sender() {
    let results = on_group(group(2), |c| {
        if c.rank() == 0 {
            c.send(1, &[1.0, 2.0, 3.0]).unwrap();
            None
        } else {
            Some(c.recv(0, &mut [0.0f32; 2]).unwrap_err())
        }
    });
    let err = results[1].as_ref().unwrap();
    assert_eq!(
        err.to_string(),
        "group rank 0 sent 3 elements where 2 were expected"
    );
}

#[test]
fn a_stray_client_is_refused_and_the_group_still_forms() {
    let any = SocketAddr::from(([127, 0, 0, 1], 0));
    let (a, b) = (
        TcpEndpoint::bind(any).unwrap(),
        TcpEndpoint::bind(any).unwrap(),
    );
    let addrs = [a.local_addr().unwrap(), b.local_addr().unwrap()];
    let mut stray = TcpStream::connect(addrs[0]).unwrap();
    stray.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    let opts = TcpOptions::default();
    let (mut c0, mut c1) = std::thread::scope(|s| {
        let h = s.spawn(|| b.join("g", 1, &addrs, &opts).unwrap());
        let c0 = a.join("g", 0, &addrs, &opts).unwrap();
        (c0, h.join().unwrap())
    });
    c1.send(0, &[4.0]).unwrap();
    let mut got = [0.0];
    c0.recv(1, &mut got).unwrap();
    assert_eq!(got, [4.0]);
}

#[test]
fn members_that_never_come_are_named() {
    let any = SocketAddr::from(([127, 0, 0, 1], 0));
    let a = TcpEndpoint::bind(any).unwrap();
    let silent = TcpEndpoint::bind(any).unwrap();
    let addrs = [a.local_addr().unwrap(), silent.local_addr().unwrap()];
    let opts = TcpOptions {
        connect_timeout: Duration::from_millis(300),
        ..TcpOptions::default()
    };
    let err = a.join("job-7/dp", 0, &addrs, &opts).err().unwrap();
    assert!(matches!(err, JoinError::Timeout { ref missing, .. } if missing == &[1]));
    assert!(err.to_string().contains("job-7/dp"), "{err}");
}

#[test]
fn one_endpoint_serves_several_groups_joined_in_any_order() {
    // Two workers in two groups; worker 1 joins them in the other order.
    let any = SocketAddr::from(([127, 0, 0, 1], 0));
    let (a, b) = (
        TcpEndpoint::bind(any).unwrap(),
        TcpEndpoint::bind(any).unwrap(),
    );
    let addrs = [a.local_addr().unwrap(), b.local_addr().unwrap()];
    let opts = TcpOptions::default();
    let sums = std::thread::scope(|s| {
        let h = s.spawn(|| {
            let mut dp = b.join("dp", 1, &addrs, &opts).unwrap();
            let mut tp = b.join("tp", 1, &addrs, &opts).unwrap();
            let (mut x, mut y) = ([2.0f32], [20.0f32]);
            std::thread::scope(|s2| {
                s2.spawn(|| tp.all_reduce_sum(&mut y).unwrap());
                dp.all_reduce_sum(&mut x).unwrap();
            });
            (x[0], y[0])
        });
        let mut tp = a.join("tp", 0, &addrs, &opts).unwrap();
        let mut dp = a.join("dp", 0, &addrs, &opts).unwrap();
        let (mut x, mut y) = ([1.0f32], [10.0f32]);
        std::thread::scope(|s2| {
            s2.spawn(|| tp.all_reduce_sum(&mut y).unwrap());
            dp.all_reduce_sum(&mut x).unwrap();
        });
        ((x[0], y[0]), h.join().unwrap())
    });
    assert_eq!(sums, ((3.0, 30.0), (3.0, 30.0)));
}
