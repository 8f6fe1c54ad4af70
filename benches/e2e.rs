//! End-to-end load benchmark against nginx: `cargo bench --bench e2e`.
//!
//! The protocol holds on a noisy 2-core machine: the server (release build,
//! `-threads 2`, write-ahead log and snapshots on with their defaults,
//! metrics on) and nginx (`return 200 "OK"`, 2 workers) run side by side,
//! and every workload alternates between them for `BENCH_ROUNDS` rounds
//! (default 5; the order flips each round), with the same wrk client, Lua
//! script and connection count (wrk -t1 -c64). Each round gives the
//! server's CPU per request over nginx's, its req/s over nginx's and its p99
//! over nginx's; the report gives each ratio's median and min-max, plus the
//! server's cross-core messages per request (from its own counters).
//!
//! Workloads: GET hit and set 1000 B over 10k keys from 4096 clients; the
//! public-traffic workloads, GET and set over 1M keys with client addresses
//! drawn from 65,536 and from 1M addresses through the trusted-proxy
//! `X-Forwarded-For` path; one client far over its rate limit (429s); a
//! connection per request; 16 pipelined GETs and sets; GET hit paced (each connection
//! waits 1 ms after each answer: about 40k req/s, below saturation, where
//! the p99 is the server's and not the scheduler's). Also GET hit and set 1000 B at `-threads 1`
//! and `2` (the cost of the cross-core hops), and the memory per entry
//! beyond key and value, with key quotas off, with keys from 65,536 clients,
//! and with every key from its own /48 (the quota tables' worst case).
//!
//! Results: `benches/results/e2e.md`, written by a full run only (a smoke
//! run or a `BENCH_ONLY` run just prints). The file's history, below its
//! `<!-- history -->` line, is kept, and the run a new one replaces moves
//! into it. Environment: `BENCH_SECONDS`
//! (default 5) per run, `BENCH_ROUNDS`, `BENCH_CONNECTIONS` (default 64),
//! `BENCH_ONLY=<workload name prefixes, comma-separated>|memory`,
//! `BENCH_SERVER_ARGS` (extra server flags, e.g. `-schedPolicy normal`;
//! such a run just prints too), `BENCH_QUICK=1` for a smoke run (1 round of 1 s, 10k public keys, no
//! memory runs) that checks the harness, not the figures.

#[path = "../tests/common/mod.rs"]
mod common;
mod load;

use common::Server;
use load::{env_or, family, fill, fill_as, need, rss_bytes, scrape, spread, start_nginx, wrk_env, Run};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// The public workloads' key space.
const PUBLIC_KEYS: usize = 1_000_000;

/// Which server a workload runs against.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Target {
    /// `-threads 2`, everything at its default but the rate limit.
    Main,
    /// The same with `-maxRequests 17`: one client is refused.
    Limited,
    /// `-threads 1`.
    OneThread,
}

