//! Placement: which cores take new connections, so that as few cores as
//! carry the load are awake.
//!
//! Each core has its own `SO_REUSEPORT` listener, and left alone the
//! kernel spreads new connections evenly over them. Below saturation that
//! wakes every core for a share of each batch, and on a machine whose CPUs
//! are busy anyway (a proxy or a load generator beside the server) two
//! busy cores and the other program take turns on too few CPUs: with every
//! connection on one core, the same binary took 0.63x the CPU of a paced
//! GET, 0.83x a set and 0.92x a saturated GET (performance history, round
//! 11). So by default (`-placement pack`) new connections go to the first
//! `k` cores only (a classic BPF program on the listeners' reuseport group
//! draws one of them; unprivileged, and switching it cancels no accept),
//! and `k` follows the load (`Policy`): one more core when an active one
//! is busy and a CPU the process may use stands idle for it; one fewer
//! when the load would fit in fewer at half their time each, or when
//! other programs hold the CPUs a core more would need.
//!
//! A keep-alive connection stays where it was accepted, so when `k`
//! changes the cores holding more than their share ask that many clients
//! to reconnect: the next answer on such a connection carries
//! `Connection: close`, which every HTTP/1.1 client handles by opening a
//! new connection (landing where the program now sends it: a core short
//! of its share takes every new one until it has it). Nothing is cut
//! mid-request; a request the client had already sent behind the closing
//! answer is not read, and the client sends it again on its new
//! connection, as after any keep-alive close. A connection is not asked
//! while another request sits in its buffer. Without the moves, a proxy's
//! pool opened while the server was idle would stay on one core at full
//! load. Moves are capped per tick, and a core is dropped only after the
//! load stayed low for seconds, so a bursty load does not reconnect every
//! client each time.
//!
//! This module owns the policy (pure, unit-tested), the program, the
//! per-core "connections to move" counts and the task on core 0 that reads
//! the load every `TICK`. It must never fail or delay a request: every step
//! is best effort. Where the program cannot be attached (an old kernel, a
//! sandbox) or the load cannot be read (`/proc`), connections are spread
//! over every core, as with `-placement spread`. `RENDEZVOUS_PLACEMENT_START`
//! (a test hook) starts with that many cores active.

use crate::runtime::shared::Shared;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often core 0 reads the load and decides.
pub const TICK: Duration = Duration::from_millis(100);

/// Ticks a change of `k` holds before the next: connections asked to move
/// need a moment to reconnect and show up in the next readings.
const HOLD_TICKS: u32 = 10;

/// The busiest active core's share of busy time above which one more
/// core is wanted, for `GROW_TICKS` ticks in a row (one busy tick is a
/// burst, not a load).
const GROW_BUSY: f64 = 0.85;
const GROW_TICKS: u32 = 3;

/// Idle CPUs (of those the process may use) needed before one more core
/// is activated: another core only helps where a CPU can run it. Beside a
/// load generator that saturates the server, 0.13-0.40 CPUs stood idle with
/// one core active (2 CPUs); a dedicated machine shows about 1.
const GROW_IDLE: f64 = 0.6;

/// A core is dropped when the whole load would fit in one fewer at this
/// share of busy time each, for `SHRINK_TICKS` ticks in a row after a
/// change's hold: a core waiting on the disk for a moment is not a load
/// that went away (under 512 MB/s of log, single ticks dipped below the
/// mark and moved every client of a core back and forth).
const SHRINK_BUSY: f64 = 0.5;
const SHRINK_TICKS: u32 = 50;

/// A core is also dropped when the CPU the server had or could have had
/// (its run time plus the idle CPUs) would not run one more core than
/// that for more than this share of a CPU, for `CROWDED_TICKS` ticks in a
/// row: the other CPUs are busy with other programs (a proxy, a load
/// generator), and more cores only take turns with them. Above the grow
/// condition's own total (0.85 + 0.6), so a core just added is not
/// dropped for it.
const CROWDED_MARGIN: f64 = 0.4;
const CROWDED_TICKS: u32 = 20;

