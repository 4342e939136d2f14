//! Worker processes on this machine.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use crate::{Exit, JobLauncher, LaunchError, LaunchSpec, Launcher, Ranks, WorkerHandle};

/// Starts each worker as a child process of the caller, its output in its log
/// file. Only slots on `localhost` are reachable.
#[derive(Debug, Default, Clone)]
pub struct LocalLauncher;

pub struct LocalHandle {
    rank: u32,
    child: Child,
    log_path: PathBuf,
    exit: Option<Exit>,
    /// Its entry in the launcher's registry, removed once it has ended.
    registered: Option<PathBuf>,
}

impl Launcher for LocalLauncher {
    type Handle = LocalHandle;

    fn launch(&self, spec: &LaunchSpec) -> Result<LocalHandle, LaunchError> {
        if spec.slot.node != "localhost" {
            return Err(LaunchError::UnreachableNode {
                rank: spec.rank,
                node: spec.slot.node.clone(),
            });
        }
        let log_err = |source| LaunchError::Log {
            rank: spec.rank,
            path: spec.log_path.clone(),
            source,
        };
        if let Some(dir) = spec.log_path.parent() {
            std::fs::create_dir_all(dir).map_err(log_err)?;
        }
        let log = File::create(&spec.log_path).map_err(log_err)?;
        let log2 = log.try_clone().map_err(log_err)?;
        let mut cmd = Command::new(&spec.program);
        cmd.args(&spec.args)
            .envs(spec.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2);
        if let Some(gpu) = spec.slot.gpu {
            cmd.env("CUDA_VISIBLE_DEVICES", gpu.to_string());
        }
        let child = cmd.spawn().map_err(|source| LaunchError::Spawn {
            rank: spec.rank,
            program: spec.program.clone(),
            node: spec.slot.node.clone(),
            source,
        })?;
        Ok(LocalHandle {
            rank: spec.rank,
            child,
            log_path: spec.log_path.clone(),
            exit: None,
            registered: None,
        })
    }
}

fn to_exit(status: std::process::ExitStatus) -> Exit {
    #[cfg(unix)]
    {
        use std::os::unix::process::ExitStatusExt;
        if let Some(sig) = status.signal() {
            return Exit::Signal(sig);
        }
    }
    Exit::Code(status.code().unwrap_or(-1))
}

impl WorkerHandle for LocalHandle {
    fn rank(&self) -> u32 {
        self.rank
    }

    fn try_wait(&mut self) -> Result<Option<Exit>, LaunchError> {
        if self.exit.is_none() {
            let status = self
                .child
                .try_wait()
                .map_err(|source| LaunchError::Control {
                    rank: self.rank,
                    what: "cannot poll worker process",
                    source,
                })?;
            self.exit = status.map(to_exit);
            if self.exit.is_some() {
                self.unregister();
            }
        }
        Ok(self.exit.clone())
    }

    fn kill(&mut self) -> Result<Exit, LaunchError> {
        if let Some(exit) = self.try_wait()? {
            return Ok(exit);
        }
        let control = |what| {
            let rank = self.rank;
            move |source| LaunchError::Control { rank, what, source }
        };
        // The process may exit between the poll and the kill; wait tells.
        let _ = self.child.kill();
        let status = self
            .child
            .wait()
            .map_err(control("cannot reap worker process"))?;
        let exit = to_exit(status);
        self.exit = Some(exit.clone());
        self.unregister();
        Ok(exit)
    }

    #[allow(unsafe_code)]
    fn terminate(&mut self) -> Result<(), LaunchError> {
        if self.try_wait()?.is_some() {
            return Ok(());
        }
        let pid = libc::pid_t::try_from(self.child.id()).expect("a pid fits pid_t");
        // SAFETY: kill(2) with a pid this handle spawned and has not reaped
        // (try_wait saw it running), so the pid cannot have been reused.
        let r = unsafe { libc::kill(pid, libc::SIGTERM) };
        if r != 0 {
            let source = std::io::Error::last_os_error();
            // It exited between the poll and the signal.
            if source.raw_os_error() != Some(libc::ESRCH) {
                return Err(LaunchError::Control {
                    rank: self.rank,
                    what: "cannot signal worker process",
                    source,
                });
            }
        }
        Ok(())
    }

    fn log_tail(&self, n: usize) -> Vec<String> {
        tail(&self.log_path, n)
    }
}

