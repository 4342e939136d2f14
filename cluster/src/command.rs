//! External commands with a deadline: a hung `slurmctld` makes `sbatch`
//! or `squeue` hang, and nothing strata waits for may hang with it.

use std::io::Read;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Runs `cmd` to its end and returns its output, or an error of kind
/// `TimedOut` once `timeout` has passed (the command is killed then).
pub fn run_with_timeout(cmd: &mut Command, timeout: Duration) -> std::io::Result<Output> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    // The pipes are drained while the command runs, so that a chatty one
    // cannot fill them and block.
    let out = child.stdout.take().expect("piped");
    let err = child.stderr.take().expect("piped");
    let reader = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = pipe.read_to_end(&mut buf);
            buf
        })
    };
    let (out_t, err_t) = (reader(Box::new(out)), reader(Box::new(err)));
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(1);
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            // The readers end with the pipes (a grandchild holding them
            // open is left to them: they are detached threads).
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("did not finish within {} s", timeout.as_secs_f64()),
            ));
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(50));
    };
    Ok(Output {
        status,
        stdout: out_t.join().unwrap_or_default(),
        stderr: err_t.join().unwrap_or_default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_command_gives_its_output_or_is_stopped_at_its_deadline() {
        let out = run_with_timeout(
            Command::new("/bin/sh").args(["-c", "echo hi; echo oops >&2; exit 3"]),
            Duration::from_secs(10),
        )
        .unwrap();
        assert_eq!(out.stdout, b"hi\n");
        assert_eq!(out.stderr, b"oops\n");
        assert_eq!(out.status.code(), Some(3));
        let start = Instant::now();
        let e = run_with_timeout(
            Command::new("/bin/sh").args(["-c", "exec sleep 30"]),
            Duration::from_millis(300),
        )
        .unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
        assert!(start.elapsed() < Duration::from_secs(5));
    }
}
