//! What the load benchmarks share beyond `tests/common` (which starts the
//! server and external programs): driving wrk with the Lua workloads in
//! `benches/wrk/`, reading a process's CPU time and memory from /proc,
//! filling a store quickly, nginx as the reference, and medians.

#![allow(dead_code)]

use crate::common::{free_port, wait_listening, Proc};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

pub const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// User + system CPU seconds of a process.
pub fn cpu_seconds(pid: u32) -> f64 {
    cpu_seconds_of(&format!("/proc/{pid}/stat")).unwrap_or(0.0)
}

/// User + system CPU seconds of every thread of the processes `pids`.
/// How a server spreads its work shows here: nginx's workers share one
/// listening socket and the idle one takes each new connection, so one
/// worker often serves most of them, where the server's `SO_REUSEPORT`
/// listeners split connections evenly between its cores.
pub fn thread_cpu_seconds(pids: &[u32]) -> Vec<(u32, f64)> {
    let mut out = Vec::new();
    for &pid in pids {
        let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else { continue };
        for e in dir.flatten() {
            let Ok(tid) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
            // A thread that exits meanwhile is left out.
            if let Some(t) = cpu_seconds_of(&format!("/proc/{pid}/task/{tid}/stat")) {
                out.push((tid, t));
            }
        }
    }
    out
}

/// The busiest thread's share of the CPU the threads spent between two
/// `thread_cpu_seconds` readings (1.0: one thread did all the work).
/// Threads that exited before the second reading are not counted.
pub fn busiest_share(before: &[(u32, f64)], after: &[(u32, f64)]) -> f64 {
    let spent: Vec<f64> = after
        .iter()
        .map(|(tid, t)| (t - before.iter().find(|(b, _)| b == tid).map_or(0.0, |(_, t0)| *t0)).max(0.0))
        .collect();
    let total: f64 = spent.iter().sum();
    if total <= 0.0 {
        return 0.0;
    }
    spent.iter().cloned().fold(0.0, f64::max) / total
}

fn cpu_seconds_of(path: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(path).ok()?;
    let close = stat.rfind(')')?;
    let f: Vec<&str> = stat.get(close + 2..)?.split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / 100.0)
}

fn status_kb(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .unwrap_or(0)
}

/// Resident memory now.
pub fn rss_bytes(pid: u32) -> u64 {
    status_kb(pid, "VmRSS:") * 1024
}

/// Peak resident memory since start, or since the last `reset_peak_rss`.
pub fn peak_rss_bytes(pid: u32) -> u64 {
    status_kb(pid, "VmHWM:") * 1024
}

/// Resets the kernel's peak-RSS mark of a process (`/proc/PID/clear_refs`, 5).
pub fn reset_peak_rss(pid: u32) {
    let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
}

/// Pids of a process and its direct children (nginx workers).
pub fn family(pid: u32) -> Vec<u32> {
    let mut pids = vec![pid];
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(p) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
        if let Some(close) = stat.rfind(')') {
            let ppid: u32 = stat[close + 2..].split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
            if ppid == pid {
                pids.push(p);
            }
        }
    }
    pids
}

/// One wrk run.
#[derive(Debug, Clone, Default)]
pub struct Run {
    pub name: String,
    pub requests: u64,
    pub seconds: f64,
    pub rps: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub cpu_us_per_req: f64,
    /// The busiest thread's share of the CPU spent (`busiest_share`).
    pub busiest_thread: f64,
    pub socket_errors: u64,
    pub non2xx: u64,
}

fn json_field(line: &str, key: &str) -> f64 {
    let pat = format!("\"{key}\":");
    let start = line.find(&pat).map(|i| i + pat.len()).unwrap_or(0);
    line[start..].split([',', '}']).next().unwrap_or("0").trim().parse().unwrap_or(0.0)
}

/// Runs wrk with `benches/wrk/<script>.lua` against `addr` and measures the
/// CPU the processes `pids` spent meanwhile.
pub fn wrk(name: &str, script: &str, addr: SocketAddr, pids: &[u32], conns: usize, secs: u64) -> Run {
    wrk_env(name, script, addr, pids, conns, secs, &[])
}

/// `wrk` with environment variables for the script (`os.getenv`).
pub fn wrk_env(
    name: &str,
    script: &str,
    addr: SocketAddr,
    pids: &[u32],
    conns: usize,
    secs: u64,
    env: &[(&str, String)],
) -> Run {
    let common = std::fs::read_to_string(format!("{ROOT}/benches/wrk/common.lua")).unwrap();
    let body = std::fs::read_to_string(format!("{ROOT}/benches/wrk/{script}.lua")).unwrap();
    let path = std::env::temp_dir().join(format!("rdvz-bench-{}-{script}.lua", std::process::id()));
    std::fs::write(&path, format!("{common}\n{body}")).unwrap();
    let cpu0: f64 = pids.iter().map(|&p| cpu_seconds(p)).sum();
    let threads0 = thread_cpu_seconds(pids);
    let out = Command::new("wrk")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .args(["-t1", &format!("-c{conns}"), &format!("-d{secs}s"), "--timeout", "5s", "-s"])
        .arg(&path)
        .arg(format!("http://{addr}"))
        .output()
        .expect("run wrk");
    let cpu1: f64 = pids.iter().map(|&p| cpu_seconds(p)).sum();
    let busiest_thread = busiest_share(&threads0, &thread_cpu_seconds(pids));
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().find(|l| l.starts_with("{\"requests\"")).unwrap_or_else(|| panic!("wrk said: {text}"));
    let requests = json_field(line, "requests") as u64;
    let seconds = json_field(line, "duration_us") / 1e6;
    let run = Run {
        name: name.into(),
        requests,
        seconds,
        rps: requests as f64 / seconds,
        p50_us: json_field(line, "p50_us"),
        p99_us: json_field(line, "p99_us"),
        p999_us: json_field(line, "p999_us"),
        cpu_us_per_req: (cpu1 - cpu0) * 1e6 / requests.max(1) as f64,
        busiest_thread,
        socket_errors: json_field(line, "socket_errors") as u64,
        non2xx: json_field(line, "non2xx") as u64,
    };
    eprintln!(
        "{name:<34} {:>9.0} req/s  p50 {:>6.0}us p99 {:>6.0}us  cpu {:>5.1}us/req  busiest thread {:.2}  non2xx {} errs {}",
        run.rps, run.p50_us, run.p99_us, run.cpu_us_per_req, run.busiest_thread, run.non2xx, run.socket_errors
    );
    run
}

