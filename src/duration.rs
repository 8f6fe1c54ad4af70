//! Go duration syntax (`1500ms`, `30s`, `1h30m`, `1.5h`) for flags and `?ttl=`.
//!
//! Parsing is delegated to the `go-parse-duration` crate, a port of Go's
//! `time.ParseDuration`, so that operators' existing values mean exactly what
//! they meant to the Go server. That crate indexes bytes and chars
//! interchangeably (a non-ASCII unit panics) and loops forever on a fraction
//! of 19+ digits, so this module only hands it input that cannot reach those
//! paths: short, ASCII, with no digit run longer than 18. Anything else is
//! rejected here. This module must never be given the job of deciding what a
//! zero or negative duration means: callers do that.

use std::time::Duration;

/// Longest input accepted. `9223372036s` (about 292 years) is 11 bytes; a
/// realistic multi-unit value like `1h30m15s500ms` is 13.
const MAX_LEN: usize = 32;
/// Longest run of digits; the crate's fraction loop hangs at 19 or more.
const MAX_DIGIT_RUN: usize = 18;

/// Why a duration string was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DurationError {
    /// Not Go duration syntax (or outside the guarded subset).
    Invalid,
    /// Zero or negative where a positive duration is required.
    NotPositive,
}

impl std::fmt::Display for DurationError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DurationError::Invalid => f.write_str("not a Go duration (examples: 500ms, 30s, 5m, 1h30m, 1.5h)"),
            DurationError::NotPositive => f.write_str("duration must be positive"),
        }
    }
}

impl std::error::Error for DurationError {}

/// Parses Go duration syntax into signed nanoseconds.
pub fn parse_nanos(s: &str) -> Result<i64, DurationError> {
    if s.is_empty() || s.len() > MAX_LEN || !s.is_ascii() {
        return Err(DurationError::Invalid);
    }
    let mut run = 0;
    for b in s.bytes() {
        if b.is_ascii_digit() {
            run += 1;
            if run > MAX_DIGIT_RUN {
                return Err(DurationError::Invalid);
            }
        } else {
            run = 0;
        }
    }
    if may_overflow(s) {
        return Err(DurationError::Invalid);
    }
    go_parse_duration::parse_duration(s).map_err(|_| DurationError::Invalid)
}

/// Whether the crate's unchecked running sum could overflow i64
/// nanoseconds (`1281023h1281023h1281023h` does): an upper bound from each
/// component's integer part and unit. Malformed input returns false and is
/// left to the crate to reject.
fn may_overflow(s: &str) -> bool {
    let b = s.as_bytes();
    let mut i = usize::from(matches!(b.first(), Some(b'+' | b'-')));
    let mut total: u128 = 0;
    while i < b.len() {
        let start = i;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        let int: u128 = s[start..i].parse().unwrap_or(0);
        if i < b.len() && b[i] == b'.' {
            i += 1;
            while i < b.len() && b[i].is_ascii_digit() {
                i += 1;
            }
        }
        let unit_start = i;
        while i < b.len() && !(b[i].is_ascii_digit() || b[i] == b'.') {
            i += 1;
        }
        let unit: u128 = match &s[unit_start..i] {
            "ns" => 1,
            "us" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            _ => return false,
        };
        total = total.saturating_add((int + 1).saturating_mul(unit));
    }
    total > (i64::MAX / 2) as u128
}

/// Parses a strictly positive Go duration.
pub fn parse_positive(s: &str) -> Result<Duration, DurationError> {
    let nanos = parse_nanos(s)?;
    if nanos <= 0 {
        return Err(DurationError::NotPositive);
    }
    Ok(Duration::from_nanos(nanos as u64))
}

/// Formats a duration the way Go prints it (`2h0m0s` style is noisy, so this
/// uses the shortest exact unit: `2h`, `90s`, `1500ms`). Used in help and docs.
pub fn format(d: Duration) -> String {
    let ms = d.as_millis();
    if !d.subsec_nanos().is_multiple_of(1_000_000) {
        return format!("{}ns", d.as_nanos());
    }
    if ms.is_multiple_of(3_600_000) {
        format!("{}h", ms / 3_600_000)
    } else if ms.is_multiple_of(60_000) {
        format!("{}m", ms / 60_000)
    } else if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_examples() {
        assert_eq!(parse_positive("1500ms"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_positive("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_positive("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_positive("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_positive("1.5h"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_positive(".5s"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_positive("2h"), Ok(Duration::from_secs(7200)));
    }

    #[test]
    fn rejects_zero_negative_and_garbage() {
        assert_eq!(parse_positive("0"), Err(DurationError::NotPositive));
        assert_eq!(parse_positive("0s"), Err(DurationError::NotPositive));
        assert_eq!(parse_positive("-5s"), Err(DurationError::NotPositive));
        for bad in ["", "5", "s", "5x", "abc", "1h-", "..s", "1 h", "+"] {
            assert_eq!(parse_positive(bad), Err(DurationError::Invalid), "{bad:?}");
        }
    }

    #[test]
    fn guards_against_crate_panics_and_hangs() {
        // Non-ASCII units would make the crate slice inside a char.
        assert_eq!(parse_nanos("1µs"), Err(DurationError::Invalid));
        assert_eq!(parse_nanos("1é"), Err(DurationError::Invalid));
        // A 19-digit fraction makes the crate loop forever.
        assert_eq!(parse_nanos("1.0000000000000000000s"), Err(DurationError::Invalid));
        assert_eq!(parse_nanos(&"9".repeat(40)), Err(DurationError::Invalid));
        // Overflow is an error, not a wrap (nor, in debug builds, a panic in the crate's sum).
        assert_eq!(parse_nanos("99999999999h"), Err(DurationError::Invalid));
        assert_eq!(parse_nanos("1281023h1281023h1281023h"), Err(DurationError::Invalid));
        assert_eq!(parse_nanos("2562047h"), Err(DurationError::Invalid));
        assert_eq!(parse_nanos("100000h"), Ok(100_000 * 3_600_000_000_000));
    }

    #[test]
    fn formats_shortest_unit() {
        assert_eq!(format(Duration::from_secs(7200)), "2h");
        assert_eq!(format(Duration::from_secs(60)), "1m");
        assert_eq!(format(Duration::from_secs(90)), "90s");
        assert_eq!(format(Duration::from_millis(1500)), "1500ms");
    }
}
