//! Threads, sockets, files and signals: everything that runs.
//!
//! `server` starts the process (data directory, listeners, one thread per
//! core); `sched` chooses how the OS runs each core's thread (policy, CPU),
//! and `turns` has cores the kernel put on one CPU take turns on it and
//! pulls a core left waiting behind another program onto a core's CPU;
//! `core` is one core's executor (accept loop, control requests, sweeper),
//! and `placement` chooses which cores take new connections;
//! `conn` serves one connection, and `idle` picks the idle ones to close
//! when the server is full; `router` carries commands to the owning
//! core and replies back, over `slots`, and reads a foreign key directly
//! through `cells` (each core's state behind its lock); `connlimit` admits
//! connections and waiters; `lifecycle` runs snapshots and shutdown;
//! `shared` is the read-only state every core sees; `wal` is each core's
//! write-ahead log, and `trim` drops its synced pages from the page cache;
//! `admin` serves metrics and health on its own thread, with `exporter`
//! folding the cores' counts into the Prometheus text.

pub mod admin;
pub mod cells;
pub mod conn;
pub mod connlimit;
pub mod core;
pub mod exporter;
pub mod idle;
pub mod lifecycle;
pub mod mesh;
pub mod placement;
pub mod router;
pub mod sched;
pub mod server;
pub mod shared;
pub mod slots;
pub mod trim;
pub mod turns;
pub mod wal;

/// What the unit tests of the runtime's plain state machines share.
#[cfg(test)]
pub(crate) mod testing {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::task::{Wake, Waker};

    /// Counts its wake-ups.
    pub struct Count(pub AtomicUsize);

    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// A waker, and the count of its wake-ups.
    pub fn waker() -> (Waker, Arc<Count>) {
        let c = Arc::new(Count(AtomicUsize::new(0)));
        (Waker::from(c.clone()), c)
    }
}
