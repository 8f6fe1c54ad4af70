//! Which of one core's client connections are idle (waiting for their
//! client: for a next request, for the rest of one arriving, or to take
//! the answers written to it), and which of them to close when the server
//! is full.
//!
//! At `-maxConns`, a new connection used to be closed at once, whatever
//! the open ones were doing: a few dozen networks holding idle keep-alive
//! connections (each within `-maxConnsPerNet`), refreshing them now and
//! then with requests that cost no tokens, kept every other client out.
//! Now a core that is refused a connection for want of room closes the
//! connections idle longest on it (as nginx reuses keep-alive connections
//! when it runs out), and the new one takes the room. Closing a
//! keep-alive connection between requests is ordinary HTTP: a client
//! opens another. A connection waiting for the rest of a request counts as
//! idle too: otherwise a client sending each request in two parts, the
//! next one's first byte with the last one's end, would never be idle. So
//! does one whose answers are being written: a client that pipelines free
//! requests and never reads its answers would otherwise hold its
//! connection for the whole write timeout, and about ten networks could
//! fill `-maxConns` for nothing; told to close, it still gets a second to
//! take those answers (`conn::waiting`, `WRITE_GRACE`). A connection the server is working for
//! (a request being handled, a blocking read parked) is never chosen.
//!
//! Idle longest counts from the connection's last request that cost
//! tokens (or from its accept): requests that cost nothing (the docs page,
//! a preflight, an error, a 429 or a 503) do not move it, or a client could keep
//! its connections last in line for free.
//!
//! Each core keeps its own list: connections never move between cores,
//! and the accepting core closes its own, with no message to the others
//! (the kernel spreads accepted connections over the cores, so each holds
//! its share of the idle ones). Idle periods are ordered by a counter, not
//! a clock, so a request pays two stores and no clock reading for this.
//!
//! Plain state, no I/O: the connection task registers here and waits on
//! `evicted`; the accept loop calls `make_room`.

use std::collections::BinaryHeap;
use std::task::Waker;

/// How many connections one refusal closes at most: the rest make room
/// for the accepts that follow, so a full server scans its list once per
/// batch rather than once per accept (nginx closes up to 32).
pub const EVICT_BATCH: usize = 16;

/// How many connections one refusal closes under `-maxConns max_conns`:
/// one per 256 allowed, between 1 and `EVICT_BATCH`, so a small server
/// does not close most of its connections for one more.
pub fn batch(max_conns: usize) -> usize {
    (max_conns / 256).clamp(1, EVICT_BATCH)
}

#[derive(Default)]
struct Slot {
    /// Its place in the order: the counter's value when it joined or last
    /// went idle after a request that cost tokens. Lower goes first.
    rank: u64,
    /// Waiting for its client's bytes.
    idle: bool,
    /// Told to close.
    evicted: bool,
    /// The connection task, to wake when it is told to close.
    waker: Option<Waker>,
}

/// One core's connections, by the index each was given when it joined.
#[derive(Default)]
pub struct IdleConns {
    slots: Vec<Slot>,
    free: Vec<u32>,
    /// Counts idle periods begun; orders them.
    tick: u64,
    /// Connections told to close that are not gone yet: room on its way.
    closing: usize,
    /// Connections admitted over the limit on the strength of `closing`
    /// and not yet covered by one of them going.
    owed: usize,
    /// Connections idle and not told to close: when none are, a full
    /// server refuses without scanning.
    candidates: usize,
}

impl IdleConns {
    /// Registers a connection just accepted: idle until its first byte.
    pub fn join(&mut self) -> u32 {
        self.tick += 1;
        self.candidates += 1;
        let slot = Slot { rank: self.tick, idle: true, evicted: false, waker: None };
        match self.free.pop() {
            Some(id) => {
                self.slots[id as usize] = slot;
                id
            }
            None => {
                self.slots.push(slot);
                (self.slots.len() - 1) as u32
            }
        }
    }

    /// Forgets a connection that closed.
    pub fn leave(&mut self, id: u32) {
        if let Some(slot) = self.slots.get_mut(id as usize) {
            if slot.evicted {
                self.closing -= 1;
                self.owed = self.owed.saturating_sub(1);
            } else if slot.idle {
                self.candidates -= 1;
            }
            *slot = Slot::default();
            self.free.push(id);
        }
    }

