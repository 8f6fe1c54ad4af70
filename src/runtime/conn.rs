//! One client connection: the keep-alive loop that reads requests, answers
//! them in order, and enforces every per-connection limit.
//!
//! Deadlines: `-idleTimeout` while waiting for the first byte of a request,
//! then `-readTimeout` for that whole request (head and body) from its first
//! byte, so a client dribbling bytes (slowloris) is cut off after at most
//! that long; writes get `-idleTimeout`. Limits: the head must fit in 8 KiB,
//! a declared body over `-maxValueSize` is refused before a byte of it is
//! read, and a chunked body is counted as it streams. Pipelined requests are
//! parsed straight from the buffer and their responses written in one go
//! when the buffer runs dry. Values are copied out of the read buffer into
//! exact-size allocations, so a stored value never pins a connection buffer.
//! This module owns no store state: it calls `api` to decode and `router`
//! to execute.

use crate::clock::Now;
use crate::metrics::{self, CoreStats};
use crate::request::api::{self, Action};
use crate::request::clientip;
use crate::request::docs;
use crate::request::error::Error;
use crate::request::http::{self, BodyKind, ChunkedDecoder, Method, RequestHead, Response};
use crate::request::route::{self, Route};
use crate::runtime::connlimit::{Permit, Refusal};
use crate::runtime::idle::{self, IdleConns};
use crate::runtime::router::{Router, WaitFuture};
use crate::runtime::shared::Shared;
use crate::runtime::turns::Turns;
use crate::state::command::Reply;
use crate::state::net;
use crate::state::ratelimit::Charge;
use crate::state::shard::WriteOutcome;
use monoio::buf::IoBufMut;
use monoio::io::{AsyncReadRent, AsyncWriteRent, AsyncWriteRentExt};
use monoio::net::TcpStream;
use std::cell::{Cell, RefCell};
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use monoio::io::{CancelableAsyncReadRent, Canceller};

/// Initial read buffer; grows up to the head limit when a head needs it.
const READ_BUF: usize = 4096;
/// A read buffer larger than this is let go of between requests (a
/// head may grow it to 16 KiB, a pipelined burst to 32).
const READ_KEEP: usize = 2 * READ_BUF;
/// Buffered responses are written once they reach this size, even mid-pipeline.
const OUT_HIGH_WATER: usize = 64 * 1024;
/// A declared body at most this far over the limit is read and dropped
/// (answer 400, connection kept); further over is refused unread (413, close).
const DISCARD_LIMIT: u64 = 64 * 1024;
/// Largest scratch body kept between requests.
const BODY_KEEP: usize = 64 * 1024;
/// A body's room grows by at least this much, or doubles, as it arrives
/// (never past its declared length).
const BODY_STEP: usize = 64 * 1024;
/// After a framing error, how much unread input is drained before closing, so
/// the kernel does not reset the connection before the client reads our answer.
const LINGER_BYTES: usize = 256 * 1024;
const LINGER_TIME: Duration = Duration::from_secs(1);
/// The localhost warning is logged at most this often per core.
const LOCAL_WARNING_EVERY: Duration = Duration::from_secs(60);

/// What each core's connections share.
pub struct CoreCtx {
    pub shared: Arc<Shared>,
    /// This core's index (for its `CoreStats`).
    pub id: usize,
    pub router: Rc<Router>,
    pub limits: api::Limits,
    /// What the docs page states about this instance.
    /// The `GET /` page, rendered once.
    page: docs::Page,
    last_local_warning: Cell<Option<Instant>>,
    /// Set once shutdown starts: no new connections, no new requests.
    draining: Cell<bool>,
    /// Requests between "head parsed" and "response handed to the socket".
    in_progress: Cell<usize>,
    /// Shutdown stops waiting for requests in progress (a second signal).
    cut: Cell<bool>,
    idle_waker: RefCell<Option<Waker>>,
    accept_waker: RefCell<Option<Waker>>,
    /// Told of each request when this core gives turns on a shared CPU.
    turns: Option<Rc<Turns>>,
    /// This core's connections and which are idle (waiting for their
    /// client), to close at `-maxConns`.
    idle: RefCell<IdleConns>,
}

/// Counts a request as in progress while alive.
struct InFlight<'a>(&'a CoreCtx);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let n = self.0.in_progress.get() - 1;
        self.0.in_progress.set(n);
        self.0.stats().requests_in_flight.sub(1);
        if n == 0 {
            if let Some(w) = self.0.idle_waker.borrow_mut().take() {
                w.wake();
            }
        }
    }
}

