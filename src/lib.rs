//! Rendezvous: a public, registration-free HTTP key-value rendezvous server.
//!
//! The tree follows the data path. `runtime` owns every thread, socket and
//! file: `server` starts one monoio executor per core (`core`), whose
//! `conn` tasks read requests; `request` turns bytes into actions without
//! I/O (`http` framing, the `route` table, `api` decoding, `clientip`);
//! `runtime::router` carries each action to the core owning its key, where
//! `state` applies it (`command` -> `shard`, `ratelimit`, `waiters`) and
//! journals the change (`state::record`) for the core's log
//! (`runtime::wal`); the reply travels back and `request::http` encodes it.
//! `persist` is snapshots, the data directory and recovery; `metrics` the
//! per-core counters (`runtime::exporter` serves them). `config` is the
//! command line.
//!
//! Layering, from the bottom: `memory` (where the shards' hash tables get
//! their memory: mapped from the kernel), `state` (pure: no I/O, no clock, no threads;
//! clippy refuses `unwrap`/`expect`/`panic` there outside tests),
//! `request` (pure too, same rules), `metrics` and `config`, `logging`,
//! `persist` (files, off the request path), and `runtime` on top, the only
//! layer that starts threads or touches sockets. Each layer imports only those below
//! it; no two modules import each other. The binary (`main.rs`) parses the command line,
//! sets up logging and reports startup failures.

pub mod clock;
pub mod config;
pub mod duration;
pub mod logging;
pub mod memory;
pub mod metrics;
pub mod persist;
pub mod request;
pub mod runtime;
pub mod state;

/// This build's version (Cargo.toml).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The git revision this build was made from (`unknown` outside a checkout).
pub const GIT_REVISION: &str = env!("RENDEZVOUS_GIT_REVISION");
