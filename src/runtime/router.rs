//! Getting a command applied to the state that holds its key, and the
//! answer back.
//!
//! Ownership: `mesh::Routing::owner(key)`, a randomly seeded SipHash shared
//! by all cores (independent of each shard's table hash). The client's
//! rate-limit charge is taken first, on the core the request arrived on,
//! from the buckets every core shares (`state::ratelimit`): a refused
//! request never leaves its core.
//!
//! Protocol (after Seastar/Dragonfly, with shared-nothing relaxed where a
//! message cost more than a lock):
//! - A local owner is applied inline, with no message.
//! - A write for another core's key is applied here, under that shard's
//!   lock (`try_lock`: never waited for), and journaled in this core's log
//!   (`apply_direct`). A plain GET of another core's key is first tried as
//!   a direct read of its shard (`cells::Cells::read`).
//! - Otherwise (the lock was taken, a blocking read, a cancellation, a read
//!   the owner must answer) the command goes into a per-destination outbox
//!   and the caller awaits a core-local completion slot. One flusher task
//!   per core sends each non-empty outbox as one batch (one channel send, at
//!   most one wake per destination per scheduler pass). Each core's inbox
//!   task drains its `crossbeam-channel` receiver, applies calls, and queues
//!   the replies the same way; replies complete slots, so a connection task
//!   is only ever woken by its own core.
//!
//! Every answer waits for this core's log (`after_log`): the log task
//! appends everything journaled in the scheduler pass with one write (with
//! persistence off, nothing waits). A change for a pipelining client (more
//! requests buffered behind it) is written at once instead: its connection
//! can take nothing else meanwhile, so waiting would batch nothing. An
//! answer about a key whose last change sits in another core's log, not yet
//! acknowledged, is also held for that log (`hold`; see `state::unacked`):
//! the other log's task wakes this core's inbox task when it moves, which
//! releases it.
//!
//! Channels are unbounded and only `try_recv`/`send` are used, so no
//! executor ever blocks; back-pressure is a per-destination in-flight budget
//! on the sender side. The inbox, flusher and log tasks never wake
//! themselves (monoio 0.2.4 runs self-waking tasks ahead of others): each
//! registers its waker, does its work, and returns Pending.
//! This module must never hold a `RefCell` borrow or a lock across an
//! `.await`.

use crate::runtime::cells::Cells;
use crate::runtime::mesh::{Control, Mesh, Msg, Routing};
use crate::runtime::shared::Shared;
use crate::runtime::slots::{Credits, Slots};
use crate::runtime::wal::{Host, Settled, Wal};
use crate::state::command::{Applier, Op, Origin, Owned, Reply, Wakeups};
use crate::state::ratelimit::{Aim, Charge, Limiter, Periods};
use crate::state::record::Journal;
use crate::state::shard::KeyBudget;
use crate::state::unacked::Dependencies;
use crate::state::waiters::WaitFor;
use crossbeam_channel::Receiver;
use std::cell::{Cell, RefCell};
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

/// Calls one core may have outstanding towards another before its
/// connections wait for replies.
const IN_FLIGHT_BUDGET: u32 = 4096;

/// Per-core counters of cross-core traffic.
#[derive(Debug, Default, Clone, Copy)]
pub struct TrafficStats {
    pub calls_sent: u64,
    pub batches_sent: u64,
    pub calls_received: u64,
    /// GETs of another core's key answered from its shard without a message.
    pub direct_reads: u64,
    /// Writes to another core's key applied here, without a message.
    pub direct_writes: u64,
    /// Answers that waited for another core's log.
    pub answers_held: u64,
}

/// An answer waiting for other cores' logs (then for this core's, at `lsn`).
struct Held {
    deps: Dependencies,
    lsn: u64,
    origin: Origin,
    reply: Reply,
}

