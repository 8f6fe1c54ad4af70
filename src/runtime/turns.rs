//! Cores taking turns on a CPU, and pulling a core that waits for another.
//!
//! Under `SCHED_BATCH` (see `sched`) a woken core does not preempt the
//! thread running on its CPU; it waits until that thread runs out of work
//! or the scheduler tick ends its turn (4 ms at HZ=250). Two waits showed
//! in the saturated keep-alive p99:
//!
//! - **Two cores on one CPU** (about half the time unpinned, on two CPUs):
//!   the one running kept it, and every connection of the other waited. Here
//!   each core records the CPU it runs on (`Seats`) on every pass that
//!   served requests, and a core that has not given a turn for `GAP` (2 ms)
//!   and sees another core on its CPU hands its queued answers to the
//!   kernel and yields: the other core runs its pass now.
//! - **A core behind another program** (the load generator or a proxy on
//!   the same machine), which a turn cannot reach: `perf sched` showed a
//!   core waiting 0.5-4 ms behind the load generator while the other core
//!   ran alone on the other CPU. Here a core that sees another not serving
//!   for `STALE` (1 ms) asks the kernel (`/proc`) whether it is runnable and
//!   where; waiting on a different CPU, and still so `CONFIRM` later, it is
//!   moved onto this core's CPU (`sched_setaffinity`) and given a turn, and
//!   it takes back all its CPUs on its next pass. The load generator then
//!   has a CPU to itself, as with one core: GET p99 0.35x (3.8 to 1.3 ms).
//!
//! This module owns those decisions, the table of seats, and the syscalls
//! of a turn and a pull: submitting the core's io_uring (`Ring`),
//! `sched_yield`, reading a core's `/proc` stat, moving it. It must never
//! yield with answers still queued in the ring: they would wait through the
//! other core's turn (one request per connection, yielding before
//! submitting, had 2.13x the p99). So a core whose ring was not found gives
//! no turns, and a turn waits for the tasks its pass woke (the log write,
//! the log sync) to queue their own submissions first. It never fails a
//! request: every step is best effort, and the kernel still decides who
//! runs.

use std::cell::{Cell, RefCell};
use std::fs::File;
use std::future::Future;
use std::os::fd::RawFd;
use std::os::unix::fs::FileExt;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};
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

/// How long a core may go without a pass that served requests before
/// another core looks whether it is waiting for a CPU. A core sharing its
/// CPU with a busy thread passes every 0.1-0.3 ms; one waiting behind it
/// waited 0.5-4 ms (`perf sched`, saturated GETs).
pub const STALE: Duration = Duration::from_millis(1);

/// One core's seat: where it last ran and when, and what another core
/// needs to see whether it waits and to move it.
#[derive(Debug, Default)]
#[repr(align(64))]
struct Seat {
    /// `-1`: not yet known.
    cpu: AtomicI32,
    /// When it last served requests: nanoseconds since `Seats::epoch`
    /// (0: not yet).
    seen: AtomicU64,
    /// Its thread id (0: it cannot be moved).
    tid: AtomicI32,
    /// Another core moved it onto its own CPU; it gives its CPUs back
    /// when it next runs.
    pulled: AtomicBool,
    /// Its `/proc/thread-self/stat`, kept open: a read costs 1 us, where
    /// opening the path each time cost 8 us.
    stat: OnceLock<File>,
}

/// Where each core runs, published by the core itself on each pass that
/// served requests. A core that is waiting for a CPU cannot say where it
/// waits, so a seat can be stale: a core woken onto a busy CPU shows where
/// it ran last. So a core that sees another stale by `STALE` reads the
/// kernel's word on it (`/proc`): waiting on this core's CPU, its seat is
/// corrected and a turn is due; waiting on another CPU (behind a thread
/// that is not a core, which a turn cannot reach), it is moved onto this
/// core's CPU and given a turn.
pub struct Seats {
    epoch: Instant,
    seats: Box<[Seat]>,
}

/// What the kernel says of a thread: its state letter and its CPU.
fn parse_stat(stat: &[u8]) -> Option<(u8, i32)> {
    // "tid (comm) S ppid ...": the name may hold anything, so fields are
    // counted from the last ')'. The state is field 3, the CPU field 39.
    let close = stat.iter().rposition(|&b| b == b')')?;
    let rest = std::str::from_utf8(stat.get(close + 1..)?).ok()?;
    let mut fields = rest.split_ascii_whitespace();
    let state = *fields.next()?.as_bytes().first()?;
    let cpu = fields.nth(35)?.parse().ok()?;
    Some((state, cpu))
}

