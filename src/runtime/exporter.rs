//! The Prometheus exposition: every metric family declared once, the
//! per-core counts folded into `metrics-exporter-prometheus`, and the text
//! `/metrics` answers.
//!
//! `FAMILIES` is the one list of what is exported: name, type, labels,
//! help. Describing the families to the recorder, folding values into
//! them, the README's metrics table and the dashboard's and alert rules'
//! names are all held against it (by the compiler, or by tests). The fold
//! runs off the data cores, about once a second and on every scrape:
//! counters as absolute totals, gauges as values. Histograms and process
//! metrics are written straight into the text. Histograms: the cores
//! already count each bucket and its sum, so the text is those, summed
//! over the cores, at O(buckets) a scrape; the recorder's histograms take
//! one sample at a time, and replaying every request into them cost the
//! admin thread about 7 ms a second at 155,000 sets a second, growing
//! with the rate, in bursts that took a CPU from the cores or their
//! clients (round 13 of `docs/performance-history.md`). Process metrics:
//! the recorder's counters are integers, and CPU seconds must not move in
//! whole seconds. Label values come from fixed tables (routes, statuses, core
//! ids), so the number of series is bounded.

use crate::metrics::{self as stats, CoreStats, Histogram, MAX_BUCKETS, ROUTE_LABELS, STATUS_LABELS};
use crate::runtime::shared::{Readiness, Shared};
use ::metrics::Unit;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

/// A metric family's Prometheus type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

macro_rules! families {
    ($( $id:ident: $kind:ident $unit:ident $name:literal [$($label:literal),*] $help:literal; )*) => {
        /// Every exported metric family.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum F { $($id),* }

        /// One exported metric family.
        #[derive(Debug)]
        pub struct Family {
            pub f: F,
            pub name: &'static str,
            pub kind: Kind,
            pub unit: Unit,
            pub labels: &'static [&'static str],
            pub help: &'static str,
        }

        /// Every exported family, the one list.
        pub static FAMILIES: &[Family] = &[
            $(Family { f: F::$id, name: $name, kind: Kind::$kind, unit: Unit::$unit, labels: &[$($label),*], help: $help }),*
        ];

        impl F {
            pub fn name(self) -> &'static str {
                match self { $(F::$id => $name),* }
            }
        }
    };
}

