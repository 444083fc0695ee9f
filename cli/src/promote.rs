//! `tidemark promote`: offline, on stopped remote systems, bring the remote units to the
//! group's durable commit limit and leave them as a consistent cut (I1).
//!
//! One remote system (`--system NAME`): apply its journal up to its durable limit.
//! Every remote system of the group (no `--system`): a limit one of them applied is
//! durable (prepared) on all of them, so the cut is the earliest of their durable limits
//! (`max(limit, prepared)` each); every system is brought to that same cut.
//!
//! **Pair states.** `store.apply` does nothing for the initial sync's marks, so promote
//! follows each pair's state itself: it starts from the state the journal recorded and
//! every mark it applies moves it (`SyncBegin` → inconsistent, `SyncDone` →
//! consistent); the final state is journaled with the applied points. A pair that ends
//! *inconsistent* is in the middle of an initial sync: its remote unit is a mix of old
//! and new blocks, not part of any cut. Promote works out every pair's final state
//! before it changes anything, and then refuses ([`EngineError::SyncUnfinished`], exit
//! 2) with nothing applied and nothing journaled — the secondary can still be restarted
//! to let the sync finish — unless `force`, which applies up to the limit all the same
//! and says so in the report (`forced`, each pair's `state`).
//!
//! **Resync epoch.** A system whose journal holds an open resync epoch (base `E`, maybe
//! `closes_at`) is not a cut at a limit above `E` and below `closes_at` (or with no
//! `closes_at`): some pair of the group was resyncing. If the target limit is there,
//! promote brings every remote unit of the system to the cut at `E` instead: it applies
//! the journaled packets stamped at or below `E`, then restores every region the unit's
//! undo file saved (the bytes as of `E`), flushes, journals the applied points, and
//! marks each undo file restored (synced; a unit without one gets a file that says so).
//! The report says `rolled_back_to: E`. Running it again, or after a crash midway, does
//! the same again (the epoch and the undo files stay). A secondary rolled back this way
//! does not resume replication (its units refuse to start): the journal's applied
//! points lie above what the units hold. With every system (no `--system`) all of them
//! must end at one cut: the same base, or all at the target (every system's epoch
//! closed at or below it); otherwise promote refuses, changing nothing.

use crate::config::Config;
use crate::daemon::lock_system;
use std::path::{Path, PathBuf};
use tidemark::journal::{PairState, Record, Recovered};
use tidemark::run::RunTracker;
use tidemark::{BlockStore, FileStore, Mark, Packet, PairId, Seq, Stamp, Timestamp};
use tidemark_actors::error::EngineError;
use tidemark_actors::units::journaling::{Durability, SharedJournal};
use tidemark_actors::units::undo::UndoFile;

#[derive(Debug, serde::Serialize)]
pub struct PromotedPair {
    pub name: String,
    pub system: String,
    pub applied_seq: u64,
    pub applied_ts: u64,
    /// Journaled packets above the cut, left unapplied.
    pub beyond_cut: usize,
    /// `"consistent"`, or `"inconsistent"` (an initial sync had not finished: the unit
    /// is not part of the cut; only with `--force`).
    pub state: &'static str,
}

#[derive(Debug, serde::Serialize)]
pub struct PromoteReport {
    pub limit_ts: u64,
    pub systems: Vec<String>,
    pub pairs: Vec<PromotedPair>,
    /// The remote units are a consistent cut: every pair holds exactly its writes with
    /// `ts <= limit_ts` (no `gap`) and none is inconsistent.
    pub consistent: bool,
    /// The journal of some pair has a gap below the cut (a packet at or below it is
    /// missing): promote exits 1.
    pub gap: bool,
    /// `--force` took pairs whose initial sync had not finished (their `state` is
    /// `"inconsistent"`); false when `--force` was given but not needed.
    pub forced: bool,
    /// A resync epoch was open at the target: the units were rolled back to the cut at
    /// its base (this time stamp) instead of `limit_ts`.
    pub rolled_back_to: Option<u64>,
}

/// Where the remote units of a system keep their undo files (`journal_dir/undo`).
pub fn undo_dir(cfg: &Config, system: usize) -> PathBuf {
    cfg.systems[system].journal_dir.join("undo")
}

/// The cut a system's units are brought to at `target`: the base of its open resync
/// epoch if `target` lies inside it (above the base, below `closes_at` or none), else
/// `target`. Returns the cut and whether it is a rollback.
pub fn cut_at(recovered: &Recovered, target: Timestamp) -> (Timestamp, bool) {
    match recovered.epoch {
        Some(e) if e.base < target && e.closes_at.is_none_or(|c| target < c) => (e.base, true),
        _ => (target, false),
    }
}

