//! Recovery decided without touching a file: [`plan`] takes what
//! [`Journal::open`](super::Journal::open) found in the directory and returns a
//! [`RecoveryPlan`]: what the journal holds, where its valid records end, and what to
//! change on disk. `open` reads the files and carries the plan out (see
//! [`repair`](super::repair)).
//!
//! What a plan guarantees (the rules of the section "Recovery" of the
//! [module documentation](super)):
//!
//! - **A synced record is never dropped.** Only segments from the newest unflagged one on
//!   (no [`FLAG_PREV_UNSYNCED`] in its header; the last segment always) may hold records
//!   that were never synced, and only in them may a tail tear. In any earlier segment, and
//!   in the header or checkpoint of every segment (durable before the segment got its
//!   name), a bad byte or a length other than the next segment's checkpoint says is
//!   [`JournalError::Corrupt`].
//! - **A torn tail is cut, with everything after it.** The first bad frame of a segment
//!   that may tear, or such a segment shorter than its successor's checkpoint says, is the
//!   tail: the plan cuts that segment there and rewrites every later one as its header and
//!   checkpoint, naming the new length of the one before. Those checkpoints still count
//!   (a watermark in one may have justified deletions). [`Recovered::tail`] reports the
//!   tail, with exactly the bytes the repairs remove.
//! - **A checkpoint is never behind the segments before it.** One that holds a watermark,
//!   limit or reservation behind what those recorded, or no state of a pair that had one
//!   ([`State::behind`]), is [`JournalError::Corrupt`]: the journal never writes one, and
//!   deleting the segments it covers would take those back.
//! - **An error changes nothing.** Every check is made before a plan exists: a plan is
//!   returned only when the whole directory is acceptable.
//! - **A gap in the numbering is an interrupted reclamation, or an error.** It is
//!   accepted only if the newest checkpoint covers every segment before the last gap (as
//!   reclamation requires before it deletes); those go with the other covered segments.
//!   Otherwise it is [`JournalError::Missing`].
//! - **Durable before use, and before anything is deleted.** The repairs fdatasync every
//!   segment that may hold unsynced records (after a process crash the page cache may
//!   hold them) and remove the `*.seg.tmp` leftovers (segments that never got their name,
//!   so nothing in them was synced). Deletions come after the repairs.
//! - **Recovery is idempotent.** A directory the plan was carried out on plans again to
//!   no cut, no rewrite, no deletion and the same records (the tests check it).

use super::format::{self, Entry, Frames, FLAG_PREV_UNSYNCED};
use super::state::{Rebuild, Recovered, State, TailRepair};
use super::{segment_start_with, JournalError, SegmentInfo};
use std::collections::{BTreeMap, VecDeque};
use std::path::Path;

#[cfg(test)]
mod tests;

/// A segment file found in the directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Listed {
    pub segno: u64,
    /// Its header flags ([`header_flags`]).
    pub flags: u32,
}

/// What `open` found in the directory before reading any segment in full.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct Listing {
    /// The segment files (`N.seg`), ascending by number.
    pub segments: Vec<Listed>,
    /// The leftover temporary files (`N.seg.tmp`), by number.
    pub temps: Vec<u64>,
}

/// The header flags of segment `segno`, from its first bytes; 0 if they are not a valid
/// header. Such a segment counts as unflagged when deciding which segments may tear;
/// [`plan`] then reports it as corrupt anyway.
pub(super) fn header_flags(head: &[u8], segno: u64) -> u32 {
    format::check_header(head, segno).unwrap_or(0)
}

/// One change recovery makes on disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Repair {
    /// Remove the leftover `N.seg.tmp`: a segment that never got its name, so none of
    /// its records was ever synced.
    RemoveTemp(u64),
    /// fdatasync segment `N` as it is: it may hold records only written, never synced,
    /// and the journal is about to promise them.
    Sync(u64),
    /// Cut segment `segno` to `len` bytes, where its torn tail starts, and fsync it.
    Cut { segno: u64, len: u64 },
    /// Replace segment `segno` with `bytes`: its header and checkpoint (the checkpoint
    /// naming the new length of the segment before it), its records dropped. Written
    /// under the temporary name, fsync'd, renamed, the directory fsync'd.
    Rewrite { segno: u64, bytes: Vec<u8> },
}

