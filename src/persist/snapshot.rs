//! The snapshot file: format, validation, and crash-safe writing.
//!
//! Layout: a 56-byte header (magic `RDVZSNAP`, format version, flags,
//! payload length, BLAKE3 of the payload) followed by an rkyv archive of a
//! flat entry list (key and value bytes, owner-secret hash, expiry in Unix
//! ms) plus the instance's secret-hashing key. The list is independent of the
//! core count: loading re-routes every entry for the current `-threads`.
//!
//! The file is untrusted input. It is read into an aligned buffer (no mmap:
//! a file truncated under a mapping kills the process with SIGBUS), the
//! header and checksum are verified, then the archive is validated with
//! bytecheck before a single field is read. Writing goes to a temporary file
//! in the same directory, which is fsynced, renamed over the old snapshot, and
//! the directory fsynced: a crash at any moment leaves either the old or the
//! new snapshot, never a mix. rkyv has no schema evolution, so every format
//! version ever written stays readable here, and `tests/golden/` holds a
//! committed file of each that the tests load. This module does no
//! networking and never touches a shard: it takes and returns entry lists.

use crate::state::secret::SecretKey;
use crate::state::shard::Entry;
use rkyv::rancor;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// First bytes of every snapshot file.
pub const MAGIC: [u8; 8] = *b"RDVZSNAP";
/// The format this build writes.
pub const FORMAT_VERSION: u32 = 2;
const HEADER_LEN: usize = 8 + 4 + 4 + 8 + 32;

/// Format version 1 (archived with rkyv).
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug)]
pub struct SnapshotV1 {
    pub created_unix_ms: u64,
    pub secret_key: [u8; 32],
    pub entries: Vec<EntryV1>,
}

/// One entry of format version 1.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug)]
pub struct EntryV1 {
    /// Key bytes followed by value bytes.
    pub data: Vec<u8>,
    pub key_len: u32,
    pub expires_unix_ms: u64,
    pub secret_hash: Option<[u8; 32]>,
}

/// Format version 2: version 1 plus each entry's version (its ETag).
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug)]
pub struct SnapshotV2 {
    pub created_unix_ms: u64,
    pub secret_key: [u8; 32],
    pub entries: Vec<EntryV2>,
}

/// One entry of format version 2.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug)]
pub struct EntryV2 {
    /// Key bytes followed by value bytes.
    pub data: Vec<u8>,
    pub key_len: u32,
    pub expires_unix_ms: u64,
    pub secret_hash: Option<[u8; 32]>,
    pub version: u64,
}

/// Why a snapshot file cannot be used.
#[derive(Debug)]
pub enum SnapshotError {
    Io(io::Error),
    Empty,
    BadMagic,
    UnsupportedVersion(u32),
    Truncated { declared: u64, actual: u64 },
    TrailingBytes { declared: u64, actual: u64 },
    Checksum,
    InvalidArchive(String),
    BadEntry(usize),
    Encode(String),
}

impl std::fmt::Display for SnapshotError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SnapshotError::Io(e) => write!(f, "{e}"),
            SnapshotError::Empty => f.write_str("the file is empty"),
            SnapshotError::BadMagic => f.write_str("not a Rendezvous snapshot (bad magic bytes)"),
            SnapshotError::UnsupportedVersion(v) => {
                write!(f, "snapshot format version {v} is not supported (this build reads 1 to {FORMAT_VERSION})")
            }
            SnapshotError::Truncated { declared, actual } => {
                write!(f, "truncated: the header announces {declared} payload bytes, the file holds {actual}")
            }
            SnapshotError::TrailingBytes { declared, actual } => {
                write!(f, "corrupt: the header announces {declared} payload bytes, the file holds {actual}")
            }
            SnapshotError::Checksum => f.write_str("corrupt: payload checksum mismatch"),
            SnapshotError::InvalidArchive(e) => write!(f, "corrupt: invalid archive ({e})"),
            SnapshotError::BadEntry(i) => {
                write!(f, "corrupt: entry {i} has a key longer than its data")
            }
            SnapshotError::Encode(e) => write!(f, "cannot encode snapshot: {e}"),
        }
    }
}

