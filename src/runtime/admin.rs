//! The admin server: `/metrics`, `/healthz`, `/readyz` on `-metricsAddr`,
//! never on the public port, on a monoio runtime thread of its own (off the
//! data cores), speaking HTTP/1.1 through `monoio-http`.
//!
//! Every connection is its own task, so a slow or idle client can never
//! delay another's scrape (the old admin thread served one connection at a
//! time, and ten idle connections held a scrape for twenty seconds). Keep-
//! alive is supported; deadlines bound everything a client controls: an
//! idle connection is closed after `IDLE`, a request head must complete
//! within `HEAD` of its first byte, and at most `MAX_REQUEST` bytes are read
//! per request (monoio-http's decoder has no head limit of its own, so the
//! reader it is given stops there). At most `MAX_CONNS` connections are
//! open: the process has one descriptor limit, which the public port needs,
//! so anyone who can reach this address must not be able to spend it. A
//! connection over the cap takes the place of one idle for a second or
//! more or, if there is none, of the one in its state longest (a request
//! begun longest ago, say): neither idle connections nor slow requests can
//! lock a scraper out (a scrape takes milliseconds, so it is never the
//! oldest for long), and an evicted connection closes at once, whatever it
//! was doing. The cores' counters and gauges are folded into the exporter
//! once a second by a timer task here, and on every scrape; histograms are
//! written from the cores' buckets at each scrape (`exporter`).
//!
//! The server starts this thread before it recovers the store, and hands
//! it the store's shared state and the exporter only once recovered
//! (`Attach`): a long replay is then a process that answers its liveness
//! and says it is starting, not one whose admin address refuses or hangs
//! (a liveness probe would kill it, and every restart would replay again).
//!
//! - `/healthz`: 200 while the process runs (liveness), recovery included.
//! - `/readyz`: 200 once the store is loaded and every core serves; 503
//!   while starting (recovery included) or draining, or while a core is
//!   stalled (readiness: take it out of a balancer).
//! - `/metrics`: the Prometheus text exposition; while the store is
//!   recovered, only `rendezvous_ready 0`, the build and the process
//!   metrics (`exporter::starting_text`): the process is up, not ready.

use crate::runtime::exporter::{starting_text, Exporter};
use crate::runtime::shared::{Readiness, Shared};
use crate::runtime::turns::Ring;
use bytes::Bytes;
use monoio::buf::{IoBufMut, IoVecBufMut};
use monoio::io::sink::Sink;
use monoio::io::stream::Stream;
use monoio::io::{AsyncReadRent, Splitable};
use monoio::net::{TcpListener, TcpStream};
use monoio_http::common::body::HttpBody;
use monoio_http::h1::codec::decoder::{FillPayload, RequestDecoder};
use monoio_http::h1::codec::encoder::GenericEncoder;
use std::cell::{Cell, RefCell};
use std::future::Future;
use std::rc::Rc;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

/// An idle keep-alive connection is closed after this long.
const IDLE: Duration = Duration::from_secs(60);
/// A request must arrive whole within this long of its first byte.
const HEAD: Duration = Duration::from_secs(5);
/// Writing a response must not take longer than this.
const WRITE: Duration = Duration::from_secs(10);
/// Bytes read per request, at most (heads and any body).
const MAX_REQUEST: usize = 16 * 1024;
const FOLD_EVERY: Duration = Duration::from_secs(1);
/// Open connections, at most. A scraper, the health checks of a supervisor
/// and a balancer or two need a handful.
const MAX_CONNS: usize = 64;
/// An eviction at the cap is logged at most this often.
const EVICTION_LOG_EVERY: Duration = Duration::from_secs(60);
/// An idle connection this old makes room before any request does.
const STALE_IDLE: Duration = Duration::from_secs(1);

/// The recovered store and its exporter, set once by `Attach::attach`.
/// Only the admin thread uses the exporter; the lock is never contended.
type Live = OnceLock<(Arc<Shared>, Mutex<Exporter>)>;

/// Hands the admin thread the recovered store (see the module doc).
pub struct Attach(Arc<Live>, f64);

impl Attach {
    /// From now on `/metrics` and `/readyz` read `shared`.
    pub fn attach(self, shared: Arc<Shared>) -> Result<(), String> {
        let exporter = Exporter::new(shared.clone(), self.1)?;
        // `self` is consumed: the one `set`, which cannot find it set.
        let _ = self.0.set((shared, Mutex::new(exporter)));
        Ok(())
    }
}

fn exporter(lock: &Mutex<Exporter>) -> std::sync::MutexGuard<'_, Exporter> {
    lock.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Starts the admin thread on an already bound listener, before the store
