//! The congestion window of one pair's sender: how many bytes may be in flight (sent,
//! neither acknowledged nor deemed lost). Sans-IO: every event comes with `now`.
//!
//! Algorithm (NewReno in bytes, with a delivery-rate floor in the spirit of Westwood+):
//! - slow start: the window grows by every byte delivered until `ssthresh`; then
//!   congestion avoidance: it grows by an eighth (at least [`AI_BYTES`]) per window
//!   delivered (about per round trip), also while a loss episode is under way;
//! - a loss episode starts when a packet sent after the previous episode began is deemed
//!   lost; it ends once a packet sent after it began is delivered. Each episode reduces
//!   the window once: `ssthresh = cwnd = max(BETA * cwnd, floor)`;
//! - `floor` is the most the path delivered in one round trip lately (the highest
//!   per-round delivery rate of the last [`RATE_ROUNDS`] rounds times the smoothed round
//!   trip). Random loss (a lossy radio or WAN link, not a full queue) thus does not
//!   shrink the window below what the path demonstrably carries, while under real
//!   congestion the delivery rate is the bottleneck's, and the window stays at what it
//!   drains per round trip instead of growing on;
//! - a retransmission timeout (nothing came back for a timeout) drops the window to
//!   [`MIN_CWND`] and `ssthresh` to half the window (slow start again);
//! - a reduction found spurious (the "lost" packet's acknowledgement came too soon to be
//!   for its retransmission) is undone, once per episode.
//!
//! Invariant: `MIN_CWND <= cwnd <= MAX_CWND`; a packet may go out when nothing is in
//! flight (so any packet, however large, gets through) or when it fits in the window.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// The window at the start: four of the largest typical writes.
pub const INITIAL_CWND: usize = 256 << 10;
/// The window never shrinks below this.
pub const MIN_CWND: usize = 64 << 10;
/// The window never grows above this.
pub const MAX_CWND: usize = 256 << 20;
/// Least growth in congestion avoidance, per window of bytes delivered (it is an eighth
/// of the window when that is more).
pub const AI_BYTES: usize = 16 << 10;
/// Multiplicative decrease per loss episode (as CUBIC), in tenths.
pub const BETA_TENTHS: usize = 7;
/// Rounds over which the highest delivery rate is remembered.
pub const RATE_ROUNDS: usize = 8;

/// Counters of the congestion controller.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CongestionStats {
    /// Loss episodes (each reduced the window once).
    pub episodes: u64,
    /// Retransmission timeouts.
    pub timeouts: u64,
    /// Reductions undone as spurious.
    pub undone: u64,
}

/// A congestion window in bytes. Transmissions are identified by a counter that grows
/// with each transmission (`xmit`), so "sent after" is a comparison of counters.
#[derive(Clone, Debug)]
pub struct Congestion {
    cwnd: usize,
    ssthresh: usize,
    /// Bytes delivered in congestion avoidance since the window last grew.
    grow_credit: usize,
    /// The current loss episode: losses of transmissions below this counter belong to it.
    /// `None`: no episode yet.
    recovery: Option<u64>,
    /// While in an episode: the window and threshold before its reduction (for undo).
    undo: Option<(usize, usize)>,
    /// The current delivery round: started at this transmission counter and time, with
    /// this many bytes delivered since.
    round: Option<(u64, Instant)>,
    round_bytes: usize,
    /// Delivery rate (bytes per second) of each of the last rounds, newest last.
    rates: VecDeque<f64>,
    /// Bytes delivered and seconds taken by each of the same rounds, newest last.
    spans: VecDeque<(usize, f64)>,
    stats: CongestionStats,
}

impl Default for Congestion {
    fn default() -> Self {
        Congestion::new(INITIAL_CWND)
    }
}

impl Congestion {
    pub fn new(initial: usize) -> Self {
        Congestion {
            cwnd: initial.clamp(MIN_CWND, MAX_CWND),
            ssthresh: MAX_CWND,
            grow_credit: 0,
            recovery: None,
            undo: None,
            round: None,
            round_bytes: 0,
            rates: VecDeque::with_capacity(RATE_ROUNDS + 1),
            spans: VecDeque::with_capacity(RATE_ROUNDS + 1),
            stats: CongestionStats::default(),
        }
    }

    /// The window, bytes.
    pub fn cwnd(&self) -> usize {
        self.cwnd
    }

    pub fn ssthresh(&self) -> usize {
        self.ssthresh
    }

