//! The API over real sockets: every route, rule and status (README "API").

mod common;
use common::*;

#[test]
fn set_then_get_with_headers() {
    let s = Server::start(&[]);
    let r = s.post("/set/greeting?ttl=1m", b"hello");
    assert_eq!((r.status, r.text().as_str()), (200, "OK"));
    let exp = r.expires_at();
    let now = now_secs();
    assert!((now + 58..=now + 61).contains(&exp), "{exp} vs {now}");
    assert_eq!(r.header("X-Client-Ip").as_deref(), Some("127.0.0.1"));

    let g = s.get("/get/greeting");
    assert_eq!((g.status, g.body.as_slice()), (200, &b"hello"[..]));
    assert_eq!(g.header("Content-Type").as_deref(), Some("application/octet-stream"));
    assert_eq!(g.expires_at(), exp);

    let miss = s.get("/get/nope");
    assert_eq!((miss.status, miss.text().as_str()), (404, "Key not found"));
    assert_eq!(miss.header("X-Client-Ip").as_deref(), Some("127.0.0.1"));
}

#[test]
fn keys_and_values_are_bytes() {
    let s = Server::start(&[]);
    let key = b"k\x00\xff/\r\n ?#%";
    let value: Vec<u8> = (0..=255u8).collect();
    assert_eq!(s.post(&format!("/set/{}", pct(key)), &value).status, 200);
    let g = s.get(&format!("/get/{}", pct(key)));
    assert_eq!(g.body, value);
}

#[test]
fn percent_decoding_happens_once() {
    let s = Server::start(&[]);
    assert_eq!(s.post("/set/a%2Fb", b"1").status, 200);
    assert_eq!(s.get("/get/a/b").body, b"1");
    // %252F is the key "%2F", not "/".
    assert_eq!(s.post("/set/x%252Fy", b"2").status, 200);
    assert_eq!(s.get("/get/x%252Fy").body, b"2");
    assert_eq!(s.get("/get/x/y").status, 404);
    for bad in ["/get/a%zz", "/get/a%2", "/get/%"] {
        let r = s.get(bad);
        assert_eq!((r.status, r.text().as_str()), (400, "Invalid percent-encoding"), "{bad}");
    }
}

#[test]
fn ttl_default_cap_and_errors() {
    let s = Server::start(&["-expireDuration", "1h"]);
    let now = now_secs();
    let r = s.post("/set/k", b"v");
    assert!((now + 3598..=now + 3601).contains(&r.expires_at()), "default is the maximum");
    let r = s.post("/set/k?ttl=100h", b"v");
    assert!((now + 3598..=now + 3601).contains(&r.expires_at()), "capped to the maximum");
    let r = s.post("/set/k?ttl=1h30m", b"v");
    assert!(r.expires_at() <= now + 3601);
    let r = s.post("/set/k?ttl=1.5m", b"v");
    assert!((now + 88..=now + 91).contains(&r.expires_at()));
    assert_eq!(s.post("/set/k?ttl", b"v").status, 400, "a ttl without a value");
    for bad in ["0", "0s", "-5s", "abc", "5", "", "1x"] {
        let r = s.post(&format!("/set/k?ttl={bad}"), b"v");
        assert_eq!(r.status, 400, "ttl={bad}");
        assert!(r.text().starts_with("Invalid ttl"), "{}", r.text());
    }
    // A failed write changed nothing.
    assert!((now + 88..=now + 91).contains(&s.get("/get/k").expires_at()));
}

