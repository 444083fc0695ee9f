//! The NBD front end: a thin tokio socket layer over the sans-IO protocol core
//! [`tidemark::nbd`]. Real clients (qemu, libnbd's nbdinfo/nbdcopy/nbdsh, fio, the Linux
//! kernel) reach the primary's local units through it.
//!
//! [`serve`] accepts connections on a TCP or Unix listener and runs one task per
//! connection. Each connection keeps several requests in flight (up to
//! [`Limits::max_in_flight`]) and answers them as they complete, in any order. Writes,
//! trims and write-zeroes that arrive together go to the backend as one batch
//! ([`Backend::write`]). A request is answered only after the backend returned, so a
//! write is acknowledged only once [`Engine::write_many`] succeeded; FUA adds a
//! [`Backend::flush`] before the answer.
//!
//! A client that breaks the protocol or vanishes ends only its own connection (logged
//! with `tracing`); the server keeps serving everyone else.
//!
//! [`EngineBackend`] serves every local unit of an [`Engine`] in this process as an
//! export named after its pair; [`ReadOnlyBackend`] serves block stores read-only (the
//! remote units of a promoted secondary, `tidemark export`).
//!
//! With a [`ServerTls`] the server requires TLS (`NBD_OPT_STARTTLS`, rustls) before any
//! other option; the core decides the protocol, [`serve`] wraps the stream.
mod backend;
mod listen;
mod serve;
mod tls;

pub use backend::{Backend, BackendError, EngineBackend, ReadOnlyBackend};
pub use listen::{AnyListener, ListenAddr, Listener, StdListener};
pub use serve::serve;
pub use tidemark::nbd::{ErrorCode, Export, ExportFlags, Limits, TlsPolicy};
pub use tls::{ServerTls, TlsError, TlsFile, TlsFiles};
