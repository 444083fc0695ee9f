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

use crate::types::{PairId, SystemId, Timestamp};
use std::collections::{BTreeSet, HashMap};

/// What the orderer wants sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OrderAction {
    /// To every remote system: make `limit` durable, then acknowledge.
    Announce { limit: Timestamp },
    /// To every remote system: apply everything with `ts <= limit`.
    Release { limit: Timestamp },
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

/// The orderer of one consistency group.
#[derive(Debug)]
pub struct Orderer {
    index: HashMap<PairId, usize>,
    heads: Vec<Timestamp>,
    /// `min(heads)`, kept up to date.
    candidate: Timestamp,
    systems: BTreeSet<SystemId>,
    /// The announcement waiting for durable acknowledgements, and who has acknowledged.
    announced: Option<(Timestamp, BTreeSet<SystemId>)>,
    released: Timestamp,
    actions: Vec<OrderAction>,
    releases: u64,
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
            actions: Vec::new(),
            releases: 0,
        })
    }

    /// Takes a pair's head time stamp. Heads only move forward; an older report (a
    /// reordered datagram) changes nothing. Unknown pairs are ignored (returns false).
    pub fn handle_head(&mut self, pair: PairId, ts: Timestamp) -> bool {
        let Some(&i) = self.index.get(&pair) else {
            return false;
        };
        let old = self.heads[i];
        if ts <= old {
            return true;
        }
        self.heads[i] = ts;
        if old == self.candidate {
            let min = self.heads.iter().copied().min().unwrap_or(Timestamp::ZERO);
            if min > self.candidate {
                self.candidate = min;
                self.progress();
            }
        }
        true
    }

    /// A remote system says `limit` is durable there.
    pub fn handle_durable(&mut self, system: SystemId, limit: Timestamp) {
        if let Some((announced, acks)) = &mut self.announced {
            if limit >= *announced && self.systems.contains(&system) {
                acks.insert(system);
                if acks.len() == self.systems.len() {
                    let l = *announced;
                    self.announced = None;
                    self.release(l);
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
        if self.systems.len() == 1 {
            self.release(limit);
        } else {
            self.announced = Some((limit, BTreeSet::new()));
            self.actions.push(OrderAction::Announce { limit });
        }
    }

    fn release(&mut self, limit: Timestamp) {
        if limit > self.released {
            self.released = limit;
            self.releases += 1;
            self.actions.push(OrderAction::Release { limit });
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
    /// limit.
    pub fn resend(&self) -> Vec<OrderAction> {
        let mut out = Vec::new();
        if let Some((limit, _)) = &self.announced {
            out.push(OrderAction::Announce { limit: *limit });
        }
        if self.released > Timestamp::ZERO {
            out.push(OrderAction::Release {
                limit: self.released,
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
            &[
                (
                    Head(0, 10),
                    &[Release {
                        limit: Timestamp(10),
                    }],
                    10,
                ),
                (
                    Head(0, 20),
                    &[Release {
                        limit: Timestamp(20),
                    }],
                    20,
                ),
            ],
        ),
        (
            "a silent pair holds the limit at zero",
            2,
            1,
            &[
                (Head(0, 10), &[], 0),
                (Head(0, 30), &[], 0),
                (
                    Head(1, 20),
                    &[Release {
                        limit: Timestamp(20),
                    }],
                    20,
                ),
            ],
        ),
        (
            "the earliest head is the limit",
            3,
            1,
            &[
                (Head(0, 50), &[], 0),
                (Head(1, 40), &[], 0),
                (
                    Head(2, 60),
                    &[Release {
                        limit: Timestamp(40),
                    }],
                    40,
                ),
                (Head(0, 70), &[], 40),
                (
                    Head(1, 80),
                    &[Release {
                        limit: Timestamp(60),
                    }],
                    60,
                ),
            ],
        ),
        (
            "an older head report changes nothing",
            1,
            1,
            &[
                (
                    Head(0, 50),
                    &[Release {
                        limit: Timestamp(50),
                    }],
                    50,
                ),
                (Head(0, 30), &[], 50),
            ],
        ),
        (
            "two systems: announce, both durable, release",
            1,
            2,
            &[
                (
                    Head(0, 10),
                    &[Announce {
                        limit: Timestamp(10),
                    }],
                    0,
                ),
                (Durable(0, 10), &[], 0),
                (Durable(0, 10), &[], 0),
                (Head(0, 20), &[], 0),
                (
                    Durable(1, 10),
                    &[
                        Release {
                            limit: Timestamp(10),
                        },
                        Announce {
                            limit: Timestamp(20),
                        },
                    ],
                    10,
                ),
                (Durable(1, 20), &[], 10),
                (
                    Durable(0, 20),
                    &[Release {
                        limit: Timestamp(20),
                    }],
                    20,
                ),
            ],
        ),
        (
            "a stale durable ack does not count",
            1,
            2,
            &[
                (
                    Head(0, 10),
                    &[Announce {
                        limit: Timestamp(10),
                    }],
                    0,
                ),
                (Durable(0, 5), &[], 0),
                (Durable(1, 10), &[], 0),
                (
                    Durable(0, 10),
                    &[Release {
                        limit: Timestamp(10),
                    }],
                    10,
                ),
            ],
        ),
        (
            "an unknown system's ack does not count",
            1,
            2,
            &[
                (
                    Head(0, 10),
                    &[Announce {
                        limit: Timestamp(10),
                    }],
                    0,
                ),
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
