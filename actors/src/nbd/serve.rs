//! [`serve`]: accepts clients and runs one task per connection over the sans-IO
//! protocol core, batching writes to the [`Backend`].

use super::{AnyListener, Backend, ErrorCode, Export, Limits, Listener};
use bytes::Bytes;
use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Duration;
use tidemark::nbd::{Command, Connection, Cookie, End, Event, Reply, Request};
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

impl AnyListener {
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
