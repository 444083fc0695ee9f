use super::*;
use crate::clock::HybridClock;
use crate::packet::{Packet, Payload};
use crate::run::RunTracker;
use crate::ship::Rtt;
use crate::types::{Offset, PairId, Seq, Stamp};
use bytes::Bytes;
use rand::{Rng, SeedableRng};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

fn w(n: u8) -> Payload {
    Payload::Write {
        offset: Offset(0),
        data: Bytes::from(vec![n; 8]),
    }
}

fn sender(pair: u32) -> Sender {
    Sender::new(
        PairId(pair),
        Stamp::ZERO,
        Duration::from_millis(10),
        Rtt::default(),
    )
}

#[test]
fn a_box_sends_one_message_until_taken_and_keeps_the_highest_request() {
    let b = NudgeBox::new();
    assert_eq!(b.take(), None);
    assert!(!b.request(Timestamp(0)), "0 asks nothing");
    assert!(b.request(Timestamp(10)), "first request: send a nudge");
    assert!(!b.request(Timestamp(30)), "one pending: no second message");
    assert!(!b.request(Timestamp(20)));
    assert_eq!(b.pending(), Some(Timestamp(30)));
    assert_eq!(
        b.take(),
        Some(Timestamp(30)),
        "the pending message sees the highest"
    );
    assert_eq!(b.take(), None);
    assert!(
        b.request(Timestamp(40)),
        "taken: the next request sends again"
    );
}

#[test]
fn a_pair_answers_only_if_it_has_not_stamped_past_the_nudge() {
    let mut s = sender(1);
    let t0 = Instant::now();
    s.push(Timestamp(100), w(1));
    // Stamped at or past what is wanted: no heartbeat, and the clock is not read.
    assert_eq!(
        s.answer_nudge(t0, Timestamp(100), || unreachable!("no clock read")),
        None
    );
    assert_eq!(s.stats().heartbeats, 0);
    // Wanted past its last stamp: a heartbeat with the fresh stamp and the last seq.
    let hb = s
        .answer_nudge(t0, Timestamp(150), || Timestamp(151))
        .expect("a heartbeat");
    assert_eq!(hb.stamp, Stamp::new(Timestamp(151), Seq(1)));
    assert_eq!(s.last(), hb.stamp);
    // The next stamp is above the promise.
    let next = s.push(Timestamp(152), w(2));
    assert!(next.ts > hb.stamp.ts, "{next:?} after {hb:?}");
    // An answer resets the heartbeat timer like any heartbeat.
    assert!(!s.heartbeat_due(t0 + Duration::from_millis(5)));
}

/// One item on the simulated network.
enum Item {
    Data(Packet),
    Beat(crate::packet::Heartbeat),
}