/// One core's end of the mesh, plus the state that core owns.
pub struct Router {
    me: usize,
    routing: Routing,
    mesh: Arc<Mesh>,
    rx: Receiver<Vec<Msg>>,
    /// Every core's state; this core changes only `cells[me]`.
    cells: Arc<Cells>,
    budget: Arc<KeyBudget>,
    limiter: Arc<Limiter>,
    periods: Periods,
    outboxes: RefCell<Vec<Vec<Msg>>>,
    flush_pending: Cell<bool>,
    flusher: RefCell<Option<Waker>>,
    /// Something was journaled that the log task has yet to append.
    log_pending: Cell<bool>,
    log_waker: RefCell<Option<Waker>>,
    slots: RefCell<Slots<Reply>>,
    credits: RefCell<Credits>,
    controls: RefCell<std::collections::VecDeque<Control>>,
    control_waker: RefCell<Option<Waker>>,
    stats: Cell<TrafficStats>,
    /// This core's log (`None` without persistence).
    wal: Option<Rc<Wal>>,
    /// Records of the changes this core applied, to any shard, not yet
    /// handed to its log.
    journal: RefCell<Journal>,
    /// Answers waiting for other cores' logs.
    held: RefCell<Vec<Held>>,
}

impl Router {
    /// Core `me`'s router: what it shares with the other cores comes from `shared`.
    pub fn new(me: usize, shared: &Shared, rx: Receiver<Vec<Msg>>, wal: Option<Rc<Wal>>) -> Rc<Self> {
        let n = shared.routing.cores();
        Rc::new(Router {
            me,
            routing: shared.routing.clone(),
            mesh: shared.mesh.clone(),
            rx,
            cells: shared.cells.clone(),
            budget: shared.budget.clone(),
            limiter: shared.limiter.clone(),
            periods: shared.periods,
            outboxes: RefCell::new((0..n).map(|_| Vec::new()).collect()),
            flush_pending: Cell::new(false),
            flusher: RefCell::new(None),
            log_pending: Cell::new(false),
            log_waker: RefCell::new(None),
            slots: RefCell::new(Slots::default()),
            credits: RefCell::new(Credits::new(n, IN_FLIGHT_BUDGET)),
            controls: RefCell::new(std::collections::VecDeque::new()),
            control_waker: RefCell::new(None),
            stats: Cell::new(TrafficStats::default()),
            journal: RefCell::new(if wal.is_some() { Journal::enabled() } else { Journal::default() }),
            wal,
            held: RefCell::new(Vec::new()),
        })
    }

    pub fn me(&self) -> usize {
        self.me
    }

    pub fn wal(&self) -> Option<&Rc<Wal>> {
        self.wal.as_ref()
    }

    pub fn periods(&self) -> &Periods {
        &self.periods
    }

    pub fn stats(&self) -> TrafficStats {
        self.stats.get()
    }

    /// Bumps this core's traffic counters.
    fn count(&self, f: impl FnOnce(&mut TrafficStats)) {
        let mut s = self.stats.get();
        f(&mut s);
        self.stats.set(s);
    }

    /// Runs `f` on this core's owned state (sweeps, metrics, snapshots).
    pub fn with_owned<R>(&self, f: impl FnOnce(&mut Owned, &KeyBudget) -> R) -> R {
        f(&mut self.cells.lock(self.me), &self.budget)
    }

    /// Applies a command to this core's state at `now_ms` (see `finish_apply`).
    fn apply_local(&self, op: Op, now_ms: u64) -> (Reply, u64, Dependencies) {
        let mut wakeups = Vec::new();
        let (reply, deps, changed) = self.apply_to(&mut self.cells.lock(self.me), op, now_ms, &mut wakeups);
        (reply, self.finish_apply(changed, wakeups), deps)
    }

    /// Applies a write to another core's shard here, journaled in this
    /// core's log, if its lock is free and this core's log is writable
    /// (`Err` gives the write back: send it to the owner). This takes the
    /// cross-core hop off a write: no message, no owner wake-up, no reply.
    fn apply_direct(&self, owner: usize, op: Op, now_ms: u64) -> Result<(Reply, u64, Dependencies), Op> {
        if self.journal.borrow().refusing() {
            // This core's log is failing; the owner's may not be.
            return Err(op);
        }
        let mut wakeups = Vec::new();
        let (reply, deps, changed) = match self.cells.try_lock(owner) {
            Some(mut owned) => self.apply_to(&mut owned, op, now_ms, &mut wakeups),
            None => return Err(op),
        };
        self.count(|s| s.direct_writes += 1);
        Ok((reply, self.finish_apply(changed, wakeups), deps))
    }