/// After a core was dropped for want of CPUs, no core is added for this
/// many ticks (30 s): a client that speeds up with the server (a load
/// generator beside it) can make one core look short of CPU and two look
/// crowded, and would otherwise have a core added and dropped every few
/// seconds, each time asking clients to reconnect.
const CROWDED_BACKOFF: u32 = 300;

/// A core is added only where the shrink rules would keep it on the same
/// readings, with this much to spare (a CPU's idle time comes in steps of
/// a tenth of a tick).
const GROW_SPARE: f64 = 0.05;

/// The most connections a core is asked to move per tick: `MOVES_MIN`, or
/// a tenth of what it holds if more.
const MOVES_MIN: u64 = 8;

/// How many cores take new connections, from each tick's load.
#[derive(Debug)]
pub struct Policy {
    cores: usize,
    active: usize,
    hold: u32,
    /// Ticks in a row the load would have fitted in one core fewer.
    low: u32,
    /// Ticks in a row the busiest active core was busy.
    high: u32,
    /// Ticks in a row the server could not have run all its active cores.
    crowded: u32,
    /// Ticks left before a core may be added again (`CROWDED_BACKOFF`).
    backoff: u32,
}

impl Policy {
    /// Starts with `active` of `cores` active (held for `HOLD_TICKS`).
    pub fn new(cores: usize, active: usize) -> Policy {
        let cores = cores.max(1);
        Policy {
            cores,
            active: active.clamp(1, cores),
            hold: if active > 1 { HOLD_TICKS } else { 0 },
            low: 0,
            high: 0,
            crowded: 0,
            backoff: 0,
        }
    }

    pub fn active(&self) -> usize {
        self.active
    }

    /// One tick's readings: each core's share of the tick it spent running
    /// (`busy[i]`, 0 to 1) and how many of the CPUs the process may use
    /// stood idle over it. Returns the cores to activate.
    pub fn tick(&mut self, busy: &[f64], idle_cpus: f64) -> usize {
        self.backoff = self.backoff.saturating_sub(1);
        if self.hold > 0 {
            self.hold -= 1;
            return self.active;
        }
        let total: f64 = busy.iter().sum();
        let fits_fewer = self.active > 1 && total < (self.active - 1) as f64 * SHRINK_BUSY;
        self.low = if fits_fewer { self.low + 1 } else { 0 };
        let room = total + idle_cpus;
        let crowded = self.active > 1 && room < (self.active - 1) as f64 + CROWDED_MARGIN;
        self.crowded = if crowded { self.crowded + 1 } else { 0 };
        let busiest = busy.iter().take(self.active).cloned().fold(0.0, f64::max);
        // One more core, where neither shrink rule would take it back on
        // these readings.
        let kept =
            total >= self.active as f64 * SHRINK_BUSY && room >= self.active as f64 + CROWDED_MARGIN + GROW_SPARE;
        let wants_more =
            self.active < self.cores && self.backoff == 0 && busiest > GROW_BUSY && idle_cpus >= GROW_IDLE && kept;
        self.high = if wants_more { self.high + 1 } else { 0 };
        let next = if self.high >= GROW_TICKS {
            self.active + 1
        } else if self.low >= SHRINK_TICKS {
            self.active - 1
        } else if self.crowded >= CROWDED_TICKS {
            self.backoff = CROWDED_BACKOFF;
            self.active - 1
        } else {
            self.active
        };
        if next != self.active {
            self.active = next;
            self.hold = HOLD_TICKS;
            self.low = 0;
            self.high = 0;
            self.crowded = 0;
        }
        self.active
    }
}

/// How many of its connections each core should ask to reconnect this
/// tick, with `open[i]` open on core `i` and the first `active` cores
/// taking new ones: an inactive core all of them, an active one those
/// beyond an even share and a margin (an eighth of it, at least one, so
/// that an even spread never churns), at most `MOVES_MIN` or a tenth of
/// what it holds.
pub fn to_move(open: &[u64], active: usize) -> Vec<u64> {
    let active = active.clamp(1, open.len().max(1));
    let total: u64 = open.iter().sum();
    let share = total.div_ceil(active as u64);
    let margin = (share / 8).max(1);
    open.iter()
        .enumerate()
        .map(|(core, &n)| {
            let excess = if core < active { n.saturating_sub(share + margin) } else { n };
            excess.min(MOVES_MIN.max(n / 10))
        })
        .collect()
}

