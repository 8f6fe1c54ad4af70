//! The command line: Go-style flags parsed by `gumdrop` into typed values.
//!
//! Each flag is written once, as a field of `Flags`: its Go name, default,
//! meta-variable, help line and parser are the field's attributes, and the
//! field's type is the validated value the server reads (a `u16` port, an
//! `IpAddr`, parsed `TrustedProxies`, a capped `Duration`). The `-h` text,
//! the list of boolean flags and the README's flag table (checked by a test)
//! all come from that one definition; nothing is copied into a second struct.
//!
//! Operators' command lines for the Go server must keep working, so flags are
//! accepted as `-name value`, `-name=value`, `--name value` and
//! `--name=value`, booleans as `-flag`, `-flag=true|false`, and the Go
//! server's misspelt `-disableLocalIPWaring`. `normalize_args` rewrites all of
//! that into the double-dash form gumdrop expects; whether a flag is boolean
//! is asked of gumdrop itself. Every failure is a `ConfigError` naming the
//! flag, echoing the bad value and saying what is valid; `main` prints it and
//! exits 2. Values the machine cannot hold are refused here, before anything
//! is allocated.

use crate::duration;
use crate::request::clientip::TrustedProxies;
use gumdrop::Options;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

/// Longest key accepted: keys travel in the 8 KiB request head.
pub const MAX_KEY_SIZE: usize = 4096;
/// Largest `-maxValueSize`: one request may buffer this much.
pub const MAX_VALUE_SIZE: usize = 1 << 30;
/// Durations beyond this are capped: the runtime's timers wrap after about
/// two years, and nothing here needs longer.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);
/// Bytes of memory a key costs (entry, tag and table share), for the
/// `-maxNumKV` sanity check against the machine's memory.
const BYTES_PER_KEY_SLOT: u64 = 48;

/// Which monoio driver the cores run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoDriver {
    /// io_uring, falling back to epoll if it cannot be set up.
    Auto,
    Uring,
    Epoll,
}

/// The Linux scheduling policy of the cores' threads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SchedPolicy {
    /// `SCHED_BATCH`: a woken core waits for the running thread's turn to
    /// end instead of preempting it, so work arrives and is answered in
    /// batches (README "Performance" has the figures); unpinned cores that
    /// find themselves on one CPU take turns on it, and one left waiting
    /// behind another program is moved to a core's CPU (`runtime::turns`).
    Batch,
    /// `SCHED_OTHER`, the default for every thread.
    Normal,
}

/// Where the cores' threads run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CpuAffinity {
    /// Core i pinned to the i-th CPU the process may use, when there is
    /// one core per such CPU (`-threads 0`): a shorter saturated tail for
    /// keep-alive traffic, less throughput for one request per connection.
    Spread,
    /// Wherever the kernel puts them.
    None,
}

/// Which cores take new connections (`runtime::placement`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// As few cores as carry the load; more when they are busy and a CPU
    /// stands idle for another.
    Pack,
    /// Every core, evenly (the kernel's `SO_REUSEPORT` hashing).
    Spread,
}

/// When the write-ahead log is flushed to disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fsync {
    /// Every write is durable before it is answered (group-committed).
    Always,
    /// Written to the OS before it is answered; fsynced once a second.
    EverySec,
    /// Written to the OS before it is answered; the OS decides when to flush.
    No,
}

/// A key quota: a number of live keys, or a share of `-maxNumKV`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyQuota {
    Off,
    Keys(usize),
    /// Hundredths of a percent of `-maxNumKV` (`0.5%` is 50).
    BasisPoints(u32),
}

impl KeyQuota {
    /// The number of keys this quota allows with `max_num_kv` in the store
    /// (0: no quota). A share rounds up, so it never allows zero keys.
    pub fn keys(self, max_num_kv: usize) -> usize {
        match self {
            KeyQuota::Off => 0,
            KeyQuota::Keys(n) => n.min(max_num_kv),
            KeyQuota::BasisPoints(bp) => {
                ((max_num_kv as u128 * u128::from(bp)).div_ceil(10_000) as usize).clamp(1, max_num_kv)
            }
        }
    }
}

/// The admin (metrics and health) listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdminAddr {
    Off,
    On(SocketAddr),
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// The flags, each declared once (field = flag; attributes = its Go name,
/// default, meta-variable and help; type = its validated value).
#[derive(Debug, Clone, Options)]
#[options(no_short)]
pub struct Flags {
    #[options(short = "h", help = "print this help and exit")]
    pub help: bool,
    #[options(help = "print the version and exit")]
    pub version: bool,

