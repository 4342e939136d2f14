//! Process limits. A coordinator holds one connection per worker, and a
//! worker one per collective peer: the open-files soft limit (often 1024)
//! is raised to the hard limit at start.

/// Raises `RLIMIT_NOFILE`'s soft limit to its hard limit; the limit now
/// (soft, hard), or `None` where it cannot be read.
#[allow(unsafe_code)]
pub fn raise_open_files_limit() -> Option<(u64, u64)> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return None;
    }
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: setrlimit reads one rlimit struct we own.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            lim = raised;
        }
    }
    #[allow(clippy::unnecessary_cast)] // rlim_t is not u64 everywhere
    Some((lim.rlim_cur as u64, lim.rlim_max as u64))
}

/// Raises the open-files limit and says in the log what it is; warns
/// when it is below `needed` (a coordinator's ranks, a worker's peers).
pub fn ensure_open_files(needed: u64, what: &str) {
    match raise_open_files_limit() {
        Some((soft, hard)) if soft < needed => tracing::warn!(
            soft,
            hard,
            needed,
            "the open-files limit is below what {what} need; raise the hard limit (ulimit -Hn, or LimitNOFILE in a unit file)"
        ),
        Some((soft, hard)) => tracing::info!(soft, hard, "open-files limit"),
        None => tracing::warn!("cannot read the open-files limit"),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_soft_limit_reaches_the_hard_one() {
        let (soft, hard) = super::raise_open_files_limit().unwrap();
        assert_eq!(soft, hard);
    }
}
