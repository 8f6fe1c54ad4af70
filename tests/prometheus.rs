//! The monitoring kit against the real thing: a real Prometheus (Debian
//! package, installed by `.ci/run`) scrapes a real server; every dashboard
//! and alert expression must be accepted, and the rate and latency panels
//! must return data. `promtool` lints our exposition and unit-tests the rules.

mod common;
use common::*;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const DEPLOY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy");

struct Prometheus {
    _proc: Proc,
    addr: String,
}

impl Prometheus {
    fn start(dir: &Path, target: std::net::SocketAddr) -> Prometheus {
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {DEPLOY}/prometheus/rules.yml\n\
             scrape_configs:\n  - job_name: rendezvous\n    static_configs:\n      - targets: [\"{target}\"]\n"
        );
        let config_path = dir.join("prometheus.yml");
        std::fs::write(&config_path, config).unwrap();
        let addr = format!("127.0.0.1:{}", free_port());
        let proc = Proc::spawn(
            Command::new("prometheus")
                .arg(format!("--config.file={}", config_path.display()))
                .arg(format!("--storage.tsdb.path={}", dir.join("tsdb").display()))
                .arg(format!("--web.listen-address={addr}"))
                .arg("--log.level=warn"),
        );
        Prometheus { _proc: proc, addr }
    }

    fn get(&self, path: &str) -> Option<serde_json::Value> {
        let stream = std::net::TcpStream::connect(&self.addr).ok()?;
        let r = Client::over(stream).req("GET", path, &[], b"");
        serde_json::from_slice(&r.body).ok()
    }

    /// Runs an instant query; returns (status, result array), or `None` if
    /// Prometheus does not answer (yet).
    fn try_query(&self, expr: &str) -> Option<(String, Vec<serde_json::Value>)> {
        let enc = percent_encoding::utf8_percent_encode(expr, percent_encoding::NON_ALPHANUMERIC).to_string();
        let v = self.get(&format!("/api/v1/query?query={enc}"))?;
        let status = v["status"].as_str().unwrap_or("").to_string();
        let result = v["data"]["result"].as_array().cloned().unwrap_or_default();
        if status != "success" {
            eprintln!("query failed: {expr}\n{v}");
        }
        Some((status, result))
    }

    fn query(&self, expr: &str) -> (String, Vec<serde_json::Value>) {
        self.try_query(expr).expect("prometheus answers")
    }

    fn wait_until(&self, what: &str, limit: Duration, mut ok: impl FnMut(&Prometheus) -> bool) {
        let deadline = Instant::now() + limit;
        while !ok(self) {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

fn traffic(s: &Server) {
    let mut c = s.client();
    for i in 0..20 {
        c.req("POST", &format!("/set/k{i}"), &[], b"v");
        c.req("GET", &format!("/get/k{i}"), &[], b"");
        c.req("GET", "/get/missing", &[], b"");
        c.req("POST", "/los/k0", &[], b"x");
    }
}

/// Identifiers like `rendezvous_keys` and `process_cpu_seconds_total` in a PromQL expression.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    for prefix in ["rendezvous_", "process_"] {
        let mut rest = expr;
        while let Some(i) = rest.find(prefix) {
            let tail = &rest[i..];
            let end =
                tail.find(|c: char| !(c.is_ascii_lowercase() || c == '_' || c.is_ascii_digit())).unwrap_or(tail.len());
            names.push(tail[..end].to_string());
            rest = &tail[end..];
        }
    }
    names
}

fn dashboard_exprs() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(format!("{DEPLOY}/grafana/rendezvous-dashboard.json")).unwrap();
    let dash: serde_json::Value = serde_json::from_str(&text).unwrap();
    let mut out = Vec::new();
    for panel in dash["panels"].as_array().unwrap() {
        for t in panel["targets"].as_array().unwrap() {
            let expr = t["expr"].as_str().unwrap().replace("$__rate_interval", "1m").replace("$instance", ".*");
            out.push((panel["title"].as_str().unwrap().to_string(), expr));
        }
    }
    out
}

fn rule_exprs() -> Vec<String> {
    std::fs::read_to_string(format!("{DEPLOY}/prometheus/rules.yml"))
        .unwrap()
        .lines()
        .filter_map(|l| l.trim().strip_prefix("expr:").map(|e| e.trim().to_string()))
        .collect()
}

