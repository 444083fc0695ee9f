//! The control socket: a running system answers `tidemark status` and `tidemark verify`
//! on a Unix socket in its journal directory
//! ([`crate::config::SystemConfig::control_socket`]).
//!
//! Protocol (documented in `docs/operations.md`): the client connects, sends one request
//! as a JSON object on one line (`{"op":"status"}` and a newline), and reads one reply as
//! a JSON object on one line: `{"ok":true,"status":{...}}`, where `status` is the
//! system's status document (what `status.json` holds, with its stable `view`), or
//! `{"ok":false,"error":"...","kind":"..."}`. Then the server closes the connection. A
//! request longer than [`MAX_REQUEST`] bytes, or not sent within [`REQUEST_TIMEOUT`],
//! gets no reply. `verify` and `repair` ([`Request`]) act on a pair whose local unit
//! runs on the system.
//!
//! The socket is created mode 0600 (only the daemon's user may ask), a stale one left by
//! a crashed process is removed at start (the caller holds the system's lock, so no
//! other process serves it), and a clean stop removes it.

use serde::{Deserialize, Serialize};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};

/// The longest request line accepted.
pub const MAX_REQUEST: usize = 4096;
/// How long the server waits for a request line.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// A request.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Request {
    /// `"status"`, `"verify"` or `"repair"`.
    pub op: String,
    /// `verify`, `repair`: the pair (its local unit runs on this system).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pair: Option<String>,
    /// `verify`: the first region's offset, the region size and how many regions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
    /// `verify`: give up if the secondary has not answered within this many ms
    /// (default 10000, at most 600000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// `repair`: byte ranges `[offset, len]` to resync.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ranges: Option<Vec<(u64, u64)>>,
    /// `quiesce`: refuse new writes for this many ms (a lease; default 30000, 1000 to
    /// 3600000), unless renewed or lifted by `resume`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_ms: Option<u64>,
}

/// The default and the bounds of a `quiesce` lease.
pub const QUIESCE_DEFAULT: Duration = Duration::from_secs(30);
pub const QUIESCE_MIN: Duration = Duration::from_secs(1);
pub const QUIESCE_MAX: Duration = Duration::from_secs(3600);

/// A reply.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Reply {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<serde_json::Value>,
    /// `verify`: what it found ([`VerifyAnswer`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify: Option<VerifyAnswer>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// With an error: `"usage"` (a bad request), `"timeout"` (the secondary did not
    /// answer), `"busy"` (not now: the pair does not replicate), `"failed"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
}

/// A `verify` request's answer: one verdict per region (`"match"`, `"differ"`,
/// `"busy"`), why regions are busy if the pair could not be checked at all, and how
/// many regions were compared at exactly the same `seq` on both sides.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyAnswer {
    pub verdicts: Vec<tidemark::verify::Verdict>,
    #[serde(default)]
    pub busy: Option<String>,
    #[serde(default)]
    pub exact: u64,
}

/// The pairs whose local units run on the system, once its engine has started.
pub type Controls = Arc<std::sync::OnceLock<Vec<tidemark_actors::engine::PairControl>>>;

/// The longest a `verify` request may wait for the secondary.
pub const MAX_VERIFY_TIMEOUT: Duration = Duration::from_secs(600);

/// The latest status document of one system, as the daemon's sampling loop leaves it.
pub type Latest = Arc<Mutex<Option<serde_json::Value>>>;

/// A listening control socket; dropping it removes the socket file.
pub struct ControlSocket {
    path: PathBuf,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("control socket {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

impl ControlSocket {
    /// Binds `path` (mode 0600; a stale socket there is removed first) and serves
    /// `latest` and the requests on `controls` on it from a task on the current runtime.
    pub fn serve(
        path: &Path,
        latest: Latest,
        controls: Controls,
    ) -> Result<ControlSocket, ControlError> {
        let io = |source| ControlError::Io {
            path: path.display().to_string(),
            source,
        };
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(e)),
        }
        let listener = tokio::net::UnixListener::bind(path).map_err(io)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
        let task = tokio::spawn(async move {
            // Dropped with this task (the socket's `Drop` aborts it): so are the
            // connections being answered.
            let mut answering = tokio::task::JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                while answering.try_join_next().is_some() {}
                answering.spawn(answer(stream, latest.clone(), controls.clone()));
            }
        });
        Ok(ControlSocket {
            path: path.to_path_buf(),
            task,
        })
    }
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}

/// A reply that says `error`, of `kind`.
fn refuse(kind: &str, error: impl Into<String>) -> Reply {
    Reply {
        error: Some(error.into()),
        kind: Some(kind.into()),
        ..Reply::default()
    }
}

/// Reads one request from `stream` (within [`REQUEST_TIMEOUT`]) and writes its reply
/// (a `verify` may take up to its own timeout).
async fn answer(
    stream: tokio::net::UnixStream,
    latest: Latest,
    controls: Controls,
) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = Vec::new();
    let mut reader = BufReader::new(read).take(MAX_REQUEST as u64 + 1);
    match tokio::time::timeout(REQUEST_TIMEOUT, reader.read_until(b'\n', &mut line)).await {
        Ok(r) => r?,
        Err(_) => return Ok(()),
    };
    if line.len() > MAX_REQUEST || !line.ends_with(b"\n") {
        return Ok(());
    }
    let reply = match serde_json::from_slice::<Request>(&line) {
        Ok(r) if r.op == "status" => {
            let doc = latest.lock().ok().and_then(|g| g.clone());
            match doc {
                Some(d) => Reply {
                    ok: true,
                    status: Some(d),
                    ..Reply::default()
                },
                None => refuse("busy", "starting: no status sampled yet"),
            }
        }
        Ok(r) if r.op == "verify" || r.op == "repair" => pair_op(&r, &controls).await,
        Ok(r) if r.op == "quiesce" || r.op == "resume" => quiesce_op(&r, &controls).await,
        Ok(r) => refuse(
            "usage",
            format!(
                "unknown op {:?} (known: \"status\", \"verify\", \"repair\", \"quiesce\", \"resume\")",
                r.op
            ),
        ),
        Err(e) => refuse("usage", format!("bad request: {e}")),
    };
    let mut text = serde_json::to_vec(&reply).map_err(std::io::Error::other)?;
    text.push(b'\n');
    let send = async {
        write.write_all(&text).await?;
        write.shutdown().await
    };
    // A client that does not read its reply does not hold the task.
    tokio::time::timeout(REQUEST_TIMEOUT, send)
        .await
        .unwrap_or(Ok(()))
}

