//! An open directory whose files are made, renamed, removed and synced
//! through its descriptor (`openat`, `renameat`, `unlinkat`), never
//! through its path.
//!
//! Why: the data directory is locked on its descriptor, and a path is
//! resolved again at every use. A directory renamed away and replaced
//! between a check of its path and a `create` through it would have the
//! file made in the replacement, which another process may own. Through
//! the descriptor, every file lands in the directory this process opened
//! and locked, whatever happens to the names around it.
//!
//! This module only moves files by name within one directory; it never
//! decides what a file holds or whether the directory is the right one
//! (`datadir` does).

use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, Mode, OFlags};

/// An open directory (`O_DIRECTORY`), with the path it was opened by, which
/// only messages use.
#[derive(Debug)]
pub struct Dir {
    fd: File,
    path: PathBuf,
}

impl Dir {
    /// Opens the directory at `path` (with `openat`, as every other open
    /// here, on every architecture: tracing tools see one kind of call).
    pub fn open(path: &Path) -> io::Result<Dir> {
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC;
        let fd = rustix::fs::openat(rustix::fs::CWD, path, flags, Mode::empty())?;
        Ok(Dir { fd: File::from(fd), path: path.to_path_buf() })
    }

    /// The path it was opened by (for messages: it may name another
    /// directory by now).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The directory's own descriptor (to lock it, or compare it with what
    /// its path names now).
    pub fn file(&self) -> &File {
        &self.fd
    }

    /// Another handle on the same open directory.
    pub fn try_clone(&self) -> io::Result<Dir> {
        Ok(Dir { fd: self.fd.try_clone()?, path: self.path.clone() })
    }

    /// Creates `name` exclusively with mode 0600 (files here may hold
    /// secret hashes), open for writing.
    pub fn create_private(&self, name: &str) -> io::Result<File> {
        let flags = OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::CLOEXEC;
        let fd = rustix::fs::openat(self.fd.as_fd(), plain(name)?, flags, Mode::from_raw_mode(0o600))?;
        Ok(File::from(fd))
    }

    /// Opens `name` for writing (it must exist: a log segment to cut).
    pub fn open_write(&self, name: &str) -> io::Result<File> {
        let fd = rustix::fs::openat(self.fd.as_fd(), plain(name)?, OFlags::WRONLY | OFlags::CLOEXEC, Mode::empty())?;
        Ok(File::from(fd))
    }

    /// Opens `name` for reading and writing, creating it (0600) if missing
    /// (the lock file, which every instance opens).
    pub fn open_or_create(&self, name: &str) -> io::Result<File> {
        let flags = OFlags::RDWR | OFlags::CREATE | OFlags::CLOEXEC;
        let fd = rustix::fs::openat(self.fd.as_fd(), plain(name)?, flags, Mode::from_raw_mode(0o600))?;
        Ok(File::from(fd))
    }

    /// The names in the directory (not `.` and `..`; a name that is not
    /// UTF-8 is none of ours and is left out).
    pub fn names(&self) -> io::Result<Vec<String>> {
        let mut list = rustix::fs::Dir::read_from(self.fd.as_fd())?;
        let mut names = Vec::new();
        while let Some(entry) = list.read() {
            if let Ok(name) = entry?.file_name().to_str() {
                if name != "." && name != ".." {
                    names.push(name.to_owned());
                }
            }
        }
        Ok(names)
    }

    /// Opens `name` for reading, refusing anything but a regular file: a
    /// FIFO would block (it is opened without waiting for a writer, here),
    /// a device would never end. A symlink is followed, as `open` would.
    pub fn open_regular(&self, name: &str) -> io::Result<File> {
        let flags = OFlags::RDONLY | OFlags::NONBLOCK | OFlags::CLOEXEC;
        let file = File::from(rustix::fs::openat(self.fd.as_fd(), plain(name)?, flags, Mode::empty())?);
        if !file.metadata()?.is_file() {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "not a regular file"));
        }
        Ok(file)
    }

    /// Renames `from` to `to`, both in this directory (atomic: `to` names
    /// either its old file or `from`'s, never neither).
    pub fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        Ok(rustix::fs::renameat(self.fd.as_fd(), plain(from)?, self.fd.as_fd(), plain(to)?)?)
    }

    /// Removes the file `name`.
    pub fn remove(&self, name: &str) -> io::Result<()> {
        Ok(rustix::fs::unlinkat(self.fd.as_fd(), plain(name)?, AtFlags::empty())?)
    }

    /// Fsyncs the directory, so a file made, renamed or removed in it
    /// survives a crash.
    pub fn sync(&self) -> io::Result<()> {
        self.fd.sync_all()
    }
}

/// `name` if it names a file in the directory itself: no separator, not
/// `.` or `..`, not empty. The callers only pass names they built; this
/// keeps a future mistake from reaching outside.
fn plain(name: &str) -> io::Result<&str> {
    if name.is_empty() || name == "." || name == ".." || name.contains('/') || name.contains('\0') {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("not a plain file name: {name:?}")));
    }
    Ok(name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("rdvz-dir-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn files_follow_the_open_directory_not_its_path() {
        let root = tmp("follow");
        let (named, moved) = (root.join("data"), root.join("moved"));
        std::fs::create_dir(&named).unwrap();
        let dir = Dir::open(&named).unwrap();
        dir.create_private("old").unwrap();
        // Renamed away and replaced by another directory under the same
        // name, as a second instance would find it.
        std::fs::rename(&named, &moved).unwrap();
        std::fs::create_dir(&named).unwrap();
        std::fs::write(named.join("theirs"), b"theirs").unwrap();

        dir.create_private("new").unwrap().write_all(b"ours").unwrap();
        dir.rename("new", "published").unwrap();
        dir.remove("old").unwrap();
        assert!(dir.remove("theirs").is_err(), "their file is out of reach");
        dir.sync().unwrap();

        let mut ours = String::new();
        dir.open_regular("published").unwrap().read_to_string(&mut ours).unwrap();
        assert_eq!(ours, "ours");
        let list = |d: &Path| {
            let mut v: Vec<String> =
                std::fs::read_dir(d).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
            v.sort();
            v
        };
        assert_eq!(list(&moved), ["published"]);
        assert_eq!(list(&named), ["theirs"]);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn creation_is_exclusive_and_private() {
        use std::os::unix::fs::PermissionsExt;
        let d = tmp("excl");
        let dir = Dir::open(&d).unwrap();
        dir.create_private("f").unwrap();
        assert_eq!(dir.create_private("f").unwrap_err().kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::metadata(d.join("f")).unwrap().permissions().mode() & 0o777, 0o600);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn only_plain_names_and_regular_files() {
        let d = tmp("plain");
        let dir = Dir::open(&d).unwrap();
        for bad in ["", ".", "..", "../x", "a/b", "/etc/passwd", "a\0b"] {
            assert_eq!(dir.create_private(bad).unwrap_err().kind(), io::ErrorKind::InvalidInput, "{bad:?}");
            assert!(dir.remove(bad).is_err());
        }
        std::fs::create_dir(d.join("sub")).unwrap();
        assert!(dir.open_regular("sub").is_err(), "a directory is not read as a file");
        rustix::fs::mknodat(dir.file(), "fifo", rustix::fs::FileType::Fifo, Mode::from_raw_mode(0o600), 0).unwrap();
        assert_eq!(dir.open_regular("fifo").unwrap_err().kind(), io::ErrorKind::InvalidData, "no wait on a FIFO");
        assert!(Dir::open(&d.join("missing")).is_err());
        std::fs::remove_dir_all(&d).unwrap();
    }
}
