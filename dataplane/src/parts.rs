//! A decomposition spread over workers (`strata decompose --coordinator
//! URL --workers N`).
//!
//! The submitting side finds and checks the corpus, then cuts its files,
//! in reading order, into `N` contiguous runs of about equal bytes
//! ([`plan_parts`]): a [`DecomposeJob`]. Worker `i` decomposes part `i`
//! ([`run_part`]) into `OUTPUT/parts/pNNNNN/`, a complete dataset of its
//! own: `part.json` (what it is a part of) first, its shards, and its
//! `manifest.json` last, so a part is finished iff its manifest is there
//! and its `part.json` names this job. A worker started again (a new
//! attempt after another worker was lost) finds its part finished and
//! leaves it; an unfinished part is written again from its first file.
//! When every part is in, [`commit`] merges their manifests into the
//! dataset's `manifest.json`: each bucket lists every part's shards (keys
//! `parts/pNNNNN/Dkk/part-nnnnn.arrow`), the counts add up, and the parts'
//! held-out documents are joined, in order, into the dataset's one
//! held-out object.
//!
//! A document's id is a hash of its text ([`crate::corpus::doc_id`]), and
//! every draw that cuts or holds out a document is seeded by its id: the
//! dataset holds the same
//! sequences in each bucket (tokens, document id, offset), the same
//! counts and the same held-out tokens, byte for byte, as a one-process
//! decomposition with the same seed. What differs is how a bucket's
//! sequences fall into shards and their order in them (each part fills
//! and shuffles its own shards), hence the shard list, the manifest's
//! fingerprint and the order a loader reads sequences in.
//!
//! Not spread: the concat-and-chunk baseline (a sequence runs across
//! documents, hence across parts) and an exact held-out count (a draw in
//! sequence over the whole corpus); a fraction is spread.

use std::str::FromStr;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::corpus::{Corpus, CorpusError, CorpusFile, CorpusOptions, DecomposeSummary, Progress};
use crate::decompose::{Buckets, SplitLong};
use crate::manifest::{
    BucketInfo, HoldoutInfo, Layout, MANIFEST_KEY, Manifest, ShardInfo, TokenizerInfo,
};
use crate::reader::{ReadError, read_manifest, verify_object};
use crate::store::{Location, StoreError, StoreOptions};
use crate::tokenize::TokenizerSpec;
use crate::writer::{self, DatasetWriter, HOLDOUT_KEY, WriteError, WriterOptions};

/// Where the parts are, under the dataset.
pub const PARTS_DIR: &str = "parts";
/// A part's record of what it is a part of, written before its shards.
pub const PART_KEY: &str = "part.json";

#[derive(Debug, thiserror::Error)]
pub enum PartsError {
    /// The job's description is not valid; names the field.
    #[error("{0}")]
    Invalid(String),
    #[error("{url}: {why}")]
    Part { url: String, why: String },
    #[error(transparent)]
    Corpus(#[from] CorpusError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Read(#[from] ReadError),
    #[error(transparent)]
    Write(#[from] WriteError),
}

/// The corpus a job was planned over: its files' count, bytes and
/// [`Corpus::fingerprint`], checked again by every worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CorpusPlan {
    pub files: u64,
    pub bytes: u64,
    pub fingerprint: u32,
}

impl CorpusPlan {
    /// What `corpus` is now.
    pub fn of(corpus: &Corpus) -> CorpusPlan {
        CorpusPlan {
            files: corpus.files().len() as u64,
            bytes: corpus.bytes(),
            fingerprint: corpus.fingerprint(),
        }
    }
}

/// One worker's share: `files` files from `first_file` on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartPlan {
    pub first_file: u64,
    pub files: u64,
    pub bytes: u64,
}

/// A decomposition spread over workers: `strata decompose`'s settings and
/// the parts. Travels as JSON (the job's spec).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecomposeJob {
    pub name: String,
    /// Local paths (as the workers see them) or object-storage URLs.
    pub inputs: Vec<String>,
    pub text_field: String,
    /// The split read from folders of several (`--split`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub split: Option<String>,
    pub output: String,
    /// `r50k`, `cl100k`, `o200k`, or the path of a `tokenizer.json`.
    pub tokenizer: String,
    pub buckets: Buckets,
    pub split_long: SplitLong,
    pub seed: u64,
    pub shard_bytes: u64,
    /// Each document's chance of being held out (0: none).
    pub holdout_fraction: f64,
    /// Attempts after a lost worker, as a recipe's `[fault] max_restarts`.
    pub max_restarts: u32,
    pub corpus: CorpusPlan,
    pub parts: Vec<PartPlan>,
}

