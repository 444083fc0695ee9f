//! A bad WAN: 30% of datagrams lost, half of them reordered, 5 ms delay with jitter, a
//! few duplicated. Three pairs, one primary, one secondary.
//!
//! While a paced writer issues dependent writes, the example prints every 250 ms how far
//! the commit limit has advanced: its age (wall clock minus the limit, i.e. how far the
//! remote copy is behind the primary), what was written and applied, and what the
//! network did. Then it stops writing, drains and checks: every remote unit equals its
//! local unit, and every application under a limit `L` applied exactly the pair's writes
//! with `ts <= L` (I1), however the network mangled the packets.
//!
//! `cargo run --release -p tidemark-actors --example lossy_wan`

use bytes::Bytes;
use rand::{Rng, SeedableRng};
use rand_pcg::Pcg64;
use std::cell::Cell;
use std::error::Error;
use std::rc::Rc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tidemark::PairId;
use tidemark_actors::{units_differ, CutChecker, Engine, EngineBuilder, Impairment};

const UNIT: u64 = 256 * 1024;
const PAIRS: usize = 3;
const WRITING: Duration = Duration::from_secs(2);
const EVERY: Duration = Duration::from_millis(4);
const PER_TICK: usize = 8;

fn wall_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

fn main() -> Result<(), Box<dyn Error>> {
    actix_rt::System::new().block_on(run())
}

async fn report(engine: &Engine, started: Instant) -> Result<(), Box<dyn Error>> {
    let s = engine.stats().await?;
    let written: u64 = s.pairs.iter().map(|p| p.written_seq).sum();
    let applied: u64 = s.pairs.iter().map(|p| p.applied_seq).sum();
    let dropped: u64 = s.pairs.iter().map(|p| p.dropped).sum();
    let age = if s.commit_limit == 0 {
        "none yet".to_string()
    } else {
        format!(
            "{:>6.1} ms behind",
            wall_ns().saturating_sub(s.commit_limit) as f64 / 1e6
        )
    };
    println!(
        "  t={:>5} ms  limit {age}  releases {:>4}  written {:>5}  applied {:>5}  \
         retransmits {:>5}  data dropped {:>5}  laggard {}",
        started.elapsed().as_millis(),
        s.commits,
        written,
        applied,
        s.retransmits(),
        dropped,
        s.laggard.as_deref().unwrap_or("-"),
    );
    Ok(())
}

async fn run() -> Result<(), Box<dyn Error>> {
    let mut b = EngineBuilder::new();
    let primary = b.primary("primary");
    let secondary = b.secondary("secondary");
    let pairs: Vec<PairId> = (0..PAIRS)
        .map(|i| b.mem_pair(&format!("u{i}"), primary, secondary, UNIT))
        .collect();
    let impair = Impairment {
        loss: 0.3,
        dup: 0.05,
        reorder: 0.5,
        delay: Duration::from_millis(5),
        jitter: Duration::from_millis(2),
    };
    b.impairment(impair).seed(30);
    let mut checker = CutChecker::new();
    b.on_applied(checker.hook());
    let engine = Rc::new(b.start()?);
    println!("lossy WAN: {PAIRS} pairs, {impair:?}");

    let started = Instant::now();
    let writing = Rc::new(Cell::new(true));
    let printer = {
        let (engine, writing) = (engine.clone(), writing.clone());
        actix_rt::spawn(async move {
            let mut tick = actix_rt::time::interval(Duration::from_millis(250));
            tick.tick().await;
            loop {
                tick.tick().await;
                if !writing.get() {
                    break;
                }
                if let Err(e) = report(&engine, started).await {
                    eprintln!("stats: {e}");
                }
            }
        })
    };

    let mut rng = Pcg64::seed_from_u64(30);
    let mut tick = actix_rt::time::interval(EVERY);
    while started.elapsed() < WRITING {
        tick.tick().await;
        for _ in 0..PER_TICK {
            // Dependent writes: each issued after the previous one completed.
            let pair = pairs[rng.random_range(0..PAIRS)];
            let len = rng.random_range(1..=4096u64);
            let offset = rng.random_range(0..=UNIT - len);
            let mut bytes = vec![0u8; len as usize];
            rng.fill(&mut bytes[..]);
            let stamp = engine.write(pair, offset, Bytes::from(bytes)).await?;
            checker.wrote(pair, stamp);
        }
    }
    writing.set(false);
    printer.await?;
    let written_at = started.elapsed();
    engine.drain().await?;
    let drained_at = started.elapsed();
    report(&engine, started).await?;
    let stats = engine.stats().await?;

    let differ = units_differ(&engine)?;
    let engine = Rc::try_unwrap(engine).map_err(|_| "engine still shared")?;
    engine.shutdown().await?;

    let violations = checker.violations();
    for v in violations.iter().take(5) {
        eprintln!("{v}");
    }
    let cut_violations = violations.len();
    let events = checker.applications();

    let writes = checker.writes();
    println!(
        "  {writes} writes in {written_at:.2?}; drained {:.0?} after the last write",
        drained_at - written_at
    );
    for p in &stats.pairs {
        println!(
            "  {}: applied #{:<5} retransmits {:<5} data dropped {:<5} duplicated {:<4} duplicates received {:<4} srtt {}",
            p.name,
            p.applied_seq,
            p.retransmits,
            p.dropped,
            p.duplicated,
            p.duplicates_received,
            p.srtt_us.map_or("-".into(), |us| format!("{:.1} ms", us as f64 / 1e3)),
        );
    }
    println!(
        "  total: retransmits {}, link items sent {}, dropped {}, duplicated {}; \
         {} applications checked against the history",
        stats.retransmits(),
        stats.items_sent,
        stats.items_dropped,
        stats.items_duplicated,
        events.len()
    );

    let mut failures = Vec::new();
    if !differ.is_empty() {
        failures.push(format!("remote units differ from local: {differ:?}"));
    }
    if cut_violations > 0 {
        failures.push(format!("{cut_violations} applications were not a cut"));
    }
    if stats.pairs.iter().any(|p| p.applied_seq != p.written_seq) {
        failures.push("a pair was not fully applied after drain".into());
    }
    if stats.items_dropped == 0 || stats.retransmits() == 0 {
        failures.push("the network lost nothing: the impairment did not take effect".into());
    }
    if failures.is_empty() {
        println!("OK: every remote unit equals its local unit; every application was a cut");
        Ok(())
    } else {
        Err(failures.join("; ").into())
    }
}
