//! Keeping what was acknowledged: the snapshot (checkpoint) format, the
//! data directory, recovery at startup, and `-dump`.
//!
//! The snapshot format is pure (entries in, bytes out, and every file is
//! untrusted input); `datadir`, `recovery` and `dump` work with files and
//! run before the cores start or in a separate process. The log's records
//! are `state::record` (each core journals the changes it applies, to any
//! shard); each core writes its own log in `runtime::wal`.

pub mod datadir;
pub mod dir;
pub mod dump;
pub mod recovery;
pub mod snapshot;
