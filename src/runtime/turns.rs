//! Cores taking turns on a CPU the kernel made them share.
//!
//! Under `SCHED_BATCH` (see `sched`) a woken core does not preempt the
//! thread running on its CPU. When the kernel has put two cores on one CPU
//! (about half the time unpinned, on two CPUs), the core that runs keeps the
//! CPU until it runs out of work or the scheduler tick ends its turn (4 ms
//! at HZ=250), and every connection of the other core waits that long: the
//! saturated keep-alive p99 was one to three ticks. Here each core records
//! the CPU it runs on (`Seats`) on every pass that served requests, and a
//! core that has not given a turn for `GAP` (2 ms) and sees another core on
//! its CPU hands its queued answers to the kernel and yields: the other
//! core runs its pass now rather than at the tick.
//!
//! This module owns that decision, the table of seats, and the two
//! syscalls of a turn: submitting the core's io_uring (`Ring`) and
//! `sched_yield`. It must never yield with answers still
//! queued in the ring: they would wait through the other core's turn (one
//! request per connection, yielding before submitting, had 2.13x the p99).
//! So a core whose ring was not found gives no turns, and a turn waits for
//! the tasks its pass woke (the log write, the log sync) to queue their own
//! submissions first. It never fails a request: every step is best effort,
//! and the kernel still decides who runs.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::os::fd::RawFd;
use std::rc::Rc;
use std::sync::atomic::{AtomicI32, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

/// The shortest time between two turns a core gives. Each `sched_yield`
/// pushes the yielding thread's EEVDF deadline one slice further, so a core
/// yielding after every pass loses its CPU to any runnable thread that does
/// not yield (the load generator or proxy beside it): one request per
/// connection, yielding after every pass, had 1.12x (1.02-2.02) the p99 and
/// 1.04x the CPU. And each turn switches the CPU between two cores'
/// working sets: public GETs over 1M keys took 1.03x and 1.04x the CPU
/// (two orders) with a turn every 1 ms. Every 2 ms, 0.99x and 0.98x, at p99
/// 0.65x and 0.67x of no turns (5 alternated rounds each); a core the other
/// sees waits at most half a tick.
pub const GAP: Duration = Duration::from_millis(2);

/// How many times a due turn lets the queue run first: the log task a pass
/// woke, then the sync task the log write woke (`-fsync always`), queue
/// their submissions before the ring is submitted.
const DEFERRALS: u8 = 2;

/// The CPU each core last ran on, published by the core itself on each
/// pass that served requests (`-1`: not yet known). A core that is waiting
/// for a CPU cannot say where it waits, so a seat can be stale: a core
/// woken onto a busy CPU shows where it ran last until it runs again, and
/// that first wait still lasts until the tick. Reading where the other
/// core really is (`/proc/self/task/<tid>/stat`) cost 0.8% of the CPU in a
/// profile of public GETs (8 us a read) for no p99 measurably better.
pub struct Seats {
    cpus: Box<[AtomicI32]>,
}

impl Seats {
    pub fn new(cores: usize) -> Self {
        Seats { cpus: (0..cores).map(|_| AtomicI32::new(-1)).collect() }
    }

    /// Records that `core` runs on `cpu` (a store only when it moved, so
    /// the line stays shared between the cores while they stay put).
    pub fn sit(&self, core: usize, cpu: i32) {
        if let Some(seat) = self.cpus.get(core) {
            if seat.load(Relaxed) != cpu {
                seat.store(cpu, Relaxed);
            }
        }
    }

    /// Whether a core other than `core` was last seen on `cpu`.
    pub fn shared(&self, core: usize, cpu: i32) -> bool {
        cpu >= 0 && self.cpus.iter().enumerate().any(|(i, seat)| i != core && seat.load(Relaxed) == cpu)
    }
}

/// How a core's answers reach the kernel, for what must happen before it
/// yields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ring(Kind);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// The core's io_uring: answers queued in a pass are submitted when the
    /// core next enters the kernel, so they must be submitted before a yield.
    Uring(RawFd),
    /// The epoll driver makes each send when its task runs: nothing waits.
    Readiness,
}

impl Ring {
    pub const READINESS: Ring = Ring(Kind::Readiness);

