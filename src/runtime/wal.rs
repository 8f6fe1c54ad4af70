//! One core's write-ahead log: appends the records the core journals,
//! syncs them as `-fsync` says, and holds back every answer until what it
//! reveals is as durable as promised.
//!
//! Appends are positioned writes into the page cache, made on the core
//! itself by its log task (`Router::log_task`) once per scheduler pass:
//! every change applied in the pass, from this core's connections and from
//! other cores' batches, shares one write (a write per request cost about a
//! microsecond each of syscall and filesystem overhead; a pipelining
//! client's change is written at once, see `Router::run`). On this kernel
//! and filesystem a buffered write cannot be issued without blocking (ext4
//! refuses `RWF_NOWAIT` for it), so io_uring would hand each one to a
//! kernel worker thread; measured, that cost more CPU in context switches
//! than the copy itself (a 100-byte append is about 0.4 us as a plain
//! syscall). What can wait on the disk, `fdatasync`, is never done on the
//! core: it goes through the core's io_uring and the executor keeps serving
//! meanwhile. The one exception: when the log moves to a new segment (once
//! per checkpoint, or at a file-size limit) the directory entry is synced on
//! the core, so that a segment the log counts on cannot vanish in a power
//! loss. Once synced, the log's pages leave the page cache (`trim`): each
//! sync hands the synced stretch of the segment to the core's trimming
//! helper, and a segment the log has moved on from is handed over whole.
//! Each sync that returns leaves a sync mark to append (`record::SyncMark`:
//! how far the segment is on the disk), carried by the next records, or
//! written and synced alone once the log is quiet for a period; recovery
//! tells a power loss's unsynced end from damage by them.
//!
//! - `-fsync no`: an answer goes out once its record is in the page cache
//!   (a process crash loses nothing); the OS flushes when it likes.
//! - `everysec`: the same, and a timer syncs once a second (power loss
//!   loses at most about a second); a disk that falls behind (a sync
//!   running for `SYNC_LATE`, or `UNSYNCED_CAP` waiting for one) makes
//!   answers wait for syncs until it catches up.
//! - `always`: answers wait for a sync covering their record. One sync per
//!   pass covers every record appended meanwhile (group commit).
//!
//! The log holds the changes this core applied, to its own shard or to
//! another core's (`router::Router::apply_direct`). Answers wait on a log
//! sequence number (bytes journaled on this core): any answer computed
//! after a change, reads included, goes out only once that position is
//! acknowledged, so no client sees a value a crash could take back. Answers
//! for other cores are held here and released into their outboxes. The
//! acknowledged position (and whether the log is failing) is published for
//! the other cores, whose answers may depend on this log's records; their
//! inbox tasks are woken when it moves (`cells::Cells::publish_acked`).
//!
//! Disk trouble (ENOSPC, EIO, a failed sync) never crashes the core and
//! never acknowledges what is not logged: the failed records' writes (and
//! those still waiting for the pass's log write when a sync fails) are
//! answered 503, new writes are refused before they change anything (the
//! journal's `refusing` flag), reads go on, and the failed bytes are retried
//! every second (after a failed sync, every byte written since the last good
//! one, into a fresh segment, the same one emptied for each attempt) until
//! the disk takes them; then writes resume by themselves. A file-size
//! limit (EFBIG; SIGXFSZ is ignored) just moves the log to a new segment.

use crate::config::Fsync;
use crate::persist::datadir::DataDir;
use crate::runtime::shared::Shared;
use crate::runtime::trim::{self, Trimmer};
use crate::state::command::{Origin, Reply};
use crate::state::record::{self, SyncMark};
use crate::state::shard::WriteOutcome;
use std::cell::RefCell;
use std::collections::VecDeque;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

/// How often a failing log is retried.
const RETRY_EVERY: Duration = Duration::from_secs(1);
/// `everysec`: sync at once when this much is written and not yet synced
/// (what a failed sync must rewrite; `UNSYNCED_CAP` bounds it).
const UNSYNCED_HIGH_WATER: usize = 16 << 20;
/// `everysec`: with more than this written and not yet synced, answers
/// wait for syncs, as under `always`, until the disk catches up. Without
/// it a disk whose syncs fall behind the write rate (a slow or failing
/// device: a sync can take tens of seconds before it fails) let the kept
/// passes, which a failed sync must rewrite, grow at the write rate. Twice
/// the high-water mark: at that mark a sync starts at once, so on a disk
/// that keeps up the cap is never reached.
const UNSYNCED_CAP: usize = 2 * UNSYNCED_HIGH_WATER;
/// `everysec`: a sync running this long means the disk is behind, however
/// little was written: answers wait for syncs until it returns. Without it
/// a sync hanging for tens of seconds at a low write rate never reached
/// `UNSYNCED_CAP`, and answers went on going out from the page cache, far
/// more than a second of them unsynced.
const SYNC_LATE: Duration = Duration::from_secs(2);
/// Largest journal buffer kept, or sized for, the next pass.
const SPARE_MAX: usize = 1 << 20;
/// Most bytes of emptied journal buffers kept for the next passes: about
/// what `everysec` holds between two syncs, so a core writing flat out
/// reuses the same buffers instead of freeing them at each sync and
/// faulting fresh ones in.
const POOL_MAX: usize = UNSYNCED_HIGH_WATER;
/// The shortest time between two warnings that `everysec` answers wait for
/// syncs (`UNSYNCED_CAP`).
const CAP_WARNING_EVERY: Duration = Duration::from_secs(60);
/// A log with nothing written for this long gives its kept buffers back.
const IDLE: Duration = Duration::from_secs(1);

