//! Snapshots over real restarts: SIGTERM, kill -9, corrupt files, golden file.

mod common;
use common::*;
use std::process::Command;
use std::time::Duration;

const SECRET: (&str, &str) = ("X-Owner-Secret", "s3cret");

fn fill_sample(s: &Server) {
    assert_eq!(s.req("POST", "/set/plain?ttl=1h", &[], b"value-1").status, 200);
    assert_eq!(s.req("POST", "/set/owned", &[SECRET], b"mine").status, 200);
    assert_eq!(s.req("POST", "/set/ip/svc", &[("X-Forwarded-For", "198.51.100.7")], b"4000").status, 200);
    assert_eq!(s.post(&format!("/set/{}", pct(b"bin\x00\xff")), b"\x00\x01\x02").status, 200);
}

#[test]
fn sigterm_saves_and_restart_restores_everything() {
    let s = Server::start(&["-threads", "2"]);
    fill_sample(&s);
    let before = s.get("/get/plain").expires_at();
    let owned_exp = s.get("/get/owned").expires_at();
    let (dir, status) = s.stop_keep_dir("-TERM");
    assert!(status.success(), "{status:?}");
    assert!(dir.path().join("snapshot.rkyv").exists());

    let s = Server::start_in(dir, &["-threads", "2"]);
    let g = s.get("/get/plain");
    assert_eq!((g.body.as_slice(), g.expires_at()), (&b"value-1"[..], before));
    assert_eq!(s.get("/get/owned").expires_at(), owned_exp);
    assert_eq!(s.get("/get/ip/198.51.100.7/svc").body, b"4000");
    assert_eq!(s.get(&format!("/get/{}", pct(b"bin\x00\xff"))).body, b"\x00\x01\x02");
    // The secret still protects the key, and still opens it.
    assert_eq!(s.post("/set/owned", b"stolen").status, 403);
    assert_eq!(s.req("POST", "/set/owned", &[("X-Owner-Secret", "wrong")], b"stolen").status, 403);
    assert_eq!(s.req("POST", "/set/owned", &[SECRET], b"mine-2").status, 200);
    // SIGINT works the same way.
    let (dir, status) = s.stop_keep_dir("-INT");
    assert!(status.success());
    let s = Server::start_in(dir, &[]);
    assert_eq!(s.get("/get/owned").body, b"mine-2");
}

#[test]
fn snapshot_file_holds_no_plain_secret() {
    let s = Server::start(&[]);
    let secret = "a-very-recognisable-secret-0123456789";
    assert_eq!(s.req("POST", "/set/k", &[("X-Owner-Secret", secret)], b"v").status, 200);
    // A wrong secret is refused without the server logging either one.
    assert_eq!(s.req("POST", "/set/k", &[("X-Owner-Secret", "another-recognisable-guess")], b"x").status, 403);
    let log = s.log_lines().join("\n");
    let (dir, status) = s.stop_keep_dir("-TERM");
    assert!(status.success());
    assert!(!log.contains(secret) && !log.contains("another-recognisable-guess"), "{log}");
    let bytes = std::fs::read(dir.path().join("snapshot.rkyv")).unwrap();
    assert!(!bytes.windows(secret.len()).any(|w| w == secret.as_bytes()));
    assert!(bytes.windows(1).any(|w| w == b"v"));
}

#[test]
fn expired_keys_are_not_resurrected() {
    let s = Server::start(&[]);
    assert_eq!(s.post("/set/brief?ttl=1s", b"v").status, 200);
    assert_eq!(s.post("/set/lasting", b"v").status, 200);
    let (dir, status) = s.stop_keep_dir("-TERM");
    assert!(status.success());
    std::thread::sleep(Duration::from_millis(1200));
    let s = Server::start_in(dir, &[]);
    assert_eq!(s.get("/get/brief").status, 404);
    assert_eq!(s.get("/get/lasting").status, 200);
}

#[test]
fn periodic_snapshots_capture_updates_and_survive_kill_9() {
    let s = Server::start(&["-saveDuration", "200ms"]);
    assert_eq!(s.post("/set/k", b"v1").status, 200);
    s.wait_log("snapshot saved", Duration::from_secs(10));
    // Update an existing key, claim a secret, change the TTL.
    assert_eq!(s.req("POST", "/set/k?ttl=30m", &[SECRET], b"v2").status, 200);
    let exp = s.get("/get/k").expires_at();
    s.log_lines();
    s.wait_log("snapshot saved", Duration::from_secs(10));
    s.wait_log("snapshot saved", Duration::from_secs(10));
    let (dir, _) = s.stop_keep_dir("-KILL");
    let s = Server::start_in(dir, &[]);
    let g = s.get("/get/k");
    assert_eq!((g.body.as_slice(), g.expires_at()), (&b"v2"[..], exp));
    assert_eq!(s.post("/set/k", b"v3").status, 403, "the claimed secret survived");
}

#[test]
fn snapshots_load_on_a_different_core_count() {
    let s = Server::start(&["-threads", "4"]);
    for i in 0..300 {
        assert_eq!(s.post(&format!("/set/k{i}"), format!("{i}").as_bytes()).status, 200);
    }
    let (mut dir, _) = s.stop_keep_dir("-TERM");
    for threads in ["1", "2", "3"] {
        let s = Server::start_in(dir, &["-threads", threads]);
        let mut c = s.client();
        for i in 0..300 {
            assert_eq!(c.req("GET", &format!("/get/k{i}"), &[], b"").body, format!("{i}").as_bytes());
        }
        // Keys are owned correctly after re-routing: updates and los work.
        assert_eq!(c.req("POST", "/los/k7", &[], b"x").header("X-Created").as_deref(), Some("false"));
        dir = s.stop_keep_dir("-TERM").0;
    }
}

