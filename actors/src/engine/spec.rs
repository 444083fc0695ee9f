//! What a consistency group is and how to run it: systems, pairs, the orderer, the
//! network, the clock.

use crate::error::EngineError;
use crate::msg::Wall;
use crate::net::impair::Impairment;
use crate::units::local::TrackConfig;
use crate::units::remote::ApplyHook;
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tidemark::timebase::TimeBaseConfig;
use tidemark::{BlockStore, FileStore, MemStore, PairId, SystemId};

/// Whether a system holds local (primary) or remote units.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Primary,
    Secondary,
}

/// Where a unit's bytes live.
#[derive(Clone)]
pub enum StoreSpec {
    Memory,
    File(PathBuf),
    /// A store the caller made (its own device driver, or a faulty disk in a test). Its
    /// size must be the pair's.
    Shared(Arc<dyn BlockStore>),
}

impl std::fmt::Debug for StoreSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreSpec::Memory => f.write_str("Memory"),
            StoreSpec::File(p) => f.debug_tuple("File").field(p).finish(),
            StoreSpec::Shared(s) => write!(f, "Shared({} bytes)", s.size()),
        }
    }
}

impl PartialEq for StoreSpec {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (StoreSpec::Memory, StoreSpec::Memory) => true,
            (StoreSpec::File(a), StoreSpec::File(b)) => a == b,
            (StoreSpec::Shared(a), StoreSpec::Shared(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }
}

/// Whether a pair's local unit is copied to the remote before ordered replication
/// (initial sync; see [`crate::units::sync`]). Decided at the pair's first start; its
/// journal remembers the outcome, so a restart copies again only if a copy was cut short.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum InitialSync {
    /// Copy if the local unit holds data (any allocated extent).
    #[default]
    Auto,
    /// Copy the whole unit (its allocated extents; holes as zero ranges).
    Full,
    /// The units are known to be identical (e.g. both new and blank): no copy.
    None,
}

/// What a primary's journal keeps of each client write of a replicating pair.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PrimaryJournal {
    /// The write's data. A restarted primary resends what the remote had not
    /// acknowledged, from the journal: the stream goes on where it stopped.
    #[default]
    Data,
    /// Only its stamp, offset and length (an activity log, as DRBD keeps one): one
    /// page-cache write and one checksum pass per byte less. The sender holds the data
    /// until the remote acknowledges it, as in either mode. A restart cannot resend a
    /// logged write: it marks the logged regions dirty and restarts the pair's stream,
    /// and the consistent resync copies those regions (the remote's resync epoch keeps
    /// its last cut recoverable meanwhile). Writes of an initial sync are journaled
    /// with their data in either mode.
    ActivityLog,
}

/// A remote copy pair: a local unit on a primary system mirrored to a remote unit on a
/// secondary system (claims 13, 16, 17: any primary to any secondary).
#[derive(Clone, Debug)]
pub struct PairSpec {
    pub name: String,
    pub local: SystemId,
    pub remote: SystemId,
    pub size: u64,
    pub local_store: StoreSpec,
    pub remote_store: StoreSpec,
}

/// Describes a consistency group and how to run it.
pub struct EngineBuilder {
    pub(super) systems: Vec<(String, Role)>,
    pub(super) pairs: Vec<PairSpec>,
    pub(super) orderer: Option<SystemId>,
    pub(super) impair: Impairment,
    pub(super) seed: u64,
    pub(super) heartbeat: Duration,
    pub(super) threads: usize,
    pub(super) disk_threads: usize,
    pub(super) window_bytes: usize,
    pub(super) hook: Option<ApplyHook>,
    pub(super) wall: Option<Wall>,
    pub(super) rtt: (Duration, Duration, Duration),
    pub(super) run: Option<BTreeSet<SystemId>>,
    pub(super) udp: Option<UdpTransport>,
    pub(super) journals: BTreeMap<SystemId, (PathBuf, u64)>,
    pub(super) time_base: TimeBaseConfig,
    pub(super) initial_sync: BTreeMap<PairId, InitialSync>,
    pub(super) undo_dirs: BTreeMap<SystemId, PathBuf>,
    pub(super) undo_region: u64,
    pub(super) track: TrackConfig,
    pub(super) track_from_start: bool,
    pub(super) region: u64,
    pub(super) pace: Option<tidemark::pace::PaceRule>,
    pub(super) primary_journal: PrimaryJournal,
}

