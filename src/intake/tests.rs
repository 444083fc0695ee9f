//! Intake tests: the state machine step by step, and against a real journal the stall it
//! prevents. Randomised tests are seeded; every failure message names its seed.
//! `TIDEMARK_INTAKE_SEED=<n>` runs one extra seed.

use super::*;
use crate::journal::{Journal, JournalError, JournalOptions, Record};
use crate::packet::{Payload, SeqRange};
use crate::types::{Offset, PairId, Stamp, Timestamp};
use bytes::Bytes;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_pcg::Pcg64;
use std::path::Path;

const PAIR: PairId = PairId(0);

fn pkt(seq: u64, len: usize) -> Packet {
    Packet {
        pair: PAIR,
        stamp: Stamp::new(Timestamp(seq * 10), Seq(seq)),
        payload: Payload::Write {
            offset: Offset(seq * 512),
            data: Bytes::from(vec![seq as u8; len]),
        },
    }
}

/// Packet `seq` of `pair` among several: the pairs' stamps interleave.
fn pkt_of(pair: u32, seq: u64, len: usize) -> Packet {
    Packet {
        pair: PairId(pair),
        stamp: Stamp::new(Timestamp(seq * 20 + u64::from(pair) * 10), Seq(seq)),
        ..pkt(seq, len)
    }
}

fn intake(budget: usize) -> Intake {
    Intake::new(RunTracker::new(PAIR, Stamp::ZERO), budget)
}

fn seqs(batch: &[Packet]) -> Vec<u64> {
    batch.iter().map(|p| p.stamp.seq.0).collect()
}

fn sack(i: &Intake) -> Vec<(u64, u64)> {
    i.tracker()
        .ack()
        .sack
        .iter()
        .map(|r: &SeqRange| (r.first.0, r.last.0))
        .collect()
}

fn head(i: &Intake) -> u64 {
    i.tracker().head().seq.0
}

/// A temp dir on tmpfs if there is one (the fsyncs are free there).
fn fast_tempdir() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        if let Ok(d) = tempfile::Builder::new()
            .prefix("tidemark-intake")
            .tempdir_in(shm)
        {
            return d;
        }
    }
    tempfile::tempdir().expect("temp dir")
}

#[test]
fn packets_above_a_gap_wait_in_memory_and_go_to_the_journal_in_order() {
    let mut i = intake(1 << 20);
    assert_eq!(i.offer(pkt(3, 100)), Offer::Ahead);
    assert_eq!(i.offer(pkt(2, 100)), Offer::Ahead);
    assert_eq!(i.offer(pkt(5, 100)), Offer::Ahead);
    assert_eq!(i.take_batch(), None, "nothing above a gap is journaled");
    assert_eq!(
        sack(&i),
        vec![(2, 3), (5, 5)],
        "held packets are acknowledged selectively"
    );
    assert_eq!(head(&i), 0);

    // The packet the head waits for takes those right after it along.
    assert_eq!(i.offer(pkt(1, 100)), Offer::Queued);
    assert_eq!(i.frontier(), Seq(3));
    assert_eq!(head(&i), 0, "nothing counts before it is durable (I3)");
    let batch = i.take_batch().expect("a batch");
    assert_eq!(seqs(&batch), vec![1, 2, 3]);

    // Meanwhile: a duplicate of what is in flight, the next one, one further ahead.
    assert_eq!(i.offer(pkt(2, 100)), Offer::Duplicate);
    assert_eq!(
        i.offer(pkt(4, 100)),
        Offer::Queued,
        "continues the batch in flight"
    );
    assert_eq!(i.frontier(), Seq(5), "and takes 5, held, along");
    assert_eq!(i.offer(pkt(7, 100)), Offer::Ahead);
    assert_eq!(i.take_batch(), None, "one batch in flight at a time");
    assert_eq!(head(&i), 0);

    i.journaled(batch);
    assert_eq!(head(&i), 3);
    assert_eq!(i.tracker().ack().cum, Seq(3));
    let batch = i.take_batch().expect("the next batch");
    assert_eq!(seqs(&batch), vec![4, 5]);
    i.journaled(batch);
    assert_eq!(head(&i), 5);
    assert_eq!(sack(&i), vec![(7, 7)]);

    i.mark_applied(Seq(5));
    assert_eq!(i.pending_bytes(), pkt(7, 100).payload.wire_len());
    assert_eq!(i.offer(pkt(4, 100)), Offer::Duplicate, "applied: stale");
}

