//! The dataplane: raw text → dataset-decomposition buckets on object storage
//! → steps of sequences for the workers.
//!
//! - [`checkpoint`]: the checkpoint format: manifests, their completeness,
//!   listing, pruning.
//! - [`family`]: model families (Llama today): their logical parameters,
//!   Hugging Face names and FLOPs per token.
//! - [`params`]: the named parameter table (logical name, full shape, split,
//!   a rank's slice) that sharding, checkpoints and export read.
//! - [`memory`]: each rank's bytes at its step's peak, from the table and
//!   the schedule (the memory plan).
//! - [`corpus`] finds documents in files and folders and runs a decompose;
//!   [`formats`] reads them out of text, JSON lines (plain, gzip, zstd),
//!   Parquet and Arrow IPC files; [`splits`] says which split (train,
//!   validation, test) each file of a folder holds, as Hugging Face
//!   `datasets` does.
//! - [`parts`]: a decomposition spread over workers: the plan of parts,
//!   one part's decompose, and the manifest merged from theirs.
//! - [`tokenize`]: offline tiktoken BPEs; [`hf_tokenizer`] writes them as
//!   Hugging Face `tokenizer.json` files for exports.
//! - [`decompose`]: one document into power-of-two pieces.
//! - [`writer`]: Arrow bucket shards and the manifest, written last.
//! - [`loader`]: the curriculum, and each rank's share of each step.
//! - [`reader`]: the manifest and checksummed shards.
//! - [`store`]: object storage by URL (local files, S3).
//! - [`rng`]: the seeded generator every random choice uses.
//!
//! The dataplane knows nothing of gRPC.

mod bpe;
pub mod checkpoint;
pub mod corpus;
pub mod decompose;
pub mod family;
pub mod formats;
pub mod hf_model;
pub mod hf_tokenizer;
pub mod loader;
pub mod manifest;
pub mod memory;
pub mod params;
pub mod parts;
pub mod reader;
pub mod rng;
pub mod splits;
pub mod store;
pub mod tokenize;
pub mod writer;
