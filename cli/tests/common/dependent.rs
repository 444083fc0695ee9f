//! Dependent NBD writes over two exports, as a pure function of a seed, and the check
//! that promoted units hold a cut of them (a global prefix, byte for byte). Shared by
//! the NBD daemon tests and the multi-primary tests.
#![allow(dead_code)]

use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tidemark::nbd::consts::*;
use tidemark::PairId;

/// Generous bounds against a hung test; never a measurement.
pub const PATIENCE: Duration = Duration::from_secs(120);

/// The exports of the test site's config, in pair order, and their sizes.
pub const EXPORTS: [(&str, u64); 2] = [("log", 4 << 20), ("data", 8 << 20)];

// ---------------------------------------------------------------------------------
// The write sequence: a pure function of (seed, index), so any prefix can be replayed.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// NBD_CMD_WRITE, with NBD_CMD_FLAG_FUA if `fua`.
    Write { fua: bool },
    /// NBD_CMD_WRITE_ZEROES.
    Zeroes,
    /// NBD_CMD_TRIM (the engine replicates it as zeroes, in order).
    Trim,
}

#[derive(Clone, Copy, Debug)]
pub struct Op {
    pub export: usize,
    pub offset: u64,
    pub len: u32,
    pub kind: Kind,
    /// Send NBD_CMD_FLUSH after this op's reply (not a write: no sequence number).
    pub flush_after: bool,
}

