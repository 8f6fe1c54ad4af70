//! What the main thread does once the cores run: checkpoints (periodic, and
//! on SIGHUP or SIGUSR1) and the shutdown on SIGTERM or SIGINT.
//!
//! This thread is the only one that blocks, and it never touches a shard:
//! it asks each core over the mesh (`Control`) and the cores answer between
//! requests. A checkpoint streams: every core moves its log to a new
//! segment, then sends its shard a slice at a time through a bounded
//! channel, and this thread encodes and writes each slice as a frame of the
//! snapshot file as it arrives, so memory holds a few slices, never a copy
//! of the store. Once the file is durable, log segments older than the
//! first new one are deleted: disk use stays bounded by one snapshot plus
//! the log since it.
//!
//! Shutdown: the cores stop accepting, answer parked blocking reads 503 at
//! once, refuse new requests, and finish those in progress (at most
//! `-shutdownTimeout`; a second signal stops that wait). Then every core's
//! log is written and synced, a final checkpoint is taken, and the process
//! exits 0 (1 if what it holds could not be saved). Only SIGKILL skips the
//! flush and the checkpoint. SIGTERM or SIGINT while a checkpoint is being
//! written stops that checkpoint at its next slice (its temp file is
//! deleted) and shuts down: the shutdown's own checkpoint covers more, and
//! draining does not wait behind a copy that would be redone.

use crate::clock::unix_ms;
use crate::persist::datadir::DataDir;
use crate::persist::snapshot;
use crate::runtime::mesh::{CheckpointMsg, Control, CopyGate, DrainReport};
use crate::runtime::shared::{Phase, Shared};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGUSR1};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long a core may go without sending the next slice of a checkpoint.
const COLLECT_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the final log flush may take.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(60);

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

fn signal_name(sig: i32) -> &'static str {
    match sig {
        SIGINT => "SIGINT",
        SIGTERM => "SIGTERM",
        SIGHUP => "SIGHUP",
        SIGUSR1 => "SIGUSR1",
        _ => "signal",
    }
}

/// Starts listening for SIGTERM, SIGINT, SIGHUP and SIGUSR1 (replacing
/// their default actions, which would kill the process). Called first thing
/// at startup, so a signal during a long recovery is acted on once the
/// server runs instead of killing it half-started.
pub fn install_signals() -> crossbeam_channel::Receiver<i32> {
    let (sig_tx, sig_rx) = crossbeam_channel::unbounded::<i32>();
    match signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP, SIGUSR1]) {
        Ok(mut signals) => {
            let spawned = std::thread::Builder::new().name("signals".into()).spawn(move || {
                for sig in signals.forever() {
                    if sig_tx.send(sig).is_err() {
                        break;
                    }
                }
            });
            if let Err(e) = spawned {
                log::warn!("cannot start the signal thread ({e}); SIGTERM will not save a snapshot");
            }
        }
        Err(e) => log::warn!("cannot install signal handlers ({e}); SIGTERM will not save a snapshot"),
    }
    sig_rx
}

/// Runs until shutdown, then exits the process.
pub fn run(shared: Arc<Shared>, sig_rx: crossbeam_channel::Receiver<i32>) -> ! {
    if let Err(e) = lower_thread_priority() {
        log::warn!("cannot lower the snapshot thread's priority: {e}");
    }
    let ticks = match shared.config.data_dir() {
        Some(_) => crossbeam_channel::tick(shared.config.save_duration),
        None => crossbeam_channel::never(),
    };
    // The log's growth is looked at once a second (`-maxLogSize`).
    let size_checks = match (shared.config.data_dir(), shared.config.max_log_size) {
        (Some(_), 1..) => crossbeam_channel::tick(LOG_SIZE_CHECK),
        _ => crossbeam_channel::never(),
    };
    let mut growth = LogGrowth::new(&shared);
    // If the signal thread is gone, checkpoints still run on their timer.
    let no_signals = crossbeam_channel::never();
    let mut signals = &sig_rx;
    let stop = |sig: i32| -> ! {
        log::info!("{}: shutting down", signal_name(sig));
        std::process::exit(shutdown(&shared, &sig_rx));
    };
    // A checkpoint now; a shutdown signal meanwhile gives it up and stops.
    let snapshot_now = |growth: &mut LogGrowth, signals: &crossbeam_channel::Receiver<i32>| {
        growth.restart(&shared);
        if let Checkpoint::Stopped(sig) = checkpoint(&shared, Some(signals)) {
            stop(sig);
        }
    };
    loop {
        crossbeam_channel::select! {
            recv(signals) -> sig => match sig {
                Ok(sig @ (SIGTERM | SIGINT)) => stop(sig),
                Ok(sig) => {
                    if shared.config.data_dir().is_some() {
                        log::info!("{}: writing a snapshot now", signal_name(sig));
                        snapshot_now(&mut growth, signals);
                    } else {
                        log::info!("{}: nothing to save (-dataDir is empty)", signal_name(sig));
                    }
                }
                Err(_) => {
                    log::warn!("signal handling stopped; snapshots go on every -saveDuration");
                    signals = &no_signals;
                }
            },
            recv(ticks) -> _ => snapshot_now(&mut growth, signals),
            recv(size_checks) -> _ => {
                if let Some(grown) = growth.over_limit(&shared) {
                    log::info!("the log grew by {grown} bytes since the last snapshot (-maxLogSize): writing one now");
                    snapshot_now(&mut growth, signals);
                }
            }
        }
    }
}