/// A group of pairs stamping from one hybrid clock, with nudges, over a network that
/// reorders and duplicates, into one run tracker per pair; no timer heartbeats. After
/// every step: the limit (earliest head) never passes a packet not in its pair's run
/// (I1), and every heartbeat's promise holds for every later stamp of its pair. At the
/// end, once every nudge is answered and everything delivered, the limit covers every
/// write: nudges alone make idle pairs pass the last write.
fn run_group(seed: u64, pairs: usize, steps: usize) -> Result<(), String> {
    let mut rng = rand_pcg::Pcg64Mcg::seed_from_u64(seed);
    let wall = Arc::new(AtomicU64::new(1_000));
    let w2 = wall.clone();
    let clock = HybridClock::new(move || w2.load(std::sync::atomic::Ordering::Relaxed));
    let mut senders: Vec<Sender> = (0..pairs).map(|p| sender(p as u32)).collect();
    let boxes: Vec<NudgeBox> = (0..pairs).map(|_| NudgeBox::new()).collect();
    let mut trackers: Vec<RunTracker> = (0..pairs)
        .map(|p| RunTracker::new(PairId(p as u32), Stamp::ZERO))
        .collect();
    let mut stamps: Vec<Vec<Stamp>> = vec![Vec::new(); pairs];
    let mut promised: Vec<Timestamp> = vec![Timestamp::ZERO; pairs];
    let mut net: Vec<Item> = Vec::new();
    let mut mailbox: Vec<usize> = Vec::new();
    let mut messages = 0u64;
    let now = Instant::now();
    let mut newest = Timestamp::ZERO;

    let limit = |trackers: &[RunTracker]| {
        trackers
            .iter()
            .map(|t| t.head().ts)
            .min()
            .unwrap_or(Timestamp::ZERO)
    };
    let check = |trackers: &[RunTracker], stamps: &[Vec<Stamp>], step: usize| {
        let l = limit(trackers);
        for (p, t) in trackers.iter().enumerate() {
            if let Some(s) = stamps[p].iter().find(|s| s.ts <= l && s.seq > t.head().seq) {
                return Err(format!(
                    "seed {seed}, step {step}: limit {l:?} passes pair {p}'s {s:?}, not in \
                     its run (head {:?})",
                    t.head()
                ));
            }
            if t.limit_violated(l) {
                return Err(format!("seed {seed}, step {step}: pair {p} limit violated"));
            }
        }
        Ok(())
    };
    let answer =
        |q: usize, senders: &mut [Sender], net: &mut Vec<Item>, promised: &mut [Timestamp]| {
            if let Some(want) = boxes[q].take() {
                if let Some(hb) = senders[q].answer_nudge(now, want, || clock.now()) {
                    if hb.stamp.ts <= want {
                        return Err(format!(
                            "seed {seed}: pair {q} answered {want:?} with {hb:?}"
                        ));
                    }
                    promised[q] = promised[q].max(hb.stamp.ts);
                    net.push(Item::Beat(hb));
                }
            }
            Ok(())
        };

    for step in 0..steps {
        match rng.random_range(0..10) {
            // A batch of writes on one pair, then its nudges.
            0..=2 => {
                let p = rng.random_range(0..pairs);
                for _ in 0..rng.random_range(1..4) {
                    let stamp = senders[p].push(clock.now(), w(step as u8));
                    if stamp.ts <= promised[p] {
                        return Err(format!(
                            "seed {seed}, step {step}: pair {p} stamped {stamp:?} at or \
                             below its promise {:?}",
                            promised[p]
                        ));
                    }
                    stamps[p].push(stamp);
                    newest = newest.max(stamp.ts);
                    net.push(Item::Data(Packet {
                        pair: PairId(p as u32),
                        stamp,
                        payload: w(step as u8),
                    }));
                }
                let ts = senders[p].last().ts;
                for (q, b) in boxes.iter().enumerate() {
                    if q != p && b.request(ts) {
                        mailbox.push(q);
                        messages += 1;
                    }
                }
            }
            // A nudge message handled (mailboxes of different pairs run in any order).
            3..=4 if !mailbox.is_empty() => {
                let q = mailbox.swap_remove(rng.random_range(0..mailbox.len()));
                answer(q, &mut senders, &mut net, &mut promised)?;
            }
            // Something arrives, in any order; now and then it is duplicated.
            5..=8 if !net.is_empty() => {
                let i = rng.random_range(0..net.len());
                let item = if rng.random_bool(0.1) {
                    match &net[i] {
                        Item::Data(p) => Item::Data(p.clone()),
                        Item::Beat(h) => Item::Beat(*h),
                    }
                } else {
                    net.swap_remove(i)
                };
                match item {
                    Item::Data(p) => {
                        let pair = p.pair.0 as usize;
                        trackers[pair].handle_packet(p);
                    }
                    Item::Beat(h) => trackers[h.pair.0 as usize].handle_heartbeat(h),
                }
            }
            // The wall clock moves (or stalls: the hybrid clock still increases).
            _ => {
                let d = if rng.random_bool(0.3) {
                    0
                } else {
                    rng.random_range(1..50)
                };
                wall.fetch_add(d, std::sync::atomic::Ordering::Relaxed);
            }
        }
        check(&trackers, &stamps, step)?;
    }
    // Quiescence: every nudge answered, everything delivered (no timer heartbeat).
    while !mailbox.is_empty() || !net.is_empty() {
        if let Some(q) = mailbox.pop() {
            answer(q, &mut senders, &mut net, &mut promised)?;
        }
        if let Some(item) = net.pop() {
            match item {
                Item::Data(p) => {
                    let pair = p.pair.0 as usize;
                    trackers[pair].handle_packet(p);
                }
                Item::Beat(h) => trackers[h.pair.0 as usize].handle_heartbeat(h),
            }
        }
        check(&trackers, &stamps, steps)?;
    }
    let l = limit(&trackers);
    if newest > Timestamp::ZERO && l < newest {
        return Err(format!(
            "seed {seed}: after every nudge was answered the limit {l:?} is below the \
             newest write {newest:?}"
        ));
    }
    let writes: usize = stamps.iter().map(Vec::len).sum();
    if messages > (writes * pairs) as u64 {
        return Err(format!(
            "seed {seed}: {messages} nudge messages for {writes} writes"
        ));
    }
    Ok(())
}

#[test]
fn nudges_keep_the_cut_and_pass_every_write_without_a_timer() {
    for seed in 0..64 {
        if let Err(e) = run_group(seed, 1 + (seed as usize % 6), 600) {
            panic!("{e}");
        }
    }
}

proptest::proptest! {
    /// As above, any seed (the seed is in the failure message and in proptest's report).
    #[test]
    fn nudges_keep_the_cut_any_seed(seed in proptest::prelude::any::<u64>(), pairs in 1usize..9) {
        if let Err(e) = run_group(seed, pairs, 400) {
            proptest::prop_assert!(false, "{}", e);
        }
    }
}
