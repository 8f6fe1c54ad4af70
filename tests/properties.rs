//! Property-based tests (proptest) of the pure logic: the HTTP head parser
//! and chunked decoder, key decoding, the XFF walk, TTL parsing, and the
//! shard's semantics against a simple reference model.

use proptest::prelude::*;
use rendezvous::duration;
use rendezvous::request::api;
use rendezvous::request::clientip::{self, TrustedProxies};
use rendezvous::request::http::{self, BodyKind, ChunkedDecoder, RequestHead};
use rendezvous::state::record::Journal;
use rendezvous::state::shard::{Condition, KeyBudget, Shard, Write, WriteOutcome};
use std::collections::HashMap;
use std::net::IpAddr;

/// The `-trustedProxies` default.
const DEFAULT_TRUSTED: &str = "127.0.0.0/8,::1/128,10.0.0.0/8,172.16.0.0/12,192.168.0.0/16,fc00::/7";

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// Arbitrary bytes never panic the head parser, and a reported head
    /// length is within the input.
    #[test]
    fn head_parser_total_on_garbage(raw in proptest::collection::vec(any::<u8>(), 0..600)) {
        let mut head = RequestHead::default();
        if let Ok(Some(n)) = http::parse_head(&raw, &mut head) {
            prop_assert!(n <= raw.len());
        }
        let _ = http::head_may_be_complete(&raw, raw.len() / 2);
    }

    /// A well-formed request parses to what was sent, however it is split.
    #[test]
    fn head_parser_round_trip(
        method in prop::sample::select(vec!["GET", "POST", "HEAD"]),
        path in "/[a-zA-Z0-9%/._~-]{0,60}",
        secret in proptest::option::of("[!-~]{1,40}"),
        len in 0u64..5000,
        split in 0usize..400,
    ) {
        let mut raw = format!("{method} {path} HTTP/1.1\r\nHost: h\r\n");
        if let Some(s) = &secret {
            raw += &format!("X-Owner-Secret: {s}\r\n");
        }
        raw += &format!("Content-Length: {len}\r\n\r\n");
        let bytes = raw.as_bytes();
        let mut head = RequestHead::default();
        let split = split.min(bytes.len() - 1);
        prop_assert_eq!(http::parse_head(&bytes[..split], &mut head).unwrap(), None);
        prop_assert_eq!(http::parse_head(bytes, &mut head).unwrap(), Some(bytes.len()));
        prop_assert_eq!(&head.target[..], path.as_bytes());
        prop_assert_eq!(head.secret.get(), secret.as_ref().map(|s| s.as_bytes()));
        prop_assert_eq!(head.body, if len == 0 { BodyKind::None } else { BodyKind::Length(len) });
    }

    /// Any chunking of a body decodes to the body, fed in any pieces; the
    /// decoder never holds more than the limit.
    #[test]
    fn chunked_round_trip(
        body in proptest::collection::vec(any::<u8>(), 0..300),
        sizes in proptest::collection::vec(1usize..50, 1..20),
        piece in 1usize..40,
        limit in 0usize..400,
    ) {
        let mut enc = Vec::new();
        let mut rest = &body[..];
        let mut i = 0;
        while !rest.is_empty() {
            let n = sizes[i % sizes.len()].min(rest.len());
            enc.extend_from_slice(format!("{n:x}\r\n").as_bytes());
            enc.extend_from_slice(&rest[..n]);
            enc.extend_from_slice(b"\r\n");
            rest = &rest[n..];
            i += 1;
        }
        enc.extend_from_slice(b"0\r\n\r\n");
        let mut d = ChunkedDecoder::new(limit);
        let mut out = Vec::new();
        let mut fed = Vec::new();
        let mut result = Ok(());
        for p in enc.chunks(piece) {
            fed.extend_from_slice(p);
            match d.decode(&fed, &mut out) {
                Ok(n) => { fed.drain(..n); }
                Err(e) => { result = Err(e); break; }
            }
            prop_assert!(out.len() <= limit);
        }
        if body.len() <= limit {
            prop_assert!(result.is_ok());
            prop_assert!(d.is_done());
            prop_assert_eq!(out, body);
        } else {
            prop_assert_eq!(result, Err(rendezvous::request::error::Error::BodyTooLarge));
        }
    }

    /// The decoder's answer to any byte string (valid chunked bodies and
    /// mutated ones) is the same at every split point: framing never
    /// depends on how a client segments its bytes.
    #[test]
    fn chunked_answer_is_the_same_at_every_split(
        body in proptest::collection::vec(any::<u8>(), 0..40),
        ext in "(;[a-z]{1,4}(=([a-z]{1,3}|\"[ a-z]{0,3}\"))?){0,2}",
        mutate in proptest::option::of((0usize..200, any::<u8>())),
        limit in 0usize..60,
    ) {
        let mut enc = format!("{:x}{ext}\r\n", body.len()).into_bytes();
        enc.extend_from_slice(&body);
        enc.extend_from_slice(b"\r\n0\r\nX-T: v\r\n\r\n");
        if let Some((at, b)) = mutate {
            let at = at % enc.len();
            enc[at] = b;
        }
        let run = |pieces: &[&[u8]]| {
            let mut d = ChunkedDecoder::new(limit);
            let mut out = Vec::new();
            let mut fed = Vec::new();
            for p in pieces {
                fed.extend_from_slice(p);
                let n = d.decode(&fed, &mut out)?;
                fed.drain(..n);
            }
            Ok::<_, rendezvous::request::error::Error>((d.is_done(), out))
        };
        let whole = run(&[&enc]);
        for split in 0..=enc.len() {
            let (a, b) = enc.split_at(split);
            prop_assert_eq!(&run(&[a, b]), &whole, "split at {}", split);
        }
        if mutate.is_none() && body.len() <= limit {
            prop_assert_eq!(whole, Ok((true, body)));
        }
    }

    /// Arbitrary bytes never panic the chunked decoder or let it overrun.
    #[test]
    fn chunked_total_on_garbage(raw in proptest::collection::vec(any::<u8>(), 0..400), limit in 0usize..100) {
        let mut d = ChunkedDecoder::new(limit);
        let mut out = Vec::new();
        if let Ok(n) = d.decode(&raw, &mut out) {
            prop_assert!(n <= raw.len());
        }
        prop_assert!(out.len() <= limit);
    }

    /// Percent-encoding any bytes and decoding gives them back; arbitrary
    /// input never panics and an accepted key respects the limit.
    #[test]
    fn key_decoding(bytes in proptest::collection::vec(any::<u8>(), 1..80), raw in "[ -~]{0,120}") {
        let encoded: String = bytes.iter().map(|b| format!("%{b:02x}")).collect();
        prop_assert_eq!(api::decode_key(encoded.as_bytes(), 100).unwrap(), bytes);
        if let Ok(k) = api::decode_key(raw.as_bytes(), 50) {
            prop_assert!(!k.is_empty() && k.len() <= 50);
        }
    }

    /// The XFF walk matches a reference: behind a trusted peer, walking from
    /// the right past empty entries, the first untrusted address; an entry
    /// that is not an address stops the walk at the nearest trusted address
    /// to its right (or the peer); all trusted, the leftmost.
    #[test]
    fn xff_walk_matches_reference(
        peer_trusted in any::<bool>(),
        entries in proptest::collection::vec(
            prop_oneof![
                (any::<u8>(), any::<u8>()).prop_map(|(a, b)| format!("10.0.{a}.{b}")),
                (1u8..224, any::<u8>()).prop_map(|(a, b)| format!("{a}.9.9.{b}")),
                Just("garbage".to_string()),
                Just("2001:db8::7".to_string()),
                Just("".to_string()),
            ],
            0..6,
        ),
    ) {
        let trusted = TrustedProxies::parse(DEFAULT_TRUSTED).unwrap();
        let peer: IpAddr = if peer_trusted { "127.0.0.1".parse().unwrap() } else { "8.8.4.4".parse().unwrap() };
        let xff = entries.join(", ");
        let got = clientip::client_ip(peer, Some(xff.as_bytes()), &trusted);
        let expected = if !peer_trusted {
            peer
        } else {
            let mut nearest_trusted = peer;
            let mut found = None;
            for e in entries.iter().rev().filter(|e| !e.trim().is_empty()) {
                match e.parse::<IpAddr>() {
                    Ok(ip) if !ip.is_unspecified() && !ip.is_multicast() => {
                        if !trusted.contains(ip) {
                            found = Some(ip);
                            break;
                        }
                        nearest_trusted = ip;
                    }
                    _ => break,
                }
            }
            found.unwrap_or(nearest_trusted)
        };
        prop_assert_eq!(got, expected);
    }

    /// Go durations built from parts parse to their sum; arbitrary strings
    /// never panic or hang.
    #[test]
    fn ttl_parsing(h in 0u64..100, m in 0u64..100, s in 0u64..100, ms in 0u64..1000, junk in "\\PC{0,40}") {
        let text = format!("{h}h{m}m{s}s{ms}ms");
        let expect = ((h * 3600 + m * 60 + s) * 1000 + ms) as i64 * 1_000_000;
        prop_assert_eq!(duration::parse_nanos(&text), Ok(expect));
        let _ = duration::parse_nanos(&junk);
        let _ = api::ttl(Some(format!("ttl={junk}").as_bytes()), std::time::Duration::from_secs(60));
    }
}

