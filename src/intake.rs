//! The intake of a remote unit that journals: which received packets it takes (flow
//! control), when it journals them, and when they count in the run head (I3, I5).
//!
//! # Why a pair's packets are journaled in `seq` order
//!
//! The journal reclaims space a segment at a time, oldest first, once the pair's applied
//! point covers every packet in the segment ([`crate::journal`]). A packet journaled
//! above a gap therefore pins its segment *and every later one* until the gap closes and
//! the packet is applied. Journaled on arrival, one such packet kept every packet
//! journaled after it in the journal, applied or not, while the flow control counted
//! only the bytes not yet applied: the journal filled with applied packets that only the
//! packet closing the gap could free, and that packet was refused as `Full` on every
//! retransmission. Replication stopped for good (`journal_pressure`, 64 KiB writes on a
//! 4 MiB journal: 52 packets journaled at the primary and never acknowledged).
//!
//! So the intake journals a pair's packets only in `seq` order, and a segment's packets
//! are reclaimed as soon as the applied point passes them:
//!
//! - the packet right after the *frontier* (the highest `seq` journaled or on its way to
//!   the journal) is queued for the journal, with the packets held in memory right after
//!   it ([`Intake::take_batch`] hands them out, in `seq` order, one batch at a time);
//! - a packet further ahead is held in memory, in the [`RunTracker`] above the gap, and
//!   acknowledged selectively at once. Selective acknowledgements are advice: the primary
//!   forgets a packet only once the cumulative acknowledgement covers it (I3), and sends
//!   again what a remote that lost its memory (a restart) acknowledged selectively;
//! - the run, its head and the cumulative acknowledgement count only journaled packets
//!   ([`Intake::journaled`]): the packet the head waits for joins the run only once it
//!   and the packets after it that went into the journal with it are durable.
//!
//! # Flow control
//!
//! The budget counts the bytes held (in memory or journaled), queued or being journaled,
//! and not yet applied. Out-of-order packets may take three quarters of it, packets
//! within [`NEAR_HEAD`] of the run head the whole budget. The packet right after the
//! frontier is taken whatever is held in memory (it closes the gap the held packets wait
//! for and lets the head, the limit and space move; with large packets, those just after
//! it could fill the whole budget and lock it out for good), as long as the run and what
//! is on its way to the journal leave room for it in the budget (an empty run always
//! does). Taking the packet right after the head whatever the run held, as before, let a
//! pair that the limit does not wait for fill a journal that several remote units share,
//! one packet at a time, while the pair the limit waits for found no room for the packet
//! it needed. What is not taken is dropped, unacknowledged: the primary sends it again.
//!
//! A batch the journal refuses (`Full`, [`Intake::refused`]) loses only its packet right
//! after the head (sent again by the primary); the rest stays held in memory. Space comes
//! back as the run is applied and the applied point recorded: nothing in the journal
//! waits on anything but the commit limit, and the run of the pair the limit waits for
//! can always be applied.

use crate::packet::{Heartbeat, Packet};
use crate::run::{Received, RunTracker};
use crate::types::Seq;

/// Packets up to this many sequence numbers above the run head may use the whole budget.
pub const NEAR_HEAD: u64 = 64;

/// What became of one offered packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Offer {
    /// Queued for the journal (it extends what is journaled, or is on its way).
    Queued,
    /// Held in memory above a gap (acknowledged selectively); journaled once the gap
    /// below it closes.
    Ahead,
    /// Held, queued or applied already.
    Duplicate,
    /// No room in the unit's budget: dropped, unacknowledged (flow control).
    NoRoom,
    /// Refused by the run tracker (beyond its window, or a conflicting stamp).
    Rejected(Received),
}

/// Counters of what the intake dropped.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IntakeStats {
    /// Packets dropped by the flow control ([`Offer::NoRoom`]).
    pub no_room: u64,
    /// Packets dropped because the journal refused their batch.
    pub refused: u64,
    /// Batches handed to the journal.
    pub batches: u64,
    /// Restarted streams: gaps given up below a `Restart` mark.
    pub restarts: u64,
}

/// A batch handed to the journal and not yet back.
#[derive(Debug)]
struct InFlight {
    /// Its highest `seq`.
    last: Seq,
    /// Bytes of its packets that are not held by the tracker.
    fresh: usize,
}

/// The receive side of one pair whose packets go through a journal: a [`RunTracker`]
/// that counts only durable packets in its run, flow control, and the order in which
/// packets go to the journal. See the module documentation.
#[derive(Debug)]
pub struct Intake {
    tracker: RunTracker,
    budget: usize,
    /// Bytes of the packets the tracker holds: the run and those held out of order.
    held: usize,
    /// Bytes of the run: journaled, not yet applied.
    run: usize,
    /// The next batch for the journal: contiguous `seq`s, the last one `frontier`.
    queued: Vec<Packet>,
    /// Bytes of the queued packets not held by the tracker.
    queued_fresh: usize,
    in_flight: Option<InFlight>,
    /// The highest `seq` journaled or on its way: at or above the run head; every `seq`
    /// from the head to it is queued, in flight, or held out of order.
    frontier: Seq,
    /// The highest `seq` recovered from the journal above a gap (a `Restart` mark and
    /// what followed it): durable already.
    recovered_ahead: Seq,
    stats: IntakeStats,
}