impl DecomposeJob {
    /// Parses and checks a job's spec, naming the field at fault.
    pub fn parse(text: &str) -> Result<DecomposeJob, PartsError> {
        let job: DecomposeJob = serde_json::from_str(text)
            .map_err(|e| PartsError::Invalid(format!("decompose job: {e}")))?;
        job.check()?;
        Ok(job)
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a decompose job serializes")
    }

    fn check(&self) -> Result<(), PartsError> {
        let bad = |m: String| Err(PartsError::Invalid(m));
        if self.name.trim().is_empty() {
            return bad("name: empty".into());
        }
        if self.inputs.is_empty() {
            return bad("inputs: none".into());
        }
        Buckets::new(self.buckets.min_log2, self.buckets.max_log2)
            .map_err(|e| PartsError::Invalid(format!("buckets: {e}")))?;
        TokenizerSpec::from_str(&self.tokenizer)
            .map_err(|e| PartsError::Invalid(format!("tokenizer: {e}")))?;
        if !(0.0..1.0).contains(&self.holdout_fraction) {
            return bad(format!(
                "holdout_fraction: {} must be at least 0 and below 1",
                self.holdout_fraction
            ));
        }
        if self.shard_bytes == 0 {
            return bad("shard_bytes: must be positive".into());
        }
        if self.parts.is_empty() {
            return bad("parts: none (at least one worker)".into());
        }
        let mut next = 0;
        for (i, p) in self.parts.iter().enumerate() {
            if p.first_file != next || p.files == 0 {
                return bad(format!(
                    "parts[{i}]: files {}..{} do not follow the previous part (file {next} next) or are empty",
                    p.first_file,
                    p.first_file + p.files
                ));
            }
            next += p.files;
        }
        if next != self.corpus.files {
            return bad(format!(
                "parts: they cover {next} files; the corpus has {}",
                self.corpus.files
            ));
        }
        Ok(())
    }

    /// CRC-32 of what the parts' contents depend on (not the attempts
    /// allowed): a part written for another job is not one of this one.
    pub fn fingerprint(&self) -> u32 {
        let mut what = self.clone();
        what.max_restarts = 0;
        crc32fast::hash(what.to_json().as_bytes())
    }

    /// The dataset's location.
    pub fn output(&self) -> Result<Location, StoreError> {
        Location::parse(&self.output, true)
    }

    fn writer_options(&self, tokenizer: TokenizerInfo) -> WriterOptions {
        WriterOptions {
            tokenizer,
            layout: Layout::Decomposed {
                split_long: self.split_long,
            },
            buckets: self.buckets,
            seed: self.seed,
            shard_bytes: self.shard_bytes,
            // A part left by another job, or half written, is replaced.
            overwrite: true,
        }
    }
}

/// Cuts `files` (in reading order) into `workers` contiguous runs of
/// about equal bytes, each at least one file.
pub fn plan_parts(files: &[CorpusFile], workers: u32) -> Result<Vec<PartPlan>, PartsError> {
    let n = workers as usize;
    if n == 0 {
        return Err(PartsError::Invalid("--workers: at least one".into()));
    }
    if n > files.len() {
        return Err(PartsError::Invalid(format!(
            "--workers {n}: the corpus has {} file{}, and a worker reads whole files; use at most {}",
            files.len(),
            if files.len() == 1 { "" } else { "s" },
            files.len()
        )));
    }
    let mut prefix = Vec::with_capacity(files.len() + 1);
    prefix.push(0u64);
    for f in files {
        prefix.push(prefix.last().copied().unwrap_or(0) + f.bytes);
    }
    let total = prefix[files.len()];
    let mut cuts = vec![0usize];
    for k in 1..n {
        let target = (u128::from(total) * k as u128 / n as u128) as u64;
        let lo = cuts[cuts.len() - 1] + 1;
        let hi = files.len() - (n - k);
        let mut i = lo;
        while i < hi && prefix[i] < target {
            i += 1;
        }
        // The nearer of the cuts either side of the target.
        if i > lo && target - prefix[i - 1] < prefix[i].saturating_sub(target) {
            i -= 1;
        }
        cuts.push(i);
    }
    cuts.push(files.len());
    Ok(cuts
        .windows(2)
        .map(|w| PartPlan {
            first_file: w[0] as u64,
            files: (w[1] - w[0]) as u64,
            bytes: prefix[w[1]] - prefix[w[0]],
        })
        .collect())
}

