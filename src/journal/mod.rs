//! The durable journal: an append-only log of [`Record`]s in segment files of one
//! directory, used on both sides of a pair.
//!
//! - **Primary**: every stamped [`Packet`](crate::Packet) goes in before its write is
//!   acknowledged to the client; [`Record::Released`] says the remote holds a pair's
//!   packets up to a seq durably, so they may be forgotten (I3).
//! - **Remote**: every received packet goes in before it is acknowledged cumulatively
//!   (a pair's packets in `seq` order: see [`crate::intake`] for why);
//!   [`Record::Limit`] (and [`Record::Prepared`] when several remote systems must agree)
//!   goes in and is synced before anything below it is applied (I4);
//!   [`Record::Applied`] records the applied point.
//! - **Both**: [`Record::PairState`] records what a pair is (initial sync, replication;
//!   a consistent cut or not at the remote). The latest one is journal state like the
//!   watermarks: every checkpoint carries it, so it outlives the segment it was written
//!   in, and [`RecoveredPair::state`] returns it after a restart.
//!
//! # Use
//!
//! ```no_run
//! # use tidemark::journal::*;
//! # use tidemark::*;
//! # fn main() -> Result<(), JournalError> {
//! let dir = std::path::Path::new("run/journal");
//! let (mut journal, recovered) = Journal::open(dir, JournalOptions::default())?;
//! for (pair, state) in &recovered.pairs {
//!     // primary: Sender::new(*pair, state.last(), ..) then push_recovered(state.live..)
//!     // remote:  RunTracker::new(*pair, state.applied) then handle_packet(state.live..)
//! }
//! journal.append(&[Record::Limit { ts: Timestamp(42) }])?; // a memcpy, nothing on disk
//! journal.sync()?; // one write + one fdatasync: now durable
//! # Ok(()) }
//! ```
//!
//! [`Journal::append`] takes a batch atomically: every record of it is buffered, or none
//! is ([`JournalError::Full`], [`JournalError::TooLarge`]). Group commit is the caller's:
//! many appends, one [`Journal::sync`], then acknowledge everything appended before it.
//!
//! # Fsync policy (what is durable when)
//!
//! - `append` copies into memory only. Nothing appended is on disk, nor visible to a
//!   reopen, before `write` or `sync`. Dropping a journal drops what was not written.
//! - `sync` writes the active segment's pending bytes with one positional `write` and
//!   then `fdatasync`s it. When `sync` returns `Ok`, every record appended before it is
//!   durable (on a device that honours cache flushes) and recovery returns it, in order.
//! - `write` does the `write` without the `fdatasync`: the records survive a crash of the
//!   process (the page cache keeps them; `open` syncs them), not a power loss. The next
//!   `sync` fdatasyncs them. A `write` whose records fill a segment seals it *unsynced*:
//!   the successor is created durably (below) with [`format::FLAG_PREV_UNSYNCED`] in its
//!   header, and the sealed segment joins the ones the next `sync` fdatasyncs. (On the
//!   primary, whose journal is written, not synced, this keeps the device from writing
//!   every journaled byte: segments are usually released and deleted before writeback.)
//! - A new segment is written (header, checkpoint, records) to `N.seg.tmp`, fdatasync'd,
//!   renamed to `N.seg`, and then the directory is fsync'd. Created by `sync`, it comes
//!   after every segment before it was fdatasync'd and has no flag: everything before it
//!   is durable. Created by `write`, it has the flag. Either way a segment exists under
//!   its final name only complete from its header through its checkpoint. A `sync` that
//!   finds segments sealed unsynced (or a flagged active segment) makes them durable and
//!   then starts a new, unflagged segment, so everything before it is known durable again.
//! - A segment is deleted only once the checkpoint at the start of the newest segment
//!   (durable, see above) covers every packet in it; the oldest goes first, then the
//!   directory is fsync'd. A crash in between can leave a gap in the numbering; recovery
//!   accepts a gap only if the newest checkpoint covers every segment before it (and
//!   finishes deleting them), otherwise it reports [`JournalError::Missing`].
//! - If a write or an fsync fails, the journal is failed: every later call returns
//!   [`JournalError::Failed`] (after a failed fsync the kernel may have dropped the dirty
//!   pages, so retrying could report success for lost data). Drop it and reopen; recovery
//!   decides what survived.
//! - `open` makes what it recovered durable before returning: it cuts a torn tail off
//!   the last segment, fdatasyncs that segment (after a process crash its last records may
//!   still be only in the page cache), removes `*.seg.tmp` leftovers and fsyncs the
//!   directory. Only then does it delete covered segments, and only then may a caller
//!   acknowledge the recovered records.
//!
//! # Recovery
//!
//! `open` reads every segment in order. Each starts with a header (magic, format version,
//! flags, segment number) and a checkpoint (with the length the previous segment had when
//! this one started); every frame carries its length and a CRC32C over length and body
//! (see [`format`](mod@format)). Segments from the newest unflagged one on may hold
//! records that were never synced (the last segment always may): in them the first bad
//! frame (short, checksum mismatch, malformed), or a segment shorter than its flagged
//! successor's checkpoint says, is a torn tail. It and every record after it are
//! dropped and reported in [`Recovered::tail`], never returned: the torn segment is cut
//! there and every later one rewritten (temporary name, rename) as its header and
//! checkpoint naming the new length of the one before; their checkpoints, durable since
//! their creation, still count (a watermark in them justified deletions). Nothing after
//! a tear was ever synced (a sync covers everything appended before it), so nothing
//! promised is lost. A write torn by a crash can leave good frames
//! after a bad one, but those were never synced, so dropping them loses nothing
//! acknowledged; the price is that media corruption in the middle of the last segment is
//! also treated as a tail. Because deletions go by the last segment's checkpoint, never
//! by records after it, cutting the last segment anywhere after its checkpoint loses
//! exactly the records cut, never a packet of a deleted segment. In a segment before the
//! newest unflagged one, and in the header or checkpoint of any segment (durable before
//! the segment got its name), any bad byte, or a length other than its successor's
//! checkpoint says, is [`JournalError::Corrupt`] with segment and offset, and `open`
//! changes nothing; so is a checkpoint behind what the segments before it recorded (a
//! watermark, limit or reservation lower, a pair's state missing), which the journal
//! never writes and which would lose those once the segments before it are deleted. (The price of sealing unsynced: media corruption in a segment sealed
//! unsynced and synced later, before the next unflagged segment, also reads as a tail.)
//!
//! A pair's state is the latest one recovery reads, the checkpoints included: a
//! checkpoint was written after every record before it, so its states replace what
//! came before. The one a torn tail took off stays lost unless a later checkpoint
//! (durable) carries it, exactly as a watermark would.
//!
//! Segments of an older format version (see [`format`](mod@format)) are read as they
//! are; if the last one is, `open` leaves it as it is (durable) and starts a new segment
//! of this version for the appends.
//!
//! # Space
//!
//! A segment is sealed when the next record would take it past
//! [`JournalOptions::segment_size`] (a segment holds at least one record, so one larger
//! than the rest of a segment gets a segment of its own). Every new segment starts with a
//! checkpoint of the watermarks, limits and pair states, so no older segment is needed for
//! them. The oldest sealed segments are deleted (by `sync` and `open`) while the newest
//! checkpoint covers every packet in them by its pair's `Released` or `Applied`
//! watermark, so space comes back up to one segment later than the watermarks allow.
//! When space is short
//! (less than a segment left, or an append was refused), a `sync` whose watermarks would
//! free a segment starts a new segment at once instead of waiting for the active one to
//! fill. [`JournalOptions::capacity`] bounds the bytes of all segments, synced or not; a
//! batch with a packet that would pass it is refused with [`JournalError::Full`] and
//! nothing changes (the caller applies back-pressure). A batch without packets
//! (watermarks, limits, pair states) is never refused for space: it may use
//! [`JournalOptions::reserve`] bytes more, and once even the reserve is taken its records
//! go into the in-memory state only, which the checkpoint of the next segment carries
//! (the next `sync` starts that segment at once, so a limit still becomes durable when
//! synced). A full journal can therefore always take the watermarks that free it.
//! [`JournalOptions::admissible`] is how many bytes of unreleased packets a writer may
//! keep and still never be refused.