impl std::error::Error for SnapshotError {}

impl From<io::Error> for SnapshotError {
    fn from(e: io::Error) -> Self {
        SnapshotError::Io(e)
    }
}

/// A decoded snapshot.
pub struct Loaded {
    pub secret_key: SecretKey,
    pub created_unix_ms: u64,
    /// Every entry in the file, expired ones included (the caller decides).
    pub entries: Vec<Entry>,
}

/// Encodes a snapshot file (header + archive) from the cores' entries.
pub fn encode(secret_key: &SecretKey, shards: Vec<Vec<Entry>>, now_unix_ms: u64) -> Result<Vec<u8>, SnapshotError> {
    let entries = shards
        .into_iter()
        .flatten()
        .map(|e| {
            let (data, key_len, expires_unix_ms, secret_hash, version) = e.into_snapshot_parts();
            EntryV2 { data, key_len, expires_unix_ms, secret_hash, version }
        })
        .collect();
    let snap = SnapshotV2 { created_unix_ms: now_unix_ms, secret_key: *secret_key.as_bytes(), entries };
    let payload = rkyv::to_bytes::<rancor::Error>(&snap).map_err(|e| SnapshotError::Encode(e.to_string()))?;
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(blake3::hash(&payload).as_bytes());
    out.extend_from_slice(&payload);
    Ok(out)
}

/// Verifies and decodes a snapshot file's bytes.
pub fn decode(bytes: &[u8]) -> Result<Loaded, SnapshotError> {
    if bytes.is_empty() {
        return Err(SnapshotError::Empty);
    }
    if bytes.len() < MAGIC.len() || bytes[..MAGIC.len()] != MAGIC {
        return Err(SnapshotError::BadMagic);
    }
    if bytes.len() < HEADER_LEN {
        return Err(SnapshotError::Truncated { declared: 0, actual: 0 });
    }
    let u32_at = |i: usize| u32::from_le_bytes([bytes[i], bytes[i + 1], bytes[i + 2], bytes[i + 3]]);
    let version = u32_at(8);
    let mut len_bytes = [0u8; 8];
    len_bytes.copy_from_slice(&bytes[16..24]);
    let declared = u64::from_le_bytes(len_bytes);
    let checksum = &bytes[24..56];
    let payload = &bytes[HEADER_LEN..];
    let actual = payload.len() as u64;
    if version == 0 || version > FORMAT_VERSION {
        return Err(SnapshotError::UnsupportedVersion(version));
    }
    if actual < declared {
        return Err(SnapshotError::Truncated { declared, actual });
    }
    if actual > declared {
        return Err(SnapshotError::TrailingBytes { declared, actual });
    }
    if blake3::hash(payload).as_bytes() != checksum {
        return Err(SnapshotError::Checksum);
    }
    // rkyv needs the archive aligned; a Vec<u8> from the file is not.
    let mut aligned = rkyv::util::AlignedVec::<16>::with_capacity(payload.len());
    aligned.extend_from_slice(payload);
    match version {
        1 => decode_v1(&aligned),
        _ => decode_v2(&aligned),
    }
}

/// Builds an entry from archived fields, checking what the archive cannot.
fn entry(
    i: usize,
    data: &[u8],
    key_len: u32,
    expires: u64,
    secret: Option<&[u8; 32]>,
    version: u64,
) -> Result<Entry, SnapshotError> {
    let key_len = key_len as usize;
    if key_len == 0 || key_len > data.len() || key_len > crate::state::shard::MAX_KEY_LEN {
        return Err(SnapshotError::BadEntry(i));
    }
    let (key, value) = data.split_at(key_len);
    let mut e = Entry::new(key, value, secret, expires).map_err(|_| SnapshotError::BadEntry(i))?;
    e.set_version(version);
    Ok(e)
}

