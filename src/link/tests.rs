use super::*;
use crate::packet::{Ack, HeadReport, Heartbeat};
use crate::types::{Offset, Stamp, Timestamp};

const KEY: [u8; 32] = [9; 32];
const A: SystemId = SystemId(0);
const B: SystemId = SystemId(1);

fn session(epoch: u64) -> Session {
    Session {
        epoch,
        nonce: [epoch as u8; 16],
    }
}

/// A link whose window and pacer never hold anything back (for tests of packing,
/// splitting and reassembly).
fn open() -> LinkConfig {
    LinkConfig {
        burst: 1 << 40,
        initial_window: crate::ship::congestion::MAX_CWND,
        ..LinkConfig::default()
    }
}

fn pair(cfg: LinkConfig) -> (LinkCore, LinkCore) {
    (
        LinkCore::new(A, &[A, B], &KEY, session(1), cfg),
        LinkCore::new(B, &[A, B], &KEY, session(2), cfg),
    )
}

fn write(seq: u64, len: usize) -> Packet {
    Packet {
        pair: PairId(3),
        stamp: Stamp::new(Timestamp(1000 + seq), Seq(seq)),
        payload: Payload::Write {
            offset: Offset(512 * seq),
            data: Bytes::from(
                (0..len)
                    .map(|i| (i * 7 + seq as usize) as u8)
                    .collect::<Vec<_>>(),
            ),
        },
    }
}

fn datagrams(l: &mut LinkCore, now: Instant) -> Vec<Vec<u8>> {
    std::iter::from_fn(|| l.poll_transmit(now).map(|(_, d)| d)).collect()
}

fn deliver(to: &mut LinkCore, now: Instant, ds: Vec<Vec<u8>>) -> Vec<Message> {
    let mut out = Vec::new();
    for mut d in ds {
        if let Some((_, msgs)) = to.handle_datagram(now, &mut d) {
            out.extend(msgs);
        }
    }
    out
}

#[test]
fn small_messages_share_datagrams_within_the_mtu() {
    let (mut a, mut b) = pair(open());
    let now = Instant::now();
    let ps: Vec<Packet> = (1..=40).map(|s| write(s, 16)).collect();
    a.send(B, Message::Data(ps.clone()));
    a.send(
        B,
        Message::Heartbeats(vec![Heartbeat {
            pair: PairId(1),
            stamp: Stamp::ZERO,
        }]),
    );
    a.send(
        B,
        Message::Release {
            limit: Timestamp(5),
            epoch: None,
        },
    );
    let ds = datagrams(&mut a, now);
    assert!(
        ds.len() < 10,
        "{} datagrams for 42 small messages",
        ds.len()
    );
    assert!(ds.iter().all(|d| d.len() <= 1400));
    let got = deliver(&mut b, now, ds);
    let data: Vec<Packet> = got
        .iter()
        .filter_map(|m| match m {
            Message::Data(v) => Some(v[0].clone()),
            _ => None,
        })
        .collect();
    assert_eq!(data, ps);
    assert!(got.contains(&Message::Release {
        limit: Timestamp(5),
        epoch: None,
    }));
    assert_eq!(b.poll_event(), Some(LinkEvent::Up(A)));
}

#[test]
fn large_writes_are_split_and_reassembled_in_any_order_with_duplicates() {
    let (mut a, mut b) = pair(open());
    let now = Instant::now();
    let p = write(1, 100_000);
    a.send(B, Message::Data(vec![p.clone()]));
    let mut ds = datagrams(&mut a, now);
    assert!(ds.len() > 70 && ds.iter().all(|d| d.len() <= 1400));
    // reverse order, and resend the first half again (a retransmission: new datagrams)
    ds.reverse();
    let got = deliver(&mut b, now, ds);
    assert_eq!(got, vec![Message::Data(vec![p.clone()])]);
    a.send(B, Message::Data(vec![p.clone()]));
    let again = datagrams(&mut a, now);
    let got = deliver(&mut b, now, again);
    assert_eq!(
        got,
        vec![Message::Data(vec![p])],
        "a retransmitted packet reassembles again"
    );
    assert_eq!(b.counters().reassembled, 2);
}

