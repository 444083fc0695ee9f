//! What travels from a local unit to its remote unit, and what comes back.

use crate::journal::Epoch;
use crate::types::{Offset, PairId, Seq, Stamp, SystemId, Timestamp};
use crate::verify::{VerifyRequest, VerifySums};
use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// What a data packet does to the remote unit when applied. Applying is idempotent.
///
/// The order of the variants is part of the wire and journal formats (postcard encodes
/// the variant's index): new variants go at the end, so every older encoding still
/// decodes to the same payload.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Payload {
    /// Write `data` at `offset`.
    Write {
        offset: Offset,
        // Shared with the datagram it arrived in, not copied (`wire::decode_shared`).
        #[serde(deserialize_with = "crate::wire::shared_bytes")]
        data: Bytes,
    },
    /// Write `len` zero bytes at `offset` (write-zeroes and trim are replicated as this).
    Zero { offset: Offset, len: u64 },
    /// A mark in a pair's ordered stream. It touches no bytes of the unit; the remote
    /// records the pair's state when it applies it (so the state changes exactly between
    /// the packets before and after it).
    ///
    /// It is an ordinary sequenced packet: stamped, journaled, retransmitted and applied
    /// in `seq` order like a write, with length 0 ([`Payload::len`]) at offset 0.
    Mark(Mark),
}

/// What a [`Payload::Mark`] says about the pair's stream at its place in it. The order
/// of the variants is part of the wire and journal formats (append only).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Mark {
    /// An initial sync begins: from here on, until [`Mark::SyncDone`], the remote unit
    /// is not a consistent cut.
    SyncBegin,
    /// The initial sync is complete: every region of the local unit was shipped before
    /// this mark, so once it is applied the remote unit is part of a consistent cut.
    SyncDone,
    /// A resync begins: the pair's stream goes on after a stretch of writes that were not
    /// shipped (the primary was tracking dirty regions) or were lost (a primary power
    /// loss). From here until [`Mark::ResyncDone`] the remote unit misses those writes in
    /// the regions not yet copied, so the group's remote units are not a cut at any limit
    /// in between: the remote keeps them undoable back to the last cut before this mark
    /// (the resync epoch, see `docs/design.md`).
    ResyncBegin,
    /// The resync is complete: every dirty region was shipped before this mark, so at
    /// any limit at or above it the remote unit is part of a consistent cut again.
    ResyncDone,
    /// The stream restarts here after a primary lost part of its journal: every `seq`
    /// below this mark's that the remote does not hold yet will never come. The remote
    /// drops what it holds above its run below the mark and takes the mark as the run's
    /// next packet. A [`Mark::ResyncBegin`] follows.
    Restart,
}

impl Mark {
    /// Every mark, in variant order.
    pub const ALL: [Mark; 5] = [
        Mark::SyncBegin,
        Mark::SyncDone,
        Mark::ResyncBegin,
        Mark::ResyncDone,
        Mark::Restart,
    ];
}

/// Bytes of the postcard encoding of any [`Payload::Mark`]: the payload's variant index
/// and the mark's, one varint byte each (pinned by a test).
const MARK_WIRE_LEN: usize = 2;

impl Payload {
    /// Bytes of the unit this payload touches.
    pub fn len(&self) -> u64 {
        match self {
            Payload::Write { data, .. } => data.len() as u64,
            Payload::Zero { len, .. } => *len,
            Payload::Mark(_) => 0,
        }
    }

    /// Whether it touches no byte of the unit (a mark, or an empty write or zero range).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Where the bytes it touches start; `Offset(0)` for a mark (which touches none).
    pub fn offset(&self) -> Offset {
        match self {
            Payload::Write { offset, .. } | Payload::Zero { offset, .. } => *offset,
            Payload::Mark(_) => Offset(0),
        }
    }

    /// The mark, if this payload is one.
    pub fn mark(&self) -> Option<Mark> {
        match self {
            Payload::Mark(m) => Some(*m),
            Payload::Write { .. } | Payload::Zero { .. } => None,
        }
    }

    /// This payload as pieces of at most `max` bytes of data each (`max` at least 1), in
    /// order: applying them in order does what applying it does. The data is shared, not
    /// copied. A zero payload carries no data and stays whole, and so does a mark.
    pub fn split(self, max: usize) -> Vec<Payload> {
        let max = max.max(1);
        match self {
            Payload::Write { offset, data } if data.len() > max => (0..data.len())
                .step_by(max)
                .map(|at| Payload::Write {
                    offset: Offset(offset.0 + at as u64),
                    data: data.slice(at..(at + max).min(data.len())),
                })
                .collect(),
            whole => vec![whole],
        }
    }

    /// Bytes this payload occupies in memory and on the wire (roughly; at least its
    /// encoding, exactly it for a mark). Never 0, so byte accounting (windows, the
    /// congestion window) sees every packet.
    pub fn wire_len(&self) -> usize {
        match self {
            Payload::Write { data, .. } => data.len() + 16,
            Payload::Zero { .. } => 24,
            Payload::Mark(_) => MARK_WIRE_LEN,
        }
    }
}

