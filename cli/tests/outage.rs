//! Outages with real daemons on loopback: the secondary stops (SIGSTOP) while clients
//! write through the primary's NBD export. Writes go on locally (tracking: their
//! 64 KiB regions recorded write-ahead in `journal_dir/segments/dirty-<pair>.map`), and once the
//! secondary answers again the dirty regions are resynced while clients keep writing;
//! at the end the remote unit equals the local one by content. Also: a primary killed
//! while tracking forgets none of the regions the remote misses (the dirty map
//! survives), and a primary power loss (a torn journal tail, another boot id) restarts
//! its stream and resyncs the whole unit.
//!
//! Waits are on what the status files show (bounded against a hung test, never a
//! measurement). The seed is printed; `TIDEMARK_SEED=<n>` replays one.

mod common;
use common::dependent::*;
use common::outage::*;
use common::*;
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::Arc;
use std::time::SystemTime;

fn seed() -> u64 {
    seed_or(20261215)
}

/// Tracking after this much silence from the remote while writes wait on it.
const SUSPEND_AFTER_MS: u64 = 300;

/// Starts the secondary, then the primary, and waits until the primary's NBD server
/// listens on `port`.
fn start_daemons(site: &Site, port: u16) -> Daemons {
    let mut d = Daemons {
        secondary: Some(site.secondary()),
        primary: Some(site.primary()),
    };
    wait_tcp(port, d.primary.as_mut().expect("primary"), PATIENCE);
    d
}

/// Runs the dependent writes `ops` (payloads of `seed`) over both exports on `port`;
/// every one must complete.
fn write_ops(port: u16, seed: u64, ops: &[Op]) {
    let plan = Arc::new(ops.to_vec());
    let done = dependent_writer(
        &[port, port],
        seed,
        plan.clone(),
        plan.len(),
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicUsize::new(0)),
    );
    assert_eq!(done, plan.len(), "seed {seed}: not every write completed");
}

/// The images of [`EXPORTS`] after `phases` of dependent writes (seed, ops) in order,
/// from blank units.
fn model(phases: &[(u64, &[Op])]) -> Vec<Vec<u8>> {
    let mut images: Vec<Vec<u8>> = EXPORTS.iter().map(|(_, s)| vec![0; *s as usize]).collect();
    for (seed, ops) in phases {
        apply_ops(&mut images, *seed, ops);
    }
    images
}

