//! HTTP/1.x framing, without I/O: parse a request head into reusable
//! buffers, decode a chunked body incrementally under a cap, and encode
//! responses.
//!
//! Built on `httparse` rather than monoio-http: the latter's decoder has no
//! head-size limit and rescans the whole buffer, and its extra layers cost
//! about a fifth of our CPU per request (measured on this kind of machine). Here the caller enforces
//! the 8 KiB head limit before asking for a parse, every header the API reads
//! is copied into buffers the connection reuses (no allocation per request
//! once warm), and framing is strict: conflicting lengths, Content-Length
//! with Transfer-Encoding, or unknown codings are errors that close the
//! connection. This module never touches a socket or the store.

use crate::request::error::Error;

/// Largest request head accepted.
pub const MAX_HEAD: usize = 8 * 1024;
/// Header fields per request; more is a 431.
pub const MAX_HEADERS: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Method {
    #[default]
    Get,
    Head,
    Post,
    Put,
    Delete,
    Options,
    Other,
}

impl Method {
    /// The method's name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Head => "HEAD",
            Method::Post => "POST",
            Method::Put => "PUT",
            Method::Delete => "DELETE",
            Method::Options => "OPTIONS",
            Method::Other => "OTHER",
        }
    }
}

/// How the request body is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BodyKind {
    #[default]
    None,
    Length(u64),
    Chunked,
}

/// A header value or target buffer larger than this is freed after its
/// request instead of kept for the next: a connection that once sent
/// kilobytes of header would otherwise hold them while it idles.
const FIELD_KEEP: usize = 1024;

fn clear_buf(buf: &mut Vec<u8>) {
    if buf.capacity() > FIELD_KEEP {
        *buf = Vec::new();
    } else {
        buf.clear();
    }
}

/// An optional header value kept in a reusable buffer.
#[derive(Debug, Default)]
pub struct Field {
    buf: Vec<u8>,
    present: bool,
}

impl Field {
    pub fn get(&self) -> Option<&[u8]> {
        self.present.then_some(&self.buf[..])
    }

    fn clear(&mut self) {
        clear_buf(&mut self.buf);
        self.present = false;
    }

    fn release_large(&mut self) {
        if self.buf.capacity() > FIELD_KEEP {
            self.clear();
        }
    }

    /// Sets the value; a second occurrence is an error.
    fn set_once(&mut self, v: &[u8]) -> Result<(), Error> {
        if self.present {
            return Err(Error::DuplicateHeader);
        }
        self.buf.extend_from_slice(v);
        self.present = true;
        Ok(())
    }

    /// Appends a list element (`X-Forwarded-For` across several fields).
    fn append_list(&mut self, v: &[u8]) {
        if self.present {
            self.buf.push(b',');
        }
        self.buf.extend_from_slice(v);
        self.present = true;
    }
}

/// What the server needs from a request head.
#[derive(Debug, Default)]
pub struct RequestHead {
    pub method: Method,
    /// Path and query, as sent.
    pub target: Vec<u8>,
    pub http10: bool,
    pub keep_alive: bool,
    pub body: BodyKind,
    pub expect_continue: bool,
    pub host: Field,
    pub secret: Field,
    pub expected: Field,
    pub forwarded_for: Field,
    /// `X-Forwarded-Proto` (believed only from a trusted proxy).
    pub forwarded_proto: Field,
    pub if_match: Field,
    pub if_none_match: Field,
}

impl RequestHead {
    fn reset(&mut self) {
        self.method = Method::Get;
        clear_buf(&mut self.target);
        self.http10 = false;
        self.keep_alive = true;
        self.body = BodyKind::None;
        self.expect_continue = false;
        self.host.clear();
        self.secret.clear();
        self.expected.clear();
        self.forwarded_for.clear();
        self.forwarded_proto.clear();
        self.if_match.clear();
        self.if_none_match.clear();
    }

    /// Frees the buffers a long request grew, once it is answered: an idle
    /// connection holds no kilobytes of its last head. Flags (`http10`,
    /// `keep_alive`) stay: a rejection still reads them.
    pub fn release_large(&mut self) {
        if self.target.capacity() > FIELD_KEEP {
            self.target = Vec::new();
        }
        for f in [
            &mut self.host,
            &mut self.secret,
            &mut self.expected,
            &mut self.forwarded_for,
            &mut self.forwarded_proto,
            &mut self.if_match,
            &mut self.if_none_match,
        ] {
            f.release_large();
        }
    }
}

/// Whether `buf` may hold a complete head (a blank line: `\n\n` or
/// `\n\r\n`), looking only at bytes not scanned before (`scanned`), so a
/// client dribbling bytes does not make every read rescan the whole head.
///
/// One pass from line end to line end (memchr's vector search), stopping at
/// the first blank line: the bytes after the head, a set's body or the next
/// pipelined requests, are never walked. (Two byte-by-byte window scans of
/// the whole buffer cost about 5% of a 1000-byte set's CPU.)
pub fn head_may_be_complete(buf: &[u8], scanned: usize) -> bool {
    // A `scanned` past the end cannot come from the caller; were it stale,
    // rescan everything rather than miss a head.
    let from = if scanned > buf.len() { 0 } else { scanned.saturating_sub(2) };
    let tail = &buf[from..];
    memchr::memchr_iter(b'\n', tail).any(|i| {
        let next = &tail[i + 1..];
        next.first() == Some(&b'\n') || next.starts_with(b"\r\n")
    })
}

