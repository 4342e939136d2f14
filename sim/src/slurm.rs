//! Slurm stand-ins: `sbatch`, `squeue`, `scancel`, `sinfo` and `sacct`
//! that answer as Slurm does for what strata's Slurm launcher asks, with
//! the rank simulator as the cluster. The real launcher writes its real
//! files (the batch script, the host file, the workers' environment file,
//! the rank wrapper); `sbatch` reads them and starts the allocation's
//! ranks in the simulator, which writes each rank's `rank-R.exit` where
//! the wrapper would. So the Slurm path — one `squeue` for every
//! allocation, exits read from one directory listing — is measured at
//! scale too.
//!
//! [`write_standins`] puts the five commands in a folder (each a script
//! that runs `strata sim slurm COMMAND`); put it first on the
//! coordinator's `PATH`, with `STRATA_SIM` set to the simulator's address.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use strata_cluster::sim::{AllocView, SimRank, SimRequest, SimResponse, SimStart, call};

/// The variable the stand-ins read the simulator's address from.
pub const SIM_ADDR_VAR: &str = "STRATA_SIM";

const TIMEOUT: Duration = Duration::from_secs(120);

/// What a stand-in prints and returns.
#[derive(Debug, Default)]
pub struct Outcome {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

fn fail(message: impl Into<String>) -> Outcome {
    Outcome {
        code: 1,
        stdout: String::new(),
        stderr: message.into(),
    }
}

fn ok(stdout: String) -> Outcome {
    Outcome {
        code: 0,
        stdout,
        stderr: String::new(),
    }
}

/// Writes the five stand-ins into `dir`, each running `strata` (the
/// binary at `strata`) as `strata sim slurm COMMAND ARGS…`.
pub fn write_standins(dir: &Path, strata: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir)?;
    for cmd in ["sbatch", "squeue", "scancel", "sinfo", "sacct"] {
        let path = dir.join(cmd);
        let quoted = format!("'{}'", strata.display().to_string().replace('\'', r"'\''"));
        std::fs::write(
            &path,
            format!(
                "#!/bin/sh\n# A Slurm stand-in: the rank simulator plays the cluster.\nexec {quoted} sim slurm {cmd} \"$@\"\n"
            ),
        )?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
    }
    Ok(())
}

/// The value of `--name=value` among `args`.
fn flag<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    let prefix = format!("--{name}=");
    args.iter().find_map(|a| a.strip_prefix(&prefix))
}

/// The value after `-x` (or `--long`) among `args`.
fn option<'a>(args: &'a [String], names: &[&str]) -> Option<&'a str> {
    args.windows(2)
        .find(|w| names.contains(&w[0].as_str()))
        .map(|w| w[1].as_str())
}

/// The words of a shell line made of single-quoted words (as the Slurm
/// launcher quotes its command).
fn shell_words(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut any = false;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\'' => {
                quoted = !quoted;
                any = true;
            }
            '\\' if !quoted => {
                if let Some(n) = chars.next() {
                    cur.push(n);
                    any = true;
                }
            }
            c if c.is_whitespace() && !quoted => {
                if any {
                    words.push(std::mem::take(&mut cur));
                    any = false;
                }
            }
            c => {
                cur.push(c);
                any = true;
            }
        }
    }
    if any {
        words.push(cur);
    }
    words
}

/// Slurm's `%M`: elapsed time as `M:SS` or `H:MM:SS`.
fn elapsed(s: u64) -> String {
    if s >= 3600 {
        format!("{}:{:02}:{:02}", s / 3600, (s / 60) % 60, s % 60)
    } else {
        format!("{}:{:02}", s / 60, s % 60)
    }
}

/// An allocation as `squeue -o '%i|%T|%r|%M|%l'` prints it.
fn squeue_line(a: &AllocView) -> String {
    format!(
        "{}|{}|{}|{}|UNLIMITED\n",
        a.alloc,
        a.state,
        a.reason,
        elapsed(a.elapsed_s)
    )
}

fn states(addr: SocketAddr, ids: &[String]) -> Result<Vec<AllocView>, String> {
    match call(
        addr,
        &SimRequest::Poll {
            allocs: ids.to_vec(),
        },
        TIMEOUT,
    ) {
        Ok(SimResponse::States { allocs }) => Ok(allocs),
        Ok(other) => Err(format!("unexpected answer {other:?}")),
        Err(e) => Err(e.to_string()),
    }
}

