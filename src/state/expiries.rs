//! The keys one network (or client) holds, as the quotas (`budget`) count
//! them: a sorted multiset of packed `u64`s (expiry second and host bits),
//! searched, counted and changed under a stripe lock.
//!
//! Most networks hold one key, so one key is inline and the whole value is
//! 16 bytes. A short list is one ring buffer: keys expire from the front
//! and new ones, with the latest expiries, join at the back, so the usual
//! changes move nothing. An update moves a key's expiry, though, which
//! takes it out of the middle; in one buffer that shifts up to half the
//! list, 20 KB for a /24 at a 10,000-key quota, under the lock its whole
//! stripe shares. So a list longer than `RUN` keys becomes sorted runs of
//! at most `RUN`, and a change shifts at most one run (and, when a run
//! splits, merges or empties, the short list of runs).
//!
//! Pure data structure: no time, no locks, no I/O. What the numbers mean
//! is `budget`'s business.

use std::collections::VecDeque;

/// Longest single buffer, and longest run. A fresh run is half this, so
/// it has room to grow before it splits.
const RUN: usize = 128;

/// A sorted multiset of `u64`, inline while it holds one.
///
/// The boxes keep this at 16 bytes (a bare collection would make it 32+).
#[derive(Debug)]
#[allow(clippy::box_collection)]
pub enum Expiries {
    One(u64),
    Few(Box<Few>),
    Runs(Box<Runs>),
}

/// Up to about `RUN` keys in one buffer (recovery may put more in, unsorted,
/// until the first use sorts and splits them).
#[derive(Debug)]
pub struct Few {
    keys: VecDeque<u64>,
    /// False after recovery appended keys in file order; sorted on first use.
    sorted: bool,
}

/// More than `RUN / 2` keys, in sorted runs: each run is non-empty, holds at
/// most `RUN` keys, and no key of a run is above any key of the next.
#[derive(Debug)]
pub struct Runs {
    runs: Vec<VecDeque<u64>>,
    /// Each run's last key, side by side: finding a run reads this one
    /// short array, not a cache line of every run it passes.
    lasts: Vec<u64>,
    len: usize,
}

