//! What travels to a key's owning core, what comes back, and how the owner
//! applies it to the state only it touches (its shard and its rate-limit
//! buckets).
//!
//! A command may carry a rate-limit charge, a store operation, or both (when
//! the client's bucket and the key live on the same core the two ride in one
//! message). The charge is always applied first and a refusal stops the
//! operation, so a refused request consumes nothing. `apply` is synchronous
//! and does no I/O: the router calls it inline for local keys and from the
//! inbox task for remote ones.

use crate::ratelimit::{Limiter, Refused};
use crate::shard::{Found, KeyBudget, Shard, Write, WriteOutcome};

/// A store operation on one key.
#[derive(Debug)]
pub enum Op {
    Get { key: Box<[u8]> },
    Write(Write),
}

impl Op {
    pub fn key(&self) -> &[u8] {
        match self {
            Op::Get { key } => key,
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
}

impl Owned {
    pub fn apply(&mut self, cmd: Cmd, now: Now, budget: &KeyBudget) -> Reply {
        if let Some(c) = cmd.charge {
            if let Err(refused) = self.limiter.charge(c.bucket, c.cost, now.epoch) {
                return Reply::Limited(refused);
            }
        }
        match cmd.op {
            None => Reply::Charged,
            Some(Op::Get { key }) => Reply::Got(self.shard.get(&key, now.unix_ms, budget)),
            Some(Op::Write(w)) => Reply::Wrote(self.shard.write(w, now.unix_ms, budget)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::shard::Condition;

    #[test]
    fn refused_charge_skips_the_operation() {
        let budget = KeyBudget::new(10);
        let mut o = Owned {
            shard: Shard::with_capacity(4),
            limiter: Limiter::new(3, 10),
        };
        let now = Now {
            unix_ms: 1000,
            epoch: 0,
        };
        let write = |v: &[u8]| Op::Write(Write::new(b"k", v, None, 5000, Condition::Set));
        let charge = Some(Charge { bucket: 1, cost: 3 });
        let r = o.apply(
            Cmd {
                charge,
                op: Some(write(b"1")),
            },
            now,
            &budget,
        );
        assert_eq!(
            r,
            Reply::Wrote(WriteOutcome::Stored {
                created: true,
                expires_ms: 5000
            })
        );
        let r = o.apply(
            Cmd {
                charge,
                op: Some(write(b"2")),
            },
            now,
            &budget,
        );
        assert_eq!(r, Reply::Limited(Refused::Exhausted));
        let r = o.apply(
            Cmd {
                charge: None,
                op: Some(Op::Get {
                    key: (*b"k").into(),
                }),
            },
            now,
            &budget,
        );
        assert_eq!(
            r,
            Reply::Got(Some(Found {
                value: (*b"1").into(),
                expires_ms: 5000
            }))
        );
        let r = o.apply(
            Cmd {
                charge: Some(Charge { bucket: 2, cost: 1 }),
                op: None,
            },
            now,
            &budget,
        );
        assert_eq!(r, Reply::Charged);
    }
}