    /// The io_uring descriptors open in this process.
    fn open_rings() -> Vec<RawFd> {
        let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
            return Vec::new();
        };
        dir.flatten()
            .filter(|e| std::fs::read_link(e.path()).is_ok_and(|l| l.as_os_str() == "anon_inode:[io_uring]"))
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
            .collect()
    }

    /// Runs `open`, which builds an io_uring runtime on the calling thread,
    /// and returns the ring it opened if exactly one was. monoio does not
    /// give its ring's descriptor out, so it is the one new io_uring in
    /// `/proc/self/fd`; every io_uring runtime the process builds goes
    /// through here, one at a time, so no other thread's ring can be taken
    /// for it. `None` (no `/proc`, a reused number) only means no turns.
    pub fn opened_by<T>(open: impl FnOnce() -> std::io::Result<T>) -> std::io::Result<(T, Option<Ring>)> {
        static OPENING: Mutex<()> = Mutex::new(());
        let _one_at_a_time = OPENING.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let before = Ring::open_rings();
        let built = open()?;
        let mut new = Ring::open_rings().into_iter().filter(|fd| !before.contains(fd));
        let ring = match (new.next(), new.next()) {
            (Some(fd), None) => Some(Ring(Kind::Uring(fd))),
            _ => None,
        };
        Ok((built, ring))
    }

    /// Hands the kernel every submission queued in the ring, without waiting
    /// for any completion. Best effort: what the kernel does not take now
    /// (a full completion queue) the runtime submits when it next parks.
    pub fn submit(self) {
        if let Kind::Uring(fd) = self.0 {
            let (fd, all, none) = (fd as libc::c_long, libc::c_long::from(u32::MAX), 0 as libc::c_long);
            // SAFETY: `fd` is this thread's own ring (found when its runtime
            // was built; the runtime holds it open for the thread's life)
            // and no pointer is passed: with no flags and no `min_complete`
            // the kernel never waits and only consumes entries the runtime
            // has already published in the shared submission queue (monoio
            // pushes through a short-lived io-uring `SubmissionQueue`, whose
            // drop publishes the tail, inside synchronous driver code, so a
            // task never sees a half-written entry). The kernel caps the
            // count at what is queued, and the runtime reads the queue's
            // head back from the kernel before its own next submit, so no
            // entry is submitted twice.
            unsafe { libc::syscall(libc::SYS_io_uring_enter, fd, all, none, none, std::ptr::null::<u8>(), none) };
        }
    }
}

/// When a turn is given: plain logic, so the rule is tested without a
/// scheduler. A turn is considered on a pass that served requests; it is
/// due if another core was seen on this CPU and `GAP` has passed since the
/// last, and then given `DEFERRALS` polls later.
#[derive(Debug)]
struct Pace {
    last: Instant,
    /// Polls until the due turn (0: none due).
    deferred: u8,
}

/// What the task does on a poll.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// Nothing: wait to be armed.
    Rest,
    /// Re-queue behind what the pass woke.
    Defer,
    /// Submit the ring and yield.
    Turn,
}

impl Pace {
    fn new(now: Instant) -> Self {
        Pace { last: now, deferred: 0 }
    }

    fn deferring(&self) -> bool {
        self.deferred > 0
    }

    /// One poll while a turn is due.
    fn next(&mut self) -> Step {
        self.deferred = self.deferred.saturating_sub(1);
        if self.deferred == 0 {
            Step::Turn
        } else {
            Step::Defer
        }
    }

    /// A pass that served requests; `shared`: another core was seen on this
    /// CPU. The clock is read only then (most passes of most cores share
    /// nothing).
    fn consider(&mut self, shared: bool, now: impl FnOnce() -> Instant) -> Step {
        if !shared {
            return Step::Rest;
        }
        let now = now();
        if now.duration_since(self.last) < GAP {
            return Step::Rest;
        }
        self.last = now;
        self.deferred = DEFERRALS;
        Step::Defer
    }
}

/// One core's turn-giving: told of each request (`arm`), acted on by `task`.
pub struct Turns {
    core: usize,
    seats: Arc<Seats>,
    ring: Ring,
    armed: Cell<bool>,
    pace: RefCell<Pace>,
    waker: RefCell<Option<Waker>>,
}

impl Turns {
    /// For the calling thread, which is core `core`.
    pub fn new(core: usize, seats: Arc<Seats>, ring: Ring) -> Self {
        Turns {
            core,
            seats,
            ring,
            armed: Cell::new(false),
            pace: RefCell::new(Pace::new(Instant::now())),
            waker: RefCell::new(None),
        }
    }

    /// A request is being served: wakes the task (queued behind the tasks
    /// already queued) unless it is armed already.
    pub fn arm(&self) {
        if !self.armed.replace(true) {
            if let Some(w) = self.waker.borrow().as_ref() {
                w.wake_by_ref();
            }
        }
    }

