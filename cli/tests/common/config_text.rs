//! The one place the process tests write config TOML: a typed builder whose
//! [`ConfigText::render`] gives the text `tidemark --config` reads.
//!
//! Conventions (every test relies on them): every address is on 127.0.0.1, a system
//! called NAME keeps its journal in `run/NAME/journal`, and a pair called P between
//! systems L and R keeps its units in `run/L/P.img` and `run/R/P.img`; all paths are
//! relative to the config file's directory. A spec may be changed after it was made
//! (`bad configs` tests do), so the paths are stored, not derived when rendering.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// Which units a system holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Local units; `tidemark primary`.
    Primary,
    /// Remote units; `tidemark secondary`.
    Secondary,
}

/// One `[[system]]`.
#[derive(Clone, Debug)]
pub struct SystemSpec {
    pub name: String,
    pub role: Role,
    /// The UDP port of 127.0.0.1 it binds (`listen`).
    pub port: u16,
    /// The UDP port of 127.0.0.1 peers send to (`advertise`: a wan-sim may sit there);
    /// `None` leaves the key out (then it is `listen`).
    pub advertise: Option<u16>,
    /// The TCP port of 127.0.0.1 of `nbd_listen`; `None` leaves the key out.
    pub nbd_port: Option<u16>,
    /// `journal_dir`, relative to the config file.
    pub journal_dir: String,
    /// `journal_size` in bytes; `None` leaves the key out (then it is 256 MiB).
    pub journal_size: Option<u64>,
    /// The TCP port of 127.0.0.1 of `metrics_listen`; `None` leaves the key out.
    pub metrics_port: Option<u16>,
    /// `nbd_tls_cert`, `nbd_tls_key` and `nbd_tls_client_ca`; `None` leaves them out.
    pub nbd_tls: Option<NbdTls>,
}

/// The NBD TLS files of a system (paths as written into the config).
#[derive(Clone, Debug)]
pub struct NbdTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
}

impl SystemSpec {
    /// A system with its journal at `run/NAME/journal`, 64 MiB (what the tests use: the
    /// default 256 MiB only costs disk), no `advertise`, no NBD.
    pub fn new(name: &str, role: Role, port: u16) -> SystemSpec {
        SystemSpec {
            name: name.into(),
            role,
            port,
            advertise: None,
            nbd_port: None,
            journal_dir: format!("run/{name}/journal"),
            journal_size: Some(64 << 20),
            metrics_port: None,
            nbd_tls: None,
        }
    }

    pub fn primary(name: &str, port: u16) -> SystemSpec {
        SystemSpec::new(name, Role::Primary, port)
    }

    pub fn secondary(name: &str, port: u16) -> SystemSpec {
        SystemSpec::new(name, Role::Secondary, port)
    }

    pub fn advertise(mut self, port: u16) -> SystemSpec {
        self.advertise = Some(port);
        self
    }

    pub fn nbd(mut self, port: u16) -> SystemSpec {
        self.nbd_port = Some(port);
        self
    }

    /// The UDP port peers reach it at.
    pub fn reached_at(&self) -> u16 {
        self.advertise.unwrap_or(self.port)
    }
}

/// One `[[pair]]`.
#[derive(Clone, Debug)]
pub struct PairSpec {
    pub name: String,
    /// `size` in bytes.
    pub size: u64,
    /// `local.system` and `local.path` (relative to the config file).
    pub local: String,
    pub local_path: String,
    /// `remote.system` and `remote.path`.
    pub remote: String,
    pub remote_path: String,
    /// `initial_sync` (`"auto"`, `"full"`, `"none"`); `None` leaves the key out (then
    /// it is `"auto"`).
    pub initial_sync: Option<String>,
}

impl PairSpec {
    /// A pair of `size` bytes from system `local` to system `remote`, its units at
    /// `run/LOCAL/NAME.img` and `run/REMOTE/NAME.img`.
    pub fn new(name: &str, size: u64, local: &str, remote: &str) -> PairSpec {
        PairSpec {
            name: name.into(),
            size,
            local: local.into(),
            local_path: format!("run/{local}/{name}.img"),
            remote: remote.into(),
            remote_path: format!("run/{remote}/{name}.img"),
            initial_sync: None,
        }
    }