fn decode_v2(payload: &[u8]) -> Result<Loaded, SnapshotError> {
    let archived = rkyv::access::<ArchivedSnapshotV2, rancor::Error>(payload)
        .map_err(|e| SnapshotError::InvalidArchive(e.to_string()))?;
    let entries = archived
        .entries
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let (exp, ver) = (e.expires_unix_ms.to_native(), e.version.to_native());
            entry(i, &e.data, e.key_len.to_native(), exp, e.secret_hash.as_ref(), ver)
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Loaded {
        secret_key: SecretKey::from_bytes(archived.secret_key),
        created_unix_ms: archived.created_unix_ms.to_native(),
        entries,
    })
}

fn decode_v1(payload: &[u8]) -> Result<Loaded, SnapshotError> {
    let archived = rkyv::access::<ArchivedSnapshotV1, rancor::Error>(payload)
        .map_err(|e| SnapshotError::InvalidArchive(e.to_string()))?;
    // Version 1 kept no entry versions: the shard assigns fresh ones (0 = none).
    let entries = archived
        .entries
        .iter()
        .enumerate()
        .map(|(i, e)| {
            entry(i, &e.data, e.key_len.to_native(), e.expires_unix_ms.to_native(), e.secret_hash.as_ref(), 0)
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Loaded {
        secret_key: SecretKey::from_bytes(archived.secret_key),
        created_unix_ms: archived.created_unix_ms.to_native(),
        entries,
    })
}

/// Loads the snapshot at `path`; `Ok(None)` if there is no file.
pub fn load(path: &Path) -> Result<Option<Loaded>, SnapshotError> {
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    decode(&bytes).map(Some)
}

fn temp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".tmp");
    path.with_file_name(name)
}

