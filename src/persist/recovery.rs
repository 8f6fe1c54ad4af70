//! Recovery: the latest snapshot plus a replay of the log after it, into
//! one shard per core of the current process (any core count).
//!
//! The snapshot says which log segments it does not cover (`replay_from`);
//! every segment from there on is replayed in sequence order, whichever
//! core (stream) wrote it, except records at or below the version the
//! snapshot covers (`covered_version`): their change, or a later one, is in
//! the copy, and a key's records may sit in several logs, so an old store
//! replayed from a segment that outlived the checkpoint could otherwise win
//! over a delete or expiry the copy shows. Records are full states with versions, and a key
//! takes a record only if its version is higher than what the key has (a
//! delete leaves a tombstone for the rest of the replay), so the order of
//! streams, a fuzzy snapshot, or a record replayed twice cannot matter: each
//! key ends at its highest-versioned record, which is its latest.
//!
//! A torn record at the end of a segment (a crash mid-append) is cut off,
//! with a log line. Segments are only ever appended to, so any of them can
//! end torn, not just a stream's last: power loss after a rotation can lose
//! the old segment's unsynced tail while the new file survives, and an
//! append that failed (ENOSPC) leaves a partial record behind when its
//! retry moves to a fresh segment. Such a record was never acknowledged
//! (under `always` a later segment counts as synced only after the earlier
//! ones are). A bad record anywhere else is damage:
//! recovery stops with the file and byte offset, and touches no file.
//! Expired entries are dropped before serving; the highest version seen
//! (snapshot trailer, entries, deletes) becomes every shard's floor, so an
//! ETag is never issued twice.

use crate::persist::datadir::{self, DataDirError, Segment};
use crate::persist::dir::Dir;
use crate::persist::snapshot::{self, SnapshotError};
use crate::state::record::{read_stream, Damage, Record, Tail};
use crate::state::secret::SecretKey;
use crate::state::shard::{KeyBudget, Shard};
use hashbrown::HashMap;
use std::io;
use std::path::{Path, PathBuf};

/// Why the store cannot be recovered. Files are left as they are.
#[derive(Debug)]
pub enum RecoveryError {
    DataDir(DataDirError),
    Snapshot(PathBuf, SnapshotError),
    Damage {
        path: PathBuf,
        offset: u64,
        why: String,
    },
    Io(PathBuf, io::Error),
    /// A replayed segment could not be synced at startup.
    Sync(PathBuf, io::Error),
    /// No snapshot, and the log (its first segment named) does not start
    /// at the beginning.
    MissingSnapshot(PathBuf),
}

impl std::fmt::Display for RecoveryError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RecoveryError::DataDir(e) => write!(f, "{e}"),
            RecoveryError::Snapshot(p, e) => write!(
                f,
                "cannot load snapshot {}: {e}. Files were left untouched; move the data directory away to start empty.",
                p.display()
            ),
            RecoveryError::Damage { path, offset, why } => write!(
                f,
                "log segment {} is damaged at byte {offset} ({why}), before its end: recovery stopped and \
                 left every file untouched. Keep a copy, then either cut the file there to start with the \
                 records before that byte (truncate -s {offset} -- {}), or move it away to start without any of it.",
                path.display(),
                shell_quoted(path)
            ),
            RecoveryError::Io(p, e) => write!(f, "cannot read {}: {e}", p.display()),
            RecoveryError::MissingSnapshot(p) => write!(
                f,
                "there is no snapshot.rkyv, but the log starts at {}: the segments before it were deleted by a \
                 checkpoint whose snapshot is gone, and with them the keys it held. Restore snapshot.rkyv from a \
                 backup, or move the log segments (*.wal) out of the directory to start with an empty store",
                p.display()
            ),
            RecoveryError::Sync(p, e) => write!(
                f,
                "cannot sync {} (what the last run wrote must be on the disk before this one builds on it): {e}",
                p.display()
            ),
        }
    }
}

impl std::error::Error for RecoveryError {}

/// Whether recovery may repair what a crash leaves (cut torn tails).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The owner at startup: torn tails are truncated away.
    Repair,
    /// A reader (`-dump`) beside a running server: nothing is written, and a
    /// segment's unfinished tail is simply not read.
    ReadOnly,
}

