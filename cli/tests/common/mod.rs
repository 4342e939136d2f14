//! Helpers shared by the coordinator tests: datasets cut from the test
//! corpora, recipes, an in-process coordinator's config, and calls.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use strata_coordinator::{Coordinator, CoordinatorConfig, Inventory};
use strata_dataplane::corpus::{Quiet, decompose_corpus};
use strata_dataplane::decompose::{Buckets, SplitLong};
use strata_dataplane::manifest::{Layout, TokenizerInfo};
use strata_dataplane::store::Location;
use strata_dataplane::tokenize::TokenizerKind;
use strata_dataplane::writer::{DatasetWriter, WriterOptions};
use strata_proto::auth::{Bearer, WithBearer};
use strata_proto::v1 as pb;
use strata_proto::v1::job_service_client::JobServiceClient;
use tonic::transport::Channel;

/// A job client with the coordinator's token (or none, for a coordinator
/// made without one in the test's process).
pub type Cl = JobServiceClient<WithBearer<Channel>>;

pub async fn client_at(url: &str, token: Option<&str>) -> Option<Cl> {
    client_tls(url, token, None).await
}

/// [`client_at`] trusting the CA `ca` (PEM) for an https URL.
pub async fn client_tls(url: &str, token: Option<&str>, ca: Option<&str>) -> Option<Cl> {
    let channel = strata_proto::auth::endpoint(url, ca)
        .ok()?
        .connect()
        .await
        .ok()?;
    Some(JobServiceClient::with_interceptor(
        channel,
        Bearer::new(token).unwrap(),
    ))
}

/// A small dataset (a few State of the Union addresses) in buckets of
/// 16..64 tokens.
pub async fn dataset(dir: &Path) -> String {
    let corpus = strata_tests::corpora().join("sotu");
    let inputs: Vec<PathBuf> = [
        "1790_george_washington_n.txt",
        "1791_george_washington_n.txt",
        "1863_abraham_lincoln_r.txt",
    ]
    .iter()
    .map(|f| corpus.join(f))
    .collect();
    decompose(dir, "dataset", &inputs).await
}

/// The first 40 State of the Union addresses: each document's tail gives
/// the 16- and 32-token buckets a piece, enough for a curriculum that
/// draws from every bucket.
pub async fn dataset_40(dir: &Path) -> String {
    decompose(dir, "dataset-40", &sotu_40()).await
}

/// The first 40 State of the Union addresses' files.
pub fn sotu_40() -> Vec<PathBuf> {
    let corpus = strata_tests::corpora().join("sotu");
    let mut inputs: Vec<PathBuf> = std::fs::read_dir(&corpus)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "txt"))
        .collect();
    inputs.sort();
    inputs.truncate(40);
    inputs
}

pub async fn decompose(dir: &Path, name: &str, inputs: &[PathBuf]) -> String {
    decompose_holding_out(dir, name, inputs, 0.0).await
}

/// [`decompose`] with a `fraction` of the documents held out.
pub async fn decompose_holding_out(
    dir: &Path,
    name: &str,
    inputs: &[PathBuf],
    fraction: f64,
) -> String {
    let out = dir.join(name);
    let loc = Location::parse(out.to_str().unwrap(), true).unwrap();
    let tok = TokenizerKind::R50k.load();
    let mut w = DatasetWriter::create(
        loc,
        WriterOptions {
            tokenizer: TokenizerInfo::of(&tok),
            layout: Layout::Decomposed {
                split_long: SplitLong::Largest,
            },
            buckets: Buckets::new(4, 6).unwrap(),
            seed: 0,
            shard_bytes: 1 << 20,
            overwrite: false,
        },
    )
    .await
    .unwrap();
    w.hold_out(fraction).unwrap();
    decompose_corpus(inputs, tok, w, &Quiet).await.unwrap();
    format!("file://{}", out.display())
}

