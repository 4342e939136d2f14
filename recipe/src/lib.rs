//! strata's job recipe.
//!
//! A recipe is a TOML file that says what model to train, on what data, with
//! which parallel layout, optimizer, learning-rate schedule and
//! hyperparameters. [`Recipe::from_toml_str`] parses it (unknown keys are
//! errors) and validates it once, reporting every problem with the field named
//! and the numbers shown; the result is a typed [`Recipe`] in which quantities
//! chosen by a scaling law (`lr = "step-law"`) are resolved.
//!
//! This crate is pure: it does no I/O and knows nothing of gRPC, so the
//! coordinator, the workers and `strata plan` (offline) all read recipes the
//! same way.

pub mod gpu;
pub mod laws;
pub mod layout;
pub mod model;
pub mod overrides;
pub mod plan;
pub mod quantity;
pub mod resume;
pub mod reweight;
pub mod schedule;
pub mod spec;
mod validate;

use std::fmt;

use serde::{Deserialize, Serialize};

pub use layout::{Coords, Layout, Rank};
pub use model::ModelConfig;
pub use overrides::Override;
pub use quantity::{CurriculumSpec as Curriculum, NamedCurriculum, Quantity};
pub use resume::resume_conflicts;
pub use reweight::{Reweighting, Strategy, WeightSpread};
pub use schedule::{Decay, DecayShape, Phase, PowerLaw, Schedule, ScheduleKind};
pub use spec::RecipeSpec;

/// One thing wrong with a recipe: the field (a dotted path such as
/// `parallel.tp`) and what is wrong with it, numbers included.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Problem {
    pub field: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// Why a recipe was rejected: every problem found, not only the first.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct RecipeError {
    pub problems: Vec<Problem>,
}

impl fmt::Display for RecipeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.problems.as_slice() {
            [one] => write!(f, "invalid recipe: {one}"),
            many => {
                write!(f, "invalid recipe ({} problems):", many.len())?;
                for p in many {
                    write!(f, "\n  {p}")?;
                }
                Ok(())
            }
        }
    }
}

impl RecipeError {
    /// Whether any problem names `field` (exactly, or a key inside it).
    pub fn names(&self, field: &str) -> bool {
        self.problems
            .iter()
            .any(|p| p.field == field || p.field.starts_with(&format!("{field}.")))
    }
}

/// `[parallel]` once validated.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ParallelConfig {
    pub layout: Layout,
    /// Microbatches per step on each data-parallel rank.
    pub microbatches: u32,
    /// Model chunks per pipeline stage: 1 for 1F1B, more for interleaved
    /// 1F1B (Megatron's virtual pipeline stages).
    pub virtual_stages: u32,
    /// ZeRO-1 (Megatron's distributed optimizer): gradients are
    /// reduce-scattered over the data-parallel group, each rank updates
    /// the master weights and both AdamW moments of its shard only, and
    /// the updated weights are all-gathered. Checkpoints keep the same
    /// format, so a run resumes with or without it.
    #[serde(default)]
    pub shard_optimizer: bool,
}

/// `[data]` once validated.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DataConfig {
    /// The datasets every step draws from: one for `dataset = …`, each
    /// `[[data.sources]]` entry for a mixture. Whether they exist is
    /// checked at submission, not here.
    pub sources: Vec<DataSource>,
    /// Weights that replace the sources' own from a token count on,
    /// earliest first.
    pub phases: Vec<MixPhase>,
    pub curriculum: Curriculum,
    pub cycles: u32,
    /// Tokens per optimizer step, constant whatever the bucket.
    pub tokens_per_step: u64,
    /// Tokens the run trains on: whole steps of `tokens_per_step`. Every
    /// schedule ends here.
    pub total_tokens: u64,
    /// Loss-based sample reweighting, when the recipe asks for it.
    #[serde(default)]
    pub reweighting: Option<Reweighting>,
}

impl DataConfig {
    pub fn n_steps(&self) -> u64 {
        self.total_tokens / self.tokens_per_step
    }

    /// Whether the run trains on a mixture of several datasets.
    pub fn is_mixture(&self) -> bool {
        self.sources.len() > 1
    }

