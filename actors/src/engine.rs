//! Library start-up: describe systems, pairs, the group's orderer, the network and the
//! clock with an [`EngineBuilder`]; [`EngineBuilder::start`] starts the actor system and
//! returns an [`Engine`] handle to write, flush, drain, watch and shut down.

use crate::disk::Disk;
use crate::error::EngineError;
use crate::impair::Impairment;
use crate::journaling::SharedJournal;
use crate::lag::percentile;
use crate::link::{Link, PairCounters, SetPeers};
use crate::local::{LocalConfig, LocalResume, LocalUnit};
use crate::msg::*;
use crate::orderer::OrdererActor;
use crate::remote::{ApplyHook, RemoteResume, RemoteUnit, RemoteWiring};
use crate::route::{OrdererRoute, RemoteUnitRoute, Routes, SetRoutes, SiteRoute, TimeBaseRoute};
use crate::site::RemoteSite;
use crate::timebase::{TimeBaseActor, TimeStatus};
use crate::udp::{UdpLink, UdpStatus};
use actix::prelude::*;
use bytes::Bytes;
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tidemark::journal::Recovered;
use tidemark::timebase::{CommitGate, TimeBase, TimeBaseConfig};
use tidemark::{BlockStore, FileStore, HybridClock, MemStore, Offset, Orderer, PairId, Payload};
use tidemark::{Seq, Stamp, SystemId, Timestamp};

/// Whether a system holds local (primary) or remote units.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Primary,
    Secondary,
}

