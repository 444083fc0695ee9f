//! A remote unit's undo log for a resync epoch, and its resync status: the file format
//! and the pure logic (which regions a batch must save first, the saved set, what a
//! rollback restores, what a restarted unit reports). The I/O is the remote unit's
//! (`tidemark-actors`, `units/remote.rs`) and promote's (`tidemark-cli`).
//!
//! # Why
//!
//! While a pair resyncs, its remote unit misses the writes the primary tracked in the
//! regions not copied yet, so the group's remote units are not a cut at any limit
//! between the epoch's base `E` (the last cut before the resync) and the limit the
//! epoch closes at. Before a unit applies a packet stamped above `E` that overwrites
//! bytes of a region not saved yet in this epoch, it appends the region's current bytes
//! to its undo file and makes them durable; only then does it apply. A unit applies in
//! `seq` order and `ts` grows with `seq`, so every packet at or below `E` is applied
//! before the first one above it: the bytes saved are the region as of `E`. Restoring
//! every saved region (after applying the journaled packets at or below `E`) gives the
//! unit as of `E`. Each region is saved at most once per epoch, so the file never holds
//! more than the unit's size in data.
//!
//! # File format (version 1)
//!
//! ```text
//! header, 32 bytes:  magic "TDMKUNDO" | version u32 | region u64 | base u64 | crc32c u32
//! then frames:       len u32 | crc32c u32 (over len and body) | body (len bytes)
//! body:              kind u8, then
//!                      1 Saved:    offset u64 | the region's bytes (the rest)
//!                      2 Status:   0 (none) or 1 | since u64 | 0 or 1 | done u64
//!                      3 Restored: nothing
//! ```
//!
//! All integers little-endian. A torn or corrupt frame ends the file: it and everything
//! after it is ignored and cut off on reopen (never restored: every frame the unit
//! relies on was synced before the unit applied anything it covers). A bad header is
//! an error: the file is not an undo file of this build.

use crate::journal::Epoch;
use crate::packet::{Mark, Packet, Resync};
use crate::types::{Offset, Seq, Stamp, Timestamp};
use std::collections::{BTreeMap, BTreeSet};

/// The default region size: what one save copies at least.
pub const DEFAULT_REGION: u64 = 64 * 1024;
/// The largest region size (a frame must stay far below `u32::MAX`).
pub const MAX_REGION: u64 = 16 << 20;
/// The version of the file format this build writes and reads.
pub const UNDO_VERSION: u32 = 1;
/// Bytes of the header.
pub const HEADER_LEN: usize = 32;
/// Bytes before a frame's body.
pub const FRAME_HEAD: usize = 8;

const MAGIC: &[u8; 8] = b"TDMKUNDO";
const KIND_SAVED: u8 = 1;
const KIND_STATUS: u8 = 2;
const KIND_RESTORED: u8 = 3;
/// The largest body a frame may have: a region and its offset.
const MAX_BODY: usize = 1 + 8 + MAX_REGION as usize;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UndoError {
    #[error("undo file of {0} bytes is shorter than its {HEADER_LEN}-byte header")]
    ShortHeader(usize),
    #[error("not an undo file (bad magic)")]
    Magic,
    #[error("undo file version {0} is not supported (this build reads {UNDO_VERSION})")]
    Version(u32),
    #[error("undo file header checksum mismatch")]
    HeaderChecksum,
    #[error("undo region size {0} must be a multiple of 512 between 512 and {MAX_REGION}")]
    Region(u64),
}

/// What the header says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// The epoch base: the saved bytes are the unit as of this limit.
    pub base: Timestamp,
    /// Region size in bytes (a multiple of 512).
    pub region: u64,
}

