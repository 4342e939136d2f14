//! Writing a dataset: tokenized documents in, Arrow bucket shards and a
//! manifest out.
//!
//! Each bucket keeps a pool of sequences; a full pool is shuffled with a
//! seeded permutation and written as one Arrow IPC shard
//! `D{k:02}/part-{n:05}.arrow` (columns `tokens` FixedSizeList<UInt32> of
//! 2^k + 1, `doc_id` UInt64, `offset` UInt64). Partial pools are written at
//! the end: every sequence lands in a shard. `manifest.json` is written last,
//! so a dataset without one is incomplete; a new write first removes an
//! incomplete dataset's shards, and refuses to touch a complete one unless
//! told to replace it.

use std::collections::VecDeque;
use std::sync::Arc;

use arrow_array::{ArrayRef, FixedSizeListArray, RecordBatch, UInt32Array, UInt64Array};
use arrow_ipc::writer::FileWriter;
use arrow_schema::{DataType, Field, Schema};
use bytes::Bytes;
use tokio::task::JoinHandle;

use crate::decompose::{Buckets, decompose};
use crate::manifest::{
    BucketInfo, HoldoutInfo, Layout, MANIFEST_KEY, Manifest, SCHEMA_VERSION, ShardInfo,
    TokenizerInfo,
};
use crate::rng::SplitMix64;
use crate::store::{Location, StoreError};

/// A shard being shuffled, encoded and uploaded; it yields the shard's entry.
type ShardTask = JoinHandle<Result<ShardInfo, WriteError>>;

/// Shards encoded and written concurrently while the next ones are cut.
const MAX_UPLOADS_IN_FLIGHT: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(
        "{url} already holds a complete dataset ({MANIFEST_KEY}); pass --overwrite to replace it"
    )]
    Complete { url: String },
    #[error("{0}")]
    Options(String),
    #[error("encoding {key}: {source}")]
    Arrow {
        key: String,
        source: arrow_schema::ArrowError,
    },
    #[error("a shard task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
}

/// How a dataset is cut and stored.
#[derive(Debug, Clone)]
pub struct WriterOptions {
    /// Recorded in the manifest; see [`TokenizerInfo::of`].
    pub tokenizer: TokenizerInfo,
    pub layout: Layout,
    pub buckets: Buckets,
    pub seed: u64,
    /// Upper bound on a shard's size in bytes (at least one sequence each).
    pub shard_bytes: u64,
    /// Replace a complete dataset at the output.
    pub overwrite: bool,
}

/// The name of a bucket's folder: `D08` for 2^8.
pub fn bucket_dir(log2: u32) -> String {
    format!("D{log2:02}")
}

/// `tokens` as little-endian bytes.
fn bytemuck_u32_le(tokens: &[u32]) -> Vec<u8> {
    tokens.iter().flat_map(|t| t.to_le_bytes()).collect()
}

fn is_dataset_object(key: &str) -> bool {
    if key == HOLDOUT_KEY {
        return true;
    }
    let Some((dir, file)) = key.split_once('/') else {
        return false;
    };
    let dir_ok =
        dir.len() == 3 && dir.starts_with('D') && dir[1..].bytes().all(|b| b.is_ascii_digit());
    let file_ok = file.len() == "part-00000.arrow".len()
        && file.starts_with("part-")
        && file.ends_with(".arrow")
        && file[5..10].bytes().all(|b| b.is_ascii_digit());
    dir_ok && file_ok
}

struct Pool {
    log2: u32,
    row_len: usize,
    shard_rows: usize,
    tokens: Vec<u32>,
    doc_ids: Vec<u64>,
    offsets: Vec<u64>,
    /// Filled in as each shard's task finishes, in shard order.
    shards: Vec<Option<ShardInfo>>,
    n_sequences: u64,
}

impl Pool {
    fn rows(&self) -> usize {
        self.doc_ids.len()
    }

    /// Reserves room for a whole shard up to a few MiB at once, instead of
    /// growing (and copying) the buffers step by step.
    fn reserve_for_row(&mut self) {
        if self.tokens.capacity() == 0 {
            let rows = self.shard_rows.min((4 << 20) / self.row_len + 1);
            self.tokens.reserve(rows * self.row_len);
            self.doc_ids.reserve(rows);
            self.offsets.reserve(rows);
        }
    }
}