pub mod fault;
pub mod format;
pub(crate) mod fuzz;
mod pending;
mod recovery;
mod repair;
mod state;

#[cfg(test)]
mod tests;

pub use format::{FORMAT_VERSION, OLDEST_FORMAT_VERSION};
pub use state::{Epoch, Logged, PairState, Record, Recovered, RecoveredPair, TailRepair};

use crate::types::{PairId, Seq, Stamp, Timestamp};
use format::{CheckpointRef, EntryRef};
use pending::Pending;
use state::State;
use std::collections::{BTreeMap, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// An fsync or fdatasync failed: what the file holds can no longer be trusted (the
    /// kernel may have dropped the dirty pages), whatever the error number.
    #[error("{path}: fsync: {source}")]
    Sync {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The file system had no room for a batch ([`Journal::append_and_write`]): the
    /// batch was rolled back (nothing of it is on disk or in the journal) and the
    /// journal goes on.
    #[error("{path}: no space left for the journal (the batch was rolled back): {source}")]
    NoSpace {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("journal segment {segment} ({path}) is corrupt at offset {offset}: {reason}")]
    Corrupt {
        segment: u64,
        offset: u64,
        path: PathBuf,
        reason: String,
    },
    #[error("journal segment {segment} is missing from {dir} and later segments exist")]
    Missing { segment: u64, dir: PathBuf },
    #[error("journal full: {needed} more bytes with {used} used exceeds the limit of {limit}")]
    Full { needed: u64, used: u64, limit: u64 },
    #[error("journal record of {len} bytes exceeds the segment size {max}")]
    TooLarge { len: u64, max: u64 },
    #[error("invalid journal options: {0}")]
    Options(String),
    #[error("journal failed on an earlier I/O error; reopen it to recover")]
    Failed,
}

impl JournalError {
    /// A write or a file creation (not an fsync) that the file system refused for
    /// space (ENOSPC, EDQUOT): nothing was made durable by the failed call.
    fn is_space(&self) -> bool {
        matches!(self, JournalError::Io { source, .. } if is_space_errno(source))
    }

    /// [`JournalError::NoSpace`]: the batch was rolled back and the journal is usable.
    pub fn is_no_space(&self) -> bool {
        matches!(self, JournalError::NoSpace { .. })
    }
}

/// ENOSPC or EDQUOT.
pub fn is_space_errno(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT))
}