/// How often the log's growth is compared with `-maxLogSize`.
const LOG_SIZE_CHECK: Duration = Duration::from_secs(1);

/// Log bytes written since the last checkpoint began. Without a size bound
/// a write-heavy instance would keep up to `-saveDuration` of log (gigabytes
/// at a sustained 10 MB/s: a full disk, then 503s, and a long replay at
/// restart). Like Redis's AOF rewrite (`auto-aof-rewrite-min-size`,
/// `-percentage 100`), a checkpoint starts early once the log has grown by
/// `-maxLogSize` and by at least the last snapshot's size, so rewriting the
/// store never costs more than the log it lets us delete.
struct LogGrowth {
    mark: u64,
}

impl LogGrowth {
    fn new(shared: &Shared) -> Self {
        LogGrowth { mark: Self::written(shared) }
    }

    fn written(shared: &Shared) -> u64 {
        shared.stats.iter().map(|s| s.log_bytes.get()).sum()
    }

    /// A checkpoint starts now: growth counts from here.
    fn restart(&mut self, shared: &Shared) {
        self.mark = Self::written(shared);
    }

    /// The growth, if it calls for a checkpoint.
    fn over_limit(&self, shared: &Shared) -> Option<u64> {
        let grown = Self::written(shared).saturating_sub(self.mark);
        let limit = shared.config.max_log_size.max(shared.snapshot_stats.last_size_bytes.get());
        (shared.config.max_log_size > 0 && grown > limit).then_some(grown)
    }
}

/// Drains every core, flushes the logs, takes the final checkpoint.
/// Returns the exit code.
fn shutdown(shared: &Shared, signals: &crossbeam_channel::Receiver<i32>) -> i32 {
    shared.phase.set(Phase::Draining);
    notify_systemd("STOPPING=1\nSTATUS=draining and saving the store");
    let n = shared.config.threads;
    let (tx, rx) = mpsc::sync_channel(n);
    for core in 0..n {
        shared.mesh.send_control(core, Control::Drain(tx.clone()));
    }
    drop(tx);
    let mut total = DrainReport::default();
    let mut reports = 0;
    let mut cut = false;
    let deadline = Instant::now() + shared.config.shutdown_timeout + Duration::from_secs(1);
    while reports < n {
        match rx.recv_timeout(Duration::from_millis(50)) {
            Ok(r) => {
                total.connections += r.connections;
                total.waiters += r.waiters;
                total.unfinished += r.unfinished;
                reports += 1;
                continue;
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
        if let Ok(sig) = signals.try_recv() {
            if !cut && matches!(sig, SIGTERM | SIGINT) {
                log::warn!(
                    "second {}: no longer waiting for requests in progress (the log and snapshot are still saved)",
                    signal_name(sig)
                );
                cut = true;
                for core in 0..n {
                    shared.mesh.send_control(core, Control::CutShort);
                }
            }
        }
        if Instant::now() > deadline {
            log::warn!("some cores did not finish draining within -shutdownTimeout");
            break;
        }
    }
    log::info!(
        "drained {} connections; {} parked blocking reads answered 503; {} requests unfinished",
        total.connections,
        total.waiters,
        total.unfinished
    );
    if shared.config.data_dir().is_none() {
        return 0;
    }
    let mut code = 0;
    let (tx, rx) = mpsc::sync_channel(n);
    for core in 0..n {
        shared.mesh.send_control(core, Control::Flush(tx.clone()));
    }
    drop(tx);
    for _ in 0..n {
        match rx.recv_timeout(FLUSH_TIMEOUT) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                log::error!("final log flush failed: {e}");
                code = 1;
            }
            Err(_) => {
                log::error!("a core did not flush its log in time");
                code = 1;
            }
        }
    }
    match checkpoint(shared, None) {
        Checkpoint::Saved if code == 0 => {
            log::info!("shutdown complete");
            0
        }
        Checkpoint::Saved => {
            // The snapshot holds everything in memory: what the log could not
            // take is saved after all.
            log::info!("shutdown complete (the final snapshot holds what the log could not write)");
            0
        }
        Checkpoint::Failed | Checkpoint::Stopped(_) => {
            log::error!("shutdown could not save the store: see the errors above; the log holds what it could");
            1
        }
    }
}

