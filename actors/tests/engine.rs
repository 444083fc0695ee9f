//! The library start-up and the engine handle: idle pairs, bad input, file units,
//! several systems on real threads.

mod sim;
use bytes::Bytes;
use std::time::Duration;
use tidemark::{Offset, PairId, Payload, StoreError};
use tidemark_actors::{EngineBuilder, EngineError, Impairment, PairSpec, StoreSpec};

fn sim<F: std::future::Future<Output = ()>>(f: impl FnOnce() -> F) {
    sim::run(async move { f().await });
}

fn read_all(engine: &tidemark_actors::Engine, pair: PairId, remote: bool) -> Vec<u8> {
    let s = engine.store(pair, remote).expect("pair exists");
    let mut buf = vec![0u8; s.size() as usize];
    s.read_at(Offset(0), &mut buf).expect("read");
    buf
}

#[test]
fn an_idle_pair_never_holds_the_group_back() {
    sim(|| async {
        let mut b = EngineBuilder::new();
        b.simulated().seed(3).impairment(Impairment {
            loss: 0.1,
            reorder: 0.3,
            delay: Duration::from_millis(2),
            ..Impairment::none()
        });
        let a = b.primary("a");
        let r = b.secondary("b");
        let busy0 = b.mem_pair("busy0", a, r, 4096);
        let busy1 = b.mem_pair("busy1", a, r, 4096);
        let idle = b.mem_pair("idle", a, r, 4096);
        let engine = b.start().expect("start");
        for i in 0..50u64 {
            let pair = if i % 2 == 0 { busy0 } else { busy1 };
            engine
                .write(pair, (i * 64) % 4000, Bytes::from(vec![i as u8; 64]))
                .await
                .expect("write");
        }
        let before = tokio::time::Instant::now();
        engine.drain().await.expect("drain");
        // Simulated time, not wall-clock: liveness (I5) within a few heartbeats + RTOs.
        let waited = before.elapsed();
        assert!(
            waited < Duration::from_millis(500),
            "drain took {waited:?} of simulated time"
        );
        let stats = engine.stats().await.expect("stats");
        assert!(stats.commits > 0);
        let idle_stats = &stats.pairs[idle.0 as usize];
        assert_eq!(idle_stats.written_seq, 0);
        assert_eq!(idle_stats.applied_seq, 0);
        assert!(
            idle_stats.head_ts > 0,
            "heartbeats moved the idle pair's head"
        );
        assert!(idle_stats.heartbeats > 0);
        for p in [busy0, busy1] {
            let s = &stats.pairs[p.0 as usize];
            assert_eq!(s.applied_seq, 25);
            assert_eq!(read_all(&engine, p, false), read_all(&engine, p, true));
        }
        engine.shutdown().await.expect("shutdown");
    });
}

/// Issue 15: a write on one pair of a group whose other pairs are idle is applied at the
/// remote within the round trip, not once every idle pair's next heartbeat came (10 ms
/// here). The write's local unit nudges its idle siblings, each of which at once sends a
/// heartbeat stamped after the write, from its own sender (see `tidemark::ship::Nudge`).
/// Writes land at many phases of the heartbeat period; simulated time, so the bound is
/// exact and repeatable. Without the nudge the worst lag here is close to 10 ms.
#[test]
fn idle_siblings_do_not_hold_a_write_back_until_their_heartbeat() {
    for (seed, delay) in [(11, Duration::ZERO), (12, Duration::from_micros(250))] {
        sim(|| async move {
            let mut b = EngineBuilder::new();
            b.simulated()
                .seed(seed)
                .heartbeat(Duration::from_millis(10))
                .impairment(Impairment {
                    delay,
                    ..Impairment::none()
                });
            let a = b.primary("a");
            let r = b.secondary("b");
            let pairs: Vec<PairId> = (0..16)
                .map(|i| b.mem_pair(&format!("u{i}"), a, r, 4096))
                .collect();
            let engine = b.start().expect("start");
            // Every pair has reported a head (heartbeats), so the group commits.
            tokio::time::sleep(Duration::from_millis(35)).await;
            let mut worst = Duration::ZERO;
            for i in 0..40u64 {
                // Land the writes at different phases of the heartbeat period.
                tokio::time::sleep(Duration::from_micros(730 + 1_370 * (i % 7))).await;
                let pair = pairs[(i as usize * 5) % pairs.len()];
                let stamp = engine
                    .write(pair, (i * 64) % 4000, Bytes::from(vec![i as u8; 64]))
                    .await
                    .expect("write");
                let t = tokio::time::Instant::now();
                engine.wait_applied(pair, stamp.seq).await.expect("applied");
                worst = worst.max(t.elapsed());
            }
            // Simulated time: the round trip is 2 x `delay`, plus no heartbeat.
            assert!(
                worst < Duration::from_millis(3),
                "seed {seed}, delay {delay:?}: a write waited {worst:?} of simulated time \
                 to be applied (heartbeat 10 ms)"
            );
            engine.drain().await.expect("drain");
            for &p in &pairs {
                assert_eq!(read_all(&engine, p, false), read_all(&engine, p, true));
            }
            engine.shutdown().await.expect("shutdown");
        });
    }
}

