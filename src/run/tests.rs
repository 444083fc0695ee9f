use super::*;
use crate::packet::Payload;
use crate::types::Offset;
use bytes::Bytes;
use proptest::prelude::*;

fn pkt(seq: u64, ts: u64) -> Packet {
    Packet {
        pair: PairId(1),
        stamp: Stamp::new(Timestamp(ts), Seq(seq)),
        payload: Payload::Write {
            offset: Offset(seq * 512),
            data: Bytes::from(vec![seq as u8; 4]),
        },
    }
}

fn hb(seq: u64, ts: u64) -> Heartbeat {
    Heartbeat {
        pair: PairId(1),
        stamp: Stamp::new(Timestamp(ts), Seq(seq)),
    }
}

/// Every structural invariant of the tracker (see the module docs), checked from scratch.
fn check_invariants(t: &RunTracker) {
    let (applied, head) = (t.applied.seq.0, t.head.seq.0);
    assert!(applied <= head, "applied {applied} above head {head}");
    assert_eq!(
        t.run.len() as u64,
        head - applied,
        "the run is applied+1 ..= head"
    );
    for (i, p) in t.run.iter().enumerate() {
        assert_eq!(p.stamp.seq.0, applied + 1 + i as u64, "run slot {i}");
    }
    if let Some(p) = t.run.back() {
        assert!(t.head.ts >= p.stamp.ts, "head ts below the head packet's");
    }
    if let Some((&first, _)) = t.ahead.first_key_value() {
        assert!(
            first.0 > head + 1,
            "{first} held out of order but joins the run"
        );
    }
    for (&seq, p) in &t.ahead {
        assert_eq!(p.stamp.seq, seq);
        assert!(seq.0 - applied <= t.window, "{seq} beyond the window");
    }
    // `ranges` are exactly the maximal ranges of the seqs held out of order.
    let mut want: Vec<(Seq, Seq)> = Vec::new();
    for &seq in t.ahead.keys() {
        match want.last_mut() {
            Some((_, last)) if last.next() == seq => *last = seq,
            _ => want.push((seq, seq)),
        }
    }
    let got: Vec<(Seq, Seq)> = t.ranges.iter().map(|(&f, &l)| (f, l)).collect();
    assert_eq!(got, want, "ranges");
    let ack = t.ack();
    assert_eq!(ack.cum, t.head.seq);
    assert_eq!(ack.window, Seq(applied + t.window));
    let sack: Vec<(Seq, Seq)> = ack.sack.iter().map(|r| (r.first, r.last)).collect();
    assert_eq!(sack, reported(&want));
}

/// The ranges an acknowledgement carries out of all those held: all if they fit, else
/// the lowest half and the highest half.
fn reported(all: &[(Seq, Seq)]) -> Vec<(Seq, Seq)> {
    if all.len() <= MAX_SACK_RANGES {
        return all.to_vec();
    }
    let low = MAX_SACK_RANGES / 2;
    let high = MAX_SACK_RANGES - low;
    let mut v = all[..low].to_vec();
    v.extend_from_slice(&all[all.len() - high..]);
    v
}

