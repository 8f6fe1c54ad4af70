//! Rendezvous primitives over real sockets: blocking reads, delete,
//! versions (ETag / If-None-Match / If-Match), CORS.

mod common;
use common::*;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

fn waiter(s: &Server, path: &str, headers: Vec<(String, String)>) -> std::thread::JoinHandle<(Resp, Instant)> {
    let addr = s.addr;
    let path = path.to_string();
    std::thread::spawn(move || {
        let mut c = Client::connect(addr);
        let h: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let r = c.req("GET", &path, &h, b"");
        (r, Instant::now())
    })
}

/// Waits until the server reports `n` parked waiters.
fn wait_parked(s: &Server, n: f64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while s.metric("rendezvous_waiters") != Some(n) {
        assert!(Instant::now() < deadline, "never saw {n} parked waiters");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn blocking_read_wakes_on_create() {
    let s = Server::start(&["-threads", "2"]);
    let w = waiter(&s, "/get/meet?wait=10s", vec![]);
    wait_parked(&s, 1.0);
    let written = Instant::now();
    assert_eq!(s.post("/set/meet", b"203.0.113.7:4000").status, 200);
    let (r, woke) = w.join().unwrap();
    assert_eq!((r.status, r.body.as_slice()), (200, &b"203.0.113.7:4000"[..]));
    assert!(r.header("ETag").is_some());
    let lag = woke.duration_since(written);
    assert!(lag < Duration::from_secs(2), "woke {lag:?} after the write");
    // Present: a blocking read answers at once.
    let t = Instant::now();
    assert_eq!(s.get("/get/meet?wait=10s").body, b"203.0.113.7:4000");
    assert!(t.elapsed() < Duration::from_secs(2));
}

#[test]
fn blocking_read_wakes_on_change_and_times_out() {
    let s = Server::start(&["-threads", "2"]);
    s.post("/set/k", b"v1");
    // Until the value differs from v1.
    let w = waiter(&s, "/get/k?wait=10s", vec![("X-Expected-Value".into(), "v1".into())]);
    wait_parked(&s, 1.0);
    s.post("/set/k", b"v1");
    std::thread::sleep(Duration::from_millis(100));
    assert!(!w.is_finished(), "the same value again is no change");
    s.post("/set/k", b"v2");
    assert_eq!(w.join().unwrap().0.body, b"v2");
    // If-None-Match with the ETag.
    let etag = s.get("/get/k").header("ETag").unwrap();
    let w = waiter(&s, "/get/k?wait=10s", vec![("If-None-Match".into(), etag.clone())]);
    wait_parked(&s, 1.0);
    s.post("/set/k", b"v3");
    let (r, _) = w.join().unwrap();
    assert_eq!(r.body, b"v3");
    assert_ne!(r.header("ETag").unwrap(), etag);
    // Timeouts: 404 while waiting for creation, 304 while waiting for a change.
    let t = Instant::now();
    assert_eq!(s.get("/get/absent?wait=300ms").status, 404);
    assert!(t.elapsed() >= Duration::from_millis(290));
    let r = s.req("GET", "/get/k?wait=300ms", &[("X-Expected-Value", "v3")], b"");
    assert_eq!(r.status, 304);
    assert!(r.body.is_empty());
    // Waits are capped by -maxWait, and must be valid durations.
    assert_eq!(s.get("/get/k?wait=0s").status, 400);
    assert_eq!(s.get("/get/k?wait=forever").status, 400);
    wait_parked(&s, 0.0);
}

#[test]
fn one_write_wakes_many_waiters_across_cores() {
    let s = Server::start(&["-threads", "4"]);
    let keys = ["a", "b", "c", "d", "e", "f", "g", "h"];
    let mut waiters = Vec::new();
    for i in 0..64 {
        waiters
            .push((keys[i % keys.len()], waiter(&s, &format!("/get/room/{}?wait=20s", keys[i % keys.len()]), vec![])));
    }
    wait_parked(&s, 64.0);
    for k in keys {
        assert_eq!(s.post(&format!("/set/room/{k}"), format!("value-{k}").as_bytes()).status, 200);
    }
    for (k, w) in waiters {
        let (r, _) = w.join().unwrap();
        assert_eq!(r.body, format!("value-{k}").as_bytes());
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while s.metric("rendezvous_wait_wakeups_total") != Some(64.0) {
        assert!(Instant::now() < deadline, "wake-ups not counted");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_client_that_leaves_releases_its_waiter() {
    let s = Server::start(&["-threads", "2", "-maxWaitersPerIP", "1", "-trustedProxies", ""]);
    for round in 0..3 {
        let mut c = s.client();
        c.send_raw(&build("GET", "/get/nobody?wait=30s", &[], b""));
        wait_parked(&s, 1.0);
        drop(c);
        wait_parked(&s, 0.0);
        // The per-IP slot is free again.
        let r = s.get("/get/nobody?wait=50ms");
        assert_eq!(r.status, 404, "round {round}");
    }
}

#[test]
fn pipelined_requests_behind_a_waiting_one_are_kept() {
    let s = Server::start(&["-threads", "2"]);
    let mut c = s.client();
    let mut raw = build("GET", "/get/p?wait=10s", &[], b"");
    raw.extend(build("GET", "/get/other", &[], b""));
    c.send_raw(&raw);
    wait_parked(&s, 1.0);
    s.post("/set/p", b"now");
    assert_eq!(c.read_response(false).unwrap().body, b"now");
    assert_eq!(c.read_response(false).unwrap().status, 404);
}

#[test]
fn waiter_bounds() {
    let s = Server::start(&["-threads", "2", "-maxWaitersPerIP", "2", "-maxWaitersPerNet", "3", "-maxWaiters", "4"]);
    let from = |ip: &str| vec![("X-Forwarded-For".to_string(), ip.to_string())];
    let w1 = waiter(&s, "/get/x?wait=5s", from("1.1.1.1"));
    let w2 = waiter(&s, "/get/x?wait=5s", from("1.1.1.1"));
    wait_parked(&s, 2.0);
    let r = s.req("GET", "/get/x?wait=5s", &[("X-Forwarded-For", "1.1.1.1")], b"");
    assert_eq!(r.status, 429, "per-IP bound");
    // Another client of the same /24 parks; the network is then full.
    let w3 = waiter(&s, "/get/x?wait=5s", from("1.1.1.2"));
    wait_parked(&s, 3.0);
    let r = s.req("GET", "/get/x?wait=5s", &[("X-Forwarded-For", "1.1.1.3")], b"");
    assert_eq!(r.status, 429, "per-network bound");
    assert!(r.text().contains("-maxWaitersPerNet"), "{}", r.text());
    let w4 = waiter(&s, "/get/x?wait=5s", from("2.2.2.2"));
    wait_parked(&s, 4.0);
    let r = s.req("GET", "/get/x?wait=5s", &[("X-Forwarded-For", "3.3.3.3")], b"");
    assert_eq!(r.status, 503, "server-wide bound");
    s.post("/set/x", b"v");
    for w in [w1, w2, w3, w4] {
        assert_eq!(w.join().unwrap().0.status, 200);
    }
}

#[test]
fn blocking_reads_cost_like_a_get() {
    let s = Server::start(&["-maxRequests", "2", "-resetDuration", "1h", "-threads", "2"]);
    let h = [("X-Forwarded-For", "4.4.4.4")];
    assert_eq!(s.req("GET", "/get/x?wait=50ms", &h, b"").status, 404);
    assert_eq!(s.req("GET", "/get/x?wait=50ms", &h, b"").status, 404);
    assert_eq!(s.req("GET", "/get/x?wait=50ms", &h, b"").status, 429);
}

#[test]
fn delete_semantics() {
    let s = Server::start(&["-threads", "2"]);
    assert_eq!(s.post("/del/none", b"").status, 404);
    s.post("/set/plain", b"v");
    let r = s.req("DELETE", "/del/plain", &[], b"");
    assert_eq!((r.status, r.text().as_str()), (200, "OK"));
    assert_eq!(s.get("/get/plain").status, 404);
    // Secrets protect deletes too.
    s.req("POST", "/set/owned", &[("X-Owner-Secret", "pw")], b"v");
    assert_eq!(s.post("/del/owned", b"").status, 403);
    assert_eq!(s.req("POST", "/del/owned", &[("X-Owner-Secret", "nope")], b"").status, 403);
    assert_eq!(s.req("POST", "/del/owned", &[("X-Owner-Secret", "pw")], b"").status, 200);
    // ip/ keys expand on delete.
    s.req("POST", "/set/ip/svc", &[("X-Forwarded-For", "5.5.5.5")], b"v");
    assert_eq!(s.req("POST", "/del/ip/svc", &[("X-Forwarded-For", "6.6.6.6")], b"").status, 404);
    assert_eq!(s.req("POST", "/del/ip/svc", &[("X-Forwarded-For", "5.5.5.5")], b"").status, 200);
    assert_eq!(s.get("/get/ip/5.5.5.5/svc").status, 404);
    // A waiter for a change sees the key go.
    s.post("/set/gone", b"v");
    let w = waiter(&s, "/get/gone?wait=10s", vec![("X-Expected-Value".into(), "v".into())]);
    wait_parked(&s, 1.0);
    assert_eq!(s.post("/del/gone", b"").status, 200);
    assert_eq!(w.join().unwrap().0.status, 404);
    assert_eq!(s.get("/del/x").status, 405);
    // The freed slot counts: a full store has room again after a delete.
    let s = Server::start(&["-maxNumKV", "1", "-maxKeysPerIP", "0", "-maxKeysPerNet", "0"]);
    s.post("/set/a", b"v");
    assert_eq!(s.post("/set/b", b"v").status, 507);
    s.post("/del/a", b"");
    assert_eq!(s.post("/set/b", b"v").status, 200);
}

#[test]
fn versions_etag_and_conditional_requests() {
    let s = Server::start(&["-threads", "2"]);
    let w = s.post("/set/k", b"v1");
    let e1 = w.header("ETag").unwrap();
    assert!(e1.starts_with('"') && e1.ends_with('"'));
    assert_eq!(s.get("/get/k").header("ETag").unwrap(), e1);
    // If-None-Match: 304 while unchanged.
    let r = s.req("GET", "/get/k", &[("If-None-Match", &e1)], b"");
    assert_eq!((r.status, r.body.len()), (304, 0));
    assert_eq!(s.req("GET", "/get/k", &[("If-None-Match", "\"0\"")], b"").status, 200);
    // Every write changes the version, even with the same value.
    let e2 = s.post("/set/k", b"v1").header("ETag").unwrap();
    assert_ne!(e1, e2);
    assert_eq!(s.req("GET", "/get/k", &[("If-None-Match", &e1)], b"").status, 200);
    // If-Match: compare-and-swap by version.
    let r = s.req("POST", "/set/k", &[("If-Match", &e1)], b"lost");
    assert_eq!((r.status, r.header("ETag")), (412, Some(e2.clone())));
    let r = s.req("POST", "/set/k", &[("If-Match", &e2)], b"won");
    assert_eq!(r.status, 200);
    assert_eq!(s.get("/get/k").body, b"won");
    assert_eq!(s.req("POST", "/set/absent", &[("If-Match", "*")], b"x").status, 412);
    assert_eq!(s.req("POST", "/set/k", &[("If-Match", "*")], b"any").status, 200);
    // ETags survive a restart, and later writes still change them.
    let e3 = s.get("/get/k").header("ETag").unwrap();
    let (dir, _) = s.stop_keep_dir("-TERM");
    let s = Server::start_in(dir, &["-threads", "3"]);
    assert_eq!(s.get("/get/k").header("ETag").unwrap(), e3);
    assert_ne!(s.post("/set/k", b"again").header("ETag").unwrap(), e3);
}

#[test]
fn cors_on_every_route_and_free_preflight() {
    let s = Server::start(&["-maxRequests", "1", "-resetDuration", "1h"]);
    for r in [s.get("/get/x"), s.post("/set/x", b"v"), s.get("/nope"), s.get("/")] {
        assert_eq!(r.header("Access-Control-Allow-Origin").as_deref(), Some("*"));
        let exposed = r.header("Access-Control-Expose-Headers").unwrap();
        for h in ["X-Client-Ip", "X-Expires-At", "X-Created", "ETag", "Retry-After"] {
            assert!(exposed.contains(h), "{h} not exposed");
        }
    }
    let from = [("X-Forwarded-For", "7.7.7.7"), ("Access-Control-Request-Method", "POST")];
    for _ in 0..5 {
        let r = s.req("OPTIONS", "/set/x", &from, b"");
        assert_eq!(r.status, 204);
        assert!(r.header("Access-Control-Allow-Methods").unwrap().contains("POST"));
        assert!(r.header("Access-Control-Allow-Headers").unwrap().contains("X-Owner-Secret"));
    }
    // Preflights charged nothing: the single token still buys a GET.
    assert_eq!(s.req("GET", "/get/x", &[("X-Forwarded-For", "7.7.7.7")], b"").status, 404);
}

#[test]
fn concurrent_waiters_and_writers_never_lose_a_wakeup() {
    // Many rounds of "wait, then write": whatever the interleaving, every
    // waiter that parked before the write is answered with the value.
    let s = Server::start(&["-threads", "2"]);
    for round in 0..30 {
        let key = format!("/get/race{round}?wait=10s");
        let barrier = Arc::new(Barrier::new(9));
        let mut ws = Vec::new();
        for _ in 0..8 {
            let (addr, key, barrier) = (s.addr, key.clone(), barrier.clone());
            ws.push(std::thread::spawn(move || {
                let mut c = Client::connect(addr);
                barrier.wait();
                c.req("GET", &key, &[], b"")
            }));
        }
        barrier.wait();
        assert_eq!(s.post(&format!("/set/race{round}"), b"x").status, 200);
        for w in ws {
            let r = w.join().unwrap();
            assert_eq!((r.status, r.body.as_slice()), (200, &b"x"[..]), "round {round}");
        }
    }
}

/// A blocking read listing versions that do not exist yet (versions are
/// predictable) cannot hold on through them: the next write answers it.
#[test]
fn predicted_versions_do_not_hold_a_blocking_read() {
    let s = Server::start(&["-threads", "2"]);
    let r = s.post("/set/k", b"v1");
    let v = u64::from_str_radix(r.header("ETag").unwrap().trim_matches('"'), 16).unwrap();
    let tags: Vec<String> = (0..16).map(|d| format!("\"{:x}\"", v + d)).collect();
    let tags = tags.join(", ");
    let waiter = {
        let addr = s.addr;
        std::thread::spawn(move || {
            Client::connect(addr).req("GET", "/get/k?wait=20s", &[("If-None-Match", &tags)], b"")
        })
    };
    wait_parked(&s, 1.0);
    let started = Instant::now();
    assert_eq!(s.post("/set/k", b"v2").status, 200);
    let r = waiter.join().unwrap();
    assert_eq!((r.status, r.body.as_slice()), (200, &b"v2"[..]));
    assert!(started.elapsed() < Duration::from_secs(5));
}
