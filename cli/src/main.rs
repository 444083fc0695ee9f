//! The `tidemark` binary.

use clap::{Parser, Subcommand};
use std::path::Path;
use std::path::PathBuf;
use std::process::ExitCode;
use tidemark_actors::{EngineError, Impairment};
use tidemark_cli::config::Config;
use tidemark_cli::demo::{self, DemoConfig};
use tidemark_cli::wansim::{WanCounters, WanSim};
use tidemark_cli::{daemon, load};

/// The engine moves large buffers between threads (NBD reads, journal frames, datagrams);
/// glibc's allocator spent ~12 % of the link thread consolidating and freeing them.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    /// Write a new random 32-byte group key (hex, mode 0600).
    Keygen {
        /// Where to write the key; an existing file is never overwritten.
        #[arg(long)]
        out: PathBuf,
    },
    /// Run the primary system(s) of the config until SIGINT/SIGTERM.
    Primary(SystemArgs),
    /// Run the secondary system(s) of the config until SIGINT/SIGTERM.
    Secondary(SystemArgs),
    /// Run a primary system with a deterministic workload of dependent writes, wait until
    /// the remote holds them, and exit.
    Load(LoadArgs),
    /// A one-direction UDP impairment proxy.
    WanSim(WanSimArgs),
    /// Offline: bring stopped remote system(s) to the durable commit limit, a consistent
    /// cut; without --system, every remote system of the group to the same cut.
    Promote(PromoteArgs),
    /// Show the running systems of the config: per pair its state, sequence numbers,
    /// commit lag and link figures (asks each system on its control socket).
    Status(StatusArgs),
    /// Check, while clients write, that each remote unit holds what its local unit held
    /// at a common point, by checksums of regions; --repair resyncs the regions that
    /// differ. Exit 0 match, 1 differ, 3 not everything could be checked, 2 usage.
    Verify(VerifyArgs),
    /// Offline, after promote: serve the remote units of a stopped secondary read-only
    /// over NBD (one export per pair) until SIGINT/SIGTERM.
    Export(ExportArgs),
    /// Offline, after promote: make a promoted secondary the primary of the reversed
    /// group (writes the reversed config, bumps the generation).
    Failover(FailoverArgs),
    /// Offline: turn the old primary into the secondary of the reversed group, writing
    /// the regions it holds that never reached the cut.
    Demote(DemoteArgs),
    /// Offline: add the old primary's regions to the new primary's dirty maps; its next
    /// start resyncs only the regions that differ.
    Failback(FailbackArgs),
    /// Planned role swap against the running daemons of this host: quiesce the primary,
    /// drain, stop both, then promote, failover, demote and failback; writes the
    /// reversed config. Loses nothing; reports JSON.
    Switchover(SwitchoverArgs),
}

#[derive(clap::Args)]
struct SwitchoverArgs {
    /// The current config (both systems run on this host).
    #[arg(long)]
    config: PathBuf,
    /// Where to write the reversed config (never overwritten).
    #[arg(long)]
    out: PathBuf,
    /// Where demote writes its regions file (default: NEW.regions.json).
    #[arg(long)]
    regions_out: Option<PathBuf>,
    /// Bound of the drain and of each daemon's stop, in seconds.
    #[arg(long = "timeout-s", default_value_t = 60)]
    timeout_s: u64,
}

#[derive(clap::Args)]
struct FailoverArgs {
    /// The current config, where SYSTEM is the (promoted) secondary.
    #[arg(long)]
    config: PathBuf,
    #[arg(long)]
    system: String,
    /// Where to write the reversed config (never overwritten).
    #[arg(long)]
    out: PathBuf,
    /// Planned switchover: refuse if any write lies above the cut.
    #[arg(long)]
    require_drained: bool,
}

