//! Snapshot costs: `cargo bench --bench snapshot`.
//!
//! 1. Save (encode + write + fsync + rename) and load (read + verify +
//!    validate + decode) time and file size for 100k and 1M entries with
//!    100 B and 1000 B values, through the library the server uses.
//! 2. GET latency (wrk, p50/p99) against a server holding 1M entries while
//!    it snapshots continuously (`-saveDuration 1s`), versus the same server
//!    with snapshots off. Needs wrk (Debian package).
//!
//! Results: `benches/results/snapshot.md`. `BENCH_QUICK=1` skips part 2.

use rendezvous::persist::snapshot;
use rendezvous::state::secret::SecretKey;
use rendezvous::state::shard::Entry;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_rendezvous");
const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn entries(n: usize, value_len: usize) -> Vec<Vec<Entry>> {
    let value = vec![b'v'; value_len];
    let per = n / 2;
    (0..2)
        .map(|c| {
            (0..per)
                .map(|i| Entry::new(format!("key-{c}-{i}").as_bytes(), &value, None, u64::MAX / 2).unwrap())
                .collect()
        })
        .collect()
}

fn save_load(dir: &std::path::Path, n: usize, value_len: usize) -> String {
    let key = SecretKey::from_bytes([1; 32]);
    let path = dir.join(format!("bench-{n}-{value_len}.rkyv"));
    let shards = entries(n, value_len);
    let t = Instant::now();
    let bytes = snapshot::encode(&key, shards, 0).unwrap();
    let encode = t.elapsed();
    let t = Instant::now();
    snapshot::write_atomic(&path, &bytes).unwrap();
    let write = t.elapsed();
    let size = bytes.len();
    drop(bytes);
    let t = Instant::now();
    let loaded = snapshot::load(&path).unwrap().unwrap();
    let load = t.elapsed();
    assert_eq!(loaded.entries.len(), n / 2 * 2);
    let _ = std::fs::remove_file(&path);
    let row = format!(
        "| {n} | {value_len} B | {:.1} MiB | {:.0} ms | {:.0} ms | {:.0} ms |\n",
        size as f64 / 1048576.0,
        encode.as_secs_f64() * 1e3,
        write.as_secs_f64() * 1e3,
        load.as_secs_f64() * 1e3
    );
    eprint!("{row}");
    row
}

struct Server {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(args: &[&str]) -> Server {
    let mut child = Command::new(BIN)
        .args(["-l", "127.0.0.1", "-port", "0", "-metricsAddr", "", "-threads", "2", "-disableLocalIPWarning"])
        .args(["-maxRequests", "1000000000", "-maxNumKV", "1100000"])
        .args(args)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    loop {
        let Some(Ok(line)) = lines.next() else {
            let _ = child.kill();
            let _ = child.wait();
            panic!("server did not start");
        };
        if let Some(rest) = line.split("listening on http://").nth(1) {
            let addr = rest.split_whitespace().next().unwrap().parse().unwrap();
            std::thread::spawn(move || {
                for l in lines.map_while(Result::ok) {
                    if l.contains("snapshot saved") {
                        eprintln!("  {l}");
                    }
                }
            });
            return Server { child, addr };
        }
    }
}

/// Pipelined sets of `count` keys ("key-<i>", 100 B values).
fn fill(addr: SocketAddr, count: usize) {
    let mut s = TcpStream::connect(addr).unwrap();
    let value = [b'v'; 100];
    let mut buf = vec![0u8; 1 << 16];
    let mut i = 0;
    while i < count {
        let mut batch = Vec::new();
        let start = i;
        while i < count && i - start < 512 {
            batch.extend_from_slice(format!("POST /set/key-{i} HTTP/1.1\r\nContent-Length: 100\r\n\r\n").as_bytes());
            batch.extend_from_slice(&value);
            i += 1;
        }
        s.write_all(&batch).unwrap();
        let mut seen = 0;
        let mut carry = Vec::new();
        while seen < i - start {
            let n = s.read(&mut buf).unwrap();
            carry.extend_from_slice(&buf[..n]);
            while let Some(p) = carry.windows(12).position(|w| w == b"HTTP/1.1 200") {
                seen += 1;
                carry.drain(..p + 12);
            }
        }
    }
}

fn wrk_latency(addr: SocketAddr, secs: u64) -> (f64, f64, f64) {
    let common = std::fs::read_to_string(format!("{ROOT}/benches/wrk/common.lua")).unwrap();
    let body = r#"
local pool = {}
for i = 0, 4095 do pool[#pool + 1] = req("GET", "/get/key-" .. (i * 7919 % 1000000)) end
request = pool_request(pool)
"#;
    let path = std::env::temp_dir().join("rdvz-bench-snapshot.lua");
    std::fs::write(&path, format!("{common}\n{body}")).unwrap();
    let out = Command::new("wrk")
        .args(["-t1", "-c32", &format!("-d{secs}s"), "-s"])
        .arg(&path)
        .arg(format!("http://{addr}"))
        .output()
        .expect("wrk (apt-get install wrk)");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().find(|l| l.starts_with("{\"requests\"")).unwrap_or_else(|| panic!("{text}"));
    let field = |k: &str| -> f64 {
        let pat = format!("\"{k}\":");
        let s = &line[line.find(&pat).unwrap() + pat.len()..];
        s.split([',', '}']).next().unwrap().parse().unwrap()
    };
    (field("requests") / secs as f64, field("p50_us"), field("p99_us"))
}

fn main() {
    let dir = std::env::temp_dir().join(format!("rdvz-bench-snap-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut md = String::from(
        "# Snapshot benchmark\n\n## Save and load\n\nEncode (rkyv), write (temp file, fsync, rename, fsync dir), \
         load (read, checksum, bytecheck validation, decode into entries).\n\n\
         | entries | value | file | encode | write | load |\n|---:|---:|---:|---:|---:|---:|\n",
    );
    for (n, v) in [(100_000, 100), (100_000, 1000), (1_000_000, 100), (1_000_000, 1000)] {
        md += &save_load(&dir, n, v);
    }
    if std::env::var("BENCH_QUICK").is_err() {
        md += "\n## GET latency while snapshotting 1M entries\n\nwrk -t1 -c32, 20 s, GETs of random keys among \
               1,000,000 (100 B values), -threads 2.\n\n| server | req/s | p50 | p99 |\n|---|---:|---:|---:|\n";
        for (label, args) in [
            ("snapshots off", vec!["-dataDir".to_string(), String::new()]),
            (
                "snapshot every 1 s (continuously)",
                vec![
                    "-dataDir".into(),
                    dir.join("live.rkyv").display().to_string(),
                    "-saveDuration".into(),
                    "1s".into(),
                ],
            ),
        ] {
            let refs: Vec<&str> = args.iter().map(String::as_str).collect();
            let s = start(&refs);
            let t = Instant::now();
            fill(s.addr, 1_000_000);
            eprintln!("filled 1M keys in {:?}", t.elapsed());
            std::thread::sleep(Duration::from_secs(2));
            let (rps, p50, p99) = wrk_latency(s.addr, 20);
            eprintln!("{label}: {rps:.0} req/s p50 {p50} us p99 {p99} us");
            md += &format!("| {label} | {rps:.0} | {p50:.0} us | {p99:.0} us |\n");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    let out = format!("{ROOT}/benches/results");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(format!("{out}/snapshot.md"), &md).unwrap();
    println!("{md}");
}
