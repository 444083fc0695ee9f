//! Shared by the NBD tests of this crate (included with `#[path]`; in a folder, so it is
//! no test target of its own): an engine with one primary and one secondary plus the
//! NBD server on 127.0.0.1, running in an actix system on a background thread, and
//! helpers to run client programs.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::thread::JoinHandle;
use tidemark::{BlockStore, Offset};
use tidemark_actors::nbd::{serve, AnyListener, EngineBackend, Limits, ListenAddr};
use tidemark_actors::{EngineBuilder, PairSpec, StoreSpec};

/// One pair to create: name, size, whether its units are files (else memory).
pub struct Unit {
    pub name: &'static str,
    pub size: u64,
    pub file: bool,
}

enum Cmd {
    Drain(std::sync::mpsc::Sender<Result<(), String>>),
}

struct Ready {
    addr: SocketAddr,
    socket: PathBuf,
    stores: Vec<(Arc<dyn BlockStore>, Arc<dyn BlockStore>)>,
}

/// A running engine and NBD server.
pub struct Harness {
    pub addr: SocketAddr,
    /// The same exports on a Unix socket.
    pub socket: PathBuf,
    pub units: Vec<(String, u64)>,
    stores: Vec<(Arc<dyn BlockStore>, Arc<dyn BlockStore>)>,
    cmds: Option<tokio::sync::mpsc::UnboundedSender<Cmd>>,
    thread: Option<JoinHandle<()>>,
    pub dir: tempfile::TempDir,
}

impl Harness {
    pub fn start(units: &[Unit]) -> Harness {
        Self::start_with(units, Limits::default())
    }