/// One step of a scenario and what must hold after it.
enum Op {
    /// Packet `(seq, ts)` arrives; the verdict expected.
    P(u64, u64, Received),
    /// Heartbeat `(seq, ts)` arrives.
    H(u64, u64),
    /// The limit is released; the seqs that may be applied; they are then applied.
    Apply(u64, &'static [u64]),
}
use Op::*;
use Received::*;

/// (name, steps with the head `(seq, ts)` expected after each)
type Scenario = (&'static str, &'static [(Op, (u64, u64))]);

const SCENARIOS: &[Scenario] = &[
    (
        "in order",
        &[
            (P(1, 10, New), (1, 10)),
            (P(2, 20, New), (2, 20)),
            (P(3, 30, New), (3, 30)),
        ],
    ),
    (
        "gap holds the head",
        &[
            (P(1, 10, New), (1, 10)),
            (P(3, 30, New), (1, 10)),
            (P(4, 40, New), (1, 10)),
            (P(2, 20, New), (4, 40)),
        ],
    ),
    (
        "reverse order",
        &[
            (P(3, 30, New), (0, 0)),
            (P(2, 20, New), (0, 0)),
            (P(1, 10, New), (3, 30)),
        ],
    ),
    (
        "duplicates dropped",
        &[
            (P(1, 10, New), (1, 10)),
            (P(1, 10, Duplicate), (1, 10)),
            (P(3, 30, New), (1, 10)),
            (P(3, 30, Duplicate), (1, 10)),
        ],
    ),
    (
        "same seq, other stamp is a conflict",
        &[(P(1, 10, New), (1, 10)), (P(1, 11, Conflict), (1, 10))],
    ),
    (
        "heartbeat moves an idle head",
        &[
            (P(1, 10, New), (1, 10)),
            (H(1, 50), (1, 50)),
            (H(1, 40), (1, 50)),
            (H(1, 70), (1, 70)),
        ],
    ),
    (
        "heartbeat on a pair never written",
        &[(H(0, 25), (0, 25)), (H(0, 35), (0, 35))],
    ),
    (
        "heartbeat ahead of the run waits",
        &[
            (P(1, 10, New), (1, 10)),
            (H(2, 50), (1, 10)),
            (P(2, 20, New), (2, 50)),
        ],
    ),
    (
        "newer pending heartbeat replaces older",
        &[
            (H(2, 50), (0, 0)),
            (H(3, 60), (0, 0)),
            (P(1, 10, New), (1, 10)),
            (P(2, 20, New), (2, 20)),
            (P(3, 30, New), (3, 60)),
        ],
    ),
    (
        "apply stops at the limit",
        &[
            (P(1, 10, New), (1, 10)),
            (P(2, 20, New), (2, 20)),
            (P(3, 30, New), (3, 30)),
            (Apply(25, &[1, 2]), (3, 30)),
            (Apply(25, &[]), (3, 30)),
            (Apply(30, &[3]), (3, 30)),
        ],
    ),
    (
        "apply never crosses a gap",
        &[
            (P(1, 10, New), (1, 10)),
            (P(3, 30, New), (1, 10)),
            (Apply(100, &[1]), (1, 10)),
            (P(2, 20, New), (3, 30)),
            (Apply(100, &[2, 3]), (3, 30)),
        ],
    ),
    (
        "applied packets are stale",
        &[
            (P(1, 10, New), (1, 10)),
            (Apply(10, &[1]), (1, 10)),
            (P(1, 10, Stale), (1, 10)),
            (P(2, 20, New), (2, 20)),
        ],
    ),
    (
        "far out of order",
        &[
            (P(1000, 10_000, New), (0, 0)),
            (P(1, 10, New), (1, 10)),
            (Apply(10_000, &[1]), (1, 10)),
        ],
    ),
    (
        "closing a gap takes the held range along, and only that range",
        &[
            (P(5, 50, New), (0, 0)),
            (P(3, 30, New), (0, 0)),
            (P(9, 90, New), (0, 0)),
            (P(4, 40, New), (0, 0)),
            (P(1, 10, New), (1, 10)),
            (Apply(100, &[1]), (1, 10)),
            (P(2, 20, New), (5, 50)),
            (P(7, 70, New), (5, 50)),
            (P(6, 60, New), (7, 70)),
            (P(8, 80, New), (9, 90)),
            (Apply(65, &[2, 3, 4, 5, 6]), (9, 90)),
            (Apply(100, &[7, 8, 9]), (9, 90)),
        ],
    ),
    (
        "duplicates and conflicts, in the run and held out of order",
        &[
            (P(1, 10, New), (1, 10)),
            (P(3, 30, New), (1, 10)),
            (P(1, 10, Duplicate), (1, 10)),
            (P(1, 11, Conflict), (1, 10)),
            (P(3, 30, Duplicate), (1, 10)),
            (P(3, 31, Conflict), (1, 10)),
            (P(2, 20, New), (3, 30)),
            (P(3, 30, Duplicate), (3, 30)),
            (P(2, 21, Conflict), (3, 30)),
        ],
    ),
    (
        "after applying, the run starts at the applied point",
        &[
            (P(1, 10, New), (1, 10)),
            (P(2, 20, New), (2, 20)),
            (Apply(20, &[1, 2]), (2, 20)),
            (P(5, 50, New), (2, 20)),
            (P(3, 30, New), (3, 30)),
            (P(3, 30, Duplicate), (3, 30)),
            (P(2, 20, Stale), (3, 30)),
            (P(4, 40, New), (5, 50)),
            (P(4, 40, Duplicate), (5, 50)),
            (P(5, 51, Conflict), (5, 50)),
            (Apply(45, &[3, 4]), (5, 50)),
            (Apply(50, &[5]), (5, 50)),
        ],
    ),
    (
        "pending heartbeat used when a held range joins",
        &[
            (P(2, 20, New), (0, 0)),
            (P(3, 30, New), (0, 0)),
            (H(3, 35), (0, 0)),
            (P(1, 10, New), (3, 35)),
        ],
    ),
];

#[test]
fn scenarios() {
    for (name, steps) in SCENARIOS {
        let mut t = RunTracker::new(PairId(1), Stamp::ZERO);
        for (i, (op, (hs, ht))) in steps.iter().enumerate() {
            match op {
                P(seq, ts, want) => {
                    assert_eq!(t.handle_packet(pkt(*seq, *ts)), *want, "{name} step {i}")
                }
                H(seq, ts) => t.handle_heartbeat(hb(*seq, *ts)),
                Apply(limit, want) => {
                    let got: Vec<u64> =
                        t.select(Timestamp(*limit)).map(|p| p.stamp.seq.0).collect();
                    assert_eq!(&got, want, "{name} step {i}: selection");
                    if let Some(&last) = got.last() {
                        t.mark_applied(Seq(last));
                    }
                }
            }
            assert_eq!(
                t.head(),
                Stamp::new(Timestamp(*ht), Seq(*hs)),
                "{name} step {i}: head"
            );
            check_invariants(&t);
        }
    }
}

#[test]
fn window_bounds_memory() {
    let mut t = RunTracker::new(PairId(1), Stamp::ZERO).with_window(8);
    assert_eq!(t.handle_packet(pkt(8, 80)), New);
    assert_eq!(t.handle_packet(pkt(9, 90)), BeyondWindow);
    assert_eq!(t.held(), 1);
    assert_eq!(t.stats().beyond_window, 1);
}

#[test]
fn ack_reports_cum_and_sack_ranges() {
    let mut t = RunTracker::new(PairId(1), Stamp::ZERO);
    for s in [1, 2, 4, 5, 7, 9, 10, 11] {
        t.handle_packet(pkt(s, s * 10));
    }
    let ack = t.ack();
    assert_eq!(ack.cum, Seq(2));
    let ranges: Vec<(u64, u64)> = ack.sack.iter().map(|r| (r.first.0, r.last.0)).collect();
    assert_eq!(ranges, vec![(4, 5), (7, 7), (9, 11)]);
}

#[test]
fn sack_is_bounded() {
    let mut t = RunTracker::new(PairId(1), Stamp::ZERO);
    for s in (2..200).step_by(2) {
        t.handle_packet(pkt(s, s * 10));
    }
    assert_eq!(t.ack().sack.len(), MAX_SACK_RANGES);
}

#[test]
fn restart_from_recovered_point() {
    let mut t = RunTracker::new(PairId(1), Stamp::new(Timestamp(50), Seq(5)));
    assert_eq!(t.handle_packet(pkt(5, 50)), Stale);
    assert_eq!(t.handle_packet(pkt(6, 60)), New);
    assert_eq!(t.head(), Stamp::new(Timestamp(60), Seq(6)));
}

#[test]
fn limit_violation_is_detected() {
    let mut t = RunTracker::new(PairId(1), Stamp::ZERO);
    t.handle_packet(pkt(2, 20));
    assert!(t.limit_violated(Timestamp(25)));
    assert!(!t.limit_violated(Timestamp(15)));
}

proptest! {
    /// Any arrival order with duplicates and heartbeats: the head is the longest run, its
    /// time stamp the greatest of the run's packets and usable heartbeats, and applying
    /// in steps applies each packet exactly once in seq order.
    #[test]
    fn any_order_any_duplicates(
        n in 1u64..200,
        order in proptest::collection::vec(any::<u64>(), 0..600),
        hbs in proptest::collection::vec((any::<u64>(), 0u64..5), 0..30),
        limits in proptest::collection::vec(any::<u64>(), 0..10),
    ) {
        // Packets 1..=n with ts = 10 * seq; heartbeat after seq s has ts 10*s + 1..5.
        let mut t = RunTracker::new(PairId(1), Stamp::ZERO);
        let mut arrivals: Vec<u64> = order.iter().map(|x| 1 + x % n).collect();
        arrivals.extend(1..=n); // everything arrives at least once, eventually
        let mut applied = Vec::new();
        let mut li = limits.iter();
        for (i, seq) in arrivals.iter().enumerate() {
            t.handle_packet(pkt(*seq, 10 * seq));
            if let Some((h, d)) = hbs.get(i) {
                let s = h % (n + 1);
                t.handle_heartbeat(hb(s, 10 * s + 1 + d));
            }
            // invariants after each step
            check_invariants(&t);
            let head = t.head();
            prop_assert!(head.ts.0 >= 10 * head.seq.0);
            prop_assert!(head.ts.0 < 10 * (head.seq.0 + 1), "head ts promises nothing beyond the run");
            if i % 37 == 0 {
                if let Some(l) = li.next() {
                    let limit = Timestamp(l % (10 * n + 10));
                    let sel: Vec<u64> = t.select(limit).map(|p| p.stamp.seq.0).collect();
                    if let Some(&last) = sel.last() {
                        t.mark_applied(Seq(last));
                    }
                    applied.extend(sel);
                }
            }
        }
        prop_assert_eq!(t.head().seq, Seq(n));
        let rest: Vec<u64> = t.select(Timestamp(u64::MAX)).map(|p| p.stamp.seq.0).collect();
        applied.extend(rest);
        prop_assert_eq!(applied, (1..=n).collect::<Vec<_>>());
    }
}

#[test]
fn ack_advertises_the_window_from_the_applied_point() {
    let mut t = RunTracker::new(PairId(1), Stamp::ZERO).with_window(8);
    assert_eq!(t.ack().window, Seq(8));
    for s in 1..=8 {
        assert_eq!(t.handle_packet(pkt(s, s * 10)), New);
    }
    // Full: the window is at the head (a zero window), and it says so.
    let ack = t.ack();
    assert_eq!((ack.cum, ack.window), (Seq(8), Seq(8)));
    assert_eq!(t.handle_packet(pkt(9, 90)), BeyondWindow);
    t.mark_applied(Seq(3));
    assert_eq!(t.ack().window, Seq(11));
    assert_eq!(t.handle_packet(pkt(11, 110)), New);
    assert_eq!(t.handle_packet(pkt(12, 120)), BeyondWindow);
    // A restarted tracker advertises from its recovered point.
    let r = RunTracker::new(PairId(1), Stamp::new(Timestamp(50), Seq(5))).with_window(8);
    assert_eq!(r.ack().window, Seq(13));
}

#[test]
fn a_long_range_held_out_of_order_is_one_entry() {
    // One lost packet with many behind it: the acknowledgement does not walk them.
    let mut t = RunTracker::new(PairId(1), Stamp::ZERO);
    for s in (2..=10_001).rev() {
        assert_eq!(t.handle_packet(pkt(s, s * 10)), New);
    }
    assert_eq!(t.ranges.len(), 1);
    let ack = t.ack();
    let ranges: Vec<(u64, u64)> = ack.sack.iter().map(|r| (r.first.0, r.last.0)).collect();
    assert_eq!(ranges, vec![(2, 10_001)]);
    check_invariants(&t);
    // The gap closes: everything joins the run, nothing is left out of order.
    assert_eq!(t.handle_packet(pkt(1, 10)), New);
    assert_eq!(t.head(), Stamp::new(Timestamp(100_010), Seq(10_001)));
    assert!(t.ahead.is_empty() && t.ranges.is_empty());
    assert_eq!(t.select(Timestamp(u64::MAX)).count(), 10_001);
    check_invariants(&t);
}

/// The tracker as first written, with one map for everything: the reference that the run
/// (a ring) plus the packets held out of order (a map) must agree with.
struct Model {
    applied: Stamp,
    head: Stamp,
    held: BTreeMap<Seq, Stamp>,
    pending: Option<Stamp>,
    window: u64,
}

impl Model {
    fn packet(&mut self, stamp: Stamp) -> Received {
        let seq = stamp.seq;
        let verdict = if seq <= self.applied.seq {
            Stale
        } else if seq.0 - self.applied.seq.0 > self.window {
            BeyondWindow
        } else if let Some(held) = self.held.get(&seq) {
            if *held == stamp {
                Duplicate
            } else {
                Conflict
            }
        } else {
            self.held.insert(seq, stamp);
            New
        };
        if verdict == New && seq == self.head.seq.next() {
            while let Some(p) = self.held.get(&self.head.seq.next()) {
                self.head = Stamp::new(self.head.ts.max(p.ts), p.seq);
            }
            if let Some(hb) = self.pending.filter(|hb| hb.seq <= self.head.seq) {
                self.head.ts = self.head.ts.max(hb.ts);
                self.pending = None;
            }
        }
        verdict
    }

