//! The data directory: one owner, checked before anything is acknowledged.
//!
//! Layout: `LOCK` (held with an exclusive `flock` for the process's life,
//! and holding its PID for the message a second instance prints),
//! `snapshot.rkyv` (the latest checkpoint), and the log segments
//! `<seq>-<stream>.wal`: `seq` a 16-hex-digit number that only grows across
//! the directory's life (so names sort in creation order), `stream` the core
//! that wrote it. Every file is created exclusively with mode 0600: they hold
//! owner-secret hashes and the key that made them.
//!
//! At startup the directory must exist (the default one is created),
//! accept a new file, and fsync it: otherwise the server stops with a
//! message naming the directory, instead of acknowledging writes it could
//! never keep. Temp files a crash left behind are removed (nobody else can
//! be writing them: we hold the lock).
//!
//! One owner, whatever happens to the names: the directory itself is
//! locked too (an `flock` on its own descriptor, which no `rm LOCK` can
//! take away), the path is resolved once at startup (a symlink flipped to
//! another directory later, as a blue/green switch does, leaves this
//! process in the one it locked), every file is made, renamed and deleted
//! through the locked directory's descriptor (`persist::dir`), never its
//! path, and before the server creates or deletes anything it checks that
//! the path still names the directory it locked (`DataDir::check`). A
//! directory renamed away and replaced under a running server would
//! otherwise be written and pruned by two processes, each checkpoint
//! deleting the other's log; the check stops this process writing there
//! (and says so), and the descriptor makes sure that even a swap between
//! the check and the write cannot put a file in the other's directory.

use crate::persist::dir::Dir;
use crate::persist::snapshot;
use crate::state::secret::SecretKey;
use std::fs::{self, File};
use std::io::{self, Read, Seek, Write};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

const LOCK_FILE: &str = "LOCK";
/// The instance's secret-hashing key (owner secrets are stored hashed with
/// it, in the log and the snapshot, so it must outlive every restart).
pub const SECRET_FILE: &str = "SECRET";
const SEGMENT_SUFFIX: &str = ".wal";

/// Why the data directory cannot be used.
#[derive(Debug)]
pub enum DataDirError {
    Missing(PathBuf),
    NotADirectory(PathBuf),
    Create(PathBuf, io::Error),
    /// Another process holds the lock.
    Locked {
        path: PathBuf,
        pid: Option<u32>,
    },
    Lock(PathBuf, io::Error),
    /// A file cannot be created, written or fsynced there.
    NotWritable(PathBuf, io::Error),
    List(PathBuf, io::Error),
    /// A segment's number is above `MAX_SEGMENT`.
    SegmentNumber(PathBuf),
}

impl std::fmt::Display for DataDirError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DataDirError::Missing(p) => {
                write!(f, "data directory {} does not exist (-dataDir); create it, or fix the path", p.display())
            }
            DataDirError::NotADirectory(p) => write!(f, "-dataDir {} is not a directory", p.display()),
            DataDirError::Create(p, e) => write!(f, "cannot create data directory {}: {e}", p.display()),
            DataDirError::Locked { path, pid: Some(pid) } => write!(
                f,
                "data directory {} is in use by another Rendezvous process (PID {pid}); one process owns a data directory",
                path.display()
            ),
            DataDirError::Locked { path, pid: None } => write!(
                f,
                "data directory {} is in use by another Rendezvous process; one process owns a data directory",
                path.display()
            ),
            DataDirError::Lock(p, e) => write!(f, "cannot lock data directory {}: {e}", p.display()),
            DataDirError::NotWritable(p, e) => write!(
                f,
                "data directory {} cannot take a write and an fsync ({e}); writes would be acknowledged and lost",
                p.display()
            ),
            DataDirError::List(p, e) => write!(f, "cannot list data directory {}: {e}", p.display()),
            DataDirError::SegmentNumber(p) => write!(
                f,
                "log segment {} has a number no server makes (above 2^62): a hand-made or damaged name; move it \
                 out of the data directory",
                p.display()
            ),
        }
    }
}

impl std::error::Error for DataDirError {}

/// One log segment file.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Segment {
    pub seq: u64,
    pub stream: u32,
    /// Its name in the directory (opened through the directory's descriptor).
    pub name: String,
    /// Its path, for messages.
    pub path: PathBuf,
}

/// The name of segment `seq` of `stream`.
pub fn segment_name(seq: u64, stream: u32) -> String {
    format!("{seq:016x}-{stream:04}{SEGMENT_SUFFIX}")
}

fn parse_segment(name: &str) -> Option<(u64, u32)> {
    let stem = name.strip_suffix(SEGMENT_SUFFIX)?;
    let (seq, stream) = stem.split_once('-')?;
    if seq.len() != 16 || stream.is_empty() {
        return None;
    }
    Some((u64::from_str_radix(seq, 16).ok()?, stream.parse().ok()?))
}

