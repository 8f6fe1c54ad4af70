//! The bookkeeping under the cross-core protocol, as plain structs with no
//! I/O and no executor: completion slots (where a reply from another core
//! lands and which task to wake) and per-destination credits (how many
//! calls one core may have outstanding towards another).
//!
//! `Router` keeps one of each inside a `RefCell` and does the waking; the
//! state machines live here so they can be driven by unit tests with a
//! no-op waker. An impossible transition (a reply for a slot nobody waits
//! on, a poll of a freed slot) is an `Err` the caller logs and answers, never
//! a silent `Pending` that would hang a connection.

use std::task::{Poll, Waker};

/// A transition the protocol never makes; seeing one is a bug worth a log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotError {
    /// The slot index was never allocated.
    Unknown(u32),
    /// A reply arrived for a slot that is free or already holds a reply.
    UnexpectedReply(u32),
    /// A poll found the slot free or abandoned: its owner lost track of it.
    NotWaiting(u32),
}

impl std::fmt::Display for SlotError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SlotError::Unknown(s) => write!(f, "completion slot {s} does not exist"),
            SlotError::UnexpectedReply(s) => write!(f, "a reply arrived for completion slot {s}, which awaits none"),
            SlotError::NotWaiting(s) => write!(f, "completion slot {s} was polled but awaits nothing"),
        }
    }
}

enum Slot<R> {
    Free,
    /// Awaiting a reply. `credit` names the destination whose budget the
    /// call holds (blocking reads hold none: they may park for minutes).
    Waiting {
        credit: Option<u32>,
        waker: Option<Waker>,
    },
    Ready(R),
    /// The caller went away; the reply will be dropped on arrival.
    Abandoned {
        credit: Option<u32>,
    },
}

/// What a completed slot asks of the caller.
#[derive(Debug, Default)]
pub struct Completed {
    /// Give this destination's credit back.
    pub credit: Option<u32>,
    /// Wake this task (the slot's caller).
    pub waker: Option<Waker>,
}

/// Completion slots of one core.
pub struct Slots<R> {
    slots: Vec<Slot<R>>,
    free: Vec<u32>,
}

impl<R> Default for Slots<R> {
    fn default() -> Self {
        Slots { slots: Vec::new(), free: Vec::new() }
    }
}

impl<R> Slots<R> {
    /// Takes a slot for a call (holding `credit` towards that destination).
    pub fn alloc(&mut self, credit: Option<u32>) -> u32 {
        let state = Slot::Waiting { credit, waker: None };
        match self.free.pop() {
            Some(i) => {
                self.slots[i as usize] = state;
                i
            }
            None => {
                self.slots.push(state);
                (self.slots.len() - 1) as u32
            }
        }
    }

    fn get(&mut self, i: u32) -> Result<&mut Slot<R>, SlotError> {
        self.slots.get_mut(i as usize).ok_or(SlotError::Unknown(i))
    }

    fn release(&mut self, i: u32) {
        if let Some(s) = self.slots.get_mut(i as usize) {
            *s = Slot::Free;
            self.free.push(i);
        }
    }

    /// Frees a slot whose call was answered without a message (the owner
    /// was this core).
    pub fn release_unused(&mut self, i: u32) {
        self.release(i);
    }

    /// A reply arrived for slot `i`.
    pub fn complete(&mut self, i: u32, reply: R) -> Result<Completed, SlotError> {
        let slot = self.get(i)?;
        match std::mem::replace(slot, Slot::Free) {
            Slot::Waiting { credit, waker } => {
                *slot = Slot::Ready(reply);
                Ok(Completed { credit, waker })
            }
            Slot::Abandoned { credit } => {
                self.release(i);
                Ok(Completed { credit, waker: None })
            }
            other => {
                *slot = other;
                Err(SlotError::UnexpectedReply(i))
            }
        }
    }

    /// The caller of slot `i` polls for its reply.
    pub fn poll(&mut self, i: u32, waker: &Waker) -> Result<Poll<R>, SlotError> {
        let slot = self.get(i)?;
        match std::mem::replace(slot, Slot::Free) {
            Slot::Ready(reply) => {
                self.release(i);
                Ok(Poll::Ready(reply))
            }
            Slot::Waiting { credit, waker: old } => {
                let waker = match old {
                    Some(w) if w.will_wake(waker) => w,
                    _ => waker.clone(),
                };
                *slot = Slot::Waiting { credit, waker: Some(waker) };
                Ok(Poll::Pending)
            }
            other => {
                *slot = other;
                Err(SlotError::NotWaiting(i))
            }
        }
    }

    /// The caller of slot `i` went away: a reply still to come frees it, a
    /// reply already there is dropped now.
    pub fn abandon(&mut self, i: u32) {
        let Ok(slot) = self.get(i) else { return };
        match std::mem::replace(slot, Slot::Free) {
            Slot::Waiting { credit, .. } => *slot = Slot::Abandoned { credit },
            Slot::Ready(_) => self.release(i),
            other => *slot = other,
        }
    }

