//! The command line: Go-style flags parsed by `gumdrop`, validated into a
//! `Config` the rest of the server reads and never mutates.
//!
//! Operators' command lines for the Go server must keep working, so flags are
//! accepted as `-name value`, `-name=value`, `--name value` and
//! `--name=value`, booleans as `-flag`, `-flag=true|false`, and the Go
//! server's misspelt `-disableLocalIPWaring`. `normalize_args` rewrites all of
//! that into the double-dash form gumdrop expects. Every failure is a
//! `ConfigError` with a message naming the flag; `main` prints it and exits 2.

use crate::clientip::{TrustedProxies, DEFAULT_TRUSTED};
use crate::duration;
use gumdrop::Options;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

fn parse_duration_flag(s: &str) -> Result<Duration, duration::DurationError> {
    duration::parse_positive(s)
}

/// The flags as gumdrop sees them (long names are the Go names).
#[derive(Debug, Options)]
#[options(no_short)]
struct Flags {
    #[options(short = "h", help = "print this help and exit")]
    help: bool,

    #[options(
        long = "maxKeySize",
        default = "100",
        meta = "BYTES",
        help = "maximum key length (before ip/ expansion)"
    )]
    max_key_size: usize,
    #[options(long = "maxValueSize", default = "1000", meta = "BYTES", help = "maximum value + owner secret length")]
    max_value_size: usize,
    #[options(
        long = "maxNumKV",
        default = "100000",
        meta = "N",
        help = "maximum number of live keys in the whole server"
    )]
    max_num_kv: usize,
    #[options(
        long = "expireDuration",
        default = "2h",
        meta = "DURATION",
        parse(try_from_str = "parse_duration_flag"),
        help = "maximum and default TTL"
    )]
    expire_duration: Duration,
    #[options(
        long = "resetDuration",
        default = "1m",
        meta = "DURATION",
        parse(try_from_str = "parse_duration_flag"),
        help = "rate-limit refill period"
    )]
    reset_duration: Duration,
    #[options(
        long = "saveDuration",
        default = "30m",
        meta = "DURATION",
        parse(try_from_str = "parse_duration_flag"),
        help = "snapshot period"
    )]
    save_duration: Duration,
    #[options(
        long = "maxRequests",
        default = "17",
        meta = "N",
        help = "rate-limit tokens per client IP (IPv6: /64) per period; GET costs 1, writes 3"
    )]
    max_requests: u32,
    #[options(long = "port", default = "80", meta = "PORT", help = "listening port (0: any free port)")]
    port: u16,
    #[options(long = "l", default = "0.0.0.0", meta = "ADDR", help = "listen address (:: for dual stack)")]
    listen: String,
    #[options(
        long = "disableLocalIPWarning",
        help = "do not warn about requests from localhost without X-Forwarded-For"
    )]
    disable_local_ip_warning: bool,

    #[options(
        long = "threads",
        default = "0",
        meta = "N",
        help = "worker threads, one shard each (0: one per available core)"
    )]
    threads: usize,
    #[options(
        long = "trustedProxies",
        default = "127.0.0.0/8,::1/128,10.0.0.0/8,172.16.0.0/12,192.168.0.0/16,fc00::/7",
        meta = "CIDRS",
        help = "comma-separated peers whose X-Forwarded-For is believed (empty: none)"
    )]
    trusted_proxies: String,
    #[options(
        long = "readTimeout",
        default = "10s",
        meta = "DURATION",
        parse(try_from_str = "parse_duration_flag"),
        help = "deadline to receive a whole request (head and body) once it starts"
    )]
    read_timeout: Duration,
    #[options(
        long = "idleTimeout",
        default = "60s",
        meta = "DURATION",
        parse(try_from_str = "parse_duration_flag"),
        help = "close keep-alive connections idle this long"
    )]
    idle_timeout: Duration,
    #[options(
        long = "maxTrackedIPs",
        default = "1000000",
        meta = "N",
        help = "rate-limit buckets kept per period; new clients beyond it get 429"
    )]
    max_tracked_ips: usize,
    #[options(
        long = "ioDriver",
        default = "auto",
        meta = "auto|uring|epoll",
        help = "I/O driver: io_uring with epoll fallback, or force one"
    )]
    io_driver: String,
    #[options(
        long = "snapshotPath",
        default = "store.rkyv",
        meta = "PATH",
        help = "snapshot file (empty: no snapshots)"
    )]
    snapshot_path: String,
    #[options(
        long = "shutdownTimeout",
        default = "5s",
        meta = "DURATION",
        parse(try_from_str = "parse_duration_flag"),
        help = "on SIGTERM/SIGINT, how long in-flight requests may take before the final snapshot"
    )]
    shutdown_timeout: Duration,
    #[options(
        long = "metricsAddr",
        default = "127.0.0.1:9464",
        meta = "ADDR:PORT",
        help = "Prometheus /metrics listen address, never the public port (empty: disabled)"
    )]
    metrics_addr: String,
    #[options(
        long = "maxConns",
        default = "10000",
        meta = "N",
        help = "open client connections, server-wide; more are closed at once"
    )]
    max_conns: usize,
    #[options(
        long = "maxConnsPerIP",
        default = "256",
        meta = "N",
        help = "open connections per client IP (IPv6: /64); trusted proxies are exempt"
    )]
    max_conns_per_ip: u32,
    #[options(
        long = "maxWait",
        default = "60s",
        meta = "DURATION",
        parse(try_from_str = "parse_duration_flag"),
        help = "longest blocking read (GET /get/<key>?wait=D)"
    )]
    max_wait: Duration,
    #[options(
        long = "maxWaiters",
        default = "10000",
        meta = "N",
        help = "blocking reads parked at once, server-wide (over: 503)"
    )]
    max_waiters: usize,
    #[options(
        long = "maxWaitersPerIP",
        default = "64",
        meta = "N",
        help = "blocking reads parked at once per client IP (over: 429)"
    )]
    max_waiters_per_ip: u32,
}

