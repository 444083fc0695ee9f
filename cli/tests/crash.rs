//! Crash recovery between real processes (invariants I1, I3, I4): the secondary and the
//! primary are killed with SIGKILL at random points and restarted; after every kill of
//! the secondary, `promote` on a copy of its state must give a cut of the write history;
//! at the end the remote equals the local byte for byte.
//!
//! A kill happens at an observed point (the secondary seen receiving writes, in the
//! status file it writes every 500 ms), plus a delay from a seeded RNG (printed);
//! `TIDEMARK_SEED=<n>` replays one.

mod common;
use common::*;
use rand::{Rng, SeedableRng};
use std::time::{Duration, SystemTime};

fn seed() -> u64 {
    seed_or(20261129)
}

fn secondary_killed_repeatedly(proxied: bool) {
    let seed = seed();
    eprintln!("crash test seed {seed} (TIDEMARK_SEED={seed} to replay), proxied {proxied}");
    let mut rng = rand_pcg::Pcg64::seed_from_u64(seed);
    let site = Site::new(proxied);
    let sims = if proxied {
        site.wan_sims(11)
    } else {
        Vec::new()
    };
    // Through the lossy WAN every lost part of a split write costs the whole write's
    // retransmission: keep writes smaller there (see the notes on congestion).
    let (writes, wl_seed, max_write) = if proxied {
        (800usize, seed % 1000, 16384u64)
    } else {
        (2500usize, seed % 1000, 65536u64)
    };
    // The statuses of the secondary running now are those written after `since`.
    let mut since = SystemTime::now();
    let mut sec = site.secondary();
    let mut load = site.spawn_load(writes, wl_seed, max_write, 120);
    let mut cuts = Vec::new();
    for k in 0..4 {
        // The crash point: once the (restarted) secondary is seen receiving writes, a
        // seeded extra delay (fault injection after the event, not synchronisation).
        let journal = site.path("run/site-b/journal");
        let receiving = wait_receiving(&[journal], since, Duration::from_secs(60), || {
            matches!(load.try_wait(), Ok(Some(_)))
        })
        .unwrap_or_else(|e| panic!("seed {seed}, kill {k}: {e}; logs:{}", site.log_tails()));
        let extra = rng.random_range(0..500);
        eprintln!(
            "kill {k}: {} the secondary {extra} ms later",
            if receiving {
                "receiving; killing"
            } else {
                "load has finished; killing"
            }
        );
        std::thread::sleep(Duration::from_millis(extra));
        kill9(sec);
        // A cut by content: if the secondary was down long enough for the primary to
        // track and then resync, its sequence numbers no longer count the writes.
        let cut = site
            .promote_copy(&format!("copy{k}"))
            .and_then(|(_, images)| site.cut_by_content(wl_seed, writes, max_write, &images))
            .unwrap_or_else(|e| panic!("seed {seed}, kill {k}: {e}"));
        cuts.push(cut);
        since = SystemTime::now();
        sec = site.secondary();
    }
    let out = load.wait_with_output().expect("load");
    assert!(
        out.status.success(),
        "seed {seed}: load failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The secondary applies the last writes once every pair's head passes them: a
    // primary daemon on the same state heartbeats them there (the load may stop before
    // its heartbeats covered every pair's last packet; CI saw one pair's last write
    // stay unapplied).
    let pri = site.primary();
    let want = site.counts(wl_seed, writes, max_write);
    site.wait_applied("site-b", &want, Duration::from_secs(60));
    stop(pri);
    stop(sec);
    for s in sims {
        kill9(s);
    }
    for name in ["log", "data"] {
        assert!(
            same_file(
                &site.path(&format!("run/site-a/{name}.img")),
                &site.path(&format!("run/site-b/{name}.img"))
            ),
            "seed {seed}: {name} differs at the end"
        );
    }
    eprintln!("cuts after each kill (writes applied): {cuts:?}");
    assert!(
        cuts.windows(2).all(|w| w[0] <= w[1]),
        "seed {seed}: the cut went backwards: {cuts:?}"
    );
}

#[test]
fn secondary_killed_repeatedly_promote_gives_cuts() {
    secondary_killed_repeatedly(false);
}

#[test]
fn secondary_killed_repeatedly_through_a_lossy_wan() {
    secondary_killed_repeatedly(true);
}

#[test]
fn primary_killed_and_restarted_loses_nothing_journaled() {
    primary_killed_and_restarted(false);
}

/// The same with `primary_journal = "activity-log"`: the journal holds the writes the
/// remote had not acknowledged without their data, so the restarted primary resyncs
/// their regions (the stream restarts, sequence numbers no longer count writes) instead
/// of resending them; the remote still ends equal to the local unit, at a cut found by
/// content.
#[test]
fn primary_killed_and_restarted_with_an_activity_log_loses_nothing() {
    primary_killed_and_restarted(true);
}

fn primary_killed_and_restarted(activity_log: bool) {
    let seed = seed();
    eprintln!(
        "crash test seed {seed} (TIDEMARK_SEED={seed} to replay), activity log {activity_log}"
    );
    let mut rng = rand_pcg::Pcg64::seed_from_u64(seed ^ 0xabc);
    let mut site = Site::new(false);
    if activity_log {
        site.edit_config(|c| c.extra.push("primary_journal = \"activity-log\"".into()));
    }
    let (writes, wl_seed, max_write) = (3000usize, seed % 1000 + 1, 65536u64);
    let sec = site.secondary();
    let mut load = site.spawn(&[
        "load",
        "--config",
        site.cfg(),
        "--system",
        "site-a",
        "--writes",
        &writes.to_string(),
        "--seed",
        &wl_seed.to_string(),
    ]);
    // Kill at an observed point: once the secondary holds a write, the primary has
    // journaled it (a packet leaves only after its write is journaled and written
    // locally); then a seeded extra delay (fault injection after the event).
    let held = wait_until(Duration::from_secs(60), || {
        if let Ok(Some(st)) = load.try_wait() {
            return Ok(format!("load exited ({st}) first"));
        }
        match site.status("site-b") {
            Some(s) if heads(&s).iter().any(|&h| h > 0) => {
                Ok(format!("site-b holds {:?}", heads(&s)))
            }
            Some(s) => Err(format!("site-b holds {:?}", heads(&s))),
            None => Err("site-b wrote no status".into()),
        }
    })
    .unwrap_or_else(|e| {
        panic!(
            "seed {seed}: the secondary never held a write of the load: {e}; logs:{}",
            site.log_tails()
        )
    });
    let extra = rng.random_range(0..500);
    eprintln!("{held}; killing load {extra} ms later");
    std::thread::sleep(Duration::from_millis(extra));
    kill9(load);
    // What the journal holds of writes the remote had not acknowledged: an activity log
    // holds them without data (recovery run on a copy, as the restart will).
    let logged = if activity_log {
        logged_writes(&site.path("run/site-a/journal/segments"))
    } else {
        0
    };
    // Restart the primary without new writes: it must ship whatever its journal holds.
    let primary = site.primary();
    let written = wait_until(Duration::from_secs(60), || {
        let Some(s) = site.status("site-a") else {
            return Err("site-a wrote no status".into());
        };
        let pairs = &s["stats"]["pairs"];
        let w: Vec<u64> = (0..2)
            .map(|i| pairs[i]["written_seq"].as_u64().unwrap_or(0))
            .collect();
        let a: Vec<u64> = (0..2)
            .map(|i| pairs[i]["acked_seq"].as_u64().unwrap_or(0))
            .collect();
        // The resync of an activity log's regions ends with the pair replicating.
        let replicating = (0..2).all(|i| pairs[i]["primary_state"] == "replicating");
        if s["pid"].as_u64() == Some(u64::from(primary.id())) && w == a && replicating {
            let resynced = (0..2).any(|i| pairs[i]["sync"]["resync"] == true);
            assert!(
                logged == 0 || resynced,
                "seed {seed}: {logged} logged writes, and no pair resynced: {pairs}"
            );
            eprintln!("{logged} writes logged without data at the kill; resynced {resynced}");
            Ok(w)
        } else {
            Err(format!(
                "pid {} (restarted primary {}), written {w:?}, acked {a:?}, replicating {replicating}",
                s["pid"],
                primary.id()
            ))
        }
    })
    .unwrap_or_else(|e| {
        panic!(
            "seed {seed}: the restarted primary never caught up: {e}; logs:{}",
            site.log_tails()
        )
    });
    let want = written
        .iter()
        .enumerate()
        .map(|(i, n)| (tidemark::PairId(i as u32), *n))
        .collect();
    site.wait_applied("site-b", &want, Duration::from_secs(60));
    stop(primary);
    stop(sec);
    for name in ["log", "data"] {
        assert!(
            same_file(
                &site.path(&format!("run/site-a/{name}.img")),
                &site.path(&format!("run/site-b/{name}.img"))
            ),
            "seed {seed}: {name} differs"
        );
    }
    let images = [
        site.path("run/site-b/log.img"),
        site.path("run/site-b/data.img"),
    ];
    // An activity log's restart resyncs: its sequence numbers no longer count writes.
    let k = if activity_log {
        site.cut_by_content(wl_seed, writes, max_write, &images)
    } else {
        site.check_cut(wl_seed, writes, max_write, &written, &images)
    }
    .unwrap_or_else(|e| panic!("seed {seed}: {e}"));
    eprintln!("the killed primary had journaled {k} of {writes} writes; all replicated");
    assert!(k > 0, "seed {seed}: nothing was written before the kill");
}

/// Outages of the secondary while the primary writes: it stops (SIGSTOP) long enough for
/// the primary to track, continues, and is SIGKILLed at a seeded moment while the
/// primary resyncs; `promote` on a copy of its state must give a cut, found by content
/// (a resync's sequence numbers no longer count the writes): the cut before the
/// outage (the resync epoch rolled back) or a later one. At the end remote == local.
#[test]
fn secondary_killed_during_resyncs_promote_gives_cuts() {
    use common::outage::signal;
    let seed = seed();
    eprintln!("resync crash test seed {seed} (TIDEMARK_SEED={seed} to replay)");
    let mut rng = rand_pcg::Pcg64::seed_from_u64(seed);
    let site = Site::with_config(Site::two_sites(false).tracking_after_ms(200));
    let (writes, wl_seed, max_write) = (4000usize, seed % 1000, 65536u64);
    let mut since = SystemTime::now();
    let mut sec = site.secondary();
    let mut load = site.spawn_load(writes, wl_seed, max_write, 180);
    let mut cuts = Vec::new();
    for k in 0..3 {
        let journal = site.path("run/site-b/journal");
        let receiving = wait_receiving(&[journal], since, Duration::from_secs(60), || {
            matches!(load.try_wait(), Ok(Some(_)))
        })
        .unwrap_or_else(|e| panic!("seed {seed}, round {k}: {e}; logs:{}", site.log_tails()));
        if !receiving {
            eprintln!("round {k}: the load finished first");
            break;
        }
        // The outage (fault injection, seeded): the secondary stops for 0.6-1.5 s; the
        // primary tracks once it has been silent for 200 ms while writes wait on it.
        let outage = rng.random_range(600..1500);
        signal("-STOP", sec.id());
        std::thread::sleep(Duration::from_millis(outage));
        signal("-CONT", sec.id());
        // The crash point: a seeded delay into the resync (fault injection, not
        // synchronisation).
        let extra = rng.random_range(0..400);
        eprintln!("round {k}: an outage of {outage} ms; killing the secondary {extra} ms after it");
        std::thread::sleep(Duration::from_millis(extra));
        kill9(sec);
        let (_, images) = site
            .promote_copy(&format!("copy{k}"))
            .unwrap_or_else(|e| panic!("seed {seed}, round {k}: {e}"));
        let cut = site
            .cut_by_content(wl_seed, writes, max_write, &images)
            .unwrap_or_else(|e| panic!("seed {seed}, round {k}: {e}"));
        cuts.push(cut);
        since = SystemTime::now();
        sec = site.secondary();
    }
    let out = load.wait_with_output().expect("load");
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "seed {seed}: load failed: {log}; logs:{}",
        site.log_tails()
    );
    // The outages made the primary track, so the kills fell around resyncs.
    let tracked = log.matches("tracking: writes go on locally").count();
    eprintln!("the primary tracked {tracked} times");
    assert!(
        !cuts.is_empty() && tracked > 0,
        "seed {seed}: no outage was tracked: {log}"
    );
    // The load waited until every pair replicates again with everything acknowledged.
    // The secondary applies the last writes once the heads pass them: a primary daemon
    // on the same state heartbeats them there (the load's last heartbeats may not have
    // covered every pair's last packet when it stopped).
    let pri = site.primary();
    let converged = wait_until(Duration::from_secs(60), || {
        let same = ["log", "data"].iter().all(|n| {
            same_file(
                &site.path(&format!("run/site-a/{n}.img")),
                &site.path(&format!("run/site-b/{n}.img")),
            )
        });
        if same {
            Ok(())
        } else {
            Err("the units differ".to_string())
        }
    });
    stop(pri);
    stop(sec);
    assert!(
        converged.is_ok(),
        "seed {seed}: remote != local at the end: {converged:?}; logs:{}",
        site.log_tails()
    );
    eprintln!("cuts after each kill (writes in the cut): {cuts:?}");
}

/// How many writes the journal in `segments` holds without their data (an activity
/// log's), read from a copy so the daemon's own recovery finds the files untouched.
fn logged_writes(segments: &std::path::Path) -> usize {
    let copy = tempfile::tempdir().expect("tempdir");
    for e in std::fs::read_dir(segments).expect("segments") {
        let e = e.expect("entry");
        if e.path().extension().is_some_and(|x| x == "seg") {
            std::fs::copy(e.path(), copy.path().join(e.file_name())).expect("copy");
        }
    }
    let (_, recovered) = tidemark::journal::Journal::open(
        copy.path(),
        tidemark::journal::JournalOptions::with_capacity(256 << 20),
    )
    .expect("the journal opens");
    recovered.pairs.values().map(|p| p.logged.len()).sum()
}