    #[options(
        long = "maxKeySize",
        default = "100",
        meta = "BYTES",
        parse(try_from_str = "key_size"),
        help = "maximum key length, before ip/ expansion (1 to 4096; larger values are capped)"
    )]
    pub max_key_size: usize,
    #[options(
        long = "maxValueSize",
        default = "1000",
        meta = "BYTES",
        parse(try_from_str = "value_size"),
        help = "maximum value + owner secret length (1 to 1 GiB)"
    )]
    pub max_value_size: usize,
    #[options(
        long = "maxNumKV",
        default = "100000",
        meta = "N",
        parse(try_from_str = "max_num_kv"),
        help = "maximum number of live keys in the whole server"
    )]
    pub max_num_kv: usize,
    #[options(
        long = "maxKeysPerIP",
        default = "0.5%",
        meta = "N|P%",
        parse(try_from_str = "key_quota"),
        help = "live keys one client (IPv4 address, IPv6 /64) may have created: a count or a share of -maxNumKV (0: no quota)"
    )]
    pub max_keys_per_ip: KeyQuota,
    #[options(
        long = "maxKeysPerNet",
        default = "1%",
        meta = "N|P%",
        parse(try_from_str = "key_quota"),
        help = "live keys one network (IPv4 /24, IPv6 /48) may have created: a count or a share of -maxNumKV (0: no quota)"
    )]
    pub max_keys_per_net: KeyQuota,
    #[options(
        long = "expireDuration",
        default = "2h",
        meta = "DURATION",
        parse(try_from_str = "positive_duration"),
        help = "maximum and default TTL"
    )]
    pub expire_duration: Duration,
    #[options(
        long = "resetDuration",
        default = "1m",
        meta = "DURATION",
        parse(try_from_str = "positive_duration"),
        help = "rate-limit refill period"
    )]
    pub reset_duration: Duration,
    #[options(
        long = "saveDuration",
        default = "30m",
        meta = "DURATION",
        parse(try_from_str = "positive_duration"),
        help = "snapshot (checkpoint) period"
    )]
    pub save_duration: Duration,
    #[options(
        long = "maxRequests",
        default = "17",
        meta = "N",
        parse(try_from_str = "max_requests"),
        help = "rate-limit tokens per client IP (IPv6: /64) per period; GET costs 1, writes 3 (0 to 4294967295)"
    )]
    pub max_requests: u32,
    #[options(
        long = "maxRequestsPerNet",
        default = "170",
        meta = "N",
        parse(try_from_str = "max_requests"),
        help = "rate-limit tokens per network (IPv4 /24, IPv6 /48) per period, shared by its clients (0 to 4294967295)"
    )]
    pub max_requests_per_net: u32,
    #[options(
        long = "port",
        default = "80",
        meta = "PORT",
        parse(try_from_str = "port"),
        help = "listening port (0: any free port)"
    )]
    pub port: u16,
    #[options(
        long = "l",
        default = "0.0.0.0",
        meta = "ADDR",
        parse(try_from_str = "listen_ip"),
        help = "listen address (:: for dual stack)"
    )]
    pub listen_ip: IpAddr,
    #[options(
        long = "disableLocalIPWarning",
        help = "do not warn about requests from localhost without X-Forwarded-For"
    )]
    pub disable_local_ip_warning: bool,

    #[options(
        long = "threads",
        default = "0",
        meta = "N",
        parse(try_from_str = "threads"),
        help = "worker threads, one shard each (0: one per available core; at most 1024)"
    )]
    pub threads: usize,
    #[options(
        long = "trustedProxies",
        default = "127.0.0.0/8,::1/128,10.0.0.0/8,172.16.0.0/12,192.168.0.0/16,fc00::/7",
        meta = "CIDRS",
        parse(try_from_str = "TrustedProxies::parse"),
        help = "comma-separated peers whose X-Forwarded-For is believed (empty: none)"
    )]
    pub trusted_proxies: TrustedProxies,
    #[options(
        long = "readTimeout",
        default = "10s",
        meta = "DURATION",
        parse(try_from_str = "positive_duration"),
        help = "deadline to receive a whole request (head and body) once it starts"
    )]
    pub read_timeout: Duration,
    #[options(
        long = "idleTimeout",
        default = "60s",
        meta = "DURATION",
        parse(try_from_str = "positive_duration"),
        help = "close keep-alive connections idle this long; also the write deadline"
    )]
    pub idle_timeout: Duration,
    #[options(
        long = "maxTrackedIPs",
        default = "1000000",
        meta = "N",
        parse(try_from_str = "max_tracked_ips"),
        help = "rate-limit buckets kept per period, server-wide; new clients beyond it get 429 (none when both limits are 4294967295: the limiter is off)"
    )]
    pub max_tracked_ips: usize,
    #[options(
        long = "ioDriver",
        default = "auto",
        meta = "auto|uring|epoll",
        parse(try_from_str = "io_driver"),
        help = "I/O driver: io_uring with epoll fallback, or force one"
    )]
    pub io_driver: IoDriver,
    #[options(
        long = "schedPolicy",
        default = "batch",
        meta = "batch|normal",
        parse(try_from_str = "sched_policy"),
        help = "scheduling policy of the worker threads: SCHED_BATCH (fewer wake-ups, more throughput; unpinned cores take turns on a shared CPU, and one waiting behind another program is moved to a core's CPU) or SCHED_OTHER"
    )]
    pub sched_policy: SchedPolicy,
    #[options(
        long = "cpuAffinity",
        default = "none",
        meta = "spread|none",
        parse(try_from_str = "cpu_affinity"),
        help = "with one worker thread per CPU the process may use (-threads 0), pin thread i to the i-th; or let the kernel place them"
    )]
    pub cpu_affinity: CpuAffinity,
    #[options(
        long = "placement",
        default = "pack",
        meta = "pack|spread",
        parse(try_from_str = "placement"),
        help = "which cores take new connections: as few as carry the load, more when they are busy and a CPU stands idle (connections beyond a core's share are asked to reconnect); or every core evenly"
    )]
    pub placement: Placement,
    #[options(
        long = "dataDir",
        default = "rendezvous-data",
        meta = "DIR",
        parse(try_from_str = "data_dir"),
        help = "directory for the write-ahead log and snapshots, owned by one process (empty: keep nothing)"
    )]
    pub data_dir: PathBuf,
    #[options(
        long = "fsync",
        default = "everysec",
        meta = "always|everysec|no",
        parse(try_from_str = "fsync"),
        help = "when the log reaches the disk: before each answer, once a second, or when the OS likes"
    )]
    pub fsync: Fsync,
    #[options(
        long = "maxLogSize",
        default = "1073741824",
        meta = "BYTES",
        parse(try_from_str = "log_size"),
        help = "take a snapshot early once the log has grown this much (and by at least the last snapshot's size) since the last one (0: only every -saveDuration)"
    )]
    pub max_log_size: u64,
    #[options(
        long = "shutdownTimeout",
        default = "5s",
        meta = "DURATION",
        parse(try_from_str = "positive_duration"),
        help = "on SIGTERM/SIGINT, how long in-flight requests may take before the final snapshot"
    )]
    pub shutdown_timeout: Duration,
    #[options(
        long = "metricsAddr",
        default = "127.0.0.1:9464",
        meta = "ADDR:PORT",
        parse(try_from_str = "admin_addr"),
        help = "admin address: /metrics, /healthz, /readyz; never the public port (empty: off; :PORT: all interfaces)"
    )]
    pub metrics_addr: AdminAddr,
    #[options(
        long = "maxConns",
        default = "10000",
        meta = "N",
        parse(try_from_str = "max_conns"),
        help = "open client connections, server-wide; at the limit the ones idle longest make room, or else more are closed at once"
    )]
    pub max_conns: usize,
    #[options(
        long = "maxConnsPerIP",
        default = "256",
        meta = "N",
        parse(try_from_str = "positive_u32"),
        help = "open connections per client IP (IPv6: /64); trusted proxies are exempt"
    )]
    pub max_conns_per_ip: u32,
    #[options(
        long = "maxConnsPerNet",
        default = "1024",
        meta = "N",
        parse(try_from_str = "positive_u32"),
        help = "open connections per client network (IPv4 /24, IPv6 /48); trusted proxies are exempt"
    )]
    pub max_conns_per_net: u32,
    #[options(
        long = "maxWait",
        default = "60s",
        meta = "DURATION",
        parse(try_from_str = "positive_duration"),
        help = "longest blocking read (GET /get/<key>?wait=D)"
    )]
    pub max_wait: Duration,
    #[options(
        long = "maxWaiters",
        default = "10000",
        meta = "N",
        parse(try_from_str = "max_waiters"),
        help = "blocking reads parked at once, server-wide (over: 503)"
    )]
    pub max_waiters: usize,
    #[options(
        long = "maxWaitersPerIP",
        default = "64",
        meta = "N",
        parse(try_from_str = "positive_u32"),
        help = "blocking reads parked at once per client IP (over: 429)"
    )]
    pub max_waiters_per_ip: u32,
    #[options(
        long = "maxWaitersPerNet",
        default = "256",
        meta = "N",
        parse(try_from_str = "positive_u32"),
        help = "blocking reads parked at once per client network (IPv4 /24, IPv6 /48; over: 429)"
    )]
    pub max_waiters_per_net: u32,
    #[options(
        long = "logFormat",
        default = "text",
        meta = "text|json",
        parse(try_from_str = "log_format"),
        help = "log lines as text, or as JSON objects (one per line) for log shippers"
    )]
    pub log_format: LogFormat,
    #[options(
        long = "logLevel",
        default = "info",
        meta = "error|warn|info|debug",
        parse(try_from_str = "log_level"),
        help = "least severe log lines written"
    )]
    pub log_level: log::LevelFilter,
    #[options(
        long = "dump",
        default = "",
        meta = "DIR",
        help = "print the store kept in DIR (snapshot + log) as JSON lines and exit; safe while a server runs"
    )]
    pub dump: String,
}

