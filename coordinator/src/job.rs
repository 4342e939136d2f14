//! The coordinator's own view of jobs: what the store keeps and the state
//! machine that moves a job from QUEUED to an end.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use strata_dataplane::parts::DecomposeJob;
use strata_recipe::{FaultConfig, Layout, Recipe};

fn is_train(k: &JobKind) -> bool {
    *k == JobKind::Train
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Queued,
    Running,
    /// An attempt failed: its workers are being stopped and a new attempt
    /// will continue from the latest checkpoint.
    Restarting,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobState {
    pub fn is_final(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled
        )
    }

    /// Whether the state machine allows `self → next`.
    pub fn can_become(self, next: JobState) -> bool {
        use JobState::*;
        matches!(
            (self, next),
            (Queued, Running)
                | (Queued, Cancelled)
                | (Queued, Failed)
                | (Running, Succeeded)
                | (Running, Failed)
                | (Running, Cancelled)
                | (Running, Restarting)
                | (Restarting, Running)
                | (Restarting, Failed)
                | (Restarting, Cancelled)
                // Resumed from a checkpoint: a new attempt.
                | (Failed, Queued)
                | (Cancelled, Queued)
                | (Succeeded, Queued)
        )
    }

    pub fn name(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Restarting => "restarting",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }
}

/// What a job's workers do.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobKind {
    /// Train a model from a recipe.
    #[default]
    Train,
    /// Decompose a corpus: rank `i` decomposes part `i` of the files, and
    /// the coordinator commits the dataset's manifest once all are in.
    Decompose,
}

/// A job's id (`tiny-cpu-7`): its name's slug and the coordinator's
/// counter.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct JobId(String);

impl JobId {
    pub fn new(id: impl Into<String>) -> JobId {
        JobId(id.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::borrow::Borrow<str> for JobId {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for JobId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl PartialEq<str> for JobId {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

impl PartialEq<&str> for JobId {
    fn eq(&self, other: &&str) -> bool {
        self.0 == *other
    }
}

/// How many attempts a record keeps whole; older ones are summed up in
/// [`AttemptsSummary`]. A job whose `max_restarts` needs more keeps more.
pub const KEEP_ATTEMPTS: usize = 32;

/// A job as the store keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    pub job_id: JobId,
    pub name: String,
    /// The recipe as submitted.
    pub spec_toml: String,
    /// The same recipe, parsed once: when the job is made, and when the
    /// store is read (`None` for a stored recipe this version refuses).
    #[serde(skip)]
    pub recipe: Option<Arc<Recipe>>,
    #[serde(default, skip_serializing_if = "is_train")]
    pub kind: JobKind,
    /// A decomposition's description, parsed once like `recipe` (its
    /// text is `spec_toml`, JSON).
    #[serde(skip)]
    pub decompose: Option<Arc<DecomposeJob>>,
    pub state: JobState,
    pub layout: Layout,
    pub microbatches: u32,
    pub steps_total: u64,
    pub steps_done: u64,
    pub tokens_done: u64,
    #[serde(with = "float::option")]
    pub last_loss: Option<f64>,
    pub failure_reason: String,
    pub submitted_unix_ms: i64,
    pub started_unix_ms: i64,
    pub finished_unix_ms: i64,
    /// The job's folder: worker logs now, checkpoints later.
    pub run_dir: String,
    /// The secret the job's workers present on every control call, in
    /// memory only: the store keeps its digest. Empty after the
    /// coordinator restarts; the next attempt gets a new one. (Older
    /// stores kept it in clear: it is read once and never written again.)
    #[serde(default, skip_serializing)]
    pub worker_token: String,
    /// SHA-256 of the worker token, hex: what calls are checked against.
    #[serde(default)]
    pub worker_token_sha256: String,
    /// The latest attempts, the current one last (numbered from 1); the
    /// earlier ones are in `earlier_attempts`.
    #[serde(default)]
    pub attempts: Vec<AttemptRecord>,
    /// What the attempts no longer kept whole added up to.
    #[serde(default, skip_serializing_if = "AttemptsSummary::is_empty")]
    pub earlier_attempts: AttemptsSummary,
    /// Complete checkpoints, oldest first (pruned ones removed).
    #[serde(default)]
    pub checkpoints: Vec<CheckpointRecord>,
    /// Set while queued to continue from a checkpoint: its step, 0 for
    /// the latest.
    #[serde(default)]
    pub resume_from: Option<u64>,
    /// Checkpoints that could not be completed, newest last (at most 10).
    #[serde(default)]
    pub checkpoint_errors: Vec<String>,
    /// A branch's parent and the parent's checkpoint it starts from.
    #[serde(default)]
    pub parent: Option<BranchOf>,
    /// Nodes blamed for failed attempts: kept out of the job's next
    /// placements while it fits without them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub blamed_nodes: Vec<BlamedNode>,
}

/// A node an attempt failed on, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlamedNode {
    pub node: String,
    pub attempt: u32,
    pub reason: String,
}

/// Attempts no longer kept whole, added up.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttemptsSummary {
    pub attempts: u32,
    pub failed: u32,
    pub interrupted: u32,
    pub steps_lost: u64,
    /// When the first of them started.
    pub first_started_unix_ms: i64,
}

impl AttemptsSummary {
    pub fn is_empty(&self) -> bool {
        self.attempts == 0
    }
}

/// Where a branch starts: a checkpoint of another job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BranchOf {
    pub job: String,
    pub step: u64,
}

impl JobRecord {
    /// A new job, queued, not yet numbered (its id and folder are given
    /// when it is recorded).
    pub fn queued(
        name: String,
        spec_toml: String,
        layout: Layout,
        microbatches: u32,
        steps_total: u64,
    ) -> JobRecord {
        JobRecord {
            job_id: JobId::new(""),
            name,
            spec_toml,
            recipe: None,
            kind: JobKind::Train,
            decompose: None,
            state: JobState::Queued,
            layout,
            microbatches,
            steps_total,
            steps_done: 0,
            tokens_done: 0,
            last_loss: None,
            failure_reason: String::new(),
            submitted_unix_ms: 0,
            started_unix_ms: 0,
            finished_unix_ms: 0,
            run_dir: String::new(),
            worker_token: String::new(),
            worker_token_sha256: String::new(),
            attempts: Vec::new(),
            earlier_attempts: AttemptsSummary::default(),
            checkpoints: Vec::new(),
            resume_from: None,
            checkpoint_errors: Vec::new(),
            parent: None,
            blamed_nodes: Vec::new(),
        }
    }

