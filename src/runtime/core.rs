//! One core: its monoio executor (io_uring, or epoll where io_uring cannot
//! be set up), its `SO_REUSEPORT` listener's accept loop, the tasks that
//! carry its cross-core traffic, its control requests (snapshot copies,
//! drain) and its background sweep.
//!
//! Everything here runs on the core's own thread and never blocks it.

use crate::config::{IoDriver, SchedPolicy};
use crate::runtime::conn::{self, CoreCtx};
use crate::runtime::mesh::{CheckpointMsg, Control, CopyGate, DrainReport, GateState, Msg};
use crate::runtime::placement;
use crate::runtime::router::Router;
use crate::runtime::sched;
use crate::runtime::shared::Shared;
use crate::runtime::trim::Trimmer;
use crate::runtime::turns::{Ring, Turns};
use crate::runtime::wal::Wal;
use crate::state::command::Reply;
use crossbeam_channel::Receiver;
use monoio::{IoUringDriver, LegacyDriver, RuntimeBuilder};
use std::future::Future;
use std::rc::Rc;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often each core reclaims expired keys.
const SWEEP_EVERY: Duration = Duration::from_millis(100);
/// Entries examined per sweep at least / at most. Between the two, a tenth of
/// the shard, so the whole shard is visited about once a second.
const SWEEP_MIN: usize = 1024;
const SWEEP_MAX: usize = 65_536;
/// Entries, and key and value bytes, a core copies per slice of a snapshot
/// before letting requests run (and the most one slice holds in memory).
const SNAPSHOT_SLICE: usize = 4096;
const SNAPSHOT_SLICE_BYTES: usize = 1 << 20;

/// What one core thread needs to start.
pub struct CoreStart {
    pub id: usize,
    pub shared: Arc<Shared>,
    pub listener: std::net::TcpListener,
    pub inbox: Receiver<Vec<Msg>>,
    pub ready: mpsc::Sender<Result<&'static str, String>>,
    /// This core's log (`None` without persistence).
    pub log: Option<LogStart>,
    /// The CPU this core pins itself to (`None`: the kernel places it).
    pub cpu: Option<usize>,
}

/// What a core's write-ahead log starts from.
pub struct LogStart {
    /// Its first segment number.
    pub first_segment: u64,
    /// Its trimming helper, started with the core.
    pub trim: Trimmer,
}

/// An io_uring runtime with cooperative task running: completions are
/// delivered when the core next enters the kernel instead of through an
/// inter-processor interrupt, and the ring has a single issuer. Profiles of
/// keep-alive GETs showed those IPIs and the task-work lock as the largest
/// kernel costs. Kernels before 6.0 reject the flags: then a plain ring.
/// Also returns the ring's descriptor, for `turns`, if it could be found.
pub(crate) fn build_uring() -> std::io::Result<(UringRuntime, Option<Ring>)> {
    Ring::opened_by(|| {
        if std::env::var_os("RENDEZVOUS_PLAIN_URING").is_none() {
            let mut tuned = io_uring::IoUring::builder();
            tuned.setup_coop_taskrun().setup_single_issuer();
            if let Ok(rt) = RuntimeBuilder::<IoUringDriver>::new().uring_builder(tuned).enable_timer().build() {
                return Ok(rt);
            }
        }
        RuntimeBuilder::<IoUringDriver>::new().enable_timer().build()
    })
}

type UringRuntime = monoio::Runtime<monoio::time::TimeDriver<IoUringDriver>>;

/// Runs one core until the process exits.
pub fn core_thread(start: CoreStart) {
    // Before anything slow (the log's opening): placement reads every
    // core's run time, and waits for all of them.
    start.shared.placement.enrol(start.id);
    let policy = start.shared.config.sched_policy;
    let batch = match sched::apply_policy(policy) {
        Ok(()) => policy == SchedPolicy::Batch,
        Err(e) => {
            if start.id == 0 {
                log::warn!("cannot put the worker threads under SCHED_BATCH ({e}); running under the default policy");
            }
            false
        }
    };
    let pinned = start.cpu.is_some_and(|cpu| match sched::pin(cpu) {
        Ok(()) => true,
        Err(e) => {
            log::warn!("core {}: cannot pin to CPU {cpu} ({e}); the kernel places it", start.id);
            false
        }
    });
    // Turns are for cores that do not preempt each other and that the
    // kernel may put on one CPU: several, under SCHED_BATCH, not pinned.
    let turns = batch && !pinned && start.shared.config.threads > 1;
    let driver = start.shared.config.io_driver;
    if driver != IoDriver::Epoll {
        match build_uring() {
            Ok((mut rt, ring)) => {
                if turns && ring.is_none() {
                    log::info!("core {}: its io_uring is not in /proc/self/fd, so it gives no turns", start.id);
                }
                let _ = start.ready.send(Ok("io_uring"));
                rt.block_on(core_main(start, ring.filter(|_| turns)));
                return;
            }
            Err(e) if driver == IoDriver::Uring => {
                let _ = start.ready.send(Err(format!("io_uring: {e}")));
                return;
            }
            Err(e) => {
                if start.id == 0 {
                    log::warn!("io_uring unavailable ({e}); falling back to epoll");
                }
            }
        }
    }
    match RuntimeBuilder::<LegacyDriver>::new().enable_timer().build() {
        Ok(mut rt) => {
            let _ = start.ready.send(Ok("epoll"));
            rt.block_on(core_main(start, turns.then_some(Ring::READINESS)));
        }
        Err(e) => {
            let _ = start.ready.send(Err(format!("epoll: {e}")));
        }
    }
}