impl Intake {
    /// An intake over `tracker`, which holds nothing yet ([`RunTracker::new`] at the
    /// pair's applied point), with `budget` bytes for packets not yet applied. Packets a
    /// restart recovered from the journal go in with [`Intake::handle_durable`].
    pub fn new(tracker: RunTracker, budget: usize) -> Self {
        debug_assert_eq!(tracker.held(), 0, "an intake starts from an empty tracker");
        let frontier = tracker.head().seq;
        Intake {
            tracker,
            budget,
            held: 0,
            run: 0,
            queued: Vec::new(),
            queued_fresh: 0,
            in_flight: None,
            frontier,
            recovered_ahead: Seq::ZERO,
            stats: IntakeStats::default(),
        }
    }

    /// Takes a packet that is durable already (recovered from the journal, or a unit
    /// without a journal), in any order, straight into the tracker. Only while nothing is
    /// queued or in flight.
    pub fn handle_durable(&mut self, p: Packet) -> Received {
        debug_assert!(self.queued.is_empty() && self.in_flight.is_none());
        let seq = p.stamp.seq;
        let r = self.track(p);
        self.frontier = self.frontier.max(self.tracker.head().seq);
        if seq > self.tracker.head().seq {
            self.recovered_ahead = self.recovered_ahead.max(seq);
        }
        self.try_restart();
        r
    }

    /// A `Restart` mark is the lowest packet held above the gap and everything received
    /// in order is applied: the gap below the mark is given up (the primary lost those
    /// packets; its resync copies their regions), what is held in it dropped, and the
    /// mark goes to the journal (with the packets held right after it) — or, recovered
    /// from the journal, joins the run at once.
    fn try_restart(&mut self) {
        let Some(s) = self.tracker.restart_ahead() else {
            return;
        };
        if !self.queued.is_empty() || self.in_flight.is_some() || self.frontier >= s {
            return;
        }
        let durable = s <= self.recovered_ahead;
        let Some(dropped) = self.tracker.skip_to(Seq(s.0 - 1), durable) else {
            return;
        };
        self.held = self.held.saturating_sub(dropped);
        self.stats.restarts += 1;
        if durable {
            self.run = self.tracker.run().map(|p| p.payload.wire_len()).sum();
            self.frontier = self.tracker.head().seq.max(self.recovered_ahead);
            return;
        }
        self.frontier = Seq(s.0 - 1);
        self.queue_held();
    }

    /// The packets held in memory right after the frontier go to the journal with it.
    fn queue_held(&mut self) {
        while let Some(q) = self.tracker.held_ahead(self.frontier.next()) {
            self.queued.push(q.clone());
            self.frontier = self.frontier.next();
        }
    }

    /// Hands a packet to the tracker and keeps the byte counts: a packet that extends the
    /// run takes the packets held right after it along.
    fn track(&mut self, p: Packet) -> Received {
        let len = p.payload.wire_len();
        let before = self.tracker.head().seq;
        let r = self.tracker.handle_packet(p);
        if r == Received::New {
            self.held += len;
        }
        self.count_joined((self.tracker.head().seq.0 - before.0) as usize);
        r
    }

    /// The last `joined` packets of the run just joined it: their bytes count in `run`.
    fn count_joined(&mut self, joined: usize) {
        self.run += self
            .tracker
            .run()
            .rev()
            .take(joined)
            .map(|p| p.payload.wire_len())
            .sum::<usize>();
    }

    pub fn tracker(&self) -> &RunTracker {
        &self.tracker
    }

    pub fn handle_heartbeat(&mut self, hb: Heartbeat) {
        self.tracker.handle_heartbeat(hb);
    }

    /// The highest `seq` journaled or on its way to the journal.
    pub fn frontier(&self) -> Seq {
        self.frontier
    }

    /// Bytes of packets held (in memory or the journal), queued or in flight, not yet
    /// applied: what the budget bounds.
    pub fn pending_bytes(&self) -> usize {
        self.held + self.queued_fresh + self.in_flight.as_ref().map_or(0, |f| f.fresh)
    }

    /// Bytes of the run: journaled, not yet applied.
    pub fn run_bytes(&self) -> usize {
        self.run
    }

    pub fn stats(&self) -> IntakeStats {
        self.stats
    }

