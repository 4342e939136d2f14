//! Jobs through the real gRPC coordinator on 127.0.0.1:0, with real worker
//! processes (this package's `strata` binary): success with metrics,
//! refusals that name the culprit, cancel, a killed worker, a silent
//! worker, a coordinator restart in the middle of a queue, and tokens.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

mod common;

use common::*;
use futures::StreamExt;
use strata_coordinator::{Coordinator, Inventory};
use strata_proto::v1 as pb;
use strata_proto::v1::control_service_client::ControlServiceClient;
use strata_proto::v1::job_service_client::JobServiceClient;
use tonic::Code;
use tonic::transport::Channel;

/// Ranks and pids of the worker processes of job `job` of the coordinator
/// at `c` (other tests' coordinators number their jobs alike), from /proc.
fn worker_pids(c: &Coordinator, job: &str) -> Vec<(u32, u32)> {
    worker_procs(&format!("http://{}", c.addr), job)
}

/// [`worker_pids`] by the coordinator's URL (it may be gone).
fn worker_procs(url: &str, job: &str) -> Vec<(u32, u32)> {
    worker_processes(url)
        .into_iter()
        .filter(|w| w.job == job)
        .map(|w| (w.rank, w.pid))
        .collect()
}

fn signal(pid: u32, sig: &str) {
    assert!(
        Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .unwrap()
            .success()
    );
}

/// A dataset, a coordinator on it and a client.
struct Fixture {
    dir: tempfile::TempDir,
    data: String,
    c: Coordinator,
    cl: Cl,
}

async fn fixture(slots: u32, token: Option<&str>, heartbeat: Duration) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path()).await;
    let mut cfg = config(&dir.path().join("state"), slots, token);
    cfg.heartbeat_timeout = heartbeat;
    let c = Coordinator::start(cfg).await.unwrap();
    let cl = client(&c).await;
    Fixture { dir, data, c, cl }
}

impl Fixture {
    /// A dp = 2 job that would run for hours, once it has taken a step.
    async fn running_job(&mut self) -> String {
        let id = submit(&mut self.cl, recipe(&self.data, 100_000, 2))
            .await
            .unwrap();
        until(&mut self.cl, &id, 120, |j| j.steps_done >= 1).await;
        assert_eq!(worker_pids(&self.c, &id).len(), 2);
        id
    }

    /// Sends `sig` (as `kill` spells it) to rank `rank` of job `id`.
    fn signal_rank(&self, id: &str, rank: u32, sig: &str) {
        let (_, pid) = worker_pids(&self.c, id)
            .into_iter()
            .find(|(r, _)| *r == rank)
            .unwrap_or_else(|| panic!("no rank {rank} of {id}"));
        signal(pid, sig);
    }
}

async fn until_workers_gone(c: &Coordinator, id: &str, what: &str) {
    let start = Instant::now();
    while !worker_pids(c, id).is_empty() {
        assert!(start.elapsed() < Duration::from_secs(10), "{what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_runs_to_success_with_watch_metrics_and_cli() {
    let Fixture {
        dir: _dir,
        data,
        c,
        mut cl,
    } = fixture(2, None, Duration::from_secs(30)).await;
    let id = submit(&mut cl, recipe(&data, 8, 2)).await.unwrap();
    let mut events = cl
        .watch_job(pb::WatchJobRequest {
            job_id: id.clone(),
            from_step: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let (mut states, mut steps) = (Vec::new(), Vec::new());
    while let Some(ev) = events.next().await {
        match ev.unwrap().event.unwrap() {
            pb::job_event::Event::Job(j) => states.push(j.state()),
            pb::job_event::Event::Step(s) => steps.push(s.step),
        }
    }
    assert_eq!(states.last(), Some(&pb::JobState::Succeeded), "{states:?}");
    assert_eq!(steps, (1..=8).collect::<Vec<_>>());
    let job = get(&mut cl, &id).await;
    assert_eq!((job.steps_done, job.tokens_done), (8, 8 * 128));
    let m = cl
        .get_metrics(pb::GetMetricsRequest {
            job_id: id.clone(),
            from_step: 0,
            limit: 0,
        })
        .await
        .unwrap()
        .into_inner()
        .steps;
    assert_eq!(m.len(), 8);
    for s in &m {
        let t = s.times.unwrap();
        assert!(s.loss.is_finite() && s.loss > 0.0 && s.grad_norm > 0.0 && s.tokens_per_s > 0.0);
        assert!(
            t.forward_s > 0.0 && t.backward_s > 0.0 && t.all_reduce_s > 0.0 && t.optimizer_s > 0.0,
            "{t:?}"
        );
        assert!([16, 32, 64].contains(&(1u64 << s.seq_log2)));
    }
    // Both ranks' logs are where the job says.
    for r in 0..2 {
        assert!(
            Path::new(&job.run_dir)
                .join(format!("attempt-1/rank-{r}.log"))
                .exists()
        );
    }
    // The CLI sees the same.
    let url = format!("http://{}", c.addr);
    let out = Command::new(env!("CARGO_BIN_EXE_strata"))
        .args(["status", &id, "--json", "--coordinator", &url])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["job_id"], id.as_str());
    assert_eq!(v["state"], "succeeded");
    assert_eq!(v["steps_done"], 8);
    assert_eq!(v["tokens_done"], 1024);
    assert!(v["last_loss"].as_f64().unwrap() > 0.0);
    assert_eq!(v["failure_reason"], "");
    let out = Command::new(env!("CARGO_BIN_EXE_strata"))
        .args(["metrics", &id, "--json", "--coordinator", &url])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let arr = v.as_array().unwrap();
    assert_eq!(arr.len(), 8);
    assert_eq!(arr[7]["step"], 8);
    assert_eq!(arr[7]["tokens"], 1024);
    assert!(arr[7]["loss"].as_f64().is_some() && arr[7]["lr"].as_f64() == Some(1e-3));
    // `strata top` on the ended job: its last step and curves come from
    // its history, not "no steps yet".
    let out = Command::new(env!("CARGO_BIN_EXE_strata"))
        .args(["top", "--once", "--job", &id, "--coordinator", &url])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("step 8  tokens 1024") && text.contains("step time"),
        "{text}"
    );
    assert!(!text.contains("no steps yet"), "{text}");
    let out = Command::new(env!("CARGO_BIN_EXE_strata"))
        .args(["top", "--once", "--job", "nosuch", "--coordinator", &url])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--job nosuch"));
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_submissions_are_refused_naming_the_culprit() {
    let Fixture {
        dir,
        data,
        c,
        mut cl,
    } = fixture(2, None, Duration::from_secs(30)).await;

    let bad = recipe(&data, 4, 2).replace("d_model = 16", "d_model = 15");
    let e = submit(&mut cl, bad).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("model.d_model"), "{}", e.message());

    // A GPU job on a coordinator without GPUs.
    let cuda = format!("{}\n[device]\nbackend = \"cuda\"\n", recipe(&data, 4, 1));
    let e = submit(&mut cl, cuda).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(
        e.message().contains("device.backend") && e.message().contains("no GPUs"),
        "{}",
        e.message()
    );

    // A job whose ranks need more than the device holds, with its
    // numbers and what would make it fit; nothing is queued.
    let small = format!("{}\n[device]\nmemory_gib = 0.001\n", recipe(&data, 4, 2));
    let e = submit(&mut cl, small).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let m = e.message();
    assert!(
        m.contains("the job does not fit: rank 0 (pipeline stage 0, tensor-parallel rank 0) needs")
            && m.contains("of the device's 0.00 GiB (device.memory_gib)")
            && m.contains("GiB ("),
        "{m}"
    );
    assert!(
        cl.list_jobs(pb::ListJobsRequest::default())
            .await
            .unwrap()
            .into_inner()
            .jobs
            .is_empty()
    );

    let missing = recipe("file:///no/such/dataset", 4, 2);
    let e = submit(&mut cl, missing).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().contains("data.dataset") && e.message().contains("/no/such/dataset"),
        "{}",
        e.message()
    );

    // A model context shorter than every bucket leaves nothing to draw.
    let short = recipe(&data, 4, 2)
        .replace("max_seq_len = 64", "max_seq_len = 8")
        .replace("tokens_per_step = 128", "tokens_per_step = 16")
        .replace("total_tokens = 512", "total_tokens = 64");
    let e = submit(&mut cl, short).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
    assert!(e.message().contains("data.dataset"), "{}", e.message());

    let four = recipe(&data, 4, 4).replace("tokens_per_step = 128", "tokens_per_step = 256");
    let e = submit(&mut cl, four).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted);
    assert!(
        e.message().contains("needs 4 worker slots") && e.message().contains("has 2"),
        "{}",
        e.message()
    );

    // Layouts that cannot split the model, each refused naming the field
    // and the numbers.
    for (edits, shows) in [
        (
            vec![("[parallel]", "[parallel]\ntp = 4")],
            ["parallel.tp", "4 does not divide model.n_heads = 2"],
        ),
        (
            vec![
                ("d_model = 16", "d_model = 24"),
                ("n_heads = 2", "n_heads = 12\nn_kv_heads = 3"),
                ("[parallel]", "[parallel]\ntp = 2"),
            ],
            [
                "parallel.tp",
                "2 neither divides model.n_kv_heads = 3 nor is a multiple of it",
            ],
        ),
        (
            vec![("[parallel]", "[parallel]\npp = 2")],
            ["parallel.pp", "model.n_layers = 1"],
        ),
    ] {
        let bad = edits
            .iter()
            .fold(recipe(&data, 4, 1), |r, (from, to)| r.replace(from, to));
        let e = submit(&mut cl, bad).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{}", e.message());
        for s in shows {
            assert!(e.message().contains(s), "{}", e.message());
        }
    }

    // Nothing was queued.
    let jobs = cl
        .list_jobs(pb::ListJobsRequest { states: vec![] })
        .await
        .unwrap()
        .into_inner()
        .jobs;
    assert!(jobs.is_empty());

    // The CLI exits 2 on a refused recipe.
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        recipe(&data, 4, 2).replace("n_heads = 2", "n_heads = 3"),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_strata"))
        .args([
            "submit",
            path.to_str().unwrap(),
            "--coordinator",
            &format!("http://{}", c.addr),
        ])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("model."),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    c.stop().await;
}

