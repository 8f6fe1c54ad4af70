//! Where a hash table's lookup will land, published so any core can start
//! the lookup's first cache misses without the table's lock.
//!
//! A read over a large store is four dependent misses: the table's control
//! bytes, its slot (an index), the entry, the key. The first two addresses
//! follow from the key's hash and where the table is, so the shard
//! publishes where its table is and the router prefetches those lines
//! before it charges the request to its client; the charge's own misses
//! then overlap them instead of queueing (public GET over 1M keys: 0.91x
//! and 0.94x the CPU per request in the two orders of 5 alternated rounds).
//! The rate limiter publishes its buckets' tables the same way, and
//! prefetches them as soon as the client is known
//! (`ratelimit::Limiter::aim`).
//!
//! Everything published here is a hint. Nothing is ever dereferenced: a
//! stale or torn address (the table moved meanwhile) costs one useless
//! prefetch, never a wrong answer. The addresses assume hashbrown's layout
//! (slots stored below the control bytes in reverse, the control bytes at
//! the allocation's end; a probe starts at `hash & (buckets - 1)`), which
//! the tests check against hashbrown itself, so an upgrade that changes it
//! fails a test instead of silently slowing reads. This module must never
//! read table memory or take a lock.

use allocator_api2::alloc::Allocator;
use hashbrown::HashTable;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Control bytes hashbrown compares at once: its SSE2 group on x86-64, the
/// only target where `fetch` does anything.
const GROUP: usize = 16;

/// A cache line.
const LINE: usize = 64;

/// Where a `hashbrown::HashTable<T>` is: written by the table's owner under
/// its lock, read by anyone without it.
#[derive(Debug)]
pub struct Position<T> {
    /// Address of the table's control bytes; 0: unknown (nothing inserted
    /// since the table was made or emptied).
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
    /// Slots of a probe's first group within a line's length of its first.
    const SPAN: usize = match Self::SLOT {
        0 => 1,
        s if LINE / s == 0 => 1,
        s if LINE / s > GROUP => GROUP,
        s => LINE / s,
    };

    /// Inserts `value` (hashed `hash`; `hasher` rehashes if the table
    /// grows) into `table`, whose position this is, and records where the
    /// table is now, from the new bucket's index and slot. Cheap when
    /// nothing moved (two loads).
    pub fn insert<A: Allocator>(&self, table: &mut HashTable<T, A>, hash: u64, value: T, hasher: impl Fn(&T) -> u64) {
        let slot = table.insert_unique(hash, value, hasher);
        let (index, at) = (slot.bucket_index(), slot.get() as *const T as usize);
        // Bucket `i`'s slot sits `i + 1` slots below the control bytes.
        let ctrl = at.wrapping_add(index.wrapping_add(1).wrapping_mul(Self::SLOT));
        let mask = table.num_buckets().wrapping_sub(1);
        if self.ctrl.load(Ordering::Relaxed) != ctrl || self.mask.load(Ordering::Relaxed) != mask {
            self.ctrl.store(ctrl, Ordering::Relaxed);
            self.mask.store(mask, Ordering::Relaxed);
        }
    }

    /// The table may have moved without an insert (it was emptied and
    /// shrunk): prefetch nothing until the next `insert`, rather than lines
    /// of memory that may now be someone else's.
    pub fn forget(&self) {
        self.ctrl.store(0, Ordering::Relaxed);
    }

    /// Starts fetching the cache lines a lookup of `hash` reads first: the
    /// control group at its probe start, and that group's first slots.
    pub fn prefetch(&self, hash: u64) {
        for addr in self.lines_for(hash).into_iter().flatten() {
            fetch(addr);
        }
    }

    /// What `prefetch` fetches for `hash` (nothing while unknown).
    fn lines_for(&self, hash: u64) -> Option<[usize; 4]> {
        let ctrl = self.ctrl.load(Ordering::Relaxed);
        let pos = hash as usize & self.mask.load(Ordering::Relaxed);
        (ctrl != 0).then(|| Self::lines(ctrl, pos))
    }

    /// The addresses `prefetch` touches for probe start `pos`: the group's
    /// first and last control bytes, and the first and last of its slots
    /// within a line's length (either pair may straddle two lines).
    fn lines(ctrl: usize, pos: usize) -> [usize; 4] {
        let slot = |i: usize| ctrl.wrapping_sub(i.wrapping_add(1).wrapping_mul(Self::SLOT));
        let group = ctrl.wrapping_add(pos);
        [group, group.wrapping_add(GROUP - 1), slot(pos), slot(pos.wrapping_add(Self::SPAN - 1))]
    }

    /// Whether a table's position is published (tests).
    #[cfg(test)]
    pub fn is_known(&self) -> bool {
        self.ctrl.load(Ordering::Relaxed) != 0
    }

    /// Asserts that this predicts where `table` keeps every full bucket's
    /// slot, and its bucket count (the tests of every table that publishes).
    #[cfg(test)]
    pub fn assert_predicts<A: Allocator>(&self, table: &HashTable<T, A>) {
        let ctrl = self.ctrl.load(Ordering::Relaxed);
        assert_eq!(self.mask.load(Ordering::Relaxed).wrapping_add(1), table.num_buckets(), "bucket count");
        for index in table.iter_buckets() {
            let at = table.get_bucket(index).map(|s| s as *const T as usize);
            assert_eq!(at, Some(ctrl.wrapping_sub((index + 1) * Self::SLOT)), "bucket {index}");
        }
    }
}