    /// Takes one received packet (flow control); see the module documentation.
    pub fn offer(&mut self, p: Packet) -> Offer {
        let seq = p.stamp.seq;
        let head = self.tracker.head().seq;
        if seq <= self.frontier || self.tracker.held_ahead(seq).is_some() {
            return Offer::Duplicate;
        }
        let len = p.payload.wire_len();
        let pending = self.pending_bytes();
        if seq == self.frontier.next() {
            // It closes the gap the packets held in memory wait for: taken whatever they
            // hold, as long as the run (journaled, waiting for the limit) and what is on
            // its way to the journal leave room for it.
            let to_journal =
                self.run + self.queued_fresh + self.in_flight.as_ref().map_or(0, |f| f.fresh);
            if to_journal > 0 && to_journal + len > self.budget {
                self.stats.no_room += 1;
                return Offer::NoRoom;
            }
            self.queued.push(p);
            self.queued_fresh += len;
            self.frontier = seq;
            self.queue_held();
            return Offer::Queued;
        }
        let room = if seq.0 <= head.0.saturating_add(NEAR_HEAD) {
            self.budget
        } else {
            self.budget / 4 * 3
        };
        if pending + len > room {
            self.stats.no_room += 1;
            return Offer::NoRoom;
        }
        match self.track(p) {
            Received::New => {
                self.try_restart();
                if self.frontier >= seq {
                    Offer::Queued
                } else {
                    Offer::Ahead
                }
            }
            Received::Duplicate | Received::Stale => Offer::Duplicate,
            r => Offer::Rejected(r),
        }
    }

    /// The next batch for the journal, in `seq` order, if one is queued and none is in
    /// flight. Hand it back with [`Intake::journaled`] or [`Intake::refused`].
    pub fn take_batch(&mut self) -> Option<Vec<Packet>> {
        if self.in_flight.is_some() || self.queued.is_empty() {
            return None;
        }
        self.in_flight = Some(InFlight {
            last: self.frontier,
            fresh: std::mem::take(&mut self.queued_fresh),
        });
        self.stats.batches += 1;
        Some(std::mem::take(&mut self.queued))
    }

    /// The batch from [`Intake::take_batch`] is durable: its packets join the run.
    pub fn journaled(&mut self, batch: Vec<Packet>) {
        let Some(f) = self.in_flight.take() else {
            debug_assert!(false, "journaled without a batch in flight");
            return;
        };
        for p in batch {
            // Packets held out of order joined the run with the packet before them.
            if p.stamp.seq > self.tracker.head().seq
                && self.tracker.held_ahead(p.stamp.seq).is_none()
            {
                self.track(p);
            }
        }
        // A restarted stream's batch is held out of order until it is durable.
        let joined = self.tracker.join_held() as usize;
        self.count_joined(joined);
        if self.tracker.head().seq < f.last {
            // The tracker refused part of the batch (a conflicting stamp): what is queued
            // no longer extends the run. Start again from the head.
            self.requeue();
        }
    }

    /// The journal refused the batch from [`Intake::take_batch`] (full): nothing in it is
    /// durable. The packet right after the head is dropped (the primary sends it again);
    /// the others, and what was queued meanwhile, stay held in memory out of order.
    pub fn refused(&mut self, batch: Vec<Packet>) {
        if self.in_flight.take().is_none() {
            debug_assert!(false, "refused without a batch in flight");
            return;
        }
        let queued = std::mem::take(&mut self.queued);
        self.queued_fresh = 0;
        self.frontier = self.tracker.head().seq;
        for p in batch.into_iter().chain(queued) {
            self.hold_ahead(p);
        }
    }

    /// Queued packets can no longer extend the run: hold them out of order instead.
    fn requeue(&mut self) {
        let queued = std::mem::take(&mut self.queued);
        self.queued_fresh = 0;
        self.frontier = self.tracker.head().seq;
        for p in queued {
            self.hold_ahead(p);
        }
    }

    /// Keeps a packet that is not durable in memory above the gap, or drops it if it is
    /// the packet right after the head (that one would join the run).
    fn hold_ahead(&mut self, p: Packet) {
        let seq = p.stamp.seq;
        if seq <= self.tracker.head().seq || self.tracker.held_ahead(seq).is_some() {
            return;
        }
        if seq == self.tracker.head().seq.next() {
            self.stats.refused += 1;
            return;
        }
        self.track(p);
    }

    /// Everything up to `seq` (at or below the head) is applied: frees it.
    pub fn mark_applied(&mut self, seq: Seq) {
        let freed: usize = self
            .tracker
            .run()
            .take_while(|p| p.stamp.seq <= seq)
            .map(|p| p.payload.wire_len())
            .sum();
        self.tracker.mark_applied(seq);
        self.held = self.held.saturating_sub(freed);
        self.run = self.run.saturating_sub(freed);
        self.try_restart();
    }
}

#[cfg(test)]
mod tests;
