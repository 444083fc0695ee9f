//! The disk-fault matrix of issue 14, in process and without mounts (so CI exercises
//! every cell even where it cannot mount a file system): {primary, secondary} ×
//! {journal, unit} × {ENOSPC, EIO}. Units are in-memory stores that fail with a chosen
//! errno; journals are real files whose writes, segment creations and fsyncs fail
//! through the journal's fault hook (`tidemark::journal::fault`). The same cells with
//! real daemons on full and failing file systems: `cli/tests/disk_faults.rs`.
//!
//! - Primary, ENOSPC (journal or unit): the write is refused with `NoSpace` (NBD
//!   ENOSPC), nothing of it is anywhere, the engine does not fail, and once space is back
//!   the next writes succeed and the remote converges.
//! - Primary, EIO: the write fails, the engine fails (the process stops).
//! - Secondary, either: the failed part stops, the engine's health names it, waiters are
//!   told, and nothing is retried (the store or journal sees no more operations while
//!   simulated time passes).
//!
//! Actors run on one thread on tokio's paused clock with disk work inline: each test
//! replays exactly (seed 5).

mod common;
mod sim;
use bytes::Bytes;
use std::path::Path;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tidemark::journal::fault::{self, FaultHook, IoOp};
use tidemark::{BlockStore, MemStore, Offset, PairId, StoreError};
use tidemark_actors::{Engine, EngineError, StoreSpec};

const ENOSPC: i32 = 28;
const EIO: i32 = 5;
const SIZE: u64 = 1 << 20;

/// A unit in memory whose writes, flushes and reservations fail with `errno` while it
/// is set (0: healthy), counting every operation that reaches it.
struct FaultyStore {
    inner: MemStore,
    errno: AtomicI32,
    ops: AtomicU64,
}

impl FaultyStore {
    fn new() -> Arc<FaultyStore> {
        Arc::new(FaultyStore {
            inner: MemStore::new(SIZE),
            errno: AtomicI32::new(0),
            ops: AtomicU64::new(0),
        })
    }

    fn fault(&self) -> Result<(), StoreError> {
        self.ops.fetch_add(1, Ordering::SeqCst);
        match self.errno.load(Ordering::SeqCst) {
            0 => Ok(()),
            e => Err(StoreError::Io {
                path: "faulty-store".into(),
                source: std::io::Error::from_raw_os_error(e),
            }),
        }
    }
}

impl BlockStore for FaultyStore {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, offset: Offset, buf: &mut [u8]) -> Result<(), StoreError> {
        self.inner.read_at(offset, buf)
    }
    fn write_at(&self, offset: Offset, data: &[u8]) -> Result<(), StoreError> {
        self.fault()?;
        self.inner.write_at(offset, data)
    }
    fn flush(&self) -> Result<(), StoreError> {
        self.fault()?;
        self.inner.flush()
    }
    /// A sparse file on a full file system refuses the allocation; a failed disk
    /// refuses everything.
    fn reserve(&self, offset: Offset, len: u64) -> Result<(), StoreError> {
        self.fault()?;
        self.inner.reserve(offset, len)
    }
}

/// A journal fault: fails writes and segment creations (ENOSPC), or everything (EIO),
/// with `errno` while it is set, counting every operation it sees.
struct JournalFault {
    errno: Arc<AtomicI32>,
    ops: Arc<AtomicU64>,
    _guard: fault::FaultGuard,
}

impl JournalFault {
    fn on(dir: &Path) -> JournalFault {
        let errno = Arc::new(AtomicI32::new(0));
        let ops = Arc::new(AtomicU64::new(0));
        let hook: FaultHook = {
            let (errno, ops) = (errno.clone(), ops.clone());
            Arc::new(move |op, _: &Path| {
                ops.fetch_add(1, Ordering::SeqCst);
                match errno.load(Ordering::SeqCst) {
                    0 => None,
                    // A full file system refuses allocations; fsyncs of what is written
                    // succeed.
                    ENOSPC if op == IoOp::Sync => None,
                    e => Some(std::io::Error::from_raw_os_error(e)),
                }
            })
        };
        JournalFault {
            errno,
            ops,
            _guard: fault::inject(dir, hook),
        }
    }
    fn set(&self, errno: i32) {
        self.errno.store(errno, Ordering::SeqCst);
    }
}

