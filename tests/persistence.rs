//! Persistence over real restarts: the write-ahead log and checkpoints keep
//! every acknowledged write through kill -9 (ledger of acknowledged writes,
//! many rounds, both fsync modes), recovered states existed (A before B),
//! torn tails are cut, damage stops startup, disk trouble refuses writes and
//! recovers, one process per data directory, signals (SIGTERM during a
//! snapshot gives it up and shuts down), versions that never
//! go backwards, core-count changes, a lower -maxNumKV, -dump, golden files.

mod common;
use common::*;
use std::collections::HashMap;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const SECRET: (&str, &str) = ("X-Owner-Secret", "s3cret");

fn fill_sample(s: &Server) {
    assert_eq!(s.req("POST", "/set/plain?ttl=1h", &[], b"value-1").status, 200);
    assert_eq!(s.req("POST", "/set/owned", &[SECRET], b"mine").status, 200);
    assert_eq!(s.req("POST", "/set/ip/svc", &[("X-Forwarded-For", "198.51.100.7")], b"4000").status, 200);
    assert_eq!(s.post(&format!("/set/{}", pct(b"bin\x00\xff")), b"\x00\x01\x02").status, 200);
}

fn check_sample(s: &Server) {
    assert_eq!(s.get("/get/plain").body, b"value-1");
    assert_eq!(s.get("/get/ip/198.51.100.7/svc").body, b"4000");
    assert_eq!(s.get(&format!("/get/{}", pct(b"bin\x00\xff"))).body, b"\x00\x01\x02");
    assert_eq!(s.post("/set/owned", b"stolen").status, 403, "the owner secret survived");
    assert_eq!(s.get("/get/owned").body, b"mine");
}

fn segments(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "wal"))
        .collect();
    v.sort();
    v
}

#[test]
fn sigterm_saves_and_restart_restores_everything() {
    let s = Server::start(&["-threads", "2"]);
    fill_sample(&s);
    let before = s.get("/get/plain").expires_at();
    let (dir, status) = s.stop_keep_dir("-TERM");
    assert!(status.success(), "{status:?}");
    assert!(dir.path().join("snapshot.rkyv").exists());
    let s = Server::start_in(dir, &["-threads", "2"]);
    check_sample(&s);
    assert_eq!(s.get("/get/plain").expires_at(), before);
    assert_eq!(s.req("POST", "/set/owned", &[SECRET], b"mine-2").status, 200);
    let (dir, status) = s.stop_keep_dir("-INT");
    assert!(status.success());
    let s = Server::start_in(dir, &[]);
    assert_eq!(s.get("/get/owned").body, b"mine-2");
}

#[test]
fn kill_9_right_after_an_answer_loses_nothing() {
    // No snapshot was ever taken: everything comes back from the log,
    // owner secrets included (the hashing key is kept in the directory).
    let s = Server::start(&["-threads", "2"]);
    fill_sample(&s);
    assert_eq!(s.req("DELETE", "/del/plain", &[], b"").status, 200);
    assert_eq!(s.post("/set/plain?ttl=1h", b"value-1").status, 200);
    let (dir, _) = s.stop_keep_dir("-KILL");
    assert!(!dir.path().join("snapshot.rkyv").exists());
    let s = Server::start_in(dir, &["-threads", "3"]);
    check_sample(&s);
    assert!(s.banner.contains("fsync everysec"), "{}", s.banner);
}

/// What one writer knows: the last acknowledged state of each of its keys
/// (`None`: deleted), and the one operation it had in flight when the
/// server died (its outcome is unknown).
#[derive(Default)]
struct Ledger {
    acked: HashMap<String, Option<u64>>,
    in_flight: Option<(String, Option<u64>)>,
}

/// Sends one request and reads its answer; `None` once the server is gone
/// (killed mid-exchange).
fn exchange_until_killed(c: &mut Client, raw: &[u8]) -> Option<Resp> {
    std::io::Write::write_all(&mut c.stream, raw).ok()?;
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| c.read_response(false))).ok().flatten()
}

/// A client on its own connection taking `step` after `step` (numbered
/// from 1) until `stop` is set or the server is gone (`step` gives `None`).
fn spawn_client(
    addr: std::net::SocketAddr,
    stop: Arc<AtomicBool>,
    mut step: impl FnMut(&mut Client, u64) -> Option<()> + Send + 'static,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let Ok(stream) = std::net::TcpStream::connect(addr) else { return };
        let mut c = Client::over(stream);
        let mut i = 0u64;
        while !stop.load(Ordering::Relaxed) {
            i += 1;
            if step(&mut c, i).is_none() {
                return;
            }
        }
    })
}

/// The next pseudo-random wait before a kill, `min_ms` plus up to `spread_ms`.
fn kill_after(seed: &mut u64, min_ms: u64, spread_ms: u64) -> Duration {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    Duration::from_millis(min_ms + *seed % spread_ms)
}

/// Writers hammer the server with sets and deletes over many keys (spread
/// over both cores) while it is killed at a random moment; then every
/// acknowledged write must be there: the last acknowledged state, or the
/// one in flight.
fn ledger_rounds(fsync: &str, rounds: usize) {
    let args = ["-threads", "2", "-fsync", fsync, "-saveDuration", "150ms"];
    let mut dir = TempDir::new();
    let counter = Arc::new(AtomicU64::new(1));
    let ledgers: Vec<Arc<Mutex<Ledger>>> = (0..4).map(|_| Arc::new(Mutex::new(Ledger::default()))).collect();
    let mut seed: u64 = 0x2545_f491_4f6c_dd1d ^ fsync.len() as u64;
    let mut checked = 0;
    for round in 0..rounds {
        let s = Server::start_in(dir, &args);
        // Check the previous round's ledger against what came back.
        let mut c = s.client();
        for ledger in &ledgers {
            let mut l = ledger.lock().unwrap();
            for (key, want) in &l.acked {
                let r = c.req("GET", &format!("/get/{key}"), &[], b"");
                let got = (r.status == 200).then(|| r.text().parse::<u64>().unwrap());
                let in_flight = l.in_flight.as_ref().filter(|(k, _)| k == key).map(|(_, v)| *v);
                assert!(
                    got == *want || Some(got) == in_flight,
                    "{fsync} round {round}: {key} is {got:?}; acknowledged {want:?}, in flight {in_flight:?}"
                );
                checked += 1;
            }
            // What is there now is the truth from here on.
            let keys: Vec<String> = l.acked.keys().cloned().collect();
            for key in keys {
                let r = c.req("GET", &format!("/get/{key}"), &[], b"");
                l.acked.insert(key, (r.status == 200).then(|| r.text().parse::<u64>().unwrap()));
            }
            l.in_flight = None;
        }
        let stop = Arc::new(AtomicBool::new(false));
        let writers: Vec<_> = ledgers
            .iter()
            .enumerate()
            .map(|(w, ledger)| {
                let (ledger, counter) = (ledger.clone(), counter.clone());
                spawn_client(s.addr, stop.clone(), move |c, i| {
                    let key = format!("w{w}-k{}", i % 40);
                    let v = counter.fetch_add(1, Ordering::SeqCst);
                    let op = if i.is_multiple_of(7) { None } else { Some(v) };
                    ledger.lock().unwrap().in_flight = Some((key.clone(), op));
                    let raw = match op {
                        Some(v) => build("POST", &format!("/set/{key}"), &[], v.to_string().as_bytes()),
                        None => build("DELETE", &format!("/del/{key}"), &[], b""),
                    };
                    let r = exchange_until_killed(c, &raw)?;
                    let mut l = ledger.lock().unwrap();
                    match (op, r.status) {
                        (Some(v), 200) => {
                            l.acked.insert(key, Some(v));
                        }
                        (None, 200 | 404) => {
                            l.acked.insert(key, None);
                        }
                        (_, status) => panic!("unexpected {status}"),
                    }
                    l.in_flight = None;
                    Some(())
                })
            })
            .collect();
        std::thread::sleep(kill_after(&mut seed, 20, 200));
        dir = s.stop_keep_dir("-KILL").0;
        stop.store(true, Ordering::Relaxed);
        for w in writers {
            w.join().unwrap();
        }
    }
    eprintln!("{fsync}: {rounds} kill -9 rounds, {checked} acknowledged states checked");
    assert!(checked > rounds * 40, "the writers barely wrote ({checked})");
}

