//! Outages (simulated): the secondary goes away while clients write. Writes go on
//! (tracking: local write, dirty regions recorded write-ahead), the link comes back, the
//! resync copies the dirty regions through the ordered path while clients keep writing,
//! and the remote ends identical to the local unit. A primary that restarts after its
//! journal lost a tail it had sent (a power loss) never reuses a sequence number: it
//! restarts its stream with a `Restart` mark and a full resync.
//!
//! Seeded: `TIDEMARK_SEED=<n>` replays a run; every failure names its seed.

mod common;
mod sim;

use bytes::Bytes;
use rand::{Rng, SeedableRng};
use rand_pcg::Pcg64;
use std::path::Path;
use std::time::Duration;
use tidemark::journal::Recovered;
use tidemark::{PairId, SystemId};
use tidemark_actors::units::journaling::SharedJournal;
use tidemark_actors::{units_differ, Engine, Impairment, InitialSync, PrimaryJournal, TrackConfig};

/// The crash tests run with either primary journal.
const MODES: [PrimaryJournal; 2] = [PrimaryJournal::Data, PrimaryJournal::ActivityLog];

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

/// Every seed in either journal mode.
fn cases() -> Vec<(PrimaryJournal, u64)> {
    MODES
        .into_iter()
        .flat_map(|m| seeds().into_iter().map(move |s| (m, s)))
        .collect()
}

fn track() -> TrackConfig {
    TrackConfig {
        suspend_after: Some(Duration::from_millis(200)),
        on_full: true,
    }
}

/// An engine with one pair a → b of file units in `dir`, 16 MiB journals, tracking on.
fn start(dir: &Path, seed: u64, impair: Impairment) -> (Engine, PairId, SystemId) {
    start_with(dir, seed, impair, PrimaryJournal::Data)
}

