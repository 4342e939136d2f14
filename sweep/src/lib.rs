//! Scaling-law sweeps' pure parts: the results table ([`results`]) and
//! the fits with their intervals ([`fit`]).

pub mod fit;
pub mod results;
