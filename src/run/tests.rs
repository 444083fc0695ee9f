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
            let head = t.head();
            for s in t.applied().seq.0 + 1..=head.seq.0 {
                prop_assert!(t.held.contains_key(&Seq(s)));
            }
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
