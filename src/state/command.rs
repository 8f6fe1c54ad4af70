//! What travels to a key's owning core, what comes back, and how an
//! operation is applied to a core's state: its shard, the waiters parked on
//! its keys, and which of its changes the logs have not acknowledged yet.
//!
//! Reads, blocking reads and cancellations are applied by the owner (or a
//! read by another core without changing anything, see `runtime::cells`).
//! A write may be applied by whichever core received it, under the shard's
//! lock: its record goes into that core's journal (`Applier`), and the
//! answer says which other logs it must wait for (`Applied::deps`).
//!
//! The rate-limit charge is taken before an operation is sent (the buckets
//! are shared, see `ratelimit`), so a refused request never gets here and
//! consumes nothing. A blocking read
//! (`Op::Wait`) is checked and, if it must wait, registered in one step on
//! the owning core, so no write can slip between the check and the
//! registration (no lost wake-up); every write that changes a key wakes all
//! of that key's satisfied waiters in the same pass. `apply` is synchronous
//! and does no I/O: it returns the reply and the wake-ups, and the router
//! delivers them.

use crate::state::ratelimit::Refused;
use crate::state::record::Journal;
use crate::state::shard::{Found, KeyBudget, Shard, Write, WriteOutcome};
use crate::state::unacked::{Dependencies, Unacked};
pub use crate::state::waiters::Origin;
use crate::state::waiters::{WaitFor, Waiters};

/// A store operation on one key.
#[derive(Debug)]
pub enum Op {
    Get {
        key: Box<[u8]>,
    },
    Write(Write),
    /// Answer now if `until` holds, else park until a write makes it hold.
    Wait {
        key: Box<[u8]>,
        until: WaitFor,
        origin: Origin,
    },
    /// Drop a parked waiter (its client timed out or left); answers it
    /// `Cancelled` so its completion slot is freed.
    CancelWait {
        key: Box<[u8]>,
        origin: Origin,
    },
}

impl Op {
    pub fn key(&self) -> &[u8] {
        match self {
            Op::Get { key } | Op::Wait { key, .. } | Op::CancelWait { key, .. } => key,
            Op::Write(w) => w.key(),
        }
    }
}

/// The owner's answer.
#[derive(Debug, PartialEq, Eq)]
pub enum Reply {
    /// The rate-limit charge was refused; nothing was done.
    Limited(Refused),
    Got(Option<Found>),
    /// A parked waiter's answer: the key as the write that woke it left
    /// it. Told apart from `Got` so that the waiting core knows its read
    /// did park (a waiter on another core's key gets either, and only this
    /// one counts as a wait: `rendezvous_waits_total`).
    Woken(Option<Found>),
    Wrote(WriteOutcome),
    /// A waiter was registered; its answer comes later, to its origin.
    Parked,
    /// A parked waiter was dropped.
    Cancelled,
    /// A parked waiter was let go because the server is shutting down.
    ShuttingDown,
    /// The runtime lost track of this answer (a bug, logged where it
    /// happened); the client gets a 500 rather than a hang.
    Lost,
    /// The write-ahead log cannot be written: the write was refused before
    /// it changed anything (or, if it was applied just before the log
    /// failed, it is not acknowledged and is retried into the log).
    Unavailable,
}

/// The state one core owns (and others may lock to write or read).
pub struct Owned {
    pub shard: Shard,
    pub waiters: Waiters,
    /// The shard's changes not yet acknowledged, by the log holding them.
    pub unacked: Unacked,
    /// The latest clock reading the shard was acted on at (`note_time`).
    latest_ms: u64,
}

/// Answers for parked waiters produced by an `apply`. Each shows the state
/// the applying core's own change made, so it waits for that core's log only.
pub type Wakeups = Vec<(Origin, Reply)>;

/// The core applying an operation, and what it needs to.
pub struct Applier<'a> {
    /// The applying core: its log records the change.
    pub core: usize,
    pub journal: &'a mut Journal,
    pub now_ms: u64,
    pub budget: &'a KeyBudget,
    /// How far each core's log is acknowledged (`u64::MAX`: wait for
    /// nothing). The real position even while a log is failing: whether to
    /// wait for a failing log is the runtime's call, and its changes must
    /// not be forgotten as if durable.
    pub acked: &'a dyn Fn(usize) -> u64,
}

/// An operation's answer, and the other logs it must wait for (besides the
/// applying core's own, which every answer waits for).
#[derive(Debug, PartialEq, Eq)]
pub struct Applied {
    pub reply: Reply,
    pub deps: Dependencies,
}

impl Owned {
    pub fn new(shard: Shard) -> Self {
        Owned { shard, waiters: Waiters::default(), unacked: Unacked::default(), latest_ms: 0 }
    }