/// Where the program sends new connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Steer {
    /// To one of the first `n` cores, drawn at random.
    Even(usize),
    /// To this core only: an active core short of its share fills first,
    /// so that clients asked to reconnect land where room was made for
    /// them (drawn at random, half of them would land back where they
    /// were, and be asked again).
    Fill(usize),
}

/// Where new connections should go with `open[i]` open on core `i` and
/// the first `active` cores taking them: the active core furthest below
/// its share (by more than the margin `to_move` allows above it), else
/// all active cores evenly.
pub fn steer(open: &[u64], active: usize) -> Steer {
    let active = active.clamp(1, open.len().max(1));
    if active == 1 {
        return Steer::Even(1);
    }
    let total: u64 = open.iter().sum();
    let share = total / active as u64;
    let margin = (share / 8).max(1);
    let short = open.iter().take(active).enumerate().filter(|(_, &n)| n + margin < share).min_by_key(|(_, &n)| n);
    match short {
        Some((core, _)) => Steer::Fill(core),
        None => Steer::Even(active),
    }
}

/// A core's slot, alone on its cache line: read on every answer by its
/// core, written ten times a second by core 0.
#[derive(Debug, Default)]
#[repr(align(64))]
struct Slot {
    /// Its thread id (0: not yet known).
    tid: AtomicI32,
    /// Connections it should still ask to reconnect.
    to_move: AtomicU64,
    /// Connections asked that have not closed yet (their answers still
    /// being written, then a lingering close): not counted as its own
    /// when the moves are set again, or they would be asked for twice.
    leaving: AtomicU64,
}

/// What the cores share about placement.
#[derive(Debug)]
pub struct Placement {
    slots: Box<[Slot]>,
    /// Cores taking new connections (the exported gauge; every core when
    /// connections are spread).
    active: AtomicU64,
    /// Whether the program is attached (`start`), so the load decides.
    steered: bool,
    /// The CPUs the process may use, read at startup by the main thread
    /// (a core's own mask may be narrowed: pinned, or moved for a turn).
    cpus: Vec<usize>,
}

impl Placement {
    /// `started`: the cores `start` sent new connections to, if it could;
    /// `cpus`: the process's CPUs.
    pub fn new(cores: usize, started: Option<usize>, cpus: Vec<usize>) -> Placement {
        Placement {
            slots: (0..cores).map(|_| Slot::default()).collect(),
            active: AtomicU64::new(started.unwrap_or(cores) as u64),
            steered: started.is_some(),
            cpus,
        }
    }

    /// Whether the load decides which cores take new connections (core 0
    /// then runs `task`).
    pub fn steered(&self) -> bool {
        self.steered
    }

    /// Called by each core's thread as it starts.
    pub fn enrol(&self, core: usize) {
        if let Some(slot) = self.slots.get(core) {
            // SAFETY: no arguments, no pointers; always succeeds.
            slot.tid.store(unsafe { libc::gettid() }, Relaxed);
        }
    }

    /// Whether a connection of `core` that is about to answer should ask
    /// its client to reconnect (taking one from the core's count).
    /// The connection then calls `left` when it closes.
    #[inline]
    pub fn take_one(&self, core: usize) -> bool {
        let Some(slot) = self.slots.get(core) else { return false };
        let taken =
            slot.to_move.load(Relaxed) > 0 && slot.to_move.fetch_update(Relaxed, Relaxed, |n| n.checked_sub(1)).is_ok();
        if taken {
            slot.leaving.fetch_add(1, Relaxed);
        }
        taken
    }

    /// A connection that `take_one` asked to reconnect has closed.
    pub fn left(&self, core: usize) {
        if let Some(slot) = self.slots.get(core) {
            let _ = slot.leaving.fetch_update(Relaxed, Relaxed, |n| n.checked_sub(1));
        }
    }

