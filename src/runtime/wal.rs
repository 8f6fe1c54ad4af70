//! One core's write-ahead log: writes the records its shard journals,
//! group-commits them, and holds back every answer until what it reveals is
//! as durable as `-fsync` promises.
//!
//! The writer task takes everything journaled since its last pass and
//! writes it with one positioned write on the core's own io_uring (the
//! executor never blocks; on the epoll fallback the write is a plain
//! syscall). `-fsync always` adds one `fdatasync` per pass, covering every
//! write of the pass, before any of them is answered; `everysec` answers
//! once the bytes are in the OS (a process crash loses nothing) and a timer
//! syncs once a second; `no` leaves syncing to the OS. While a pass is in
//! flight the next one accumulates, so the cost of a write or sync is
//! shared by every request that arrived meanwhile.
//!
//! Answers wait on a log sequence number (bytes journaled so far on this
//! core): any answer computed after a change, reads included, is released
//! only once that position is acknowledged, so no client ever sees a value
//! a crash could take back. Answers for other cores are held here and
//! released into their outboxes.
//!
//! Disk trouble (ENOSPC, EIO, a failed sync) never crashes the core and
//! never acknowledges what is not logged: the failed pass's writes are
//! answered 503, new writes are refused before they change anything (the
//! journal's `refusing` flag), reads go on, and the failed bytes (after a
//! failed sync: everything written since the last good one) are retried
//! every second, into a fresh segment, until the disk takes them; then
//! writes resume by themselves. A file-size limit (EFBIG; SIGXFSZ is
//! ignored) just moves the log to a new segment.

use crate::config::Fsync;
use crate::persist::datadir;
use crate::runtime::router::Router;
use crate::runtime::shared::Shared;
use crate::state::command::{Origin, Reply};
use crate::state::shard::WriteOutcome;
use std::cell::RefCell;
use std::collections::VecDeque;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

/// How often a failing log is retried.
const RETRY_EVERY: Duration = Duration::from_secs(1);
/// `everysec`: sync at once when this much is written and not yet synced.
const UNSYNCED_HIGH_WATER: usize = 64 << 20;

struct State {
    file: Rc<monoio::fs::File>,
    file_seq: u64,
    /// Bytes written into `file`.
    offset: u64,
    /// Answers up to this log position may go out.
    acked: u64,
    /// Bytes handed to the OS.
    written: u64,
    /// Answers waiting for the log, in log order.
    deferred: VecDeque<(u64, Origin, Reply)>,
    /// Set while the disk refuses the log.
    failing: Option<std::io::ErrorKind>,
    failing_since: Option<Instant>,
    /// Bytes to write again before anything else (a failed pass).
    retry: Option<(Vec<u8>, u64)>,
    /// Bytes in `file` not yet synced (kept to rewrite them elsewhere if a
    /// sync fails); `no` keeps none.
    unsynced: Vec<u8>,
    /// A pass (write or sync) is in flight.
    busy: bool,
    writer: Option<Waker>,
    idle_waiters: Vec<Waker>,
    spare: Vec<u8>,
}

/// One core's log.
pub struct Wal {
    core: usize,
    dir: PathBuf,
    mode: Fsync,
    shared: Arc<Shared>,
    st: RefCell<State>,
}

impl Wal {
    /// Opens this core's first segment (`seq`, allocated by the caller).
    pub fn open(shared: Arc<Shared>, core: usize, dir: PathBuf, seq: u64) -> std::io::Result<Rc<Wal>> {
        let file = datadir::create_segment(&dir, seq, core as u32)?;
        let file = Rc::new(monoio::fs::File::from_std(file)?);
        let mode = shared.config.fsync;
        Ok(Rc::new(Wal {
            core,
            dir,
            mode,
            shared,
            st: RefCell::new(State {
                file,
                file_seq: seq,
                offset: 0,
                acked: 0,
                written: 0,
                deferred: VecDeque::new(),
                failing: None,
                failing_since: None,
                retry: None,
                unsynced: Vec::new(),
                busy: false,
                writer: None,
                idle_waiters: Vec::new(),
                spare: Vec::new(),
            }),
        }))
    }

