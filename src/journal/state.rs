//! What the journal records, the state every checkpoint carries, and the view recovery
//! hands to its caller.

use crate::packet::Packet;
use crate::types::{Offset, PairId, Seq, Stamp, Timestamp};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// One journal record. The order of the variants is part of the on-disk format.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Record {
    /// A stamped packet. Primary: written locally, not yet durable at the remote.
    /// Remote: received, not yet applied.
    Packet(Packet),
    /// Primary: the remote holds every packet of `pair` up to `stamp.seq` durably, so
    /// those may be forgotten. `stamp` is the stamp of that last packet, so a restarted
    /// primary knows where the pair's sequence numbers and time stamps stand even after
    /// every packet was released.
    Released { pair: PairId, stamp: Stamp },
    /// Remote: every packet of `pair` up to `stamp.seq` is applied to the remote unit (and
    /// the unit flushed); `stamp` is the last applied packet's stamp.
    Applied { pair: PairId, stamp: Stamp },
    /// Remote: the commit limit this system may apply up to (I4: synced before anything
    /// below it is applied).
    Limit { ts: Timestamp },
    /// Remote, with several remote systems in the group: a limit the orderer announced and
    /// this system made durable (and acknowledged), not necessarily released yet.
    Prepared { ts: Timestamp },
    /// Either side: `pair` is now in `state`. Unlike the watermarks a state does not only
    /// move forward: the latest one appended is the pair's state (and once synced, the
    /// one recovery returns), carried by every later checkpoint like the watermarks.
    ///
    /// Like a watermark, a state carried by the checkpoint of a segment that
    /// [`Journal::write`](super::Journal::write) started survives a power loss that tears
    /// unsynced records before it off an earlier segment (see the module documentation):
    /// a state may outlive records appended before it. Where a state depends on earlier
    /// records (the mark packet it follows, say), make those durable (`sync`) before
    /// recording it.
    PairState { pair: PairId, state: PairState },
    /// Primary: sequence numbers of `pair` up to `seq` may be handed out (format version
    /// 3). Synced before any of them is stamped, so a restart that finds fewer packets
    /// than reserved knows the journal may have lost some the remote saw, and never
    /// hands those numbers out again (it restarts the stream above the reservation).
    /// Only moves forward.
    Reserve { pair: PairId, seq: Seq },
    /// Remote: the resync epoch this system is in (`Some`), or that none is open any
    /// more (`None`), format version 3. The latest one appended holds, like a pair state.
    Epoch(Option<Epoch>),
    /// Primary with an activity-log journal (format version 4): a write of `pair`,
    /// stamped and shipped like a [`Record::Packet`] but journaled without its data. The
    /// data stays with the sender until the remote acknowledges it, and is on the local
    /// unit, whose write follows this record (write-ahead). Released like a packet. A
    /// restarted primary cannot resend it: it marks the region dirty and restarts the
    /// pair's stream, so the resync copies the region from the local unit
    /// ([`RecoveredPair::logged`]).
    Logged(Logged),
}

/// A write an activity-log journal recorded without its data ([`Record::Logged`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Logged {
    pub pair: PairId,
    pub stamp: Stamp,
    pub offset: Offset,
    pub len: u64,
}

/// A resync epoch on a remote system: from the durable limit `base` (a consistent cut)
/// on, every remote unit of the system keeps the bytes it overwrites undoable, until a
/// limit at or above `closes_at` is durable (the cut is consistent again there).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Epoch {
    /// The last consistent cut before the epoch: promote rolls back to it.
    pub base: Timestamp,
    /// The limit at which the orderer closes the epoch, once it announced one: a durable
    /// limit at or above it is a consistent cut without rolling back.
    pub closes_at: Option<Timestamp>,
}

