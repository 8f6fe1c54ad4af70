//! Blocking reads parked on one core's keys, indexed by what would satisfy
//! them, so that a write touches only the waiters it wakes.
//!
//! A waiter waits for one of three things: the key to exist, its value to
//! differ from `V` (`X-Expected-Value`), or its version to be none of a few
//! entity tags (`If-None-Match`). Per key, waiters are grouped accordingly:
//! one set for "exists", one set per distinct `V`, one set for versions. A
//! write that leaves value `X` wakes every value group but `X`'s (skipping
//! that group is one hash lookup, whatever its size), every "exists" waiter,
//! and every version waiter: only tags up to the key's current version
//! count (a client cannot have seen a later one, so a tag above it is a
//! guess and is ignored), and every write issues a version above all of
//! them. So a write's cost is the waiters it wakes plus a constant, never
//! the count of those it does not wake. (Before this index, 8000 parked
//! reads whose expected value equalled the written one made each write
//! re-check all 8000, and reads listing the next 520 versions, which are
//! predictable, held on through 520 writes each.)
//!
//! Pure bookkeeping: no I/O, no clock; answers are returned to the caller.

use crate::state::shard::Found;
use hashbrown::{HashMap, HashSet};

/// Where a parked waiter's answer goes: a completion slot on a core.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Origin {
    pub core: u32,
    pub slot: u32,
}

/// Most entity tags accepted in one `If-None-Match` or `If-Match`.
pub const MAX_TAGS: usize = 16;

/// What a blocking read waits for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WaitFor {
    /// The key exists.
    Exists,
    /// The key's value is not this (`X-Expected-Value`); absent counts as different.
    ValueDiffers(Box<[u8]>),
    /// The key's version is none of these (`If-None-Match`); absent counts as different.
    VersionDiffers(Vec<u64>),
}

impl WaitFor {
    /// Whether the key's current state (`None`: absent) answers the wait.
    pub fn satisfied(&self, current: Option<&Found>) -> bool {
        match (self, current) {
            (WaitFor::Exists, c) => c.is_some(),
            (WaitFor::ValueDiffers(v), Some(c)) => c.value != *v,
            (WaitFor::VersionDiffers(vs), Some(c)) => !vs.contains(&c.version),
            (_, None) => true,
        }
    }
}

type Id = u64;

struct Waiter {
    origin: Origin,
    key: Box<[u8]>,
    until: WaitFor,
}

/// The waiters of one key, grouped by what satisfies them.
#[derive(Default)]
struct KeyWaiters {
    exists: HashSet<Id>,
    by_value: HashMap<Box<[u8]>, HashSet<Id>>,
    versions: HashSet<Id>,
}

impl KeyWaiters {
    fn is_empty(&self) -> bool {
        self.exists.is_empty() && self.by_value.is_empty() && self.versions.is_empty()
    }
}

/// Every waiter parked on this core's keys.
#[derive(Default)]
pub struct Waiters {
    by_key: HashMap<Box<[u8]>, KeyWaiters>,
    waiters: HashMap<Id, Waiter>,
    by_origin: HashMap<Origin, Id>,
    next_id: Id,
    woken_total: u64,
    /// Shutting down: no new waiter may park.
    closed: bool,
}

impl Waiters {
    /// Waiters parked now.
    pub fn parked(&self) -> usize {
        self.waiters.len()
    }

    /// Waiters answered by a write since start.
    pub fn woken_total(&self) -> u64 {
        self.woken_total
    }

    /// Whether any waiter is parked on `key`.
    pub fn has_key(&self, key: &[u8]) -> bool {
        self.by_key.contains_key(key)
    }

