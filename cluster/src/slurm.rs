//! Workers on a Slurm cluster: one allocation (`sbatch`) per attempt, its
//! ranks started by one `srun` inside it, placed rank by rank on the nodes
//! the coordinator chose (`--distribution=arbitrary` with a host file), and
//! the allocation watched with `squeue` until it ends.
//!
//! The attempt's folder (the parent of the ranks' log paths) must be on a
//! file system every node shares: the batch script, the workers'
//! environment file (mode 0600: it holds the job's token), the host file,
//! the ranks' logs and their exit files live there.
//!
//! Each rank runs under a small shell wrapper that forwards SIGTERM to the
//! worker and writes the worker's exit status to `rank-R.exit`: srun alone
//! reports only the step's end. A worker that stops on SIGTERM (after it
//! saved a checkpoint) exits 143; when strata did not send that signal,
//! Slurm did (`scancel`, preemption, the `--signal` ahead of a time limit),
//! and the rank's exit is held until the allocation's own end names the
//! cause.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::{Exit, JobLauncher, LaunchError, LaunchSpec, Lost, NodeStatus, Ranks, StartInfo};

/// How the coordinator uses Slurm.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlurmConfig {
    /// The partition (`None`: the cluster's default partition).
    pub partition: Option<String>,
    pub account: Option<String>,
    pub qos: Option<String>,
    /// The time limit of each allocation, in any of Slurm's formats.
    pub time: Option<String>,
    /// GPUs per node, one rank each; `None`: what Slurm reports (`Gres`),
    /// 0 for CPU workers.
    pub gpus_per_node: Option<u32>,
    /// CPUs each CPU rank gets (a GPU rank gets this many too).
    pub cpus_per_task: u32,
    /// Seconds before the time limit at which Slurm sends SIGTERM (the
    /// workers save a checkpoint and leave).
    pub signal_grace_s: u64,
    /// Marks this coordinator's allocations (their comment is
    /// `strata:OWNER:JOB:ATTEMPT`), so a restarted coordinator finds them.
    pub owner: String,
    /// How often the allocations are polled (one `squeue` for all of
    /// them).
    pub poll: Duration,
    /// How long any Slurm command may take before it is given up on.
    pub command_timeout: Duration,
}

impl Default for SlurmConfig {
    fn default() -> Self {
        SlurmConfig {
            partition: None,
            account: None,
            qos: None,
            time: None,
            gpus_per_node: None,
            cpus_per_task: 1,
            signal_grace_s: 60,
            owner: "strata".into(),
            poll: Duration::from_secs(1),
            command_timeout: Duration::from_secs(60),
        }
    }
}

/// A job's own Slurm settings (the recipe's `[slurm]` section), over the
/// coordinator's.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SlurmOptions {
    pub partition: Option<String>,
    pub account: Option<String>,
    pub qos: Option<String>,
    pub time: Option<String>,
}

fn slurm_err(what: impl Into<String>) -> LaunchError {
    LaunchError::Slurm(what.into())
}

