//! `tidemark switchover` with real daemons on loopback, during NBD traffic.
//!
//! A writer sends dependent writes (each after the previous reply; writes, FUA writes,
//! write-zeroes, trims, flushes) to both exports of the primary, without pause, until
//! the primary refuses one (`ESHUTDOWN`: the switchover quiesced it). While it writes,
//! a copy of the secondary's state (frozen by SIGSTOP for the copy) is promoted and must be a cut of the writes (a
//! global prefix). `tidemark switchover` then quiesces, drains, stops both daemons and
//! swaps the roles. Checked:
//!
//! - no acknowledged write is lost: the new primary's units (the old secondary's, as
//!   promoted) hold exactly the writes the writer saw acknowledged, and so do the old
//!   primary's; the refused write is on neither;
//! - the switchover's report: every step done, nothing to resend (`resync_bytes` 0);
//! - restarted with the reversed config, the new primary replicates to the old one:
//!   new writes arrive, both sides end identical, and nothing is resent: the new
//!   primary ships exactly the bytes of the new writes (`bytes` in its status), runs no
//!   copy (`sync` null) and never has a dirty byte.
//!
//! A refusal (`--out` exists, a system not running) changes nothing and exits 2.
//!
//! Waits poll with deadlines; the seed is printed (`TIDEMARK_SEED` replays).

mod common;
use common::dependent::*;
use common::outage::*;
use common::*;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::SystemTime;
use tidemark::nbd::consts::*;

/// NBD's ESHUTDOWN.
const ESHUTDOWN: u32 = 108;

fn seed() -> u64 {
    seed_or(20261203)
}

/// The two-pair site (`log` 4 MiB, `data` 8 MiB) with an NBD port on each system (the
/// secondary's serves once it is the primary).
fn site() -> (Site, u16, u16) {
    let (a, b, na, nb) = (free_port(), free_port(), free_tcp_port(), free_tcp_port());
    let spec = ConfigText::new()
        .system(SystemSpec::primary("site-a", a).nbd(na))
        .system(SystemSpec::secondary("site-b", b).nbd(nb))
        .pair(PairSpec::new("log", 4 << 20, "site-a", "site-b"))
        .pair(PairSpec::new("data", 8 << 20, "site-a", "site-b"));
    (Site::with_config(spec), na, nb)
}

/// A daemon (`primary`/`secondary`) with config `config`, logging under `logs/`.
fn daemon(site: &Site, role: &str, config: &Path) -> std::process::Child {
    let logs = site.path("logs");
    std::fs::create_dir_all(&logs).expect("logs dir");
    let n = std::fs::read_dir(&logs).map(|d| d.count()).unwrap_or(0);
    let file = std::fs::File::create(logs.join(format!("{n:02}-{role}.log"))).expect("log");
    let err = file.try_clone().expect("log");
    std::process::Command::new(bin())
        .args([role, "--config", config.to_str().expect("utf-8")])
        .stdout(std::process::Stdio::from(file))
        .stderr(std::process::Stdio::from(err))
        .spawn()
        .expect("spawn tidemark")
}

fn unit(site: &Site, system: &str, name: &str) -> PathBuf {
    site.path(&format!("run/{system}/{name}.img"))
}

/// Sends `ops` in order until one is refused; returns how many were acknowledged and
/// the refused one's error code. `sent` counts the writes put on the wire.
fn writer_until_refused(
    port: u16,
    seed: u64,
    ops: Arc<Vec<Op>>,
    sent: Arc<AtomicUsize>,
) -> (usize, Option<u32>) {
    let mut clients: Vec<Client> = EXPORTS
        .iter()
        .map(|(n, _)| Client::connect(port, n))
        .collect();
    for (i, op) in ops.iter().enumerate() {
        let c = &mut clients[op.export];
        sent.store(i + 1, Ordering::SeqCst);
        match op.kind {
            Kind::Write { fua } => {
                let flags = if fua { CMD_FLAG_FUA } else { 0 };
                c.request(flags, CMD_WRITE, op.offset, op.len, &payload(seed, i, op));
            }
            Kind::Zeroes => c.request(0, CMD_WRITE_ZEROES, op.offset, op.len, &[]),
            Kind::Trim => c.request(0, CMD_TRIM, op.offset, op.len, &[]),
        }
        if let Err(code) = c.try_reply(&format!("write {i}")) {
            return (i, Some(code));
        }
        if op.flush_after {
            c.request(0, CMD_FLUSH, 0, 0, &[]);
            if let Err(code) = c.try_reply(&format!("flush after write {i}")) {
                return (i + 1, Some(code));
            }
        }
    }
    for c in clients {
        c.disconnect();
    }
    (ops.len(), None)
}