fn sbatch(addr: SocketAddr, args: &[String]) -> Outcome {
    let Some(dir) = flag(args, "chdir").map(PathBuf::from) else {
        return fail("sbatch: the stand-in needs --chdir (the attempt's folder)");
    };
    let read = |name: &str| {
        std::fs::read_to_string(dir.join(name))
            .map_err(|e| format!("sbatch: {}: {e}", dir.join(name).display()))
    };
    let (hosts, env, wrapper) = match (read("hostfile"), read("worker.env"), read("rank.sh")) {
        (Ok(h), Ok(e), Ok(w)) => (h, e, w),
        (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => return fail(e),
    };
    let token = env.lines().find_map(|l| {
        let rest = l.strip_prefix("export STRATA_JOB_TOKEN=")?;
        shell_words(rest).into_iter().next()
    });
    let Some(token) = token else {
        return fail("sbatch: worker.env sets no STRATA_JOB_TOKEN");
    };
    let Some(cmd) = wrapper
        .lines()
        .find(|l| l.trim_end().ends_with(" &") && l.contains("'--coordinator'"))
    else {
        return fail("sbatch: rank.sh starts no worker");
    };
    let words = shell_words(cmd.trim_end().trim_end_matches('&'));
    let after = |f: &str| option(&words, &[f]).map(str::to_string);
    let (Some(coordinator), Some(job), Some(attempt)) =
        (after("--coordinator"), after("--job"), after("--attempt"))
    else {
        return fail("sbatch: the worker's command names no coordinator, job or attempt");
    };
    let Ok(attempt) = attempt.parse::<u32>() else {
        return fail(format!("sbatch: attempt {attempt:?} is not a number"));
    };
    if let Err(e) = call(
        addr,
        &SimRequest::Gate {
            command: "sbatch".into(),
            job: job.clone(),
        },
        TIMEOUT,
    ) {
        return fail(format!("sbatch: {e}"));
    }
    let start = SimStart {
        name: flag(args, "job-name").unwrap_or_default().to_string(),
        comment: flag(args, "comment").unwrap_or_default().to_string(),
        coordinator,
        job,
        attempt,
        token,
        // The stand-ins serve a coordinator on loopback, in plain text.
        ca: None,
        ranks: hosts
            .lines()
            .filter(|l| !l.trim().is_empty())
            .enumerate()
            .map(|(r, node)| SimRank {
                rank: r as u32,
                node: node.trim().to_string(),
            })
            .collect(),
        exit_dir: Some(dir),
    };
    match call(addr, &SimRequest::Start(start), TIMEOUT) {
        Ok(SimResponse::Started { alloc }) => ok(format!("{alloc}\n")),
        Ok(other) => fail(format!("sbatch: unexpected answer {other:?}")),
        Err(e) => fail(format!("sbatch: {e}")),
    }
}

fn squeue(addr: SocketAddr, args: &[String]) -> Outcome {
    let format = option(args, &["-o", "--format"]).unwrap_or("%i|%T|%r|%M|%l");
    if let Some(ids) = option(args, &["-j", "--jobs"]) {
        let ids: Vec<String> = ids.split(',').map(str::to_string).collect();
        let found = match states(addr, &ids) {
            Ok(f) => f,
            Err(e) => return fail(format!("squeue: {e}")),
        };
        if ids.len() == 1 && found.is_empty() {
            return fail("slurm_load_jobs error: Invalid job id specified");
        }
        return ok(found.iter().map(squeue_line).collect());
    }
    // Every allocation (what a restarted coordinator looks for).
    let all = match call(addr, &SimRequest::List, TIMEOUT) {
        Ok(SimResponse::States { allocs }) => allocs,
        Ok(other) => return fail(format!("squeue: unexpected answer {other:?}")),
        Err(e) => return fail(format!("squeue: {e}")),
    };
    let lines: String = all
        .iter()
        .filter(|a| a.state == "RUNNING")
        .map(|a| match format {
            "%i|%j|%k|%T" => format!("{}|{}|{}|{}\n", a.alloc, a.name, a.comment, a.state),
            _ => squeue_line(a),
        })
        .collect();
    ok(lines)
}

fn scancel(addr: SocketAddr, args: &[String]) -> Outcome {
    let term = flag(args, "signal").is_some();
    let Some(id) = args.iter().rfind(|a| !a.starts_with('-')) else {
        return fail("scancel: no job id");
    };
    if let Err(e) = call(
        addr,
        &SimRequest::Gate {
            command: "scancel".into(),
            job: String::new(),
        },
        TIMEOUT,
    ) {
        return fail(format!("scancel: {e}"));
    }
    match call(
        addr,
        &SimRequest::Signal {
            alloc: id.clone(),
            kill: !term,
        },
        TIMEOUT,
    ) {
        Ok(_) => ok(String::new()),
        Err(e) => fail(format!("scancel: {e}")),
    }
}

fn sinfo(addr: SocketAddr) -> Outcome {
    match call(addr, &SimRequest::Nodes, TIMEOUT) {
        Ok(SimResponse::Nodes { nodes }) => ok(nodes
            .iter()
            .map(|n| format!("{}|{}|gpu:{}|idle|sim*\n", n.name, n.cpus, n.gpus))
            .collect()),
        Ok(other) => fail(format!("sinfo: unexpected answer {other:?}")),
        Err(e) => fail(format!("sinfo: {e}")),
    }
}

fn sacct(addr: SocketAddr, args: &[String]) -> Outcome {
    let Some(ids) = option(args, &["-j", "--jobs"]) else {
        return ok(String::new());
    };
    let ids: Vec<String> = ids.split(',').map(str::to_string).collect();
    match states(addr, &ids) {
        Ok(found) => ok(found
            .iter()
            .map(|a| {
                let s = a.elapsed_s;
                format!(
                    "{}|{}|{}|{:02}:{:02}:{:02}|UNLIMITED\n",
                    a.alloc,
                    a.state,
                    a.reason,
                    s / 3600,
                    (s / 60) % 60,
                    s % 60
                )
            })
            .collect()),
        Err(e) => fail(format!("sacct: {e}")),
    }
}

/// Runs stand-in `command` with `args` against the simulator at `addr`.
pub fn standin(command: &str, args: &[String], addr: SocketAddr) -> Outcome {
    match command {
        "sbatch" => sbatch(addr, args),
        "squeue" => squeue(addr, args),
        "scancel" => scancel(addr, args),
        "sinfo" => sinfo(addr),
        "sacct" => sacct(addr, args),
        other => fail(format!("no Slurm stand-in for {other}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_launchers_quoting_reads_back() {
        let w = shell_words(r"'/x/strata' 'worker' '--coordinator' 'http://h:1' 'it'\''s' &");
        assert_eq!(
            w,
            [
                "/x/strata",
                "worker",
                "--coordinator",
                "http://h:1",
                "it's",
                "&"
            ]
        );
        assert_eq!(elapsed(65), "1:05");
        assert_eq!(elapsed(3725), "1:02:05");
    }
}