#[test]
fn lost_parts_leave_nothing_and_reassembly_memory_is_bounded() {
    let cfg = LinkConfig {
        reassembly_bytes: 250_000,
        ..open()
    };
    let (mut a, mut b) = pair(cfg);
    let now = Instant::now();
    for s in 1..=5 {
        a.send(B, Message::Data(vec![write(s, 100_000)]));
    }
    let ds = datagrams(&mut a, now);
    // drop every 10th datagram: no packet completes
    let kept: Vec<_> = ds
        .into_iter()
        .enumerate()
        .filter(|(i, _)| i % 10 != 3)
        .map(|(_, d)| d)
        .collect();
    let got = deliver(&mut b, now, kept);
    assert!(got.iter().all(|m| !matches!(m, Message::Data(_))));
    assert!(b.partial_bytes <= 250_000);
    assert!(b.counters().reassembly_evicted >= 3);
}

#[test]
fn forged_replayed_truncated_flipped_oversized_are_dropped_and_counted() {
    let (mut a, mut b) = pair(LinkConfig {
        max_datagram: 2000,
        ..open()
    });
    let now = Instant::now();
    a.send(
        B,
        Message::Release {
            limit: Timestamp(9),
            epoch: None,
        },
    );
    let d = datagrams(&mut a, now).remove(0);
    let mut evil = LinkCore::new(A, &[A, B], &[1; 32], session(1), LinkConfig::default());
    evil.send(
        B,
        Message::Release {
            limit: Timestamp(u64::MAX),
            epoch: None,
        },
    );
    let forged = datagrams(&mut evil, now).remove(0);
    let mut flipped = d.clone();
    let n = flipped.len();
    flipped[n / 2] ^= 0x40;
    let cases: Vec<Vec<u8>> = vec![
        forged,
        d[..d.len() - 3].to_vec(),
        flipped,
        vec![1; 3000],
        vec![],
    ];
    assert!(deliver(&mut b, now, cases).is_empty());
    assert_eq!(
        deliver(&mut b, now, vec![d.clone()]),
        vec![Message::Release {
            limit: Timestamp(9),
            epoch: None,
        }]
    );
    assert!(deliver(&mut b, now, vec![d]).is_empty(), "replay");
    let c = b.counters();
    assert_eq!(c.dropped_unauthenticated, 3);
    assert_eq!(c.dropped_oversize, 1);
    assert_eq!(c.dropped_malformed, 1);
    assert_eq!(c.dropped_replay, 1);
    assert_eq!(c.dropped(), 6);
}

#[test]
fn pacing_spreads_datagrams_over_time() {
    let cfg = LinkConfig {
        rate: 1_000_000,
        burst: 5_000,
        ..LinkConfig::default()
    };
    let (mut a, _) = pair(cfg);
    let t0 = Instant::now();
    for s in 1..=20 {
        a.send(B, Message::Data(vec![write(s, 1000)]));
    }
    let mut sent = 0;
    while a.poll_transmit(t0).is_some() {
        sent += 1;
    }
    assert!((3..=5).contains(&sent), "burst let {sent} out");
    let next = a.poll_timeout(t0).expect("pacer wants a wake-up");
    assert!(next > t0);
    // Step simulated time in 1 ms until everything left: ~22 KB at 1 MB/s after a 5 KB
    // burst takes ~17 ms.
    let mut t = t0;
    let mut left = 20 - sent;
    while left > 0 {
        t += Duration::from_millis(1);
        while a.poll_transmit(t).is_some() {
            left -= 1;
        }
        assert!(t - t0 < Duration::from_millis(100), "pacer stalled");
    }
    let took = t - t0;
    assert!(
        took >= Duration::from_millis(12) && took <= Duration::from_millis(25),
        "{took:?}"
    );
}