#[test]
fn acknowledged_writes_survive_kill_9_everysec() {
    ledger_rounds("everysec", 30);
}

#[test]
fn acknowledged_writes_survive_kill_9_always() {
    ledger_rounds("always", 30);
}

/// The version an answer shows (its hex `ETag`).
fn etag(r: &Resp) -> u64 {
    let tag = r.header("etag").expect("an ETag");
    u64::from_str_radix(tag.trim_matches('"'), 16).expect("a hex ETag")
}

/// A read never shows a state a crash could take back, whichever core's log
/// holds the change that made it. Writers on both cores keep changing one
/// key (a write to another core's key is applied where it arrives and
/// journaled in that core's log), readers on both cores keep reading it,
/// and the server is killed at a random moment: the key comes back at a
/// version no older than any a reader was shown. Under `-fsync always` a
/// change stays unacknowledged for a whole sync, so readers do meet
/// changes still in another core's log, and those answers are held.
#[test]
fn reads_never_show_what_kill_9_takes_back() {
    let args = ["-threads", "2", "-fsync", "always", "-maxKeysPerIP", "0", "-maxKeysPerNet", "0"];
    let mut dir = TempDir::new();
    let mut seed: u64 = 0x5851_f42d_4c95_7f2d;
    let (mut shown, mut held, mut direct) = (0u64, 0.0, 0.0);
    for round in 0..8 {
        let s = Server::start_in(dir, &args);
        if round > 0 {
            let r = s.get("/get/hot");
            assert_eq!(r.status, 200, "round {round}: the key is gone");
            assert!(etag(&r) >= shown, "round {round}: back at version {}, a reader was shown {shown}", etag(&r));
        }
        let stop = Arc::new(AtomicBool::new(false));
        let max_shown = Arc::new(AtomicU64::new(shown));
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let max_shown = max_shown.clone();
                spawn_client(s.addr, stop.clone(), move |c, i| {
                    let raw = if t % 2 == 0 {
                        build("POST", "/set/hot", &[], format!("{t}.{i}").as_bytes())
                    } else {
                        build("GET", "/get/hot", &[], b"")
                    };
                    let r = exchange_until_killed(c, &raw)?;
                    if t % 2 == 1 && r.status == 200 {
                        max_shown.fetch_max(etag(&r), Ordering::SeqCst);
                    }
                    Some(())
                })
            })
            .collect();
        std::thread::sleep(kill_after(&mut seed, 150, 200));
        let sum = |name: &str| (0..2).filter_map(|c| s.metric(&format!("{name}{{core=\"{c}\"}}"))).sum::<f64>();
        held += sum("rendezvous_answers_held_total");
        direct += sum("rendezvous_direct_writes_total");
        dir = s.stop_keep_dir("-KILL").0;
        stop.store(true, Ordering::Relaxed);
        for t in threads {
            t.join().unwrap();
        }
        shown = max_shown.load(Ordering::SeqCst);
    }
    let s = Server::start_in(dir, &args);
    let tag = etag(&s.get("/get/hot"));
    assert!(tag >= shown, "back at version {tag}, a reader was shown {shown}");
    eprintln!("{direct} direct writes, {held} answers held for another core's log");
    assert!(direct > 0.0, "no write was applied by the core it arrived on");
    assert!(held > 0.0, "no answer waited for another core's log");
}

