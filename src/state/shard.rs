//! One core's slice of the store: the API's key-value semantics as a plain
//! synchronous state machine.
//!
//! A `Shard` is changed under the lock the runtime keeps it behind
//! (`runtime::cells`), by its core or by a core writing one of its keys;
//! nothing in it is shared except the version clock (`Versions`), which
//! every shard of a process draws from. Layout: a
//! dense `Vec<Entry>` plus a `hashbrown::HashTable<u32>` of indices into it,
//! and beside the entries each key's 32-bit hash tag, so the table grows
//! with the store (see `TABLE_START`) without reading a key to rehash.
//! The dense vector gives the expiry sweep a cursor that survives inserts and
//! removals, so expired keys are reclaimed a bounded slice at a time instead
//! of a stop-the-world scan, and each entry keeps key and value in one
//! exact-size allocation. The table is hashed with a per-shard random SipHash
//! key, independent of the routing hash, held in the shard's `Probe` with
//! where the table is, so any core can start a lookup's first cache misses
//! before it takes the lock (`prefetch`). Everything here is deterministic
//! given `now_ms`: no clock, no I/O, no logging.

pub use crate::state::budget::KeyBudget;
use crate::state::budget::{OverQuota, Refusal};
pub use crate::state::entry::{Entry, KeyTooLong, MAX_KEY_LEN, MAX_VERSION};
use crate::state::record::Journal;
use crate::state::secret::{self, SecretHash};

use crate::memory::Mapped;
use crate::state::prefetch::Position;
use hashbrown::HashTable;
use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// The version clock every shard of a process draws from: one counter, so
/// versions are totally ordered across shards and logs. A checkpoint reads
/// it once every core has moved its log (`covered`): every change at or
/// below that version is in the snapshot's copy, and recovery replays only
/// records above it (see `persist::recovery`).
#[derive(Debug, Default)]
pub struct Versions(AtomicU64);

impl Versions {
    /// The next version (never above `MAX_VERSION`, where it stays).
    fn next(&self) -> u64 {
        let bump = |v: u64| Some((v + 1).min(MAX_VERSION));
        let prev = self.0.fetch_update(Ordering::SeqCst, Ordering::SeqCst, bump).unwrap_or(MAX_VERSION);
        (prev + 1).min(MAX_VERSION)
    }

    /// What a checkpoint beginning now covers: the current version, or 0
    /// (replay everything) once the clock is exhausted, when versions repeat
    /// and "at or below" no longer means "before".
    pub fn covered(&self) -> u64 {
        match self.current() {
            v if v < MAX_VERSION => v,
            _ => 0,
        }
    }

    /// The last version issued (or restored).
    pub fn current(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }

    /// Never issue `v` or below again.
    fn raise(&self, v: u64) {
        self.0.fetch_max(v.min(MAX_VERSION), Ordering::SeqCst);
    }
}

/// Entries a create that finds the store full examines for expired ones.
const FULL_SWEEP: usize = 4096;

/// What a write asks for (one per write route, see `request::route`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Condition {
    /// `set`: create or replace.
    Set,
    /// `los`: create if absent, else return the current value.
    Los,
    /// `cas`: replace if the current value equals this; absent is not found.
    Cas(Box<[u8]>),
    /// `casoc`: like `cas`, but an absent key is created.
    Casoc(Box<[u8]>),
    /// `del`: remove the key.
    Delete,
}

/// What a write does to an absent key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnAbsent {
    Create,
    NotFound,
}

/// What a write does to a present key (after the owner-secret and
/// `If-Match` checks, which every changing write passes first).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnPresent<'a> {
    Replace,
    /// Answer the current value, change nothing (a read: no secret needed).
    ReturnCurrent,
    /// Replace if the current value equals this, else 409 with it.
    ReplaceIfEquals(&'a [u8]),
    Remove,
}

/// A condition's whole meaning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Semantics<'a> {
    pub absent: OnAbsent,
    pub present: OnPresent<'a>,
    /// Whether the request body is the value to store.
    pub stores_body: bool,
}

impl Condition {
    /// The store semantics of each write. A new condition cannot compile
    /// without an arm here, so it cannot silently behave like `set`.
    pub fn semantics(&self) -> Semantics<'_> {
        let (absent, present, stores_body) = match self {
            Condition::Set => (OnAbsent::Create, OnPresent::Replace, true),
            Condition::Los => (OnAbsent::Create, OnPresent::ReturnCurrent, true),
            Condition::Cas(v) => (OnAbsent::NotFound, OnPresent::ReplaceIfEquals(v), true),
            Condition::Casoc(v) => (OnAbsent::Create, OnPresent::ReplaceIfEquals(v), true),
            Condition::Delete => (OnAbsent::NotFound, OnPresent::Remove, false),
        };
        Semantics { absent, present, stores_body }
    }

    /// Whether the request body is the value to store.
    pub fn stores_body(&self) -> bool {
        self.semantics().stores_body
    }
}

/// `If-Match` on a write: a compare-and-swap by version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IfMatch {
    /// `*`: the key must exist.
    Any,
    /// The key's current version must be one of these.
    Versions(Vec<u64>),
}

/// A write, fully decoded (effective key, hashed secret, absolute expiry):
/// the entry it would store, and its conditions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Write {
    pub entry: Entry,
    pub cond: Condition,
    pub if_match: Option<IfMatch>,
}

impl Write {
    pub fn new(
        key: &[u8],
        value: &[u8],
        secret: Option<SecretHash>,
        expires_ms: u64,
        cond: Condition,
    ) -> Result<Self, KeyTooLong> {
        Ok(Write { entry: Entry::new(key, value, secret.as_ref(), expires_ms)?, cond, if_match: None })
    }

    pub fn key(&self) -> &[u8] {
        self.entry.key()
    }
}