    /// Applies `op` to a locked core state with this core's journal, at
    /// `now_ms` (a clock reading from before the lock: the request's, or
    /// the inbox batch's; `Owned::note_time` keeps the shard's times in
    /// order for what an answer waits for).
    /// Returns the reply, the other logs it waits for, and whether anything
    /// was journaled.
    fn apply_to(&self, owned: &mut Owned, op: Op, now_ms: u64, wakeups: &mut Wakeups) -> (Reply, Dependencies, bool) {
        let mut journal = self.journal.borrow_mut();
        let before = journal.lsn();
        let acked = |log| self.cells.acked(log);
        let mut by = Applier { core: self.me, journal: &mut journal, now_ms, budget: &self.budget, acked: &acked };
        let applied = owned.apply(op, &mut by, wakeups);
        (applied.reply, applied.deps, journal.lsn() != before)
    }

    /// After an apply: delivers the answers of any waiters it woke (here,
    /// or to their cores) once this core's log has the change, and asks the
    /// log task to write what was journaled (`log_soon`). Returns the log
    /// position the command's own answer waits for.
    fn finish_apply(&self, changed: bool, wakeups: Wakeups) -> u64 {
        let lsn = self.journal.borrow().lsn();
        for (origin, answer) in wakeups {
            self.deliver_after(lsn, origin, answer);
        }
        if changed {
            self.log_soon();
        }
        lsn
    }

    /// Writes what this core journaled to its log now (and releases the
    /// answers that waited for it).
    fn append_now(&self) {
        if let Some(wal) = &self.wal {
            wal.append(self);
        }
    }

    /// Asks the log task to append what this core journaled, once this
    /// scheduler pass has run the tasks already woken: every change applied
    /// meanwhile (by this core's connections and from other cores' batches)
    /// shares one write. Answers wait for it (`after_log`/`deliver_after`).
    fn log_soon(&self) {
        if self.wal.is_some() && !self.log_pending.replace(true) {
            if let Some(w) = self.log_waker.borrow().as_ref() {
                w.wake_by_ref();
            }
        }
    }

    /// Delivers an answer to its slot, here or on another core.
    pub fn deliver(&self, origin: Origin, reply: Reply) {
        if origin.core as usize == self.me {
            self.complete(origin.slot, reply);
        } else {
            self.push(origin.core as usize, Msg::Done { slot: origin.slot, reply });
        }
    }

    /// Delivers an answer once log position `lsn` is acknowledged.
    fn deliver_after(&self, lsn: u64, origin: Origin, reply: Reply) {
        let Some(wal) = &self.wal else { return self.deliver(origin, reply) };
        match wal.settle(lsn, reply) {
            Settled::Now(reply) => self.deliver(origin, reply),
            Settled::Wait(reply) => wal.defer(lsn, origin, reply),
        }
    }

    /// The reply, once this core's log position `lsn` and the other logs'
    /// `deps` are acknowledged.
    async fn answer(self: &Rc<Self>, lsn: u64, deps: Dependencies, reply: Reply) -> Reply {
        // Held (and counted) only if another log still has to move.
        if self.cells.settled(&deps) {
            return self.after_log(lsn, reply).await;
        }
        let slot = self.slots.borrow_mut().alloc(None);
        self.hold(Held { deps, lsn, origin: Origin { core: self.me as u32, slot }, reply });
        SlotFuture { router: self, slot, done: false }.await
    }

    /// Delivers `reply` to `origin` once this core's log position `lsn` and
    /// the other logs' `deps` are acknowledged.
    fn deliver_when(&self, lsn: u64, deps: Dependencies, origin: Origin, reply: Reply) {
        if self.cells.settled(&deps) {
            self.deliver_after(lsn, origin, reply);
        } else {
            self.hold(Held { deps, lsn, origin, reply });
        }
    }

    /// Holds an answer until other logs move; their log tasks wake this
    /// core's inbox task, which releases it (`release_held`).
    fn hold(&self, held: Held) {
        self.count(|s| s.answers_held += 1);
        self.held.borrow_mut().push(held);
        // Watches are set before looking again: a log that moved meanwhile
        // is seen now, one that moves later wakes us.
        self.release_held();
    }

    /// Passes on every held answer whose other logs are acknowledged, and
    /// watches the logs the rest wait for.
    fn release_held(&self) {
        let ready: Vec<Held> = {
            let mut held = self.held.borrow_mut();
            if held.is_empty() {
                return;
            }
            for h in held.iter() {
                for &(log, _) in &h.deps {
                    self.cells.watch(log, self.me);
                }
            }
            let (ready, waiting) = std::mem::take(&mut *held).into_iter().partition(|h| self.cells.settled(&h.deps));
            *held = waiting;
            ready
        };
        for h in ready {
            self.deliver_after(h.lsn, h.origin, h.reply);
        }
    }

