//! End to end, in deterministic simulation: two pairs, the secondary goes away while
//! clients write (pair tracking), the link returns, the resync runs while clients keep
//! writing. At random applications the secondary's files (journal, undo files, remote
//! units) are copied — the image a SIGKILL at that moment leaves — and `promote` runs
//! on the copy: every promote must leave both remote units exactly the writes stamped
//! at or below the cut it reports (`rolled_back_to`, else its limit). Live applications
//! are checked with `CutChecker` outside the epoch. Seeded (`TIDEMARK_SEED`).

mod common;
use bytes::Bytes;
use common::epoch::{copy_dir, two_pair_config};
use rand::{Rng, SeedableRng};
use rand_pcg::Pcg64;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tidemark::{PairId, Stamp};
use tidemark_actors::{
    Applied, EngineBuilder, Impairment, InitialSync, PairSpec, StoreSpec, TrackConfig,
};
use tidemark_cli::config::Config;

const UNIT: u64 = 1 << 20;

fn config(dir: &Path) -> Config {
    two_pair_config(dir, "16MiB", "1MiB")
}

fn run_sim<F: std::future::Future>(f: F) -> F::Output {
    actix_rt::System::with_tokio_rt(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .expect("runtime")
    })
    .block_on(f)
}

/// A completed client write (its stamp is `Stamp::ZERO` if its pair was tracking).
type Write = (u32, Stamp, u64, Vec<u8>);

/// Pair `pair`'s unit as of `cut`: every write at or below it. A write made while its
/// pair was tracking has no stamp (`Stamp::ZERO`); the clients wrote one after the
/// other, so it happened before the next stamped write: a cut holds it iff it holds
/// that write (a cut below that write may leave it out, and one at or above must not).
fn model_at(history: &[Write], pair: u32, cut: u64) -> Vec<u8> {
    let mut unit = vec![0u8; UNIT as usize];
    let mut next = u64::MAX;
    let mut effective = vec![0u64; history.len()];
    for (i, (_, stamp, _, _)) in history.iter().enumerate().rev() {
        if stamp.ts.0 > 0 {
            next = stamp.ts.0;
        }
        effective[i] = if stamp.ts.0 > 0 { stamp.ts.0 } else { next };
    }
    for (i, (p, _, off, data)) in history.iter().enumerate() {
        if *p == pair && effective[i] <= cut {
            unit[*off as usize..*off as usize + data.len()].copy_from_slice(data);
        }
    }
    unit
}

#[test]
fn promote_during_a_resync_is_a_consistent_cut() {
    let seeds: Vec<u64> = match std::env::var("TIDEMARK_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        Some(s) => vec![s],
        None => vec![1, 2, 3],
    };
    for seed in seeds {
        println!("seed {seed} (replay with TIDEMARK_SEED={seed})");
        let dir = tempfile::tempdir().expect("tempdir");
        let dir = dir.path().to_path_buf();
        let snaps: Arc<Mutex<Vec<PathBuf>>> = Arc::new(Mutex::new(Vec::new()));
        let history = run_sim(run(dir.clone(), seed, snaps.clone()));
        let snaps = snaps.lock().expect("snaps").clone();
        let (mut rolled, mut plain) = (0, 0);
        for (k, snap) in snaps.iter().enumerate() {
            let cfg = config(snap);
            let report = tidemark_cli::promote::promote(&cfg, &[1], false, false)
                .unwrap_or_else(|e| panic!("seed {seed}, snapshot {k}: promote: {e}"));
            let cut = report.rolled_back_to.unwrap_or(report.limit_ts);
            for pair in 0..2u32 {
                let got = std::fs::read(&cfg.pairs[pair as usize].remote_path).expect("unit");
                let want = model_at(&history, pair, cut);
                let diff = got.iter().zip(&want).position(|(a, b)| a != b);
                if diff.is_some() {
                    let near: Vec<_> = history
                        .iter()
                        .filter(|w| w.0 == pair)
                        .take(4)
                        .map(|w| (w.1, w.2, w.3.len()))
                        .collect();
                    eprintln!("first diff {diff:?}; first writes of the pair: {near:?}");
                    let d = diff.unwrap_or(0);
                    let cover: Vec<_> = history
                        .iter()
                        .filter(|w| (w.2 as usize) <= d && d < w.2 as usize + w.3.len())
                        .map(|w| (w.0, w.1, w.3[d - w.2 as usize]))
                        .collect();
                    eprintln!(
                        "got {} want {}; writes covering it: {cover:?}",
                        got[d], want[d]
                    );
                }
                assert_eq!(
                    diff, None,
                    "seed {seed}, snapshot {k}: pair {pair} is not the cut at {cut} ({report:?})"
                );
            }
            if report.rolled_back_to.is_some() {
                rolled += 1;
            } else {
                plain += 1;
            }
        }
        println!(
            "seed {seed}: {} crash images promoted: {rolled} rolled back, {plain} at their limit",
            snaps.len()
        );
        assert!(rolled > 0, "seed {seed}: no image inside a resync epoch");
    }
}

