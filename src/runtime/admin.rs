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
//! reader it is given stops there). The cores' counts are folded into the
//! exporter once a second by a timer task here, and on every scrape.
//!
//! - `/healthz`: 200 while the process runs (liveness).
//! - `/readyz`: 200 once the store is loaded and every core serves; 503
//!   while starting or draining (readiness: take it out of a balancer).
//! - `/metrics`: the Prometheus text exposition.

use crate::runtime::exporter::Exporter;
use crate::runtime::shared::{Phase, Shared};
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
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

/// An idle keep-alive connection is closed after this long.
const IDLE: Duration = Duration::from_secs(60);
/// A request must arrive whole within this long of its first byte.
const HEAD: Duration = Duration::from_secs(5);
/// Writing a response must not take longer than this.
const WRITE: Duration = Duration::from_secs(10);
/// Bytes read per request, at most (heads and any body).
const MAX_REQUEST: usize = 16 * 1024;
const FOLD_EVERY: Duration = Duration::from_secs(1);

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
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let _ = stream.set_nodelay(true);
                monoio::spawn(connection(shared.clone(), exporter.clone(), stream));
            }
            Err(e) => {
                log::warn!("admin server: accept failed: {e}");
                monoio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// A reader that refuses to read once its budget is spent: the budget is
/// refilled for each request, so one request can never make the decoder
/// buffer more than `MAX_REQUEST` bytes plus the one read that spent it (at
/// most the decoder's buffer, which only grows as reads fill it).
struct Budgeted<R> {
    inner: R,
    left: Rc<Cell<usize>>,
}

impl<R: AsyncReadRent> AsyncReadRent for Budgeted<R> {
    async fn read<T: IoBufMut>(&mut self, buf: T) -> monoio::BufResult<usize, T> {
        let left = self.left.get();
        if left == 0 {
            let e = std::io::Error::new(std::io::ErrorKind::InvalidData, "request too large");
            return (Err(e), buf);
        }
        let (r, buf) = self.inner.read(buf).await;
        if let Ok(n) = r {
            self.left.set(left.saturating_sub(n));
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
        "/readyz" => match shared.phase.get() {
            Phase::Ready => respond(200, "text/plain; charset=utf-8", "ready\n"),
            Phase::Starting => respond(503, "text/plain; charset=utf-8", "starting\n"),
            Phase::Draining => respond(503, "text/plain; charset=utf-8", "draining\n"),
        },
        _ => respond(404, "text/plain; charset=utf-8", "Not found: try /metrics, /healthz or /readyz\n"),
    }
}

async fn connection(shared: Arc<Shared>, exporter: Rc<RefCell<Exporter>>, stream: TcpStream) {
    let (r, w) = stream.into_split();
    let budget = Rc::new(Cell::new(MAX_REQUEST));
    let mut decoder = RequestDecoder::new_with_timeout(Budgeted { inner: r, left: budget.clone() }, IDLE);
    let mut encoder = GenericEncoder::new(w);
    loop {
        budget.set(MAX_REQUEST);
        let Ok(next) = monoio::time::timeout(IDLE + HEAD, decoder.next()).await else { return };
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
