//! Token buckets: `-maxRequests` tokens per client (an IPv4 address, an
//! IPv6 /64) and `-maxRequestsPerNet` per network (an IPv4 /24, an IPv6
//! /48), refilled to full every `-resetDuration`. A request needs tokens in
//! both, so renting many addresses in one network does not multiply what
//! it may send.
//!
//! The buckets are shared by every core (`striped`): a network's bucket
//! and those of all its clients sit in one stripe, so a charge takes both
//! under one short lock, exactly under any concurrency, on whichever core
//! the request arrived; no message to another core. Refill is global and
//! aligned to the server's start, so every core agrees on when a period ends
//! and `Retry-After` is the same whichever core answers. At each refill the
//! whole table is forgotten (an idle IP costs nothing after one period), and
//! the number of clients (and of networks) tracked is capped server-wide so
//! that millions of spoofed or IPv6 identities cannot exhaust memory. Pure
//! logic: time is passed in, nothing here does I/O.

use crate::state::net;
use crate::state::prefetch::Position;
use crate::state::striped::{Striped, STRIPES};
use hashbrown::HashTable;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
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

/// Tokens to take from a client's buckets before anything else happens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Charge {
    /// The client's buckets (`Limiter::aim`); its network's is charged too.
    pub aim: Aim,
    pub cost: u32,
    /// The period the request arrived in (`Periods::epoch` of its arrival).
    pub epoch: u64,
}

/// A client's buckets, located: its ids hashed once, and the cache lines
/// the charge will read already on their way (`Limiter::aim`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Aim {
    client: u64,
    network: u64,
    client_hash: u64,
    net_hash: u64,
}

/// Why a charge was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The bucket has fewer tokens than the request costs.
    Exhausted,
    /// The client's network has fewer tokens than the request costs.
    NetExhausted,
    /// `-maxTrackedIPs` clients (or networks) are tracked this period.
    TableFull,
}

/// A bucket: `(id, tokens spent this period)`.
type Bucket = (u64, u32);

/// One stripe's buckets: `(id, tokens spent this period)`, absent:
/// untouched, full. Both tables are hashed with the stripes' seeded hash,
/// so a charge hashes the network once (for its stripe and its bucket) and
/// the client once.
#[derive(Debug, Default)]
struct Table {
    epoch: u64,
    /// By client key (`net::client`).
    spent: HashTable<Bucket>,
    /// By network (`net::network`). A table of its own: a network key can
    /// equal the client key of the network's first /64.
    net_spent: HashTable<Bucket>,
}

/// How many buckets are tracked, server-wide, against `-maxTrackedIPs`.
#[derive(Debug)]
struct Tracked {
    clients: AtomicUsize,
    networks: AtomicUsize,
    capacity: usize,
}

impl Tracked {
    /// Claims room for one more bucket in `count`, or says the table is full.
    fn claim(&self, count: &AtomicUsize) -> Result<(), Refused> {
        count
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < self.capacity).then_some(n + 1))
            .map(|_| ())
            .map_err(|_| Refused::TableFull)
    }
}

impl Table {
    /// Forgets every bucket when a new period has started. Keeps enough room
    /// for last period's population and gives back what a flood grew; the
    /// tables may move, so their published positions `at` are forgotten too
    /// (under the same lock as every `Position::insert`).
    fn refill_if_due(&mut self, epoch: u64, tracked: &Tracked, hash: impl Fn(u64) -> u64, at: &[Position<Bucket>; 2]) {
        if epoch <= self.epoch {
            return;
        }
        at.iter().for_each(Position::forget);
        self.epoch = epoch;
        tracked.clients.fetch_sub(self.spent.len(), Ordering::AcqRel);
        tracked.networks.fetch_sub(self.net_spent.len(), Ordering::AcqRel);
        for table in [&mut self.spent, &mut self.net_spent] {
            let last = table.len();
            table.clear();
            table.shrink_to(last, |&(id, _)| hash(id));
        }
    }
}

/// Every bucket of the server.
#[derive(Debug)]
pub struct Limiter {
    max_tokens: u32,
    max_net_tokens: u32,
    tracked: Tracked,
    /// The period every stripe has been refilled for.
    refilled: AtomicU64,
    tables: Striped<Table>,
    /// Where each stripe's `spent` and `net_spent` are, so `aim` can start
    /// their cache misses without the stripe's lock (`prefetch`).
    positions: Box<[[Position<Bucket>; 2]]>,
}

