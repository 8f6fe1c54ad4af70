//! Write-to-wake latency of blocking reads: `cargo bench --bench wake`.
//!
//! A peer parks `GET /get/<key>?wait=30s`; another peer writes the key; we
//! time from sending the write to receiving the waiter's answer, over real
//! loopback sockets, with keys spread over both cores (so most wake-ups
//! cross cores). Results: `benches/results/wake.md`.

#[path = "../tests/common/mod.rs"]
mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

const ROUNDS: usize = 2000;

fn read_response(s: &mut TcpStream) -> Vec<u8> {
    let mut buf = Vec::new();
    let mut tmp = [0u8; 4096];
    loop {
        let n = s.read(&mut tmp).unwrap();
        assert!(n > 0, "closed");
        buf.extend_from_slice(&tmp[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                return buf;
            }
        }
    }
}

fn main() {
    let server = common::Server::start(&["-dataDir", "", "-threads", "2"]);
    let (addr, metrics) = (server.addr, server.metrics.unwrap());
    let parked = |n: usize| {
        let mut m = TcpStream::connect(metrics).unwrap();
        m.write_all(b"GET /metrics HTTP/1.1\r\nConnection: close\r\n\r\n").unwrap();
        let mut text = String::new();
        m.read_to_string(&mut text).unwrap();
        text.lines().any(|l| l == format!("rendezvous_waiters {n}"))
    };
    let mut waiter = TcpStream::connect(addr).unwrap();
    let mut writer = TcpStream::connect(addr).unwrap();
    waiter.set_nodelay(true).unwrap();
    writer.set_nodelay(true).unwrap();
    let mut lat = Vec::with_capacity(ROUNDS);
    for i in 0..ROUNDS {
        waiter.write_all(format!("GET /get/wake-{i}?wait=30s HTTP/1.1\r\nHost: b\r\n\r\n").as_bytes()).unwrap();
        // Make sure it is parked, so we time a wake-up and not a plain read.
        let deadline = Instant::now() + Duration::from_secs(5);
        while !parked(1) {
            assert!(Instant::now() < deadline, "waiter never parked");
            std::thread::sleep(Duration::from_micros(200));
        }
        let t = Instant::now();
        writer
            .write_all(format!("POST /set/wake-{i} HTTP/1.1\r\nHost: b\r\nContent-Length: 2\r\n\r\nhi").as_bytes())
            .unwrap();
        let resp = read_response(&mut waiter);
        lat.push(t.elapsed());
        assert!(resp.starts_with(b"HTTP/1.1 200"));
        read_response(&mut writer);
    }
    drop(server);
    lat.sort();
    let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)];
    let md = format!(
        "# Write-to-wake latency\n\n{ROUNDS} rounds, -threads 2, loopback: time from sending a write to receiving the \
         parked waiter's answer.\n\n| p50 | p90 | p99 | p99.9 | max |\n|---:|---:|---:|---:|---:|\n\
         | {:?} | {:?} | {:?} | {:?} | {:?} |\n",
        pct(0.5),
        pct(0.9),
        pct(0.99),
        pct(0.999),
        lat[lat.len() - 1]
    );
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/results");
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(format!("{dir}/wake.md"), &md).unwrap();
    println!("{md}");
}
