//! Key quotas per client and per network over real sockets: the attack of
//! many /64s inside one /48 (and many addresses inside one IPv4 /24) holds
//! no more than its quota and leaves room for everyone else; slots come
//! back on delete and expiry; counts are exact under concurrency and
//! survive a kill -9. Client addresses arrive through `X-Forwarded-For`
//! from the trusted loopback peer, as behind a proxy.

mod common;
use common::*;
use std::sync::{Arc, Barrier};
use std::time::Duration;

/// Sends `writes` creates from each address, from 8 threads at once;
/// returns how many were stored and the refusals' statuses and bodies.
fn flood(s: &Server, addrs: &[String], writes: usize, tag: &str) -> (usize, Vec<(u16, String)>) {
    let barrier = Arc::new(Barrier::new(8));
    let chunks: Vec<Vec<String>> = addrs.chunks(addrs.len().div_ceil(8)).map(|c| c.to_vec()).collect();
    let handles: Vec<_> = chunks
        .into_iter()
        .map(|chunk| {
            let (addr, barrier, tag) = (s.addr, barrier.clone(), tag.to_string());
            std::thread::spawn(move || {
                let mut c = Client::connect(addr);
                barrier.wait();
                let mut stored = 0;
                let mut refused = Vec::new();
                for ip in &chunk {
                    for w in 0..writes {
                        let r = c.req("POST", &format!("/set/{tag}/{ip}/{w}"), &from(ip), b"peer");
                        match r.status {
                            200 => stored += 1,
                            _ => refused.push((r.status, r.text())),
                        }
                    }
                }
                (stored, refused)
            })
        })
        .collect();
    let mut stored = 0;
    let mut refused = Vec::new();
    for h in handles {
        let (s, r) = h.join().unwrap();
        stored += s;
        refused.extend(r);
    }
    (stored, refused)
}

/// The attack at the shipped defaults: -maxNumKV 100000, so 500
/// keys per address (0.5%) and 1000 per network (1%).
#[test]
fn one_network_cannot_fill_the_store() {
    let s = Server::start(&["-threads", "2", "-dataDir", ""]);
    // 2000 /64s of one /48, five creates each.
    let v6: Vec<String> = (0..2000).map(|i| format!("2001:db8:77:{i:x}::1")).collect();
    let (stored, refused) = flood(&s, &v6, 5, "v6");
    assert_eq!(stored, 1000, "the /48 holds exactly its quota");
    assert_eq!(refused.len(), 9000);
    assert!(refused.iter().all(|(st, body)| *st == 429 && body.contains("-maxKeysPerNet")), "{:?}", refused[0]);
    // Every address of one IPv4 /24, ten creates each.
    let v4: Vec<String> = (0..256).map(|i| format!("198.51.100.{i}")).collect();
    let (stored, refused) = flood(&s, &v4, 10, "v4");
    assert_eq!(stored, 1000, "the /24 holds exactly its quota");
    assert!(refused.iter().all(|(st, _)| *st == 429));

    // Everyone else still has room: a fresh /48 and a fresh /24 create keys.
    for ip in ["2001:db8:78::1", "203.0.113.9"] {
        let r = s.req("POST", "/set/fresh", &from(ip), b"v");
        let r2 = s.req("POST", &format!("/set/fresh/{ip}"), &from(ip), b"v");
        assert_eq!((r.status, r2.status), (200, 200), "{ip}");
    }
    assert_eq!(s.metric("rendezvous_keys"), Some(2003.0));

    // The refusal says which quota and when to come back (the oldest key's
    // expiry, about the default 2h TTL from now).
    let r = s.req("POST", "/set/more", &from("2001:db8:77:ffff::1"), b"v");
    assert_eq!(r.status, 429);
    let retry: u64 = r.header("Retry-After").unwrap().parse().unwrap();
    assert!((7000..=7201).contains(&retry), "Retry-After {retry}");
    // The attacker's existing keys can still be updated and read.
    let r = s.req("POST", "/set/v6/2001:db8:77:0::1/0", &from("2001:db8:77:0::1"), b"updated");
    assert_eq!(r.status, 200);
    assert_eq!(s.get("/get/v6/2001:db8:77:0::1/0").text(), "updated");
    // los on a present key is a read: still answered.
    assert_eq!(s.req("POST", "/los/v6/2001:db8:77:0::1/0", &from("2001:db8:77:0::1"), b"x").text(), "updated");

    let scrape = s.scrape();
    let sample = |series: &str| metric_in(&scrape, series);
    assert_eq!(sample("rendezvous_creates_refused_total{reason=\"net_quota\"}"), Some(9000.0 + 1560.0 + 1.0));
    assert_eq!(sample("rendezvous_quota_at_limit{scope=\"net\"}"), Some(2.0));
    assert_eq!(sample("rendezvous_quota_max{scope=\"ip\"}"), Some(500.0));
    assert_eq!(sample("rendezvous_quota_max{scope=\"net\"}"), Some(1000.0));
}

