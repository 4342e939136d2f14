//! The recipe as written: TOML sections deserialised with
//! `deny_unknown_fields`, before validation.
//!
//! Integer sizes are read as `i64` so that a negative or zero value reaches
//! validation (which reports every problem at once) instead of stopping the
//! parser at the first one.

use serde::{Deserialize, Serialize};

use crate::SlurmSection;
use crate::quantity::{CurriculumSpec, Quantity};
use crate::schedule::DecayShape;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecipeSpec {
    /// A name for the job; defaults to the recipe's file stem.
    pub name: Option<String>,
    /// Seeds parameter initialisation and the data curriculum.
    #[serde(default = "default_seed")]
    pub seed: i64,
    pub model: ModelSpec,
    #[serde(default)]
    pub parallel: ParallelSpec,
    pub data: DataSpec,
    pub optimizer: OptimizerSpec,
    pub schedule: ScheduleSpec,
    pub checkpoint: Option<CheckpointSpec>,
    /// Evaluation on the dataset's held-out split during training.
    pub eval: Option<EvalSpec>,
    /// The weights the run starts from instead of random ones.
    pub init: Option<InitSpec>,
    /// What the workers compute on; the CPU when left out.
    #[serde(default)]
    pub device: DeviceSpec,
    /// How the coordinator handles failures; the defaults when left out.
    #[serde(default)]
    pub fault: FaultSpec,
    #[serde(default)]
    pub slurm: SlurmSection,
}

/// `[fault]`: automatic recovery.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultSpec {
    /// New attempts after failures (from the latest checkpoint) before the
    /// job fails; 0 fails it at the first.
    #[serde(default = "default_max_restarts")]
    pub max_restarts: i64,
    /// Only restarts within this many seconds count toward `max_restarts`.
    #[serde(default = "default_restart_window_s")]
    pub restart_window_s: i64,
    /// A rank whose step does not advance for this long is hung: its
    /// attempt is restarted.
    #[serde(default = "default_hang_timeout_s")]
    pub hang_timeout_s: i64,
}

impl Default for FaultSpec {
    fn default() -> FaultSpec {
        FaultSpec {
            max_restarts: default_max_restarts(),
            restart_window_s: default_restart_window_s(),
            hang_timeout_s: default_hang_timeout_s(),
        }
    }
}

fn default_max_restarts() -> i64 {
    3
}

fn default_restart_window_s() -> i64 {
    3600
}

fn default_hang_timeout_s() -> i64 {
    600
}

/// `[device]`: what the workers compute on.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceSpec {
    /// `cpu` (burn's flex backend, collectives over TCP) or `cuda` (one
    /// NVIDIA GPU per worker).
    #[serde(default)]
    pub backend: crate::DeviceKind,
    /// `f32` or `bf16` (mixed precision); bf16 on `cuda` and f32 on `cpu`
    /// when left out.
    #[serde(default)]
    pub precision: Option<crate::Precision>,
    /// Each device's peak dense FLOP/s at that precision, in TFLOP/s: the
    /// denominator of MFU. Known GPUs in bf16 need none.
    #[serde(default)]
    pub peak_tflops: Option<f64>,
    /// Each device's memory in GiB (a GPU's, or the share of a node's
    /// memory one CPU worker may use): `strata plan` checks every rank's
    /// bytes against it, and a job that cannot fit is refused at submit.
    #[serde(default)]
    pub memory_gib: Option<f64>,
    /// A GPU model strata knows (`H100`, `A100-80GB`, …): its memory and
    /// bf16 peak stand in for `memory_gib` and `peak_tflops` when those
    /// are not given.
    #[serde(default)]
    pub gpu: Option<String>,
}