    /// Whether an answer computed at log position `lsn` may go out now.
    /// While the log is failing, answers go out at once (writes are refused
    /// before they change anything, and reads must go on).
    pub fn acked(&self, lsn: u64) -> bool {
        let st = self.st.borrow();
        lsn <= st.acked || st.failing.is_some()
    }

    /// Holds `reply` for `origin` until `lsn` is acknowledged.
    pub fn defer(&self, lsn: u64, origin: Origin, reply: Reply) {
        self.st.borrow_mut().deferred.push_back((lsn, origin, reply));
    }

    /// Wakes the writer: there is something to write.
    pub fn kick(&self) {
        if let Some(w) = self.st.borrow_mut().writer.take() {
            w.wake();
        }
    }

    pub fn is_failing(&self) -> bool {
        self.st.borrow().failing.is_some()
    }

    fn stats(&self) -> &crate::metrics::stats::CoreStats {
        &self.shared.stats[self.core]
    }

    /// Releases every deferred answer up to `upto` (all of them if
    /// `failed`, turning the changes among them into 503s).
    fn release(&self, router: &Router, upto: u64, failed: bool) {
        loop {
            let next = {
                let mut st = self.st.borrow_mut();
                match st.deferred.front() {
                    Some((lsn, _, _)) if *lsn <= upto || failed => st.deferred.pop_front(),
                    _ => None,
                }
            };
            let Some((lsn, origin, reply)) = next else { break };
            let reply = match reply {
                Reply::Wrote(WriteOutcome::Stored { .. } | WriteOutcome::Deleted { .. }) if failed && lsn > upto => {
                    Reply::Unavailable
                }
                other => other,
            };
            router.deliver(origin, reply);
        }
    }

    /// The writer task: one pass per wake-up. Never returns.
    pub async fn run(self: Rc<Self>, router: Rc<Router>) {
        loop {
            // Wait for something to write.
            std::future::poll_fn(|cx| {
                let pending = router.with_owned(|o, _| o.shard.journal().pending());
                let mut st = self.st.borrow_mut();
                if pending > 0 || st.retry.is_some() {
                    return Poll::Ready(());
                }
                st.writer = Some(cx.waker().clone());
                Poll::Pending
            })
            .await;
            let (retry, failing) = {
                let st = self.st.borrow();
                (st.retry.is_some(), st.failing.is_some())
            };
            if retry {
                if failing {
                    monoio::time::sleep(RETRY_EVERY).await;
                }
                self.retry(&router).await;
                continue;
            }
            self.pass(&router).await;
        }
    }

    fn set_busy(&self, busy: bool) {
        let waiters = {
            let mut st = self.st.borrow_mut();
            st.busy = busy;
            if busy {
                Vec::new()
            } else {
                std::mem::take(&mut st.idle_waiters)
            }
        };
        waiters.into_iter().for_each(Waker::wake);
    }

