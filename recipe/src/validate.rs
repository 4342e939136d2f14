//! From [`RecipeSpec`] to [`Recipe`]: every check, every problem reported.
//!
//! Each section is checked even when an earlier one failed, so that a user
//! fixes a recipe in one pass. A check that needs a value which was itself
//! invalid is skipped (its field already has a problem).

use crate::laws::POWER_SEQUENCE_LEN;
use crate::laws::{step_law_batch_tokens, step_law_lr};
use crate::model::{ModelConfig, VOCAB_PAD_MULTIPLE, padded_vocab_size_by};
use crate::quantity::{CurriculumSpec, Quantity, STEP_LAW};
use crate::schedule::{Decay, DecayShape, PowerLaw, Schedule, ScheduleKind};
use crate::spec::{RecipeSpec, ScheduleKindName, ScheduleSpec};
use crate::{
    AdamWConfig, CheckpointConfig, DataConfig, DataSource, EvalConfig, Exhausted, FaultConfig,
    Layout, MixPhase, ParallelConfig, Problem, Recipe, RecipeError, Resolution, SINGLE_SOURCE,
};

/// Token counts must be exact in `f64`, which every schedule computes in.
const MAX_TOKENS: f64 = 9_007_199_254_740_992.0; // 2^53

#[derive(Default)]
struct Checker {
    problems: Vec<Problem>,
    resolutions: Vec<Resolution>,
}

impl Checker {
    fn fail(&mut self, field: &str, message: impl Into<String>) {
        self.problems.push(Problem {
            field: field.to_string(),
            message: message.into(),
        });
    }

    fn resolve(&mut self, field: &str, value: f64, how: String) {
        self.resolutions.push(Resolution {
            field: field.to_string(),
            value,
            how,
        });
    }

    fn positive(&mut self, field: &str, v: i64) -> Option<u64> {
        if v > 0 {
            Some(v as u64)
        } else {
            self.fail(field, format!("must be a positive integer, got {v}"));
            None
        }
    }

    fn positive_u32(&mut self, field: &str, v: i64) -> Option<u32> {
        let v = self.positive(field, v)?;
        match u32::try_from(v) {
            Ok(v) => Some(v),
            Err(_) => {
                self.fail(field, format!("{v} is too large (at most {})", u32::MAX));
                None
            }
        }
    }

    /// A token count: a whole, finite number (positive unless `allow_zero`).
    fn tokens(&mut self, field: &str, q: Quantity, allow_zero: bool) -> Option<u64> {
        let Quantity::Number(x) = q else {
            self.fail(
                field,
                format!("\"{STEP_LAW}\" cannot choose this value; give a token count"),
            );
            return None;
        };
        let ok_sign = if allow_zero { x >= 0.0 } else { x > 0.0 };
        let wanted = if allow_zero {
            "a whole number of tokens, 0 or more"
        } else {
            "a positive whole number of tokens"
        };
        if !x.is_finite() || !ok_sign || x.fract() != 0.0 {
            self.fail(field, format!("must be {wanted}, got {x}"));
            return None;
        }
        if x > MAX_TOKENS {
            self.fail(field, format!("{x:e} is more than 2^53 tokens"));
            return None;
        }
        Some(x as u64)
    }

    fn finite_in(
        &mut self,
        field: &str,
        v: f64,
        ok: impl Fn(f64) -> bool,
        wanted: &str,
    ) -> Option<f64> {
        if v.is_finite() && ok(v) {
            Some(v)
        } else {
            self.fail(field, format!("must be {wanted}, got {v}"));
            None
        }
    }

    fn fraction(&mut self, field: &str, v: f64) -> Option<f64> {
        self.finite_in(field, v, |v| (0.0..=1.0).contains(&v), "between 0 and 1")
    }

    fn positive_f64(&mut self, field: &str, v: f64) -> Option<f64> {
        self.finite_in(field, v, |v| v > 0.0, "a positive number")
    }

    fn storage_url(&mut self, field: &str, url: &str) -> Option<String> {
        let fail = |c: &mut Checker, why: String| {
            c.fail(field, format!("\"{url}\": {why}"));
            None
        };
        if url.trim().is_empty() {
            return fail(self, "must not be empty".into());
        }
        if let Some((scheme, rest)) = url.split_once("://") {
            match scheme {
                "file" if !rest.starts_with('/') => {
                    return fail(self, "a file URL needs an absolute path (file:///…)".into());
                }
                "s3" if rest.split('/').next().unwrap_or("").is_empty() => {
                    return fail(self, "names no bucket (s3://bucket/prefix)".into());
                }
                "file" | "s3" => {}
                other => {
                    return fail(
                        self,
                        format!(
                            "unsupported scheme `{other}`; use file:///…, s3://bucket/prefix or a local path"
                        ),
                    );
                }
            }
        }
        Some(url.to_string())
    }
}

fn job_name(c: &mut Checker, name: Option<&str>, default_name: &str) -> String {
    let ok = |ch: char| ch.is_ascii_alphanumeric() || matches!(ch, '-' | '_' | '.');
    match name {
        Some(n) => {
            // A name that starts with '-' would read as a flag wherever it
            // is passed to a program (`sbatch`, a worker).
            let first_ok = n.starts_with(|ch: char| ch.is_ascii_alphanumeric());
            if n.len() > 128 || !first_ok || !n.chars().all(ok) {
                c.fail(
                    "name",
                    format!(
                        "\"{n}\" is not a job name: use 1 to 128 letters, digits, '-', '_' or '.', starting with a letter or digit"
                    ),
                );
            }
            n.to_string()
        }
        None => {
            let cleaned: String = default_name
                .chars()
                .map(|ch| if ok(ch) { ch } else { '-' })
                .skip_while(|ch| !ch.is_ascii_alphanumeric())
                .take(128)
                .collect();
            if cleaned.is_empty() {
                "job".to_string()
            } else {
                cleaned
            }
        }
    }
}