/// Readies a cluster decomposition's output as [`writer::prepare`] does a
/// dataset's; with `overwrite`, the parts of earlier runs go too (every
/// part is written again), while without it a finished part of this same
/// job, from an earlier submission, is kept.
pub async fn prepare(out: &Location, overwrite: bool) -> Result<(), PartsError> {
    writer::prepare(out, overwrite).await?;
    if overwrite {
        for key in out.list_in(PARTS_DIR).await? {
            out.delete(&key).await?;
        }
    }
    Ok(())
}

/// Part `part`'s folder under the dataset, and the prefix of its keys in
/// the dataset's manifest.
pub fn part_dir(part: usize) -> String {
    format!("{PARTS_DIR}/p{part:05}")
}

/// What a part's `part.json` records.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartRecord {
    /// [`DecomposeJob::fingerprint`] of the job it belongs to.
    pub job: u32,
    pub part: u32,
    pub first_file: u64,
    pub files: u64,
    /// The attempt that wrote it.
    pub attempt: u32,
}

/// What a worker did with its part.
#[derive(Debug, Clone)]
pub enum PartOutcome {
    /// Finished by an earlier attempt: left as it was.
    AlreadyDone {
        manifest: Box<Manifest>,
        attempt: u32,
    },
    Written(Box<DecomposeSummary>),
}

