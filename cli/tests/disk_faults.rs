//! The disk-fault matrix of issue 14 with real daemons on real file systems:
//! {primary, secondary} × {journal, unit} × {ENOSPC, EIO}. See docs/operations.md ("A
//! full or failing disk") for what each cell must do; the same cells run in process,
//! without mounts, in `actors/tests/disk_faults.rs`.
//!
//! - ENOSPC: the journal directory (or the directory of the units) is a small tmpfs,
//!   filled up by a filler file; removing the filler frees it.
//! - EIO: the directory is an ext4 image on a loop device, shut down with
//!   `EXT4_IOC_SHUTDOWN` (every later operation on it fails with EIO, as a dead disk);
//!   unmounting and mounting it again is the repaired disk.
//!
//! Mounting needs root and a kernel that lets the test mount (CI may not): a test that
//! cannot mount prints "SKIPPED: cannot mount (reason)" and passes, unless
//! `TIDEMARK_REQUIRE_MOUNT=1`. Mounts are undone by a guard, after the daemons are
//! killed, whether the test passes or not.
//!
//! Writes are made with a minimal NBD client (one request in flight), so each reply's
//! NBD error is seen: NBD_ENOSPC (28) or NBD_EIO (5). The data of write `i` is a pure
//! function of the seed (printed; `TIDEMARK_SEED=<n>` replays one).

mod common;
use common::dependent::Client;
use common::*;
use rand::{Rng, SeedableRng};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;
use tidemark::nbd::consts::{CMD_FLUSH, CMD_WRITE};

const NBD_EIO: u32 = 5;
const NBD_ENOSPC: u32 = 28;
const NBD_ESHUTDOWN: u32 = 108;
const PATIENCE: Duration = Duration::from_secs(60);
const BLOCK: usize = 64 << 10;

// ---- Mounts ----

enum Kind {
    Tmpfs,
    /// An ext4 image (the file) mounted through a loop device.
    Ext4(PathBuf),
}

/// A file system mounted on `dir` until dropped (then unmounted lazily, so a process
/// that still holds a file cannot keep it).
struct Mount {
    dir: PathBuf,
    kind: Kind,
    mounted: bool,
}

fn sh(cmd: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .map_err(|e| format!("{cmd}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Mount {
    fn tmpfs(dir: &Path, size: u64) -> Result<Mount, String> {
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        let d = dir.to_str().ok_or("path")?;
        sh(
            "mount",
            &["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs", d],
        )?;
        Ok(Mount {
            dir: dir.to_path_buf(),
            kind: Kind::Tmpfs,
            mounted: true,
        })
    }

    fn ext4(dir: &Path, image: &Path, size: u64) -> Result<Mount, String> {
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        std::fs::File::create(image)
            .and_then(|f| f.set_len(size))
            .map_err(|e| e.to_string())?;
        let img = image.to_str().ok_or("path")?;
        sh("mkfs.ext4", &["-q", "-F", "-O", "^has_journal", img])?;
        let mut m = Mount {
            dir: dir.to_path_buf(),
            kind: Kind::Ext4(image.to_path_buf()),
            mounted: false,
        };
        m.mount()?;
        Ok(m)
    }

    fn mount(&mut self) -> Result<(), String> {
        let d = self.dir.to_str().ok_or("path")?;
        if let Kind::Ext4(img) = &self.kind {
            let img = img.to_str().ok_or("path")?;
            sh("mount", &["-o", "loop,errors=continue", img, d])?;
            self.mounted = true;
        }
        Ok(())
    }

    /// EXT4_IOC_SHUTDOWN (flags 0: sync first, then fail everything with EIO).
    fn shut_down(&self) {
        const EXT4_IOC_SHUTDOWN: libc::c_ulong = 0x8004_587D;
        let d = std::fs::File::open(&self.dir).expect("open the mount point");
        let flags: u32 = 0;
        // SAFETY: the ioctl reads one u32 from the pointer, which outlives the call.
        let r = unsafe { libc::ioctl(d.as_raw_fd(), EXT4_IOC_SHUTDOWN, &flags) };
        assert_eq!(
            r,
            0,
            "EXT4_IOC_SHUTDOWN: {}",
            std::io::Error::last_os_error()
        );
    }

    /// The disk is repaired: unmount the shut-down file system and mount it again.
    fn repair(&mut self) {
        let d = self.dir.to_str().expect("path");
        sh("umount", &[d]).expect("umount");
        self.mounted = false;
        self.mount().expect("mount again");
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if self.mounted {
            if let Some(d) = self.dir.to_str() {
                if let Err(e) = sh("umount", &["-l", d]) {
                    eprintln!("cleanup: {e}");
                }
            }
        }
    }
}

/// The mount, or `None` after a loud skip (a panic with `TIDEMARK_REQUIRE_MOUNT=1`).
fn mounted(m: Result<Mount, String>) -> Option<Mount> {
    match m {
        Ok(m) => Some(m),
        Err(e) if std::env::var("TIDEMARK_REQUIRE_MOUNT").as_deref() == Ok("1") => {
            panic!("cannot mount ({e}) and TIDEMARK_REQUIRE_MOUNT=1")
        }
        Err(e) => {
            eprintln!("SKIPPED: cannot mount ({e})");
            None
        }
    }
}

/// Takes every free byte of the file system of `dir` with one file (written until
/// ENOSPC), until dropped or [`Filler::free`]d.
struct Filler(PathBuf);

impl Filler {
    fn fill(dir: &Path) -> Filler {
        let path = dir.join("filler");
        std::fs::File::create(&path).expect("filler");
        let f = Filler(path);
        f.top_up();
        f
    }

    /// Takes again whatever was freed since (the journal deletes segments it no longer
    /// needs, as acknowledgements come).
    fn top_up(&self) {
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&self.0)
            .expect("filler");
        let chunk = vec![0x5au8; 1 << 16];
        let mut small = false;
        loop {
            let r = if small {
                f.write(&chunk[..4096])
            } else {
                f.write(&chunk)
            };
            match r {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) && !small => small = true,
                Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                Err(e) => panic!("filler: {e}"),
            }
        }
    }

    fn free(self) {}
}

