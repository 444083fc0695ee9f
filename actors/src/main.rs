//! The `tidemark` binary.

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use tidemark_actors::demo::{self, DemoConfig};
use tidemark_actors::Impairment;

#[derive(Parser)]
#[command(
    name = "tidemark",
    version,
    about = "Asynchronous remote copy with consistency groups"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a two-site topology in one process, write, drain, and check the remote copies.
    Demo(DemoArgs),
}

#[derive(clap::Args)]
struct DemoArgs {
    /// Pairs that receive writes.
    #[arg(long, default_value_t = 4)]
    pairs: usize,
    /// Dependent writes to issue (each after the previous one completed).
    #[arg(long, default_value_t = 5000)]
    writes: usize,
    /// Extra pairs that receive no writes at all.
    #[arg(long, default_value_t = 0)]
    idle: usize,
    /// Probability that the network drops an item, in [0, 1).
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    loss: f64,
    /// Probability that the network duplicates an item, in [0, 1).
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    dup: f64,
    /// Probability that the network holds an item back (reordering), in [0, 1].
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    reorder: f64,
    /// One-way network delay in milliseconds.
    #[arg(long = "delay-ms", default_value_t = 0)]
    delay_ms: u64,
    /// Size of each unit in MiB.
    #[arg(long = "unit-mib", default_value_t = 16)]
    unit_mib: u64,
    /// Seed for the workload and the network.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Keep the units in DIR (default: a temporary directory, removed afterwards).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Print one JSON object instead of a human summary.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Demo(args) => run_demo(args),
    }
}

fn run_demo(a: DemoArgs) -> ExitCode {
    let cfg = DemoConfig {
        pairs: a.pairs,
        idle: a.idle,
        writes: a.writes,
        unit_size: a.unit_mib.max(1) << 20,
        max_write: (64 << 10).min(a.unit_mib.max(1) << 20),
        impair: Impairment {
            loss: a.loss,
            dup: a.dup,
            reorder: a.reorder,
            delay: demo::ms(a.delay_ms),
            jitter: demo::ms(0),
        },
        seed: a.seed,
        dir: a.dir,
        progress: !a.json,
    };
    if let Err(e) = cfg.validate() {
        eprintln!("tidemark demo: {e}");
        return ExitCode::from(2);
    }
    let system = actix_rt::System::new();
    let report = match system.block_on(demo::run(cfg)) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("tidemark demo: {e}");
            return ExitCode::from(1);
        }
    };
    if a.json {
        match serde_json::to_string(&report) {
            Ok(s) => println!("{s}"),
            Err(e) => {
                eprintln!("tidemark demo: cannot print the report: {e}");
                return ExitCode::from(1);
            }
        }
    } else {
        let secs = report.elapsed_ms.max(1) as f64 / 1000.0;
        println!(
            "tidemark demo: {} pairs (+{} idle), {} dependent writes, {:.1} MiB in {:.2} s ({:.0} writes/s)",
            report.pairs,
            report.idle_pairs,
            report.writes,
            report.bytes as f64 / (1 << 20) as f64,
            secs,
            report.writes as f64 / secs
        );
        println!("  drain after the last write: {} ms", report.drain_ms);
        println!(
            "  network: {} dropped, {} duplicated; {} retransmissions",
            report.dropped, report.duplicated, report.retransmits
        );
        println!(
            "  {} commit limits released, {} applications checked against the history",
            report.commits, report.applications_checked
        );
        println!(
            "  consistent (every applied limit a cut): {}",
            report.consistent
        );
        println!(
            "  identical (remote == local, byte for byte): {}",
            report.identical
        );
        for p in &report.problems {
            println!("  problem: {p}");
        }
        if !report.dir.is_empty() {
            println!("  units kept in {}", report.dir);
        }
    }
    if report.consistent && report.identical {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}
