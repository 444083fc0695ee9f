use super::*;
use proptest::prelude::*;

const MS: u64 = 1_000_000;
const B: SystemId = SystemId(1);
const C: SystemId = SystemId(2);

fn cfg(max_skew_ms: u64) -> TimeBaseConfig {
    TimeBaseConfig {
        max_skew: Duration::from_millis(max_skew_ms),
        drift_ppm: 500,
        probe_every: Duration::from_millis(100),
        keep: Duration::from_secs(5),
    }
}

/// One probe answer per row: (sent, remote, received) in ms of the two clocks, and the
/// bound it must give on its own.
#[test]
fn one_sample_bounds() {
    #[rustfmt::skip]
    let rows: &[(u64, u64, u64, u64)] = &[
        // sent  remote  recv   bound   what
        (1000,  1000,   1000,  0),    // instant exchange, same clocks
        (1000,  1001,   1002,  1),    // symmetric 1 ms each way, same clocks
        (1000,  1031,   1002,  31),   // peer 30 ms ahead
        (1000,   971,   1002,  31),   // peer 30 ms behind
        (1000,  1001,   1100,  99),   // slow answer: loose bound, still true
        (1000,  1500,   1001,  500),  // peer far ahead
    ];
    for &(s, r, e, want) in rows {
        let mut tb = TimeBase::new(cfg(1000), [B]);
        assert!(tb.handle_reply(B, s * MS, r * MS, e * MS));
        assert_eq!(
            tb.bound(B, e * MS),
            Some(Duration::from_millis(want)),
            "row sent {s} remote {r} recv {e}"
        );
    }
}

#[test]
fn tightest_recent_sample_counts_and_grows_with_drift() {
    let mut tb = TimeBase::new(cfg(50), [B]);
    tb.handle_reply(B, 0, 10 * MS, 20 * MS); // bound 10 ms
    tb.handle_reply(B, 100 * MS, 101 * MS, 102 * MS); // bound 1 ms
    tb.handle_reply(B, 200 * MS, 215 * MS, 230 * MS); // bound 15 ms
                                                      // At 1 s the 1 ms sample is 898 ms old: +449 us of drift at 500 ppm.
    assert_eq!(
        tb.bound(B, 1000 * MS),
        Some(Duration::from_nanos(MS + 449_000))
    );
    // After `keep` every sample is gone: unmeasured again.
    assert_eq!(tb.bound(B, 6000 * MS), None);
}

#[test]
fn bad_answers_are_ignored() {
    let mut tb = TimeBase::new(cfg(50), [B]);
    assert!(!tb.handle_reply(C, 0, 0, 0), "not a peer");
    assert!(
        !tb.handle_reply(B, 10 * MS, 10 * MS, 5 * MS),
        "sent after received"
    );
    assert_eq!(tb.bound(B, 10 * MS), None);
}