/// What a pair's units are, as the journal records it ([`Record::PairState`]). The order
/// of the variants is part of the on-disk format (append only).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PairState {
    /// Primary: the local unit is being copied to the remote (initial sync).
    Syncing,
    /// Primary: ordered replication (I1 at the remote once it is consistent).
    Replicating,
    /// Secondary: the remote unit is part of a consistent cut.
    Consistent,
    /// Secondary: an initial sync began and has not finished: not a cut.
    Inconsistent,
    /// Primary: the remote is unreachable or the journal full: writes go on locally and
    /// their regions are recorded dirty instead of shipped (format version 3).
    Tracking,
    /// Primary: the dirty regions are being copied to the remote (format version 3).
    Resyncing,
}

impl Record {
    /// The largest time stamp this record mentions.
    pub fn max_ts(&self) -> Timestamp {
        match self {
            Record::Packet(p) => p.stamp.ts,
            Record::Logged(l) => l.stamp.ts,
            Record::Released { stamp, .. } | Record::Applied { stamp, .. } => stamp.ts,
            Record::Limit { ts } | Record::Prepared { ts } => *ts,
            Record::Epoch(Some(e)) => e.base.max(e.closes_at.unwrap_or(Timestamp::ZERO)),
            Record::PairState { .. } | Record::Reserve { .. } | Record::Epoch(None) => {
                Timestamp::ZERO
            }
        }
    }

    /// The pair and stamp of a sequenced record (a packet, or a write logged without its
    /// data): what a watermark of its pair releases.
    pub fn stamped(&self) -> Option<(PairId, Stamp)> {
        match self {
            Record::Packet(p) => Some((p.pair, p.stamp)),
            Record::Logged(l) => Some((l.pair, l.stamp)),
            _ => None,
        }
    }
}

/// Moves `map[pair]` forward to `stamp` (by `seq`, then `ts`); true if it moved.
fn advance(map: &mut BTreeMap<PairId, Stamp>, pair: PairId, stamp: Stamp) -> bool {
    let key = |s: &Stamp| (s.seq, s.ts);
    match map.get_mut(&pair) {
        Some(old) if key(old) >= key(&stamp) => false,
        Some(old) => {
            *old = stamp;
            true
        }
        None => {
            map.insert(pair, stamp);
            true
        }
    }
}

/// Everything besides the packets: per-pair watermarks, the latest limits and the
/// latest state of each pair. Every watermark and limit only moves forward (a record
/// that would move one back changes nothing); a pair's state is the latest recorded,
/// and once recorded a pair keeps one. This is what a checkpoint at the start of each
/// segment holds (format version 3; [`StateV1`] and [`StateV2`] are what versions 1
/// and 2 held).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct State {
    pub released: BTreeMap<PairId, Stamp>,
    pub applied: BTreeMap<PairId, Stamp>,
    pub limit: Timestamp,
    pub prepared: Timestamp,
    pub states: BTreeMap<PairId, PairState>,
    pub reserved: BTreeMap<PairId, Seq>,
    pub epoch: Option<Epoch>,
}

/// The checkpoint state of format version 2 (before reservations and epochs): decoded
/// from segments an older build wrote, never written.
#[derive(Debug, Deserialize)]
pub(crate) struct StateV2 {
    released: BTreeMap<PairId, Stamp>,
    applied: BTreeMap<PairId, Stamp>,
    limit: Timestamp,
    prepared: Timestamp,
    states: BTreeMap<PairId, PairState>,
}

impl From<StateV2> for State {
    /// The same watermarks, limits and states; nothing reserved, no epoch.
    fn from(v2: StateV2) -> State {
        State {
            released: v2.released,
            applied: v2.applied,
            limit: v2.limit,
            prepared: v2.prepared,
            states: v2.states,
            reserved: BTreeMap::new(),
            epoch: None,
        }
    }
}

/// The checkpoint state of format version 1 (before pair states): decoded from segments
/// an older build wrote, never written.
#[derive(Debug, Deserialize)]
pub(crate) struct StateV1 {
    released: BTreeMap<PairId, Stamp>,
    applied: BTreeMap<PairId, Stamp>,
    limit: Timestamp,
    prepared: Timestamp,
}

