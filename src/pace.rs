//! Write pacing (`pace_writes`): how long to hold a client's write acknowledgement so
//! that the commit lag stays near the group's RPO target instead of growing until the
//! window or the journal is full, as SRDF/A write pacing does.
//!
//! The rule is a pure function of what the primary knows when it is about to tell a
//! client its write is done:
//!
//! - the **lag** of the pair as the primary sees it, the larger of two figures: the
//!   *age* of the oldest packet the remote has not acknowledged as durable (`now` minus
//!   its time stamp; 0 when everything is acknowledged), and the *backlog*: the bytes
//!   not yet acknowledged over the rate the path has lately delivered, which is the lag
//!   the write completing now will have when it reaches the remote. The age alone reacts
//!   late: by the time the oldest write is old, the writes behind it are already queued
//!   and their lag is fixed; the backlog alone misses a link that stopped delivering
//!   (its rate is stale). The commit lag the secondary measures is this plus the
//!   orderer's round (a heartbeat interval) and the application, so holding this one
//!   holds that one;
//! - the **journal fill**: bytes used over capacity of the primary's journal.
//!
//! Each gives a pressure in `[0, 1]`: 0 below its start (half the target; half the
//! journal), rising as the square of the distance past the start, 1 at its end (the
//! target; 90 % of the journal, below the point where `on_journal_full` acts). The delay
//! is `max_delay × max(pressures)`: no delay while the lag is below half the target, a
//! smooth (continuous, monotone) rise after it, never more than `max_delay` however far
//! past the target the lag is. A client with `d` writes in flight of `s` bytes is then
//! slowed to at most `d × s / delay`, so a link slower than the clients settles the lag
//! where the delay matches the link's rate, between half the target and the target;
//! if even `max_delay` cannot slow the clients enough (many writes in flight), the
//! window's back-pressure and the journal's own limits remain the backstop: pacing
//! never stalls a client, it only slows every write by at most `max_delay` (I5: every
//! wait ends at a time fixed when it began).
//!
//! Pacing delays only the *acknowledgement*: the write is stamped, journaled and shipped
//! as before, so I1–I3 are untouched (a later acknowledgement only ever makes the
//! order of dependent writes clearer).

use std::time::Duration;

/// Where the lag pressure starts, as a fraction of the target.
pub const LAG_START: f64 = 0.5;
/// Where the journal pressure starts and where it is full, as fractions of capacity.
pub const FILL_START: f64 = 0.5;
pub const FILL_END: f64 = 0.9;

/// The default longest delay per write (SRDF/A's default maximum host delay is 50 ms).
pub const DEFAULT_MAX_DELAY: Duration = Duration::from_millis(50);

/// The pacing rule of one group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PaceRule {
    /// The RPO target the lag is held at.
    pub target: Duration,
    /// The longest any one write's acknowledgement is held.
    pub max_delay: Duration,
}

/// What the primary knows about one pair when a write completes.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct PaceInput {
    /// The primary's clock, ns since the epoch (the time stamps' clock).
    pub now_ns: u64,
    /// The time stamp (ns) of the oldest packet the remote has not acknowledged, if any.
    pub oldest_unacked_ns: Option<u64>,
    /// Bytes written and not yet acknowledged by the remote.
    pub unacked_bytes: u64,
    /// The rate (bytes per second) the path delivered lately, if measured.
    pub delivery_rate: Option<f64>,
    /// The primary's journal: bytes in use and capacity.
    pub journal_used: u64,
    pub journal_size: u64,
}

impl PaceInput {
    /// The lag as the primary sees it (0 if nothing is unacknowledged; a stamp "in the
    /// future" of a clock that stepped back counts as 0).
    pub fn lag(&self) -> Duration {
        let age = self.oldest_unacked_ns.map_or(Duration::ZERO, |ts| {
            Duration::from_nanos(self.now_ns.saturating_sub(ts))
        });
        let backlog = match self.delivery_rate {
            Some(r) if r.is_finite() && r > 0.0 => {
                // At most a day: the rule saturates long before.
                Duration::from_secs_f64((self.unacked_bytes as f64 / r).min(86_400.0))
            }
            _ => Duration::ZERO,
        };
        age.max(backlog)
    }