impl Drop for Filler {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Daemons killed when dropped (a failing test leaves none behind, before the mounts go).
#[derive(Default)]
struct Procs(Vec<(&'static str, Child)>);

impl Procs {
    fn take(&mut self, name: &str) -> Child {
        let i = self
            .0
            .iter()
            .position(|(n, _)| *n == name)
            .expect("a running daemon");
        self.0.remove(i).1
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        for (_, c) in self.0.drain(..) {
            kill9(c);
        }
    }
}

// ---- Writes ----

fn data(seed: u64, i: u64) -> Vec<u8> {
    let mut rng = rand_pcg::Pcg64::seed_from_u64(seed ^ i.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let mut v = vec![0u8; BLOCK];
    rng.fill(&mut v[..]);
    v
}

/// Writes block `i` of the seed at `slot` of `export`; returns the NBD error.
fn write(c: &mut Client, seed: u64, i: u64, slot: u64) -> u32 {
    let d = data(seed, i);
    c.request(0, CMD_WRITE, slot * BLOCK as u64, BLOCK as u32, &d);
    c.reply_error(&format!("write {i}"))
}

fn flush(c: &mut Client) -> u32 {
    c.request(0, CMD_FLUSH, 0, 0, &[]);
    c.reply_error("flush")
}

/// What a unit file holds at `slot`.
fn read_slot(path: &Path, slot: u64) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path).expect("unit");
    let mut v = vec![0u8; BLOCK];
    f.read_exact_at(&mut v, slot * BLOCK as u64).expect("read");
    v
}

fn seed() -> u64 {
    let s = seed_or(20261203);
    eprintln!("disk faults seed {s} (TIDEMARK_SEED={s} to replay)");
    s
}

/// Waits until the remote's `log` unit equals the local one (both daemons running).
fn converged(site: &Site) {
    let (a, b) = (
        site.path("run/site-a/log.img"),
        site.path("run/site-b/log.img"),
    );
    wait_until(PATIENCE, || {
        if same_file(&a, &b) {
            Ok(())
        } else {
            Err("remote log.img differs from local".into())
        }
    })
    .unwrap_or_else(|e| panic!("{e}; logs:{}", site.log_tails()));
}

/// The journal directory of `system` (the config's).
fn journal_dir(site: &Site, system: &str) -> PathBuf {
    site.path(&site.spec.system_spec(system).journal_dir)
}

/// The status `system` wrote last.
fn status_of(site: &Site, system: &str) -> Option<serde_json::Value> {
    tidemark_cli::daemon::read_status(&journal_dir(site, system))
}

/// A status `system` wrote after now (polled, bounded).
fn status_after(site: &Site, system: &str) -> serde_json::Value {
    let now = std::time::SystemTime::now();
    wait_until(PATIENCE, || {
        status_since(&journal_dir(site, system), now).ok_or_else(|| "none yet".to_string())
    })
    .unwrap_or_else(|e| panic!("{system} status: {e}"))
}

/// Everything the secondaries logged so far.
fn secondary_log(site: &Site) -> String {
    let mut names: Vec<PathBuf> = std::fs::read_dir(site.path("logs"))
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    names.sort();
    names
        .iter()
        .filter(|p| p.to_string_lossy().contains("secondary"))
        .map(|p| std::fs::read_to_string(p).unwrap_or_default())
        .collect()
}

/// The `tidemark_failed` gauge of `system` from the metrics endpoint on `port`.
fn failed_metric(port: u16, system: &str) -> Option<String> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(PATIENCE)).ok()?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        .ok()?;
    let mut body = String::new();
    s.read_to_string(&mut body).ok()?;
    let want = format!("tidemark_failed{{system=\"{system}\"}} ");
    body.lines()
        .find(|l| l.starts_with(&want))
        .map(|l| l[want.len()..].to_string())
}