impl From<StateV1> for State {
    /// The same watermarks and limits; no pair has a state yet.
    fn from(v1: StateV1) -> State {
        State {
            released: v1.released,
            applied: v1.applied,
            limit: v1.limit,
            prepared: v1.prepared,
            states: BTreeMap::new(),
            reserved: BTreeMap::new(),
            epoch: None,
        }
    }
}

impl State {
    /// Folds in one record; returns the pair whose watermark moved, if any.
    pub fn apply(&mut self, record: &Record) -> Option<PairId> {
        match record {
            Record::Packet(_) | Record::Logged(_) => None,
            Record::Released { pair, stamp } => {
                advance(&mut self.released, *pair, *stamp).then_some(*pair)
            }
            Record::Applied { pair, stamp } => {
                advance(&mut self.applied, *pair, *stamp).then_some(*pair)
            }
            Record::Limit { ts } => {
                self.limit = self.limit.max(*ts);
                None
            }
            Record::Prepared { ts } => {
                self.prepared = self.prepared.max(*ts);
                None
            }
            Record::PairState { pair, state } => {
                self.states.insert(*pair, *state);
                None
            }
            Record::Reserve { pair, seq } => {
                let r = self.reserved.entry(*pair).or_default();
                *r = (*r).max(*seq);
                None
            }
            Record::Epoch(e) => {
                self.epoch = *e;
                None
            }
        }
    }

    /// Folds in a checkpoint, which must be of a segment started after every record and
    /// checkpoint folded in so far (recovery reads segments in order): its pair states
    /// replace the ones held. Calls `moved` for every pair whose watermark moved.
    pub fn merge(&mut self, other: &State, mut moved: impl FnMut(PairId)) {
        for (&pair, &stamp) in &other.released {
            if advance(&mut self.released, pair, stamp) {
                moved(pair);
            }
        }
        for (&pair, &stamp) in &other.applied {
            if advance(&mut self.applied, pair, stamp) {
                moved(pair);
            }
        }
        self.limit = self.limit.max(other.limit);
        self.prepared = self.prepared.max(other.prepared);
        for (&pair, &state) in &other.states {
            self.states.insert(pair, state);
        }
        for (&pair, &seq) in &other.reserved {
            let r = self.reserved.entry(pair).or_default();
            *r = (*r).max(seq);
        }
        self.epoch = other.epoch;
    }

    /// Where this state, a segment's checkpoint, falls behind `before`: what the
    /// checkpoints and records of the segments before it add up to. A checkpoint is
    /// taken from a journal's state after every record before it, so it is never behind:
    /// every watermark, limit and reservation at least as far, a state for every pair
    /// that has one. A checkpoint that is behind (damage that kept its checksum, or a
    /// bug) would lose what it leaves out once the segments before it are deleted.
    pub fn behind(&self, before: &State) -> Option<String> {
        let key = |s: &Stamp| (s.seq, s.ts);
        for (what, mine, theirs) in [
            ("released", &self.released, &before.released),
            ("applied", &self.applied, &before.applied),
        ] {
            for (pair, s) in theirs {
                if mine.get(pair).is_none_or(|m| key(m) < key(s)) {
                    return Some(format!(
                        "checkpoint holds {what} {:?} of pair {}, behind {s:?} recorded before it",
                        mine.get(pair),
                        pair.0
                    ));
                }
            }
        }
        if self.limit < before.limit || self.prepared < before.prepared {
            return Some(format!(
                "checkpoint holds limit {} and prepared {}, behind {} and {} recorded before it",
                self.limit.0, self.prepared.0, before.limit.0, before.prepared.0
            ));
        }
        for (pair, seq) in &before.reserved {
            if self.reserved.get(pair).is_none_or(|m| m < seq) {
                return Some(format!(
                    "checkpoint holds reservation {:?} of pair {}, behind {} recorded before it",
                    self.reserved.get(pair),
                    pair.0,
                    seq.0
                ));
            }
        }
        if let Some(pair) = before.states.keys().find(|p| !self.states.contains_key(p)) {
            return Some(format!(
                "checkpoint holds no state of pair {}, recorded before it",
                pair.0
            ));
        }
        None
    }