/// Runs a Slurm command, giving up after `timeout`; its stdout, or an
/// error with its stderr.
fn slurm(program: &str, args: &[String], timeout: Duration) -> Result<String, LaunchError> {
    let out =
        crate::run_with_timeout(Command::new(program).args(args), timeout).map_err(|e| match e
            .kind()
        {
            std::io::ErrorKind::NotFound => slurm_err(format!(
                "{program} is not on PATH (is this machine a Slurm submit host?)"
            )),
            std::io::ErrorKind::TimedOut => slurm_err(format!(
                "{program} {}: no answer within {} s (is slurmctld responding?)",
                args.join(" "),
                timeout.as_secs()
            )),
            _ => slurm_err(format!("cannot run {program}: {e}")),
        })?;
    if !out.status.success() {
        return Err(slurm_err(format!(
            "{program} {}: {} ({})",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim(),
            out.status
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Quotes `s` for a POSIX shell.
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The number of GPUs in a `Gres` field (`gpu:4`, `gpu:a100:2(S:0-1)`,
/// `gpu:1,shard:8`, `(null)`).
pub fn parse_gres_gpus(gres: &str) -> u32 {
    gres.split(',')
        .filter_map(|g| {
            let g = g.split('(').next()?;
            let mut parts = g.split(':');
            if parts.next()? != "gpu" {
                return None;
            }
            parts.next_back().and_then(|n| n.parse::<u32>().ok())
        })
        .sum()
}

/// Whether a node in `sinfo`'s long state takes new work: idle, mixed or
/// allocated nodes do; down, drained, draining, failing, not responding
/// (`*`) or powered-down (`~`) ones do not.
fn usable(state: &str) -> bool {
    if state.ends_with('*') || state.ends_with('~') || state.ends_with('#') {
        return false;
    }
    let base = state.trim_end_matches(|c: char| !c.is_ascii_alphabetic());
    matches!(
        base,
        "idle" | "mixed" | "allocated" | "completing" | "planned"
    )
}

/// Parses `sinfo -h -N -o '%N|%c|%G|%T|%P'` into node statuses: the nodes
/// of `partition` (or of the default one, marked `*`), each once.
pub fn parse_sinfo(
    text: &str,
    partition: Option<&str>,
    gpus_per_node: Option<u32>,
    cpus_per_task: u32,
) -> Vec<NodeStatus> {
    let mut nodes: BTreeMap<String, NodeStatus> = BTreeMap::new();
    for line in text.lines() {
        let f: Vec<&str> = line.trim().split('|').collect();
        if f.len() < 5 {
            continue;
        }
        let part = f[4];
        let in_partition = match partition {
            Some(p) => part.trim_end_matches('*') == p,
            None => part.ends_with('*'),
        };
        if !in_partition {
            continue;
        }
        let cpus = f[1].parse::<u32>().unwrap_or(0);
        let gpus = gpus_per_node.unwrap_or_else(|| parse_gres_gpus(f[2]));
        let state = f[3].to_string();
        let slots = if !usable(&state) {
            0
        } else if gpus > 0 {
            gpus.min(cpus / cpus_per_task.max(1))
        } else {
            cpus / cpus_per_task.max(1)
        };
        nodes.insert(
            f[0].to_string(),
            NodeStatus {
                name: f[0].to_string(),
                cpus,
                gpus,
                slots,
                state,
            },
        );
    }
    nodes.into_values().collect()
}

/// An allocation's state, as `squeue` last saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllocState {
    /// `PENDING`, `RUNNING`, `COMPLETING`, `CANCELLED`, `TIMEOUT`, …; `GONE`
    /// when the controller no longer knows the job.
    pub state: String,
    pub reason: String,
    /// Seconds used and the time limit in seconds (`None`: unlimited).
    pub elapsed_s: u64,
    pub limit_s: Option<u64>,
}

impl AllocState {
    fn is_final(&self) -> bool {
        !matches!(
            self.state.as_str(),
            "PENDING"
                | "RUNNING"
                | "CONFIGURING"
                | "COMPLETING"
                | "SUSPENDED"
                | "REQUEUED"
                | "RESIZING"
                | "SIGNALING"
                | "STAGE_OUT"
        )
    }

    fn waiting(&self) -> bool {
        matches!(
            self.state.as_str(),
            "PENDING" | "CONFIGURING" | "SUSPENDED" | "REQUEUED"
        )
    }
}

/// Parses Slurm's durations: `MM`, `MM:SS`, `HH:MM:SS`, `D-HH`, `D-HH:MM`,
/// `D-HH:MM:SS`; `None` for `UNLIMITED`, `INVALID` or `NOT_SET`.
pub fn parse_slurm_time(s: &str) -> Option<u64> {
    let s = s.trim();
    let (days, rest) = match s.split_once('-') {
        Some((d, r)) => (d.parse::<u64>().ok()?, r),
        None => (0, s),
    };
    let parts: Vec<u64> = rest
        .split(':')
        .map(|p| p.parse::<u64>().ok())
        .collect::<Option<_>>()?;
    let secs = match (s.contains('-'), parts.as_slice()) {
        (false, [m]) => m * 60,
        (false, [m, sec]) => m * 60 + sec,
        (false, [h, m, sec]) => h * 3600 + m * 60 + sec,
        (true, [h]) => h * 3600,
        (true, [h, m]) => h * 3600 + m * 60,
        (true, [h, m, sec]) => h * 3600 + m * 60 + sec,
        _ => return None,
    };
    Some(days * 86400 + secs)
}

/// Parses one `squeue -h --states=all -o '%i|%T|%r|%M|%l'` line.
fn parse_squeue_line(line: &str) -> Option<(String, AllocState)> {
    let f: Vec<&str> = line.trim().split('|').collect();
    if f.len() < 5 {
        return None;
    }
    Some((
        f[0].to_string(),
        AllocState {
            state: f[1].to_string(),
            reason: f[2].to_string(),
            elapsed_s: parse_slurm_time(f[3]).unwrap_or(0),
            limit_s: parse_slurm_time(f[4]),
        },
    ))
}

/// The states of allocations `ids`, from one `squeue` (and for those it
/// no longer knows, one `sacct`). An allocation neither knows is GONE.
fn query_all(ids: &[String], timeout: Duration) -> Result<Vec<(String, AllocState)>, LaunchError> {
    let fmt = "%i|%T|%r|%M|%l";
    let args = ["-h", "--states=all", "-j", &ids.join(","), "-o", fmt].map(String::from);
    let known: Vec<(String, AllocState)> = match slurm("squeue", &args, timeout) {
        Ok(out) => out.lines().filter_map(parse_squeue_line).collect(),
        // One id that squeue no longer knows (purged after MinJobAge) is
        // refused outright; several are filtered, the unknown ones left
        // out.
        Err(LaunchError::Slurm(e)) if e.contains("Invalid job id") && ids.len() == 1 => Vec::new(),
        Err(e) => return Err(e),
    };
    let mut out = Vec::with_capacity(ids.len());
    let mut missing = Vec::new();
    for id in ids {
        match known.iter().find(|(j, _)| j == id) {
            Some((_, s)) => out.push((id.clone(), s.clone())),
            None => missing.push(id.clone()),
        }
    }
    if !missing.is_empty() {
        // Accounting (sacct, where slurmdbd runs) still knows how they
        // ended.
        let args = [
            "-n",
            "-X",
            "-P",
            "-j",
            &missing.join(","),
            "--format=JobID,State,Reason,Elapsed,Timelimit",
        ]
        .map(String::from);
        let text = slurm("sacct", &args, timeout).unwrap_or_default();
        for id in missing {
            let s = parse_sacct(&text, &id).unwrap_or_else(gone);
            out.push((id, s));
        }
    }
    Ok(out)
}

/// Parses `sacct -n -X -P --format=JobID,State,Reason,Elapsed,Timelimit`
/// (its state may read `CANCELLED by 1000`).
fn parse_sacct(text: &str, id: &str) -> Option<AllocState> {
    text.lines().find_map(|l| {
        let f: Vec<&str> = l.trim().split('|').collect();
        (f.len() >= 5 && f[0] == id).then(|| AllocState {
            state: f[1].split_whitespace().next().unwrap_or("GONE").to_string(),
            reason: f[2].to_string(),
            elapsed_s: parse_slurm_time(f[3]).unwrap_or(0),
            limit_s: parse_slurm_time(f[4]),
        })
    })
}

fn gone() -> AllocState {
    AllocState {
        state: "GONE".into(),
        reason: String::new(),
        elapsed_s: 0,
        limit_s: None,
    }
}

/// Starts each attempt as one Slurm allocation.
pub struct SlurmJobLauncher {
    cfg: SlurmConfig,
    poller: Arc<Poller>,
}

/// One thread that asks Slurm for every live allocation's state at once
/// (one `squeue` per poll, whatever the number of jobs: the RPC storm
/// Slurm sites complain about comes from one poller per allocation).
struct Poller {
    allocs: Mutex<BTreeMap<String, Arc<Watch>>>,
    poll: Duration,
    timeout: Duration,
}

impl Poller {
    fn start(poll: Duration, timeout: Duration) -> Result<Arc<Poller>, LaunchError> {
        let p = Arc::new(Poller {
            allocs: Mutex::new(BTreeMap::new()),
            poll,
            timeout,
        });
        crate::spawn_poller("slurm-poller", &p)
            .map_err(|e| slurm_err(format!("poller thread: {e}")))?;
        Ok(p)
    }

    fn watch(&self, id: &str) -> Arc<Watch> {
        let w = Arc::new(Watch {
            state: Mutex::new(None),
        });
        self.allocs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.to_string(), w.clone());
        w
    }

    fn forget(&self, id: &str) {
        self.allocs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
    }
}

impl crate::Poll for Poller {
    fn pause(&self) -> Duration {
        self.poll
    }

    fn tick(&self) {
        let watched: Vec<(String, Arc<Watch>)> = self
            .allocs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        if watched.is_empty() {
            return;
        }
        let ids: Vec<String> = watched.iter().map(|w| w.0.clone()).collect();
        match query_all(&ids, self.timeout) {
            Ok(states) => {
                for (id, s) in states {
                    if let Some((_, w)) = watched.iter().find(|w| w.0 == id) {
                        *w.state.lock().unwrap_or_else(|e| e.into_inner()) = Some(s);
                    }
                }
            }
            Err(e) => {
                tracing::warn!(allocations = ids.len(), error = %e, "cannot poll the allocations")
            }
        }
    }
}

impl SlurmJobLauncher {
    /// Checks that Slurm answers (`sinfo`), then launches through it.
    pub fn new(cfg: SlurmConfig) -> Result<SlurmJobLauncher, LaunchError> {
        if cfg.cpus_per_task == 0 {
            return Err(slurm_err("cpus_per_task must be at least 1"));
        }
        if let Some(t) = &cfg.time
            && parse_slurm_time(t).is_none()
        {
            return Err(slurm_err(format!(
                "time {t:?} is not a Slurm time limit (MM, HH:MM:SS, D-HH:MM, …)"
            )));
        }
        let poller = Poller::start(cfg.poll, cfg.command_timeout)?;
        let launcher = SlurmJobLauncher { cfg, poller };
        launcher.nodes()?;
        Ok(launcher)
    }

    pub fn config(&self) -> &SlurmConfig {
        &self.cfg
    }

    fn nodes(&self) -> Result<Vec<NodeStatus>, LaunchError> {
        let out = slurm(
            "sinfo",
            &["-h", "-N", "-o", "%N|%c|%G|%T|%P"].map(String::from),
            self.cfg.command_timeout,
        )?;
        let nodes = parse_sinfo(
            &out,
            self.cfg.partition.as_deref(),
            self.cfg.gpus_per_node,
            self.cfg.cpus_per_task,
        );
        if nodes.is_empty() {
            return Err(slurm_err(match &self.cfg.partition {
                Some(p) => format!("partition {p} has no nodes (or does not exist): see `sinfo`"),
                None => "the cluster has no default partition; give --partition".into(),
            }));
        }
        Ok(nodes)
    }

    /// The batch script, the rank wrapper, the host file and the workers'
    /// environment file of one attempt, written into `dir`.
    fn write_files(
        &self,
        dir: &Path,
        ranks: &[LaunchSpec],
        gpus: bool,
    ) -> Result<PathBuf, LaunchError> {
        let io = |what: &str, path: &Path, e: std::io::Error| {
            slurm_err(format!("cannot write {what} {}: {e}", path.display()))
        };
        std::fs::create_dir_all(dir).map_err(|e| io("folder", dir, e))?;
        let first = &ranks[0];
        // Every rank runs the same command: the launcher sets the rank.
        for r in ranks {
            let own = |env: &[(String, String)]| -> Vec<(String, String)> {
                env.iter()
                    .filter(|(k, _)| !RANK_VARS.contains(&k.as_str()))
                    .cloned()
                    .collect()
            };
            if r.program != first.program || r.args != first.args || own(&r.env) != own(&first.env)
            {
                return Err(slurm_err(format!(
                    "rank {}: its command or environment differs from rank {}'s; one srun starts every rank",
                    r.rank, first.rank
                )));
            }
            if r.log_path.parent() != Some(dir) {
                return Err(slurm_err(format!(
                    "rank {}: log {} is outside the attempt's folder {}",
                    r.rank,
                    r.log_path.display(),
                    dir.display()
                )));
            }
        }
        let hosts: String = ranks.iter().map(|r| format!("{}\n", r.slot.node)).collect();
        let hostfile = dir.join("hostfile");
        std::fs::write(&hostfile, hosts).map_err(|e| io("host file", &hostfile, e))?;

        // The environment (the job's token among it) in a file only its
        // owner reads: never on a command line, nor in Slurm's records.
        let env_path = dir.join("worker.env");
        let mut env = String::new();
        for (k, v) in &first.env {
            if RANK_VARS.contains(&k.as_str()) {
                continue;
            }
            env.push_str(&format!("export {k}={}\n", shell_quote(v)));
        }
        write_private(&env_path, env.as_bytes()).map_err(|e| io("environment", &env_path, e))?;

        let d = shell_quote(&dir.to_string_lossy());
        let cmd: Vec<String> = std::iter::once(first.program.to_string_lossy().into_owned())
            .chain(first.args.iter().cloned())
            .map(|a| shell_quote(&a))
            .collect();
        let threads = if gpus {
            String::new()
        } else {
            "export RAYON_NUM_THREADS=\"${RAYON_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}\"\n".into()
        };
        let wrapper = format!(
            r#"#!/bin/sh
# One rank of a strata attempt, started by srun: the worker, with SIGTERM
# forwarded, and its exit status written where the coordinator reads it.
dir={d}
. "$dir/worker.env"
export STRATA_RANK="$SLURM_PROCID" STRATA_LOCAL_RANK="$SLURM_LOCALID"
{threads}rm -f "$dir/rank-$SLURM_PROCID.exit"
{cmd} &
pid=$!
term=0
trap 'term=1; kill -TERM $pid 2>/dev/null' TERM
while :; do
  term=0
  wait $pid
  rc=$?
  [ $term = 1 ] || break
done
echo $rc > "$dir/rank-$SLURM_PROCID.exit.tmp" && mv "$dir/rank-$SLURM_PROCID.exit.tmp" "$dir/rank-$SLURM_PROCID.exit"
exit $rc
"#,
            cmd = cmd.join(" ")
        );
        let wrapper_path = dir.join("rank.sh");
        std::fs::write(&wrapper_path, wrapper).map_err(|e| io("rank wrapper", &wrapper_path, e))?;

        let gpu_arg = if gpus { " --gpus-per-task=1" } else { "" };
        let batch = format!(
            r#"#!/bin/sh
# A strata attempt: every rank, placed as the coordinator chose.
dir={d}
export SLURM_HOSTFILE="$dir/hostfile"
exec srun --distribution=arbitrary --ntasks={n} --cpus-per-task={c}{gpu_arg} \
  --kill-on-bad-exit=0 --input=none --output="$dir/rank-%t.log" \
  /bin/sh "$dir/rank.sh"
"#,
            n = ranks.len(),
            c = self.cfg.cpus_per_task,
        );
        let batch_path = dir.join("attempt.sbatch");
        std::fs::write(&batch_path, batch).map_err(|e| io("batch script", &batch_path, e))?;
        Ok(batch_path)
    }
}

/// The variables the launcher sets per rank.
const RANK_VARS: [&str; 3] = ["STRATA_RANK", "STRATA_LOCAL_RANK", "CUDA_VISIBLE_DEVICES"];

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;
    let _ = std::fs::remove_file(path);
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    opts.mode(0o600);
    opts.open(path)?.write_all(bytes)
}

impl JobLauncher for SlurmJobLauncher {
    fn start(&self, ranks: &[LaunchSpec], info: &StartInfo) -> Result<Box<dyn Ranks>, LaunchError> {
        let Some(first) = ranks.first() else {
            return Err(slurm_err("an attempt with no ranks"));
        };
        let dir = first
            .log_path
            .parent()
            .ok_or_else(|| slurm_err("a rank log path without a folder"))?
            .to_path_buf();
        let gpus = ranks.iter().any(|r| r.slot.gpu.is_some());
        let batch = self.write_files(&dir, ranks, gpus)?;
        let mut nodes: Vec<&str> = Vec::new();
        for r in ranks {
            if !nodes.contains(&r.slot.node.as_str()) {
                nodes.push(&r.slot.node);
            }
        }
        let per_node = nodes
            .iter()
            .map(|n| ranks.iter().filter(|r| r.slot.node == *n).count())
            .max()
            .unwrap_or(1);
        let o = &info.slurm;
        let pick = |job: &Option<String>, ours: &Option<String>| job.clone().or(ours.clone());
        let mut args: Vec<String> = vec![
            "--parsable".into(),
            format!("--job-name=strata-{}-a{}", info.job, info.attempt),
            format!(
                "--comment=strata:{}:{}:{}",
                self.cfg.owner, info.job, info.attempt
            ),
            format!("--nodes={}", nodes.len()),
            format!("--nodelist={}", nodes.join(",")),
            format!("--ntasks={}", ranks.len()),
            format!("--ntasks-per-node={per_node}"),
            format!("--cpus-per-task={}", self.cfg.cpus_per_task),
            format!("--signal=TERM@{}", self.cfg.signal_grace_s),
            // A lost node or a preemption ends the allocation; strata
            // starts the next attempt itself, from a checkpoint.
            "--no-requeue".into(),
            format!("--chdir={}", dir.display()),
            format!("--output={}", dir.join("slurm-batch.log").display()),
        ];
        if gpus {
            args.push("--gpus-per-task=1".into());
        }
        for (flag, v) in [
            ("partition", pick(&o.partition, &self.cfg.partition)),
            ("account", pick(&o.account, &self.cfg.account)),
            ("qos", pick(&o.qos, &self.cfg.qos)),
            ("time", pick(&o.time, &self.cfg.time)),
        ] {
            if let Some(v) = v {
                args.push(format!("--{flag}={v}"));
            }
        }
        args.push(batch.to_string_lossy().into_owned());
        let out = slurm("sbatch", &args, self.cfg.command_timeout)?;
        let id = out
            .trim()
            .split(';')
            .next()
            .filter(|s| !s.is_empty() && s.chars().all(|c| c.is_ascii_digit()))
            .ok_or_else(|| slurm_err(format!("sbatch printed no job id: {out:?}")))?
            .to_string();
        tracing::info!(job = %info.job, attempt = info.attempt, slurm_job = %id, nodes = nodes.len(), ranks = ranks.len(), "submitted the attempt's allocation");
        let watch = self.poller.watch(&id);
        Ok(Box::new(SlurmRanks {
            id,
            name: format!("strata-{}-a{}", info.job, info.attempt),
            dir,
            exits: vec![None; ranks.len()],
            listed: None,
            watch,
            poller: self.poller.clone(),
            timeout: self.cfg.command_timeout,
            terminated: false,
            cancelled: false,
            ran: false,
            held_since: None,
            grace_s: self.cfg.signal_grace_s,
        }))
    }

    fn inventory(&self) -> Option<Result<Vec<NodeStatus>, LaunchError>> {
        Some(self.nodes())
    }

    fn shares_this_machine(&self) -> bool {
        false
    }

    fn describe(&self) -> String {
        format!(
            "Slurm partition {} ({} CPUs per rank)",
            self.cfg.partition.as_deref().unwrap_or("(default)"),
            self.cfg.cpus_per_task
        )
    }

    fn reclaim(&self) -> Vec<crate::Reclaimed> {
        let out = match slurm(
            "squeue",
            &["-h", "-o", "%i|%j|%k|%T"].map(String::from),
            self.cfg.command_timeout,
        ) {
            Ok(o) => o,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list allocations a previous coordinator left");
                return Vec::new();
            }
        };
        let mine = format!("strata:{}:", self.cfg.owner);
        let mut found = Vec::new();
        for line in out.lines() {
            let f: Vec<&str> = line.trim().split('|').collect();
            if f.len() < 4 || !f[2].starts_with(&mine) {
                continue;
            }
            match slurm("scancel", &[f[0].to_string()], self.cfg.command_timeout) {
                Ok(_) => {
                    tracing::warn!(
                        slurm_job = f[0],
                        name = f[1],
                        "cancelled an allocation a previous coordinator left"
                    );
                    // The comment is `strata:OWNER:JOB:ATTEMPT`.
                    let job = f[2][mine.len()..]
                        .rsplit_once(':')
                        .map(|(j, _)| j.to_string());
                    found.push(crate::Reclaimed {
                        job,
                        what: format!("Slurm job {} ({})", f[0], f[1]),
                    });
                }
                Err(e) => {
                    tracing::error!(slurm_job = f[0], error = %e, "cannot cancel a leftover allocation")
                }
            }
        }
        found
    }
}

struct Watch {
    state: Mutex<Option<AllocState>>,
}

/// How long a rank's SIGTERM exit waits for the allocation's end to name
/// the cause.
const HOLD: Duration = Duration::from_secs(120);

/// The ranks of one attempt: one Slurm allocation. Dropped, it cancels the
/// allocation unless it has ended: no Slurm job is left behind.
pub struct SlurmRanks {
    id: String,
    name: String,
    dir: PathBuf,
    exits: Vec<Option<Exit>>,
    /// When the attempt's folder was last listed for exit files.
    listed: Option<Instant>,
    watch: Arc<Watch>,
    poller: Arc<Poller>,
    timeout: Duration,
    /// Whether strata sent SIGTERM (a stop it asked for).
    terminated: bool,
    /// Whether strata cancelled the allocation.
    cancelled: bool,
    /// Whether the allocation has been seen running.
    ran: bool,
    /// Since when a rank's exit on a SIGTERM strata did not send is held.
    held_since: Option<Instant>,
    grace_s: u64,
}

impl SlurmRanks {
    pub fn slurm_job(&self) -> &str {
        &self.id
    }

    fn state(&self) -> Option<AllocState> {
        self.watch
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The exit statuses the ranks have written so far: one listing of
    /// the attempt's folder (at most once per poll), then only the new
    /// `rank-R.exit` files are read. At 16,384 ranks on a shared file
    /// system that is one directory read a second, not 16,384 opens.
    fn read_exits(&mut self) {
        if self.listed.is_some_and(|t| t.elapsed() < self.poller.poll) {
            return;
        }
        self.listed = Some(Instant::now());
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name();
            let Some(rank) = name
                .to_str()
                .and_then(|n| n.strip_prefix("rank-")?.strip_suffix(".exit"))
                .and_then(|r| r.parse::<usize>().ok())
            else {
                continue;
            };
            if rank >= self.exits.len() || self.exits[rank].is_some() {
                continue;
            }
            let rc = std::fs::read_to_string(e.path())
                .ok()
                .and_then(|t| t.trim().parse::<i32>().ok());
            self.exits[rank] = rc.map(|rc| {
                if rc > 128 && rc != STOPPED {
                    Exit::Signal(rc - 128)
                } else {
                    Exit::Code(rc)
                }
            });
        }
    }

    /// Rank `rank`'s exit as the coordinator should see it: a rank that
    /// stopped on a SIGTERM strata did not send was stopped by Slurm, and
    /// the allocation's end says why; its exit is held until then.
    fn released(&mut self, rank: usize) -> Option<Exit> {
        let exit = self.exits[rank].clone();
        if exit == Some(Exit::Code(STOPPED)) && !self.terminated {
            let ended = self.state().is_some_and(|s| s.is_final());
            let since = *self.held_since.get_or_insert_with(Instant::now);
            if !ended && since.elapsed() < HOLD {
                return None;
            }
        }
        exit
    }

    /// Why the allocation ended, as the attempt's cause.
    fn cause(&self, s: &AllocState) -> Lost {
        let job = format!("Slurm job {} ({})", self.id, self.name);
        let reason = if s.reason.is_empty() || s.reason == "None" {
            String::new()
        } else {
            format!(": {}", s.reason)
        };
        let near_limit = s
            .limit_s
            .is_some_and(|l| s.elapsed_s + self.grace_s + 60 >= l);
        let interruption = matches!(s.state.as_str(), "TIMEOUT" | "PREEMPTED")
            || (near_limit && !matches!(s.state.as_str(), "CANCELLED" | "NODE_FAIL" | "GONE"));
        let cause = match s.state.as_str() {
            "CANCELLED" => {
                format!("{job} was cancelled outside strata (scancel or an operator){reason}")
            }
            "TIMEOUT" => format!("{job} reached its time limit{reason}"),
            "NODE_FAIL" => format!("{job} lost a node (NODE_FAIL){reason}"),
            "PREEMPTED" => format!("{job} was preempted{reason}"),
            "BOOT_FAIL" => format!("{job}: a node failed to boot (BOOT_FAIL){reason}"),
            "DEADLINE" => format!("{job} reached its deadline{reason}"),
            "OUT_OF_MEMORY" => format!("{job} ran out of memory{reason}"),
            "GONE" => format!("{job} is no longer known to the Slurm controller"),
            st if near_limit => format!(
                "{job} neared its time limit of {} s: Slurm sent the SIGTERM asked for {} s ahead, and the job ended ({st})",
                s.limit_s.unwrap_or(0),
                self.grace_s
            ),
            st => format!("{job} ended ({st}){reason} before its ranks finished"),
        };
        Lost {
            cause,
            interruption,
            nodes: Vec::new(),
        }
    }
}

use crate::STOPPED_STATUS as STOPPED;

impl Ranks for SlurmRanks {
    fn len(&self) -> usize {
        self.exits.len()
    }

    fn exit(&mut self, rank: usize) -> Result<Option<Exit>, LaunchError> {
        self.read_exits();
        Ok(self.released(rank))
    }

    fn poll_exits(&mut self) -> Result<Vec<(usize, Exit)>, LaunchError> {
        self.read_exits();
        let known: Vec<usize> = (0..self.exits.len())
            .filter(|&r| self.exits[r].is_some())
            .collect();
        Ok(known
            .into_iter()
            .filter_map(|r| self.released(r).map(|e| (r, e)))
            .collect())
    }

    fn lost(&mut self) -> Option<Lost> {
        let s = self.state()?;
        if self.cancelled {
            return None;
        }
        if s.waiting() && self.ran {
            // Requeued by an operator (`scontrol requeue`): its ranks are
            // gone, and the attempt with them.
            return Some(Lost {
                cause: format!(
                    "Slurm job {} ({}) was requeued ({})",
                    self.id, self.name, s.reason
                ),
                interruption: false,
                nodes: Vec::new(),
            });
        }
        self.ran |= !s.waiting();
        s.is_final().then(|| self.cause(&s))
    }

    fn waiting(&mut self) -> Option<String> {
        let s = self.state()?;
        (s.waiting() && !self.ran).then(|| {
            format!(
                "Slurm job {} is {}{}",
                self.id,
                s.state,
                if s.reason.is_empty() || s.reason == "None" {
                    String::new()
                } else {
                    format!(" ({})", s.reason)
                }
            )
        })
    }

    fn terminate(&mut self) {
        self.terminated = true;
        // A queued allocation has nothing to stop: cancel it.
        let pending = self.state().is_none_or(|s| s.waiting());
        let args = if pending {
            self.cancelled = true;
            vec![self.id.clone()]
        } else {
            vec!["--signal=TERM".into(), self.id.clone()]
        };
        if let Err(e) = slurm("scancel", &args, self.timeout) {
            tracing::warn!(slurm_job = %self.id, error = %e, "cannot signal the allocation");
        }
    }

    fn kill(&mut self) {
        self.terminated = true;
        self.cancelled = true;
        if let Err(e) = slurm("scancel", std::slice::from_ref(&self.id), self.timeout) {
            tracing::warn!(slurm_job = %self.id, error = %e, "cannot cancel the allocation");
        }
    }

    fn all_ended(&mut self) -> bool {
        if self.state().is_some_and(|s| s.is_final()) {
            return true;
        }
        self.read_exits();
        self.exits.iter().all(Option::is_some)
    }

    fn log_tail(&self, rank: usize, n: usize) -> Vec<String> {
        crate::local::tail(&self.dir.join(format!("rank-{rank}.log")), n)
    }
}

impl Drop for SlurmRanks {
    /// Leaves no allocation behind. One strata did not cancel is given a
    /// few seconds to end by itself: its ranks report done before their
    /// processes exit, and once they have, the batch script returns and
    /// the allocation keeps its own end state (COMPLETED) and every rank's
    /// exit file. One still there after that, or one strata cancelled, is
    /// cancelled now. Off the caller's thread: it may hold the
    /// coordinator's lock.
    fn drop(&mut self) {
        let settling = !self.cancelled;
        let (id, watch, poller, timeout) = (
            self.id.clone(),
            self.watch.clone(),
            self.poller.clone(),
            self.timeout,
        );
        let cancel = move || {
            let deadline = Instant::now() + Duration::from_secs(if settling { 10 } else { 0 });
            let ended = || {
                watch
                    .state
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .as_ref()
                    .is_some_and(|s| s.is_final())
            };
            while !ended() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(250));
            }
            if !ended()
                && let Err(e) = slurm("scancel", std::slice::from_ref(&id), timeout)
            {
                tracing::error!(slurm_job = %id, error = %e, "cannot cancel the allocation; cancel it by hand");
            }
            poller.forget(&id);
        };
        if std::thread::Builder::new()
            .name(format!("slurm-end-{}", self.id))
            .spawn(cancel.clone())
            .is_err()
        {
            cancel();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gres_counts_gpus_of_any_type() {
        assert_eq!(parse_gres_gpus("(null)"), 0);
        assert_eq!(parse_gres_gpus("gpu:4"), 4);
        assert_eq!(parse_gres_gpus("gpu:a100:2(S:0-1)"), 2);
        assert_eq!(parse_gres_gpus("gpu:h100:4(S:0),gpu:a10:2,shard:8"), 6);
    }

    #[test]
    fn sinfo_lists_the_partitions_usable_nodes_with_their_slots() {
        let text = "n1|4|(null)|idle|debug*\n\
                    n2|4|(null)|drained|debug*\n\
                    n3|8|(null)|mixed|debug*\n\
                    n3|8|(null)|mixed|long\n\
                    g1|64|gpu:h100:8(S:0-1)|allocated|gpu\n\
                    n4|4|(null)|idle*|debug*\n";
        let nodes = parse_sinfo(text, None, None, 2);
        let got: Vec<(&str, u32, u32)> = nodes
            .iter()
            .map(|n| (n.name.as_str(), n.cpus, n.slots))
            .collect();
        assert_eq!(
            got,
            vec![("n1", 4, 2), ("n2", 4, 0), ("n3", 8, 4), ("n4", 4, 0)]
        );
        let gpu = parse_sinfo(text, Some("gpu"), None, 4);
        assert_eq!(gpu.len(), 1);
        assert_eq!((gpu[0].gpus, gpu[0].slots), (8, 8));
        // An explicit count wins over Gres.
        let forced = parse_sinfo(text, Some("long"), Some(2), 1);
        assert_eq!((forced[0].gpus, forced[0].slots), (2, 2));
    }

    #[test]
    fn slurm_durations_parse_in_every_format() {
        assert_eq!(parse_slurm_time("5"), Some(300));
        assert_eq!(parse_slurm_time("5:30"), Some(330));
        assert_eq!(parse_slurm_time("1:00:01"), Some(3601));
        assert_eq!(parse_slurm_time("2-3"), Some(2 * 86400 + 3 * 3600));
        assert_eq!(parse_slurm_time("1-00:10"), Some(86400 + 600));
        assert_eq!(parse_slurm_time("1-00:00:05"), Some(86405));
        assert_eq!(parse_slurm_time("UNLIMITED"), None);
        assert_eq!(parse_slurm_time("1:2:3:4"), None);
    }

    #[test]
    fn squeue_lines_parse() {
        let (id, s) = parse_squeue_line("17|CANCELLED|None|0:42|10:00").unwrap();
        assert_eq!(id, "17");
        assert!(s.is_final() && !s.waiting());
        assert_eq!((s.elapsed_s, s.limit_s), (42, Some(600)));
        let (_, p) = parse_squeue_line("18|PENDING|Resources|0:00|UNLIMITED").unwrap();
        assert!(p.waiting() && !p.is_final());
        assert_eq!(p.limit_s, None);
    }

    #[test]
    fn sacct_lines_parse() {
        let text = "41|CANCELLED by 0|None|00:01:05|01:00:00\n";
        let s = parse_sacct(text, "41").unwrap();
        assert_eq!(s.state, "CANCELLED");
        assert_eq!((s.elapsed_s, s.limit_s), (65, Some(3600)));
        assert!(s.is_final());
        assert_eq!(parse_sacct(text, "42"), None);
    }

    #[test]
    fn quoting_survives_the_shell() {
        let v = "it's a $HOME `x` \"y\"";
        let out = Command::new("/bin/sh")
            .args(["-c", &format!("printf %s {}", shell_quote(v))])
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), v);
    }
}
