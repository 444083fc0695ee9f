//! The receive side of a link from one peer: which numbered datagrams arrived, for the
//! [`Receipt`]s the link owes. Sans-IO.
//!
//! Invariants: the ranges held are highest first, disjoint and not touching, at most
//! [`HISTORY_RANGES`] (the lowest are forgotten first). A receipt carries at most
//! [`RECEIPT_RANGES`] of them: the highest, and the ranges of every number that arrived
//! lately until [`RECEIPT_REPEATS`] receipts carried it. Every number that arrives goes
//! in a receipt (and in the next ones too, for receipts lost on the way back), however
//! far below the highest it comes: lost datagrams are never numbered again, so at 5 %
//! loss the holes they leave below the highest stay for good, and a late datagram
//! below the 32 highest ranges went in no receipt before; its sender deemed it lost and
//! sent its items again although they had arrived (issue 12). A number that went in no
//! receipt is counted ([`Received::unreceipted`]).

use crate::packet::{Receipt, RECEIPT_RANGES};
use std::collections::VecDeque;
use std::time::Instant;

/// Ranges of numbers held (a receipt carries at most [`RECEIPT_RANGES`] of them).
pub const HISTORY_RANGES: usize = 256;
/// How many receipts a newly arrived number goes in (a receipt lost on the way back
/// costs nothing while a later one repeats what it said).
pub const RECEIPT_REPEATS: u8 = 3;
/// Numbers remembered as not yet receipted [`RECEIPT_REPEATS`] times.
const FRESH_MAX: usize = 4096;

#[derive(Debug, Default)]
pub(crate) struct Received {
    ranges: VecDeque<(u64, u64)>,
    /// Numbers that arrived lately, oldest first, with how many receipts carried them.
    fresh: VecDeque<(u64, u8)>,
    /// When the highest number arrived.
    largest_at: Option<Instant>,
    /// A receipt is owed: a numbered datagram arrived since the last one.
    owed: bool,
    /// Numbers that arrived but went in no receipt.
    unreceipted: u64,
}

/// `ranges` (disjoint) sorted highest first, touching ones joined.
fn well_formed(mut ranges: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    ranges.sort_unstable_by_key(|r| std::cmp::Reverse(r.0));
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
    for (lo, hi) in ranges {
        match out.last_mut() {
            Some(last) if hi.saturating_add(1) >= last.0 => {
                last.0 = last.0.min(lo);
                last.1 = last.1.max(hi);
            }
            _ => out.push((lo, hi)),
        }
    }
    out
}

impl Received {
    /// Number `n` arrived at `now`.
    pub fn record(&mut self, n: u64, now: Instant) {
        self.owed = true;
        if self.insert(n, now) {
            if self.fresh.len() >= FRESH_MAX {
                if let Some((_, 0)) = self.fresh.pop_front() {
                    self.unreceipted += 1;
                }
            }
            self.fresh.push_back((n, 0));
        }
        while self.ranges.len() > HISTORY_RANGES {
            self.ranges.pop_back();
        }
    }

    /// Adds `n` to the ranges; false if it was held already.
    fn insert(&mut self, n: u64, now: Instant) -> bool {
        let Some(&(_, top)) = self.ranges.front() else {
            self.ranges.push_front((n, n));
            self.largest_at = Some(now);
            return true;
        };
        if n > top {
            self.largest_at = Some(now);
            if n == top + 1 {
                self.ranges[0].1 = n;
            } else {
                self.ranges.push_front((n, n));
            }
            return true;
        }
        // Below the top: find the first range (highest first) whose low end is <= n.
        let i = self.ranges.partition_point(|&(lo, _)| lo > n);
        if i < self.ranges.len() && self.ranges[i].1 >= n {
            return false; // already held
        }
        // n lies between range i (below, if any) and range i - 1 (above).
        let joins_above = i > 0 && self.ranges[i - 1].0 == n + 1;
        let joins_below = i < self.ranges.len() && self.ranges[i].1 + 1 == n;
        match (joins_above, joins_below) {
            (true, true) => {
                let lo = self.ranges[i].0;
                self.ranges[i - 1].0 = lo;
                self.ranges.remove(i);
            }
            (true, false) => self.ranges[i - 1].0 = n,
            (false, true) => self.ranges[i].1 = n,
            (false, false) => self.ranges.insert(i, (n, n)),
        }
        true
    }

