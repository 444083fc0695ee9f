//! What the exports are and how requests reach them: the [`Backend`] trait, the
//! engine's local units ([`EngineBackend`]) and read-only block stores
//! ([`ReadOnlyBackend`]).

use super::{ErrorCode, Export, ExportFlags};
use crate::engine::Engine;
use crate::error::EngineError;
use bytes::Bytes;
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use tidemark::nbd::Reply;
use tidemark::{BlockStore, Offset, PairId, Payload, StoreError};

/// Why the backend could not carry out a request; sent to the client as an NBD error.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendError {
    pub code: ErrorCode,
    pub message: String,
}

impl BackendError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> BackendError {
        BackendError {
            code,
            message: message.into(),
        }
    }
}

impl fmt::Display for BackendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl std::error::Error for BackendError {}

impl From<BackendError> for Reply {
    fn from(e: BackendError) -> Reply {
        Reply::error(e.code, e.message)
    }
}

impl From<EngineError> for BackendError {
    fn from(e: EngineError) -> BackendError {
        let code = match &e {
            EngineError::Store(StoreError::OutOfRange { .. }) => ErrorCode::Inval,
            EngineError::Store(StoreError::ReadOnly { .. }) => ErrorCode::Perm,
            // The client must then disconnect softly.
            EngineError::Stopped => ErrorCode::Shutdown,
            // A planned switchover: the server goes away, the client should go elsewhere.
            EngineError::Quiesced(_) => ErrorCode::Shutdown,
            EngineError::NoSpace(_) => ErrorCode::NoSpc,
            _ => ErrorCode::Io,
        };
        BackendError::new(code, e.to_string())
    }
}

/// What the exports are and how to read, write and flush them. `export` is an index
/// into [`Backend::exports`], which must not change while a server runs. Requests
/// reaching a backend are already validated: in range, nonzero, allowed by the export's
/// flags.
pub trait Backend: Send + Sync + 'static {
    fn exports(&self) -> Vec<Export>;

    /// Exactly `len` bytes at `offset`.
    fn read(
        &self,
        export: usize,
        offset: Offset,
        len: u32,
    ) -> impl Future<Output = Result<Bytes, BackendError>> + Send;

    /// Applies the payloads in the order given; resolves once they are recorded (for
    /// tidemark: written locally and stamped for the remote, invariant I3).
    fn write(
        &self,
        export: usize,
        payloads: Vec<Payload>,
    ) -> impl Future<Output = Result<(), BackendError>> + Send;

    /// Makes every write that has resolved so far durable.
    fn flush(&self, export: usize) -> impl Future<Output = Result<(), BackendError>> + Send;
}

/// Serves the local units of an [`Engine`]: one export per pair whose local unit runs
/// in this process, named after the pair. Reads come from the local unit; writes go
/// through [`Engine::write_many`] (trim and write-zeroes as [`Payload::Zero`], so the
/// remote unit sees them in order); flush and FUA through [`Engine::flush`].
pub struct EngineBackend {
    engine: Arc<Engine>,
    units: Vec<Unit>,
}

struct Unit {
    pair: PairId,
    store: Arc<dyn BlockStore>,
    export: Export,
}

impl EngineBackend {
    pub fn new(engine: Arc<Engine>) -> EngineBackend {
        let units = engine
            .pairs()
            .iter()
            .filter(|p| p.is_local())
            .filter_map(|p| {
                let store = engine.store(p.id, false).ok()?;
                let export = Export::new(p.name.clone(), p.size).with_flags(ExportFlags {
                    // A flush of the local unit covers writes from every connection.
                    multi_conn: true,
                    ..ExportFlags::default()
                });
                Some(Unit {
                    pair: p.id,
                    store,
                    export,
                })
            })
            .collect();
        EngineBackend { engine, units }
    }

    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    fn unit(&self, export: usize) -> Result<&Unit, BackendError> {
        self.units
            .get(export)
            .ok_or_else(|| BackendError::new(ErrorCode::Inval, format!("no export {export}")))
    }
}