impl Seats {
    pub fn new(cores: usize) -> Self {
        Seats {
            epoch: Instant::now(),
            seats: (0..cores).map(|_| Seat { cpu: AtomicI32::new(-1), ..Seat::default() }).collect(),
        }
    }

    fn nanos(&self, at: Instant) -> u64 {
        (at.saturating_duration_since(self.epoch).as_nanos() as u64).max(1)
    }

    /// Lets other cores look at and move `core`, the calling thread.
    /// Without it (no `/proc`) the core is only ever seen by its own seat.
    fn enrol(&self, core: usize) {
        let Some(seat) = self.seats.get(core) else { return };
        let Ok(stat) = File::open("/proc/thread-self/stat") else { return };
        if seat.stat.set(stat).is_ok() {
            // SAFETY: no arguments; returns the calling thread's id.
            seat.tid.store(unsafe { libc::gettid() }, Relaxed);
        }
    }

    /// Records that `core` serves requests on `cpu` at `now` (the CPU
    /// stored only when it moved, so the line is not dirtied for it).
    /// Returns whether another core had moved it, so it gives its CPUs back.
    fn sit(&self, core: usize, cpu: i32, now: Instant) -> bool {
        let Some(seat) = self.seats.get(core) else { return false };
        if seat.cpu.load(Relaxed) != cpu {
            seat.cpu.store(cpu, Relaxed);
        }
        seat.seen.store(self.nanos(now), Relaxed);
        seat.pulled.load(Relaxed) && seat.pulled.swap(false, Relaxed)
    }

    /// Whether a core other than `core` was last seen on `cpu`.
    fn shared(&self, core: usize, cpu: i32) -> bool {
        cpu >= 0 && self.seats.iter().enumerate().any(|(i, seat)| i != core && seat.cpu.load(Relaxed) == cpu)
    }

    /// A core other than `core` that served requests once but not for
    /// `STALE`, and that can be looked at; the search starts at core
    /// `from`, so an idle core does not hide the others.
    fn stale(&self, core: usize, now: Instant, from: usize) -> Option<usize> {
        let (n, now) = (self.seats.len(), self.nanos(now));
        (0..n).map(|k| (from + k) % n).find(|&i| {
            let seat = &self.seats[i];
            let seen = seat.seen.load(Relaxed);
            i != core && seen != 0 && now.saturating_sub(seen) >= STALE.as_nanos() as u64 && seat.tid.load(Relaxed) != 0
        })
    }

    /// What the kernel says of core `other`, from a core on `cpu`.
    fn look(&self, other: usize, cpu: i32) -> Sight {
        let Some(seat) = self.seats.get(other) else { return Sight::Away };
        let Some(stat) = seat.stat.get() else { return Sight::Away };
        let mut buf = [0u8; 512];
        let Ok(n) = stat.read_at(&mut buf, 0) else { return Sight::Away };
        match parse_stat(&buf[..n]) {
            // Runnable on this CPU, where this core runs: it waits behind
            // this core, its seat stale.
            Some((b'R', on)) if on == cpu => {
                seat.cpu.store(cpu, Relaxed);
                Sight::Behind
            }
            // Runnable elsewhere: waiting, or running a pass not yet seen.
            Some((b'R', _)) => Sight::Elsewhere(seat.seen.load(Relaxed)),
            _ => Sight::Away,
        }
    }

    /// Moves core `other` onto `cpu`, where the calling core runs. The
    /// thread id is a live core's: cores run for the process's life (a
    /// panic aborts it), and the look just before read it runnable.
    fn pull(&self, other: usize, cpu: i32) -> bool {
        let Some(seat) = self.seats.get(other) else { return false };
        let Ok(me) = usize::try_from(cpu) else { return false };
        if crate::runtime::sched::set_affinity(seat.tid.load(Relaxed), &[me]).is_err() {
            return false;
        }
        seat.pulled.store(true, Relaxed);
        seat.cpu.store(cpu, Relaxed);
        true
    }
}

/// What a look at a stale core found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sight {
    /// Asleep, or not to be looked at: nothing to do.
    Away,
    /// Waiting for this core's CPU.
    Behind,
    /// Runnable on another CPU, last seen serving at this stamp.
    Elsewhere(u64),
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

/// How long after finding a stale core runnable on another CPU it is
/// looked at again: still runnable and still not seen serving, it waits
/// for that CPU (a core just woken there, or running a pass, would have
/// served by then), and is moved.
pub const CONFIRM: Duration = Duration::from_micros(250);

