//! The NBD front end of the `tidemark primary` daemon, with real processes on loopback:
//! a secondary and a primary serving its units at `nbd_listen`.
//!
//! - Dependent writes (each issued after the previous reply) go alternately to the two
//!   exports from a small raw NBD client while the secondary is killed with SIGKILL and
//!   restarted at seeded random points; after every kill, `promote` on a copy of the
//!   secondary's state must give a consistent cut (invariant I1) across both exports: a
//!   global prefix of the write sequence, holding exactly the bytes of that prefix. At
//!   the end the remote units equal the local units, and both equal the replay of every
//!   write.
//! - fio (`--ioengine=nbd`) random writes with verify at queue depth 16 against the
//!   daemon; the remote units equal the local units once the secondary applied
//!   everything.
//!
//! The seed is printed; `TIDEMARK_SEED=<n>` replays one. A test that needs a client
//! program skips (printing SKIPPED) if it is not installed.

mod common;
use common::*;
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tidemark::nbd::consts::*;
use tidemark::PairId;

fn seed() -> u64 {
    std::env::var("TIDEMARK_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20261201)
}

/// The exports of [`Site`]'s config, in pair order, and their sizes.
const EXPORTS: [(&str, u64); 2] = [("log", 4 << 20), ("data", 8 << 20)];

/// Generous bounds against a hung test; never a measurement.
const PATIENCE: Duration = Duration::from_secs(120);

// ---------------------------------------------------------------------------------
// The write sequence: a pure function of (seed, index), so any prefix can be replayed.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// NBD_CMD_WRITE, with NBD_CMD_FLAG_FUA if `fua`.
    Write { fua: bool },
    /// NBD_CMD_WRITE_ZEROES.
    Zeroes,
    /// NBD_CMD_TRIM (the engine replicates it as zeroes, in order).
    Trim,
}

#[derive(Clone, Copy, Debug)]
struct Op {
    export: usize,
    offset: u64,
    len: u32,
    kind: Kind,
    /// Send NBD_CMD_FLUSH after this op's reply (not a write: no sequence number).
    flush_after: bool,
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The writes in order. Exports alternate; with a chance of 1 in 4 the next write stays
/// on the same export, so both orders of neighbouring writes occur.
fn ops(seed: u64, n: usize) -> Vec<Op> {
    let mut rng = rand_pcg::Pcg64::seed_from_u64(seed ^ 0x006e_6264_5f6f_7073);
    let mut export = rng.random_range(0..EXPORTS.len());
    (0..n)
        .map(|_| {
            if rng.random_range(0..4) != 0 {
                export = (export + 1) % EXPORTS.len();
            }
            let size = EXPORTS[export].1;
            // Odd lengths and offsets, mostly small, sometimes up to 128 KiB.
            let len: u32 = if rng.random_range(0..8) == 0 {
                rng.random_range(1..=128 << 10)
            } else {
                rng.random_range(1..=8 << 10)
            };
            let offset = rng.random_range(0..=size - u64::from(len));
            let kind = match rng.random_range(0..20) {
                0 | 1 => Kind::Zeroes,
                2 => Kind::Trim,
                3 | 4 => Kind::Write { fua: true },
                _ => Kind::Write { fua: false },
            };
            Op {
                export,
                offset,
                len,
                kind,
                flush_after: rng.random_range(0..25) == 0,
            }
        })
        .collect()
}

/// The bytes write `i` carries (zeroes for write-zeroes and trim).
fn payload(seed: u64, i: usize, op: &Op) -> Vec<u8> {
    if op.kind != (Kind::Write { fua: true }) && op.kind != (Kind::Write { fua: false }) {
        return vec![0; op.len as usize];
    }
    let base = splitmix(seed ^ splitmix(i as u64));
    let mut v = Vec::with_capacity(op.len as usize + 8);
    let mut w = 0u64;
    while v.len() < op.len as usize {
        v.extend(splitmix(base.wrapping_add(w)).to_le_bytes());
        w += 1;
    }
    v.truncate(op.len as usize);
    v
}

/// The image of every export after the first `counts[e]` writes to export `e`.
fn replay(seed: u64, ops: &[Op], counts: &[u64]) -> Vec<Vec<u8>> {
    let mut images: Vec<Vec<u8>> = EXPORTS.iter().map(|(_, s)| vec![0; *s as usize]).collect();
    let mut seen = vec![0u64; EXPORTS.len()];
    for (i, op) in ops.iter().enumerate() {
        seen[op.export] += 1;
        if seen[op.export] <= counts[op.export] {
            let at = op.offset as usize;
            images[op.export][at..at + op.len as usize].copy_from_slice(&payload(seed, i, op));
        }
    }
    images
}

/// Writes per export among `ops`.
fn counts(ops: &[Op]) -> Vec<u64> {
    let mut c = vec![0u64; EXPORTS.len()];
    for op in ops {
        c[op.export] += 1;
    }
    c
}

/// Checks that promoted units holding `applied[e]` writes of export `e` are a cut of
/// `ops` (a global prefix: writes `0..k`) and hold exactly its bytes; returns `k`.
fn check_cut(seed: u64, ops: &[Op], applied: &[u64], images: &[PathBuf]) -> Result<usize, String> {
    let total = counts(ops);
    for e in 0..EXPORTS.len() {
        if applied[e] > total[e] {
            return Err(format!(
                "export {}: {} writes applied, only {} were sent",
                EXPORTS[e].0, applied[e], total[e]
            ));
        }
    }
    let mut seen = vec![0u64; EXPORTS.len()];
    let mut last_in = None;
    let mut first_out = None;
    for (i, op) in ops.iter().enumerate() {
        seen[op.export] += 1;
        if seen[op.export] <= applied[op.export] {
            last_in = Some(i);
        } else if first_out.is_none() {
            first_out = Some(i);
        }
    }
    if let (Some(a), Some(b)) = (last_in, first_out) {
        if a > b {
            return Err(format!(
                "not a cut: write {a} ({:?}) is applied but the earlier write {b} ({:?}) \
                 is not; applied per export {applied:?}",
                ops[a], ops[b]
            ));
        }
    }
    let want = replay(seed, ops, applied);
    for (e, image) in images.iter().enumerate() {
        let got = std::fs::read(image).map_err(|e| format!("{}: {e}", image.display()))?;
        if let Some(at) = first_difference(&got, &want[e]) {
            return Err(format!(
                "export {}: {} does not hold exactly its first {} writes (first difference \
                 at byte {at})",
                EXPORTS[e].0,
                image.display(),
                applied[e]
            ));
        }
    }
    Ok(last_in.map_or(0, |a| a + 1))
}

fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    if a.len() != b.len() {
        return Some(a.len().min(b.len()));
    }
    a.iter().zip(b).position(|(x, y)| x != y)
}

