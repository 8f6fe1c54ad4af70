//! Go duration syntax (`1500ms`, `30s`, `1h30m`, `1.5h`) for flags and `?ttl=`.
//!
//! Parsing is delegated to the `go-parse-duration` crate, a port of Go's
//! `time.ParseDuration`, so that operators' existing values mean exactly what
//! they meant to the Go server. That crate indexes bytes and chars
//! interchangeably (a non-ASCII unit panics) and loops forever on a fraction
//! of 19+ digits, so this module only hands it input that cannot reach those
//! paths: short, ASCII, with no digit run longer than 18. Anything else is
//! rejected here. The crate also refuses valid Go durations above 2^62 ns
//! (about 1.28 million hours; its overflow check has a precedence slip):
//! those are validated here and computed from their whole units. This
//! module must never be given the job of deciding what a zero or negative
//! duration means: callers do that.

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

/// Above this many nanoseconds the crate refuses valid Go durations: its
/// overflow check reads `1 << 63 - 1`, which Rust parses as `1 << 62`.
const CRATE_LIMIT: u128 = 1 << 62;

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
    let Some(bound) = Bound::of(s) else {
        // Malformed: the crate says why (it cannot loop or overflow on it).
        return go_parse_duration::parse_duration(s).map_err(|_| DurationError::Invalid);
    };
    if bound.upper > i64::MAX as u128 {
        // Beyond Go's range too: Go calls this an invalid duration.
        return Err(DurationError::Invalid);
    }
    if bound.upper >= CRATE_LIMIT {
        // Valid Go, but past the crate's limit. Check the syntax on the same
        // shape with small numbers, and take the whole-unit sum: such values
        // are decades, far above every cap the server applies.
        go_parse_duration::parse_duration(&bound.shape).map_err(|_| DurationError::Invalid)?;
        let n = bound.whole as i64;
        return Ok(if bound.negative { -n } else { n });
    }
    go_parse_duration::parse_duration(s).map_err(|_| DurationError::Invalid)
}

/// Bounds on a duration's value, computed without the crate.
struct Bound {
    /// Sum of each component's whole part times its unit.
    whole: u128,
    /// `whole` plus one unit per component with a fraction.
    upper: u128,
    negative: bool,
    /// The same syntax with every number replaced by `1`.
    shape: String,
}

impl Bound {
    /// `None` for anything but `[+-]?(digits[.digits]unit)+` with a known unit.
    fn of(s: &str) -> Option<Bound> {
        let b = s.as_bytes();
        let negative = b.first() == Some(&b'-');
        let mut i = usize::from(matches!(b.first(), Some(b'+' | b'-')));
        let (mut whole, mut upper) = (0u128, 0u128);
        let mut shape = String::new();
        if i == b.len() {
            return None;
        }
        while i < b.len() {
            let start = i;
            while i < b.len() && b[i].is_ascii_digit() {
                i += 1;
            }
            let int: u128 = s.get(start..i)?.parse().unwrap_or(0);
            let has_int = i > start;
            let mut fraction = false;
            let mut has_frac_digits = false;
            if i < b.len() && b[i] == b'.' {
                i += 1;
                while i < b.len() && b[i].is_ascii_digit() {
                    fraction |= b[i] != b'0';
                    has_frac_digits = true;
                    i += 1;
                }
            }
            if !has_int && !has_frac_digits {
                return None;
            }
            let unit_start = i;
            while i < b.len() && !(b[i].is_ascii_digit() || b[i] == b'.') {
                i += 1;
            }
            let unit_text = s.get(unit_start..i)?;
            let unit: u128 = match unit_text {
                "ns" => 1,
                "us" => 1_000,
                "ms" => 1_000_000,
                "s" => 1_000_000_000,
                "m" => 60_000_000_000,
                "h" => 3_600_000_000_000,
                _ => return None,
            };
            whole = whole.saturating_add(int.saturating_mul(unit));
            upper = upper.saturating_add(int.saturating_mul(unit)).saturating_add(if fraction { unit } else { 0 });
            shape.push('1');
            shape.push_str(unit_text);
        }
        Some(Bound { whole, upper, negative, shape })
    }
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
        assert_eq!(parse_nanos("2562048h"), Err(DurationError::Invalid));
        assert_eq!(parse_nanos("100000h"), Ok(100_000 * 3_600_000_000_000));
        // Valid Go durations up to Go's maximum parse (callers cap them).
        assert_eq!(parse_nanos("2562047h"), Ok(2_562_047 * 3_600_000_000_000));
        assert_eq!(parse_nanos("2000000h"), Ok(2_000_000 * 3_600_000_000_000));
        assert_eq!(parse_nanos("1500000h30m"), Ok(1_500_000 * 3_600_000_000_000 + 1_800_000_000_000));
    }

    #[test]
    fn formats_shortest_unit() {
        assert_eq!(format(Duration::from_secs(7200)), "2h");
        assert_eq!(format(Duration::from_secs(60)), "1m");
        assert_eq!(format(Duration::from_secs(90)), "90s");
        assert_eq!(format(Duration::from_millis(1500)), "1500ms");
    }
}
