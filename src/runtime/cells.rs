//! Each core's owned state (its shard and parked waiters) behind a lock, and
//! the one thing other cores may do with it: read a key without a message.
//!
//! The owner applies every change, logs it and wakes its waiters; it holds
//! its own lock only for the length of one synchronous step (an `apply`, a
//! sweep slice, a snapshot slice), never across an `.await`, so the lock is
//! almost always free. Another core serving a plain GET for a key it does
//! not own takes the owner's lock with `try_lock` and peeks, instead of
//! sending the read over the mesh and waiting for the owner's answer (the
//! message, the owner's wake-up and the reply's wake-up were most of a
//! remote GET's cost). It never waits for the lock and never changes the
//! shard: if the lock is taken, or if the shard holds a change its log has
//! not yet acknowledged (as durable as `-fsync` promises), the read goes to
//! the owner the usual way, where it waits for the log like any answer. So a
//! direct read shows exactly what an owner-side read would, and never a
//! value less durable than `-fsync` promises. Values longer than
//! `DIRECT_MAX_VALUE` are left to the owner too.
//!
//! This module must never block a core for long: a foreign core only uses
//! `try_lock`, and holds the lock for one hash lookup and a copy of at most
//! `DIRECT_MAX_VALUE` bytes, so the owner's own `lock` waits at most that
//! long (it is uncontended otherwise). A guard must never live across an
//! `.await` (clippy's `await_holding_lock`, denied with the other warnings,
//! checks it): the owner would deadlock on its own lock.
//!
//! While the log is failing, the owner answers reads at once from memory
//! (reads go on; see `wal`), including changes whose writes were answered
//! 503; a direct read then always falls back to the owner, so it is never
//! less durable than an owner-side read.

use crate::state::command::Owned;
use crate::state::shard::Found;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, TryLockError};

/// The longest value a foreign core copies under the owner's lock (about a
/// microsecond of copying); longer ones are read by the owner, so the owner
/// never waits long for its own lock.
const DIRECT_MAX_VALUE: usize = 16 << 10;

/// One core's owned state and how far its log is acknowledged, on cache
/// lines of its own (a core's lock word is not next to its neighbour's).
#[repr(align(128))]
struct Cell {
    owned: Mutex<Owned>,
    /// Journal position up to which the owner's log is acknowledged
    /// (`u64::MAX` without persistence: nothing waits for a log).
    acked: AtomicU64,
}

/// Every core's owned state, indexed by core.
pub struct Cells(Box<[Cell]>);

impl Cells {
    /// `owned[i]` becomes core `i`'s state. With `persist`, reads wait for
    /// each core's log (which publishes its progress with `publish_acked`).
    pub fn new(owned: Vec<Owned>, persist: bool) -> Self {
        let acked = if persist { 0 } else { u64::MAX };
        Cells(owned.into_iter().map(|o| Cell { owned: Mutex::new(o), acked: AtomicU64::new(acked) }).collect())
    }

    pub fn cores(&self) -> usize {
        self.0.len()
    }

    /// The owner's access to its state. Panics cannot leave it half-changed
    /// in a way anyone could observe (the process aborts on panic), so a
    /// poisoned lock is simply taken.
    pub fn lock(&self, core: usize) -> MutexGuard<'_, Owned> {
        self.0[core].owned.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The owner's log has acknowledged everything journaled up to `lsn`.
    pub fn publish_acked(&self, core: usize, lsn: u64) {
        self.0[core].acked.store(lsn, Ordering::Release);
    }

