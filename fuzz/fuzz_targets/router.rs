//! Fuzzes the whole pure request path: head parse -> route and argument
//! decoding (key, ttl, secret, XFF client IP, ip/ expansion, entity tags)
//! -> the rate limiter, key quotas, the owning shard's state machine and
//! waiters -> the log
//! records it journals, which must decode back. Nothing may panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rendezvous::request::api::{self, Action, Limits};
use rendezvous::request::clientip::{self, TrustedProxies};
use rendezvous::state::command::{Applier, Op, Origin, Owned, Reply};
use rendezvous::request::http::{self, RequestHead};
use rendezvous::state::net;
use rendezvous::state::ratelimit::Limiter;
use rendezvous::state::secret::SecretKey;
use rendezvous::state::record::{read_all, Journal, Tail};
use rendezvous::state::shard::{KeyBudget, Shard};
use std::cell::RefCell;
use std::time::Duration;

/// The `-trustedProxies` default.
const DEFAULT_TRUSTED: &str = "127.0.0.0/8,::1/128,10.0.0.0/8,172.16.0.0/12,192.168.0.0/16,fc00::/7";

fn owned() -> Owned {
    Owned::new(Shard::with_capacity(64))
}

thread_local! {
    static STATE: RefCell<(Owned, KeyBudget, Limiter, Journal)> = RefCell::new((
        owned(),
        KeyBudget::with_quotas(64, 8, 16),
        Limiter::new(1000, 10_000, 64),
        Journal::enabled(),
    ));
}

/// Applies as core 0, whose log acknowledges at once.
fn apply(owned: &mut Owned, op: Op, now_ms: u64, budget: &KeyBudget, journal: &mut Journal, wakeups: &mut Vec<(Origin, Reply)>) -> Reply {
    let mut by = Applier { core: 0, journal, now_ms, budget, acked: &|_| u64::MAX };
    owned.apply(op, &mut by, wakeups).reply
}

fuzz_target!(|data: &[u8]| {
    let mut head = RequestHead::default();
    let Ok(Some(n)) = http::parse_head(data, &mut head) else { return };
    let body = &data[n..];
    let trusted = TrustedProxies::parse(DEFAULT_TRUSTED).unwrap();
    let peer = "127.0.0.1".parse().unwrap();
    let client = clientip::client_ip(peer, head.forwarded_for.get(), &trusted);
    let limits = Limits {
        max_key_size: 100,
        max_value_size: 1000,
        max_ttl: Duration::from_secs(7200),
        max_wait: Duration::from_secs(60),
    };
    let secrets = SecretKey::from_bytes([1; 32]);
    let action = match api::prepare(&head, body, client, &limits, &secrets, 1_000_000) {
        Ok(Action::Store(action)) => action,
        // Blocking reads park on the shard like the server does, then a write may wake them.
        Ok(Action::Wait(w)) => {
            STATE.with(|s| {
                let (owned, budget, _, journal) = &mut *s.borrow_mut();
                let origin = Origin { core: 0, slot: data.len() as u32 };
                let op = Op::Wait { key: w.key, until: w.until, origin };
                let reply = apply(owned, op, 1_000_000, budget, journal, &mut Vec::new());
                let _ = api::respond_wait(Some(reply), w.timeout_status, || 1);
            });
            return;
        }
        _ => return,
    };
    STATE.with(|s| {
        let (owned, budget, limiter, journal) = &mut *s.borrow_mut();
        let api::StoreAction { op, cost, meta } = action;
        // The charge first, as the router takes it; a refusal applies nothing.
        let mut wakeups = Vec::new();
        let reply = match limiter.charge(net::client(client), cost, 0) {
            Err(refused) => Reply::Limited(refused),
            Ok(()) => apply(owned, op, 1_000_000 + data.len() as u64, budget, journal, &mut wakeups),
        };
        let r = api::respond(&meta, reply, "127.0.0.1", || 1);
        let mut out = Vec::new();
        http::encode(&mut out, &r, "127.0.0.1", true, false, false);
        assert!(out.starts_with(b"HTTP/1.1 "));
        // Every change journaled decodes back, whole.
        let bytes = journal.take(Vec::new());
        assert_eq!(read_all(&bytes, 0, |_| {}), Ok(Tail::Clean));
        if owned.shard.len() > 60 {
            owned.shard.sweep(u64::MAX, 1000, budget);
        }
    });
});