#[test]
fn a_refused_batch_drops_only_the_packet_after_the_head() {
    let mut i = intake(1 << 20);
    i.offer(pkt(3, 100));
    i.offer(pkt(1, 100));
    i.offer(pkt(2, 100));
    let batch = i.take_batch().expect("a batch");
    assert_eq!(seqs(&batch), vec![1, 2, 3]);
    i.offer(pkt(4, 100)); // queued behind the batch in flight
    i.refused(batch);
    assert_eq!(head(&i), 0);
    assert_eq!(i.frontier(), Seq(0));
    assert_eq!(i.stats().refused, 1);
    // The primary sees 2..4 still held (no renege) and sends 1 again.
    assert_eq!(sack(&i), vec![(2, 4)]);
    assert_eq!(i.take_batch(), None);
    assert_eq!(i.offer(pkt(1, 100)), Offer::Queued);
    let batch = i.take_batch().expect("a batch");
    assert_eq!(seqs(&batch), vec![1, 2, 3, 4]);
    i.journaled(batch);
    assert_eq!(head(&i), 4);
    assert_eq!(i.pending_bytes(), 4 * pkt(1, 100).payload.wire_len());
}

#[test]
fn flow_control_takes_the_packet_after_the_journaled_ones_whatever_is_held_above_a_gap() {
    let len = pkt(1, 1000).payload.wire_len();
    let mut i = intake(4 * len);
    // Out of order far ahead: three quarters of the budget.
    assert_eq!(i.offer(pkt(100, 1000)), Offer::Ahead);
    assert_eq!(i.offer(pkt(101, 1000)), Offer::Ahead);
    assert_eq!(i.offer(pkt(102, 1000)), Offer::Ahead);
    assert_eq!(i.offer(pkt(103, 1000)), Offer::NoRoom);
    // Near the head: the whole budget.
    assert_eq!(i.offer(pkt(3, 1000)), Offer::Ahead);
    assert_eq!(i.offer(pkt(4, 1000)), Offer::NoRoom);
    assert_eq!(i.pending_bytes(), 4 * len);
    // The packet the head waits for: whatever is held in memory.
    assert_eq!(i.offer(pkt(1, 1000)), Offer::Queued);
    let batch = i.take_batch().expect("a batch");
    // The one right after the batch in flight too, taking 3 along.
    assert_eq!(i.offer(pkt(2, 1000)), Offer::Queued);
    assert_eq!(i.frontier(), Seq(3));
    i.journaled(batch);
    assert_eq!(i.run_bytes(), len);
    let batch = i.take_batch().expect("2 and 3");
    i.journaled(batch);
    assert_eq!(i.run_bytes(), 3 * len);
    assert_eq!(i.offer(pkt(4, 1000)), Offer::Queued);
    let batch = i.take_batch().expect("4");
    i.journaled(batch);
    assert_eq!(i.run_bytes(), 4 * len);
    // The run fills the budget: the next waits until some of it is applied, so that a
    // pair the limit does not wait for cannot fill a journal other pairs share.
    assert_eq!(i.offer(pkt(5, 1000)), Offer::NoRoom);
    i.mark_applied(Seq(4));
    assert_eq!(i.run_bytes(), 0);
    assert_eq!(i.offer(pkt(5, 1000)), Offer::Queued);
    assert_eq!(i.stats().no_room, 3);
}

/// A secondary system: the remote units of `pairs` pairs sharing one journal, each with
/// half the journal split evenly as its budget (as the engine does). Each unit journals
/// what its intake queues (as `SharedJournal::append` does: on `Full`, one sync to
/// reclaim and one retry); the commit limit is the earliest head time stamp; what it
/// lets apply is applied at once and the applied point recorded.
struct Site {
    units: Vec<Intake>,
    journal: Journal,
    _dir: tempfile::TempDir,
    /// Per pair, the highest seq journaled: the journal got 1..=it, in order.
    journaled: Vec<u64>,
    refusals: u64,
}

impl Site {
    fn new(capacity: u64, pairs: usize) -> Self {
        let dir = fast_tempdir();
        let (journal, _) =
            Journal::open(dir.path(), JournalOptions::with_capacity(capacity)).expect("open");
        let budget = capacity as usize / 2 / pairs;
        Site {
            units: (0..pairs)
                .map(|p| Intake::new(RunTracker::new(PairId(p as u32), Stamp::ZERO), budget))
                .collect(),
            journal,
            _dir: dir,
            journaled: vec![0; pairs],
            refusals: 0,
        }
    }

