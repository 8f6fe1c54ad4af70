//! Room in the store: the server-wide `-maxNumKV` budget and the key quotas
//! of each client (`-maxKeysPerIP`) and network (`-maxKeysPerNet`).
//!
//! Keys are spread over the cores by their hash, so the keys one client
//! created live on every core; these counts are therefore the one piece of
//! state every core shares. They change only when a key is created,
//! removed, or its expiry moves, never on reads. The total is one atomic.
//! The quota counts are lock-striped by network (`striped`): a
//! check-and-count is one short critical section, exact under any
//! concurrency.
//!
//! Each network (or client, when only the per-client quota is on) holds the
//! sorted expiries of its keys, each packed with the client's host bits.
//! That gives the live count at any instant without waiting for the sweep
//! (keys past their expiry stop counting the moment they expire), the
//! oldest key's expiry for `Retry-After`, and a per-client count by one
//! scan of a list no longer than the network quota. It costs one 24-byte
//! table slot per network, plus about 8 bytes per key once a network
//! holds two or more (the list itself, and how it stays cheap to change
//! at any length, is `expiries`); the creator itself lives in the entry
//! (and in its log and snapshot records), so the counts are rebuilt
//! exactly at recovery.
//!
//! Pure bookkeeping: time comes in as an argument; no I/O.

use crate::state::expiries::Expiries;
use crate::state::net;
use crate::state::striped::Striped;
use hashbrown::HashTable;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::MutexGuard;

/// Which quota refused a create.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// `-maxKeysPerIP`: one IPv4 address or IPv6 /64.
    Ip,
    /// `-maxKeysPerNet`: one IPv4 /24 or IPv6 /48.
    Net,
}

/// A create refused by a quota.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OverQuota {
    pub scope: Scope,
    /// Whole seconds until the oldest of the counted keys expires (at least 1).
    pub retry_after_secs: u64,
}

/// Why a create was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `-maxNumKV` keys are stored.
    Full,
    Quota(OverQuota),
}

/// The server-wide `-maxNumKV` budget plus the quotas, shared by all shards.
#[derive(Debug)]
pub struct KeyBudget {
    live: AtomicUsize,
    max: usize,
    quotas: Quotas,
}

impl KeyBudget {
    /// A budget of `max` keys, without quotas.
    pub fn new(max: usize) -> Self {
        KeyBudget::with_quotas(max, 0, 0)
    }

    /// A budget of `max` keys, at most `per_ip` per client and `per_net`
    /// per network (0: that quota is off).
    pub fn with_quotas(max: usize, per_ip: usize, per_net: usize) -> Self {
        KeyBudget { live: AtomicUsize::new(0), max, quotas: Quotas::new(per_ip, per_net) }
    }

