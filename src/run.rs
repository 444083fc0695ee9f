//! Run tracking on a remote unit (claim 14): which packets are held, the run head, and
//! which packets a commit limit lets us apply.
//!
//! Invariants kept by [`RunTracker`]:
//! - `applied <= head`: the head never falls behind what was applied.
//! - every `seq` in `applied+1 ..= head.seq` is held, in the run (`run[i]` has `seq`
//!   `applied.seq + 1 + i`, so `run.len() == head.seq - applied.seq`); nothing at or below
//!   `applied` is held.
//! - packets held out of order are all above `head.seq + 1` (the packet `head.seq + 1`
//!   joins the run the moment it arrives, and takes every held packet right after it
//!   along), and `ranges` lists exactly their seqs as maximal ranges.
//! - every held packet's `seq` is at most `applied.seq + window`, the receive window each
//!   acknowledgement advertises ([`Ack::window`]); the advertised window only grows.
//! - `head.ts` only grows, and is the time stamp of the head packet or of a heartbeat that
//!   promised nothing newer exists at or below its time stamp.
//! - memory is the packets held, one range per gap between them, and one pending
//!   heartbeat; no per-seq bitmap.
//!
//! Costs: an in-order packet is one `VecDeque::push_back` (no map is touched when
//! nothing is held out of order); applying pops from the front; an acknowledgement costs
//! `O(MAX_SACK_RANGES)`, however many packets are held out of order.

use crate::packet::{Ack, Heartbeat, Packet, SeqRange};
use crate::types::{PairId, Seq, Stamp, Timestamp};
use std::collections::{BTreeMap, VecDeque};

/// What became of one received packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Received {
    /// New; held until applied.
    New,
    /// Already held: dropped.
    Duplicate,
    /// At or below the applied point: dropped.
    Stale,
    /// Further ahead of the applied point than the window allows: dropped (the sender
    /// retransmits it later; a sender that honours [`Ack::window`] never sends one).
    BeyondWindow,
    /// Same `seq` as a held packet but a different stamp: a protocol violation, dropped.
    Conflict,
}

/// Counters of what the tracker dropped.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RunStats {
    pub received: u64,
    pub duplicates: u64,
    pub stale: u64,
    pub beyond_window: u64,
    pub conflicts: u64,
}

/// The receive side of one pair.
#[derive(Debug)]
pub struct RunTracker {
    pair: PairId,
    applied: Stamp,
    head: Stamp,
    /// The run: the packets `applied.seq + 1 ..= head.seq`, in `seq` order.
    run: VecDeque<Packet>,
    /// Packets held out of order: all above `head.seq + 1`.
    ahead: BTreeMap<Seq, Packet>,
    /// The seqs of `ahead` as maximal ranges, `first -> last`, so that an acknowledgement
    /// need not walk the packets.
    ranges: BTreeMap<Seq, Seq>,
    pending_heartbeat: Option<Stamp>,
    /// The seqs of `Restart` marks held out of order (entries may be stale: checked).
    restarts: std::collections::BTreeSet<Seq>,
    window: u64,
    stats: RunStats,
}

/// Default: how far ahead of the applied point packets are accepted.
pub const DEFAULT_WINDOW: u64 = 1 << 20;

/// At most this many SACK ranges go into one acknowledgement.
pub const MAX_SACK_RANGES: usize = 16;

impl RunTracker {
    /// A tracker for a pair that has applied everything up to `applied` (`Stamp::ZERO` for
    /// a new pair; the recovered point after a restart).
    pub fn new(pair: PairId, applied: Stamp) -> Self {
        RunTracker {
            pair,
            applied,
            head: applied,
            run: VecDeque::new(),
            ahead: BTreeMap::new(),
            ranges: BTreeMap::new(),
            pending_heartbeat: None,
            restarts: std::collections::BTreeSet::new(),
            window: DEFAULT_WINDOW,
            stats: RunStats::default(),
        }
    }

    /// Accept packets at most `window` sequence numbers ahead of the applied point.
    pub fn with_window(mut self, window: u64) -> Self {
        self.window = window.max(1);
        self
    }

    pub fn pair(&self) -> PairId {
        self.pair
    }

    /// The run head: highest `seq` with everything from the applied point up to it
    /// received, and the time stamp it stands for.
    pub fn head(&self) -> Stamp {
        self.head
    }

    /// The last packet applied.
    pub fn applied(&self) -> Stamp {
        self.applied
    }

    /// Packets held: the run plus those held out of order.
    pub fn held(&self) -> usize {
        self.run.len() + self.ahead.len()
    }

