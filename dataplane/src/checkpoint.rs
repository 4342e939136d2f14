//! The checkpoint format on object storage: what a checkpoint's manifest
//! says, and the operations that need no tensors (writing the manifest,
//! listing complete checkpoints, pruning old ones).
//!
//! A checkpoint of step `n` lives under `<root>/step-0000000n/`:
//!
//! ```text
//! model/a1-pp00-tp01.safetensors   parameters (master weights, f32)
//! optim/a1-pp00-tp01.safetensors   AdamW's moments: `<name>.exp_avg`, `<name>.exp_avg_sq`
//! manifest.json                 written last: a checkpoint without it does not exist
//! ```
//!
//! Each tensor is one slice of a logical parameter, keyed by its name; the
//! manifest lists every file with its size, CRC-32 and tensors (name, full
//! shape, slice), and the run's step, tokens seen, layout, recipe, loader
//! cursor and attempt. The worker writes and reads the tensors
//! (`strata_worker::checkpoint`); the coordinator commits manifests, lists
//! and prunes, and never opens a tensor file.

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use strata_recipe::ModelConfig;

use std::collections::HashMap;

use crate::loader::Cursor;
use crate::params::{ParamSlot, ParamTable, logical_params};
use crate::store::{Location, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// An object that does not hold what the manifest says it does.
    #[error("{url}: {why}")]
    Corrupt { url: String, why: String },
    /// A checkpoint that cannot serve: incomplete, or of another model.
    #[error("{0}")]
    Invalid(String),
}

type Result<T> = std::result::Result<T, CheckpointError>;

/// The manifest's `format`.
pub const FORMAT: &str = "strata-checkpoint";
/// The manifest's `version`; a reader refuses others.
pub const VERSION: u32 = 1;
/// Which of a parameter's tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// The master weights.
    Param,
    /// AdamW's first moment.
    ExpAvg,
    /// AdamW's second moment.
    ExpAvgSq,
}

impl Kind {
    pub const ALL: [Kind; 3] = [Kind::Param, Kind::ExpAvg, Kind::ExpAvgSq];

    /// The tensor's key in its file.
    pub fn key(self, name: &str) -> String {
        match self {
            Kind::Param => name.to_string(),
            Kind::ExpAvg => format!("{name}.exp_avg"),
            Kind::ExpAvgSq => format!("{name}.exp_avg_sq"),
        }
    }
}

/// One tensor of a shard file: a slice of a logical parameter.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TensorEntry {
    /// The logical parameter (`blocks.3.wq`).
    pub name: String,
    pub kind: Kind,
    pub full_shape: Vec<usize>,
    /// `[start, end)` of each dimension.
    pub slice: Vec<[usize; 2]>,
}

/// One file of a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardRecord {
    /// Relative to the checkpoint's folder (`model/a1-pp00-tp00.safetensors`:
    /// the attempt that wrote it, the stage and the tensor-parallel rank).
    pub key: String,
    pub bytes: u64,
    /// CRC-32 (IEEE) of the whole file.
    pub crc32: u32,
    pub tensors: Vec<TensorEntry>,
}

/// The layout a checkpoint was saved under.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SavedLayout {
    pub tp: u32,
    pub pp: u32,
    pub dp: u32,
    pub virtual_stages: u32,
}

/// Where the data loader stood.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "DataStateWire")]
pub struct DataState {
    /// Each source's dataset when saved, in source order.
    pub sources: Vec<SourceState>,
    /// The cursor after the checkpoint's last step: the next batch read
    /// is the first one the uninterrupted run would have read next.
    pub cursor: Cursor,
    /// The cursor was saved before mixtures, counting steps per bucket
    /// rather than sequences ([`crate::loader::Planner::from_steps`]
    /// converts it). Never written.
    #[serde(skip_serializing)]
    pub counts_steps: bool,
}

