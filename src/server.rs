//! Startup and the per-core runtime: bind one `SO_REUSEPORT` listener per
//! core, start one OS thread per core running its own monoio executor
//! (io_uring, or epoll where io_uring cannot be set up), and accept
//! connections on each.
//!
//! Everything shared between cores is built here once and is read-only
//! afterwards (`Shared`), except the key budget counter and the mesh
//! channels, which are designed for cross-thread use. Because `SO_REUSEPORT`
//! would let a second instance silently join the port and split traffic, the
//! port is first probed with a plain bind: if anything already listens there,
//! startup fails with a clear message.

use crate::command::Owned;
use crate::config::{Config, IoDriver};
use crate::conn::{self, CoreCtx};
use crate::lifecycle;
use crate::ratelimit::{Limiter, Periods};
use crate::router::{Control, Mesh, Msg, Router, Routing};
use crate::secret::SecretKey;
use crate::shard::{KeyBudget, Shard};
use crate::snapshot;
use crossbeam_channel::Receiver;
use monoio::{IoUringDriver, LegacyDriver, RuntimeBuilder};
use socket2::{Domain, Protocol, Socket, Type};
use std::future::Future;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How often each core reclaims expired keys.
const SWEEP_EVERY: Duration = Duration::from_millis(100);
/// Entries examined per sweep at least / at most. Between the two, a tenth of
/// the shard, so the whole shard is visited about once a second.
const SWEEP_MIN: usize = 1024;
const SWEEP_MAX: usize = 65_536;
const LISTEN_BACKLOG: i32 = 4096;
/// Entries a core copies per slice of a snapshot before letting requests run.
const SNAPSHOT_SLICE: usize = 4096;

/// Read-only state every core shares.
pub struct Shared {
    pub config: Config,
    pub routing: Routing,
    pub mesh: Arc<Mesh>,
    pub budget: Arc<KeyBudget>,
    pub periods: Periods,
    pub secret_key: SecretKey,
    /// The bound address, for the docs page when a request has no Host.
    pub listen_text: String,
    /// One per core, written only by that core.
    pub stats: Vec<crate::metrics::CoreStats>,
    pub snapshot_stats: crate::metrics::SnapshotStats,
    /// Whether requests are measured (`-metricsAddr` set).
    pub metrics_on: bool,
    pub conn_limits: Arc<crate::connlimit::ConnLimits>,
    /// Parked blocking reads, server-wide and per client IP.
    pub waiter_limits: Arc<crate::connlimit::ConnLimits>,
}

/// Why the server could not start.
#[derive(Debug)]
pub enum StartupError {
    PortInUse(SocketAddr),
    Bind(SocketAddr, std::io::Error),
    Runtime(String),
    Random(std::io::Error),
    Snapshot(std::path::PathBuf, crate::snapshot::SnapshotError),
    Metrics(SocketAddr, std::io::Error),
}

impl std::fmt::Display for StartupError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StartupError::PortInUse(a) => {
                write!(f, "cannot listen on {a}: another process is already listening on that port")
            }
            StartupError::Bind(a, e) => write!(f, "cannot listen on {a}: {e}"),
            StartupError::Runtime(e) => write!(f, "cannot start the I/O runtime: {e}"),
            StartupError::Random(e) => write!(f, "cannot read the system's random source: {e}"),
            StartupError::Metrics(a, e) => write!(f, "cannot serve metrics on {a} (-metricsAddr): {e}"),
            StartupError::Snapshot(p, e) => write!(
                f,
                "cannot load snapshot {}: {e}. The file was left untouched; move it away to start empty.",
                p.display()
            ),
        }
    }
}

impl std::error::Error for StartupError {}