struct Setup {
    engine: Engine,
    pair: PairId,
}

/// One pair a → b with journals in `dir`; `local`/`remote` are the units.
fn start(dir: &Path, local: StoreSpec, remote: StoreSpec) -> Setup {
    let (mut b, a, r, pair) = common::one_pair(5, "p", SIZE, local, remote);
    common::journals(&mut b, a, r, dir, 8 << 20);
    Setup {
        engine: b.start().expect("start"),
        pair,
    }
}

fn block(v: u8) -> Bytes {
    Bytes::from(vec![v; 4096])
}

fn read(engine: &Engine, pair: PairId, remote: bool) -> Vec<u8> {
    let s = engine.store(pair, remote).expect("pair");
    let mut buf = vec![0u8; SIZE as usize];
    s.read_at(Offset(0), &mut buf).expect("read");
    buf
}

/// The primary cells with ENOSPC: the refused write is nowhere, the engine goes on,
/// later writes replicate. `fill` makes the file system full, `free` frees it.
async fn primary_enospc(s: Setup, fill: impl Fn(), free: impl Fn()) {
    let (e, p) = (&s.engine, s.pair);
    e.write(p, 0, block(1)).await.expect("write while healthy");
    e.write(p, 8192, block(2))
        .await
        .expect("write while healthy");
    fill();
    for _ in 0..3 {
        match e.write(p, 8192, block(9)).await {
            Err(EngineError::NoSpace(m)) => assert!(m.contains("No space"), "{m}"),
            other => panic!("a write on a full file system: {other:?}"),
        }
    }
    assert_eq!(e.failure(), None, "ENOSPC must not fail the primary");
    free();
    e.write(p, 4096, block(3))
        .await
        .expect("write after space returned");
    e.drain().await.expect("the remote converges");
    let (local, remote) = (read(e, p, false), read(e, p, true));
    assert!(local == remote, "remote differs from local");
    assert_eq!(&local[..4096], &[1u8; 4096][..]);
    assert_eq!(&local[4096..8192], &[3u8; 4096][..]);
    // The refused writes are nowhere: the acknowledged block is still there.
    assert_eq!(
        &local[8192..12288],
        &[2u8; 4096][..],
        "a refused write landed"
    );
    assert_eq!(e.failure(), None);
}

#[test]
fn primary_journal_enospc_refuses_the_write_and_goes_on() {
    let dir = tempfile::tempdir().expect("tempdir");
    let f = JournalFault::on(&dir.path().join("ja"));
    sim::run(async {
        let s = start(dir.path(), StoreSpec::Memory, StoreSpec::Memory);
        primary_enospc(s, || f.set(ENOSPC), || f.set(0)).await
    });
}

#[test]
fn primary_unit_enospc_refuses_the_write_and_goes_on() {
    let dir = tempfile::tempdir().expect("tempdir");
    let unit = FaultyStore::new();
    let set = |e| unit.errno.store(e, Ordering::SeqCst);
    sim::run(async {
        let s = start(
            dir.path(),
            StoreSpec::Shared(unit.clone()),
            StoreSpec::Memory,
        );
        primary_enospc(s, || set(ENOSPC), || set(0)).await
    });
}

/// The primary cells with EIO: the write fails, and so does the engine.
async fn primary_eio(s: Setup, fail: impl Fn()) {
    let (e, p) = (&s.engine, s.pair);
    e.write(p, 0, block(1)).await.expect("write while healthy");
    fail();
    let err = e
        .write(p, 4096, block(2))
        .await
        .expect_err("a write on a failed disk");
    assert!(matches!(err, EngineError::Unit(_)), "{err}");
    let failure = e.health().failed().await;
    assert!(failure.component.contains("local unit"), "{failure}");
    assert!(failure.error.contains("Input/output error"), "{failure}");
    let _ = s.engine.shutdown().await;
}

