//! Failover and failback: a promoted secondary runs as the primary of the reversed
//! group (`tidemark failover`), the old primary returns as its secondary (`tidemark
//! demote`), and the new primary resends only the regions that differ (`tidemark
//! failback`). The split-brain guard is the group's **generation**.
//!
//! **Generation.** Each system keeps `journal_dir/generation` (JSON: `generation`,
//! `role`, `failback_pending`; written to a temporary file, synced, renamed, directory
//! synced). A system without the file is at generation 0 in the role its config gives.
//! The link key of a system is [`tidemark::seal::generation_key`] of the group key and
//! its generation: generation 0 is the group key itself, any other a key derived from
//! it. So two systems at different generations cannot open each other's datagrams: a
//! stale primary's writes never reach a promoted group, and the promoted primary's
//! never reach a stale secondary (I6: dropped, counted as `dropped_unauthenticated`;
//! the daemon reports it, [`crate::daemon`]). `failover` sets the new primary's
//! generation to one above its own; `demote` sets the old primary's to the one the
//! failover printed, and refuses a system already at that generation or above.
//!
//! **Which regions differ.** The new primary's units are the cut `C` promote left
//! (`limit_ts`, or `rolled_back_to`). The old primary's units hold `C` plus every write
//! it made above `C`; each of those is, when the old primary stopped, one of:
//!
//! 1. a packet still in the old primary's journal (never acknowledged by the remote);
//! 2. a region of the old primary's dirty map (written while tracking or resyncing);
//! 3. a packet the remote journaled but promote left above the cut (`beyond_cut`);
//! 4. a packet the remote applied above the cut and promote rolled back: its region is
//!    in the remote's undo file.
//!
//! `failover` collects 3 and 4 from the promoted secondary's journal and undo files;
//! `demote` collects 1 and 2 from the old primary's journal and dirty maps and writes
//! them to a regions file; `failback` adds that file to the new primary's dirty maps.
//! The new primary's own writes since the failover are in its dirty maps too: it runs
//! tracking from its first start ([`EngineBuilder::track_from_start`]) until the
//! failback. The union is every region where the two sides may differ; the rest is
//! `C` on both. The new primary resyncs the union through the ordered resync path
//! (`ResyncBegin` is the first packet of its stream), so the old primary's units move
//! under a resync epoch: a promote of it meanwhile rolls back to what it held before
//! the failback.
//!
//! **Until the failback.** A new primary whose failback is pending derives its link key
//! under its own label: it talks to no system, so no packet of its stream can reach a
//! secondary before the regions of the old primary are in its dirty maps.
//!
//! [`EngineBuilder::track_from_start`]: tidemark_actors::EngineBuilder::track_from_start

use crate::config::Config;
use crate::daemon::lock_system;
use crate::export::Exporter;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};
use tidemark::dirty::DirtyFile;
use tidemark::journal::{PairState, Record};
use tidemark::{Offset, PairId};
use tidemark_actors::error::EngineError;
use tidemark_actors::units::journaling::{Durability, SharedJournal};
use tidemark_actors::units::undo::UndoFile;

/// The label of the link key of a primary whose failback is pending: no other system
/// derives it.
const PENDING_LABEL: &[u8] = b"failback pending";

/// A system's generation file, `journal_dir/generation`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Generation {
    pub generation: u64,
    /// `"primary"` or `"secondary"`: the role the system took at that generation.
    pub role: String,
    /// A primary after `failover`, until `failback` merged the old primary's regions.
    #[serde(default)]
    pub failback_pending: bool,
}

fn bad<T>(m: impl Into<String>) -> Result<T, EngineError> {
    Err(EngineError::Config(m.into()))
}

fn role(primary: bool) -> &'static str {
    if primary {
        "primary"
    } else {
        "secondary"
    }
}

impl Generation {
    pub fn path(journal_dir: &Path) -> PathBuf {
        journal_dir.join("generation")
    }

