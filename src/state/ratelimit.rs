//! Per-client token buckets: `-maxRequests` tokens per IP (IPv6: per /64),
//! refilled to full every `-resetDuration`.
//!
//! Every core owns the buckets of the client IPs that route to it (the IP is
//! treated like a key, see `router`), so charging is a plain map update with
//! no lock and counting is exact under any concurrency. Refill is global and
//! aligned to the server's start, so every core agrees on when a period ends
//! and `Retry-After` is the same whichever core answers. At each refill the
//! whole table is forgotten (an idle IP costs nothing after one period), and
//! the table is capped so that millions of spoofed or IPv6 identities cannot
//! exhaust memory. Pure logic: time is passed in, nothing here does I/O.

use std::collections::hash_map::RandomState;
use std::time::{Duration, Instant};

/// Refill periods, aligned to a common start instant shared by all cores.
#[derive(Debug, Clone, Copy)]
pub struct Periods {
    start: Instant,
    period: Duration,
}

impl Periods {
    pub fn new(start: Instant, period: Duration) -> Self {
        // A zero period would divide by zero; config rejects it, but be safe.
        let period = period.max(Duration::from_millis(1));
        Periods { start, period }
    }

    /// Index of the period `now` falls in.
    pub fn epoch(&self, now: Instant) -> u64 {
        let elapsed = now.saturating_duration_since(self.start).as_nanos();
        (elapsed / self.period.as_nanos()) as u64
    }

    /// Whole seconds until the next refill, rounded up, at least 1.
    pub fn retry_after_secs(&self, now: Instant) -> u64 {
        let elapsed = now.saturating_duration_since(self.start).as_nanos();
        let p = self.period.as_nanos();
        let left = p - elapsed % p;
        (left.div_ceil(1_000_000_000) as u64).max(1)
    }
}

/// Why a charge was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The bucket has fewer tokens than the request costs.
    Exhausted,
    /// This core already tracks its share of distinct clients this period.
    TableFull,
}

/// The buckets owned by one core.
pub struct Limiter {
    max_tokens: u32,
    capacity: usize,
    epoch: u64,
    /// Tokens spent this period, by bucket key (`clientip::bucket_key`).
    /// Absent means untouched (full).
    spent: hashbrown::HashMap<u64, u32, RandomState>,
}

impl Limiter {
    /// `capacity` bounds how many distinct clients this core tracks per period.
    pub fn new(max_tokens: u32, capacity: usize) -> Self {
        Limiter {
            max_tokens,
            capacity: capacity.max(1),
            epoch: 0,
            spent: hashbrown::HashMap::with_hasher(RandomState::new()),
        }
    }

    /// Forgets every bucket when a new period has started. Keeps enough room
    /// for last period's population and gives back what a flood grew.
    pub fn refill_if_due(&mut self, epoch: u64) {
        if epoch == self.epoch {
            return;
        }
        self.epoch = epoch;
        let last = self.spent.len();
        self.spent.clear();
        self.spent.shrink_to(last);
    }

    /// Takes `cost` tokens from `bucket`, or refuses and takes nothing.
    pub fn charge(&mut self, bucket: u64, cost: u32, epoch: u64) -> Result<(), Refused> {
        self.refill_if_due(epoch);
        let max = u64::from(self.max_tokens);
        if let Some(spent) = self.spent.get_mut(&bucket) {
            let after = u64::from(*spent) + u64::from(cost);
            if after > max {
                return Err(Refused::Exhausted);
            }
            *spent = after as u32;
            return Ok(());
        }
        if u64::from(cost) > max {
            return Err(Refused::Exhausted);
        }
        if self.spent.len() >= self.capacity {
            return Err(Refused::TableFull);
        }
        self.spent.insert(bucket, cost);
        Ok(())
    }

    /// Number of clients with a bucket this period.
    pub fn tracked(&self) -> usize {
        self.spent.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_budget_then_refusal_consumes_nothing() {
        let mut l = Limiter::new(17, 100);
        for _ in 0..17 {
            assert_eq!(l.charge(1, 1, 0), Ok(()));
        }
        assert_eq!(l.charge(1, 1, 0), Err(Refused::Exhausted));
        assert_eq!(l.charge(1, 3, 0), Err(Refused::Exhausted));
        // Another client is unaffected.
        assert_eq!(l.charge(2, 3, 0), Ok(()));
    }

    #[test]
    fn write_needs_three_tokens_and_refusal_keeps_the_rest() {
        let mut l = Limiter::new(4, 100);
        assert_eq!(l.charge(1, 3, 0), Ok(()));
        assert_eq!(l.charge(1, 3, 0), Err(Refused::Exhausted));
        // The refused write took nothing: one GET still fits.
        assert_eq!(l.charge(1, 1, 0), Ok(()));
        assert_eq!(l.charge(1, 1, 0), Err(Refused::Exhausted));
    }

    #[test]
    fn refill_forgets_everyone() {
        let mut l = Limiter::new(1, 100);
        assert_eq!(l.charge(1, 1, 0), Ok(()));
        assert_eq!(l.charge(1, 1, 0), Err(Refused::Exhausted));
        assert_eq!(l.charge(1, 1, 1), Ok(()));
        l.refill_if_due(2);
        assert_eq!(l.tracked(), 0);
    }

    #[test]
    fn max_u32_budget() {
        let mut l = Limiter::new(u32::MAX, 10);
        assert_eq!(l.charge(1, 3, 0), Ok(()));
        let mut l = Limiter::new(0, 10);
        assert_eq!(l.charge(1, 1, 0), Err(Refused::Exhausted));
        assert_eq!(l.tracked(), 0);
    }

    #[test]
    fn table_is_bounded() {
        let mut l = Limiter::new(10, 3);
        for ip in 0..3 {
            assert_eq!(l.charge(ip, 1, 0), Ok(()));
        }
        assert_eq!(l.charge(99, 1, 0), Err(Refused::TableFull));
        // Known clients still work.
        assert_eq!(l.charge(0, 1, 0), Ok(()));
        // Next period, room again, and memory given back.
        assert_eq!(l.charge(99, 1, 1), Ok(()));
        assert_eq!(l.tracked(), 1);
    }

    #[test]
    fn periods_align_to_start() {
        let start = Instant::now();
        let p = Periods::new(start, Duration::from_secs(60));
        assert_eq!(p.epoch(start), 0);
        assert_eq!(p.epoch(start + Duration::from_secs(59)), 0);
        assert_eq!(p.epoch(start + Duration::from_secs(60)), 1);
        assert_eq!(p.retry_after_secs(start), 60);
        assert_eq!(p.retry_after_secs(start + Duration::from_millis(59_500)), 1);
        assert_eq!(p.retry_after_secs(start + Duration::from_secs(30)), 30);
    }
}
