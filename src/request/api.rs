//! The Rendezvous API: route a parsed request, decode its arguments (key,
//! `ttl`, `wait`, owner secret, expected value, entity tags, client IP), and
//! turn the owner's reply into a response.
//!
//! Everything here is synchronous and pure: `prepare` produces the docs page,
//! a CORS preflight answer, a store operation with its rate-limit cost, or a
//! blocking read; `respond` maps a `Reply` to a `Response`. The connection
//! task does the awaiting in between. Validation errors are decided here,
//! before any token is charged ("errors before routing cost nothing").

use crate::request::error::Error;
use crate::request::http::{self, Body, Method, RequestHead, Response};
use crate::request::route::{self, CondArgs, Kind, Route};
use crate::state::budget::{OverQuota, Scope};
use crate::state::command::{Op, Reply};
use crate::state::net;
use crate::state::ratelimit::Refused;
use crate::state::secret::SecretKey;
use crate::state::shard::{Found, IfMatch, Write, WriteOutcome};
use crate::state::waiters::WaitFor;
use std::net::IpAddr;
use std::time::Duration;

/// The limits the API enforces (from the flags).
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_key_size: usize,
    pub max_value_size: usize,
    pub max_ttl: Duration,
    pub max_wait: Duration,
}

/// A request ready to execute.
#[derive(Debug)]
pub enum Action {
    /// A page of this server (the docs page, the favicon).
    Page(Route),
    /// A CORS preflight (`OPTIONS`) on this route: answered without charging tokens.
    Preflight(Route),
    Store(StoreAction),
    Wait(WaitAction),
}

/// A store operation, its rate-limit cost, and what the response needs.
#[derive(Debug)]
pub struct StoreAction {
    pub op: Op,
    pub cost: u32,
    pub meta: ReplyMeta,
}

/// What `respond` needs to know about the request.
#[derive(Debug)]
pub struct ReplyMeta {
    pub route: Route,
    /// An `ip/` write: a success answers the client IP instead of `OK`.
    pub ip_key: bool,
    /// `If-None-Match` on a GET: 304 when the current version is listed
    /// (`None` inside: `*`, any version).
    pub if_none_match: Option<Option<Vec<u64>>>,
}

