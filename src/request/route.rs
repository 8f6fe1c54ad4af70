//! The API's routes, declared once.
//!
//! `ROUTES` is the single table a route lives in: its path, its methods and
//! the `Allow` header they make, its token cost, its metric label, whether
//! it reports `X-Created`, how its write condition is decoded, and the line
//! the docs page shows. The router (`match_target`), 405 answers, CORS
//! preflights, the metric labels and the `GET /` page all read this table;
//! tests hold the README and the shipped HAProxy recipe against it. Adding
//! a route is one `Route` variant, one row here, and (for a write) one
//! `Condition` variant with its arm in the shard's exhaustive `match`: the
//! compiler refuses a route that has not decided what it does.
//!
//! This module must not grow behaviour: it describes routes, `api` decodes
//! requests for them, the shard applies them.

use crate::request::error::Error;
use crate::request::http::Method;
use crate::state::shard::Condition;

/// Every route, in `ROUTES` order (`route as usize` indexes the table).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Route {
    Docs,
    Favicon,
    Get,
    Set,
    Los,
    Cas,
    Casoc,
    Del,
}

/// The headers a write condition may be decoded from.
#[derive(Debug, Clone, Copy, Default)]
pub struct CondArgs<'a> {
    /// `X-Expected-Value`, if present (present and empty is a value: "").
    pub expected: Option<&'a [u8]>,
}

/// Decodes a write's condition from its headers.
pub type DecodeCondition = fn(CondArgs<'_>) -> Result<Condition, Error>;

/// What a route does.
#[derive(Clone, Copy)]
pub enum Kind {
    /// A page of this server (no key, no tokens).
    Page,
    /// A read of the key (`GET`/`HEAD`; `?wait=` makes it a blocking read).
    Read,
    /// A write of the key, with the condition decoded by this function.
    Write(DecodeCondition),
}

impl std::fmt::Debug for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Kind::Page => "Page",
            Kind::Read => "Read",
            Kind::Write(_) => "Write",
        })
    }
}

/// One row of the route table.
#[derive(Debug)]
pub struct RouteSpec {
    pub route: Route,
    /// For key routes the prefix the key follows (`/get/`); for pages the
    /// whole path (`/`).
    pub path: &'static str,
    pub methods: &'static [Method],
    /// The `Allow` header of a 405, and `Access-Control-Allow-Methods` of a
    /// preflight: `methods` plus `OPTIONS` (a test checks they agree).
    pub allow: &'static str,
    /// Rate-limit tokens one request costs.
    pub cost: u32,
    /// The `route` label of the request metrics.
    pub label: &'static str,
    pub kind: Kind,
    /// Answers carry `X-Created: true|false`.
    pub reports_created: bool,
    /// Takes `?ttl=`.
    pub takes_ttl: bool,
    /// How the docs page and README write the request.
    pub usage: &'static str,
    /// What it does, one sentence of HTML for the docs page.
    pub summary: &'static str,
}

/// Tokens a read (blocking or not) costs.
pub const READ_COST: u32 = 1;
/// Tokens a write (delete included) costs.
pub const WRITE_COST: u32 = 3;

const READ: &[Method] = &[Method::Get, Method::Head];
const POST: &[Method] = &[Method::Post];

fn expected(args: CondArgs<'_>) -> Result<Box<[u8]>, Error> {
    args.expected.map(Into::into).ok_or(Error::MissingExpectedValue)
}

