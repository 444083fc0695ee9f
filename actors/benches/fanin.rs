//! Fan-in throughput of the actor engine: N local units on one primary system replicate
//! to N remote units on one secondary system, all in one consistency group with one
//! orderer. The same fan-in through the core alone (no actors, one thread) is the root
//! crate's `benches/fanin.rs`; `cargo bench --bench fanin` at the workspace root runs
//! both.
//!
//! Two groups:
//! - `actors/*`: the whole actor engine over the in-process link with a perfect network;
//!   in-memory units, 2 actor threads, disk work inline. One writer task per pair keeps
//!   several `write_many` batches in flight; each sample ends with `drain()`, so the
//!   figure counts writes applied at the remote. Elements are packets. After the group,
//!   one line per benchmark says how many packets were retransmitted (on a perfect
//!   network every retransmission is spurious).
//! - `commit_lag/*`: an idle engine; one write, then `drain()`: the time from the write's
//!   completion until the remote unit has applied it (p50/p99 printed after the group).
//!
//! `cargo bench -p tidemark-actors --bench fanin` runs both groups;
//! `cargo bench --bench fanin -- actors` runs one group.

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, SamplingMode, Throughput};
use rand::{Rng, SeedableRng};
use rand_pcg::Pcg64Mcg;
use std::rc::Rc;
use std::time::{Duration, Instant};
use tidemark::{Offset, PairId, Payload};
use tidemark_actors::{Engine, EngineBuilder, Impairment};

const FANIN: [usize; 4] = [1, 4, 16, 64];
/// Bytes per write.
const WRITE: usize = 64;
/// Bytes per unit.
const UNIT: u64 = 1 << 20;
/// Payloads per `write_many` call (as many as a round of the core bench, per pair).
const BATCH: usize = 64;
/// `write_many` calls in flight per pair.
const DEPTH: usize = 4;
/// Packets per actor-engine iteration, spread evenly over the pairs.
const ACTOR_ITER_PACKETS: usize = 64 * 1024;

fn payload(rng: &mut Pcg64Mcg, data: &Bytes) -> Payload {
    let offset = rng.random_range(0..=(UNIT - WRITE as u64) / 8) * 8;
    Payload::Write {
        offset: Offset(offset),
        data: data.clone(),
    }
}

// ---------------------------------------------------------------- whole actor engine

/// `n` in-memory pairs from one primary to one secondary. `window`: the engine's
/// unacknowledged-bytes window per pair (`None`: the engine's default).
fn engine(n: usize, window: Option<usize>) -> Engine {
    let mut b = EngineBuilder::new();
    let p = b.primary("primary");
    let s = b.secondary("secondary");
    for i in 0..n {
        b.mem_pair(&format!("u{i}"), p, s, UNIT);
    }
    b.orderer(s)
        .impairment(Impairment::none())
        .threads(2)
        .disk_threads(0);
    if let Some(w) = window {
        b.window_bytes(w);
    }
    b.start().expect("valid topology")
}

/// Touches every page of every unit, so that page faults of fresh units stay out of the
/// figures.
async fn pretouch(engine: &Engine, n: usize) {
    for pair in 0..n as u32 {
        let all = Bytes::from(vec![1u8; UNIT as usize]);
        engine.write(PairId(pair), 0, all).await.expect("write");
    }
    engine.drain().await.expect("drain");
}

/// Writes `per_pair` packets to every pair (one writer task per pair and lane, `DEPTH`
/// lanes per pair, so `DEPTH` batches in flight per pair), then drains. Returns the time
/// from the first write to the end of the drain.
async fn blast(engine: &Rc<Engine>, n: usize, per_pair: usize, seed: u64) -> Duration {
    let data = Bytes::from(vec![0x3Cu8; WRITE]);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for pair in 0..n {
        let batches = per_pair.div_ceil(BATCH);
        for lane in 0..DEPTH {
            let engine = engine.clone();
            let data = data.clone();
            let mut rng = Pcg64Mcg::seed_from_u64(seed ^ (((pair * DEPTH + lane) as u64) << 20));
            tasks.push(actix_rt::spawn(async move {
                for _ in (lane..batches).step_by(DEPTH) {
                    let ps: Vec<Payload> = (0..BATCH).map(|_| payload(&mut rng, &data)).collect();
                    engine
                        .write_many(PairId(pair as u32), ps)
                        .await
                        .expect("write");
                }
            }));
        }
    }
    for t in tasks {
        t.await.expect("writer task");
    }
    engine.drain().await.expect("drain");
    start.elapsed()
}

async fn applied(engine: &Engine) -> u64 {
    let stats = engine.stats().await.expect("stats");
    stats.pairs.iter().map(|p| p.applied_seq).sum()
}

