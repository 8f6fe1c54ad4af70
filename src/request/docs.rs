//! The `GET /` page: the API documented with this instance's real limits and
//! the request's own host in every example.
//!
//! The Host header is attacker-controlled: a value that is not a plausible
//! `host[:port]` (at most 261 bytes of letters, digits and `.-_:[]`) is
//! replaced by the listen address, and what is placed in the page is
//! HTML-escaped; this module never emits unescaped request data. `GET /`
//! costs no tokens, so the page is rendered once (`Page::new`) and a request
//! only joins its pieces around the base URL: a flood of free page requests
//! costs a copy each, not a render, and a long Host cannot be multiplied
//! into a large answer.

use crate::duration;
use std::time::Duration;

/// The in-browser demo: two tabs exchange a message with `los` and blocking
/// reads. Static (no request data), so it is not formatted or escaped. The
/// query string can drive it (`?room=R&role=send&msg=M`, `?room=R&role=recv`),
/// which is how `tests/browser.rs` runs it in headless Chromium; the page
/// shows a `?room=R` link to open in the second tab.
const DEMO: &str = r##"<h2>Try it: two tabs meet through this server</h2>
<p>Open this page in two tabs with the same room. In one, click <b>Wait for a message</b>
(a blocking read: <code>GET /get/demo/&lt;room&gt;/offer?wait=30s</code>). In the other, type a message and
click <b>Send</b> (<code>POST /los/demo/&lt;room&gt;/offer</code>). The first tab receives it at once and
answers <code>ack:&lt;message&gt;</code> the same way, which the sender is waiting for.</p>
<p><label>Room <input id="room" size="12"></label>
<label>Message <input id="msg" size="24" value="hello"></label>
<button id="send">Send</button> <button id="recv">Wait for a message</button></p>
<p>Second tab: <a id="share" href="#">open this room</a> (or share the link with a friend).</p>
<p>Status: <span id="status">idle</span></p>
<p>Received: <b id="received"></b></p>
<script>
(() => {
  const $ = (id) => document.getElementById(id);
  const params = new URLSearchParams(location.search);
  $("room").value = params.get("room") || Math.random().toString(36).slice(2, 8);
  if (params.get("msg")) $("msg").value = params.get("msg");
  const share = () => {
    const u = new URL(location.href);
    u.search = "?room=" + encodeURIComponent($("room").value);
    $("share").href = u.toString();
    $("share").textContent = u.toString();
  };
  share();
  $("room").oninput = share;
  const key = (name) => "/demo/" + encodeURIComponent($("room").value) + "/" + name;
  const status = (text) => { $("status").textContent = text; };
  // Blocking read: park on the server until the key exists (or 30 s pass).
  async function waitFor(name) {
    for (;;) {
      const r = await fetch("/get" + key(name) + "?wait=30s", { cache: "no-store" });
      if (r.status === 200) return await r.text();
      if (r.status !== 404) throw new Error("server answered " + r.status);
    }
  }
  async function send() {
    status("sending");
    const r = await fetch("/los" + key("offer") + "?ttl=10m", { method: "POST", body: $("msg").value });
    if (r.headers.get("X-Created") !== "true") {
      status("someone was first: " + (await r.text()));
      return;
    }
    status("sent; waiting for the answer");
    $("received").textContent = await waitFor("answer");
    status("done");
  }
  async function receive() {
    status("waiting");
    const offer = await waitFor("offer");
    $("received").textContent = offer;
    await fetch("/los" + key("answer") + "?ttl=10m", { method: "POST", body: "ack:" + offer });
    status("done");
  }
  const run = (f) => () => f().catch((e) => status("error: " + e.message));
  $("send").onclick = run(send);
  $("recv").onclick = run(receive);
  if (params.get("role") === "send") run(send)();
  if (params.get("role") === "recv") run(receive)();
})();
</script>"##;

/// Escapes text for HTML element and attribute content.
pub fn escape_html(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out
}

/// The API table's rows, from the route table.
fn route_rows() -> String {
    let mut rows = String::new();
    for r in crate::request::route::key_routes() {
        rows += &format!(
            "<tr><td><code>{}</code></td><td>{}</td><td>{}</td></tr>\n",
            escape_html(r.usage),
            r.summary,
            r.cost
        );
    }
    rows
}

/// The instance's limits the page states. The runtime fills it from the
/// configuration once; taking plain values keeps this module free of the
/// flag parser, so the page can be rendered (and tested) from anything.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_key_size: usize,
    pub max_value_size: usize,
    pub max_num_kv: usize,
    pub max_requests: u32,
    pub max_requests_per_net: u32,
    /// Key quotas in keys (0: off).
    pub max_keys_per_ip: usize,
    pub max_keys_per_net: usize,
    pub expire: Duration,
    pub reset: Duration,
    pub max_wait: Duration,
}

