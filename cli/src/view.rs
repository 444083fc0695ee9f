//! The operator's view of one running system: what its control socket serves (inside
//! the status document), what `tidemark status` shows and what `/metrics` exports.
//!
//! It is built from the same figures as `status.json` (engine stats, the UDP link's
//! status, the time base, the initial sync's progress) plus what only the daemon knows
//! (its journal's size on disk, the clock at sampling time, the RPO target). Its JSON is
//! stable: version [`VIEW_VERSION`]; fields are only ever added. `docs/operations.md`
//! documents every field.

use crate::config::Config;
use crate::progress::SyncFigures;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;
use tidemark_actors::engine::{PairStats, Stats};
use tidemark_actors::net::udp::UdpStatus;

/// The version of the view's JSON; bumped only if a field changes meaning or goes away.
pub const VIEW_VERSION: u32 = 1;

/// One system as it runs now.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SystemView {
    pub version: u32,
    pub system: String,
    /// `"primary"` or `"secondary"`.
    pub role: String,
    pub pid: u32,
    /// When the figures were taken, milliseconds since the Unix epoch (this host's clock).
    pub sampled_at_ms: u64,
    /// Bytes the journal's segment files take now (`journal_dir/segments/*.seg`).
    pub journal_used_bytes: u64,
    /// The journal's configured capacity (`journal_size`).
    pub journal_size_bytes: u64,
    /// Each peer system this one exchanges datagrams with: up (heard from within
    /// `peer_timeout_ms`) or not.
    pub peers: BTreeMap<String, bool>,
    pub link: LinkView,
    /// The time base's state (`"ok"` or `"held: <why>"`), if this process stamps writes
    /// together with primaries in other processes.
    pub clock: Option<String>,
    /// The group's commit limit as the orderer released it, if the orderer runs here.
    pub orderer: Option<OrdererView>,
    /// `rpo_target_ms` of the config, if set.
    pub rpo_target_ms: Option<u64>,
    /// The first fatal failure of the process (it is stopping because of it).
    pub failed: Option<String>,
    /// The pairs with an end on this system, in config order.
    pub pairs: Vec<PairView>,
}

/// The UDP link's totals.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LinkView {
    pub datagrams_out: u64,
    pub datagrams_in: u64,
    pub bytes_out: u64,
    pub bytes_in: u64,
    /// Datagrams dropped on arrival for any reason (unauthenticated, replayed, stale,
    /// malformed, oversized, misaddressed).
    pub dropped: u64,
    pub send_errors: u64,
}

/// The group's limit, at the system that runs the orderer.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct OrdererView {
    /// The released commit limit: a time stamp, nanoseconds since the Unix epoch.
    pub commit_limit: u64,
    /// Now minus the commit limit: how far in the past the group's consistent cut is.
    pub lag_ms: Option<u64>,
    /// The pair whose run head holds the limit back (the earliest head).
    pub laggard: Option<String>,
    /// Limits released since start.
    pub commits: u64,
    /// `lag_ms` is above `rpo_target_ms` (null without a target).
    pub rpo_exceeded: Option<bool>,
}