    fn heartbeat(&mut self, stamp: Stamp) {
        if stamp.seq <= self.head.seq {
            self.head.ts = self.head.ts.max(stamp.ts);
        } else if self.pending.is_none_or(|p| p.ts < stamp.ts) {
            self.pending = Some(stamp);
        }
    }

    fn sack(&self) -> Vec<(Seq, Seq)> {
        let mut sack: Vec<(Seq, Seq)> = Vec::new();
        for &seq in self.held.range(self.head.seq.next()..).map(|(s, _)| s) {
            match sack.last_mut() {
                Some((_, last)) if last.next() == seq => *last = seq,
                _ => sack.push((seq, seq)),
            }
        }
        reported(&sack)
    }

    fn select(&self, limit: Timestamp) -> Vec<Seq> {
        self.held
            .range(self.applied.seq.next()..)
            .take_while(|(s, _)| **s <= self.head.seq)
            .take_while(|(_, st)| st.ts <= limit)
            .map(|(s, _)| *s)
            .collect()
    }

    fn limit_violated(&self, limit: Timestamp) -> bool {
        self.held
            .range(self.head.seq.next()..)
            .next()
            .is_some_and(|(_, st)| st.ts <= limit)
    }

    fn mark_applied(&mut self, seq: Seq) {
        if seq <= self.applied.seq {
            return;
        }
        let seq = seq.min(self.head.seq);
        let ts = self.held.get(&seq).map_or(self.applied.ts, |st| st.ts);
        self.held = self.held.split_off(&seq.next());
        self.applied = Stamp::new(ts, seq);
    }
}

/// One event fed to both the tracker and the model.
#[derive(Clone, Copy, Debug)]
enum Ev {
    Packet(Stamp),
    Heartbeat(Stamp),
    Apply(Timestamp),
}

/// Feeds `ev` to both; checks they agree on everything observable and that the tracker's
/// invariants hold. Returns the seqs applied.
fn step(t: &mut RunTracker, m: &mut Model, ev: Ev) -> Vec<u64> {
    let mut applied = Vec::new();
    match ev {
        Ev::Packet(stamp) => {
            let p = Packet {
                stamp,
                ..pkt(stamp.seq.0, 0)
            };
            assert_eq!(t.handle_packet(p), m.packet(stamp), "{ev:?}");
        }
        Ev::Heartbeat(stamp) => {
            t.handle_heartbeat(Heartbeat {
                pair: PairId(1),
                stamp,
            });
            m.heartbeat(stamp);
        }
        Ev::Apply(limit) => {
            assert_eq!(t.limit_violated(limit), m.limit_violated(limit), "{ev:?}");
            let sel: Vec<Seq> = t.select(limit).map(|p| p.stamp.seq).collect();
            assert_eq!(sel, m.select(limit), "{ev:?}");
            if let Some(&last) = sel.last() {
                t.mark_applied(last);
                m.mark_applied(last);
            }
            applied.extend(sel.iter().map(|s| s.0));
        }
    }
    assert_eq!((t.applied(), t.head()), (m.applied, m.head), "{ev:?}");
    assert_eq!(t.held(), m.held.len(), "{ev:?}");
    let ack = t.ack();
    let sack: Vec<(Seq, Seq)> = ack.sack.iter().map(|r| (r.first, r.last)).collect();
    assert_eq!(
        (ack.cum, sack),
        (m.head.seq, m.sack()),
        "{ev:?}: acknowledgement"
    );
    check_invariants(t);
    applied
}

proptest! {
    /// Far out of order (some packets held back to the very end, so long ranges wait
    /// above a gap and then join the run at once), duplicates, conflicts, heartbeats,
    /// applies at any point, small and large windows: the tracker behaves exactly as the
    /// one-map model, keeps its invariants, and in the end applies each packet once, in
    /// order.
    #[test]
    fn ring_and_map_agree_with_one_map(
        n in 1u64..300,
        window in prop_oneof![1u64..40, Just(DEFAULT_WINDOW)],
        late in proptest::collection::vec(any::<u64>(), 0..12),
        noise in proptest::collection::vec((any::<u64>(), 0u8..8), 0..200),
    ) {
        let stamp = |s: u64| Stamp::new(Timestamp(10 * s), Seq(s));
        let late: Vec<u64> = late.iter().map(|x| 1 + x % n).collect();
        let mut evs: Vec<Ev> = (1..=n)
            .filter(|s| !late.contains(s))
            .map(|s| Ev::Packet(stamp(s)))
            .collect();
        for (x, kind) in noise {
            let s = 1 + x % n;
            let ev = match kind {
                0..=2 => Ev::Packet(stamp(s)),
                3 => Ev::Packet(Stamp::new(Timestamp(10 * s + 1), Seq(s))),
                4 => Ev::Heartbeat(Stamp::new(Timestamp(10 * (s - 1) + 5), Seq(s - 1))),
                5 | 6 => Ev::Apply(Timestamp(x % (10 * n + 10))),
                _ => Ev::Apply(Timestamp(u64::MAX)),
            };
            let at = (x as usize / 8) % (evs.len() + 1);
            evs.insert(at, ev);
        }
        evs.extend(late.iter().map(|&s| Ev::Packet(stamp(s))));
        let mut t = RunTracker::new(PairId(1), Stamp::ZERO).with_window(window);
        let mut m = Model {
            applied: Stamp::ZERO,
            head: Stamp::ZERO,
            held: BTreeMap::new(),
            pending: None,
            window: window.max(1),
        };
        let mut applied = Vec::new();
        for ev in evs {
            applied.extend(step(&mut t, &mut m, ev));
        }
        // Then as a sender retransmitting what is missing: a window (and a bit beyond)
        // at a time, applying after each round.
        for _ in 0..=n {
            if t.applied().seq.0 == n {
                break;
            }
            let from = t.applied().seq.0 + 1;
            for s in from..=(from + window + 1).min(n) {
                applied.extend(step(&mut t, &mut m, Ev::Packet(stamp(s))));
            }
            applied.extend(step(&mut t, &mut m, Ev::Apply(Timestamp(u64::MAX))));
        }
        prop_assert_eq!(applied, (1..=n).collect::<Vec<_>>());
    }
}

/// A sender and a tracker on a perfect in-memory loop (nothing lost, duplicated or
/// reordered; acknowledgements delayed by 0, 1 or 5 ms). The sender is handed three
/// receive windows' worth of packets at once; the receiver applies only every 40 ms (far
/// beyond the retransmission timeout) and, as a remote unit does, acknowledges only
/// when something arrives (packets, or the heartbeats of a sender held back by the
/// window). With flow control nothing is ever dropped beyond the window and nothing is
/// retransmitted.
#[test]
fn flow_control_on_a_perfect_loop_never_retransmits() {
    use crate::ship::{Rtt, Sender};
    use std::collections::VecDeque;
    use std::time::{Duration, Instant};
    const WINDOW: u64 = 256;
    const TOTAL: u64 = 3 * WINDOW;
    const APPLY_EVERY: u64 = 40;
    for ack_delay in [0u64, 1, 5] {
        let mut s = Sender::new(
            PairId(1),
            Stamp::ZERO,
            Duration::from_millis(10),
            Rtt::default(),
        );
        let mut t = RunTracker::new(PairId(1), Stamp::ZERO).with_window(WINDOW);
        let t0 = Instant::now();
        let (mut out, mut acks) = (Vec::new(), VecDeque::<(u64, Ack)>::new());
        let (mut held_back, mut max_held) = (0, 0);
        for _ in 0..TOTAL {
            let ts = Timestamp(s.last().ts.0 + 1);
            s.push(ts, pkt(0, 0).payload);
        }
        let mut step = 0u64;
        while t.applied().seq.0 < TOTAL {
            assert!(
                step < 10_000,
                "delay {ack_delay}: stalled at {:?}",
                t.applied()
            );
            let now = t0 + Duration::from_millis(step);
            while acks.front().is_some_and(|(due, _)| *due <= step) {
                let (_, ack) = acks.pop_front().expect("front");
                s.handle_ack(now, &ack);
            }
            out.clear();
            let re = s.poll_transmit(now, &mut out);
            assert_eq!(re, 0, "delay {ack_delay}, step {step}: retransmission");
            if s.send_window() < s.last().seq {
                held_back += 1;
            }
            let mut answer = !out.is_empty();
            for p in out.drain(..) {
                let seq = p.stamp.seq;
                assert_eq!(
                    t.handle_packet(p),
                    New,
                    "delay {ack_delay}, step {step}: {seq}"
                );
            }
            if s.heartbeat_due(now) {
                let ts = Timestamp(s.last().ts.0 + 1);
                t.handle_heartbeat(s.heartbeat(now, ts));
                answer = true;
            }
            if answer {
                acks.push_back((step + ack_delay, t.ack()));
            }
            max_held = max_held.max(t.held());
            if step % APPLY_EVERY == APPLY_EVERY - 1 {
                if let Some(last) = t.select(Timestamp(u64::MAX)).last().map(|p| p.stamp.seq) {
                    t.mark_applied(last);
                }
            }
            step += 1;
        }
        assert_eq!(t.stats().beyond_window, 0, "delay {ack_delay}");
        assert_eq!(t.stats().duplicates, 0, "delay {ack_delay}");
        assert_eq!(s.stats().retransmits, 0, "delay {ack_delay}");
        assert_eq!(
            max_held as u64, WINDOW,
            "delay {ack_delay}: the window filled"
        );
        assert!(
            held_back > 0,
            "delay {ack_delay}: the window held the sender back"
        );
        let now = t0 + Duration::from_millis(step + ack_delay);
        for (_, ack) in acks.drain(..) {
            s.handle_ack(now, &ack);
        }
        assert_eq!(s.unacked_len(), 0, "delay {ack_delay}");
    }
}

#[test]
fn ack_with_more_ranges_than_fit_reports_the_lowest_and_the_newest() {
    // Held: every odd seq from 3 to 81 (40 single ranges) above a head of 1.
    let mut t = RunTracker::new(PairId(1), Stamp::ZERO);
    t.handle_packet(pkt(1, 10));
    for s in (3..=81).step_by(2) {
        t.handle_packet(pkt(s, s * 10));
    }
    let ranges: Vec<u64> = t.ack().sack.iter().map(|r| r.first.0).collect();
    let low: Vec<u64> = (3..).step_by(2).take(MAX_SACK_RANGES / 2).collect();
    let high: Vec<u64> = (3..=81)
        .step_by(2)
        .skip(40 - (MAX_SACK_RANGES - MAX_SACK_RANGES / 2))
        .collect();
    assert_eq!(ranges, [low, high].concat());
    assert!(t.ack().sack.iter().all(|r| r.first == r.last));
}

/// A mark (zero-length) is an ordinary packet to the tracker: held out of order, joining
/// the run, selected by a limit and applied in `seq` order between the writes.
#[test]
fn marks_are_ordered_like_writes() {
    use crate::packet::Mark;
    let mark = |seq: u64, ts: u64, m: Mark| Packet {
        payload: Payload::Mark(m),
        ..pkt(seq, ts)
    };
    let mut t = RunTracker::new(PairId(1), Stamp::ZERO);
    assert_eq!(t.handle_packet(mark(3, 30, Mark::SyncDone)), Received::New);
    assert_eq!(t.handle_packet(pkt(2, 20)), Received::New);
    assert_eq!(t.head().seq, Seq::ZERO);
    assert_eq!(t.handle_packet(mark(1, 10, Mark::SyncBegin)), Received::New);
    assert_eq!(
        t.handle_packet(mark(1, 10, Mark::SyncBegin)),
        Received::Duplicate
    );
    check_invariants(&t);
    assert_eq!(t.head(), Stamp::new(Timestamp(30), Seq(3)));
    let applied: Vec<(u64, Option<Mark>)> = t
        .select(Timestamp(30))
        .map(|p| (p.stamp.seq.0, p.payload.mark()))
        .collect();
    assert_eq!(
        applied,
        vec![
            (1, Some(Mark::SyncBegin)),
            (2, None),
            (3, Some(Mark::SyncDone))
        ]
    );
    t.mark_applied(Seq(3));
    check_invariants(&t);
    assert_eq!(t.applied(), Stamp::new(Timestamp(30), Seq(3)));
}
