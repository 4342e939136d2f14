//! Jobs through a real Slurm cluster: the coordinator launches each attempt
//! as one allocation (sbatch + srun) on the single-host test cluster of
//! `scripts/slurm/` (slurmctld and two slurmd as nodes n1 and n2, 4 CPUs
//! each; `.ci/run` starts it). With 2 CPUs per rank each node offers 2
//! slots.
//!
//! Without a cluster these tests say they were skipped, unless
//! `STRATA_REQUIRE_SLURM` is set (CI sets it): then they fail.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use strata_coordinator::Coordinator;
use strata_coordinator::cluster::{SlurmConfig, SlurmJobLauncher};
use strata_proto::v1 as pb;

/// One Slurm test at a time: they share the cluster's 4 slots.
static CLUSTER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Whether the test cluster answers; panics when it must.
fn slurm_up() -> bool {
    let up = Command::new("sinfo")
        .args(["-h", "-N", "-o", "%N %t"])
        .output()
        .is_ok_and(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains("n2"));
    if !up {
        assert!(
            std::env::var_os("STRATA_REQUIRE_SLURM").is_none(),
            "STRATA_REQUIRE_SLURM is set and the test Slurm cluster does not answer (start it with scripts/slurm/start.sh)"
        );
        eprintln!(
            "SKIPPED: no Slurm test cluster answers (scripts/slurm/start.sh starts one; STRATA_REQUIRE_SLURM=1 makes this a failure)"
        );
    }
    up
}

/// The cluster to this test alone, a folder and a dataset in it; `None`
/// (the test is skipped) without a cluster.
async fn cluster_test() -> Option<(
    tokio::sync::MutexGuard<'static, ()>,
    tempfile::TempDir,
    String,
)> {
    if !slurm_up() {
        return None;
    }
    let one = CLUSTER.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let data = dataset_40(dir.path()).await;
    Some((one, dir, data))
}

/// A unique mark for one test's allocations.
fn owner() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("t{}-{nanos}", std::process::id())
}

/// The allocations marked `strata:OWNER:` in the given squeue states:
/// (Slurm job id, job name, state).
fn allocations(owner: &str, states: &str) -> Vec<(String, String, String)> {
    let out = Command::new("squeue")
        .args(["-h", &format!("--states={states}"), "-o", "%i|%j|%T|%k"])
        .output()
        .unwrap();
    assert!(out.status.success(), "squeue: {out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split('|').collect();
            (f.len() == 4 && f[3].starts_with(&format!("strata:{owner}:")))
                .then(|| (f[0].to_string(), f[1].to_string(), f[2].to_string()))
        })
        .collect()
}

/// Allocations of `owner` that are not over (pending, running,
/// completing…): what `squeue` shows by default.
fn live(owner: &str) -> Vec<(String, String, String)> {
    allocations(owner, "PENDING,RUNNING,CONFIGURING,COMPLETING,SUSPENDED")
}