/// Where a unit's bytes live.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreSpec {
    Memory,
    File(PathBuf),
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
    systems: Vec<(String, Role)>,
    pairs: Vec<PairSpec>,
    orderer: Option<SystemId>,
    impair: Impairment,
    seed: u64,
    heartbeat: Duration,
    threads: usize,
    disk_threads: usize,
    window_bytes: usize,
    hook: Option<ApplyHook>,
    wall: Option<Wall>,
    rtt: (Duration, Duration, Duration),
    run: Option<BTreeSet<SystemId>>,
    udp: Option<UdpTransport>,
    journals: BTreeMap<SystemId, (PathBuf, u64)>,
    time_base: TimeBaseConfig,
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
        }
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

    /// The system that runs the group's orderer (default: the first secondary).
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

    fn validate(&self) -> Result<SystemId, EngineError> {
        let bad = |m: String| Err(EngineError::Topology(m));
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
    fn system_names(&self) -> BTreeMap<SystemId, String> {
        self.systems
            .iter()
            .enumerate()
            .map(|(j, (n, _))| (SystemId(j as u32), n.clone()))
            .collect()
    }

    fn open(spec: &StoreSpec, size: u64) -> Result<Arc<dyn BlockStore>, EngineError> {
        Ok(match spec {
            StoreSpec::Memory => Arc::new(MemStore::new(size)),
            StoreSpec::File(p) => Arc::new(FileStore::open_or_create(p, size)?),
        })
    }

    /// Starts the actors. Must run inside an actix system. Nothing is started if the
    /// description is invalid or a unit cannot be opened.
    pub fn start(&self) -> Result<Engine, EngineError> {
        let orderer_system = self.validate()?;
        self.impair.validate()?;
        if self.heartbeat.is_zero() {
            return Err(EngineError::Topology(
                "heartbeat interval must be above 0".into(),
            ));
        }
        let runs = |s: SystemId| self.run.as_ref().is_none_or(|r| r.contains(&s));
        if self.udp.is_none() && self.run.is_some() {
            return Err(EngineError::Topology(
                "the in-process link needs every system in this process".into(),
            ));
        }
        // Open what runs here first: a unit that cannot be opened starts nothing.
        let mut stores = Vec::new();
        for p in &self.pairs {
            let l = if runs(p.local) {
                Some(Self::open(&p.local_store, p.size)?)
            } else {
                None
            };
            let r = if runs(p.remote) {
                Some(Self::open(&p.remote_store, p.size)?)
            } else {
                None
            };
            stores.push((l, r));
        }
        // Journals of the systems here; a primary redoes what its journal holds but its
        // local units may have missed (a crash between journal and disk write).
        let mut journals: BTreeMap<SystemId, (SharedJournal, Recovered)> = BTreeMap::new();
        for (s, (dir, capacity)) in &self.journals {
            if runs(*s) {
                journals.insert(*s, SharedJournal::open(dir, *capacity)?);
            }
        }
        for (i, (p, (ls, _))) in self.pairs.iter().zip(&stores).enumerate() {
            let live = journals
                .get(&p.local)
                .and_then(|(_, r)| r.pairs.get(&PairId(i as u32)));
            if let (Some(store), Some(rp)) = (ls, live) {
                for pkt in &rp.live {
                    store.apply(&pkt.payload)?;
                }
                store.flush()?;
            }
        }
        let mut sockets = BTreeMap::new();
        if let Some(udp) = &self.udp {
            for i in 0..self.systems.len() {
                let s = SystemId(i as u32);
                if runs(s) {
                    let addr = udp.listen.get(&s).copied().ok_or_else(|| {
                        EngineError::Topology(format!(
                            "system {} has no listen address",
                            self.systems[i].0
                        ))
                    })?;
                    sockets.insert(s, bind_udp(addr)?);
                }
            }
        }

        let mut arbiters: Vec<Arbiter> = (0..self.threads).map(|_| Arbiter::new()).collect();
        // A UDP link (sealing, encoding, syscalls) gets a thread of its own, so a
        // system's units are not serialized behind it; what a unit hands it is bounded
        // by the unit's congestion window.
        let mut link_arbiters: Vec<Arbiter> = Vec::new();
        // The systems that run here, in order: the k-th runs its actors on arbiter k
        // (modulo the arbiters there are). A UDP link runs on a thread of its own (see
        // below); the in-process link shares its system's thread.
        let here: Vec<SystemId> = (0..self.systems.len() as u32)
            .map(SystemId)
            .filter(|s| runs(*s))
            .collect();
        let place = |s: SystemId| -> Option<ArbiterHandle> {
            let k = here.iter().position(|h| *h == s).unwrap_or(s.0 as usize);
            (!arbiters.is_empty()).then(|| arbiters[k % arbiters.len()].handle())
        };
        // One pool per system, as separate hosts would have: a remote system's applies
        // never queue in front of a primary's client writes.
        let disks: BTreeMap<SystemId, Disk> = (0..self.systems.len() as u32)
            .map(SystemId)
            .filter(|s| runs(*s))
            .map(|s| (s, Disk::new(self.disk_threads)))
            .collect();
        let disk = |s: SystemId| disks.get(&s).cloned().unwrap_or_else(|| Disk::new(0));
        // Each local unit has a lane of its own: one disk thread, so its batches are
        // journaled and written in the order they were stamped while several are in
        // flight.
        let lanes = std::cell::RefCell::new(Vec::new());
        let lane = || {
            let d = Disk::new(self.disk_threads.min(1));
            lanes.borrow_mut().push(d.clone());
            d
        };
        let wall: Wall = self.wall.clone().unwrap_or_else(|| {
            Arc::new(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(0)
            })
        });
        let wall2 = wall.clone();
        let clock: Arc<HybridClock> = Arc::new(HybridClock::new(move || wall2()));
        for (_, r) in journals.values() {
            // Stamps after a restart stay above every stamp handed out before it.
            clock.observe(r.max_ts);
        }
        let counters: Arc<[PairCounters]> =
            self.pairs.iter().map(|_| PairCounters::default()).collect();

        let mut links: BTreeMap<SystemId, LinkAddr> = BTreeMap::new();
        let mut link_status = BTreeMap::new();
        for i in 0..self.systems.len() {
            let s = SystemId(i as u32);
            if !runs(s) {
                continue;
            }
            let addr = match (&self.udp, sockets.remove(&s)) {
                (Some(udp), Some(socket)) => {
                    let ids: Vec<SystemId> = (0..self.systems.len() as u32).map(SystemId).collect();
                    let session = tidemark::seal::Session {
                        epoch: udp.epoch,
                        nonce: random_nonce(),
                    };
                    let core = tidemark::link::LinkCore::new(s, &ids, &udp.key, session, udp.link);
                    let status = Arc::new(Mutex::new(UdpStatus::default()));
                    link_status.insert(s, status.clone());
                    let names = self.system_names();
                    let tick = (udp.link.peer_timeout / 4)
                        .clamp(Duration::from_millis(1), Duration::from_millis(250));
                    let own = (!arbiters.is_empty()).then(|| {
                        let a = Arbiter::new();
                        let h = a.handle();
                        link_arbiters.push(a);
                        h
                    });
                    LinkAddr::Udp(spawn(
                        own,
                        UdpLink::new(s, core, socket, udp.advertise.clone(), names, status, tick),
                    ))
                }
                _ => LinkAddr::InProcess(spawn(
                    place(s),
                    Link::new(s, self.impair, self.seed, counters.clone()),
                )),
            };
            links.insert(s, addr);
        }
        let link = |s: SystemId| -> Recipient<Outbound> {
            match &links[&s] {
                LinkAddr::InProcess(a) => a.clone().recipient(),
                LinkAddr::Udp(a) => a.clone().recipient(),
            }
        };

        let mut routes: BTreeMap<SystemId, Routes> =
            links.keys().map(|s| (*s, Routes::default())).collect();
        // Primary systems here and elsewhere: if writes are stamped in other processes
        // too, this process measures their clocks and commit-waits (I2 across hosts).
        let primaries: BTreeSet<SystemId> = self.pairs.iter().map(|p| p.local).collect();
        let elsewhere: Vec<SystemId> = primaries.iter().copied().filter(|s| !runs(*s)).collect();
        let time_status = Arc::new(Mutex::new(TimeStatus::default()));
        let mut timebase = None;
        let gate = match primaries.iter().find(|s| runs(**s)) {
            Some(prober) if !elsewhere.is_empty() => {
                let gate = Arc::new(CommitGate::default());
                let names = self.system_names();
                let here_links = links.keys().map(|s| (*s, link(*s))).collect();
                let t = spawn(
                    place(*prober),
                    TimeBaseActor::new(
                        TimeBase::new(self.time_base, elsewhere.iter().copied()),
                        gate.clone(),
                        clock.clone(),
                        *prober,
                        here_links,
                        names,
                        time_status.clone(),
                    ),
                );
                for s in primaries.iter().filter(|s| runs(**s)) {
                    if let Some(r) = routes.get_mut(s) {
                        r.timebase = Some(TimeBaseRoute::of(&t));
                    }
                }
                timebase = Some(t);
                Some(gate)
            }
            _ => None,
        };
        let local_cfg = LocalConfig {
            heartbeat: self.heartbeat,
            window_bytes: self.window_bytes,
            rtt: self.rtt,
        };
        // Admission never promises more than a primary's journal can hold (I5): the
        // local units of a system share its journal, so each may keep at most its share
        // of what the journal admits unreleased. A larger `window` is clamped, once, with
        // a log line.
        let window_of: BTreeMap<SystemId, usize> = journals
            .iter()
            .filter_map(|(s, (j, _))| {
                let units = self.pairs.iter().filter(|p| p.local == *s).count();
                (units > 0).then(|| {
                    let share = (j.options().admissible() / units as u64) as usize;
                    if share < self.window_bytes {
                        tracing::warn!(
                            system = %self.systems[s.0 as usize].0,
                            window = self.window_bytes,
                            clamped = share,
                            units,
                            journal = j.options().capacity,
                            "window clamped to what the journal admits per unit; raise journal_size to lift it"
                        );
                    }
                    (*s, share.min(self.window_bytes))
                })
            })
            .collect();
        let mut pairs = Vec::new();
        let mut site_units: BTreeMap<SystemId, Vec<Addr<RemoteUnit>>> = BTreeMap::new();
        let mut remote_systems = BTreeSet::new();
        for (i, (p, (ls, rs))) in self.pairs.iter().zip(stores).enumerate() {
            let id = PairId(i as u32);
            remote_systems.insert(p.remote);
            let recovered = |s: SystemId| journals.get(&s).and_then(|(_, r)| r.pairs.get(&id));
            let journal = |s: SystemId| journals.get(&s).map(|(j, _)| j.clone());
            let remote = rs.as_ref().map(|rs| {
                let resume = RemoteResume {
                    applied: recovered(p.remote).map_or(Stamp::ZERO, |r| r.applied),
                    live: recovered(p.remote).map_or(Vec::new(), |r| r.live.clone()),
                    limit: journals
                        .get(&p.remote)
                        .map_or(Timestamp::ZERO, |(_, r)| r.limit),
                };
                let wiring = RemoteWiring {
                    local_system: p.local,
                    orderer_system,
                    store: rs.clone(),
                    journal: journal(p.remote),
                    disk: disk(p.remote),
                    link: link(p.remote),
                    hook: self.hook.clone(),
                    wall: wall.clone(),
                    // Half the journal, shared evenly by the system's remote units.
                    budget: self.journals.get(&p.remote).map_or(usize::MAX, |(_, cap)| {
                        let n = self
                            .pairs
                            .iter()
                            .filter(|q| q.remote == p.remote)
                            .count()
                            .max(1);
                        (*cap as usize / 2) / n
                    }),
                };
                spawn(place(p.remote), RemoteUnit::new(id, wiring, resume))
            });
            let local = ls.as_ref().map(|ls| {
                let resume = LocalResume {
                    released: recovered(p.local).map_or(Stamp::ZERO, |r| r.released),
                    live: recovered(p.local).map_or(Vec::new(), |r| r.live.clone()),
                };
                spawn(
                    place(p.local),
                    LocalUnit::new(
                        id,
                        p.remote,
                        clock.clone(),
                        ls.clone(),
                        journal(p.local),
                        resume,
                        lane(),
                        link(p.local),
                        LocalConfig {
                            window_bytes: window_of
                                .get(&p.local)
                                .copied()
                                .unwrap_or(local_cfg.window_bytes),
                            ..local_cfg
                        },
                    )
                    .with_commit_gate(gate.clone()),
                )
            });
            if let (Some(l), Some(r)) = (&local, routes.get_mut(&p.local)) {
                r.local_units.insert(id, l.clone().recipient());
            }
            if let (Some(u), Some(r)) = (&remote, routes.get_mut(&p.remote)) {
                r.remote_units.insert(id, RemoteUnitRoute::of(u));
                site_units.entry(p.remote).or_default().push(u.clone());
            }
            pairs.push(PairHandle {
                id,
                name: p.name.clone(),
                size: p.size,
                local,
                remote,
                local_store: ls,
                remote_store: rs,
            });
        }
        let unit_arbiters: BTreeMap<SystemId, ArbiterHandle> = here
            .iter()
            .filter_map(|s| place(*s).map(|h| (*s, h)))
            .collect();
        let remote_systems: Vec<SystemId> = remote_systems.into_iter().collect();
        let mut sites = Vec::new();
        for (sys, units) in site_units {
            let (journal, prepared, released) = match journals.get(&sys) {
                Some((j, r)) => (Some(j.clone()), r.prepared.max(r.limit), r.limit),
                None => (None, Timestamp::ZERO, Timestamp::ZERO),
            };
            let site = spawn(
                place(sys),
                RemoteSite::new(
                    sys,
                    orderer_system,
                    units,
                    link(sys),
                    journal,
                    disk(sys),
                    prepared,
                    released,
                ),
            );
            if let Some(r) = routes.get_mut(&sys) {
                r.site = Some(SiteRoute::of(&site));
            }
            sites.push(site);
        }
        let orderer = if runs(orderer_system) {
            let ids: Vec<PairId> = pairs.iter().map(|p| p.id).collect();
            let released = journals
                .get(&orderer_system)
                .map_or(Timestamp::ZERO, |(_, r)| r.limit);
            let core = Orderer::new(&ids, &remote_systems, released)
                .map_err(|e| EngineError::Topology(e.to_string()))?;
            let o = spawn(
                place(orderer_system),
                OrdererActor::new(core, remote_systems, link(orderer_system), self.heartbeat),
            );
            if let Some(r) = routes.get_mut(&orderer_system) {
                r.orderer = Some(OrdererRoute::of(&o));
            }
            Some(o)
        } else {
            None
        };
        let peers: BTreeMap<SystemId, Addr<Link>> = links
            .iter()
            .filter_map(|(s, l)| match l {
                LinkAddr::InProcess(a) => Some((*s, a.clone())),
                LinkAddr::Udp(_) => None,
            })
            .collect();
        for (s, l) in &links {
            let r = routes.remove(s).unwrap_or_default();
            match l {
                LinkAddr::InProcess(a) => {
                    a.do_send(SetPeers(peers.clone()));
                    a.do_send(SetRoutes(r));
                }
                LinkAddr::Udp(a) => a.do_send(SetRoutes(r)),
            }
        }
        arbiters.extend(link_arbiters);
        Ok(Engine {
            pairs,
            orderer,
            links: links.into_values().collect(),
            link_status,
            sites,
            arbiters,
            unit_arbiters,
            disks: disks.into_values().chain(lanes.into_inner()).collect(),
            counters,
            timebase: timebase.map(|t| (t, time_status)),
        })
    }
}

