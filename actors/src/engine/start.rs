//! [`EngineBuilder::start`]: opens what runs here (units, journals, sockets), then
//! starts and wires the actors of every system of this process, in named phases that
//! share one [`Startup`] context.

use super::{Engine, EngineBuilder, InitialSync, LinkAddr, PairHandle, PrimaryJournal};
use crate::error::EngineError;
use crate::health::Health;
use crate::msg::*;
use crate::net::route::{
    LocalUnitRoute, OrdererRoute, RemoteUnitRoute, Routes, SetRoutes, SiteRoute, TimeBaseRoute,
};
use crate::net::sim::{Link, PairCounters, SetPeers};
use crate::net::udp::{UdpLink, UdpStatus};
use crate::units::disk::Disk;
use crate::units::journaling::Durability;
use crate::units::journaling::SharedJournal;
use crate::units::local::{
    LocalConfig, LocalResume, LocalUnit, LocalWiring, ResyncStart, SetSiblings, Sibling,
};
use crate::units::orderer::OrdererActor;
use crate::units::remote::{RemoteResume, RemoteUnit, RemoteWiring};
use crate::units::site::{RemoteSite, SiteWiring};
use crate::units::timebase::{TimeBaseActor, TimeStatus};
use actix::prelude::*;
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tidemark::dirty::DirtyFile;
use tidemark::journal::Record;
use tidemark::journal::{PairState, Recovered, RecoveredPair};
use tidemark::ship::NudgeBox;
use tidemark::timebase::{CommitGate, TimeBase};
use tidemark::{BlockStore, HybridClock, Offset, Orderer, PairId, Seq, Stamp, SystemId, Timestamp};
use tidemark::{Mark, Packet, Payload};

/// A pair's units opened here: (local, remote); `None` where the unit runs elsewhere.
type Stores = (Option<Arc<dyn BlockStore>>, Option<Arc<dyn BlockStore>>);
/// Per pair: what its local unit copies first.
type SyncPlans = Vec<CopyPlan>;

/// What a local unit copies when it starts.
/// Why a pair's stream restarts at start ([`EngineBuilder::restart_stream`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Restart {
    /// The machine went down with the process: the journal's unsynced tail may be gone,
    /// with packets the remote holds.
    Lost,
    /// The activity log holds writes without their data, which cannot be resent.
    Logged,
}

#[derive(Default)]
struct CopyPlan {
    /// The initial sync: where the unit's data lies.
    sync: Option<Vec<(Offset, u64)>>,
    resync: ResyncStart,
    /// The dirty map beside the journal.
    dirty: Option<DirtyFile>,
}

/// What the journal directories said about the last run, and this run's markers.
struct Boot {
    /// Systems whose last run ended with the machine going down (see `boot`).
    unclean: BTreeSet<SystemId>,
    markers: Vec<std::path::PathBuf>,
}

/// The journals of the systems here, with what each recovered.
type Journals = BTreeMap<SystemId, (SharedJournal, Recovered)>;

impl EngineBuilder {
    /// Starts the actors. Must run inside an actix system. Nothing is started if the
    /// description is invalid or a unit, a journal or a socket cannot be opened: every
    /// phase that can fail runs before the first actor starts.
    pub fn start(&self) -> Result<Engine, EngineError> {
        let orderer_system = self.check()?;
        let stores = self.open_stores()?;
        let (mut journals, boot) = self.open_journals()?;
        let mut dirty = self.open_dirty_maps(&stores)?;
        self.redo_journals(&stores, &journals, &mut dirty)?;
        let syncs = self.plan_syncs(&stores, &mut journals, &boot.unclean, dirty)?;
        let sockets = self.bind_sockets()?;
        let orderer_core = self.orderer_core(orderer_system, &journals)?;

        let mut s = Startup::place(self, orderer_system, journals);
        s.markers = boot.markers;
        s.start_links(sockets);
        let gate = s.start_time_base();
        s.start_pairs(stores, syncs, gate);
        s.start_sites();
        s.start_orderer(orderer_core);
        Ok(s.wire_routes())
    }

    /// Whether `s` runs in this process.
    fn runs(&self, s: SystemId) -> bool {
        self.run.as_ref().is_none_or(|r| r.contains(&s))
    }

