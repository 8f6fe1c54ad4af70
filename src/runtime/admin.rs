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
//! connection over the cap takes the place of the one idle longest (so idle
//! connections cannot lock a scraper out), or is closed at once if none is
//! idle. The cores' counts are folded into the exporter once a second by a
//! timer task here, and on every scrape.
//!
//! - `/healthz`: 200 while the process runs (liveness).
//! - `/readyz`: 200 once the store is loaded and every core serves; 503
//!   while starting or draining, or while a core is stalled (readiness:
//!   take it out of a balancer).
//! - `/metrics`: the Prometheus text exposition.

use crate::runtime::exporter::Exporter;
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
use std::sync::Arc;
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
/// A refusal at the cap is logged at most this often.
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(60);

/// Starts the admin thread on an already bound listener. Returns the
/// address it serves.
pub fn start(shared: Arc<Shared>, listener: std::net::TcpListener) -> std::io::Result<std::net::SocketAddr> {
    let bound = listener.local_addr()?;
    listener.set_nonblocking(true)?;
    let exporter = Exporter::new(shared.clone()).map_err(std::io::Error::other)?;
    std::thread::Builder::new().name("admin".into()).spawn(move || {
        let run = async move {
            let listener = match TcpListener::from_std(listener) {
                Ok(l) => l,
                Err(e) => {
                    log::error!("admin server: cannot register its listener: {e}");
                    return;
                }
            };
            serve(shared, listener, exporter).await
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
    Ok(bound)
}

async fn serve(shared: Arc<Shared>, listener: TcpListener, exporter: Exporter) {
    let exporter = Rc::new(RefCell::new(exporter));
    {
        let exporter = exporter.clone();
        monoio::spawn(async move {
            let mut tick = monoio::time::interval(FOLD_EVERY);
            loop {
                tick.tick().await;
                exporter.borrow_mut().fold();
            }
        });
    }
    let open: Rc<RefCell<Vec<Rc<Slot>>>> = Rc::default();
    let mut last_refusal: Option<Instant> = None;
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                if !make_room(&open.borrow()) {
                    // Dropping the stream closes it.
                    if last_refusal.is_none_or(|t| t.elapsed() >= REFUSAL_LOG_EVERY) {
                        log::warn!(
                            "admin server: {MAX_CONNS} connections open, none idle: closed one from {peer} (logged at most once a minute)"
                        );
                        last_refusal = Some(Instant::now());
                    }
                    continue;
                }
                let _ = stream.set_nodelay(true);
                let slot = Rc::new(Slot::default());
                open.borrow_mut().push(slot.clone());
                let guard = Leave { open: open.clone(), slot };
                monoio::spawn(connection(shared.clone(), exporter.clone(), stream, guard));
            }
            Err(e) => {
                log::warn!("admin server: accept failed: {e}");
                monoio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// One open connection, as the accept loop sees it.
#[derive(Default)]
struct Slot {
    /// Since when it has been waiting for a request with nothing of it read
    /// (set as its last answer goes out), if it is.
    idle_since: Cell<Option<Instant>>,
    /// Told to close, to make room for a new connection.
    evicted: Cell<bool>,
    /// Wakes it while it waits for a request.
    waker: Cell<Option<Waker>>,
}

impl Slot {
    fn evict(&self) {
        self.evicted.set(true);
        if let Some(w) = self.waker.take() {
            w.wake();
        }
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

/// Whether a new connection may be served: under the cap, or once the
/// connection idle longest has been told to close.
fn make_room(open: &[Rc<Slot>]) -> bool {
    let staying = open.iter().filter(|s| !s.evicted.get());
    if staying.clone().count() < MAX_CONNS {
        return true;
    }
    let idlest = staying.filter_map(|s| s.idle_since.get().map(|t| (t, s))).min_by_key(|(t, _)| *t);
    match idlest {
        Some((_, s)) => {
            s.evict();
            true
        }
        None => false,
    }
}

/// A reader that refuses to read once its budget is spent: the budget is
/// refilled for each request, so one request can never make the decoder
/// buffer more than `MAX_REQUEST` bytes plus the one read that spent it (at
/// most the decoder's buffer, which only grows as reads fill it).
/// The first byte read of a request ends the connection's idleness.
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
            self.slot.idle_since.set(None);
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

fn route(shared: &Shared, exporter: &RefCell<Exporter>, method: &http::Method, path: &str) -> http::Response<HttpBody> {
    if method != http::Method::GET && method != http::Method::HEAD {
        let mut r = respond(405, "text/plain; charset=utf-8", "Method not allowed\n");
        r.headers_mut().insert(http::header::ALLOW, http::HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    match path {
        "/metrics" => respond(200, "text/plain; version=0.0.4; charset=utf-8", exporter.borrow_mut().render()),
        "/healthz" => respond(200, "text/plain; charset=utf-8", "ok\n"),
        "/readyz" => match shared.readiness() {
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

async fn connection(shared: Arc<Shared>, exporter: Rc<RefCell<Exporter>>, stream: TcpStream, guard: Leave) {
    let slot = guard.slot.clone();
    let (r, w) = stream.into_split();
    let budget = Rc::new(Cell::new(MAX_REQUEST));
    let reader = Budgeted { inner: r, left: budget.clone(), slot: slot.clone() };
    let mut decoder = RequestDecoder::new_with_timeout(reader, IDLE);
    let mut encoder = GenericEncoder::new(w);
    slot.idle_since.set(Some(Instant::now()));
    loop {
        budget.set(MAX_REQUEST);
        let next = {
            let mut read = std::pin::pin!(monoio::time::timeout(IDLE + HEAD, decoder.next()));
            std::future::poll_fn(|cx| {
                if slot.evicted.get() {
                    return Poll::Ready(None);
                }
                slot.waker.set(Some(cx.waker().clone()));
                read.as_mut().poll(cx).map(Some)
            })
            .await
        };
        // Evicted, or past the deadline: close.
        let Some(Ok(next)) = next else { return };
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
        let mut response = route(&shared, &exporter, req.method(), req.uri().path());
        drop(req);
        // Read (and drop) any body before the next request, within the budget.
        if monoio::time::timeout(HEAD, decoder.fill_payload()).await.map_or(true, |r| r.is_err()) {
            return;
        }
        if head_only {
            *response.body_mut() = HttpBody::Ready(Some(Bytes::new()));
        }
        if close {
            response.headers_mut().insert(http::header::CONNECTION, http::HeaderValue::from_static("close"));
        }
        // Idle from here: a client that has its answer may be waiting for
        // nothing more, and one evicted while its answer is written still
        // gets the answer.
        slot.idle_since.set(Some(Instant::now()));
        let sent = monoio::time::timeout(WRITE, async {
            encoder.send(response).await?;
            Sink::<http::Response<HttpBody>>::flush(&mut encoder).await
        })
        .await;
        if !matches!(sent, Ok(Ok(()))) || close {
            return;
        }
    }
}