impl CoreCtx {
    pub fn new(shared: Arc<Shared>, id: usize, router: Rc<Router>, turns: Option<Rc<Turns>>) -> Self {
        let cfg = &shared.config;
        let limits = api::Limits {
            max_key_size: cfg.max_key_size,
            max_value_size: cfg.max_value_size,
            max_ttl: cfg.expire_duration,
            max_wait: cfg.max_wait,
        };
        let (max_keys_per_ip, max_keys_per_net) = cfg.key_quotas();
        let page = docs::Page::new(&docs::Limits {
            max_key_size: cfg.max_key_size,
            max_value_size: cfg.max_value_size,
            max_num_kv: cfg.max_num_kv,
            max_requests: cfg.max_requests,
            max_requests_per_net: cfg.max_requests_per_net,
            max_keys_per_ip,
            max_keys_per_net,
            expire: cfg.expire_duration,
            reset: cfg.reset_duration,
            max_wait: cfg.max_wait,
        });
        CoreCtx {
            shared,
            id,
            router,
            limits,
            page,
            last_local_warning: Cell::new(None),
            draining: Cell::new(false),
            in_progress: Cell::new(0),
            cut: Cell::new(false),
            idle_waker: RefCell::new(None),
            accept_waker: RefCell::new(None),
            turns,
            idle: RefCell::new(IdleConns::default()),
        }
    }

    fn begin_request(&self) -> InFlight<'_> {
        if let Some(t) = &self.turns {
            t.arm();
        }
        self.in_progress.set(self.in_progress.get() + 1);
        self.stats().requests_in_flight.add(1);
        InFlight(self)
    }

    fn stats(&self) -> &CoreStats {
        &self.shared.stats[self.id]
    }

    pub fn is_draining(&self) -> bool {
        self.draining.get()
    }

    /// Starts shutdown on this core: the accept loop stops, requests that
    /// arrive from now on get 503, requests in progress finish.
    pub fn start_draining(&self) {
        self.draining.set(true);
        if let Some(w) = self.accept_waker.borrow_mut().take() {
            w.wake();
        }
    }

    /// Stops waiting for requests in progress.
    pub fn cut_short(&self) {
        self.cut.set(true);
        if let Some(w) = self.idle_waker.borrow_mut().take() {
            w.wake();
        }
    }

    /// Requests in progress on this core.
    pub fn in_progress(&self) -> usize {
        self.in_progress.get()
    }

    /// Open client connections on this core.
    pub fn connections(&self) -> usize {
        self.stats().connections_open.get() as usize
    }

    /// Resolves once no request is in progress on this core (or shutdown
    /// was cut short).
    pub async fn requests_finished(&self) {
        std::future::poll_fn(|cx| {
            if self.in_progress.get() == 0 || self.cut.get() {
                return Poll::Ready(());
            }
            *self.idle_waker.borrow_mut() = Some(cx.waker().clone());
            Poll::Pending
        })
        .await
    }

    /// Counts a connection refused by the connection limits.
    pub fn refused(&self, why: Refusal) {
        match why {
            Refusal::ServerFull => self.stats().refused_server_full.add(1),
            Refusal::IpFull => self.stats().refused_ip_full.add(1),
            Refusal::NetFull => self.stats().refused_net_full.add(1),
        }
    }

    /// Makes room for one more connection at `-maxConns` by telling the
    /// connections idle longest on this core to close. Returns whether it
    /// told any.
    pub fn make_room(&self) -> bool {
        let room = self.idle.borrow_mut().make_room(idle::batch(self.shared.config.max_conns));
        if let Some(told) = room {
            self.stats().evicted_idle.add(told as u64);
        }
        room.is_some()
    }

    /// Registers the accept loop to be woken when draining starts.
    pub fn on_drain(&self, waker: &Waker) {
        *self.accept_waker.borrow_mut() = Some(waker.clone());
    }

    fn warn_local(&self, peer: IpAddr) {
        let now = Instant::now();
        if self.last_local_warning.get().is_some_and(|t| now.duration_since(t) < LOCAL_WARNING_EVERY) {
            return;
        }
        self.last_local_warning.set(Some(now));
        log::warn!(
            "request from {peer} without X-Forwarded-For: if a reverse proxy runs in front of this server, \
             make it set X-Forwarded-For, or every client shares one IP (silence with -disableLocalIPWarning)"
        );
    }
}

/// When a request head arrived.
struct Arrival {
    /// Its first byte was seen: `-readTimeout` counts from here.
    first_byte: Instant,
    /// It was complete.
    head: Instant,
}

/// Why a connection stops.
enum Stop {
    /// Orderly end: EOF between requests, `Connection: close`, idle timeout.
    Done,
    /// I/O error or EOF mid-request: nothing more can be said.
    Broken,
    /// The request must be answered with this error and the connection closed.
    Reject(Error),
    /// Asked to reconnect (`placement`): its last answer written, the
    /// connection closes gracefully.
    Moved,
}

