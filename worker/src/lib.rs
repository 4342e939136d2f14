//! A strata worker: one process per world rank.
//!
//! Today: [`collective`], the one trait every collective backend implements
//! (in-process now; TCP and NCCL plug in behind it) with ring algorithms built
//! on point-to-point transfers, and the conformance suite every backend must
//! pass. The model shard, the 1F1B pipeline schedule, the optimizer and
//! checkpoints build on it. A worker never learns how it was launched: it is
//! handed a coordinator address, a job and a rank.

pub mod collective;
pub mod model;
pub mod run;
pub mod train;