    /// The first source's dataset: the only one unless a mixture (whose
    /// sources share a tokenizer, so it stands for all of them where only
    /// the vocabulary matters).
    pub fn first_dataset(&self) -> &str {
        &self.sources[0].dataset
    }

    /// The sources' weights for the step that starts after `tokens_before`
    /// tokens, normalized to sum to 1, in source order.
    pub fn weights_at(&self, tokens_before: u64) -> Vec<f64> {
        match MixPhase::at(&self.phases, tokens_before) {
            Some(p) => p.normalized(),
            None => normalized(&self.sources.iter().map(|s| s.weight).collect::<Vec<_>>()),
        }
    }

    /// The recipe field naming source `i`'s dataset, as errors name it:
    /// `data.dataset` for one dataset, `data.sources[i].dataset` in a
    /// mixture.
    pub fn dataset_field(&self, i: usize) -> String {
        if self.sources.len() == 1 && self.sources[0].name == SINGLE_SOURCE {
            "data.dataset".to_string()
        } else {
            format!("data.sources[{i}].dataset")
        }
    }
}

/// `weights` scaled to sum to 1.
fn normalized(weights: &[f64]) -> Vec<f64> {
    let sum: f64 = weights.iter().sum();
    weights.iter().map(|w| w / sum).collect()
}

/// One dataset of the data, with its weight.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DataSource {
    pub name: String,
    pub dataset: String,
    /// Relative to the other sources' weights (any positive sum).
    pub weight: f64,
    pub exhausted: Exhausted,
}

/// What a source does when it has fed every sequence it holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Exhausted {
    /// Start over: a new epoch of the source, said in the worker's log.
    #[default]
    Cycle,
    /// The run fails, naming the source.
    Stop,
}

/// From `at_tokens` on, these weights (one per source, in source order).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MixPhase {
    pub at_tokens: u64,
    pub weights: Vec<f64>,
}

impl MixPhase {
    /// The phase of `phases` (earliest first) that holds after `tokens`.
    pub fn at(phases: &[MixPhase], tokens: u64) -> Option<&MixPhase> {
        phases.iter().rev().find(|p| p.at_tokens <= tokens)
    }

    /// Its weights, scaled to sum to 1.
    pub fn normalized(&self) -> Vec<f64> {
        normalized(&self.weights)
    }
}

/// The name of the one source of a recipe that gives `dataset = …`.
pub const SINGLE_SOURCE: &str = "data";

/// AdamW with decoupled weight decay. The learning rate comes from the
/// [`Schedule`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Global-norm gradient clipping threshold; `None` when off.
    pub grad_clip: Option<f64>,
}

impl Default for AdamWConfig {
    /// A recipe's `[optimizer]` defaults: β = (0.9, 0.95), ε = 1e-8,
    /// weight decay 0.1, gradients clipped to norm 1.
    fn default() -> AdamWConfig {
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
            grad_clip: Some(1.0),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FaultConfig {
    /// New attempts after failures before the job fails.
    pub max_restarts: u32,
    /// Restarts older than this do not count.
    pub restart_window_s: u64,
    /// A step that takes longer than this is a hang.
    pub hang_timeout_s: u64,
}

impl Default for FaultConfig {
    fn default() -> FaultConfig {
        FaultConfig {
            max_restarts: 3,
            restart_window_s: 3600,
            hang_timeout_s: 600,
        }
    }
}

/// `[init] from`: where a run's first weights come from (the optimizer
/// state starts fresh and the run at step 0, as torchtitan's
/// `initial_load_model_only`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InitFrom {
    /// A Hugging Face `LlamaForCausalLM` folder's URL (a path, `file://`
    /// or `s3://`).
    HuggingFace(String),
    /// A strata checkpoint's step folder (`…/JOB/step-NNNNNNNN`): its
    /// master weights, resharded to the run's layout.
    Checkpoint(String),
}

impl InitFrom {
    /// Reads `from` as `[init] from` takes it; the error says why not.
    pub fn parse(from: &str) -> Result<InitFrom, String> {
        let from = from.trim().trim_end_matches('/');
        let scheme_ok = |url: &str| match url.split_once("://") {
            None => !url.is_empty(),
            Some((scheme, rest)) => matches!(scheme, "file" | "s3") && !rest.is_empty(),
        };
        if let Some(url) = from.strip_prefix("hf:") {
            if !scheme_ok(url) {
                return Err(format!(
                    "`{from}`: a Hugging Face folder is hf:PATH, hf:file:///PATH or hf:s3://BUCKET/PREFIX"
                ));
            }
            return Ok(InitFrom::HuggingFace(url.to_string()));
        }
        let step = from.rsplit('/').next().unwrap_or_default();
        let is_step = step
            .strip_prefix("step-")
            .is_some_and(|n| n.len() == 8 && n.bytes().all(|b| b.is_ascii_digit()));
        if is_step && scheme_ok(from) && from.contains('/') {
            return Ok(InitFrom::Checkpoint(from.to_string()));
        }
        Err(format!(
            "`{from}` is neither hf:FOLDER (a Hugging Face model) nor a strata checkpoint's step folder (…/JOB/step-NNNNNNNN)"
        ))
    }