    fn offer(&mut self, p: Packet) -> Offer {
        let o = self.units[p.pair.0 as usize].offer(p);
        self.pump();
        o
    }

    fn pump(&mut self) {
        for (u, intake) in self.units.iter_mut().enumerate() {
            while let Some(batch) = intake.take_batch() {
                let first = batch[0].stamp.seq.0;
                let last = batch[batch.len() - 1].stamp.seq.0;
                assert_eq!(
                    first,
                    self.journaled[u] + 1,
                    "the journal gets a pair in seq order"
                );
                assert_eq!(last - first + 1, batch.len() as u64, "a batch has no gaps");
                let records: Vec<Record> = batch.iter().cloned().map(Record::Packet).collect();
                let res = match self.journal.append(&records) {
                    Err(JournalError::Full { .. }) => {
                        self.journal.sync().expect("sync");
                        self.journal.append(&records)
                    }
                    other => other,
                };
                match res {
                    Ok(()) => {
                        self.journal.sync().expect("sync");
                        self.journaled[u] = last;
                        intake.journaled(batch);
                    }
                    Err(JournalError::Full { .. }) => {
                        self.refusals += 1;
                        intake.refused(batch);
                        break;
                    }
                    Err(e) => panic!("journal: {e}"),
                }
            }
            let t = intake.tracker();
            assert!(
                t.head().seq.0 <= self.journaled[u],
                "the run counts only journaled packets"
            );
            let run: usize = t.run().map(|p| p.payload.wire_len()).sum();
            assert_eq!(intake.run_bytes(), run, "run bytes");
        }
        let limit = self
            .units
            .iter()
            .map(|i| i.tracker().head().ts)
            .min()
            .unwrap_or_default();
        for intake in &mut self.units {
            let t = intake.tracker();
            let Some(upto) = t.select(limit).last().map(|p| p.stamp.seq) else {
                continue;
            };
            let pair = t.pair();
            intake.mark_applied(upto);
            let stamp = intake.tracker().applied();
            self.journal
                .append(&[Record::Applied { pair, stamp }])
                .expect("a watermark is never refused");
            self.journal.sync().expect("sync");
        }
    }

    fn applied(&self, pair: usize) -> u64 {
        self.units[pair].tracker().applied().seq.0
    }
}

/// The mechanism behind the stall: the journal reclaims segments oldest first, so one
/// packet journaled above a gap keeps every segment after it, however much of them is
/// applied (and recorded). Journaled on arrival, the packet that closes the gap is then
/// refused for good: only it could free the journal.
#[test]
fn a_packet_journaled_above_a_gap_pins_every_later_segment() {
    let dir = fast_tempdir();
    let (mut j, _) =
        Journal::open(dir.path(), JournalOptions::with_capacity(1 << 20)).expect("open");
    let rec = |seq| vec![Record::Packet(pkt(seq, 8 << 10))];
    j.append(&rec(200)).expect("the first packet fits");
    j.sync().expect("sync");
    let mut refused = None;
    for seq in 1..=198 {
        if let Err(e) = j.append(&rec(seq)) {
            assert!(matches!(e, JournalError::Full { .. }), "{e}");
            refused = Some(seq);
            break;
        }
        let stamp = pkt(seq, 0).stamp;
        j.append(&[Record::Applied { pair: PAIR, stamp }])
            .expect("watermark");
        j.sync().expect("sync");
    }
    let refused = refused.expect("1 MiB of 8 KiB packets fills up before 198");
    // Everything but packet 200 is applied and recorded, synced; still nothing frees.
    j.sync().expect("sync");
    assert!(matches!(
        j.append(&rec(refused)),
        Err(JournalError::Full { .. })
    ));
    assert!(j.used() > (1 << 20) - (32 << 10), "used {}", j.used());
}

/// The same arrivals through the intake: packet 200 waits in memory, 1..198 are
/// journaled, applied and reclaimed, and 199 brings 200 along.
#[test]
fn the_packet_that_closes_a_gap_always_finds_room() {
    let mut r = Site::new(1 << 20, 1);
    assert_eq!(r.offer(pkt(200, 8 << 10)), Offer::Ahead);
    for seq in 1..=198 {
        assert_eq!(r.offer(pkt(seq, 8 << 10)), Offer::Queued, "{seq}");
        assert_eq!(r.applied(0), seq);
    }
    assert_eq!(r.offer(pkt(199, 8 << 10)), Offer::Queued);
    assert_eq!(r.applied(0), 200);
    assert_eq!(r.refusals, 0);
    assert!(
        r.journal.used() < 4 * (64 << 10),
        "used {}",
        r.journal.used()
    );
}