/// Changes applied in one scheduler pass share one log write: with many
/// clients writing at once on one core, there are fewer log writes than
/// writes (the old build wrote once per request), and each one was still
/// durable before its answer: all of them come back after kill -9.
#[test]
fn concurrent_writes_share_log_writes_and_all_survive_kill_9() {
    const CLIENTS: usize = 32;
    const EACH: usize = 100;
    // Key quotas off: every writer is the same loopback address.
    let s = Server::start(&["-threads", "1", "-maxKeysPerIP", "0", "-maxKeysPerNet", "0"]);
    let writes0 = s.metric("rendezvous_log_writes_total").unwrap();
    let addr = s.addr;
    let writers: Vec<_> = (0..CLIENTS)
        .map(|c| {
            std::thread::spawn(move || {
                let mut client = Client::connect(addr);
                for i in 0..EACH {
                    let r = client.req("POST", &format!("/set/batch-{c}-{i}"), &[], format!("{c}.{i}").as_bytes());
                    assert_eq!(r.status, 200);
                }
            })
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
    let writes = s.metric("rendezvous_log_writes_total").unwrap() - writes0;
    let sets = (CLIENTS * EACH) as f64;
    assert!(writes >= 1.0 && writes < sets, "{writes} log writes for {sets} concurrent sets");
    let (dir, _) = s.stop_keep_dir("-KILL");
    let s = Server::start_in(dir, &["-threads", "2"]);
    let mut c = s.client();
    for w in 0..CLIENTS {
        for i in 0..EACH {
            assert_eq!(c.req("GET", &format!("/get/batch-{w}-{i}"), &[], b"").text(), format!("{w}.{i}"));
        }
    }
}

/// Every log write is timed: an operator sees how long the cores sat in the
/// log's writes (a filesystem that holds them shows there, not only in the
/// request latency). On a healthy disk the writes timed are exactly those
/// counted (failed writes are timed too, and not counted).
#[test]
fn every_log_write_is_timed() {
    let s = Server::start(&["-threads", "2", "-maxKeysPerIP", "0", "-maxKeysPerNet", "0"]);
    let addr = s.addr;
    let writers: Vec<_> = (0..4)
        .map(|c| {
            std::thread::spawn(move || {
                let mut client = Client::connect(addr);
                for i in 0..50 {
                    assert_eq!(client.req("POST", &format!("/set/timed-{c}-{i}"), &[], b"v").status, 200);
                }
            })
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
    let text = s.scrape();
    let m = |series: &str| metric_in(&text, series).unwrap_or_else(|| panic!("no {series} in\n{text}"));
    let writes = m("rendezvous_log_writes_total");
    let timed = m("rendezvous_log_write_duration_seconds_count");
    assert!(writes >= 1.0, "{writes} log writes");
    assert_eq!(timed, writes, "every log write is timed, and only those");
    assert_eq!(m("rendezvous_log_write_duration_seconds_bucket{le=\"+Inf\"}"), timed);
    assert!(m("rendezvous_log_write_duration_seconds_sum") > 0.0);
    // The bucket the dashboard's "over 1 ms" series reads, and the finest.
    for le in ["0.001", "0.00001"] {
        m(&format!("rendezvous_log_write_duration_seconds_bucket{{le=\"{le}\"}}"));
    }
}

/// A client that pipelines its sets (their changes are written at once
/// rather than later in the pass, on the owner or, for another core's key,
/// with the owner's batch) gets every answer, and the server is killed while
/// the later ones are still being served: every set answered before the
/// kill is there after it.
#[test]
fn pipelined_sets_survive_kill_9() {
    const SETS: usize = 2000;
    let s = Server::start(&["-threads", "2", "-maxKeysPerIP", "0", "-maxKeysPerNet", "0"]);
    let mut c = s.client();
    let mut raw = Vec::new();
    for i in 0..SETS {
        raw.extend(build("POST", &format!("/set/pipe-{i}"), &[], format!("v{i}").as_bytes()));
    }
    c.send_raw(&raw);
    let answered = SETS / 2;
    for i in 0..answered {
        let r = c.read_response(false).expect("an answer per pipelined set");
        assert_eq!(r.status, 200, "set {i}");
    }
    let (dir, _) = s.stop_keep_dir("-KILL");
    let s = Server::start_in(dir, &["-threads", "1"]);
    let mut c = s.client();
    for i in 0..answered {
        assert_eq!(c.req("GET", &format!("/get/pipe-{i}"), &[], b"").text(), format!("v{i}"), "set {i}");
    }
}

/// A write-heavy instance does not keep `-saveDuration` of log: once the
/// log has grown by `-maxLogSize` (and by the last snapshot's size), a
/// checkpoint starts early and deletes the segments it covers.
#[test]
fn log_growth_starts_a_checkpoint_early() {
    let s = Server::start(&["-threads", "2", "-saveDuration", "1h", "-maxLogSize", "100000"]);
    let value = vec![b'v'; 1000];
    for i in 0..300 {
        assert_eq!(s.post(&format!("/set/grow-{}", i % 50), &value).status, 200);
    }
    let line = s.wait_log("since the last snapshot (-maxLogSize)", Duration::from_secs(10));
    assert!(line.contains("the log grew by"), "{line}");
    s.wait_log("snapshot saved", Duration::from_secs(10));
    assert!(s.metric("rendezvous_snapshots_total").unwrap_or(0.0) >= 1.0);
    // About one segment per core remains once the snapshot covers the rest.
    let segs = segments(s.dir.path()).len();
    assert!(segs <= 4, "{segs} segments after the early checkpoint");
    let (dir, _) = s.stop_keep_dir("-KILL");
    let s = Server::start_in(dir, &["-threads", "1"]);
    assert_eq!(s.get("/get/grow-7").body, value);
}

/// The log segments the server still holds open after a checkpoint
/// deleted them (a deleted file's disk space comes back only once its last
/// descriptor closes).
fn deleted_segments_held(s: &Server) -> Vec<String> {
    let held = segments_held(s);
    assert!(held.iter().any(|p| !p.ends_with(" (deleted)")), "no open segment seen: {held:?}");
    held.into_iter().filter(|p| p.ends_with(" (deleted)")).collect()
}

/// The log segments the server holds open, as `/proc` names them.
fn segments_held(s: &Server) -> Vec<String> {
    let dir = s.dir.path().canonicalize().unwrap();
    let fds = std::fs::read_dir(format!("/proc/{}/fd", s.pid())).expect("the server's descriptors");
    fds.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .map(|p| p.to_string_lossy().into_owned())
        .filter(|p| p.starts_with(&*dir.to_string_lossy()) && p.contains(".wal"))
        .collect()
}

/// A checkpoint deletes the segments its snapshot covers; the server lets
/// go of them soon after, in every `-fsync` mode, even when nothing is
/// written afterwards (an idle log once kept them open, and their disk
/// space with them, until its next write).
#[test]
fn segments_a_checkpoint_deleted_are_let_go_of_while_idle() {
    for mode in ["everysec", "always", "no"] {
        let s = Server::start(&["-threads", "2", "-fsync", mode]);
        let value = vec![b'd'; 1000];
        for i in 0..200 {
            assert_eq!(s.post(&format!("/set/idle-{i}"), &value).status, 200);
        }
        // Past everysec's next sync: the log is idle when the checkpoint
        // comes, so no later sync is on its way anyway.
        std::thread::sleep(Duration::from_millis(1500));
        let before = segments(s.dir.path());
        s.log_lines();
        s.signal("-USR1");
        s.wait_log("snapshot saved", Duration::from_secs(10));
        let after = segments(s.dir.path());
        assert!(before.iter().any(|p| !after.contains(p)), "{mode}: the checkpoint deleted no segment");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let held = deleted_segments_held(&s);
            if held.is_empty() {
                break;
            }
            assert!(Instant::now() < deadline, "{mode}: deleted segments still open after 10 s idle: {held:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
        let (dir, _) = s.stop_keep_dir("-KILL");
        let s = Server::start_in(dir, &["-threads", "1"]);
        assert_eq!(s.get("/get/idle-199").body, value, "{mode}");
    }
}

fn cached(file: &std::fs::File, offset: u64) -> bool {
    rendezvous::persist::snapshot::is_cached(file, offset).unwrap()
}

/// The log is written once and read only by recovery: once synced, its
/// pages leave the page cache (whole 2 MiB units, stopping 256 KiB short
/// of the synced end), the rest stays, and the bytes are all still there
/// for a restart after kill -9.
#[test]
fn synced_log_pages_leave_the_page_cache_and_still_recover() {
    let s = Server::start(&["-threads", "1", "-fsync", "always", "-maxKeysPerIP", "0", "-maxKeysPerNet", "0"]);
    let value = vec![b'p'; 1000];
    // About 3.1 MB of log: its first 2 MiB unit is trimmed.
    for i in 0..3000 {
        assert_eq!(s.post(&format!("/set/paged-{i}"), &value).status, 200);
    }
    let seg = segments(s.dir.path()).pop().expect("a log segment");
    let file = std::fs::File::open(&seg).unwrap();
    let len = file.metadata().unwrap().len();
    assert!(len > 3_000_000, "{len} bytes of log");
    if rendezvous::persist::snapshot::memory_backed(s.dir.path()) {
        eprintln!("skipped: the data directory is on tmpfs");
        return;
    }
    // The tail, past the last whole unit, stays (and shows the check works).
    assert!(cached(&file, len - 1), "the log's tail is cached");
    // The helper drops them in the background, soon after the sync.
    let deadline = Instant::now() + Duration::from_secs(10);
    while cached(&file, 0) || cached(&file, (2 << 20) - 1) {
        assert!(Instant::now() < deadline, "synced log pages still cached after 10 s");
        std::thread::sleep(Duration::from_millis(20));
    }
    let (dir, _) = s.stop_keep_dir("-KILL");
    let s = Server::start_in(dir, &["-threads", "2"]);
    let mut c = s.client();
    for i in (0..3000).step_by(7) {
        assert_eq!(c.req("GET", &format!("/get/paged-{i}"), &[], b"").body, value, "set {i}");
    }
}

/// A client writes A=i, then B=i, each after the other's answer. After a
/// kill -9 the recovered store never has B ahead of A: it is a state that
/// existed (the old snapshot-only build showed B > A every time).
#[test]
fn recovered_states_existed_a_before_b() {
    let args = ["-threads", "2", "-saveDuration", "100ms"];
    let mut dir = TempDir::new();
    let mut i = 0u64;
    for round in 0..8 {
        let s = Server::start_in(dir, &args);
        let mut c = s.client();
        for p in 0..8 {
            let a = c.req("GET", &format!("/get/a{p}"), &[], b"");
            let b = c.req("GET", &format!("/get/b{p}"), &[], b"");
            let num = |r: &Resp| if r.status == 200 { r.text().parse::<u64>().unwrap() } else { 0 };
            assert!(num(&b) <= num(&a), "round {round} pair {p}: B={} ahead of A={}", num(&b), num(&a));
        }
        let until = Instant::now() + Duration::from_millis(60 + 37 * round as u64);
        while Instant::now() < until {
            i += 1;
            for p in 0..8 {
                assert_eq!(c.req("POST", &format!("/set/a{p}"), &[], i.to_string().as_bytes()).status, 200);
                assert_eq!(c.req("POST", &format!("/set/b{p}"), &[], i.to_string().as_bytes()).status, 200);
            }
        }
        dir = s.stop_keep_dir("-KILL").0;
    }
}

/// 20 keys `k0..k19` with `value`, written by one core, then kill -9:
/// the kept directory and its last log segment. With `-fsync no` the log
/// has no sync marks, whatever the timing: the tests below about marks
/// make them on purpose.
fn killed_after_twenty_writes(value: &[u8]) -> (TempDir, std::path::PathBuf) {
    let s = Server::start(&["-threads", "1", "-fsync", "no"]);
    for i in 0..20 {
        assert_eq!(s.post(&format!("/set/k{i}"), value).status, 200);
    }
    let (dir, _) = s.stop_keep_dir("-KILL");
    let seg = segments(dir.path()).pop().unwrap();
    (dir, seg)
}

/// Appends half a record to `seg` (a length prefix promising more than
/// follows), as a crash mid-append leaves it. Returns the good length.
fn tear(seg: &std::path::Path) -> usize {
    let mut bytes = std::fs::read(seg).unwrap();
    let good = bytes.len();
    bytes.extend_from_slice(&[64, 0, 0, 0, 1, 2, 3, 4, 1, 9, 9]);
    std::fs::write(seg, &bytes).unwrap();
    good
}

/// The server's startup log says it cut a torn record at byte `good`.
fn assert_cut_at(s: &Server, good: usize) {
    let log = s.startup.join("\n");
    assert!(log.contains("cut a torn record") && log.contains(&format!("byte {good}")), "{log}");
}

#[test]
fn a_torn_tail_is_cut_and_startup_goes_on() {
    let (dir, seg) = killed_after_twenty_writes(b"v");
    let good = tear(&seg);
    let s = Server::start_in(dir, &["-threads", "2"]);
    assert_cut_at(&s, good);
    for i in 0..20 {
        assert_eq!(s.get(&format!("/get/k{i}")).status, 200);
    }
    assert_eq!(std::fs::read(&seg).unwrap().len(), good, "the torn bytes were cut");
}

#[test]
fn a_torn_tail_in_an_older_segment_is_cut_too() {
    // Power loss after a rotation can lose an old segment's unsynced tail
    // while a newer segment survives (written back first, within one run:
    // across a restart the replayed segments are synced before serving):
    // the newer records are still replayed.
    let (dir, first) = killed_after_twenty_writes(b"v");
    let s = Server::start_in(dir, &["-threads", "1"]);
    assert_eq!(s.post("/set/later", b"after the tear").status, 200);
    let (dir, _) = s.stop_keep_dir("-KILL");
    let all = segments(dir.path());
    assert!(all.len() >= 2 && all[0] == first, "{all:?}");
    let good = tear(&first);
    let s = Server::start_in(dir, &["-threads", "1"]);
    assert_cut_at(&s, good);
    assert_eq!(s.get("/get/later").text(), "after the tear");
    for i in 0..20 {
        assert_eq!(s.get(&format!("/get/k{i}")).status, 200);
    }
}

/// Torn tails are cut only once every segment has been read: damage in a
/// later segment stops startup with the earlier segment's torn tail still
/// there.
#[test]
fn damage_in_a_later_segment_leaves_an_earlier_torn_tail_uncut() {
    let (dir, first) = killed_after_twenty_writes(b"v");
    let s = Server::start_in(dir, &["-threads", "1"]);
    for i in 0..5 {
        assert_eq!(s.post(&format!("/set/later-{i}"), b"after the tear").status, 200);
    }
    let (dir, _) = s.stop_keep_dir("-KILL");
    let all = segments(dir.path());
    assert!(all.len() >= 2 && all[0] == first, "{all:?}");
    tear(&first);
    let torn = std::fs::read(&first).unwrap();
    let last = all.last().unwrap();
    let mut bytes = std::fs::read(last).unwrap();
    bytes[20] ^= 0x55;
    std::fs::write(last, &bytes).unwrap();
    let data = dir.path().display().to_string();
    let (status, err) = run_to_exit(&["-l", "127.0.0.1", "-port", "0", "-metricsAddr", "", "-dataDir", &data]);
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains(&last.display().to_string()), "{err}");
    assert!(std::fs::read(&first).unwrap() == torn, "the earlier segment was cut before the damage was found");
}

#[test]
fn damage_before_the_tail_stops_startup_and_touches_nothing() {
    let (dir, seg) = killed_after_twenty_writes(b"value");
    let mut bytes = std::fs::read(&seg).unwrap();
    bytes[20] ^= 0x55;
    std::fs::write(&seg, &bytes).unwrap();
    let before: Vec<(std::path::PathBuf, Vec<u8>)> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| !p.ends_with("LOCK"))
        .map(|p| (p.clone(), std::fs::read(&p).unwrap()))
        .collect();
    let data = dir.path().display().to_string();
    let (status, err) = run_to_exit(&["-l", "127.0.0.1", "-port", "0", "-metricsAddr", "", "-dataDir", &data]);
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains(&seg.display().to_string()) && err.contains("byte 0"), "{err}");
    for (p, b) in before {
        assert_eq!(std::fs::read(&p).unwrap(), b, "{} was changed", p.display());
    }
}

/// A record length corrupted on the disk so that it claims the rest of the
/// file reads like a record a crash cut short; recovery finds the valid
/// records after it, stops instead of cutting them away, and the cut its
/// message offers keeps every record before the damage.
#[test]
fn a_corrupted_length_stops_startup_and_the_offered_cut_keeps_what_precedes_it() {
    let (dir, seg) = killed_after_twenty_writes(b"value");
    let mut bytes = std::fs::read(&seg).unwrap();
    let first = rendezvous::state::record::decode(&bytes).unwrap().1;
    let second = first + rendezvous::state::record::decode(&bytes[first..]).unwrap().1;
    let claimed = (bytes.len() as u32) * 2;
    bytes[second..second + 4].copy_from_slice(&claimed.to_le_bytes());
    std::fs::write(&seg, &bytes).unwrap();
    let data = dir.path().display().to_string();
    let args = ["-l", "127.0.0.1", "-port", "0", "-metricsAddr", "", "-dataDir", &data];
    let (status, err) = run_to_exit(&args);
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains(&format!("damaged at byte {second}")), "{err}");
    assert_eq!(std::fs::read(&seg).unwrap(), bytes, "the segment was changed");
    let cut = format!("truncate -s {second} -- {}", seg.display());
    assert!(err.contains(&cut), "{err}");
    std::fs::OpenOptions::new().write(true).open(&seg).unwrap().set_len(second as u64).unwrap();
    let s = Server::start_in(dir, &["-threads", "1"]);
    assert_eq!(s.get("/get/k0").body, b"value");
    assert_eq!(s.get("/get/k1").body, b"value");
    assert_eq!(s.get("/get/k2").status, 404, "the damaged record and those after it are gone");
}

/// The records and sync marks of a segment: (start, is a mark).
fn items(bytes: &[u8]) -> Vec<(usize, bool)> {
    use rendezvous::state::record::{decode, mark_at, MARK_LEN};
    let mut at = 0;
    let mut out = Vec::new();
    while at < bytes.len() {
        if mark_at(&bytes[at..]).is_some() {
            out.push((at, true));
            at += MARK_LEN;
        } else {
            out.push((at, false));
            at += decode(&bytes[at..]).unwrap().1;
        }
    }
    out
}

/// `k0..k19` written under `everysec`, then waits for the log to go quiet
/// and end in a sync mark saying they are all on the disk. Returns the
/// running server and its segment.
fn twenty_writes_then_a_sync_mark() -> (Server, std::path::PathBuf) {
    let s = Server::start(&["-threads", "1"]);
    for i in 0..20 {
        assert_eq!(s.post(&format!("/set/k{i}"), b"value").status, 200);
    }
    let seg = segments(s.dir.path()).pop().unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let bytes = std::fs::read(&seg).unwrap();
        let last = items(&bytes).last().copied();
        if let Some((at, true)) = last {
            let mark = rendezvous::state::record::mark_at(&bytes[at..]).unwrap();
            if mark.synced_to == at as u64 {
                break;
            }
        }
        assert!(Instant::now() < deadline, "the quiet log never got its sync mark");
        std::thread::sleep(Duration::from_millis(50));
    }
    (s, seg)
}

