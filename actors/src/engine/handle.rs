//! The running engine: what [`EngineBuilder::start`](super::EngineBuilder::start) built,
//! and the calls a user (an NBD server, a test, the daemon) makes on it.

use crate::error::EngineError;
use crate::health::{Failure, Health};
use crate::msg::*;
use crate::net::sim::Link;
use crate::net::sim::PairCounters;
use crate::net::udp::{UdpLink, UdpStatus};
use crate::units::disk::Disk;
use crate::units::local::LocalUnit;
use crate::units::orderer::OrdererActor;
use crate::units::remote::RemoteUnit;
use crate::units::site::RemoteSite;
use crate::units::timebase::{TimeBaseActor, TimeStatus};
use actix::prelude::*;
use bytes::Bytes;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use tidemark::{BlockStore, Offset, PairId, Payload, Seq, Stamp, SystemId};

/// A system's link actor, of either kind.
#[derive(Clone)]
pub(super) enum LinkAddr {
    InProcess(Addr<Link>),
    Udp(Addr<UdpLink>),
}

/// One pair as the engine holds it.
pub struct PairHandle {
    pub id: PairId,
    pub name: String,
    pub size: u64,
    pub(super) local: Option<Addr<LocalUnit>>,
    pub(super) remote: Option<Addr<RemoteUnit>>,
    pub(super) local_store: Option<Arc<dyn BlockStore>>,
    pub(super) remote_store: Option<Arc<dyn BlockStore>>,
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

/// A pair's local unit, for an operator's requests (online verify and its repair):
/// cheap to clone, and holding nothing of the engine but the unit's mailbox (a request
/// to a stopped unit gets [`EngineError::Stopped`]).
#[derive(Clone)]
pub struct PairControl {
    pub id: PairId,
    pub name: String,
    pub size: u64,
    local: Addr<LocalUnit>,
}

impl PairControl {
    /// Checks `count` regions of `region` bytes from `offset` against the remote unit
    /// (see [`VerifyRegions`]).
    pub async fn verify(
        &self,
        offset: u64,
        region: u64,
        count: u64,
        timeout: std::time::Duration,
    ) -> Result<VerifyOutcome, EngineError> {
        self.local
            .send(VerifyRegions {
                offset,
                region,
                count,
                timeout,
            })
            .await?
    }

    /// Resyncs these byte ranges through the resync path (see [`Repair`]).
    pub async fn repair(&self, ranges: Vec<(tidemark::Offset, u64)>) -> Result<(), EngineError> {
        self.local.send(Repair(ranges)).await?
    }

    /// The local unit's figures (state, dirty bytes, ...).
    /// Refuses new writes to the pair until `until` (`None`: takes them again at once).
    /// Writes taken before are carried out as usual.
    pub async fn quiesce(&self, until: Option<std::time::Instant>) -> Result<(), EngineError> {
        Ok(self.local.send(Quiesce { until }).await?)
    }

    pub async fn stats(&self) -> Result<LocalStats, EngineError> {
        Ok(self.local.send(GetLocalStats).await?)
    }
}

/// A running consistency group.
pub struct Engine {
    pub(super) pairs: Vec<PairHandle>,
    pub(super) orderer: Option<Addr<OrdererActor>>,
    pub(super) links: BTreeMap<SystemId, LinkAddr>,
    pub(super) link_status: BTreeMap<SystemId, Arc<Mutex<UdpStatus>>>,
    pub(super) sites: Vec<Addr<RemoteSite>>,
    pub(super) arbiters: Vec<Arbiter>,
    /// The arbiter each system of this process runs its units on.
    pub(super) unit_arbiters: BTreeMap<SystemId, ArbiterHandle>,
    pub(super) disks: Vec<Disk>,
    pub(super) counters: Arc<[PairCounters]>,
    pub(super) timebase: Option<(Addr<TimeBaseActor>, Arc<Mutex<TimeStatus>>)>,
    pub(super) health: Health,
    /// This run's markers in the journal directories (see `boot`).
    pub(super) markers: Vec<std::path::PathBuf>,
}

impl Engine {
    /// Stopping: no client waits on anything any more. Writes not yet journaled are
    /// answered with an error (and never written); writes whose acknowledgement the
    /// time base holds too (they stay journaled and still replicate); later writes are
    /// refused. See [`crate::units::local::Stopping`].
    pub fn stopping(&self) {
        for p in &self.pairs {
            if let Some(l) = &p.local {
                l.do_send(crate::units::local::Stopping);
            }
        }
    }

