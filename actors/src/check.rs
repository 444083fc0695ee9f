//! Checking a run: was every application a consistent cut (I1), and do the remote
//! units equal the local ones? Used by the demo, the examples and the tests, so that
//! "consistent" means one thing everywhere.
//!
//! [`CutChecker`] records each pair's write stamps (as the writes complete) and, through
//! the apply hook, every application the remote units make. A pair's stamps increase
//! with its `seq` (I2), so under a limit `L` a consistent cut holds exactly the packets
//! of the writes with `ts <= L`: the applied `seq` is at least the last such write's,
//! and below the first later write's (a write split into several packets may be cut
//! between its pieces, which were on the disk in that order).
//!
//! A pair may also carry packets that are not recorded writes: an initial sync's pieces
//! and marks. Between two recorded writes the bounds above cover them. After the last
//! recorded write (or on a pair without any, e.g. an idle pair being copied) there is no
//! later write to bound the applied `seq`: there the last packet applied must be stamped
//! at or below the limit, which every application must satisfy anyway.

use crate::engine::Engine;
use crate::error::EngineError;
use crate::units::remote::{Applied, ApplyHook};
use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use tidemark::{Offset, PairId, Seq, Stamp, Timestamp};

/// One application of a limit by a remote unit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Application {
    pub pair: PairId,
    pub limit: Timestamp,
    /// The last packet applied.
    pub applied: Seq,
    /// Its time stamp.
    pub applied_ts: Timestamp,
}

/// An application that was not a consistent cut.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CutViolation {
    pub application: Application,
    /// The applied `seq` a cut at the limit allows: `lowest..=highest` (`highest` is
    /// [`Seq::MAX`] after the last recorded write: then the applied packet must be
    /// stamped at or below the limit).
    pub lowest: Seq,
    pub highest: Seq,
}

impl fmt::Display for CutViolation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let a = &self.application;
        write!(
            f,
            "{} under limit {}: applied {} (stamped {}), the cut allows {}..={}",
            a.pair, a.limit, a.applied, a.applied_ts, self.lowest, self.highest
        )
    }
}

/// Records a run's writes and applications; see the module documentation.
#[derive(Default)]
pub struct CutChecker {
    /// Each pair's write stamps, in `seq` order.
    writes: BTreeMap<PairId, Vec<Stamp>>,
    applications: Arc<Mutex<Vec<Application>>>,
}

impl CutChecker {
    pub fn new() -> Self {
        Self::default()
    }