/// On a machine with (here, declared) GPUs each rank leases one: the
/// launcher gives it `CUDA_VISIBLE_DEVICES` and its local rank, a second job
/// gets the GPUs the first does not hold, a third waits for one, and a
/// `cuda` job whose worker cannot reach a GPU fails naming the rank and the
/// device. The workers are this package's binary behind a script that
/// records the environment each was started with.
#[tokio::test(flavor = "multi_thread")]
async fn gpu_slots_are_leased_one_rank_each() {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset(dir.path()).await;
    let envs = dir.path().join("envs");
    std::fs::create_dir(&envs).unwrap();
    let script = dir.path().join("worker.sh");
    // Arguments: worker --coordinator URL --job ID …; the rank is in
    // STRATA_RANK.
    std::fs::write(
        &script,
        "#!/bin/sh\necho \"$CUDA_VISIBLE_DEVICES $STRATA_LOCAL_RANK\" > \"$ENV_DIR/$5-$STRATA_RANK\"\nexec \"$STRATA\" \"$@\"\n",
    )
    .unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let mut cfg = config(&dir.path().join("state"), 1, None);
    cfg.inventory = Inventory::local_gpus(3).unwrap();
    cfg.worker_program = script;
    cfg.worker_env.extend([
        ("ENV_DIR".into(), envs.display().to_string()),
        ("STRATA".into(), env!("CARGO_BIN_EXE_strata").into()),
    ]);
    let c = Coordinator::start(cfg).await.unwrap();
    let mut cl = client(&c).await;
    let env_of = |job: &str, rank: u32| {
        let text = std::fs::read_to_string(envs.join(format!("{job}-{rank}"))).unwrap();
        let (gpu, local) = text.trim().split_once(' ').unwrap();
        (gpu.to_string(), local.to_string())
    };

    // CPU jobs run on GPU slots too, each rank holding its slot's GPU.
    let a = submit(&mut cl, recipe(&data, 100_000, 2)).await.unwrap();
    until(&mut cl, &a, 120, |j| j.steps_done >= 1).await;
    let b = submit(&mut cl, recipe(&data, 100_000, 1)).await.unwrap();
    until(&mut cl, &b, 120, |j| j.steps_done >= 1).await;
    assert_eq!(env_of(&a, 0), ("0".into(), "0".into()));
    assert_eq!(env_of(&a, 1), ("1".into(), "1".into()));
    assert_eq!(env_of(&b, 0), ("2".into(), "0".into()));

    // No GPU is free: a cuda job waits; once a's GPUs are back it gets
    // GPU 0, where this build cannot train.
    let cuda = format!("{}\n[device]\nbackend = \"cuda\"\n", recipe(&data, 4, 1));
    let g = submit(&mut cl, cuda).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(get(&mut cl, &g).await.state(), pb::JobState::Queued);
    cl.cancel_job(pb::CancelJobRequest {
        job_id: a.clone(),
        reason: "make room".into(),
    })
    .await
    .unwrap();
    let j = until(&mut cl, &g, 60, |j| j.state() == pb::JobState::Failed).await;
    assert_eq!(env_of(&g, 0).0, "0");
    let why = &j.failure_reason;
    assert!(
        why.contains("rank 0") && why.to_lowercase().contains("cuda"),
        "{why}"
    );
    assert_eq!(get(&mut cl, &b).await.state(), pb::JobState::Running);
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn cancel_stops_every_worker() {
    let mut f = fixture(2, None, Duration::from_secs(30)).await;
    let id = f.running_job().await;
    let j =
        f.cl.cancel_job(pb::CancelJobRequest {
            job_id: id.clone(),
            reason: "enough".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(j.state(), pb::JobState::Cancelled);
    assert_eq!(j.failure_reason, "cancelled: enough");
    until_workers_gone(&f.c, &id, "workers outlived the cancel").await;
    let e =
        f.cl.cancel_job(pb::CancelJobRequest {
            job_id: id.clone(),
            reason: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    f.c.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_worker_fails_the_job_with_its_exit_status_and_log() {
    let mut f = fixture(2, None, Duration::from_secs(30)).await;
    let id = f.running_job().await;
    f.signal_rank(&id, 1, "-KILL");
    let j = until(&mut f.cl, &id, 30, |j| j.state() == pb::JobState::Failed).await;
    let why = &j.failure_reason;
    assert!(why.contains("rank 1") && why.contains("signal 9"), "{why}");
    assert!(why.contains("last log lines"), "{why}");
    until_workers_gone(&f.c, &id, "rank 0 outlived the failure").await;
    f.c.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_silent_worker_fails_the_job() {
    let mut f = fixture(2, None, Duration::from_secs(3)).await;
    let id = f.running_job().await;
    f.signal_rank(&id, 0, "-STOP");
    let j = until(&mut f.cl, &id, 30, |j| j.state() == pb::JobState::Failed).await;
    assert!(
        j.failure_reason.contains("rank 0 sent no heartbeat"),
        "{}",
        j.failure_reason
    );
    f.c.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restarted_coordinator_continues_its_jobs_and_runs_its_queue() {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset_40(dir.path()).await;
    let state = dir.path().join("state");
    let ck = dir.path().join("checkpoints");
    let c = Coordinator::start(config(&state, 8, None)).await.unwrap();
    let mut cl = client(&c).await;
    let steps = 24;
    let long = submit(&mut cl, recipe_ck(&data, steps, (2, 2, 2), &ck, 4))
        .await
        .unwrap();
    let queued = submit(&mut cl, recipe3d(&data, 4, (2, 2, 2), true))
        .await
        .unwrap();
    until(&mut cl, &long, 120, |j| {
        j.last_checkpoint_step.unwrap_or(0) >= 4
    })
    .await;
    assert_eq!(get(&mut cl, &queued).await.state(), pb::JobState::Queued);
    let url = format!("http://{}", c.addr);
    c.stop().await;
    assert!(
        worker_procs(&url, &long).is_empty(),
        "workers outlived their coordinator"
    );

    // The next coordinator on the same state continues the job from its
    // checkpoint before it starts the queued one.
    let c = Coordinator::start(config(&state, 8, None)).await.unwrap();
    let mut cl = client(&c).await;
    let j = until(&mut cl, &long, 300, |j| {
        j.state() != pb::JobState::Running && j.state() != pb::JobState::Restarting
    })
    .await;
    assert_eq!(j.state(), pb::JobState::Succeeded, "{}", j.failure_reason);
    assert_eq!(j.attempts.len(), 2, "{:?}", j.attempts);
    assert!(j.attempts[0].interrupted && j.attempts[0].cause.contains("coordinator"));
    assert!(j.attempts[1].from_step >= 4);
    let history = metrics(&mut cl, &long).await;
    assert_eq!(
        history.iter().map(|s| s.step).collect::<Vec<_>>(),
        (1..=steps).collect::<Vec<_>>()
    );
    let q = until(&mut cl, &queued, 120, |j| {
        j.state() == pb::JobState::Succeeded
    })
    .await;
    assert_eq!(q.steps_done, 4);
    let ids: Vec<String> = cl
        .list_jobs(pb::ListJobsRequest { states: vec![] })
        .await
        .unwrap()
        .into_inner()
        .jobs
        .into_iter()
        .map(|j| j.job_id)
        .collect();
    assert_eq!(ids, [long, queued]);
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn tokens_guard_clients_and_workers() {
    let Fixture {
        dir: _dir, data, c, ..
    } = fixture(2, Some("s3cret"), Duration::from_secs(30)).await;
    let mut anon = client_at(&format!("http://{}", c.addr), None)
        .await
        .unwrap();
    let e = anon
        .list_jobs(pb::ListJobsRequest { states: vec![] })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    let e = submit(&mut anon, recipe(&data, 4, 2)).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);

    let channel = Channel::from_shared(format!("http://{}", c.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let token: tonic::metadata::MetadataValue<_> = "Bearer s3cret".parse().unwrap();
    let mut cl =
        JobServiceClient::with_interceptor(channel.clone(), move |mut r: tonic::Request<()>| {
            r.metadata_mut().insert("authorization", token.clone());
            Ok(r)
        });
    let id = cl
        .submit_job(pb::SubmitJobRequest {
            spec_toml: recipe(&data, 4, 2),
            default_name: "t".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .job_id;

    // A worker call for the job with the client's token is refused.
    let bad: tonic::metadata::MetadataValue<_> = "Bearer s3cret".parse().unwrap();
    let mut ctl =
        ControlServiceClient::with_interceptor(channel, move |mut r: tonic::Request<()>| {
            r.metadata_mut().insert("authorization", bad.clone());
            Ok(r)
        });
    let e = ctl
        .heartbeat(pb::HeartbeatRequest {
            job_id: id.clone(),
            rank: 0,
            step: 0,
            attempt: 1,
            ..pb::HeartbeatRequest::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);

    // The job's own workers have the right token and finish.
    let start = Instant::now();
    loop {
        let j = cl
            .get_job(pb::GetJobRequest { job_id: id.clone() })
            .await
            .unwrap()
            .into_inner();
        if j.state() == pb::JobState::Succeeded {
            break;
        }
        assert!(
            !matches!(j.state(), pb::JobState::Failed | pb::JobState::Cancelled),
            "{j:?}"
        );
        assert!(start.elapsed() < Duration::from_secs(120));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    c.stop().await;
}

/// The same recipe, seed and data under every (tp, pp, dp) layout, with
/// real worker processes and TCP collectives, gives the single process's
/// per-step losses, tied and untied, over a curriculum that visits
/// several buckets.
#[tokio::test(flavor = "multi_thread")]
async fn every_layout_trains_like_one_process() {
    let Fixture {
        dir,
        data: _,
        c,
        mut cl,
    } = fixture(16, None, Duration::from_secs(60)).await;
    let data = dataset_40(dir.path()).await;
    let steps = 10;
    let layouts = [
        (1, 1, 1),
        (2, 1, 1),
        (1, 2, 1),
        (1, 1, 2),
        (2, 2, 1),
        (1, 2, 2),
        (2, 1, 2),
        (2, 2, 2),
    ];
    for tied in [true, false] {
        // All submitted at once; the queue runs them as slots free up.
        let mut ids = Vec::new();
        for l in layouts {
            ids.push(
                submit(&mut cl, recipe3d(&data, steps, l, tied))
                    .await
                    .unwrap(),
            );
        }
        let mut runs = Vec::new();
        for (id, l) in ids.iter().zip(layouts) {
            let j = until(&mut cl, id, 600, |j| {
                j.state() != pb::JobState::Queued && j.state() != pb::JobState::Running
            })
            .await;
            assert_eq!(
                j.state(),
                pb::JobState::Succeeded,
                "{l:?}: {}",
                j.failure_reason
            );
            let m = metrics(&mut cl, id).await;
            assert_eq!(m.len(), steps as usize, "{l:?}");
            for s in &m {
                assert_eq!(s.stages.len(), l.1 as usize, "{l:?}: a timing per stage");
                let theory = f64::from(l.1 - 1) / f64::from(2 + l.1 - 1);
                assert!((s.bubble_theory - theory).abs() < 1e-12, "{l:?}");
                for st in &s.stages {
                    assert!(
                        st.pipeline_s > 0.0 && (0.0..1.0).contains(&st.bubble),
                        "{l:?}: {st:?}"
                    );
                    assert_eq!(st.tp_comm_s > 0.0, l.0 > 1, "{l:?}: {st:?}");
                }
            }
            runs.push((l, m));
        }
        let (_, one) = &runs[0];
        let buckets: std::collections::HashSet<u32> = one.iter().map(|s| s.seq_log2).collect();
        assert!(
            buckets.len() > 1,
            "the curriculum stayed in one bucket: {buckets:?}"
        );
        assert!(
            one[steps as usize - 1].loss < one[0].loss,
            "no learning: {one:?}"
        );
        for (l, m) in &runs[1..] {
            let worst = one
                .iter()
                .zip(m)
                .map(|(a, b)| (a.loss - b.loss).abs() / a.loss)
                .fold(0.0, f64::max);
            eprintln!("layout {l:?} tied={tied}: largest relative loss difference {worst:e}");
            for (a, b) in one.iter().zip(m) {
                assert_eq!(a.seq_log2, b.seq_log2, "{l:?} step {}", a.step);
                let rel = (a.loss - b.loss).abs() / a.loss;
                assert!(
                    rel < 1e-4,
                    "{l:?} tied={tied} step {}: {} vs one process {} (rel {rel:e})",
                    a.step,
                    b.loss,
                    a.loss
                );
            }
        }
    }
    c.stop().await;
}

/// Interleaved 1F1B (two model chunks per stage) through real workers:
/// the losses of one process, and the wrap-around link between the last
/// and the first stage carries every chunk's traffic.
#[tokio::test(flavor = "multi_thread")]
async fn interleaved_pipelines_train_like_one_process() {
    let Fixture {
        dir,
        data: _,
        c,
        mut cl,
    } = fixture(8, None, Duration::from_secs(60)).await;
    let data = dataset_40(dir.path()).await;
    let steps = 10;
    let four_layers = |l: (u32, u32, u32), v: u32| {
        recipe3d(&data, steps, l, true)
            .replace("n_layers = 2", "n_layers = 4")
            .replace(
                "microbatches = 2",
                &format!("microbatches = 2\nvirtual_stages = {v}"),
            )
    };
    let mut runs = Vec::new();
    for (l, v) in [((1, 1, 1), 1), ((1, 2, 1), 2), ((2, 2, 2), 2)] {
        let id = submit(&mut cl, four_layers(l, v)).await.unwrap();
        let j = until(&mut cl, &id, 600, |j| {
            j.state() != pb::JobState::Queued && j.state() != pb::JobState::Running
        })
        .await;
        assert_eq!(
            j.state(),
            pb::JobState::Succeeded,
            "{l:?} v={v}: {}",
            j.failure_reason
        );
        let m = metrics(&mut cl, &id).await;
        let theory = f64::from(l.1 - 1) / f64::from(2 * v + l.1 - 1);
        assert!((m[0].bubble_theory - theory).abs() < 1e-12, "{l:?} v={v}");
        runs.push(m);
    }
    for (k, m) in runs[1..].iter().enumerate() {
        for (a, b) in runs[0].iter().zip(m) {
            let rel = (a.loss - b.loss).abs() / a.loss;
            assert!(
                rel < 1e-4,
                "run {k} step {}: {} vs {} (rel {rel:e})",
                a.step,
                b.loss,
                a.loss
            );
        }
    }
    c.stop().await;
}

/// A stage that dies in the middle of a pipeline fails the job, and the
/// reason names it; its peers, blocked on its messages, are stopped.
#[tokio::test(flavor = "multi_thread")]
async fn a_dead_pipeline_stage_fails_the_job_naming_it() {
    let f = fixture(8, None, Duration::from_secs(30)).await;
    let mut cl = f.cl.clone();
    let spec = format!(
        "{}[fault]\nmax_restarts = 0\n",
        recipe3d(&f.data, 100_000, (2, 2, 1), true)
    );
    let id = submit(&mut cl, spec).await.unwrap();
    until(&mut cl, &id, 120, |j| j.steps_done >= 1).await;
    assert_eq!(worker_pids(&f.c, &id).len(), 4);
    f.signal_rank(&id, 2, "-KILL");
    let j = until(&mut cl, &id, 60, |j| j.state() == pb::JobState::Failed).await;
    assert!(
        j.failure_reason
            .starts_with("rank 2 ended (killed by signal 9)"),
        "{}",
        j.failure_reason
    );
    until_workers_gone(&f.c, &id, "the other stages stop").await;
    f.c.stop().await;
}

async fn resume(
    cl: &mut Cl,
    id: &str,
    from_step: u64,
    (tp, pp, dp): (u32, u32, u32),
    discard_newer: bool,
) -> Result<pb::Job, tonic::Status> {
    cl.resume_job(pb::ResumeJobRequest {
        job_id: id.into(),
        from_step,
        tp,
        pp,
        dp,
        discard_newer,
        weights: Default::default(),
    })
    .await
    .map(|r| r.into_inner())
}

/// Through real workers: a (2, 2, 2) job killed mid-run (SIGKILL of one
/// worker) and resumed from its latest checkpoint finishes with the
/// per-step losses of an uninterrupted job, bit for bit, though it shards
/// its optimizer over dp (ZeRO-1) and the uninterrupted job does not; one resumed on
/// (1, 2, 1) follows them within 1e-4. Resumes that cannot be done are
/// refused naming why, and the attempts are recorded.
#[tokio::test(flavor = "multi_thread")]
async fn a_killed_job_resumes_from_its_checkpoint_exactly() {
    let Fixture {
        dir,
        data: _,
        c,
        mut cl,
    } = fixture(8, None, Duration::from_secs(60)).await;
    let data = dataset_40(dir.path()).await;
    let ck = dir.path().join("checkpoints");
    let steps = 30;
    let l = (2, 2, 2);
    let finished =
        |j: &pb::Job| j.state() != pb::JobState::Queued && j.state() != pb::JobState::Running;

    // The uninterrupted run.
    let a = submit(&mut cl, recipe_ck(&data, steps, l, &ck, 4))
        .await
        .unwrap();
    let j = until(&mut cl, &a, 300, finished).await;
    assert_eq!(j.state(), pb::JobState::Succeeded, "{}", j.failure_reason);
    let straight = metrics(&mut cl, &a).await;
    assert_eq!(straight.len(), steps as usize);
    let kept = cl
        .list_checkpoints(pb::ListCheckpointsRequest { job_id: a.clone() })
        .await
        .unwrap()
        .into_inner()
        .checkpoints;
    // Every 4 steps and at the end, the newest three kept.
    assert_eq!(
        kept.iter().map(|k| k.step).collect::<Vec<_>>(),
        [24, 28, 30]
    );
    for k in &kept {
        assert!(k.bytes > 0 && k.stall_s >= 0.0 && k.write_s > 0.0, "{k:?}");
        assert!(
            Path::new(k.url.trim_start_matches("file://"))
                .join("manifest.json")
                .exists()
        );
    }

    // The same job with its optimizer sharded, its rank 5 killed once a
    // checkpoint is complete (and no automatic restart).
    let sharded = recipe_fault(&data, steps, l, &ck, "max_restarts = 0").replace(
        "microbatches = 2\n",
        "microbatches = 2\nshard_optimizer = true\n",
    );
    assert!(sharded.contains("shard_optimizer"));
    let b = submit(&mut cl, sharded).await.unwrap();
    let e = resume(&mut cl, &b, 0, (0, 0, 0), false).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(
        e.message().contains("only an ended job resumes"),
        "{}",
        e.message()
    );
    until(&mut cl, &b, 300, |j| {
        j.last_checkpoint_step.unwrap_or(0) >= 8 || finished(j)
    })
    .await;
    let (_, pid) = worker_pids(&c, &b)
        .into_iter()
        .find(|(r, _)| *r == 5)
        .expect("rank 5 runs");
    signal(pid, "-KILL");
    let j = until(&mut cl, &b, 60, finished).await;
    assert_eq!(j.state(), pb::JobState::Failed);
    let saved = j.last_checkpoint_step.expect("a checkpoint");
    until_workers_gone(&c, &b, "workers outlived the failure").await;
    // A step that has no checkpoint, and one before the latest without
    // --discard-newer, are refused.
    let e = resume(&mut cl, &b, 3, (0, 0, 0), false).await.unwrap_err();
    assert!(
        e.message().contains("no complete checkpoint of step 3"),
        "{}",
        e.message()
    );
    if saved > 8 {
        let e = resume(&mut cl, &b, 8, (0, 0, 0), false).await.unwrap_err();
        assert!(e.message().contains("--discard-newer"), "{}", e.message());
    }
    let j = resume(&mut cl, &b, 0, (0, 0, 0), false).await.unwrap();
    assert_eq!(j.steps_done, saved);
    let j = until(&mut cl, &b, 300, finished).await;
    assert_eq!(j.state(), pb::JobState::Succeeded, "{}", j.failure_reason);
    assert_eq!(j.attempts.len(), 2, "{:?}", j.attempts);
    let (first, second) = (&j.attempts[0], &j.attempts[1]);
    assert_eq!(first.end_state(), pb::JobState::Failed);
    assert!(first.cause.contains("rank 5"), "{}", first.cause);
    assert_eq!(first.steps_lost, first.last_step - saved);
    assert_eq!(
        (second.from_step, second.end_state()),
        (saved, pb::JobState::Succeeded)
    );
    let resumed = metrics(&mut cl, &b).await;
    assert_eq!(resumed.len(), steps as usize);
    for (x, y) in straight.iter().zip(&resumed) {
        assert_eq!(
            (x.step, x.loss.to_bits(), x.grad_norm.to_bits()),
            (y.step, y.loss.to_bits(), y.grad_norm.to_bits()),
            "step {}: {} vs {} (resumed from {saved})",
            x.step,
            x.loss,
            y.loss
        );
    }

    // Resumed on another layout from step 24 of the finished job: the
    // later checkpoints go only when asked.
    let e = resume(&mut cl, &a, 24, (1, 2, 1), false).await.unwrap_err();
    assert!(e.message().contains("steps 28, 30"), "{}", e.message());
    let j = resume(&mut cl, &a, 24, (1, 2, 1), true).await.unwrap();
    assert_eq!(j.layout.unwrap().world_size, 2);
    let j = until(&mut cl, &a, 300, finished).await;
    assert_eq!(j.state(), pb::JobState::Succeeded, "{}", j.failure_reason);
    let again = metrics(&mut cl, &a).await;
    assert_eq!(again.len(), steps as usize);
    for (x, y) in straight.iter().zip(&again).skip(24) {
        let rel = (x.loss - y.loss).abs() / x.loss;
        assert!(
            rel < 1e-4,
            "step {}: {} vs {} (rel {rel:e})",
            x.step,
            x.loss,
            y.loss
        );
    }
    c.stop().await;
}

/// [`recipe_ck`] with a `[fault]` section.
fn recipe_fault(data: &str, steps: u64, l: (u32, u32, u32), dir: &Path, fault: &str) -> String {
    format!("{}[fault]\n{fault}\n", recipe_ck(data, steps, l, dir, 4))
}

/// The uninterrupted run's losses, to hold recovered runs to.
async fn straight_run(cl: &mut Cl, data: &str, steps: u64, dir: &Path) -> Vec<pb::StepMetrics> {
    let id = submit(cl, recipe_ck(data, steps, (2, 2, 2), dir, 4))
        .await
        .unwrap();
    let j = ended(cl, &id, 300).await;
    assert_eq!(j.state(), pb::JobState::Succeeded, "{}", j.failure_reason);
    metrics(cl, &id).await
}

/// Workers told to stop right after a checkpoint step (its save still
/// being written in the background) finish and report that save before
/// they leave: the next attempt continues from it, losing no step.
#[tokio::test(flavor = "multi_thread")]
async fn a_stop_just_after_a_checkpoint_step_keeps_that_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset_40(dir.path()).await;
    let mut cfg = config(&dir.path().join("state"), 2, None);
    cfg.worker_env.push((
        "STRATA_FAULT_STOP_AFTER".into(),
        "layout-1-1-2-1:1:8".into(),
    ));
    let c = Coordinator::start(cfg).await.unwrap();
    let mut cl = client(&c).await;
    let ck = dir.path().join("checkpoints");
    let id = submit(
        &mut cl,
        recipe_fault(&data, 12, (1, 1, 2), &ck, "max_restarts = 1"),
    )
    .await
    .unwrap();
    assert_eq!(id, "layout-1-1-2-1");
    let j = ended(&mut cl, &id, 300).await;
    assert_eq!(j.state(), pb::JobState::Succeeded, "{}", j.failure_reason);
    assert_eq!(j.attempts.len(), 2, "{:?}", j.attempts);
    assert_eq!(j.attempts[0].last_step, 8, "{:?}", j.attempts);
    assert_eq!(j.attempts[1].from_step, 8, "{:?}", j.attempts);
    assert_eq!(j.attempts[0].steps_lost, 0, "{:?}", j.attempts);
    c.stop().await;
}

/// SIGKILL of one worker of a (2, 2, 2) run, and separately SIGSTOP of
/// one (silent: a stopped process or a lost machine), and a rank whose
/// step stops moving while its heartbeats go on (a hang): each job
/// restarts from its latest checkpoint by itself and ends with the
/// uninterrupted run's losses, bit for bit, its attempts recorded.
#[tokio::test(flavor = "multi_thread")]
async fn a_failed_attempt_restarts_from_the_latest_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset_40(dir.path()).await;
    let mut cfg = config(&dir.path().join("state"), 8, None);
    cfg.heartbeat_timeout = Duration::from_secs(3);
    cfg.worker_env.push((
        "STRATA_FAULT_HANG_AT".into(),
        "layout-2-2-2-4:1:6:14".into(),
    ));
    let c = Coordinator::start(cfg).await.unwrap();
    let mut cl = client(&c).await;
    let ck = dir.path().join("checkpoints");
    let steps = 24;
    let want = straight_run(&mut cl, &data, steps, &dir.path().join("straight")).await;

    for (sig, rank) in [("-KILL", 3u32), ("-STOP", 5)] {
        let id = submit(
            &mut cl,
            recipe_fault(&data, steps, (2, 2, 2), &ck, "max_restarts = 2"),
        )
        .await
        .unwrap();
        until(&mut cl, &id, 300, |j| {
            j.last_checkpoint_step.unwrap_or(0) >= 8
        })
        .await;
        let (_, pid) = worker_pids(&c, &id)
            .into_iter()
            .find(|(r, _)| *r == rank)
            .expect("the rank runs");
        let killed = Instant::now();
        let before = get(&mut cl, &id).await.steps_done;
        signal(pid, sig);
        // Recovery time: from the signal to the next step completed.
        let j = until(&mut cl, &id, 300, |j| {
            j.attempts.len() == 2
                && j.state() == pb::JobState::Running
                && j.steps_done > j.attempts[1].from_step
        })
        .await;
        eprintln!(
            "{sig} at step {before}: step {} done {:.2} s later (resumed from {})",
            j.steps_done,
            killed.elapsed().as_secs_f64(),
            j.attempts[1].from_step
        );
        let j = ended(&mut cl, &id, 300).await;
        assert_eq!(
            j.state(),
            pb::JobState::Succeeded,
            "{sig}: {}",
            j.failure_reason
        );
        assert_eq!(j.attempts.len(), 2, "{sig}: {:?}", j.attempts);
        let cause = &j.attempts[0].cause;
        assert!(cause.contains(&format!("rank {rank}")), "{sig}: {cause}");
        if sig == "-STOP" {
            assert!(cause.contains("no heartbeat"), "{cause}");
            // Killed by now: SIGKILL ends a stopped process too.
            assert!(!Path::new(&format!("/proc/{pid}")).exists());
        }
        assert_bit_identical(&want, &metrics(&mut cl, &id).await, sig);
    }

    // A hang: rank 6 of attempt 1 of job 4 stops before step 14 and
    // keeps heartbeating; the hang timeout restarts the attempt.
    let id = submit(
        &mut cl,
        recipe_fault(&data, steps, (2, 2, 2), &ck, "hang_timeout_s = 3"),
    )
    .await
    .unwrap();
    assert_eq!(id, "layout-2-2-2-4");
    let j = ended(&mut cl, &id, 300).await;
    assert_eq!(j.state(), pb::JobState::Succeeded, "{}", j.failure_reason);
    assert_eq!(j.attempts.len(), 2, "{:?}", j.attempts);
    let cause = &j.attempts[0].cause;
    // Every rank waits for rank 6 at step 13: all are named, as a range.
    assert!(
        cause.contains("hung") && cause.contains("ranks 0–7") && cause.contains("step 13"),
        "{cause}"
    );
    assert_eq!(j.attempts[1].from_step, 12);
    assert_bit_identical(&want, &metrics(&mut cl, &id).await, "hang");
    c.stop().await;
}

/// Past `[fault] max_restarts` failures the job fails, naming every
/// attempt's cause.
#[tokio::test(flavor = "multi_thread")]
async fn a_job_that_keeps_failing_fails_naming_every_attempt() {
    let Fixture {
        dir,
        data: _,
        c,
        mut cl,
    } = fixture(8, None, Duration::from_secs(30)).await;
    let data = dataset_40(dir.path()).await;
    let ck = dir.path().join("checkpoints");
    let id = submit(
        &mut cl,
        recipe_fault(&data, 100_000, (1, 1, 2), &ck, "max_restarts = 1"),
    )
    .await
    .unwrap();
    for attempt in 1..=2 {
        until(&mut cl, &id, 120, |j| {
            j.attempts.len() == attempt
                && j.state() == pb::JobState::Running
                && j.steps_done > j.attempts[attempt - 1].from_step
        })
        .await;
        let (_, pid) = worker_pids(&c, &id)
            .into_iter()
            .find(|(r, _)| *r == 1)
            .expect("rank 1 runs");
        signal(pid, "-KILL");
    }
    let j = ended(&mut cl, &id, 60).await;
    assert_eq!(j.state(), pb::JobState::Failed);
    let why = &j.failure_reason;
    assert!(
        why.contains("max_restarts = 1")
            && why.contains("attempt 1: rank 1")
            && why.contains("attempt 2: rank 1"),
        "{why}"
    );
    until_workers_gone(&c, &id, "workers outlived the failure").await;
    c.stop().await;
}

/// A cancelled job's workers stop after the same step, save it and leave:
/// the checkpoint is complete although no periodic one was due, and the
/// job resumes from it.
#[tokio::test(flavor = "multi_thread")]
async fn a_cancelled_job_saves_its_last_step() {
    let Fixture {
        dir,
        data: _,
        c,
        mut cl,
    } = fixture(4, None, Duration::from_secs(30)).await;
    let data = dataset_40(dir.path()).await;
    let ck = dir.path().join("checkpoints");
    let id = submit(&mut cl, recipe_ck(&data, 100_000, (1, 2, 2), &ck, 100_000))
        .await
        .unwrap();
    until(&mut cl, &id, 120, |j| j.steps_done >= 3).await;
    let j = cl
        .cancel_job(pb::CancelJobRequest {
            job_id: id.clone(),
            reason: "enough".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let at_cancel = j.steps_done;
    until_workers_gone(&c, &id, "workers outlived their grace period").await;
    let j = get(&mut cl, &id).await;
    assert_eq!(j.state(), pb::JobState::Cancelled);
    for r in 0..4 {
        let log = Path::new(&j.run_dir).join(format!("attempt-1/rank-{r}.log"));
        eprintln!(
            "--- rank {r}\n{}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
    }
    let saved = j.last_checkpoint_step.expect("a checkpoint at cancel");
    assert!(
        saved >= at_cancel,
        "saved {saved}, cancelled at {at_cancel}"
    );
    assert_eq!(j.attempts[0].steps_lost, 0, "{:?}", j.attempts[0]);
    let j = resume(&mut cl, &id, 0, (0, 0, 0), false).await.unwrap();
    assert_eq!(j.steps_done, saved);
    let j = until(&mut cl, &id, 120, |j| {
        j.attempts.len() == 2 && j.steps_done > saved
    })
    .await;
    assert_eq!(j.attempts[1].from_step, saved);
    cl.cancel_job(pb::CancelJobRequest {
        job_id: id.clone(),
        reason: String::new(),
    })
    .await
    .unwrap();
    until_workers_gone(&c, &id, "workers outlived their grace period").await;
    c.stop().await;
}

/// A coordinator process killed with SIGKILL mid-run, and another started
/// on its state folder and address: the job finishes from its checkpoint
/// with the uninterrupted run's losses, bit for bit, and the orphaned
/// workers of the killed coordinator's attempt are gone (the new one ends
/// those its predecessor noted; one that slipped through is refused and
/// leaves).
#[tokio::test(flavor = "multi_thread")]
async fn a_killed_coordinator_process_is_replaced_and_the_job_finishes() {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset_40(dir.path()).await;
    let state = dir.path().join("state");
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let start = || {
        Command::new(env!("CARGO_BIN_EXE_strata"))
            .args(["coordinator", "--listen", &format!("127.0.0.1:{port}")])
            .arg("--state-dir")
            .arg(&state)
            .args(["--slots", "4"])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap()
    };
    let connect = || connect(&url, &state);
    let mut first = start();
    let mut cl = connect().await;
    let steps = 24;
    let l = (1, 2, 2);
    let straight = submit(
        &mut cl,
        recipe_ck(&data, steps, l, &dir.path().join("a"), 4),
    )
    .await
    .unwrap();
    let j = ended(&mut cl, &straight, 300).await;
    assert_eq!(j.state(), pb::JobState::Succeeded, "{}", j.failure_reason);
    let want = metrics(&mut cl, &straight).await;

    let id = submit(
        &mut cl,
        recipe_ck(&data, steps, l, &dir.path().join("b"), 4),
    )
    .await
    .unwrap();
    until(&mut cl, &id, 300, |j| {
        j.last_checkpoint_step.unwrap_or(0) >= 8
    })
    .await;
    first.kill().unwrap();
    first.wait().unwrap();
    // Its workers outlive it (rank 0's next report fails, or the new
    // coordinator refuses their attempt).
    let orphans = worker_procs(&url, &id);

    let mut second = start();
    let mut cl = connect().await;
    let j = ended(&mut cl, &id, 300).await;
    assert_eq!(j.state(), pb::JobState::Succeeded, "{}", j.failure_reason);
    assert_eq!(j.attempts.len(), 2, "{:?}", j.attempts);
    assert!(j.attempts[0].interrupted);
    assert_bit_identical(&want, &metrics(&mut cl, &id).await, "after SIGKILL");
    // The orphans were ended or refused.
    let t = Instant::now();
    let alive = |pid: &u32| {
        std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
            !s.rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        })
    };
    while orphans.iter().any(|(_, pid)| alive(pid)) {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "orphaned workers outlived the new coordinator's start"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    second.kill().unwrap();
    second.wait().unwrap();
}

/// A WSD job's stable-phase checkpoint branched into a cooldown: the
/// branch is a new job that starts from the parent's step-8 checkpoint
/// (its first loss is the parent's step-9 loss, bit for bit: same weights,
/// same data), decays to 0 over its 1,024 tokens and ends at step 12,
/// records its parent, and `strata list` shows it under the parent.
/// Branches from a checkpoint inside the decay, from a missing step, or of
/// a schedule without a decay are refused saying why.
#[tokio::test(flavor = "multi_thread")]
async fn a_branch_decays_from_a_stable_phase_checkpoint() {
    let Setup {
        dir,
        data,
        c,
        mut cl,
        ..
    } = setup().await;
    let ck = dir.path().join("ck");
    // 16 steps of 256 tokens: warmup 2 steps, stable to step 12, decay 4.
    let spec = recipe_ck(&data, 16, (1, 1, 1), &ck, 4).replace(
        "kind = \"constant\"",
        "kind = \"wsd\"\nwarmup_tokens = 512\ndecay_tokens = 1024",
    );
    let parent = submit(&mut cl, spec.clone()).await.unwrap();
    let j = ended(&mut cl, &parent, 300).await;
    assert_eq!(j.state(), pb::JobState::Succeeded, "{}", j.failure_reason);
    let want = metrics(&mut cl, &parent).await;

    let branch = |from_step: u64, decay_tokens: u64| pb::BranchJobRequest {
        parent_id: parent.clone(),
        from_step,
        decay_tokens,
        decay_shape: String::new(),
        final_lr_fraction: None,
        name: String::new(),
        weights: Default::default(),
    };
    let b = cl.branch_job(branch(8, 1024)).await.unwrap().into_inner();
    assert_eq!((b.parent_job.as_str(), b.parent_step), (parent.as_str(), 8));
    assert_eq!((b.steps_done, b.steps_total), (8, 12));
    let j = ended(&mut cl, &b.job_id, 300).await;
    assert_eq!(j.state(), pb::JobState::Succeeded, "{}", j.failure_reason);
    assert_eq!(j.attempts[0].from_step, 8);
    let got = metrics(&mut cl, &b.job_id).await;
    assert_eq!(
        got.iter().map(|s| s.step).collect::<Vec<_>>(),
        vec![9, 10, 11, 12]
    );
    assert_eq!(got[0].loss.to_bits(), want[8].loss.to_bits(), "step 9");
    assert!(
        got.windows(2).all(|w| w[1].lr < w[0].lr),
        "the branch decays: {:?}",
        got.iter().map(|s| s.lr).collect::<Vec<_>>()
    );
    assert_eq!(got[3].lr, 0.0);
    assert_eq!(
        want[11].lr, want[8].lr,
        "the parent is still stable at step 12"
    );
    assert_ne!(got[3].loss, want[11].loss);

    // Refusals.
    let e = cl.branch_job(branch(16, 1024)).await.unwrap_err();
    assert!(
        e.message()
            .contains("past the start of its decay (3072 tokens)"),
        "{e:?}"
    );
    let e = cl.branch_job(branch(5, 1024)).await.unwrap_err();
    assert!(
        e.message()
            .contains("no complete checkpoint at step 5 (it has: 8, 12, 16)"),
        "{e:?}"
    );
    let flat = submit(&mut cl, recipe_ck(&data, 4, (1, 1, 1), &ck, 4))
        .await
        .unwrap();
    ended(&mut cl, &flat, 300).await;
    let e = cl
        .branch_job(pb::BranchJobRequest {
            parent_id: flat.clone(),
            ..branch(4, 256)
        })
        .await
        .unwrap_err();
    assert!(e.message().contains("follows a constant schedule"), "{e:?}");

    // The results table of these three jobs, as CSV and Parquet; a fit
    // of it says why it cannot (three runs).
    let url = format!("http://{}", c.addr);
    let csv = dir.path().join("results.csv");
    let pq = dir.path().join("results.parquet");
    let out = Command::new(env!("CARGO_BIN_EXE_strata"))
        .args(["results", "--coordinator", &url, "--csv"])
        .arg(&csv)
        .arg("--parquet")
        .arg(&pq)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table = std::fs::read_to_string(&csv).unwrap();
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 4, "{table}");
    assert!(
        lines[0].starts_with("job,name,state,parent,parent_step,n,n_total,d,"),
        "{table}"
    );
    let row = lines.iter().find(|l| l.starts_with(&b.job_id)).unwrap();
    assert!(row.contains(&format!(",succeeded,{parent},8,")), "{row}");
    assert!(row.contains(",3072,"), "D of the branch: {row}");
    assert!(std::fs::read(&pq).unwrap().starts_with(b"PAR1"));
    let out = Command::new(env!("CARGO_BIN_EXE_strata"))
        .arg("fit")
        .arg(&csv)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("3 points; the fit needs at least 6"), "{err}");

    // The tree.
    let out = Command::new(env!("CARGO_BIN_EXE_strata"))
        .args(["list", "--coordinator", &format!("http://{}", c.addr)])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    let p = lines.iter().position(|l| l.starts_with(&parent)).unwrap();
    assert!(
        lines[p + 1].starts_with(&format!("└ {} (from 8)", b.job_id)),
        "{text}"
    );
    c.stop().await;
}

/// [`recipe_ck`] training on a mixture of `sources` (name, dataset,
/// weight) with `[eval]`, plus `extra` TOML for `[data]` (phases).
fn mixture_recipe(sources: &[(&str, &str, f64)], steps: u64, dir: &Path, extra: &str) -> String {
    let mut mix = String::new();
    for (name, data, weight) in sources {
        mix.push_str(&format!(
            "[[data.sources]]\nname = \"{name}\"\ndataset = \"{data}\"\nweight = {weight:?}\n"
        ));
    }
    let base = recipe_ck("X", steps, (2, 2, 2), dir, 4);
    let base = base.replace("dataset = \"X\"\n", "");
    format!("{base}[fault]\nmax_restarts = 0\n[eval]\nevery_steps = 5\ntokens = 1040\n{mix}{extra}")
}

/// Each source's tokens and loss in a step, checked against the weights:
/// within one sequence of its share, the sources' losses averaging to the
/// step's.
fn check_shares(s: &pb::StepMetrics, weights: &[f64]) {
    let seq = 1u64 << s.seq_log2;
    let total: u64 = s.sources.iter().map(|x| x.tokens).sum();
    assert_eq!(total, 256, "step {}: {:?}", s.step, s.sources);
    let mut mean = 0.0;
    for (x, w) in s.sources.iter().zip(weights) {
        let want = w * 256.0;
        assert!(
            (x.tokens as f64 - want).abs() < seq as f64,
            "step {}: {} has {} tokens, its weight {w} asks {want} (sequences of {seq})",
            s.step,
            x.name,
            x.tokens
        );
        assert_eq!(x.tokens % seq, 0);
        if let Some(l) = x.loss {
            mean += l * x.tokens as f64 / 256.0;
        }
    }
    let rel = (mean - s.loss).abs() / s.loss;
    assert!(
        rel < 1e-5,
        "step {}: sources average {mean}, the step {}",
        s.step,
        s.loss
    );
}

/// A job over three sources weighed 0.5/0.3/0.2 trains under (2, 2, 2):
/// every step gives each source its share to one sequence, the sources'
/// losses (and held-out losses) are reported through the metrics, the
/// watch's JSON and /metrics; killed and resumed with new weights, it
/// continues from its cursor exactly as a run planned with those weights
/// from that step does, bit for bit.
#[tokio::test(flavor = "multi_thread")]
async fn a_mixture_trains_each_source_its_share_and_resumes_with_new_weights() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = sotu_40();
    let mut sets = Vec::new();
    for (i, name) in ["web", "code", "math"].into_iter().enumerate() {
        let part = &corpus[i * 13..(i + 1) * 13];
        sets.push(decompose_holding_out(dir.path(), name, part, 0.25).await);
    }
    let sources = |w: [f64; 3]| {
        vec![
            ("web", sets[0].as_str(), w[0]),
            ("code", sets[1].as_str(), w[1]),
            ("math", sets[2].as_str(), w[2]),
        ]
    };
    let mut cfg = config(&dir.path().join("state"), 8, None);
    cfg.http_listen = Some("127.0.0.1:0".parse().unwrap());
    let c = Coordinator::start(cfg).await.unwrap();
    let mut cl = client(&c).await;
    let ck = dir.path().join("ck");
    let steps = 20;
    let first = [0.5, 0.3, 0.2];
    let spec = mixture_recipe(&sources(first), steps, &ck, "");

    // A source that must not run out, and would, is refused at submission.
    let e = submit(
        &mut cl,
        mixture_recipe(&sources(first), 5000, &ck, "").replacen(
            "name = \"code\"\n",
            "name = \"code\"\nexhausted = \"stop\"\n",
            1,
        ),
    )
    .await
    .unwrap_err();
    assert!(
        e.message()
            .contains("source code ran out of sequences at step"),
        "{}",
        e.message()
    );

    // Killed once a checkpoint is complete.
    let id = submit(&mut cl, spec).await.unwrap();
    until(&mut cl, &id, 300, |j| {
        j.last_checkpoint_step.unwrap_or(0) >= 8
            || j.state() != pb::JobState::Running && j.state() != pb::JobState::Queued
    })
    .await;
    let (_, pid) = worker_pids(&c, &id)
        .into_iter()
        .find(|(r, _)| *r == 5)
        .expect("rank 5 runs");
    signal(pid, "-KILL");
    let j = ended(&mut cl, &id, 120).await;
    assert_eq!(j.state(), pb::JobState::Failed);
    let saved = j.last_checkpoint_step.expect("a checkpoint");
    until_workers_gone(&c, &id, "workers outlived the failure").await;
    let before = metrics(&mut cl, &id).await;
    for s in &before {
        check_shares(s, &first);
        let evaluated = s.step % 5 == 0;
        assert_eq!(s.eval_loss.is_some(), evaluated, "step {}", s.step);
        assert!(s.sources.iter().all(|x| x.eval_loss.is_some() == evaluated));
        if let Some(e) = s.eval_loss {
            let mean: f64 = s
                .sources
                .iter()
                .zip(first)
                .map(|(x, w)| w * x.eval_loss.unwrap())
                .sum();
            assert!(
                (mean - e).abs() < 1e-9 * e,
                "step {}: {mean} vs {e}",
                s.step
            );
        }
    }

    // Resumed with new weights: one weight missing is refused, naming it.
    let resume_with = |weights: Vec<(&str, f64)>| pb::ResumeJobRequest {
        job_id: id.clone(),
        weights: weights
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
        ..Default::default()
    };
    let e = cl
        .resume_job(resume_with(vec![("web", 1.0), ("code", 1.0)]))
        .await
        .unwrap_err();
    assert!(
        e.message().contains("no weight for math"),
        "{}",
        e.message()
    );
    let later = [0.2, 0.2, 0.6];
    cl.resume_job(resume_with(vec![
        ("web", 0.2),
        ("code", 0.2),
        ("math", 0.6),
    ]))
    .await
    .unwrap();
    let j = ended(&mut cl, &id, 300).await;
    assert_eq!(j.state(), pb::JobState::Succeeded, "{}", j.failure_reason);
    let resumed = metrics(&mut cl, &id).await;
    assert_eq!(resumed.len(), steps as usize);
    for s in &resumed {
        check_shares(s, if s.step <= saved { &first } else { &later });
    }
    // TensorBoard's own reader sees in the job's event files what
    // `strata metrics --json` shows: one curve across the kill and the
    // resume (the steps the first attempt ran past its checkpoint
    // dropped), per-source and held-out losses included.
    let events = Path::new(&j.run_dir).join("tensorboard");
    let files = std::fs::read_dir(&events).unwrap().count();
    assert_eq!(
        files,
        2,
        "one event file per attempt in {}",
        events.display()
    );
    if tensorboard_here() {
        let tb = tb_read(&events);
        let v = metrics_json(&c, &id);
        let rows = v.as_array().unwrap();
        let series = |tag: &str| -> Vec<(u64, f64)> {
            tb[tag]
                .as_array()
                .unwrap_or_else(|| panic!("no {tag} in {tb}"))
                .iter()
                .map(|p| (p[0].as_u64().unwrap(), p[1].as_f64().unwrap()))
                .collect()
        };
        let same = |tag: &str, want: Vec<(u64, f64)>| {
            let got = series(tag);
            assert_eq!(
                got.iter().map(|p| p.0).collect::<Vec<_>>(),
                want.iter().map(|p| p.0).collect::<Vec<_>>(),
                "{tag}: steps"
            );
            for ((step, a), (_, b)) in got.iter().zip(&want) {
                // Event files hold f32.
                assert!(
                    (a - b).abs() <= 1e-6 * b.abs().max(1e-30),
                    "{tag} at step {step}: tensorboard {a} vs strata {b}"
                );
            }
        };
        let column = |f: &dyn Fn(&serde_json::Value) -> Option<f64>| -> Vec<(u64, f64)> {
            rows.iter()
                .filter_map(|r| Some((r["step"].as_u64()?, f(r)?)))
                .collect()
        };
        assert_eq!(rows.len(), steps as usize);
        same("train/loss", column(&|r| r["loss"].as_f64()));
        same("train/lr", column(&|r| r["lr"].as_f64()));
        same("train/tokens", column(&|r| r["tokens"].as_f64()));
        same("train/grad_norm", column(&|r| r["grad_norm"].as_f64()));
        same("perf/tokens_per_s", column(&|r| r["tokens_per_s"].as_f64()));
        same("eval/loss", column(&|r| r["eval_loss"].as_f64()));
        for (i, name) in ["web", "code", "math"].into_iter().enumerate() {
            for field in ["loss", "tokens", "eval_loss"] {
                same(
                    &format!("sources/{name}/{field}"),
                    column(&|r| r["sources"][i][field].as_f64()),
                );
            }
        }
    }

    // The same plan from the start: weights changing at that step.
    let phase = format!(
        "[[data.phases]]\nat_tokens = {}\nweights = {{ web = 0.2, code = 0.2, math = 0.6 }}\n",
        saved * 256
    );
    let planned = submit(
        &mut cl,
        mixture_recipe(&sources(first), steps, &dir.path().join("ck2"), &phase),
    )
    .await
    .unwrap();
    // While it runs, /metrics has each source's loss of its last step.
    let body = scrape_while_running(&c, &mut cl, &planned, 1, "strata_job_source_loss").await;
    for name in ["web", "code", "math"] {
        for family in ["strata_job_source_loss", "strata_job_source_tokens"] {
            let line = format!("{family}{{job=\"{planned}\",source=\"{name}\"}}");
            assert!(body.contains(&line), "{line} missing:\n{body}");
        }
    }
    let j = ended(&mut cl, &planned, 300).await;
    assert_eq!(j.state(), pb::JobState::Succeeded, "{}", j.failure_reason);
    let want = metrics(&mut cl, &planned).await;
    for (x, y) in want.iter().zip(&resumed) {
        assert_eq!(
            (x.step, x.loss.to_bits(), x.seq_log2, &x.sources),
            (y.step, y.loss.to_bits(), y.seq_log2, &y.sources),
            "step {} (resumed from {saved})",
            x.step
        );
    }

    // `strata metrics --json` gives every step its sources.
    let v = metrics_json(&c, &planned);
    let last = &v.as_array().unwrap()[steps as usize - 1];
    let names: Vec<&str> = last["sources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["web", "code", "math"]);
    let tokens: u64 = last["sources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["tokens"].as_u64().unwrap())
        .sum();
    assert_eq!(tokens, 256);
    assert!(last["sources"][2]["loss"].as_f64().unwrap() > 0.0);
    c.stop().await;
}

/// Loss-based reweighting through real workers: after its warm-up each
/// step weighs every sequence by its loss within groups of 8, the same
/// under (2,2,2) as in one process (losses to 1e-4); the multipliers'
/// spread is in the step metrics, `strata metrics --json` and `/metrics`.
#[tokio::test(flavor = "multi_thread")]
async fn reweighting_trains_alike_under_any_layout_and_shows_its_spread() {
    let dir = tempfile::tempdir().unwrap();
    let data = dataset_40(dir.path()).await;
    let mut cfg = config(&dir.path().join("state"), 8, None);
    cfg.http_listen = Some("127.0.0.1:0".parse().unwrap());
    let c = Coordinator::start(cfg).await.unwrap();
    let mut cl = client(&c).await;
    let steps = 8;
    // 1024 tokens of 64 at the longest in 2 microbatches: 8 sequences
    // per microbatch of the step, one group, which under (2,2,2) spans the
    // two replicas (their losses gathered over dp).
    let recipe = |l| {
        recipe3d(&data, steps, l, false)
            .replace("tokens_per_step = 256", "tokens_per_step = 1024")
            .replace(
                &format!("total_tokens = {}", steps * 256),
                &format!(
                    "total_tokens = {}\n[data.reweighting]\nstrategy = \"linupper\"\ngroup = 8\ntemperature = 0.5\nstart_tokens = 2048",
                    steps * 1024
                ),
            )
    };
    let one = submit(&mut cl, recipe((1, 1, 1))).await.unwrap();
    let three = submit(&mut cl, recipe((2, 2, 2))).await.unwrap();
    // While (2,2,2) runs, /metrics shows its spread.
    let std_line = format!("strata_job_sample_weight_std{{job=\"{three}\"}}");
    let body = scrape_while_running(&c, &mut cl, &three, 3, &std_line).await;
    for family in ["min", "max", "effective"] {
        let line = format!("strata_job_sample_weight_{family}{{job=\"{three}\"}}");
        assert!(body.contains(&line), "{line} missing:\n{body}");
    }
    let mut runs = Vec::new();
    for id in [&one, &three] {
        let j = ended(&mut cl, id, 600).await;
        assert_eq!(j.state(), pb::JobState::Succeeded, "{}", j.failure_reason);
        let m = metrics(&mut cl, id).await;
        assert_eq!(m.len(), steps as usize);
        runs.push(m);
    }
    for (a, b) in runs[0].iter().zip(&runs[1]) {
        // Uniform for the warm-up's two steps, then weighed unevenly.
        assert_eq!(a.weights.is_some(), a.step > 2, "step {}", a.step);
        if let (Some(x), Some(y)) = (a.weights, b.weights) {
            assert!(
                x.std > 0.0 && x.min < 1.0 && x.max > 1.0 && x.effective < 1.0,
                "{x:?}"
            );
            assert!(
                (x.std - y.std).abs() < 1e-3,
                "step {}: {x:?} vs {y:?}",
                a.step
            );
        } else {
            assert!(b.weights.is_none(), "step {}", b.step);
        }
        let rel = (a.loss - b.loss).abs() / a.loss;
        assert!(
            rel < 1e-4,
            "step {}: {} vs {} (rel {rel:e})",
            a.step,
            a.loss,
            b.loss
        );
    }
    let v = metrics_json(&c, &one);
    let steps_json = v.as_array().unwrap();
    assert!(steps_json[0]["weights"].is_null());
    let w = &steps_json[steps as usize - 1]["weights"];
    assert!(w["std"].as_f64().unwrap() > 0.0, "{w}");
    assert!(w["effective"].as_f64().unwrap() < 1.0, "{w}");
    c.stop().await;
}

/// Whether python3 has the `tensorboard` package (its event reader is
/// the check).
fn tensorboard_here() -> bool {
    strata_tests::python::has("tensorboard", "STRATA_REQUIRE_TENSORBOARD")
}

/// `scripts/tb_read.py`'s scalars of the event files in `dir`.
fn tb_read(dir: &Path) -> serde_json::Value {
    strata_tests::python::script_json("tb_read.py", &[dir])
}

/// `/metrics` once it shows `needle`, scraped while job `id` runs and has
/// taken `min_steps` steps (those metrics are of running jobs only).
async fn scrape_while_running(
    c: &Coordinator,
    cl: &mut Cl,
    id: &str,
    min_steps: u64,
    needle: &str,
) -> String {
    let http = c.http_addr.unwrap();
    loop {
        let j = get(cl, id).await;
        assert!(
            j.state() == pb::JobState::Running || j.state() == pb::JobState::Queued,
            "{id} ended before /metrics showed {needle}"
        );
        if j.steps_done >= min_steps {
            let (code, body) = get_http(http, "/metrics", None);
            assert_eq!(code, 200);
            if body.contains(needle) {
                return body;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `strata metrics ID --json`, parsed.
fn metrics_json(c: &Coordinator, id: &str) -> serde_json::Value {
    let out = Command::new(env!("CARGO_BIN_EXE_strata"))
        .args([
            "metrics",
            id,
            "--json",
            "--coordinator",
            &format!("http://{}", c.addr),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A progress that stops the decompose at its first batch, as a worker
/// told to stop does.
struct StopAtOnce;
impl strata_dataplane::corpus::Progress for StopAtOnce {
    fn batch_written(&self) -> Result<(), strata_dataplane::corpus::CorpusError> {
        Err(strata_dataplane::corpus::CorpusError::Stopped(
            "told to".into(),
        ))
    }
}

/// A corpus decomposed in parts, as workers do, and committed holds what
/// one process's decompose of it holds, for any number of parts; a part
/// stopped mid-way is written again and a finished one is left alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parts_committed_hold_what_one_process_writes() {
    use strata_dataplane::corpus::{Corpus, CorpusOptions, Quiet, decompose_corpus};
    use strata_dataplane::decompose::{Buckets, SplitLong};
    use strata_dataplane::manifest::{Layout, TokenizerInfo};
    use strata_dataplane::parts::{
        CorpusPlan, DecomposeJob, PartOutcome, PartsError, commit, plan_parts, run_part,
    };
    use strata_dataplane::store::Location;
    use strata_dataplane::tokenize::TokenizerKind;
    use strata_dataplane::writer::{DatasetWriter, WriterOptions};
    let input = tempfile::tempdir().unwrap();
    let mut texts = Vec::new();
    for f in sotu_40().iter().step_by(5) {
        let text = std::fs::read_to_string(f).unwrap();
        std::fs::write(input.path().join(f.file_name().unwrap()), &text).unwrap();
        texts.push(text);
    }
    // A file of many documents, so ids count within a file too.
    let lines: String = texts[0]
        .split("\n\n")
        .filter(|p| !p.trim().is_empty())
        .take(40)
        .map(|p| format!("{}\n", serde_json::json!({ "text": p })))
        .collect();
    std::fs::write(input.path().join("zz-paragraphs.jsonl"), lines).unwrap();
    let out = tempfile::tempdir().unwrap();
    let whole = Location::parse(out.path().join("whole").to_str().unwrap(), true).unwrap();
    let mut w = DatasetWriter::create(
        whole.clone(),
        WriterOptions {
            tokenizer: TokenizerInfo::of(&TokenizerKind::R50k.load()),
            layout: Layout::Decomposed {
                split_long: SplitLong::Largest,
            },
            buckets: Buckets::new(4, 8).unwrap(),
            seed: 7,
            shard_bytes: 256 << 10,
            overwrite: false,
        },
    )
    .await
    .unwrap();
    w.hold_out(0.2).unwrap();
    decompose_corpus(
        &[input.path().to_path_buf()],
        TokenizerKind::R50k.load(),
        w,
        &Quiet,
    )
    .await
    .unwrap();
    let corpus = Corpus::open(&[input.path().to_path_buf()], CorpusOptions::default())
        .await
        .unwrap();
    let job = |name: &str, parts: u32| DecomposeJob {
        name: name.into(),
        inputs: vec![input.path().display().to_string()],
        text_field: "text".into(),
        split: None,
        output: out.path().join(name).display().to_string(),
        tokenizer: "r50k".into(),
        buckets: Buckets::new(4, 8).unwrap(),
        split_long: SplitLong::Largest,
        seed: 7,
        shard_bytes: 256 << 10,
        holdout_fraction: 0.2,
        max_restarts: 0,
        corpus: CorpusPlan::of(&corpus),
        parts: plan_parts(&corpus.files(), parts).unwrap(),
    };
    for n in [1, 2, 4] {
        let job = job(&format!("parts-{n}"), n);
        for p in 0..n as usize {
            let done = run_part(&job, p, 1, &Quiet).await.unwrap();
            assert!(matches!(done, PartOutcome::Written(_)));
        }
        let m = commit(&job).await.unwrap();
        assert!(
            m.buckets
                .iter()
                .flat_map(|b| &b.shards)
                .all(|s| s.key.starts_with("parts/p"))
        );
        assert_same_dataset(&whole, &job.output().unwrap(), &format!("{n} parts")).await;
    }

    // Part 1 stops mid-way: nothing is committed until it is written again;
    // part 0, finished, is not.
    let job = job("stopped", 3);
    run_part(&job, 0, 1, &Quiet).await.unwrap();
    let stopped = run_part(&job, 1, 1, &StopAtOnce).await;
    assert!(
        matches!(
            stopped,
            Err(PartsError::Corpus(
                strata_dataplane::corpus::CorpusError::Stopped(_)
            ))
        ),
        "{stopped:?}"
    );
    run_part(&job, 2, 1, &Quiet).await.unwrap();
    let err = commit(&job).await.unwrap_err().to_string();
    assert!(
        err.contains("parts/p00001") && err.contains("not finished"),
        "{err}"
    );
    let out_loc = job.output().unwrap();
    assert!(!out_loc.exists("manifest.json").await.unwrap());
    match run_part(&job, 0, 2, &Quiet).await.unwrap() {
        PartOutcome::AlreadyDone { attempt, .. } => assert_eq!(attempt, 1),
        PartOutcome::Written(_) => panic!("a finished part was written again"),
    }
    assert!(matches!(
        run_part(&job, 1, 2, &Quiet).await.unwrap(),
        PartOutcome::Written(_)
    ));
    commit(&job).await.unwrap();
    assert_same_dataset(&whole, &out_loc, "after a stopped part").await;

    // Another job's part at the same place is not taken for this one's.
    let mut other = job.clone();
    other.seed = 8;
    assert!(matches!(
        run_part(&other, 0, 1, &Quiet).await.unwrap(),
        PartOutcome::Written(_)
    ));
}

/// `strata decompose --workers N --coordinator URL`: the coordinator
/// launches N worker processes, one part of the files each, and commits
/// one manifest; with 1, 2 and 4 workers the dataset holds what one
/// process's decompose writes. A worker killed mid-part (SIGKILL): a new
/// attempt redoes its part alone (the finished parts keep the attempt that
/// wrote them), and the dataset is still the same.
#[tokio::test(flavor = "multi_thread")]
async fn decomposition_over_workers_equals_one_process_even_with_a_worker_killed() {
    use strata_dataplane::store::Location;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(&dir.path().join("state"), 4, None);
    cfg.worker_env.push((
        "STRATA_FAULT_HANG_AT".into(),
        "decompose-killed-4:1:1:1".into(),
    ));
    let c = Coordinator::start(cfg).await.unwrap();
    let url = format!("http://{}", c.addr);
    let args = |out: &Path, workers: Option<u32>| -> Vec<String> {
        let mut a: Vec<String> = [
            "decompose",
            "--min-log2",
            "4",
            "--max-log2",
            "6",
            "--seed",
            "7",
            "--holdout-fraction",
            "0.1",
            "--shard-mib",
            "1",
            "--json",
            "--output",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        a.push(out.display().to_string());
        if let Some(n) = workers {
            a.extend([
                "--workers".into(),
                n.to_string(),
                "--coordinator".into(),
                url.clone(),
            ]);
        }
        a.push("--input".into());
        a.extend(sotu_40().iter().map(|p| p.display().to_string()));
        a
    };
    let run = |a: Vec<String>| {
        tokio::task::spawn_blocking(move || {
            let out = Command::new(env!("CARGO_BIN_EXE_strata"))
                .args(&a)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "strata {}: {}",
                a[..3].join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
            serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
        })
    };
    let loc = |p: &Path| Location::parse(p.to_str().unwrap(), false).unwrap();
    let whole = dir.path().join("whole");
    run(args(&whole, None)).await.unwrap();
    for n in [1u32, 2, 4] {
        let out = dir.path().join(format!("w{n}"));
        let v = run(args(&out, Some(n))).await.unwrap();
        assert_eq!(v["workers"], n);
        assert_eq!(v["attempts"], 1, "{v}");
        assert_same_dataset(&loc(&whole), &loc(&out), &format!("{n} workers")).await;
    }

    // Rank 1 stops after its first batch (its heartbeats go on) and is
    // killed there, its part unfinished.
    let killed = dir.path().join("killed");
    let cli = run(args(&killed, Some(4)));
    let mut cl = client(&c).await;
    let id = "decompose-killed-4";
    let start = Instant::now();
    while cl
        .get_job(pb::GetJobRequest { job_id: id.into() })
        .await
        .is_err()
    {
        assert!(start.elapsed() < Duration::from_secs(60), "{id} never came");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    until(&mut cl, id, 120, |j| j.steps_done == 3).await;
    let (_, pid) = worker_pids(&c, id)
        .into_iter()
        .find(|(r, _)| *r == 1)
        .expect("rank 1 waits mid-part");
    signal(pid, "-KILL");
    let v = cli.await.unwrap();
    assert_eq!(v["attempts"], 2, "{v}");
    let j = get(&mut cl, id).await;
    assert!(
        j.attempts[0].cause.contains("rank 1"),
        "{:?}",
        j.attempts[0]
    );
    for p in 0..4 {
        let record: serde_json::Value = serde_json::from_slice(
            &std::fs::read(killed.join(format!("parts/p{p:05}/part.json"))).unwrap(),
        )
        .unwrap();
        assert_eq!(record["attempt"], if p == 1 { 2 } else { 1 }, "part {p}");
    }
    assert_same_dataset(&loc(&whole), &loc(&killed), "a worker killed").await;
    c.stop().await;
}
