//! Running systems of a config as a process: `tidemark primary`, `secondary` (and the
//! engine start-up that `load` shares with them).

use crate::config::Config;
use crate::control::{ControlSocket, Controls, Latest};
use crate::metrics::Metrics;
use crate::progress::{SyncFigures, SyncProgress};
use crate::view::{Inputs, SystemView};
use crate::watch::Events;
use std::collections::BTreeMap;
use std::fs::File;
use std::io::IsTerminal;
use std::path::Path;
use std::time::Duration;
use tidemark::link::LinkConfig;
use tidemark::SystemId;
use tidemark_actors::engine::{Engine, EngineBuilder, PairSpec, Stats, StoreSpec, UdpTransport};
use tidemark_actors::error::EngineError;
use tidemark_actors::net::udp::UdpStatus;

/// Held while a system runs: an exclusive lock on `journal_dir/LOCK`. The kernel drops
/// it when the process dies, even by `kill -9`.
pub struct SystemLock {
    _file: File,
}

/// Takes the lock of a system's journal directory, creating the directory.
pub fn lock_system(cfg: &Config, system: usize) -> Result<SystemLock, EngineError> {
    let s = &cfg.systems[system];
    std::fs::create_dir_all(&s.journal_dir).map_err(EngineError::io(format!(
        "{} journal_dir {}",
        s.name,
        s.journal_dir.display()
    )))?;
    let path = s.journal_dir.join("LOCK");
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(EngineError::io(path.display().to_string()))?;
    match file.try_lock() {
        Ok(()) => Ok(SystemLock { _file: file }),
        Err(_) => Err(EngineError::Running(s.name.clone())),
    }
}

/// The engine description for the systems `here` of `cfg`, over UDP.
///
/// The link key is the group key derived for the systems' generation
/// ([`crate::failover::link_key`]); the systems run together must share it. A primary
/// whose failback is pending tracks from its start.
pub fn builder(cfg: &Config, here: &[usize]) -> Result<EngineBuilder, EngineError> {
    let group = cfg.read_key()?;
    let mut key = None;
    let mut pending = false;
    for &i in here {
        let k = crate::failover::link_key(cfg, i, &group)?;
        if key.is_some_and(|other| other != k) {
            return Err(EngineError::Config(format!(
                "system {} is at another generation than {}: run them in separate processes",
                cfg.systems[i].name, cfg.systems[here[0]].name
            )));
        }
        key = Some(k);
        pending |= crate::failover::current(cfg, i)?.is_some_and(|g| g.failback_pending);
    }
    let key = key.unwrap_or(group);
    let mut b = EngineBuilder::new();
    b.track_from_start(pending);
    for s in &cfg.systems {
        if s.primary {
            b.primary(&s.name);
        } else {
            b.secondary(&s.name);
        }
    }
    for p in &cfg.pairs {
        for path in [&p.local_path, &p.remote_path] {
            if let Some(dir) = path.parent() {
                let _ = std::fs::create_dir_all(dir);
            }
        }
        let id = b.pair(PairSpec {
            name: p.name.clone(),
            local: SystemId(p.local as u32),
            remote: SystemId(p.remote as u32),
            size: p.size,
            local_store: StoreSpec::File(p.local_path.clone()),
            remote_store: StoreSpec::File(p.remote_path.clone()),
        });
        b.initial_sync(id, p.initial_sync);
    }
    let ids: Vec<SystemId> = here.iter().map(|&i| SystemId(i as u32)).collect();
    for &i in here {
        let s = &cfg.systems[i];
        b.journal(SystemId(i as u32), s.segments_dir(), s.journal_size);
        // Where promote looks for them too (`promote::undo_dir`).
        b.undo_dir(SystemId(i as u32), s.journal_dir.join("undo"));
    }
    let listen = here
        .iter()
        .map(|&i| (SystemId(i as u32), cfg.systems[i].listen))
        .collect();
    let advertise = cfg
        .systems
        .iter()
        .enumerate()
        .map(|(i, s)| (SystemId(i as u32), s.advertise))
        .collect();
    let epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1);
    b.orderer(SystemId(cfg.orderer as u32))
        .heartbeat(cfg.heartbeat)
        .window_bytes(cfg.window as usize)
        .primary_journal(cfg.primary_journal)
        .tracking(cfg.track)
        .pacing(cfg.pace)
        .region_size(cfg.region)
        .time_base(tidemark::timebase::TimeBaseConfig {
            max_skew: cfg.max_clock_skew,
            ..Default::default()
        })
        .run_only(&ids)
        .udp(UdpTransport {
            key,
            listen,
            advertise,
            link: LinkConfig {
                mtu: cfg.mtu,
                // Peers send at most `mtu`; anything much larger is not from a peer.
                max_datagram: (cfg.mtu * 2).max(2048),
                rate: cfg.rate,
                peer_timeout: cfg.peer_timeout,
                compress: cfg.compress,
                ..LinkConfig::default()
            },
            epoch,
        });
    if let Some(offset) = test_clock_offset()? {
        b.wall_clock(move || {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as i128)
                .unwrap_or(0);
            (now + offset).max(0) as u64
        });
    }
    Ok(b)
}