/// The validated configuration: the flags, plus what parsing noticed.
#[derive(Debug, Clone)]
pub struct Config {
    pub flags: Flags,
    /// Accepted but questionable values, logged at startup.
    pub warnings: Vec<String>,
    /// Flags given on the command line (Go names), as opposed to defaults.
    pub given: Vec<String>,
}

impl std::ops::Deref for Config {
    type Target = Flags;

    fn deref(&self) -> &Flags {
        &self.flags
    }
}

impl Flags {
    /// The key quotas in keys, per client and per network (0: off).
    pub fn key_quotas(&self) -> (usize, usize) {
        (self.max_keys_per_ip.keys(self.max_num_kv), self.max_keys_per_net.keys(self.max_num_kv))
    }
}

impl Config {
    /// The listen address.
    pub fn listen(&self) -> SocketAddr {
        SocketAddr::new(self.listen_ip, self.port)
    }

    /// The data directory, unless persistence is off (`-dataDir ""`).
    pub fn data_dir(&self) -> Option<&std::path::Path> {
        (!self.flags.data_dir.as_os_str().is_empty()).then_some(self.flags.data_dir.as_path())
    }

    /// Whether `-name` was given on the command line.
    pub fn was_given(&self, name: &str) -> bool {
        self.given.iter().any(|g| g == name)
    }
}

