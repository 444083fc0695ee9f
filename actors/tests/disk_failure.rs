//! A failed disk stops the part that owns it, visibly and once: the engine's health
//! names it, whoever waits on it is told (no wait without a way out, I5), and nothing is
//! retried in a loop.

mod common;
mod sim;
use bytes::Bytes;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tidemark::{BlockStore, MemStore, Offset, PairId, StoreError};
use tidemark_actors::{EngineError, StoreSpec};

/// A unit in memory whose writes fail with EIO once `broken` is set.
struct FailingStore {
    inner: MemStore,
    broken: AtomicBool,
}

impl FailingStore {
    fn new(size: u64) -> Arc<FailingStore> {
        Arc::new(FailingStore {
            inner: MemStore::new(size),
            broken: AtomicBool::new(false),
        })
    }

    fn io_error(&self) -> StoreError {
        StoreError::Io {
            path: "failing-store".into(),
            source: std::io::Error::from_raw_os_error(5),
        }
    }
}

impl BlockStore for FailingStore {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn read_at(&self, offset: Offset, buf: &mut [u8]) -> Result<(), StoreError> {
        self.inner.read_at(offset, buf)
    }
    fn write_at(&self, offset: Offset, data: &[u8]) -> Result<(), StoreError> {
        if self.broken.load(Ordering::SeqCst) {
            return Err(self.io_error());
        }
        self.inner.write_at(offset, data)
    }
    fn flush(&self) -> Result<(), StoreError> {
        if self.broken.load(Ordering::SeqCst) {
            return Err(self.io_error());
        }
        self.inner.flush()
    }
}

fn sim<F: std::future::Future<Output = ()>>(f: impl FnOnce() -> F) {
    sim::run(async move { f().await });
}

/// One pair a → b whose remote (or local) unit is `store`.
fn start(store: Arc<FailingStore>, remote: bool) -> (tidemark_actors::Engine, PairId) {
    let shared = StoreSpec::Shared(store);
    let (local_store, remote_store) = if remote {
        (StoreSpec::Memory, shared)
    } else {
        (shared, StoreSpec::Memory)
    };
    let (b, _, _, pair) = common::one_pair(5, "p", 1 << 16, local_store, remote_store);
    (b.start().expect("start"), pair)
}

#[test]
fn a_failed_remote_disk_fails_the_engine_and_its_waiters() {
    sim(|| async {
        let store = FailingStore::new(1 << 16);
        let (engine, pair) = start(store.clone(), true);
        engine
            .write(pair, 0, Bytes::from(vec![1u8; 4096]))
            .await
            .expect("write");
        engine.drain().await.expect("drain while healthy");
        assert_eq!(engine.failure(), None);

        store.broken.store(true, Ordering::SeqCst);
        engine
            .write(pair, 4096, Bytes::from(vec![2u8; 4096]))
            .await
            .expect("the local write still succeeds");
        // The remote cannot apply it: the wait ends with an error instead of hanging.
        match engine.drain().await {
            Err(EngineError::Unit(m)) => assert!(m.contains("apply"), "{m}"),
            other => panic!("drain over a failed remote disk: {other:?}"),
        }
        let failure = engine.health().failed().await;
        assert!(failure.component.contains("remote unit"), "{failure}");
        assert!(failure.error.contains("apply"), "{failure}");
        assert_eq!(engine.failure(), Some(failure));
        // Later waits are told at once.
        assert!(engine.drain().await.is_err());
        let _ = engine.shutdown().await;
    });
}

#[test]
fn a_failed_local_disk_fails_writes_and_the_engine() {
    sim(|| async {
        let store = FailingStore::new(1 << 16);
        let (engine, pair) = start(store.clone(), false);
        engine
            .write(pair, 0, Bytes::from(vec![1u8; 4096]))
            .await
            .expect("write while healthy");
        store.broken.store(true, Ordering::SeqCst);
        let err = engine
            .write(pair, 4096, Bytes::from(vec![2u8; 4096]))
            .await
            .expect_err("a write to a failed disk fails");
        assert!(matches!(err, EngineError::Unit(_)), "{err}");
        let failure = engine.health().failed().await;
        assert!(failure.component.contains("local unit"), "{failure}");
        // The unit takes no more writes, and says why.
        let again = engine
            .write(pair, 0, Bytes::from(vec![3u8; 512]))
            .await
            .expect_err("a failed unit refuses writes");
        assert!(again.to_string().contains("local write"), "{again}");
        let _ = engine.shutdown().await;
    });
}