/// `turns`: how this core's answers reach the kernel, if it gives turns.
async fn core_main(start: CoreStart, turns: Option<Ring>) {
    let CoreStart { id, shared, listener, inbox, log, .. } = start;
    let wal = match (shared.data_dir.clone(), log) {
        (Some(dir), Some(log)) => match Wal::open(shared.clone(), id, dir.clone(), log.first_segment, log.trim) {
            Ok(w) => Some(w),
            Err(e) => {
                log::error!("core {id}: cannot create a log segment in {}: {e}", dir.path().display());
                std::process::exit(1);
            }
        },
        _ => None,
    };
    let router = Router::new(id, &shared, inbox, wal.clone());
    monoio::spawn(router.clone().inbox_task());
    monoio::spawn(router.clone().flusher_task());
    if let Some(wal) = &wal {
        monoio::spawn(router.clone().log_task());
        wal.spawn(&router);
    }
    monoio::spawn(sweeper(shared.clone(), id, router.clone()));
    let listener = match monoio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            log::error!("core {id}: cannot register listener: {e}");
            std::process::exit(1);
        }
    };
    let turns = turns.map(|ring| Rc::new(Turns::new(id, shared.seats.clone(), ring)));
    if let Some(t) = &turns {
        monoio::spawn(t.clone().task());
    }
    let ctx = Rc::new(CoreCtx::new(shared.clone(), id, router, turns));
    monoio::spawn(control_task(ctx.clone()));
    if id == 0 && shared.placement.steered() {
        use std::os::fd::AsRawFd;
        // The task stops once draining begins, before the accept loop
        // (on this thread too) lets the listener go.
        let fd = listener.as_raw_fd();
        let draining = ctx.clone();
        monoio::spawn(placement::task(shared.clone(), fd, move || draining.is_draining()));
    }
    accept_loop(id, &ctx, listener).await;
    // Stopped accepting (shutdown): closing the listener refuses new
    // connections; the runtime keeps serving the ones it has.
    std::future::pending::<()>().await;
}