    /// The engine's health: where its parts report a fatal failure (a failed journal or
    /// disk), once. Watch [`Health::failed`] to stop the process on one.
    pub fn health(&self) -> &Health {
        &self.health
    }

    /// The first fatal failure, if a part of the engine stopped keeping its guarantees.
    pub fn failure(&self) -> Option<Failure> {
        self.health.failure()
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

    /// A control handle on every pair whose local unit runs here.
    pub fn controls(&self) -> Vec<PairControl> {
        self.pairs
            .iter()
            .filter_map(|p| {
                Some(PairControl {
                    id: p.id,
                    name: p.name.clone(),
                    size: p.size,
                    local: p.local.clone()?,
                })
            })
            .collect()
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
    /// once it is written locally and queued for the remote (`Stamp::ZERO` while the
    /// pair is tracking: the write is local only, its region recorded for a resync).
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
    /// Pairs whose two units are not both in this process are skipped. A pair that is
    /// tracking or resyncing is waited for until it replicates again with no dirty
    /// region left (its writes since tracking began reach the remote through the
    /// resync, not as packets of their own), so this waits as long as the remote is
    /// away: bound it with a timeout where that matters.
    pub async fn drain(&self) -> Result<(), EngineError> {
        let pairs: Vec<_> = self
            .pairs
            .iter()
            .filter(|p| p.is_local() && p.is_remote())
            .collect();
        // Every unit is asked at once (`send` queues the message now; the replies are
        // awaited in turn): one round trip to the actor threads, not one per pair.
        let mut asks = Vec::with_capacity(pairs.len());
        for p in &pairs {
            asks.push(p.local()?.send(GetLocalStats));
        }
        let mut targets = Vec::new();
        for (p, ask) in pairs.into_iter().zip(asks) {
            let mut s = ask.await?;
            while s.dirty_bytes > 0
                || matches!(
                    s.state,
                    Some(
                        tidemark::journal::PairState::Tracking
                            | tidemark::journal::PairState::Resyncing
                    )
                )
            {
                if let Some(f) = self.health.failure() {
                    return Err(EngineError::Failed(f));
                }
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                s = p.local()?.send(GetLocalStats).await?;
            }
            targets.push((p, s.last.seq));
        }
        let mut waits = Vec::with_capacity(targets.len());
        for (p, seq) in targets {
            if seq > Seq::ZERO {
                waits.push(p.remote()?.send(WaitApplied(seq)));
            }
        }
        for w in waits {
            w.await??;
        }
        Ok(())
    }

    /// Waits until the remote unit of `pair` (in this process) has applied `seq`.
    pub async fn wait_applied(&self, pair: PairId, seq: Seq) -> Result<(), EngineError> {
        self.pair(pair)?.remote()?.send(WaitApplied(seq)).await?
    }

    /// Cuts `system` off the in-process network (`down`: an outage; every message it
    /// sends or that arrives for it is dropped) or puts it back. Does nothing on the UDP
    /// link (stop a process or a relay there). For tests and the demo.
    pub fn set_link_down(&self, system: SystemId, down: bool) {
        if let Some(LinkAddr::InProcess(a)) = self.links.get(&system) {
            a.do_send(crate::net::sim::SetDown(down));
        }
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
        for l in self.links.values() {
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
        if result.is_ok() {
            // Everything journaled is synced (the flushes above): a clean stop.
            for m in &self.markers {
                super::boot::mark_stopped(m);
            }
        }
        result
    }
}