    /// A queued job of one data-parallel pair, for the engine's tests.
    #[cfg(test)]
    pub(crate) fn for_test(id: &str) -> JobRecord {
        let mut job = JobRecord::queued(
            "t".into(),
            "name = \"t\"".into(),
            Layout::new(1, 1, 2),
            1,
            10,
        );
        job.job_id = JobId::new(id);
        job.submitted_unix_ms = 1;
        job.run_dir = "/runs/t".into();
        job.set_worker_token("secret".into());
        job
    }

    /// Gives the job's workers a new secret.
    pub fn set_worker_token(&mut self, token: String) {
        self.worker_token_sha256 = token_digest(&token);
        self.worker_token = token;
    }

    /// Whether `presented` is the workers' secret (compared in constant
    /// time, digest to digest).
    pub fn worker_token_matches(&self, presented: &str) -> bool {
        !self.worker_token_sha256.is_empty()
            && crate::engine::same_token(
                token_digest(presented).as_bytes(),
                self.worker_token_sha256.as_bytes(),
            )
    }

    /// A record as the store gave it: the recipe parsed, and a token an
    /// older store kept in clear turned into its digest.
    pub fn loaded(&mut self) {
        if self.worker_token_sha256.is_empty() && !self.worker_token.is_empty() {
            self.worker_token_sha256 = token_digest(&self.worker_token);
        }
        self.parse_recipe();
    }

    /// Parses the stored recipe text once (a record read back from the
    /// store); a recipe this version refuses leaves `recipe` empty.
    pub fn parse_recipe(&mut self) {
        if self.kind == JobKind::Decompose {
            match DecomposeJob::parse(&self.spec_toml) {
                Ok(d) => self.decompose = Some(Arc::new(d)),
                Err(e) => {
                    tracing::warn!(job = %self.job_id, error = %e, "a stored decomposition no longer parses");
                    self.decompose = None;
                }
            }
            return;
        }
        match Recipe::from_toml_str(&self.spec_toml, &self.name) {
            Ok(r) => self.recipe = Some(Arc::new(r)),
            Err(e) => {
                tracing::warn!(job = %self.job_id, error = %e, "a stored recipe no longer parses");
                self.recipe = None;
            }
        }
    }

    /// The job's `[fault]` settings (the defaults for a recipe that no
    /// longer parses).
    pub fn fault(&self) -> FaultConfig {
        if let Some(d) = &self.decompose {
            return FaultConfig {
                max_restarts: d.max_restarts,
                ..FaultConfig::default()
            };
        }
        self.recipe
            .as_ref()
            .map(|r| r.fault.clone())
            .unwrap_or_default()
    }

