//! Helpers for tests that run `tidemark` processes on loopback.
#![allow(dead_code)]

pub mod config_text;
pub mod dependent;
pub mod epoch;
pub mod outage;

pub use config_text::{ConfigText, PairSpec, SystemSpec};

use std::collections::BTreeMap;
use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant, SystemTime};
use tidemark::PairId;
use tidemark_cli::workload::Workload;

/// `TIDEMARK_SEED` if set (to replay a run), else `default`.
pub fn seed_or(default: u64) -> u64 {
    std::env::var("TIDEMARK_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_tidemark")
}

pub fn run(args: &[&str]) -> Output {
    Command::new(bin())
        .args(args)
        .output()
        .expect("tidemark runs")
}

/// A UDP port nobody listens on right now.
pub fn free_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A set-up in a temporary directory: a key, and a config written from a
/// [`ConfigText`] that has (at least) the systems `site-a` and `site-b`.
pub struct Site {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    /// What `config` holds; [`Site::edit_config`] changes both.
    pub spec: ConfigText,
    pub a_port: u16,
    pub b_port: u16,
    /// Where each side sends to (a wan-sim may sit there).
    pub a_advertise: u16,
    pub b_advertise: u16,
    pub sizes: Vec<u64>,
}

impl Site {
    /// Two pairs ("log" 4 MiB, "data" 8 MiB) from site-a to site-b; `proxied` puts the
    /// advertise addresses on other ports for wan-sims.
    pub fn new(proxied: bool) -> Site {
        Site::with_config(Site::two_sites(proxied))
    }

    /// The config of [`Site::new`]: site-a (primary) and site-b (secondary, the
    /// orderer) on free ports, each advertising its own port or, if `proxied`, another
    /// free one; pairs "log" (4 MiB) and "data" (8 MiB) from site-a to site-b.
    pub fn two_sites(proxied: bool) -> ConfigText {
        let (a_port, b_port) = (free_port(), free_port());
        let (a_adv, b_adv) = if proxied {
            (free_port(), free_port())
        } else {
            (a_port, b_port)
        };
        ConfigText::new()
            .system(SystemSpec::primary("site-a", a_port).advertise(a_adv))
            .system(SystemSpec::secondary("site-b", b_port).advertise(b_adv))
            .pair(PairSpec::new("log", 4 << 20, "site-a", "site-b"))
            .pair(PairSpec::new("data", 8 << 20, "site-a", "site-b"))
    }

    /// A new temporary directory with a key (`cluster.key`, from `tidemark keygen`) and
    /// `spec` written as `tidemark.toml`; the ports and sizes are taken from `spec`
    /// (which must have systems `site-a` and `site-b`).
    pub fn with_config(spec: ConfigText) -> Site {
        let dir = tempfile::tempdir().expect("tempdir");
        let key = dir.path().join("cluster.key");
        let out = run(&["keygen", "--out", key.to_str().expect("utf-8")]);
        assert!(out.status.success(), "keygen: {out:?}");
        let config = spec.write_to(dir.path(), "tidemark.toml");
        let mut site = Site {
            dir,
            config,
            spec,
            a_port: 0,
            b_port: 0,
            a_advertise: 0,
            b_advertise: 0,
            sizes: Vec::new(),
        };
        site.mirror();
        site
    }

    /// Changes the config (before the daemons start): `f` edits [`Site::spec`], which
    /// is written again, and the ports and sizes are taken from it again.
    pub fn edit_config(&mut self, f: impl FnOnce(&mut ConfigText)) {
        f(&mut self.spec);
        self.spec.write_to(self.dir.path(), "tidemark.toml");
        self.mirror();
    }

    /// Sets the fields that mirror [`Site::spec`].
    fn mirror(&mut self) {
        let (a, b) = (
            self.spec.system_spec("site-a"),
            self.spec.system_spec("site-b"),
        );
        (self.a_port, self.a_advertise) = (a.port, a.reached_at());
        (self.b_port, self.b_advertise) = (b.port, b.reached_at());
        self.sizes = self.spec.sizes();
    }