impl Expiries {
    pub fn len(&self) -> usize {
        match self {
            Expiries::One(_) => 1,
            Expiries::Few(f) => f.keys.len(),
            Expiries::Runs(r) => r.len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The `i`th key in order (0 past the end). Sorts first.
    pub fn get(&mut self, i: usize) -> u64 {
        self.sort();
        match self {
            Expiries::One(k) => Some(*k).filter(|_| i == 0),
            Expiries::Few(f) => f.keys.get(i).copied(),
            Expiries::Runs(r) => r.iter(i).next(),
        }
        .unwrap_or(0)
    }

    /// The keys from the `from`th on, in order (call `sort` first).
    pub fn iter(&self, from: usize) -> impl Iterator<Item = u64> + '_ {
        let (one, few, runs) = match self {
            Expiries::One(k) => (Some(*k).filter(|_| from == 0), None, None),
            Expiries::Few(f) => (None, Some(f.keys.range(from.min(f.keys.len())..)), None),
            Expiries::Runs(r) => (None, None, Some(r.iter(from))),
        };
        one.into_iter().chain(few.into_iter().flatten().copied()).chain(runs.into_iter().flatten())
    }

    /// Sorts a list recovery filled in file order (once), splitting a long
    /// one into runs.
    pub fn sort(&mut self) {
        if let Expiries::Few(f) = self {
            if !f.sorted {
                f.keys.make_contiguous().sort_unstable();
                f.sorted = true;
                self.split_if_long();
            }
        }
    }

    /// A sorted buffer past `RUN` keys becomes runs.
    fn split_if_long(&mut self) {
        if let Expiries::Few(f) = self {
            if f.sorted && f.keys.len() > RUN {
                *self = Expiries::Runs(Box::new(Runs::split(std::mem::take(&mut f.keys))));
            }
        }
    }

    /// How many keys satisfy `pred`, which must hold for a prefix of the
    /// sorted keys and for none after it. Sorts first.
    pub fn partition_point(&mut self, pred: impl Fn(u64) -> bool) -> usize {
        self.sort();
        match self {
            Expiries::One(k) => usize::from(pred(*k)),
            Expiries::Few(f) => f.keys.partition_point(|&k| pred(k)),
            Expiries::Runs(r) => r.partition_point(pred),
        }
    }

    /// Adds `k` in order (`sorted`), or at the back of a short list to be
    /// sorted later (recovery).
    pub fn insert(&mut self, k: u64, sorted: bool) {
        match self {
            Expiries::One(a) => {
                let pair = if *a <= k { [*a, k] } else { [k, *a] };
                *self = Expiries::Few(Box::new(Few { keys: VecDeque::from(pair), sorted: true }));
            }
            Expiries::Few(f) if !sorted || !f.sorted => {
                f.keys.push_back(k);
                f.sorted = false;
            }
            Expiries::Few(f) => {
                match f.keys.back() {
                    Some(&b) if b <= k => f.keys.push_back(k),
                    _ => f.keys.insert(f.keys.partition_point(|&e| e < k), k),
                }
                self.split_if_long();
            }
            Expiries::Runs(r) => r.insert(k),
        }
    }

    /// Removes one `k`; false if it is not there. The last key cannot be
    /// removed this way (the caller drops the whole group instead).
    pub fn remove(&mut self, k: u64) -> bool {
        self.sort();
        match self {
            Expiries::One(_) => false,
            Expiries::Few(f) => {
                let Ok(at) = f.keys.binary_search(&k) else { return false };
                f.keys.remove(at);
                if let (1, Some(&last)) = (f.keys.len(), f.keys.front()) {
                    *self = Expiries::One(last);
                } else if f.keys.len() * 4 < f.keys.capacity() {
                    f.keys.shrink_to_fit();
                }
                true
            }
            Expiries::Runs(r) => {
                if !r.remove(k) {
                    return false;
                }
                if r.len <= RUN / 2 {
                    let keys: VecDeque<u64> = r.runs.drain(..).flatten().collect();
                    *self = Expiries::Few(Box::new(Few { keys, sorted: true }));
                }
                true
            }
        }
    }
}

impl Runs {
    /// Sorted `keys` as runs of `RUN / 2`.
    fn split(keys: VecDeque<u64>) -> Runs {
        let len = keys.len();
        let mut runs = Vec::with_capacity(len.div_ceil(RUN / 2));
        let mut lasts = Vec::with_capacity(runs.capacity());
        let mut keys = keys.into_iter();
        loop {
            let run: VecDeque<u64> = keys.by_ref().take(RUN / 2).collect();
            let Some(&last) = run.back() else { break };
            runs.push(run);
            lasts.push(last);
        }
        Runs { runs, lasts, len }
    }

    /// Notes run `j`'s last key again after it changed.
    fn refresh(&mut self, j: usize) {
        if let (Some(last), Some(&b)) = (self.lasts.get_mut(j), self.runs.get(j).and_then(VecDeque::back)) {
            *last = b;
        }
    }

    /// The run that holds `k` if any run does, and where `k` goes: the
    /// first run whose last key is not below `k` (the last run if none).
    fn locate(&self, k: u64) -> usize {
        let j = self.lasts.partition_point(|&b| b < k);
        j.min(self.runs.len().saturating_sub(1))
    }

    fn insert(&mut self, k: u64) {
        let j = self.locate(k);
        let Some(run) = self.runs.get_mut(j) else {
            self.runs.push(VecDeque::from([k]));
            self.lasts.push(k);
            self.len += 1;
            return;
        };
        // The usual key expires last of all: straight onto the end, without
        // searching (a search's reads are cache misses in a long list).
        match run.back() {
            Some(&b) if b <= k => run.push_back(k),
            _ => run.insert(run.partition_point(|&e| e < k), k),
        }
        self.len += 1;
        if run.len() > RUN {
            let tail = run.split_off(run.len() / 2);
            // The front half keeps the whole buffer otherwise, and a run
            // the appends have moved past never grows into it again.
            run.shrink_to_fit();
            let tail_last = tail.back().copied().unwrap_or(k);
            self.runs.insert(j + 1, tail);
            self.lasts.insert(j + 1, tail_last);
        }
        self.refresh(j);
    }