// ---------------------------------------------------------------------------------
// A minimal NBD client: fixed newstyle, NBD_OPT_GO, simple replies, one request in
// flight.

struct Client {
    s: TcpStream,
    cookie: u64,
}

impl Client {
    fn connect(port: u16, export: &str) -> Client {
        let s = TcpStream::connect(("127.0.0.1", port)).expect("connect to the NBD server");
        // A safety net against a hung test, not a synchronisation.
        s.set_read_timeout(Some(PATIENCE)).expect("timeout");
        s.set_nodelay(true).expect("nodelay");
        let mut c = Client { s, cookie: 0 };
        let g = c.read(18);
        assert_eq!(g[..8], NBDMAGIC.to_be_bytes(), "greeting");
        assert_eq!(g[8..16], IHAVEOPT.to_be_bytes(), "newstyle greeting");
        c.send(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes());
        let mut data = (export.len() as u32).to_be_bytes().to_vec();
        data.extend(export.as_bytes());
        data.extend(0u16.to_be_bytes());
        let mut opt = IHAVEOPT.to_be_bytes().to_vec();
        opt.extend(OPT_GO.to_be_bytes());
        opt.extend((data.len() as u32).to_be_bytes());
        opt.extend(data);
        c.send(&opt);
        let mut size = None;
        loop {
            assert_eq!(c.u64(), OPTION_REPLY_MAGIC);
            assert_eq!(c.u32(), OPT_GO);
            let kind = c.u32();
            let len = c.u32() as usize;
            let body = c.read(len);
            assert!(
                kind & REP_FLAG_ERROR == 0,
                "NBD_OPT_GO {export}: error {kind:#x}"
            );
            if kind == REP_INFO && body[..2] == INFO_EXPORT.to_be_bytes() {
                size = Some(u64::from_be_bytes(body[2..10].try_into().expect("size")));
            }
            if kind == REP_ACK {
                break;
            }
        }
        let want = EXPORTS.iter().find(|(n, _)| *n == export).map(|x| x.1);
        assert_eq!(size, want, "the size of export {export}");
        c
    }

    fn send(&mut self, b: &[u8]) {
        self.s.write_all(b).expect("send to the NBD server");
    }

    fn read(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        self.s.read_exact(&mut v).expect("read from the NBD server");
        v
    }

    fn u32(&mut self) -> u32 {
        u32::from_be_bytes(self.read(4).try_into().expect("4 bytes"))
    }

