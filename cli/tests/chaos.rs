//! The chaos run: a sweep of jobs trains while workers are killed
//! (SIGKILL) and frozen (SIGSTOP), the coordinator process is killed and
//! started again on its state, the checkpoints' S3 store fails requests,
//! and the state folder's disk fills up for a while. Every job must still
//! end with the losses of its fault-free run, bit for bit; no checkpoint
//! the coordinator called complete may be lost or torn; the store must
//! read back; no worker may be left running. It prints what it injected
//! and what it found.
//!
//! `cargo test` runs a short one (three jobs of 160 steps, a fault every
//! few seconds, every kind at least once);
//! `scripts/chaos.sh` runs a longer one through the same code, sized by
//! `STRATA_CHAOS_JOBS`, `STRATA_CHAOS_STEPS` and `STRATA_CHAOS_SEED`.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use strata_dataplane::checkpoint as ckpt;
use strata_dataplane::store::Location;
use strata_proto::v1 as pb;
use strata_tests::disk::SmallDisk;
use strata_tests::s3::S3Server;

const BUCKET: &str = "chaos";

/// A line on stderr past the test harness's capture: the run's figures
/// show in the suite's log.
macro_rules! say {
    ($($t:tt)*) => {{
        let _ = writeln!(std::io::stderr(), $($t)*);
    }};
}

/// A small, seeded source of choices (xorshift64*).
struct Dice(u64);

impl Dice {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.next() % (hi - lo + 1))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    KillWorker,
    StopWorker,
    KillCoordinator,
    S3Failing,
    DiskFull,
}

impl Fault {
    fn name(self) -> &'static str {
        match self {
            Fault::KillWorker => "SIGKILL a worker",
            Fault::StopWorker => "SIGSTOP a worker",
            Fault::KillCoordinator => "SIGKILL the coordinator",
            Fault::S3Failing => "S3 fails 40% of requests for 4 s",
            Fault::DiskFull => "state disk full for 4 s",
        }
    }
}

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{name}={v}: not a number"))
        })
        .unwrap_or(default)
}

/// The coordinator process, started again on the same state and port
/// whenever it is killed or exits.
struct CoordinatorProc {
    port: u16,
    state: PathBuf,
    logs: PathBuf,
    env: Vec<(String, String)>,
    child: Option<Child>,
    starts: u32,
}

impl CoordinatorProc {
    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The log of the latest process started.
    fn log(&self) -> PathBuf {
        self.logs.join(format!("coordinator-{}.log", self.starts))
    }