impl Default for EngineBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl EngineBuilder {
    /// Defaults: heartbeat 10 ms, 2 actor threads, 2 disk threads, a perfect network,
    /// the system wall clock, a 64 MiB unacknowledged window per pair.
    pub fn new() -> Self {
        EngineBuilder {
            systems: Vec::new(),
            pairs: Vec::new(),
            orderer: None,
            impair: Impairment::none(),
            seed: 0,
            heartbeat: Duration::from_millis(10),
            threads: 2,
            disk_threads: 2,
            window_bytes: 64 << 20,
            hook: None,
            wall: None,
            rtt: (
                Duration::from_millis(20),
                Duration::from_millis(2),
                Duration::from_secs(1),
            ),
            run: None,
            udp: None,
            journals: BTreeMap::new(),
            time_base: TimeBaseConfig::default(),
            initial_sync: BTreeMap::new(),
            undo_dirs: BTreeMap::new(),
            undo_region: tidemark::undo::DEFAULT_REGION,
            track: TrackConfig::default(),
            track_from_start: false,
            region: tidemark::dirty::DEFAULT_REGION,
            pace: None,
            primary_journal: PrimaryJournal::Data,
        }
    }

    /// What primaries' journals keep of each client write (default
    /// [`PrimaryJournal::Data`]).
    pub fn primary_journal(&mut self, mode: PrimaryJournal) -> &mut Self {
        self.primary_journal = mode;
        self
    }

    /// Write pacing: every local unit holds its write acknowledgements by the rule's
    /// delay ([`tidemark::pace`]); `None` (the default): no pacing.
    pub fn pacing(&mut self, rule: Option<tidemark::pace::PaceRule>) -> &mut Self {
        self.pace = rule;
        self
    }

    /// Where the remote units of `system` keep their undo files during a resync epoch
    /// (default: `undo/` in the system's journal directory; a system without a journal
    /// keeps none).
    pub fn undo_dir(&mut self, system: SystemId, dir: PathBuf) -> &mut Self {
        self.undo_dirs.insert(system, dir);
        self
    }

    /// The undo region size: what one save copies at least (a multiple of 512 bytes up
    /// to 16 MiB; default 64 KiB). Checked at start.
    pub fn undo_region(&mut self, bytes: u64) -> &mut Self {
        self.undo_region = bytes;
        self
    }

    /// The undo directory of `system`'s remote units, if they keep undo files.
    pub(super) fn undo_dir_of(&self, system: SystemId) -> Option<PathBuf> {
        let (journal, _) = self.journals.get(&system)?;
        Some(
            self.undo_dirs
                .get(&system)
                .cloned()
                .unwrap_or_else(|| journal.join("undo")),
        )
    }

    /// Settings of the time base that a process runs when other processes stamp writes
    /// of the group too (see `tidemark::timebase`; on by itself in that case).
    pub fn time_base(&mut self, cfg: TimeBaseConfig) -> &mut Self {
        self.time_base = cfg;
        self
    }

    /// Gives `system` a durable journal of `capacity` bytes in `dir`; it is recovered at
    /// start.
    pub fn journal(&mut self, system: SystemId, dir: PathBuf, capacity: u64) -> &mut Self {
        self.journals.insert(system, (dir, capacity));
        self
    }

    /// Runs only these systems in this process (the others run elsewhere and are
    /// reached over UDP). Default: all of them.
    pub fn run_only(&mut self, systems: &[SystemId]) -> &mut Self {
        self.run = Some(systems.iter().copied().collect());
        self
    }

    /// Connects the systems over UDP instead of the in-process link.
    pub fn udp(&mut self, transport: UdpTransport) -> &mut Self {
        self.udp = Some(transport);
        self
    }