    /// Cores taking new connections.
    pub fn active(&self) -> u64 {
        self.active.load(Relaxed)
    }
}

/// Attaches the program sending each new connection where `steer` says,
/// to the reuseport group `fd` belongs to (listener i is core i's: they
/// joined the group in that order).
fn attach(fd: RawFd, steer: Steer) -> std::io::Result<()> {
    let code = |c: u32| c as u16;
    let ret = |k: usize| libc::sock_filter { code: code(libc::BPF_RET | libc::BPF_K), jt: 0, jf: 0, k: k as u32 };
    let program: Vec<libc::sock_filter> = match steer {
        Steer::Fill(core) => vec![ret(core)],
        Steer::Even(n) if n <= 1 => vec![ret(0)],
        Steer::Even(n) => vec![
            libc::sock_filter {
                code: code(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS),
                jt: 0,
                jf: 0,
                k: (libc::SKF_AD_OFF + libc::SKF_AD_RANDOM) as u32,
            },
            libc::sock_filter { code: code(libc::BPF_ALU | libc::BPF_MOD | libc::BPF_K), jt: 0, jf: 0, k: n as u32 },
            libc::sock_filter { code: code(libc::BPF_RET | libc::BPF_A), jt: 0, jf: 0, k: 0 },
        ],
    };
    let fprog = libc::sock_fprog { len: program.len() as u16, filter: program.as_ptr().cast_mut() };
    // The kernel copies the program in and keeps no pointer.
    set_socket_option(fd, SO_ATTACH_REUSEPORT_CBPF, &fprog)
}