    /// Slots not free.
    pub fn in_use(&self) -> usize {
        self.slots.len() - self.free.len()
    }
}

/// Per-destination in-flight budgets of one core.
pub struct Credits {
    budget: u32,
    in_flight: Vec<u32>,
    waiting: Vec<Vec<Waker>>,
}

impl Credits {
    pub fn new(destinations: usize, budget: u32) -> Self {
        Credits { budget, in_flight: vec![0; destinations], waiting: (0..destinations).map(|_| Vec::new()).collect() }
    }

    /// Takes one credit towards `dest`, or registers `waker` to be woken
    /// when one is given back.
    pub fn take(&mut self, dest: usize, waker: &Waker) -> bool {
        let Some(n) = self.in_flight.get_mut(dest) else { return false };
        if *n < self.budget {
            *n += 1;
            return true;
        }
        if let Some(w) = self.waiting.get_mut(dest) {
            w.push(waker.clone());
        }
        false
    }

    /// Gives a credit back; returns a task to wake, if one was waiting.
    pub fn give_back(&mut self, dest: u32) -> Option<Waker> {
        let d = dest as usize;
        if let Some(n) = self.in_flight.get_mut(d) {
            *n = n.saturating_sub(1);
        }
        self.waiting.get_mut(d).and_then(Vec::pop)
    }

    pub fn in_flight(&self, dest: usize) -> u32 {
        self.in_flight.get(dest).copied().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::testing::waker;
    use std::sync::atomic::Ordering;

    #[test]
    fn call_then_reply_then_poll() {
        let mut s: Slots<&str> = Slots::default();
        let (w, woken) = waker();
        let i = s.alloc(Some(1));
        assert_eq!(s.poll(i, &w), Ok(Poll::Pending));
        let done = s.complete(i, "answer").unwrap();
        assert_eq!(done.credit, Some(1));
        done.waker.unwrap().wake();
        assert_eq!(woken.0.load(Ordering::SeqCst), 1);
        assert_eq!(s.poll(i, &w), Ok(Poll::Ready("answer")));
        assert_eq!(s.in_use(), 0);
        // The slot is reused.
        assert_eq!(s.alloc(None), i);
    }

    #[test]
    fn abandoned_slots_are_freed_by_their_reply() {
        let mut s: Slots<u8> = Slots::default();
        let i = s.alloc(Some(0));
        s.abandon(i);
        assert_eq!(s.in_use(), 1, "still owed a reply");
        let done = s.complete(i, 7).unwrap();
        assert_eq!((done.credit, done.waker.is_none()), (Some(0), true));
        assert_eq!(s.in_use(), 0);
        // Abandoned after the reply came: freed at once.
        let j = s.alloc(None);
        s.complete(j, 1).unwrap();
        s.abandon(j);
        assert_eq!(s.in_use(), 0);
    }

    #[test]
    fn impossible_transitions_are_errors() {
        let mut s: Slots<u8> = Slots::default();
        let (w, _) = waker();
        assert_eq!(s.poll(3, &w), Err(SlotError::Unknown(3)));
        assert_eq!(s.complete(3, 1).unwrap_err(), SlotError::Unknown(3));
        let i = s.alloc(None);
        s.complete(i, 1).unwrap();
        assert_eq!(s.complete(i, 2).unwrap_err(), SlotError::UnexpectedReply(i), "a duplicate reply");
        assert_eq!(s.poll(i, &w), Ok(Poll::Ready(1)));
        assert_eq!(s.poll(i, &w), Err(SlotError::NotWaiting(i)), "polled after it was consumed");
        assert_eq!(s.complete(i, 3).unwrap_err(), SlotError::UnexpectedReply(i), "a reply for a free slot");
    }

    #[test]
    fn polling_keeps_the_latest_waker() {
        let mut s: Slots<u8> = Slots::default();
        let (w1, c1) = waker();
        let (w2, c2) = waker();
        let i = s.alloc(None);
        assert_eq!(s.poll(i, &w1), Ok(Poll::Pending));
        assert_eq!(s.poll(i, &w2), Ok(Poll::Pending));
        s.complete(i, 9).unwrap().waker.unwrap().wake();
        assert_eq!((c1.0.load(Ordering::SeqCst), c2.0.load(Ordering::SeqCst)), (0, 1));
    }

    #[test]
    fn credits_bound_in_flight_calls_and_wake_a_waiter() {
        let mut c = Credits::new(2, 2);
        let (w, woken) = waker();
        assert!(c.take(1, &w) && c.take(1, &w));
        assert!(!c.take(1, &w), "budget spent");
        assert!(c.take(0, &w), "other destinations are independent");
        assert_eq!(c.in_flight(1), 2);
        c.give_back(1).unwrap().wake();
        assert_eq!(woken.0.load(Ordering::SeqCst), 1);
        assert!(c.take(1, &w));
        assert!(c.give_back(1).is_none());
        assert!(!c.take(9, &w), "no such destination");
    }
}
