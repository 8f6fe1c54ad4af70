//! HTTP/1.1 behaviour over real sockets: keep-alive, pipelining, bodies,
//! HTTP/1.0, limits and deadlines.

mod common;
use common::*;
use std::io::Write;
use std::time::{Duration, Instant};

#[test]
fn keep_alive_serves_many_requests_on_one_connection() {
    let s = Server::start(&[]);
    let mut c = s.client();
    for i in 0..100 {
        assert_eq!(c.req("POST", &format!("/set/k{i}"), &[], b"v").status, 200);
        assert_eq!(c.req("GET", &format!("/get/k{i}"), &[], b"").body, b"v");
    }
}

#[test]
fn pipelined_requests_are_answered_in_order() {
    let s = Server::start(&["-threads", "4"]);
    let mut c = s.client();
    let mut raw = Vec::new();
    for i in 0..200 {
        raw.extend(build("POST", &format!("/set/p{i}"), &[], format!("value-{i}").as_bytes()));
        raw.extend(build("GET", &format!("/get/p{i}"), &[], b""));
    }
    raw.extend(build("GET", "/nope", &[], b""));
    c.send_raw(&raw);
    for i in 0..200 {
        let set = c.read_response(false).unwrap();
        assert_eq!(set.status, 200);
        let get = c.read_response(false).unwrap();
        assert_eq!(get.body, format!("value-{i}").as_bytes(), "response {i} out of order");
    }
    assert_eq!(c.read_response(false).unwrap().status, 404);
}

#[test]
fn connection_close_and_http10() {
    let s = Server::start(&[]);
    let mut c = s.client();
    let r = c.req("GET", "/get/x", &[("Connection", "close")], b"");
    assert_eq!((r.status, r.header("Connection").as_deref()), (404, Some("close")));
    assert!(c.is_closed());

    let mut c = s.client();
    c.send_raw(b"GET /get/x HTTP/1.0\r\n\r\n");
    let r = c.read_response(false).unwrap();
    assert_eq!(r.status, 404);
    assert!(c.is_closed(), "HTTP/1.0 closes by default");

    let mut c = s.client();
    c.send_raw(b"POST /set/h10 HTTP/1.0\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nhi");
    let r = c.read_response(false).unwrap();
    assert_eq!((r.status, r.header("Connection").as_deref()), (200, Some("keep-alive")));
    c.send_raw(b"GET /get/h10 HTTP/1.0\r\n\r\n");
    assert_eq!(c.read_response(false).unwrap().body, b"hi");
    assert!(c.is_closed());
}

#[test]
fn chunked_bodies() {
    let s = Server::start(&["-maxValueSize", "10"]);
    let mut c = s.client();
    c.send_raw(
        b"POST /set/ch HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n4;x=y\r\ndefg\r\n0\r\nT: 1\r\n\r\n",
    );
    assert_eq!(c.read_response(false).unwrap().status, 200);
    assert_eq!(c.req("GET", "/get/ch", &[], b"").body, b"abcdefg");
    // Sent in small pieces.
    let raw = b"POST /set/ch2 HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nxy\r\n0\r\n\r\n";
    for piece in raw.chunks(3) {
        c.stream.write_all(piece).unwrap();
        std::thread::sleep(Duration::from_millis(2));
    }
    assert_eq!(c.read_response(false).unwrap().status, 200);
    assert_eq!(c.req("GET", "/get/ch2", &[], b"").body, b"xy");

    // Over the cap while streaming: 413 and close.
    let mut c = s.client();
    c.send_raw(b"POST /set/big HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n6\r\n123456\r\n6\r\n123456\r\n");
    let r = c.read_response(false).unwrap();
    assert_eq!((r.status, r.header("Connection").as_deref()), (413, Some("close")));
    assert!(c.is_closed());

    let mut c = s.client();
    c.send_raw(b"POST /set/bad HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n");
    assert_eq!(c.read_response(false).unwrap().status, 400);
    assert!(c.is_closed());
    assert_eq!(s.get("/get/big").status, 404);
}

