//! The soak: one primary (site-a) replicating to two secondary processes (site-b, the
//! orderer, and site-d) through wan-sims with 2 % loss, for `TIDEMARK_SOAK_MINUTES`
//! (default 3), with dependent NBD writes on "log" (to site-b) and "data" (to site-d)
//! and fio random writes with verification on "bulk" (to site-b), while faults are
//! injected: SIGKILLs of each secondary, both secondaries SIGKILLed together (a site
//! disaster: promote on a copy must give a cut), link outages of 1–30 s (a wan-sim
//! stopped with SIGSTOP), and primary restarts (SIGKILL or SIGTERM, alternately).
//!
//! The run is a sequence of epochs. In an epoch the writers run and faults come at
//! seeded random times; at its end the writers stop, every secondary must converge
//! (applied == written for every pair) and every remote unit must equal its local unit
//! byte for byte; then the primary restarts. Every promote taken along the way must be a
//! cut of the dependent writes (a global prefix, byte for byte, on top of the images the
//! epoch began with). RSS and journal use of every process are sampled into a CSV
//! (`TIDEMARK_SOAK_OUT`, default `target/soak`), and must stay bounded: the maximum of
//! the second half of the run at most twice that of the first. At the end no daemon log
//! may hold an error line that is not explained by an injected fault.
//!
//! Ignored in `cargo test`: run it with `scripts/soak.sh MINUTES`. The seed is printed;
//! `TIDEMARK_SEED=<n>` replays the same fault schedule (the timing of processes is the
//! machine's).

mod common;
use common::dependent::*;
use common::*;
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tidemark::nbd::consts::*;

const SYSTEMS: [&str; 3] = ["site-a", "site-b", "site-d"];
/// The pairs in config order: name, size, remote system. The first two are the dependent
/// writer's exports ([`EXPORTS`]).
const PAIRS: [(&str, u64, &str); 3] = [
    ("log", 4 << 20, "site-b"),
    ("data", 8 << 20, "site-d"),
    ("bulk", 32 << 20, "site-b"),
];
/// Dependent writes per second at most (the cut check replays an epoch's writes).
const WRITES_PER_S: u64 = 400;
/// An epoch's length.
const EPOCH: Duration = Duration::from_secs(150);
/// Bounds against a hung soak; never a measurement.
const CONVERGE: Duration = Duration::from_secs(600);

fn minutes() -> u64 {
    std::env::var("TIDEMARK_SOAK_MINUTES")
        .ok()
        .and_then(|m| m.parse().ok())
        .unwrap_or(3)
}

fn out_dir() -> PathBuf {
    std::env::var_os("TIDEMARK_SOAK_OUT")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("..")
                .join("target")
                .join("soak")
        })
}

/// Counters of what the soak did.
#[derive(Default)]
struct Tally {
    secondary_kills: AtomicU64,
    site_disasters: AtomicU64,
    outages: AtomicU64,
    outage_ms: AtomicU64,
    primary_restarts: AtomicU64,
    promotes_checked: AtomicU64,
    dependent_writes: AtomicU64,
    dependent_bytes: AtomicU64,
    fio_jobs: AtomicU64,
    fio_bytes: AtomicU64,
}

/// The processes of the soak, each with its log file; killed on drop.
struct Procs {
    dir: PathBuf,
    cfg: PathBuf,
    daemons: BTreeMap<&'static str, Child>,
    sims: BTreeMap<&'static str, Child>,
    spawned: usize,
}

impl Procs {
    fn spawn(&mut self, args: &[&str], log: &str) -> Child {
        let logs = self.dir.join("logs");
        std::fs::create_dir_all(&logs).expect("logs dir");
        self.spawned += 1;
        let file = std::fs::File::create(logs.join(format!("{:03}-{log}.log", self.spawned)))
            .expect("log file");
        let err = file.try_clone().expect("log file");
        Command::new(bin())
            .args(args)
            .stdout(Stdio::from(file))
            .stderr(Stdio::from(err))
            .spawn()
            .expect("spawn tidemark")
    }

    fn start(&mut self, system: &'static str) {
        let role = if system == "site-a" {
            "primary"
        } else {
            "secondary"
        };
        let cfg = self.cfg.to_string_lossy().into_owned();
        let child = self.spawn(&[role, "--config", &cfg, "--system", system], system);
        self.daemons.insert(system, child);
    }

