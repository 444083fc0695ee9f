//! Outages (simulated): the secondary goes away while clients write. Writes go on
//! (tracking: local write, dirty regions recorded write-ahead), the link comes back, the
//! resync copies the dirty regions through the ordered path while clients keep writing,
//! and the remote ends identical to the local unit. A primary that restarts after its
//! journal lost a tail it had sent (a power loss) never reuses a sequence number: it
//! restarts its stream with a `Restart` mark and a full resync.
//!
//! Seeded: `TIDEMARK_SEED=<n>` replays a run; every failure names its seed.

mod sim;

use bytes::Bytes;
use rand::{Rng, SeedableRng};
use rand_pcg::Pcg64;
use std::path::Path;
use std::time::Duration;
use tidemark::{PairId, SystemId};
use tidemark_actors::{
    units_differ, Engine, EngineBuilder, Impairment, InitialSync, PairSpec, StoreSpec, TrackConfig,
};

const UNIT: u64 = 8 << 20;

fn seeds() -> Vec<u64> {
    match std::env::var("TIDEMARK_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        Some(s) => vec![s],
        None => vec![1, 2, 3],
    }
}

fn track() -> TrackConfig {
    TrackConfig {
        suspend_after: Some(Duration::from_millis(200)),
        on_full: true,
    }
}

/// An engine with one pair a → b of file units in `dir`, 16 MiB journals, tracking on.
fn start(dir: &Path, seed: u64, impair: Impairment) -> (Engine, PairId, SystemId) {
    let mut b = EngineBuilder::new();
    b.simulated()
        .seed(seed)
        .impairment(impair)
        .tracking(track());
    let a = b.primary("a");
    let r = b.secondary("b");
    let pair = b.pair(PairSpec {
        name: "u".into(),
        local: a,
        remote: r,
        size: UNIT,
        local_store: StoreSpec::File(dir.join("local.img")),
        remote_store: StoreSpec::File(dir.join("remote.img")),
    });
    b.initial_sync(pair, InitialSync::None);
    b.journal(a, dir.join("ja"), 16 << 20)
        .journal(r, dir.join("jb"), 16 << 20);
    (b.start().expect("start"), pair, r)
}

/// `n` random writes of 4-64 KiB; each must complete (the way out: a simulated
/// deadline, so a stalled writer fails the test instead of hanging it).
async fn write_some(engine: &Engine, pair: PairId, rng: &mut Pcg64, n: usize, seed: u64) {
    for _ in 0..n {
        let len = rng.random_range(1..=16u64) * 4096;
        let at = rng.random_range(0..(UNIT - len) / 4096) * 4096;
        let mut data = vec![0u8; len as usize];
        rng.fill(&mut data[..]);
        tokio::time::timeout(
            Duration::from_secs(30),
            engine.write(pair, at, Bytes::from(data)),
        )
        .await
        .unwrap_or_else(|_| panic!("seed {seed}: a write stalled"))
        .unwrap_or_else(|e| panic!("seed {seed}: write: {e}"));
    }
}

