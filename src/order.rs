//! The orderer's rule (claim 14) and how a limit reaches the remote systems.
//!
//! The commit limit is the earliest head time stamp over all pairs of the group. A pair
//! that has never reported holds the limit at [`Timestamp::ZERO`]. The limit only moves
//! forward (I4).
//!
//! With one remote system the orderer releases a limit at once; that system makes it
//! durable before applying below it. With several, applying below a limit on one system
//! is safe only once the limit is durable on all of them (docs/design.md, "several
//! remote systems"), so the orderer first *announces* a limit, collects a *durable*
//! acknowledgement from every remote system, and only then *releases* it. One
//! announcement is in flight at a time; whatever the heads reached meanwhile goes out in
//! the next one.
//!
//! # The resync epoch
//!
//! A pair that resyncs ships its dirty regions between a [`Mark::ResyncBegin`] and a
//! [`Mark::ResyncDone`](crate::Mark::ResyncDone) in its stream; in between its remote
//! unit misses the writes the primary tracked, so the remote units are not a cut at any
//! limit above the pair's `since` (its head just before the begin mark) and below its
//! done mark. Remote units report the resync with their heads
//! ([`HeadReport::resync`](crate::HeadReport)); the orderer then opens an **epoch**
//! with a base `E`, and every limit it announces or releases while the epoch is open
//! carries `Epoch { base: E, closes_at: None }`: the remote systems keep what their
//! units overwrite above `E` undoable (`crate::undo`), so `promote` can roll back to the
//! cut at `E`. Once every pair of the epoch reported its done mark and the candidate `L`
//! is at or above every done mark, the limit `L` carries `closes_at: Some(L)`: at `L`
//! the cut is consistent again, and later limits carry no epoch.
//!
//! **Why the base is a cut at or above every limit released before.** `E` is the
//! earliest of the resyncing pairs' `since` and the other pairs' heads (and never below
//! the released limit). (a) *A cut*: a pair not resyncing has every packet stamped at or
//! below its head in its run, so at or below `E`; a resyncing pair shipped every write
//! stamped at or below `since` before it began tracking (it stops heartbeating past the
//! start of tracking, so every tracked write is stamped above `since`), so at `E` its
//! remote unit misses nothing. (b) *At or above every released limit*: a limit `L` was
//! released when every head was at or above it; heads only grow, and a resyncing pair's
//! head stayed at or below `since` until its begin mark joined the run, and the report
//! of that head carries the resync (the unit sends them together), so the orderer
//! opened the epoch before the candidate could pass `since`. Hence `L <= E`. A restart of
//! a remote unit loses the heartbeat part of its head; the unit raises its head to its
//! system's durable limit again, and the orderer clamps `E` to its released limit, which
//! keeps (b) and, since every such limit was a cut below `since`, (a).
//!
//! A pair that begins a resync while an epoch is open joins it with the same base: its
//! `since` is at or above its head when the epoch opened, which was at or above `E`.
//!
//! A report only counts if its head is not older than the pair's known head; a resync
//! whose `since` is below the limit the last epoch closed at is of that epoch (a new
//! resync's `since` is at or above the pair's head when the epoch closed, which was at
//! or above that limit): it is ignored, as is one older than the pair's known resync.
//! A report without a resync says nothing: a unit stops sending it once it applied past
//! the done mark, which the orderer already knows of.

use crate::journal::Epoch;
use crate::packet::Resync;
use crate::types::{PairId, SystemId, Timestamp};
use std::collections::{BTreeSet, HashMap};

#[cfg(doc)]
use crate::packet::Mark;

/// What the orderer wants sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OrderAction {
    /// To every remote system: make `limit` (and `epoch`) durable, then acknowledge.
    Announce {
        limit: Timestamp,
        epoch: Option<Epoch>,
    },
    /// To every remote system: make `epoch` durable, then apply everything with
    /// `ts <= limit`.
    Release {
        limit: Timestamp,
        epoch: Option<Epoch>,
    },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OrderError {
    #[error("a consistency group needs at least one pair")]
    NoPairs,
    #[error("a consistency group needs at least one remote system")]
    NoSystems,
    #[error("{0} is listed twice")]
    DuplicatePair(PairId),
}

/// The epoch open at the orderer.
#[derive(Clone, Debug)]
struct OpenEpoch {
    base: Timestamp,
    /// The pairs (by index) whose resync it covers.
    pairs: BTreeSet<usize>,
}