families! {
    HttpRequests: Counter Count "rendezvous_http_requests_total" ["route", "code"]
        "HTTP requests answered, by route and status code.";
    HttpDuration: Histogram Seconds "rendezvous_http_request_duration_seconds" ["route"]
        "Time from a request's parsed head to its encoded response, by route; time parked in a blocking read is not included.";
    WaitDuration: Histogram Seconds "rendezvous_wait_duration_seconds" []
        "How long blocking reads stayed parked before a write, their timeout or shutdown answered them.";
    InFlight: Gauge Count "rendezvous_http_requests_in_flight" []
        "Requests being processed, until their answers are written (parked blocking reads included).";
    ConnectionsOpen: Gauge Count "rendezvous_connections_open" []
        "Open client connections.";
    ConnectionsMax: Gauge Count "rendezvous_connections_max" []
        "The -maxConns limit.";
    Connections: Counter Count "rendezvous_connections_total" []
        "Client connections accepted.";
    ConnectionsRefused: Counter Count "rendezvous_connections_refused_total" ["reason"]
        "Connections closed at accept by -maxConns (reason=server), -maxConnsPerIP (reason=ip) or -maxConnsPerNet (reason=net).";
    ConnectionsMoved: Counter Count "rendezvous_connections_moved_total" []
        "Keep-alive connections asked (with Connection: close on an answer) to reconnect onto the cores taking new connections (-placement pack).";
    PlacementCores: Gauge Count "rendezvous_placement_cores" []
        "Cores the load needs (-placement pack: new connections go to these, a core short of its share first); every core under spread.";
    CoreConnections: Gauge Count "rendezvous_core_connections_open" ["core"]
        "Open client connections, by the core serving them.";
    ConnectionsEvicted: Counter Count "rendezvous_connections_evicted_total" []
        "Idle keep-alive connections closed to make room for a new one at -maxConns (a refusal with reason=server means none was idle on the accepting core).";
    Keys: Gauge Count "rendezvous_keys" []
        "Keys stored (expired ones count until reclaimed).";
    KeysMax: Gauge Count "rendezvous_keys_max" []
        "The -maxNumKV limit.";
    StoredBytes: Gauge Bytes "rendezvous_stored_bytes" []
        "Key and value bytes stored.";
    KeysExpired: Counter Count "rendezvous_keys_expired_total" []
        "Keys removed because their TTL ran out.";
    CreatesRefused: Counter Count "rendezvous_creates_refused_total" ["reason"]
        "Creates refused: -maxNumKV reached (reason=store_full, 507), or the client's -maxKeysPerIP (ip_quota) or network's -maxKeysPerNet (net_quota) quota (429), which also refuses storing over another client's key when it would move onto a full quota.";
    QuotaMax: Gauge Count "rendezvous_quota_max" ["scope"]
        "The key quotas in keys: -maxKeysPerIP (scope=ip) and -maxKeysPerNet (scope=net); 0 when off.";
    QuotaAtLimit: Gauge Count "rendezvous_quota_at_limit" ["scope"]
        "Clients (scope=ip) and networks (scope=net) holding as many live keys as their quota allows.";
    QuotaKeysAtLimit: Gauge Count "rendezvous_quota_keys_at_limit" ["scope"]
        "Live keys held by the clients (scope=ip) and networks (scope=net) at or over their quota (over it after a restart with a lower quota, until enough keys expire).";
    QuotaGroups: Gauge Count "rendezvous_quota_networks" []
        "Networks (clients, when only -maxKeysPerIP is on) with keys counted against a quota (expired keys count until removed).";
    SecretRejections: Counter Count "rendezvous_secret_rejections_total" []
        "Writes refused with 403 (wrong or missing owner secret).";
    Conflicts: Counter Count "rendezvous_conflicts_total" ["route"]
        "cas/casoc value mismatches (409) and los on a present key.";
    RateLimited: Counter Count "rendezvous_rate_limited_total" ["reason"]
        "Requests refused with 429 for want of rate-limit tokens: the client's (reason=ip) or its network's (reason=net), or because the table of tracked clients was full (reason=table_full, -maxTrackedIPs).";
    TrackedClients: Gauge Count "rendezvous_ratelimit_tracked_clients" []
        "Client buckets tracked this refill period.";
    TrackedClientsMax: Gauge Count "rendezvous_ratelimit_tracked_clients_max" []
        "The -maxTrackedIPs limit.";
    TrackedNetworks: Gauge Count "rendezvous_ratelimit_tracked_networks" []
        "Network buckets tracked this refill period (also capped by -maxTrackedIPs).";
    CrossCoreMessages: Counter Count "rendezvous_cross_core_messages_total" ["core"]
        "Commands sent to another core, by sending core (a blocking read of its key and the read's cancel included).";
    CrossCoreBatches: Counter Count "rendezvous_cross_core_batches_total" ["core"]
        "Channel sends (batches of commands and replies), by sending core.";
    DirectReads: Counter Count "rendezvous_direct_reads_total" ["core"]
        "GETs of another core's key answered from that core's shard without a message, by reading core.";
    DirectWrites: Counter Count "rendezvous_direct_writes_total" ["core"]
        "Writes to another core's key applied by the receiving core without a message (journaled in its own log), by writing core.";
    AnswersHeld: Counter Count "rendezvous_answers_held_total" ["core"]
        "Answers held for another core's log: the key's last change was journaled there and not yet acknowledged, by holding core.";
    CoreRequests: Counter Count "rendezvous_core_requests_total" ["core"]
        "Requests answered, by the core that accepted them.";
    Waiters: Gauge Count "rendezvous_waiters" []
        "Blocking reads parked on a key.";
    WaitersMax: Gauge Count "rendezvous_waiters_max" []
        "The -maxWaiters limit.";
    Waits: Counter Count "rendezvous_waits_total" []
        "Blocking reads that had to park.";
    WaitWakeups: Counter Count "rendezvous_wait_wakeups_total" []
        "Parked blocking reads answered by a write.";
    WaitTimeouts: Counter Count "rendezvous_wait_timeouts_total" []
        "Parked blocking reads that ran out of time.";
    Snapshots: Counter Count "rendezvous_snapshots_total" []
        "Snapshots (checkpoints) written.";
    SnapshotFailures: Counter Count "rendezvous_snapshot_failures_total" []
        "Snapshots that failed (the log keeps everything since the last good one).";
    SnapshotLastSuccess: Gauge Seconds "rendezvous_snapshot_last_success_timestamp_seconds" []
        "Unix time of the last snapshot written (the process start time until the first).";
    SnapshotDuration: Gauge Seconds "rendezvous_snapshot_duration_seconds" []
        "Duration of the last snapshot written.";
    SnapshotSize: Gauge Bytes "rendezvous_snapshot_size_bytes" []
        "Size of the last snapshot written.";
    SnapshotKeys: Gauge Count "rendezvous_snapshot_keys" []
        "Keys in the last snapshot written.";
    SnapshotInterval: Gauge Seconds "rendezvous_snapshot_interval_seconds" []
        "The -saveDuration period (0: persistence off).";
    LogBytes: Counter Bytes "rendezvous_log_bytes_total" []
        "Bytes appended to the write-ahead log.";
    LogWrites: Counter Count "rendezvous_log_writes_total" []
        "Writes into the write-ahead log (each carries every change its core applied in one scheduler pass).";
    LogFailures: Counter Count "rendezvous_log_failures_total" []
        "Failed write-ahead log writes or syncs.";
    LogFailing: Gauge Count "rendezvous_log_failing" []
        "Cores whose write-ahead log cannot be written now (their writes get 503).";
    LogSyncDuration: Histogram Seconds "rendezvous_log_sync_duration_seconds" []
        "Duration of write-ahead log syncs (fdatasync).";
    LogWriteDuration: Histogram Seconds "rendezvous_log_write_duration_seconds" []
        "Time a core spent in each write of records into its write-ahead log (failed ones and a move to a new segment at a file-size limit included, sync marks written alone not), serving nothing meanwhile: microseconds into the page cache, unless the filesystem holds it.";
    Ready: Gauge Count "rendezvous_ready" []
        "1 while serving; 0 while starting, draining or with a core stalled (as /readyz).";
    CoreTickAge: Gauge Seconds "rendezvous_core_tick_age_seconds" ["core"]
        "Seconds since each core last ran its housekeeping tick (due every 0.1 s); from 5 s on the core counts as stalled and /readyz answers 503.";
    BuildInfo: Gauge Count "rendezvous_build_info" ["version", "revision"]
        "Always 1; labels carry the version and git revision.";
    Threads: Gauge Count "rendezvous_threads" []
        "Worker threads (one shard each).";
}