/// The result of a write. Versions are the key's after the write (or its
/// current one when nothing changed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteOutcome {
    /// The value was stored; `created` tells a new key from a replacement.
    Stored { created: bool, expires_ms: u64, version: u64 },
    /// `los` on a present key: the current value, nothing changed.
    Existing { value: Box<[u8]>, expires_ms: u64, version: u64 },
    /// cas/casoc mismatch: the current value, nothing changed.
    Conflict { value: Box<[u8]>, expires_ms: u64, version: u64 },
    /// The key was removed; the version the delete was given.
    Deleted { version: u64 },
    /// cas or del on an absent key.
    NotFound,
    /// The key has an owner secret and the write did not carry it.
    Forbidden,
    /// `If-Match` did not match; the current version, if the key exists.
    PreconditionFailed { version: Option<u64> },
    /// Creating the key would exceed `-maxNumKV`.
    Full,
    /// Creating the key would put its client or network over quota.
    OverQuota(OverQuota),
}

impl WriteOutcome {
    /// Whether the write changed the key (so its waiters must be looked at).
    pub fn changed(&self) -> bool {
        matches!(self, WriteOutcome::Stored { .. } | WriteOutcome::Deleted { .. })
    }
}

/// A read hit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    pub value: Box<[u8]>,
    pub expires_ms: u64,
    pub version: u64,
}

/// Keys a shard's table has room for at first (2048 buckets), whatever the
/// shard's capacity: a table sized for `-maxNumKV` up front spreads a small
/// store's slots over megabytes, and every lookup missed the cache (set
/// 1000 B over 10k keys took 0.94x the CPU with `-maxNumKV` 20k as with 3M,
/// 5 alternated rounds). Growing rehashes from `tags` (4 bytes a key) and
/// never reads an entry, and each outgrown table's memory goes back to the
/// kernel (`memory::Mapped`).
const TABLE_START: usize = 1024;

/// The table's 64-bit hash, rebuilt from a key's 32-bit tag: the low half
/// picks the bucket, the top 7 bits are hashbrown's control byte, so the two
/// come from different bits of the tag for tables up to 2^25 buckets (29M
/// keys on a core). Past that each doubling shares one more bit, and more
/// lookups compare a key that does not match: slower, never wrong, since
/// keys are compared in full. (Indices are `u32` for the same reason.)
fn spread(tag: u32) -> u64 {
    (u64::from(tag) << 32) | u64::from(tag)
}

/// A shard's hash key and where its table is: what another core needs to
/// start a lookup's cache misses before it takes the shard's lock
/// (`prefetch`). The shard publishes the position when its table moves.
#[derive(Debug, Default)]
#[repr(align(64))]
pub struct Probe {
    /// The shard's seeded SipHash key (independent of the routing hash).
    hasher: RandomState,
    position: Position<u32>,
}

impl Probe {
    /// The table hash of `key` (see `spread`).
    fn hash(&self, key: &[u8]) -> u64 {
        spread(self.hasher.hash_one(key) as u32)
    }

    /// Starts fetching what a lookup of `key` reads first.
    pub fn prefetch(&self, key: &[u8]) {
        self.position.prefetch(self.hash(key));
    }
}

/// One core's entries.
pub struct Shard {
    entries: Vec<Entry>,
    /// `tags[i]` is the hash tag of `entries[i]`'s key (see `spread`).
    tags: Vec<u32>,
    table: HashTable<u32, Mapped>,
    /// The hash key, and where the table is for other cores' prefetches.
    probe: Arc<Probe>,
    sweep_cursor: usize,
    /// Sum of key + value bytes of the entries held.
    bytes: usize,
    /// Entries removed because they expired (on read or by the sweep).
    expired_total: u64,
    /// A snapshot copy in progress, taken a slice at a time.
    snapshot: Option<SnapshotCopy>,
    /// The id the next copy gets.
    next_copy: u64,
    /// Where versions come from (shared by every shard of a process).
    versions: Arc<Versions>,
}

/// Names one snapshot copy of a shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CopyId(u64);

/// A snapshot copy was replaced by a newer one before it ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Superseded;

/// Progress of an incremental snapshot copy. Entries at and after `cursor`
/// are still to be copied; a removal that moves an uncopied entry in front
/// of the cursor copies it on the spot (into `moved`), so every entry that
/// lives through the whole copy is captured exactly once. Entries changed
/// after the copy began may be captured before or after the change: the log
/// records every change after the copy began, and replaying it repairs the
/// copy (a fuzzy checkpoint).
struct SnapshotCopy {
    id: CopyId,
    cursor: usize,
    now_ms: u64,
    moved: Vec<Entry>,
}

impl Shard {
    /// A shard with a version clock of its own (tests, tools); the server
    /// uses `sharing`. `capacity` reserves the dense vectors (address space:
    /// their pages are touched only as they fill, and growing them would
    /// copy every entry); the table starts at `TABLE_START` and grows.
    pub fn with_capacity(capacity: usize) -> Self {
        Self::sharing(capacity, Arc::default())
    }

