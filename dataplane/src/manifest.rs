//! `manifest.json`: what a complete dataset holds. It is written last; a
//! dataset without one is incomplete and never read.

use serde::{Deserialize, Serialize};

use crate::decompose::SplitLong;
use crate::tokenize::Tokenizer;

pub const MANIFEST_KEY: &str = "manifest.json";
pub const SCHEMA_VERSION: u32 = 1;

/// How sequences were cut from documents.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Layout {
    /// Dataset decomposition: power-of-two buckets from `min_log2` to `max_log2`.
    Decomposed { split_long: SplitLong },
    /// The concat-and-chunk baseline: documents concatenated and cut into
    /// pieces of `seq_len + 1` tokens, one bucket.
    ConcatChunk { seq_len: u64 },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenizerInfo {
    /// `r50k`, `cl100k`, `o200k`, or `hf:<path of tokenizer.json>`.
    pub name: String,
    pub vocab_size: u32,
    pub eot_id: u32,
}

impl TokenizerInfo {
    pub fn of(tokenizer: &Tokenizer) -> TokenizerInfo {
        TokenizerInfo {
            name: tokenizer.name().to_string(),
            vocab_size: tokenizer.vocab_size(),
            eot_id: tokenizer.eot_id(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardInfo {
    /// Key relative to the dataset, e.g. `D09/part-00003.arrow`.
    pub key: String,
    pub rows: u64,
    pub bytes: u64,
    /// CRC-32 (IEEE) of the object's bytes.
    pub crc32: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BucketInfo {
    /// Sequences hold `seq_len + 1` tokens: inputs and targets are `seq_len` long.
    pub seq_len: u64,
    /// `log2(seq_len)` for decomposed buckets; absent for a concat-and-chunk
    /// length that is not a power of two.
    pub log2: Option<u32>,
    pub n_sequences: u64,
    /// Tokens stored: `n_sequences · (seq_len + 1)`.
    pub n_tokens: u64,
    pub shards: Vec<ShardInfo>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub schema_version: u32,
    pub created_by: String,
    pub tokenizer: TokenizerInfo,
    pub layout: Layout,
    pub min_log2: u32,
    pub max_log2: u32,
    pub seed: u64,
    pub buckets: Vec<BucketInfo>,
    /// Documents read (each gets an id, skipped ones included).
    pub n_documents: u64,
    /// Documents skipped: not UTF-8, or empty.
    pub n_documents_skipped: u64,
    /// Tokens of the kept documents, end-of-text tokens included.
    pub n_tokens_in: u64,
    /// Tokens left over below the smallest bucket. Always
    /// `n_tokens_in = Σ bucket.n_tokens + n_tokens_dropped`.
    pub n_tokens_dropped: u64,
    /// Whole documents kept out of training, for evaluation; absent when
    /// none were (and then absent from the JSON, so older datasets keep
    /// their fingerprints).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub holdout: Option<HoldoutInfo>,
}

/// The held-out split: whole documents, chosen by a seeded draw per
/// document, never cut into buckets. Their tokens (end-of-text included)
/// are one stream of little-endian u32 in `key`, documents in order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HoldoutInfo {
    /// Each document's chance of being held out.
    pub fraction: f64,
    pub n_documents: u64,
    pub n_tokens: u64,
    pub key: String,
    pub bytes: u64,
    pub crc32: u32,
}

/// The fraction is validated to lie in [0, 1): never NaN.
impl Eq for HoldoutInfo {}

impl Manifest {
    /// CRC-32 of the manifest's JSON: equal for two copies of a dataset
    /// (the JSON lists every shard's own CRC-32), different for another
    /// decomposition. A checkpoint records it, so that a resumed loader
    /// cursor is only ever applied to the data it counted.
    pub fn fingerprint(&self) -> u32 {
        crc32fast::hash(&serde_json::to_vec(self).expect("a manifest serializes"))
    }

    pub fn bucket(&self, seq_len: u64) -> Option<&BucketInfo> {
        self.buckets.iter().find(|b| b.seq_len == seq_len)
    }
}