#[test]
fn out_of_range_writes_fail_and_change_nothing() {
    sim(|| async {
        let mut b = EngineBuilder::new();
        b.simulated();
        let a = b.primary("a");
        let r = b.secondary("b");
        let p = b.mem_pair("p", a, r, 4096);
        let engine = b.start().expect("start");
        engine
            .write(p, 0, Bytes::from_static(b"ok"))
            .await
            .expect("in range");
        let e = engine.write(p, 4095, Bytes::from_static(b"xy")).await;
        assert!(
            matches!(e, Err(EngineError::Store(StoreError::OutOfRange { .. }))),
            "{e:?}"
        );
        // One bad write in a batch fails the batch before anything is written.
        let e = engine
            .write_many(
                p,
                vec![
                    Payload::Write {
                        offset: Offset(100),
                        data: Bytes::from_static(b"good"),
                    },
                    Payload::Zero {
                        offset: Offset(u64::MAX - 1),
                        len: 10,
                    },
                ],
            )
            .await;
        assert!(e.is_err());
        assert_eq!(&read_all(&engine, p, false)[100..104], &[0, 0, 0, 0]);
        let e = engine.write(PairId(9), 0, Bytes::from_static(b"x")).await;
        assert!(matches!(e, Err(EngineError::NoSuchPair(PairId(9)))));
        engine.drain().await.expect("drain");
        let stats = engine.stats().await.expect("stats");
        assert_eq!(
            stats.pairs[0].written_seq, 1,
            "only the good write was stamped"
        );
        assert_eq!(read_all(&engine, p, false), read_all(&engine, p, true));
        engine.shutdown().await.expect("shutdown");
    });
}

#[test]
fn zero_payloads_replicate_in_order() {
    sim(|| async {
        let mut b = EngineBuilder::new();
        b.simulated();
        let a = b.primary("a");
        let r = b.secondary("b");
        let p = b.mem_pair("p", a, r, 8192);
        let engine = b.start().expect("start");
        engine
            .write(p, 0, Bytes::from(vec![7u8; 8192]))
            .await
            .expect("fill");
        engine
            .write_many(
                p,
                vec![Payload::Zero {
                    offset: Offset(1000),
                    len: 3000,
                }],
            )
            .await
            .expect("zero");
        engine.drain().await.expect("drain");
        let remote = read_all(&engine, p, true);
        assert_eq!(remote, read_all(&engine, p, false));
        assert_eq!(remote[999], 7);
        assert!(remote[1000..4000].iter().all(|&b| b == 0));
        assert_eq!(remote[4000], 7);
        engine.shutdown().await.expect("shutdown");
    });
}