/// Released and applied watermarks, per pair.
type Watermarks = (BTreeMap<PairId, Stamp>, BTreeMap<PairId, Stamp>);

/// Sizes of a journal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JournalOptions {
    /// A segment is sealed when the next record would take it past this many bytes.
    /// Between 4 KiB and 1 GiB. Also the largest record.
    pub segment_size: u64,
    /// Bytes all segments together may take (at least two segments).
    pub capacity: u64,
    /// Extra bytes beyond `capacity` that a batch without packets (watermarks, limits)
    /// may take, so a full journal can still record what frees it.
    pub reserve: u64,
}

impl Default for JournalOptions {
    /// 256 MiB in 16 MiB segments, 1 MiB reserve.
    fn default() -> Self {
        JournalOptions::with_capacity(256 << 20)
    }
}

impl JournalOptions {
    /// `capacity` bytes in segments of a sixteenth of it (between 64 KiB and 64 MiB, and
    /// at most half the capacity), with a reserve of 1 MiB or one segment, whichever is
    /// smaller.
    pub fn with_capacity(capacity: u64) -> Self {
        let segment_size = (capacity / 16).clamp(64 << 10, 64 << 20).min(capacity / 2);
        JournalOptions {
            segment_size,
            capacity,
            reserve: segment_size.min(1 << 20),
        }
    }

    /// Bytes of packets a writer may keep unreleased and still never be refused: the
    /// capacity less the reserve and two segments (the oldest segment still holding an
    /// unreleased packet may hold a segment of released ones before it, and the active
    /// segment is only reclaimed once sealed). Frames add a few dozen bytes per packet
    /// on top of the payload; tiny writes can still meet `Full`, which back-pressures.
    pub fn admissible(&self) -> u64 {
        self.capacity.saturating_sub(
            self.reserve
                .saturating_add(self.segment_size.saturating_mul(2)),
        )
    }

    fn validate(&self) -> Result<(), JournalError> {
        let bad = |m: String| Err(JournalError::Options(m));
        if !(4096..=1 << 30).contains(&self.segment_size) {
            return bad(format!(
                "segment_size {} is not between 4 KiB and 1 GiB",
                self.segment_size
            ));
        }
        if self.capacity / 2 < self.segment_size {
            return bad(format!(
                "capacity {} is less than two segments of {}",
                self.capacity, self.segment_size
            ));
        }
        if self.capacity.checked_add(self.reserve).is_none() {
            return bad("capacity + reserve overflows".into());
        }
        Ok(())
    }
}

/// Counters since open.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct JournalStats {
    pub records: u64,
    /// `sync` calls that wrote something.
    pub syncs: u64,
    pub bytes_written: u64,
    pub segments_created: u64,
    pub segments_deleted: u64,
    /// Appends refused with `Full`.
    pub full: u64,
    /// New segments started before the active one was full, to free space.
    pub early_rotations: u64,
    /// Records without packets that found no room even in the reserve: folded into the
    /// state, to be carried by the next segment's checkpoint.
    pub folded: u64,
    /// Batches a full file system refused and [`Journal::append_and_write`] rolled back.
    pub rollbacks: u64,
    /// New segments a sync owed but skipped because the file system was full.
    pub rotations_skipped: u64,
}

/// A segment's bookkeeping: its length on disk and, per pair, its highest packet seq
/// (the segment may be deleted once the pair's watermark reaches it).
#[derive(Debug)]
struct SegmentInfo {
    segno: u64,
    len: u64,
    max_seq: BTreeMap<PairId, Seq>,
}

/// A segment that may still have bytes to write.
#[derive(Debug)]
struct OpenSegment {
    info: SegmentInfo,
    /// `None` until the segment is first synced (created under its temporary name).
    file: Option<File>,
    /// Bytes appended but not written; they go at `info.len`.
    buf: Pending,
    /// Holds a record after its checkpoint.
    has_records: bool,
    /// Written by [`Journal::write`] and not fdatasync'd since.
    unsynced: bool,
    /// Its header flags (known once created).
    flags: u32,
}

impl OpenSegment {
    fn new(segno: u64, first_bytes: Vec<u8>) -> Self {
        OpenSegment {
            info: SegmentInfo {
                segno,
                len: 0,
                max_seq: BTreeMap::new(),
            },
            file: None,
            buf: Pending::from(first_bytes),
            has_records: false,
            unsynced: false,
            flags: 0,
        }
    }