/// One frame of the file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UndoRecord {
    /// Bytes `offset .. offset + data.len()` of the unit as of the base.
    Saved { offset: Offset, data: Vec<u8> },
    /// The unit's resync status as its *applied* marks leave it, written with (before)
    /// the batch that applies a [`Mark::ResyncBegin`] or [`Mark::ResyncDone`]; the last
    /// one holds. `Some`: a resync began and its done mark is not applied yet.
    Status(Option<Resync>),
    /// `promote` restored every saved region: the unit is the cut at the base.
    Restored,
}

/// Checks a region size.
pub fn check_region(region: u64) -> Result<u64, UndoError> {
    if (512..=MAX_REGION).contains(&region) && region.is_multiple_of(512) {
        Ok(region)
    } else {
        Err(UndoError::Region(region))
    }
}

/// The header bytes.
pub fn encode_header(h: &Header) -> [u8; HEADER_LEN] {
    let mut out = [0u8; HEADER_LEN];
    out[..8].copy_from_slice(MAGIC);
    out[8..12].copy_from_slice(&UNDO_VERSION.to_le_bytes());
    out[12..20].copy_from_slice(&h.region.to_le_bytes());
    out[20..28].copy_from_slice(&h.base.0.to_le_bytes());
    let crc = crc32c::crc32c(&out[..28]);
    out[28..].copy_from_slice(&crc.to_le_bytes());
    out
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut x = [0u8; 4];
    x.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(x)
}

/// Parses a header.
pub fn decode_header(bytes: &[u8]) -> Result<Header, UndoError> {
    if bytes.len() < HEADER_LEN {
        return Err(UndoError::ShortHeader(bytes.len()));
    }
    if &bytes[..8] != MAGIC {
        return Err(UndoError::Magic);
    }
    if crc32c::crc32c(&bytes[..28]) != u32_at(bytes, 28) {
        return Err(UndoError::HeaderChecksum);
    }
    let version = u32_at(bytes, 8);
    if version != UNDO_VERSION {
        return Err(UndoError::Version(version));
    }
    let region = check_region(u64_at(bytes, 12))?;
    Ok(Header {
        base: Timestamp(u64_at(bytes, 20)),
        region,
    })
}

/// One frame's bytes.
pub fn encode_record(r: &UndoRecord) -> Vec<u8> {
    let mut body = Vec::new();
    match r {
        UndoRecord::Saved { offset, data } => {
            body.reserve(9 + data.len());
            body.push(KIND_SAVED);
            body.extend_from_slice(&offset.0.to_le_bytes());
            body.extend_from_slice(data);
        }
        UndoRecord::Status(s) => {
            body.push(KIND_STATUS);
            body.push(u8::from(s.is_some()));
            let s = s.unwrap_or(Resync {
                since: Timestamp::ZERO,
                done: None,
            });
            body.extend_from_slice(&s.since.0.to_le_bytes());
            body.push(u8::from(s.done.is_some()));
            body.extend_from_slice(&s.done.unwrap_or(Timestamp::ZERO).0.to_le_bytes());
        }
        UndoRecord::Restored => body.push(KIND_RESTORED),
    }
    let mut out = Vec::with_capacity(FRAME_HEAD + body.len());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    let mut crc = crc32c::crc32c(&out[..4]);
    crc = crc32c::crc32c_append(crc, &body);
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(&body);
    out
}

fn decode_body(body: &[u8]) -> Result<UndoRecord, String> {
    let (&kind, rest) = body.split_first().ok_or("empty frame body")?;
    match kind {
        KIND_SAVED if rest.len() >= 8 => Ok(UndoRecord::Saved {
            offset: Offset(u64_at(rest, 0)),
            data: rest[8..].to_vec(),
        }),
        KIND_STATUS if rest.len() == 18 => {
            let flag = |b: u8| match b {
                0 => Ok(false),
                1 => Ok(true),
                other => Err(format!("status flag {other}")),
            };
            let some = flag(rest[0])?;
            let since = Timestamp(u64_at(rest, 1));
            let done = flag(rest[9])?.then(|| Timestamp(u64_at(rest, 10)));
            Ok(UndoRecord::Status(some.then_some(Resync { since, done })))
        }
        KIND_RESTORED if rest.is_empty() => Ok(UndoRecord::Restored),
        other => Err(format!(
            "frame kind {other} with a body of {} bytes",
            body.len()
        )),
    }
}