    /// Runs for the core's life: armed, it records this core's CPU and asks
    /// `Pace` whether a turn is due.
    pub fn task(self: Rc<Self>) -> impl Future<Output = ()> {
        std::future::poll_fn(move |cx| {
            let mut pace = self.pace.borrow_mut();
            let step = if pace.deferring() {
                pace.next()
            } else if self.armed.replace(false) {
                // SAFETY: no arguments; returns the calling thread's CPU
                // (from glibc's rseq area: no system call).
                let cpu = unsafe { libc::sched_getcpu() };
                self.seats.sit(self.core, cpu);
                pace.consider(self.seats.shared(self.core, cpu), Instant::now)
            } else {
                Step::Rest
            };
            match step {
                Step::Defer => {
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
                Step::Turn => {
                    // Requests armed it meanwhile without waking it; the
                    // next one arms it again.
                    self.armed.set(false);
                    self.ring.submit();
                    // SAFETY: no arguments; only lets another runnable thread
                    // on this CPU run first.
                    unsafe { libc::sched_yield() };
                }
                Step::Rest => {}
            }
            let mut w = self.waker.borrow_mut();
            if !w.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                *w = Some(cx.waker().clone());
            }
            Poll::Pending
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_turn_is_due_when_shared_and_gap_apart_then_deferred() {
        let t0 = Instant::now();
        let mut pace = Pace::new(t0);
        let unread = || -> Instant { panic!("the clock is read only when another core shares the CPU") };
        assert_eq!(pace.consider(false, unread), Step::Rest);
        assert_eq!(pace.consider(true, || t0 + GAP / 2), Step::Rest, "within GAP of the start");
        assert_eq!(pace.consider(true, || t0 + GAP), Step::Defer);
        assert!(pace.deferring());
        let steps: Vec<Step> = (0..DEFERRALS).map(|_| pace.next()).collect();
        assert_eq!(steps.last(), Some(&Step::Turn));
        assert!(steps[..steps.len() - 1].iter().all(|&s| s == Step::Defer), "{steps:?}");
        assert!(!pace.deferring());
        assert_eq!(pace.consider(true, || t0 + GAP + GAP / 2), Step::Rest, "within GAP of the turn");
        assert_eq!(pace.consider(true, || t0 + 2 * GAP), Step::Defer);
    }

    #[test]
    fn a_core_shares_only_with_another_core_seen_on_its_cpu() {
        let seats = Seats::new(3);
        assert!(!seats.shared(0, 1), "nobody is seated yet");
        seats.sit(0, 1);
        assert!(!seats.shared(0, 1), "a core's own seat does not count");
        assert!(seats.shared(2, 1), "core 0 is on CPU 1");
        assert!(!seats.shared(2, 0), "nobody is on CPU 0");
        seats.sit(0, 0);
        assert!(!seats.shared(2, 1), "core 0 moved to CPU 0");
        assert!(seats.shared(1, 0));
        assert!(!seats.shared(1, -1), "an unknown CPU shares nothing");
        seats.sit(7, 5);
        assert!(!seats.shared(0, 5), "an unknown core is ignored");
    }

    /// The runtime queues an answer's send and submits it only when it
    /// parks; `Ring::submit` must hand it to the kernel at once, so the
    /// peer has it while the task that queued it has not yet been resumed.
    #[test]
    fn submit_hands_queued_sends_to_the_kernel() {
        use monoio::io::AsyncWriteRent;
        use std::io::Read;
        if std::fs::read_dir("/proc/self/fd").is_err() {
            eprintln!("skipped: no /proc to find the ring in");
            return;
        }
        let Ok((mut rt, ring)) = crate::runtime::core::build_uring() else {
            eprintln!("skipped: io_uring is not available here");
            return;
        };
        let Some(ring) = ring else {
            panic!("the ring's descriptor was not found in /proc/self/fd");
        };
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut peer = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (ours, _) = listener.accept().unwrap();
        rt.block_on(async move {
            let mut ours = monoio::net::TcpStream::from_std(ours).unwrap();
            let write = ours.write(b"answer".to_vec());
            let mut write = std::pin::pin!(write);
            let mut cx = std::task::Context::from_waker(Waker::noop());
            assert!(write.as_mut().poll(&mut cx).is_pending(), "queued, not yet submitted");
            peer.set_nonblocking(true).unwrap();
            let mut got = [0u8; 16];
            let early = peer.read(&mut got);
            assert!(early.is_err_and(|e| e.kind() == std::io::ErrorKind::WouldBlock), "sent before any submit");
            ring.submit();
            peer.set_nonblocking(false).unwrap();
            peer.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let n = peer.read(&mut got).unwrap();
            assert_eq!(&got[..n], b"answer");
            let (res, _) = write.await;
            assert_eq!(res.unwrap(), 6);
        });
    }
}
