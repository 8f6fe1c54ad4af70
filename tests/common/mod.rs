//! Test harness: starts the real `rendezvous` binary on an ephemeral port
//! and talks HTTP/1.1 to it over real TCP sockets.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_rendezvous");

/// The value of one series (name and labels exactly) in a scrape.
pub fn metric_in(scrape: &str, series: &str) -> Option<f64> {
    scrape
        .lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// The header a trusted proxy (the loopback peer) adds for client `ip`.
pub fn from(ip: &str) -> [(&str, &str); 1] {
    [("X-Forwarded-For", ip)]
}

/// The socket address at the start of `text` (a log line's tail, text or JSON).
pub fn address_at(text: &str) -> SocketAddr {
    let end = text.find(|c: char| !(c.is_ascii_hexdigit() || ".:[]".contains(c))).unwrap_or(text.len());
    text[..end].parse().unwrap_or_else(|e| panic!("no address in {text:?}: {e}"))
}

/// A running server, killed on drop.
pub struct Server {
    child: Option<Child>,
    /// Started under a wrapper, in a process group of its own: killed as a
    /// group (a wrapper such as strace 6.1 does not take its child with it).
    grouped: bool,
    pub addr: SocketAddr,
    pub dir: TempDir,
    /// The startup line ("listening on ...").
    pub banner: String,
    /// Every log line up to and including the banner.
    pub startup: Vec<String>,
    /// Where `/metrics` is served, if enabled.
    pub metrics: Option<SocketAddr>,
    log: mpsc::Receiver<String>,
}

/// A temporary directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new() -> TempDir {
        static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let p = std::env::temp_dir().join(format!("rendezvous-test-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        // RENDEZVOUS_KEEP_TEST_DIRS=1 keeps them for a post-mortem.
        if std::env::var_os("RENDEZVOUS_KEEP_TEST_DIRS").is_some() {
            return;
        }
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Server {
    /// Starts with test-friendly defaults (loopback, any port, a temporary
    /// data directory, effectively unlimited rate; key quotas as shipped)
    /// overridden by `args`.
    pub fn start(args: &[&str]) -> Server {
        Self::start_in(TempDir::new(), args)
    }

    pub fn start_in(dir: TempDir, args: &[&str]) -> Server {
        Self::start_wrapped(dir, &[], args)
    }

    /// The test-friendly command line for `args` in `dir`.
    pub fn command_line(dir: &TempDir, args: &[&str]) -> Vec<String> {
        let mut all: Vec<String> =
            ["-l", "127.0.0.1", "-port", "0", "-maxRequests", "4294967295", "-maxRequestsPerNet", "4294967295"]
                .iter()
                .chain(&["-disableLocalIPWarning"])
                .map(|s| s.to_string())
                .collect();
        // Connections spread over the cores, as the tests were written
        // for; `tests/placement.rs` runs the default.
        if !args.contains(&"-placement") {
            all.push("-placement".into());
            all.push("spread".into());
        }
        if !args.iter().any(|a| a.contains("metricsAddr")) {
            all.push("-metricsAddr".into());
            all.push("127.0.0.1:0".into());
        }
        if !args.iter().any(|a| a.contains("dataDir")) {
            all.push("-dataDir".into());
            all.push(dir.path().display().to_string());
        }
        all.extend(args.iter().map(|s| s.to_string()));
        all
    }

    /// Starts the server under a wrapper command (`prlimit ... --`), or
    /// directly when `wrapper` is empty.
    pub fn start_wrapped(dir: TempDir, wrapper: &[&str], args: &[&str]) -> Server {
        let all = Self::command_line(&dir, args);
        let mut cmd = match wrapper.split_first() {
            Some((program, rest)) => {
                let mut c = Command::new(program);
                c.args(rest).arg(BIN);
                c
            }
            None => Command::new(BIN),
        };
        let grouped = !wrapper.is_empty();
        if grouped {
            use std::os::unix::process::CommandExt;
            cmd.process_group(0);
        }
        let mut child = cmd
            .args(&all)
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start server");
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut metrics = None;
        let mut startup = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    startup.push(line.clone());
                    if let Some(rest) = line.split("metrics on http://").nth(1) {
                        metrics = Some(address_at(rest));
                    }
                    if let Some(rest) = line.split("listening on http://").nth(1) {
                        let addr = address_at(rest);
                        let child = Some(child);
                        return Server { child, grouped, addr, dir, banner: line, startup, metrics, log: rx };
                    }
                }
                Err(_) => {
                    let _ = child.kill();
                    let status = child.wait();
                    panic!("server did not start: {status:?}\n{}", startup.join("\n"));
                }
            }
        }
    }

    /// Scrapes `/metrics` (the exposition text).
    pub fn scrape(&self) -> String {
        let addr = self.metrics.expect("metrics enabled");
        let r = Client::connect(addr).req("GET", "/metrics", &[], b"");
        assert_eq!(r.status, 200);
        r.text()
    }

    /// The value of one sample line (`name{labels}`) in the exposition.
    pub fn metric(&self, series: &str) -> Option<f64> {
        metric_in(&self.scrape(), series)
    }

    pub fn client(&self) -> Client {
        Client::connect(self.addr)
    }

    /// One request on a fresh connection.
    pub fn req(&self, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Resp {
        self.client().req(method, path, headers, body)
    }

    pub fn get(&self, path: &str) -> Resp {
        self.req("GET", path, &[], b"")
    }

    pub fn post(&self, path: &str, body: &[u8]) -> Resp {
        self.req("POST", path, &[], body)
    }

    /// Waits until a log line containing `needle` is printed after the
    /// lines already consumed.
    pub fn wait_log(&self, needle: &str, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            match self.log.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(line) if line.contains(needle) => return line,
                Ok(_) => {}
                Err(_) => panic!("no log line containing {needle:?} within {limit:?}"),
            }
        }
    }

    /// Log lines printed so far.
    pub fn log_lines(&self) -> Vec<String> {
        self.log.try_iter().collect()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Sends a signal without waiting.
    pub fn signal(&self, sig: &str) {
        let pid = self.child.as_ref().unwrap().id().to_string();
        Command::new("kill").args([sig, &pid]).status().unwrap();
    }

    /// Whether the process is still running.
    pub fn alive(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| c.try_wait().unwrap().is_none())
    }

    /// Sends a signal and waits for the exit status (with a deadline).
    pub fn signal_and_wait(&mut self, sig: &str) -> std::process::ExitStatus {
        let mut child = self.child.take().unwrap();
        Command::new("kill").args([sig, &child.id().to_string()]).status().unwrap();
        wait_deadline(&mut child, Duration::from_secs(30))
    }

    /// Takes the temp dir out (to restart a server on the same files).
    pub fn stop_keep_dir(mut self, sig: &str) -> (TempDir, std::process::ExitStatus) {
        let status = self.signal_and_wait(sig);
        let dir = std::mem::replace(&mut self.dir, TempDir(PathBuf::new()));
        (dir, status)
    }
}