    /// Makes room for one connection over the limit: in the room of a
    /// connection already told to close, if one is on its way that no
    /// earlier admission counted on, or else by telling the `batch`
    /// connections idle longest to close. Returns how many were told now,
    /// or `None` if there is no room to make. So a burst of accepts that
    /// arrives before the told connections are gone closes no more than
    /// it needs.
    pub fn make_room(&mut self, batch: usize) -> Option<usize> {
        if self.owed < self.closing {
            self.owed += 1;
            return Some(0);
        }
        let told = self.evict(batch);
        (told > 0).then(|| {
            self.owed += 1;
            told
        })
    }

    /// The connection waits for its client (bytes, or room for answers). `paid`: a request
    /// since its last wait cost tokens. One that did not (the docs page, a
    /// preflight, an error, a 429 or a 503) keeps the place it had:
    /// requests that cost nothing do not keep a connection from being
    /// closed.
    pub fn idle(&mut self, id: u32, paid: bool) {
        if let Some(slot) = self.slots.get_mut(id as usize) {
            if paid {
                self.tick += 1;
                slot.rank = self.tick;
            }
            if !slot.idle && !slot.evicted {
                self.candidates += 1;
            }
            slot.idle = true;
        }
    }

    /// The connection's wait for its client ended.
    pub fn busy(&mut self, id: u32) {
        if let Some(slot) = self.slots.get_mut(id as usize) {
            if slot.idle && !slot.evicted {
                self.candidates -= 1;
            }
            slot.idle = false;
        }
    }

    /// Whether the connection was told to close.
    pub fn told(&self, id: u32) -> bool {
        self.slots.get(id as usize).is_some_and(|s| s.evicted)
    }

    /// Whether the connection was told to close; if not, `waker` is woken
    /// when it is.
    pub fn evicted(&mut self, id: u32, waker: &Waker) -> bool {
        let Some(slot) = self.slots.get_mut(id as usize) else {
            return true;
        };
        if slot.evicted {
            return true;
        }
        if !slot.waker.as_ref().is_some_and(|w| w.will_wake(waker)) {
            slot.waker = Some(waker.clone());
        }
        false
    }

    /// Tells the `n` connections idle longest (fewer if fewer are idle) to
    /// close, and wakes them. Returns how many were told.
    fn evict(&mut self, n: usize) -> usize {
        if self.candidates == 0 {
            return 0;
        }
        // The n oldest, by a max-heap that drops the youngest over n.
        let mut oldest: BinaryHeap<(u64, u32)> = BinaryHeap::with_capacity(n + 1);
        for (id, slot) in self.slots.iter().enumerate() {
            let candidate = slot.idle && !slot.evicted;
            if candidate && (oldest.len() < n || oldest.peek().is_some_and(|&(young, _)| slot.rank < young)) {
                oldest.push((slot.rank, id as u32));
                if oldest.len() > n {
                    oldest.pop();
                }
            }
        }
        let told = oldest.len();
        self.closing += told;
        self.candidates -= told;
        for (_, id) in oldest {
            let slot = &mut self.slots[id as usize];
            slot.evicted = true;
            if let Some(w) = slot.waker.take() {
                w.wake();
            }
        }
        told
    }

