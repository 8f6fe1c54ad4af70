//! A spoofed-identity flood: a million distinct client IPs through
//! `X-Forwarded-For` from a trusted peer. The limiter's memory stays bounded
//! and the server keeps answering.

mod common;
use common::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

fn peak_rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap();
    kb * 1024
}

/// Sends `count` GETs, client i claiming address 11.x.y.z (distinct for
/// every i), pipelined over a few connections. Returns the 429 count.
fn flood(s: &Server, count: usize) -> usize {
    let conns = 4;
    let handles: Vec<_> = (0..conns)
        .map(|c| {
            let addr = s.addr;
            std::thread::spawn(move || {
                let stream = TcpStream::connect(addr).unwrap();
                stream.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
                let mut writer = stream.try_clone().unwrap();
                let n = count / conns;
                let sender = std::thread::spawn(move || {
                    let mut batch = Vec::with_capacity(1 << 20);
                    for j in 0..n {
                        let i = c * n + j;
                        let ip = format!("11.{}.{}.{}", (i >> 16) & 0xff, (i >> 8) & 0xff, i & 0xff);
                        batch.extend_from_slice(
                            format!("GET /get/x HTTP/1.1\r\nX-Forwarded-For: {ip}\r\n\r\n").as_bytes(),
                        );
                        if batch.len() > (1 << 19) {
                            writer.write_all(&batch).unwrap();
                            batch.clear();
                        }
                    }
                    writer.write_all(&batch).unwrap();
                });
                // Count answers by their status lines.
                let mut reader = stream;
                let (mut seen, mut limited) = (0, 0);
                let mut buf = vec![0u8; 1 << 16];
                let mut carry: Vec<u8> = Vec::new();
                while seen < n {
                    let r = reader.read(&mut buf).unwrap();
                    assert!(r > 0, "server closed the connection");
                    carry.extend_from_slice(&buf[..r]);
                    let mut start = 0;
                    while let Some(p) = carry[start..].windows(12).position(|w| w.starts_with(b"HTTP/1.1 ")) {
                        let at = start + p;
                        if carry.len() < at + 12 {
                            break;
                        }
                        seen += 1;
                        if &carry[at + 9..at + 12] == b"429" {
                            limited += 1;
                        }
                        start = at + 12;
                    }
                    carry.drain(..start);
                }
                sender.join().unwrap();
                limited
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).sum()
}

#[test]
fn a_million_spoofed_ips_keep_memory_bounded() {
    let s = Server::start(&["-threads", "2", "-maxRequests", "5", "-resetDuration", "1h"]);
    let before = peak_rss_bytes(s.pid());
    let limited = flood(&s, 1_000_000);
    // Every identity is new, so none is over its budget; the only refusals
    // are identities beyond a core's half of -maxTrackedIPs (1,000,000),
    // since hashing splits them only roughly evenly.
    assert!(limited < 10_000, "{limited} refused");
    let peak = peak_rss_bytes(s.pid());
    eprintln!("peak RSS {} MiB after 1,000,000 distinct client IPs (started at {} MiB)", peak >> 20, before >> 20);
    assert!(peak < 400 << 20, "peak RSS {} MiB", peak >> 20);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        if s.metric("rendezvous_ratelimit_tracked_clients") == Some((1_000_000 - limited) as f64) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "tracked clients do not add up");
        std::thread::sleep(Duration::from_millis(100));
    }
    // Still answering: the docs page is free, and an identity tracked early
    // in the flood still has tokens (a new one may be refused while its
    // core's table is full).
    assert_eq!(s.get("/").status, 200);
    assert_eq!(s.req("GET", "/get/x", &[("X-Forwarded-For", "11.0.0.1")], b"").status, 404);
}

#[test]
fn the_tracked_client_table_has_a_hard_cap() {
    let s = Server::start(&["-threads", "2", "-maxRequests", "5", "-resetDuration", "1h", "-maxTrackedIPs", "20000"]);
    let limited = flood(&s, 100_000);
    // Each core tracks at most its half of the cap; the rest are refused.
    assert!(limited >= 80_000, "{limited}");
    let tracked = s.metric("rendezvous_ratelimit_tracked_clients");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let mut tracked = tracked.unwrap_or(0.0);
    while tracked == 0.0 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        tracked = s.metric("rendezvous_ratelimit_tracked_clients").unwrap_or(0.0);
    }
    assert!(tracked > 0.0 && tracked <= 20_000.0, "{tracked}");
    // New identities are refused until the next refill; the server still answers.
    assert_eq!(s.get("/get/x").status, 429);
    assert_eq!(s.get("/").status, 200);
}