/// Emptied journal buffers, kept for the next passes (`POOL_MAX` bytes of
/// room at most). Under `everysec` each pass's buffer is held until a sync
/// covers it, up to 16 MiB a sync at a high write rate: freed at each sync
/// and allocated again, that memory went back to the allocator and came
/// back as fresh pages, faulted and zeroed in: sets of 1000 B took about
/// 2,400 page faults a second, 470 with the buffers kept here, where the
/// same pages serve every sync interval (medians of 5 alternated rounds).
#[derive(Debug, Default)]
struct Pool {
    buffers: Vec<Vec<u8>>,
    /// Room of the buffers kept.
    room: usize,
}

impl Pool {
    /// An empty buffer with room for at least `want` bytes: a kept one if
    /// the latest kept has the room (it is dropped otherwise: growing it
    /// would copy its whole room), else a fresh one.
    fn take(&mut self, want: usize) -> Vec<u8> {
        match self.buffers.pop() {
            Some(b) => {
                self.room -= b.capacity();
                if b.capacity() >= want {
                    return b;
                }
                Vec::with_capacity(want)
            }
            None => Vec::with_capacity(want),
        }
    }

    /// Keeps `b`, emptied, unless it has no room, grew past `SPARE_MAX` in a
    /// burst, or would take the pool past `POOL_MAX`.
    fn give(&mut self, mut b: Vec<u8>) {
        let room = b.capacity();
        if room == 0 || room > SPARE_MAX || self.room + room > POOL_MAX {
            return;
        }
        b.clear();
        self.room += room;
        self.buffers.push(b);
    }

    /// Keeps at most `room` bytes of room, the most recently kept buffers
    /// (the warmest): after a sync, what that sync freed, which is what the
    /// next interval will likely need. So a burst's buffers leave with the
    /// next sync; an idle log (`IDLE`) and a failing one keep none.
    fn keep_at_most(&mut self, room: usize) {
        let mut drop = 0;
        while self.room > room {
            let Some(b) = self.buffers.get(drop) else { break };
            self.room -= b.capacity();
            drop += 1;
        }
        self.buffers.drain(..drop);
    }

    /// Gives every kept buffer back to the allocator.
    fn clear(&mut self) {
        *self = Pool::default();
    }
}

/// How an answer computed at log position `lsn` stands, given the position
/// acknowledged so far (`acked`), the end of the records that failed
/// (`failed_to`) and whether the log is failing now. Answers up to `acked`
/// go out. While the log is failing, every answer goes out at once (reads
/// must go on; new writes are refused before they change anything), but a
/// change above `acked` becomes a 503: its record either failed or was still
/// waiting for the core's next log write when a sync failed, and either way
/// it is not as durable as promised. (It stays in memory and its record is
/// written when the disk recovers; the client was told it may not be.)
fn judge(lsn: u64, reply: Reply, acked: u64, failed_to: u64, failing: bool) -> Settled {
    if lsn <= acked {
        return Settled::Now(reply);
    }
    let change = matches!(reply, Reply::Wrote(WriteOutcome::Stored { .. } | WriteOutcome::Deleted { .. }));
    if change && (failing || lsn <= failed_to) {
        Settled::Now(Reply::Unavailable)
    } else if failing {
        Settled::Now(reply)
    } else {
        Settled::Wait(reply)
    }
}

/// Whether `everysec`'s disk is behind: more than `UNSYNCED_CAP` bytes wait
/// for a sync, or the sync running has run for `SYNC_LATE`.
fn behind(unsynced: usize, syncing_for: Option<Duration>) -> bool {
    unsynced > UNSYNCED_CAP || syncing_for.is_some_and(|d| d >= SYNC_LATE)
}

/// The log position answers may go out at, given what is written, what is
/// synced and whether the disk is `behind`, and the position they could go
/// out at before (`prev`), which it never goes below. `always` waits for
/// syncs, `no` for the page cache, `everysec` for the page cache unless the
/// disk is behind, then for syncs.
fn ackable(mode: Fsync, prev: u64, written: u64, synced: u64, behind: bool) -> u64 {
    let at = match mode {
        Fsync::Always => synced,
        Fsync::No => written,
        Fsync::EverySec if behind => synced,
        Fsync::EverySec => written,
    };
    at.max(prev)
}

/// What the log needs of the core it serves (the core's router): the
/// records the core journaled, a switch to refuse writes, and a way to
/// deliver the answers it held back.
pub trait Host {
    /// Takes the journaled bytes (leaving `spare` to append into) and the
    /// journal position they end at.
    fn take_journal(&self, spare: Vec<u8>) -> (Vec<u8>, u64);
    /// Refuse (or accept again) writes before they change anything.
    fn refuse_writes(&self, on: bool);
    /// Delivers an answer to its slot, on this core or another.
    fn deliver(&self, origin: Origin, reply: Reply);
}

/// The passes appended since the last good sync, kept to rewrite them into
/// a fresh segment if a sync fails (`no` keeps none).
#[derive(Debug, Default)]
struct Unsynced {
    passes: Vec<Vec<u8>>,
    bytes: usize,
}

impl Unsynced {
    fn push(&mut self, pass: Vec<u8>) {
        self.bytes += pass.len();
        self.passes.push(pass);
    }

    fn len(&self) -> usize {
        self.passes.len()
    }

    /// The first `n` passes are synced: their buffers go to `pool`, which
    /// then keeps at most what they freed. Passes appended after those
    /// (while the sync was on its way) stay.
    fn synced(&mut self, n: usize, pool: &mut Pool) {
        let n = n.min(self.passes.len());
        let mut freed = 0;
        for b in self.passes.drain(..n) {
            self.bytes -= b.len();
            freed += b.capacity();
            pool.give(b);
        }
        pool.keep_at_most(freed);
    }

    /// Every pass's bytes, in order, to write again; none kept after.
    fn take_all(&mut self) -> Vec<u8> {
        let all = self.passes.concat();
        *self = Unsynced::default();
        all
    }
}