/// is recovered. Returns the address it serves and the handle that gives
/// it the store.
/// `start_unix`: the process's start (`exporter::start_time`).
pub fn start(listener: std::net::TcpListener, start_unix: f64) -> std::io::Result<(std::net::SocketAddr, Attach)> {
    let bound = listener.local_addr()?;
    listener.set_nonblocking(true)?;
    let live: Arc<Live> = Arc::default();
    let theirs = live.clone();
    std::thread::Builder::new().name("admin".into()).spawn(move || {
        let run = async move {
            let listener = match TcpListener::from_std(listener) {
                Ok(l) => l,
                Err(e) => {
                    log::error!("admin server: cannot register its listener: {e}");
                    return;
                }
            };
            serve(theirs, listener, start_unix).await
        };
        // Through `opened_by`, so a core never takes this ring for its own.
        let uring = Ring::opened_by(|| monoio::RuntimeBuilder::<monoio::IoUringDriver>::new().enable_timer().build());
        match uring {
            Ok((mut rt, _)) => rt.block_on(run),
            Err(_) => match monoio::RuntimeBuilder::<monoio::LegacyDriver>::new().enable_timer().build() {
                Ok(mut rt) => rt.block_on(run),
                Err(e) => log::error!("admin server: cannot start a runtime: {e}"),
            },
        }
    })?;
    Ok((bound, Attach(live, start_unix)))
}

async fn serve(live: Arc<Live>, listener: TcpListener, start_unix: f64) {
    {
        let live = live.clone();
        monoio::spawn(async move {
            let mut tick = monoio::time::interval(FOLD_EVERY);
            loop {
                tick.tick().await;
                if let Some((_, e)) = live.get() {
                    exporter(e).fold();
                }
            }
        });
    }
    let open: Rc<RefCell<Vec<Rc<Slot>>>> = Rc::default();
    let mut last_busy_eviction: Option<Instant> = None;
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                if make_room(&open.borrow()) == Some(Activity::Busy)
                    && last_busy_eviction.is_none_or(|t| t.elapsed() >= EVICTION_LOG_EVERY)
                {
                    log::warn!(
                        "admin server: {MAX_CONNS} connections open, none idle: the oldest request made room for a \
                         connection from {peer} (logged at most once a minute)"
                    );
                    last_busy_eviction = Some(Instant::now());
                }
                let _ = stream.set_nodelay(true);
                let slot = Rc::new(Slot::new());
                open.borrow_mut().push(slot.clone());
                let guard = Leave { open: open.clone(), slot };
                monoio::spawn(connection(live.clone(), stream, guard, start_unix));
            }
            Err(e) => {
                log::warn!("admin server: accept failed: {e}");
                monoio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// What a connection is doing, for the choice of which makes room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Activity {
    /// Waiting for a request, nothing of it read; or writing an answer
    /// (its client may be waiting for nothing more).
    Idle,
    /// Reading a request: its first byte has arrived.
    Busy,
}

/// One open connection, as the accept loop sees it.
struct Slot {
    /// What it is doing, and since when.
    state: Cell<(Activity, Instant)>,
    /// Told to close, to make room for a new connection.
    evicted: Cell<bool>,
    /// Wakes its task, whatever it waits for.
    waker: Cell<Option<Waker>>,
}

impl Slot {
    fn new() -> Slot {
        Slot { state: Cell::new((Activity::Idle, Instant::now())), evicted: Cell::new(false), waker: Cell::new(None) }
    }

    fn set(&self, activity: Activity) {
        self.state.set((activity, Instant::now()));
    }

    fn evict(&self) {
        self.evicted.set(true);
        if let Some(w) = self.waker.take() {
            w.wake();
        }
    }

    /// Runs `work` until it ends, or until the connection is evicted (`None`).
    async fn unless_evicted<F: Future>(&self, work: F) -> Option<F::Output> {
        let mut work = std::pin::pin!(work);
        std::future::poll_fn(|cx| {
            if self.evicted.get() {
                return Poll::Ready(None);
            }
            self.waker.set(Some(cx.waker().clone()));
            work.as_mut().poll(cx).map(Some)
        })
        .await
    }
}

/// Removes a connection's slot when its task ends, however it ends.
struct Leave {
    open: Rc<RefCell<Vec<Rc<Slot>>>>,
    slot: Rc<Slot>,
}

impl Drop for Leave {
    fn drop(&mut self) {
        self.open.borrow_mut().retain(|s| !Rc::ptr_eq(s, &self.slot));
    }
}