#[test]
#[ignore = "needs prometheus"]
fn real_prometheus_scrapes_and_every_panel_and_rule_works() {
    require("prometheus");
    let s = Server::start(&["-threads", "2", "-saveDuration", "1s"]);
    traffic(&s);
    let prom_dir = TempDir::new();
    let prom = Prometheus::start(prom_dir.path(), s.metrics.unwrap());

    prom.wait_until("the target to be up", Duration::from_secs(60), |p| {
        p.try_query("up{job=\"rendezvous\"} == 1").is_some_and(|(_, r)| !r.is_empty())
    });
    // Rates need two scrapes that saw traffic.
    prom.wait_until("request rates", Duration::from_secs(60), |p| {
        traffic(&s);
        let (_, r) = p.query("sum(rate(rendezvous_http_requests_total[1m])) > 0");
        let (_, snap) = p.query("rendezvous_snapshot_last_success_timestamp_seconds");
        !r.is_empty() && !snap.is_empty()
    });

    let exposition = s.scrape();
    let dashboard = dashboard_exprs();
    assert!(dashboard.len() >= 15);
    for (title, expr) in &dashboard {
        let (status, result) = prom.query(expr);
        assert_eq!(status, "success", "panel {title:?}: {expr}");
        for name in metric_names(expr) {
            assert!(exposition.contains(&format!("\n{name}")), "panel {title:?} uses {name}, which we do not export");
        }
        let must_have_data = title.starts_with("Requests per second") || title.contains("atency");
        if must_have_data {
            assert!(!result.is_empty(), "panel {title:?} returned no data: {expr}");
        }
    }
    let rules = rule_exprs();
    let declared = std::fs::read_to_string(format!("{DEPLOY}/prometheus/rules.yml"))
        .unwrap()
        .lines()
        .filter(|l| l.trim_start().starts_with("- alert:"))
        .count();
    assert!(declared > 10 && rules.len() == declared, "{} expressions for {declared} alerts", rules.len());
    for expr in &rules {
        let (status, _) = prom.query(expr);
        assert_eq!(status, "success", "rule: {expr}");
        for name in metric_names(expr) {
            assert!(exposition.contains(&format!("\n{name}")), "rule uses {name}, which we do not export");
        }
    }
    // Prometheus loaded the rule file and evaluates every rule without error.
    prom.wait_until("rules to be evaluated", Duration::from_secs(30), |p| {
        let Some(v) = p.get("/api/v1/rules") else {
            return false;
        };
        let rules: Vec<&serde_json::Value> = v["data"]["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|g| g["rules"].as_array().into_iter().flatten())
            .collect();
        rules.len() == declared && rules.iter().all(|r| r["health"] == "ok")
    });
    // The p50 latency of GETs is a real number, not NaN.
    let (_, r) = prom.query("histogram_quantile(0.5, sum by (le) (rate(rendezvous_http_request_duration_seconds_bucket{route=\"get\"}[1m])))");
    let v: f64 = r[0]["value"][1].as_str().unwrap().parse().unwrap();
    assert!(v > 0.0 && v < 1.0, "p50 {v}");
}

#[test]
#[ignore = "needs promtool"]
fn promtool_finds_nothing_to_lint_in_our_exposition() {
    require("promtool");
    let s = Server::start(&["-saveDuration", "1s"]);
    traffic(&s);
    s.wait_log("snapshot saved", Duration::from_secs(10));
    let text = s.scrape();
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let report = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && report.trim().is_empty(), "promtool check metrics:\n{report}");
}

#[test]
#[ignore = "needs promtool"]
fn alert_rules_pass_their_unit_tests() {
    require("promtool");
    let out = Command::new("promtool")
        .args(["test", "rules", "rules_test.yml"])
        .current_dir(format!("{DEPLOY}/prometheus"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
}

#[test]
fn metrics_count_requests_and_are_not_on_the_public_port() {
    let s = Server::start(&["-threads", "2", "-maxRequests", "1", "-resetDuration", "1h"]);
    let mut c = s.client();
    c.req("POST", "/set/a", &[("X-Forwarded-For", "1.1.1.1")], b"v");
    c.req("GET", "/get/a", &[("X-Forwarded-For", "2.2.2.2")], b"");
    c.req("GET", "/get/a", &[("X-Forwarded-For", "2.2.2.2")], b"");
    assert_eq!(s.get("/metrics").status, 404);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = s.scrape();
        // The write costs 3 of the single token: refused. The first GET spends the token.
        let ok = text.contains("rendezvous_http_requests_total{route=\"set\",code=\"429\"} 1")
            && text.contains("rendezvous_http_requests_total{route=\"get\",code=\"404\"} 1")
            && text.contains("rendezvous_http_requests_total{route=\"get\",code=\"429\"} 1")
            && text.contains("rendezvous_rate_limited_total{reason=\"ip\"} 2")
            && text.contains("rendezvous_rate_limited_total{reason=\"net\"} 0")
            && text.contains("rendezvous_keys 0")
            && text.contains("rendezvous_http_request_duration_seconds_count{route=\"get\"} 2");
        if ok {
            break;
        }
        assert!(Instant::now() < deadline, "metrics never showed the requests:\n{text}");
        std::thread::sleep(Duration::from_millis(100));
    }
}