/// Answers `quiesce` (every local unit here refuses new writes for the lease) and
/// `resume` (they take writes again).
async fn quiesce_op(r: &Request, controls: &Controls) -> Reply {
    let Some(all) = controls.get() else {
        return refuse("busy", "starting: the engine is not running yet");
    };
    if all.is_empty() {
        return refuse(
            "usage",
            format!("{}: no local unit runs on this system", r.op),
        );
    }
    let until = if r.op == "quiesce" {
        let lease = r
            .lease_ms
            .map_or(QUIESCE_DEFAULT, Duration::from_millis)
            .clamp(QUIESCE_MIN, QUIESCE_MAX);
        Some(std::time::Instant::now() + lease)
    } else {
        None
    };
    for pc in all {
        if let Err(e) = pc.quiesce(until).await {
            return refuse("failed", format!("pair {}: {e}", pc.name));
        }
    }
    Reply {
        ok: true,
        ..Reply::default()
    }
}

/// Answers a `verify` or `repair` request.
async fn pair_op(r: &Request, controls: &Controls) -> Reply {
    use tidemark_actors::EngineError;
    let Some(all) = controls.get() else {
        return refuse("busy", "starting: the engine is not running yet");
    };
    let Some(name) = &r.pair else {
        return refuse("usage", format!("{}: no pair given", r.op));
    };
    let Some(pc) = all.iter().find(|p| &p.name == name) else {
        return refuse(
            "usage",
            format!("pair {name:?}: its local unit does not run on this system"),
        );
    };
    let result = if r.op == "verify" {
        let (Some(offset), Some(region), Some(count)) = (r.offset, r.region, r.count) else {
            return refuse("usage", "verify: offset, region and count are needed");
        };
        let timeout = Duration::from_millis(r.timeout_ms.unwrap_or(10_000))
            .clamp(Duration::from_millis(100), MAX_VERIFY_TIMEOUT);
        pc.verify(offset, region, count, timeout).await.map(|o| {
            Some(VerifyAnswer {
                verdicts: o.verdicts,
                busy: o.busy,
                exact: o.exact,
            })
        })
    } else {
        let ranges = r
            .ranges
            .iter()
            .flatten()
            .map(|&(o, l)| (tidemark::Offset(o), l))
            .collect();
        pc.repair(ranges).await.map(|()| None)
    };
    match result {
        Ok(verify) => Reply {
            ok: true,
            verify,
            ..Reply::default()
        },
        Err(e) => {
            let kind = match &e {
                EngineError::Timeout(_) => "timeout",
                EngineError::Busy(_) => "busy",
                e if e.is_usage() => "usage",
                _ => "failed",
            };
            refuse(kind, e.to_string())
        }
    }
}

/// Why a system could not be asked.
#[derive(Debug, thiserror::Error)]
pub enum AskError {
    /// Nothing listens: the system is not running (or runs on another host).
    #[error("not running (nothing listens on {0})")]
    NotRunning(String),
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: the daemon said: {error}")]
    Refused { path: String, error: String },
    #[error("{path}: not a reply: {error}")]
    BadReply { path: String, error: String },
}

/// Asks the system whose control socket is `path` for its status document (blocking,
/// each step bounded by `timeout`).
pub fn ask_status(path: &Path, timeout: Duration) -> Result<serde_json::Value, AskError> {
    let reply = ask(
        path,
        &Request {
            op: "status".into(),
            ..Request::default()
        },
        timeout,
    )?;
    match (reply.ok, reply.status) {
        (true, Some(status)) => Ok(status),
        (_, _) => Err(AskError::Refused {
            path: path.display().to_string(),
            error: reply.error.unwrap_or_else(|| "no status".into()),
        }),
    }
}

/// Sends `request` to the system whose control socket is `path` and reads its reply
/// (blocking, each step bounded by `timeout`). A reply with `ok: false` is returned as
/// it is: the caller reads its `error` and `kind`.
pub fn ask(path: &Path, request: &Request, timeout: Duration) -> Result<Reply, AskError> {
    use std::io::{BufRead, Write};
    let shown = path.display().to_string();
    let io = |source| AskError::Io {
        path: shown.clone(),
        source,
    };
    let mut s = match std::os::unix::net::UnixStream::connect(path) {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Err(AskError::NotRunning(shown));
        }
        Err(e) => return Err(io(e)),
    };
    s.set_read_timeout(Some(timeout)).map_err(io)?;
    s.set_write_timeout(Some(timeout)).map_err(io)?;
    let mut text = serde_json::to_vec(request).map_err(|e| io(std::io::Error::other(e)))?;
    text.push(b'\n');
    s.write_all(&text).map_err(io)?;
    let mut line = String::new();
    std::io::BufReader::new(&s)
        .read_line(&mut line)
        .map_err(io)?;
    serde_json::from_str(&line).map_err(|e| AskError::BadReply {
        path: shown.clone(),
        error: e.to_string(),
    })
}