pub(crate) fn validate(spec: &RecipeSpec, default_name: &str) -> Result<Recipe, RecipeError> {
    let mut c = Checker::default();
    let name = job_name(&mut c, spec.name.as_deref(), default_name);
    let seed = u64::try_from(spec.seed).ok();
    if seed.is_none() {
        c.fail("seed", format!("must be 0 or more, got {}", spec.seed));
    }

    // [model]
    let m = &spec.model;
    let n_layers = c.positive("model.n_layers", m.n_layers);
    let d_model = c.positive("model.d_model", m.d_model);
    let n_heads = c.positive("model.n_heads", m.n_heads);
    let n_kv_heads = match m.n_kv_heads {
        Some(kv) => c.positive("model.n_kv_heads", kv),
        None => n_heads,
    };
    let d_ffn = c.positive("model.d_ffn", m.d_ffn);
    let vocab_size = c.positive("model.vocab_size", m.vocab_size);
    let max_seq_len = c.positive("model.max_seq_len", m.max_seq_len);
    let rope_theta = c.positive_f64("model.rope_theta", m.rope_theta);
    if let (Some(d), Some(h)) = (d_model, n_heads) {
        if d % h != 0 {
            c.fail(
                "model.d_model",
                format!("{d} is not divisible by model.n_heads = {h}"),
            );
        } else if (d / h) % 2 != 0 {
            c.fail(
                "model.d_model",
                format!(
                    "head dimension d_model / n_heads = {d} / {h} = {} is odd; rotary embeddings rotate pairs of dimensions",
                    d / h
                ),
            );
        }
    }
    if let (Some(h), Some(kv)) = (n_heads, n_kv_heads)
        && h % kv != 0
    {
        c.fail(
                "model.n_kv_heads",
                format!("{kv} does not divide model.n_heads = {h}: each KV head serves a whole group of query heads"),
            );
    }
    if let Some(s) = max_seq_len
        && !s.is_power_of_two()
    {
        c.fail(
                "model.max_seq_len",
                format!(
                    "{s} is not a power of two; dataset-decomposition buckets hold sequences of 2^k tokens (nearest: {} or {})",
                    s.next_power_of_two() / 2,
                    s.next_power_of_two()
                ),
            );
    }

    // [parallel]
    let p = &spec.parallel;
    let tp = c.positive_u32("parallel.tp", p.tp);
    let pp = c.positive_u32("parallel.pp", p.pp);
    let dp = c.positive_u32("parallel.dp", p.dp);
    let microbatches = c.positive_u32("parallel.microbatches", p.microbatches);
    let virtual_stages = c.positive_u32("parallel.virtual_stages", p.virtual_stages);
    if let Some(tp) = tp {
        for (what, v) in [("model.n_heads", n_heads), ("model.d_ffn", d_ffn)] {
            if let Some(v) = v
                && v % u64::from(tp) != 0
            {
                c.fail("parallel.tp", format!("{tp} does not divide {what} = {v}"));
            }
        }
        // KV heads split over the ranks, or (more ranks than KV heads)
        // each shared by tp / n_kv_heads ranks.
        if let Some(kv) = n_kv_heads
            && kv % u64::from(tp) != 0
            && u64::from(tp) % kv != 0
        {
            c.fail(
                "parallel.tp",
                format!("{tp} neither divides model.n_kv_heads = {kv} nor is a multiple of it"),
            );
        }
    }
    // Layers need not divide evenly (Layout::stage_layers places the
    // remainder); every stage needs at least one. Any number of
    // microbatches works with 1F1B, fewer than pp only idles more.
    if let (Some(pp), Some(l)) = (pp, n_layers)
        && u64::from(pp) > l
    {
        c.fail(
            "parallel.pp",
            format!("{pp} pipeline stages for model.n_layers = {l}: every stage needs at least one layer"),
        );
    }
    // Interleaved 1F1B: every chunk needs a layer, and microbatches go
    // round the stages in groups of pp (Megatron's schedule).
    if let (Some(v), Some(pp)) = (virtual_stages, pp)
        && v > 1
    {
        if pp == 1 {
            c.fail(
                "parallel.virtual_stages",
                format!("{v} model chunks per stage need a pipeline (parallel.pp = 1)"),
            );
        }
        if let Some(l) = n_layers
            && pp > 1
            && u64::from(pp) * u64::from(v) > l
        {
            c.fail(
                "parallel.virtual_stages",
                format!("parallel.pp·virtual_stages = {pp}·{v} chunks for model.n_layers = {l}: every chunk needs at least one layer"),
            );
        }
        if let Some(mb) = microbatches
            && pp > 1
            && mb % pp != 0
        {
            c.fail(
                "parallel.microbatches",
                format!("{mb} is not a multiple of parallel.pp = {pp}: interleaved 1F1B (virtual_stages = {v}) sends microbatches round the stages in groups of pp"),
            );
        }
    }
    let layout = match (tp, pp, dp) {
        (Some(tp), Some(pp), Some(dp)) => {
            match tp.checked_mul(pp).and_then(|x| x.checked_mul(dp)) {
                Some(_) => Some(Layout::new(tp, pp, dp)),
                None => {
                    c.fail(
                        "parallel",
                        format!("tp·pp·dp = {tp}·{pp}·{dp} overflows a 32-bit world size"),
                    );
                    None
                }
            }
        }
        _ => None,
    };
    let parallel = (|| {
        Some(ParallelConfig {
            layout: layout?,
            microbatches: microbatches?,
            virtual_stages: virtual_stages?,
            shard_optimizer: p.shard_optimizer,
        })
    })();

    let vocab_multiple = match m.vocab_multiple {
        None => Some(VOCAB_PAD_MULTIPLE),
        Some(k) => c.positive("model.vocab_multiple", k),
    };
    if let (Some(v), Some(tp), Some(k)) = (vocab_size, tp, vocab_multiple) {
        let padded = padded_vocab_size_by(v, u64::from(tp), k);
        if padded != v {
            c.resolve(
                "model.vocab_size",
                padded as f64,
                format!(
                    "embedding and output rows padded from {v} to {padded}, a multiple of lcm(model.vocab_multiple = {k}, parallel.tp = {tp}); padded rows are never targets"
                ),
            );
        }
    }
    let model = (|| {
        Some(ModelConfig {
            n_layers: n_layers?,
            d_model: d_model?,
            n_heads: n_heads?,
            n_kv_heads: n_kv_heads?,
            d_ffn: d_ffn?,
            vocab_size: vocab_size?,
            padded_vocab_size: padded_vocab_size_by(vocab_size?, u64::from(tp?), vocab_multiple?),
            max_seq_len: max_seq_len?,
            rope_theta: rope_theta?,
            tie_embeddings: m.tie_embeddings,
        })
    })();

    // [data]
    let (data, run) = check_data(&mut c, spec, max_seq_len, dp, microbatches);

    // [optimizer]
    let o = &spec.optimizer;
    let is_power = spec.schedule.kind == ScheduleKindName::Power;
    let peak_lr = match (o.lr, is_power) {
        (Some(_), true) => {
            c.fail(
                "optimizer.lr",
                "the power schedule sets the LR itself (min(lr_max, β·a·n^b)); remove optimizer.lr, or tune schedule.lr_max, schedule.a and schedule.b",
            );
            None
        }
        (None, true) => None,
        (None, false) => {
            c.fail(
                "optimizer.lr",
                format!("missing: give the peak learning rate, or \"{STEP_LAW}\""),
            );
            None
        }
        (Some(Quantity::Number(lr)), false) => c.positive_f64("optimizer.lr", lr),
        (Some(Quantity::StepLaw), false) => match (&model, run) {
            (Some(model), Some(run)) => {
                let n = model.non_embedding_params() as f64;
                let d = run.total as f64;
                let lr = step_law_lr(n, d);
                c.resolve(
                    "optimizer.lr",
                    lr,
                    format!(
                        "Step Law η = 1.79·N^−0.713·D^0.307 with N = {n:.4e} non-embedding parameters, D = {d:.4e} tokens"
                    ),
                );
                Some(lr)
            }
            // The model or data problems are already reported.
            _ => None,
        },
    };
    let beta1 = c.finite_in(
        "optimizer.beta1",
        o.beta1,
        |b| (0.0..1.0).contains(&b),
        "in [0, 1)",
    );
    let beta2 = c.finite_in(
        "optimizer.beta2",
        o.beta2,
        |b| (0.0..1.0).contains(&b),
        "in [0, 1)",
    );
    let eps = c.positive_f64("optimizer.eps", o.eps);
    let weight_decay = c.finite_in(
        "optimizer.weight_decay",
        o.weight_decay,
        |w| w >= 0.0,
        "0 or more",
    );
    let grad_clip = c.finite_in(
        "optimizer.grad_clip",
        o.grad_clip,
        |g| g >= 0.0,
        "0 (off) or more",
    );
    let optimizer = (|| {
        Some(AdamWConfig {
            beta1: beta1?,
            beta2: beta2?,
            eps: eps?,
            weight_decay: weight_decay?,
            grad_clip: grad_clip.map(|g| (g > 0.0).then_some(g))?,
        })
    })();

    // [schedule]
    let schedule = check_schedule(&mut c, &spec.schedule, run, peak_lr);

    // [checkpoint]
    let checkpoint = match &spec.checkpoint {
        None => Some(None),
        Some(ck) => {
            let every_steps = c.positive("checkpoint.every_steps", ck.every_steps);
            let keep_last = u64::try_from(ck.keep_last).ok();
            if keep_last.is_none() {
                c.fail(
                    "checkpoint.keep_last",
                    format!("must be 0 (keep all) or more, got {}", ck.keep_last),
                );
            }
            let dir = c.storage_url("checkpoint.dir", &ck.dir);
            let n_steps = run.map(|r| r.total / r.tokens_per_step);
            let mut keep_steps = Vec::with_capacity(ck.keep_steps.len());
            for (i, &s) in ck.keep_steps.iter().enumerate() {
                match (u64::try_from(s), n_steps) {
                    (Ok(s), Some(n)) if (1..=n).contains(&s) => keep_steps.push(s),
                    (Ok(s), None) if s >= 1 => keep_steps.push(s),
                    _ => c.fail(
                        &format!("checkpoint.keep_steps[{i}]"),
                        format!(
                            "must be a step of the run (1..={}), got {s}",
                            n_steps.map_or("N".to_string(), |n| n.to_string())
                        ),
                    ),
                }
            }
            keep_steps.sort_unstable();
            keep_steps.dedup();
            (|| {
                Some(Some(CheckpointConfig {
                    every_steps: every_steps?,
                    keep_last: keep_last.map(|k| (k > 0).then_some(k))?,
                    dir: dir?,
                    keep_steps,
                }))
            })()
        }
    };

    // [init]
    let init = match &spec.init {
        None => Some(None),
        Some(i) => match crate::InitFrom::parse(&i.from) {
            Ok(from) => Some(Some(from)),
            Err(why) => {
                c.fail("init.from", why);
                None
            }
        },
    };

    // [eval]
    let eval = match &spec.eval {
        None => Some(None),
        Some(e) => {
            let every_steps = c.positive("eval.every_steps", e.every_steps);
            let tokens = c.tokens("eval.tokens", e.tokens, false);
            let eval = (|| {
                Some(EvalConfig {
                    every_steps: every_steps?,
                    tokens: tokens?,
                })
            })();
            // Every microbatch of every data-parallel replica evaluates
            // at least one window.
            if let (Some(ev), Some(m), Some(p)) = (eval, &model, &parallel) {
                let rows = ev.rows(m.max_seq_len);
                let need = u64::from(p.layout.dp) * u64::from(p.microbatches.max(1));
                if rows < need {
                    c.fail(
                        "eval.tokens",
                        format!(
                            "{} tokens make {rows} windows of max_seq_len + 1 = {}; the {} data-parallel replicas of {} microbatches need {need}",
                            ev.tokens,
                            m.max_seq_len + 1,
                            p.layout.dp,
                            p.microbatches.max(1)
                        ),
                    );
                }
            }
            eval.map(Some)
        }
    };

    // [fault]
    let f = &spec.fault;
    let max_restarts = u32::try_from(f.max_restarts).ok();
    if max_restarts.is_none() {
        c.fail(
            "fault.max_restarts",
            format!("must be 0 (never restart) or more, got {}", f.max_restarts),
        );
    }
    let restart_window_s = c.positive("fault.restart_window_s", f.restart_window_s);
    let hang_timeout_s = c.positive("fault.hang_timeout_s", f.hang_timeout_s);
    let fault = (|| {
        Some(FaultConfig {
            max_restarts: max_restarts?,
            restart_window_s: restart_window_s?,
            hang_timeout_s: hang_timeout_s?,
        })
    })();

    // [slurm]
    let slurm = spec.slurm.clone();
    for (field, v) in [
        ("slurm.partition", &slurm.partition),
        ("slurm.account", &slurm.account),
        ("slurm.qos", &slurm.qos),
        ("slurm.time", &slurm.time),
    ] {
        if let Some(v) = v
            && (v.trim().is_empty() || v.chars().any(|c| c.is_whitespace() || c.is_control()))
        {
            c.fail(field, format!("{v:?} is not a Slurm name or time"));
        }
    }

    // [device]
    let peak_tflops = spec
        .device
        .peak_tflops
        .map(|v| c.positive_f64("device.peak_tflops", v));
    let memory_gib = spec
        .device
        .memory_gib
        .map(|v| c.positive_f64("device.memory_gib", v));
    if spec.device.backend == crate::DeviceKind::Wgpu
        && spec.device.precision == Some(crate::Precision::Bf16)
    {
        c.fail(
            "device.precision",
            "bf16 on wgpu: WGSL has no bf16 type; train in f32 (the default on wgpu)",
        );
    }
    let gpu = match spec.device.gpu.as_deref() {
        None => None,
        Some(name) => match crate::gpu::named(name) {
            Some(g) => {
                if g.memory_mib.is_none() && spec.device.memory_gib.is_none() {
                    c.fail(
                        "device.gpu",
                        format!(
                            "{} ships with more than one memory size; give device.memory_gib too",
                            g.name
                        ),
                    );
                }
                if spec.device.backend != crate::DeviceKind::Cuda {
                    c.fail(
                        "device.gpu",
                        format!(
                            "{} is a GPU, but the job trains on {} (device.backend); set backend = \"cuda\" or drop device.gpu",
                            g.name, spec.device.backend
                        ),
                    );
                }
                Some(g.name.to_string())
            }
            None => {
                c.fail(
                    "device.gpu",
                    format!(
                        "{name:?} is not a GPU strata knows ({}); give device.memory_gib and device.peak_tflops instead",
                        crate::gpu::known_names()
                    ),
                );
                None
            }
        },
    };

    let recipe = (|| {
        Some(Recipe {
            name: name.clone(),
            seed: seed?,
            model: model?,
            parallel: parallel?,
            data: data.clone()?,
            optimizer: optimizer?,
            schedule: schedule.clone()?,
            checkpoint: checkpoint.clone()?,
            eval: eval?,
            init: init.clone()?,
            fault: fault?,
            slurm: slurm.clone(),
            device: spec.device.backend,
            precision: spec
                .device
                .precision
                .unwrap_or(crate::Precision::default_for(spec.device.backend)),
            peak_tflops: match peak_tflops {
                Some(v) => Some(v?),
                None => None,
            },
            recompute: spec.model.recompute,
            memory_gib: match memory_gib {
                Some(v) => Some(v?),
                None => None,
            },
            gpu: gpu.clone(),
            resolutions: Vec::new(),
        })
    })();
    match recipe {
        Some(mut r) if c.problems.is_empty() => {
            r.resolutions = c.resolutions;
            Ok(r)
        }
        _ => {
            debug_assert!(!c.problems.is_empty(), "a missing value without a problem");
            Err(RecipeError {
                problems: c.problems,
            })
        }
    }
}

