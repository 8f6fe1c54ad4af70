//! The command line and startup: Go-style flags, help, clear errors.

mod common;
use common::*;
use std::process::Command;

#[test]
fn help_lists_every_flag() {
    let out = Command::new(BIN).arg("-h").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    for flag in [
        "-maxKeySize",
        "-maxValueSize",
        "-maxNumKV",
        "-expireDuration",
        "-resetDuration",
        "-saveDuration",
        "-maxRequests",
        "-port",
        "-l ",
        "-disableLocalIPWarning",
        "-threads",
        "-trustedProxies",
        "-readTimeout",
        "-idleTimeout",
        "-dataDir",
        "-shutdownTimeout",
        "-metricsAddr",
        "-maxConns",
        "-maxConnsPerIP",
        "-maxConnsPerNet",
        "-maxWait",
        "-maxWaiters",
        "-maxWaitersPerIP",
        "-maxWaitersPerNet",
        "-maxTrackedIPs",
        "-ioDriver",
    ] {
        assert!(text.contains(flag), "{flag} missing:\n{text}");
    }
}

#[test]
fn bad_flags_exit_2_with_a_message() {
    for args in [
        &["-port", "99999"][..],
        &["-expireDuration", "forever"],
        &["-maxRequests", "4294967296"],
        &["-nope"],
        &["-l", "localhost-ish"],
        &["-disableLocalIPWarning=perhaps"],
    ] {
        let out = Command::new(BIN).args(args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("rendezvous:"), "{args:?}: {err}");
    }
}

#[test]
fn go_style_command_lines_start() {
    let s = Server::start(&[
        "-maxValueSize=50",
        "--maxKeySize",
        "20",
        "-disableLocalIPWaring",
        "-expireDuration=1h30m",
        "-saveDuration",
        "10m",
    ]);
    assert_eq!(s.post("/set/k", &[b'x'; 50]).status, 200);
    assert_eq!(s.post("/set/k", &[b'x'; 51]).status, 400);
    assert_eq!(s.post(&format!("/set/{}", "k".repeat(21)), b"v").status, 400);
    let exp = s.post("/set/k", b"v").expires_at();
    assert!(exp <= now_secs() + 5401 && exp >= now_secs() + 5398);
}

#[test]
fn large_go_limits_still_start() {
    // The Go server took any -maxKeySize / -maxValueSize; such lines keep working.
    let s = Server::start(&["-maxKeySize", "100000", "-maxValueSize", "100000000"]);
    assert_eq!(s.post(&format!("/set/{}", "k".repeat(4000)), b"v").status, 200);
}

#[test]
fn port_in_use_is_a_startup_error() {
    let s = Server::start(&[]);
    let port = s.addr.port().to_string();
    let out = Command::new(BIN).args(["-l", "127.0.0.1", "-port", &port, "-dataDir", ""]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("-port") && (err.contains("already listening") || err.contains("Rendezvous process")),
        "{err}"
    );
    // Also when the other listener uses SO_REUSEPORT on all addresses.
    let blocker = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let port = blocker.local_addr().unwrap().port().to_string();
    let out = Command::new(BIN).args(["-port", &port, "-dataDir", ""]).output().unwrap();
    assert!(!out.status.success());
    // The first server is untouched.
    assert_eq!(s.get("/get/x").status, 404);
}

#[test]
fn startup_log_names_the_driver_and_threads() {
    let s = Server::start(&["-threads", "3"]);
    assert!(s.banner.contains("3 threads"), "{}", s.banner);
    // Version, revision, and the effective configuration, in one line.
    for part in [
        env!("CARGO_PKG_VERSION"),
        "fsync everysec",
        "snapshot every 30m or 1073741824 bytes of log",
        "TTL up to 2h",
        "trusted proxies",
    ] {
        assert!(s.banner.contains(part), "{part} missing: {}", s.banner);
    }
    let s = Server::start(&["-threads", "1"]);
    assert!(s.banner.contains("(1 thread,"), "{}", s.banner);
    assert!(s.banner.contains("io_uring driver") || s.banner.contains("epoll driver"), "{}", s.banner);
    let s = Server::start(&["-threads", "2", "-ioDriver", "epoll"]);
    assert!(s.banner.contains("2 threads, epoll driver"), "{}", s.banner);
    assert_eq!(s.get("/get/x").status, 404);
}

