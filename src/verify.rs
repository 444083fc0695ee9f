//! Online verify: checksums of regions of a pair's two units, taken at known sequence
//! numbers, and the rule that says when two of them may be compared (`tidemark verify`,
//! `docs/design.md`, online verify).
//!
//! **The question.** Does the remote unit hold what the local unit held? Both change
//! all the time while clients write, so a checksum means something only together with
//! the point of the pair's stream it was taken at:
//!
//! - the primary's local unit, read on the unit's lane at its place in stamp order,
//!   holds every write of the pair with `seq <= W` (`W`: the last `seq` stamped when the
//!   read was handed to the lane) and none after;
//! - the secondary's remote unit, read between two applications, holds every packet of
//!   the pair with `seq <= A` (`A`: its applied point) and none after: packets apply in
//!   `seq` order. It holds off its next application while it reads, and splits an
//!   application at `W` when it can, so that most reads are taken at exactly `A == W`.
//!
//! A region's content is set by the writes to it, so it is the same at two points of
//! the stream if no write to it lies between them. Hence [`comparable`]: the two
//! checksums are compared if `A == W`, or if no write to the region has a `seq` in
//! `(min(A, W), max(A, W)]` as far as the primary's [`LastWrites`] can tell. A region
//! that is not comparable is *busy*: checked again later, never reported as a mismatch.
//!
//! The checksum is XXH3-64 of the region's bytes ([`checksum`]): not a defence against
//! an adversary (the link is authenticated, I6), but a corrupted region goes unnoticed
//! with probability 2^-64, where CRC-32C would leave 2^-32.

use crate::types::{Offset, PairId, Seq};
use serde::{Deserialize, Serialize};

/// Regions one request names (and one reply carries checksums for): a reply of this
/// many fits the smallest datagram (`mtu` 576).
pub const MAX_SUMS: usize = 32;
/// Bytes one request reads (unless one region is larger): a read holds the local unit's
/// lane, and the remote unit's applications, for this long at most.
pub const MAX_CHUNK_BYTES: u64 = 4 << 20;
/// Smallest region.
pub const MIN_REGION: u64 = 4 << 10;
/// Largest region.
pub const MAX_REGION: u64 = 64 << 20;

/// The checksum of a region's bytes.
pub fn checksum(data: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(data)
}

/// Primary -> secondary: checksum `count` regions of `region` bytes from `offset` of
/// pair `pair`'s remote unit (the last one cut at the unit's end), once the unit has
/// applied `target` if it gets there soon (wire: [`crate::Message::VerifyRequest`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyRequest {
    pub pair: PairId,
    /// Chosen by the primary; the reply carries it back.
    pub id: u64,
    pub offset: Offset,
    pub region: u64,
    pub count: u32,
    /// The primary's `W`: the secondary reads at exactly this `seq` if it can.
    pub target: Seq,
}

/// Why a secondary checksums nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Refusal {
    /// The remote unit is not a consistent copy (an initial sync is under way).
    Inconsistent,
    /// The remote unit's disk or journal failed.
    Failed,
    /// The request is out of range or malformed.
    BadRequest,
    /// No remote unit of this pair here.
    NoUnit,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Refusal::Inconsistent => "the remote unit is inconsistent (initial sync)",
            Refusal::Failed => "the remote unit failed",
            Refusal::BadRequest => "the secondary refused the request as malformed",
            Refusal::NoUnit => "the secondary has no remote unit of this pair",
        })
    }
}

/// What a secondary answers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SumsResult {
    /// One checksum per region of the request, in order.
    Sums(Vec<u64>),
    Refused(Refusal),
}

/// Secondary -> primary: the checksums of a [`VerifyRequest`], taken with the remote
/// unit at `applied` (wire: [`crate::Message::VerifySums`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifySums {
    pub pair: PairId,
    pub id: u64,
    pub applied: Seq,
    pub result: SumsResult,
}