    /// Adds a primary system (holds local units).
    pub fn primary(&mut self, name: &str) -> SystemId {
        self.system(name, Role::Primary)
    }

    /// Adds a secondary system (holds remote units).
    pub fn secondary(&mut self, name: &str) -> SystemId {
        self.system(name, Role::Secondary)
    }

    fn system(&mut self, name: &str, role: Role) -> SystemId {
        self.systems.push((name.to_string(), role));
        SystemId(self.systems.len() as u32 - 1)
    }

    /// Adds a pair; ids are handed out in order from 0.
    pub fn pair(&mut self, spec: PairSpec) -> PairId {
        self.pairs.push(spec);
        PairId(self.pairs.len() as u32 - 1)
    }

    /// Adds an in-memory pair of `size` bytes.
    pub fn mem_pair(&mut self, name: &str, local: SystemId, remote: SystemId, size: u64) -> PairId {
        self.pair(PairSpec {
            name: name.to_string(),
            local,
            remote,
            size,
            local_store: StoreSpec::Memory,
            remote_store: StoreSpec::Memory,
        })
    }

    /// The system that runs the group's orderer (default: the first pair's remote
    /// system).
    pub fn orderer(&mut self, system: SystemId) -> &mut Self {
        self.orderer = Some(system);
        self
    }

    pub fn impairment(&mut self, impair: Impairment) -> &mut Self {
        self.impair = impair;
        self
    }

    /// Seeds the network impairment.
    pub fn seed(&mut self, seed: u64) -> &mut Self {
        self.seed = seed;
        self
    }

    pub fn heartbeat(&mut self, every: Duration) -> &mut Self {
        self.heartbeat = every;
        self
    }

    /// Actor threads (arbiters); the systems here are spread over them. 0 runs every
    /// actor on the caller's arbiter.
    pub fn threads(&mut self, n: usize) -> &mut Self {
        self.threads = n;
        self
    }

    /// Disk threads per system; 0 runs disk work inline on the actor threads (in-memory units).
    pub fn disk_threads(&mut self, n: usize) -> &mut Self {
        self.disk_threads = n;
        self
    }

    /// Writers of a pair wait while this many bytes are unacknowledged.
    pub fn window_bytes(&mut self, n: usize) -> &mut Self {
        self.window_bytes = n;
        self
    }

    /// Retransmission timeout: initial, minimum, maximum.
    pub fn rto(&mut self, initial: Duration, min: Duration, max: Duration) -> &mut Self {
        self.rtt = (initial, min, max);
        self
    }

    /// Whether `pair` is copied to the remote first (default [`InitialSync::Auto`]).
    pub fn initial_sync(&mut self, pair: PairId, mode: InitialSync) -> &mut Self {
        self.initial_sync.insert(pair, mode);
        self
    }

    /// When a primary pair stops shipping and tracks dirty regions instead (default:
    /// never: writers wait for the remote, as with `on_journal_full = "block"`).
    pub fn tracking(&mut self, track: TrackConfig) -> &mut Self {
        self.track = track;
        self
    }

    /// Every local unit here starts tracking, and leaves it only once its remote
    /// answers: no write is journaled or shipped before, each one's region is in the
    /// dirty map first. A resync the map would begin at start waits for that answer
    /// too. For a promoted secondary that runs as the primary until its failback.
    pub fn track_from_start(&mut self, on: bool) -> &mut Self {
        self.track_from_start = on;
        self
    }

    /// Bytes per region of the dirty-region map (a power of two, 4 KiB to 1 GiB; default
    /// 64 KiB).
    pub fn region_size(&mut self, bytes: u64) -> &mut Self {
        self.region = bytes;
        self
    }

    /// Called after every application of a commit limit on every remote unit.
    pub fn on_applied(&mut self, hook: ApplyHook) -> &mut Self {
        self.hook = Some(hook);
        self
    }

    /// The wall clock under the hybrid clock (nanoseconds).
    pub fn wall_clock(&mut self, wall: impl Fn() -> u64 + Send + Sync + 'static) -> &mut Self {
        self.wall = Some(Arc::new(wall));
        self
    }