/// Each pair's state, dirty bytes and written/acked points in a status, for messages.
fn brief(status: &serde_json::Value) -> String {
    pairs(status)
        .iter()
        .map(|p| {
            format!(
                "{} {} dirty {} written {} acked {}",
                p["name"], p["primary_state"], p["dirty_bytes"], p["written_seq"], p["acked_seq"]
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Panics unless each local unit of site-a holds `model`.
fn assert_local_is(site: &Site, model: &[Vec<u8>], seed: u64, when: &str) {
    for (e, (name, _)) in EXPORTS.iter().enumerate() {
        let got = std::fs::read(site.path(&format!("run/site-a/{name}.img"))).expect("unit");
        assert_eq!(got.len(), model[e].len(), "seed {seed}: {name}: size");
        if let Some(at) = first_difference(&got, &model[e]) {
            panic!(
                "seed {seed}: {name} {when}: the local unit differs from the writes at byte {at} \
                 (region {}: holds {:?}, the writes left {:?})",
                at >> 16,
                &got[at..(at + 8).min(got.len())],
                &model[e][at..(at + 8).min(got.len())]
            );
        }
    }
}

/// Where the primary daemon's engine keeps its journal segments, dirty maps
/// (`dirty-<pair index>.map`) and run marker (`running`): `journal_dir/segments`.
const A_SEGMENTS: &str = "run/site-a/journal/segments";

/// Panics unless the primary's segments directory holds the dirty map of pair `i`.
fn assert_dirty_map(site: &Site, i: usize) {
    let dir = site.path(A_SEGMENTS);
    let map = dir.join(format!("dirty-{i}.map"));
    if std::fs::metadata(&map).is_err() {
        let names: Vec<String> = std::fs::read_dir(&dir)
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        panic!("no {}; the directory holds {names:?}", map.display());
    }
}

/// fio writes (random 4 KiB, QD16, verified) through the primary while the secondary is
/// stopped for longer than the primary's 8 MiB journal could absorb: fio finishes while
/// the secondary is still stopped (writes never stall), the pair is tracking with dirty
/// bytes beyond the journal's size; after SIGCONT the pair resyncs and replicates again,
/// no dirty bytes left, the secondary applies everything, both daemons stop cleanly and
/// the remote unit equals the local one byte for byte.
#[test]
fn an_outage_while_fio_writes_never_stalls_and_resyncs() {
    if !have(&["fio"]) {
        return;
    }
    let seed = seed();
    eprintln!("outage test seed {seed} (TIDEMARK_SEED={seed} to replay)");
    const UNIT: u64 = 64 << 20;
    const JOURNAL: u64 = 8 << 20;
    let (a_port, b_port, nbd) = (free_port(), free_port(), free_tcp_port());
    let mut spec = ConfigText::new()
        .system(SystemSpec::primary("site-a", a_port).nbd(nbd))
        .system(SystemSpec::secondary("site-b", b_port))
        .pair(PairSpec::new("data", UNIT, "site-a", "site-b"))
        .tracking_after_ms(SUSPEND_AFTER_MS);
    spec.system_mut("site-a").journal_size = Some(JOURNAL);
    let site = Site::with_config(spec);
    let daemons = start_daemons(&site, nbd);
    let sec_pid = daemons.secondary.as_ref().expect("secondary").id();

    // fio overwrites the whole unit once at random, paced at 16 MiB/s (so that it lasts
    // a few seconds: it must still be writing when the secondary stops), then reads
    // everything back through the primary (verify).
    let started = SystemTime::now();
    let fio = spawn_fio(
        nbd,
        "data",
        &[
            "--name=outage".into(),
            "--rw=randwrite".into(),
            "--bs=4k".into(),
            "--iodepth=16".into(),
            format!("--size={UNIT}"),
            "--rate=,16m".into(),
            "--verify=crc32c".into(),
            "--do_verify=1".into(),
            "--verify_fatal=1".into(),
            "--verify_state_save=0".into(),
            format!("--randseed={seed}"),
        ],
    );
    // The outage starts once the secondary is seen receiving fio's writes.
    let b_journal = site.path("run/site-b/journal");
    let receiving = wait_receiving(&[b_journal], started, PATIENCE, || false)
        .unwrap_or_else(|e| panic!("the secondary never received: {e}"));
    assert!(receiving);
    signal("-STOP", sec_pid);
    let stopped_at = SystemTime::now();
    let mut fio = fio;
    assert!(
        fio.0
            .as_mut()
            .expect("fio")
            .try_wait()
            .expect("fio")
            .is_none(),
        "fio ended before the outage began: nothing written during it (a faster machine \
         than this test expects: raise the unit size)"
    );
    eprintln!("the secondary (pid {sec_pid}) is stopped; fio goes on");

    let job = wait_fio(fio, PATIENCE, || {
        format!(
            "primary: {}; logs:{}",
            site.status("site-a").unwrap_or_default(),
            site.log_tails()
        )
    });
    assert_eq!(job["write"]["io_bytes"].as_u64(), Some(UNIT), "{job}");
    assert_eq!(
        job["read"]["io_bytes"].as_u64(),
        Some(UNIT),
        "verified: {job}"
    );
    assert!(
        is_stopped(sec_pid),
        "the secondary was not stopped all through fio's run"
    );
    // The pair tracks, and still does after fio (the secondary is still stopped), the
    // regions written since the stop covering more than the journal holds.
    wait_tracking(&site, "data", stopped_at);
    let status = site.status_after("site-a", SystemTime::now(), PATIENCE);
    let p = pair(&status, "data");
    assert_eq!(p["primary_state"], "tracking", "{p}");
    let dirty = p["dirty_bytes"].as_u64().unwrap_or(0);
    eprintln!(
        "fio done while the secondary is stopped: {} MiB/s written; {} MiB dirty",
        job["write"]["bw"].as_u64().unwrap_or(0) >> 10,
        dirty >> 20
    );
    assert!(
        dirty > JOURNAL,
        "the outage was to outlast the journal: only {dirty} bytes dirty: {p}"
    );
    assert_dirty_map(&site, 0);

    let resumed = SystemTime::now();
    signal("-CONT", sec_pid);
    let status = wait_converged(&site, resumed);
    let p = pair(&status, "data");
    let sync = &p["sync"];
    eprintln!("after the resync: {sync}");
    assert_eq!(sync["finished"], true, "a resync ran: {p}");
    let total = sync["total_bytes"].as_u64().unwrap_or(0);
    assert!(total > 0, "the resync copied nothing: {p}");
    assert_eq!(sync["copied_bytes"], sync["total_bytes"], "{p}");
    daemons.stop_both(&site);
    assert_units_equal(&site, &["data"], seed);
}

/// Known writes while the secondary is stopped (the pair tracking), then the primary is
/// killed (SIGKILL) and restarted with the secondary still stopped: it tracks again,
/// from its dirty map, and takes more writes. Once the secondary continues, every region
/// the remote missed, before and after the kill, is resynced: remote == local == the
/// writes.
#[test]
fn a_primary_killed_while_tracking_forgets_no_dirty_region() {
    let seed = seed() + 1;
    eprintln!(
        "outage kill test seed {seed} (TIDEMARK_SEED={} to replay)",
        seed - 1
    );
    let (mut site, port) = Site::with_nbd();
    site.edit_config(|c| {
        c.on_journal_full = Some("track".into());
        c.suspend_after_ms = Some(SUSPEND_AFTER_MS);
    });
    let mut daemons = start_daemons(&site, port);
    let sec_pid = daemons.secondary.as_ref().expect("secondary").id();
    let (s1, s2, s3) = (seed, seed ^ 0x5eed_0002, seed ^ 0x5eed_0003);
    let (before, during, after) = (ops(s1, 300), ops(s2, 400), ops(s3, 300));

    // Connected: replicated as usual.
    write_ops(port, s1, &before);
    signal("-STOP", sec_pid);
    let stopped_at = SystemTime::now();
    write_ops(port, s2, &during);
    let status = wait_tracking(&site, "data", stopped_at);
    eprintln!("tracking before the kill: {}", brief(&status));
    kill9(daemons.primary.take().expect("primary"));
    for i in 0..2 {
        assert_dirty_map(&site, i);
    }
    // Acknowledged writes survive a process crash on the local units.
    let acknowledged = model(&[(s1, &before), (s2, &during)]);
    assert_local_is(&site, &acknowledged, seed, "after the kill");

    // Restarted with the secondary still stopped: it tracks again.
    let restarted = SystemTime::now();
    daemons.primary = Some(site.primary());
    wait_tcp(port, daemons.primary.as_mut().expect("primary"), PATIENCE);
    let status = wait_tracking(&site, "data", restarted);
    eprintln!("the restarted primary: {}", brief(&status));
    // The restart (its redo of the journal) kept every acknowledged write.
    assert_local_is(&site, &acknowledged, seed, "after the restart");
    write_ops(port, s3, &after);
    assert!(is_stopped(sec_pid), "the secondary ran meanwhile");

    let resumed = SystemTime::now();
    signal("-CONT", sec_pid);
    let status = wait_converged(&site, resumed);
    for p in pairs(&status) {
        assert_eq!(p["dirty_bytes"], 0, "{p}");
    }
    daemons.stop_both(&site);
    let names: Vec<&str> = EXPORTS.iter().map(|(n, _)| *n).collect();
    assert_units_equal(&site, &names, seed);
    assert_local_is(
        &site,
        &model(&[(s1, &before), (s2, &during), (s3, &after)]),
        seed,
        "at the end",
    );
}

/// A simulated power loss on the primary after its writes replicated: SIGKILL, the last
/// journal segment loses its last third (the unsynced tail, packets the remote holds),
/// and the run marker names another boot. The restarted primary restarts its stream
/// above its reservation and resyncs the whole unit while clients keep writing; at the
/// end remote == local by content, and the local unit holds every write made after the
/// restart (those before were never flushed: a power loss may take some back). (Without the restart the remote would
/// take the new writes' sequence numbers for ones it holds and drop them.)
#[test]
fn a_power_loss_on_the_primary_restarts_the_stream_and_resyncs() {
    let seed = seed() + 2;
    eprintln!(
        "outage power loss test seed {seed} (TIDEMARK_SEED={} to replay)",
        seed - 2
    );
    let (mut site, port) = Site::with_nbd();
    site.edit_config(|c| {
        c.on_journal_full = Some("track".into());
        c.suspend_after_ms = Some(SUSPEND_AFTER_MS);
        // Not the default: the key reaches the dirty maps (the full resync marks all).
        c.region_size = Some("256KiB".into());
    });
    let mut daemons = start_daemons(&site, port);
    let (s1, s2) = (seed, seed ^ 0x5eed_0002);
    // Before the power loss no FUA and no flush: the journal syncs nothing after its
    // first reservation, so the torn third is a tail a power loss may really take.
    let before: Vec<Op> = ops(s1, 600)
        .into_iter()
        .map(|mut op| {
            if let Kind::Write { .. } = op.kind {
                op.kind = Kind::Write { fua: false };
            }
            op.flush_after = false;
            op
        })
        .collect();
    let after = ops(s2, 600);
    write_ops(port, s1, &before);
    // Let it replicate: the secondary applied everything the primary stamped.
    let status = wait_converged(&site, SystemTime::now());
    eprintln!(
        "replicated before the power loss: written {:?}",
        written_seq(&status)
    );
    kill9(daemons.primary.take().expect("primary"));

    // The power loss: the last segment loses its last third, the marker another boot.
    let journal = site.path(A_SEGMENTS);
    let (last, len, keep, segs) =
        tidemark::journal::fault::tear_last_segment(&journal).expect("tear the tail");
    eprintln!(
        "torn {}: {len} -> {keep} bytes ({segs} segments)",
        last.display()
    );
    let marker = journal.join("running");
    assert!(
        std::fs::metadata(&marker).is_ok(),
        "a killed primary leaves its run marker"
    );
    std::fs::write(&marker, "another-boot").expect("marker");

    let restarted = SystemTime::now();
    daemons.primary = Some(site.primary());
    wait_tcp(port, daemons.primary.as_mut().expect("primary"), PATIENCE);
    write_ops(port, s2, &after);
    let status = wait_converged(&site, restarted);
    let logs = site.log_tails();
    assert!(
        std::fs::read_dir(site.path("logs"))
            .expect("logs")
            .filter_map(|e| e.ok())
            .any(|e| std::fs::read_to_string(e.path())
                .unwrap_or_default()
                .contains("restarting the stream")),
        "the restarted primary did not restart its stream; logs:{logs}"
    );
    for p in pairs(&status) {
        // The whole unit was resynced: every written extent, so more than the torn tail.
        let total = p["sync"]["total_bytes"].as_u64().unwrap_or(0);
        assert!(total > 0, "no full resync: {p}");
        assert!(
            p["written_seq"].as_u64().unwrap_or(0) > 1 << 16,
            "the stream restarted above the reservation: {p}"
        );
    }
    daemons.stop_both(&site);
    let names: Vec<&str> = EXPORTS.iter().map(|(n, _)| *n).collect();
    assert_units_equal(&site, &names, seed);
    // The writes before the power loss were never flushed: the local unit may lose
    // some (the redo of the torn journal takes regions back to older data, as a lost
    // disk cache would). Every byte written after the restart must be there.
    assert_local_holds(&site, s2, &after, "at the end");
}

/// Panics unless each local unit of site-a holds, in every byte that `ops` (payloads of
/// `seed`) wrote, what the last of them wrote there.
fn assert_local_holds(site: &Site, seed: u64, ops: &[Op], when: &str) {
    let want = model(&[(seed, ops)]);
    let mut written: Vec<Vec<bool>> = EXPORTS
        .iter()
        .map(|(_, s)| vec![false; *s as usize])
        .collect();
    for op in ops {
        let at = op.offset as usize;
        written[op.export][at..at + op.len as usize].fill(true);
    }
    for (e, (name, _)) in EXPORTS.iter().enumerate() {
        let got = std::fs::read(site.path(&format!("run/site-a/{name}.img"))).expect("unit");
        assert_eq!(got.len(), want[e].len(), "seed {seed}: {name}: size");
        if let Some(at) = (0..got.len()).find(|&i| written[e][i] && got[i] != want[e][i]) {
            panic!(
                "seed {seed}: {name} {when}: the local unit lost a write at byte {at} \
                 (region {})",
                at >> 16
            );
        }
    }
}

/// A `load` whose remote never answers ends at its deadline (a wait with a way out): it
/// exits non-zero saying it timed out, and its status file shows what it got to; its
/// shutdown gives up on what still waits for the remote instead of waiting again.
#[test]
fn load_gives_up_at_its_deadline_when_no_secondary_answers() {
    let site = Site::new(false);
    let mut load = site.spawn_load(300, 1, 65536, 2);
    // A bound against a hung test, far above the 2 s deadline plus the 10 s grace.
    let exited = wait_until(PATIENCE * 4, || match load.try_wait() {
        Ok(Some(status)) => Ok(status),
        Ok(None) => Err("load still running".into()),
        Err(e) => Err(format!("wait: {e}")),
    });
    let status = match exited {
        Ok(s) => s,
        Err(e) => {
            let _ = load.kill();
            panic!(
                "load did not end at its deadline: {e}; logs:{}",
                site.log_tails()
            );
        }
    };
    let out = load.wait_with_output().expect("load output");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!status.success(), "no secondary, yet load succeeded: {err}");
    assert!(err.contains("timed out"), "says why: {err}");
    let st = site
        .status("site-a")
        .unwrap_or_else(|| panic!("load left no status.json; stderr: {err}"));
    let written: Vec<u64> = st["stats"]["pairs"]
        .as_array()
        .map(|ps| {
            ps.iter()
                .filter_map(|p| p["written_seq"].as_u64())
                .collect()
        })
        .unwrap_or_default();
    assert!(
        written.iter().any(|&w| w > 0),
        "the status shows the writes it got to: {st}"
    );
}