/// A source's dataset as a checkpoint records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceState {
    pub name: String,
    /// The dataset's URL when saved.
    pub dataset: String,
    /// [`crate::manifest::Manifest::fingerprint`] of that dataset.
    pub fingerprint: u32,
}

/// `data` as manifests hold it: this version's, or one dataset's cursor
/// as checkpoints before mixtures wrote it.
#[derive(Deserialize)]
#[serde(untagged)]
enum DataStateWire {
    Sources(SourcesWire),
    OneDataset(OneDatasetWire),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SourcesWire {
    sources: Vec<SourceState>,
    cursor: Cursor,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OneDatasetWire {
    dataset: String,
    fingerprint: u32,
    cursor: StepCursor,
}

/// The single-dataset cursor before mixtures: steps taken per bucket.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StepCursor {
    step: u64,
    epoch: u64,
    cycle: u32,
    used: Vec<u64>,
    rng: crate::rng::SplitMix64,
}

impl DataState {
    /// The state of a one-dataset cursor that counted steps per bucket.
    pub fn counting_steps(
        dataset: String,
        fingerprint: u32,
        step: u64,
        (epoch, cycle, used): (u64, u32, Vec<u64>),
        rng: crate::rng::SplitMix64,
    ) -> DataState {
        DataState {
            sources: vec![SourceState {
                name: strata_recipe::SINGLE_SOURCE.into(),
                dataset,
                fingerprint,
            }],
            cursor: Cursor {
                step,
                rng,
                sources: vec![crate::loader::SourceCursor { epoch, cycle, used }],
            },
            counts_steps: true,
        }
    }
}

impl From<DataStateWire> for DataState {
    fn from(w: DataStateWire) -> DataState {
        match w {
            DataStateWire::Sources(SourcesWire { sources, cursor }) => DataState {
                sources,
                cursor,
                counts_steps: false,
            },
            DataStateWire::OneDataset(OneDatasetWire {
                dataset,
                fingerprint,
                cursor: c,
            }) => DataState::counting_steps(
                dataset,
                fingerprint,
                c.step,
                (c.epoch, c.cycle, c.used),
                c.rng,
            ),
        }
    }
}

/// A complete checkpoint's description, `manifest.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub format: String,
    pub version: u32,
    pub job: String,
    /// The attempt of the job that wrote it.
    pub attempt: u32,
    /// Steps completed.
    pub step: u64,
    pub tokens_seen: u64,
    /// AdamW's step count (its bias corrections).
    pub optimizer_steps: u64,
    pub layout: SavedLayout,
    /// The model the tensors belong to.
    pub model: ModelConfig,
    /// The recipe as the job ran it (TOML).
    pub recipe: String,
    /// Absent for a run with no data loader (tests, benchmarks).
    pub data: Option<DataState>,
    pub shards: Vec<ShardRecord>,
    /// Seconds since the Unix epoch when the manifest was written.
    pub written_at: u64,
}

