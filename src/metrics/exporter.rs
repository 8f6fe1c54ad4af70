//! Prometheus metrics: cheap per-core recording on the data path, folded
//! into the `metrics` recorder and served as text from an admin thread.
//!
//! Each core writes only its own `CoreStats`: plain relaxed load+store on
//! single-writer atomics (no read-modify-write, no contention, no
//! allocation) and fixed-bucket latency histograms that keep a count and a
//! sum per bucket. The admin thread, off the data cores, folds them into
//! `metrics-exporter-prometheus` about once a second and on every scrape:
//! counters as absolute totals, gauges as values, and each histogram bucket's
//! new samples as `record_many(mean of those samples, count)`, which lands
//! them in the identical exporter bucket and keeps `_sum` exact. It serves
//! `/metrics` on `-metricsAddr`, never on the public port. Label values are
//! from fixed lists (routes, status codes, core ids), so series are bounded.

use crate::metrics::stats::{self, CoreStats, ROUTE_LABELS, STATUS_LABELS};
use crate::runtime::shared::Shared;
use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const FOLD_EVERY: Duration = Duration::from_secs(1);

fn describe() {
    let c = |name: &'static str, unit: Unit, help: &'static str| describe_counter!(name, unit, help);
    let g = |name: &'static str, unit: Unit, help: &'static str| describe_gauge!(name, unit, help);
    c("rendezvous_http_requests_total", Unit::Count, "HTTP requests answered, by route and status code.");
    describe_histogram!(
        "rendezvous_http_request_duration_seconds",
        Unit::Seconds,
        "Time from a request's parsed head to its encoded response, by route."
    );
    g("rendezvous_http_requests_in_flight", Unit::Count, "Requests being processed.");
    g("rendezvous_connections_open", Unit::Count, "Open client connections.");
    c("rendezvous_connections_total", Unit::Count, "Client connections accepted.");
    c(
        "rendezvous_connections_refused_total",
        Unit::Count,
        "Connections closed at accept by -maxConns (reason=server) or -maxConnsPerIP (reason=ip).",
    );
    g("rendezvous_keys", Unit::Count, "Keys stored (expired ones count until reclaimed).");
    g("rendezvous_keys_max", Unit::Count, "The -maxNumKV limit.");
    g("rendezvous_stored_bytes", Unit::Bytes, "Key and value bytes stored.");
    c("rendezvous_keys_expired_total", Unit::Count, "Keys removed because their TTL ran out.");
    c("rendezvous_store_full_total", Unit::Count, "Writes refused with 507 because -maxNumKV was reached.");
    c("rendezvous_secret_rejections_total", Unit::Count, "Writes refused with 403 (wrong or missing owner secret).");
    c("rendezvous_conflicts_total", Unit::Count, "cas/casoc value mismatches (409) and los on a present key.");
    c("rendezvous_rate_limited_total", Unit::Count, "Requests refused with 429.");
    g("rendezvous_ratelimit_tracked_clients", Unit::Count, "Client buckets tracked this refill period.");
    c("rendezvous_cross_core_messages_total", Unit::Count, "Commands sent to another core, by sending core.");
    c(
        "rendezvous_cross_core_batches_total",
        Unit::Count,
        "Channel sends (batches of commands and replies), by sending core.",
    );
    c("rendezvous_core_requests_total", Unit::Count, "Requests answered, by the core that accepted them.");
    c("rendezvous_snapshots_total", Unit::Count, "Snapshots written.");
    c("rendezvous_snapshot_failures_total", Unit::Count, "Snapshots that failed.");
    g("rendezvous_snapshot_last_success_timestamp_seconds", Unit::Seconds, "Unix time of the last snapshot written.");
    g("rendezvous_snapshot_duration_seconds", Unit::Seconds, "Duration of the last snapshot written.");
    g("rendezvous_snapshot_size_bytes", Unit::Bytes, "Size of the last snapshot written.");
    g("rendezvous_snapshot_keys", Unit::Count, "Keys in the last snapshot written.");
    g("rendezvous_snapshot_interval_seconds", Unit::Seconds, "The -saveDuration period (0: snapshots disabled).");
    g("rendezvous_build_info", Unit::Count, "Always 1; labels carry the version.");
    g("rendezvous_waiters", Unit::Count, "Blocking reads parked on a key.");
    c("rendezvous_waits_total", Unit::Count, "Blocking reads that had to park.");
    c("rendezvous_wait_wakeups_total", Unit::Count, "Parked blocking reads answered by a write.");
    c("rendezvous_wait_timeouts_total", Unit::Count, "Parked blocking reads that ran out of time.");
    g("rendezvous_threads", Unit::Count, "Worker threads (one shard each).");
    g("rendezvous_log_failing", Unit::Count, "Cores whose write-ahead log cannot be written now (writes get 503).");
    c("rendezvous_log_failures_total", Unit::Count, "Failed write-ahead log writes or syncs.");
    c("rendezvous_log_bytes_total", Unit::Bytes, "Bytes written to the write-ahead log.");
    c("process_cpu_seconds_total", Unit::Seconds, "User and system CPU time of the process.");
    g("process_resident_memory_bytes", Unit::Bytes, "Resident memory of the process.");
    g("process_open_fds", Unit::Count, "Open file descriptors.");
    g("process_start_time_seconds", Unit::Seconds, "Unix time the process started.");
}

