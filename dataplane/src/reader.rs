//! Reading a dataset: its manifest, and shards verified against it.

use std::io::Cursor;

use arrow_array::cast::AsArray;
use arrow_array::types::{UInt32Type, UInt64Type};
use arrow_array::{Array, RecordBatch};
use arrow_ipc::reader::FileReader;
use arrow_schema::DataType;
use bytes::Bytes;

use crate::manifest::{MANIFEST_KEY, Manifest, SCHEMA_VERSION, ShardInfo};
use crate::store::{Location, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(
        "{url}: no manifest: the dataset is missing or incomplete (a decompose that did not finish)"
    )]
    NoManifest { url: String },
    #[error("{url}: corrupt manifest: {why}")]
    BadManifest { url: String, why: String },
    #[error("{url}: corrupt shard: {why}")]
    BadShard { url: String, why: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The held-out split's tokens (documents in order, end-of-text after
/// each), checked against the manifest's size and CRC-32; `None` when the
/// dataset has no held-out split.
pub async fn read_holdout(
    dataset: &Location,
    manifest: &Manifest,
) -> Result<Option<Vec<u32>>, ReadError> {
    let Some(h) = &manifest.holdout else {
        return Ok(None);
    };
    let bytes = dataset.get(&h.key).await?;
    verify_object(&bytes, h.bytes, h.crc32).map_err(|why| ReadError::BadShard {
        url: dataset.url_of(&h.key),
        why,
    })?;
    Ok(Some(
        bytes
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
    ))
}

/// Reads and checks `manifest.json` at `dataset`.
pub async fn read_manifest(dataset: &Location) -> Result<Manifest, ReadError> {
    let url = dataset.url_of(MANIFEST_KEY);
    let bytes = match dataset.get(MANIFEST_KEY).await {
        Ok(b) => b,
        Err(StoreError::NotFound { .. }) => {
            return Err(ReadError::NoManifest {
                url: dataset.url().to_string(),
            });
        }
        Err(e) => return Err(e.into()),
    };
    let manifest: Manifest =
        serde_json::from_slice(&bytes).map_err(|e| ReadError::BadManifest {
            url: url.clone(),
            why: e.to_string(),
        })?;
    if manifest.schema_version != SCHEMA_VERSION {
        return Err(ReadError::BadManifest {
            url,
            why: format!(
                "schema version {} (this strata reads {SCHEMA_VERSION})",
                manifest.schema_version
            ),
        });
    }
    for b in &manifest.buckets {
        let rows: u64 = b.shards.iter().map(|s| s.rows).sum();
        if rows != b.n_sequences {
            return Err(ReadError::BadManifest {
                url,
                why: format!(
                    "bucket of {} tokens lists {rows} rows in its shards but n_sequences = {}",
                    b.seq_len, b.n_sequences
                ),
            });
        }
    }
    Ok(manifest)
}

/// One shard's rows, decoded.
#[derive(Debug, Clone)]
pub struct Shard {
    /// Tokens per row (`seq_len + 1`).
    pub row_len: usize,
    pub tokens: arrow_buffer::ScalarBuffer<u32>,
    pub doc_ids: arrow_buffer::ScalarBuffer<u64>,
    pub offsets: arrow_buffer::ScalarBuffer<u64>,
}

impl Shard {
    pub fn rows(&self) -> usize {
        self.doc_ids.len()
    }

    pub fn row(&self, r: usize) -> &[u32] {
        &self.tokens[r * self.row_len..(r + 1) * self.row_len]
    }
}

/// Fetches a shard, checks its size and CRC against the manifest, and
/// decodes it.
pub async fn read_shard(
    dataset: &Location,
    info: &ShardInfo,
    row_len: usize,
) -> Result<Shard, ReadError> {
    let bytes = dataset.get(&info.key).await?;
    decode_shard(&dataset.url_of(&info.key), bytes, info, row_len)
}

/// Whether `bytes` are the object a manifest describes: its size, then
/// its CRC-32 (IEEE). The error says which and both values.
pub fn verify_object(bytes: &[u8], size: u64, crc32: u32) -> Result<(), String> {
    if bytes.len() as u64 != size {
        return Err(format!(
            "{} bytes, the manifest says {size} (truncated or rewritten)",
            bytes.len()
        ));
    }
    let crc = crc32fast::hash(bytes);
    if crc != crc32 {
        return Err(format!(
            "checksum (CRC-32) {crc:08x} does not match the manifest's {crc32:08x}"
        ));
    }
    Ok(())
}

/// Checks a fetched shard's size and CRC against the manifest and decodes
/// it (CPU work: callers on an async runtime run it on a blocking thread).
pub fn decode_shard(
    url: &str,
    bytes: Bytes,
    info: &ShardInfo,
    row_len: usize,
) -> Result<Shard, ReadError> {
    let bad = |why: String| ReadError::BadShard {
        url: url.to_string(),
        why,
    };
    verify_object(&bytes, info.bytes, info.crc32).map_err(bad)?;
    // Arrow's IPC reader can panic on a crafted file (a buffer claimed
    // past the end of the data): a shard with a matching checksum is still
    // outside input, so a panic there is this shard's error, not the
    // process's end.
    let read = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let reader =
            FileReader::try_new(Cursor::new(bytes), None).map_err(|e| bad(e.to_string()))?;
        reader
            .collect::<Result<Vec<RecordBatch>, _>>()
            .map_err(|e| bad(e.to_string()))
    }));
    let batches = match read {
        Ok(r) => r?,
        Err(p) => {
            let why = p
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| p.downcast_ref::<&str>().copied())
                .unwrap_or("the Arrow reader failed");
            return Err(bad(format!("not a readable Arrow file: {why}")));
        }
    };
    // strata writes one record batch per shard.
    let [batch] = batches.as_slice() else {
        return Err(bad(format!("{} record batches, expected 1", batches.len())));
    };
    let col = |name: &str| {
        batch
            .column_by_name(name)
            .cloned()
            .ok_or_else(|| bad(format!("no `{name}` column")))
    };
    let tokens = col("tokens")?;
    match tokens.data_type() {
        DataType::FixedSizeList(_, n) if *n as usize == row_len => {}
        other => {
            return Err(bad(format!(
                "`tokens` is {other}, expected FixedSizeList of {row_len}"
            )));
        }
    }
    let list = tokens.as_fixed_size_list();
    let values = list
        .values()
        .as_primitive_opt::<UInt32Type>()
        .ok_or_else(|| bad("`tokens` items are not UInt32".into()))?;
    let doc_ids = col("doc_id")?;
    let offsets = col("offset")?;
    let doc_ids = doc_ids
        .as_primitive_opt::<UInt64Type>()
        .ok_or_else(|| bad("`doc_id` is not UInt64".into()))?;
    let offsets = offsets
        .as_primitive_opt::<UInt64Type>()
        .ok_or_else(|| bad("`offset` is not UInt64".into()))?;
    if batch.num_rows() as u64 != info.rows {
        return Err(bad(format!(
            "{} rows, the manifest says {}",
            batch.num_rows(),
            info.rows
        )));
    }
    let start = list.offset() * row_len;
    Ok(Shard {
        row_len,
        tokens: values.values().slice(start, list.len() * row_len),
        doc_ids: doc_ids.values().clone(),
        offsets: offsets.values().clone(),
    })
}