/// Checks that `m`'s files hold every element of every parameter of
/// its model, each kind exactly once, with shapes that agree.
pub fn check_complete(m: &Manifest) -> Result<()> {
    let bad = |why: String| Err(CheckpointError::Invalid(format!("step {}: {why}", m.step)));
    if m.format != FORMAT || m.version != VERSION {
        return bad(format!(
            "format {} version {}, this strata reads {FORMAT} version {VERSION}",
            m.format, m.version
        ));
    }
    let entries: usize = m.shards.iter().map(|s| s.tensors.len()).sum();
    if let Err(why) = plausible_model(&m.model, entries) {
        return bad(why);
    }
    let mut covered: HashMap<(&str, Kind), usize> = HashMap::new();
    // Slices seen so far, by tensor: a slice written twice (two ranks
    // claiming one part, none the other) would add up to the right count.
    type Seen<'a> = Vec<(&'a str, &'a Vec<[usize; 2]>)>;
    let mut slices: HashMap<(&str, Kind), Seen> = HashMap::new();
    let specs = logical_params(&m.model);
    for shard in &m.shards {
        for t in &shard.tensors {
            let Some(spec) = specs.iter().find(|s| s.name == t.name) else {
                return bad(format!(
                    "{} holds `{}`, which the model has no parameter of",
                    shard.key, t.name
                ));
            };
            let fits = spec.full_shape == t.full_shape
                && t.slice.len() == t.full_shape.len()
                && t.slice
                    .iter()
                    .zip(&t.full_shape)
                    .all(|(&[a, b], &n)| a < b && b <= n);
            if !fits {
                return bad(format!(
                    "{}: `{}` as slice {:?} of {:?}, the model's is {:?}",
                    shard.key, t.name, t.slice, t.full_shape, spec.full_shape
                ));
            }
            let seen = slices.entry((spec.name.as_str(), t.kind)).or_default();
            if let Some((other, _)) = seen.iter().find(|(_, s)| overlap(s, &t.slice)) {
                return bad(format!(
                    "`{}` ({:?}): slice {:?} in {} overlaps the one in {other}",
                    t.name, t.kind, t.slice, shard.key
                ));
            }
            seen.push((shard.key.as_str(), &t.slice));
            *covered.entry((spec.name.as_str(), t.kind)).or_default() += t.len();
        }
    }
    for spec in &specs {
        let want: usize = spec.full_shape.iter().product();
        for kind in Kind::ALL {
            let have = covered
                .get(&(spec.name.as_str(), kind))
                .copied()
                .unwrap_or(0);
            if have != want {
                return bad(format!(
                    "`{}` ({kind:?}) has {have} of its {want} elements in the files",
                    spec.name
                ));
            }
        }
    }
    Ok(())
}

/// The stem of the files a rank writes (`a1-pp00-tp01`): the attempt
/// that wrote them, the pipeline stage and the tensor-parallel rank. The
/// attempt in the name means a worker of an ended attempt still writing can
/// never overwrite a file the next attempt's manifest lists.
pub fn shard_name(attempt: u32, stage: u32, tp_rank: u32) -> String {
    format!("a{attempt}-pp{stage:02}-tp{tp_rank:02}")
}

/// The parameters of `table` a rank writes: only data-parallel replica
/// 0, one copy of each slice, never the tied embedding's mirror; every
/// logical element is then written exactly once.
pub fn written_slots(table: &ParamTable, dp_rank: u32) -> impl Iterator<Item = &ParamSlot> {
    table
        .slots
        .iter()
        .filter(move |s| dp_rank == 0 && s.replica == 0 && !s.mirror)
}

/// The folders of a checkpoint's files and the tensors each holds.
pub const FILES: [(&str, &[Kind]); 2] = [
    ("model", &[Kind::Param]),
    ("optim", &[Kind::ExpAvg, Kind::ExpAvgSq]),
];

/// A rank's files described without their data (sizes are the f32
/// payloads, checksums zero): what a simulated rank reports, and what the
/// files of a real one hold.
pub fn describe_shards(table: &ParamTable, attempt: u32, dp_rank: u32) -> Vec<ShardRecord> {
    let slots: Vec<&ParamSlot> = written_slots(table, dp_rank).collect();
    if slots.is_empty() {
        return Vec::new();
    }
    let name = shard_name(attempt, table.stage, table.tp_rank);
    FILES
        .iter()
        .map(|(folder, kinds)| {
            let tensors: Vec<TensorEntry> = slots
                .iter()
                .flat_map(|slot| kinds.iter().map(move |&kind| tensor_entry(slot, kind)))
                .collect();
            ShardRecord {
                key: format!("{folder}/{name}.safetensors"),
                bytes: tensors.iter().map(|t| t.len() as u64 * 4).sum(),
                crc32: 0,
                tensors,
            }
        })
        .collect()
}