/// How a checkpoint ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Checkpoint {
    Saved,
    /// Logged and counted; the log keeps everything.
    Failed,
    /// Given up for this shutdown signal, which the caller acts on.
    Stopped(i32),
}

/// Why a checkpoint was not saved.
enum NotSaved {
    Failed(String),
    Stopped(i32),
}

/// Takes a checkpoint; failures are logged and counted. With `signals`,
/// SIGTERM or SIGINT while the cores' copies are collected stops it (other
/// signals meanwhile are dropped: a snapshot is being written already).
pub fn checkpoint(shared: &Shared, signals: Option<&crossbeam_channel::Receiver<i32>>) -> Checkpoint {
    let Some(data) = shared.data_dir.as_ref() else { return Checkpoint::Saved };
    let dir = data.path();
    let started = Instant::now();
    let stats = &shared.snapshot_stats;
    match write_checkpoint(shared, data, started, signals) {
        Ok((entries, size, replay_from)) => {
            stats.saved_total.add(1);
            stats.last_success_unix_ms.set(unix_ms());
            stats.last_duration_us.set(started.elapsed().as_micros() as u64);
            stats.last_size_bytes.set(size);
            stats.last_entries.set(entries);
            let deleted = data.delete_segments_below(replay_from);
            log::info!(
                "snapshot saved: {entries} keys, {size} bytes, {} ms, {}; {deleted} log segments it covers deleted",
                started.elapsed().as_millis(),
                dir.join(snapshot::FILE_NAME).display()
            );
            Checkpoint::Saved
        }
        Err(NotSaved::Failed(e)) => {
            stats.failures_total.add(1);
            log::error!("snapshot in {} failed: {e}; the log keeps everything since the last one", dir.display());
            Checkpoint::Failed
        }
        Err(NotSaved::Stopped(sig)) => {
            log::info!(
                "{}: the snapshot being written is given up after {} ms (the shutdown writes its own)",
                signal_name(sig),
                started.elapsed().as_millis()
            );
            Checkpoint::Stopped(sig)
        }
    }
}

/// How often a checkpoint looks for a shutdown signal while it waits.
const SIGNAL_POLL: Duration = Duration::from_millis(50);

/// The next message of a checkpoint's cores, or why there is none: a
/// shutdown signal, or no message for `COLLECT_TIMEOUT`.
fn next_slice(
    rx: &mpsc::Receiver<CheckpointMsg>,
    signals: Option<&crossbeam_channel::Receiver<i32>>,
    started: Instant,
) -> Result<CheckpointMsg, NotSaved> {
    let waiting = Instant::now();
    loop {
        while let Some(sig) = signals.and_then(|s| s.try_recv().ok()) {
            if matches!(sig, SIGTERM | SIGINT) {
                return Err(NotSaved::Stopped(sig));
            }
            log::info!("{}: a snapshot is being written already", signal_name(sig));
        }
        match rx.recv_timeout(SIGNAL_POLL) {
            Ok(msg) => return Ok(msg),
            Err(mpsc::RecvTimeoutError::Timeout) if waiting.elapsed() < COLLECT_TIMEOUT => {}
            Err(_) => {
                return Err(NotSaved::Failed(format!("a core sent nothing for {} s", started.elapsed().as_secs())))
            }
        }
    }
}

