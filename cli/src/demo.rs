//! `tidemark demo`: a two-site topology in one process with file-backed units, a
//! workload of dependent writes, a drain, and two checks: every commit limit applied on
//! every remote unit was a cut of the write history (I1), and every remote unit equals
//! its local unit byte for byte.
//!
//! With `prefill`, each local unit file first gets seeded random data over part of it,
//! with holes between, so the engine starts with an initial sync of every pair that runs
//! while the workload writes; the demo waits for the syncs to finish before it drains,
//! and the final comparison covers the copied data too.

use bytes::Bytes;
use rand::{Rng, SeedableRng};
use rand_pcg::Pcg64;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tidemark::PairId;
use tidemark_actors::check::{units_differ, CutChecker};
use tidemark_actors::engine::{EngineBuilder, PairSpec, StoreSpec};
use tidemark_actors::error::EngineError;
use tidemark_actors::net::impair::Impairment;

/// What the demo runs.
#[derive(Clone, Debug)]
pub struct DemoConfig {
    pub pairs: usize,
    pub idle: usize,
    pub writes: usize,
    pub unit_size: u64,
    pub max_write: u64,
    pub impair: Impairment,
    pub seed: u64,
    pub dir: Option<PathBuf>,
    pub progress: bool,
    /// Fill the local units with data (and holes) before the engine starts.
    pub prefill: bool,
}

impl Default for DemoConfig {
    fn default() -> Self {
        DemoConfig {
            pairs: 4,
            idle: 0,
            writes: 5_000,
            unit_size: 16 << 20,
            max_write: 64 << 10,
            impair: Impairment::none(),
            seed: 1,
            dir: None,
            progress: false,
            prefill: false,
        }
    }
}

/// What the demo found.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct DemoReport {
    pub pairs: usize,
    pub idle_pairs: usize,
    pub writes: usize,
    pub bytes: u64,
    pub retransmits: u64,
    pub dropped: u64,
    pub duplicated: u64,
    pub commits: u64,
    pub applications_checked: usize,
    pub consistent: bool,
    pub identical: bool,
    pub problems: Vec<String>,
    pub elapsed_ms: u64,
    /// Of `elapsed_ms`, the time the drain took after the last write completed.
    pub drain_ms: u64,
    /// Commit lag, a write's stamp to its application at the remote (recent samples).
    pub lag_p50_us: u64,
    pub lag_p99_us: u64,
    /// Bytes of data the units were prefilled with (0 without `prefill`).
    pub prefilled_bytes: u64,
    /// Bytes the initial syncs copied (the prefilled extents as the file system reports
    /// them, and holes the workload wrote into before the copy got there).
    pub synced_bytes: u64,
    /// Every initial sync had finished when the last write completed.
    pub synced_before_last_write: bool,
    pub dir: String,
}

impl DemoConfig {
    /// Checks the settings; a bad one is a clear error before anything starts.
    pub fn validate(&self) -> Result<(), EngineError> {
        let bad = |m: &str| Err(EngineError::Topology(m.to_string()));
        if self.pairs == 0 {
            return bad("--pairs must be at least 1 (the writes need somewhere to go)");
        }
        if self.pairs + self.idle > 1024 {
            return bad("--pairs plus --idle must be at most 1024");
        }
        if self.max_write == 0 || self.max_write > self.unit_size {
            return bad("the largest write must fit in a unit");
        }
        self.impair.validate()
    }
}