    /// Validates the description; returns the orderer's system.
    fn check(&self) -> Result<SystemId, EngineError> {
        let orderer_system = self.validate()?;
        self.impair.validate()?;
        if self.heartbeat.is_zero() {
            return Err(EngineError::Topology(
                "heartbeat interval must be above 0".into(),
            ));
        }
        if self.udp.is_none() && self.run.is_some() {
            return Err(EngineError::Topology(
                "the in-process link needs every system in this process".into(),
            ));
        }
        Ok(orderer_system)
    }

    /// Opens (or creates) the units of the systems here, in pair order.
    fn open_stores(&self) -> Result<Vec<Stores>, EngineError> {
        let open = |s: SystemId, spec, size| -> Result<_, EngineError> {
            Ok(if self.runs(s) {
                Some(Self::open(spec, size)?)
            } else {
                None
            })
        };
        self.pairs
            .iter()
            .map(|p| {
                Ok((
                    open(p.local, &p.local_store, p.size)?,
                    open(p.remote, &p.remote_store, p.size)?,
                ))
            })
            .collect()
    }

    /// Opens and recovers the journals of the systems here, and notes whether each
    /// one's last run ended with the machine going down (then marks this run).
    fn open_journals(&self) -> Result<(Journals, Boot), EngineError> {
        let mut journals = Journals::new();
        let mut boot = Boot {
            unclean: BTreeSet::new(),
            markers: Vec::new(),
        };
        for (s, (dir, capacity)) in &self.journals {
            if self.runs(*s) {
                journals.insert(*s, SharedJournal::open(dir, *capacity)?);
                if super::boot::unclean_reboot(dir) {
                    tracing::warn!(dir = %dir.display(), "the last run did not stop cleanly and the machine rebooted since: packets the journal lost are resynced");
                    boot.unclean.insert(*s);
                }
                boot.markers.push(super::boot::mark_running(dir)?);
            }
        }
        Ok((journals, boot))
    }

    /// Opens (or creates) the dirty-region map of every local unit here that has a
    /// journal, beside it: `dirty-<N>.map`, N the pair's index. `None` elsewhere.
    fn open_dirty_maps(&self, stores: &[Stores]) -> Result<Vec<Option<DirtyFile>>, EngineError> {
        self.pairs
            .iter()
            .zip(stores)
            .enumerate()
            .map(
                |(i, (p, (local, _)))| match (local, self.journals.get(&p.local)) {
                    (Some(_), Some((dir, _))) => {
                        DirtyFile::open(&dir.join(format!("dirty-{i}.map")), p.size, self.region)
                            .map(Some)
                            .map_err(|e| EngineError::Config(format!("pair {}: {e}", p.name)))
                    }
                    _ => Ok(None),
                },
            )
            .collect()
    }

    /// A primary redoes what its journal holds but its local units may have missed (a
    /// crash between journal and disk write): I3 for writes acknowledged before a crash.
    ///
    /// Not for a pair whose dirty map is not clean: it tracked since, so its local unit
    /// may hold writes newer than its live packets (tracked writes are not journaled),
    /// which a redo would overwrite with older data. Nor for a pair with writes logged
    /// without their data (an activity log): a later logged write may lie over an older
    /// live packet. The regions of such a pair's live packets and logged writes are
    /// marked dirty instead (synced, before its stream restarts: `plan_syncs`): the
    /// resync copies them from the local unit, which holds every write that was
    /// acknowledged.
    fn redo_journals(
        &self,
        stores: &[Stores],
        journals: &Journals,
        dirty: &mut [Option<DirtyFile>],
    ) -> Result<(), EngineError> {
        for (i, ((p, (local, _)), map)) in self.pairs.iter().zip(stores).zip(dirty).enumerate() {
            let live = journals
                .get(&p.local)
                .and_then(|(_, r)| r.pairs.get(&PairId(i as u32)));
            if let (Some(store), Some(rp)) = (local, live) {
                let resync = !rp.logged.is_empty();
                if let Some(map) = map.as_mut().filter(|m| resync || !m.map().is_clean()) {
                    map.mark(&rp.regions())
                        .map_err(|e| EngineError::Config(format!("pair {}: {e}", p.name)))?;
                    continue;
                }
                for pkt in &rp.live {
                    store.apply(&pkt.payload)?;
                }
                store.flush()?;
            }
        }
        Ok(())
    }