/// Process metrics, written straight into the exposition (see the module
/// docs). Name, type, help.
pub static PROCESS_FAMILIES: &[(&str, Kind, &str)] = &[
    ("process_cpu_seconds_total", Kind::Counter, "Total user and system CPU time spent in seconds."),
    ("process_resident_memory_bytes", Kind::Gauge, "Resident memory size in bytes."),
    ("process_virtual_memory_bytes", Kind::Gauge, "Virtual memory size in bytes."),
    ("process_open_fds", Kind::Gauge, "Number of open file descriptors."),
    ("process_max_fds", Kind::Gauge, "Maximum number of open file descriptors."),
    ("process_threads", Kind::Gauge, "Number of OS threads in the process."),
    ("process_start_time_seconds", Kind::Gauge, "Start time of the process since the Unix epoch in seconds."),
];

fn describe() {
    for fam in FAMILIES {
        match fam.kind {
            Kind::Counter => ::metrics::describe_counter!(fam.name, fam.unit, fam.help),
            Kind::Gauge => ::metrics::describe_gauge!(fam.name, fam.unit, fam.help),
            // Written by `histogram_text`, not the recorder.
            Kind::Histogram => {}
        }
    }
}

/// One core's histogram's per-bucket sums (ns) as last read, unwrapped:
/// a core's sums are `u64`s that wrap (a bucket of 30 s long polls at the
/// default `-maxWaiters` reaches 2^64 ns in weeks), and an exported `_sum`
/// that fell back would read as a counter reset, a spike in every `rate()`
/// of it. Each scrape adds what a bucket gained since the last one.
#[derive(Debug, Clone, Default)]
struct Unwrapped {
    last: [u64; MAX_BUCKETS],
    total: [u128; MAX_BUCKETS],
}

impl Unwrapped {
    /// Bucket `b`'s sum now that a core's copy reads `raw`.
    fn read(&mut self, b: usize, raw: u64) -> u128 {
        self.total[b] += u128::from(raw.wrapping_sub(self.last[b]));
        self.last[b] = raw;
        self.total[b]
    }
}