fn default_seed() -> i64 {
    1234
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    pub n_layers: i64,
    pub d_model: i64,
    pub n_heads: i64,
    /// Defaults to `n_heads` (full multi-head attention).
    pub n_kv_heads: Option<i64>,
    /// Hidden width of the SwiGLU MLP.
    pub d_ffn: i64,
    pub vocab_size: i64,
    /// Embedding and output rows are padded to a multiple of this times
    /// tp's odd part (Megatron-LM's `make-vocab-size-divisible-by`);
    /// 128 when left out. 1 keeps an imported model's own row count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vocab_multiple: Option<i64>,
    pub max_seq_len: i64,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    #[serde(default)]
    pub tie_embeddings: bool,
    /// Activation recomputation: `none`, `selective` or `full`.
    #[serde(default)]
    pub recompute: crate::Recompute,
}

fn default_rope_theta() -> f64 {
    10_000.0
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParallelSpec {
    #[serde(default = "one")]
    pub tp: i64,
    #[serde(default = "one")]
    pub pp: i64,
    #[serde(default = "one")]
    pub dp: i64,
    /// Microbatches per step on each data-parallel rank.
    #[serde(default = "one")]
    pub microbatches: i64,
    /// Model chunks per pipeline stage (interleaved 1F1B when above 1).
    #[serde(default = "one")]
    pub virtual_stages: i64,
    /// ZeRO-1: each data-parallel rank keeps the optimizer state of its
    /// shard of the parameters only.
    #[serde(default)]
    pub shard_optimizer: bool,
}

impl Default for ParallelSpec {
    fn default() -> Self {
        ParallelSpec {
            tp: 1,
            pp: 1,
            dp: 1,
            microbatches: 1,
            virtual_stages: 1,
            shard_optimizer: false,
        }
    }
}

fn one() -> i64 {
    1
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSpec {
    /// Object-store URL of a decomposed dataset (`file:///…`, `s3://bucket/prefix`
    /// or a local path). Either this or `[[data.sources]]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataset: Option<String>,
    /// A mixture: several decomposed datasets, each with a weight.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sources: Vec<SourceSpec>,
    /// The mixture's weights from a token count on (late-stage mixes).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub phases: Vec<PhaseSpec>,
    #[serde(default = "default_curriculum")]
    pub curriculum: CurriculumSpec,
    #[serde(default = "one")]
    pub cycles: i64,
    pub tokens_per_step: Quantity,
    pub total_tokens: Quantity,
    /// Loss-based sample reweighting (off when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reweighting: Option<ReweightingSpec>,
}

/// `[data.reweighting]`: each sequence weighed by its loss within its
/// group (Sow et al., ICLR 2025).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReweightingSpec {
    /// `"uniform"`, `"linupper"`, `"quadratic"` or `"extremes"`.
    pub strategy: String,
    /// Sequences per normalization group, consecutive in data order.
    pub group: i64,
    /// The softmax temperature `r` over the scores (1 in the authors' runs).
    #[serde(default = "one_f64")]
    pub temperature: f64,
    /// The half-width δ of the interval losses are mapped onto (1 in the
    /// authors' runs).
    #[serde(default = "one_f64")]
    pub delta: f64,
    /// Tokens trained with uniform weights before reweighting starts.
    pub start_tokens: Quantity,
}

fn one_f64() -> f64 {
    1.0
}

/// One `[[data.sources]]` entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceSpec {
    /// Names the source in metrics, phases and errors.
    pub name: String,
    /// Object-store URL of its decomposed dataset.
    pub dataset: String,
    /// Its share of every step's tokens, relative to the others' weights.
    pub weight: f64,
    /// What happens when it has fed all its sequences: `"cycle"` (start
    /// over, the default) or `"stop"` (the run fails naming it).
    #[serde(default)]
    pub exhausted: crate::Exhausted,
}

/// One `[[data.phases]]` entry: from `at_tokens` on, these weights.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PhaseSpec {
    pub at_tokens: Quantity,
    /// Every source's weight, by name.
    pub weights: std::collections::BTreeMap<String, f64>,
}

