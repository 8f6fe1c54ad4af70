//! The documents that describe a route, a flag or a metric are held against
//! the one place each is declared: the route table, the flags' gumdrop
//! attributes, the exporter's family list. A route, flag or metric that the
//! README or the shipped HAProxy recipe forgets fails here.

use rendezvous::config::flag_help;
use rendezvous::request::http::Method;
use rendezvous::request::route::{key_routes, Kind, ROUTES};
use rendezvous::runtime::exporter::{FAMILIES, PROCESS_FAMILIES};

const README: &str = include_str!("../README.md");
const HAPROXY: &str = include_str!("../deploy/haproxy/haproxy.cfg");

fn section<'a>(doc: &'a str, heading: &str) -> &'a str {
    let start = doc.find(heading).unwrap_or_else(|| panic!("README has no {heading:?} section"));
    let rest = &doc[start + heading.len()..];
    let end = rest.find("\n## ").unwrap_or(rest.len());
    &rest[..end]
}

#[test]
fn the_readme_api_table_lists_every_route() {
    let api = section(README, "\n## API\n");
    for r in key_routes() {
        assert!(api.contains(&format!("| `{}", r.usage)), "README's API table has no row for {}", r.usage);
    }
    for r in ROUTES.iter().filter(|r| matches!(r.kind, Kind::Page)) {
        assert!(api.contains(&format!("`{}`", r.usage)), "README's API table has no row for {}", r.usage);
    }
}

#[test]
fn the_readme_names_every_route_label() {
    let monitoring = section(README, "\n## Monitoring\n");
    for r in &ROUTES {
        assert!(monitoring.contains(&format!("`{}`", r.label)), "README does not list the route label {}", r.label);
    }
}

#[test]
fn the_readme_flag_table_matches_the_binary() {
    let flags = section(README, "\n## Flags\n");
    for f in flag_help() {
        let row_start =
            if f.meta.is_empty() { format!("| `-{}` |", f.name) } else { format!("| `-{} {}` |", f.name, f.meta) };
        // Pipes in a table cell are escaped (`auto\|uring\|epoll`).
        let row = flags
            .lines()
            .map(|l| l.replace("\\|", "|"))
            .find(|l| l.starts_with(&row_start))
            .unwrap_or_else(|| panic!("README's flag table has no row {row_start}"));
        if let Some(d) = f.default.as_deref().filter(|d| !d.is_empty()) {
            assert!(row.contains(&format!("`{d}`")), "README gives another default for -{}: {row}", f.name);
        }
    }
    // And nothing the binary does not have.
    let known: Vec<String> = flag_help().iter().map(|f| f.name.clone()).collect();
    for line in flags.lines().filter(|l| l.starts_with("| `-")) {
        let name = line[4..].split(['`', ' ']).next().unwrap();
        assert!(known.iter().any(|k| k == name), "README documents -{name}, which the binary does not have");
    }
}

#[test]
fn the_readme_metrics_table_lists_every_family() {
    let monitoring = section(README, "\n## Monitoring\n");
    for f in FAMILIES {
        let row = monitoring
            .lines()
            .find(|l| l.starts_with(&format!("| `{}` |", f.name)))
            .unwrap_or_else(|| panic!("README's metrics table has no row for {}", f.name));
        assert!(row.contains(&format!("| {} |", f.kind.as_str())), "{row}");
        assert!(row.contains(&f.labels.join(",")), "{row}");
    }
    for (name, _, _) in PROCESS_FAMILIES {
        assert!(monitoring.contains(&format!("| `{name}` |")), "README's metrics table has no row for {name}");
    }
}

fn haproxy_list(prefix: &str) -> Vec<&'static str> {
    HAPROXY
        .lines()
        .map(str::trim)
        .find_map(|l| l.strip_prefix(prefix))
        .unwrap_or_else(|| panic!("haproxy.cfg has no `{prefix}` line"))
        .split_whitespace()
        .collect()
}

#[test]
fn the_haproxy_recipe_knows_every_route_and_method() {
    let api = haproxy_list("acl api path_beg");
    let read = haproxy_list("acl read method");
    let write = haproxy_list("acl write method");
    for r in key_routes() {
        assert!(api.contains(&r.path), "haproxy.cfg's `acl api` misses {} (not rate limited, wrong node)", r.path);
        let methods = match r.kind {
            Kind::Read => &read,
            Kind::Write(_) => &write,
            Kind::Page => continue,
        };
        for m in r.methods {
            assert!(
                methods.contains(&m.as_str()),
                "haproxy.cfg does not count {} on {} as it should",
                m.as_str(),
                r.path
            );
        }
    }
    for p in &api {
        assert!(key_routes().any(|r| r.path == *p), "haproxy.cfg routes {p}, which is no route");
    }
    assert!(!read.contains(&Method::Options.as_str()) && !write.contains(&Method::Options.as_str()));
}