fn quota(keys: usize) -> String {
    match keys {
        0 => "no limit".to_string(),
        n => n.to_string(),
    }
}

/// Longest Host value placed in the page: a DNS name (253) and a port.
const MAX_HOST: usize = 261;
/// Stands for the base URL while the page is rendered; no page text holds it.
const BASE_MARK: &str = "\u{1}base\u{1}";

/// Whether a Host value may be shown: `host[:port]`, an IPv6 literal in
/// brackets included, and nothing longer than a DNS name and a port.
fn plausible_host(host: &[u8]) -> bool {
    !host.is_empty()
        && host.len() <= MAX_HOST
        && host.iter().all(|&b| b.is_ascii_alphanumeric() || b".-_:[]".contains(&b))
}

/// The page rendered once for this instance's limits, in pieces around
/// its base URL.
#[derive(Debug)]
pub struct Page {
    pieces: Vec<String>,
}

impl Page {
    pub fn new(cfg: &Limits) -> Page {
        Page { pieces: render(BASE_MARK, cfg).split(BASE_MARK).map(str::to_owned).collect() }
    }

    /// The page for a request that named `host` (`fallback`, the listen
    /// address, when it named none or one not fit to show); `https` when
    /// a trusted proxy says the client used TLS.
    pub fn for_host(&self, host: &[u8], fallback: &str, https: bool) -> String {
        let host =
            if plausible_host(host) { escape_html(&String::from_utf8_lossy(host)) } else { escape_html(fallback) };
        let base = format!("{}://{host}", if https { "https" } else { "http" });
        let len = self.pieces.iter().map(String::len).sum::<usize>() + base.len() * self.pieces.len();
        let mut out = String::with_capacity(len);
        for (i, piece) in self.pieces.iter().enumerate() {
            if i > 0 {
                out.push_str(&base);
            }
            out.push_str(piece);
        }
        out
    }
}