    /// Which local units here copy themselves to the remote first (initial sync), and
    /// where their data lies. A pair whose journal recorded `Syncing` copies again (the
    /// copy was cut short); one that recorded any other state, or has journal records
    /// from before pair states existed, does not; a pair new to its journal follows its
    /// [`InitialSync`] mode. Runs after the redo, so the extents include what it wrote.
    fn plan_syncs(
        &self,
        stores: &[Stores],
        journals: &mut Journals,
        unclean: &BTreeSet<SystemId>,
        dirty: Vec<Option<DirtyFile>>,
    ) -> Result<SyncPlans, EngineError> {
        let mut plans = Vec::with_capacity(stores.len());
        for (i, ((p, (local, _)), mut dirty)) in
            self.pairs.iter().zip(stores).zip(dirty).enumerate()
        {
            let id = PairId(i as u32);
            let Some(store) = local else {
                plans.push(CopyPlan::default());
                continue;
            };
            let dirty_clean = dirty.as_ref().is_none_or(|d| d.map().is_clean());
            let recovered = journals.get(&p.local).and_then(|(_, r)| r.pairs.get(&id));
            let lost =
                unclean.contains(&p.local) && recovered.is_some_and(|r| r.reserved > r.last().seq);
            // Writes an activity log holds without data: never resent, so the stream
            // restarts above them and their regions (marked by `redo_journals`) resync.
            let logged = recovered.is_some_and(|r| !r.logged.is_empty());
            let syncing = recovered.is_some_and(|r| r.state == Some(PairState::Syncing));
            let mut plan = CopyPlan::default();
            if lost || logged {
                // A pair that may have lost journaled packets, or that was copying the
                // whole unit, copies the whole unit.
                if lost || syncing {
                    if let Some(d) = &mut dirty {
                        d.mark_all()
                            .map_err(|e| EngineError::Config(format!("pair {}: {e}", p.name)))?;
                    }
                }
                let why = if lost { Restart::Lost } else { Restart::Logged };
                self.restart_stream(id, &p.local, journals, why)?;
                plan.resync = ResyncStart::Continue;
            } else {
                match recovered.map(|r| r.state) {
                    Some(Some(PairState::Syncing)) => plan.sync = Some(store.allocated()?),
                    Some(Some(PairState::Resyncing)) => plan.resync = ResyncStart::Continue,
                    // Tracking from the start: the remote's answer begins the resync.
                    Some(Some(_)) if !dirty_clean && !self.track_from_start => {
                        plan.resync = ResyncStart::Begin
                    }
                    Some(_) => {}
                    None => {
                        plan.sync = match self.initial_sync.get(&id).copied().unwrap_or_default() {
                            InitialSync::Full => Some(store.allocated()?),
                            InitialSync::None => None,
                            // One scan of the unit decides and plans.
                            InitialSync::Auto => Some(store.allocated()?).filter(|e| !e.is_empty()),
                        }
                    }
                }
            }
            plan.dirty = dirty;
            plans.push(plan);
        }
        Ok(plans)
    }

    /// Restarts pair `id`'s stream after its journal may have lost packets the remote
    /// saw, or holds writes without their data: every sequence number up to the pair's
    /// reservation is given up (the journal forgets its packets and logged writes: the
    /// resync copies their regions, marked dirty before this), and a `Restart` mark takes
    /// the next one — journaled, synced, before anything else, so that a crash now still
    /// restarts above the reservation. The pair is resyncing from here.
    fn restart_stream(
        &self,
        id: PairId,
        system: &SystemId,
        journals: &mut Journals,
        why: Restart,
    ) -> Result<(), EngineError> {
        let Some((journal, recovered)) = journals.get_mut(system) else {
            return Ok(());
        };
        let Some(rp) = recovered.pairs.get(&id) else {
            return Ok(());
        };
        let given_up = Stamp::new(rp.last().ts, rp.reserved);
        let ts = Timestamp(recovered.max_ts.0.max(given_up.ts.0) + 1);
        let restart = Packet {
            pair: id,
            stamp: Stamp::new(ts, rp.reserved.next()),
            payload: Payload::Mark(Mark::Restart),
        };
        match why {
            Restart::Lost => {
                tracing::warn!(pair = %id, last = %rp.last().seq, reserved = %rp.reserved,
                "the journal may have lost packets the remote holds: restarting the stream above the reservation, with a full resync")
            }
            Restart::Logged => tracing::info!(pair = %id, logged = rp.logged.len(),
                last = %rp.last().seq, reserved = %rp.reserved,
                "the activity log holds writes the remote may lack: restarting the stream above the reservation, resyncing their regions"),
        }
        let records = [
            Record::Released {
                pair: id,
                stamp: given_up,
            },
            Record::Packet(restart.clone()),
            Record::PairState {
                pair: id,
                state: PairState::Resyncing,
            },
        ];
        journal
            .append(&records, Durability::Synced)
            .map_err(|source| EngineError::Journal {
                dir: self
                    .journals
                    .get(system)
                    .map(|(d, _)| d.clone())
                    .unwrap_or_default(),
                source,
            })?;
        recovered.max_ts = recovered.max_ts.max(ts);
        if let Some(rp) = recovered.pairs.get_mut(&id) {
            rp.released = given_up;
            rp.live = vec![restart];
            rp.logged.clear();
            rp.state = Some(PairState::Resyncing);
        }
        Ok(())
    }