struct Conn<'a> {
    ctx: &'a CoreCtx,
    stream: TcpStream,
    peer: IpAddr,
    /// The detected client of the current request (peer, or from XFF).
    client: IpAddr,
    client_text: String,
    buf: Vec<u8>,
    /// Start of unconsumed bytes in `buf`.
    start: usize,
    out: Vec<u8>,
    head: RequestHead,
    body: Vec<u8>,
    /// The body was a little over the limit and was read into nothing.
    discarded: bool,
    /// Its index in the core's `IdleConns`.
    idle_id: u32,
    /// The last request cost tokens (`IdleConns::idle`).
    paid: bool,
    /// Held while `out` holds answers not yet written: a request is in
    /// progress until its answer is out, so a shutdown's drain waits for
    /// it (`-shutdownTimeout`) rather than exiting with an answer computed
    /// and never sent, a write's `OK` included.
    owed: Option<InFlight<'a>>,
    /// `head` is the current request's (parsed, not yet answered): a
    /// request refused from here on (its body too large or too slow, the
    /// server draining) is counted under its route, not `other`.
    in_request: bool,
    /// Its place under the connection caps; `None` once asked to
    /// reconnect onto another core (`moving`).
    permit: Option<Permit>,
}

/// Removes a connection from its core's idle list when its task ends,
/// however it ends.
struct Leave<'a>(&'a CoreCtx, u32);

impl Drop for Leave<'_> {
    fn drop(&mut self) {
        self.0.idle.borrow_mut().leave(self.1);
    }
}

/// Serves one accepted connection until it closes.
pub async fn serve(ctx: Rc<CoreCtx>, stream: TcpStream, peer: SocketAddr, permit: Permit) {
    let _ = stream.set_nodelay(true);
    let peer = clientip::canonical(peer.ip());
    let idle_id = ctx.idle.borrow_mut().join();
    let _leave = Leave(&ctx, idle_id);
    let mut conn = Conn {
        ctx: &ctx,
        stream,
        peer,
        client: peer,
        client_text: peer.to_string(),
        buf: Vec::with_capacity(READ_BUF),
        start: 0,
        out: Vec::new(),
        head: RequestHead::default(),
        body: Vec::new(),
        discarded: false,
        idle_id,
        paid: false,
        owed: None,
        in_request: false,
        permit: Some(permit),
    };
    let stats = ctx.stats();
    stats.connections_open.add(1);
    stats.connections_total.add(1);
    match conn.run().await {
        Stop::Done | Stop::Broken => {}
        // Its slot under the connection caps went back when it was asked.
        Stop::Moved => conn.linger().await,
        Stop::Reject(e) => {
            if ctx.shared.metrics_on {
                // By its path, as `handle` labels its own refusals.
                let route = conn.in_request.then(|| route::route_hint(&conn.head.target)).flatten();
                stats.answer(metrics::route_index(route), e.status(), Some(e));
            }
            conn.reject(e).await
        }
    }
    stats.connections_open.sub(1);
    if conn.moving() {
        ctx.shared.placement.left(ctx.id);
    }
}