/// What the command line asked for.
#[derive(Debug)]
pub enum Parsed {
    Run(Box<Config>),
    Help(String),
    Version(String),
    Dump(PathBuf),
}

/// A command line that cannot run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError(pub String);

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

/// Why a flag's value was refused (gumdrop puts the flag's name in front).
#[derive(Debug)]
pub struct BadValue(String);

impl std::fmt::Display for BadValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn bad(value: &str, want: &str) -> BadValue {
    BadValue(format!("{value:?} ({want})"))
}

/// A whole number in `min..=max`.
fn ranged(s: &str, min: u64, max: u64) -> Result<u64, BadValue> {
    let want = || bad(s, &format!("want a whole number from {min} to {max}"));
    let n: u64 = s.trim().parse().map_err(|_| want())?;
    if n < min || n > max {
        return Err(want());
    }
    Ok(n)
}

fn key_size(s: &str) -> Result<usize, BadValue> {
    // The Go server took any size; values over the head's capacity are capped
    // (with a warning), not refused.
    Ok(ranged(s, 1, u64::MAX)? as usize)
}

fn log_size(s: &str) -> Result<u64, BadValue> {
    ranged(s, 0, u64::MAX)
}

fn value_size(s: &str) -> Result<usize, BadValue> {
    Ok(ranged(s, 1, MAX_VALUE_SIZE as u64)? as usize)
}

/// The machine's memory, for sanity checks (`None` if unknown).
fn total_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kb: u64 = info.lines().find_map(|l| l.strip_prefix("MemTotal:"))?.split_whitespace().next()?.parse().ok()?;
    Some(kb * 1024)
}

fn max_num_kv(s: &str) -> Result<usize, BadValue> {
    let memory = total_memory().unwrap_or(u64::MAX);
    let max = (memory / BYTES_PER_KEY_SLOT).min(u32::MAX as u64 * 64);
    let n = ranged(s, 1, u64::MAX).map_err(|_| bad(s, &format!("want a whole number from 1 to {max}")))?;
    if n > max {
        return Err(bad(
            s,
            &format!(
                "the key tables alone would need {} GiB and this machine has {} GiB: at most {max}",
                n.saturating_mul(BYTES_PER_KEY_SLOT) >> 30,
                memory >> 30
            ),
        ));
    }
    Ok(n as usize)
}

fn max_requests(s: &str) -> Result<u32, BadValue> {
    Ok(ranged(s, 0, u32::MAX as u64)? as u32)
}

fn key_quota(s: &str) -> Result<KeyQuota, BadValue> {
    let want = || bad(s, "want a number of keys such as 500, a share of -maxNumKV such as 0.5%, or 0 for none");
    let t = s.trim();
    if let Some(pct) = t.strip_suffix('%') {
        let p: f64 = pct.trim().parse().map_err(|_| want())?;
        if !(p > 0.0 && p <= 100.0) {
            return Err(want());
        }
        // At least one basis point: "0.001%" means the smallest share, not none.
        return Ok(KeyQuota::BasisPoints(((p * 100.0).round() as u32).max(1)));
    }
    match t.parse::<u64>().map_err(|_| want())? {
        0 => Ok(KeyQuota::Off),
        n => Ok(KeyQuota::Keys(usize::try_from(n).map_err(|_| want())?)),
    }
}

fn port(s: &str) -> Result<u16, BadValue> {
    Ok(ranged(s, 0, 65535)? as u16)
}