#[test]
fn one_address_holds_its_own_quota() {
    let s = Server::start(&["-maxKeysPerIP", "3", "-maxKeysPerNet", "5", "-threads", "2", "-dataDir", ""]);
    for i in 0..3 {
        assert_eq!(s.req("POST", &format!("/set/a{i}"), &from("192.0.2.1"), b"v").status, 200);
    }
    let r = s.req("POST", "/set/a3", &from("192.0.2.1"), b"v");
    assert_eq!(r.status, 429);
    assert!(r.text().contains("-maxKeysPerIP"), "{}", r.text());
    // A neighbour in the /24 takes the network's last two slots.
    assert_eq!(s.req("POST", "/set/b0", &from("192.0.2.2"), b"v").status, 200);
    assert_eq!(s.req("POST", "/set/b1", &from("192.0.2.2"), b"v").status, 200);
    let r = s.req("POST", "/set/b2", &from("192.0.2.2"), b"v");
    assert!(r.status == 429 && r.text().contains("-maxKeysPerNet"), "{}", r.text());
    // IPv6 clients are counted per /64.
    for i in 0..3 {
        let ip = format!("2001:db8:5:1::{i}");
        assert_eq!(s.req("POST", &format!("/set/c{i}"), &from(&ip), b"v").status, 200);
    }
    assert_eq!(s.req("POST", "/set/c3", &from("2001:db8:5:1::99"), b"v").status, 429);
    assert_eq!(s.req("POST", "/set/c3", &from("2001:db8:5:2::1"), b"v").status, 200);
    // ip/ keys count like any other.
    assert_eq!(s.req("POST", "/set/ip/x", &from("2001:db8:5:2::1"), b"v").status, 200);
}

#[test]
fn deletes_and_expiry_give_slots_back() {
    let s = Server::start(&["-maxKeysPerIP", "2", "-threads", "2", "-dataDir", ""]);
    let me = from("203.0.113.50");
    assert_eq!(s.req("POST", "/set/short?ttl=2s", &me, b"v").status, 200);
    assert_eq!(s.req("POST", "/set/long", &me, b"v").status, 200);
    let r = s.req("POST", "/set/third", &me, b"v");
    assert_eq!(r.status, 429);
    let retry: u64 = r.header("Retry-After").unwrap().parse().unwrap();
    assert!((1..=3).contains(&retry), "the oldest key expires within 2s: {retry}");
    // A delete gives its slot back at once.
    assert_eq!(s.req("DELETE", "/del/long", &me, b"").status, 200);
    assert_eq!(s.req("POST", "/set/third", &me, b"v").status, 200);
    assert_eq!(s.req("POST", "/set/fourth", &me, b"v").status, 429);
    // Refreshing an existing key at the quota works, and moves its expiry.
    assert_eq!(s.req("POST", "/set/third?ttl=1h", &me, b"w").status, 200);
    // Expiry gives it back when Retry-After says, swept or not.
    let r = s.req("POST", "/set/fourth", &me, b"v");
    let retry: u64 = r.header("Retry-After").unwrap().parse().unwrap();
    std::thread::sleep(Duration::from_secs(retry));
    assert_eq!(s.req("POST", "/set/fourth", &me, b"v").status, 200);
    assert_eq!(s.get("/get/short").status, 404);
}

/// A key counts against the client that stored it last, so nobody can
/// keep a key on someone else's quota by refreshing or claiming it.
#[test]
fn a_key_counts_against_whoever_stored_it_last() {
    let s = Server::start(&["-maxKeysPerIP", "1", "-threads", "2", "-dataDir", ""]);
    let (victim, other) = (from("192.0.2.10"), from("198.51.100.10"));
    assert_eq!(s.req("POST", "/set/shared", &victim, b"a").status, 200);
    assert_eq!(s.req("POST", "/set/mine", &victim, b"v").status, 429);
    // Someone else claims it with a secret and keeps it alive: it is theirs
    // now, on their quota, and the victim has room again.
    let claim = [("X-Forwarded-For", "198.51.100.10"), ("X-Owner-Secret", "s3cret")];
    assert_eq!(s.req("POST", "/set/shared?ttl=1h", &claim, b"b").status, 200);
    assert_eq!(s.req("POST", "/set/mine", &victim, b"v").status, 200);
    assert_eq!(s.req("POST", "/set/theirs", &other, b"v").status, 429, "the claimer's quota holds it");
    // Taking over a key while at one's quota is refused and changes nothing.
    let r = s.req("POST", "/set/mine", &other, b"stolen");
    assert_eq!(r.status, 429);
    assert!(r.text().contains("-maxKeysPerIP"));
    assert_eq!(s.get("/get/mine").text(), "v");
    // cas/casoc/los creates count too.
    assert_eq!(s.req("POST", "/los/other", &victim, b"v").status, 429);
    let casoc = [("X-Forwarded-For", "192.0.2.10"), ("X-Expected-Value", "")];
    assert_eq!(s.req("POST", "/casoc/other", &casoc, b"v").status, 429);
}