    pub fn stats(&self) -> RunStats {
        self.stats
    }

    /// The packet `seq` if it is held out of order (above a gap).
    pub fn held_ahead(&self, seq: Seq) -> Option<&Packet> {
        self.ahead.get(&seq)
    }

    /// The run: the packets from the applied point up to the head, in `seq` order.
    pub fn run(&self) -> impl DoubleEndedIterator<Item = &Packet> + '_ {
        self.run.iter()
    }

    /// The highest `seq` accepted now: `applied + window`. It only grows (the applied
    /// point only moves forward).
    pub fn window_end(&self) -> Seq {
        Seq(self.applied.seq.0.saturating_add(self.window))
    }

    /// Takes one packet, in any order; returns what became of it. The head moves if the
    /// packet closes a gap.
    pub fn handle_packet(&mut self, packet: Packet) -> Received {
        let seq = packet.stamp.seq;
        if seq <= self.applied.seq {
            self.stats.stale += 1;
            return Received::Stale;
        }
        if seq.0 - self.applied.seq.0 > self.window {
            self.stats.beyond_window += 1;
            return Received::BeyondWindow;
        }
        if seq <= self.head.seq {
            // In the run: a duplicate or a conflict.
            let held = &self.run[(seq.0 - self.applied.seq.0 - 1) as usize];
            return self.repeat(held.stamp == packet.stamp);
        }
        if seq == self.head.seq.next() {
            self.stats.received += 1;
            self.extend_run(packet);
            self.join_held();
            self.use_pending_heartbeat();
            return Received::New;
        }
        // Out of order, beyond a gap.
        if let Some(held) = self.ahead.get(&seq) {
            return self.repeat(held.stamp == packet.stamp);
        }
        self.stats.received += 1;
        if packet.payload.mark() == Some(crate::Mark::Restart) {
            self.restarts.insert(seq);
        }
        self.ahead.insert(seq, packet);
        self.add_to_ranges(seq);
        Received::New
    }

    fn repeat(&mut self, same: bool) -> Received {
        if same {
            self.stats.duplicates += 1;
            Received::Duplicate
        } else {
            self.stats.conflicts += 1;
            Received::Conflict
        }
    }

    /// Appends the packet `head.seq + 1` to the run.
    fn extend_run(&mut self, p: Packet) {
        debug_assert_eq!(p.stamp.seq, self.head.seq.next());
        self.head = Stamp::new(self.head.ts.max(p.stamp.ts), p.stamp.seq);
        self.run.push_back(p);
    }

    /// The first range held out of order starts right after the head: move its packets
    /// into the run.
    fn join_ahead(&mut self) {
        let Some((_, last)) = self.ranges.pop_first() else {
            return;
        };
        let rest = self.ahead.split_off(&last.next());
        let joined = std::mem::replace(&mut self.ahead, rest);
        for p in joined.into_values() {
            self.extend_run(p);
        }
        debug_assert_eq!(self.head.seq, last);
    }

    /// Records `seq` (just put in `ahead`) in `ranges`, merging with its neighbours.
    fn add_to_ranges(&mut self, seq: Seq) {
        let below = self
            .ranges
            .range(..seq)
            .next_back()
            .filter(|(_, &last)| last.next() == seq)
            .map(|(&first, _)| first);
        let above = self.ranges.remove(&seq.next());
        let last = above.unwrap_or(seq);
        match below {
            Some(first) => self.ranges.insert(first, last),
            None => self.ranges.insert(seq, last),
        };
    }

    fn use_pending_heartbeat(&mut self) {
        if let Some(hb) = self.pending_heartbeat {
            if hb.seq <= self.head.seq {
                self.head.ts = self.head.ts.max(hb.ts);
                self.pending_heartbeat = None;
            }
        }
    }

    /// Takes a heartbeat: if everything up to its `seq` is here, the head's time stamp
    /// moves to the heartbeat's; otherwise it waits until the run gets there.
    pub fn handle_heartbeat(&mut self, hb: Heartbeat) {
        let stamp = hb.stamp;
        if stamp.seq <= self.head.seq {
            self.head.ts = self.head.ts.max(stamp.ts);
        } else if self.pending_heartbeat.is_none_or(|p| p.ts < stamp.ts) {
            self.pending_heartbeat = Some(stamp);
        }
    }

    /// The acknowledgement for what is held: cumulative up to the head, up to
    /// [`MAX_SACK_RANGES`] ranges held above it, and the receive window
    /// ([`RunTracker::window_end`]): every packet up to it will be accepted. With more
    /// ranges than fit, half are the lowest (the holes the head waits for) and half the
    /// highest (the newest arrivals: what tells the sender's loss detection most, as
    /// TCP's first SACK block does). Costs `O(MAX_SACK_RANGES)`.
    pub fn ack(&self) -> Ack {
        let range = |(&first, &last): (&Seq, &Seq)| SeqRange { first, last };
        let sack = if self.ranges.len() <= MAX_SACK_RANGES {
            self.ranges.iter().map(range).collect()
        } else {
            let low = MAX_SACK_RANGES / 2;
            let high = MAX_SACK_RANGES - low;
            let mut v: Vec<SeqRange> = self.ranges.iter().take(low).map(range).collect();
            v.extend(self.ranges.iter().rev().take(high).rev().map(range));
            v
        };
        Ack {
            pair: self.pair,
            cum: self.head.seq,
            sack,
            window: self.window_end(),
        }
    }

    /// Apply selection (claim 2): the packets that `limit` lets us apply, in `seq` order:
    /// the run from the applied point on, as long as each packet's `ts <= limit`.
    pub fn select(&self, limit: Timestamp) -> impl Iterator<Item = &Packet> + '_ {
        self.run.iter().take_while(move |p| p.stamp.ts <= limit)
    }

    /// Whether a held packet above the head has `ts <= limit`: that would mean the limit
    /// was computed without this pair's head, i.e. invariant I1 is at risk.
    pub fn limit_violated(&self, limit: Timestamp) -> bool {
        self.ahead
            .first_key_value()
            .is_some_and(|(_, p)| p.stamp.ts <= limit)
    }

    /// The lowest [`Mark::Restart`](crate::Mark) held out of order, if any: the primary
    /// gave up every `seq` below it that is not held (see [`RunTracker::skip_to`]).
    pub fn restart_ahead(&self) -> Option<Seq> {
        self.restarts
            .range(self.head.seq.next()..)
            .find(|s| {
                self.ahead
                    .get(s)
                    .is_some_and(|p| p.payload.mark() == Some(crate::Mark::Restart))
            })
            .copied()
    }

    /// A restarted stream: the primary gave up every `seq` up to `seq` that this unit
    /// does not hold (a `Restart` mark follows it). Only with the run empty (everything
    /// received in order applied): the applied point and the head move to `seq` (the
    /// head keeps its time stamp), and the packets held out of order at or below it are
    /// dropped; returns their bytes ([`Payload::wire_len`](crate::Payload::wire_len)).
    /// With `join`, the packets held right after `seq` join the run (they are durable:
    /// recovered from the journal). Does nothing and returns `None` otherwise.
    pub fn skip_to(&mut self, seq: Seq, join: bool) -> Option<usize> {
        if !self.run.is_empty() || seq <= self.head.seq {
            return None;
        }
        let keep = self.ahead.split_off(&seq.next());
        let dropped: usize = std::mem::replace(&mut self.ahead, keep)
            .values()
            .map(|p| p.payload.wire_len())
            .sum();
        self.ranges = self
            .ranges
            .iter()
            .filter_map(|(&first, &last)| (last > seq).then_some((first.max(seq.next()), last)))
            .collect();
        self.applied = Stamp::new(self.head.ts, seq);
        self.head = self.applied;
        self.restarts = self.restarts.split_off(&seq.next());
        if self.pending_heartbeat.is_some_and(|hb| hb.seq <= seq) {
            self.pending_heartbeat = None;
        }
        if join {
            self.join_held();
        }
        Some(dropped)
    }

    /// The packets held out of order right after the head join the run (they were made
    /// durable: see `tidemark::intake`). Returns how many joined.
    pub fn join_held(&mut self) -> u64 {
        let before = self.head.seq;
        if self
            .ranges
            .first_key_value()
            .is_some_and(|(&first, _)| first == self.head.seq.next())
        {
            self.join_ahead();
            self.use_pending_heartbeat();
        }
        self.head.seq.0 - before.0
    }

    /// Marks everything up to `seq` as applied and frees it. `seq` must be at or below the
    /// head; a lower or equal `seq` than already applied changes nothing.
    pub fn mark_applied(&mut self, seq: Seq) {
        let seq = seq.min(self.head.seq);
        if seq <= self.applied.seq {
            return;
        }
        let n = (seq.0 - self.applied.seq.0) as usize;
        let ts = self.run[n - 1].stamp.ts;
        self.run.drain(..n);
        self.applied = Stamp::new(ts, seq);
    }
}

#[cfg(test)]
mod tests;