impl Limiter {
    /// `capacity` bounds how many distinct clients (and, apart, networks)
    /// are tracked per period, server-wide.
    pub fn new(max_tokens: u32, max_net_tokens: u32, capacity: usize) -> Self {
        Limiter {
            max_tokens,
            max_net_tokens,
            tracked: Tracked { clients: AtomicUsize::new(0), networks: AtomicUsize::new(0), capacity: capacity.max(1) },
            refilled: AtomicU64::new(0),
            tables: Striped::new(),
            positions: (0..STRIPES).map(|_| Default::default()).collect(),
        }
    }

    /// Forgets every bucket once a new period has started (each stripe also
    /// refills itself when next touched; this frees the memory and the
    /// tracked count of stripes nobody touches).
    pub fn refill_if_due(&self, epoch: u64) {
        if self.refilled.load(Ordering::Acquire) >= epoch {
            return;
        }
        for (stripe, at) in self.positions.iter().enumerate() {
            self.tables.lock_stripe(stripe).refill_if_due(epoch, &self.tracked, |id| self.tables.hash(id), at);
        }
        self.refilled.fetch_max(epoch, Ordering::AcqRel);
    }

    /// Locates `client`'s buckets (`net::client`) and starts fetching what
    /// charging them reads: the stripe's lock and both buckets' first table
    /// lines. Called as soon as the client is known, so those misses overlap
    /// the request's parsing instead of queueing in the charge: public GET
    /// 1.00x (0.91-1.02) and 0.96x (0.94-0.98) the CPU in the two orders with
    /// 65,536 clients, 0.99x (0.94-1.00) with 1M, a small gain near the
    /// noise; the same prefetch just before the charge measured 0.99x-1.01x.
    pub fn aim(&self, client: u64) -> Aim {
        let network = net::network(client);
        let (client_hash, net_hash) = (self.tables.hash(client), self.tables.hash(network));
        let stripe = self.tables.stripe(net_hash);
        self.tables.prefetch(stripe);
        let [client_at, net_at] = &self.positions[stripe];
        client_at.prefetch(client_hash);
        net_at.prefetch(net_hash);
        Aim { client, network, client_hash, net_hash }
    }

    /// Takes `cost` tokens from `client`'s bucket and its network's, or
    /// refuses and takes nothing from either.
    pub fn charge(&self, client: u64, cost: u32, epoch: u64) -> Result<(), Refused> {
        self.charge_aimed(&self.aim(client), cost, epoch)
    }

    /// `charge`, for buckets already located by `aim`.
    pub fn charge_aimed(&self, aim: &Aim, cost: u32, epoch: u64) -> Result<(), Refused> {
        // At a period's start, refill every stripe first: otherwise stripes
        // nobody touched yet would still count last period's clients.
        self.refill_if_due(epoch);
        let Aim { client, network, client_hash, net_hash } = *aim;
        let hash = |id| self.tables.hash(id);
        let stripe = self.tables.stripe(net_hash);
        let at = &self.positions[stripe];
        let [client_at, net_at] = at;
        let mut guard = self.tables.lock_stripe(stripe);
        let t = &mut *guard;
        t.refill_if_due(epoch, &self.tracked, hash, at);
        let is = |want: u64| move |&(id, _): &(u64, u32)| id == want;
        let client_bucket = t.spent.find_mut(client_hash, is(client));
        let net_bucket = t.net_spent.find_mut(net_hash, is(network));
        let (client_spent, net_spent) = (client_bucket.as_ref().map(|b| b.1), net_bucket.as_ref().map(|b| b.1));
        let after = |spent: Option<u32>, max: u32| {
            let after = u64::from(spent.unwrap_or(0)) + u64::from(cost);
            (after <= u64::from(max)).then_some(after as u32)
        };
        let Some(client_after) = after(client_spent, self.max_tokens) else { return Err(Refused::Exhausted) };
        let Some(net_after) = after(net_spent, self.max_net_tokens) else { return Err(Refused::NetExhausted) };
        let (new_client, new_net) = (client_spent.is_none(), net_spent.is_none());
        // With both limits at their maximum (the limiter off, as behind the
        // HAProxy recipe) there is no budget to keep, and a full table must
        // not refuse anyone: otherwise a few networks sending one request
        // from each of many addresses kept every new client out.
        let untracked = |full| if self.is_off() { Ok(()) } else { Err(full) };
        if new_client {
            if let Err(full) = self.tracked.claim(&self.tracked.clients) {
                return untracked(full);
            }
        }
        if new_net {
            if let Err(full) = self.tracked.claim(&self.tracked.networks) {
                if new_client {
                    self.tracked.clients.fetch_sub(1, Ordering::AcqRel);
                }
                return untracked(full);
            }
        }
        // Only an accepted charge touches the tables: a refusal allocates
        // nothing.
        let rehash = |&(id, _): &(u64, u32)| hash(id);
        match client_bucket {
            Some(b) => b.1 = client_after,
            None => client_at.insert(&mut t.spent, client_hash, (client, client_after), rehash),
        }
        match net_bucket {
            Some(b) => b.1 = net_after,
            None => net_at.insert(&mut t.net_spent, net_hash, (network, net_after), rehash),
        }
        Ok(())
    }