/// What promote found for one pair before changing anything.
struct Plan {
    system: usize,
    pair: PairId,
    /// The packets to apply, in order (a copy: the tracker is gone once planned).
    apply: Vec<Packet>,
    applied: Stamp,
    beyond_cut: usize,
    /// The pair's state after `apply`.
    state: PairState,
}

/// Promotes `systems` (secondaries of `cfg`); `all` means they are every remote system
/// of the group and must reach one cut. Refuses, changing nothing, if a pair would end
/// inconsistent (an initial sync not finished at the cut), unless `force`.
pub fn promote(
    cfg: &Config,
    systems: &[usize],
    all: bool,
    force: bool,
) -> Result<PromoteReport, EngineError> {
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

    // Each system's cut: the target, or its epoch's base. They must agree.
    let cuts: Vec<(usize, Timestamp, bool)> = opened
        .iter()
        .map(|(s, _, r)| {
            let (cut, back) = cut_at(r, target);
            (*s, cut, back)
        })
        .collect();
    if cuts.windows(2).any(|w| w[0].1 != w[1].1) {
        let detail = cuts
            .iter()
            .map(|(s, cut, back)| {
                format!(
                    "{}: {} {}",
                    cfg.systems[*s].name,
                    if *back { "epoch base" } else { "limit" },
                    cut.0
                )
            })
            .collect::<Vec<_>>()
            .join(", ");
        return Err(EngineError::JournalState(format!(
            "promote: the systems cannot reach one cut ({detail}); nothing was changed"
        )));
    }
    let (cut, rolled_back) = cuts.first().map_or((target, false), |(_, c, b)| (*c, *b));

    // Plan every pair first: nothing is changed if promote refuses.
    let mut plans = Vec::new();
    let mut gap = false;
    for (s, _, recovered) in &opened {
        for (i, p) in cfg.pairs.iter().enumerate() {
            if p.remote == *s {
                let (plan, pair_gap) = plan_pair(*s, PairId(i as u32), recovered, cut);
                gap |= pair_gap;
                plans.push(plan);
            }
        }
    }
    let unfinished: Vec<String> = plans
        .iter()
        .filter(|p| p.state == PairState::Inconsistent)
        .map(|p| {
            format!(
                "{} ({})",
                cfg.pairs[p.pair.0 as usize].name, cfg.systems[p.system].name
            )
        })
        .collect();
    if !unfinished.is_empty() && !force {
        return Err(EngineError::SyncUnfinished {
            command: "promote".into(),
            pairs: unfinished.join(", "),
        });
    }

    let mut pairs = Vec::new();
    for (s, journal, recovered) in &opened {
        let mut records = Vec::new();
        for plan in plans.iter().filter(|p| p.system == *s) {
            let p = &cfg.pairs[plan.pair.0 as usize];
            let store = FileStore::open_or_create(&p.remote_path, p.size)?;
            for pkt in &plan.apply {
                store.apply(&pkt.payload)?;
            }
            if rolled_back {
                // The bytes as of the base, of every region overwritten above it.
                let dir = undo_dir(cfg, *s);
                restore_unit(&dir, plan.pair, cut, &store, p.size)?;
            }
            store.flush()?;
            if let Some(last) = plan.apply.last() {
                records.push(Record::Applied {
                    pair: plan.pair,
                    stamp: last.stamp,
                });
            }
            // Journaled with the applied point: a restarted secondary, or `export`, sees
            // the state the applied marks left. (Without a mark applied, the state is
            // the one recorded, or consistent if none was.)
            if plan.apply.iter().any(|pkt| pkt.payload.mark().is_some()) {
                records.push(Record::PairState {
                    pair: plan.pair,
                    state: plan.state,
                });
            }
            pairs.push(PromotedPair {
                name: p.name.clone(),
                system: cfg.systems[*s].name.clone(),
                applied_seq: plan.applied.seq.0,
                applied_ts: plan.applied.ts.0,
                beyond_cut: plan.beyond_cut,
                state: state_name(plan.state),
            });
        }
        if target > recovered.limit && !rolled_back {
            records.push(Record::Limit { ts: target });
        }
        journal
            .append(&records, Durability::Synced)
            .map_err(|source| EngineError::Journal {
                dir: cfg.systems[*s].segments_dir(),
                source,
            })?;
        if rolled_back {
            // Only now: the units hold the cut at the base and the journal says where
            // they were applied to. A crash before this runs promote again from the top.
            for plan in plans.iter().filter(|p| p.system == *s) {
                let p = &cfg.pairs[plan.pair.0 as usize];
                mark_restored(&undo_dir(cfg, *s), plan.pair, cut, p.size)?;
            }
        }
    }
    let forced = !unfinished.is_empty();
    Ok(PromoteReport {
        rolled_back_to: rolled_back.then_some(cut.0),
        limit_ts: target.0,
        systems: systems
            .iter()
            .map(|&s| cfg.systems[s].name.clone())
            .collect(),
        pairs,
        consistent: !gap && !forced,
        gap,
        forced,
    })
}

