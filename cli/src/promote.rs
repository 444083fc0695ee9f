//! `tidemark promote`: offline, on stopped remote systems, bring the remote units to the
//! group's durable commit limit and leave them as a consistent cut (I1).
//!
//! One remote system (`--system NAME`): apply its journal up to its durable limit.
//! Every remote system of the group (no `--system`): a limit one of them applied is
//! durable (prepared) on all of them, so the cut is the earliest of their durable limits
//! (`max(limit, prepared)` each); every system is brought to that same cut.

use crate::config::Config;
use crate::daemon::lock_system;
use tidemark::journal::Record;
use tidemark::run::RunTracker;
use tidemark::{BlockStore, FileStore, PairId, Stamp, Timestamp};
use tidemark_actors::error::EngineError;
use tidemark_actors::units::journaling::{Durability, SharedJournal};

#[derive(Debug, serde::Serialize)]
pub struct PromotedPair {
    pub name: String,
    pub system: String,
    pub applied_seq: u64,
    pub applied_ts: u64,
    /// Journaled packets above the cut, left unapplied.
    pub beyond_cut: usize,
}

#[derive(Debug, serde::Serialize)]
pub struct PromoteReport {
    pub limit_ts: u64,
    pub systems: Vec<String>,
    pub pairs: Vec<PromotedPair>,
    /// Every pair holds exactly its writes with `ts <= limit_ts` (no gap below the cut).
    pub consistent: bool,
}

/// Promotes `systems` (secondaries of `cfg`); `all` means they are every remote system
/// of the group and must reach one cut.
pub fn promote(cfg: &Config, systems: &[usize], all: bool) -> Result<PromoteReport, EngineError> {
    let _locks = systems
        .iter()
        .map(|&s| lock_system(cfg, s))
        .collect::<Result<Vec<_>, _>>()?;
    let mut opened = Vec::new();
    for &s in systems {
        let sys = &cfg.systems[s];
        let (j, r) = SharedJournal::open(&sys.segments_dir(), sys.journal_size)?;
        opened.push((s, j, r));
    }
    let target = if all {
        opened
            .iter()
            .map(|(_, _, r)| r.limit.max(r.prepared))
            .min()
            .unwrap_or(Timestamp::ZERO)
    } else {
        opened
            .iter()
            .map(|(_, _, r)| r.limit)
            .min()
            .unwrap_or(Timestamp::ZERO)
    };
    let mut pairs = Vec::new();
    let mut consistent = true;
    for (s, journal, recovered) in &opened {
        let mut records = Vec::new();
        for (i, p) in cfg.pairs.iter().enumerate() {
            if p.remote != *s {
                continue;
            }
            let id = PairId(i as u32);
            let rp = recovered.pairs.get(&id);
            let mut tracker = RunTracker::new(id, rp.map_or(Stamp::ZERO, |r| r.applied));
            for pkt in rp.map_or(&[][..], |r| &r.live[..]) {
                tracker.handle_packet(pkt.clone());
            }
            if tracker.limit_violated(target) {
                consistent = false;
            }
            let store = FileStore::open_or_create(&p.remote_path, p.size)?;
            let mut last = None;
            for pkt in tracker.select(target) {
                store.apply(&pkt.payload)?;
                last = Some(pkt.stamp);
            }
            store.flush()?;
            if let Some(stamp) = last {
                tracker.mark_applied(stamp.seq);
                records.push(Record::Applied { pair: id, stamp });
            }
            let applied = tracker.applied();
            pairs.push(PromotedPair {
                name: p.name.clone(),
                system: cfg.systems[*s].name.clone(),
                applied_seq: applied.seq.0,
                applied_ts: applied.ts.0,
                beyond_cut: tracker.held(),
            });
        }
        if target > recovered.limit {
            records.push(Record::Limit { ts: target });
        }
        journal
            .append(&records, Durability::Synced)
            .map_err(|source| EngineError::Journal {
                dir: cfg.systems[*s].segments_dir(),
                source,
            })?;
    }
    Ok(PromoteReport {
        limit_ts: target.0,
        systems: systems
            .iter()
            .map(|&s| cfg.systems[s].name.clone())
            .collect(),
        pairs,
        consistent,
    })
}
