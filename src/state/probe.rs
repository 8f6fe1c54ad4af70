//! Where a hash table's lookup will land, readable by any core without the
//! table's lock, so the lookup's first cache misses can start early; and
//! the shard's table hash.
//!
//! A read over a large store is four dependent misses: the table's control
//! bytes, its slot (an index), the entry, the key. The first two addresses
//! follow from the key's hash and the table's place alone, so the router
//! prefetches them before it charges the request to its client, and the
//! two walks' misses overlap instead of queueing: public GET over 1M keys
//! took 0.91x and 0.93x the CPU per request (two orders of 5 alternated
//! rounds). The rate limiter does the same for its buckets as soon as the
//! client is known (`ratelimit::Limiter::aim`): 0.96x-1.00x when started
//! before the request is parsed, nothing measurable when started just
//! before the charge.
//!
//! Everything published here is a hint. Nothing is ever dereferenced: a
//! stale or torn address (the table grew meanwhile) costs one useless
//! prefetch, never a wrong answer. The addresses assume hashbrown's layout
//! (slots stored below the control bytes in reverse; a probe starts at
//! `hash & (buckets - 1)`), which the tests check against hashbrown itself,
//! so an upgrade that changes it fails a test instead of silently slowing
//! reads. This module must never read table memory or take a lock.

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Control bytes hashbrown compares at once (its SSE2 group).
const GROUP: usize = 16;

/// The table's 64-bit hash, rebuilt from a key's 32-bit tag: the low half
/// picks the bucket, the top 7 bits are hashbrown's control byte, so the two
/// come from different bits of the tag for tables up to 2^25 buckets (29M
/// keys on a core). Past that each doubling shares one more bit, and more
/// lookups compare a key that does not match: slower, never wrong, since
/// keys are compared in full. (Indices are `u32` for the same reason.)
pub fn spread(tag: u32) -> u64 {
    (u64::from(tag) << 32) | u64::from(tag)
}

/// One shard's hash key and table position. The shard publishes the
/// position when its table moves; other cores only read it.
#[derive(Debug, Default)]
#[repr(align(64))]
pub struct Probe {
    /// The shard's seeded SipHash key (independent of the routing hash).
    hasher: RandomState,
    pub position: Position<u32>,
}

impl Probe {
    /// The table hash of `key` (see `spread`).
    pub fn hash(&self, key: &[u8]) -> u64 {
        spread(self.hasher.hash_one(key) as u32)
    }

    /// Starts fetching what a lookup of `key` reads first.
    pub fn prefetch(&self, key: &[u8]) {
        self.position.prefetch(self.hash(key));
    }
}

/// Where a `hashbrown::HashTable<T>` is: written by the table's owner under
/// its lock, read by anyone without it.
#[derive(Debug)]
pub struct Position<T> {
    /// Address of the table's control bytes; 0 until the first insert.
    ctrl: AtomicUsize,
    /// The table's bucket count minus one.
    mask: AtomicUsize,
    slot: PhantomData<fn() -> T>,
}

impl<T> Default for Position<T> {
    fn default() -> Self {
        Position { ctrl: AtomicUsize::new(0), mask: AtomicUsize::new(0), slot: PhantomData }
    }
}

impl<T> Position<T> {
    const SLOT: usize = std::mem::size_of::<T>();
    /// Slots of a probe's first group within 64 bytes of its first slot.
    const SPAN: usize = match Self::SLOT {
        0 => 1,
        s if 64 / s == 0 => 1,
        s if 64 / s > GROUP => GROUP,
        s => 64 / s,
    };

    /// Records where a table of `buckets` buckets is, from any of its full
    /// buckets: its `index` and the address of the slot it holds. Cheap when
    /// nothing moved (two loads).
    pub fn publish(&self, buckets: usize, index: usize, slot: *const T) {
        // Bucket `i`'s slot sits `i + 1` slots below the control bytes.
        let ctrl = (slot as usize).wrapping_add((index + 1).wrapping_mul(Self::SLOT));
        let mask = buckets.wrapping_sub(1);
        if self.ctrl.load(Ordering::Relaxed) != ctrl || self.mask.load(Ordering::Relaxed) != mask {
            self.ctrl.store(ctrl, Ordering::Relaxed);
            self.mask.store(mask, Ordering::Relaxed);
        }
    }

    /// Starts fetching the cache lines a lookup of `hash` reads first: the
    /// control group at its probe start, and that group's first slots.
    pub fn prefetch(&self, hash: u64) {
        for addr in self.lines_for(hash).into_iter().flatten() {
            fetch(addr);
        }
    }

    /// What `prefetch` fetches for `hash` (nothing before the first insert).
    fn lines_for(&self, hash: u64) -> Option<[usize; 3]> {
        let ctrl = self.ctrl.load(Ordering::Relaxed);
        let pos = hash as usize & self.mask.load(Ordering::Relaxed);
        (ctrl != 0).then(|| Self::lines(ctrl, pos))
    }