/// Polls the pair's figures (in simulated time) until `done` holds, or fails after
/// `secs` simulated seconds, naming `what`.
async fn until(
    engine: &Engine,
    pair: PairId,
    secs: u64,
    what: &str,
    done: impl Fn(&tidemark_actors::PairStats) -> bool,
) -> Result<tidemark_actors::PairStats, String> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        let stats = engine.stats().await.map_err(|e| e.to_string())?;
        let p = stats.pairs[pair.0 as usize].clone();
        if done(&p) {
            return Ok(p);
        }
        if tokio::time::Instant::now() > deadline {
            return Err(format!("{what} never happened: {p:?}"));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The remote applied everything and both units are equal.
async fn converged(engine: &Engine, pair: PairId, seed: u64) {
    until(engine, pair, 120, "the resync's end", |p| {
        p.primary_state == Some("replicating") && p.dirty_bytes == 0
    })
    .await
    .unwrap_or_else(|e| panic!("seed {seed}: {e}"));
    tokio::time::timeout(Duration::from_secs(120), engine.drain())
        .await
        .unwrap_or_else(|_| panic!("seed {seed}: drain never ended"))
        .unwrap_or_else(|e| panic!("seed {seed}: drain: {e}"));
    let differ = units_differ(engine).expect("compare");
    if !differ.is_empty() {
        let (l, r) = (
            engine.store(pair, false).unwrap(),
            engine.store(pair, true).unwrap(),
        );
        let mut a = vec![0u8; 4096];
        let mut b = vec![0u8; 4096];
        let mut bad = Vec::new();
        for off in (0..UNIT).step_by(4096) {
            l.read_at(tidemark::Offset(off), &mut a).unwrap();
            r.read_at(tidemark::Offset(off), &mut b).unwrap();
            if a != b {
                bad.push(off / 4096);
            }
        }
        eprintln!("differing 4k blocks: {bad:?}");
    }
    assert!(
        differ.is_empty(),
        "seed {seed}: remote != local after the resync"
    );
}

/// The secondary goes away while clients write: no write stalls past the suspend
/// timer, the pair tracks, and when the link returns the resync (with clients still
/// writing) leaves remote == local.
#[test]
fn an_outage_is_tracked_and_resynced_while_clients_write() {
    for seed in seeds() {
        let dir = tempfile::tempdir().expect("tempdir");
        let dir = dir.path().to_path_buf();
        sim::run(async move {
            let (engine, pair, remote) = start(&dir, seed, Impairment::none());
            let mut rng = Pcg64::seed_from_u64(seed);
            write_some(&engine, pair, &mut rng, 50, seed).await;
            engine.set_link_down(remote, true);
            // Writes go on during the outage: every one completes.
            write_some(&engine, pair, &mut rng, 200, seed).await;
            let p = until(&engine, pair, 10, "tracking", |p| {
                p.primary_state == Some("tracking")
            })
            .await
            .unwrap_or_else(|e| panic!("seed {seed}: {e}"));
            assert!(
                p.dirty_bytes > 0,
                "seed {seed}: nothing recorded dirty: {p:?}"
            );
            engine.set_link_down(remote, false);
            // Clients keep writing while the resync runs.
            write_some(&engine, pair, &mut rng, 100, seed).await;
            converged(&engine, pair, seed).await;
            let p = &engine.stats().await.expect("stats").pairs[pair.0 as usize];
            let sync = p.sync.expect("a resync ran");
            assert!(
                sync.finished && sync.copied_bytes > 0,
                "seed {seed}: {sync:?}"
            );
            assert!(
                sync.copied_bytes <= UNIT,
                "seed {seed}: the resync copied more than the unit: {sync:?}"
            );
        });
    }
}

/// The same over a lossy, duplicating, reordering link, with a second outage cutting
/// the resync short: the resync starts again and still converges.
#[test]
fn an_outage_during_the_resync_starts_it_again() {
    for seed in seeds() {
        let dir = tempfile::tempdir().expect("tempdir");
        let dir = dir.path().to_path_buf();
        sim::run(async move {
            let impair = Impairment {
                loss: 0.05,
                dup: 0.02,
                reorder: 0.1,
                ..Impairment::none()
            };
            let (engine, pair, remote) = start(&dir, seed, impair);
            let mut rng = Pcg64::seed_from_u64(seed);
            write_some(&engine, pair, &mut rng, 30, seed).await;
            engine.set_link_down(remote, true);
            write_some(&engine, pair, &mut rng, 150, seed).await;
            until(&engine, pair, 10, "tracking", |p| {
                p.primary_state == Some("tracking")
            })
            .await
            .unwrap_or_else(|e| panic!("seed {seed}: {e}"));
            engine.set_link_down(remote, false);
            until(&engine, pair, 30, "the resync", |p| {
                p.primary_state == Some("resyncing")
            })
            .await
            .unwrap_or_else(|e| panic!("seed {seed}: {e}"));
            engine.set_link_down(remote, true);
            write_some(&engine, pair, &mut rng, 50, seed).await;
            engine.set_link_down(remote, false);
            write_some(&engine, pair, &mut rng, 50, seed).await;
            converged(&engine, pair, seed).await;
        });
    }
}

/// A primary power loss: its journal loses a tail whose packets the remote already
/// holds, and the machine reboots. The restarted primary must not hand those sequence
/// numbers out again (the remote would drop the new writes as duplicates): it restarts
/// the stream above its reservation and resyncs the whole unit; remote == local after,
/// by content.
#[test]
fn a_power_loss_on_the_primary_never_reuses_a_sequence_number() {
    for seed in seeds() {
        let dir = tempfile::tempdir().expect("tempdir");
        let dir = dir.path().to_path_buf();
        let d = dir.clone();
        // First run: writes reach the remote; the process dies (no clean shutdown).
        sim::run(async move {
            let (engine, pair, _) = start(&d, seed, Impairment::none());
            let mut rng = Pcg64::seed_from_u64(seed);
            write_some(&engine, pair, &mut rng, 100, seed).await;
            tokio::time::timeout(Duration::from_secs(60), engine.drain())
                .await
                .unwrap_or_else(|_| panic!("seed {seed}: drain never ended"))
                .unwrap_or_else(|e| panic!("seed {seed}: drain: {e}"));
            std::mem::forget(engine);
        });
        // The power loss: the journal's last segment loses its tail (none of it was
        // synced), and the machine booted again (the run marker names another boot).
        let segs = dir.join("ja");
        let mut names: Vec<_> = std::fs::read_dir(&segs)
            .expect("segments")
            .map(|e| e.expect("entry").path())
            .filter(|p| p.extension().is_some_and(|e| e == "seg"))
            .collect();
        names.sort();
        let last = names.last().expect("a segment");
        let len = std::fs::metadata(last).expect("meta").len();
        let keep = (len * 2 / 3).max(64);
        std::fs::OpenOptions::new()
            .write(true)
            .open(last)
            .and_then(|f| f.set_len(keep))
            .expect("tear the tail");
        std::fs::write(dir.join("ja").join("running"), "another-boot").expect("marker");
        let d = dir.clone();
        sim::run(async move {
            let (engine, pair, _) = start(&d, seed, Impairment::none());
            let mut rng = Pcg64::seed_from_u64(seed ^ 0xdead);
            write_some(&engine, pair, &mut rng, 100, seed).await;
            converged(&engine, pair, seed).await;
        });
    }
}

/// A primary killed while tracking (no clean stop, same boot) forgets no region the
/// remote misses: the restarted pair finds the dirty map (written ahead of every tracked
/// write), resyncs it, and remote == local.
#[test]
fn a_primary_crash_while_tracking_forgets_no_region() {
    for seed in seeds() {
        let dir = tempfile::tempdir().expect("tempdir");
        let dir = dir.path().to_path_buf();
        let d = dir.clone();
        sim::run(async move {
            let (engine, pair, remote) = start(&d, seed, Impairment::none());
            let mut rng = Pcg64::seed_from_u64(seed);
            write_some(&engine, pair, &mut rng, 30, seed).await;
            engine.set_link_down(remote, true);
            write_some(&engine, pair, &mut rng, 100, seed).await;
            let p = until(&engine, pair, 10, "tracking", |p| {
                p.primary_state == Some("tracking") && p.dirty_bytes > 0
            })
            .await
            .unwrap_or_else(|e| panic!("seed {seed}: {e}"));
            assert!(p.dirty_bytes > 0);
            // The process dies: no shutdown, nothing flushed beyond what it did itself.
            std::mem::forget(engine);
        });
        let d = dir.clone();
        sim::run(async move {
            let (engine, pair, _) = start(&d, seed, Impairment::none());
            let p = until(&engine, pair, 10, "the resync", |p| {
                p.sync.is_some_and(|s| s.resync)
            })
            .await
            .unwrap_or_else(|e| panic!("seed {seed}: {e}"));
            assert!(
                p.sync.is_some_and(|s| s.total_bytes > 0),
                "seed {seed}: {p:?}"
            );
            converged(&engine, pair, seed).await;
        });
    }
}