// ---- The primary cells ----

/// Where the fault goes: the journal directory or the directory of the units.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Place {
    Journal,
    Unit,
}

/// Mounts the file system of `place` for `system` (for the units, the system's journal
/// moves to `journal-SYSTEM`, so that only the units' file system fails).
fn mount_for(site: &mut Site, system: &str, place: Place, eio: bool) -> Option<Vec<Mount>> {
    let dir = match place {
        Place::Journal => site.path(&format!("run/{system}/journal")),
        Place::Unit => {
            // The journal elsewhere: the units' file system is unmounted to repair it.
            let j = format!("journal-{system}");
            site.edit_config(|c| c.system_mut(system).journal_dir = j);
            site.path(&format!("run/{system}"))
        }
    };
    let first = if eio {
        Mount::ext4(&dir, &site.path(&format!("{system}.ext4")), 64 << 20)
    } else {
        Mount::tmpfs(&dir, 24 << 20)
    };
    Some(vec![mounted(first)?])
}

/// Starts the secondary and the primary, and makes writes 0..4 (slots 0..4) and a flush
/// succeed through the primary's NBD export: the healthy start of the primary cells.
fn start_healthy(site: &Site, port: u16, seed: u64) -> (Procs, Client) {
    let mut procs = Procs::default();
    procs.0.push(("b", site.secondary()));
    procs.0.push(("a", site.primary()));
    wait_tcp(port, &mut procs.0[1].1, PATIENCE);
    let mut c = Client::connect(port, "log");
    for i in 0..4 {
        assert_eq!(write(&mut c, seed, i, i), 0, "write {i} while healthy");
    }
    assert_eq!(flush(&mut c), 0);
    (procs, c)
}

fn primary_enospc(place: Place) {
    let seed = seed();
    let (mut site, port) = Site::with_nbd();
    let Some(mounts) = mount_for(&mut site, "site-a", place, false) else {
        return;
    };
    let (mut procs, mut c) = start_healthy(&site, port, seed);
    let filler = Filler::fill(&mounts[0].dir);
    // New blocks of the unit (or new journal bytes) need space now.
    let mut refused = 0;
    for i in 4..12 {
        filler.top_up();
        match write(&mut c, seed, i, 40 + i) {
            NBD_ENOSPC => refused += 1,
            0 => {}
            e => panic!("write {i} on a full file system: NBD error {e}"),
        }
    }
    assert!(
        refused > 0,
        "no write was refused with NBD_ENOSPC on a full {place:?}"
    );
    let status = status_of(&site, "site-a").expect("status");
    assert!(status["failed"].is_null(), "the primary failed: {status}");
    assert!(
        matches!(procs.0[1].1.try_wait(), Ok(None)),
        "the primary exited on ENOSPC"
    );
    filler.free();
    for i in 12..16 {
        assert_eq!(
            write(&mut c, seed, i, i),
            0,
            "write {i} once space returned"
        );
    }
    assert_eq!(flush(&mut c), 0);
    converged(&site);
    // Acknowledged writes are all there; a refused one is nowhere (its slot was
    // never written before, and no write of it was acknowledged, so either it was
    // acknowledged or the slot is zeros).
    let local = site.path("run/site-a/log.img");
    for i in (0..4).chain(12..16) {
        assert!(
            read_slot(&local, i) == data(seed, i),
            "acknowledged write {i} lost"
        );
    }
    eprintln!("{place:?} ENOSPC: {refused} of 8 writes refused, then converged");
    c.disconnect();
    // A restart reads the journal the rollbacks left as it should: the primary comes
    // back, takes a write and the remote converges again.
    stop(procs.take("a"));
    procs.0.push(("a", site.primary()));
    wait_tcp(port, &mut procs.0[1].1, PATIENCE);
    let mut c = Client::connect(port, "log");
    assert_eq!(write(&mut c, seed, 16, 16), 0, "write after a restart");
    assert_eq!(flush(&mut c), 0);
    converged(&site);
    drop(procs);
    drop(mounts);
}

