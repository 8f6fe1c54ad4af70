//! Log output: `-logFormat text` (one human line per event, as before) or
//! `json` (one JSON object per line, for log shippers), filtered by
//! `-logLevel`. Everything goes to stderr, which systemd's journal keeps.
//!
//! Log lines never contain owner secrets or stored values: callers log
//! keys' counts and sizes, not contents.

use crate::config::LogFormat;
use std::io::Write;

/// Installs the logger. Call once, before the first log line.
pub fn init(format: LogFormat, level: log::LevelFilter) {
    let mut b = env_logger::Builder::new();
    b.filter_level(level).target(env_logger::Target::Stderr);
    match format {
        LogFormat::Text => {
            b.format_target(false);
        }
        LogFormat::Json => {
            b.format(|buf, record| {
                let ts = buf.timestamp_millis();
                let level = record.level().as_str().to_ascii_lowercase();
                let msg = json_string(&record.args().to_string());
                writeln!(buf, "{{\"ts\":\"{ts}\",\"level\":\"{level}\",\"msg\":{msg}}}")
            });
        }
    }
    // A second init (tests) keeps the first logger.
    let _ = b.try_init();
}

/// `s` as a JSON string literal (quotes included).
pub fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn json_strings_escape_what_json_requires() {
        assert_eq!(super::json_string("a\"b\\c\nd\u{1}é"), "\"a\\\"b\\\\c\\nd\\u0001é\"");
    }
}