#[derive(clap::Args)]
struct DemoteArgs {
    /// The reversed config, where SYSTEM is the secondary.
    #[arg(long)]
    config: PathBuf,
    #[arg(long)]
    system: String,
    /// The new primary's generation (printed by failover).
    #[arg(long)]
    generation: u64,
    /// Where to write the regions to resend (never overwritten).
    #[arg(long)]
    regions_out: PathBuf,
    /// Planned switchover: refuse if the old primary holds a write the remote never got.
    #[arg(long)]
    require_drained: bool,
}

#[derive(clap::Args)]
struct FailbackArgs {
    /// The reversed config, where SYSTEM is the primary.
    #[arg(long)]
    config: PathBuf,
    #[arg(long)]
    system: String,
    /// The regions file demote wrote.
    #[arg(long)]
    regions: PathBuf,
}

#[derive(clap::Args)]
struct ExportArgs {
    #[arg(long)]
    config: PathBuf,
    /// The secondary system whose remote units are served.
    #[arg(long)]
    system: String,
    /// Where to serve (`127.0.0.1:10809`, `unix:/path`); default: the system's
    /// `nbd_listen`.
    #[arg(long)]
    listen: Option<String>,
    /// Serve units whose initial sync has not finished (NOT a consistent cut) anyway.
    #[arg(long)]
    force: bool,
}

#[derive(clap::Args)]
struct StatusArgs {
    #[arg(long)]
    config: PathBuf,
    /// Ask only this system (default: every system of the config).
    #[arg(long)]
    system: Option<String>,
    /// Print the stable JSON (one object; with --watch one per line) instead of a table.
    #[arg(long)]
    json: bool,
    /// Refresh in place until interrupted.
    #[arg(long)]
    watch: bool,
    /// With --watch: the refresh period in milliseconds (at least 100).
    #[arg(long = "interval-ms", default_value_t = 1000)]
    interval_ms: u64,
    /// With --watch: stop after this many refreshes.
    #[arg(long)]
    count: Option<u64>,
}

#[derive(clap::Args)]
struct VerifyArgs {
    #[arg(long)]
    config: PathBuf,
    /// Check only this pair (default: every pair).
    #[arg(long)]
    pair: Option<String>,
    /// Resync the regions that differ through the resync path, then check them again.
    #[arg(long)]
    repair: bool,
    /// Region size: one checksum per region (a multiple of 512, 4KiB to 64MiB).
    #[arg(long, default_value = "1MiB")]
    region: String,
    /// Print one JSON object instead of lines for a person.
    #[arg(long)]
    json: bool,
    /// Give up (exit 3) if the secondary has not answered a request within this many
    /// seconds.
    #[arg(long = "timeout-s", default_value_t = 10)]
    timeout_s: u64,
    /// Check regions that were busy (written between the two sides' reads, or the pair
    /// not replicating) again for up to this many seconds.
    #[arg(long = "busy-wait-s", default_value_t = 30)]
    busy_wait_s: u64,
}

#[derive(clap::Args)]
struct PromoteArgs {
    #[arg(long)]
    config: PathBuf,
    /// Promote only this system (default: every secondary, to one cut).
    #[arg(long)]
    system: Option<String>,
    /// Promote units whose initial sync has not finished (NOT a consistent cut) anyway.
    #[arg(long)]
    force: bool,
}

#[derive(clap::Args)]
struct SystemArgs {
    #[arg(long)]
    config: PathBuf,
    /// Run only this system (default: every system of the role).
    #[arg(long)]
    system: Option<String>,
}

#[derive(clap::Args)]
struct LoadArgs {
    #[arg(long)]
    config: PathBuf,
    #[arg(long)]
    system: String,
    #[arg(long, default_value_t = 1000)]
    writes: usize,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Largest write in bytes.
    #[arg(long = "max-write", default_value_t = 65536)]
    max_write: u64,
    /// Give up waiting for the remote after this many seconds.
    #[arg(long = "timeout-s", default_value_t = 120)]
    timeout_s: u64,
    /// Chains of dependent writes in flight at once.
    #[arg(long, default_value_t = 1)]
    depth: usize,
    /// Instead: write the same workload to plain files (no replication), for comparison.
    #[arg(long)]
    baseline: bool,
}

