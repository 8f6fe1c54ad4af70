//! End-to-end load benchmark: `cargo bench --bench e2e`.
//!
//! Builds and starts the release server on loopback, drives it with wrk
//! (Debian package; Lua workloads in `benches/wrk/`) and, in the same run,
//! nginx answering `return 200 "OK"` with the same client and connection
//! count. For each workload: requests/s, latency percentiles, server CPU
//! microseconds per request (from /proc), errors, and the CPU ratio to nginx.
//! Also: RSS per entry after filling 100k and 1M keys, -threads 1 vs 2, the
//! share of cross-core requests, and the cost of metrics. Results go to
//! `benches/results/e2e.md` and `.json`.
//!
//! Environment: `BENCH_SECONDS` (default 8) per run, `BENCH_CONNECTIONS`
//! (default 64), `BENCH_QUICK=1` skips the 1M-key memory runs.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_rendezvous");
const ROOT: &str = env!("CARGO_MANIFEST_DIR");

struct Proc {
    child: Child,
    addr: SocketAddr,
    metrics: Option<SocketAddr>,
}

impl Drop for Proc {
    fn drop(&mut self) {
        // SIGTERM: nginx's master then stops its workers (SIGKILL would orphan them).
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_server(args: &[&str]) -> Proc {
    let mut all =
        vec!["-l", "127.0.0.1", "-port", "0", "-dataDir", "", "-disableLocalIPWarning", "-maxRequests", "1000000000"];
    if !args.contains(&"-metricsAddr") {
        all.extend(["-metricsAddr", ""]);
    }
    all.extend_from_slice(args);
    let mut child = Command::new(BIN).args(&all).stderr(Stdio::piped()).stdout(Stdio::null()).spawn().unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut metrics = None;
    loop {
        let Some(Ok(line)) = lines.next() else {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the server exited during startup");
        };
        if let Some(rest) = line.split("metrics on http://").nth(1) {
            metrics = Some(rest.trim_end_matches("/metrics").parse().unwrap());
        }
        if let Some(rest) = line.split("listening on http://").nth(1) {
            let addr = rest.split_whitespace().next().unwrap().parse().unwrap();
            std::thread::spawn(move || for _ in lines {});
            return Proc { child, addr, metrics };
        }
    }
}

/// utime + stime of a process and its children threads, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let Some(close) = stat.rfind(')') else {
        return 0.0;
    };
    let f: Vec<&str> = stat[close + 2..].split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>().unwrap_or(0) + f[12].parse::<u64>().unwrap_or(0);
    ticks as f64 / 100.0
}

fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .unwrap_or(0)
        * 1024
}