/// A file as read: its header, the frames up to the first bad one, and where that one
/// began (the length to cut the file to).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decoded {
    pub header: Header,
    pub records: Vec<UndoRecord>,
    /// Bytes of the header and the good frames: the file is cut to this.
    pub valid_len: u64,
    /// Why the tail was cut, if it was.
    pub torn: Option<String>,
}

/// Parses a whole file. A bad header is an error; a bad frame ends the file.
pub fn decode(bytes: &[u8]) -> Result<Decoded, UndoError> {
    let header = decode_header(bytes)?;
    let mut at = HEADER_LEN;
    let mut records = Vec::new();
    let mut torn = None;
    while at < bytes.len() {
        let rest = &bytes[at..];
        if rest.len() < FRAME_HEAD {
            torn = Some(format!("{} bytes of a frame head", rest.len()));
            break;
        }
        let len = u32_at(rest, 0) as usize;
        if len > MAX_BODY {
            torn = Some(format!("frame length {len} too large"));
            break;
        }
        if rest.len() < FRAME_HEAD + len {
            torn = Some(format!(
                "frame of {len} bytes with {} present",
                rest.len() - FRAME_HEAD
            ));
            break;
        }
        let body = &rest[FRAME_HEAD..FRAME_HEAD + len];
        let crc = crc32c::crc32c_append(crc32c::crc32c(&rest[..4]), body);
        if crc != u32_at(rest, 4) {
            torn = Some("frame checksum mismatch".into());
            break;
        }
        match decode_body(body) {
            Ok(r) => records.push(r),
            Err(e) => {
                torn = Some(e);
                break;
            }
        }
        at += FRAME_HEAD + len;
    }
    Ok(Decoded {
        header,
        records,
        valid_len: at as u64,
        torn,
    })
}

/// What a rollback writes: each saved region's first copy (the bytes as of the base; a
/// region is saved once per epoch, but a crash between a save and its bookkeeping could
/// save it again after the unit changed it, so the first copy wins), in offset order.
pub fn restore_plan(records: &[UndoRecord]) -> Vec<(Offset, &[u8])> {
    let mut first: BTreeMap<u64, &[u8]> = BTreeMap::new();
    for r in records {
        if let UndoRecord::Saved { offset, data } = r {
            first.entry(offset.0).or_insert(&data[..]);
        }
    }
    first.into_iter().map(|(o, d)| (Offset(o), d)).collect()
}

/// The last status frame's status (`None` if none).
pub fn last_status(records: &[UndoRecord]) -> Option<Resync> {
    records.iter().rev().find_map(|r| match r {
        UndoRecord::Status(s) => Some(*s),
        _ => None,
    })?
}

/// Whether promote restored the unit (a [`UndoRecord::Restored`] frame is present).
pub fn is_restored(records: &[UndoRecord]) -> bool {
    records.contains(&UndoRecord::Restored)
}

/// The saved set of one unit in one epoch.
///
/// Invariant: a region is in the set only once its bytes as of the base are durable in
/// the file; the unit never applies a packet stamped above the base to a region that is
/// not in the set (it saves first: [`UndoLog::to_save`], then [`UndoLog::saved`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UndoLog {
    header: Header,
    unit_size: u64,
    saved: BTreeSet<u64>,
    bytes: u64,
}

impl UndoLog {
    /// A new, empty log for an epoch at `base` (its file is just the header).
    pub fn new(base: Timestamp, region: u64, unit_size: u64) -> Result<Self, UndoError> {
        Ok(UndoLog {
            header: Header {
                base,
                region: check_region(region)?,
            },
            unit_size,
            saved: BTreeSet::new(),
            bytes: HEADER_LEN as u64,
        })
    }

