//! Rendezvous: a public, registration-free HTTP key-value rendezvous server.
//!
//! The tree follows the data path. `runtime` owns every thread, socket and
//! file: `server` starts one monoio executor per core (`core`), whose
//! `conn` tasks read requests; `request` turns bytes into actions without
//! I/O (`http` framing, the `route` table, `api` decoding, `clientip`);
//! `runtime::router` carries each action to the core owning its key, where
//! `state` applies it (`command` -> `shard`, `ratelimit`, `waiters`); the
//! reply travels back and `request::http` encodes it. `persist` is the
//! write-ahead log, snapshots and recovery; `metrics` the per-core counters
//! and their exporter on the admin address. `config` is the command line.
//!
//! Layering: `request` and `state` are pure (no I/O, no clock, no
//! threads; clippy refuses `unwrap`/`expect`/`panic` there outside tests);
//! `persist` formats are pure and its file work runs off the request path;
//! only `runtime` and `metrics::exporter` touch the OS. Nothing below
//! `runtime` imports it. The binary (`main.rs`) parses the command line,
//! sets up logging and reports startup failures.

pub mod clock;
pub mod config;
pub mod duration;
pub mod logging;
pub mod metrics;
pub mod persist;
pub mod request;
pub mod runtime;
pub mod state;

/// This build's version (Cargo.toml).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The git revision this build was made from (`unknown` outside a checkout).
pub const GIT_REVISION: &str = env!("RENDEZVOUS_GIT_REVISION");