    /// Binds the UDP socket of every system here (none for the in-process link).
    fn bind_sockets(&self) -> Result<BTreeMap<SystemId, std::net::UdpSocket>, EngineError> {
        let mut sockets = BTreeMap::new();
        let Some(udp) = &self.udp else {
            return Ok(sockets);
        };
        for (i, (name, _)) in self.systems.iter().enumerate() {
            let s = SystemId(i as u32);
            if self.runs(s) {
                let addr = udp.listen.get(&s).copied().ok_or_else(|| {
                    EngineError::Topology(format!("system {name} has no listen address"))
                })?;
                sockets.insert(s, bind_udp(addr)?);
            }
        }
        Ok(sockets)
    }

    /// The orderer's core, if the orderer runs here; it resumes from the limit its
    /// system's journal made durable (I4: the limit only moves forward).
    fn orderer_core(
        &self,
        orderer_system: SystemId,
        journals: &Journals,
    ) -> Result<Option<Orderer>, EngineError> {
        if !self.runs(orderer_system) {
            return Ok(None);
        }
        let ids: Vec<PairId> = (0..self.pairs.len() as u32).map(PairId).collect();
        let (released, epoch) = journals
            .get(&orderer_system)
            .map_or((Timestamp::ZERO, None), |(_, r)| (r.limit, r.epoch));
        Orderer::new(&ids, &self.remote_systems(), released)
            .map(|o| Some(o.with_epoch(epoch)))
            .map_err(|e| EngineError::Topology(e.to_string()))
    }

    /// The systems that hold remote units, in order.
    fn remote_systems(&self) -> Vec<SystemId> {
        let set: BTreeSet<SystemId> = self.pairs.iter().map(|p| p.remote).collect();
        set.into_iter().collect()
    }

    /// Admission never promises more than a primary's journal can hold (I5): the local
    /// units of a system share its journal, so each may keep at most its share of what
    /// the journal admits unreleased. A larger `window` is clamped, once, with a log line.
    fn windows(&self, journals: &Journals) -> BTreeMap<SystemId, usize> {
        journals
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
            .collect()
    }

    /// Bytes of received, unapplied packets each remote unit of `system` may keep in its
    /// journal: half the journal, shared evenly by the system's remote units.
    fn remote_budget(&self, system: SystemId) -> usize {
        self.journals.get(&system).map_or(usize::MAX, |(_, cap)| {
            let n = self.pairs.iter().filter(|q| q.remote == system).count();
            (*cap as usize / 2) / n.max(1)
        })
    }
}