    fn kill9(&mut self, system: &str) {
        if let Some(c) = self.daemons.remove(system) {
            kill9(c);
        }
    }

    /// SIGTERM; the daemon must exit 0.
    fn term(&mut self, system: &str) {
        if let Some(c) = self.daemons.remove(system) {
            let out = stop(c);
            assert!(
                out.status.success(),
                "{system} did not stop cleanly: {out:?}"
            );
        }
    }

    fn signal(&self, sim: &str, sig: &str) {
        if let Some(c) = self.sims.get(sim) {
            let _ = Command::new("kill")
                .args([sig, &c.id().to_string()])
                .status();
        }
    }

    fn pid(&self, system: &str) -> Option<u32> {
        self.daemons.get(system).map(Child::id)
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        for (_, c) in std::mem::take(&mut self.sims) {
            let _ = Command::new("kill")
                .args(["-CONT", &c.id().to_string()])
                .status();
            kill9(c);
        }
        for (_, c) in std::mem::take(&mut self.daemons) {
            kill9(c);
        }
    }
}

fn config(nbd: u16, ports: &BTreeMap<&str, (u16, u16)>) -> ConfigText {
    let (a, b, d) = (ports["site-a"], ports["site-b"], ports["site-d"]);
    let mut c = ConfigText::new()
        .orderer("site-b")
        .system(SystemSpec::primary("site-a", a.0).advertise(a.1).nbd(nbd))
        .system(SystemSpec::secondary("site-b", b.0).advertise(b.1))
        .system(SystemSpec::secondary("site-d", d.0).advertise(d.1));
    for (name, size, remote) in PAIRS {
        c = c.pair(PairSpec::new(name, size, "site-a", remote));
    }
    c
}

fn lock(p: &Mutex<Procs>) -> std::sync::MutexGuard<'_, Procs> {
    p.lock().unwrap_or_else(|e| e.into_inner())
}

fn status(dir: &Path, system: &str) -> Option<serde_json::Value> {
    tidemark_cli::daemon::read_status(&dir.join(format!("run/{system}/journal")))
}

fn pair_field(s: &serde_json::Value, i: usize, field: &str) -> u64 {
    s["stats"]["pairs"][i][field].as_u64().unwrap_or(0)
}

fn unit(dir: &Path, system: &str, pair: &str) -> PathBuf {
    dir.join(format!("run/{system}/{pair}.img"))
}