/// Pids of a process and its direct children (nginx workers).
fn family(pid: u32) -> Vec<u32> {
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

#[derive(Debug, Clone, Default)]
struct Run {
    name: String,
    target: String,
    requests: u64,
    seconds: f64,
    rps: f64,
    p50_us: f64,
    p99_us: f64,
    p999_us: f64,
    cpu_us_per_req: f64,
    socket_errors: u64,
    non2xx: u64,
    nginx_ratio: Option<f64>,
    note: String,
}

fn json_field(line: &str, key: &str) -> f64 {
    let pat = format!("\"{key}\":");
    let start = line.find(&pat).map(|i| i + pat.len()).unwrap_or(0);
    line[start..].split([',', '}']).next().unwrap_or("0").trim().parse().unwrap_or(0.0)
}

fn wrk(name: &str, script: &str, addr: SocketAddr, pids: &[u32], conns: usize, secs: u64) -> Run {
    let common = std::fs::read_to_string(format!("{ROOT}/benches/wrk/common.lua")).unwrap();
    let body = std::fs::read_to_string(format!("{ROOT}/benches/wrk/{script}.lua")).unwrap();
    let path = std::env::temp_dir().join(format!("rdvz-bench-{script}.lua"));
    std::fs::write(&path, format!("{common}\n{body}")).unwrap();
    let cpu0: f64 = pids.iter().map(|&p| cpu_seconds(p)).sum();
    let out = Command::new("wrk")
        .args(["-t1", &format!("-c{conns}"), &format!("-d{secs}s"), "--timeout", "5s", "-s"])
        .arg(&path)
        .arg(format!("http://{addr}"))
        .output()
        .expect("run wrk");
    let cpu1: f64 = pids.iter().map(|&p| cpu_seconds(p)).sum();
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().find(|l| l.starts_with("{\"requests\"")).unwrap_or_else(|| panic!("wrk said: {text}"));
    let requests = json_field(line, "requests") as u64;
    let seconds = json_field(line, "duration_us") / 1e6;
    let run = Run {
        name: name.into(),
        target: String::new(),
        requests,
        seconds,
        rps: requests as f64 / seconds,
        p50_us: json_field(line, "p50_us"),
        p99_us: json_field(line, "p99_us"),
        p999_us: json_field(line, "p999_us"),
        cpu_us_per_req: (cpu1 - cpu0) * 1e6 / requests.max(1) as f64,
        socket_errors: json_field(line, "socket_errors") as u64,
        non2xx: json_field(line, "non2xx") as u64,
        nginx_ratio: None,
        note: String::new(),
    };
    eprintln!(
        "{name:<28} {:>9.0} req/s  p50 {:>6.0}us p99 {:>6.0}us  cpu {:>5.1}us/req  non2xx {} errs {}",
        run.rps, run.p50_us, run.p99_us, run.cpu_us_per_req, run.non2xx, run.socket_errors
    );
    run
}

/// Writes `count` sets of `value_len`-byte values over pipelined connections.
fn fill(addr: SocketAddr, prefix: &str, count: usize, value_len: usize) {
    let value = vec![b'v'; value_len];
    let conns = 2;
    let handles: Vec<_> = (0..conns)
        .map(|c| {
            let value = value.clone();
            let prefix = prefix.to_string();
            std::thread::spawn(move || {
                let mut s = TcpStream::connect(addr).unwrap();
                let mut buf = vec![0u8; 1 << 16];
                let mut i = c;
                while i < count {
                    let mut batch = Vec::new();
                    let mut n = 0;
                    while n < 256 && i < count {
                        let head =
                            format!("POST /set/{prefix}{i} HTTP/1.1\r\nHost: b\r\nContent-Length: {value_len}\r\n\r\n");
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
                        // Each answer is one "HTTP/1.1 " status line; count complete ones.
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

fn scrape(addr: SocketAddr, series: &str) -> f64 {
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: m\r\nConnection: close\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    text.lines().filter(|l| l.starts_with(series)).filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok()).sum()
}

fn start_nginx(dir: &Path, workers: usize) -> Proc {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
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
    let child = Command::new("nginx")
        .args(["-c", path.to_str().unwrap(), "-p", dir.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start nginx");
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "nginx did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    Proc { child, addr, metrics: None }
}

fn require(tool: &str) {
    let ok = Command::new("sh").args(["-c", &format!("command -v {tool}")]).output().map(|o| o.status.success());
    if !matches!(ok, Ok(true)) {
        eprintln!("e2e benchmark needs {tool}: apt-get install -y wrk nginx");
        std::process::exit(1);
    }
}

struct Memory {
    keys: usize,
    value_len: usize,
    rss_empty: u64,
    rss_full: u64,
    overhead_per_entry: f64,
}

fn memory_run(keys: usize, value_len: usize) -> Memory {
    let empty = start_server(&["-threads", "2", "-maxNumKV", "1000"]);
    std::thread::sleep(Duration::from_millis(300));
    let rss_empty = rss_bytes(empty.child.id());
    drop(empty);
    let max = (keys + keys / 10).to_string();
    let s = start_server(&["-threads", "2", "-maxNumKV", &max]);
    // Keys are "m" + 7 digits: 8 bytes each.
    fill(s.addr, "m", keys, value_len);
    let keys_len: usize = (0..keys).map(|i| 1 + i.to_string().len()).sum();
    std::thread::sleep(Duration::from_millis(300));
    let rss_full = rss_bytes(s.child.id());
    let payload = keys_len + keys * value_len;
    let overhead = (rss_full as f64 - rss_empty as f64 - payload as f64) / keys as f64;
    eprintln!(
        "memory {keys} x {value_len} B: RSS empty {} MiB, full {} MiB, overhead {overhead:.1} B/entry",
        rss_empty >> 20,
        rss_full >> 20
    );
    Memory { keys, value_len, rss_empty, rss_full, overhead_per_entry: overhead }
}

fn main() {
    // `cargo bench` passes --bench; ignore arguments.
    require("wrk");
    require("nginx");
    let secs: u64 = std::env::var("BENCH_SECONDS").ok().and_then(|s| s.parse().ok()).unwrap_or(8);
    let conns: usize = std::env::var("BENCH_CONNECTIONS").ok().and_then(|s| s.parse().ok()).unwrap_or(64);
    let quick = std::env::var("BENCH_QUICK").is_ok();
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2);
    let mut runs: Vec<Run> = Vec::new();
    if std::env::var("BENCH_ONLY").as_deref() == Ok("memory") {
        for (keys, value_len) in [(100_000, 100), (100_000, 1000), (1_000_000, 100)] {
            memory_run(keys, value_len);
        }
        return;
    }

    // --- nginx reference, same client, same connections ---
    let nginx_dir = std::env::temp_dir().join(format!("rdvz-bench-nginx-{}", std::process::id()));
    std::fs::create_dir_all(&nginx_dir).unwrap();
    let nginx = start_nginx(&nginx_dir, cores);
    std::thread::sleep(Duration::from_millis(200));
    let npids = family(nginx.child.id());
    let mut nginx_runs = Vec::new();
    for (name, script) in
        [("keep-alive", "get_hit"), ("connection-per-request", "conn_close"), ("pipelined x16", "pipeline16")]
    {
        let mut r = wrk(&format!("nginx {name}"), script, nginx.addr, &npids, conns, secs);
        r.target = "nginx".into();
        nginx_runs.push(r);
    }
    drop(nginx);
    let _ = std::fs::remove_dir_all(&nginx_dir);
    let nginx_ka = nginx_runs[0].cpu_us_per_req;
    let nginx_for = |script: &str| match script {
        "conn_close" => nginx_runs[1].cpu_us_per_req,
        "pipeline16" => nginx_runs[2].cpu_us_per_req,
        _ => nginx_ka,
    };

    // --- Rendezvous workloads ---
    let workloads = [
        ("GET hit", "get_hit"),
        ("GET miss (404)", "get_miss"),
        ("set 16 B", "set16"),
        ("set 1000 B", "set1000"),
        ("90/10 get/set", "mix90"),
        ("cas, one hot key", "cas_hot"),
        ("los, fresh keys", "los_fresh"),
        ("connection per request", "conn_close"),
        ("pipelined GET x16", "pipeline16"),
    ];
    let threads = cores.to_string();
    let s = start_server(&["-threads", &threads, "-maxNumKV", "2000000"]);
    fill(s.addr, "key-", 10_000, 100);
    fill(s.addr, "hot", 1, 1);
    let pid = [s.child.id()];
    for (name, script) in workloads {
        let mut r = wrk(name, script, s.addr, &pid, conns, secs);
        r.target = format!("rendezvous -threads {threads}");
        r.nginx_ratio = Some(r.cpu_us_per_req / nginx_for(script));
        if script == "cas_hot" {
            r.note = "409s are the expected losers of the race".into();
        }
        if script == "get_miss" {
            r.note = "all 404 by design".into();
        }
        runs.push(r);
    }
    drop(s);

    // The 429 path: one client far over budget.
    let s = start_server(&["-threads", &threads, "-maxRequests", "17", "-resetDuration", "1h"]);
    let mut r = wrk("429 (rate-limited)", "ratelimited", s.addr, &[s.child.id()], conns, secs);
    r.target = format!("rendezvous -threads {threads} -maxRequests 17");
    r.nginx_ratio = Some(r.cpu_us_per_req / nginx_ka);
    r.note = "all 429 by design".into();
    runs.push(r);
    drop(s);

    // --- Scaling and cross-core share ---
    let mut scaling = Vec::new();
    for t in ["1", "2"] {
        let s = start_server(&["-threads", t, "-metricsAddr", "127.0.0.1:0"]);
        fill(s.addr, "key-", 10_000, 100);
        let m = s.metrics.unwrap();
        let sent0 = scrape(m, "rendezvous_cross_core_messages_total");
        let req0 = scrape(m, "rendezvous_core_requests_total");
        let mut r = wrk(&format!("GET hit, -threads {t}"), "get_hit", s.addr, &[s.child.id()], conns, secs);
        std::thread::sleep(Duration::from_millis(1200));
        let sent = scrape(m, "rendezvous_cross_core_messages_total") - sent0;
        let reqs = scrape(m, "rendezvous_core_requests_total") - req0;
        r.target = format!("rendezvous -threads {t}");
        r.nginx_ratio = Some(r.cpu_us_per_req / nginx_ka);
        r.note = format!("{:.2} cross-core messages per request", sent / reqs.max(1.0));
        scaling.push(r);
    }

    // --- The cost of metrics: alternate off/on runs, compare the means ---
    let mut metrics_cost = (Vec::new(), Vec::new());
    for round in 0..4 {
        let on = round % 2 == 1;
        let args: &[&str] = if on { &["-metricsAddr", "127.0.0.1:0"] } else { &[] };
        let s = start_server(args);
        fill(s.addr, "key-", 10_000, 100);
        let label = format!("GET hit, metrics {}", if on { "on" } else { "off" });
        let r = wrk(&label, "get_hit", s.addr, &[s.child.id()], conns, secs);
        if on {
            metrics_cost.1.push(r)
        } else {
            metrics_cost.0.push(r)
        }
    }

    // --- Memory ---
    let mut memory = Vec::new();
    let sizes: &[(usize, usize)] = if quick {
        &[(100_000, 100), (100_000, 1000)]
    } else {
        &[(100_000, 100), (100_000, 1000), (1_000_000, 100), (1_000_000, 1000)]
    };
    for &(keys, value_len) in sizes {
        memory.push(memory_run(keys, value_len));
    }

    write_report(&runs, &nginx_runs, &scaling, &metrics_cost, &memory, secs, conns, cores);
}

#[allow(clippy::too_many_arguments)]
fn write_report(
    runs: &[Run],
    nginx: &[Run],
    scaling: &[Run],
    metrics_cost: &(Vec<Run>, Vec<Run>),
    memory: &[Memory],
    secs: u64,
    conns: usize,
    cores: usize,
) {
    let dir = PathBuf::from(ROOT).join("benches/results");
    std::fs::create_dir_all(&dir).unwrap();
    let mut md = String::new();
    md += &format!(
        "# End-to-end benchmark\n\nwrk -t1 -c{conns} -d{secs}s on loopback, {cores} cores shared by server and client. \
         CPU is the server's user+system time per request (from /proc); the ratio compares it with nginx \
         `return 200 \"OK\"` measured in the same run with the same client and connections (keep-alive, \
         connection-per-request or pipelined as the workload). wrk does not time pipelined requests \
         individually, so their latency is n/a.\n\n"
    );
    md += "| workload | server | req/s | p50 | p99 | p99.9 | CPU us/req | CPU vs nginx | non-2xx | socket errors | note |\n";
    md += "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|\n";
    let us = |v: f64| {
        if v > 0.0 {
            format!("{v:.0} us")
        } else {
            "n/a".into()
        }
    };
    let row = |r: &Run| {
        format!(
            "| {} | {} | {:.0} | {} | {} | {} | {:.1} | {} | {} | {} | {} |\n",
            r.name,
            r.target,
            r.rps,
            us(r.p50_us),
            us(r.p99_us),
            us(r.p999_us),
            r.cpu_us_per_req,
            r.nginx_ratio.map_or("-".into(), |x| format!("{x:.2}x")),
            r.non2xx,
            r.socket_errors,
            r.note
        )
    };
    for r in nginx.iter().chain(runs) {
        md += &row(r);
    }
    md += "\n## Scaling, cross-core traffic, metrics\n\n";
    md += "| workload | server | req/s | p50 | p99 | p99.9 | CPU us/req | CPU vs nginx | non-2xx | socket errors | note |\n";
    md += "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|\n";
    for r in scaling {
        md += &row(r);
    }
    let mean = |rs: &[Run], f: fn(&Run) -> f64| rs.iter().map(f).sum::<f64>() / rs.len().max(1) as f64;
    let (off, on) = metrics_cost;
    if !off.is_empty() && !on.is_empty() {
        let (cpu_off, cpu_on) = (mean(off, |r| r.cpu_us_per_req), mean(on, |r| r.cpu_us_per_req));
        let (rps_off, rps_on) = (mean(off, |r| r.rps), mean(on, |r| r.rps));
        md += &format!(
            "\nMetrics cost (GET hit, {} alternating runs each): {cpu_on:.2} us/req with metrics vs {cpu_off:.2} without \
             ({:+.1}% CPU per request); {rps_on:.0} vs {rps_off:.0} req/s ({:+.1}%).\n",
            on.len(),
            (cpu_on / cpu_off - 1.0) * 100.0,
            (rps_on / rps_off - 1.0) * 100.0
        );
    }
    md += "\n## Memory\n\n| keys | value | RSS empty | RSS full | overhead per entry beyond key + value |\n|---:|---:|---:|---:|---:|\n";
    for m in memory {
        md += &format!(
            "| {} | {} B | {:.1} MiB | {:.1} MiB | {:.1} B |\n",
            m.keys,
            m.value_len,
            m.rss_empty as f64 / 1048576.0,
            m.rss_full as f64 / 1048576.0,
            m.overhead_per_entry
        );
    }
    std::fs::write(dir.join("e2e.md"), &md).unwrap();
    let mut json = String::from("{\n  \"runs\": [\n");
    let all: Vec<&Run> = nginx.iter().chain(runs).chain(scaling).collect();
    for (i, r) in all.iter().enumerate() {
        json += &format!(
            "    {{\"name\": {:?}, \"server\": {:?}, \"requests\": {}, \"seconds\": {:.2}, \"rps\": {:.1}, \"p50_us\": {}, \"p99_us\": {}, \
             \"p999_us\": {}, \"cpu_us_per_req\": {:.3}, \"cpu_vs_nginx\": {}, \"non2xx\": {}, \"socket_errors\": {}}}{}\n",
            r.name,
            r.target,
            r.requests,
            r.seconds,
            r.rps,
            r.p50_us,
            r.p99_us,
            r.p999_us,
            r.cpu_us_per_req,
            r.nginx_ratio.map_or("null".into(), |x| format!("{x:.3}")),
            r.non2xx,
            r.socket_errors,
            if i + 1 < all.len() { "," } else { "" }
        );
    }
    json += "  ],\n  \"memory\": [\n";
    for (i, m) in memory.iter().enumerate() {
        json += &format!(
            "    {{\"keys\": {}, \"value_bytes\": {}, \"rss_empty\": {}, \"rss_full\": {}, \"overhead_per_entry\": {:.1}}}{}\n",
            m.keys,
            m.value_len,
            m.rss_empty,
            m.rss_full,
            m.overhead_per_entry,
            if i + 1 < memory.len() { "," } else { "" }
        );
    }
    json += "  ]\n}\n";
    std::fs::write(dir.join("e2e.json"), json).unwrap();
    println!("{md}");
}