    /// Parks a waiter; its answer will go to `origin`. The caller has
    /// checked that the key's current state does not satisfy it. A version
    /// waiter is woken by the next write, whatever tags above the current
    /// version it listed (see the module doc).
    pub fn park(&mut self, key: Box<[u8]>, until: WaitFor, origin: Origin) {
        let id = self.next_id;
        self.next_id += 1;
        if !self.by_key.contains_key(&key) {
            self.by_key.insert(key.clone(), KeyWaiters::default());
        }
        let Some(group) = self.by_key.get_mut(&key) else { return };
        match &until {
            WaitFor::Exists => {
                group.exists.insert(id);
            }
            WaitFor::ValueDiffers(v) => match group.by_value.get_mut(v) {
                Some(set) => {
                    set.insert(id);
                }
                None => {
                    group.by_value.insert(v.clone(), HashSet::from_iter([id]));
                }
            },
            WaitFor::VersionDiffers(_) => {
                group.versions.insert(id);
            }
        }
        // A slot is never reused while its waiter is parked, so this cannot
        // replace a live entry.
        self.by_origin.insert(origin, id);
        self.waiters.insert(id, Waiter { origin, key, until });
    }

    /// Removes the waiter answering to `origin`, if it is still parked.
    /// Returns whether it was.
    pub fn cancel(&mut self, origin: Origin) -> bool {
        let Some(id) = self.by_origin.remove(&origin) else { return false };
        let Some(w) = self.waiters.remove(&id) else { return false };
        if let Some(group) = self.by_key.get_mut(&w.key) {
            match &w.until {
                WaitFor::Exists => {
                    group.exists.remove(&id);
                }
                WaitFor::ValueDiffers(v) => {
                    if let Some(set) = group.by_value.get_mut(v) {
                        set.remove(&id);
                        if set.is_empty() {
                            group.by_value.remove(v);
                        }
                    }
                }
                WaitFor::VersionDiffers(_) => {
                    group.versions.remove(&id);
                }
            }
            if group.is_empty() {
                self.by_key.remove(&w.key);
            }
        }
        true
    }

    /// Removes every waiter of `key` that the key's new state (`None`:
    /// deleted) satisfies, pushing where each answer goes to `out` (the
    /// answer is that state).
    pub fn wake(&mut self, key: &[u8], current: Option<&Found>, out: &mut Vec<Origin>) {
        let Some(group) = self.by_key.get_mut(key) else { return };
        let mut woken: Vec<Id> = Vec::new();
        match current {
            Some(found) => {
                woken.extend(group.exists.drain());
                // Every value group but the one equal to the new value.
                let keep = group.by_value.remove(&found.value[..]);
                woken.extend(group.by_value.drain().flat_map(|(_, set)| set));
                if let Some(keep) = keep {
                    group.by_value.insert(found.value.clone(), keep);
                }
                // A new version is above every tag a waiter kept.
                woken.extend(group.versions.drain());
            }
            // Gone: every "differs" waiter is answered (404); "exists" ones wait on.
            None => {
                woken.extend(group.by_value.drain().flat_map(|(_, set)| set));
                woken.extend(group.versions.drain());
            }
        }
        if group.is_empty() {
            self.by_key.remove(key);
        }
        for id in woken {
            if let Some(w) = self.waiters.remove(&id) {
                self.by_origin.remove(&w.origin);
                self.woken_total += 1;
                out.push(w.origin);
            }
        }
    }