#[test]
fn bad_topologies_are_clear_errors() {
    actix_rt::System::new().block_on(async {
        let topo = |e: Result<tidemark_actors::Engine, EngineError>, needle: &str| match e {
            Err(EngineError::Topology(m)) => assert!(m.contains(needle), "{m:?} lacks {needle:?}"),
            Err(other) => panic!("expected a topology error about {needle}, got {other}"),
            Ok(_) => panic!("expected a topology error about {needle}"),
        };
        let b = EngineBuilder::new();
        topo(b.start(), "at least one pair");

        let mut b = EngineBuilder::new();
        let a = b.primary("a");
        let r = b.secondary("b");
        b.mem_pair("p", r, a, 4096);
        topo(b.start(), "local system is a secondary");

        let mut b = EngineBuilder::new();
        let a = b.primary("a");
        b.secondary("a");
        b.mem_pair("p", a, a, 4096);
        topo(b.start(), "listed twice");

        let mut b = EngineBuilder::new();
        let a = b.primary("a");
        let r = b.secondary("b");
        b.mem_pair("p", a, r, 4096);
        b.mem_pair("p", a, r, 4096);
        topo(b.start(), "pair \"p\" is listed twice");

        let mut b = EngineBuilder::new();
        let a = b.primary("a");
        let r = b.secondary("b");
        let file = StoreSpec::File("/tmp/tidemark-never-created.img".into());
        b.pair(PairSpec {
            name: "p".into(),
            local: a,
            remote: r,
            size: 4096,
            local_store: file.clone(),
            remote_store: file,
        });
        topo(b.start(), "used twice");

        let mut b = EngineBuilder::new();
        let a = b.primary("a");
        let r = b.secondary("b");
        b.mem_pair("p", a, r, 4096);
        b.impairment(Impairment {
            loss: 1.0,
            ..Impairment::none()
        });
        assert!(matches!(b.start(), Err(EngineError::Impairment(_))));
    });
}

#[test]
fn file_units_on_real_threads_size_checked_and_identical() {
    let dir = tempfile::tempdir().expect("tempdir");
    let spec = |name: &str, size: u64, a, r| PairSpec {
        name: name.into(),
        local: a,
        remote: r,
        size,
        local_store: StoreSpec::File(dir.path().join(format!("{name}.l"))),
        remote_store: StoreSpec::File(dir.path().join(format!("{name}.r"))),
    };
    actix_rt::System::new().block_on(async {
        // Two primaries, two secondaries, cross-mapped; real threads and disk threads.
        let mut b = EngineBuilder::new();
        b.threads(2)
            .disk_threads(2)
            .seed(11)
            .impairment(Impairment {
                loss: 0.05,
                dup: 0.05,
                reorder: 0.2,
                ..Impairment::none()
            });
        let p0 = b.primary("p0");
        let p1 = b.primary("p1");
        let s0 = b.secondary("s0");
        let s1 = b.secondary("s1");
        let pairs = [
            b.pair(spec("a", 1 << 20, p0, s1)),
            b.pair(spec("b", 1 << 20, p1, s0)),
            b.pair(spec("c", 1 << 20, p0, s0)),
        ];
        let engine = b.start().expect("start");
        for i in 0..300u64 {
            let p = pairs[(i % 3) as usize];
            let data = Bytes::from(vec![(i % 251) as u8; 1 + (i as usize * 37) % 9000]);
            engine
                .write(p, (i * 4099) % ((1 << 20) - 9000), data)
                .await
                .expect("write");
        }
        for p in pairs {
            engine.flush(p).await.expect("flush");
        }
        engine.drain().await.expect("drain");
        for p in pairs {
            assert_eq!(
                read_all(&engine, p, false),
                read_all(&engine, p, true),
                "{p}"
            );
        }
        engine.shutdown().await.expect("shutdown");

        // The units now exist at 1 MiB: reopening at another size is refused.
        let mut b = EngineBuilder::new();
        let p0 = b.primary("p0");
        let s0 = b.secondary("s0");
        b.pair(spec("a", 2 << 20, p0, s0));
        match b.start() {
            Err(EngineError::Store(StoreError::SizeMismatch { found, want, .. })) => {
                assert_eq!((found, want), (1 << 20, 2 << 20))
            }
            Err(e) => panic!("expected a size mismatch, got {e}"),
            Ok(_) => panic!("expected a size mismatch"),
        }
    });
}