/// Writes `count` sets (`<prefix><i>`, `value_len` bytes) over two
/// pipelined connections, checking every answer is a 200.
pub fn fill(addr: SocketAddr, prefix: &str, count: usize, value_len: usize) {
    fill_from(addr, prefix, 0, count, value_len)
}

/// Like `fill`, for indexes `from..count`.
pub fn fill_from(addr: SocketAddr, prefix: &str, from: usize, count: usize, value_len: usize) {
    fill_as(addr, prefix, from, count, value_len, None)
}

/// Like `fill_from`, each set sent on behalf of client `client(i)` (an
/// `X-Forwarded-For` address from the trusted loopback peer), so key
/// quotas see many clients as on a public instance.
pub fn fill_as(
    addr: SocketAddr,
    prefix: &str,
    from: usize,
    count: usize,
    value_len: usize,
    client: Option<fn(usize) -> String>,
) {
    let value = vec![b'v'; value_len];
    let conns = 2;
    let handles: Vec<_> = (0..conns)
        .map(|c| {
            let value = value.clone();
            let prefix = prefix.to_string();
            std::thread::spawn(move || {
                let mut s = TcpStream::connect(addr).unwrap();
                let mut buf = vec![0u8; 1 << 16];
                let mut i = from + c;
                while i < count {
                    let mut batch = Vec::new();
                    let mut n = 0;
                    while n < 256 && i < count {
                        let xff = client.map(|f| format!("X-Forwarded-For: {}\r\n", f(i))).unwrap_or_default();
                        let head = format!(
                            "POST /set/{prefix}{i} HTTP/1.1\r\nHost: b\r\n{xff}Content-Length: {value_len}\r\n\r\n"
                        );
                        batch.extend_from_slice(head.as_bytes());
                        batch.extend_from_slice(&value);
                        n += 1;
                        i += conns;
                    }
                    s.write_all(&batch).unwrap();
                    let mut seen = 0;
                    let mut carry = Vec::new();
                    while seen < n {
                        let r = s.read(&mut buf).unwrap();
                        assert!(r > 0, "server closed during fill");
                        carry.extend_from_slice(&buf[..r]);
                        while let Some(p) = carry.windows(9).position(|w| w == b"HTTP/1.1 ") {
                            assert!(
                                carry[p..].starts_with(b"HTTP/1.1 200"),
                                "fill failed: {}",
                                String::from_utf8_lossy(&carry)
                            );
                            seen += 1;
                            carry.drain(..p + 9);
                        }
                    }
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
}

/// Sums every sample of a series in a `/metrics` exposition.
pub fn scrape(addr: SocketAddr, series: &str) -> f64 {
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: m\r\nConnection: close\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    text.lines()
        .filter(|l| l.starts_with(series) && l[series.len()..].starts_with([' ', '{']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// nginx answering `return 200 "OK"` with `workers` workers, the reference.
pub fn start_nginx(dir: &Path, workers: usize) -> (Proc, SocketAddr) {
    let port = free_port();
    let conf = format!(
        "worker_processes {workers};\ndaemon off;\npid {dir}/nginx.pid;\nerror_log {dir}/error.log;\n\
         events {{ worker_connections 4096; }}\n\
         http {{\n  access_log off;\n  keepalive_requests 100000000;\n  keepalive_timeout 60s;\n\
         client_body_temp_path {dir}/body;\n  proxy_temp_path {dir}/proxy;\n  fastcgi_temp_path {dir}/fastcgi;\n\
         uwsgi_temp_path {dir}/uwsgi;\n  scgi_temp_path {dir}/scgi;\n\
         server {{\n    listen 127.0.0.1:{port};\n    location / {{ return 200 \"OK\"; }}\n  }}\n}}\n",
        dir = dir.display()
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, conf).unwrap();
    let proc = Proc::spawn(Command::new("nginx").args(["-c", path.to_str().unwrap(), "-p", dir.to_str().unwrap()]));
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    wait_listening(addr, Duration::from_secs(10), "nginx");
    (proc, addr)
}

/// Exits with a message if a program the benchmark drives is missing.
pub fn need(tool: &str) {
    if !crate::common::have(tool) {
        eprintln!("this benchmark needs {tool}: apt-get install -y wrk nginx");
        std::process::exit(1);
    }
}

/// The median and the min-max of some figures.
pub fn spread(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return (0.0, 0.0, 0.0);
    }
    let mid = if v.len() % 2 == 1 { v[v.len() / 2] } else { (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0 };
    (mid, v[0], v[v.len() - 1])
}

/// `BENCH_<NAME>` from the environment, or `default`.
pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|s| s.parse().ok()).unwrap_or(default)
}