/// One histogram's text, summed over the cores' copies (which share their
/// bounds), each with its `Unwrapped` sums: `_bucket` per bound
/// (cumulative) and `+Inf`, then `_sum` (seconds) and `_count`, labelled
/// with `route` if given. Every count is read once and only grows, and
/// every sum only grows unwrapped, so every series stays monotonic.
fn histogram_series(text: &mut String, name: &str, route: Option<&str>, cores: Vec<(&Histogram, &mut Unwrapped)>) {
    use std::fmt::Write;
    let (label, braces) = match route {
        Some(r) => (format!("route=\"{r}\","), format!("{{route=\"{r}\"}}")),
        None => (String::new(), String::new()),
    };
    let mut bounds_ns: &[u64] = &[];
    let mut total: Vec<(u64, u128)> = Vec::new();
    for (h, sums) in cores {
        bounds_ns = h.bounds_ns();
        total.resize(h.buckets(), (0, 0));
        for (b, t) in total.iter_mut().enumerate() {
            let (n, ns) = h.bucket(b);
            *t = (t.0 + n, t.1 + sums.read(b, ns));
        }
    }
    let (mut count, mut sum_ns) = (0u64, 0u128);
    for (b, &(n, ns)) in total.iter().enumerate() {
        count += n;
        sum_ns += ns;
        let _ = match bounds_ns.get(b) {
            Some(&le) => writeln!(text, "{name}_bucket{{{label}le=\"{}\"}} {count}", le as f64 / 1e9),
            None => writeln!(text, "{name}_bucket{{{label}le=\"+Inf\"}} {count}"),
        };
    }
    let _ = writeln!(text, "{name}_sum{braces} {}", sum_ns as f64 / 1e9);
    let _ = writeln!(text, "{name}_count{braces} {count}");
}

/// Folds the cores' counts into the recorder and renders the text.
pub struct Exporter {
    shared: Arc<Shared>,
    handle: PrometheusHandle,
    start_unix: f64,
    /// The histograms' sums, unwrapped.
    sums: SeriesSums,
}

impl Exporter {
    /// Installs the recorder (once per process).
    /// `start_unix`: the process's start (`start_time`).
    pub fn new(shared: Arc<Shared>, start_unix: f64) -> Result<Exporter, String> {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        ::metrics::set_global_recorder(recorder).map_err(|e| e.to_string())?;
        describe();
        Ok(Exporter { shared, handle, start_unix, sums: SeriesSums::default() })
    }