    /// Claims room for a key `creator` creates, expiring at `expires_ms`,
    /// or says which limit refuses it. Nothing is counted on a refusal.
    pub fn admit(&self, creator: u64, expires_ms: u64, now_ms: u64) -> Result<(), Refusal> {
        self.quotas.admit(creator, expires_ms, now_ms).map_err(Refusal::Quota)?;
        if self.live.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < self.max).then_some(n + 1)).is_err() {
            self.quotas.remove(creator, expires_ms);
            return Err(Refusal::Full);
        }
        Ok(())
    }

    /// Counts a key that must be kept whatever the limits (restored from
    /// disk after a restart with lower limits): creates are refused until
    /// the store, client or network is back under its limit.
    pub fn force(&self, creator: u64, expires_ms: u64) {
        self.live.fetch_add(1, Ordering::AcqRel);
        self.quotas.add(creator, expires_ms);
    }

    /// Gives back a removed key's room.
    pub fn release(&self, creator: u64, expires_ms: u64) {
        self.live.fetch_sub(1, Ordering::AcqRel);
        self.quotas.remove(creator, expires_ms);
    }

    /// A stored key now expires at `new_ms` (its creator unchanged).
    pub fn retime(&self, creator: u64, old_ms: u64, new_ms: u64) {
        self.quotas.retime(creator, old_ms, new_ms);
    }

    /// Its creator stored a key again, to expire at `new_ms`: refused,
    /// changing nothing, if that keeps it alive longer while its network
    /// (or, with only the per-client quota on, the client) holds more keys
    /// than its quota, which only a restart with a lower quota leaves; so
    /// the excess goes as its keys expire, instead of staying as long as
    /// their owners refresh them.
    pub fn refresh(&self, creator: u64, old_ms: u64, new_ms: u64, now_ms: u64) -> Result<(), OverQuota> {
        self.quotas.move_expiry(creator, old_ms, new_ms, Some(now_ms))
    }

    /// Another client stored over a key: from now on it counts against
    /// that client (refused, changing nothing, if that puts it over quota),
    /// so nobody can keep a key on someone else's quota by refreshing it.
    pub fn transfer(&self, old: (u64, u64), new: (u64, u64), now_ms: u64) -> Result<(), OverQuota> {
        if self.quotas.transfer_within(old, new, now_ms)? {
            return Ok(());
        }
        self.quotas.admit(new.0, new.1, now_ms)?;
        self.quotas.remove(old.0, old.1);
        Ok(())
    }

    /// A stored key was replaced by one with another creator or expiry
    /// (recovery replaying a record over a snapshot's entry).
    pub fn replace(&self, old: (u64, u64), new: (u64, u64)) {
        self.quotas.remove(old.0, old.1);
        self.quotas.add(new.0, new.1);
    }

    pub fn live(&self) -> usize {
        self.live.load(Ordering::Acquire)
    }

    pub fn max(&self) -> usize {
        self.max
    }

    pub fn quotas(&self) -> &Quotas {
        &self.quotas
    }
}

/// One network's (or client's) keys: `(expiry second << 16) | host`.
#[derive(Debug)]
struct Group {
    id: u64,
    keys: Expiries,
}

/// Index of the first key of `keys` still live at `now_ms`: a key counts
/// until the whole second it expires in has passed, never less than its TTL.
fn first_live(keys: &mut Expiries, now_ms: u64) -> usize {
    let now_s = now_ms / 1000;
    keys.partition_point(|k| k >> 16 <= now_s)
}

// A network holding one key (most of them, on a public instance) costs
// one table slot and nothing more.
const _: () = assert!(std::mem::size_of::<Group>() == 24);

/// How many networks and clients are at their quota (for `/metrics`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Census {
    /// Networks (or clients, with only the per-client quota on) holding keys.
    pub groups: usize,
    pub nets_at_limit: usize,
    pub ips_at_limit: usize,
    /// Live keys those networks and clients hold: more than their number
    /// times the quota while some are over a lowered one.
    pub net_keys_at_limit: usize,
    pub ip_keys_at_limit: usize,
}

/// Live keys by creating client and network.
#[derive(Debug)]
pub struct Quotas {
    per_ip: usize,
    per_net: usize,
    tables: Striped<HashTable<Group>>,
}

/// The packed list element of a key expiring at `expires_ms`.
fn pack(creator: u64, expires_ms: u64) -> u64 {
    let secs = expires_ms.div_ceil(1000).min(u64::from(u32::MAX));
    (secs << 16) | u64::from(net::host(creator))
}

fn host_of(k: u64) -> u16 {
    k as u16
}

fn retry_after(k: u64, now_ms: u64) -> u64 {
    ((k >> 16) * 1000).saturating_sub(now_ms).div_ceil(1000).max(1)
}

/// Moves a counted key (packed creator and expiry) from `old` to `new` in
/// a group's list. Returns whether `old` was there.
fn move_key(keys: &mut Expiries, old: u64, new: u64) -> bool {
    match keys {
        Expiries::One(k) if *k == old => *k = new,
        Expiries::One(_) => return false,
        many => {
            if !many.remove(old) {
                return false;
            }
            many.insert(new, true);
        }
    }
    true
}

