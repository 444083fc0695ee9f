//! The on-disk format of a journal segment: a fixed header, then framed entries.
//!
//! ```text
//! segment file NNNNNNNNNNNNNNNNNNNN.seg (segment number, 20 decimal digits)
//! +--------------------------------------------------------------------------+
//! | header, 32 bytes                                                         |
//! |   magic "TDMKJRNL" (8) | version u32 LE (4) | flags u32 LE (4)            |
//! |   segment number u64 LE (8) | reserved u32 = 0 (4) | crc32c u32 LE (4)    |
//! |   (the crc covers the 28 bytes before it)                                |
//! +--------------------------------------------------------------------------+
//! | frame: body length u32 LE | crc32c u32 LE | body (postcard of an Entry)   |
//! |   the crc covers the 4 length bytes and the body; length 0 is invalid    |
//! +--------------------------------------------------------------------------+
//! | frame ... (the first frame of every segment is a checkpoint: the length  |
//! |   of the segment before it, then watermarks, limits and pair states)     |
//! +--------------------------------------------------------------------------+
//! ```
//!
//! Header flags: bit 0 ([`FLAG_PREV_UNSYNCED`]) says the segment was started without
//! syncing the one before it; every other bit must be 0.
//!
//! Versions: this build writes [`FORMAT_VERSION`] 4 and reads 1 to 4. Version 4 added
//! the record [`Record::Logged`] (a write journaled without its data, by a primary
//! with an activity-log journal); nothing else changed, so a version-3 segment decodes
//! as version 4, and a version-3 build refuses a version-4 segment by its header. Version 3
//! added sequence reservations and the resync epoch to the checkpoint (after the pair
//! states) and the records [`Record::Reserve`] and [`Record::Epoch`]; a version-2
//! segment's checkpoint is read without them. Version 2 added
//! pair states: a checkpoint holds them after the limits, and [`Record::PairState`] may
//! follow. A version-1 segment's checkpoint is read without them (no pair has a state);
//! its records decode as in version 2 (every older record keeps its encoding). A build
//! that only knows version 1 refuses a version-2 segment by its header (corrupt, nothing
//! changed) rather than reading a record it cannot decode as a torn tail and cutting it
//! off, with every synced record after it; so a version-2 build never appends to a
//! version-1 segment ([`Journal::open`](super::Journal::open) starts a new segment).
//!
//! Decoding checks bounds, length and checksum before it parses anything and never
//! panics on any input.

use super::state::{Record, State, StateV1, StateV2};
use serde::{Deserialize, Serialize};

/// The first frame of every segment.
#[derive(Debug, Deserialize)]
pub(crate) struct Checkpoint {
    /// Length of the segment before this one when this one was started (0 if none): a
    /// sealed segment that lost whole frames at its end is still detected.
    pub prev_len: u64,
    /// The state that must survive the segments before this one.
    pub state: State,
}

/// A checkpoint of format version 1 (see [`StateV1`]).
#[derive(Debug, Deserialize)]
struct CheckpointV1 {
    prev_len: u64,
    state: StateV1,
}

/// A checkpoint of format version 2 (see [`StateV2`]).
#[derive(Debug, Deserialize)]
struct CheckpointV2 {
    prev_len: u64,
    state: StateV2,
}

/// The borrowed twin of [`Checkpoint`] (same wire format).
#[derive(Serialize)]
pub(crate) struct CheckpointRef<'a> {
    pub prev_len: u64,
    pub state: &'a State,
}

/// The first 8 bytes of every segment.
pub const MAGIC: [u8; 8] = *b"TDMKJRNL";

/// The segment format version this build writes (4: writes logged without their data;
/// 3: sequence reservations and resync epochs). It also reads every version from
/// [`OLDEST_FORMAT_VERSION`] on.
pub const FORMAT_VERSION: u32 = 4;

/// The oldest segment format version this build reads (1: before pair states).
pub const OLDEST_FORMAT_VERSION: u32 = 1;

/// Header flag: this segment was started (durably) while the segment before it, and
/// possibly earlier ones, held records only written to the operating system, not synced.
/// After a power loss those may be torn; recovery treats them like a last segment.
pub const FLAG_PREV_UNSYNCED: u32 = 1;

/// Bytes of a segment header.
pub const HEADER_LEN: usize = 32;

/// Bytes of a frame header (length + checksum).
pub const FRAME_HEADER_LEN: usize = 8;

/// What one frame holds.
#[derive(Debug, Deserialize)]
pub(crate) enum Entry {
    /// First frame only.
    Checkpoint(Checkpoint),
    Record(Record),
}