    /// Where this says bucket `index`'s slot is, and the bucket count it
    /// has (tests compare them with the table's own).
    #[cfg(test)]
    pub fn slot_of(&self, index: usize) -> (usize, usize) {
        let ctrl = self.ctrl.load(Ordering::Relaxed);
        (ctrl.wrapping_sub((index + 1) * Self::SLOT), self.mask.load(Ordering::Relaxed).wrapping_add(1))
    }

    /// The addresses `prefetch` touches for probe start `pos`: the group's
    /// first control byte, and the first and last of its slots within 64
    /// bytes (which may straddle two lines).
    fn lines(ctrl: usize, pos: usize) -> [usize; 3] {
        let slot = |i: usize| ctrl.wrapping_sub(i.wrapping_add(1).wrapping_mul(Self::SLOT));
        [ctrl.wrapping_add(pos), slot(pos), slot(pos.wrapping_add(Self::SPAN - 1))]
    }
}

/// Asks the CPU to bring `addr`'s cache line in; a no-op where there is no
/// prefetch instruction.
#[inline(always)]
pub fn fetch(addr: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        // SAFETY: a prefetch is a hint that never faults and writes nothing,
        // whatever the address (Intel SDM, PREFETCHh: "does not affect
        // program behavior"), so any address is sound; the pointer carries no
        // provenance because it is never dereferenced. The tests prefetch
        // unmapped and null-page addresses.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(std::ptr::without_provenance::<i8>(addr)) }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = addr;
}

/// `fetch`, asking for the line in a state this core may write (a lock
/// word another core wrote last).
#[inline(always)]
pub fn fetch_to_write(addr: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_ET0};
        // SAFETY: as `fetch`: PREFETCHW is a hint too, it never faults and
        // changes no data (a CPU without it executes it as a no-op).
        unsafe { _mm_prefetch::<_MM_HINT_ET0>(std::ptr::without_provenance::<i8>(addr)) }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = addr;
}

#[cfg(test)]
mod tests {
    use super::*;
    use hashbrown::HashTable;

    /// A table of `n` indices hashed by `probe`, as a shard builds it.
    fn table(probe: &Probe, n: u32) -> (HashTable<u32>, Vec<u64>) {
        let hashes: Vec<u64> = (0..n).map(|i| probe.hash(format!("key-{i}").as_bytes())).collect();
        let mut t = HashTable::new();
        for i in 0..n {
            let occ = t.insert_unique(hashes[i as usize], i, |&j| hashes[j as usize]);
            let (index, slot) = (occ.bucket_index(), occ.get() as *const u32);
            probe.position.publish(occ.into_table().num_buckets(), index, slot);
        }
        (t, hashes)
    }

    #[test]
    fn the_published_position_predicts_every_slot_hashbrown_uses() {
        let probe = Probe::default();
        let (t, _) = table(&probe, 50_000);
        for index in t.iter_buckets() {
            let at = t.get_bucket(index).map(|s| s as *const u32 as usize);
            assert_eq!(Some(probe.position.slot_of(index)), at.map(|a| (a, t.num_buckets())), "bucket {index}");
        }
    }

    #[test]
    fn most_lookups_read_the_lines_prefetched_for_them() {
        let probe = Probe::default();
        let (t, hashes) = table(&probe, 50_000);
        let mask = probe.position.mask.load(Ordering::Relaxed);
        let fetched = hashes
            .iter()
            .enumerate()
            .filter(|&(i, &h)| {
                let Some([_, first, last]) = probe.position.lines_for(h) else { return false };
                let Some(b) = t.find_bucket_index(h, |&j| j == i as u32) else { return false };
                let slot = t.get_bucket(b).map(|s| s as *const u32 as usize);
                // Its control byte is in the 16 fetched from the probe's
                // start, its slot between the first and last fetched.
                b.wrapping_sub(h as usize & mask) & mask < GROUP && slot.is_some_and(|s| (last..=first).contains(&s))
            })
            .count();
        // hashbrown keeps tables at most 7/8 full, so nearly every key sits
        // in the group its probe starts at; a wrong start would put about
        // 16 keys in 65,536 there.
        assert!(fetched * 10 > hashes.len() * 9, "{fetched} of {}", hashes.len());
    }

    #[test]
    fn prefetch_is_harmless_at_any_address() {
        let probe = Probe::default();
        probe.position.prefetch(12345); // nothing published yet: no-op
        let (_t, hashes) = table(&probe, 1000);
        for &h in &hashes {
            probe.position.prefetch(h);
        }
        // Unmapped, null-page and wrapping addresses: prefetches never fault.
        for addr in [1, 64, usize::MAX - 63, 0x7fff_ffff_f000, 0xdead_0000_0000] {
            fetch(addr);
            fetch_to_write(addr);
            for a in Position::<(u64, u32)>::lines(addr, usize::MAX / 2) {
                fetch(a);
            }
        }
    }
}