#[test]
fn liveness_and_restart_events() {
    let cfg = LinkConfig {
        peer_timeout: Duration::from_millis(100),
        ..open()
    };
    let (mut a, mut b) = pair(cfg);
    let t0 = Instant::now();
    a.send(B, Message::Acks(vec![Ack::default()]));
    deliver(&mut b, t0, datagrams(&mut a, t0));
    assert_eq!(b.poll_event(), Some(LinkEvent::Up(A)));
    assert!(b.is_up(A));
    b.handle_timeout(t0 + Duration::from_millis(50));
    assert_eq!(b.poll_event(), None);
    b.handle_timeout(t0 + Duration::from_millis(150));
    assert_eq!(b.poll_event(), Some(LinkEvent::Down(A)));
    assert!(!b.is_up(A));
    // A restarts: new session, newer epoch
    let mut a2 = LinkCore::new(A, &[A, B], &KEY, session(5), cfg);
    let t1 = t0 + Duration::from_millis(200);
    a2.send(
        B,
        Message::Heads(vec![HeadReport {
            pair: PairId(0),
            head: Stamp::ZERO,
            resync: None,
        }]),
    );
    assert_eq!(deliver(&mut b, t1, datagrams(&mut a2, t1)).len(), 1);
    assert_eq!(b.poll_event(), Some(LinkEvent::Restarted(A)));
    assert_eq!(b.poll_event(), Some(LinkEvent::Up(A)));
    // the old session is stale now
    a.send(B, Message::Acks(vec![Ack::default()]));
    assert!(deliver(&mut b, t1, datagrams(&mut a, t1)).is_empty());
    assert_eq!(b.counters().dropped_stale_session, 1);
}

/// Delivers `ds` to `b` except those `lose` picks; returns the data packets that came out.
fn deliver_some(
    b: &mut LinkCore,
    now: Instant,
    ds: Vec<Vec<u8>>,
    mut lose: impl FnMut(usize) -> bool,
) -> Vec<Packet> {
    let kept = ds
        .into_iter()
        .enumerate()
        .filter(|(i, _)| !lose(*i))
        .map(|(_, d)| d)
        .collect();
    deliver(b, now, kept)
        .into_iter()
        .filter_map(|m| match m {
            Message::Data(mut v) => v.pop(),
            _ => None,
        })
        .collect()
}

#[test]
fn a_retransmission_fills_the_holes_of_earlier_attempts() {
    let (mut a, mut b) = pair(open());
    let now = Instant::now();
    let p = write(1, 64 * 1024);
    a.send(B, Message::Data(vec![p.clone()]));
    let first = datagrams(&mut a, now);
    assert!(first.len() > 40);
    // The first attempt loses every even datagram, the retransmission every odd one:
    // neither is whole, together they are.
    assert!(deliver_some(&mut b, now, first, |i| i % 2 == 0).is_empty());
    a.send(B, Message::Data(vec![p.clone()]));
    let second = datagrams(&mut a, now);
    assert_eq!(deliver_some(&mut b, now, second, |i| i % 2 == 1), vec![p]);
    assert_eq!(b.counters().reassembled, 1);
    assert_eq!(b.partial.len(), 0);
    assert_eq!(b.partial_bytes, 0);
}

#[test]
fn lossy_rounds_deliver_every_split_write_in_a_few_retransmissions() {
    use rand::{Rng, SeedableRng};
    let seed = crate::test_seed(20261129);
    let mut rng = rand_pcg::Pcg64Mcg::seed_from_u64(seed);
    let (mut a, mut b) = pair(open());
    let now = Instant::now();
    let mut missing: BTreeMap<Seq, Packet> =
        (1..=20).map(|s| (Seq(s), write(s, 64 * 1024))).collect();
    // 10% datagram loss: a 64 KiB write (~47 datagrams) arrives whole in one attempt
    // with probability 0.9^47 < 1%. Keeping the parts of every attempt, a part is still
    // missing after 6 attempts with probability 1e-6.
    let mut rounds = 0;
    while !missing.is_empty() {
        rounds += 1;
        assert!(
            rounds <= 6,
            "seed {seed}: {} writes still missing after 6 rounds",
            missing.len()
        );
        for p in missing.values() {
            a.send(B, Message::Data(vec![p.clone()]));
        }
        let ds = datagrams(&mut a, now);
        for got in deliver_some(&mut b, now, ds, |_| rng.random_bool(0.1)) {
            let want = missing.remove(&got.stamp.seq);
            assert_eq!(
                want.as_ref(),
                Some(&got),
                "seed {seed}: delivered twice or wrong"
            );
        }
    }
    assert_eq!(b.counters().reassembled, 20, "seed {seed}");
    // Parts of an attempt that arrive after their packet completed (from an earlier
    // attempt's parts) start a partial that never completes: bounded, and the least
    // recently fed, so evicted first.
    assert!(b.partial.len() <= 20, "seed {seed}");
}

