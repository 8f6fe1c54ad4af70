//! Persistence benchmarks: `cargo bench --bench persist`.
//!
//! 1. The cost of the write-ahead log: set 16 B and 1000 B (wrk -t1 -c64,
//!    -threads 2) with persistence off and with `-fsync no`, `everysec`,
//!    `always`, the four alternated for several rounds in one run; the
//!    median CPU per request and req/s, with min-max, and each mode's
//!    ratio to "off" (`always` also reports its p99).
//! 2. Restart time for 1M keys in a snapshot plus 1M log records after it.
//! 3. Peak memory while a snapshot is written and while starting from one,
//!    against the steady RSS of the same store (200k x 1000 B, 1M x 100 B).
//!
//! Results: `benches/results/persist.md`. Environment: `BENCH_SECONDS`
//! (default 5) per wrk run, `BENCH_ROUNDS` (default 5), `BENCH_QUICK=1`
//! for a smoke run (1 round of 1 s, small stores) that checks the harness.

#[path = "../tests/common/mod.rs"]
mod common;
mod load;

use common::{Server, TempDir};
use load::{fill, fill_from, need, peak_rss_bytes, reset_peak_rss, rss_bytes, spread, wrk, Run};
use std::time::{Duration, Instant};

const MODES: [&str; 4] = ["off", "no", "everysec", "always"];

/// Millions of keys from one loopback client: far over its key quota, so
/// quotas are off (their cost is measured by the e2e bench's public-traffic
/// workload, with many clients).
const BIG: [&str; 10] =
    ["-threads", "2", "-metricsAddr", "", "-maxNumKV", "3000000", "-maxKeysPerIP", "0", "-maxKeysPerNet", "0"];

fn start(mode: &str, extra: &[&str]) -> Server {
    let mut args: Vec<&str> = BIG.to_vec();
    if mode == "off" {
        args.extend(["-dataDir", ""]);
    } else {
        args.extend(["-fsync", mode]);
    }
    args.extend_from_slice(extra);
    Server::start(&args)
}

fn mib(b: u64) -> f64 {
    b as f64 / 1048576.0
}

/// Waits for the log line of a finished snapshot after `since` lines.
fn await_snapshot(s: &Server) -> String {
    s.wait_log("snapshot saved", Duration::from_secs(300))
}

