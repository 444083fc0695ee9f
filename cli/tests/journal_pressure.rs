//! Issue 9 with real processes: a primary whose journal (8 MiB) is far smaller than the
//! default window (64 MiB), fio writing at queue depth 16 for 20 s through the primary's
//! NBD export: 64 KiB sequential writes directly, and 4 KiB random writes through relays
//! that delay every datagram by 1 ms (so acknowledgements lag; the second
//! reproduction). fio must finish without an error, the secondary must apply
//! every write, both daemons must stop on SIGTERM, and the remote units must equal the
//! local ones byte for byte.
//!
//! Also: SIGTERM to a primary whose writers wait on an unreachable secondary answers them
//! and exits (bounded shutdown).
//!
//! Before the fix the primary's journal filled, the release watermark that would have
//! freed it could only ride in a batch of new packets, which the full journal refused:
//! fio hung with about the queue depth of writes stamped and never journaled.

mod common;
use common::dependent::PATIENCE;
use common::*;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

const RUNTIME_S: u64 = 20;

/// A site whose primary has an 8 MiB journal and serves NBD; `relayed` puts a wan-sim
/// that only delays (1 ms) in each direction. Returns the NBD port and the
/// relays.
fn site(relayed: bool) -> (Site, u16, Vec<Child>) {
    let (mut site, port) = Site::with_nbd_proxied(relayed);
    site.edit_config(|c| c.system_mut("site-a").journal_size = Some(8 << 20));
    let relays = if relayed {
        site.relays(&["--delay-ms", "1"])
    } else {
        Vec::new()
    };
    (site, port, relays)
}

