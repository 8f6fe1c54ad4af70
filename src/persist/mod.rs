//! Keeping what was acknowledged: the write-ahead log's records, the
//! snapshot (checkpoint) format, the data directory, recovery at startup,
//! and `-dump`.
//!
//! Formats (`record`, `snapshot`) are pure: bytes in, entries out, and
//! every file is untrusted input. `datadir`, `recovery` and `dump` work
//! with files and run before the cores start or in a separate process; the
//! log is written by each core's own task in `runtime::wal`.

pub mod datadir;
pub mod dump;
pub mod record;
pub mod recovery;
pub mod snapshot;