    /// Folds the cores' counts into the recorder.
    pub fn fold(&mut self) {
        use ::metrics::{counter, gauge};
        let shared = &self.shared;
        let stats = &shared.stats;
        let cfg = &shared.config;
        for r in 0..ROUTE_LABELS {
            let route = stats::route_label(r);
            for ci in 0..STATUS_LABELS {
                let total: u64 = stats.iter().map(|s| s.requests(r, ci)).sum();
                // Every known route and status from the start, at zero: a
                // series born at its first increment hides that increment
                // from `rate()` and `increase()` (the first 503s of an
                // outage, say). The "other" status (one not in the table)
                // only once seen.
                if total > 0 || ci < STATUS_LABELS - 1 {
                    counter!(F::HttpRequests.name(), "route" => route, "code" => stats::status_label(ci))
                        .absolute(total);
                }
            }
            let conflicts: u64 = stats.iter().map(|s| s.conflicts(r)).sum();
            counter!(F::Conflicts.name(), "route" => route).absolute(conflicts);
        }
        let sum = |f: fn(&CoreStats) -> u64| stats.iter().map(f).sum::<u64>();
        gauge!(F::InFlight.name()).set(sum(|s| s.requests_in_flight.get()) as f64);
        gauge!(F::ConnectionsOpen.name()).set(sum(|s| s.connections_open.get()) as f64);
        counter!(F::ConnectionsMoved.name()).absolute(sum(|s| s.connections_moved.get()));
        gauge!(F::PlacementCores.name()).set(self.shared.placement.active() as f64);
        gauge!(F::ConnectionsMax.name()).set(cfg.max_conns as f64);
        counter!(F::Connections.name()).absolute(sum(|s| s.connections_total.get()));
        counter!(F::ConnectionsRefused.name(), "reason" => "server").absolute(sum(|s| s.refused_server_full.get()));
        counter!(F::ConnectionsRefused.name(), "reason" => "ip").absolute(sum(|s| s.refused_ip_full.get()));
        counter!(F::ConnectionsRefused.name(), "reason" => "net").absolute(sum(|s| s.refused_net_full.get()));
        counter!(F::ConnectionsEvicted.name()).absolute(sum(|s| s.evicted_idle.get()));
        gauge!(F::Keys.name()).set(shared.budget.live() as f64);
        gauge!(F::KeysMax.name()).set(shared.budget.max() as f64);
        gauge!(F::StoredBytes.name()).set(sum(|s| s.stored_bytes.get()) as f64);
        counter!(F::KeysExpired.name()).absolute(sum(|s| s.expired.get()));
        for (i, reason) in stats::CREATE_REFUSAL_REASONS.iter().enumerate() {
            counter!(F::CreatesRefused.name(), "reason" => *reason)
                .absolute(stats.iter().map(|s| s.creates_refused(i)).sum());
        }
        let quotas = shared.budget.quotas();
        let census = quotas.census(crate::clock::unix_ms());
        let [ip, net] = stats::QUOTA_SCOPES;
        gauge!(F::QuotaMax.name(), "scope" => ip).set(quotas.per_ip() as f64);
        gauge!(F::QuotaMax.name(), "scope" => net).set(quotas.per_net() as f64);
        gauge!(F::QuotaAtLimit.name(), "scope" => ip).set(census.ips_at_limit as f64);
        gauge!(F::QuotaAtLimit.name(), "scope" => net).set(census.nets_at_limit as f64);
        gauge!(F::QuotaKeysAtLimit.name(), "scope" => ip).set(census.ip_keys_at_limit as f64);
        gauge!(F::QuotaKeysAtLimit.name(), "scope" => net).set(census.net_keys_at_limit as f64);
        gauge!(F::QuotaGroups.name()).set(census.groups as f64);
        counter!(F::SecretRejections.name()).absolute(sum(|s| s.secret_rejections()));
        for (i, reason) in stats::RATE_LIMIT_REASONS.iter().enumerate() {
            counter!(F::RateLimited.name(), "reason" => *reason)
                .absolute(stats.iter().map(|s| s.rate_limited(i)).sum());
        }
        gauge!(F::TrackedClients.name()).set(shared.limiter.tracked() as f64);
        gauge!(F::TrackedClientsMax.name()).set(cfg.max_tracked_ips as f64);
        gauge!(F::TrackedNetworks.name()).set(shared.limiter.tracked_networks() as f64);
        for (core, s) in stats.iter().enumerate() {
            let core = core.to_string();
            counter!(F::CrossCoreMessages.name(), "core" => core.clone()).absolute(s.cross_core_sent.get());
            counter!(F::CrossCoreBatches.name(), "core" => core.clone()).absolute(s.cross_core_batches.get());
            counter!(F::DirectReads.name(), "core" => core.clone()).absolute(s.direct_reads.get());
            counter!(F::DirectWrites.name(), "core" => core.clone()).absolute(s.direct_writes.get());
            counter!(F::AnswersHeld.name(), "core" => core.clone()).absolute(s.answers_held.get());
            gauge!(F::CoreConnections.name(), "core" => core.clone()).set(s.connections_open.get() as f64);
            counter!(F::CoreRequests.name(), "core" => core).absolute(s.requests_total());
        }
        gauge!(F::Waiters.name()).set(sum(|s| s.waiters.get()) as f64);
        gauge!(F::WaitersMax.name()).set(cfg.max_waiters as f64);
        counter!(F::Waits.name()).absolute(sum(|s| s.waits_parked.get()));
        counter!(F::WaitWakeups.name()).absolute(sum(|s| s.waiter_wakeups.get()));
        counter!(F::WaitTimeouts.name()).absolute(sum(|s| s.wait_timeouts.get()));
        let snap = &shared.snapshot_stats;
        counter!(F::Snapshots.name()).absolute(snap.saved_total.get());
        counter!(F::SnapshotFailures.name()).absolute(snap.failures_total.get());
        // Until the first snapshot, its age counts from the start: an
        // instance that never manages one still ages into the alert.
        let last = match snap.saved_total.get() {
            0 => self.start_unix,
            _ => snap.last_success_unix_ms.get() as f64 / 1000.0,
        };
        gauge!(F::SnapshotLastSuccess.name()).set(last);
        gauge!(F::SnapshotDuration.name()).set(snap.last_duration_us.get() as f64 / 1e6);
        gauge!(F::SnapshotSize.name()).set(snap.last_size_bytes.get() as f64);
        gauge!(F::SnapshotKeys.name()).set(snap.last_entries.get() as f64);
        let interval = if cfg.data_dir().is_some() { cfg.save_duration.as_secs_f64() } else { 0.0 };
        gauge!(F::SnapshotInterval.name()).set(interval);
        counter!(F::LogBytes.name()).absolute(sum(|s| s.log_bytes.get()));
        counter!(F::LogWrites.name()).absolute(sum(|s| s.log_writes.get()));
        counter!(F::LogFailures.name()).absolute(sum(|s| s.log_failures.get()));
        gauge!(F::LogFailing.name()).set(sum(|s| s.log_failing.get()) as f64);
        gauge!(F::Ready.name()).set(if shared.readiness() == Readiness::Ready { 1.0 } else { 0.0 });
        for (core, age) in shared.tick_ages_ms().enumerate() {
            gauge!(F::CoreTickAge.name(), "core" => core.to_string()).set(age as f64 / 1000.0);
        }
        gauge!(F::BuildInfo.name(), "version" => crate::VERSION, "revision" => crate::GIT_REVISION).set(1.0);
        gauge!(F::Threads.name()).set(cfg.threads as f64);
        self.handle.run_upkeep();
    }