fn reuseport_listener(addr: SocketAddr) -> Result<std::net::TcpListener, StartupError> {
    let err = |e| StartupError::Bind(addr, e);
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP)).map_err(err)?;
    socket.set_reuse_address(true).map_err(err)?;
    socket.set_reuse_port(true).map_err(err)?;
    if addr.is_ipv6() {
        // `::` serves IPv4 too, whatever the system default says.
        socket.set_only_v6(false).map_err(err)?;
    }
    socket.set_nonblocking(true).map_err(err)?;
    socket.bind(&addr.into()).map_err(err)?;
    socket.listen(LISTEN_BACKLOG).map_err(err)?;
    Ok(socket.into())
}

/// Binds `n` listeners sharing one port. With port 0 the kernel picks the
/// port for the first and the others join it.
pub fn bind_listeners(addr: SocketAddr, n: usize) -> Result<(Vec<std::net::TcpListener>, SocketAddr), StartupError> {
    if addr.port() != 0 {
        // A plain bind (no SO_REUSEPORT) fails if anyone listens on the port,
        // including another instance of this server.
        match std::net::TcpListener::bind(addr) {
            Ok(probe) => drop(probe),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => return Err(StartupError::PortInUse(addr)),
            Err(e) => return Err(StartupError::Bind(addr, e)),
        }
    }
    let first = reuseport_listener(addr)?;
    let actual = first.local_addr().map_err(|e| StartupError::Bind(addr, e))?;
    let mut listeners = vec![first];
    for _ in 1..n {
        listeners.push(reuseport_listener(actual)?);
    }
    Ok((listeners, actual))
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// What one core thread needs to start.
struct CoreStart {
    id: usize,
    shared: Arc<Shared>,
    owned: Owned,
    listener: std::net::TcpListener,
    inbox: Receiver<Vec<Msg>>,
    ready: mpsc::Sender<Result<&'static str, String>>,
}

/// Loads the snapshot (if any) into one `Owned` per core, routing every
/// entry to its owner for the current core count. Returns the secret key the
/// snapshot's hashes were made with (or a fresh one).
fn restore(config: &Config, routing: &Routing, budget: &KeyBudget) -> Result<(SecretKey, Vec<Owned>), StartupError> {
    let n = config.threads;
    // Sized up front: growing a big table stalls the core while it rehashes.
    let per_core = (config.max_num_kv / n + config.max_num_kv / n / 8 + 1024).min(config.max_num_kv);
    let mut owned: Vec<Owned> = (0..n)
        .map(|_| {
            let mut shard = Shard::with_capacity(per_core);
            // Versions (ETags) keep growing across restarts: start above the
            // clock (8 per ms leaves room for bursts within one ms).
            shard.set_version_base(unix_ms() << 3);
            Owned::new(shard, Limiter::new(config.max_requests, config.max_tracked_ips.div_ceil(n)))
        })
        .collect();
    let Some(path) = &config.snapshot_path else {
        log::info!("snapshots disabled (-snapshotPath is empty)");
        return Ok((SecretKey::random().map_err(StartupError::Random)?, owned));
    };
    let loaded = match snapshot::load(path) {
        Ok(Some(l)) => l,
        Ok(None) => {
            log::info!("no snapshot at {}: starting empty", path.display());
            return Ok((SecretKey::random().map_err(StartupError::Random)?, owned));
        }
        Err(e) => return Err(StartupError::Snapshot(path.clone(), e)),
    };
    let now = unix_ms();
    let max_expiry = now.saturating_add(config.expire_duration.as_millis() as u64);
    let (total, mut expired, mut dropped) = (loaded.entries.len(), 0, 0);
    for mut entry in loaded.entries {
        if entry.is_expired(now) {
            expired += 1;
            continue;
        }
        // A lowered -expireDuration applies to restored keys too.
        entry.expires_ms = entry.expires_ms.min(max_expiry);
        let core = routing.owner(entry.key());
        if !owned[core].shard.restore(entry, budget) {
            dropped += 1;
        }
    }
    log::info!(
        "loaded {} keys from {} (written {}s ago; {expired} expired since)",
        total - expired - dropped,
        path.display(),
        now.saturating_sub(loaded.created_unix_ms) / 1000
    );
    if dropped > 0 {
        log::warn!("{dropped} keys from the snapshot did not fit in -maxNumKV {} and were dropped", config.max_num_kv);
    }
    Ok((loaded.secret_key, owned))
}

/// Every connection is a file descriptor: raise the soft limit towards
/// `-maxConns` (plus room for listeners, snapshots and the metrics thread).
fn raise_fd_limit(max_conns: usize) {
    let want = max_conns as u64 + 256;
    match rlimit::increase_nofile_limit(want) {
        Ok(got) if got < want => log::warn!(
            "open-file limit is {got}, below -maxConns {max_conns} + 256: accepts will fail before -maxConns \
             (raise LimitNOFILE / ulimit -n)"
        ),
        Ok(_) => {}
        Err(e) => log::warn!("cannot read or raise the open-file limit: {e}"),
    }
}

/// Starts the server and runs it until shutdown.
pub fn run(config: Config) -> Result<(), StartupError> {
    let n = config.threads;
    let routing = Routing::new(n);
    let budget = Arc::new(KeyBudget::new(config.max_num_kv));
    raise_fd_limit(config.max_conns);
    // Load before binding: a bad snapshot must not leave a half-started server.
    let (secret_key, owned) = restore(&config, &routing, &budget)?;
    let (listeners, bound) = bind_listeners(config.listen, n)?;
    let (mesh, receivers) = Mesh::new(n);
    let shared = Arc::new(Shared {
        routing,
        mesh,
        budget,
        periods: Periods::new(Instant::now(), config.reset_duration),
        secret_key,
        listen_text: bound.to_string(),
        stats: (0..n).map(|_| Default::default()).collect(),
        snapshot_stats: Default::default(),
        metrics_on: config.metrics_addr.is_some(),
        conn_limits: crate::connlimit::ConnLimits::new(
            config.max_conns,
            config.max_conns_per_ip,
            config.trusted_proxies.clone(),
        ),
        waiter_limits: crate::connlimit::ConnLimits::new(
            config.max_waiters,
            config.max_waiters_per_ip,
            crate::clientip::TrustedProxies::parse("").unwrap_or_else(|_| config.trusted_proxies.clone()),
        ),
        config,
    });
    if let Some(addr) = shared.config.metrics_addr {
        let bound = crate::metrics::start(shared.clone(), addr).map_err(|e| StartupError::Metrics(addr, e))?;
        log::info!("metrics on http://{bound}/metrics");
    }
    let (ready_tx, ready_rx) = mpsc::channel();
    let cores = listeners.into_iter().zip(receivers).zip(owned).enumerate();
    for (id, ((listener, inbox), owned)) in cores {
        let start = CoreStart { id, shared: shared.clone(), owned, listener, inbox, ready: ready_tx.clone() };
        std::thread::Builder::new()
            .name(format!("core-{id}"))
            .spawn(move || core_thread(start))
            .map_err(|e| StartupError::Runtime(e.to_string()))?;
    }
    drop(ready_tx);
    let mut drivers = Vec::with_capacity(n);
    for _ in 0..n {
        match ready_rx.recv() {
            Ok(Ok(driver)) => drivers.push(driver),
            Ok(Err(e)) => return Err(StartupError::Runtime(e)),
            Err(_) => return Err(StartupError::Runtime("a core thread exited during startup".into())),
        }
    }
    drivers.dedup();
    log::info!(
        "rendezvous listening on http://{bound} ({n} threads, {} driver, maxNumKV {}, maxRequests {} per {})",
        drivers.join("+"),
        shared.config.max_num_kv,
        shared.config.max_requests,
        crate::duration::format(shared.config.reset_duration),
    );
    lifecycle::run(shared)
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

fn core_thread(start: CoreStart) {
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
                    router.with_owned(|o, _| o.shard.snapshot_begin(unix_ms()));
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
                owned.shard.sweep(unix_ms(), slice, budget);
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
