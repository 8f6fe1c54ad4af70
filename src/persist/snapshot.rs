//! The snapshot file: a checkpoint of the store, written and read as a
//! stream so that neither costs a second copy of the store in memory.
//!
//! Format 4 (written now): a 16-byte header (magic `RDVZSNAP`, format
//! version, flags), then frames. Each frame is `u32 kind`, `u32 reserved`,
//! `u64 length`, the BLAKE3 hash of the payload, and the payload: an rkyv
//! archive. Entry frames hold up to a few thousand entries (key and value
//! bytes, owner-secret hash, expiry, version, creating network); the last
//! frame is the trailer: the instance's secret-hashing key, the log
//! position recovery replays from (the first log segment that is not
//! covered), the highest version issued when the copy ended, the version
//! the copy covers (every change at or below it is in the copy, so
//! recovery replays only records above it), the entry count. A file
//! without its trailer is incomplete and refused. The list is independent
//! of the core count: loading re-routes every entry.
//!
//! Format 3 is format 4 without the covered version (read as 0: every
//! record after its first segment is replayed). Formats 1 and 2 (one header and one archive) are still read, and
//! `tests/golden/` holds a committed file of every format that the tests
//! load: rkyv has no schema evolution, so an old file must keep working.
//!
//! The file is untrusted input: each frame's length is checked against the
//! file before anything is allocated, its hash verified, and its archive
//! validated with bytecheck before a field is read. It is read with plain
//! reads into an aligned buffer (no mmap: a file truncated under a mapping
//! kills the process with SIGBUS). Writing goes to a fresh temp file in the
//! same directory (created exclusively, mode 0600: it holds secret hashes),
//! which is fsynced, renamed over the old snapshot, and the directory
//! fsynced: a crash at any moment leaves the old or the new file, never a
//! mix. This module never touches a shard or a socket.

use crate::persist::dir::Dir;
use crate::state::secret::SecretKey;
use crate::state::shard::{Entry, MAX_KEY_LEN};
use rkyv::rancor;
use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::Path;

/// First bytes of every snapshot file.
pub const MAGIC: [u8; 8] = *b"RDVZSNAP";
/// The format this build writes.
pub const FORMAT_VERSION: u32 = 4;
/// The snapshot's name inside the data directory.
pub const FILE_NAME: &str = "snapshot.rkyv";
/// Prefix of temp files (a crash can leave one; startup removes them).
pub const TEMP_PREFIX: &str = "snapshot.rkyv.tmp.";
const V12_HEADER_LEN: usize = 8 + 4 + 4 + 8 + 32;
const V3_HEADER_LEN: usize = 16;
const FRAME_HEADER_LEN: usize = 4 + 4 + 8 + 32;
const FRAME_ENTRIES: u32 = 1;
const FRAME_TRAILER: u32 = 2;
/// Largest frame payload accepted (a frame holds at most a few thousand
/// entries of at most 1 GiB each; this bounds the reader's one buffer).
const MAX_FRAME: u64 = 2 << 30;

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

/// One frame of entries in format version 3.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug)]
pub struct ChunkV3 {
    pub entries: Vec<EntryV3>,
}

/// One entry of format version 3: version 2 plus its creating network.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug)]
pub struct EntryV3 {
    /// Key bytes followed by value bytes.
    pub data: Vec<u8>,
    pub key_len: u32,
    pub expires_unix_ms: u64,
    pub secret_hash: Option<[u8; 32]>,
    pub version: u64,
    pub creator: u64,
}

/// The last frame of format version 3.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct TrailerV3 {
    pub created_unix_ms: u64,
    pub secret_key: [u8; 32],
    /// Log segments with this sequence number or higher are replayed on top.
    pub replay_from: u64,
    /// The highest version issued when the copy ended (deletes included).
    pub max_version: u64,
    pub entries: u64,
    pub frames: u64,
}

/// The last frame of format version 4.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct TrailerV4 {
    pub created_unix_ms: u64,
    pub secret_key: [u8; 32],
    /// Log segments with this sequence number or higher are replayed on top.
    pub replay_from: u64,
    /// The highest version issued when the copy ended (deletes included).
    pub max_version: u64,
    /// Every change with this version or lower is in the copy: replay skips
    /// such records.
    pub covered_version: u64,
    pub entries: u64,
    pub frames: u64,
}

