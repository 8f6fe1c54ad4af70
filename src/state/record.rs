//! Write-ahead log records: the bytes a core appends for every change it
//! applies, and the reader that checks them on recovery.
//!
//! Records are full states, not diffs: a `Put` carries the whole entry (key,
//! value, owner-secret hash, expiry, version, creating network), a `Delete`
//! the key and the version the delete was given. Replaying one twice, or
//! replaying an older one after a newer one, cannot change the outcome: the
//! higher version wins. That is what lets a fuzzy snapshot plus the log
//! after its start rebuild exactly the acknowledged state.
//!
//! Layout (little endian): `u32 body length`, `u32 CRC-32 of the body`,
//! then the body: `u8 kind`, `u64 version`, `u16 key length`, and for a put
//! `u64 expiry (Unix ms)`, `u64 creator`, `u8 flags` (bit 0: has secret),
//! the 32-byte secret hash if any, the key, the value; for a delete, the key.
//! A sync mark's body is `u8 kind`, `u64 segment`, `u64 synced to`.
//!
//! Sync marks: after a sync, the log appends a mark saying how far the
//! segment (named by its sequence number) is on the disk. They change no
//! key; recovery uses them to tell a power loss from damage. On a
//! filesystem that does not write a file's data in order (ext4 without a
//! journal, XFS), a power loss can leave the unsynced end of a segment
//! with blocks of zeros or stale bytes followed by blocks that did land,
//! valid records included: without marks that reads like damage, and
//! startup stopped until someone cut the file. A bad record that no later
//! mark of its segment says was synced is in such an end, and is cut with
//! everything after it (it was within what `-fsync` may lose); one that a
//! later mark covers is damage, and recovery stops. A bad record with no
//! mark before it in its segment (written before the segment's first
//! sync, or by a version without marks) is judged as before
//! (`read_stream`).
//!
//! `Journal` is the append side, one per core, filled by every change the
//! core applies to any shard (pure: bytes in memory; the runtime writes
//! them out). `Reader` walks a segment's bytes and tells
//! a torn tail (a crash mid-append: cut it) from damage (stop and say where).

use crate::state::entry::{Entry, MAX_KEY_LEN};
use crate::state::secret::SecretHash;

const KIND_PUT: u8 = 1;
const KIND_DELETE: u8 = 2;
const KIND_MARK: u8 = 3;
/// A sync mark's body: kind, segment, synced-to offset.
const MARK_BODY: usize = 1 + 8 + 8;
/// A sync mark's length in the log.
pub const MARK_LEN: usize = FRAME + MARK_BODY;
const FLAG_SECRET: u8 = 1;
/// Length prefix + checksum.
pub const FRAME: usize = 8;
/// Largest body a valid record can have (a 1 GiB value, a long key, headers).
pub const MAX_BODY: usize = (1 << 30) + MAX_KEY_LEN + 128;

/// One decoded record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    Put { entry: Entry, creator: u64 },
    Delete { key: Box<[u8]>, version: u64 },
}

impl Record {
    pub fn key(&self) -> &[u8] {
        match self {
            Record::Put { entry, .. } => entry.key(),
            Record::Delete { key, .. } => key,
        }
    }

    pub fn version(&self) -> u64 {
        match self {
            Record::Put { entry, .. } => entry.version(),
            Record::Delete { version, .. } => *version,
        }
    }
}

/// Appends the record of a stored entry to `out`.
pub fn encode_put(out: &mut Vec<u8>, entry: &Entry, creator: u64) {
    let (key, value, secret) = (entry.key(), entry.value(), entry.secret());
    let body_len = 1 + 8 + 2 + 8 + 8 + 1 + secret.map_or(0, |_| 32) + key.len() + value.len();
    let start = begin(out, body_len);
    out.push(KIND_PUT);
    out.extend_from_slice(&entry.version().to_le_bytes());
    out.extend_from_slice(&(key.len() as u16).to_le_bytes());
    out.extend_from_slice(&entry.expires_ms.to_le_bytes());
    out.extend_from_slice(&creator.to_le_bytes());
    match secret {
        Some(s) => {
            out.push(FLAG_SECRET);
            out.extend_from_slice(s);
        }
        None => out.push(0),
    }
    out.extend_from_slice(key);
    out.extend_from_slice(value);
    finish(out, start);
}

/// Where a segment stood on the disk when a sync returned: every byte of
/// segment `segment` below `synced_to` was synced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SyncMark {
    pub segment: u64,
    pub synced_to: u64,
}

/// Appends a sync mark to `out`.
pub fn encode_mark(out: &mut Vec<u8>, mark: SyncMark) {
    let start = begin(out, MARK_BODY);
    out.push(KIND_MARK);
    out.extend_from_slice(&mark.segment.to_le_bytes());
    out.extend_from_slice(&mark.synced_to.to_le_bytes());
    finish(out, start);
}