/// A blocking read (`GET /get/<key>?wait=D`).
#[derive(Debug)]
pub struct WaitAction {
    pub key: Box<[u8]>,
    pub until: WaitFor,
    pub timeout: Duration,
    /// Answer on timeout: 404 (waiting for creation) or 304 (for a change).
    pub timeout_status: u16,
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Percent-decodes once; a `%` not followed by two hex digits is an error.
pub fn percent_decode(raw: &[u8]) -> Result<Vec<u8>, Error> {
    let mut i = 0;
    while let Some(p) = raw[i..].iter().position(|&b| b == b'%') {
        let at = i + p;
        match (raw.get(at + 1).copied().and_then(hex), raw.get(at + 2).copied().and_then(hex)) {
            (Some(_), Some(_)) => i = at + 3,
            _ => return Err(Error::BadPercentEncoding),
        }
    }
    Ok(percent_encoding::percent_decode(raw).collect())
}

/// Decodes and checks a key (`-maxKeySize` counts decoded bytes, before
/// `ip/` expansion).
pub fn decode_key(raw: &[u8], max_key_size: usize) -> Result<Vec<u8>, Error> {
    // Cheap early exit: the encoded form is at least as long as the decoded one,
    // so only a raw key over 3x the limit is certainly too long.
    if raw.len() > max_key_size.saturating_mul(3) {
        return Err(Error::KeyTooLong);
    }
    let key = percent_decode(raw)?;
    if key.is_empty() {
        return Err(Error::EmptyKey);
    }
    if key.len() > max_key_size {
        return Err(Error::KeyTooLong);
    }
    Ok(key)
}

/// A duration query parameter: `None` if absent, else at most `max`;
/// zero, negative or garbage is an error.
fn duration_param(query: Option<&[u8]>, name: &[u8], max: Duration) -> Result<Option<Duration>, ()> {
    let Some(query) = query else { return Ok(None) };
    let Some(param) =
        query.split(|&b| b == b'&').find(|p| p.strip_prefix(name).is_some_and(|r| r.is_empty() || r[0] == b'='))
    else {
        return Ok(None);
    };
    // `?ttl` with no value is unparsable, not absent.
    let raw = param.get(name.len() + 1..).ok_or(())?;
    let decoded = percent_decode(raw).map_err(|_| ())?;
    let text = std::str::from_utf8(&decoded).map_err(|_| ())?;
    let d = crate::duration::parse_positive(text).map_err(|_| ())?;
    Ok(Some(d.min(max)))
}

/// The TTL asked for with `?ttl=`: absent means the maximum, above the
/// maximum is capped, zero/negative/garbage is a 400.
pub fn ttl(query: Option<&[u8]>, max: Duration) -> Result<Duration, Error> {
    Ok(duration_param(query, b"ttl", max).map_err(|()| Error::BadTtl)?.unwrap_or(max))
}

/// `ip/<rest>` becomes `ip/<client-ip>/<rest>`; other keys are unchanged.
pub fn expand_ip_key(key: Vec<u8>, client_ip: IpAddr) -> (Vec<u8>, bool) {
    let Some(rest) = key.strip_prefix(b"ip/") else {
        return (key, false);
    };
    let ip = client_ip.to_string();
    let mut out = Vec::with_capacity(4 + ip.len() + rest.len());
    out.extend_from_slice(b"ip/");
    out.extend_from_slice(ip.as_bytes());
    out.push(b'/');
    out.extend_from_slice(rest);
    (out, true)
}

/// Decodes a request into an action. `now_ms` is the Unix time in ms.
pub fn prepare(
    head: &RequestHead,
    body: &[u8],
    client_ip: IpAddr,
    limits: &Limits,
    secrets: &SecretKey,
    now_ms: u64,
) -> Result<Action, Error> {
    if head.method == Method::Options {
        return route::route_hint(&head.target).map(Action::Preflight).ok_or(Error::NoSuchRoute);
    }
    let (route, raw_key, query) = route::match_target(head.method, &head.target)?;
    let spec = route.spec();
    let decode = match spec.kind {
        Kind::Page => return Ok(Action::Page(route)),
        Kind::Read => None,
        Kind::Write(decode) => Some(decode),
    };
    let key = decode_key(raw_key, limits.max_key_size)?;
    let Some(decode) = decode else {
        let if_none_match = head.if_none_match.get().map(http::parse_etags).transpose()?;
        let wait = duration_param(query, b"wait", limits.max_wait).map_err(|()| Error::BadWait)?;
        if let Some(timeout) = wait {
            let (until, timeout_status) = match (head.expected.get(), if_none_match) {
                (Some(v), _) => (WaitFor::ValueDiffers(v.into()), 304),
                (None, Some(Some(tags))) => (WaitFor::VersionDiffers(tags), 304),
                (None, _) => (WaitFor::Exists, 404),
            };
            return Ok(Action::Wait(WaitAction { key: key.into_boxed_slice(), until, timeout, timeout_status }));
        }
        return Ok(Action::Store(StoreAction {
            op: Op::Get { key: key.into_boxed_slice() },
            cost: spec.cost,
            meta: ReplyMeta { route, ip_key: false, if_none_match },
        }));
    };
    let ttl = if spec.takes_ttl { ttl(query, limits.max_ttl)? } else { limits.max_ttl };
    // Sub-millisecond TTLs round up so that a positive TTL never means "already expired".
    let ttl_ms = (ttl.as_nanos().div_ceil(1_000_000)) as u64;
    let secret = head.secret.get().filter(|s| !s.is_empty());
    if body.len() + secret.map_or(0, <[u8]>::len) > limits.max_value_size {
        return Err(Error::ValueTooLarge);
    }
    let cond = decode(CondArgs { expected: head.expected.get() })?;
    let value = if cond.stores_body() { body } else { &[][..] };
    let (key, ip_key) = expand_ip_key(key, client_ip);
    let secret = secret.map(|s| secrets.hash(&key, s));
    let mut write =
        Write::new(&key, value, secret, now_ms.saturating_add(ttl_ms), cond).map_err(|_| Error::KeyTooLong)?;
    // A key this write creates counts against this client's quotas.
    write.entry.set_creator(net::client(client_ip));
    write.if_match = match head.if_match.get().map(http::parse_etags).transpose()? {
        None => None,
        Some(None) => Some(IfMatch::Any),
        Some(Some(tags)) => Some(IfMatch::Versions(tags)),
    };
    Ok(Action::Store(StoreAction {
        op: Op::Write(write),
        cost: spec.cost,
        meta: ReplyMeta { route, ip_key, if_none_match: None },
    }))
}

fn expires_header(ms: u64) -> Option<u64> {
    Some(ms / 1000)
}

/// The answer to a CORS preflight: the route's methods are allowed.
pub fn preflight(route: Route) -> Response {
    let mut r = Response::new(204, Body::Text(""));
    r.preflight = Some(route.spec().allow);
    r
}

/// Builds the response for an executed store action. `retry_after` is only
/// called for a rate-limited request; `client_ip` is the detected address.
pub fn respond(action: &ReplyMeta, reply: Reply, client_ip: &str, retry_after: impl FnOnce() -> u64) -> Response {
    let created_header = action.route.spec().reports_created;
    match reply {
        Reply::Limited(refused) => Response::from_error(limited(refused, retry_after())),
        Reply::Lost => Response::from_error(Error::Internal),
        Reply::ShuttingDown => Response::from_error(Error::ShuttingDown),
        Reply::Unavailable => Response::from_error(Error::LogUnavailable),
        // Waiter replies never reach `respond`; treat them as a miss.
        Reply::Parked | Reply::Cancelled | Reply::Woken(_) | Reply::Got(None) => {
            Response::from_error(Error::KeyNotFound)
        }
        Reply::Got(Some(found)) => {
            let unchanged = match &action.if_none_match {
                Some(None) => true,
                Some(Some(tags)) => tags.contains(&found.version),
                None => false,
            };
            if unchanged {
                let mut r = Response::new(304, Body::Text(""));
                r.etag = Some(found.version);
                r.expires_at = expires_header(found.expires_ms);
                return r;
            }
            found_response(found)
        }
        Reply::Wrote(outcome) => match outcome {
            WriteOutcome::Stored { created, expires_ms, version } => {
                let body = if action.ip_key { Body::OwnedText(client_ip.to_owned()) } else { Body::Text("OK") };
                let mut r = Response::new(200, body);
                r.expires_at = expires_header(expires_ms);
                r.created = created_header.then_some(created);
                r.etag = Some(version);
                r
            }
            WriteOutcome::Existing { value, expires_ms, version } => {
                let mut r = Response::new(200, Body::Bytes(value));
                r.expires_at = expires_header(expires_ms);
                r.created = created_header.then_some(false);
                r.etag = Some(version);
                r
            }
            WriteOutcome::Conflict { value, expires_ms, version } => {
                let mut r = Response::new(409, Body::Bytes(value));
                r.expires_at = expires_header(expires_ms);
                r.created = created_header.then_some(false);
                r.etag = Some(version);
                r
            }
            WriteOutcome::Deleted { .. } => Response::new(200, Body::Text("OK")),
            WriteOutcome::NotFound => Response::from_error(Error::KeyNotFound),
            WriteOutcome::Forbidden => Response::from_error(Error::WrongSecret),
            WriteOutcome::PreconditionFailed { version } => {
                let mut r = Response::from_error(Error::PreconditionFailed);
                r.etag = version;
                r
            }
            WriteOutcome::Full => Response::from_error(Error::StoreFull),
            WriteOutcome::OverQuota(OverQuota { scope: Scope::Ip, retry_after_secs }) => {
                Response::from_error(Error::IpKeyQuota(retry_after_secs))
            }
            WriteOutcome::OverQuota(OverQuota { scope: Scope::Net, retry_after_secs }) => {
                Response::from_error(Error::NetKeyQuota(retry_after_secs))
            }
        },
    }
}

/// The 429 for a refused rate-limit charge.
fn limited(refused: Refused, retry_after: u64) -> Error {
    match refused {
        Refused::Exhausted => Error::RateLimited(retry_after),
        Refused::TableFull => Error::TrackingFull(retry_after),
        Refused::NetExhausted => Error::NetRateLimited(retry_after),
    }
}

/// A 200 with a stored value.
pub fn found_response(found: Found) -> Response {
    let mut r = Response::new(200, Body::Bytes(found.value));
    r.expires_at = expires_header(found.expires_ms);
    r.etag = Some(found.version);
    r
}

/// The answer to a blocking read.
pub fn respond_wait(reply: Option<Reply>, timeout_status: u16, retry_after: impl FnOnce() -> u64) -> Response {
    match reply {
        Some(Reply::Got(Some(found)) | Reply::Woken(Some(found))) => found_response(found),
        Some(Reply::Limited(refused)) => Response::from_error(limited(refused, retry_after())),
        Some(Reply::Got(None) | Reply::Woken(None)) => Response::from_error(Error::KeyNotFound),
        Some(Reply::ShuttingDown) => Response::from_error(Error::ShuttingDown),
        Some(Reply::Unavailable) => Response::from_error(Error::LogUnavailable),
        Some(Reply::Lost) => Response::from_error(Error::Internal),
        // Timed out (or cancelled): nothing changed in time.
        _ if timeout_status == 304 => Response::new(304, Body::Text("")),
        _ => Response::from_error(Error::KeyNotFound),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::shard::Condition;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn keys_decode_once() {
        assert_eq!(decode_key(b"a%2Fb", 100).unwrap(), b"a/b");
        assert_eq!(decode_key(b"a/b", 100).unwrap(), b"a/b");
        assert_eq!(decode_key(b"%252F", 100).unwrap(), b"%2F");
        assert_eq!(decode_key(b"%00%ff", 100).unwrap(), b"\x00\xff");
        assert_eq!(decode_key(b"a%2", 100).unwrap_err(), Error::BadPercentEncoding);
        assert_eq!(decode_key(b"a%zz", 100).unwrap_err(), Error::BadPercentEncoding);
        assert_eq!(decode_key(b"", 100).unwrap_err(), Error::EmptyKey);
        assert_eq!(decode_key(b"abcd", 3).unwrap_err(), Error::KeyTooLong);
        assert_eq!(decode_key(b"%41%42%43", 3).unwrap(), b"ABC");
    }

    #[test]
    fn ttl_rules() {
        let max = Duration::from_secs(7200);
        assert_eq!(ttl(None, max), Ok(max));
        assert_eq!(ttl(Some(b"other=1"), max), Ok(max));
        assert_eq!(ttl(Some(b"ttl=30s"), max), Ok(Duration::from_secs(30)));
        assert_eq!(ttl(Some(b"a=b&ttl=1h30m"), max), Ok(Duration::from_secs(5400)));
        assert_eq!(ttl(Some(b"ttl=1.5h"), max), Ok(Duration::from_secs(5400)));
        assert_eq!(ttl(Some(b"ttl=100h"), max), Ok(max));
        for bad in
            [&b"ttl=0"[..], b"ttl=-1s", b"ttl=", b"ttl", b"x=1&ttl&y", b"ttl=abc", b"ttl=5", b"ttl=%zz", b"ttl=%C3%A9s"]
        {
            assert_eq!(ttl(Some(bad), max), Err(Error::BadTtl), "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn ip_keys_expand() {
        assert_eq!(expand_ip_key(b"ip/svc1".to_vec(), ip("20.18.12.10")), (b"ip/20.18.12.10/svc1".to_vec(), true));
        assert_eq!(expand_ip_key(b"ip/a/b".to_vec(), ip("2001:db8::1")), (b"ip/2001:db8::1/a/b".to_vec(), true));
        assert_eq!(expand_ip_key(b"ipx/a".to_vec(), ip("1.2.3.4")), (b"ipx/a".to_vec(), false));
        assert_eq!(expand_ip_key(b"ip".to_vec(), ip("1.2.3.4")), (b"ip".to_vec(), false));
    }

    fn head(method: Method, target: &str, secret: Option<&str>, expected: Option<&str>) -> RequestHead {
        let mut raw = format!("{} {target} HTTP/1.1\r\n", if method == Method::Get { "GET" } else { "POST" });
        if let Some(s) = secret {
            raw += &format!("X-Owner-Secret: {s}\r\n");
        }
        if let Some(e) = expected {
            raw += &format!("X-Expected-Value: {e}\r\n");
        }
        raw += "\r\n";
        let mut h = RequestHead::default();
        crate::request::http::parse_head(raw.as_bytes(), &mut h).unwrap().unwrap();
        h
    }

    fn limits() -> Limits {
        Limits {
            max_key_size: 20,
            max_value_size: 10,
            max_ttl: Duration::from_secs(60),
            max_wait: Duration::from_secs(30),
        }
    }

    #[test]
    fn prepare_writes() {
        let k = SecretKey::from_bytes([3; 32]);
        let c = ip("1.2.3.4");
        let h = head(Method::Post, "/set/ip/x?ttl=10s", Some("pw"), None);
        let Ok(Action::Store(a)) = prepare(&h, b"val", c, &limits(), &k, 1000) else { panic!() };
        assert_eq!((a.meta.route, a.cost, a.meta.ip_key), (Route::Set, route::WRITE_COST, true));
        let Op::Write(w) = a.op else { panic!() };
        assert_eq!(w.key(), b"ip/1.2.3.4/x");
        assert_eq!(w.entry.expires_ms, 11_000);
        assert_eq!(w.entry.secret(), Some(&k.hash(b"ip/1.2.3.4/x", b"pw")));

        // Value + secret over the limit.
        let h = head(Method::Post, "/set/k", Some("12345"), None);
        assert_eq!(prepare(&h, b"123456", c, &limits(), &k, 0).unwrap_err(), Error::ValueTooLarge);
        assert!(prepare(&h, b"12345", c, &limits(), &k, 0).is_ok());
        // cas without the header is a 400, with an empty one it compares with "".
        let h = head(Method::Post, "/cas/k", None, None);
        assert_eq!(prepare(&h, b"v", c, &limits(), &k, 0).unwrap_err(), Error::MissingExpectedValue);
        let h = head(Method::Post, "/cas/k", None, Some(""));
        let Ok(Action::Store(a)) = prepare(&h, b"v", c, &limits(), &k, 0) else { panic!() };
        let Op::Write(w) = a.op else { panic!() };
        assert_eq!(w.cond, Condition::Cas(Box::new([])));
        // Sub-millisecond TTL rounds up.
        let h = head(Method::Post, "/set/k?ttl=10us", None, None);
        let Ok(Action::Store(a)) = prepare(&h, b"v", c, &limits(), &k, 5) else { panic!() };
        let Op::Write(w) = a.op else { panic!() };
        assert_eq!(w.entry.expires_ms, 6);
    }

    #[test]
    fn reads_cost_one_and_are_not_expanded() {
        let k = SecretKey::from_bytes([3; 32]);
        let h = head(Method::Get, "/get/ip/1.2.3.4/x", None, None);
        let Ok(Action::Store(a)) = prepare(&h, b"", ip("9.9.9.9"), &limits(), &k, 0) else { panic!() };
        assert_eq!(a.cost, route::READ_COST);
        assert_eq!(a.op.key(), b"ip/1.2.3.4/x");
    }

    #[test]
    fn responses() {
        let meta = |route, ip_key| ReplyMeta { route, ip_key, if_none_match: None };
        let ok = Reply::Wrote(WriteOutcome::Stored { created: true, expires_ms: 5_999, version: 7 });
        let r = respond(&meta(Route::Los, false), ok, "1.2.3.4", || 0);
        assert_eq!((r.status, r.created, r.expires_at, r.etag), (200, Some(true), Some(5), Some(7)));
        assert_eq!(r.body, Body::Text("OK"));
        let ok = Reply::Wrote(WriteOutcome::Stored { created: false, expires_ms: 0, version: 8 });
        let r = respond(&meta(Route::Set, true), ok, "1.2.3.4", || 0);
        assert_eq!((r.body, r.created), (Body::OwnedText("1.2.3.4".into()), None));
        let r = respond(&meta(Route::Get, false), Reply::Limited(Refused::Exhausted), "x", || 42);
        assert_eq!((r.status, r.retry_after), (429, Some(42)));
        let conflict = Reply::Wrote(WriteOutcome::Conflict { value: (*b"cur").into(), expires_ms: 1000, version: 3 });
        let r = respond(&meta(Route::Cas, false), conflict, "x", || 0);
        assert_eq!((r.status, r.body, r.etag), (409, Body::Bytes((*b"cur").into()), Some(3)));
        // If-None-Match on a GET: 304 when the version is listed.
        let found = || Reply::Got(Some(Found { value: (*b"v").into(), expires_ms: 0, version: 5 }));
        let cond = |tags: Option<Vec<u64>>| ReplyMeta { route: Route::Get, ip_key: false, if_none_match: Some(tags) };
        assert_eq!(respond(&cond(Some(vec![5])), found(), "x", || 0).status, 304);
        assert_eq!(respond(&cond(Some(vec![4])), found(), "x", || 0).status, 200);
        assert_eq!(respond(&cond(None), found(), "x", || 0).status, 304);
        let pf = Reply::Wrote(WriteOutcome::PreconditionFailed { version: Some(9) });
        let r = respond(&meta(Route::Set, false), pf, "x", || 0);
        assert_eq!((r.status, r.etag), (412, Some(9)));
    }
}