/// What one frame of a version-1 segment holds: the same, but a checkpoint without pair
/// states.
#[derive(Debug, Deserialize)]
enum EntryV1 {
    Checkpoint(CheckpointV1),
    Record(Record),
}

/// What one frame of a version-2 segment holds: a checkpoint without reservations and
/// epochs.
#[derive(Debug, Deserialize)]
enum EntryV2 {
    Checkpoint(CheckpointV2),
    Record(Record),
}

impl From<EntryV2> for Entry {
    fn from(e: EntryV2) -> Entry {
        match e {
            EntryV2::Checkpoint(cp) => Entry::Checkpoint(Checkpoint {
                prev_len: cp.prev_len,
                state: cp.state.into(),
            }),
            EntryV2::Record(r) => Entry::Record(r),
        }
    }
}

impl From<EntryV1> for Entry {
    fn from(e: EntryV1) -> Entry {
        match e {
            EntryV1::Checkpoint(cp) => Entry::Checkpoint(Checkpoint {
                prev_len: cp.prev_len,
                state: cp.state.into(),
            }),
            EntryV1::Record(r) => Entry::Record(r),
        }
    }
}

/// The borrowed twin of [`Entry`]: serde encodes a reference exactly as the value, so
/// both have one wire format (pinned by a test).
#[derive(Serialize)]
pub(crate) enum EntryRef<'a> {
    Checkpoint(CheckpointRef<'a>),
    Record(&'a Record),
}

/// File name of segment `segno`.
pub(crate) fn segment_name(segno: u64) -> String {
    format!("{segno:020}.seg")
}

/// File name under which segment `segno` is written before it is renamed into place.
pub(crate) fn temp_name(segno: u64) -> String {
    format!("{segno:020}.seg.tmp")
}

/// What a directory entry is to the journal.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum FileKind {
    Segment(u64),
    Temp(u64),
    Other,
}

pub(crate) fn classify(name: &str) -> FileKind {
    let digits = |s: &str| {
        (s.len() == 20 && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse::<u64>().ok())
            .flatten()
    };
    if let Some(n) = name.strip_suffix(".seg.tmp").and_then(digits) {
        FileKind::Temp(n)
    } else if let Some(n) = name.strip_suffix(".seg").and_then(digits) {
        FileKind::Segment(n)
    } else {
        FileKind::Other
    }
}

#[cfg(test)]
pub(crate) fn encode_header(segno: u64) -> [u8; HEADER_LEN] {
    encode_header_with(segno, 0)
}

/// The header of segment `segno` with header `flags`, of this build's version.
pub(crate) fn encode_header_with(segno: u64, flags: u32) -> [u8; HEADER_LEN] {
    encode_header_version(segno, flags, FORMAT_VERSION)
}

/// The header of segment `segno` with header `flags`, of format `version` (tests write
/// older versions with it).
pub(crate) fn encode_header_version(segno: u64, flags: u32, version: u32) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0..8].copy_from_slice(&MAGIC);
    h[8..12].copy_from_slice(&version.to_le_bytes());
    h[12..16].copy_from_slice(&flags.to_le_bytes());
    // 24..28 reserved: zero.
    h[16..24].copy_from_slice(&segno.to_le_bytes());
    let crc = crc32c::crc32c(&h[..28]);
    h[28..32].copy_from_slice(&crc.to_le_bytes());
    h
}

/// The first bytes of segment `segno` as a build of format version 1 wrote them: its
/// header and a checkpoint without pair states (`state`'s are left out).
#[cfg(test)]
pub(crate) fn segment_start_v1(segno: u64, flags: u32, prev_len: u64, state: &State) -> Vec<u8> {
    let mut out = encode_header_version(segno, flags, 1).to_vec();
    // Entry::Checkpoint = 0, then the fields of the version-1 checkpoint in order.
    let fields = (
        0u8,
        prev_len,
        &state.released,
        &state.applied,
        state.limit,
        state.prepared,
    );
    let body = postcard::to_allocvec(&fields).expect("a test checkpoint encodes");
    let len = (body.len() as u32).to_le_bytes();
    let crc = crc32c::crc32c_append(crc32c::crc32c(&len), &body);
    out.extend_from_slice(&len);
    out.extend_from_slice(&crc.to_le_bytes());
    out.extend_from_slice(&body);
    out
}

/// Why a header was rejected.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum HeaderError {
    Short(usize),
    Magic,
    Checksum,
    Version(u32),
    Flags,
    Segment(u64),
}

