//! The one wall clock the server reads.
//!
//! Expiry times, versions' start value, snapshot timestamps and log records
//! are all Unix milliseconds from this function, so every part of the
//! server agrees on "now". Monotonic intervals (deadlines, rate-limit
//! periods) use `std::time::Instant` directly. Pure state machines never
//! call this: their callers read the clock once and pass the value in.

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch (0 if the clock is set before 1970).
pub fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_clock_is_after_2020() {
        assert!(super::unix_ms() > 1_577_836_800_000);
    }
}
