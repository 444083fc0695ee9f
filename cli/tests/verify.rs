//! `tidemark verify [--repair]` against real daemons while fio writes over NBD: bytes
//! flipped in the secondary's unit files behind its back are found (exactly those
//! regions, in the pairs they are in), `--repair` resyncs them, a second verify is
//! clean, and a verify against a stopped secondary gives up with exit 3 instead of
//! hanging.

mod common;

use common::*;
use rand::{Rng, SeedableRng};
use std::os::unix::fs::FileExt;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Bounds against a hung test; never a measurement.
const PATIENCE: Duration = Duration::from_secs(120);
const MIB: u64 = 1 << 20;
/// fio writes the data pair's first this many bytes; the flipped regions lie above.
const FIO_BYTES: u64 = 6 * MIB;

/// `tidemark verify --config CFG --json ARGS...`, bounded by [`PATIENCE`]: its exit
/// code, its report and its stderr.
fn verify(site: &Site, args: &[&str]) -> (Option<i32>, serde_json::Value, String) {
    let mut all = vec!["verify", "--config", site.cfg(), "--json"];
    all.extend_from_slice(args);
    let child = site.spawn(&all);
    let out = wait_bounded(child, PATIENCE, &format!("verify {args:?}"), site);
    let report = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
    (
        out.status.code(),
        report,
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

/// Waits for `child` at most `limit`; a child still running then is killed and the
/// test fails (a hang is the failure).
fn wait_bounded(mut child: Child, limit: Duration, what: &str, site: &Site) -> Output {
    let deadline = Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => return child.wait_with_output().expect("output"),
            Ok(None) if Instant::now() > deadline => {
                kill9(child);
                panic!(
                    "{what} did not finish in {limit:?}; logs:{}",
                    site.log_tails()
                );
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => panic!("{what}: {e}"),
        }
    }
}

/// The report of pair `name`.
fn pair<'a>(report: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    report["pairs"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["name"] == name))
        .unwrap_or_else(|| panic!("no pair {name} in {report}"))
}