/// Bytes the log must write again before anything else. Appends wait
/// while a retry is due or running, so that records reach the file in
/// order and no pass is appended that the retry's outcome would then
/// misplace (counted synced, or rewritten ahead of older bytes).
enum Retry {
    None,
    /// `bytes` end at journal position `end`; into a fresh segment if
    /// `fresh` (after a failed sync the old one's cached pages are suspect).
    Due {
        bytes: Vec<u8>,
        end: u64,
        fresh: bool,
    },
    /// The sync task is writing or syncing them.
    Running,
}

impl Retry {
    fn is_due(&self) -> bool {
        matches!(self, Retry::Due { .. })
    }
}

/// An open segment: the file for appends (shared with the trimming
/// helper), and the same file on the core's io_uring for syncs.
struct Segment {
    file: Arc<File>,
    ring: Rc<monoio::fs::File>,
    /// Its sequence number, which its sync marks name.
    seq: u64,
}

impl Segment {
    fn create(dir: &DataDir, seq: u64, core: usize) -> std::io::Result<Segment> {
        let file = dir.create_segment(seq, core as u32)?;
        let ring = Rc::new(monoio::fs::File::from_std(file.try_clone()?)?);
        Ok(Segment { file: Arc::new(file), ring, seq })
    }
}

/// A segment the log moved on from, until a sync has it on the disk.
#[derive(Clone)]
struct Closed {
    ring: Rc<monoio::fs::File>,
    file: Arc<File>,
    /// The mark to end it with once that sync returns (`Wal::rotate`).
    last: Option<SyncMark>,
}

/// Writes `mark` at byte `at` of `file`, on its own: a plain positioned
/// write (no move to a new segment), best effort for the callers.
fn write_mark(file: &File, mark: SyncMark, at: u64) -> std::io::Result<()> {
    let mut bytes = Vec::with_capacity(record::MARK_LEN);
    record::encode_mark(&mut bytes, mark);
    file.write_all_at(&bytes, at)
}

/// How an answer computed at some log position stands.
pub enum Settled {
    /// It may go out now (converted to a 503 if its change was not logged).
    Now(Reply),
    /// It must wait for a sync.
    Wait(Reply),
}

struct State {
    seg: Segment,
    /// Bytes appended to `seg`.
    offset: u64,
    /// Bytes of `seg` whose pages were dropped from the page cache.
    trimmed: u64,
    /// Segments closed since the last sync, still to be synced first.
    closed: Vec<Closed>,
    /// Journal position up to which records are in the page cache.
    written: u64,
    /// Journal position up to which records are synced (or, for `no`,
    /// written: nothing waits for a sync).
    synced: u64,
    /// Journal position up to which answers may go out (`ackable`).
    acked: u64,
    /// When the log last said that `everysec` answers wait for syncs.
    capped_warning: Option<Instant>,
    /// When the sync running (if one is) began.
    sync_since: Option<Instant>,
    /// Records appended since the last good sync.
    unsynced: Unsynced,
    /// Answers waiting for the log, in log order.
    deferred: VecDeque<(u64, Origin, Reply)>,
    /// Set while the disk refuses the log: (since, first error).
    failing: Option<(Instant, std::io::ErrorKind)>,
    /// Journal positions in (failed_from, failed_to] belong to records that
    /// failed: their changes were answered 503.
    failed_to: u64,
    /// Bytes to write again before anything else.
    retry: Retry,
    /// Wakes the sync task (there is something to sync).
    syncer: Option<Waker>,
    /// Emptied buffers for the next passes' journals.
    pool: Pool,
    /// Bytes the last pass wrote (at most `SPARE_MAX`): the room a buffer
    /// for the next pass needs.
    last_pass: usize,
    /// `seg` was made for a retry that then failed: it holds nothing but
    /// copies of bytes the next retry writes again.
    retry_copy: bool,
    /// A sync mark to append to `seg` (`record::SyncMark`): how far a sync
    /// that returned found it on the disk.
    mark: Option<SyncMark>,
    /// The offset of `seg` the last mark made said was synced.
    marked_to: u64,
}

/// One core's log.
pub struct Wal {
    core: usize,
    /// The data directory; segments are made in it only while it is the
    /// one locked at startup (`DataDir::create_segment`).
    dir: Arc<DataDir>,
    mode: Fsync,
    shared: Arc<Shared>,
    trim: Trimmer,
    st: RefCell<State>,
}

impl Wal {
    /// Opens this core's first segment (`seq`, allocated by the caller);
    /// `trim` is the core's trimming helper.
    pub fn open(
        shared: Arc<Shared>,
        core: usize,
        dir: Arc<DataDir>,
        seq: u64,
        trim: Trimmer,
    ) -> std::io::Result<Rc<Wal>> {
        let seg = Segment::create(&dir, seq, core)?;
        let mode = shared.config.fsync;
        Ok(Rc::new(Wal {
            core,
            dir,
            mode,
            shared,
            trim,
            st: RefCell::new(State {
                seg,
                offset: 0,
                trimmed: 0,
                closed: Vec::new(),
                written: 0,
                synced: 0,
                acked: 0,
                capped_warning: None,
                sync_since: None,
                unsynced: Unsynced::default(),
                deferred: VecDeque::new(),
                failing: None,
                failed_to: 0,
                retry: Retry::None,
                syncer: None,
                pool: Pool::default(),
                last_pass: 0,
                retry_copy: false,
                mark: None,
                marked_to: 0,
            }),
        }))
    }

    fn stats(&self) -> &crate::metrics::CoreStats {
        &self.shared.stats[self.core]
    }