/// Folds per-core stats into the recorder; remembers what it already folded
/// for histograms (counters and gauges are absolute).
struct Folder {
    shared: Arc<Shared>,
    folded_counts: Vec<[[u64; 15]; ROUTE_LABELS]>,
    folded_sums: Vec<[[u64; 15]; ROUTE_LABELS]>,
    start_unix: f64,
}

impl Folder {
    fn fold(&mut self) {
        let stats = &self.shared.stats;
        for r in 0..ROUTE_LABELS {
            let route = stats::route_label(r);
            for ci in 0..STATUS_LABELS {
                let total: u64 = stats.iter().map(|s| s.requests(r, ci)).sum();
                if total > 0 {
                    metrics::counter!("rendezvous_http_requests_total", "route" => route, "code" => stats::status_label(ci))
                        .absolute(total);
                }
            }
            let hist = metrics::histogram!("rendezvous_http_request_duration_seconds", "route" => route);
            for (core, s) in stats.iter().enumerate() {
                for b in 0..s.latency(r).buckets() {
                    let (count, sum) = s.latency(r).bucket(b);
                    let new = count.wrapping_sub(self.folded_counts[core][r][b]);
                    let new_sum = sum.wrapping_sub(self.folded_sums[core][r][b]);
                    if new > 0 {
                        let mean_seconds = new_sum as f64 / new as f64 / 1e9;
                        hist.record_many(mean_seconds, new as usize);
                    }
                    self.folded_counts[core][r][b] = count;
                    self.folded_sums[core][r][b] = sum;
                }
            }
            let conflicts: u64 = stats.iter().map(|s| s.conflicts(r)).sum();
            if conflicts > 0 {
                metrics::counter!("rendezvous_conflicts_total", "route" => route).absolute(conflicts);
            }
        }
        let sum = |f: fn(&CoreStats) -> u64| stats.iter().map(f).sum::<u64>();
        metrics::gauge!("rendezvous_http_requests_in_flight").set(sum(|s| s.requests_in_flight.get()) as f64);
        metrics::gauge!("rendezvous_connections_open").set(sum(|s| s.connections_open.get()) as f64);
        metrics::counter!("rendezvous_connections_total").absolute(sum(|s| s.connections_total.get()));
        metrics::counter!("rendezvous_connections_refused_total", "reason" => "server")
            .absolute(sum(|s| s.refused_server_full.get()));
        metrics::counter!("rendezvous_connections_refused_total", "reason" => "ip")
            .absolute(sum(|s| s.refused_ip_full.get()));
        metrics::gauge!("rendezvous_keys").set(self.shared.budget.live() as f64);
        metrics::gauge!("rendezvous_keys_max").set(self.shared.budget.max() as f64);
        metrics::gauge!("rendezvous_stored_bytes").set(sum(|s| s.stored_bytes.get()) as f64);
        metrics::counter!("rendezvous_keys_expired_total").absolute(sum(|s| s.expired.get()));
        metrics::counter!("rendezvous_store_full_total").absolute(sum(|s| s.store_full.get()));
        metrics::counter!("rendezvous_secret_rejections_total").absolute(sum(|s| s.secret_rejections.get()));
        metrics::counter!("rendezvous_rate_limited_total").absolute(sum(|s| s.rate_limited.get()));
        metrics::gauge!("rendezvous_ratelimit_tracked_clients").set(sum(|s| s.tracked_clients.get()) as f64);
        for (core, s) in stats.iter().enumerate() {
            let core = core.to_string();
            metrics::counter!("rendezvous_cross_core_messages_total", "core" => core.clone())
                .absolute(s.cross_core_sent.get());
            metrics::counter!("rendezvous_cross_core_batches_total", "core" => core.clone())
                .absolute(s.cross_core_batches.get());
            let handled: u64 = s.requests_total();
            metrics::counter!("rendezvous_core_requests_total", "core" => core).absolute(handled);
        }
        metrics::gauge!("rendezvous_waiters").set(sum(|s| s.waiters.get()) as f64);
        metrics::counter!("rendezvous_waits_total").absolute(sum(|s| s.waits_parked.get()));
        metrics::counter!("rendezvous_wait_wakeups_total").absolute(sum(|s| s.waiter_wakeups.get()));
        metrics::counter!("rendezvous_wait_timeouts_total").absolute(sum(|s| s.wait_timeouts.get()));
        metrics::gauge!("rendezvous_log_failing").set(sum(|s| s.log_failing.get()) as f64);
        metrics::counter!("rendezvous_log_failures_total").absolute(sum(|s| s.log_failures.get()));
        metrics::counter!("rendezvous_log_bytes_total").absolute(sum(|s| s.log_bytes.get()));
        let snap = &self.shared.snapshot_stats;
        metrics::counter!("rendezvous_snapshots_total").absolute(snap.saved_total.get());
        metrics::counter!("rendezvous_snapshot_failures_total").absolute(snap.failures_total.get());
        if snap.saved_total.get() > 0 {
            metrics::gauge!("rendezvous_snapshot_last_success_timestamp_seconds")
                .set(snap.last_success_unix_ms.get() as f64 / 1000.0);
            metrics::gauge!("rendezvous_snapshot_duration_seconds").set(snap.last_duration_us.get() as f64 / 1e6);
            metrics::gauge!("rendezvous_snapshot_size_bytes").set(snap.last_size_bytes.get() as f64);
            metrics::gauge!("rendezvous_snapshot_keys").set(snap.last_entries.get() as f64);
        }
        let interval = match self.shared.config.data_dir() {
            Some(_) => self.shared.config.save_duration.as_secs_f64(),
            None => 0.0,
        };
        metrics::gauge!("rendezvous_snapshot_interval_seconds").set(interval);
        metrics::gauge!("rendezvous_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
        metrics::gauge!("rendezvous_threads").set(self.shared.config.threads as f64);
        if let Some(p) = read_process() {
            metrics::counter!("process_cpu_seconds_total").absolute(p.cpu_ticks / 100);
            metrics::gauge!("process_resident_memory_bytes").set(p.rss_bytes as f64);
            metrics::gauge!("process_open_fds").set(p.open_fds as f64);
        }
        metrics::gauge!("process_start_time_seconds").set(self.start_unix);
    }
}

struct ProcessStats {
    /// utime + stime in USER_HZ ticks (100 per second on every Linux ABI).
    cpu_ticks: u64,
    rss_bytes: u64,
    open_fds: u64,
}

fn read_process() -> Option<ProcessStats> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name, which may contain spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let rss_kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())?;
    let open_fds = std::fs::read_dir("/proc/self/fd").map(|d| d.count() as u64).unwrap_or(0);
    Some(ProcessStats { cpu_ticks: utime + stime, rss_bytes: rss_kb * 1024, open_fds })
}

