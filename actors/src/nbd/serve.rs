//! [`serve`]: accepts clients and runs one task per connection over the sans-IO
//! protocol core, batching writes to the [`Backend`].
//!
//! A connection is haggled over on the whole stream, one option at a time
//! ([`negotiate`]); when the core asks for TLS ([`Event::StartTls`]) the stream is
//! wrapped by the TLS acceptor and haggling goes on inside it. Transmission then runs
//! with the stream split into a reader and a writer task ([`transmit`]).

use super::{AnyListener, Backend, ErrorCode, Export, Limits, Listener, ServerTls};
use bytes::Bytes;
use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Duration;
use tidemark::nbd::{Command, Connection, Cookie, End, Event, Reply, Request, TlsPolicy};
use tidemark::Payload;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tracing::{debug, error, info, warn};

/// Bytes read from a socket at a time.
const READ_CHUNK: usize = 256 << 10;
/// Output chunks queued for a connection's writer before the connection waits.
const OUTPUT_QUEUE: usize = 256;
/// Writes gathered into one [`Backend::write`] call at most.
const MAX_BATCH_BYTES: usize = 8 << 20;
/// Bytes read at a time during option haggling (options are small).
const HANDSHAKE_READ_CHUNK: usize = 16 << 10;
/// A client that has not finished its TLS handshake by then is dropped.
const TLS_HANDSHAKE_LIMIT: Duration = Duration::from_secs(30);

impl AnyListener {
    /// [`serve`] on this listener.
    pub async fn serve<B: Backend>(
        self,
        backend: Arc<B>,
        limits: Limits,
        tls: Option<ServerTls>,
        shutdown: impl Future<Output = ()> + Send,
    ) {
        match self {
            AnyListener::Tcp(l) => serve(l, backend, limits, tls, shutdown).await,
            AnyListener::Unix(l, _) => serve(l, backend, limits, tls, shutdown).await,
        }
    }
}

/// Accepts clients until `shutdown` resolves, one task per connection. On shutdown no
/// new client is accepted, connections stop reading, answer what they have in flight
/// and close; `serve` returns once every connection has ended.
///
/// With `tls`, every client must upgrade to TLS (`NBD_OPT_STARTTLS`) before anything
/// else: the protocol's FORCEDTLS mode ([`TlsPolicy::Required`]).
pub async fn serve<L: Listener, B: Backend>(
    listener: L,
    backend: Arc<B>,
    limits: Limits,
    tls: Option<ServerTls>,
    shutdown: impl Future<Output = ()> + Send,
) {
    let mut listener = listener;
    let exports: Arc<[Export]> = backend.exports().into();
    info!(
        exports = ?exports.iter().map(|e| (&e.name, e.size)).collect::<Vec<_>>(),
        tls = tls.is_some(),
        client_certs = tls.as_ref().is_some_and(|t| t.requires_client_cert()),
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
                        tls.clone(),
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

/// One connection: haggles (upgrading to TLS when the core asks), then transmits.
async fn run_connection<S, B>(
    stream: S,
    peer: String,
    backend: Arc<B>,
    exports: Arc<[Export]>,
    limits: Limits,
    tls: Option<ServerTls>,
    mut stop: watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    B: Backend,
{
    let policy = match tls {
        Some(_) => TlsPolicy::Required,
        None => TlsPolicy::Off,
    };
    let mut conn = Connection::with_tls(exports, limits, policy);
    let mut plain = stream;
    match negotiate(&mut plain, &mut conn, &peer, &mut stop).await {
        Negotiated::Closed => return close(plain, &peer).await,
        Negotiated::Transmission => return transmit(plain, conn, peer, backend, stop).await,
        Negotiated::StartTls => {}
    }
    let Some(tls) = tls else {
        // The core asks for TLS only under TlsPolicy::Required.
        error!(%peer, "nbd: TLS asked for on a server without TLS; closing");
        return;
    };
    let accepted = tokio::select! {
        r = tokio::time::timeout(TLS_HANDSHAKE_LIMIT, tls.acceptor().accept(plain)) => r,
        _ = stop.changed() => {
            debug!(%peer, "nbd: server shutting down during a TLS handshake");
            return;
        }
    };
    let mut stream = match accepted {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            warn!(%peer, "nbd: TLS handshake failed, closing the connection: {e}");
            return;
        }
        Err(_) => {
            warn!(%peer, "nbd: TLS handshake not finished in {TLS_HANDSHAKE_LIMIT:?}, closing");
            return;
        }
    };
    {
        let (_, session) = stream.get_ref();
        info!(
            %peer,
            version = ?session.protocol_version(),
            cipher = ?session.negotiated_cipher_suite().map(|c| c.suite()),
            client_cert = session.peer_certificates().is_some_and(|c| !c.is_empty()),
            "nbd: TLS established"
        );
    }
    conn.tls_started();
    match negotiate(&mut stream, &mut conn, &peer, &mut stop).await {
        Negotiated::Transmission => transmit(stream, conn, peer, backend, stop).await,
        Negotiated::Closed => close(stream, &peer).await,
        Negotiated::StartTls => {
            // The core refuses a second STARTTLS itself.
            error!(%peer, "nbd: TLS asked for twice; closing");
        }
    }
}

/// How option haggling ended.
enum Negotiated {
    /// Transmission starts (the core's `ExportChosen` was seen; what followed it is
    /// still queued in the core).
    Transmission,
    /// The ACK to `NBD_OPT_STARTTLS` is written out: run the TLS handshake now.
    StartTls,
    /// The session ended (abort, protocol error, client gone, server shutdown); the
    /// output is written out.
    Closed,
}

/// Option haggling on the whole stream: the client sends one option and waits for the
/// answer, so a plain read-answer loop does. Nothing is read once the core asked for
/// TLS: the client's handshake bytes stay in the socket for the TLS acceptor.
async fn negotiate<S>(
    stream: &mut S,
    conn: &mut Connection,
    peer: &str,
    stop: &mut watch::Receiver<bool>,
) -> Negotiated
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; HANDSHAKE_READ_CHUNK];
    loop {
        let mut start_tls = false;
        while let Some(event) = conn.poll_event() {
            match event {
                Event::ExportChosen { name, .. } => {
                    info!(%peer, export = %name, structured = conn.structured(), tls = conn.tls_active(), "nbd: transmission starts");
                    return Negotiated::Transmission;
                }
                Event::StartTls => start_tls = true,
                Event::End(End::Error(e)) => {
                    warn!(%peer, "nbd: protocol error, closing the connection: {e}");
                }
                Event::End(end) => debug!(%peer, ?end, "nbd: the client ends the session"),
                Event::Request(r) => {
                    // Requests come only after ExportChosen, which returned above.
                    error!(%peer, cookie = %r.cookie, "nbd: a request during option haggling");
                }
            }
        }
        while let Some(bytes) = conn.poll_output() {
            if let Err(e) = stream.write_all(&bytes).await {
                debug!(%peer, "nbd: write failed: {e}");
                return Negotiated::Closed;
            }
        }
        if let Err(e) = stream.flush().await {
            debug!(%peer, "nbd: write failed: {e}");
            return Negotiated::Closed;
        }
        if conn.is_ended() {
            return Negotiated::Closed;
        }
        if start_tls {
            return Negotiated::StartTls;
        }
        tokio::select! {
            read = stream.read(&mut buf) => match read {
                Ok(0) => {
                    debug!(%peer, "nbd: client closed the connection during option haggling");
                    return Negotiated::Closed;
                }
                Ok(n) => conn.handle_input(&buf[..n]),
                Err(e) => {
                    info!(%peer, "nbd: read failed: {e}");
                    return Negotiated::Closed;
                }
            },
            _ = stop.changed() => {
                debug!(%peer, "nbd: server shutting down during option haggling");
                return Negotiated::Closed;
            }
        }
    }
}