fn trim(v: &[u8]) -> &[u8] {
    let start = v.iter().position(|b| !b.is_ascii_whitespace()).unwrap_or(v.len());
    let end = v.iter().rposition(|b| !b.is_ascii_whitespace()).map_or(start, |e| e + 1);
    &v[start..end]
}

fn parse_content_length(v: &[u8]) -> Result<u64, Error> {
    let v = trim(v);
    if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
        return Err(Error::BadContentLength);
    }
    Ok(v.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0')))
}

/// The path and query of a request target: an absolute-form target
/// (`http://host/set/k`, RFC 9112 §3.2.2, which a server must accept) loses
/// its scheme and authority; the authority is not used for routing.
pub fn origin_form(target: &[u8]) -> &[u8] {
    if target.first() == Some(&b'/') {
        return target;
    }
    let has = |scheme: &[u8]| target.get(..scheme.len()).is_some_and(|p| p.eq_ignore_ascii_case(scheme));
    let scheme_len = if has(b"http://") {
        7
    } else if has(b"https://") {
        8
    } else {
        return target;
    };
    let rest = &target[scheme_len..];
    match rest.iter().position(|&b| b == b'/' || b == b'?') {
        Some(i) if rest[i] == b'/' => &rest[i..],
        // `http://host?q` and `http://host`: the path is "/".
        _ => b"/",
    }
}

/// Parses a request head at the start of `buf` into `head`.
/// `Ok(None)`: incomplete. `Ok(Some(n))`: the head is `buf[..n]`.
pub fn parse_head(buf: &[u8], head: &mut RequestHead) -> Result<Option<usize>, Error> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(Error::HeadTooLarge),
        Err(_) => return Err(Error::MalformedRequest),
    };
    head.reset();
    head.method = match req.method {
        Some("GET") => Method::Get,
        Some("HEAD") => Method::Head,
        Some("POST") => Method::Post,
        Some("PUT") => Method::Put,
        Some("DELETE") => Method::Delete,
        Some("OPTIONS") => Method::Options,
        _ => Method::Other,
    };
    head.target.extend_from_slice(origin_form(req.path.unwrap_or("/").as_bytes()));
    head.http10 = req.version == Some(0);
    head.keep_alive = !head.http10;
    let mut content_length: Option<u64> = None;
    let mut chunked = false;
    let mut has_te = false;
    for h in req.headers.iter() {
        let name = h.name.as_bytes();
        let value = h.value;
        if name.eq_ignore_ascii_case(b"content-length") {
            let n = parse_content_length(value)?;
            if content_length.is_some_and(|m| m != n) {
                return Err(Error::BadContentLength);
            }
            content_length = Some(n);
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            has_te = true;
            // Only a lone `chunked` coding is understood.
            for coding in value.split(|&b| b == b',').map(trim).filter(|c| !c.is_empty()) {
                if coding.eq_ignore_ascii_case(b"chunked") && !chunked {
                    chunked = true;
                } else {
                    return Err(Error::UnsupportedTransferEncoding);
                }
            }
        } else if name.eq_ignore_ascii_case(b"connection") {
            for token in value.split(|&b| b == b',').map(trim) {
                if token.eq_ignore_ascii_case(b"close") {
                    head.keep_alive = false;
                } else if token.eq_ignore_ascii_case(b"keep-alive") && head.http10 {
                    head.keep_alive = true;
                }
            }
        } else if name.eq_ignore_ascii_case(b"expect") {
            if trim(value).eq_ignore_ascii_case(b"100-continue") {
                head.expect_continue = true;
            } else {
                return Err(Error::ExpectationFailed);
            }
        } else if name.eq_ignore_ascii_case(b"host") {
            head.host.set_once(trim(value)).map_err(|_| Error::MalformedRequest)?;
        } else if name.eq_ignore_ascii_case(b"x-owner-secret") {
            head.secret.set_once(value)?;
        } else if name.eq_ignore_ascii_case(b"x-expected-value") {
            head.expected.set_once(value)?;
        } else if name.eq_ignore_ascii_case(b"if-match") {
            head.if_match.append_list(value);
        } else if name.eq_ignore_ascii_case(b"if-none-match") {
            head.if_none_match.append_list(value);
        } else if name.eq_ignore_ascii_case(b"x-forwarded-for") {
            head.forwarded_for.append_list(value);
        } else if name.eq_ignore_ascii_case(b"x-forwarded-proto") {
            // The last proxy's word counts.
            head.forwarded_proto.clear();
            head.forwarded_proto.append_list(trim(value));
        }
    }
    if has_te && !chunked {
        return Err(Error::UnsupportedTransferEncoding);
    }
    if has_te && head.http10 {
        // RFC 9112 §6.1: an HTTP/1.0 message with Transfer-Encoding has
        // faulty framing; process it, then close the connection.
        head.keep_alive = false;
    }
    head.body = match (content_length, chunked) {
        (Some(_), true) => return Err(Error::AmbiguousLength),
        (Some(0), false) | (None, false) => BodyKind::None,
        (Some(n), false) => BodyKind::Length(n),
        (None, true) => BodyKind::Chunked,
    };
    Ok(Some(len))
}

