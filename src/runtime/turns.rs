//! Cores taking turns on a CPU the kernel made them share.
//!
//! Under `SCHED_BATCH` (see `sched`) a woken core does not preempt the
//! thread running on its CPU. When the kernel has put both cores on one CPU
//! (about half the time unpinned, on two CPUs), the core that runs keeps the
//! CPU until it runs out of work or the scheduler tick ends its turn (4 ms
//! at HZ=250), and every connection of the other core waits that long: the
//! saturated keep-alive p99 was one to three ticks. Here a core that has
//! answered requests in a scheduler pass and finds another core last seen on
//! its CPU hands its answers to the kernel and yields the CPU, at most once
//! every `GAP` (1 ms): the other core runs its pass now rather than at the
//! tick.
//!
//! It must never yield with answers still queued in the ring: they would
//! wait for the other core's whole turn (one request per connection,
//! yielding before submitting, had 2.3x the p99). So with io_uring a turn
//! is given only when this core's ring was found (`Ring`), and its queued
//! submissions go first. It never fails or delays a request otherwise:
//! every step is best effort and the kernel still decides who runs.

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
/// 1.04x the CPU. With 250 us between turns, 1.02x and 1.02x; with 1 ms,
/// another 0.99x the CPU, while saturated keep-alive GETs kept the whole
/// gain (p99 0.99x of the 250 us figure). Each 5 alternated rounds. A
/// core that has kept another from its CPU for a quarter of a tick lets it
/// run.
pub const GAP: Duration = Duration::from_millis(1);

/// The CPU each core last ran on, published by the core itself when it
/// considers giving a turn (`-1`: not yet known).
pub struct Seats {
    cpus: Box<[AtomicI32]>,
}

impl Seats {
    pub fn new(cores: usize) -> Self {
        Seats { cpus: (0..cores).map(|_| AtomicI32::new(-1)).collect() }
    }

    /// Records that `core` runs on `cpu`, and tells whether another core was
    /// last seen there. A stale seat (the other core has since moved, or
    /// sleeps) costs one needless yield, which returns at once when nothing
    /// else is runnable on the CPU.
    pub fn share(&self, core: usize, cpu: i32) -> bool {
        if let Some(seat) = self.cpus.get(core) {
            seat.store(cpu, Relaxed);
        }
        cpu >= 0 && self.cpus.iter().enumerate().any(|(i, seat)| i != core && seat.load(Relaxed) == cpu)
    }
}

/// How a core's answers reach the kernel, for what must happen before it
/// yields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ring {
    /// The core's io_uring: answers queued in a pass are submitted when the
    /// core next enters the kernel, so they must be submitted before a yield.
    Uring(RawFd),
    /// The epoll driver makes each send when its task runs: nothing waits.
    Readiness,
}

impl Ring {
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

    /// Runs `open`, which builds a runtime on the calling thread, and
    /// returns the ring it opened if exactly one was. monoio does not give
    /// its ring's descriptor out, so it is the one new io_uring in
    /// `/proc/self/fd`; every runtime the process builds goes through here,
    /// one at a time, so no other thread's ring can be mistaken for it.
    pub fn opened_by<T>(open: impl FnOnce() -> std::io::Result<T>) -> std::io::Result<(T, Option<Ring>)> {
        static OPENING: Mutex<()> = Mutex::new(());
        let _one_at_a_time = OPENING.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let before = Ring::open_rings();
        let built = open()?;
        let mut new = Ring::open_rings().into_iter().filter(|fd| !before.contains(fd));
        let ring = match (new.next(), new.next()) {
            (Some(fd), None) => Some(Ring::Uring(fd)),
            _ => None,
        };
        Ok((built, ring))
    }

    /// Hands the kernel every submission queued in the ring, without waiting
    /// for any completion. Best effort: what the kernel does not take now
    /// (a full completion queue) the runtime submits when it next parks.
    pub fn submit(self) {
        if let Ring::Uring(fd) = self {
            // SAFETY: `fd` is this thread's own ring (found when the runtime
            // was built, which holds it open for the thread's life) and no
            // pointer is passed: with no flags and no `min_complete` the
            // kernel only consumes the entries the runtime has already
            // published in the shared submission queue (the io-uring crate
            // publishes its tail on every push) and never waits. The
            // runtime reads the queue's head back from the kernel before
            // its own next submit, so no entry is submitted twice.
            unsafe {
                libc::syscall(libc::SYS_io_uring_enter, fd, u32::MAX, 0u32, 0u32, std::ptr::null::<u8>(), 0usize)
            };
        }
    }
}

/// One core's turn-giving: armed by each request, acted on once per pass by
/// `task`.
pub struct Turns {
    core: usize,
    seats: Arc<Seats>,
    ring: Ring,
    armed: Cell<bool>,
    waker: RefCell<Option<Waker>>,
    last: Cell<Instant>,
}

impl Turns {
    pub fn new(core: usize, seats: Arc<Seats>, ring: Ring) -> Self {
        Turns { core, seats, ring, armed: Cell::new(false), waker: RefCell::new(None), last: Cell::new(Instant::now()) }
    }

    /// A request is being served: consider a turn at the end of this pass.
    /// The task is woken once per pass, behind the tasks already queued.
    pub fn arm(&self) {
        if !self.armed.replace(true) {
            if let Some(w) = self.waker.borrow().as_ref() {
                w.wake_by_ref();
            }
        }
    }

    /// Runs for the core's life: each time it is armed, gives a turn if
    /// `GAP` has passed since the last and another core sits on this CPU.
    pub fn task(self: Rc<Self>) -> impl Future<Output = ()> {
        std::future::poll_fn(move |cx| {
            if self.armed.replace(false) {
                let now = Instant::now();
                if now.duration_since(self.last.get()) >= GAP {
                    // SAFETY: no arguments; returns the calling thread's CPU.
                    let cpu = unsafe { libc::sched_getcpu() };
                    if self.seats.share(self.core, cpu) {
                        self.last.set(now);
                        self.ring.submit();
                        // SAFETY: no arguments; only lets another runnable
                        // thread on this CPU run first.
                        unsafe { libc::sched_yield() };
                    }
                }
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
    fn a_core_shares_only_with_another_core_on_its_cpu() {
        let seats = Seats::new(3);
        assert!(!seats.share(0, 1), "nobody else is seated yet");
        assert!(!seats.share(1, 0), "core 0 is on CPU 1");
        assert!(seats.share(2, 1), "core 0 is on CPU 1");
        assert!(seats.share(0, 1), "core 2 is on CPU 1");
        assert!(!seats.share(0, 3), "a core's own seat does not count");
        assert!(!seats.share(1, -1), "an unknown CPU shares nothing");
        assert!(!seats.share(7, 5), "an unknown core is ignored");
    }

    /// The runtime queues an answer's send and submits it only when it
    /// parks; `Ring::submit` must hand it to the kernel at once, so the
    /// peer has it while the task that queued it has not yet been resumed.
    #[test]
    fn submit_hands_queued_sends_to_the_kernel() {
        use monoio::io::AsyncWriteRent;
        use std::io::Read;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut peer = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (ours, _) = listener.accept().unwrap();
        let (mut rt, ring) = crate::runtime::core::build_uring().unwrap();
        let Some(ring) = ring else {
            panic!("the ring's descriptor was not found in /proc/self/fd");
        };
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