    /// Refuses what only a training job has (checkpoints to resume or
    /// branch from), naming the job.
    pub fn trains(&self, what: &str) -> Result<(), crate::error::EngineError> {
        match self.kind {
            JobKind::Train => Ok(()),
            JobKind::Decompose => Err(crate::error::EngineError::Invalid(format!(
                "job {} decomposes a corpus and has no checkpoints to {what}; submit it again (its finished parts are kept)",
                self.job_id
            ))),
        }
    }

    /// The current (or last) attempt's number; 0 before the first.
    pub fn attempt(&self) -> u32 {
        self.attempts.last().map_or(0, |a| a.number)
    }

    /// The latest complete checkpoint's step.
    pub fn last_checkpoint(&self) -> Option<u64> {
        self.checkpoints.last().map(|c| c.step)
    }

    /// The step a restart continues from: the latest own checkpoint, or a
    /// branch's parent checkpoint before it has one.
    pub fn restart_step(&self) -> Option<u64> {
        self.last_checkpoint()
            .or_else(|| self.parent.as_ref().map(|p| p.step))
    }

    /// When the job's first attempt started (0 before it has).
    pub fn first_started_unix_ms(&self) -> i64 {
        if !self.earlier_attempts.is_empty() {
            return self.earlier_attempts.first_started_unix_ms;
        }
        self.attempts
            .first()
            .map_or(self.started_unix_ms, |a| a.started_unix_ms)
    }

    /// Every attempt, those summed up included.
    pub fn attempts_total(&self) -> u32 {
        self.earlier_attempts.attempts + self.attempts.len() as u32
    }

    /// Starts attempt `a`, summing up the oldest kept ones beyond what
    /// the record keeps whole: [`KEEP_ATTEMPTS`], or more when the job's
    /// `max_restarts` must see further back.
    pub fn push_attempt(&mut self, a: AttemptRecord) {
        self.attempts.push(a);
        let keep = KEEP_ATTEMPTS.max(self.fault().max_restarts as usize + 2);
        let over = self.attempts.len().saturating_sub(keep);
        for old in self.attempts.drain(..over) {
            let s = &mut self.earlier_attempts;
            if s.attempts == 0 {
                s.first_started_unix_ms = old.started_unix_ms;
            }
            s.attempts += 1;
            s.failed += u32::from(old.end_state == Some(JobState::Failed) && !old.interrupted);
            s.interrupted += u32::from(old.interrupted);
            s.steps_lost += old.steps_lost;
        }
    }
}

/// One run of a job's workers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AttemptRecord {
    pub number: u32,
    pub started_unix_ms: i64,
    pub ended_unix_ms: i64,
    /// The checkpoint step it started from (0: from scratch).
    pub from_step: u64,
    /// How it ended; `None` while it runs.
    pub end_state: Option<JobState>,
    pub cause: String,
    /// Steps done past the last complete checkpoint when it ended.
    pub steps_lost: u64,
    pub last_step: u64,
    /// Ended by the coordinator's own restart, not by the job: it does
    /// not count toward `[fault] max_restarts`.
    #[serde(default)]
    pub interrupted: bool,
}

/// A checkpoint whose manifest the coordinator wrote.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointRecord {
    pub step: u64,
    pub tokens: u64,
    pub bytes: u64,
    pub attempt: u32,
    pub written_unix_ms: i64,
    /// The longest step stall of any rank (copying its state out).
    pub stall_s: f64,
    /// The longest background write of any rank.
    pub write_s: f64,
    pub url: String,
}

/// Floats as JSON numbers, and the non-finite ones (an infinite gradient
/// norm) as the strings `"NaN"`, `"inf"` and `"-inf"`: serde_json writes
/// them as `null` and then cannot read them back as `f64`, which made a
/// job's whole history unreadable. `null` from such older records reads
/// as NaN.
pub mod float {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(x: &f64, s: S) -> Result<S::Ok, S::Error> {
        if x.is_finite() {
            s.serialize_f64(*x)
        } else if x.is_nan() {
            s.serialize_str("NaN")
        } else if *x > 0.0 {
            s.serialize_str("inf")
        } else {
            s.serialize_str("-inf")
        }
    }

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Repr {
        Number(f64),
        Text(String),
        Null(()),
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        match Repr::deserialize(d)? {
            Repr::Number(x) => Ok(x),
            Repr::Null(()) => Ok(f64::NAN),
            Repr::Text(t) => match t.as_str() {
                "NaN" => Ok(f64::NAN),
                "inf" => Ok(f64::INFINITY),
                "-inf" => Ok(f64::NEG_INFINITY),
                other => Err(serde::de::Error::custom(format!(
                    "`{other}` is not a number"
                ))),
            },
        }
    }

    /// The same for an optional float.
    pub mod option {
        use serde::{Deserialize, Deserializer, Serialize, Serializer};