/// Makes room for one more connection at the cap: tells the connection
/// idle longest to close if it has been idle for `STALE_IDLE`, or else the
/// one that has been in its state longest, busy or idle. Returns what the
/// evicted one was doing, if one was. A connection just accepted, or just
/// answered, is idle but recent: ranked by time alone it goes after every
/// older request, so a client churning connections cannot evict a scraper
/// in the milliseconds before its request's first byte is read.
fn make_room(open: &[Rc<Slot>]) -> Option<Activity> {
    let staying = open.iter().filter(|s| !s.evicted.get());
    if staying.clone().count() < MAX_CONNS {
        return None;
    }
    let now = Instant::now();
    let oldest = staying.min_by_key(|s| {
        let (activity, since) = s.state.get();
        let stale = activity == Activity::Idle && now.duration_since(since) >= STALE_IDLE;
        (!stale, since)
    })?;
    oldest.evict();
    Some(oldest.state.get().0)
}

/// The next request, or `None` when its head is not whole within `HEAD`
/// of its first byte (the decoder's own timeout covers only the wait for
/// that byte).
async fn next_request<S: Stream>(decoder: &mut S, slot: &Slot) -> Option<Option<S::Item>> {
    let mut read = std::pin::pin!(decoder.next());
    let mut head: Option<std::pin::Pin<Box<monoio::time::Sleep>>> = None;
    std::future::poll_fn(|cx| {
        if let Poll::Ready(r) = read.as_mut().poll(cx) {
            return Poll::Ready(Some(r));
        }
        if slot.state.get().0 == Activity::Busy {
            let deadline = head.get_or_insert_with(|| Box::pin(monoio::time::sleep(HEAD)));
            if deadline.as_mut().poll(cx).is_ready() {
                return Poll::Ready(None);
            }
        }
        Poll::Pending
    })
    .await
}

/// A reader that refuses to read once its budget is spent: the budget is
/// refilled for each request, so one request can never make the decoder
/// buffer more than `MAX_REQUEST` bytes plus the one read that spent it (at
/// most the decoder's buffer, which only grows as reads fill it).
/// The first byte read of a request makes the connection busy.
struct Budgeted<R> {
    inner: R,
    left: Rc<Cell<usize>>,
    slot: Rc<Slot>,
}

impl<R: AsyncReadRent> AsyncReadRent for Budgeted<R> {
    async fn read<T: IoBufMut>(&mut self, buf: T) -> monoio::BufResult<usize, T> {
        let left = self.left.get();
        if left == 0 {
            let e = std::io::Error::new(std::io::ErrorKind::InvalidData, "request too large");
            return (Err(e), buf);
        }
        let (r, buf) = self.inner.read(buf).await;
        if let Ok(n @ 1..) = r {
            self.left.set(left.saturating_sub(n));
            if self.slot.state.get().0 == Activity::Idle {
                self.slot.set(Activity::Busy);
            }
        }
        (r, buf)
    }

    async fn readv<T: IoVecBufMut>(&mut self, buf: T) -> monoio::BufResult<usize, T> {
        // The decoder reads into one buffer; vectored reads get nothing.
        (Ok(0), buf)
    }
}

fn respond(status: u16, content_type: &str, body: impl Into<Bytes>) -> http::Response<HttpBody> {
    let mut r = http::Response::new(HttpBody::Ready(Some(body.into())));
    *r.status_mut() = http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR);
    if let Ok(v) = http::HeaderValue::from_str(content_type) {
        r.headers_mut().insert(http::header::CONTENT_TYPE, v);
    }
    r
}

