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
use strata_dataplane::checkpoint::{
    self as ckpt, FORMAT, Manifest, SavedLayout, VERSION, describe_shards,
};
use strata_dataplane::decompose::{Buckets, SplitLong};
use strata_dataplane::manifest::{Layout, TokenizerInfo};
use strata_dataplane::params::ParamTable;
use strata_dataplane::store::Location;
use strata_dataplane::tokenize::TokenizerKind;
use strata_dataplane::writer::{DatasetWriter, WriterOptions};
use strata_proto::v1 as pb;
use strata_proto::v1::control_service_client::ControlServiceClient;
use strata_proto::v1::job_service_client::JobServiceClient;
use strata_recipe::Recipe;
use tonic::transport::Channel;

/// Records what it was asked to start; its "processes" run until stopped
/// (or, lingering, until killed: workers that use their whole stop grace).
#[derive(Default, Clone)]
struct FakeLauncher {
    started: Arc<Mutex<Vec<Vec<LaunchSpec>>>>,
    linger: bool,
}

struct FakeRanks(Vec<Option<Exit>>, bool);

impl JobLauncher for FakeLauncher {
    fn start(&self, ranks: &[LaunchSpec], _: &StartInfo) -> Result<Box<dyn Ranks>, LaunchError> {
        self.started.lock().unwrap().push(ranks.to_vec());
        Ok(Box::new(FakeRanks(vec![None; ranks.len()], self.linger)))
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
        if !self.1 {
            self.0.iter_mut().for_each(|e| *e = Some(Exit::Code(0)));
        }
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
    token: String,
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
    setup_with(FakeLauncher::default(), Duration::from_secs(1)).await
}

async fn setup_with(launcher: FakeLauncher, stop_grace: Duration) -> Setup {
    setup_spec(launcher, stop_grace, |s| s).await
}

/// A setup whose recipe `edit` changes.
async fn setup_spec(
    launcher: FakeLauncher,
    stop_grace: Duration,
    edit: impl Fn(String) -> String,
) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(&dir.path().join("data")).await;
    let mut cfg = CoordinatorConfig::new(
        "127.0.0.1:0".parse().unwrap(),
        dir.path().join("state"),
        Inventory::local(2).unwrap(),
        "/bin/false".into(),
    );
    cfg.worker_args = Vec::new();
    cfg.heartbeat_timeout = Duration::from_secs(600);
    cfg.stop_grace = stop_grace;
    let c = Coordinator::start_with(cfg, Arc::new(launcher.clone()))
        .await
        .unwrap();
    let channel = Channel::from_shared(format!("http://{}", c.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut cl = JobServiceClient::new(channel.clone());
    let spec = edit(recipe(&data, &dir.path().join("checkpoints")));
    let id = cl
        .submit_job(pb::SubmitJobRequest {
            spec_toml: spec.clone(),
            default_name: "t".into(),
            ..Default::default()
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
        token,
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

/// Rank `rank`'s report of checkpoint `step` as a worker of `attempt`
/// sends it: its files (described: the coordinator never opens them), and
/// on rank 0 the manifest.
fn checkpoint_report(
    recipe: &Recipe,
    job: &str,
    rank: u32,
    attempt: u32,
    step: u64,
) -> pb::ReportCheckpointRequest {
    let l = recipe.parallel.layout;
    let coords = l.coords(strata_recipe::Rank(rank)).unwrap();
    let table = ParamTable::new(&recipe.model, l, coords);
    let manifest = Manifest {
        format: FORMAT.into(),
        version: VERSION,
        job: job.into(),
        attempt,
        step,
        tokens_seen: step * 64,
        optimizer_steps: step,
        layout: SavedLayout {
            tp: l.tp,
            pp: l.pp,
            dp: l.dp,
            virtual_stages: 1,
        },
        model: recipe.model,
        recipe: String::new(),
        data: None,
        shards: Vec::new(),
        written_at: 0,
    };
    pb::ReportCheckpointRequest {
        job_id: job.into(),
        rank,
        attempt,
        step,
        ok: true,
        shards: describe_shards(&table, attempt, coords.dp)
            .iter()
            .map(strata_proto::checkpoint::shard_to_pb)
            .collect(),
        manifest: (rank == 0).then(|| strata_proto::checkpoint::manifest_to_pb(&manifest)),
        ..Default::default()
    }
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
        sources: Vec::new(),
        weights: None,
    }
}

/// Rank 0's report of `steps`, as a worker of attempt 1 sends it.
fn metrics_report(job: &str, steps: Vec<pb::StepMetrics>) -> pb::ReportMetricsRequest {
    pb::ReportMetricsRequest {
        job_id: job.into(),
        rank: 0,
        steps,
        attempt: 1,
        resumed_from_step: None,
    }
}

/// The job as `GetJob` gives it.
async fn job_of(s: &Setup) -> pb::Job {
    s.cl.clone()
        .get_job(pb::GetJobRequest {
            job_id: s.id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
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
            .report_metrics(metrics_report(
                &s.id,
                chunk.iter().map(|&n| step(n, 16)).collect(),
            ))
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
                    ctl.report_metrics(metrics_report(&id, vec![step(n, 1)]))
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    let mut checkpoints = Vec::new();
    for rank in 0..2u32 {
        let (mut ctl, id) = (s.ctl.clone(), s.id.clone());
        let recipe = recipe.clone();
        checkpoints.push(tokio::spawn(async move {
            for n in 1..=n_ckpt {
                ctl.report_checkpoint(checkpoint_report(&recipe, &id, rank, 1, n))
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
    let j = job_of(&s).await;
    assert!(j.steps_done > n_steps - 4, "{}", j.steps_done);
    assert_eq!(j.last_checkpoint_step, Some(n_ckpt));
    assert_eq!(steps_listed(&s).await, (1..=n_ckpt).collect::<Vec<_>>());
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

/// Steps of the job's checkpoints, as `ListCheckpoints` gives them.
async fn steps_listed(s: &Setup) -> Vec<u64> {
    s.cl.clone()
        .list_checkpoints(pb::ListCheckpointsRequest {
            job_id: s.id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .checkpoints
        .iter()
        .map(|c| c.step)
        .collect()
}

/// Steps of the job's complete checkpoints, as its manifests on disk say.
async fn steps_on_disk(s: &Setup) -> Vec<u64> {
    let recipe = Recipe::from_toml_str(&s.spec, "t").unwrap();
    let loc = Location::parse(&recipe.checkpoint.unwrap().dir, false).unwrap();
    let (found, _) = ckpt::list(&loc, &s.id).await.unwrap();
    found.iter().map(|m| m.step).collect()
}

/// A manifest of another job, of another step, or whose files miss part
/// of the model is never written: the checkpoint does not exist, and the
/// job says why.
#[tokio::test(flavor = "multi_thread")]
async fn manifests_are_checked_before_they_are_committed() {
    let s = setup().await;
    let recipe = Recipe::from_toml_str(&s.spec, "t").unwrap();
    let mut ctl = s.ctl.clone();
    let report = |rank, step| checkpoint_report(&recipe, &s.id, rank, 1, step);
    // Step 1: rank 0's manifest names another job.
    let mut r0 = report(0, 1);
    r0.manifest.as_mut().unwrap().job = "job-999".into();
    // Step 2: rank 0's manifest says step 3.
    let mut r0b = report(0, 2);
    r0b.manifest.as_mut().unwrap().step = 3;
    // Step 3: rank 0 reports no files (the second replica writes none).
    let mut r0c = report(0, 3);
    r0c.shards.clear();
    for (a, b) in [(r0, report(1, 1)), (r0b, report(1, 2)), (r0c, report(1, 3))] {
        ctl.report_checkpoint(a).await.unwrap();
        ctl.report_checkpoint(b).await.unwrap();
    }
    // Step 4: as a worker sends it.
    ctl.report_checkpoint(report(0, 4)).await.unwrap();
    ctl.report_checkpoint(report(1, 4)).await.unwrap();
    // Step 5: rank 0's manifest claims a model of four billion layers
    // (nothing may be sized by it).
    let mut r0d = report(0, 5);
    r0d.manifest
        .as_mut()
        .unwrap()
        .model
        .as_mut()
        .unwrap()
        .n_layers = u64::from(u32::MAX);
    ctl.report_checkpoint(r0d).await.unwrap();
    ctl.report_checkpoint(report(1, 5)).await.unwrap();
    assert_eq!(steps_on_disk(&s).await, [4]);
    let j = job_of(&s).await;
    let errors = j.checkpoint_errors.join("\n");
    assert!(
        errors.contains("step 1: rank 0's manifest names job `job-999`"),
        "{errors}"
    );
    assert!(
        errors.contains("step 2: rank 0's manifest is of step 3"),
        "{errors}"
    );
    assert!(errors.contains("step 3: incomplete"), "{errors}");
    assert!(
        errors.contains("step 5: rank 0's manifest describes another model"),
        "{errors}"
    );
    assert_eq!(j.last_checkpoint_step, Some(4));
    s.c.stop().await;
}

/// A resume while the cancelled attempt's workers are still in their stop
/// grace: the checkpoint they save on their way out lands before the
/// resume cuts the history (it waits for them), and nothing of theirs
/// lands after it; no checkpoint past the resumed step remains.
#[tokio::test(flavor = "multi_thread")]
async fn a_resume_during_the_stop_grace_leaves_no_checkpoint_past_its_step() {
    let launcher = FakeLauncher {
        linger: true,
        ..FakeLauncher::default()
    };
    let s = setup_with(launcher, Duration::from_secs(3)).await;
    let recipe = Recipe::from_toml_str(&s.spec, "t").unwrap();
    let mut ctl = s.ctl.clone();
    for step in 1..=4 {
        for rank in 0..2 {
            ctl.report_checkpoint(checkpoint_report(&recipe, &s.id, rank, 1, step))
                .await
                .unwrap();
        }
    }
    assert_eq!(steps_on_disk(&s).await, [1, 2, 3, 4]);
    let mut cl = s.cl.clone();
    cl.cancel_job(pb::CancelJobRequest {
        job_id: s.id.clone(),
        reason: "test".into(),
    })
    .await
    .unwrap();
    // The resume, asked at once.
    let resume = {
        let (mut cl, id) = (s.cl.clone(), s.id.clone());
        tokio::spawn(async move {
            let begun = Instant::now();
            let r = cl
                .resume_job(pb::ResumeJobRequest {
                    job_id: id,
                    from_step: 2,
                    discard_newer: true,
                    ..Default::default()
                })
                .await;
            (r, begun.elapsed())
        })
    };
    // The stopping workers save step 5 on their way out (SIGTERM).
    tokio::time::sleep(Duration::from_millis(500)).await;
    for rank in 0..2 {
        ctl.report_checkpoint(checkpoint_report(&recipe, &s.id, rank, 1, 5))
            .await
            .unwrap();
    }
    let (r, took) = resume.await.unwrap();
    r.unwrap();
    assert!(
        took >= Duration::from_secs(2),
        "the resume did not wait: {took:?}"
    );
    assert_eq!(steps_on_disk(&s).await, [1, 2]);
    // A late report of the ended attempt is refused, whatever the job's
    // state now.
    for rank in 0..2 {
        let e = ctl
            .report_checkpoint(checkpoint_report(&recipe, &s.id, rank, 1, 6))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e}");
    }
    assert_eq!(steps_on_disk(&s).await, [1, 2]);
    let list = steps_listed(&s).await;
    assert!(list.iter().all(|&step| step <= 2), "{list:?}");
    s.c.stop().await;
}

/// A failed attempt's ranks complete a checkpoint on their way out (a
/// preemption's SIGTERM reaches them one by one, the first exit fails the
/// attempt) and report their last steps: the next attempt resumes from
/// that checkpoint, the attempt's record says it lost the one step past
/// it, and the job's history keeps every step up to it and none after.
#[tokio::test(flavor = "multi_thread")]
async fn a_checkpoint_completed_by_a_failed_attempt_is_where_the_next_one_starts() {
    let launcher = FakeLauncher {
        linger: true,
        ..FakeLauncher::default()
    };
    let s = setup_with(launcher.clone(), Duration::from_secs(1)).await;
    let recipe = Recipe::from_toml_str(&s.spec, "t").unwrap();
    let mut ctl = s.ctl.clone();
    for n in 1..=7 {
        ctl.report_metrics(metrics_report(&s.id, vec![step(n, 1)]))
            .await
            .unwrap();
    }
    for rank in 0..2 {
        ctl.report_checkpoint(checkpoint_report(&recipe, &s.id, rank, 1, 4))
            .await
            .unwrap();
    }
    // Rank 1 leaves first, after its step-8 save began; rank 0 is still
    // writing its part.
    ctl.report_checkpoint(checkpoint_report(&recipe, &s.id, 1, 1, 8))
        .await
        .unwrap();
    ctl.report_done(pb::ReportDoneRequest {
        job_id: s.id.clone(),
        rank: 1,
        ok: false,
        error: "terminated".into(),
        attempt: 1,
    })
    .await
    .unwrap();
    let begun = Instant::now();
    loop {
        if job_of(&s).await.state() == pb::JobState::Restarting {
            break;
        }
        assert!(begun.elapsed() < Duration::from_secs(20), "not failed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Rank 0 sends the metrics of steps 8 and 9 (past the checkpoint),
    // then its part of step 8.
    ctl.report_metrics(metrics_report(&s.id, vec![step(8, 1), step(9, 1)]))
        .await
        .unwrap();
    ctl.report_checkpoint(checkpoint_report(&recipe, &s.id, 0, 1, 8))
        .await
        .unwrap();
    assert_eq!(steps_on_disk(&s).await, [4, 8]);
    // The lingering ranks are killed after the failed attempt's grace;
    // then the next attempt starts.
    let begun = Instant::now();
    while launcher.started.lock().unwrap().len() < 2 {
        assert!(
            begun.elapsed() < Duration::from_secs(20),
            "no second attempt"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let j = job_of(&s).await;
    assert_eq!(j.attempts.len(), 2, "{:?}", j.attempts);
    assert_eq!(j.attempts[0].last_step, 9, "{:?}", j.attempts);
    assert_eq!(j.attempts[0].steps_lost, 1, "{:?}", j.attempts);
    assert_eq!(j.attempts[1].from_step, 8, "{:?}", j.attempts);
    let steps: Vec<u64> =
        s.cl.clone()
            .get_metrics(pb::GetMetricsRequest {
                job_id: s.id.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner()
            .steps
            .iter()
            .map(|m| m.step)
            .collect();
    assert_eq!(steps, (1..=8).collect::<Vec<_>>());
    s.c.stop().await;
}

/// The state folder and the store are the owner's alone, and the store
/// keeps no worker token in clear (a local user who could read it could
/// end a job as succeeded or commit a crafted manifest).
#[tokio::test(flavor = "multi_thread")]
async fn the_store_is_private_and_keeps_no_worker_token() {
    use std::os::unix::fs::PermissionsExt;
    let s = setup().await;
    let state = s._dir.path().join("state");
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&state), 0o700);
    assert_eq!(mode(&state.join("jobs.redb")), 0o600);
    let raw = std::fs::read(state.join("jobs.redb")).unwrap();
    let has = |needle: &[u8]| raw.windows(needle.len()).any(|w| w == needle);
    assert!(has(s.id.as_bytes()), "the job's record is in the store");
    assert!(
        !has(s.token.as_bytes()),
        "the worker token is stored in clear"
    );
    // A wrong token is refused; the right one (checked by its digest)
    // still works.
    let channel = Channel::from_shared(format!("http://{}", s.c.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut wrong =
        ControlServiceClient::with_interceptor(channel, Token("Bearer 00".parse().unwrap()));
    let e = wrong
        .heartbeat(pb::HeartbeatRequest {
            job_id: s.id.clone(),
            rank: 0,
            attempt: 1,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    s.ctl
        .clone()
        .heartbeat(pb::HeartbeatRequest {
            job_id: s.id.clone(),
            rank: 0,
            attempt: 1,
            ..Default::default()
        })
        .await
        .unwrap();
    s.c.stop().await;
}

/// A branch of a running job from a checkpoint `keep_last` would let go:
/// the checkpoint stays while the branch has none of its own (it would
/// otherwise fail to start, its checkpoint pruned under it).
#[tokio::test(flavor = "multi_thread")]
async fn a_queued_branch_keeps_its_parents_checkpoint() {
    let s = setup_spec(FakeLauncher::default(), Duration::from_secs(1), |spec| {
        spec.replace(
            "kind = \"constant\"",
            "kind = \"wsd\"\nwarmup_tokens = 64\ndecay_tokens = 640000",
        )
        .replace("keep_last = 0", "keep_last = 1")
    })
    .await;
    let recipe = Recipe::from_toml_str(&s.spec, "t").unwrap();
    let mut ctl = s.ctl.clone();
    let save = async |ctl: &mut ControlServiceClient<_>, step| {
        for rank in 0..2 {
            ctl.report_checkpoint(checkpoint_report(&recipe, &s.id, rank, 1, step))
                .await
                .unwrap();
        }
    };
    save(&mut ctl, 1).await;
    save(&mut ctl, 2).await;
    assert_eq!(steps_on_disk(&s).await, [2]);
    // The branch waits for slots the parent holds.
    let branch =
        s.cl.clone()
            .branch_job(pb::BranchJobRequest {
                parent_id: s.id.clone(),
                from_step: 2,
                decay_tokens: 6400,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
    assert_eq!(branch.state(), pb::JobState::Queued);
    save(&mut ctl, 3).await;
    assert_eq!(
        steps_on_disk(&s).await,
        [2, 3],
        "the branch's step was pruned"
    );
    save(&mut ctl, 4).await;
    assert_eq!(steps_on_disk(&s).await, [2, 4]);
    let _ = branch;
    s.c.stop().await;
}

/// A checkpoint committed behind a newer one, past `keep_last`, is pruned
/// by its own commit: the job does not list it (it would name files that
/// are gone).
#[tokio::test(flavor = "multi_thread")]
async fn a_commit_pruned_by_its_own_prune_is_not_recorded() {
    let s = setup_spec(FakeLauncher::default(), Duration::from_secs(1), |spec| {
        spec.replace("keep_last = 0", "keep_last = 1")
    })
    .await;
    let recipe = Recipe::from_toml_str(&s.spec, "t").unwrap();
    let mut ctl = s.ctl.clone();
    for step in [2, 1] {
        for rank in 0..2 {
            ctl.report_checkpoint(checkpoint_report(&recipe, &s.id, rank, 1, step))
                .await
                .unwrap();
        }
    }
    assert_eq!(steps_on_disk(&s).await, [2]);
    assert_eq!(steps_listed(&s).await, [2]);
    s.c.stop().await;
}