/// Runs fio's `rw` writes of `bs` at QD16 on the `data` export for `RUNTIME_S`; fails
/// (with the daemons' logs) if fio errs or is still running well after its runtime.
fn fio_write(site: &Site, port: u16, rw: &str, bs: &str) {
    let mut fio = Command::new("fio")
        .args([
            "--name=pressure",
            "--ioengine=nbd",
            &format!("--uri=nbd://127.0.0.1:{port}/data"),
            &format!("--rw={rw}"),
            &format!("--bs={bs}"),
            "--iodepth=16",
            "--size=8m",
            "--time_based",
            &format!("--runtime={RUNTIME_S}"),
            "--output-format=json",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run fio");
    let limit = Duration::from_secs(RUNTIME_S) + PATIENCE;
    let started = Instant::now();
    let status = loop {
        if let Some(s) = fio.try_wait().expect("fio") {
            break s;
        }
        if started.elapsed() > limit {
            let _ = fio.kill();
            panic!(
                "fio still running {limit:?} after its start (a hung disk); primary: {}; secondary: {}; logs:{}",
                site.status("site-a").unwrap_or_default(),
                site.status("site-b").unwrap_or_default(),
                site.log_tails()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let out = fio.wait_with_output().expect("fio output");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        status.success(),
        "fio failed ({status}):\n{text}\n{}\nlogs:{}",
        String::from_utf8_lossy(&out.stderr),
        site.log_tails()
    );
    let json = text.find('{').map(|i| &text[i..]).unwrap_or(&text);
    let v: serde_json::Value =
        serde_json::from_str(json).unwrap_or_else(|e| panic!("fio JSON: {e}: {text}"));
    let job = &v["jobs"][0];
    assert_eq!(job["error"].as_i64(), Some(0), "{job}");
    let bytes = job["write"]["io_bytes"].as_u64().unwrap_or(0);
    // More than the journal holds went through it.
    assert!(bytes > 8 << 20, "fio wrote only {bytes} bytes: {job}");
    eprintln!("fio wrote {} MiB in {RUNTIME_S} s", bytes >> 20);
}

/// Processes of a test; those still held are killed when it ends, so a failed assertion
/// leaves none behind.
struct Held(Vec<Child>);

impl Drop for Held {
    fn drop(&mut self) {
        for child in self.0.drain(..) {
            kill9(child);
        }
    }
}

fn run(relayed: bool) {
    if !have(&["fio"]) {
        return;
    }
    let (site, port, relays) = site(relayed);
    let _relays = Held(relays);
    let secondary = site.secondary();
    let mut primary = site.primary();
    wait_tcp(port, &mut primary, PATIENCE);
    let mut daemons = Held(vec![primary, secondary]);
    if relayed {
        fio_write(&site, port, "randwrite", "4k");
    } else {
        fio_write(&site, port, "write", "64k");
    }
    let status = site.status_after("site-a", SystemTime::now(), PATIENCE);
    let written: std::collections::BTreeMap<tidemark::PairId, u64> = (0..2)
        .map(|p| {
            let n = status["stats"]["pairs"][p]["written_seq"]
                .as_u64()
                .unwrap_or(0);
            (tidemark::PairId(p as u32), n)
        })
        .collect();
    site.wait_applied("site-b", &written, PATIENCE);
    let (secondary, primary) = (daemons.0.pop(), daemons.0.pop());
    for (name, child) in [("primary", primary), ("secondary", secondary)] {
        let child = child.expect("held");
        let out = stop(child);
        assert!(
            out.status.success(),
            "the {name} did not stop cleanly ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    for unit in ["log", "data"] {
        assert!(
            same_file(
                &site.path(&format!("run/site-a/{unit}.img")),
                &site.path(&format!("run/site-b/{unit}.img"))
            ),
            "{unit}: remote differs from local"
        );
    }
}

#[test]
fn an_8mib_journal_under_20s_of_fio_seq_writes_never_stalls() {
    run(false);
}

#[test]
fn an_8mib_journal_with_lagging_acknowledgements_never_stalls() {
    run(true);
}

/// The secondary is stopped (SIGSTOP) under fio's writes, so the primary's writers soon
/// wait on a full window (`on_journal_full = "block"`, `suspend_after_ms = 0`: no
/// tracking); SIGTERM to the primary must answer them (fio ends) and the
/// primary must exit, whatever it waits on. Before the fix its shutdown flush queued
/// behind the writers and it never exited.
#[test]
fn sigterm_stops_a_primary_whose_writers_wait_on_an_unreachable_secondary() {
    if !have(&["fio"]) {
        return;
    }
    let (mut site, port, _) = site(false);
    // Writers must wait on the unreachable secondary, as they did before tracking: with
    // the default (`track` after 2 s of silence) they would go on locally instead.
    site.edit_config(|c| {
        c.on_journal_full = Some("block".into());
        c.suspend_after_ms = Some(0);
    });
    let secondary = site.secondary();
    let mut primary = site.primary();
    wait_tcp(port, &mut primary, PATIENCE);
    let sec_pid = secondary.id().to_string();
    let mut held = Held(vec![secondary]);
    let signal = |sig: &str, pid: &str| {
        let ok = Command::new("kill")
            .args([sig, pid])
            .status()
            .map(|s| s.success());
        assert_eq!(ok.ok(), Some(true), "kill {sig} {pid}");
    };
    signal("-STOP", &sec_pid);
    let mut fio = Command::new("fio")
        .args([
            "--name=blocked",
            // The job as a thread of this process, so that killing it stops the job.
            "--thread",
            "--ioengine=nbd",
            &format!("--uri=nbd://127.0.0.1:{port}/data"),
            "--rw=write",
            "--bs=64k",
            "--iodepth=16",
            "--size=8m",
            "--time_based",
            "--runtime=600",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("run fio");
    // Observed, not slept on: the primary has written, and its written count stands
    // still across two of its status reports (its writers wait on the window).
    let mut last = (0u64, SystemTime::now());
    let waiting = wait_until(PATIENCE, || {
        let s = site.status_after("site-a", last.1, PATIENCE);
        let written: u64 = (0..2)
            .map(|p| s["stats"]["pairs"][p]["written_seq"].as_u64().unwrap_or(0))
            .sum();
        let still = written > 0 && written == last.0;
        last = (written, SystemTime::now());
        if still {
            Ok(written)
        } else {
            Err(format!("written {written}"))
        }
    });
    let written = waiting.unwrap_or_else(|e| panic!("the writers never waited: {e}"));
    // "block": the pair waits, it never tracks.
    let status = site.status_after("site-a", SystemTime::now(), PATIENCE);
    for p in status["stats"]["pairs"].as_array().into_iter().flatten() {
        assert!(
            p["primary_state"] != "tracking" && p["dirty_bytes"] == 0,
            "on_journal_full = \"block\" tracked: {p}"
        );
    }
    eprintln!("writers wait with {written} writes stamped; SIGTERM to the primary");
    let pid = primary.id().to_string();
    signal("-TERM", &pid);
    let exited = wait_until(PATIENCE, || match primary.try_wait() {
        Ok(Some(status)) => Ok(status),
        _ => Err("the primary still runs".into()),
    });
    let status = match exited {
        Ok(s) => s,
        Err(e) => {
            let _ = primary.kill();
            let _ = fio.kill();
            signal("-CONT", &sec_pid);
            panic!(
                "SIGTERM did not stop the primary: {e}; logs:{}",
                site.log_tails()
            );
        }
    };
    eprintln!("the primary exited ({status})");
    let fio_done = wait_until(PATIENCE, || match fio.try_wait() {
        Ok(Some(status)) => Ok(status),
        _ => Err("fio still runs".into()),
    });
    let _ = fio.kill();
    signal("-CONT", &sec_pid);
    assert!(
        fio_done.is_ok(),
        "fio's waiting writes were never answered after the primary stopped"
    );
    held.0.drain(..).for_each(kill9);
}
