//! Raw text in: finding documents in files and folders, and turning a corpus
//! into a dataset (`strata decompose`).
//!
//! Documents: a plain-text file is one document; a `.jsonl`/`.ndjson` file
//! holds one JSON object per line whose `text` field is a document. Inputs
//! are read in sorted path order, so document ids (and everything seeded by
//! them) do not depend on the file system's listing order. Tokenization runs
//! on all cores in batches; results keep input order.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rayon::prelude::*;
use serde::Serialize;

use crate::manifest::Manifest;
use crate::tokenize::Tokenizer;
use crate::writer::{DatasetWriter, WriteError};

/// Text read per tokenization batch.
const BATCH_BYTES: usize = 16 << 20;
/// Skipped documents listed by name in a summary (all are counted).
const MAX_LISTED_SKIPS: usize = 20;

#[derive(Debug, thiserror::Error)]
pub enum CorpusError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: Parquet input is not supported yet; convert it to JSONL with a `text` field")]
    Parquet { path: PathBuf },
    #[error("no documents found in {inputs}")]
    Empty { inputs: String },
    #[error(transparent)]
    Write(#[from] WriteError),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SourceKind {
    Text,
    Jsonl,
}

#[derive(Debug, Clone)]
struct Source {
    path: PathBuf,
    kind: SourceKind,
    bytes: u64,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CorpusError + '_ {
    move |source| CorpusError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn collect(path: &Path, out: &mut Vec<Source>) -> Result<(), CorpusError> {
    let meta = std::fs::metadata(path).map_err(io(path))?;
    if meta.is_dir() {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(io(path))?
            .map(|e| e.map(|e| e.path()))
            .collect::<Result<_, _>>()
            .map_err(io(path))?;
        entries.sort();
        for entry in entries {
            let hidden = entry
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with('.'));
            if !hidden {
                collect(&entry, out)?;
            }
        }
        return Ok(());
    }
    let ext = path
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    let kind = match ext.as_str() {
        "jsonl" | "ndjson" => SourceKind::Jsonl,
        "parquet" => {
            return Err(CorpusError::Parquet {
                path: path.to_path_buf(),
            });
        }
        _ => SourceKind::Text,
    };
    out.push(Source {
        path: path.to_path_buf(),
        kind,
        bytes: meta.len(),
    });
    Ok(())
}

/// A document as read: its text, or why it was skipped.
enum Doc {
    Text(String),
    Skipped(String),
}

fn read_source(src: &Source, docs: &mut Vec<Doc>) -> Result<(), CorpusError> {
    let bytes = std::fs::read(&src.path).map_err(io(&src.path))?;
    let name = src.path.display();
    match src.kind {
        SourceKind::Text => docs.push(match String::from_utf8(bytes) {
            Err(e) => Doc::Skipped(format!(
                "{name}: not UTF-8 (byte {})",
                e.utf8_error().valid_up_to()
            )),
            Ok(t) if t.trim().is_empty() => Doc::Skipped(format!("{name}: empty")),
            Ok(t) => Doc::Text(t),
        }),
        SourceKind::Jsonl => {
            for (i, line) in bytes.split(|&b| b == b'\n').enumerate() {
                let line_no = i + 1;
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                let doc = match std::str::from_utf8(line) {
                    Err(_) => Doc::Skipped(format!("{name}:{line_no}: not UTF-8")),
                    Ok(l) => match serde_json::from_str::<serde_json::Value>(l) {
                        Err(e) => Doc::Skipped(format!("{name}:{line_no}: not JSON ({e})")),
                        Ok(v) => match v.get("text").and_then(|t| t.as_str()) {
                            None => {
                                Doc::Skipped(format!("{name}:{line_no}: no string `text` field"))
                            }
                            Some(t) if t.trim().is_empty() => {
                                Doc::Skipped(format!("{name}:{line_no}: empty"))
                            }
                            Some(t) => Doc::Text(t.to_string()),
                        },
                    },
                };
                docs.push(doc);
            }
        }
    }
    Ok(())
}