/// The run's token accounting, which the schedule and the laws need even
/// when another `[data]` field (say the dataset URL) is invalid.
#[derive(Clone, Copy)]
struct RunTokens {
    total: u64,
    tokens_per_step: u64,
}

fn check_data(
    c: &mut Checker,
    spec: &RecipeSpec,
    max_seq_len: Option<u64>,
    dp: Option<u32>,
    microbatches: Option<u32>,
) -> (Option<DataConfig>, Option<RunTokens>) {
    let d = &spec.data;
    let sources = check_sources(c, d);
    let curriculum = check_curriculum(c, &d.curriculum);
    let cycles = c.positive_u32("data.cycles", d.cycles);
    let run = check_run_tokens(c, spec, max_seq_len, dp, microbatches);
    let phases = match &sources {
        Some(sources) => check_phases(c, d, sources, run),
        None => None,
    };
    let reweighting = match &d.reweighting {
        Some(r) => check_reweighting(c, r, run, (max_seq_len, dp, microbatches)).map(Some),
        None => Some(None),
    };
    let data = (|| {
        Some(DataConfig {
            sources: sources?,
            phases: phases?,
            curriculum: curriculum?,
            cycles: cycles?,
            tokens_per_step: run?.tokens_per_step,
            total_tokens: run?.total,
            reweighting: reweighting?,
        })
    })();
    (data, run)
}