/// Renders the page with `base` (already escaped) as its base URL.
fn render(base: &str, cfg: &Limits) -> String {
    let expire = duration::format(cfg.expire);
    let reset = duration::format(cfg.reset);
    let max_wait = duration::format(cfg.max_wait);
    format!(
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Rendezvous</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<style>body{{font-family:system-ui,sans-serif;max-width:52rem;margin:2rem auto;padding:0 1rem;line-height:1.5}}
code,pre{{background:#f4f4f4;border-radius:4px}}pre{{padding:.6rem;white-space:pre-wrap;overflow-wrap:anywhere}}
td,th{{padding:.2rem .6rem;text-align:left;vertical-align:top}}table{{border-collapse:collapse}}tr+tr td{{border-top:1px solid #eee}}</style>
</head><body>
<h1>Rendezvous</h1>
<p>A public, registration-free key-value store for peers that need to find each other.
One side writes <code>host:port</code>, a token or an offer under an agreed key; the other side reads it.</p>

<h2>API</h2>
<table>
<tr><th>request</th><th>does</th><th>tokens</th></tr>
{rows}</table>
<p>Keys are everything after the route prefix, slashes included, percent-decoded once.
<code>ttl</code> takes Go durations (<code>30s</code>, <code>5m</code>, <code>1h30m</code>, <code>1.5h</code>); absent or larger means {expire}.
A write may carry <code>X-Owner-Secret</code>: after that, only writes with the same secret may change or delete the key.
Keys starting with <code>ip/</code> are stored under <code>ip/&lt;your IP&gt;/…</code>, so only you can write them.
Every response carries <code>X-Client-Ip</code>, the address this server sees for you.</p>
<p><b>Blocking reads.</b> <code>GET /get/&lt;key&gt;?wait=D</code> (at most {max_wait}) answers at once if the key exists, else
holds the request until a write creates it (404 when the wait ends). With <code>X-Expected-Value: V</code> or
<code>If-None-Match: "etag"</code> it waits until the value or version changes (304 when the wait ends).</p>
<p><b>Versions.</b> Reads and stores answer an <code>ETag</code> that changes on every write and never repeats (a delete answers a bare <code>OK</code>).
<code>If-None-Match</code> on a read answers 304 while unchanged; <code>If-Match</code> on a write applies it only at that
version (412 otherwise).</p>
<p><b>Browsers.</b> Every answer allows any origin (<code>Access-Control-Allow-Origin: *</code>); <code>OPTIONS</code>
preflights are answered without spending tokens.</p>

<h2>Examples</h2>
<pre>curl -d '203.0.113.7:4000' '{base}/set/my-mesh/peer-a?ttl=10m'
curl {base}/get/my-mesh/peer-a
curl -d 'offer' {base}/los/my-mesh/leader
curl -H 'X-Expected-Value: 1' -d 2 {base}/cas/my-mesh/counter
curl -H 'X-Owner-Secret: s3cret' -d 'mine' {base}/set/my-mesh/owned
curl -X DELETE -H 'X-Owner-Secret: s3cret' {base}/del/my-mesh/owned
curl '{base}/get/my-mesh/answer?wait=30s'
curl -d '4000' {base}/set/ip/game     # then: curl {base}/get/ip/&lt;your IP&gt;/game</pre>

{demo}
<h2>Limits of this instance</h2>
<table>
<tr><td>key size</td><td>{max_key} bytes</td></tr>
<tr><td>value + owner secret</td><td>{max_value} bytes</td></tr>
<tr><td>keys in the store</td><td>{max_kv}</td></tr>
<tr><td>maximum and default TTL</td><td>{expire}</td></tr>
<tr><td>longest blocking read</td><td>{max_wait}</td></tr>
<tr><td>rate limit</td><td>{max_req} tokens per IP (IPv6: per /64) and {max_req_net} per network (IPv4 /24, IPv6 /48) every {reset}; a request needs both; 429 with <code>Retry-After</code> when empty</td></tr>
<tr><td>keys you created that are still live</td><td>{quota_ip} per IP (IPv6: per /64), {quota_net} per network (IPv4 /24, IPv6 /48); creating one more: 429 with <code>Retry-After</code> (when your oldest key expires); your existing keys can still be updated or deleted</td></tr>
</table>
</body></html>
"#,
        rows = route_rows(),
        max_key = cfg.max_key_size,
        max_value = cfg.max_value_size,
        max_kv = cfg.max_num_kv,
        max_req = cfg.max_requests,
        max_req_net = cfg.max_requests_per_net,
        quota_ip = quota(cfg.max_keys_per_ip),
        quota_net = quota(cfg.max_keys_per_net),
        demo = DEMO,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(host: &[u8], https: bool, cfg: &Limits) -> String {
        Page::new(cfg).for_host(host, "127.0.0.1:8080", https)
    }

    #[test]
    fn escapes_markup() {
        assert_eq!(escape_html("<a href=\"x\">&'"), "&lt;a href=&quot;x&quot;&gt;&amp;&#39;");
    }

    fn limits() -> Limits {
        Limits {
            max_key_size: 1000,
            max_value_size: 4096,
            max_num_kv: 10_000,
            max_requests: 99,
            max_requests_per_net: 990,
            max_keys_per_ip: 50,
            max_keys_per_net: 0,
            expire: Duration::from_secs(30 * 60),
            reset: Duration::from_secs(60),
            max_wait: Duration::from_secs(60),
        }
    }

    #[test]
    fn page_shows_host_and_limits() {
        let cfg = limits();
        let p = page(b"rv.example:8080", false, &cfg);
        assert!(p.contains("http://rv.example:8080/get/my-mesh/peer-a"));
        assert!(p.contains("4096 bytes"));
        assert!(p.contains("99 tokens"));
        assert!(p.contains("990 per network"));
        assert!(p.contains("50 per IP (IPv6: per /64), no limit per network"));
        assert!(p.contains("30m"));
        assert!(page(b"rv.example", true, &cfg).contains("https://rv.example/get/my-mesh/peer-a"));
        assert!(page(b"[2001:db8::1]:80", false, &cfg).contains("http://[2001:db8::1]:80/get/"));
    }

    #[test]
    fn a_host_unfit_to_show_is_replaced_by_the_listen_address() {
        let page = Page::new(&limits());
        let plain = page.for_host(b"rv.example", "10.0.0.1:8080", false);
        let long = "a".repeat(262);
        for bad in [&b"<script>alert(1)</script>"[..], b"a\"b", b"", long.as_bytes()] {
            let p = page.for_host(bad, "10.0.0.1:8080", false);
            assert!(!p.contains("script>alert") && !p.contains("aaaa"), "{}", String::from_utf8_lossy(bad));
            assert!(p.contains("http://10.0.0.1:8080/get/my-mesh/peer-a"));
            // The answer is no longer than the page for a plain host.
            assert!(p.len() <= plain.len() + 9 * 4, "{} against {}", p.len(), plain.len());
        }
        // Escaped all the same, whatever the listen address holds.
        assert!(page.for_host(b"", "<x>", false).contains("http://&lt;x&gt;/get/"));
        // Rendered once: joining the pieces gives what a whole render gives.
        assert_eq!(plain, render("http://rv.example", &limits()));
        assert!(!plain.contains(BASE_MARK));
    }

    #[test]
    fn every_route_is_documented() {
        let p = page(b"h", false, &limits());
        for r in crate::request::route::key_routes() {
            assert!(p.contains(&escape_html(r.usage)), "{} missing", r.usage);
        }
        for topic in ["?wait=", "ETag", "If-None-Match", "If-Match", "OPTIONS", "X-Owner-Secret", "/del/"] {
            assert!(p.contains(topic), "{topic} not documented");
        }
    }
}