impl Conn<'_> {
    async fn run(&mut self) -> Stop {
        // The clock reading that ended the last request, if it took one and
        // nothing has waited since: the flush of its answer starts from it.
        let mut ended = None;
        loop {
            self.set_client(self.peer);
            let arrived = match self.next_head(ended.take()).await {
                Ok(Some(arrived)) => arrived,
                Ok(None) => return Stop::Done,
                Err(stop) => return stop,
            };
            self.in_request = true;
            self.detect_client();
            if self.ctx.is_draining() {
                return Stop::Reject(Error::ShuttingDown);
            }
            let in_flight = self.ctx.begin_request();
            let deadline = arrived.first_byte + self.ctx.shared.config.read_timeout;
            let now = match self.read_body(deadline).await {
                // Latency counts from a complete request: a body that made
                // it wait reads the clock again.
                Ok(waited) => Now::at(if waited { Instant::now() } else { arrived.head }),
                Err(stop) => return stop,
            };
            ended = match self.handle(now).await {
                Ok(at) => at,
                Err(stop) => return stop,
            };
            self.in_request = false;
            let keep_alive = self.keep_alive();
            if self.body.capacity() > BODY_KEEP {
                self.body = Vec::new();
            }
            // A read buffer grown by a long head or a pipelined burst is not
            // kept while the connection waits for its next request.
            if self.start == self.buf.len() && self.buf.capacity() > READ_KEEP {
                self.buf = Vec::with_capacity(READ_BUF);
                self.start = 0;
            }
            self.head.release_large();
            if !self.out.is_empty() && self.owed.is_none() {
                // Its answer (or a pipelined one's) is still to be written.
                self.owed = Some(in_flight);
            }
            if !keep_alive {
                let flushed = self.flush_from(ended).await;
                if self.moving() && flushed.is_ok() {
                    // The client did not choose to close: whatever it sent
                    // meanwhile is drained, not reset.
                    return Stop::Moved;
                }
                return Stop::Done;
            }
            if self.out.len() >= OUT_HIGH_WATER {
                if let Err(stop) = self.flush_from(ended.take()).await {
                    return stop;
                }
            }
        }
    }

    /// Waits for a complete request head and parses it into `self.head`,
    /// consuming it from the buffer. Returns when it arrived, or `None` on a
    /// clean end between requests. `ended`: see `run`.
    async fn next_head(&mut self, mut ended: Option<Instant>) -> Result<Option<Arrival>, Stop> {
        let cfg = &self.ctx.shared.config;
        let mut scanned = 0;
        let mut arrived: Option<Instant> = None;
        let mut waited = false;
        loop {
            let avail = &self.buf[self.start..];
            if !avail.is_empty() {
                let first_byte = *arrived.get_or_insert_with(Instant::now);
                if http::head_may_be_complete(avail, scanned) {
                    match http::parse_head(avail, &mut self.head) {
                        // Whole, but longer than a head may be: it came in
                        // two reads, and the second held its end.
                        Ok(Some(n)) if n > http::MAX_HEAD => return Err(Stop::Reject(Error::HeadTooLarge)),
                        Ok(Some(n)) => {
                            self.start += n;
                            let head = if waited { Instant::now() } else { first_byte };
                            return Ok(Some(Arrival { first_byte, head }));
                        }
                        Ok(None) => {}
                        Err(e) => return Err(Stop::Reject(e)),
                    }
                }
                if avail.len() >= http::MAX_HEAD {
                    return Err(Stop::Reject(Error::HeadTooLarge));
                }
                scanned = avail.len();
            }
            // About to wait for the client: answers to pipelined requests go first.
            self.flush_from(ended.take()).await?;
            let had_bytes = arrived.is_some();
            let wait = match arrived {
                Some(at) => (at + cfg.read_timeout).saturating_duration_since(Instant::now()),
                None => cfg.idle_timeout,
            };
            waited = had_bytes;
            match self.read_client(wait).await {
                Ok(0) if !had_bytes => return Ok(None),
                Ok(0) => return Err(Stop::Broken),
                Ok(_) => {}
                Err(ReadFail::Timeout) if had_bytes => return Err(Stop::Reject(Error::RequestTimeout)),
                Err(ReadFail::Timeout | ReadFail::Evicted) => return Err(Stop::Done),
                Err(ReadFail::Io) => return Err(Stop::Broken),
            }
        }
    }

    /// Reads into the spare capacity of `buf` (compacting it first).
    async fn read_more(&mut self, wait: Duration) -> Result<usize, ReadFail> {
        self.make_room();
        let buf = std::mem::take(&mut self.buf);
        let (len, cap) = (buf.len(), buf.capacity());
        let read = monoio::time::timeout(wait, self.stream.read(buf.slice_mut(len..cap))).await;
        let Ok((res, slice)) = read else {
            return Err(ReadFail::Timeout);
        };
        self.buf = slice.into_inner();
        res.map_err(|_| ReadFail::Io)
    }

    /// `read_more` that the core may cut short to close the connection
    /// when the server is full (`ReadFail::Evicted`; see `waiting`).
    async fn read_client(&mut self, wait: Duration) -> Result<usize, ReadFail> {
        let (ctx, id, paid) = (self.ctx, self.idle_id, std::mem::take(&mut self.paid));
        waiting(ctx, id, paid, READ_GRACE, self.read_more(wait)).await.unwrap_or(Err(ReadFail::Evicted))
    }

    /// Whether the connection stays open after this request: the client
    /// asks for it, the server is not shutting down, and the core has not
    /// told it to close (a request that arrived as it was told is answered,
    /// with `Connection: close`).
    fn keep_alive(&self) -> bool {
        self.head.keep_alive && !self.moving() && !self.ctx.is_draining() && !self.ctx.idle.borrow().told(self.idle_id)
    }

    /// Whether the connection was asked to reconnect (`placement`): its
    /// current answer is its last.
    fn moving(&self) -> bool {
        self.permit.is_none()
    }

    /// Reads the body the head announced into `self.body`, within the cap.
    /// Returns whether it had to wait (for the client, or to send `100
    /// Continue`).
    async fn read_body(&mut self, deadline: Instant) -> Result<bool, Stop> {
        self.body.clear();
        self.discarded = false;
        let max = self.ctx.limits.max_value_size;
        match self.head.body {
            BodyKind::None => Ok(false),
            BodyKind::Length(n) => {
                if n > max as u64 {
                    // A little over: read it into nothing and answer 400 on a
                    // live connection. Far over (or a client waiting for
                    // 100-continue): refuse before reading, and close.
                    if n - max as u64 > DISCARD_LIMIT || self.head.expect_continue {
                        return Err(Stop::Reject(Error::BodyTooLarge));
                    }
                    self.discard(n as usize, deadline).await?;
                    self.discarded = true;
                    return Ok(true);
                }
                let n = n as usize;
                let mut waited = self.send_continue().await?;
                let have = n.min(self.buf.len() - self.start);
                self.body.extend_from_slice(&self.buf[self.start..self.start + have]);
                self.start += have;
                while self.body.len() < n {
                    waited = true;
                    // About to wait for the client (and perhaps be closed
                    // to make room): answers to pipelined requests go first.
                    self.flush().await?;
                    // Room grows as bytes arrive (doubling), not to the
                    // declared length at once: a client that only declares
                    // a large body holds no more memory than it has sent.
                    let len = self.body.len();
                    self.body.reserve_exact((n - len).min(len.max(BODY_STEP)));
                    let body = std::mem::take(&mut self.body);
                    let upto = n.min(body.capacity());
                    let wait = deadline.saturating_duration_since(Instant::now());
                    let paid = std::mem::take(&mut self.paid);
                    let read = monoio::time::timeout(wait, self.stream.read(body.slice_mut(len..upto)));
                    let Some(read) = waiting(self.ctx, self.idle_id, paid, READ_GRACE, read).await else {
                        return Err(Stop::Broken);
                    };
                    let Ok((res, slice)) = read else {
                        return Err(Stop::Reject(Error::RequestTimeout));
                    };
                    self.body = slice.into_inner();
                    match res {
                        Ok(0) | Err(_) => return Err(Stop::Broken),
                        Ok(_) => {}
                    }
                }
                Ok(waited)
            }
            BodyKind::Chunked => {
                let mut waited = self.send_continue().await?;
                let mut decoder = ChunkedDecoder::new(max);
                loop {
                    let used = decoder.decode(&self.buf[self.start..], &mut self.body).map_err(Stop::Reject)?;
                    self.start += used;
                    if decoder.is_done() {
                        return Ok(waited);
                    }
                    waited = true;
                    self.read_more_body(deadline).await?;
                }
            }
        }
    }

    /// Consumes `n` body bytes without keeping them.
    async fn discard(&mut self, mut n: usize, deadline: Instant) -> Result<(), Stop> {
        loop {
            let take = n.min(self.buf.len() - self.start);
            self.start += take;
            n -= take;
            if n == 0 {
                return Ok(());
            }
            self.read_more_body(deadline).await?;
        }
    }

    /// Reads more of a request body before `deadline`; EOF breaks the
    /// connection, the deadline answers 408.
    async fn read_more_body(&mut self, deadline: Instant) -> Result<(), Stop> {
        // As in `read_body`: what is owed goes out before a wait.
        self.flush().await?;
        let wait = deadline.saturating_duration_since(Instant::now());
        match self.read_client(wait).await {
            Ok(0) | Err(ReadFail::Io | ReadFail::Evicted) => Err(Stop::Broken),
            Ok(_) => Ok(()),
            Err(ReadFail::Timeout) => Err(Stop::Reject(Error::RequestTimeout)),
        }
    }

    /// Moves unconsumed bytes to the front of `buf` and keeps some room to read into.
    fn make_room(&mut self) {
        if self.start > 0 {
            self.buf.copy_within(self.start.., 0);
            self.buf.truncate(self.buf.len() - self.start);
            self.start = 0;
        }
        if self.buf.capacity() - self.buf.len() < READ_BUF / 4 {
            self.buf.reserve(READ_BUF);
        }
    }

    /// Answers `Expect: 100-continue` once the body is known to be
    /// acceptable. Returns whether it sent (and so waited).
    async fn send_continue(&mut self) -> Result<bool, Stop> {
        if self.head.expect_continue && !self.head.http10 {
            self.out.extend_from_slice(http::CONTINUE);
            self.flush().await?;
            return Ok(true);
        }
        Ok(false)
    }

    /// Works out who sent the request just parsed (`X-Client-Ip`, `ip/`
    /// keys, rate-limit bucket), reusing the peer's text when it is the peer.
    fn detect_client(&mut self) {
        let cfg = &self.ctx.shared.config;
        let forwarded = self.head.forwarded_for.get();
        if forwarded.is_none() && self.peer.is_loopback() && !cfg.disable_local_ip_warning {
            self.ctx.warn_local(self.peer);
        }
        self.set_client(clientip::client_ip(self.peer, forwarded, &cfg.trusted_proxies));
    }

    /// Whether the client reached us over TLS, as a trusted proxy says
    /// (`X-Forwarded-Proto: https`); only used to write the docs' examples.
    fn https(&self) -> bool {
        let proto = self.head.forwarded_proto.get().unwrap_or_default();
        proto.eq_ignore_ascii_case(b"https") && self.ctx.shared.config.trusted_proxies.contains(self.peer)
    }

    fn set_client(&mut self, client: IpAddr) {
        if client != self.client {
            self.client = client;
            self.client_text.clear();
            clientip::write_ip(&mut self.client_text, client);
        }
    }

    /// Executes the parsed request, complete at `now`, and appends its
    /// response to `out`. Returns the clock reading that ended it, if it
    /// took one; `Err` if the client went away while the request waited.
    async fn handle(&mut self, now: Now) -> Result<Option<Instant>, Stop> {
        let ctx = self.ctx;
        let shared = &ctx.shared;
        let client = self.client;
        // Before parsing: the buckets' cache misses overlap it.
        let aim = ctx.router.aim(net::client(client));
        let mut parked = Duration::ZERO;
        let periods = ctx.router.periods();
        let epoch = periods.epoch(now.at);
        let retry_after = || periods.retry_after_secs(Instant::now());
        let prepared = if self.discarded {
            Err(Error::ValueTooLarge)
        } else {
            api::prepare(&self.head, &self.body, client, &ctx.limits, &shared.secret_key, now.unix_ms)
        };
        let mut charged = false;
        let (route, conflict, response) = match prepared {
            Err(e) => (route::route_hint(&self.head.target), false, Response::from_error(e)),
            Ok(Action::Page(Route::Favicon)) => (Some(Route::Favicon), false, Response::new(204, http::Body::Text(""))),
            Ok(Action::Page(page)) => {
                let host = self.head.host.get().unwrap_or_default();
                let page_html = ctx.page.for_host(host, &shared.listen_text, self.https());
                (Some(page), false, Response::new(200, http::Body::Html(page_html)))
            }
            Ok(Action::Preflight(route)) => (Some(route), false, api::preflight(route)),
            Ok(Action::Store(api::StoreAction { op, cost, meta })) => {
                let charge = Some(Charge { aim, cost, epoch });
                charged = cost > 0;
                // Bytes beyond this request: the client pipelines.
                let pipelined = self.start < self.buf.len();
                let reply = ctx.router.run(charge, op, pipelined, now.unix_ms).await;
                let conflict =
                    matches!(reply, Reply::Wrote(WriteOutcome::Conflict { .. } | WriteOutcome::Existing { .. }));
                let response = api::respond(&meta, reply, &self.client_text, retry_after);
                (Some(meta.route), conflict, response)
            }
            Ok(Action::Wait(wait)) => {
                charged = true;
                match self.blocking_read(wait, Charge { aim, cost: route::READ_COST, epoch }, now).await {
                    Some((response, waited)) => {
                        parked = waited;
                        (Some(Route::Get), false, response)
                    }
                    None => return Err(Stop::Broken),
                }
            }
        };
        // Refusals for want of tokens (429) or of room for a waiter (503)
        // took none.
        self.paid |= charged && !matches!(response.status, 429 | 503);
        let mut ended = None;
        if shared.metrics_on {
            let route = metrics::route_index(route);
            let stats = ctx.stats();
            let end = *ended.insert(Instant::now());
            // Time parked is not request latency: it has its own histogram.
            let elapsed = end.saturating_duration_since(now.at).saturating_sub(parked);
            stats.request(route, response.status, response.error, elapsed.as_nanos() as u64);
            if conflict {
                stats.conflict(route);
            }
        }
        let head_only = self.head.method == Method::Head;
        // Asked to reconnect (`placement`): onto a core that takes new
        // connections, once this answer is written. Not with another
        // request already buffered behind this one: it would be dropped.
        let mut keep_alive = self.keep_alive();
        if keep_alive && self.start == self.buf.len() && self.ctx.shared.placement.take_one(self.ctx.id) {
            // The client reconnects as soon as it reads this answer: its
            // place under -maxConnsPerIP and the others is free before
            // then, or a client at its cap would be refused.
            self.permit = None;
            keep_alive = false;
            self.ctx.stats().connections_moved.add(1);
        }
        http::encode(&mut self.out, &response, &self.client_text, keep_alive, self.head.http10, head_only);
        Ok(ended)
    }

    /// `GET /get/<key>?wait=D`: park on the key's owner until the condition
    /// holds or the wait ends, watching the socket meanwhile so a client that
    /// leaves is noticed at once. Returns the answer and the time parked;
    /// `None`: the client went away.
    async fn blocking_read(&mut self, wait: api::WaitAction, charge: Charge, now: Now) -> Option<(Response, Duration)> {
        let ctx = self.ctx;
        let stats = ctx.stats();
        // Nothing is closed to make room for a waiter.
        let _permit = match ctx.shared.waiter_limits.admit(self.client, || false) {
            Ok(p) => p,
            Err(Refusal::IpFull) => return Some((Response::from_error(Error::TooManyWaitersFromIp), Duration::ZERO)),
            Err(Refusal::NetFull) => return Some((Response::from_error(Error::TooManyWaitersFromNet), Duration::ZERO)),
            Err(Refusal::ServerFull) => return Some((Response::from_error(Error::TooManyWaiters), Duration::ZERO)),
        };
        let periods = ctx.router.periods();
        let retry_after = || periods.retry_after_secs(Instant::now());
        let mut waited = Duration::ZERO;
        let reply = match ctx.router.wait(Some(charge), wait.key, wait.until, now.unix_ms).await {
            Err(immediate) => Some(immediate),
            Ok(parked) => {
                let since = Instant::now();
                let end = self.watch_while_waiting(parked, wait.timeout).await;
                // Another core's key is answered by its owner: a plain `Got`
                // means the owner found the condition met and never parked
                // it (a woken waiter's answer is `Woken`), so it is not a
                // wait, and its round trip stays in the request's own time.
                if !matches!(end, WaitEnd::Answer(Reply::Got(_))) {
                    waited = since.elapsed();
                    stats.waits_parked.add(1);
                    stats.waited.record_ns(waited.as_nanos() as u64);
                }
                match end {
                    WaitEnd::Answer(reply) => Some(reply),
                    WaitEnd::TimedOut => {
                        stats.wait_timeouts.add(1);
                        None
                    }
                    WaitEnd::ClientGone => return None,
                }
            }
        };
        Some((api::respond_wait(reply, wait.timeout_status, retry_after), waited))
    }

    /// Awaits a parked read, its deadline, and the socket at once. Bytes the
    /// client pipelines meanwhile are kept for the next request; EOF drops
    /// the waiter (its future's drop cancels it on the owner).
    async fn watch_while_waiting(&mut self, parked: WaitFuture<'_>, timeout: Duration) -> WaitEnd {
        let deadline = Instant::now() + timeout;
        let mut parked = std::pin::pin!(parked);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            self.make_room();
            if self.buf.len() >= http::MAX_HEAD {
                // A full buffer of pipelined requests: nothing more to read.
                return match monoio::time::timeout(left, parked).await {
                    Ok(reply) => WaitEnd::Answer(reply),
                    Err(_) => WaitEnd::TimedOut,
                };
            }
            let buf = std::mem::take(&mut self.buf);
            let (len, cap) = (buf.len(), buf.capacity());
            let canceller = Canceller::new();
            let read = self.stream.cancelable_read(buf.slice_mut(len..cap), canceller.handle());
            let mut read = std::pin::pin!(read);
            let sleep = monoio::time::sleep(left);
            let mut sleep = std::pin::pin!(sleep);
            let event = std::future::poll_fn(|cx| {
                if let Poll::Ready(reply) = parked.as_mut().poll(cx) {
                    return Poll::Ready(Event::Answer(reply));
                }
                if let Poll::Ready(result) = read.as_mut().poll(cx) {
                    return Poll::Ready(Event::Read(result));
                }
                if sleep.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Event::Deadline);
                }
                Poll::Pending
            })
            .await;
            let end = match event {
                Event::Read((result, slice)) => {
                    self.buf = slice.into_inner();
                    match result {
                        Ok(0) | Err(_) => return WaitEnd::ClientGone,
                        // Pipelined bytes: keep them and keep waiting.
                        Ok(_) => continue,
                    }
                }
                Event::Answer(reply) => WaitEnd::Answer(reply),
                Event::Deadline => WaitEnd::TimedOut,
            };
            // Take the read back (with anything it got) before answering.
            canceller.cancel();
            let (result, slice) = read.await;
            self.buf = slice.into_inner();
            if let Ok(0) = result {
                return WaitEnd::ClientGone;
            }
            return end;
        }
    }

    async fn flush(&mut self) -> Result<(), Stop> {
        self.flush_from(None).await
    }

    /// Writes the buffered answers within `-idleTimeout` of `from` (a clock
    /// reading of this pass, with nothing awaited since) or of now.
    async fn flush_from(&mut self, from: Option<Instant>) -> Result<(), Stop> {
        if self.out.is_empty() {
            self.owed = None;
            return Ok(());
        }
        let out = std::mem::take(&mut self.out);
        let from = from.unwrap_or_else(Instant::now);
        let deadline = monoio::time::Instant::from_std(from + self.ctx.shared.config.idle_timeout);
        let write = monoio::time::timeout_at(deadline, self.stream.write_all(out));
        let paid = std::mem::take(&mut self.paid);
        let Some(Ok((res, mut out))) = waiting(self.ctx, self.idle_id, paid, WRITE_GRACE, write).await else {
            return Err(Stop::Broken);
        };
        res.map_err(|_| Stop::Broken)?;
        out.clear();
        if out.capacity() > OUT_HIGH_WATER * 2 {
            out = Vec::new();
        }
        self.out = out;
        self.owed = None;
        Ok(())
    }

    /// Answers a request that cannot be served on this connection, then
    /// closes it gracefully: stop writing, drain a bounded amount of input.
    async fn reject(&mut self, e: Error) {
        let response = Response::from_error(e);
        let http10 = self.head.http10;
        http::encode(&mut self.out, &response, &self.client_text, false, http10, false);
        // In progress until written, like any answer (a draining server's
        // 503 included), but not through the linger after it.
        let answer = self.ctx.begin_request();
        let flushed = self.flush().await;
        drop(answer);
        if flushed.is_err() {
            return;
        }
        self.linger().await;
    }

    /// Closes gracefully after the last answer: stops writing, then reads
    /// and drops a bounded amount of input for a bounded time, so that a
    /// request the client sent meanwhile meets no reset that could destroy
    /// the answers before it.
    async fn linger(&mut self) {
        let _ = self.stream.shutdown().await;
        let until = Instant::now() + LINGER_TIME;
        let mut drained = 0;
        while drained < LINGER_BYTES {
            self.start = self.buf.len();
            let wait = until.saturating_duration_since(Instant::now());
            match self.read_more(wait).await {
                Ok(n) if n > 0 => drained += n,
                _ => break,
            }
        }
    }
}

