//! One core: its monoio executor (io_uring, or epoll where io_uring cannot
//! be set up), its `SO_REUSEPORT` listener's accept loop, the tasks that
//! carry its cross-core traffic, its control requests (snapshot copies,
//! drain) and its background sweep.
//!
//! Everything here runs on the core's own thread and never blocks it.

use crate::config::IoDriver;
use crate::runtime::conn::{self, CoreCtx};
use crate::runtime::router::{Control, Msg, Router};
use crate::runtime::shared::Shared;
use crate::state::command::Owned;
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
/// Entries a core copies per slice of a snapshot before letting requests run.
const SNAPSHOT_SLICE: usize = 4096;

/// What one core thread needs to start.
pub struct CoreStart {
    pub id: usize,
    pub shared: Arc<Shared>,
    pub owned: Owned,
    pub listener: std::net::TcpListener,
    pub inbox: Receiver<Vec<Msg>>,
    pub ready: mpsc::Sender<Result<&'static str, String>>,
}

/// An io_uring runtime with cooperative task running: completions are
/// delivered when the core next enters the kernel instead of through an
/// inter-processor interrupt, and the ring has a single issuer. Profiles of
/// keep-alive GETs showed those IPIs and the task-work lock as the largest
/// kernel costs. Kernels before 6.0 reject the flags: then a plain ring.
fn build_uring() -> std::io::Result<monoio::Runtime<monoio::time::TimeDriver<IoUringDriver>>> {
    if std::env::var_os("RENDEZVOUS_PLAIN_URING").is_none() {
        let mut tuned = io_uring::IoUring::builder();
        tuned.setup_coop_taskrun().setup_single_issuer();
        if let Ok(rt) = RuntimeBuilder::<IoUringDriver>::new().uring_builder(tuned).enable_timer().build() {
            return Ok(rt);
        }
    }
    RuntimeBuilder::<IoUringDriver>::new().enable_timer().build()
}

/// Runs one core until the process exits.
pub fn core_thread(start: CoreStart) {
    let driver = start.shared.config.io_driver;
    if driver != IoDriver::Epoll {
        match build_uring() {
            Ok(mut rt) => {
                let _ = start.ready.send(Ok("io_uring"));
                rt.block_on(core_main(start));
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
            rt.block_on(core_main(start));
        }
        Err(e) => {
            let _ = start.ready.send(Err(format!("epoll: {e}")));
        }
    }
}

async fn core_main(start: CoreStart) {
    let CoreStart { id, shared, owned, listener, inbox, .. } = start;
    let router = Router::new(
        id,
        shared.routing.clone(),
        shared.mesh.clone(),
        inbox,
        owned,
        shared.budget.clone(),
        shared.periods,
    );
    monoio::spawn(router.clone().inbox_task());
    monoio::spawn(router.clone().flusher_task());
    monoio::spawn(sweeper(shared.clone(), id, router.clone()));
    let listener = match monoio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            log::error!("core {id}: cannot register listener: {e}");
            std::process::exit(1);
        }
    };
    let ctx = Rc::new(CoreCtx::new(shared.clone(), id, router));
    monoio::spawn(control_task(ctx.clone()));
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
            Some(Ok((stream, peer))) => match ctx.shared.conn_limits.admit(peer.ip()) {
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
            Control::Snapshot(reply) => {
                let router = ctx.router.clone();
                monoio::spawn(async move {
                    router.with_owned(|o, _| o.shard.snapshot_begin(crate::clock::unix_ms()));
                    while !router.with_owned(|o, _| o.shard.snapshot_step(SNAPSHOT_SLICE)) {
                        // Let this core's connections run between slices.
                        monoio::time::sleep(Duration::from_millis(1)).await;
                    }
                    let _ = reply.send(router.with_owned(|o, _| o.shard.snapshot_take()));
                });
            }
            Control::Drain(ack) => {
                ctx.start_draining();
                let timeout = ctx.shared.config.shutdown_timeout;
                let _ = monoio::time::timeout(timeout, ctx.requests_finished()).await;
                let _ = ack.send(());
            }
        }
    }
}

/// Reclaims expired keys a bounded slice at a time, and forgets rate-limit
/// buckets at each refill even on a core that sees no traffic.
async fn sweeper(shared: Arc<Shared>, id: usize, router: Rc<Router>) {
    let stats = &shared.stats[id];
    let mut tick = monoio::time::interval(SWEEP_EVERY);
    loop {
        tick.tick().await;
        let epoch = router.periods().epoch(Instant::now());
        router.with_owned(|owned, budget| {
            if !owned.shard.is_empty() {
                let slice = (owned.shard.len() / 10).clamp(SWEEP_MIN, SWEEP_MAX);
                owned.shard.sweep(crate::clock::unix_ms(), slice, budget);
            }
            owned.limiter.refill_if_due(epoch);
            // Publish what only this core may read, for the metrics thread.
            stats.keys.set(owned.shard.len() as u64);
            stats.stored_bytes.set(owned.shard.bytes() as u64);
            stats.expired.set(owned.shard.expired_total());
            stats.tracked_clients.set(owned.limiter.tracked() as u64);
            stats.waiters.set(owned.waiters.parked() as u64);
            stats.waiter_wakeups.set(owned.waiters.woken_total());
        });
        let traffic = router.stats();
        stats.cross_core_sent.set(traffic.calls_sent);
        stats.cross_core_batches.set(traffic.batches_sent);
        stats.cross_core_received.set(traffic.calls_received);
    }
}
