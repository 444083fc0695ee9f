//! A shared time base for several primary *processes* of one group: a measured
//! clock-skew bound with commit-wait (as Spanner's TrueTime does), sans-IO.
//!
//! Why: within one process the hybrid clock orders dependent writes (I2). Across
//! processes, write `W1` stamped `t1` on process A and write `W2` issued on process B
//! after `W1` completed must get `t2 > t1`, or the orderer may apply `W2` without `W1`
//! and the remote units are no longer a cut (I1).
//!
//! How: A probes every other primary process `P` over the authenticated link. A probe
//! carries A's wall clock `s` when sent; `P` answers with its own wall clock `r`; A
//! reads `e` on receipt. `P` read `r` somewhere between `s` and `e` of A's clock, so the
//! offset `wall_P - wall_A` lay in `[r - e, r - s]` at that moment:
//! `|offset| <= max(|r - s|, |r - e|)`, a bound that holds whatever the network did.
//! The bound of a sample grows by the clocks' drift (`drift_ppm` of its age); the bound
//! of a peer is the tightest of its recent samples. The process's commit-wait `E` is the
//! largest bound over its peer processes.
//!
//! Commit-wait: A tells the client that `W1` completed only once A's wall clock has
//! passed `t1 + E`. Any write B stamps later has `t2 >= wall_B > wall_A - E > t1`.
//! Every primary process applies this rule to its own writes, so no dependency runs
//! against the stamps, whichever process the client moves to.
//!
//! If a peer has no sample yet, or its bound exceeds `max_skew`, the process holds every
//! acknowledgement ([`Allowance::Held`]): it stops committing and says why, rather than
//! risk I1. Assumption (documented in docs/design.md): clocks are slewed, not stepped, by
//! more than the drift allowance between probes.

use crate::types::SystemId;
use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Wall-clock nanoseconds of this process (the clock under its hybrid clock).
pub type WallNs = u64;

/// Settings of a time base.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TimeBaseConfig {
    /// Largest skew the group tolerates; above it acknowledgements are held.
    pub max_skew: Duration,
    /// How fast two clocks may drift apart, in parts per million.
    pub drift_ppm: u64,
    /// One probe per peer this often.
    pub probe_every: Duration,
    /// Samples older than this are forgotten.
    pub keep: Duration,
}

impl Default for TimeBaseConfig {
    fn default() -> Self {
        TimeBaseConfig {
            max_skew: Duration::from_millis(20),
            drift_ppm: 500,
            probe_every: Duration::from_millis(100),
            keep: Duration::from_secs(5),
        }
    }
}

/// What a process may do with acknowledgements right now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Allowance {
    /// Acknowledge a write stamped `t` once the wall clock has passed `t + wait`.
    Wait(Duration),
    /// Acknowledge nothing: a peer's clock is not known to be within `max_skew`.
    Held(HeldReason),
}

/// Why acknowledgements are held.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeldReason {
    /// No answer from this peer yet (or every sample expired).
    Unmeasured(SystemId),
    /// This peer's clock may be `bound` away, more than `max_skew`.
    TooFar { peer: SystemId, bound: Duration },
}

impl HeldReason {
    /// The reason in words, naming systems with `name`.
    pub fn describe(&self, name: impl Fn(SystemId) -> String) -> String {
        match self {
            HeldReason::Unmeasured(p) => format!("clock of {} not measured yet", name(*p)),
            HeldReason::TooFar { peer, bound } => format!(
                "clock of {} may be {} us away, above max_clock_skew_ms",
                name(*peer),
                bound.as_micros()
            ),
        }
    }
}

impl std::fmt::Display for HeldReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.describe(|s| s.to_string()))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Sample {
    /// Local wall clock when the answer came.
    at: WallNs,
    /// Bound on |offset| at `at`, in nanoseconds.
    bound: u64,
    /// Midpoint estimate of the offset (peer minus us), for status only.
    offset: i64,
}

/// One peer's clock as measured.
#[derive(Clone, Debug, Default)]
struct PeerClock {
    samples: VecDeque<Sample>,
}

/// Skew measurement and commit-wait of one primary process (see the module doc).
#[derive(Clone, Debug)]
pub struct TimeBase {
    cfg: TimeBaseConfig,
    peers: BTreeMap<SystemId, PeerClock>,
    next_probe: WallNs,
}

/// How a peer looks right now, for status and logs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeerView {
    pub peer: SystemId,
    /// Bound on the skew now, `None` if unmeasured.
    pub bound: Option<Duration>,
    /// Latest midpoint estimate of the offset (peer minus us), nanoseconds.
    pub offset_ns: Option<i64>,
}

/// Samples kept per peer at most (the tightest recent one is what counts).
const MAX_SAMPLES: usize = 64;

impl TimeBase {
    /// A time base against the primary processes `peers` (the other processes of the
    /// group that stamp writes).
    pub fn new(cfg: TimeBaseConfig, peers: impl IntoIterator<Item = SystemId>) -> TimeBase {
        TimeBase {
            cfg,
            peers: peers
                .into_iter()
                .map(|p| (p, PeerClock::default()))
                .collect(),
            next_probe: 0,
        }
    }

    pub fn config(&self) -> &TimeBaseConfig {
        &self.cfg
    }