/// What recovery found.
#[derive(Debug, Default)]
pub struct Report {
    /// The snapshot's secret-hashing key (`None`: no snapshot).
    pub secret_key: Option<SecretKey>,
    pub snapshot_entries: u64,
    pub snapshot_created_ms: Option<u64>,
    pub segments: usize,
    pub records: u64,
    /// Records the snapshot's copy already covers (not applied).
    pub skipped: u64,
    /// Torn tails cut (or, read-only, skipped): file and offset.
    pub torn: Vec<(PathBuf, u64)>,
    pub expired: usize,
    pub live: usize,
    /// The highest version ever issued.
    pub max_version: u64,
    /// The first segment number this process may create.
    pub next_seq: u64,
}

/// Loads `dir` into `shards` (one per core; `owner` maps a key to its core).
/// Every file is opened (and a torn tail cut) through the directory's
/// descriptor: a directory that takes its name during a long replay is
/// never touched.
pub fn recover(
    dir: &Dir,
    shards: &mut [Shard],
    owner: impl Fn(&[u8]) -> usize,
    budget: &KeyBudget,
    now_ms: u64,
    max_expiry_ms: u64,
    mode: Mode,
) -> Result<Report, RecoveryError> {
    let mut report = Report::default();
    let snap_path = dir.path().join(snapshot::FILE_NAME);
    let meta = snapshot::load_from(dir.open_regular(snapshot::FILE_NAME), |entry| {
        if !entry.is_expired(now_ms) {
            let core = owner(entry.key());
            shards[core].restore(entry, budget);
        }
    })
    .map_err(|e| RecoveryError::Snapshot(snap_path.clone(), e))?;
    let replay_from = meta.as_ref().map_or(0, |m| m.replay_from);
    let covered = meta.as_ref().map_or(0, |m| m.covered_version);
    if let Some(m) = &meta {
        report.secret_key = Some(m.secret_key.clone());
        report.snapshot_entries = m.entries;
        report.snapshot_created_ms = Some(m.created_unix_ms);
        report.max_version = m.max_version;
    }
    let all = datadir::segments(dir).map_err(RecoveryError::DataDir)?;
    // A store's first run numbers each core's first segment as the core
    // (segment i, stream i); every later segment has a higher number than
    // its stream, and a checkpoint deletes the first run's segments only
    // once its snapshot is published. So with segments but no snapshot and
    // none of the first run's left, the snapshot was lost, and with it every
    // key the deleted segments held: serving what is left would drop them
    // silently. (One of the first run's segments left, even alone because
    // the run died before its other cores made theirs, is a log from the
    // beginning.)
    if let (None, Some(first)) = (&meta, all.first()) {
        if !all.iter().any(|s| s.seq == u64::from(s.stream)) {
            return Err(RecoveryError::MissingSnapshot(first.path.clone()));
        }
    }
    report.next_seq = all.iter().map(|s| s.seq + 1).max().unwrap_or(0).max(replay_from);
    let to_replay: Vec<&Segment> = all.iter().filter(|s| s.seq >= replay_from).collect();
    let mut tombstones: HashMap<Box<[u8]>, u64> = HashMap::new();
    let mut torn = Vec::new();
    for seg in to_replay {
        let file = dir.open_regular(&seg.name).map_err(|e| RecoveryError::Io(seg.path.clone(), e))?;
        let size = file.metadata().map_err(|e| RecoveryError::Io(seg.path.clone(), e))?.len();
        let reader = io::BufReader::with_capacity(1 << 20, &file);
        let mut apply = |rec: Record| {
            report.records += 1;
            report.max_version = report.max_version.max(rec.version());
            // Its change, or a later one, is in the snapshot's copy; replayed,
            // an old store could outlive a delete or an expiry the copy shows.
            if rec.version() <= covered {
                report.skipped += 1;
                return;
            }
            apply_record(rec, shards, &owner, budget, &mut tombstones);
        };
        let tail =
            read_stream(reader, size, seg.seq, &mut apply).map_err(|e| RecoveryError::Io(seg.path.clone(), e))?;
        report.segments += 1;
        // What a crashed process acknowledged under `everysec` may still be
        // in the page cache only: synced before this process acknowledges
        // anything that builds on it, or a power loss soon after the restart
        // could take an old segment's end (seconds or minutes old by then)
        // and leave the newer, synced segments: no longer a prefix of what
        // was applied. Mostly a no-op: written back long ago, the pages are
        // clean. (A torn tail is cut, and synced again, below.)
        if mode == Mode::Repair {
            file.sync_data().map_err(|e| RecoveryError::Sync(seg.path.clone(), e))?;
        }
        match tail {
            Ok(Tail::Clean) => {}
            Ok(tail) => torn.push((seg, size, tail)),
            Err(Damage { offset, why }) => {
                return Err(RecoveryError::Damage { path: seg.path.clone(), offset, why: why.to_string() });
            }
        }
    }
    // Cut only once every segment has been read: damage found in a later
    // one leaves every file as it was.
    for (seg, size, tail) in torn {
        let (Tail::Torn { at, ref why } | Tail::Unsynced { at, ref why }) = tail else { continue };
        let path = seg.path.clone();
        if mode == Mode::Repair {
            cut(dir, &seg.name, at).map_err(|e| RecoveryError::Io(path.clone(), e))?;
            if matches!(tail, Tail::Unsynced { .. }) {
                log::warn!(
                    "cut the unsynced end of {} from byte {at} ({} bytes; {why} there, and no sync mark after it \
                     says it was synced): a power loss left it partly written, within what -fsync may lose",
                    path.display(),
                    size.saturating_sub(at)
                );
            } else {
                log::warn!(
                    "cut a torn record at the end of {} (byte {at}, {why}): a crash interrupted its write (a \
                     process crash: it was never acknowledged; a power loss: it was within what -fsync may lose)",
                    path.display()
                );
            }
        }
        report.torn.push((path, at));
    }
    drop(tombstones);
    for shard in shards.iter_mut() {
        report.expired += shard.drop_expired(now_ms, budget);
        shard.cap_expiry(max_expiry_ms, budget);
        report.max_version = report.max_version.max(shard.last_version());
    }
    for shard in shards.iter_mut() {
        shard.raise_version_floor(report.max_version);
        report.live += shard.len();
    }
    Ok(report)
}