/// The route table. Order matches `Route`.
pub static ROUTES: [RouteSpec; 8] = [
    RouteSpec {
        route: Route::Docs,
        path: "/",
        methods: READ,
        allow: "GET, HEAD, OPTIONS",
        cost: 0,
        label: "docs",
        kind: Kind::Page,
        reports_created: false,
        takes_ttl: false,
        usage: "GET /",
        summary: "this page, with this instance's limits",
    },
    RouteSpec {
        route: Route::Favicon,
        path: "/favicon.ico",
        methods: READ,
        allow: "GET, HEAD, OPTIONS",
        cost: 0,
        label: "favicon",
        kind: Kind::Page,
        reports_created: false,
        takes_ttl: false,
        usage: "GET /favicon.ico",
        summary: "204, so browsers stop asking",
    },
    RouteSpec {
        route: Route::Get,
        path: "/get/",
        methods: READ,
        allow: "GET, HEAD, OPTIONS",
        cost: READ_COST,
        label: "get",
        kind: Kind::Read,
        reports_created: false,
        takes_ttl: false,
        usage: "GET /get/<key>[?wait=D]",
        summary: "200 with the value (<code>X-Expires-At</code>, <code>ETag</code>), or 404. With \
                  <code>?wait=D</code> an absent key is awaited (a blocking read); with \
                  <code>If-None-Match</code> or <code>X-Expected-Value</code> a change is awaited (304 on timeout)",
    },
    RouteSpec {
        route: Route::Set,
        path: "/set/",
        methods: POST,
        allow: "POST, OPTIONS",
        cost: WRITE_COST,
        label: "set",
        kind: Kind::Write(|_| Ok(Condition::Set)),
        reports_created: false,
        takes_ttl: true,
        usage: "POST /set/<key>[?ttl=D]",
        summary: "store the body; 200 <code>OK</code>",
    },
    RouteSpec {
        route: Route::Los,
        path: "/los/",
        methods: POST,
        allow: "POST, OPTIONS",
        cost: WRITE_COST,
        label: "los",
        kind: Kind::Write(|_| Ok(Condition::Los)),
        reports_created: true,
        takes_ttl: true,
        usage: "POST /los/<key>[?ttl=D]",
        summary: "load or store: store the body if the key is absent (<code>X-Created: true</code>), \
                  else answer the current value (<code>X-Created: false</code>)",
    },
    RouteSpec {
        route: Route::Cas,
        path: "/cas/",
        methods: POST,
        allow: "POST, OPTIONS",
        cost: WRITE_COST,
        label: "cas",
        kind: Kind::Write(|a| Ok(Condition::Cas(expected(a)?))),
        reports_created: false,
        takes_ttl: true,
        usage: "POST /cas/<key>[?ttl=D]",
        summary: "replace if the value equals header <code>X-Expected-Value</code>; 409 with the current \
                  value otherwise, 404 if absent",
    },
    RouteSpec {
        route: Route::Casoc,
        path: "/casoc/",
        methods: POST,
        allow: "POST, OPTIONS",
        cost: WRITE_COST,
        label: "casoc",
        kind: Kind::Write(|a| Ok(Condition::Casoc(expected(a)?))),
        reports_created: true,
        takes_ttl: true,
        usage: "POST /casoc/<key>[?ttl=D]",
        summary: "like cas, but an absent key is created (<code>X-Created</code>)",
    },
    RouteSpec {
        route: Route::Del,
        path: "/del/",
        methods: &[Method::Post, Method::Delete],
        allow: "POST, DELETE, OPTIONS",
        cost: WRITE_COST,
        label: "del",
        kind: Kind::Write(|_| Ok(Condition::Delete)),
        reports_created: false,
        takes_ttl: false,
        usage: "DELETE /del/<key>",
        summary: "remove the key (also as <code>POST</code>); 200 <code>OK</code> or 404",
    },
];

impl Route {
    /// This route's row.
    pub fn spec(self) -> &'static RouteSpec {
        &ROUTES[self as usize]
    }
}

/// Rows of the routes that take a key (everything but the pages).
pub fn key_routes() -> impl Iterator<Item = &'static RouteSpec> {
    ROUTES.iter().filter(|r| !matches!(r.kind, Kind::Page))
}

/// A matched route with its raw (still percent-encoded) key and query.
pub type Routed<'a> = (Route, &'a [u8], Option<&'a [u8]>);

/// Splits a request target into path and query.
pub fn split_target(target: &[u8]) -> (&[u8], Option<&[u8]>) {
    match target.iter().position(|&b| b == b'?') {
        Some(q) => (&target[..q], target.get(q + 1..)),
        None => (target, None),
    }
}

/// The route a path names, whatever the method, with the rest of the path.
fn find(path: &[u8]) -> Option<(&'static RouteSpec, &[u8])> {
    ROUTES.iter().find_map(|r| match r.kind {
        Kind::Page => (path == r.path.as_bytes()).then_some((r, &b""[..])),
        _ => path.strip_prefix(r.path.as_bytes()).map(|key| (r, key)),
    })
}

/// The route a target names, whatever the method (metrics labels, CORS).
pub fn route_hint(target: &[u8]) -> Option<Route> {
    find(split_target(target).0).map(|(r, _)| r.route)
}