/// One end of one pair. Fields of the other end are null.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PairView {
    pub name: String,
    /// Which end runs on this system: `"primary"` (the local unit) or `"secondary"` (the
    /// remote unit).
    pub end: String,
    /// At the primary `syncing`, `replicating`, `tracking` or `resyncing`; at the
    /// secondary `consistent` or `inconsistent`.
    pub state: String,
    /// The initial sync or the last resync, if one ran in this process (primary).
    pub sync: Option<SyncView>,
    /// Bytes in dirty regions not yet resynced (primary).
    pub dirty_bytes: Option<u64>,
    /// Last sequence number written (primary).
    pub written_seq: Option<u64>,
    /// Everything up to here is durable at the remote (primary).
    pub acked_seq: Option<u64>,
    /// The remote unit holds every packet up to here (secondary).
    pub head_seq: Option<u64>,
    /// Applied to the remote unit up to here (secondary).
    pub applied_seq: Option<u64>,
    /// The commit limit the remote unit applies up to, nanoseconds since the Unix epoch
    /// (secondary).
    pub commit_limit: Option<u64>,
    /// Commit lag now: this host's clock minus the commit limit, ms (secondary): the
    /// remote unit shows the primary as of that long ago.
    pub lag_ms: Option<u64>,
    /// 99th percentile of recent commit lags, write stamped to applied, ms (secondary).
    pub lag_p99_ms: Option<f64>,
    /// Data the remote does not hold safely yet: packets not acknowledged (their number
    /// times the pair's mean packet size: an estimate) plus dirty bytes (primary).
    pub lag_bytes: Option<u64>,
    /// Bytes of client writes shipped since start (primary).
    pub bytes: Option<u64>,
    /// Data packets sent since start, each counted once (primary).
    pub packets: Option<u64>,
    /// Extra transmissions since start (primary).
    pub retransmits: Option<u64>,
    /// Retransmissions per packet, in percent: the sender's estimate of loss (primary).
    pub loss_pct: Option<f64>,
    /// Smoothed round trip time, ms (primary; null before the first acknowledgement).
    pub rtt_ms: Option<f64>,
    /// `lag_ms` above `rpo_target_ms` (secondary, with a target).
    pub rpo_exceeded: Option<bool>,
    /// This pair's run head holds the group's limit back (at the orderer's system).
    pub holds_limit: bool,
    /// Largest commit lag of any write applied since the secondary started, ms
    /// (secondary).
    pub lag_max_ms: Option<f64>,
    /// Write pacing (`pace_writes`, primary; null when off): the delay a write completing
    /// now gets, ms.
    pub pacing_delay_ms: Option<f64>,
    /// Writes whose acknowledgement pacing held since start, and those delays summed
    /// (primary; null when pacing is off).
    pub paced_writes: Option<u64>,
    pub pacing_delay_total_ms: Option<f64>,
    /// New writes are refused for a planned switchover (primary).
    pub quiesced: Option<bool>,
    /// Writes taken and not yet answered (primary).
    pub waiting_writes: Option<u64>,
}

/// A copy's progress.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SyncView {
    /// `"initial"` or `"resync"`.
    pub kind: String,
    pub total_bytes: u64,
    pub copied_bytes: u64,
    pub finished: bool,
    pub percent: Option<f64>,
    pub rate_bytes_per_s: Option<u64>,
    pub eta_s: Option<u64>,
}

/// What [`SystemView::build`] reads.
pub struct Inputs<'a> {
    pub cfg: &'a Config,
    /// The system's index in the config.
    pub system: usize,
    pub stats: &'a Stats,
    pub link: Option<&'a UdpStatus>,
    pub clock: Option<&'a tidemark_actors::units::timebase::TimeStatus>,
    pub failed: Option<&'a tidemark_actors::Failure>,
    /// Per pair (config order), the initial sync's figures.
    pub figures: &'a [Option<SyncFigures>],
    /// Now, nanoseconds since the Unix epoch.
    pub now_ns: u64,
    /// Whether the orderer runs in this process.
    pub orderer_here: bool,
}