    pub fn stats(&self) -> CongestionStats {
        self.stats
    }

    /// Whether a packet of `len` bytes may go on the wire with `in_flight` bytes in
    /// flight: nothing is in flight, or it fits.
    pub fn can_send(&self, in_flight: usize, len: usize) -> bool {
        in_flight == 0 || in_flight + len <= self.cwnd
    }

    /// Whether a loss episode is under way: losses of transmissions before `next_xmit`
    /// (the counter the next transmission will get) would not reduce the window again.
    pub fn in_recovery(&self) -> bool {
        self.undo.is_some()
    }

    /// The best delivery rate of the last rounds, bytes per second (`None`: not
    /// measured yet).
    pub fn delivery_rate(&self) -> Option<f64> {
        let best = self.rates.iter().copied().fold(0.0f64, f64::max);
        (best > 0.0).then_some(best)
    }

    /// What the path delivered over the last rounds together (their bytes over their
    /// time), bytes per second (`None`: not measured yet). Unlike the best round's rate
    /// ([`Congestion::delivery_rate`]) this is what a bursty receiver (a remote journal
    /// committing in groups) sustains, not its fastest burst.
    pub fn sustained_rate(&self) -> Option<f64> {
        let (bytes, secs) = self
            .spans
            .iter()
            .fold((0usize, 0.0f64), |(b, t), &(x, y)| (b + x, t + y));
        (bytes > 0 && secs > 0.0).then(|| bytes as f64 / secs)
    }

    /// The most the path delivered in a round trip lately (0: not measured yet).
    pub fn floor(&self, srtt: Option<Duration>) -> usize {
        let best = self.rates.iter().copied().fold(0.0f64, f64::max);
        srtt.map_or(0, |s| (best * s.as_secs_f64()) as usize)
    }

    /// `bytes` were delivered (acknowledged cumulatively or selectively for the first
    /// time); `newest` is the highest transmission counter among them, `next_xmit` the
    /// counter the next transmission will get.
    pub fn on_delivered(&mut self, now: Instant, bytes: usize, newest: u64, next_xmit: u64) {
        if bytes == 0 {
            return;
        }
        // Rounds: a round ends when something sent after it began is delivered.
        match self.round {
            None => {
                self.round = Some((next_xmit, now));
                self.round_bytes = 0;
            }
            Some((start, at)) => {
                self.round_bytes += bytes;
                if newest >= start {
                    let secs = now.saturating_duration_since(at).as_secs_f64();
                    if secs > 0.0 {
                        self.rates.push_back(self.round_bytes as f64 / secs);
                        if self.rates.len() > RATE_ROUNDS {
                            self.rates.pop_front();
                        }
                        self.spans.push_back((self.round_bytes, secs));
                        if self.spans.len() > RATE_ROUNDS {
                            self.spans.pop_front();
                        }
                    }
                    self.round = Some((next_xmit, now));
                    self.round_bytes = 0;
                }
            }
        }
        // The episode ends once something sent after it began is delivered.
        if let Some(r) = self.recovery {
            if self.undo.is_some() && newest >= r {
                self.undo = None;
            }
        }
        if self.cwnd < self.ssthresh {
            self.cwnd = (self.cwnd + bytes).min(self.ssthresh.max(MIN_CWND));
        } else {
            self.grow_credit += bytes;
            if self.grow_credit >= self.cwnd {
                self.grow_credit -= self.cwnd;
                self.cwnd += (self.cwnd / 8).max(AI_BYTES);
            }
        }
        self.cwnd = self.cwnd.clamp(MIN_CWND, MAX_CWND);
    }

    /// The transmission `xmit` was deemed lost. Reduces the window if this starts a new
    /// episode (it was sent after the current one began); returns whether it did.
    pub fn on_lost(&mut self, xmit: u64, next_xmit: u64, srtt: Option<Duration>) -> bool {
        if self.recovery.is_some_and(|r| xmit < r) {
            return false;
        }
        self.stats.episodes += 1;
        self.recovery = Some(next_xmit);
        self.undo = Some((self.cwnd, self.ssthresh));
        let reduced = self.cwnd / 10 * BETA_TENTHS;
        self.cwnd = reduced.max(self.floor(srtt)).clamp(MIN_CWND, MAX_CWND);
        self.ssthresh = self.cwnd;
        self.grow_credit = 0;
        true
    }