    fn end(&self) -> u64 {
        self.info.len + self.buf.len() as u64
    }
}

/// A durable append-only journal in one directory. See the module documentation.
#[derive(Debug)]
pub struct Journal {
    dir: PathBuf,
    options: JournalOptions,
    /// Complete and durable, oldest first.
    sealed: VecDeque<SegmentInfo>,
    /// Sealed by an append since the last sync, oldest first; bytes may be pending.
    rotated: Vec<OpenSegment>,
    /// Sealed by [`Journal::write`] without a sync, oldest first: written to the
    /// operating system, not yet fdatasync'd (the next `sync` does it).
    lazily_sealed: Vec<(u64, File)>,
    /// Where appends go.
    active: OpenSegment,
    /// The state in the active segment's checkpoint: what reclamation goes by.
    active_cp: State,
    /// State after every appended record (synced or not).
    state: State,
    /// Bytes of all segments, on disk and pending.
    used: u64,
    /// Scratch space for encoding a batch.
    staging: Pending,
    frame_ends: Vec<usize>,
    failed: bool,
    /// An append was refused since the last new segment.
    pressure: bool,
    /// `state` holds records that are in no frame (folded when even the reserve was
    /// full): the next `sync` starts a segment whose checkpoint carries them.
    unframed: bool,
    stats: JournalStats,
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> JournalError + '_ {
    move |source| JournalError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn sync_err(path: &Path) -> impl FnOnce(io::Error) -> JournalError + '_ {
    move |source| JournalError::Sync {
        path: path.to_path_buf(),
        source,
    }
}

fn fsync_dir(dir: &Path) -> Result<(), JournalError> {
    let d = File::open(dir).map_err(io_err(dir))?;
    fault::check(dir, fault::IoOp::Sync, dir).map_err(sync_err(dir))?;
    d.sync_all().map_err(sync_err(dir))
}

/// The first bytes of segment `segno`: its header and a checkpoint of `state`, naming
/// the length of the segment before it.
fn segment_start(segno: u64, prev_len: u64, state: &State) -> Vec<u8> {
    segment_start_with(segno, 0, prev_len, state)
}

/// [`segment_start`] with header `flags`.
fn segment_start_with(segno: u64, flags: u32, prev_len: u64, state: &State) -> Vec<u8> {
    let mut bytes = format::encode_header_with(segno, flags).to_vec();
    // A checkpoint is a few dozen bytes per pair: far below the 4 GiB frame limit.
    format::encode_frame(
        &mut bytes,
        &EntryRef::Checkpoint(CheckpointRef { prev_len, state }),
    )
    .expect("a checkpoint fits in a frame");
    bytes
}

impl Journal {
    /// Opens (creating if needed) the journal in `dir`, recovers it, and returns it with
    /// what it holds. See the module documentation for what recovery does: it reads the
    /// directory, decides what to do (`recovery::plan`: nothing on disk changes unless all
    /// of it is acceptable), makes the repairs durable, and only then deletes covered
    /// segments.
    pub fn open(dir: &Path, options: JournalOptions) -> Result<(Journal, Recovered), JournalError> {
        options.validate()?;
        repair::create_dir(dir)?;
        let listing = repair::list(dir)?;
        let plan = recovery::plan(dir, &listing, |segno| repair::read_segment(dir, segno))?;
        repair::apply(dir, &plan.repairs)?;
        let mut stats = JournalStats::default();
        let mut sealed = plan.sealed;
        let mut recovered = plan.recovered;
        let (active, active_cp) = match plan.active {
            // Made durable by the repairs, with every possibly unsynced segment.
            Some(last) if last.version == format::FORMAT_VERSION => {
                let file = repair::open_active(dir, last.info.segno)?;
                let active = OpenSegment {
                    info: last.info,
                    file: Some(file),
                    buf: Pending::default(),
                    has_records: last.has_records,
                    unsynced: false,
                    flags: last.flags,
                };
                (active, last.cp)
            }
            // Written by an older build: left as it is (durable, by the repairs, like
            // every segment before it), and appends go to a new segment of this
            // version, so no segment an older build would read holds a record it cannot
            // decode (see `format`).
            Some(old) => {
                let segno = old.info.segno + 1;
                let first = segment_start(segno, old.info.len, &plan.state);
                let mut seg = OpenSegment::new(segno, first);
                Self::write_segment(dir, &mut seg, &mut stats, true, 0)?;
                sealed.push_back(old.info);
                recovered.segments += 1;
                (seg, plan.state.clone())
            }
            None => {
                let mut seg = OpenSegment::new(1, segment_start(1, 0, &plan.state));
                Self::write_segment(dir, &mut seg, &mut stats, true, 0)?;
                (seg, State::default())
            }
        };
        fsync_dir(dir)?;
        // Only now, with the repairs durable, may the covered segments go.
        repair::delete(dir, &plan.delete)?;
        stats.segments_deleted = plan.delete.len() as u64;

        let used = sealed.iter().map(|s| s.len).sum::<u64>() + active.info.len;
        let journal = Journal {
            dir: dir.to_path_buf(),
            options,
            sealed,
            rotated: Vec::new(),
            lazily_sealed: Vec::new(),
            active,
            active_cp,
            state: plan.state,
            used,
            staging: Pending::default(),
            frame_ends: Vec::new(),
            failed: false,
            pressure: false,
            unframed: false,
            stats,
        };
        Ok((journal, recovered))
    }