/// One operation of the shard model test.
#[derive(Debug, Clone)]
enum ModelOp {
    Get(u8),
    Set(u8, u8, Option<u8>, u64),
    Los(u8, u8, Option<u8>, u64),
    Cas(u8, u8, u8, Option<u8>, u64),
    Casoc(u8, u8, u8, Option<u8>, u64),
    Advance(u64),
    Sweep,
}

fn model_op() -> impl Strategy<Value = ModelOp> {
    let key = 0u8..4;
    let val = 0u8..3;
    let secret = proptest::option::of(0u8..2);
    let ttl = 1u64..50;
    prop_oneof![
        key.clone().prop_map(ModelOp::Get),
        (key.clone(), val.clone(), secret.clone(), ttl.clone()).prop_map(|(k, v, s, t)| ModelOp::Set(k, v, s, t)),
        (key.clone(), val.clone(), secret.clone(), ttl.clone()).prop_map(|(k, v, s, t)| ModelOp::Los(k, v, s, t)),
        (key.clone(), val.clone(), val.clone(), secret.clone(), ttl.clone())
            .prop_map(|(k, e, v, s, t)| ModelOp::Cas(k, e, v, s, t)),
        (key, val.clone(), val, secret, ttl).prop_map(|(k, e, v, s, t)| ModelOp::Casoc(k, e, v, s, t)),
        (1u64..30).prop_map(ModelOp::Advance),
        Just(ModelOp::Sweep),
    ]
}

