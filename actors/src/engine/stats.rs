//! [`Engine::stats`]: the figures of the units, orderer and links of this process.

use super::{Engine, LinkAddr};
use crate::error::EngineError;
use crate::msg::*;
use crate::units::lag::percentile;
use std::sync::atomic::Ordering;
use tidemark::journal::PairState;

/// Per-pair figures.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct PairStats {
    pub name: String,
    /// The pair's state at the primary (`syncing`, `replicating`, `tracking`,
    /// `resyncing`), if its local unit runs here.
    pub primary_state: Option<&'static str>,
    /// The pair's state at the secondary (`consistent`, `inconsistent`), if its remote
    /// unit runs here. A unit that never took part in an initial sync is consistent.
    pub secondary_state: Option<&'static str>,
    /// The initial sync or the last resync, if one ran since start (bytes to copy,
    /// copied, finished).
    pub sync: Option<SyncStats>,
    /// Bytes of the local unit in dirty regions: written while tracking, not yet
    /// resynced (what the remote misses, rounded out to regions).
    pub dirty_bytes: u64,
    pub written_seq: u64,
    pub acked_seq: u64,
    pub head_seq: u64,
    pub head_ts: u64,
    pub applied_seq: u64,
    pub commit_limit: u64,
    pub bytes: u64,
    /// Data packets the local unit handed to its sender, each counted once however often
    /// it was transmitted (`retransmits` counts the extra transmissions).
    pub packets: u64,
    /// Packets written and not yet acknowledged by the remote (the local unit's).
    pub unacked: u64,
    pub retransmits: u64,
    /// Retransmission timeouts of the pair's sender (each resent one packet).
    pub timeouts: u64,
    /// Packets its sender deemed lost by the reordering-tolerant detection.
    pub lost: u64,
    /// Retransmissions found spurious (the earlier transmission had arrived).
    pub spurious: u64,
    pub heartbeats: u64,
    pub dropped: u64,
    pub duplicated: u64,
    pub duplicates_received: u64,
    pub limit_violations: u64,
    pub flow_dropped: u64,
    pub srtt_us: Option<u64>,
    pub lag_p50_us: u64,
    pub lag_p99_us: u64,
    /// The resync the remote unit reports (`since`, `done`), if one is in its run.
    pub resync: Option<tidemark::Resync>,
    /// Bytes of the remote unit's undo file while its system's resync epoch is open.
    pub undo_bytes: Option<u64>,
    /// Write pacing at the primary, if on.
    pub pacing: Option<crate::msg::PacingStats>,
    /// The local unit refuses new writes (a planned switchover).
    pub quiesced: bool,
    /// Writes the local unit took and has not answered yet.
    pub waiting_writes: u64,
    /// The largest commit lag of any write applied since start (µs).
    pub lag_max_us: u64,
    /// Where the commit lag goes, at the remote unit: recent ages of writes as they
    /// arrived, became durable in the remote journal and were selected to be applied,
    /// and of limits as they arrived (empty where no remote unit runs).
    pub lag_stages: Vec<StageLag>,
    /// At the primary: recent ages (now minus stamp) of packets as they went on the
    /// wire, µs.
    pub sent_lag_p50_us: u64,
    pub sent_lag_p99_us: u64,
    /// At the primary: bytes not yet acknowledged, and the admission bound on them.
    pub unacked_bytes: u64,
    pub admit_bytes: u64,
}

/// The age (now minus stamp) of recent writes at one step, at the remote unit (µs).
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct StageLag {
    pub stage: &'static str,
    pub p50_us: u64,
    pub p99_us: u64,
}

/// A remote system's resync epoch (see `docs/design.md`).
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct EpochStats {
    /// The system's index in the group.
    pub system: u32,
    /// The cut `promote` rolls back to while the epoch is open.
    pub base: u64,
    /// The limit at which it closes, once the orderer said.
    pub closes_at: Option<u64>,
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
    /// The open resync epoch of every remote system here that has one.
    pub epochs: Vec<EpochStats>,
    /// The base of the epoch open at the orderer, if it runs here and one is open.
    pub orderer_epoch_base: Option<u64>,
}

impl Stats {
    pub fn retransmits(&self) -> u64 {
        self.pairs.iter().map(|p| p.retransmits).sum()
    }
}

impl Engine {
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
                primary_state: p.local.as_ref().map(|_| match l.state {
                    Some(PairState::Syncing) => "syncing",
                    Some(PairState::Tracking) => "tracking",
                    Some(PairState::Resyncing) => "resyncing",
                    _ => "replicating",
                }),
                secondary_state: p.remote.as_ref().map(|_| match r.state {
                    Some(PairState::Inconsistent) => "inconsistent",
                    _ => "consistent",
                }),
                sync: l.sync,
                dirty_bytes: l.dirty_bytes,
                written_seq: l.last.seq.0,
                acked_seq: l.acked.0,
                head_seq: r.head.seq.0,
                head_ts: r.head.ts.0,
                applied_seq: r.applied.seq.0,
                commit_limit: r.limit.0,
                bytes: l.bytes,
                packets: l.packets,
                unacked: l.unacked as u64,
                retransmits: l.retransmits,
                timeouts: l.timeouts,
                lost: l.lost,
                spurious: l.spurious,
                heartbeats: l.heartbeats,
                dropped: c.dropped.load(Ordering::Relaxed),
                duplicated: c.duplicated.load(Ordering::Relaxed),
                duplicates_received: r.duplicates,
                limit_violations: r.limit_violations,
                flow_dropped: r.flow_dropped,
                srtt_us: l.srtt_us,
                lag_p50_us: percentile(&mut r.lag_ns.clone(), 50.0) / 1000,
                lag_p99_us: percentile(&mut r.lag_ns.clone(), 99.0) / 1000,
                resync: r.resync,
                undo_bytes: r.undo_bytes,
                pacing: l.pacing,
                quiesced: l.quiesced,
                waiting_writes: l.waiting_writes as u64,
                lag_max_us: r.lag_max_ns / 1000,
                lag_stages: r
                    .stage_ns
                    .iter()
                    .filter(|(_, s)| !s.is_empty())
                    .map(|(stage, s)| StageLag {
                        stage,
                        p50_us: percentile(&mut s.clone(), 50.0) / 1000,
                        p99_us: percentile(&mut s.clone(), 99.0) / 1000,
                    })
                    .collect(),
                sent_lag_p50_us: l.sent_lag_p50_us,
                sent_lag_p99_us: l.sent_lag_p99_us,
                unacked_bytes: l.unacked_bytes,
                admit_bytes: l.admit_bytes,
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
            out.orderer_epoch_base = o.epoch_base.map(|t| t.0);
        }
        for site in &self.sites {
            let s = site.send(GetSiteStats).await?;
            if let Some(e) = s.epoch {
                out.epochs.push(EpochStats {
                    system: s.system.0,
                    base: e.base.0,
                    closes_at: e.closes_at.map(|t| t.0),
                });
            }
        }
        for l in self.links.values() {
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
}