pub fn recipe(dataset: &str, steps: u64, dp: u32) -> String {
    format!(
        r#"name = "tiny"
seed = 3
[model]
n_layers = 1
d_model = 16
n_heads = 2
d_ffn = 32
vocab_size = 50257
max_seq_len = 64
tie_embeddings = true
[parallel]
dp = {dp}
[data]
dataset = "{dataset}"
curriculum = "uniform"
tokens_per_step = 128
total_tokens = {total}
[optimizer]
lr = 1e-3
[schedule]
kind = "constant"
[fault]
max_restarts = 0
"#,
        total = steps * 128
    )
}

pub fn config(state: &Path, slots: u32, token: Option<&str>) -> CoordinatorConfig {
    let mut cfg = CoordinatorConfig::new(
        "127.0.0.1:0".parse().unwrap(),
        state.to_path_buf(),
        Inventory::local(slots).unwrap(),
        PathBuf::from(env!("CARGO_BIN_EXE_strata")),
    );
    cfg.worker_env = vec![("RUST_LOG".into(), "info".into())];
    cfg.client_token = token.map(str::to_string);
    cfg.heartbeat_timeout = Duration::from_secs(30);
    cfg.stop_grace = Duration::from_secs(30);
    cfg
}

/// A temporary folder holding [`dataset_40`], and a coordinator of four
/// local slots keeping its state there, with a client.
pub struct Setup {
    pub dir: tempfile::TempDir,
    pub data: String,
    pub c: Coordinator,
    pub cl: Cl,
    /// The coordinator's URL, as the CLI takes it.
    pub url: String,
}

pub async fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset_40(dir.path()).await;
    let c = Coordinator::start(config(&dir.path().join("state"), 4, None))
        .await
        .unwrap();
    let cl = client(&c).await;
    let url = format!("http://{}", c.addr);
    Setup {
        dir,
        data,
        c,
        cl,
        url,
    }
}

pub async fn client(c: &Coordinator) -> Cl {
    client_at(
        &format!("http://{}", c.addr),
        c.engine.config().client_token.as_deref(),
    )
    .await
    .unwrap()
}

pub async fn submit(cl: &mut Cl, spec: String) -> Result<String, tonic::Status> {
    cl.submit_job(pb::SubmitJobRequest {
        spec_toml: spec,
        default_name: "t".into(),
        ..Default::default()
    })
    .await
    .map(|r| r.into_inner().job_id)
}

pub async fn get(cl: &mut Cl, id: &str) -> pb::Job {
    cl.get_job(pb::GetJobRequest { job_id: id.into() })
        .await
        .unwrap()
        .into_inner()
}

