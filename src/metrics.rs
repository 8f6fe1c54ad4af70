//! What the data path counts: per-core counters and fixed-bucket
//! histograms, written by one core each and read by the exporter.
//!
//! Each core writes only its own `CoreStats`: plain relaxed load+store on
//! single-writer atomics (no read-modify-write, no contention, no
//! allocation). Label values come from fixed tables (the route table, the
//! status table), so the series are bounded. This module never renders,
//! serves or aggregates: the exporter does that off the data cores.

use crate::request::error::Error;
use crate::request::http::{status_index, STATUSES};
use crate::request::route::{Route, ROUTES};
use std::sync::atomic::{AtomicU64, Ordering};

/// Route label slots: one per route, plus "other" (no route matched).
pub const ROUTE_LABELS: usize = ROUTES.len() + 1;
/// The label index of requests that matched no route.
pub const ROUTE_OTHER: usize = ROUTES.len();
/// Status label slots: one per known status, plus "other".
pub const STATUS_LABELS: usize = STATUSES.len() + 1;

/// The `route` label for a label index.
pub fn route_label(i: usize) -> &'static str {
    ROUTES.get(i).map_or("other", |r| r.label)
}

/// The label index of a route (`None`: no route matched).
pub fn route_index(route: Option<Route>) -> usize {
    route.map_or(ROUTE_OTHER, |r| r as usize)
}

/// The `code` label for a status label index.
pub fn status_label(i: usize) -> String {
    STATUSES.get(i).map_or_else(|| "other".to_string(), |&(s, _)| s.to_string())
}

/// The `reason` label of `rendezvous_rate_limited_total`: whose bucket
/// ran out, the client's or its network's, or no bucket could be given to
/// a new client (the tracked-client table is full).
pub const RATE_LIMIT_REASONS: [&str; 3] = ["ip", "net", "table_full"];
/// The `reason` label of `rendezvous_creates_refused_total`.
pub const CREATE_REFUSAL_REASONS: [&str; 3] = ["store_full", "ip_quota", "net_quota"];
/// The `scope` label of the quota gauges.
pub const QUOTA_SCOPES: [&str; 2] = ["ip", "net"];

/// Which rate-limit or create-refusal counter an error adds to.
fn reason(e: Error) -> Option<Reason> {
    match e {
        Error::RateLimited(_) => Some(Reason::RateLimited(0)),
        Error::NetRateLimited(_) => Some(Reason::RateLimited(1)),
        Error::TrackingFull(_) => Some(Reason::RateLimited(2)),
        Error::StoreFull => Some(Reason::CreateRefused(0)),
        Error::IpKeyQuota(_) => Some(Reason::CreateRefused(1)),
        Error::NetKeyQuota(_) => Some(Reason::CreateRefused(2)),
        Error::WrongSecret => Some(Reason::Secret),
        _ => None,
    }
}

enum Reason {
    RateLimited(usize),
    CreateRefused(usize),
    Secret,
}

/// Request latency bucket upper bounds (50 us to 1 s).
pub const LATENCY_BOUNDS_NS: [u64; 14] = [
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
];

/// Time-parked bucket upper bounds for blocking reads (1 ms to 60 s).
pub const WAIT_BOUNDS_NS: [u64; 10] = [
    1_000_000,
    10_000_000,
    100_000_000,
    500_000_000,
    1_000_000_000,
    5_000_000_000,
    10_000_000_000,
    30_000_000_000,
    60_000_000_000,
    120_000_000_000,
];

/// Log write bucket upper bounds (10 us to 5 s): 10 us, the request
/// latency bounds from 50 us to 25 ms, then 100 ms, 250 ms, 1 s and 5 s.
/// A healthy
/// append into the page cache takes a few microseconds to tens of them;
/// one the filesystem holds (a sync's writeback holding a lock the append
/// needs, a disk that stalls) takes milliseconds to seconds, with the core
/// serving nothing meanwhile.
pub const LOG_WRITE_BOUNDS_NS: [u64; 14] = {
    let mut b = [0u64; 14];
    b[0] = 10_000;
    let mut i = 0;
    while i < 9 {
        b[i + 1] = LATENCY_BOUNDS_NS[i];
        i += 1;
    }
    b[10] = 100_000_000;
    b[11] = 250_000_000;
    b[12] = 1_000_000_000;
    b[13] = 5_000_000_000;
    b
};

