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
fn only_an_idle_pair_is_asked_and_a_settling_pair_reads_the_newest_stamp() {
    let b = NudgeBox::new();
    assert!(b.is_idle(), "a new pair is idle");
    b.set_busy();
    assert!(!b.wants(Timestamp(5)), "a busy pair is left alone");
    assert_eq!(b.pending(), None, "and nothing is asked of it");
    let clock = HybridClock::new(|| 100u64);
    let first = clock.now();
    let second = clock.now();
    assert!(second > first);
    assert_eq!(
        b.settle(&clock),
        second,
        "settling reads the newest stamp handed out"
    );
    assert!(b.is_idle());
    assert!(
        b.wants(Timestamp(7)),
        "idle again: asked, and a message is due"
    );
    assert!(!b.wants(Timestamp(8)), "one message at a time");
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

/// The primary side of the model: the pairs' senders, nudge boxes and disk lanes, and
/// what they promised.
struct Primary {
    seed: u64,
    clock: HybridClock<Box<dyn Fn() -> u64 + Send + Sync>>,
    senders: Vec<Sender>,
    boxes: Vec<NudgeBox>,
    /// Per pair, batches stamped and not yet written locally (their packets wait).
    lanes: Vec<std::collections::VecDeque<Vec<Packet>>>,
    busy: Vec<bool>,
    promised: Vec<Timestamp>,
    now: Instant,
}

impl Primary {
    /// A heartbeat if pair `q` has not stamped or promised past `want` (as
    /// `LocalUnit::promise_past`).
    fn promise_past(
        &mut self,
        q: usize,
        want: Timestamp,
        net: &mut Vec<Item>,
    ) -> Result<(), String> {
        let clock = &self.clock;
        if let Some(hb) = self.senders[q].answer_nudge(self.now, want, || clock.now()) {
            if hb.stamp.ts <= want {
                return Err(format!(
                    "seed {}: pair {q} answered {want:?} with {hb:?}",
                    self.seed
                ));
            }
            self.promised[q] = self.promised[q].max(hb.stamp.ts);
            net.push(Item::Beat(hb));
        }
        Ok(())
    }

    /// Pair `q` handles a nudge message.
    fn answer(&mut self, q: usize, net: &mut Vec<Item>) -> Result<(), String> {
        match self.boxes[q].take() {
            Some(want) if !self.busy[q] => self.promise_past(q, want, net),
            _ => Ok(()),
        }
    }

    /// Pair `q`'s oldest batch on the lane is written: its packets leave; if the lane is
    /// empty the pair settles.
    fn land(&mut self, q: usize, net: &mut Vec<Item>) -> Result<(), String> {
        if let Some(batch) = self.lanes[q].pop_front() {
            net.extend(batch.into_iter().map(Item::Data));
        }
        if self.lanes[q].is_empty() && self.busy[q] {
            self.busy[q] = false;
            let newest = self.boxes[q].settle(&self.clock);
            self.promise_past(q, newest, net)?;
        }
        Ok(())
    }
}

fn deliver(trackers: &mut [RunTracker], item: Item) {
    match item {
        Item::Data(p) => {
            let pair = p.pair.0 as usize;
            trackers[pair].handle_packet(p);
        }
        Item::Beat(h) => trackers[h.pair.0 as usize].handle_heartbeat(h),
    }
}

/// A group of pairs stamping from one hybrid clock, with disk lanes (a pair is busy
/// while a batch of it is on its lane), nudges and settling, over a network that
/// reorders and duplicates, into one run tracker per pair; no timer heartbeats. After
/// every step: the limit (earliest head) never passes a packet not in its pair's run
/// (I1), and no stamp of a pair is at or below a promise it made. At the end, once every
/// batch is written, every nudge answered and everything delivered, the limit covers
/// every write: nudges and settling alone make every pair pass the last write.
fn run_group(seed: u64, pairs: usize, steps: usize) -> Result<(), String> {
    let mut rng = rand_pcg::Pcg64Mcg::seed_from_u64(seed);
    let wall = Arc::new(AtomicU64::new(1_000));
    let w2 = wall.clone();
    let mut pr = Primary {
        seed,
        clock: HybridClock::new(Box::new(move || {
            w2.load(std::sync::atomic::Ordering::Relaxed)
        })),
        senders: (0..pairs).map(|p| sender(p as u32)).collect(),
        boxes: (0..pairs).map(|_| NudgeBox::new()).collect(),
        lanes: vec![Default::default(); pairs],
        busy: vec![false; pairs],
        promised: vec![Timestamp::ZERO; pairs],
        now: Instant::now(),
    };
    let mut trackers: Vec<RunTracker> = (0..pairs)
        .map(|p| RunTracker::new(PairId(p as u32), Stamp::ZERO))
        .collect();
    let mut stamps: Vec<Vec<Stamp>> = vec![Vec::new(); pairs];
    let mut net: Vec<Item> = Vec::new();
    let mut mailbox: Vec<usize> = Vec::new();
    let mut messages = 0u64;
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

    for step in 0..steps {
        match rng.random_range(0..12) {
            // A batch of writes on one pair, stamped onto its lane, then its nudges.
            0..=2 => {
                let p = rng.random_range(0..pairs);
                let mut batch = Vec::new();
                for _ in 0..rng.random_range(1..4) {
                    let stamp = pr.senders[p].push(pr.clock.now(), w(step as u8));
                    if stamp.ts <= pr.promised[p] {
                        return Err(format!(
                            "seed {seed}, step {step}: pair {p} stamped {stamp:?} at or \
                             below its promise {:?}",
                            pr.promised[p]
                        ));
                    }
                    stamps[p].push(stamp);
                    newest = newest.max(stamp.ts);
                    batch.push(Packet {
                        pair: PairId(p as u32),
                        stamp,
                        payload: w(step as u8),
                    });
                }
                pr.lanes[p].push_back(batch);
                if !pr.busy[p] {
                    pr.busy[p] = true;
                    pr.boxes[p].set_busy();
                }
                let ts = pr.senders[p].last().ts;
                before_nudging();
                for (q, b) in pr.boxes.iter().enumerate() {
                    if q != p && b.wants(ts) {
                        mailbox.push(q);
                        messages += 1;
                    }
                }
            }
            // A batch is written locally (lanes of different pairs in any order).
            3..=4 => {
                let q = rng.random_range(0..pairs);
                pr.land(q, &mut net)?;
            }
            // A nudge message handled (mailboxes of different pairs run in any order).
            5..=6 if !mailbox.is_empty() => {
                let q = mailbox.swap_remove(rng.random_range(0..mailbox.len()));
                pr.answer(q, &mut net)?;
            }
            // Something arrives, in any order; now and then it is duplicated.
            7..=10 if !net.is_empty() => {
                let i = rng.random_range(0..net.len());
                let item = if rng.random_bool(0.1) {
                    match &net[i] {
                        Item::Data(p) => Item::Data(p.clone()),
                        Item::Beat(h) => Item::Beat(*h),
                    }
                } else {
                    net.swap_remove(i)
                };
                deliver(&mut trackers, item);
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
    // Quiescence: every batch written, every nudge answered, everything delivered (no
    // timer heartbeat).
    loop {
        if let Some(q) = (0..pairs).find(|&q| !pr.lanes[q].is_empty()) {
            pr.land(q, &mut net)?;
        } else if let Some(q) = mailbox.pop() {
            pr.answer(q, &mut net)?;
        } else if let Some(item) = net.pop() {
            deliver(&mut trackers, item);
        } else {
            break;
        }
        check(&trackers, &stamps, steps)?;
    }
    let l = limit(&trackers);
    if newest > Timestamp::ZERO && l < newest {
        return Err(format!(
            "seed {seed}: after every batch was written and every nudge answered the limit \
             {l:?} is below the newest write {newest:?}"
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