    /// Reads `key` from `core`'s shard if that can be done now without
    /// waiting: `None` means "ask the owner" (its lock is taken, or it holds
    /// a change its log has not acknowledged yet).
    pub fn read(&self, core: usize, key: &[u8], now_ms: u64) -> Option<Option<Found>> {
        let cell = &self.0[core];
        let owned = match cell.owned.try_lock() {
            Ok(owned) => owned,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            Err(TryLockError::WouldBlock) => return None,
        };
        // Under the lock, so every change the shard holds is journaled below
        // `lsn`; `acked` only grows, so a stale load errs towards the owner.
        if owned.shard.journal().lsn() > cell.acked.load(Ordering::Acquire) {
            return None;
        }
        owned.shard.peek(key, now_ms, DIRECT_MAX_VALUE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::command::{Op, Reply};
    use crate::state::shard::{Condition, KeyBudget, Shard, Write, WriteOutcome};

    const NOW: u64 = 1_000;

    fn owned(persist: bool) -> Owned {
        let mut shard = Shard::with_capacity(4);
        if persist {
            *shard.journal_mut() = crate::state::record::Journal::enabled();
        }
        Owned::new(shard)
    }

    fn set(cells: &Cells, core: usize, value: &[u8], expires_ms: u64) -> u64 {
        let budget = KeyBudget::new(10);
        let mut o = cells.lock(core);
        let op = Op::Write(Write::new(b"k", value, None, expires_ms, Condition::Set).unwrap());
        let reply = o.apply(op, NOW, &budget, &mut Vec::new());
        assert!(matches!(reply, Reply::Wrote(WriteOutcome::Stored { .. })), "{reply:?}");
        o.shard.journal().lsn()
    }

    #[test]
    fn without_persistence_a_read_never_waits_for_a_log() {
        let cells = Cells::new(vec![owned(false), owned(false)], false);
        assert_eq!(cells.read(1, b"k", NOW), Some(None));
        set(&cells, 1, b"v", NOW + 10);
        assert_eq!(cells.read(1, b"k", NOW).unwrap().unwrap().value[..], b"v"[..]);
        // Expired: absent, and left in place for the owner to reclaim.
        assert_eq!(cells.read(1, b"k", NOW + 10), Some(None));
        assert_eq!(cells.lock(1).shard.len(), 1);
    }

    #[test]
    fn a_change_the_log_has_not_acknowledged_goes_to_the_owner() {
        let cells = Cells::new(vec![owned(true)], true);
        let lsn = set(&cells, 0, b"v", NOW + 10);
        assert!(lsn > 0);
        assert_eq!(cells.read(0, b"k", NOW), None);
        cells.publish_acked(0, lsn - 1);
        assert_eq!(cells.read(0, b"k", NOW), None);
        cells.publish_acked(0, lsn);
        assert_eq!(cells.read(0, b"k", NOW).unwrap().unwrap().value[..], b"v"[..]);
    }

    #[test]
    fn a_long_value_is_left_to_the_owner() {
        let cells = Cells::new(vec![owned(false)], false);
        set(&cells, 0, &vec![b'x'; DIRECT_MAX_VALUE + 1], NOW + 10);
        assert_eq!(cells.read(0, b"k", NOW), None);
        set(&cells, 0, &vec![b'x'; DIRECT_MAX_VALUE], NOW + 10);
        assert_eq!(cells.read(0, b"k", NOW).unwrap().unwrap().value.len(), DIRECT_MAX_VALUE);
    }

    #[test]
    fn a_taken_lock_is_never_waited_for() {
        let cells = Cells::new(vec![owned(false)], false);
        set(&cells, 0, b"v", NOW + 10);
        let held = cells.lock(0);
        assert_eq!(cells.read(0, b"k", NOW), None);
        drop(held);
        assert!(cells.read(0, b"k", NOW).unwrap().is_some());
    }

    #[test]
    fn a_read_from_another_thread_sees_the_owners_acknowledged_writes() {
        let cells = std::sync::Arc::new(Cells::new(vec![owned(true)], true));
        let lsn = set(&cells, 0, b"v", NOW + 10);
        cells.publish_acked(0, lsn);
        let reader = cells.clone();
        let got = std::thread::spawn(move || reader.read(0, b"k", NOW)).join().unwrap();
        assert_eq!(got.unwrap().unwrap().value[..], b"v"[..]);
    }
}