        #[derive(Serialize, Deserialize)]
        struct Wrap(#[serde(with = "super")] f64);

        pub fn serialize<S: Serializer>(x: &Option<f64>, s: S) -> Result<S::Ok, S::Error> {
            x.map(Wrap).serialize(s)
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<f64>, D::Error> {
            Ok(Option::<Wrap>::deserialize(d)?.map(|w| w.0))
        }
    }
}

/// Where a step's wall time went, in seconds (rank 0's view).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct StepTimes {
    #[serde(with = "float")]
    pub data_s: f64,
    #[serde(with = "float")]
    pub forward_s: f64,
    #[serde(with = "float")]
    pub backward_s: f64,
    #[serde(with = "float")]
    pub all_reduce_s: f64,
    #[serde(with = "float")]
    pub optimizer_s: f64,
}

/// One pipeline stage's timings of a step, in seconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct StageTimes {
    pub stage: u32,
    #[serde(with = "float")]
    pub forward_s: f64,
    #[serde(with = "float")]
    pub backward_s: f64,
    /// Blocked waiting for neighbouring stages.
    #[serde(with = "float")]
    pub wait_s: f64,
    #[serde(with = "float")]
    pub pipeline_s: f64,
    /// `wait_s / pipeline_s`.
    #[serde(with = "float")]
    pub bubble: f64,
    #[serde(with = "float")]
    pub tp_comm_s: f64,
}

/// One optimizer step of a job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    pub step: u64,
    pub tokens: u64,
    #[serde(with = "float")]
    pub loss: f64,
    #[serde(with = "float")]
    pub lr: f64,
    #[serde(with = "float")]
    pub tokens_per_s: f64,
    #[serde(with = "float")]
    pub grad_norm: f64,
    pub seq_log2: u32,
    pub times: StepTimes,
    /// Each pipeline stage's timings (absent in records of older
    /// coordinators).
    #[serde(default)]
    pub stages: Vec<StageTimes>,
    /// 1F1B's theoretical bubble, (p − 1) / (m + p − 1).
    #[serde(default)]
    #[serde(with = "float")]
    pub bubble_theory: f64,
    /// The held-out loss, on steps that evaluated (`[eval]`).
    #[serde(
        default,
        with = "float::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub eval_loss: Option<f64>,
    /// Every device's peak FLOP/s together, when known (for MFU).
    #[serde(
        default,
        with = "float::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub peak_flops: Option<f64>,
    /// A mixture's sources in the step; empty for one dataset.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sources: Vec<SourceRecord>,
    /// Under loss-based reweighting: how the step's multipliers spread.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weights: Option<SampleWeights>,
}

impl StepRecord {
    /// Step `n` with plausible numbers (loss 10/n), for tests.
    #[cfg(test)]
    pub(crate) fn for_test(n: u64) -> StepRecord {
        StepRecord {
            step: n,
            tokens: n * 128,
            loss: 10.0 / n as f64,
            lr: 1e-3,
            tokens_per_s: 1000.0,
            grad_norm: 1.0,
            seq_log2: 6,
            times: StepTimes::default(),
            stages: vec![StageTimes {
                stage: 0,
                bubble: 0.25,
                ..StageTimes::default()
            }],
            bubble_theory: 0.2,
            eval_loss: Some(3.5),
            peak_flops: Some(2e12),
            sources: Vec::new(),
            weights: None,
        }
    }
}

/// The spread of a step's per-sequence loss multipliers (each group's
/// average is 1).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SampleWeights {
    #[serde(with = "float")]
    pub std: f64,
    #[serde(with = "float")]
    pub min: f64,
    #[serde(with = "float")]
    pub max: f64,
    /// Kish's effective sample size as a fraction of the sequences.
    #[serde(with = "float")]
    pub effective: f64,
}

/// One source of a mixture in a step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SourceRecord {
    pub name: String,
    /// The step's tokens from it.
    pub tokens: u64,
    /// Its mean loss per token in the step; none without a share.
    #[serde(
        default,
        with = "float::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub loss: Option<f64>,
    /// Its held-out loss, on steps that evaluated.
    #[serde(
        default,
        with = "float::option",
        skip_serializing_if = "Option::is_none"
    )]
    pub eval_loss: Option<f64>,
}

pub fn now_unix_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// A random secret, hex encoded (from the OS's generator).
/// Bytes as lowercase hex.
pub fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// SHA-256 of a token, hex.
pub fn token_digest(token: &str) -> String {
    to_hex(ring::digest::digest(&ring::digest::SHA256, token.as_bytes()).as_ref())
}

pub fn random_token() -> std::io::Result<String> {
    use std::io::Read;
    let mut bytes = [0u8; 24];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(to_hex(&bytes))
}