#[test]
fn partial_packets_are_bounded_in_count_least_recent_evicted() {
    let cfg = LinkConfig {
        reassembly_packets: 3,
        ..open()
    };
    let (mut a, mut b) = pair(cfg);
    let now = Instant::now();
    // Five packets, each missing its first datagram.
    for s in 1..=5 {
        a.send(B, Message::Data(vec![write(s, 10_000)]));
        let ds = datagrams(&mut a, now);
        assert!(deliver_some(&mut b, now, ds, |i| i == 0).is_empty());
        assert!(b.partial.len() <= 3);
    }
    assert_eq!(b.partial.len(), 3);
    assert_eq!(b.counters().reassembly_evicted, 2);
    // Packets 3..5 complete from their missing first datagram alone; packets 1 and 2
    // were evicted: their retransmission starts over and completes whole.
    for s in [3, 4, 5, 1, 2] {
        a.send(B, Message::Data(vec![write(s, 10_000)]));
        let ds = datagrams(&mut a, now);
        let only_first = |i: usize| i != 0;
        let got = if s <= 2 {
            deliver_some(&mut b, now, ds, |_| false)
        } else {
            deliver_some(&mut b, now, ds, only_first)
        };
        assert_eq!(got, vec![write(s, 10_000)], "packet {s}");
    }
    assert_eq!(b.partial.len(), 0);
}

#[test]
fn parts_overlapping_differently_still_complete() {
    let mut p = Partial {
        offset: Offset(0),
        raw: None,
        buf: Vec::new(),
        total: 100,
        have: Vec::new(),
        touched: 0,
    };
    assert_eq!(p.cover(10, 20), 10);
    assert_eq!(p.cover(30, 40), 10);
    assert_eq!(p.cover(15, 35), 10);
    assert_eq!(p.have, vec![(10, 40)]);
    assert_eq!(p.cover(10, 40), 0);
    assert_eq!(p.cover(0, 10), 10);
    assert!(!p.complete());
    assert_eq!(p.cover(40, 100), 60);
    assert!(p.complete());
}

/// A mark (a zero-length packet) travels like any packet, between small writes and the
/// parts of a split one, and is never split itself.
#[test]
fn marks_travel_between_writes_like_any_packet() {
    use crate::packet::Mark;
    let (mut a, mut b) = pair(open());
    let now = Instant::now();
    let mark = |seq: u64, m: Mark| Packet {
        pair: PairId(3),
        stamp: Stamp::new(Timestamp(1000 + seq), Seq(seq)),
        payload: Payload::Mark(m),
    };
    let ps = vec![
        mark(1, Mark::SyncBegin),
        write(2, 16),
        write(3, 20_000),
        mark(4, Mark::SyncDone),
    ];
    a.send(B, Message::Data(ps.clone()));
    let mut got: Vec<Packet> = deliver(&mut b, now, datagrams(&mut a, now))
        .into_iter()
        .flat_map(|m| match m {
            Message::Data(ps) => ps,
            _ => Vec::new(),
        })
        .collect();
    got.sort_by_key(|p| p.stamp.seq);
    assert_eq!(got, ps);
}