    /// Moves the acknowledged position (`ackable`) and tells other cores
    /// (answers and direct reads that depend on this log's records wait for
    /// it), waking the cores holding answers for it. Call after `written`,
    /// `synced` or the unsynced passes change.
    fn publish(&self, st: &mut State) {
        let syncing_for = st.sync_since.map(|at| at.elapsed());
        let behind = self.mode == Fsync::EverySec && behind(st.unsynced.bytes, syncing_for);
        st.acked = ackable(self.mode, st.acked, st.written, st.synced, behind);
        if behind {
            let quiet = st.capped_warning.is_some_and(|at| at.elapsed() < CAP_WARNING_EVERY);
            if !quiet {
                st.capped_warning = Some(Instant::now());
                log::warn!(
                    "core {}: the disk syncs slower than writes arrive ({} MiB of log wait for a sync, at most {} \
                     MiB may; the sync running has run {:.1} s, at most {} s may): answers wait for syncs until it \
                     catches up (said at most once a minute)",
                    self.core,
                    st.unsynced.bytes >> 20,
                    UNSYNCED_CAP >> 20,
                    syncing_for.unwrap_or_default().as_secs_f64(),
                    SYNC_LATE.as_secs()
                );
            }
        }
        let mesh = &self.shared.mesh;
        self.shared.cells.publish_acked(self.core, st.acked, |c| mesh.inboxes[c].waker.wake());
    }

    /// Tells other cores whether this log is failing (answers waiting for
    /// it then go out at once, as this core's own do).
    fn publish_failing(&self, failing: bool) {
        let mesh = &self.shared.mesh;
        self.shared.cells.publish_failing(self.core, failing, |c| mesh.inboxes[c].waker.wake());
    }

    /// How an answer computed at log position `lsn` stands (see `judge`).
    pub fn settle(&self, lsn: u64, reply: Reply) -> Settled {
        let st = self.st.borrow();
        judge(lsn, reply, st.acked, st.failed_to, st.failing.is_some())
    }

    /// Holds `reply` for `origin` until `lsn` is acknowledged. Kept in
    /// position order (an answer released from waiting for another core's
    /// log can come with a lower position than those already here).
    pub fn defer(&self, lsn: u64, origin: Origin, reply: Reply) {
        let deferred = &mut self.st.borrow_mut().deferred;
        let at = deferred.iter().rposition(|(l, _, _)| *l <= lsn).map_or(0, |i| i + 1);
        deferred.insert(at, (lsn, origin, reply));
    }

    pub fn is_failing(&self) -> bool {
        self.st.borrow().failing.is_some()
    }

    /// Writes what the shard has journaled into the page cache, now, then
    /// releases the answers that were waiting for it. Call right after
    /// applying changes, before their answers leave.
    pub fn append(&self, router: &impl Host) {
        if !matches!(self.st.borrow().retry, Retry::None) {
            // Records must reach the file in order: after the retry.
            return;
        }
        let spare = {
            let mut st = self.st.borrow_mut();
            // Room for the last pass's size and a quarter more, rather than
            // growing by doubling (a copy each time) through the pass.
            let want = (st.last_pass + st.last_pass / 4).min(SPARE_MAX);
            st.pool.take(want)
        };
        let (mut bytes, end) = router.take_journal(spare);
        if bytes.is_empty() {
            self.st.borrow_mut().pool.give(bytes);
            return;
        }
        // The last sync's mark rides with the next records (if this write
        // moves to a new segment, the mark names the old one and is ignored).
        if let Some(mark) = self.st.borrow_mut().mark.take() {
            record::encode_mark(&mut bytes, mark);
        }
        self.st.borrow_mut().last_pass = bytes.len().min(SPARE_MAX);
        match self.write(&bytes) {
            Ok(()) => self.appended(router, bytes, end),
            Err(e) => self.fail(router, e, bytes, end, false),
        }
    }

    /// Writes `bytes` at the end of the current segment, timing the write
    /// (the core serves nothing meanwhile: `rendezvous_log_write_duration_seconds`
    /// shows an operator a filesystem that holds it).
    fn write(&self, bytes: &[u8]) -> std::io::Result<()> {
        let started = Instant::now();
        let r = self.write_at_end(bytes);
        self.stats().log_write.record_ns(started.elapsed().as_nanos() as u64);
        r
    }