/// Ends a connection that never reached transmission (a TLS stream says goodbye).
async fn close<S: AsyncWrite + Unpin>(mut stream: S, peer: &str) {
    if let Err(e) = stream.shutdown().await {
        debug!(%peer, "nbd: shutdown of the connection failed: {e}");
    }
    info!(%peer, "nbd: connection closed");
}

/// Transmission on a connection whose handshake is over: reads requests, hands them to
/// the backend, writes the answers.
async fn transmit<S, B>(
    stream: S,
    mut conn: Connection,
    peer: String,
    backend: Arc<B>,
    mut stop: watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    B: Backend,
{
    let (mut rd, wr) = tokio::io::split(stream);
    let (tx, rx) = mpsc::channel::<Bytes>(OUTPUT_QUEUE);
    let writer = tokio::spawn(write_out(wr, rx, peer.clone()));
    let mut tasks: JoinSet<Vec<(Cookie, Reply)>> = JoinSet::new();
    let mut reading = !*stop.borrow();
    let mut export: Option<usize> = conn.export().map(|(i, _)| i);
    'session: loop {
        let mut batch = Batch::default();
        while let Some(event) = conn.poll_event() {
            match event {
                Event::ExportChosen { index, .. } => export = Some(index),
                Event::StartTls => {
                    // Only during option haggling, which is over.
                    error!(%peer, "nbd: TLS asked for during transmission; closing");
                    break 'session;
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
        // The socket is read straight into the connection's input buffer, lent for the
        // select and handed back after it (request data is not copied on its way in).
        let want_input = reading && conn.wants_input();
        let mut input = conn.lend_input(if want_input { READ_CHUNK } else { 0 });
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
            read = rd.read_buf(&mut input), if want_input => match read {
                Ok(0) => {
                    reading = false;
                    if conn.is_ended() {
                        debug!(%peer, "nbd: client closed the connection");
                    } else if conn.in_flight() > 0 || !input.is_empty() {
                        info!(
                            %peer,
                            in_flight = conn.in_flight(),
                            partial_bytes = input.len(),
                            "nbd: client vanished mid-request"
                        );
                    } else {
                        info!(%peer, "nbd: client closed the connection without NBD_CMD_DISC");
                    }
                }
                Ok(_) => {}
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
        conn.return_input(input);
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
        // Zeroes the client wants kept allocated are written as data: a zero range is
        // punched out (a hole) on both sides.
        Command::WriteZeroes {
            offset,
            len,
            no_hole: true,
            ..
        } => Payload::Write {
            offset,
            data: Bytes::from(vec![0u8; len as usize]),
        },
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
