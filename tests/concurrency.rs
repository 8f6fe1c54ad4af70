//! Atomicity of los/cas/casoc under concurrent clients, across cores.

mod common;
use common::*;
use std::sync::{Arc, Barrier};

/// 32 clients increment one counter with cas + retry; the total is exact.
#[test]
fn cas_counter_is_exact() {
    for threads in ["1", "4"] {
        let s = Server::start(&["-threads", threads]);
        assert_eq!(s.post("/set/counter", b"0").status, 200);
        let addr = s.addr;
        const CLIENTS: usize = 32;
        const INCREMENTS: usize = 20;
        let barrier = Arc::new(Barrier::new(CLIENTS));
        let handles: Vec<_> = (0..CLIENTS)
            .map(|_| {
                let barrier = barrier.clone();
                std::thread::spawn(move || {
                    let mut c = Client::connect(addr);
                    barrier.wait();
                    let mut conflicts = 0;
                    for _ in 0..INCREMENTS {
                        let mut current = c.req("GET", "/get/counter", &[], b"").text();
                        loop {
                            let next = (current.parse::<u64>().unwrap() + 1).to_string();
                            let r = c.req("POST", "/cas/counter", &[("X-Expected-Value", &current)], next.as_bytes());
                            match r.status {
                                200 => break,
                                409 => {
                                    conflicts += 1;
                                    current = r.text();
                                }
                                other => panic!("unexpected {other}"),
                            }
                        }
                    }
                    conflicts
                })
            })
            .collect();
        let conflicts: usize = handles.into_iter().map(|h| h.join().unwrap()).sum();
        let total = s.get("/get/counter").text();
        assert_eq!(total, (CLIENTS * INCREMENTS).to_string(), "threads={threads}, conflicts={conflicts}");
    }
}

/// 32 concurrent `los` on one key: exactly one creates it, everyone sees
/// the winner's value.
#[test]
fn los_has_exactly_one_winner() {
    for threads in ["1", "4"] {
        let s = Server::start(&["-threads", threads]);
        let addr = s.addr;
        for round in 0..5 {
            let key = format!("/los/race{round}");
            let barrier = Arc::new(Barrier::new(32));
            let handles: Vec<_> = (0..32)
                .map(|i| {
                    let barrier = barrier.clone();
                    let key = key.clone();
                    std::thread::spawn(move || {
                        let mut c = Client::connect(addr);
                        let mine = format!("peer-{i}");
                        barrier.wait();
                        let r = c.req("POST", &key, &[], mine.as_bytes());
                        assert_eq!(r.status, 200);
                        let created = r.header("X-Created").unwrap() == "true";
                        let seen = if created { mine } else { r.text() };
                        (created, seen)
                    })
                })
                .collect();
            let results: Vec<(bool, String)> = handles.into_iter().map(|h| h.join().unwrap()).collect();
            let winners: Vec<&String> = results.iter().filter(|r| r.0).map(|r| &r.1).collect();
            assert_eq!(winners.len(), 1, "threads={threads}: {results:?}");
            assert!(results.iter().all(|r| &r.1 == winners[0]), "everyone sees the winner");
            assert_eq!(&s.get(&format!("/get/race{round}")).text(), winners[0]);
        }
    }
}

/// casoc as a lock: concurrent creators, exactly one gets X-Created: true.
#[test]
fn casoc_creation_race() {
    let s = Server::start(&["-threads", "4"]);
    let addr = s.addr;
    let barrier = Arc::new(Barrier::new(16));
    let handles: Vec<_> = (0..16)
        .map(|i| {
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                let mut c = Client::connect(addr);
                barrier.wait();
                let r = c.req("POST", "/casoc/lock", &[("X-Expected-Value", "free")], format!("{i}").as_bytes());
                (r.status, r.header("X-Created"))
            })
        })
        .collect();
    let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert_eq!(results.iter().filter(|r| r.0 == 200).count(), 1, "{results:?}");
    assert_eq!(results.iter().filter(|r| r.0 == 409).count(), 15);
}

/// Many keys on 4 cores, written and read through connections that land on
/// every core: every key is found where it was written. (2000 keys from one
/// address: over its default quota, so quotas are off here.)
#[test]
fn keys_spread_over_all_cores() {
    let s = Server::start(&["-threads", "4", "-maxKeysPerIP", "0", "-maxKeysPerNet", "0"]);
    let addr = s.addr;
    let handles: Vec<_> = (0..8)
        .map(|t| {
            std::thread::spawn(move || {
                let mut c = Client::connect(addr);
                for i in 0..250 {
                    let r = c.req("POST", &format!("/set/spread-{t}-{i}"), &[], format!("{t}:{i}").as_bytes());
                    assert_eq!(r.status, 200);
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    // Read back through fresh connections (other cores).
    for conn in 0..4 {
        let mut c = s.client();
        for t in 0..8 {
            for i in (conn..250).step_by(4) {
                let r = c.req("GET", &format!("/get/spread-{t}-{i}"), &[], b"");
                assert_eq!(r.body, format!("{t}:{i}").as_bytes());
            }
        }
    }
}

/// A GET of a key another core owns is answered from that core's shard
/// without a message (a direct read), and still shows every write that was
/// acknowledged before it, in each durability mode and without a log.
#[test]
fn remote_gets_are_read_directly_and_see_every_acknowledged_write() {
    for args in [&["-fsync", "always"][..], &["-fsync", "everysec"], &["-fsync", "no"], &["-dataDir", ""]] {
        let mut all = vec!["-threads", "2", "-maxKeysPerIP", "0", "-maxKeysPerNet", "0"];
        all.extend_from_slice(args);
        let s = Server::start(&all);
        // Enough connections that both cores serve some of them.
        let mut clients: Vec<Client> = (0..8).map(|_| s.client()).collect();
        for i in 0..400 {
            let path = format!("direct-{i}");
            let value = format!("v{i}");
            let w = clients[i % 8].req("POST", &format!("/set/{path}"), &[], value.as_bytes());
            assert_eq!(w.status, 200, "{args:?}");
            let r = clients[(i + 3) % 8].req("GET", &format!("/get/{path}"), &[], b"");
            assert_eq!((r.status, r.text()), (200, value.clone()), "{args:?}");
            let v = clients[(i + 5) % 8].req("POST", &format!("/set/{path}"), &[], b"changed");
            assert_eq!(v.status, 200);
            let r = clients[(i + 6) % 8].req("GET", &format!("/get/{path}"), &[], b"");
            assert_eq!(r.text(), "changed", "{args:?}");
        }
        // The cores publish their counters every 100 ms.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let direct = loop {
            let n: f64 =
                (0..2).filter_map(|c| s.metric(&format!("rendezvous_direct_reads_total{{core=\"{c}\"}}"))).sum();
            if n >= 100.0 || std::time::Instant::now() > deadline {
                break n;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        };
        // About half of the 800 GETs are of the other core's keys; each
        // follows an acknowledged write, so nearly all of them are direct.
        assert!(direct >= 100.0, "only {direct} GETs were read directly with {args:?}");
    }
}