/// A stamped write of one pair.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Packet {
    pub pair: PairId,
    pub stamp: Stamp,
    pub payload: Payload,
}

/// A stamp with no data: "as of `stamp.ts`, the last packet of this pair is `stamp.seq`".
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub pair: PairId,
    pub stamp: Stamp,
}

/// An inclusive range of sequence numbers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeqRange {
    pub first: Seq,
    pub last: Seq,
}

impl SeqRange {
    pub fn contains(&self, seq: Seq) -> bool {
        self.first <= seq && seq <= self.last
    }
}

/// The remote unit's acknowledgement: every packet up to `cum` is held (or applied), and
/// so are the packets in `sack` (ranges above `cum`, ascending).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    pub pair: PairId,
    pub cum: Seq,
    pub sack: Vec<SeqRange>,
    /// Receive window: the highest `seq` the receiver will accept (its applied point plus
    /// its window); the sender sends nothing new beyond it. `Seq::ZERO`, or anything
    /// below `cum`, says nothing about the window (as in `Ack::default()`): the sender
    /// keeps what it knew.
    pub window: Seq,
}

/// A remote unit's run head, reported to the orderer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeadReport {
    pub pair: PairId,
    pub head: Stamp,
    /// The pair's resync, while one is in the unit's run and not yet applied past its
    /// [`Mark::ResyncDone`] (wire version 2). A report whose head time stamp is at or
    /// above a [`Mark::ResyncBegin`]'s carries it: the orderer learns of a resync no
    /// later than of a head past its mark. `None` says nothing (it never clears what
    /// the orderer knows).
    pub resync: Option<Resync>,
}

/// A resync as the remote unit's journaled run shows it (see `docs/design.md`, the
/// resync epoch).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resync {
    /// The pair's head time stamp just before its [`Mark::ResyncBegin`] joined the run
    /// (the stamp of the packet before it, or of a heartbeat covering that packet, if
    /// later). Every write the primary tracked instead of shipping is stamped above it,
    /// so the pair is part of the cut at any limit at or below it.
    pub since: Timestamp,
    /// The time stamp of the [`Mark::ResyncDone`] once it is in the run: at any limit at
    /// or above it the pair is part of a cut again.
    pub done: Option<Timestamp>,
}

/// Everything that crosses a link between two systems.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    /// Local unit -> remote unit.
    Data(Vec<Packet>),
    /// Local unit -> remote unit.
    Heartbeats(Vec<Heartbeat>),
    /// Remote unit -> local unit.
    Acks(Vec<Ack>),
    /// Remote unit -> orderer.
    Heads(Vec<HeadReport>),
    /// Orderer -> remote systems: make `limit` durable and say so. `epoch`: the resync
    /// epoch open at this limit, made durable with it (wire version 2).
    Announce {
        limit: Timestamp,
        epoch: Option<Epoch>,
    },
    /// Remote system -> orderer: `limit` is durable here.
    Durable { system: SystemId, limit: Timestamp },
    /// Orderer -> remote systems: everything with `ts <= limit` may be applied. `epoch`:
    /// the resync epoch open at this limit (`None`: the cut at `limit` is consistent
    /// without rolling back), made durable before anything below it is applied (wire
    /// version 2).
    Release {
        limit: Timestamp,
        epoch: Option<Epoch>,
    },
    /// A piece of a write packet too large for one datagram; the receiving link
    /// reassembles the packet from its parts.
    Part(Part),
    /// Primary process -> another primary process of the group: a clock probe carrying
    /// the sender's wall clock (nanoseconds), for the time base (`timebase`).
    TimeProbe { sent: u64 },
    /// The answer to a probe: the probe's `sent` and the answerer's wall clock when it
    /// answered.
    TimeReply { sent: u64, remote: u64 },
    /// Link to link (never delivered to a unit): the number of the datagram it opens in
    /// its sender's stream to this receiver, 1, 2, 3, ... per sender session. Only
    /// datagrams that carry data are numbered; each asks for a [`Receipt`] (wire
    /// version 3).
    Number(u64),
    /// Link to link (never delivered to a unit): which numbered datagrams arrived
    /// (wire version 3).
    Receipt(Receipt),
    /// A piece of a write packet whose data travels compressed (`compress = "zstd"`):
    /// the part's `data`, `at` and `total` are of the compressed bytes; once every
    /// piece arrived the receiving link decompresses them to `raw` bytes (wire
    /// version 3).
    Zipped(Zipped),
    /// Primary's local unit -> secondary's remote unit: checksum these regions (online
    /// verify, [`crate::verify`]). Appended after version 3's messages without a version
    /// change: a build without verify drops a datagram that carries it as malformed
    /// (counted, I6), so verify needs both ends at this build.
    VerifyRequest(VerifyRequest),
    /// Remote unit -> local unit: the checksums of a [`Message::VerifyRequest`] and the
    /// applied point they were taken at.
    VerifySums(VerifySums),
}