/// The highest segment number a server makes, by far (one a checkpoint
/// per core): a name above it is hand-made or damaged, and the numbers
/// after it would overflow.
pub const MAX_SEGMENT: u64 = 1 << 62;

/// Every log segment in `dir`, in sequence order.
pub fn segments(dir: &Dir) -> Result<Vec<Segment>, DataDirError> {
    let mut out = Vec::new();
    for name in dir.names().map_err(|e| DataDirError::List(dir.path().to_path_buf(), e))? {
        if let Some((seq, stream)) = parse_segment(&name) {
            let path = dir.path().join(&name);
            if seq > MAX_SEGMENT {
                return Err(DataDirError::SegmentNumber(path));
            }
            out.push(Segment { seq, stream, name, path });
        }
    }
    out.sort();
    Ok(out)
}

/// Creates a new, empty segment file (exclusively, 0600) and makes its
/// name durable.
pub fn create_segment(dir: &Dir, seq: u64, stream: u32) -> io::Result<File> {
    let f = dir.create_private(&segment_name(seq, stream))?;
    dir.sync()?;
    Ok(f)
}

/// An owned, checked data directory. Dropping it releases the lock.
#[derive(Debug)]
pub struct DataDir {
    /// The directory itself, opened by its resolved path (no symlink,
    /// absolute) and locked: every file is made, renamed and deleted
    /// through it (`persist::dir`), so none can land in a directory that
    /// took its name later.
    dir: Dir,
    _lock: File,
}

impl DataDir {
    /// Takes ownership of `path`: creates it if `create` (the default
    /// directory) and it is missing, locks it, checks that a file can be
    /// written and fsynced there, and removes stale temp files.
    pub fn open(path: &Path, create: bool) -> Result<DataDir, DataDirError> {
        let owned = path.to_path_buf();
        match fs::metadata(path) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => return Err(DataDirError::NotADirectory(owned)),
            Err(e) if e.kind() == io::ErrorKind::NotFound && create => {
                fs::DirBuilder::new().mode(0o700).create(path).map_err(|e| DataDirError::Create(owned.clone(), e))?;
                log::info!("created data directory {}", path.display());
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(DataDirError::Missing(owned)),
            Err(e) => return Err(DataDirError::NotWritable(owned, e)),
        }
        let path = &fs::canonicalize(path).map_err(|e| DataDirError::NotWritable(owned.clone(), e))?;
        // Messages name the directory as given; the locks are on the resolved one.
        let dir = lock_dir(path, &owned)?;
        let lock = lock(&dir, &owned)?;
        probe(&dir).map_err(|e| DataDirError::NotWritable(owned.clone(), e))?;
        for name in dir.names().map_err(|e| DataDirError::List(owned.clone(), e))? {
            if name.starts_with(snapshot::TEMP_PREFIX) {
                let _ = dir.remove(&name);
            }
        }
        Ok(DataDir { dir, _lock: lock })
    }

    /// The directory's resolved path, as messages name it (files are
    /// reached through `dir`).
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The locked directory, through which files are made, renamed and
    /// deleted (after `check`).
    pub fn dir(&self) -> &Dir {
        &self.dir
    }

    /// Creates a new, empty segment file (`create_segment`), in the locked
    /// directory only (`check`).
    pub fn create_segment(&self, seq: u64, stream: u32) -> io::Result<File> {
        self.check()?;
        create_segment(&self.dir, seq, stream)
    }

    /// Deletes the segments numbered below `seq` (those a published
    /// snapshot covers), in the locked directory only (`check`). Returns
    /// how many went.
    pub fn delete_segments_below(&self, seq: u64) -> usize {
        if let Err(e) = self.check() {
            log::error!("{e}");
            return 0;
        }
        let Ok(segments) = segments(&self.dir) else { return 0 };
        let mut deleted = 0;
        for s in segments.iter().filter(|s| s.seq < seq) {
            match self.dir.remove(&s.name) {
                Ok(()) => deleted += 1,
                Err(e) => log::warn!("cannot delete covered log segment {}: {e}", s.path.display()),
            }
        }
        if deleted > 0 {
            let _ = self.dir.sync();
        }
        deleted
    }

    /// Whether the path still names the directory this process locked.
    /// Called before anything is created or deleted there; an error means
    /// the directory was moved or replaced under the running server, which
    /// must then neither write nor prune there.
    pub fn check(&self) -> io::Result<()> {
        use std::os::unix::fs::MetadataExt;
        let locked = self.dir.file().metadata()?;
        let named = fs::metadata(self.path())?;
        if (locked.dev(), locked.ino()) == (named.dev(), named.ino()) {
            return Ok(());
        }
        Err(io::Error::other(format!(
            "{} is no longer the data directory this process locked at startup (it was moved or replaced); \
             nothing more is written or deleted there: restart the server",
            self.path().display()
        )))
    }