fn threads(s: &str) -> Result<usize, BadValue> {
    match ranged(s, 0, 1024)? {
        0 => Ok(std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)),
        n => Ok(n as usize),
    }
}

fn max_tracked_ips(s: &str) -> Result<usize, BadValue> {
    Ok(ranged(s, 1, 100_000_000)? as usize)
}

fn max_conns(s: &str) -> Result<usize, BadValue> {
    Ok(ranged(s, 1, 10_000_000)? as usize)
}

fn max_waiters(s: &str) -> Result<usize, BadValue> {
    Ok(ranged(s, 1, 10_000_000)? as usize)
}

fn positive_u32(s: &str) -> Result<u32, BadValue> {
    Ok(ranged(s, 1, u32::MAX as u64)? as u32)
}

fn positive_duration(s: &str) -> Result<Duration, BadValue> {
    let d = duration::parse_positive(s).map_err(|e| bad(s, &e.to_string()))?;
    Ok(d.min(MAX_DURATION))
}

fn listen_ip(s: &str) -> Result<IpAddr, BadValue> {
    s.trim_start_matches('[')
        .trim_end_matches(']')
        .parse()
        .map_err(|_| bad(s, "want an IP address such as 0.0.0.0 or ::"))
}

fn io_driver(s: &str) -> Result<IoDriver, BadValue> {
    match s {
        "auto" => Ok(IoDriver::Auto),
        "uring" | "io_uring" => Ok(IoDriver::Uring),
        "epoll" | "legacy" => Ok(IoDriver::Epoll),
        _ => Err(bad(s, "want auto, uring or epoll")),
    }
}

fn sched_policy(s: &str) -> Result<SchedPolicy, BadValue> {
    match s {
        "batch" => Ok(SchedPolicy::Batch),
        "normal" | "other" => Ok(SchedPolicy::Normal),
        _ => Err(bad(s, "want batch or normal")),
    }
}

fn cpu_affinity(s: &str) -> Result<CpuAffinity, BadValue> {
    match s {
        "spread" => Ok(CpuAffinity::Spread),
        "none" => Ok(CpuAffinity::None),
        _ => Err(bad(s, "want spread or none")),
    }
}

fn placement(s: &str) -> Result<Placement, BadValue> {
    match s {
        "pack" => Ok(Placement::Pack),
        "spread" => Ok(Placement::Spread),
        _ => Err(bad(s, "want pack or spread")),
    }
}

fn fsync(s: &str) -> Result<Fsync, BadValue> {
    match s {
        "always" => Ok(Fsync::Always),
        "everysec" => Ok(Fsync::EverySec),
        "no" => Ok(Fsync::No),
        _ => Err(bad(s, "want always, everysec or no")),
    }
}

fn data_dir(s: &str) -> Result<PathBuf, BadValue> {
    Ok(PathBuf::from(s))
}

fn admin_addr(s: &str) -> Result<AdminAddr, BadValue> {
    if s.is_empty() {
        return Ok(AdminAddr::Off);
    }
    // Go style: ":9464" means every interface.
    let full = if s.starts_with(':') { format!("[::]{s}") } else { s.to_string() };
    full.parse::<SocketAddr>()
        .map(AdminAddr::On)
        .map_err(|_| bad(s, "want ADDR:PORT such as 127.0.0.1:9464, :9464 for every interface, or empty for off"))
}

fn log_format(s: &str) -> Result<LogFormat, BadValue> {
    match s {
        "text" => Ok(LogFormat::Text),
        "json" => Ok(LogFormat::Json),
        _ => Err(bad(s, "want text or json")),
    }
}

fn log_level(s: &str) -> Result<log::LevelFilter, BadValue> {
    match s {
        "error" => Ok(log::LevelFilter::Error),
        "warn" => Ok(log::LevelFilter::Warn),
        "info" => Ok(log::LevelFilter::Info),
        "debug" => Ok(log::LevelFilter::Debug),
        _ => Err(bad(s, "want error, warn, info or debug")),
    }
}

/// Whether `--name` is a boolean flag, asked of gumdrop itself: a boolean
/// parses alone, a flag that takes a value does not.
fn is_bool_flag(name: &str) -> bool {
    Flags::parse_args_default(&[format!("--{name}")]).is_ok()
}