/// A power loss on a filesystem that writes a file's blocks in any order
/// (ext4 without a journal, XFS) can leave the unsynced end of a segment
/// with a block that never landed (zeros) followed by one that did: valid
/// records after a bad one. With no sync mark after it saying it was
/// synced, it is cut, and startup goes on.
#[test]
fn a_power_loss_s_unsynced_end_is_cut_and_startup_goes_on() {
    let (s, seg) = twenty_writes_then_a_sync_mark();
    // Acknowledged from the page cache; within what everysec may lose.
    assert_eq!(s.post("/set/k20", b"value").status, 200);
    let (dir, _) = s.stop_keep_dir("-KILL");
    let mut bytes = std::fs::read(&seg).unwrap();
    let (lost, is_mark) = *items(&bytes).last().unwrap();
    assert!(!is_mark, "k20's record is last");
    // Its block never reached the disk; a later one did, holding a valid record.
    bytes[lost..].fill(0);
    bytes.resize(lost + 4096, 0);
    let first = rendezvous::state::record::decode(&bytes).unwrap().1;
    let landed = bytes[..first].to_vec();
    bytes.extend_from_slice(&landed);
    std::fs::write(&seg, &bytes).unwrap();
    let s = Server::start_in(dir, &["-threads", "1"]);
    let log = s.startup.join("\n");
    assert!(log.contains("cut the unsynced end") && log.contains(&format!("from byte {lost}")), "{log}");
    for i in 0..20 {
        assert_eq!(s.get(&format!("/get/k{i}")).body, b"value");
    }
    assert_eq!(s.get("/get/k20").status, 404);
    assert_eq!(std::fs::read(&seg).unwrap().len(), lost, "cut at the first bad byte");
}