    /// Sets `initial_sync`.
    pub fn initial_sync(mut self, mode: &str) -> PairSpec {
        self.initial_sync = Some(mode.into());
        self
    }
}

/// A whole config. `None` leaves a key out of the text (then the parser's default
/// applies, or, for `key_file`, the config is invalid).
#[derive(Clone, Debug)]
pub struct ConfigText {
    /// Default `cluster.key` (where [`super::Site`] puts the key).
    pub key_file: Option<String>,
    /// Default: the first secondary system.
    pub orderer: Option<String>,
    /// Default 10 (the parser's default too).
    pub heartbeat_ms: Option<u64>,
    /// Default 1000: a test sees a lost peer sooner than with the parser's 3000.
    pub peer_timeout_ms: Option<u64>,
    /// Default `None` (20 ms).
    pub max_clock_skew_ms: Option<u64>,
    /// `rate`, pacing per link (e.g. `"4MiB"`); default `None` (unpaced).
    pub rate: Option<String>,
    /// `on_journal_full` (`"track"` or `"block"`); default `None` (the parser's
    /// `"track"`).
    pub on_journal_full: Option<String>,
    /// `suspend_after_ms` (0 = never track on silence alone); default `None` (the
    /// parser's 2000).
    pub suspend_after_ms: Option<u64>,
    /// `region_size` of the dirty-region map (e.g. `"64KiB"`); default `None` (64 KiB).
    pub region_size: Option<String>,
    /// `rpo_target_ms`; default `None` (no target).
    pub rpo_target_ms: Option<u64>,
    /// More top-level lines, as written (e.g. `pace_writes = true`).
    pub extra: Vec<String>,
    pub systems: Vec<SystemSpec>,
    pub pairs: Vec<PairSpec>,
}

impl Default for ConfigText {
    fn default() -> Self {
        ConfigText::new()
    }
}

/// `n` bytes as the config writes sizes: `"4MiB"` for whole MiB, else a byte count.
pub fn size_text(n: u64) -> String {
    if n > 0 && n.is_multiple_of(1 << 20) {
        format!("{}MiB", n >> 20)
    } else {
        n.to_string()
    }
}

impl ConfigText {
    /// No systems and no pairs yet; see the fields for the defaults.
    pub fn new() -> ConfigText {
        ConfigText {
            key_file: Some("cluster.key".into()),
            orderer: None,
            heartbeat_ms: Some(10),
            peer_timeout_ms: Some(1000),
            max_clock_skew_ms: None,
            rate: None,
            on_journal_full: None,
            suspend_after_ms: None,
            region_size: None,
            rpo_target_ms: None,
            extra: Vec::new(),
            systems: Vec::new(),
            pairs: Vec::new(),
        }
    }

    pub fn system(mut self, s: SystemSpec) -> ConfigText {
        self.systems.push(s);
        self
    }

    pub fn pair(mut self, p: PairSpec) -> ConfigText {
        self.pairs.push(p);
        self
    }

    pub fn orderer(mut self, name: &str) -> ConfigText {
        self.orderer = Some(name.into());
        self
    }

    pub fn max_clock_skew_ms(mut self, ms: u64) -> ConfigText {
        self.max_clock_skew_ms = Some(ms);
        self
    }

    /// Tracking (`on_journal_full = "track"`) once the remote has been silent for `ms`
    /// while writes wait on it.
    pub fn tracking_after_ms(mut self, ms: u64) -> ConfigText {
        self.on_journal_full = Some("track".into());
        self.suspend_after_ms = Some(ms);
        self
    }