/// Test hook: `TIDEMARK_TEST_CLOCK_OFFSET_MS` (signed) shifts this process's wall clock,
/// to try the time base with skewed hosts on one machine. Not for production.
fn test_clock_offset() -> Result<Option<i128>, EngineError> {
    match std::env::var("TIDEMARK_TEST_CLOCK_OFFSET_MS") {
        Err(_) => Ok(None),
        Ok(v) => v
            .trim()
            .parse::<i64>()
            .map(|ms| Some(i128::from(ms) * 1_000_000))
            .map_err(|e| {
                EngineError::Config(format!(
                    "TIDEMARK_TEST_CLOCK_OFFSET_MS: {v:?} is not a number of milliseconds ({e})"
                ))
            }),
    }
}

/// The split-brain guard as a running system sees it (`status.json` `generation`).
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct GuardStatus {
    /// The system's generation (0: never failed over).
    pub generation: u64,
    /// A primary after `failover`, before `failback`: it talks to no peer.
    pub failback_pending: bool,
    /// Datagrams that did not open under this generation's key (the link's
    /// `dropped_unauthenticated`).
    pub refused_datagrams: u64,
    /// Set while datagrams are refused and no peer is up: what the guard concluded.
    pub error: Option<String>,
}

/// Watches each running system's refused datagrams: a peer at another generation (or
/// with another key) shows as datagrams that fail authentication while no peer is up.
/// Logged once per episode at error level, shown in `status.json`.
#[derive(Default)]
pub struct Guard {
    systems: BTreeMap<usize, GuardStatus>,
}

impl Guard {
    /// The guard of the systems `here` (their generation files were checked at start).
    pub fn new(cfg: &Config, here: &[usize]) -> Guard {
        let systems = here
            .iter()
            .map(|&i| {
                let g = crate::failover::current(cfg, i).ok().flatten();
                (
                    i,
                    GuardStatus {
                        generation: g.as_ref().map_or(0, |g| g.generation),
                        failback_pending: g.is_some_and(|g| g.failback_pending),
                        ..GuardStatus::default()
                    },
                )
            })
            .collect();
        Guard { systems }
    }

    fn update(&mut self, cfg: &Config, i: usize, link: Option<&UdpStatus>) -> Option<GuardStatus> {
        let g = self.systems.get_mut(&i)?;
        let Some(link) = link else {
            return Some(g.clone());
        };
        let refused = link.counters.dropped_unauthenticated;
        let up = link.peers_up.values().any(|&u| u);
        if up {
            if g.error.take().is_some() {
                tracing::info!(system = %cfg.systems[i].name, "a peer answers at this generation again");
            }
        } else if refused > g.refused_datagrams && g.error.is_none() {
            let mut why = format!(
                "split brain guard: {} datagrams did not open under the key of generation {} and no peer is up: a peer runs at another generation (a stale primary after a failover, or an old primary not demoted) or with another group key; everything it sends is refused",
                refused - g.refused_datagrams,
                g.generation
            );
            if g.failback_pending {
                why.push_str(
                    "; this system's failback is pending: it talks to no peer until `tidemark failback` merged the old primary's regions",
                );
            }
            tracing::error!(system = %cfg.systems[i].name, "{why}");
            g.error = Some(why);
        }
        g.refused_datagrams = refused;
        Some(g.clone())
    }
}

/// What a running process reports in `journal_dir/status.json`.
#[derive(serde::Serialize)]
struct Status<'a> {
    /// The split-brain guard: generation, refused datagrams, the conclusion.
    generation: Option<GuardStatus>,
    system: &'a str,
    pid: u32,
    stats: &'a Stats,
    link: Option<&'a UdpStatus>,
    /// The time base, if other processes stamp writes of the group too.
    clock: Option<&'a tidemark_actors::units::timebase::TimeStatus>,
    /// The first fatal failure of the process, or null: a process with a primary stops
    /// because of it; a process of secondaries stays up and reports it.
    failed: Option<&'a tidemark_actors::Failure>,
    /// The operator's view (stable; what `tidemark status` and the metrics show).
    view: &'a SystemView,
}