    /// Notes that the shard is acted on at `now_ms` and returns the latest
    /// time it was acted on at: what an absent answer's dependencies are
    /// counted at. Cores read their clocks before taking the lock (a
    /// request when it is complete), and the wall clock may step back: a
    /// key one core removed as expired could be answered absent by another
    /// at an earlier reading, and at that reading the change that made the
    /// key expire would not count yet (`unacked`: it counts from when the
    /// key is gone), so the answer would not wait for its log. The store's
    /// own semantics keep the reading itself, so TTLs do not jump forward
    /// with a clock that stepped back.
    fn note_time(&mut self, now_ms: u64) -> u64 {
        self.latest_ms = self.latest_ms.max(now_ms);
        self.latest_ms
    }

    /// Removes expired entries at `now_ms`, examining at most `slice`
    /// (`Shard::sweep`). Returns how many were removed.
    pub fn sweep(&mut self, now_ms: u64, slice: usize, budget: &KeyBudget) -> usize {
        self.note_time(now_ms);
        self.shard.sweep(now_ms, slice, budget)
    }

    /// Another core's read of `key` without the owner (`Shard::peek`, values
    /// up to `max_value`): `None` if the answer would reveal a change
    /// whose log has not acknowledged it (`acked`) yet.
    pub fn read_acked(
        &mut self,
        key: &[u8],
        now_ms: u64,
        max_value: usize,
        acked: &impl Fn(usize) -> u64,
    ) -> Option<Option<Found>> {
        let latest_ms = self.note_time(now_ms);
        let found = self.shard.peek(key, now_ms, max_value)?;
        let seen = found.as_ref().map(|f| f.version);
        self.unacked.dependencies(seen, latest_ms, None, acked).is_empty().then_some(found)
    }

    /// What an answer about a key seen at `seen` (version; `None`: absent)
    /// must wait for besides `by`'s own log.
    fn deps(&mut self, seen: Option<u64>, by: &Applier<'_>) -> Dependencies {
        self.unacked.dependencies(seen, self.latest_ms, Some(by.core), &|log| (by.acked)(log))
    }