/// The manifest's entry for `slot`'s tensor of `kind`.
pub fn tensor_entry(slot: &ParamSlot, kind: Kind) -> TensorEntry {
    TensorEntry {
        name: slot.spec.name.clone(),
        kind,
        full_shape: slot.spec.full_shape.clone(),
        slice: slot.slice.iter().map(|r| [r.start, r.end]).collect(),
    }
}

/// A model a manifest may name before anything is sized by it: no zero
/// or absurd dimension (a head count of 0 divides by zero; 2^40 layers
/// would be a list of trillions), and no more layers than its files hold
/// tensors for.
fn plausible_model(m: &ModelConfig, entries: usize) -> std::result::Result<(), String> {
    let dims = [
        ("d_model", m.d_model),
        ("n_heads", m.n_heads),
        ("n_kv_heads", m.n_kv_heads),
        ("d_ffn", m.d_ffn),
        ("padded_vocab_size", m.padded_vocab_size),
    ];
    if let Some((name, v)) = dims.iter().find(|(_, v)| *v == 0 || *v >= 1 << 32) {
        return Err(format!("the manifest's model has {name} = {v}"));
    }
    // Each layer has nine tensors, each kept as three (weights, moments).
    if m.n_layers.saturating_mul(27) > entries as u64 {
        return Err(format!(
            "the manifest's model has {} layers; its files hold {entries} tensors",
            m.n_layers
        ));
    }
    Ok(())
}

/// Whether two boxes (a `[start, end)` per dimension) share an element.
fn overlap(a: &[[usize; 2]], b: &[[usize; 2]]) -> bool {
    a.iter()
        .zip(b)
        .all(|(&[a0, a1], &[b0, b1])| a0 < b1 && b0 < a1)
}

/// The folder of step `step`'s checkpoint, relative to the root.
pub fn step_dir(step: u64) -> String {
    format!("step-{step:08}")
}

/// `key` under `prefix` (an empty prefix is the root).
pub fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() {
        key.to_string()
    } else {
        format!("{}/{key}", prefix.trim_end_matches('/'))
    }
}

impl Manifest {
    /// Total bytes of the checkpoint's files.
    pub fn bytes(&self) -> u64 {
        self.shards.iter().map(|s| s.bytes).sum()
    }
}

impl TensorEntry {
    /// The slice as ranges.
    pub fn ranges(&self) -> Vec<std::ops::Range<usize>> {
        self.slice.iter().map(|&[a, b]| a..b).collect()
    }