    /// Writes (and for `always`, syncs) everything journaled so far.
    async fn pass(&self, router: &Router) {
        self.lock().await;
        let spare = std::mem::take(&mut self.st.borrow_mut().spare);
        let (bytes, end) = router.with_owned(|o, _| {
            let j = o.shard.journal_mut();
            (j.take(spare), j.lsn())
        });
        let (file, offset) = {
            let st = self.st.borrow();
            (st.file.clone(), st.offset)
        };
        let len = bytes.len() as u64;
        let (res, bytes) = file.write_all_at(bytes, offset).await;
        match res {
            Ok(()) => {
                {
                    let mut st = self.st.borrow_mut();
                    st.offset += len;
                    st.written = end;
                    if self.mode != Fsync::No {
                        st.unsynced.extend_from_slice(&bytes);
                    }
                }
                self.stats().log_bytes.add(len);
                self.stats().log_flushes.add(1);
                let synced = match self.mode {
                    Fsync::Always => self.sync(&file).await,
                    Fsync::EverySec if self.st.borrow().unsynced.len() > UNSYNCED_HIGH_WATER => self.sync(&file).await,
                    _ => Ok(()),
                };
                match synced {
                    Ok(()) => {
                        let mut bytes = bytes;
                        bytes.clear();
                        let mut st = self.st.borrow_mut();
                        st.acked = end;
                        st.spare = bytes;
                        drop(st);
                        self.release(router, end, false);
                    }
                    Err(e) => {
                        // The OS may have dropped what it could not write:
                        // everything since the last good sync goes again,
                        // into a fresh segment.
                        let again = std::mem::take(&mut self.st.borrow_mut().unsynced);
                        self.fail(router, e, again, end, true);
                    }
                }
            }
            Err(e) if e.raw_os_error() == Some(libc::EFBIG) => {
                // The file-size limit: continue in a new segment.
                log::warn!(
                    "core {}: log segment reached the file-size limit at {offset} bytes; continuing in a new segment",
                    self.core
                );
                let _ = std::fs::OpenOptions::new()
                    .write(true)
                    .open(self.dir.join(datadir::segment_name(self.st.borrow().file_seq, self.core as u32)))
                    .and_then(|f| f.set_len(offset));
                match self.rotate_now().await {
                    Ok(()) => self.st.borrow_mut().retry = Some((bytes, end)),
                    Err(e2) => self.fail(router, e2, bytes, end, false),
                }
            }
            Err(e) => self.fail(router, e, bytes, end, false),
        }
        self.set_busy(false);
    }

    /// Syncs `file`, timing it; on success the unsynced bytes are forgotten.
    async fn sync(&self, file: &monoio::fs::File) -> std::io::Result<()> {
        let upto = self.st.borrow().unsynced.len();
        let started = Instant::now();
        let r = file.sync_data().await;
        self.stats().log_sync.record_ns(started.elapsed().as_nanos() as u64);
        if r.is_ok() {
            let mut st = self.st.borrow_mut();
            let n = upto.min(st.unsynced.len());
            st.unsynced.drain(..n);
        }
        r
    }

    /// Enters (or stays in) the failing state: writes are refused, the
    /// answers held for this pass go out (changes among them as 503), and
    /// `again` is retried later.
    fn fail(&self, router: &Router, e: std::io::Error, again: Vec<u8>, end: u64, rotate: bool) {
        let first = {
            let mut st = self.st.borrow_mut();
            let first = st.failing.is_none();
            st.failing = Some(e.kind());
            st.failing_since.get_or_insert_with(Instant::now);
            st.retry = Some((again, end));
            if rotate {
                // Retry into a new file: the old one's cached pages are suspect.
                st.offset = u64::MAX;
            }
            first
        };
        router.with_owned(|o, _| o.shard.journal_mut().set_refusing(true));
        self.stats().log_failures.add(1);
        self.stats().log_failing.set(1);
        if first {
            log::error!(
                "core {}: cannot write the log in {}: {e}; refusing writes (503) until it can, reads go on",
                self.core,
                self.dir.display()
            );
        }
        let acked = self.st.borrow().acked;
        self.release(router, acked, true);
    }

    /// Tries the failed bytes again; on success the log is healthy again.
    async fn retry(&self, router: &Router) {
        self.lock().await;
        let Some((bytes, end)) = self.st.borrow_mut().retry.take() else {
            self.set_busy(false);
            return;
        };
        let needs_new_file = self.st.borrow().offset == u64::MAX;
        if needs_new_file {
            if let Err(e) = self.rotate_now().await {
                self.fail(router, e, bytes, end, true);
                self.set_busy(false);
                return;
            }
        }
        let (file, offset) = {
            let st = self.st.borrow();
            (st.file.clone(), st.offset)
        };
        let len = bytes.len() as u64;
        let (res, bytes) = file.write_all_at(bytes, offset).await;
        let res = match res {
            Ok(()) if self.mode != Fsync::No => {
                self.st.borrow_mut().unsynced.extend_from_slice(&bytes);
                self.sync(&file).await
            }
            other => other,
        };
        match res {
            Ok(()) => {
                let (was_failing, since) = {
                    let mut st = self.st.borrow_mut();
                    st.offset += len;
                    st.written = st.written.max(end);
                    st.acked = st.acked.max(end);
                    (st.failing.take().is_some(), st.failing_since.take())
                };
                self.stats().log_bytes.add(len);
                if was_failing {
                    router.with_owned(|o, _| o.shard.journal_mut().set_refusing(false));
                    self.stats().log_failing.set(0);
                    log::info!(
                        "core {}: the log is writable again after {} s; writes accepted",
                        self.core,
                        since.map_or(0, |t| t.elapsed().as_secs())
                    );
                }
                self.release(router, end, false);
            }
            Err(e) => {
                let rotate = e.raw_os_error() == Some(libc::EFBIG) || self.mode != Fsync::No;
                self.fail(router, e, bytes, end, rotate);
            }
        }
        self.set_busy(false);
    }