/// What applying pair `pair`'s journal (of system `system`) up to `target` does: the
/// packets, the applied point and the pair state it leaves; and whether a packet at or
/// below `target` is missing (a gap).
fn plan_pair(
    system: usize,
    pair: PairId,
    recovered: &Recovered,
    target: Timestamp,
) -> (Plan, bool) {
    let rp = recovered.pairs.get(&pair);
    let mut tracker = RunTracker::new(pair, rp.map_or(Stamp::ZERO, |r| r.applied));
    for pkt in rp.map_or(&[][..], |r| &r.live[..]) {
        tracker.handle_packet(pkt.clone());
    }
    let mut apply: Vec<Packet> = Vec::new();
    loop {
        let run: Vec<Packet> = tracker.select(target).cloned().collect();
        if let Some(last) = run.last() {
            tracker.mark_applied(last.stamp.seq);
        }
        apply.extend(run);
        // A restarted stream (its `Restart` mark at or below the target) goes on past
        // the sequence numbers its primary gave up.
        let restart = tracker
            .restart_ahead()
            .filter(|s| tracker.held_ahead(*s).is_some_and(|p| p.stamp.ts <= target));
        match restart {
            Some(s) if tracker.skip_to(Seq(s.0 - 1), true).is_some() => {}
            _ => break,
        }
    }
    let gap = tracker.limit_violated(target);
    let recorded = rp.and_then(|r| r.state);
    let state = apply.iter().fold(
        recorded.unwrap_or(PairState::Consistent),
        |s, pkt| match pkt.payload.mark() {
            Some(Mark::SyncBegin) => PairState::Inconsistent,
            Some(Mark::SyncDone) => PairState::Consistent,
            Some(Mark::ResyncBegin | Mark::ResyncDone | Mark::Restart) | None => s,
        },
    );
    let plan = Plan {
        system,
        pair,
        applied: tracker.applied(),
        beyond_cut: tracker.held(),
        apply,
        state,
    };
    (plan, gap)
}

fn undo_err(e: impl std::fmt::Display) -> EngineError {
    EngineError::Unit(format!("undo: {e}"))
}

/// Writes every region `pair`'s undo file in `dir` saved (the first copy of each: the
/// bytes as of `base`) back to `store`. No file: the unit applied nothing above the
/// base. A file of another base is refused (it is not of this epoch).
fn restore_unit(
    dir: &Path,
    pair: PairId,
    base: Timestamp,
    store: &FileStore,
    _size: u64,
) -> Result<(), EngineError> {
    let Some(d) = UndoFile::read(dir, pair).map_err(undo_err)? else {
        return Ok(());
    };
    if d.header.base != base {
        return Err(EngineError::JournalState(format!(
            "undo file of {pair} is of an epoch at {}, not the journal's {base}",
            d.header.base
        )));
    }
    for (offset, data) in tidemark::undo::restore_plan(&d.records) {
        store.write_at(offset, data)?;
    }
    Ok(())
}

/// Marks `pair`'s undo file restored (creating one that says only that, if the unit had
/// none), synced.
fn mark_restored(dir: &Path, pair: PairId, base: Timestamp, size: u64) -> Result<(), EngineError> {
    let region = match UndoFile::read(dir, pair).map_err(undo_err)? {
        Some(d) if tidemark::undo::is_restored(&d.records) => return Ok(()),
        Some(d) => d.header.region,
        None => tidemark::undo::DEFAULT_REGION,
    };
    let mut file = match UndoFile::reopen(dir, pair, size).map_err(undo_err)? {
        Some((f, _)) => f,
        None => UndoFile::create(dir, pair, base, region, size).map_err(undo_err)?,
    };
    file.mark_restored().map_err(undo_err)
}

/// How a pair state reads in reports.
pub fn state_name(s: PairState) -> &'static str {
    match s {
        PairState::Inconsistent => "inconsistent",
        // A remote unit is consistent unless an initial sync is under way (the primary
        // states do not occur in a secondary's journal).
        PairState::Consistent
        | PairState::Syncing
        | PairState::Replicating
        | PairState::Tracking
        | PairState::Resyncing => "consistent",
    }
}
