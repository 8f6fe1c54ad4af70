//! Prometheus metrics: `stats` is what the data cores count (per-core,
//! single-writer, no locks); `exporter` folds those counts into the
//! `metrics` recorder and serves them on the admin address, off the data
//! cores.

pub mod exporter;
pub mod stats;