/// Incremental decoder for a chunked body (RFC 9112 §7.1), capped at
/// `limit` bytes of data.
///
/// Strict on purpose: a lenient chunk parser behind a lenient proxy is a
/// request-smuggling primitive (the two disagree on where the body ends).
/// A chunk-size line is `1*HEXDIG`, then optional extensions
/// (`; name[=token|"quoted"]`, whitespace only where the grammar allows),
/// then CRLF; data is followed by CRLF; trailer lines are `name: value`
/// followed by CRLF, and an empty line ends the body. A bare LF, a NUL or
/// any other control byte, an empty size, a colon-less trailer line, or a
/// line longer than 1 KiB is `BadChunk`. The decoder walks the framing a
/// byte at a time and keeps its place between calls, so the answer never
/// depends on how the bytes were split across reads. (httparse's chunk-size
/// parser accepts a bare LF and any byte in extensions, hence this one.)
#[derive(Debug)]
pub struct ChunkedDecoder {
    state: ChunkState,
    limit: usize,
    /// Bytes of the current chunk-size line, or of the trailer section.
    line_bytes: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    /// Reading the size's hex digits (`digits` so far).
    Size {
        value: u64,
        digits: u8,
    },
    /// Whitespace after the size: only `;` may follow.
    SizeSpace {
        value: u64,
    },
    /// Inside the extensions.
    Ext {
        value: u64,
        at: Ext,
    },
    /// CR seen at the end of the size line.
    SizeLf {
        value: u64,
    },
    Data(u64),
    /// After a chunk's data: CR, then LF.
    DataCr,
    DataLf,
    /// At the start of a trailer line (or the final empty line).
    TrailerStart,
    TrailerName,
    TrailerValue,
    TrailerLf,
    EndLf,
    Done,
}

/// Where in `*( BWS ";" BWS name [ BWS "=" BWS value ] )` the extension parser is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ext {
    /// After `;`, before the name.
    Start,
    Name,
    AfterName,
    /// After `=`, before the value.
    ValueStart,
    Token,
    Quoted,
    Escaped,
    AfterValue,
}

/// Longest chunk-size line (with extensions), or trailer section, accepted.
const MAX_CHUNK_LINE: usize = 1024;

/// RFC 9110 `tchar`.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// A byte allowed in a field value, a quoted string or a quoted pair:
/// HTAB, SP, visible ASCII, obs-text (RFC 9110 §5.5, §5.6.4).
fn is_field_char(b: u8) -> bool {
    b == b'\t' || b == b' ' || (0x21..=0x7e).contains(&b) || b >= 0x80
}

fn is_ws(b: u8) -> bool {
    b == b' ' || b == b'\t'
}

impl ChunkedDecoder {
    pub fn new(limit: usize) -> Self {
        ChunkedDecoder { state: ChunkState::Size { value: 0, digits: 0 }, limit, line_bytes: 0 }
    }

    pub fn is_done(&self) -> bool {
        self.state == ChunkState::Done
    }