    /// Connections registered and not yet gone.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// `candidates` recounted from the slots.
    #[cfg(test)]
    fn recount(&self) -> usize {
        let free: std::collections::HashSet<u32> = self.free.iter().copied().collect();
        (0..self.slots.len() as u32)
            .filter(|id| !free.contains(id))
            .filter(|&id| self.slots[id as usize].idle && !self.slots[id as usize].evicted)
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::testing::waker;
    use std::sync::atomic::Ordering;

    #[test]
    fn the_connections_idle_longest_go_first() {
        let mut idle = IdleConns::default();
        let ids: Vec<u32> = (0..5).map(|_| idle.join()).collect();
        // 0 and 2 are in requests; 4 went idle again after 1 and 3.
        idle.busy(ids[0]);
        idle.busy(ids[2]);
        idle.busy(ids[4]);
        idle.idle(ids[4], true);
        let (w, woken) = waker();
        for &id in &ids {
            assert!(!idle.evicted(id, &w));
        }
        assert_eq!(idle.evict(2), 2);
        assert_eq!(woken.0.load(Ordering::SeqCst), 2);
        let told: Vec<bool> = ids.iter().map(|&id| idle.evicted(id, &w)).collect();
        assert_eq!(told, [false, true, false, true, false]);
        assert!(idle.told(ids[1]) && !idle.told(ids[0]));
        assert_eq!(idle.candidates, idle.recount());
        // Connections in a request are never chosen, nor one told already.
        assert_eq!(idle.evict(10), 1);
        assert!(idle.evicted(ids[4], &w));
        assert_eq!((idle.candidates, idle.recount()), (0, 0));
        assert_eq!(idle.evict(10), 0);
        // A told connection that stays to finish a request is still told
        // when it next goes idle.
        idle.busy(ids[1]);
        idle.idle(ids[1], true);
        assert!(idle.evicted(ids[1], &w));
        assert_eq!(idle.candidates, idle.recount());
        for id in ids {
            idle.leave(id);
        }
        assert_eq!((idle.candidates, idle.closing, idle.owed), (0, 0, 0));
    }

    #[test]
    fn requests_that_cost_nothing_keep_a_connection_s_place() {
        let mut idle = IdleConns::default();
        let pinging = idle.join();
        let paying = idle.join();
        // The first keeps sending requests that cost nothing, the second
        // pays for one: the first is still the one idle longest.
        for _ in 0..3 {
            idle.busy(pinging);
            idle.idle(pinging, false);
        }
        idle.busy(paying);
        idle.idle(paying, true);
        assert_eq!(idle.make_room(1), Some(1));
        let (w, _) = waker();
        assert!(idle.evicted(pinging, &w));
        assert!(!idle.evicted(paying, &w));
    }

    #[test]
    fn slots_are_reused_and_start_fresh() {
        let mut idle = IdleConns::default();
        let a = idle.join();
        let b = idle.join();
        assert_eq!(idle.evict(1), 1);
        idle.leave(a);
        let c = idle.join();
        assert_eq!(c, a, "a freed slot is reused");
        let (w, _) = waker();
        assert!(!idle.evicted(c, &w), "a new connection is not told to close");
        // b is now the oldest.
        assert_eq!(idle.evict(1), 1);
        assert!(idle.evicted(b, &w));
        assert!(!idle.evicted(c, &w));
        idle.leave(b);
        idle.leave(c);
        assert_eq!(idle.len(), 0);
    }

    #[test]
    fn a_burst_of_accepts_uses_the_room_on_its_way() {
        let mut idle = IdleConns::default();
        let ids: Vec<u32> = (0..10).map(|_| idle.join()).collect();
        // One accept tells three to close and takes the room of one.
        assert_eq!(idle.make_room(3), Some(3));
        // Two more before any is gone take the other two rooms...
        assert_eq!(idle.make_room(3), Some(0));
        assert_eq!(idle.make_room(3), Some(0));
        // ...and a fourth tells more.
        assert_eq!(idle.make_room(3), Some(3));
        // Once the told ones are gone, what they freed was all spent.
        for &id in &ids[..6] {
            idle.leave(id);
        }
        assert_eq!((idle.closing, idle.owed), (0, 0));
        // Told ones going before any accept counted on them leave room
        // that the plain limit sees; nothing stays owed.
        assert_eq!(idle.make_room(2), Some(2));
        idle.leave(ids[6]);
        idle.leave(ids[7]);
        assert_eq!((idle.closing, idle.owed), (0, 0));
        // Nothing idle, nothing told: no room.
        for &id in &ids[8..] {
            idle.busy(id);
        }
        assert_eq!((idle.candidates, idle.recount()), (0, 0));
        assert_eq!(idle.make_room(2), None);
    }

    #[test]
    fn a_batch_follows_the_limit() {
        assert_eq!([1, 255, 256, 1000, 10_000, 1_000_000].map(batch), [1, 1, 1, 3, 16, 16]);
    }

    #[test]
    fn a_batch_takes_the_oldest_of_many() {
        let mut idle = IdleConns::default();
        let ids: Vec<u32> = (0..100).map(|_| idle.join()).collect();
        // Reverse the ages: the highest index went idle first.
        for &id in ids.iter().rev() {
            idle.busy(id);
            idle.idle(id, true);
        }
        assert_eq!(idle.evict(EVICT_BATCH), EVICT_BATCH);
        let (w, _) = waker();
        let told: Vec<u32> = ids.iter().copied().filter(|&id| idle.evicted(id, &w)).collect();
        assert_eq!(told, (100 - EVICT_BATCH as u32..100).collect::<Vec<_>>());
    }
}
