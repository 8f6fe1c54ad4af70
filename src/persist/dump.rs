//! `rendezvous -dump DIR`: the store a data directory holds (snapshot plus
//! log), printed as JSON lines, without disturbing a server that owns it.
//!
//! Nothing is written and no lock is taken: recovery runs read-only, and a
//! segment still being appended simply ends early. If a checkpoint deletes
//! a segment while it is being read, the dump starts over. Each line is one
//! live key: `key` and `value` as JSON strings when they are UTF-8 (else
//! `key_hex` / `value_hex`), `expires_ms`, `version`, `owned` (whether an
//! owner secret protects it) and `creator` (the client that last stored
//! it, whose key quotas it counts against: an IPv4 address or an IPv6 /64;
//! `unknown` for keys stored before creators were kept). The secret hash
//! is never printed.

use crate::logging::json_string;
use crate::persist::recovery::{self, Mode, RecoveryError};
use crate::state::net;
use crate::state::shard::{Entry, KeyBudget, Shard};
use std::io::{self, Write};
use std::path::Path;

/// Why a dump failed.
#[derive(Debug)]
pub enum DumpError {
    Missing(std::path::PathBuf),
    Recovery(RecoveryError),
    /// Checkpoints kept replacing the snapshot while it was read.
    Unsettled(std::path::PathBuf),
    Output(io::Error),
}

impl std::fmt::Display for DumpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DumpError::Missing(p) => write!(f, "-dump {}: no such directory", p.display()),
            DumpError::Recovery(e) => write!(f, "{e}"),
            DumpError::Unsettled(p) => {
                write!(f, "-dump {}: checkpoints kept replacing the snapshot while it was read; try again", p.display())
            }
            DumpError::Output(e) => write!(f, "cannot write the dump: {e}"),
        }
    }
}

impl std::error::Error for DumpError {}

fn field(out: &mut String, name: &str, bytes: &[u8]) {
    match std::str::from_utf8(bytes) {
        Ok(text) => {
            out.push_str(&format!("\"{name}\":"));
            out.push_str(&json_string(text));
        }
        Err(_) => {
            let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
            out.push_str(&format!("\"{name}_hex\":\"{hex}\""));
        }
    }
}

/// One entry as a JSON object.
pub fn json_line(e: &Entry) -> String {
    let mut line = String::from("{");
    field(&mut line, "key", e.key());
    line.push(',');
    field(&mut line, "value", e.value());
    line.push_str(&format!(
        ",\"expires_ms\":{},\"version\":{},\"owned\":{},\"creator\":\"{}\"}}",
        e.expires_ms,
        e.version(),
        e.secret().is_some(),
        match e.creator() {
            0 => "unknown".to_string(),
            c => net::describe(c),
        }
    ));
    line
}

/// Prints the store in `dir` to `out`.
pub fn run(dir: &Path, out: &mut impl Write) -> Result<(), DumpError> {
    if !dir.is_dir() {
        return Err(DumpError::Missing(dir.to_path_buf()));
    }
    // Which snapshot file is in place: a checkpoint that publishes a new one
    // while this reads deletes segments the old one needed, so a read that
    // saw the snapshot change is read again.
    // Both through the one descriptor the reads use.
    let opened = crate::persist::dir::Dir::open(dir)
        .map_err(|e| DumpError::Recovery(RecoveryError::Io(dir.to_path_buf(), e)))?;
    let identity = || {
        use std::os::unix::fs::MetadataExt;
        let file = opened.open_regular(crate::persist::snapshot::FILE_NAME).ok()?;
        file.metadata().ok().map(|m| (m.ino(), m.mtime(), m.mtime_nsec(), m.len()))
    };
    let mut attempts = 0;
    let shard = loop {
        let budget = KeyBudget::new(usize::MAX);
        let mut shards = vec![Shard::with_capacity(0)];
        let now = crate::clock::unix_ms();
        let before = identity();
        match recovery::recover(&opened, &mut shards, |_| 0, &budget, now, u64::MAX, Mode::ReadOnly) {
            Ok(_) if identity() == before => break shards.pop(),
            Ok(_) if attempts < 5 => attempts += 1,
            Ok(_) => return Err(DumpError::Unsettled(dir.to_path_buf())),
            // A checkpoint removed a segment under us: read again.
            Err(RecoveryError::Io(_, e)) if e.kind() == io::ErrorKind::NotFound && attempts < 5 => attempts += 1,
            // The first snapshot was published (and the segments it covers
            // deleted) between reading no snapshot and listing the log.
            Err(RecoveryError::MissingSnapshot(_)) if identity() != before && attempts < 5 => attempts += 1,
            Err(e) => return Err(DumpError::Recovery(e)),
        }
    };
    let mut entries: Vec<&Entry> = shard.iter().flat_map(Shard::entries).collect();
    entries.sort_by(|a, b| a.key().cmp(b.key()));
    for e in entries {
        writeln!(out, "{}", json_line(e)).map_err(DumpError::Output)?;
    }
    out.flush().map_err(DumpError::Output)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_json_and_hide_the_secret() {
        let mut e = Entry::new(b"k\"1", b"v\n", Some(&[0xab; 32]), 5).unwrap();
        e.set_version(9);
        e.set_creator(net::client("192.0.2.7".parse().unwrap()));
        let line = json_line(&e);
        assert_eq!(
            line,
            r#"{"key":"k\"1","value":"v\n","expires_ms":5,"version":9,"owned":true,"creator":"192.0.2.7"}"#
        );
        assert!(!line.contains("ab"));
        let bin = Entry::new(b"b", &[0xff, 0x00], None, 1).unwrap();
        assert!(json_line(&bin).contains(r#""value_hex":"ff00""#));
    }
}
