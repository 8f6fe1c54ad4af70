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
use std::time::{Duration, Instant};

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

/// A core whose housekeeping tick (every 100 ms, `core::sweeper`) has not
/// run for this long is stalled: its executor is blocked, and every request
/// for its keys waits with it. No bounded piece of a core's work (a sweep
/// slice, a snapshot slice, a pass of requests) comes near it; the one call
/// a core makes that can block on the disk is the directory sync when its
/// log moves to a new segment, and a sync that takes 5 s is a disk worth
/// reporting.
pub const STALL_AFTER: Duration = Duration::from_secs(5);

/// What `/readyz` answers (and `rendezvous_ready`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readiness {
    Ready,
    Starting,
    Draining,
    /// Serving, but this core's tick is this many ms late.
    Stalled {
        core: usize,
        for_ms: u64,
    },
}

/// The core whose last tick is the oldest, with its age, if that is
/// `STALL_AFTER` or more. Ticks and `now_ms` count from the same instant.
pub fn stalled(now_ms: u64, ticks_ms: impl IntoIterator<Item = u64>) -> Option<(usize, u64)> {
    ticks_ms
        .into_iter()
        .map(|t| now_ms.saturating_sub(t))
        .enumerate()
        .max_by_key(|&(_, age)| age)
        .filter(|&(_, age)| u128::from(age) >= STALL_AFTER.as_millis())
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
    /// Which cores take new connections, and the moves asked of each.
    pub placement: crate::runtime::placement::Placement,
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
    pub data_dir: Option<Arc<DataDir>>,
    /// The listen port's lock, held for the process's life.
    pub port_lock: crate::runtime::server::PortLock,
    /// What the cores' ticks count from.
    pub born: Instant,
}

impl Shared {
    /// Ms since `born`, as the cores' ticks are stamped.
    pub fn now_ms(&self) -> u64 {
        self.born.elapsed().as_millis() as u64
    }

    /// Ms since each core's last tick.
    pub fn tick_ages_ms(&self) -> impl Iterator<Item = u64> + '_ {
        let now = self.now_ms();
        self.stats.iter().map(move |s| now.saturating_sub(s.tick_ms.get()))
    }

    /// Ready only while serving with every core ticking.
    pub fn readiness(&self) -> Readiness {
        match self.phase.get() {
            Phase::Starting => Readiness::Starting,
            Phase::Draining => Readiness::Draining,
            Phase::Ready => match stalled(self.now_ms(), self.stats.iter().map(|s| s.tick_ms.get())) {
                Some((core, for_ms)) => Readiness::Stalled { core, for_ms },
                None => Readiness::Ready,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oldest_tick_past_the_limit_is_stalled() {
        let limit = STALL_AFTER.as_millis() as u64;
        assert_eq!(stalled(10_000, [9_900, 9_950]), None);
        assert_eq!(stalled(10_000, [9_900, 10_000 - limit + 1]), None);
        assert_eq!(stalled(10_000, [9_900, 10_000 - limit]), Some((1, limit)));
        assert_eq!(stalled(60_000, [1_000, 30_000]), Some((0, 59_000)));
        // A tick stamped after `now` was read is not late.
        assert_eq!(stalled(10_000, [10_050, 9_990]), None);
        assert_eq!(stalled(10_000, []), None);
    }
}
