//! Connection admission: `-maxConns` open connections server-wide,
//! `-maxConnsPerIP` per client address (IPv6: per /64) and
//! `-maxConnsPerNet` per network (IPv4 /24, IPv6 /48). Without the last, a
//! few dozen addresses, or /64s of one free IPv6 /48, could hold every
//! slot with idle keep-alive connections.
//!
//! Checked once per accepted connection, before a byte is read; a refused
//! connection is simply closed, which costs the server almost nothing. The
//! per-IP and per-network counts are shared by all cores (a client's
//! connections land on any core), kept in 64 mutex-striped maps each that
//! are touched only at accept and close, never on the request path (a cap
//! of `u32::MAX` skips the network maps). Trusted proxies are exempt from
//! the per-IP and per-network limits: behind one, a single peer address
//! carries many clients.

use crate::request::clientip::TrustedProxies;
use crate::state::net;
use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

const STRIPES: usize = 64;

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `-maxConns` connections are open.
    ServerFull,
    /// This address has `-maxConnsPerIP` connections open.
    IpFull,
    /// This address's network has `-maxConnsPerNet` connections open.
    NetFull,
}

/// The shared connection counters.
pub struct ConnLimits {
    max_total: usize,
    max_per_ip: u32,
    max_per_net: u32,
    total: AtomicUsize,
    /// Open connections per client key, then per network key (apart: a
    /// network's key can equal one of its clients').
    stripes: Vec<Mutex<HashMap<u64, u32>>>,
    net_stripes: Vec<Mutex<HashMap<u64, u32>>>,
    hasher: RandomState,
    exempt: TrustedProxies,
}

/// An admitted connection; dropping it releases its slots.
pub struct Permit {
    limits: Arc<ConnLimits>,
    bucket: Option<u64>,
}

impl ConnLimits {
    pub fn new(max_total: usize, max_per_ip: u32, max_per_net: u32, exempt: TrustedProxies) -> Arc<Self> {
        Arc::new(ConnLimits {
            max_total,
            max_per_ip,
            max_per_net,
            total: AtomicUsize::new(0),
            stripes: (0..STRIPES).map(|_| Mutex::new(HashMap::new())).collect(),
            net_stripes: (0..STRIPES).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: RandomState::new(),
            exempt,
        })
    }

