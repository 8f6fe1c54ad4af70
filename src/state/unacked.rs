//! Which of a shard's recent changes their logs have not acknowledged yet,
//! and so what an answer about a key must wait for.
//!
//! Any core may apply a write to any shard (under the shard's lock) and
//! journals it in its own log, so one shard's changes can sit in several
//! logs at once, each acknowledged at its own pace. An answer reveals the
//! state of one key: it may leave only once the change that made that state
//! is as durable as `-fsync` promises. This module keeps, per log, the
//! changes applied to this shard that the log had not acknowledged when last
//! looked at (version, log position, and from when it leaves its key
//! absent), and answers "which logs, up to where" for a key seen at some
//! version, or seen absent.
//!
//! A key's state is its latest record (records are full states; recovery
//! keeps the highest version), so a present key depends on exactly one
//! change: the one that gave it its version. An absent key depends on every
//! unacknowledged change that leaves some key absent by now: deletes, and
//! puts whose expiry has passed (a put with a 1 ms TTL, once expired and
//! swept, shows as absent; if a crash took the put back, an older value
//! would return). Which key each touched is not kept, so an absent key
//! waits for the latest such change of each log (rare, one log pass).
//! Pure bookkeeping: no I/O, no clock reads; the caller says how far each
//! log is acknowledged (its real position, even while it is failing: a
//! failing log's changes are still not durable) and what time it is.

use std::collections::VecDeque;

/// One change to this shard not yet known to be acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Change {
    version: u64,
    /// End of the change's record in its log.
    lsn: u64,
    /// Unix ms from which the change leaves its key absent: 0 for a
    /// delete, the expiry for a put.
    gone_from_ms: u64,
}

/// Log positions an answer must wait for: `(log, lsn)` pairs, at most one per log.
pub type Dependencies = Vec<(usize, u64)>;

/// A shard's unacknowledged changes, by the log (core) that journaled them.
#[derive(Debug, Default)]
pub struct Unacked {
    logs: Vec<VecDeque<Change>>,
}

impl Unacked {
    /// Records that `log` journaled a change giving version `version`,
    /// ending at position `lsn` of that log, that leaves its key absent from
    /// `gone_from_ms` on (0: a delete; a put's expiry).
    pub fn record(&mut self, log: usize, version: u64, lsn: u64, gone_from_ms: u64) {
        if log >= self.logs.len() {
            self.logs.resize_with(log + 1, VecDeque::new);
        }
        self.logs[log].push_back(Change { version, lsn, gone_from_ms });
    }

    /// Forgets what the logs have acknowledged; `acked(log)` is how far `log`
    /// is acknowledged (`u64::MAX` without persistence).
    fn prune(&mut self, acked: &impl Fn(usize) -> u64) {
        for (log, changes) in self.logs.iter_mut().enumerate() {
            if changes.is_empty() {
                continue;
            }
            let upto = acked(log);
            while changes.front().is_some_and(|c| c.lsn <= upto) {
                changes.pop_front();
            }
        }
    }

    /// What an answer about a key, seen at `seen` (its version, `None`:
    /// absent) at `now_ms`, must wait for, leaving out log `except` (the
    /// answering core's own log, which its answers wait for anyway). Empty:
    /// nothing.
    pub fn dependencies(
        &mut self,
        seen: Option<u64>,
        now_ms: u64,
        except: Option<usize>,
        acked: &impl Fn(usize) -> u64,
    ) -> Dependencies {
        self.prune(acked);
        let mut deps = Dependencies::new();
        for (log, changes) in self.logs.iter().enumerate() {
            if Some(log) == except || changes.is_empty() {
                continue;
            }
            let wait = match seen {
                // Versions are unique in a shard: at most one change made this one.
                Some(v) => changes.iter().rev().find(|c| c.version == v),
                None => changes.iter().rev().find(|c| c.gone_from_ms <= now_ms),
            };
            if let Some(c) = wait {
                deps.push((log, c.lsn));
            }
        }
        deps
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_000;
    const LATER: u64 = 1_000_000;

    fn acked(a: [u64; 3]) -> impl Fn(usize) -> u64 {
        move |log| a[log]
    }

    #[test]
    fn a_present_key_waits_only_for_the_change_that_made_its_version() {
        let mut u = Unacked::default();
        u.record(0, 10, 100, LATER);
        u.record(1, 11, 50, LATER);
        u.record(2, 12, 70, LATER);
        let none = acked([0, 0, 0]);
        assert_eq!(u.dependencies(Some(11), NOW, None, &none), vec![(1, 50)]);
        assert_eq!(u.dependencies(Some(10), NOW, None, &none), vec![(0, 100)]);
        // The answering core's own log is left out.
        assert_eq!(u.dependencies(Some(11), NOW, Some(1), &none), vec![]);
        // A version no unacknowledged change made: nothing to wait for.
        assert_eq!(u.dependencies(Some(9), NOW, None, &none), vec![]);
        // Acknowledged: forgotten.
        assert_eq!(u.dependencies(Some(11), NOW, None, &acked([0, 50, 0])), vec![]);
        assert_eq!(u.dependencies(Some(11), NOW, None, &none), vec![]);
        assert_eq!(u.dependencies(Some(10), NOW, None, &acked([100, 0, 70])), vec![]);
        assert_eq!(u.dependencies(Some(12), NOW, None, &acked([100, 0, 70])), vec![]);
    }

    #[test]
    fn an_absent_key_waits_for_every_change_that_leaves_a_key_absent() {
        let mut u = Unacked::default();
        let none = acked([0, 0, 0]);
        assert_eq!(u.dependencies(None, NOW, None, &none), vec![]);
        u.record(0, 5, 10, 0);
        u.record(0, 6, 20, LATER);
        u.record(0, 7, 30, 0);
        u.record(2, 8, 40, 0);
        // The latest delete of each log covers its earlier ones.
        assert_eq!(u.dependencies(None, NOW, None, &none), vec![(0, 30), (2, 40)]);
        assert_eq!(u.dependencies(None, NOW, Some(2), &none), vec![(0, 30)]);
        // A live put is not an absence: an absent key does not wait for it.
        assert_eq!(u.dependencies(None, NOW, None, &acked([30, 0, 40])), vec![]);
        // An expired one is: taken back by a crash, an older value could return.
        u.record(1, 9, 5, NOW);
        assert_eq!(u.dependencies(None, NOW - 1, None, &none), vec![]);
        assert_eq!(u.dependencies(None, NOW, None, &none), vec![(1, 5)]);
    }

    #[test]
    fn logs_beyond_the_initial_count_are_tracked() {
        let mut u = Unacked::default();
        u.record(4, 1, 1, LATER);
        assert_eq!(u.dependencies(Some(1), NOW, None, &|_| 0), vec![(4, 1)]);
    }
}