impl From<TrailerV3> for TrailerV4 {
    /// Format 3 covers no version: everything after `replay_from` is replayed.
    fn from(t: TrailerV3) -> Self {
        TrailerV4 {
            created_unix_ms: t.created_unix_ms,
            secret_key: t.secret_key,
            replay_from: t.replay_from,
            max_version: t.max_version,
            covered_version: 0,
            entries: t.entries,
            frames: t.frames,
        }
    }
}

/// Why a snapshot file cannot be used.
#[derive(Debug)]
pub enum SnapshotError {
    Io(io::Error),
    Empty,
    BadMagic,
    UnsupportedVersion(u32),
    Truncated {
        declared: u64,
        actual: u64,
    },
    TrailingBytes {
        declared: u64,
        actual: u64,
    },
    Checksum,
    InvalidArchive(String),
    BadEntry(usize),
    Encode(String),
    /// Format 3: a frame at this offset is damaged.
    BadFrame {
        offset: u64,
        why: String,
    },
    /// Format 3: the file ends without its trailer.
    NoTrailer,
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
            SnapshotError::BadEntry(i) => write!(f, "corrupt: entry {i} has a key longer than its data"),
            SnapshotError::Encode(e) => write!(f, "cannot encode snapshot: {e}"),
            SnapshotError::BadFrame { offset, why } => write!(f, "corrupt at byte {offset}: {why}"),
            SnapshotError::NoTrailer => f.write_str("truncated: the file ends before its trailer"),
        }
    }
}

impl std::error::Error for SnapshotError {}

impl From<io::Error> for SnapshotError {
    fn from(e: io::Error) -> Self {
        SnapshotError::Io(e)
    }
}

/// What a snapshot says about itself (entries go to the loader's callback).
#[derive(Debug, Clone)]
pub struct Meta {
    pub secret_key: SecretKey,
    pub created_unix_ms: u64,
    /// First log segment to replay (0 for formats 1 and 2, which predate the log).
    pub replay_from: u64,
    pub max_version: u64,
    /// Replay skips records at or below this version (0 before format 4).
    pub covered_version: u64,
    pub entries: u64,
    pub format: u32,
}

/// What a snapshot covers, and what recovery must replay on top of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cover {
    /// The first log segment to replay.
    pub replay_from: u64,
    /// Every change at or below this version is in the copy.
    pub covered_version: u64,
    /// The highest version issued when the copy ended.
    pub max_version: u64,
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
    if key_len == 0 || key_len > data.len() || key_len > MAX_KEY_LEN {
        return Err(SnapshotError::BadEntry(i));
    }
    let (key, value) = data.split_at(key_len);
    let mut e = Entry::new(key, value, secret, expires).map_err(|_| SnapshotError::BadEntry(i))?;
    e.set_version(version);
    Ok(e)
}