/// The sync mark at the start of `bytes`, if a valid one starts there.
pub fn mark_at(bytes: &[u8]) -> Option<SyncMark> {
    let (len, crc) = frame(bytes)?;
    let body = bytes.get(FRAME..FRAME + MARK_BODY)?;
    if len != MARK_BODY || body[0] != KIND_MARK || crc32fast::hash(body) != crc {
        return None;
    }
    mark_at_body(body)
}

/// Appends the record of a deleted key to `out`.
pub fn encode_delete(out: &mut Vec<u8>, key: &[u8], version: u64) {
    let start = begin(out, 1 + 8 + 2 + key.len());
    out.push(KIND_DELETE);
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&(key.len() as u16).to_le_bytes());
    out.extend_from_slice(key);
    finish(out, start);
}

fn begin(out: &mut Vec<u8>, body_len: usize) -> usize {
    out.reserve(FRAME + body_len);
    let start = out.len();
    out.extend_from_slice(&(body_len as u32).to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    start
}

fn finish(out: &mut [u8], start: usize) {
    let crc = crc32fast::hash(&out[start + FRAME..]);
    out[start + 4..start + FRAME].copy_from_slice(&crc.to_le_bytes());
}

/// Why a record could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordError {
    /// The bytes end inside a record (or inside its length prefix).
    Incomplete,
    /// The checksum does not match.
    Checksum,
    /// The checksum matches but the body makes no sense.
    Malformed(&'static str),
    /// The length prefix is larger than any record can be.
    TooLong(u64),
}

impl std::fmt::Display for RecordError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RecordError::Incomplete => f.write_str("the record is cut short"),
            RecordError::Checksum => f.write_str("checksum mismatch"),
            RecordError::Malformed(why) => write!(f, "malformed record ({why})"),
            RecordError::TooLong(n) => write!(f, "record length {n} is impossible"),
        }
    }
}

/// The body length and checksum a record's frame at the start of `bytes`
/// declares, if the frame is all there.
fn frame(bytes: &[u8]) -> Option<(usize, u32)> {
    let head = bytes.get(..FRAME)?;
    let word = |i: usize| u32::from_le_bytes([head[i], head[i + 1], head[i + 2], head[i + 3]]);
    Some((word(0) as usize, word(4)))
}

/// The shortest body a record has: a delete of a one-byte key.
const MIN_BODY: usize = 1 + 8 + 2 + 1;

/// What a log holds: records of changes, and sync marks.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Item {
    Record(Record),
    Mark(SyncMark),
}

/// Decodes the record at the start of `bytes`; returns it and its length.
/// A sync mark there is `Malformed`: it is no change.
pub fn decode(bytes: &[u8]) -> Result<(Record, usize), RecordError> {
    match decode_item(bytes)? {
        (Item::Record(rec), n) => Ok((rec, n)),
        (Item::Mark(_), _) => Err(RecordError::Malformed("a sync mark, not a change")),
    }
}

/// Decodes the record or mark at the start of `bytes`, and its length.
fn decode_item(bytes: &[u8]) -> Result<(Item, usize), RecordError> {
    let Some((body_len, crc)) = frame(bytes) else { return Err(RecordError::Incomplete) };
    if body_len > MAX_BODY {
        return Err(RecordError::TooLong(body_len as u64));
    }
    let Some(body) = bytes.get(FRAME..FRAME + body_len) else { return Err(RecordError::Incomplete) };
    if crc32fast::hash(body) != crc {
        return Err(RecordError::Checksum);
    }
    Ok((decode_body(body)?, FRAME + body_len))
}

/// A cursor over the body's fields.
struct Fields<'a>(&'a [u8]);

impl<'a> Fields<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], RecordError> {
        if self.0.len() < n {
            return Err(RecordError::Malformed("fields run past the end"));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }

    fn u8(&mut self) -> Result<u8, RecordError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, RecordError> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn u64(&mut self) -> Result<u64, RecordError> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }
}

fn decode_body(body: &[u8]) -> Result<Item, RecordError> {
    if body.first() == Some(&KIND_MARK) {
        return match mark_at_body(body) {
            Some(mark) => Ok(Item::Mark(mark)),
            None => Err(RecordError::Malformed("sync mark of the wrong length")),
        };
    }
    decode_change(body).map(Item::Record)
}

fn mark_at_body(body: &[u8]) -> Option<SyncMark> {
    let mut f = Fields(body);
    let _kind = f.u8().ok()?;
    let segment = f.u64().ok()?;
    let synced_to = f.u64().ok()?;
    f.0.is_empty().then_some(SyncMark { segment, synced_to })
}