/// Streams every core's copy into a new snapshot file and publishes it.
/// Returns (entries, bytes, first segment not covered).
fn write_checkpoint(
    shared: &Shared,
    data: &DataDir,
    started: Instant,
    signals: Option<&crossbeam_channel::Receiver<i32>>,
) -> Result<(u64, u64, u64), NotSaved> {
    let n = shared.config.threads;
    let created = unix_ms();
    data.check().map_err(|e| NotSaved::Failed(e.to_string()))?;
    let mut writer = snapshot::Writer::create(data.dir())
        .map_err(|e| NotSaved::Failed(format!("cannot create a temp file: {e}")))?;
    // One slice per core in flight at most: memory stays bounded.
    let (tx, rx) = mpsc::sync_channel(n);
    let gate = Arc::new(CopyGate::default());
    // However this ends, cores still waiting at the gate stop.
    let _abandon = AbandonOnDrop(gate.clone());
    for core in 0..n {
        shared.mesh.send_control(core, Control::Checkpoint(tx.clone(), gate.clone()));
    }
    drop(tx);
    let mut seqs: Vec<Option<u64>> = vec![None; n];
    let (mut begun, mut ended, mut max_version, mut covered) = (0, 0, 0u64, 0u64);
    let failure = loop {
        match next_slice(&rx, signals, started) {
            Ok(CheckpointMsg::Begun { core, seq }) => {
                if let Some(s) = seqs.get_mut(core) {
                    if s.replace(seq).is_none() {
                        begun += 1;
                    }
                }
                if begun == n {
                    // Every core has moved its log: a change with a version up
                    // to here was applied before the copies begin, so they have
                    // it; replay skips such records, wherever they were logged.
                    covered = shared.versions.covered();
                    gate.open();
                }
            }
            Ok(CheckpointMsg::Entries(entries)) => {
                if let Err(e) = writer.write_entries(&entries) {
                    break Some(NotSaved::Failed(format!("cannot write: {e}")));
                }
            }
            Ok(CheckpointMsg::Ended { max_version: v, .. }) => {
                max_version = max_version.max(v);
                ended += 1;
                if ended == n {
                    break None;
                }
            }
            Ok(CheckpointMsg::Failed { core, why }) => break Some(NotSaved::Failed(format!("core {core}: {why}"))),
            Err(why) => break Some(why),
        }
    };
    // Dropping the receiver tells cores still copying to stop.
    drop(rx);
    if let Some(why) = failure {
        writer.abort();
        return Err(why);
    }
    let entries = writer.entries();
    let replay_from = seqs.iter().flatten().copied().min().unwrap_or(0);
    let cover = snapshot::Cover { replay_from, covered_version: covered, max_version };
    if let Err(e) = data.check() {
        writer.abort();
        return Err(NotSaved::Failed(e.to_string()));
    }
    let size = writer.publish(&shared.secret_key, created, cover).map_err(|e| NotSaved::Failed(e.to_string()))?;
    Ok((entries, size, replay_from))
}

/// Abandons a checkpoint's gate when the checkpoint ends (a no-op once open).
struct AbandonOnDrop(Arc<CopyGate>);

impl Drop for AbandonOnDrop {
    fn drop(&mut self) {
        self.0.abandon();
    }
}

/// How long each of `while_starting`'s messages asks systemd to wait, and
/// how often one is sent.
const START_EXTENSION: Duration = Duration::from_secs(30);
const START_EXTENSION_EVERY: Duration = Duration::from_secs(10);