    /// The log a reopened file holds (its good frames).
    pub fn from_decoded(d: &Decoded, unit_size: u64) -> Self {
        let region = d.header.region;
        let saved = d
            .records
            .iter()
            .filter_map(|r| match r {
                UndoRecord::Saved { offset, .. } => Some(offset.0 / region),
                _ => None,
            })
            .collect();
        UndoLog {
            header: d.header,
            unit_size,
            saved,
            bytes: d.valid_len,
        }
    }

    pub fn header(&self) -> Header {
        self.header
    }

    pub fn base(&self) -> Timestamp {
        self.header.base
    }

    /// Bytes of the file (header and frames).
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Regions saved.
    pub fn saved_regions(&self) -> usize {
        self.saved.len()
    }

    /// Whether the region holding byte `offset` is saved.
    pub fn is_saved(&self, offset: Offset) -> bool {
        self.saved.contains(&(offset.0 / self.header.region))
    }

    /// The regions (offset, length; the last region of the unit may be short) that the
    /// packets of `batch` stamped above the base overwrite and that are not saved yet,
    /// each once, in the order the batch first touches them. Marks and packets at or
    /// below the base touch nothing to save.
    pub fn to_save<'a>(&self, batch: impl IntoIterator<Item = &'a Packet>) -> Vec<(Offset, u64)> {
        let region = self.header.region;
        let mut seen = BTreeSet::new();
        let mut out = Vec::new();
        for p in batch {
            let len = p.payload.len();
            if p.stamp.ts <= self.header.base || len == 0 {
                continue;
            }
            let start = p.payload.offset().0.min(self.unit_size);
            let end = p.payload.offset().0.saturating_add(len).min(self.unit_size);
            if start >= end {
                continue;
            }
            for r in start / region..=(end - 1) / region {
                if !self.saved.contains(&r) && seen.insert(r) {
                    let off = r * region;
                    out.push((Offset(off), region.min(self.unit_size - off)));
                }
            }
        }
        out
    }

    /// Where `batch` (in `seq` order, so in `ts` order) passes the base: the packets
    /// before this index are at or below it and are applied *before* the saves of the
    /// rest are read (a save must hold them: they are part of the cut at the base).
    pub fn split(&self, batch: &[Packet]) -> usize {
        batch.partition_point(|p| p.stamp.ts <= self.header.base)
    }

    /// The region at `offset` is durable in the file, in a frame of `frame_bytes`.
    pub fn saved(&mut self, offset: Offset, frame_bytes: u64) {
        self.saved.insert(offset.0 / self.header.region);
        self.bytes += frame_bytes;
    }

    /// Another frame (a status) of `frame_bytes` is in the file.
    pub fn appended(&mut self, frame_bytes: u64) {
        self.bytes += frame_bytes;
    }
}

/// A remote unit's resync status: what its journaled run and its applied point say.
/// Reported with the head ([`crate::HeadReport::resync`]) until the unit has applied
/// past the [`Mark::ResyncDone`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ResyncStatus {
    status: Option<Resync>,
    /// Where the open resync's begin mark is (`Seq::ZERO`: applied before a restart).
    begin: Seq,
    /// Where its done mark is, once in the run.
    done: Option<Seq>,
}

impl ResyncStatus {
    /// What to report (`None`: no resync in the run or unapplied).
    pub fn get(&self) -> Option<Resync> {
        self.status
    }