/// Two instances started at the same moment on one port never both serve:
/// the port's lock is taken before the probe and the SO_REUSEPORT binds.
#[test]
fn two_instances_started_together_on_one_port_never_both_serve() {
    use std::io::{BufRead, BufReader};
    for round in 0..50 {
        let port = free_port().to_string();
        let args = ["-l", "127.0.0.1", "-port", &port, "-dataDir", "", "-metricsAddr", "", "-threads", "2"];
        let spawn = || {
            Command::new(BIN)
                .args(args)
                .stderr(std::process::Stdio::piped())
                .stdout(std::process::Stdio::null())
                .spawn()
                .unwrap()
        };
        let mut pair = [spawn(), spawn()];
        // Each either starts (logs "listening") or exits.
        let started: Vec<bool> = pair
            .iter_mut()
            .map(|child| {
                let err = child.stderr.take().unwrap();
                BufReader::new(err).lines().map_while(Result::ok).any(|l| l.contains("listening on"))
            })
            .collect();
        let mut exits = Vec::new();
        for (child, up) in pair.iter_mut().zip(&started) {
            if *up {
                let _ = child.kill();
            }
            exits.push(child.wait().unwrap());
        }
        let serving = started.iter().filter(|&&s| s).count();
        assert_eq!(serving, 1, "round {round}: {serving} instances served port {port} ({exits:?})");
        let loser = started.iter().position(|&s| !s).unwrap();
        assert_eq!(exits[loser].code(), Some(1), "round {round}");
    }
}

/// A lock's name bound by a socket that never listens (as no Rendezvous
/// lock is for more than an instant) is a squatter's: the server starts
/// after a short look, with a warning.
#[test]
fn a_port_lock_name_bound_by_a_socket_that_does_not_listen_does_not_keep_the_server_down() {
    use std::os::unix::ffi::OsStrExt;
    let port = quiet_port();
    let squatter = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None).unwrap();
    let name = format!("\0rendezvous/port/{port}");
    squatter.bind(&socket2::SockAddr::unix(std::ffi::OsStr::from_bytes(name.as_bytes())).unwrap()).unwrap();
    let s = Server::start(&["-port", &port.to_string(), "-dataDir", ""]);
    assert!(s.startup.iter().any(|l| l.contains("does not listen")), "{:#?}", s.startup);
    assert_eq!(s.get("/get/x").status, 404);
    drop(squatter);
}

/// The port's lock is an abstract Unix socket, a name any local user can
/// bind first. Bound by another user it is no Rendezvous process of ours:
/// the server starts, with a warning naming the holder, instead of being
/// kept down as long as the squatter likes (it used to exit 1 blaming
/// "another Rendezvous process").
#[test]
#[ignore = "needs root (the squatter runs as another user) and /usr/bin/python3"]
fn a_port_lock_squatted_by_another_user_does_not_keep_the_server_down() {
    let port = quiet_port();
    let squatter = squat_as_nobody(port, false);
    let s = Server::start(&["-port", &port.to_string(), "-dataDir", ""]);
    let warning = format!("held by PID {} running as uid 65534", squatter.0.id());
    assert!(s.startup.iter().any(|l| l.contains(&warning)), "{:#?}", s.startup);
    assert_eq!(s.get("/get/x").status, 404);
}