    /// The reply, once log position `lsn` is acknowledged.
    async fn after_log(self: &Rc<Self>, lsn: u64, reply: Reply) -> Reply {
        let Some(wal) = &self.wal else { return reply };
        match wal.settle(lsn, reply) {
            Settled::Now(reply) => reply,
            Settled::Wait(reply) => {
                let slot = self.slots.borrow_mut().alloc(None);
                wal.defer(lsn, Origin { core: self.me as u32, slot }, reply);
                SlotFuture { router: self, slot, done: false }.await
            }
        }
    }

    /// Answers every parked waiter at once (shutdown). Returns how many.
    pub fn release_waiters(&self, reply: impl Fn() -> Reply) -> usize {
        let mut out = Vec::new();
        let n = self.cells.lock(self.me).waiters.drain_all(&mut out);
        for origin in out {
            self.deliver(origin, reply());
        }
        n
    }

    /// Locates `client`'s rate-limit buckets and starts fetching them
    /// (`Limiter::aim`): call it as soon as the client is known.
    pub fn aim(&self, client: u64) -> Aim {
        self.limiter.aim(client)
    }

    /// Takes the client's tokens, here and now: `Err` is the refusal.
    fn charge(&self, charge: Option<Charge>) -> Result<(), Reply> {
        let Some(c) = charge else { return Ok(()) };
        self.limiter.charge_aimed(&c.aim, c.cost, c.epoch).map_err(Reply::Limited)
    }

    /// Charges the client (if `charge`) and applies `op` on its key's core.
    /// `pipelined`: the client has more requests buffered behind this one. Its
    /// change is then written to the log at once (here, or with the owner's
    /// inbox batch) instead of with the pass's other changes: the connection
    /// cannot take its next request before this answer, so waiting for the
    /// log task would only add a task switch per request and batch nothing.
    /// `now_ms`: the request's arrival (`clock::Now`), for a change applied
    /// here; its owner reads its own clock for one it applies.
    pub async fn run(self: &Rc<Self>, charge: Option<Charge>, op: Op, pipelined: bool, now_ms: u64) -> Reply {
        let owner = self.routing.owner(op.key());
        // The lookup's first cache misses overlap the charge's own.
        self.cells.prefetch(owner, op.key());
        if let Err(refused) = self.charge(charge) {
            return refused;
        }
        if owner == self.me {
            return self.call(owner, op, pipelined, now_ms).await;
        }
        if let Op::Get { key } = &op {
            if let Some(found) = self.cells.read(owner, key, now_ms) {
                self.count(|s| s.direct_reads += 1);
                return Reply::Got(found);
            }
        }
        let op = match op {
            Op::Write(_) => match self.apply_direct(owner, op, now_ms) {
                Ok((reply, lsn, deps)) => {
                    if pipelined {
                        self.append_now();
                    }
                    return self.answer(lsn, deps, reply).await;
                }
                Err(op) => op,
            },
            op => op,
        };
        self.call(owner, op, pipelined, now_ms).await
    }