/// The last `n` lines of the file at `path` (none if unreadable).
pub(crate) fn tail(path: &std::path::Path, n: usize) -> Vec<String> {
    // Read at most the last 64 KiB: enough for any sane `n` lines.
    let Ok(mut f) = File::open(path) else {
        return Vec::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(64 * 1024);
    if f.seek(SeekFrom::Start(start)).is_err() {
        return Vec::new();
    }
    let mut buf = Vec::new();
    if f.read_to_end(&mut buf).is_err() {
        return Vec::new();
    }
    let text = String::from_utf8_lossy(&buf);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..]
        .iter()
        .map(|s| s.to_string())
        .collect()
}

impl LocalHandle {
    fn unregister(&mut self) {
        if let Some(entry) = self.registered.take() {
            let _ = std::fs::remove_file(entry);
        }
    }
}

/// [`LocalLauncher`] for a whole attempt. With a registry folder (the
/// coordinator's state), it notes every worker it starts there (its pid,
/// the process's start time, job and rank) until the worker has ended, so
/// that the next coordinator on that state can end the workers a killed
/// one left behind ([`JobLauncher::reclaim`]): they belong to attempts
/// that are over, and one that is stopped (SIGSTOP) or stuck would
/// otherwise never leave.
#[derive(Debug, Default, Clone)]
pub struct LocalJobLauncher {
    registry: Option<PathBuf>,
}

impl LocalJobLauncher {
    /// A launcher that notes its workers in `dir` (created if missing).
    pub fn with_registry(dir: PathBuf) -> LocalJobLauncher {
        LocalJobLauncher {
            registry: Some(dir),
        }
    }

    /// Notes `h`'s worker in the registry; a worker that cannot be noted
    /// runs anyway (the note only serves a coordinator's crash).
    fn register(&self, h: &mut LocalHandle, job: &str) {
        let Some(dir) = &self.registry else {
            return;
        };
        let pid = h.child.id();
        let Some(started) = process_start(pid) else {
            return;
        };
        let entry = dir.join(pid.to_string());
        let noted = std::fs::create_dir_all(dir)
            .and_then(|()| std::fs::write(&entry, format!("{started} {} {job}\n", h.rank)));
        match noted {
            Ok(()) => h.registered = Some(entry),
            Err(e) => tracing::warn!(
                registry = %dir.display(),
                pid,
                error = %e,
                "cannot note a worker process; a coordinator crash would leave it running"
            ),
        }
    }
}

/// Process `pid`'s state letter (`Z` once it has ended and waits to be
/// reaped) and when it started (clock ticks after boot, /proc's field 22:
/// with the pid, it names one process, never a later one given the same
/// pid).
fn proc_stat(pid: u32) -> Option<(char, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command's closing parenthesis start at field 3.
    let mut fields = stat.rsplit_once(')')?.1.split_whitespace();
    let state = fields.next()?.chars().next()?;
    let started = fields.nth(22 - 4)?.parse().ok()?;
    Some((state, started))
}

/// When process `pid` started ([`proc_stat`]).
fn process_start(pid: u32) -> Option<u64> {
    proc_stat(pid).map(|(_, started)| started)
}

/// Whether the process `pid` and `started` name still runs (not ended,
/// not a zombie).
fn still_runs(pid: u32, started: u64) -> bool {
    proc_stat(pid).is_some_and(|(state, t)| t == started && state != 'Z')
}

/// An attempt's local worker processes. Dropped, it kills what still runs.
pub struct LocalRanks(Vec<LocalHandle>);

impl JobLauncher for LocalJobLauncher {
    fn start(
        &self,
        ranks: &[LaunchSpec],
        info: &crate::StartInfo,
    ) -> Result<Box<dyn Ranks>, LaunchError> {
        let mut started = Vec::with_capacity(ranks.len());
        for spec in ranks {
            // On an error the handles started so far drop, killing them.
            let mut h = LocalLauncher.launch(spec)?;
            self.register(&mut h, &info.job);
            started.push(h);
        }
        Ok(Box::new(LocalRanks(started)))
    }

