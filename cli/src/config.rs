//! The deployment config (TOML): systems, pairs, the group's key and orderer.
//!
//! Every key is documented in `docs/operations.md` and, with its unit and default, in the
//! commented example `examples/tidemark.toml` (a unit test parses it). Relative paths
//! are relative to the directory of the config file. Loading checks everything it can
//! without touching the disks; each problem is an error naming the key.

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tidemark_actors::engine::TrackConfig;
use tidemark_actors::error::EngineError;
use tidemark_actors::nbd::{ListenAddr, ServerTls, TlsFile, TlsFiles};
use tidemark_actors::{InitialSync, PrimaryJournal};

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    key_file: PathBuf,
    orderer: String,
    #[serde(default = "default_heartbeat")]
    heartbeat_ms: u64,
    #[serde(default = "default_peer_timeout")]
    peer_timeout_ms: u64,
    #[serde(default = "default_mtu")]
    mtu: usize,
    /// Pacing per link, e.g. "1GiB" (per second); absent or "0" = unpaced.
    #[serde(default)]
    rate: Option<String>,
    /// Per pair: writers wait while this much is unacknowledged by the remote.
    #[serde(default)]
    window: Option<String>,
    /// Largest clock skew tolerated between primary processes (commit-wait bound).
    #[serde(default = "default_max_clock_skew")]
    max_clock_skew_ms: u64,
    /// "track" (default) or "block": what a full journal or window does to writers.
    #[serde(default)]
    on_journal_full: Option<String>,
    /// Track once the remote has not answered for this long while writes wait on it;
    /// 0 = never on silence alone.
    #[serde(default = "default_suspend_after")]
    suspend_after_ms: u64,
    /// Bytes per region of the dirty-region map, e.g. "64KiB".
    #[serde(default)]
    region_size: Option<String>,
    /// The group's recovery point objective: a pair whose commit lag exceeds it is
    /// flagged (status, metrics) and logged.
    #[serde(default)]
    rpo_target_ms: Option<u64>,
    /// Hold client write acknowledgements to keep the lag near `rpo_target_ms`.
    #[serde(default)]
    pace_writes: bool,
    /// The longest a write acknowledgement is held by pacing (default 50).
    #[serde(default)]
    pace_max_delay_ms: Option<u64>,
    /// "zstd" to compress write data on the wire; absent or "off": raw.
    #[serde(default)]
    compress: Option<String>,
    /// "data" (default) or "activity-log": what a primary's journal keeps of a write.
    #[serde(default)]
    primary_journal: Option<String>,
    /// zstd level, 1..=19 (default 3).
    #[serde(default)]
    compress_level: Option<i32>,
    #[serde(default)]
    system: Vec<RawSystem>,
    #[serde(default)]
    pair: Vec<RawPair>,
}

