//! Startup: everything that must hold before the first request is
//! answered, in order, each failure a clear message and a non-zero exit.
//!
//! 1. The listen port is locked for this process (an abstract Unix socket
//!    named after the port, held for the process's life), then probed with
//!    a plain bind: `SO_REUSEPORT`, which every core's listener needs,
//!    would otherwise let a second instance join the port and split the
//!    traffic, and a probe alone is a race between two instances started
//!    together. One Rendezvous instance per port per host.
//! 2. The admin address is bound (busy: an error if `-metricsAddr` was
//!    given, a warning and no admin server if it was the default, so two
//!    instances started with the Go server's command line run side by side)
//!    and served: `/healthz` answers, `/readyz` says starting, `/metrics`
//!    waits for the store (`admin::Attach`).
//! 3. The data directory is locked, checked (a file can be written and
//!    fsynced there) and recovered: snapshot plus log, into one shard per
//!    core, before any public listener exists.
//! 4. The listeners are bound, one per core, and the cores start; the
//!    process is ready once every core runs.
//!
//! The per-core runtime is `core`; what happens after startup, `lifecycle`.

use crate::config::{AdminAddr, Config, CpuAffinity};
use crate::persist::datadir::{DataDir, DataDirError};
use crate::persist::recovery::{self, RecoveryError};
use crate::request::clientip::TrustedProxies;
use crate::runtime::cells::Cells;
use crate::runtime::connlimit::ConnLimits;
use crate::runtime::core::{core_thread, CoreStart, LogStart};
use crate::runtime::lifecycle;
use crate::runtime::mesh::{Mesh, Routing};
use crate::runtime::sched;
use crate::runtime::shared::{Phase, PhaseCell, Shared};
use crate::runtime::trim::Trimmer;
use crate::runtime::turns::Seats;
use crate::state::command::Owned;
use crate::state::ratelimit::{Limiter, Periods};
use crate::state::secret::SecretKey;
use crate::state::shard::{KeyBudget, Shard, Versions};
use socket2::{Domain, Protocol, Socket, Type};
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Instant;

const LISTEN_BACKLOG: i32 = 4096;

/// Why the server could not start.
#[derive(Debug)]
pub enum StartupError {
    PortInUse(SocketAddr),
    /// Another Rendezvous process holds the port's lock.
    /// Another Rendezvous process of this user holds the port (its PID, if known).
    PortLocked(u16, Option<u32>),
    Bind(SocketAddr, std::io::Error),
    Runtime(String),
    Random(std::io::Error),
    DataDir(DataDirError),
    Recovery(RecoveryError),
    SecretKey(std::path::PathBuf, std::io::Error),
    Metrics(SocketAddr, std::io::Error),
}

impl std::fmt::Display for StartupError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StartupError::PortInUse(a) => {
                write!(f, "cannot listen on {a}: another process is already listening on that port (-port)")
            }
            StartupError::PortLocked(p, Some(pid)) => write!(
                f,
                "cannot listen on port {p}: another Rendezvous process on this host (PID {pid}) is using it (-port)"
            ),
            StartupError::PortLocked(p, None) => {
                write!(f, "cannot listen on port {p}: another Rendezvous process on this host is using it (-port)")
            }
            StartupError::Bind(a, e) => write!(f, "cannot listen on {a}: {e}"),
            StartupError::Runtime(e) => write!(f, "cannot start the I/O runtime: {e}"),
            StartupError::Random(e) => write!(f, "cannot read the system's random source: {e}"),
            StartupError::DataDir(e) => write!(f, "{e}"),
            StartupError::Recovery(e) => write!(f, "{e}"),
            StartupError::SecretKey(p, e) => {
                write!(f, "cannot read or write the secret-hashing key {}: {e}", p.display())
            }
            StartupError::Metrics(a, e) => write!(f, "cannot serve the admin address {a} (-metricsAddr): {e}"),
        }
    }
}

impl std::error::Error for StartupError {}

/// A port's lock among Rendezvous processes, held for the process's life.
#[derive(Debug)]
pub struct PortLock {
    /// `None`: the lock's name was held by another user's socket, which no
    /// Rendezvous process of this user can be (see `lock_port`).
    _held: Option<std::os::unix::net::UnixListener>,
}