impl VerifyRequest {
    /// Whether it names regions of a unit of `size` bytes that one request may name:
    /// a region of [`MIN_REGION`]..=[`MAX_REGION`] bytes (a multiple of 512), 1 to
    /// [`MAX_SUMS`] of them, at most [`MAX_CHUNK_BYTES`] together unless there is only
    /// one, starting inside the unit.
    pub fn is_valid(&self, size: u64) -> bool {
        let count = u64::from(self.count);
        (MIN_REGION..=MAX_REGION).contains(&self.region)
            && self.region.is_multiple_of(512)
            && (1..=MAX_SUMS as u64).contains(&count)
            && (count == 1 || count * self.region <= MAX_CHUNK_BYTES)
            && self.offset.0 < size
            && self.offset.0.is_multiple_of(512)
    }

    /// The regions it names in a unit of `size` bytes: `(offset, len)`, the last one
    /// cut at the unit's end (regions wholly past it are left out).
    pub fn ranges(&self, size: u64) -> Vec<(Offset, u64)> {
        regions(self.offset, self.region, u64::from(self.count), size)
    }
}

/// `count` regions of `region` bytes from `offset` in a unit of `size` bytes, the last
/// one cut at the end; none past it.
pub fn regions(offset: Offset, region: u64, count: u64, size: u64) -> Vec<(Offset, u64)> {
    (0..count)
        .map_while(|i| {
            let start = offset.0.checked_add(i.checked_mul(region)?)?;
            (start < size).then(|| (Offset(start), region.min(size - start)))
        })
        .collect()
}

/// Whether a region's checksums may be compared: the local one taken at `w`, the
/// remote one at `a`. `last_at_w`: the last write to the region with `seq <= w` (as
/// [`LastWrites`] said when the local read was handed to the lane); `last_now`: the last
/// write to it so far (once the reply arrived, so every write up to `a` is counted).
///
/// - `a == w`: both hold exactly the writes up to the same point;
/// - `a < w`: the remote misses the writes in `(a, w]`; none touched the region iff
///   `last_at_w <= a`;
/// - `a > w`: the local read misses the writes in `(w, a]`; no write touched the region
///   after `w` at all iff `last_now <= w` (writes after `a` cannot be told apart from
///   those before, so any write after `w` makes the region busy).
pub fn comparable(w: Seq, a: Seq, last_at_w: Seq, last_now: Seq) -> bool {
    use std::cmp::Ordering;
    match a.cmp(&w) {
        Ordering::Equal => true,
        Ordering::Less => last_at_w <= a,
        Ordering::Greater => last_now <= w,
    }
}

/// What one region's check found.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// Both units hold the same bytes at a common point of the stream.
    Match,
    /// They do not: the remote unit is wrong there.
    Differ,
    /// Not comparable this time (a write fell between the two reads, or the pair was
    /// not replicating): check again.
    Busy,
}

/// The verdict on a region from its two checksums and the points they were taken at
/// (see [`comparable`]).
pub fn judge(local: u64, remote: u64, w: Seq, a: Seq, last_at_w: Seq, last_now: Seq) -> Verdict {
    if !comparable(w, a, last_at_w, last_now) {
        Verdict::Busy
    } else if local == remote {
        Verdict::Match
    } else {
        Verdict::Differ
    }
}

/// A write whose sequence number is unknown (a write while tracking: it has none, and
/// the remote gets its region only through a resync).
pub const UNKNOWN: Seq = Seq(u64::MAX);

/// Per granule of a unit, the `seq` of the last write stamped into it: what the primary
/// needs for [`comparable`]. At most 2^20 granules (8 MiB) whatever the unit's size: a
/// granule is 64 KiB, or more for units over 64 GiB. A region's last write is the
/// latest of its granules' (a write to a neighbour in the same granule counts too:
/// busier, never wrong).
#[derive(Clone, Debug)]
pub struct LastWrites {
    shift: u32,
    size: u64,
    seqs: Vec<Seq>,
}

/// Smallest granule of [`LastWrites`].
const MIN_GRANULE_SHIFT: u32 = 16;
/// Most granules of [`LastWrites`].
const MAX_GRANULES_SHIFT: u32 = 20;

