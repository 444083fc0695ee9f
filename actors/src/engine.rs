//! Library start-up: describe systems, pairs, the group's orderer, the network and the
//! clock with an [`EngineBuilder`]; [`EngineBuilder::start`] starts the actor system and
//! returns an [`Engine`] handle to write, flush, drain, watch and shut down.

use crate::disk::Disk;
use crate::error::EngineError;
use crate::impair::Impairment;
use crate::link::{Link, PairCounters, Routes, SetRoutes};
use crate::local::{LocalConfig, LocalUnit};
use crate::msg::*;
use crate::orderer::OrdererActor;
use crate::remote::{ApplyHook, RemoteUnit};
use crate::site::RemoteSite;
use crate::Stop;
use actix::prelude::*;
use bytes::Bytes;
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
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

type Wall = Arc<dyn Fn() -> u64 + Send + Sync>;

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
        }
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

    /// Actor threads (arbiters); systems are spread over them. 0 runs every actor on the
    /// caller's arbiter.
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
        let mut stores = Vec::new();
        for p in &self.pairs {
            stores.push((
                Self::open(&p.local_store, p.size)?,
                Self::open(&p.remote_store, p.size)?,
            ));
        }

        let arbiters: Vec<Arbiter> = (0..self.threads).map(|_| Arbiter::new()).collect();
        let place = |s: SystemId| -> Option<ArbiterHandle> {
            (!arbiters.is_empty()).then(|| arbiters[s.0 as usize % arbiters.len()].handle())
        };
        // One pool per system, as separate hosts would have: a remote system's applies
        // never queue in front of a primary's client writes.
        let disks: Vec<Disk> = (0..self.systems.len())
            .map(|_| Disk::new(self.disk_threads))
            .collect();
        let disk = |s: SystemId| disks[s.0 as usize].clone();
        let wall: Wall = self.wall.clone().unwrap_or_else(|| {
            Arc::new(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(0)
            })
        });
        let clock: Arc<HybridClock> = Arc::new(HybridClock::new(move || wall()));
        let counters: Arc<[PairCounters]> =
            self.pairs.iter().map(|_| PairCounters::default()).collect();

        let links: Vec<Addr<Link>> = (0..self.systems.len())
            .map(|i| {
                let l = Link::new(SystemId(i as u32), self.impair, self.seed, counters.clone());
                spawn(place(SystemId(i as u32)), l)
            })
            .collect();
        let link = |s: SystemId| links[s.0 as usize].clone();

        let mut routes: Vec<Routes> = (0..self.systems.len()).map(|_| Routes::default()).collect();
        for r in routes.iter_mut() {
            r.peers = links
                .iter()
                .enumerate()
                .map(|(i, a)| (SystemId(i as u32), a.clone()))
                .collect();
        }
        let local_cfg = LocalConfig {
            heartbeat: self.heartbeat,
            window_bytes: self.window_bytes,
            rtt: self.rtt,
        };
        let mut pairs = Vec::new();
        let mut site_units: BTreeMap<SystemId, Vec<Addr<RemoteUnit>>> = BTreeMap::new();
        for (i, (p, (ls, rs))) in self.pairs.iter().zip(stores).enumerate() {
            let id = PairId(i as u32);
            let remote = spawn(
                place(p.remote),
                RemoteUnit::new(
                    id,
                    p.local,
                    orderer_system,
                    rs.clone(),
                    disk(p.remote),
                    link(p.remote),
                    self.hook.clone(),
                ),
            );
            let local = spawn(
                place(p.local),
                LocalUnit::new(
                    id,
                    p.remote,
                    clock.clone(),
                    ls.clone(),
                    disk(p.local),
                    link(p.local),
                    local_cfg,
                ),
            );
            routes[p.local.0 as usize]
                .local_units
                .insert(id, local.clone());
            routes[p.remote.0 as usize]
                .remote_units
                .insert(id, remote.clone());
            site_units.entry(p.remote).or_default().push(remote.clone());
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
        let remote_systems: Vec<SystemId> = site_units.keys().copied().collect();
        let mut sites = Vec::new();
        for (sys, units) in site_units {
            let site = spawn(
                place(sys),
                RemoteSite::new(sys, orderer_system, units, link(sys)),
            );
            routes[sys.0 as usize].site = Some(site.clone());
            sites.push(site);
        }
        let ids: Vec<PairId> = pairs.iter().map(|p| p.id).collect();
        let core = Orderer::new(&ids, &remote_systems, Timestamp::ZERO)
            .map_err(|e| EngineError::Topology(e.to_string()))?;
        let orderer = spawn(
            place(orderer_system),
            OrdererActor::new(core, remote_systems, link(orderer_system), self.heartbeat),
        );
        routes[orderer_system.0 as usize].orderer = Some(orderer.clone());
        for (l, r) in links.iter().zip(routes) {
            l.do_send(SetRoutes(r));
        }
        Ok(Engine {
            pairs,
            orderer,
            links,
            sites,
            arbiters,
            disks,
            counters,
        })
    }
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
    local: Addr<LocalUnit>,
    remote: Addr<RemoteUnit>,
    local_store: Arc<dyn BlockStore>,
    remote_store: Arc<dyn BlockStore>,
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
    pub srtt_us: Option<u64>,
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
}