/// A one-way path through a bottleneck: a FIFO queue of at most `cap` bytes (a relay's
/// socket receive buffer, a NAT box) drained at `rate` bytes per second, then `delay`,
/// with random loss on top. A datagram that finds the queue full is dropped: what a
/// burst beyond the queue loses is always its tail. With `reorder`, that share of the
/// datagrams is held 0.5 to 2 ms more after the queue (as `wan-sim --reorder` does).
struct Bottleneck {
    cap: usize,
    rate: f64,
    delay: Duration,
    loss: f64,
    reorder: f64,
    /// Departure times and sizes of what is queued or on the wire, oldest first.
    queue: VecDeque<(Instant, usize)>,
    /// In flight by arrival time (then by order sent).
    transit: BTreeMap<(Instant, u64), Vec<u8>>,
    pushed: u64,
    last_departure: Option<Instant>,
    dropped: u64,
}

/// One step of simulated time `t`: both links' timers, what each transmits onto its path
/// (`a` → `b` through `paths.0`, back through `paths.1`), and what arrives. Writes `b`
/// receives are checked against `writes` (by seq) and their first arrival noted.
fn exchange(
    (a, b): (&mut LinkCore, &mut LinkCore),
    (ab, ba): (&mut Bottleneck, &mut Bottleneck),
    t: Instant,
    rng: &mut impl rand::Rng,
    (writes, delivered): (&[Packet], &mut [Option<Instant>]),
    seed: u64,
) {
    a.handle_timeout(t);
    b.handle_timeout(t);
    while let Some((_, d)) = a.poll_transmit(t) {
        ab.push(t, d, rng);
    }
    while let Some((_, d)) = b.poll_transmit(t) {
        ba.push(t, d, rng);
    }
    for got in deliver(b, t, ab.arrivals(t)) {
        if let Message::Data(ps) = got {
            for p in ps {
                let i = (p.stamp.seq.0 - 1) as usize;
                assert_eq!(p, writes[i], "seed {seed}: delivered intact");
                delivered[i].get_or_insert(t);
            }
        }
    }
    deliver(a, t, ba.arrivals(t));
}

/// Steps both links and their paths every 50 µs of simulated time until every write
/// of `writes` was delivered intact (returns when each was), calling `before(elapsed,
/// sender, return path, delivered so far)` first at each step to send or to change the
/// path; fails, with the seed, if that takes longer than `limit` simulated.
fn run_until_delivered(
    (a, b): (&mut LinkCore, &mut LinkCore),
    (ab, ba): (&mut Bottleneck, &mut Bottleneck),
    rng: &mut impl rand::Rng,
    writes: &[Packet],
    (seed, limit): (u64, Duration),
    mut before: impl FnMut(Duration, &mut LinkCore, &mut Bottleneck, &[Option<Instant>]),
) -> Vec<Option<Instant>> {
    let mut delivered: Vec<Option<Instant>> = vec![None; writes.len()];
    let t0 = Instant::now();
    let step = Duration::from_micros(50);
    let mut t = t0;
    while delivered.iter().any(Option::is_none) {
        assert!(
            t - t0 < limit,
            "seed {seed}: {} of {} delivered in {limit:?} simulated; {} dropped on the way; \
             sender {:?}",
            delivered.iter().filter(|d| d.is_some()).count(),
            writes.len(),
            ab.dropped,
            a.counters()
        );
        before(t - t0, a, ba, &delivered);
        exchange((a, b), (ab, ba), t, rng, (writes, &mut delivered), seed);
        t += step;
    }
    delivered
}

impl Bottleneck {
    fn new(cap: usize, rate: f64, delay: Duration, loss: f64) -> Self {
        Bottleneck {
            cap,
            rate,
            delay,
            loss,
            reorder: 0.0,
            queue: VecDeque::new(),
            transit: BTreeMap::new(),
            pushed: 0,
            last_departure: None,
            dropped: 0,
        }
    }

