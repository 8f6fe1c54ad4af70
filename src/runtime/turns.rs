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
//!   ran alone on the other CPU. Here each core counts the requests it
//!   begins, and a core that sees another begin none for `STALE` (200 us)
//!   asks the kernel (`/proc`) whether it is runnable and where (a core
//!   found asleep is not looked at again for `AWAY`, 1 ms). Runnable
//!   on a CPU no other core sits on, and still so with the same count
//!   `CONFIRM` later, it is moved onto this core's CPU
//!   (`sched_setaffinity`), given a turn, and given all its CPUs back after
//!   it. The load generator then has a CPU to itself, as with one core:
//!   GET p99 0.43x (3.9 to 1.6 ms) at the same CPU with a look after 1 ms,
//!   and 0.44x again (1.40 to 0.64 ms) after 200 us.
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
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering::Relaxed};
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

/// How long a core may go without beginning a request before another
/// core looks whether it is waiting for a CPU, and the shortest time
/// between two looks. One waiting behind a busy thread waited 0.5-4 ms
/// (`perf sched`, saturated GETs), and every microsecond of it is tail
/// latency: at 1 ms, the saturated GET p99 stayed at 1.40 ms where nginx's
/// was 0.7-1.4 ms; at 200 us it fell to 0.64 ms (0.44x, at 1.00x the CPU; 5
/// alternated rounds). Looks at a core found asleep are bounded by `AWAY`.
pub const STALE: Duration = Duration::from_micros(200);

/// How long a core found asleep (or left to another core's turns) is
/// passed over by the looks. Under load a stale core is almost always
/// waiting for a CPU; one that is asleep is most often idle, and looking
/// at it again every `STALE` would cost a `/proc` read (about 1 us) each
/// time: a single busy connection, which leaves the other core idle, had
/// 4,200 reads a second without this pause and about 950 with it, as
/// before `STALE` was lowered (one `perf stat` count of 4 s each).
pub const AWAY: Duration = Duration::from_millis(1);

/// A value alone on its cache line: a core's writes to its own counter do
/// not evict what the others read on every pass.
#[derive(Debug, Default)]
#[repr(align(64))]
struct Line<T>(T);

/// One core's seat: where it last ran, how far it got, and what another
/// core needs to see whether it waits and to move it.
#[derive(Debug, Default)]
struct Seat {
    /// `-1`: not yet known. Stored only when the core moved, so the line
    /// stays shared while the cores stay put.
    cpu: Line<AtomicI32>,
    /// Requests the core has begun (written by the core alone).
    begun: Line<AtomicU64>,
    /// Its thread id (0: it is not to be moved).
    tid: AtomicI32,
    /// The CPUs it may use, given back after a move.
    allowed: OnceLock<Vec<usize>>,
    /// Its `/proc/thread-self/stat`, kept open: a read costs 1 us, where
    /// opening the path each time cost 8 us.
    stat: OnceLock<File>,
}

/// Where each core runs, published by the core itself on each pass that
/// served requests, and how many requests it has begun. A core that is
/// waiting for a CPU can say neither, so a seat can be stale: a core woken
/// onto a busy CPU shows where it ran last. So a core that sees another
/// begin nothing for `STALE` (`Watch`) reads the kernel's word on it
/// (`/proc`): waiting on this core's CPU, its seat is corrected and a turn
/// is due; runnable on a CPU no other core was seen on (behind a thread a
/// turn cannot reach), it is moved onto this core's CPU for a turn and
/// given its CPUs back after it.
pub struct Seats {
    seats: Box<[Seat]>,
}