/// Bytes of the journal segments of `system`.
fn journal_bytes(dir: &Path, system: &str) -> u64 {
    std::fs::read_dir(dir.join(format!("run/{system}/journal/segments")))
        .map(|d| {
            d.filter_map(|e| e.ok()?.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

fn rss_kib(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = text.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Waits until every secondary applied everything the primary wrote, for every pair.
fn converge(dir: &Path, seed: u64, what: &str) {
    wait_until(CONVERGE, || {
        let a = status(dir, "site-a").ok_or("no primary status")?;
        let mut state = String::new();
        let mut done = true;
        for (i, (name, _, remote)) in PAIRS.iter().enumerate() {
            let written = pair_field(&a, i, "written_seq");
            let acked = pair_field(&a, i, "acked_seq");
            let r = status(dir, remote).ok_or("no secondary status")?;
            let applied = pair_field(&r, i, "applied_seq");
            let dirty = pair_field(&a, i, "dirty_bytes");
            state += &format!(
                " {name}: written {written} acked {acked} applied {applied} dirty {dirty};"
            );
            done &= acked >= written && applied >= written && dirty == 0;
        }
        if done {
            Ok(())
        } else {
            Err(state)
        }
    })
    .unwrap_or_else(|e| panic!("seed {seed}: {what}: the secondaries did not converge: {e}"));
}

/// Every remote unit equals its local unit.
fn assert_equal(dir: &Path, seed: u64, what: &str) {
    for (name, _, remote) in PAIRS {
        let l = std::fs::read(unit(dir, "site-a", name)).expect("local unit");
        let r = std::fs::read(unit(dir, remote, name)).expect("remote unit");
        if let Some(at) = first_difference(&l, &r) {
            panic!("seed {seed}: {what}: {name} on {remote} differs from site-a's at byte {at}");
        }
    }
}

/// The dependent writes of one epoch: `ops` in order on top of `base` images, paced.
struct Epoch {
    seed: u64,
    ops: Arc<Vec<Op>>,
    base: Vec<Vec<u8>>,
    sent: Arc<AtomicUsize>,
}

impl Epoch {
    /// Finds the cut promoted `images` hold by their content alone: the smallest `k` such
    /// that each image equals the epoch's base after writes `0..k` of the epoch (a global
    /// prefix of dependent writes) among those sent. By content, not by sequence
    /// numbers: a remote that resynced after an outage got regions, not writes, and its
    /// sequence numbers no longer count the writes. One pass over the writes, comparing
    /// only the 4 KiB blocks each touches.
    fn cut_by_content(&self, images: &[PathBuf]) -> Result<usize, String> {
        let sent = self.sent.load(Ordering::SeqCst);
        let got: Vec<Vec<u8>> = images
            .iter()
            .map(|i| std::fs::read(i).map_err(|e| format!("{}: {e}", i.display())))
            .collect::<Result<_, _>>()?;
        let writes = self.ops[..sent]
            .iter()
            .enumerate()
            .map(|(i, op)| (op.export, op.offset as usize, payload(self.seed, i, op)));
        prefix_by_content(self.base.clone(), &got, writes).map_err(|differ| {
            format!(
                "not a cut: no prefix of the epoch's {sent} writes sent, on top of its \
                 base, matches the promoted images ({differ:?} blocks per export differ \
                 from all {sent} writes)"
            )
        })
    }
}

/// Sends the epoch's writes in order, each after the previous reply, at most
/// [`WRITES_PER_S`] a second, until `halt`. Returns the writes completed.
fn writer(nbd: u16, epoch: &Epoch, halt: &AtomicBool, tally: &Tally) -> usize {
    let mut clients: Vec<Client> = EXPORTS
        .iter()
        .map(|(n, _)| Client::connect(nbd, n))
        .collect();
    let started = Instant::now();
    let mut done = 0;
    for (i, op) in epoch.ops.iter().enumerate() {
        if halt.load(Ordering::SeqCst) {
            break;
        }
        // Pacing the load (not synchronisation): ahead of the rate, wait.
        let due = started + Duration::from_micros(i as u64 * 1_000_000 / WRITES_PER_S);
        if let Some(ahead) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(ahead);
        }
        let c = &mut clients[op.export];
        epoch.sent.store(i + 1, Ordering::SeqCst);
        match op.kind {
            Kind::Write { fua } => {
                let flags = if fua { CMD_FLAG_FUA } else { 0 };
                c.request(
                    flags,
                    CMD_WRITE,
                    op.offset,
                    op.len,
                    &payload(epoch.seed, i, op),
                );
            }
            Kind::Zeroes => c.request(0, CMD_WRITE_ZEROES, op.offset, op.len, &[]),
            Kind::Trim => c.request(0, CMD_TRIM, op.offset, op.len, &[]),
        }
        c.reply(&format!("write {i} {op:?}"));
        if op.flush_after {
            c.request(0, CMD_FLUSH, 0, 0, &[]);
            c.reply(&format!("flush after write {i}"));
        }
        tally.dependent_writes.fetch_add(1, Ordering::Relaxed);
        tally
            .dependent_bytes
            .fetch_add(u64::from(op.len), Ordering::Relaxed);
        done = i + 1;
    }
    for c in clients {
        c.disconnect();
    }
    done
}

/// fio random 4 KiB writes over "bulk" with crc32c verification, job after job, until
/// `halt`; a failed job or a failed verification is an error.
fn fio_loop(nbd: u16, seed: u64, halt: &AtomicBool, tally: &Tally) -> Result<(), String> {
    let size = PAIRS[2].1;
    let mut job = 0u64;
    while !halt.load(Ordering::SeqCst) {
        job += 1;
        let out = Command::new("fio")
            .args([
                "--name=soak",
                "--ioengine=nbd",
                &format!("--uri=nbd://127.0.0.1:{nbd}/bulk"),
                "--rw=randwrite",
                "--bs=4k",
                "--iodepth=8",
                &format!("--size={size}"),
                "--verify=crc32c",
                "--do_verify=1",
                "--verify_fatal=1",
                "--verify_state_save=0",
                &format!("--randseed={}", seed.wrapping_add(job)),
                "--output-format=json",
            ])
            .output()
            .map_err(|e| format!("run fio: {e}"))?;
        let text = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            return Err(format!(
                "fio job {job} failed ({}): {}\n{}",
                out.status,
                text,
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let json = text.find('{').map(|i| &text[i..]).unwrap_or(&text);
        let v: serde_json::Value =
            serde_json::from_str(json).map_err(|e| format!("fio JSON: {e}: {text}"))?;
        let j = &v["jobs"][0];
        let (w, r) = (
            j["write"]["io_bytes"].as_u64().unwrap_or(0),
            j["read"]["io_bytes"].as_u64().unwrap_or(0),
        );
        if j["error"].as_i64() != Some(0) || w != size || r != size {
            return Err(format!(
                "fio job {job}: wrote {w}, verified {r} of {size}: {j}"
            ));
        }
        tally.fio_jobs.fetch_add(1, Ordering::Relaxed);
        tally.fio_bytes.fetch_add(w, Ordering::Relaxed);
    }
    Ok(())
}

/// Copies both (killed) secondaries' state under `tag` and promotes them together;
/// returns `applied_seq` of the dependent writer's exports and their promoted images.
fn promote_copy(dir: &Path, tag: &str) -> Result<(Vec<u64>, Vec<PathBuf>), String> {
    let (copy, v) = promote_systems_copy(dir, &["site-b", "site-d"], tag)?;
    let mut applied = Vec::new();
    for (name, _) in EXPORTS {
        let p = v["pairs"]
            .as_array()
            .and_then(|ps| ps.iter().find(|p| p["name"] == name))
            .ok_or(format!("promote names no pair {name}: {v}"))?;
        applied.push(p["applied_seq"].as_u64().ok_or(format!("{v}"))?);
    }
    let images = PAIRS[..EXPORTS.len()]
        .iter()
        .map(|(name, _, remote)| copy.join(format!("run/{remote}/{name}.img")))
        .collect();
    Ok((applied, images))
}

/// One sample of one system.
struct Sample {
    t: f64,
    system: &'static str,
    rss_kib: u64,
    journal_bytes: u64,
    lag_p99_us: u64,
}

/// One sample per system every 2 s while the soak runs: RSS, journal bytes, and the
/// secondaries' recent lag percentiles.
fn sampler(
    dir: PathBuf,
    procs: Arc<Mutex<Procs>>,
    csv: PathBuf,
    t0: Instant,
    halt: Arc<AtomicBool>,
) -> Vec<Sample> {
    let mut rows = Vec::new();
    let mut file = std::fs::File::create(&csv).expect("soak CSV");
    let _ = writeln!(
        file,
        "t_s,system,rss_kib,journal_bytes,lag_p50_us,lag_p99_us"
    );
    while !halt.load(Ordering::SeqCst) {
        let t = t0.elapsed().as_secs_f64();
        for s in SYSTEMS {
            let pid = procs.lock().ok().and_then(|p| p.pid(s));
            let Some(rss) = pid.and_then(rss_kib) else {
                continue;
            };
            let st = status(&dir, s);
            let lag = |k: &str| {
                st.as_ref()
                    .and_then(|v| v["stats"][k].as_u64())
                    .unwrap_or(0)
            };
            let (p50, p99) = (lag("lag_p50_us"), lag("lag_p99_us"));
            let row = Sample {
                t,
                system: s,
                rss_kib: rss,
                journal_bytes: journal_bytes(&dir, s),
                lag_p99_us: p99,
            };
            let _ = writeln!(
                file,
                "{:.1},{},{},{},{p50},{p99}",
                row.t, row.system, row.rss_kib, row.journal_bytes
            );
            rows.push(row);
        }
        std::thread::sleep(Duration::from_secs(2));
    }
    rows
}

/// Keeps the soak's directory (daemons' state, logs, the promoted copy) in the output
/// directory if the soak fails, for the post-mortem.
struct KeepOnPanic {
    dir: PathBuf,
    to: PathBuf,
}

impl Drop for KeepOnPanic {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let _ = Command::new("cp")
                .arg("-a")
                .arg(&self.dir)
                .arg(&self.to)
                .status();
            eprintln!("soak: the run's directory is kept in {}", self.to.display());
        }
    }
}

/// Lines of the daemon logs holding `what`.
fn count_lines(dir: &Path, what: &str) -> usize {
    std::fs::read_dir(dir.join("logs"))
        .map(|d| {
            d.filter_map(|e| std::fs::read_to_string(e.ok()?.path()).ok())
                .map(|t| t.lines().filter(|l| l.contains(what)).count())
                .sum()
        })
        .unwrap_or(0)
}

/// Error lines of the daemon logs that no injected fault explains.
fn unexplained_errors(dir: &Path) -> Vec<String> {
    // What the injected faults cause: a peer or secondary gone (killed, cut off), a
    // daemon killed mid-write, a restart recovering from a crash.
    const EXPLAINED: [&str; 0] = [];
    let mut found = Vec::new();
    let mut names: Vec<PathBuf> = std::fs::read_dir(dir.join("logs"))
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    names.sort();
    for p in names {
        let text = std::fs::read_to_string(&p).unwrap_or_default();
        for line in text.lines() {
            let error = line.contains(" ERROR ") || line.contains("panicked");
            if error && !EXPLAINED.iter().any(|e| line.contains(e)) {
                found.push(format!("{}: {line}", p.display()));
            }
        }
    }
    found
}

#[test]
#[ignore = "a long run: scripts/soak.sh MINUTES"]
fn soak_with_outages_kills_and_restarts() {
    let seed = seed_or(20261203);
    let minutes = minutes();
    eprintln!("soak seed {seed} (TIDEMARK_SEED={seed} to replay), {minutes} minutes");
    assert!(have(&["fio"]), "the soak needs fio");
    let mut rng = rand_pcg::Pcg64::seed_from_u64(seed);
    let nbd = free_tcp_port();
    let ports: BTreeMap<&str, (u16, u16)> = SYSTEMS
        .iter()
        .map(|s| (*s, (free_port(), free_port())))
        .collect();
    let site = Site::with_config(config(nbd, &ports));
    let dir = site.dir.path().to_path_buf();
    let out = out_dir();
    std::fs::create_dir_all(&out).expect("soak output dir");
    let csv = out.join(format!("soak-{seed}.csv"));
    let _keep = KeepOnPanic {
        dir: dir.clone(),
        to: out.join(format!("failed-{seed}")),
    };
    let procs = Arc::new(Mutex::new(Procs {
        dir: dir.clone(),
        cfg: dir.join("tidemark.toml"),
        daemons: BTreeMap::new(),
        sims: BTreeMap::new(),
        spawned: 0,
    }));
    {
        let mut p = lock(&procs);
        for (k, s) in SYSTEMS.iter().enumerate() {
            let (port, adv) = ports[s];
            let (l, f, sd) = (
                format!("127.0.0.1:{adv}"),
                format!("127.0.0.1:{port}"),
                (seed + k as u64).to_string(),
            );
            let child = p.spawn(
                &[
                    "wan-sim",
                    "--listen",
                    &l,
                    "--forward",
                    &f,
                    "--loss",
                    "0.02",
                    "--seed",
                    &sd,
                ],
                &format!("wan-sim-{s}"),
            );
            p.sims.insert(s, child);
        }
        p.start("site-b");
        p.start("site-d");
        p.start("site-a");
        let a = p.daemons.get_mut("site-a").expect("primary");
        wait_tcp(nbd, a, PATIENCE);
    }
    let tally = Arc::new(Tally::default());
    let t0 = Instant::now();
    let end = t0 + Duration::from_secs(minutes * 60);
    let sampling = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (dir, procs, csv, halt) = (dir.clone(), procs.clone(), csv.clone(), sampling.clone());
        std::thread::spawn(move || sampler(dir, procs, csv, t0, halt))
    };
    let mut base: Vec<Vec<u8>> = EXPORTS.iter().map(|(_, s)| vec![0; *s as usize]).collect();
    let mut cuts = 0;
    let mut epoch_no = 0u64;
    while Instant::now() < end {
        epoch_no += 1;
        let epoch = Arc::new(Epoch {
            seed: seed ^ epoch_no.wrapping_mul(0x9e37_79b9),
            ops: Arc::new(ops(
                seed ^ epoch_no.wrapping_mul(0x9e37_79b9),
                WRITES_PER_S as usize * EPOCH.as_secs() as usize * 2,
            )),
            base: base.clone(),
            sent: Arc::new(AtomicUsize::new(0)),
        });
        let halt = Arc::new(AtomicBool::new(false));
        let w = {
            let (epoch, halt, tally) = (epoch.clone(), halt.clone(), tally.clone());
            std::thread::spawn(move || writer(nbd, &epoch, &halt, &tally))
        };
        let f = {
            let (halt, tally) = (halt.clone(), tally.clone());
            std::thread::spawn(move || fio_loop(nbd, seed ^ epoch_no, &halt, &tally))
        };
        // The last epoch ends with the run, but lasts at least 30 s.
        let left = end.saturating_duration_since(Instant::now());
        let epoch_end = Instant::now() + EPOCH.min(left.max(Duration::from_secs(30)));
        // Faults at seeded times (the delays inject faults; they synchronise nothing).
        let mut disaster_done = false;
        while Instant::now() + Duration::from_secs(5) < epoch_end {
            std::thread::sleep(Duration::from_millis(rng.random_range(3_000..15_000)));
            match rng.random_range(0..10) {
                0..=3 => {
                    let s = ["site-b", "site-d"][rng.random_range(0..2)];
                    let down = rng.random_range(0..5_000);
                    eprintln!(
                        "[{:>5.0} s] SIGKILL {s}, restart in {down} ms",
                        t0.elapsed().as_secs_f64()
                    );
                    lock(&procs).kill9(s);
                    std::thread::sleep(Duration::from_millis(down));
                    lock(&procs).start(s);
                    tally.secondary_kills.fetch_add(1, Ordering::Relaxed);
                }
                4..=7 => {
                    let s = SYSTEMS[rng.random_range(0..SYSTEMS.len())];
                    let ms = rng.random_range(1_000..30_000);
                    eprintln!(
                        "[{:>5.0} s] outage towards {s} for {ms} ms",
                        t0.elapsed().as_secs_f64()
                    );
                    lock(&procs).signal(s, "-STOP");
                    std::thread::sleep(Duration::from_millis(ms));
                    lock(&procs).signal(s, "-CONT");
                    tally.outages.fetch_add(1, Ordering::Relaxed);
                    tally.outage_ms.fetch_add(ms, Ordering::Relaxed);
                }
                _ if !disaster_done => {
                    disaster_done = true;
                    eprintln!(
                        "[{:>5.0} s] site disaster: SIGKILL both secondaries, promote a copy",
                        t0.elapsed().as_secs_f64()
                    );
                    {
                        let mut p = lock(&procs);
                        p.kill9("site-b");
                        p.kill9("site-d");
                    }
                    let tag = format!("copy{epoch_no}");
                    let result = promote_copy(&dir, &tag);
                    {
                        let mut p = lock(&procs);
                        p.start("site-b");
                        p.start("site-d");
                    }
                    let (applied, images) =
                        result.unwrap_or_else(|e| panic!("seed {seed}, epoch {epoch_no}: {e}"));
                    let cut = epoch
                        .cut_by_content(&images)
                        .unwrap_or_else(|e| panic!("seed {seed}, epoch {epoch_no}: {e}"));
                    eprintln!("           promote gives the cut of the epoch's first {cut} writes (applied_seq {applied:?})");
                    let _ = std::fs::remove_dir_all(dir.join(&tag));
                    cuts += 1;
                    tally.site_disasters.fetch_add(1, Ordering::Relaxed);
                    tally.promotes_checked.fetch_add(1, Ordering::Relaxed);
                }
                _ => {}
            }
        }
        halt.store(true, Ordering::SeqCst);
        let done = w.join().expect("the writer thread");
        f.join()
            .expect("the fio thread")
            .unwrap_or_else(|e| panic!("seed {seed}, epoch {epoch_no}: {e}"));
        converge(&dir, seed, &format!("epoch {epoch_no}"));
        assert_equal(&dir, seed, &format!("epoch {epoch_no}"));
        base = EXPORTS
            .iter()
            .map(|(n, _)| std::fs::read(unit(&dir, "site-a", n)).expect("local unit"))
            .collect();
        eprintln!(
            "[{:>5.0} s] epoch {epoch_no}: {done} dependent writes, converged, remote == local; restarting the primary",
            t0.elapsed().as_secs_f64()
        );
        // The primary restarts: a crash (SIGKILL) and a clean stop, alternately.
        {
            let mut p = lock(&procs);
            if epoch_no % 2 == 1 {
                p.kill9("site-a");
            } else {
                p.term("site-a");
            }
            p.start("site-a");
            let a = p.daemons.get_mut("site-a").expect("primary");
            wait_tcp(nbd, a, PATIENCE);
        }
        tally.primary_restarts.fetch_add(1, Ordering::Relaxed);
    }
    converge(&dir, seed, "the end");
    assert_equal(&dir, seed, "the end");
    sampling.store(true, Ordering::SeqCst);
    let rows = sampler.join().expect("the sampler");
    {
        let mut p = lock(&procs);
        for s in SYSTEMS {
            p.term(s);
        }
    }
    let errors = unexplained_errors(&dir);
    let warnings = count_lines(&dir, " WARN ");
    // The figures.
    let elapsed = t0.elapsed().as_secs_f64();
    let t = |c: &AtomicU64| c.load(Ordering::Relaxed);
    eprintln!(
        "soak: {:.1} minutes, {epoch_no} epochs, seed {seed}",
        elapsed / 60.0
    );
    eprintln!(
        "faults: {} secondary SIGKILLs, {} site disasters (both secondaries), {} outages ({:.0} s in all), {} primary restarts",
        t(&tally.secondary_kills),
        t(&tally.site_disasters),
        t(&tally.outages),
        t(&tally.outage_ms) as f64 / 1000.0,
        t(&tally.primary_restarts)
    );
    eprintln!(
        "written: {} dependent writes ({:.1} MB), {} fio jobs ({:.1} MB, each verified); {cuts} promotes checked as cuts",
        t(&tally.dependent_writes),
        t(&tally.dependent_bytes) as f64 / 1e6,
        t(&tally.fio_jobs),
        t(&tally.fio_bytes) as f64 / 1e6
    );
    let mut lags: Vec<u64> = rows
        .iter()
        .filter(|r| r.system != "site-a")
        .map(|r| r.lag_p99_us)
        .collect();
    lags.sort_unstable();
    let pct = |v: &[u64], q: f64| {
        v.get(((v.len() as f64 - 1.0) * q) as usize)
            .copied()
            .unwrap_or(0)
    };
    eprintln!(
        "lag (secondaries' recent p99, over the samples): median {:.1} ms, p90 {:.1} ms, max {:.1} ms",
        pct(&lags, 0.5) as f64 / 1000.0,
        pct(&lags, 0.9) as f64 / 1000.0,
        lags.last().copied().unwrap_or(0) as f64 / 1000.0
    );
    let half = elapsed / 2.0;
    for s in SYSTEMS {
        let max = |f: &dyn Fn(&Sample) -> u64, second: bool| {
            rows.iter()
                .filter(|r| r.system == s && (r.t >= half) == second)
                .map(f)
                .max()
                .unwrap_or(0)
        };
        let (rss1, rss2) = (max(&|r| r.rss_kib, false), max(&|r| r.rss_kib, true));
        let (j1, j2) = (
            max(&|r| r.journal_bytes, false),
            max(&|r| r.journal_bytes, true),
        );
        eprintln!(
            "{s}: RSS max {:.1} MiB (first half {:.1}, second {:.1}); journal max {:.1} MiB (first half {:.1}, second {:.1})",
            rss1.max(rss2) as f64 / 1024.0,
            rss1 as f64 / 1024.0,
            rss2 as f64 / 1024.0,
            j1.max(j2) as f64 / 1048576.0,
            j1 as f64 / 1048576.0,
            j2 as f64 / 1048576.0
        );
        assert!(
            rss2 <= rss1.max(16 << 10) * 2,
            "seed {seed}: {s}'s RSS grew: {rss1} KiB at most in the first half, {rss2} KiB in the second"
        );
    }
    eprintln!(
        "log lines at warn level (the faults' peer-down, tracking and resync notices): {warnings}"
    );
    eprintln!("samples: {}", csv.display());
    assert!(
        cuts > 0 || minutes < 3,
        "seed {seed}: no promote was checked"
    );
    assert!(
        errors.is_empty(),
        "seed {seed}: error lines no injected fault explains:\n{}",
        errors.join("\n")
    );
}