    /// Whether no charge can ever be refused: both limits at `u32::MAX`.
    fn is_off(&self) -> bool {
        self.max_tokens == u32::MAX && self.max_net_tokens == u32::MAX
    }

    /// Number of clients with a bucket this period.
    pub fn tracked(&self) -> usize {
        self.tracked.clients.load(Ordering::Acquire)
    }

    /// Number of networks with a bucket this period.
    pub fn tracked_networks(&self) -> usize {
        self.tracked.networks.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_budget_then_refusal_consumes_nothing() {
        let l = Limiter::new(17, 1000, 100);
        for _ in 0..17 {
            assert_eq!(l.charge(1, 1, 0), Ok(()));
        }
        assert_eq!(l.charge(1, 1, 0), Err(Refused::Exhausted));
        assert_eq!(l.charge(1, 3, 0), Err(Refused::Exhausted));
        // Another client is unaffected.
        assert_eq!(l.charge(2, 3, 0), Ok(()));
    }

    #[test]
    fn a_full_table_refuses_nobody_when_the_limiter_is_off() {
        let off = Limiter::new(u32::MAX, u32::MAX, 2);
        for client in 1..=2 {
            assert_eq!(off.charge(client << 32, 1, 0), Ok(()));
        }
        // Full, for clients and networks alike: the next ones pass untracked.
        assert_eq!(off.charge(3 << 32, 1, 0), Ok(()));
        assert_eq!(off.charge((1 << 32) | 7, 1, 0), Ok(()));
        assert_eq!((off.tracked(), off.tracked_networks()), (2, 2));
        // With a limit to keep, the same table refuses.
        let on = Limiter::new(u32::MAX, 1000, 2);
        for client in 1..=2 {
            assert_eq!(on.charge(client << 32, 1, 0), Ok(()));
        }
        assert!(matches!(on.charge(3 << 32, 1, 0), Err(Refused::TableFull)));
    }

    #[test]
    fn write_needs_three_tokens_and_refusal_keeps_the_rest() {
        let l = Limiter::new(4, 1000, 100);
        assert_eq!(l.charge(1, 3, 0), Ok(()));
        assert_eq!(l.charge(1, 3, 0), Err(Refused::Exhausted));
        // The refused write took nothing: one GET still fits.
        assert_eq!(l.charge(1, 1, 0), Ok(()));
        assert_eq!(l.charge(1, 1, 0), Err(Refused::Exhausted));
    }

    #[test]
    fn refill_forgets_everyone() {
        let l = Limiter::new(1, 1000, 100);
        assert_eq!(l.charge(1, 1, 0), Ok(()));
        assert_eq!(l.charge(1, 1, 0), Err(Refused::Exhausted));
        assert_eq!(l.charge(1, 1, 1), Ok(()));
        l.refill_if_due(2);
        assert_eq!(l.tracked(), 0);
    }

    #[test]
    fn max_u32_budget() {
        let l = Limiter::new(u32::MAX, u32::MAX, 10);
        assert_eq!(l.charge(1, 3, 0), Ok(()));
        let l = Limiter::new(0, 0, 10);
        assert_eq!(l.charge(1, 1, 0), Err(Refused::Exhausted));
        assert_eq!(l.tracked(), 0);
    }

    #[test]
    fn table_is_bounded() {
        let l = Limiter::new(10, 1000, 3);
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

    fn client(s: &str) -> u64 {
        net::client(s.parse().unwrap())
    }

    /// Buckets held across every stripe: (clients, networks, table capacity).
    fn buckets(l: &Limiter) -> (usize, usize, usize) {
        let mut n = (0, 0, 0);
        l.tables.for_each(|t| {
            n = (n.0 + t.spent.len(), n.1 + t.net_spent.len(), n.2 + t.spent.capacity() + t.net_spent.capacity())
        });
        n
    }

    #[test]
    fn the_published_positions_follow_every_stripes_tables_as_they_grow() {
        let l = Limiter::new(10, 1 << 20, 1 << 20);
        for i in 0..40_000u32 {
            let ip = std::net::Ipv4Addr::from(0x0a00_0000 + i * 7);
            assert_eq!(l.charge(net::client(ip.into()), 1, 0), Ok(()));
        }
        for (stripe, [client_at, net_at]) in l.positions.iter().enumerate() {
            let t = l.tables.lock_stripe(stripe);
            for (table, at) in [(&t.spent, client_at), (&t.net_spent, net_at)] {
                assert!(!table.is_empty(), "stripe {stripe} is used");
                at.assert_predicts(table);
            }
        }
        // A refill empties and shrinks the tables: nothing is prefetched
        // from where they were until a charge publishes them again.
        l.refill_if_due(1);
        assert!(l.positions.iter().flatten().all(|at| !at.is_known()));
        assert_eq!(l.charge(client("10.0.0.1"), 1, 1), Ok(()));
        assert_eq!(l.positions.iter().flatten().filter(|at| at.is_known()).count(), 2);
    }

    #[test]
    fn a_refused_charge_adds_no_bucket_and_allocates_nothing() {
        let l = Limiter::new(5, 3, 2);
        assert_eq!(l.charge(client("192.0.2.1"), 3, 0), Ok(()));
        let (_, _, capacity) = buckets(&l);
        // Refused by its network, by its own bucket, by the table's bound.
        assert_eq!(l.charge(client("192.0.2.2"), 1, 0), Err(Refused::NetExhausted));
        assert_eq!(l.charge(client("192.0.2.1"), 3, 0), Err(Refused::Exhausted));
        for i in 0..100 {
            assert_eq!(l.charge(client(&format!("198.51.{i}.1")), 1, 0).err(), (i >= 1).then_some(Refused::TableFull));
        }
        assert_eq!((l.tracked(), l.tracked_networks()), (2, 2));
        let (clients, networks, after) = buckets(&l);
        assert_eq!((clients, networks), (2, 2));
        // One accepted new client may grow a table; 99 refusals did not.
        assert!(after <= capacity + 2 * 4, "{capacity} -> {after}");
    }

    #[test]
    fn network_budget_is_shared_by_its_clients() {
        let l = Limiter::new(5, 8, 100);
        // Two /64s of one /48 share its 8 tokens.
        assert_eq!(l.charge(client("2001:db8:1:1::1"), 3, 0), Ok(()));
        assert_eq!(l.charge(client("2001:db8:1:2::1"), 3, 0), Ok(()));
        assert_eq!(l.charge(client("2001:db8:1:3::1"), 3, 0), Err(Refused::NetExhausted));
        // The refusal took nothing: two tokens are still there.
        assert_eq!(l.charge(client("2001:db8:1:3::1"), 2, 0), Ok(()));
        assert_eq!(l.charge(client("2001:db8:1:3::1"), 1, 0), Err(Refused::NetExhausted));
        // The per-client budget still binds first where it is smaller.
        assert_eq!(l.charge(client("192.0.2.1"), 3, 0), Ok(()));
        assert_eq!(l.charge(client("192.0.2.1"), 3, 0), Err(Refused::Exhausted));
        assert_eq!(l.charge(client("192.0.2.2"), 3, 0), Ok(()));
        assert_eq!(l.charge(client("192.0.2.3"), 3, 0), Err(Refused::NetExhausted));
        assert_eq!(l.charge(client("192.0.3.3"), 3, 0), Ok(()));
        assert_eq!((l.tracked(), l.tracked_networks()), (6, 3));
        // Everything refills together.
        assert_eq!(l.charge(client("2001:db8:1:3::1"), 3, 1), Ok(()));
    }

    #[test]
    fn exact_across_threads() {
        // 8 threads, 1000 charges each, from 16 clients of one /24 with 100
        // tokens each and 500 for the network: exactly 500 pass.
        let l = std::sync::Arc::new(Limiter::new(100, 500, 1000));
        let passed: usize = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8u64)
                .map(|t| {
                    let l = l.clone();
                    s.spawn(move || {
                        (0..1000u64)
                            .filter(|i| l.charge(client(&format!("192.0.2.{}", (t + i) % 16)), 1, 0).is_ok())
                            .count()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).sum()
        });
        assert_eq!(passed, 500);
        assert_eq!((l.tracked(), l.tracked_networks()), (16, 1));
    }

    #[test]
    fn untouched_stripes_are_refilled_too() {
        let l = Limiter::new(10, 1000, 2);
        assert_eq!(l.charge(client("192.0.2.1"), 1, 0), Ok(()));
        assert_eq!(l.charge(client("198.51.100.1"), 1, 0), Ok(()));
        assert_eq!(l.charge(client("203.0.113.1"), 1, 0), Err(Refused::TableFull));
        // A new period: whichever stripe the next client lands on, the
        // table is empty again.
        assert_eq!(l.charge(client("203.0.113.1"), 1, 1), Ok(()));
        assert_eq!((l.tracked(), l.tracked_networks()), (1, 1));
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