/// Writes each running system's status file (atomically: write, then rename), with the
/// initial syncs' progress figures ([`SyncProgress`]) added to each copying pair's
/// `sync` and the operator's [`SystemView`] under `view`. Returns the documents written
/// (system index, status document, view).
pub async fn write_status(
    cfg: &Config,
    here: &[usize],
    engine: &Engine,
    progress: &mut SyncProgress,
    guard: &mut Guard,
) -> Vec<(usize, serde_json::Value, SystemView)> {
    let docs = sample_status(cfg, here, engine, progress, guard).await;
    for (i, doc, _) in &docs {
        let s = &cfg.systems[*i];
        let Ok(text) = serde_json::to_string_pretty(doc) else {
            continue;
        };
        let tmp = s.journal_dir.join("status.json.tmp");
        let path = s.journal_dir.join("status.json");
        if std::fs::write(&tmp, &text).is_ok() && std::fs::rename(&tmp, &path).is_ok() {
            continue;
        }
        // No room for a new file (a full file system is what status must report
        // then): rewrite the old one in place, in the blocks it has.
        let _ = std::fs::remove_file(&tmp);
        let _ = rewrite_in_place(&path, &text);
    }
    docs
}

/// Overwrites `path` with `text` without allocating what the file already has: a
/// shorter text is padded with spaces (still one JSON document) rather than truncated.
fn rewrite_in_place(path: &Path, text: &str) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path)?;
    let len = f.metadata()?.len() as usize;
    let mut bytes = text.as_bytes().to_vec();
    if bytes.len() < len {
        bytes.resize(len, b' ');
    }
    f.write_all_at(&bytes, 0)
}

/// Each running system's status document (what `status.json` holds) and view.
pub async fn sample_status(
    cfg: &Config,
    here: &[usize],
    engine: &Engine,
    progress: &mut SyncProgress,
    guard: &mut Guard,
) -> Vec<(usize, serde_json::Value, SystemView)> {
    let Ok(stats) = engine.stats().await else {
        return Vec::new();
    };
    let now_ns = crate::view::now_ns();
    let figures = progress.sample(std::time::Instant::now(), &stats);
    let links: BTreeMap<SystemId, UdpStatus> = engine.link_status();
    let clock = engine.time_status();
    let failed = engine.failure();
    let orderer_here = here.contains(&cfg.orderer);
    let mut out = Vec::new();
    for &i in here {
        let s = &cfg.systems[i];
        let link = links.get(&SystemId(i as u32));
        let view = SystemView::build(&Inputs {
            cfg,
            system: i,
            stats: &stats,
            link,
            clock: clock.as_ref(),
            failed: failed.as_ref(),
            figures: &figures,
            now_ns,
            orderer_here,
        });
        let status = Status {
            generation: guard.update(cfg, i, link),
            system: &s.name,
            pid: std::process::id(),
            stats: &stats,
            link,
            clock: clock.as_ref().filter(|_| s.primary),
            failed: failed.as_ref(),
            view: &view,
        };
        let Ok(mut value) = serde_json::to_value(&status) else {
            continue;
        };
        add_figures(&mut value, &figures);
        out.push((i, value, view));
    }
    out
}

/// Adds each pair's progress figures to its `stats.pairs[i].sync` in a status.
fn add_figures(status: &mut serde_json::Value, figures: &[Option<SyncFigures>]) {
    for (i, f) in figures.iter().enumerate() {
        let Some(Ok(serde_json::Value::Object(add))) = f.as_ref().map(serde_json::to_value) else {
            continue;
        };
        if let Some(serde_json::Value::Object(sync)) =
            status.pointer_mut(&format!("/stats/pairs/{i}/sync"))
        {
            sync.extend(add);
        }
    }
}