fn decode_change(body: &[u8]) -> Result<Record, RecordError> {
    let mut f = Fields(body);
    let kind = f.u8()?;
    let version = f.u64()?;
    let key_len = f.u16()? as usize;
    if key_len == 0 {
        return Err(RecordError::Malformed("empty key"));
    }
    match kind {
        KIND_PUT => {
            let expires_ms = f.u64()?;
            let creator = f.u64()?;
            let flags = f.u8()?;
            let secret: Option<SecretHash> = if flags & FLAG_SECRET != 0 {
                let mut s = [0u8; 32];
                s.copy_from_slice(f.take(32)?);
                Some(s)
            } else {
                None
            };
            let key = f.take(key_len)?;
            let value = f.0;
            let mut entry = Entry::new(key, value, secret.as_ref(), expires_ms)
                .map_err(|_| RecordError::Malformed("key too long"))?;
            entry.set_version(version);
            Ok(Record::Put { entry, creator })
        }
        KIND_DELETE => {
            let key = f.take(key_len)?;
            if !f.0.is_empty() {
                return Err(RecordError::Malformed("bytes after a delete"));
            }
            Ok(Record::Delete { key: key.into(), version })
        }
        _ => Err(RecordError::Malformed("unknown kind")),
    }
}

/// What reading a whole segment found.
#[derive(Debug, PartialEq, Eq)]
pub enum Tail {
    /// Every byte belongs to a valid record.
    Clean,
    /// The segment ends in a torn record at this offset (a crash mid-append):
    /// everything from there on is to be cut.
    Torn { at: u64, why: RecordError },
    /// A bad record at this offset that no later sync mark covers, with a
    /// mark before it: the unsynced end a power loss left partly written.
    /// Everything from there on is to be cut.
    Unsynced { at: u64, why: RecordError },
}

/// Damage: a bad record followed by more data, at this byte offset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damage {
    pub offset: u64,
    pub why: RecordError,
}

/// Walks the records of segment `segment`'s bytes, calling `f` for each
/// valid one, and classifies how the bytes end (see `read_stream`).
pub fn read_all(bytes: &[u8], segment: u64, f: impl FnMut(Record)) -> Result<Tail, Damage> {
    // Reading from memory cannot fail.
    read_stream(bytes, bytes.len() as u64, segment, f)
        .unwrap_or(Err(Damage { offset: 0, why: RecordError::Malformed("unreadable") }))
}

/// How much is read at a time (a record longer than this grows the buffer
/// to its own size, at most `MAX_BODY`).
const READ_BLOCK: usize = 8 << 20;

/// Walks the records of a segment of `size` bytes read from `r`, calling
/// `f` for each valid one, holding at most one record plus a block in
/// memory, and classifies how the segment ends.
///
/// A record that is cut short, or whose checksum fails while it ends
/// exactly at the end of the file, is a torn tail (the length reached the
/// disk, the body did not); so is a tail of zeroes (a filesystem that grew
/// the file before the data landed). Any other bad record is judged by the
/// segment's sync marks (`segment` is its sequence number; a mark naming
/// another segment is a copy a retry moved, and says nothing here): one
/// after it saying its bytes were synced makes it damage; with none, in a
/// segment with a mark before it, it is the unsynced end a power loss left
/// (`Tail::Unsynced`). In a segment without marks before it, it is damage.
pub fn read_stream(
    mut r: impl std::io::Read,
    size: u64,
    segment: u64,
    mut f: impl FnMut(Record),
) -> std::io::Result<Result<Tail, Damage>> {
    let mut buf: Vec<u8> = Vec::new();
    let mut start = 0usize;
    let mut offset = 0u64;
    let mut eof = false;
    // A mark of this segment was read.
    let mut marked = false;
    loop {
        loop {
            let rest = &buf[start..];
            if rest.is_empty() && eof {
                return Ok(Ok(Tail::Clean));
            }
            match decode_item(rest) {
                Ok((item, n)) => {
                    match item {
                        Item::Record(rec) => f(rec),
                        Item::Mark(mark) => marked |= mark.segment == segment,
                    }
                    start += n;
                    offset += n as u64;
                }
                Err(RecordError::Incomplete) if !eof => break,
                Err(why) => {
                    // Only a checksum or body error reads it, and those
                    // have a whole frame.
                    let declared = frame(rest).map(|(n, _)| n as u64);
                    let ends_at_eof = declared.map(|n| offset + FRAME as u64 + n) == Some(size);
                    let torn = match why {
                        RecordError::Incomplete => true,
                        RecordError::Checksum | RecordError::Malformed(_) => ends_at_eof,
                        RecordError::TooLong(_) => false,
                    };
                    // A length corrupted on the disk looks like a record cut
                    // short at the end: valid records after it, to the end,
                    // tell them apart, and stop recovery rather than cut
                    // away what was acknowledged.
                    let torn = torn && !one_bit_off(rest) && !records_follow(rest.get(1..).unwrap_or_default());
                    if torn {
                        return Ok(Ok(Tail::Torn { at: offset, why }));
                    }
                    // Without a mark before it, marks after it cannot
                    // change the verdict: only zeros are looked for.
                    let after = scan_rest(rest, &mut r, marked.then_some(segment), offset)?;
                    if after.zero {
                        return Ok(Ok(Tail::Torn { at: offset, why }));
                    }
                    if !after.covered && marked {
                        return Ok(Ok(Tail::Unsynced { at: offset, why }));
                    }
                    return Ok(Err(Damage { offset, why }));
                }
            }
        }
        buf.drain(..start);
        start = 0;
        let want =
            frame(&buf).map_or(0, |(n, _)| (FRAME + n).saturating_sub(buf.len())).clamp(READ_BLOCK / 8, READ_BLOCK);
        let have = buf.len();
        buf.resize(have + want, 0);
        let n = read_up_to(&mut r, &mut buf[have..])?;
        buf.truncate(have + n);
        if n == 0 {
            eof = true;
        }
    }
}