    pub fn start_with(units: &[Unit], limits: Limits) -> Harness {
        let dir = tempfile::tempdir().expect("tempdir");
        let specs: Vec<(String, u64, StoreSpec, StoreSpec)> = units
            .iter()
            .map(|u| {
                let (l, r) = if u.file {
                    (
                        StoreSpec::File(dir.path().join(format!("{}.local", u.name))),
                        StoreSpec::File(dir.path().join(format!("{}.remote", u.name))),
                    )
                } else {
                    (StoreSpec::Memory, StoreSpec::Memory)
                };
                (u.name.to_string(), u.size, l, r)
            })
            .collect();
        let socket = dir.path().join("nbd.sock");
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Ready>();
        let (cmd_tx, mut cmd_rx) = tokio::sync::mpsc::unbounded_channel::<Cmd>();
        let thread = std::thread::spawn(move || {
            actix_rt::System::new().block_on(async move {
                let mut b = EngineBuilder::new();
                b.threads(2);
                let a = b.primary("a");
                let r = b.secondary("b");
                let mut ids = Vec::new();
                for (name, size, l, rs) in specs {
                    ids.push(b.pair(PairSpec {
                        name,
                        local: a,
                        remote: r,
                        size,
                        local_store: l,
                        remote_store: rs,
                    }));
                }
                let engine = Arc::new(b.start().expect("the engine starts"));
                let stores = ids
                    .iter()
                    .map(|&p| {
                        (
                            engine.store(p, false).expect("local store"),
                            engine.store(p, true).expect("remote store"),
                        )
                    })
                    .collect();
                let backend = Arc::new(EngineBackend::new(engine.clone()));
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                    .await
                    .expect("bind");
                let addr = listener.local_addr().expect("local addr");
                // The Unix socket goes through the path a daemon uses: a parsed address.
                let unix_addr: ListenAddr = format!("unix:{}", socket.display())
                    .parse()
                    .expect("a unix address");
                let unix = AnyListener::bind(&unix_addr)
                    .await
                    .expect("bind unix socket");
                assert_eq!(unix.local_addr().expect("unix addr"), unix_addr);
                let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
                let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
                    let _ = rx.wait_for(|s| *s).await;
                };
                let tcp_server = tokio::spawn(serve(
                    listener,
                    backend.clone(),
                    limits,
                    None,
                    stopped(stop_rx.clone()),
                ));
                let unix_server = tokio::spawn(unix.serve(backend, limits, None, stopped(stop_rx)));
                ready_tx
                    .send(Ready {
                        addr,
                        socket,
                        stores,
                    })
                    .expect("test waits");
                while let Some(cmd) = cmd_rx.recv().await {
                    match cmd {
                        Cmd::Drain(tx) => {
                            let _ = tx.send(engine.drain().await.map_err(|e| e.to_string()));
                        }
                    }
                }
                let _ = stop_tx.send(true);
                tcp_server.await.expect("the TCP server task ends cleanly");
                unix_server
                    .await
                    .expect("the Unix server task ends cleanly");
                let engine = Arc::try_unwrap(engine)
                    .ok()
                    .expect("the server released the engine");
                engine.shutdown().await.expect("the engine shuts down");
            });
        });
        let ready = ready_rx.recv().expect("the engine thread starts");
        Harness {
            addr: ready.addr,
            socket: ready.socket,
            units: units.iter().map(|u| (u.name.to_string(), u.size)).collect(),
            stores: ready.stores,
            cmds: Some(cmd_tx),
            thread: Some(thread),
            dir,
        }
    }

    /// `nbd://127.0.0.1:PORT/EXPORT`
    pub fn uri(&self, export: &str) -> String {
        format!("nbd://{}/{}", self.addr, export)
    }

    /// `nbd+unix:///EXPORT?socket=PATH`
    pub fn unix_uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.socket.display())
    }

    /// Waits until the remote units have applied everything written so far.
    pub fn drain(&self) {
        let (tx, rx) = std::sync::mpsc::channel();
        self.cmds
            .as_ref()
            .expect("running")
            .send(Cmd::Drain(tx))
            .expect("engine thread alive");
        rx.recv().expect("drain answered").expect("drain");
    }

    fn read(store: &Arc<dyn BlockStore>) -> Vec<u8> {
        let mut buf = vec![0u8; store.size() as usize];
        store.read_at(Offset(0), &mut buf).expect("read unit");
        buf
    }

    /// The local unit of pair `i`.
    pub fn local(&self, i: usize) -> Vec<u8> {
        Self::read(&self.stores[i].0)
    }

    /// The remote unit of pair `i`.
    pub fn remote(&self, i: usize) -> Vec<u8> {
        Self::read(&self.stores[i].1)
    }

    /// Drains, then checks that the remote unit of pair `i` equals its local unit.
    pub fn assert_replicated(&self, i: usize) {
        self.drain();
        let (l, r) = (self.local(i), self.remote(i));
        if let Some(at) = l.iter().zip(&r).position(|(a, b)| a != b) {
            panic!(
                "pair {}: remote differs from local at byte {at} ({} != {})",
                self.units[i].0, r[at], l[at]
            );
        }
    }

    /// Stops the server and the engine, failing on any error there.
    pub fn finish(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        self.cmds.take();
        if let Some(t) = self.thread.take() {
            if t.join().is_err() && !std::thread::panicking() {
                panic!("the engine thread panicked");
            }
        }
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Runs a program; fails the test with its output unless it exits 0.
pub fn run(program: &str, args: &[&str]) -> Output {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    if !out.status.success() {
        panic!(
            "{program} {} failed ({}):\nstdout:\n{}\nstderr:\n{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out
}

/// Deterministic pseudo-random bytes with some runs of zeroes (so that image tools
/// find holes to skip or zero).
pub fn image_bytes(len: usize, seed: u64) -> Vec<u8> {
    use rand::{RngCore, SeedableRng};
    let mut rng = rand_pcg::Pcg64::seed_from_u64(seed);
    let mut v = vec![0u8; len];
    rng.fill_bytes(&mut v);
    // Zero every fourth 64 KiB block, and an odd-sized stretch.
    for (i, chunk) in v.chunks_mut(64 << 10).enumerate() {
        if i % 4 == 1 {
            chunk.fill(0);
        }
    }
    let odd = len / 3;
    v[odd..odd + 12_345].fill(0);
    v
}

pub fn write_file(path: &Path, bytes: &[u8]) -> PathBuf {
    std::fs::write(path, bytes).expect("write image file");
    path.to_path_buf()
}

mod programs;
#[allow(unused_imports)] // not every test file uses it
pub use programs::have;
