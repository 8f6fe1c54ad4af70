//! What travels to a key's owning core, what comes back, and how the owner
//! applies it to the state only it touches: its shard and the waiters
//! parked on its keys.
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
use crate::state::shard::{Found, KeyBudget, Shard, Write, WriteOutcome};
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

/// The state one core owns.
pub struct Owned {
    pub shard: Shard,
    pub waiters: Waiters,
}

/// Answers for parked waiters produced by an `apply`.
pub type Wakeups = Vec<(Origin, Reply)>;

impl Owned {
    pub fn new(shard: Shard) -> Self {
        Owned { shard, waiters: Waiters::default() }
    }

    /// Applies an operation at `now_ms` (Unix milliseconds). Answers for
    /// waiters it woke are pushed to `wakeups`.
    pub fn apply(&mut self, op: Op, now_ms: u64, budget: &KeyBudget, wakeups: &mut Wakeups) -> Reply {
        match op {
            Op::Get { key } => Reply::Got(self.shard.get(&key, now_ms, budget)),
            Op::Write(_) if self.shard.journal().refusing() => Reply::Unavailable,
            Op::Write(w) => {
                let watched: Option<Box<[u8]>> = self.waiters.has_key(w.key()).then(|| w.key().into());
                let outcome = self.shard.write(w, now_ms, budget);
                if let (Some(key), true) = (watched, outcome.changed()) {
                    let current = self.shard.get(&key, now_ms, budget);
                    let mut woken = Vec::new();
                    self.waiters.wake(&key, current.as_ref(), &mut woken);
                    wakeups.extend(woken.into_iter().map(|o| (o, Reply::Got(current.clone()))));
                }
                Reply::Wrote(outcome)
            }
            Op::Wait { key, until, origin } => {
                let current = self.shard.get(&key, now_ms, budget);
                if until.satisfied(current.as_ref()) {
                    return Reply::Got(current);
                }
                if self.waiters.is_closed() {
                    return Reply::ShuttingDown;
                }
                self.waiters.park(key, until, origin);
                Reply::Parked
            }
            Op::CancelWait { origin, .. } => {
                if self.waiters.cancel(origin) {
                    wakeups.push((origin, Reply::Cancelled));
                }
                Reply::Cancelled
            }
        }
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

    fn set(o: &mut Owned, b: &KeyBudget, v: &[u8], w: &mut Wakeups) -> Reply {
        let op = Op::Write(Write::new(b"k", v, None, 5000, Condition::Set).unwrap());
        o.apply(op, NOW, b, w)
    }

    fn wait(o: &mut Owned, b: &KeyBudget, until: WaitFor, slot: u32) -> Reply {
        let op = Op::Wait { key: (*b"k").into(), until, origin: Origin { core: 1, slot } };
        o.apply(op, NOW, b, &mut Vec::new())
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
        assert!(matches!(&w[0], (Origin { slot: 3, .. }, Reply::Got(Some(f))) if &f.value[..] == b"b"));
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
        o.apply(cancel, NOW, &b, &mut w);
        assert_eq!(w.pop(), Some((Origin { core: 1, slot: 9 }, Reply::Cancelled)));
        assert_eq!(o.waiters.parked(), 0);
        // A delete is a change: "differs" waiters see the key gone.
        assert_eq!(wait(&mut o, &b, WaitFor::ValueDiffers((*b"a").into()), 4), Reply::Parked);
        let del = Op::Write(Write::new(b"k", b"", None, 0, Condition::Delete).unwrap());
        o.apply(del, NOW, &b, &mut w);
        assert_eq!(w.pop(), Some((Origin { core: 1, slot: 4 }, Reply::Got(None))));
    }
}