    /// The `/metrics` text: the recorder's families, the histograms, then
    /// the process's.
    pub fn render(&mut self) -> String {
        self.fold();
        let mut text = self.handle.render();
        text += &self.histogram_text();
        text += &process_text(self.start_unix);
        text
    }

    /// The histogram families, from the cores' buckets (see the module doc).
    fn histogram_text(&mut self) -> String {
        histogram_text(&self.shared.stats, &mut self.sums)
    }
}

/// Every histogram family's text from the cores' `stats`, one scrape's
/// worth: the series in the same order each time (`SeriesSums`).
fn histogram_text(stats: &[CoreStats], sums: &mut SeriesSums) -> String {
    let mut text = String::new();
    sums.next = 0;
    for fam in FAMILIES.iter().filter(|f| f.kind == Kind::Histogram) {
        write_histogram(&mut text, fam, stats, sums);
    }
    text
}

/// One histogram family's text, from the cores' `stats`. Every histogram
/// family must have its arm here: a test checks each one is written.
fn write_histogram(text: &mut String, fam: &Family, stats: &[CoreStats], sums: &mut SeriesSums) {
    let (name, help) = (fam.name, fam.help);
    *text += &format!("# HELP {name} {help}\n# TYPE {name} histogram\n");
    match fam.f {
        F::HttpDuration => {
            for r in 0..ROUTE_LABELS {
                histogram_series(
                    text,
                    name,
                    Some(stats::route_label(r)),
                    sums.next(stats.iter().map(|s| s.latency(r))),
                );
            }
        }
        F::WaitDuration => histogram_series(text, name, None, sums.next(stats.iter().map(|s| &s.waited))),
        F::LogSyncDuration => histogram_series(text, name, None, sums.next(stats.iter().map(|s| &s.log_sync))),
        F::LogWriteDuration => histogram_series(text, name, None, sums.next(stats.iter().map(|s| &s.log_write))),
        _ => {}
    }
    *text += "\n";
}

/// Each histogram series' per-core `Unwrapped` sums, in the order
/// `histogram_text` writes the series: the same at every scrape, so the
/// n-th series written is always the same one (made at the first scrape).
#[derive(Debug, Default)]
struct SeriesSums {
    all: Vec<Vec<Unwrapped>>,
    /// The next series' place in `all` during a scrape.
    next: usize,
}

impl SeriesSums {
    /// The next series' per-core histograms, each with its sums.
    fn next<'h>(&mut self, cores: impl Iterator<Item = &'h Histogram>) -> Vec<(&'h Histogram, &mut Unwrapped)> {
        if self.all.len() == self.next {
            self.all.push(Vec::new());
        }
        let sums = &mut self.all[self.next];
        self.next += 1;
        let cores: Vec<&Histogram> = cores.collect();
        sums.resize(cores.len(), Unwrapped::default());
        cores.into_iter().zip(sums.iter_mut()).collect()
    }
}

/// The process families, written straight into the text (see the module doc).
fn process_text(start_unix: f64) -> String {
    let mut text = String::new();
    if let Some(p) = read_process() {
        let values = [
            p.cpu_seconds,
            p.rss_bytes as f64,
            p.virtual_bytes as f64,
            p.open_fds as f64,
            p.max_fds as f64,
            p.threads as f64,
            start_unix,
        ];
        for ((name, kind, help), v) in PROCESS_FAMILIES.iter().zip(values) {
            text += &format!("# HELP {name} {help}\n# TYPE {name} {}\n{name} {v}\n", kind.as_str());
        }
    }
    text
}

/// What `/metrics` answers while the store is being recovered, before an
/// `Exporter` can exist: the process is up (Prometheus's `up` is 1, so a
/// long replay is not RendezvousDown) and not ready (`rendezvous_ready 0`,
/// which RendezvousNotReady watches, as `/readyz` says `starting`), with its
/// build and process metrics. Everything else appears once recovered.
/// Written from the same family table as the full exposition. `start_unix`:
/// the process's start (`start_time`).
pub fn starting_text(start_unix: f64) -> String {
    let mut text = String::new();
    let labels = format!("{{version=\"{}\",revision=\"{}\"}}", crate::VERSION, crate::GIT_REVISION);
    for (f, labels, value) in [(F::Ready, "", 0), (F::BuildInfo, labels.as_str(), 1)] {
        if let Some(family) = FAMILIES.iter().find(|fam| fam.f == f) {
            let (name, help, kind) = (family.name, family.help, family.kind.as_str());
            text += &format!("# HELP {name} {help}\n# TYPE {name} {kind}\n{name}{labels} {value}\n");
        }
    }
    text += &process_text(start_unix);
    text
}