fn default_curriculum() -> CurriculumSpec {
    CurriculumSpec::Named(crate::quantity::NamedCurriculum::GrowP2)
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptimizerSpec {
    /// Peak learning rate, or `"step-law"`. Not used by the `power` schedule,
    /// whose peak is `min(lr_max, β·a·n^b)`.
    pub lr: Option<Quantity>,
    #[serde(default = "default_beta1")]
    pub beta1: f64,
    #[serde(default = "default_beta2")]
    pub beta2: f64,
    #[serde(default = "default_eps")]
    pub eps: f64,
    #[serde(default = "default_weight_decay")]
    pub weight_decay: f64,
    /// Clip gradients to this global L2 norm; 0 turns clipping off.
    #[serde(default = "default_grad_clip")]
    pub grad_clip: f64,
}

fn default_beta1() -> f64 {
    crate::AdamWConfig::default().beta1
}
fn default_beta2() -> f64 {
    crate::AdamWConfig::default().beta2
}
fn default_eps() -> f64 {
    crate::AdamWConfig::default().eps
}
fn default_weight_decay() -> f64 {
    crate::AdamWConfig::default().weight_decay
}
fn default_grad_clip() -> f64 {
    crate::AdamWConfig::default().grad_clip.unwrap_or(0.0)
}

/// `[schedule]`. One flat table whose `kind` says which keys apply; a key
/// the kind does not use is a validation error naming both, and defaults
/// depend on the kind (see [`crate::schedule`] and the README).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleSpec {
    pub kind: ScheduleKindName,
    pub warmup_tokens: Option<Quantity>,
    /// wsd (required), power (default 0: no decay).
    pub decay_tokens: Option<Quantity>,
    /// wsd (default linear), power (default exponential).
    pub decay_shape: Option<DecayShape>,
    /// cosine (default 0.1), wsd and power (default 0).
    pub final_lr_fraction: Option<f64>,
    /// wsd, power: where the decay starts; defaults to total − decay_tokens.
    pub decay_start_tokens: Option<Quantity>,
    /// power: `a` of `min(lr_max, β·a·n^b)` (default 4).
    pub a: Option<f64>,
    /// power: `b` (default −0.51).
    pub b: Option<f64>,
    /// power: the cap (default 0.02).
    pub lr_max: Option<f64>,
    /// power: β, the batch size in sequences (default tokens_per_step / 4096,
    /// the paper's sequence length).
    pub batch_sequences: Option<f64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScheduleKindName {
    Constant,
    Cosine,
    InverseSqrt,
    Wsd,
    Power,
}

impl ScheduleKindName {
    pub fn name(self) -> &'static str {
        match self {
            ScheduleKindName::Constant => "constant",
            ScheduleKindName::Cosine => "cosine",
            ScheduleKindName::InverseSqrt => "inverse_sqrt",
            ScheduleKindName::Wsd => "wsd",
            ScheduleKindName::Power => "power",
        }
    }
}

/// `[init]`: continued pretraining from existing weights.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InitSpec {
    /// `hf:FOLDER` (a Hugging Face Llama: a path, `file://` or `s3://`
    /// URL) or a strata checkpoint's step folder (`…/JOB/step-NNNNNNNN`):
    /// its weights, with a fresh optimizer, from step 0.
    pub from: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalSpec {
    /// Evaluate after every this many steps (and after the last).
    pub every_steps: i64,
    /// Held-out tokens per evaluation: the split's first ones, in windows
    /// of max_seq_len + 1.
    pub tokens: Quantity,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointSpec {
    pub every_steps: i64,
    /// How many complete checkpoints to keep; 0 keeps all.
    #[serde(default = "default_keep_last")]
    pub keep_last: i64,
    /// Object-store URL of the run's checkpoint folder.
    pub dir: String,
    /// Steps also saved, besides every `every_steps`, and never pruned by
    /// `keep_last` (the branch points of a cooldown sweep).
    #[serde(default)]
    pub keep_steps: Vec<i64>,
}

fn default_keep_last() -> i64 {
    3
}