    /// The instance's secret-hashing key: the one kept in the directory,
    /// else the snapshot's (older directories), else a new random one; kept
    /// in `SECRET` (0600) from then on.
    pub fn secret_key(&self, from_snapshot: Option<SecretKey>) -> io::Result<SecretKey> {
        match self.dir.open_regular(SECRET_FILE) {
            Ok(mut f) => {
                // The length first: a huge file is refused, not read.
                if f.metadata()?.len() != 32 {
                    return Err(io::Error::new(io::ErrorKind::InvalidData, "not a 32-byte key"));
                }
                let mut key = [0u8; 32];
                f.read_exact(&mut key)?;
                return Ok(SecretKey::from_bytes(key));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let key = match from_snapshot {
            Some(k) => k,
            None => SecretKey::random()?,
        };
        let tmp = format!("{SECRET_FILE}.tmp");
        let _ = self.dir.remove(&tmp);
        let mut f = self.dir.create_private(&tmp)?;
        f.write_all(key.as_bytes())?;
        f.sync_all()?;
        self.dir.rename(&tmp, SECRET_FILE)?;
        self.dir.sync()?;
        Ok(key)
    }
}

/// Opens and locks the directory itself. The `LOCK` file's lock (which
/// older versions take, and which holds the PID for the message) can be
/// lost to an `rm LOCK` while the server runs; this one cannot.
fn lock_dir(dir: &Path, shown: &Path) -> Result<Dir, DataDirError> {
    let d = Dir::open(dir).map_err(|e| DataDirError::Lock(shown.to_path_buf(), e))?;
    match d.file().try_lock() {
        Ok(()) => Ok(d),
        Err(fs::TryLockError::WouldBlock) => {
            let pid = d.open_regular(LOCK_FILE).ok().and_then(|mut f| holder(&mut f));
            Err(DataDirError::Locked { path: shown.to_path_buf(), pid })
        }
        Err(fs::TryLockError::Error(e)) => Err(DataDirError::Lock(shown.to_path_buf(), e)),
    }
}

fn lock(dir: &Dir, shown: &Path) -> Result<File, DataDirError> {
    let mut f = dir.open_or_create(LOCK_FILE).map_err(|e| DataDirError::Lock(shown.to_path_buf(), e))?;
    match f.try_lock() {
        Ok(()) => {}
        Err(fs::TryLockError::WouldBlock) => {
            return Err(DataDirError::Locked { path: shown.to_path_buf(), pid: holder(&mut f) });
        }
        Err(fs::TryLockError::Error(e)) => return Err(DataDirError::Lock(shown.to_path_buf(), e)),
    }
    // Ours now: record who holds it, for the next one's message.
    let write_pid = (|| {
        f.set_len(0)?;
        f.rewind()?;
        writeln!(f, "{}", std::process::id())
    })();
    write_pid.map_err(|e| DataDirError::Lock(shown.to_path_buf(), e))?;
    Ok(f)
}

/// The PID the lock file names (the holder's, for the message a second
/// instance prints).
fn holder(lock_file: &mut File) -> Option<u32> {
    let mut text = String::new();
    lock_file.read_to_string(&mut text).ok()?;
    text.trim().parse().ok()
}

/// Creates, writes, fsyncs and removes a file, and fsyncs the directory.
fn probe(dir: &Dir) -> io::Result<()> {
    let name = format!(".probe-{}", std::process::id());
    let _ = dir.remove(&name);
    let result = (|| -> io::Result<()> {
        let mut f = dir.create_private(&name)?;
        f.write_all(&[0u8; 4096])?;
        f.sync_all()?;
        Ok(())
    })();
    let _ = dir.remove(&name);
    result?;
    dir.sync()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("rdvz-dd-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn segment_names_sort_by_sequence() {
        assert_eq!(segment_name(10, 2), "000000000000000a-0002.wal");
        assert_eq!(parse_segment("000000000000000a-0002.wal"), Some((10, 2)));
        assert_eq!(parse_segment("snapshot.rkyv"), None);
        assert_eq!(parse_segment("0a-0002.wal"), None);
        let d = tmp("segs");
        fs::create_dir_all(&d).unwrap();
        for (seq, stream) in [(300, 0), (2, 1), (17, 0)] {
            create_segment(&Dir::open(&d).unwrap(), seq, stream).unwrap();
        }
        let seqs: Vec<u64> = segments(&Dir::open(&d).unwrap()).unwrap().iter().map(|s| s.seq).collect();
        assert_eq!(seqs, vec![2, 17, 300]);
        assert!(create_segment(&Dir::open(&d).unwrap(), 2, 1).is_err(), "never reopened or overwritten");
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn one_owner_and_a_clear_refusal() {
        let d = tmp("lock");
        assert!(matches!(DataDir::open(&d, false), Err(DataDirError::Missing(_))));
        let first = DataDir::open(&d, true).unwrap();
        match DataDir::open(&d, false) {
            Err(DataDirError::Locked { pid, .. }) => assert_eq!(pid, Some(std::process::id())),
            other => panic!("{other:?}"),
        }
        drop(first);
        let again = DataDir::open(&d, false).unwrap();
        // A stale temp snapshot is swept; other files stay.
        fs::write(d.join(format!("{}123.456", snapshot::TEMP_PREFIX)), b"x").unwrap();
        drop(again);
        let _third = DataDir::open(&d, false).unwrap();
        let names: Vec<String> =
            fs::read_dir(&d).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        assert_eq!(names, vec!["LOCK".to_string()]);
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn the_directory_stays_locked_without_its_lock_file() {
        let d = tmp("rmlock");
        let first = DataDir::open(&d, true).unwrap();
        // A "stale lock" cleanup while the owner runs.
        fs::remove_file(d.join(LOCK_FILE)).unwrap();
        assert!(matches!(DataDir::open(&d, false), Err(DataDirError::Locked { .. })));
        drop(first);
        drop(DataDir::open(&d, false).unwrap());
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_symlink_is_resolved_once_and_a_replaced_directory_is_noticed() {
        let base = tmp("flip");
        let (a, b, cur) = (base.join("a"), base.join("b"), base.join("cur"));
        fs::create_dir_all(&a).unwrap();
        fs::create_dir_all(&b).unwrap();
        std::os::unix::fs::symlink(&a, &cur).unwrap();
        let owner = DataDir::open(&cur, false).unwrap();
        assert_eq!(owner.path(), fs::canonicalize(&a).unwrap());
        // Flipped to b (a blue/green switch): the owner stays in a, and b
        // can have an owner of its own.
        fs::remove_file(&cur).unwrap();
        std::os::unix::fs::symlink(&b, &cur).unwrap();
        owner.check().unwrap();
        let other = DataDir::open(&cur, false).unwrap();
        assert_eq!(other.path(), fs::canonicalize(&b).unwrap());
        // a moved away and replaced by a new directory: the owner must
        // write and delete nothing there.
        fs::rename(&a, base.join("a-old")).unwrap();
        fs::create_dir_all(&a).unwrap();
        assert!(owner.check().is_err());
        other.check().unwrap();
        fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn a_directory_replaced_under_the_server_gets_none_of_its_files() {
        let root = tmp("replaced-fd");
        let (named, moved) = (root.join("data"), root.join("moved"));
        fs::create_dir_all(&named).unwrap();
        let data = DataDir::open(&named, false).unwrap();
        create_segment(data.dir(), 1, 0).unwrap();
        create_segment(data.dir(), 2, 0).unwrap();
        fs::rename(&named, &moved).unwrap();
        fs::create_dir(&named).unwrap();
        fs::write(named.join(segment_name(1, 0)), b"theirs").unwrap();
        assert!(data.check().is_err(), "the swap is noticed");
        // What the check would have let through just before the swap:
        create_segment(data.dir(), 3, 0).unwrap();
        let ours: Vec<u64> = segments(data.dir()).unwrap().iter().map(|s| s.seq).collect();
        assert_eq!(ours, [1, 2, 3]);
        data.dir().remove(&segment_name(1, 0)).unwrap();
        assert_eq!(fs::read(named.join(segment_name(1, 0))).unwrap(), b"theirs", "their segment untouched");
        assert!(!moved.join(segment_name(1, 0)).exists());
        assert!(moved.join(segment_name(3, 0)).exists() && !named.join(segment_name(3, 0)).exists());
        drop(data);
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn the_secret_key_outlives_restarts() {
        let d = tmp("secret");
        let dir = DataDir::open(&d, true).unwrap();
        let from_snapshot = SecretKey::from_bytes([3; 32]);
        let k1 = dir.secret_key(Some(from_snapshot)).unwrap();
        assert_eq!(k1.as_bytes(), &[3; 32], "an older directory's snapshot key is adopted");
        let k2 = dir.secret_key(None).unwrap();
        assert_eq!(k2.as_bytes(), &[3; 32], "and kept");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(fs::metadata(d.join(SECRET_FILE)).unwrap().permissions().mode() & 0o777, 0o600);
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_file_is_not_a_directory() {
        let d = tmp("file");
        fs::write(&d, b"x").unwrap();
        assert!(matches!(DataDir::open(&d, true), Err(DataDirError::NotADirectory(_))));
        fs::remove_file(&d).unwrap();
    }
}