/// After a restart with a lower quota, a network over it keeps what it
/// holds only until it expires: its owners cannot refresh it alive.
#[test]
fn a_network_over_a_lowered_quota_drains_as_its_keys_expire() {
    let s = Server::start(&["-maxKeysPerIP", "0", "-maxKeysPerNet", "5", "-threads", "2"]);
    let me = from("192.0.2.7");
    for i in 0..5 {
        assert_eq!(s.req("POST", &format!("/set/k{i}?ttl=10m"), &me, b"v").status, 200);
    }
    let (dir, _) = s.stop_keep_dir("-KILL");
    let s = Server::start_in(dir, &["-maxKeysPerIP", "0", "-maxKeysPerNet", "2", "-threads", "2"]);
    assert_eq!(s.get("/get/k4").status, 200, "kept over the lower quota");
    // The saturation alert's gauge counts all five keys, not two per network.
    assert_eq!(s.metric("rendezvous_quota_at_limit{scope=\"net\"}"), Some(1.0));
    assert_eq!(s.metric("rendezvous_quota_keys_at_limit{scope=\"net\"}"), Some(5.0));
    let r = s.req("POST", "/set/k0?ttl=1h", &me, b"again");
    assert!(r.status == 429 && r.text().contains("-maxKeysPerNet"), "{}", r.text());
    // Three of the five must expire first: all of them in about 10 minutes.
    let retry: u64 = r.header("Retry-After").unwrap().parse().unwrap();
    assert!((590..=601).contains(&retry), "{retry}");
    // Nor can a neighbour keep it alive for them.
    let r = s.req("POST", "/set/k0?ttl=1h", &from("192.0.2.8"), b"again");
    assert!(r.status == 429 && r.text().contains("-maxKeysPerNet"), "{}", r.text());
    assert_eq!(s.get("/get/k0").text(), "v", "the refused refreshes changed nothing");
    // Back within the quota, owners refresh again.
    for i in 2..5 {
        assert_eq!(s.req("DELETE", &format!("/del/k{i}"), &me, b"").status, 200);
    }
    assert_eq!(s.req("POST", "/set/k0?ttl=1h", &me, b"again").status, 200);
    assert_eq!(s.get("/get/k0").text(), "again");
    assert_eq!(s.metric("rendezvous_quota_keys_at_limit{scope=\"net\"}"), Some(2.0));
}

/// Peers of one full network writing each other's keys: the network holds
/// as many keys after as before, so only the writer's own quota can refuse.
#[test]
fn neighbours_in_a_full_network_can_write_each_other_s_keys() {
    let s = Server::start(&["-maxKeysPerIP", "2", "-maxKeysPerNet", "3", "-threads", "2", "-dataDir", ""]);
    let (a, b) = (from("192.0.2.1"), from("192.0.2.2"));
    assert_eq!(s.req("POST", "/set/a0", &a, b"v").status, 200);
    assert_eq!(s.req("POST", "/set/a1", &a, b"v").status, 200);
    assert_eq!(s.req("POST", "/set/b0", &b, b"v").status, 200);
    let r = s.req("POST", "/set/b1", &b, b"v");
    assert!(r.status == 429 && r.text().contains("-maxKeysPerNet"), "{}", r.text());
    // b answers a in a's key: the /24 still holds three keys.
    assert_eq!(s.req("POST", "/set/a0", &b, b"answer").status, 200);
    assert_eq!(s.get("/get/a0").text(), "answer");
    // b is at its own quota now (b0 and a0): a's other key is refused.
    let r = s.req("POST", "/set/a1", &b, b"answer");
    assert!(r.status == 429 && r.text().contains("-maxKeysPerIP"), "{}", r.text());
    // The /24 is still full: the move neither freed a slot nor took one.
    let r = s.req("POST", "/set/a2", &a, b"v");
    assert!(r.status == 429 && r.text().contains("-maxKeysPerNet"), "{}", r.text());
    assert_eq!(s.req("DELETE", "/del/a1", &a, b"").status, 200);
    assert_eq!(s.req("POST", "/set/a2", &a, b"v").status, 200);
}