/// Applies one replayed record: it wins only over older versions.
fn apply_record(
    rec: Record,
    shards: &mut [Shard],
    owner: &impl Fn(&[u8]) -> usize,
    budget: &KeyBudget,
    tombstones: &mut HashMap<Box<[u8]>, u64>,
) {
    let core = owner(rec.key());
    let Some(shard) = shards.get_mut(core) else { return };
    match rec {
        Record::Put { mut entry, creator } => {
            let v = entry.version();
            let newer_than_entry = shard.version_of(entry.key()).is_none_or(|cur| v > cur);
            let newer_than_delete = tombstones.get(entry.key()).is_none_or(|&t| v > t);
            if newer_than_entry && newer_than_delete {
                entry.set_creator(creator);
                shard.restore(entry, budget);
            }
        }
        Record::Delete { key, version } => {
            if shard.version_of(&key).is_some_and(|cur| cur < version) {
                shard.remove_key(&key, budget);
            }
            shard.raise_version_floor(version);
            let t = tombstones.entry(key).or_insert(version);
            *t = (*t).max(version);
        }
    }
}

/// `path` as one shell word, for a command a message offers to run.
fn shell_quoted(path: &Path) -> String {
    let text = path.display().to_string();
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_alphanumeric() || b"/._-+,:=@".contains(&b)) {
        text
    } else {
        format!("'{}'", text.replace('\'', r"'\''"))
    }
}