/// What the kernel says of a thread: its state letter and its CPU.
fn parse_stat(stat: &[u8]) -> Option<(u8, i32)> {
    // "tid (comm) S ppid ...": the name may hold anything, so fields are
    // counted from the last ')'. The state is field 3, the CPU field 39,
    // and a line cut inside field 39 is refused (no field 40 after it).
    let close = stat.iter().rposition(|&b| b == b')')?;
    let rest = std::str::from_utf8(stat.get(close + 1..)?).ok()?;
    let mut fields = rest.split_ascii_whitespace();
    let state = *fields.next()?.as_bytes().first()?;
    let cpu = fields.nth(35)?.parse().ok()?;
    fields.next()?;
    Some((state, cpu))
}

impl Seats {
    pub fn new(cores: usize) -> Self {
        Seats { seats: (0..cores).map(|_| Seat { cpu: Line(AtomicI32::new(-1)), ..Seat::default() }).collect() }
    }

    /// Lets other cores look at and move `core`, the calling thread, which
    /// may run on `allowed`. Without `/proc` the core is never looked at.
    fn enrol(&self, core: usize, allowed: Vec<usize>) {
        let Some(seat) = self.seats.get(core) else { return };
        let Ok(stat) = File::open("/proc/thread-self/stat") else { return };
        if seat.stat.set(stat).is_ok() && seat.allowed.set(allowed).is_ok() {
            // SAFETY: no arguments; returns the calling thread's id.
            seat.tid.store(unsafe { libc::gettid() }, Relaxed);
        }
    }

    /// Records that `core` runs on `cpu`.
    fn sit(&self, core: usize, cpu: i32) {
        if let Some(seat) = self.seats.get(core) {
            if seat.cpu.0.load(Relaxed) != cpu {
                seat.cpu.0.store(cpu, Relaxed);
            }
        }
    }

    /// Counts a request `core` begins (its own line: a plain store).
    fn begin(&self, core: usize) {
        if let Some(seat) = self.seats.get(core) {
            seat.begun.0.store(seat.begun.0.load(Relaxed).wrapping_add(1), Relaxed);
        }
    }

    /// Requests `core` has begun, if it may be looked at.
    fn begun(&self, core: usize) -> Option<u64> {
        let seat = self.seats.get(core)?;
        (seat.tid.load(Relaxed) != 0).then(|| seat.begun.0.load(Relaxed))
    }

    fn cores(&self) -> usize {
        self.seats.len()
    }

    /// Whether a core other than `core` was last seen on `cpu`.
    fn shared(&self, core: usize, cpu: i32) -> bool {
        cpu >= 0 && self.seats.iter().enumerate().any(|(i, seat)| i != core && seat.cpu.0.load(Relaxed) == cpu)
    }

    /// What the kernel says of core `other`, from a core seated on `cpu`.
    fn look(&self, other: usize, cpu: i32) -> Sight {
        let Some(seat) = self.seats.get(other) else { return Sight::Away };
        let Some(stat) = seat.stat.get() else { return Sight::Away };
        let mut buf = [0u8; 1024];
        let Ok(n) = stat.read_at(&mut buf, 0) else { return Sight::Away };
        match parse_stat(&buf[..n]) {
            // Runnable on this CPU, where this core runs: it waits behind
            // this core, its seat stale.
            Some((b'R', on)) if on == cpu => {
                seat.cpu.0.store(cpu, Relaxed);
                Sight::Behind
            }
            // Runnable where another core was seen (never this one: its
            // seat is `cpu`): that core's turns reach it.
            Some((b'R', on)) if self.shared(other, on) => Sight::Away,
            // Runnable elsewhere: behind another program, or just woken
            // onto an idle CPU, or running something other than requests.
            // A second look `CONFIRM` later leaves out the short cases; a
            // core running over a quarter millisecond of other work is
            // moved like one waiting, and costs one move.
            Some((b'R', _)) => Sight::Elsewhere(seat.begun.0.load(Relaxed)),
            _ => Sight::Away,
        }
    }