impl Stats {
    pub fn retransmits(&self) -> u64 {
        self.pairs.iter().map(|p| p.retransmits).sum()
    }
}

/// A running consistency group.
pub struct Engine {
    pairs: Vec<PairHandle>,
    orderer: Addr<OrdererActor>,
    links: Vec<Addr<Link>>,
    sites: Vec<Addr<RemoteSite>>,
    arbiters: Vec<Arbiter>,
    disks: Vec<Disk>,
    counters: Arc<[PairCounters]>,
}

impl Engine {
    pub fn pairs(&self) -> &[PairHandle] {
        &self.pairs
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
        self.pair(pair)?.local.send(Write(payloads)).await?
    }

    /// Makes everything written to `pair` so far durable on its local unit.
    pub async fn flush(&self, pair: PairId) -> Result<(), EngineError> {
        self.pair(pair)?.local.send(Flush).await?
    }

    /// Waits until the remote units have applied everything written before this call.
    pub async fn drain(&self) -> Result<(), EngineError> {
        let mut targets = Vec::new();
        for p in &self.pairs {
            let s = p.local.send(GetLocalStats).await?;
            targets.push(s.last.seq);
        }
        for (p, seq) in self.pairs.iter().zip(targets) {
            if seq > Seq::ZERO {
                p.remote.send(WaitApplied(seq)).await??;
            }
        }
        Ok(())
    }

    /// A unit's bytes, for verification: the local (`remote == false`) or remote unit.
    pub fn store(&self, pair: PairId, remote: bool) -> Result<Arc<dyn BlockStore>, EngineError> {
        let p = self.pair(pair)?;
        Ok(if remote {
            p.remote_store.clone()
        } else {
            p.local_store.clone()
        })
    }

    pub async fn stats(&self) -> Result<Stats, EngineError> {
        let mut out = Stats::default();
        for p in &self.pairs {
            let l = p.local.send(GetLocalStats).await?;
            let r = p.remote.send(GetRemoteStats).await?;
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
                srtt_us: l.srtt_us,
            });
        }
        let o = self.orderer.send(GetOrdererStats).await?;
        out.commit_limit = o.released.0;
        out.commits = o.releases;
        out.laggard = o
            .laggard
            .and_then(|p| self.pairs.get(p.0 as usize))
            .map(|p| p.name.clone());
        for l in &self.links {
            let s = l.send(GetLinkStats).await?;
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
            if let Err(e) = p
                .local
                .send(Flush)
                .await
                .map_err(EngineError::from)
                .and_then(|r| r)
            {
                result = Err(e);
            }
            if let Err(e) = p.remote_store.flush() {
                result = Err(e.into());
            }
        }
        for p in &self.pairs {
            p.local.do_send(Stop);
            p.remote.do_send(Stop);
        }
        for s in &self.sites {
            s.do_send(Stop);
        }
        self.orderer.do_send(Stop);
        for l in &self.links {
            l.do_send(Stop);
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
