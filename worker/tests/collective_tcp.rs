//! The TCP backend passes the collective conformance suite over loopback,
//! each member with its own endpoint as separate workers would have, makes
//! links only to the peers a member talks to, and reports peers that
//! leave, stray clients and members that never come.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use strata_worker::collective::conformance::{check_backend, on_group};
use strata_worker::collective::tcp::loopback_group;
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
fn tcp_backend_conforms_for_larger_groups() {
    // 7 and 33 are not powers of two: the log-round gather's last round
    // is a partial one.
    check_backend(group, &[7, 16, 33]);
}

#[test]
fn links_are_made_to_the_peers_a_member_talks_to() {
    let n = 16;
    let links = on_group(group(n), |c| {
        let joined = c.links();
        // A large buffer goes round the ring: one link each way.
        let mut big = vec![1.0f32; 100_000];
        c.all_reduce_sum(&mut big).unwrap();
        assert!(big.iter().all(|&x| x == n as f32));
        let ring = c.links();
        // A scalar is gathered in log2(16) = 4 rounds, to and from the
        // members 1, 2, 4 and 8 away (1 away already linked by the ring).
        let mut x = [c.rank() as f32];
        c.all_reduce_sum(&mut x).unwrap();
        assert_eq!(x[0], (0..n).sum::<usize>() as f32);
        (joined, ring, c.links())
    });
    for (r, &(joined, ring, scalar)) in links.iter().enumerate() {
        assert_eq!(joined, (0, 0), "member {r}: joining links nothing");
        assert_eq!(ring, (1, 1), "member {r} after a ring");
        assert_eq!(scalar, (5, 5), "member {r} after a scalar");
    }
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
    let results = on_group(group(3), |c| match c.rank() {
        // Member 2 sends once and leaves (its links close with it).
        2 => {
            c.send(0, &[2.0; 4]).unwrap();
            None
        }
        0 => {
            let mut got = [0.0f32; 4];
            c.recv(2, &mut got).unwrap();
            assert_eq!(got, [2.0; 4]);
            Some(c.recv(2, &mut got).unwrap_err())
        }
        _ => None,
    });
    let err = results[0].as_ref().unwrap();
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

const SECRET: &[u8] = b"the job token";

#[test]
fn a_stray_client_is_refused_and_the_group_still_forms() {
    let any = SocketAddr::from(([127, 0, 0, 1], 0));
    let (a, b) = (
        TcpEndpoint::bind(any, SECRET).unwrap(),
        TcpEndpoint::bind(any, SECRET).unwrap(),
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
    let a = TcpEndpoint::bind(any, SECRET).unwrap();
    let silent = TcpEndpoint::bind(any, SECRET).unwrap();
    // An address nobody listens on: a bound socket, closed.
    let gone = std::net::TcpListener::bind(any)
        .unwrap()
        .local_addr()
        .unwrap();
    let addrs = [a.local_addr().unwrap(), silent.local_addr().unwrap(), gone];
    let opts = TcpOptions {
        connect_timeout: Duration::from_millis(300),
        recv_timeout: Some(Duration::from_millis(300)),
    };
    let mut c = a.join("job-7/dp", 0, &addrs, &opts).unwrap();
    let err = c.recv(1, &mut [0.0; 1]).unwrap_err();
    assert!(
        matches!(err, CollectiveError::Unreachable { peer: 1, .. }),
        "{err}"
    );
    let text = err.to_string();
    assert!(
        text.contains("job-7/dp") && text.contains("did not connect"),
        "{text}"
    );
    let err = c.send(2, &[1.0]).unwrap_err();
    assert!(
        matches!(err, CollectiveError::Unreachable { peer: 2, .. }),
        "{err}"
    );
    assert!(err.to_string().contains(&gone.to_string()), "{err}");
}

#[test]
fn one_endpoint_serves_several_groups_joined_in_any_order() {
    // Two workers in two groups; worker 1 joins them in the other order.
    let any = SocketAddr::from(([127, 0, 0, 1], 0));
    let (a, b) = (
        TcpEndpoint::bind(any, SECRET).unwrap(),
        TcpEndpoint::bind(any, SECRET).unwrap(),
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

/// A client that speaks the collective's hello without the job's secret:
/// it claims `rank` of `size` in `group`, reads the answer and sends a
/// made-up tag.
fn forge(addr: SocketAddr, group: &str, size: u64, rank: u64) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    let mut hello = b"strata4\0".to_vec();
    hello.extend_from_slice(&(group.len() as u64).to_le_bytes());
    hello.extend_from_slice(group.as_bytes());
    for n in [size, rank, 0] {
        hello.extend_from_slice(&n.to_le_bytes());
    }
    hello.extend_from_slice(&[9u8; 32]);
    s.write_all(&hello).unwrap();
    let mut reply = [0u8; 64];
    s.read_exact(&mut reply).unwrap();
    s.write_all(&[7u8; 32]).unwrap();
    s
}

#[test]
fn forged_hellos_are_dropped_and_the_group_still_forms() {
    let any = SocketAddr::from(([127, 0, 0, 1], 0));
    let (a, b) = (
        TcpEndpoint::bind(any, SECRET).unwrap(),
        TcpEndpoint::bind(any, SECRET).unwrap(),
    );
    let addrs = [a.local_addr().unwrap(), b.local_addr().unwrap()];
    // One forger claims rank 1 before the real one comes; another claims
    // a group of another size (which used to abort the join).
    let _claim = forge(addrs[0], "g", 2, 1);
    let _resize = forge(addrs[0], "g", 7, 1);
    std::thread::sleep(Duration::from_millis(100));
    let opts = TcpOptions::default();
    let (mut c0, mut c1) = std::thread::scope(|s| {
        let c0 = s.spawn(|| a.join("g", 0, &addrs, &opts).unwrap());
        std::thread::sleep(Duration::from_millis(100));
        let c1 = b.join("g", 1, &addrs, &opts).unwrap();
        (c0.join().unwrap(), c1)
    });
    c1.send(0, &[4.0]).unwrap();
    let mut got = [0.0];
    c0.recv(1, &mut got).unwrap();
    assert_eq!(got, [4.0]);
}

#[test]
fn idle_connections_do_not_hold_up_a_link() {
    // Each idle connection used to hold the accept loop for 10 s.
    let any = SocketAddr::from(([127, 0, 0, 1], 0));
    let (a, b) = (
        TcpEndpoint::bind(any, SECRET).unwrap(),
        TcpEndpoint::bind(any, SECRET).unwrap(),
    );
    let addrs = [a.local_addr().unwrap(), b.local_addr().unwrap()];
    let _idle: Vec<TcpStream> = (0..20)
        .map(|_| TcpStream::connect(addrs[0]).unwrap())
        .collect();
    let opts = TcpOptions {
        connect_timeout: Duration::from_secs(4),
        recv_timeout: Some(Duration::from_secs(4)),
    };
    let mut c0 = a.join("g", 0, &addrs, &opts).unwrap();
    let mut c1 = b.join("g", 1, &addrs, &opts).unwrap();
    c1.send(0, &[5.0]).unwrap();
    let mut got = [0.0];
    c0.recv(1, &mut got).unwrap();
    assert_eq!(got, [5.0]);
}

#[test]
fn a_peer_without_the_job_secret_is_refused_by_both_ends() {
    let any = SocketAddr::from(([127, 0, 0, 1], 0));
    let a = TcpEndpoint::bind(any, SECRET).unwrap();
    let other = TcpEndpoint::bind(any, b"another job's token").unwrap();
    let addrs = [a.local_addr().unwrap(), other.local_addr().unwrap()];
    let opts = TcpOptions {
        connect_timeout: Duration::from_millis(1500),
        recv_timeout: Some(Duration::from_millis(1500)),
    };
    let mut c0 = a.join("g", 0, &addrs, &opts).unwrap();
    let mut c1 = other.join("g", 1, &addrs, &opts).unwrap();
    let (accepting, connecting) = std::thread::scope(|s| {
        let h = s.spawn(|| c1.send(0, &[1.0]).unwrap_err());
        (c0.recv(1, &mut [0.0]).unwrap_err(), h.join().unwrap())
    });
    assert!(
        matches!(accepting, CollectiveError::Unreachable { peer: 1, .. }),
        "{accepting}"
    );
    assert!(
        matches!(connecting, CollectiveError::Unreachable { peer: 0, .. }),
        "{connecting}"
    );
    assert!(
        connecting.to_string().contains("this job's secret"),
        "{connecting}"
    );
}

#[test]
fn an_empty_secret_is_refused() {
    let any = SocketAddr::from(([127, 0, 0, 1], 0));
    let err = TcpEndpoint::bind(any, b"").err().unwrap();
    assert!(err.to_string().contains("secret"), "{err}");
}