/// Runs `work` (recovery) while telling systemd, every 10 s, to wait 30 s
/// more for `READY=1` (`EXTEND_TIMEOUT_USEC`, which only ever lengthens
/// the unit's start timeout): a replay longer than `TimeoutStartSec` would
/// otherwise be killed and restarted, over and over. The first message
/// goes before `work` starts; each later one only if `work`'s thread used
/// CPU, read or wrote since the one before, so a recovery stuck on a hung
/// disk is not waited for forever (systemd's timeout runs out at most 30 s
/// after the last message). A single disk call that takes over about 20 s
/// shows as no progress too; on a disk that slow, a restart is no worse.
/// Not under systemd, it just runs `work`.
pub fn while_starting<T>(work: impl FnOnce() -> T) -> T {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return work();
    }
    let extend = format!("EXTEND_TIMEOUT_USEC={}\nSTATUS=recovering the store", START_EXTENSION.as_micros());
    notify_systemd(&extend);
    // SAFETY: gettid has no preconditions and cannot fail.
    let worker = unsafe { libc::gettid() };
    let (done, finished) = std::sync::mpsc::channel::<()>();
    std::thread::scope(|scope| {
        scope.spawn(move || {
            let mut last = Progress::of(worker);
            while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = finished.recv_timeout(START_EXTENSION_EVERY) {
                let now = Progress::of(worker);
                // Unreadable counters count as progress, as before they were read.
                if now.is_none() || now != last {
                    notify_systemd(&extend);
                } else {
                    log::warn!(
                        "recovery has neither used CPU nor read nor written for {} s",
                        START_EXTENSION_EVERY.as_secs()
                    );
                }
                last = now;
            }
        });
        let out = work();
        drop(done);
        out
    })
}

/// What a thread has done, as the kernel counts it: CPU time in clock
/// ticks, bytes read and written (`/proc/self/task/TID/stat` and `io`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Progress {
    cpu_ticks: u64,
    read_bytes: u64,
    written_bytes: u64,
}

impl Progress {
    fn of(tid: libc::pid_t) -> Option<Progress> {
        let stat = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).ok()?;
        let io = std::fs::read_to_string(format!("/proc/self/task/{tid}/io")).ok()?;
        Progress::parse(&stat, &io)
    }

    fn parse(stat: &str, io: &str) -> Option<Progress> {
        // utime and stime are fields 14 and 15.
        let mut after = crate::runtime::exporter::stat_fields(stat)?.skip(11);
        let cpu_ticks = after.next()?.parse::<u64>().ok()? + after.next()?.parse::<u64>().ok()?;
        let count = |name: &str| io.lines().find_map(|l| l.strip_prefix(name))?.trim().parse().ok();
        Some(Progress { cpu_ticks, read_bytes: count("rchar:")?, written_bytes: count("wchar:")? })
    }
}

/// Tells systemd (`Type=notify`) how the service stands: `READY=1` when
/// serving (the moment `/readyz` turns 200), `STOPPING=1` when draining.
/// Without `NOTIFY_SOCKET` (not under systemd) this does nothing.
pub fn notify_systemd(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else { return };
    let Ok(socket) = std::os::unix::net::UnixDatagram::unbound() else { return };
    let bytes = std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str());
    let sent = match bytes.strip_prefix(b"@") {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            std::os::unix::net::SocketAddr::from_abstract_name(name)
                .and_then(|addr| socket.send_to_addr(state.as_bytes(), &addr))
        }
        None => socket.send_to(state.as_bytes(), &path),
    };
    if let Err(e) = sent {
        log::warn!("cannot notify systemd ({state}): {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::Progress;

    #[test]
    fn a_threads_progress_is_read_from_proc() {
        let stat = "42 (core 0) S 1 2 3 4 5 6 7 8 9 10 123 45 0 0 20 0";
        let io = "rchar: 9000\nwchar: 1\nsyscr: 3\n";
        assert_eq!(Progress::parse(stat, io), Some(Progress { cpu_ticks: 168, read_bytes: 9000, written_bytes: 1 }));
        assert_eq!(Progress::parse("garbage", io), None);
        // This thread's own counters move when it reads.
        // SAFETY: gettid has no preconditions.
        let me = unsafe { libc::gettid() };
        let before = Progress::of(me).expect("readable /proc");
        let _ = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        let after = Progress::of(me).unwrap();
        assert!(after.read_bytes > before.read_bytes, "{before:?} {after:?}");
    }

    fn own_nice() -> String {
        let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap();
        crate::runtime::exporter::stat_fields(&stat).unwrap().nth(16).unwrap().to_string()
    }

    #[test]
    fn lowering_priority_sets_this_threads_nice_value() {
        std::thread::spawn(|| {
            super::lower_thread_priority().unwrap();
            // Field 19 of stat (index 16 after the command name) is the nice value.
            assert_eq!(own_nice(), "10");
        })
        .join()
        .unwrap();
        // Other threads keep theirs.
        assert_ne!(own_nice(), "10");
    }
}