    /// The hook to give [`crate::EngineBuilder::on_applied`]: it records every
    /// application. (A test that also wants to look at the unit can call
    /// [`CutChecker::record`] from its own hook.)
    pub fn hook(&self) -> ApplyHook {
        let applications = self.applications.clone();
        Arc::new(move |a: &Applied<'_>| record(&applications, a))
    }

    /// Records one application (for a hook of the caller's own).
    pub fn record(&self, a: &Applied<'_>) {
        record(&self.applications, a);
    }

    /// Records a completed write's stamp (any order: it is kept sorted by `seq`).
    pub fn wrote(&mut self, pair: PairId, stamp: Stamp) {
        let v = self.writes.entry(pair).or_default();
        let at = v.partition_point(|s| s.seq < stamp.seq);
        v.insert(at, stamp);
    }

    /// Writes recorded.
    pub fn writes(&self) -> usize {
        self.writes.values().map(Vec::len).sum()
    }

    /// Applications recorded so far.
    pub fn applications(&self) -> Vec<Application> {
        self.applications
            .lock()
            .map(|v| v.clone())
            .unwrap_or_default()
    }

    /// Every application that was not a consistent cut of the recorded writes (I1).
    /// Call it once the writes it should cover have all been recorded.
    pub fn violations(&self) -> Vec<CutViolation> {
        let empty = Vec::new();
        self.applications()
            .into_iter()
            .filter_map(|a| {
                let stamps = self.writes.get(&a.pair).unwrap_or(&empty);
                let within = stamps.partition_point(|s| s.ts <= a.limit);
                let lowest = within.checked_sub(1).map_or(Seq::ZERO, |i| stamps[i].seq);
                // After the last recorded write, packets the checker was not told about
                // (an initial sync's) may follow: bounded by their stamp below.
                let highest = stamps.get(within).map_or(Seq(u64::MAX), |s| {
                    Seq(s.seq.0.saturating_sub(1)).max(lowest)
                });
                let beyond = a.applied_ts > a.limit;
                (a.applied < lowest || a.applied > highest || beyond).then_some(CutViolation {
                    application: a,
                    lowest,
                    highest,
                })
            })
            .collect()
    }
}

fn record(applications: &Mutex<Vec<Application>>, a: &Applied<'_>) {
    if let Ok(mut v) = applications.lock() {
        v.push(Application {
            pair: a.pair,
            limit: a.limit,
            applied: a.applied.seq,
            applied_ts: a.applied.ts,
        });
    }
}

/// The pairs (with both units in this process) whose remote unit differs from the local
/// one, compared byte for byte.
pub fn units_differ(engine: &Engine) -> Result<Vec<PairId>, EngineError> {
    const CHUNK: usize = 1 << 20;
    let (mut a, mut b) = (vec![0u8; CHUNK], vec![0u8; CHUNK]);
    let mut differ = Vec::new();
    for p in engine
        .pairs()
        .iter()
        .filter(|p| p.is_local() && p.is_remote())
    {
        let (l, r) = (engine.store(p.id, false)?, engine.store(p.id, true)?);
        let mut off = 0;
        while off < p.size {
            let n = (p.size - off).min(CHUNK as u64) as usize;
            l.read_at(Offset(off), &mut a[..n])?;
            r.read_at(Offset(off), &mut b[..n])?;
            if a[..n] != b[..n] {
                differ.push(p.id);
                break;
            }
            off += n as u64;
        }
    }
    Ok(differ)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn st(seq: u64, ts: u64) -> Stamp {
        Stamp {
            seq: Seq(seq),
            ts: Timestamp(ts),
        }
    }

    /// Writes of pair 0: seq 1 @10, seq 2 @20, seq 5 @50 (a write split into packets
    /// 3, 4, 5 @25, 28, 50). Each row: limit, applied seq and its stamp, whether that is
    /// a cut.
    #[test]
    fn applications_against_a_history() {
        let rows: &[(u64, u64, u64, bool)] = &[
            (5, 0, 0, true),   // before every write
            (5, 1, 10, false), // a write from after the limit
            (10, 1, 10, true), // exactly the first
            (10, 0, 0, false), // misses the first
            (15, 1, 10, true),
            (15, 2, 20, false),
            (20, 2, 20, true),
            (30, 3, 25, true), // first pieces of the split write may be there…
            (30, 4, 28, true),
            (30, 5, 50, false), // …but not its last, stamped 50
            (50, 5, 50, true),
            (50, 4, 28, false),
            (99, 5, 50, true),
            // Packets after the last recorded write (an initial sync's pieces): applied
            // if stamped within the limit, never beyond it.
            (99, 6, 60, true),
            (99, 9, 99, true),
            (99, 6, 100, false),
        ];
        for &(limit, applied, applied_ts, ok) in rows {
            let mut c = CutChecker::new();
            for s in [st(5, 50), st(1, 10), st(2, 20)] {
                c.wrote(PairId(0), s);
            }
            if let Ok(mut v) = c.applications.lock() {
                v.push(Application {
                    pair: PairId(0),
                    limit: Timestamp(limit),
                    applied: Seq(applied),
                    applied_ts: Timestamp(applied_ts),
                });
            }
            assert_eq!(
                c.violations().is_empty(),
                ok,
                "limit {limit}, applied {applied}: {:?}",
                c.violations()
            );
        }
    }
}