/// `[data.reweighting]`. Its groups must lie inside one microbatch of
/// the step: the loader deals a reweighted step by microbatch, so
/// microbatch i of every replica together is one contiguous block of
/// `tokens_per_step / microbatches` tokens, and a group of G divides that
/// block's sequences at the longest length (and so at every shorter one,
/// which has 2^k times as many). A group inside one replica's part needs
/// no collective; one across replicas, a gather of the block's losses.
fn check_reweighting(
    c: &mut Checker,
    r: &crate::spec::ReweightingSpec,
    run: Option<RunTokens>,
    (max_seq_len, dp, microbatches): (Option<u64>, Option<u32>, Option<u32>),
) -> Option<crate::Reweighting> {
    let strategy = crate::Strategy::parse(&r.strategy);
    if strategy.is_none() {
        let names: Vec<String> = crate::Strategy::ALL
            .iter()
            .map(|x| format!("\"{}\"", x.name()))
            .collect();
        c.fail(
            "data.reweighting.strategy",
            format!(
                "unknown strategy \"{}\"; use one of {}",
                r.strategy,
                names.join(", ")
            ),
        );
    }
    let group = c.positive_u32("data.reweighting.group", r.group);
    let temperature = c.positive_f64("data.reweighting.temperature", r.temperature);
    let delta = c.positive_f64("data.reweighting.delta", r.delta);
    let start_tokens = c.tokens("data.reweighting.start_tokens", r.start_tokens, true);
    if let (Some(start), Some(run)) = (start_tokens, run)
        && start >= run.total
    {
        c.fail(
            "data.reweighting.start_tokens",
            format!(
                "{start} is at or past the run's end (data.total_tokens = {}): reweighting would never start",
                run.total
            ),
        );
        return None;
    }
    if let (Some(g), Some(run), Some(s), Some(dp), Some(mb)) =
        (group, run, max_seq_len, dp, microbatches)
    {
        let rows = run.tokens_per_step / (s * u64::from(mb));
        if rows % u64::from(g) != 0 {
            let fits: Vec<String> = (1..=rows)
                .filter(|k| rows % k == 0)
                .map(|k| k.to_string())
                .collect();
            c.fail(
                "data.reweighting.group",
                format!(
                    "{g} does not divide the {rows} sequences of a microbatch of the step at the longest length (data.tokens_per_step / (model.max_seq_len·parallel.microbatches) = {} / ({s}·{mb}), over the {dp} data-parallel replicas): every group must lie in one microbatch; use one of {}, or fewer microbatches",
                    run.tokens_per_step,
                    fits.join(", ")
                ),
            );
            return None;
        }
    }
    Some(crate::Reweighting {
        strategy: strategy?,
        group: group?,
        temperature: temperature?,
        delta: delta?,
        start_tokens: start_tokens?,
    })
}