    fn push(&mut self, now: Instant, d: Vec<u8>, rng: &mut impl rand::Rng) {
        while self.queue.front().is_some_and(|(t, _)| *t <= now) {
            self.queue.pop_front();
        }
        let queued: usize = self.queue.iter().map(|(_, n)| n).sum();
        if queued + d.len() > self.cap || rng.random_bool(self.loss) {
            self.dropped += 1;
            return;
        }
        let start = self.last_departure.map_or(now, |t| t.max(now));
        let departure = start + Duration::from_secs_f64(d.len() as f64 / self.rate);
        self.last_departure = Some(departure);
        self.queue.push_back((departure, d.len()));
        let mut arrival = departure + self.delay;
        if self.reorder > 0.0 && rng.random_bool(self.reorder) {
            arrival += rng.random_range(Duration::from_micros(500)..=Duration::from_millis(2));
        }
        self.pushed += 1;
        self.transit.insert((arrival, self.pushed), d);
    }

    fn arrivals(&mut self, now: Instant) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        while self
            .transit
            .first_key_value()
            .is_some_and(|((t, _), _)| *t <= now)
        {
            out.extend(self.transit.pop_first().map(|(_, d)| d));
        }
        out
    }
}

/// The burst a path cannot carry, simulated deterministically: a 1 MiB write at
/// `mtu = 1400` (about 830 datagrams) and a 64 KiB write after it go through a
/// 208 KiB queue drained at 100 MB/s (a relay with the kernel's default receive
/// buffer), 1 ms each way, 1 % random loss. The writer resends a write whole every
/// 250 ms until the receiving link delivers it (the units' end-to-end backstop).
/// Unpaced and without the link's own recovery, every resend had the same shape and
/// lost the same tail, and the write never arrived (the relay observation of the
/// transport issue); paced, with lost datagrams' parts sent again alone, both arrive
/// in well under the simulated time.
#[test]
fn a_burst_larger_than_a_path_queue_arrives() {
    use rand::SeedableRng;
    let seed = crate::test_seed(20261202);
    let mut rng = rand_pcg::Pcg64Mcg::seed_from_u64(seed);
    let (mut a, mut b) = pair(LinkConfig::default());
    let mut ab = Bottleneck::new(208 << 10, 100e6, Duration::from_millis(1), 0.01);
    let mut ba = Bottleneck::new(8 << 20, 100e6, Duration::from_millis(1), 0.01);
    let writes = [write(1, 1 << 20), write(2, 64 << 10)];
    let resend_every = Duration::from_millis(250);
    let mut resent = 0;
    let mut next_resend = Duration::ZERO;
    run_until_delivered(
        (&mut a, &mut b),
        (&mut ab, &mut ba),
        &mut rng,
        &writes,
        (seed, Duration::from_secs(20)),
        |elapsed, a, _, delivered| {
            if elapsed >= next_resend {
                for (w, d) in writes.iter().zip(delivered) {
                    if d.is_none() {
                        a.send(B, Message::Data(vec![w.clone()]));
                        resent += 1;
                    }
                }
                next_resend = elapsed + resend_every;
            }
        },
    );
    let c = a.counters();
    assert!(
        ab.dropped > 0,
        "seed {seed}: the path dropped nothing: no test"
    );
    assert!(
        c.items_resent > 0,
        "seed {seed}: the link recovered nothing part by part"
    );
    // Each write went whole at most a few times: recovery was by parts, not writes.
    assert!(
        resent <= 2 * writes.len(),
        "seed {seed}: {resent} whole resends"
    );
}