/// A squatter that fills its lock socket's backlog cannot be asked who
/// it is (a connect would wait, or fail at once without blocking); the
/// kernel's socket table still names its owner.
#[test]
#[ignore = "needs root (the squatter runs as another user) and /usr/bin/python3"]
fn a_port_lock_squatter_with_a_full_backlog_does_not_keep_the_server_down() {
    let port = quiet_port();
    let _squatter = squat_as_nobody(port, true);
    let s = Server::start(&["-port", &port.to_string(), "-dataDir", ""]);
    let warning = "held by a process running as uid 65534";
    assert!(s.startup.iter().any(|l| l.contains(warning)), "{:#?}", s.startup);
    assert_eq!(s.get("/get/x").status, 404);
}

/// Binds port `port`'s lock name as uid 65534 (Debian's python3, which
/// that user can run), listening, its backlog filled if `fill`; returns
/// once it is in place.
fn squat_as_nobody(port: u16, fill: bool) -> Group {
    use std::io::BufRead;
    use std::os::unix::process::CommandExt;
    // Debian's, not a per-user install the other user cannot read.
    assert!(std::path::Path::new("/usr/bin/python3").exists(), "needs /usr/bin/python3 (.ci/debian-packages)");
    // SAFETY: no arguments, no pointers.
    assert_eq!(unsafe { libc::geteuid() }, 0, "run as root: the squatter needs another user");
    let name = format!("b'\\0rendezvous/port/{port}'");
    // With a backlog of 0 the kernel queues one connection; the next
    // connect finds the backlog full.
    let filling = if fill {
        format!(
            "s.listen(0)\nqueued = []\nwhile True:\n  c = socket.socket(socket.AF_UNIX)\n  c.setblocking(False)\n  \
             try:\n    c.connect({name})\n    queued.append(c)\n  except BlockingIOError:\n    break\n"
        )
    } else {
        "s.listen()\n".to_string()
    };
    let script = format!(
        "import socket, time\ns = socket.socket(socket.AF_UNIX)\ns.bind({name})\n{filling}print('bound', flush=True)\ntime.sleep(60)"
    );
    let mut squatter = Group(
        Command::new("/usr/bin/python3")
            .args(["-c", &script])
            .uid(65534)
            .gid(65534)
            .process_group(0)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let out = squatter.0.stdout.take().unwrap();
    let first = std::io::BufReader::new(out).lines().next().map(|l| l.unwrap());
    assert_eq!(first.as_deref(), Some("bound"));
    squatter
}

#[test]
fn version_and_json_logs() {
    let out = Command::new(BIN).arg("-version").output().unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8(out.stdout).unwrap(), format!("rendezvous {}\n", env!("CARGO_PKG_VERSION")));
    // -logFormat json: one JSON object per line, the banner included.
    let s = Server::start(&["-logFormat", "json"]);
    let v: serde_json::Value = serde_json::from_str(&s.banner).unwrap();
    assert_eq!(v["level"], "info");
    assert!(v["msg"].as_str().unwrap().contains("listening on"));
    assert!(v["ts"].as_str().is_some());
    // -logLevel warn: the info banner is not written.
    let t = TempDir::new();
    let data = t.path().display().to_string();
    let child = Command::new(BIN)
        .args(["-l", "127.0.0.1", "-port", "0", "-metricsAddr", "", "-dataDir", &data, "-logLevel", "warn"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));
    Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && !err.contains("listening on"), "{err}");
}

#[test]
fn values_the_machine_cannot_hold_are_refused_before_allocating() {
    for args in [&["-maxNumKV", "18446744073709551615"][..], &["-maxNumKV", "1e12"], &["-maxValueSize", "99999999999"]]
    {
        let t = std::time::Instant::now();
        let out = Command::new(BIN).args(args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(args[1]) && err.contains(args[0]), "{args:?}: {err}");
        assert!(t.elapsed() < std::time::Duration::from_secs(5));
    }
}

/// Reads `field` of each worker thread (`core-N`) of process `pid` from its
/// /proc task directory, keyed by thread name, in name order.
fn per_worker<T: Ord>(pid: u32, field: impl Fn(&std::path::Path) -> T) -> Vec<(String, T)> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let dir = task.unwrap().path();
        let name = std::fs::read_to_string(dir.join("comm")).unwrap().trim().to_string();
        if name.starts_with("core-") {
            out.push((name, field(&dir)));
        }
    }
    out.sort();
    out
}

