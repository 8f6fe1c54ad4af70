//! The deploy kit, proven with the real software on loopback: the systemd
//! unit verifies and its command line runs; nginx in front of a real server
//! keeps the real client address, cannot be spoofed, rate-limits per real
//! client and reuses upstream connections.

mod common;
use common::*;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const DEPLOY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy");

fn exec_start() -> Vec<String> {
    let unit = std::fs::read_to_string(format!("{DEPLOY}/systemd/rendezvous.service")).unwrap();
    let line = unit.lines().find_map(|l| l.strip_prefix("ExecStart=")).expect("ExecStart");
    line.split_whitespace().map(String::from).collect()
}

#[test]
#[ignore = "needs systemd-analyze"]
fn systemd_unit_verifies() {
    require("systemd-analyze");
    let dir = TempDir::new();
    let unit = std::fs::read_to_string(format!("{DEPLOY}/systemd/rendezvous.service"))
        .unwrap()
        .replace("/usr/bin/rendezvous", BIN);
    let path = dir.path().join("rendezvous.service");
    std::fs::write(&path, unit).unwrap();
    let out = Command::new("systemd-analyze").arg("verify").arg(&path).output().unwrap();
    let report = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{report}");
    assert!(!report.contains("rendezvous.service:"), "warnings about the unit:\n{report}");
}

#[test]
fn systemd_command_line_starts_and_stops_cleanly() {
    // The unit's own flags, with the port, paths and metrics moved to test values.
    let dir = TempDir::new();
    let mut args = exec_start();
    args.remove(0);
    for pair in args.chunks_mut(2) {
        match pair[0].as_str() {
            "-port" => pair[1] = "0".into(),
            "-l" => pair[1] = "127.0.0.1".into(),
            "-dataDir" => pair[1] = dir.path().display().to_string(),
            "-metricsAddr" => pair[1] = "127.0.0.1:0".into(),
            _ => {}
        }
    }
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let s = Server::start_in(dir, &refs);
    assert_eq!(s.post("/set/k", b"v").status, 200);
    let (dir, status) = s.stop_keep_dir("-TERM");
    assert!(status.success());
    assert!(dir.path().join("snapshot.rkyv").exists(), "SIGTERM wrote the final snapshot");
}

struct Nginx {
    _proc: Proc,
    http: u16,
    https: u16,
}