/// A [`Part`] of a compressed write: see [`Message::Zipped`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Zipped {
    /// The length of the write's data once decompressed.
    pub raw: u32,
    pub part: Part,
}

/// The most ranges one [`Receipt`] lists.
pub const RECEIPT_RANGES: usize = 32;

/// Numbered datagrams a link received from one peer: the inclusive ranges of numbers,
/// highest first, disjoint and not touching, at most [`RECEIPT_RANGES`] of them.
/// `delay_us`: how long the receiver held the highest one before it sent this.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    pub delay_us: u32,
    pub ranges: Vec<(u64, u64)>,
}

impl Receipt {
    /// Whether the ranges are what the format promises: at most [`RECEIPT_RANGES`],
    /// each `lo <= hi`, highest first with a gap between neighbours.
    pub fn is_well_formed(&self) -> bool {
        self.ranges.len() <= RECEIPT_RANGES
            && self.ranges.iter().all(|&(lo, hi)| lo <= hi)
            && self
                .ranges
                .windows(2)
                .all(|w| w[1].1.checked_add(1).is_some_and(|next| next < w[0].0))
    }
}

/// Bytes `at .. at + data.len()` of the data of the write packet `(pair, stamp)`, which
/// writes `total` bytes at `offset`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Part {
    pub pair: PairId,
    pub stamp: Stamp,
    pub offset: Offset,
    pub total: u32,
    pub at: u32,
    #[serde(deserialize_with = "crate::wire::shared_bytes")]
    pub data: Bytes,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_covers_the_write_in_order_without_overlap() {
        let data = Bytes::from((0..=255u8).cycle().take(10_000).collect::<Vec<_>>());
        let whole = Payload::Write {
            offset: Offset(4096),
            data: data.clone(),
        };
        for max in [1, 7, 4096, 9_999, 10_000, 20_000] {
            let parts = whole.clone().split(max);
            assert_eq!(parts.len(), data.len().div_ceil(max), "max {max}");
            let mut at = 4096;
            let mut joined = Vec::new();
            for p in &parts {
                assert!(p.len() as usize <= max);
                assert_eq!(p.offset(), Offset(at));
                at += p.len();
                if let Payload::Write { data, .. } = p {
                    joined.extend_from_slice(data);
                }
            }
            assert_eq!(joined, data.to_vec(), "max {max}");
        }
        let zero = Payload::Zero {
            offset: Offset(0),
            len: 1 << 30,
        };
        assert_eq!(zero.clone().split(4096), vec![zero]);
    }

    #[test]
    fn a_mark_is_empty_whole_and_its_wire_len_is_its_encoding() {
        for mark in Mark::ALL {
            let p = Payload::Mark(mark);
            assert_eq!(p.len(), 0);
            assert!(p.is_empty());
            assert_eq!(p.offset(), Offset(0));
            assert_eq!(p.mark(), Some(mark));
            assert_eq!(p.clone().split(1), vec![p.clone()]);
            assert_eq!(p.clone().split(0), vec![p.clone()]);
            let bytes = postcard::to_allocvec(&p).unwrap();
            assert_eq!(p.wire_len(), bytes.len(), "{mark:?}");
            assert_eq!(postcard::from_bytes::<Payload>(&bytes).unwrap(), p);
        }
        // Appended after the older variants: their indices (and encodings) are unchanged.
        assert_eq!(
            postcard::to_allocvec(&Payload::Mark(Mark::SyncBegin)).unwrap(),
            [2, 0]
        );
        assert_eq!(
            postcard::to_allocvec(&Payload::Mark(Mark::SyncDone)).unwrap(),
            [2, 1]
        );
        let zero = Payload::Zero {
            offset: Offset(1),
            len: 2,
        };
        assert_eq!(postcard::to_allocvec(&zero).unwrap(), [1, 1, 2]);
        assert_eq!(zero.mark(), None);
        // Every payload's wire_len covers its encoding.
        let write = Payload::Write {
            offset: Offset(u64::MAX),
            data: Bytes::from(vec![7u8; 300]),
        };
        let zero = Payload::Zero {
            offset: Offset(u64::MAX),
            len: u64::MAX,
        };
        for p in [write, zero] {
            assert!(
                p.wire_len() >= postcard::to_allocvec(&p).unwrap().len(),
                "{p:?}"
            );
        }
    }

    /// Applying a mark touches no byte, even of an empty unit.
    #[test]
    fn applying_a_mark_changes_nothing() {
        use crate::storage::{BlockStore, MemStore};
        for size in [0, 4096] {
            let unit = MemStore::new(size);
            if size > 0 {
                unit.write_at(Offset(0), &[7u8; 4096]).unwrap();
            }
            for mark in Mark::ALL {
                unit.apply(&Payload::Mark(mark)).unwrap();
            }
            let mut back = vec![0u8; size as usize];
            unit.read_at(Offset(0), &mut back).unwrap();
            assert!(back.iter().all(|&b| b == 7), "size {size}");
        }
    }
}
