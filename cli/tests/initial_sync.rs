//! The initial sync with real daemons on loopback: a primary whose local units already
//! hold data (random extents with holes) copies them to the secondary while clients
//! write; promote and export refuse a secondary caught in the middle of the copy unless
//! `--force`; a sparse unit is copied as sparse.
//!
//! Waits are on what the status files show (bounded against a hung test, never a
//! measurement). The link is paced (`rate`) where a test needs the copy to last while
//! something else happens. The seed is printed; `TIDEMARK_SEED=<n>` replays one.

mod common;
use common::dependent::*;
use common::*;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::Arc;
use std::time::SystemTime;

fn seed() -> u64 {
    seed_or(20261202)
}

/// Makes `path` a sparse file of `size` bytes holding seeded random bytes in `extents`
/// (offset, len) and holes elsewhere.
fn prefill(path: &Path, size: u64, extents: &[(u64, u64)], seed: u64) {
    use rand::{RngCore, SeedableRng};
    let mut rng = rand_pcg::Pcg64::seed_from_u64(seed);
    std::fs::create_dir_all(path.parent().expect("a directory")).expect("mkdir");
    let f = std::fs::File::create(path).expect("create");
    f.set_len(size).expect("size");
    for &(at, len) in extents {
        let mut data = vec![0u8; len as usize];
        rng.fill_bytes(&mut data);
        f.write_all_at(&data, at).expect("write");
    }
    f.sync_all().expect("sync");
}

/// The first byte at which two files differ (or their shorter length), read in chunks.
fn files_differ(a: &Path, b: &Path) -> Option<u64> {
    let (fa, fb) = (
        std::fs::File::open(a).expect("open"),
        std::fs::File::open(b).expect("open"),
    );
    let (la, lb) = (
        fa.metadata().expect("stat").len(),
        fb.metadata().expect("stat").len(),
    );
    if la != lb {
        return Some(la.min(lb));
    }
    const CHUNK: usize = 8 << 20;
    let (mut x, mut y) = (vec![0u8; CHUNK], vec![0u8; CHUNK]);
    let mut at = 0;
    while at < la {
        let n = CHUNK.min((la - at) as usize);
        fa.read_exact_at(&mut x[..n], at).expect("read");
        fb.read_exact_at(&mut y[..n], at).expect("read");
        if let Some(i) = first_difference(&x[..n], &y[..n]) {
            return Some(at + i as u64);
        }
        at += n as u64;
    }
    None
}

/// Starts the secondary, then the primary.
fn start_daemons(site: &Site) -> Daemons {
    Daemons {
        secondary: Some(site.secondary()),
        primary: Some(site.primary()),
    }
}