/// `process_start_time_seconds`: the process's start from `/proc`, else
/// `started` (when startup began: a `ProcSubset=pid` sandbox hides
/// `/proc/stat`'s boot time). Read once, at startup: the boot time `/proc`
/// gives moves when the wall clock is stepped, and a start time that moved
/// would look like a restart (RendezvousCrashLooping).
pub fn start_time(started: SystemTime) -> f64 {
    let started_unix = started.duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
    process_start_unix().unwrap_or(started_unix)
}

struct ProcessStats {
    cpu_seconds: f64,
    rss_bytes: u64,
    virtual_bytes: u64,
    open_fds: u64,
    max_fds: u64,
    threads: u64,
}

/// The fields of a `/proc/.../stat` line from the third (the state) on:
/// those after the parenthesised command name, which may contain spaces.
pub(crate) fn stat_fields(stat: &str) -> Option<std::str::SplitWhitespace<'_>> {
    Some(stat.get(stat.rfind(')')? + 2..)?.split_whitespace())
}

fn read_process() -> Option<ProcessStats> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let fields: Vec<&str> = stat_fields(&stat)?.collect();
    let num = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok());
    let threads = num(17)?;
    let virtual_bytes = num(20)?;
    let rss_pages = num(21)?;
    let open_fds = std::fs::read_dir("/proc/self/fd").map(|d| d.count() as u64).unwrap_or(0);
    let max_fds = rlimit::getrlimit(rlimit::Resource::NOFILE).map(|(soft, _)| soft).unwrap_or(0);
    Some(ProcessStats {
        cpu_seconds: cpu_seconds()?,
        rss_bytes: rss_pages * page_size(),
        virtual_bytes,
        open_fds,
        max_fds,
        threads,
    })
}

/// The kernel's page size (`/proc` counts RSS in pages: 4 KiB on x86-64,
/// 16 or 64 KiB on some arm64 kernels).
fn page_size() -> u64 {
    // SAFETY: `sysconf` only reads a system constant.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(n).ok().filter(|&n| n > 0).unwrap_or(4096)
}

/// When this process started, in seconds since the Unix epoch: the boot
/// time (`/proc/stat`) plus the process's start in clock ticks after boot
/// (`/proc/self/stat`, field 22).
fn process_start_unix() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let ticks: f64 = stat_fields(&stat)?.nth(19)?.parse().ok()?;
    let boot: f64 = std::fs::read_to_string("/proc/stat")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()?;
    // SAFETY: `sysconf` only reads a system constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    (hz > 0).then(|| boot + ticks / hz as f64)
}