fn default_heartbeat() -> u64 {
    10
}
fn default_peer_timeout() -> u64 {
    3000
}
fn default_suspend_after() -> u64 {
    2000
}
fn default_max_clock_skew() -> u64 {
    20
}
fn default_mtu() -> usize {
    1400
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RawSystem {
    name: String,
    role: String,
    listen: String,
    advertise: Option<String>,
    journal_dir: PathBuf,
    journal_size: Option<String>,
    nbd_listen: Option<String>,
    /// PEM files: the NBD server's certificate (chain) and its private key; with both,
    /// every NBD client must use TLS.
    nbd_tls_cert: Option<PathBuf>,
    nbd_tls_key: Option<PathBuf>,
    /// PEM file of the CA(s) whose certificates NBD clients must present.
    nbd_tls_client_ca: Option<PathBuf>,
    /// Serve NBD in plain text on a non-loopback address all the same.
    nbd_insecure: Option<bool>,
    metrics_listen: Option<String>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RawPair {
    name: String,
    size: String,
    local: RawEnd,
    remote: RawEnd,
    /// `"auto"` (default), `"full"` or `"none"`.
    initial_sync: Option<String>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RawEnd {
    system: String,
    path: PathBuf,
}

/// A system of the config.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SystemConfig {
    pub name: String,
    pub primary: bool,
    pub listen: SocketAddr,
    pub advertise: SocketAddr,
    pub journal_dir: PathBuf,
    pub journal_size: u64,
    /// Primary: where `tidemark primary` serves the local units. Secondary: where
    /// `tidemark export` serves the remote units read-only after a promote (the
    /// `secondary` daemon itself never serves NBD).
    pub nbd_listen: Option<String>,
    /// `nbd_tls_cert`, `nbd_tls_key` and `nbd_tls_client_ca` (paths resolved): every
    /// NBD client of this system (daemon or `export`) must use TLS.
    pub nbd_tls: Option<TlsFiles>,
    /// `nbd_insecure`: plain NBD on an address other hosts can reach is allowed.
    pub nbd_insecure: bool,
    /// Where the running system serves Prometheus metrics over HTTP (`/metrics`).
    pub metrics_listen: Option<SocketAddr>,
}

impl SystemConfig {
    /// Where the system's journal segments live (under `journal_dir`, beside its `LOCK`
    /// and `status.json`).
    pub fn segments_dir(&self) -> PathBuf {
        self.journal_dir.join("segments")
    }

    /// Refuses to serve NBD in plain text at `addr` (from the config key or option
    /// `key`) if other hosts can reach it: NBD has no authentication, so such an
    /// export is a write path for anyone on the network. Loopback addresses and Unix
    /// sockets are local; anything else needs TLS (`nbd_tls_cert`, `nbd_tls_key`) or
    /// `nbd_insecure = true`.
    pub fn check_nbd_exposure(&self, key: &str, addr: &ListenAddr) -> Result<(), EngineError> {
        let local = match addr {
            ListenAddr::Unix(_) => true,
            ListenAddr::Tcp(a) => a.ip().to_canonical().is_loopback(),
        };
        if local || self.nbd_tls.is_some() || self.nbd_insecure {
            return Ok(());
        }
        bad(format!(
            "{key}: {addr} is not a loopback address, and NBD has no authentication: \
             anyone who can reach it could read and write the units. Configure TLS for \
             system {:?} (nbd_tls_cert and nbd_tls_key, and nbd_tls_client_ca to require \
             client certificates), or set nbd_insecure = true to serve plain NBD there \
             anyway",
            self.name
        ))
    }

    /// Loads the system's NBD TLS credentials, if it has any ([`ServerTls::load`]); a
    /// file that cannot be used is a config error naming its key. `i` is the system's
    /// index in the config (for the key).
    pub fn load_nbd_tls(&self, i: usize) -> Result<Option<ServerTls>, EngineError> {
        let Some(files) = &self.nbd_tls else {
            return Ok(None);
        };
        ServerTls::load(files).map(Some).map_err(|e| {
            let k = match e.file {
                TlsFile::Cert => "nbd_tls_cert",
                TlsFile::Key => "nbd_tls_key",
                TlsFile::ClientCa => "nbd_tls_client_ca",
            };
            EngineError::Config(format!("system[{i}] ({}).{k}: {e}", self.name))
        })
    }

    /// The running system's control socket (`tidemark status` talks to it): a Unix
    /// socket, mode 0600, that exists only while the system runs.
    pub fn control_socket(&self) -> PathBuf {
        self.journal_dir.join("control.sock")
    }
}

/// A pair of the config; `local`/`remote` index [`Config::systems`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PairConfig {
    pub name: String,
    pub size: u64,
    pub local: usize,
    pub local_path: PathBuf,
    pub remote: usize,
    pub remote_path: PathBuf,
    /// Whether the local unit is copied to the remote when the pair first starts
    /// (`initial_sync`; default [`InitialSync::Auto`]: if it holds data).
    pub initial_sync: InitialSync,
}

/// A checked config.
#[derive(Clone, Debug)]
pub struct Config {
    pub path: PathBuf,
    pub key_file: PathBuf,
    pub orderer: usize,
    pub heartbeat: Duration,
    pub peer_timeout: Duration,
    pub mtu: usize,
    pub rate: u64,
    pub window: u64,
    pub max_clock_skew: Duration,
    /// When a primary pair tracks dirty regions instead of shipping (`on_journal_full`,
    /// `suspend_after_ms`).
    pub track: TrackConfig,
    /// `region_size`: bytes per region of the dirty-region map.
    pub region: u64,
    /// `rpo_target_ms`: a pair whose commit lag exceeds it is flagged and logged.
    pub rpo_target: Option<Duration>,
    /// `pace_writes` (with `pace_max_delay_ms`): write pacing's rule, if on.
    pub pace: Option<tidemark::pace::PaceRule>,
    /// zstd level for write data on the wire (`None`: sent raw).
    pub compress: Option<i32>,
    /// `primary_journal`: what a primary's journal keeps of each client write.
    pub primary_journal: PrimaryJournal,
    pub systems: Vec<SystemConfig>,
    pub pairs: Vec<PairConfig>,
}

fn bad<T>(m: impl Into<String>) -> Result<T, EngineError> {
    Err(EngineError::Config(m.into()))
}

/// Parses a size like `64MiB`, `1GiB`, `4096`.
pub fn parse_size(key: &str, s: &str) -> Result<u64, EngineError> {
    match s.trim().parse::<bytesize::ByteSize>() {
        Ok(b) => Ok(b.as_u64()),
        Err(e) => bad(format!("{key}: {s:?} is not a size ({e})")),
    }
}

/// How `listen`, `advertise` and `metrics_listen` become addresses: the first address
/// of the text, or none.
pub(crate) type Lookup = fn(&str) -> std::io::Result<Option<SocketAddr>>;

/// The system's resolver: an IP address and port, or a host name and port.
fn lookup_host(s: &str) -> std::io::Result<Option<SocketAddr>> {
    s.to_socket_addrs().map(|mut a| a.next())
}

fn parse_addr(key: &str, s: &str, lookup: Lookup) -> Result<SocketAddr, EngineError> {
    match lookup(s) {
        Ok(Some(a)) => Ok(a),
        Ok(None) => bad(format!("{key}: {s:?} resolves to no address")),
        Err(e) => bad(format!("{key}: {s:?} is not an address ({e})")),
    }
}

impl Config {
    /// Reads and checks the config at `path`.
    pub fn load(path: &Path) -> Result<Config, EngineError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| EngineError::Config(format!("{}: {e}", path.display())))?;
        let base = path.parent().unwrap_or(Path::new(".")).to_path_buf();
        Self::parse(&text, &base, path)
    }

    /// Checks a config's text; relative paths are taken relative to `base`, and `path`
    /// (the file the text came from) names the file in TOML syntax errors and is kept in
    /// [`Config::path`].
    ///
    /// The checks run in this order, and the first failure is the error: the TOML
    /// itself and its keys (unknown keys, missing required keys, wrong types), the
    /// group-wide settings (`Globals::parse`), the systems (`parse_system`, each in
    /// file order), `orderer` (names a system), the pairs (`parse_pair`, each in file
    /// order). `key_file` is only resolved here; [`Config::read_key`] reads it.
    pub fn parse(text: &str, base: &Path, path: &Path) -> Result<Config, EngineError> {
        Self::parse_with(text, base, path, lookup_host)
    }

    /// [`Config::parse`] with addresses looked up by `lookup` (the fuzz target takes IP
    /// addresses only, so that it never looks a name up).
    pub(crate) fn parse_with(
        text: &str,
        base: &Path,
        path: &Path,
        lookup: Lookup,
    ) -> Result<Config, EngineError> {
        let raw: RawConfig = toml::from_str(text)
            .map_err(|e| EngineError::Config(format!("{}: {e}", path.display())))?;
        let globals = Globals::parse(&raw)?;
        if raw.system.is_empty() {
            return bad("system: at least one [[system]] is needed");
        }
        let mut systems = Systems::default();
        for (i, s) in raw.system.iter().enumerate() {
            parse_system(i, s, base, lookup, &mut systems)?;
        }
        let Some(&orderer) = systems.index.get(&raw.orderer) else {
            return bad(format!("orderer: no system is named {:?}", raw.orderer));
        };
        if raw.pair.is_empty() {
            return bad("pair: at least one [[pair]] is needed");
        }
        let mut pairs = Pairs::default();
        for (i, p) in raw.pair.iter().enumerate() {
            parse_pair(i, p, base, &systems, &mut pairs)?;
        }
        Ok(Config {
            path: path.to_path_buf(),
            key_file: resolve(base, &raw.key_file),
            orderer,
            heartbeat: globals.heartbeat,
            peer_timeout: globals.peer_timeout,
            mtu: globals.mtu,
            rate: globals.rate,
            window: globals.window,
            max_clock_skew: globals.max_clock_skew,
            track: globals.track,
            region: globals.region,
            rpo_target: globals.rpo_target,
            pace: globals.pace,
            compress: globals.compress,
            primary_journal: globals.primary_journal,
            systems: systems.list,
            pairs: pairs.list,
        })
    }

    /// The index of the system called `name`.
    pub fn system(&self, name: &str) -> Result<usize, EngineError> {
        self.systems
            .iter()
            .position(|s| s.name == name)
            .ok_or_else(|| {
                EngineError::Config(format!(
                    "--system: no system is named {name:?} in {}",
                    self.path.display()
                ))
            })
    }

    /// The systems of one role, or the one named (which must have that role).
    pub fn select(&self, name: Option<&str>, primary: bool) -> Result<Vec<usize>, EngineError> {
        let role = if primary { "primary" } else { "secondary" };
        match name {
            Some(n) => {
                let i = self.system(n)?;
                if self.systems[i].primary != primary {
                    return bad(format!("--system: {n:?} is not a {role}"));
                }
                Ok(vec![i])
            }
            None => Ok((0..self.systems.len())
                .filter(|&i| self.systems[i].primary == primary)
                .collect()),
        }
    }

    /// Reads the group key file: 64 hex digits (as `tidemark keygen` writes them).
    pub fn read_key(&self) -> Result<[u8; 32], EngineError> {
        read_key(&self.key_file)
    }
}