    /// Elements in the slice.
    pub fn len(&self) -> usize {
        self.slice.iter().map(|[a, b]| b - a).product()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Makes step `manifest.step`'s checkpoint exist by writing its manifest
/// (whoever calls it has seen every file written).
pub async fn write_manifest(loc: &Location, root: &str, manifest: &Manifest) -> Result<()> {
    let key = join(root, &format!("{}/manifest.json", step_dir(manifest.step)));
    let json = serde_json::to_vec_pretty(manifest).expect("a manifest serializes");
    loc.put_durable(&key, Bytes::from(json)).await?;
    Ok(())
}

/// The complete checkpoint in the step folder `url` (`…/JOB/step-NNNNNNNN`,
/// a path, `file://` or `s3://` URL): its job folder and its manifest.
pub async fn open_step(url: &str) -> Result<(Location, Manifest)> {
    let url = url.trim_end_matches('/');
    let (root_url, dir) = url
        .rsplit_once('/')
        .filter(|(_, d)| d.starts_with("step-"))
        .ok_or_else(|| {
            CheckpointError::Invalid(format!(
                "{url}: not a checkpoint folder (…/JOB/step-NNNNNNNN)"
            ))
        })?;
    let loc = Location::parse(root_url, false)?;
    let key = format!("{dir}/manifest.json");
    let bytes = match loc.get(&key).await {
        Ok(b) => b,
        Err(StoreError::NotFound { .. }) => {
            return Err(CheckpointError::Invalid(format!(
                "{url} is not a complete checkpoint: no manifest (incomplete or deleted)"
            )));
        }
        Err(e) => return Err(e.into()),
    };
    let manifest: Manifest = serde_json::from_slice(&bytes).map_err(|e| {
        CheckpointError::Invalid(format!(
            "{url} is not a complete checkpoint: its manifest is unreadable ({e})"
        ))
    })?;
    if step_dir(manifest.step) != dir {
        return Err(CheckpointError::Invalid(format!(
            "{url}: its manifest says step {}",
            manifest.step
        )));
    }
    Ok((loc, manifest))
}

/// [`open_step`], refused when its weights cannot serve `model`
/// ([`ModelConfig::weight_differences`], every field named).
pub async fn open_step_of(url: &str, model: &ModelConfig) -> Result<(Location, Manifest)> {
    let (loc, manifest) = open_step(url).await?;
    let differ = model.weight_differences(&manifest.model);
    if !differ.is_empty() {
        return Err(CheckpointError::Invalid(format!(
            "{} holds another model: {}",
            url.trim_end_matches('/'),
            differ.join("; ")
        )));
    }
    Ok((loc, manifest))
}

/// The complete checkpoints under `root`, oldest first, and the manifests
/// that could not be read (key and why).
pub async fn list(loc: &Location, root: &str) -> Result<(Vec<Manifest>, Vec<(String, String)>)> {
    let keys = loc.list_in(root).await?;
    let prefix = join(root, "");
    let mut found = Vec::new();
    let mut unreadable = Vec::new();
    for key in keys {
        let Some(rest) = key.strip_prefix(&prefix) else {
            continue;
        };
        let Some(dir) = rest.strip_suffix("/manifest.json") else {
            continue;
        };
        if !dir.starts_with("step-") || dir.contains('/') {
            continue;
        }
        let bytes = loc.get(&key).await?;
        match serde_json::from_slice::<Manifest>(&bytes) {
            Ok(m) if step_dir(m.step) == dir => found.push(m),
            Ok(m) => unreadable.push((
                loc.url_of(&key),
                format!("says step {} but lies in {dir}", m.step),
            )),
            Err(e) => unreadable.push((loc.url_of(&key), e.to_string())),
        }
    }
    found.sort_by_key(|m| m.step);
    Ok((found, unreadable))
}

/// Deletes checkpoint `m`, manifest first: a half-deleted checkpoint is
/// then an incomplete one, which does not exist. Every other object in
/// its folder goes too (files an ended attempt wrote there and never saw
/// committed).
pub async fn delete(loc: &Location, root: &str, m: &Manifest) -> Result<()> {
    let dir = join(root, &step_dir(m.step));
    loc.delete(&join(&dir, "manifest.json")).await?;
    for s in &m.shards {
        loc.delete(&join(&dir, &s.key)).await?;
    }
    let inside = format!("{dir}/");
    for key in loc.list_in(&dir).await? {
        if key.starts_with(&inside) {
            loc.delete(&key).await?;
        }
    }
    Ok(())
}

/// Deletes every complete checkpoint older than the newest `keep`, except
/// the `pinned` steps (which do not count toward `keep`). Returns the
/// steps deleted.
pub async fn prune(loc: &Location, root: &str, keep: usize, pinned: &[u64]) -> Result<Vec<u64>> {
    let (found, _) = list(loc, root).await?;
    let found: Vec<&Manifest> = found.iter().filter(|m| !pinned.contains(&m.step)).collect();
    let old = found.len().saturating_sub(keep);
    let mut deleted = Vec::new();
    for m in &found[..old] {
        delete(loc, root, m).await?;
        deleted.push(m.step);
    }
    Ok(deleted)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_data_state_from_before_mixtures_reads_as_one_source_counting_steps() {
        let old = r#"{"dataset":"file:///d","fingerprint":9,"cursor":{"step":40,"epoch":2,"cycle":1,"used":[3,5],"rng":{"state":17}}}"#;
        let d: DataState = serde_json::from_str(old).unwrap();
        assert!(d.counts_steps);
        assert_eq!(d.sources[0].dataset, "file:///d");
        assert_eq!(d.sources[0].fingerprint, 9);
        assert_eq!(d.cursor.step, 40);
        assert_eq!(d.cursor.sources[0].used, [3, 5]);
        // This version's form goes both ways and never says it counts steps.
        let now = DataState {
            counts_steps: false,
            ..d
        };
        let text = serde_json::to_string(&now).unwrap();
        assert!(!text.contains("counts_steps"), "{text}");
        assert_eq!(serde_json::from_str::<DataState>(&text).unwrap(), now);
        assert!(serde_json::from_str::<DataState>(r#"{"sources":[],"cursor":{},"x":1}"#).is_err());
    }
    use crate::params::ParamTable;
    use proptest::prelude::*;
    use strata_recipe::{Coords, Layout};

    fn model() -> ModelConfig {
        ModelConfig {
            n_layers: 2,
            d_model: 16,
            n_heads: 2,
            n_kv_heads: 2,
            d_ffn: 32,
            vocab_size: 64,
            padded_vocab_size: 64,
            max_seq_len: 16,
            rope_theta: 10_000.0,
            tie_embeddings: false,
        }
    }

    /// A complete manifest of `model()` saved under tp = 2.
    fn complete() -> Manifest {
        let layout = Layout {
            tp: 2,
            pp: 1,
            dp: 1,
        };
        let shards = (0..2)
            .flat_map(|tp| {
                let t = ParamTable::new(&model(), layout, Coords { dp: 0, pp: 0, tp });
                describe_shards(&t, 1, 0)
            })
            .collect();
        Manifest {
            format: FORMAT.into(),
            version: VERSION,
            job: "j".into(),
            attempt: 1,
            step: 1,
            tokens_seen: 1,
            optimizer_steps: 1,
            layout: SavedLayout {
                tp: 2,
                pp: 1,
                dp: 1,
                virtual_stages: 1,
            },
            model: model(),
            recipe: String::new(),
            data: None,
            shards,
            written_at: 0,
        }
    }

    #[test]
    fn a_complete_manifest_passes_and_a_doubled_slice_does_not() {
        check_complete(&complete()).unwrap();
        // Rank 1's first slice replaced by rank 0's: the counts add up,
        // the tensor is not covered.
        let mut m = complete();
        let first = m.shards[0].tensors[0].clone();
        let same = m.shards[2]
            .tensors
            .iter_mut()
            .find(|t| t.name == first.name && t.kind == first.kind && t.slice != first.slice);
        let t = same.expect("rank 1 holds another slice of the first tensor");
        t.slice = first.slice.clone();
        let e = check_complete(&m).unwrap_err();
        assert!(e.to_string().contains("overlaps"), "{e}");
    }

    proptest! {
        /// A manifest whose model or slices say anything: an error or a
        /// pass, never a panic or an allocation sized by the claim.
        #[test]
        fn claimed_numbers_never_panic(field in 0usize..8, v in prop_oneof![Just(0u64), Just(u64::MAX), Just(1u64 << 40), any::<u64>(), 0u64..100]) {
            let mut m = complete();
            match field {
                0 => m.model.n_layers = v,
                1 => m.model.d_model = v,
                2 => m.model.n_heads = v,
                3 => m.model.n_kv_heads = v,
                4 => m.model.d_ffn = v,
                5 => m.model.padded_vocab_size = v,
                6 => m.shards[0].tensors[0].slice[0][1] = v as usize,
                _ => m.shards[1].tensors[0].full_shape[0] = v as usize,
            }
            let _ = check_complete(&m);
        }
    }
}
