//! `tidemark export`: the remote units of a promoted secondary, served read-only over
//! NBD, with real processes and real clients on loopback.
//!
//! A primary and a secondary run; seeded random images go through the primary's NBD
//! exports (qemu-img convert) and replicate. `export` is refused while the secondary
//! runs. The secondary is killed (SIGKILL), the primary stopped, the secondary promoted;
//! then `export` serves its remote units at its `nbd_listen`: nbdinfo lists them
//! read-only with their sizes, qemu-img compare finds them equal to the images promote
//! reported applied (every write), a qemu-io write fails, a raw client's WRITE, TRIM and
//! WRITE_ZEROES get EPERM while READ and FLUSH work, and no unit file changes by a byte.
//! Finally a packet at the durable limit that is not applied makes `export` refuse until
//! `promote` applied it.
//!
//! The seed is printed; `TIDEMARK_SEED=<n>` replays one. The test skips (printing
//! SKIPPED) if a client program is not installed.

mod common;
use common::dependent::{as_want, written_seq, Client, EXPORTS, PATIENCE};
use common::*;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Output};
use std::time::SystemTime;
use tidemark::nbd::consts::*;

/// Runs a program and fails the test with its output unless it exits 0.
fn must(program: &str, args: &[&str]) -> Output {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {} failed ({}):\n{}\n{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Seeded random bytes with zeroed stretches (holes for the image tools).
fn image(len: usize, seed: u64) -> Vec<u8> {
    use rand::{RngCore, SeedableRng};
    let mut rng = rand_pcg::Pcg64::seed_from_u64(seed);
    let mut v = vec![0u8; len];
    rng.fill_bytes(&mut v);
    for (i, chunk) in v.chunks_mut(64 << 10).enumerate() {
        if i % 5 == 2 {
            chunk.fill(0);
        }
    }
    v
}

/// Kills whatever is still held when the test ends (a failed assertion leaves no
/// process behind).
#[derive(Default)]
struct Procs(Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in self.0.drain(..) {
            kill9(c);
        }
    }
}

/// Starts `tidemark export` for site-b and returns it with the JSON report it prints
/// once it listens (reading that line is the synchronisation).
fn start_export(site: &Site, extra: &[&str]) -> (Child, serde_json::Value) {
    let mut args = vec!["export", "--config", site.cfg(), "--system", "site-b"];
    args.extend(extra);
    let mut child = site.spawn(&args);
    let mut line = String::new();
    let stdout = child.stdout.take().expect("stdout");
    let n = BufReader::new(stdout).read_line(&mut line).expect("read");
    if n == 0 {
        let out = child.wait_with_output().expect("wait");
        panic!(
            "export exited ({}) without serving: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let v = serde_json::from_str(line.trim()).unwrap_or_else(|e| panic!("{e}: {line}"));
    (child, v)
}

/// Reads a simple reply's header: (error, cookie).
fn reply_header(c: &mut Client) -> (u32, u64) {
    assert_eq!(c.u32(), SIMPLE_REPLY_MAGIC, "a simple reply");
    (c.u32(), c.u64())
}

#[test]
fn a_promoted_secondary_is_served_read_only_over_nbd() {
    if !have(&["qemu-img", "qemu-io", "nbdinfo"]) {
        return;
    }
    let seed = seed_or(20261129);
    eprintln!("nbd export test seed {seed} (TIDEMARK_SEED={seed} to replay)");
    let (mut site, port) = Site::with_nbd();
    // site-b gets an nbd_listen of its own: `secondary` ignores it, `export` serves there.
    let export_port = free_tcp_port();
    site.edit_config(|c| c.system_mut("site-b").nbd_port = Some(export_port));

    let mut procs = Procs::default();
    procs.0.push(site.secondary());
    let mut primary = site.primary();
    wait_tcp(port, &mut primary, PATIENCE);
    procs.0.push(primary);
    let images: Vec<Vec<u8>> = EXPORTS
        .iter()
        .enumerate()
        .map(|(i, (_, size))| image(*size as usize, seed + i as u64))
        .collect();
    for ((name, _), bytes) in EXPORTS.iter().zip(&images) {
        let src = site.path(&format!("{name}.src"));
        std::fs::write(&src, bytes).expect("image");
        must(
            "qemu-img",
            &[
                "convert",
                "-n",
                "-f",
                "raw",
                "-O",
                "raw",
                src.to_str().expect("utf-8"),
                &format!("nbd://127.0.0.1:{port}/{name}"),
            ],
        );
    }
    let written = written_seq(&site.status_after("site-a", SystemTime::now(), PATIENCE));
    assert!(written.iter().all(|&n| n > 0), "{written:?}");
    site.wait_applied("site-b", &as_want(&written), PATIENCE);

    // The secondary runs (it just wrote its status): export is refused, exit 2, and
    // the secondary does not serve its nbd_listen itself.
    let out = run(&["export", "--config", site.cfg(), "--system", "site-b"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("site-b is running"), "{err}");
    assert!(std::net::TcpStream::connect(("127.0.0.1", export_port)).is_err());

    // Kill the secondary, stop the primary cleanly, promote.
    let secondary = procs.0.remove(0);
    kill9(secondary);
    let out = stop(procs.0.remove(0));
    assert!(out.status.success(), "primary: {out:?}");
    let out = run(&["promote", "--config", site.cfg(), "--system", "site-b"]);
    assert!(out.status.success(), "promote: {out:?}");
    let promoted: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(promoted["consistent"], true, "{promoted}");
    let applied: Vec<u64> = (0..EXPORTS.len())
        .map(|i| promoted["pairs"][i]["applied_seq"].as_u64().expect("seq"))
        .collect();
    // Everything was applied before the kill: the cut holds every write.
    assert_eq!(applied, written, "{promoted}");
    let units: Vec<_> = EXPORTS
        .iter()
        .map(|(n, _)| site.path(&format!("run/site-b/{n}.img")))
        .collect();
    let before: Vec<Vec<u8>> = units
        .iter()
        .map(|u| std::fs::read(u).expect("unit"))
        .collect();

    let (export, report) = start_export(&site, &[]);
    procs.0.push(export);
    assert_eq!(report["listen"], format!("127.0.0.1:{export_port}"));
    assert_eq!(report["read_only"], true);
    assert_eq!(report["limit_ts"], promoted["limit_ts"], "{report}");
    for (i, (name, size)) in EXPORTS.iter().enumerate() {
        let e = &report["exports"][i];
        assert_eq!(e["name"], *name, "{report}");
        assert_eq!(e["size"], *size, "{report}");
        assert_eq!(e["applied_seq"], applied[i], "{report}");
    }
    let server = format!("nbd://127.0.0.1:{export_port}");

    // nbdinfo: every export, its size, read-only, no trim or zero.
    let out = must("nbdinfo", &["--list", "--json", &server]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("nbdinfo JSON");
    let mut listed: Vec<(String, u64, bool)> = v["exports"]
        .as_array()
        .expect("exports")
        .iter()
        .map(|e| {
            (
                e["export-name"].as_str().expect("name").to_string(),
                e["export-size"].as_u64().expect("size"),
                e["is_read_only"].as_bool().expect("is_read_only"),
            )
        })
        .collect();
    listed.sort();
    let mut want: Vec<(String, u64, bool)> = EXPORTS
        .iter()
        .map(|(n, s)| (n.to_string(), *s, true))
        .collect();
    want.sort();
    assert_eq!(listed, want, "{v}");
    let out = must("nbdinfo", &["--json", &format!("{server}/log")]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("nbdinfo JSON");
    let e = &v["exports"][0];
    assert_eq!(e["is_read_only"].as_bool(), Some(true), "{e}");
    assert_eq!(e["can_trim"].as_bool(), Some(false), "{e}");
    assert_eq!(e["can_zero"].as_bool(), Some(false), "{e}");
    assert_eq!(e["can_flush"].as_bool(), Some(true), "{e}");

    // The exports hold the images (promote applied every write), and so the remote
    // unit files and the primary's local units.
    for (i, (name, _)) in EXPORTS.iter().enumerate() {
        let uri = format!("{server}/{name}");
        let src = site.path(&format!("{name}.src"));
        let local = site.path(&format!("run/site-a/{name}.img"));
        for file in [&src, &units[i], &local] {
            must(
                "qemu-img",
                &[
                    "compare",
                    "-f",
                    "raw",
                    "-F",
                    "raw",
                    file.to_str().expect("utf-8"),
                    &uri,
                ],
            );
        }
        assert!(before[i] == images[i], "seed {seed}: {name} differs");
    }

    // qemu-io cannot write.
    let out = Command::new("qemu-io")
        .args([
            "-f",
            "raw",
            "-c",
            "write -P 0x77 0 4096",
            &format!("{server}/log"),
        ])
        .output()
        .expect("run qemu-io");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // qemu sees the read-only flag and refuses to open the export for writing.
    assert!(
        !out.status.success() && !said.contains("wrote"),
        "qemu-io wrote to a read-only export: {said}"
    );

    // A client that ignores the read-only flag: every kind of write gets EPERM, reads
    // and flush work, and the connection stays in step.
    let mut c = Client::connect(export_port, "log");
    let mut cookie = 0;
    for (kind, data) in [
        (CMD_WRITE, vec![0x55u8; 512]),
        (CMD_TRIM, vec![]),
        (CMD_WRITE_ZEROES, vec![]),
    ] {
        c.request(0, kind, 4096, 512, &data);
        cookie += 1;
        assert_eq!(reply_header(&mut c), (1, cookie), "command {kind}: EPERM");
    }
    c.request(CMD_FLAG_FUA, CMD_WRITE, 0, 4, b"abcd");
    cookie += 1;
    assert_eq!(reply_header(&mut c), (1, cookie), "FUA write: EPERM");
    c.request(0, CMD_READ, 4096, 512, &[]);
    cookie += 1;
    assert_eq!(reply_header(&mut c), (0, cookie), "read");
    assert_eq!(c.read(512), images[0][4096..4608].to_vec(), "read data");
    c.request(0, CMD_FLUSH, 0, 0, &[]);
    c.reply("flush");
    c.disconnect();

    // SIGTERM: exits 0; no unit file changed by a byte.
    let out = stop(procs.0.pop().expect("export"));
    assert!(out.status.success(), "export did not stop cleanly: {out:?}");
    for (u, b) in units.iter().zip(&before) {
        assert!(
            std::fs::read(u).expect("unit") == *b,
            "{} changed",
            u.display()
        );
    }

    // A packet at the durable limit, journaled and not applied (as a secondary killed
    // between receiving and applying leaves it): refused until promote applies it.
    let limit = promoted["limit_ts"].as_u64().expect("limit");
    {
        use tidemark::journal::Record;
        use tidemark::{Offset, Packet, PairId, Payload, Seq, Stamp, Timestamp};
        use tidemark_actors::units::journaling::{Durability, SharedJournal};
        let (j, _) = SharedJournal::open(&site.path("run/site-b/journal/segments"), 64 << 20)
            .expect("journal");
        j.append(
            &[Record::Packet(Packet {
                pair: PairId(0),
                stamp: Stamp::new(Timestamp(limit), Seq(applied[0] + 1)),
                payload: Payload::Write {
                    offset: Offset(0),
                    data: bytes::Bytes::from(vec![0xeeu8; 512]),
                },
            })],
            Durability::Synced,
        )
        .expect("append");
    }
    let out = run(&["export", "--config", site.cfg(), "--system", "site-b"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("not promoted") && err.contains("log: 1") && err.contains("promote"),
        "{err}"
    );
    assert!(std::fs::read(&units[0]).expect("unit") == before[0]);
    let out = run(&["promote", "--config", site.cfg(), "--system", "site-b"]);
    assert!(out.status.success(), "promote: {out:?}");
    // --listen overrides nbd_listen; the report names the port actually bound.
    let (export, report) = start_export(&site, &["--listen", "127.0.0.1:0"]);
    procs.0.push(export);
    assert_eq!(report["exports"][0]["applied_seq"], applied[0] + 1);
    let listen = report["listen"].as_str().expect("listen");
    let bound: u16 = listen
        .strip_prefix("127.0.0.1:")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("{listen}"));
    assert_ne!(bound, 0);
    let mut c = Client::connect(bound, "log");
    c.request(0, CMD_READ, 0, 512, &[]);
    assert_eq!(reply_header(&mut c), (0, 1));
    assert_eq!(
        c.read(512),
        vec![0xee; 512],
        "the promoted packet is served"
    );
    c.disconnect();
    let out = stop(procs.0.pop().expect("export"));
    assert!(out.status.success(), "{out:?}");
}
