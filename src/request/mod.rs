//! The request side, without I/O: HTTP framing, the route table, argument
//! decoding, client-IP detection, errors and the docs page.
//!
//! Everything here is synchronous and deterministic given its inputs: no
//! sockets, no clocks, no threads, no logging. The runtime calls it with
//! bytes and gets back actions and responses. Nothing a client sends may
//! panic here, so `unwrap`, `expect` and `panic!` are refused by clippy
//! outside tests.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used, clippy::panic, clippy::unreachable))]

pub mod api;
pub mod clientip;
pub mod docs;
pub mod error;
pub mod http;
pub mod route;