/// The pairs of a status (`stats.pairs`).
fn pairs(status: &serde_json::Value) -> Vec<serde_json::Value> {
    status["stats"]["pairs"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// Waits until the primary's status (written after `since`) shows every pair
/// replicating with its sync (if any) finished and the secondary's shows every pair
/// consistent with everything the primary stamped applied; returns the primary's
/// status.
fn wait_synced(site: &Site, since: SystemTime) -> serde_json::Value {
    wait_until(PATIENCE, || {
        let s = status_since(&site.path("run/site-a/journal"), since)
            .ok_or("no status since the start")?;
        let done = pairs(&s).iter().all(|p| {
            p["primary_state"] == "replicating"
                && (p["sync"].is_null() || p["sync"]["finished"] == true)
        });
        if done {
            Ok(())
        } else {
            Err(s["stats"]["pairs"].to_string())
        }
    })
    .unwrap_or_else(|e| {
        panic!(
            "the primary never replicated: {e}; logs:{}",
            site.log_tails()
        )
    });
    // Every packet is stamped by now (the copy is over, clients are done): the written
    // point of a status written after this is final.
    let status = site.status_after("site-a", SystemTime::now(), PATIENCE);
    let written: Vec<u64> = pairs(&status)
        .iter()
        .map(|p| p["written_seq"].as_u64().unwrap_or(0))
        .collect();
    site.wait_applied("site-b", &as_want(&written), PATIENCE);
    wait_until(PATIENCE, || {
        let s = site.status("site-b").ok_or("no status")?;
        let ok = pairs(&s)
            .iter()
            .all(|p| p["secondary_state"] == "consistent");
        if ok {
            Ok(())
        } else {
            Err(s["stats"]["pairs"].to_string())
        }
    })
    .unwrap_or_else(|e| panic!("the secondary never became consistent: {e}"));
    status
}

/// A site like [`Site::with_nbd`] whose link is paced at `rate`, its local units
/// prefilled: "log" (4 MiB) with 2 MiB of data in two extents, "data" (8 MiB) with
/// 4 MiB in four (every other MiB), holes between.
fn prefilled_site(seed: u64, rate: &str) -> (Site, u16) {
    let (mut site, port) = Site::with_nbd();
    site.edit_config(|c| c.rate = Some(rate.into()));
    let mib = 1u64 << 20;
    prefill(
        &site.path("run/site-a/log.img"),
        4 * mib,
        &[(0, mib), (3 * mib / 2, mib)],
        seed,
    );
    prefill(
        &site.path("run/site-a/data.img"),
        8 * mib,
        &[
            (0, mib),
            (2 * mib, mib),
            (4 * mib, mib),
            (6 * mib + 4096, mib - 8192),
        ],
        seed + 1,
    );
    (site, port)
}

/// Prefilled local units are copied while a client writes through NBD (fio with
/// verify; without fio, our own dependent writes): afterwards every unit is replicating
/// and consistent, and each remote file equals its local file byte for byte.
#[test]
fn a_prefilled_unit_is_copied_while_a_client_writes() {
    let seed = seed();
    eprintln!("initial sync test seed {seed} (TIDEMARK_SEED={seed} to replay)");
    // 6 MiB of data at 4 MiB/s: the copy lasts well over a second.
    let (site, port) = prefilled_site(seed, "4MiB");
    let before: Vec<Vec<u8>> = EXPORTS
        .iter()
        .map(|(n, _)| std::fs::read(site.path(&format!("run/site-a/{n}.img"))).expect("unit"))
        .collect();
    let started = SystemTime::now();
    let mut daemons = start_daemons(&site);
    wait_tcp(port, daemons.primary.as_mut().expect("primary"), PATIENCE);
    // The copy runs: every pair syncing.
    let first = wait_until(PATIENCE, || {
        let s = status_since(&site.path("run/site-a/journal"), started).ok_or("no status")?;
        let syncing = pairs(&s).iter().all(|p| p["sync"].is_object());
        if syncing {
            Ok(s)
        } else {
            Err(s.to_string())
        }
    })
    .unwrap_or_else(|e| panic!("no sync seen: {e}"));
    for p in pairs(&first) {
        let total = p["sync"]["total_bytes"].as_u64().expect("total_bytes");
        assert!(total >= 2 << 20, "{p}: the prefilled data is to be copied");
    }
    let writing_during_sync = pairs(&first).iter().any(|p| p["sync"]["finished"] == false);

    let model = if have(&["fio"]) {
        // fio overwrites the whole of "data" at random (holes the copy has not reached
        // yet included) and reads it back through the primary: verify.
        let size = EXPORTS[1].1;
        fio_randwrite_verify(port, "data", size, seed);
        // "log" is not written: it must end as prefilled.
        vec![Some(before[0].clone()), None]
    } else {
        eprintln!("fio not installed: our own dependent NBD writes instead");
        let plan = Arc::new(ops(seed, 600));
        let done = dependent_writer(
            &[port, port],
            seed,
            plan.clone(),
            plan.len(),
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicUsize::new(0)),
        );
        assert_eq!(done, plan.len());
        // The prefill, then every write in order.
        let mut images = before.clone();
        for (i, op) in plan.iter().enumerate() {
            let at = op.offset as usize;
            images[op.export][at..at + op.len as usize].copy_from_slice(&payload(seed, i, op));
        }
        images.into_iter().map(Some).collect()
    };
    eprintln!("the client wrote while the copy ran: {writing_during_sync}");

    let status = wait_synced(&site, started);
    for p in pairs(&status) {
        let sync = &p["sync"];
        assert_eq!(sync["finished"], true, "{p}");
        assert_eq!(sync["percent"], 100.0, "{p}");
        assert_eq!(sync["copied_bytes"], sync["total_bytes"], "{p}");
    }
    daemons.stop_both(&site);
    for (e, (name, _)) in EXPORTS.iter().enumerate() {
        let local = site.path(&format!("run/site-a/{name}.img"));
        let remote = site.path(&format!("run/site-b/{name}.img"));
        if let Some(at) = files_differ(&local, &remote) {
            panic!("seed {seed}: {name}: the remote unit differs from the local at byte {at}");
        }
        if let Some(want) = &model[e] {
            let got = std::fs::read(&local).expect("local");
            if let Some(at) = first_difference(&got, want) {
                panic!("seed {seed}: {name}: the local unit differs from the model at byte {at}");
            }
        }
    }
}

/// Copies the secondary's state, the config and the key under `tag`; returns the
/// copy's config path.
fn copy_secondary(site: &Site, tag: &str) -> String {
    let copy = site.path(tag);
    std::fs::create_dir_all(copy.join("run")).expect("mkdir");
    let status = Command::new("cp")
        .arg("-a")
        .arg(site.path("run/site-b"))
        .arg(copy.join("run"))
        .status()
        .expect("cp");
    assert!(status.success(), "copy failed");
    std::fs::copy(&site.config, copy.join("tidemark.toml")).expect("config");
    std::fs::copy(site.path("cluster.key"), copy.join("cluster.key")).expect("key");
    copy.join("tidemark.toml")
        .to_str()
        .expect("utf-8")
        .to_string()
}

/// A secondary caught in the middle of the copy (its status says `data` is
/// inconsistent; the primary is then killed, so the copy cannot finish): promote on a
/// copy of its state refuses with exit 2 and changes nothing; `--force` promotes,
/// warns and reports `forced`; export refuses the forced result unless `--force`.
/// Then the primary restarts, its journal still says syncing, and the copy starts over
/// and completes: remote == local == the prefill.
#[test]
fn promote_and_export_refuse_a_secondary_in_the_middle_of_the_copy_unless_forced() {
    let seed = seed() + 100;
    eprintln!(
        "initial sync promote test seed {seed} (TIDEMARK_SEED={} to replay)",
        seed - 100
    );
    // 6 MiB of data at 4 MiB/s: the copy takes over a second; the primary is killed as
    // soon as the secondary's status (every 500 ms) shows it applied the first mark of
    // "data".
    let (site, _port) = prefilled_site(seed, "4MiB");
    let prefilled: Vec<Vec<u8>> = EXPORTS
        .iter()
        .map(|(n, _)| std::fs::read(site.path(&format!("run/site-a/{n}.img"))).expect("unit"))
        .collect();
    let mut daemons = start_daemons(&site);
    wait_until(PATIENCE, || {
        let s = site.status("site-b").ok_or("no status")?;
        match pairs(&s)
            .iter()
            .find(|p| p["name"] == "data")
            .map(|p| p["secondary_state"].clone())
        {
            Some(state) if state == "inconsistent" => Ok(()),
            other => Err(format!("data: {other:?}")),
        }
    })
    .unwrap_or_else(|e| panic!("never inconsistent: {e}; logs:{}", site.log_tails()));
    kill9(daemons.primary.take().expect("primary"));
    let cfg = copy_secondary(&site, "copy");
    let copy_unit = site.path("copy/run/site-b/data.img");
    let unit_before = std::fs::read(&copy_unit).expect("unit");

    // Refused: exit 2, the pair named, nothing changed.
    let out = run(&["promote", "--config", &cfg, "--system", "site-b"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "promote: {err}");
    assert!(
        err.contains("initial sync not finished") && err.contains("data (site-b)"),
        "{err}"
    );
    assert!(err.contains("--force"), "the way out is named: {err}");
    assert!(out.stdout.is_empty(), "no report for a refusal");
    assert_eq!(
        std::fs::read(&copy_unit).expect("unit"),
        unit_before,
        "a refused promote changed the unit"
    );

    // Forced: exit 0, a loud warning, the report says so.
    let out = run(&["promote", "--config", &cfg, "--system", "site-b", "--force"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "promote --force: {err}");
    assert!(
        err.contains("WARNING")
            && err.contains("pair data (site-b)")
            && err.contains("NOT a consistent cut"),
        "{err}"
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(report["forced"], true, "{report}");
    assert_eq!(report["consistent"], false, "{report}");
    assert_eq!(report["gap"], false, "{report}");
    let data = pairs_of(&report)
        .into_iter()
        .find(|p| p["name"] == "data")
        .expect("data");
    assert_eq!(data["state"], "inconsistent", "{report}");

    // Export of the forced result: refused, then served with --force.
    let out = run(&[
        "export",
        "--config",
        &cfg,
        "--system",
        "site-b",
        "--listen",
        "127.0.0.1:0",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "export: {err}");
    assert!(
        err.contains("export") && err.contains("data (site-b)"),
        "{err}"
    );
    let mut export = site.spawn(&[
        "export",
        "--config",
        &cfg,
        "--system",
        "site-b",
        "--listen",
        "127.0.0.1:0",
        "--force",
    ]);
    let mut line = String::new();
    BufReader::new(export.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("read");
    let served: serde_json::Value = serde_json::from_str(line.trim())
        .unwrap_or_else(|e| panic!("export --force printed no report ({e}): {line:?}"));
    let out = stop(export);
    assert!(out.status.success(), "export stops on SIGTERM: {out:?}");
    assert_eq!(served["forced"], true, "{served}");
    let data = served["exports"]
        .as_array()
        .expect("exports")
        .iter()
        .find(|e| e["name"] == "data")
        .cloned()
        .expect("data");
    assert_eq!(data["state"], "inconsistent", "{served}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("WARNING") && err.contains("pair data"),
        "{err}"
    );

    // The primary restarts: its journal says syncing, so the copy starts over.
    let restarted = SystemTime::now();
    daemons.primary = Some(site.primary());
    let status = wait_synced(&site, restarted);
    for p in pairs(&status) {
        let total = p["sync"]["total_bytes"].as_u64().unwrap_or(0);
        assert!(
            total >= 2 << 20,
            "the copy started over, from the start: {p}"
        );
    }
    daemons.stop_both(&site);
    for (e, (name, _)) in EXPORTS.iter().enumerate() {
        let local = std::fs::read(site.path(&format!("run/site-a/{name}.img"))).expect("local");
        let remote = std::fs::read(site.path(&format!("run/site-b/{name}.img"))).expect("remote");
        assert!(
            first_difference(&local, &prefilled[e]).is_none(),
            "seed {seed}: {name}: the copy changed the local unit"
        );
        if let Some(at) = first_difference(&local, &remote) {
            panic!("seed {seed}: {name}: the remote unit differs from the local at byte {at}");
        }
    }
}

fn pairs_of(report: &serde_json::Value) -> Vec<serde_json::Value> {
    report["pairs"].as_array().cloned().unwrap_or_default()
}

/// A sparse 1 GiB unit holding 10 MiB of data: the copy reads and ships about 10 MiB
/// (what the file system reports allocated), and the remote unit is sparse too.
#[test]
fn a_sparse_unit_is_copied_as_sparse() {
    let seed = seed() + 200;
    eprintln!(
        "initial sync sparse test seed {seed} (TIDEMARK_SEED={} to replay)",
        seed - 200
    );
    const GIB: u64 = 1 << 30;
    const MIB: u64 = 1 << 20;
    let spec = ConfigText::new()
        .system(SystemSpec::primary("site-a", free_port()))
        .system(SystemSpec::secondary("site-b", free_port()))
        .pair(PairSpec::new("big", GIB, "site-a", "site-b"));
    let site = Site::with_config(spec);
    // Ten 1 MiB extents spread over the unit, none on a 1 MiB boundary.
    let extents: Vec<(u64, u64)> = (0..10)
        .map(|i| (i * 100 * MIB + 4096 * (i + 1), MIB))
        .collect();
    let local = site.path("run/site-a/big.img");
    prefill(&local, GIB, &extents, seed);
    let local_blocks = std::fs::metadata(&local).expect("stat").blocks() * 512;
    if local_blocks > 64 * MIB {
        eprintln!(
            "SKIPPED: the file system under {} does not keep files sparse",
            local.display()
        );
        return;
    }
    let started = SystemTime::now();
    let daemons = start_daemons(&site);
    let status = wait_synced(&site, started);
    let sync = &pairs(&status)[0]["sync"];
    let (total, copied) = (
        sync["total_bytes"].as_u64().expect("total"),
        sync["copied_bytes"].as_u64().expect("copied"),
    );
    eprintln!(
        "copied {copied} of {total} bytes; the local file has {local_blocks} bytes allocated"
    );
    assert!(
        (10 * MIB..=12 * MIB).contains(&total) && copied == total,
        "the copy read about the 10 MiB of data: {sync}"
    );
    daemons.stop_both(&site);
    let remote = site.path("run/site-b/big.img");
    if let Some(at) = files_differ(&local, &remote) {
        panic!("seed {seed}: the remote unit differs from the local at byte {at}");
    }
    let remote_blocks = std::fs::metadata(&remote).expect("stat").blocks() * 512;
    assert!(
        remote_blocks <= 16 * MIB,
        "the remote unit has {remote_blocks} bytes allocated for 10 MiB of data"
    );
}