impl std::fmt::Display for HeaderError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HeaderError::Short(n) => write!(f, "file of {n} bytes is shorter than a header"),
            HeaderError::Magic => write!(f, "not a tidemark journal segment (bad magic)"),
            HeaderError::Checksum => write!(f, "header checksum mismatch"),
            HeaderError::Version(v) => write!(f, "unsupported format version {v}"),
            HeaderError::Flags => write!(f, "unknown header flags"),
            HeaderError::Segment(n) => write!(f, "header names segment {n}"),
        }
    }
}

/// Checks that `bytes` starts with the header of segment `segno`; returns its flags.
pub(crate) fn check_header(bytes: &[u8], segno: u64) -> Result<u32, HeaderError> {
    let Some(h) = bytes.get(..HEADER_LEN) else {
        return Err(HeaderError::Short(bytes.len()));
    };
    if h[0..8] != MAGIC {
        return Err(HeaderError::Magic);
    }
    if crc32c::crc32c(&h[..28]) != le32(&h[28..32]) {
        return Err(HeaderError::Checksum);
    }
    let version = le32(&h[8..12]);
    if !(OLDEST_FORMAT_VERSION..=FORMAT_VERSION).contains(&version) {
        return Err(HeaderError::Version(version));
    }
    let flags = le32(&h[12..16]);
    if flags & !FLAG_PREV_UNSYNCED != 0 || le32(&h[24..28]) != 0 {
        return Err(HeaderError::Flags);
    }
    let found = u64::from_le_bytes([h[16], h[17], h[18], h[19], h[20], h[21], h[22], h[23]]);
    if found != segno {
        return Err(HeaderError::Segment(found));
    }
    Ok(flags)
}

/// The format version of a segment whose header [`check_header`] accepted.
pub(crate) fn header_version(bytes: &[u8]) -> u32 {
    bytes.get(8..12).map_or(FORMAT_VERSION, le32)
}

fn le32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

/// A postcard output that appends to a borrowed `Vec` (one memcpy per byte string).
struct VecFlavor<'a>(&'a mut Vec<u8>);

impl postcard::ser_flavors::Flavor for VecFlavor<'_> {
    type Output = ();

    fn try_extend(&mut self, data: &[u8]) -> postcard::Result<()> {
        self.0.extend_from_slice(data);
        Ok(())
    }

    fn try_push(&mut self, data: u8) -> postcard::Result<()> {
        self.0.push(data);
        Ok(())
    }

    fn finalize(self) -> postcard::Result<()> {
        Ok(())
    }
}

/// Appends one frame holding `entry` to `out` and returns the frame's length, or `None`
/// (with `out` unchanged) if the body does not fit the 32-bit length field.
pub(crate) fn encode_frame(out: &mut Vec<u8>, entry: &EntryRef<'_>) -> Option<usize> {
    let start = out.len();
    out.extend_from_slice(&[0u8; FRAME_HEADER_LEN]);
    // Serialising our own types into a Vec has no failure mode (no I/O, no size limit,
    // every sequence has a known length).
    postcard::serialize_with_flavor(entry, VecFlavor(out))
        .expect("postcard serialisation into a Vec cannot fail");
    let body_len = out.len() - start - FRAME_HEADER_LEN;
    let Ok(len) = u32::try_from(body_len) else {
        out.truncate(start);
        return None;
    };
    let len = len.to_le_bytes();
    let crc = crc32c::crc32c_append(crc32c::crc32c(&len), &out[start + FRAME_HEADER_LEN..]);
    out[start..start + 4].copy_from_slice(&len);
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    Some(out.len() - start)
}