pub fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The writes in order. Exports alternate; with a chance of 1 in 4 the next write stays
/// on the same export, so both orders of neighbouring writes occur.
pub fn ops(seed: u64, n: usize) -> Vec<Op> {
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
pub fn payload(seed: u64, i: usize, op: &Op) -> Vec<u8> {
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
pub fn replay(seed: u64, ops: &[Op], counts: &[u64]) -> Vec<Vec<u8>> {
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
pub fn counts(ops: &[Op]) -> Vec<u64> {
    let mut c = vec![0u64; EXPORTS.len()];
    for op in ops {
        c[op.export] += 1;
    }
    c
}

/// Checks that promoted units holding `applied[e]` writes of export `e` are a cut of
/// `ops` (a global prefix: writes `0..k`) and hold exactly its bytes; returns `k`.
pub fn check_cut(
    seed: u64,
    ops: &[Op],
    applied: &[u64],
    images: &[PathBuf],
) -> Result<usize, String> {
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

pub fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    if a.len() != b.len() {
        return Some(a.len().min(b.len()));
    }
    a.iter().zip(b).position(|(x, y)| x != y)
}

// ---------------------------------------------------------------------------------
// A minimal NBD client: fixed newstyle, NBD_OPT_GO, simple replies, one request in
// flight.

pub struct Client {
    s: TcpStream,
    cookie: u64,
}

impl Client {
    /// Connects to `export`, one of [`EXPORTS`] (its size is checked).
    pub fn connect(port: u16, export: &str) -> Client {
        let size = EXPORTS
            .iter()
            .find(|(n, _)| *n == export)
            .map(|x| x.1)
            .unwrap_or_else(|| panic!("{export} is not one of {EXPORTS:?}"));
        Client::connect_sized(port, export, size)
    }

    /// Connects to `export`, which the server must announce as `want` bytes.
    pub fn connect_sized(port: u16, export: &str, want: u64) -> Client {
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
        assert_eq!(size, Some(want), "the size of export {export}");
        c
    }

    /// The connection, to look at it without the client's framing.
    pub fn stream(&self) -> &TcpStream {
        &self.s
    }

    pub fn send(&mut self, b: &[u8]) {
        self.s.write_all(b).expect("send to the NBD server");
    }

    pub fn read(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        self.s.read_exact(&mut v).expect("read from the NBD server");
        v
    }

    pub fn u32(&mut self) -> u32 {
        u32::from_be_bytes(self.read(4).try_into().expect("4 bytes"))
    }

    pub fn u64(&mut self) -> u64 {
        u64::from_be_bytes(self.read(8).try_into().expect("8 bytes"))
    }

    pub fn request(&mut self, flags: u16, kind: u16, offset: u64, len: u32, data: &[u8]) {
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

    /// The NBD error of the reply to the last request, or `None` if the server closed
    /// the connection instead of answering (it stopped).
    pub fn try_reply_error(&mut self) -> Option<u32> {
        let mut head = [0u8; 16];
        self.s.read_exact(&mut head).ok()?;
        assert_eq!(
            head[..4],
            SIMPLE_REPLY_MAGIC.to_be_bytes(),
            "a simple reply"
        );
        assert_eq!(head[8..], self.cookie.to_be_bytes(), "the reply in flight");
        Some(u32::from_be_bytes(head[4..8].try_into().ok()?))
    }

    /// Waits for the reply to the last request and returns its NBD error (0: success).
    pub fn reply_error(&mut self, what: &str) -> u32 {
        assert_eq!(self.u32(), SIMPLE_REPLY_MAGIC, "{what}: a simple reply");
        let error = self.u32();
        let cookie = self.u64();
        assert_eq!(
            cookie, self.cookie,
            "{what}: the reply to the request in flight"
        );
        error
    }

    /// Waits for the reply to the last request; it must be a success.
    pub fn reply(&mut self, what: &str) {
        assert_eq!(self.u32(), SIMPLE_REPLY_MAGIC, "{what}: a simple reply");
        let error = self.u32();
        let cookie = self.u64();
        assert_eq!(
            cookie, self.cookie,
            "{what}: the reply to the request in flight"
        );
        assert_eq!(error, 0, "{what}: NBD error {error}");
    }

    /// Waits for the reply to the last request: `Err(code)` for an NBD error.
    pub fn try_reply(&mut self, what: &str) -> Result<(), u32> {
        assert_eq!(self.u32(), SIMPLE_REPLY_MAGIC, "{what}: a simple reply");
        let error = self.u32();
        let cookie = self.u64();
        assert_eq!(
            cookie, self.cookie,
            "{what}: the reply to the request in flight"
        );
        if error == 0 {
            Ok(())
        } else {
            Err(error)
        }
    }

    pub fn disconnect(mut self) {
        self.request(0, CMD_DISC, 0, 0, &[]);
    }
}

/// Sends `ops` from the start in order, each after the previous reply, until `stop` is
/// set and at least `min` were sent (or all of `ops` were). `sent` counts the writes
/// put on the wire (a write is sent before it can be applied anywhere). Returns the
/// number of writes completed.
pub fn dependent_writer(
    ports: &[u16],
    seed: u64,
    ops: Arc<Vec<Op>>,
    min: usize,
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicUsize>,
) -> usize {
    let mut clients: Vec<Client> = EXPORTS
        .iter()
        .zip(ports)
        .map(|((n, _), port)| Client::connect(*port, n))
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

pub fn written_seq(status: &serde_json::Value) -> Vec<u64> {
    (0..EXPORTS.len())
        .map(|i| {
            status["stats"]["pairs"][i]["written_seq"]
                .as_u64()
                .unwrap_or(0)
        })
        .collect()
}

pub fn as_want(counts: &[u64]) -> BTreeMap<PairId, u64> {
    counts
        .iter()
        .enumerate()
        .map(|(i, n)| (PairId(i as u32), *n))
        .collect()
}

/// What [`writes_through_crashes`] saw.
pub struct CrashRun {
    /// The planned writes; the first `done` of them were completed.
    pub plan: Arc<Vec<Op>>,
    pub done: usize,
    /// After each crash, the length of the prefix the promoted units held.
    pub cuts: Vec<usize>,
}

/// Dependent writes go to `ports` (one NBD server port per export) in the background
/// while `crash(k)` runs `rounds` times. Each crash comes at an observed point plus a
/// seeded random delay (fault injection after the event, not synchronisation): once the
/// remote systems whose journal directories are `remotes` (those `crash` kills and
/// restarts) are seen receiving writes (see [`super::wait_receiving`]), or the writer
/// has finished. `crash` kills what it kills, promotes a copy of the remote state
/// and returns each export's `applied_seq` and the promoted images (and restarts what
/// it killed). Every promote must be a cut of the writes sent so far, byte for byte,
/// and cuts never go backwards; a failure names the seed. The writer stops once the
/// crashes are over and `min` writes were sent (at most `max`).
pub fn writes_through_crashes(
    seed: u64,
    ports: [u16; 2],
    (min, max): (usize, usize),
    rounds: usize,
    remotes: &[PathBuf],
    mut crash: impl FnMut(usize) -> Result<(Vec<u64>, Vec<PathBuf>), String>,
) -> CrashRun {
    let mut rng = rand_pcg::Pcg64::seed_from_u64(seed ^ 0x6b69_6c6c);
    let plan = Arc::new(ops(seed, max));
    let halt = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicUsize::new(0));
    let writer = {
        let (plan, halt, sent) = (plan.clone(), halt.clone(), sent.clone());
        std::thread::spawn(move || dependent_writer(&ports, seed, plan, min, halt, sent))
    };
    let mut cuts = Vec::new();
    // The remotes running now started before the test called this: any status counts.
    let mut since = SystemTime::UNIX_EPOCH;
    for k in 0..rounds {
        let receiving = super::wait_receiving(remotes, since, PATIENCE, || writer.is_finished())
            .unwrap_or_else(|e| {
                panic!(
                    "seed {seed}, crash {k}: {e}; {} writes sent",
                    sent.load(Ordering::SeqCst)
                )
            });
        let extra = rng.random_range(0..500);
        eprintln!(
            "crash {k}: {} ms after {}",
            extra,
            if receiving {
                "the remote was seen receiving"
            } else {
                "the writer finished"
            }
        );
        std::thread::sleep(Duration::from_millis(extra));
        let result = crash(k);
        // What `crash` restarted writes its statuses after this.
        since = SystemTime::now();
        // Every write the promoted units can hold was sent before this load.
        let bound = sent.load(Ordering::SeqCst);
        let (applied, images) = result.unwrap_or_else(|e| panic!("seed {seed}, crash {k}: {e}"));
        let cut = check_cut(seed, &plan[..bound], &applied, &images)
            .unwrap_or_else(|e| panic!("seed {seed}, crash {k}: {e}"));
        eprintln!("crash {k}: {bound} writes sent, promote gives the cut of the first {cut} ({applied:?} per export)");
        cuts.push(cut);
    }
    halt.store(true, Ordering::SeqCst);
    let done = writer.join().expect("the writer thread");
    eprintln!("{done} dependent writes; cuts after each crash: {cuts:?}");
    assert!(
        cuts.windows(2).all(|w| w[0] <= w[1]),
        "seed {seed}: the cut went backwards: {cuts:?}"
    );
    CrashRun { plan, done, cuts }
}
