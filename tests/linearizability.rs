//! Linearizability: a concurrent multi-client HTTP history of set, get, los,
//! cas and casoc on a few hot keys (spread over two cores), checked per key
//! against a sequential model with a Wing & Gong search.

mod common;
use common::*;
use std::collections::HashSet;
use std::sync::{Arc, Barrier};
use std::time::Instant;

#[derive(Debug, Clone)]
enum Call {
    Get,
    Set(String),
    Los(String),
    Cas(String, String),
    Casoc(String, String),
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Ret {
    Value(Option<String>),
    Ok,
    Created,
    Replaced,
    Existing(String),
    Conflict(String),
    NotFound,
}

#[derive(Debug, Clone)]
struct Event {
    key: usize,
    call: Call,
    ret: Ret,
    invoke: Instant,
    done: Instant,
}

/// The sequential specification of one key.
fn step(state: &Option<String>, call: &Call) -> (Option<String>, Ret) {
    match call {
        Call::Get => (state.clone(), Ret::Value(state.clone())),
        Call::Set(v) => (Some(v.clone()), Ret::Ok),
        Call::Los(v) => match state {
            None => (Some(v.clone()), Ret::Created),
            Some(cur) => (state.clone(), Ret::Existing(cur.clone())),
        },
        Call::Cas(e, v) => match state {
            None => (None, Ret::NotFound),
            Some(cur) if cur == e => (Some(v.clone()), Ret::Ok),
            Some(cur) => (state.clone(), Ret::Conflict(cur.clone())),
        },
        Call::Casoc(e, v) => match state {
            None => (Some(v.clone()), Ret::Created),
            Some(cur) if cur == e => (Some(v.clone()), Ret::Replaced),
            Some(cur) => (state.clone(), Ret::Conflict(cur.clone())),
        },
    }
}

/// Wing & Gong: is there an order of the events, consistent with real time
/// (an event that returned before another was invoked comes first), in
/// which every result matches the sequential model?
fn linearizable(events: &[Event]) -> bool {
    let mut events = events.to_vec();
    events.sort_by_key(|e| e.invoke);
    let n = events.len();
    let mut done = vec![false; n];
    let mut seen: HashSet<(Vec<u64>, Option<String>)> = HashSet::new();
    fn search(
        events: &[Event],
        done: &mut Vec<bool>,
        left: usize,
        state: Option<String>,
        seen: &mut HashSet<(Vec<u64>, Option<String>)>,
    ) -> bool {
        if left == 0 {
            return true;
        }
        let mut bits = vec![0u64; done.len().div_ceil(64)];
        for (i, d) in done.iter().enumerate() {
            if *d {
                bits[i / 64] |= 1 << (i % 64);
            }
        }
        if !seen.insert((bits, state.clone())) {
            return false;
        }
        let horizon = events.iter().zip(done.iter()).filter(|(_, d)| !**d).map(|(e, _)| e.done).min();
        let Some(horizon) = horizon else { return true };
        for i in 0..events.len() {
            if done[i] {
                continue;
            }
            if events[i].invoke > horizon {
                break;
            }
            let (next, ret) = step(&state, &events[i].call);
            if ret != events[i].ret {
                continue;
            }
            done[i] = true;
            if search(events, done, left - 1, next, seen) {
                return true;
            }
            done[i] = false;
        }
        false
    }
    search(&events, &mut done, n, None, &mut seen)
}

fn run_call(c: &mut Client, key: usize, call: &Call) -> Ret {
    let path = |route: &str| format!("/{route}/hot{key}");
    match call {
        Call::Get => {
            let r = c.req("GET", &path("get"), &[], b"");
            Ret::Value((r.status == 200).then(|| r.text()))
        }
        Call::Set(v) => {
            assert_eq!(c.req("POST", &path("set"), &[], v.as_bytes()).status, 200);
            Ret::Ok
        }
        Call::Los(v) => {
            let r = c.req("POST", &path("los"), &[], v.as_bytes());
            if r.header("X-Created").as_deref() == Some("true") {
                Ret::Created
            } else {
                Ret::Existing(r.text())
            }
        }
        Call::Cas(e, v) => {
            let r = c.req("POST", &path("cas"), &[("X-Expected-Value", e)], v.as_bytes());
            match r.status {
                200 => Ret::Ok,
                404 => Ret::NotFound,
                409 => Ret::Conflict(r.text()),
                s => panic!("cas answered {s}"),
            }
        }
        Call::Casoc(e, v) => {
            let r = c.req("POST", &path("casoc"), &[("X-Expected-Value", e)], v.as_bytes());
            match (r.status, r.header("X-Created").as_deref()) {
                (200, Some("true")) => Ret::Created,
                (200, _) => Ret::Replaced,
                (409, _) => Ret::Conflict(r.text()),
                (s, _) => panic!("casoc answered {s}"),
            }
        }
    }
}

#[test]
fn concurrent_histories_are_linearizable() {
    const CLIENTS: usize = 6;
    const OPS: usize = 400;
    const KEYS: usize = 3;
    let s = Server::start(&["-threads", "2"]);
    let addr = s.addr;
    let barrier = Arc::new(Barrier::new(CLIENTS));
    let handles: Vec<_> = (0..CLIENTS)
        .map(|client| {
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                let mut c = Client::connect(addr);
                let mut seed = 0x9e37_79b9_7f4a_7c15u64 ^ (client as u64 + 1).wrapping_mul(0x2545_f491_4f6c_dd1d);
                let mut rand = move |n: u64| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    seed % n
                };
                let mut last_seen: Vec<String> = vec![String::new(); KEYS];
                let mut events = Vec::with_capacity(OPS);
                barrier.wait();
                for i in 0..OPS {
                    let key = rand(KEYS as u64) as usize;
                    let v = format!("c{client}-{i}");
                    let e = last_seen[key].clone();
                    let call = match rand(10) {
                        0..=2 => Call::Get,
                        3 => Call::Set(v),
                        4 => Call::Los(v),
                        5..=7 => Call::Cas(e, v),
                        _ => Call::Casoc(e, v),
                    };
                    let invoke = Instant::now();
                    let ret = run_call(&mut c, key, &call);
                    let done = Instant::now();
                    if let Ret::Value(Some(x)) | Ret::Existing(x) | Ret::Conflict(x) = &ret {
                        last_seen[key] = x.clone();
                    }
                    if let (
                        Call::Set(x) | Call::Cas(_, x) | Call::Casoc(_, x),
                        Ret::Ok | Ret::Replaced | Ret::Created,
                    ) = (&call, &ret)
                    {
                        last_seen[key] = x.clone();
                    }
                    events.push(Event { key, call, ret, invoke, done });
                }
                events
            })
        })
        .collect();
    let events: Vec<Event> = handles.into_iter().flat_map(|h| h.join().unwrap()).collect();
    assert_eq!(events.len(), CLIENTS * OPS);
    let successes = events.iter().filter(|e| matches!(e.ret, Ret::Ok | Ret::Replaced | Ret::Created)).count();
    let conflicts = events.iter().filter(|e| matches!(e.ret, Ret::Conflict(_))).count();
    eprintln!("{} operations: {successes} successful writes, {conflicts} conflicts", events.len());
    assert!(successes > 100 && conflicts > 10, "the history should mix outcomes");
    for key in 0..KEYS {
        let history: Vec<Event> = events.iter().filter(|e| e.key == key).cloned().collect();
        assert!(linearizable(&history), "history of hot{key} ({} ops) is not linearizable", history.len());
    }
}

#[test]
fn the_checker_rejects_a_non_linearizable_history() {
    // A read that returns a value no write ever produced, and a stale read
    // after a completed write: both must be caught.
    let t = Instant::now();
    let at = |ms: u64| t + std::time::Duration::from_millis(ms);
    let ev = |call: Call, ret: Ret, a: u64, b: u64| Event { key: 0, call, ret, invoke: at(a), done: at(b) };
    let stale = vec![
        ev(Call::Set("1".into()), Ret::Ok, 0, 1),
        ev(Call::Set("2".into()), Ret::Ok, 2, 3),
        ev(Call::Get, Ret::Value(Some("1".into())), 4, 5),
    ];
    assert!(!linearizable(&stale));
    let phantom = vec![ev(Call::Get, Ret::Value(Some("x".into())), 0, 1)];
    assert!(!linearizable(&phantom));
    // Overlapping operations may take either order.
    let overlap = vec![
        ev(Call::Set("1".into()), Ret::Ok, 0, 10),
        ev(Call::Get, Ret::Value(None), 1, 2),
        ev(Call::Los("2".into()), Ret::Existing("1".into()), 3, 4),
    ];
    assert!(linearizable(&overlap));
}