/// As [`encode_frame`], appending to pending segment bytes: the data of a write packet
/// (at least [`SHARE_FROM`](super::pending::SHARE_FROM) bytes) is not copied but shared
/// (written by `pwritev` with the bytes around it); the bytes written are the same.
pub(crate) fn encode_frame_pending(
    out: &mut super::pending::Pending,
    entry: &EntryRef<'_>,
) -> Option<usize> {
    use crate::packet::{Packet, Payload};
    let shared = match entry {
        EntryRef::Record(Record::Packet(Packet {
            pair,
            stamp,
            payload: Payload::Write { offset, data },
        })) if data.len() >= super::pending::SHARE_FROM => Some((
            Record::Packet(Packet {
                pair: *pair,
                stamp: *stamp,
                payload: Payload::Write {
                    offset: *offset,
                    data: bytes::Bytes::new(),
                },
            }),
            data,
        )),
        _ => None,
    };
    let Some((hollow, data)) = shared else {
        return encode_frame(out.own_mut(), entry);
    };
    let own = out.own_mut();
    let start = own.len();
    own.extend_from_slice(&[0u8; FRAME_HEADER_LEN]);
    // As in `encode_frame`: no failure mode.
    postcard::serialize_with_flavor(&EntryRef::Record(&hollow), VecFlavor(own))
        .expect("postcard serialisation into a Vec cannot fail");
    // The data is the encoding's last field: its empty encoding (the varint 0) is the
    // last byte; its length goes there, and the data follows.
    debug_assert_eq!(own.last(), Some(&0));
    own.pop();
    let mut n = data.len() as u64;
    while n >= 0x80 {
        own.push((n as u8) | 0x80);
        n >>= 7;
    }
    own.push(n as u8);
    let body_len = own.len() - start - FRAME_HEADER_LEN + data.len();
    let Ok(len) = u32::try_from(body_len) else {
        own.truncate(start);
        return None;
    };
    let len = len.to_le_bytes();
    let crc = crc32c::crc32c_append(crc32c::crc32c(&len), &own[start + FRAME_HEADER_LEN..]);
    let crc = crc32c::crc32c_append(crc, data);
    own[start..start + 4].copy_from_slice(&len);
    own[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    out.push_shared(data.clone());
    Some(FRAME_HEADER_LEN + body_len)
}

/// Decodes the frame at the start of `bytes`, of a segment of this build's version: the
/// entry and the frame's length, or why these bytes are not a frame this build wrote.
#[cfg(test)]
pub(crate) fn decode_frame(bytes: &[u8]) -> Result<(Entry, usize), String> {
    decode_frame_version(bytes, FORMAT_VERSION)
}

/// Decodes the frame at the start of `bytes`, of a segment of format `version` (one
/// [`check_header`] accepts): the entry and the frame's length, or why these bytes are
/// not a frame a build of that version wrote.
pub(crate) fn decode_frame_version(bytes: &[u8], version: u32) -> Result<(Entry, usize), String> {
    let Some(head) = bytes.get(..FRAME_HEADER_LEN) else {
        return Err(format!(
            "{} bytes left, shorter than a frame header",
            bytes.len()
        ));
    };
    let len = le32(&head[0..4]) as usize;
    if len == 0 {
        return Err("frame of length zero".into());
    }
    let Some(body) = bytes.get(FRAME_HEADER_LEN..FRAME_HEADER_LEN.saturating_add(len)) else {
        return Err(format!(
            "frame of {len} bytes runs past the end ({} bytes left)",
            bytes.len() - FRAME_HEADER_LEN
        ));
    };
    let crc = crc32c::crc32c_append(crc32c::crc32c(&head[0..4]), body);
    if crc != le32(&head[4..8]) {
        return Err("frame checksum mismatch".into());
    }
    let malformed = |e: postcard::Error| format!("malformed frame: {e}");
    let (entry, rest) = if version == 1 {
        let (e, rest) = postcard::take_from_bytes::<EntryV1>(body).map_err(malformed)?;
        (e.into(), rest)
    } else if version == 2 {
        let (e, rest) = postcard::take_from_bytes::<EntryV2>(body).map_err(malformed)?;
        (e.into(), rest)
    } else {
        postcard::take_from_bytes::<Entry>(body).map_err(malformed)?
    };
    if !rest.is_empty() {
        return Err(format!("{} trailing bytes in frame", rest.len()));
    }
    Ok((entry, FRAME_HEADER_LEN + len))
}

/// The frames of one segment after its header, in order. Stops after the first bad
/// frame, which it yields as `Err((offset, reason))`.
pub(crate) struct Frames<'a> {
    bytes: &'a [u8],
    pos: usize,
    done: bool,
    /// The segment's format version, from its header.
    version: u32,
}

impl<'a> Frames<'a> {
    /// Frames of a whole segment file whose header was checked (its version says how
    /// they decode).
    pub(crate) fn new(segment: &'a [u8]) -> Self {
        Frames {
            bytes: segment,
            pos: HEADER_LEN.min(segment.len()),
            done: false,
            version: header_version(segment),
        }
    }

    /// Offset just past the last good frame yielded so far.
    pub(crate) fn pos(&self) -> u64 {
        self.pos as u64
    }
}

impl Iterator for Frames<'_> {
    /// `(offset, entry)` of a good frame, or `(offset, reason)` of the first bad one.
    type Item = Result<(u64, Entry), (u64, String)>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done || self.pos >= self.bytes.len() {
            return None;
        }
        let at = self.pos;
        match decode_frame_version(&self.bytes[at..], self.version) {
            Ok((entry, len)) => {
                self.pos += len;
                Some(Ok((at as u64, entry)))
            }
            Err(reason) => {
                self.done = true;
                Some(Err((at as u64, reason)))
            }
        }
    }
}