/// `dataset = …` (one source) or `[[data.sources]]` (a mixture), not both.
fn check_sources(c: &mut Checker, d: &crate::spec::DataSpec) -> Option<Vec<DataSource>> {
    match (&d.dataset, d.sources.is_empty()) {
        (Some(_), false) => {
            c.fail(
                "data.dataset",
                "give either data.dataset (one dataset) or [[data.sources]] (a mixture), not both",
            );
            None
        }
        (None, true) => {
            c.fail(
                "data.dataset",
                "missing: give the decomposed dataset's URL, or [[data.sources]] entries (name, dataset, weight) for a mixture",
            );
            None
        }
        (Some(url), true) => Some(vec![DataSource {
            name: SINGLE_SOURCE.to_string(),
            dataset: c.storage_url("data.dataset", url)?,
            weight: 1.0,
            exhausted: Exhausted::Cycle,
        }]),
        (None, false) => {
            let mut out = Vec::new();
            let mut ok = true;
            for (i, s) in d.sources.iter().enumerate() {
                let field = |k: &str| format!("data.sources[{i}].{k}");
                let name = s.name.trim();
                let name_ok = if name.is_empty()
                    || !name
                        .chars()
                        .all(|ch| ch.is_ascii_alphanumeric() || "-_.".contains(ch))
                {
                    c.fail(
                        &field("name"),
                        format!(
                            "\"{}\": a source's name is letters, digits, '-', '_' or '.' (it names the source in metrics and phases)",
                            s.name
                        ),
                    );
                    false
                } else if let Some(j) = d.sources[..i].iter().position(|o| o.name == s.name) {
                    c.fail(
                        &field("name"),
                        format!("\"{}\" also names data.sources[{j}]", s.name),
                    );
                    false
                } else {
                    true
                };
                let dataset = c.storage_url(&field("dataset"), &s.dataset);
                let weight = c.finite_in(&field("weight"), s.weight, |w| w >= 0.0, "0 or more");
                match (name_ok, dataset, weight) {
                    (true, Some(dataset), Some(weight)) => out.push(DataSource {
                        name: s.name.clone(),
                        dataset,
                        weight,
                        exhausted: s.exhausted,
                    }),
                    _ => ok = false,
                }
            }
            if ok && out.iter().all(|s| s.weight == 0.0) {
                c.fail(
                    "data.sources",
                    "every source's weight is 0: no step could be drawn",
                );
                return None;
            }
            ok.then_some(out)
        }
    }
}