    /// Buffers `records`, all or none. Nothing is written before [`Journal::sync`].
    ///
    /// Errors: [`JournalError::TooLarge`] if one record's frame exceeds the segment size;
    /// [`JournalError::Full`] if a batch with a packet would take the journal past its
    /// capacity; [`JournalError::Failed`] after an I/O error. On any error the journal is
    /// as before the call. A batch without packets is never refused for space: past the
    /// capacity it uses the reserve, past the reserve it is folded into the state that
    /// the next segment's checkpoint carries (the next `sync` makes it durable).
    pub fn append(&mut self, records: &[Record]) -> Result<(), JournalError> {
        self.check()?;
        if records.is_empty() {
            return Ok(());
        }
        let segment_size = self.options.segment_size;
        // Frames are encoded straight after the active segment's pending bytes (where
        // they go unless the batch seals the segment): no copy in the common case. Until
        // the commit below, `buf[base..]` is scratch, cut off again on any error.
        let base = self.active.buf.len();
        self.frame_ends.clear();
        for record in records {
            match format::encode_frame_pending(&mut self.active.buf, &EntryRef::Record(record)) {
                Some(len) if len as u64 <= segment_size => {}
                other => {
                    let len = other.map_or(u64::MAX, |l| l as u64);
                    self.active.buf.truncate(base);
                    return Err(JournalError::TooLarge {
                        len,
                        max: segment_size,
                    });
                }
            }
            self.frame_ends.push(self.active.buf.len() - base);
        }

        // Plan: where the batch seals segments, what their successors start with, and how
        // many bytes it takes in all. Nothing changes yet.
        let mut rotations: Vec<(usize, Vec<u8>, State)> = Vec::new();
        let mut end = self.active.info.len + base as u64;
        let mut has_records = self.active.has_records;
        let mut segno = self.active.info.segno;
        let mut sim: Option<State> = None;
        let mut sim_upto = 0;
        let mut needed = 0u64;
        let mut start = 0;
        for (i, &frame_end) in self.frame_ends.iter().enumerate() {
            let len = (frame_end - start) as u64;
            if has_records && end + len > segment_size {
                let st = sim.get_or_insert_with(|| self.state.clone());
                for r in &records[sim_upto..i] {
                    st.apply(r);
                }
                sim_upto = i;
                segno += 1;
                let first = segment_start(segno, end, st);
                end = first.len() as u64;
                needed += end;
                rotations.push((i, first, st.clone()));
            }
            end += len;
            needed += len;
            has_records = true;
            start = frame_end;
        }
        let has_packet = records.iter().any(|r| r.stamped().is_some());
        let limit = if has_packet {
            self.options.capacity
        } else {
            self.options.capacity + self.options.reserve
        };
        if self.used + needed > limit {
            self.active.buf.truncate(base);
            self.pressure = true;
            if !has_packet {
                // Watermarks and limits are what free space: never refused. Past the
                // reserve they go into the state only; the checkpoint of the next
                // segment carries them (`sync` starts one for them).
                for record in records {
                    self.state.apply(record);
                }
                self.unframed = true;
                self.stats.folded += records.len() as u64;
                return Ok(());
            }
            self.stats.full += 1;
            return Err(JournalError::Full {
                needed,
                used: self.used,
                limit,
            });
        }

        // Commit: cannot fail from here on. A batch that seals segments is spread over
        // them from `staging`; otherwise its frames are where they belong already.
        let in_place = rotations.is_empty();
        if !in_place {
            self.staging.clear();
            let end = self.active.buf.len();
            self.staging.append_range(&self.active.buf, base, end);
            self.active.buf.truncate(base);
        }
        let mut rotations = rotations.into_iter().peekable();
        let mut start = 0;
        for (i, record) in records.iter().enumerate() {
            if let Some((_, first, cp)) = rotations.next_if(|(at, _, _)| *at == i) {
                let next = OpenSegment::new(self.active.info.segno + 1, first);
                let old = std::mem::replace(&mut self.active, next);
                self.rotated.push(old);
                self.active_cp = cp;
                self.pressure = false;
            }
            let frame_end = self.frame_ends[i];
            if !in_place {
                self.active
                    .buf
                    .append_range(&self.staging, start, frame_end);
            }
            self.active.has_records = true;
            if let Some((pair, stamp)) = record.stamped() {
                let max = self.active.info.max_seq.entry(pair).or_default();
                *max = (*max).max(stamp.seq);
            }
            self.state.apply(record);
            start = frame_end;
        }
        self.used += needed;
        self.stats.records += records.len() as u64;
        Ok(())
    }