    /// Starts a blocking read: charges the client, then either answers at
    /// once (`Err(reply)`) or returns a future for the answer a write will
    /// bring (`Reply::Woken`). For another core's key the future also
    /// carries the owner's answer if it found the condition met at once
    /// (`Reply::Got`: the read never parked). Dropping that future cancels
    /// the waiter on its owner.
    pub async fn wait(
        self: &Rc<Self>,
        charge: Option<Charge>,
        key: Box<[u8]>,
        until: WaitFor,
        now_ms: u64,
    ) -> Result<WaitFuture<'_>, Reply> {
        self.charge(charge)?;
        let owner = self.routing.owner(&key);
        let slot = self.slots.borrow_mut().alloc(None);
        let origin = Origin { core: self.me as u32, slot };
        let op = Op::Wait { key: key.clone(), until, origin };
        if owner == self.me {
            let (reply, lsn, deps) = self.apply_local(op, now_ms);
            if reply != Reply::Parked {
                self.slots.borrow_mut().release_unused(slot);
                return Err(self.answer(lsn, deps, reply).await);
            }
        } else {
            self.push(owner, Msg::Call { from: self.me as u32, slot, op, pipelined: false });
            self.count(|s| s.calls_sent += 1);
        }
        Ok(WaitFuture { inner: SlotFuture { router: self, slot, done: false }, key: Some(key), owner })
    }

    /// Executes `op` on core `dest` (`pipelined`, `now_ms`: see `run`).
    async fn call(self: &Rc<Self>, dest: usize, op: Op, pipelined: bool, now_ms: u64) -> Reply {
        if dest == self.me {
            let (reply, lsn, deps) = self.apply_local(op, now_ms);
            if pipelined {
                self.append_now();
            }
            return self.answer(lsn, deps, reply).await;
        }
        Credit { router: self, dest }.await;
        let slot = self.slots.borrow_mut().alloc(Some(dest as u32));
        self.push(dest, Msg::Call { from: self.me as u32, slot, op, pipelined });
        self.count(|s| s.calls_sent += 1);
        SlotFuture { router: self, slot, done: false }.await
    }

    fn push(&self, dest: usize, msg: Msg) {
        self.outboxes.borrow_mut()[dest].push(msg);
        if !self.flush_pending.replace(true) {
            if let Some(w) = self.flusher.borrow().as_ref() {
                w.wake_by_ref();
            }
        }
    }

    fn complete(&self, slot: u32, reply: Reply) {
        let done = self.slots.borrow_mut().complete(slot, reply);
        match done {
            Ok(done) => {
                if let Some(dest) = done.credit {
                    let next = self.credits.borrow_mut().give_back(dest);
                    if let Some(w) = next {
                        w.wake();
                    }
                }
                if let Some(w) = done.waker {
                    w.wake();
                }
            }
            Err(e) => log::error!("core {}: {e}; the reply was dropped", self.me),
        }
    }

    fn drain_inbox(&self, cx: &mut Context<'_>) {
        self.mesh.inboxes[self.me].waker.register(cx.waker());
        // Other logs' tasks wake this task when they move.
        self.release_held();
        while let Ok(batch) = self.rx.try_recv() {
            // One clock read for a batch (`Owned::note_time` keeps a
            // shard's times in order whatever the reading).
            let mut now_ms = None;
            let mut received = 0;
            let mut pipelined = false;
            for msg in batch {
                match msg {
                    Msg::Call { from, slot, op, pipelined: p } => {
                        received += 1;
                        pipelined |= p;
                        let now = *now_ms.get_or_insert_with(crate::clock::unix_ms);
                        let (reply, lsn, deps) = self.apply_local(op, now);
                        // A parked waiter is answered later, when a write wakes it.
                        if reply != Reply::Parked {
                            self.deliver_when(lsn, deps, Origin { core: from, slot }, reply);
                        }
                    }
                    Msg::Notify { op } => {
                        received += 1;
                        self.apply_local(op, *now_ms.get_or_insert_with(crate::clock::unix_ms));
                    }
                    Msg::Done { slot, reply } => self.complete(slot, reply),
                    Msg::Control(c) => {
                        self.controls.borrow_mut().push_back(c);
                        if let Some(w) = self.control_waker.borrow_mut().take() {
                            w.wake();
                        }
                    }
                }
            }
            // A pipelining client waits for each answer before its next
            // request can be taken: do not hold its answer for the log task.
            if pipelined {
                self.append_now();
            }
            self.count(|s| s.calls_received += received);
        }
    }

    fn flush(&self, cx: &mut Context<'_>) {
        register(&self.flusher, cx);
        if !self.flush_pending.replace(false) {
            return;
        }
        let mut outboxes = self.outboxes.borrow_mut();
        let mut s = self.stats.get();
        for (dest, outbox) in outboxes.iter_mut().enumerate() {
            if outbox.is_empty() {
                continue;
            }
            let batch = std::mem::take(outbox);
            let inbox = &self.mesh.inboxes[dest];
            // The receiver lives as long as its core; with panic=abort a dead
            // core means a dead process, so a failed send cannot strand a slot.
            let _ = inbox.tx.send(batch);
            inbox.waker.wake();
            s.batches_sent += 1;
        }
        self.stats.set(s);
    }

    /// The next control request for this core.
    pub async fn next_control(&self) -> Control {
        std::future::poll_fn(|cx| match self.controls.borrow_mut().pop_front() {
            Some(c) => Poll::Ready(c),
            None => {
                *self.control_waker.borrow_mut() = Some(cx.waker().clone());
                Poll::Pending
            }
        })
        .await
    }

    /// The task that receives this core's cross-core messages. Never returns.
    pub fn inbox_task(self: Rc<Self>) -> impl Future<Output = ()> {
        std::future::poll_fn(move |cx| {
            self.drain_inbox(cx);
            Poll::Pending
        })
    }

    /// The task that appends what this core journaled to its log, once per
    /// wake (see `log_soon`), and so releases the answers that waited for it.
    pub fn log_task(self: Rc<Self>) -> impl Future<Output = ()> {
        std::future::poll_fn(move |cx| {
            register(&self.log_waker, cx);
            if self.log_pending.replace(false) {
                self.append_now();
            }
            Poll::Pending
        })
    }

    /// The task that sends this core's outboxes once per scheduler pass.
    pub fn flusher_task(self: Rc<Self>) -> impl Future<Output = ()> {
        std::future::poll_fn(move |cx| {
            self.flush(cx);
            Poll::Pending
        })
    }
}