    /// A retransmission timeout fired: back to slow start from [`MIN_CWND`].
    pub fn on_timeout(&mut self, next_xmit: u64) {
        self.stats.timeouts += 1;
        let before = (self.cwnd, self.ssthresh);
        self.ssthresh = (self.cwnd / 2).max(MIN_CWND);
        self.cwnd = MIN_CWND;
        self.grow_credit = 0;
        self.recovery = Some(next_xmit);
        // A timeout that follows a reduction keeps the older (larger) window for undo.
        self.undo = Some(self.undo.unwrap_or(before));
    }

    /// The last reduction was spurious (what was deemed lost had arrived): restore the
    /// window and threshold from before it.
    pub fn on_spurious(&mut self) {
        if let Some((cwnd, ssthresh)) = self.undo.take() {
            self.stats.undone += 1;
            self.cwnd = cwnd.max(self.cwnd);
            self.ssthresh = ssthresh.max(self.ssthresh);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const K: usize = 1 << 10;

    /// One row: an event and the window after it.
    enum Ev {
        /// Delivered bytes, newest transmission counter among them.
        Delivered(usize, u64),
        /// Lost transmission counter.
        Lost(u64),
        Timeout,
        Spurious,
    }

    #[test]
    fn window_follows_the_events() {
        use Ev::*;
        let t0 = Instant::now();
        // (event, next transmission counter, cwnd after, ssthresh after)
        // After the first reduction; after growing by an eighth.
        let c1 = 384 * K / 10 * 7;
        let c2 = c1 + c1 / 8;
        let rows: &[(Ev, u64, usize, usize)] = &[
            // Slow start: every delivered byte grows the window.
            (Delivered(64 * K, 1), 10, 320 * K, MAX_CWND),
            (Delivered(64 * K, 2), 10, 384 * K, MAX_CWND),
            // A loss of something sent after the start: one reduction to 70 %.
            (Lost(3), 20, c1, c1),
            // Further losses of what was sent before the episode began: no reduction.
            (Lost(4), 21, c1, c1),
            (Lost(19), 22, c1, c1),
            // Congestion avoidance: a whole window delivered grows it by an eighth.
            (Delivered(64 * K, 19), 22, c1, c1),
            (Delivered(64 * K, 20), 22, c1, c1),
            (Delivered(c1, 21), 22, c2, c1),
            // Something sent after the episode began was lost: a new reduction.
            (Lost(22), 30, c2 / 10 * 7, c2 / 10 * 7),
            // Found spurious: undone.
            (Spurious, 30, c2, c1),
            // A timeout: back to the minimum, threshold half the window.
            (Timeout, 40, MIN_CWND, c2 / 2),
            // Slow start up to the threshold.
            (Delivered(64 * K, 40), 41, 128 * K, c2 / 2),
        ];
        let mut c = Congestion::new(INITIAL_CWND);
        for (i, (ev, next, cwnd, ssthresh)) in rows.iter().enumerate() {
            match *ev {
                Delivered(b, newest) => c.on_delivered(t0, b, newest, *next),
                Lost(x) => {
                    c.on_lost(x, *next, None);
                }
                Timeout => c.on_timeout(*next),
                Spurious => c.on_spurious(),
            }
            assert_eq!((c.cwnd(), c.ssthresh()), (*cwnd, *ssthresh), "row {i}");
        }
    }

    #[test]
    fn random_loss_does_not_shrink_below_what_the_path_delivers() {
        // 1 MiB delivered per 10 ms round: a loss episode keeps the window at about
        // 1 MiB for a 10 ms round trip, however many episodes follow.
        let t0 = Instant::now();
        let srtt = Some(Duration::from_millis(10));
        let mut c = Congestion::new(2 << 20);
        let mut xmit = 0;
        for r in 1..=20u32 {
            let now = t0 + Duration::from_millis(10) * r;
            xmit += 100;
            c.on_delivered(now, 1 << 20, xmit - 1, xmit);
            c.on_lost(xmit - 50, xmit, srtt);
        }
        assert!(c.cwnd() >= 1000 * K, "cwnd {}", c.cwnd());
        assert!(c.cwnd() <= 2 << 20);
    }

    #[test]
    fn anything_goes_when_nothing_is_in_flight() {
        let c = Congestion::new(MIN_CWND);
        assert!(c.can_send(0, 10 * MIN_CWND));
        assert!(c.can_send(MIN_CWND - 10, 10));
        assert!(!c.can_send(MIN_CWND - 10, 11));
    }
}