/// Rewrites Go-style flags into gumdrop's `--name[=value]` form. Returns
/// the arguments and the names of the flags given.
pub fn normalize_args<I: IntoIterator<Item = String>>(args: I) -> Result<(Vec<String>, Vec<String>), ConfigError> {
    let mut out = Vec::new();
    let mut given = Vec::new();
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        if arg == "--" {
            out.push(arg);
            out.extend(args.by_ref());
            break;
        }
        let Some(stripped) = arg.strip_prefix("--").or_else(|| arg.strip_prefix('-')) else {
            out.push(arg);
            continue;
        };
        if stripped.is_empty() {
            out.push(arg);
            continue;
        }
        let (name, value) = match stripped.split_once('=') {
            Some((n, v)) => (n, Some(v)),
            None => (stripped, None),
        };
        let name = match name {
            "h" => "help",
            "disableLocalIPWaring" => "disableLocalIPWarning",
            other => other,
        };
        given.push(name.to_string());
        if is_bool_flag(name) {
            let on = match value {
                None => true,
                Some(v) => parse_go_bool(v)
                    .ok_or_else(|| ConfigError(format!("invalid value {v:?} for -{name}: want true or false")))?,
            };
            if on {
                out.push(format!("--{name}"));
            }
            continue;
        }
        match value {
            Some(v) => out.push(format!("--{name}={v}")),
            // The value is the next argument verbatim, even if it starts with '-'.
            None => match args.next() {
                Some(v) => out.push(format!("--{name}={v}")),
                None => out.push(format!("--{name}")),
            },
        }
    }
    Ok((out, given))
}

/// Go's `strconv.ParseBool`.
fn parse_go_bool(v: &str) -> Option<bool> {
    match v {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Some(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Some(false),
        _ => None,
    }
}

/// One flag as `-h` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlagHelp {
    /// Go name, without the dash.
    pub name: String,
    /// Meta-variable (`DURATION`), empty for booleans.
    pub meta: String,
    pub help: String,
    pub default: Option<String>,
}

/// Every flag, read back from gumdrop's own usage text (the attributes of
/// `Flags` are the only place they are written). A usage line is
/// `--name[ META]` then the help; whether a META follows is asked of
/// gumdrop (`is_bool_flag`), not guessed from the spacing.
pub fn flag_help() -> Vec<FlagHelp> {
    let mut flags: Vec<FlagHelp> = Vec::new();
    for line in Flags::usage().lines() {
        let trimmed = line.trim_start();
        let Some(rest) = trimmed.strip_prefix("-h, --").or_else(|| trimmed.strip_prefix("--")) else {
            // gumdrop wraps a long name's help onto the next line.
            if let (Some(last), false) = (flags.last_mut(), trimmed.is_empty()) {
                if last.help.is_empty() && line.starts_with("   ") {
                    let (help, default) = split_default(trimmed);
                    last.help = help;
                    last.default = default;
                }
            }
            continue;
        };
        let (name, rest) = rest.split_once(' ').unwrap_or((rest, ""));
        let (meta, rest) = if is_bool_flag(name) {
            ("", rest)
        } else {
            let rest = rest.trim_start();
            rest.split_once(' ').unwrap_or((rest, ""))
        };
        let (help, default) = split_default(rest.trim());
        flags.push(FlagHelp { name: name.to_string(), meta: meta.to_string(), help, default });
    }
    flags
}

fn split_default(help: &str) -> (String, Option<String>) {
    match help.strip_suffix(')').and_then(|h| h.rsplit_once(" (default: ")) {
        Some((h, d)) => (h.to_string(), Some(d.to_string())),
        None => (help.to_string(), None),
    }
}

/// The `-h` text, laid out like a Go program's: each flag with its
/// meta-variable, help and default in aligned columns.
pub fn usage() -> String {
    let flags = flag_help();
    let width = flags.iter().map(|f| f.name.len() + 1 + f.meta.len()).max().unwrap_or(0) + 2;
    let mut out = String::from(
        "Usage: rendezvous [flags]\n\nA public, registration-free HTTP key-value rendezvous server.\n\
         Flags take one or two dashes: -name value, -name=value, --name value.\n\
         Durations use Go syntax (500ms, 30s, 5m, 1h30m).\n\nFlags:\n",
    );
    for f in &flags {
        let left = if f.meta.is_empty() { format!("-{}", f.name) } else { format!("-{} {}", f.name, f.meta) };
        let default = match &f.default {
            Some(d) if d.is_empty() => " (default empty)".to_string(),
            Some(d) => format!(" (default {d})"),
            None => String::new(),
        };
        out += &format!("  {left:<width$}{}{default}\n", f.help);
    }
    out
}