async fn accept_loop(id: usize, ctx: &Rc<CoreCtx>, listener: monoio::net::TcpListener) {
    loop {
        let accept = listener.accept();
        let mut accept = std::pin::pin!(accept);
        let next = std::future::poll_fn(|cx| {
            if ctx.is_draining() {
                return std::task::Poll::Ready(None);
            }
            ctx.on_drain(cx.waker());
            accept.as_mut().poll(cx).map(Some)
        })
        .await;
        match next {
            None => return,
            Some(Ok((stream, peer))) => match ctx.shared.conn_limits.admit(peer.ip(), || ctx.make_room()) {
                Ok(permit) => {
                    monoio::spawn(conn::serve(ctx.clone(), stream, peer, permit));
                }
                // Refused before a byte is read: closing is the cheapest answer.
                Err(refusal) => {
                    ctx.refused(refusal);
                    drop(stream);
                }
            },
            Some(Err(e)) => {
                // Typically EMFILE: back off instead of spinning on the error.
                log::warn!("core {id}: accept failed: {e}");
                monoio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Executes the lifecycle thread's requests on this core.
async fn control_task(ctx: Rc<CoreCtx>) {
    loop {
        match ctx.router.next_control().await {
            Control::Checkpoint(out, gate) => {
                monoio::spawn(checkpoint(ctx.router.clone(), out, gate));
            }
            Control::Drain(ack) => {
                let ctx = ctx.clone();
                monoio::spawn(async move {
                    let report = drain(&ctx).await;
                    let _ = ack.send(report);
                });
            }
            Control::CutShort => ctx.cut_short(),
            Control::Flush(ack) => {
                let result = match ctx.router.wal() {
                    Some(wal) => wal.flush(&*ctx.router).await.map_err(|e| e.to_string()),
                    None => Ok(()),
                };
                let _ = ack.send(result);
            }
        }
    }
}

/// Shutdown on this core: stop accepting, answer parked reads 503 at once,
/// then wait for requests in progress (at most `-shutdownTimeout`, or until
/// a second signal cuts it short).
async fn drain(ctx: &CoreCtx) -> DrainReport {
    ctx.start_draining();
    let connections = ctx.connections();
    let waiters = ctx.router.release_waiters(|| Reply::ShuttingDown);
    let timeout = ctx.shared.config.shutdown_timeout;
    let _ = monoio::time::timeout(timeout, ctx.requests_finished()).await;
    DrainReport { connections, waiters, unfinished: ctx.in_progress() }
}

/// This core's part of a checkpoint: move the log to a new segment, say
/// so, wait until every core has (`CopyGate`), then send the copy a slice at
/// a time, letting requests run between slices. The channel is bounded:
/// when the writer lags, the core waits (without blocking) instead of
/// buffering the store.
async fn checkpoint(router: Rc<Router>, out: std::sync::mpsc::SyncSender<CheckpointMsg>, gate: Arc<CopyGate>) {
    let id = router.me();
    let seq = match router.wal() {
        Some(wal) => match wal.rotate_for_checkpoint(&*router) {
            Ok(seq) => seq,
            Err(e) => {
                let _ = out.send(CheckpointMsg::Failed { core: id, why: format!("cannot start a log segment: {e}") });
                return;
            }
        },
        None => 0,
    };
    if !send_checkpoint(&out, CheckpointMsg::Begun { core: id, seq }).await {
        return;
    }
    loop {
        match gate.state() {
            GateState::Open => break,
            GateState::Abandoned => return,
            GateState::Closed => monoio::time::sleep(Duration::from_millis(1)).await,
        }
    }
    let copy = router.with_owned(|o, _| o.shard.snapshot_begin(crate::clock::unix_ms()));
    loop {
        let next = router.with_owned(|o, _| o.shard.snapshot_next(copy, SNAPSHOT_SLICE, SNAPSHOT_SLICE_BYTES));
        let msg = match next {
            Ok(Some(slice)) => CheckpointMsg::Entries(slice),
            Ok(None) => {
                CheckpointMsg::Ended { core: id, max_version: router.with_owned(|o, _| o.shard.last_version()) }
            }
            // A newer checkpoint started on this core after this one's writer
            // gave up: this copy must not end as if it were whole.
            Err(_) => CheckpointMsg::Failed { core: id, why: "superseded by a newer checkpoint".into() },
        };
        let last = matches!(msg, CheckpointMsg::Ended { .. } | CheckpointMsg::Failed { .. });
        if !send_checkpoint(&out, msg).await {
            // The writer gave up (disk trouble): stop copying.
            router.with_owned(|o, _| o.shard.snapshot_abort(copy));
            return;
        }
        if last {
            return;
        }
        // Let this core's connections run between slices.
        monoio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Sends `msg` to the checkpoint writer, waiting (without blocking the
/// core) while its channel is full. `false`: the writer gave up.
async fn send_checkpoint(out: &std::sync::mpsc::SyncSender<CheckpointMsg>, mut msg: CheckpointMsg) -> bool {
    loop {
        match out.try_send(msg) {
            Ok(()) => return true,
            Err(std::sync::mpsc::TrySendError::Full(m)) => {
                msg = m;
                monoio::time::sleep(Duration::from_millis(1)).await;
            }
            Err(std::sync::mpsc::TrySendError::Disconnected(_)) => return false,
        }
    }
}

/// Reclaims expired keys a bounded slice at a time, forgets rate-limit
/// buckets at each refill even on a core that sees no traffic, and stamps
/// the core's tick (`Shared::readiness`).
async fn sweeper(shared: Arc<Shared>, id: usize, router: Rc<Router>) {
    let stats = &shared.stats[id];
    let mut tick = monoio::time::interval(SWEEP_EVERY);
    loop {
        tick.tick().await;
        // `/readyz` watches this: a core that stops ticking is stalled.
        stats.tick_ms.set(shared.now_ms());
        let epoch = router.periods().epoch(Instant::now());
        router.with_owned(|owned, budget| {
            if !owned.shard.is_empty() {
                let slice = (owned.shard.len() / 10).clamp(SWEEP_MIN, SWEEP_MAX);
                owned.sweep(crate::clock::unix_ms(), slice, budget);
            }
            // Publish what only this core may read, for the metrics thread.
            stats.keys.set(owned.shard.len() as u64);
            stats.stored_bytes.set(owned.shard.bytes() as u64);
            stats.expired.set(owned.shard.expired_total());
            stats.waiters.set(owned.waiters.parked() as u64);
            stats.waiter_wakeups.set(owned.waiters.woken_total());
        });
        shared.limiter.refill_if_due(epoch);
        let traffic = router.stats();
        stats.cross_core_sent.set(traffic.calls_sent);
        stats.cross_core_batches.set(traffic.batches_sent);
        stats.cross_core_received.set(traffic.calls_received);
        stats.direct_reads.set(traffic.direct_reads);
        stats.direct_writes.set(traffic.direct_writes);
        stats.answers_held.set(traffic.answers_held);
    }
}