    /// Applies an operation. Answers for waiters it woke are pushed to `wakeups`.
    pub fn apply(&mut self, op: Op, by: &mut Applier<'_>, wakeups: &mut Wakeups) -> Applied {
        self.note_time(by.now_ms);
        let (now_ms, budget) = (by.now_ms, by.budget);
        let (reply, seen) = match op {
            Op::Get { key } => {
                let found = self.shard.get(&key, now_ms, budget);
                let seen = found.as_ref().map(|f| f.version);
                (Reply::Got(found), seen)
            }
            Op::Write(_) if by.journal.refusing() => return Applied { reply: Reply::Unavailable, deps: Vec::new() },
            Op::Write(w) => {
                // The outcome depends on the key as it was (exists, secret,
                // version, value): the change that made that must be durable.
                let watched: Option<Box<[u8]>> = self.waiters.has_key(w.key()).then(|| w.key().into());
                let before = by.journal.lsn();
                let (outcome, seen) = self.shard.write_seen(w, now_ms, budget, by.journal);
                if by.journal.lsn() != before {
                    match outcome {
                        WriteOutcome::Stored { version, expires_ms, .. } => {
                            self.unacked.record(by.core, version, by.journal.lsn(), expires_ms)
                        }
                        WriteOutcome::Deleted { version } => self.unacked.record(by.core, version, by.journal.lsn(), 0),
                        _ => {}
                    }
                }
                if let (Some(key), true) = (watched, outcome.changed()) {
                    let current = self.shard.get(&key, now_ms, budget);
                    let mut woken = Vec::new();
                    self.waiters.wake(&key, current.as_ref(), &mut woken);
                    wakeups.extend(woken.into_iter().map(|o| (o, Reply::Woken(current.clone()))));
                }
                (Reply::Wrote(outcome), seen)
            }
            Op::Wait { key, until, origin } => {
                let current = self.shard.get(&key, now_ms, budget);
                if until.satisfied(current.as_ref()) {
                    let seen = current.as_ref().map(|f| f.version);
                    (Reply::Got(current), seen)
                } else if self.waiters.is_closed() {
                    return Applied { reply: Reply::ShuttingDown, deps: Vec::new() };
                } else {
                    self.waiters.park(key, until, origin);
                    return Applied { reply: Reply::Parked, deps: Vec::new() };
                }
            }
            Op::CancelWait { origin, .. } => {
                if self.waiters.cancel(origin) {
                    wakeups.push((origin, Reply::Cancelled));
                }
                return Applied { reply: Reply::Cancelled, deps: Vec::new() };
            }
        };
        let deps = self.deps(seen, by);
        Applied { reply, deps }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::shard::Condition;

    fn owned() -> Owned {
        Owned::new(Shard::with_capacity(4))
    }

    const NOW: u64 = 1000;

    /// Applies as core 0 with persistence off (nothing to wait for).
    fn apply(o: &mut Owned, op: Op, b: &KeyBudget, w: &mut Wakeups) -> Reply {
        let mut journal = Journal::default();
        let mut by = Applier { core: 0, journal: &mut journal, now_ms: NOW, budget: b, acked: &|_| u64::MAX };
        let applied = o.apply(op, &mut by, w);
        assert!(applied.deps.is_empty());
        applied.reply
    }

    fn set(o: &mut Owned, b: &KeyBudget, v: &[u8], w: &mut Wakeups) -> Reply {
        let op = Op::Write(Write::new(b"k", v, None, 5000, Condition::Set).unwrap());
        apply(o, op, b, w)
    }

    fn wait(o: &mut Owned, b: &KeyBudget, until: WaitFor, slot: u32) -> Reply {
        let op = Op::Wait { key: (*b"k").into(), until, origin: Origin { core: 1, slot } };
        apply(o, op, b, &mut Vec::new())
    }

    // A key one core removed as expired, answered absent by another whose
    // clock reading (taken before the lock) is earlier: the answer still
    // waits for the log that holds the put (`note_time`).
    #[test]
    fn an_absent_answer_at_an_earlier_reading_waits_for_the_expired_put() {
        let b = KeyBudget::new(10);
        let mut o = owned();
        let mut journal = Journal::enabled();
        let put = Op::Write(Write::new(b"k", b"v", None, 2000, Condition::Set).unwrap());
        let mut by1 = Applier { core: 1, journal: &mut journal, now_ms: NOW, budget: &b, acked: &|_| 0 };
        o.apply(put, &mut by1, &mut Vec::new());
        let lsn = journal.lsn();
        assert_eq!(o.sweep(2500, 10, &b), 1);
        let mut journal = Journal::enabled();
        let mut by0 = Applier { core: 0, journal: &mut journal, now_ms: 1500, budget: &b, acked: &|_| 0 };
        let applied = o.apply(Op::Get { key: (*b"k").into() }, &mut by0, &mut Vec::new());
        assert_eq!(applied.reply, Reply::Got(None));
        assert_eq!(applied.deps, vec![(1, lsn)]);
        // Another core's direct read at that reading asks the owner instead,
        // until the put's log has it.
        assert_eq!(o.read_acked(b"k", 1500, 1 << 14, &|_| 0), None);
        assert_eq!(o.read_acked(b"k", 1500, 1 << 14, &|_| lsn), Some(None));
    }

    #[test]
    fn waiters_wake_on_create_and_on_change() {
        let b = KeyBudget::new(10);
        let mut o = owned();
        let mut w = Vec::new();
        assert_eq!(wait(&mut o, &b, WaitFor::Exists, 1), Reply::Parked);
        assert_eq!(wait(&mut o, &b, WaitFor::Exists, 2), Reply::Parked);
        assert_eq!(o.waiters.parked(), 2);
        // One write wakes every waiter of the key.
        set(&mut o, &b, b"a", &mut w);
        let mut slots: Vec<u32> = w.iter().map(|(o, _)| o.slot).collect();
        slots.sort_unstable();
        assert_eq!(slots, vec![1, 2]);
        assert_eq!(o.waiters.parked(), 0);
        w.clear();
        // "Until it differs from a": the same value again does not wake it.
        assert_eq!(wait(&mut o, &b, WaitFor::ValueDiffers((*b"a").into()), 3), Reply::Parked);
        set(&mut o, &b, b"a", &mut w);
        assert!(w.is_empty());
        set(&mut o, &b, b"b", &mut w);
        assert_eq!(w.len(), 1);
        assert!(matches!(&w[0], (Origin { slot: 3, .. }, Reply::Woken(Some(f))) if &f.value[..] == b"b"));
        assert_eq!((o.waiters.parked(), o.waiters.woken_total()), (0, 3));
    }

    #[test]
    fn satisfied_waits_answer_at_once_and_cancel_frees() {
        let b = KeyBudget::new(10);
        let mut o = owned();
        let mut w = Vec::new();
        set(&mut o, &b, b"a", &mut w);
        assert!(matches!(wait(&mut o, &b, WaitFor::Exists, 1), Reply::Got(Some(_))));
        assert!(matches!(wait(&mut o, &b, WaitFor::ValueDiffers((*b"z").into()), 1), Reply::Got(Some(_))));
        let version = match wait(&mut o, &b, WaitFor::Exists, 1) {
            Reply::Got(Some(f)) => f.version,
            other => panic!("{other:?}"),
        };
        assert_eq!(wait(&mut o, &b, WaitFor::VersionDiffers(vec![version]), 9), Reply::Parked);
        let cancel = Op::CancelWait { key: (*b"k").into(), origin: Origin { core: 1, slot: 9 } };
        apply(&mut o, cancel, &b, &mut w);
        assert_eq!(w.pop(), Some((Origin { core: 1, slot: 9 }, Reply::Cancelled)));
        assert_eq!(o.waiters.parked(), 0);
        // A delete is a change: "differs" waiters see the key gone.
        assert_eq!(wait(&mut o, &b, WaitFor::ValueDiffers((*b"a").into()), 4), Reply::Parked);
        let del = Op::Write(Write::new(b"k", b"", None, 0, Condition::Delete).unwrap());
        apply(&mut o, del, &b, &mut w);
        assert_eq!(w.pop(), Some((Origin { core: 1, slot: 4 }, Reply::Woken(None))));
    }
}