    /// The range held that contains `n`, if one does.
    fn range_of(&self, n: u64) -> Option<(u64, u64)> {
        let i = self.ranges.partition_point(|&(lo, _)| lo > n);
        self.ranges.get(i).copied().filter(|&(_, hi)| hi >= n)
    }

    /// The receipt owed, if one is (then none is until another number arrives).
    ///
    /// Its ranges: the highest held (the sender's round trip and loss detection go by
    /// the largest number received), then those of the numbers that arrived lately and
    /// went in fewer than [`RECEIPT_REPEATS`] receipts (those in none first), then the
    /// next highest, up to [`RECEIPT_RANGES`]. A receipt is a set of numbers received,
    /// not a list of what is missing: the sender infers loss only from the largest
    /// number received, so any well-formed subset of the ranges held is true.
    pub fn poll_receipt(&mut self, now: Instant) -> Option<Receipt> {
        if !std::mem::take(&mut self.owed) {
            return None;
        }
        let delay = self
            .largest_at
            .map_or(0, |t| now.saturating_duration_since(t).as_micros());
        let mut pick: Vec<(u64, u64)> = Vec::with_capacity(RECEIPT_RANGES);
        pick.extend(self.ranges.front().copied());
        for unsent in [true, false] {
            for &(n, times) in &self.fresh {
                if pick.len() >= RECEIPT_RANGES {
                    break;
                }
                if (times == 0) != unsent {
                    continue;
                }
                let r = self.range_of(n).unwrap_or((n, n));
                if !pick.contains(&r) {
                    pick.push(r);
                }
            }
        }
        for &r in &self.ranges {
            if pick.len() >= RECEIPT_RANGES {
                break;
            }
            if !pick.contains(&r) {
                pick.push(r);
            }
        }
        let ranges = well_formed(pick);
        self.note_receipted(&ranges);
        Some(Receipt {
            delay_us: u32::try_from(delay).unwrap_or(u32::MAX),
            ranges,
        })
    }

    /// Counts the fresh numbers `ranges` (highest first, well formed) carry, and
    /// forgets those carried [`RECEIPT_REPEATS`] times.
    fn note_receipted(&mut self, ranges: &[(u64, u64)]) {
        self.fresh.retain_mut(|(n, times)| {
            let i = ranges.partition_point(|&(lo, _)| lo > *n);
            if ranges.get(i).is_some_and(|&(_, hi)| hi >= *n) {
                *times += 1;
            }
            *times < RECEIPT_REPEATS
        });
    }

    /// Numbers that arrived but went in no receipt.
    pub fn unreceipted(&self) -> u64 {
        self.unreceipted
    }