/// How far past a bad record `records_follow` looks for the start of valid
/// records, and how many bytes it may checksum doing so. Past either it
/// stops looking and the bad record counts as torn, as it would without
/// the look.
const SCAN_WINDOW: usize = 16 << 20;
const SCAN_CRC: usize = 256 << 20;

/// Whether `bytes` ends in valid records back to back, the first starting
/// in its first `SCAN_WINDOW` bytes. What a crash leaves after a torn
/// record is that record's own partial bytes: records running from there
/// to the very end mean the bad one was not torn but damaged, its length
/// field corrupted to claim the rest of the file (a cut there would drop
/// every record after it). A value that holds encoded records is the
/// record's own bytes too; it passes for damage only if the crash cut it
/// exactly at the end of one of them.
fn records_follow(bytes: &[u8]) -> bool {
    let mut budget = SCAN_CRC;
    for p in 0..bytes.len().min(SCAN_WINDOW) {
        let Some(len) = plausible(&bytes[p..]) else { continue };
        let end = p + FRAME + len;
        // The run's first record ends at the end or before another.
        if end != bytes.len() && plausible(&bytes[end..]).is_none() {
            continue;
        }
        let mut at = p;
        while let Some(len) = plausible(&bytes[at..]) {
            if len > budget {
                return false;
            }
            budget -= len;
            let Ok((_, n)) = decode_item(&bytes[at..]) else { break };
            at += n;
            if at == bytes.len() {
                return true;
            }
        }
    }
    false
}

/// Whether the bad record at the start of `bytes` checks out with one bit
/// of its length field flipped back: a length corrupted on the disk, found
/// however far away its record ends (`records_follow` looks only so far).
fn one_bit_off(bytes: &[u8]) -> bool {
    let Some((len, crc)) = frame(bytes) else { return false };
    (0..32).any(|bit| {
        let len = len ^ (1 << bit);
        (MIN_BODY..=MAX_BODY).contains(&len)
            && bytes
                .get(FRAME..FRAME + len)
                .is_some_and(|body| crc32fast::hash(body) == crc && decode_body(body).is_ok())
    })
}

/// The body length of what could be a record at the start of `bytes`: a
/// length in range, the whole body present, a known kind.
fn plausible(bytes: &[u8]) -> Option<usize> {
    let (len, _) = frame(bytes)?;
    if !(MIN_BODY..=MAX_BODY).contains(&len) {
        return None;
    }
    let body = bytes.get(FRAME..FRAME + len)?;
    matches!(body[0], KIND_PUT | KIND_DELETE | KIND_MARK).then_some(len)
}

