//! Three primary systems, two secondary systems, one consistency group (claims 15-17).
//!
//! Each local unit's remote unit is chosen independently of which primary holds it:
//! p0->s1, p1->s0, p2->s1, p0->s0, p1->s1, p2->s0. One orderer (on s0) computes the
//! commit limit over all six pairs; with two remote systems it announces a limit,
//! waits until both have made it durable, then releases it. The network is mildly
//! impaired. Dependent writes (each issued after the previous one completed) are spread
//! over all pairs.
//!
//! Checks: after a drain every remote unit equals its local unit; and every time a
//! remote unit applied under a limit `L`, it had applied exactly its pair's writes with
//! `ts <= L` (so the remote units at any limit form a consistent cut, I1).
//!
//! `cargo run --release -p tidemark-actors --example multi_system`

use bytes::Bytes;
use rand::{Rng, SeedableRng};
use rand_pcg::Pcg64;
use std::error::Error;
use std::time::{Duration, Instant};
use tidemark::Timestamp;
use tidemark_actors::{units_differ, CutChecker, EngineBuilder, Impairment};

const UNIT: u64 = 256 * 1024;
const WRITES: usize = 6_000;

fn main() -> Result<(), Box<dyn Error>> {
    actix_rt::System::new().block_on(run())
}

async fn run() -> Result<(), Box<dyn Error>> {
    let mut b = EngineBuilder::new();
    let primaries: Vec<_> = (0..3).map(|i| b.primary(&format!("p{i}"))).collect();
    let secondaries: Vec<_> = (0..2).map(|i| b.secondary(&format!("s{i}"))).collect();
    // (local system, remote system): chosen independently of each other.
    let mapping = [(0, 1), (1, 0), (2, 1), (0, 0), (1, 1), (2, 0)];
    let mut pairs = Vec::new();
    for (i, &(l, r)) in mapping.iter().enumerate() {
        let name = format!("u{i}");
        pairs.push(b.mem_pair(&name, primaries[l], secondaries[r], UNIT));
    }
    let impair = Impairment {
        loss: 0.02,
        dup: 0.01,
        reorder: 0.1,
        delay: Duration::from_micros(500),
        jitter: Duration::from_micros(200),
    };
    b.impairment(impair).seed(17).orderer(secondaries[0]);
    let mut checker = CutChecker::new();
    b.on_applied(checker.hook());
    let engine = b.start()?;

    let started = Instant::now();
    let mut rng = Pcg64::seed_from_u64(17);
    let mut last_ts = Timestamp::ZERO;
    let mut not_increasing = 0;
    for _ in 0..WRITES {
        let pair = pairs[rng.random_range(0..pairs.len())];
        let len = rng.random_range(1..=2048u64);
        let offset = rng.random_range(0..=UNIT - len);
        let mut bytes = vec![0u8; len as usize];
        rng.fill(&mut bytes[..]);
        let stamp = engine.write(pair, offset, Bytes::from(bytes)).await?;
        if stamp.ts <= last_ts {
            not_increasing += 1;
        }
        last_ts = stamp.ts;
        checker.wrote(pair, stamp);
    }
    let written = started.elapsed();
    engine.drain().await?;
    let drained = started.elapsed();
    let stats = engine.stats().await?;

    let differ = units_differ(&engine)?;
    engine.shutdown().await?;

    // Every application under a limit L applied exactly the writes with ts <= L.
    let violations = checker.violations();
    for v in violations.iter().take(5) {
        eprintln!("{v}");
    }
    let cut_violations = violations.len();
    let events = checker.applications();

    println!("multi system: 3 primaries, 2 secondaries, orderer on s0, {impair:?}");
    for (i, (&(l, r), p)) in mapping.iter().zip(&stats.pairs).enumerate() {
        println!(
            "  u{i}: p{l} -> s{r}   written #{:<5} applied #{:<5} retransmits {:<4} dropped {:<4} duplicates received {}",
            p.written_seq, p.applied_seq, p.retransmits, p.dropped, p.duplicates_received
        );
    }
    println!(
        "  {WRITES} dependent writes in {written:.2?}, remote caught up after {drained:.2?}; \
         limit released {} times; {} applications checked against the history",
        stats.commits,
        events.len()
    );
    println!(
        "  link: {} items sent, {} dropped, {} duplicated",
        stats.items_sent, stats.items_dropped, stats.items_duplicated
    );

    let mut failures = Vec::new();
    if not_increasing > 0 {
        failures.push(format!(
            "{not_increasing} dependent writes not stamped later"
        ));
    }
    if !differ.is_empty() {
        failures.push(format!("remote units differ from local: {differ:?}"));
    }
    if cut_violations > 0 {
        failures.push(format!("{cut_violations} applications were not a cut"));
    }
    if events.is_empty() {
        failures.push("no application was observed".into());
    }
    let violations: u64 = stats.pairs.iter().map(|p| p.limit_violations).sum();
    if violations > 0 {
        failures.push(format!("{violations} limit violations reported"));
    }
    if failures.is_empty() {
        println!("OK: every remote unit equals its local unit; every application was a cut");
        Ok(())
    } else {
        Err(failures.join("; ").into())
    }
}
