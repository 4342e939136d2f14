//! TLS: a coordinator serving TLS (on loopback when given `--tls`; off
//! loopback it always does) is reached by the clients and workers that
//! trust its CA; a client without the CA, with another CA, or speaking
//! plain text is refused, on gRPC and on HTTP.

mod common;

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use strata_coordinator::{Coordinator, tls};
use strata_proto::v1 as pb;

/// `strata` with `HOME` at `home` and none of the client's environment.
fn strata(home: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_strata"));
    c.env("HOME", home)
        .env_remove("XDG_CONFIG_HOME")
        .env_remove("STRATA_TOKEN")
        .env_remove("STRATA_CA")
        .env_remove("STRATA_COORDINATOR")
        .stdin(Stdio::null());
    c
}

#[tokio::test(flavor = "multi_thread")]
async fn clients_and_workers_with_the_ca_get_in_and_others_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path()).await;
    let state = dir.path().join("state");
    let home = dir.path().join("home");
    let other_home = dir.path().join("other-home");
    std::fs::create_dir_all(&home).unwrap();
    std::fs::create_dir_all(&other_home).unwrap();
    let (port, http) = (free_port(), free_port());
    let mut coordinator = strata(&home)
        .args(["coordinator", "--tls", "--slots", "2"])
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--http-listen", &format!("127.0.0.1:{http}")])
        .arg("--state-dir")
        .arg(&state)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("coordinator.log")).unwrap())
        .spawn()
        .unwrap();
    let url = format!("https://127.0.0.1:{port}");
    // Trusting the CA the coordinator made in its state folder.
    let mut cl = connect(&url, &state).await;
    let token = std::fs::read_to_string(state.join("token")).unwrap();
    let token = token.trim();
    let ca = std::fs::read_to_string(state.join("tls/ca.pem")).unwrap();

    // A job trains to its end: its workers reached the coordinator over
    // TLS, trusting the CA they were handed.
    let id = submit(&mut cl, recipe(&data, 4, 1)).await.unwrap();
    let job = ended(&mut cl, &id, 180).await;
    assert_eq!(job.state(), pb::JobState::Succeeded, "{job:?}");

    // The owner's CLI finds the token and the CA beside it, without flags.
    let out = strata(&home)
        .args(["list", "--coordinator", &url])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{said}");
    assert!(String::from_utf8_lossy(&out.stdout).contains(&id));

    // Without the CA: refused, saying what is missing.
    let token_file = state.join("token");
    let out = strata(&other_home)
        .args(["list", "--coordinator", &url, "--token-file"])
        .arg(&token_file)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{said}");
    assert!(said.contains("its CA is needed to trust it"), "{said}");

    // With another coordinator's CA: the handshake fails.
    let names = tls::names(&[], "localhost", None);
    let other = tls::self_signed(&dir.path().join("other-state"), &names).unwrap();
    let other_ca = dir.path().join("other-ca.pem");
    std::fs::write(&other_ca, &other.ca_pem).unwrap();
    let out = strata(&other_home)
        .args(["list", "--coordinator", &url, "--token-file"])
        .arg(&token_file)
        .arg("--ca")
        .arg(&other_ca)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{said}");
    assert!(said.contains("cannot reach the coordinator"), "{said}");
    assert!(
        client_tls(&url, Some(token), Some(&other.ca_pem))
            .await
            .is_none()
    );

    // Plain text on the TLS port: no call goes through.
    let plain = format!("http://127.0.0.1:{port}");
    if let Some(mut c) = client_at(&plain, Some(token)).await {
        let r = c.list_jobs(pb::ListJobsRequest::default()).await;
        assert!(r.is_err(), "a plain-text call was answered");
    }

    // HTTP: the same CA, the same refusals.
    let at = format!("127.0.0.1:{http}").parse().unwrap();
    let (code, body) = get_https(at, "/metrics", Some(token), &ca).unwrap();
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("strata_"), "{body}");
    assert_eq!(get_https(at, "/metrics", None, &ca).unwrap().0, 401);
    let e = get_https(at, "/metrics", Some(token), &other.ca_pem).unwrap_err();
    assert!(e.to_string().contains("UnknownIssuer"), "{e}");
    let mut s = std::net::TcpStream::connect(at).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    assert!(
        !answer.starts_with(b"HTTP/"),
        "plain HTTP was answered: {}",
        String::from_utf8_lossy(&answer)
    );

    let _ = coordinator.kill();
    let _ = coordinator.wait();
}

/// Plain text is for loopback only: a coordinator told to listen on every
/// address without TLS does not start, and says why.
#[tokio::test(flavor = "multi_thread")]
async fn plain_text_off_loopback_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), 1, Some("t"));
    cfg.listen = "0.0.0.0:0".parse().unwrap();
    let e = Coordinator::start(cfg).await.err().unwrap().to_string();
    assert!(e.starts_with("0.0.0.0:0 is not a loopback address"), "{e}");
    let mut cfg = config(dir.path(), 1, Some("t"));
    cfg.http_listen = Some("0.0.0.0:0".parse().unwrap());
    assert!(Coordinator::start(cfg).await.is_err());
}