/// Writes one dataset. Feed documents in order with
/// [`DatasetWriter::add_document`], then [`DatasetWriter::finish`].
pub struct DatasetWriter {
    out: Location,
    opts: WriterOptions,
    pools: Vec<Pool>,
    /// Shards being shuffled, encoded and uploaded: (bucket, shard, task).
    pending: VecDeque<(usize, usize, ShardTask)>,
    /// Documents read, skipped ones included (the id the next one gets
    /// from [`DatasetWriter::add_document`]).
    n_documents: u64,
    /// Salts each shard's shuffle: a part of a decomposition spread over
    /// workers ([`DatasetWriter::as_part`]) shuffles its own way.
    shuffle_salt: u64,
    n_skipped: u64,
    n_tokens_in: u64,
    n_tokens_dropped: u64,
    /// Concat-and-chunk: the sequence being filled, and where it started.
    carry: Vec<u32>,
    carry_start: (u64, u64),
    /// Each document's chance of being held out, and the held-out
    /// documents' tokens and count.
    holdout_fraction: f64,
    /// Exactly this many of the corpus's documents held out: (still to
    /// choose, documents still to come), by selection sampling.
    holdout_select: Option<(u64, u64)>,
    holdout: Vec<u32>,
    holdout_docs: u64,
}

/// The held-out split's object.
pub const HOLDOUT_KEY: &str = "holdout/tokens.u32le";

/// Salts the per-document draw of the held-out split, so it is independent
/// of the draws that cut the same document into buckets.
const HOLDOUT_SALT: u64 = 0x686f_6c64_6f75_7421;

/// Readies `out` for a new dataset: refuses a complete one unless
/// `overwrite` (then its manifest goes first, so it is never half read),
/// and removes an incomplete one's shards (only strata's own
/// `Dkk/part-nnnnn.arrow` objects and held-out split; nothing else under
/// `out` is touched).
pub async fn prepare(out: &Location, overwrite: bool) -> Result<(), WriteError> {
    if out.exists(MANIFEST_KEY).await? {
        if !overwrite {
            return Err(WriteError::Complete {
                url: out.url().to_string(),
            });
        }
        out.delete(MANIFEST_KEY).await?;
    }
    for key in out.list().await? {
        if is_dataset_object(&key) {
            out.delete(&key).await?;
        }
    }
    Ok(())
}

impl DatasetWriter {
    /// Prepares `out`: refuses a complete dataset unless `overwrite`, and
    /// removes the shards of an incomplete one (only strata's own
    /// `Dkk/part-nnnnn.arrow` objects; nothing else under `out` is touched).
    pub async fn create(out: Location, opts: WriterOptions) -> Result<DatasetWriter, WriteError> {
        let seq_lens: Vec<u32> = match opts.layout {
            Layout::Decomposed { .. } => (opts.buckets.min_log2..=opts.buckets.max_log2).collect(),
            Layout::ConcatChunk { seq_len } => {
                if !seq_len.is_power_of_two() || seq_len > 1 << 30 {
                    return Err(WriteError::Options(format!(
                        "--concat-chunk {seq_len}: the length must be a power of two up to 2^30, like a bucket"
                    )));
                }
                vec![seq_len.trailing_zeros()]
            }
        };
        prepare(&out, opts.overwrite).await?;
        let pools = seq_lens
            .into_iter()
            .map(|log2| {
                let row_len = (1usize << log2) + 1;
                let row_bytes = row_len as u64 * 4 + 16;
                Pool {
                    log2,
                    row_len,
                    shard_rows: (opts.shard_bytes / row_bytes).max(1) as usize,
                    tokens: Vec::new(),
                    doc_ids: Vec::new(),
                    offsets: Vec::new(),
                    shards: Vec::new(),
                    n_sequences: 0,
                }
            })
            .collect();
        Ok(DatasetWriter {
            out,
            opts,
            pools,
            pending: VecDeque::new(),
            n_documents: 0,
            shuffle_salt: 0,
            n_skipped: 0,
            n_tokens_in: 0,
            n_tokens_dropped: 0,
            carry: Vec::new(),
            carry_start: (0, 0),
            holdout_fraction: 0.0,
            holdout_select: None,
            holdout: Vec::new(),
            holdout_docs: 0,
        })
    }