impl SystemView {
    /// The view of system `inputs.system`.
    pub fn build(i: &Inputs) -> SystemView {
        let s = &i.cfg.systems[i.system];
        let target = i.cfg.rpo_target.map(|d| d.as_millis() as u64);
        let lag = |limit: u64| (limit > 0).then(|| i.now_ns.saturating_sub(limit) / 1_000_000);
        let orderer = (i.orderer_here && i.cfg.orderer == i.system).then(|| {
            let lag_ms = lag(i.stats.commit_limit);
            OrdererView {
                commit_limit: i.stats.commit_limit,
                lag_ms,
                laggard: i.stats.laggard.clone(),
                commits: i.stats.commits,
                rpo_exceeded: target.zip(lag_ms).map(|(t, l)| l > t),
            }
        });
        let mut pairs = Vec::new();
        for (n, (pc, ps)) in i.cfg.pairs.iter().zip(&i.stats.pairs).enumerate() {
            let holds_limit = orderer
                .as_ref()
                .is_some_and(|o| o.laggard.as_deref() == Some(pc.name.as_str()));
            if pc.local == i.system && ps.primary_state.is_some() {
                let fig = i.figures.get(n).copied().flatten();
                pairs.push(primary_end(ps, fig, holds_limit));
            }
            if pc.remote == i.system && ps.secondary_state.is_some() {
                let lag_ms = lag(ps.commit_limit);
                pairs.push(PairView {
                    name: ps.name.clone(),
                    end: "secondary".into(),
                    state: ps.secondary_state.unwrap_or("consistent").into(),
                    head_seq: Some(ps.head_seq),
                    applied_seq: Some(ps.applied_seq),
                    commit_limit: Some(ps.commit_limit),
                    lag_ms,
                    lag_p99_ms: Some(ps.lag_p99_us as f64 / 1000.0),
                    lag_max_ms: Some(ps.lag_max_us as f64 / 1000.0),
                    rpo_exceeded: target.zip(lag_ms).map(|(t, l)| l > t),
                    holds_limit,
                    ..PairView::default()
                });
            }
        }
        let link = i.link.map(|l| LinkView {
            datagrams_out: l.counters.datagrams_out,
            datagrams_in: l.counters.datagrams_in,
            bytes_out: l.counters.bytes_out,
            bytes_in: l.counters.bytes_in,
            dropped: l.counters.dropped(),
            send_errors: l.send_errors,
        });
        SystemView {
            version: VIEW_VERSION,
            system: s.name.clone(),
            role: if s.primary { "primary" } else { "secondary" }.into(),
            pid: std::process::id(),
            sampled_at_ms: i.now_ns / 1_000_000,
            journal_used_bytes: journal_used(&s.segments_dir()),
            journal_size_bytes: s.journal_size,
            peers: i.link.map(|l| l.peers_up.clone()).unwrap_or_default(),
            link: link.unwrap_or_default(),
            clock: i.clock.filter(|_| s.primary).map(|c| c.state.clone()),
            orderer,
            rpo_target_ms: target,
            failed: i.failed.map(|f| f.to_string()),
            pairs,
        }
    }
}

/// The primary end of a pair.
fn primary_end(ps: &PairStats, fig: Option<SyncFigures>, holds_limit: bool) -> PairView {
    // Heartbeats take no sequence number: `written_seq` counts data packets.
    let mean = ps.bytes.checked_div(ps.written_seq).unwrap_or(0);
    let sync = ps.sync.map(|s| SyncView {
        kind: if s.resync { "resync" } else { "initial" }.into(),
        total_bytes: s.total_bytes,
        copied_bytes: s.copied_bytes,
        finished: s.finished,
        percent: fig.map(|f| f.percent),
        rate_bytes_per_s: fig.and_then(|f| f.rate_bytes_per_s),
        eta_s: fig.and_then(|f| f.eta_s),
    });
    PairView {
        name: ps.name.clone(),
        end: "primary".into(),
        state: ps.primary_state.unwrap_or("replicating").into(),
        sync,
        dirty_bytes: Some(ps.dirty_bytes),
        written_seq: Some(ps.written_seq),
        acked_seq: Some(ps.acked_seq),
        lag_bytes: Some(ps.unacked * mean + ps.dirty_bytes),
        bytes: Some(ps.bytes),
        packets: Some(ps.packets),
        retransmits: Some(ps.retransmits),
        loss_pct: Some(if ps.packets > 0 {
            100.0 * ps.retransmits as f64 / ps.packets as f64
        } else {
            0.0
        }),
        rtt_ms: ps.srtt_us.map(|us| us as f64 / 1000.0),
        holds_limit,
        pacing_delay_ms: ps.pacing.map(|p| p.delay_now.as_secs_f64() * 1000.0),
        paced_writes: ps.pacing.map(|p| p.paced_writes),
        pacing_delay_total_ms: ps.pacing.map(|p| p.delay_total.as_secs_f64() * 1000.0),
        quiesced: Some(ps.quiesced),
        waiting_writes: Some(ps.waiting_writes),
        ..PairView::default()
    }
}

/// Bytes of the journal segment files in `dir` (0 if it cannot be read).
pub fn journal_used(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".seg"))
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum()
}

/// Now, nanoseconds since the Unix epoch.
pub fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}
