//! `Shared`: what every core and the helper threads see of the server,
//! built once at startup.
//!
//! Read-only after startup except for the parts made for concurrent use:
//! the key budget and quotas and the rate-limit buckets (`state::striped`),
//! the mesh channels, the connection and waiter admission tables, and the
//! per-core statistics (each written by its own core only). Kept in a module of its own so that the modules
//! using it (`core`, `conn`, `lifecycle`, the exporter) and the one
//! building it (`server`) never import each other.

use crate::config::Config;
use crate::metrics::{CoreStats, SnapshotStats};
use crate::persist::datadir::DataDir;
use crate::runtime::cells::Cells;
use crate::runtime::connlimit::ConnLimits;
use crate::runtime::mesh::{Mesh, Routing};
use crate::runtime::turns::Seats;
use crate::state::ratelimit::{Limiter, Periods};
use crate::state::secret::SecretKey;
use crate::state::shard::{KeyBudget, Versions};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

/// Where the server is in its life, for `/readyz`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Phase {
    /// Loading the store; listeners not up yet.
    Starting = 0,
    /// Serving.
    Ready = 1,
    /// Shutting down: no new requests.
    Draining = 2,
}

/// The server's lifecycle phase, readable from any thread.
#[derive(Debug, Default)]
pub struct PhaseCell(AtomicU8);

impl PhaseCell {
    pub fn set(&self, p: Phase) {
        self.0.store(p as u8, Ordering::Release);
    }

    pub fn get(&self) -> Phase {
        match self.0.load(Ordering::Acquire) {
            0 => Phase::Starting,
            1 => Phase::Ready,
            _ => Phase::Draining,
        }
    }
}

/// State every core shares.
pub struct Shared {
    pub config: Config,
    pub routing: Routing,
    pub mesh: Arc<Mesh>,
    /// Each core's shard and waiters (changed under their lock).
    pub cells: Arc<Cells>,
    /// The version clock every shard draws from (checkpoints read it).
    pub versions: Arc<Versions>,
    pub budget: Arc<KeyBudget>,
    /// Every client's and network's rate-limit buckets.
    pub limiter: Arc<Limiter>,
    pub periods: Periods,
    pub secret_key: SecretKey,
    /// The bound address, for the docs page when a request has no Host.
    pub listen_text: String,
    /// One per core, written only by that core.
    pub stats: Vec<CoreStats>,
    /// The CPU each core last ran on (`turns`).
    pub seats: Arc<Seats>,
    pub snapshot_stats: SnapshotStats,
    /// Whether requests are measured (the admin address is on).
    pub metrics_on: bool,
    pub conn_limits: Arc<ConnLimits>,
    /// Parked blocking reads, server-wide and per client IP.
    pub waiter_limits: Arc<ConnLimits>,
    pub phase: PhaseCell,
    /// The next log segment number (segments are numbered across cores).
    pub next_segment: AtomicU64,
    /// The data directory, locked for the process's life (`None`: no persistence).
    pub data_dir: Option<DataDir>,
    /// The listen port's lock, held for the process's life.
    pub port_lock: std::os::unix::net::UnixListener,
}