/// The same hole among records a later sync mark says were synced is
/// damage, not a power loss: startup stops and changes nothing.
#[test]
fn a_hole_a_sync_mark_covers_stops_startup() {
    let (s, seg) = twenty_writes_then_a_sync_mark();
    let (dir, _) = s.stop_keep_dir("-KILL");
    let mut bytes = std::fs::read(&seg).unwrap();
    let records: Vec<usize> = items(&bytes).into_iter().filter(|&(_, mark)| !mark).map(|(at, _)| at).collect();
    let hole = records[5]..records[7];
    bytes[hole.clone()].fill(0);
    std::fs::write(&seg, &bytes).unwrap();
    let data = dir.path().display().to_string();
    let (status, err) = run_to_exit(&["-l", "127.0.0.1", "-port", "0", "-metricsAddr", "", "-dataDir", &data]);
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains(&format!("damaged at byte {}", hole.start)), "{err}");
    assert_eq!(std::fs::read(&seg).unwrap(), bytes, "the segment was changed");
}

/// A segment a checkpoint moves on from ends, once synced, with a mark
/// claiming its whole length: its last records are covered too. The
/// checkpoint is held open (one core stopped, so it cannot finish and
/// delete the segment) while the other core's old segment is looked at.
#[test]
fn a_segment_a_checkpoint_moves_on_from_ends_with_a_mark_of_its_length() {
    use rendezvous::state::record::{mark_at, MARK_LEN};
    let s = Server::start(&["-threads", "2"]);
    for i in 0..100 {
        assert_eq!(s.post(&format!("/set/k{i}"), b"v").status, 200);
    }
    let first = segments(s.dir.path()).into_iter().find(|p| p.to_string_lossy().ends_with("-0000.wal")).unwrap();
    let frozen = Frozen::core(s.pid(), 1);
    s.signal("-HUP");
    s.wait_log("writing a snapshot now", Duration::from_secs(10));
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let bytes = std::fs::read(&first).unwrap();
        let end = bytes.len().saturating_sub(MARK_LEN);
        let moved_on = segments(s.dir.path()).iter().filter(|p| p.to_string_lossy().ends_with("-0000.wal")).count() > 1;
        if moved_on && mark_at(&bytes[end..]).is_some_and(|m| m.synced_to == end as u64) {
            break;
        }
        assert!(Instant::now() < deadline, "the old segment never got its last mark");
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(frozen);
    s.wait_log("snapshot saved", Duration::from_secs(30));
}

#[test]
fn two_instances_on_one_data_directory() {
    let s = Server::start(&[]);
    let data = s.dir.path().display().to_string();
    let (status, err) = run_to_exit(&["-l", "127.0.0.1", "-port", "0", "-metricsAddr", "", "-dataDir", &data]);
    assert_eq!(status.code(), Some(1));
    assert!(err.contains(&data) && err.contains(&format!("PID {}", s.pid())), "{err}");
    assert_eq!(s.post("/set/k", b"v").status, 200, "the owner is untouched");
}

/// `rm LOCK` (a "stale lock" cleanup) while the owner runs does not let a
/// second process in: the directory itself is locked too.
#[test]
fn a_removed_lock_file_does_not_let_a_second_process_in() {
    let s = Server::start(&[]);
    std::fs::remove_file(s.dir.path().join("LOCK")).unwrap();
    let data = s.dir.path().display().to_string();
    let (status, err) = run_to_exit(&["-l", "127.0.0.1", "-port", "0", "-metricsAddr", "", "-dataDir", &data]);
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("in use by another Rendezvous process"), "{err}");
    assert_eq!(s.post("/set/k", b"v").status, 200, "the owner is untouched");
}

/// A data directory given as a symlink is resolved once. Flipped to
/// another directory while the server runs (a blue/green switch), the
/// server stays in the one it locked: its checkpoint neither lands in nor
/// prunes the new one, which a second server can own. (It used to follow
/// the link, and its checkpoint deleted the second server's log.)
#[test]
fn a_flipped_symlink_leaves_each_server_in_the_directory_it_locked() {
    let base = TempDir::new();
    let (a, b, cur) = (base.path().join("a"), base.path().join("b"), base.path().join("cur"));
    std::fs::create_dir(&a).unwrap();
    std::fs::create_dir(&b).unwrap();
    std::os::unix::fs::symlink(&a, &cur).unwrap();
    let link = cur.display().to_string();
    let first = Server::start(&["-dataDir", &link]);
    assert_eq!(first.post("/set/from-a", b"a").status, 200);
    std::fs::remove_file(&cur).unwrap();
    std::os::unix::fs::symlink(&b, &cur).unwrap();
    let mut second = Server::start(&["-dataDir", &link]);
    for i in 0..3 {
        assert_eq!(second.post(&format!("/set/from-b{i}"), b"b").status, 200);
    }
    first.signal("-HUP");
    first.wait_log("snapshot saved", Duration::from_secs(30));
    assert!(a.join("snapshot.rkyv").exists(), "the first server's snapshot is in its own directory");
    assert!(!b.join("snapshot.rkyv").exists(), "and not in the second one's");
    // The second server's acknowledged writes survive a kill -9.
    second.signal_and_wait("-KILL");
    let b_dir = b.display().to_string();
    let third = Server::start(&["-dataDir", &b_dir]);
    for i in 0..3 {
        assert_eq!(third.get(&format!("/get/from-b{i}")).body, b"b");
    }
    assert_eq!(third.get("/get/from-a").status, 404);
}