    fn start(&mut self) {
        self.starts += 1;
        let log = std::fs::File::create(self.log()).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_strata"))
            .args([
                "coordinator",
                "--listen",
                &format!("127.0.0.1:{}", self.port),
            ])
            .arg("--state-dir")
            .arg(&self.state)
            .args([
                "--slots",
                "4",
                "--heartbeat-timeout-s",
                "4",
                "--stop-grace-s",
                "5",
            ])
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    /// Whether it exited by itself; how, and its last log lines.
    fn exited(&mut self) -> Option<String> {
        let status = self.child.as_mut()?.try_wait().unwrap()?;
        self.child = None;
        let log = std::fs::read_to_string(self.log()).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(3).collect();
        Some(format!(
            "{status}: {}",
            tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
        ))
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, and the wait for it to leave.
    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &c.id().to_string()])
                .status();
            let t = Instant::now();
            while c.try_wait().unwrap().is_none() {
                if t.elapsed() > Duration::from_secs(60) {
                    let _ = c.kill();
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// The sweep's base recipe: a (1, 1, 2) job of `steps` steps saving a
/// checkpoint every 4 steps to S3, keeping them all, restarting as often
/// as it takes.
fn base(data: &str, steps: u64) -> String {
    format!(
        "{}[checkpoint]\nevery_steps = 4\nkeep_last = 0\ndir = \"s3://{BUCKET}/ck\"\n[fault]\nmax_restarts = 1000\n",
        recipe3d(data, steps, (1, 1, 2), true)
    )
}

/// A complete checkpoint as its manifest says, checked: every shard it
/// names exists with its size and CRC. Why not, if not.
fn verify_checkpoint(m: &ckpt::Manifest, folder: &Path) -> Result<(), String> {
    for s in &m.shards {
        let path = folder.join(&s.key);
        let data = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        if data.len() as u64 != s.bytes || crc32fast::hash(&data) != s.crc32 {
            return Err(format!("{}: torn (size or CRC differs)", path.display()));
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sweep_under_chaos_loses_nothing() {
    let jobs = env_or("STRATA_CHAOS_JOBS", 3) as usize;
    let steps = env_or("STRATA_CHAOS_STEPS", 160);
    let seed = env_or("STRATA_CHAOS_SEED", 7);
    let mut dice = Dice(seed.max(1).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let begun = Instant::now();

    let dir = tempfile::tempdir().unwrap();
    let data = dataset_40(dir.path()).await;
    let s3 = S3Server::start(&[BUCKET]).await;
    let disk = SmallDisk::mount(&dir.path().join("state"), 64);
    let mut kinds = vec![
        Fault::KillWorker,
        Fault::StopWorker,
        Fault::KillCoordinator,
        Fault::S3Failing,
    ];
    if disk.is_some() {
        kinds.push(Fault::DiskFull);
    } else {
        say!(
            "chaos: skipped the full-disk fault: mounting a tmpfs for the state folder is not permitted here"
        );
    }
    let logs = dir.path().join("logs");
    std::fs::create_dir_all(&logs).unwrap();
    let mut coord = CoordinatorProc {
        port: free_port(),
        state: dir.path().join("state"),
        logs: logs.clone(),
        env: s3.env(),
        child: None,
        starts: 0,
    };
    coord.start();
    let url = coord.url();
    let mut cl = connect(&url, &coord.state).await;

    std::fs::write(dir.path().join("base.toml"), base(&data, steps)).unwrap();
    let lrs: Vec<String> = (1..=jobs).map(|k| format!("{}e-3", k)).collect();
    std::fs::write(
        dir.path().join("chaos.toml"),
        format!(
            "name = \"chaos\"\nbase = \"base.toml\"\nmax_concurrent = 2\n[grid]\nlr = [{}]\n",
            lrs.join(", ")
        ),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_strata"))
        .arg("sweep")
        .arg(dir.path().join("chaos.toml"))
        .args(["--coordinator", &url])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sweep_id = String::from_utf8_lossy(&out.stdout).trim().to_string();

    // The faults, in a seeded order that gives every kind its turn.
    let mut injected: BTreeMap<Fault, u32> = BTreeMap::new();
    let mut found: Vec<String> = Vec::new();
    let mut complete: BTreeSet<(String, u64)> = BTreeSet::new();
    let mut round: Vec<Fault> = Vec::new();
    let mut next_fault = Instant::now() + dice.millis(2000, 4000);
    let sweep = loop {
        // The coordinator may be down (killed, or restarting): calls fail
        // until it is back.
        if let Some(how) = coord.exited() {
            found.push(format!(
                "the coordinator exited by itself ({how}); started again"
            ));
            coord.start();
            cl = connect(&url, &coord.state).await;
        }
        let s = match cl
            .get_sweep(pb::GetSweepRequest {
                sweep_id: sweep_id.clone(),
            })
            .await
        {
            Ok(s) => s.into_inner(),
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        // Every checkpoint it calls complete, remembered.
        for p in s.points.iter().filter(|p| !p.job_id.is_empty()) {
            if let Ok(r) = cl
                .list_checkpoints(pb::ListCheckpointsRequest {
                    job_id: p.job_id.clone(),
                })
                .await
            {
                for c in r.into_inner().checkpoints {
                    complete.insert((p.job_id.clone(), c.step));
                }
            }
        }
        if s.state() != pb::SweepState::Running {
            break s;
        }
        assert!(
            begun.elapsed() < Duration::from_secs(60 * 60),
            "the sweep did not end in an hour: {s:?}"
        );
        if Instant::now() < next_fault {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        }
        if round.is_empty() {
            round = kinds.clone();
            for i in (1..round.len()).rev() {
                round.swap(i, dice.below(i + 1));
            }
        }
        let fault = round.pop().unwrap();
        let running: Vec<WorkerProc> = worker_processes(&url)
            .into_iter()
            .filter(|w| w.state != 'T')
            .collect();
        match fault {
            Fault::KillWorker | Fault::StopWorker => {
                let Some(w) = (!running.is_empty()).then(|| &running[dice.below(running.len())])
                else {
                    // Nothing runs just now (a restart): try again soon.
                    round.push(fault);
                    next_fault = Instant::now() + Duration::from_millis(500);
                    continue;
                };
                let sig = if fault == Fault::KillWorker {
                    "-KILL"
                } else {
                    "-STOP"
                };
                let _ = Command::new("kill")
                    .args([sig, &w.pid.to_string()])
                    .status();
                say!(
                    "chaos: {:>6.1} s: {} (job {} rank {} pid {})",
                    begun.elapsed().as_secs_f64(),
                    fault.name(),
                    w.job,
                    w.rank,
                    w.pid
                );
            }
            Fault::KillCoordinator => {
                say!(
                    "chaos: {:>6.1} s: {}",
                    begun.elapsed().as_secs_f64(),
                    fault.name()
                );
                coord.kill();
                tokio::time::sleep(dice.millis(200, 2000)).await;
                coord.start();
                cl = connect(&url, &coord.state).await;
            }
            Fault::S3Failing => {
                say!(
                    "chaos: {:>6.1} s: {}",
                    begun.elapsed().as_secs_f64(),
                    fault.name()
                );
                s3.fail_share(400);
                tokio::time::sleep(Duration::from_secs(4)).await;
                s3.fail_share(0);
            }
            Fault::DiskFull => {
                say!(
                    "chaos: {:>6.1} s: {}",
                    begun.elapsed().as_secs_f64(),
                    fault.name()
                );
                let disk = disk.as_ref().expect("only where mounted");
                let ballast = disk.fill();
                tokio::time::sleep(Duration::from_secs(4)).await;
                std::fs::remove_file(ballast).unwrap();
            }
        }
        *injected.entry(fault).or_default() += 1;
        next_fault = Instant::now() + dice.millis(2000, 5000);
    };
    let chaos_s = begun.elapsed().as_secs_f64();
    assert_eq!(sweep.state(), pb::SweepState::Succeeded, "{sweep:?}");
    // A run too short to meet every kind of fault proves less than it says.
    for k in &kinds {
        assert!(
            injected.contains_key(k),
            "the sweep ended before a `{}` was injected: make the run longer (STRATA_CHAOS_STEPS)",
            k.name()
        );
    }

    // What the jobs went through.
    let mut chaos_jobs = Vec::new();
    let mut attempts = 0;
    let mut causes: BTreeMap<String, u32> = BTreeMap::new();
    for p in &sweep.points {
        let j = get(&mut cl, &p.job_id).await;
        assert_eq!(j.state(), pb::JobState::Succeeded, "{}", j.failure_reason);
        attempts += j.attempts.len();
        for a in j.attempts.iter().filter(|a| !a.cause.is_empty()) {
            let cause = a.cause.lines().next().unwrap_or("");
            let kind = if cause.contains("coordinator stopped") {
                "the coordinator stopped"
            } else if cause.contains("no heartbeat") || cause.contains("silent") {
                "a silent rank (no heartbeat)"
            } else if cause.contains("signal 9") || cause.contains("SIGKILL") {
                "a rank killed"
            } else {
                cause
            };
            *causes.entry(kind.to_string()).or_default() += 1;
        }
        chaos_jobs.push(j);
    }

    // The same jobs without faults, one after the other.
    let mut identical = 0;
    for j in &chaos_jobs {
        let want = metrics(&mut cl, &j.job_id).await;
        let id = submit(&mut cl, j.spec_toml.clone()).await.unwrap();
        let r = ended(&mut cl, &id, 600).await;
        assert_eq!(r.state(), pb::JobState::Succeeded, "{}", r.failure_reason);
        assert_eq!(want.len() as u64, steps, "job {}", j.job_id);
        assert_bit_identical(
            &metrics(&mut cl, &id).await,
            &want,
            &format!("job {} under chaos against its fault-free run", j.job_id),
        );
        identical += 1;
    }

    // Every checkpoint it called complete is there, whole.
    let folder = s3.root().join(BUCKET).join("ck");
    let loc = Location::parse(&format!("file://{}", folder.display()), false).unwrap();
    let mut lost = Vec::new();
    let mut verified = 0;
    for j in &chaos_jobs {
        let (manifests, bad) = ckpt::list(&loc, &j.job_id).await.unwrap();
        assert!(
            bad.is_empty(),
            "unreadable manifests of {}: {bad:?}",
            j.job_id
        );
        for m in &manifests {
            let at = folder.join(&j.job_id).join(ckpt::step_dir(m.step));
            verify_checkpoint(m, &at).unwrap_or_else(|e| panic!("job {}: {e}", j.job_id));
            verified += 1;
        }
        let have: BTreeSet<u64> = manifests.iter().map(|m| m.step).collect();
        lost.extend(
            complete
                .iter()
                .filter(|(job, step)| *job == j.job_id && !have.contains(step))
                .cloned(),
        );
    }

    // Nothing left running, and the store reads back.
    coord.stop();
    let t = Instant::now();
    let left = loop {
        let left = worker_processes(&url);
        if left.is_empty() || t.elapsed() > Duration::from_secs(30) {
            break left;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let store = strata_coordinator::store::Store::open(&coord.state).unwrap();
    let records = store.jobs().unwrap();
    for j in &chaos_jobs {
        let r = records
            .iter()
            .find(|r| r.job_id.as_str() == j.job_id)
            .unwrap_or_else(|| panic!("job {} missing from the store", j.job_id));
        assert_eq!(r.steps_done, steps);
        let kept = store.steps(&j.job_id, 0, 0).unwrap();
        assert_eq!(
            kept.len() as u64,
            steps,
            "job {}'s steps in the store",
            j.job_id
        );
    }
    drop(store);

    let (requests, failed) = s3.requests();
    say!(
        "chaos: ---- seed {seed}: {:.1} min under faults",
        chaos_s / 60.0
    );
    for (f, n) in &injected {
        say!("chaos: injected {n:>3} × {}", f.name());
    }
    say!("chaos: S3 requests failed on purpose: {failed} of {requests}");
    say!(
        "chaos: coordinator processes: {} (killed or exited, started again)",
        coord.starts
    );
    for f in &found {
        say!("chaos: found: {f}");
    }
    say!("chaos: attempts: {attempts} over {} jobs", chaos_jobs.len());
    for (c, n) in &causes {
        say!("chaos: attempt ended {n:>3} × {c}");
    }
    for j in &chaos_jobs {
        let line: Vec<String> = j
            .attempts
            .iter()
            .map(|a| {
                format!(
                    "{}: steps {}..{}{}",
                    a.number,
                    a.from_step,
                    a.last_step,
                    a.cause
                        .lines()
                        .next()
                        .map(|c| format!(" ({c})"))
                        .unwrap_or_default()
                )
            })
            .collect();
        say!("chaos: job {}: {}", j.job_id, line.join("; "));
    }
    say!(
        "chaos: jobs finished {}/{}; losses bit-identical to the fault-free runs: {identical}/{}",
        chaos_jobs.len(),
        jobs,
        chaos_jobs.len()
    );
    say!(
        "chaos: checkpoints called complete: {}; on S3 and whole: {verified}; lost: {}",
        complete.len(),
        lost.len()
    );
    say!("chaos: workers left running: {}", left.len());
    assert!(lost.is_empty(), "complete checkpoints lost: {lost:?}");
    assert!(left.is_empty(), "workers left running: {left:?}");
    assert_eq!(chaos_jobs.len(), jobs);
    drop(disk);
}

/// The job store on a disk that fills up: commits fail while it is full
/// and are retried (the store reopened: redb refuses every operation after
/// an I/O error), and once there is room every write lands in order,
/// none lost; a waiter is told only once its write is durable. Without
/// the retry the steps written while the disk was full were dropped.
#[test]
fn a_full_disk_delays_store_writes_and_loses_none() {
    use strata_coordinator::job::{JobId, StepRecord, StepTimes};
    use strata_coordinator::store::{Store, Write};
    let dir = tempfile::tempdir().unwrap();
    let Some(disk) = SmallDisk::mount(&dir.path().join("state"), 4) else {
        say!("skipped: a full store disk needs a tmpfs, and mounting one is not permitted here");
        return;
    };
    let state = dir.path().join("state");
    let store = Store::open(&state).unwrap();
    let step = |n: u64| StepRecord {
        step: n,
        tokens: n * 256,
        loss: 10.0 - n as f64 / 1000.0,
        lr: 1e-3,
        tokens_per_s: 1.0,
        grad_norm: 1.0,
        seq_log2: 5,
        times: StepTimes::default(),
        stages: Vec::new(),
        bubble_theory: 0.0,
        eval_loss: None,
        peak_flops: None,
        sources: Vec::new(),
        weights: None,
    };
    let job = JobId::new("job-1");
    store
        .put_blocking(Write::Steps(job.clone(), (1..=10).map(step).collect()))
        .unwrap();
    let ballast = disk.fill();
    // Steps go on arriving while the disk is full, each batch big enough
    // that it cannot fit in what redb has already allocated.
    let mut tickets = Vec::new();
    for k in 0..20u64 {
        let from = 11 + k * 500;
        let batch = (from..from + 500).map(step).collect();
        tickets.push(store.submit(Write::Steps(job.clone(), batch)).unwrap());
    }
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        store
            .steps("job-1", 0, 0)
            .map_or(true, |s| s.len() < 10_010),
        "the writes landed on a full disk"
    );
    std::fs::remove_file(ballast).unwrap();
    for t in tickets {
        store.wait(t).unwrap();
    }
    let got: Vec<u64> = store
        .steps("job-1", 0, 0)
        .unwrap()
        .iter()
        .map(|s| s.step)
        .collect();
    assert_eq!(got, (1..=10_010).collect::<Vec<_>>());
    drop(store);
    // And they are on the disk: a new store reads them back.
    let again = Store::open(&state).unwrap();
    assert_eq!(again.steps("job-1", 0, 0).unwrap().len(), 10_010);
    drop(again);
    drop(disk);
}

/// Every file of a complete checkpoint, its folders up to the job's, and
/// its manifest are fsynced (a crash must not leave a manifest naming torn
/// files, nor prune the last good checkpoint for one that is not on the
/// disk yet), the manifest after every file it names. Seen from outside:
/// the coordinator and its workers run under strace, which records every
/// fsync with the path of its file.
#[tokio::test(flavor = "multi_thread")]
async fn checkpoint_files_are_fsynced_before_the_manifest() {
    if Command::new("strace").arg("-V").output().is_err() {
        assert!(
            std::env::var_os("STRATA_REQUIRE_STRACE").is_none(),
            "STRATA_REQUIRE_STRACE is set but strace is not installed"
        );
        say!(
            "skipped: checkpoint_files_are_fsynced_before_the_manifest needs strace (apt-get install strace)"
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().canonicalize().unwrap();
    let data = dataset_40(&root).await;
    let state = root.join("state");
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    // One file per process (`-ff`: no call split by another process's),
    // each call stamped with the time (`-ttt`) to order them all.
    let traces = root.join("traces");
    std::fs::create_dir_all(&traces).unwrap();
    let mut strace = Command::new("strace")
        .args([
            "-ff",
            "-ttt",
            "-qq",
            "-y",
            "-e",
            "trace=fsync,fdatasync",
            "-o",
        ])
        .arg(traces.join("t"))
        .arg(env!("CARGO_BIN_EXE_strata"))
        .args(["coordinator", "--listen", &format!("127.0.0.1:{port}")])
        .arg("--state-dir")
        .arg(&state)
        .args(["--slots", "2"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut cl = connect(&url, &state).await;
    let ck = root.join("ck");
    let id = submit(&mut cl, recipe_ck(&data, 8, (1, 1, 2), &ck, 4))
        .await
        .unwrap();
    let j = ended(&mut cl, &id, 300).await;
    assert_eq!(j.state(), pb::JobState::Succeeded, "{}", j.failure_reason);
    drop(cl);
    // Stop the coordinator (strace's child); strace ends with it.
    let coordinator: u32 = std::fs::read_dir(format!("/proc/{}/task", strace.id()))
        .unwrap()
        .flatten()
        .find_map(|t| {
            std::fs::read_to_string(t.path().join("children"))
                .ok()?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .expect("the coordinator under strace");
    let _ = Command::new("kill")
        .args(["-TERM", &coordinator.to_string()])
        .status();
    assert!(strace.wait().unwrap().success());

    // `1796231333.123456 fsync(FD</path>) = 0`: the paths, in the order
    // they were synced.
    let mut calls: Vec<(f64, String)> = Vec::new();
    for f in std::fs::read_dir(&traces).unwrap().flatten() {
        for l in std::fs::read_to_string(f.path()).unwrap().lines() {
            let (Some((t, call)), true) = (l.split_once(' '), l.ends_with("= 0")) else {
                continue;
            };
            if let Some((path, _)) = call.split_once('<').and_then(|(_, r)| r.split_once(">)")) {
                calls.push((t.parse().unwrap(), path.to_string()));
            }
        }
    }
    calls.sort_by(|a, b| a.0.total_cmp(&b.0));
    let synced: Vec<String> = calls.into_iter().map(|(_, p)| p).collect();
    let log = synced.join("\n");
    let at = |p: &Path| {
        let p = p.to_str().unwrap();
        synced.iter().position(|s| s == p)
    };
    let job_dir = ck.join(&id);
    let mut checked = 0;
    for step in [4u64, 8] {
        let step_dir = job_dir.join(ckpt::step_dir(step));
        let manifest = step_dir.join("manifest.json");
        let manifest_at = at(&manifest)
            .unwrap_or_else(|| panic!("{} was never fsynced:\n{log}", manifest.display()));
        let mut files = Vec::new();
        for sub in ["model", "optim"] {
            for e in std::fs::read_dir(step_dir.join(sub)).unwrap().flatten() {
                files.push(e.path());
            }
        }
        assert!(!files.is_empty());
        for f in &files {
            let f_at = at(f).unwrap_or_else(|| panic!("{} was never fsynced:\n{log}", f.display()));
            assert!(
                f_at < manifest_at,
                "{} was fsynced after the manifest naming it",
                f.display()
            );
            checked += 1;
        }
        for d in [
            step_dir.join("model"),
            step_dir.join("optim"),
            step_dir.clone(),
        ] {
            assert!(at(&d).is_some(), "folder {} was never fsynced", d.display());
        }
    }
    assert!(
        at(&job_dir).is_some(),
        "folder {} was never fsynced",
        job_dir.display()
    );
    say!(
        "fsync: {checked} checkpoint files, their folders and 2 manifests fsynced, each file before its manifest"
    );
}
