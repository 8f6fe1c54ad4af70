//! State every core shares, split into lock stripes: the key quotas and the
//! rate-limit buckets, both keyed by client network.
//!
//! Everything else a core touches it owns alone. These two are per client,
//! and a client's requests reach every core, so either the state moves to
//! one core (a message and a wake per request) or the cores share it. A
//! check-and-update is one short critical section on one of 64 mutexes
//! picked by a seeded hash, so it is exact under any concurrency, two cores
//! contend only on the same stripe at the same instant, and it costs a
//! fraction of a cross-core message. Nothing here may block inside a lock
//! or hold two stripes at once.

use crate::state::prefetch;
use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::sync::{Mutex, MutexGuard, PoisonError};

/// Stripes per table (a power of two).
pub const STRIPES: usize = 64;

/// Keeps each stripe on its own cache lines.
#[derive(Debug, Default)]
#[repr(align(128))]
struct Padded<T>(Mutex<T>);

/// `T` split into lock stripes by a seeded hash of a `u64` id.
#[derive(Debug)]
pub struct Striped<T> {
    stripes: Box<[Padded<T>]>,
    hasher: RandomState,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing panics while holding a stripe; if something ever did, every
    // update is complete at each step, so keep using the data.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl<T: Default> Striped<T> {
    pub fn new() -> Self {
        Striped { stripes: (0..STRIPES).map(|_| Padded::default()).collect(), hasher: RandomState::new() }
    }
}

impl<T: Default> Default for Striped<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> Striped<T> {
    /// The seeded hash of `id` (for a hash table inside the stripe: hash once).
    pub fn hash(&self, id: u64) -> u64 {
        self.hasher.hash_one(id)
    }

    /// The stripe that holds the id whose hash is `hash`.
    pub fn stripe(&self, hash: u64) -> usize {
        // hashbrown takes a table's bucket from the low bits and its tags
        // from the top 7: pick the stripe with bits in between.
        (hash >> 51) as usize & (STRIPES - 1)
    }

    /// Locks the stripe that holds `id`, whose hash is `hash`.
    pub fn lock(&self, hash: u64) -> MutexGuard<'_, T> {
        self.lock_stripe(self.stripe(hash))
    }

    /// Locks stripe `i` (from `stripe`).
    pub fn lock_stripe(&self, i: usize) -> MutexGuard<'_, T> {
        lock(&self.stripes[i].0)
    }

    /// Starts bringing stripe `i` (from `stripe`) to this core: its lock
    /// word and what follows it on the stripe's two lines (a hint; see
    /// `prefetch`).
    pub fn prefetch(&self, i: usize) {
        let at = &self.stripes[i] as *const Padded<T> as usize;
        prefetch::fetch(at);
        prefetch::fetch(at + 64);
    }

    /// Visits every stripe, one lock at a time.
    pub fn for_each(&self, mut f: impl FnMut(&mut T)) {
        for s in self.stripes.iter() {
            f(&mut lock(&s.0));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_keep_their_stripe_and_every_stripe_is_visited() {
        let s: Striped<Vec<u64>> = Striped::new();
        for id in 0..1000u64 {
            s.lock(s.hash(id)).push(id);
        }
        for id in [0u64, 17, 999] {
            assert!(s.lock(s.hash(id)).contains(&id));
        }
        let (mut total, mut used) = (0, 0);
        s.for_each(|v| {
            total += v.len();
            used += usize::from(!v.is_empty());
        });
        assert_eq!(total, 1000);
        assert!(used > STRIPES / 2, "ids spread over the stripes: {used}");
    }
}
