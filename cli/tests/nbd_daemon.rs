//! The NBD front end of the `tidemark primary` daemon, with real processes on loopback:
//! a secondary and a primary serving its units at `nbd_listen`.
//!
//! - Dependent writes (each issued after the previous reply) go alternately to the two
//!   exports from a small raw NBD client while the secondary is killed with SIGKILL and
//!   restarted (each kill once the secondary is seen receiving, plus a seeded random
//!   delay); after every kill, `promote` on a copy of the secondary's state must give a
//!   consistent cut (invariant I1) across both exports: a global prefix of the write
//!   sequence, holding exactly the bytes of that prefix. At the end the remote units
//!   equal the local units, and both equal the replay of every write.
//! - fio (`--ioengine=nbd`) random writes with verify at queue depth 16 against the
//!   daemon; the remote units equal the local units once the secondary applied
//!   everything.
//!
//! The seed is printed; `TIDEMARK_SEED=<n>` replays one. A test that needs a client
//! program skips (printing SKIPPED) if it is not installed.

mod common;
use common::dependent::*;
use common::*;
use std::path::PathBuf;
use std::time::SystemTime;

fn seed() -> u64 {
    seed_or(20261201)
}

/// Starts the secondary, then the primary, and waits (bounded) for its NBD port.
fn start_daemons(site: &Site, port: u16) -> Daemons {
    let secondary = Some(site.secondary());
    let mut primary = site.primary();
    wait_tcp(port, &mut primary, PATIENCE);
    Daemons {
        primary: Some(primary),
        secondary,
    }
}

fn assert_local_equals_remote(site: &Site, seed: u64) {
    for (name, _) in EXPORTS {
        let local = std::fs::read(site.path(&format!("run/site-a/{name}.img"))).expect("local");
        let remote = std::fs::read(site.path(&format!("run/site-b/{name}.img"))).expect("remote");
        if let Some(at) = first_difference(&local, &remote) {
            panic!("seed {seed}: {name}: the remote unit differs from the local at byte {at}");
        }
    }
}

#[test]
fn dependent_writes_over_nbd_while_the_secondary_is_killed_promote_gives_cuts() {
    let seed = seed();
    eprintln!("nbd daemon crash test seed {seed} (TIDEMARK_SEED={seed} to replay)");
    let (site, port) = Site::with_nbd();
    let mut daemons = start_daemons(&site, port);
    // Enough writes that the writer is still busy when the kills end; it stops early
    // once they have and 1,500 writes were sent.
    let remotes = [site.path("run/site-b/journal")];
    let run = writes_through_crashes(seed, [port, port], (1_500, 40_000), 4, &remotes, |k| {
        kill9(daemons.secondary.take().expect("the secondary runs"));
        let result = site.promote_copy(&format!("copy{k}"));
        daemons.secondary = Some(site.secondary());
        result
    });
    let done = &run.plan[..run.done];
    let want = counts(done);
    eprintln!("{want:?} writes per export");
    // The primary stamped exactly one sequence number per write.
    let status = site.status_after("site-a", SystemTime::now(), PATIENCE);
    assert_eq!(
        written_seq(&status),
        want,
        "seed {seed}: the primary's written_seq per pair"
    );
    site.wait_applied("site-b", &as_want(&want), PATIENCE);
    daemons.stop_both(&site);
    assert_local_equals_remote(&site, seed);
    let expected = replay(seed, done, &want);
    for (e, (name, _)) in EXPORTS.iter().enumerate() {
        let local = std::fs::read(site.path(&format!("run/site-a/{name}.img"))).expect("local");
        if let Some(at) = first_difference(&local, &expected[e]) {
            panic!("seed {seed}: {name}: the local unit differs from the replay at byte {at}");
        }
    }
}

#[test]
fn fio_random_writes_with_verify_at_qd16_against_the_daemon_replicate() {
    if !have(&["fio"]) {
        return;
    }
    let seed = seed();
    eprintln!("nbd daemon fio test seed {seed} (TIDEMARK_SEED={seed} to replay)");
    let (site, port) = Site::with_nbd();
    let daemons = start_daemons(&site, port);
    let mut fio_writes = vec![0u64; EXPORTS.len()];
    for (e, (name, size)) in EXPORTS.iter().enumerate() {
        let job = fio_randwrite_verify(port, name, *size, seed);
        fio_writes[e] = job["write"]["total_ios"].as_u64().unwrap_or(0);
    }
    // Everything fio wrote is in the primary's status written after fio ended: one
    // sequence number per NBD write (fio's verify reads are not writes).
    let status = site.status_after("site-a", SystemTime::now(), PATIENCE);
    let written = written_seq(&status);
    assert_eq!(written, fio_writes, "the primary's written_seq per pair");
    eprintln!("fio writes per export {fio_writes:?}; primary written_seq {written:?}");
    site.wait_applied("site-b", &as_want(&written), PATIENCE);
    daemons.stop_both(&site);
    assert_local_equals_remote(&site, seed);
}

/// The cut check itself catches a non-prefix and wrong bytes (so a pass above means
/// something).
#[test]
fn the_cut_check_rejects_non_cuts_and_wrong_bytes() {
    let seed = 7;
    let plan = ops(seed, 200);
    let dir = tempfile::tempdir().expect("tempdir");
    let images: Vec<PathBuf> = EXPORTS
        .iter()
        .map(|(n, _)| dir.path().join(format!("{n}.img")))
        .collect();
    let write = |counts: &[u64]| {
        for (e, img) in replay(seed, &plan, counts).iter().enumerate() {
            std::fs::write(&images[e], img).expect("image");
        }
    };
    let k = 120;
    let good = counts(&plan[..k]);
    write(&good);
    assert_eq!(check_cut(seed, &plan, &good, &images), Ok(k));
    // One more write on the export that does not come next: not a prefix.
    let next = plan[k].export;
    let mut skewed = good.clone();
    skewed[1 - next] += 1;
    write(&skewed);
    let e = check_cut(seed, &plan, &skewed, &images).expect_err("not a cut");
    assert!(e.contains("not a cut"), "{e}");
    // The right counts over the wrong bytes.
    write(&counts(&plan[..k - 2]));
    let e = check_cut(seed, &plan, &good, &images).expect_err("wrong bytes");
    assert!(e.contains("does not hold"), "{e}");
}
