//! Fan-in throughput of the runtime-free core alone: one thread, no actors. Per pair a
//! `Sender` stamps payloads from a `HybridClock`, its packets go to the pair's
//! `RunTracker`, acknowledgements go back to the `Sender`, heads go to one `Orderer`,
//! and every release is applied with `select` + `mark_applied`. Elements are stamps.
//! The same fan-in through the whole actor engine is `actors/benches/fanin.rs`;
//! `cargo bench --bench fanin` at the workspace root runs both.
//!
//! One group, `core/*`: `send_recv_order_apply` (the whole path) and
//! `recv_order_apply` (the receive side alone, packets built by hand).
//! `cargo bench -p tidemark --bench fanin` runs it alone.

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput};
use rand::{Rng, SeedableRng};
use rand_pcg::Pcg64Mcg;
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tidemark::{
    HybridClock, Offset, OrderAction, Orderer, PairId, Payload, Rtt, RunTracker, Sender, Stamp,
    SystemId, Timestamp,
};

const FANIN: [usize; 4] = [1, 4, 16, 64];
/// Bytes per write.
const WRITE: usize = 64;
/// Bytes per unit.
const UNIT: u64 = 1 << 20;
/// Payloads per pair per round (as many as one `write_many` call of the actor bench).
const BATCH: usize = 64;

fn payload(rng: &mut Pcg64Mcg, data: &Bytes) -> Payload {
    let offset = rng.random_range(0..=(UNIT - WRITE as u64) / 8) * 8;
    Payload::Write {
        offset: Offset(offset),
        data: data.clone(),
    }
}

// ---------------------------------------------------------------- core alone

/// One consistency group's core state machines, driven by hand on one thread.
struct Core {
    /// As the engine holds it: shared, with a dynamically dispatched wall clock.
    clock: Arc<HybridClock>,
    senders: Vec<Sender>,
    trackers: Vec<RunTracker>,
    orderer: Orderer,
    rng: Pcg64Mcg,
    data: Bytes,
    out: Vec<tidemark::Packet>,
    applied: u64,
}

impl Core {
    fn new(n: usize) -> Core {
        let pairs: Vec<PairId> = (0..n as u32).map(PairId).collect();
        Core {
            // A wall clock that never moves: every stamp is `last + 1`, as under load.
            clock: Arc::new(HybridClock::new(|| 1u64)),
            senders: pairs
                .iter()
                .map(|&p| Sender::new(p, Stamp::ZERO, Duration::from_millis(10), Rtt::default()))
                .collect(),
            trackers: pairs
                .iter()
                .map(|&p| RunTracker::new(p, Stamp::ZERO))
                .collect(),
            orderer: Orderer::new(&pairs, &[SystemId(1)], Timestamp::ZERO).expect("group"),
            rng: Pcg64Mcg::seed_from_u64(n as u64),
            data: Bytes::from(vec![0xA5u8; WRITE]),
            out: Vec::with_capacity(BATCH),
            applied: 0,
        }
    }

    /// One round: every pair stamps and ships `BATCH` packets, its remote unit takes
    /// them, acknowledges and reports its head; each release is applied at once.
    fn round(&mut self, now: Instant) {
        for i in 0..self.senders.len() {
            let s = &mut self.senders[i];
            for _ in 0..BATCH {
                let p = payload(&mut self.rng, &self.data);
                s.push(self.clock.now(), p);
            }
            self.out.clear();
            s.poll_transmit(now, &mut self.out);
            let tr = &mut self.trackers[i];
            for p in self.out.drain(..) {
                tr.handle_packet(p);
            }
            s.handle_ack(now, &tr.ack());
            self.orderer.handle_head(tr.pair(), tr.head().ts);
            while let Some(a) = self.orderer.poll_action() {
                if let OrderAction::Release { limit, .. } = a {
                    for tr in &mut self.trackers {
                        let mut last = None;
                        for p in tr.select(limit) {
                            black_box(&p.payload);
                            last = Some(p.stamp.seq);
                        }
                        if let Some(seq) = last {
                            self.applied += seq.0 - tr.applied().seq.0;
                            tr.mark_applied(seq);
                        }
                    }
                }
            }
        }
    }
}

/// The receive side alone: packets built by hand with increasing stamps, no `Sender`.
struct Receive {
    next_ts: u64,
    seqs: Vec<u64>,
    trackers: Vec<RunTracker>,
    orderer: Orderer,
    rng: Pcg64Mcg,
    data: Bytes,
}

impl Receive {
    fn new(n: usize) -> Receive {
        let pairs: Vec<PairId> = (0..n as u32).map(PairId).collect();
        Receive {
            next_ts: 1,
            seqs: vec![0; n],
            trackers: pairs
                .iter()
                .map(|&p| RunTracker::new(p, Stamp::ZERO))
                .collect(),
            orderer: Orderer::new(&pairs, &[SystemId(1)], Timestamp::ZERO).expect("group"),
            rng: Pcg64Mcg::seed_from_u64(n as u64),
            data: Bytes::from(vec![0x5Au8; WRITE]),
        }
    }

    fn round(&mut self) {
        for i in 0..self.trackers.len() {
            let tr = &mut self.trackers[i];
            for _ in 0..BATCH {
                self.seqs[i] += 1;
                self.next_ts += 1;
                let p = tidemark::Packet {
                    pair: tr.pair(),
                    stamp: Stamp::new(Timestamp(self.next_ts), tidemark::Seq(self.seqs[i])),
                    payload: payload(&mut self.rng, &self.data),
                };
                tr.handle_packet(p);
            }
            self.orderer.handle_head(tr.pair(), tr.head().ts);
            while let Some(a) = self.orderer.poll_action() {
                if let OrderAction::Release { limit, .. } = a {
                    for tr in &mut self.trackers {
                        if let Some(seq) = tr.select(limit).last().map(|p| p.stamp.seq) {
                            tr.mark_applied(seq);
                        }
                    }
                }
            }
        }
    }
}

fn bench_core(c: &mut Criterion) {
    let mut g = c.benchmark_group("core");
    g.sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    for &n in &FANIN {
        // One iteration is one round: BATCH stamps per pair.
        g.throughput(Throughput::Elements((n * BATCH) as u64));
        g.bench_with_input(BenchmarkId::new("send_recv_order_apply", n), &n, |b, &n| {
            let mut core = Core::new(n);
            let now = Instant::now();
            b.iter(|| core.round(now));
            // The limit trails by at most one round: a pair's latest batch is applied
            // once every other pair has reported a later head.
            let sent: u64 = core.senders.iter().map(|s| s.last().seq.0).sum();
            assert!(
                sent - core.applied <= (n * BATCH) as u64,
                "applied {} of {sent}",
                core.applied
            );
        });
        g.bench_with_input(BenchmarkId::new("recv_order_apply", n), &n, |b, &n| {
            let mut r = Receive::new(n);
            b.iter(|| r.round());
            let applied: u64 = r.trackers.iter().map(|t| t.applied().seq.0).sum();
            let sent: u64 = r.seqs.iter().sum();
            assert!(
                sent - applied <= (n * BATCH) as u64,
                "applied {applied} of {sent}"
            );
        });
    }
    g.finish();
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    bench_core(&mut c);
    c.final_summary();
}
