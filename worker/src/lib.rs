//! A strata worker: one process per world rank.
//!
//! [`collective`]: the one trait every collective backend implements
//! (in-process and TCP; NCCL plugs in behind it) with ring algorithms built
//! on tagged point-to-point transfers, and the conformance suite every
//! backend must pass. [`params`]: the named parameter table (logical name,
//! full shape, split, this rank's slice). [`model`]: the rank's part of the
//! model behind the family seam ([`model::StageForward`]); the Llama
//! family's mathematics ([`model::llama`]) and its stage
//! ([`model::StageModel`]), Megatron tensor-parallel ([`tp`]: the f and g
//! operators, the vocabulary-parallel embedding and cross-entropy), cut
//! into autodiff segments at every collective ([`segment`]). [`tensors`]: host ↔ device
//! transfers, counted. [`pipeline`]: the 1F1B schedule. [`train`]: the step (1F1B,
//! data-parallel all-reduce, clipping, AdamW). [`run`]: a worker process.
//! [`checkpoint`]: sharded checkpoints on object storage, written in the
//! background and read back under any layout.
//! [`attention`]: blocked causal attention for the op-by-op (device)
//! backends.
//! [`cpu`]: the CPU backend's kernels (head, AdamW, SwiGLU, RMSNorm,
//! attention, projections).
//! [`bench`]: the single-rank training benchmark behind `strata bench
//! train`. [`cuda`] (feature `cuda`): finding the driver, NVRTC and
//! the GPU before burn's CUDA backend touches them. [`nccl`] (feature
//! `cuda`): NCCL collectives on burn's CUDA tensors.
//! A worker never learns how it was launched: it is handed a coordinator
//! address, a job and a rank.

pub mod attention;
pub mod bench;
pub mod checkpoint;
pub mod collective;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod export;
#[cfg(any(feature = "cuda", feature = "wgpu"))]
pub mod kernels;
pub mod model;
#[cfg(feature = "cuda")]
pub mod nccl;
/// The named parameter table lives beside the checkpoint format, so the
/// coordinator can judge a checkpoint's completeness without a worker.
pub use strata_dataplane::params;
pub mod peak;
pub mod pipeline;
pub mod run;
pub mod segment;
pub mod tensors;
pub mod tp;
pub mod train;
#[cfg(feature = "wgpu")]
pub mod wgpu;
