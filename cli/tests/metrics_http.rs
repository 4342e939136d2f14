//! The coordinator's `/metrics`: Prometheus' text format, parsed by a
//! Prometheus parser, its numbers those `GetMetrics` gives for the same
//! step; the bearer token asked for like gRPC's.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use common::*;
use strata_coordinator::Coordinator;
use strata_proto::v1 as pb;

/// GET `path` with extra header lines: the status code and the head.
fn raw_http(addr: SocketAddr, path: &str, extra: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\n{extra}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let head = raw.split_once("\r\n\r\n").map_or(raw.as_str(), |h| h.0);
    let code = head.split(' ').nth(1).unwrap().parse().unwrap();
    (code, format!("{head}\r\n"))
}

/// Runs the `strata` binary to its end.
fn strata_cli(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_strata"))
        .args(args)
        .output()
        .unwrap()
}

/// A gauge's value for a job (`job` label), or without labels.
fn value(scrape: &prometheus_parse::Scrape, name: &str, job: Option<&str>) -> Option<f64> {
    scrape
        .samples
        .iter()
        .find(|s| s.metric == name && job.is_none_or(|j| s.labels.get("job") == Some(j)))
        .map(|s| match s.value {
            prometheus_parse::Value::Gauge(v) | prometheus_parse::Value::Untyped(v) => v,
            ref other => panic!("{name}: {other:?}"),
        })
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_match_the_job_history_and_need_the_token() {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path()).await;

    // With a client token, /metrics asks for it as gRPC does.
    let mut cfg = config(&dir.path().join("guarded"), 2, Some("sesame"));
    cfg.http_listen = Some("127.0.0.1:0".parse().unwrap());
    let guarded = Coordinator::start(cfg).await.unwrap();
    let at = guarded.http_addr.unwrap();
    assert_eq!(get_http(at, "/metrics", None).0, 401);
    assert_eq!(get_http(at, "/metrics", Some("nope")).0, 401);
    assert_eq!(get_http(at, "/metrics", Some("sesame")).0, 200);
    // A web page reaching loopback through DNS rebinding names its own
    // host: refused whatever it carries.
    let mut s = TcpStream::connect(at).unwrap();
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: rebind.example:{}\r\nAuthorization: Bearer sesame\r\nConnection: close\r\n\r\n",
        at.port()
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    assert!(raw.starts_with("HTTP/1.1 421"), "{raw}");
    // The dashboard's pages, assets and API ask for it too.
    for path in [
        "/",
        "/jobs/x",
        "/assets/dashboard.js",
        "/api/overview",
        "/api/jobs/x/events",
    ] {
        assert_eq!(get_http(at, path, None).0, 401, "{path}");
        assert_eq!(get_http(at, path, Some("nope")).0, 401, "{path}");
    }
    let (code, body) = get_http(at, "/api/overview", Some("sesame"));
    assert_eq!(code, 200, "{body}");
    let overview: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(overview["slots"], 2, "{body}");
    // `?token=` gives a browser the cookie and sends it on without the
    // token; a wrong one gets nothing; the cookie then opens every path.
    let (code, head) = raw_http(at, "/jobs/x?token=sesame&a=1", "");
    assert_eq!(code, 303, "{head}");
    let head = head.to_ascii_lowercase();
    assert!(head.contains("location: /jobs/x?a=1\r\n"), "{head}");
    assert!(
        head.contains("set-cookie: strata_token=736573616d65; httponly; samesite=strict; path=/"),
        "{head}"
    );
    assert_eq!(raw_http(at, "/?token=nope", "").0, 401);
    assert_eq!(
        raw_http(
            at,
            "/api/overview",
            "Cookie: a=b; strata_token=736573616d65\r\n"
        )
        .0,
        200
    );
    assert_eq!(
        raw_http(at, "/metrics", "Cookie: strata_token=sesame\r\n").0,
        401
    );
    guarded.stop().await;

    let mut cfg = config(&dir.path().join("state"), 2, None);
    cfg.http_listen = Some("127.0.0.1:0".parse().unwrap());
    let c = Coordinator::start(cfg).await.unwrap();
    let http = c.http_addr.unwrap();
    let mut cl = client(&c).await;

    // With each device's peak given, MFU is exported.
    let spec = format!("{}[device]\npeak_tflops = 0.05\n", recipe(&data, 400, 2));
    let id = submit(&mut cl, spec.clone()).await.unwrap();
    let j = until(&mut cl, &id, 120, |j| j.steps_done >= 5).await;
    assert_eq!(j.state(), pb::JobState::Running);
    // Every rank's own last step, from its heartbeats (one a second).
    let started = std::time::Instant::now();
    let ranks = loop {
        let (code, body) = get_http(http, &format!("/api/jobs/{id}"), None);
        assert_eq!(code, 200, "{body}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        // The ranks summed up, and their first page.
        assert_eq!(v["ranks_summary"]["ranks"], 2, "{body}");
        let ranks = v["ranks"]["ranks"].as_array().unwrap().clone();
        if ranks.len() == 2 && ranks.iter().all(|r| !r["last_step"].is_null()) {
            break ranks;
        }
        assert!(started.elapsed().as_secs() < 20, "{body}");
        std::thread::sleep(Duration::from_millis(200));
    };
    for r in &ranks {
        let s = &r["last_step"];
        assert!(s["step"].as_u64().unwrap() >= 1, "{r}");
        let phases: f64 = [
            "data_s",
            "forward_s",
            "backward_s",
            "all_reduce_s",
            "optimizer_s",
        ]
        .iter()
        .map(|p| s[p].as_f64().unwrap())
        .sum();
        let wall = s["wall_s"].as_f64().unwrap();
        assert!(phases > 0.0 && phases <= wall * 1.0001, "{r}");
    }
    let (code, body) = get_http(http, "/metrics", None);
    assert_eq!(code, 200, "{body}");
    let lines = body.lines().map(|l| Ok(l.to_string()));
    let scrape = prometheus_parse::Scrape::parse(lines).unwrap();
    let running = scrape
        .samples
        .iter()
        .find(|s| s.metric == "strata_jobs" && s.labels.get("state") == Some("running"))
        .unwrap();
    assert!(
        matches!(running.value, prometheus_parse::Value::Gauge(v) if v == 1.0),
        "{body}"
    );
    assert_eq!(value(&scrape, "strata_slots", None), Some(2.0));
    assert_eq!(value(&scrape, "strata_slots_leased", None), Some(2.0));
    assert_eq!(value(&scrape, "strata_queue_length", None), Some(0.0));
    // Each rank's own step, bounded whatever the world: the slowest
    // ranks (both, here) and quantiles over all of them.
    for rank in ["0", "1"] {
        let s = scrape
            .samples
            .iter()
            .find(|s| {
                s.metric == "strata_job_slowest_rank_step_seconds"
                    && s.labels.get("job") == Some(&id)
                    && s.labels.get("rank") == Some(rank)
            })
            .unwrap_or_else(|| panic!("rank {rank}: {body}"));
        assert!(
            matches!(s.value, prometheus_parse::Value::Gauge(v) if v > 0.0),
            "{body}"
        );
    }
    for q in ["0.5", "0.9", "0.99", "1"] {
        let s = scrape
            .samples
            .iter()
            .find(|s| {
                s.metric == "strata_job_rank_step_seconds"
                    && s.labels.get("job") == Some(&id)
                    && s.labels.get("quantile") == Some(q)
            })
            .unwrap_or_else(|| panic!("quantile {q}: {body}"));
        assert!(
            matches!(s.value, prometheus_parse::Value::Gauge(v) if v > 0.0),
            "{body}"
        );
    }
    // The job's numbers are its recorded step's, exactly.
    let step = value(&scrape, "strata_job_step", Some(&id)).unwrap() as u64;
    assert!(step >= 1, "{body}");
    let history = cl
        .get_metrics(pb::GetMetricsRequest {
            job_id: id.clone(),
            from_step: step,
            limit: 1,
        })
        .await
        .unwrap()
        .into_inner()
        .steps;
    let s = &history[0];
    assert_eq!(s.step, step);
    // And what `strata metrics --json` prints for that step.
    let out = strata_cli(&[
        "metrics",
        &id,
        "--json",
        "--coordinator",
        &format!("http://{}", c.addr),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let row = printed
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["step"] == step)
        .unwrap()
        .clone();
    for (metric, field) in [
        ("strata_job_loss", "loss"),
        ("strata_job_lr", "lr"),
        ("strata_job_tokens_per_second", "tokens_per_s"),
    ] {
        // The same number, to the last bit or one past it: serde_json's
        // default float parsing (here, of the CLI's output) is not
        // always correctly rounded; GetMetrics below is compared exactly.
        let (a, b) = (
            value(&scrape, metric, Some(&id)).unwrap(),
            row[field].as_f64().unwrap(),
        );
        assert!(
            (a - b).abs() <= f64::EPSILON * a.abs().max(b.abs()),
            "{metric} vs strata metrics --json's {field}: {a} and {b}: {row}"
        );
    }
    assert_eq!(value(&scrape, "strata_job_loss", Some(&id)), Some(s.loss));
    assert_eq!(value(&scrape, "strata_job_lr", Some(&id)), Some(s.lr));
    assert_eq!(
        value(&scrape, "strata_job_tokens_per_second", Some(&id)),
        Some(s.tokens_per_s)
    );
    assert_eq!(
        value(&scrape, "strata_job_steps_total", Some(&id)),
        Some(400.0)
    );
    assert_eq!(value(&scrape, "strata_job_attempts", Some(&id)), Some(1.0));
    let per_token =
        strata_recipe::plan::Plan::new(&strata_recipe::Recipe::from_toml_str(&spec, "t").unwrap())
            .flops_per_token;
    assert_eq!(
        value(&scrape, "strata_job_model_flops_per_second", Some(&id)),
        Some(per_token * s.tokens_per_s)
    );
    assert_eq!(s.peak_flops, Some(0.05e12 * 2.0));
    assert_eq!(
        value(&scrape, "strata_job_mfu", Some(&id)),
        Some(per_token * s.tokens_per_s / (0.05e12 * 2.0))
    );
    let t = s.times.unwrap();
    let sum = t.data_s + t.forward_s + t.backward_s + t.all_reduce_s + t.optimizer_s;
    let got = value(&scrape, "strata_job_step_seconds", Some(&id)).unwrap();
    assert!((got - sum).abs() < 1e-9 * sum.max(1.0), "{got} vs {sum}");
    // Heartbeats arrived and were measured.
    let beats = scrape
        .samples
        .iter()
        .find(|s| s.metric == "strata_heartbeat_interval_seconds_count")
        .map(|s| match s.value {
            prometheus_parse::Value::Untyped(v) | prometheus_parse::Value::Counter(v) => v,
            ref other => panic!("{other:?}"),
        });
    assert!(
        body.contains("strata_heartbeat_interval_seconds_bucket"),
        "{body}"
    );
    eprintln!("heartbeats measured: {beats:?}");
    // `strata top --once` shows the running job with its progress.
    let out = strata_cli(&[
        "top",
        "--once",
        "--coordinator",
        &format!("http://{}", c.addr),
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let row = text.lines().find(|l| l.contains(&id)).unwrap_or_default();
    assert!(row.contains("running") && row.contains("/400"), "{text}");
    assert!(text.contains("step time"), "{text}");
    // Without a terminal and without --once it says why.
    let out = strata_cli(&["top", "--coordinator", &format!("http://{}", c.addr)]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--once"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    cl.cancel_job(pb::CancelJobRequest {
        job_id: id.clone(),
        reason: String::new(),
    })
    .await
    .unwrap();
    c.stop().await;
}

/// A coordinator whose HTTP side listens off loopback serves it over TLS
/// (with a certificate from the CA it made: none was given) and asks for
/// the client token on every path.
#[test]
fn off_loopback_the_dashboard_and_metrics_refuse_calls_without_the_token() {
    let dir = tempfile::tempdir().unwrap();
    let (grpc, http) = (free_port(), free_port());
    let mut coordinator = std::process::Command::new(env!("CARGO_BIN_EXE_strata"))
        .args(["coordinator", "--listen", &format!("127.0.0.1:{grpc}")])
        .args(["--http-listen", &format!("0.0.0.0:{http}")])
        .arg("--state-dir")
        .arg(dir.path())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let at: SocketAddr = format!("127.0.0.1:{http}").parse().unwrap();
    let started = std::time::Instant::now();
    while TcpStream::connect(at).is_err() {
        assert!(started.elapsed().as_secs() < 30, "no HTTP at {at}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let token = std::fs::read_to_string(dir.path().join("token")).unwrap();
    let token = token.trim();
    let ca = std::fs::read_to_string(dir.path().join("tls/ca.pem")).unwrap();
    for path in ["/metrics", "/", "/api/overview"] {
        assert_eq!(get_https(at, path, None, &ca).unwrap().0, 401, "{path}");
        assert_eq!(
            get_https(at, path, Some(token), &ca).unwrap().0,
            200,
            "{path}"
        );
    }
    let _ = coordinator.kill();
    let _ = coordinator.wait();
}
