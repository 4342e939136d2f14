//! The engine through its gRPC services with a launcher that starts no
//! processes: the test plays the workers, so that it can send what real
//! workers rarely do (an infinite gradient norm, tens of thousands of
//! steps, metrics and checkpoint reports racing each other).

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use strata_cluster::{Exit, Inventory, JobLauncher, LaunchError, LaunchSpec, Ranks, StartInfo};
use strata_coordinator::{Coordinator, CoordinatorConfig};
use strata_dataplane::checkpoint::{FORMAT, Manifest, SavedLayout, VERSION};
use strata_dataplane::decompose::{Buckets, SplitLong};
use strata_dataplane::manifest::{Layout, TokenizerInfo};
use strata_dataplane::store::Location;
use strata_dataplane::tokenize::TokenizerKind;
use strata_dataplane::writer::{DatasetWriter, WriterOptions};
use strata_proto::v1 as pb;
use strata_proto::v1::control_service_client::ControlServiceClient;
use strata_proto::v1::job_service_client::JobServiceClient;
use strata_recipe::Recipe;
use tonic::transport::Channel;

/// Records what it was asked to start; its "processes" run until stopped.
#[derive(Default, Clone)]
struct FakeLauncher {
    started: Arc<Mutex<Vec<Vec<LaunchSpec>>>>,
}

struct FakeRanks(Vec<Option<Exit>>);

impl JobLauncher for FakeLauncher {
    fn start(&self, ranks: &[LaunchSpec], _: &StartInfo) -> Result<Box<dyn Ranks>, LaunchError> {
        self.started.lock().unwrap().push(ranks.to_vec());
        Ok(Box::new(FakeRanks(vec![None; ranks.len()])))
    }
}

impl Ranks for FakeRanks {
    fn len(&self) -> usize {
        self.0.len()
    }
    fn exit(&mut self, rank: usize) -> Result<Option<Exit>, LaunchError> {
        Ok(self.0[rank].clone())
    }
    fn terminate(&mut self) {
        self.0.iter_mut().for_each(|e| *e = Some(Exit::Code(0)));
    }
    fn kill(&mut self) {
        self.0
            .iter_mut()
            .filter(|e| e.is_none())
            .for_each(|e| *e = Some(Exit::Signal(9)));
    }
    fn log_tail(&self, _rank: usize, _n: usize) -> Vec<String> {
        Vec::new()
    }
}

async fn dataset(dir: &Path) -> String {
    let loc = Location::parse(dir.to_str().unwrap(), true).unwrap();
    let mut w = DatasetWriter::create(
        loc,
        WriterOptions {
            tokenizer: TokenizerInfo::of(&TokenizerKind::R50k.load()),
            layout: Layout::Decomposed {
                split_long: SplitLong::Largest,
            },
            buckets: Buckets::new(4, 5).unwrap(),
            seed: 7,
            shard_bytes: 256 << 10,
            overwrite: false,
        },
    )
    .await
    .unwrap();
    for k in 4..=5u32 {
        for d in 0..64u32 {
            w.add_document(&vec![d; (1usize << k) + 1]).await.unwrap();
        }
    }
    w.finish().await.unwrap();
    format!("file://{}", dir.display())
}

fn recipe(data: &str, checkpoints: &Path) -> String {
    format!(
        r#"name = "fake"
[model]
n_layers = 1
d_model = 16
n_heads = 2
d_ffn = 32
vocab_size = 50257
max_seq_len = 32
[parallel]
dp = 2
[data]
dataset = "{data}"
curriculum = "uniform"
tokens_per_step = 64
total_tokens = 6400000
[optimizer]
lr = 1e-3
[schedule]
kind = "constant"
[checkpoint]
every_steps = 1
keep_last = 0
dir = "file://{}"
"#,
        checkpoints.display()
    )
}

/// A coordinator with the fake launcher, a submitted job, and a control
/// client holding the job's worker token.
struct Setup {
    _dir: tempfile::TempDir,
    c: Coordinator,
    cl: JobServiceClient<Channel>,
    ctl: ControlServiceClient<tonic::service::interceptor::InterceptedService<Channel, Token>>,
    id: String,
    spec: String,
}

#[derive(Clone)]
struct Token(tonic::metadata::MetadataValue<tonic::metadata::Ascii>);

impl tonic::service::Interceptor for Token {
    fn call(&mut self, mut r: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        r.metadata_mut().insert("authorization", self.0.clone());
        Ok(r)
    }
}

async fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(&dir.path().join("data")).await;
    let launcher = FakeLauncher::default();
    let mut cfg = CoordinatorConfig::new(
        "127.0.0.1:0".parse().unwrap(),
        dir.path().join("state"),
        Inventory::local(2).unwrap(),
        "/bin/false".into(),
    );
    cfg.worker_args = Vec::new();
    cfg.heartbeat_timeout = Duration::from_secs(600);
    cfg.stop_grace = Duration::from_secs(1);
    let c = Coordinator::start_with(cfg, Arc::new(launcher.clone()))
        .await
        .unwrap();
    let channel = Channel::from_shared(format!("http://{}", c.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut cl = JobServiceClient::new(channel.clone());
    let spec = recipe(&data, &dir.path().join("checkpoints"));
    let id = cl
        .submit_job(pb::SubmitJobRequest {
            spec_toml: spec.clone(),
            default_name: "t".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .job_id;
    // The ranks are started off the engine's lock, right after.
    let begun = Instant::now();
    while launcher.started.lock().unwrap().is_empty() {
        assert!(
            begun.elapsed() < Duration::from_secs(10),
            "nothing launched"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let token = {
        let started = launcher.started.lock().unwrap();
        let env = &started[0][0].env;
        env.iter()
            .find(|(k, _)| k == "STRATA_JOB_TOKEN")
            .unwrap()
            .1
            .clone()
    };
    let ctl = ControlServiceClient::with_interceptor(
        channel,
        Token(format!("Bearer {token}").parse().unwrap()),
    );
    let mut s = Setup {
        _dir: dir,
        c,
        cl,
        ctl,
        id,
        spec,
    };
    for rank in 0..2 {
        s.ctl
            .register(pb::RegisterRequest {
                job_id: s.id.clone(),
                rank,
                host: "test".into(),
                pid: 1,
                collective_addr: format!("127.0.0.1:{}", 1000 + rank),
                attempt: 1,
            })
            .await
            .unwrap();
    }
    s
}

fn step(n: u64, stages: u32) -> pb::StepMetrics {
    pb::StepMetrics {
        step: n,
        tokens: n * 64,
        loss: 10.0 - n as f64 * 1e-4,
        lr: 1e-3,
        tokens_per_s: 1000.0,
        // A gradient that overflowed, as it happens in real runs.
        grad_norm: if n == 7 { f64::INFINITY } else { 1.0 },
        seq_log2: 4,
        times: Some(pb::StepTimes::default()),
        stages: (0..stages)
            .map(|s| pb::StageMetrics {
                stage: s,
                forward_s: 0.1,
                backward_s: 0.2,
                wait_s: 0.01,
                pipeline_s: 0.3,
                bubble: 0.03,
                tp_comm_s: 0.001,
            })
            .collect(),
        bubble_theory: 0.1,
        eval_loss: None,
        peak_flops: None,
    }
}

/// An infinite gradient norm is stored and read back (it used to be stored
/// as JSON null, after which the job's history could not be read), and a
/// long history comes in pages under tonic's 4 MiB (the CLI follows them).
#[tokio::test(flavor = "multi_thread")]
async fn long_histories_with_non_finite_values_are_read_back_in_pages() {
    let mut s = setup().await;
    let total = 20_000u64;
    for chunk in (1..=total).collect::<Vec<_>>().chunks(1000) {
        s.ctl
            .report_metrics(pb::ReportMetricsRequest {
                job_id: s.id.clone(),
                rank: 0,
                steps: chunk.iter().map(|&n| step(n, 16)).collect(),
                attempt: 1,
                resumed_from_step: None,
            })
            .await
            .unwrap();
    }
    let mut got = Vec::new();
    let mut from_step = 0;
    let mut pages = 0;
    loop {
        let page =
            s.cl.get_metrics(pb::GetMetricsRequest {
                job_id: s.id.clone(),
                from_step,
                limit: 0,
            })
            .await
            .unwrap()
            .into_inner();
        pages += 1;
        got.extend(page.steps);
        if page.next_from_step == 0 {
            break;
        }
        from_step = page.next_from_step;
    }
    assert!(pages > 5, "{pages} pages for about 20 MB");
    assert_eq!(got.len() as u64, total);
    assert!(got.iter().enumerate().all(|(i, m)| m.step == i as u64 + 1));
    assert_eq!(got[6].grad_norm, f64::INFINITY);
    // A limit is honoured, and says where the rest starts.
    let page =
        s.cl.get_metrics(pb::GetMetricsRequest {
            job_id: s.id.clone(),
            from_step: 5,
            limit: 3,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.steps.len(), 3);
    assert_eq!(page.next_from_step, 8);
    // The watch stream replays the history, the infinite norm included.
    let mut events =
        s.cl.watch_job(pb::WatchJobRequest {
            job_id: s.id.clone(),
            from_step: 6,
        })
        .await
        .unwrap()
        .into_inner();
    let mut seen = Vec::new();
    while seen.len() < 3 {
        match events.next().await.unwrap().unwrap().event.unwrap() {
            pb::job_event::Event::Step(m) => seen.push(m),
            pb::job_event::Event::Job(_) => {}
        }
    }
    assert_eq!(seen[1].step, 7);
    assert_eq!(seen[1].grad_norm, f64::INFINITY);
    // A watcher still connected does not hold the coordinator's shutdown.
    let start = Instant::now();
    s.c.stop().await;
    assert!(start.elapsed() < Duration::from_secs(10));
    drop(events);
}

/// Metrics reports and checkpoint commits racing on one job: every
/// checkpoint stays recorded (a report used to write back a copy of the
/// job taken before another call changed it).
#[tokio::test(flavor = "multi_thread")]
async fn concurrent_reports_lose_no_change() {
    let s = setup().await;
    let recipe = Recipe::from_toml_str(&s.spec, "t").unwrap();
    let (n_ckpt, n_steps) = (100u64, 2000u64);
    // Four reporters, so that reports and commits interleave often.
    let metrics: Vec<_> = (0..4u64)
        .map(|k| {
            let (mut ctl, id) = (s.ctl.clone(), s.id.clone());
            tokio::spawn(async move {
                for n in (1..=n_steps).filter(|n| n % 4 == k) {
                    ctl.report_metrics(pb::ReportMetricsRequest {
                        job_id: id.clone(),
                        rank: 0,
                        steps: vec![step(n, 1)],
                        attempt: 1,
                        resumed_from_step: None,
                    })
                    .await
                    .unwrap();
                }
            })
        })
        .collect();
    let mut checkpoints = Vec::new();
    for rank in 0..2u32 {
        let (mut ctl, id) = (s.ctl.clone(), s.id.clone());
        let (model, spec) = (recipe.model, s.spec.clone());
        checkpoints.push(tokio::spawn(async move {
            for n in 1..=n_ckpt {
                let manifest = Manifest {
                    format: FORMAT.into(),
                    version: VERSION,
                    job: id.clone(),
                    attempt: 1,
                    step: n,
                    tokens_seen: n * 64,
                    optimizer_steps: n,
                    layout: SavedLayout {
                        tp: 1,
                        pp: 1,
                        dp: 2,
                        virtual_stages: 1,
                    },
                    model,
                    recipe: spec.clone(),
                    data: None,
                    shards: Vec::new(),
                    written_at: 0,
                };
                ctl.report_checkpoint(pb::ReportCheckpointRequest {
                    job_id: id.clone(),
                    rank,
                    attempt: 1,
                    step: n,
                    ok: true,
                    manifest: (rank == 0)
                        .then(|| strata_proto::checkpoint::manifest_to_pb(&manifest)),
                    ..Default::default()
                })
                .await
                .unwrap();
            }
        }));
    }
    for m in metrics {
        m.await.unwrap();
    }
    for c in checkpoints {
        c.await.unwrap();
    }
    let mut cl = s.cl.clone();
    let j = cl
        .get_job(pb::GetJobRequest {
            job_id: s.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(j.steps_done > n_steps - 4, "{}", j.steps_done);
    assert_eq!(j.last_checkpoint_step, Some(n_ckpt));
    let list = cl
        .list_checkpoints(pb::ListCheckpointsRequest {
            job_id: s.id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .checkpoints;
    assert_eq!(
        list.iter().map(|c| c.step).collect::<Vec<_>>(),
        (1..=n_ckpt).collect::<Vec<_>>()
    );
    // A report of an attempt that is not the job's is refused.
    let mut ctl = s.ctl.clone();
    let e = ctl
        .heartbeat(pb::HeartbeatRequest {
            job_id: s.id.clone(),
            rank: 0,
            step: 1,
            attempt: 7,
            ..pb::HeartbeatRequest::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    assert!(
        e.message().contains("attempt 7 has ended"),
        "{}",
        e.message()
    );
    let start = Instant::now();
    s.c.stop().await;
    assert!(start.elapsed() < Duration::from_secs(10));
}