/// `setsockopt(fd, SOL_SOCKET, name, value)`.
fn set_socket_option<T>(fd: RawFd, name: libc::c_int, value: &T) -> std::io::Result<()> {
    // SAFETY: `value` is a live reference for the call and its size is
    // given; the kernel reads at most that many bytes. `fd` is a socket
    // the caller keeps open for the call.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            name,
            (value as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// `SO_ATTACH_REUSEPORT_CBPF` (Linux 4.5), not exported by `libc` for
/// every target.
const SO_ATTACH_REUSEPORT_CBPF: libc::c_int = 51;

/// A thread's time on a CPU so far, in ns, from its `schedstat` (kept
/// open: read again from the start each time).
fn run_ns(file: &std::fs::File) -> Option<u64> {
    use std::os::unix::fs::FileExt;
    let mut buf = [0u8; 96];
    let n = file.read_at(&mut buf, 0).ok()?;
    std::str::from_utf8(buf.get(..n)?).ok()?.split_whitespace().next()?.parse().ok()
}

/// Opens a core thread's `schedstat`.
fn schedstat(tid: i32) -> Option<std::fs::File> {
    std::fs::File::open(format!("/proc/self/task/{tid}/schedstat")).ok()
}

/// Idle (and I/O wait) time of the CPUs `cpus` so far, in clock ticks, or
/// `None` if `/proc/stat` names none of them (a container's renumbered
/// view). Reads only the `cpu` lines at its top.
fn idle_ticks(cpus: &[usize]) -> Option<u64> {
    use std::io::BufRead;
    let file = std::fs::File::open("/proc/stat").ok()?;
    let (mut idle, mut seen) = (0, false);
    for line in std::io::BufReader::new(file).lines() {
        let line = line.ok()?;
        let Some(rest) = line.strip_prefix("cpu") else { break };
        // `cpu ` (all CPUs) first, then `cpu0`, `cpu1`...
        if !rest.starts_with(|c: char| c.is_ascii_digit()) {
            continue;
        }
        let mut fields = rest.split_whitespace();
        let Some(cpu) = fields.next().and_then(|n| n.parse::<usize>().ok()) else { continue };
        if cpus.contains(&cpu) {
            let f: Vec<u64> = fields.filter_map(|v| v.parse().ok()).collect();
            idle += f.get(3).copied().unwrap_or(0) + f.get(4).copied().unwrap_or(0);
            seen = true;
        }
    }
    seen.then_some(idle)
}

/// Lets the kernel spread new connections again (the program removed,
/// else one spreading evenly): what is left when the load can no longer
/// be read or a program is refused.
fn unsteer(fd: RawFd, cores: usize) {
    let one: libc::c_int = 1;
    if set_socket_option(fd, SO_DETACH_REUSEPORT_BPF, &one).is_err() {
        let _ = attach(fd, Steer::Even(cores));
    }
}

/// Spreads new connections over every core again and stops every move:
/// what the task leaves behind when it cannot go on.
fn give_up(placement: &Placement, fd: RawFd, cores: usize) {
    unsteer(fd, cores);
    placement.active.store(cores as u64, Relaxed);
    for slot in placement.slots.iter() {
        slot.to_move.store(0, Relaxed);
    }
}

/// `SO_DETACH_REUSEPORT_BPF` (Linux 5.3).
const SO_DETACH_REUSEPORT_BPF: libc::c_int = 68;

/// Ticks in a row the load may go unread before the task gives up.
const UNREAD_TICKS: u32 = 10;

/// Sends new connections to one core (of `cores`), before any core
/// accepts: `listener` is core 0's. Returns how many cores take them, or
/// `None` (with a warning) if the kernel refuses the program: connections
/// are then spread evenly.
pub fn start(listener: &impl std::os::fd::AsRawFd, cores: usize, cpus: &[usize]) -> Option<usize> {
    // The load must be readable, or the first core would be the only one.
    // SAFETY: no arguments, no pointers; always succeeds.
    let me = unsafe { libc::gettid() };
    if schedstat(me).as_ref().and_then(run_ns).is_none() || idle_ticks(cpus).is_none() {
        log::warn!("cannot read the cores' load from /proc: new connections are spread evenly over the cores");
        return None;
    }
    // Tests start a server with its connections spread over
    // `RENDEZVOUS_PLACEMENT_START` cores, to see them gathered again.
    let active = std::env::var("RENDEZVOUS_PLACEMENT_START").ok().and_then(|v| v.parse().ok()).unwrap_or(1);
    let active = usize::clamp(active, 1, cores.max(1));
    match attach(listener.as_raw_fd(), Steer::Even(active)) {
        Ok(()) => Some(active),
        Err(e) => {
            log::warn!("cannot steer new connections to the cores that carry the load ({e}): they are spread evenly");
            None
        }
    }
}

/// Core 0's placement task, once `start` attached the program: reads the
/// load every `TICK` and moves `k` and the connections. Stops when
/// `stopped()` says the listener `fd` is gone (shutdown) or when the kernel
/// refuses a new program (the last one stays).
pub async fn task(shared: Arc<Shared>, fd: RawFd, stopped: impl Fn() -> bool) {
    let placement = &shared.placement;
    let cores = shared.stats.len();
    let mut policy = Policy::new(cores, placement.active() as usize);
    // SAFETY: `sysconf` takes no pointers.
    let hz = match unsafe { libc::sysconf(libc::_SC_CLK_TCK) } {
        hz if hz > 0 => hz as f64,
        _ => 100.0,
    };
    let mut files: Vec<Option<std::fs::File>> = (0..cores).map(|_| None).collect();
    let mut last: Option<(Instant, Vec<u64>, u64)> = None;
    let mut steered = Steer::Even(policy.active());
    let mut unread = 0;
    loop {
        monoio::time::sleep(TICK).await;
        if stopped() {
            return;
        }
        if placement.slots.iter().any(|slot| slot.tid.load(Relaxed) == 0) {
            // A core still starting (its log opening): nothing to read yet.
            continue;
        }
        for (file, slot) in files.iter_mut().zip(placement.slots.iter()) {
            if file.is_none() {
                *file = schedstat(slot.tid.load(Relaxed));
            }
        }
        let run = files.iter().map(|f| f.as_ref().and_then(run_ns)).collect::<Option<Vec<u64>>>();
        let (Some(run), Some(idle)) = (run, idle_ticks(&placement.cpus)) else {
            unread += 1;
            if unread >= UNREAD_TICKS {
                log::warn!("cannot read the cores' load from /proc any more: new connections are spread evenly");
                give_up(placement, fd, cores);
                return;
            }
            continue;
        };
        unread = 0;
        let now = Instant::now();
        let mut active = policy.active();
        if let Some((then, run0, idle0)) = last.replace((now, run.clone(), idle)) {
            let secs = now.duration_since(then).as_secs_f64().max(1e-3);
            let busy: Vec<f64> = run.iter().zip(&run0).map(|(a, b)| a.saturating_sub(*b) as f64 / 1e9 / secs).collect();
            let idle_cpus = idle.saturating_sub(idle0) as f64 / hz / secs;
            active = policy.tick(&busy, idle_cpus);
        }
        let open: Vec<u64> = shared
            .stats
            .iter()
            .zip(placement.slots.iter())
            .map(|(s, slot)| s.connections_open.get().saturating_sub(slot.leaving.load(Relaxed)))
            .collect();
        for (slot, n) in placement.slots.iter().zip(to_move(&open, active)) {
            slot.to_move.store(n, Relaxed);
        }
        let next = steer(&open, active);
        if next != steered {
            if let Err(e) = attach(fd, next) {
                log::warn!("cannot steer new connections ({e}): they are spread evenly");
                give_up(placement, fd, cores);
                return;
            }
            steered = next;
        }
        placement.active.store(active as u64, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ticks `p` with the same readings `n` times; returns the last answer.
    fn ticks(p: &mut Policy, n: u32, busy: &[f64], idle: f64) -> usize {
        (0..n).map(|_| p.tick(busy, idle)).last().unwrap_or(p.active())
    }

    #[test]
    fn one_core_until_it_is_busy_and_a_cpu_is_idle() {
        let mut p = Policy::new(2, 1);
        assert_eq!(ticks(&mut p, 100, &[0.5, 0.0], 1.5), 1);
        // Busy, but no CPU to run another core on (a load generator beside it).
        assert_eq!(ticks(&mut p, 100, &[0.95, 0.0], 0.4), 1);
        // Busy with an idle CPU, but only for a burst: still one.
        assert_eq!(ticks(&mut p, GROW_TICKS - 1, &[0.95, 0.0], 1.0), 1);
        assert_eq!(p.tick(&[0.3, 0.0], 1.5), 1);
        assert_eq!(ticks(&mut p, GROW_TICKS - 1, &[0.95, 0.0], 1.0), 1);
        // Sustained: the second core.
        assert_eq!(p.tick(&[0.95, 0.0], 1.0), 2);
        // No more than there are.
        assert_eq!(ticks(&mut p, 100, &[1.0, 1.0], 1.0), 2);
    }

    #[test]
    fn the_busiest_active_core_asks_for_another() {
        // Core 0 saturated while core 1 idles (its connections are quiet).
        let mut p = Policy::new(3, 2);
        ticks(&mut p, HOLD_TICKS, &[0.0, 0.0, 0.0], 0.0);
        assert_eq!(ticks(&mut p, GROW_TICKS, &[1.0, 0.1, 0.0], 1.5), 3);
    }

    #[test]
    fn a_core_is_dropped_when_other_programs_hold_the_cpus() {
        // Two cores busy half the time each, the other CPU's worth taken
        // by a load generator: one core would get as much done.
        let mut p = Policy::new(2, 2);
        ticks(&mut p, HOLD_TICKS, &[0.5, 0.5], 0.1);
        assert_eq!(ticks(&mut p, CROWDED_TICKS - 1, &[0.5, 0.5], 0.1), 2);
        assert_eq!(p.tick(&[0.5, 0.5], 0.1), 1);
        // Alone on the machine, both cores busy: kept.
        let mut p = Policy::new(2, 2);
        assert_eq!(ticks(&mut p, 200, &[1.0, 1.0], 0.0), 2);
        // Just grown on the grow condition's own readings: not dropped.
        let mut p = Policy::new(2, 1);
        assert_eq!(ticks(&mut p, GROW_TICKS, &[0.86, 0.0], 0.6), 2);
        assert_eq!(ticks(&mut p, 200, &[0.86, 0.0], 0.6), 2);
    }

    #[test]
    fn steady_readings_never_add_a_core_the_rules_would_drop() {
        // Two of three active, one hot, 0.8 CPU idle: a third core would
        // be crowded (room 2.0 < 2.4), so none is added.
        let mut p = Policy::new(3, 2);
        assert_eq!(ticks(&mut p, 500, &[0.9, 0.3, 0.0], 0.8), 2);
        // One hot connection, plenty idle: a third core would be dropped
        // as idle (0.95 < 1.0 in all).
        let mut p = Policy::new(3, 2);
        assert_eq!(ticks(&mut p, 500, &[0.9, 0.05, 0.0], 2.0), 2);
    }

    #[test]
    fn a_core_dropped_for_want_of_cpus_is_not_added_back_at_once() {
        // A client that speeds up with the server: one core looks short of
        // CPU, two look crowded.
        let mut p = Policy::new(2, 1);
        assert_eq!(ticks(&mut p, GROW_TICKS, &[0.9, 0.0], 0.6), 2);
        assert_eq!(ticks(&mut p, HOLD_TICKS + CROWDED_TICKS, &[0.62, 0.62], 0.1), 1);
        // The same readings as before the first grow: held off.
        assert_eq!(ticks(&mut p, CROWDED_BACKOFF - 1, &[0.9, 0.0], 0.6), 1);
        assert_eq!(ticks(&mut p, GROW_TICKS, &[0.9, 0.0], 0.6), 2);
    }

    #[test]
    fn a_change_holds_and_a_core_is_dropped_only_after_a_long_lull() {
        let mut p = Policy::new(4, 1);
        assert_eq!(ticks(&mut p, GROW_TICKS, &[0.9, 0.0, 0.0, 0.0], 3.0), 2);
        // Held, whatever the load.
        assert_eq!(ticks(&mut p, HOLD_TICKS, &[1.0, 1.0, 0.0, 0.0], 2.0), 2);
        assert_eq!(ticks(&mut p, GROW_TICKS, &[1.0, 1.0, 0.0, 0.0], 2.0), 3);
        // 0.3 in all fits in one core fewer at half their time, but a core
        // goes only after the hold and SHRINK_TICKS low ticks in a row.
        assert_eq!(ticks(&mut p, HOLD_TICKS + SHRINK_TICKS - 1, &[0.1, 0.1, 0.1, 0.0], 3.5), 3);
        assert_eq!(p.tick(&[0.1, 0.1, 0.1, 0.0], 3.5), 2);
        assert_eq!(ticks(&mut p, HOLD_TICKS + SHRINK_TICKS, &[0.2, 0.1, 0.0, 0.0], 3.5), 1);
        // A busy tick among the low ones starts the count again.
        let mut p = Policy::new(2, 2);
        ticks(&mut p, HOLD_TICKS + SHRINK_TICKS - 1, &[0.1, 0.1], 1.5);
        assert_eq!(p.tick(&[0.5, 0.5], 0.5), 2);
        assert_eq!(ticks(&mut p, SHRINK_TICKS - 1, &[0.1, 0.1], 1.5), 2);
        assert_eq!(p.tick(&[0.1, 0.1], 1.5), 1);
        // Between the marks nothing moves.
        let mut p = Policy::new(2, 2);
        assert_eq!(ticks(&mut p, 200, &[0.4, 0.3], 1.0), 2, "0.7 would not fit in one core at half its time");
    }

    #[test]
    fn moves_what_an_inactive_core_holds_and_an_active_ones_excess() {
        assert_eq!(to_move(&[10, 6], 1), vec![0, 6]);
        // 64 over two: 32 each, with a margin of 4; at most 8 a tick.
        assert_eq!(to_move(&[64, 0], 2), vec![8, 0]);
        assert_eq!(to_move(&[40, 24], 2), vec![4, 0]);
        assert_eq!(to_move(&[36, 28], 2), vec![0, 0], "within the margin");
        // A small pool is spread too: a margin of one.
        assert_eq!(to_move(&[4, 0], 2), vec![1, 0]);
        assert_eq!(to_move(&[3, 1], 2), vec![0, 0]);
        // A tenth of a large core's connections a tick.
        assert_eq!(to_move(&[0, 500], 1), vec![0, 50]);
        assert_eq!(to_move(&[0, 0], 1), vec![0, 0]);
        assert_eq!(to_move(&[5], 1), vec![0]);
    }

    #[test]
    fn a_core_short_of_its_share_fills_first() {
        // After a second core is activated: core 0 sheds, core 1 fills.
        assert_eq!(steer(&[64, 0], 2), Steer::Fill(1));
        assert_eq!(steer(&[40, 24], 2), Steer::Fill(1));
        // Within the margin: evenly.
        assert_eq!(steer(&[34, 30], 2), Steer::Even(2));
        assert_eq!(steer(&[0, 0], 2), Steer::Even(2));
        // The one furthest below; inactive cores never.
        assert_eq!(steer(&[30, 10, 2, 0], 3), Steer::Fill(2));
        assert_eq!(steer(&[10, 10], 1), Steer::Even(1));
    }

    /// Two listeners of one reuseport group, as two cores have.
    fn group() -> (std::net::TcpListener, std::net::TcpListener) {
        let listen = |addr: std::net::SocketAddr| {
            let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
            s.set_reuse_port(true).unwrap();
            s.bind(&addr.into()).unwrap();
            s.listen(64).unwrap();
            s.set_nonblocking(true).unwrap();
            std::net::TcpListener::from(s)
        };
        let first = listen("127.0.0.1:0".parse().unwrap());
        let second = listen(first.local_addr().unwrap());
        (first, second)
    }

    /// Connects `n` times; returns how many each listener accepted.
    fn accepted(pair: &(std::net::TcpListener, std::net::TcpListener), n: usize) -> (usize, usize) {
        let addr = pair.0.local_addr().unwrap();
        let clients: Vec<_> = (0..n).map(|_| std::net::TcpStream::connect(addr).unwrap()).collect();
        let count = |l: &std::net::TcpListener| std::iter::from_fn(|| l.accept().ok()).count();
        let got = (count(&pair.0), count(&pair.1));
        drop(clients);
        got
    }

    #[test]
    fn the_program_steers_new_connections_and_unsteering_spreads_them_again() {
        use std::os::fd::AsRawFd;
        let pair = group();
        let fd = pair.0.as_raw_fd();
        attach(fd, Steer::Fill(1)).unwrap();
        assert_eq!(accepted(&pair, 16), (0, 16));
        attach(fd, Steer::Even(1)).unwrap();
        assert_eq!(accepted(&pair, 16), (16, 0));
        // Drawn at random over both: all 64 on one is a 1 in 2^63 chance.
        attach(fd, Steer::Even(2)).unwrap();
        let (a, b) = accepted(&pair, 64);
        assert!(a > 0 && b > 0 && a + b == 64, "{a} and {b}");
        attach(fd, Steer::Fill(0)).unwrap();
        assert_eq!(accepted(&pair, 16), (16, 0));
        // Unsteered, the kernel hashes each connection's ports again.
        unsteer(fd, 2);
        let (a, b) = accepted(&pair, 64);
        assert!(a > 0 && b > 0 && a + b == 64, "{a} and {b}");
    }

    #[test]
    fn a_core_takes_one_move_at_a_time_and_never_below_zero() {
        let p = Placement::new(2, Some(1), vec![0, 1]);
        assert!(!p.take_one(0));
        p.slots[1].to_move.store(2, Relaxed);
        assert!(p.take_one(1));
        assert!(p.take_one(1));
        assert!(!p.take_one(1));
        assert_eq!(p.slots[1].leaving.load(Relaxed), 2);
        p.left(1);
        p.left(1);
        p.left(1);
        assert_eq!(p.slots[1].leaving.load(Relaxed), 0, "never below zero");
        assert!(!p.take_one(7), "no such core");
    }
}