/// How many documents `inputs` offer (a text file is one; each non-blank
/// line of a JSON-lines file is one), the unreadable ones included, as
/// [`decompose_corpus`] numbers them.
pub fn count_documents(inputs: &[PathBuf]) -> Result<u64, CorpusError> {
    let mut sources = Vec::new();
    for input in inputs {
        collect(input, &mut sources)?;
    }
    let mut n = 0u64;
    for src in &sources {
        n += match src.kind {
            SourceKind::Text => 1,
            SourceKind::Jsonl => {
                let bytes = std::fs::read(&src.path).map_err(io(&src.path))?;
                bytes
                    .split(|&b| b == b'\n')
                    .filter(|l| !l.iter().all(u8::is_ascii_whitespace))
                    .count() as u64
            }
        };
    }
    Ok(n)
}

/// What `strata decompose` did.
#[derive(Debug, Clone, Serialize)]
pub struct DecomposeSummary {
    pub manifest: Manifest,
    pub input_bytes: u64,
    /// Documents skipped, with why (the first few).
    pub skipped: Vec<String>,
    pub elapsed_s: f64,
    /// Wall time spent tokenizing (all threads busy).
    pub tokenize_s: f64,
    pub tokens_per_s: f64,
}

/// Progress of a running decompose, for a progress bar.
pub trait Progress: Sync {
    fn total_bytes(&self, _bytes: u64) {}
    fn advance(&self, _bytes: u64, _tokens: u64) {}
}

/// No progress reporting.
pub struct Quiet;
impl Progress for Quiet {}

/// Tokenizes every document under `inputs` and writes the dataset through
/// `writer`.
pub async fn decompose_corpus(
    inputs: &[PathBuf],
    tokenizer: Tokenizer,
    mut writer: DatasetWriter,
    progress: &dyn Progress,
) -> Result<DecomposeSummary, CorpusError> {
    let start = Instant::now();
    let mut sources = Vec::new();
    for input in inputs {
        collect(input, &mut sources)?;
    }
    if sources.is_empty() {
        return Err(CorpusError::Empty {
            inputs: inputs
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
        });
    }
    let input_bytes: u64 = sources.iter().map(|s| s.bytes).sum();
    progress.total_bytes(input_bytes);

    let mut skipped = Vec::new();
    let mut tokenize = Duration::ZERO;
    let mut next = 0;
    while next < sources.len() {
        // One batch of whole files, about BATCH_BYTES of text.
        let mut docs = Vec::new();
        let mut batch_bytes = 0u64;
        while next < sources.len() && (batch_bytes as usize) < BATCH_BYTES {
            read_source(&sources[next], &mut docs)?;
            batch_bytes += sources[next].bytes;
            next += 1;
        }
        let t0 = Instant::now();
        let tokenized: Vec<Option<Vec<u32>>> = docs
            .par_iter()
            .map(|d| match d {
                Doc::Text(t) => Some(tokenizer.encode_document(t)),
                Doc::Skipped(_) => None,
            })
            .collect();
        tokenize += t0.elapsed();
        let mut batch_tokens = 0u64;
        for (doc, tokens) in docs.iter().zip(tokenized) {
            match (doc, tokens) {
                (_, Some(tokens)) => {
                    batch_tokens += tokens.len() as u64;
                    writer.add_document(&tokens).await?;
                }
                (Doc::Skipped(why), None) => {
                    tracing::warn!(document = %why, "skipped document");
                    if skipped.len() < MAX_LISTED_SKIPS {
                        skipped.push(why.clone());
                    }
                    writer.skip_document();
                }
                (Doc::Text(_), None) => unreachable!("text is always tokenized"),
            }
        }
        progress.advance(batch_bytes, batch_tokens);
    }
    let manifest = writer.finish().await?;
    let elapsed = start.elapsed().as_secs_f64();
    Ok(DecomposeSummary {
        tokens_per_s: manifest.n_tokens_in as f64 / elapsed.max(1e-9),
        manifest,
        input_bytes,
        skipped,
        elapsed_s: elapsed,
        tokenize_s: tokenize.as_secs_f64(),
    })
}