#[test]
fn missing_explicit_directory_is_a_startup_error_and_the_default_is_created() {
    let t = TempDir::new();
    let missing = t.path().join("not-there").display().to_string();
    let (status, err) = run_to_exit(&["-l", "127.0.0.1", "-port", "0", "-metricsAddr", "", "-dataDir", &missing]);
    assert_eq!(status.code(), Some(1));
    assert!(err.contains(&missing) && err.contains("does not exist"), "{err}");
    // The default directory (relative to the working directory) is created.
    let mut child = Command::new(BIN)
        .args(["-l", "127.0.0.1", "-port", "0", "-metricsAddr", ""])
        .current_dir(t.path())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !t.path().join("rendezvous-data/LOCK").exists() {
        assert!(Instant::now() < deadline, "default data directory not created");
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn every_file_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let s = Server::start(&[]);
    fill_sample(&s);
    let (dir, _) = s.stop_keep_dir("-TERM");
    let mut n = 0;
    for e in std::fs::read_dir(dir.path()).unwrap() {
        let p = e.unwrap().path();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{} is {mode:o}", p.display());
        n += 1;
    }
    assert!(n >= 4, "LOCK, SECRET, snapshot and a segment");
}

#[test]
fn snapshot_and_log_hold_no_plain_secret() {
    let s = Server::start(&[]);
    let secret = "a-very-recognisable-secret-0123456789";
    assert_eq!(s.req("POST", "/set/k", &[("X-Owner-Secret", secret)], b"v").status, 200);
    assert_eq!(s.req("POST", "/set/k", &[("X-Owner-Secret", "another-recognisable-guess")], b"x").status, 403);
    let log = s.log_lines().join("\n");
    let (dir, status) = s.stop_keep_dir("-TERM");
    assert!(status.success());
    assert!(!log.contains(secret) && !log.contains("another-recognisable-guess"), "{log}");
    for e in std::fs::read_dir(dir.path()).unwrap() {
        let bytes = std::fs::read(e.unwrap().path()).unwrap();
        assert!(!bytes.windows(secret.len()).any(|w| w == secret.as_bytes()));
    }
}

#[test]
fn expired_keys_are_not_resurrected() {
    let s = Server::start(&[]);
    assert_eq!(s.post("/set/brief?ttl=1s", b"v").status, 200);
    assert_eq!(s.post("/set/lasting", b"v").status, 200);
    let (dir, _) = s.stop_keep_dir("-KILL");
    std::thread::sleep(Duration::from_millis(1200));
    let s = Server::start_in(dir, &[]);
    assert_eq!(s.get("/get/brief").status, 404);
    assert_eq!(s.get("/get/lasting").status, 200);
}

#[test]
fn checkpoints_bound_the_log_and_any_core_count_recovers() {
    let s = Server::start(&["-threads", "4", "-saveDuration", "100ms"]);
    for i in 0..300 {
        assert_eq!(s.post(&format!("/set/k{i}"), format!("{i}").as_bytes()).status, 200);
    }
    s.log_lines();
    s.wait_log("snapshot saved", Duration::from_secs(10));
    s.wait_log("snapshot saved", Duration::from_secs(10));
    // Old segments are deleted once a snapshot covers them: about one per core remains.
    let segs = segments(s.dir.path()).len();
    assert!(segs <= 8, "{segs} segments after checkpoints");
    for i in 0..300 {
        assert_eq!(s.post(&format!("/set/k{i}"), format!("{i}-b").as_bytes()).status, 200);
    }
    let (mut dir, _) = s.stop_keep_dir("-KILL");
    for threads in ["1", "2", "3"] {
        let s = Server::start_in(dir, &["-threads", threads]);
        let mut c = s.client();
        for i in 0..300 {
            assert_eq!(c.req("GET", &format!("/get/k{i}"), &[], b"").body, format!("{i}-b").as_bytes());
        }
        assert_eq!(c.req("POST", "/los/k7", &[], b"x").header("X-Created").as_deref(), Some("false"));
        assert_eq!(c.req("POST", &format!("/set/t{threads}"), &[], b"x").status, 200);
        dir = s.stop_keep_dir("-KILL").0;
    }
    let s = Server::start_in(dir, &[]);
    for t in ["1", "2", "3"] {
        assert_eq!(s.get(&format!("/get/t{t}")).status, 200, "written with -threads {t}");
    }
}

#[test]
fn versions_never_go_backwards_across_restarts_and_deletes() {
    let s = Server::start(&[]);
    let mut last = 0;
    for _ in 0..50 {
        let v = etag(&s.post("/set/k", b"x"));
        assert!(v > last);
        last = v;
    }
    let cached = s.get("/get/k");
    assert_eq!(s.req("DELETE", "/del/k", &[], b"").status, 200);
    let (dir, _) = s.stop_keep_dir("-KILL");
    let s = Server::start_in(dir, &[]);
    let recreated = s.post("/set/k", b"x");
    assert!(etag(&recreated) > last, "{} <= {last}", etag(&recreated));
    // A tag cached before the restart never matches the new value.
    let tag = cached.header("ETag").unwrap();
    assert_eq!(s.req("GET", "/get/k", &[("If-None-Match", &tag)], b"").status, 200);
    let (dir, _) = s.stop_keep_dir("-TERM");
    let s = Server::start_in(dir, &[]);
    assert!(etag(&s.post("/set/k", b"y")) > etag(&recreated));
}

#[test]
fn a_lower_max_num_kv_keeps_every_stored_key() {
    // Quotas off: with -maxNumKV 50 one client's share would be one key.
    let quotas_off = ["-maxKeysPerIP", "0", "-maxKeysPerNet", "0"];
    let s = Server::start(&quotas_off);
    for i in 0..100 {
        assert_eq!(s.post(&format!("/set/k{i}"), b"v").status, 200);
    }
    let (dir, _) = s.stop_keep_dir("-TERM");
    let s = Server::start_in(dir, &[&["-maxNumKV", "50"][..], &quotas_off].concat());
    assert!(s.startup.join("\n").contains("more than -maxNumKV 50"), "{:?}", s.startup);
    for i in 0..100 {
        assert_eq!(s.get(&format!("/get/k{i}")).status, 200, "k{i} dropped");
    }
    assert_eq!(s.post("/set/new", b"v").status, 507);
    assert_eq!(s.post("/set/k1", b"updated").status, 200, "updates still work");
    for i in 0..51 {
        assert_eq!(s.req("DELETE", &format!("/del/k{i}"), &[], b"").status, 200);
    }
    assert_eq!(s.post("/set/new", b"v").status, 200, "room again below the limit");
    let (dir, _) = s.stop_keep_dir("-TERM");
    let s = Server::start_in(dir, &[&["-maxNumKV", "50"][..], &quotas_off].concat());
    assert_eq!(s.get("/get/k99").status, 200);
}

#[test]
fn sigterm_during_a_snapshot_gives_it_up_and_shuts_down() {
    let s = Server::start(&["-threads", "2"]);
    for i in 0..100 {
        assert_eq!(s.post(&format!("/set/k{i}"), b"v").status, 200);
    }
    // A snapshot that cannot finish: one core is stopped, so it never sends
    // its copy.
    let frozen = Frozen::core(s.pid(), 1);
    s.signal("-HUP");
    s.wait_log("writing a snapshot now", Duration::from_secs(10));
    s.signal("-TERM");
    s.wait_log("the snapshot being written is given up", Duration::from_secs(10));
    drop(frozen);
    s.wait_log("shutdown complete", Duration::from_secs(30));
    let (dir, status) = s.stop_keep_dir("-TERM");
    assert!(status.success(), "{status:?}");
    // The shutdown's own snapshot was saved ("shutdown complete" says so),
    // no temp file is left, and every key is back after a restart.
    let left: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("tmp"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
    let s = Server::start_in(dir, &["-threads", "2"]);
    assert_eq!(s.metric("rendezvous_keys"), Some(100.0));
    assert_eq!(s.get("/get/k99").text(), "v");
}

#[test]
fn signals_snapshot_drain_and_cut_short() {
    let mut s = Server::start(&["-shutdownTimeout", "30s", "-threads", "2"]);
    assert_eq!(s.post("/set/k", b"v").status, 200);
    // SIGHUP and SIGUSR1: a snapshot now, and the server keeps running.
    for sig in ["-HUP", "-USR1"] {
        s.log_lines();
        s.signal(sig);
        s.wait_log("writing a snapshot now", Duration::from_secs(10));
        s.wait_log("snapshot saved", Duration::from_secs(10));
        assert!(s.alive(), "{sig} killed the server");
        assert_eq!(s.get("/get/k").status, 200);
    }
    // A parked blocking read is answered 503 the moment the drain starts,
    // though -shutdownTimeout is 30 s.
    let waiter = {
        let addr = s.addr;
        std::thread::spawn(move || {
            let mut c = Client::connect(addr);
            let started = Instant::now();
            let r = c.req("GET", "/get/absent?wait=60s", &[], b"");
            (r.status, started.elapsed())
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    // A request that will not finish by itself: half a body.
    let mut slow = s.client();
    slow.send_raw(b"POST /set/slow HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nonly-some");
    std::thread::sleep(Duration::from_millis(200));
    s.signal("-TERM");
    let (status, waited) = waiter.join().unwrap();
    assert_eq!(status, 503);
    assert!(waited < Duration::from_secs(10), "the parked read waited {waited:?}");
    s.wait_log("shutting down", Duration::from_secs(5));
    std::thread::sleep(Duration::from_millis(300));
    assert!(s.alive(), "the drain waits for the request in progress");
    // A second signal stops the wait; the final snapshot is still written.
    let started = Instant::now();
    s.signal("-INT");
    let line = s.wait_log("drained", Duration::from_secs(10));
    assert!(line.contains("1 parked blocking reads answered 503"), "{line}");
    s.wait_log("shutdown complete", Duration::from_secs(10));
    let (dir, status) = s.stop_keep_dir("-0");
    assert!(status.success(), "{status:?}");
    assert!(started.elapsed() < Duration::from_secs(10));
    let s = Server::start_in(dir, &[]);
    assert_eq!(s.get("/get/k").body, b"v");
    drop(slow);
}

/// An answer computed before a shutdown but not yet taken by its client
/// is a request still in progress: the drain waits for it to be written
/// (within `-shutdownTimeout`). It used to count only until the answer was
/// encoded, and the process exited halfway through writing it.
#[test]
fn a_shutdown_waits_for_an_answer_still_being_written() {
    let mut s = Server::start(&["-maxValueSize", "60010", "-shutdownTimeout", "20s", "-threads", "1"]);
    assert_eq!(s.post("/set/big", &[b'v'; 60_000]).status, 200);
    // A client with a tiny window, which reads nothing yet.
    let mut slow = Client::slow_reader(s.addr, 2048, Some(536));
    slow.send_raw(&build("GET", "/get/big", &[], b""));
    // Its answer has begun to arrive: computed, and being written.
    slow.wait_first_byte();
    s.signal("-TERM");
    s.wait_log("shutting down", Duration::from_secs(5));
    // Long past the drain of a server with nothing in progress.
    std::thread::sleep(Duration::from_millis(500));
    let r = slow.read_response(false).expect("the whole answer");
    assert_eq!((r.status, r.body.len()), (200, 60_000));
    let status = s.signal_and_wait("-0");
    assert!(status.success(), "{status:?}");
}

#[test]
fn dump_prints_the_store_beside_a_running_server() {
    let s = Server::start(&["-threads", "2"]);
    fill_sample(&s);
    let data = s.dir.path().display().to_string();
    let out = Command::new(BIN).args(["-dump", &data]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 4, "{text}");
    let owned = lines.iter().find(|l| l["key"] == "owned").unwrap();
    assert_eq!((owned["value"].as_str(), owned["owned"].as_bool()), (Some("mine"), Some(true)));
    assert!(owned["version"].as_u64().unwrap() > 0 && owned["expires_ms"].as_u64().unwrap() > 0);
    assert!(lines.iter().any(|l| l["key_hex"] == "62696e00ff" && l["value"] == "\u{0}\u{1}\u{2}"), "{text}");
    assert!(!text.contains("secret"), "{text}");
    // The server was not disturbed.
    assert_eq!(s.post("/set/after-dump", b"v").status, 200);
    let (status, err) = run_to_exit(&["-dump", "/nonexistent-rendezvous-dir"]);
    assert_eq!(status.code(), Some(1));
    assert!(err.contains("/nonexistent-rendezvous-dir"), "{err}");
}

#[test]
fn golden_snapshots_of_every_format_still_load() {
    for format in ["v1", "v2", "v3", "v4"] {
        let dir = TempDir::new();
        let golden = format!("{}/tests/golden/snapshot-{format}.rkyv", env!("CARGO_MANIFEST_DIR"));
        std::fs::copy(golden, dir.path().join("snapshot.rkyv")).unwrap();
        let s = Server::start_in(dir, &["-threads", "3"]);
        assert_eq!(s.get("/get/golden/plain").body, b"hello", "{format}");
        assert_eq!(s.get("/get/ip/192.0.2.1/svc").body, b"192.0.2.1:4000");
        assert_eq!(s.get("/get/golden/expired-long-ago").status, 404);
        assert_eq!(s.post("/set/golden/owned", b"x").status, 403);
        assert_eq!(s.req("POST", "/set/golden/owned", &[("X-Owner-Secret", "golden-secret")], b"x").status, 200);
    }
}

/// kill -9 at random moments while a large store is checkpointed every few
/// ms: every restart succeeds with every key.
#[test]
fn kill_9_during_checkpoints_never_breaks_startup() {
    const KEYS: usize = 20_000;
    let value = vec![b'x'; 900];
    let args = ["-saveDuration", "10ms", "-threads", "2", "-maxKeysPerIP", "0", "-maxKeysPerNet", "0"];
    let s = Server::start(&args);
    let mut c = s.client();
    for i in 0..KEYS {
        assert_eq!(c.req("POST", &format!("/set/big{i}"), &[], &value).status, 200);
    }
    let (mut dir, _) = s.stop_keep_dir("-KILL");
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut mid_write = 0;
    for round in 0..20 {
        let s = Server::start_in(dir, &args);
        let mut c = s.client();
        for i in (0..KEYS).step_by(97) {
            let r = c.req("GET", &format!("/get/big{i}"), &[], b"");
            assert!(r.status == 200 && r.body == value, "round {round} key {i}: {}", r.status);
        }
        let marker = c.req("GET", "/get/marker", &[], b"");
        if round > 0 {
            assert_eq!(marker.text(), (round - 1).to_string(), "round {round}: the last acknowledged marker");
        }
        assert_eq!(c.req("POST", "/set/marker", &[], round.to_string().as_bytes()).status, 200);
        std::thread::sleep(kill_after(&mut seed, 0, 150));
        dir = s.stop_keep_dir("-KILL").0;
        let temp = std::fs::read_dir(dir.path())
            .unwrap()
            .any(|e| e.unwrap().file_name().to_string_lossy().starts_with("snapshot.rkyv.tmp"));
        if temp {
            mid_write += 1;
        }
    }
    eprintln!("{mid_write} of 20 kills landed while a snapshot file was being written");
    assert!(mid_write > 0, "no kill landed during a snapshot write");
    let s = Server::start_in(dir, &args);
    let mut c = s.client();
    let found = (0..KEYS).filter(|i| c.req("GET", &format!("/get/big{i}"), &[], b"").status == 200).count();
    assert_eq!(found, KEYS);
}

/// The same full disk with two cores and clients on both: a write of the
/// other core's key is applied where it arrives only while that core's log
/// works (else it goes to the owner), answers that wait for a failing log go
/// out, and every write acknowledged before, during and after the failure is
/// there after kill -9.
#[test]
#[ignore = "needs root (mounts a tmpfs)"]
fn a_full_disk_with_two_cores_keeps_every_acknowledged_write() {
    let t = TempDir::new();
    let (data, filler, _mounted) = nearly_full_disk(&t);
    let args = ["-threads", "2", "-dataDir", data.to_str().unwrap(), "-maxKeysPerIP", "0", "-maxKeysPerNet", "0"];
    let s = Server::start_in(TempDir::new(), &args);
    let value = vec![b'v'; 1000];
    // Enough connections that both cores serve some.
    let mut clients: Vec<Client> = (0..8).map(|_| s.client()).collect();
    let (mut acked, mut refused) = (Vec::new(), 0);
    for i in 0..600 {
        let r = clients[i % 8].req("POST", &format!("/set/k{i}"), &[], &value);
        match r.status {
            200 => acked.push(i),
            503 => refused += 1,
            other => panic!("k{i}: {other}"),
        }
        // Reads go on, on both cores, whatever the logs do.
        if let Some(&a) = acked.last() {
            assert_eq!(clients[(i + 3) % 8].req("GET", &format!("/get/k{a}"), &[], b"").status, 200);
        }
    }
    assert!(refused > 0 && !acked.is_empty(), "acked {} refused {refused}", acked.len());
    assert!(s.metric("rendezvous_log_failing").unwrap() >= 1.0);
    std::fs::remove_file(&filler).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut after = Vec::new();
    while after.len() < 40 {
        assert!(Instant::now() < deadline, "writes never resumed on both cores");
        let i = after.len();
        if clients[i % 8].req("POST", &format!("/set/after{i}"), &[], b"v").status == 200 {
            after.push(i);
        } else {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let direct: f64 = (0..2).filter_map(|c| s.metric(&format!("rendezvous_direct_writes_total{{core=\"{c}\"}}"))).sum();
    let (_, _) = s.stop_keep_dir("-KILL");
    let s = Server::start_in(TempDir::new(), &args);
    for i in &acked {
        assert_eq!(s.get(&format!("/get/k{i}")).status, 200, "acknowledged k{i} lost");
    }
    for i in &after {
        assert_eq!(s.get(&format!("/get/after{i}")).status, 200, "acknowledged after{i} lost");
    }
    eprintln!("{} acknowledged, {refused} refused, {direct} direct writes", acked.len());
}

/// A file-size limit (systemd's LimitFSIZE=) moves the log to new segments
/// instead of killing the process (SIGXFSZ is ignored); a snapshot too big
/// for the limit fails and is counted, and the server runs on.
#[test]
fn a_file_size_limit_does_not_kill_the_server() {
    let dir = TempDir::new();
    let mut s = Server::start_wrapped(dir, &["prlimit", "--fsize=65536", "--"], &["-threads", "1"]);
    let value = vec![b'v'; 900];
    for i in 0..300 {
        assert_eq!(s.post(&format!("/set/k{i}"), &value).status, 200, "k{i}");
    }
    assert!(segments(s.dir.path()).len() >= 4, "the log moved on to new segments");
    s.log_lines();
    s.signal("-HUP");
    s.wait_log("snapshot in", Duration::from_secs(10));
    assert!(s.alive());
    assert_eq!(s.metric("rendezvous_snapshot_failures_total"), Some(1.0));
    let (dir, _) = s.stop_keep_dir("-KILL");
    let s = Server::start_in(dir, &[]);
    for i in (0..300).step_by(7) {
        assert_eq!(s.get(&format!("/get/k{i}")).body, value);
    }
}

fn mount_tmpfs(dir: &std::path::Path, opts: &str) -> bool {
    Command::new("mount").args(["-t", "tmpfs", "-o", opts, "tmpfs"]).arg(dir).status().is_ok_and(|s| s.success())
}

struct Mounted(std::path::PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// A 1 MB tmpfs under `t` with about 200 KB free: the data directory, the
/// filler file to remove for room, and the mount (unmounted on drop).
fn nearly_full_disk(t: &TempDir) -> (std::path::PathBuf, std::path::PathBuf, Mounted) {
    let data = t.path().join("data");
    std::fs::create_dir(&data).unwrap();
    assert!(mount_tmpfs(&data, "size=1m,mode=0700"), "mount needs root: run as root (CI does)");
    let mounted = Mounted(data.clone());
    let filler = data.join("filler");
    std::fs::write(&filler, vec![0u8; 800 * 1024]).unwrap();
    (data, filler, mounted)
}

/// A full disk: writes get 503 with Retry-After, nothing refused is lost or
/// half-applied, reads go on, a metric says why, and writes resume by
/// themselves once there is room. A read-only directory is refused at
/// startup.
#[test]
#[ignore = "needs root (mounts a tmpfs)"]
fn a_full_disk_refuses_writes_and_recovers() {
    let t = TempDir::new();
    let (data, filler, _mounted) = nearly_full_disk(&t);
    let s = Server::start_in(TempDir::new(), &["-threads", "1", "-dataDir", data.to_str().unwrap()]);
    let value = vec![b'v'; 1000];
    let mut acked = Vec::new();
    let mut refused = 0;
    for i in 0..600 {
        let r = s.post(&format!("/set/k{i}"), &value);
        match r.status {
            200 => acked.push(i),
            503 => {
                assert_eq!(r.header("Retry-After").as_deref(), Some("1"));
                refused += 1;
            }
            other => panic!("k{i}: {other}"),
        }
    }
    assert!(refused > 0 && !acked.is_empty(), "acked {} refused {refused}", acked.len());
    assert_eq!(s.metric("rendezvous_log_failing"), Some(1.0));
    assert!(s.metric("rendezvous_log_failures_total").unwrap() >= 1.0);
    // Reads go on.
    assert_eq!(s.get(&format!("/get/k{}", acked[0])).status, 200);
    // Retries (one a second) reuse one segment for their copies: a new
    // file per retry would pile up for as long as the disk stays full.
    let failures = s.metric("rendezvous_log_failures_total").unwrap();
    let files = segments(&data).len();
    let deadline = Instant::now() + Duration::from_secs(15);
    while s.metric("rendezvous_log_failures_total").unwrap() < failures + 3.0 {
        assert!(Instant::now() < deadline, "the retries stopped");
        std::thread::sleep(Duration::from_millis(100));
    }
    let after = segments(&data).len();
    assert!(after <= files + 1, "{files} segments before three failed retries, {after} after");
    // Room again: writes resume within a retry period or two.
    std::fs::remove_file(&filler).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while s.post("/set/after", b"v").status != 200 {
        assert!(Instant::now() < deadline, "writes never resumed");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(s.metric("rendezvous_log_failing"), Some(0.0));
    let (_, _) = s.stop_keep_dir("-KILL");
    let s = Server::start_in(TempDir::new(), &["-threads", "1", "-dataDir", data.to_str().unwrap()]);
    for i in &acked {
        assert_eq!(s.get(&format!("/get/k{i}")).status, 200, "acknowledged k{i} lost");
    }
    assert_eq!(s.get("/get/after").status, 200);
    drop(s);

    // Read-only: refused at startup, naming the directory.
    let ro = t.path().join("ro");
    std::fs::create_dir(&ro).unwrap();
    assert!(mount_tmpfs(&ro, "size=1m,ro"));
    let _ro = Mounted(ro.clone());
    let (status, err) =
        run_to_exit(&["-l", "127.0.0.1", "-port", "0", "-metricsAddr", "", "-dataDir", ro.to_str().unwrap()]);
    assert_eq!(status.code(), Some(1));
    assert!(err.contains(ro.to_str().unwrap()), "{err}");
}

/// A file in the data directory that no server writes stops startup with a
/// message naming it, never a hang or a read without end: a FIFO as the
/// snapshot or a segment, a segment that is `/dev/zero` behind a symlink,
/// a 64 GiB (sparse) `SECRET`, a segment number whose successor would
/// overflow.
#[test]
fn special_files_in_the_data_directory_stop_startup_with_a_message() {
    let fifo = |path: &std::path::Path| {
        let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path; mkfifo only creates a file.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "{}", std::io::Error::last_os_error());
    };
    let refused = |setup: &dyn Fn(&std::path::Path), name: &str, why: &str| {
        let t = TempDir::new();
        setup(t.path());
        let data = t.path().display().to_string();
        let started = Instant::now();
        let (status, err) = run_to_exit(&["-l", "127.0.0.1", "-port", "0", "-metricsAddr", "", "-dataDir", &data]);
        assert_eq!(status.code(), Some(1), "{name}: {err}");
        assert!(err.contains(name) && err.contains(why), "{name}: {err}");
        assert!(started.elapsed() < Duration::from_secs(10), "{name}: refused at once, not after a read");
    };
    refused(&|d| fifo(&d.join("snapshot.rkyv")), "snapshot.rkyv", "not a regular file");
    refused(&|d| fifo(&d.join("0000000000000000-0000.wal")), "0000000000000000-0000.wal", "not a regular file");
    refused(
        &|d| std::os::unix::fs::symlink("/dev/zero", d.join("0000000000000000-0000.wal")).unwrap(),
        "0000000000000000-0000.wal",
        "not a regular file",
    );
    refused(
        &|d| std::fs::File::create(d.join("SECRET")).unwrap().set_len(64 << 30).unwrap(),
        "SECRET",
        "not a 32-byte key",
    );
    refused(
        &|d| drop(std::fs::File::create(d.join("ffffffffffffffff-0000.wal")).unwrap()),
        "ffffffffffffffff-0000.wal",
        "a number no server makes",
    );
}

/// Startup syncs every segment it replayed before it serves: what a killed
/// `everysec` process acknowledged may be in the page cache only, and a
/// power loss after the restart must not take it while newer, synced
/// records survive.
#[test]
#[ignore = "needs strace"]
fn startup_syncs_the_segments_it_replays() {
    require("strace");
    let (dir, seg) = killed_after_twenty_writes(b"v");
    let trace = dir.path().join("startup.trace");
    let (trace_arg, seg_arg) = (trace.display().to_string(), seg.display().to_string());
    let wrapper =
        ["strace", "-f", "-qq", "--seccomp-bpf", "-o", &trace_arg, "-P", &seg_arg, "-e", "trace=fsync,fdatasync", "--"];
    let s = Server::start_wrapped(dir, &wrapper, &["-threads", "1"]);
    assert_eq!(s.get("/get/k19").status, 200);
    let calls = std::fs::read_to_string(&trace).unwrap();
    assert!(calls.contains("fdatasync(") || calls.contains("fsync("), "{seg_arg} was not synced: {calls}");
}

/// A lost snapshot stops startup: the log that follows a checkpoint no
/// longer holds the keys the checkpoint's snapshot had, and serving the
/// rest would drop them silently.
#[test]
fn a_missing_snapshot_behind_a_checkpointed_log_stops_startup() {
    let s = Server::start(&["-threads", "1"]);
    assert_eq!(s.post("/set/before", b"in the snapshot only").status, 200);
    s.signal("-HUP");
    s.wait_log("snapshot saved", Duration::from_secs(10));
    assert_eq!(s.post("/set/after", b"in the log").status, 200);
    let (dir, _) = s.stop_keep_dir("-KILL");
    std::fs::remove_file(dir.path().join("snapshot.rkyv")).unwrap();
    let first = segments(dir.path()).into_iter().next().unwrap();
    let data = dir.path().display().to_string();
    let (status, err) = run_to_exit(&["-l", "127.0.0.1", "-port", "0", "-metricsAddr", "", "-dataDir", &data]);
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("there is no snapshot.rkyv") && err.contains(&first.display().to_string()), "{err}");
    // Moving the segments out, as the message says, starts an empty store.
    for seg in segments(dir.path()) {
        std::fs::remove_file(seg).unwrap();
    }
    let s = Server::start_in(dir, &["-threads", "1"]);
    assert_eq!(s.get("/get/after").status, 404);
}
