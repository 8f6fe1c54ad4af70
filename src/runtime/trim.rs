//! Keeps the write-ahead log out of the page cache: once a stretch of a
//! segment is synced, its pages are dropped (`POSIX_FADV_DONTNEED`), and a
//! segment the log no longer writes is dropped whole, by one helper thread
//! per core.
//!
//! Why: the log is written once and read only by recovery, after a restart.
//! Left cached, it fills memory at the write rate (a set of 1000 B is about
//! 1.1 KB of log) until a checkpoint deletes its segments, pushing out pages
//! that are read, and every append claims a page the kernel has not handed
//! out for a while. On a virtual machine that returns free memory to its
//! host (a balloon's free-page reporting, as on this project's benchmark
//! machine) such a page costs a fault on the host at its first touch: with
//! the log growing into returned memory, sets of 1000 B went from 6.5 to
//! 8.4 us of CPU over 5 rounds, and stayed at 6.1-6.9 us with the synced
//! pages dropped (0.79x; `benches/results/e2e.md`). Dropped pages are free
//! again at once and the next appends reuse them while they are still
//! warm.
//!
//! Why a thread: dropping pages takes the file's page-cache lock and frees
//! each page, milliseconds for a second's worth of log; done on the core it
//! stalled every request in flight (a p99 of 31-52 ms in rounds where it
//! ran). The helper runs at background priority (`sched::background`).
//!
//! The snapshot thread drops each snapshot once synced, with the same call
//! (`snapshot::drop_cached`).
//!
//! It must never drop a page that is not on the disk yet or that the log
//! will write again: callers pass only synced ranges, whole pages below the
//! segment's end (`trim_range`). Linux never drops a dirty page for this
//! advice anyway, but a clean partial page dropped and then appended to
//! would have to be read back from the disk, on the core.

use crate::config::SchedPolicy;
use crate::persist::snapshot::drop_cached;
use crossbeam_channel::{Receiver, Sender};
use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;

/// Ranges start and end on multiples of this, the largest page-cache folio
/// on x86-64 and arm64 with 4 KiB pages (2 MiB): the kernel skips a folio
/// only partly inside the range, and file systems now cache buffered
/// writes in folios as large as the write, so a boundary inside one would
/// leave it cached until the segment is retired.
pub const UNIT: u64 = 2 << 20;
/// How far behind the synced end a range must stop: the newest pages may
/// still sit in a CPU's batch of pages on their way to the LRU lists, and
/// dropping one of those makes the kernel drain every CPU's batch, the
/// cores' included.
pub const MARGIN: u64 = 256 << 10;

/// The stretch of a segment to drop once it is synced up to byte `synced`,
/// given that everything below `trimmed` was dropped already: whole
/// `UNIT`s ending at least `MARGIN` behind `synced`, if there is one.
pub fn trim_range(trimmed: u64, synced: u64) -> Option<(u64, u64)> {
    let to = synced.saturating_sub(MARGIN) / UNIT * UNIT;
    (to > trimmed).then_some((trimmed, to))
}

enum Job {
    /// Drop `[from, to)` of a segment still being written.
    Range(Arc<File>, u64, u64),
    /// Drop a whole segment the log has let go of, then close this
    /// descriptor of it (closing a deleted file's last one frees it).
    Retire(OwnedFd),
}

/// One core's trimming helper. Cloned into tasks that retire segments.
#[derive(Clone)]
pub struct Trimmer {
    /// `None` when the thread could not be started: ranges are then left to
    /// the kernel, and retired segments are closed by the core.
    tx: Option<Sender<Job>>,
}

impl Trimmer {
    /// Starts core `core`'s helper thread, under the cores' scheduling
    /// `policy`. It ends when every `Trimmer` clone is gone, after the jobs
    /// already sent. Started by the thread that starts the cores, not by a
    /// core: until it names itself, the kernel shows a new thread under its
    /// creator's name, and a second `core-N` would confuse every tool that
    /// tells the cores by name (a CLI test caught one on a loaded machine).
    pub fn start(core: usize, policy: SchedPolicy) -> (Trimmer, Option<std::thread::JoinHandle<()>>) {
        let (tx, rx) = crossbeam_channel::unbounded::<Job>();
        let spawned = std::thread::Builder::new()
            .name(format!("log-trim-{core}"))
            .stack_size(64 << 10)
            .spawn(move || serve(rx, policy));
        match spawned {
            Ok(handle) => (Trimmer { tx: Some(tx) }, Some(handle)),
            Err(e) => {
                log::warn!("core {core}: cannot start the log-trimming thread ({e}); the log stays in the page cache");
                (Trimmer { tx: None }, None)
            }
        }
    }

    /// Drops `[from, to)` of `file`: synced, and both ends multiples of
    /// `UNIT`, as `trim_range` gives them.
    pub fn range(&self, file: &Arc<File>, from: u64, to: u64) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(Job::Range(file.clone(), from, to));
        }
    }

    /// Lets go of a synced segment the log no longer writes: its pages are
    /// dropped on the helper, which holds a descriptor of its own until
    /// then, so that the core's close (and, if that is the last one, the
    /// freeing of a deleted segment) finds at most the few pages written
    /// since the last trim. Freeing a checkpoint's worth of cached log (up
    /// to `-maxLogSize`, a few hundred milliseconds) on the core stalled
    /// every request in flight: set 1000 B at `-threads 1` with a
    /// checkpoint every few seconds had a p99 of 143-218 ms before, 3.5-4.1
    /// ms after (7 alternated rounds of 12 s). If the descriptor cannot be
    /// copied or no helper runs, the core pays, as before.
    pub fn retire(&self, ring: std::rc::Rc<monoio::fs::File>) {
        if let Some(tx) = &self.tx {
            use std::os::fd::BorrowedFd;
            // SAFETY: `ring` holds the descriptor open for the whole
            // borrow, which ends here with the duplicate.
            if let Ok(dup) = unsafe { BorrowedFd::borrow_raw(ring.as_raw_fd()) }.try_clone_to_owned() {
                let _ = tx.send(Job::Retire(dup));
            }
        }
        drop(ring);
    }
}