    /// [`Journal::append`] and then [`Journal::write`] (with `sync`: [`Journal::sync`]),
    /// as one step that a full file system does not break. If a write or a segment
    /// creation of this call meets ENOSPC or EDQUOT (not an fsync: after a failed fsync
    /// nothing can be trusted, and the journal is failed as ever), the journal is rolled
    /// back to where it was before the call: what the call wrote is cut off and fsync'd
    /// away, segments it created are removed, and the journal reopens from its files
    /// (recovery, as after a crash of the process; watermarks held only in memory are
    /// appended again). The error is then [`JournalError::NoSpace`] and the journal goes
    /// on: once space is freed the next call succeeds. Nothing of the batch is on disk
    /// or in the journal, so a caller may hand its sequence numbers out again.
    ///
    /// The rollback point is the written end of the journal, so anything appended before
    /// the call and not yet written is written first (not rolled back: only records
    /// without packets are ever left so by this method).
    ///
    /// Without `sync` the records are written, not synced, and a segment they fill is
    /// sealed unsynced (as by `write`); with `sync` and a batch that fills a segment,
    /// everything is synced (so a caller that syncs afterwards anyway does not make the
    /// journal seal unsynced and start a segment again at its sync).
    pub fn append_and_write(&mut self, records: &[Record], sync: bool) -> Result<(), JournalError> {
        self.check()?;
        if !self.rotated.is_empty() || !self.active.buf.is_empty() || self.active.file.is_none() {
            self.write()?;
        }
        let save = (self.active.info.segno, self.active.info.len);
        // Written now, the journal's files hold its state, except watermarks folded
        // into it when even the reserve was full: a rollback keeps those.
        let folded = self
            .unframed
            .then(|| (self.state.released.clone(), self.state.applied.clone()));
        self.append(records)?;
        let result = if sync && !self.rotated.is_empty() {
            self.sync()
        } else {
            self.write()
        };
        match result {
            Err(e) if e.is_space() => Err(self.roll_back(save, folded, e)),
            r => r,
        }
    }

    /// Undoes everything after `(segno, len)` (the written end before a batch) on disk,
    /// then reopens the journal from its files. Returns the error to report: `NoSpace`,
    /// or what made the rollback itself fail (the journal then stays failed).
    fn roll_back(
        &mut self,
        (segno, len): (u64, u64),
        folded: Option<Watermarks>,
        cause: JournalError,
    ) -> JournalError {
        self.failed = true;
        let (path, source) = match cause {
            JournalError::Io { path, source } => (path, source),
            other => return other,
        };
        let seg = self.dir.join(format::segment_name(segno));
        let cut = OpenOptions::new()
            .write(true)
            .open(&seg)
            .and_then(|f| f.set_len(len).and_then(|()| f.sync_all()));
        if let Err(e) = cut {
            return io_err(&seg)(e);
        }
        let listing = match fs::read_dir(&self.dir) {
            Ok(l) => l,
            Err(e) => return io_err(&self.dir)(e),
        };
        for entry in listing.flatten() {
            let newer = match format::classify(&entry.file_name().to_string_lossy()) {
                format::FileKind::Segment(n) => n > segno,
                format::FileKind::Temp(_) => true,
                format::FileKind::Other => false,
            };
            if newer {
                if let Err(e) = fs::remove_file(entry.path()) {
                    return io_err(&entry.path())(e);
                }
            }
        }
        if let Err(e) = fsync_dir(&self.dir) {
            return e;
        }
        let (mut fresh, _) = match Journal::open(&self.dir, self.options) {
            Ok(r) => r,
            Err(e) => return e,
        };
        // Watermarks folded into the state before the call are in no file: keep them
        // (a batch without packets is never refused for space).
        let mut carried = Vec::new();
        let (released, applied) = folded.unwrap_or_default();
        for (pair, stamp) in &released {
            if *stamp > fresh.released(*pair) {
                carried.push(Record::Released {
                    pair: *pair,
                    stamp: *stamp,
                });
            }
        }
        for (pair, stamp) in &applied {
            if *stamp > fresh.applied(*pair) {
                carried.push(Record::Applied {
                    pair: *pair,
                    stamp: *stamp,
                });
            }
        }
        if let Err(e) = fresh.append(&carried) {
            return e;
        }
        fresh.stats = self.stats;
        fresh.stats.rollbacks += 1;
        *self = fresh;
        JournalError::NoSpace { path, source }
    }

    /// Writes and fdatasyncs everything appended (and anything [`Journal::write`] left
    /// unsynced); then deletes the oldest segments the newest checkpoint covers. When it
    /// returns `Ok`, every record appended before it is durable. On `Err` the journal is
    /// failed (see the module documentation).
    pub fn sync(&mut self) -> Result<(), JournalError> {
        self.check()?;
        if self.rotated.is_empty()
            && self.lazily_sealed.is_empty()
            && self.active.buf.is_empty()
            && !self.active.unsynced
            && !self.unframed
        {
            return Ok(());
        }
        let result = self.sync_inner();
        if result.is_err() {
            self.failed = true;
        }
        result
    }

