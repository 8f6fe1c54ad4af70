//! What each core owns, as plain synchronous state machines: the shard of
//! the store, the rate-limit buckets of the clients routed to it, the
//! waiters parked on its keys, and the commands that act on them.
//!
//! No I/O, no clock reads, no logging, no locks: time comes in as an
//! argument and results go out as values, so all of it is unit-tested
//! without a runtime. Stored data and client input reach this code, so
//! `unwrap`, `expect` and `panic!` are refused by clippy outside tests.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::unreachable))]

pub mod budget;
pub mod command;
pub mod entry;
pub mod net;
pub mod ratelimit;
pub mod record;
pub mod secret;
pub mod shard;
pub mod waiters;
