//! Keeping what was acknowledged: the snapshot file format (checkpoints),
//! and, around it, the data directory and recovery.
//!
//! Formats are pure (bytes in, entries out; every file is untrusted input).

pub mod snapshot;
