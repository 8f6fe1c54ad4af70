//! Each core's owned state (its shard and parked waiters) behind a lock,
//! how far each core's log is acknowledged, and what other cores may do with
//! a state that is not theirs: read a key, or apply a write, without a
//! message.
//!
//! Every lock hold is one synchronous step (an `apply`, a peek, a sweep or
//! snapshot slice), never across an `.await`, so locks are almost always
//! free. A foreign core only ever uses `try_lock` and never waits: if the
//! lock is taken, the operation goes to the owner over the mesh. The owner
//! takes its own lock with `lock` and waits for the foreign step in
//! progress (std's mutex is not fair, so under heavy direct traffic it may
//! be a few steps; each is one write or peek, never an `.await`).
//!
//! - A write applied by a foreign core is journaled in that core's log, and
//!   its shard remembers it until that log acknowledges it
//!   (`state::unacked`). An answer about a key waits for the log holding the
//!   change that made the key's state, whichever core's log that is.
//! - A plain GET for another core's key peeks under the owner's lock
//!   (values up to `DIRECT_MAX_VALUE`) when nothing it would reveal is still
//!   unacknowledged; otherwise it goes to the owner, which waits for the
//!   logs like any answer. So a direct read shows exactly what an
//!   owner-side read would, never a value less durable than `-fsync`
//!   promises.
//! - A core whose answers wait for another core's log asks to be woken when
//!   that log moves (`watch`); the log's task wakes its watchers after it
//!   publishes (`publish_acked`). The flag is set before the position is
//!   checked again and cleared after the position is published, both
//!   sequentially consistent, so no wake-up is lost.
//!
//! While a log is failing, answers that wait for it go out at once (reads go
//! on; see `wal`), and a direct read never shows what a failing log holds.
//!
//! This module must never block a core for long: a guard must never live
//! across an `.await` (clippy's `await_holding_lock`, denied with the other
//! warnings, checks it), or the owner would deadlock on its own lock.

use crate::state::command::Owned;
use crate::state::shard::{Found, Probe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};

/// The longest value a foreign core copies under the owner's lock (about a
/// microsecond of copying); longer ones are read by the owner, so the owner
/// never waits long for its own lock.
const DIRECT_MAX_VALUE: usize = 16 << 10;

/// One core's owned state and how far its log is acknowledged, on cache
/// lines of its own (a core's lock word is not next to its neighbour's).
#[repr(align(128))]
struct Cell {
    owned: Mutex<Owned>,
    /// Journal position up to which this core's log is acknowledged
    /// (`u64::MAX` without persistence: nothing waits for a log).
    acked: AtomicU64,
    /// This core's log is failing: nothing waits for it.
    failing: AtomicBool,
    /// `watchers[c]`: core `c` holds answers waiting for this log.
    watchers: Box<[AtomicBool]>,
}

/// Every core's owned state, indexed by core.
pub struct Cells {
    cells: Box<[Cell]>,
    /// Each shard's `Probe`: read-only once built, and apart from the lock
    /// words the owners write.
    probes: Box<[Arc<Probe>]>,
}

impl Cells {
    /// `owned[i]` becomes core `i`'s state. With `persist`, answers wait for
    /// each core's log (which publishes its progress with `publish_acked`).
    pub fn new(owned: Vec<Owned>, persist: bool) -> Self {
        let acked = if persist { 0 } else { u64::MAX };
        let n = owned.len();
        let probes = owned.iter().map(|o| o.shard.probe()).collect();
        let cells = owned
            .into_iter()
            .map(|o| Cell {
                owned: Mutex::new(o),
                acked: AtomicU64::new(acked),
                failing: AtomicBool::new(false),
                watchers: (0..n).map(|_| AtomicBool::new(false)).collect(),
            })
            .collect();
        Cells { cells, probes }
    }

    pub fn cores(&self) -> usize {
        self.cells.len()
    }

    /// Starts fetching what a lookup of `key` in `core`'s shard reads first,
    /// without its lock (a hint: see `state::prefetch`).
    pub fn prefetch(&self, core: usize, key: &[u8]) {
        if let Some(p) = self.probes.get(core) {
            p.prefetch(key);
        }
    }