/// Rows: the samples per peer (sent, remote, recv in ms), then the allowance at `now`.
#[test]
fn allowance_table() {
    type Row = (&'static [(SystemId, u64, u64, u64)], u64, Allowance);
    let held_unmeasured = |p| Allowance::Held(HeldReason::Unmeasured(p));
    #[rustfmt::skip]
    let rows: Vec<Row> = vec![
        // nothing measured: held
        (&[], 0, held_unmeasured(B)),
        // B measured, C not: held on C
        (&[(B, 0, 1, 2)], 2, held_unmeasured(C)),
        // both within 20 ms: wait the larger bound
        (&[(B, 0, 1, 2), (C, 0, 5, 2)], 2, Allowance::Wait(Duration::from_millis(5))),
        // C 30 ms ahead: beyond max_skew 20 ms
        (&[(B, 0, 1, 2), (C, 0, 31, 2)], 2,
            Allowance::Held(HeldReason::TooFar { peer: C, bound: Duration::from_millis(31) })),
        // samples expired after `keep` (5 s)
        (&[(B, 0, 1, 2), (C, 0, 1, 2)], 6000, held_unmeasured(B)),
    ];
    for (i, (samples, now, want)) in rows.into_iter().enumerate() {
        let mut tb = TimeBase::new(cfg(20), [B, C]);
        for &(p, s, r, e) in samples {
            tb.handle_reply(p, s * MS, r * MS, e * MS);
        }
        assert_eq!(tb.allowance(now * MS, Duration::ZERO), want, "row {i}");
    }
}

#[test]
fn probes_once_per_interval_to_every_peer() {
    let mut tb = TimeBase::new(cfg(20), [B, C]);
    assert_eq!(tb.poll_probes(0), vec![(B, 0), (C, 0)]);
    assert!(tb.poll_probes(50 * MS).is_empty());
    assert_eq!(tb.poll_probes(100 * MS), vec![(B, 100 * MS), (C, 100 * MS)]);
}

#[test]
fn gate_holds_until_published_then_waits_past_the_stamp() {
    let g = CommitGate::default();
    assert_eq!(g.check(1000, 5000), Commit::Held);
    g.publish(Allowance::Wait(Duration::from_nanos(100)));
    assert_eq!(g.check(1000, 1050), Commit::At(1101));
    assert_eq!(g.check(1000, 1100), Commit::At(1101));
    assert_eq!(g.check(1000, 1101), Commit::Now);
    g.publish(Allowance::Held(HeldReason::Unmeasured(B)));
    assert_eq!(g.check(1000, 1_000_000), Commit::Held);
}

/// A wall clock: `offset + t * (1 + drift)` at real time `t` (all ns).
#[derive(Clone, Copy, Debug)]
struct Wall {
    offset: i64,
    drift_ppm: i64,
}

impl Wall {
    fn at(&self, t: u64) -> u64 {
        let t = t as i64;
        (1_000_000_000_000 + self.offset + t + t / 1_000_000 * self.drift_ppm) as u64
    }
}

/// Process A measures B over a network with random one-way delays, then a client writes
/// on A, waits for the acknowledgement that commit-wait allows, and writes on B. Returns
/// `(t1, t2)`: the two stamps, or `None` if A held the acknowledgement.
fn dependent_across(
    a: Wall,
    b: Wall,
    delays: &[(u64, u64)],
    write_at: u64,
    issue_gap: u64,
    commit_wait: bool,
) -> Option<(u64, u64)> {
    let mut tb = TimeBase::new(cfg(20), [B]);
    let mut t = 0u64;
    for &(there, back) in delays {
        let sent = a.at(t);
        let remote = b.at(t + there);
        t += there + back;
        tb.handle_reply(B, sent, remote, a.at(t));
        t += 10 * MS;
    }
    let t_write = t + write_at;
    let gate = CommitGate::default();
    gate.publish(tb.allowance(a.at(t_write), Duration::ZERO));
    let t1 = a.at(t_write);
    // The acknowledgement leaves at the first real instant the gate allows.
    let ack = if commit_wait {
        match gate.check(t1, a.at(t_write)) {
            Commit::Held => return None,
            Commit::Now => t_write,
            Commit::At(due) => {
                let mut r = t_write;
                while a.at(r) < due {
                    r += (due - a.at(r)).max(1) / 2 + 1;
                }
                r
            }
        }
    } else {
        t_write
    };
    let t2 = b.at(ack + issue_gap);
    Some((t1, t2))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// The rule the module doc promises: with commit-wait, a write issued on B after a
    /// write on A was acknowledged gets a later stamp, for any offsets within the bound,
    /// drift within `drift_ppm`, and any network delays; beyond the bound A holds.
    #[test]
    fn commit_wait_orders_dependent_writes_across_processes(
        off_a in -40i64 * MS as i64..40 * MS as i64,
        off_b in -40i64 * MS as i64..40 * MS as i64,
        drift_a in -200i64..200,
        drift_b in -200i64..200,
        delays in proptest::collection::vec((1u64..5 * MS, 1u64..5 * MS), 1..6),
        write_at in 0u64..50 * MS,
        issue_gap in 0u64..1000,
    ) {
        let a = Wall { offset: off_a, drift_ppm: drift_a };
        let b = Wall { offset: off_b, drift_ppm: drift_b };
        match dependent_across(a, b, &delays, write_at, issue_gap, true) {
            Some((t1, t2)) => prop_assert!(t2 > t1, "t1 {t1} t2 {t2}"),
            None => {
                // Held only if B's clock may be too far: the true skew or the slack of
                // the samples exceeds 20 ms.
                let slack: u64 = delays.iter().map(|(x, y)| x + y).min().unwrap_or(0);
                prop_assert!(off_a.abs_diff(off_b) + slack > 20 * MS - MS,
                    "held though the clocks are {} ns apart", off_a.abs_diff(off_b));
            }
        }
    }
}

/// The simulation can fail: without commit-wait, B 5 ms behind A stamps the later write
/// lower.
#[test]
fn without_commit_wait_a_slow_clock_reorders() {
    let a = Wall {
        offset: 0,
        drift_ppm: 0,
    };
    let b = Wall {
        offset: -5 * MS as i64,
        drift_ppm: 0,
    };
    let (t1, t2) = dependent_across(a, b, &[(MS, MS)], 0, 10, false).expect("not held");
    assert!(t2 < t1, "the hazard the time base exists for");
    let (t1, t2) = dependent_across(a, b, &[(MS, MS)], 0, 10, true).expect("not held");
    assert!(t2 > t1);
}