/// Runs the systems `here` until SIGINT or SIGTERM, then shuts down cleanly: NBD
/// clients are answered what they have in flight, units and journals are flushed.
pub async fn run_until_signal(cfg: &Config, here: &[usize]) -> Result<(), EngineError> {
    use tidemark_actors::nbd::{AnyListener, EngineBackend, Limits, ListenAddr};
    let _locks: Vec<SystemLock> = here
        .iter()
        .map(|&i| lock_system(cfg, i))
        .collect::<Result<_, _>>()?;
    // Bind the NBD listeners before starting anything: a bad address is a config error.
    let mut listeners = Vec::new();
    // Only a primary serves NBD here; a secondary's `nbd_listen` is for `tidemark export`.
    for &i in here.iter().filter(|&&i| cfg.systems[i].primary) {
        if let Some(a) = &cfg.systems[i].nbd_listen {
            let key = format!("system[{i}] ({}).nbd_listen", cfg.systems[i].name);
            let addr: ListenAddr = a
                .parse()
                .map_err(|e| EngineError::Config(format!("{key}: {e}")))?;
            // The config check already refused an exposed address without TLS; the
            // TLS files are read now, so a bad certificate or key fails the start.
            cfg.systems[i].check_nbd_exposure(&key, &addr)?;
            let tls = cfg.systems[i].load_nbd_tls(i)?;
            let l = AnyListener::bind(&addr)
                .await
                .map_err(EngineError::io(format!("{key}: cannot listen on {addr}")))?;
            let l = l.into_std().map_err(EngineError::io(key))?;
            listeners.push((SystemId(i as u32), l, tls));
        }
    }
    // Metrics listeners and control sockets too: a bad or busy address fails the start.
    let mut metrics_listeners = Vec::new();
    for &i in here {
        if let Some(addr) = cfg.systems[i].metrics_listen {
            let key = format!("system[{i}] ({}).metrics_listen", cfg.systems[i].name);
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(EngineError::io(format!("{key}: cannot listen on {addr}")))?;
            metrics_listeners.push((i, l));
        }
    }
    let ops = Ops::start(cfg, here, metrics_listeners)?;
    let engine = std::sync::Arc::new(builder(cfg, here)?.start()?);
    ops.engine_started(cfg, &engine);
    let names: Vec<&str> = here.iter().map(|&i| cfg.systems[i].name.as_str()).collect();
    tracing::info!(systems = ?names, "running");
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut servers = Vec::new();
    for (system, l, tls) in listeners {
        let backend = std::sync::Arc::new(EngineBackend::new(engine.clone()));
        let mut rx = stop_rx.clone();
        let stop = async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        // The server runs on the thread of the system's units: a client's requests reach
        // them, and their answers come back, without waking another thread.
        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
        let run = async move {
            match AnyListener::from_std(l) {
                Ok(l) => l.serve(backend, Limits::default(), tls, stop).await,
                Err(e) => tracing::error!("nbd: cannot serve: {e}"),
            }
            let _ = done_tx.send(());
        };
        match engine.unit_arbiter(system) {
            Some(arbiter) => {
                if !arbiter.spawn(run) {
                    return Err(EngineError::Stopped);
                }
            }
            None => drop(actix_rt::spawn(run)),
        }
        servers.push(done_rx);
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(EngineError::io("cannot watch SIGTERM"))?;
    let mut every = tokio::time::interval(Duration::from_millis(500));
    let health = engine.health().clone();
    // Initial syncs: bars on a terminal, log lines otherwise.
    let mut progress = SyncProgress::new(std::io::stderr().is_terminal());
    let mut guard = Guard::new(cfg, here);
    // A process of secondaries only stays up after a disk or journal failure: the failed
    // part applies nothing more (the remote stays the cut it was), and status, the
    // control socket and the metrics keep saying why until the operator restarts it. A
    // process with a primary stops (its clients get errors, and a restart recovers).
    let stay_up = here.iter().all(|&i| !cfg.systems[i].primary);
    let mut failure = None;
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
            f = health.failed(), if failure.is_none() => {
                failure = Some(f);
                if !stay_up {
                    break;
                }
                tracing::error!(systems = ?names, "a secondary failed: it applies nothing more and reports the failure until it is restarted");
                ops.publish(write_status(cfg, here, &engine, &mut progress, &mut guard).await);
            }
            _ = every.tick() => ops.publish(write_status(cfg, here, &engine, &mut progress, &mut guard).await),
        }
    }
    tracing::info!(systems = ?names, failed = failure.is_some(), "stopping");
    let _ = stop_tx.send(true);
    // No client waits any more: writes not yet journaled are failed, and so are
    // acknowledgements the time base holds. What is journaled stays and replicates
    // after a restart.
    engine.stopping();
    let graceful = async {
        for s in servers {
            let _ = s.await;
        }
        ops.publish(write_status(cfg, here, &engine, &mut progress, &mut guard).await);
        // The control sockets and metrics go with the engine: a stopped system has none.
        drop(ops);
        match std::sync::Arc::try_unwrap(engine) {
            Ok(engine) => engine.shutdown().await,
            Err(_) => Err(EngineError::Stopped),
        }
    };
    // Bounded whatever state the disks and the network are in: past the grace period
    // (or on a second signal) the process exits; recovery at the next start is the
    // same as after a crash, which loses nothing acknowledged (I3).
    tokio::select! {
        // A failed part makes the exit non-zero whatever the shutdown did.
        r = graceful => match failure {
            Some(f) => Err(EngineError::Failed(f)),
            None => r,
        },
        _ = tokio::time::sleep(SHUTDOWN_GRACE) => {
            tracing::error!(grace_s = SHUTDOWN_GRACE.as_secs(), "shutdown did not finish; exiting (the journal recovers as after a crash)");
            Err(EngineError::Shutdown(format!("did not finish within {} s", SHUTDOWN_GRACE.as_secs())))
        }
        _ = tokio::signal::ctrl_c() => Err(EngineError::Shutdown("interrupted again while stopping".into())),
        _ = term.recv() => Err(EngineError::Shutdown("terminated again while stopping".into())),
    }
}