/// Binds a UDP socket with generous buffers (bursts of datagrams arrive together).
fn bind_udp(addr: SocketAddr) -> Result<std::net::UdpSocket, EngineError> {
    let err =
        |e: std::io::Error| EngineError::Topology(format!("cannot listen on udp {addr}: {e}"));
    let domain = socket2::Domain::for_address(addr);
    let s = socket2::Socket::new(domain, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))
        .map_err(err)?;
    // Best effort: the kernel caps these at its own maximum.
    let _ = s.set_recv_buffer_size(8 << 20);
    let _ = s.set_send_buffer_size(8 << 20);
    s.bind(&addr.into()).map_err(err)?;
    s.set_nonblocking(true).map_err(err)?;
    Ok(s.into())
}

fn random_nonce() -> [u8; 16] {
    let mut n = [0u8; 16];
    rand::Rng::fill(&mut rand::rng(), &mut n[..]);
    n
}

/// A system's link actor, of either kind.
#[derive(Clone)]
enum LinkAddr {
    InProcess(Addr<Link>),
    Udp(Addr<UdpLink>),
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

fn spawn<A>(arbiter: Option<ArbiterHandle>, actor: A) -> Addr<A>
where
    A: Actor<Context = Context<A>> + Send,
{
    match arbiter {
        Some(h) => A::start_in_arbiter(&h, move |_| actor),
        None => actor.start(),
    }
}

/// One pair as the engine holds it.
pub struct PairHandle {
    pub id: PairId,
    pub name: String,
    pub size: u64,
    local: Option<Addr<LocalUnit>>,
    remote: Option<Addr<RemoteUnit>>,
    local_store: Option<Arc<dyn BlockStore>>,
    remote_store: Option<Arc<dyn BlockStore>>,
}

impl PairHandle {
    /// Whether this process runs the pair's local unit.
    pub fn is_local(&self) -> bool {
        self.local.is_some()
    }