/// The helper's loop, until every sender is gone. Ranges go a unit at a
/// time (smaller pieces would split large folios), yielding between units:
/// the helper runs under the cores' policy, which a woken thread does not
/// preempt, so a core waiting for this CPU waits for one unit's pages (36
/// us median, 146 us at most, in a loop of 640), not the whole job.
fn serve(jobs: Receiver<Job>, policy: SchedPolicy) {
    // Best effort: under the default `SCHED_OTHER` a woken helper could
    // preempt a core.
    let _ = crate::runtime::sched::apply_policy(policy);
    crate::runtime::sched::background();
    for job in jobs {
        match job {
            // `from` and `to` are multiples of `UNIT` (`trim_range`).
            Job::Range(file, from, to) => {
                for at in (from..to).step_by(UNIT as usize) {
                    if at > from {
                        std::thread::yield_now();
                    }
                    drop_cached(&file, at, UNIT);
                }
            }
            // Length 0: to the end of the file.
            Job::Retire(fd) => drop_cached(&fd, 0, 0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn only_whole_units_below_the_synced_end_are_trimmed_and_never_twice() {
        // Less than a whole unit MARGIN behind the synced end: wait.
        assert_eq!(trim_range(0, UNIT), None);
        assert_eq!(trim_range(0, UNIT + MARGIN - 1), None);
        assert_eq!(trim_range(0, UNIT + MARGIN), Some((0, UNIT)));
        // The partial unit at the end stays, and the margin before it.
        assert_eq!(trim_range(0, 2 * UNIT + MARGIN - 1), Some((0, UNIT)));
        assert_eq!(trim_range(0, 3 * UNIT + MARGIN + 5), Some((0, 3 * UNIT)));
        // From where the last trim stopped, once a unit more is synced.
        assert_eq!(trim_range(UNIT, 2 * UNIT), None);
        assert_eq!(trim_range(UNIT, 2 * UNIT + MARGIN + 7), Some((UNIT, 2 * UNIT)));
        assert_eq!(trim_range(u64::MAX / UNIT * UNIT, u64::MAX), None);
        assert_eq!(trim_range(0, MARGIN / 2), None);
    }

    fn cached(file: &File, offset: u64) -> bool {
        crate::persist::snapshot::is_cached(file, offset).unwrap()
    }

    #[test]
    fn a_synced_range_and_a_retired_segment_leave_the_page_cache_with_their_bytes() {
        let dir = std::env::temp_dir().join(format!("rdvz-trim-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        if crate::persist::snapshot::memory_backed(&dir) {
            eprintln!("skipped: {} is memory-backed", dir.display());
            let _ = std::fs::remove_dir_all(&dir);
            return;
        }
        let path = dir.join("0000000000000000-0000.wal");
        let bytes: Vec<u8> = (0..4 * UNIT).map(|i| i as u8).collect();
        let file = Arc::new(File::options().read(true).write(true).create(true).truncate(true).open(&path).unwrap());
        file.write_all_at(&bytes, 0).unwrap();
        file.sync_data().unwrap();
        assert!(cached(&file, 0) && cached(&file, 3 * UNIT), "freshly written pages are cached");

        let (trimmer, helper) = Trimmer::start(7, SchedPolicy::Normal);
        let helper = helper.expect("the helper starts");
        assert_eq!(helper.thread().name(), Some("log-trim-7"));
        let (from, to) = trim_range(0, 2 * UNIT + MARGIN + 100).unwrap();
        assert_eq!((from, to), (0, 2 * UNIT));
        trimmer.range(&file, from, to);

        // The retired segment: a second file, closed by the helper last.
        let other = dir.join("0000000000000001-0000.wal");
        std::fs::write(&other, &bytes).unwrap();
        let kept = File::open(&other).unwrap();
        kept.sync_all().unwrap();
        let open_here = || {
            std::fs::read_dir("/proc/self/fd")
                .unwrap()
                .flatten()
                .filter(|e| std::fs::read_link(e.path()).is_ok_and(|l| l == other))
                .count()
        };
        let mut rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new().build().unwrap();
        let ring = rt.block_on(async { std::rc::Rc::new(monoio::fs::File::open(&other).await.unwrap()) });
        assert_eq!(open_here(), 2);
        trimmer.retire(ring);
        // The helper finishes its jobs and ends once the last clone is gone.
        drop(trimmer);
        helper.join().unwrap();

        assert!(!cached(&file, 0) && !cached(&file, to - 1), "the synced range was dropped");
        assert!(cached(&file, to) && cached(&file, 3 * UNIT), "pages past the range stay");
        assert!(!cached(&kept, 0) && !cached(&kept, 3 * UNIT), "the retired segment was dropped whole");
        // Only the test's own descriptor is left; the bytes are all there.
        assert_eq!(open_here(), 1);
        drop(kept);
        assert_eq!(std::fs::read(&path).unwrap(), bytes);
        assert_eq!(std::fs::read(&other).unwrap(), bytes);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