/// One segment as recovery leaves it.
#[derive(Debug)]
pub(super) struct Scanned {
    /// Its length after the repairs, and the highest packet seq per pair in what is kept.
    pub info: SegmentInfo,
    /// Holds a record after its checkpoint (after the repairs).
    pub has_records: bool,
    /// Its header flags.
    pub flags: u32,
    /// Its format version (after the repairs: a rewritten segment has this build's).
    pub version: u32,
    /// The state its checkpoint holds.
    pub cp: State,
}

/// What recovery decided. Carrying it out means, in this order: the `repairs`, then
/// opening (or, with no segment, creating) the active segment and fsyncing the
/// directory, then deleting the `delete` segments.
#[derive(Debug)]
pub(super) struct RecoveryPlan {
    /// Changes to make before the journal is used, in this order: temporary files
    /// removed; then, oldest first, every segment that may hold unsynced records either
    /// made durable as it is, or cut (the torn one), or rewritten (every one after it).
    pub repairs: Vec<Repair>,
    /// The oldest segments, which the newest checkpoint covers (all of them before a
    /// gap): deleted, oldest first, only once the repairs are durable.
    pub delete: Vec<u64>,
    /// The segments kept before the newest, oldest first, as they are after the repairs.
    pub sealed: VecDeque<SegmentInfo>,
    /// The newest segment, where appends continue (after its last valid record); `None`
    /// if the directory holds no segment: a new journal starts with segment 1.
    pub active: Option<Scanned>,
    /// The state after every record kept (and every checkpoint).
    pub state: State,
    /// What the journal holds, with the tail cut and the segments left after deleting.
    pub recovered: Recovered,
}

/// Decides the recovery of the journal in `dir` from its `listing`. Reads each segment's
/// bytes through `read`, oldest first, one at a time (so one segment at most is in
/// memory), and touches no file itself: `dir` only names files in errors.
///
/// Returns [`JournalError::Corrupt`] if damage may hide a synced record,
/// [`JournalError::Missing`] if a segment with records still needed is gone, and any
/// error of `read`. See the [module documentation](self) for what a plan guarantees.
/// The largest segment number a journal accepts: far above any real one (a new segment
/// every microsecond for 290,000 years), far below where `segno + 1` overflows.
pub(super) const MAX_SEGNO: u64 = 1 << 63;

pub(super) fn plan(
    dir: &Path,
    listing: &Listing,
    mut read: impl FnMut(u64) -> Result<Vec<u8>, JournalError>,
) -> Result<RecoveryPlan, JournalError> {
    if let Some(l) = listing.segments.iter().find(|l| l.segno > MAX_SEGNO) {
        // Not one this journal made (it counts up from 0): a later segment number would
        // overflow.
        return Err(corrupt_at(
            dir,
            l.segno,
            0,
            format!("segment number above {MAX_SEGNO}"),
        ));
    }
    let may_tear_from = may_tear_from(&listing.segments);
    let mut scan = Scan {
        dir,
        segments: Vec::with_capacity(listing.segments.len()),
        rebuild: Rebuild::default(),
        tail: None,
        repairs: Vec::new(),
    };
    for (i, listed) in listing.segments.iter().enumerate() {
        let loaded = load(dir, listed.segno, read(listed.segno)?)?;
        scan.check_previous(&loaded, i > may_tear_from)?;
        scan.segment(loaded, i >= may_tear_from)?;
    }
    check_gap(dir, &scan.segments)?;
    Ok(scan.finish(&listing.temps))
}

/// Index of the first segment that may hold records never synced: the newest one started
/// with everything before it synced (no [`FLAG_PREV_UNSYNCED`]). Every segment from there
/// on may; the last one always may. 0 if every segment is flagged (or there is none).
fn may_tear_from(segments: &[Listed]) -> usize {
    segments
        .iter()
        .rposition(|s| s.flags & FLAG_PREV_UNSYNCED == 0)
        .unwrap_or(0)
}

/// Segment `segno` of the journal in `dir` is corrupt at `offset`.
fn corrupt_at(dir: &Path, segno: u64, offset: u64, reason: String) -> JournalError {
    JournalError::Corrupt {
        segment: segno,
        offset,
        path: dir.join(format::segment_name(segno)),
        reason,
    }
}

/// A segment's bytes, with its header and checkpoint checked.
struct Loaded {
    segno: u64,
    bytes: Vec<u8>,
    flags: u32,
    version: u32,
    /// The length the segment before it had when it was started.
    prev_len: u64,
    cp: State,
}