    /// The system called `name`; panics if there is none (a mistake in the test).
    pub fn system_spec(&self, name: &str) -> &SystemSpec {
        self.systems
            .iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("the test config has no system {name:?}"))
    }

    /// The system called `name`, to change it; panics if there is none.
    pub fn system_mut(&mut self, name: &str) -> &mut SystemSpec {
        self.systems
            .iter_mut()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("the test config has no system {name:?}"))
    }

    /// The pair called `name`, to change it; panics if there is none.
    pub fn pair_mut(&mut self, name: &str) -> &mut PairSpec {
        self.pairs
            .iter_mut()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("the test config has no pair {name:?}"))
    }

    /// The pairs' sizes in config order.
    pub fn sizes(&self) -> Vec<u64> {
        self.pairs.iter().map(|p| p.size).collect()
    }

    /// The TOML text. Strings are written with `{:?}`, which quotes and escapes them as
    /// TOML basic strings do for the names and paths tests use.
    pub fn render(&self) -> String {
        let mut t = String::new();
        let mut line = |s: String| {
            t.push_str(&s);
            t.push('\n');
        };
        if let Some(k) = &self.key_file {
            line(format!("key_file = {k:?}"));
        }
        let orderer = self.orderer.clone().or_else(|| {
            self.systems
                .iter()
                .find(|s| s.role == Role::Secondary)
                .map(|s| s.name.clone())
        });
        if let Some(o) = orderer {
            line(format!("orderer = {o:?}"));
        }
        if let Some(ms) = self.heartbeat_ms {
            line(format!("heartbeat_ms = {ms}"));
        }
        if let Some(ms) = self.peer_timeout_ms {
            line(format!("peer_timeout_ms = {ms}"));
        }
        if let Some(ms) = self.max_clock_skew_ms {
            line(format!("max_clock_skew_ms = {ms}"));
        }
        if let Some(r) = &self.rate {
            line(format!("rate = {r:?}"));
        }
        if let Some(m) = &self.on_journal_full {
            line(format!("on_journal_full = {m:?}"));
        }
        if let Some(ms) = self.suspend_after_ms {
            line(format!("suspend_after_ms = {ms}"));
        }
        if let Some(r) = &self.region_size {
            line(format!("region_size = {r:?}"));
        }
        if let Some(ms) = self.rpo_target_ms {
            line(format!("rpo_target_ms = {ms}"));
        }
        for e in &self.extra {
            line(e.clone());
        }
        for s in &self.systems {
            line(String::new());
            line("[[system]]".into());
            line(format!("name = {:?}", s.name));
            let role = match s.role {
                Role::Primary => "primary",
                Role::Secondary => "secondary",
            };
            line(format!("role = {role:?}"));
            line(format!("listen = \"127.0.0.1:{}\"", s.port));
            if let Some(p) = s.advertise {
                line(format!("advertise = \"127.0.0.1:{p}\""));
            }
            if let Some(p) = s.nbd_port {
                line(format!("nbd_listen = \"127.0.0.1:{p}\""));
            }
            if let Some(p) = s.metrics_port {
                line(format!("metrics_listen = \"127.0.0.1:{p}\""));
            }
            if let Some(t) = &s.nbd_tls {
                line(format!("nbd_tls_cert = {:?}", t.cert));
                line(format!("nbd_tls_key = {:?}", t.key));
                if let Some(ca) = &t.client_ca {
                    line(format!("nbd_tls_client_ca = {ca:?}"));
                }
            }
            line(format!("journal_dir = {:?}", s.journal_dir));
            if let Some(n) = s.journal_size {
                line(format!("journal_size = {:?}", size_text(n)));
            }
        }
        for p in &self.pairs {
            line(String::new());
            line("[[pair]]".into());
            line(format!("name = {:?}", p.name));
            line(format!("size = {:?}", size_text(p.size)));
            line(format!(
                "local  = {{ system = {:?}, path = {:?} }}",
                p.local, p.local_path
            ));
            line(format!(
                "remote = {{ system = {:?}, path = {:?} }}",
                p.remote, p.remote_path
            ));
            if let Some(m) = &p.initial_sync {
                line(format!("initial_sync = {m:?}"));
            }
        }
        t
    }

    /// Writes the text to `dir/name` and returns that path.
    pub fn write_to(&self, dir: &Path, name: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, self.render())
            .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
        path
    }
}