/// `[[data.phases]]`: each at a token count inside the run, later than
/// the one before, weighing every source by name.
fn check_phases(
    c: &mut Checker,
    d: &crate::spec::DataSpec,
    sources: &[DataSource],
    run: Option<RunTokens>,
) -> Option<Vec<MixPhase>> {
    if !d.phases.is_empty() && d.sources.is_empty() {
        c.fail(
            "data.phases",
            "phases change a mixture's weights: name the datasets in [[data.sources]]",
        );
        return None;
    }
    let mut out: Vec<MixPhase> = Vec::new();
    let mut ok = true;
    for (i, p) in d.phases.iter().enumerate() {
        let field = |k: &str| format!("data.phases[{i}].{k}");
        let at = c.tokens(&field("at_tokens"), p.at_tokens, false);
        if let (Some(at), Some(prev)) = (at, out.last())
            && at <= prev.at_tokens
        {
            c.fail(
                &field("at_tokens"),
                format!(
                    "{at} is not after data.phases[{}].at_tokens = {}: phases go in order",
                    i - 1,
                    prev.at_tokens
                ),
            );
            ok = false;
            continue;
        }
        if let (Some(at), Some(run)) = (at, run)
            && at >= run.total
        {
            c.fail(
                &field("at_tokens"),
                format!(
                    "{at} is not before the run's end at {} tokens (data.total_tokens)",
                    run.total
                ),
            );
            ok = false;
            continue;
        }
        let unknown: Vec<&String> = p
            .weights
            .keys()
            .filter(|k| !sources.iter().any(|s| &s.name == *k))
            .collect();
        let missing: Vec<&str> = sources
            .iter()
            .filter(|s| !p.weights.contains_key(&s.name))
            .map(|s| s.name.as_str())
            .collect();
        if !unknown.is_empty() || !missing.is_empty() {
            let mut why = Vec::new();
            if !unknown.is_empty() {
                why.push(format!(
                    "{} names no source",
                    unknown
                        .iter()
                        .map(|k| format!("\"{k}\""))
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            }
            if !missing.is_empty() {
                why.push(format!("no weight for {}", missing.join(", ")));
            }
            c.fail(
                &field("weights"),
                format!(
                    "{}: a phase weighs every source of [[data.sources]] ({})",
                    why.join("; "),
                    sources
                        .iter()
                        .map(|s| s.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            );
            ok = false;
            continue;
        }
        let weights: Vec<f64> = sources.iter().map(|s| p.weights[&s.name]).collect();
        let bad: Vec<String> = sources
            .iter()
            .zip(&weights)
            .filter(|(_, w)| !w.is_finite() || **w < 0.0)
            .map(|(s, w)| format!("{} = {w}", s.name))
            .collect();
        if !bad.is_empty() {
            c.fail(
                &field("weights"),
                format!("weights must be finite and 0 or more: {}", bad.join(", ")),
            );
            ok = false;
            continue;
        }
        if weights.iter().all(|w| *w == 0.0) {
            c.fail(
                &field("weights"),
                "every weight is 0: no step could be drawn",
            );
            ok = false;
            continue;
        }
        match at {
            Some(at_tokens) => out.push(MixPhase { at_tokens, weights }),
            None => ok = false,
        }
    }
    ok.then_some(out)
}

fn check_curriculum(c: &mut Checker, curriculum: &CurriculumSpec) -> Option<CurriculumSpec> {
    match curriculum {
        CurriculumSpec::Named(n) => Some(CurriculumSpec::Named(*n)),
        CurriculumSpec::Odds(odds) => {
            let bad: Vec<String> = odds
                .iter()
                .enumerate()
                .filter(|(_, o)| !o.is_finite() || **o < 0.0)
                .map(|(i, o)| format!("[{i}] = {o}"))
                .collect();
            if odds.is_empty() {
                c.fail(
                    "data.curriculum",
                    "an odds list needs one entry per bucket, smallest bucket first",
                );
                None
            } else if !bad.is_empty() {
                c.fail(
                    "data.curriculum",
                    format!("odds must be finite and 0 or more: {}", bad.join(", ")),
                );
                None
            } else if odds.iter().all(|o| *o == 0.0) {
                c.fail(
                    "data.curriculum",
                    "every odds entry is 0: no bucket could be drawn",
                );
                None
            } else {
                Some(CurriculumSpec::Odds(odds.clone()))
            }
        }
    }
}

fn check_run_tokens(
    c: &mut Checker,
    spec: &RecipeSpec,
    max_seq_len: Option<u64>,
    dp: Option<u32>,
    microbatches: Option<u32>,
) -> Option<RunTokens> {
    let d = &spec.data;
    let requested_total = c.tokens("data.total_tokens", d.total_tokens, false);
    // Every bucket (2^k ≤ max_seq_len) must split into whole sequences per
    // microbatch on every data-parallel rank.
    let granularity = match (max_seq_len, dp, microbatches) {
        (Some(s), Some(d), Some(m)) => {
            let g = s
                .checked_mul(u64::from(d))
                .and_then(|x| x.checked_mul(u64::from(m)));
            if g.is_none() {
                c.fail(
                    "parallel.microbatches",
                    format!("max_seq_len·dp·microbatches = {s}·{d}·{m} is past 2^64 tokens"),
                );
            }
            g
        }
        _ => None,
    };
    let tokens_per_step = match d.tokens_per_step {
        Quantity::StepLaw => match (requested_total, granularity) {
            (Some(total), Some(g)) => {
                let b = step_law_batch_tokens(total as f64);
                let rounded = ((b / g as f64).round() as u64).max(1) * g;
                c.resolve(
                    "data.tokens_per_step",
                    rounded as f64,
                    format!(
                        "Step Law B = 0.58·D^0.571 = {b:.0} tokens for D = {total}, rounded to a multiple of max_seq_len·dp·microbatches = {g}"
                    ),
                );
                Some(rounded)
            }
            _ => None,
        },
        q => {
            let tps = c.tokens("data.tokens_per_step", q, false)?;
            if let (Some(g), Some(s), Some(dp), Some(mb)) =
                (granularity, max_seq_len, dp, microbatches)
                && tps % g != 0
            {
                let lower = tps / g * g;
                let nearest = if lower == 0 {
                    format!("{g}")
                } else {
                    format!("{lower} or {}", lower + g)
                };
                c.fail(
                        "data.tokens_per_step",
                        format!(
                            "{tps} is not divisible by model.max_seq_len·parallel.dp·parallel.microbatches = {s}·{dp}·{mb} = {g}: every bucket must split evenly into microbatches on every data-parallel rank (nearest: {nearest})"
                        ),
                    );
                return None;
            }
            Some(tps)
        }
    };
    let (requested_total, tokens_per_step) = (requested_total?, tokens_per_step?);
    if tokens_per_step > requested_total {
        c.fail(
            "data.total_tokens",
            format!("{requested_total} is less than one step of data.tokens_per_step = {tokens_per_step}"),
        );
        return None;
    }
    let n_steps = requested_total / tokens_per_step;
    let total_tokens = n_steps * tokens_per_step;
    if total_tokens != requested_total {
        c.resolve(
            "data.total_tokens",
            total_tokens as f64,
            format!(
                "{requested_total} is not a whole number of steps of {tokens_per_step} tokens: the run trains {n_steps} steps = {total_tokens} tokens, and every schedule ends there"
            ),
        );
    }
    Some(RunTokens {
        total: total_tokens,
        tokens_per_step,
    })
}

/// Which `[schedule]` keys each kind uses.
fn keys_used_by(kind: ScheduleKindName) -> &'static [&'static str] {
    match kind {
        ScheduleKindName::Constant | ScheduleKindName::InverseSqrt => &["warmup_tokens"],
        ScheduleKindName::Cosine => &["warmup_tokens", "final_lr_fraction"],
        ScheduleKindName::Wsd => &[
            "warmup_tokens",
            "decay_tokens",
            "decay_shape",
            "final_lr_fraction",
            "decay_start_tokens",
        ],
        ScheduleKindName::Power => &[
            "warmup_tokens",
            "decay_tokens",
            "decay_shape",
            "final_lr_fraction",
            "decay_start_tokens",
            "a",
            "b",
            "lr_max",
            "batch_sequences",
        ],
    }
}

/// Checks `[schedule]`. `run` is the run's token accounting when `[data]`
/// gave one; `peak_lr` is the optimizer's peak when it was valid.
fn check_schedule(
    c: &mut Checker,
    spec: &ScheduleSpec,
    run: Option<RunTokens>,
    peak_lr: Option<f64>,
) -> Option<Schedule> {
    let kind_name = spec.kind;
    let set = [
        ("warmup_tokens", spec.warmup_tokens.is_some()),
        ("decay_tokens", spec.decay_tokens.is_some()),
        ("decay_shape", spec.decay_shape.is_some()),
        ("final_lr_fraction", spec.final_lr_fraction.is_some()),
        ("decay_start_tokens", spec.decay_start_tokens.is_some()),
        ("a", spec.a.is_some()),
        ("b", spec.b.is_some()),
        ("lr_max", spec.lr_max.is_some()),
        ("batch_sequences", spec.batch_sequences.is_some()),
    ];
    let used = keys_used_by(kind_name);
    for (key, is_set) in set {
        if is_set && !used.contains(&key) {
            c.fail(
                &format!("schedule.{key}"),
                format!(
                    "is not used by schedule.kind = \"{}\" (it takes: {})",
                    kind_name.name(),
                    used.join(", ")
                ),
            );
        }
    }

    let total = run.map(|r| r.total);
    let is_inverse_sqrt = kind_name == ScheduleKindName::InverseSqrt;
    let warmup = match spec.warmup_tokens {
        Some(q) => c.tokens("schedule.warmup_tokens", q, !is_inverse_sqrt),
        None if is_inverse_sqrt => {
            c.fail(
                "schedule.warmup_tokens",
                "missing: inverse_sqrt needs a positive warmup (its LR is peak·√(warmup_tokens / n))",
            );
            None
        }
        None => Some(0),
    };
    if let (Some(w), Some(t)) = (warmup, total)
        && w > t
    {
        c.fail(
            "schedule.warmup_tokens",
            format!("{w} exceeds the run's {t} tokens (data.total_tokens)"),
        );
    }

    let decay = |c: &mut Checker, shape: DecayShape, required: bool| {
        let tokens = match spec.decay_tokens {
            Some(q) => Some(q),
            None if required => {
                c.fail(
                    "schedule.decay_tokens",
                    format!(
                        "missing: a {} schedule needs the length of its decay",
                        kind_name.name()
                    ),
                );
                None
            }
            None => Some(Quantity::Number(0.0)),
        };
        check_decay(
            c,
            DecaySpec {
                tokens: tokens?,
                start: spec.decay_start_tokens,
                shape: spec.decay_shape.unwrap_or(shape),
                final_fraction: spec.final_lr_fraction.unwrap_or(0.0),
                required,
            },
            warmup,
            total,
        )
    };

    let kind = match kind_name {
        ScheduleKindName::Constant => Some(ScheduleKind::Constant { peak_lr: peak_lr? }),
        ScheduleKindName::InverseSqrt => Some(ScheduleKind::InverseSqrt { peak_lr: peak_lr? }),
        ScheduleKindName::Cosine => {
            let f = c.fraction(
                "schedule.final_lr_fraction",
                spec.final_lr_fraction.unwrap_or(0.1),
            );
            Some(ScheduleKind::Cosine {
                peak_lr: peak_lr?,
                final_lr_fraction: f?,
            })
        }
        ScheduleKindName::Wsd => {
            let decay = decay(c, DecayShape::Linear, true);
            Some(ScheduleKind::Wsd {
                peak_lr: peak_lr?,
                decay: decay?,
            })
        }
        ScheduleKindName::Power => {
            let decay = decay(c, DecayShape::Exponential, false);
            let a = c.positive_f64("schedule.a", spec.a.unwrap_or(4.0));
            let b = c.finite_in(
                "schedule.b",
                spec.b.unwrap_or(-0.51),
                |b| b < 0.0,
                "negative (the LR falls as tokens grow)",
            );
            let lr_max = c.positive_f64("schedule.lr_max", spec.lr_max.unwrap_or(0.02));
            let beta = match spec.batch_sequences {
                Some(bs) => c.positive_f64("schedule.batch_sequences", bs),
                None => run.map(|r| {
                    let beta = r.tokens_per_step as f64 / POWER_SEQUENCE_LEN;
                    c.resolve(
                        "schedule.batch_sequences",
                        beta,
                        format!(
                            "β = tokens_per_step / 4096 = {} / 4096 (the Power paper counts batches in 4096-token sequences)",
                            r.tokens_per_step
                        ),
                    );
                    beta
                }),
            };
            Some(ScheduleKind::Power {
                law: PowerLaw {
                    a: a?,
                    b: b?,
                    lr_max: lr_max?,
                    batch_sequences: beta?,
                },
                decay: decay?,
            })
        }
    };
    Some(Schedule {
        warmup_tokens: warmup?,
        total_tokens: total?,
        kind: kind?,
    })
}

struct DecaySpec {
    tokens: Quantity,
    start: Option<Quantity>,
    shape: DecayShape,
    final_fraction: f64,
    /// WSD needs a decay; the power schedule may run without one.
    required: bool,
}

fn check_decay(
    c: &mut Checker,
    d: DecaySpec,
    warmup: Option<u64>,
    total: Option<u64>,
) -> Option<Decay> {
    let final_fraction = c.fraction("schedule.final_lr_fraction", d.final_fraction);
    let tokens = c.tokens("schedule.decay_tokens", d.tokens, !d.required);
    let start = match d.start {
        Some(q) => c.tokens("schedule.decay_start_tokens", q, true).map(Some),
        None => Some(None),
    };
    let (tokens, start, warmup, total) = (tokens?, start?, warmup?, total?);
    let start = match start {
        Some(_) if tokens == 0 => {
            c.fail(
                "schedule.decay_start_tokens",
                "is set, but schedule.decay_tokens is 0: there is no decay to start",
            );
            return None;
        }
        Some(s) => {
            if s < warmup {
                c.fail(
                    "schedule.decay_start_tokens",
                    format!("{s} falls inside the warmup (schedule.warmup_tokens = {warmup})"),
                );
            }
            if s + tokens > total {
                c.fail(
                    "schedule.decay_start_tokens",
                    format!(
                        "decay_start_tokens + decay_tokens = {s} + {tokens} = {} ends after the run's {total} tokens (data.total_tokens)",
                        s + tokens
                    ),
                );
            }
            s
        }
        None => {
            if warmup + tokens > total {
                c.fail(
                    "schedule.decay_tokens",
                    format!(
                        "warmup_tokens + decay_tokens = {warmup} + {tokens} = {} exceeds the run's {total} tokens (data.total_tokens)",
                        warmup + tokens
                    ),
                );
            }
            total.saturating_sub(tokens)
        }
    };
    Some(Decay {
        start_tokens: start,
        tokens,
        shape: d.shape,
        final_lr_fraction: final_fraction?,
    })
}