/// Checks the header and checkpoint of segment `segno`: both were durable before the
/// segment got its name, so any fault in them is corruption, in any segment.
fn load(dir: &Path, segno: u64, bytes: Vec<u8>) -> Result<Loaded, JournalError> {
    let corrupt = |offset: u64, reason: String| corrupt_at(dir, segno, offset, reason);
    let flags = format::check_header(&bytes, segno).map_err(|e| corrupt(0, e.to_string()))?;
    let mut frames = Frames::new(&bytes);
    match frames.next() {
        Some(Ok((_, Entry::Checkpoint(cp)))) => Ok(Loaded {
            segno,
            flags,
            version: format::header_version(&bytes),
            prev_len: cp.prev_len,
            cp: cp.state,
            bytes,
        }),
        Some(Ok((offset, Entry::Record(_)))) => Err(corrupt(
            offset,
            "segment does not start with a checkpoint".into(),
        )),
        Some(Err((offset, reason))) => Err(corrupt(offset, reason)),
        None => Err(corrupt(frames.pos(), "segment has no checkpoint".into())),
    }
}

/// A gap in the numbering is accepted only as an interrupted reclamation: reclamation
/// deletes the oldest segment first, and only once the newest checkpoint covers it, so
/// the newest checkpoint must cover every segment before the last gap. Otherwise a
/// segment whose packets are still needed is missing.
fn check_gap(dir: &Path, segments: &[Scanned]) -> Result<(), JournalError> {
    let Some(gap) = segments
        .windows(2)
        .rposition(|w| w[1].info.segno != w[0].info.segno + 1)
    else {
        return Ok(());
    };
    let Some(newest) = segments.last() else {
        return Ok(());
    };
    if segments[..=gap]
        .iter()
        .all(|s| newest.cp.covers(&s.info.max_seq))
    {
        return Ok(());
    }
    Err(JournalError::Missing {
        segment: segments[gap].info.segno + 1,
        dir: dir.to_path_buf(),
    })
}

/// The segments read so far, oldest first, and what their records add up to.
struct Scan<'a> {
    /// Only to name files in errors.
    dir: &'a Path,
    segments: Vec<Scanned>,
    rebuild: Rebuild,
    /// The torn tail, once found: of every later segment only the checkpoint counts.
    tail: Option<TailRepair>,
    /// Syncs, cuts and rewrites, oldest segment first.
    repairs: Vec<Repair>,
}