#[test]
fn expiry_is_checked_on_read_and_reads_do_not_extend() {
    let s = Server::start(&[]);
    let r = s.post("/set/short?ttl=400ms", b"v");
    assert_eq!(r.status, 200);
    let first = s.get("/get/short");
    assert_eq!(first.status, 200);
    let again = s.get("/get/short");
    assert_eq!(again.expires_at(), first.expires_at());
    std::thread::sleep(std::time::Duration::from_millis(600));
    assert_eq!(s.get("/get/short").status, 404);
    // Expired keys are gone for every route: los creates again.
    std::thread::sleep(std::time::Duration::from_millis(10));
    let r = s.post("/set/short2?ttl=100ms", b"old");
    assert_eq!(r.status, 200);
    std::thread::sleep(std::time::Duration::from_millis(300));
    let l = s.post("/los/short2", b"new");
    assert_eq!((l.status, l.header("X-Created").as_deref()), (200, Some("true")));
}

#[test]
fn expired_keys_are_reclaimed_in_the_background() {
    let s = Server::start(&["-maxNumKV", "50", "-maxKeysPerIP", "0", "-maxKeysPerNet", "0", "-threads", "2"]);
    for i in 0..50 {
        assert_eq!(s.post(&format!("/set/t{i}?ttl=1500ms"), b"v").status, 200);
    }
    assert_eq!(s.post("/set/one-more", b"v").status, 507);
    // Nobody reads the expired keys; only the background sweep can free them.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        std::thread::sleep(std::time::Duration::from_millis(100));
        let r = s.post("/set/one-more", b"v");
        if r.status == 200 {
            break;
        }
        assert_eq!(r.status, 507);
        assert!(std::time::Instant::now() < deadline, "expired keys were never reclaimed");
    }
    // All 50 slots come back once every short-lived key has expired.
    for i in 0..49 {
        loop {
            let r = s.post(&format!("/set/n{i}"), b"v");
            if r.status == 200 {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "n{i}: slot never reclaimed");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
    assert_eq!(s.post("/set/overflow", b"v").status, 507);
}

#[test]
fn los_semantics() {
    let s = Server::start(&[]);
    let a = s.post("/los/leader", b"alice");
    assert_eq!((a.status, a.text().as_str(), a.header("X-Created").as_deref()), (200, "OK", Some("true")));
    let b = s.post("/los/leader", b"bob");
    assert_eq!((b.status, b.text().as_str(), b.header("X-Created").as_deref()), (200, "alice", Some("false")));
    assert_eq!(b.expires_at(), a.expires_at());
    // The stored value happens to be "OK": X-Created tells the difference.
    s.post("/los/ok", b"OK");
    let c = s.post("/los/ok", b"x");
    assert_eq!((c.text().as_str(), c.header("X-Created").as_deref()), ("OK", Some("false")));
    assert_eq!(s.get("/get/leader").body, b"alice");
}

#[test]
fn cas_semantics() {
    let s = Server::start(&[]);
    let r = s.req("POST", "/cas/c", &[("X-Expected-Value", "0")], b"1");
    assert_eq!((r.status, r.text().as_str()), (404, "Key not found"));
    s.post("/set/c", b"1");
    let r = s.req("POST", "/cas/c", &[("X-Expected-Value", "0")], b"2");
    assert_eq!((r.status, r.text().as_str()), (409, "1"));
    let r = s.req("POST", "/cas/c", &[("X-Expected-Value", "1")], b"2");
    assert_eq!((r.status, r.text().as_str()), (200, "OK"));
    assert!(r.header("X-Expires-At").is_some());
    assert_eq!(s.get("/get/c").body, b"2");
    let r = s.post("/cas/c", b"3");
    assert_eq!((r.status, r.text().as_str()), (400, "Missing X-Expected-Value header"));
    // An empty expected value is a real comparison with "".
    let r = s.req("POST", "/cas/c", &[("X-Expected-Value", "")], b"3");
    assert_eq!(r.status, 409);
}

#[test]
fn casoc_semantics() {
    let s = Server::start(&[]);
    let r = s.req("POST", "/casoc/x", &[("X-Expected-Value", "whatever")], b"1");
    assert_eq!((r.status, r.text().as_str(), r.header("X-Created").as_deref()), (200, "OK", Some("true")));
    let r = s.req("POST", "/casoc/x", &[("X-Expected-Value", "0")], b"2");
    assert_eq!((r.status, r.text().as_str(), r.header("X-Created").as_deref()), (409, "1", Some("false")));
    let r = s.req("POST", "/casoc/x", &[("X-Expected-Value", "1")], b"2");
    assert_eq!((r.status, r.header("X-Created").as_deref()), (200, Some("false")));
    assert_eq!(s.post("/casoc/x", b"3").status, 400);
    assert_eq!(s.get("/get/x").body, b"2");
}

#[test]
fn owner_secrets() {
    let s = Server::start(&[]);
    let sec = [("X-Owner-Secret", "hunter2")];
    let wrong = [("X-Owner-Secret", "hunter3")];
    assert_eq!(s.req("POST", "/set/owned", &sec, b"v1").status, 200);
    let r = s.post("/set/owned", b"evil");
    assert_eq!((r.status, r.text().as_str()), (403, "Wrong owner secret"));
    assert_eq!(s.req("POST", "/set/owned", &wrong, b"evil").status, 403);
    let r = s.req("POST", "/cas/owned", &[("X-Expected-Value", "v1")], b"evil");
    assert_eq!(r.status, 403);
    let r = s.req("POST", "/casoc/owned", &[("X-Expected-Value", "v1"), wrong[0]], b"evil");
    assert_eq!(r.status, 403);
    // Reads stay public, and los on a present key is a read.
    assert_eq!(s.get("/get/owned").body, b"v1");
    assert_eq!(s.post("/los/owned", b"x").body, b"v1");
    // The owner can write.
    assert_eq!(s.req("POST", "/set/owned", &sec, b"v2").status, 200);
    assert_eq!(s.req("POST", "/cas/owned", &[("X-Expected-Value", "v2"), sec[0]], b"v3").status, 200);
    assert_eq!(s.get("/get/owned").body, b"v3");

    // A key without a secret is claimed by the first write that brings one.
    s.post("/set/free", b"a");
    assert_eq!(s.req("POST", "/set/free", &sec, b"b").status, 200);
    assert_eq!(s.post("/set/free", b"c").status, 403);
}

#[test]
fn value_plus_secret_limit() {
    let s = Server::start(&["-maxValueSize", "20"]);
    assert_eq!(s.post("/set/k", &[b'x'; 20]).status, 200);
    let r = s.req("POST", "/set/k", &[("X-Owner-Secret", "12345")], &[b'x'; 16]);
    assert_eq!((r.status, r.text().as_str()), (400, "Value too large"));
    assert_eq!(s.req("POST", "/set/k", &[("X-Owner-Secret", "12345")], &[b'x'; 15]).status, 200);
}

#[test]
fn ip_keys_use_the_client_address() {
    let s = Server::start(&[]);
    let r = s.req("POST", "/set/ip/svc1", &[("X-Forwarded-For", "20.18.12.10")], b"4000");
    assert_eq!((r.status, r.text().as_str()), (200, "20.18.12.10"));
    assert_eq!(r.header("X-Client-Ip").as_deref(), Some("20.18.12.10"));
    assert_eq!(s.get("/get/ip/20.18.12.10/svc1").body, b"4000");
    assert_eq!(s.get("/get/ip/svc1").status, 404);
    // Without a proxy header: the TCP peer.
    let r = s.post("/set/ip/svc2", b"x");
    assert_eq!(r.text(), "127.0.0.1");
    assert_eq!(s.get("/get/ip/127.0.0.1/svc2").body, b"x");
    // IPv6 clients get the canonical text.
    let r = s.req("POST", "/los/ip/a/b", &[("X-Forwarded-For", "2001:0db8:0000::0001")], b"v6");
    assert_eq!((r.text().as_str(), r.header("X-Created").as_deref()), ("2001:db8::1", Some("true")));
    assert_eq!(s.get("/get/ip/2001:db8::1/a/b").body, b"v6");
    // Another client cannot write under someone else's prefix.
    s.req("POST", "/set/ip/20.18.12.10/svc1", &[("X-Forwarded-For", "6.6.6.6")], b"evil");
    assert_eq!(s.get("/get/ip/20.18.12.10/svc1").body, b"4000");
    assert_eq!(s.get("/get/ip/6.6.6.6/20.18.12.10/svc1").body, b"evil");
}

#[test]
fn ipv6_listener_and_peer() {
    // Skip quietly only if the machine has no IPv6 loopback at all.
    if std::net::TcpListener::bind("[::1]:0").is_err() {
        eprintln!("no IPv6 loopback; skipping");
        return;
    }
    let s = Server::start(&["-l", "::1"]);
    assert!(s.addr.is_ipv6());
    let r = s.post("/set/ip/svc", b"v");
    assert_eq!((r.status, r.text().as_str()), (200, "::1"));
    assert_eq!(s.get("/get/ip/::1/svc").body, b"v");
}

#[test]
fn forwarded_for_is_walked_from_the_right() {
    let s = Server::start(&[]);
    // The client sent a spoofed entry; the proxy appended the real address.
    let r = s.req("GET", "/get/x", &[("X-Forwarded-For", "6.6.6.6, 20.18.12.10")], b"");
    assert_eq!(r.header("X-Client-Ip").as_deref(), Some("20.18.12.10"));
    let r = s.req("GET", "/get/x", &[("X-Forwarded-For", "6.6.6.6, 20.18.12.10, 10.0.0.2")], b"");
    assert_eq!(r.header("X-Client-Ip").as_deref(), Some("20.18.12.10"));
    // What the proxy wrote is not an address ("unknown"): the entry to its
    // left is the client's own claim, so the proxy is the client.
    let r = s.req("GET", "/get/x", &[("X-Forwarded-For", "20.18.12.10, unknown")], b"");
    assert_eq!(r.header("X-Client-Ip").as_deref(), Some("127.0.0.1"));
    let r = s.req("GET", "/get/x", &[("X-Forwarded-For", "garbage, 20.18.12.10")], b"");
    assert_eq!(r.header("X-Client-Ip").as_deref(), Some("20.18.12.10"));
    let r = s.req("GET", "/get/x", &[("X-Forwarded-For", "not-an-ip")], b"");
    assert_eq!(r.header("X-Client-Ip").as_deref(), Some("127.0.0.1"));

    // A peer outside the trusted list cannot use XFF at all.
    let s = Server::start(&["-trustedProxies", ""]);
    let r = s.req("GET", "/get/x", &[("X-Forwarded-For", "20.18.12.10")], b"");
    assert_eq!(r.header("X-Client-Ip").as_deref(), Some("127.0.0.1"));
    let r = s.req("POST", "/set/ip/k", &[("X-Forwarded-For", "20.18.12.10")], b"v");
    assert_eq!(r.text(), "127.0.0.1");
}

#[test]
fn key_limits() {
    let s = Server::start(&["-maxKeySize", "10"]);
    assert_eq!(s.post("/set/0123456789", b"v").status, 200);
    let r = s.post("/set/0123456789a", b"v");
    assert_eq!((r.status, r.text().as_str()), (400, "Key too long"));
    assert_eq!(s.get("/get/0123456789a").status, 400);
    let r = s.post("/set/", b"v");
    assert_eq!((r.status, r.text().as_str()), (400, "Empty key"));
    assert_eq!(s.get("/get/").status, 400);
    // The limit applies before ip/ expansion.
    assert_eq!(s.req("POST", "/set/ip/abcdefg", &[("X-Forwarded-For", "200.200.200.200")], b"v").status, 200);
}

#[test]
fn value_limit_statuses() {
    let s = Server::start(&["-maxValueSize", "1000"]);
    assert_eq!(s.post("/set/k", &[b'v'; 1000]).status, 200);
    // A little over: 400, and the connection stays usable.
    let mut c = s.client();
    let r = c.req("POST", "/set/k", &[], &[b'v'; 1001]);
    assert_eq!((r.status, r.text().as_str()), (400, "Value too large"));
    assert_eq!(c.req("GET", "/get/k", &[], b"").body.len(), 1000);
    // Far over: 413 before the body is read, and the connection closes.
    let mut c = s.client();
    c.send_raw(b"POST /set/k HTTP/1.1\r\nContent-Length: 10000000\r\n\r\n");
    let r = c.read_response(false).unwrap();
    assert_eq!(r.status, 413);
    assert_eq!(r.header("Connection").as_deref(), Some("close"));
    assert!(c.is_closed());
    assert_eq!(s.get("/get/k").body.len(), 1000);
}

#[test]
fn store_capacity_is_exact_across_cores() {
    let s = Server::start(&["-maxNumKV", "25", "-maxKeysPerIP", "0", "-maxKeysPerNet", "0", "-threads", "4"]);
    for i in 0..25 {
        assert_eq!(s.post(&format!("/set/k{i}"), b"v").status, 200, "k{i}");
    }
    for route in ["set", "los"] {
        let r = s.post(&format!("/{route}/new"), b"v");
        assert_eq!((r.status, r.text().as_str()), (507, "Store full"), "{route}");
    }
    let r = s.req("POST", "/casoc/new", &[("X-Expected-Value", "")], b"v");
    assert_eq!(r.status, 507);
    // Updates still work.
    for i in 0..25 {
        assert_eq!(s.post(&format!("/set/k{i}"), b"w").status, 200);
    }
    assert_eq!(s.req("POST", "/cas/k3", &[("X-Expected-Value", "w")], b"x").status, 200);
}

#[test]
fn docs_page_uses_host_and_real_limits() {
    let s = Server::start(&["-maxValueSize", "4096", "-maxRequests", "99", "-expireDuration", "45m"]);
    let r = s.req("GET", "/", &[], b"");
    assert_eq!(r.status, 200);
    assert!(r.header("Content-Type").unwrap().starts_with("text/html"));
    let page = r.text();
    assert!(page.contains("http://test.local/get/"), "request host in examples");
    assert!(page.contains("4096 bytes"));
    assert!(page.contains("99 tokens"));
    assert!(page.contains("45m"));
    // HEAD answers the same headers without the body.
    let mut c = s.client();
    let h = c.req("HEAD", "/", &[], b"");
    assert_eq!(h.status, 200);
    assert!(h.body.is_empty());
    assert_eq!(h.header("Content-Length"), r.header("Content-Length"));
    assert_eq!(c.req("GET", "/get/x", &[], b"").status, 404, "connection still in sync after HEAD");
}

#[test]
fn unknown_routes_and_wrong_methods() {
    let s = Server::start(&[]);
    for path in ["/nope", "/get", "/favicon.ico/x", "/SET/x"] {
        let r = s.get(path);
        assert_eq!(r.status, 404, "{path}");
        assert!(r.header("X-Client-Ip").is_some());
    }
    // Browsers ask for a favicon: a quiet 204, not a 404 in their console.
    let r = s.get("/favicon.ico");
    assert_eq!((r.status, r.body.len()), (204, 0));
    let r = s.post("/get/x", b"");
    assert_eq!((r.status, r.header("Allow").as_deref()), (405, Some("GET, HEAD, OPTIONS")));
    for route in ["set", "los", "cas", "casoc"] {
        let r = s.get(&format!("/{route}/x"));
        assert_eq!((r.status, r.header("Allow").as_deref()), (405, Some("POST, OPTIONS")), "{route}");
    }
    assert_eq!(s.req("DELETE", "/set/x", &[], b"").status, 405);
    // CORS preflights are for API routes only.
    assert_eq!(s.req("OPTIONS", "/nope", &[], b"").status, 404);
    assert_eq!(s.req("OPTIONS", "/get/x", &[], b"").status, 204);
    assert_eq!(s.req("POST", "/", &[], b"").status, 405);
}