#[derive(clap::Args)]
struct WanSimArgs {
    #[arg(long)]
    listen: String,
    #[arg(long)]
    forward: String,
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    loss: f64,
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    dup: f64,
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    reorder: f64,
    #[arg(long = "delay-ms", default_value_t = 0)]
    delay_ms: u64,
    #[arg(long = "jitter-ms", default_value_t = 0)]
    jitter_ms: u64,
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true)]
    corrupt: f64,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// A bottleneck: at most this many bytes per second, e.g. "1MiB" (0: none).
    #[arg(long, default_value = "0")]
    rate: String,
    /// The bottleneck's drop-tail queue, in ms of sending at `--rate`.
    #[arg(long = "queue-ms", default_value_t = 100)]
    queue_ms: u64,
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
    /// Fill the local units with random data (with holes) first: the engine starts with
    /// an initial sync of every pair, which runs while the workload writes.
    #[arg(long)]
    prefill: bool,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        // Colours only for a person at a terminal, not in journald or a log file.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Demo(args) => run_demo(args),
        Command::Keygen { out } => exit(keygen(&out)),
        Command::Primary(a) => exit(run_system(a, true)),
        Command::Secondary(a) => exit(run_system(a, false)),
        Command::Load(a) => exit(load(a)),
        Command::WanSim(a) => exit(wan_sim(a)),
        Command::Promote(a) => exit(promote(a)),
        Command::Status(a) => status(a),
        Command::Verify(a) => verify(a),
        Command::Export(a) => exit(export(a)),
        Command::Failover(a) => exit(failover(a)),
        Command::Demote(a) => exit(demote(a)),
        Command::Failback(a) => exit(failback(a)),
        Command::Switchover(a) => switchover(a),
    }
}

/// Exit codes: 0 success, 2 bad usage or config ([`EngineError::is_usage`]), 1 a
/// failure while running.
fn exit(r: Result<(), EngineError>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tidemark: {e}");
            ExitCode::from(if e.is_usage() { 2 } else { 1 })
        }
    }
}

fn keygen(out: &Path) -> Result<(), EngineError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut key = [0u8; 32];
    rand::Rng::fill(&mut rand::rng(), &mut key[..]);
    let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(out)
        .map_err(EngineError::io(format!("--out {}", out.display())))?;
    f.write_all(format!("{hex}\n").as_bytes())
        .and_then(|_| f.sync_all())
        .map_err(EngineError::io(format!("--out {}", out.display())))?;
    Ok(())
}

fn run_system(a: SystemArgs, primary: bool) -> Result<(), EngineError> {
    let cfg = Config::load(&a.config)?;
    let here = cfg.select(a.system.as_deref(), primary)?;
    if here.is_empty() {
        return Err(EngineError::Config(format!(
            "no {} system in {}",
            if primary { "primary" } else { "secondary" },
            a.config.display()
        )));
    }
    actix_rt::System::new().block_on(daemon::run_until_signal(&cfg, &here))
}

