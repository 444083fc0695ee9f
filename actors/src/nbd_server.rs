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

use crate::engine::Engine;
use crate::error::EngineError;
use bytes::Bytes;
use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;
use tidemark::nbd::{Command, Connection, Cookie, End, Event, Reply, Request};
use tidemark::{BlockStore, Offset, PairId, Payload, StoreError};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tracing::{debug, error, info, warn};

pub use tidemark::nbd::{ErrorCode, Export, ExportFlags, Limits};

/// Bytes read from a socket at a time.
const READ_CHUNK: usize = 256 << 10;
/// Output chunks queued for a connection's writer before the connection waits.
const OUTPUT_QUEUE: usize = 256;
/// Writes gathered into one [`Backend::write`] call at most.
const MAX_BATCH_BYTES: usize = 8 << 20;

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

/// Where to listen: a TCP address (`127.0.0.1:10809`, `[::1]:10809`) or a Unix socket
/// path (`unix:/run/tidemark.sock`, or any string starting with `/`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListenAddr {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl FromStr for ListenAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<ListenAddr, String> {
        if let Some(p) = s.strip_prefix("unix:") {
            if p.is_empty() {
                return Err("unix: needs a socket path".into());
            }
            return Ok(ListenAddr::Unix(PathBuf::from(p)));
        }
        if s.starts_with('/') {
            return Ok(ListenAddr::Unix(PathBuf::from(s)));
        }
        s.parse::<SocketAddr>().map(ListenAddr::Tcp).map_err(|e| {
            format!(
                "{s:?} is neither host:port (an IP address and port) nor a unix socket path: {e}"
            )
        })
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Tcp(a) => write!(f, "{a}"),
            ListenAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// A socket clients connect to.
pub trait Listener: Send + 'static {
    type Stream: AsyncRead + AsyncWrite + Send + Unpin + 'static;

    /// The next connection and a name for its peer (for logs). Cancel-safe.
    fn accept(&mut self) -> impl Future<Output = io::Result<(Self::Stream, String)>> + Send;
}

impl Listener for TcpListener {
    type Stream = tokio::net::TcpStream;

    async fn accept(&mut self) -> io::Result<(Self::Stream, String)> {
        let (stream, peer) = TcpListener::accept(self).await?;
        // Replies are small and latency matters (the protocol asks for TCP_NODELAY).
        if let Err(e) = stream.set_nodelay(true) {
            debug!(%peer, "nbd: cannot set TCP_NODELAY: {e}");
        }
        Ok((stream, peer.to_string()))
    }
}

impl Listener for UnixListener {
    type Stream = tokio::net::UnixStream;

    async fn accept(&mut self) -> io::Result<(Self::Stream, String)> {
        let (stream, _) = UnixListener::accept(self).await?;
        let peer = stream
            .peer_cred()
            .map(|c| format!("unix pid {:?} uid {}", c.pid(), c.uid()))
            .unwrap_or_else(|_| "unix".to_string());
        Ok((stream, peer))
    }
}

/// A bound listener not registered with any runtime (non-blocking), so it can move
/// between threads.
pub enum StdListener {
    Tcp(std::net::TcpListener),
    Unix(std::os::unix::net::UnixListener, PathBuf),
}

/// A bound TCP or Unix listener, for a daemon that takes a [`ListenAddr`] from its
/// configuration.
pub enum AnyListener {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

impl AnyListener {
    /// Binds `addr`. A stale Unix socket file left by an earlier run (nobody accepts on
    /// it) is replaced; a socket someone listens on, or any other file at that path, is
    /// an error.
    pub async fn bind(addr: &ListenAddr) -> io::Result<AnyListener> {
        match addr {
            ListenAddr::Tcp(a) => Ok(AnyListener::Tcp(TcpListener::bind(a).await?)),
            ListenAddr::Unix(p) => {
                use std::os::unix::fs::FileTypeExt;
                if let Ok(m) = std::fs::symlink_metadata(p) {
                    if m.file_type().is_socket() {
                        if tokio::net::UnixStream::connect(p).await.is_ok() {
                            return Err(io::Error::new(
                                io::ErrorKind::AddrInUse,
                                format!("{} is in use by a running server", p.display()),
                            ));
                        }
                        std::fs::remove_file(p)?;
                    }
                }
                Ok(AnyListener::Unix(UnixListener::bind(p)?, p.clone()))
            }
        }
    }