/// kill -9 after the writes were answered: the restarted server counts the
/// same keys against the same networks (creators travel in the log).
#[test]
fn counts_survive_a_crash() {
    let args = ["-maxKeysPerIP", "0", "-maxKeysPerNet", "20", "-threads", "2"];
    let s = Server::start(&args);
    let addrs: Vec<String> = (0..40).map(|i| format!("2001:db8:99:{i:x}::1")).collect();
    let (stored, _) = flood(&s, &addrs, 2, "crash");
    assert_eq!(stored, 20);
    let (dir, _) = s.stop_keep_dir("-KILL");
    let s = Server::start_in(dir, &args);
    assert_eq!(s.metric("rendezvous_keys"), Some(20.0));
    assert_eq!(s.req("POST", "/set/after", &from("2001:db8:99:ffff::1"), b"v").status, 429);
    assert_eq!(s.metric("rendezvous_quota_at_limit{scope=\"net\"}"), Some(1.0));
    // Deleting one of them (its key names its creator) frees one slot.
    let key = (0..40)
        .flat_map(|i| (0..2).map(move |w| format!("/crash/2001:db8:99:{i:x}::1/{w}")))
        .find(|k| s.get(&format!("/get{k}")).status == 200)
        .unwrap();
    assert_eq!(s.req("DELETE", &format!("/del{key}"), &[], b"").status, 200);
    assert_eq!(s.req("POST", "/set/after", &from("2001:db8:99:ffff::1"), b"v").status, 200);
    assert_eq!(s.req("POST", "/set/after2", &from("2001:db8:99:ffff::1"), b"v").status, 429);
    // And a snapshot carries them too.
    s.signal("-HUP");
    s.wait_log("snapshot", Duration::from_secs(30));
    let (dir, _) = s.stop_keep_dir("-KILL");
    let s = Server::start_in(dir, &args);
    assert_eq!(s.req("POST", "/set/after3", &from("2001:db8:99:1234::1"), b"v").status, 429);
    assert_eq!(s.req("POST", "/set/after3", &from("2001:db8:9a::1"), b"v").status, 200);
}

#[test]
fn quotas_can_be_turned_off_and_are_on_the_docs_page() {
    let s = Server::start(&["-maxNumKV", "50", "-maxKeysPerIP", "0", "-maxKeysPerNet", "0", "-dataDir", ""]);
    for i in 0..50 {
        assert_eq!(s.post(&format!("/set/k{i}"), b"v").status, 200);
    }
    assert_eq!(s.post("/set/one-more", b"v").status, 507);
    let page = s.get("/").text();
    assert!(page.contains("no limit per IP"), "docs page states the quotas");
    let s = Server::start(&["-maxNumKV", "1000", "-dataDir", ""]);
    let page = s.get("/").text();
    assert!(page.contains("5 per IP (IPv6: per /64), 10 per network"), "defaults are 0.5% and 1% of -maxNumKV");
}

/// A restart with a shorter -expireDuration caps the stored keys' expiry;
/// when they expire their network gets its slots back.
#[test]
fn a_shorter_ttl_at_restart_is_counted_as_such() {
    let s = Server::start(&["-maxKeysPerIP", "0", "-maxKeysPerNet", "3", "-expireDuration", "1h"]);
    for i in 0..3 {
        assert_eq!(s.req("POST", &format!("/set/c{i}"), &from("192.0.2.1"), b"v").status, 200);
    }
    assert_eq!(s.req("POST", "/set/c3", &from("192.0.2.2"), b"v").status, 429);
    let (dir, _) = s.stop_keep_dir("-TERM");
    let s = Server::start_in(dir, &["-maxKeysPerIP", "0", "-maxKeysPerNet", "3", "-expireDuration", "2s"]);
    let r = s.req("POST", "/set/c3", &from("192.0.2.2"), b"v");
    assert_eq!(r.status, 429);
    let retry: u64 = r.header("Retry-After").unwrap().parse().unwrap();
    assert!(retry <= 3, "the capped expiry is what counts: Retry-After {retry}");
    std::thread::sleep(Duration::from_secs(retry));
    assert_eq!(s.get("/get/c0").status, 404);
    assert_eq!(s.req("POST", "/set/c3", &from("192.0.2.2"), b"v").status, 200);
}