    pub fn cfg(&self) -> &str {
        self.config.to_str().expect("utf-8")
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn spawn(&self, args: &[&str]) -> Child {
        Command::new(bin())
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn tidemark")
    }

    pub fn secondary(&self) -> Child {
        self.spawn_daemon("secondary")
    }

    pub fn primary(&self) -> Child {
        self.spawn_daemon("primary")
    }

    /// Starts a daemon (`secondary`, `primary`) with its output in a file of its own under
    /// `logs/` (nothing reads a daemon's pipes while it runs: one that logged more than a
    /// pipe holds would block); [`Site::log_tails`] shows them when a test fails.
    pub fn spawn_daemon(&self, role: &str) -> Child {
        let logs = self.path("logs");
        std::fs::create_dir_all(&logs).expect("logs dir");
        let n = std::fs::read_dir(&logs).map(|d| d.count()).unwrap_or(0);
        let file = std::fs::File::create(logs.join(format!("{n:02}-{role}.log"))).expect("log");
        let err = file.try_clone().expect("log");
        Command::new(bin())
            .args([role, "--config", self.cfg()])
            .stdout(Stdio::from(file))
            .stderr(Stdio::from(err))
            .spawn()
            .expect("spawn tidemark")
    }

    /// The last lines of every daemon log so far, for a failure message.
    pub fn log_tails(&self) -> String {
        let mut names: Vec<PathBuf> = std::fs::read_dir(self.path("logs"))
            .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default();
        names.sort();
        let mut out = String::new();
        for p in names {
            let text = std::fs::read_to_string(&p).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(15)..];
            out += &format!(
                "\n--- {} ({} lines)\n{}",
                p.display(),
                lines.len(),
                tail.join("\n")
            );
        }
        out
    }

    /// Each pair of the config with its unit size, as the workload takes them.
    fn pair_sizes(&self) -> Vec<(PairId, u64)> {
        self.sizes
            .iter()
            .enumerate()
            .map(|(i, s)| (PairId(i as u32), *s))
            .collect()
    }

    /// Writes per pair of the first `n` writes of workload `seed`.
    pub fn counts(&self, seed: u64, n: usize, max_write: u64) -> BTreeMap<PairId, u64> {
        let pairs = self.pair_sizes();
        let mut c = BTreeMap::new();
        for w in Workload::new(seed, &pairs, max_write).take(n) {
            *c.entry(w.pair).or_insert(0) += 1;
        }
        c
    }

    /// `tidemark load` on site-a: `writes` dependent writes of workload `seed`, each at most
    /// `max_write` bytes; it exits once the remote acknowledged them (or after `timeout_s`).
    #[allow(dead_code)] // not every test file uses it
    pub fn spawn_load(
        &self,
        writes: usize,
        seed: u64,
        max_write: u64,
        timeout_s: u64,
    ) -> std::process::Child {
        self.spawn(&[
            "load",
            "--config",
            self.cfg(),
            "--system",
            "site-a",
            "--writes",
            &writes.to_string(),
            "--seed",
            &seed.to_string(),
            "--max-write",
            &max_write.to_string(),
            "--timeout-s",
            &timeout_s.to_string(),
        ])
    }

    /// The status a system wrote last.
    pub fn status(&self, system: &str) -> Option<serde_json::Value> {
        tidemark_cli::daemon::read_status(&self.path(&format!("run/{system}/journal")))
    }