    /// Writes everything appended to the operating system without waiting for the
    /// device: once it returns `Ok` the records survive a crash of the process (a reopen
    /// finds them, and makes them durable), but not of the machine. A later
    /// [`Journal::sync`] makes them durable. When the records fill a segment, it is
    /// sealed without a sync and its successor is created durably with
    /// [`format::FLAG_PREV_UNSYNCED`] (so the device is not made to write data that is
    /// usually released and deleted before writeback would reach it). When space is
    /// short and a new segment would free some, it does a full `sync` instead.
    pub fn write(&mut self) -> Result<(), JournalError> {
        self.check()?;
        if self.early_rotation_due() {
            return self.sync();
        }
        if self.rotated.is_empty() && self.active.buf.is_empty() {
            return Ok(());
        }
        let result = self.write_inner();
        if result.is_err() {
            self.failed = true;
        }
        result
    }

    fn write_inner(&mut self) -> Result<(), JournalError> {
        let rotated = !self.rotated.is_empty();
        for mut seg in std::mem::take(&mut self.rotated) {
            Self::write_segment(
                &self.dir,
                &mut seg,
                &mut self.stats,
                false,
                format::FLAG_PREV_UNSYNCED,
            )?;
            if let Some(file) = seg.file.take().filter(|_| seg.unsynced) {
                self.lazily_sealed.push((seg.info.segno, file));
            }
            self.sealed.push_back(seg.info);
        }
        Self::write_segment(
            &self.dir,
            &mut self.active,
            &mut self.stats,
            false,
            format::FLAG_PREV_UNSYNCED,
        )?;
        if rotated {
            // The active segment's checkpoint is durable (it was created so): what it
            // covers may go, synced or not.
            self.reclaim()?;
        }
        Ok(())
    }

    /// Space is short, and the state covers the oldest segment but the active segment's
    /// checkpoint does not: a new segment now (rather than when the active one fills)
    /// would let it go.
    fn early_rotation_due(&self) -> bool {
        let short = self.pressure || self.used + self.options.segment_size > self.options.capacity;
        short
            && self.sealed.front().is_some_and(|oldest| {
                self.state.covers(&oldest.max_seq) && !self.active_cp.covers(&oldest.max_seq)
            })
    }

    fn sync_inner(&mut self) -> Result<(), JournalError> {
        self.stats.syncs += 1;
        let lazy =
            !self.lazily_sealed.is_empty() || self.active.flags & format::FLAG_PREV_UNSYNCED != 0;
        // Oldest first: a segment created below then has every segment before it durable.
        for (segno, file) in std::mem::take(&mut self.lazily_sealed) {
            let path = self.dir.join(format::segment_name(segno));
            fault::check(&self.dir, fault::IoOp::Sync, &path).map_err(sync_err(&path))?;
            file.sync_data().map_err(sync_err(&path))?;
        }
        for mut seg in std::mem::take(&mut self.rotated) {
            Self::write_segment(&self.dir, &mut seg, &mut self.stats, true, 0)?;
            self.sealed.push_back(seg.info);
        }
        Self::write_segment(&self.dir, &mut self.active, &mut self.stats, true, 0)?;
        // Everything is durable now, so the state may go into a checkpoint. After
        // segments sealed unsynced, a new segment (unflagged) also tells recovery that
        // everything before it is durable: corruption there is an error again, not a tail.
        if self.early_rotation_due() || lazy || self.unframed {
            let segno = self.active.info.segno + 1;
            let first = segment_start(segno, self.active.end(), &self.state);
            let mut next = OpenSegment::new(segno, first);
            match Self::write_segment(&self.dir, &mut next, &mut self.stats, true, 0) {
                Ok(()) => {}
                // No room for the new segment. Everything is durable already, and the
                // segment is only owed to free space or to mark what is durable: it is
                // started by a later sync. (Records folded into the state need it.)
                Err(e) if e.is_space() && !self.unframed => {
                    let _ = fs::remove_file(self.dir.join(format::temp_name(segno)));
                    self.stats.rotations_skipped += 1;
                    return self.reclaim();
                }
                Err(e) => return Err(e),
            }
            self.used += next.info.len;
            let old = std::mem::replace(&mut self.active, next);
            self.sealed.push_back(old.info);
            self.active_cp = self.state.clone();
            self.pressure = false;
            self.unframed = false;
            self.stats.early_rotations += 1;
        }
        self.reclaim()
    }

