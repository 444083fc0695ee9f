//! Liveness when the primary's journal is the limit (I5, issue 9): a journal smaller than
//! the window, acknowledgements that lag behind a delayed (and lossy) network, and
//! writers at queue depth 16 that never stop. Every write must complete and the remote
//! must end equal to the local unit.
//!
//! Before the fix the release watermark could only ride inside a batch of new packets;
//! once the journal was full it refused that batch, and with it the watermark that would
//! have freed it: replication stopped for good with about the queue depth of writes
//! stamped and never journaled.
//!
//! Case 1 at seed 1 then stalled on the remote (once the clock started at the timer
//! wheel's origin): packets journaled there above a gap kept every later journal segment,
//! applied or not, until the full journal refused the packet closing the gap for good.
//! A pair's packets now enter the remote journal in `seq` order (`tidemark::intake`).
//!
//! Actors run on one thread on tokio's paused clock with disk work inline, so a seed
//! replays exactly; a stall is caught by a deadline in simulated time (not wall-clock),
//! which fails with the engine's state. `TIDEMARK_SEED=<seed>` replays one seed.

mod common;
mod sim;
use bytes::Bytes;
use rand::{Rng, SeedableRng};
use rand_pcg::Pcg64;
use std::sync::Arc;
use std::time::Duration;
use tidemark::{Offset, PairId};
use tidemark_actors::{Engine, Impairment};

/// How long (simulated) the whole workload may take before it counts as a stall.
const DEADLINE: Duration = Duration::from_secs(120);

struct Case {
    name: &'static str,
    journal: u64,
    block: usize,
    writes: usize,
    depth: usize,
    impair: Impairment,
}

fn read_all(engine: &Engine, pair: PairId, remote: bool) -> Vec<u8> {
    let s = engine.store(pair, remote).expect("pair exists");
    let mut buf = vec![0u8; s.size() as usize];
    s.read_at(Offset(0), &mut buf).expect("read");
    buf
}

fn run(case: &Case, seed: u64) {
    const UNIT: u64 = 16 << 20;
    let dir = tempfile::tempdir().expect("tempdir");
    let dir = dir.path().to_path_buf();
    sim::run(async move {
        let (mut b, _, _, pair) = common::file_pair(seed, &dir, UNIT, case.journal);
        b.impairment(case.impair);
        let engine = Arc::new(b.start().expect("start"));
        let mut rng = Pcg64::seed_from_u64(seed);
        let slots = UNIT as usize / case.block;
        let mut writers = Vec::new();
        for w in 0..case.depth {
            let engine = engine.clone();
            let plan: Vec<(u64, u8)> = (0..case.writes / case.depth)
                .map(|_| {
                    let slot = rng.random_range(0..slots) as u64;
                    (slot * case.block as u64, rng.random())
                })
                .collect();
            let block = case.block;
            writers.push(actix_rt::spawn(async move {
                for (offset, byte) in plan {
                    let data = Bytes::from(vec![byte ^ w as u8; block]);
                    engine.write(pair, offset, data).await?;
                }
                Ok::<(), tidemark_actors::EngineError>(())
            }));
        }
        let all = async {
            for w in writers {
                w.await.expect("writer task").expect("write");
            }
            engine.drain().await.expect("drain");
        };
        let res = tokio::time::timeout(DEADLINE, all).await;
        if res.is_err() {
            let stats = engine.stats().await.expect("stats");
            let p = &stats.pairs[pair.0 as usize];
            panic!(
                "{}: stalled (seed {seed}; replay with TIDEMARK_SEED={seed}): written_seq {} \
                 acked_seq {} applied_seq {} retransmits {}\n{p:#?}",
                case.name, p.written_seq, p.acked_seq, p.applied_seq, p.retransmits
            );
        }
        assert!(
            read_all(&engine, pair, false) == read_all(&engine, pair, true),
            "{}: remote differs from local (seed {seed})",
            case.name
        );
        let stats = engine.stats().await.expect("stats");
        let p = &stats.pairs[pair.0 as usize];
        assert!(
            p.written_seq as usize >= case.writes && p.applied_seq == p.written_seq,
            "{}: every write applied at the remote (seed {seed}): written {} applied {}",
            case.name,
            p.written_seq,
            p.applied_seq
        );
        match Arc::try_unwrap(engine) {
            Ok(e) => e.shutdown().await.expect("shutdown"),
            Err(_) => panic!("engine still shared"),
        }
    });
}

fn cases() -> Vec<Case> {
    let lag = Impairment {
        delay: Duration::from_millis(20),
        jitter: Duration::from_millis(5),
        ..Impairment::none()
    };
    vec![
        Case {
            name: "64 KiB writes, 4 MiB journal, 20 ms one way",
            journal: 4 << 20,
            block: 64 << 10,
            writes: 1024,
            depth: 16,
            impair: lag,
        },
        Case {
            name: "64 KiB writes, 8 MiB journal, 5 % loss",
            journal: 8 << 20,
            block: 64 << 10,
            writes: 1024,
            depth: 16,
            impair: Impairment { loss: 0.05, ..lag },
        },
        // Frames cost more than the window counts for tiny writes: the journal fills
        // before admission stops the writers, and only a watermark written on its own
        // frees it.
        Case {
            name: "16-byte writes, 4 MiB journal, 20 ms one way",
            journal: 4 << 20,
            block: 16,
            writes: 160_000,
            depth: 16,
            impair: lag,
        },
    ]
}

fn seeds() -> Vec<u64> {
    match std::env::var("TIDEMARK_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        Some(seed) => vec![seed],
        None => vec![1, 2],
    }
}

#[test]
fn a_journal_smaller_than_the_window_never_stalls_the_writers() {
    for case in cases() {
        for seed in seeds() {
            run(&case, seed);
        }
    }
}