impl Quotas {
    pub fn new(per_ip: usize, per_net: usize) -> Self {
        Quotas { per_ip, per_net, tables: Striped::new() }
    }

    pub fn per_ip(&self) -> usize {
        self.per_ip
    }

    pub fn per_net(&self) -> usize {
        self.per_net
    }

    fn enabled(&self) -> bool {
        self.per_ip > 0 || self.per_net > 0
    }

    /// The group a creator's keys are counted in: its network, unless only
    /// the per-client quota is on (then a group is one client, so a scan
    /// never walks another client's keys).
    fn group_of(&self, creator: u64) -> u64 {
        if self.per_net > 0 {
            net::network(creator)
        } else {
            creator
        }
    }

    fn rehash(&self) -> impl Fn(&Group) -> u64 + '_ {
        |g| self.tables.hash(g.id)
    }

    /// The stripe holding `creator`'s group, locked, with the group's id
    /// and hash (`None`: nothing is counted, because quotas are off or the
    /// key was stored before creators were kept, creator 0).
    fn stripe(&self, creator: u64) -> Option<(u64, u64, MutexGuard<'_, HashTable<Group>>)> {
        if !self.enabled() || creator == 0 {
            return None;
        }
        let id = self.group_of(creator);
        let hash = self.tables.hash(id);
        Some((id, hash, self.tables.lock(hash)))
    }

    /// Adds `packed` to group `id`, creating the group (in order unless
    /// `sorted` is false: recovery sorts each list once, at first use).
    fn insert(&self, t: &mut HashTable<Group>, hash: u64, id: u64, packed: u64, sorted: bool) {
        match t.find_mut(hash, |g| g.id == id) {
            Some(g) => g.keys.insert(packed, sorted),
            None => {
                t.insert_unique(hash, Group { id, keys: Expiries::One(packed) }, self.rehash());
            }
        }
    }

    /// Counts a new key unless that puts its client or network over quota.
    pub fn admit(&self, creator: u64, expires_ms: u64, now_ms: u64) -> Result<(), OverQuota> {
        let Some((id, hash, mut t)) = self.stripe(creator) else { return Ok(()) };
        let packed = pack(creator, expires_ms);
        // A first key always fits: every quota is at least 1.
        if let Some(g) = t.find_mut(hash, |g| g.id == id) {
            self.check(g, creator, now_ms, true)?;
        }
        self.insert(&mut t, hash, id, packed, true);
        Ok(())
    }

    /// A key moving from `old`'s creator to `new`'s within one group (two
    /// clients of one network): the network holds as many keys after as
    /// before, so only the new client's own quota can refuse it. Returns
    /// whether it was such a move (done, or refused changing nothing);
    /// `false` leaves a move between groups to the caller.
    fn transfer_within(&self, old: (u64, u64), new: (u64, u64), now_ms: u64) -> Result<bool, OverQuota> {
        if old.0 == 0 || self.group_of(old.0) != self.group_of(new.0) {
            return Ok(false);
        }
        let Some((id, hash, mut t)) = self.stripe(new.0) else { return Ok(false) };
        let Some(g) = t.find_mut(hash, |g| g.id == id) else { return Ok(false) };
        let (old, new_key) = (pack(old.0, old.1), pack(new.0, new.1));
        self.refuse_over(g, old, new_key, now_ms)?;
        self.check(g, new.0, now_ms, false)?;
        // Not counted where it should be: the caller's general move.
        Ok(move_key(&mut g.keys, old, new_key))
    }

    /// Refuses one more key from `creator` if itself, or its network when
    /// `net` is set, holds its quota of live keys.
    fn check(&self, g: &mut Group, creator: u64, now_ms: u64, net: bool) -> Result<(), OverQuota> {
        let first = first_live(&mut g.keys, now_ms);
        let live = g.keys.len() - first;
        if net && self.per_net > 0 && live >= self.per_net {
            return Err(OverQuota { scope: Scope::Net, retry_after_secs: retry_after(g.keys.get(first), now_ms) });
        }
        if self.per_ip > 0 && live >= self.per_ip {
            let host = net::host(creator);
            let mut mine = g.keys.iter(first).filter(|&k| host_of(k) == host);
            if let Some(oldest) = mine.next() {
                if 1 + mine.count() >= self.per_ip {
                    return Err(OverQuota { scope: Scope::Ip, retry_after_secs: retry_after(oldest, now_ms) });
                }
            }
        }
        Ok(())
    }

    /// Counts a key whatever the quotas say (recovery).
    pub fn add(&self, creator: u64, expires_ms: u64) {
        let Some((id, hash, mut t)) = self.stripe(creator) else { return };
        self.insert(&mut t, hash, id, pack(creator, expires_ms), false);
    }

    /// Uncounts a key (removed: expired, deleted, or an admission undone).
    pub fn remove(&self, creator: u64, expires_ms: u64) {
        let Some((id, hash, mut t)) = self.stripe(creator) else { return };
        let packed = pack(creator, expires_ms);
        let Ok(mut slot) = t.find_entry(hash, |g| g.id == id) else { return };
        if let Expiries::One(only) = slot.get().keys {
            if only == packed {
                slot.remove();
                // Give back what a flood of networks grew.
                if t.capacity() > 64 && t.len() < t.capacity() / 8 {
                    let keep = t.len() * 2;
                    t.shrink_to(keep, self.rehash());
                }
            }
            return;
        }
        slot.get_mut().keys.remove(packed);
    }

    /// Refuses to keep a key of group `g` alive longer (from packed `old`
    /// to packed `new`) while the group holds more live keys than its
    /// quota (its network's, or the client's own with only the per-client
    /// quota on), which only a restart with a lower quota leaves: whoever
    /// in the group writes it. Cheap when the group is within its quota:
    /// its list is then no longer than the quota, or its live part is
    /// found by one binary search.
    fn refuse_over(&self, g: &mut Group, old: u64, new: u64, now_ms: u64) -> Result<(), OverQuota> {
        if new >> 16 <= old >> 16 {
            return Ok(());
        }
        let (limit, scope) = if self.per_net > 0 { (self.per_net, Scope::Net) } else { (self.per_ip, Scope::Ip) };
        if g.keys.len() <= limit {
            return Ok(());
        }
        let first = first_live(&mut g.keys, now_ms);
        let live = g.keys.len() - first;
        if live > limit {
            // Back within its quota once that many of its oldest expire.
            let due = g.keys.get(first + (live - limit - 1));
            return Err(OverQuota { scope, retry_after_secs: retry_after(due, now_ms) });
        }
        Ok(())
    }

    /// Moves a key's expiry (an update): same count, new oldest.
    pub fn retime(&self, creator: u64, old_ms: u64, new_ms: u64) {
        let _ = self.move_expiry(creator, old_ms, new_ms, None);
    }

    /// Moves a key's expiry; with `over_at` (the time now), refuses,
    /// changing nothing, to move it later while the group holds more live
    /// keys than its quota (its network's, or the client's own with only
    /// the per-client quota on). Cheap when the group is within it: its
    /// list is then no longer than the quota, or its live part is found by
    /// one binary search.
    fn move_expiry(&self, creator: u64, old_ms: u64, new_ms: u64, over_at: Option<u64>) -> Result<(), OverQuota> {
        let (old, new) = (pack(creator, old_ms), pack(creator, new_ms));
        if old == new {
            return Ok(());
        }
        let Some((id, hash, mut t)) = self.stripe(creator) else { return Ok(()) };
        let Some(g) = t.find_mut(hash, |g| g.id == id) else { return Ok(()) };
        if let Some(now_ms) = over_at {
            self.refuse_over(g, old, new, now_ms)?;
        }
        move_key(&mut g.keys, old, new);
        Ok(())
    }

    /// Live keys counted for `creator`'s client and network at `now_ms`.
    pub fn counts(&self, creator: u64, now_ms: u64) -> (usize, usize) {
        let Some((id, hash, mut t)) = self.stripe(creator) else { return (0, 0) };
        let Some(g) = t.find_mut(hash, |g| g.id == id) else { return (0, 0) };
        let first = first_live(&mut g.keys, now_ms);
        let host = net::host(creator);
        (g.keys.iter(first).filter(|&k| host_of(k) == host).count(), g.keys.len() - first)
    }

    /// Networks and clients at their quota now. Walks every table, one
    /// lock at a time (for the metrics thread, not the request path).
    pub fn census(&self, now_ms: u64) -> Census {
        let mut c = Census::default();
        if !self.enabled() {
            return c;
        }
        let mut hosts: Vec<u16> = Vec::new();
        self.tables.for_each(|t| {
            c.groups += t.len();
            for g in t.iter_mut() {
                let first = first_live(&mut g.keys, now_ms);
                let live = g.keys.len() - first;
                if self.per_net > 0 && live >= self.per_net {
                    c.nets_at_limit += 1;
                    c.net_keys_at_limit += live;
                }
                if self.per_ip > 0 && live >= self.per_ip {
                    hosts.clear();
                    hosts.extend(g.keys.iter(first).map(host_of));
                    hosts.sort_unstable();
                    for run in hosts.chunk_by(|a, b| a == b).filter(|run| run.len() >= self.per_ip) {
                        c.ips_at_limit += 1;
                        c.ip_keys_at_limit += run.len();
                    }
                }
            }
        });
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::IpAddr;

    fn client(s: &str) -> u64 {
        net::client(s.parse::<IpAddr>().unwrap())
    }

    const NOW: u64 = 1_000_000;

    #[test]
    fn budget_is_exact_and_refusal_counts_nothing() {
        let b = KeyBudget::new(2);
        assert_eq!(b.admit(1, NOW + 10, NOW), Ok(()));
        assert_eq!(b.admit(2, NOW + 10, NOW), Ok(()));
        assert_eq!(b.admit(3, NOW + 10, NOW), Err(Refusal::Full));
        assert_eq!(b.live(), 2);
        b.release(1, NOW + 10);
        assert_eq!(b.admit(3, NOW + 10, NOW), Ok(()));
        // Restored keys count whatever the limit.
        b.force(4, NOW + 10);
        assert_eq!(b.live(), 3);
    }

    #[test]
    fn network_quota_spans_its_clients() {
        let q = Quotas::new(3, 5);
        let exp = NOW + 60_000;
        // Five /64s of one /48 take the network's five keys.
        for i in 0..5 {
            assert_eq!(q.admit(client(&format!("2001:db8:1:{i}::1")), exp, NOW), Ok(()));
        }
        let refused = q.admit(client("2001:db8:1:99::1"), exp, NOW);
        assert_eq!(refused, Err(OverQuota { scope: Scope::Net, retry_after_secs: 60 }));
        // Another /48 is unaffected.
        assert_eq!(q.admit(client("2001:db8:2::1"), exp, NOW), Ok(()));
        assert_eq!(q.counts(client("2001:db8:1:3::7"), NOW), (1, 5));
        // The same for IPv4 addresses in one /24.
        for i in 1..=5 {
            assert_eq!(q.admit(client(&format!("192.0.2.{i}")), exp, NOW), Ok(()));
        }
        assert!(matches!(q.admit(client("192.0.2.200"), exp, NOW), Err(OverQuota { scope: Scope::Net, .. })));
        assert_eq!(q.admit(client("192.0.3.1"), exp, NOW), Ok(()));
    }

    #[test]
    fn client_quota_within_a_network() {
        let q = Quotas::new(2, 10);
        let a = client("198.51.100.7");
        assert_eq!(q.admit(a, NOW + 5_000, NOW), Ok(()));
        assert_eq!(q.admit(a, NOW + 9_000, NOW), Ok(()));
        // Refused, told to come back when its oldest key expires.
        assert_eq!(q.admit(a, NOW + 9_000, NOW), Err(OverQuota { scope: Scope::Ip, retry_after_secs: 5 }));
        // Its neighbour is not.
        assert_eq!(q.admit(client("198.51.100.8"), NOW + 9_000, NOW), Ok(()));
        // Only the per-client quota on: still per client.
        let q = Quotas::new(1, 0);
        assert_eq!(q.admit(a, NOW + 5_000, NOW), Ok(()));
        assert!(q.admit(a, NOW + 5_000, NOW).is_err());
        assert_eq!(q.admit(client("198.51.100.8"), NOW + 5_000, NOW), Ok(()));
    }

    #[test]
    fn expiry_and_removal_give_slots_back() {
        let q = Quotas::new(0, 2);
        let a = client("203.0.113.1");
        assert_eq!(q.admit(a, NOW + 1_000, NOW), Ok(()));
        assert_eq!(q.admit(a, NOW + 3_500, NOW), Ok(()));
        assert!(q.admit(a, NOW + 9_000, NOW).is_err());
        // The first key expires at NOW+1s: from then on it does not count,
        // swept or not.
        assert_eq!(q.admit(a, NOW + 9_000, NOW + 1_000), Ok(()));
        assert_eq!(q.counts(a, NOW + 1_000), (2, 2));
        // A delete frees its slot at once.
        q.remove(a, NOW + 3_500);
        assert_eq!(q.counts(a, NOW + 1_000), (1, 1));
        // Removing the expired key (the sweep) and the last one forgets the network.
        q.remove(a, NOW + 1_000);
        q.remove(a, NOW + 9_000);
        assert_eq!(q.census(NOW).groups, 0);
        // Removing what is not counted changes nothing.
        q.remove(a, NOW + 9_000);
        assert_eq!(q.counts(a, NOW), (0, 0));
    }

    #[test]
    fn retime_moves_the_oldest() {
        let q = Quotas::new(0, 2);
        let a = client("203.0.113.1");
        q.admit(a, NOW + 2_000, NOW).unwrap();
        q.admit(a, NOW + 8_000, NOW).unwrap();
        assert_eq!(q.admit(a, NOW, NOW).unwrap_err().retry_after_secs, 2);
        // The oldest key was refreshed: the next to expire is the other one.
        q.retime(a, NOW + 2_000, NOW + 20_000);
        assert_eq!(q.admit(a, NOW, NOW).unwrap_err().retry_after_secs, 8);
        assert_eq!(q.counts(a, NOW + 10_000), (1, 1));
    }

    #[test]
    fn a_network_shrinks_back_to_one_inline_key() {
        let q = Quotas::new(0, 10);
        let a = client("192.0.2.9");
        for s in [5, 3, 9] {
            q.admit(a, NOW + s * 1000, NOW).unwrap();
        }
        q.remove(a, NOW + 3000);
        q.remove(a, NOW + 9000);
        assert_eq!(q.counts(a, NOW), (1, 1));
        // Its one key moves, then goes, and the network with it.
        q.retime(a, NOW + 5000, NOW + 7000);
        assert_eq!(q.admit(a, NOW, NOW + 6000), Ok(()), "the moved key is live at +6s");
        assert_eq!(q.counts(a, NOW + 6000), (1, 1));
        q.remove(a, NOW);
        q.remove(a, NOW + 7000);
        assert_eq!(q.census(NOW).groups, 0);
    }

    #[test]
    fn a_transfer_moves_the_count_or_changes_nothing() {
        let b = KeyBudget::with_quotas(100, 1, 10);
        let (a, x) = (client("192.0.2.1"), client("198.51.100.1"));
        b.admit(a, NOW + 5000, NOW).unwrap();
        // x stores over a's key: it counts against x now, and a has room.
        assert_eq!(b.transfer((a, NOW + 5000), (x, NOW + 9000), NOW), Ok(()));
        assert_eq!((b.quotas().counts(a, NOW), b.quotas().counts(x, NOW)), ((0, 0), (1, 1)));
        b.admit(a, NOW + 5000, NOW).unwrap();
        // x is at its quota: taking over a's new key is refused, nothing moves.
        assert!(b.transfer((a, NOW + 5000), (x, NOW + 9000), NOW).is_err());
        assert_eq!((b.quotas().counts(a, NOW), b.quotas().counts(x, NOW)), ((1, 1), (1, 1)));
    }

    #[test]
    fn a_transfer_within_a_full_network_needs_only_the_new_client_s_room() {
        let b = KeyBudget::with_quotas(100, 2, 3);
        let (a, c) = (client("192.0.2.1"), client("192.0.2.2"));
        b.admit(a, NOW + 5000, NOW).unwrap();
        b.admit(a, NOW + 6000, NOW).unwrap();
        b.admit(c, NOW + 7000, NOW).unwrap();
        assert!(matches!(b.admit(c, NOW + 7000, NOW), Err(Refusal::Quota(OverQuota { scope: Scope::Net, .. }))));
        // c stores over one of a's keys: the /24 keeps its three keys.
        assert_eq!(b.transfer((a, NOW + 5000), (c, NOW + 9000), NOW), Ok(()));
        assert_eq!((b.quotas().counts(a, NOW), b.quotas().counts(c, NOW)), ((1, 3), (2, 3)));
        // c is at its own quota now: taking a's other key is refused, nothing moves.
        let refused = b.transfer((a, NOW + 6000), (c, NOW + 9000), NOW);
        assert!(matches!(refused, Err(OverQuota { scope: Scope::Ip, .. })), "{refused:?}");
        assert_eq!((b.quotas().counts(a, NOW), b.quotas().counts(c, NOW)), ((1, 3), (2, 3)));
        // Released where it now counts.
        b.release(c, NOW + 9000);
        assert_eq!((b.quotas().counts(a, NOW), b.quotas().counts(c, NOW)), ((1, 2), (1, 2)));
        // A network holding a single key.
        let b = KeyBudget::with_quotas(100, 1, 1);
        b.admit(a, NOW + 5000, NOW).unwrap();
        assert!(b.admit(c, NOW + 5000, NOW).is_err());
        assert_eq!(b.transfer((a, NOW + 5000), (c, NOW + 9000), NOW), Ok(()));
        assert_eq!((b.quotas().counts(a, NOW), b.quotas().counts(c, NOW)), ((0, 1), (1, 1)));
    }

    #[test]
    fn a_network_over_a_lowered_quota_cannot_keep_its_keys_alive() {
        let b = KeyBudget::with_quotas(100, 0, 2);
        let (a, c) = (client("192.0.2.1"), client("192.0.2.2"));
        // Restored after a restart with the quota lowered to 2.
        for exp in [NOW + 5000, NOW + 6000, NOW + 7000] {
            b.force(a, exp);
        }
        let refused = b.refresh(a, NOW + 5000, NOW + 60_000, NOW);
        // Back within the quota once one key expired: the oldest, at 5 s.
        assert_eq!(refused, Err(OverQuota { scope: Scope::Net, retry_after_secs: 5 }));
        let four = KeyBudget::with_quotas(100, 0, 2);
        for exp in [NOW + 5000, NOW + 6000, NOW + 7000, NOW + 8000] {
            four.force(a, exp);
        }
        let refused = four.refresh(a, NOW + 8000, NOW + 60_000, NOW);
        assert_eq!(refused, Err(OverQuota { scope: Scope::Net, retry_after_secs: 6 }), "two must expire");
        // A neighbour storing over it cannot keep it alive either.
        let refused = b.transfer((a, NOW + 5000), (c, NOW + 60_000), NOW);
        assert_eq!(refused, Err(OverQuota { scope: Scope::Net, retry_after_secs: 5 }));
        // A change that does not keep it longer goes through.
        assert_eq!(b.refresh(a, NOW + 6000, NOW + 6000, NOW), Ok(()));
        assert_eq!(b.refresh(a, NOW + 7000, NOW + 3000, NOW), Ok(()));
        // Back within the quota, refreshes work again, for every client.
        b.release(a, NOW + 3000);
        assert_eq!(b.refresh(a, NOW + 5000, NOW + 60_000, NOW), Ok(()));
        assert!(b.admit(c, NOW + 5000, NOW).is_err(), "still full");
        assert_eq!(b.quotas().counts(a, NOW), (2, 2));
    }

    #[test]
    fn recovery_order_and_unknown_creators() {
        let q = Quotas::new(0, 1000);
        let a = client("192.0.2.1");
        // Recovery adds in file order; the list is sorted at first use.
        for s in [9u64, 3, 7, 1, 5] {
            q.add(a, NOW + s * 1000);
        }
        assert_eq!(q.counts(a, NOW + 2000), (4, 4));
        q.remove(a, NOW + 3000);
        q.retime(a, NOW + 9000, NOW + 2000);
        assert_eq!(q.counts(a, NOW + 4000), (2, 2));
        // Creator 0 (stored before creators were kept) is never counted.
        for _ in 0..10 {
            q.add(0, NOW + 5000);
            assert_eq!(q.admit(0, NOW + 5000, NOW), Ok(()));
        }
        assert_eq!(q.counts(0, NOW), (0, 0));
    }

    #[test]
    fn census_counts_groups_at_their_limits() {
        let q = Quotas::new(2, 3);
        let exp = NOW + 60_000;
        for c in ["192.0.2.1", "192.0.2.1", "192.0.2.2", "2001:db8::1", "2001:db8::1"] {
            q.admit(client(c), exp, NOW).unwrap();
        }
        let census = Census { groups: 2, nets_at_limit: 1, ips_at_limit: 2, net_keys_at_limit: 3, ip_keys_at_limit: 4 };
        assert_eq!(q.census(NOW), census);
        // Over a quota (as after a restart with a lower one): every key counts.
        for c in ["192.0.2.3", "192.0.2.2"] {
            q.add(client(c), exp);
        }
        let census = Census { groups: 2, nets_at_limit: 1, ips_at_limit: 3, net_keys_at_limit: 5, ip_keys_at_limit: 6 };
        assert_eq!(q.census(NOW), census);
        // Once everything expired, nothing is at a limit.
        assert_eq!(q.census(exp), Census { groups: 2, ..Census::default() });
    }

    #[test]
    fn off_counts_nothing() {
        let q = Quotas::new(0, 0);
        for _ in 0..10 {
            assert_eq!(q.admit(1, NOW + 1, NOW), Ok(()));
        }
        assert_eq!(q.census(NOW), Census::default());
    }

    #[test]
    fn exact_under_concurrency() {
        let b = std::sync::Arc::new(KeyBudget::with_quotas(1_000_000, 0, 100));
        let admitted: usize = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|t| {
                    let b = b.clone();
                    s.spawn(move || {
                        (0..1000)
                            .filter(|i| {
                                b.admit(client(&format!("192.0.2.{}", (t * 7 + i) % 250)), NOW + 1000, NOW).is_ok()
                            })
                            .count()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).sum()
        });
        assert_eq!(admitted, 100);
        assert_eq!(b.live(), 100);
    }
}