#[test]
fn primary_journal_eio_fails_the_write_and_the_engine() {
    let dir = tempfile::tempdir().expect("tempdir");
    let f = JournalFault::on(&dir.path().join("ja"));
    sim::run(async {
        let s = start(dir.path(), StoreSpec::Memory, StoreSpec::Memory);
        primary_eio(s, || f.set(EIO)).await
    });
}

#[test]
fn primary_unit_eio_fails_the_write_and_the_engine() {
    let dir = tempfile::tempdir().expect("tempdir");
    let unit = FaultyStore::new();
    sim::run(async {
        let s = start(
            dir.path(),
            StoreSpec::Shared(unit.clone()),
            StoreSpec::Memory,
        );
        primary_eio(s, || unit.errno.store(EIO, Ordering::SeqCst)).await
    });
}

/// The secondary cells: the failed part stops once, says so, and retries nothing:
/// `ops` (operations reaching the failed disk) does not move while 30 simulated seconds
/// pass with the primary still sending.
async fn secondary_stops(s: Setup, fail: impl Fn(), ops: impl Fn() -> u64, errno: i32) {
    let (e, p) = (&s.engine, s.pair);
    e.write(p, 0, block(1)).await.expect("write while healthy");
    e.drain().await.expect("drain while healthy");
    fail();
    e.write(p, 4096, block(2))
        .await
        .expect("the primary takes the write");
    assert!(e.drain().await.is_err(), "drain over a failed secondary");
    let failure = e.health().failed().await;
    assert!(failure.component.contains("remote"), "{failure}");
    let text = std::io::Error::from_raw_os_error(errno).to_string();
    assert!(failure.error.contains(&text), "{failure} lacks {text}");
    // What was under way when it failed may still reach the disk; then nothing more.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = ops();
    for i in 0..30u8 {
        let _ = e.write(p, 8192, block(i)).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert_eq!(ops(), before, "the failed secondary retried ({failure})");
    // The remote unit still holds only what was applied before the failure.
    let remote = read(e, p, true);
    assert_eq!(&remote[..4096], &[1u8; 4096][..]);
    assert_eq!(
        &remote[8192..12288],
        &[0u8; 4096][..],
        "applied after failing"
    );
    let _ = s.engine.shutdown().await;
}

fn secondary_journal(errno: i32) {
    let dir = tempfile::tempdir().expect("tempdir");
    let f = JournalFault::on(&dir.path().join("jb"));
    let ops = f.ops.clone();
    sim::run(async {
        let s = start(dir.path(), StoreSpec::Memory, StoreSpec::Memory);
        secondary_stops(
            s,
            || f.set(errno),
            move || ops.load(Ordering::SeqCst),
            errno,
        )
        .await
    });
}

fn secondary_unit(errno: i32) {
    let dir = tempfile::tempdir().expect("tempdir");
    let unit = FaultyStore::new();
    let u = unit.clone();
    sim::run(async {
        let s = start(
            dir.path(),
            StoreSpec::Memory,
            StoreSpec::Shared(unit.clone()),
        );
        let fail = || unit.errno.store(errno, Ordering::SeqCst);
        secondary_stops(s, fail, move || u.ops.load(Ordering::SeqCst), errno).await
    });
}

#[test]
fn secondary_journal_enospc_stops_once() {
    secondary_journal(ENOSPC);
}

#[test]
fn secondary_journal_eio_stops_once() {
    secondary_journal(EIO);
}

#[test]
fn secondary_unit_enospc_stops_once() {
    secondary_unit(ENOSPC);
}

#[test]
fn secondary_unit_eio_stops_once() {
    secondary_unit(EIO);
}