    /// The peers to probe now, each with the wall clock to put in its probe; empty until
    /// the next probe round is due.
    pub fn poll_probes(&mut self, now: WallNs) -> Vec<(SystemId, WallNs)> {
        if now < self.next_probe {
            return Vec::new();
        }
        self.next_probe = now.saturating_add(self.cfg.probe_every.as_nanos() as u64);
        self.peers.keys().map(|p| (*p, now)).collect()
    }

    /// An answer from `peer` to the probe sent at `sent` (our clock), read `remote` on
    /// the peer's clock, received at `now`. An answer that cannot be right for our
    /// clock (sent in the future, or from an unknown peer) is ignored; returns whether
    /// it was taken. A late answer to an old probe only gives a looser bound.
    pub fn handle_reply(
        &mut self,
        peer: SystemId,
        sent: WallNs,
        remote: WallNs,
        now: WallNs,
    ) -> bool {
        let Some(pc) = self.peers.get_mut(&peer) else {
            return false;
        };
        if sent > now {
            return false;
        }
        let from_sent = remote.abs_diff(sent);
        let from_recv = remote.abs_diff(now);
        let mid = sent / 2 + now / 2 + (sent % 2 + now % 2) / 2;
        let offset = if remote >= mid {
            i64::try_from(remote - mid).unwrap_or(i64::MAX)
        } else {
            -i64::try_from(mid - remote).unwrap_or(i64::MAX)
        };
        pc.samples.push_back(Sample {
            at: now,
            bound: from_sent.max(from_recv),
            offset,
        });
        if pc.samples.len() > MAX_SAMPLES {
            pc.samples.pop_front();
        }
        true
    }

    fn grown(&self, s: &Sample, now: WallNs) -> u64 {
        let age = now.saturating_sub(s.at);
        s.bound
            .saturating_add(age.saturating_mul(self.cfg.drift_ppm).div_ceil(1_000_000))
    }

    /// The tightest bound on `peer`'s skew at `now`, if measured.
    pub fn bound(&self, peer: SystemId, now: WallNs) -> Option<Duration> {
        let keep = self.cfg.keep.as_nanos() as u64;
        self.peers
            .get(&peer)?
            .samples
            .iter()
            .filter(|s| now.saturating_sub(s.at) <= keep)
            .map(|s| self.grown(s, now))
            .min()
            .map(Duration::from_nanos)
    }

    /// What acknowledgements may do at `now` and until `now + horizon` (the bound is
    /// computed for the end of the horizon, so a caller that re-evaluates every
    /// `horizon` never uses a bound that has grown stale).
    pub fn allowance(&self, now: WallNs, horizon: Duration) -> Allowance {
        let at = now.saturating_add(horizon.as_nanos() as u64);
        let mut wait = Duration::ZERO;
        for peer in self.peers.keys() {
            match self.bound(*peer, at) {
                None => return Allowance::Held(HeldReason::Unmeasured(*peer)),
                Some(b) if b > self.cfg.max_skew => {
                    return Allowance::Held(HeldReason::TooFar {
                        peer: *peer,
                        bound: b,
                    })
                }
                Some(b) => wait = wait.max(b),
            }
        }
        Allowance::Wait(wait)
    }

    /// Every peer as it stands at `now`.
    pub fn view(&self, now: WallNs) -> Vec<PeerView> {
        self.peers
            .iter()
            .map(|(p, pc)| PeerView {
                peer: *p,
                bound: self.bound(*p, now),
                offset_ns: pc
                    .samples
                    .back()
                    .filter(|s| now.saturating_sub(s.at) <= self.cfg.keep.as_nanos() as u64)
                    .map(|s| s.offset),
            })
            .collect()
    }
}

/// The allowance published by a process's time base for its local units to read
/// (lock-free). Without a time base (one primary process in the group) nothing waits.
#[derive(Debug)]
pub struct CommitGate {
    /// Nanoseconds to wait past a write's stamp; `HELD` holds every acknowledgement.
    wait_ns: AtomicU64,
}

const HELD: u64 = u64::MAX;

impl Default for CommitGate {
    /// A gate that holds until the time base has published an allowance.
    fn default() -> Self {
        CommitGate {
            wait_ns: AtomicU64::new(HELD),
        }
    }
}

/// Whether a write stamped `ts` may be acknowledged at wall clock `now`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Commit {
    Now,
    /// Not before this wall clock (nanoseconds).
    At(WallNs),
    Held,
}

impl CommitGate {
    pub fn publish(&self, a: Allowance) {
        let v = match a {
            Allowance::Wait(d) => (d.as_nanos() as u64).min(HELD - 1),
            Allowance::Held(_) => HELD,
        };
        self.wait_ns.store(v, Ordering::Release);
    }

    /// Commit-wait for a write stamped `ts` (nanoseconds): acknowledged only once the wall
    /// clock is strictly past `ts + wait`.
    pub fn check(&self, ts: u64, now: WallNs) -> Commit {
        let w = self.wait_ns.load(Ordering::Acquire);
        if w == HELD {
            return Commit::Held;
        }
        let due = ts.saturating_add(w);
        if now > due {
            Commit::Now
        } else {
            Commit::At(due.saturating_add(1))
        }
    }
}

#[cfg(test)]
mod tests;