    /// Moves core `other` onto `cpu`, where the calling core runs. The
    /// thread id is a live core's: cores run for the process's life (a
    /// panic aborts it), and the look just before read it runnable. A
    /// refusal (a sandbox) means it is never moved again.
    fn pull(&self, other: usize, cpu: i32) -> bool {
        let Some(seat) = self.seats.get(other) else { return false };
        let Ok(me) = usize::try_from(cpu) else { return false };
        if crate::runtime::sched::set_affinity(seat.tid.load(Relaxed), &[me]).is_err() {
            seat.tid.store(0, Relaxed);
            return false;
        }
        seat.cpu.0.store(cpu, Relaxed);
        true
    }

    /// Gives core `other` back the CPUs it may use, after its turn here.
    /// Widening the set does not move it; the kernel may later. If the set
    /// it started with is refused (the cpuset changed), every CPU is given
    /// and the kernel keeps those the process may use.
    fn release(&self, other: usize) {
        let Some(seat) = self.seats.get(other) else { return };
        let Some(allowed) = seat.allowed.get() else { return };
        let tid = seat.tid.load(Relaxed);
        if tid != 0 && crate::runtime::sched::set_affinity(tid, allowed).is_err() {
            let _ = crate::runtime::sched::unrestrict(tid);
        }
    }
}

/// What one core has seen of the others' progress: each one's count of
/// begun requests and when it last changed, by this core's clock. Plain
/// logic: the counts come in as arguments.
#[derive(Debug)]
struct Watch {
    /// Per core: the last count seen and when it changed (`None`: not yet
    /// seen beginning anything).
    seen: Vec<Option<(u64, Instant)>>,
}

impl Watch {
    fn new(cores: usize) -> Self {
        Watch { seen: vec![None; cores] }
    }

    /// Notes core `core`'s count at `now`.
    fn observe(&mut self, core: usize, count: u64, now: Instant) {
        let Some(slot) = self.seen.get_mut(core) else { return };
        match slot {
            Some((c, _)) if *c == count => {}
            _ if count == 0 => {}
            _ => *slot = Some((count, now)),
        }
    }