    /// Journal fill in `[0, 1]` (0 for an unknown capacity).
    pub fn fill(&self) -> f64 {
        if self.journal_size == 0 {
            return 0.0;
        }
        (self.journal_used as f64 / self.journal_size as f64).clamp(0.0, 1.0)
    }
}

/// `0` at or below `start`, `1` at or above `end`, the square of the way between.
fn pressure(x: f64, start: f64, end: f64) -> f64 {
    if x.is_nan() || x <= start || end <= start {
        return 0.0;
    }
    let t = ((x - start) / (end - start)).min(1.0);
    t * t
}

impl PaceRule {
    /// How long to hold the acknowledgement of a write completing now.
    pub fn delay(&self, input: &PaceInput) -> Duration {
        if self.target.is_zero() || self.max_delay.is_zero() {
            return Duration::ZERO;
        }
        let lag = input.lag().as_secs_f64() / self.target.as_secs_f64();
        let p = pressure(lag, LAG_START, 1.0).max(pressure(input.fill(), FILL_START, FILL_END));
        // `p` is in [0, 1]: the product never exceeds `max_delay`.
        Duration::from_secs_f64(self.max_delay.as_secs_f64() * p).min(self.max_delay)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    fn rule() -> PaceRule {
        PaceRule {
            target: Duration::from_millis(1000),
            max_delay: Duration::from_millis(50),
        }
    }

    fn at(lag_ms: Option<u64>, used: u64, size: u64) -> PaceInput {
        let now_ns = 1_000_000 * MS;
        PaceInput {
            now_ns,
            oldest_unacked_ns: lag_ms.map(|l| now_ns - l * MS),
            journal_used: used,
            journal_size: size,
            ..PaceInput::default()
        }
    }

    #[test]
    fn backlog_table() {
        // (age ms, unacked bytes, rate B/s, expected delay µs): the larger lag counts.
        let table: &[(Option<u64>, u64, Option<f64>, u64)] = &[
            (None, 750_000, Some(1e6), 12_500),      // 750 ms of backlog
            (Some(100), 900_000, Some(1e6), 32_000), // backlog above the age
            (Some(900), 100_000, Some(1e6), 32_000), // age above the backlog
            (None, 5_000_000, None, 0),              // no rate measured: age only
            (None, 5_000_000, Some(0.0), 0),         // a zero rate is no measure
            (None, 5_000_000, Some(f64::NAN), 0),    // nor is NaN
            (None, u64::MAX, Some(1e-9), 50_000),    // absurd: capped
        ];
        for &(age, unacked, rate, want_us) in table {
            let mut i = at(age, 0, 100);
            i.unacked_bytes = unacked;
            i.delivery_rate = rate;
            let got = rule().delay(&i);
            let diff = (got.as_micros() as i64 - want_us as i64).abs();
            assert!(
                diff <= 1,
                "{age:?} {unacked} {rate:?}: {got:?}, want {want_us} µs"
            );
        }
    }

    #[test]
    fn delay_table() {
        // (lag ms or none, journal used of 100, expected delay in µs)
        let table: &[(Option<u64>, u64, u64)] = &[
            (None, 0, 0),            // nothing unacknowledged
            (Some(0), 0, 0),         // just stamped
            (Some(400), 0, 0),       // below half the target
            (Some(500), 0, 0),       // at the start: still nothing
            (Some(600), 0, 2_000),   // a fifth of the way: 0.04 × 50 ms
            (Some(750), 0, 12_500),  // half way: a quarter
            (Some(900), 0, 32_000),  // 0.8² = 0.64
            (Some(1000), 0, 50_000), // at the target: the most
            (Some(5000), 0, 50_000), // far past it: capped
            (None, 50, 0),           // half full: nothing yet
            (None, 70, 12_500),      // half way to 90 %
            (None, 90, 50_000),      // at 90 %: the most
            (None, 100, 50_000),     // full: capped
            (Some(750), 70, 12_500), // both at a quarter
            (Some(900), 70, 32_000), // the larger pressure wins
            (Some(600), 90, 50_000), // the journal wins
        ];
        for &(lag, used, want_us) in table {
            let got = rule().delay(&at(lag, used, 100));
            let diff = (got.as_micros() as i64 - want_us as i64).abs();
            assert!(
                diff <= 1,
                "lag {lag:?} ms, journal {used}%: {got:?}, want {want_us} µs"
            );
        }
    }

    #[test]
    fn monotone_continuous_and_bounded() {
        let r = rule();
        let mut last = Duration::ZERO;
        for lag in 0..3000u64 {
            let d = r.delay(&at(Some(lag), 0, 100));
            assert!(d >= last, "not monotone at {lag} ms");
            // One ms more lag never adds more than the slope at the target allows:
            // 2 × max / (target − start) per unit = 0.2 ms per ms.
            assert!(d - last <= Duration::from_micros(201), "jump at {lag} ms");
            assert!(d <= r.max_delay);
            last = d;
        }
        let mut last = Duration::ZERO;
        for used in 0..=1000u64 {
            let d = r.delay(&at(None, used, 1000));
            assert!(d >= last && d <= r.max_delay, "fill {used}‰");
            last = d;
        }
    }

    #[test]
    fn odd_inputs_never_stall() {
        let r = rule();
        // A clock that stepped back: the stamp is ahead of now.
        let mut i = at(Some(0), 0, 100);
        i.oldest_unacked_ns = Some(i.now_ns + 10 * MS);
        assert_eq!(r.delay(&i), Duration::ZERO);
        // Unknown journal size; used above size.
        assert_eq!(r.delay(&at(None, 10, 0)), Duration::ZERO);
        assert_eq!(r.delay(&at(None, 500, 100)), r.max_delay);
        // Extreme lag: still capped.
        let mut i = at(None, 0, 100);
        i.oldest_unacked_ns = Some(0);
        assert_eq!(r.delay(&i), r.max_delay);
        // A zero target or a zero cap: no pacing.
        let z = PaceRule {
            target: Duration::ZERO,
            ..r
        };
        assert_eq!(z.delay(&at(Some(5000), 100, 100)), Duration::ZERO);
        let z = PaceRule {
            max_delay: Duration::ZERO,
            ..r
        };
        assert_eq!(z.delay(&at(Some(5000), 100, 100)), Duration::ZERO);
    }

    /// The rule as a controller: a closed-loop client (one write of `s` bytes in
    /// flight) against a link of rate `r` that sends the writes in order; the lag is the
    /// age of the oldest write not yet through. With pacing the lag settles below the
    /// target whenever `s / max_delay < r`; without it, it grows with the run.
    #[test]
    fn holds_the_lag_in_a_fluid_model() {
        let r = rule();
        let rate = 1_000_000.0; // bytes per second
        let s = 40_000.0; // bytes per write: at most 40 KB / 50 ms = 0.8 MB/s when paced
        let service = 0.001; // local write time
        for paced in [false, true] {
            let (mut t, mut max_lag) = (0.0f64, 0.0f64);
            // Writes not yet through the link: (stamped at, bytes left).
            let mut queue: std::collections::VecDeque<(f64, f64)> = Default::default();
            while t < 30.0 {
                let oldest = queue.front().map(|w| w.0);
                max_lag = max_lag.max(oldest.map_or(0.0, |o| t - o));
                let d = if paced {
                    r.delay(&PaceInput {
                        now_ns: (t * 1e9) as u64,
                        oldest_unacked_ns: oldest.map(|o| (o * 1e9) as u64),
                        unacked_bytes: queue.iter().map(|w| w.1).sum::<f64>() as u64,
                        delivery_rate: Some(rate),
                        journal_used: 0,
                        journal_size: 1,
                    })
                    .as_secs_f64()
                } else {
                    0.0
                };
                queue.push_back((t, s));
                let step = service + d;
                let mut budget = rate * step;
                while let Some(w) = queue.front_mut() {
                    let take = w.1.min(budget);
                    w.1 -= take;
                    budget -= take;
                    if w.1 > 0.0 {
                        break;
                    }
                    queue.pop_front();
                }
                t += step;
            }
            if paced {
                assert!(max_lag <= 1.0, "paced: lag {max_lag} s above the target");
            } else {
                assert!(max_lag > 10.0, "un-paced: lag only {max_lag} s");
            }
        }
    }
}