impl Scan<'_> {
    /// Checks the length of the segment read last against the one `next`'s checkpoint
    /// says it had when `next` was started. A sealed segment that lost whole frames at
    /// its end reads clean: only this finds it short. Short and `previous_may_tear`, it is
    /// the torn tail (nothing cut, `next` and every later segment rewritten); any other
    /// difference is corruption. Nothing to check across a gap or after a tail.
    fn check_previous(
        &mut self,
        next: &Loaded,
        previous_may_tear: bool,
    ) -> Result<(), JournalError> {
        let Some(prev) = self.segments.last() else {
            return Ok(());
        };
        let (segment, len) = (prev.info.segno, prev.info.len);
        if segment + 1 != next.segno || len == next.prev_len || self.tail.is_some() {
            return Ok(());
        }
        if previous_may_tear && len < next.prev_len {
            self.tail = Some(TailRepair {
                segment,
                offset: len,
                dropped: 0,
                reason: format!(
                    "segment ends at {len}, segment {} says it ended at {} \
                     (sealed unsynced: torn by a crash)",
                    next.segno, next.prev_len
                ),
            });
            return Ok(());
        }
        Err(corrupt_at(
            self.dir,
            segment,
            len.min(next.prev_len),
            format!(
                "segment is {len} bytes long, segment {} says it ended at {}",
                next.segno, next.prev_len
            ),
        ))
    }

    /// Folds a loaded segment into the scan: its checkpoint always, its records unless a
    /// tail was found before it. A segment that `may_tear` gets a repair: a sync, a cut
    /// (at its first bad frame, which becomes the tail) or, after the tail, a rewrite.
    ///
    /// A checkpoint behind what the segments before it recorded is corruption (see
    /// [`State::behind`]): deleting those segments, as reclamation may, would take the
    /// limit or a watermark back (found by the `journal_plan` fuzz target).
    fn segment(&mut self, loaded: Loaded, may_tear: bool) -> Result<(), JournalError> {
        if let Some(reason) = loaded.cp.behind(&self.rebuild.state) {
            let at = format::HEADER_LEN as u64;
            return Err(corrupt_at(self.dir, loaded.segno, at, reason));
        }
        self.rebuild.checkpoint(&loaded.cp);
        let scanned = match self.tail {
            Some(_) => self.drop_records(loaded),
            None => self.read_records(loaded, may_tear)?,
        };
        self.segments.push(scanned);
        Ok(())
    }

    /// A segment after the torn tail: nothing in it was ever synced (a sync covers
    /// everything appended before it), so its records go; it is to be rewritten as its
    /// header and checkpoint, naming the length of the segment before it after the repairs.
    fn drop_records(&mut self, loaded: Loaded) -> Scanned {
        let Loaded {
            segno,
            bytes,
            flags,
            cp,
            ..
        } = loaded;
        let prev_len = self.segments.last().map_or(0, |p| p.info.len);
        let start = segment_start_with(segno, flags, prev_len, &cp);
        let len = start.len() as u64;
        if let Some(tail) = &mut self.tail {
            tail.dropped += (bytes.len() as u64).saturating_sub(len);
        }
        self.repairs.push(Repair::Rewrite {
            segno,
            bytes: start,
        });
        Scanned {
            info: SegmentInfo {
                segno,
                len,
                max_seq: BTreeMap::new(),
            },
            has_records: false,
            flags,
            version: format::FORMAT_VERSION,
            cp,
        }
    }

    /// Folds the records of a segment after its checkpoint into the rebuild. The first
    /// bad frame of a segment that `may_tear` is the torn tail: the segment is to be cut
    /// there. In any other segment it is corruption, and so is a second checkpoint.
    fn read_records(&mut self, loaded: Loaded, may_tear: bool) -> Result<Scanned, JournalError> {
        let Loaded {
            segno,
            bytes,
            flags,
            version,
            cp,
            ..
        } = loaded;
        let mut info = SegmentInfo {
            segno,
            len: bytes.len() as u64,
            max_seq: BTreeMap::new(),
        };
        let mut has_records = false;
        let mut torn = false;
        let mut frames = Frames::new(&bytes);
        frames.next(); // the checkpoint, checked by `load`
        for frame in frames {
            match frame {
                Ok((offset, Entry::Checkpoint(_))) => {
                    let reason = "checkpoint after the first frame".into();
                    return Err(corrupt_at(self.dir, segno, offset, reason));
                }
                Ok((_, Entry::Record(record))) => {
                    if let Some((pair, stamp)) = record.stamped() {
                        let max = info.max_seq.entry(pair).or_default();
                        *max = (*max).max(stamp.seq);
                    }
                    has_records = true;
                    self.rebuild.record(record);
                }
                Err((offset, reason)) if may_tear => {
                    self.tail = Some(TailRepair {
                        segment: segno,
                        offset,
                        dropped: info.len - offset,
                        reason,
                    });
                    info.len = offset;
                    torn = true;
                }
                Err((offset, reason)) => return Err(corrupt_at(self.dir, segno, offset, reason)),
            }
        }
        if may_tear {
            self.repairs.push(if torn {
                Repair::Cut {
                    segno,
                    len: info.len,
                }
            } else {
                Repair::Sync(segno)
            });
        }
        Ok(Scanned {
            info,
            has_records,
            flags,
            version,
            cp,
        })
    }

    /// The plan: the temporary files go first, then the repairs of the scan; the oldest
    /// segments the newest checkpoint covers are to be deleted (the rule of
    /// `Journal::reclaim`, which deletes while the active segment's checkpoint covers the
    /// oldest segment).
    fn finish(self, temps: &[u64]) -> RecoveryPlan {
        let Scan {
            mut segments,
            rebuild,
            tail,
            repairs: scanned,
            ..
        } = self;
        let mut repairs: Vec<Repair> = temps.iter().map(|&n| Repair::RemoveTemp(n)).collect();
        repairs.extend(scanned);
        let active = segments.pop();
        let covered = active.as_ref().map_or(0, |a| {
            segments
                .iter()
                .take_while(|s| a.cp.covers(&s.info.max_seq))
                .count()
        });
        let delete = segments.drain(..covered).map(|s| s.info.segno).collect();
        let sealed: VecDeque<SegmentInfo> = segments.into_iter().map(|s| s.info).collect();
        let state = rebuild.state.clone();
        let mut recovered = rebuild.finish();
        recovered.tail = tail;
        recovered.segments = sealed.len() + 1;
        RecoveryPlan {
            repairs,
            delete,
            sealed,
            active,
            state,
            recovered,
        }
    }
}
