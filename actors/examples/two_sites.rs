//! Two sites, two file-backed pairs, one link.
//!
//! A primary system holds a database's log unit and data unit; a secondary system
//! mirrors both. The workload is the classic dependent pair of writes: append a log
//! record, and only once it completed, update the data page it describes. After a
//! drain the remote files must equal the local ones byte for byte, and every data write
//! must carry a later time stamp than the log record it depends on (I2).
//!
//! `cargo run --release -p tidemark-actors --example two_sites`

use bytes::Bytes;
use rand::{Rng, SeedableRng};
use rand_pcg::Pcg64;
use std::error::Error;
use std::path::Path;
use std::time::Instant;
use tidemark_actors::{units_differ, EngineBuilder, PairSpec, StoreSpec};

const UNIT: u64 = 4 << 20;
const RECORD: u64 = 512;
const PAGE: u64 = 4096;
const TRANSACTIONS: usize = 2_000;

fn main() -> Result<(), Box<dyn Error>> {
    let dir = tempfile::tempdir()?;
    let system = actix_rt::System::new();
    system.block_on(run(dir.path()))
}

async fn run(dir: &Path) -> Result<(), Box<dyn Error>> {
    let mut b = EngineBuilder::new();
    let primary = b.primary("primary");
    let secondary = b.secondary("secondary");
    let mut pairs = Vec::new();
    for name in ["log", "data"] {
        pairs.push(b.pair(PairSpec {
            name: name.to_string(),
            local: primary,
            remote: secondary,
            size: UNIT,
            local_store: StoreSpec::File(dir.join(format!("{name}.local"))),
            remote_store: StoreSpec::File(dir.join(format!("{name}.remote"))),
        }));
    }
    let (log, data) = (pairs[0], pairs[1]);
    let engine = b.start()?;

    let started = Instant::now();
    let mut rng = Pcg64::seed_from_u64(2);
    let mut out_of_order = 0;
    for i in 0..TRANSACTIONS as u64 {
        // The log record names the page; the page is written only after the record is.
        let page = rng.random_range(0..UNIT / PAGE);
        let mut record = vec![0u8; RECORD as usize];
        record[..8].copy_from_slice(&i.to_le_bytes());
        record[8..16].copy_from_slice(&page.to_le_bytes());
        rng.fill(&mut record[16..]);
        let log_at = (i * RECORD) % UNIT;
        let a = engine.write(log, log_at, Bytes::from(record)).await?;

        let mut bytes = vec![0u8; PAGE as usize];
        rng.fill(&mut bytes[..]);
        let b = engine.write(data, page * PAGE, Bytes::from(bytes)).await?;
        if b.ts <= a.ts {
            out_of_order += 1;
        }
    }
    let written = started.elapsed();
    engine.drain().await?;
    let drained = started.elapsed();
    let stats = engine.stats().await?;

    let differ = units_differ(&engine)?;
    engine.shutdown().await?;

    // The files themselves, after shutdown flushed them.
    let mut files_differ = Vec::new();
    for name in ["log", "data"] {
        let local = std::fs::read(dir.join(format!("{name}.local")))?;
        let remote = std::fs::read(dir.join(format!("{name}.remote")))?;
        if local != remote || local.len() as u64 != UNIT {
            files_differ.push(name);
        }
    }

    println!(
        "two sites: 1 primary, 1 secondary, 2 file-backed pairs of {} MiB",
        UNIT >> 20
    );
    println!(
        "  {TRANSACTIONS} transactions (log record {RECORD} B, then data page {PAGE} B) \
         written in {written:.2?}, remote caught up after {drained:.2?}"
    );
    for p in &stats.pairs {
        println!(
            "  {:<5} written #{:<5} applied #{:<5} {:>9} bytes  retransmits {}  heartbeats {}",
            p.name, p.written_seq, p.applied_seq, p.bytes, p.retransmits, p.heartbeats
        );
    }
    println!(
        "  commit limit advanced {} times; link items sent {}",
        stats.commits, stats.items_sent
    );

    let mut failures = Vec::new();
    if out_of_order > 0 {
        failures.push(format!(
            "{out_of_order} dependent writes were not stamped later than their log record"
        ));
    }
    if !differ.is_empty() {
        failures.push(format!("remote units differ from local: {differ:?}"));
    }
    if !files_differ.is_empty() {
        failures.push(format!("remote files differ from local: {files_differ:?}"));
    }
    if stats.pairs.iter().any(|p| p.applied_seq != p.written_seq) {
        failures.push("a pair was not fully applied after drain".into());
    }
    if failures.is_empty() {
        println!("OK: remote == local, byte for byte, on both units and files");
        Ok(())
    } else {
        Err(failures.join("; ").into())
    }
}
