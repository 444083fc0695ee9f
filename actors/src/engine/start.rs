//! [`EngineBuilder::start`]: opens what runs here (units, journals, sockets), then
//! starts and wires the actors of every system of this process.

use super::{Engine, EngineBuilder, LinkAddr, PairHandle};
use crate::error::EngineError;
use crate::msg::*;
use crate::net::route::{
    OrdererRoute, RemoteUnitRoute, Routes, SetRoutes, SiteRoute, TimeBaseRoute,
};
use crate::net::sim::{Link, PairCounters, SetPeers};
use crate::net::udp::{UdpLink, UdpStatus};
use crate::units::disk::Disk;
use crate::units::journaling::SharedJournal;
use crate::units::local::{LocalConfig, LocalResume, LocalUnit};
use crate::units::orderer::OrdererActor;
use crate::units::remote::{RemoteResume, RemoteUnit, RemoteWiring};
use crate::units::site::RemoteSite;
use crate::units::timebase::{TimeBaseActor, TimeStatus};
use actix::prelude::*;
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tidemark::journal::Recovered;
use tidemark::timebase::{CommitGate, TimeBase};
use tidemark::{HybridClock, Orderer, PairId, Stamp, SystemId, Timestamp};

impl EngineBuilder {
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

fn spawn<A>(arbiter: Option<ArbiterHandle>, actor: A) -> Addr<A>
where
    A: Actor<Context = Context<A>> + Send,
{
    match arbiter {
        Some(h) => A::start_in_arbiter(&h, move |_| actor),
        None => actor.start(),
    }
}