    /// Whether this process runs the pair's remote unit.
    pub fn is_remote(&self) -> bool {
        self.remote.is_some()
    }

    fn local(&self) -> Result<&Addr<LocalUnit>, EngineError> {
        self.local.as_ref().ok_or(EngineError::NotHere(self.id))
    }

    fn remote(&self) -> Result<&Addr<RemoteUnit>, EngineError> {
        self.remote.as_ref().ok_or(EngineError::NotHere(self.id))
    }
}

/// Per-pair figures.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct PairStats {
    pub name: String,
    pub written_seq: u64,
    pub acked_seq: u64,
    pub head_seq: u64,
    pub head_ts: u64,
    pub applied_seq: u64,
    pub commit_limit: u64,
    pub bytes: u64,
    pub retransmits: u64,
    pub heartbeats: u64,
    pub dropped: u64,
    pub duplicated: u64,
    pub duplicates_received: u64,
    pub limit_violations: u64,
    pub flow_dropped: u64,
    pub srtt_us: Option<u64>,
    pub lag_p50_us: u64,
    pub lag_p99_us: u64,
}

/// The engine's figures.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Stats {
    pub pairs: Vec<PairStats>,
    pub commit_limit: u64,
    pub commits: u64,
    pub laggard: Option<String>,
    pub items_sent: u64,
    pub items_dropped: u64,
    pub items_duplicated: u64,
    /// Commit lag over every remote unit here (recent samples): stamp to applied.
    pub lag_p50_us: u64,
    pub lag_p99_us: u64,
    pub lag_samples: usize,
}