    /// Whether waiters may still park (not after `drain_all`).
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// Removes every parked waiter (pushing where each answer goes), and
    /// refuses new ones from now on (shutdown).
    pub fn drain_all(&mut self, out: &mut Vec<Origin>) -> usize {
        self.closed = true;
        let n = self.waiters.len();
        for (_, w) in self.waiters.drain() {
            out.push(w.origin);
        }
        self.by_key.clear();
        self.by_origin.clear();
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn found(value: &[u8], version: u64) -> Found {
        Found { value: value.into(), expires_ms: 0, version }
    }

    fn o(slot: u32) -> Origin {
        Origin { core: 0, slot }
    }

    fn slots(out: &[Origin]) -> Vec<u32> {
        let mut s: Vec<u32> = out.iter().map(|o| o.slot).collect();
        s.sort_unstable();
        s
    }

    #[test]
    fn each_kind_wakes_on_what_satisfies_it() {
        let mut w = Waiters::default();
        w.park((*b"k").into(), WaitFor::Exists, o(1));
        w.park((*b"k").into(), WaitFor::ValueDiffers((*b"a").into()), o(2));
        w.park((*b"k").into(), WaitFor::ValueDiffers((*b"b").into()), o(3));
        w.park((*b"k").into(), WaitFor::VersionDiffers(vec![6, 7]), o(4));
        w.park((*b"other").into(), WaitFor::Exists, o(6));
        let mut out = Vec::new();
        // Value "a" at version 8: wakes exists, value!=b, and the version waiter.
        w.wake(b"k", Some(&found(b"a", 8)), &mut out);
        assert_eq!(slots(&out), vec![1, 3, 4]);
        assert_eq!(w.parked(), 2);
        out.clear();
        // "a" stays "a": the value waiter sleeps on.
        w.wake(b"k", Some(&found(b"a", 9)), &mut out);
        assert!(out.is_empty());
        // Deleted: the value waiter is answered (absent differs); "other" is untouched.
        w.wake(b"k", None, &mut out);
        assert_eq!(slots(&out), vec![2]);
        assert_eq!((w.parked(), w.woken_total()), (1, 4));
        assert!(!w.has_key(b"k") && w.has_key(b"other"));
    }

    #[test]
    fn exists_waiters_outlive_a_delete() {
        let mut w = Waiters::default();
        w.park((*b"k").into(), WaitFor::Exists, o(1));
        let mut out = Vec::new();
        w.wake(b"k", None, &mut out);
        assert!(out.is_empty());
        w.wake(b"k", Some(&found(b"x", 1)), &mut out);
        assert_eq!(slots(&out), vec![1]);
    }

    #[test]
    fn cancel_removes_exactly_one_and_cleans_up() {
        let mut w = Waiters::default();
        w.park((*b"k").into(), WaitFor::ValueDiffers((*b"v").into()), o(1));
        w.park((*b"k").into(), WaitFor::ValueDiffers((*b"v").into()), o(2));
        w.park((*b"k").into(), WaitFor::VersionDiffers(vec![1, 2]), o(3));
        assert!(w.cancel(o(1)));
        assert!(!w.cancel(o(1)), "already gone");
        assert!(w.cancel(o(3)));
        let mut out = Vec::new();
        w.wake(b"k", Some(&found(b"z", 5)), &mut out);
        assert_eq!(slots(&out), vec![2]);
        assert_eq!(w.parked(), 0);
        assert!(!w.has_key(b"k"), "no empty groups left behind");
        // A slot reused after its waiter left is a new waiter.
        w.park((*b"k").into(), WaitFor::Exists, o(1));
        assert!(w.cancel(o(1)));
        assert!(w.by_key.is_empty() && w.by_origin.is_empty());
    }

    #[test]
    fn an_unsatisfied_group_costs_one_lookup() {
        // Thousands of waiters expecting the value being written stay parked;
        // the write looks at their group once and answers nobody.
        let mut w = Waiters::default();
        for i in 0..5000 {
            w.park((*b"k").into(), WaitFor::ValueDiffers((*b"same").into()), o(i));
        }
        let mut out = Vec::new();
        for _ in 0..100 {
            w.wake(b"k", Some(&found(b"same", 1)), &mut out);
        }
        assert!(out.is_empty());
        assert_eq!(w.parked(), 5000);
        w.wake(b"k", Some(&found(b"new", 2)), &mut out);
        assert_eq!(out.len(), 5000);
    }

    #[test]
    fn predicted_versions_cannot_hold_a_waiter() {
        // Versions are predictable; a waiter listing future ones would stay
        // parked through many writes. Tags above the current version are
        // ignored: the next write answers it.
        let mut w = Waiters::default();
        let tags: Vec<u64> = (10..10 + MAX_TAGS as u64).collect();
        w.park((*b"k").into(), WaitFor::VersionDiffers(tags), o(1));
        let mut out = Vec::new();
        w.wake(b"k", Some(&found(b"x", 11)), &mut out);
        assert_eq!(slots(&out), vec![1]);
    }

    #[test]
    fn drain_answers_everyone() {
        let mut w = Waiters::default();
        w.park((*b"a").into(), WaitFor::Exists, o(1));
        w.park((*b"b").into(), WaitFor::VersionDiffers(vec![1]), o(2));
        let mut out = Vec::new();
        assert_eq!(w.drain_all(&mut out), 2);
        assert_eq!(slots(&out), vec![1, 2]);
        assert_eq!(w.parked(), 0);
        assert!(w.is_closed());
    }
}
