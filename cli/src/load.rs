//! `tidemark load`: a primary system running a deterministic workload of dependent
//! writes until the remote holds them, and its baseline on plain files.

use crate::config::Config;
use crate::daemon::{builder, lock_system, write_status, Guard};
use std::time::Duration;
use tidemark_actors::EngineError;

/// What `tidemark load` reports.
#[derive(Debug, Default, serde::Serialize)]
pub struct LoadReport {
    pub writes: usize,
    pub bytes: u64,
    /// From the first write until the last was acknowledged to the writer.
    pub write_ms: u64,
    /// From the first write until the remote acknowledged everything as held.
    pub replicated_ms: u64,
    pub mb_per_s: f64,
    pub retransmits: u64,
}

/// Runs primary `system` with `writes` dependent writes of the workload `seed`, waits
/// until the remote holds all of them (or `timeout`), then shuts down.
pub async fn load(
    cfg: &Config,
    system: usize,
    writes: usize,
    seed: u64,
    max_write: u64,
    depth: usize,
    timeout: Duration,
) -> Result<LoadReport, EngineError> {
    let _lock = lock_system(cfg, system)?;
    let engine = builder(cfg, &[system])?.start()?;
    let pairs: Vec<(tidemark::PairId, u64)> = engine
        .pairs()
        .iter()
        .filter(|p| p.is_local())
        .map(|p| (p.id, p.size))
        .collect();
    let started = std::time::Instant::now();
    let deadline = started + timeout;
    let items: Vec<_> = crate::workload::Workload::new(seed, &pairs, max_write)
        .take(writes)
        .collect();
    let bytes: u64 = items.iter().map(|w| w.data.len() as u64).sum();
    // `depth` chains of dependent writes in flight at once (one chain: each write waits
    // for the one before).
    let queue = std::sync::Arc::new(std::sync::Mutex::new(items.into_iter()));
    let admitted = {
        let engine_ref = &engine;
        let chains = (0..depth.max(1)).map(|_| {
            let queue = queue.clone();
            async move {
                loop {
                    let next = queue.lock().ok().and_then(|mut q| q.next());
                    let Some(w) = next else {
                        return Ok::<(), EngineError>(());
                    };
                    engine_ref.write(w.pair, w.offset, w.data).await?;
                }
            }
        });
        let writing = futures_util::future::join_all(chains);
        tokio::pin!(writing);
        // Admission can hold writes back for as long as the remote does not acknowledge:
        // the writes too wait at most until the deadline, and status.json shows where they
        // are once a second meanwhile.
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.tick().await;
        loop {
            tokio::select! {
                done = &mut writing => {
                    break done.into_iter().collect::<Result<Vec<()>, EngineError>>().map(drop);
                }
                _ = tick.tick() => {
                    final_status(cfg, system, &engine).await;
                    if std::time::Instant::now() > deadline {
                        break Err(EngineError::Timeout(
                            "the writes were not all admitted (the remote did not acknowledge enough of them)".into(),
                        ));
                    }
                }
            }
        }
    };
    if let Err(e) = admitted {
        stop_within(engine, Duration::from_secs(10)).await;
        return Err(e);
    }
    let write_ms = started.elapsed().as_millis() as u64;
    // While it waits, `journal_dir/status.json` shows where it is, once a second.
    let mut status_at = std::time::Instant::now();
    let stats = loop {
        if status_at.elapsed() >= Duration::from_secs(1) {
            final_status(cfg, system, &engine).await;
            status_at = std::time::Instant::now();
        }
        let s = engine.stats().await?;
        let done = s
            .pairs
            .iter()
            .zip(engine.pairs())
            .filter(|(_, p)| p.is_local())
            // A pair that tracked must also have resynced: its tracked writes reach
            // the remote through the resync, not as packets of their own.
            .all(|(s, _)| {
                s.acked_seq >= s.written_seq
                    && s.dirty_bytes == 0
                    && !matches!(s.primary_state, Some("tracking" | "resyncing"))
            });
        if done {
            break s;
        }
        if std::time::Instant::now() > deadline {
            // What it got to, for the operator, before giving up.
            final_status(cfg, system, &engine).await;
            stop_within(engine, Duration::from_secs(10)).await;
            return Err(EngineError::Timeout(
                "the remote did not acknowledge every write".into(),
            ));
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    let replicated = started.elapsed();
    final_status(cfg, system, &engine).await;
    engine.shutdown().await?;
    Ok(LoadReport {
        writes,
        bytes,
        write_ms,
        replicated_ms: replicated.as_millis() as u64,
        mb_per_s: bytes as f64 / 1e6 / replicated.as_secs_f64().max(1e-9),
        retransmits: stats.retransmits(),
    })
}

/// The baseline for `load`: the same workload written with the same concurrency to plain
/// files beside the primary's units (`*.baseline`, removed afterwards), no replication.
pub fn baseline(
    cfg: &Config,
    system: usize,
    writes: usize,
    seed: u64,
    max_write: u64,
    depth: usize,
) -> Result<LoadReport, EngineError> {
    use tidemark::{BlockStore, FileStore, Offset};
    let mut files = Vec::new();
    let mut pairs = Vec::new();
    for (i, p) in cfg.pairs.iter().enumerate() {
        if p.local == system {
            let path = p.local_path.with_extension("baseline");
            if let Some(d) = path.parent() {
                let _ = std::fs::create_dir_all(d);
            }
            let _ = std::fs::remove_file(&path);
            files.push((
                path.clone(),
                std::sync::Arc::new(FileStore::open_or_create(&path, p.size)?),
            ));
            pairs.push((tidemark::PairId(i as u32), p.size));
        }
    }
    let items: Vec<_> = crate::workload::Workload::new(seed, &pairs, max_write)
        .take(writes)
        .collect();
    let bytes: u64 = items.iter().map(|w| w.data.len() as u64).sum();
    let store_of = |pair: tidemark::PairId| {
        pairs
            .iter()
            .position(|(p, _)| *p == pair)
            .map(|i| files[i].1.clone())
    };
    let started = std::time::Instant::now();
    let queue = std::sync::Mutex::new(items.into_iter());
    std::thread::scope(|s| {
        for _ in 0..depth.max(1) {
            s.spawn(|| loop {
                let next = queue.lock().ok().and_then(|mut q| q.next());
                let Some(w) = next else { break };
                if let Some(st) = store_of(w.pair) {
                    let _ = st.write_at(Offset(w.offset), &w.data);
                }
            });
        }
    });
    // As the same-session baseline in ECOSYSTEM.md: psync writes, one fsync at the end.
    for (_, f) in &files {
        f.flush()?;
    }
    let took = started.elapsed();
    for (path, _) in &files {
        let _ = std::fs::remove_file(path);
    }
    Ok(LoadReport {
        writes,
        bytes,
        write_ms: took.as_millis() as u64,
        replicated_ms: took.as_millis() as u64,
        mb_per_s: bytes as f64 / 1e6 / took.as_secs_f64().max(1e-9),
        retransmits: 0,
    })
}

/// Gives up on what still waits (writes not journaled fail; what is journaled stays, as
/// after a crash) and shuts the engine down, waiting at most `grace`: a load that timed
/// out because the remote does not answer must not then wait on the remote to stop.
async fn stop_within(engine: tidemark_actors::Engine, grace: Duration) {
    engine.stopping();
    if tokio::time::timeout(grace, engine.shutdown())
        .await
        .is_err()
    {
        eprintln!("tidemark: load: the engine did not stop within {grace:?}; exiting anyway");
    }
}

/// Writes the system's `status.json` once more (a load has no status loop).
async fn final_status(cfg: &Config, system: usize, engine: &tidemark_actors::Engine) {
    let mut progress = crate::progress::SyncProgress::new(false);
    let mut guard = Guard::new(cfg, &[system]);
    write_status(cfg, &[system], engine, &mut progress, &mut guard).await;
}