    /// The folder's URL.
    pub fn url(&self) -> &str {
        match self {
            InitFrom::HuggingFace(u) | InitFrom::Checkpoint(u) => u,
        }
    }
}

impl fmt::Display for InitFrom {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            InitFrom::HuggingFace(u) => write!(f, "hf:{u}"),
            InitFrom::Checkpoint(u) => f.write_str(u),
        }
    }
}

/// `[eval]`: the held-out loss during training.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct EvalConfig {
    pub every_steps: u64,
    /// Held-out tokens per evaluation (whole windows of max_seq_len + 1).
    pub tokens: u64,
}

impl EvalConfig {
    /// The evaluation's sequences of `seq_len` predicted tokens (each
    /// window has one more, its first input): as many whole windows as
    /// `tokens` holds.
    pub fn rows(&self, seq_len: u64) -> u64 {
        self.tokens / (seq_len + 1)
    }
}

/// `[slurm]`: a job's own Slurm settings, over the coordinator's
/// (`strata coordinator --launcher slurm --partition …`). Other launchers
/// ignore them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlurmSection {
    pub partition: Option<String>,
    pub account: Option<String>,
    pub qos: Option<String>,
    /// Each attempt's time limit, in Slurm's formats (`HH:MM:SS`,
    /// `D-HH:MM`, …). An attempt that reaches it saves a checkpoint (Slurm
    /// signals the workers ahead of it) and the next attempt goes on.
    pub time: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointConfig {
    pub every_steps: u64,
    /// Complete checkpoints kept; `None` keeps all.
    pub keep_last: Option<u64>,
    pub dir: String,
    /// Steps also saved and never pruned, ascending.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub keep_steps: Vec<u64>,
}

impl CheckpointConfig {
    /// Whether the run saves a checkpoint after `step` (of `n_steps`).
    pub fn saves_at(&self, step: u64, n_steps: u64) -> bool {
        step.is_multiple_of(self.every_steps.max(1))
            || step == n_steps
            || self.keep_steps.binary_search(&step).is_ok()
    }
}

/// What a worker computes on: `[device] backend`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    /// burn's flex backend on the worker's share of the machine's cores.
    #[default]
    Cpu,
    /// burn's CUDA backend on one NVIDIA GPU per worker (a binary built
    /// with the `cuda` feature).
    Cuda,
    /// burn's wgpu backend (WGSL over Vulkan, Metal or DX12) on the
    /// machine's graphics adapter, a CPU through Mesa's software Vulkan
    /// included (a binary built with the `wgpu` feature); f32 only.
    Wgpu,
}

impl DeviceKind {
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceKind::Cpu => "cpu",
            DeviceKind::Cuda => "cuda",
            DeviceKind::Wgpu => "wgpu",
        }
    }
}

/// Activation recomputation: `[model] recompute`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Recompute {
    /// Every activation the backward reads is kept from the forward.
    #[default]
    None,
    /// Attention's core (scores, softmax, the product with the values)
    /// and SwiGLU's product are run again at the backward from the
    /// projections' outputs, which are kept: what is large and cheap to
    /// compute is dropped, no projection is recomputed (Megatron's
    /// `--recompute-granularity selective`, extended to the MLP's
    /// intermediate).
    Selective,
    /// Only each transformer block's input is kept (each residual
    /// branch's under tensor parallelism); the backward runs the block's
    /// forward again to rebuild the rest. Losses are bit-identical.
    Full,
}