    fn stripe<'a>(&self, stripes: &'a [Mutex<HashMap<u64, u32>>], key: u64) -> MutexGuard<'a, HashMap<u64, u32>> {
        let i = (self.hasher.hash_one(key) as usize) % STRIPES;
        // With panic=abort a poisoned lock cannot be observed; be safe anyway.
        stripes[i].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts one more connection for `key` unless it has `max` already.
    fn take(&self, stripes: &[Mutex<HashMap<u64, u32>>], key: u64, max: u32) -> bool {
        let mut map = self.stripe(stripes, key);
        let count = map.entry(key).or_insert(0);
        if *count >= max {
            if *count == 0 {
                map.remove(&key);
            }
            return false;
        }
        *count += 1;
        true
    }

    fn give_back(&self, stripes: &[Mutex<HashMap<u64, u32>>], key: u64) {
        let mut map = self.stripe(stripes, key);
        if let Some(count) = map.get_mut(&key) {
            *count -= 1;
            if *count == 0 {
                map.remove(&key);
            }
        }
    }

    /// Admits a connection from `peer`, or says why not. At `-maxConns`,
    /// `make_room` is asked to close some open connections (`idle`); if it
    /// told one or more to close, this one is admitted in the room they
    /// are about to free (the count stays over the limit only until they
    /// have closed, moments later on the same core).
    pub fn admit(self: &Arc<Self>, peer: IpAddr, make_room: impl FnOnce() -> bool) -> Result<Permit, Refusal> {
        // The client's and network's limits first: a connection they refuse
        // must not make room by closing someone else's.
        let bucket = (!self.exempt.contains(peer)).then(|| net::client(peer));
        if let Some(b) = bucket {
            if !self.take(&self.stripes, b, self.max_per_ip) {
                return Err(Refusal::IpFull);
            }
            if self.max_per_net != u32::MAX && !self.take(&self.net_stripes, net::network(b), self.max_per_net) {
                self.give_back(&self.stripes, b);
                return Err(Refusal::NetFull);
            }
        }
        let admitted =
            self.total.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < self.max_total).then_some(n + 1));
        if admitted.is_err() {
            if !make_room() {
                self.give_back_client(bucket);
                return Err(Refusal::ServerFull);
            }
            self.total.fetch_add(1, Ordering::AcqRel);
        }
        Ok(Permit { limits: self.clone(), bucket })
    }

    /// Gives back a client's and its network's count.
    fn give_back_client(&self, bucket: Option<u64>) {
        if let Some(b) = bucket {
            self.give_back(&self.stripes, b);
            if self.max_per_net != u32::MAX {
                self.give_back(&self.net_stripes, net::network(b));
            }
        }
    }

    pub fn open(&self) -> usize {
        self.total.load(Ordering::Acquire)
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.limits.give_back_client(self.bucket);
        self.limits.total.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn per_ip_and_total_limits() {
        let l = ConnLimits::new(5, 2, u32::MAX, TrustedProxies::parse("127.0.0.0/8").unwrap());
        let a1 = l.admit(ip("1.1.1.1"), || false).unwrap();
        let _a2 = l.admit(ip("1.1.1.1"), || false).unwrap();
        assert_eq!(l.admit(ip("1.1.1.1"), || false).err(), Some(Refusal::IpFull));
        // IPv6 counts per /64.
        let _b1 = l.admit(ip("2001:db8::1"), || false).unwrap();
        let _b2 = l.admit(ip("2001:db8::2"), || false).unwrap();
        assert_eq!(l.admit(ip("2001:db8::3"), || false).err(), Some(Refusal::IpFull));
        // Trusted proxies are exempt from the per-IP limit, not from the total.
        let _p = l.admit(ip("127.0.0.1"), || false).unwrap();
        assert_eq!(l.admit(ip("127.0.0.1"), || false).err(), Some(Refusal::ServerFull));
        assert_eq!(l.open(), 5);
        drop(a1);
        assert_eq!(l.open(), 4);
        let _a3 = l.admit(ip("1.1.1.1"), || false).unwrap();
        assert_eq!(l.open(), 5);
    }

    #[test]
    fn released_addresses_are_forgotten() {
        let l = ConnLimits::new(10, 1, 1, TrustedProxies::parse("").unwrap());
        for i in 0..100 {
            let p = l.admit(ip(&format!("10.0.{i}.1")), || false).unwrap();
            drop(p);
        }
        assert_eq!(l.open(), 0);
        assert!(l.stripes.iter().chain(&l.net_stripes).all(|s| s.lock().unwrap().is_empty()));
    }

    #[test]
    fn a_full_server_admits_in_the_room_made_for_it() {
        let l = ConnLimits::new(2, 1, 1, TrustedProxies::parse("").unwrap());
        let counted =
            |l: &ConnLimits| l.stripes.iter().chain(&l.net_stripes).map(|s| s.lock().unwrap().len()).sum::<usize>();
        let a = l.admit(ip("192.0.2.1"), || false).unwrap();
        let _b = l.admit(ip("198.51.100.1"), || false).unwrap();
        // Full: refused when no room is made, and the client's and
        // network's counts are given back.
        assert_eq!(l.admit(ip("203.0.113.1"), || false).err(), Some(Refusal::ServerFull));
        assert_eq!(counted(&l), 4);
        // Admitted when room is made: over the limit until the closed one goes.
        let c = l.admit(ip("203.0.113.1"), || true).unwrap();
        assert_eq!((l.open(), counted(&l)), (3, 6));
        // A client or network at its own limit does not make room.
        let asked = std::cell::Cell::new(false);
        let make_room = || {
            asked.set(true);
            true
        };
        assert_eq!(l.admit(ip("192.0.2.2"), make_room).err(), Some(Refusal::NetFull));
        assert_eq!(l.admit(ip("192.0.2.1"), make_room).err(), Some(Refusal::IpFull));
        assert!(!asked.get(), "a refusal for a client's or network's own limit must not close other connections");
        drop((a, c));
        assert_eq!((l.open(), counted(&l)), (1, 2));
    }

    #[test]
    fn per_network_limit() {
        let l = ConnLimits::new(100, 2, 3, TrustedProxies::parse("127.0.0.0/8").unwrap());
        let held: Vec<Permit> =
            ["192.0.2.1", "192.0.2.1", "192.0.2.2"].map(|a| l.admit(ip(a), || false).unwrap()).into();
        // A fourth address of the /24 is refused, and counted nowhere.
        assert_eq!(l.admit(ip("192.0.2.3"), || false).err(), Some(Refusal::NetFull));
        assert_eq!(l.open(), 3);
        // The client's own limit comes first, and gives nothing back twice.
        assert_eq!(l.admit(ip("192.0.2.1"), || false).err(), Some(Refusal::IpFull));
        // Other networks are not affected; IPv6 counts per /48.
        let _other = l.admit(ip("192.0.3.1"), || false).unwrap();
        let v6: Vec<Permit> =
            ["2001:db8:0:1::1", "2001:db8:0:2::1", "2001:db8:0:3::1"].map(|a| l.admit(ip(a), || false).unwrap()).into();
        assert_eq!(l.admit(ip("2001:db8:0:4::1"), || false).err(), Some(Refusal::NetFull));
        assert!(l.admit(ip("2001:db8:1::1"), || false).is_ok());
        // Trusted proxies are exempt.
        let _p: Vec<Permit> = (0..5).map(|_| l.admit(ip("127.0.0.1"), || false).unwrap()).collect();
        drop(held);
        assert!(l.admit(ip("192.0.2.3"), || false).is_ok());
        drop(v6);
    }
}
