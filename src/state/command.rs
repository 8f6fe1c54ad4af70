//! What travels to a key's owning core, what comes back, and how the owner
//! applies it to the state only it touches: its shard, its rate-limit
//! buckets, and the waiters parked on its keys.
//!
//! A command may carry a rate-limit charge, a store operation, or both (when
//! the client's bucket and the key live on the same core the two ride in one
//! message). The charge is always applied first and a refusal stops the
//! operation, so a refused request consumes nothing. A blocking read
//! (`Op::Wait`) is checked and, if it must wait, registered in one step on
//! the owning core, so no write can slip between the check and the
//! registration (no lost wake-up); every write that changes a key wakes all
//! of that key's satisfied waiters in the same pass. `apply` is synchronous
//! and does no I/O: it returns the reply and the wake-ups, and the router
//! delivers them.

use crate::state::ratelimit::{Limiter, Refused};
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

/// Tokens to take from a client's bucket before anything else happens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Charge {
    pub bucket: u64,
    pub cost: u32,
}

/// A unit of work for one core.
#[derive(Debug)]
pub struct Cmd {
    pub charge: Option<Charge>,
    pub op: Option<Op>,
}

/// The owner's answer.
#[derive(Debug, PartialEq, Eq)]
pub enum Reply {
    /// The charge was refused; nothing was done.
    Limited(Refused),
    /// The charge was taken and there was no operation.
    Charged,
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

/// The clock readings `apply` needs, taken once by the caller.
#[derive(Debug, Clone, Copy)]
pub struct Now {
    /// Unix milliseconds, for expiry.
    pub unix_ms: u64,
    /// Rate-limit period index.
    pub epoch: u64,
}

/// The state one core owns.
pub struct Owned {
    pub shard: Shard,
    pub limiter: Limiter,
    pub waiters: Waiters,
}

/// Answers for parked waiters produced by an `apply`.
pub type Wakeups = Vec<(Origin, Reply)>;

impl Owned {
    pub fn new(shard: Shard, limiter: Limiter) -> Self {
        Owned { shard, limiter, waiters: Waiters::default() }
    }

    /// Applies a command. Answers for waiters it woke are pushed to `wakeups`.
    pub fn apply(&mut self, cmd: Cmd, now: Now, budget: &KeyBudget, wakeups: &mut Wakeups) -> Reply {
        if let Some(c) = cmd.charge {
            if let Err(refused) = self.limiter.charge(c.bucket, c.cost, now.epoch) {
                return Reply::Limited(refused);
            }
        }
        match cmd.op {
            None => Reply::Charged,
            Some(Op::Get { key }) => Reply::Got(self.shard.get(&key, now.unix_ms, budget)),
            Some(Op::Write(_)) if self.shard.journal().refusing() => Reply::Unavailable,
            Some(Op::Write(w)) => {
                let watched: Option<Box<[u8]>> = self.waiters.has_key(w.key()).then(|| w.key().into());
                let outcome = self.shard.write(w, now.unix_ms, budget);
                if let (Some(key), true) = (watched, outcome.changed()) {
                    let current = self.shard.get(&key, now.unix_ms, budget);
                    let mut woken = Vec::new();
                    self.waiters.wake(&key, current.as_ref(), &mut woken);
                    wakeups.extend(woken.into_iter().map(|o| (o, Reply::Got(current.clone()))));
                }
                Reply::Wrote(outcome)
            }
            Some(Op::Wait { key, until, origin }) => {
                let current = self.shard.get(&key, now.unix_ms, budget);
                if until.satisfied(current.as_ref()) {
                    return Reply::Got(current);
                }
                if self.waiters.is_closed() {
                    return Reply::ShuttingDown;
                }
                let version = current.as_ref().map_or(0, |f| f.version);
                self.waiters.park(key, until, origin, version);
                Reply::Parked
            }
            Some(Op::CancelWait { origin, .. }) => {
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
        Owned::new(Shard::with_capacity(4), Limiter::new(100, 1000, 10))
    }

    const NOW: Now = Now { unix_ms: 1000, epoch: 0 };

    fn set(o: &mut Owned, b: &KeyBudget, v: &[u8], w: &mut Wakeups) -> Reply {
        let op = Op::Write(Write::new(b"k", v, None, 5000, Condition::Set).unwrap());
        o.apply(Cmd { charge: None, op: Some(op) }, NOW, b, w)
    }

    fn wait(o: &mut Owned, b: &KeyBudget, until: WaitFor, slot: u32) -> Reply {
        let op = Op::Wait { key: (*b"k").into(), until, origin: Origin { core: 1, slot } };
        o.apply(Cmd { charge: None, op: Some(op) }, NOW, b, &mut Vec::new())
    }

    #[test]
    fn refused_charge_skips_the_operation() {
        let budget = KeyBudget::new(10);
        let mut o = Owned::new(Shard::with_capacity(4), Limiter::new(3, 1000, 10));
        let mut w = Vec::new();
        let write = |v: &[u8]| Op::Write(Write::new(b"k", v, None, 5000, Condition::Set).unwrap());
        let charge = Some(Charge { bucket: 1, cost: 3 });
        let r = o.apply(Cmd { charge, op: Some(write(b"1")) }, NOW, &budget, &mut w);
        assert!(matches!(r, Reply::Wrote(WriteOutcome::Stored { created: true, expires_ms: 5000, .. })));
        let r = o.apply(Cmd { charge, op: Some(write(b"2")) }, NOW, &budget, &mut w);
        assert_eq!(r, Reply::Limited(Refused::Exhausted));
        let r = o.apply(Cmd { charge: None, op: Some(Op::Get { key: (*b"k").into() }) }, NOW, &budget, &mut w);
        assert!(matches!(r, Reply::Got(Some(Found { ref value, .. })) if &value[..] == b"1"));
        let r = o.apply(Cmd { charge: Some(Charge { bucket: 2, cost: 1 }), op: None }, NOW, &budget, &mut w);
        assert_eq!(r, Reply::Charged);
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
        o.apply(Cmd { charge: None, op: Some(cancel) }, NOW, &b, &mut w);
        assert_eq!(w.pop(), Some((Origin { core: 1, slot: 9 }, Reply::Cancelled)));
        assert_eq!(o.waiters.parked(), 0);
        // A delete is a change: "differs" waiters see the key gone.
        assert_eq!(wait(&mut o, &b, WaitFor::ValueDiffers((*b"a").into()), 4), Reply::Parked);
        let del = Op::Write(Write::new(b"k", b"", None, 0, Condition::Delete).unwrap());
        o.apply(Cmd { charge: None, op: Some(del) }, NOW, &b, &mut w);
        assert_eq!(w.pop(), Some((Origin { core: 1, slot: 4 }, Reply::Got(None))));
    }
}