/// `live`: the store and its exporter, `None` while it is being recovered.
/// `start_unix`: the process's start (the process metrics while recovering).
fn route(
    live: Option<&(Arc<Shared>, Mutex<Exporter>)>,
    start_unix: f64,
    method: &http::Method,
    path: &str,
) -> http::Response<HttpBody> {
    if method != http::Method::GET && method != http::Method::HEAD {
        let mut r = respond(405, "text/plain; charset=utf-8", "Method not allowed\n");
        r.headers_mut().insert(http::header::ALLOW, http::HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    match path {
        "/healthz" => respond(200, "text/plain; charset=utf-8", "ok\n"),
        "/metrics" => match live {
            Some((_, e)) => respond(200, "text/plain; version=0.0.4; charset=utf-8", exporter(e).render()),
            None => respond(200, "text/plain; version=0.0.4; charset=utf-8", starting_text(start_unix)),
        },
        // Recovering is starting.
        "/readyz" => match live.map_or(Readiness::Starting, |(shared, _)| shared.readiness()) {
            Readiness::Ready => respond(200, "text/plain; charset=utf-8", "ready\n"),
            Readiness::Starting => respond(503, "text/plain; charset=utf-8", "starting\n"),
            Readiness::Draining => respond(503, "text/plain; charset=utf-8", "draining\n"),
            Readiness::Stalled { core, for_ms } => {
                let why = format!("stalled: core {core} has not run for {:.1} s\n", for_ms as f64 / 1000.0);
                respond(503, "text/plain; charset=utf-8", why)
            }
        },
        _ => respond(404, "text/plain; charset=utf-8", "Not found: try /metrics, /healthz or /readyz\n"),
    }
}

async fn connection(live: Arc<Live>, stream: TcpStream, guard: Leave, start_unix: f64) {
    let slot = guard.slot.clone();
    let (r, w) = stream.into_split();
    let budget = Rc::new(Cell::new(MAX_REQUEST));
    let reader = Budgeted { inner: r, left: budget.clone(), slot: slot.clone() };
    let mut decoder = RequestDecoder::new_with_timeout(reader, IDLE);
    let mut encoder = GenericEncoder::new(w);
    loop {
        budget.set(MAX_REQUEST);
        // Evicted, or past a deadline: close.
        let Some(Ok(Some(next))) =
            slot.unless_evicted(monoio::time::timeout(IDLE + HEAD, next_request(&mut decoder, &slot))).await
        else {
            return;
        };
        let req = match next {
            Some(Ok(req)) => req,
            // EOF, idle timeout, garbage, or over the budget: close.
            Some(Err(_)) | None => return,
        };
        let head_only = req.method() == http::Method::HEAD;
        let close = req
            .headers()
            .get(http::header::CONNECTION)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.eq_ignore_ascii_case("close"))
            || req.version() == http::Version::HTTP_10;
        let mut response = route(live.get(), start_unix, req.method(), req.uri().path());
        drop(req);
        // Read (and drop) any body before the next request, within the budget.
        let body = slot.unless_evicted(monoio::time::timeout(HEAD, decoder.fill_payload())).await;
        if !matches!(body, Some(Ok(Ok(_)))) {
            return;
        }
        if head_only {
            *response.body_mut() = HttpBody::Ready(Some(Bytes::new()));
        }
        if close {
            response.headers_mut().insert(http::header::CONNECTION, http::HeaderValue::from_static("close"));
        }
        // Idle from here: a client that has its answer may be waiting for
        // nothing more. (A request already buffered behind this one counts
        // as idle too: at the cap it may be dropped with its connection.)
        slot.set(Activity::Idle);
        let sent = slot
            .unless_evicted(monoio::time::timeout(WRITE, async {
                encoder.send(response).await?;
                Sink::<http::Response<HttpBody>>::flush(&mut encoder).await
            }))
            .await;
        if !matches!(sent, Some(Ok(Ok(())))) || close {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(activity: Activity, age_ms: u64) -> Rc<Slot> {
        let s = Slot::new();
        s.state.set((activity, Instant::now() - Duration::from_millis(age_ms)));
        Rc::new(s)
    }

    #[test]
    fn room_is_made_by_the_idlest_then_by_the_oldest_request() {
        // Under the cap: nobody goes.
        let few: Vec<Rc<Slot>> = (0..MAX_CONNS - 1).map(|i| slot(Activity::Idle, i as u64)).collect();
        assert_eq!(make_room(&few), None);
        assert!(few.iter().all(|s| !s.evicted.get()));
        // At the cap: the connection idle longest (a second or more), though
        // requests are older.
        let mut open: Vec<Rc<Slot>> = (0..MAX_CONNS - 2).map(|i| slot(Activity::Busy, 10_000 + i as u64)).collect();
        open.push(slot(Activity::Idle, 1_005));
        open.push(slot(Activity::Idle, 1_050));
        assert_eq!(make_room(&open), Some(Activity::Idle));
        assert!(open[MAX_CONNS - 1].evicted.get() && !open[MAX_CONNS - 2].evicted.get());
        // Evicted connections no longer count: one more comes in, the other idle one goes.
        open.push(slot(Activity::Busy, 0));
        assert_eq!(make_room(&open), Some(Activity::Idle));
        assert!(open[MAX_CONNS - 2].evicted.get());
        // None idle: the request begun longest ago, never a refusal.
        open.push(slot(Activity::Busy, 0));
        assert_eq!(make_room(&open), Some(Activity::Busy));
        assert!(open[MAX_CONNS - 3].evicted.get(), "the oldest request (10,000 + 61 ms)");
        assert_eq!(open.iter().filter(|s| !s.evicted.get()).count(), MAX_CONNS - 1);
        // A connection just accepted (idle, not yet read) stays while older
        // requests are open: a client churning connections cannot evict it.
        let mut open: Vec<Rc<Slot>> = (0..MAX_CONNS - 1).map(|i| slot(Activity::Busy, 3_000 + i as u64)).collect();
        open.push(slot(Activity::Idle, 2));
        assert_eq!(make_room(&open), Some(Activity::Busy));
        assert!(!open[MAX_CONNS - 1].evicted.get());
        assert!(open[MAX_CONNS - 2].evicted.get(), "the oldest request");
    }
}