/// Streams a snapshot file, as it was opened (not found: there is no
/// snapshot, `Ok(None)`): every entry goes to `each`, in file order
/// (expired ones included; the caller decides). Memory: one frame at a
/// time.
pub fn load_from(file: io::Result<File>, mut each: impl FnMut(Entry)) -> Result<Option<Meta>, SnapshotError> {
    let file = match file {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let size = file.metadata()?.len();
    let mut r = BufReader::with_capacity(1 << 20, file);
    let mut head = [0u8; V3_HEADER_LEN];
    let got = read_up_to(&mut r, &mut head)?;
    if got == 0 {
        return Err(SnapshotError::Empty);
    }
    if got < MAGIC.len() || head[..8] != MAGIC {
        return Err(SnapshotError::BadMagic);
    }
    if got < V3_HEADER_LEN {
        return Err(SnapshotError::Truncated { declared: 0, actual: 0 });
    }
    let version = u32::from_le_bytes([head[8], head[9], head[10], head[11]]);
    match version {
        1 | 2 => {
            // Old formats: one archive; read it whole.
            let mut bytes = head.to_vec();
            r.read_to_end(&mut bytes)?;
            let (meta, entries) = decode_v12(&bytes)?;
            entries.into_iter().for_each(each);
            Ok(Some(meta))
        }
        3 | 4 => load_framed(&mut r, size, version, &mut each).map(Some),
        v => Err(SnapshotError::UnsupportedVersion(v)),
    }
}

fn read_up_to(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Reads a format 3 or 4 file after its header.
fn load_framed(r: &mut impl Read, size: u64, format: u32, each: &mut impl FnMut(Entry)) -> Result<Meta, SnapshotError> {
    let mut offset = V3_HEADER_LEN as u64;
    let mut count = 0u64;
    let mut frames = 0u64;
    let mut payload = rkyv::util::AlignedVec::<16>::new();
    loop {
        let bad = |why: String| SnapshotError::BadFrame { offset, why };
        let mut fh = [0u8; FRAME_HEADER_LEN];
        let got = read_up_to(r, &mut fh)?;
        if got == 0 {
            return Err(SnapshotError::NoTrailer);
        }
        if got < FRAME_HEADER_LEN {
            return Err(bad("the file ends inside a frame header".into()));
        }
        let kind = u32::from_le_bytes([fh[0], fh[1], fh[2], fh[3]]);
        if fh[4..8] != [0; 4] {
            return Err(bad("reserved frame bytes are not zero".into()));
        }
        let mut len_bytes = [0u8; 8];
        len_bytes.copy_from_slice(&fh[8..16]);
        let len = u64::from_le_bytes(len_bytes);
        let left = size.saturating_sub(offset + FRAME_HEADER_LEN as u64);
        if len > MAX_FRAME || len > left {
            return Err(bad(format!("a frame of {len} bytes where {left} remain")));
        }
        payload.clear();
        payload.reserve(len as usize);
        payload.resize(len as usize, 0);
        if read_up_to(r, &mut payload)? < len as usize {
            return Err(bad("the file ends inside a frame".into()));
        }
        if blake3::hash(&payload).as_bytes()[..] != fh[16..48] {
            return Err(bad("checksum mismatch".into()));
        }
        match kind {
            FRAME_ENTRIES => {
                let chunk = rkyv::access::<ArchivedChunkV3, rancor::Error>(&payload)
                    .map_err(|e| bad(format!("invalid archive ({e})")))?;
                for e in chunk.entries.iter() {
                    let (exp, ver) = (e.expires_unix_ms.to_native(), e.version.to_native());
                    let mut entry =
                        entry(count as usize, &e.data, e.key_len.to_native(), exp, e.secret_hash.as_ref(), ver)?;
                    entry.set_creator(e.creator.to_native());
                    each(entry);
                    count += 1;
                }
                frames += 1;
            }
            FRAME_TRAILER => {
                let invalid = |e: rancor::Error| bad(format!("invalid trailer ({e})"));
                let t: TrailerV4 = if format == 3 {
                    let archived = rkyv::access::<ArchivedTrailerV3, rancor::Error>(&payload).map_err(invalid)?;
                    rkyv::deserialize::<TrailerV3, rancor::Error>(archived).map_err(invalid)?.into()
                } else {
                    let archived = rkyv::access::<ArchivedTrailerV4, rancor::Error>(&payload).map_err(invalid)?;
                    rkyv::deserialize::<TrailerV4, rancor::Error>(archived).map_err(invalid)?
                };
                if t.covered_version > t.max_version {
                    return Err(bad(format!(
                        "the trailer covers version {} above the highest issued, {}",
                        t.covered_version, t.max_version
                    )));
                }
                if t.entries != count || t.frames != frames {
                    return Err(bad(format!(
                        "the trailer counts {} entries in {} frames, the file holds {count} in {frames}",
                        t.entries, t.frames
                    )));
                }
                let end = offset + FRAME_HEADER_LEN as u64 + len;
                if end != size {
                    return Err(SnapshotError::TrailingBytes { declared: end, actual: size });
                }
                return Ok(Meta {
                    secret_key: SecretKey::from_bytes(t.secret_key),
                    created_unix_ms: t.created_unix_ms,
                    replay_from: t.replay_from,
                    max_version: t.max_version,
                    covered_version: t.covered_version,
                    entries: count,
                    format,
                });
            }
            other => return Err(bad(format!("unknown frame kind {other}"))),
        }
        offset += FRAME_HEADER_LEN as u64 + len;
    }
}

/// Verifies and decodes a whole format 1 or 2 file.
fn decode_v12(bytes: &[u8]) -> Result<(Meta, Vec<Entry>), SnapshotError> {
    if bytes.len() < V12_HEADER_LEN {
        return Err(SnapshotError::Truncated { declared: 0, actual: 0 });
    }
    let version = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
    let mut len_bytes = [0u8; 8];
    len_bytes.copy_from_slice(&bytes[16..24]);
    let declared = u64::from_le_bytes(len_bytes);
    let checksum = &bytes[24..56];
    let payload = &bytes[V12_HEADER_LEN..];
    let actual = payload.len() as u64;
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
    let invalid = |e: rancor::Error| SnapshotError::InvalidArchive(e.to_string());
    let (secret_key, created, entries) = if version == 1 {
        let a = rkyv::access::<ArchivedSnapshotV1, rancor::Error>(&aligned).map_err(invalid)?;
        // Version 1 kept no entry versions: the shard assigns fresh ones (0 = none).
        let entries = a
            .entries
            .iter()
            .enumerate()
            .map(|(i, e)| {
                entry(i, &e.data, e.key_len.to_native(), e.expires_unix_ms.to_native(), e.secret_hash.as_ref(), 0)
            })
            .collect::<Result<Vec<_>, _>>()?;
        (a.secret_key, a.created_unix_ms.to_native(), entries)
    } else {
        let a = rkyv::access::<ArchivedSnapshotV2, rancor::Error>(&aligned).map_err(invalid)?;
        let entries = a
            .entries
            .iter()
            .enumerate()
            .map(|(i, e)| {
                let (exp, ver) = (e.expires_unix_ms.to_native(), e.version.to_native());
                entry(i, &e.data, e.key_len.to_native(), exp, e.secret_hash.as_ref(), ver)
            })
            .collect::<Result<Vec<_>, _>>()?;
        (a.secret_key, a.created_unix_ms.to_native(), entries)
    };
    let max_version = entries.iter().map(Entry::version).max().unwrap_or(0);
    let meta = Meta {
        secret_key: SecretKey::from_bytes(secret_key),
        created_unix_ms: created,
        replay_from: 0,
        max_version,
        covered_version: 0,
        entries: entries.len() as u64,
        format: version,
    };
    Ok((meta, entries))
}

/// Drops `len` bytes from `from` (0: to the end) of a synced data file from
/// the page cache (`POSIX_FADV_DONTNEED`): the snapshot and the log are
/// written once and read only at startup, so cached they would only crowd
/// out pages that are read (README "The log stays out of the page cache").
/// Advice only: Linux never drops a dirty page for it, and a failure
/// changes nothing, so none is reported.
pub fn drop_cached(fd: &impl std::os::fd::AsRawFd, from: u64, len: u64) {
    let (Ok(from), Ok(len)) = (libc::off_t::try_from(from), libc::off_t::try_from(len)) else { return };
    // SAFETY: an FFI call on a descriptor the caller keeps open for the
    // call; no pointers.
    unsafe { libc::posix_fadvise(fd.as_raw_fd(), from, len, libc::POSIX_FADV_DONTNEED) };
}

/// Whether the page holding `offset` of `file` is in the page cache: the
/// check behind `drop_cached`'s tests. Asked with `mincore` on a one-page
/// mapping that is never touched (a read, even one that may not wait,
/// would start a readahead and bring the page back). Since Linux 5.2 it
/// reports every page cached for a file the caller neither owns nor may
/// write: the tests ask about their own files.
#[doc(hidden)]
pub fn is_cached(file: &File, offset: u64) -> io::Result<bool> {
    use std::os::fd::AsRawFd;
    // SAFETY: no pointers; the page size is always positive.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as u64;
    let at = libc::off_t::try_from(offset / page * page).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: a fresh read-only shared mapping of one page of an open file,
    // never dereferenced: `mincore` only reads its residency into `vec`,
    // one byte for the one page, and it is unmapped right after.
    unsafe {
        let map =
            libc::mmap(std::ptr::null_mut(), page as usize, libc::PROT_READ, libc::MAP_SHARED, file.as_raw_fd(), at);
        if map == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let mut vec = 0u8;
        let rc = libc::mincore(map, page as usize, &mut vec);
        let err = io::Error::last_os_error();
        libc::munmap(map, page as usize);
        if rc != 0 {
            return Err(err);
        }
        Ok(vec & 1 == 1)
    }
}

/// Whether `dir` is on tmpfs, which keeps its pages whatever the advice:
/// `drop_cached`'s tests have nothing to measure there.
#[doc(hidden)]
pub fn memory_backed(dir: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()) else { return true };
    // SAFETY: `statfs` is plain data, for which all-zero bytes are valid.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `st` a live, writable
    // struct, both for the whole call.
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    rc != 0 || st.f_type == libc::TMPFS_MAGIC
}

/// Writes a format-3 snapshot frame by frame, then publishes it atomically.
pub struct Writer {
    out: BufWriter<File>,
    /// The temp file's name in `dir`.
    tmp: String,
    /// Made, renamed and removed through its descriptor (`persist::dir`).
    dir: Dir,
    entries: u64,
    frames: u64,
    bytes: u64,
}

impl Writer {
    /// Starts a snapshot in `dir` (under a temp name nobody else uses).
    pub fn create(dir: &Dir) -> io::Result<Writer> {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        let tmp = format!("{TEMP_PREFIX}{}.{nanos}", std::process::id());
        let dir = dir.try_clone()?;
        let mut out = BufWriter::with_capacity(1 << 20, dir.create_private(&tmp)?);
        let mut head = [0u8; V3_HEADER_LEN];
        head[..8].copy_from_slice(&MAGIC);
        head[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        let written = out.write_all(&head);
        let w = Writer { out, tmp, dir, entries: 0, frames: 0, bytes: V3_HEADER_LEN as u64 };
        match written {
            Ok(()) => Ok(w),
            Err(e) => {
                w.abort();
                Err(e)
            }
        }
    }

    fn frame(&mut self, kind: u32, payload: &[u8]) -> io::Result<()> {
        let mut fh = [0u8; FRAME_HEADER_LEN];
        fh[..4].copy_from_slice(&kind.to_le_bytes());
        fh[8..16].copy_from_slice(&(payload.len() as u64).to_le_bytes());
        fh[16..48].copy_from_slice(blake3::hash(payload).as_bytes());
        self.out.write_all(&fh)?;
        self.out.write_all(payload)?;
        self.bytes += (FRAME_HEADER_LEN + payload.len()) as u64;
        Ok(())
    }

    /// Appends a frame of entries.
    pub fn write_entries(&mut self, entries: &[Entry]) -> Result<(), SnapshotError> {
        if entries.is_empty() {
            return Ok(());
        }
        let chunk = ChunkV3 {
            entries: entries
                .iter()
                .map(|e| EntryV3 {
                    data: e.key_and_value().to_vec(),
                    key_len: e.key().len() as u32,
                    expires_unix_ms: e.expires_ms,
                    secret_hash: e.secret().copied(),
                    version: e.version(),
                    creator: e.creator(),
                })
                .collect(),
        };
        let payload = rkyv::to_bytes::<rancor::Error>(&chunk).map_err(|e| SnapshotError::Encode(e.to_string()))?;
        drop(chunk);
        self.frame(FRAME_ENTRIES, &payload)?;
        self.entries += entries.len() as u64;
        self.frames += 1;
        Ok(())
    }

    pub fn entries(&self) -> u64 {
        self.entries
    }

    /// Writes the trailer, syncs, and renames the file into place as
    /// `dir/FILE_NAME`. Returns the file's size.
    pub fn publish(mut self, secret_key: &SecretKey, created_unix_ms: u64, cover: Cover) -> Result<u64, SnapshotError> {
        let trailer = TrailerV4 {
            created_unix_ms,
            secret_key: *secret_key.as_bytes(),
            replay_from: cover.replay_from,
            max_version: cover.max_version,
            covered_version: cover.covered_version,
            entries: self.entries,
            frames: self.frames,
        };
        let result = (|| {
            let payload =
                rkyv::to_bytes::<rancor::Error>(&trailer).map_err(|e| SnapshotError::Encode(e.to_string()))?;
            self.frame(FRAME_TRAILER, &payload)?;
            self.out.flush()?;
            self.out.get_ref().sync_all()?;
            drop_cached(self.out.get_ref(), 0, 0);
            self.dir.rename(&self.tmp, FILE_NAME)?;
            self.dir.sync()?;
            Ok(self.bytes)
        })();
        if result.is_err() {
            let _ = self.dir.remove(&self.tmp);
        }
        result
    }

    /// Gives up: the temp file is removed, the old snapshot stays.
    pub fn abort(self) {
        let _ = self.dir.remove(&self.tmp);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::path::PathBuf;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("rdvz-snap-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    fn sample() -> Vec<Entry> {
        let mut a = Entry::new(b"key", b"value", Some(&[9; 32]), 1_000).unwrap();
        a.set_version(5);
        a.set_creator(0xffff_ffff_0102_0304);
        vec![a, Entry::new(b"k", b"\x00\xff", None, 2_000).unwrap(), Entry::new(b"ab", b"", None, 3_000).unwrap()]
    }

    fn write(d: &Path, frames: &[&[Entry]]) -> u64 {
        let mut w = Writer::create(&Dir::open(d).unwrap()).unwrap();
        for f in frames {
            w.write_entries(f).unwrap();
        }
        w.publish(&SecretKey::from_bytes([5; 32]), 42, Cover { replay_from: 17, covered_version: 77, max_version: 99 })
            .unwrap()
    }

    #[test]
    fn a_snapshot_is_published_or_dropped_in_the_directory_it_was_begun_in() {
        let root = dir("moved");
        let (named, moved) = (root.join("data"), root.join("moved"));
        fs::create_dir(&named).unwrap();
        let opened = Dir::open(&named).unwrap();
        let (mut kept, dropped) = (Writer::create(&opened).unwrap(), Writer::create(&opened).unwrap());
        kept.write_entries(&sample()).unwrap();
        // The directory is moved away and another takes its name, as under
        // a second instance, while both snapshots are being written.
        fs::rename(&named, &moved).unwrap();
        fs::create_dir(&named).unwrap();
        let cover = Cover { replay_from: 1, covered_version: 0, max_version: 3 };
        kept.publish(&SecretKey::from_bytes([5; 32]), 42, cover).unwrap();
        dropped.abort();
        let names = |d: &Path| fs::read_dir(d).unwrap().map(|e| e.unwrap().file_name()).collect::<Vec<_>>();
        assert_eq!(names(&moved), [FILE_NAME], "published, and the aborted temp file gone, where begun");
        assert!(names(&named).is_empty(), "nothing made in the directory that took the name");
        assert_eq!(read(&moved.join(FILE_NAME)).unwrap().1, sample());
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn a_published_snapshot_leaves_the_page_cache_with_its_bytes() {
        let d = dir("uncached");
        if memory_backed(&d) {
            eprintln!("skipped: {} is memory-backed", d.display());
            return;
        }
        let entries: Vec<Entry> =
            (0..2000).map(|i| Entry::new(format!("k{i}").as_bytes(), &[7; 500], None, 1_000).unwrap()).collect();
        let size = write(&d, &[&entries]);
        assert!(size > 1 << 20, "{size} bytes");
        let f = File::open(d.join(FILE_NAME)).unwrap();
        assert!(!is_cached(&f, 0).unwrap() && !is_cached(&f, size - 1).unwrap(), "the snapshot stayed cached");
        let (_, got) = read(&d.join(FILE_NAME)).unwrap();
        assert_eq!(got.len(), 2000);
        // Reading brings it back, which the check must see.
        assert!(is_cached(&f, 0).unwrap());
    }

    fn read(path: &Path) -> Result<(Meta, Vec<Entry>), SnapshotError> {
        let mut got = Vec::new();
        let (dir, name) = (path.parent().unwrap(), path.file_name().unwrap().to_str().unwrap());
        let meta = load_from(Dir::open(dir)?.open_regular(name), |e| got.push(e))?.expect("file exists");
        Ok((meta, got))
    }

    #[test]
    fn round_trip_in_frames() {
        let d = dir("round");
        let all = sample();
        let size = write(&d, &[&all[..1], &[], &all[1..]]);
        let path = d.join(FILE_NAME);
        assert_eq!(fs::metadata(&path).unwrap().len(), size);
        let (meta, got) = read(&path).unwrap();
        assert_eq!(got, all);
        assert_eq!(got[0].creator(), 0xffff_ffff_0102_0304);
        assert_eq!((meta.created_unix_ms, meta.replay_from, meta.max_version, meta.entries), (42, 17, 99, 3));
        assert_eq!((meta.covered_version, meta.format), (77, FORMAT_VERSION));
        assert_eq!(meta.secret_key.as_bytes(), &[5; 32]);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        let leftovers = fs::read_dir(&d).unwrap().filter(|e| e.as_ref().unwrap().file_name() != FILE_NAME).count();
        assert_eq!(leftovers, 0, "no temp file left");
        assert!(load_from(Dir::open(&d).unwrap().open_regular("missing"), |_| {}).unwrap().is_none());
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn every_kind_of_damage_is_an_error() {
        let d = dir("damage");
        write(&d, &[&sample()]);
        let path = d.join(FILE_NAME);
        let good = fs::read(&path).unwrap();
        let check = |bytes: &[u8]| {
            fs::write(&path, bytes).unwrap();
            read(&path).map(|_| ())
        };
        assert!(matches!(check(&[]), Err(SnapshotError::Empty)));
        assert!(matches!(check(b"PK\x03\x04 a zip file"), Err(SnapshotError::BadMagic)));
        assert!(matches!(check(&good[..12]), Err(SnapshotError::Truncated { .. })));
        for cut in [V3_HEADER_LEN, V3_HEADER_LEN + 10, good.len() / 2, good.len() - 1] {
            assert!(check(&good[..cut]).is_err(), "cut at {cut}");
        }
        let mut longer = good.clone();
        longer.push(0);
        assert!(check(&longer).is_err());
        let mut v99 = good.clone();
        v99[8..12].copy_from_slice(&99u32.to_le_bytes());
        assert!(matches!(check(&v99), Err(SnapshotError::UnsupportedVersion(99))));
        // Flip payload bytes in turn: every one is caught.
        for i in (V3_HEADER_LEN..good.len()).step_by(5) {
            let mut bad = good.clone();
            bad[i] ^= 0x40;
            assert!(check(&bad).is_err(), "byte {i}");
        }
        // A frame claiming more bytes than the file has allocates nothing.
        let mut huge = good.clone();
        huge[V3_HEADER_LEN + 8..V3_HEADER_LEN + 16].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(check(&huge), Err(SnapshotError::BadFrame { offset: 16, .. })));
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_valid_hash_over_a_bad_archive_is_still_rejected() {
        // Someone who recomputes the hash cannot get an unvalidated archive
        // past bytecheck.
        let d = dir("forged");
        write(&d, &[&sample()]);
        let path = d.join(FILE_NAME);
        let mut bytes = fs::read(&path).unwrap();
        let len = {
            let mut b = [0u8; 8];
            b.copy_from_slice(&bytes[V3_HEADER_LEN + 8..V3_HEADER_LEN + 16]);
            u64::from_le_bytes(b) as usize
        };
        let start = V3_HEADER_LEN + FRAME_HEADER_LEN;
        for b in &mut bytes[start + len - 16..start + len] {
            *b = 0xff;
        }
        let sum = *blake3::hash(&bytes[start..start + len]).as_bytes();
        bytes[V3_HEADER_LEN + 16..V3_HEADER_LEN + 48].copy_from_slice(&sum);
        fs::write(&path, &bytes).unwrap();
        assert!(matches!(read(&path), Err(SnapshotError::BadFrame { .. }) | Err(SnapshotError::BadEntry(_))));
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn an_aborted_writer_leaves_the_old_file() {
        let d = dir("abort");
        write(&d, &[&sample()]);
        let before = fs::read(d.join(FILE_NAME)).unwrap();
        let mut w = Writer::create(&Dir::open(&d).unwrap()).unwrap();
        w.write_entries(&sample()).unwrap();
        w.abort();
        assert_eq!(fs::read(d.join(FILE_NAME)).unwrap(), before);
        assert_eq!(fs::read_dir(&d).unwrap().count(), 1);
        fs::remove_dir_all(&d).unwrap();
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

    fn versioned(entries: Vec<Entry>) -> Vec<Entry> {
        entries
            .into_iter()
            .enumerate()
            .map(|(i, mut e)| {
                e.set_version(1_000 + i as u64);
                e
            })
            .collect()
    }

    fn golden(name: &str) -> (Meta, Vec<Entry>) {
        read(Path::new(&format!("{}/tests/golden/{name}", env!("CARGO_MANIFEST_DIR")))).unwrap()
    }

    /// The committed golden file of every format must load forever.
    #[test]
    fn golden_v1_loads() {
        let (meta, entries) = golden("snapshot-v1.rkyv");
        assert_eq!((meta.secret_key.as_bytes(), meta.format), (&[7u8; 32], 1));
        assert_eq!(entries, golden_entries());
    }

    #[test]
    fn golden_v2_loads() {
        let (meta, entries) = golden("snapshot-v2.rkyv");
        assert_eq!((meta.secret_key.as_bytes(), meta.format, meta.max_version), (&[7u8; 32], 2, 1_003));
        assert_eq!(entries, versioned(golden_entries()));
    }

    fn golden_v3_entries() -> Vec<Entry> {
        let mut entries = versioned(golden_entries());
        entries[0].set_creator(0xffff_ffff_c000_0201);
        entries
    }

    #[test]
    fn golden_v3_loads() {
        let (meta, entries) = golden("snapshot-v3.rkyv");
        assert_eq!((meta.secret_key.as_bytes(), meta.format), (&[7u8; 32], 3));
        assert_eq!((meta.created_unix_ms, meta.replay_from, meta.max_version), (1_764_000_000_000, 4, 2_000));
        assert_eq!(meta.covered_version, 0, "format 3 covers nothing: everything after replay_from is replayed");
        assert_eq!(entries, golden_v3_entries());
    }

    #[test]
    fn golden_v4_loads() {
        let (meta, entries) = golden("snapshot-v4.rkyv");
        assert_eq!((meta.secret_key.as_bytes(), meta.format), (&[7u8; 32], 4));
        assert_eq!((meta.created_unix_ms, meta.replay_from, meta.max_version), (1_764_000_000_000, 4, 2_000));
        assert_eq!(meta.covered_version, 1_500);
        assert_eq!(entries, golden_v3_entries());
    }

    /// Writes the golden file of the current format version (run by hand when
    /// adding a format version: `cargo test write_golden -- --ignored`, after
    /// renaming this test and the file). Never overwrite an older one.
    #[test]
    #[ignore = "writes tests/golden; run by hand for a new format"]
    fn write_golden_v4() {
        assert_eq!(FORMAT_VERSION, 4, "add a new golden file for a new version");
        let d = dir("golden");
        let mut w = Writer::create(&Dir::open(&d).unwrap()).unwrap();
        let entries = golden_v3_entries();
        w.write_entries(&entries[..2]).unwrap();
        w.write_entries(&entries[2..]).unwrap();
        let cover = Cover { replay_from: 4, covered_version: 1_500, max_version: 2_000 };
        w.publish(&SecretKey::from_bytes([7; 32]), 1_764_000_000_000, cover).unwrap();
        fs::copy(d.join(FILE_NAME), concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden/snapshot-v4.rkyv")).unwrap();
        fs::remove_dir_all(&d).unwrap();
    }
}
