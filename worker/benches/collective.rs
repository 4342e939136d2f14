//! All-reduce bus bandwidth of the TCP backend on loopback, beside raw TCP
//! loopback bandwidth measured in the same run and what one TLS 1.3 stream
//! (rustls, ring) carries over the same loopback (what encrypting the
//! ring's links would cost), printed as one JSON object:
//! `cargo bench -p strata-worker --bench collective`.
//!
//! Bus bandwidth follows NCCL's convention: a ring all-reduce moves
//! 2·(n−1)/n of the buffer through every link, so busbw = that many bytes
//! over the time taken; it is comparable to the raw link's bandwidth.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Instant;

use strata_worker::collective::Collective;
use strata_worker::collective::conformance::on_group;
use strata_worker::collective::tcp::loopback_group;

const REPEATS: usize = 5;

/// One stream over loopback, writer and reader on their own threads:
/// `accept` and `connect` make each end of a TCP connection into the
/// stream measured (itself, or TLS with its handshake done before the
/// clock starts).
fn stream_gib_per_s<R: Read, W: Write>(
    bytes: usize,
    accept: impl FnOnce(TcpStream) -> R + Send + 'static,
    connect: impl FnOnce(TcpStream) -> W,
) -> f64 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let chunk = vec![7u8; 4 << 20];
    let reader = std::thread::spawn(move || {
        let mut s = accept(listener.accept().unwrap().0);
        let mut buf = vec![0u8; 4 << 20];
        let mut got = 0;
        while got < bytes {
            got += s.read(&mut buf).unwrap();
        }
    });
    let mut s = connect(TcpStream::connect(addr).unwrap());
    let t = Instant::now();
    let mut sent = 0;
    while sent < bytes {
        s.write_all(&chunk).unwrap();
        sent += chunk.len();
    }
    s.flush().unwrap();
    reader.join().unwrap();
    bytes as f64 / t.elapsed().as_secs_f64() / f64::from(1 << 30)
}

/// One TCP stream over loopback.
fn raw_tcp_gib_per_s(bytes: usize) -> f64 {
    stream_gib_per_s(bytes, |s| s, |s| s)
}

/// One TLS 1.3 stream over loopback with one cipher suite.
fn tls_gib_per_s(bytes: usize, suite: rustls::SupportedCipherSuite) -> f64 {
    use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
    use std::sync::Arc;
    let made = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let der = made.cert.der().clone();
    let key = PrivateKeyDer::from(PrivatePkcs8KeyDer::from(made.signing_key.serialize_der()));
    let provider = Arc::new(rustls::crypto::CryptoProvider {
        cipher_suites: vec![suite],
        ..rustls::crypto::ring::default_provider()
    });
    let server = Arc::new(
        rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![der.clone()], key)
            .unwrap(),
    );
    let mut roots = rustls::RootCertStore::empty();
    roots.add(der).unwrap();
    let client = Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    );
    let accept =
        move |s| rustls::StreamOwned::new(rustls::ServerConnection::new(server).unwrap(), s);
    let connect = |tcp: TcpStream| {
        let name = ServerName::try_from("localhost").unwrap();
        let conn = rustls::ClientConnection::new(client, name).unwrap();
        let mut s = rustls::StreamOwned::new(conn, tcp);
        while s.conn.is_handshaking() {
            s.conn.complete_io(&mut s.sock).unwrap();
        }
        s
    };
    stream_gib_per_s(bytes, accept, connect)
}

fn all_reduce_busbw_gib_per_s(n: usize, elems: usize) -> f64 {
    let group = loopback_group("bench", n).unwrap();
    let times = on_group(group, |c| {
        let mut buf = vec![1.0f32; elems];
        c.all_reduce_sum(&mut buf).unwrap(); // warm-up
        let mut best = f64::INFINITY;
        for _ in 0..REPEATS {
            c.barrier().unwrap();
            let t = Instant::now();
            c.all_reduce_sum(&mut buf).unwrap();
            best = best.min(t.elapsed().as_secs_f64());
        }
        best
    });
    let t = times.into_iter().fold(0.0, f64::max);
    let bytes = (elems * 4) as f64;
    2.0 * (n - 1) as f64 / n as f64 * bytes / t / f64::from(1 << 30)
}

fn main() {
    let raw = (0..3)
        .map(|_| raw_tcp_gib_per_s(1 << 30))
        .fold(0.0, f64::max);
    let mut rows = Vec::new();
    for n in [2, 3, 4] {
        for mib in [1usize, 16, 64] {
            let elems = (mib << 20) / 4;
            let busbw = all_reduce_busbw_gib_per_s(n, elems);
            rows.push(format!(
                "{{\"group\": {n}, \"mib\": {mib}, \"busbw_gib_per_s\": {busbw:.3}, \"of_raw\": {:.3}}}",
                busbw / raw
            ));
        }
    }
    // Forming a group: the links a ring all-reduce and a barrier make on
    // first use (each one connection and its authenticated handshake:
    // nonces both ways, HMAC-SHA256 tags), best of five.
    let joins: Vec<String> = [2usize, 4, 8]
        .iter()
        .map(|&n| {
            let best = (0..5)
                .map(|_| {
                    let t = Instant::now();
                    let group = loopback_group("bench-join", n).unwrap();
                    on_group(group, |c| {
                        let mut x = vec![0f32; 1 << 16];
                        c.all_reduce_sum(&mut x).unwrap();
                        c.barrier().unwrap();
                    });
                    t.elapsed().as_secs_f64()
                })
                .fold(f64::INFINITY, f64::min);
            format!("{{\"group\": {n}, \"form_ms\": {:.3}}}", best * 1e3)
        })
        .collect();
    // What encrypting the ring's links would cost: one TLS 1.3 stream
    // over the same loopback, per cipher suite, beside raw TCP.
    use rustls::crypto::ring::cipher_suite as cs;
    let tls: Vec<String> = [
        ("TLS13_AES_128_GCM_SHA256", cs::TLS13_AES_128_GCM_SHA256),
        ("TLS13_AES_256_GCM_SHA384", cs::TLS13_AES_256_GCM_SHA384),
        (
            "TLS13_CHACHA20_POLY1305_SHA256",
            cs::TLS13_CHACHA20_POLY1305_SHA256,
        ),
    ]
    .into_iter()
    .map(|(name, suite)| {
        let rate = (0..3)
            .map(|_| tls_gib_per_s(1 << 30, suite))
            .fold(0.0, f64::max);
        format!(
            "{{\"suite\": \"{name}\", \"gib_per_s\": {rate:.3}, \"of_raw\": {:.3}}}",
            rate / raw
        )
    })
    .collect();
    println!(
        "{{\n  \"threads\": {},\n  \"raw_tcp_loopback_gib_per_s\": {raw:.3},\n  \"tls_loopback\": [\n    {}\n  ],\n  \"all_reduce\": [\n    {}\n  ],\n  \"group_formation\": [\n    {}\n  ]\n}}",
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        tls.join(",\n    "),
        rows.join(",\n    "),
        joins.join(",\n    ")
    );
}