    /// The state after one framing byte `b`, or why the body is refused.
    fn step(&self, b: u8, out_len: usize) -> Result<ChunkState, Error> {
        use ChunkState as S;
        let bad = Err(Error::BadChunk);
        let ext = |value, at| Ok(S::Ext { value, at });
        Ok(match self.state {
            S::Size { value, digits } => match b {
                b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                    if digits >= 16 {
                        return bad;
                    }
                    let d = (b as char).to_digit(16).unwrap_or(0) as u64;
                    S::Size { value: value << 4 | d, digits: digits + 1 }
                }
                _ if digits == 0 => return bad,
                b';' => S::Ext { value, at: Ext::Start },
                b'\r' => S::SizeLf { value },
                b if is_ws(b) => S::SizeSpace { value },
                _ => return bad,
            },
            S::SizeSpace { value } => match b {
                b';' => S::Ext { value, at: Ext::Start },
                b if is_ws(b) => S::SizeSpace { value },
                _ => return bad,
            },
            S::Ext { value, at } => match (at, b) {
                (Ext::Quoted, b'"') => return ext(value, Ext::AfterValue),
                (Ext::Quoted, b'\\') => return ext(value, Ext::Escaped),
                (Ext::Quoted, b) if is_field_char(b) => return ext(value, Ext::Quoted),
                (Ext::Escaped, b) if is_field_char(b) => return ext(value, Ext::Quoted),
                (Ext::Quoted | Ext::Escaped, _) => return bad,
                (Ext::Start | Ext::ValueStart, b) if is_ws(b) => return ext(value, at),
                (Ext::Start, b) if is_tchar(b) => return ext(value, Ext::Name),
                (Ext::Name, b) if is_tchar(b) => return ext(value, Ext::Name),
                (Ext::ValueStart, b'"') => return ext(value, Ext::Quoted),
                (Ext::ValueStart, b) if is_tchar(b) => return ext(value, Ext::Token),
                (Ext::Token, b) if is_tchar(b) => return ext(value, Ext::Token),
                (Ext::Name | Ext::AfterName, b'=') => return ext(value, Ext::ValueStart),
                (Ext::Name | Ext::AfterName, b) if is_ws(b) => return ext(value, Ext::AfterName),
                (Ext::Token | Ext::AfterValue, b) if is_ws(b) => return ext(value, Ext::AfterValue),
                (Ext::Name | Ext::AfterName | Ext::Token | Ext::AfterValue, b';') => return ext(value, Ext::Start),
                (Ext::Name | Ext::AfterName | Ext::Token | Ext::AfterValue, b'\r') => S::SizeLf { value },
                _ => return bad,
            },
            S::SizeLf { value } => match b {
                b'\n' if value == 0 => S::TrailerStart,
                b'\n' => {
                    if value > (self.limit - out_len.min(self.limit)) as u64 {
                        return Err(Error::BodyTooLarge);
                    }
                    S::Data(value)
                }
                _ => return bad,
            },
            S::DataCr => match b {
                b'\r' => S::DataLf,
                _ => return bad,
            },
            S::DataLf => match b {
                b'\n' => S::Size { value: 0, digits: 0 },
                _ => return bad,
            },
            S::TrailerStart => match b {
                b'\r' => S::EndLf,
                b if is_tchar(b) => S::TrailerName,
                _ => return bad,
            },
            S::TrailerName => match b {
                b':' => S::TrailerValue,
                b if is_tchar(b) => S::TrailerName,
                _ => return bad,
            },
            S::TrailerValue => match b {
                b'\r' => S::TrailerLf,
                b if is_field_char(b) => S::TrailerValue,
                _ => return bad,
            },
            S::TrailerLf => match b {
                b'\n' => S::TrailerStart,
                _ => return bad,
            },
            S::EndLf => match b {
                b'\n' => S::Done,
                _ => return bad,
            },
            S::Data(_) | S::Done => self.state,
        })
    }

    /// Consumes as much of `input` as possible, appending data to `out`.
    /// Returns the bytes consumed; call again with more input until
    /// `is_done()`. Never lets `out` grow past `limit + 1`.
    pub fn decode(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<usize, Error> {
        let mut pos = 0;
        while pos < input.len() {
            match self.state {
                ChunkState::Done => break,
                ChunkState::Data(left) => {
                    let take = (input.len() - pos).min(left as usize);
                    out.extend_from_slice(&input[pos..pos + take]);
                    pos += take;
                    let left = left - take as u64;
                    self.state = if left == 0 { ChunkState::DataCr } else { ChunkState::Data(left) };
                }
                _ => {
                    let next = self.step(input[pos], out.len())?;
                    pos += 1;
                    self.line_bytes += 1;
                    if self.line_bytes > MAX_CHUNK_LINE {
                        return Err(Error::BadChunk);
                    }
                    // A new size line starts its own count; the trailer
                    // section counts as one.
                    if matches!(next, ChunkState::Data(_) | ChunkState::Size { digits: 0, .. }) {
                        self.line_bytes = 0;
                    }
                    self.state = next;
                }
            }
        }
        Ok(pos)
    }
}

/// A response body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body {
    /// Plain text known at compile time (`OK`, error messages).
    Text(&'static str),
    /// Plain text built for this response (a client IP).
    OwnedText(String),
    /// Stored bytes (`application/octet-stream`).
    Bytes(Box<[u8]>),
    /// A generated HTML page.
    Html(String),
}

impl Body {
    fn content_type(&self) -> &'static str {
        match self {
            Body::Text(_) | Body::OwnedText(_) => "text/plain; charset=utf-8",
            Body::Bytes(_) => "application/octet-stream",
            Body::Html(_) => "text/html; charset=utf-8",
        }
    }

    fn bytes(&self) -> &[u8] {
        match self {
            Body::Text(s) => s.as_bytes(),
            Body::OwnedText(s) | Body::Html(s) => s.as_bytes(),
            Body::Bytes(b) => b,
        }
    }
}

/// A response ready to encode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub body: Body,
    pub expires_at: Option<u64>,
    pub created: Option<bool>,
    pub retry_after: Option<u64>,
    pub allow: Option<&'static str>,
    /// The entry's version, sent as `ETag`.
    pub etag: Option<u64>,
    /// A CORS preflight answer: the methods to allow (adds the
    /// `Access-Control-Allow-*` headers).
    pub preflight: Option<&'static str>,
    /// The failure this response reports, if any (for the metrics' reasons).
    pub error: Option<Error>,
}

impl Response {
    pub fn new(status: u16, body: Body) -> Self {
        Response {
            status,
            body,
            expires_at: None,
            created: None,
            retry_after: None,
            allow: None,
            etag: None,
            preflight: None,
            error: None,
        }
    }

    pub fn from_error(e: Error) -> Self {
        let mut r = Response::new(e.status(), Body::Text(e.message()));
        r.error = Some(e);
        match e {
            Error::RateLimited(secs)
            | Error::NetRateLimited(secs)
            | Error::TrackingFull(secs)
            | Error::IpKeyQuota(secs)
            | Error::NetKeyQuota(secs) => r.retry_after = Some(secs),
            Error::LogUnavailable | Error::ShuttingDown | Error::TooManyWaiters => r.retry_after = Some(1),
            Error::MethodNotAllowed(allow) => r.allow = Some(allow),
            _ => {}
        }
        r
    }
}

/// Every final status this server answers with, and its reason phrase.
/// The metrics label requests by these (a status missing here would be
/// counted as "other" and sent as "Unknown": a test keeps `Error` in step).
pub const STATUSES: [(u16, &str); 18] = [
    (200, "OK"),
    (204, "No Content"),
    (304, "Not Modified"),
    (400, "Bad Request"),
    (403, "Forbidden"),
    (404, "Not Found"),
    (405, "Method Not Allowed"),
    (408, "Request Timeout"),
    (409, "Conflict"),
    (412, "Precondition Failed"),
    (413, "Content Too Large"),
    (417, "Expectation Failed"),
    (429, "Too Many Requests"),
    (431, "Request Header Fields Too Large"),
    (500, "Internal Server Error"),
    (501, "Not Implemented"),
    (503, "Service Unavailable"),
    (507, "Insufficient Storage"),
];