    /// Kills (SIGKILL) the workers a previous coordinator on this state
    /// noted and that still run, and waits a little for them to be gone
    /// (their GPUs and ports are the next attempt's).
    #[allow(unsafe_code)]
    fn reclaim(&self) -> Vec<crate::Reclaimed> {
        let Some(dir) = &self.registry else {
            return Vec::new();
        };
        let Ok(entries) = std::fs::read_dir(dir) else {
            return Vec::new();
        };
        let mut killed = Vec::new();
        for e in entries.flatten() {
            let path = e.path();
            let note = std::fs::read_to_string(&path).unwrap_or_default();
            let mut f = note.split_whitespace();
            let pid: Option<u32> = e.file_name().to_str().and_then(|p| p.parse().ok());
            let started: Option<u64> = f.next().and_then(|t| t.parse().ok());
            let (rank, job) = (f.next().unwrap_or("?"), f.next().unwrap_or("?"));
            if let (Some(pid), Some(started)) = (pid, started)
                && process_start(pid) == Some(started)
                && let Ok(p) = libc::pid_t::try_from(pid)
            {
                // SAFETY: kill(2) on the process the note names: its pid
                // and start time match, so it is that worker, not a later
                // process given the same pid.
                if unsafe { libc::kill(p, libc::SIGKILL) } == 0 {
                    tracing::warn!(
                        pid,
                        job,
                        rank,
                        "killed a worker a previous coordinator left running"
                    );
                    killed.push((
                        pid,
                        started,
                        crate::Reclaimed {
                            job: Some(job.to_string()),
                            what: format!("worker pid {pid} (rank {rank})"),
                        },
                    ));
                }
            }
            let _ = std::fs::remove_file(&path);
        }
        // Reaped by their new parent (init), or zombies: gone either way.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while std::time::Instant::now() < deadline
            && killed
                .iter()
                .any(|(pid, started, _)| still_runs(*pid, *started))
        {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        killed.into_iter().map(|(_, _, what)| what).collect()
    }
}

impl Ranks for LocalRanks {
    fn len(&self) -> usize {
        self.0.len()
    }

    fn exit(&mut self, rank: usize) -> Result<Option<Exit>, LaunchError> {
        self.0[rank].try_wait()
    }

    fn terminate(&mut self) {
        for h in &mut self.0 {
            if let Err(e) = h.terminate() {
                tracing::warn!(error = %e, "worker process control failed");
            }
        }
    }

    fn kill(&mut self) {
        for h in &mut self.0 {
            if let Err(e) = h.kill() {
                tracing::warn!(error = %e, "worker process control failed");
            }
        }
    }