/// The orderer of one consistency group.
#[derive(Debug)]
pub struct Orderer {
    index: HashMap<PairId, usize>,
    heads: Vec<Timestamp>,
    /// `min(heads)`, kept up to date.
    candidate: Timestamp,
    systems: BTreeSet<SystemId>,
    /// The announcement waiting for durable acknowledgements, the epoch it carries, and
    /// who has acknowledged.
    announced: Option<(Timestamp, Option<Epoch>, BTreeSet<SystemId>)>,
    released: Timestamp,
    /// The epoch the last release carried (resent with it).
    released_epoch: Option<Epoch>,
    actions: Vec<OrderAction>,
    releases: u64,
    /// Each pair's resync, as reported (cleared when its epoch closes).
    resync: Vec<Option<Resync>>,
    epoch: Option<OpenEpoch>,
    /// An epoch a restart recovered from the orderer's system journal: reopened with its
    /// base once every head is known.
    recovered: Option<Timestamp>,
    /// The limit the last epoch closed at.
    closed_at: Timestamp,
    epochs: u64,
}

impl Orderer {
    /// An orderer for `pairs`, whose remote units live on `systems`. `released` is the
    /// limit already released before a restart (`Timestamp::ZERO` for a new group).
    pub fn new(
        pairs: &[PairId],
        systems: &[SystemId],
        released: Timestamp,
    ) -> Result<Self, OrderError> {
        if pairs.is_empty() {
            return Err(OrderError::NoPairs);
        }
        if systems.is_empty() {
            return Err(OrderError::NoSystems);
        }
        let mut index = HashMap::new();
        for (i, p) in pairs.iter().enumerate() {
            if index.insert(*p, i).is_some() {
                return Err(OrderError::DuplicatePair(*p));
            }
        }
        Ok(Orderer {
            index,
            heads: vec![Timestamp::ZERO; pairs.len()],
            candidate: Timestamp::ZERO,
            systems: systems.iter().copied().collect(),
            announced: None,
            released,
            released_epoch: None,
            actions: Vec::new(),
            releases: 0,
            resync: vec![None; pairs.len()],
            epoch: None,
            recovered: None,
            closed_at: Timestamp::ZERO,
            epochs: 0,
        })
    }

    /// After a restart: the epoch the orderer's system journal holds open. It is
    /// reopened with the same base once every pair's head is known (the remote systems
    /// that hold it keep that base; one that missed it takes it), and closes as any
    /// epoch does; pairs that finished their resync before the restart report none.
    pub fn with_epoch(mut self, epoch: Option<Epoch>) -> Self {
        self.recovered = epoch.map(|e| e.base);
        self
    }

    /// Takes a pair's head time stamp. Heads only move forward; an older report (a
    /// reordered datagram) changes nothing. Unknown pairs are ignored (returns false).
    pub fn handle_head(&mut self, pair: PairId, ts: Timestamp) -> bool {
        self.handle_report(pair, ts, None)
    }

    /// Takes a pair's head report: its head time stamp and its resync, if one is in its
    /// run (see the module documentation). A report older than the pair's known head
    /// changes nothing, its resync included.
    pub fn handle_report(&mut self, pair: PairId, ts: Timestamp, resync: Option<Resync>) -> bool {
        let Some(&i) = self.index.get(&pair) else {
            return false;
        };
        let old = self.heads[i];
        if ts < old {
            return true;
        }
        if let Some(r) = resync {
            self.take_resync(i, r);
        }
        if ts > old {
            self.heads[i] = ts;
        }
        // Before the candidate moves: a limit past `since` must carry the epoch.
        self.open_epoch();
        if ts > old && old == self.candidate {
            let min = self.heads.iter().copied().min().unwrap_or(Timestamp::ZERO);
            if min > self.candidate {
                self.candidate = min;
                self.progress();
            }
        }
        true
    }

    fn take_resync(&mut self, i: usize, r: Resync) {
        if r.since < self.closed_at {
            return; // of a resync an epoch already closed over
        }
        match &mut self.resync[i] {
            Some(known) if r.since < known.since => return,
            Some(known) if r.since == known.since => {
                if known.done.is_none() {
                    known.done = r.done;
                }
            }
            slot => *slot = Some(r),
        }
        if let Some(e) = &mut self.epoch {
            e.pairs.insert(i);
        }
    }

