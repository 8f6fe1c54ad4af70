//! What the main thread does once the cores run: periodic snapshots, and a
//! graceful shutdown on SIGTERM/SIGINT.
//!
//! This thread is the only one that blocks, and it never touches a shard: it
//! asks each core for a copy of its entries over the mesh (`Control`), and
//! the cores copy incrementally between requests. Encoding, writing and
//! fsyncing the file happen here, off the data cores. Shutdown order: every
//! core stops accepting and refuses new requests (503), in-flight requests
//! finish (bounded by `-shutdownTimeout`), then the final snapshot is taken
//! and written, and the process exits 0. A second signal exits at once.

use crate::persist::snapshot;
use crate::runtime::router::Control;
use crate::runtime::shared::Shared;
use crate::state::shard::Entry;
use signal_hook::consts::{SIGINT, SIGTERM};
use std::path::Path;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long a core may take to hand over its snapshot copy.
const COLLECT_TIMEOUT: Duration = Duration::from_secs(120);

use crate::clock::unix_ms;

/// Makes the calling thread yield the CPU to the data cores: snapshot
/// encoding and writing run here, and on a small machine they would
/// otherwise preempt request handling (a benchmark saw GET p99 go from
/// under 1 ms to 25 ms during continuous snapshots of 1M keys).
pub fn lower_thread_priority() -> std::io::Result<()> {
    // SAFETY: gettid and setpriority take and return plain integers and
    // touch no memory of ours. On Linux, PRIO_PROCESS with a thread id sets
    // that thread's nice value only.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t, 10) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Runs until shutdown, then exits the process.
pub fn run(shared: Arc<Shared>) -> ! {
    if let Err(e) = lower_thread_priority() {
        log::warn!("cannot lower the snapshot thread's priority: {e}");
    }
    let (sig_tx, sig_rx) = crossbeam_channel::bounded::<i32>(4);
    match signal_hook::iterator::Signals::new([SIGTERM, SIGINT]) {
        Ok(mut signals) => {
            std::thread::Builder::new()
                .name("signals".into())
                .spawn(move || {
                    let mut seen = 0;
                    for sig in signals.forever() {
                        seen += 1;
                        if seen > 1 {
                            log::warn!("second signal: exiting without a final snapshot");
                            std::process::exit(1);
                        }
                        let _ = sig_tx.send(sig);
                    }
                })
                .ok();
        }
        Err(e) => {
            log::warn!("cannot install signal handlers ({e}); SIGTERM will not save a snapshot")
        }
    }
    let snapshot_path = shared.config.data_dir().map(|d| d.join("snapshot.rkyv"));
    let ticks = match snapshot_path {
        Some(_) => crossbeam_channel::tick(shared.config.save_duration),
        None => crossbeam_channel::never(),
    };
    loop {
        crossbeam_channel::select! {
            recv(sig_rx) -> sig => {
                let name = if sig == Ok(SIGINT) { "SIGINT" } else { "SIGTERM" };
                log::info!("{name}: shutting down");
                std::process::exit(shutdown(&shared));
            }
            recv(ticks) -> _ => {
                if let Some(path) = &snapshot_path {
                    let _ = save(&shared, path);
                }
            }
        }
    }
}

/// Stops every core, waits for in-flight requests, saves. Returns the exit code.
fn shutdown(shared: &Shared) -> i32 {
    let n = shared.config.threads;
    let (tx, rx) = mpsc::sync_channel(n);
    for core in 0..n {
        shared.mesh.send_control(core, Control::Drain(tx.clone()));
    }
    let deadline = Instant::now() + shared.config.shutdown_timeout + Duration::from_secs(1);
    for _ in 0..n {
        if rx.recv_timeout(deadline.saturating_duration_since(Instant::now())).is_err() {
            log::warn!("some requests were still in progress after -shutdownTimeout");
            break;
        }
    }
    match &shared.config.data_dir().map(|d| d.join("snapshot.rkyv")) {
        Some(path) => match save(shared, path) {
            Ok(()) => {
                log::info!("shutdown complete");
                0
            }
            Err(()) => 1,
        },
        None => 0,
    }
}

/// Collects every core's entries and writes the snapshot file.
fn save(shared: &Shared, path: &Path) -> Result<(), ()> {
    let started = Instant::now();
    let stats = &shared.snapshot_stats;
    let shards = match collect(shared) {
        Ok(s) => s,
        Err(e) => {
            log::error!("snapshot failed: {e}");
            stats.failures_total.add(1);
            return Err(());
        }
    };
    let entries: usize = shards.iter().map(Vec::len).sum();
    let result = snapshot::encode(&shared.secret_key, shards, unix_ms())
        .and_then(|bytes| snapshot::write_atomic(path, &bytes).map(|()| bytes.len()).map_err(Into::into));
    match result {
        Ok(size) => {
            stats.saved_total.add(1);
            stats.last_success_unix_ms.set(unix_ms());
            stats.last_duration_us.set(started.elapsed().as_micros() as u64);
            stats.last_size_bytes.set(size as u64);
            stats.last_entries.set(entries as u64);
            log::info!(
                "snapshot saved: {entries} keys, {size} bytes, {} ms, {}",
                started.elapsed().as_millis(),
                path.display()
            );
            Ok(())
        }
        Err(e) => {
            stats.failures_total.add(1);
            log::error!("snapshot to {} failed: {e}", path.display());
            Err(())
        }
    }
}

fn collect(shared: &Shared) -> Result<Vec<Vec<Entry>>, String> {
    let n = shared.config.threads;
    let mut receivers = Vec::with_capacity(n);
    for core in 0..n {
        let (tx, rx) = mpsc::sync_channel(1);
        shared.mesh.send_control(core, Control::Snapshot(tx));
        receivers.push(rx);
    }
    receivers
        .into_iter()
        .enumerate()
        .map(|(core, rx)| rx.recv_timeout(COLLECT_TIMEOUT).map_err(|_| format!("core {core} did not answer")))
        .collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn lowering_priority_sets_this_threads_nice_value() {
        std::thread::spawn(|| {
            super::lower_thread_priority().unwrap();
            let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap();
            let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split_whitespace().collect();
            // Field 19 of stat (index 16 after the command name) is the nice value.
            assert_eq!(fields[16], "10");
        })
        .join()
        .unwrap();
        // Other threads keep theirs.
        let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap();
        let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split_whitespace().collect();
        assert_ne!(fields[16], "10");
    }
}
