//! Every caller needs the client token, on loopback too: the user who
//! started the coordinator finds it without flags, another Unix user of
//! the same machine is refused.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::free_port;

/// `strata list` against `url`, with `HOME` at `home`, as `uid` when given
/// (through `setpriv`, which only root may use).
fn list(strata: &Path, url: &str, home: &Path, uid: Option<u32>) -> Output {
    let mut cmd = match uid {
        Some(uid) => {
            let mut c = Command::new("setpriv");
            c.args([
                format!("--reuid={uid}"),
                format!("--regid={uid}"),
                "--clear-groups".into(),
            ])
            .arg(strata);
            c
        }
        None => Command::new(strata),
    };
    cmd.args(["list", "--coordinator", url])
        .env("HOME", home)
        .env_remove("XDG_CONFIG_HOME")
        .env_remove("STRATA_TOKEN")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

#[test]
fn the_owner_finds_the_token_and_another_user_is_refused() {
    // Only root can run a command as another user, with util-linux's
    // setpriv.
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    let setpriv = Command::new("setpriv")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    let dir = tempfile::tempdir().unwrap();
    // A copy of the binary any user may run (the build folder may sit in
    // root's home).
    let strata = dir.path().join("strata");
    std::fs::copy(env!("CARGO_BIN_EXE_strata"), &strata).unwrap();
    std::fs::set_permissions(&strata, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let home = dir.path().join("home");
    std::fs::create_dir(&home).unwrap();
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let mut coordinator = Command::new(&strata)
        .args(["coordinator", "--listen", &format!("127.0.0.1:{port}")])
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .args(["--slots", "1"])
        .env("HOME", &home)
        .env_remove("XDG_CONFIG_HOME")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let published = home.join(".config/strata/tokens").join(port.to_string());
    let begun = Instant::now();
    while !published.exists() {
        assert!(
            begun.elapsed() < Duration::from_secs(30),
            "no token left for the CLI"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&published), 0o600);
    assert_eq!(mode(published.parent().unwrap()), 0o700);
    // The owner: no flag, no variable.
    let own = list(&strata, &url, &home, None);
    assert!(
        own.status.success(),
        "{}",
        String::from_utf8_lossy(&own.stderr)
    );
    // The owner without the published token: refused (the coordinator on
    // loopback asks everyone).
    let elsewhere = dir.path().join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    let anon = list(&strata, &url, &elsewhere, None);
    assert_eq!(anon.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&anon.stderr).contains("wrong or missing bearer token"),
        "{}",
        String::from_utf8_lossy(&anon.stderr)
    );
    if root && setpriv {
        // Another Unix user (nobody), even pointed at the owner's home.
        let other = list(&strata, &url, &home, Some(65534));
        assert_eq!(
            other.status.code(),
            Some(2),
            "{}",
            String::from_utf8_lossy(&other.stderr)
        );
        assert!(
            String::from_utf8_lossy(&other.stderr).contains("wrong or missing bearer token"),
            "{}",
            String::from_utf8_lossy(&other.stderr)
        );
    } else {
        eprintln!(
            "skipped the second Unix user: running a command as another user needs root and setpriv (root: {root}, setpriv: {setpriv})"
        );
    }
    let _ = Command::new("kill")
        .args(["-TERM", &coordinator.id().to_string()])
        .status();
    let _ = coordinator.wait();
    // It takes its token with it.
    assert!(!published.exists());
}