impl Stats {
    pub fn retransmits(&self) -> u64 {
        self.pairs.iter().map(|p| p.retransmits).sum()
    }
}

/// A running consistency group.
pub struct Engine {
    pairs: Vec<PairHandle>,
    orderer: Option<Addr<OrdererActor>>,
    links: Vec<LinkAddr>,
    link_status: BTreeMap<SystemId, Arc<Mutex<UdpStatus>>>,
    sites: Vec<Addr<RemoteSite>>,
    arbiters: Vec<Arbiter>,
    /// The arbiter each system of this process runs its units on.
    unit_arbiters: BTreeMap<SystemId, ArbiterHandle>,
    disks: Vec<Disk>,
    counters: Arc<[PairCounters]>,
    timebase: Option<(Addr<TimeBaseActor>, Arc<Mutex<TimeStatus>>)>,
}

impl Engine {
    /// Stopping: no client waits on anything any more. Writes not yet journaled are
    /// answered with an error (and never written); writes whose acknowledgement the
    /// time base holds too (they stay journaled and still replicate); later writes are
    /// refused. See [`crate::local::Stopping`].
    pub fn stopping(&self) {
        for p in &self.pairs {
            if let Some(l) = &p.local {
                l.do_send(crate::local::Stopping);
            }
        }
    }