    /// The system's generation file; `None` if it has none (generation 0).
    pub fn read(journal_dir: &Path) -> Result<Option<Generation>, EngineError> {
        let path = Self::path(journal_dir);
        match std::fs::read_to_string(&path) {
            Ok(text) => serde_json::from_str(&text).map(Some).map_err(|e| {
                EngineError::Config(format!("{}: not a generation file ({e})", path.display()))
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(EngineError::io(path.display().to_string())(e)),
        }
    }

    /// Writes the file durably: temporary file, fdatasync, rename, directory fsync.
    pub fn write(&self, journal_dir: &Path) -> Result<(), EngineError> {
        let path = Self::path(journal_dir);
        let tmp = journal_dir.join("generation.tmp");
        let io = |what: &Path| EngineError::io(what.display().to_string());
        let text = serde_json::to_string(self).map_err(|e| EngineError::Config(e.to_string()))?;
        let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
        f.write_all(text.as_bytes()).map_err(io(&tmp))?;
        f.sync_data().map_err(io(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(io(&path))?;
        sync_dir(journal_dir)
    }
}

fn sync_dir(dir: &Path) -> Result<(), EngineError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(EngineError::io(format!("fsync {}", dir.display())))
}

/// The generation system `i` of `cfg` runs at (0 without a file), after checking that
/// its file agrees with the role the config gives it: a system that changed role by a
/// failover must be run with the reversed config, and an old primary only after
/// `demote`.
pub fn current(cfg: &Config, i: usize) -> Result<Option<Generation>, EngineError> {
    let s = &cfg.systems[i];
    let g = Generation::read(&s.journal_dir)?;
    if let Some(g) = &g {
        if g.role != role(s.primary) {
            let hint = if s.primary {
                "it was demoted: run it with the config of its generation (where it is the secondary)"
            } else {
                "it took over as the primary: run it with the reversed config `tidemark failover` wrote"
            };
            return bad(format!(
                "system {} is a {} at generation {} ({}), but this config makes it a {}: {hint}",
                s.name,
                g.role,
                g.generation,
                Generation::path(&s.journal_dir).display(),
                role(s.primary),
            ));
        }
    }
    Ok(g)
}

/// The link key of system `i`: the group key derived for its generation (and under
/// its own label while its failback is pending).
pub fn link_key(cfg: &Config, i: usize, group: &[u8; 32]) -> Result<[u8; 32], EngineError> {
    Ok(match current(cfg, i)? {
        None => *group,
        Some(g) if g.failback_pending => {
            tidemark::seal::generation_key(group, g.generation, PENDING_LABEL)
        }
        Some(g) => tidemark::seal::generation_key(group, g.generation, b""),
    })
}

/// Byte ranges, sorted and merged (touching ranges join).
fn merge(mut r: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    r.retain(|&(_, l)| l > 0);
    r.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(r.len());
    for (o, l) in r {
        match out.last_mut() {
            Some((po, pl)) if o <= *po + *pl => *pl = (*pl).max(o + l - *po),
            _ => out.push((o, l)),
        }
    }
    out
}

fn total(r: &[(u64, u64)]) -> u64 {
    r.iter().map(|&(_, l)| l).sum()
}

/// One pair's regions to resend.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PairRegions {
    pub name: String,
    pub size: u64,
    /// `[offset, len]`, sorted, not overlapping.
    pub ranges: Vec<(u64, u64)>,
    pub bytes: u64,
}

/// What `demote` writes and `failback` reads: the old primary's regions that never
/// reached the cut.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionsFile {
    /// The generation the old primary was demoted to (the new primary's).
    pub generation: u64,
    /// The old primary.
    pub system: String,
    pub pairs: Vec<PairRegions>,
}

/// The report of `failover`.
#[derive(Debug, Serialize)]
pub struct FailoverReport {
    pub system: String,
    pub generation: u64,
    /// The reversed config written (`--out`).
    pub config: PathBuf,
    /// Per pair, what the new primary will resend from the start (journaled packets
    /// above the cut and regions promote rolled back), as dirty regions.
    pub pairs: Vec<PairRegions>,
    /// Where the secondary's journal and undo files were moved.
    pub moved_to: PathBuf,
}

/// `tidemark failover --config OLD --system B --out NEW`: offline, on the stopped,
/// promoted secondary `B` of a two-system group.
///
/// Checks (nothing changed on a refusal, exit 2): the group has one primary and one
/// secondary, `B`; `B` is promoted (as `export` checks it); `NEW` does not exist; with
/// `require_drained`, nothing lies above the cut (a planned switchover). Then: writes
/// the reversed config `NEW` (roles swapped, every pair's ends swapped, the orderer on
/// the old primary); moves `B`'s journal segments and undo files to
/// `journal_dir/pre-gen<G>/`; starts a fresh primary journal recording every pair
/// `tracking`, and dirty maps holding the regions above the cut; finally writes the
/// generation file (`G` = `B`'s generation + 1, failback pending).
pub fn failover(
    cfg: &Config,
    system: usize,
    out: &Path,
    require_drained: bool,
) -> Result<FailoverReport, EngineError> {
    let sys = &cfg.systems[system];
    if sys.primary {
        return bad(format!("--system: {:?} is not a secondary", sys.name));
    }
    let reversed = crate::config::reversed(&cfg.path, &sys.name)?;
    if out.exists() {
        return bad(format!(
            "--out: {} exists; it is never overwritten",
            out.display()
        ));
    }
    let generation = current(cfg, system)?.map_or(0, |g| g.generation) + 1;
    // Promoted, not running, no inconsistent pair: the rules of `export`.
    drop(Exporter::open(cfg, system, false)?);
    let _lock = lock_system(cfg, system)?;
    let moved_to = sys.journal_dir.join(format!("pre-gen{generation}"));
    // A failover cut short after moving the journal reads it where it went.
    let old_segments = if moved_to.join("segments").exists() {
        moved_to.join("segments")
    } else {
        sys.segments_dir()
    };
    let old_undo = if moved_to.join("undo").exists() {
        moved_to.join("undo")
    } else {
        crate::promote::undo_dir(cfg, system)
    };
    let (journal, recovered) = SharedJournal::open(&old_segments, sys.journal_size)?;
    drop(journal);
    let mut pairs = Vec::new();
    for (i, p) in cfg.pairs.iter().enumerate() {
        let id = PairId(i as u32);
        let mut ranges = Vec::new();
        if let Some(rp) = recovered.pair(id) {
            for pkt in rp.live.iter().filter(|pkt| pkt.stamp.seq > rp.applied.seq) {
                ranges.push((pkt.payload.offset().0, pkt.payload.len()));
            }
        }
        if let Some(d) =
            UndoFile::read(&old_undo, id).map_err(|e| EngineError::Unit(format!("undo: {e}")))?
        {
            for (o, data) in tidemark::undo::restore_plan(&d.records) {
                ranges.push((o.0, data.len() as u64));
            }
        }
        let ranges = merge(ranges);
        pairs.push(PairRegions {
            name: p.name.clone(),
            size: p.size,
            bytes: total(&ranges),
            ranges,
        });
    }
    if require_drained {
        let above: Vec<String> = pairs
            .iter()
            .filter(|p| p.bytes > 0)
            .map(|p| format!("{} ({} bytes)", p.name, p.bytes))
            .collect();
        if !above.is_empty() {
            return bad(format!(
                "not drained: writes above the cut on {} would be lost by a switchover; restart both systems, let the secondary apply everything, and try again",
                above.join(", ")
            ));
        }
    }
    // From here on things change.
    write_new_file(out, reversed.as_bytes())?;
    std::fs::create_dir_all(&moved_to).map_err(EngineError::io(moved_to.display().to_string()))?;
    for (from, name) in [
        (sys.segments_dir(), "segments"),
        (crate::promote::undo_dir(cfg, system), "undo"),
    ] {
        if from.exists() && !moved_to.join(name).exists() {
            std::fs::rename(&from, moved_to.join(name))
                .map_err(EngineError::io(format!("move {}", from.display())))?;
        }
    }
    sync_dir(&sys.journal_dir)?;
    let (journal, fresh) = SharedJournal::open(&sys.segments_dir(), sys.journal_size)?;
    if fresh.live_packets() > 0 || !fresh.pairs.is_empty() {
        return bad(format!(
            "{}: a journal is there already; failover needs the secondary's journal only",
            sys.segments_dir().display()
        ));
    }
    let records: Vec<Record> = (0..cfg.pairs.len())
        .map(|i| Record::PairState {
            pair: PairId(i as u32),
            state: PairState::Tracking,
        })
        .collect();
    journal
        .append(&records, Durability::Synced)
        .map_err(|source| EngineError::Journal {
            dir: sys.segments_dir(),
            source,
        })?;
    drop(journal);
    for (i, p) in pairs.iter().enumerate() {
        mark_dirty(cfg, &sys.segments_dir(), i, p)?;
    }
    Generation {
        generation,
        role: "primary".into(),
        failback_pending: true,
    }
    .write(&sys.journal_dir)?;
    Ok(FailoverReport {
        system: sys.name.clone(),
        generation,
        config: out.to_path_buf(),
        pairs,
        moved_to,
    })
}

/// Adds `p`'s ranges to pair `i`'s dirty map in `segments` (synced).
fn mark_dirty(
    cfg: &Config,
    segments: &Path,
    i: usize,
    p: &PairRegions,
) -> Result<u64, EngineError> {
    let path = segments.join(format!("dirty-{i}.map"));
    let mut map = DirtyFile::open(&path, p.size, cfg.region)
        .map_err(|e| EngineError::Config(format!("pair {}: {e}", p.name)))?;
    let ranges: Vec<(Offset, u64)> = p.ranges.iter().map(|&(o, l)| (Offset(o), l)).collect();
    map.mark(&ranges)
        .map_err(|e| EngineError::Config(format!("pair {}: {e}", p.name)))?;
    Ok(map.map().dirty_bytes())
}

fn write_new_file(path: &Path, bytes: &[u8]) -> Result<(), EngineError> {
    let io = EngineError::io(path.display().to_string());
    let mut f = std::fs::File::options()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(io)?;
    f.write_all(bytes)
        .and_then(|_| f.sync_data())
        .map_err(EngineError::io(path.display().to_string()))
}

/// The report of `demote`.
#[derive(Debug, Serialize)]
pub struct DemoteReport {
    pub system: String,
    pub generation: u64,
    /// The regions file written (`--regions-out`).
    pub regions: PathBuf,
    pub pairs: Vec<PairRegions>,
    pub moved_to: PathBuf,
}

/// `tidemark demote --config NEW --system A --generation G --regions-out FILE`:
/// offline, on the stopped old primary `A`, which `NEW` (the reversed config) makes the
/// secondary.
///
/// Refuses (exit 2, nothing changed) if `A` is at generation `G` or above (it was
/// promoted later than the failover this demote follows: the operator must decide), if
/// `FILE` exists, or with `require_drained` if `A` holds a write the remote never got.
/// Then writes `FILE` with the regions of `A`'s journal's unacknowledged packets and
/// of its dirty maps, moves its journal segments to `journal_dir/pre-gen<G>/` (a fresh
/// secondary journal starts), and writes its generation file (`G`, secondary). `A`'s
/// units are not touched: they become its remote units.
pub fn demote(
    cfg: &Config,
    system: usize,
    generation: u64,
    regions_out: &Path,
    require_drained: bool,
) -> Result<DemoteReport, EngineError> {
    let sys = &cfg.systems[system];
    if sys.primary {
        return bad(format!(
            "--system: {:?} is the primary in this config; give demote the reversed config (where it is the secondary)",
            sys.name
        ));
    }
    let _lock = lock_system(cfg, system)?;
    let had = Generation::read(&sys.journal_dir)?;
    if let Some(g) = &had {
        if g.generation >= generation {
            return bad(format!(
                "system {} is at generation {} already (as {}); demote to generation {generation} refused: two systems took over, decide which one keeps its writes",
                sys.name, g.generation, g.role
            ));
        }
    }
    if generation == 0 {
        return bad("--generation: must be the new primary's generation, at least 1");
    }
    if regions_out.exists() {
        return bad(format!(
            "--regions-out: {} exists; it is never overwritten",
            regions_out.display()
        ));
    }
    let moved_to = sys.journal_dir.join(format!("pre-gen{generation}"));
    let old_segments = if moved_to.join("segments").exists() {
        moved_to.join("segments")
    } else {
        sys.segments_dir()
    };
    let (journal, recovered) = SharedJournal::open(&old_segments, sys.journal_size)?;
    drop(journal);
    let mut pairs = Vec::new();
    for (i, p) in cfg.pairs.iter().enumerate() {
        let id = PairId(i as u32);
        let mut ranges = Vec::new();
        // What the old primary journaled and the remote may lack: its live packets and
        // the writes an activity log kept without data.
        if let Some(rp) = recovered.pair(id) {
            ranges.extend(rp.regions().into_iter().map(|(o, l)| (o.0, l)));
        }
        let map = old_segments.join(format!("dirty-{i}.map"));
        if map.exists() {
            let d = DirtyFile::open(&map, p.size, cfg.region)
                .map_err(|e| EngineError::Config(format!("pair {}: {e}", p.name)))?;
            ranges.extend(d.map().runs().into_iter().map(|(o, l)| (o.0, l)));
        }
        let ranges = merge(ranges)
            .into_iter()
            .map(|(o, l)| (o, l.min(p.size.saturating_sub(o))))
            .collect::<Vec<_>>();
        pairs.push(PairRegions {
            name: p.name.clone(),
            size: p.size,
            bytes: total(&ranges),
            ranges,
        });
    }
    if require_drained {
        let above: Vec<String> = pairs
            .iter()
            .filter(|p| p.bytes > 0)
            .map(|p| format!("{} ({} bytes)", p.name, p.bytes))
            .collect();
        if !above.is_empty() {
            return bad(format!(
                "not drained: {} holds writes the remote never got on {}; a switchover would lose them",
                sys.name,
                above.join(", ")
            ));
        }
    }
    let file = RegionsFile {
        generation,
        system: sys.name.clone(),
        pairs: pairs.clone(),
    };
    let text = serde_json::to_vec_pretty(&file).map_err(|e| EngineError::Config(e.to_string()))?;
    write_new_file(regions_out, &text)?;
    std::fs::create_dir_all(&moved_to).map_err(EngineError::io(moved_to.display().to_string()))?;
    for (from, name) in [
        (sys.segments_dir(), "segments"),
        (sys.journal_dir.join("undo"), "undo"),
    ] {
        if from.exists() && !moved_to.join(name).exists() {
            std::fs::rename(&from, moved_to.join(name))
                .map_err(EngineError::io(format!("move {}", from.display())))?;
        }
    }
    sync_dir(&sys.journal_dir)?;
    Generation {
        generation,
        role: "secondary".into(),
        failback_pending: false,
    }
    .write(&sys.journal_dir)?;
    Ok(DemoteReport {
        system: sys.name.clone(),
        generation,
        regions: regions_out.to_path_buf(),
        pairs,
        moved_to,
    })
}

/// The report of `failback`.
#[derive(Debug, Serialize)]
pub struct FailbackReport {
    pub system: String,
    pub generation: u64,
    /// Per pair: `merged_bytes` from the regions file, `resync_bytes` the dirty map
    /// holds now (what the resync will copy: the new primary's writes since the
    /// failover too), rounded out to regions.
    pub pairs: Vec<FailbackPair>,
}

#[derive(Debug, Serialize)]
pub struct FailbackPair {
    pub name: String,
    pub merged_bytes: u64,
    pub resync_bytes: u64,
}

/// `tidemark failback --config NEW --system B --regions FILE`: offline, on the stopped
/// new primary `B` whose failback is pending. Refuses (exit 2, nothing changed) if
/// `B`'s failback is not pending, if the file is of another generation, or names a
/// pair `NEW` does not have with that size. Then adds the file's regions to `B`'s
/// dirty maps (synced), journals every pair `replicating` (a pair with dirty regions
/// resyncs at the next start) and clears the pending flag: the next start of `B`
/// talks to its secondary at generation `G` and resyncs the union.
pub fn failback(
    cfg: &Config,
    system: usize,
    regions: &Path,
) -> Result<FailbackReport, EngineError> {
    let sys = &cfg.systems[system];
    if !sys.primary {
        return bad(format!("--system: {:?} is not a primary", sys.name));
    }
    let text = std::fs::read(regions).map_err(EngineError::io(regions.display().to_string()))?;
    let file: RegionsFile = serde_json::from_slice(&text).map_err(|e| {
        EngineError::Config(format!(
            "--regions: {}: not a regions file ({e})",
            regions.display()
        ))
    })?;
    let _lock = lock_system(cfg, system)?;
    let g = match current(cfg, system)? {
        Some(g) if g.failback_pending => g,
        _ => {
            return bad(format!(
                "system {} has no failback pending (no `tidemark failover` before, or its failback was done)",
                sys.name
            ))
        }
    };
    if file.generation != g.generation {
        return bad(format!(
            "--regions: {} is for generation {}, system {} is at generation {}",
            regions.display(),
            file.generation,
            sys.name,
            g.generation
        ));
    }
    let mut idx = Vec::new();
    for p in &file.pairs {
        let Some(i) = cfg.pairs.iter().position(|c| c.name == p.name) else {
            return bad(format!("--regions: pair {:?} is not in the config", p.name));
        };
        if cfg.pairs[i].size != p.size || cfg.pairs[i].local != system {
            return bad(format!(
                "--regions: pair {:?} has size {} there, {} here (or is not a pair of {})",
                p.name, p.size, cfg.pairs[i].size, sys.name
            ));
        }
        if p.ranges
            .iter()
            .any(|&(o, l)| o.checked_add(l).is_none_or(|e| e > p.size))
        {
            return bad(format!(
                "--regions: pair {:?}: a range past the unit",
                p.name
            ));
        }
        idx.push(i);
    }
    let mut pairs = Vec::new();
    for (p, &i) in file.pairs.iter().zip(&idx) {
        let resync_bytes = mark_dirty(cfg, &sys.segments_dir(), i, p)?;
        pairs.push(FailbackPair {
            name: p.name.clone(),
            merged_bytes: p.bytes,
            resync_bytes,
        });
    }
    let (journal, _) = SharedJournal::open(&sys.segments_dir(), sys.journal_size)?;
    let records: Vec<Record> = (0..cfg.pairs.len())
        .filter(|&i| cfg.pairs[i].local == system)
        .map(|i| Record::PairState {
            pair: PairId(i as u32),
            state: PairState::Replicating,
        })
        .collect();
    journal
        .append(&records, Durability::Synced)
        .map_err(|source| EngineError::Journal {
            dir: sys.segments_dir(),
            source,
        })?;
    drop(journal);
    Generation {
        failback_pending: false,
        ..g.clone()
    }
    .write(&sys.journal_dir)?;
    Ok(FailbackReport {
        system: sys.name.clone(),
        generation: g.generation,
        pairs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_merge() {
        assert_eq!(
            merge(vec![(10, 5), (0, 3), (3, 2), (12, 10), (40, 0), (30, 1)]),
            vec![(0, 5), (10, 12), (30, 1)]
        );
    }
}
