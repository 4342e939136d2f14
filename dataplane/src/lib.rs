//! The dataplane: raw text → dataset-decomposition buckets → steps of
//! sequences for the workers.
//!
//! Today: [`decompose`], the split of one tokenized document into pieces for
//! the power-of-two buckets, and [`rng`], the seeded generator every random
//! choice of the dataplane uses. Tokenization, the Arrow writer on object
//! storage and the curriculum loader build on them. The dataplane knows
//! nothing of gRPC.

pub mod decompose;
pub mod rng;