fn expect_startup_failure(dir: &TempDir, needle: &str) {
    let path = dir.path().join("snapshot.rkyv");
    let before = std::fs::read(&path).unwrap();
    let out = Command::new(BIN).args(["-l", "127.0.0.1", "-port", "0", "-dataDir"]).arg(dir.path()).output().unwrap();
    assert!(!out.status.success(), "started with a bad snapshot ({needle})");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("snapshot.rkyv") && err.contains(needle), "{needle}: {err}");
    assert_eq!(std::fs::read(&path).unwrap(), before, "file must be left untouched");
}

#[test]
fn bad_snapshot_files_stop_startup_with_a_clear_message() {
    let s = Server::start(&[]);
    fill_sample(&s);
    let (dir, _) = s.stop_keep_dir("-TERM");
    let path = dir.path().join("snapshot.rkyv");
    let good = std::fs::read(&path).unwrap();

    std::fs::write(&path, b"").unwrap();
    expect_startup_failure(&dir, "empty");
    std::fs::write(&path, &good[..good.len() / 2]).unwrap();
    expect_startup_failure(&dir, "truncated");
    std::fs::write(&path, b"\x89PNG\r\n\x1a\n not a snapshot at all").unwrap();
    expect_startup_failure(&dir, "not a Rendezvous snapshot");
    let mut corrupt = good.clone();
    let mid = corrupt.len() - 10;
    corrupt[mid] ^= 0xff;
    std::fs::write(&path, &corrupt).unwrap();
    expect_startup_failure(&dir, "checksum");
    let mut future = good.clone();
    future[8..12].copy_from_slice(&7u32.to_le_bytes());
    std::fs::write(&path, &future).unwrap();
    expect_startup_failure(&dir, "version 7");

    // Restored, it loads again.
    std::fs::write(&path, &good).unwrap();
    let s = Server::start_in(dir, &[]);
    assert_eq!(s.get("/get/plain").body, b"value-1");
}

#[test]
fn missing_snapshot_starts_empty() {
    let s = Server::start(&[]);
    assert!(!s.dir.path().join("snapshot.rkyv").exists());
    assert_eq!(s.get("/get/plain").status, 404);
}

#[test]
fn golden_v1_snapshot_still_loads() {
    let dir = TempDir::new();
    let golden = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/golden/snapshot-v1.rkyv");
    std::fs::copy(golden, dir.path().join("snapshot.rkyv")).unwrap();
    let s = Server::start_in(dir, &["-threads", "3"]);
    assert_eq!(s.get("/get/golden/plain").body, b"hello");
    assert_eq!(s.get("/get/ip/192.0.2.1/svc").body, b"192.0.2.1:4000");
    assert_eq!(s.get("/get/golden/expired-long-ago").status, 404);
    assert_eq!(s.post("/set/golden/owned", b"x").status, 403);
    assert_eq!(s.req("POST", "/set/golden/owned", &[("X-Owner-Secret", "golden-secret")], b"x").status, 200);
}

/// kill -9 at random moments while a large store is snapshotted every 50 ms:
/// every restart succeeds and loads exactly one complete snapshot.
#[test]
fn kill_9_during_snapshot_writes_never_breaks_startup() {
    const KEYS: usize = 20_000;
    let value = vec![b'x'; 900];
    let args = ["-saveDuration", "10ms", "-threads", "2"];
    let s = Server::start(&args);
    let mut c = s.client();
    for i in 0..KEYS {
        assert_eq!(c.req("POST", &format!("/set/big{i}"), &[], &value).status, 200);
    }
    // A snapshot that started after the last write: skip those logged so
    // far, and the one that may be in progress.
    s.log_lines();
    s.wait_log("snapshot saved", Duration::from_secs(20));
    s.wait_log("snapshot saved", Duration::from_secs(20));
    let (mut dir, _) = s.stop_keep_dir("-KILL");
    // A cheap deterministic "random" sequence of kill moments.
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut mid_write = 0;
    for round in 0..20 {
        let s = Server::start_in(dir, &args);
        let mut c = s.client();
        // Exactly one complete snapshot: every key, every byte, and the marker
        // from some earlier round (or none).
        for i in (0..KEYS).step_by(97) {
            let r = c.req("GET", &format!("/get/big{i}"), &[], b"");
            assert!(r.status == 200 && r.body == value, "round {round} key {i}: {}", r.status);
        }
        let marker = c.req("GET", "/get/marker", &[], b"");
        if marker.status == 200 {
            let m: usize = marker.text().parse().unwrap();
            assert!(m < round, "marker {m} in round {round}");
        }
        assert_eq!(c.req("POST", "/set/marker", &[], round.to_string().as_bytes()).status, 200);
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        std::thread::sleep(Duration::from_millis(seed % 150));
        dir = s.stop_keep_dir("-KILL").0;
        if dir.path().join("snapshot.rkyv.tmp").exists() {
            mid_write += 1;
        }
    }
    eprintln!("{mid_write} of 20 kills landed while a snapshot file was being written");
    assert!(mid_write > 0, "no kill landed during a snapshot write");
    let s = Server::start_in(dir, &args);
    let mut c = s.client();
    let mut found = 0;
    for i in 0..KEYS {
        if c.req("GET", &format!("/get/big{i}"), &[], b"").status == 200 {
            found += 1;
        }
    }
    assert_eq!(found, KEYS);
}
