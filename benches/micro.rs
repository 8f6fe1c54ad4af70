//! Micro-benchmarks of the pure logic on the request path (divan):
//! `cargo bench --bench micro`.

use divan::{black_box, Bencher};
use rendezvous::request::clientip::{self, TrustedProxies};
use rendezvous::request::http::{self, Body, RequestHead, Response};
use rendezvous::state::ratelimit::Limiter;
use rendezvous::state::record::Journal;
use rendezvous::state::shard::{Condition, KeyBudget, Shard, Write};

/// The `-trustedProxies` default.
const DEFAULT_TRUSTED: &str = "127.0.0.0/8,::1/128,10.0.0.0/8,172.16.0.0/12,192.168.0.0/16,fc00::/7";

fn main() {
    divan::main();
}

const NOW: u64 = 1_800_000_000_000;
const KEYS: usize = 100_000;

fn filled(value_len: usize) -> (Shard, KeyBudget) {
    let budget = KeyBudget::new(KEYS * 2);
    let mut shard = Shard::with_capacity(KEYS * 2);
    let value = vec![b'v'; value_len];
    for i in 0..KEYS {
        let w = Write::new(format!("key-{i}").as_bytes(), &value, None, NOW + 3_600_000, Condition::Set).unwrap();
        shard.write(w, NOW, &budget, &mut Journal::default());
    }
    (shard, budget)
}

#[divan::bench]
fn shard_get_hit(bencher: Bencher) {
    let (mut shard, budget) = filled(100);
    let keys: Vec<Vec<u8>> = (0..1024).map(|i| format!("key-{}", i * 97 % KEYS).into_bytes()).collect();
    let mut i = 0;
    bencher.bench_local(|| {
        i = (i + 1) & 1023;
        black_box(shard.get(&keys[i], NOW, &budget))
    });
}

#[divan::bench]
fn shard_get_miss(bencher: Bencher) {
    let (mut shard, budget) = filled(100);
    bencher.bench_local(|| black_box(shard.get(b"no-such-key", NOW, &budget)));
}

/// The one insert that doubles a shard's table when it is 7/8 full (2^18,
/// 2^20 and 2^21 buckets): the stall a core pays once as its store passes
/// that size. The table rehashes from the 4-byte tags beside the entries,
/// never from the keys.
#[divan::bench(args = [229_376, 917_504, 1_835_008], sample_count = 5, sample_size = 1)]
fn shard_table_doubling(bencher: Bencher, full: usize) {
    bencher
        .with_inputs(|| {
            let budget = KeyBudget::new(full * 2);
            let mut shard = Shard::with_capacity(full * 2);
            for i in 0..full {
                let w = Write::new(format!("key-{i}").as_bytes(), b"v", None, NOW + 3_600_000, Condition::Set).unwrap();
                shard.write(w, NOW, &budget, &mut Journal::default());
            }
            (shard, budget)
        })
        .bench_local_values(|(mut shard, budget)| {
            let w = Write::new(b"the-one-more", b"v", None, NOW + 3_600_000, Condition::Set).unwrap();
            black_box(shard.write(w, NOW, &budget, &mut Journal::default()));
            (shard, budget)
        });
}

/// A key's expiry moving (an update) in a network holding `held` keys at a
/// 30,000-key quota: the key leaves its place in the network's sorted list
/// (anywhere) and joins at the end. The list is sorted runs past 128 keys,
/// so this stays flat as the network fills.
#[divan::bench(args = [100, 1_000, 10_000, 30_000])]
fn quota_update(bencher: Bencher, held: u64) {
    let budget = KeyBudget::with_quotas(1 << 20, 0, 30_000);
    // One /24: client i is 192.0.2.(i % 256); key i expires at second i.
    let client = |i: u64| rendezvous::state::net::client(std::net::IpAddr::from([192, 0, 2, (i % 256) as u8]));
    let mut expiry: Vec<u64> = (0..held).map(|i| NOW + 3_600_000 + i * 1000).collect();
    for (i, &e) in expiry.iter().enumerate() {
        budget.admit(client(i as u64), e, NOW).unwrap();
    }
    let (mut i, mut latest) = (0, NOW + 3_600_000 + held * 1000);
    bencher.bench_local(|| {
        // A stride through the list: each update takes a key from elsewhere.
        i = (i + 7919) % held;
        latest += 1000;
        budget.retime(client(i), expiry[i as usize], latest);
        expiry[i as usize] = latest;
    });
}

#[divan::bench(args = [16, 1000])]
fn shard_set_replace(bencher: Bencher, value_len: usize) {
    let (mut shard, budget) = filled(value_len);
    let value = vec![b'x'; value_len];
    let mut i = 0;
    bencher.bench_local(|| {
        i = (i + 1) % KEYS;
        let w = Write::new(format!("key-{i}").as_bytes(), &value, None, NOW + 1000, Condition::Set).unwrap();
        black_box(shard.write(w, NOW, &budget, &mut Journal::default()))
    });
}

