//! Every way a request can fail, and the one place that maps each to an HTTP
//! status, a plain-text body, and whether the connection must close.
//!
//! Framing errors (the first group) are raised by `http` and `conn`, which
//! close the connection after answering them: the byte stream can no longer be
//! trusted (request smuggling starts with a lenient parser guessing where a
//! message ends). Everything else keeps the connection alive.

/// A request that cannot be served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Error {
    // --- HTTP framing (connection closes) ---
    /// Not parseable as an HTTP/1.x request head.
    MalformedRequest,
    /// The head is over 8 KiB or has too many header fields.
    HeadTooLarge,
    /// Content-Length missing digits, or several that disagree.
    BadContentLength,
    /// Both Content-Length and Transfer-Encoding: ambiguous framing.
    AmbiguousLength,
    /// A transfer coding other than `chunked`.
    UnsupportedTransferEncoding,
    /// An `Expect` other than `100-continue`.
    ExpectationFailed,
    /// The declared or streamed body is over the value limit.
    BodyTooLarge,
    /// A malformed chunked body.
    BadChunk,
    /// The request did not arrive within `-readTimeout`.
    RequestTimeout,

    // --- routing and arguments (free: no rate-limit tokens) ---
    NoSuchRoute,
    /// A known route with the wrong method; carries the `Allow` value.
    MethodNotAllowed(&'static str),
    BadPercentEncoding,
    EmptyKey,
    KeyTooLong,
    BadTtl,
    /// Value plus owner secret over `-maxValueSize`.
    ValueTooLarge,
    MissingExpectedValue,
    /// A header that must appear at most once appeared twice.
    DuplicateHeader,

    // --- store and limits ---
    KeyNotFound,
    WrongSecret,
    StoreFull,
    /// Out of tokens; seconds until the next refill.
    RateLimited(u64),
    /// The client's network (IPv4 /24, IPv6 /48) is out of tokens; seconds
    /// until the next refill.
    NetRateLimited(u64),
    /// The table of clients with buckets (`-maxTrackedIPs`) is full and the
    /// client has none; seconds until the next refill empties it.
    TrackingFull(u64),
    /// A create over `-maxKeysPerIP`; seconds until the client's oldest key expires.
    IpKeyQuota(u64),
    /// A create over `-maxKeysPerNet`; seconds until the network's oldest key expires.
    NetKeyQuota(u64),
    /// The server is shutting down and takes no new requests.
    ShuttingDown,
    /// `?wait=` is not a positive Go duration.
    BadWait,
    /// This client has `-maxWaitersPerIP` blocking reads parked.
    TooManyWaitersFromIp,
    /// This client's network has `-maxWaitersPerNet` blocking reads parked.
    TooManyWaitersFromNet,
    /// The server has `-maxWaiters` blocking reads parked.
    TooManyWaiters,
    /// `If-Match` did not match the key's version.
    PreconditionFailed,
    /// More entity tags than `If-Match`/`If-None-Match` may list.
    TooManyTags,
    /// A bug lost the answer (logged where it happened).
    Internal,
    /// The write-ahead log cannot be written (disk full, I/O error): writes
    /// are refused until it can; reads go on.
    LogUnavailable,
}

impl Error {
    pub fn status(self) -> u16 {
        use Error::*;
        match self {
            MalformedRequest | BadContentLength | AmbiguousLength | BadChunk => 400,
            HeadTooLarge => 431,
            UnsupportedTransferEncoding => 501,
            ExpectationFailed => 417,
            BodyTooLarge => 413,
            RequestTimeout => 408,
            NoSuchRoute | KeyNotFound => 404,
            MethodNotAllowed(_) => 405,
            BadPercentEncoding | EmptyKey | KeyTooLong | BadTtl | ValueTooLarge | MissingExpectedValue
            | DuplicateHeader => 400,
            WrongSecret => 403,
            StoreFull => 507,
            RateLimited(_) | NetRateLimited(_) | TrackingFull(_) | IpKeyQuota(_) | NetKeyQuota(_) => 429,
            ShuttingDown | TooManyWaiters => 503,
            BadWait => 400,
            TooManyWaitersFromIp | TooManyWaitersFromNet => 429,
            PreconditionFailed => 412,
            TooManyTags => 400,
            Internal => 500,
            LogUnavailable => 503,
        }
    }

    pub fn message(self) -> &'static str {
        use Error::*;
        match self {
            MalformedRequest => "Malformed request",
            HeadTooLarge => "Request header fields too large",
            BadContentLength => "Invalid Content-Length",
            AmbiguousLength => "Content-Length and Transfer-Encoding together",
            UnsupportedTransferEncoding => "Only chunked transfer encoding is supported",
            ExpectationFailed => "Only Expect: 100-continue is supported",
            BodyTooLarge => "Value too large",
            BadChunk => "Malformed chunked body",
            RequestTimeout => "Request timeout",
            NoSuchRoute => "Not found",
            MethodNotAllowed(_) => "Method not allowed",
            BadPercentEncoding => "Invalid percent-encoding",
            EmptyKey => "Empty key",
            KeyTooLong => "Key too long",
            BadTtl => "Invalid ttl: use a positive Go duration such as 30s, 5m or 1h30m",
            ValueTooLarge => "Value too large",
            MissingExpectedValue => "Missing X-Expected-Value header",
            DuplicateHeader => "Header given more than once",
            KeyNotFound => "Key not found",
            WrongSecret => "Wrong owner secret",
            StoreFull => "Store full",
            RateLimited(_) => "Too many requests",
            NetRateLimited(_) => "Too many requests from your network (IPv4 /24, IPv6 /48)",
            TrackingFull(_) => "Too many clients right now (-maxTrackedIPs): retry after the next refill",
            IpKeyQuota(_) => {
                "Key quota reached: your address (IPv6: /64) has created the most live keys allowed \
                 (-maxKeysPerIP); update or delete one of yours, or retry when one expires"
            }
            NetKeyQuota(_) => {
                "Key quota reached: your network (IPv4 /24, IPv6 /48) has created the most live keys \
                 allowed (-maxKeysPerNet); update or delete one of yours, or retry when one expires"
            }
            ShuttingDown => "Server shutting down",
            BadWait => "Invalid wait: use a positive Go duration such as 30s",
            TooManyWaitersFromIp => "Too many waiting requests from this address",
            TooManyWaitersFromNet => {
                "Too many waiting requests from your network (IPv4 /24, IPv6 /48; -maxWaitersPerNet)"
            }
            TooManyWaiters => "Too many waiting requests",
            PreconditionFailed => "Precondition failed",
            TooManyTags => "Too many entity tags (at most 16)",
            Internal => "Internal error",
            LogUnavailable => "Writes are refused: the log cannot be written (disk trouble); reads still work",
        }
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.status(), self.message())
    }
}

impl std::error::Error for Error {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_statuses() {
        assert_eq!(Error::KeyNotFound.status(), 404);
        assert_eq!(Error::KeyNotFound.message(), "Key not found");
        assert_eq!(Error::KeyTooLong.message(), "Key too long");
        assert_eq!(Error::WrongSecret.status(), 403);
        assert_eq!(Error::StoreFull.status(), 507);
        assert_eq!(Error::RateLimited(3).status(), 429);
        assert_eq!(Error::MethodNotAllowed("GET").status(), 405);
        assert_eq!(Error::HeadTooLarge.status(), 431);
    }
}