    fn remove(&mut self, k: u64) -> bool {
        let j = self.locate(k);
        let Some(run) = self.runs.get_mut(j) else { return false };
        let Ok(at) = run.binary_search(&k) else { return false };
        run.remove(at);
        self.len -= 1;
        if run.is_empty() {
            self.runs.remove(j);
            self.lasts.remove(j);
            return true;
        }
        // Keep runs from thinning out (a run's buffer costs the same for
        // one key as for many): a run that fits into a neighbour with it
        // at most half full joins it.
        let n = run.len();
        if run.len() * 4 < run.capacity() {
            run.shrink_to_fit();
        }
        let next = self.runs.get(j + 1).map(VecDeque::len);
        let prev = j.checked_sub(1).and_then(|p| self.runs.get(p)).map(VecDeque::len);
        if next.is_some_and(|m| n + m <= RUN / 2) {
            let later = self.runs.remove(j + 1);
            self.lasts.remove(j + 1);
            self.runs[j].extend(later);
        } else if prev.is_some_and(|m| n + m <= RUN / 2) {
            let this = self.runs.remove(j);
            self.lasts.remove(j);
            self.runs[j - 1].extend(this);
            self.refresh(j - 1);
            return true;
        }
        self.refresh(j);
        true
    }

    fn partition_point(&self, pred: impl Fn(u64) -> bool) -> usize {
        let mut below = 0;
        for (run, &last) in self.runs.iter().zip(&self.lasts) {
            if pred(last) {
                below += run.len();
            } else {
                return below + run.partition_point(|&k| pred(k));
            }
        }
        below
    }

    fn iter(&self, mut from: usize) -> impl Iterator<Item = u64> + '_ {
        let mut j = 0;
        while let Some(run) = self.runs.get(j).filter(|r| from >= r.len()) {
            from -= run.len();
            j += 1;
        }
        let rest = self.runs.get(j..).unwrap_or_default();
        rest.iter().enumerate().flat_map(move |(n, r)| r.range(if n == 0 { from } else { 0 }..)).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    // The group slot that holds this is 24 bytes (see `budget`).
    const _: () = assert!(std::mem::size_of::<Expiries>() == 16);

    fn runs_ok(e: &Expiries) -> bool {
        let Expiries::Runs(r) = e else { return true };
        let sorted = r.runs.iter().flatten().collect::<Vec<_>>().windows(2).all(|w| w[0] <= w[1]);
        let sizes = r.runs.iter().all(|run| !run.is_empty() && run.len() <= RUN);
        // Runs do not thin out: any two neighbours hold more than half a run.
        let full = r.len > RUN / 2 && r.runs.windows(2).all(|w| w[0].len() + w[1].len() > RUN / 2);
        let lasts = r.runs.iter().map(|run| run.back().copied()).eq(r.lasts.iter().copied().map(Some));
        sorted && sizes && full && lasts && r.len == r.runs.iter().map(VecDeque::len).sum::<usize>()
    }

    #[derive(Debug, Clone)]
    enum Step {
        Insert(u64),
        Remove(u64),
        RemoveNth(usize),
        Count(u64),
    }

    fn step() -> impl Strategy<Value = Step> {
        // Few distinct values, so duplicates and misses are common.
        prop_oneof![
            4 => (0u64..400).prop_map(Step::Insert),
            2 => (0u64..400).prop_map(Step::Remove),
            2 => any::<usize>().prop_map(Step::RemoveNth),
            1 => (0u64..400).prop_map(Step::Count),
        ]
    }

