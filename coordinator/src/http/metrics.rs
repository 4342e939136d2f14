//! `/metrics`: Prometheus' text format from the engine's state at each
//! scrape (nothing kept twice), encoded by the official client. Per job
//! the series are bounded whatever its world: rank step times as
//! quantiles and the slowest few ranks, not one series per rank.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::engine::Engine;
use crate::engine::views::quantile;
use crate::job::{JobState, now_unix_ms};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct JobLabel {
    job: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RankLabel {
    job: String,
    rank: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QuantileLabel {
    job: String,
    quantile: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabel {
    job: String,
    phase: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceLabel {
    job: String,
    source: String,
}

type F64 = Gauge<f64, std::sync::atomic::AtomicU64>;

/// The slowest ranks each job exports.
pub const SLOWEST_RANKS: usize = 5;

/// A family of float gauges, registered under `name`.
fn family<L>(reg: &mut Registry, name: &str, help: &str) -> Family<L, F64>
where
    L: Clone + std::hash::Hash + Eq + EncodeLabelSet + std::fmt::Debug + Send + Sync + 'static,
{
    let f = Family::<L, F64>::default();
    reg.register(name, help, f.clone());
    f
}

fn gauge(reg: &mut Registry, name: &str, help: &str) -> F64 {
    let g = F64::default();
    reg.register(name, help, g.clone());
    g
}

/// The metrics as Prometheus' text format, from the engine as it is now.
pub fn render(engine: &Engine) -> String {
    let mut reg = Registry::with_prefix("strata");
    let jobs = family::<StateLabel>(&mut reg, "jobs", "Jobs by state");
    let queue = gauge(&mut reg, "queue_length", "Jobs waiting for slots");
    let slots = gauge(&mut reg, "slots", "Worker slots of the inventory");
    let leased = gauge(
        &mut reg,
        "slots_leased",
        "Worker slots held by live attempts",
    );
    let ranks = gauge(
        &mut reg,
        "ranks_running",
        "Ranks of running attempts, all jobs",
    );
    let interval = gauge(
        &mut reg,
        "heartbeat_period_seconds",
        "The heartbeat period the coordinator asks of its ranks now",
    );
    let step = family::<JobLabel>(&mut reg, "job_step", "Last step recorded");
    let steps_total = family::<JobLabel>(&mut reg, "job_steps_total", "Steps of the run");
    let loss = family::<JobLabel>(&mut reg, "job_loss", "Training loss of the last step");
    let eval_loss = family::<JobLabel>(&mut reg, "job_eval_loss", "Last held-out loss");
    let lr = family::<JobLabel>(&mut reg, "job_lr", "Learning rate of the last step");
    let source_loss = family::<SourceLabel>(
        &mut reg,
        "job_source_loss",
        "A mixture's source: its training loss in the last step",
    );
    let source_tokens = family::<SourceLabel>(
        &mut reg,
        "job_source_tokens",
        "A mixture's source: its tokens in the last step",
    );
    let source_eval = family::<SourceLabel>(
        &mut reg,
        "job_source_eval_loss",
        "A mixture's source: its held-out loss when the last step evaluated",
    );
    let weight_std = family::<JobLabel>(
        &mut reg,
        "job_sample_weight_std",
        "Loss-based reweighting: the standard deviation of the last step's per-sequence loss multipliers (each group's mean is 1)",
    );
    let weight_min = family::<JobLabel>(
        &mut reg,
        "job_sample_weight_min",
        "Loss-based reweighting: the last step's smallest per-sequence loss multiplier",
    );
    let weight_max = family::<JobLabel>(
        &mut reg,
        "job_sample_weight_max",
        "Loss-based reweighting: the last step's largest per-sequence loss multiplier",
    );
    let weight_ess = family::<JobLabel>(
        &mut reg,
        "job_sample_weight_effective",
        "Loss-based reweighting: the last step's effective sample size n / sum of squared multipliers, as a fraction of its sequences",
    );
    let tps = family::<JobLabel>(
        &mut reg,
        "job_tokens_per_second",
        "Tokens per second of the last step",
    );
    let flops = family::<JobLabel>(
        &mut reg,
        "job_model_flops_per_second",
        "Model FLOP/s of the last step (the plan's FLOPs per token × tokens/s; divide by the devices' peak for MFU)",
    );
    let mfu = family::<JobLabel>(
        &mut reg,
        "job_mfu",
        "Model FLOP/s over the devices' peak ([device] peak_tflops, or the GPU's bf16 peak); absent when unknown",
    );
    let step_s = family::<JobLabel>(
        &mut reg,
        "job_step_seconds",
        "Wall time of the last step (rank 0's phases summed)",
    );
    let phase_s = family::<PhaseLabel>(
        &mut reg,
        "job_step_phase_seconds",
        "Rank 0's time per phase of the last step",
    );
    let rank_q = family::<QuantileLabel>(
        &mut reg,
        "job_rank_step_seconds",
        "Quantiles over the job's ranks of each rank's last finished step (from its heartbeats): 0.5, 0.9, 0.99 and 1 (the slowest)",
    );
    let slowest = family::<RankLabel>(
        &mut reg,
        "job_slowest_rank_step_seconds",
        "The job's slowest ranks by their last finished step: a straggler stands out",
    );
    let bubble = family::<JobLabel>(
        &mut reg,
        "job_pipeline_bubble",
        "Worst pipeline stage's idle share of the last step",
    );
    let attempts = family::<JobLabel>(&mut reg, "job_attempts", "Attempts so far");
    let blamed = family::<JobLabel>(
        &mut reg,
        "job_blamed_nodes",
        "Nodes kept out of the job's placements after failed attempts",
    );
    let ck_stall = family::<JobLabel>(
        &mut reg,
        "job_checkpoint_stall_seconds",
        "Step stall of the latest checkpoint",
    );
    let ck_age = family::<JobLabel>(
        &mut reg,
        "job_checkpoint_age_seconds",
        "Seconds since the latest checkpoint was committed",
    );
    reg.register(
        "heartbeat_interval_seconds",
        "Seconds between a rank's heartbeats",
        engine.metrics.heartbeat_gaps.clone(),
    );
    reg.register(
        "engine_lock_hold_seconds",
        "How long each hold of the coordinator's engine lock lasted",
        engine.metrics.lock_hold.clone(),
    );
    reg.register(
        "sweep_reports_made",
        "Sweep reports (fits and plots) the dashboard has made: one per change of a sweep's succeeded points, however often it is polled",
        engine.metrics.sweep_reports.clone(),
    );
    reg.register(
        "rpc_seconds",
        "How long each gRPC call took the coordinator (at the service), by method",
        engine.metrics.rpc.clone(),
    );
    let lock_max = gauge(
        &mut reg,
        "engine_lock_hold_max_seconds",
        "The longest hold of the engine lock since the coordinator started",
    );

    let snap = engine.snapshot();
    for s in [
        JobState::Queued,
        JobState::Running,
        JobState::Restarting,
        JobState::Succeeded,
        JobState::Failed,
        JobState::Cancelled,
    ] {
        let n = snap.jobs.iter().filter(|v| v.job.state == s).count();
        jobs.get_or_create(&StateLabel {
            state: s.name().into(),
        })
        .set(n as f64);
    }
    queue.set(snap.queue_length as f64);
    slots.set(f64::from(engine.inventory().total_slots()));
    leased.set(snap.slots_leased as f64);
    ranks.set(snap.live_ranks as f64);
    interval.set(engine.heartbeat_interval(snap.live_ranks).as_secs_f64());
    lock_max.set(
        engine
            .metrics
            .lock_hold_max_ns
            .load(std::sync::atomic::Ordering::Relaxed) as f64
            / 1e9,
    );
    let now = now_unix_ms();
    for v in snap.jobs.iter().filter(|v| !v.job.state.is_final()) {
        let j = &v.job;
        let l = JobLabel {
            job: j.job_id.to_string(),
        };
        steps_total.get_or_create(&l).set(j.steps_total as f64);
        attempts
            .get_or_create(&l)
            .set(f64::from(j.attempts_total()));
        blamed.get_or_create(&l).set(j.blamed_nodes.len() as f64);
        if let Some(c) = j.checkpoints.last() {
            ck_stall.get_or_create(&l).set(c.stall_s);
            ck_age
                .get_or_create(&l)
                .set((now - c.written_unix_ms).max(0) as f64 / 1e3);
        }
        let Some(last) = &v.last_step else {
            continue;
        };
        // The step and its numbers come from one record.
        step.get_or_create(&l).set(last.step as f64);
        loss.get_or_create(&l).set(last.loss);
        lr.get_or_create(&l).set(last.lr);
        tps.get_or_create(&l).set(last.tokens_per_s);
        if let Some(r) = &j.recipe {
            let per_token = strata_recipe::plan::Plan::new(r).flops_per_token;
            flops.get_or_create(&l).set(per_token * last.tokens_per_s);
            if let Some(peak) = last.peak_flops.filter(|p| *p > 0.0) {
                mfu.get_or_create(&l)
                    .set(per_token * last.tokens_per_s / peak);
            }
        }
        if let Some(e) = last.eval_loss {
            eval_loss.get_or_create(&l).set(e);
        }
        if let Some(w) = &last.weights {
            weight_std.get_or_create(&l).set(w.std);
            weight_min.get_or_create(&l).set(w.min);
            weight_max.get_or_create(&l).set(w.max);
            weight_ess.get_or_create(&l).set(w.effective);
        }
        for src in &last.sources {
            let sl = SourceLabel {
                job: j.job_id.to_string(),
                source: src.name.clone(),
            };
            source_tokens.get_or_create(&sl).set(src.tokens as f64);
            if let Some(x) = src.loss {
                source_loss.get_or_create(&sl).set(x);
            }
            if let Some(x) = src.eval_loss {
                source_eval.get_or_create(&sl).set(x);
            }
        }
        let t = &last.times;
        let phases = [
            ("data", t.data_s),
            ("forward", t.forward_s),
            ("backward", t.backward_s),
            ("all_reduce", t.all_reduce_s),
            ("optimizer", t.optimizer_s),
        ];
        step_s
            .get_or_create(&l)
            .set(phases.iter().map(|p| p.1).sum());
        for (p, v) in phases {
            phase_s
                .get_or_create(&PhaseLabel {
                    job: j.job_id.to_string(),
                    phase: p.into(),
                })
                .set(v);
        }
        if let Some(b) = last.stages.iter().map(|s| s.bubble).reduce(f64::max) {
            bubble.get_or_create(&l).set(b);
        }
    }
    for (job, r) in engine.all_ranks() {
        let mut walls: Vec<(f64, u32)> = r
            .rows
            .iter()
            .filter_map(|row| Some((row.last_step?.wall_s, row.rank)))
            .collect();
        if walls.is_empty() {
            continue;
        }
        walls.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        let sorted: Vec<f64> = walls.iter().map(|w| w.0).collect();
        for (q, name) in [(0.5, "0.5"), (0.9, "0.9"), (0.99, "0.99"), (1.0, "1")] {
            rank_q
                .get_or_create(&QuantileLabel {
                    job: job.clone(),
                    quantile: name.into(),
                })
                .set(quantile(&sorted, q));
        }
        for (wall, rank) in walls.iter().rev().take(SLOWEST_RANKS) {
            slowest
                .get_or_create(&RankLabel {
                    job: job.clone(),
                    rank: rank.to_string(),
                })
                .set(*wall);
        }
    }
    let mut out = String::new();
    encode(&mut out, &reg).expect("writing to a String cannot fail");
    out
}