/// Parses and validates a command line (without the program name).
pub fn parse<I: IntoIterator<Item = String>>(args: I) -> Result<Parsed, ConfigError> {
    let (args, given) = normalize_args(args)?;
    let flags = Flags::parse_args_default(&args).map_err(|e| ConfigError(go_style(&e.to_string())))?;
    if flags.help {
        return Ok(Parsed::Help(usage()));
    }
    if flags.version {
        return Ok(Parsed::Version(format!("rendezvous {}\n", crate::VERSION)));
    }
    if !flags.dump.is_empty() {
        return Ok(Parsed::Dump(PathBuf::from(&flags.dump)));
    }
    let mut flags = flags;
    let mut warnings = Vec::new();
    if flags.max_key_size > MAX_KEY_SIZE {
        // The Go server took any value; keep such command lines working.
        warnings.push(format!(
            "-maxKeySize {} is more than a request head can carry; using {MAX_KEY_SIZE}",
            flags.max_key_size
        ));
        flags.max_key_size = MAX_KEY_SIZE;
    }
    if flags.max_value_size > 64 << 20 {
        warnings.push(format!("-maxValueSize {} lets one request buffer that much memory", flags.max_value_size));
    }
    for (name, d) in [
        ("expireDuration", flags.expire_duration),
        ("resetDuration", flags.reset_duration),
        ("saveDuration", flags.save_duration),
        ("readTimeout", flags.read_timeout),
        ("idleTimeout", flags.idle_timeout),
        ("shutdownTimeout", flags.shutdown_timeout),
        ("maxWait", flags.max_wait),
    ] {
        if d == MAX_DURATION {
            warnings.push(format!("-{name} is capped at {}", duration::format(MAX_DURATION)));
        }
    }
    if flags.max_requests_per_net < flags.max_requests {
        warnings.push(format!(
            "-maxRequestsPerNet {} is below -maxRequests {}: every client is held to the network's budget",
            flags.max_requests_per_net, flags.max_requests
        ));
    }
    let (per_ip, per_net) = flags.key_quotas();
    if per_ip > 0 && per_net > 0 && per_ip > per_net {
        warnings.push(format!(
            "-maxKeysPerIP ({per_ip} keys) is above -maxKeysPerNet ({per_net} keys): the network quota binds first"
        ));
    }
    if let AdminAddr::On(a) = flags.metrics_addr {
        if a.ip().is_unspecified() {
            warnings.push(format!(
                "-metricsAddr {a} listens on every interface: /metrics is public unless a firewall says otherwise"
            ));
        }
    }
    Ok(Parsed::Run(Box::new(Config { flags, warnings, given })))
}