    /// A shard drawing versions from `versions`.
    pub fn sharing(capacity: usize, versions: Arc<Versions>) -> Self {
        Shard {
            entries: Vec::with_capacity(capacity),
            tags: Vec::with_capacity(capacity),
            table: HashTable::with_capacity_in(capacity.min(TABLE_START), Mapped),
            probe: Arc::default(),
            sweep_cursor: 0,
            bytes: 0,
            expired_total: 0,
            snapshot: None,
            next_copy: 0,
            versions,
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    pub fn expired_total(&self) -> u64 {
        self.expired_total
    }

    /// The highest version issued or restored.
    pub fn last_version(&self) -> u64 {
        self.versions.current()
    }

    /// The table hash of `key` (see `spread`).
    fn hash(&self, key: &[u8]) -> u64 {
        self.probe.hash(key)
    }

    /// The shard's hash key and table position, for other cores to start a
    /// lookup's cache misses before they take the lock (`prefetch`).
    pub fn probe(&self) -> Arc<Probe> {
        self.probe.clone()
    }

    fn find(&self, hash: u64, key: &[u8]) -> Option<usize> {
        let entries = &self.entries;
        self.table.find(hash, |&i| entries[i as usize].key() == key).map(|&i| i as usize)
    }

    /// The next write version: above every version this shard has issued or
    /// restored, and above `set_version_base` (so versions grow across restarts).
    fn next_version(&mut self) -> u64 {
        self.versions.next()
    }

    /// Starts versions above `base` (the server uses the start time).
    pub fn set_version_base(&mut self, base: u64) {
        self.versions.raise(base.min(MAX_VERSION / 2));
    }

    /// Looks a key up without changing anything: an expired entry is
    /// reported absent and left for the owner to reclaim. This is what
    /// another core may call while it holds the shard's lock for a read, so
    /// a value longer than `max_value` is not copied (`None`: ask the owner)
    /// and the lock is never held for a long copy.
    pub fn peek(&self, key: &[u8], now_ms: u64, max_value: usize) -> Option<Option<Found>> {
        let Some(idx) = self.find(self.hash(key), key) else { return Some(None) };
        let e = &self.entries[idx];
        if e.is_expired(now_ms) {
            return Some(None);
        }
        if e.value().len() > max_value {
            return None;
        }
        Some(Some(Found { value: e.value().into(), expires_ms: e.expires_ms, version: e.version() }))
    }

    /// Looks a key up; an expired entry is removed and reported absent.
    pub fn get(&mut self, key: &[u8], now_ms: u64, budget: &KeyBudget) -> Option<Found> {
        let hash = self.hash(key);
        let idx = self.find(hash, key)?;
        let e = &self.entries[idx];
        if e.is_expired(now_ms) {
            self.remove_at(idx, budget);
            self.expired_total += 1;
            return None;
        }
        Some(Found { value: e.value().into(), expires_ms: e.expires_ms, version: e.version() })
    }

    /// Applies a write: the route's condition, owner secret, `If-Match`,
    /// capacity. A change is recorded in `journal`: the log of the core
    /// applying it, which need not be this shard's owner.
    pub fn write(&mut self, w: Write, now_ms: u64, budget: &KeyBudget, journal: &mut Journal) -> WriteOutcome {
        self.write_seen(w, now_ms, budget, journal).0
    }

    /// `write`, also returning the version the key had before it (expired
    /// or not; `None`: absent): the state the outcome was decided on.
    pub fn write_seen(
        &mut self,
        w: Write,
        now_ms: u64,
        budget: &KeyBudget,
        journal: &mut Journal,
    ) -> (WriteOutcome, Option<u64>) {
        let hash = self.hash(w.key());
        let mut found = self.find(hash, w.key());
        let seen = found.map(|i| self.entries[i].version());
        if let Some(idx) = found {
            if self.entries[idx].is_expired(now_ms) {
                self.remove_at(idx, budget);
                self.expired_total += 1;
                found = None;
            }
        }
        let outcome = match found {
            None => self.create(hash, w, now_ms, budget, journal),
            Some(idx) => self.update(idx, w, now_ms, budget, journal),
        };
        (outcome, seen)
    }

    fn create(&mut self, hash: u64, w: Write, now_ms: u64, budget: &KeyBudget, journal: &mut Journal) -> WriteOutcome {
        if w.if_match.is_some() {
            return WriteOutcome::PreconditionFailed { version: None };
        }
        match w.cond.semantics().absent {
            OnAbsent::NotFound => return WriteOutcome::NotFound,
            OnAbsent::Create => {}
        }
        let mut entry = w.entry;
        let (creator, expires_ms) = (entry.creator(), entry.expires_ms);
        match budget.admit(creator, expires_ms, now_ms) {
            Ok(()) => {}
            Err(Refusal::Quota(q)) => return WriteOutcome::OverQuota(q),
            // Full: expired keys not yet swept still hold their slots, so
            // reclaim a slice of this shard's before refusing.
            Err(Refusal::Full) => {
                if self.sweep(now_ms, FULL_SWEEP, budget) == 0 {
                    return WriteOutcome::Full;
                }
                match budget.admit(creator, expires_ms, now_ms) {
                    Ok(()) => {}
                    Err(Refusal::Full) => return WriteOutcome::Full,
                    Err(Refusal::Quota(q)) => return WriteOutcome::OverQuota(q),
                }
            }
        }
        let version = self.next_version();
        entry.set_version(version);
        journal.put(&entry, creator);
        self.insert_new(hash, entry);
        WriteOutcome::Stored { created: true, expires_ms, version }
    }

    fn update(&mut self, idx: usize, w: Write, now_ms: u64, budget: &KeyBudget, journal: &mut Journal) -> WriteOutcome {
        let current = &self.entries[idx];
        let version = current.version();
        let on_present = w.cond.semantics().present;
        if let OnPresent::ReturnCurrent = on_present {
            // A read: no secret needed, nothing changes.
            return WriteOutcome::Existing { value: current.value().into(), expires_ms: current.expires_ms, version };
        }
        let authorized = match (current.secret(), w.entry.secret()) {
            (None, _) => true,
            (Some(stored), Some(offered)) => secret::matches(stored, offered),
            (Some(_), None) => false,
        };
        if !authorized {
            return WriteOutcome::Forbidden;
        }
        if let Some(IfMatch::Versions(vs)) = &w.if_match {
            if !vs.contains(&version) {
                return WriteOutcome::PreconditionFailed { version: Some(version) };
            }
        }
        match on_present {
            OnPresent::ReturnCurrent | OnPresent::Replace => {}
            OnPresent::ReplaceIfEquals(expected) => {
                if current.value() != expected {
                    return WriteOutcome::Conflict {
                        value: current.value().into(),
                        expires_ms: current.expires_ms,
                        version,
                    };
                }
            }
            OnPresent::Remove => {
                // Deletes take a version too, so versions never go backwards
                // across a delete and a re-create.
                let version = self.next_version();
                journal.delete(self.entries[idx].key(), version);
                self.remove_at(idx, budget);
                return WriteOutcome::Deleted { version };
            }
        }
        // A key without a secret is claimed by the first write that brings one;
        // a key with one keeps it (the write proved it knows it, so it carries
        // the same hash).
        let mut entry = w.entry;
        let expires_ms = entry.expires_ms;
        let (old, writer) = (&self.entries[idx], entry.creator());
        if writer == old.creator() {
            if let Err(q) = budget.refresh(writer, old.expires_ms, expires_ms, now_ms) {
                return WriteOutcome::OverQuota(q);
            }
        } else if let Err(q) = budget.transfer((old.creator(), old.expires_ms), (writer, expires_ms), now_ms) {
            // The key now counts against whoever stored it last.
            return WriteOutcome::OverQuota(q);
        }
        let version = self.next_version();
        entry.set_version(version);
        journal.put(&entry, entry.creator());
        let current = &mut self.entries[idx];
        self.bytes = self.bytes - current.payload_len() + entry.payload_len();
        *current = entry;
        WriteOutcome::Stored { created: false, expires_ms, version }
    }

    /// Removes the entry at `idx` by swapping the last entry into its place.
    fn remove_at(&mut self, idx: usize, budget: &KeyBudget) {
        let hash = spread(self.tags[idx]);
        if let Ok(slot) = self.table.find_entry(hash, |&i| i as usize == idx) {
            slot.remove();
        }
        let last = self.entries.len() - 1;
        if let Some(copy) = &mut self.snapshot {
            if idx < copy.cursor && last >= copy.cursor && !self.entries[last].is_expired(copy.now_ms) {
                copy.moved.push(self.entries[last].clone());
            }
        }
        if idx != last {
            let moved_hash = spread(self.tags[last]);
            if let Some(slot) = self.table.find_mut(moved_hash, |&i| i as usize == last) {
                *slot = idx as u32;
            }
        }
        self.tags.swap_remove(idx);
        let removed = self.entries.swap_remove(idx);
        self.bytes -= removed.payload_len();
        budget.release(removed.creator(), removed.expires_ms);
    }

    /// Reclaims expired entries, examining at most `budget_entries` slots from
    /// where the previous sweep stopped. Returns how many were removed.
    pub fn sweep(&mut self, now_ms: u64, budget_entries: usize, budget: &KeyBudget) -> usize {
        let mut removed = 0;
        let mut examined = 0;
        while examined < budget_entries && !self.entries.is_empty() {
            if self.sweep_cursor >= self.entries.len() {
                self.sweep_cursor = 0;
            }
            examined += 1;
            if self.entries[self.sweep_cursor].is_expired(now_ms) {
                // The last entry moves into this slot: examine it next.
                self.remove_at(self.sweep_cursor, budget);
                removed += 1;
            } else {
                self.sweep_cursor += 1;
            }
        }
        self.expired_total += removed as u64;
        removed
    }

    /// Starts an incremental copy of the live entries (expiry judged at
    /// `now_ms`), replacing any copy in progress. The id names this copy:
    /// a task still holding an older one's id can neither take slices of
    /// this one nor abort it.
    pub fn snapshot_begin(&mut self, now_ms: u64) -> CopyId {
        let id = CopyId(self.next_copy);
        self.next_copy += 1;
        self.snapshot = Some(SnapshotCopy { id, cursor: 0, now_ms, moved: Vec::new() });
        id
    }

    /// The next slice of copy `id`: live entries (cloned) until `max` are
    /// taken or their key and value bytes pass `max_bytes`, or `Ok(None)`
    /// once the copy is complete (which ends it). `Err`: copy `id` is not
    /// the one in progress (a newer copy replaced it).
    pub fn snapshot_next(
        &mut self,
        id: CopyId,
        max: usize,
        max_bytes: usize,
    ) -> Result<Option<Vec<Entry>>, Superseded> {
        let copy = match self.snapshot.as_mut() {
            Some(copy) if copy.id == id => copy,
            _ => return Err(Superseded),
        };
        let now = copy.now_ms;
        let mut out: Vec<Entry> = std::mem::take(&mut copy.moved);
        let mut bytes: usize = out.iter().map(Entry::payload_len).sum();
        while copy.cursor < self.entries.len() && out.len() < max && bytes < max_bytes {
            let e = &self.entries[copy.cursor];
            copy.cursor += 1;
            if !e.is_expired(now) {
                bytes += e.payload_len();
                out.push(e.clone());
            }
        }
        if out.is_empty() && copy.cursor >= self.entries.len() {
            self.snapshot = None;
            return Ok(None);
        }
        Ok(Some(out))
    }

    /// Abandons copy `id` if it is still the one in progress.
    pub fn snapshot_abort(&mut self, id: CopyId) {
        if self.snapshot.as_ref().is_some_and(|c| c.id == id) {
            self.snapshot = None;
        }
    }

    fn insert_new(&mut self, hash: u64, entry: Entry) {
        self.bytes += entry.payload_len();
        let idx = self.entries.len() as u32;
        self.entries.push(entry);
        self.tags.push(hash as u32);
        let tags = &self.tags;
        self.probe.position.insert(&mut self.table, hash, idx, |&i| spread(tags[i as usize]));
    }

    /// Inserts or replaces an entry loaded from disk (no conditions, no
    /// secret check). The budget is forced: a restart with a lower
    /// `-maxNumKV` keeps every stored key and refuses creates until the
    /// store is back under the limit.
    pub fn restore(&mut self, mut entry: Entry, budget: &KeyBudget) {
        if entry.version() == 0 {
            entry.set_version(self.next_version());
        }
        self.versions.raise(entry.version());
        let hash = self.hash(entry.key());
        if let Some(idx) = self.find(hash, entry.key()) {
            let old = &self.entries[idx];
            budget.replace((old.creator(), old.expires_ms), (entry.creator(), entry.expires_ms));
            self.bytes = self.bytes - old.payload_len() + entry.payload_len();
            self.entries[idx] = entry;
            return;
        }
        budget.force(entry.creator(), entry.expires_ms);
        self.insert_new(hash, entry);
    }

    /// Every entry held (expired ones included until reclaimed).
    pub fn entries(&self) -> std::slice::Iter<'_, Entry> {
        self.entries.iter()
    }

    /// The version of `key`'s entry, if present (recovery compares it).
    pub fn version_of(&self, key: &[u8]) -> Option<u64> {
        let hash = self.hash(key);
        self.find(hash, key).map(|i| self.entries[i].version())
    }

    /// Removes `key` (a replayed delete). Returns whether it was present.
    pub fn remove_key(&mut self, key: &[u8], budget: &KeyBudget) -> bool {
        let hash = self.hash(key);
        match self.find(hash, key) {
            Some(idx) => {
                self.remove_at(idx, budget);
                true
            }
            None => false,
        }
    }

    /// Raises the version high-water mark (versions issued before a restart,
    /// deletes included, are never issued again).
    pub fn raise_version_floor(&mut self, v: u64) {
        self.versions.raise(v);
    }

    /// Removes every entry expired at `now_ms` (recovery, before serving).
    pub fn drop_expired(&mut self, now_ms: u64, budget: &KeyBudget) -> usize {
        let mut removed = 0;
        let mut i = 0;
        while i < self.entries.len() {
            if self.entries[i].is_expired(now_ms) {
                self.remove_at(i, budget);
                removed += 1;
            } else {
                i += 1;
            }
        }
        removed
    }

    /// Lowers every expiry to at most `max_ms` (a smaller `-expireDuration`
    /// applies to restored keys too), and recounts the keys it moved.
    pub fn cap_expiry(&mut self, max_ms: u64, budget: &KeyBudget) {
        for e in &mut self.entries {
            if e.expires_ms > max_ms {
                budget.retime(e.creator(), e.expires_ms, max_ms);
                e.expires_ms = max_ms;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: u64 = 1_000_000;

    /// Writes with a journal that records nothing (persistence off).
    trait Plain {
        fn write_plain(&mut self, w: Write, now: u64, b: &KeyBudget) -> WriteOutcome;
    }

    impl Plain for Shard {
        fn write_plain(&mut self, w: Write, now: u64, b: &KeyBudget) -> WriteOutcome {
            self.write(w, now, b, &mut Journal::default())
        }
    }

    /// Writes and forgets the version (tested on its own below).
    trait NoVersion {
        fn write_nv(&mut self, w: Write, now: u64, b: &KeyBudget) -> WriteOutcome;
    }

    impl NoVersion for Shard {
        fn write_nv(&mut self, w: Write, now: u64, b: &KeyBudget) -> WriteOutcome {
            match self.write_plain(w, now, b) {
                WriteOutcome::Stored { created, expires_ms, .. } => {
                    WriteOutcome::Stored { created, expires_ms, version: 0 }
                }
                WriteOutcome::Existing { value, expires_ms, .. } => {
                    WriteOutcome::Existing { value, expires_ms, version: 0 }
                }
                WriteOutcome::Conflict { value, expires_ms, .. } => {
                    WriteOutcome::Conflict { value, expires_ms, version: 0 }
                }
                other => other,
            }
        }
    }

    #[test]
    fn a_write_reports_the_version_it_was_decided_on() {
        let b = KeyBudget::new(10);
        let mut s = Shard::with_capacity(4);
        let mut j = Journal::default();
        let (first, seen) = s.write_seen(w("k", "1", None, Condition::Set), T, &b, &mut j);
        assert_eq!(seen, None);
        let WriteOutcome::Stored { version, .. } = first else { panic!("{first:?}") };
        let (_, seen) = s.write_seen(w("k", "2", None, Condition::Los), T, &b, &mut j);
        assert_eq!(seen, Some(version), "a write that changes nothing still saw the key");
        // Expired but not yet reclaimed: the write saw that version (and
        // found the key absent).
        let mut short = w("e", "1", None, Condition::Set);
        short.entry.expires_ms = T + 1;
        let (stored, _) = s.write_seen(short, T, &b, &mut j);
        let WriteOutcome::Stored { version: expired, .. } = stored else { panic!("{stored:?}") };
        let (again, seen) = s.write_seen(w("e", "2", None, Condition::Set), T + 1, &b, &mut j);
        assert!(matches!(again, WriteOutcome::Stored { created: true, .. }), "{again:?}");
        assert_eq!(seen, Some(expired));
    }

    #[test]
    fn an_exhausted_version_clock_stays_put_and_covers_nothing() {
        let v = Versions::default();
        assert_eq!((v.next(), v.next(), v.covered()), (1, 2, 2));
        v.raise(MAX_VERSION - 1);
        assert_eq!((v.next(), v.next(), v.current()), (MAX_VERSION, MAX_VERSION, MAX_VERSION));
        assert_eq!(v.covered(), 0, "repeating versions cannot say what came before");
    }

    #[test]
    fn versions_change_on_every_write_and_guard_if_match() {
        let b = KeyBudget::new(10);
        let mut s = Shard::with_capacity(4);
        s.set_version_base(100);
        let version = |o: WriteOutcome| match o {
            WriteOutcome::Stored { version, .. } => version,
            other => panic!("{other:?}"),
        };
        let v1 = version(s.write_plain(w("k", "a", None, Condition::Set), T, &b));
        let v2 = version(s.write_plain(w("k", "a", None, Condition::Set), T, &b));
        assert!(v1 > 100 && v2 > v1, "same value, new version");
        assert_eq!(s.get(b"k", T, &b).unwrap().version, v2);
        let existing = s.write_plain(w("k", "x", None, Condition::Los), T, &b);
        assert!(matches!(existing, WriteOutcome::Existing { version, .. } if version == v2));
        // If-Match: a compare-and-swap by version.
        let mut stale = w("k", "b", None, Condition::Set);
        stale.if_match = Some(IfMatch::Versions(vec![v1]));
        assert_eq!(s.write_plain(stale, T, &b), WriteOutcome::PreconditionFailed { version: Some(v2) });
        let mut fresh = w("k", "b", None, Condition::Set);
        fresh.if_match = Some(IfMatch::Versions(vec![v1, v2]));
        assert!(matches!(s.write_plain(fresh, T, &b), WriteOutcome::Stored { .. }));
        let mut absent = w("nope", "b", None, Condition::Set);
        absent.if_match = Some(IfMatch::Any);
        assert_eq!(s.write_plain(absent, T, &b), WriteOutcome::PreconditionFailed { version: None });
        // Restored entries keep their version and later ones go above it.
        let mut e = Entry::new(b"r", b"v", None, T + 10).unwrap();
        e.set_version(MAX_VERSION - 5);
        s.restore(e, &b);
        assert_eq!(s.get(b"r", T, &b).unwrap().version, MAX_VERSION - 5);
        assert!(version(s.write_plain(w("k", "c", None, Condition::Set), T, &b)) > MAX_VERSION - 5);
    }

    #[test]
    fn delete_obeys_secrets() {
        let b = KeyBudget::new(10);
        let mut s = Shard::with_capacity(4);
        assert_eq!(s.write_plain(w("k", "", None, Condition::Delete), T, &b), WriteOutcome::NotFound);
        s.write_plain(w("k", "v", Some(1), Condition::Set), T, &b);
        assert_eq!(s.write_plain(w("k", "", None, Condition::Delete), T, &b), WriteOutcome::Forbidden);
        assert_eq!(s.write_plain(w("k", "", Some(2), Condition::Delete), T, &b), WriteOutcome::Forbidden);
        assert!(matches!(s.write_plain(w("k", "", Some(1), Condition::Delete), T, &b), WriteOutcome::Deleted { .. }));
        assert_eq!((s.len(), b.live(), s.bytes()), (0, 0, 0));
        assert!(s.get(b"k", T, &b).is_none());
    }

    #[test]
    fn the_table_grows_from_its_start_and_keeps_every_key_through_removals() {
        let n = TABLE_START * 20;
        let b = KeyBudget::new(3 * n);
        let mut s = Shard::with_capacity(n);
        assert!(s.table.capacity() < n / 8, "the table starts small, whatever the capacity");
        for i in 0..n {
            s.write_plain(w(&format!("k{i}"), &i.to_string(), None, Condition::Set), T, &b);
        }
        assert!(s.table.capacity() >= n);
        // Removals swap the last entry into the hole: its tag must move too,
        // or a later growth rehashes it into the wrong bucket.
        for i in (0..n).step_by(3) {
            s.write_plain(w(&format!("k{i}"), "", None, Condition::Delete), T, &b);
        }
        assert_eq!(s.tags.len(), s.entries.len());
        for (i, e) in s.entries.iter().enumerate() {
            assert_eq!(spread(s.tags[i]), s.hash(e.key()), "entry {i}'s tag");
        }
        // Grow again, past the next doubling, then check every key.
        for i in n..3 * n {
            s.write_plain(w(&format!("k{i}"), &i.to_string(), None, Condition::Set), T, &b);
        }
        for i in 0..3 * n {
            let want = (i >= n || i % 3 != 0).then(|| i.to_string().into_bytes());
            assert_eq!(get(&mut s, &format!("k{i}"), &b), want, "k{i}");
        }
    }

    #[test]
    fn the_published_probe_follows_the_table_through_every_doubling() {
        let n = TABLE_START * 8;
        let b = KeyBudget::new(n);
        let mut s = Shard::with_capacity(n);
        let probe = s.probe();
        let mut sizes = vec![];
        for i in 0..n {
            s.write_plain(w(&format!("k{i}"), "v", None, Condition::Set), T, &b);
            if sizes.last() != Some(&s.table.num_buckets()) {
                sizes.push(s.table.num_buckets());
                probe.position.assert_predicts(&s.table);
            }
        }
        assert!(sizes.len() >= 4, "the table doubled: {sizes:?}");
    }

    fn w(key: &str, value: &str, secret: Option<u8>, cond: Condition) -> Write {
        Write::new(key.as_bytes(), value.as_bytes(), secret.map(|b| [b; 32]), T + 1000, cond).unwrap()
    }

    fn get(s: &mut Shard, key: &str, b: &KeyBudget) -> Option<Vec<u8>> {
        s.get(key.as_bytes(), T, b).map(|f| f.value.to_vec())
    }

    fn cas(v: &str) -> Condition {
        Condition::Cas(v.as_bytes().into())
    }

    fn casoc(v: &str) -> Condition {
        Condition::Casoc(v.as_bytes().into())
    }

    fn stored(created: bool) -> WriteOutcome {
        WriteOutcome::Stored { created, expires_ms: T + 1000, version: 0 }
    }

    #[test]
    fn set_get_replace() {
        let b = KeyBudget::new(10);
        let mut s = Shard::with_capacity(4);
        assert_eq!(get(&mut s, "a", &b), None);
        assert_eq!(s.write_nv(w("a", "1", None, Condition::Set), T, &b), stored(true));
        assert_eq!(s.write_nv(w("a", "22", None, Condition::Set), T, &b), stored(false));
        assert_eq!(get(&mut s, "a", &b).as_deref(), Some(&b"22"[..]));
        assert_eq!(s.bytes(), 3);
        assert_eq!(b.live(), 1);
    }

    #[test]
    fn los_creates_once_then_returns_current() {
        let b = KeyBudget::new(10);
        let mut s = Shard::with_capacity(4);
        assert_eq!(s.write_nv(w("k", "first", None, Condition::Los), T, &b), stored(true));
        assert_eq!(
            s.write_nv(w("k", "second", Some(1), Condition::Los), T, &b),
            WriteOutcome::Existing { value: (*b"first").into(), expires_ms: T + 1000, version: 0 }
        );
        assert_eq!(get(&mut s, "k", &b).as_deref(), Some(&b"first"[..]));
    }

    #[test]
    fn cas_semantics() {
        let b = KeyBudget::new(10);
        let mut s = Shard::with_capacity(4);
        assert_eq!(s.write_nv(w("k", "x", None, cas("")), T, &b), WriteOutcome::NotFound);
        s.write_nv(w("k", "1", None, Condition::Set), T, &b);
        assert_eq!(
            s.write_nv(w("k", "3", None, cas("2")), T, &b),
            WriteOutcome::Conflict { value: (*b"1").into(), expires_ms: T + 1000, version: 0 }
        );
        assert_eq!(s.write_nv(w("k", "2", None, cas("1")), T, &b), stored(false));
        assert_eq!(get(&mut s, "k", &b).as_deref(), Some(&b"2"[..]));
    }

    #[test]
    fn casoc_creates_or_compares() {
        let b = KeyBudget::new(10);
        let mut s = Shard::with_capacity(4);
        assert_eq!(s.write_nv(w("k", "1", None, casoc("anything")), T, &b), stored(true));
        assert!(matches!(s.write_nv(w("k", "2", None, casoc("0")), T, &b), WriteOutcome::Conflict { .. }));
        assert_eq!(s.write_nv(w("k", "2", None, casoc("1")), T, &b), stored(false));
    }

    #[test]
    fn secrets_claim_and_protect() {
        let b = KeyBudget::new(10);
        let mut s = Shard::with_capacity(4);
        s.write_nv(w("k", "v0", None, Condition::Set), T, &b);
        // Claimed by the first write that brings a secret.
        assert_eq!(s.write_nv(w("k", "v1", Some(7), Condition::Set), T, &b), stored(false));
        assert_eq!(s.write_nv(w("k", "v2", None, Condition::Set), T, &b), WriteOutcome::Forbidden);
        assert_eq!(s.write_nv(w("k", "v2", Some(8), Condition::Set), T, &b), WriteOutcome::Forbidden);
        assert_eq!(s.write_nv(w("k", "v2", Some(8), cas("v1")), T, &b), WriteOutcome::Forbidden);
        assert_eq!(s.write_nv(w("k", "v2", None, casoc("v1")), T, &b), WriteOutcome::Forbidden);
        assert_eq!(get(&mut s, "k", &b).as_deref(), Some(&b"v1"[..]));
        // The owner keeps writing, and the secret stays.
        assert_eq!(s.write_nv(w("k", "v3", Some(7), cas("v1")), T, &b), stored(false));
        assert_eq!(s.write_nv(w("k", "v4", None, Condition::Set), T, &b), WriteOutcome::Forbidden);
        // los on a present key is a read: no secret needed.
        assert!(matches!(s.write_nv(w("k", "x", None, Condition::Los), T, &b), WriteOutcome::Existing { .. }));
    }

    #[test]
    fn failed_cas_does_not_claim() {
        let b = KeyBudget::new(10);
        let mut s = Shard::with_capacity(4);
        s.write_nv(w("k", "v0", None, Condition::Set), T, &b);
        assert!(matches!(s.write_nv(w("k", "v1", Some(7), cas("zz")), T, &b), WriteOutcome::Conflict { .. }));
        assert_eq!(s.write_nv(w("k", "v1", None, Condition::Set), T, &b), stored(false));
    }

    #[test]
    fn expiry_on_read_and_write() {
        let b = KeyBudget::new(10);
        let mut s = Shard::with_capacity(4);
        s.write_nv(w("k", "v", Some(1), Condition::Set), T, &b);
        assert!(s.get(b"k", T + 999, &b).is_some());
        assert!(s.get(b"k", T + 1000, &b).is_none());
        assert_eq!(s.len(), 0);
        assert_eq!(b.live(), 0);
        // An expired key's secret no longer protects it.
        s.write_nv(w("k", "v", Some(1), Condition::Set), T, &b);
        let late = Write::new(b"k", b"new", None, T + 5000, Condition::Set).unwrap();
        assert_eq!(
            s.write_nv(late, T + 2000, &b),
            WriteOutcome::Stored { created: true, expires_ms: T + 5000, version: 0 }
        );
        assert_eq!(s.expired_total(), 2);
    }

    #[test]
    fn capacity_is_exact_and_updates_still_work() {
        let b = KeyBudget::new(2);
        let mut s1 = Shard::with_capacity(4);
        let mut s2 = Shard::with_capacity(4);
        assert_eq!(s1.write_nv(w("a", "1", None, Condition::Set), T, &b), stored(true));
        assert_eq!(s2.write_nv(w("b", "1", None, Condition::Set), T, &b), stored(true));
        assert_eq!(s1.write_nv(w("c", "1", None, Condition::Set), T, &b), WriteOutcome::Full);
        assert_eq!(s2.write_nv(w("d", "1", None, Condition::Los), T, &b), WriteOutcome::Full);
        assert_eq!(s1.write_nv(w("a", "2", None, Condition::Set), T, &b), stored(false));
        assert_eq!(s2.write_nv(w("b", "2", None, casoc("1")), T, &b), stored(false));
    }

    #[test]
    fn sweep_is_incremental_and_complete() {
        let b = KeyBudget::new(1000);
        let mut s = Shard::with_capacity(8);
        for i in 0..100 {
            let exp = if i % 3 == 0 { T + 10 } else { T + 10_000 };
            let wr = Write::new(format!("k{i}").as_bytes(), b"v", None, exp, Condition::Set).unwrap();
            s.write_nv(wr, T, &b);
        }
        let now = T + 20;
        let mut removed = 0;
        for _ in 0..10 {
            let r = s.sweep(now, 10, &b);
            assert!(r <= 10);
            removed += r;
        }
        removed += s.sweep(now, 1000, &b);
        assert_eq!(removed, 34);
        assert_eq!(s.len(), 66);
        assert_eq!(b.live(), 66);
        // Every survivor is still reachable through the table.
        for i in 0..100 {
            let hit = s.get(format!("k{i}").as_bytes(), now, &b).is_some();
            assert_eq!(hit, i % 3 != 0, "k{i}");
        }
    }

    #[test]
    fn incremental_snapshot_survives_concurrent_removals_and_inserts() {
        let b = KeyBudget::new(10_000);
        let mut s = Shard::with_capacity(8);
        // Keys "keep{i}" live through the copy; "die{i}" expire during it.
        for i in 0..300 {
            s.write_nv(
                Write::new(format!("keep{i}").as_bytes(), b"v", None, T + 10_000, Condition::Set).unwrap(),
                T,
                &b,
            );
            s.write_nv(Write::new(format!("die{i}").as_bytes(), b"v", None, T + 50, Condition::Set).unwrap(), T, &b);
        }
        let id = s.snapshot_begin(T);
        let mut steps = 0;
        let mut copy = Vec::new();
        while let Some(slice) = s.snapshot_next(id, 37, usize::MAX).unwrap() {
            assert!(slice.len() <= 37 + 23, "a slice is bounded");
            copy.extend(slice);
            steps += 1;
            // Between steps the core serves requests: expire a few, add a few.
            s.sweep(T + 100, 23, &b);
            s.write_nv(
                Write::new(format!("new{steps}").as_bytes(), b"v", None, T + 10_000, Condition::Set).unwrap(),
                T,
                &b,
            );
        }
        let keys: std::collections::HashSet<Vec<u8>> = copy.iter().map(|e| e.key().to_vec()).collect();
        assert_eq!(keys.len(), copy.len(), "no entry copied twice");
        for i in 0..300 {
            assert!(keys.contains(format!("keep{i}").as_bytes()), "keep{i} missing");
        }
        assert!(steps > 5);
        assert_eq!(s.snapshot_next(id, 10, usize::MAX), Err(Superseded), "no copy in progress");
    }

    #[test]
    fn an_older_copy_cannot_take_or_abort_a_newer_one() {
        let b = KeyBudget::new(100);
        let mut s = Shard::with_capacity(8);
        for i in 0..10 {
            s.write_nv(Write::new(format!("k{i}").as_bytes(), b"v", None, T + 10_000, Condition::Set).unwrap(), T, &b);
        }
        let old = s.snapshot_begin(T);
        assert_eq!(s.snapshot_next(old, 3, usize::MAX).unwrap().map(|v| v.len()), Some(3));
        // A failed checkpoint's task is still around when the next one starts.
        let new = s.snapshot_begin(T);
        assert_eq!(s.snapshot_next(old, 3, usize::MAX), Err(Superseded));
        s.snapshot_abort(old);
        let mut copied = 0;
        while let Some(slice) = s.snapshot_next(new, 3, usize::MAX).unwrap() {
            copied += slice.len();
        }
        assert_eq!(copied, 10, "the newer copy is whole");
    }

    #[test]
    fn restore_keeps_every_key_even_over_the_limit() {
        let b = KeyBudget::new(1);
        let mut s = Shard::with_capacity(2);
        s.restore(Entry::new(b"k", b"v", None, T + 5).unwrap(), &b);
        s.restore(Entry::new(b"k", b"w", None, T + 5).unwrap(), &b);
        s.restore(Entry::new(b"z", b"v", None, T + 5).unwrap(), &b);
        assert_eq!(get(&mut s, "k", &b).as_deref(), Some(&b"w"[..]));
        assert_eq!(get(&mut s, "z", &b).as_deref(), Some(&b"v"[..]));
        assert_eq!(b.live(), 2, "over -maxNumKV after a restart with a lower limit");
        // Creates are refused until the store is back under the limit; updates work.
        assert_eq!(s.write_nv(w("new", "1", None, Condition::Set), T, &b), WriteOutcome::Full);
        assert_eq!(s.write_nv(w("k", "x", None, Condition::Set), T, &b), stored(false));
        assert!(s.remove_key(b"z", &b) && s.remove_key(b"k", &b) && !s.remove_key(b"k", &b));
        assert_eq!(s.write_nv(w("new", "1", None, Condition::Set), T, &b), stored(true));
    }

    #[test]
    fn every_change_is_journaled_with_its_version_and_creator() {
        use crate::state::record::{read_all, Record};
        let b = KeyBudget::new(10);
        let mut s = Shard::with_capacity(4);
        let mut j = Journal::enabled();
        let mut first = w("k", "1", None, Condition::Set);
        first.entry.set_creator(42);
        s.write(first, T, &b, &mut j);
        // Another client stores over it: the record names that client.
        let mut second = w("k", "2", Some(1), Condition::Set);
        second.entry.set_creator(43);
        s.write(second, T, &b, &mut j);
        // Nothing changes: nothing is logged.
        s.write(w("k", "x", None, Condition::Los), T, &b, &mut j);
        s.write(w("k", "x", None, cas("nope")), T, &b, &mut j);
        s.write(w("k", "x", None, Condition::Set), T, &b, &mut j);
        s.get(b"k", T, &b);
        s.write(w("k", "", Some(1), Condition::Delete), T, &b, &mut j);
        let bytes = j.take(Vec::new());
        let mut recs = Vec::new();
        read_all(&bytes, 0, |r| recs.push(r)).unwrap();
        assert_eq!(recs.len(), 3);
        let versions: Vec<u64> = recs.iter().map(Record::version).collect();
        assert!(versions.windows(2).all(|v| v[0] < v[1]), "{versions:?}");
        assert!(
            matches!(&recs[1], Record::Put { entry, creator: 43 } if entry.value() == b"2" && entry.secret().is_some())
        );
        assert!(matches!(&recs[2], Record::Delete { key, .. } if &key[..] == b"k"));
        assert_eq!(s.last_version(), versions[2]);
    }

    #[test]
    fn a_capped_expiry_is_recounted() {
        let b = KeyBudget::with_quotas(10, 0, 1);
        let mut s = Shard::with_capacity(4);
        let mut e = w("k", "1", None, Condition::Set);
        e.entry.set_creator(7);
        e.entry.expires_ms = T + 100_000;
        s.write_plain(e, T, &b);
        s.cap_expiry(T + 1000, &b);
        // Once the capped key has expired and gone, its network has room.
        assert_eq!(s.drop_expired(T + 1000, &b), 1);
        let mut again = w("k2", "1", None, Condition::Set);
        again.entry.set_creator(7);
        assert_eq!(s.write_nv(again, T + 1000, &b), stored(true));
    }

    #[test]
    fn recovery_helpers() {
        let b = KeyBudget::new(10);
        let mut s = Shard::with_capacity(4);
        s.write_nv(w("a", "1", None, Condition::Set), T, &b);
        s.write_nv(Write::new(b"old", b"1", None, T - 1, Condition::Set).unwrap(), T - 10, &b);
        assert!(s.version_of(b"a").is_some() && s.version_of(b"zz").is_none());
        assert_eq!(s.drop_expired(T, &b), 1);
        s.cap_expiry(T + 5, &b);
        assert_eq!(s.get(b"a", T, &b).unwrap().expires_ms, T + 5);
        s.raise_version_floor(1 << 40);
        let v = match s.write_plain(w("a", "2", None, Condition::Set), T, &b) {
            WriteOutcome::Stored { version, .. } => version,
            other => panic!("{other:?}"),
        };
        assert!(v > 1 << 40);
    }
}