    fn log_tail(&self, rank: usize, n: usize) -> Vec<String> {
        self.0[rank].log_tail(n)
    }
}

impl Drop for LocalHandle {
    /// A handle dropped while its worker runs stops the worker: no orphans.
    fn drop(&mut self) {
        let _ = self.kill();
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;
    use crate::Slot;

    fn spec(dir: &std::path::Path, script: &str, slot_node: &str, gpu: Option<u32>) -> LaunchSpec {
        LaunchSpec {
            rank: 3,
            slot: Slot {
                node: slot_node.into(),
                index: 0,
                gpu,
            },
            program: "/bin/sh".into(),
            args: vec!["-c".into(), script.into()],
            env: vec![("STRATA_TEST_VAR".into(), "hello".into())],
            log_path: dir.join("logs/rank-3.log"),
        }
    }

    fn wait(h: &mut LocalHandle) -> Exit {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(e) = h.try_wait().unwrap() {
                return e;
            }
            assert!(Instant::now() < deadline, "worker did not exit");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn a_worker_gets_its_environment_and_its_exit_status_and_log_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let script =
            "echo \"var=$STRATA_TEST_VAR gpu=$CUDA_VISIBLE_DEVICES\"; echo boom >&2; exit 3";
        let mut h = LocalLauncher
            .launch(&spec(dir.path(), script, "localhost", Some(1)))
            .unwrap();
        assert_eq!(wait(&mut h), Exit::Code(3));
        assert_eq!(h.log_tail(10), vec!["var=hello gpu=1", "boom"]);
        assert_eq!(h.log_tail(1), vec!["boom"]);
    }

    #[test]
    fn kill_stops_a_running_worker() {
        let dir = tempfile::tempdir().unwrap();
        let mut h = LocalLauncher
            .launch(&spec(dir.path(), "sleep 30", "localhost", None))
            .unwrap();
        assert_eq!(h.try_wait().unwrap(), None);
        assert_eq!(h.kill().unwrap(), Exit::Signal(9));
        // Killing again reports the same end.
        assert_eq!(h.kill().unwrap(), Exit::Signal(9));
    }

    #[test]
    fn terminate_asks_and_kill_insists() {
        let dir = tempfile::tempdir().unwrap();
        // Exits 7 on SIGTERM.
        let graceful = "trap 'exit 7' TERM; while true; do sleep 0.05; done";
        // Ignores SIGTERM.
        let stubborn = "trap '' TERM; while true; do sleep 0.05; done";
        let mut ranks = LocalJobLauncher::default()
            .start(
                &[
                    spec(dir.path(), graceful, "localhost", None),
                    LaunchSpec {
                        rank: 4,
                        log_path: dir.path().join("logs/rank-4.log"),
                        ..spec(dir.path(), stubborn, "localhost", None)
                    },
                ],
                &crate::StartInfo::default(),
            )
            .unwrap();
        std::thread::sleep(Duration::from_millis(200));
        assert!(!ranks.all_ended());
        ranks.terminate();
        let deadline = Instant::now() + Duration::from_secs(10);
        while ranks.exit(0).unwrap().is_none() {
            assert!(Instant::now() < deadline, "rank 3 ignored SIGTERM");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(ranks.exit(0).unwrap(), Some(Exit::Code(7)));
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(ranks.exit(1).unwrap(), None, "rank 4 ignores SIGTERM");
        ranks.kill();
        assert_eq!(ranks.exit(1).unwrap(), Some(Exit::Signal(9)));
        assert!(ranks.all_ended());
    }

    /// Workers of a coordinator that died (its handles never dropped), one
    /// of them stopped: the next launcher on the registry kills them; an
    /// entry whose pid now names another process (ours) spares it.
    #[test]
    fn a_registry_lets_the_next_launcher_end_what_a_crash_left() {
        let dir = tempfile::tempdir().unwrap();
        let registry = dir.path().join("local-workers");
        let info = crate::StartInfo {
            job: "job-1".into(),
            ..crate::StartInfo::default()
        };
        let ranks = LocalJobLauncher::with_registry(registry.clone())
            .start(
                &[
                    spec(dir.path(), "sleep 30", "localhost", None),
                    LaunchSpec {
                        rank: 4,
                        log_path: dir.path().join("logs/rank-4.log"),
                        ..spec(dir.path(), "sleep 30", "localhost", None)
                    },
                ],
                &info,
            )
            .unwrap();
        let mut pids: Vec<u32> = std::fs::read_dir(&registry)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_str().unwrap().parse().unwrap())
            .collect();
        pids.sort_unstable();
        assert_eq!(pids.len(), 2);
        // The coordinator "crashes": nothing stops its workers.
        std::mem::forget(ranks);
        let stopped = std::process::Command::new("kill")
            .args(["-STOP", &pids[0].to_string()])
            .status()
            .unwrap();
        assert!(stopped.success());
        let me = std::process::id();
        std::fs::write(registry.join(me.to_string()), "1 0 job-0\n").unwrap();

        let reclaimed = LocalJobLauncher::with_registry(registry.clone()).reclaim();
        assert_eq!(reclaimed.len(), 2, "{reclaimed:?}");
        assert!(
            reclaimed
                .iter()
                .all(|r| r.job.as_deref() == Some("job-1") && r.what.starts_with("worker pid ")),
            "{reclaimed:?}"
        );
        assert!(
            reclaimed.iter().any(|r| r.what.ends_with("(rank 3)")),
            "{reclaimed:?}"
        );
        for pid in &pids {
            assert!(
                proc_stat(*pid).is_none_or(|(state, _)| state == 'Z'),
                "worker {pid} still runs"
            );
        }
        assert_eq!(std::fs::read_dir(&registry).unwrap().count(), 0);
        // Nothing left to reclaim; a launcher without a registry has none.
        assert!(
            LocalJobLauncher::with_registry(registry)
                .reclaim()
                .is_empty()
        );
        assert!(LocalJobLauncher::default().reclaim().is_empty());
    }

    /// A worker's entry goes once it has ended.
    #[test]
    fn an_ended_worker_leaves_the_registry() {
        let dir = tempfile::tempdir().unwrap();
        let registry = dir.path().join("local-workers");
        let mut ranks = LocalJobLauncher::with_registry(registry.clone())
            .start(
                &[spec(dir.path(), "exit 0", "localhost", None)],
                &crate::StartInfo::default(),
            )
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !ranks.all_ended() {
            assert!(Instant::now() < deadline, "worker did not exit");
            std::thread::sleep(Duration::from_millis(10));
        }
        assert_eq!(std::fs::read_dir(&registry).unwrap().count(), 0);
    }

    #[test]
    fn errors_name_the_rank_and_what_failed() {
        let dir = tempfile::tempdir().unwrap();
        let err = LocalLauncher
            .launch(&spec(dir.path(), "true", "node-7", None))
            .err()
            .unwrap();
        assert_eq!(
            err.to_string(),
            "rank 3: slot on node node-7, which this launcher cannot reach"
        );
        let mut s = spec(dir.path(), "true", "localhost", None);
        s.program = dir.path().join("no-such-worker");
        let err = LocalLauncher.launch(&s).err().unwrap().to_string();
        assert!(err.starts_with("rank 3: cannot start"), "{err}");
        assert!(err.contains("no-such-worker"), "{err}");
    }
}