/// Log sync latency bucket upper bounds (100 us to 30 s): the request
/// latency bounds from 100 us to 250 ms, then 1, 5 and 30 s, since a slow
/// or failing disk's syncs take seconds to tens of seconds, which a
/// histogram ending at 1 s would show only as "more than a second".
pub const FLUSH_BOUNDS_NS: [u64; 14] = {
    let mut b = [0u64; 14];
    let mut i = 0;
    while i < 11 {
        b[i] = LATENCY_BOUNDS_NS[i + 1];
        i += 1;
    }
    b[11] = 1_000_000_000;
    b[12] = 5_000_000_000;
    b[13] = 30_000_000_000;
    b
};

/// A counter or gauge written by one thread only.
#[derive(Default, Debug)]
pub struct Cell64(AtomicU64);

impl Cell64 {
    /// Single-writer increment: a plain load and store, no locked instruction.
    #[inline]
    pub fn add(&self, n: u64) {
        self.0.store(self.0.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed);
    }

    #[inline]
    pub fn sub(&self, n: u64) {
        self.0.store(self.0.load(Ordering::Relaxed).wrapping_sub(n), Ordering::Relaxed);
    }

    #[inline]
    pub fn set(&self, v: u64) {
        self.0.store(v, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Largest bucket count (bounds + the +Inf bucket).
pub const MAX_BUCKETS: usize = 15;

/// A fixed-bucket histogram: count and nanosecond sum per bucket; the last
/// bucket is +Inf.
#[derive(Debug)]
pub struct Histogram {
    bounds_ns: &'static [u64],
    counts: [Cell64; MAX_BUCKETS],
    sums_ns: [Cell64; MAX_BUCKETS],
}

impl Histogram {
    /// At most 14 bounds.
    pub const fn new(bounds_ns: &'static [u64]) -> Self {
        Histogram {
            bounds_ns,
            counts: [const { Cell64(AtomicU64::new(0)) }; MAX_BUCKETS],
            sums_ns: [const { Cell64(AtomicU64::new(0)) }; MAX_BUCKETS],
        }
    }

    #[inline]
    pub fn record_ns(&self, ns: u64) {
        let i = self.bounds_ns.iter().position(|&b| ns <= b).unwrap_or(self.bounds_ns.len());
        self.counts[i].add(1);
        self.sums_ns[i].add(ns);
    }

    pub fn bounds_ns(&self) -> &'static [u64] {
        self.bounds_ns
    }

    /// Buckets in use (bounds + 1).
    pub fn buckets(&self) -> usize {
        self.bounds_ns.len() + 1
    }

    /// `(count, sum_ns)` of bucket `i`.
    pub fn bucket(&self, i: usize) -> (u64, u64) {
        (self.counts[i].get(), self.sums_ns[i].get())
    }
}

/// Everything one core counts. Aligned so two cores' stats never share a
/// cache line.
#[derive(Debug)]
#[repr(align(128))]
pub struct CoreStats {
    requests: [[Cell64; STATUS_LABELS]; ROUTE_LABELS],
    latency: [Histogram; ROUTE_LABELS],
    /// How long blocking reads stayed parked (kept out of `latency`).
    pub waited: Histogram,
    conflicts: [Cell64; ROUTE_LABELS],
    pub connections_open: Cell64,
    pub connections_total: Cell64,
    pub refused_server_full: Cell64,
    pub refused_ip_full: Cell64,
    pub refused_net_full: Cell64,
    /// Idle connections closed to make room at `-maxConns`.
    pub evicted_idle: Cell64,
    /// Keep-alive connections asked to reconnect onto the cores taking new
    /// ones (`runtime::placement`).
    pub connections_moved: Cell64,
    pub requests_in_flight: Cell64,
    rate_limited: [Cell64; RATE_LIMIT_REASONS.len()],
    secret_rejections: Cell64,
    creates_refused: [Cell64; CREATE_REFUSAL_REASONS.len()],
    // Published by the core's sweeper from state only the core may read.
    pub keys: Cell64,
    pub stored_bytes: Cell64,
    pub expired: Cell64,
    pub cross_core_sent: Cell64,
    pub cross_core_batches: Cell64,
    pub cross_core_received: Cell64,
    pub direct_reads: Cell64,
    pub direct_writes: Cell64,
    pub answers_held: Cell64,
    // Blocking reads.
    pub waits_parked: Cell64,
    pub wait_timeouts: Cell64,
    pub waiters: Cell64,
    pub waiter_wakeups: Cell64,
    // The core's write-ahead log.
    pub log_bytes: Cell64,
    pub log_writes: Cell64,
    pub log_failures: Cell64,
    /// 1 while the log cannot be written (writes are refused with 503).
    pub log_failing: Cell64,
    pub log_sync: Histogram,
    /// Time the core spent in each log write (it serves nothing meanwhile).
    pub log_write: Histogram,
    /// When the core last ran its housekeeping tick, in ms since
    /// `Shared::born` (`Shared::readiness`).
    pub tick_ms: Cell64,
}

impl Default for CoreStats {
    fn default() -> Self {
        CoreStats {
            requests: Default::default(),
            latency: [const { Histogram::new(&LATENCY_BOUNDS_NS) }; ROUTE_LABELS],
            waited: Histogram::new(&WAIT_BOUNDS_NS),
            conflicts: Default::default(),
            connections_open: Cell64::default(),
            connections_moved: Cell64::default(),
            connections_total: Cell64::default(),
            refused_server_full: Cell64::default(),
            refused_ip_full: Cell64::default(),
            refused_net_full: Cell64::default(),
            evicted_idle: Cell64::default(),
            requests_in_flight: Cell64::default(),
            rate_limited: Default::default(),
            secret_rejections: Cell64::default(),
            creates_refused: Default::default(),
            keys: Cell64::default(),
            stored_bytes: Cell64::default(),
            expired: Cell64::default(),
            cross_core_sent: Cell64::default(),
            cross_core_batches: Cell64::default(),
            cross_core_received: Cell64::default(),
            direct_reads: Cell64::default(),
            direct_writes: Cell64::default(),
            answers_held: Cell64::default(),
            waits_parked: Cell64::default(),
            wait_timeouts: Cell64::default(),
            waiters: Cell64::default(),
            waiter_wakeups: Cell64::default(),
            log_bytes: Cell64::default(),
            log_writes: Cell64::default(),
            log_failures: Cell64::default(),
            log_failing: Cell64::default(),
            log_sync: Histogram::new(&FLUSH_BOUNDS_NS),
            log_write: Histogram::new(&LOG_WRITE_BOUNDS_NS),
            tick_ms: Cell64::default(),
        }
    }
}

impl CoreStats {
    /// Records one answered request (`error`: the failure it reports;
    /// `elapsed_ns`: head parsed to response encoded, time parked excluded).
    #[inline]
    pub fn request(&self, route: usize, status: u16, error: Option<Error>, elapsed_ns: u64) {
        self.latency[route].record_ns(elapsed_ns);
        self.answer(route, status, error);
    }

    /// Counts one answer, with no latency sample: alone, for a request
    /// refused before it was handled (its head or body refused, the server
    /// draining), which was never served (a zero would pull its route's
    /// quantiles down).
    #[inline]
    pub fn answer(&self, route: usize, status: u16, error: Option<Error>) {
        self.requests[route][status_index(status)].add(1);
        match error.and_then(reason) {
            Some(Reason::RateLimited(i)) => self.rate_limited[i].add(1),
            Some(Reason::CreateRefused(i)) => self.creates_refused[i].add(1),
            Some(Reason::Secret) => self.secret_rejections.add(1),
            None => {}
        }
    }

    /// Requests refused for want of tokens, by `RATE_LIMIT_REASONS` index.
    pub fn rate_limited(&self, reason: usize) -> u64 {
        self.rate_limited[reason].get()
    }

    /// Creates refused, by `CREATE_REFUSAL_REASONS` index.
    pub fn creates_refused(&self, reason: usize) -> u64 {
        self.creates_refused[reason].get()
    }

    pub fn secret_rejections(&self) -> u64 {
        self.secret_rejections.get()
    }

    /// A cas/casoc mismatch, or a los that found the key present.
    #[inline]
    pub fn conflict(&self, route: usize) {
        self.conflicts[route].add(1);
    }

    /// Requests answered with this route and status label.
    pub fn requests(&self, route: usize, status: usize) -> u64 {
        self.requests[route][status].get()
    }

    pub fn latency(&self, route: usize) -> &Histogram {
        &self.latency[route]
    }

    pub fn conflicts(&self, route: usize) -> u64 {
        self.conflicts[route].get()
    }

    /// Requests answered by this core, every route and status.
    pub fn requests_total(&self) -> u64 {
        self.requests.iter().flatten().map(Cell64::get).sum()
    }
}

/// What the lifecycle thread records about snapshots.
#[derive(Default, Debug)]
pub struct SnapshotStats {
    pub saved_total: Cell64,
    pub failures_total: Cell64,
    pub last_success_unix_ms: Cell64,
    pub last_duration_us: Cell64,
    pub last_size_bytes: Cell64,
    pub last_entries: Cell64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_inclusive_upper_bounds() {
        let h = Histogram::new(&LATENCY_BOUNDS_NS);
        h.record_ns(50_000);
        h.record_ns(50_001);
        h.record_ns(2_000_000_000);
        assert_eq!(h.bucket(0), (1, 50_000));
        assert_eq!(h.bucket(1), (1, 50_001));
        assert_eq!(h.bucket(14).0, 1);
        assert_eq!(h.buckets(), 15);
        assert!(WAIT_BOUNDS_NS.len() < MAX_BUCKETS && LATENCY_BOUNDS_NS.len() < MAX_BUCKETS);
        assert!(FLUSH_BOUNDS_NS.len() < MAX_BUCKETS && FLUSH_BOUNDS_NS.is_sorted());
        assert!(LOG_WRITE_BOUNDS_NS.len() < MAX_BUCKETS && LOG_WRITE_BOUNDS_NS.is_sorted());
        let b = LOG_WRITE_BOUNDS_NS;
        assert_eq!(
            (b[0], b[1], b[9], b[10], b[11], b[13]),
            (10_000, 50_000, 25_000_000, 100_000_000, 250_000_000, 5_000_000_000)
        );
        assert_eq!(
            (FLUSH_BOUNDS_NS[0], FLUSH_BOUNDS_NS[10], FLUSH_BOUNDS_NS[13]),
            (100_000, 250_000_000, 30_000_000_000)
        );
    }

    #[test]
    fn request_counting_by_route_and_code() {
        let s = CoreStats::default();
        let get = route_index(Some(Route::Get));
        s.request(get, 200, None, 10_000);
        s.request(get, 429, Some(Error::RateLimited(3)), 10_000);
        s.request(get, 429, Some(Error::NetRateLimited(3)), 10_000);
        s.request(get, 429, Some(Error::TrackingFull(3)), 10_000);
        s.request(ROUTE_OTHER, 403, Some(Error::WrongSecret), 10_000);
        s.request(ROUTE_OTHER, 299, None, 10_000);
        s.request(get, 429, Some(Error::NetKeyQuota(9)), 10_000);
        s.request(get, 507, Some(Error::StoreFull), 10_000);
        // A 429 that is neither (too many blocking reads) counts in neither.
        s.request(get, 429, Some(Error::TooManyWaitersFromIp), 10_000);
        assert_eq!(s.requests(get, status_index(200)), 1);
        assert_eq!(s.requests(ROUTE_OTHER, STATUSES.len()), 1);
        assert_eq!((s.rate_limited(0), s.rate_limited(1), s.rate_limited(2), s.secret_rejections()), (1, 1, 1, 1));
        assert_eq!((s.creates_refused(0), s.creates_refused(1), s.creates_refused(2)), (1, 0, 1));
        assert_eq!(s.requests_total(), 9);
        assert_eq!(route_label(get), "get");
        assert_eq!(route_label(ROUTE_OTHER), "other");
        assert_eq!(status_label(status_index(412)), "412");
    }

    #[test]
    fn route_labels_are_unique() {
        let mut labels: Vec<&str> = (0..ROUTE_LABELS).map(route_label).collect();
        labels.sort_unstable();
        labels.dedup();
        assert_eq!(labels.len(), ROUTE_LABELS);
    }
}