    /// Deterministic simulation: every actor on the caller's arbiter, disk work inline,
    /// and the hybrid clock reading tokio's clock (pause it for simulated time). With a
    /// seed, one run replays exactly.
    pub fn simulated(&mut self) -> &mut Self {
        self.threads = 0;
        self.disk_threads = 0;
        let start = tokio::time::Instant::now();
        self.wall_clock(move || 1_000_000_000 + start.elapsed().as_nanos() as u64)
    }

    pub(super) fn validate(&self) -> Result<SystemId, EngineError> {
        let bad = |m: String| Err(EngineError::Topology(m));
        if let Err(e) = tidemark::undo::check_region(self.undo_region) {
            return bad(e.to_string());
        }
        let mut names = BTreeSet::new();
        for (n, _) in &self.systems {
            if n.is_empty() {
                return bad("a system needs a name".into());
            }
            if !names.insert(n) {
                return bad(format!("system {n:?} is listed twice"));
            }
        }
        if self.pairs.is_empty() {
            return bad("a consistency group needs at least one pair".into());
        }
        let role = |s: SystemId| self.systems.get(s.0 as usize).map(|(_, r)| *r);
        let mut pair_names = BTreeSet::new();
        let mut paths = BTreeSet::new();
        for p in &self.pairs {
            if !pair_names.insert(&p.name) {
                return bad(format!("pair {:?} is listed twice", p.name));
            }
            if p.size == 0 {
                return bad(format!("pair {:?} has size 0", p.name));
            }
            match role(p.local) {
                Some(Role::Primary) => {}
                Some(Role::Secondary) => {
                    return bad(format!("pair {:?}: local system is a secondary", p.name))
                }
                None => {
                    return bad(format!(
                        "pair {:?}: unknown local system {}",
                        p.name, p.local
                    ))
                }
            }
            match role(p.remote) {
                Some(Role::Secondary) => {}
                Some(Role::Primary) => {
                    return bad(format!("pair {:?}: remote system is a primary", p.name))
                }
                None => {
                    return bad(format!(
                        "pair {:?}: unknown remote system {}",
                        p.name, p.remote
                    ))
                }
            }
            for s in [&p.local_store, &p.remote_store] {
                if let StoreSpec::File(path) = s {
                    if !paths.insert(path.clone()) {
                        return bad(format!(
                            "pair {:?}: path {} is used twice",
                            p.name,
                            path.display()
                        ));
                    }
                }
            }
        }
        let orderer = match self.orderer {
            Some(o) if role(o).is_some() => o,
            Some(o) => return bad(format!("orderer system {o} does not exist")),
            None => self.pairs[0].remote,
        };
        Ok(orderer)
    }

    /// Every system's name by id (for logs and status).
    pub(super) fn system_names(&self) -> BTreeMap<SystemId, String> {
        self.systems
            .iter()
            .enumerate()
            .map(|(j, (n, _))| (SystemId(j as u32), n.clone()))
            .collect()
    }

    pub(super) fn open(spec: &StoreSpec, size: u64) -> Result<Arc<dyn BlockStore>, EngineError> {
        Ok(match spec {
            StoreSpec::Memory => Arc::new(MemStore::new(size)),
            StoreSpec::File(p) => Arc::new(FileStore::open_or_create(p, size)?),
            StoreSpec::Shared(s) if s.size() == size => s.clone(),
            StoreSpec::Shared(s) => {
                return Err(EngineError::Topology(format!(
                    "a shared store of {} bytes for a pair of {size} bytes",
                    s.size()
                )))
            }
        })
    }
}

/// How the systems of a group reach each other over UDP.
#[derive(Clone)]
pub struct UdpTransport {
    pub key: [u8; 32],
    /// Where each system of this process listens.
    pub listen: BTreeMap<SystemId, SocketAddr>,
    /// Where each system is sent to.
    pub advertise: BTreeMap<SystemId, SocketAddr>,
    pub link: tidemark::link::LinkConfig,
    /// This process's session epoch: must grow across restarts (start-up wall clock).
    pub epoch: u64,
}