/// Binds the admin listener (so a bad address fails startup) and starts the
/// metrics thread. Returns the bound address.
pub fn start(shared: Arc<Shared>, listener: TcpListener) -> std::io::Result<SocketAddr> {
    let bound = listener.local_addr()?;
    let recorder = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full("rendezvous_http_request_duration_seconds".into()),
            &stats::bounds_seconds(&stats::LATENCY_BOUNDS_NS),
        )
        .map_err(|e| std::io::Error::other(e.to_string()))?
        .build_recorder();
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder).map_err(|e| std::io::Error::other(e.to_string()))?;
    describe();
    let n = shared.stats.len();
    let start_unix = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
    let folder = Folder {
        shared,
        folded_counts: vec![[[0; 15]; ROUTE_LABELS]; n],
        folded_sums: vec![[[0; 15]; ROUTE_LABELS]; n],
        start_unix,
    };
    std::thread::Builder::new().name("metrics".into()).spawn(move || serve(listener, folder, handle))?;
    Ok(bound)
}

fn serve(listener: TcpListener, mut folder: Folder, handle: PrometheusHandle) {
    // Fold on a timer even without scrapes, so histogram samples never pile up.
    let _ = listener.set_nonblocking(true);
    let mut last_fold = Instant::now() - FOLD_EVERY;
    loop {
        if last_fold.elapsed() >= FOLD_EVERY {
            folder.fold();
            handle.run_upkeep();
            last_fold = Instant::now();
        }
        match listener.accept() {
            Ok((stream, _)) => {
                folder.fold();
                last_fold = Instant::now();
                let _ = answer(stream, &handle);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(50)),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

fn answer(mut stream: TcpStream, handle: &PrometheusHandle) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(2)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut buf = vec![0u8; 8192];
    let mut len = 0;
    let path = loop {
        let n = stream.read(&mut buf[len..])?;
        if n == 0 {
            return Ok(());
        }
        len += n;
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut headers);
        match req.parse(&buf[..len]) {
            Ok(httparse::Status::Complete(_)) => break req.path.unwrap_or("").to_string(),
            Ok(httparse::Status::Partial) if len < buf.len() => continue,
            _ => {
                return stream.write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            }
        }
    };
    let (status, ctype, body) = if path == "/metrics" || path.starts_with("/metrics?") {
        ("200 OK", "text/plain; version=0.0.4; charset=utf-8", handle.render())
    } else {
        ("404 Not Found", "text/plain; charset=utf-8", "Not found: try /metrics\n".to_string())
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes())?;
    stream.write_all(body.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn process_stats_are_readable() {
        let p = read_process().unwrap();
        assert!(p.rss_bytes > 0 && p.open_fds > 0);
    }
}