    /// Waits until no pass is in flight and takes the file for one: the
    /// check and the take are one step (one thread, no await between), so
    /// two passes, or a pass and a rotation, never interleave. Release
    /// with `set_busy(false)`.
    async fn lock(&self) {
        std::future::poll_fn(|cx| {
            let mut st = self.st.borrow_mut();
            if !st.busy {
                st.busy = true;
                return Poll::Ready(());
            }
            st.idle_waiters.push(cx.waker().clone());
            Poll::Pending
        })
        .await
    }

    /// Switches to a new segment now (the caller is the writer, or waited
    /// for it to be idle): the old one is synced first, so a segment that is
    /// followed by another is always whole on disk.
    async fn rotate_now(&self) -> std::io::Result<()> {
        let seq = self.shared.next_segment.fetch_add(1, Ordering::AcqRel);
        let old = self.st.borrow().file.clone();
        // A failed sync here is not fatal: the old bytes are also kept in
        // `unsynced` and the caller decides.
        let synced = old.sync_data().await;
        let file = datadir::create_segment(&self.dir, seq, self.core as u32)?;
        let file = Rc::new(monoio::fs::File::from_std(file)?);
        let mut st = self.st.borrow_mut();
        st.file = file;
        st.file_seq = seq;
        st.offset = 0;
        if synced.is_ok() {
            st.unsynced.clear();
        }
        Ok(())
    }

    /// Starts a new segment for a checkpoint. Returns its number: every
    /// record journaled after this returns lands in it or a later one.
    pub async fn rotate_for_checkpoint(&self) -> std::io::Result<u64> {
        self.lock().await;
        let r = self.rotate_now().await;
        let seq = self.st.borrow().file_seq;
        self.set_busy(false);
        r.map(|()| seq)
    }

    /// `everysec`: syncs once a second whatever is written and not synced.
    pub async fn sync_every_second(self: Rc<Self>, router: Rc<Router>) {
        let mut tick = monoio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            self.lock().await;
            let due = {
                let st = self.st.borrow();
                !st.unsynced.is_empty() && st.failing.is_none()
            };
            if !due {
                self.set_busy(false);
                continue;
            }
            let file = self.st.borrow().file.clone();
            if let Err(e) = self.sync(&file).await {
                let (again, written) = {
                    let mut st = self.st.borrow_mut();
                    (std::mem::take(&mut st.unsynced), st.written)
                };
                self.fail(&router, e, again, written, true);
            }
            self.set_busy(false);
        }
    }

    /// Shutdown: writes and syncs everything journaled (every mode).
    pub async fn flush(&self, router: &Router) -> std::io::Result<()> {
        if router.with_owned(|o, _| o.shard.journal().pending()) > 0 && self.st.borrow().failing.is_none() {
            self.pass(router).await;
        }
        if let Some(kind) = self.st.borrow().failing {
            return Err(std::io::Error::from(kind));
        }
        let file = self.st.borrow().file.clone();
        file.sync_data().await
    }

    /// Runs `wal.run` and, for `everysec`, the sync timer.
    pub fn spawn(self: &Rc<Self>, router: &Rc<Router>) {
        monoio::spawn(self.clone().run(router.clone()));
        if self.mode == Fsync::EverySec {
            monoio::spawn(self.clone().sync_every_second(router.clone()));
        }
    }
}