fn bench_actors(c: &mut Criterion) {
    let runner = actix_rt::System::new();
    let mut g = c.benchmark_group("actors");
    g.sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4));
    g.throughput(Throughput::Elements(ACTOR_ITER_PACKETS as u64));
    let variants: [(&str, Option<usize>, &[usize]); 2] = [
        // The engine as configured by default (64 MiB unacknowledged per pair).
        ("packets", None, &FANIN),
        // A small window: fewer packets in flight per pair.
        ("packets_window_1MiB", Some(1 << 20), &[1, 64]),
    ];
    let mut notes = Vec::new();
    for (name, window, fanin) in variants {
        for &n in fanin {
            let engine = Rc::new(runner.block_on(async {
                let e = engine(n, window);
                pretouch(&e, n).await;
                e
            }));
            let mut round = 0;
            g.bench_with_input(BenchmarkId::new(name, n), &n, |b, &n| {
                b.iter_custom(|iters| {
                    round += 1;
                    runner.block_on(async {
                        let before = applied(&engine).await;
                        let per_pair = ACTOR_ITER_PACKETS / n;
                        let took = blast(&engine, n, per_pair * iters as usize, round).await;
                        let after = applied(&engine).await;
                        assert_eq!(after - before, (n * per_pair) as u64 * iters);
                        took
                    })
                });
            });
            let engine = Rc::try_unwrap(engine).ok().expect("writers finished");
            let s = runner.block_on(engine.stats()).expect("stats");
            // (Only for benchmarks that ran: a filter on the command line may skip some.)
            notes.extend((round > 0).then(|| {
                format!(
                    "actors/{name}/{n}: {} packets applied, {} retransmitted ({} timeouts, \
                 {} deemed lost, {} found spurious), {} duplicates received, {} releases \
                 (perfect network)",
                    s.pairs.iter().map(|p| p.applied_seq).sum::<u64>(),
                    s.retransmits(),
                    s.pairs.iter().map(|p| p.timeouts).sum::<u64>(),
                    s.pairs.iter().map(|p| p.lost).sum::<u64>(),
                    s.pairs.iter().map(|p| p.spurious).sum::<u64>(),
                    s.pairs.iter().map(|p| p.duplicates_received).sum::<u64>(),
                    s.commits,
                )
            }));
            runner.block_on(engine.shutdown()).expect("shutdown");
        }
    }
    g.finish();
    for line in notes {
        println!("{line}");
    }

    // Not timed: the copies are byte-for-byte equal after a blast with many writers.
    runner.block_on(async {
        let n = 16;
        let engine = Rc::new(engine(n, None));
        blast(&engine, n, 4096, 7).await;
        for pair in 0..n as u32 {
            let (mut a, mut b) = (vec![0u8; UNIT as usize], vec![0u8; UNIT as usize]);
            let store = |remote| engine.store(PairId(pair), remote).expect("pair");
            store(false).read_at(Offset(0), &mut a).expect("read");
            store(true).read_at(Offset(0), &mut b).expect("read");
            assert!(a == b, "pair {pair}: remote differs from local");
        }
        let engine = Rc::try_unwrap(engine).ok().expect("writers finished");
        engine.shutdown().await.expect("shutdown");
    });
}

// ---------------------------------------------------------------- commit lag

fn bench_lag(c: &mut Criterion) {
    let runner = actix_rt::System::new();
    let mut g = c.benchmark_group("commit_lag");
    g.sample_size(10)
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    let mut report = Vec::new();
    for n in [1usize, 16] {
        let engine = runner.block_on(async {
            let e = engine(n, None);
            // Let the first heartbeats settle the group.
            actix_rt::time::sleep(Duration::from_millis(30)).await;
            e
        });
        let data = Bytes::from(vec![7u8; WRITE]);
        let mut lags = Vec::new();
        let mut i = 0u32;
        g.bench_with_input(BenchmarkId::new("write_to_applied", n), &n, |b, &n| {
            b.iter_custom(|iters| {
                runner.block_on(async {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        i = i.wrapping_add(1);
                        let pair = PairId(i % n as u32);
                        engine.write(pair, 0, data.clone()).await.expect("write");
                        let t = Instant::now();
                        engine.drain().await.expect("drain");
                        let lag = t.elapsed();
                        lags.push(lag);
                        total += lag;
                    }
                    total
                })
            });
        });
        runner.block_on(engine.shutdown()).expect("shutdown");
        lags.sort();
        if !lags.is_empty() {
            let q = |f: f64| lags[((lags.len() - 1) as f64 * f) as usize];
            report.push(format!(
                "commit lag, {n} pair(s), heartbeat 10 ms: p50 {:?}  p99 {:?}  max {:?}  ({} samples)",
                q(0.5),
                q(0.99),
                lags[lags.len() - 1],
                lags.len()
            ));
        }
    }
    g.finish();
    for line in report {
        println!("{line}");
    }
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    bench_actors(&mut c);
    bench_lag(&mut c);
    c.final_summary();
}