    /// Opens an epoch if a pair resyncs (or one was recovered) and none is open, once
    /// every head is known (until then the candidate is zero: nothing is released).
    fn open_epoch(&mut self) {
        if self.epoch.is_some()
            || (self.recovered.is_none() && self.resync.iter().all(Option::is_none))
            || self.heads.contains(&Timestamp::ZERO)
        {
            return;
        }
        let pairs: BTreeSet<usize> = (0..self.resync.len())
            .filter(|&i| self.resync[i].is_some())
            .collect();
        let base = match self.recovered.take() {
            Some(base) => base,
            None if pairs.is_empty() => return,
            None => {
                let since = pairs
                    .iter()
                    .filter_map(|&i| self.resync[i])
                    .map(|r| r.since);
                let others = (0..self.heads.len())
                    .filter(|i| !pairs.contains(i))
                    .map(|i| self.heads[i]);
                since
                    .chain(others)
                    .min()
                    .unwrap_or(Timestamp::ZERO)
                    .max(self.released)
            }
        };
        self.epochs += 1;
        self.epoch = Some(OpenEpoch { base, pairs });
    }

    /// The epoch a new limit carries; closes the open one if the limit may (every pair
    /// of it reported its done mark, the limit at or above each).
    fn epoch_for(&mut self, limit: Timestamp) -> Option<Epoch> {
        let e = self.epoch.as_ref()?;
        let mut closes = true;
        for &i in &e.pairs {
            match self.resync[i].and_then(|r| r.done) {
                Some(done) if done <= limit => {}
                _ => closes = false,
            }
        }
        let base = e.base;
        if !closes {
            return Some(Epoch {
                base,
                closes_at: None,
            });
        }
        if let Some(e) = self.epoch.take() {
            for i in e.pairs {
                self.resync[i] = None;
            }
        }
        self.closed_at = limit;
        Some(Epoch {
            base,
            closes_at: Some(limit),
        })
    }

    /// A remote system says `limit` is durable there.
    pub fn handle_durable(&mut self, system: SystemId, limit: Timestamp) {
        if let Some((announced, _, acks)) = &mut self.announced {
            if limit >= *announced && self.systems.contains(&system) {
                acks.insert(system);
                if acks.len() == self.systems.len() {
                    if let Some((l, epoch, _)) = self.announced.take() {
                        self.release(l, epoch);
                    }
                    self.progress();
                }
            }
        }
    }

    fn progress(&mut self) {
        if self.announced.is_some() || self.candidate <= self.released {
            return;
        }
        let limit = self.candidate;
        let epoch = self.epoch_for(limit);
        if self.systems.len() == 1 {
            self.release(limit, epoch);
        } else {
            self.announced = Some((limit, epoch, BTreeSet::new()));
            self.actions.push(OrderAction::Announce { limit, epoch });
        }
    }

    fn release(&mut self, limit: Timestamp, epoch: Option<Epoch>) {
        if limit > self.released {
            self.released = limit;
            self.released_epoch = epoch;
            self.releases += 1;
            self.actions.push(OrderAction::Release { limit, epoch });
        }
    }

    /// The next thing to send.
    pub fn poll_action(&mut self) -> Option<OrderAction> {
        if self.actions.is_empty() {
            None
        } else {
            Some(self.actions.remove(0))
        }
    }

    /// What to send again on a timer, because announcements, acknowledgements and
    /// releases travel over a lossy network: the pending announcement and the released
    /// limit, each with the epoch it carried.
    pub fn resend(&self) -> Vec<OrderAction> {
        let mut out = Vec::new();
        if let Some((limit, epoch, _)) = &self.announced {
            out.push(OrderAction::Announce {
                limit: *limit,
                epoch: *epoch,
            });
        }
        if self.released > Timestamp::ZERO {
            out.push(OrderAction::Release {
                limit: self.released,
                epoch: self.released_epoch,
            });
        }
        out
    }

    /// The commit limit: the earliest head time stamp over all pairs.
    pub fn candidate(&self) -> Timestamp {
        self.candidate
    }

    /// The highest limit released to the remote systems.
    pub fn released(&self) -> Timestamp {
        self.released
    }

    /// How many times the released limit moved.
    pub fn releases(&self) -> u64 {
        self.releases
    }

    /// The open epoch's base, if one is open.
    pub fn epoch_base(&self) -> Option<Timestamp> {
        self.epoch.as_ref().map(|e| e.base)
    }