async fn until_no_allocation(owner: &str, secs: u64, what: &str) {
    let t = Instant::now();
    loop {
        let l = live(owner);
        if l.is_empty() {
            return;
        }
        assert!(
            t.elapsed() < Duration::from_secs(secs),
            "{what}: allocations left: {l:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A coordinator launching through Slurm, 2 CPUs per rank.
async fn slurm_coordinator(state: &Path, owner: &str) -> Coordinator {
    let launcher = SlurmJobLauncher::new(SlurmConfig {
        cpus_per_task: 2,
        signal_grace_s: 30,
        owner: owner.into(),
        ..SlurmConfig::default()
    })
    .unwrap();
    let mut cfg = config(state, 1, None);
    // Ranks on other nodes: every interface, the address advertised.
    cfg.worker_args
        .extend(["--collective-bind".into(), "0.0.0.0:0".into()]);
    Coordinator::start_with(cfg, Arc::new(launcher))
        .await
        .unwrap()
}

async fn local_run(data: &str, spec: String, state: &Path) -> Vec<pb::StepMetrics> {
    let c = Coordinator::start(config(state, 4, None)).await.unwrap();
    let mut cl = client(&c).await;
    let id = submit(&mut cl, spec).await.unwrap();
    let j = ended(&mut cl, &id, 300).await;
    assert_eq!(
        j.state(),
        pb::JobState::Succeeded,
        "{}: {}",
        data,
        j.failure_reason
    );
    let m = metrics(&mut cl, &id).await;
    c.stop().await;
    m
}

/// Waits until `f(job)` holds, returning the job and the seconds it took.
async fn timed(cl: &mut Cl, id: &str, secs: u64, f: impl Fn(&pb::Job) -> bool) -> (pb::Job, f64) {
    let t = Instant::now();
    let j = until(cl, id, secs, f).await;
    (j, t.elapsed().as_secs_f64())
}

/// A dp = 2 × pp = 2 job through the coordinator runs on both Slurm
/// nodes, two ranks each, placed as the coordinator chose, with the local
/// launcher's per-step losses bit for bit; its allocation is gone at the
/// end. The inventory is Slurm's, and a job larger than the partition is
/// refused with the numbers.
#[tokio::test(flavor = "multi_thread")]
async fn a_2x2_job_runs_on_both_slurm_nodes_like_the_local_launcher() {
    let Some((_one, dir, data)) = cluster_test().await else {
        return;
    };
    let spec = recipe3d(&data, 12, (1, 2, 2), true);
    let want = local_run(&data, spec.clone(), &dir.path().join("local")).await;

    let owner = owner();
    let c = slurm_coordinator(&dir.path().join("state"), &owner).await;
    let mut cl = client(&c).await;

    let nodes = cl
        .list_nodes(pb::ListNodesRequest {})
        .await
        .unwrap()
        .into_inner();
    let got: Vec<(&str, u32, u32)> = nodes
        .nodes
        .iter()
        .map(|n| (n.name.as_str(), n.cpus, n.slots))
        .collect();
    assert_eq!(got, vec![("n1", 4, 2), ("n2", 4, 2)], "{nodes:?}");
    assert!(nodes.launcher.contains("Slurm"), "{}", nodes.launcher);

    let err = submit(&mut cl, recipe3d(&data, 12, (2, 2, 2), true))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    for part in ["needs 8 worker slots", "has 4 worker slots", "n1 2, n2 2"] {
        assert!(err.message().contains(part), "{part}: {}", err.message());
    }

    let id = submit(&mut cl, spec).await.unwrap();
    let (_, first_step_s) = timed(&mut cl, &id, 120, |j| j.steps_done >= 1).await;
    let allocs = allocations(&owner, "all");
    assert_eq!(allocs.len(), 1, "{allocs:?}");
    assert_eq!(allocs[0].1, format!("strata-{id}-a1"));
    let j = ended(&mut cl, &id, 300).await;
    assert_eq!(j.state(), pb::JobState::Succeeded, "{}", j.failure_reason);
    assert_bit_identical(&want, &metrics(&mut cl, &id).await, "slurm vs local");

    // Placed as the coordinator placed them: ranks 0 and 1 on n1, 2 and 3
    // on n2, and each rank ran where its host file line says.
    let attempt = Path::new(&j.run_dir).join("attempt-1");
    let hosts = std::fs::read_to_string(attempt.join("hostfile")).unwrap();
    assert_eq!(hosts, "n1\nn1\nn2\nn2\n");
    // The token travels in a file only its owner reads, never in argv.
    let env = attempt.join("worker.env");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&env).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
    let env = std::fs::read_to_string(&env).unwrap();
    let token = env
        .lines()
        .find_map(|l| l.strip_prefix("export STRATA_JOB_TOKEN="))
        .unwrap()
        .trim_matches('\'');
    assert!(token.len() >= 16, "{token}");
    for f in ["attempt.sbatch", "rank.sh"] {
        let text = std::fs::read_to_string(attempt.join(f)).unwrap();
        assert!(!text.contains(token), "{f} holds the token");
    }
    until_no_allocation(&owner, 20, "after success").await;
    // Every rank's wrapper wrote its exit status (once the allocation is
    // over: a rank reports done before its process has exited).
    let states = allocations(&owner, "all");
    for r in 0..4 {
        let exit = std::fs::read_to_string(attempt.join(format!("rank-{r}.exit")));
        let log =
            std::fs::read_to_string(attempt.join(format!("rank-{r}.log"))).unwrap_or_default();
        let tail = &log[log.floor_char_boundary(log.len().saturating_sub(4000))..];
        assert_eq!(
            exit.as_deref().map(str::trim).ok(),
            Some("0"),
            "rank {r}: allocations {states:?}; its log ends:\n{tail}"
        );
    }
    assert_eq!(states[0].2, "COMPLETED", "{states:?}");
    eprintln!("slurm: from submission (sbatch) to the first step: {first_step_s:.2} s");
    c.stop().await;
}

/// `scancel` of the allocation from outside: the workers save the step
/// they are on (Slurm's SIGTERM), the attempt ends with the cancel as its
/// cause, and a new allocation continues from that checkpoint. Then a node
/// goes down under the next attempt: it ends as a node failure, and a
/// third allocation continues from the latest checkpoint. The job ends
/// with the uninterrupted run's losses, bit for bit; the recipe's
/// `[slurm] time` is each allocation's limit.
#[tokio::test(flavor = "multi_thread")]
async fn an_outside_scancel_ends_the_attempt_and_the_job_recovers() {
    let Some((_one, dir, data)) = cluster_test().await else {
        return;
    };
    let steps = 60;
    let want = local_run(
        &data,
        recipe_ck(&data, steps, (1, 2, 2), &dir.path().join("ck-local"), 8),
        &dir.path().join("local"),
    )
    .await;

    let owner = owner();
    let c = slurm_coordinator(&dir.path().join("state"), &owner).await;
    let mut cl = client(&c).await;
    let spec = format!(
        "{}[slurm]\ntime = \"30:00\"\n",
        recipe_ck(&data, steps, (1, 2, 2), &dir.path().join("ck"), 8)
    );
    let bad = submit(&mut cl, spec.replace("30:00", "half an hour"))
        .await
        .unwrap_err();
    assert!(bad.message().contains("slurm."), "{bad:?}");
    let id = submit(&mut cl, spec).await.unwrap();
    until(&mut cl, &id, 120, |j| j.steps_done >= 10).await;
    let allocs = live(&owner);
    assert_eq!(allocs.len(), 1, "{allocs:?}");
    let limit = Command::new("squeue")
        .args(["-h", "-j", &allocs[0].0, "-o", "%l"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&limit.stdout).trim(), "30:00");
    assert!(
        Command::new("scancel")
            .arg(&allocs[0].0)
            .status()
            .unwrap()
            .success()
    );
    let (j, detect_s) = timed(&mut cl, &id, 60, |j| {
        j.attempts.first().is_some_and(|a| a.ended_unix_ms > 0)
    })
    .await;
    let first = &j.attempts[0];
    assert_eq!(first.end_state(), pb::JobState::Failed);
    assert!(
        first.cause.contains("cancelled outside strata"),
        "{}",
        first.cause
    );
    assert!(first.cause.contains(&allocs[0].0), "{}", first.cause);
    let stopped_at = first.last_step;
    let (_, again_s) = timed(&mut cl, &id, 120, |j| {
        j.attempts.len() == 2 && j.steps_done > stopped_at
    })
    .await;

    // A node of the second allocation goes down.
    until(&mut cl, &id, 120, |j| j.steps_done >= stopped_at + 10).await;
    let node = Command::new("scontrol")
        .args(["update", "nodename=n2", "state=down", "reason=strata-test"])
        .status()
        .unwrap();
    assert!(node.success());
    let j = until(&mut cl, &id, 60, |j| {
        j.attempts.get(1).is_some_and(|a| a.ended_unix_ms > 0)
    })
    .await;
    assert!(
        j.attempts[1].cause.contains("lost a node (NODE_FAIL)"),
        "{}",
        j.attempts[1].cause
    );
    // The node's slurmd answers, so it returns (ReturnToService=2); make
    // sure before the next allocation needs it.
    let _ = Command::new("scontrol")
        .args(["update", "nodename=n2", "state=resume"])
        .stderr(std::process::Stdio::null())
        .status();

    let j = ended(&mut cl, &id, 300).await;
    assert_eq!(j.state(), pb::JobState::Succeeded, "{}", j.failure_reason);
    assert_eq!(j.attempts.len(), 3, "{j:?}");
    // Slurm's SIGTERM let the workers save the step they were on.
    assert_eq!(j.attempts[1].from_step, stopped_at, "{j:?}");
    assert_eq!(j.attempts[0].steps_lost, 0, "{j:?}");
    assert_bit_identical(&want, &metrics(&mut cl, &id).await, "recovered vs straight");
    until_no_allocation(&owner, 20, "after recovery").await;
    eprintln!(
        "slurm: outside scancel to the attempt's end: {detect_s:.2} s; then to training again: {again_s:.2} s"
    );
    c.stop().await;
}

/// A job longer than its allocations' time limit (`[slurm] time = "1"`,
/// one minute): Slurm's SIGTERM ahead of each limit makes the workers save
/// and leave, and the next allocation goes on from there. Reaching a time
/// limit is not a failure: with `max_restarts = 0` the job still
/// finishes, each interrupted attempt saying why.
#[tokio::test(flavor = "multi_thread")]
async fn time_limits_chain_allocations_without_counting_as_failures() {
    let Some((_one, dir, data)) = cluster_test().await else {
        return;
    };
    let owner = owner();
    let c = slurm_coordinator(&dir.path().join("state"), &owner).await;
    let mut cl = client(&c).await;
    // About 45 s of training on this machine; Slurm signals 30 s before
    // the limit, or up to a minute earlier (its timer's resolution).
    let spec = format!(
        "{}[fault]\nmax_restarts = 0\n[slurm]\ntime = \"1\"\n",
        recipe_ck(&data, 600, (1, 2, 2), &dir.path().join("ck"), 50)
    );
    let id = submit(&mut cl, spec).await.unwrap();
    let j = ended(&mut cl, &id, 600).await;
    assert_eq!(j.state(), pb::JobState::Succeeded, "{}", j.failure_reason);
    for a in &j.attempts {
        eprintln!(
            "slurm: attempt {}: steps {}..{} in {:.1} s: {}",
            a.number,
            a.from_step,
            a.last_step,
            (a.ended_unix_ms - a.started_unix_ms) as f64 / 1e3,
            a.cause
        );
    }
    assert!(j.attempts.len() >= 2, "{j:?}");
    for a in &j.attempts[..j.attempts.len() - 1] {
        assert!(
            a.cause.contains("time limit"),
            "attempt {}: {}",
            a.number,
            a.cause
        );
        assert!(a.interrupted, "attempt {}", a.number);
        assert_eq!(a.steps_lost, 0, "attempt {}", a.number);
    }
    assert_eq!(metrics(&mut cl, &id).await.len(), 600);
    until_no_allocation(&owner, 20, "after the chain").await;
    c.stop().await;
}

/// The coordinator binary, as a process that can be killed.
fn coordinator_process(state: &Path, port: u16) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_strata"))
        .args(["coordinator", "--launcher", "slurm", "--cpus-per-task", "2"])
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .arg("--state-dir")
        .arg(state)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(state.with_extension("log")).unwrap())
        .spawn()
        .unwrap()
}

