//! Failover, failback and the split-brain guard with real daemons on loopback.
//!
//! - a disaster: the old primary (site-a) dies with writes the secondary never got; the
//!   secondary (site-b) is promoted and fails over (`tidemark failover`), runs as the
//!   primary of the reversed group and takes writes over NBD; the old primary is
//!   demoted, its regions merged (`tidemark failback`), and it receives only the
//!   regions that differ: far less than its units, at least what was written since;
//!   at the end remote == local;
//! - a planned switchover after writes: nothing is lost, and no region is resent;
//! - split brain: an old primary that was never demoted runs against the failed-over
//!   group: its datagrams are refused (the generation's key), both daemons say so in
//!   their status, and nothing it writes reaches the other side.
//!
//! Waits poll status files with a deadline; the seed is printed (`TIDEMARK_SEED`).

mod common;
use common::dependent::*;
use common::outage::*;
use common::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::SystemTime;

const CMD_WRITE: u16 = 1;
const CMD_FLUSH: u16 = 3;

fn seed() -> u64 {
    seed_or(20261220)
}

/// The two-pair site (`log` 4 MiB, `data` 8 MiB) with an NBD port on each system (the
/// secondary's serves once it is the primary); tracking after 300 ms of silence.
fn site() -> (Site, u16, u16) {
    let (a, b, na, nb) = (free_port(), free_port(), free_tcp_port(), free_tcp_port());
    let spec = ConfigText::new()
        .system(SystemSpec::primary("site-a", a).nbd(na))
        .system(SystemSpec::secondary("site-b", b).nbd(nb))
        .pair(PairSpec::new("log", 4 << 20, "site-a", "site-b"))
        .pair(PairSpec::new("data", 8 << 20, "site-a", "site-b"))
        .tracking_after_ms(300);
    (Site::with_config(spec), na, nb)
}

/// A daemon (`primary`/`secondary`) with config `config`, logging under `logs/`.
fn daemon(site: &Site, role: &str, config: &Path) -> Child {
    let logs = site.path("logs");
    std::fs::create_dir_all(&logs).expect("logs dir");
    let n = std::fs::read_dir(&logs).map(|d| d.count()).unwrap_or(0);
    let file = std::fs::File::create(logs.join(format!("{n:02}-{role}.log"))).expect("log");
    let err = file.try_clone().expect("log");
    Command::new(bin())
        .args([role, "--config", config.to_str().expect("utf-8")])
        .stdout(Stdio::from(file))
        .stderr(Stdio::from(err))
        .spawn()
        .expect("spawn tidemark")
}

/// Runs `tidemark ARGS`, asserts success, returns its JSON report.
fn ok_json(args: &[&str]) -> serde_json::Value {
    let out = run(args);
    assert!(
        out.status.success(),
        "tidemark {args:?}: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON report")
}

/// Seeded writes: `(export index, offset, len)`, 4 KiB aligned, 4-64 KiB long.
fn writes(seed: u64, n: usize) -> Vec<(usize, u64, u32)> {
    (0..n)
        .map(|i| {
            let r = splitmix(seed ^ (i as u64).wrapping_mul(0x9e37));
            let e = (r & 1) as usize;
            let len = 4096 * (1 + (r >> 8) % 16) as u32;
            let size = EXPORTS[e].1;
            let offset = ((r >> 16) % ((size - u64::from(len)) / 4096)) * 4096;
            (e, offset, len)
        })
        .collect()
}

/// Writes `ws` (payload bytes from `seed` and the index) through NBD on `port`, each
/// after the previous reply, then flushes; returns the images they leave on top of
/// `images`.
fn write_nbd(port: u16, seed: u64, ws: &[(usize, u64, u32)], images: &mut [Vec<u8>]) {
    let mut clients: Vec<Client> = EXPORTS
        .iter()
        .map(|(n, _)| Client::connect(port, n))
        .collect();
    for (i, &(e, off, len)) in ws.iter().enumerate() {
        let data: Vec<u8> = (0..len as u64)
            .map(|k| (splitmix(seed.wrapping_add(i as u64) ^ (k / 8)) >> (k % 8 * 8)) as u8)
            .collect();
        clients[e].request(0, CMD_WRITE, off, len, &data);
        clients[e].reply(&format!("write {i}"));
        images[e][off as usize..off as usize + len as usize].copy_from_slice(&data);
    }
    for c in &mut clients {
        c.request(0, CMD_FLUSH, 0, 0, &[]);
        c.reply("flush");
    }
    for c in clients {
        c.disconnect();
    }
}

