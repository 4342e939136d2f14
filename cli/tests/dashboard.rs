//! The dashboard in a real browser: headless Chromium, driven over
//! WebDriver by chromedriver, opens the coordinator's dashboard with the
//! client token, sees a job appear in the list, follows its page while
//! the loss curve gains points and the job reaches SUCCEEDED, and keeps a
//! screenshot of the job page (`$STRATA_ARTIFACTS/dashboard-job.png`).
//!
//! Without chromedriver the test says it was skipped, unless
//! `STRATA_REQUIRE_BROWSER=1` (CI, which installs Debian's `chromium` and
//! `chromium-driver`) makes that a failure.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::*;
use serde_json::{Value, json};
use strata_coordinator::Coordinator;
use strata_proto::v1 as pb;

/// One HTTP/1.1 call with a JSON body (or none): the status and the body
/// as JSON. The body is read to its `Content-Length` (chromedriver keeps
/// connections open), or to the last chunk.
fn call(addr: SocketAddr, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let body = body.map(Value::to_string).unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut raw = Vec::new();
    let mut buf = [0u8; 65536];
    let complete = |raw: &[u8]| -> Option<String> {
        let end = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
        let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
        let rest = &raw[end + 4..];
        if head.contains("transfer-encoding: chunked") {
            rest.ends_with(b"0\r\n\r\n")
                .then(|| dechunk(&String::from_utf8_lossy(rest)))
        } else {
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map_or(0, |v| v.trim().parse().unwrap());
            (rest.len() >= len).then(|| String::from_utf8_lossy(&rest[..len]).into_owned())
        }
    };
    let text = loop {
        if let Some(t) = complete(&raw) {
            break t;
        }
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "{method} {path}: the connection closed early");
        raw.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&raw[..12]).into_owned();
    let code = head.split(' ').nth(1).unwrap().parse().unwrap();
    let v = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (code, v)
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((len, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(len.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        s = &rest[n + 2..];
    }
    out
}

/// chromedriver on a free loopback port, and a browser session in it.
struct Browser {
    driver: Child,
    addr: SocketAddr,
    session: String,
}

impl Browser {
    fn start() -> Option<Browser> {
        let Some(chromedriver) = ["chromedriver", "/usr/bin/chromedriver"]
            .into_iter()
            .find(|c| Command::new(c).arg("--version").output().is_ok())
        else {
            assert!(
                std::env::var("STRATA_REQUIRE_BROWSER").as_deref() != Ok("1"),
                "chromedriver not found, and STRATA_REQUIRE_BROWSER=1 (install Debian's chromium and chromium-driver)"
            );
            eprintln!(
                "SKIPPED: the dashboard's browser test: no chromedriver (install Debian's chromium and chromium-driver)"
            );
            return None;
        };
        let port = free_port();
        let driver = Command::new(chromedriver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let start = Instant::now();
        while !TcpStream::connect(addr).is_ok_and(|_| call(addr, "GET", "/status", None).0 == 200) {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "chromedriver never answered"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let (code, v) = call(
            addr,
            "POST",
            "/session",
            Some(&json!({ "capabilities": { "alwaysMatch": {
                "browserName": "chrome",
                "goog:chromeOptions": {
                    "binary": chromium(),
                    "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                             "--disable-dev-shm-usage", "--window-size=1400,1900"],
                },
            }}})),
        );
        assert_eq!(code, 200, "new browser session: {v}");
        let session = v["value"]["sessionId"].as_str().unwrap().to_string();
        Some(Browser {
            driver,
            addr,
            session,
        })
    }

    fn cmd(&self, method: &str, what: &str, body: Option<Value>) -> Value {
        let path = format!("/session/{}/{what}", self.session);
        let (code, v) = call(self.addr, method, &path, body.as_ref());
        assert_eq!(code, 200, "{method} {what}: {v}");
        v["value"].clone()
    }

    fn open(&self, url: &str) {
        self.cmd("POST", "url", Some(json!({ "url": url })));
    }

    /// Runs `script` (a function body) in the page; its return value.
    fn eval(&self, script: &str) -> Value {
        self.cmd(
            "POST",
            "execute/sync",
            Some(json!({ "script": script, "args": [] })),
        )
    }

    fn screenshot(&self) -> Vec<u8> {
        let b64 = self.cmd("GET", "screenshot", None);
        base64::engine::general_purpose::STANDARD
            .decode(b64.as_str().unwrap())
            .unwrap()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = call(
            self.addr,
            "DELETE",
            &format!("/session/{}", self.session),
            None,
        );
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// Debian's Chromium, or whatever `chromium` is on the path.
fn chromium() -> String {
    for c in ["/usr/bin/chromium", "/usr/lib/chromium/chromium"] {
        if std::path::Path::new(c).exists() {
            return c.into();
        }
    }
    "chromium".into()
}

/// Where the screenshot goes: `$STRATA_ARTIFACTS`, or `artifacts/` at
/// the workspace's root.
fn artifacts() -> PathBuf {
    let dir = std::env::var_os("STRATA_ARTIFACTS").map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../artifacts"),
        PathBuf::from,
    );
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[tokio::test(flavor = "multi_thread")]
async fn a_browser_follows_a_job_on_the_dashboard_until_it_succeeds() {
    let Some(browser) = Browser::start() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let held = decompose_holding_out(dir.path(), "held", &sotu_40(), 0.2).await;
    let mut cfg = config(&dir.path().join("state"), 2, Some("open sesame"));
    cfg.http_listen = Some("127.0.0.1:0".parse().unwrap());
    let c = Coordinator::start(cfg).await.unwrap();
    let http = c.http_addr.unwrap();
    let mut cl = client(&c).await;

    // Without the token the browser sees the refusal; `?token=` (escaped
    // as a browser would) gives it the cookie, and it is sent on without
    // the token in the address.
    browser.open(&format!("http://{http}/"));
    let text = browser.eval("return document.body.innerText");
    assert!(
        text.as_str().unwrap().contains("wrong or missing token"),
        "{text}"
    );
    browser.open(&format!("http://{http}/?token=open%20sesame"));
    let at = browser.eval("return location.href");
    assert_eq!(at, json!(format!("http://{http}/")));

    // A two-stage pipeline with held-out evaluation and a warmup: the job
    // appears in the list.
    let spec = format!(
        "{}[eval]\nevery_steps = 20\ntokens = 1040\n",
        recipe3d(&held, 160, (1, 2, 1), true)
            .replace("kind = \"constant\"", "kind = \"wsd\"\nwarmup_tokens = 5120\ndecay_tokens = 10240\ndecay_shape = \"linear\"\nfinal_lr_fraction = 0.1")
            .replace("name = \"layout-1-2-1\"", "name = \"dashboard\"")
    );
    let id = cl
        .submit_job(pb::SubmitJobRequest {
            spec_toml: spec,
            default_name: "t".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .job_id;
    let link = format!("return document.querySelector('a[href=\"/jobs/{id}\"]') !== null");
    let start = Instant::now();
    while browser.eval(&link) != json!(true) {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "job {id} never appeared in the list"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // Its page: the loss curve gains points while it runs, then the job
    // succeeds and the curve holds every step, each once.
    browser.open(&format!("http://{http}/jobs/{id}"));
    let probe = "const s = document.getElementById('job-state');
        const c = document.getElementById('chart-loss');
        return [s ? s.textContent : '', c && c.dataset.points ? +c.dataset.points : 0,
                document.querySelectorAll('#ranks .rank-split').length];";
    let mut seen: Vec<(String, u64)> = Vec::new();
    // The most ranks whose own last step the page showed at once.
    let mut split_ranks = 0;
    let start = Instant::now();
    loop {
        let v = browser.eval(probe);
        let now = (
            v[0].as_str().unwrap_or("").to_string(),
            v[1].as_u64().unwrap_or(0),
        );
        if seen.last() != Some(&now) {
            seen.push(now.clone());
        }
        split_ranks = split_ranks.max(v[2].as_u64().unwrap_or(0));
        if now.0 == "succeeded" {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(240),
            "the page never showed the job succeeded: {seen:?}"
        );
        std::thread::sleep(Duration::from_millis(150));
    }
    eprintln!(
        "the page's (state, loss points) changed {} times: first {:?}, last {:?}",
        seen.len(),
        seen.first(),
        seen.last()
    );
    let growing: Vec<u64> = seen
        .iter()
        .filter(|(s, _)| s == "running")
        .map(|(_, n)| *n)
        .collect();
    assert!(
        growing.windows(2).any(|w| w[1] > w[0]) && growing.iter().any(|&n| n > 0),
        "the loss curve never gained points while the job ran: {seen:?}"
    );
    // Both ranks' own step splits (from their heartbeats) were shown.
    assert_eq!(split_ranks, 2, "{seen:?}");
    let job = cl
        .get_job(pb::GetJobRequest { job_id: id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(job.state(), pb::JobState::Succeeded);
    // Every step once: history and live steps meet without a gap or a
    // repeat.
    let points = browser.eval("return +document.getElementById('chart-loss').dataset.points");
    assert_eq!(points, json!(160), "{seen:?}");
    let evals = browser.eval(
        "return [...document.querySelectorAll('#chart-loss .legend span')].map(s => s.textContent)",
    );
    assert!(evals.to_string().contains("held-out loss"), "{evals}");
    let attempts = browser.eval("return document.getElementById('attempts').innerText");
    assert!(
        attempts.as_str().unwrap().contains("succeeded"),
        "{attempts}"
    );
    // Let the last details arrive, then keep the picture.
    std::thread::sleep(Duration::from_millis(500));
    let png = browser.screenshot();
    assert!(png.starts_with(b"\x89PNG"), "not a PNG");
    let path = artifacts().join("dashboard-job.png");
    std::fs::write(&path, &png).unwrap();
    eprintln!("screenshot of the job page: {}", path.display());

    // The list shows it succeeded.
    browser.open(&format!("http://{http}/"));
    let start = Instant::now();
    loop {
        let row = browser.eval(&format!(
            "const a = document.querySelector('a[href=\"/jobs/{id}\"]'); return a ? a.closest('tr').innerText : ''"
        ));
        if row.as_str().unwrap().contains("succeeded") {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "{row}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let png = browser.screenshot();
    std::fs::write(artifacts().join("dashboard-jobs.png"), &png).unwrap();
    drop(browser);
    c.stop().await;
}

/// What users and workers write (a cancel's reason, a recipe's comments,
/// an attempt's cause) reaches the pages as text: crafted as
/// HTML and script, nothing of it runs and no element is made of it.
#[tokio::test(flavor = "multi_thread")]
async fn crafted_html_in_reasons_and_recipes_never_runs() {
    let Some(browser) = Browser::start() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path()).await;
    let mut cfg = config(&dir.path().join("state"), 2, Some("t"));
    cfg.http_listen = Some("127.0.0.1:0".parse().unwrap());
    let c = Coordinator::start(cfg).await.unwrap();
    let http = c.http_addr.unwrap();
    let mut cl = client(&c).await;
    let payload = |n: u32| {
        format!(
            "<img src=x onerror=\"window.__pwned={n}\"><script>window.__pwned={n}</script><svg onload=\"window.__pwned={n}\"></svg>"
        )
    };
    let spec = format!("# {}\n{}", payload(1), recipe(&data, 100_000, 2));
    let id = cl
        .submit_job(pb::SubmitJobRequest {
            spec_toml: spec,
            default_name: "t".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .job_id;
    cl.cancel_job(pb::CancelJobRequest {
        job_id: id.clone(),
        reason: payload(2),
    })
    .await
    .unwrap();
    browser.open(&format!("http://{http}/?token=t"));
    for page in ["/".to_string(), format!("/jobs/{id}")] {
        browser.open(&format!("http://{http}{page}"));
        // The page has shown the job, the reason and (on its own page)
        // the recipe, as text.
        let start = Instant::now();
        loop {
            let text = browser.eval("return document.body.innerText");
            let text = text.as_str().unwrap_or("");
            let shown = if page == "/" {
                text.contains(id.as_str())
            } else {
                text.contains("window.__pwned=1") && text.contains("window.__pwned=2")
            };
            if shown {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "{page} never showed the crafted text: {text}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        std::thread::sleep(Duration::from_millis(300));
        let ran = browser.eval(
            "return [window.__pwned === undefined, document.querySelectorAll('img[src=x], script:not([src]), svg[onload]').length]",
        );
        assert_eq!(
            ran,
            json!([true, 0]),
            "{page}: crafted markup became elements or ran"
        );
    }
    drop(browser);
    c.stop().await;
}