    /// The peer restarted: its numbers begin again.
    pub fn reset(&mut self) {
        let unreceipted = self.unreceipted;
        *self = Received::default();
        self.unreceipted = unreceipted;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arrivals_in_any_order_make_well_formed_ranges() {
        let now = Instant::now();
        type Row = (&'static [u64], &'static [(u64, u64)]);
        // (arrivals, ranges after them)
        let rows: &[Row] = &[
            (&[1, 2, 3], &[(1, 3)]),
            (&[3, 2, 1], &[(1, 3)]),
            (&[1, 3], &[(3, 3), (1, 1)]),
            (&[1, 3, 2], &[(1, 3)]),
            (&[5, 1, 3], &[(5, 5), (3, 3), (1, 1)]),
            (&[5, 1, 3, 4], &[(3, 5), (1, 1)]),
            (&[5, 1, 3, 2], &[(5, 5), (1, 3)]),
            (&[2, 2, 2], &[(2, 2)]),
            (&[10, 8, 9, 1, 7], &[(7, 10), (1, 1)]),
        ];
        for (arrivals, want) in rows {
            let mut r = Received::default();
            for &n in *arrivals {
                r.record(n, now);
            }
            let got = r.poll_receipt(now).expect("owed");
            assert_eq!(got.ranges, *want, "arrivals {arrivals:?}");
            assert!(got.is_well_formed(), "arrivals {arrivals:?}");
            assert!(r.poll_receipt(now).is_none(), "owed once");
        }
    }

    #[test]
    fn at_most_the_receipt_limit_of_ranges_keeping_the_highest() {
        let now = Instant::now();
        let mut r = Received::default();
        for n in (0..100u64).map(|i| i * 2 + 1) {
            r.record(n, now);
        }
        let got = r.poll_receipt(now).expect("owed");
        assert_eq!(got.ranges.len(), RECEIPT_RANGES);
        assert_eq!(got.ranges[0], (199, 199));
        assert!(got.is_well_formed());
    }

    #[test]
    fn a_late_number_far_below_the_highest_goes_in_the_next_receipts() {
        let now = Instant::now();
        let mut r = Received::default();
        // Every other number up to 199 (100 ranges: holes left by losses), all receipted
        // often enough to be forgotten as fresh.
        for n in (0..100u64).map(|i| i * 2 + 1) {
            r.record(n, now);
            for _ in 0..RECEIPT_REPEATS {
                r.owed = true;
                let got = r.poll_receipt(now).expect("owed");
                assert!(got.is_well_formed(), "{got:?}");
            }
        }
        assert_eq!(r.unreceipted(), 0);
        // 4 comes late, far below the 32 highest ranges (3..5 join): it goes in the
        // next RECEIPT_REPEATS receipts, as 201 (the new highest) does, and no more.
        r.record(4, now);
        r.record(201, now);
        for k in 0..RECEIPT_REPEATS {
            let got = r.poll_receipt(now).expect("owed");
            assert!(got.is_well_formed(), "{got:?}");
            assert_eq!(got.ranges[0], (201, 201));
            assert!(
                got.ranges.contains(&(3, 5)),
                "receipt {k}: {:?}",
                got.ranges
            );
            r.owed = true;
        }
        let got = r.poll_receipt(now).expect("owed");
        assert!(!got.ranges.contains(&(3, 5)), "{:?}", got.ranges);
        // Below everything held: still receipted.
        let mut r = Received::default();
        for n in (0..(HISTORY_RANGES as u64 + 10)).map(|i| i * 2 + 100) {
            r.record(n, now);
            for _ in 0..RECEIPT_REPEATS {
                r.owed = true;
                r.poll_receipt(now);
            }
        }
        assert!(
            !r.ranges.iter().any(|&(lo, _)| lo == 100),
            "100 was forgotten"
        );
        r.record(7, now);
        let got = r.poll_receipt(now).expect("owed");
        assert!(got.ranges.contains(&(7, 7)), "{:?}", got.ranges);
        assert!(got.is_well_formed(), "{:?}", got.ranges);
        assert_eq!(r.unreceipted(), 0);
    }

    #[test]
    fn more_fresh_numbers_than_a_receipt_holds_wait_for_the_next_one() {
        let now = Instant::now();
        let mut r = Received::default();
        for n in (0..100u64).map(|i| i * 2 + 1) {
            r.record(n, now);
        }
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..10 {
            r.owed = true;
            let got = r.poll_receipt(now).expect("owed");
            assert!(got.is_well_formed());
            for (lo, hi) in got.ranges {
                seen.extend(lo..=hi);
            }
        }
        assert_eq!(seen.len(), 100, "every number went in some receipt");
        assert_eq!(r.unreceipted(), 0);
    }
}