    /// How many epochs opened since start.
    pub fn epochs(&self) -> u64 {
        self.epochs
    }

    /// The pair holding the limit back (the earliest head), for diagnostics.
    pub fn laggard(&self) -> Option<PairId> {
        let (i, _) = self.heads.iter().enumerate().min_by_key(|(_, t)| **t)?;
        self.index.iter().find(|(_, &j)| j == i).map(|(p, _)| *p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn t(x: u64) -> Timestamp {
        Timestamp(x)
    }

    fn drain(o: &mut Orderer) -> Vec<OrderAction> {
        std::iter::from_fn(|| o.poll_action()).collect()
    }

    use OrderAction::*;

    const fn rel(l: u64) -> OrderAction {
        Release {
            limit: Timestamp(l),
            epoch: None,
        }
    }

    const fn ann(l: u64) -> OrderAction {
        Announce {
            limit: Timestamp(l),
            epoch: None,
        }
    }

    /// (scenario, pairs, systems, steps: (event, released after))
    enum Ev {
        Head(u32, u64),
        Durable(u32, u64),
    }
    use Ev::*;

    type Case = (
        &'static str,
        u32,
        u32,
        &'static [(Ev, &'static [OrderAction], u64)],
    );

    const CASES: &[Case] = &[
        (
            "one pair, one system: release at once",
            1,
            1,
            &[(Head(0, 10), &[rel(10)], 10), (Head(0, 20), &[rel(20)], 20)],
        ),
        (
            "a silent pair holds the limit at zero",
            2,
            1,
            &[
                (Head(0, 10), &[], 0),
                (Head(0, 30), &[], 0),
                (Head(1, 20), &[rel(20)], 20),
            ],
        ),
        (
            "the earliest head is the limit",
            3,
            1,
            &[
                (Head(0, 50), &[], 0),
                (Head(1, 40), &[], 0),
                (Head(2, 60), &[rel(40)], 40),
                (Head(0, 70), &[], 40),
                (Head(1, 80), &[rel(60)], 60),
            ],
        ),
        (
            "an older head report changes nothing",
            1,
            1,
            &[(Head(0, 50), &[rel(50)], 50), (Head(0, 30), &[], 50)],
        ),
        (
            "two systems: announce, both durable, release",
            1,
            2,
            &[
                (Head(0, 10), &[ann(10)], 0),
                (Durable(0, 10), &[], 0),
                (Durable(0, 10), &[], 0),
                (Head(0, 20), &[], 0),
                (Durable(1, 10), &[rel(10), ann(20)], 10),
                (Durable(1, 20), &[], 10),
                (Durable(0, 20), &[rel(20)], 20),
            ],
        ),
        (
            "a stale durable ack does not count",
            1,
            2,
            &[
                (Head(0, 10), &[ann(10)], 0),
                (Durable(0, 5), &[], 0),
                (Durable(1, 10), &[], 0),
                (Durable(0, 10), &[rel(10)], 10),
            ],
        ),
        (
            "an unknown system's ack does not count",
            1,
            2,
            &[
                (Head(0, 10), &[ann(10)], 0),
                (Durable(7, 10), &[], 0),
                (Durable(1, 10), &[], 0),
            ],
        ),
    ];

    #[test]
    fn cases() {
        for (name, npairs, nsys, steps) in CASES {
            let pairs: Vec<PairId> = (0..*npairs).map(PairId).collect();
            let systems: Vec<SystemId> = (0..*nsys).map(SystemId).collect();
            let mut o = Orderer::new(&pairs, &systems, Timestamp::ZERO).expect("valid");
            for (i, (ev, want, released)) in steps.iter().enumerate() {
                match ev {
                    Head(p, ts) => {
                        o.handle_head(PairId(*p), t(*ts));
                    }
                    Durable(s, l) => o.handle_durable(SystemId(*s), t(*l)),
                }
                assert_eq!(&drain(&mut o), want, "{name} step {i}");
                assert_eq!(o.released(), t(*released), "{name} step {i}");
            }
        }
    }

    const fn ep(l: u64, base: u64, closes: bool) -> Option<Epoch> {
        Some(Epoch {
            base: Timestamp(base),
            closes_at: if closes { Some(Timestamp(l)) } else { None },
        })
    }