/// Matches a target and method against the table.
pub fn match_target(method: Method, target: &[u8]) -> Result<Routed<'_>, Error> {
    let (path, query) = split_target(target);
    let (spec, key) = find(path).ok_or(Error::NoSuchRoute)?;
    if spec.methods.contains(&method) {
        Ok((spec.route, key, query))
    } else {
        Err(Error::MethodNotAllowed(spec.allow))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_is_indexed_by_route() {
        for (i, r) in ROUTES.iter().enumerate() {
            assert_eq!(r.route as usize, i, "{:?} is in the wrong row", r.route);
        }
        // Every variant has a row (this match must list them all).
        for route in
            [Route::Docs, Route::Favicon, Route::Get, Route::Set, Route::Los, Route::Cas, Route::Casoc, Route::Del]
        {
            let covered = match route {
                Route::Docs
                | Route::Favicon
                | Route::Get
                | Route::Set
                | Route::Los
                | Route::Cas
                | Route::Casoc
                | Route::Del => true,
            };
            assert!(covered && route.spec().route == route);
        }
    }

    #[test]
    fn allow_is_the_methods_plus_options() {
        for r in &ROUTES {
            let mut names: Vec<&str> = r.methods.iter().map(|m| m.as_str()).collect();
            names.push("OPTIONS");
            assert_eq!(r.allow, names.join(", "), "{:?}", r.route);
        }
    }

    #[test]
    fn paths_do_not_shadow_each_other() {
        for a in key_routes() {
            for b in key_routes() {
                if a.route != b.route {
                    assert!(!a.path.starts_with(b.path), "{} is shadowed by {}", a.path, b.path);
                }
            }
            assert!(a.path.starts_with('/') && a.path.ends_with('/') && a.path.len() > 2);
        }
    }

    #[test]
    fn costs_follow_the_kind() {
        for r in &ROUTES {
            let want = match r.kind {
                Kind::Page => 0,
                Kind::Read => READ_COST,
                Kind::Write(_) => WRITE_COST,
            };
            assert_eq!(r.cost, want, "{:?}", r.route);
        }
    }

    #[test]
    fn routes_and_methods() {
        assert_eq!(match_target(Method::Get, b"/").unwrap().0, Route::Docs);
        assert_eq!(match_target(Method::Get, b"/favicon.ico").unwrap().0, Route::Favicon);
        assert_eq!(match_target(Method::Get, b"/get/a/b?x=1").unwrap(), (Route::Get, &b"a/b"[..], Some(&b"x=1"[..])));
        assert_eq!(match_target(Method::Head, b"/get/a").unwrap().0, Route::Get);
        assert_eq!(match_target(Method::Post, b"/casoc/k").unwrap().0, Route::Casoc);
        let not_allowed = |m, t: &[u8]| match_target(m, t).unwrap_err();
        assert_eq!(not_allowed(Method::Post, b"/get/k"), Error::MethodNotAllowed("GET, HEAD, OPTIONS"));
        assert_eq!(not_allowed(Method::Get, b"/set/k"), Error::MethodNotAllowed("POST, OPTIONS"));
        assert_eq!(not_allowed(Method::Post, b"/"), Error::MethodNotAllowed("GET, HEAD, OPTIONS"));
        assert_eq!(match_target(Method::Delete, b"/del/k").unwrap().0, Route::Del);
        assert_eq!(match_target(Method::Post, b"/del/k").unwrap().0, Route::Del);
        assert_eq!(not_allowed(Method::Get, b"/del/k"), Error::MethodNotAllowed("POST, DELETE, OPTIONS"));
        assert_eq!(match_target(Method::Get, b"/nope").unwrap_err(), Error::NoSuchRoute);
        assert_eq!(match_target(Method::Get, b"/get").unwrap_err(), Error::NoSuchRoute);
        assert_eq!(match_target(Method::Get, b"*").unwrap_err(), Error::NoSuchRoute);
        assert_eq!(route_hint(b"/cas/x?ttl=1s"), Some(Route::Cas));
        assert_eq!(route_hint(b"/?x"), Some(Route::Docs));
        assert_eq!(route_hint(b"/metrics"), None);
    }

    #[test]
    fn conditions_decode() {
        let decode = |r: Route, expected: Option<&[u8]>| match r.spec().kind {
            Kind::Write(f) => f(CondArgs { expected }),
            other => panic!("{other:?}"),
        };
        assert_eq!(decode(Route::Set, None), Ok(Condition::Set));
        assert_eq!(decode(Route::Cas, None), Err(Error::MissingExpectedValue));
        assert_eq!(decode(Route::Cas, Some(b"")), Ok(Condition::Cas(Box::new([]))));
        assert_eq!(decode(Route::Casoc, Some(b"v")), Ok(Condition::Casoc((*b"v").into())));
        assert_eq!(decode(Route::Del, Some(b"v")), Ok(Condition::Delete));
    }
}