async fn run(dir: PathBuf, seed: u64, snaps: Arc<Mutex<Vec<PathBuf>>>) -> Vec<Write> {
    let mut rng = Pcg64::seed_from_u64(seed);
    let mut b = EngineBuilder::new();
    b.simulated()
        .seed(seed)
        .impairment(Impairment::none())
        .tracking(TrackConfig {
            suspend_after: Some(Duration::from_millis(200)),
            on_full: true,
        });
    let a = b.primary("a");
    let r = b.secondary("b");
    let cfg = config(&dir);
    for i in 0..2 {
        let pair = b.pair(PairSpec {
            name: format!("p{i}"),
            local: a,
            remote: r,
            size: UNIT,
            local_store: StoreSpec::File(dir.join(format!("a/p{i}.img"))),
            remote_store: StoreSpec::File(cfg.pairs[i].remote_path.clone()),
        });
        b.initial_sync(pair, InitialSync::None);
    }
    std::fs::create_dir_all(dir.join("a")).expect("mkdir");
    std::fs::create_dir_all(dir.join("b")).expect("mkdir");
    b.journal(a, dir.join("a/journal/segments"), 16 << 20)
        .journal(r, cfg.systems[1].segments_dir(), 16 << 20)
        .undo_dir(r, tidemark_cli::promote::undo_dir(&cfg, 1));
    let snap_root = dir.join("snaps");
    let b_dir = dir.join("b");
    let pick = Arc::new(Mutex::new(Pcg64::seed_from_u64(seed ^ 0xc0ffee)));
    let hook_snaps = snaps.clone();
    b.on_applied(Arc::new(move |_: &Applied<'_>| {
        let take = pick.lock().map(|mut r| r.random_bool(0.3)).unwrap_or(false);
        if let (true, Ok(mut v)) = (take, hook_snaps.lock()) {
            let at = snap_root.join(format!("{}", v.len()));
            copy_dir(&b_dir, &at.join("b"));
            v.push(at);
        }
    }));
    let engine = b.start().expect("start");
    let mut history: Vec<Write> = Vec::new();
    let write = |pair: u32, rng: &mut Pcg64| {
        let len = rng.random_range(1..=8u64) * 4096;
        let at = rng.random_range(0..(UNIT - len) / 4096) * 4096;
        let mut data = vec![0u8; len as usize];
        rng.fill(&mut data[..]);
        (pair, at, data)
    };
    let go = async |n: usize, rng: &mut Pcg64, history: &mut Vec<Write>| {
        for _ in 0..n {
            let (pair, at, data) = write(rng.random_range(0..2), rng);
            let stamp = tokio::time::timeout(
                Duration::from_secs(30),
                engine.write(PairId(pair), at, Bytes::from(data.clone())),
            )
            .await
            .unwrap_or_else(|_| panic!("seed {seed}: a write stalled"))
            .unwrap_or_else(|e| panic!("seed {seed}: write: {e}"));
            history.push((pair, stamp, at, data));
            if rng.random_bool(0.1) {
                tokio::time::sleep(Duration::from_millis(rng.random_range(1..20))).await;
            }
        }
    };
    go(40, &mut rng, &mut history).await;
    engine.set_link_down(r, true);
    go(120, &mut rng, &mut history).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    go(40, &mut rng, &mut history).await;
    engine.set_link_down(r, false);
    go(150, &mut rng, &mut history).await;
    tokio::time::timeout(Duration::from_secs(120), engine.drain())
        .await
        .unwrap_or_else(|_| panic!("seed {seed}: drain never ended"))
        .unwrap_or_else(|e| panic!("seed {seed}: drain: {e}"));
    let differ = tidemark_actors::units_differ(&engine).expect("compare");
    assert!(
        differ.is_empty(),
        "seed {seed}: remote != local: {differ:?}"
    );
    let stats = engine.stats().await.expect("stats");
    assert!(
        stats.pairs.iter().any(|p| p.sync.is_some()),
        "seed {seed}: no resync ran: {stats:?}"
    );
    engine.shutdown().await.expect("shutdown");
    history
}