impl LastWrites {
    /// A unit of `size` bytes every granule of which was last written at or before
    /// `floor` (a unit starting up: its last `seq` stamped so far).
    pub fn new(size: u64, floor: Seq) -> Self {
        let mut shift = MIN_GRANULE_SHIFT;
        while size.div_ceil(1u64 << shift) > 1u64 << MAX_GRANULES_SHIFT {
            shift += 1;
        }
        LastWrites {
            shift,
            size,
            seqs: vec![floor; size.div_ceil(1u64 << shift) as usize],
        }
    }

    /// Bytes per granule.
    pub fn granule(&self) -> u64 {
        1u64 << self.shift
    }

    fn granules(&self, offset: Offset, len: u64) -> std::ops::Range<usize> {
        if len == 0 || offset.0 >= self.size {
            return 0..0;
        }
        let end = offset.0.saturating_add(len).min(self.size);
        (offset.0 >> self.shift) as usize..(end.div_ceil(1u64 << self.shift)) as usize
    }

    /// A write (or copy piece) stamped `seq` touches `len` bytes at `offset`. Sequence
    /// numbers are handed out in order, so this is the granules' latest; it also
    /// replaces [`UNKNOWN`]: a resync copies every region a tracked write touched, and
    /// the pair replicates again (and is verified) only once every copy is stamped.
    pub fn record(&mut self, offset: Offset, len: u64, seq: Seq) {
        let r = self.granules(offset, len);
        for s in &mut self.seqs[r] {
            *s = seq;
        }
    }

    /// A write without a `seq` (tracking) touches `len` bytes at `offset`.
    pub fn record_unknown(&mut self, offset: Offset, len: u64) {
        self.record(offset, len, UNKNOWN);
    }