    /// `write`'s work; a file-size limit moves on to a new segment first.
    fn write_at_end(&self, bytes: &[u8]) -> std::io::Result<()> {
        let (offset, r) = {
            let st = self.st.borrow();
            (st.offset, st.seg.file.write_all_at(bytes, st.offset))
        };
        match r {
            Ok(()) => {
                self.st.borrow_mut().offset += bytes.len() as u64;
                Ok(())
            }
            Err(e) if e.raw_os_error() == Some(libc::EFBIG) => {
                // Drop the partial record the limit left.
                let _ = self.st.borrow().seg.file.set_len(offset);
                if offset == 0 {
                    // These bytes alone are over the limit: a new segment
                    // would refuse them too.
                    return Err(e);
                }
                log::warn!(
                    "core {}: log segment reached the file-size limit at {offset} bytes; continuing in a new segment",
                    self.core
                );
                self.rotate(false)?;
                let r = self.st.borrow().seg.file.write_all_at(bytes, 0);
                if let Err(e) = r {
                    // Left empty, not holding a partial copy: a retry
                    // reuses it rather than making another.
                    let mut st = self.st.borrow_mut();
                    let _ = st.seg.file.set_len(0);
                    st.retry_copy = true;
                    return Err(e);
                }
                self.st.borrow_mut().offset = bytes.len() as u64;
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Bytes up to `end` are in the page cache.
    fn appended(&self, router: &impl Host, bytes: Vec<u8>, end: u64) {
        let len = bytes.len() as u64;
        self.stats().log_bytes.add(len);
        self.stats().log_writes.add(1);
        let wake_syncer = {
            let mut st = self.st.borrow_mut();
            st.written = end;
            if self.mode == Fsync::No {
                st.synced = end;
            }
            let wake = match self.mode {
                Fsync::No => {
                    st.pool.give(bytes);
                    false
                }
                Fsync::EverySec | Fsync::Always => {
                    st.unsynced.push(bytes);
                    self.mode == Fsync::Always || st.unsynced.bytes > UNSYNCED_HIGH_WATER
                }
            };
            self.publish(&mut st);
            wake
        };
        if wake_syncer {
            if let Some(w) = self.st.borrow_mut().syncer.take() {
                w.wake();
            }
        }
        self.release(router);
    }

    /// Releases every deferred answer the log now allows.
    fn release(&self, router: &impl Host) {
        loop {
            let next = {
                let mut st = self.st.borrow_mut();
                let acked = st.acked;
                match st.deferred.front() {
                    Some((lsn, _, _)) if *lsn <= acked || st.failing.is_some() => st.deferred.pop_front(),
                    _ => None,
                }
            };
            let Some((lsn, origin, reply)) = next else { break };
            let reply = match self.settle(lsn, reply) {
                Settled::Now(r) | Settled::Wait(r) => r,
            };
            router.deliver(origin, reply);
        }
    }

    /// Enters (or stays in) the failing state: writes are refused, the
    /// answers held so far go out (changes among the failed ones as 503),
    /// and `again` is retried later (into a new segment if `fresh`).
    fn fail(&self, router: &impl Host, e: std::io::Error, again: Vec<u8>, end: u64, fresh: bool) {
        let first = {
            let mut st = self.st.borrow_mut();
            let first = st.failing.is_none();
            if first {
                st.failing = Some((Instant::now(), e.kind()));
            }
            st.failed_to = st.failed_to.max(end);
            // Nothing is appended until the disk takes the log again.
            st.pool.clear();
            // A sync can fail while an append's bytes already wait for their
            // retry: those bytes come after everything synced-or-not before
            // them, so they follow `again` rather than being dropped.
            st.retry = match std::mem::replace(&mut st.retry, Retry::None) {
                Retry::Due { bytes: pending, end: pending_end, fresh: pending_fresh } => {
                    let mut all = again;
                    all.extend_from_slice(&pending);
                    Retry::Due { bytes: all, end: end.max(pending_end), fresh: fresh || pending_fresh }
                }
                Retry::None | Retry::Running => Retry::Due { bytes: again, end, fresh },
            };
            first
        };
        router.refuse_writes(true);
        self.publish_failing(true);
        self.stats().log_failures.add(1);
        self.stats().log_failing.set(1);
        if first {
            log::error!(
                "core {}: cannot write the log in {}: {e}; refusing writes (503) until it can, reads go on",
                self.core,
                self.dir.path().display()
            );
        }
        self.release(router);
        if let Some(w) = self.st.borrow_mut().syncer.take() {
            w.wake();
        }
    }

    /// Moves the log to a new segment now. The old one is synced (through
    /// the ring, by the sync task) before anything after it counts as synced.
    /// `last_mark`: once that sync returns, the old one is ended with a
    /// mark claiming its whole length; without it, its records after its
    /// last mark (or a mark still waiting for records to carry it) would
    /// never be covered, and damage to them found after a power loss would
    /// be cut. Not for a segment a failed write or sync left suspect.
    fn rotate(&self, last_mark: bool) -> std::io::Result<u64> {
        let seq = self.shared.next_segment.fetch_add(1, Ordering::AcqRel);
        let seg = Segment::create(&self.dir, seq, self.core)?;
        let mut st = self.st.borrow_mut();
        let last = (last_mark && (st.mark.is_some() || st.offset > st.marked_to))
            .then_some(SyncMark { segment: st.seg.seq, synced_to: st.offset });
        let old = std::mem::replace(&mut st.seg, seg);
        st.offset = 0;
        st.trimmed = 0;
        st.retry_copy = false;
        st.mark = None;
        st.marked_to = 0;
        if self.mode == Fsync::No {
            // Nobody waits for it, but a segment followed by another should
            // be whole on disk: sync it in the background.
            let ring = old.ring.clone();
            let trim = self.trim.clone();
            monoio::spawn(async move {
                if ring.sync_data().await.is_ok() {
                    trim.retire(ring);
                }
            });
        } else {
            st.closed.push(Closed { ring: old.ring.clone(), file: old.file.clone(), last });
            // `always` syncs only when something waits for it: a closed
            // segment is synced (and let go of) now, not at the next write.
            if self.mode == Fsync::Always {
                if let Some(w) = st.syncer.take() {
                    w.wake();
                }
            }
        }
        Ok(seq)
    }

    /// Starts a new segment for a checkpoint. Returns its number: every
    /// record journaled after this returns lands in it or a later one.
    pub fn rotate_for_checkpoint(&self, router: &impl Host) -> std::io::Result<u64> {
        // Whatever is journaled belongs before the checkpoint's start.
        self.append(router);
        self.rotate(!self.is_failing())
    }

    /// The sync task: for `always`, a sync whenever something is written
    /// and not synced (group commit) or a segment was closed; for
    /// `everysec`, once a second (if something was written or a segment
    /// closed) and whenever the unsynced bytes pass the high-water mark;
    /// for every mode, the retries of a failing log, and the kept buffers
    /// given back when nothing was written for `IDLE`. Never returns.
    pub async fn run<H: Host>(self: Rc<Self>, router: Rc<H>) {
        // `everysec`'s period; the other modes wake this often only to see
        // whether the log went idle.
        let period = match self.mode {
            Fsync::EverySec => Duration::from_secs(1),
            _ => IDLE,
        };
        let mut last_sync = Instant::now();
        let mut written_before = 0;
        loop {
            // Wait for work, or for the period.
            let due = std::future::poll_fn(|cx| {
                let mut st = self.st.borrow_mut();
                let unsynced = st.written > st.synced;
                let urgent = st.retry.is_due()
                    || (self.mode == Fsync::Always && (unsynced || !st.closed.is_empty()))
                    || (unsynced && st.unsynced.bytes > UNSYNCED_HIGH_WATER);
                if urgent {
                    return Poll::Ready(());
                }
                st.syncer = Some(cx.waker().clone());
                Poll::Pending
            });
            // Either the period ran out or there is something urgent.
            let _ = monoio::time::timeout(period.saturating_sub(last_sync.elapsed()), due).await;
            if self.st.borrow().retry.is_due() {
                if self.is_failing() {
                    monoio::time::sleep(RETRY_EVERY).await;
                }
                self.retry(&*router).await;
                continue;
            }
            // A segment closed by a checkpoint is synced even if nothing was
            // written since: until then it stays open, and once the
            // checkpoint deletes it its disk space stays taken.
            let to_sync = {
                let st = self.st.borrow();
                st.written > st.synced || !st.closed.is_empty()
            };
            if to_sync && self.mode != Fsync::No {
                last_sync = Instant::now();
                self.sync(&*router).await;
            } else {
                last_sync = Instant::now();
                let mark = {
                    let mut st = self.st.borrow_mut();
                    if st.written == written_before {
                        // Nothing written since the last look: the buffers go back.
                        st.pool.clear();
                    }
                    let healthy = matches!(st.retry, Retry::None) && st.failing.is_none();
                    if healthy {
                        st.mark.take()
                    } else {
                        None
                    }
                };
                if let Some(mark) = mark {
                    self.mark_alone(&*router, mark).await;
                }
            }
            written_before = self.st.borrow().written;
        }
    }

    /// Writes and syncs the last sync's mark on its own: no records came
    /// to carry it for a period. Without it the newest synced records of a
    /// log gone quiet would have no mark after them, and damage to them
    /// found after a power loss would be taken for the unsynced end and
    /// cut. A mark that cannot be written is simply missing (recovery then
    /// judges as without it; no move to a new segment for it). Its sync is
    /// a full one (`sync`): a sync consumes the file's write error, so one
    /// that dropped it would let the next report records synced that are
    /// not, and one left hanging must count as the disk falling behind.
    async fn mark_alone(&self, router: &impl Host, mark: SyncMark) {
        {
            let mut st = self.st.borrow_mut();
            if write_mark(&st.seg.file, mark, st.offset).is_err() {
                // Whatever part landed is overwritten by the next append.
                return;
            }
            st.offset += record::MARK_LEN as u64;
            // Its own sync makes no new mark.
            st.marked_to = st.offset;
        }
        self.sync(router).await;
    }

    /// Syncs every closed segment, then the current one, and acknowledges
    /// what they hold.
    async fn sync(&self, router: &impl Host) {
        let (closed, ring, target, count, file, seg_end) = {
            let mut st = self.st.borrow_mut();
            let file = st.seg.file.clone();
            st.sync_since = Some(Instant::now());
            (std::mem::take(&mut st.closed), st.seg.ring.clone(), st.written, st.unsynced.len(), file, st.offset)
        };
        let started = Instant::now();
        let mut result = Ok(());
        for f in closed.iter().map(|c| &c.ring).chain(std::iter::once(&ring)) {
            result = f.sync_data().await;
            if result.is_err() {
                break;
            }
        }
        self.stats().log_sync.record_ns(started.elapsed().as_nanos() as u64);
        self.st.borrow_mut().sync_since = None;
        match result {
            Ok(()) => {
                {
                    let mut st = self.st.borrow_mut();
                    st.synced = st.synced.max(target);
                    let State { unsynced, pool, .. } = &mut *st;
                    unsynced.synced(count, pool);
                    self.publish(&mut st);
                    // The synced part of a segment still written (one moved
                    // on from meanwhile is retired whole by a later sync).
                    if Arc::ptr_eq(&st.seg.file, &file) {
                        if let Some((from, to)) = trim::trim_range(st.trimmed, seg_end) {
                            st.trimmed = to;
                            self.trim.range(&file, from, to);
                        }
                        if seg_end > st.marked_to {
                            st.mark = Some(SyncMark { segment: st.seg.seq, synced_to: seg_end });
                            st.marked_to = seg_end;
                        }
                    }
                }
                self.release(router);
                for c in closed {
                    // True now. Not synced itself: if it never reaches the
                    // disk, recovery judges the segment's end as without it.
                    if let Some(mark) = c.last {
                        let _ = write_mark(&c.file, mark, mark.synced_to);
                    }
                    self.trim.retire(c.ring);
                }
            }
            Err(e) => {
                // The OS may have dropped what it could not write: every
                // record since the last good sync goes again, into a fresh
                // segment.
                let again: Vec<u8> = {
                    let mut st = self.st.borrow_mut();
                    st.closed.extend(closed);
                    st.unsynced.take_all()
                };
                let end = self.st.borrow().written;
                self.fail(router, e, again, end, true);
            }
        }
    }

    /// Tries the failed bytes again; on success the log is healthy again.
    async fn retry(&self, router: &impl Host) {
        let (bytes, end, fresh) = {
            let mut st = self.st.borrow_mut();
            match std::mem::replace(&mut st.retry, Retry::Running) {
                Retry::Due { bytes, end, fresh } => (bytes, end, fresh),
                other => {
                    st.retry = other;
                    return;
                }
            }
        };
        let mut result = if fresh {
            // The failed segments' cached pages are suspect: their records
            // are rewritten into an empty one, and they are not synced
            // again, only let go of (their cache dropped off the core).
            let r = self.empty_segment();
            let abandoned = std::mem::take(&mut self.st.borrow_mut().closed);
            abandoned.into_iter().for_each(|c| self.trim.retire(c.ring));
            r
        } else {
            Ok(())
        };
        if result.is_ok() {
            result = self.write(&bytes);
        }
        // Segments closed since the last good sync hold records this retry
        // is about to count as synced: they are synced first (a fresh
        // retry dropped them above, having rewritten their records).
        let closed = self.st.borrow().closed.clone();
        if result.is_ok() && self.mode != Fsync::No {
            let ring = self.st.borrow().seg.ring.clone();
            for f in closed.iter().map(|c| &c.ring).chain(std::iter::once(&ring)) {
                result = f.sync_data().await;
                if result.is_err() {
                    break;
                }
            }
            if result.is_ok() {
                // A rotation during the syncs appends after these.
                let mut st = self.st.borrow_mut();
                let n = closed.len().min(st.closed.len());
                st.closed.drain(..n).for_each(|c| self.trim.retire(c.ring));
            }
        }
        {
            let mut st = self.st.borrow_mut();
            if matches!(st.retry, Retry::Running) {
                st.retry = Retry::None;
            }
        }
        match result {
            Ok(()) => {
                let since = {
                    let mut st = self.st.borrow_mut();
                    st.retry_copy = false;
                    st.written = st.written.max(end);
                    st.synced = st.synced.max(end);
                    if self.mode != Fsync::No {
                        // Everything up to `end` is synced now: every kept
                        // pass, since appends waited for the retry.
                        let State { unsynced, pool, .. } = &mut *st;
                        let n = unsynced.len();
                        unsynced.synced(n, pool);
                    }
                    self.publish(&mut st);
                    st.failing.take()
                };
                self.stats().log_bytes.add(bytes.len() as u64);
                self.stats().log_writes.add(1);
                if let Some((since, _)) = since {
                    router.refuse_writes(false);
                    self.publish_failing(false);
                    self.stats().log_failing.set(0);
                    log::info!(
                        "core {}: the log is writable again after {} s; writes accepted",
                        self.core,
                        since.elapsed().as_secs()
                    );
                }
                self.release(router);
                // Whatever was journaled meanwhile (changes applied before the
                // failure was seen) follows.
                self.append(router);
            }
            Err(e) => {
                let fresh = fresh || self.mode != Fsync::No || e.raw_os_error() == Some(libc::EFBIG);
                // A fresh segment abandons the current one, unsynced records
                // and all: those go again too, ahead of the failed bytes.
                let bytes = if fresh {
                    let mut all = self.st.borrow_mut().unsynced.take_all();
                    all.extend_from_slice(&bytes);
                    all
                } else {
                    bytes
                };
                self.fail(router, e, bytes, end, fresh);
            }
        }
    }

    /// An empty segment for a retry to write into: the current one,
    /// emptied, if it holds only a failed retry's copies, else a new one.
    /// A new segment per retry had a failing disk gain one a second per
    /// core, each with a partial copy taking the room the next retry needs
    /// (and each a directory sync on the core); an emptied one drops its
    /// cached pages with its bytes, as suspect as a failed sync left them.
    fn empty_segment(&self) -> std::io::Result<()> {
        if self.st.borrow().retry_copy {
            let mut st = self.st.borrow_mut();
            if st.seg.file.set_len(0).is_ok() {
                st.offset = 0;
                st.trimmed = 0;
                st.mark = None;
                st.marked_to = 0;
                return Ok(());
            }
            // It cannot be emptied: a new one, as if it were not reusable.
        }
        self.rotate(false)?;
        self.st.borrow_mut().retry_copy = true;
        Ok(())
    }

    /// Shutdown: writes and syncs everything journaled (every mode).
    pub async fn flush(&self, router: &impl Host) -> std::io::Result<()> {
        self.append(router);
        if let Some((_, kind)) = self.st.borrow().failing {
            return Err(std::io::Error::from(kind));
        }
        // Cloned, not taken: the sync task must still see these segments, or
        // it could count later records synced before they are.
        let (closed, ring) = {
            let st = self.st.borrow();
            (st.closed.clone(), st.seg.ring.clone())
        };
        for c in closed {
            c.ring.sync_data().await?;
        }
        ring.sync_data().await
    }

    /// Starts the sync task.
    pub fn spawn<H: Host + 'static>(self: &Rc<Self>, router: &Rc<H>) {
        monoio::spawn(self.clone().run(router.clone()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored() -> Reply {
        Reply::Wrote(WriteOutcome::Stored { created: true, expires_ms: 0, version: 1 })
    }

    fn now(s: Settled) -> Option<Reply> {
        match s {
            Settled::Now(r) => Some(r),
            Settled::Wait(_) => None,
        }
    }

    #[test]
    fn acknowledged_answers_go_out_and_others_wait() {
        assert_eq!(now(judge(10, stored(), 10, 0, false)), Some(stored()));
        assert_eq!(now(judge(11, stored(), 10, 0, false)), None);
        assert_eq!(now(judge(11, Reply::Got(None), 10, 0, false)), None);
    }

    #[test]
    fn a_change_whose_record_failed_is_a_503() {
        assert_eq!(now(judge(11, stored(), 10, 20, true)), Some(Reply::Unavailable));
        let deleted = Reply::Wrote(WriteOutcome::Deleted { version: 2 });
        assert_eq!(now(judge(11, deleted, 10, 20, true)), Some(Reply::Unavailable));
    }

    #[test]
    fn a_change_not_yet_written_when_a_sync_failed_is_a_503_too() {
        // The sync failed for bytes up to 10 (`failed_to`); this change was
        // journaled at 15 and waited for the core's next log write.
        assert_eq!(now(judge(15, stored(), 5, 10, true)), Some(Reply::Unavailable));
    }

    #[test]
    fn reads_and_unchanged_writes_go_on_while_failing() {
        assert_eq!(now(judge(15, Reply::Got(None), 5, 10, true)), Some(Reply::Got(None)));
        let not_found = || Reply::Wrote(WriteOutcome::NotFound);
        assert_eq!(now(judge(15, not_found(), 5, 10, true)), Some(not_found()));
    }

    #[test]
    fn everysec_answers_wait_for_syncs_only_past_the_cap_and_never_go_back() {
        // written 100, synced 40.
        let past = |unsynced| behind(unsynced, None);
        assert_eq!(ackable(Fsync::Always, 0, 100, 40, past(60)), 40);
        assert_eq!(ackable(Fsync::No, 0, 100, 100, past(0)), 100);
        assert_eq!(ackable(Fsync::EverySec, 0, 100, 40, past(UNSYNCED_CAP)), 100, "at the cap: the page cache");
        assert_eq!(ackable(Fsync::EverySec, 0, 100, 40, past(UNSYNCED_CAP + 1)), 40, "past it: the syncs");
        assert_eq!(ackable(Fsync::EverySec, 70, 100, 40, past(UNSYNCED_CAP + 1)), 70, "what went out stays out");
        assert_eq!(ackable(Fsync::EverySec, 70, 120, 90, past(UNSYNCED_CAP + 1)), 90, "each sync lets more out");
        assert_eq!(ackable(Fsync::EverySec, 90, 130, 120, past(10)), 130, "caught up: the page cache again");
    }

    #[test]
    fn a_late_sync_puts_the_disk_behind_however_little_waits() {
        assert!(!behind(10, None));
        assert!(!behind(10, Some(SYNC_LATE - Duration::from_millis(1))));
        assert!(behind(10, Some(SYNC_LATE)));
        assert!(behind(UNSYNCED_CAP + 1, Some(Duration::ZERO)));
        // Then everysec answers wait for syncs.
        assert_eq!(ackable(Fsync::EverySec, 0, 100, 40, behind(10, Some(SYNC_LATE))), 40);
    }

    #[test]
    fn the_pool_hands_back_a_kept_buffer_with_room_and_drops_one_without() {
        let mut pool = Pool::default();
        let mut b = Vec::with_capacity(4096);
        b.extend_from_slice(b"journal");
        let at = b.as_ptr();
        pool.give(b);
        assert_eq!(pool.room, 4096);
        let again = pool.take(1000);
        assert_eq!(again.as_ptr(), at, "the kept buffer itself");
        assert!(again.is_empty(), "emptied when kept");
        assert_eq!(pool.room, 0);
        pool.give(again);
        let newest = Vec::with_capacity(2048);
        let newest_at = newest.as_ptr();
        pool.give(newest);
        let taken = pool.take(1000);
        assert_eq!(taken.as_ptr(), newest_at, "the newest kept first");
        let bigger = pool.take(8192);
        assert!(bigger.capacity() >= 8192);
        assert_ne!(bigger.as_ptr(), at, "too small: a fresh one");
        assert_eq!((pool.room, pool.buffers.len()), (0, 0), "and the small one is not kept");
    }

    #[test]
    fn the_pool_is_bounded_and_keeps_no_empty_or_burst_buffer() {
        let mut pool = Pool::default();
        pool.give(Vec::new());
        pool.give(Vec::with_capacity(SPARE_MAX + 1));
        assert_eq!(pool.buffers.len(), 0);
        let each = SPARE_MAX;
        for _ in 0..POOL_MAX / each + 3 {
            pool.give(Vec::with_capacity(each));
        }
        assert!(pool.room <= POOL_MAX, "{}", pool.room);
        assert_eq!(pool.buffers.len(), POOL_MAX / each);
        assert_eq!(pool.room, pool.buffers.iter().map(Vec::capacity).sum::<usize>());
        pool.clear();
        assert_eq!((pool.room, pool.buffers.len(), pool.buffers.capacity()), (0, 0, 0));
    }

    #[test]
    fn after_a_sync_the_pool_keeps_the_newest_buffers_up_to_what_it_freed() {
        let mut pool = Pool::default();
        let old: Vec<*const u8> = (0..4)
            .map(|_| {
                let b = Vec::<u8>::with_capacity(1000);
                let at = b.as_ptr();
                pool.give(b);
                at
            })
            .collect();
        let newest = Vec::<u8>::with_capacity(3000);
        let at = newest.as_ptr();
        pool.give(newest);
        pool.keep_at_most(4000);
        assert_eq!(pool.room, 4000);
        assert_eq!(pool.buffers.len(), 2);
        assert_eq!(pool.buffers[1].as_ptr(), at, "the newest stays");
        assert_eq!(pool.buffers[0].as_ptr(), old[3]);
        pool.keep_at_most(10_000);
        assert_eq!(pool.room, 4000, "nothing to drop");
        pool.keep_at_most(0);
        assert_eq!((pool.room, pool.buffers.len()), (0, 0));
    }

    #[test]
    fn a_sync_frees_only_the_passes_it_covered_and_the_pool_keeps_what_they_freed() {
        let mut unsynced = Unsynced::default();
        let mut pool = Pool::default();
        for len in [100, 200, 300] {
            let mut b = Vec::with_capacity(1024);
            b.resize(len, 7);
            unsynced.push(b);
        }
        assert_eq!((unsynced.len(), unsynced.bytes), (3, 600));
        // Kept from an earlier burst: more than this sync frees.
        for _ in 0..4 {
            pool.give(Vec::with_capacity(4096));
        }
        // A sync that began when two passes were kept; the third came after.
        unsynced.synced(2, &mut pool);
        assert_eq!((unsynced.len(), unsynced.bytes), (1, 300), "the later pass stays, with its bytes");
        assert_eq!(unsynced.passes[0].len(), 300);
        assert_eq!(pool.room, 2048, "at most what the sync freed");
        assert!(pool.buffers.iter().all(|b| b.capacity() == 1024 && b.is_empty()), "the freed ones, emptied");
        assert_eq!(unsynced.take_all(), vec![7; 300]);
        assert_eq!((unsynced.len(), unsynced.bytes), (0, 0));
        unsynced.synced(5, &mut pool);
        assert_eq!(pool.room, 0, "a sync that freed nothing keeps nothing");
    }
}