struct Workload {
    name: &'static str,
    script: &'static str,
    env: Vec<(&'static str, String)>,
    target: Target,
    /// The status every server answer must have (the harness check).
    expect: &'static str,
}

/// One workload's rounds.
struct Rounds {
    name: &'static str,
    server: Vec<Run>,
    nginx: Vec<Run>,
    cross_core: Vec<f64>,
    /// Write-ahead log writes per request (how well changes share a write).
    log_writes: Vec<f64>,
}

struct Servers {
    main: Server,
    limited: Server,
    one: Server,
}

impl Servers {
    fn get(&self, t: Target) -> &Server {
        match t {
            Target::Main => &self.main,
            Target::Limited => &self.limited,
            Target::OneThread => &self.one,
        }
    }
}

/// An address among 65,536 clients in 256 IPv4 /24s.
fn spread_client(i: usize) -> String {
    let j = i % 65_536;
    format!("100.64.{}.{}", j / 256, j % 256)
}

/// The server as an operator runs it: log and snapshots on, metrics on.
fn start(threads: &str, extra: &[&str]) -> Server {
    let mut args = vec!["-threads", threads, "-maxNumKV", "3000000", "-maxTrackedIPs", "4000000"];
    args.extend_from_slice(extra);
    // `BENCH_SERVER_ARGS` (space-separated) measures another setting, e.g.
    // `-schedPolicy normal`, against the same nginx.
    let more = std::env::var("BENCH_SERVER_ARGS").unwrap_or_default();
    args.extend(more.split_whitespace());
    // The default placement (the tests' helper spreads connections).
    if !args.contains(&"-placement") {
        args.extend(["-placement", "pack"]);
    }
    Server::start(&args)
}

/// Cross-core messages, requests and log writes so far.
fn traffic(metrics: Option<SocketAddr>) -> (f64, f64, f64) {
    let Some(m) = metrics else { return (0.0, 0.0, 0.0) };
    (
        scrape(m, "rendezvous_cross_core_messages_total"),
        scrape(m, "rendezvous_core_requests_total"),
        scrape(m, "rendezvous_log_writes_total"),
    )
}

fn main() {
    need("wrk");
    need("nginx");
    let quick = std::env::var("BENCH_QUICK").is_ok();
    let secs: u64 = if quick { 1 } else { env_or("BENCH_SECONDS", 5) };
    let rounds: usize = if quick { 1 } else { env_or("BENCH_ROUNDS", 5) };
    let conns: usize = env_or("BENCH_CONNECTIONS", 64);
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    let public_keys = if quick { 10_000 } else { PUBLIC_KEYS };

    if only == "memory" {
        write_report(&[], &memory_runs(), secs, rounds, conns);
        return;
    }

    let nginx_dir = common::TempDir::new();
    let (nginx, nginx_addr) = start_nginx(nginx_dir.path(), 2);
    let nginx_pids = family(nginx.pid());

    let servers = Servers {
        main: start("2", &[]),
        limited: start("2", &["-maxRequests", "17", "-resetDuration", "1h"]),
        one: start("1", &[]),
    };
    for s in [&servers.main, &servers.one] {
        fill_as(s.addr, "key-", 0, 10_000, 100, Some(spread_client));
        fill(s.addr, "hot", 1, 1);
    }
    fill_as(servers.main.addr, "pub-", 0, public_keys, 100, Some(spread_client));

    let public = |op: &str, addrs: usize| {
        vec![("RDVZ_OP", op.to_string()), ("RDVZ_KEYS", public_keys.to_string()), ("RDVZ_ADDRS", addrs.to_string())]
    };
    let public_addrs = if quick { 4096 } else { 1_000_000 };
    let workloads = vec![
        Workload { name: "GET hit", script: "get_hit", env: vec![], target: Target::Main, expect: "200" },
        Workload {
            name: "public GET, 65,536 clients",
            script: "public",
            env: public("get", 65_536),
            target: Target::Main,
            expect: "200",
        },
        Workload {
            name: "public GET, 1M clients",
            script: "public",
            env: public("get", public_addrs),
            target: Target::Main,
            expect: "200",
        },
        Workload {
            name: "public set 100 B, 65,536 clients",
            script: "public",
            env: public("set", 65_536),
            target: Target::Main,
            expect: "200",
        },
        Workload {
            name: "GET hit, paced (64 x 1 per ms)",
            script: "get_hit",
            env: vec![("RDVZ_DELAY_MS", "1".to_string())],
            target: Target::Main,
            expect: "200",
        },
        Workload { name: "set 1000 B", script: "set1000", env: vec![], target: Target::Main, expect: "200" },
        Workload {
            name: "429 (one client over its limit)",
            script: "ratelimited",
            env: vec![],
            target: Target::Limited,
            expect: "429",
        },
        Workload {
            name: "connection per request",
            script: "conn_close",
            env: vec![],
            target: Target::Main,
            expect: "200",
        },
        Workload { name: "pipelined GET x16", script: "pipeline16", env: vec![], target: Target::Main, expect: "200" },
        Workload {
            name: "pipelined set 100 B x16",
            script: "pipeline16_set",
            env: vec![],
            target: Target::Main,
            expect: "200",
        },
        Workload {
            name: "GET hit, -threads 1",
            script: "get_hit",
            env: vec![],
            target: Target::OneThread,
            expect: "200",
        },
        Workload {
            name: "set 1000 B, -threads 1",
            script: "set1000",
            env: vec![],
            target: Target::OneThread,
            expect: "200",
        },
    ];
    let mut results: Vec<Rounds> = Vec::new();
    let wanted = |w: &&Workload| only.is_empty() || only.split(',').any(|o| w.name.starts_with(o));
    for w in workloads.iter().filter(wanted) {
        let server = servers.get(w.target);
        let mut r = Rounds {
            name: w.name,
            server: Vec::new(),
            nginx: Vec::new(),
            cross_core: Vec::new(),
            log_writes: Vec::new(),
        };
        for round in 0..rounds {
            let run_server = |r: &mut Rounds| {
                let (sent0, req0, logw0) = traffic(server.metrics);
                let run = wrk_env(
                    &format!("{} (server, round {round})", w.name),
                    w.script,
                    server.addr,
                    &[server.pid()],
                    conns,
                    secs,
                    &w.env,
                );
                // Each core publishes its traffic counts every 100 ms.
                std::thread::sleep(Duration::from_millis(300));
                let (sent1, req1, logw1) = traffic(server.metrics);
                r.cross_core.push((sent1 - sent0) / (req1 - req0).max(1.0));
                r.log_writes.push((logw1 - logw0) / (req1 - req0).max(1.0));
                check(w, &run);
                r.server.push(run);
            };
            let run_nginx = |r: &mut Rounds| {
                let run = wrk_env(
                    &format!("{} (nginx, round {round})", w.name),
                    w.script,
                    nginx_addr,
                    &nginx_pids,
                    conns,
                    secs,
                    &w.env,
                );
                assert!(run.requests > 0 && run.non2xx == 0, "nginx answered {} non-2xx", run.non2xx);
                r.nginx.push(run);
            };
            if round % 2 == 0 {
                run_nginx(&mut r);
                run_server(&mut r);
            } else {
                run_server(&mut r);
                run_nginx(&mut r);
            }
        }
        results.push(r);
    }
    drop(servers);
    drop(nginx);
    let memory = if !quick && only.is_empty() { memory_runs() } else { Vec::new() };
    write_report(&results, &memory, secs, rounds, conns);
}

/// The harness check: the server answered, without socket errors, with the
/// status the workload is built for.
fn check(w: &Workload, run: &Run) {
    assert!(run.requests > 0, "{}: no requests", w.name);
    assert_eq!(run.socket_errors, 0, "{}: socket errors", w.name);
    match w.expect {
        "200" => assert_eq!(run.non2xx, 0, "{}: {} answers were not 2xx", w.name, run.non2xx),
        // All but the first few (the client's 17 tokens) are 429.
        _ => assert!(run.non2xx + 17 >= run.requests, "{}: only {} of {} refused", w.name, run.non2xx, run.requests),
    }
}

struct Memory {
    label: &'static str,
    keys: usize,
    value_len: usize,
    rss_empty: u64,
    rss_full: u64,
    overhead_per_entry: f64,
}

/// A distinct IPv6 /48 for every key.
fn own_network(i: usize) -> String {
    format!("2a00:{:x}:{:x}::1", (i >> 16) & 0xffff, i & 0xffff)
}

/// Who sends the sets of a fill (`None`: the loopback peer itself).
type Clients = Option<fn(usize) -> String>;

fn memory_runs() -> Vec<Memory> {
    let mut out = Vec::new();
    let cases: [(&'static str, &[&str], Clients); 4] = [
        ("quotas off, one client", &["-maxKeysPerIP", "0", "-maxKeysPerNet", "0"], None),
        ("quotas off, every key from its own /48", &["-maxKeysPerIP", "0", "-maxKeysPerNet", "0"], Some(own_network)),
        ("quotas on, 65,536 clients in 256 /24s", &[], Some(spread_client)),
        ("quotas on, every key from its own /48", &[], Some(own_network)),
    ];
    for (keys, value_len) in [(100_000, 100), (1_000_000, 100)] {
        for (label, args, client) in cases {
            out.push(memory_run(label, args, client, keys, value_len));
        }
    }
    out
}

fn memory_run(label: &'static str, extra: &[&str], client: Clients, keys: usize, value_len: usize) -> Memory {
    let max = (keys + keys / 10).to_string();
    // Rate-limit buckets are forgotten at each refill: a 1 s period, and
    // two of them idle before measuring, leave only the store.
    let mut args =
        vec!["-threads", "2", "-maxNumKV", &max, "-dataDir", "", "-maxTrackedIPs", "4000000", "-resetDuration", "1s"];
    args.extend_from_slice(extra);
    let s = Server::start(&args);
    std::thread::sleep(Duration::from_millis(2500));
    let rss_empty = rss_bytes(s.pid());
    // Keys are "m" + digits.
    fill_as(s.addr, "m", 0, keys, value_len, client);
    let keys_len: usize = (0..keys).map(|i| 1 + i.to_string().len()).sum();
    std::thread::sleep(Duration::from_millis(2500));
    let rss_full = rss_bytes(s.pid());
    let payload = keys_len + keys * value_len;
    let overhead = (rss_full as f64 - rss_empty as f64 - payload as f64) / keys as f64;
    eprintln!("memory {label}, {keys} x {value_len} B: overhead {overhead:.1} B/entry");
    Memory { label, keys, value_len, rss_empty, rss_full, overhead_per_entry: overhead }
}

fn write_report(results: &[Rounds], memory: &[Memory], secs: u64, rounds: usize, conns: usize) {
    let mut md = format!(
        "# End-to-end benchmark\n\nwrk -t1 -c{conns} -d{secs}s on loopback, the server at `-threads 2` (log and \
         snapshots on, defaults) and nginx `return 200 \"OK\"` with 2 workers, {rounds} alternated rounds per \
         workload with the same script. Ratios are the server's over nginx's in the same round: median \
         (min-max). CPU is user+system time per request from /proc. Cross-core: messages the server's cores \
         sent each other per request. Log writes: write-ahead log writes per request. Busiest thread: the \
         share of each side's CPU its busiest thread spent (median; 0.5 is an even split between two).\n\n\
         | workload | server req/s | server CPU/req | CPU vs nginx | req/s vs nginx | p99 server / nginx | p99 vs nginx | cross-core msgs/req | log writes/req | busiest thread server / nginx |\n\
         |---|---:|---:|---:|---:|---|---:|---:|---:|---|\n"
    );
    for r in results {
        let ratio = |f: fn(&Run) -> f64| {
            let v: Vec<f64> = r
                .server
                .iter()
                .zip(&r.nginx)
                .filter(|(s, n)| f(s) > 0.0 && f(n) > 0.0)
                .map(|(s, n)| f(s) / f(n))
                .collect();
            if v.is_empty() {
                // wrk does not time pipelined requests one by one.
                return "n/a".to_string();
            }
            let (m, lo, hi) = spread(v);
            format!("{m:.2}x ({lo:.2}-{hi:.2})")
        };
        let med = |v: &[Run], f: fn(&Run) -> f64| spread(v.iter().map(f).collect()).0;
        let p99 = |v: f64| if v > 0.0 { format!("{:.1} ms", v / 1000.0) } else { "n/a".into() };
        md += &format!(
            "| {} | {:.0} | {:.1} us | {} | {} | {} / {} | {} | {:.2} | {:.2} | {:.2} / {:.2} |\n",
            r.name,
            med(&r.server, |x| x.rps),
            med(&r.server, |x| x.cpu_us_per_req),
            ratio(|x| x.cpu_us_per_req),
            ratio(|x| x.rps),
            p99(med(&r.server, |x| x.p99_us)),
            p99(med(&r.nginx, |x| x.p99_us)),
            ratio(|x| x.p99_us),
            spread(r.cross_core.clone()).0,
            spread(r.log_writes.clone()).0,
            med(&r.server, |x| x.busiest_thread),
            med(&r.nginx, |x| x.busiest_thread),
        );
    }
    if !memory.is_empty() {
        md += "\n## Memory per entry\n\nRSS after filling, beyond key and value bytes (hash tables at \
               their grown size and 4-byte hash tags included).\n\n| keys | value | clients | RSS empty | RSS full | per entry |\n\
               |---:|---:|---|---:|---:|---:|\n";
        for m in memory {
            md += &format!(
                "| {} | {} B | {} | {:.1} MiB | {:.1} MiB | {:.1} B |\n",
                m.keys,
                m.value_len,
                m.label,
                m.rss_empty as f64 / 1048576.0,
                m.rss_full as f64 / 1048576.0,
                m.overhead_per_entry
            );
        }
    }
    println!("{md}");
    // A smoke run checks the harness; its figures are not a measurement. A
    // run of some workloads only is printed, not written: it would replace
    // the whole report with part of one.
    let partial = std::env::var("BENCH_ONLY").is_ok_and(|o| !o.is_empty())
        || std::env::var("BENCH_SERVER_ARGS").is_ok_and(|o| !o.is_empty());
    if std::env::var("BENCH_QUICK").is_err() && !partial {
        let dir = PathBuf::from(load::ROOT).join("benches/results");
        std::fs::create_dir_all(&dir).unwrap();
        let old = std::fs::read_to_string(dir.join("e2e.md")).unwrap_or_default();
        std::fs::write(dir.join("e2e.md"), md + &keep_history(&old)).unwrap();
    }
}

/// Where `e2e.md`'s history starts: the bench keeps its sections (from the
/// first `## ` after the marker, whatever the intro says by then) across
/// runs, and moves the run it replaces there.
const HISTORY: &str = "<!-- history -->";
/// The history's intro, written after the marker.
const HISTORY_INTRO: &str = "Everything below is history, newest first: the bench keeps it and moves \
                       the run it replaces into it. Sections are labelled with their round, as in the README's \
                       Performance section and `docs/performance-history.md`; inside a section, \"this round\" \
                       is that section's round and \"the previous round\" the one before it.";

/// What follows a new report: the history marker, the report it replaces
/// (its headings one level down, under a heading to rename once the run is
/// written up), then the older history as it was.
fn keep_history(old: &str) -> String {
    let (latest, history) = old.split_once(HISTORY).unwrap_or((old, ""));
    let history = history.find("\n## ").map_or("", |i| &history[i..]);
    let mut out = format!("\n{HISTORY}\n\n{HISTORY_INTRO}\n\n");
    let body: Vec<&str> = latest.lines().skip_while(|l| l.starts_with("# ") || l.trim().is_empty()).collect();
    if !body.is_empty() {
        out += "\n## The run this one replaced (moved here by the bench; rename it for its round)\n\n";
        for line in body {
            match line.strip_prefix("## ") {
                Some(h) => out += &format!("### {h}\n"),
                None => out += &format!("{line}\n"),
            }
        }
    }
    let history = history.trim_matches('\n');
    if !history.is_empty() {
        out += &format!("\n{history}\n");
    }
    out
}