fn main() {
    need("wrk");
    let quick = std::env::var("BENCH_QUICK").is_ok();
    let secs: u64 = load::env_or("BENCH_SECONDS", if quick { 1 } else { 5 });
    let rounds: usize = load::env_or("BENCH_ROUNDS", if quick { 1 } else { 5 });
    let mut md = String::from("# Persistence benchmark\n\n");
    // BENCH_ONLY=log|restart|memory runs one part.
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    let part = |name: &str| only.is_empty() || only == name;

    // --- 1. The log's cost, modes alternated round by round ---
    let mut results: Vec<Vec<Vec<Run>>> = vec![vec![Vec::new(); MODES.len()]; 2];
    for round in 0..if part("log") { rounds } else { 0 } {
        for (m, mode) in MODES.iter().enumerate() {
            let s = start(mode, &[]);
            fill(s.addr, "key-", 10_000, 16);
            let pid = [s.pid()];
            for (w, script) in ["set16", "set1000"].iter().enumerate() {
                let r = wrk(&format!("round {round} {script} {mode}"), script, s.addr, &pid, 64, secs);
                results[w][m].push(r);
            }
        }
    }
    if part("log") {
        md += &format!(
        "## The write-ahead log's cost\n\nwrk -t1 -c64, {secs} s per run, -threads 2, {rounds} rounds with the four \
         modes alternated; medians with min-max. CPU is the server's user+system time per request.\n\n\
         | workload | mode | req/s | CPU us/req | CPU vs off | p50 | p99 |\n|---|---|---:|---:|---:|---:|---:|\n"
    );
        for (w, name) in ["set 16 B", "set 1000 B"].iter().enumerate() {
            let off_cpu = spread(results[w][0].iter().map(|r| r.cpu_us_per_req).collect()).0;
            for (m, mode) in MODES.iter().enumerate() {
                let runs = &results[w][m];
                let (rps, rps_lo, rps_hi) = spread(runs.iter().map(|r| r.rps).collect());
                let (cpu, cpu_lo, cpu_hi) = spread(runs.iter().map(|r| r.cpu_us_per_req).collect());
                // The ratio per round (same round, same machine state), then its median.
                let ratios: Vec<f64> =
                    runs.iter().zip(&results[w][0]).map(|(r, o)| r.cpu_us_per_req / o.cpu_us_per_req).collect();
                let (ratio, r_lo, r_hi) = spread(ratios);
                let p50 = spread(runs.iter().map(|r| r.p50_us).collect()).0;
                let p99 = spread(runs.iter().map(|r| r.p99_us).collect()).0;
                md += &format!(
                    "| {name} | {mode} | {rps:.0} ({rps_lo:.0}-{rps_hi:.0}) | {cpu:.1} ({cpu_lo:.1}-{cpu_hi:.1}) | \
                 {ratio:.2}x ({r_lo:.2}-{r_hi:.2}) | {p50:.0} us | {p99:.0} us |\n"
                );
                let _ = off_cpu;
            }
        }
    }

    // --- 2. Restart time: 1M keys in a snapshot + 1M log records ---
    if part("restart") {
        let keys = if quick { 50_000 } else { 1_000_000 };
        let s = start("everysec", &[]);
        let t = Instant::now();
        fill(s.addr, "k", keys, 100);
        eprintln!("filled {keys} keys in {:?}", t.elapsed());
        s.log_lines();
        s.signal("-HUP");
        let saved = await_snapshot(&s);
        eprintln!("{saved}");
        // One log record per key after the snapshot.
        fill_from(s.addr, "k", 0, keys, 100);
        let steady = rss_bytes(s.pid());
        let (dir, _) = s.stop_keep_dir("-KILL");
        let log_bytes: u64 = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.path().extension().is_some_and(|x| x == "wal"))
            .map(|e| e.metadata().map(|m| m.len()).unwrap_or(0))
            .sum();
        let t = Instant::now();
        let s = Server::start_in(dir, &BIG);
        let restart = t.elapsed();
        let recovered = s.startup.iter().find(|l| l.contains("recovered")).cloned().unwrap_or_default();
        let start_peak = peak_rss_bytes(s.pid());
        eprintln!("restart {restart:?}: {recovered}");
        md += &format!(
            "\n## Restart\n\n{keys} keys of 100 B in a snapshot, then {keys} log records ({:.0} MiB of log) \
         after it, then kill -9: start to listening in **{:.2} s** ({recovered}). Peak RSS while starting \
         {:.0} MiB against {:.0} MiB steady before the kill ({:.2}x).\n",
            mib(log_bytes),
            restart.as_secs_f64(),
            mib(start_peak),
            mib(steady),
            start_peak as f64 / steady as f64
        );
        drop(s);
    }

    // --- 3. Peak memory while snapshotting and while starting ---
    if part("memory") {
        md += "\n## Memory while snapshotting and starting\n\n| store | steady RSS | peak while writing a snapshot | \
           ratio | peak while starting from it | ratio |\n|---|---:|---:|---:|---:|---:|\n";
        let sizes: &[(usize, usize)] =
            if quick { &[(20_000, 1000), (100_000, 100)] } else { &[(200_000, 1000), (1_000_000, 100)] };
        for &(n, v) in sizes {
            let s = start("everysec", &[]);
            fill(s.addr, "m", n, v);
            // Let the log settle, then measure the steady state.
            std::thread::sleep(Duration::from_millis(1500));
            let pid = s.pid();
            let steady = rss_bytes(pid);
            reset_peak_rss(pid);
            s.log_lines();
            s.signal("-HUP");
            let line = await_snapshot(&s);
            let snap_peak = peak_rss_bytes(pid);
            let (dir, _) = s.stop_keep_dir("-TERM");
            let s = Server::start_in(dir, &BIG);
            let start_peak = peak_rss_bytes(s.pid());
            eprintln!(
                "{n} x {v} B: steady {:.0} MiB, snapshot peak {:.0} MiB ({line}), start peak {:.0} MiB",
                mib(steady),
                mib(snap_peak),
                mib(start_peak)
            );
            md += &format!(
                "| {n} x {v} B | {:.0} MiB | {:.0} MiB | {:.2}x | {:.0} MiB | {:.2}x |\n",
                mib(steady),
                mib(snap_peak),
                snap_peak as f64 / steady as f64,
                mib(start_peak),
                start_peak as f64 / steady as f64
            );
        }
    }
    let _ = TempDir::new;

    let dir = format!("{}/benches/results", load::ROOT);
    std::fs::create_dir_all(&dir).unwrap();
    if !quick && only.is_empty() {
        std::fs::write(format!("{dir}/persist.md"), &md).unwrap();
    }
    println!("{md}");
}