/// What a running daemon offers operators besides `status.json`: a control socket per
/// system, metrics per system with `metrics_listen`, and log lines for events. Dropping
/// it closes the sockets (and removes the control sockets' files).
struct Ops {
    latest: BTreeMap<usize, Latest>,
    /// Each system's pairs for `verify` and `repair` (set once the engine started).
    controls: BTreeMap<usize, Controls>,
    metrics: BTreeMap<usize, std::sync::Arc<Metrics>>,
    _sockets: Vec<ControlSocket>,
    servers: Vec<tokio::task::JoinHandle<()>>,
    events: std::cell::RefCell<Events>,
}

impl Ops {
    /// Opens the control socket of every system `here` and serves metrics on
    /// `listeners`.
    fn start(
        cfg: &Config,
        here: &[usize],
        listeners: Vec<(usize, tokio::net::TcpListener)>,
    ) -> Result<Ops, EngineError> {
        let mut latest = BTreeMap::new();
        let mut sockets = Vec::new();
        let mut control_of = BTreeMap::new();
        for &i in here {
            let controls = Controls::default();
            control_of.insert(i, controls.clone());
            let l = Latest::default();
            let path = cfg.systems[i].control_socket();
            let socket = ControlSocket::serve(&path, l.clone(), controls.clone()).map_err(
                |crate::control::ControlError::Io { path, source }| EngineError::Io {
                    what: format!("system {}: control socket {path}", cfg.systems[i].name),
                    source,
                },
            )?;
            sockets.push(socket);
            latest.insert(i, l);
        }
        let mut metrics = BTreeMap::new();
        let mut servers = Vec::new();
        for (i, l) in listeners {
            let m = std::sync::Arc::new(Metrics::new());
            servers.push(tokio::spawn(crate::metrics::serve(l, m.clone())));
            metrics.insert(i, m);
        }
        Ok(Ops {
            latest,
            controls: control_of,
            metrics,
            _sockets: sockets,
            servers,
            events: Default::default(),
        })
    }

    /// The engine started: each system's control socket takes `verify` and `repair`
    /// requests for the pairs whose local units it runs.
    fn engine_started(&self, cfg: &Config, engine: &Engine) {
        let all = engine.controls();
        for (i, c) in &self.controls {
            let mine = all
                .iter()
                .filter(|p| {
                    cfg.pairs
                        .get(p.id.0 as usize)
                        .is_some_and(|pc| pc.local == *i)
                })
                .cloned()
                .collect();
            let _ = c.set(mine);
        }
    }

    /// Hands fresh status documents to the control sockets and metrics, and logs what
    /// changed.
    fn publish(&self, docs: Vec<(usize, serde_json::Value, SystemView)>) {
        for (i, doc, view) in docs {
            if let Some(m) = self.metrics.get(&i) {
                m.update(&view);
            }
            self.events.borrow_mut().observe(&view);
            if let Some(l) = self.latest.get(&i) {
                if let Ok(mut g) = l.lock() {
                    *g = Some(doc);
                }
            }
        }
    }
}

impl Drop for Ops {
    fn drop(&mut self) {
        for s in &self.servers {
            s.abort();
        }
    }
}

/// How long a stopping daemon waits for its clients to be answered and its units and
/// journals to be flushed before it exits anyway.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Reads a status file written by a running (or stopped) system.
pub fn read_status(dir: &Path) -> Option<serde_json::Value> {
    let text = std::fs::read_to_string(dir.join("status.json")).ok()?;
    serde_json::from_str(&text).ok()
}