/// `p` if absolute, else `p` under `base` (the config file's directory).
fn resolve(base: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

/// The group-wide settings (the top-level keys other than `key_file`, `orderer` and the
/// tables), checked.
struct Globals {
    heartbeat: Duration,
    peer_timeout: Duration,
    mtu: usize,
    rate: u64,
    window: u64,
    max_clock_skew: Duration,
    track: TrackConfig,
    region: u64,
    rpo_target: Option<Duration>,
    pace: Option<tidemark::pace::PaceRule>,
    compress: Option<i32>,
    primary_journal: PrimaryJournal,
}

impl Globals {
    /// Checks, in this order: `heartbeat_ms` and `max_clock_skew_ms` lie in 1..=10000,
    /// `peer_timeout_ms` is at least twice `heartbeat_ms`, `mtu` lies in 576..=65000,
    /// `rate` and `window` (if given) are sizes, `on_journal_full` is `"track"` or
    /// `"block"`, `suspend_after_ms` is at most 3600000, `region_size` is a power of two
    /// from 4 KiB to 1 GiB, `rpo_target_ms` (if given) lies in 1..=86400000. Fills in
    /// the defaults: `rate` 0 (unpaced), `window` 64 MiB, `on_journal_full` track,
    /// `suspend_after_ms` 2000, `region_size` 64 KiB, no RPO target. `compress` is
    /// `"off"` (the default) or `"zstd"`, `compress_level` 1..=19 (default 3) and only
    /// with `compress = "zstd"`. `primary_journal` is `"data"` (the default) or
    /// `"activity-log"`.
    fn parse(raw: &RawConfig) -> Result<Globals, EngineError> {
        if raw.heartbeat_ms == 0 || raw.heartbeat_ms > 10_000 {
            return bad(format!(
                "heartbeat_ms: {} is outside 1..=10000",
                raw.heartbeat_ms
            ));
        }
        if raw.max_clock_skew_ms == 0 || raw.max_clock_skew_ms > 10_000 {
            return bad(format!(
                "max_clock_skew_ms: {} is outside 1..=10000",
                raw.max_clock_skew_ms
            ));
        }
        if raw.peer_timeout_ms < raw.heartbeat_ms * 2 {
            return bad("peer_timeout_ms: must be at least twice heartbeat_ms");
        }
        if !(576..=65_000).contains(&raw.mtu) {
            return bad(format!("mtu: {} is outside 576..=65000", raw.mtu));
        }
        let rate = match &raw.rate {
            Some(r) => parse_size("rate", r)?,
            None => 0,
        };
        let window = match &raw.window {
            Some(w) => parse_size("window", w)?,
            None => 64 << 20,
        };
        let on_full = match raw.on_journal_full.as_deref() {
            None | Some("track") => true,
            Some("block") => false,
            Some(other) => {
                return bad(format!(
                    "on_journal_full: {other:?} is neither \"track\" nor \"block\""
                ))
            }
        };
        if raw.suspend_after_ms > 3_600_000 {
            return bad(format!(
                "suspend_after_ms: {} is above 3600000 (an hour); 0 turns it off",
                raw.suspend_after_ms
            ));
        }
        let region = match &raw.region_size {
            Some(r) => parse_size("region_size", r)?,
            None => tidemark::dirty::DEFAULT_REGION,
        };
        if !region.is_power_of_two() || !(4096..=1 << 30).contains(&region) {
            return bad(format!(
                "region_size: {region} bytes is not a power of two from 4KiB to 1GiB"
            ));
        }
        let rpo_target = match raw.rpo_target_ms {
            None => None,
            Some(ms @ 1..=86_400_000) => Some(Duration::from_millis(ms)),
            Some(ms) => {
                return bad(format!(
                "rpo_target_ms: {ms} is outside 1..=86400000 (a day); leave it out for no target"
            ))
            }
        };
        let pace =
            match (raw.pace_writes, rpo_target, raw.pace_max_delay_ms) {
                (false, _, None) => None,
                (false, _, Some(_)) => {
                    return bad("pace_max_delay_ms: set pace_writes = true to use it")
                }
                (true, None, _) => return bad(
                    "pace_writes: needs rpo_target_ms (pacing holds the commit lag at that target)",
                ),
                (true, Some(target), ms) => {
                    let max_delay = match ms {
                        None => tidemark::pace::DEFAULT_MAX_DELAY,
                        Some(ms @ 1..=10_000) => Duration::from_millis(ms),
                        Some(ms) => {
                            return bad(format!("pace_max_delay_ms: {ms} is outside 1..=10000"))
                        }
                    };
                    Some(tidemark::pace::PaceRule { target, max_delay })
                }
            };
        let track = TrackConfig {
            suspend_after: (raw.suspend_after_ms > 0)
                .then(|| Duration::from_millis(raw.suspend_after_ms)),
            on_full,
        };
        let compress = match (raw.compress.as_deref(), raw.compress_level) {
            (None | Some("off"), None) => None,
            (None | Some("off"), Some(_)) => {
                return bad("compress_level: set compress = \"zstd\" to use it")
            }
            (Some("zstd"), level) => {
                let level = level.unwrap_or(3);
                if !(1..=19).contains(&level) {
                    return bad(format!("compress_level: {level} is outside 1..=19"));
                }
                Some(level)
            }
            (Some(other), _) => {
                return bad(format!("compress: {other:?} is not \"off\" or \"zstd\""))
            }
        };
        let primary_journal = match raw.primary_journal.as_deref() {
            None | Some("data") => PrimaryJournal::Data,
            Some("activity-log") => PrimaryJournal::ActivityLog,
            Some(other) => {
                return bad(format!(
                    "primary_journal: {other:?} is neither \"data\" nor \"activity-log\""
                ))
            }
        };
        Ok(Globals {
            primary_journal,
            track,
            region,
            rpo_target,
            pace,
            compress,
            heartbeat: Duration::from_millis(raw.heartbeat_ms),
            peer_timeout: Duration::from_millis(raw.peer_timeout_ms),
            mtu: raw.mtu,
            rate,
            window,
            max_clock_skew: Duration::from_millis(raw.max_clock_skew_ms),
        })
    }
}

/// The systems checked so far, and what later ones must not reuse.
#[derive(Default)]
struct Systems {
    list: Vec<SystemConfig>,
    /// Name -> index in `list`.
    index: BTreeMap<String, usize>,
    listens: BTreeSet<SocketAddr>,
    metrics: BTreeSet<SocketAddr>,
    journals: BTreeSet<PathBuf>,
}

/// Checks `[[system]]` number `i` and adds it to `systems`, in this order: `name` is
/// not empty and not used by an earlier system; `role` is `"primary"` or
/// `"secondary"`; `listen` is an address (resolved now) not used by an earlier system;
/// `advertise`, if given, is an address (default: `listen`); `journal_dir` (relative
/// to `base`) is not an earlier system's; `journal_size`, if given, is a size, and it
/// is at least 4 MiB (default 256 MiB); `nbd_listen`, if given, is `host:port` or a
/// unix socket (`unix:PATH` or an absolute path; a relative PATH is relative to `base`,
/// like every path of the config); `metrics_listen`, if given, is an address
/// (`host:port`) not used by an earlier system's `metrics_listen`; `nbd_tls_cert` and
/// `nbd_tls_key` come together, `nbd_tls_client_ca` only with them, `nbd_insecure` not
/// with them (TLS is then required of every client); an `nbd_listen` that other hosts
/// can reach needs TLS or `nbd_insecure` ([`SystemConfig::check_nbd_exposure`]). The
/// TLS files are only resolved here (the daemon and `export` read them).
fn parse_system(
    i: usize,
    s: &RawSystem,
    base: &Path,
    lookup: Lookup,
    systems: &mut Systems,
) -> Result<(), EngineError> {
    let key = |k: &str| format!("system[{i}] ({}).{k}", s.name);
    if s.name.is_empty() {
        return bad(format!("system[{i}].name: must not be empty"));
    }
    if systems.index.insert(s.name.clone(), i).is_some() {
        return bad(format!("system[{i}].name: {:?} is used twice", s.name));
    }
    let primary = match s.role.as_str() {
        "primary" => true,
        "secondary" => false,
        other => {
            return bad(format!(
                "{}: {other:?} is neither \"primary\" nor \"secondary\"",
                key("role")
            ))
        }
    };
    let listen = parse_addr(&key("listen"), &s.listen, lookup)?;
    if !systems.listens.insert(listen) {
        return bad(format!(
            "{}: {listen} is used by another system",
            key("listen")
        ));
    }
    let advertise = match &s.advertise {
        Some(a) => parse_addr(&key("advertise"), a, lookup)?,
        None => listen,
    };
    let journal_dir = resolve(base, &s.journal_dir);
    if !systems.journals.insert(journal_dir.clone()) {
        return bad(format!(
            "{}: {} is used by another system",
            key("journal_dir"),
            journal_dir.display()
        ));
    }
    let journal_size = match &s.journal_size {
        Some(j) => parse_size(&key("journal_size"), j)?,
        None => 256 << 20,
    };
    if journal_size < 4 << 20 {
        return bad(format!("{}: at least 4MiB", key("journal_size")));
    }
    let metrics_listen = match &s.metrics_listen {
        Some(m) => {
            let a = parse_addr(&key("metrics_listen"), m, lookup)?;
            if !systems.metrics.insert(a) {
                return bad(format!(
                    "{}: {a} is used by another system",
                    key("metrics_listen")
                ));
            }
            Some(a)
        }
        None => None,
    };
    let nbd_listen = s
        .nbd_listen
        .as_deref()
        .map(|l| parse_nbd_listen(&key("nbd_listen"), l, base))
        .transpose()?;
    let nbd_tls = match (&s.nbd_tls_cert, &s.nbd_tls_key) {
        (Some(cert), Some(k)) => Some(TlsFiles {
            cert: resolve(base, cert),
            key: resolve(base, k),
            client_ca: s.nbd_tls_client_ca.as_deref().map(|c| resolve(base, c)),
        }),
        (Some(_), None) => return bad(format!("{}: needed with nbd_tls_cert", key("nbd_tls_key"))),
        (None, Some(_)) => return bad(format!("{}: needed with nbd_tls_key", key("nbd_tls_cert"))),
        (None, None) => {
            if s.nbd_tls_client_ca.is_some() {
                return bad(format!(
                    "{}: needs nbd_tls_cert and nbd_tls_key (client certificates are \
                     checked inside TLS)",
                    key("nbd_tls_client_ca")
                ));
            }
            None
        }
    };
    let nbd_insecure = s.nbd_insecure.unwrap_or(false);
    if nbd_insecure && nbd_tls.is_some() {
        return bad(format!(
            "{}: contradicts nbd_tls_cert: with TLS configured every NBD client must use \
             it; remove one of the two",
            key("nbd_insecure")
        ));
    }
    let system = SystemConfig {
        name: s.name.clone(),
        primary,
        listen,
        advertise,
        journal_dir,
        journal_size,
        nbd_listen,
        nbd_tls,
        nbd_insecure,
        metrics_listen,
    };
    if let Some(l) = &system.nbd_listen {
        let addr: ListenAddr = l
            .parse()
            .map_err(|e| EngineError::Config(format!("{}: {e}", key("nbd_listen"))))?;
        system.check_nbd_exposure(&key("nbd_listen"), &addr)?;
    }
    systems.list.push(system);
    Ok(())
}

/// An NBD listen address, checked; a relative unix socket path is made relative to
/// `base`.
fn parse_nbd_listen(key: &str, text: &str, base: &Path) -> Result<String, EngineError> {
    match text.parse::<ListenAddr>() {
        Ok(ListenAddr::Unix(p)) if p.is_relative() => {
            Ok(format!("unix:{}", resolve(base, &p).display()))
        }
        Ok(_) => Ok(text.to_string()),
        Err(e) => bad(format!("{key}: {e}")),
    }
}

/// The pairs checked so far, and what later ones must not reuse.
#[derive(Default)]
struct Pairs {
    list: Vec<PairConfig>,
    names: BTreeSet<String>,
    /// Unit path -> the pair that uses it.
    paths: BTreeMap<PathBuf, String>,
}

/// Checks `[[pair]]` number `i` against the (complete) `systems` and adds it to
/// `pairs`, in this order: `name` is not empty and not used by an earlier pair; `size`
/// is a size and a positive multiple of 512; `local.system` names a primary and
/// `remote.system` a secondary ([`parse_end`]); neither unit path (relative to `base`)
/// is used by another unit so far (this pair's other end included) or lies inside any
/// system's `journal_dir`; `initial_sync`, if given, is `"auto"`, `"full"` or `"none"`
/// (default `"auto"`).
fn parse_pair(
    i: usize,
    p: &RawPair,
    base: &Path,
    systems: &Systems,
    pairs: &mut Pairs,
) -> Result<(), EngineError> {
    let key = |k: &str| format!("pair[{i}] ({}).{k}", p.name);
    if p.name.is_empty() {
        return bad(format!("pair[{i}].name: must not be empty"));
    }
    if !pairs.names.insert(p.name.clone()) {
        return bad(format!("{}: {:?} is used twice", key("name"), p.name));
    }
    let size = parse_size(&key("size"), &p.size)?;
    if size == 0 || size % 512 != 0 {
        return bad(format!(
            "{}: {size} is not a positive multiple of 512",
            key("size")
        ));
    }
    let local = parse_end(&key("local.system"), &p.local, true, systems)?;
    let remote = parse_end(&key("remote.system"), &p.remote, false, systems)?;
    let local_path = resolve(base, &p.local.path);
    let remote_path = resolve(base, &p.remote.path);
    for (which, path) in [("local", &local_path), ("remote", &remote_path)] {
        if let Some(other) = pairs.paths.insert(path.clone(), p.name.clone()) {
            return bad(format!(
                "{}: {} is also used by pair {other:?}",
                key(&format!("{which}.path")),
                path.display()
            ));
        }
        for s in &systems.list {
            if path.starts_with(&s.journal_dir) {
                return bad(format!(
                    "{}: {} lies inside the journal_dir of {}",
                    key(&format!("{which}.path")),
                    path.display(),
                    s.name
                ));
            }
        }
    }
    let initial_sync = match p.initial_sync.as_deref() {
        None | Some("auto") => InitialSync::Auto,
        Some("full") => InitialSync::Full,
        Some("none") => InitialSync::None,
        Some(other) => {
            return bad(format!(
                "{}: {other:?} is none of \"auto\", \"full\", \"none\"",
                key("initial_sync")
            ))
        }
    };
    pairs.list.push(PairConfig {
        name: p.name.clone(),
        size,
        local,
        local_path,
        remote,
        remote_path,
        initial_sync,
    });
    Ok(())
}

/// Checks one end of a pair: `e.system` names a system (its index is returned) whose
/// role is primary if `want_primary`, else secondary. `key` names `e.system` in errors.
fn parse_end(
    key: &str,
    e: &RawEnd,
    want_primary: bool,
    systems: &Systems,
) -> Result<usize, EngineError> {
    let Some(&s) = systems.index.get(&e.system) else {
        return bad(format!("{key}: no system is named {:?}", e.system));
    };
    if systems.list[s].primary != want_primary {
        let role = if want_primary { "primary" } else { "secondary" };
        return bad(format!("{key}: {:?} is not a {role}", e.system));
    }
    Ok(s)
}

/// The text of the reversed config of the two-system group in `path` whose secondary
/// `new_primary` takes over (`tidemark failover`): roles swapped, each pair's `local`
/// and `remote` swapped, the orderer on the new secondary; every other key as it was
/// (comments are not kept). Relative paths stay relative, so the file belongs in the
/// same directory. A group of more than one primary or secondary system is refused.
pub fn reversed(path: &Path, new_primary: &str) -> Result<String, EngineError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| EngineError::Config(format!("{}: {e}", path.display())))?;
    reversed_text(&text, path, new_primary)
}