#[derive(Clone, Copy)]
enum ModelCond {
    Set,
    Los,
    Cas(u8),
    Casoc(u8),
}

/// The model does not track versions: compare outcomes without them.
fn unversioned(o: WriteOutcome) -> WriteOutcome {
    match o {
        WriteOutcome::Stored { created, expires_ms, .. } => WriteOutcome::Stored { created, expires_ms, version: 0 },
        WriteOutcome::Existing { value, expires_ms, .. } => WriteOutcome::Existing { value, expires_ms, version: 0 },
        WriteOutcome::Conflict { value, expires_ms, .. } => WriteOutcome::Conflict { value, expires_ms, version: 0 },
        other => other,
    }
}

/// The reference: a map of key -> (value, secret, expiry), with the API's
/// rules written as plainly as possible. Like the server, it holds an
/// expired key (and counts it against the capacity) until the key is touched
/// or swept; the server's sweep is just lazier than `sweep_all`.
#[derive(Default)]
struct Model {
    map: HashMap<u8, (u8, Option<u8>, u64)>,
    max_keys: usize,
}

impl Model {
    fn touch(&mut self, k: u8, now: u64) {
        if self.map.get(&k).is_some_and(|e| e.2 <= now) {
            self.map.remove(&k);
        }
    }

    fn sweep_all(&mut self, now: u64) {
        self.map.retain(|_, e| e.2 > now);
    }