pub fn wait_deadline(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("process did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(c) = self.child.take() {
            if self.grouped {
                drop(Group(c));
            } else {
                let mut c = c;
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

/// A child started with `process_group(0)`, killed with its whole group
/// on drop (a test that fails midway included).
pub struct Group(pub Child);

impl Drop for Group {
    fn drop(&mut self) {
        if let Ok(pid) = libc::pid_t::try_from(self.0.id()) {
            // SAFETY: a plain signal to the process group this test started
            // (its id is the child's pid); a group already gone is ignored.
            unsafe { libc::kill(-pid, libc::SIGKILL) };
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A parsed response.
#[derive(Debug, Clone)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn expires_at(&self) -> u64 {
        self.header("X-Expires-At").expect("X-Expires-At").parse().unwrap()
    }
}

/// A keep-alive HTTP/1.1 client on one connection.
pub struct Client {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

pub fn now_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}

impl Client {
    pub fn connect(addr: SocketAddr) -> Client {
        let stream = TcpStream::connect(addr).expect("connect");
        stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        stream.set_nodelay(true).unwrap();
        Client { stream, buf: Vec::new() }
    }

    /// A client whose receive window is tiny (`rcvbuf` bytes, and segments
    /// of `mss` bytes if given): a server's long answer to it stays in the
    /// sockets until it reads, the server's write still going meanwhile.
    pub fn slow_reader(addr: SocketAddr, rcvbuf: usize, mss: Option<u32>) -> Client {
        let sock = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None).unwrap();
        if let Some(mss) = mss {
            sock.set_tcp_mss(mss).unwrap();
        }
        sock.set_recv_buffer_size(rcvbuf).unwrap();
        sock.connect(&addr.into()).unwrap();
        Client::over(sock.into())
    }

    /// Waits until the first byte of an answer has arrived (and reads
    /// nothing).
    pub fn wait_first_byte(&mut self) {
        let mut first = [0u8; 1];
        assert_eq!(self.stream.peek(&mut first).unwrap(), 1, "the answer began");
    }

    /// A client over an already connected stream.
    pub fn over(stream: TcpStream) -> Client {
        stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        Client { stream, buf: Vec::new() }
    }

    pub fn send_raw(&mut self, raw: &[u8]) {
        self.stream.write_all(raw).expect("write");
    }

    pub fn req(&mut self, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Resp {
        self.send_raw(&build(method, path, headers, body));
        self.read_response(method == "HEAD").expect("response")
    }

    /// Reads one response; `None` on EOF before any byte.
    pub fn read_response(&mut self, head_only: bool) -> Option<Resp> {
        loop {
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let mut resp = httparse::Response::new(&mut headers);
            if let Ok(httparse::Status::Complete(n)) = resp.parse(&self.buf) {
                let status = resp.code.unwrap();
                let hs: Vec<(String, Vec<u8>)> =
                    resp.headers.iter().map(|h| (h.name.to_string(), h.value.to_vec())).collect();
                let len: usize = hs
                    .iter()
                    .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
                    .map(|(_, v)| std::str::from_utf8(v).unwrap().parse().unwrap())
                    .unwrap_or(0);
                if status == 100 {
                    self.buf.drain(..n);
                    continue;
                }
                let chunked = hs
                    .iter()
                    .any(|(k, v)| k.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case(b"chunked"));
                if chunked && !head_only {
                    self.buf.drain(..n);
                    let body = self.read_chunked();
                    return Some(Resp { status, headers: hs, body });
                }
                let len = if head_only { 0 } else { len };
                while self.buf.len() < n + len {
                    if !self.fill() {
                        panic!("EOF inside body");
                    }
                }
                let body = self.buf[n..n + len].to_vec();
                self.buf.drain(..n + len);
                return Some(Resp { status, headers: hs, body });
            }
            if !self.fill() {
                assert!(self.buf.is_empty(), "EOF inside head: {:?}", String::from_utf8_lossy(&self.buf));
                return None;
            }
        }
    }

    /// Reads a chunked body (other servers, e.g. Prometheus, send these).
    fn read_chunked(&mut self) -> Vec<u8> {
        let mut body = Vec::new();
        loop {
            let line_end = loop {
                if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                    break i;
                }
                assert!(self.fill(), "EOF in chunk size");
            };
            let size_text = String::from_utf8_lossy(&self.buf[..line_end]).to_string();
            let size = usize::from_str_radix(size_text.split(';').next().unwrap().trim(), 16).unwrap();
            self.buf.drain(..line_end + 2);
            while self.buf.len() < size + 2 {
                assert!(self.fill(), "EOF in chunk");
            }
            body.extend_from_slice(&self.buf[..size]);
            self.buf.drain(..size + 2);
            if size == 0 {
                return body;
            }
        }
    }

    fn fill(&mut self) -> bool {
        let mut tmp = [0u8; 65536];
        match self.stream.read(&mut tmp) {
            Ok(0) => false,
            Ok(n) => {
                self.buf.extend_from_slice(&tmp[..n]);
                true
            }
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => false,
            Err(e) => panic!("read: {e}"),
        }
    }

    /// True if the server closed the connection (EOF) with nothing more to read.
    pub fn is_closed(&mut self) -> bool {
        self.buf.is_empty() && !self.fill()
    }
}

/// Encodes a request with Content-Length (for POST) and a Host header.
pub fn build(method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut raw = format!("{method} {path} HTTP/1.1\r\nHost: test.local\r\n");
    for (k, v) in headers {
        raw += &format!("{k}: {v}\r\n");
    }
    if method == "POST" || !body.is_empty() {
        raw += &format!("Content-Length: {}\r\n", body.len());
    }
    raw += "\r\n";
    let mut out = raw.into_bytes();
    out.extend_from_slice(body);
    out
}

/// Percent-encodes arbitrary bytes for a path.
pub fn pct(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("%{b:02X}")).collect()
}

/// Whether a program is on the PATH.
pub fn have(tool: &str) -> bool {
    Command::new("sh").args(["-c", &format!("command -v {tool}")]).output().is_ok_and(|o| o.status.success())
}

/// Fails the test (with how to fix it) when a program it drives is missing.
/// Tests that need one are `#[ignore = "needs <tool>"]`: plain `cargo test`
/// skips them and says so; `.ci/run` installs the tools and runs them all.
pub fn require(tool: &str) {
    assert!(have(tool), "{tool} is not installed: `bash .ci/run` installs the Debian packages the ignored tests drive");
}

/// A port nobody listens on right now.
/// A free port below the kernel's ephemeral range (32768 up), for a test
/// that must name its port before the server starts and hold something
/// keyed by it meanwhile: `free_port`'s ports are ephemeral ones, which
/// another test's `free_port` or any outgoing connection may take by the
/// time the server binds.
pub fn quiet_port() -> u16 {
    use std::hash::BuildHasher;
    let seed = std::collections::hash_map::RandomState::new().hash_one(std::process::id());
    (0..1000u64)
        .map(|i| 20_000 + ((seed.wrapping_add(i.wrapping_mul(7919))) % 12_000) as u16)
        .find(|&p| {
            std::net::TcpListener::bind(("127.0.0.1", p)).is_ok() && std::net::TcpListener::bind(("0.0.0.0", p)).is_ok()
        })
        .expect("a free port in 20000-31999")
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// An external program (nginx, HAProxy, Prometheus...) stopped on drop with
/// SIGTERM, so a master process can stop its workers (SIGKILL would orphan
/// them), then SIGKILL if it lingers.
pub struct Proc {
    pub child: Child,
}

impl Proc {
    pub fn spawn(cmd: &mut Command) -> Proc {
        let child = cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("start program");
        Proc { child }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until something accepts connections on `addr`.
pub fn wait_listening(addr: SocketAddr, limit: Duration, what: &str) {
    let deadline = Instant::now() + limit;
    while TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "{what} did not start listening on {addr}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Raises this process's open-file limit (tests that open thousands of
/// sockets), returning the limit in effect.
pub fn raise_fd_limit(want: u64) -> u64 {
    rlimit::increase_nofile_limit(want).unwrap_or(0)
}

/// Runs the binary with `args` to its exit (at most 30 s): its status and
/// everything it printed on stderr.
pub fn run_to_exit(args: &[&str]) -> (std::process::ExitStatus, String) {
    let mut child = Command::new(BIN)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start binary");
    let mut stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let status = wait_deadline(&mut child, Duration::from_secs(30));
    (status, reader.join().unwrap())
}

/// One core thread stopped, and only it (a signal would stop every
/// thread), as a hung disk or a stuck loop would hold it; it runs again on
/// drop. ptrace works from the thread that attached, so a test keeps it on
/// its own thread.
pub struct Frozen {
    tid: libc::pid_t,
}

/// ptrace's address and data, unused here (pointer-sized: it is variadic).
const NO_ARG: *mut libc::c_void = std::ptr::null_mut();

impl Frozen {
    pub fn core(pid: u32, core: usize) -> Frozen {
        let name = format!("core-{core}");
        let tid: libc::pid_t = std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .flatten()
            .find(|t| std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim() == name))
            .and_then(|t| t.file_name().to_str()?.parse().ok())
            .unwrap_or_else(|| panic!("no thread named {name}"));
        // SAFETY: ptrace requests that pass no memory, on a thread of a
        // process this test started; a failure is reported, not ignored.
        let seized = unsafe { libc::ptrace(libc::PTRACE_SEIZE, tid, NO_ARG, NO_ARG) };
        assert_eq!(seized, 0, "cannot trace the core: {}", std::io::Error::last_os_error());
        let frozen = Frozen { tid };
        // SAFETY: as above.
        let stopped = unsafe { libc::ptrace(libc::PTRACE_INTERRUPT, tid, NO_ARG, NO_ARG) };
        assert_eq!(stopped, 0, "cannot stop the core: {}", std::io::Error::last_os_error());
        let mut status = 0;
        // SAFETY: `status` outlives the call; waits for the stop just asked for.
        let waited = unsafe { libc::waitpid(tid, &mut status, libc::__WALL) };
        assert_eq!(waited, tid, "{}", std::io::Error::last_os_error());
        frozen
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        // SAFETY: detaching a thread this thread traces; no memory passed.
        unsafe { libc::ptrace(libc::PTRACE_DETACH, self.tid, NO_ARG, NO_ARG) };
    }
}