    /// Every packet of `pair` at or below this seq may be forgotten.
    pub fn watermark(&self, pair: PairId) -> Seq {
        let r = self.released.get(&pair).map_or(Seq::ZERO, |s| s.seq);
        let a = self.applied.get(&pair).map_or(Seq::ZERO, |s| s.seq);
        r.max(a)
    }

    /// Whether every packet summarised by `max_seq` (pair -> highest seq) is covered.
    pub fn covers(&self, max_seq: &BTreeMap<PairId, Seq>) -> bool {
        max_seq
            .iter()
            .all(|(&pair, &seq)| seq <= self.watermark(pair))
    }

    pub fn max_ts(&self) -> Timestamp {
        self.released
            .values()
            .chain(self.applied.values())
            .map(|s| s.ts)
            .fold(self.limit.max(self.prepared), Timestamp::max)
    }
}

/// One pair as recovered.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecoveredPair {
    /// Latest `Released` stamp (`Stamp::ZERO` if none).
    pub released: Stamp,
    /// Latest `Applied` stamp (`Stamp::ZERO` if none).
    pub applied: Stamp,
    /// The packets not covered by either watermark, in `seq` order, one per `seq` (the
    /// last one journaled wins). On a remote there may be gaps between them.
    pub live: Vec<Packet>,
    /// Primary with an activity-log journal: the writes not covered by the watermark that
    /// were journaled without their data ([`Record::Logged`]), in `seq` order, one per
    /// `seq`; no `seq` is both here and in `live`. They cannot be resent: their regions
    /// are to be resynced from the local unit.
    pub logged: Vec<Logged>,
    /// The latest [`Record::PairState`] of the pair durable in the journal (`None`: never
    /// recorded).
    pub state: Option<PairState>,
    /// Primary: the highest sequence number reserved ([`Record::Reserve`]; `Seq::ZERO`
    /// if none).
    pub reserved: Seq,
}

impl RecoveredPair {
    /// Every packet at or below this seq is covered (released or applied).
    pub fn watermark(&self) -> Seq {
        self.released.seq.max(self.applied.seq)
    }

    /// The highest stamp known for the pair: the last live packet's, or the watermark's.
    /// On a primary this is the last stamp handed out for data (`Sender::new`).
    pub fn last(&self) -> Stamp {
        let wm = if self.released.seq >= self.applied.seq {
            self.released
        } else {
            self.applied
        };
        let newest = match (self.live.last(), self.logged.last()) {
            (Some(p), Some(l)) if l.stamp.seq > p.stamp.seq => Some(l.stamp),
            (Some(p), _) => Some(p.stamp),
            (None, l) => l.map(|l| l.stamp),
        };
        match newest {
            Some(s) if s.seq > wm.seq => s,
            _ => wm,
        }
    }

    /// The regions of the unit the live packets and logged writes touch (marks and empty
    /// writes touch none), in `seq` order of each kind: where the remote may differ
    /// from the local unit once they are given up.
    pub fn regions(&self) -> Vec<(Offset, u64)> {
        self.live
            .iter()
            .filter(|p| !p.payload.is_empty())
            .map(|p| (p.payload.offset(), p.payload.len()))
            .chain(
                self.logged
                    .iter()
                    .filter(|l| l.len > 0)
                    .map(|l| (l.offset, l.len)),
            )
            .collect()
    }
}

/// The torn or corrupt tail recovery dropped from the last segment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TailRepair {
    pub segment: u64,
    /// Where the first bad frame started; the segment now ends here.
    pub offset: u64,
    /// Bytes cut off.
    pub dropped: u64,
    /// What was wrong with the first bad frame.
    pub reason: String,
}