    /// Counts a document that was read but not kept (not UTF-8, empty): it
    /// takes a document id so ids match the input order.
    pub fn skip_document(&mut self) {
        self.skip_document_as(self.n_documents);
    }

    /// [`DatasetWriter::skip_document`] for the document of id `doc_id`.
    pub fn skip_document_as(&mut self, doc_id: u64) {
        // A skipped document chosen for the held-out split leaves it one
        // short; the manifest counts what was held out.
        self.held_out(doc_id);
        self.n_documents += 1;
        self.n_skipped += 1;
    }

    /// This dataset is part `part` of a decomposition spread over workers
    /// ([`crate::parts`]): its shards' shuffles are salted by it. Before
    /// the first document.
    pub fn as_part(&mut self, part: u32) {
        self.shuffle_salt = (u64::from(part) + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }

    /// Keeps exactly `n` of the corpus's `total` documents (whole, chosen
    /// by a draw seeded by the dataset's seed and each document's id) out
    /// of training. `total` counts every document the corpus will offer,
    /// skipped ones included. Before the first document.
    pub fn hold_out_documents(&mut self, n: u64, total: u64) -> Result<(), WriteError> {
        if n == 0 || n >= total {
            return Err(WriteError::Options(format!(
                "{n} held-out documents: hold out at least one and leave at least one for training (the corpus has {total})"
            )));
        }
        self.hold_out(n as f64 / total as f64)?;
        self.holdout_select = Some((n, total));
        Ok(())
    }

    /// Whether document `doc_id` (the next one) goes to the held-out split.
    fn held_out(&mut self, doc_id: u64) -> bool {
        if self.holdout_fraction <= 0.0 {
            return false;
        }
        let u = SplitMix64::for_key(self.opts.seed ^ HOLDOUT_SALT, doc_id).next_f64();
        match &mut self.holdout_select {
            // Knuth's selection sampling: exactly `need` of `left`.
            Some((need, left)) => {
                let pick = *left > 0 && u * (*left as f64) < *need as f64;
                *left = left.saturating_sub(1);
                if pick {
                    *need -= 1;
                }
                pick
            }
            None => u < self.holdout_fraction,
        }
    }

    /// Keeps each document out of training with chance `fraction` (a draw
    /// seeded by the dataset's seed and the document's id), into the
    /// held-out split. Before the first document.
    pub fn hold_out(&mut self, fraction: f64) -> Result<(), WriteError> {
        if !(0.0..1.0).contains(&fraction) {
            return Err(WriteError::Options(format!(
                "holdout fraction {fraction} must be at least 0 and below 1"
            )));
        }
        if self.n_documents > 0 {
            return Err(WriteError::Options(
                "the holdout fraction is set before the first document".into(),
            ));
        }
        self.holdout_fraction = fraction;
        Ok(())
    }

    /// Adds one tokenized document (end-of-text already appended); its id
    /// is its place among the documents added.
    pub async fn add_document(&mut self, tokens: &[u32]) -> Result<(), WriteError> {
        self.add_document_as(self.n_documents, tokens).await
    }

    /// Adds the document of id `doc_id` (every draw that cuts it, or holds
    /// it out, is seeded by the id, so a document is cut alike wherever it
    /// is written).
    pub async fn add_document_as(&mut self, doc_id: u64, tokens: &[u32]) -> Result<(), WriteError> {
        self.n_documents += 1;
        if self.held_out(doc_id) {
            self.holdout.extend_from_slice(tokens);
            self.holdout_docs += 1;
            return Ok(());
        }
        self.n_tokens_in += tokens.len() as u64;
        match self.opts.layout {
            Layout::Decomposed { split_long } => {
                let mut rng = SplitMix64::for_key(self.opts.seed, doc_id);
                let (pieces, dropped) =
                    decompose(tokens.len() as u64, self.opts.buckets, split_long, &mut rng);
                self.n_tokens_dropped += dropped;
                for piece in pieces {
                    let idx = (piece.log2 - self.opts.buckets.min_log2) as usize;
                    let start = piece.offset as usize;
                    let end = start + self.pools[idx].row_len;
                    self.push(idx, &tokens[start..end], doc_id, piece.offset)
                        .await?;
                }
            }
            Layout::ConcatChunk { .. } => {
                let row_len = self.pools[0].row_len;
                let mut pos = 0;
                while pos < tokens.len() {
                    if self.carry.is_empty() {
                        self.carry_start = (doc_id, pos as u64);
                    }
                    let take = (row_len - self.carry.len()).min(tokens.len() - pos);
                    self.carry.extend_from_slice(&tokens[pos..pos + take]);
                    pos += take;
                    if self.carry.len() == row_len {
                        let row = std::mem::take(&mut self.carry);
                        let (d, o) = self.carry_start;
                        self.push(0, &row, d, o).await?;
                    }
                }
            }
        }
        Ok(())
    }

    async fn push(
        &mut self,
        idx: usize,
        row: &[u32],
        doc_id: u64,
        offset: u64,
    ) -> Result<(), WriteError> {
        let pool = &mut self.pools[idx];
        pool.reserve_for_row();
        pool.tokens.extend_from_slice(row);
        pool.doc_ids.push(doc_id);
        pool.offsets.push(offset);
        if pool.rows() >= pool.shard_rows {
            self.flush(idx).await?;
        }
        Ok(())
    }

    /// Hands pool `idx` to a task that shuffles, encodes and uploads it as
    /// the bucket's next shard, so cutting documents goes on meanwhile.
    async fn flush(&mut self, idx: usize) -> Result<(), WriteError> {
        let seed = self.opts.seed ^ self.shuffle_salt;
        let pool = &mut self.pools[idx];
        let rows = pool.rows();
        if rows == 0 {
            return Ok(());
        }
        let shard_idx = pool.shards.len();
        pool.shards.push(None);
        pool.n_sequences += rows as u64;
        let key = format!("{}/part-{shard_idx:05}.arrow", bucket_dir(pool.log2));
        let rng = SplitMix64::for_key(seed, (u64::from(pool.log2) << 40) | shard_idx as u64);
        let rows_data = PoolRows {
            row_len: pool.row_len,
            tokens: std::mem::take(&mut pool.tokens),
            doc_ids: std::mem::take(&mut pool.doc_ids),
            offsets: std::mem::take(&mut pool.offsets),
        };
        while self.pending.len() >= MAX_UPLOADS_IN_FLIGHT {
            self.settle_oldest().await?;
        }
        let out = self.out.clone();
        let task = tokio::spawn(async move {
            let (key, bytes, info) = tokio::task::spawn_blocking(move || {
                let bytes = rows_data
                    .encode_shuffled(rng)
                    .map_err(|source| WriteError::Arrow {
                        key: key.clone(),
                        source,
                    })?;
                let info = ShardInfo {
                    key: key.clone(),
                    rows: rows as u64,
                    bytes: bytes.len() as u64,
                    crc32: crc32fast::hash(&bytes),
                };
                Ok::<_, WriteError>((key, bytes, info))
            })
            .await??;
            out.put(&key, Bytes::from(bytes)).await?;
            Ok(info)
        });
        self.pending.push_back((idx, shard_idx, task));
        Ok(())
    }

    async fn settle_oldest(&mut self) -> Result<(), WriteError> {
        if let Some((idx, shard_idx, task)) = self.pending.pop_front() {
            self.pools[idx].shards[shard_idx] = Some(task.await??);
        }
        Ok(())
    }

    /// Writes what is left in every pool, waits for every shard, then writes
    /// the manifest.
    pub async fn finish(mut self) -> Result<Manifest, WriteError> {
        self.n_tokens_dropped += self.carry.len() as u64;
        for idx in 0..self.pools.len() {
            self.flush(idx).await?;
        }
        while !self.pending.is_empty() {
            self.settle_oldest().await?;
        }
        let buckets = self
            .pools
            .iter()
            .map(|p| BucketInfo {
                seq_len: 1 << p.log2,
                log2: Some(p.log2),
                n_sequences: p.n_sequences,
                n_tokens: p.n_sequences * p.row_len as u64,
                shards: p.shards.iter().flatten().cloned().collect(),
            })
            .collect();
        let holdout = if self.holdout_fraction > 0.0 {
            let bytes = Bytes::from(bytemuck_u32_le(&self.holdout));
            let info = HoldoutInfo {
                fraction: self.holdout_fraction,
                n_documents: self.holdout_docs,
                n_tokens: self.holdout.len() as u64,
                key: HOLDOUT_KEY.into(),
                bytes: bytes.len() as u64,
                crc32: crc32fast::hash(&bytes),
            };
            self.out.put(HOLDOUT_KEY, bytes).await?;
            Some(info)
        } else {
            None
        };
        let (min_log2, max_log2) = match self.opts.layout {
            Layout::Decomposed { .. } => (self.opts.buckets.min_log2, self.opts.buckets.max_log2),
            Layout::ConcatChunk { seq_len } => (seq_len.trailing_zeros(), seq_len.trailing_zeros()),
        };
        let manifest = Manifest {
            schema_version: SCHEMA_VERSION,
            created_by: format!("strata {}", env!("CARGO_PKG_VERSION")),
            tokenizer: self.opts.tokenizer.clone(),
            layout: self.opts.layout,
            min_log2,
            max_log2,
            seed: self.opts.seed,
            buckets,
            n_documents: self.n_documents,
            n_documents_skipped: self.n_skipped,
            n_tokens_in: self.n_tokens_in,
            n_tokens_dropped: self.n_tokens_dropped,
            holdout,
        };
        let json = serde_json::to_vec_pretty(&manifest).expect("a manifest serialises");
        self.out.put(MANIFEST_KEY, Bytes::from(json)).await?;
        Ok(manifest)
    }
}

/// The Arrow schema of a bucket whose sequences hold `row_len` tokens.
pub fn shard_schema(row_len: usize) -> Schema {
    Schema::new(vec![
        Field::new(
            "tokens",
            DataType::FixedSizeList(
                Arc::new(Field::new("item", DataType::UInt32, false)),
                row_len as i32,
            ),
            false,
        ),
        Field::new("doc_id", DataType::UInt64, false),
        Field::new("offset", DataType::UInt64, false),
    ])
}

/// One pool's rows, moved out to be written as a shard.
struct PoolRows {
    row_len: usize,
    tokens: Vec<u32>,
    doc_ids: Vec<u64>,
    offsets: Vec<u64>,
}

impl PoolRows {
    /// Shuffles the rows with a seeded Fisher–Yates permutation and encodes
    /// them as one Arrow IPC file.
    fn encode_shuffled(self, mut rng: SplitMix64) -> Result<Vec<u8>, arrow_schema::ArrowError> {
        let n = self.row_len;
        let PoolRows {
            mut tokens,
            mut doc_ids,
            mut offsets,
            ..
        } = self;
        // Fisher–Yates on the rows in place: no second shard-sized buffer
        // to allocate and fault in.
        for i in (1..doc_ids.len()).rev() {
            let j = rng.below(i as u64 + 1) as usize;
            if j != i {
                let (head, tail) = tokens.split_at_mut(i * n);
                head[j * n..(j + 1) * n].swap_with_slice(&mut tail[..n]);
                doc_ids.swap(i, j);
                offsets.swap(i, j);
            }
        }
        let rows = doc_ids.len();
        let schema = Arc::new(shard_schema(n));
        let item = Arc::new(Field::new("item", DataType::UInt32, false));
        let list =
            FixedSizeListArray::try_new(item, n as i32, Arc::new(UInt32Array::from(tokens)), None)?;
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(list) as ArrayRef,
                Arc::new(UInt64Array::from(doc_ids)),
                Arc::new(UInt64Array::from(offsets)),
            ],
        )?;
        // Sized for the whole file (tokens, ids, offsets, schema, footer and
        // padding), so the buffer is never grown and copied.
        let capacity = rows * (n * 4 + 16) + (64 << 10);
        let mut writer = FileWriter::try_new(Vec::with_capacity(capacity), &schema)?;
        writer.write(&batch)?;
        writer.finish()?;
        writer.into_inner()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decompose::SplitLong;

    #[test]
    fn only_strata_objects_are_cleaned() {
        assert!(is_dataset_object("D08/part-00000.arrow"));
        assert!(is_dataset_object("D13/part-12345.arrow"));
        assert!(!is_dataset_object("manifest.json"));
        assert!(!is_dataset_object("notes/part-00000.arrow"));
        assert!(!is_dataset_object("D08/part-0.arrow"));
        assert!(!is_dataset_object("D08/other.arrow"));
    }

    #[test]
    fn split_long_is_in_the_layout() {
        let l = Layout::Decomposed {
            split_long: SplitLong::Random,
        };
        let json = serde_json::to_string(&l).unwrap();
        assert_eq!(json, r#"{"kind":"decomposed","split_long":"random"}"#);
    }
}