impl Recompute {
    pub fn as_str(self) -> &'static str {
        match self {
            Recompute::None => "none",
            Recompute::Selective => "selective",
            Recompute::Full => "full",
        }
    }
}

/// What the model computes in: `[device] precision`. Master weights,
/// optimizer state and gradient sums are f32 either way; under `bf16` the
/// parameters are cast for each step's matrix products and activations,
/// while norms, the attention softmax and the cross-entropy run in f32.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    F32,
    Bf16,
}

impl Precision {
    /// The precision a backend computes in unless the recipe says: bf16 on
    /// GPUs (their tensor cores), f32 on the CPU (where bf16 products are
    /// converted to f32 and back, slower than f32 itself).
    pub fn default_for(device: DeviceKind) -> Precision {
        match device {
            DeviceKind::Cpu | DeviceKind::Wgpu => Precision::F32,
            DeviceKind::Cuda => Precision::Bf16,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Display for DeviceKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A value the recipe left to a law, or that validation had to round, and
/// how it was settled. `strata plan` prints these.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Resolution {
    pub field: String,
    pub value: f64,
    pub how: String,
}

/// A validated recipe.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Recipe {
    pub name: String,
    pub seed: u64,
    pub model: ModelConfig,
    pub parallel: ParallelConfig,
    pub data: DataConfig,
    pub optimizer: AdamWConfig,
    pub schedule: Schedule,
    pub checkpoint: Option<CheckpointConfig>,
    /// `[eval]`.
    #[serde(default)]
    pub eval: Option<EvalConfig>,
    /// `[init] from`: the weights the run starts from.
    #[serde(default)]
    pub init: Option<InitFrom>,
    /// `[fault]`.
    #[serde(default)]
    pub fault: FaultConfig,
    /// `[slurm]`.
    #[serde(default)]
    pub slurm: SlurmSection,
    /// `[device] backend`.
    #[serde(default)]
    pub device: DeviceKind,
    /// `[device] precision`, or the backend's default
    /// ([`Precision::default_for`]).
    #[serde(default)]
    pub precision: Precision,
    /// `[device] peak_tflops`: each device's peak, for MFU.
    #[serde(default)]
    pub peak_tflops: Option<f64>,
    /// `[model] recompute`: a training choice, not the model's maths, so
    /// not part of [`ModelConfig`] (a checkpoint resumes either way).
    #[serde(default)]
    pub recompute: Recompute,
    /// `[device] memory_gib`: each device's memory, for the memory plan.
    #[serde(default)]
    pub memory_gib: Option<f64>,
    /// `[device] gpu`: the known GPU model the job runs on, by its
    /// [`gpu::KNOWN`] name.
    #[serde(default)]
    pub gpu: Option<String>,
    pub resolutions: Vec<Resolution>,
}

impl Recipe {
    /// Each device's memory in GiB and the recipe field it comes from:
    /// `[device] memory_gib`, or the memory of the GPU `[device] gpu`
    /// names.
    pub fn device_memory(&self) -> Option<(f64, String)> {
        if let Some(g) = self.memory_gib {
            return Some((g, "device.memory_gib".into()));
        }
        let gpu = gpu::named(self.gpu.as_deref()?)?;
        Some((gpu.memory_gib()?, format!("device.gpu = {}", gpu.name)))
    }

    /// Each device's peak FLOP/s in TFLOP/s: `[device] peak_tflops`, or
    /// the bf16 peak of the GPU `[device] gpu` names when the job computes
    /// in bf16.
    pub fn device_peak_tflops(&self) -> Option<f64> {
        if let Some(t) = self.peak_tflops {
            return Some(t);
        }
        let gpu = gpu::named(self.gpu.as_deref()?)?;
        (self.precision == Precision::Bf16).then_some(gpu.bf16_tflops)
    }

    /// Parses and validates a recipe. `default_name` names the job when the
    /// recipe has no `name` (the CLI passes the file stem).
    pub fn from_toml_str(text: &str, default_name: &str) -> Result<Recipe, RecipeError> {
        let spec = RecipeSpec::from_toml_str(text)?;
        Recipe::from_spec(&spec, default_name)
    }

