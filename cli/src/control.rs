//! The control socket: a running system answers `tidemark status` on a Unix socket in
//! its journal directory ([`crate::config::SystemConfig::control_socket`]).
//!
//! Protocol (documented in `docs/operations.md`): the client connects, sends one request
//! as a JSON object on one line (`{"op":"status"}` and a newline), and reads one reply as
//! a JSON object on one line: `{"ok":true,"status":{...}}`, where `status` is the
//! system's status document (what `status.json` holds, with its stable `view`), or
//! `{"ok":false,"error":"..."}`. Then the server closes the connection. A request longer
//! than [`MAX_REQUEST`] bytes, or not sent within [`REQUEST_TIMEOUT`], gets no reply.
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
#[derive(Debug, Serialize, Deserialize)]
pub struct Request {
    /// Only `"status"` so far.
    pub op: String,
}

/// A reply.
#[derive(Debug, Serialize, Deserialize)]
pub struct Reply {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

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
    /// `latest` on it from a task on the current runtime.
    pub fn serve(path: &Path, latest: Latest) -> Result<ControlSocket, ControlError> {
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
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let latest = latest.clone();
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(REQUEST_TIMEOUT, answer(stream, latest)).await;
                });
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

/// Reads one request from `stream` and writes its reply.
async fn answer(stream: tokio::net::UnixStream, latest: Latest) -> std::io::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut line = Vec::new();
    let mut reader = BufReader::new(read).take(MAX_REQUEST as u64 + 1);
    reader.read_until(b'\n', &mut line).await?;
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
                    error: None,
                },
                None => Reply {
                    ok: false,
                    status: None,
                    error: Some("starting: no status sampled yet".into()),
                },
            }
        }
        Ok(r) => Reply {
            ok: false,
            status: None,
            error: Some(format!("unknown op {:?} (known: \"status\")", r.op)),
        },
        Err(e) => Reply {
            ok: false,
            status: None,
            error: Some(format!("bad request: {e}")),
        },
    };
    let mut text = serde_json::to_vec(&reply).map_err(std::io::Error::other)?;
    text.push(b'\n');
    write.write_all(&text).await?;
    write.shutdown().await
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
    s.write_all(b"{\"op\":\"status\"}\n").map_err(io)?;
    let mut line = String::new();
    std::io::BufReader::new(&s)
        .read_line(&mut line)
        .map_err(io)?;
    let reply: Reply = serde_json::from_str(&line).map_err(|e| AskError::BadReply {
        path: shown.clone(),
        error: e.to_string(),
    })?;
    match (reply.ok, reply.status) {
        (true, Some(status)) => Ok(status),
        (_, _) => Err(AskError::Refused {
            path: shown,
            error: reply.error.unwrap_or_else(|| "no status".into()),
        }),
    }
}
