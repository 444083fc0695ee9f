//! The receive side of a link from one peer: which numbered datagrams arrived, for the
//! [`Receipt`]s the link owes. Sans-IO.
//!
//! Invariant: the ranges are highest first, disjoint and not touching, at most
//! [`RECEIPT_RANGES`] (the lowest are forgotten first: the sender then deems those
//! datagrams lost by time at worst, and sends their items once more, which the
//! receiver's reassembly and run tracking take as duplicates).

use crate::packet::{Receipt, RECEIPT_RANGES};
use std::collections::VecDeque;
use std::time::Instant;

#[derive(Debug, Default)]
pub(crate) struct Received {
    ranges: VecDeque<(u64, u64)>,
    /// When the highest number arrived.
    largest_at: Option<Instant>,
    /// A receipt is owed: a numbered datagram arrived since the last one.
    owed: bool,
}

impl Received {
    /// Number `n` arrived at `now`.
    pub fn record(&mut self, n: u64, now: Instant) {
        self.owed = true;
        let Some(&(_, top)) = self.ranges.front() else {
            self.ranges.push_front((n, n));
            self.largest_at = Some(now);
            return;
        };
        if n > top {
            self.largest_at = Some(now);
            if n == top + 1 {
                self.ranges[0].1 = n;
            } else {
                self.ranges.push_front((n, n));
            }
        } else {
            // Below the top: find the first range (highest first) whose low end is <= n.
            let i = self.ranges.partition_point(|&(lo, _)| lo > n);
            if i < self.ranges.len() && self.ranges[i].1 >= n {
                return; // already held
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
        }
        while self.ranges.len() > RECEIPT_RANGES {
            self.ranges.pop_back();
        }
    }

    /// The receipt owed, if one is (then none is until another number arrives).
    pub fn poll_receipt(&mut self, now: Instant) -> Option<Receipt> {
        if !std::mem::take(&mut self.owed) {
            return None;
        }
        let delay = self
            .largest_at
            .map_or(0, |t| now.saturating_duration_since(t).as_micros());
        Some(Receipt {
            delay_us: u32::try_from(delay).unwrap_or(u32::MAX),
            ranges: self.ranges.iter().copied().collect(),
        })
    }

    /// The peer restarted: its numbers begin again.
    pub fn reset(&mut self) {
        *self = Received::default();
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
}
