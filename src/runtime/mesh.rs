//! The wires between cores: which core owns a key (`Routing`), the
//! channels every core's inbox listens on (`Mesh`), and what travels on
//! them (`Msg`, and `Control` from the lifecycle thread).
//!
//! Shared by all cores and built once at startup. Sending never blocks:
//! the channels are unbounded and a core's inbox is woken through an
//! `AtomicWaker` (monoio writes its eventfd only when the core is parked).
//! This module moves messages; what they mean is `router`'s business.

use crate::state::command::{Op, Reply};
use atomic_waker::AtomicWaker;
use crossbeam_channel::{Receiver, Sender};
use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

/// A message between cores.
#[derive(Debug)]
pub enum Msg {
    Call {
        from: u32,
        slot: u32,
        op: Op,
        /// The client has more requests buffered behind this one: its
        /// change is written to the log with its batch, not later in the pass.
        pipelined: bool,
    },
    Done {
        slot: u32,
        reply: Reply,
    },
    /// An operation whose reply nobody awaits (cancelling a waiter).
    Notify {
        op: Op,
    },
    /// From the lifecycle thread (snapshots, shutdown).
    Control(Control),
}

/// Requests from the lifecycle thread to a core, answered on the enclosed
/// channel (the lifecycle thread may block; cores never do: they only
/// `try_send`).
#[derive(Debug)]
pub enum Control {
    /// Start a checkpoint: move the log to a new segment, then, once the
    /// gate opens, copy the shard slice by slice into the channel.
    Checkpoint(std::sync::mpsc::SyncSender<CheckpointMsg>, Arc<CopyGate>),
    /// Stop accepting, answer parked reads 503, refuse new requests, wait
    /// (bounded, or until `CutShort`) for in-flight ones, then report.
    Drain(std::sync::mpsc::SyncSender<DrainReport>),
    /// Stop waiting for in-flight requests (a second signal).
    CutShort,
    /// Write and sync everything the log holds (shutdown).
    Flush(std::sync::mpsc::SyncSender<Result<(), String>>),
}

/// Holds every core's checkpoint copy until all cores have moved their
/// logs to new segments. Any core may apply a write to any shard, journaled
/// in its own log; the segments before the checkpoint's are deleted once
/// the snapshot is published, so every change they hold must be in the
/// copy. A change in an old segment was applied before its core moved its
/// log, so before the gate opened, so before any copy began: the copy has
/// it (or a later version of the key). Before opening, the snapshot thread
/// reads the version clock: every change up to that version is in the
/// copies, and recovery skips such records wherever they were logged (a
/// log may rewrite old records into a new segment after a failed sync), so
/// no old store outlives a delete the copy shows.
#[derive(Debug, Default)]
pub struct CopyGate(AtomicU8);

/// Where a checkpoint's copies stand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GateState {
    /// Some core has not moved its log yet: wait.
    Closed,
    /// Every core moved its log: copy.
    Open,
    /// The checkpoint was given up: stop.
    Abandoned,
}

impl CopyGate {
    pub fn state(&self) -> GateState {
        match self.0.load(Ordering::Acquire) {
            0 => GateState::Closed,
            1 => GateState::Open,
            _ => GateState::Abandoned,
        }
    }

    /// Every core has moved its log.
    pub fn open(&self) {
        let _ = self.0.compare_exchange(0, 1, Ordering::AcqRel, Ordering::Acquire);
    }

    /// The checkpoint ended before the gate opened (a failure, a timeout).
    pub fn abandon(&self) {
        let _ = self.0.compare_exchange(0, 2, Ordering::AcqRel, Ordering::Acquire);
    }
}

/// What a core sends the lifecycle thread during a checkpoint.
#[derive(Debug)]
pub enum CheckpointMsg {
    /// The core's log moved to segment `seq`; its copy starts now.
    Begun {
        core: usize,
        seq: u64,
    },
    Entries(Vec<crate::state::shard::Entry>),
    /// The copy is complete; versions issued so far are at most `max_version`.
    Ended {
        core: usize,
        max_version: u64,
    },
    Failed {
        core: usize,
        why: String,
    },
}

/// What a core drained at shutdown.
#[derive(Debug, Default, Clone, Copy)]
pub struct DrainReport {
    pub connections: usize,
    pub waiters: usize,
    /// Requests still in progress when the wait ended.
    pub unfinished: usize,
}

/// The key -> core mapping, identical on every core.
#[derive(Clone, Debug)]
pub struct Routing {
    hasher: RandomState,
    cores: usize,
}

impl Routing {
    pub fn new(cores: usize) -> Self {
        Routing { hasher: RandomState::new(), cores: cores.max(1) }
    }

    fn spread(&self, h: u64) -> usize {
        ((u128::from(h) * self.cores as u128) >> 64) as usize
    }

    /// The core owning `key` (after `ip/` expansion).
    pub fn owner(&self, key: &[u8]) -> usize {
        self.spread(self.hasher.hash_one(key))
    }

    pub fn cores(&self) -> usize {
        self.cores
    }
}

pub(crate) struct Inbox {
    pub(crate) tx: Sender<Vec<Msg>>,
    pub(crate) waker: AtomicWaker,
}

/// The cross-core channels: one inbox per core, shared by all.
pub struct Mesh {
    pub(crate) inboxes: Vec<Inbox>,
}

impl Mesh {
    /// Builds the mesh and returns each core's receiving end.
    pub fn new(cores: usize) -> (Arc<Mesh>, Vec<Receiver<Vec<Msg>>>) {
        let (inboxes, receivers) = (0..cores)
            .map(|_| {
                let (tx, rx) = crossbeam_channel::unbounded();
                (Inbox { tx, waker: AtomicWaker::new() }, rx)
            })
            .unzip();
        (Arc::new(Mesh { inboxes }), receivers)
    }

    /// Sends a control request to a core; callable from any thread.
    pub fn send_control(&self, core: usize, control: Control) {
        let inbox = &self.inboxes[core];
        let _ = inbox.tx.send(vec![Msg::Control(control)]);
        inbox.waker.wake();
    }
}