impl Host for Router {
    fn take_journal(&self, spare: Vec<u8>) -> (Vec<u8>, u64) {
        let mut j = self.journal.borrow_mut();
        (j.take(spare), j.lsn())
    }

    fn refuse_writes(&self, on: bool) {
        self.journal.borrow_mut().set_refusing(on);
    }

    fn deliver(&self, origin: Origin, reply: Reply) {
        Router::deliver(self, origin, reply);
    }
}

/// Keeps `cx`'s waker in `slot` (cloning only when it changed), for a task
/// that is woken from elsewhere and never wakes itself.
fn register(slot: &RefCell<Option<Waker>>, cx: &Context<'_>) {
    let mut w = slot.borrow_mut();
    if !w.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
        *w = Some(cx.waker().clone());
    }
}

/// Waits for room in the in-flight budget towards `dest`, then takes it.
struct Credit<'a> {
    router: &'a Router,
    dest: usize,
}

impl Future for Credit<'_> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.router.credits.borrow_mut().take(self.dest, cx.waker()) {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}

/// The answer to a parked blocking read. Dropped before it resolves (timeout,
/// client gone), it tells the owner to drop the waiter.
pub struct WaitFuture<'a> {
    inner: SlotFuture<'a>,
    key: Option<Box<[u8]>>,
    owner: usize,
}

impl Future for WaitFuture<'_> {
    type Output = Reply;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Reply> {
        let r = Pin::new(&mut self.inner).poll(cx);
        if r.is_ready() {
            self.key = None;
        }
        r
    }
}

impl Drop for WaitFuture<'_> {
    fn drop(&mut self) {
        let Some(key) = self.key.take() else { return };
        let router = self.inner.router;
        let origin = Origin { core: router.me as u32, slot: self.inner.slot };
        let op = Op::CancelWait { key, origin };
        // Abandon the slot first: the owner answers Cancelled (or the wake-up
        // already in flight arrives), and that answer frees it.
        self.inner.abandon();
        if self.owner == router.me {
            router.apply_local(op, crate::clock::unix_ms());
        } else {
            router.push(self.owner, Msg::Notify { op });
            router.count(|s| s.calls_sent += 1);
        }
    }
}

/// Waits for the reply in a completion slot.
struct SlotFuture<'a> {
    router: &'a Router,
    slot: u32,
    done: bool,
}

impl Future for SlotFuture<'_> {
    type Output = Reply;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Reply> {
        let polled = self.router.slots.borrow_mut().poll(self.slot, cx.waker());
        match polled {
            Ok(Poll::Ready(reply)) => {
                self.done = true;
                Poll::Ready(reply)
            }
            Ok(Poll::Pending) => Poll::Pending,
            Err(e) => {
                // A bug, not a client's doing: answer rather than hang.
                log::error!("core {}: {e}; answering 500", self.router.me);
                self.done = true;
                Poll::Ready(Reply::Lost)
            }
        }
    }
}

impl SlotFuture<'_> {
    /// Marks the slot abandoned (its reply, when it comes, frees it).
    fn abandon(&mut self) {
        if !self.done {
            self.done = true;
            self.router.slots.borrow_mut().abandon(self.slot);
        }
    }
}

impl Drop for SlotFuture<'_> {
    fn drop(&mut self) {
        self.abandon();
    }
}