    /// Writes a segment's pending bytes and, if `sync`, makes everything written to it
    /// durable. A segment that does not exist yet is created durably whatever `sync` says
    /// (temporary name, fdatasync, rename, directory fsync), with header `flags`.
    fn write_segment(
        dir: &Path,
        seg: &mut OpenSegment,
        stats: &mut JournalStats,
        sync: bool,
        flags: u32,
    ) -> Result<(), JournalError> {
        let segno = seg.info.segno;
        let path = dir.join(format::segment_name(segno));
        match &seg.file {
            Some(file) => {
                if !seg.buf.is_empty() {
                    fault::check(dir, fault::IoOp::Write, &path).map_err(io_err(&path))?;
                    seg.buf
                        .write_all_at(file, seg.info.len)
                        .map_err(io_err(&path))?;
                    seg.unsynced = true;
                }
                if sync && seg.unsynced {
                    fault::check(dir, fault::IoOp::Sync, &path).map_err(sync_err(&path))?;
                    file.sync_data().map_err(sync_err(&path))?;
                    seg.unsynced = false;
                }
            }
            None => {
                if flags != 0 {
                    // A segment not yet created holds its header at the start of `buf`.
                    if let Some(head) = seg.buf.head_mut(format::HEADER_LEN) {
                        head.copy_from_slice(&format::encode_header_with(segno, flags));
                    }
                }
                let temp = dir.join(format::temp_name(segno));
                fault::check(dir, fault::IoOp::Create, &temp).map_err(io_err(&temp))?;
                let file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .open(&temp)
                    .map_err(io_err(&temp))?;
                seg.buf.write_all_at(&file, 0).map_err(io_err(&temp))?;
                fault::check(dir, fault::IoOp::Sync, &temp).map_err(sync_err(&temp))?;
                file.sync_all().map_err(sync_err(&temp))?;
                fs::rename(&temp, &path).map_err(io_err(&path))?;
                fsync_dir(dir)?;
                seg.file = Some(file);
                seg.flags = flags;
                stats.segments_created += 1;
            }
        }
        seg.info.len += seg.buf.len() as u64;
        stats.bytes_written += seg.buf.len() as u64;
        seg.buf.clear();
        Ok(())
    }

    /// Deletes the oldest sealed segments while the active segment's checkpoint covers
    /// all their packets. Only called when that checkpoint is durable.
    fn reclaim(&mut self) -> Result<(), JournalError> {
        let mut deleted = false;
        while let Some(oldest) = self.sealed.front() {
            if !self.active_cp.covers(&oldest.max_seq) {
                break;
            }
            let segno = oldest.segno;
            let path = self.dir.join(format::segment_name(segno));
            // Deleted: its bytes need never reach the device.
            self.lazily_sealed.retain(|(n, _)| *n != segno);
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err(&path)(e)),
            }
            self.used -= oldest.len;
            self.sealed.pop_front();
            self.stats.segments_deleted += 1;
            deleted = true;
        }
        if deleted {
            fsync_dir(&self.dir)?;
        }
        Ok(())
    }

    fn check(&self) -> Result<(), JournalError> {
        if self.failed {
            Err(JournalError::Failed)
        } else {
            Ok(())
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn options(&self) -> JournalOptions {
        self.options
    }

    /// Bytes all segments take, including what is appended but not synced.
    pub fn used(&self) -> u64 {
        self.used
    }

    /// Bytes appended but not yet synced.
    pub fn pending(&self) -> u64 {
        self.rotated.iter().map(|s| s.buf.len() as u64).sum::<u64>() + self.active.buf.len() as u64
    }

    /// Segments, on disk or pending.
    pub fn segments(&self) -> usize {
        self.sealed.len() + self.rotated.len() + 1
    }

    /// Numbers of the oldest and the newest segment.
    pub fn segment_range(&self) -> (u64, u64) {
        let first = self
            .sealed
            .front()
            .map(|s| s.segno)
            .or(self.rotated.first().map(|s| s.info.segno))
            .unwrap_or(self.active.info.segno);
        (first, self.active.info.segno)
    }

    /// Where the next record goes: segment number and offset (counting pending bytes).
    pub fn position(&self) -> (u64, u64) {
        (self.active.info.segno, self.active.end())
    }

    /// Whether an earlier I/O error failed the journal.
    pub fn is_failed(&self) -> bool {
        self.failed
    }

    pub fn stats(&self) -> JournalStats {
        self.stats
    }

    /// Latest `Released` stamp of `pair` appended (synced or not).
    pub fn released(&self, pair: PairId) -> Stamp {
        self.state
            .released
            .get(&pair)
            .copied()
            .unwrap_or(Stamp::ZERO)
    }

    /// Latest `Applied` stamp of `pair` appended (synced or not).
    pub fn applied(&self, pair: PairId) -> Stamp {
        self.state
            .applied
            .get(&pair)
            .copied()
            .unwrap_or(Stamp::ZERO)
    }

    /// Latest `Limit` appended (synced or not).
    pub fn limit(&self) -> Timestamp {
        self.state.limit
    }

    /// Latest `Prepared` appended (synced or not).
    pub fn prepared(&self) -> Timestamp {
        self.state.prepared
    }

    /// Latest [`Record::PairState`] of `pair` appended (synced or not; `None`: never
    /// recorded). Durable once synced, and then what [`Recovered`] returns after a
    /// restart ([`RecoveredPair::state`]).
    pub fn pair_state(&self, pair: PairId) -> Option<PairState> {
        self.state.states.get(&pair).copied()
    }
}