/// Two pairs share a secondary's journal. Pair 1's first packet is held up on the path
/// while pair 0 writes on in order: the commit limit waits for pair 1, so pair 0's run
/// cannot be applied. Were the packet right after pair 0's head always taken (as before),
/// its run would fill the shared journal, and pair 1's first packet, the one the limit
/// and all that space wait for, would be refused for good. The run is held to its budget
/// instead; pair 1's first packet finds room.
#[test]
fn a_pair_the_limit_does_not_wait_for_cannot_fill_a_shared_journal() {
    let n = 300;
    let mut site = Site::new(1 << 20, 2);
    let mut rounds = 0;
    while site.applied(0) < n || site.applied(1) < n {
        rounds += 1;
        assert!(
            rounds <= 200,
            "stalled: applied {} and {}, runs of {} and {} bytes, journal used {}",
            site.applied(0),
            site.applied(1),
            site.units[0].run_bytes(),
            site.units[1].run_bytes(),
            site.journal.used()
        );
        for pair in 0..2u32 {
            let ack = site.units[pair as usize].tracker().ack();
            let sacked = |s: u64| ack.sack.iter().any(|g| g.first.0 <= s && s <= g.last.0);
            for seq in (ack.cum.0 + 1..=(ack.cum.0 + 64).min(n)).filter(|&s| !sacked(s)) {
                if pair == 1 && seq == 1 && rounds < 20 {
                    continue; // held up on the path
                }
                site.offer(pkt_of(pair, seq, 8 << 10));
            }
            // Idle once everything is sent: a heartbeat lets the head's time stamp move.
            site.units[pair as usize].handle_heartbeat(Heartbeat {
                pair: PairId(pair),
                stamp: Stamp::new(Timestamp(u64::MAX), Seq(n)),
            });
        }
        site.pump();
    }
    assert!(rounds >= 20, "pair 1 waited for its first packet");
}

fn seeds(fixed: std::ops::Range<u64>) -> Vec<u64> {
    let mut v: Vec<u64> = fixed.collect();
    if let Some(s) = std::env::var("TIDEMARK_INTAKE_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        v.push(s);
    }
    v
}

/// A sender that retransmits every packet of its window neither acknowledged
/// cumulatively nor selectively, each round, over a path that loses, duplicates,
/// reorders and delays some datagrams by several rounds; packets of random sizes up to a quarter of a segment; a small journal.
/// Every packet must be applied within a bounded number of rounds (I5), the journal must
/// get the packets in seq order, and the run count only journaled packets (I3).
#[test]
fn any_arrival_order_replicates_everything_through_a_small_journal() {
    for seed in seeds(0..48) {
        let mut rng = Pcg64::seed_from_u64(seed);
        let capacity: u64 = [1 << 20, 2 << 20][rng.random_range(0..2)];
        let segment = JournalOptions::with_capacity(capacity).segment_size as usize;
        let n: u64 = 400;
        let max_len = rng.random_range(64..=segment / 4 - 64);
        let lens: Vec<usize> = (0..=n).map(|_| rng.random_range(1..=max_len)).collect();
        let window: u64 = rng.random_range(4..=96);
        let loss = rng.random_range(0.0..0.3);
        let mut r = Site::new(capacity, 1);
        let mut rounds = 0;
        let mut delayed: Vec<(u64, u32)> = Vec::new();
        while r.applied(0) < n {
            rounds += 1;
            assert!(
                rounds <= 2_000,
                "seed {seed}: stalled at applied {} head {} frontier {} pending {} \
                 journal used {} (capacity {capacity}, max packet {max_len}, window {window})",
                r.applied(0),
                head(&r.units[0]),
                r.units[0].frontier().0,
                r.units[0].pending_bytes(),
                r.journal.used(),
            );
            let ack = r.units[0].tracker().ack();
            let sacked = |s: u64| ack.sack.iter().any(|g| g.first.0 <= s && s <= g.last.0);
            let mut flight: Vec<u64> = (ack.cum.0 + 1..=(ack.cum.0 + window).min(n))
                .filter(|&s| !sacked(s))
                .collect();
            // Reordering: a few swaps; duplication: a few repeats.
            for _ in 0..flight.len() / 2 {
                let (a, b) = (
                    rng.random_range(0..flight.len()),
                    rng.random_range(0..flight.len()),
                );
                flight.swap(a, b);
            }
            if rng.random_bool(0.1) {
                flight.shuffle(&mut rng);
            }
            // Some datagrams take a few rounds longer than the rest.
            let mut arriving: Vec<u64> = Vec::new();
            delayed.retain_mut(|(s, rounds)| {
                *rounds -= 1;
                if *rounds == 0 {
                    arriving.push(*s);
                }
                *rounds > 0
            });
            for s in flight {
                for _ in 0..1 + usize::from(rng.random_bool(0.05)) {
                    if rng.random_bool(loss) {
                        continue;
                    }
                    if rng.random_bool(0.05) {
                        delayed.push((s, rng.random_range(1..=8)));
                    } else {
                        arriving.push(s);
                    }
                }
            }
            for s in arriving {
                r.offer(pkt(s, lens[s as usize]));
            }
            assert!(
                r.units[0].pending_bytes() <= r.units[0].budget + max_len + 16,
                "seed {seed}: pending {} over the budget",
                r.units[0].pending_bytes()
            );
        }
        assert_eq!(r.journaled[0], n, "seed {seed}");
    }
}