    /// `packets` joined the run, in `seq` order; the head just before them was `before`.
    /// A [`Mark::ResyncBegin`] (or a [`Mark::Restart`], which a begin mark follows: the
    /// writes a restarted primary lost are stamped above the head before it) opens a
    /// resync with `since` the head time stamp just before it, unless one is open
    /// without its done mark (it keeps its `since`); a [`Mark::ResyncDone`] completes the open one (without one it is of a
    /// resync whose epoch closed: nothing to report).
    pub fn joined<'a>(&mut self, before: Stamp, packets: impl IntoIterator<Item = &'a Packet>) {
        let mut head = before.ts;
        for p in packets {
            match p.payload.mark() {
                // A resync still open (an outage cut it short; or the `Restart` mark
                // that precedes the begin mark of a restarted stream) keeps its `since`:
                // the writes it misses are stamped above that one.
                Some(Mark::ResyncBegin | Mark::Restart)
                    if self.status.is_some_and(|s| s.done.is_none()) => {}
                Some(Mark::ResyncBegin | Mark::Restart) => {
                    self.status = Some(Resync {
                        since: head,
                        done: None,
                    });
                    self.begin = p.stamp.seq;
                    self.done = None;
                }
                Some(Mark::ResyncDone) => {
                    if let Some(s) = &mut self.status {
                        if s.done.is_none() {
                            s.done = Some(p.stamp.ts);
                            self.done = Some(p.stamp.seq);
                        }
                    }
                }
                _ => {}
            }
            head = head.max(p.stamp.ts);
        }
    }

    /// Everything up to `seq` is applied: past the done mark, the resync is over.
    pub fn applied(&mut self, seq: Seq) {
        if self.done.is_some_and(|d| d <= seq) {
            *self = ResyncStatus::default();
        }
    }

    /// The status as the marks applied up to `seq` leave it (what a status frame
    /// records): the open resync, without its done, if its begin is applied and its
    /// done is not.
    pub fn applied_view(&self, seq: Seq) -> Option<Resync> {
        let s = self.status?;
        if self.begin > seq || self.done.is_some_and(|d| d <= seq) {
            return None;
        }
        Some(Resync {
            since: s.since,
            done: None,
        })
    }

    /// The status of a restarted unit: `applied` from its undo file's last status frame
    /// (a resync whose begin mark was applied before the restart; only while the
    /// system's epoch is open), then the marks of its recovered run (`run`, in `seq`
    /// order after the applied point `applied_at`).
    ///
    /// The head time stamps a heartbeat gave are lost in a restart, so a begin mark's
    /// `since` is recomputed from the packet before it and raised to a floor that is
    /// still at or below the true `since` and at or above every limit released before
    /// the mark: the epoch's base while one is open (the base is at or below the `since`
    /// of every pair that resyncs in it, and at or above every limit released before
    /// it); otherwise `floor`, the system's durable limit (`max(limit, prepared)`), if it
    /// is below the mark: a limit above `since` and below the mark would have come with
    /// an epoch, durable with it. A begin mark at or below `floor` with no epoch open
    /// belongs to a resync whose epoch closed (it closes only at or above the done
    /// mark): nothing to report.
    pub fn recover(
        applied: Option<Resync>,
        epoch: Option<Epoch>,
        floor: Timestamp,
        applied_at: Stamp,
        run: &[Packet],
    ) -> ResyncStatus {
        let mut st = ResyncStatus::default();
        if epoch.is_some() {
            if let Some(a) = applied {
                st.status = Some(Resync {
                    since: a.since,
                    done: None,
                });
            }
        }
        let mut head = applied_at.ts;
        for p in run {
            match p.payload.mark() {
                Some(Mark::ResyncBegin | Mark::Restart)
                    if st.status.is_some_and(|s| s.done.is_none()) => {}
                Some(Mark::ResyncBegin | Mark::Restart) => {
                    let lower = match epoch {
                        Some(e) => Some(e.base),
                        None => (floor < p.stamp.ts).then_some(floor),
                    };
                    match lower {
                        Some(lower) => {
                            st.status = Some(Resync {
                                since: head.max(lower),
                                done: None,
                            });
                            st.begin = p.stamp.seq;
                            st.done = None;
                        }
                        None => st = ResyncStatus::default(),
                    }
                }
                Some(Mark::ResyncDone) => st.joined(Stamp::ZERO, std::iter::once(p)),
                _ => {}
            }
            head = head.max(p.stamp.ts);
        }
        st
    }
}

#[cfg(test)]
mod tests;