    /// The time base's state, if this process runs one (other processes stamp writes of
    /// the group too).
    pub fn time_status(&self) -> Option<TimeStatus> {
        self.timebase
            .as_ref()
            .and_then(|(_, s)| s.lock().ok().map(|g| g.clone()))
    }

    pub fn pairs(&self) -> &[PairHandle] {
        &self.pairs
    }

    /// The thread `system`'s units run on (`None`: the caller's, or not here). Work that
    /// talks to the units all the time (an NBD server) runs best there: its messages to
    /// them and their answers then wake no other thread.
    pub fn unit_arbiter(&self, system: SystemId) -> Option<ArbiterHandle> {
        self.unit_arbiters.get(&system).cloned()
    }

    fn pair(&self, pair: PairId) -> Result<&PairHandle, EngineError> {
        self.pairs
            .get(pair.0 as usize)
            .ok_or(EngineError::NoSuchPair(pair))
    }

    /// Writes `data` at `offset` of `pair`'s local unit; resolves with the write's stamp
    /// once it is written locally and queued for the remote.
    pub async fn write(
        &self,
        pair: PairId,
        offset: u64,
        data: Bytes,
    ) -> Result<Stamp, EngineError> {
        let v = self
            .write_many(
                pair,
                vec![Payload::Write {
                    offset: Offset(offset),
                    data,
                }],
            )
            .await?;
        v.into_iter().next().ok_or(EngineError::Stopped)
    }

    /// Several writes to one pair, completed (and stamped) in the order given. All are
    /// range-checked first: one bad write fails the call and nothing is written.
    pub async fn write_many(
        &self,
        pair: PairId,
        payloads: Vec<Payload>,
    ) -> Result<Vec<Stamp>, EngineError> {
        self.pair(pair)?.local()?.send(Write(payloads)).await?
    }

    /// Makes everything written to `pair` so far durable on its local unit.
    pub async fn flush(&self, pair: PairId) -> Result<(), EngineError> {
        self.pair(pair)?.local()?.send(Flush).await?
    }

    /// Waits until the remote units have applied everything written before this call.
    /// Pairs whose two units are not both in this process are skipped.
    pub async fn drain(&self) -> Result<(), EngineError> {
        let mut targets = Vec::new();
        for p in self.pairs.iter().filter(|p| p.is_local() && p.is_remote()) {
            let s = p.local()?.send(GetLocalStats).await?;
            targets.push((p, s.last.seq));
        }
        for (p, seq) in targets {
            if seq > Seq::ZERO {
                p.remote()?.send(WaitApplied(seq)).await??;
            }
        }
        Ok(())
    }

    /// Waits until the remote unit of `pair` (in this process) has applied `seq`.
    pub async fn wait_applied(&self, pair: PairId, seq: Seq) -> Result<(), EngineError> {
        self.pair(pair)?.remote()?.send(WaitApplied(seq)).await?
    }

    /// The UDP links' counters and peer states, by system name.
    pub fn link_status(&self) -> BTreeMap<SystemId, UdpStatus> {
        self.link_status
            .iter()
            .map(|(s, st)| (*s, st.lock().map(|g| g.clone()).unwrap_or_default()))
            .collect()
    }