fn restart(seq: u64) -> Packet {
    Packet {
        pair: PAIR,
        stamp: Stamp::new(Timestamp(seq * 10), Seq(seq)),
        payload: Payload::Mark(crate::Mark::Restart),
    }
}

/// A primary that lost packets from its journal restarts its stream above its
/// reservation with a `Restart` mark: the remote gives the gap below it up once what it
/// received in order is applied, drops what it held in the gap, and journals the mark
/// with the packets after it.
#[test]
fn a_restart_mark_gives_the_gap_below_it_up_once_the_run_is_applied() {
    let mut i = intake(1 << 20);
    // The old stream: 1-2 journaled, 4 held above the gap (3 was lost with the primary).
    assert_eq!(i.offer(pkt(1, 100)), Offer::Queued);
    assert_eq!(i.offer(pkt(2, 100)), Offer::Queued);
    let b = i.take_batch().unwrap();
    i.journaled(b);
    assert_eq!(i.offer(pkt(4, 100)), Offer::Ahead);
    // The new stream: Restart at 101, then 102, 103.
    assert_eq!(i.offer(pkt(102, 100)), Offer::Ahead);
    assert_eq!(
        i.offer(restart(101)),
        Offer::Ahead,
        "the run 1-2 is not applied yet"
    );
    assert_eq!(i.offer(pkt(103, 100)), Offer::Ahead);
    assert_eq!(head(&i), 2);
    // Applying the run lets the gap go: 4 is dropped, 101-103 go to the journal.
    i.mark_applied(Seq(2));
    let b = i.take_batch().expect("the restart goes to the journal");
    assert_eq!(seqs(&b), vec![101, 102, 103]);
    i.journaled(b);
    assert_eq!(head(&i), 103);
    assert_eq!(i.tracker().applied().seq, Seq(100));
    assert_eq!(i.stats().restarts, 1);
    assert_eq!(sack(&i), vec![]);
    // Old packets sent again are stale; the budget counts only the new run.
    assert_eq!(i.offer(pkt(3, 100)), Offer::Duplicate);
    assert_eq!(i.pending_bytes(), i.run_bytes());
    i.mark_applied(Seq(103));
    assert_eq!(i.pending_bytes(), 0);
}

/// With the run already applied the mark goes to the journal at once; a restart
/// recovered from the journal (durable above the gap) joins the run on recovery.
#[test]
fn a_restart_with_an_empty_run_goes_at_once_and_survives_recovery() {
    let mut i = intake(1 << 20);
    assert_eq!(i.offer(pkt(1, 10)), Offer::Queued);
    let b = i.take_batch().unwrap();
    i.journaled(b);
    i.mark_applied(Seq(1));
    assert_eq!(i.offer(restart(50)), Offer::Queued);
    assert_eq!(seqs(&i.take_batch().unwrap()), vec![50]);

    // Recovery: applied 1; the journal holds 50 (Restart) and 51.
    let mut r = Intake::new(RunTracker::new(PAIR, pkt(1, 10).stamp), 1 << 20);
    r.handle_durable(restart(50));
    r.handle_durable(pkt(51, 10));
    assert_eq!(head(&r), 51);
    assert_eq!(r.frontier(), Seq(51));
    assert_eq!(r.take_batch(), None, "nothing to journal again");
    // Not a restart: a plain gap stays a gap.
    let mut g = intake(1 << 20);
    assert_eq!(g.offer(pkt(5, 10)), Offer::Ahead);
    assert_eq!(head(&g), 0);
    assert_eq!(g.stats().restarts, 0);
}
