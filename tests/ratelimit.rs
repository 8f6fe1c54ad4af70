//! Rate limiting per client IP over real sockets, with client IPs spoofed
//! through `X-Forwarded-For` from the trusted loopback peer.

mod common;
use common::*;
use std::sync::{Arc, Barrier};

#[test]
fn reads_cost_one_and_refusal_has_retry_after() {
    let s = Server::start(&["-maxRequests", "17", "-resetDuration", "1h", "-threads", "2"]);
    let mut c = s.client();
    for i in 0..17 {
        let r = c.req("GET", "/get/x", &from("1.1.1.1"), b"");
        assert_eq!(r.status, 404, "request {i}");
    }
    let r = c.req("GET", "/get/x", &from("1.1.1.1"), b"");
    assert_eq!((r.status, r.text().as_str()), (429, "Too many requests"));
    assert_eq!(r.header("X-Client-Ip").as_deref(), Some("1.1.1.1"));
    let retry: u64 = r.header("Retry-After").unwrap().parse().unwrap();
    assert!((1..=3600).contains(&retry), "{retry}");
    // Other clients are unaffected; the docs page and pre-routing errors are free.
    assert_eq!(c.req("GET", "/get/x", &from("2.2.2.2"), b"").status, 404);
    assert_eq!(c.req("GET", "/", &from("1.1.1.1"), b"").status, 200);
    assert_eq!(c.req("GET", "/nope", &from("1.1.1.1"), b"").status, 404);
    assert_eq!(c.req("GET", "/get/%zz", &from("1.1.1.1"), b"").status, 400);
}

#[test]
fn writes_cost_three_and_refused_requests_consume_nothing() {
    let s = Server::start(&["-maxRequests", "17", "-resetDuration", "1h", "-threads", "2"]);
    let mut c = s.client();
    for i in 0..5 {
        assert_eq!(c.req("POST", &format!("/set/w{i}"), &from("3.3.3.3"), b"v").status, 200);
    }
    // 15 spent, 2 left: a write (3) is refused and takes nothing ...
    assert_eq!(c.req("POST", "/set/w9", &from("3.3.3.3"), b"v").status, 429);
    assert_eq!(c.req("POST", "/los/w9", &from("3.3.3.3"), b"v").status, 429);
    assert_eq!(s.get("/get/w9").status, 404, "a refused write changes nothing");
    // ... so both remaining tokens still buy two reads.
    assert_eq!(c.req("GET", "/get/w0", &from("3.3.3.3"), b"").status, 200);
    assert_eq!(c.req("GET", "/get/w0", &from("3.3.3.3"), b"").status, 200);
    assert_eq!(c.req("GET", "/get/w0", &from("3.3.3.3"), b"").status, 429);
}

#[test]
fn buckets_refill_after_the_reset_duration() {
    let s = Server::start(&["-maxRequests", "2", "-resetDuration", "1s"]);
    let mut c = s.client();
    let mut refused = false;
    for _ in 0..3 {
        if c.req("GET", "/get/x", &from("4.4.4.4"), b"").status == 429 {
            refused = true;
        }
    }
    assert!(refused);
    // Wait out the period (Retry-After says how long), then the bucket is full.
    let r = c.req("GET", "/get/x", &from("4.4.4.4"), b"");
    let wait = r.header("Retry-After").map_or(1, |v| v.parse().unwrap());
    std::thread::sleep(std::time::Duration::from_millis(wait * 1000 + 100));
    assert_eq!(c.req("GET", "/get/x", &from("4.4.4.4"), b"").status, 404);
}