    /// A unit's bytes, for verification: the local (`remote == false`) or remote unit.
    pub fn store(&self, pair: PairId, remote: bool) -> Result<Arc<dyn BlockStore>, EngineError> {
        let p = self.pair(pair)?;
        let s = if remote {
            &p.remote_store
        } else {
            &p.local_store
        };
        s.clone().ok_or(EngineError::NotHere(pair))
    }

    /// Figures of the units, orderer and links that run in this process.
    pub async fn stats(&self) -> Result<Stats, EngineError> {
        let mut out = Stats::default();
        let mut all_lags = Vec::new();
        for p in &self.pairs {
            let l = match &p.local {
                Some(a) => a.send(GetLocalStats).await?,
                None => LocalStats::default(),
            };
            let r = match &p.remote {
                Some(a) => a.send(GetRemoteStats).await?,
                None => RemoteStats::default(),
            };
            let c = &self.counters[p.id.0 as usize];
            out.pairs.push(PairStats {
                name: p.name.clone(),
                written_seq: l.last.seq.0,
                acked_seq: l.acked.0,
                head_seq: r.head.seq.0,
                head_ts: r.head.ts.0,
                applied_seq: r.applied.seq.0,
                commit_limit: r.limit.0,
                bytes: l.bytes,
                retransmits: l.retransmits,
                heartbeats: l.heartbeats,
                dropped: c.dropped.load(Ordering::Relaxed),
                duplicated: c.duplicated.load(Ordering::Relaxed),
                duplicates_received: r.duplicates,
                limit_violations: r.limit_violations,
                flow_dropped: r.flow_dropped,
                srtt_us: l.srtt_us,
                lag_p50_us: percentile(&mut r.lag_ns.clone(), 50.0) / 1000,
                lag_p99_us: percentile(&mut r.lag_ns.clone(), 99.0) / 1000,
            });
            all_lags.extend_from_slice(&r.lag_ns);
        }
        out.lag_samples = all_lags.len();
        out.lag_p50_us = percentile(&mut all_lags, 50.0) / 1000;
        out.lag_p99_us = percentile(&mut all_lags, 99.0) / 1000;
        if let Some(o) = &self.orderer {
            let o = o.send(GetOrdererStats).await?;
            out.commit_limit = o.released.0;
            out.commits = o.releases;
            out.laggard = o
                .laggard
                .and_then(|p| self.pairs.get(p.0 as usize))
                .map(|p| p.name.clone());
        }
        for l in &self.links {
            let s = match l {
                LinkAddr::InProcess(a) => a.send(GetLinkStats).await?,
                LinkAddr::Udp(a) => a.send(GetLinkStats).await?,
            };
            out.items_sent += s.items_sent;
            out.items_dropped += s.dropped;
            out.items_duplicated += s.duplicated;
        }
        Ok(out)
    }

    /// Stops every actor and thread of the engine. Units are flushed first.
    pub async fn shutdown(self) -> Result<(), EngineError> {
        let mut result = Ok(());
        for p in &self.pairs {
            if let Some(l) = &p.local {
                if let Err(e) = l
                    .send(Flush)
                    .await
                    .map_err(EngineError::from)
                    .and_then(|r| r)
                {
                    result = Err(e);
                }
            }
            if let Some(r) = &p.remote_store {
                if let Err(e) = r.flush() {
                    result = Err(e.into());
                }
            }
        }
        for p in &self.pairs {
            if let Some(a) = &p.local {
                a.do_send(Stop);
            }
            if let Some(a) = &p.remote {
                a.do_send(Stop);
            }
        }
        for s in &self.sites {
            s.do_send(Stop);
        }
        if let Some((t, _)) = &self.timebase {
            t.do_send(Stop);
        }
        if let Some(o) = &self.orderer {
            o.do_send(Stop);
        }
        for l in &self.links {
            match l {
                LinkAddr::InProcess(a) => a.do_send(Stop),
                LinkAddr::Udp(a) => a.do_send(Stop),
            }
        }
        for a in self.arbiters {
            a.stop();
            let _ = a.join();
        }
        for d in &self.disks {
            d.shutdown();
        }
        result
    }
}
