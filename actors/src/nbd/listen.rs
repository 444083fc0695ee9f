//! Where clients connect: [`ListenAddr`] (TCP or Unix), the [`Listener`] trait and
//! [`AnyListener`], a bound listener of either kind.

use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, UnixListener};
use tracing::debug;

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
}