fn switchover(site: &Site, out: &Path) -> (std::process::Output, serde_json::Value) {
    let out = run(&[
        "switchover",
        "--config",
        site.cfg(),
        "--out",
        out.to_str().expect("utf-8"),
        "--timeout-s",
        "120",
    ]);
    let report = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
    (out, report)
}

#[test]
fn a_switchover_during_writes_loses_nothing_and_resends_nothing() {
    let seed = seed();
    eprintln!("switchover test seed {seed} (TIDEMARK_SEED={seed} to replay)");
    let (site, na, nb) = site();
    let b = daemon(&site, "secondary", &site.config);
    let mut a = daemon(&site, "primary", &site.config);
    wait_tcp(na, &mut a, PATIENCE);

    // A refusal first: a system not answering is refused, nothing changes.
    let early = site.path("early.toml");
    let (o, _) = {
        // site-b answers, site-a too: make `--out` exist instead.
        std::fs::write(&early, "").expect("write");
        switchover(&site, &early)
    };
    assert_eq!(o.status.code(), Some(2), "{o:?}");
    assert!(String::from_utf8_lossy(&o.stderr).contains("never overwritten"));

    let ops = Arc::new(common::dependent::ops(seed, 200_000));
    let sent = Arc::new(AtomicUsize::new(0));
    let writer = {
        let (ops, sent) = (ops.clone(), sent.clone());
        std::thread::spawn(move || writer_until_refused(na, seed, ops, sent))
    };
    // Traffic first, and a cut of it at the secondary while it flows.
    wait_until(PATIENCE, || {
        let n = sent.load(Ordering::SeqCst);
        if n >= 300 {
            Ok(())
        } else {
            Err(format!("{n} writes sent"))
        }
    })
    .unwrap_or_else(|e| panic!("seed {seed}: the writer is stuck: {e}{}", site.log_tails()));
    // The copy is a snapshot of the secondary frozen (SIGSTOP) for a moment, as after
    // a crash: promote must find a cut in it.
    signal("-STOP", b.id());
    let copied = site.promote_copy("during");
    signal("-CONT", b.id());
    let (applied, images) =
        copied.unwrap_or_else(|e| panic!("seed {seed}: promote during traffic: {e}"));
    let k = check_cut(seed, &ops[..sent.load(Ordering::SeqCst)], &applied, &images)
        .unwrap_or_else(|e| panic!("seed {seed}: the secondary during traffic: {e}"));
    eprintln!("during traffic: the secondary held a cut of {k} writes");

    // Had the freeze been long enough for the primary to track, it resyncs while the
    // writer goes on: the switchover needs every pair replicating.
    wait_until(PATIENCE, || {
        let s = site.status("site-a").ok_or("no status")?;
        let ps = s["view"]["pairs"].as_array().cloned().unwrap_or_default();
        if ps
            .iter()
            .all(|p| p["state"] == "replicating" && p["dirty_bytes"] == 0)
        {
            Ok(())
        } else {
            Err(format!("{ps:?}"))
        }
    })
    .unwrap_or_else(|e| panic!("seed {seed}: never replicating: {e}{}", site.log_tails()));
    let new_cfg = site.path("reversed.toml");
    let (o, report) = switchover(&site, &new_cfg);
    assert!(
        o.status.success(),
        "seed {seed}: switchover: {}\n{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
        site.log_tails()
    );
    eprintln!("switchover: {report}");
    let (acked, refused) = writer.join().expect("writer");
    assert_eq!(
        refused,
        Some(ESHUTDOWN),
        "the writer saw {refused:?} after {acked} writes"
    );
    // Both daemons stopped by the switchover.
    for (name, mut child) in [("site-a", a), ("site-b", b)] {
        let st = child.wait().expect("wait");
        assert!(st.success(), "{name} did not stop cleanly: {st:?}");
    }
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(
        report["done"],
        serde_json::json!([
            "check",
            "quiesce",
            "drain",
            "stop-primary",
            "stop-secondary",
            "promote",
            "failover",
            "demote",
            "failback"
        ])
    );
    assert!(
        report["resync_bytes"]
            .as_array()
            .expect("resync_bytes")
            .iter()
            .all(|p| p[1] == 0),
        "{report}"
    );
    eprintln!("{acked} writes acknowledged before the quiesce; the next was refused");

    // No acknowledged write lost, the refused one nowhere: both sides hold exactly the
    // first `acked` writes.
    let counts_acked = counts(&ops[..acked]);
    for system in ["site-b", "site-a"] {
        let images: Vec<PathBuf> = EXPORTS
            .iter()
            .map(|(n, _)| unit(&site, system, n))
            .collect();
        check_cut(seed, &ops, &counts_acked, &images)
            .unwrap_or_else(|e| panic!("seed {seed}: {system} after the switchover: {e}"));
    }

    // The reversed group: site-b primary, site-a secondary.
    let since = SystemTime::now();
    let a = daemon(&site, "secondary", &new_cfg);
    let mut b = daemon(&site, "primary", &new_cfg);
    wait_tcp(nb, &mut b, PATIENCE);
    let mut images = replay(seed, &ops, &counts_acked);
    let mut new_bytes = 0u64;
    {
        let mut clients: Vec<Client> = EXPORTS
            .iter()
            .map(|(n, _)| Client::connect(nb, n))
            .collect();
        for i in 0..64u64 {
            let r = splitmix(seed ^ 0x5717 ^ i);
            let e = (r & 1) as usize;
            let len = 4096 * (1 + (r >> 8) % 8) as u32;
            let off = ((r >> 16) % ((EXPORTS[e].1 - u64::from(len)) / 4096)) * 4096;
            let data: Vec<u8> = (0..u64::from(len))
                .map(|k| (splitmix(r ^ (k / 8)) >> (k % 8 * 8)) as u8)
                .collect();
            clients[e].request(0, CMD_WRITE, off, len, &data);
            clients[e].reply(&format!("new write {i}"));
            images[e][off as usize..off as usize + len as usize].copy_from_slice(&data);
            new_bytes += u64::from(len);
        }
        for mut c in clients {
            c.request(0, CMD_FLUSH, 0, 0, &[]);
            c.reply("flush");
            c.disconnect();
        }
    }
    // Everything acknowledged by site-a and applied there.
    let dir = site.path("run/site-b/journal");
    let status = wait_until(PATIENCE, || {
        let s = status_since(&dir, since).ok_or("no status since the restart")?;
        let ps = pairs(&s);
        let done = ps.iter().all(|p| {
            p["primary_state"] == "replicating"
                && p["dirty_bytes"] == 0
                && p["acked_seq"] == p["written_seq"]
        }) && ps
            .iter()
            .map(|p| p["bytes"].as_u64().unwrap_or(0))
            .sum::<u64>()
            >= new_bytes;
        if done {
            Ok(s)
        } else {
            Err(s["stats"]["pairs"].to_string())
        }
    })
    .unwrap_or_else(|e| {
        panic!(
            "seed {seed}: the new primary never replicated: {e}{}",
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
    site.wait_applied("site-a", &want, PATIENCE);
    let shipped: u64 = pairs(&status)
        .iter()
        .map(|p| p["bytes"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(
        shipped, new_bytes,
        "seed {seed}: the new primary shipped {shipped} bytes for {new_bytes} bytes of new writes: something was resent"
    );
    for p in pairs(&status) {
        assert!(
            p["sync"].is_null(),
            "seed {seed}: a copy ran after the switchover: {p}"
        );
    }
    eprintln!(
        "after the switchover: {new_bytes} bytes written on the new primary, {shipped} shipped"
    );
    assert!(stop(b).status.success());
    assert!(stop(a).status.success());
    for (e, (name, _)) in EXPORTS.iter().enumerate() {
        for system in ["site-b", "site-a"] {
            let got = std::fs::read(unit(&site, system, name)).expect("unit");
            if let Some(at) = first_difference(&got, &images[e]) {
                panic!("seed {seed}: {system}/{name} at the end differs at byte {at}");
            }
        }
    }
}

/// A switchover that cannot drain (the link to the secondary is frozen: its relay is
/// stopped with SIGSTOP after a write) fails at the drain with nothing changed: exit 1,
/// the report says so, the primary takes writes again at once, and when the link
/// comes back everything replicates as before.
#[test]
fn a_switchover_that_cannot_drain_changes_nothing() {
    use rustix::process::{kill_process, Pid, Signal};
    let seed = seed() + 1;
    eprintln!(
        "switchover drain-failure test seed {seed} (TIDEMARK_SEED={} to replay)",
        seed - 1
    );
    let mut spec = Site::two_sites(true);
    let na = free_tcp_port();
    spec.system_mut("site-a").nbd_port = Some(na);
    let site = Site::with_config(spec);
    let relays = site.relays(&["--seed", &seed.to_string()]);
    let b = site.secondary();
    let mut a = site.primary();
    wait_tcp(na, &mut a, PATIENCE);
    let write = |i: u64| -> Result<(), u32> {
        let mut c = Client::connect(na, "log");
        let data = vec![(i & 0xff) as u8; 4096];
        c.request(0, CMD_WRITE, i * 4096, 4096, &data);
        let r = c.try_reply(&format!("write {i}"));
        c.disconnect();
        r
    };
    write(0).expect("a write before");
    let converged = |what: &str| {
        wait_until(PATIENCE, || {
            let s = site.status("site-a").ok_or("no status")?;
            let p = &s["view"]["pairs"][0];
            if p["acked_seq"] == p["written_seq"] && p["written_seq"].as_u64() > Some(0) {
                Ok(s)
            } else {
                Err(p.to_string())
            }
        })
        .unwrap_or_else(|e| panic!("seed {seed}: {what}: {e}{}", site.log_tails()))
    };
    converged("before");
    // Freeze the path to the secondary, then write: that write cannot drain.
    let relay_b = Pid::from_raw(relays[0].id() as i32).expect("pid");
    kill_process(relay_b, Signal::STOP).expect("SIGSTOP the relay");
    write(1).expect("a write the secondary will not get yet");
    let out = run(&[
        "switchover",
        "--config",
        site.cfg(),
        "--out",
        site.path("reversed.toml").to_str().expect("utf-8"),
        "--timeout-s",
        "1",
    ]);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let _ = kill_process(relay_b, Signal::CONT);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert_eq!(report["ok"], false, "{report}");
    assert_eq!(report["failed_step"], "drain", "{report}");
    assert_eq!(
        report["done"],
        serde_json::json!(["check", "quiesce"]),
        "{report}"
    );
    let state = report["state"].as_str().unwrap_or("");
    assert!(state.starts_with("nothing changed"), "{report}");
    assert!(state.contains("takes writes again"), "{report}");
    assert!(!site.path("reversed.toml").exists(), "no reversed config");
    // Writes are taken again, and everything replicates once the link is back.
    write(2).expect("a write after the failed switchover");
    let s = converged("after");
    assert!(
        s["view"]["pairs"][0]["written_seq"].as_u64() >= Some(3),
        "{}",
        s["view"]["pairs"][0]
    );
    assert_eq!(s["view"]["pairs"][0]["quiesced"], false);
    assert!(stop(a).status.success());
    assert!(stop(b).status.success());
    for r in relays {
        let _ = stop(r);
    }
}
