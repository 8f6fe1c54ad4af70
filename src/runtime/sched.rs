//! How the operating system runs the cores' threads: the scheduling policy
//! each core puts itself under, the CPU each is pinned to, and how a
//! helper a core starts (`background`) stops inheriting both.
//!
//! Why both: under the default policy a core woken by a completion preempts
//! whatever runs on its CPU, often the client or proxy about to send the
//! next requests, and then runs out of work and sleeps after a handful of
//! them; `SCHED_BATCH` threads do not preempt on wake-up, so requests are
//! answered in batches (0.26 -> 0.008 sleeps per keep-alive GET, 0.80x the
//! CPU per request at two threads). Without preemption a woken core waits
//! for the scheduler tick when its CPU is busy, and if the kernel has put
//! both cores on one CPU that wait shows in the tail: pinned one per CPU
//! (`-cpuAffinity spread`), the saturated keep-alive p99 is 0.40x as long
//! at the same CPU per request. Pinning is not the default because a
//! pinned core cannot follow new connections to a free CPU: one request per
//! connection gets 0.86x the throughput and 1.92x the p50. Unpinned cores
//! that find themselves on one CPU take turns on it instead, and a core
//! left waiting behind another program is moved onto a core's CPU for a
//! turn (`turns`).
//! README "Performance" has the figures.
//!
//! This module owns those syscalls and the pure choice of CPUs; it never
//! touches requests or the store, and a refusal (a sandbox, a cpuset) is a
//! warning, never a reason not to serve.

use crate::config::SchedPolicy;

/// The CPUs the calling thread may run on, in ascending order (empty if
/// the kernel will not say).
pub fn allowed_cpus() -> Vec<usize> {
    // SAFETY: an all-zero `cpu_set_t` is a valid, empty set of a plain C
    // bitmask struct.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: pid 0 is the calling thread; the kernel writes at most
    // `size_of::<cpu_set_t>()` bytes into the live local `set`.
    let rc = unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    if rc != 0 {
        return Vec::new();
    }
    // SAFETY: `CPU_ISSET` only reads the initialised `set`; the index is
    // below `CPU_SETSIZE`, the bitmask's size.
    (0..libc::CPU_SETSIZE as usize).filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) }).collect()
}

/// Which CPU each of `threads` cores is pinned to: the i-th allowed CPU for
/// core i when there is exactly one core per allowed CPU (the default
/// `-threads 0`); otherwise none at all. With more cores than CPUs the
/// kernel's balancing beats any fixed sharing; with fewer, the process
/// shares the machine (several instances behind one balancer, each with
/// `-threads 1`, would otherwise all pin themselves to the first CPU).
pub fn placement(allowed: &[usize], threads: usize) -> Vec<Option<usize>> {
    if threads != allowed.len() {
        return vec![None; threads];
    }
    allowed.iter().map(|&cpu| Some(cpu)).collect()
}

/// Pins the calling thread to `cpu`.
pub fn pin(cpu: usize) -> std::io::Result<()> {
    set_affinity(0, &[cpu])
}

/// Lets thread `tid` (0: the calling thread) run only on `cpus`. Moving
/// another thread of this process this way is how a core pulls one that
/// waits for a busy CPU onto its own (`turns`).
pub(crate) fn set_affinity(tid: libc::pid_t, cpus: &[usize]) -> std::io::Result<()> {
    // SAFETY: as in `allowed_cpus`: a zeroed set is valid and empty.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &cpu in cpus {
        if cpu >= libc::CPU_SETSIZE as usize {
            return Err(std::io::Error::from(std::io::ErrorKind::InvalidInput));
        }
        // SAFETY: `cpu` is below `CPU_SETSIZE` (checked above), so `CPU_SET`
        // writes inside the live local `set`.
        unsafe { libc::CPU_SET(cpu, &mut set) };
    }
    // SAFETY: `tid` names a thread (or 0, the caller); the kernel only
    // reads `set`, and refuses a thread it does not know or an empty set.
    let rc = unsafe { libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Makes the calling thread a background helper: free to run on any CPU
/// (a thread starts with its creator's pinning) and at nice 10 (it starts
/// with its creator's priority), so its work yields to the cores'.
/// Best effort: on failure the thread just runs as it was made.
pub fn background() {
    let _ = unrestrict(0);
    // SAFETY: on Linux, `who` 0 with `PRIO_PROCESS` is the calling thread;
    // no pointers.
    unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 10) };
}

/// Lets thread `tid` (0: the calling thread) run on every CPU the process
/// may use: all of them are asked for, and the kernel keeps those.
pub(crate) fn unrestrict(tid: libc::pid_t) -> std::io::Result<()> {
    let every: Vec<usize> = (0..libc::CPU_SETSIZE as usize).collect();
    set_affinity(tid, &every)
}

/// Puts the calling thread under `policy`. Unprivileged processes may
/// choose `SCHED_BATCH`; where a sandbox forbids it the caller warns.
pub fn apply_policy(policy: SchedPolicy) -> std::io::Result<()> {
    let native = match policy {
        SchedPolicy::Batch => libc::SCHED_BATCH,
        SchedPolicy::Normal => return Ok(()),
    };
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: pid 0 is the calling thread; `param` is a live, initialised
    // struct that the call only reads.
    let rc = unsafe { libc::sched_setscheduler(0, native, &param) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_core_per_allowed_cpu_in_order() {
        assert_eq!(placement(&[0, 1], 2), [Some(0), Some(1)]);
        assert_eq!(placement(&[2, 5, 7], 3), [Some(2), Some(5), Some(7)]);
        assert_eq!(placement(&[3], 1), [Some(3)]);
    }

    #[test]
    fn more_or_fewer_cores_than_cpus_are_left_to_the_kernel() {
        assert_eq!(placement(&[0, 1], 3), [None, None, None]);
        assert_eq!(placement(&[0, 1], 1), [None]);
        assert_eq!(placement(&[2, 5, 7], 2), [None, None]);
        assert_eq!(placement(&[], 1), [None]);
    }

    /// Runs the syscalls on a scratch thread (so the test runner's threads
    /// keep their mask): the allowed set is read, a pin narrows it to one
    /// CPU, and an impossible CPU is an error, not a write out of bounds.
    #[test]
    fn pinning_narrows_the_allowed_set() {
        std::thread::spawn(|| {
            let allowed = allowed_cpus();
            assert!(!allowed.is_empty());
            let last = *allowed.last().unwrap();
            pin(last).unwrap();
            assert_eq!(allowed_cpus(), [last]);
            assert!(pin(libc::CPU_SETSIZE as usize).is_err());
            set_affinity(0, &allowed).unwrap();
            assert_eq!(allowed_cpus(), allowed, "the whole set given back");
            assert!(set_affinity(0, &[]).is_err(), "an empty set is refused");
        })
        .join()
        .unwrap();
    }
}