    /// A release carrying the epoch `base` (closing at `l` if `closes`).
    const fn rel_e(l: u64, base: u64, closes: bool) -> OrderAction {
        Release {
            limit: Timestamp(l),
            epoch: ep(l, base, closes),
        }
    }

    const fn ann_e(l: u64, base: u64, closes: bool) -> OrderAction {
        Announce {
            limit: Timestamp(l),
            epoch: ep(l, base, closes),
        }
    }

    /// A pair's report: (pair, head, resync: (since, done)).
    enum Rep {
        H(u32, u64),
        R(u32, u64, u64, Option<u64>),
        D(u32, u64),
    }

    type EpochCase = (
        &'static str,
        u32,
        u32,
        &'static [(Rep, &'static [OrderAction])],
    );

    const EPOCH_CASES: &[EpochCase] = &[
        (
            "opens at min(since, other heads), closes at the first limit past done",
            2,
            1,
            &[
                (Rep::H(0, 10), &[]),
                (Rep::H(1, 12), &[rel(10)]),
                (Rep::H(1, 30), &[]),
                // Pair 0 tracked from head 10; its begin mark is stamped 40.
                (Rep::R(0, 40, 10, None), &[rel_e(30, 10, false)]),
                (Rep::H(1, 50), &[rel_e(40, 10, false)]),
                (Rep::R(0, 60, 10, Some(55)), &[rel_e(50, 10, false)]),
                (Rep::H(1, 70), &[rel_e(60, 10, true)]),
                // The unit still reports the resync until it applied past done: stale.
                (Rep::R(0, 90, 10, Some(55)), &[rel(70)]),
                (Rep::H(1, 95), &[rel(90)]),
            ],
        ),
        (
            "another pair's lower head is the base",
            2,
            1,
            &[
                (Rep::H(0, 20), &[]),
                (Rep::H(1, 12), &[rel(12)]),
                (Rep::R(0, 40, 20, None), &[]),
                (Rep::H(1, 30), &[rel_e(30, 12, false)]),
            ],
        ),
        (
            "no epoch while a head is unknown; it opens once all are known",
            3,
            1,
            &[
                (Rep::H(0, 10), &[]),
                (Rep::R(1, 40, 10, None), &[]),
                (Rep::H(2, 50), &[rel_e(10, 10, false)]),
                (Rep::H(0, 45), &[rel_e(40, 10, false)]),
            ],
        ),
        (
            "a report older than the known head is ignored, resync and all",
            2,
            1,
            &[
                (Rep::H(0, 10), &[]),
                (Rep::H(1, 10), &[rel(10)]),
                (Rep::H(0, 50), &[]),
                (Rep::R(0, 40, 10, None), &[]),
                (Rep::H(1, 60), &[rel(50)]),
            ],
        ),
        (
            "the base never falls below the released limit",
            2,
            1,
            &[
                (Rep::H(0, 30), &[]),
                (Rep::H(1, 30), &[rel(30)]),
                // A since below the released limit (heartbeat stamps lost in a restart).
                (Rep::R(0, 40, 20, None), &[]),
                (Rep::H(1, 50), &[rel_e(40, 30, false)]),
            ],
        ),
        (
            "two systems: the announcement carries the epoch, its release the same",
            1,
            2,
            &[
                (Rep::H(0, 10), &[ann(10)]),
                (Rep::D(0, 10), &[]),
                (Rep::D(1, 10), &[rel(10)]),
                (Rep::R(0, 30, 10, None), &[ann_e(30, 10, false)]),
                (Rep::R(0, 50, 10, Some(45)), &[]),
                (Rep::D(0, 30), &[]),
                (Rep::D(1, 30), &[rel_e(30, 10, false), ann_e(50, 10, true)]),
                (Rep::H(0, 60), &[]),
                (Rep::D(1, 50), &[]),
                (Rep::D(0, 50), &[rel_e(50, 10, true), ann(60)]),
            ],
        ),
        (
            "a pair joining an open epoch keeps the base; closing waits for it",
            3,
            1,
            &[
                (Rep::H(0, 10), &[]),
                (Rep::H(1, 10), &[]),
                (Rep::H(2, 10), &[rel(10)]),
                (Rep::R(0, 40, 10, None), &[]),
                (Rep::H(1, 30), &[]),
                (Rep::H(2, 35), &[rel_e(30, 10, false)]),
                (Rep::R(0, 50, 10, Some(45)), &[]),
                // Pair 1 tracked from 30, its begin mark at 60.
                (Rep::R(1, 60, 30, None), &[rel_e(35, 10, false)]),
                (Rep::H(2, 100), &[rel_e(50, 10, false)]),
                (Rep::R(0, 80, 10, Some(45)), &[rel_e(60, 10, false)]),
                (Rep::R(1, 90, 30, Some(70)), &[rel_e(80, 10, true)]),
            ],
        ),
        (
            "a pair that resyncs again in the epoch: its new done mark counts",
            1,
            1,
            &[
                (Rep::H(0, 10), &[rel(10)]),
                (Rep::R(0, 20, 10, None), &[rel_e(20, 10, false)]),
                // Tracking again from 25 before the first resync finished.
                (Rep::R(0, 30, 25, None), &[rel_e(30, 10, false)]),
                (Rep::R(0, 40, 10, Some(35)), &[rel_e(40, 10, false)]),
                (Rep::R(0, 50, 25, Some(45)), &[rel_e(50, 10, true)]),
                (Rep::R(0, 60, 55, None), &[rel_e(60, 55, false)]),
            ],
        ),
    ];

    #[test]
    fn epoch_cases() {
        for (name, npairs, nsys, steps) in EPOCH_CASES {
            let pairs: Vec<PairId> = (0..*npairs).map(PairId).collect();
            let systems: Vec<SystemId> = (0..*nsys).map(SystemId).collect();
            let mut o = Orderer::new(&pairs, &systems, Timestamp::ZERO).expect("valid");
            for (i, (ev, want)) in steps.iter().enumerate() {
                match ev {
                    Rep::H(p, ts) => {
                        o.handle_head(PairId(*p), t(*ts));
                    }
                    Rep::R(p, ts, since, done) => {
                        let r = Resync {
                            since: t(*since),
                            done: done.map(t),
                        };
                        o.handle_report(PairId(*p), t(*ts), Some(r));
                    }
                    Rep::D(s, l) => o.handle_durable(SystemId(*s), t(*l)),
                }
                assert_eq!(&drain(&mut o), want, "{name} step {i}");
            }
        }
    }

    /// Resends carry the epoch each message carried: the pending announcement's and the
    /// released limit's.
    #[test]
    fn resends_carry_the_epoch() {
        let mut o = Orderer::new(&[PairId(0)], &[SystemId(0), SystemId(1)], t(0)).expect("ok");
        o.handle_head(PairId(0), t(10));
        o.handle_durable(SystemId(0), t(10));
        o.handle_durable(SystemId(1), t(10));
        let r = Resync {
            since: t(10),
            done: None,
        };
        o.handle_report(PairId(0), t(30), Some(r));
        drain(&mut o);
        assert_eq!(o.resend(), vec![ann_e(30, 10, false), rel(10)]);
        o.handle_durable(SystemId(0), t(30));
        o.handle_durable(SystemId(1), t(30));
        drain(&mut o);
        assert_eq!(o.resend(), vec![rel_e(30, 10, false)]);
        assert_eq!(o.epoch_base(), Some(t(10)));
    }

    /// A restarted orderer whose system journal holds an open epoch reopens it with the
    /// same base once every head is known; with no pair resyncing any more it closes at
    /// the first limit.
    #[test]
    fn a_recovered_epoch_reopens_with_its_base_and_closes() {
        let pairs = [PairId(0), PairId(1)];
        let e = Epoch {
            base: t(10),
            closes_at: None,
        };
        let mut o = Orderer::new(&pairs, &[SystemId(0)], t(20))
            .expect("ok")
            .with_epoch(Some(e));
        o.handle_head(PairId(0), t(40));
        assert_eq!(drain(&mut o), vec![]);
        assert_eq!(o.epoch_base(), None, "not while a head is unknown");
        o.handle_head(PairId(1), t(50));
        assert_eq!(drain(&mut o), vec![rel_e(40, 10, true)]);
        // One still resyncing keeps it open.
        let mut o = Orderer::new(&pairs, &[SystemId(0)], t(20))
            .expect("ok")
            .with_epoch(Some(e));
        let r = Resync {
            since: t(15),
            done: None,
        };
        o.handle_report(PairId(0), t(40), Some(r));
        o.handle_head(PairId(1), t(50));
        assert_eq!(drain(&mut o), vec![rel_e(40, 10, false)]);
    }

    proptest! {
        /// Under any interleaving of reports, epochs or not, the released limit is
        /// monotonic; every limit above an open epoch's base carries the epoch, and an
        /// epoch closes only at a limit at or above every done mark reported for it.
        #[test]
        fn epochs_cover_every_limit_in_a_resync(
            events in proptest::collection::vec((0u32..3, 1u64..200, 0u8..4), 0..200),
        ) {
            let pairs: Vec<PairId> = (0..3).map(PairId).collect();
            let mut o = Orderer::new(&pairs, &[SystemId(0)], t(0)).expect("valid");
            let mut heads = [0u64; 3];
            let mut open: [Option<(u64, Option<u64>)>; 3] = [None; 3];
            let mut last = t(0);
            let mut base: Option<Timestamp> = None;
            for (p, dt, kind) in events {
                let i = p as usize;
                let head = heads[i] + dt;
                heads[i] = head;
                let resync = match kind {
                    0 => {
                        // A new resync: since is the head before the begin mark.
                        let since = head - dt;
                        open[i] = Some((since, None));
                        Some(Resync { since: t(since), done: None })
                    }
                    1 => {
                        if let Some((_, done)) = &mut open[i] {
                            if done.is_none() {
                                *done = Some(head);
                            }
                        }
                        open[i].map(|(s, d)| Resync { since: t(s), done: d.map(t) })
                    }
                    _ => open[i].map(|(s, d)| Resync { since: t(s), done: d.map(t) }),
                };
                o.handle_report(PairId(p), t(head), resync);
                for a in drain(&mut o) {
                    let OrderAction::Release { limit, epoch } = a else {
                        prop_assert!(false, "one system: releases only");
                        continue;
                    };
                    prop_assert!(limit > last);
                    last = limit;
                    // A limit in an open resync of some pair (above its since, below
                    // its done) must carry an epoch whose base is at or below since.
                    for (s, d) in open.iter().flatten() {
                        if limit > t(*s) && d.is_none_or(|d| limit < t(d)) {
                            let e = epoch.expect("an epoch over an open resync");
                            prop_assert!(e.base <= t(*s));
                            prop_assert!(e.closes_at.is_none());
                        }
                    }
                    if let Some(e) = epoch {
                        if let Some(b) = base {
                            prop_assert_eq!(e.base, b, "one base per epoch");
                        }
                        base = Some(e.base);
                        if e.closes_at.is_some() {
                            base = None;
                            for slot in open.iter_mut() {
                                if slot.is_some_and(|(s, d)| d.is_some_and(|d| t(d) <= limit) && t(s) < limit) {
                                    *slot = None;
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn rejects_empty_and_duplicate() {
        assert_eq!(
            Orderer::new(&[], &[SystemId(0)], t(0)).err(),
            Some(OrderError::NoPairs)
        );
        assert_eq!(
            Orderer::new(&[PairId(0)], &[], t(0)).err(),
            Some(OrderError::NoSystems)
        );
        assert_eq!(
            Orderer::new(&[PairId(1), PairId(1)], &[SystemId(0)], t(0)).err(),
            Some(OrderError::DuplicatePair(PairId(1)))
        );
    }

    #[test]
    fn restart_keeps_released_limit() {
        let mut o = Orderer::new(&[PairId(0)], &[SystemId(0)], t(100)).expect("valid");
        o.handle_head(PairId(0), t(50));
        assert_eq!(drain(&mut o), vec![]);
        assert_eq!(o.released(), t(100));
    }

    proptest! {
        /// Under any interleaving of head reports, the released limit is monotonic and
        /// never above the earliest head seen so far.
        #[test]
        fn limit_monotonic_and_bounded(
            npairs in 1u32..8,
            events in proptest::collection::vec((0u32..8, 0u64..1000), 0..300),
        ) {
            let pairs: Vec<PairId> = (0..npairs).map(PairId).collect();
            let mut o = Orderer::new(&pairs, &[SystemId(0)], t(0)).expect("valid");
            let mut heads = vec![0u64; npairs as usize];
            let mut last = t(0);
            for (p, ts) in events {
                let p = p % npairs;
                heads[p as usize] = heads[p as usize].max(ts);
                o.handle_head(PairId(p), t(ts));
                drain(&mut o);
                prop_assert!(o.released() >= last);
                let min = *heads.iter().min().expect("non-empty");
                prop_assert_eq!(o.released(), t(min));
                last = o.released();
            }
        }
    }
}