/// `strata cancel` leaves no allocation; a coordinator killed while its
/// job's allocation waits in Slurm's queue is replaced by one that
/// cancels that allocation and starts the job again; nothing leaks.
#[tokio::test(flavor = "multi_thread")]
async fn cancel_and_a_coordinator_restart_leave_no_slurm_job_behind() {
    let Some((_one, dir, data)) = cluster_test().await else {
        return;
    };

    // Cancel of a running job.
    let owner = owner();
    let c = slurm_coordinator(&dir.path().join("state"), &owner).await;
    let mut cl = client(&c).await;
    let id = submit(&mut cl, recipe3d(&data, 100_000, (1, 2, 2), true))
        .await
        .unwrap();
    until(&mut cl, &id, 120, |j| j.steps_done >= 1).await;
    assert_eq!(live(&owner).len(), 1);
    cl.cancel_job(pb::CancelJobRequest {
        job_id: id.clone(),
        reason: String::new(),
    })
    .await
    .unwrap();
    until_no_allocation(&owner, 30, "after strata cancel").await;
    c.stop().await;

    // A coordinator process killed while its job waits for nodes (a
    // blocker holds both), then replaced.
    let blocker = String::from_utf8(
        Command::new("sbatch")
            .args(["--parsable", "-N2", "--exclusive", "--job-name=blocker"])
            .args(["--output=/dev/null", "--wrap", "sleep 600"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap()
    .trim()
    .to_string();
    let cancel_blocker = ScancelOnDrop(blocker.clone());
    let state = dir.path().join("proc-state");
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let mut first = coordinator_process(&state, port);
    let mut cl = connect(&url, &state).await;
    let id = submit(&mut cl, recipe3d(&data, 12, (1, 2, 2), true))
        .await
        .unwrap();
    let owner = std::fs::read_to_string(state.join("coordinator-id"))
        .unwrap()
        .trim()
        .to_string();
    let t = Instant::now();
    while live(&owner).is_empty() {
        assert!(t.elapsed() < Duration::from_secs(20), "no allocation");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let left = live(&owner);
    assert_eq!(left[0].2, "PENDING", "{left:?}");
    // The job says what it waits for.
    let t = Instant::now();
    loop {
        let j = get(&mut cl, &id).await;
        if j.waiting.contains("is PENDING") {
            assert!(j.waiting.contains(&left[0].0), "{}", j.waiting);
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "not waiting: {j:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    first.kill().unwrap();
    first.wait().unwrap();
    // The killed coordinator's allocation outlives it...
    assert_eq!(live(&owner).len(), 1);
    let mut second = coordinator_process(&state, port);
    let mut cl = connect(&url, &state).await;
    // ...until the next one cancels it and submits the job's next attempt.
    let t = Instant::now();
    loop {
        let l = live(&owner);
        if l.len() == 1 && l[0].1 == format!("strata-{id}-a2") {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(20), "{l:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let old = allocations(&owner, "all");
    assert!(
        old.iter().any(|a| a.0 == left[0].0 && a.2 == "CANCELLED"),
        "{old:?}"
    );
    drop(cancel_blocker);
    let j = ended(&mut cl, &id, 300).await;
    assert_eq!(j.state(), pb::JobState::Succeeded, "{}", j.failure_reason);
    assert!(
        j.attempts[0]
            .cause
            .contains(&format!("Slurm job {}", left[0].0)),
        "{}",
        j.attempts[0].cause
    );
    until_no_allocation(&owner, 20, "after the restarted coordinator's job").await;
    second.kill().unwrap();
    second.wait().unwrap();
}

/// Cancels Slurm job `id` when dropped (a test that fails leaves no
/// blocker behind).
struct ScancelOnDrop(String);

impl Drop for ScancelOnDrop {
    fn drop(&mut self) {
        let _ = Command::new("scancel").arg(&self.0).status();
    }
}