#[divan::bench]
fn shard_cas_conflict(bencher: Bencher) {
    let (mut shard, budget) = filled(16);
    bencher.bench_local(|| {
        let w = Write::new(b"key-7", b"new", None, NOW + 1000, Condition::Cas((*b"not-it").into())).unwrap();
        black_box(shard.write(w, NOW, &budget, &mut Journal::default()))
    });
}

#[divan::bench]
fn shard_los_existing(bencher: Bencher) {
    let (mut shard, budget) = filled(100);
    bencher.bench_local(|| {
        let w = Write::new(b"key-7", b"new", None, NOW + 1000, Condition::Los).unwrap();
        black_box(shard.write(w, NOW, &budget, &mut Journal::default()))
    });
}

/// One sweep slice (the sweeper's minimum, 1024 entries) over a shard where
/// nothing has expired: the steady-state cost every 100 ms.
#[divan::bench]
fn ttl_sweep_1024_live(bencher: Bencher) {
    let (mut shard, budget) = filled(100);
    bencher.bench_local(|| black_box(shard.sweep(NOW, 1024, &budget)));
}

/// Reclaiming 1024 expired entries.
#[divan::bench]
fn ttl_sweep_1024_expired(bencher: Bencher) {
    bencher
        .with_inputs(|| {
            let budget = KeyBudget::new(4096);
            let mut shard = Shard::with_capacity(2048);
            for i in 0..1024 {
                shard.write(
                    Write::new(format!("k{i}").as_bytes(), b"v", None, NOW + 1, Condition::Set).unwrap(),
                    NOW,
                    &budget,
                    &mut Journal::default(),
                );
            }
            (shard, budget)
        })
        .bench_local_values(|(mut shard, budget)| black_box(shard.sweep(NOW + 10, 1024, &budget)));
}

#[divan::bench]
fn ratelimit_charge(bencher: Bencher) {
    let limiter = Limiter::new(u32::MAX, u32::MAX, 1_000_000);
    let mut ip = 0u64;
    bencher.bench_local(|| {
        ip = (ip + 1) & 0xffff;
        black_box(limiter.charge(ip, 1, 0))
    });
}

#[divan::bench]
fn xff_walk(bencher: Bencher) {
    let trusted = TrustedProxies::parse(DEFAULT_TRUSTED).unwrap();
    let peer = "127.0.0.1".parse().unwrap();
    let xff = b"6.6.6.6, 203.0.113.9, 10.0.0.7";
    bencher.bench_local(|| black_box(clientip::client_ip(peer, Some(black_box(xff)), &trusted)));
}

#[divan::bench]
fn head_parse(bencher: Bencher) {
    let raw = b"GET /get/my-mesh/peer-a HTTP/1.1\r\nHost: rendezvous.example\r\nUser-Agent: curl/8.5\r\n\
                Accept: */*\r\nX-Forwarded-For: 203.0.113.9\r\n\r\n";
    let mut head = RequestHead::default();
    bencher.bench_local(|| black_box(http::parse_head(black_box(raw), &mut head)));
}

/// The blank-line search that runs before every parse: a GET head alone, a
/// set's head with its 1000-byte body behind it, and the first of 16
/// pipelined GETs.
#[divan::bench(args = ["get", "set 1000 B", "pipelined x16"])]
fn head_scan(bencher: Bencher, case: &str) {
    let get: &[u8] =
        b"GET /get/my-mesh/peer-a HTTP/1.1\r\nHost: rendezvous.example\r\nX-Forwarded-For: 203.0.113.9\r\n\r\n";
    let buf = match case {
        "get" => get.to_vec(),
        "set 1000 B" => {
            let mut b =
                b"POST /set/my-mesh/peer-a HTTP/1.1\r\nHost: rendezvous.example\r\nContent-Length: 1000\r\n\r\n"
                    .to_vec();
            b.extend_from_slice(&[b'v'; 1000]);
            b
        }
        _ => get.repeat(16),
    };
    bencher.bench_local(|| black_box(http::head_may_be_complete(black_box(&buf), 0)));
}

#[divan::bench]
fn response_encode(bencher: Bencher) {
    let mut r = Response::new(200, Body::Bytes(vec![b'v'; 100].into()));
    r.expires_at = Some(1_800_000_000);
    let mut out = Vec::with_capacity(1024);
    bencher.bench_local(|| {
        out.clear();
        http::encode(&mut out, &r, "203.0.113.9", true, false, false);
        black_box(out.len())
    });
}