fn start_nginx(dir: &Path, upstream: std::net::SocketAddr) -> Nginx {
    let d = dir.display().to_string();
    let ok = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost"])
        .args(["-keyout", &format!("{d}/key.pem"), "-out", &format!("{d}/cert.pem")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(ok.success(), "openssl could not make a test certificate");
    let (http, https) = (free_port(), free_port());
    let site = std::fs::read_to_string(format!("{DEPLOY}/nginx/rendezvous.conf"))
        .unwrap()
        .replace("server 127.0.0.1:8080;", &format!("server {upstream};"))
        .replace("listen 80;", &format!("listen 127.0.0.1:{http};"))
        .replace("listen 443 ssl;", &format!("listen 127.0.0.1:{https} ssl;"))
        .replace("/etc/letsencrypt/live/rendezvous.example.org/fullchain.pem", &format!("{d}/cert.pem"))
        .replace("/etc/letsencrypt/live/rendezvous.example.org/privkey.pem", &format!("{d}/key.pem"))
        .lines()
        .filter(|l| !l.contains("[::]"))
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(dir.join("rendezvous.conf"), site).unwrap();
    let main = format!(
        "worker_processes 1;\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\nevents {{}}\n\
         http {{\n access_log off;\n client_body_temp_path {d}/body;\n proxy_temp_path {d}/proxy;\n\
         fastcgi_temp_path {d}/fcgi;\n uwsgi_temp_path {d}/uwsgi;\n scgi_temp_path {d}/scgi;\n\
         include {d}/rendezvous.conf;\n}}\n"
    );
    std::fs::write(dir.join("nginx.conf"), main).unwrap();
    let proc = Proc::spawn(Command::new("nginx").args(["-c", &format!("{d}/nginx.conf"), "-p", &d]));
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", https)).is_err() {
        assert!(
            Instant::now() < deadline,
            "nginx did not start: {}",
            std::fs::read_to_string(dir.join("error.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Nginx { _proc: proc, http, https }
}

/// One request through curl from a given loopback source address.
fn curl(from: &str, url: &str, extra: &[&str]) -> Resp {
    let out = Command::new("curl")
        .args(["-sk", "-i", "--interface", from, "--max-time", "10"])
        .args(extra)
        .arg(url)
        .output()
        .unwrap();
    let raw = out.stdout;
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("a response");
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let mut lines = head.lines();
    let status = lines.next().unwrap().split_whitespace().nth(1).unwrap().parse().unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().as_bytes().to_vec()))
        .collect();
    Resp { status, headers, body: raw[split + 4..].to_vec() }
}

#[test]
#[ignore = "needs nginx, openssl and curl"]
fn nginx_tls_proxy_keeps_the_real_client() {
    require("nginx");
    require("openssl");
    require("curl");
    let s = Server::start(&[
        "-threads",
        "2",
        "-trustedProxies",
        "127.0.0.1/32",
        "-maxRequests",
        "9",
        "-resetDuration",
        "1h",
    ]);
    let dir = TempDir::new();
    let nginx = start_nginx(dir.path(), s.addr);
    let https = format!("https://127.0.0.1:{}", nginx.https);
    let http = format!("http://127.0.0.1:{}", nginx.http);

    // X-Client-Ip and ip/ keys use the address nginx saw.
    let r = curl("127.0.0.5", &format!("{https}/set/ip/svc"), &["-d", "4000"]);
    assert_eq!((r.status, r.text().as_str()), (200, "127.0.0.5"));
    assert_eq!(r.header("X-Client-Ip").as_deref(), Some("127.0.0.5"));
    let r = curl("127.0.0.6", &format!("{https}/get/ip/127.0.0.5/svc"), &[]);
    assert_eq!((r.status, r.text().as_str()), (200, "4000"));
    // Plain HTTP goes through the same proxy.
    let r = curl("127.0.0.7", &format!("{http}/get/ip/127.0.0.5/svc"), &[]);
    assert_eq!(r.header("X-Client-Ip").as_deref(), Some("127.0.0.7"));

    // A client-sent X-Forwarded-For cannot spoof it.
    let r = curl("127.0.0.8", &format!("{https}/set/ip/svc"), &["-d", "x", "-H", "X-Forwarded-For: 20.18.12.10"]);
    assert_eq!((r.text().as_str(), r.header("X-Client-Ip").as_deref()), ("127.0.0.8", Some("127.0.0.8")));
    assert_eq!(curl("127.0.0.8", &format!("{https}/get/ip/20.18.12.10/svc"), &[]).status, 404);

    // Rate limits apply per real client (9 tokens: three writes).
    for _ in 0..3 {
        assert_eq!(curl("127.0.0.9", &format!("{https}/set/a"), &["-d", "v"]).status, 200);
    }
    let r = curl("127.0.0.9", &format!("{https}/get/a"), &[]);
    assert_eq!(r.status, 429);
    assert!(r.header("Retry-After").is_some());
    assert_eq!(curl("127.0.0.10", &format!("{https}/get/a"), &[]).status, 200, "another client is unaffected");

    // nginx reuses its upstream connections: many client requests, few server connections.
    let before = s.metric("rendezvous_connections_total").unwrap_or(0.0);
    for i in 0..30 {
        let from = format!("127.0.1.{}", i + 1);
        assert_eq!(curl(&from, &format!("{https}/get/a"), &[]).status, 200);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut after = s.metric("rendezvous_connections_total").unwrap_or(0.0);
    while after == before && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        after = s.metric("rendezvous_connections_total").unwrap_or(0.0);
    }
    let total = s.metric("rendezvous_connections_total").unwrap_or(0.0);
    assert!(total <= 3.0, "nginx opened {total} upstream connections for 37 requests");
    // The docs page shows the public host nginx was asked for, with the
    // scheme the client used (nginx's X-Forwarded-Proto).
    let r = curl("127.0.0.11", &format!("{https}/"), &["-H", "Host: rendezvous.example.org"]);
    assert!(r.text().contains("https://rendezvous.example.org/get/"), "{}", r.text());
    let r = curl("127.0.0.11", &format!("{http}/"), &["-H", "Host: rendezvous.example.org"]);
    assert!(r.text().contains("http://rendezvous.example.org/get/"));
}

/// The server started as systemd would start a `Type=notify` unit, with
/// `-dataDir data_dir`, and the socket its notifications arrive on.
fn under_systemd(dir: &TempDir, data_dir: &str) -> (std::os::unix::net::UnixDatagram, std::process::Child) {
    let sock_path = dir.path().join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let child = Command::new(BIN)
        .args(["-l", "127.0.0.1", "-port", "0", "-metricsAddr", "127.0.0.1:0", "-dataDir", data_dir])
        .env("NOTIFY_SOCKET", &sock_path)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    (sock, child)
}

/// `Type=notify`: the server tells systemd READY=1 when it serves (when
/// /readyz turns 200) and STOPPING=1 when it drains.
#[test]
fn systemd_is_told_ready_and_stopping() {
    let dir = TempDir::new();
    let (sock, mut child) = under_systemd(&dir, "");
    let mut buf = [0u8; 128];
    let n = sock.recv(&mut buf).expect("READY=1");
    let ready = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(ready.starts_with("READY=1\nSTATUS=serving on 127.0.0.1:"), "{ready}");
    Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    let n = sock.recv(&mut buf).expect("STOPPING=1");
    assert_eq!(&buf[..n], b"STOPPING=1\nSTATUS=draining and saving the store");
    assert!(wait_deadline(&mut child, Duration::from_secs(20)).success());
}

/// With a data directory, systemd is asked to wait before recovery starts
/// (a long replay would otherwise hit the unit's start timeout), then told
/// READY=1.
#[test]
fn systemd_is_asked_to_wait_while_the_store_is_recovered() {
    let dir = TempDir::new();
    let data = dir.path().join("data");
    std::fs::create_dir(&data).unwrap();
    let (sock, mut child) = under_systemd(&dir, data.to_str().unwrap());
    let mut buf = [0u8; 128];
    let n = sock.recv(&mut buf).expect("EXTEND_TIMEOUT_USEC");
    let first = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(first.starts_with("EXTEND_TIMEOUT_USEC=30000000\n"), "{first}");
    let n = sock.recv(&mut buf).expect("READY=1");
    let ready = String::from_utf8_lossy(&buf[..n]).into_owned();
    // The status systemd shows moves on from "recovering the store".
    assert!(ready.starts_with("READY=1\nSTATUS=serving on "), "{ready}");
    Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(wait_deadline(&mut child, Duration::from_secs(20)).success());
}