/// With `compress` on, a compressible write travels compressed (split if it must be)
/// and arrives intact; an incompressible one travels raw; a zipped write that does not
/// decompress to its announced length is dropped and counted, never delivered.
#[test]
fn compressed_writes_arrive_intact_and_only_when_smaller() {
    let cfg = LinkConfig {
        compress: Some(3),
        ..open()
    };
    let (mut a, mut b) = pair(cfg);
    let now = Instant::now();
    let text: Vec<u8> = b"the quick brown fox jumps over the lazy dog; "
        .iter()
        .copied()
        .cycle()
        .take(200_000)
        .collect();
    let compressible = Packet {
        pair: PairId(3),
        stamp: Stamp::new(Timestamp(1001), Seq(1)),
        payload: Payload::Write {
            offset: Offset(0),
            data: Bytes::from(text),
        },
    };
    // write() data is a short-period pattern: make an incompressible one instead.
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let noise: Vec<u8> = (0..50_000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let incompressible = Packet {
        pair: PairId(3),
        stamp: Stamp::new(Timestamp(1002), Seq(2)),
        payload: Payload::Write {
            offset: Offset(4096),
            data: Bytes::from(noise),
        },
    };
    a.send(B, Message::Data(vec![compressible.clone()]));
    a.send(B, Message::Data(vec![incompressible.clone()]));
    let ds = datagrams(&mut a, now);
    let wire: usize = ds.iter().map(Vec::len).sum();
    let mut got: Vec<Packet> = deliver(&mut b, now, ds)
        .into_iter()
        .flat_map(|m| match m {
            Message::Data(ps) => ps,
            _ => Vec::new(),
        })
        .collect();
    got.sort_by_key(|p| p.stamp.seq);
    assert_eq!(got, vec![compressible, incompressible]);
    let c = a.counters();
    assert_eq!(c.zip_raw_bytes, 250_000);
    assert!(c.zip_wire_bytes < 60_000, "{c:?}");
    assert!(wire < 70_000, "{wire} bytes on the wire");

    // A zipped write whose bytes do not decompress to `raw`: dropped, counted.
    let bogus = |raw: u32, seq: u64| {
        Message::Zipped(Zipped {
            raw,
            part: Part {
                pair: PairId(3),
                stamp: Stamp::new(Timestamp(2000 + seq), Seq(seq)),
                offset: Offset(0),
                total: 4,
                at: 0,
                data: Bytes::from_static(b"junk"),
            },
        })
    };
    a.send(B, bogus(100, 10));
    a.send(B, bogus(u32::MAX, 11));
    let out = deliver(&mut b, now, datagrams(&mut a, now));
    assert!(out.iter().all(|m| !matches!(m, Message::Data(_))));
    assert_eq!(b.counters().dropped_bad_zip, 1);
    assert_eq!(b.counters().dropped_bad_part, 1, "raw beyond max_write");
}

/// Loss on the return path only: the receipts stop coming back for a second while
/// writes are under way, then a fifth of them are lost; the forward path delivers
/// everything. Every write must still cross within a bounded (simulated) time. Before
/// probes went past the window, it stalled: the probe timeouts of the outage shrank the
/// window far below the bytes in flight, so the datagram a probe timeout deemed lost
/// could not go again, nothing new was numbered, the peer owed no receipt, and the
/// sender freed one datagram per (two-second) timeout. This is the stall of
/// `scripts/replication.sh`'s `ret20` case.
#[test]
fn receipts_lost_on_the_way_back_do_not_close_the_window_for_good() {
    use rand::SeedableRng;
    let seed = crate::test_seed(20261203);
    let mut rng = rand_pcg::Pcg64Mcg::seed_from_u64(seed);
    // The peer stays up through the outage (in a system, the units' heartbeats and acks
    // see to that): what is tested is the flow's recovery, not peer liveness.
    let (mut a, mut b) = pair(LinkConfig {
        peer_timeout: Duration::from_secs(60),
        ..LinkConfig::default()
    });
    let mut ab = Bottleneck::new(8 << 20, 100e6, Duration::from_millis(1), 0.0);
    let mut ba = Bottleneck::new(8 << 20, 100e6, Duration::from_millis(1), 0.2);
    let writes: Vec<Packet> = (1..=600)
        .map(|s| write(s, 4096 + (s as usize * 97) % 60_000))
        .collect();
    let mut next_write = 0;
    run_until_delivered(
        (&mut a, &mut b),
        (&mut ab, &mut ba),
        &mut rng,
        &writes,
        (seed, Duration::from_secs(30)),
        |elapsed, a, ba, _| {
            // No receipt comes back from 100 ms to 1.1 s, then a fifth are lost.
            ba.loss = if (100..1100).contains(&elapsed.as_millis()) {
                1.0
            } else {
                0.2
            };
            // Bursts of 50 writes every 200 ms, before, during and after the outage.
            if next_write < writes.len() && elapsed.as_millis() as usize >= next_write / 50 * 200 {
                for w in &writes[next_write..next_write + 50] {
                    a.send(B, Message::Data(vec![w.clone()]));
                }
                next_write += 50;
            }
        },
    );
    assert!(ba.dropped > 0, "seed {seed}: no receipt was lost: no test");
}

/// Issue 12: at 5 % loss each way and 20 % reordering (a fifth of the datagrams held
/// 0.5 to 2 ms more, as `wan-sim --loss 0.05 --reorder 0.2` does), the link sends again
/// about what the path lost, not several times that. Before the fix, the receiver's
/// receipts kept only the 32 highest ranges of numbers, and every lost datagram (sent
/// again under a new number) left a hole for good: a datagram that came late, below
/// those 32 ranges, was never receipted, so the sender deemed it lost and sent its
/// items again although they had arrived; receipts lost on the way back lost the same
/// numbers for good. And the packet threshold stopped doubling at 256 datagrams, less
/// than such delays reorder at 200 MB/s. Counted in the simulation: what the path dropped against what the
/// link resent, and numbers the receiver got but never put in a receipt.
#[test]
fn loss_and_reordering_cost_about_what_was_lost() {
    use rand::{Rng, SeedableRng};
    let seed = crate::test_seed(20261212);
    let mut rng = rand_pcg::Pcg64Mcg::seed_from_u64(seed);
    let (mut a, mut b) = pair(LinkConfig::default());
    let mut ab = Bottleneck::new(8 << 20, 200e6, Duration::from_micros(50), 0.05);
    let mut ba = Bottleneck::new(8 << 20, 200e6, Duration::from_micros(50), 0.05);
    ab.reorder = 0.2;
    ba.reorder = 0.2;
    let writes: Vec<Packet> = (1..=1500)
        .map(|s| write(s, rng.random_range(1..=64 << 10)))
        .collect();
    let step = Duration::from_micros(50);
    let mut next_write = 0;
    run_until_delivered(
        (&mut a, &mut b),
        (&mut ab, &mut ba),
        &mut rng,
        &writes,
        (seed, Duration::from_secs(30)),
        |elapsed, a, _, _| {
            // A write every 250 us (about 130 MB/s offered, under the path's 200 MB/s).
            if next_write < writes.len() && elapsed >= step * 5 * next_write as u32 {
                a.send(B, Message::Data(vec![writes[next_write].clone()]));
                next_write += 1;
            }
        },
    );
    let c = a.counters();
    let unreceipted = b.counters().numbers_unreceipted;
    eprintln!(
        "seed {seed}: path dropped {} datagrams (and {} back); link: {} lost, {} spurious, \
         {} items resent ({} found delivered after all), {} probe timeouts; receiver never \
         receipted {unreceipted}",
        ab.dropped,
        ba.dropped,
        c.datagrams_lost,
        c.spurious_losses,
        c.items_resent,
        c.spurious_items,
        c.probe_timeouts
    );
    assert!(ab.dropped > 500, "seed {seed}: too little lost: no test");
    assert!(
        c.items_resent <= ab.dropped * 11 / 10,
        "seed {seed}: {} items resent for {} datagrams lost; {c:?}, never receipted \
         {unreceipted}",
        c.items_resent,
        ab.dropped
    );
    assert!(
        unreceipted * 100 <= ab.dropped,
        "seed {seed}: the receiver never receipted {unreceipted} numbers it got"
    );
    // Once the reordering is learnt, it stops costing resends (before the packet
    // threshold was uncapped: 192 of 2,134, 9 %).
    assert!(
        c.spurious_items * 20 <= ab.dropped,
        "seed {seed}: {} items resent needlessly (their datagram had arrived) for {} lost",
        c.spurious_items,
        ab.dropped
    );
}
