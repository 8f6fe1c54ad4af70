//! Which cores take new connections (`-placement`), over real sockets:
//! packed onto one core while it carries the load, spread evenly when
//! asked, and gathered again (each client asked to reconnect with
//! `Connection: close` on an answer) when the load no longer needs the
//! cores they are on.

mod common;
use common::*;
use std::time::{Duration, Instant};

/// Polls the metric `series` until `ok` holds, for up to 30 s; returns the
/// last value.
fn wait_metric(s: &Server, series: &str, ok: impl Fn(f64) -> bool) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let v = s.metric(series).unwrap_or(-1.0);
        if ok(v) || Instant::now() > deadline {
            return v;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Opens `n` keep-alive connections, each answered once (so each is
/// accepted and counted by its core).
fn open(s: &Server, n: usize) -> Vec<Client> {
    (0..n)
        .map(|_| {
            let mut c = s.client();
            assert_eq!(c.req("GET", "/get/x", &[], b"").status, 404);
            c
        })
        .collect()
}

fn on_core(s: &Server, core: usize) -> f64 {
    s.metric(&format!("rendezvous_core_connections_open{{core=\"{core}\"}}")).unwrap_or(-1.0)
}

#[test]
fn new_connections_go_to_one_core_while_it_carries_the_load() {
    let s = Server::start(&["-threads", "2", "-placement", "pack"]);
    // Steered before the first accept: no wait.
    assert_eq!(s.metric("rendezvous_placement_cores"), Some(1.0));
    let conns = open(&s, 24);
    assert_eq!((on_core(&s, 0), on_core(&s, 1)), (24.0, 0.0));
    // Both cores' keys are still served (read and written directly).
    let mut c = s.client();
    for i in 0..64 {
        assert_eq!(c.req("POST", &format!("/set/k{i}"), &[], b"v").status, 200);
    }
    for i in 0..64 {
        assert_eq!(c.req("GET", &format!("/get/k{i}"), &[], b"").text(), "v");
    }
    drop(conns);
}

#[test]
fn spread_places_connections_on_every_core() {
    let s = Server::start(&["-threads", "2", "-placement", "spread"]);
    let conns = open(&s, 32);
    assert_eq!(s.metric("rendezvous_placement_cores"), Some(2.0));
    let (a, b) = (on_core(&s, 0), on_core(&s, 1));
    // The kernel hashes each connection: all 32 on one core is a 1 in 2^31 chance.
    assert!(a > 0.0 && b > 0.0 && a + b == 32.0, "{a} and {b}");
    drop(conns);
}

/// Started with its connections spread over both cores, an idle server
/// soon needs one: the clients on the other core are told to reconnect
/// (one answer each, with `Connection: close`), and reconnect onto core 0,
/// at once, even at their cap of connections (`-maxConnsPerIP`).
#[test]
fn connections_on_a_core_the_load_no_longer_needs_are_asked_to_reconnect() {
    let s = Server::start_wrapped(
        TempDir::new(),
        &["env", "RENDEZVOUS_PLACEMENT_START=2"],
        &["-threads", "2", "-placement", "pack", "-maxConnsPerIP", "32", "-trustedProxies", ""],
    );
    assert_eq!(s.metric("rendezvous_placement_cores"), Some(2.0));
    let mut conns = open(&s, 32);
    let moved_off = on_core(&s, 1);
    assert!(moved_off > 0.0 && on_core(&s, 0) + moved_off == 32.0, "{moved_off} on core 1");
    // Idle, one core carries the load.
    assert_eq!(wait_metric(&s, "rendezvous_placement_cores", |v| v == 1.0), 1.0);
    // Core 0 sets the moves on its next tick: ask until core 1 is empty.
    let closes = |r: &Resp| r.header("Connection").is_some_and(|v| v.eq_ignore_ascii_case("close"));
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut closing = 0;
    while on_core(&s, 1) > 0.0 && Instant::now() < deadline {
        for c in &mut conns {
            let r = c.req("GET", "/get/x", &[], b"");
            assert_eq!(r.status, 404, "answered, not cut");
            if closes(&r) {
                assert!(c.is_closed());
                *c = s.client();
                assert_eq!(c.req("GET", "/get/x", &[], b"").status, 404);
                closing += 1;
            }
        }
    }
    assert_eq!(closing as f64, moved_off, "exactly the other core's clients were asked");
    assert_eq!((on_core(&s, 0), on_core(&s, 1)), (32.0, 0.0));
    assert_eq!(s.metric("rendezvous_connections_moved_total"), Some(moved_off));
    // Asked once: the next answers keep the connections open.
    for c in &mut conns {
        assert!(!closes(&c.req("GET", "/get/x", &[], b"")));
    }
}