    fn write(&mut self, k: u8, v: u8, s: Option<u8>, exp: u64, cond: ModelCond, now: u64) -> WriteOutcome {
        self.touch(k, now);
        let stored = WriteOutcome::Stored { created: !self.map.contains_key(&k), expires_ms: exp, version: 0 };
        match self.map.get(&k).copied() {
            None => {
                if let ModelCond::Cas(_) = cond {
                    return WriteOutcome::NotFound;
                }
                // Full: the server first reclaims expired keys (a bounded
                // slice of its shard; in these small models, all of them).
                if self.map.len() >= self.max_keys {
                    self.sweep_all(now);
                }
                if self.map.len() >= self.max_keys {
                    return WriteOutcome::Full;
                }
                self.map.insert(k, (v, s, exp));
                stored
            }
            Some((cur, cur_s, cur_exp)) => {
                if let ModelCond::Los = cond {
                    return WriteOutcome::Existing { value: vec![cur].into(), expires_ms: cur_exp, version: 0 };
                }
                if cur_s.is_some() && cur_s != s {
                    return WriteOutcome::Forbidden;
                }
                if let ModelCond::Cas(expected) | ModelCond::Casoc(expected) = cond {
                    if cur != expected {
                        return WriteOutcome::Conflict { value: vec![cur].into(), expires_ms: cur_exp, version: 0 };
                    }
                }
                self.map.insert(k, (v, s.or(cur_s), exp));
                stored
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1000))]

    #[test]
    fn shard_matches_reference_model(ops in proptest::collection::vec(model_op(), 1..120), max_keys in 1usize..5) {
        let budget = KeyBudget::new(max_keys);
        let mut shard = Shard::with_capacity(4);
        let mut journal = Journal::enabled();
        let mut model = Model { max_keys, ..Default::default() };
        let secret = |s: Option<u8>| s.map(|b| [b; 32]);
        let mut now = 1_000u64;
        for op in ops {
            match op {
                ModelOp::Get(k) => {
                    model.touch(k, now);
                    let got = shard.get(&[k], now, &budget).map(|f| (f.value.to_vec(), f.expires_ms));
                    let want = model.map.get(&k).map(|e| (vec![e.0], e.2));
                    prop_assert_eq!(got, want);
                }
                ModelOp::Set(k, v, s, t) | ModelOp::Los(k, v, s, t) => {
                    let los = matches!(op, ModelOp::Los(..));
                    let cond = if los { Condition::Los } else { Condition::Set };
                    let got = unversioned(shard.write(Write::new(&[k], &[v], secret(s), now + t, cond).unwrap(), now, &budget, &mut journal));
                    let want = model.write(k, v, s, now + t, if los { ModelCond::Los } else { ModelCond::Set }, now);
                    prop_assert_eq!(got, want);
                }
                ModelOp::Cas(k, e, v, s, t) | ModelOp::Casoc(k, e, v, s, t) => {
                    let casoc = matches!(op, ModelOp::Casoc(..));
                    let cond = if casoc { Condition::Casoc(vec![e].into()) } else { Condition::Cas(vec![e].into()) };
                    let got = unversioned(shard.write(Write::new(&[k], &[v], secret(s), now + t, cond).unwrap(), now, &budget, &mut journal));
                    let want = model.write(k, v, s, now + t, if casoc { ModelCond::Casoc(e) } else { ModelCond::Cas(e) }, now);
                    prop_assert_eq!(got, want);
                }
                ModelOp::Advance(d) => now += d,
                ModelOp::Sweep => {
                    // A budget over the shard size examines every entry.
                    shard.sweep(now, 64, &budget);
                    model.sweep_all(now);
                }
            }
            // The key budget counts exactly the entries the shard still holds.
            prop_assert_eq!(budget.live(), shard.len());
            prop_assert!(shard.len() <= max_keys);
        }
    }
}