/// Runs the demo inside the current actix system.
pub async fn run(cfg: DemoConfig) -> Result<DemoReport, EngineError> {
    cfg.validate()?;
    let (_tmp, dir) = match &cfg.dir {
        Some(d) => {
            std::fs::create_dir_all(d)
                .map_err(EngineError::io(format!("cannot create {}", d.display())))?;
            (None, d.clone())
        }
        None => {
            let t = tempfile::tempdir()
                .map_err(EngineError::io("cannot make a temporary directory"))?;
            let p = t.path().to_path_buf();
            (Some(t), p)
        }
    };
    let mut b = EngineBuilder::new();
    let a = b.primary("site-a");
    let r = b.secondary("site-b");
    let total = cfg.pairs + cfg.idle;
    let mut prefilled_bytes = 0;
    for i in 0..total {
        let name = if i < cfg.pairs {
            format!("unit{i}")
        } else {
            format!("idle{}", i - cfg.pairs)
        };
        if cfg.prefill {
            let path = dir.join(format!("{name}.local.img"));
            prefilled_bytes += prefill(&path, cfg.unit_size, cfg.seed ^ ((i as u64 + 1) << 32))
                .map_err(EngineError::io(format!("prefilling {}", path.display())))?;
        }
        b.pair(PairSpec {
            local: a,
            remote: r,
            size: cfg.unit_size,
            local_store: StoreSpec::File(dir.join(format!("{name}.local.img"))),
            remote_store: StoreSpec::File(dir.join(format!("{name}.remote.img"))),
            name,
        });
    }
    b.impairment(cfg.impair).seed(cfg.seed);
    let mut checker = CutChecker::new();
    b.on_applied(checker.hook());
    let engine = b.start()?;
    let started = Instant::now();
    let bar = cfg.progress.then(|| {
        let bar = indicatif::ProgressBar::new(cfg.writes as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} writes {pos}/{len} {wide_bar} {per_sec} {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar
    });

    let mut rng = Pcg64::seed_from_u64(cfg.seed);
    let mut bytes = 0;
    for i in 0..cfg.writes {
        // Dependent writes: each one issued after the previous one completed.
        let pair = PairId(rng.random_range(0..cfg.pairs as u32));
        let len = rng.random_range(1..=cfg.max_write);
        let offset = rng.random_range(0..=cfg.unit_size - len);
        let mut data = vec![0u8; len as usize];
        rng.fill(&mut data[..]);
        let stamp = engine.write(pair, offset, Bytes::from(data)).await?;
        checker.wrote(pair, stamp);
        bytes += len;
        if let Some(bar) = &bar {
            if i % 64 == 0 {
                bar.set_position(i as u64);
            }
        }
    }
    if let Some(bar) = &bar {
        bar.set_position(cfg.writes as u64);
        bar.set_message("draining");
    }
    let writes_done = started.elapsed();
    // An initial sync may outlast the writes: wait for it, then drain everything.
    let mut synced_before_last_write = true;
    loop {
        let stats = engine.stats().await?;
        if stats
            .pairs
            .iter()
            .all(|p| p.sync.is_none_or(|s| s.finished))
        {
            break;
        }
        synced_before_last_write = false;
        if let Some(bar) = &bar {
            bar.set_message("initial sync");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    engine.drain().await?;
    let elapsed = started.elapsed();
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }

    // I1: under every applied limit, each unit holds exactly its writes with ts <= limit.
    let mut problems: Vec<String> = checker.violations().iter().map(|v| v.to_string()).collect();
    let consistent = problems.is_empty();
    let differ = units_differ(&engine)?;
    let identical = differ.is_empty();
    for p in differ {
        let name = engine.pairs().get(p.0 as usize).map_or("?", |h| &h.name);
        problems.push(format!("{name}: remote differs from local"));
    }
    let stats = engine.stats().await?;
    engine.shutdown().await?;
    Ok(DemoReport {
        pairs: cfg.pairs,
        idle_pairs: cfg.idle,
        writes: cfg.writes,
        bytes,
        retransmits: stats.retransmits(),
        dropped: stats.items_dropped,
        duplicated: stats.items_duplicated,
        commits: stats.commits,
        applications_checked: checker.applications().len(),
        consistent,
        identical,
        problems,
        elapsed_ms: elapsed.as_millis() as u64,
        drain_ms: (elapsed - writes_done).as_millis() as u64,
        lag_p50_us: stats.lag_p50_us,
        lag_p99_us: stats.lag_p99_us,
        prefilled_bytes,
        synced_bytes: stats
            .pairs
            .iter()
            .filter_map(|p| p.sync.map(|s| s.copied_bytes))
            .sum(),
        synced_before_last_write,
        dir: cfg
            .dir
            .as_ref()
            .map(|d| d.display().to_string())
            .unwrap_or_default(),
    })
}

/// Writes a unit file of `size` bytes (replacing any) that holds seeded random data over
/// part of it with holes between: in each sixteenth of the unit, a run of 4 KiB blocks
/// of random length at a random place, or nothing (one in four). Returns the bytes
/// written.
fn prefill(path: &std::path::Path, size: u64, seed: u64) -> std::io::Result<u64> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(path)?;
    f.set_len(size)?;
    let mut rng = Pcg64::seed_from_u64(seed);
    let region = (size / 16).max(4096) / 4096 * 4096;
    let mut written = 0;
    let mut at = 0;
    while at + region <= size {
        if rng.random_range(0..4) != 0 {
            let blocks = region / 4096;
            let len = rng.random_range(1..=blocks) * 4096;
            let start = at + rng.random_range(0..=blocks - len / 4096) * 4096;
            let mut data = vec![0u8; len as usize];
            rng.fill(&mut data[..]);
            f.write_all_at(&data, start)?;
            written += len;
        }
        at += region;
    }
    f.sync_all()?;
    Ok(written)
}

/// A millisecond count as a duration (for the CLI).
pub fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}