fn read_up_to(r: &mut impl std::io::Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// What a segment holds from a bad record on.
#[derive(Debug, Default)]
struct Rest {
    /// Nothing but zero bytes.
    zero: bool,
    /// A sync mark of the segment says the bad record's bytes were synced.
    covered: bool,
}

/// Reads the segment from a bad record at `at` to its end (`rest`, then
/// what `r` has left): whether it is all zeros, and, given the segment's
/// number (`marks_of`), whether a sync mark of it covers `at`. Marks are
/// looked for at every byte offset: the bad record's frame cannot be
/// trusted to say where the next record starts. A mark counts only if it
/// claims no more than the bytes before itself (as every mark the log
/// writes does). Marks found this way can sit inside a value a client
/// wrote, so they can only stop recovery (damage), never let it cut:
/// whether the segment has marks at all is judged from those read on
/// record boundaries. Not looking for marks, it stops at the first
/// non-zero byte.
fn scan_rest(rest: &[u8], r: &mut impl std::io::Read, marks_of: Option<u64>, at: u64) -> std::io::Result<Rest> {
    const BLOCK: usize = 1 << 20;
    // A mark may straddle two reads: keep its length less one byte.
    const KEEP: usize = MARK_LEN - 1;
    let mut found = Rest { zero: true, covered: false };
    let look = |window: &[u8], base: u64, upto: usize, found: &mut Rest| {
        found.zero &= window[..upto].iter().all(|&b| b == 0);
        let Some(segment) = marks_of else { return };
        for i in 0..upto {
            if let Some(mark) = mark_at(&window[i..]) {
                let here = base + i as u64;
                found.covered |= mark.segment == segment && mark.synced_to <= here && mark.synced_to > at;
            }
        }
    };
    // `rest` in place (it can be as long as a record, up to `MAX_BODY`),
    // but for its last bytes, scanned with what follows.
    let upto = rest.len().saturating_sub(KEEP);
    look(rest, at, upto, &mut found);
    let mut window: Vec<u8> = rest[upto..].to_vec();
    let mut base = at + upto as u64;
    loop {
        if !found.zero && marks_of.is_none() {
            return Ok(found);
        }
        let have = window.len();
        window.resize(have + BLOCK, 0);
        let n = read_up_to(r, &mut window[have..])?;
        window.truncate(have + n);
        let ended = n == 0;
        let upto = if ended { window.len() } else { window.len().saturating_sub(KEEP) };
        look(&window, base, upto, &mut found);
        if ended {
            return Ok(found);
        }
        window.drain(..upto);
        base += upto as u64;
    }
}

/// The append side of one core's log: records as bytes, and how many bytes
/// have been appended since start (the log sequence number the runtime
/// waits on before answering).
#[derive(Debug, Default)]
pub struct Journal {
    enabled: bool,
    /// Writes are refused (the log cannot be written right now).
    refusing: bool,
    buf: Vec<u8>,
    lsn: u64,
}

impl Journal {
    /// A journal that records (persistence on).
    pub fn enabled() -> Self {
        Journal { enabled: true, ..Default::default() }
    }

    pub fn put(&mut self, entry: &Entry, creator: u64) {
        if self.enabled {
            let before = self.buf.len();
            encode_put(&mut self.buf, entry, creator);
            self.lsn += (self.buf.len() - before) as u64;
        }
    }

    pub fn delete(&mut self, key: &[u8], version: u64) {
        if self.enabled {
            let before = self.buf.len();
            encode_delete(&mut self.buf, key, version);
            self.lsn += (self.buf.len() - before) as u64;
        }
    }

    /// Bytes appended since start.
    pub fn lsn(&self) -> u64 {
        self.lsn
    }

    /// Bytes appended and not yet taken.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }

    /// Takes the pending bytes, leaving `spare` (an emptied buffer from an
    /// earlier take) to append into, so steady state allocates nothing.
    pub fn take(&mut self, spare: Vec<u8>) -> Vec<u8> {
        let mut spare = spare;
        spare.clear();
        std::mem::replace(&mut self.buf, spare)
    }

    pub fn refusing(&self) -> bool {
        self.refusing
    }

    /// Set while the log cannot be written: writes are refused before they
    /// change anything.
    pub fn set_refusing(&mut self, on: bool) {
        self.refusing = on;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(key: &[u8], value: &[u8], secret: Option<SecretHash>, version: u64) -> Entry {
        let mut e = Entry::new(key, value, secret.as_ref(), 1_700_000_000_000).unwrap();
        e.set_version(version);
        e
    }

    fn sample() -> (Vec<u8>, Vec<Record>) {
        let recs = vec![
            Record::Put { entry: entry(b"k1", b"v1", None, 10), creator: 7 },
            Record::Put { entry: entry(b"k2", &[0, 255, 10], Some([9; 32]), 11), creator: 0 },
            Record::Delete { key: (*b"k1").into(), version: 12 },
            Record::Put { entry: entry(b"k3", b"", None, 13), creator: u64::MAX },
        ];
        let mut bytes = Vec::new();
        for r in &recs {
            match r {
                Record::Put { entry, creator } => encode_put(&mut bytes, entry, *creator),
                Record::Delete { key, version } => encode_delete(&mut bytes, key, *version),
            }
        }
        (bytes, recs)
    }

    /// Records `k0..` of `n` bytes' values, then `at` of their starts.
    fn puts(bytes: &mut Vec<u8>, n: usize, from: u64) -> Vec<usize> {
        (0..n as u64)
            .map(|i| {
                let start = bytes.len();
                encode_put(bytes, &entry(format!("k{}", from + i).as_bytes(), &[b'v'; 100], None, from + i), 0);
                start
            })
            .collect()
    }

    fn mark(bytes: &mut Vec<u8>, segment: u64, synced_to: usize) {
        encode_mark(bytes, SyncMark { segment, synced_to: synced_to as u64 });
    }

    #[test]
    fn sync_marks_change_nothing_and_are_read_past() {
        let (mut bytes, recs) = sample();
        let synced = bytes.len();
        mark(&mut bytes, 3, synced);
        assert_eq!(mark_at(&bytes[synced..]), Some(SyncMark { segment: 3, synced_to: synced as u64 }));
        assert!(decode(&bytes[synced..]).is_err(), "a mark is not a change");
        let (more, _) = sample();
        bytes.extend_from_slice(&more);
        let mut got = Vec::new();
        assert_eq!(read_all(&bytes, 3, |r| got.push(r)), Ok(Tail::Clean));
        assert_eq!(got, [recs.clone(), recs].concat());
    }

    #[test]
    fn a_bad_record_after_the_last_mark_is_the_unsynced_end_a_power_loss_left() {
        // Ten records, a mark saying they are synced, ten more; then the
        // block holding records 12-13 never reached the disk (zeros) while
        // later ones did.
        let mut bytes = Vec::new();
        puts(&mut bytes, 10, 0);
        let synced = bytes.len();
        mark(&mut bytes, 7, synced);
        let after = puts(&mut bytes, 10, 10);
        let hole = after[2]..after[4];
        bytes[hole.clone()].fill(0);
        let mut got = Vec::new();
        let tail = read_all(&bytes, 7, |r| got.push(r));
        assert!(matches!(tail, Ok(Tail::Unsynced { at, .. }) if at == hole.start as u64), "{tail:?}");
        assert_eq!(got.len(), 12, "the records before the hole are read");
        // Stale bytes instead of zeros: the same.
        let mut stale = bytes.clone();
        for (i, b) in stale[hole.clone()].iter_mut().enumerate() {
            *b = (i * 31 + 7) as u8;
        }
        assert!(matches!(read_all(&stale, 7, |_| {}), Ok(Tail::Unsynced { at, .. }) if at == hole.start as u64));
        // A mark naming another segment (a retry's copy) says nothing
        // here: without marks of its own the segment is judged as before.
        assert!(matches!(read_all(&bytes, 8, |_| {}), Err(Damage { offset, .. }) if offset == hole.start as u64));
    }

    #[test]
    fn a_bad_record_a_later_mark_covers_is_damage() {
        let mut bytes = Vec::new();
        let starts = puts(&mut bytes, 10, 0);
        let synced = bytes.len();
        puts(&mut bytes, 3, 10);
        mark(&mut bytes, 7, synced);
        bytes[starts[4] + 20] ^= 0x55;
        assert!(matches!(read_all(&bytes, 7, |_| {}), Err(Damage { offset, .. }) if offset == starts[4] as u64));
        // A mark claiming more than the bytes before it is no mark: the
        // bad record is then the unsynced end (an earlier mark exists).
        let mut bytes = Vec::new();
        puts(&mut bytes, 2, 0);
        let first = bytes.len();
        mark(&mut bytes, 7, first);
        let starts = puts(&mut bytes, 5, 2);
        let bogus = bytes.len() + 1000;
        mark(&mut bytes, 7, bogus);
        bytes[starts[1] + 20] ^= 0x55;
        assert!(matches!(read_all(&bytes, 7, |_| {}), Ok(Tail::Unsynced { at, .. }) if at == starts[1] as u64));
    }

    #[test]
    fn a_covering_mark_is_found_however_far_and_wherever_reads_split_it() {
        // `read_stream` reads 1 MiB first: a mark just before, across or
        // after that boundary is found, and only a covering one counts.
        for shift in 0..=26 {
            let mut bytes = Vec::new();
            let starts = puts(&mut bytes, 1, 0);
            let end = bytes.len();
            mark(&mut bytes, 7, end);
            let bad = bytes.len();
            puts(&mut bytes, 2, 1);
            bytes[bad + FRAME + 3] ^= 0x55;
            let at = (1 << 20) - (FRAME + MARK_BODY) + shift;
            let mut garbage = (0..).map(|i: usize| (i % 251) as u8 | 1);
            bytes.resize_with(at, || garbage.next().unwrap_or(1));
            let mut covering = bytes.clone();
            mark(&mut covering, 7, bad + 1);
            mark(&mut bytes, 7, bad);
            let tail = read_all(&covering, 7, |_| {});
            assert!(matches!(tail, Err(Damage { offset, .. }) if offset == bad as u64), "shift {shift}: {tail:?}");
            let tail = read_all(&bytes, 7, |_| {});
            assert!(matches!(tail, Ok(Tail::Unsynced { at, .. }) if at == bad as u64), "shift {shift}: {tail:?}");
            assert_eq!(starts, [0]);
        }
    }

    #[test]
    fn marks_read_only_past_a_bad_record_never_let_it_be_cut() {
        // No mark before the bad record: a mark found past it (it could sit
        // inside a client's value) can make it damage, never the unsynced end.
        let mut bytes = Vec::new();
        let starts = puts(&mut bytes, 3, 0);
        mark(&mut bytes, 7, 10);
        bytes[starts[1] + 20] ^= 0x55;
        assert!(matches!(read_all(&bytes, 7, |_| {}), Err(Damage { offset, .. }) if offset == starts[1] as u64));
    }

    #[test]
    fn round_trip() {
        let (bytes, recs) = sample();
        let mut got = Vec::new();
        assert_eq!(read_all(&bytes, 0, |r| got.push(r)), Ok(Tail::Clean));
        assert_eq!(got, recs);
        assert_eq!(got[1].key(), b"k2");
        assert_eq!(got[2].version(), 12);
    }

    #[test]
    fn a_torn_tail_is_cut_at_the_last_good_record() {
        let (bytes, recs) = sample();
        // Cut anywhere inside the last record: the first three survive.
        let last_start = {
            let mut pos = 0;
            for _ in 0..3 {
                pos += decode(&bytes[pos..]).unwrap().1;
            }
            pos
        };
        for cut in last_start + 1..bytes.len() {
            let mut got = Vec::new();
            let tail = read_all(&bytes[..cut], 0, |r| got.push(r)).unwrap();
            assert!(matches!(tail, Tail::Torn { at, .. } if at == last_start as u64), "cut {cut}");
            assert_eq!(got, recs[..3]);
        }
        // The last record's body scrambled (its length made it to disk, its
        // bytes did not): torn, not damage.
        let mut scrambled = bytes.clone();
        let n = scrambled.len();
        scrambled[n - 1] ^= 0xff;
        assert!(matches!(read_all(&scrambled, 0, |_| {}), Ok(Tail::Torn { .. })));
        // Zeroes after the last record (a filesystem that extended the file).
        let mut zeroed = bytes.clone();
        zeroed.extend_from_slice(&[0; 100]);
        let mut got = Vec::new();
        assert!(matches!(read_all(&zeroed, 0, |r| got.push(r)), Ok(Tail::Torn { .. })));
        assert_eq!(got, recs);
    }

    #[test]
    fn a_corrupted_length_that_reaches_past_the_end_is_damage_not_a_torn_tail() {
        let (bytes, _) = sample();
        let first_len = decode(&bytes).unwrap().1;
        // The second record's length grown past the end of the file: read
        // alone it is cut short, but valid records follow it.
        let mut bad = bytes.clone();
        let claimed = (bytes.len() as u32) * 2;
        bad[first_len..first_len + 4].copy_from_slice(&claimed.to_le_bytes());
        assert_eq!(read_all(&bad, 0, |_| {}), Err(Damage { offset: first_len as u64, why: RecordError::Incomplete }));
        // The same length on the last record, with nothing valid after it,
        // is still a torn tail.
        let last = bytes.len() - decode_tail_len(&bytes);
        let mut torn = bytes.clone();
        torn[last..last + 4].copy_from_slice(&claimed.to_le_bytes());
        assert!(matches!(read_all(&torn, 0, |_| {}), Ok(Tail::Torn { at, .. }) if at == last as u64));
        // A value that holds a record's bytes, torn by a crash: torn, unless
        // the cut falls exactly at the end of the record it holds (then the
        // reader cannot tell it from a corrupted length: recovery stops and
        // says where, and nothing is cut).
        let mut inner = Vec::new();
        encode_delete(&mut inner, b"x", 5);
        let inner_len = inner.len();
        inner.extend_from_slice(b"zzzz");
        let mut held = Vec::new();
        encode_put(&mut held, &entry(b"k", &inner, None, 6), 0);
        let inner_end = held.len() - 4;
        for cut in inner_end - inner_len + 1..held.len() {
            let tail = read_all(&held[..cut], 0, |_| {});
            if cut == inner_end {
                assert!(matches!(tail, Err(Damage { offset: 0, .. })), "cut {cut}: {tail:?}");
            } else {
                assert!(matches!(tail, Ok(Tail::Torn { at: 0, .. })), "cut {cut}: {tail:?}");
            }
        }
    }

    #[test]
    fn a_flipped_length_bit_is_damage_however_long_the_record() {
        // A record longer than the look past a bad one, its length's bit
        // 26 flipped on the disk: it claims 64 MiB more than the file has.
        let value = vec![7u8; 17 << 20];
        let (mut bytes, _) = sample();
        let at = bytes.len();
        encode_put(&mut bytes, &entry(b"big", &value, None, 20), 0);
        encode_delete(&mut bytes, b"k1", 21);
        bytes[at + 3] ^= 1 << 2;
        assert!(matches!(read_all(&bytes, 0, |_| {}), Err(Damage { offset, .. }) if offset == at as u64));
    }

    #[test]
    fn a_large_torn_value_of_random_bytes_is_still_a_torn_tail() {
        // 18 MiB of noise (compressed or encrypted data), cut at 17 MiB: more
        // than the look's window and, by chance, its checksum budget.
        use std::hash::Hasher;
        let value: Vec<u8> = (0..(18u64 << 20) / 8)
            .flat_map(|i| {
                let mut h = std::hash::DefaultHasher::new();
                h.write_u64(i);
                h.finish().to_le_bytes()
            })
            .collect();
        let (mut bytes, recs) = sample();
        let at = bytes.len() as u64;
        encode_put(&mut bytes, &entry(b"big", &value, None, 20), 0);
        bytes.truncate(at as usize + (17 << 20));
        let mut got = Vec::new();
        assert!(matches!(read_all(&bytes, 0, |r| got.push(r)), Ok(Tail::Torn { at: a, .. }) if a == at));
        assert_eq!(got, recs);
    }

    /// The length of the last record in `bytes`.
    fn decode_tail_len(bytes: &[u8]) -> usize {
        let mut pos = 0;
        let mut last = 0;
        while pos < bytes.len() {
            last = decode(&bytes[pos..]).unwrap().1;
            pos += last;
        }
        last
    }

    #[test]
    fn damage_before_the_tail_says_where() {
        let (bytes, _) = sample();
        let first_len = decode(&bytes).unwrap().1;
        let mut bad = bytes.clone();
        bad[first_len + FRAME + 3] ^= 0x01;
        assert_eq!(read_all(&bad, 0, |_| {}), Err(Damage { offset: first_len as u64, why: RecordError::Checksum }));
        let mut huge = bytes.clone();
        huge[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(read_all(&huge, 0, |_| {}), Err(Damage { offset: 0, why: RecordError::TooLong(_) })));
    }

    #[test]
    fn streaming_reads_records_across_block_boundaries() {
        // Many records, some larger than a read block's eighth, read through
        // a reader that hands out a few bytes at a time.
        struct Dribble<'a>(&'a [u8]);
        impl std::io::Read for Dribble<'_> {
            fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
                let n = buf.len().min(self.0.len()).min(7777);
                buf[..n].copy_from_slice(&self.0[..n]);
                self.0 = &self.0[n..];
                Ok(n)
            }
        }
        let mut bytes = Vec::new();
        let big = vec![7u8; 3 << 20];
        for i in 0..50u64 {
            let value: &[u8] = if i % 10 == 9 { &big } else { b"small" };
            encode_put(&mut bytes, &entry(format!("k{i}").as_bytes(), value, None, i), 0);
        }
        let mut n = 0;
        let tail = read_stream(Dribble(&bytes), bytes.len() as u64, 0, |r| {
            assert_eq!(r.version(), n);
            n += 1;
        })
        .unwrap();
        assert_eq!((tail, n), (Ok(Tail::Clean), 50));
        // Cut inside a big record: torn at its start.
        let cut = bytes.len() - 100;
        let mut n = 0;
        let tail = read_stream(Dribble(&bytes[..cut]), cut as u64, 0, |_| n += 1).unwrap();
        assert!(matches!(tail, Ok(Tail::Torn { .. })) && n == 49);
    }

    #[test]
    fn journal_counts_bytes_and_recycles_buffers() {
        let mut off = Journal::default();
        off.put(&entry(b"k", b"v", None, 1), 0);
        assert_eq!((off.lsn(), off.pending()), (0, 0), "disabled: records nothing");
        let mut j = Journal::enabled();
        j.put(&entry(b"k", b"v", None, 1), 0);
        j.delete(b"k", 2);
        let lsn = j.lsn();
        assert_eq!(lsn as usize, j.pending());
        let taken = j.take(Vec::with_capacity(64));
        assert_eq!((taken.len() as u64, j.pending(), j.lsn()), (lsn, 0, lsn));
        let mut got = Vec::new();
        read_all(&taken, 0, |r| got.push(r)).unwrap();
        assert_eq!(got.len(), 2);
        j.set_refusing(true);
        assert!(j.refusing());
    }
}