    fn u64(&mut self) -> u64 {
        u64::from_be_bytes(self.read(8).try_into().expect("8 bytes"))
    }

    fn request(&mut self, flags: u16, kind: u16, offset: u64, len: u32, data: &[u8]) {
        self.cookie += 1;
        let mut v = Vec::with_capacity(REQUEST_HEADER_LEN + data.len());
        v.extend(REQUEST_MAGIC.to_be_bytes());
        v.extend(flags.to_be_bytes());
        v.extend(kind.to_be_bytes());
        v.extend(self.cookie.to_be_bytes());
        v.extend(offset.to_be_bytes());
        v.extend(len.to_be_bytes());
        v.extend(data);
        self.send(&v);
    }

    /// Waits for the reply to the last request; it must be a success.
    fn reply(&mut self, what: &str) {
        assert_eq!(self.u32(), SIMPLE_REPLY_MAGIC, "{what}: a simple reply");
        let error = self.u32();
        let cookie = self.u64();
        assert_eq!(
            cookie, self.cookie,
            "{what}: the reply to the request in flight"
        );
        assert_eq!(error, 0, "{what}: NBD error {error}");
    }

    fn disconnect(mut self) {
        self.request(0, CMD_DISC, 0, 0, &[]);
    }
}

/// Sends `ops` from the start in order, each after the previous reply, until `stop` is
/// set and at least `min` were sent (or all of `ops` were). `sent` counts the writes
/// put on the wire (a write is sent before it can be applied anywhere). Returns the
/// number of writes completed.
fn dependent_writer(
    port: u16,
    seed: u64,
    ops: Arc<Vec<Op>>,
    min: usize,
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicUsize>,
) -> usize {
    let mut clients: Vec<Client> = EXPORTS
        .iter()
        .map(|(n, _)| Client::connect(port, n))
        .collect();
    let mut done = 0;
    for (i, op) in ops.iter().enumerate() {
        if i >= min && stop.load(Ordering::SeqCst) {
            break;
        }
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
        c.reply(&format!("write {i} {op:?}"));
        if op.flush_after {
            c.request(0, CMD_FLUSH, 0, 0, &[]);
            c.reply(&format!("flush after write {i}"));
        }
        done = i + 1;
    }
    for c in clients {
        c.disconnect();
    }
    done
}

fn written_seq(status: &serde_json::Value) -> Vec<u64> {
    (0..EXPORTS.len())
        .map(|i| {
            status["stats"]["pairs"][i]["written_seq"]
                .as_u64()
                .unwrap_or(0)
        })
        .collect()
}

fn as_want(counts: &[u64]) -> BTreeMap<PairId, u64> {
    counts
        .iter()
        .enumerate()
        .map(|(i, n)| (PairId(i as u32), *n))
        .collect()
}

/// The daemons of a test; those still held are killed when it ends, so a failed
/// assertion leaves no process behind.
struct Daemons {
    primary: Option<Child>,
    secondary: Option<Child>,
}

impl Daemons {
    /// Starts the secondary, then the primary, and waits (bounded) for its NBD port.
    fn start(site: &Site, port: u16) -> Daemons {
        let secondary = Some(site.secondary());
        let mut primary = site.primary();
        wait_tcp(port, &mut primary, PATIENCE);
        Daemons {
            primary: Some(primary),
            secondary,
        }
    }