/// Asks the CPU to bring `addr`'s cache line in; a no-op off x86-64.
#[inline(always)]
pub fn fetch(addr: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        // SAFETY: a prefetch is a hint that never faults and writes nothing,
        // whatever the address, mapped or not (Intel SDM, PREFETCHh: "does
        // not affect program behavior"; its only exception is #UD for a LOCK
        // prefix, which this is not), so any address is sound; the pointer
        // carries no provenance because it is never dereferenced. The tests
        // prefetch unmapped, null-page and non-canonical addresses.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(std::ptr::without_provenance::<i8>(addr)) }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = addr;
}

#[cfg(test)]
mod tests {
    use super::*;
    use allocator_api2::alloc::{AllocError, Global, Layout};
    use std::cell::Cell;
    use std::collections::hash_map::RandomState;
    use std::hash::BuildHasher;
    use std::ptr::NonNull;
    use std::rc::Rc;

    /// The heap, remembering the last block it gave: (address, length).
    #[derive(Clone, Default)]
    struct Recording(Rc<Cell<(usize, usize)>>);

    // SAFETY: every call is forwarded to `Global` unchanged; only the
    // address and length of what it returned are noted.
    unsafe impl Allocator for Recording {
        fn allocate(&self, layout: Layout) -> Result<NonNull<[u8]>, AllocError> {
            let block = Global.allocate(layout)?;
            self.0.set((block.as_ptr() as *mut u8 as usize, block.len()));
            Ok(block)
        }

        unsafe fn deallocate(&self, ptr: NonNull<u8>, layout: Layout) {
            // SAFETY: the caller's contract, passed on: `ptr` came from
            // `allocate` with `layout`, which came from `Global`.
            unsafe { Global.deallocate(ptr, layout) }
        }
    }

    /// A table of `n` indices, published as a shard publishes its table.
    fn table(at: &Position<u32>, n: u32) -> (HashTable<u32, Recording>, Vec<u64>, Recording) {
        let hasher = RandomState::new();
        let hashes: Vec<u64> = (0..n).map(|i| hasher.hash_one(i)).collect();
        let heap = Recording::default();
        let mut t = HashTable::new_in(heap.clone());
        for i in 0..n {
            at.insert(&mut t, hashes[i as usize], i, |&j| hashes[j as usize]);
        }
        (t, hashes, heap)
    }

    #[test]
    fn the_published_position_predicts_every_slot_and_the_control_bytes() {
        let at = Position::default();
        let (t, _, heap) = table(&at, 50_000);
        at.assert_predicts(&t);
        // The control bytes end the table's block: one per bucket, then a
        // group's worth mirrored.
        let (block, len) = heap.0.get();
        assert_eq!(at.ctrl.load(Ordering::Relaxed), block + len - t.num_buckets() - GROUP);
    }

    #[test]
    fn most_lookups_read_the_lines_prefetched_for_them() {
        let at = Position::default();
        let (t, hashes, _) = table(&at, 50_000);
        let mask = at.mask.load(Ordering::Relaxed);
        let ctrl = at.ctrl.load(Ordering::Relaxed);
        let fetched = hashes
            .iter()
            .enumerate()
            .filter(|&(i, &h)| {
                let Some([group, group_end, first, last]) = at.lines_for(h) else { return false };
                let Some(b) = t.find_bucket_index(h, |&j| j == i as u32) else { return false };
                let slot = t.get_bucket(b).map(|s| s as *const u32 as usize);
                // Its control byte is among those fetched from the probe's
                // start, its slot between the first and last fetched.
                (group..=group_end).contains(&(ctrl + b)) && slot.is_some_and(|s| (last..=first).contains(&s))
            })
            .count();
        // hashbrown keeps tables at most 7/8 full, so nearly every key sits
        // in the group its probe starts at; a wrong start would put about
        // 16 keys in 65,536 there.
        assert!(fetched * 10 > hashes.len() * 9, "{fetched} of {} (mask {mask})", hashes.len());
    }

    #[test]
    fn prefetch_is_harmless_at_any_address_and_forgotten_positions_fetch_nothing() {
        let at = Position::default();
        at.prefetch(12345); // nothing published yet: no-op
        assert_eq!(at.lines_for(12345), None);
        let (_t, hashes, _) = table(&at, 1000);
        for &h in &hashes {
            at.prefetch(h);
        }
        at.forget();
        assert_eq!(at.lines_for(hashes[0]), None);
        // Unmapped, null-page, non-canonical and wrapping addresses.
        for addr in [1, 64, usize::MAX - 63, 0x7fff_ffff_f000, 0xdead_0000_0000, 0x8000_0000_0000_0000] {
            fetch(addr);
            for a in Position::<(u64, u32)>::lines(addr, usize::MAX / 2) {
                fetch(a);
            }
        }
    }
}
