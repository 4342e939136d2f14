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
//!
//! Interleaved 1F1B (Narayanan et al. 2021, §2.2; Megatron-LM's schedule)
//! gives each stage `v` model chunks: chunk `c` of stage `s` is virtual
//! stage `c·p + s`, so a microbatch goes round the stages `v` times. The
//! k-th forward of every stage is on chunk `(k mod p·v) / p` and
//! microbatch `(k / p·v)·p + k mod p` (microbatches in groups of `p`, so
//! `m` must be a multiple of `p`); backwards go through the chunks in
//! reverse. Stage `s` warms up with `2·(p − s − 1) + (v − 1)·p` forwards
//! (at most `m·v`). The bubble shrinks to `(p − 1)/(m·v + p − 1)` of the
//! step (`Layout::bubble_fraction`), for `v` times the point-to-point
//! traffic.

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

/// One operation of a stage's schedule on one of its model chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ChunkOp {
    pub op: PipeOp,
    pub chunk: u32,
}

/// The operations of stage `stage` of `stages`, over `microbatches` and
/// `chunks` model chunks per stage: 1F1B for one chunk, interleaved 1F1B
/// for more (`microbatches` must then be a multiple of `stages`).
///
/// # Panics
/// If `stage >= stages`, or interleaving with `microbatches` not a
/// multiple of `stages` (the recipe's validation refuses both).
pub fn schedule(stages: u32, stage: u32, microbatches: u32, chunks: u32) -> Vec<ChunkOp> {
    if chunks <= 1 {
        return one_f_one_b(stages, stage, microbatches)
            .into_iter()
            .map(|op| ChunkOp { op, chunk: 0 })
            .collect();
    }
    assert!(stage < stages, "stage {stage} of a {stages}-stage pipeline");
    assert!(
        microbatches.is_multiple_of(stages),
        "interleaving {microbatches} microbatches over {stages} stages"
    );
    let (p, v, m) = (stages, chunks, microbatches);
    let total = m * v;
    let warmup = (2 * (p - stage - 1) + (v - 1) * p).min(total);
    let at = |k: u32, forward: bool| {
        let group = k % (p * v) / p;
        let chunk = if forward { group } else { v - 1 - group };
        let mb = k / (p * v) * p + k % p;
        (chunk, mb)
    };
    let fwd = |k| {
        let (chunk, mb) = at(k, true);
        ChunkOp {
            op: PipeOp::Forward(mb),
            chunk,
        }
    };
    let bwd = |k| {
        let (chunk, mb) = at(k, false);
        ChunkOp {
            op: PipeOp::Backward(mb),
            chunk,
        }
    };
    let mut ops = Vec::with_capacity(2 * total as usize);
    ops.extend((0..warmup).map(fwd));
    for k in 0..total - warmup {
        ops.push(fwd(warmup + k));
        ops.push(bwd(k));
    }
    ops.extend((total - warmup..total).map(bwd));
    ops
}

#[cfg(test)]
mod tests {
    use super::PipeOp::{Backward as B, Forward as F};
    use super::*;

    /// The memory plan's count of microbatches in flight (a closed form)
    /// is the schedule's own peak, for every stage of plain and
    /// interleaved pipelines.
    #[test]
    fn the_memory_plan_counts_the_schedules_peak_in_flight() {
        use strata_dataplane::memory::{MemoryInputs, MemoryPlan};
        use strata_recipe::{DeviceKind, Layout, ModelConfig, Precision};
        for (pp, v, m) in [
            (1, 1, 3),
            (2, 1, 1),
            (3, 1, 5),
            (4, 1, 8),
            (4, 1, 2),
            (2, 2, 4),
            (4, 2, 8),
            (3, 3, 6),
            (2, 3, 2),
        ] {
            let inp = MemoryInputs {
                model: ModelConfig {
                    n_layers: 12,
                    d_model: 8,
                    n_heads: 2,
                    n_kv_heads: 1,
                    d_ffn: 16,
                    vocab_size: 32,
                    padded_vocab_size: 32,
                    max_seq_len: 8,
                    rope_theta: 10000.0,
                    tie_embeddings: true,
                },
                layout: Layout::new(1, pp, 1),
                microbatches: m,
                virtual_stages: v,
                tokens_per_microbatch: 8,
                device: DeviceKind::Cpu,
                precision: Precision::F32,
                shard_optimizer: false,
                recompute: strata_recipe::Recompute::None,
                checkpoints: false,
                device_bytes: None,
                device_from: "device.memory_gib".into(),
                attention_kernel: true,
            };
            let plan = MemoryPlan::new(&inp);
            for stage in 0..pp {
                let (mut live, mut peak) = (0i32, 0i32);
                for op in schedule(pp, stage, m, v) {
                    live += if matches!(op.op, PipeOp::Forward(_)) {
                        1
                    } else {
                        -1
                    };
                    peak = peak.max(live);
                }
                assert_eq!(
                    plan.ranks[stage as usize].in_flight as i32, peak,
                    "pp {pp} v {v} m {m} stage {stage}"
                );
            }
        }
    }

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