/// User plus system CPU time of the whole process, in microsecond resolution.
/// `/proc/self/stat` counts in 10 ms ticks, which reads 0 for a quiet process
/// and makes `rate()` jumpy; `getrusage` is exact.
fn cpu_seconds() -> Option<f64> {
    // SAFETY: an all-zero `rusage` is a valid value of a plain C struct, and
    // `getrusage` only writes into the struct we pass; `RUSAGE_SELF` is valid.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: see above; the pointer is to a live, properly aligned local.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return None;
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    Some(secs(usage.ru_utime) + secs(usage.ru_stime))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_process_start_is_before_now_and_after_boot() {
        let start = process_start_unix().unwrap();
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64();
        assert!(start <= now + 1.0 && start > now - 86_400.0 * 365.0, "{start} against {now}");
        // The process's own start, not the boot time (the field before it
        // reads 0): this test binary started after boot and within the hour.
        let boot: f64 = std::fs::read_to_string("/proc/stat")
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("btime "))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert!(start > boot + 1.0 && now - start < 3600.0, "{start}: booted {boot}, now {now}");
        assert!(page_size() >= 4096 && page_size().is_power_of_two());
    }

    #[test]
    fn process_stats_are_readable_and_cpu_is_fractional() {
        let p = read_process().unwrap();
        assert!(p.rss_bytes > 0 && p.open_fds > 0 && p.threads >= 1 && p.max_fds > 0);
        // Burn a little CPU: the figure has sub-second resolution.
        let mut x = 0u64;
        for i in 0..20_000_000u64 {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
        }
        let q = read_process().unwrap();
        assert!(q.cpu_seconds > p.cpu_seconds, "{} -> {}", p.cpu_seconds, q.cpu_seconds);
        assert!(q.cpu_seconds.fract() != 0.0);
    }

    #[test]
    fn a_histogram_is_the_cores_buckets_summed_and_cumulative() {
        static BOUNDS: [u64; 2] = [1_000, 2_000_000];
        let cores = [Histogram::new(&BOUNDS), Histogram::new(&BOUNDS)];
        for ns in [500, 1_000, 1_500_000] {
            cores[0].record_ns(ns);
        }
        cores[1].record_ns(3_000_000_000);
        let mut sums = vec![Unwrapped::default(); 2];
        let mut text = String::new();
        histogram_series(&mut text, "x_seconds", Some("get"), cores.iter().zip(sums.iter_mut()).collect());
        assert_eq!(
            text,
            "x_seconds_bucket{route=\"get\",le=\"0.000001\"} 2\n\
             x_seconds_bucket{route=\"get\",le=\"0.002\"} 3\n\
             x_seconds_bucket{route=\"get\",le=\"+Inf\"} 4\n\
             x_seconds_sum{route=\"get\"} 3.0015015\n\
             x_seconds_count{route=\"get\"} 4\n"
        );
        let mut text = String::new();
        histogram_series(&mut text, "y_seconds", None, vec![(&cores[1], &mut Unwrapped::default())]);
        assert!(text.ends_with("y_seconds_bucket{le=\"+Inf\"} 1\ny_seconds_sum 3\ny_seconds_count 1\n"), "{text}");
    }

    #[test]
    fn a_sum_that_wraps_on_its_core_keeps_growing() {
        let mut sums = Unwrapped::default();
        assert_eq!(sums.read(3, u64::MAX - 10), u128::from(u64::MAX - 10));
        // 30 ns later the core's u64 has wrapped to 19.
        assert_eq!(sums.read(3, 19), u128::from(u64::MAX) + 20);
        assert_eq!(sums.read(3, 19), u128::from(u64::MAX) + 20, "nothing new, nothing added");
        assert_eq!(sums.read(0, 5), 5, "each bucket its own");
        // Through the text: a core's bucket wraps between two scrapes.
        static BOUNDS: [u64; 1] = [1_000];
        let h = Histogram::new(&BOUNDS);
        let mut sums = Unwrapped::default();
        let sum_after = |sums: &mut Unwrapped| {
            let mut text = String::new();
            histogram_series(&mut text, "z", None, vec![(&h, sums)]);
            let line = text.lines().find(|l| l.starts_with("z_sum ")).unwrap_or_default().to_string();
            line.trim_start_matches("z_sum ").parse::<f64>().unwrap_or(0.0)
        };
        h.record_ns(u64::MAX - 10);
        let before = sum_after(&mut sums);
        // 1,000 s more: the core's u64 wraps to about that.
        h.record_ns(1_000_000_000_000);
        assert!(sum_after(&mut sums) > before, "an exported _sum never falls back");
    }

    #[test]
    fn each_scrape_finds_each_series_sums_where_the_last_left_them() {
        let stats: Vec<CoreStats> = (0..2).map(|_| CoreStats::default()).collect();
        let mut sums = SeriesSums::default();
        let first = histogram_text(&stats, &mut sums);
        let series = sums.all.len();
        assert_eq!(series, first.matches("_count").count(), "one per series");
        stats[1].log_write.record_ns(u64::MAX - 10);
        histogram_text(&stats, &mut sums);
        stats[1].log_write.record_ns(1_000_000_000_000);
        let third = histogram_text(&stats, &mut sums);
        assert_eq!(sums.all.len(), series, "no series made twice");
        let line = third.lines().find(|l| l.starts_with("rendezvous_log_write_duration_seconds_sum ")).unwrap();
        let sum: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
        assert!(sum > (u64::MAX / 1_000_000_000) as f64, "the wrap is seen across scrapes: {line}");
    }

    #[test]
    fn every_histogram_family_is_written() {
        let stats: Vec<CoreStats> = (0..2).map(|_| CoreStats::default()).collect();
        let mut sums = SeriesSums::default();
        let mut text = String::new();
        for fam in FAMILIES.iter().filter(|f| f.kind == Kind::Histogram) {
            let before = text.len();
            write_histogram(&mut text, fam, &stats, &mut sums);
            assert!(text[before..].contains(&format!("{}_count", fam.name)), "{} has no series", fam.name);
        }
    }

    #[test]
    fn families_are_named_like_prometheus_wants() {
        let mut names: Vec<&str> = FAMILIES.iter().map(|f| f.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), FAMILIES.len(), "a family is declared twice");
        for fam in FAMILIES {
            assert!(fam.name.starts_with("rendezvous_"), "{}", fam.name);
            assert_eq!(fam.kind == Kind::Counter, fam.name.ends_with("_total"), "{}", fam.name);
            if fam.kind == Kind::Histogram || matches!(fam.unit, Unit::Seconds) {
                assert!(fam.name.ends_with("_seconds"), "{}", fam.name);
            }
            assert!(fam.help.ends_with('.'), "{}", fam.name);
        }
    }
}