/// Polls until `f(job)` holds (panics after `secs`).
pub async fn until(cl: &mut Cl, id: &str, secs: u64, f: impl Fn(&pb::Job) -> bool) -> pb::Job {
    let start = Instant::now();
    loop {
        let j = get(cl, id).await;
        if f(&j) {
            return j;
        }
        assert!(
            start.elapsed() < Duration::from_secs(secs),
            "job {id} never got there: {j:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A recipe for every layout: two layers (pp up to 2), four query heads
/// and two KV heads (tp up to 2), two microbatches per replica.
pub fn recipe3d(dataset: &str, steps: u64, (tp, pp, dp): (u32, u32, u32), tied: bool) -> String {
    format!(
        r#"name = "layout-{tp}-{pp}-{dp}"
seed = 5
[model]
n_layers = 2
d_model = 16
n_heads = 4
n_kv_heads = 2
d_ffn = 32
vocab_size = 50257
max_seq_len = 64
tie_embeddings = {tied}
[parallel]
tp = {tp}
pp = {pp}
dp = {dp}
microbatches = 2
[data]
dataset = "{dataset}"
curriculum = "uniform"
tokens_per_step = 256
total_tokens = {total}
[optimizer]
lr = 3e-3
[schedule]
kind = "constant"
"#,
        total = steps * 256
    )
}

pub async fn metrics(cl: &mut Cl, id: &str) -> Vec<pb::StepMetrics> {
    cl.get_metrics(pb::GetMetricsRequest {
        job_id: id.into(),
        from_step: 0,
        limit: 0,
    })
    .await
    .unwrap()
    .into_inner()
    .steps
}

/// [`recipe3d`] saving a checkpoint every `every` steps under `dir`.
pub fn recipe_ck(dataset: &str, steps: u64, l: (u32, u32, u32), dir: &Path, every: u64) -> String {
    format!(
        "{}[checkpoint]\nevery_steps = {every}\nkeep_last = 3\ndir = \"file://{}\"\n",
        recipe3d(dataset, steps, l, true),
        dir.display()
    )
}

/// Waits for job `id` to end.
pub async fn ended(cl: &mut Cl, id: &str, secs: u64) -> pb::Job {
    until(cl, id, secs, |j| {
        !matches!(
            j.state(),
            pb::JobState::Queued | pb::JobState::Running | pb::JobState::Restarting
        )
    })
    .await
}

pub fn assert_bit_identical(want: &[pb::StepMetrics], got: &[pb::StepMetrics], what: &str) {
    assert_eq!(want.len(), got.len(), "{what}");
    for (x, y) in want.iter().zip(got) {
        assert_eq!(
            (x.step, x.loss.to_bits()),
            (y.step, y.loss.to_bits()),
            "{what}: step {}: {} vs {}",
            x.step,
            x.loss,
            y.loss
        );
    }
}

/// A client of the coordinator at `url`, once it answers (30 s at most).
/// A client of the coordinator process at `url` whose state folder is
/// `state`: it waits for the process to answer, and reads the client
/// token it made there (every coordinator has one, on loopback too).
pub async fn connect(url: &str, state: &Path) -> Cl {
    let t = Instant::now();
    loop {
        let token = std::fs::read_to_string(state.join("token")).ok();
        let ca = std::fs::read_to_string(state.join("tls/ca.pem")).ok();
        if let Some(token) = token.as_deref().map(str::trim).filter(|t| !t.is_empty())
            && let Some(c) = client_tls(url, Some(token), ca.as_deref()).await
        {
            return c;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "no coordinator at {url}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// GET `path` over HTTP/1.1: the status code and the body (two minutes
/// at most: a sweep's report is fitted on the first call).
pub fn get_http(addr: std::net::SocketAddr, path: &str, token: Option<&str>) -> (u16, String) {
    let s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    get_on(s, addr, path, token)
}

/// [`get_http`] over TLS, trusting only the CA `ca` (PEM); the handshake's
/// error when it fails.
pub fn get_https(
    addr: std::net::SocketAddr,
    path: &str,
    token: Option<&str>,
    ca: &str,
) -> Result<(u16, String), std::io::Error> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let cfg = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let name = rustls::pki_types::ServerName::from(addr.ip());
    let conn = rustls::ClientConnection::new(std::sync::Arc::new(cfg), name).unwrap();
    let tcp = std::net::TcpStream::connect(addr)?;
    tcp.set_read_timeout(Some(Duration::from_secs(120)))?;
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    while tls.conn.is_handshaking() {
        tls.conn.complete_io(&mut tls.sock)?;
    }
    Ok(get_on(tls, addr, path, token))
}

fn get_on(
    mut s: impl std::io::Read + std::io::Write,
    addr: std::net::SocketAddr,
    path: &str,
    token: Option<&str>,
) -> (u16, String) {
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    std::io::Write::write_fmt(
        &mut s,
        format_args!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n"),
    )
    .unwrap();
    let mut raw = Vec::new();
    // A TLS peer may close without its close_notify: what came is the answer.
    if let Err(e) = std::io::Read::read_to_end(&mut s, &mut raw) {
        assert!(
            e.kind() == std::io::ErrorKind::UnexpectedEof && !raw.is_empty(),
            "{e}"
        );
    }
    let raw = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    let code = head.split(' ').nth(1).unwrap().parse().unwrap();
    assert!(
        !head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked"),
        "{head}"
    );
    (code, body.to_string())
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A worker process of some coordinator, as /proc shows it.
#[derive(Debug, Clone)]
pub struct WorkerProc {
    pub job: String,
    pub rank: u32,
    pub pid: u32,
    /// Its state letter in /proc (`S`, `R`, `T` for stopped, …).
    pub state: char,
}

/// The worker processes started for the coordinator at `url` (it may be
/// gone; other tests' coordinators number their jobs alike), from /proc.
pub fn worker_processes(url: &str) -> Vec<WorkerProc> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = cmd
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let job = args
            .windows(2)
            .find(|w| w[0] == "--job")
            .map(|w| w[1].clone());
        let (Some(job), true, true) = (
            job,
            args.iter().any(|a| a == "worker"),
            args.windows(2)
                .any(|w| w[0] == "--coordinator" && w[1] == url),
        ) else {
            continue;
        };
        // Launchers give the rank in the environment.
        let Ok(env) = std::fs::read(e.path().join("environ")) else {
            continue;
        };
        let Some(rank) = env
            .split(|b| *b == 0)
            .find_map(|v| v.strip_prefix(b"STRATA_RANK="))
            .and_then(|r| String::from_utf8_lossy(r).parse().ok())
        else {
            continue;
        };
        let state = std::fs::read_to_string(e.path().join("stat"))
            .ok()
            .and_then(|s| {
                s.rsplit(')')
                    .next()
                    .and_then(|t| t.trim_start().chars().next())
            })
            .unwrap_or('?');
        if state == 'Z' {
            continue;
        }
        out.push(WorkerProc {
            job,
            rank,
            pid,
            state,
        });
    }
    out
}

/// Every sequence of a dataset: (bucket length, tokens, document id,
/// offset), sorted (shard boundaries and order set aside).
pub async fn sequences(at: &Location) -> Vec<(u64, Vec<u32>, u64, u64)> {
    let m = strata_dataplane::reader::read_manifest(at).await.unwrap();
    let mut rows = Vec::new();
    for b in &m.buckets {
        for s in &b.shards {
            let shard = strata_dataplane::reader::read_shard(at, s, b.seq_len as usize + 1)
                .await
                .unwrap();
            for r in 0..shard.rows() {
                rows.push((
                    b.seq_len,
                    shard.row(r).to_vec(),
                    shard.doc_ids[r],
                    shard.offsets[r],
                ));
            }
        }
    }
    rows.sort();
    rows
}

/// What must match between two decompositions of one corpus: every
/// bucket's sequences (tokens, document id, offset) as a multiset, every
/// count, and the held-out split byte for byte. Shards may differ.
pub async fn assert_same_dataset(a: &Location, b: &Location, what: &str) {
    use strata_dataplane::manifest::Manifest;
    use strata_dataplane::reader::{read_holdout, read_manifest};
    let (ma, mb) = (
        read_manifest(a).await.unwrap(),
        read_manifest(b).await.unwrap(),
    );
    let counts = |m: &Manifest| {
        (
            m.n_documents,
            m.n_documents_skipped,
            m.n_tokens_in,
            m.n_tokens_dropped,
            m.buckets
                .iter()
                .map(|b| (b.seq_len, b.n_sequences, b.n_tokens))
                .collect::<Vec<_>>(),
            m.holdout
                .as_ref()
                .map(|h| (h.n_documents, h.n_tokens, h.bytes, h.crc32)),
        )
    };
    assert_eq!(counts(&ma), counts(&mb), "{what}: counts");
    let (ra, rb) = (sequences(a).await, sequences(b).await);
    assert_eq!(ra.len(), rb.len(), "{what}: sequences");
    assert!(ra == rb, "{what}: the buckets hold other sequences");
    assert_eq!(
        read_holdout(a, &ma).await.unwrap(),
        read_holdout(b, &mb).await.unwrap(),
        "{what}: held-out tokens"
    );
}