fn unit(site: &Site, system: &str, name: &str) -> PathBuf {
    site.path(&format!("run/{system}/{name}.img"))
}

fn blank() -> Vec<Vec<u8>> {
    EXPORTS.iter().map(|(_, s)| vec![0; *s as usize]).collect()
}

/// Waits until `primary` (journal of that system) replicates every pair with nothing
/// dirty and everything acknowledged, then until `secondary` applied all of it and is
/// consistent. Returns the primary's last status.
fn converge(site: &Site, primary: &str, secondary: &str) -> serde_json::Value {
    let since = SystemTime::now();
    let dir = site.path(&format!("run/{primary}/journal"));
    let status = wait_until(PATIENCE, || {
        let s = status_since(&dir, since).ok_or("no status since then")?;
        let done = pairs(&s).iter().all(|p| {
            p["primary_state"] == "replicating"
                && p["dirty_bytes"] == 0
                && (p["sync"].is_null() || p["sync"]["finished"] == true)
                && p["acked_seq"] == p["written_seq"]
        });
        if done {
            Ok(s)
        } else {
            Err(s["stats"]["pairs"].to_string())
        }
    })
    .unwrap_or_else(|e| {
        panic!(
            "{primary} never replicated everything: {e}; logs:{}",
            site.log_tails()
        )
    });
    let want = pairs(&status)
        .iter()
        .enumerate()
        .map(|(i, p)| {
            (
                tidemark::PairId(i as u32),
                p["written_seq"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    site.wait_applied(secondary, &want, PATIENCE);
    wait_until(PATIENCE, || {
        let s = site.status(secondary).ok_or("no status")?;
        if pairs(&s)
            .iter()
            .all(|p| p["secondary_state"] == "consistent")
        {
            Ok(())
        } else {
            Err(s["stats"]["pairs"].to_string())
        }
    })
    .unwrap_or_else(|e| {
        panic!(
            "{secondary} never consistent: {e}; logs:{}",
            site.log_tails()
        )
    });
    status
}

fn assert_images(site: &Site, system: &str, images: &[Vec<u8>], seed: u64, when: &str) {
    for (e, (name, _)) in EXPORTS.iter().enumerate() {
        let got = std::fs::read(unit(site, system, name)).expect("unit");
        if let Some(at) = first_difference(&got, &images[e]) {
            panic!("seed {seed}: {system}/{name} {when}: differs from the writes at byte {at}");
        }
    }
}

/// Disaster, failover, writes on the new primary, failback of the old one: only the
/// regions that differ are resent, and the units end identical.
#[test]
fn failover_then_failback_resends_only_what_differs() {
    let seed = seed();
    eprintln!("failover test seed {seed} (TIDEMARK_SEED={seed} to replay)");
    let (site, na, nb) = site();
    let cfg = site.cfg().to_string();
    let b = daemon(&site, "secondary", &site.config);
    let mut a = daemon(&site, "primary", &site.config);
    wait_tcp(na, &mut a, PATIENCE);

    // Phase 1 replicates.
    let mut images = blank();
    write_nbd(na, seed, &writes(seed, 40), &mut images);
    converge(&site, "site-a", "site-b");

    // Phase 2 never reaches site-b: it is stopped, then site-a dies.
    let b_pid = b.id();
    signal("-STOP", b_pid);
    let lost = writes(seed + 1, 12);
    let mut a_images = images.clone();
    write_nbd(na, seed + 1, &lost, &mut a_images);
    kill9(a);
    signal("-CONT", b_pid);
    let out = stop(b);
    assert!(out.status.success(), "secondary stop: {out:?}");

    // Promote and fail over site-b.
    let promoted = ok_json(&["promote", "--config", &cfg, "--system", "site-b"]);
    assert_eq!(promoted["consistent"], true, "{promoted}");
    let new_cfg = site.path("reversed.toml");
    let fo = ok_json(&[
        "failover",
        "--config",
        &cfg,
        "--system",
        "site-b",
        "--out",
        new_cfg.to_str().expect("utf-8"),
    ]);
    assert_eq!(fo["generation"], 1, "{fo}");
    let new = new_cfg.to_str().expect("utf-8").to_string();
    // The promoted cut: site-b's units hold phase 1 (and maybe some of phase 2: what
    // reached its journal below the limit); never anything else.
    let cut: Vec<Vec<u8>> = EXPORTS
        .iter()
        .map(|(n, _)| std::fs::read(unit(&site, "site-b", n)).expect("unit"))
        .collect();

    // site-b runs as the primary of the reversed group and takes writes at once.
    let mut b = daemon(&site, "primary", &new_cfg);
    wait_tcp(nb, &mut b, PATIENCE);
    let fresh = writes(seed + 2, 30);
    let mut b_images = cut.clone();
    write_nbd(nb, seed + 2, &fresh, &mut b_images);
    let s = wait_until(PATIENCE, || {
        let s = site.status("site-b").ok_or("no status")?;
        if pairs(&s)
            .iter()
            .any(|p| p["dirty_bytes"].as_u64().unwrap_or(0) > 0)
        {
            Ok(s)
        } else {
            Err(s.to_string())
        }
    })
    .unwrap_or_else(|e| panic!("the new primary records no dirty region: {e}"));
    assert_eq!(s["generation"]["generation"], 1, "{s}");
    assert_eq!(s["generation"]["failback_pending"], true, "{s}");
    let out = stop(b);
    assert!(out.status.success(), "new primary stop: {out:?}");
    assert_images(
        &site,
        "site-b",
        &b_images,
        seed,
        "after the writes on the new primary",
    );

    // The old primary returns as the secondary: demote, merge, start both.
    let regions = site.path("regions.json");
    let demoted = ok_json(&[
        "demote",
        "--config",
        &new,
        "--system",
        "site-a",
        "--generation",
        "1",
        "--regions-out",
        regions.to_str().expect("utf-8"),
    ]);
    let fb = ok_json(&[
        "failback",
        "--config",
        &new,
        "--system",
        "site-b",
        "--regions",
        regions.to_str().expect("utf-8"),
    ]);
    eprintln!("failover: {fo}\ndemote: {demoted}\nfailback: {fb}");
    let a = daemon(&site, "secondary", &new_cfg);
    let mut b = daemon(&site, "primary", &new_cfg);
    wait_tcp(nb, &mut b, PATIENCE);
    let status = converge(&site, "site-b", "site-a");
    let sent = status["link"]["counters"]["bytes_out"]
        .as_u64()
        .expect("bytes_out");
    let out = stop(b);
    assert!(out.status.success(), "primary stop: {out:?}");
    let out = stop(a);
    assert!(out.status.success(), "secondary stop: {out:?}");

    // remote == local, and both hold the new primary's history.
    assert_units_equal_between(&site, seed);
    assert_images(&site, "site-a", &b_images, seed, "after the failback");

    // Only what differs was resent: at least the bytes written on the new primary,
    // far below the units' size.
    let units: u64 = EXPORTS.iter().map(|(_, s)| s).sum();
    let written: u64 = fresh.iter().map(|w| u64::from(w.2)).sum();
    let resync: u64 = fb["pairs"]
        .as_array()
        .expect("pairs")
        .iter()
        .map(|p| p["resync_bytes"].as_u64().unwrap_or(0))
        .sum();
    eprintln!(
        "failback: resync {resync} bytes (regions), link bytes out {sent}, units {units}, written on the new primary {written}"
    );
    assert!(resync >= written, "resync {resync} < written {written}");
    assert!(sent >= written, "sent {sent} < written {written}");
    assert!(
        resync < units / 2,
        "resync {resync} of {units}: a full copy"
    );
    assert!(sent < units / 2, "sent {sent} of {units}: a full copy");
    // The old primary's own lost writes were among the resent regions.
    let demoted_bytes: u64 = demoted["pairs"]
        .as_array()
        .expect("pairs")
        .iter()
        .map(|p| p["bytes"].as_u64().unwrap_or(0))
        .sum();
    assert!(
        demoted_bytes > 0,
        "the old primary's lost writes: {demoted}"
    );
}

fn assert_units_equal_between(site: &Site, seed: u64) {
    for (name, _) in EXPORTS {
        if let Err(e) = compare_units(&unit(site, "site-a", name), &unit(site, "site-b", name)) {
            panic!("seed {seed}: {name}: remote != local: {e}");
        }
    }
}

/// The byte counts of the pairs of a report (`bytes` of each).
fn report_bytes(report: &serde_json::Value) -> u64 {
    report["pairs"]
        .as_array()
        .expect("pairs")
        .iter()
        .map(|p| p["bytes"].as_u64().unwrap_or(0))
        .sum()
}

/// A planned switchover: writes, stop writing, drain, stop both, promote, failover and
/// demote with `--require-drained` (nothing above the cut, nothing to resend), then the
/// reversed group replicates the new primary's writes. No write is lost: both sides
/// hold every write of both phases, and the promoted cut was all of the first.
#[test]
fn a_planned_switchover_loses_nothing() {
    let seed = seed() + 100;
    eprintln!(
        "switchover test seed {seed} (TIDEMARK_SEED={} to replay)",
        seed - 100
    );
    let (site, na, nb) = site();
    let cfg = site.cfg().to_string();
    let b = daemon(&site, "secondary", &site.config);
    let mut a = daemon(&site, "primary", &site.config);
    wait_tcp(na, &mut a, PATIENCE);
    let mut images = blank();
    write_nbd(na, seed, &writes(seed, 60), &mut images);
    // Writes stopped: drain (every write acknowledged and applied), then stop both.
    converge(&site, "site-a", "site-b");
    assert!(stop(a).status.success());
    assert!(stop(b).status.success());

    let promoted = ok_json(&["promote", "--config", &cfg, "--system", "site-b"]);
    assert_eq!(promoted["consistent"], true, "{promoted}");
    assert!(promoted["rolled_back_to"].is_null(), "{promoted}");
    assert_images(&site, "site-b", &images, seed, "at the promoted cut");
    let new_cfg = site.path("reversed.toml");
    let new = new_cfg.to_str().expect("utf-8").to_string();
    let fo = ok_json(&[
        "failover",
        "--config",
        &cfg,
        "--system",
        "site-b",
        "--out",
        &new,
        "--require-drained",
    ]);
    let regions = site.path("regions.json");
    let regions = regions.to_str().expect("utf-8");
    let generation = fo["generation"].to_string();
    let demoted = ok_json(&[
        "demote",
        "--config",
        &new,
        "--system",
        "site-a",
        "--generation",
        &generation,
        "--regions-out",
        regions,
        "--require-drained",
    ]);
    assert_eq!(report_bytes(&fo), 0, "{fo}");
    assert_eq!(report_bytes(&demoted), 0, "{demoted}");
    let fb = ok_json(&[
        "failback",
        "--config",
        &new,
        "--system",
        "site-b",
        "--regions",
        regions,
    ]);
    assert!(
        fb["pairs"]
            .as_array()
            .expect("pairs")
            .iter()
            .all(|p| p["resync_bytes"] == 0),
        "nothing differs after a drained switchover: {fb}"
    );

    let a = daemon(&site, "secondary", &new_cfg);
    let mut b = daemon(&site, "primary", &new_cfg);
    wait_tcp(nb, &mut b, PATIENCE);
    write_nbd(nb, seed + 1, &writes(seed + 1, 60), &mut images);
    converge(&site, "site-b", "site-a");
    assert!(stop(b).status.success());
    assert!(stop(a).status.success());
    assert_images(&site, "site-b", &images, seed, "on the new primary");
    assert_images(&site, "site-a", &images, seed, "on the new secondary");
}

/// Split brain: after a failover (generation 1), the old primary is started with the
/// old config without a demote, as a second primary. Neither side opens the other's
/// datagrams; both say so in their status (`generation.error`), the old primary's writes
/// stay unacknowledged and never reach the new primary's units. And the failed-over
/// system refuses to start in its old role (exit 2).
#[test]
fn a_stale_primary_is_refused() {
    let seed = seed() + 200;
    eprintln!(
        "split brain test seed {seed} (TIDEMARK_SEED={} to replay)",
        seed - 200
    );
    let (site, na, nb) = site();
    let cfg = site.cfg().to_string();
    let b = daemon(&site, "secondary", &site.config);
    let mut a = daemon(&site, "primary", &site.config);
    wait_tcp(na, &mut a, PATIENCE);
    let mut images = blank();
    write_nbd(na, seed, &writes(seed, 20), &mut images);
    converge(&site, "site-a", "site-b");
    assert!(stop(a).status.success());
    assert!(stop(b).status.success());
    ok_json(&["promote", "--config", &cfg, "--system", "site-b"]);
    let new_cfg = site.path("reversed.toml");
    let new = new_cfg.to_str().expect("utf-8").to_string();
    ok_json(&[
        "failover", "--config", &cfg, "--system", "site-b", "--out", &new,
    ]);
    // Failback with nothing to merge: site-b is at generation 1, not pending.
    let regions = site.path("regions.json");
    std::fs::write(&regions, r#"{"generation":1,"system":"site-a","pairs":[]}"#).expect("write");
    ok_json(&[
        "failback",
        "--config",
        &new,
        "--system",
        "site-b",
        "--regions",
        regions.to_str().expect("utf-8"),
    ]);

    // site-b in its old role: refused before anything starts.
    let out = run(&["secondary", "--config", &cfg, "--system", "site-b"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("generation 1") && err.contains("reversed config"),
        "{err}"
    );

    // Two primaries: site-b (generation 1) and the stale site-a (generation 0).
    let mut b = daemon(&site, "primary", &new_cfg);
    wait_tcp(nb, &mut b, PATIENCE);
    let before: Vec<Vec<u8>> = EXPORTS
        .iter()
        .map(|(n, _)| std::fs::read(unit(&site, "site-b", n)).expect("unit"))
        .collect();
    let mut a = daemon(&site, "primary", &site.config);
    wait_tcp(na, &mut a, PATIENCE);
    let mut stale = images.clone();
    write_nbd(na, seed + 1, &writes(seed + 1, 10), &mut stale);
    for system in ["site-a", "site-b"] {
        let s = wait_until(PATIENCE, || {
            let s = site.status(system).ok_or("no status")?;
            match s["generation"]["error"].as_str() {
                Some(e) if e.contains("split brain guard") => Ok(s),
                _ => Err(s["generation"].to_string()),
            }
        })
        .unwrap_or_else(|e| {
            panic!(
                "{system} never reported the split brain: {e}; logs:{}",
                site.log_tails()
            )
        });
        assert!(
            s["link"]["counters"]["dropped_unauthenticated"]
                .as_u64()
                .unwrap_or(0)
                > 0,
            "{s}"
        );
        assert!(
            s["link"]["peers_up"]
                .as_object()
                .expect("peers")
                .values()
                .all(|u| u == false),
            "{s}"
        );
    }
    // A status that counts the stale writes (20 before, 10 now) says none was
    // acknowledged.
    let s = wait_until(PATIENCE, || {
        let s = site.status("site-a").ok_or("no status")?;
        let written: u64 = pairs(&s)
            .iter()
            .map(|p| p["written_seq"].as_u64().unwrap_or(0))
            .sum();
        if written >= 30 {
            Ok(s)
        } else {
            Err(s["stats"]["pairs"].to_string())
        }
    })
    .unwrap_or_else(|e| panic!("the stale writes never showed in the status: {e}"));
    assert!(
        pairs(&s)
            .iter()
            .any(|p| p["acked_seq"].as_u64() < p["written_seq"].as_u64()),
        "the stale primary's writes were acknowledged: {s}"
    );
    assert!(stop(a).status.success());
    assert!(stop(b).status.success());
    for (e, (n, _)) in EXPORTS.iter().enumerate() {
        let got = std::fs::read(unit(&site, "site-b", n)).expect("unit");
        assert!(
            got == before[e],
            "seed {seed}: the stale primary's writes reached site-b/{n}"
        );
    }
}