#[test]
fn primary_journal_enospc() {
    primary_enospc(Place::Journal);
}

#[test]
fn primary_unit_enospc() {
    primary_enospc(Place::Unit);
}

fn primary_eio(place: Place) {
    let seed = seed();
    let (mut site, port) = Site::with_nbd();
    let Some(mut mounts) = mount_for(&mut site, "site-a", place, true) else {
        return;
    };
    let (mut procs, mut c) = start_healthy(&site, port, seed);
    mounts[0].shut_down();
    // The next write that reaches the dead disk fails with EIO; flushes find it at the
    // latest. The primary may meet the dead journal first on its own (a watermark it
    // records as acknowledgements come): it then stops before the client's request is
    // taken, and the request gets ESHUTDOWN or the connection closes unanswered. Never
    // is every request acknowledged.
    let mut got = None;
    for i in 4..8u64 {
        let d = data(seed, i);
        c.request(0, CMD_WRITE, i * BLOCK as u64, BLOCK as u32, &d);
        let e = c.try_reply_error();
        let f = match e {
            Some(0) => {
                c.request(0, CMD_FLUSH, 0, 0, &[]);
                c.try_reply_error()
            }
            _ => e,
        };
        if f != Some(0) {
            got = Some(f);
            break;
        }
    }
    let logs = site.log_tails();
    match got {
        None => panic!("every write and flush on a dead {place:?} was acknowledged; logs:{logs}"),
        Some(Some(NBD_EIO | NBD_ESHUTDOWN) | None) => {}
        Some(Some(e)) => panic!("the reply from a dead {place:?}: error {e}; logs:{logs}"),
    }
    // The primary stops with exit 1 and says why.
    let out = procs.take("a").wait_with_output().expect("wait");
    assert_eq!(out.status.code(), Some(1), "primary exit: {out:?}");
    // It met the failure as an I/O error (in the client's write or in its own record).
    let logs = site.log_tails();
    assert!(
        logs.contains("Input/output error"),
        "no I/O error in the logs:{logs}"
    );
    // Repaired: the primary recovers from its journal and the remote converges.
    mounts[0].repair();
    procs.0.push(("a", site.primary()));
    wait_tcp(port, &mut procs.0[1].1, PATIENCE);
    let mut c = Client::connect(port, "log");
    assert_eq!(write(&mut c, seed, 9, 9), 0, "write after the repair");
    assert_eq!(flush(&mut c), 0);
    converged(&site);
    let local = site.path("run/site-a/log.img");
    for i in (0..4).chain(9..10) {
        assert!(
            read_slot(&local, i) == data(seed, i),
            "acknowledged write {i} lost"
        );
    }
    drop(procs);
    drop(mounts);
}

#[test]
fn primary_journal_eio() {
    primary_eio(Place::Journal);
}

#[test]
fn primary_unit_eio() {
    primary_eio(Place::Unit);
}

// ---- The secondary cells ----

