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

use crate::config::{AdminAddr, Config};
use crate::persist::snapshot;
use crate::runtime::core::{core_thread, CoreStart};
use crate::runtime::lifecycle;
use crate::runtime::router::{Mesh, Routing};
use crate::runtime::shared::{Phase, PhaseCell, Shared};
use crate::state::command::Owned;
use crate::state::ratelimit::{Limiter, Periods};
use crate::state::secret::SecretKey;
use crate::state::shard::{KeyBudget, Shard};
use socket2::{Domain, Protocol, Socket, Type};
use std::net::SocketAddr;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Instant;

const LISTEN_BACKLOG: i32 = 4096;

/// Why the server could not start.
#[derive(Debug)]
pub enum StartupError {
    PortInUse(SocketAddr),
    Bind(SocketAddr, std::io::Error),
    Runtime(String),
    Random(std::io::Error),
    Snapshot(std::path::PathBuf, crate::persist::snapshot::SnapshotError),
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
            shard.set_version_base(crate::clock::unix_ms() << 3);
            Owned::new(shard, Limiter::new(config.max_requests, config.max_tracked_ips.div_ceil(n)))
        })
        .collect();
    let Some(dir) = config.data_dir() else {
        log::info!("persistence disabled (-dataDir is empty)");
        return Ok((SecretKey::random().map_err(StartupError::Random)?, owned));
    };
    let path = &dir.join("snapshot.rkyv");
    let loaded = match snapshot::load(path) {
        Ok(Some(l)) => l,
        Ok(None) => {
            log::info!("no snapshot at {}: starting empty", path.display());
            return Ok((SecretKey::random().map_err(StartupError::Random)?, owned));
        }
        Err(e) => return Err(StartupError::Snapshot(path.clone(), e)),
    };
    let now = crate::clock::unix_ms();
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
    let (listeners, bound) = bind_listeners(config.listen(), n)?;
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
        metrics_on: config.metrics_addr != AdminAddr::Off,
        conn_limits: crate::runtime::connlimit::ConnLimits::new(
            config.max_conns,
            config.max_conns_per_ip,
            config.trusted_proxies.clone(),
        ),
        waiter_limits: crate::runtime::connlimit::ConnLimits::new(
            config.max_waiters,
            config.max_waiters_per_ip,
            crate::request::clientip::TrustedProxies::none(),
        ),
        phase: PhaseCell::default(),
        config,
    });
    if let AdminAddr::On(addr) = shared.config.metrics_addr {
        let bound =
            crate::metrics::exporter::start(shared.clone(), addr).map_err(|e| StartupError::Metrics(addr, e))?;
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
    shared.phase.set(Phase::Ready);
    log::info!(
        "rendezvous listening on http://{bound} ({n} threads, {} driver, maxNumKV {}, maxRequests {} per {})",
        drivers.join("+"),
        shared.config.max_num_kv,
        shared.config.max_requests,
        crate::duration::format(shared.config.reset_duration),
    );
    lifecycle::run(shared)
}
