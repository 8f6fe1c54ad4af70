//! A write's cost with parked waiters it does not wake:
//! `cargo bench --bench waiters`.
//!
//! N blocking reads park on one key, each waiting for its value to differ
//! from the value the writer keeps writing (so no write wakes them); a
//! writer rewrites that key on one keep-alive connection while another
//! connection reads an unrelated key. Reported: the server's CPU per write
//! and writes/s, and the unrelated GET's p50/p99, for N = 0, 1 000 and
//! 10 000 (target: within 2x of no waiters). A second series parks waiters
//! whose `If-None-Match` lists the next 16 versions (the most allowed), the
//! other amplification found in review. Results: `benches/results/waiters.md`.

#[path = "../tests/common/mod.rs"]
mod common;
mod load;

use common::{raise_fd_limit, Client, Server};
use std::io::Write;
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

struct Figures {
    writes_per_s: f64,
    cpu_us_per_write: f64,
    get_p50_us: f64,
    get_p99_us: f64,
}

/// Parks `n` waiters on `hot`, built by `request(i)`, and waits until the
/// server reports them parked.
fn park(s: &Server, n: usize, request: impl Fn(usize) -> Vec<u8>) -> Vec<TcpStream> {
    let mut conns = Vec::with_capacity(n);
    for i in 0..n {
        let mut c = TcpStream::connect(s.addr).unwrap();
        c.write_all(&request(i)).unwrap();
        conns.push(c);
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while s.metric("rendezvous_waiters").unwrap_or(0.0) < n as f64 {
        assert!(Instant::now() < deadline, "waiters never parked");
        std::thread::sleep(Duration::from_millis(100));
    }
    conns
}

fn measure(s: &Server, secs: f64, write: impl Fn(u64) -> Vec<u8> + Send + 'static) -> Figures {
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (stop, addr) = (stop.clone(), s.addr);
        std::thread::spawn(move || {
            let mut c = Client::connect(addr);
            let mut lat = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                c.req("GET", "/get/unrelated", &[], b"");
                lat.push(t.elapsed().as_secs_f64() * 1e6);
                std::thread::sleep(Duration::from_micros(200));
            }
            lat
        })
    };
    let pid = s.pid();
    let mut c = Client::connect(s.addr);
    let cpu0 = load::cpu_seconds(pid);
    let t = Instant::now();
    let mut n = 0u64;
    while t.elapsed().as_secs_f64() < secs {
        c.send_raw(&write(n));
        let r = c.read_response(false).unwrap();
        assert_eq!(r.status, 200);
        n += 1;
    }
    let elapsed = t.elapsed().as_secs_f64();
    let cpu = load::cpu_seconds(pid) - cpu0;
    stop.store(true, Ordering::Relaxed);
    let mut lat = reader.join().unwrap();
    lat.sort_by(|a, b| a.total_cmp(b));
    let pct =
        |p: f64| lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1))).copied().unwrap_or(0.0);
    Figures {
        writes_per_s: n as f64 / elapsed,
        cpu_us_per_write: cpu * 1e6 / n as f64,
        get_p50_us: pct(0.5),
        get_p99_us: pct(0.99),
    }
}

fn main() {
    let quick = std::env::var("BENCH_QUICK").is_ok();
    let secs = if quick { 1.0 } else { 5.0 };
    let counts: &[usize] = if quick { &[0, 100] } else { &[0, 1000, 10_000] };
    raise_fd_limit(30_000);
    let args = [
        "-dataDir",
        "",
        "-threads",
        "2",
        "-maxConns",
        "30000",
        "-maxWaiters",
        "30000",
        "-maxWaitersPerIP",
        "30000",
        "-maxWaitersPerNet",
        "30000",
        "-maxWait",
        "10m",
    ];
    let mut md = format!(
        "# Parked waiters and the cost of a write\n\n-threads 2, loopback, one writer (sequential, keep-alive) rewriting \
         the waited-on key for {secs} s while a reader GETs another key every 200 us. Server CPU per write from /proc.\n\n\
         | waiters (unsatisfied) | kind | writes/s | CPU us per write | vs none | unrelated GET p50 | p99 |\n\
         |---:|---|---:|---:|---:|---:|---:|\n"
    );
    let rounds = if quick { 1 } else { 5 };
    let mut figures: Vec<Vec<Figures>> = counts.iter().map(|_| Vec::new()).collect();
    for _ in 0..rounds {
        for (k, &n) in counts.iter().enumerate() {
            let s = Server::start(&args);
            assert_eq!(s.post("/set/hot", b"same").status, 200);
            assert_eq!(s.post("/set/unrelated", b"v").status, 200);
            let conns = park(&s, n, |_| {
                b"GET /get/hot?wait=10m HTTP/1.1\r\nHost: b\r\nX-Expected-Value: same\r\n\r\n".to_vec()
            });
            let f =
                measure(&s, secs, |_| b"POST /set/hot HTTP/1.1\r\nHost: b\r\nContent-Length: 4\r\n\r\nsame".to_vec());
            eprintln!("{n} value waiters: {:.0} writes/s, {:.1} us/write", f.writes_per_s, f.cpu_us_per_write);
            figures[k].push(f);
            drop(conns);
        }
    }
    for (k, &n) in counts.iter().enumerate() {
        let fs = &figures[k];
        let (cpu, lo, hi) = load::spread(fs.iter().map(|f| f.cpu_us_per_write).collect());
        let ratios: Vec<f64> =
            fs.iter().zip(&figures[0]).map(|(f, b)| f.cpu_us_per_write / b.cpu_us_per_write).collect();
        let (ratio, rlo, rhi) = load::spread(ratios);
        let wps = load::spread(fs.iter().map(|f| f.writes_per_s).collect()).0;
        let p50 = load::spread(fs.iter().map(|f| f.get_p50_us).collect()).0;
        let p99 = load::spread(fs.iter().map(|f| f.get_p99_us).collect()).0;
        md += &format!(
            "| {n} | value equals the written one | {wps:.0} | {cpu:.1} ({lo:.1}-{hi:.1}) | {ratio:.2}x ({rlo:.2}-{rhi:.2}) | {p50:.0} us | {p99:.0} us |\n"
        );
    }
    let dir = format!("{}/benches/results", load::ROOT);
    std::fs::create_dir_all(&dir).unwrap();
    if !quick {
        std::fs::write(format!("{dir}/waiters.md"), &md).unwrap();
    }
    println!("{md}");
}