impl Backend for EngineBackend {
    fn exports(&self) -> Vec<Export> {
        self.units.iter().map(|u| u.export.clone()).collect()
    }

    async fn read(&self, export: usize, offset: Offset, len: u32) -> Result<Bytes, BackendError> {
        read_store(self.unit(export)?.store.clone(), offset, len).await
    }

    async fn write(&self, export: usize, payloads: Vec<Payload>) -> Result<(), BackendError> {
        let pair = self.unit(export)?.pair;
        self.engine.write_many(pair, payloads).await?;
        Ok(())
    }

    async fn flush(&self, export: usize) -> Result<(), BackendError> {
        let pair = self.unit(export)?.pair;
        Ok(self.engine.flush(pair).await?)
    }
}

/// Reads `len` bytes at `offset` of `store` off the runtime's threads (units may be
/// files).
async fn read_store(
    store: Arc<dyn BlockStore>,
    offset: Offset,
    len: u32,
) -> Result<Bytes, BackendError> {
    tokio::task::spawn_blocking(move || {
        let mut buf = vec![0u8; len as usize];
        store
            .read_at(offset, &mut buf)
            .map(|()| Bytes::from(buf))
            .map_err(|e| BackendError::from(EngineError::from(e)))
    })
    .await
    .map_err(|e| BackendError::new(ErrorCode::Io, format!("read task failed: {e}")))?
}

/// Serves block stores read-only, one export each: `NBD_FLAG_READ_ONLY` is advertised,
/// trim and write-zeroes are not; the protocol core answers every write, trim and
/// write-zeroes with `EPERM` before it reaches a backend, and should one reach this
/// backend all the same it is answered `EPERM` without touching the store. Reads come
/// from the stores; flush succeeds and does nothing (nothing is ever written).
pub struct ReadOnlyBackend {
    units: Vec<(Export, Arc<dyn BlockStore>)>,
}

impl ReadOnlyBackend {
    /// One export per `(name, store)`, of the store's size, in the order given.
    pub fn new(units: Vec<(String, Arc<dyn BlockStore>)>) -> ReadOnlyBackend {
        let units = units
            .into_iter()
            .map(|(name, store)| {
                let export = Export::new(name, store.size()).with_flags(ExportFlags {
                    read_only: true,
                    flush: true,
                    fua: false,
                    trim: false,
                    write_zeroes: false,
                    // Nothing changes the bytes: every connection sees the same.
                    multi_conn: true,
                });
                (export, store)
            })
            .collect();
        ReadOnlyBackend { units }
    }

    fn store(&self, export: usize) -> Result<&Arc<dyn BlockStore>, BackendError> {
        self.units
            .get(export)
            .map(|(_, s)| s)
            .ok_or_else(|| BackendError::new(ErrorCode::Inval, format!("no export {export}")))
    }
}

impl Backend for ReadOnlyBackend {
    fn exports(&self) -> Vec<Export> {
        self.units.iter().map(|(e, _)| e.clone()).collect()
    }

    async fn read(&self, export: usize, offset: Offset, len: u32) -> Result<Bytes, BackendError> {
        read_store(self.store(export)?.clone(), offset, len).await
    }

    async fn write(&self, export: usize, _payloads: Vec<Payload>) -> Result<(), BackendError> {
        self.store(export)?;
        Err(BackendError::new(
            ErrorCode::Perm,
            "the export is read-only",
        ))
    }

    async fn flush(&self, export: usize) -> Result<(), BackendError> {
        self.store(export)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_errors_map_to_nbd_errors() {
        let e = BackendError::from(EngineError::Store(StoreError::OutOfRange {
            offset: 1,
            len: 2,
            size: 2,
        }));
        assert_eq!(e.code, ErrorCode::Inval);
        assert_eq!(
            BackendError::from(EngineError::Stopped).code,
            ErrorCode::Shutdown
        );
        assert_eq!(
            BackendError::from(EngineError::NoSuchPair(PairId(3))).code,
            ErrorCode::Io
        );
        assert_eq!(
            Reply::from(BackendError::new(ErrorCode::Perm, "no")),
            Reply::error(ErrorCode::Perm, "no")
        );
    }
}
