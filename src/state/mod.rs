//! The server's state, as plain synchronous state machines: what each core
//! owns alone (the shard of the store, the waiters parked on its keys, the
//! commands that act on them) and the few per-client counts every core
//! shares (`budget`'s quotas and `ratelimit`'s buckets, lock-striped in
//! `striped`, the only locks here).
//!
//! No I/O, no clock reads, no logging: time comes in as an argument and
//! results go out as values, so all of it is unit-tested without a
//! runtime. Stored data and client input reach this code, so
//! `unwrap`, `expect` and `panic!` are refused by clippy outside tests.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::unreachable))]

pub mod budget;
pub mod command;
pub mod entry;
pub mod expiries;
pub mod net;
pub mod prefetch;
pub mod ratelimit;
pub mod record;
pub mod secret;
pub mod shard;
pub mod striped;
pub mod unacked;
pub mod waiters;