    proptest! {
        // Against a sorted Vec, through every shape (one, few, runs) and
        // back, with recovery's unsorted fill first.
        #[test]
        fn behaves_as_a_sorted_multiset(
            fill in proptest::collection::vec(0u64..400, 1..400),
            grow in proptest::collection::vec(step(), 0..1500),
            // Then mostly removals, so runs empty, merge and turn back
            // into one buffer.
            shrink in proptest::collection::vec(prop_oneof![1 => step(), 4 => any::<usize>().prop_map(Step::RemoveNth)], 0..1500),
        ) {
            let mut model = vec![fill[0]];
            let mut e = Expiries::One(fill[0]);
            for &k in &fill[1..] {
                e.insert(k, false);
                model.push(k);
            }
            model.sort_unstable();
            for s in grow.into_iter().chain(shrink) {
                match s {
                    Step::Insert(k) => {
                        e.insert(k, true);
                        let at = model.partition_point(|&m| m < k);
                        model.insert(at, k);
                    }
                    Step::Remove(k) => match model.binary_search(&k) {
                        Ok(at) if model.len() > 1 => {
                            prop_assert!(e.remove(k));
                            model.remove(at);
                        }
                        Ok(_) => {}
                        Err(_) => prop_assert!(!e.remove(k)),
                    },
                    Step::RemoveNth(i) => {
                        if model.len() > 1 {
                            let k = model.remove(i % model.len());
                            prop_assert!(e.remove(k));
                        }
                    }
                    Step::Count(k) => {
                        prop_assert_eq!(e.partition_point(|x| x <= k), model.partition_point(|&m| m <= k));
                    }
                }
                prop_assert_eq!(e.len(), model.len());
                prop_assert!(runs_ok(&e));
            }
            e.sort();
            prop_assert_eq!(e.iter(0).collect::<Vec<_>>(), model.clone());
            for from in [0, 1, model.len() / 2, model.len().saturating_sub(1), model.len(), model.len() + 5] {
                prop_assert_eq!(e.iter(from).collect::<Vec<_>>(), model.get(from..).unwrap_or_default().to_vec());
                prop_assert_eq!(e.get(from), model.get(from).copied().unwrap_or(0));
            }
        }
    }

    #[test]
    fn a_long_list_is_runs_and_a_short_one_is_not() {
        let mut e = Expiries::One(0);
        for k in 1..=1000 {
            e.insert(k, true);
        }
        let Expiries::Runs(r) = &e else { panic!("1,001 keys in one buffer") };
        assert!(r.runs.len() >= 1001 / RUN);
        assert!(runs_ok(&e));
        for k in 0..990 {
            assert!(e.remove(k));
        }
        assert!(matches!(e, Expiries::Few(_)), "11 keys still in runs");
        assert_eq!(e.iter(0).collect::<Vec<_>>(), (990..=1000).collect::<Vec<_>>());
    }

    // Removals from the middle empty neighbouring runs: they merge rather
    // than leave a trail of short runs, and the list ends as one buffer.
    #[test]
    fn runs_emptied_in_the_middle_merge() {
        let mut e = Expiries::One(0);
        for k in 1..2000 {
            e.insert(k, true);
        }
        let runs = |e: &Expiries| if let Expiries::Runs(r) = e { r.runs.len() } else { 0 };
        let before = runs(&e);
        for k in 500..1500 {
            assert!(e.remove(k));
            assert!(runs_ok(&e), "after removing {k}");
        }
        assert!(runs(&e) < before - 1000 / RUN, "{} runs left of {before}", runs(&e));
        for k in (0..500).chain(1500..1970) {
            assert!(e.remove(k));
            assert!(runs_ok(&e));
        }
        assert!(matches!(e, Expiries::Few(_)));
        assert_eq!(e.iter(0).collect::<Vec<_>>(), (1970..2000).collect::<Vec<_>>());
    }

    #[test]
    fn recovery_fills_unsorted_and_the_first_use_sorts_and_splits() {
        let mut e = Expiries::One(5000);
        for k in (0..5000).rev() {
            e.insert(k, false);
        }
        assert!(matches!(e, Expiries::Few(_)));
        assert_eq!(e.partition_point(|k| k < 100), 100);
        assert!(matches!(e, Expiries::Runs(_)));
        assert_eq!(e.get(4999), 4999);
        assert!(e.remove(2500));
        assert_eq!(e.len(), 5000);
    }
}