/// `tidemark status`: 0 if every system asked answered (with --watch: on leaving), 1 if
/// the system named or every system is not running, 2 for bad flags or config.
fn status(a: StatusArgs) -> ExitCode {
    use std::io::Write;
    use tidemark_cli::status;
    let cfg = match Config::load(&a.config) {
        Ok(c) => c,
        Err(e) => return exit(Err(e)),
    };
    let systems = match &a.system {
        Some(n) => match cfg.system(n) {
            Ok(i) => vec![i],
            Err(e) => return exit(Err(e)),
        },
        None => (0..cfg.systems.len()).collect(),
    };
    if a.interval_ms < 100 {
        return exit(Err(EngineError::Config(format!(
            "--interval-ms: {} is below 100",
            a.interval_ms
        ))));
    }
    if a.count.is_some() && !a.watch {
        return exit(Err(EngineError::Config(
            "--count: only with --watch".into(),
        )));
    }
    let mut shown = 0u64;
    loop {
        let g = status::collect(&cfg, &systems);
        if !a.watch && g.systems.iter().all(|s| !s.running) {
            let why = match &g.systems[..] {
                [one] => format!(
                    "{}: {}",
                    one.name,
                    one.error.as_deref().unwrap_or("no answer")
                ),
                all => format!(
                    "not running: no system of {} ({}) answers on its control socket here",
                    a.config.display(),
                    all.iter()
                        .map(|s| s.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            };
            eprintln!("tidemark status: {why}");
            return ExitCode::from(1);
        }
        let text = if a.json {
            match serde_json::to_string(&g) {
                Ok(t) => t + "\n",
                Err(e) => return exit(Err(EngineError::Config(format!("status: {e}")))),
            }
        } else {
            status::render(&g)
        };
        let mut out = std::io::stdout().lock();
        let written = if a.watch && !a.json {
            // Home, clear the screen, then the table: it refreshes in place.
            write!(out, "\x1b[H\x1b[2J{text}")
        } else {
            write!(out, "{text}")
        };
        if written.and_then(|_| out.flush()).is_err() {
            // stdout closed (a pipe whose reader left): nothing more to show.
            return ExitCode::SUCCESS;
        }
        drop(out);
        shown += 1;
        if !a.watch || a.count.is_some_and(|c| shown >= c) {
            return ExitCode::SUCCESS;
        }
        std::thread::sleep(std::time::Duration::from_millis(a.interval_ms));
    }
}

/// `tidemark verify`: 0 match, 1 differ, 3 not everything could be checked, 2 bad
/// flags or config.
fn verify(a: VerifyArgs) -> ExitCode {
    use std::io::IsTerminal;
    use tidemark_cli::verify;
    let cfg = match Config::load(&a.config) {
        Ok(c) => c,
        Err(e) => return exit(Err(e)),
    };
    let region = match tidemark_cli::config::parse_size("--region", &a.region) {
        Ok(r) => r,
        Err(e) => return exit(Err(e)),
    };
    if a.timeout_s == 0 {
        return exit(Err(EngineError::Config("--timeout-s: at least 1".into())));
    }
    let args = verify::VerifyArgs {
        pair: a.pair,
        repair: a.repair,
        region,
        timeout: std::time::Duration::from_secs(a.timeout_s),
        busy_wait: std::time::Duration::from_secs(a.busy_wait_s),
        progress: std::io::stderr().is_terminal(),
    };
    let report = match verify::run(&cfg, &args) {
        Ok(r) => r,
        Err(e) => return exit(Err(e)),
    };
    if a.json {
        match serde_json::to_string(&report) {
            Ok(t) => println!("{t}"),
            Err(e) => return exit(Err(EngineError::Config(format!("verify: {e}")))),
        }
    } else {
        print!("{}", verify::render(&report));
    }
    for p in &report.pairs {
        if let Some(e) = &p.error {
            eprintln!("tidemark verify: pair {}: {e}", p.name);
        }
    }
    ExitCode::from(report.exit_code())
}

fn promote(a: PromoteArgs) -> Result<(), EngineError> {
    let cfg = Config::load(&a.config)?;
    let systems = cfg.select(a.system.as_deref(), false)?;
    let report = tidemark_cli::promote::promote(&cfg, &systems, a.system.is_none(), a.force)?;
    for p in report.pairs.iter().filter(|p| p.state == "inconsistent") {
        warn_forced("promote", &p.name, &p.system);
    }
    println!("{}", serde_json::to_string(&report).unwrap_or_default());
    if !report.gap {
        Ok(())
    } else {
        Err(EngineError::JournalState(
            "the journal has a gap below the durable limit: not a consistent cut".into(),
        ))
    }
}

fn failover(a: FailoverArgs) -> Result<(), EngineError> {
    let cfg = Config::load(&a.config)?;
    let system = cfg.select(Some(&a.system), false)?[0];
    let report = tidemark_cli::failover::failover(&cfg, system, &a.out, a.require_drained)?;
    println!("{}", serde_json::to_string(&report).unwrap_or_default());
    Ok(())
}

fn demote(a: DemoteArgs) -> Result<(), EngineError> {
    let cfg = Config::load(&a.config)?;
    let system = cfg.select(Some(&a.system), false)?[0];
    let report = tidemark_cli::failover::demote(
        &cfg,
        system,
        a.generation,
        &a.regions_out,
        a.require_drained,
    )?;
    println!("{}", serde_json::to_string(&report).unwrap_or_default());
    Ok(())
}

fn failback(a: FailbackArgs) -> Result<(), EngineError> {
    let cfg = Config::load(&a.config)?;
    let system = cfg.select(Some(&a.system), true)?[0];
    let report = tidemark_cli::failover::failback(&cfg, system, &a.regions)?;
    println!("{}", serde_json::to_string(&report).unwrap_or_default());
    Ok(())
}

fn switchover(a: SwitchoverArgs) -> ExitCode {
    use tidemark_cli::switchover::SwitchoverError;
    let cfg = match Config::load(&a.config) {
        Ok(c) => c,
        Err(e) => return exit(Err(e)),
    };
    if a.timeout_s == 0 || a.timeout_s > 3600 {
        eprintln!(
            "tidemark switchover: --timeout-s: {} is outside 1..=3600",
            a.timeout_s
        );
        return ExitCode::from(2);
    }
    let timeout = std::time::Duration::from_secs(a.timeout_s);
    match tidemark_cli::switchover::switchover(&cfg, &a.out, a.regions_out.as_deref(), timeout) {
        Ok(o) => {
            println!("{}", serde_json::to_string(&o).unwrap_or_default());
            if o.ok {
                ExitCode::SUCCESS
            } else {
                eprintln!(
                    "tidemark switchover: failed at {}: {}\n  state: {}\n  next:\n    {}",
                    o.failed_step.as_deref().unwrap_or("?"),
                    o.error.as_deref().unwrap_or(""),
                    o.state,
                    o.next.join("\n    ")
                );
                ExitCode::from(1)
            }
        }
        Err(SwitchoverError::Refused(m)) => {
            eprintln!("tidemark switchover: {m} (nothing was changed)");
            ExitCode::from(2)
        }
        Err(SwitchoverError::Engine(e)) => exit(Err(e)),
    }
}

/// What `--force` took, said loudly on stderr.
fn warn_forced(command: &str, pair: &str, system: &str) {
    eprintln!(
        "tidemark {command}: WARNING (--force): pair {pair} ({system}): initial sync not \
         finished: the remote unit is NOT a consistent cut; its data is a mix of old and \
         new blocks"
    );
}

fn export(a: ExportArgs) -> Result<(), EngineError> {
    use tidemark_actors::nbd::{AnyListener, Limits, ListenAddr};
    use tidemark_cli::export::Exporter;
    let cfg = Config::load(&a.config)?;
    let system = cfg.select(Some(&a.system), false)?[0];
    let (key, text) = match (&a.listen, &cfg.systems[system].nbd_listen) {
        (Some(l), _) => ("--listen".to_string(), l.clone()),
        (None, Some(l)) => (
            format!("system[{system}] ({}).nbd_listen", a.system),
            l.clone(),
        ),
        (None, None) => {
            return Err(EngineError::Config(format!(
                "--listen: not given, and system {:?} has no nbd_listen",
                a.system
            )))
        }
    };
    let addr: ListenAddr = text
        .parse()
        .map_err(|e| EngineError::Config(format!("{key}: {e}")))?;
    // The same rule as for nbd_listen: plain NBD only where other hosts cannot reach it
    // (or with nbd_insecure); the system's TLS settings apply to --listen too.
    cfg.systems[system].check_nbd_exposure(&key, &addr)?;
    let tls = cfg.systems[system].load_nbd_tls(system)?;
    let exporter = Exporter::open(&cfg, system, a.force)?;
    for e in exporter
        .report()
        .exports
        .iter()
        .filter(|e| e.state == "inconsistent")
    {
        warn_forced("export", &e.name, &a.system);
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(EngineError::io("cannot start the runtime"))?;
    rt.block_on(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let listener = AnyListener::bind(&addr)
            .await
            .map_err(EngineError::io(format!("{key}: cannot listen on {addr}")))?;
        // Watch the signals before saying we serve: a client told so may stop us at once.
        let watch =
            |kind: SignalKind| signal(kind).map_err(EngineError::io("cannot watch signals"));
        let (mut int, mut term) = (
            watch(SignalKind::interrupt())?,
            watch(SignalKind::terminate())?,
        );
        let mut report = exporter.report().clone();
        report.listen = listener
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|_| addr.to_string());
        println!("{}", serde_json::to_string(&report).unwrap_or_default());
        use std::io::Write;
        let _ = std::io::stdout().flush();
        let stop = async move {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
        };
        listener
            .serve(exporter.backend().clone(), Limits::default(), tls, stop)
            .await;
        drop(exporter);
        Ok(())
    })
}

fn load(a: LoadArgs) -> Result<(), EngineError> {
    let cfg = Config::load(&a.config)?;
    let here = cfg.select(Some(&a.system), true)?;
    let report = if a.baseline {
        load::baseline(&cfg, here[0], a.writes, a.seed, a.max_write, a.depth)?
    } else {
        actix_rt::System::new().block_on(load::load(
            &cfg,
            here[0],
            a.writes,
            a.seed,
            a.max_write,
            a.depth,
            std::time::Duration::from_secs(a.timeout_s),
        ))?
    };
    println!("{}", serde_json::to_string(&report).unwrap_or_default());
    Ok(())
}

fn wan_sim(a: WanSimArgs) -> Result<(), EngineError> {
    let addr = |k: &str, s: &str| -> Result<std::net::SocketAddr, EngineError> {
        s.parse()
            .map_err(|e| EngineError::Config(format!("--{k}: {s:?} is not an address ({e})")))
    };
    let sim = WanSim {
        listen: addr("listen", &a.listen)?,
        forward: addr("forward", &a.forward)?,
        impair: Impairment {
            loss: a.loss,
            dup: a.dup,
            reorder: a.reorder,
            delay: demo::ms(a.delay_ms),
            jitter: demo::ms(a.jitter_ms),
        },
        corrupt: a.corrupt,
        seed: a.seed,
        rate: tidemark_cli::config::parse_size("rate", &a.rate)?,
        queue: demo::ms(a.queue_ms),
    };
    sim.validate()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(EngineError::io("cannot start the runtime"))?;
    rt.block_on(async move {
        let (inbound, outbound) = sim
            .bind()
            .await
            .map_err(EngineError::io(format!("--listen {}", sim.listen)))?;
        let counters = std::sync::Arc::new(WanCounters::default());
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .map_err(EngineError::io("cannot watch SIGTERM"))?;
        tokio::select! {
            _ = sim.run(inbound, outbound, counters.clone()) => {}
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        eprintln!("wan-sim: {counters:?}");
        Ok(())
    })
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
        prefill: a.prefill,
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
        if report.synced_bytes > 0 || report.prefilled_bytes > 0 {
            println!(
                "  initial sync: {:.1} MiB copied ({:.1} MiB prefilled, with holes), {} the last write",
                report.synced_bytes as f64 / (1 << 20) as f64,
                report.prefilled_bytes as f64 / (1 << 20) as f64,
                if report.synced_before_last_write {
                    "finished before"
                } else {
                    "still running at"
                }
            );
        }
        println!(
            "  commit lag (write stamped -> applied at the remote): p50 {} us, p99 {} us",
            report.lag_p50_us, report.lag_p99_us
        );
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