/// A thread's scheduling policy: field 41 of its stat line (0 SCHED_OTHER,
/// 3 SCHED_BATCH).
fn policy(task: &std::path::Path) -> u32 {
    let stat = std::fs::read_to_string(task.join("stat")).unwrap();
    // Fields after the parenthesised name, which may itself hold spaces.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    rest.split(' ').nth(41 - 3).unwrap().parse().unwrap()
}

/// The CPUs a thread (or, for `/proc/self`, this process) may use, as the
/// kernel lists them ("0-2,5").
fn cpus(task: &std::path::Path) -> String {
    let status = std::fs::read_to_string(task.join("status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("Cpus_allowed_list:")).unwrap();
    line.split_whitespace().nth(1).unwrap().to_string()
}

fn my_cpus() -> String {
    cpus(std::path::Path::new("/proc/self"))
}

/// Expands a kernel CPU list ("0-2,5") into CPU numbers.
fn expand(list: &str) -> Vec<usize> {
    let mut cpus = Vec::new();
    for part in list.split(',') {
        match part.split_once('-') {
            Some((a, b)) => cpus.extend(a.parse::<usize>().unwrap()..=b.parse::<usize>().unwrap()),
            None => cpus.push(part.parse().unwrap()),
        }
    }
    cpus
}

#[test]
fn worker_threads_are_pinned_one_per_cpu_when_asked_and_there_are_enough() {
    let allowed = expand(&my_cpus());
    // One core per CPU (-threads 0 and its explicit count): core i on the
    // i-th allowed CPU.
    let n = allowed.len().to_string();
    for args in [&["-threads", "0", "-cpuAffinity", "spread"][..], &["-threads", &n, "-cpuAffinity", "spread"]] {
        let s = Server::start(args);
        assert_eq!(s.get("/get/x").status, 404);
        let mut want: Vec<(String, String)> =
            allowed.iter().enumerate().map(|(i, cpu)| (format!("core-{i}"), cpu.to_string())).collect();
        want.sort(); // in name order, as `per_worker` gives them
        assert_eq!(per_worker(s.pid(), cpus), want, "{args:?}");
    }
    // More cores than CPUs, fewer (another instance may share the machine),
    // or the default -cpuAffinity none: the kernel places them.
    let more = (allowed.len() + 1).to_string();
    let fewer = (allowed.len() - 1).to_string();
    let mut cases = vec![vec!["-threads", &more, "-cpuAffinity", "spread"], vec!["-threads", &n]];
    if allowed.len() > 1 {
        cases.push(vec!["-threads", &fewer, "-cpuAffinity", "spread"]);
    }
    for args in &cases {
        let s = Server::start(args);
        assert_eq!(s.get("/get/x").status, 404);
        let threads: usize = args[1].parse().unwrap();
        let mut want: Vec<(String, String)> = (0..threads).map(|i| (format!("core-{i}"), my_cpus())).collect();
        want.sort(); // in name order, as `per_worker` gives them
        assert_eq!(per_worker(s.pid(), cpus), want, "{args:?}");
    }
}

#[test]
fn worker_threads_run_under_the_chosen_scheduling_policy() {
    let s = Server::start(&["-threads", "2"]);
    assert_eq!(s.get("/get/x").status, 404);
    let policies = per_worker(s.pid(), policy);
    assert_eq!(policies, [("core-0".to_string(), 3), ("core-1".to_string(), 3)], "default is SCHED_BATCH");
    let s = Server::start(&["-threads", "2", "-schedPolicy", "normal"]);
    assert_eq!(s.get("/get/x").status, 404);
    let policies = per_worker(s.pid(), policy);
    assert_eq!(policies, [("core-0".to_string(), 0), ("core-1".to_string(), 0)]);
}
