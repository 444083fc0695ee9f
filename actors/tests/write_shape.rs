//! A primary writes its local unit in the shape its client wrote: one write call per
//! client write, never adjacent writes of a batch merged into one vectored write. The
//! page cache sizes a file's folios by the write that creates them, and a later small
//! write into a large folio costs in proportion to the folio (ext4 walks every block of
//! it): merging 1 MiB writes into 2 MiB made every later 4 KiB random write on the
//! primary cost about twice the kernel time (docs/benchmarks.md, "Cause of the
//! random-write regression").
//!
//! Actors run on one thread on tokio's paused clock (seed 5).

mod common;
mod sim;
use bytes::Bytes;
use std::sync::{Arc, Mutex};
use tidemark::{BlockStore, MemStore, Offset, Payload, StoreError};
use tidemark_actors::StoreSpec;

const SIZE: u64 = 1 << 20;
const BLOCK: usize = 4096;

/// What reached the store, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Op {
    Reserve(u64),
    Write(u64, usize),
    /// A vectored write: its offset and the length of each piece.
    Vectored(u64, Vec<usize>),
}

/// A unit in memory that records every reservation and write.
struct RecordingStore {
    inner: MemStore,
    log: Mutex<Vec<Op>>,
}

impl RecordingStore {
    fn record(&self, op: Op) {
        if let Ok(mut l) = self.log.lock() {
            l.push(op);
        }
    }
    fn ops(&self) -> Vec<Op> {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }
}

impl BlockStore for RecordingStore {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, offset: Offset, buf: &mut [u8]) -> Result<(), StoreError> {
        self.inner.read_at(offset, buf)
    }
    fn write_at(&self, offset: Offset, data: &[u8]) -> Result<(), StoreError> {
        self.record(Op::Write(offset.0, data.len()));
        self.inner.write_at(offset, data)
    }
    fn write_vectored_at(&self, offset: Offset, pieces: &[&[u8]]) -> Result<(), StoreError> {
        self.record(Op::Vectored(
            offset.0,
            pieces.iter().map(|p| p.len()).collect(),
        ));
        self.inner.write_vectored_at(offset, pieces)
    }
    fn flush(&self) -> Result<(), StoreError> {
        self.inner.flush()
    }
    fn reserve(&self, offset: Offset, len: u64) -> Result<(), StoreError> {
        self.record(Op::Reserve(offset.0));
        self.inner.reserve(offset, len)
    }
}

#[test]
fn adjacent_writes_of_one_batch_reach_the_unit_one_by_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let unit = Arc::new(RecordingStore {
        inner: MemStore::new(SIZE),
        log: Mutex::new(Vec::new()),
    });
    let u = unit.clone();
    sim::run(async move {
        let (mut b, a, r, pair) =
            common::one_pair(5, "p", SIZE, StoreSpec::Shared(u), StoreSpec::Memory);
        common::journals(&mut b, a, r, dir.path(), 8 << 20);
        let e = b.start().expect("start");
        // Eight adjacent writes in one call (one batch), then eight more in flight at
        // once.
        let adjacent: Vec<Payload> = (0..8u8)
            .map(|i| Payload::Write {
                offset: Offset(i as u64 * BLOCK as u64),
                data: Bytes::from(vec![i; BLOCK]),
            })
            .collect();
        e.write_many(pair, adjacent).await.expect("writes");
        let w = |i: u8| e.write(pair, i as u64 * BLOCK as u64, Bytes::from(vec![i; BLOCK]));
        let r = tokio::join!(w(0), w(1), w(2), w(3), w(4), w(5), w(6), w(7));
        for x in [r.0, r.1, r.2, r.3, r.4, r.5, r.6, r.7] {
            x.expect("write");
        }
        e.drain().await.expect("the remote converges");
        let mut remote = vec![0u8; SIZE as usize];
        e.store(pair, true)
            .expect("pair")
            .read_at(Offset(0), &mut remote)
            .expect("read");
        for i in 0..8u8 {
            let at = i as usize * BLOCK;
            assert_eq!(&remote[at..at + BLOCK], &[i; BLOCK][..], "block {i}");
        }
    });
    let ops = unit.ops();
    let writes: Vec<&Op> = ops
        .iter()
        .filter(|o| !matches!(o, Op::Reserve(_)))
        .collect();
    assert_eq!(writes.len(), 16, "one write call per client write: {ops:?}");
    for o in &writes {
        match o {
            Op::Write(_, len) => assert_eq!(*len, BLOCK, "{ops:?}"),
            Op::Vectored(_, pieces) => assert_eq!(pieces, &vec![BLOCK], "{ops:?}"),
            Op::Reserve(_) => {}
        }
    }
    // Not vacuous: some batch held several adjacent writes (a batch reserves space for
    // all of its writes before it writes any).
    let batched = ops
        .windows(2)
        .any(|w| matches!(w, [Op::Reserve(x), Op::Reserve(y)] if *y == *x + BLOCK as u64));
    assert!(batched, "no batch of adjacent writes: {ops:?}");
}
