//! Scaling-law sweeps' pure parts: sweep files expanded into validated
//! jobs ([`spec`]), the results table ([`results`]), the fits with their
//! intervals ([`fit`]), and the report built from them ([`report`]: fits
//! as text and JSON, plots as SVG through [`chart`]).

pub mod chart;
pub mod fit;
pub mod format;
pub mod report;
pub mod results;
pub mod spec;