/// gumdrop's messages in Go spelling: `-name`, and "invalid value for".
fn go_style(s: &str) -> String {
    s.replace("invalid argument to option `--", "invalid value for -")
        .replace("`--", "-")
        .replace("--", "-")
        .replace('`', "")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    fn run(s: &str) -> Config {
        match parse(args(s)) {
            Ok(Parsed::Run(c)) => *c,
            other => panic!("{s}: {other:?}"),
        }
    }

    fn err(s: &str) -> String {
        parse(args(s)).unwrap_err().0
    }

    #[test]
    fn defaults_match_the_go_server() {
        let c = run("");
        assert_eq!(c.max_key_size, 100);
        assert_eq!(c.max_value_size, 1000);
        assert_eq!(c.max_num_kv, 100_000);
        assert_eq!(c.expire_duration, Duration::from_secs(7200));
        assert_eq!(c.reset_duration, Duration::from_secs(60));
        assert_eq!(c.save_duration, Duration::from_secs(1800));
        assert_eq!(c.max_requests, 17);
        assert_eq!(c.listen(), "0.0.0.0:80".parse::<SocketAddr>().unwrap());
        assert!(!c.disable_local_ip_warning);
        assert_eq!(c.read_timeout, Duration::from_secs(10));
        assert_eq!(c.idle_timeout, Duration::from_secs(60));
        assert_eq!(c.fsync, Fsync::EverySec);
        assert!(c.threads >= 1);
        assert!(c.given.is_empty());
    }

    #[test]
    fn go_style_spellings() {
        assert_eq!(run("-maxValueSize 4096").max_value_size, 4096);
        assert_eq!(run("-maxValueSize=4096").max_value_size, 4096);
        assert_eq!(run("--maxValueSize 4096").max_value_size, 4096);
        assert_eq!(run("--maxValueSize=4096").max_value_size, 4096);
        assert_eq!(run("-expireDuration 1h30m").expire_duration, Duration::from_secs(5400));
        assert_eq!(run("-l :: -port 8080").listen(), "[::]:8080".parse::<SocketAddr>().unwrap());
        assert_eq!(run("-l=127.0.0.1").listen_ip, "127.0.0.1".parse::<IpAddr>().unwrap());
        assert_eq!(run("-maxRequests 4294967295").max_requests, u32::MAX);
        assert!(run("-metricsAddr 127.0.0.1:1").was_given("metricsAddr"));
    }

    #[test]
    fn booleans_and_the_old_misspelling() {
        assert!(run("-disableLocalIPWarning").disable_local_ip_warning);
        assert!(run("-disableLocalIPWaring").disable_local_ip_warning);
        assert!(run("-disableLocalIPWarning=true").disable_local_ip_warning);
        assert!(!run("-disableLocalIPWarning=false").disable_local_ip_warning);
        assert!(run("--disableLocalIPWaring=1 -port 9").disable_local_ip_warning);
        assert!(parse(args("-disableLocalIPWarning=maybe")).is_err());
        assert!(is_bool_flag("disableLocalIPWarning") && is_bool_flag("version") && is_bool_flag("help"));
        assert!(!is_bool_flag("port") && !is_bool_flag("dataDir") && !is_bool_flag("noSuchFlag"));
    }

    #[test]
    fn help_is_go_style_with_defaults() {
        let Ok(Parsed::Help(text)) = parse(args("-h")) else { panic!() };
        assert!(text.contains("-maxValueSize BYTES") && !text.contains("  --") && !text.contains("gumdrop"));
        assert!(text.contains("(default 2h)"), "{text}");
        assert!(matches!(parse(args("--help")), Ok(Parsed::Help(_))));
        let help = flag_help();
        let port = help.iter().find(|f| f.name == "port").unwrap();
        assert_eq!((port.meta.as_str(), port.default.as_deref()), ("PORT", Some("80")));
        let b = help.iter().find(|f| f.name == "disableLocalIPWarning").unwrap();
        assert_eq!((b.meta.as_str(), b.default.as_deref()), ("", None));
        assert!(help.iter().all(|f| !f.help.is_empty()), "{help:?}");
        // Every flag's help line starts in the same column.
        let cols: Vec<usize> = text
            .lines()
            .filter(|l| l.starts_with("  -"))
            .map(|l| l.len() - l[2..].trim_start_matches(|c: char| !c.is_whitespace()).len())
            .collect();
        assert!(!cols.is_empty());
    }

    #[test]
    fn version_flag() {
        let Ok(Parsed::Version(v)) = parse(args("-version")) else { panic!() };
        assert!(v.starts_with("rendezvous "));
        assert!(matches!(parse(args("--version")), Ok(Parsed::Version(_))));
    }

    #[test]
    fn bad_values_name_the_flag_echo_the_value_and_the_range() {
        for (cmd, flag, echo, range) in [
            ("-port 70000", "-port", "70000", "0 to 65535"),
            ("-maxRequests 4294967296", "-maxRequests", "4294967296", "to 4294967295"),
            ("-expireDuration 0s", "-expireDuration", "0s", "positive"),
            ("-expireDuration 10", "-expireDuration", "10", "Go duration"),
            ("-l nope", "-l", "nope", "IP address"),
            ("-trustedProxies 1.2.3.4/99", "-trustedProxies", "1.2.3.4/99", "CIDR"),
            ("-maxValueSize 0", "-maxValueSize", "0", "1 to"),
            ("-ioDriver kqueue", "-ioDriver", "kqueue", "auto, uring or epoll"),
            ("-schedPolicy fifo", "-schedPolicy", "fifo", "batch or normal"),
            ("-cpuAffinity all", "-cpuAffinity", "all", "spread or none"),
            ("-placement even", "-placement", "even", "pack or spread"),
            ("-metricsAddr localhost", "-metricsAddr", "localhost", "ADDR:PORT"),
            ("-fsync sometimes", "-fsync", "sometimes", "always, everysec or no"),
            ("-threads 5000", "-threads", "5000", "0 to 1024"),
            ("-maxNumKV 18446744073709551615", "-maxNumKV", "18446744073709551615", "GiB"),
            ("-maxNumKV 1e12", "-maxNumKV", "1e12", "whole number"),
        ] {
            let e = err(cmd);
            assert!(e.contains(flag) && e.contains(echo) && e.contains(range), "{cmd}: {e}");
        }
        assert!(err("-noSuchFlag 1").contains("noSuchFlag"));
        assert!(parse(args("-port")).is_err());
    }

    #[test]
    fn values_beyond_the_clock_are_capped_not_refused() {
        // Valid Go durations far past a year (up to 2562047h) are capped.
        let c = run("-expireDuration 2000000h -readTimeout 2562047h");
        assert_eq!((c.expire_duration, c.read_timeout), (MAX_DURATION, MAX_DURATION));
        assert!(c.warnings.iter().any(|w| w.contains("expireDuration")));
        // A big -maxKeySize from a Go command line is capped, not refused.
        assert_eq!(run("-maxKeySize 100000").max_key_size, MAX_KEY_SIZE);
    }

    #[test]
    fn admin_address_forms() {
        assert_eq!(run("-metricsAddr=").metrics_addr, AdminAddr::Off);
        let c = run("-metricsAddr :9999");
        assert_eq!(c.metrics_addr, AdminAddr::On("[::]:9999".parse().unwrap()));
        assert!(c.warnings.iter().any(|w| w.contains("every interface")));
        assert_eq!(run("").metrics_addr, AdminAddr::On("127.0.0.1:9464".parse().unwrap()));
    }

    #[test]
    fn data_dir_and_dump() {
        assert_eq!(run("-dataDir=").data_dir(), None);
        assert_eq!(run("-dataDir /tmp/x").data_dir(), Some(std::path::Path::new("/tmp/x")));
        assert!(matches!(parse(args("-dump /tmp/x")), Ok(Parsed::Dump(p)) if p == std::path::Path::new("/tmp/x")));
    }
}