/// Part `part`'s record, when it is finished for the job whose
/// [`DecomposeJob::fingerprint`] is `job`.
async fn finished(
    job: u32,
    at: &Location,
    part: usize,
) -> Result<Option<(PartRecord, Manifest)>, PartsError> {
    let record = match at.get(PART_KEY).await {
        Ok(b) => b,
        Err(StoreError::NotFound { .. }) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let Ok(record) = serde_json::from_slice::<PartRecord>(&record) else {
        return Ok(None);
    };
    if record.job != job || record.part as usize != part {
        return Ok(None);
    }
    if !at.exists(MANIFEST_KEY).await? {
        return Ok(None);
    }
    Ok(Some((record, read_manifest(at).await?)))
}

/// Decomposes part `part` of `job` (unless an earlier attempt finished
/// it): the corpus is found again and checked against the plan, then the
/// part's files are decomposed into its folder.
pub async fn run_part(
    job: &DecomposeJob,
    part: usize,
    attempt: u32,
    progress: &dyn Progress,
) -> Result<PartOutcome, PartsError> {
    let plan = *job.parts.get(part).ok_or_else(|| {
        PartsError::Invalid(format!(
            "part {part}: the job has {} parts",
            job.parts.len()
        ))
    })?;
    let at = job.output()?.child(&part_dir(part))?;
    let fingerprint = job.fingerprint();
    if let Some((record, manifest)) = finished(fingerprint, &at, part).await? {
        return Ok(PartOutcome::AlreadyDone {
            manifest: Box::new(manifest),
            attempt: record.attempt,
        });
    }
    let tokenizer = TokenizerSpec::from_str(&job.tokenizer)
        .map_err(|e| PartsError::Invalid(format!("tokenizer: {e}")))?
        .load()
        .map_err(|e| PartsError::Invalid(format!("tokenizer: {e}")))?;
    let options = CorpusOptions {
        text_field: job.text_field.clone(),
        split: job.split.clone(),
        ..CorpusOptions::default()
    };
    let corpus = Corpus::open_named(&job.inputs, &StoreOptions::from_env(), options).await?;
    let seen = CorpusPlan::of(&corpus);
    if seen != job.corpus {
        return Err(PartsError::Invalid(format!(
            "{}: the corpus changed since the job was planned ({} files, {} bytes then; {} files, {} bytes now)",
            job.inputs.join(", "),
            job.corpus.files,
            job.corpus.bytes,
            seen.files,
            seen.bytes
        )));
    }
    let mine = corpus.part(plan.first_file as usize, plan.files as usize);
    let mut writer = DatasetWriter::create(
        at.clone(),
        job.writer_options(TokenizerInfo::of(&tokenizer)),
    )
    .await?;
    writer.as_part(part as u32);
    writer.hold_out(job.holdout_fraction)?;
    let record = PartRecord {
        job: fingerprint,
        part: part as u32,
        first_file: plan.first_file,
        files: plan.files,
        attempt,
    };
    let json = serde_json::to_vec_pretty(&record).expect("a part record serializes");
    at.put(PART_KEY, Bytes::from(json)).await?;
    let summary = mine.decompose(tokenizer, writer, progress).await?;
    Ok(PartOutcome::Written(Box::new(summary)))
}

/// One manifest from the parts' (in part order): every bucket lists each
/// part's shards under its folder, the counts add up; the held-out split
/// is the parts' joined (`holdout`: its object's size and CRC-32).
pub fn merge(parts: &[Manifest], holdout: Option<(u64, u32)>) -> Result<Manifest, PartsError> {
    let first = parts
        .first()
        .ok_or_else(|| PartsError::Invalid("no parts to merge".into()))?;
    let mut merged = first.clone();
    merged.created_by = format!("strata {}", env!("CARGO_PKG_VERSION"));
    for b in &mut merged.buckets {
        b.n_sequences = 0;
        b.n_tokens = 0;
        b.shards.clear();
    }
    merged.n_documents = 0;
    merged.n_documents_skipped = 0;
    merged.n_tokens_in = 0;
    merged.n_tokens_dropped = 0;
    let mut held = first.holdout.clone().map(|mut h| {
        h.n_documents = 0;
        h.n_tokens = 0;
        h
    });
    for (i, m) in parts.iter().enumerate() {
        let same = m.tokenizer == first.tokenizer
            && m.layout == first.layout
            && m.min_log2 == first.min_log2
            && m.max_log2 == first.max_log2
            && m.seed == first.seed
            && m.holdout.is_some() == first.holdout.is_some()
            && m.buckets.len() == first.buckets.len();
        if !same {
            return Err(PartsError::Invalid(format!(
                "part {i} was cut otherwise than part 0 (tokenizer, layout, buckets, seed or held-out split)"
            )));
        }
        let prefix = part_dir(i);
        for (into, b) in merged.buckets.iter_mut().zip(&m.buckets) {
            merge_bucket(into, b, &prefix);
        }
        merged.n_documents += m.n_documents;
        merged.n_documents_skipped += m.n_documents_skipped;
        merged.n_tokens_in += m.n_tokens_in;
        merged.n_tokens_dropped += m.n_tokens_dropped;
        if let (Some(h), Some(p)) = (&mut held, &m.holdout) {
            h.n_documents += p.n_documents;
            h.n_tokens += p.n_tokens;
        }
    }
    merged.holdout = match (held, holdout) {
        (Some(h), Some((bytes, crc32))) => Some(HoldoutInfo {
            key: HOLDOUT_KEY.into(),
            bytes,
            crc32,
            ..h
        }),
        (None, None) => None,
        _ => {
            return Err(PartsError::Invalid(
                "the held-out split's object and the parts disagree".into(),
            ));
        }
    };
    Ok(merged)
}

fn merge_bucket(into: &mut BucketInfo, part: &BucketInfo, prefix: &str) {
    into.n_sequences += part.n_sequences;
    into.n_tokens += part.n_tokens;
    into.shards.extend(part.shards.iter().map(|s| ShardInfo {
        key: format!("{prefix}/{}", s.key),
        ..s.clone()
    }));
}

/// Writes the dataset's manifest from its finished parts (each checked to
/// be this job's), joining their held-out documents first. A part not
/// finished is an error naming it; nothing is written then.
pub async fn commit(job: &DecomposeJob) -> Result<Manifest, PartsError> {
    let out = job.output()?;
    let fingerprint = job.fingerprint();
    let mut manifests = Vec::with_capacity(job.parts.len());
    for part in 0..job.parts.len() {
        let at = out.child(&part_dir(part))?;
        let Some((_, m)) = finished(fingerprint, &at, part).await? else {
            return Err(PartsError::Part {
                url: at.url().to_string(),
                why: format!("part {part} is not finished (no manifest of this job)"),
            });
        };
        manifests.push(m);
    }
    let holdout = if job.holdout_fraction > 0.0 {
        let mut joined = Vec::new();
        for (part, m) in manifests.iter().enumerate() {
            let at = out.child(&part_dir(part))?;
            let h = m.holdout.as_ref().ok_or_else(|| PartsError::Part {
                url: at.url().to_string(),
                why: "no held-out split".into(),
            })?;
            let bytes = at.get(&h.key).await?;
            verify_object(&bytes, h.bytes, h.crc32).map_err(|why| PartsError::Part {
                url: at.url_of(&h.key),
                why,
            })?;
            joined.extend_from_slice(&bytes);
        }
        let info = (joined.len() as u64, crc32fast::hash(&joined));
        out.put(HOLDOUT_KEY, Bytes::from(joined)).await?;
        Some(info)
    } else {
        None
    };
    let manifest = merge(&manifests, holdout)?;
    let json = serde_json::to_vec_pretty(&manifest).expect("a manifest serializes");
    out.put(MANIFEST_KEY, Bytes::from(json)).await?;
    Ok(manifest)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(sizes: &[u64]) -> Vec<CorpusFile> {
        sizes
            .iter()
            .enumerate()
            .map(|(i, &bytes)| CorpusFile {
                name: format!("f{i}"),
                bytes,
            })
            .collect()
    }

    #[test]
    fn parts_are_contiguous_runs_of_about_equal_bytes() {
        let f = files(&[10, 10, 10, 10, 10, 10, 10, 10]);
        let p = plan_parts(&f, 4).unwrap();
        assert_eq!(
            p.iter()
                .map(|p| (p.first_file, p.files))
                .collect::<Vec<_>>(),
            [(0, 2), (2, 2), (4, 2), (6, 2)]
        );
        // One big file takes a part to itself; every part has a file.
        let p = plan_parts(&files(&[100, 1, 1, 1]), 3).unwrap();
        assert_eq!(
            p.iter().map(|p| p.files).collect::<Vec<_>>(),
            [1, 1, 2],
            "{p:?}"
        );
        assert_eq!(p.iter().map(|p| p.bytes).sum::<u64>(), 103);
        let p = plan_parts(&files(&[5; 7]), 7).unwrap();
        assert!(p.iter().all(|p| p.files == 1));
        let err = plan_parts(&files(&[5; 3]), 4).unwrap_err().to_string();
        assert!(
            err.contains("--workers 4") && err.contains("3 files"),
            "{err}"
        );
        assert!(plan_parts(&files(&[5; 3]), 0).is_err());
    }

    #[test]
    fn a_job_whose_parts_leave_a_gap_is_refused_naming_it() {
        let job = DecomposeJob {
            name: "d".into(),
            inputs: vec!["/c".into()],
            text_field: "text".into(),
            split: None,
            output: "/o".into(),
            tokenizer: "r50k".into(),
            buckets: Buckets::new(4, 6).unwrap(),
            split_long: SplitLong::Largest,
            seed: 1,
            shard_bytes: 1 << 20,
            holdout_fraction: 0.0,
            max_restarts: 1,
            corpus: CorpusPlan {
                files: 4,
                bytes: 40,
                fingerprint: 1,
            },
            parts: plan_parts(&files(&[10; 4]), 2).unwrap(),
        };
        assert_eq!(DecomposeJob::parse(&job.to_json()).unwrap(), job);
        let mut gap = job.clone();
        gap.parts[1].first_file += 1;
        let err = DecomposeJob::parse(&gap.to_json()).unwrap_err().to_string();
        assert!(err.starts_with("parts[1]"), "{err}");
        let mut bad = job.clone();
        bad.tokenizer = "nope".into();
        let err = DecomposeJob::parse(&bad.to_json()).unwrap_err().to_string();
        assert!(err.starts_with("tokenizer"), "{err}");
        let err = DecomposeJob::parse(r#"{"name": "d", "extra": 1}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("extra") || err.contains("unknown"), "{err}");
        // The attempts allowed do not change what a part is.
        let mut more = job.clone();
        more.max_restarts = 9;
        assert_eq!(more.fingerprint(), job.fingerprint());
        gap.seed = 2;
        assert_ne!(gap.fingerprint(), job.fingerprint());
    }
}
