//! How the TCP backend scales with the group: the time for a group to
//! form and agree once, the links each member ends up holding, and the
//! latency of a scalar all-reduce by the log-round algorithm and by the
//! ring, behind `strata bench collective`.
//!
//! Every member is a thread with an endpoint of its own on loopback, as
//! separate worker processes would have (each endpoint has its listener,
//! accept thread and I/O thread), so a group of 512 is 1,536 threads on
//! this machine's cores: the figures include the scheduler's share, which
//! a cluster of separate machines would not pay.

use std::time::Instant;

use serde::Serialize;

use super::tcp::{TcpCollective, TcpOptions, loopback_group_with};
use super::{Collective, Result, ring_all_reduce_sum};

/// One group size's figures.
#[derive(Debug, Clone, Serialize)]
pub struct ScaleRow {
    pub members: usize,
    /// From binding every endpoint to the end of the group's first
    /// agreement (a barrier): the links it needs are made on the way.
    pub form_s: f64,
    /// A scalar (two f32s: an f64's halves) all-reduced, median over
    /// `reps`, by the log-round algorithm every backend now uses for small
    /// buffers.
    pub scalar_us: f64,
    /// The same by the ring (2·(n − 1) exchanges), as every scalar went
    /// before.
    pub ring_scalar_us: f64,
    /// Links member 0 holds after both (sending, receiving): one descriptor
    /// each.
    pub links_out: usize,
    pub links_in: usize,
    /// Connecting every pair, as joins used to (each member linked to
    /// every other), when measured: the group's time, or none above
    /// `mesh_max` members (n·(n−1) links would exceed the descriptors one
    /// process may hold here).
    pub full_mesh_s: Option<f64>,
}

/// Runs every member of `group` on its own thread; returns member 0's
/// result.
fn on_members<R: Send>(
    group: &mut [TcpCollective],
    f: impl Fn(&mut TcpCollective) -> Result<R> + Sync,
) -> Result<R> {
    std::thread::scope(|s| {
        let f = &f;
        let handles: Vec<_> = group.iter_mut().map(|m| s.spawn(move || f(m))).collect();
        let mut results: Vec<Result<R>> = handles
            .into_iter()
            .map(|h| h.join().expect("a member thread panicked"))
            .collect();
        if let Some(i) = results.iter().position(|r| r.is_err()) {
            return results.swap_remove(i);
        }
        results.swap_remove(0)
    })
}

/// Median of a member's per-call times.
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Measures groups of each size in `sizes`, `reps` scalar reductions each.
pub fn measure(sizes: &[usize], reps: usize, mesh_max: usize) -> std::io::Result<Vec<ScaleRow>> {
    let failed = std::io::Error::other;
    raise_descriptor_limit();
    let reps = reps.max(1);
    let mut rows = Vec::new();
    for &n in sizes {
        let opts = TcpOptions::default();
        let start = Instant::now();
        let mut group = loopback_group_with(&format!("scale-{n}"), n, &opts)?;
        on_members(&mut group, |c| c.barrier()).map_err(failed)?;
        let form_s = start.elapsed().as_secs_f64();
        let timed = |group: &mut [TcpCollective], ring: bool| -> Result<f64> {
            let times = on_members(group, |c| {
                let mut times = Vec::with_capacity(reps);
                for i in 0..reps + 3 {
                    let mut x = [c.rank() as f32, i as f32];
                    let t = Instant::now();
                    if ring {
                        ring_all_reduce_sum(c, &mut x)?;
                    } else {
                        c.all_reduce_sum(&mut x)?;
                    }
                    if i >= 3 {
                        times.push(t.elapsed().as_secs_f64());
                    }
                }
                Ok(times)
            })?;
            Ok(median(times) * 1e6)
        };
        let scalar_us = timed(&mut group, false).map_err(failed)?;
        let ring_scalar_us = timed(&mut group, true).map_err(failed)?;
        let (links_out, links_in) = group[0].links();
        drop(group);
        let full_mesh_s = if n <= mesh_max {
            let start = Instant::now();
            let mut group = loopback_group_with(&format!("mesh-{n}"), n, &opts)?;
            on_members(&mut group, |c| {
                let (me, n) = (c.rank(), c.size());
                for p in (0..n).filter(|&p| p != me) {
                    c.send(p, &[])?;
                }
                for p in (0..n).filter(|&p| p != me) {
                    c.recv(p, &mut [])?;
                }
                Ok(())
            })
            .map_err(failed)?;
            Some(start.elapsed().as_secs_f64())
        } else {
            None
        };
        tracing::info!(members = n, form_s, scalar_us, ring_scalar_us, "measured");
        rows.push(ScaleRow {
            members: n,
            form_s,
            scalar_us,
            ring_scalar_us,
            links_out,
            links_in,
            full_mesh_s,
        });
    }
    Ok(rows)
}

/// Lifts this process's open-descriptor limit to its hard limit: a group
/// of 512 on loopback holds about 12,000.
fn raise_descriptor_limit() {
    // SAFETY: getrlimit and setrlimit only read and write the struct
    // passed.
    #[allow(unsafe_code)] // std has no rlimit interface
    unsafe {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}
