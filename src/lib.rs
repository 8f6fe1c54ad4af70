//! Rendezvous: a public, registration-free HTTP key-value rendezvous server.
//!
//! The data path, in module order: `server` (one SO_REUSEPORT listener and
//! monoio executor per core) -> `conn` (keep-alive loop, deadlines, limits)
//! -> `http` (head parse, bounded body, response encoding) -> `api` (route,
//! key/ttl/secret/client-IP decoding) -> `router` (owner core of the key and
//! of the client's rate-limit bucket; cross-core messages) -> `command`
//! (what the owner applies) -> `shard` / `ratelimit` (pure state machines).
//! The binary (`main.rs`) only parses the command line, sets up logging, and
//! reports startup failures; everything else lives in this library so that
//! benchmarks can drive the pure logic directly.

pub mod api;
pub mod clientip;
pub mod command;
pub mod config;
pub mod conn;
pub mod connlimit;
pub mod docs;
pub mod duration;
pub mod error;
pub mod http;
pub mod lifecycle;
pub mod metrics;
pub mod ratelimit;
pub mod router;
pub mod secret;
pub mod server;
pub mod shard;
pub mod snapshot;
