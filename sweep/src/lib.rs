//! Scaling-law sweeps' pure parts: sweep files expanded into validated
//! jobs ([`spec`]), the results table ([`results`]) and the fits with
//! their intervals ([`fit`]).

pub mod fit;
pub mod results;
pub mod spec;