#[test]
fn expect_100_continue() {
    let s = Server::start(&["-maxValueSize", "2000"]);
    let mut c = s.client();
    c.send_raw(b"POST /set/e HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 1500\r\n\r\n");
    let mut interim = [0u8; 25];
    std::io::Read::read_exact(&mut c.stream, &mut interim).unwrap();
    assert_eq!(&interim, b"HTTP/1.1 100 Continue\r\n\r\n");
    c.send_raw(&[b'e'; 1500]);
    assert_eq!(c.read_response(false).unwrap().status, 200);
    // Too large: refused at once, without waiting for the body.
    let mut c = s.client();
    c.send_raw(b"POST /set/e HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 5000\r\n\r\n");
    assert_eq!(c.read_response(false).unwrap().status, 413);
}

#[test]
fn framing_errors_close_the_connection() {
    let s = Server::start(&[]);
    for raw in [
        &b"POST /set/k HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabc"[..],
        b"POST /set/k HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"POST /set/k HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
        b"GET /get/k\r\n\r\n",
        b"GET /get/k HTTP/1.1\r\nBad header\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",
    ] {
        let mut c = s.client();
        c.send_raw(raw);
        let r = c.read_response(false).unwrap();
        assert!(r.status >= 400, "{:?} -> {}", String::from_utf8_lossy(raw), r.status);
        assert_eq!(r.header("Connection").as_deref(), Some("close"));
        assert!(r.header("X-Client-Ip").is_some());
        assert!(c.is_closed());
    }
    assert_eq!(s.get("/get/k").status, 404, "server still fine");
}

#[test]
fn head_over_8k_is_431() {
    let s = Server::start(&[]);
    let mut c = s.client();
    let big = "a".repeat(9000);
    c.send_raw(format!("GET /get/x HTTP/1.1\r\nX-Big: {big}\r\n\r\n").as_bytes());
    let r = c.read_response(false).unwrap();
    assert_eq!(r.status, 431);
    let mut c = s.client();
    let mut raw = String::from("GET /get/x HTTP/1.1\r\n");
    for i in 0..200 {
        raw += &format!("X-{i}: 1\r\n");
    }
    c.send_raw(format!("{raw}\r\n").as_bytes());
    assert_eq!(c.read_response(false).unwrap().status, 431);
    // Just under the limit is fine.
    let ok = "a".repeat(8000);
    assert_eq!(s.req("GET", "/get/x", &[("X-Big", &ok)], b"").status, 404);
}

#[test]
fn slow_request_hits_the_read_deadline() {
    let s = Server::start(&["-readTimeout", "1s", "-idleTimeout", "30s"]);
    let mut c = s.client();
    let t = Instant::now();
    c.send_raw(b"GET /get/x HTTP/1.1\r\nHost: slow");
    let r = c.read_response(false).unwrap();
    let took = t.elapsed();
    assert_eq!(r.status, 408);
    assert!(c.is_closed());
    assert!(took >= Duration::from_millis(900) && took < Duration::from_secs(10), "{took:?}");

    // A slow body too.
    let mut c = s.client();
    c.send_raw(b"POST /set/x HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc");
    assert_eq!(c.read_response(false).unwrap().status, 408);
}

#[test]
fn idle_connections_are_closed() {
    let s = Server::start(&["-idleTimeout", "1s"]);
    let mut c = s.client();
    assert_eq!(c.req("GET", "/get/x", &[], b"").status, 404);
    let t = Instant::now();
    assert!(c.is_closed());
    let took = t.elapsed();
    assert!(took >= Duration::from_millis(900) && took < Duration::from_secs(10), "{took:?}");
}

#[test]
fn epoll_driver_serves_the_api() {
    let s = Server::start(&["-ioDriver", "epoll", "-threads", "2"]);
    assert!(s.banner.contains("epoll"));
    let mut c = s.client();
    for i in 0..50 {
        assert_eq!(c.req("POST", &format!("/set/e{i}"), &[], b"v").status, 200);
    }
    for i in 0..50 {
        assert_eq!(c.req("GET", &format!("/get/e{i}"), &[], b"").body, b"v");
    }
}