/// [`reversed`] of the config text `text` read from `path` (named in errors).
pub(crate) fn reversed_text(
    text: &str,
    path: &Path,
    new_primary: &str,
) -> Result<String, EngineError> {
    let mut raw: RawConfig = toml::from_str(text)
        .map_err(|e| EngineError::Config(format!("{}: {e}", path.display())))?;
    let roles: Vec<&str> = raw.system.iter().map(|s| s.role.as_str()).collect();
    if roles.len() != 2 || !roles.contains(&"primary") || !roles.contains(&"secondary") {
        return bad(
            "failover: only a group of one primary and one secondary system can be reversed",
        );
    }
    let Some(old_primary) = raw
        .system
        .iter()
        .find(|s| s.role == "primary")
        .map(|s| s.name.clone())
    else {
        return bad("failover: no primary system");
    };
    for s in &mut raw.system {
        s.role = if s.name == new_primary {
            "primary".into()
        } else {
            "secondary".into()
        };
    }
    for p in &mut raw.pair {
        std::mem::swap(&mut p.local, &mut p.remote);
    }
    raw.orderer = old_primary;
    toml::to_string(&raw).map_err(|e| EngineError::Config(format!("failover: {e}")))
}

/// Reads a key file written by `tidemark keygen`.
pub fn read_key(path: &Path) -> Result<[u8; 32], EngineError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| EngineError::Config(format!("key_file: {}: {e}", path.display())))?;
    let hex = text.trim();
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return bad(format!(
            "key_file: {} does not hold 64 hex digits",
            path.display()
        ));
    }
    let mut key = [0u8; 32];
    for (i, k) in key.iter_mut().enumerate() {
        *k = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16)
            .map_err(|_| EngineError::Config(format!("key_file: {} is not hex", path.display())))?;
    }
    Ok(key)
}

#[cfg(test)]
pub(crate) mod tests;