fn secondary_fault(place: Place, eio: bool) {
    let seed = seed();
    let (mut site, port) = Site::with_nbd();
    let metrics = free_tcp_port();
    site.edit_config(|c| c.system_mut("site-b").metrics_port = Some(metrics));
    let Some(mut mounts) = mount_for(&mut site, "site-b", place, eio) else {
        return;
    };
    let mut procs = Procs::default();
    procs.0.push(("b", site.secondary()));
    procs.0.push(("a", site.primary()));
    wait_tcp(port, &mut procs.0[1].1, PATIENCE);
    let mut c = Client::connect(port, "log");
    for i in 0..4 {
        assert_eq!(write(&mut c, seed, i, i), 0, "write {i} while healthy");
    }
    converged(&site);
    let filler = if eio {
        mounts[0].shut_down();
        None
    } else {
        Some(Filler::fill(&mounts[0].dir))
    };
    // The primary goes on: its clients never see the secondary's disk. The metrics
    // (served by the secondary, from memory) say when it failed.
    let mut i = 4;
    wait_until(PATIENCE, || {
        assert_eq!(write(&mut c, seed, i, 40 + i % 20), 0, "primary write {i}");
        i += 1;
        match failed_metric(metrics, "site-b").as_deref() {
            Some("1") => Ok(()),
            other => Err(format!("tidemark_failed: {other:?}")),
        }
    })
    .unwrap_or_else(|e| panic!("{e}; logs:{}", site.log_tails()));
    let want = if eio {
        "Input/output error"
    } else {
        "No space left on device"
    };
    assert!(
        matches!(procs.0[0].1.try_wait(), Ok(None)),
        "the secondary exited"
    );
    // status.json and the control socket live in journal_dir: with the journal's file
    // system dead they cannot be reached (the log and the metrics say it then).
    let status_reachable = !(eio && place == Place::Journal);
    if status_reachable {
        let s = status_after(&site, "site-b");
        let failed = s["failed"]["error"].as_str().unwrap_or_default();
        assert!(failed.contains(want), "status.json failed: {}", s["failed"]);
        let out = run(&["status", "--config", site.cfg(), "--json"]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains(want), "tidemark status: {text}");
    }
    // It never spins: while the primary writes two more statuses and keeps writing,
    // the failure is logged once and nothing more is applied.
    let applied = |s: &serde_json::Value| -> Vec<u64> {
        (0..2)
            .map(|p| s["stats"]["pairs"][p]["applied_seq"].as_u64().unwrap_or(0))
            .collect()
    };
    let before = status_reachable.then(|| applied(&status_of(&site, "site-b").expect("status")));
    for _ in 0..2 {
        status_after(&site, "site-a");
        assert_eq!(write(&mut c, seed, i, 40 + i % 20), 0, "primary write {i}");
        i += 1;
    }
    let log = secondary_log(&site);
    assert_eq!(log.matches("failed; ").count(), 1, "logged once: {log}");
    assert!(log.contains(want), "the log names the error: {log}");
    if let Some(before) = before {
        let after = applied(&status_of(&site, "site-b").expect("status"));
        assert_eq!(before, after, "a failed secondary applied");
    }
    // Repaired (space freed, or the disk remounted): a restart recovers, the primary
    // resyncs what it tracked meanwhile, and the remote converges.
    let out = stop(procs.take("b"));
    assert_eq!(
        out.status.code(),
        Some(1),
        "a failed secondary exits 1: {out:?}"
    );
    match filler {
        Some(f) => f.free(),
        None => mounts[0].repair(),
    }
    // What the failed secondary left is a consistent cut: promote a copy of it
    // (`promote_copy` copies `run/site-b`, which holds the journal in the journal cells;
    // the unit cells have it elsewhere and are promoted in `actors/tests/disk_faults.rs`
    // terms only: their units are completed from the journal on the restart below).
    if place == Place::Journal {
        if let Err(e) = site.promote_copy("copy") {
            panic!("promote of the failed secondary's state: {e}");
        }
    }
    procs.0.push(("b", site.secondary()));
    let e = write(&mut c, seed, 99, 9);
    assert_eq!(e, 0, "write after the repair; logs:{}", site.log_tails());
    converged(&site);
    c.disconnect();
    drop(procs);
    drop(mounts);
}

#[test]
fn secondary_journal_enospc() {
    secondary_fault(Place::Journal, false);
}

#[test]
fn secondary_unit_enospc() {
    secondary_fault(Place::Unit, false);
}

#[test]
fn secondary_journal_eio() {
    secondary_fault(Place::Journal, true);
}

#[test]
fn secondary_unit_eio() {
    secondary_fault(Place::Unit, true);
}