/// Holds `port` exclusively among Rendezvous processes in this network
/// namespace: an abstract Unix socket is bound and listening for as long as
/// the process lives and vanishes with it (even after SIGKILL), so no stale
/// lock is left. Abstract names have no permissions, so any local user
/// could bind this one first: a holder running as another user is no
/// Rendezvous process of ours (and could not join this user's
/// `SO_REUSEPORT` listeners anyway), so startup goes on without the lock,
/// with a warning naming it, rather than refusing to start for as long as
/// the squatter likes. The plain bind in `bind_listeners` still refuses a
/// port anyone listens on; what is lost is only the guard against two
/// instances of this user started at the same instant. A squatter that
/// fills its socket's backlog cannot be asked; the kernel's socket table
/// (`listener_uid`) still names its owner, and only where that table
/// cannot be read is it taken for ours (the message then names no PID;
/// `ss -xlp` shows the holder).
pub fn lock_port(port: u16) -> Result<PortLock, StartupError> {
    use std::os::linux::net::SocketAddrExt;
    let name = format!("rendezvous/port/{port}");
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
        .map_err(|e| StartupError::Runtime(e.to_string()))?;
    // A lock is bound, then listens: two calls. A holder seen between them
    // (or one exiting as it is asked) looks like a socket that does not
    // listen; only one that stays so for `NOT_LISTENING_FOR` is a squatter.
    let asked_since = std::time::Instant::now();
    let holder = loop {
        let bound = std::os::unix::net::UnixListener::bind_addr(&addr);
        match bound {
            Ok(l) => return Ok(PortLock { _held: Some(l) }),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => match lock_holder(&name) {
                Holder::NotListening if asked_since.elapsed() < NOT_LISTENING_FOR => {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                holder => break holder,
            },
            Err(e) => return Err(StartupError::Runtime(format!("cannot take the port lock: {e}"))),
        }
    };
    match holder {
        Holder::Other { pid, uid } => {
            let who = pid.map_or_else(|| "a process".to_string(), |pid| format!("PID {pid}"));
            log::warn!(
                "the lock for port {port} (abstract socket @{name}) is held by {who} running as uid {uid}, \
                     not as this user: not a Rendezvous process of ours; going on without the lock"
            );
            Ok(PortLock { _held: None })
        }
        Holder::NotListening => {
            log::warn!(
                "the lock for port {port} (abstract socket @{name}) is bound by a socket that does not \
                     listen: not a Rendezvous process; going on without the lock"
            );
            Ok(PortLock { _held: None })
        }
        Holder::Ours(pid) => Err(StartupError::PortLocked(port, pid)),
    }
}

/// How long a lock's name must stay bound by a socket that does not listen
/// before it is taken for a squatter's (see `lock_port`).
const NOT_LISTENING_FOR: std::time::Duration = std::time::Duration::from_millis(200);

/// Who holds a port lock's name.
enum Holder {
    /// A process of this user (its PID, if the kernel said), or one that
    /// cannot be told apart from one: refuse.
    Ours(Option<u32>),
    /// A listening socket of another user.
    Other { pid: Option<u32>, uid: u32 },
    /// A socket that is bound but does not listen: a Rendezvous lock always does.
    NotListening,
}

/// Asks the kernel who holds the lock's name: connects without blocking
/// (a backlog someone filled must not hang startup) and reads the
/// listener's credentials.
fn lock_holder(name: &str) -> Holder {
    use std::os::fd::AsRawFd;
    use std::os::unix::ffi::OsStrExt;
    let Ok(sock) = Socket::new(Domain::UNIX, Type::STREAM, None) else { return Holder::Ours(None) };
    if sock.set_nonblocking(true).is_err() {
        return Holder::Ours(None);
    }
    // A leading NUL makes the name abstract.
    let abstract_name = [&[0u8][..], name.as_bytes()].concat();
    let Ok(sockaddr) = socket2::SockAddr::unix(std::ffi::OsStr::from_bytes(&abstract_name)) else {
        return Holder::Ours(None);
    };
    // SAFETY: no arguments, no pointers; always succeeds.
    let me = unsafe { libc::geteuid() };
    match sock.connect(&sockaddr) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => return Holder::NotListening,
        // A full backlog cannot be asked; the kernel's socket table can
        // still say whose the listener is.
        Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => {
            return match listener_uid(&abstract_name) {
                Some(uid) if uid != me => Holder::Other { pid: None, uid },
                _ => Holder::Ours(None),
            };
        }
        // Anything else: cannot tell, so refuse.
        Err(_) => return Holder::Ours(None),
    }
    let mut cred = libc::ucred { pid: 0, uid: 0, gid: 0 };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` is a plain C struct owned here and `len` is its size:
    // the kernel writes at most `len` bytes into it for `SO_PEERCRED`, on a
    // descriptor `sock` keeps open for the call.
    let r = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Holder::Ours(None);
    }
    // 0: a holder in another PID namespace, whose PID means nothing here.
    let pid = u32::try_from(cred.pid).ok().filter(|&pid| pid != 0);
    if cred.uid == me {
        Holder::Ours(pid)
    } else {
        Holder::Other { pid, uid: cred.uid }
    }
}

/// The owner (uid) of the listening Unix socket bound to `name` (with
/// its leading NUL), from the kernel's socket table (`NETLINK_SOCK_DIAG`,
/// `UDIAG_SHOW_UID`, Linux 5.3): asked without connecting, so a listener
/// whose backlog is full answers too. `None` if the kernel cannot say.
fn listener_uid(name: &[u8]) -> Option<u32> {
    use std::io::Read;
    let sock =
        Socket::new(Domain::from(libc::AF_NETLINK), Type::RAW, Some(Protocol::from(libc::NETLINK_SOCK_DIAG))).ok()?;
    sock.set_read_timeout(Some(std::time::Duration::from_secs(1))).ok()?;
    sock.send(&sock_diag::listeners_request()).ok()?;
    let mut buf = vec![0u8; 64 * 1024];
    // A dump of every listening Unix socket: bounded by the machine's.
    loop {
        let n = (&sock).read(&mut buf).ok()?;
        match sock_diag::find_uid(&buf[..n], name) {
            sock_diag::Found::Uid(uid) => return Some(uid),
            sock_diag::Found::End => return None,
            sock_diag::Found::More => {}
        }
    }
}

/// The bytes of a `NETLINK_SOCK_DIAG` dump of listening Unix sockets, and
/// reading one answer's messages: plain byte work, tested on its own.
mod sock_diag {
    const SOCK_DIAG_BY_FAMILY: u16 = 20;
    const NLM_F_REQUEST: u16 = 1;
    const NLM_F_DUMP: u16 = 0x300;
    const NLMSG_ERROR: u16 = 2;
    const NLMSG_DONE: u16 = 3;
    const UDIAG_SHOW_NAME: u32 = 0x01;
    const UDIAG_SHOW_UID: u32 = 0x40;
    const UNIX_DIAG_NAME: u16 = 0;
    const UNIX_DIAG_UID: u16 = 7;
    const TCP_LISTEN: u32 = 10;
    /// `struct nlmsghdr`, then `struct unix_diag_msg`.
    const HEADER: usize = 16;
    const DIAG_MSG: usize = 16;

    /// `nlmsghdr` + `unix_diag_req`: every listening Unix socket, with
    /// its name and its owner's uid.
    pub fn listeners_request() -> Vec<u8> {
        let mut m = Vec::with_capacity(40);
        m.extend_from_slice(&40u32.to_ne_bytes());
        m.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
        m.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
        m.extend_from_slice(&[0; 8]); // sequence, port id
        m.push(libc::AF_UNIX as u8);
        m.extend_from_slice(&[0; 3]); // protocol, padding
        m.extend_from_slice(&(1u32 << TCP_LISTEN).to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes()); // any inode
        m.extend_from_slice(&(UDIAG_SHOW_NAME | UDIAG_SHOW_UID).to_ne_bytes());
        m.extend_from_slice(&[0; 8]); // cookie
        m
    }

    #[derive(Debug, PartialEq, Eq)]
    pub enum Found {
        Uid(u32),
        /// The dump ended (or failed) without it.
        End,
        /// Not in this part; read the next.
        More,
    }

    fn u16_at(b: &[u8], at: usize) -> Option<u16> {
        Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
    }

    fn u32_at(b: &[u8], at: usize) -> Option<u32> {
        Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
    }

    fn align4(n: usize) -> usize {
        (n + 3) & !3
    }

    /// Looks for the socket named `name` in one `recv` of the dump.
    pub fn find_uid(buf: &[u8], name: &[u8]) -> Found {
        let mut at = 0;
        while let (Some(len), Some(kind)) = (u32_at(buf, at), u16_at(buf, at + 4)) {
            let len = len as usize;
            if len < HEADER || at + len > buf.len() {
                return Found::End;
            }
            match kind {
                NLMSG_DONE | NLMSG_ERROR => return Found::End,
                SOCK_DIAG_BY_FAMILY => {
                    let (mut named, mut uid) = (false, None);
                    let mut attr = at + HEADER + DIAG_MSG;
                    while let (Some(alen), Some(akind)) = (u16_at(buf, attr), u16_at(buf, attr + 2)) {
                        let alen = alen as usize;
                        if alen < 4 || attr + alen > at + len {
                            break;
                        }
                        let payload = &buf[attr + 4..attr + alen];
                        match akind {
                            UNIX_DIAG_NAME => named = payload == name,
                            UNIX_DIAG_UID => uid = u32_at(payload, 0),
                            _ => {}
                        }
                        attr += align4(alen);
                    }
                    if let (true, Some(uid)) = (named, uid) {
                        return Found::Uid(uid);
                    }
                }
                _ => {}
            }
            at += align4(len);
        }
        Found::More
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        fn attr(kind: u16, payload: &[u8]) -> Vec<u8> {
            let mut a = ((4 + payload.len()) as u16).to_ne_bytes().to_vec();
            a.extend_from_slice(&kind.to_ne_bytes());
            a.extend_from_slice(payload);
            a.resize(align4(a.len()), 0);
            a
        }

        fn message(kind: u16, attrs: &[Vec<u8>]) -> Vec<u8> {
            let body: Vec<u8> = attrs.concat();
            let len = HEADER + DIAG_MSG + body.len();
            let mut m = (len as u32).to_ne_bytes().to_vec();
            m.extend_from_slice(&kind.to_ne_bytes());
            m.extend_from_slice(&[0; 10]);
            m.extend_from_slice(&[0; DIAG_MSG]);
            m.extend_from_slice(&body);
            m
        }

        #[test]
        fn finds_the_named_listeners_uid_among_others() {
            let name = b"\0rendezvous/port/80";
            let mut dump = message(
                SOCK_DIAG_BY_FAMILY,
                &[attr(UNIX_DIAG_NAME, b"\0other"), attr(UNIX_DIAG_UID, &7u32.to_ne_bytes())],
            );
            // A name that only starts the same is another socket.
            dump.extend(message(
                SOCK_DIAG_BY_FAMILY,
                &[attr(UNIX_DIAG_NAME, b"\0rendezvous/port/8"), attr(UNIX_DIAG_UID, &8u32.to_ne_bytes())],
            ));
            assert_eq!(find_uid(&dump, name), Found::More);
            dump.extend(message(
                SOCK_DIAG_BY_FAMILY,
                &[attr(UNIX_DIAG_UID, &65534u32.to_ne_bytes()), attr(UNIX_DIAG_NAME, name)],
            ));
            assert_eq!(find_uid(&dump, name), Found::Uid(65534));
        }

        #[test]
        fn a_dump_ends_at_done_and_garbage_ends_it() {
            let name = b"\0rendezvous/port/80";
            assert_eq!(find_uid(&message(NLMSG_DONE, &[]), name), Found::End);
            assert_eq!(find_uid(&[], name), Found::More);
            // A length past the buffer, or below a header: stop, never panic.
            let mut bad = message(SOCK_DIAG_BY_FAMILY, &[attr(UNIX_DIAG_NAME, name)]);
            bad[0] = 0xff;
            assert_eq!(find_uid(&bad, name), Found::End);
            assert_eq!(find_uid(&[3, 0, 0, 0, 20, 0], name), Found::End);
            // An attribute claiming more than its message: ignored.
            let mut m =
                message(SOCK_DIAG_BY_FAMILY, &[attr(UNIX_DIAG_NAME, name), attr(UNIX_DIAG_UID, &1u32.to_ne_bytes())]);
            let uid_attr = HEADER + DIAG_MSG + align4(4 + name.len());
            m[uid_attr] = 200;
            assert_eq!(find_uid(&m, name), Found::More);
        }

        #[test]
        fn the_request_is_a_whole_dump_request() {
            let r = listeners_request();
            assert_eq!(r.len(), 40);
            assert_eq!(u32_at(&r, 0), Some(40));
            assert_eq!(u16_at(&r, 4), Some(SOCK_DIAG_BY_FAMILY));
            assert_eq!(r[HEADER], libc::AF_UNIX as u8);
        }
    }
}

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

/// Binds `n` listeners sharing one port, holding the port's lock. With
/// port 0 the kernel picks the port for the first and the others join it.
pub fn bind_listeners(
    addr: SocketAddr,
    n: usize,
    lock: Option<PortLock>,
) -> Result<(Vec<std::net::TcpListener>, SocketAddr, PortLock), StartupError> {
    let lock = if addr.port() != 0 {
        let lock = match lock {
            Some(l) => l,
            None => lock_port(addr.port())?,
        };
        // A plain bind (no SO_REUSEPORT) fails if any other program
        // listens on the port.
        match std::net::TcpListener::bind(addr) {
            Ok(probe) => drop(probe),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => return Err(StartupError::PortInUse(addr)),
            Err(e) => return Err(StartupError::Bind(addr, e)),
        }
        Some(lock)
    } else {
        None
    };
    let first = reuseport_listener(addr)?;
    let actual = first.local_addr().map_err(|e| StartupError::Bind(addr, e))?;
    let lock = match lock {
        Some(l) => l,
        None => lock_port(actual.port())?,
    };
    let mut listeners = vec![first];
    for _ in 1..n {
        listeners.push(reuseport_listener(actual)?);
    }
    Ok((listeners, actual, lock))
}

/// The shards, recovered from the data directory (if any), and what the
/// cores need to continue the log.
struct Restored {
    shards: Vec<Shard>,
    /// The version clock the shards share.
    versions: Arc<Versions>,
    secret_key: SecretKey,
    /// The first log segment number this process may use.
    next_segment: u64,
    data_dir: Option<DataDir>,
}

/// Opens and recovers the data directory into one shard per core.
fn restore(config: &Config, routing: &Routing, budget: &KeyBudget) -> Result<Restored, StartupError> {
    let n = config.threads;
    // The dense vectors reserve this much address space; the table grows.
    let per_core = (config.max_num_kv / n + config.max_num_kv / n / 8 + 1024).min(config.max_num_kv);
    let versions = Arc::new(Versions::default());
    let mut shards: Vec<Shard> = (0..n).map(|_| Shard::sharing(per_core, versions.clone())).collect();
    // Versions (ETags) never go backwards: above the clock (8 per ms leaves
    // room for bursts), and above every version the directory ever issued.
    let clock_floor = crate::clock::unix_ms() << 3;
    let Some(path) = config.data_dir() else {
        log::warn!("persistence is off (-dataDir is empty): a restart loses every key");
        shards.iter_mut().for_each(|s| s.raise_version_floor(clock_floor));
        let secret_key = SecretKey::random().map_err(StartupError::Random)?;
        return Ok(Restored { shards, versions, secret_key, next_segment: 0, data_dir: None });
    };
    let dir = DataDir::open(path, !config.was_given("dataDir")).map_err(StartupError::DataDir)?;
    // Resolved once: a symlink flipped later does not move this process.
    let path = dir.path();
    let started = Instant::now();
    let now = crate::clock::unix_ms();
    let max_expiry = now.saturating_add(config.expire_duration.as_millis() as u64);
    // systemd's start timeout (90 s by default) must not kill a long
    // replay: it is told to wait while recovery runs.
    let report = lifecycle::while_starting(|| {
        recovery::recover(dir.dir(), &mut shards, |k| routing.owner(k), budget, now, max_expiry, recovery::Mode::Repair)
    })
    .map_err(StartupError::Recovery)?;
    let secret_key = dir
        .secret_key(report.secret_key.clone())
        .map_err(|e| StartupError::SecretKey(path.join(crate::persist::datadir::SECRET_FILE), e))?;
    for s in &mut shards {
        s.raise_version_floor(clock_floor);
    }
    let snap = match report.snapshot_created_ms {
        Some(t) => {
            format!("snapshot of {} keys written {}s ago", report.snapshot_entries, now.saturating_sub(t) / 1000)
        }
        None => "no snapshot".to_string(),
    };
    log::info!(
        "recovered {} keys from {} in {} ms: {snap}, {} log records in {} segments read ({} already in the snapshot), {} expired since, {} torn tails cut",
        report.live,
        path.display(),
        started.elapsed().as_millis(),
        report.records,
        report.segments,
        report.skipped,
        report.expired,
        report.torn.len()
    );
    if report.live > config.max_num_kv {
        log::warn!(
            "{} keys are stored, more than -maxNumKV {}: all are kept; creates are refused until the store is below the limit",
            report.live,
            config.max_num_kv
        );
    }
    Ok(Restored { shards, versions, secret_key, next_segment: report.next_seq, data_dir: Some(dir) })
}

/// Binds the admin address. Busy and given explicitly: an error. Busy by
/// default: a warning, and no admin server for this instance.
fn bind_admin(config: &Config) -> Result<Option<std::net::TcpListener>, StartupError> {
    let AdminAddr::On(addr) = config.metrics_addr else { return Ok(None) };
    match std::net::TcpListener::bind(addr) {
        Ok(l) => Ok(Some(l)),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && !config.was_given("metricsAddr") => {
            log::warn!(
                "the default admin address {addr} is taken (another instance?): metrics, /healthz and /readyz are \
                 off for this instance; give it its own with -metricsAddr"
            );
            Ok(None)
        }
        Err(e) => Err(StartupError::Metrics(addr, e)),
    }
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
    let started = std::time::SystemTime::now();
    let signals = lifecycle::install_signals();
    let n = config.threads;
    let routing = Routing::new(n);
    let (per_ip, per_net) = config.key_quotas();
    let budget = Arc::new(KeyBudget::with_quotas(config.max_num_kv, per_ip, per_net));
    raise_fd_limit(config.max_conns);
    // The port first: a second instance must fail before it touches the
    // data directory or spends time loading.
    let port_lock = if config.port != 0 { Some(lock_port(config.port)?) } else { None };
    // The admin address next, for the same reason, and served from here on:
    // liveness and "starting" through a long recovery.
    let admin = match bind_admin(&config)? {
        Some(listener) => {
            let start_unix = crate::runtime::exporter::start_time(started);
            let (bound, attach) = crate::runtime::admin::start(listener, start_unix)
                .map_err(|e| StartupError::Runtime(format!("cannot start the admin server: {e}")))?;
            log::info!(
                "metrics on http://{bound}/metrics (/healthz and /readyz too; until the store is recovered, \
                 /metrics holds only rendezvous_ready 0 and the process metrics)"
            );
            Some(attach)
        }
        None => None,
    };
    let restored = restore(&config, &routing, &budget)?;
    let (listeners, bound, port_lock) = bind_listeners(config.listen(), n, port_lock)?;
    // Before any core accepts: no connection lands on a core placement
    // does not want yet.
    // The process's CPUs, before any core narrows its own mask.
    let process_cpus = sched::allowed_cpus();
    let placed = (n > 1 && config.placement == crate::config::Placement::Pack)
        .then(|| crate::runtime::placement::start(&listeners[0], n, &process_cpus))
        .flatten();
    let (mesh, receivers) = Mesh::new(n);
    let Restored { shards, versions, secret_key, next_segment, data_dir } = restored;
    let persist = data_dir.is_some();
    let shared = Arc::new(Shared {
        routing,
        mesh,
        cells: Arc::new(Cells::new(shards.into_iter().map(Owned::new).collect(), persist)),
        versions,
        budget,
        limiter: Arc::new(Limiter::new(config.max_requests, config.max_requests_per_net, config.max_tracked_ips)),
        periods: Periods::new(Instant::now(), config.reset_duration),
        secret_key,
        listen_text: bound.to_string(),
        stats: (0..n).map(|_| Default::default()).collect(),
        seats: Arc::new(Seats::new(n)),
        placement: crate::runtime::placement::Placement::new(n, placed, process_cpus.clone()),
        snapshot_stats: Default::default(),
        metrics_on: admin.is_some(),
        conn_limits: ConnLimits::new(
            config.max_conns,
            config.max_conns_per_ip,
            config.max_conns_per_net,
            config.trusted_proxies.clone(),
        ),
        // Parked reads are capped per client and per network, whoever the
        // peer is: behind a proxy the connection caps exempt it, and only
        // these bound what one network parks.
        waiter_limits: ConnLimits::new(
            config.max_waiters,
            config.max_waiters_per_ip,
            config.max_waiters_per_net,
            TrustedProxies::none(),
        ),
        phase: PhaseCell::default(),
        next_segment: AtomicU64::new(next_segment + n as u64),
        data_dir: data_dir.map(Arc::new),
        port_lock,
        config,
        born: Instant::now(),
    });
    if let Some(attach) = admin {
        attach.attach(shared.clone()).map_err(|e| StartupError::Runtime(format!("cannot start the metrics: {e}")))?;
    }
    let cpus = match shared.config.cpu_affinity {
        CpuAffinity::Spread => {
            let allowed = &process_cpus;
            let cpus = sched::placement(allowed, n);
            if cpus.iter().any(Option::is_none) {
                log::info!("{n} worker threads for {} CPUs: leaving their placement to the kernel", allowed.len());
            }
            cpus
        }
        CpuAffinity::None => vec![None; n],
    };
    let (ready_tx, ready_rx) = mpsc::channel();
    let cores = listeners.into_iter().zip(receivers).zip(cpus).enumerate();
    for (id, ((listener, inbox), cpu)) in cores {
        let start = CoreStart {
            id,
            shared: shared.clone(),
            listener,
            inbox,
            ready: ready_tx.clone(),
            // The trimming helper ends with the core's log (its handle is
            // not needed).
            log: persist.then(|| LogStart {
                first_segment: next_segment + id as u64,
                trim: Trimmer::start(id, shared.config.sched_policy).0,
            }),
            cpu,
        };
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
    log::info!("{}", banner(&shared, bound, &drivers.join("+")));
    // In the same message, so `systemctl status` no longer shows the
    // recovery's status once the server serves.
    lifecycle::notify_systemd(&format!("READY=1\nSTATUS=serving on {bound}"));
    lifecycle::run(shared, signals)
}

/// The startup line: version, effective configuration, driver.
fn banner(shared: &Shared, bound: SocketAddr, driver: &str) -> String {
    let c = &shared.config;
    let persistence = match c.data_dir() {
        Some(d) => format!(
            "data {} (fsync {}, snapshot every {}{})",
            d.display(),
            match c.fsync {
                crate::config::Fsync::Always => "always",
                crate::config::Fsync::EverySec => "everysec",
                crate::config::Fsync::No => "no",
            },
            crate::duration::format(c.save_duration),
            match c.max_log_size {
                0 => String::new(),
                n => format!(" or {n} bytes of log"),
            }
        ),
        None => "no persistence".to_string(),
    };
    format!(
        "rendezvous {} ({}) listening on http://{bound} ({} {}, {driver} driver, {persistence}, maxNumKV {}, \
         TTL up to {}, maxRequests {} per {}, trusted proxies {})",
        crate::VERSION,
        crate::GIT_REVISION,
        c.threads,
        if c.threads == 1 { "thread" } else { "threads" },
        c.max_num_kv,
        crate::duration::format(c.expire_duration),
        c.max_requests,
        crate::duration::format(c.reset_duration),
        c.trusted_proxies,
    )
}