/// How a parked blocking read ended.
enum WaitEnd {
    Answer(Reply),
    TimedOut,
    ClientGone,
}

/// What woke a waiting connection.
enum Event<R> {
    Answer(Reply),
    Read(R),
    Deadline,
}

enum ReadFail {
    Timeout,
    Io,
    /// Closed to make room for a new connection.
    Evicted,
}

/// How long a connection told to close (to make room) still has to take
/// the answers being written to it (`waiting`).
const WRITE_GRACE: Duration = Duration::from_secs(1);
/// A connection told to close while it waits for its client's bytes owes
/// it nothing: it closes at once.
const READ_GRACE: Duration = Duration::ZERO;

/// Runs `wait`, a wait for the client, with connection `id` counted as
/// waiting (`IdleConns`): the core may tell it to close to make room for a
/// new connection when the server is full, and the wait then ends with
/// `None` once `grace` has passed. Every wait for the client goes through
/// here: for its bytes between requests and inside one (a head or body
/// arriving), with `READ_GRACE`, so a client dribbling a request holds its
/// connection no more than one that sends nothing; and for it to take its
/// answers, with `WRITE_GRACE`, or a client that pipelines free requests
/// and never reads held its connection for the whole write timeout and a
/// few networks could fill `-maxConns` for nothing. Those answers are owed
/// (a write's `OK` among them): a client that takes them within the grace
/// gets them all, one that reads nothing, or too slowly, is closed, its
/// room already given to the new connection. The grace is a deadline, not
/// extended while the client reads: a trickle must not hold the room it
/// was told to give. What the server does for the connection (work on a
/// request, a parked blocking read) is never cut short. `paid`: the
/// request before this wait cost tokens (`IdleConns::idle`).
async fn waiting<F: Future>(ctx: &CoreCtx, id: u32, paid: bool, grace: Duration, wait: F) -> Option<F::Output> {
    ctx.idle.borrow_mut().idle(id, paid);
    let mut wait = std::pin::pin!(wait);
    let mut closing = None;
    let out = std::future::poll_fn(|cx| {
        if let Poll::Ready(out) = wait.as_mut().poll(cx) {
            return Poll::Ready(Some(out));
        }
        if closing.is_none() && ctx.idle.borrow_mut().evicted(id, cx.waker()) {
            if grace.is_zero() {
                return Poll::Ready(None);
            }
            closing = Some(Box::pin(monoio::time::sleep(grace)));
        }
        match closing.as_mut().map(|c| c.as_mut().poll(cx)) {
            Some(Poll::Ready(())) => Poll::Ready(None),
            _ => Poll::Pending,
        }
    })
    .await;
    ctx.idle.borrow_mut().busy(id);
    out
}