    /// Waits (polling the status file, bounded) until `system`'s remote units have applied
    /// at least `want[pair]`; returns the last status seen.
    pub fn wait_applied(
        &self,
        system: &str,
        want: &BTreeMap<PairId, u64>,
        limit: Duration,
    ) -> serde_json::Value {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(s) = self.status(system) {
                let ok = want.iter().all(|(p, n)| {
                    s["stats"]["pairs"][p.0 as usize]["applied_seq"]
                        .as_u64()
                        .unwrap_or(0)
                        >= *n
                });
                if ok {
                    return s;
                }
                if Instant::now() > deadline {
                    panic!(
                        "{system} did not apply {want:?} in {limit:?}; status: {s}; other: {}; logs:{}",
                        self.status(if system == "site-a" { "site-b" } else { "site-a" })
                            .unwrap_or_default(),
                        self.log_tails()
                    );
                }
            } else if Instant::now() > deadline {
                panic!(
                    "{system} wrote no status in {limit:?}; logs:{}",
                    self.log_tails()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Stops a child with SIGTERM and waits for it; returns its output.
pub fn stop(child: Child) -> Output {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    child.wait_with_output().expect("wait")
}

/// Kills a child with SIGKILL and waits for it.
pub fn kill9(mut child: Child) {
    let _ = child.kill();
    let _ = child.wait();
}

pub fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::read(a), std::fs::read(b)) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}

impl Site {
    /// Checks that unit images holding `applied[p]` writes of pair `p` are a cut of the
    /// workload `seed` (dependent writes: a cut is a global prefix, writes `0..k`), and
    /// that each image holds exactly those bytes. Returns `k`.
    pub fn check_cut(
        &self,
        seed: u64,
        planned: usize,
        max_write: u64,
        applied: &[u64],
        images: &[PathBuf],
    ) -> Result<usize, String> {
        let pairs = self.pair_sizes();
        let items: Vec<_> = Workload::new(seed, &pairs, max_write)
            .take(planned)
            .collect();
        let mut seen = vec![0u64; pairs.len()];
        let mut last_in: Option<usize> = None;
        let mut first_out: Option<usize> = None;
        for (i, w) in items.iter().enumerate() {
            let p = w.pair.0 as usize;
            seen[p] += 1;
            if seen[p] <= applied[p] {
                last_in = Some(i);
            } else if first_out.is_none() {
                first_out = Some(i);
            }
        }
        for (p, n) in applied.iter().enumerate() {
            if *n > seen[p] {
                return Err(format!(
                    "pair {p} applied {n} writes, only {} were planned",
                    seen[p]
                ));
            }
        }
        if let (Some(a), Some(b)) = (last_in, first_out) {
            if a > b {
                return Err(format!(
                    "not a cut: write {a} is applied but write {b} before it is not ({applied:?})"
                ));
            }
        }
        for (p, image) in images.iter().enumerate() {
            let mut want = vec![0u8; pairs[p].1 as usize];
            for w in items
                .iter()
                .filter(|w| w.pair.0 as usize == p)
                .take(applied[p] as usize)
            {
                want[w.offset as usize..w.offset as usize + w.data.len()].copy_from_slice(&w.data);
            }
            let got = std::fs::read(image).map_err(|e| format!("{}: {e}", image.display()))?;
            if got != want {
                return Err(format!(
                    "pair {p}: {} does not hold its first {} writes",
                    image.display(),
                    applied[p]
                ));
            }
        }
        Ok(last_in.map_or(0, |a| a + 1))
    }

    /// Finds the cut the unit `images` hold by their content alone: the smallest `k`
    /// such that each image equals its pair's bytes after writes `0..k` of the workload
    /// `seed` (a global prefix: dependent writes). For a remote that resynced, whose
    /// sequence numbers no longer count the writes. Costs one pass over the writes,
    /// comparing only the 4 KiB blocks each one touches.
    pub fn cut_by_content(
        &self,
        seed: u64,
        planned: usize,
        max_write: u64,
        images: &[PathBuf],
    ) -> Result<usize, String> {
        let pairs = self.pair_sizes();
        let got: Vec<Vec<u8>> = images
            .iter()
            .map(|i| std::fs::read(i).map_err(|e| format!("{}: {e}", i.display())))
            .collect::<Result<_, _>>()?;
        let base = pairs.iter().map(|(_, s)| vec![0u8; *s as usize]).collect();
        let writes = Workload::new(seed, &pairs, max_write)
            .take(planned)
            .map(|w| (w.pair.0 as usize, w.offset as usize, w.data.to_vec()));
        prefix_by_content(base, &got, writes).map_err(|differ| {
            format!(
                "not a cut: no prefix of the {planned} writes matches the images \
                 ({differ:?} blocks per pair differ from the whole workload's)"
            )
        })
    }
}

/// The smallest `k` such that the images `got` equal `base` after the first `k` of
/// `writes` (unit index, offset, bytes) were applied in order: the cut the images hold,
/// found by content alone (for a remote that resynced, whose sequence numbers no longer
/// count writes). One pass over the writes, comparing only the 4 KiB blocks each one
/// touches. `Err`: no prefix matches; how many blocks per unit differ after them all.
#[allow(dead_code)] // not every test file uses it
pub fn prefix_by_content(
    mut model: Vec<Vec<u8>>,
    got: &[Vec<u8>],
    writes: impl Iterator<Item = (usize, usize, Vec<u8>)>,
) -> Result<usize, Vec<usize>> {
    const BLOCK: usize = 4096;
    if got.len() != model.len() || got.iter().zip(&model).any(|(g, m)| g.len() != m.len()) {
        return Err(vec![usize::MAX; model.len()]);
    }
    let differs = |m: &[u8], g: &[u8], b: usize| {
        let r = b * BLOCK..((b + 1) * BLOCK).min(m.len());
        m[r.clone()] != g[r]
    };
    let mut bad: Vec<Vec<bool>> = model
        .iter()
        .zip(got)
        .map(|(m, g)| {
            (0..m.len().div_ceil(BLOCK))
                .map(|b| differs(m, g, b))
                .collect()
        })
        .collect();
    let mut total: usize = bad.iter().map(|v| v.iter().filter(|x| **x).count()).sum();
    if total == 0 {
        return Ok(0);
    }
    for (i, (u, at, data)) in writes.enumerate() {
        model[u][at..at + data.len()].copy_from_slice(&data);
        let blocks = at / BLOCK..(at + data.len()).div_ceil(BLOCK);
        for (b, was) in bad[u]
            .iter_mut()
            .enumerate()
            .take(blocks.end)
            .skip(blocks.start)
        {
            let now = differs(&model[u], &got[u], b);
            if now != *was {
                if now {
                    total += 1;
                } else {
                    total -= 1;
                }
                *was = now;
            }
        }
        if total == 0 {
            return Ok(i + 1);
        }
    }
    Err(bad
        .iter()
        .map(|v| v.iter().filter(|x| **x).count())
        .collect())
}

/// Copies the state of the stopped (or killed) `systems` of the group in `dir` under
/// `dir/tag`, with the config and key, and runs `promote` on the copy for all of them
/// together; returns the copy's directory and promote's report, which must say
/// `consistent`.
#[allow(dead_code)] // not every test file uses it
pub fn promote_systems_copy(
    dir: &Path,
    systems: &[&str],
    tag: &str,
) -> Result<(PathBuf, serde_json::Value), String> {
    let copy = dir.join(tag);
    std::fs::create_dir_all(copy.join("run")).map_err(|e| e.to_string())?;
    for s in systems {
        let ok = Command::new("cp")
            .arg("-a")
            .arg(dir.join("run").join(s))
            .arg(copy.join("run"))
            .status()
            .map_err(|e| e.to_string())?;
        if !ok.success() {
            return Err(format!("copying {s} failed"));
        }
    }
    for f in ["tidemark.toml", "cluster.key"] {
        std::fs::copy(dir.join(f), copy.join(f)).map_err(|e| e.to_string())?;
    }
    let cfg = copy.join("tidemark.toml");
    let out = run(&["promote", "--config", &cfg.to_string_lossy()]);
    if !out.status.success() {
        return Err(format!(
            "promote failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())?;
    if v["consistent"] != true {
        return Err(format!("promote says inconsistent: {v}"));
    }
    Ok((copy, v))
}

// ---- For the NBD daemon tests (actors/tests/nbd_daemon.rs) ----

/// A TCP port of 127.0.0.1 nobody listens on right now.
pub fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free TCP port")
}

/// Waits (bounded) until something accepts TCP connections on 127.0.0.1:`port`; fails
/// early with the child's output if `child` exits first.
pub fn wait_tcp(port: u16, child: &mut Child, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut e, &mut err);
            }
            panic!("the process exited ({status}) before listening on {port}: {err}");
        }
        assert!(
            Instant::now() < deadline,
            "nothing listens on 127.0.0.1:{port} after {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Site {
    /// [`Site::new`] without wan-sims, and the primary (site-a) serves its units over
    /// NBD on a free TCP port of 127.0.0.1, which is returned.
    pub fn with_nbd() -> (Site, u16) {
        Site::with_nbd_proxied(false)
    }

    /// [`Site::with_nbd`], with the advertise addresses on other ports for relays if
    /// `proxied` (as [`Site::new`]).
    pub fn with_nbd_proxied(proxied: bool) -> (Site, u16) {
        let port = free_tcp_port();
        let mut spec = Site::two_sites(proxied);
        spec.system_mut("site-a").nbd_port = Some(port);
        (Site::with_config(spec), port)
    }

    /// The status `system` wrote after `after` (polling its status file, bounded): a
    /// status that includes everything the system did before `after`.
    pub fn status_after(
        &self,
        system: &str,
        after: std::time::SystemTime,
        limit: Duration,
    ) -> serde_json::Value {
        let file = self.path(&format!("run/{system}/journal/status.json"));
        let deadline = Instant::now() + limit;
        loop {
            let fresh = std::fs::metadata(&file)
                .and_then(|m| m.modified())
                .map(|t| t > after)
                .unwrap_or(false);
            if fresh {
                if let Some(s) = self.status(system) {
                    return s;
                }
            }
            assert!(
                Instant::now() < deadline,
                "{system} wrote no status after {after:?} in {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Copies the secondary's state (journal, units) and the config and key next to it
    /// under `tag`, runs `promote --system site-b` on the copy and returns each pair's
    /// `applied_seq` (in config order) and the promoted unit images; an error if
    /// promote fails or does not call the result consistent.
    pub fn promote_copy(&self, tag: &str) -> Result<(Vec<u64>, Vec<PathBuf>), String> {
        let copy = self.path(tag);
        std::fs::create_dir_all(copy.join("run")).map_err(|e| e.to_string())?;
        let status = Command::new("cp")
            .arg("-a")
            .arg(self.path("run/site-b"))
            .arg(copy.join("run"))
            .status()
            .map_err(|e| e.to_string())?;
        if !status.success() {
            return Err("copy failed".into());
        }
        std::fs::copy(&self.config, copy.join("tidemark.toml")).map_err(|e| e.to_string())?;
        std::fs::copy(self.path("cluster.key"), copy.join("cluster.key"))
            .map_err(|e| e.to_string())?;
        let out = run(&[
            "promote",
            "--config",
            copy.join("tidemark.toml").to_str().unwrap_or(""),
            "--system",
            "site-b",
        ]);
        if !out.status.success() {
            return Err(format!(
                "promote failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let v: serde_json::Value =
            serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())?;
        if v["consistent"] != true {
            return Err(format!("promote says inconsistent: {v}"));
        }
        let names = ["log", "data"];
        let mut applied = Vec::new();
        for (i, name) in names.iter().enumerate() {
            let p = &v["pairs"][i];
            if p["name"] != *name {
                return Err(format!("promote's pair {i} is not {name}: {v}"));
            }
            applied.push(
                p["applied_seq"]
                    .as_u64()
                    .ok_or(format!("no applied_seq: {v}"))?,
            );
        }
        let images = names
            .iter()
            .map(|n| copy.join(format!("run/site-b/{n}.img")))
            .collect();
        Ok((applied, images))
    }
}

impl Site {
    /// One wan-sim per direction in front of the advertise addresses (a `proxied`
    /// site), each given `args` after its addresses; returns them, site-b's first.
    pub fn relays(&self, args: &[&str]) -> Vec<Child> {
        let relay = |listen: u16, forward: u16| {
            let (listen, forward) = (
                format!("127.0.0.1:{listen}"),
                format!("127.0.0.1:{forward}"),
            );
            let mut all = vec!["wan-sim", "--listen", &listen, "--forward", &forward];
            all.extend_from_slice(args);
            self.spawn(&all)
        };
        vec![
            relay(self.b_advertise, self.b_port),
            relay(self.a_advertise, self.a_port),
        ]
    }

    /// One wan-sim per direction in front of the advertise addresses (a `proxied` site):
    /// 5 % loss, 5 % duplication, 20 % reordering, 1 ms delay and jitter, 1 % corruption.
    pub fn wan_sims(&self, seed: u64) -> Vec<Child> {
        let sim = |listen: u16, forward: u16, seed: u64| {
            self.spawn(&[
                "wan-sim",
                "--listen",
                &format!("127.0.0.1:{listen}"),
                "--forward",
                &format!("127.0.0.1:{forward}"),
                "--loss",
                "0.05",
                "--dup",
                "0.05",
                "--reorder",
                "0.2",
                "--delay-ms",
                "1",
                "--jitter-ms",
                "1",
                "--corrupt",
                "0.01",
                "--seed",
                &seed.to_string(),
            ])
        };
        vec![
            sim(self.b_advertise, self.b_port, seed),
            sim(self.a_advertise, self.a_port, seed + 1),
        ]
    }
}

// ---- Kill points at observed events (not after a sleep) ----

/// Polls `poll` every 20 ms until it gives `Ok`, for at most `limit`; `Err` describes the
/// state seen so far and is returned (with the limit) if the deadline passes, for the
/// caller's panic. A bound against a hung test, never a measurement.
pub fn wait_until<T>(
    limit: Duration,
    mut poll: impl FnMut() -> Result<T, String>,
) -> Result<T, String> {
    let deadline = Instant::now() + limit;
    loop {
        match poll() {
            Ok(t) => return Ok(t),
            Err(state) if Instant::now() > deadline => {
                return Err(format!("not seen in {limit:?}; last state: {state}"))
            }
            Err(_) => {}
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The status in `journal_dir` if its file was written after `since`: one that a process
/// killed (and waited for) before `since` cannot have written.
pub fn status_since(journal_dir: &Path, since: SystemTime) -> Option<serde_json::Value> {
    let modified = std::fs::metadata(journal_dir.join("status.json"))
        .and_then(|m| m.modified())
        .ok()?;
    if modified <= since {
        return None;
    }
    tidemark_cli::daemon::read_status(journal_dir)
}

/// Each pair's `head_seq` in a status: the packets its remote unit holds in an unbroken
/// run (0 for a pair whose remote unit is not in that system).
pub fn heads(status: &serde_json::Value) -> Vec<u64> {
    status["stats"]["pairs"]
        .as_array()
        .map(|ps| {
            ps.iter()
                .map(|p| p["head_seq"].as_u64().unwrap_or(0))
                .collect()
        })
        .unwrap_or_default()
}

/// Waits (bounded by `limit`) until the remote systems with journals `dirs`, all
/// (re)started before `since`, receive writes: each has written a status after `since`,
/// and a later status shows their remote units together holding more (the sum of
/// `head_seq`) than the first one did. Returns `Ok(false)` at once if `finished()` says
/// no more writes will come (then nothing can move); `Err` shows the state if the
/// deadline passes.
pub fn wait_receiving(
    dirs: &[PathBuf],
    since: SystemTime,
    limit: Duration,
    mut finished: impl FnMut() -> bool,
) -> Result<bool, String> {
    let deadline = Instant::now() + limit;
    let mut first: Option<u64> = None;
    loop {
        if finished() {
            return Ok(false);
        }
        let statuses: Vec<Option<serde_json::Value>> =
            dirs.iter().map(|d| status_since(d, since)).collect();
        if statuses.iter().all(Option::is_some) {
            let held: u64 = statuses
                .iter()
                .flatten()
                .map(|s| heads(s).iter().sum::<u64>())
                .sum();
            match first {
                None => first = Some(held),
                Some(f) if held > f => return Ok(true),
                Some(_) => {}
            }
        }
        if Instant::now() > deadline {
            let state: Vec<String> = dirs
                .iter()
                .zip(&statuses)
                .map(|(d, s)| match s {
                    Some(s) => format!("{}: heads {:?}", d.display(), heads(s)),
                    None => format!("{}: no status written since the (re)start", d.display()),
                })
                .collect();
            return Err(format!(
                "the remote systems did not receive writes in {limit:?} (heads in their \
                 first status since the (re)start: {first:?}; now: {})",
                state.join("; ")
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[path = "../../../actors/tests/nbd_support/certs.rs"]
pub mod certs;
#[path = "../../../actors/tests/nbd_support/programs.rs"]
mod programs;
#[allow(unused_imports)] // not every test file uses it
pub use programs::have;

/// Runs fio's NBD engine against export `name` on `port`: random 4 KiB writes over all
/// `size` bytes (16 in flight), each verified by reading it back (crc32c). Fails the test
/// unless fio wrote and verified exactly `size` bytes; returns its job JSON.
pub fn fio_randwrite_verify(port: u16, name: &str, size: u64, seed: u64) -> serde_json::Value {
    let out = Command::new("fio")
        .args([
            "--name=randwrite-verify",
            "--ioengine=nbd",
            &format!("--uri=nbd://127.0.0.1:{port}/{name}"),
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=16",
            &format!("--size={size}"),
            "--verify=crc32c",
            "--do_verify=1",
            "--verify_fatal=1",
            "--verify_state_save=0",
            &format!("--randseed={seed}"),
            "--output-format=json",
        ])
        .output()
        .expect("run fio");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "fio on {name} failed ({}):\n{text}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    // fio may print notes before its JSON.
    let json = text.find('{').map(|i| &text[i..]).unwrap_or(&text);
    let v: serde_json::Value =
        serde_json::from_str(json).unwrap_or_else(|e| panic!("fio JSON: {e}: {text}"));
    let job = v["jobs"][0].clone();
    assert_eq!(job["error"].as_i64(), Some(0), "{job}");
    assert_eq!(job["write"]["io_bytes"].as_u64(), Some(size), "{job}");
    assert_eq!(
        job["read"]["io_bytes"].as_u64(),
        Some(size),
        "verified: {job}"
    );
    job
}

/// The daemons of a test; those still held are killed when it ends, so a failed
/// assertion leaves no process behind.
pub struct Daemons {
    pub primary: Option<Child>,
    pub secondary: Option<Child>,
}

impl Daemons {
    /// SIGTERM to both, the primary first; both must exit 0.
    pub fn stop_both(mut self, site: &Site) {
        for (name, child) in [
            ("the primary", self.primary.take()),
            ("the secondary", self.secondary.take()),
        ] {
            let out = stop(child.expect("running"));
            assert!(
                out.status.success(),
                "{name} did not stop cleanly ({}); logs:{}",
                out.status,
                site.log_tails()
            );
        }
    }
}

impl Drop for Daemons {
    fn drop(&mut self) {
        for child in [self.primary.take(), self.secondary.take()]
            .into_iter()
            .flatten()
        {
            kill9(child);
        }
    }
}