/// Which monoio driver the cores run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoDriver {
    /// io_uring, falling back to epoll if it cannot be set up.
    Auto,
    Uring,
    Epoll,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub max_key_size: usize,
    /// Accepted but questionable values, logged at startup.
    pub warnings: Vec<String>,
    pub max_value_size: usize,
    pub max_num_kv: usize,
    pub expire_duration: Duration,
    pub reset_duration: Duration,
    pub save_duration: Duration,
    pub max_requests: u32,
    pub listen: SocketAddr,
    pub disable_local_ip_warning: bool,
    pub threads: usize,
    pub trusted_proxies: TrustedProxies,
    pub read_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_tracked_ips: usize,
    pub io_driver: IoDriver,
    pub snapshot_path: Option<PathBuf>,
    pub shutdown_timeout: Duration,
    pub metrics_addr: Option<SocketAddr>,
    pub max_conns: usize,
    pub max_conns_per_ip: u32,
    pub max_wait: Duration,
    pub max_waiters: usize,
    pub max_waiters_per_ip: u32,
}

/// What the command line asked for.
#[derive(Debug)]
pub enum Parsed {
    Run(Box<Config>),
    Help(String),
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

const BOOL_FLAGS: &[&str] = &["help", "disableLocalIPWarning"];
/// Largest key accepted: keys travel in the 8 KiB request head.
pub const MAX_KEY_SIZE: usize = 4096;

/// Rewrites Go-style flags into gumdrop's `--name[=value]` form.
pub fn normalize_args<I: IntoIterator<Item = String>>(args: I) -> Result<Vec<String>, ConfigError> {
    let mut out = Vec::new();
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
        if BOOL_FLAGS.contains(&name) {
            let on = match value {
                None => true,
                Some(v) => {
                    parse_go_bool(v).ok_or_else(|| ConfigError(format!("invalid boolean value {v:?} for -{name}")))?
                }
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
    Ok(out)
}

/// Go's `strconv.ParseBool`.
fn parse_go_bool(v: &str) -> Option<bool> {
    match v {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Some(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Some(false),
        _ => None,
    }
}

fn go_style(s: &str) -> String {
    s.replace("--", "-")
}

/// The `-h` text.
pub fn usage() -> String {
    format!(
        "Usage: rendezvous [flags]\n\nA public, registration-free HTTP key-value rendezvous server.\n\
         Flags take one or two dashes, and -name value or -name=value.\n\n{}\n",
        go_style(Flags::usage())
    )
}

/// Parses and validates a command line (without the program name).
pub fn parse<I: IntoIterator<Item = String>>(args: I) -> Result<Parsed, ConfigError> {
    let args = normalize_args(args)?;
    let flags = Flags::parse_args_default(&args).map_err(|e| ConfigError(go_style(&e.to_string())))?;
    if flags.help {
        return Ok(Parsed::Help(usage()));
    }
    let bad = |flag: &str, why: &str| ConfigError(format!("invalid value for -{flag}: {why}"));
    if flags.max_key_size == 0 {
        return Err(bad("maxKeySize", "must be at least 1"));
    }
    let mut warnings = Vec::new();
    let mut max_key_size = flags.max_key_size;
    if max_key_size > MAX_KEY_SIZE {
        // The Go server took any value; keep such command lines working.
        warnings
            .push(format!("-maxKeySize {max_key_size} is more than a request head can carry; using {MAX_KEY_SIZE}"));
        max_key_size = MAX_KEY_SIZE;
    }
    if flags.max_value_size == 0 {
        return Err(bad("maxValueSize", "must be at least 1"));
    }
    if flags.max_value_size > 64 << 20 {
        warnings.push(format!("-maxValueSize {} lets one request buffer that much memory", flags.max_value_size));
    }
    if flags.max_num_kv == 0 {
        return Err(bad("maxNumKV", "must be at least 1"));
    }
    if flags.max_conns == 0 {
        return Err(bad("maxConns", "must be at least 1"));
    }
    if flags.max_conns_per_ip == 0 {
        return Err(bad("maxConnsPerIP", "must be at least 1"));
    }
    if flags.max_tracked_ips == 0 {
        return Err(bad("maxTrackedIPs", "must be at least 1"));
    }
    let ip: IpAddr = flags
        .listen
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse()
        .map_err(|_| bad("l", &format!("{:?} is not an IP address", flags.listen)))?;
    let threads = match flags.threads {
        0 => std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        n => n,
    };
    if threads > 1024 {
        return Err(bad("threads", "must be at most 1024"));
    }
    let trusted_proxies = TrustedProxies::parse(&flags.trusted_proxies).map_err(|e| bad("trustedProxies", &e))?;
    let io_driver = match flags.io_driver.as_str() {
        "auto" => IoDriver::Auto,
        "uring" | "io_uring" => IoDriver::Uring,
        "epoll" | "legacy" => IoDriver::Epoll,
        other => return Err(bad("ioDriver", &format!("{other:?} is not one of auto, uring, epoll"))),
    };
    let metrics_addr = match flags.metrics_addr.as_str() {
        "" => None,
        a => Some(a.parse::<SocketAddr>().map_err(|_| bad("metricsAddr", &format!("{a:?} is not an ADDR:PORT")))?),
    };
    let snapshot_path = (!flags.snapshot_path.is_empty()).then(|| PathBuf::from(&flags.snapshot_path));
    debug_assert!(!DEFAULT_TRUSTED.is_empty());
    Ok(Parsed::Run(Box::new(Config {
        max_key_size,
        warnings,
        max_value_size: flags.max_value_size,
        max_num_kv: flags.max_num_kv,
        expire_duration: flags.expire_duration,
        reset_duration: flags.reset_duration,
        save_duration: flags.save_duration,
        max_requests: flags.max_requests,
        listen: SocketAddr::new(ip, flags.port),
        disable_local_ip_warning: flags.disable_local_ip_warning,
        threads,
        trusted_proxies,
        read_timeout: flags.read_timeout,
        idle_timeout: flags.idle_timeout,
        max_tracked_ips: flags.max_tracked_ips,
        io_driver,
        snapshot_path,
        shutdown_timeout: flags.shutdown_timeout,
        metrics_addr,
        max_conns: flags.max_conns,
        max_conns_per_ip: flags.max_conns_per_ip,
        max_wait: flags.max_wait,
        max_waiters: flags.max_waiters,
        max_waiters_per_ip: flags.max_waiters_per_ip,
    })))
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
        assert_eq!(c.listen, "0.0.0.0:80".parse::<SocketAddr>().unwrap());
        assert!(!c.disable_local_ip_warning);
        assert_eq!(c.read_timeout, Duration::from_secs(10));
        assert_eq!(c.idle_timeout, Duration::from_secs(60));
        assert!(c.threads >= 1);
    }

    #[test]
    fn go_style_spellings() {
        assert_eq!(run("-maxValueSize 4096").max_value_size, 4096);
        assert_eq!(run("-maxValueSize=4096").max_value_size, 4096);
        assert_eq!(run("--maxValueSize 4096").max_value_size, 4096);
        assert_eq!(run("--maxValueSize=4096").max_value_size, 4096);
        assert_eq!(run("-expireDuration 1h30m").expire_duration, Duration::from_secs(5400));
        assert_eq!(run("-l :: -port 8080").listen, "[::]:8080".parse::<SocketAddr>().unwrap());
        assert_eq!(run("-l=127.0.0.1").listen.ip(), "127.0.0.1".parse::<IpAddr>().unwrap());
        assert_eq!(run("-maxRequests 4294967295").max_requests, u32::MAX);
    }

    #[test]
    fn booleans_and_the_old_misspelling() {
        assert!(run("-disableLocalIPWarning").disable_local_ip_warning);
        assert!(run("-disableLocalIPWaring").disable_local_ip_warning);
        assert!(run("-disableLocalIPWarning=true").disable_local_ip_warning);
        assert!(!run("-disableLocalIPWarning=false").disable_local_ip_warning);
        assert!(run("--disableLocalIPWaring=1 -port 9").disable_local_ip_warning);
        assert!(parse(args("-disableLocalIPWarning=maybe")).is_err());
    }

    #[test]
    fn help_is_go_style() {
        // Every flag's presence is checked against the binary in tests/cli.rs.
        let Ok(Parsed::Help(text)) = parse(args("-h")) else { panic!() };
        assert!(text.contains("-maxValueSize") && !text.contains("--"));
        assert!(matches!(parse(args("--help")), Ok(Parsed::Help(_))));
    }

    #[test]
    fn bad_values_are_errors_naming_the_flag() {
        for (cmd, flag) in [
            ("-port 70000", "port"),
            ("-maxRequests 4294967296", "maxRequests"),
            ("-expireDuration 0s", "expireDuration"),
            ("-expireDuration 10", "expireDuration"),
            ("-l nope", "-l"),
            ("-trustedProxies 1.2.3.4/99", "trustedProxies"),
            ("-maxValueSize 0", "maxValueSize"),
            ("-ioDriver kqueue", "ioDriver"),
            ("-metricsAddr localhost", "metricsAddr"),
        ] {
            let err = parse(args(cmd)).unwrap_err().0;
            assert!(err.contains(flag), "{cmd}: {err}");
        }
        assert!(parse(args("-noSuchFlag 1")).unwrap_err().0.contains("noSuchFlag"));
        assert!(parse(args("-port")).is_err());
    }
}