/// Replaces the file at `path` with `bytes` so that a crash at any point
/// leaves either the old or the new content: temp file in the same
/// directory, fsync, rename, fsync the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = temp_path(path);
    let result = (|| {
        let mut f = OpenOptions::new().write(true).create(true).truncate(true).open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, path)?;
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<Vec<Entry>> {
        vec![
            vec![Entry::new(b"key", b"value", Some(&[9; 32]), 1_000).unwrap()],
            vec![],
            vec![Entry::new(b"k", b"\x00\xff", None, 2_000).unwrap(), Entry::new(b"ab", b"", None, 3_000).unwrap()],
        ]
    }

    #[test]
    fn round_trip() {
        let key = SecretKey::from_bytes([5; 32]);
        let bytes = encode(&key, sample(), 42).unwrap();
        let loaded = decode(&bytes).unwrap();
        assert_eq!(loaded.secret_key.as_bytes(), key.as_bytes());
        assert_eq!(loaded.created_unix_ms, 42);
        let all: Vec<Entry> = sample().into_iter().flatten().collect();
        assert_eq!(loaded.entries, all);
        assert_eq!(loaded.entries[0].key(), b"key");
        assert_eq!(loaded.entries[0].value(), b"value");
        assert_eq!(loaded.entries[2].value(), b"");
    }

    #[test]
    fn every_kind_of_damage_is_an_error() {
        let bytes = encode(&SecretKey::from_bytes([5; 32]), sample(), 42).unwrap();
        assert!(matches!(decode(&[]), Err(SnapshotError::Empty)));
        assert!(matches!(decode(b"PK\x03\x04 a zip file"), Err(SnapshotError::BadMagic)));
        assert!(matches!(decode(&bytes[..20]), Err(SnapshotError::Truncated { .. })));
        assert!(matches!(decode(&bytes[..bytes.len() - 1]), Err(SnapshotError::Truncated { .. })));
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(matches!(decode(&longer), Err(SnapshotError::TrailingBytes { .. })));
        let mut v99 = bytes.clone();
        v99[8..12].copy_from_slice(&99u32.to_le_bytes());
        assert!(matches!(decode(&v99), Err(SnapshotError::UnsupportedVersion(99))));
        // Flip every payload byte in turn: the checksum catches each.
        for i in (HEADER_LEN..bytes.len()).step_by(7) {
            let mut bad = bytes.clone();
            bad[i] ^= 0x40;
            assert!(matches!(decode(&bad), Err(SnapshotError::Checksum)), "byte {i}");
        }
    }

    #[test]
    fn a_valid_checksum_over_a_bad_archive_is_still_rejected() {
        // An attacker (or a bug) that recomputes the checksum cannot get an
        // unvalidated archive past bytecheck.
        let mut bytes = encode(&SecretKey::from_bytes([5; 32]), sample(), 42).unwrap();
        let n = bytes.len();
        for b in &mut bytes[n - 16..] {
            *b = 0xff;
        }
        let sum = *blake3::hash(&bytes[HEADER_LEN..]).as_bytes();
        bytes[24..56].copy_from_slice(&sum);
        assert!(matches!(decode(&bytes), Err(SnapshotError::InvalidArchive(_)) | Err(SnapshotError::BadEntry(_))));
    }

    #[test]
    fn write_atomic_replaces_and_leaves_no_temp() {
        let dir = std::env::temp_dir().join(format!("rdvz-snap-unit-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.rkyv");
        write_atomic(&path, b"one").unwrap();
        write_atomic(&path, b"two").unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        assert!(!temp_path(&path).exists());
        assert!(load(&dir.join("missing.rkyv")).unwrap().is_none());
        fs::remove_dir_all(&dir).unwrap();
    }

    /// The committed golden file of format version 1 must load forever.
    #[test]
    fn golden_v1_loads() {
        let bytes = include_bytes!("../../tests/golden/snapshot-v1.rkyv");
        let loaded = decode(bytes).unwrap();
        assert_eq!(loaded.secret_key.as_bytes(), &[7u8; 32]);
        assert_eq!(loaded.entries, golden_entries());
    }

    fn golden_entries() -> Vec<Entry> {
        let key = SecretKey::from_bytes([7; 32]);
        let far = 4_102_444_800_000;
        vec![
            Entry::new(b"golden/plain", b"hello", None, far).unwrap(),
            Entry::new(b"golden/owned", b"mine", Some(&key.hash(b"golden/owned", b"golden-secret")), far).unwrap(),
            Entry::new(b"ip/192.0.2.1/svc", b"192.0.2.1:4000", None, far).unwrap(),
            Entry::new(b"golden/expired-long-ago", b"", None, 1_000).unwrap(),
        ]
    }

    /// The committed golden file of format version 2 must load forever.
    #[test]
    fn golden_v2_loads() {
        let bytes = include_bytes!("../../tests/golden/snapshot-v2.rkyv");
        let loaded = decode(bytes).unwrap();
        assert_eq!(loaded.secret_key.as_bytes(), &[7u8; 32]);
        assert_eq!(loaded.entries, golden_entries_v2());
    }

    fn golden_entries_v2() -> Vec<Entry> {
        golden_entries()
            .into_iter()
            .enumerate()
            .map(|(i, mut e)| {
                e.set_version(1_000 + i as u64);
                e
            })
            .collect()
    }

    /// Writes the golden file of the current format version (run by hand when
    /// adding a format version: `cargo test write_golden -- --ignored`, after
    /// renaming this test and the file). Never overwrite an older one.
    #[test]
    #[ignore]
    fn write_golden_v2() {
        assert_eq!(FORMAT_VERSION, 2, "add a new golden file for a new version");
        let bytes = encode(&SecretKey::from_bytes([7; 32]), vec![golden_entries_v2()], 1_764_000_000_000).unwrap();
        fs::write("tests/golden/snapshot-v2.rkyv", bytes).unwrap();
    }
}