    /// SIGTERM to both, the primary first; both must exit 0.
    fn stop_both(mut self) {
        for (name, child) in [
            ("the primary", self.primary.take()),
            ("the secondary", self.secondary.take()),
        ] {
            let out = stop(child.expect("running"));
            assert!(
                out.status.success(),
                "{name} did not stop cleanly ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

impl Drop for Daemons {
    fn drop(&mut self) {
        for child in [self.primary.take(), self.secondary.take()]
            .into_iter()
            .flatten()
        {
            kill9(child);
        }
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
    let mut rng = rand_pcg::Pcg64::seed_from_u64(seed ^ 0x6b696c6c);
    let (site, port) = Site::with_nbd();
    // Enough writes that the writer is still busy when the kills end; it stops early
    // once they have and `MIN` writes were sent.
    const MAX: usize = 40_000;
    const MIN: usize = 1_500;
    let plan = Arc::new(ops(seed, MAX));
    let mut daemons = Daemons::start(&site, port);
    let halt = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicUsize::new(0));
    let writer = {
        let (plan, halt, sent) = (plan.clone(), halt.clone(), sent.clone());
        std::thread::spawn(move || dependent_writer(port, seed, plan, MIN, halt, sent))
    };
    let mut cuts = Vec::new();
    for k in 0..4 {
        // A random crash point: fault injection, not synchronisation.
        std::thread::sleep(Duration::from_millis(rng.random_range(150..900)));
        kill9(daemons.secondary.take().expect("the secondary runs"));
        let result = site.promote_copy(&format!("copy{k}"));
        // Every write the promoted units can hold was sent before this load.
        let bound = sent.load(Ordering::SeqCst);
        let (applied, images) = result.unwrap_or_else(|e| panic!("seed {seed}, kill {k}: {e}"));
        let cut = check_cut(seed, &plan[..bound], &applied, &images)
            .unwrap_or_else(|e| panic!("seed {seed}, kill {k}: {e}"));
        eprintln!("kill {k}: {bound} writes sent, promote gives the cut of the first {cut} ({applied:?} per export)");
        cuts.push(cut);
        daemons.secondary = Some(site.secondary());
    }
    halt.store(true, Ordering::SeqCst);
    let n = writer.join().expect("the writer thread");
    let done = &plan[..n];
    let want = counts(done);
    eprintln!("{n} dependent writes in all, {want:?} per export");
    // The primary stamped exactly one sequence number per write.
    let status = site.status_after("site-a", SystemTime::now(), PATIENCE);
    assert_eq!(
        written_seq(&status),
        want,
        "seed {seed}: the primary's written_seq per pair"
    );
    site.wait_applied("site-b", &as_want(&want), PATIENCE);
    daemons.stop_both();
    assert_local_equals_remote(&site, seed);
    let expected = replay(seed, done, &want);
    for (e, (name, _)) in EXPORTS.iter().enumerate() {
        let local = std::fs::read(site.path(&format!("run/site-a/{name}.img"))).expect("local");
        if let Some(at) = first_difference(&local, &expected[e]) {
            panic!("seed {seed}: {name}: the local unit differs from the replay at byte {at}");
        }
    }
    eprintln!("cuts after each kill (writes applied): {cuts:?}");
    assert!(
        cuts.windows(2).all(|w| w[0] <= w[1]),
        "seed {seed}: the cut went backwards: {cuts:?}"
    );
}

/// Whether `program` runs; if not, says so (the test then skips).
fn have(program: &str) -> bool {
    let ok = Command::new(program)
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !ok {
        eprintln!(
            "SKIPPED: {program} is not installed (apt-get install -y qemu-utils libnbd-bin fio)"
        );
    }
    ok
}

#[test]
fn fio_random_writes_with_verify_at_qd16_against_the_daemon_replicate() {
    if !have("fio") {
        return;
    }
    let seed = seed();
    eprintln!("nbd daemon fio test seed {seed} (TIDEMARK_SEED={seed} to replay)");
    let (site, port) = Site::with_nbd();
    let daemons = Daemons::start(&site, port);
    let mut fio_writes = vec![0u64; EXPORTS.len()];
    for (e, (name, size)) in EXPORTS.iter().enumerate() {
        let out = Command::new("fio")
            .args([
                "--name=randwrite-verify",
                "--ioengine=nbd",
                &format!("--uri=nbd://127.0.0.1:{port}/{name}"),
                "--rw=randwrite",
                "--bs=4k",
                "--iodepth=16",
                &format!("--size={size}"),
                "--verify=crc32c",
                "--do_verify=1",
                "--verify_fatal=1",
                "--verify_state_save=0",
                &format!("--randseed={seed}"),
                "--output-format=json",
            ])
            .output()
            .expect("run fio");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "fio on {name} failed ({}):\n{text}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        // fio may print notes before its JSON.
        let json = text.find('{').map(|i| &text[i..]).unwrap_or(&text);
        let v: serde_json::Value =
            serde_json::from_str(json).unwrap_or_else(|e| panic!("fio JSON: {e}: {text}"));
        let job = &v["jobs"][0];
        assert_eq!(job["error"].as_i64(), Some(0), "{job}");
        assert_eq!(job["write"]["io_bytes"].as_u64(), Some(*size), "{job}");
        assert_eq!(
            job["read"]["io_bytes"].as_u64(),
            Some(*size),
            "verified: {job}"
        );
        fio_writes[e] = job["write"]["total_ios"].as_u64().unwrap_or(0);
    }
    // Everything fio wrote is in the primary's status written after fio ended: one
    // sequence number per NBD write (fio's verify reads are not writes).
    let status = site.status_after("site-a", SystemTime::now(), PATIENCE);
    let written = written_seq(&status);
    assert_eq!(written, fio_writes, "the primary's written_seq per pair");
    eprintln!("fio writes per export {fio_writes:?}; primary written_seq {written:?}");
    site.wait_applied("site-b", &as_want(&written), PATIENCE);
    daemons.stop_both();
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