    fn ops(s: &[ChunkOp]) -> Vec<String> {
        s.iter()
            .map(|o| match o.op {
                F(i) => format!("F{i}.{}", o.chunk),
                B(i) => format!("B{i}.{}", o.chunk),
            })
            .collect()
    }

    #[test]
    fn interleaved_two_stages_two_chunks_four_microbatches() {
        // Stage 1 warms up with (v − 1)·p = 2 forwards, stage 0 with 4.
        assert_eq!(
            ops(&schedule(2, 0, 4, 2)),
            [
                "F0.0", "F1.0", "F0.1", "F1.1", "F2.0", "B0.1", "F3.0", "B1.1", "F2.1", "B0.0",
                "F3.1", "B1.0", "B2.1", "B3.1", "B2.0", "B3.0"
            ]
        );
        assert_eq!(
            ops(&schedule(2, 1, 4, 2)),
            [
                "F0.0", "F1.0", "F0.1", "B0.1", "F1.1", "B1.1", "F2.0", "B0.0", "F3.0", "B1.0",
                "F2.1", "B2.1", "F3.1", "B3.1", "B2.0", "B3.0"
            ]
        );
        // One chunk is plain 1F1B.
        assert_eq!(
            schedule(3, 1, 5, 1),
            one_f_one_b(3, 1, 5)
                .into_iter()
                .map(|op| ChunkOp { op, chunk: 0 })
                .collect::<Vec<_>>()
        );
    }

    /// Every stage runs its interleaved schedule with blocking receives in
    /// program order and queued sends, over first-in-first-out links: the
    /// pipeline links (stage s to s + 1: activations; back: gradients) and
    /// the wrap-around links (last stage to first: activations of the next
    /// chunk; back: gradients). Each receive must find its message at the
    /// head of its link, and every stage must finish.
    #[test]
    fn interleaved_schedules_never_deadlock_and_keep_link_order() {
        use std::collections::VecDeque;
        for p in 2..=4u32 {
            for v in 2..=3u32 {
                for m in (1..=4).map(|g| g * p) {
                    let pv = (p * v) as usize;
                    let scheds: Vec<Vec<ChunkOp>> = (0..p).map(|s| schedule(p, s, m, v)).collect();
                    // links[(from, to, kind)]: messages (virtual stage, mb).
                    let mut links: std::collections::HashMap<
                        (u32, u32, u8),
                        VecDeque<(usize, u32)>,
                    > = Default::default();
                    let mut pc = vec![0usize; p as usize];
                    loop {
                        let mut progressed = false;
                        for s in 0..p {
                            while let Some(&o) = scheds[s as usize].get(pc[s as usize]) {
                                let vs = (o.chunk * p + s) as usize;
                                let (need, send) = match o.op {
                                    F(i) => (
                                        (vs > 0).then(|| ((s + p - 1) % p, s, 0u8, (vs, i))),
                                        (vs + 1 < pv).then(|| (s, (s + 1) % p, 0u8, (vs + 1, i))),
                                    ),
                                    B(i) => (
                                        (vs + 1 < pv).then(|| ((s + 1) % p, s, 1u8, (vs, i))),
                                        (vs > 0).then(|| (s, (s + p - 1) % p, 1u8, (vs - 1, i))),
                                    ),
                                };
                                if let Some((from, to, kind, msg)) = need {
                                    let q = links.entry((from, to, kind)).or_default();
                                    match q.front() {
                                        None => break,
                                        Some(head) => {
                                            assert_eq!(
                                                *head, msg,
                                                "p {p} v {v} m {m}: link {from}->{to} out of order"
                                            );
                                            q.pop_front();
                                        }
                                    }
                                }
                                if let Some((from, to, kind, msg)) = send {
                                    links.entry((from, to, kind)).or_default().push_back(msg);
                                }
                                pc[s as usize] += 1;
                                progressed = true;
                            }
                        }
                        if pc.iter().all(|&c| c == 2 * (m * v) as usize) {
                            break;
                        }
                        assert!(progressed, "p {p} v {v} m {m}: deadlock at {pc:?}");
                    }
                    assert!(links.values().all(VecDeque::is_empty));
                }
            }
        }
    }
}
