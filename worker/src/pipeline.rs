//! The 1F1B pipeline schedule (Narayanan et al. 2021, PipeDream-Flush).
//!
//! Stage `s` of `p` with `m` microbatches runs `w = min(p − s − 1, m)`
//! warmup forwards, then `m − w` rounds of one forward and one backward,
//! then `w` cooldown backwards. The last stage has no warmup: it runs each
//! microbatch's backward right after its forward. At most `p − s`
//! microbatches' activations are alive on stage `s` at once (GPipe keeps
//! all `m`). Forwards receive from stage `s − 1` and send to `s + 1`;
//! backwards receive from `s + 1` and send to `s − 1`. Sends never wait
//! (collective backends queue them), so with blocking receives the
//! schedule cannot deadlock for any `p` and `m`, `m < p` included: this is
//! what `schedules_never_deadlock` checks by simulation.

/// One operation of a stage's schedule, on microbatch `.0`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PipeOp {
    Forward(u32),
    Backward(u32),
}

/// The 1F1B operations of stage `stage` of `stages`, over `microbatches`.
///
/// # Panics
/// If `stage >= stages`.
pub fn one_f_one_b(stages: u32, stage: u32, microbatches: u32) -> Vec<PipeOp> {
    assert!(stage < stages, "stage {stage} of a {stages}-stage pipeline");
    let m = microbatches;
    let warmup = (stages - stage - 1).min(m);
    let mut ops = Vec::with_capacity(2 * m as usize);
    ops.extend((0..warmup).map(PipeOp::Forward));
    for i in 0..m - warmup {
        ops.push(PipeOp::Forward(warmup + i));
        ops.push(PipeOp::Backward(i));
    }
    ops.extend((m - warmup..m).map(PipeOp::Backward));
    ops
}

/// The idle fraction of each stage's pipeline time with microbatches of
/// equal cost: `(p − 1) / (m + p − 1)`.
pub fn bubble_theory(stages: u32, microbatches: u32) -> f64 {
    let (p, m) = (f64::from(stages), f64::from(microbatches.max(1)));
    (p - 1.0) / (m + p - 1.0)
}

#[cfg(test)]
mod tests {
    use super::PipeOp::{Backward as B, Forward as F};
    use super::*;

    #[test]
    fn four_stages_eight_microbatches() {
        let s = |stage| one_f_one_b(4, stage, 8);
        assert_eq!(
            s(0),
            [
                F(0),
                F(1),
                F(2),
                F(3),
                B(0),
                F(4),
                B(1),
                F(5),
                B(2),
                F(6),
                B(3),
                F(7),
                B(4),
                B(5),
                B(6),
                B(7)
            ]
        );
        assert_eq!(
            s(2),
            [
                F(0),
                F(1),
                B(0),
                F(2),
                B(1),
                F(3),
                B(2),
                F(4),
                B(3),
                F(5),
                B(4),
                F(6),
                B(5),
                F(7),
                B(6),
                B(7)
            ]
        );
        assert_eq!(
            s(3),
            [
                F(0),
                B(0),
                F(1),
                B(1),
                F(2),
                B(2),
                F(3),
                B(3),
                F(4),
                B(4),
                F(5),
                B(5),
                F(6),
                B(6),
                F(7),
                B(7)
            ]
        );
    }

    #[test]
    fn fewer_microbatches_than_stages() {
        // m = 2 < p = 4: stages 0 and 1 only warm up and cool down.
        assert_eq!(one_f_one_b(4, 0, 2), [F(0), F(1), B(0), B(1)]);
        assert_eq!(one_f_one_b(4, 1, 2), [F(0), F(1), B(0), B(1)]);
        assert_eq!(one_f_one_b(4, 2, 2), [F(0), F(1), B(0), B(1)]);
        assert_eq!(one_f_one_b(4, 3, 2), [F(0), B(0), F(1), B(1)]);
        assert_eq!(one_f_one_b(3, 0, 1), [F(0), B(0)]);
    }

    #[test]
    fn microbatches_not_a_multiple_of_stages() {
        assert_eq!(
            one_f_one_b(3, 0, 5),
            [F(0), F(1), F(2), B(0), F(3), B(1), F(4), B(2), B(3), B(4)]
        );
        assert_eq!(
            one_f_one_b(3, 1, 5),
            [F(0), F(1), B(0), F(2), B(1), F(3), B(2), F(4), B(3), B(4)]
        );
        assert_eq!(one_f_one_b(1, 0, 3), [F(0), B(0), F(1), B(1), F(2), B(2)]);
    }

    /// Every stage runs its schedule with blocking receives and queued
    /// sends; all of them must finish, each microbatch's forward before its
    /// backward, with at most `p − s` microbatches in flight on stage s.
    #[test]
    fn schedules_never_deadlock() {
        for p in 1..=6u32 {
            for m in 1..=13u32 {
                let scheds: Vec<Vec<PipeOp>> = (0..p).map(|s| one_f_one_b(p, s, m)).collect();
                for (s, ops) in scheds.iter().enumerate() {
                    let mut seen_f = vec![false; m as usize];
                    let mut in_flight = 0usize;
                    let mut peak = 0;
                    for op in ops {
                        match *op {
                            F(i) => {
                                assert!(!seen_f[i as usize]);
                                seen_f[i as usize] = true;
                                in_flight += 1;
                                peak = peak.max(in_flight);
                            }
                            B(i) => {
                                assert!(
                                    seen_f[i as usize],
                                    "p {p} m {m} stage {s}: B{i} before F{i}"
                                );
                                in_flight -= 1;
                            }
                        }
                    }
                    assert_eq!(ops.len(), 2 * m as usize);
                    assert!(
                        peak <= (p as usize - s).min(m as usize),
                        "p {p} m {m} stage {s}: {peak} in flight"
                    );
                }
                // Messages: activations (s → s+1) and gradients (s+1 → s)
                // in flight, as counts per link and microbatch.
                let mut act = vec![vec![false; m as usize]; p as usize];
                let mut grad = vec![vec![false; m as usize]; p as usize];
                let mut pc = vec![0usize; p as usize];
                loop {
                    let mut progressed = false;
                    for s in 0..p as usize {
                        while let Some(&op) = scheds[s].get(pc[s]) {
                            let ready = match op {
                                F(i) => s == 0 || act[s][i as usize],
                                B(i) => s + 1 == p as usize || grad[s][i as usize],
                            };
                            if !ready {
                                break;
                            }
                            match op {
                                F(i) if s + 1 < p as usize => act[s + 1][i as usize] = true,
                                B(i) if s > 0 => grad[s - 1][i as usize] = true,
                                _ => {}
                            }
                            pc[s] += 1;
                            progressed = true;
                        }
                    }
                    if pc.iter().all(|&c| c == 2 * m as usize) {
                        break;
                    }
                    assert!(progressed, "p {p} m {m}: deadlock at {pc:?}");
                }
            }
        }
    }

    #[test]
    fn bubble_theory_is_narayanans() {
        assert_eq!(bubble_theory(2, 4), 0.2);
        assert_eq!(bubble_theory(4, 8), 3.0 / 11.0);
        assert_eq!(bubble_theory(1, 5), 0.0);
    }
}