    /// The owner's access to its state. Panics cannot leave it half-changed
    /// in a way anyone could observe (the process aborts on panic), so a
    /// poisoned lock is simply taken.
    pub fn lock(&self, core: usize) -> MutexGuard<'_, Owned> {
        self.cells[core].owned.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Another core's access: `None` if the lock is taken (never waits).
    pub fn try_lock(&self, core: usize) -> Option<MutexGuard<'_, Owned>> {
        match self.cells[core].owned.try_lock() {
            Ok(owned) => Some(owned),
            Err(TryLockError::Poisoned(p)) => Some(p.into_inner()),
            Err(TryLockError::WouldBlock) => None,
        }
    }

    /// How far `core`'s log is acknowledged (whether or not it is failing).
    pub fn acked(&self, core: usize) -> u64 {
        self.cells[core].acked.load(Ordering::SeqCst)
    }

    /// Whether answers waiting for `deps` may go: each log has acknowledged
    /// its position, or is failing (answers then go out at once, as `wal`
    /// does for its own; reads go on while a log fails).
    pub fn settled(&self, deps: &[(usize, u64)]) -> bool {
        deps.iter().all(|&(log, lsn)| self.cells[log].failing.load(Ordering::SeqCst) || self.acked(log) >= lsn)
    }

    /// Core `me` holds answers waiting for `log`: wake it when `log` moves.
    pub fn watch(&self, log: usize, me: usize) {
        if let Some(w) = self.cells[log].watchers.get(me) {
            w.store(true, Ordering::SeqCst);
        }
    }

    /// The owner's log has acknowledged everything journaled up to `lsn`;
    /// `wake` is called for every core that was watching it.
    pub fn publish_acked(&self, core: usize, lsn: u64, wake: impl FnMut(usize)) {
        self.cells[core].acked.store(lsn, Ordering::SeqCst);
        self.wake_watchers(core, wake);
    }

    /// `core`'s log started (or stopped) failing; watchers are woken.
    pub fn publish_failing(&self, core: usize, failing: bool, wake: impl FnMut(usize)) {
        self.cells[core].failing.store(failing, Ordering::SeqCst);
        self.wake_watchers(core, wake);
    }

    fn wake_watchers(&self, core: usize, mut wake: impl FnMut(usize)) {
        for (c, w) in self.cells[core].watchers.iter().enumerate() {
            // SeqCst, ordered after the position's store: a watcher either
            // set its flag before this load, or loads the new position after.
            if w.load(Ordering::SeqCst) && w.swap(false, Ordering::SeqCst) {
                wake(c);
            }
        }
    }

    /// Reads `key` from `core`'s shard if that can be done now without
    /// waiting: `None` means "ask the owner" (its lock is taken, or a change
    /// the answer would reveal is not acknowledged yet, or its log is failing).
    pub fn read(&self, core: usize, key: &[u8], now_ms: u64) -> Option<Option<Found>> {
        // Real positions: a failing log's changes count as unacknowledged,
        // so a direct read never shows what a failing log holds.
        self.try_lock(core)?.read_acked(key, now_ms, DIRECT_MAX_VALUE, &|log| self.acked(log))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::command::{Applier, Op, Reply};
    use crate::state::record::Journal;
    use crate::state::shard::{Condition, KeyBudget, Shard, Write, WriteOutcome};

    const NOW: u64 = 1_000;

    fn cells(n: usize, persist: bool) -> Cells {
        Cells::new((0..n).map(|_| Owned::new(Shard::with_capacity(4))).collect(), persist)
    }

    fn journal(persist: bool) -> Journal {
        if persist {
            Journal::enabled()
        } else {
            Journal::default()
        }
    }

    /// Core `by` stores `key` in `core`'s shard; returns `by`'s log position.
    fn set_by(
        cells: &Cells,
        core: usize,
        by: usize,
        j: &mut Journal,
        key: &[u8],
        value: &[u8],
        expires_ms: u64,
    ) -> u64 {
        let budget = KeyBudget::new(10);
        let mut o = cells.lock(core);
        let op = Op::Write(Write::new(key, value, None, expires_ms, Condition::Set).unwrap());
        let acked = |log| cells.acked(log);
        let mut a = Applier { core: by, journal: j, now_ms: NOW, budget: &budget, acked: &acked };
        let applied = o.apply(op, &mut a, &mut Vec::new());
        assert!(matches!(applied.reply, Reply::Wrote(WriteOutcome::Stored { .. })), "{applied:?}");
        j.lsn()
    }

    fn set(cells: &Cells, core: usize, j: &mut Journal, value: &[u8], expires_ms: u64) -> u64 {
        set_by(cells, core, core, j, b"k", value, expires_ms)
    }

    #[test]
    fn without_persistence_a_read_never_waits_for_a_log() {
        let cells = cells(2, false);
        let mut j = journal(false);
        assert_eq!(cells.read(1, b"k", NOW), Some(None));
        set(&cells, 1, &mut j, b"v", NOW + 10);
        assert_eq!(cells.read(1, b"k", NOW).unwrap().unwrap().value[..], b"v"[..]);
        // Expired: absent, and left in place for the owner to reclaim.
        assert_eq!(cells.read(1, b"k", NOW + 10), Some(None));
        assert_eq!(cells.lock(1).shard.len(), 1);
    }

    #[test]
    fn a_change_the_log_has_not_acknowledged_goes_to_the_owner() {
        let cells = cells(1, true);
        let mut j = journal(true);
        let lsn = set(&cells, 0, &mut j, b"v", NOW + 10);
        assert!(lsn > 0);
        assert_eq!(cells.read(0, b"k", NOW), None);
        cells.publish_acked(0, lsn - 1, |_| {});
        assert_eq!(cells.read(0, b"k", NOW), None);
        cells.publish_acked(0, lsn, |_| {});
        assert_eq!(cells.read(0, b"k", NOW).unwrap().unwrap().value[..], b"v"[..]);
    }

    #[test]
    fn only_the_change_a_read_would_reveal_holds_it_back() {
        let cells = cells(2, true);
        let (mut j0, mut j1) = (journal(true), journal(true));
        let a = set_by(&cells, 0, 0, &mut j0, b"a", b"1", NOW + 10);
        cells.publish_acked(0, a, |_| {});
        // Core 1 writes key b into core 0's shard, in core 1's log.
        let b = set_by(&cells, 0, 1, &mut j1, b"b", b"2", NOW + 10);
        assert_eq!(cells.read(0, b"a", NOW).unwrap().unwrap().value[..], b"1"[..]);
        assert_eq!(cells.read(0, b"b", NOW), None);
        // An absent key reveals no put: readable.
        assert_eq!(cells.read(0, b"zz", NOW), Some(None));
        // Core 0's log moving does not help: b is in core 1's.
        cells.publish_acked(0, u64::MAX - 1, |_| {});
        assert_eq!(cells.read(0, b"b", NOW), None);
        cells.publish_acked(1, b, |_| {});
        assert_eq!(cells.read(0, b"b", NOW).unwrap().unwrap().value[..], b"2"[..]);
    }

    #[test]
    fn a_failing_log_releases_waits_but_never_direct_reads() {
        let cells = cells(2, true);
        let mut j1 = journal(true);
        let lsn = set_by(&cells, 0, 1, &mut j1, b"k", b"v", NOW + 10);
        assert!(!cells.settled(&[(1, lsn)]));
        cells.publish_failing(1, true, |_| {});
        assert!(cells.settled(&[(1, lsn)]));
        assert_eq!(cells.read(0, b"k", NOW), None);
        // A failing log's change is not forgotten as if durable: once the
        // log works again, it is waited for until acknowledged.
        cells.publish_failing(1, false, |_| {});
        assert!(!cells.settled(&[(1, lsn)]));
        assert_eq!(cells.read(0, b"k", NOW), None);
        cells.publish_acked(1, lsn, |_| {});
        assert!(cells.read(0, b"k", NOW).unwrap().is_some());
    }

    #[test]
    fn watchers_are_woken_once_per_watch() {
        let cells = cells(3, true);
        let mut woken = Vec::new();
        cells.publish_acked(0, 5, |c| woken.push(c));
        assert!(woken.is_empty());
        cells.watch(0, 2);
        cells.watch(0, 1);
        cells.publish_acked(0, 6, |c| woken.push(c));
        assert_eq!(woken, vec![1, 2]);
        cells.publish_acked(0, 7, |c| woken.push(c));
        assert_eq!(woken, vec![1, 2]);
        cells.watch(0, 1);
        cells.publish_failing(0, true, |c| woken.push(c));
        assert_eq!(woken, vec![1, 2, 1]);
    }

    #[test]
    fn a_long_value_is_left_to_the_owner() {
        let cells = cells(1, false);
        let mut j = journal(false);
        set(&cells, 0, &mut j, &vec![b'x'; DIRECT_MAX_VALUE + 1], NOW + 10);
        assert_eq!(cells.read(0, b"k", NOW), None);
        set(&cells, 0, &mut j, &vec![b'x'; DIRECT_MAX_VALUE], NOW + 10);
        assert_eq!(cells.read(0, b"k", NOW).unwrap().unwrap().value.len(), DIRECT_MAX_VALUE);
    }

    #[test]
    fn a_taken_lock_is_never_waited_for() {
        let cells = cells(1, false);
        let mut j = journal(false);
        set(&cells, 0, &mut j, b"v", NOW + 10);
        let held = cells.lock(0);
        assert_eq!(cells.read(0, b"k", NOW), None);
        assert!(cells.try_lock(0).is_none());
        drop(held);
        assert!(cells.read(0, b"k", NOW).unwrap().is_some());
    }

    #[test]
    fn a_read_from_another_thread_sees_the_owners_acknowledged_writes() {
        let cells = std::sync::Arc::new(cells(1, true));
        let mut j = journal(true);
        let lsn = set(&cells, 0, &mut j, b"v", NOW + 10);
        cells.publish_acked(0, lsn, |_| {});
        let reader = cells.clone();
        let got = std::thread::spawn(move || reader.read(0, b"k", NOW)).join().unwrap();
        assert_eq!(got.unwrap().unwrap().value[..], b"v"[..]);
    }
}