/// What [`Journal::open`](super::Journal::open) found: the reduced state of every record
/// durable in the journal.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Recovered {
    /// Every pair with a watermark, a live packet or a state.
    pub pairs: BTreeMap<PairId, RecoveredPair>,
    /// Latest `Limit` (`Timestamp::ZERO` if none).
    pub limit: Timestamp,
    /// Latest `Prepared` (`Timestamp::ZERO` if none).
    pub prepared: Timestamp,
    /// Remote: the resync epoch the latest [`Record::Epoch`] left open, if any.
    pub epoch: Option<Epoch>,
    /// The largest time stamp in any record read (a floor for a restarted primary's
    /// clock: `HybridClock::observe`).
    pub max_ts: Timestamp,
    /// Set if a torn or corrupt tail was cut off the last segment.
    pub tail: Option<TailRepair>,
    /// Segments on disk after recovery (and its reclamation).
    pub segments: usize,
}

impl Recovered {
    pub fn pair(&self, pair: PairId) -> Option<&RecoveredPair> {
        self.pairs.get(&pair)
    }

    /// Live packets over all pairs, with the writes logged without their data.
    pub fn live_packets(&self) -> usize {
        self.pairs
            .values()
            .map(|p| p.live.len() + p.logged.len())
            .sum()
    }
}

/// Folds records, in journal order, into a [`Recovered`], dropping covered packets as
/// soon as a watermark covers them so memory stays near the live set.
#[derive(Default)]
pub(crate) struct Rebuild {
    pub state: State,
    packets: BTreeMap<PairId, BTreeMap<Seq, Packet>>,
    logged: BTreeMap<PairId, BTreeMap<Seq, Logged>>,
    max_ts: Timestamp,
}

impl Rebuild {
    fn prune(&mut self, pair: PairId) {
        let wm = self.state.watermark(pair);
        if let Some(held) = self.packets.get_mut(&pair) {
            *held = held.split_off(&wm.next());
        }
        if let Some(held) = self.logged.get_mut(&pair) {
            *held = held.split_off(&wm.next());
        }
    }

    pub fn checkpoint(&mut self, cp: &State) {
        self.max_ts = self.max_ts.max(cp.max_ts());
        let mut moved = Vec::new();
        self.state.merge(cp, |p| moved.push(p));
        for pair in moved {
            self.prune(pair);
        }
    }

    pub fn record(&mut self, record: Record) {
        self.max_ts = self.max_ts.max(record.max_ts());
        match record {
            // One record per seq: the last one journaled wins, of either kind.
            Record::Packet(p) => {
                if p.stamp.seq > self.state.watermark(p.pair) {
                    if let Some(l) = self.logged.get_mut(&p.pair) {
                        l.remove(&p.stamp.seq);
                    }
                    self.packets
                        .entry(p.pair)
                        .or_default()
                        .insert(p.stamp.seq, p);
                }
            }
            Record::Logged(l) => {
                if l.stamp.seq > self.state.watermark(l.pair) {
                    if let Some(p) = self.packets.get_mut(&l.pair) {
                        p.remove(&l.stamp.seq);
                    }
                    self.logged
                        .entry(l.pair)
                        .or_default()
                        .insert(l.stamp.seq, l);
                }
            }
            other => {
                if let Some(pair) = self.state.apply(&other) {
                    self.prune(pair);
                }
            }
        }
    }

    pub fn finish(self) -> Recovered {
        let mut pairs: BTreeMap<PairId, RecoveredPair> = BTreeMap::new();
        for (&pair, &s) in &self.state.released {
            pairs.entry(pair).or_default().released = s;
        }
        for (&pair, &s) in &self.state.applied {
            pairs.entry(pair).or_default().applied = s;
        }
        for (pair, held) in self.packets {
            if !held.is_empty() {
                pairs.entry(pair).or_default().live = held.into_values().collect();
            }
        }
        for (pair, held) in self.logged {
            if !held.is_empty() {
                pairs.entry(pair).or_default().logged = held.into_values().collect();
            }
        }
        for (&pair, &state) in &self.state.states {
            pairs.entry(pair).or_default().state = Some(state);
        }
        for (&pair, &seq) in &self.state.reserved {
            pairs.entry(pair).or_default().reserved = seq;
        }
        Recovered {
            pairs,
            limit: self.state.limit,
            prepared: self.state.prepared,
            epoch: self.state.epoch,
            max_ts: self.max_ts,
            tail: None,
            segments: 0,
        }
    }
}
