//! Run tracking on a remote unit (claim 14): which packets are held, the run head, and
//! which packets a commit limit lets us apply.
//!
//! Invariants kept by [`RunTracker`]:
//! - `applied <= head`: the head never falls behind what was applied.
//! - every `seq` in `applied+1 ..= head.seq` is held; nothing at or below `applied` is.
//! - `head.ts` only grows, and is the time stamp of the head packet or of a heartbeat that
//!   promised nothing newer exists at or below its time stamp.
//! - memory is the packets held plus one pending heartbeat; no per-seq bitmap.

use crate::packet::{Ack, Heartbeat, Packet, SeqRange};
use crate::types::{PairId, Seq, Stamp, Timestamp};
use std::collections::BTreeMap;

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
    /// retransmits it later).
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
    held: BTreeMap<Seq, Packet>,
    pending_heartbeat: Option<Stamp>,
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
            held: BTreeMap::new(),
            pending_heartbeat: None,
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

    pub fn held(&self) -> usize {
        self.held.len()
    }

    pub fn stats(&self) -> RunStats {
        self.stats
    }

    /// Takes one packet, in any order; returns what became of it. The head moves if the
    /// packet closes a gap.
    pub fn handle_packet(&mut self, packet: Packet) -> Received {
        let seq = packet.stamp.seq;
        let verdict = if seq <= self.applied.seq {
            self.stats.stale += 1;
            Received::Stale
        } else if seq.0 - self.applied.seq.0 > self.window {
            self.stats.beyond_window += 1;
            Received::BeyondWindow
        } else if let Some(held) = self.held.get(&seq) {
            if held.stamp == packet.stamp {
                self.stats.duplicates += 1;
                Received::Duplicate
            } else {
                self.stats.conflicts += 1;
                Received::Conflict
            }
        } else {
            self.stats.received += 1;
            self.held.insert(seq, packet);
            Received::New
        };
        if verdict == Received::New && seq == self.head.seq.next() {
            self.advance();
        }
        verdict
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

    fn advance(&mut self) {
        while let Some(p) = self.held.get(&self.head.seq.next()) {
            self.head = Stamp::new(self.head.ts.max(p.stamp.ts), p.stamp.seq);
        }
        if let Some(hb) = self.pending_heartbeat {
            if hb.seq <= self.head.seq {
                self.head.ts = self.head.ts.max(hb.ts);
                self.pending_heartbeat = None;
            }
        }
    }

    /// The acknowledgement for what is held: cumulative up to the head, plus up to
    /// [`MAX_SACK_RANGES`] ranges held above it.
    pub fn ack(&self) -> Ack {
        let mut sack: Vec<SeqRange> = Vec::new();
        for &seq in self.held.range(self.head.seq.next()..).map(|(s, _)| s) {
            match sack.last_mut() {
                Some(r) if r.last.next() == seq => r.last = seq,
                _ => {
                    if sack.len() == MAX_SACK_RANGES {
                        break;
                    }
                    sack.push(SeqRange {
                        first: seq,
                        last: seq,
                    });
                }
            }
        }
        Ack {
            pair: self.pair,
            cum: self.head.seq,
            sack,
        }
    }

    /// Apply selection (claim 2): the packets that `limit` lets us apply, in `seq` order:
    /// the run from the applied point on, as long as each packet's `ts <= limit`.
    pub fn select(&self, limit: Timestamp) -> impl Iterator<Item = &Packet> + '_ {
        // An empty run (head == applied) must not reach BTreeMap::range as start > end.
        let first = self.applied.seq.next();
        let run = (first <= self.head.seq).then(|| self.held.range(first..=self.head.seq));
        run.into_iter()
            .flatten()
            .map(|(_, p)| p)
            .take_while(move |p| p.stamp.ts <= limit)
    }

    /// Whether a held packet above the head has `ts <= limit`: that would mean the limit
    /// was computed without this pair's head, i.e. invariant I1 is at risk.
    pub fn limit_violated(&self, limit: Timestamp) -> bool {
        self.held
            .range(self.head.seq.next()..)
            .next()
            .is_some_and(|(_, p)| p.stamp.ts <= limit)
    }

    /// Marks everything up to `seq` as applied and frees it. `seq` must be at or below the
    /// head; a lower or equal `seq` than already applied changes nothing.
    pub fn mark_applied(&mut self, seq: Seq) {
        if seq <= self.applied.seq {
            return;
        }
        let seq = seq.min(self.head.seq);
        let ts = self
            .held
            .get(&seq)
            .map(|p| p.stamp.ts)
            .unwrap_or(self.applied.ts);
        let rest = self.held.split_off(&seq.next());
        self.held = rest;
        self.applied = Stamp::new(ts, seq);
    }
}

#[cfg(test)]
mod tests;