#[test]
fn ipv6_clients_share_a_bucket_per_64() {
    let s = Server::start(&["-maxRequests", "4", "-resetDuration", "1h", "-threads", "2"]);
    let mut c = s.client();
    assert_eq!(c.req("GET", "/get/x", &from("2001:db8:1:2::1"), b"").status, 404);
    assert_eq!(c.req("GET", "/get/x", &from("2001:db8:1:2::2"), b"").status, 404);
    assert_eq!(c.req("GET", "/get/x", &from("2001:db8:1:2:ffff::9"), b"").status, 404);
    assert_eq!(c.req("GET", "/get/x", &from("2001:db8:1:2::77"), b"").status, 404);
    assert_eq!(c.req("GET", "/get/x", &from("2001:db8:1:2::5"), b"").status, 429);
    assert_eq!(c.req("GET", "/get/x", &from("2001:db8:1:3::1"), b"").status, 404, "another /64");
}

/// A 6to4 address (`2002:aabb:ccdd::/48`) and a Teredo one carry the
/// public IPv4 address they were sent from, and count as that host: their
/// /64s do not each get a bucket of their own. They are kept apart from
/// the native address (a relay could claim any of them).
#[test]
fn ipv6_addresses_tunnelled_from_one_ipv4_host_share_a_bucket() {
    let s = Server::start(&["-maxRequests", "3", "-resetDuration", "1h", "-threads", "2"]);
    let mut c = s.client();
    assert_eq!(c.req("GET", "/get/x", &from("2002:c000:22d::1"), b"").status, 404);
    assert_eq!(c.req("GET", "/get/x", &from("2002:c000:22d:ffff::9"), b"").status, 404);
    // Teredo: 192.0.2.45, inverted, in the last 32 bits.
    assert_eq!(c.req("GET", "/get/x", &from("2001:0:4136:e378:8000:63bf:3fff:fdd2"), b"").status, 404);
    let r = c.req("GET", "/get/x", &from("2002:c000:22d:7::1"), b"");
    assert_eq!(r.status, 429, "a fourth request from 192.0.2.45's 6to4 /48");
    assert_eq!(r.header("X-Client-Ip").as_deref(), Some("2002:c000:22d:7::1"), "the address is shown as sent");
    assert_eq!(c.req("GET", "/get/x", &from("192.0.2.45"), b"").status, 404, "the native address: its own bucket");
    assert_eq!(c.req("GET", "/get/x", &from("2002:c000:22e::1"), b"").status, 404, "192.0.2.46's");
    assert_eq!(c.req("GET", "/get/x", &from("2002:a00:5::1"), b"").status, 404, "a private address: not folded");
    assert_eq!(c.req("GET", "/get/x", &from("2002:a00:5:1::1"), b"").status, 404, "another /64");
}

/// 40 simultaneous GETs from a fresh IP with 17 tokens: exactly 17 succeed,
/// whatever core each connection lands on.
#[test]
fn counting_is_exact_under_concurrency() {
    for threads in ["1", "2", "4"] {
        let s = Server::start(&["-maxRequests", "17", "-resetDuration", "1h", "-threads", threads]);
        let addr = s.addr;
        for round in 0..3 {
            let ip = format!("9.9.{threads}.{round}");
            let barrier = Arc::new(Barrier::new(40));
            let handles: Vec<_> = (0..40)
                .map(|_| {
                    let barrier = barrier.clone();
                    let ip = ip.clone();
                    std::thread::spawn(move || {
                        let mut c = Client::connect(addr);
                        barrier.wait();
                        c.req("GET", "/get/anything", &from(&ip), b"").status
                    })
                })
                .collect();
            let statuses: Vec<u16> = handles.into_iter().map(|h| h.join().unwrap()).collect();
            let ok = statuses.iter().filter(|&&st| st == 404).count();
            let limited = statuses.iter().filter(|&&st| st == 429).count();
            assert_eq!((ok, limited), (17, 23), "threads={threads}: {statuses:?}");
        }
    }
}

#[test]
fn max_u32_requests_is_accepted() {
    let s = Server::start(&["-maxRequests", "4294967295"]);
    let mut c = s.client();
    for _ in 0..50 {
        assert_eq!(c.req("POST", "/set/k", &from("5.5.5.5"), b"v").status, 200);
    }
}