    /// The last write to any byte of `len` bytes at `offset` (`Seq::ZERO` if none is
    /// known, or the range is empty).
    pub fn last(&self, offset: Offset, len: u64) -> Seq {
        self.seqs[self.granules(offset, len)]
            .iter()
            .copied()
            .max()
            .unwrap_or(Seq::ZERO)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The validity rule as a table: (W, A, last write at W, last write now) ->
    /// comparable.
    #[test]
    fn comparable_table() {
        let s = Seq;
        #[rustfmt::skip]
        let table: &[(u64, u64, u64, u64, bool, &str)] = &[
            // A == W: the same point of the stream, whatever was written.
            (10, 10, 10, 99, true, "same point, region written at W and after"),
            (10, 10, u64::MAX, u64::MAX, true, "same point, even after an unknown write"),
            // A < W: the remote misses (A, W].
            (10, 7, 5, 5, true, "last write before A"),
            (10, 7, 7, 12, true, "last write at A; later ones after W do not matter"),
            (10, 7, 8, 8, false, "a write in (A, W]"),
            (10, 7, 10, 10, false, "a write at W"),
            (10, 7, u64::MAX, u64::MAX, false, "a tracked write before the read"),
            // A > W: the local read misses (W, A].
            (10, 13, 9, 9, true, "nothing written since W"),
            (10, 13, 9, 10, true, "last write at W"),
            (10, 13, 9, 11, false, "a write in (W, A]"),
            (10, 13, 9, 20, false, "a write after A hides whether one fell in (W, A]"),
            (10, 13, 9, u64::MAX, false, "a tracked write since"),
            // Nothing written yet anywhere.
            (0, 0, 0, 0, true, "empty pair"),
        ];
        for &(w, a, at_w, now, want, why) in table {
            assert_eq!(comparable(s(w), s(a), s(at_w), s(now)), want, "{why}");
        }
        assert_eq!(judge(1, 1, s(5), s(5), s(5), s(5)), Verdict::Match);
        assert_eq!(judge(1, 2, s(5), s(5), s(5), s(5)), Verdict::Differ);
        assert_eq!(judge(1, 2, s(5), s(4), s(5), s(5)), Verdict::Busy);
        assert_eq!(judge(1, 1, s(5), s(6), s(5), s(6)), Verdict::Busy);
    }

    #[test]
    fn last_writes_by_granule() {
        let mut l = LastWrites::new(1 << 20, Seq(3));
        assert_eq!(l.granule(), 64 << 10);
        assert_eq!(l.last(Offset(0), 1 << 20), Seq(3));
        l.record(Offset(70_000), 10, Seq(9));
        // Granule 1 only: [65536, 131072).
        assert_eq!(l.last(Offset(0), 65536), Seq(3));
        assert_eq!(l.last(Offset(65536), 1), Seq(9));
        assert_eq!(l.last(Offset(0), 1 << 20), Seq(9));
        // A write across a granule boundary marks both.
        l.record(Offset(131_071), 2, Seq(11));
        assert_eq!(l.last(Offset(65536), 65536), Seq(11));
        assert_eq!(l.last(Offset(131_072), 65536), Seq(11));
        assert_eq!(l.last(Offset(196_608), 65536), Seq(3));
        // Tracked writes are unknown until a copy replaces them.
        l.record_unknown(Offset(196_608), 4096);
        assert_eq!(l.last(Offset(196_608), 1), UNKNOWN);
        l.record(Offset(196_608), 65536, Seq(20));
        assert_eq!(l.last(Offset(196_608), 1), Seq(20));
        // Empty and out-of-range ranges touch nothing.
        l.record(Offset(0), 0, Seq(30));
        l.record(Offset(1 << 20), 10, Seq(30));
        assert_eq!(l.last(Offset(0), 65536), Seq(3));
        assert_eq!(l.last(Offset(1 << 20), 10), Seq::ZERO);
        // A write past the end is cut at it.
        l.record(Offset((1 << 20) - 1), 100, Seq(31));
        assert_eq!(l.last(Offset((1 << 20) - 1), 1), Seq(31));
    }

    #[test]
    fn last_writes_stay_small_for_large_units() {
        let l = LastWrites::new(1 << 40, Seq::ZERO);
        assert_eq!(l.granule(), 1 << 20);
        assert_eq!(l.seqs.len(), 1 << 20);
        let l = LastWrites::new((1 << 36) + 1, Seq::ZERO);
        assert_eq!(l.granule(), 128 << 10);
        assert!(l.seqs.len() <= 1 << 20);
        let l = LastWrites::new(0, Seq::ZERO);
        assert_eq!(l.last(Offset(0), 1), Seq::ZERO);
    }

    #[test]
    fn requests_are_bounded_and_regions_cut_at_the_end() {
        let r = VerifyRequest {
            pair: PairId(0),
            id: 1,
            offset: Offset(0),
            region: 1 << 20,
            count: 4,
            target: Seq(5),
        };
        assert!(r.is_valid(8 << 20));
        assert_eq!(r.ranges(8 << 20).len(), 4);
        // Past the end: cut, then left out.
        let tail = VerifyRequest {
            offset: Offset(6 << 20),
            ..r
        };
        assert_eq!(
            tail.ranges((7 << 20) + 512),
            vec![(Offset(6 << 20), 1 << 20), (Offset(7 << 20), 512)]
        );
        for bad in [
            VerifyRequest { count: 0, ..r },
            VerifyRequest { count: 5, ..r },
            VerifyRequest {
                region: 100_000,
                ..r
            },
            VerifyRequest { region: 512, ..r },
            VerifyRequest {
                region: MAX_REGION * 2,
                count: 1,
                ..r
            },
            VerifyRequest {
                offset: Offset(8 << 20),
                ..r
            },
            VerifyRequest {
                offset: Offset(3),
                ..r
            },
            VerifyRequest {
                count: MAX_SUMS as u32 + 1,
                region: MIN_REGION,
                ..r
            },
        ] {
            assert!(!bad.is_valid(8 << 20), "{bad:?}");
        }
        // One large region alone is fine.
        assert!(VerifyRequest {
            region: 16 << 20,
            count: 1,
            ..r
        }
        .is_valid(8 << 20));
        // Overflowing arithmetic yields no region rather than a panic.
        assert!(regions(Offset(u64::MAX - 10), 1 << 20, 3, u64::MAX).len() <= 1);
    }

    #[test]
    fn checksums_tell_one_flipped_bit() {
        let mut a = vec![7u8; 1 << 16];
        let x = checksum(&a);
        a[12_345] ^= 1;
        assert_ne!(checksum(&a), x);
        assert_eq!(checksum(&a), checksum(&a.clone()));
    }
}
