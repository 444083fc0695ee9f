//! Crash recovery between real processes (invariants I1, I3, I4): the secondary and the
//! primary are killed with SIGKILL at random points and restarted; after every kill of
//! the secondary, `promote` on a copy of its state must give a cut of the write history;
//! at the end the remote equals the local byte for byte.
//!
//! Kill points come from a seeded RNG (printed); `TIDEMARK_SEED=<n>` replays one.

mod common;
use common::*;
use rand::{Rng, SeedableRng};
use std::time::Duration;

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
    let mut sec = site.secondary();
    let load = site.spawn(&[
        "load",
        "--config",
        site.cfg(),
        "--system",
        "site-a",
        "--writes",
        &writes.to_string(),
        "--seed",
        &wl_seed.to_string(),
        "--max-write",
        &max_write.to_string(),
        "--timeout-s",
        "120",
    ]);
    let mut cuts = Vec::new();
    for k in 0..4 {
        // A random crash point: fault injection, not synchronisation.
        std::thread::sleep(Duration::from_millis(rng.random_range(150..700)));
        kill9(sec);
        match site.promote_copy_and_check(&format!("copy{k}"), wl_seed, writes, max_write) {
            Ok(cut) => cuts.push(cut),
            Err(e) => panic!("seed {seed}, kill {k}: {e}"),
        }
        sec = site.secondary();
    }
    let out = load.wait_with_output().expect("load");
    assert!(
        out.status.success(),
        "seed {seed}: load failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let want = site.counts(wl_seed, writes, max_write);
    site.wait_applied("site-b", &want, Duration::from_secs(60));
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
    let seed = seed();
    eprintln!("crash test seed {seed} (TIDEMARK_SEED={seed} to replay)");
    let mut rng = rand_pcg::Pcg64::seed_from_u64(seed ^ 0xabc);
    let site = Site::new(false);
    let (writes, wl_seed, max_write) = (3000usize, seed % 1000 + 1, 65536u64);
    let sec = site.secondary();
    let load = site.spawn(&[
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
    std::thread::sleep(Duration::from_millis(rng.random_range(200..900)));
    kill9(load);
    // Restart the primary without new writes: it must ship whatever its journal holds.
    let primary = site.primary();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let written = loop {
        if let Some(s) = site.status("site-a") {
            let pairs = &s["stats"]["pairs"];
            let w: Vec<u64> = (0..2)
                .map(|i| pairs[i]["written_seq"].as_u64().unwrap_or(0))
                .collect();
            let a: Vec<u64> = (0..2)
                .map(|i| pairs[i]["acked_seq"].as_u64().unwrap_or(0))
                .collect();
            if s["pid"].as_u64() == Some(u64::from(primary.id())) && w == a {
                break w;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "seed {seed}: the restarted primary never caught up"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
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
    let k = site
        .check_cut(wl_seed, writes, max_write, &written, &images)
        .unwrap_or_else(|e| panic!("seed {seed}: {e}"));
    eprintln!("the killed primary had journaled {k} of {writes} writes; all replicated");
    assert!(k > 0, "seed {seed}: nothing was written before the kill");
}