    /// The bound socket, to move to another thread's runtime ([`AnyListener::from_std`]).
    pub fn into_std(self) -> io::Result<StdListener> {
        match self {
            AnyListener::Tcp(l) => l.into_std().map(StdListener::Tcp),
            AnyListener::Unix(l, p) => l.into_std().map(|l| StdListener::Unix(l, p)),
        }
    }

    /// Registers a listener from [`AnyListener::into_std`] with the runtime of the
    /// calling thread.
    pub fn from_std(l: StdListener) -> io::Result<AnyListener> {
        match l {
            StdListener::Tcp(l) => TcpListener::from_std(l).map(AnyListener::Tcp),
            StdListener::Unix(l, p) => UnixListener::from_std(l).map(|l| AnyListener::Unix(l, p)),
        }
    }

    /// The address actually bound (the port, when 0 was asked for).
    pub fn local_addr(&self) -> io::Result<ListenAddr> {
        match self {
            AnyListener::Tcp(l) => l.local_addr().map(ListenAddr::Tcp),
            AnyListener::Unix(_, p) => Ok(ListenAddr::Unix(p.clone())),
        }
    }

    /// [`serve`] on this listener.
    pub async fn serve<B: Backend>(
        self,
        backend: Arc<B>,
        limits: Limits,
        shutdown: impl Future<Output = ()> + Send,
    ) {
        match self {
            AnyListener::Tcp(l) => serve(l, backend, limits, shutdown).await,
            AnyListener::Unix(l, _) => serve(l, backend, limits, shutdown).await,
        }
    }
}

/// Accepts clients until `shutdown` resolves, one task per connection. On shutdown no
/// new client is accepted, connections stop reading, answer what they have in flight
/// and close; `serve` returns once every connection has ended.
pub async fn serve<L: Listener, B: Backend>(
    listener: L,
    backend: Arc<B>,
    limits: Limits,
    shutdown: impl Future<Output = ()> + Send,
) {
    let mut listener = listener;
    let exports: Arc<[Export]> = backend.exports().into();
    info!(
        exports = ?exports.iter().map(|e| (&e.name, e.size)).collect::<Vec<_>>(),
        "nbd: serving"
    );
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut conns = JoinSet::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            Some(done) = conns.join_next(), if !conns.is_empty() => {
                if let Err(e) = done {
                    error!("nbd: connection task failed: {e}");
                }
            }
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    info!(%peer, "nbd: client connected");
                    conns.spawn(run_connection(
                        stream,
                        peer,
                        backend.clone(),
                        exports.clone(),
                        limits,
                        stop_rx.clone(),
                    ));
                }
                Err(e) => {
                    // Out of file descriptors and the like: let it pass, then go on.
                    warn!("nbd: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
    drop(listener);
    let _ = stop_tx.send(true);
    while let Some(done) = conns.join_next().await {
        if let Err(e) = done {
            error!("nbd: connection task failed: {e}");
        }
    }
    info!("nbd: server stopped");
}

/// Writes accumulated for one backend call.
#[derive(Default)]
struct Batch {
    payloads: Vec<Payload>,
    cookies: Vec<Cookie>,
    bytes: usize,
    fua: bool,
}

/// One connection: reads requests, hands them to the backend, writes the answers.
async fn run_connection<S, B>(
    stream: S,
    peer: String,
    backend: Arc<B>,
    exports: Arc<[Export]>,
    limits: Limits,
    mut stop: watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    B: Backend,
{
    let (mut rd, wr) = tokio::io::split(stream);
    let (tx, rx) = mpsc::channel::<Bytes>(OUTPUT_QUEUE);
    let writer = tokio::spawn(write_out(wr, rx, peer.clone()));
    let mut conn = Connection::new(exports, limits);
    let mut tasks: JoinSet<Vec<(Cookie, Reply)>> = JoinSet::new();
    let mut buf = vec![0u8; READ_CHUNK];
    let mut reading = !*stop.borrow();
    let mut export: Option<usize> = None;
    'session: loop {
        let mut batch = Batch::default();
        while let Some(event) = conn.poll_event() {
            match event {
                Event::ExportChosen { index, name } => {
                    export = Some(index);
                    info!(%peer, export = %name, structured = conn.structured(), "nbd: transmission starts");
                }
                Event::Request(req) => match export {
                    Some(ix) => dispatch(req, ix, &backend, &mut tasks, &mut batch),
                    None => answer(
                        &mut conn,
                        req.cookie,
                        Reply::error(ErrorCode::Inval, "no export chosen"),
                        &peer,
                    ),
                },
                Event::End(End::Error(e)) => {
                    warn!(%peer, "nbd: protocol error, closing the connection: {e}");
                    reading = false;
                }
                Event::End(end) => {
                    debug!(%peer, ?end, "nbd: the client ends the session");
                    reading = false;
                }
            }
            if batch.bytes >= MAX_BATCH_BYTES {
                submit(std::mem::take(&mut batch), export, &backend, &mut tasks);
            }
        }
        submit(batch, export, &backend, &mut tasks);
        while let Some(bytes) = conn.poll_output() {
            if tx.send(bytes).await.is_err() {
                debug!(%peer, "nbd: the connection cannot be written to any more");
                break 'session;
            }
        }
        let hard_error = matches!(conn.end(), Some(End::Error(_)));
        if hard_error || (!reading && tasks.is_empty()) {
            break;
        }
        tokio::select! {
            Some(done) = tasks.join_next(), if !tasks.is_empty() => match done {
                Ok(replies) => {
                    for (cookie, reply) in replies {
                        answer(&mut conn, cookie, reply, &peer);
                    }
                }
                Err(e) => {
                    // Its requests can never be answered: the client would wait forever.
                    error!(%peer, "nbd: a request task failed, closing the connection: {e}");
                    break;
                }
            },
            read = rd.read(&mut buf), if reading && conn.wants_input() => match read {
                Ok(0) => {
                    reading = false;
                    if conn.is_ended() {
                        debug!(%peer, "nbd: client closed the connection");
                    } else if conn.in_flight() > 0 || conn.buffered_input() > 0 {
                        info!(
                            %peer,
                            in_flight = conn.in_flight(),
                            partial_bytes = conn.buffered_input(),
                            "nbd: client vanished mid-request"
                        );
                    } else {
                        info!(%peer, "nbd: client closed the connection without NBD_CMD_DISC");
                    }
                }
                Ok(n) => conn.handle_input(&buf[..n]),
                Err(e) => {
                    info!(%peer, "nbd: read failed: {e}");
                    reading = false;
                }
            },
            _ = stop.changed(), if reading => {
                debug!(%peer, "nbd: server shutting down, finishing the connection");
                reading = false;
            }
            else => break,
        }
    }
    drop(tx);
    tasks.shutdown().await;
    match writer.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => debug!(%peer, "nbd: write failed: {e}"),
        Err(e) => error!(%peer, "nbd: writer task failed: {e}"),
    }
    info!(%peer, "nbd: connection closed");
}

/// Starts the backend work for one request (writes are gathered in `batch`).
fn dispatch<B: Backend>(
    req: Request,
    export: usize,
    backend: &Arc<B>,
    tasks: &mut JoinSet<Vec<(Cookie, Reply)>>,
    batch: &mut Batch,
) {
    let cookie = req.cookie;
    let fua = req.command.fua();
    let payload = match req.command {
        Command::Read { offset, len } => {
            let b = backend.clone();
            tasks.spawn(async move {
                let reply = match b.read(export, offset, len).await {
                    Ok(data) => Reply::Data(data),
                    Err(e) => e.into(),
                };
                vec![(cookie, reply)]
            });
            return;
        }
        Command::Flush => {
            let b = backend.clone();
            tasks.spawn(async move {
                let reply = match b.flush(export).await {
                    Ok(()) => Reply::Ok,
                    Err(e) => e.into(),
                };
                vec![(cookie, reply)]
            });
            return;
        }
        Command::Write { offset, data, .. } => Payload::Write { offset, data },
        Command::Trim { offset, len, .. } | Command::WriteZeroes { offset, len, .. } => {
            Payload::Zero {
                offset,
                len: len as u64,
            }
        }
    };
    batch.bytes += payload.wire_len();
    batch.payloads.push(payload);
    batch.cookies.push(cookie);
    batch.fua |= fua;
}

/// Sends a batch of writes to the backend as one call; every write of it is answered
/// once the call (and the flush, if any of them asked for FUA) returned.
fn submit<B: Backend>(
    batch: Batch,
    export: Option<usize>,
    backend: &Arc<B>,
    tasks: &mut JoinSet<Vec<(Cookie, Reply)>>,
) {
    let Some(export) = export else { return };
    if batch.payloads.is_empty() {
        return;
    }
    let b = backend.clone();
    tasks.spawn(async move {
        let mut result = b.write(export, batch.payloads).await;
        if result.is_ok() && batch.fua {
            result = b.flush(export).await;
        }
        let reply = match result {
            Ok(()) => Reply::Ok,
            Err(e) => e.into(),
        };
        batch
            .cookies
            .into_iter()
            .map(|c| (c, reply.clone()))
            .collect()
    });
}

fn answer(conn: &mut Connection, cookie: Cookie, reply: Reply, peer: &str) {
    if let Err(e) = conn.reply(cookie, reply) {
        error!(%peer, "nbd: the backend answered wrongly: {e}");
        // The request is still in flight: fail it rather than leave the client waiting.
        let _ = conn.reply(cookie, Reply::error(ErrorCode::Io, e.to_string()));
    }
}

/// Writes a connection's output in order, flushing whenever the queue runs dry.
async fn write_out<W: AsyncWrite + Unpin>(
    wr: W,
    mut rx: mpsc::Receiver<Bytes>,
    peer: String,
) -> io::Result<()> {
    let mut w = BufWriter::with_capacity(64 << 10, wr);
    while let Some(bytes) = rx.recv().await {
        w.write_all(&bytes).await?;
        if rx.is_empty() {
            w.flush().await?;
        }
    }
    w.flush().await?;
    if let Err(e) = w.shutdown().await {
        debug!(%peer, "nbd: shutdown of the connection failed: {e}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses_parse() {
        let ok = [
            (
                "127.0.0.1:10809",
                ListenAddr::Tcp("127.0.0.1:10809".parse().unwrap()),
            ),
            ("[::1]:0", ListenAddr::Tcp("[::1]:0".parse().unwrap())),
            ("unix:/run/t.sock", ListenAddr::Unix("/run/t.sock".into())),
            ("/run/t.sock", ListenAddr::Unix("/run/t.sock".into())),
            ("unix:rel.sock", ListenAddr::Unix("rel.sock".into())),
        ];
        for (s, want) in ok {
            let got: ListenAddr = s.parse().unwrap_or_else(|e| panic!("{s}: {e}"));
            assert_eq!(got, want, "{s}");
            assert_eq!(
                got.to_string().parse::<ListenAddr>(),
                Ok(got),
                "{s} round trip"
            );
        }
        for bad in [
            "",
            "unix:",
            "localhost",
            "127.0.0.1",
            "127.0.0.1:99999",
            "host:10809",
        ] {
            assert!(bad.parse::<ListenAddr>().is_err(), "{bad:?} must not parse");
        }
    }

    #[test]
    fn a_stale_unix_socket_is_replaced_a_live_one_is_not() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let dir = tempfile::tempdir().expect("tempdir");
            let addr = ListenAddr::Unix(dir.path().join("s.sock"));
            let live = AnyListener::bind(&addr).await.expect("first bind");
            let e = AnyListener::bind(&addr).await.err().expect("in use");
            assert_eq!(e.kind(), io::ErrorKind::AddrInUse);
            drop(live); // leaves the socket file behind
            assert!(dir.path().join("s.sock").exists());
            AnyListener::bind(&addr)
                .await
                .expect("stale socket replaced");
            let file = ListenAddr::Unix(dir.path().join("f"));
            std::fs::write(dir.path().join("f"), b"x").expect("write");
            assert!(
                AnyListener::bind(&file).await.is_err(),
                "a plain file is kept"
            );
        });
    }

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