/// [`start`] with the primary's journal in `mode`.
fn start_with(
    dir: &Path,
    seed: u64,
    impair: Impairment,
    mode: PrimaryJournal,
) -> (Engine, PairId, SystemId) {
    let (mut b, _, r, pair) = common::file_pair(seed, dir, UNIT, 16 << 20);
    b.impairment(impair)
        .tracking(track())
        .primary_journal(mode)
        .initial_sync(pair, InitialSync::None);
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

/// Waits until the remote applied everything; fails after `secs` simulated seconds.
async fn drained(engine: &Engine, secs: u64, seed: u64) {
    tokio::time::timeout(Duration::from_secs(secs), engine.drain())
        .await
        .unwrap_or_else(|_| panic!("seed {seed}: drain never ended"))
        .unwrap_or_else(|e| panic!("seed {seed}: drain: {e}"));
}

/// The remote applied everything and both units are equal.
async fn converged(engine: &Engine, pair: PairId, seed: u64) {
    until(engine, pair, 120, "the resync's end", |p| {
        p.primary_state == Some("replicating") && p.dirty_bytes == 0
    })
    .await
    .unwrap_or_else(|e| panic!("seed {seed}: {e}"));
    drained(engine, 120, seed).await;
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
    for (mode, seed) in cases() {
        eprintln!("seed {seed}, primary journal {mode:?}");
        let dir = tempfile::tempdir().expect("tempdir");
        let dir = dir.path().to_path_buf();
        let d = dir.clone();
        // First run: writes reach the remote; the process dies (no clean shutdown).
        sim::run(async move {
            let (engine, pair, _) = start_with(&d, seed, Impairment::none(), mode);
            let mut rng = Pcg64::seed_from_u64(seed);
            write_some(&engine, pair, &mut rng, 100, seed).await;
            drained(&engine, 60, seed).await;
            std::mem::forget(engine);
        });
        power_loss(&dir);
        let d = dir.clone();
        sim::run(async move {
            let (engine, pair, _) = start_with(&d, seed, Impairment::none(), mode);
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
    for (mode, seed) in cases() {
        eprintln!("seed {seed}, primary journal {mode:?}");
        let dir = tempfile::tempdir().expect("tempdir");
        let dir = dir.path().to_path_buf();
        let d = dir.clone();
        sim::run(async move {
            let (engine, pair, remote) = start_with(&d, seed, Impairment::none(), mode);
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
            let (engine, pair, _) = start_with(&d, seed, Impairment::none(), mode);
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

/// What the primary's journal in `dir` holds now (recovery run on it, as a restart
/// would).
fn primary_journal_of(dir: &Path) -> Recovered {
    let (j, recovered) = SharedJournal::open(&dir.join("ja"), 16 << 20).expect("journal");
    drop(j);
    recovered
}

/// A primary killed (same boot, no clean stop) while writes it acknowledged are not yet
/// acknowledged by the remote. A data journal holds those writes with their data, and
/// the restart resends them; an activity log holds only their regions, and the restart
/// resyncs those regions (not the whole unit) through the consistent resync. Either way
/// the remote ends equal to the local unit, and nothing stalls.
#[test]
fn a_primary_killed_with_unacknowledged_writes_ships_them_in_either_journal_mode() {
    const UNACKED: usize = 5;
    for (mode, seed) in cases() {
        eprintln!("seed {seed}, primary journal {mode:?}");
        let dir = tempfile::tempdir().expect("tempdir");
        let dir = dir.path().to_path_buf();
        let d = dir.clone();
        sim::run(async move {
            let (engine, pair, remote) = start_with(&d, seed, Impairment::none(), mode);
            let mut rng = Pcg64::seed_from_u64(seed);
            write_some(&engine, pair, &mut rng, 20, seed).await;
            drained(&engine, 60, seed).await;
            // The remote stops answering; a few writes complete locally (journaled and
            // written), none acknowledged by the remote; the process dies.
            engine.set_link_down(remote, true);
            write_some(&engine, pair, &mut rng, UNACKED, seed).await;
            std::mem::forget(engine);
        });
        // What the journal holds of the unacknowledged writes, by mode.
        let rp = primary_journal_of(&dir)
            .pairs
            .get(&PairId(0))
            .cloned()
            .expect("the pair is in the journal");
        let with_data = rp
            .live
            .iter()
            .filter(|p| matches!(p.payload, tidemark::Payload::Write { .. }))
            .count();
        match mode {
            PrimaryJournal::Data => assert!(
                rp.logged.is_empty() && with_data > 0,
                "seed {seed}: a data journal holds {} logged writes and {with_data} with data",
                rp.logged.len()
            ),
            PrimaryJournal::ActivityLog => assert!(
                !rp.logged.is_empty() && with_data == 0,
                "seed {seed}: an activity log holds {} logged writes and {with_data} with data",
                rp.logged.len()
            ),
        }
        let logged_bytes: u64 = rp.logged.iter().map(|l| l.len).sum();
        let d = dir.clone();
        sim::run(async move {
            let (engine, pair, _) = start_with(&d, seed, Impairment::none(), mode);
            converged(&engine, pair, seed).await;
            let p = engine.stats().await.expect("stats").pairs[pair.0 as usize].clone();
            if mode == PrimaryJournal::ActivityLog {
                // The logged regions (and any tracked after them) resynced, rounded out
                // to 64 KiB regions: each write of at most 64 KiB touches two. Far from
                // the whole unit.
                let s = p.sync.expect("a resync ran");
                assert!(s.resync, "seed {seed}: {s:?}");
                assert!(
                    s.total_bytes >= logged_bytes && s.total_bytes <= UNACKED as u64 * (128 << 10),
                    "seed {seed}: resynced {} bytes for {logged_bytes} logged",
                    s.total_bytes
                );
            }
        });
    }
}

/// A power loss on the primary of `dir`: its journal's last segment loses a third (none
/// of it was synced), and the machine booted again (the run marker names another boot).
fn power_loss(dir: &Path) {
    tidemark::journal::fault::tear_last_segment(&dir.join("ja")).expect("tear the tail");
    std::fs::write(dir.join("ja").join("running"), "another-boot").expect("marker");
}

/// A power loss on the primary while its initial sync runs: the restart gives up the
/// stream above its reservation and copies the whole unit again; once that copy is done
/// the remote unit must be equal to the local one and part of a cut again (`consistent`:
/// promote refuses an `inconsistent` pair).
#[test]
fn a_power_loss_during_the_initial_sync_ends_consistent() {
    for seed in seeds() {
        eprintln!("seed {seed}");
        let dir = tempfile::tempdir().expect("tempdir");
        let dir = dir.path().to_path_buf();
        // The local unit holds data before the pair exists: the initial sync copies it.
        let mut rng = Pcg64::seed_from_u64(seed);
        let mut data = vec![0u8; UNIT as usize];
        rng.fill(&mut data[..]);
        std::fs::write(dir.join("local.img"), &data).expect("local unit");
        let build = |d: &Path| {
            let (mut b, _, _, pair) = common::file_pair(seed, d, UNIT, 16 << 20);
            b.tracking(track())
                .window_bytes(256 << 10)
                .initial_sync(pair, InitialSync::Full);
            (b.start().expect("start"), pair)
        };
        let d = dir.clone();
        sim::run(async move {
            let (engine, pair) = build(&d);
            let p = until(&engine, pair, 60, "the copy under way", |p| {
                p.sync.is_some_and(|s| s.copied_bytes > 0 && !s.finished)
                    && p.secondary_state == Some("inconsistent")
            })
            .await
            .unwrap_or_else(|e| panic!("seed {seed}: {e}"));
            eprintln!("seed {seed}: power loss at {:?}", p.sync);
            std::mem::forget(engine);
        });
        power_loss(&dir);
        let d = dir.clone();
        sim::run(async move {
            let (engine, pair) = build(&d);
            converged(&engine, pair, seed).await;
            let p = engine.stats().await.expect("stats").pairs[pair.0 as usize].clone();
            assert_eq!(
                p.secondary_state,
                Some("consistent"),
                "seed {seed}: every region was copied again, yet the remote is not a cut: {p:?}"
            );
        });
    }
}