/// Index of `status` in `STATUSES` (`STATUSES.len()` if absent).
pub fn status_index(status: u16) -> usize {
    STATUSES.iter().position(|&(s, _)| s == status).unwrap_or(STATUSES.len())
}

fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        s => STATUSES.get(status_index(s)).map_or("Unknown", |&(_, r)| r),
    }
}

const CORS: &[u8] = b"\r\nAccess-Control-Allow-Origin: *\r\n\
    Access-Control-Expose-Headers: X-Client-Ip, X-Expires-At, X-Created, ETag, Retry-After";
const PREFLIGHT: &[u8] = b"\r\n\
    Access-Control-Allow-Headers: X-Owner-Secret, X-Expected-Value, If-Match, If-None-Match, Content-Type\r\n\
    Access-Control-Max-Age: 86400";

fn write_etag(out: &mut Vec<u8>, v: u64) {
    let mut hex = [0u8; 16];
    let mut n = v;
    let mut i = hex.len();
    loop {
        i -= 1;
        hex[i] = b"0123456789abcdef"[(n & 15) as usize];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(b"\r\nETag: \"");
    out.extend_from_slice(&hex[i..]);
    out.push(b'"');
}

/// The entity tags in an `If-Match` / `If-None-Match` value: `None` for `*`,
/// else the versions of every well-formed `"hex"` or `W/"hex"` tag. More
/// than `MAX_TAGS` entries is an error: a waiter listing many predicted
/// versions would otherwise make every write re-check it many times.
pub fn parse_etags(value: &[u8]) -> Result<Option<Vec<u64>>, Error> {
    let items = value.split(|&b| b == b',').map(trim).filter(|i| !i.is_empty());
    if items.clone().count() > crate::state::waiters::MAX_TAGS {
        return Err(Error::TooManyTags);
    }
    let mut tags = Vec::new();
    for item in items {
        if item == b"*" {
            return Ok(None);
        }
        let item = item.strip_prefix(b"W/").unwrap_or(item);
        let Some(inner) = item.strip_prefix(b"\"").and_then(|i| i.strip_suffix(b"\"")) else { continue };
        if inner.is_empty() || inner.len() > 16 {
            continue;
        }
        if let Ok(v) = u64::from_str_radix(std::str::from_utf8(inner).unwrap_or("x"), 16) {
            tags.push(v);
        }
    }
    Ok(Some(tags))
}

/// The interim answer to `Expect: 100-continue`.
pub const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

/// Appends the encoded response to `out`. `head_only` omits the body (HEAD);
/// `keep_alive` false adds `Connection: close`; `keep_alive` with `http10`
/// adds the `Connection: keep-alive` an HTTP/1.0 client needs to reuse the
/// connection.
pub fn encode(out: &mut Vec<u8>, r: &Response, client_ip: &str, keep_alive: bool, http10: bool, head_only: bool) {
    let mut num = itoa::Buffer::new();
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(num.format(r.status).as_bytes());
    out.push(b' ');
    out.extend_from_slice(reason(r.status).as_bytes());
    let body = r.body.bytes();
    // 204 and 304 have no content and must not claim a length (RFC 9110
    // 8.6: a 304's length would be the 200's, which is not sent).
    if !matches!(r.status, 204 | 304) {
        out.extend_from_slice(b"\r\nContent-Type: ");
        out.extend_from_slice(r.body.content_type().as_bytes());
        out.extend_from_slice(b"\r\nContent-Length: ");
        out.extend_from_slice(num.format(body.len()).as_bytes());
    }
    out.extend_from_slice(b"\r\nX-Client-Ip: ");
    out.extend_from_slice(client_ip.as_bytes());
    if let Some(t) = r.expires_at {
        out.extend_from_slice(b"\r\nX-Expires-At: ");
        out.extend_from_slice(num.format(t).as_bytes());
    }
    if let Some(c) = r.created {
        out.extend_from_slice(if c { b"\r\nX-Created: true" } else { b"\r\nX-Created: false" });
    }
    if let Some(s) = r.retry_after {
        out.extend_from_slice(b"\r\nRetry-After: ");
        out.extend_from_slice(num.format(s).as_bytes());
    }
    if let Some(a) = r.allow {
        out.extend_from_slice(b"\r\nAllow: ");
        out.extend_from_slice(a.as_bytes());
    }
    if let Some(v) = r.etag {
        write_etag(out, v);
    }
    // Every route may be called from a page on any origin.
    out.extend_from_slice(CORS);
    if let Some(methods) = r.preflight {
        out.extend_from_slice(b"\r\nAccess-Control-Allow-Methods: ");
        out.extend_from_slice(methods.as_bytes());
        out.extend_from_slice(PREFLIGHT);
    }
    if !keep_alive {
        out.extend_from_slice(b"\r\nConnection: close");
    } else if http10 {
        out.extend_from_slice(b"\r\nConnection: keep-alive");
    }
    out.extend_from_slice(b"\r\n\r\n");
    if !head_only && !matches!(r.status, 204 | 304) {
        out.extend_from_slice(body);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &[u8]) -> Result<Option<(usize, RequestHead)>, Error> {
        let mut h = RequestHead::default();
        parse_head(raw, &mut h).map(|o| o.map(|n| (n, h)))
    }

    #[test]
    fn large_header_buffers_are_not_kept_for_the_next_request() {
        let mut h = RequestHead::default();
        let big = format!("GET /get/{} HTTP/1.1\r\nHost: {}\r\n\r\n", "k".repeat(3000), "h".repeat(3000));
        assert!(parse_head(big.as_bytes(), &mut h).unwrap().is_some());
        assert!(h.host.buf.capacity() >= 3000 && h.target.capacity() >= 3000);
        let small = b"GET /get/a HTTP/1.1\r\nHost: x\r\n\r\n";
        assert!(parse_head(small, &mut h).unwrap().is_some());
        assert_eq!(h.host.get(), Some(&b"x"[..]));
        assert!(h.host.buf.capacity() <= FIELD_KEEP && h.target.capacity() <= FIELD_KEEP);
        // Once answered, without waiting for the next head.
        assert!(parse_head(big.as_bytes(), &mut h).unwrap().is_some());
        h.release_large();
        assert!(h.host.buf.capacity() <= FIELD_KEEP && h.target.capacity() <= FIELD_KEEP);
        assert!(h.keep_alive, "flags stay");
        // Small ones are kept for reuse.
        assert!(parse_head(small, &mut h).unwrap().is_some());
        h.release_large();
        assert_eq!(h.host.get(), Some(&b"x"[..]));
    }

    #[test]
    fn simple_get() {
        let raw = b"GET /get/a%2Fb HTTP/1.1\r\nHost: example.com\r\n\r\nGET";
        let (n, h) = parse(raw).unwrap().unwrap();
        assert_eq!(n, raw.len() - 3);
        assert_eq!(h.method, Method::Get);
        assert_eq!(h.target, b"/get/a%2Fb");
        assert!(h.keep_alive);
        assert_eq!(h.host.get(), Some(&b"example.com"[..]));
        assert_eq!(h.body, BodyKind::None);
    }

    #[test]
    fn partial_and_completion_scan() {
        assert!(parse(b"GET / HTTP/1.1\r\nHost: x\r\n").unwrap().is_none());
        assert!(!head_may_be_complete(b"GET / HTTP/1.1\r\nHost: x\r\n", 0));
        assert!(head_may_be_complete(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", 20));
        assert!(head_may_be_complete(b"GET / HTTP/1.0\n\n", 14));
    }

    /// The line-end search agrees with the plain definition (a `\n\n` or
    /// `\n\r\n` somewhere from two bytes before `scanned`) on every split of
    /// heads with LF, CRLF and mixed line ends, bodies and pipelined tails.
    #[test]
    fn completion_scan_matches_the_definition() {
        let plain = |buf: &[u8], scanned: usize| {
            let tail = &buf[scanned.saturating_sub(2)..];
            tail.windows(2).any(|w| w == b"\n\n") || tail.windows(3).any(|w| w == b"\n\r\n")
        };
        let samples: [&[u8]; 8] = [
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET / HTTP/1.0\n\n",
            b"GET / HTTP/1.1\nHost: x\r\n\n",
            b"GET / HTTP/1.1\r\nHost: x\n\r\nGET / HTTP/1.1\r\n\r\n",
            b"POST /set/k HTTP/1.1\r\nContent-Length: 3\r\n\r\n\n\r\n",
            b"\r\n\r",
            b"\n",
            b"GET / HTTP/1.1\r\nHost: x\r\n\r",
        ];
        assert!(head_may_be_complete(b"GET / HTTP/1.0\n\n", 100));
        assert!(!head_may_be_complete(b"", 100));
        for raw in samples {
            for end in 0..=raw.len() {
                for scanned in 0..=end {
                    let buf = &raw[..end];
                    assert_eq!(head_may_be_complete(buf, scanned), plain(buf, scanned), "{buf:?} from {scanned}");
                }
            }
        }
    }

    #[test]
    fn connection_semantics() {
        let (_, h) = parse(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n").unwrap().unwrap();
        assert!(!h.keep_alive);
        let (_, h) = parse(b"GET / HTTP/1.0\r\n\r\n").unwrap().unwrap();
        assert!(!h.keep_alive && h.http10);
        let (_, h) = parse(b"GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n").unwrap().unwrap();
        assert!(h.keep_alive);
    }

    #[test]
    fn body_framing() {
        let (_, h) = parse(b"POST /set/k HTTP/1.1\r\nContent-Length: 5\r\n\r\n").unwrap().unwrap();
        assert_eq!(h.body, BodyKind::Length(5));
        let (_, h) = parse(b"POST /set/k HTTP/1.1\r\nContent-Length: 5\r\ncontent-length: 5\r\n\r\n").unwrap().unwrap();
        assert_eq!(h.body, BodyKind::Length(5));
        let (_, h) = parse(b"POST /set/k HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n").unwrap().unwrap();
        assert_eq!(h.body, BodyKind::Chunked);
        let err = |raw: &[u8]| parse(raw).unwrap_err();
        assert_eq!(err(b"POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n"), Error::BadContentLength);
        assert_eq!(err(b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n"), Error::BadContentLength);
        assert_eq!(err(b"POST / HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n"), Error::BadContentLength);
        assert_eq!(
            err(b"POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"),
            Error::AmbiguousLength
        );
        assert_eq!(
            err(b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"),
            Error::UnsupportedTransferEncoding
        );
        assert_eq!(err(b"POST / HTTP/1.1\r\nExpect: magic\r\n\r\n"), Error::ExpectationFailed);
    }

    #[test]
    fn malformed_heads() {
        assert_eq!(parse(b"GET /\r\n\r\n").unwrap_err(), Error::MalformedRequest);
        assert_eq!(parse(b"GET / HTTP/1.1\r\nNoColon\r\n\r\n").unwrap_err(), Error::MalformedRequest);
        assert_eq!(parse(b"\x00\x01\x02 garbage\r\n\r\n").unwrap_err(), Error::MalformedRequest);
        let mut many = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..100 {
            many.extend_from_slice(format!("X-{i}: v\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert_eq!(parse(&many).unwrap_err(), Error::HeadTooLarge);
        assert_eq!(
            parse(b"POST / HTTP/1.1\r\nX-Expected-Value: a\r\nX-Expected-Value: b\r\n\r\n").unwrap_err(),
            Error::DuplicateHeader
        );
    }

    #[test]
    fn api_headers_and_xff_list() {
        let raw = b"POST /cas/k HTTP/1.1\r\nX-Owner-Secret: s\r\nX-Expected-Value: \r\n\
                    X-Forwarded-For: 1.1.1.1\r\nX-Forwarded-For: 2.2.2.2\r\n\r\n";
        let (_, h) = parse(raw).unwrap().unwrap();
        assert_eq!(h.secret.get(), Some(&b"s"[..]));
        assert_eq!(h.expected.get(), Some(&b""[..]));
        assert_eq!(h.forwarded_for.get(), Some(&b"1.1.1.1,2.2.2.2"[..]));
    }

    #[test]
    fn chunked_decoding_in_pieces() {
        let body = b"4\r\nWiki\r\n5;ext=1\r\npedia\r\n0\r\nTrailer: x\r\n\r\nNEXT";
        for split in 0..body.len() {
            let mut d = ChunkedDecoder::new(100);
            let mut out = Vec::new();
            let mut consumed = d.decode(&body[..split], &mut out).unwrap();
            let mut rest = body[consumed..].to_vec();
            while !d.is_done() {
                let n = d.decode(&rest, &mut out).unwrap();
                assert!(n > 0 || d.is_done(), "stuck at split {split}");
                consumed += n;
                rest.drain(..n);
            }
            assert_eq!(out, b"Wikipedia");
            assert_eq!(&body[consumed..], b"NEXT", "split {split}");
        }
    }

    #[test]
    fn chunked_limits_and_garbage() {
        let mut out = Vec::new();
        assert_eq!(ChunkedDecoder::new(8).decode(b"9\r\n", &mut out), Err(Error::BodyTooLarge));
        assert_eq!(ChunkedDecoder::new(8).decode(b"5\r\nhello\r\n4\r\n", &mut out), Err(Error::BodyTooLarge));
        out.clear();
        assert_eq!(ChunkedDecoder::new(8).decode(b"zz\r\n", &mut out), Err(Error::BadChunk));
        assert_eq!(ChunkedDecoder::new(8).decode(b"1\r\nabc", &mut out), Err(Error::BadChunk));
        assert_eq!(ChunkedDecoder::new(8).decode(b"ffffffffffffffffffff\r\n", &mut out), Err(Error::BadChunk));
        // A size near u64::MAX after some data must not wrap the limit check.
        out.clear();
        assert_eq!(
            ChunkedDecoder::new(8).decode(b"1\r\na\r\nffffffffffffffff\r\n", &mut out),
            Err(Error::BodyTooLarge)
        );
        let long_ext = [b"1;".as_slice(), &[b'a'; 2000]].concat();
        assert_eq!(ChunkedDecoder::new(8).decode(&long_ext, &mut out), Err(Error::BadChunk));
    }

    /// Feeds `body` split at every point (and byte by byte); the outcome
    /// must be the same whatever the split.
    fn decode_split(body: &[u8], limit: usize) -> Result<Vec<u8>, Error> {
        let whole = {
            let mut d = ChunkedDecoder::new(limit);
            let mut out = Vec::new();
            d.decode(body, &mut out).and_then(|_| if d.is_done() { Ok(out) } else { Err(Error::RequestTimeout) })
        };
        for split in 0..=body.len() {
            let mut d = ChunkedDecoder::new(limit);
            let mut out = Vec::new();
            let r = d
                .decode(&body[..split], &mut out)
                .and_then(|n| d.decode(&body[n..], &mut out).map(|m| n + m))
                .and_then(|_| if d.is_done() { Ok(out) } else { Err(Error::RequestTimeout) });
            assert_eq!(r, whole, "split at {split} of {:?}", String::from_utf8_lossy(body));
        }
        let mut d = ChunkedDecoder::new(limit);
        let mut out = Vec::new();
        let mut r = Ok(0);
        for b in body {
            r = d.decode(std::slice::from_ref(b), &mut out);
            if r.is_err() {
                break;
            }
        }
        let bytewise = r.and_then(|_| if d.is_done() { Ok(out) } else { Err(Error::RequestTimeout) });
        assert_eq!(bytewise, whole, "byte by byte");
        whole
    }

    #[test]
    fn chunked_framing_is_strict_and_split_independent() {
        let ok = |b: &[u8], want: &[u8]| assert_eq!(decode_split(b, 100).as_deref(), Ok(want), "{b:?}");
        let bad = |b: &[u8]| assert_eq!(decode_split(b, 100), Err(Error::BadChunk), "{:?}", String::from_utf8_lossy(b));
        ok(b"2\r\nAB\r\n0\r\n\r\n", b"AB");
        ok(b"2;name\r\nAB\r\n0\r\n\r\n", b"AB");
        ok(b"2 ; a=b ; c=\"q \\\" s\"\r\nAB\r\n0;x\r\nT-Ok: yes\r\n\r\n", b"AB");
        ok(b"A\r\n0123456789\r\n0\r\n\r\n", b"0123456789");
        // The desync findings: LF or NUL or junk in an extension, a bare LF
        // line end, an empty size, a colon-less trailer.
        bad(b"2;\nxx\r\nAB\r\n0\r\n\r\n");
        bad(b"2;a\x00b\r\nAB\r\n0\r\n\r\n");
        bad(b"2;a b\r\nAB\r\n0\r\n\r\n");
        bad(b"2\nAB\r\n0\r\n\r\n");
        bad(b"2\r\nAB\n0\r\n\r\n");
        bad(b"\r\nAB\r\n0\r\n\r\n");
        bad(b";x\r\n0\r\n\r\n");
        bad(b"2 \r\nAB\r\n0\r\n\r\n");
        bad(b"0\r\nNoColon\r\n\r\n");
        bad(b"0\r\nX: a\nY: b\r\n\r\n");
        bad(b"0\r\n\n");
        bad(b"2;\"unquoted\r\nAB\r\n0\r\n\r\n");
        bad(b"11111111111111111\r\n");
        // A long extension fails the same whole or split (it used to pass in
        // one segment and fail in two).
        let long = [&b"1;"[..], &[b'a'; 2000], b"\r\nx\r\n0\r\n\r\n"].concat();
        bad(&long);
        assert_eq!(decode_split(b"65\r\n", 100), Err(Error::BodyTooLarge));
    }

    #[test]
    fn absolute_form_and_http10_transfer_encoding() {
        assert_eq!(origin_form(b"http://example.com/set/k?ttl=1s"), b"/set/k?ttl=1s");
        assert_eq!(origin_form(b"HTTPS://example.com:8443/get/a/b"), b"/get/a/b");
        assert_eq!(origin_form(b"http://example.com"), b"/");
        assert_eq!(origin_form(b"http://example.com?x"), b"/");
        assert_eq!(origin_form(b"/get/http://x"), b"/get/http://x");
        let (_, h) = parse(b"POST http://h/set/k HTTP/1.1\r\nContent-Length: 1\r\n\r\n").unwrap().unwrap();
        assert_eq!(h.target, b"/set/k");
        let (_, h) = parse(b"POST /set/k HTTP/1.0\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(!h.keep_alive, "HTTP/1.0 with Transfer-Encoding closes after the message");
        assert_eq!(h.body, BodyKind::Chunked);
    }

    #[test]
    fn etags_parse() {
        assert_eq!(parse_etags(b"\"1f\""), Ok(Some(vec![31])));
        assert_eq!(parse_etags(b"W/\"a\", \"b\" , junk, \"\", \"zz\""), Ok(Some(vec![10, 11])));
        assert_eq!(parse_etags(b"*"), Ok(None));
        assert_eq!(parse_etags(b"\"11111111111111111\""), Ok(Some(vec![])));
        let sixteen: Vec<String> = (0..16).map(|i| format!("\"{i:x}\"")).collect();
        assert_eq!(parse_etags(sixteen.join(",").as_bytes()).unwrap().unwrap().len(), 16);
        let seventeen = format!("{}, \"ff\"", sixteen.join(","));
        assert_eq!(parse_etags(seventeen.as_bytes()), Err(Error::TooManyTags));
    }

    #[test]
    fn encodes_headers() {
        let mut out = Vec::new();
        let mut r = Response::new(200, Body::Bytes((*b"val").into()));
        r.expires_at = Some(1700000000);
        r.created = Some(true);
        r.etag = Some(31);
        encode(&mut out, &r, "1.2.3.4", true, false, false);
        let s = String::from_utf8(out).unwrap();
        assert_eq!(
            s,
            "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: 3\r\n\
             X-Client-Ip: 1.2.3.4\r\nX-Expires-At: 1700000000\r\nX-Created: true\r\nETag: \"1f\"\r\n\
             Access-Control-Allow-Origin: *\r\n\
             Access-Control-Expose-Headers: X-Client-Ip, X-Expires-At, X-Created, ETag, Retry-After\r\n\r\nval"
        );
        let mut out = Vec::new();
        encode(&mut out, &Response::from_error(Error::RateLimited(7)), "::1", false, false, true);
        let s = String::from_utf8(out).unwrap();
        assert!(s.starts_with("HTTP/1.1 429 Too Many Requests\r\n"));
        assert!(s.contains("Retry-After: 7\r\n"));
        assert!(s.contains("Connection: close\r\n"));
        assert!(s.contains("Content-Length: 17\r\n"));
        assert!(s.ends_with("\r\n\r\n"));
    }
}