/// One start-up's context: where actors run, and what the phases have started so far,
/// until [`Startup::wire_routes`] turns it into the [`Engine`].
struct Startup<'a> {
    b: &'a EngineBuilder,
    orderer_system: SystemId,
    journals: Journals,
    /// The systems that run here, in order: the k-th runs its actors on arbiter k
    /// (modulo the arbiters there are).
    here: Vec<SystemId>,
    arbiters: Vec<Arbiter>,
    /// A UDP link (sealing, encoding, syscalls) gets a thread of its own, so a system's
    /// units are not serialized behind it; what a unit hands it is bounded by the unit's
    /// congestion window.
    link_arbiters: Vec<Arbiter>,
    /// One pool per system, as separate hosts would have: a remote system's applies
    /// never queue in front of a primary's client writes.
    disks: BTreeMap<SystemId, Disk>,
    /// Each local unit's lane (see [`LocalWiring::lane`]).
    lanes: Vec<Disk>,
    wall: Wall,
    clock: Arc<HybridClock>,
    counters: Arc<[PairCounters]>,
    health: Health,
    links: BTreeMap<SystemId, LinkAddr>,
    link_status: BTreeMap<SystemId, Arc<Mutex<UdpStatus>>>,
    routes: BTreeMap<SystemId, Routes>,
    timebase: Option<(Addr<TimeBaseActor>, Arc<Mutex<TimeStatus>>)>,
    pairs: Vec<PairHandle>,
    site_units: BTreeMap<SystemId, Vec<Addr<RemoteUnit>>>,
    sites: Vec<Addr<RemoteSite>>,
    orderer: Option<Addr<OrdererActor>>,
    /// This run's markers in the journal directories (removed by a clean shutdown).
    markers: Vec<std::path::PathBuf>,
}