/// Truncates a segment at `at` (dropping a torn tail) and syncs it.
fn cut(dir: &Dir, name: &str, at: u64) -> io::Result<()> {
    let f = dir.open_write(name)?;
    f.set_len(at)?;
    f.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::record::{encode_delete, encode_put};
    use crate::state::shard::Entry;
    use std::io::Write;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("rdvz-rec-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    const NOW: u64 = 1_800_000_000_000;

    fn entry(key: &str, value: &str, version: u64) -> Entry {
        let mut e = Entry::new(key.as_bytes(), value.as_bytes(), None, NOW + 60_000).unwrap();
        e.set_version(version);
        e
    }

    fn segment(dir: &Path, seq: u64, stream: u32, build: impl FnOnce(&mut Vec<u8>)) -> PathBuf {
        let mut bytes = Vec::new();
        build(&mut bytes);
        let path = dir.join(datadir::segment_name(seq, stream));
        std::fs::File::create(&path).unwrap().write_all(&bytes).unwrap();
        path
    }

    fn run(dir: &Path, cores: usize, mode: Mode) -> Result<(Vec<Shard>, Report, KeyBudget), RecoveryError> {
        let budget = KeyBudget::new(1000);
        let mut shards: Vec<Shard> = (0..cores).map(|_| Shard::with_capacity(16)).collect();
        let owner = |k: &[u8]| k.iter().map(|&b| b as usize).sum::<usize>() % cores;
        let report = recover(
            &Dir::open(dir).map_err(|e| RecoveryError::Io(dir.to_path_buf(), e))?,
            &mut shards,
            owner,
            &budget,
            NOW,
            u64::MAX,
            mode,
        )?;
        Ok((shards, report, budget))
    }

    fn value(shards: &mut [Shard], cores: usize, key: &str, b: &KeyBudget) -> Option<String> {
        let core = key.bytes().map(|b| b as usize).sum::<usize>() % cores;
        shards[core].get(key.as_bytes(), NOW, b).map(|f| String::from_utf8(f.value.to_vec()).unwrap())
    }

    #[test]
    fn highest_version_wins_whatever_the_stream_order() {
        let d = tmp("order");
        // A key moved between streams (a restart with another core count):
        // stream 1's older record comes after stream 0's newer one.
        segment(&d, 1, 1, |b| {
            encode_put(b, &entry("a", "old", 10), 0);
            encode_put(b, &entry("gone", "x", 11), 0);
        });
        segment(&d, 0, 0, |b| {
            encode_put(b, &entry("a", "new", 20), 0);
            encode_delete(b, b"gone", 30);
            encode_put(b, &entry("gone", "stale", 25), 0);
        });
        for cores in [1, 2, 3] {
            let (mut shards, report, budget) = run(&d, cores, Mode::Repair).unwrap();
            assert_eq!(value(&mut shards, cores, "a", &budget).as_deref(), Some("new"));
            assert_eq!(value(&mut shards, cores, "gone", &budget), None, "the delete's tombstone holds");
            assert_eq!((report.records, report.max_version, report.next_seq, report.live), (5, 30, 2, 1));
            // Versions continue above the delete's.
            assert!(shards.iter().all(|s| s.last_version() >= 30));
        }
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn snapshot_then_log_replays_only_what_it_does_not_cover() {
        let d = tmp("snap");
        segment(&d, 1, 0, |b| encode_put(b, &entry("covered", "by-log-1", 1), 0));
        let mut w = snapshot::Writer::create(&Dir::open(&d).unwrap()).unwrap();
        w.write_entries(&[entry("s", "snap", 5), entry("covered", "snap", 6)]).unwrap();
        w.publish(
            &SecretKey::from_bytes([1; 32]),
            NOW,
            snapshot::Cover { replay_from: 2, covered_version: 0, max_version: 6 },
        )
        .unwrap();
        segment(&d, 2, 0, |b| encode_put(b, &entry("s", "after", 7), 0));
        let (mut shards, report, budget) = run(&d, 2, Mode::Repair).unwrap();
        assert_eq!(value(&mut shards, 2, "covered", &budget).as_deref(), Some("snap"), "segment 1 is not replayed");
        assert_eq!(value(&mut shards, 2, "s", &budget).as_deref(), Some("after"));
        assert_eq!((report.segments, report.snapshot_entries), (1, 2));
        assert_eq!(report.secret_key.unwrap().as_bytes(), &[1; 32]);
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// Any core may log a change to any key, so a key's records can sit in
    /// several logs, and a log can rewrite old records into a fresh segment
    /// (a failed sync) or start one at a size limit while a checkpoint moves
    /// the logs. A record at or below the version the copy covers is
    /// skipped: replayed, it would outlive the delete (or the expiry) the
    /// copy shows, whose own record was in a deleted segment.
    #[test]
    fn records_the_copy_covers_are_not_replayed() {
        let d = tmp("covered");
        let mut w = snapshot::Writer::create(&Dir::open(&d).unwrap()).unwrap();
        // The copy: "deleted" is gone (deleted at version 12), "expired"
        // holds version 13 whose expiry has passed, "kept" is at 14.
        let mut gone_soon = entry("expired", "new", 13);
        gone_soon.expires_ms = NOW - 1;
        w.write_entries(&[gone_soon, entry("kept", "copy", 14)]).unwrap();
        let cover = snapshot::Cover { replay_from: 5, covered_version: 20, max_version: 25 };
        w.publish(&SecretKey::from_bytes([1; 32]), NOW, cover).unwrap();
        // A segment the snapshot does not cover by number, holding records
        // older than the copy, and one newer change.
        segment(&d, 6, 1, |b| {
            encode_put(b, &entry("deleted", "old", 10), 0);
            encode_put(b, &entry("expired", "old", 11), 0);
            encode_put(b, &entry("kept", "old", 9), 0);
            encode_put(b, &entry("new", "after", 21), 0);
        });
        let (mut shards, report, budget) = run(&d, 2, Mode::Repair).unwrap();
        assert_eq!(value(&mut shards, 2, "deleted", &budget), None, "an old store outlived its delete");
        assert_eq!(value(&mut shards, 2, "expired", &budget), None, "an old store outlived a newer expired one");
        assert_eq!(value(&mut shards, 2, "kept", &budget).as_deref(), Some("copy"));
        assert_eq!(value(&mut shards, 2, "new", &budget).as_deref(), Some("after"));
        assert_eq!((report.records, report.skipped), (4, 3));
        assert!(shards.iter().all(|s| s.last_version() >= 25));
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_log_with_no_snapshot_must_hold_a_segment_of_the_first_run() {
        let d = tmp("nosnap");
        // The first run's core 1 made its segment; core 0 died before its own.
        let first = segment(&d, 1, 1, |b| encode_put(b, &entry("a", "1", 1), 0));
        segment(&d, 2, 0, |b| encode_put(b, &entry("b", "2", 2), 0));
        let (mut shards, _, budget) = run(&d, 2, Mode::Repair).unwrap();
        assert_eq!(value(&mut shards, 2, "a", &budget).as_deref(), Some("1"));
        // Without it (a checkpoint deleted it, and its snapshot is gone).
        std::fs::remove_file(&first).unwrap();
        match run(&d, 2, Mode::Repair) {
            Err(RecoveryError::MissingSnapshot(p)) => {
                assert!(p.ends_with(datadir::segment_name(2, 0)), "{}", p.display())
            }
            other => panic!("{:?}", other.err()),
        }
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn an_offered_command_quotes_the_path_only_when_it_must() {
        assert_eq!(shell_quoted(Path::new("/var/lib/rendezvous/00-0.wal")), "/var/lib/rendezvous/00-0.wal");
        assert_eq!(shell_quoted(Path::new("/srv/my data/x.wal")), "'/srv/my data/x.wal'");
        assert_eq!(shell_quoted(Path::new("/srv/it's/x.wal")), r"'/srv/it'\''s/x.wal'");
    }

    #[test]
    fn a_torn_tail_is_cut_and_damage_stops() {
        let d = tmp("torn");
        let path = segment(&d, 0, 0, |b| {
            encode_put(b, &entry("a", "1", 1), 0);
            encode_put(b, &entry("b", "2", 2), 0);
        });
        let full = std::fs::read(&path).unwrap();
        std::fs::write(&path, &full[..full.len() - 3]).unwrap();
        let (mut shards, report, budget) = run(&d, 1, Mode::ReadOnly).unwrap();
        assert_eq!(report.torn.len(), 1);
        assert_eq!(std::fs::read(&path).unwrap().len(), full.len() - 3, "read-only touches nothing");
        assert_eq!(value(&mut shards, 1, "b", &budget), None);
        let (_, report, _) = run(&d, 1, Mode::Repair).unwrap();
        let at = report.torn[0].1;
        assert_eq!(std::fs::read(&path).unwrap().len() as u64, at, "cut at the last good record");
        let (_, report, _) = run(&d, 1, Mode::Repair).unwrap();
        assert!(report.torn.is_empty());

        // Damage in the middle: stop, name the file and offset, touch nothing.
        let mut bad = full.clone();
        bad[12] ^= 0xff;
        std::fs::write(&path, &bad).unwrap();
        match run(&d, 1, Mode::Repair) {
            Err(RecoveryError::Damage { path: p, offset: 0, .. }) => assert_eq!(p, path),
            other => panic!("{:?}", other.err()),
        }
        assert_eq!(std::fs::read(&path).unwrap(), bad);
        // A torn tail in a segment that is not its stream's last (power loss
        // after a rotation) is cut too, and the later segment is replayed.
        std::fs::write(&path, &full[..full.len() - 3]).unwrap();
        segment(&d, 4, 0, |b| encode_put(b, &entry("c", "3", 3), 0));
        let (mut shards, report, budget) = run(&d, 1, Mode::Repair).unwrap();
        assert_eq!(report.torn.len(), 1);
        assert_eq!(value(&mut shards, 1, "c", &budget).as_deref(), Some("3"));
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn expired_entries_are_dropped_and_the_budget_forced() {
        let d = tmp("exp");
        segment(&d, 0, 0, |b| {
            let mut old = Entry::new(b"old", b"x", None, NOW - 1).unwrap();
            old.set_version(1);
            encode_put(b, &old, 0);
            for i in 0..5 {
                encode_put(b, &entry(&format!("k{i}"), "v", 2 + i), 0);
            }
        });
        let budget = KeyBudget::new(2);
        let mut shards = vec![Shard::with_capacity(4)];
        let report =
            recover(&Dir::open(&d).unwrap(), &mut shards, |_| 0, &budget, NOW, u64::MAX, Mode::Repair).unwrap();
        assert_eq!((report.expired, report.live, budget.live()), (1, 5, 5), "no key dropped for -maxNumKV");
        std::fs::remove_dir_all(&d).unwrap();
    }
}
