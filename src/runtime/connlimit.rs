//! Connection admission: `-maxConns` open connections server-wide and
//! `-maxConnsPerIP` per client address (IPv6: per /64).
//!
//! Checked once per accepted connection, before a byte is read; a refused
//! connection is simply closed, which costs the server almost nothing. The
//! per-IP counts are shared by all cores (a client's connections land on any
//! core), kept in 64 mutex-striped maps that are touched only at accept and
//! close, never on the request path. Trusted proxies are exempt from the
//! per-IP limit: behind one, a single peer address carries many clients.

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
}

/// The shared connection counters.
pub struct ConnLimits {
    max_total: usize,
    max_per_ip: u32,
    total: AtomicUsize,
    stripes: Vec<Mutex<HashMap<u64, u32>>>,
    hasher: RandomState,
    exempt: TrustedProxies,
}

/// An admitted connection; dropping it releases its slots.
pub struct Permit {
    limits: Arc<ConnLimits>,
    bucket: Option<u64>,
}

impl ConnLimits {
    pub fn new(max_total: usize, max_per_ip: u32, exempt: TrustedProxies) -> Arc<Self> {
        Arc::new(ConnLimits {
            max_total,
            max_per_ip,
            total: AtomicUsize::new(0),
            stripes: (0..STRIPES).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: RandomState::new(),
            exempt,
        })
    }

    fn stripe(&self, bucket: u64) -> MutexGuard<'_, HashMap<u64, u32>> {
        let i = (self.hasher.hash_one(bucket) as usize) % STRIPES;
        // With panic=abort a poisoned lock cannot be observed; be safe anyway.
        self.stripes[i].lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Admits a connection from `peer`, or says why not.
    pub fn admit(self: &Arc<Self>, peer: IpAddr) -> Result<Permit, Refusal> {
        let admitted =
            self.total.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < self.max_total).then_some(n + 1));
        if admitted.is_err() {
            return Err(Refusal::ServerFull);
        }
        let bucket = (!self.exempt.contains(peer)).then(|| net::client(peer));
        if let Some(b) = bucket {
            let mut map = self.stripe(b);
            let count = map.entry(b).or_insert(0);
            if *count >= self.max_per_ip {
                drop(map);
                self.total.fetch_sub(1, Ordering::AcqRel);
                return Err(Refusal::IpFull);
            }
            *count += 1;
        }
        Ok(Permit { limits: self.clone(), bucket })
    }

    pub fn open(&self) -> usize {
        self.total.load(Ordering::Acquire)
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(b) = self.bucket {
            let mut map = self.limits.stripe(b);
            if let Some(count) = map.get_mut(&b) {
                *count -= 1;
                if *count == 0 {
                    map.remove(&b);
                }
            }
        }
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
        let l = ConnLimits::new(5, 2, TrustedProxies::parse("127.0.0.0/8").unwrap());
        let a1 = l.admit(ip("1.1.1.1")).unwrap();
        let _a2 = l.admit(ip("1.1.1.1")).unwrap();
        assert_eq!(l.admit(ip("1.1.1.1")).err(), Some(Refusal::IpFull));
        // IPv6 counts per /64.
        let _b1 = l.admit(ip("2001:db8::1")).unwrap();
        let _b2 = l.admit(ip("2001:db8::2")).unwrap();
        assert_eq!(l.admit(ip("2001:db8::3")).err(), Some(Refusal::IpFull));
        // Trusted proxies are exempt from the per-IP limit, not from the total.
        let _p = l.admit(ip("127.0.0.1")).unwrap();
        assert_eq!(l.admit(ip("127.0.0.1")).err(), Some(Refusal::ServerFull));
        assert_eq!(l.open(), 5);
        drop(a1);
        assert_eq!(l.open(), 4);
        let _a3 = l.admit(ip("1.1.1.1")).unwrap();
        assert_eq!(l.open(), 5);
    }

    #[test]
    fn released_addresses_are_forgotten() {
        let l = ConnLimits::new(10, 1, TrustedProxies::parse("").unwrap());
        for i in 0..100 {
            let p = l.admit(ip(&format!("10.0.0.{i}"))).unwrap();
            drop(p);
        }
        assert_eq!(l.open(), 0);
        assert!(l.stripes.iter().all(|s| s.lock().unwrap().is_empty()));
    }
}