impl<'a> Startup<'a> {
    /// Placement: the threads, disk pools and clock the actors will use.
    fn place(b: &'a EngineBuilder, orderer_system: SystemId, journals: Journals) -> Self {
        let here: Vec<SystemId> = (0..b.systems.len() as u32)
            .map(SystemId)
            .filter(|s| b.runs(*s))
            .collect();
        let disks = here
            .iter()
            .map(|s| (*s, Disk::new(b.disk_threads)))
            .collect();
        let wall: Wall = b.wall.clone().unwrap_or_else(|| {
            Arc::new(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(0)
            })
        });
        let wall2 = wall.clone();
        let clock = Arc::new(HybridClock::new(move || wall2()));
        for (_, r) in journals.values() {
            // Stamps after a restart stay above every stamp handed out before it (I2).
            clock.observe(r.max_ts);
        }
        Startup {
            b,
            orderer_system,
            journals,
            here,
            arbiters: (0..b.threads).map(|_| Arbiter::new()).collect(),
            link_arbiters: Vec::new(),
            disks,
            lanes: Vec::new(),
            wall,
            clock,
            counters: b.pairs.iter().map(|_| PairCounters::default()).collect(),
            health: Health::default(),
            links: BTreeMap::new(),
            link_status: BTreeMap::new(),
            routes: BTreeMap::new(),
            timebase: None,
            pairs: Vec::new(),
            site_units: BTreeMap::new(),
            sites: Vec::new(),
            orderer: None,
            markers: Vec::new(),
        }
    }

    /// The arbiter system `s` runs its actors on (`None`: the caller's thread).
    fn arbiter(&self, s: SystemId) -> Option<ArbiterHandle> {
        let k = self
            .here
            .iter()
            .position(|h| *h == s)
            .unwrap_or(s.0 as usize);
        (!self.arbiters.is_empty()).then(|| self.arbiters[k % self.arbiters.len()].handle())
    }

    fn disk(&self, s: SystemId) -> Disk {
        self.disks.get(&s).cloned().unwrap_or_else(|| Disk::new(0))
    }

    /// A new lane for a local unit: one disk thread, so its batches are journaled and
    /// written in the order they were stamped while several are in flight.
    fn lane(&mut self) -> Disk {
        let d = Disk::new(self.b.disk_threads.min(1));
        self.lanes.push(d.clone());
        d
    }

    fn link(&self, s: SystemId) -> Recipient<Outbound> {
        match &self.links[&s] {
            LinkAddr::InProcess(a) => a.clone().recipient(),
            LinkAddr::Udp(a) => a.clone().recipient(),
        }
    }

    fn journal(&self, s: SystemId) -> Option<SharedJournal> {
        self.journals.get(&s).map(|(j, _)| j.clone())
    }

    fn recovered(&self, s: SystemId, pair: PairId) -> Option<&RecoveredPair> {
        self.journals.get(&s).and_then(|(_, r)| r.pairs.get(&pair))
    }

    /// Links: a UDP link (on a thread of its own) per system here, or the in-process
    /// link with impairment (on its system's thread). Each gets an empty routing table.
    fn start_links(&mut self, mut sockets: BTreeMap<SystemId, std::net::UdpSocket>) {
        let b = self.b;
        for s in self.here.clone() {
            let addr = match (&b.udp, sockets.remove(&s)) {
                (Some(udp), Some(socket)) => {
                    let ids: Vec<SystemId> = (0..b.systems.len() as u32).map(SystemId).collect();
                    let session = tidemark::seal::Session {
                        epoch: udp.epoch,
                        nonce: random_nonce(),
                    };
                    let core = tidemark::link::LinkCore::new(s, &ids, &udp.key, session, udp.link);
                    let status = Arc::new(Mutex::new(UdpStatus::default()));
                    self.link_status.insert(s, status.clone());
                    let tick = (udp.link.peer_timeout / 4)
                        .clamp(Duration::from_millis(1), Duration::from_millis(250));
                    let own = (!self.arbiters.is_empty()).then(|| {
                        let a = Arbiter::new();
                        let h = a.handle();
                        self.link_arbiters.push(a);
                        h
                    });
                    let link = UdpLink::new(
                        s,
                        core,
                        socket,
                        udp.advertise.clone(),
                        b.system_names(),
                        status,
                        tick,
                    );
                    LinkAddr::Udp(spawn(own, link))
                }
                _ => LinkAddr::InProcess(spawn(
                    self.arbiter(s),
                    Link::new(s, b.impair, b.seed, self.counters.clone()),
                )),
            };
            self.links.insert(s, addr);
            self.routes.insert(s, Routes::default());
        }
    }

    /// Time base: if writes of the group are also stamped in other processes, this
    /// process measures their clocks and its replies commit-wait (I2 across hosts).
    /// Returns the commit gate local units' replies wait on, if any.
    fn start_time_base(&mut self) -> Option<Arc<CommitGate>> {
        let b = self.b;
        let primaries: BTreeSet<SystemId> = b.pairs.iter().map(|p| p.local).collect();
        let elsewhere: Vec<SystemId> = primaries.iter().copied().filter(|s| !b.runs(*s)).collect();
        let prober = *primaries.iter().find(|s| b.runs(**s))?;
        if elsewhere.is_empty() {
            return None;
        }
        let gate = Arc::new(CommitGate::default());
        let status = Arc::new(Mutex::new(TimeStatus::default()));
        let here_links = self.links.keys().map(|s| (*s, self.link(*s))).collect();
        let t = spawn(
            self.arbiter(prober),
            TimeBaseActor::new(
                TimeBase::new(b.time_base, elsewhere.iter().copied()),
                gate.clone(),
                self.clock.clone(),
                prober,
                here_links,
                b.system_names(),
                status.clone(),
            ),
        );
        for s in primaries.iter().filter(|s| b.runs(**s)) {
            if let Some(r) = self.routes.get_mut(s) {
                r.timebase = Some(TimeBaseRoute::of(&t));
            }
        }
        self.timebase = Some((t, status));
        Some(gate)
    }

    /// Pairs: each pair's remote unit and local unit (those that run here), resumed from
    /// their system's journal.
    fn start_pairs(
        &mut self,
        stores: Vec<Stores>,
        syncs: SyncPlans,
        gate: Option<Arc<CommitGate>>,
    ) {
        let b = self.b;
        let windows = b.windows(&self.journals);
        if b.primary_journal == PrimaryJournal::ActivityLog
            && b.pairs
                .iter()
                .any(|p| b.runs(p.local) && b.journals.contains_key(&p.local))
        {
            tracing::info!(
                "primary journal: activity log (replicating writes journaled without their data; a restart resyncs the regions the remote had not acknowledged)"
            );
        }
        // Every local unit here stamps from `self.clock`: each nudges the others.
        let mut siblings = Vec::new();
        for (i, ((p, (ls, rs)), sync)) in b.pairs.iter().zip(stores).zip(syncs).enumerate() {
            let id = PairId(i as u32);
            let remote = rs.as_ref().map(|rs| {
                let recovered = self.recovered(p.remote, id);
                let resume = RemoteResume {
                    applied: recovered.map_or(Stamp::ZERO, |r| r.applied),
                    live: recovered.map_or(Vec::new(), |r| r.live.clone()),
                    limit: self
                        .journals
                        .get(&p.remote)
                        .map_or(Timestamp::ZERO, |(_, r)| r.limit),
                    state: recovered.and_then(|r| r.state),
                    prepared: self
                        .journals
                        .get(&p.remote)
                        .map_or(Timestamp::ZERO, |(_, r)| r.prepared),
                    epoch: self.journals.get(&p.remote).and_then(|(_, r)| r.epoch),
                };
                let wiring = RemoteWiring {
                    local_system: p.local,
                    orderer_system: self.orderer_system,
                    store: rs.clone(),
                    journal: self.journal(p.remote),
                    disk: self.disk(p.remote),
                    link: self.link(p.remote),
                    hook: b.hook.clone(),
                    wall: self.wall.clone(),
                    budget: b.remote_budget(p.remote),
                    health: self.health.clone(),
                    undo_dir: b.undo_dir_of(p.remote),
                    undo_region: b.undo_region,
                };
                spawn(self.arbiter(p.remote), RemoteUnit::new(id, wiring, resume))
            });
            let local = ls.as_ref().map(|ls| {
                let nudge = Arc::new(NudgeBox::new());
                let recovered = self.recovered(p.local, id);
                let resume = LocalResume {
                    released: recovered.map_or(Stamp::ZERO, |r| r.released),
                    live: recovered.map_or(Vec::new(), |r| r.live.clone()),
                    // A pair with journal records from before pair states counts as
                    // replicating (no state record is then added).
                    state: recovered.map(|r| r.state.unwrap_or(PairState::Replicating)),
                    sync: sync.sync,
                    resync: sync.resync,
                    reserved: recovered.map_or(Seq::ZERO, |r| r.reserved),
                    tracking: b.track_from_start,
                };
                let cfg = LocalConfig {
                    heartbeat: b.heartbeat,
                    window_bytes: windows.get(&p.local).copied().unwrap_or(b.window_bytes),
                    rtt: b.rtt,
                    track: b.track,
                    link_recovers: b.udp.is_some(),
                    pace: b.pace,
                    activity_log: b.primary_journal == PrimaryJournal::ActivityLog,
                };
                let wiring = LocalWiring {
                    remote_system: p.remote,
                    clock: self.clock.clone(),
                    store: ls.clone(),
                    journal: self.journal(p.local),
                    lane: self.lane(),
                    link: self.link(p.local),
                    gate: gate.clone(),
                    health: self.health.clone(),
                    dirty: sync.dirty,
                    nudge: nudge.clone(),
                };
                let unit = spawn(
                    self.arbiter(p.local),
                    LocalUnit::new(id, wiring, resume, cfg),
                );
                siblings.push((
                    unit.clone(),
                    Sibling {
                        nudge,
                        addr: unit.clone().recipient(),
                    },
                ));
                unit
            });
            if let (Some(l), Some(r)) = (&local, self.routes.get_mut(&p.local)) {
                r.local_units.insert(id, LocalUnitRoute::of(l));
            }
            if let (Some(u), Some(r)) = (&remote, self.routes.get_mut(&p.remote)) {
                r.remote_units.insert(id, RemoteUnitRoute::of(u));
                self.site_units.entry(p.remote).or_default().push(u.clone());
            }
            self.pairs.push(PairHandle {
                id,
                name: p.name.clone(),
                size: p.size,
                local,
                remote,
                local_store: ls,
                remote_store: rs,
            });
        }
        // Sent before any client can reach a unit: the first write already nudges.
        for (unit, _) in &siblings {
            let others = siblings
                .iter()
                .filter(|(u, _)| u != unit)
                .map(|(_, s)| s.clone())
                .collect();
            unit.do_send(SetSiblings(others));
        }
    }

    /// Sites: one per remote system here, speaking for its units to the orderer, resumed
    /// from the limits its journal made durable.
    fn start_sites(&mut self) {
        for (sys, units) in std::mem::take(&mut self.site_units) {
            let (journal, prepared, released, epoch) = match self.journals.get(&sys) {
                Some((j, r)) => (Some(j.clone()), r.prepared.max(r.limit), r.limit, r.epoch),
                None => (None, Timestamp::ZERO, Timestamp::ZERO, None),
            };
            let wiring = SiteWiring {
                me: sys,
                orderer_system: self.orderer_system,
                units,
                link: self.link(sys),
                journal,
                disk: self.disk(sys),
                health: self.health.clone(),
            };
            let site = spawn(
                self.arbiter(sys),
                RemoteSite::new(wiring, prepared, released).with_epoch(epoch),
            );
            if let Some(r) = self.routes.get_mut(&sys) {
                r.site = Some(SiteRoute::of(&site));
            }
            self.sites.push(site);
        }
    }

    /// The orderer, if it runs here.
    fn start_orderer(&mut self, core: Option<Orderer>) {
        let Some(core) = core else {
            return;
        };
        let sys = self.orderer_system;
        let o = spawn(
            self.arbiter(sys),
            OrdererActor::new(
                core,
                self.b.remote_systems(),
                self.link(sys),
                self.b.heartbeat,
            ),
        );
        if let Some(r) = self.routes.get_mut(&sys) {
            r.orderer = Some(OrdererRoute::of(&o));
        }
        self.orderer = Some(o);
    }

    /// Routes: each link learns where what arrives goes (and the in-process links learn
    /// each other). Then the engine takes over what start-up built.
    fn wire_routes(mut self) -> Engine {
        let peers: BTreeMap<SystemId, Addr<Link>> = self
            .links
            .iter()
            .filter_map(|(s, l)| match l {
                LinkAddr::InProcess(a) => Some((*s, a.clone())),
                LinkAddr::Udp(_) => None,
            })
            .collect();
        for (s, l) in &self.links {
            let r = self.routes.remove(s).unwrap_or_default();
            match l {
                LinkAddr::InProcess(a) => {
                    a.do_send(SetPeers(peers.clone()));
                    a.do_send(SetRoutes(r));
                }
                LinkAddr::Udp(a) => a.do_send(SetRoutes(r)),
            }
        }
        let unit_arbiters = self
            .here
            .iter()
            .filter_map(|s| self.arbiter(*s).map(|h| (*s, h)))
            .collect();
        let mut arbiters = self.arbiters;
        arbiters.extend(self.link_arbiters);
        Engine {
            pairs: self.pairs,
            orderer: self.orderer,
            links: self.links,
            link_status: self.link_status,
            sites: self.sites,
            arbiters,
            unit_arbiters,
            disks: self.disks.into_values().chain(self.lanes).collect(),
            counters: self.counters,
            timebase: self.timebase,
            health: self.health,
            markers: self.markers,
        }
    }
}