/// With both limits at their maximum (the limiter off, as the HAProxy
/// recipe runs its nodes) a full table of tracked clients refuses nobody:
/// there is no budget to keep. It used to answer 429 to every new client
/// once a few networks had sent one request from each of many addresses.
#[test]
fn with_the_limiter_off_a_full_table_refuses_nobody() {
    let s = Server::start(&["-maxTrackedIPs", "5", "-threads", "1"]);
    let mut c = s.client();
    for i in 0..12 {
        assert_eq!(c.req("GET", "/get/x", &from(&format!("7.7.{i}.1")), b"").status, 404, "client {i}");
    }
    assert_eq!(s.metric("rendezvous_ratelimit_tracked_clients"), Some(5.0));
    assert_eq!(s.metric("rendezvous_rate_limited_total{reason=\"table_full\"}").unwrap_or(0.0), 0.0);
}

#[test]
fn tracked_client_table_is_bounded() {
    let s = Server::start(&["-maxRequests", "100", "-resetDuration", "1h", "-maxTrackedIPs", "20", "-threads", "1"]);
    let mut c = s.client();
    for i in 0..20 {
        assert_eq!(c.req("GET", "/get/x", &from(&format!("7.7.7.{i}")), b"").status, 404);
    }
    // A new identity beyond the table is refused until the next refill,
    // saying why, and counted apart from clients out of tokens ...
    let r = c.req("GET", "/get/x", &from("7.7.8.1"), b"");
    assert!(r.status == 429 && r.text().contains("-maxTrackedIPs"), "{}", r.text());
    assert!(r.header("Retry-After").is_some());
    assert_eq!(s.metric("rendezvous_rate_limited_total{reason=\"table_full\"}"), Some(1.0));
    assert_eq!(s.metric("rendezvous_rate_limited_total{reason=\"ip\"}").unwrap_or(0.0), 0.0);
    // ... while known clients keep their buckets.
    assert_eq!(c.req("GET", "/get/x", &from("7.7.7.3"), b"").status, 404);
}

/// Renting many addresses in one network does not multiply the budget: ten
/// addresses of one /24 (and ten /64s of one /48) share the network's
/// tokens, exactly, whatever core each connection lands on.
#[test]
fn a_network_shares_one_budget() {
    let s = Server::start(&["-maxRequests", "5", "-maxRequestsPerNet", "12", "-resetDuration", "1h", "-threads", "2"]);
    for prefix in ["10.20.30.", "2001:db8:42:"] {
        let barrier = Arc::new(Barrier::new(10));
        let handles: Vec<_> = (0..10)
            .map(|i| {
                let (addr, barrier) = (s.addr, barrier.clone());
                let ip = if prefix.contains(':') { format!("{prefix}{i:x}::1") } else { format!("{prefix}{i}") };
                std::thread::spawn(move || {
                    let mut c = Client::connect(addr);
                    barrier.wait();
                    (0..4).map(|_| c.req("GET", "/get/x", &from(&ip), b"")).collect::<Vec<_>>()
                })
            })
            .collect();
        let answers: Vec<Resp> = handles.into_iter().flat_map(|h| h.join().unwrap()).collect();
        let ok = answers.iter().filter(|r| r.status == 404).count();
        assert_eq!(ok, 12, "{prefix}: the network's 12 tokens, no more");
        let refused: Vec<&Resp> = answers.iter().filter(|r| r.status == 429).collect();
        assert_eq!(refused.len(), 28);
        assert!(refused.iter().all(|r| r.text().contains("network") && r.header("Retry-After").is_some()));
    }
    // Another network is untouched; a client's own budget still binds first.
    let mut c = s.client();
    for _ in 0..5 {
        assert_eq!(c.req("GET", "/get/x", &from("10.20.31.1"), b"").status, 404);
    }
    let r = c.req("GET", "/get/x", &from("10.20.31.1"), b"");
    assert_eq!((r.status, r.text().as_str()), (429, "Too many requests"));
    assert_eq!(s.metric("rendezvous_rate_limited_total{reason=\"net\"}"), Some(56.0));
    assert_eq!(s.metric("rendezvous_rate_limited_total{reason=\"ip\"}"), Some(1.0));
}