    /// [`Recipe::from_toml_str`] of `text` with the command line's
    /// overrides written in ([`overrides`]): the recipe and its text as
    /// submitted (`text` itself without overrides). A problem an override
    /// caused names it, and an unknown key the nearest valid one.
    pub fn from_toml_with(
        text: &str,
        default_name: &str,
        sets: &[Override],
    ) -> Result<(Recipe, String), RecipeError> {
        let text = overrides::apply_to_text(text, sets)?;
        let recipe =
            Recipe::from_toml_str(&text, default_name).map_err(|e| overrides::explain(e, sets))?;
        Ok((recipe, text))
    }

    /// Validates a parsed recipe, reporting every problem at once.
    pub fn from_spec(spec: &RecipeSpec, default_name: &str) -> Result<Recipe, RecipeError> {
        validate::validate(spec, default_name)
    }
}

/// Structural problems (unknown keys, wrong types) reported in one pass at most.
const MAX_STRUCTURAL_PROBLEMS: usize = 64;

impl RecipeSpec {
    /// Parses TOML into the spec, rejecting unknown keys. Structural problems
    /// (an unknown key, a value of the wrong type) are collected in document
    /// order, each naming the key's dotted path and its line, until a missing
    /// required key stops the pass.
    pub fn from_toml_str(text: &str) -> Result<RecipeSpec, RecipeError> {
        let mut root = toml::de::DeTable::parse(text).map_err(|e| RecipeError {
            problems: vec![syntax_problem(text, "", &e)],
        })?;
        let mut problems: Vec<Problem> = Vec::new();
        for _ in 0..MAX_STRUCTURAL_PROBLEMS {
            let de = toml::Deserializer::from(root.clone());
            let err = match serde_path_to_error::deserialize::<_, RecipeSpec>(de) {
                Ok(spec) if problems.is_empty() => return Ok(spec),
                Ok(_) => break,
                Err(e) => e,
            };
            let problem = syntax_problem(text, &err.path().to_string(), err.inner());
            // Drop the offending key and parse again to find the next
            // problem; a key that cannot be dropped (a missing one) ends the
            // pass, as does a second problem on a key already reported.
            let progressed = !problems.iter().any(|p| p.field == problem.field)
                && remove_key(root.get_mut(), &problem.field);
            if !problems.iter().any(|p| p.field == problem.field) {
                problems.push(problem);
            }
            if !progressed {
                break;
            }
        }
        Err(RecipeError { problems })
    }
}

/// Removes the key at a dotted path (`model.n_layers`; `data.curriculum[1]`
/// removes the whole array). Returns whether a key was removed.
fn remove_key(table: &mut toml::de::DeTable<'_>, path: &str) -> bool {
    let path = path.split('[').next().unwrap_or(path);
    match path.split_once('.') {
        None => table.remove(path).is_some(),
        Some((head, rest)) => match table.get_mut(head).map(|v| v.get_mut()) {
            Some(toml::de::DeValue::Table(inner)) => remove_key(inner, rest),
            _ => false,
        },
    }
}

fn syntax_problem(text: &str, path: &str, e: &toml::de::Error) -> Problem {
    let path = if path == "." { "" } else { path };
    let mut message = e.message().trim().to_string();
    // Name an unknown or missing key by its full path, not its parent table's.
    let mut field = path.to_string();
    let key = ["unknown field `", "missing field `"]
        .iter()
        .find_map(|prefix| message.strip_prefix(prefix))
        .and_then(|rest| rest.split('`').next());
    if let Some(key) = key {
        let named = path == key || path.ends_with(&format!(".{key}"));
        field = match (path.is_empty(), named) {
            (true, _) => key.to_string(),
            (false, true) => path.to_string(),
            (false, false) => format!("{path}.{key}"),
        };
    }
    if let Some(span) = e.span() {
        let (line, col) = line_col(text, span.start);
        message = format!("{message} (line {line}, column {col})");
    }
    let field = if field.is_empty() {
        "recipe".to_string()
    } else {
        field
    };
    Problem { field, message }
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    (line, col)
}