/// The socket buffers asked for, bytes.
const RECV_BUFFER: usize = 8 << 20;

/// Binds a UDP socket with generous buffers (bursts of datagrams arrive together).
fn bind_udp(addr: SocketAddr) -> Result<std::net::UdpSocket, EngineError> {
    let err = EngineError::io(format!("cannot listen on udp {addr}"));
    let domain = socket2::Domain::for_address(addr);
    let s = match socket2::Socket::new(domain, socket2::Type::DGRAM, Some(socket2::Protocol::UDP)) {
        Ok(s) => s,
        Err(e) => return Err(err(e)),
    };
    // Best effort: the kernel caps these at its own maximum (net.core.rmem_max and
    // wmem_max); a capped receive buffer is reported, since a burst beyond it is lost.
    let _ = s.set_recv_buffer_size(RECV_BUFFER);
    let _ = s.set_send_buffer_size(RECV_BUFFER);
    match s.recv_buffer_size() {
        // Linux reports twice what it grants (the doubling covers its bookkeeping).
        Ok(got) if got < RECV_BUFFER => tracing::warn!(
            %addr,
            asked = RECV_BUFFER,
            got,
            "the kernel capped the UDP receive buffer (raise net.core.rmem_max to lift it); \
             bursts beyond it are lost and recovered by the link"
        ),
        Ok(got) => tracing::debug!(%addr, got, "UDP receive buffer"),
        Err(e) => tracing::debug!(%addr, error = %e, "cannot read the UDP receive buffer size"),
    }
    match s.bind(&addr.into()).and_then(|()| s.set_nonblocking(true)) {
        Ok(()) => Ok(s.into()),
        Err(e) => Err(err(e)),
    }
}

fn random_nonce() -> [u8; 16] {
    let mut n = [0u8; 16];
    rand::Rng::fill(&mut rand::rng(), &mut n[..]);
    n
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