    /// Whether core `core` began a request once but none for `STALE`.
    fn stale(&self, core: usize, now: Instant) -> bool {
        self.seen.get(core).copied().flatten().is_some_and(|(_, at)| now.saturating_duration_since(at) >= STALE)
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
/// looked at again: still runnable there and still not beginning any
/// request, it waits for that CPU (a core just woken onto an idle CPU, or
/// running, begins one well within that), and is moved. A core that spends
/// longer than `STALE` and this on something other than requests (a
/// snapshot slice, a large log write) can be moved too; that costs one
/// move. At 250 us with `STALE` at 1 ms, the paced GET had the same CPU as
/// at 50 us with 200 us (1.01x, 7 alternated rounds).
pub const CONFIRM: Duration = Duration::from_micros(50);

/// When a turn is given: plain logic, so the rule is tested without a
/// scheduler. On a pass that served requests, a turn is due if another
/// core was seen on this CPU and `GAP` has passed since the last. If not,
/// a stale core (`Watch`) is looked at, at most every `STALE` and in turn
/// (a core found asleep is passed over for `AWAY`): one waiting behind this
/// core makes a turn due; one runnable elsewhere
/// becomes the suspect, looked at again after `CONFIRM` before any other
/// and, unchanged, pulled here with a turn. A due turn is given
/// `DEFERRALS` polls later.
#[derive(Debug)]
struct Pace {
    /// The last turn.
    last: Instant,
    /// When a stale core may next be looked at.
    next_look: Instant,
    /// A core found runnable on another CPU, and its count then.
    suspect: Option<(usize, u64)>,
    /// Where the next search for a stale core starts.
    look_from: usize,
    /// A core moved here, to be given its CPUs back after the turn.
    pulled: Option<usize>,
    /// Cores found asleep, by index: not looked at again before then.
    away: Vec<Option<Instant>>,
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
    /// The pace of one of `cores` cores.
    fn new(now: Instant, cores: usize) -> Self {
        let away = vec![None; cores];
        Pace { last: now, next_look: now, suspect: None, look_from: 0, pulled: None, away, deferred: 0 }
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
    /// CPU; `stale(i)`: core `i` (of `cores`) is stale, never this one.
    fn consider(&mut self, shared: bool, cores: usize, stale: impl Fn(usize) -> bool, now: Instant) -> Step {
        if shared && now.duration_since(self.last) >= GAP {
            return self.due(now);
        }
        if now < self.next_look {
            return Step::Rest;
        }
        if let Some((core, _)) = self.suspect {
            if stale(core) {
                self.next_look = now + STALE;
                return Step::Look(core);
            }
            self.suspect = None;
        }
        let away = |i: usize| self.away.get(i).copied().flatten().is_some_and(|until| now < until);
        match (0..cores).map(|k| (self.look_from + k) % cores).find(|&i| !away(i) && stale(i)) {
            Some(core) => {
                self.next_look = now + STALE;
                self.look_from = core + 1;
                Step::Look(core)
            }
            None => Step::Rest,
        }
    }

    /// What a `Look` at `core` found.
    fn saw(&mut self, core: usize, sight: Sight, now: Instant) -> Step {
        match sight {
            Sight::Away => {
                self.suspect = None;
                if let Some(until) = self.away.get_mut(core) {
                    *until = Some(now + AWAY);
                }
                Step::Rest
            }
            // A turn now, `GAP` or not: waiting for the next turn `GAP`
            // allows took the saturated GET p99 from 0.66 to 3.2 ms.
            Sight::Behind => {
                self.suspect = None;
                self.due(now)
            }
            Sight::Elsewhere(count) if self.suspect == Some((core, count)) => {
                self.suspect = None;
                Step::Pull(core)
            }
            Sight::Elsewhere(count) => {
                self.suspect = Some((core, count));
                self.next_look = now + CONFIRM;
                Step::Rest
            }
        }
    }

    /// `core` was moved here: a turn is due, and its CPUs go back after.
    fn moved(&mut self, core: usize, now: Instant) -> Step {
        self.pulled = Some(core);
        self.due(now)
    }

    /// The turn was given: the core to give its CPUs back, if any.
    fn turned(&mut self) -> Option<usize> {
        self.pulled.take()
    }
}

/// One core's turn-giving: told of each request (`arm`), acted on by `task`.
pub struct Turns {
    core: usize,
    seats: Arc<Seats>,
    ring: Ring,
    armed: Cell<bool>,
    pace: RefCell<Pace>,
    watch: RefCell<Watch>,
    waker: RefCell<Option<Waker>>,
}

impl Turns {
    /// For the calling thread, which is core `core`.
    pub fn new(core: usize, seats: Arc<Seats>, ring: Ring) -> Self {
        let allowed = crate::runtime::sched::allowed_cpus();
        // A core that could not be given its CPUs back is never moved.
        if !allowed.is_empty() {
            seats.enrol(core, allowed);
        }
        let cores = seats.cores();
        Turns {
            core,
            seats,
            ring,
            armed: Cell::new(false),
            pace: RefCell::new(Pace::new(Instant::now(), cores)),
            watch: RefCell::new(Watch::new(cores)),
            waker: RefCell::new(None),
        }
    }

    /// A request is being served: counts it, and wakes the task (queued
    /// behind the tasks already queued) unless it is armed already.
    pub fn arm(&self) {
        self.seats.begin(self.core);
        if !self.armed.replace(true) {
            if let Some(w) = self.waker.borrow().as_ref() {
                w.wake_by_ref();
            }
        }
    }

    /// One armed pass: records this core's seat, watches the others, and
    /// asks `Pace` what to do.
    fn pass(&self, pace: &mut Pace) -> Step {
        // SAFETY: no arguments; returns the calling thread's CPU (from
        // glibc's rseq area where it has one, else the vDSO).
        let cpu = unsafe { libc::sched_getcpu() };
        let now = Instant::now();
        self.seats.sit(self.core, cpu);
        let mut watch = self.watch.borrow_mut();
        for other in (0..self.seats.cores()).filter(|&i| i != self.core) {
            if let Some(count) = self.seats.begun(other) {
                watch.observe(other, count, now);
            }
        }
        let stale = |i: usize| i != self.core && watch.stale(i, now);
        match pace.consider(self.seats.shared(self.core, cpu), self.seats.cores(), stale, now) {
            Step::Look(other) => match pace.saw(other, self.seats.look(other, cpu), now) {
                Step::Pull(other) if self.seats.pull(other, cpu) => pace.moved(other, now),
                Step::Pull(_) => Step::Rest,
                step => step,
            },
            step => step,
        }
    }

    /// Runs for the core's life: armed, it runs a `pass`; a due turn
    /// submits the ring, yields, and gives a pulled core its CPUs back.
    pub fn task(self: Rc<Self>) -> impl Future<Output = ()> {
        std::future::poll_fn(move |cx| {
            let mut pace = self.pace.borrow_mut();
            let step = if pace.deferring() {
                pace.next()
            } else if self.armed.replace(false) {
                self.pass(&mut pace)
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
                    if let Some(other) = pace.turned() {
                        self.seats.release(other);
                    }
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

    const NONE: fn(usize) -> bool = |_| false;

    #[test]
    fn a_turn_is_due_when_shared_and_gap_apart_then_deferred() {
        let t0 = Instant::now();
        let mut pace = Pace::new(t0, 2);
        assert_eq!(pace.consider(false, 2, NONE, t0 + GAP), Step::Rest, "alone");
        assert_eq!(pace.consider(true, 2, NONE, t0 + GAP / 2), Step::Rest, "within GAP of the start");
        assert_eq!(pace.consider(true, 2, NONE, t0 + GAP), Step::Defer);
        assert!(pace.deferring());
        let steps: Vec<Step> = (0..DEFERRALS).map(|_| pace.next()).collect();
        assert_eq!(steps.last(), Some(&Step::Turn));
        assert!(steps[..steps.len() - 1].iter().all(|&s| s == Step::Defer), "{steps:?}");
        assert!(!pace.deferring());
        assert_eq!(pace.turned(), None, "nobody to give CPUs back to");
        assert_eq!(pace.consider(true, 2, NONE, t0 + GAP + GAP / 2), Step::Rest, "within GAP of the turn");
        assert_eq!(pace.consider(true, 2, NONE, t0 + 2 * GAP), Step::Defer);
    }

    #[test]
    fn a_stale_core_is_looked_at_then_turned_to_or_pulled_once_confirmed() {
        let t0 = Instant::now();
        let mut pace = Pace::new(t0, 2);
        let one = |i: usize| i == 1;
        assert_eq!(pace.consider(false, 2, one, t0), Step::Look(1));
        assert_eq!(pace.saw(1, Sight::Away, t0), Step::Rest, "asleep: nothing to do");
        assert_eq!(pace.consider(false, 2, one, t0 + STALE), Step::Rest, "after a core asleep, no look before AWAY");
        assert_eq!(pace.consider(false, 2, one, t0 + AWAY - STALE / 2), Step::Rest);
        let t0 = t0 + AWAY;
        assert_eq!(pace.consider(false, 2, one, t0), Step::Look(1));
        assert_eq!(pace.saw(1, Sight::Behind, t0), Step::Defer, "waiting behind this core: a turn");
        let _ = (0..DEFERRALS).map(|_| pace.next()).last();
        assert_eq!(pace.consider(false, 2, one, t0 + STALE / 2), Step::Rest, "at most one look per STALE");
        let t1 = t0 + STALE;
        assert_eq!(pace.consider(false, 2, one, t1), Step::Look(1));
        assert!(t1 < pace.last + GAP);
        assert_eq!(pace.saw(1, Sight::Behind, t1), Step::Defer, "again, within GAP of the last turn");
        let _ = (0..DEFERRALS).map(|_| pace.next()).last();
        let t2 = t1 + STALE;
        assert_eq!(pace.consider(false, 2, one, t2), Step::Look(1));
        assert_eq!(pace.saw(1, Sight::Elsewhere(7), t2), Step::Rest, "runnable elsewhere: not yet");
        assert_eq!(pace.consider(false, 2, one, t2 + CONFIRM / 2), Step::Rest);
        assert_eq!(pace.consider(false, 2, one, t2 + CONFIRM), Step::Look(1), "looked at again after CONFIRM");
        assert_eq!(pace.saw(1, Sight::Elsewhere(8), t2 + CONFIRM), Step::Rest, "it began a request meanwhile");
        let t3 = t2 + CONFIRM * 2;
        assert_eq!(pace.consider(false, 2, one, t3), Step::Look(1));
        assert_eq!(pace.saw(1, Sight::Elsewhere(8), t3), Step::Pull(1), "still runnable there, still idle");
        assert_eq!(pace.moved(1, t3), Step::Defer, "moved: a turn");
        let steps: Vec<Step> = (0..DEFERRALS).map(|_| pace.next()).collect();
        assert_eq!(steps.last(), Some(&Step::Turn));
        assert_eq!(pace.turned(), Some(1), "its CPUs go back after the turn");
        assert_eq!(pace.turned(), None, "once");
        assert_eq!(pace.consider(true, 2, one, t3 + GAP), Step::Defer, "a due turn comes before a look");
    }

    #[test]
    fn a_suspect_is_confirmed_before_other_stale_cores_are_looked_at() {
        let t0 = Instant::now();
        let mut pace = Pace::new(t0, 3);
        let both = |i: usize| i == 1 || i == 2;
        assert_eq!(pace.consider(false, 3, both, t0), Step::Look(1));
        assert_eq!(pace.saw(1, Sight::Elsewhere(5), t0), Step::Rest);
        let t1 = t0 + CONFIRM;
        assert_eq!(pace.consider(false, 3, both, t1), Step::Look(1), "the suspect first, not core 2");
        assert_eq!(pace.saw(1, Sight::Elsewhere(5), t1), Step::Pull(1));
        let t2 = t1 + STALE;
        assert_eq!(pace.consider(false, 3, both, t2), Step::Look(2), "then the search goes on past it");
        assert_eq!(pace.saw(2, Sight::Away, t2), Step::Rest);
        let t3 = t2 + STALE;
        assert_eq!(pace.consider(false, 3, both, t3), Step::Look(1), "core 2, asleep, is passed over, not core 1");
        assert_eq!(pace.saw(1, Sight::Elsewhere(6), t3), Step::Rest);
        let only_two = |i: usize| i == 2;
        assert_eq!(
            pace.consider(false, 3, only_two, t3 + CONFIRM),
            Step::Rest,
            "a suspect that began again is dropped, and core 2 is still passed over"
        );
        assert_eq!(pace.consider(false, 3, only_two, t2 + AWAY), Step::Look(2), "core 2 again after AWAY");
        assert_eq!(pace.consider(false, 3, NONE, t2 + AWAY + STALE), Step::Rest, "nobody stale");
    }

    #[test]
    fn a_core_is_stale_once_it_began_requests_then_none_for_stale() {
        let t0 = Instant::now();
        let mut watch = Watch::new(3);
        watch.observe(1, 0, t0);
        assert!(!watch.stale(1, t0 + STALE * 10), "a core that never began a request is not stale");
        watch.observe(1, 3, t0);
        assert!(!watch.stale(1, t0 + STALE / 2));
        watch.observe(1, 3, t0 + STALE / 2);
        assert!(watch.stale(1, t0 + STALE), "the same count since t0");
        watch.observe(1, 4, t0 + STALE);
        assert!(!watch.stale(1, t0 + STALE + STALE / 2), "it began one more");
        assert!(!watch.stale(2, t0 + STALE * 10), "never seen");
        watch.observe(7, 1, t0);
        assert!(!watch.stale(7, t0 + STALE), "an unknown core is ignored");
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
        assert_eq!(seats.begun(1), None, "a core not enrolled is not watched");
        seats.begin(1);
        seats.seats[1].tid.store(42, Relaxed);
        assert_eq!(seats.begun(1), Some(1));
    }

    #[test]
    fn the_kernels_word_on_a_thread_is_read_past_any_name() {
        let fields: Vec<String> = (4..=52).map(|f| f.to_string()).collect();
        let line = format!("4242 (a) R (b) S {}", fields.join(" "));
        assert_eq!(parse_stat(line.as_bytes()), Some((b'S', 39)), "state and CPU after the last ')'");
        let cut = format!("4242 (x) R {}", fields[..36].join(" "));
        assert_eq!(parse_stat(cut.as_bytes()), None, "a line cut at the CPU field");
        assert_eq!(parse_stat(b"no name here"), None);
        if let Ok(own) = std::fs::read("/proc/thread-self/stat") {
            let (state, on) = parse_stat(&own).unwrap();
            assert_eq!(state, b'R', "the reading thread is running");
            assert!(on >= 0, "{on}");
        }
    }

    /// Real threads: core 1 pinned to one CPU, runnable and beginning no
    /// request (spinning), core 0 on another CPU. Core 0 sees it runnable
    /// elsewhere, moves it onto its own CPU, then sees it waiting there
    /// behind itself, and gives it its CPUs back; a parked core reads as
    /// away, and one runnable where a third core sits is left to that
    /// core's turns.
    #[test]
    fn a_core_runnable_elsewhere_is_moved_here_and_given_its_cpus_back() {
        use crate::runtime::sched;
        let cpus = sched::allowed_cpus();
        if cpus.len() < 2 || File::open("/proc/thread-self/stat").is_err() {
            eprintln!("skipped: needs two CPUs and /proc");
            return;
        }
        let (a, b) = (cpus[0], cpus[1]);
        std::thread::spawn(move || {
            if sched::pin(a).is_err() {
                eprintln!("skipped: this sandbox refuses pinning");
                return;
            }
            let seats = Arc::new(Seats::new(3));
            let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let (ready_tx, ready) = std::sync::mpsc::channel();
            let spinner = std::thread::spawn({
                let (seats, stop, cpus) = (seats.clone(), stop.clone(), cpus.clone());
                move || {
                    seats.enrol(1, cpus);
                    sched::pin(b).unwrap();
                    seats.sit(1, b as i32);
                    seats.begin(1);
                    ready_tx.send(()).unwrap();
                    while !stop.load(Relaxed) {
                        std::hint::spin_loop();
                    }
                    sched::allowed_cpus()
                }
            });
            ready.recv().unwrap();
            let here = a as i32;
            assert_eq!(seats.look(1, here), Sight::Elsewhere(1), "runnable on CPU {b}");
            seats.sit(2, b as i32);
            assert_eq!(seats.look(1, here), Sight::Away, "CPU {b} has a core of its own: its turns reach it");
            seats.sit(2, -1);
            assert!(!seats.shared(0, here));
            assert!(seats.pull(1, here));
            assert!(seats.shared(0, here), "its seat moved with it");
            assert_eq!(seats.look(1, here), Sight::Behind, "now waiting for CPU {a}, where this thread runs");
            seats.release(1);
            stop.store(true, Relaxed);
            assert_eq!(spinner.join().unwrap(), cpus, "its CPUs given back");

            let seats = Arc::new(Seats::new(2));
            let (enrolled_tx, enrolled) = std::sync::mpsc::channel();
            let asleep = std::thread::spawn({
                let seats = seats.clone();
                move || {
                    seats.enrol(1, vec![a]);
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