/// When a turn is given: plain logic, so the rule is tested without a
/// scheduler. On a pass that served requests, a turn is due if another
/// core was seen on this CPU and `GAP` has passed since the last; if not,
/// and another core is stale, it is looked at (at most every `STALE`). A
/// core waiting behind this one makes a turn due; one runnable elsewhere
/// is looked at again after `CONFIRM` and, unchanged, pulled here with a
/// turn. A due turn is given `DEFERRALS` polls later.
#[derive(Debug)]
struct Pace {
    /// The last turn.
    last: Instant,
    /// When a stale core may next be looked at.
    next_look: Instant,
    /// A core found runnable on another CPU, and its stamp then.
    suspect: Option<(usize, u64)>,
    /// Where the next search for a stale core starts.
    look_from: usize,
    /// Polls until the due turn (0: none due).
    deferred: u8,
}

/// What the task does on a poll.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// Nothing: wait to be armed.
    Rest,
    /// Ask the kernel whether this (stale) core waits for a CPU.
    Look(usize),
    /// Move this core onto this CPU, then turn.
    Pull(usize),
    /// Re-queue behind what the pass woke.
    Defer,
    /// Submit the ring and yield.
    Turn,
}

impl Pace {
    fn new(now: Instant) -> Self {
        Pace { last: now, next_look: now + STALE, suspect: None, look_from: 0, deferred: 0 }
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

    /// A turn is due now.
    fn due(&mut self, now: Instant) -> Step {
        self.last = now;
        self.deferred = DEFERRALS;
        Step::Defer
    }

    /// A pass that served requests; `shared`: another core was seen on this
    /// CPU; `stale`: a core not seen serving for `STALE`.
    fn consider(&mut self, shared: bool, stale: Option<usize>, now: Instant) -> Step {
        if shared && now.duration_since(self.last) >= GAP {
            return self.due(now);
        }
        match stale {
            Some(core) if now >= self.next_look => {
                self.next_look = now + STALE;
                self.look_from = core + 1;
                Step::Look(core)
            }
            _ => Step::Rest,
        }
    }

    /// What a `Look` at `core` found.
    fn saw(&mut self, core: usize, sight: Sight, now: Instant) -> Step {
        match sight {
            Sight::Away => {
                self.suspect = None;
                Step::Rest
            }
            Sight::Behind => {
                self.suspect = None;
                self.due(now)
            }
            Sight::Elsewhere(stamp) if self.suspect == Some((core, stamp)) => {
                self.suspect = None;
                Step::Pull(core)
            }
            Sight::Elsewhere(stamp) => {
                self.suspect = Some((core, stamp));
                self.next_look = now + CONFIRM;
                Step::Rest
            }
        }
    }
}

/// One core's turn-giving: told of each request (`arm`), acted on by `task`.
pub struct Turns {
    core: usize,
    seats: Arc<Seats>,
    ring: Ring,
    /// The CPUs this core may use, given back after another core moved it.
    allowed: Vec<usize>,
    armed: Cell<bool>,
    pace: RefCell<Pace>,
    waker: RefCell<Option<Waker>>,
}

impl Turns {
    /// For the calling thread, which is core `core`.
    pub fn new(core: usize, seats: Arc<Seats>, ring: Ring) -> Self {
        let allowed = crate::runtime::sched::allowed_cpus();
        // A core that could not give its CPUs back must not be moved.
        if !allowed.is_empty() {
            seats.enrol(core);
        }
        Turns {
            core,
            seats,
            ring,
            allowed,
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

    /// Runs for the core's life: armed, it records this core's seat and
    /// asks `Pace` whether a turn is due.
    pub fn task(self: Rc<Self>) -> impl Future<Output = ()> {
        std::future::poll_fn(move |cx| {
            let mut pace = self.pace.borrow_mut();
            let step = if pace.deferring() {
                pace.next()
            } else if self.armed.replace(false) {
                // SAFETY: no arguments; returns the calling thread's CPU
                // (from glibc's rseq area: no system call).
                let cpu = unsafe { libc::sched_getcpu() };
                let now = Instant::now();
                if self.seats.sit(self.core, cpu, now) {
                    // Moved here by another core: free to go again.
                    let _ = crate::runtime::sched::set_affinity(0, &self.allowed);
                }
                let stale = self.seats.stale(self.core, now, pace.look_from);
                match pace.consider(self.seats.shared(self.core, cpu), stale, now) {
                    Step::Look(other) => match pace.saw(other, self.seats.look(other, cpu), now) {
                        Step::Pull(other) if self.seats.pull(other, cpu) => pace.due(now),
                        Step::Pull(_) => Step::Rest,
                        step => step,
                    },
                    step => step,
                }
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
                Step::Rest | Step::Look(_) | Step::Pull(_) => {}
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
        assert_eq!(pace.consider(false, None, t0 + GAP), Step::Rest, "alone");
        assert_eq!(pace.consider(true, None, t0 + GAP / 2), Step::Rest, "within GAP of the start");
        assert_eq!(pace.consider(true, None, t0 + GAP), Step::Defer);
        assert!(pace.deferring());
        let steps: Vec<Step> = (0..DEFERRALS).map(|_| pace.next()).collect();
        assert_eq!(steps.last(), Some(&Step::Turn));
        assert!(steps[..steps.len() - 1].iter().all(|&s| s == Step::Defer), "{steps:?}");
        assert!(!pace.deferring());
        assert_eq!(pace.consider(true, None, t0 + GAP + GAP / 2), Step::Rest, "within GAP of the turn");
        assert_eq!(pace.consider(true, None, t0 + 2 * GAP), Step::Defer);
    }

    #[test]
    fn a_stale_core_is_looked_at_then_turned_to_or_pulled_once_confirmed() {
        let t0 = Instant::now();
        let mut pace = Pace::new(t0);
        assert_eq!(pace.consider(false, Some(1), t0 + STALE / 2), Step::Rest, "looks wait STALE from the start");
        let t1 = t0 + STALE;
        assert_eq!(pace.consider(false, Some(1), t1), Step::Look(1));
        assert_eq!(pace.saw(1, Sight::Away, t1), Step::Rest, "asleep: nothing to do");
        assert_eq!(pace.consider(false, Some(1), t1 + STALE / 2), Step::Rest, "at most one look per STALE");
        let t2 = t1 + STALE;
        assert_eq!(pace.consider(false, Some(1), t2), Step::Look(1));
        assert_eq!(pace.saw(1, Sight::Behind, t2), Step::Defer, "waiting behind this core: a turn, GAP or not");
        let _ = (0..DEFERRALS).map(|_| pace.next()).last();
        let t3 = t2 + STALE;
        assert_eq!(pace.consider(false, Some(1), t3), Step::Look(1));
        assert_eq!(pace.saw(1, Sight::Elsewhere(7), t3), Step::Rest, "runnable elsewhere: not yet");
        assert_eq!(pace.consider(false, Some(1), t3 + CONFIRM / 2), Step::Rest);
        assert_eq!(pace.consider(false, Some(1), t3 + CONFIRM), Step::Look(1), "looked at again after CONFIRM");
        assert_eq!(pace.saw(1, Sight::Elsewhere(8), t3 + CONFIRM), Step::Rest, "it served meanwhile");
        let t4 = t3 + CONFIRM * 2;
        assert_eq!(pace.consider(false, Some(1), t4), Step::Look(1));
        assert_eq!(pace.saw(1, Sight::Elsewhere(8), t4), Step::Pull(1), "still runnable there, still not serving");
        assert_eq!(pace.consider(true, Some(1), t4 + GAP), Step::Defer, "a due turn comes before a look");
    }

    #[test]
    fn a_core_shares_only_with_another_core_seen_on_its_cpu() {
        let now = Instant::now();
        let seats = Seats::new(3);
        assert!(!seats.shared(0, 1), "nobody is seated yet");
        seats.sit(0, 1, now);
        assert!(!seats.shared(0, 1), "a core's own seat does not count");
        assert!(seats.shared(2, 1), "core 0 is on CPU 1");
        assert!(!seats.shared(2, 0), "nobody is on CPU 0");
        seats.sit(0, 0, now);
        assert!(!seats.shared(2, 1), "core 0 moved to CPU 0");
        assert!(seats.shared(1, 0));
        assert!(!seats.shared(1, -1), "an unknown CPU shares nothing");
        assert!(!seats.sit(7, 5, now), "an unknown core is ignored");
        assert!(!seats.shared(0, 5));
    }

    #[test]
    fn stale_cores_are_found_in_turn_and_only_if_enrolled() {
        let seats = Seats::new(3);
        let t0 = Instant::now();
        for core in 0..3 {
            seats.seats[core].tid.store(100 + core as i32, Relaxed);
        }
        assert_eq!(seats.stale(0, t0 + STALE, 0), None, "a core never seen serving is not stale");
        seats.sit(1, 0, t0);
        seats.sit(2, 0, t0);
        assert_eq!(seats.stale(0, t0 + STALE / 2, 0), None, "seen within STALE");
        assert_eq!(seats.stale(0, t0 + STALE, 0), Some(1));
        assert_eq!(seats.stale(0, t0 + STALE, 2), Some(2), "the search starts where the last ended");
        assert_eq!(seats.stale(0, t0 + STALE, 3), Some(1), "and wraps");
        assert_eq!(seats.stale(1, t0 + STALE, 1), Some(2), "a core is never stale to itself");
        seats.seats[2].tid.store(0, Relaxed);
        assert_eq!(seats.stale(0, t0 + STALE, 2), Some(1), "a core that cannot be moved is not looked at");
    }

    #[test]
    fn the_kernels_word_on_a_thread_is_read_past_any_name() {
        let line = b"4242 (a) R (b) S 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26 27 28 29 30 31 32 33 34 35 36 37 38 39 40";
        assert_eq!(parse_stat(line), Some((b'S', 36)), "state and CPU after the last ')'");
        assert_eq!(parse_stat(b"4242 (x) R 1 2"), None, "too short");
        assert_eq!(parse_stat(b"no name here"), None);
        let own = std::fs::read("/proc/thread-self/stat");
        if let Ok(own) = own {
            // SAFETY: no arguments; returns the calling thread's CPU.
            let cpu = unsafe { libc::sched_getcpu() };
            let (state, on) = parse_stat(&own).unwrap();
            assert_eq!(state, b'R', "the reading thread is running");
            assert!(on >= 0 && cpu >= 0, "{on} {cpu}");
        }
    }

    /// Two real threads: core 1 pinned to one CPU and spinning without
    /// serving, core 0 on another. Core 0 sees it runnable elsewhere, pulls
    /// it onto its own CPU, then sees it waiting there behind itself; core 1
    /// learns it was moved when it next sits.
    #[test]
    fn a_core_waiting_elsewhere_is_pulled_and_told() {
        use crate::runtime::sched;
        let cpus = sched::allowed_cpus();
        if cpus.len() < 2 || File::open("/proc/thread-self/stat").is_err() {
            eprintln!("skipped: needs two CPUs and /proc");
            return;
        }
        let (a, b) = (cpus[0], cpus[1]);
        std::thread::spawn(move || {
            sched::pin(a).unwrap();
            let seats = Arc::new(Seats::new(2));
            let stop = Arc::new(AtomicBool::new(false));
            let (ready_tx, ready) = std::sync::mpsc::channel();
            let spinner = std::thread::spawn({
                let (seats, stop) = (seats.clone(), stop.clone());
                move || {
                    sched::pin(b).unwrap();
                    seats.enrol(1);
                    assert!(!seats.sit(1, b as i32, Instant::now()));
                    ready_tx.send(()).unwrap();
                    while !stop.load(Relaxed) {
                        std::hint::spin_loop();
                    }
                    // SAFETY: no arguments; returns the calling thread's CPU.
                    let cpu = unsafe { libc::sched_getcpu() };
                    let told = seats.sit(1, cpu, Instant::now());
                    (told, sched::allowed_cpus(), seats.sit(1, cpu, Instant::now()))
                }
            });
            ready.recv().unwrap();
            let here = a as i32;
            let stamp = seats.seats[1].seen.load(Relaxed);
            assert_eq!(seats.look(1, here), Sight::Elsewhere(stamp), "spinning on CPU {b}");
            assert!(!seats.shared(0, here));
            assert!(seats.pull(1, here));
            assert!(seats.shared(0, here), "its seat moved with it");
            assert_eq!(seats.look(1, here), Sight::Behind, "now waiting for CPU {a}, where this thread runs");
            stop.store(true, Relaxed);
            let (told, allowed, again) = spinner.join().unwrap();
            assert!(told, "a pulled core learns it was moved");
            assert_eq!(allowed, [a], "moved onto this thread's CPU");
            assert!(!again, "and only once");
            let seats = Arc::new(Seats::new(2));
            let (enrolled_tx, enrolled) = std::sync::mpsc::channel();
            let asleep = std::thread::spawn({
                let seats = seats.clone();
                move || {
                    seats.enrol(1);
                    enrolled_tx.send(()).unwrap();
                    std::thread::park();
                }
            });
            enrolled.recv().unwrap();
            let deadline = Instant::now() + Duration::from_secs(10);
            while seats.look(1, here) != Sight::Away {
                assert!(Instant::now() < deadline, "a parked thread is never seen asleep");
                std::thread::yield_now();
            }
            asleep.thread().unpark();
            asleep.join().unwrap();
        })
        .join()
        .unwrap();
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