/// Byte ranges `[offset, len]` in a report's list.
fn ranges(v: &serde_json::Value) -> Vec<(u64, u64)> {
    v.as_array()
        .map(|a| {
            a.iter()
                .map(|r| {
                    (
                        r["offset"].as_u64().unwrap_or(u64::MAX),
                        r["len"].as_u64().unwrap_or(0),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// fio's NBD engine writing random 4 KiB blocks (1000 a second, 8 in flight) to the first
/// [`FIO_BYTES`] of export `name` for up to `runtime_s` seconds (killed earlier by the
/// test).
fn fio(port: u16, name: &str, seed: u64, runtime_s: u64) -> Child {
    Command::new("fio")
        .args([
            "--name=verify-load",
            // One process: fio otherwise forks the job, and killing the parent left the
            // job writing at 1,000 writes a second for its whole runtime, so "the primary
            // drained" (written == acked) was seen only by luck, after 8-68 s, or not in
            // 120 s.
            "--thread",
            "--ioengine=nbd",
            &format!("--uri=nbd://127.0.0.1:{port}/{name}"),
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=8",
            // Bounded, so that the backlog the primary drains afterwards stays small.
            "--rate_iops=1000",
            "--offset=0",
            &format!("--size={FIO_BYTES}"),
            "--time_based",
            &format!("--runtime={runtime_s}"),
            &format!("--randseed={seed}"),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run fio")
}

/// The primary's status figure `key` of pair index `p`.
fn figure(site: &Site, p: usize, key: &str) -> u64 {
    site.status("site-a")
        .and_then(|s| s["stats"]["pairs"][p][key].as_u64())
        .unwrap_or(0)
}

#[test]
fn verify_finds_the_flipped_regions_while_fio_writes_repair_fixes_them() {
    if !have(&["fio"]) {
        return;
    }
    let seed = seed_or(1313);
    eprintln!("seed {seed} (TIDEMARK_SEED replays it)");
    let mut rng = rand_pcg::Pcg64::seed_from_u64(seed);
    let nbd = free_tcp_port();
    let (a, b) = (free_port(), free_port());
    let spec = ConfigText::new()
        .system(SystemSpec::primary("site-a", a).nbd(nbd))
        .system(SystemSpec::secondary("site-b", b))
        .pair(PairSpec::new("log", 4 * MIB, "site-a", "site-b"))
        .pair(PairSpec::new("data", 16 * MIB, "site-a", "site-b"));
    let site = Site::with_config(spec);
    let mut daemons = Daemons {
        secondary: Some(site.secondary()),
        primary: None,
    };
    let mut primary = site.primary();
    wait_tcp(nbd, &mut primary, PATIENCE);
    daemons.primary = Some(primary);

    // Where to flip: two regions of data above fio's range, one of log; a few bytes at
    // a seeded place in each.
    let mut data_regions: Vec<u64> = (FIO_BYTES / MIB..16).collect();
    let mut flips: Vec<(&str, u64)> = Vec::new();
    for _ in 0..2 {
        let i = rng.random_range(0..data_regions.len());
        flips.push(("data", data_regions.remove(i)));
    }
    flips.push(("log", rng.random_range(0..4)));
    flips.sort();

    let mut load = fio(nbd, "data", seed, 300);
    let guard = FioGuard(Some(load.id()));
    // fio is writing: the data pair's written sequence number moves.
    let first = wait_until(PATIENCE, || match figure(&site, 1, "written_seq") {
        n if n > 0 => Ok(n),
        n => Err(format!("written_seq {n}")),
    })
    .unwrap_or_else(|e| panic!("fio did not write: {e}; logs:{}", site.log_tails()));
    wait_until(PATIENCE, || match figure(&site, 1, "written_seq") {
        n if n > first + 200 => Ok(()),
        n => Err(format!("written_seq {n} (first {first})")),
    })
    .unwrap_or_else(|e| panic!("fio did not keep writing: {e}"));

    // Behind the secondary's back: flip bytes in its unit files (the daemon keeps
    // them open; its reads see the page cache this write goes to).
    for &(name, region) in &flips {
        let path = site.path(&format!("run/site-b/{name}.img"));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .expect("open the remote unit");
        let at = region * MIB + rng.random_range(0..MIB - 16);
        let len = rng.random_range(1..=16usize);
        let mut buf = vec![0u8; len];
        f.read_exact_at(&mut buf, at).expect("read");
        for x in &mut buf {
            *x ^= 0xff;
        }
        f.write_all_at(&buf, at).expect("flip");
        eprintln!("flipped {len} bytes of {name} at {at:#x} (region {region})");
    }
    // The ranges verify reports: the flipped regions, neighbours merged.
    let want = |name: &str| -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for &(_, r) in flips.iter().filter(|(n, _)| *n == name) {
            match out.last_mut() {
                Some(last) if last.0 + last.1 == r * MIB => last.1 += MIB,
                _ => out.push((r * MIB, MIB)),
            }
        }
        out
    };

    // 1. verify while fio writes: exactly the flipped regions differ, nothing is left
    // busy (fio's regions are compared at one point of the stream on both sides), exit 1.
    let (code, report, err) = verify(&site, &["--timeout-s", "20"]);
    assert_eq!(code, Some(1), "{report}\n{err}\nlogs:{}", site.log_tails());
    assert_eq!(report["result"], "differ", "{report}");
    for name in ["log", "data"] {
        let p = pair(&report, name);
        assert_eq!(ranges(&p["mismatches"]), want(name), "{name}: {report}");
        assert_eq!(ranges(&p["busy"]), vec![], "{name}: {report}");
        assert!(p["error"].is_null(), "{report}");
    }
    let data = pair(&report, "data");
    eprintln!(
        "observed: verify of data (16 MiB, 1 MiB regions) while fio writes: {:.1} MB/s \
         ({} ms), {} regions compared at the same seq on both sides, {} re-check rounds",
        data["rate_bytes_per_s"].as_f64().unwrap_or(0.0) / 1e6,
        data["elapsed_ms"],
        data["exact_regions"],
        data["rounds"]
    );
    assert!(
        figure(&site, 1, "written_seq") > first + 200,
        "fio kept writing"
    );

    // 2. verify --repair while fio writes: the same regions are found, resynced, and
    // match when checked again; exit 0.
    let t = Instant::now();
    let (code, report, err) = verify(&site, &["--repair", "--timeout-s", "20"]);
    eprintln!("verify --repair took {:?}", t.elapsed());
    assert_eq!(code, Some(0), "{report}\n{err}\nlogs:{}", site.log_tails());
    assert_eq!(report["result"], "repaired", "{report}");
    for name in ["log", "data"] {
        let p = pair(&report, name);
        assert_eq!(ranges(&p["mismatches"]), want(name), "{name}: {report}");
        let repaired = ranges(&p["repaired"]);
        if want(name).is_empty() {
            assert!(p["repaired"].is_null(), "{report}");
        } else {
            assert_eq!(repaired, want(name), "{name}: {report}");
            assert_eq!(ranges(&p["after_repair"]["mismatches"]), vec![], "{report}");
            assert_eq!(ranges(&p["after_repair"]["busy"]), vec![], "{report}");
        }
    }
    // The repaired regions hold the local unit's bytes again (fio never writes there:
    // zeros on both sides).
    for &(name, region) in &flips {
        let mut remote = vec![0u8; MIB as usize];
        let mut local = vec![0u8; MIB as usize];
        std::fs::File::open(site.path(&format!("run/site-b/{name}.img")))
            .and_then(|f| f.read_exact_at(&mut remote, region * MIB))
            .expect("read remote");
        std::fs::File::open(site.path(&format!("run/site-a/{name}.img")))
            .and_then(|f| f.read_exact_at(&mut local, region * MIB))
            .expect("read local");
        assert!(remote == local, "{name} region {region} not repaired");
    }

    // 3. A second verify, fio still writing: clean, exit 0.
    let (code, report, err) = verify(&site, &["--timeout-s", "20"]);
    assert_eq!(code, Some(0), "{report}\n{err}\nlogs:{}", site.log_tails());
    assert_eq!(report["result"], "match", "{report}");

    // fio stops; the primary drains (nothing unacknowledged: no tracking when the
    // secondary goes).
    drop(guard);
    let _ = load.kill();
    let _ = load.wait();
    let t = Instant::now();
    wait_until(PATIENCE, || {
        let (w, k) = (
            figure(&site, 1, "written_seq"),
            figure(&site, 1, "acked_seq"),
        );
        if w == k && w > 0 {
            Ok(())
        } else {
            Err(format!("written {w}, acked {k}"))
        }
    })
    .unwrap_or_else(|e| panic!("the primary did not drain: {e}"));
    eprintln!(
        "drained in {:?} (primary retransmits {}, secondary flow_dropped {}, applied {})",
        t.elapsed(),
        figure(&site, 1, "retransmits"),
        site.status("site-b")
            .and_then(|s| s["stats"]["pairs"][1]["flow_dropped"].as_u64())
            .unwrap_or(0),
        site.status("site-b")
            .and_then(|s| s["stats"]["pairs"][1]["applied_seq"].as_u64())
            .unwrap_or(0),
    );

    // 4. The secondary stops: verify gives up after its timeout, exit 3, never hangs.
    let out = stop(daemons.secondary.take().expect("running"));
    assert!(out.status.success(), "secondary stop: {out:?}");
    let started = Instant::now();
    let (code, report, err) = verify(
        &site,
        &["--pair", "data", "--timeout-s", "2", "--busy-wait-s", "1"],
    );
    assert_eq!(code, Some(3), "{report}\n{err}");
    assert_eq!(report["result"], "incomplete", "{report}");
    let e = pair(&report, "data")["error"]
        .as_str()
        .unwrap_or("")
        .to_string();
    assert!(e.contains("did not answer"), "{report}");
    assert!(err.contains("did not answer"), "{err}");
    eprintln!(
        "verify against a stopped secondary gave up after {:?}",
        started.elapsed()
    );

    let out = stop(daemons.primary.take().expect("running"));
    assert!(out.status.success(), "primary stop: {out:?}");
}

/// Kills fio (by its pid) if the test ends early.
struct FioGuard(Option<u32>);

impl Drop for FioGuard {
    fn drop(&mut self) {
        if let Some(pid) = self.0.take() {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
    }
}
