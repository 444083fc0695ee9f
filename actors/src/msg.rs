//! What every actor shares: the messages actors exchange inside one process, [`Stop`],
//! the wall clock type [`Wall`] and the actors' [`now`]. The network code (`net`) needs
//! nothing else of this crate, so it can hand messages to actors it does not know.

use crate::error::EngineError;
use actix::prelude::*;
use std::sync::Arc;
use tidemark::journal::Epoch;
use tidemark::{Ack, HeadReport, Heartbeat, Message as WireMessage, Packet, Payload};
use tidemark::{PairId, Seq, Stamp, SystemId, Timestamp};

/// Asks any actor to stop.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Stop;

/// A wall clock in nanoseconds.
pub type Wall = Arc<dyn Fn() -> u64 + Send + Sync>;

/// The actors' "now": tokio's clock, so that a simulation with paused time is
/// deterministic.
pub fn now() -> std::time::Instant {
    tokio::time::Instant::now().into_std()
}

// ---- to a LocalUnit ----

/// Client writes for one pair, completed (and stamped) in the order given.
#[derive(Message)]
#[rtype(result = "Result<Vec<Stamp>, EngineError>")]
pub struct Write(pub Vec<Payload>);

/// Make everything written so far durable on the local unit.
#[derive(Message)]
#[rtype(result = "Result<(), EngineError>")]
pub struct Flush;

/// Acknowledgements from the remote unit.
#[derive(Message)]
#[rtype(result = "()")]
pub struct AcksIn(pub Vec<Ack>);

/// What a local unit reports.
#[derive(Clone, Copy, Debug, Default)]
pub struct LocalStats {
    /// The pair's state as the primary's journal records it.
    pub state: Option<tidemark::journal::PairState>,
    /// The initial sync, if one ran since start.
    pub sync: Option<SyncStats>,
    pub last: Stamp,
    pub acked: Seq,
    pub unacked: usize,
    pub packets: u64,
    pub retransmits: u64,
    /// Why packets went again: retransmission timeouts, losses deemed by the
    /// reordering-tolerant detection, and retransmissions found spurious.
    pub timeouts: u64,
    pub lost: u64,
    pub spurious: u64,
    pub heartbeats: u64,
    pub bytes: u64,
    pub srtt_us: Option<u64>,
    /// Bytes in regions the remote misses (tracked, not yet resynced).
    pub dirty_bytes: u64,
    /// Write pacing, if on.
    pub pacing: Option<PacingStats>,
    /// New writes are refused (a planned switchover).
    pub quiesced: bool,
    /// Writes taken and not yet answered: queued, on the lane, or waiting for their
    /// reply (commit-wait, pacing).
    pub waiting_writes: usize,
    /// Recent ages (now minus stamp) of packets as the sender put them on the wire, µs.
    pub sent_lag_p50_us: u64,
    pub sent_lag_p99_us: u64,
    /// Bytes stamped and not acknowledged by the remote, and how many may be before
    /// writers wait (admission).
    pub unacked_bytes: u64,
    pub admit_bytes: u64,
}

/// What write pacing does on one pair ([`tidemark::pace`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct PacingStats {
    /// The delay a write completing now would get.
    pub delay_now: std::time::Duration,
    /// The delay the last write got.
    pub last_delay: std::time::Duration,
    /// Writes given a delay since start, and those delays summed.
    pub paced_writes: u64,
    pub delay_total: std::time::Duration,
}

/// Refuse new writes until `until` (a lease), or take them again (`None`).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Quiesce {
    pub until: Option<std::time::Instant>,
}

#[derive(Message)]
#[rtype(result = "LocalStats")]
pub struct GetLocalStats;

/// Progress of a copy (the initial sync or a resync), for stats and status.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct SyncStats {
    /// A resync of dirty regions (else the initial sync).
    pub resync: bool,
    /// Which copy since start (1, 2, ...): a new number is a new copy.
    pub copy: u64,
    /// Bytes of data to copy (the local unit's allocated extents).
    pub total_bytes: u64,
    /// Bytes read and on their way (journaled, shipped or acknowledged).
    pub copied_bytes: u64,
    /// Every piece is handed out and the copy's last mark (`SyncDone`, `ResyncDone`) is
    /// queued (stamped with the next batch).
    pub finished: bool,
}

/// Online verify: checksum `count` regions of `region` bytes from `offset` of the
/// pair's local unit, have the remote unit do the same, and judge each region
/// ([`tidemark::verify`]). Gives up with [`EngineError::Timeout`] if the remote unit
/// has not answered within `timeout`.
#[derive(Message)]
#[rtype(result = "Result<VerifyOutcome, EngineError>")]
pub struct VerifyRegions {
    pub offset: u64,
    pub region: u64,
    pub count: u64,
    pub timeout: std::time::Duration,
}

/// What a [`VerifyRegions`] found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VerifyOutcome {
    /// One per region asked for (fewer if the unit ends first), in order.
    pub verdicts: Vec<tidemark::verify::Verdict>,
    /// Why regions are busy when the pair could not be checked at all (it is not
    /// replicating: tracking, syncing, resyncing).
    pub busy: Option<String>,
    /// Regions whose remote checksum was taken at exactly the local one's point.
    pub exact: u64,
}

/// Online verify's repair: copy these byte ranges of the local unit to the remote unit
/// through the resync path (they are marked dirty, then resynced in order, inside a
/// resync epoch at the remote). Refused while the pair does not replicate.
#[derive(Message)]
#[rtype(result = "Result<(), EngineError>")]
pub struct Repair(pub Vec<(tidemark::Offset, u64)>);

/// Checksums from the remote unit.
#[derive(Message)]
#[rtype(result = "()")]
pub struct VerifySumsIn(pub tidemark::verify::VerifySums);

// ---- to a RemoteUnit ----

/// A verify request from the primary system `from`.
#[derive(Message)]
#[rtype(result = "()")]
pub struct VerifyIn {
    pub from: SystemId,
    pub req: tidemark::verify::VerifyRequest,
}

#[derive(Message)]
#[rtype(result = "()")]
pub struct PacketsIn(pub Vec<Packet>);

#[derive(Message)]
#[rtype(result = "()")]
pub struct HeartbeatsIn(pub Vec<Heartbeat>);

/// The released commit limit, and the resync epoch open at it. To a site: what the
/// orderer's release carried (`None`: the cut at `limit` needs no rollback). To a unit:
/// the site's epoch once the limit (and the epoch) are durable (`None`: none is open:
/// drop the undo log).
#[derive(Message, Clone, Copy, Debug)]
#[rtype(result = "()")]
pub struct LimitIn {
    pub limit: Timestamp,
    pub epoch: Option<Epoch>,
}

/// Resolves once everything up to `seq` is applied.
#[derive(Message)]
#[rtype(result = "Result<(), EngineError>")]
pub struct WaitApplied(pub Seq);

#[derive(Clone, Debug, Default)]
pub struct RemoteStats {
    /// The pair's state as the remote's journal records it (`None`: never recorded: a
    /// unit that never took part in an initial sync, so a cut as every remote unit is).
    pub state: Option<tidemark::journal::PairState>,
    pub head: Stamp,
    pub applied: Stamp,
    pub limit: Timestamp,
    pub held: usize,
    pub duplicates: u64,
    pub stale: u64,
    pub applies: u64,
    pub limit_violations: u64,
    /// Packets refused for want of journal space (retransmitted later).
    pub flow_dropped: u64,
    /// The resync the unit reports with its head, if one is in its run or unapplied.
    pub resync: Option<tidemark::Resync>,
    /// Bytes of the unit's undo file, while its system's resync epoch is open.
    pub undo_bytes: Option<u64>,
    /// Recent commit lags (stamp to applied), nanoseconds.
    pub lag_ns: Vec<u64>,
    /// The largest commit lag since start, nanoseconds.
    pub lag_max_ns: u64,
    /// Recent ages of writes at each step before they are applied, nanoseconds
    /// ([`crate::units::lag::LagStages`]).
    pub stage_ns: Vec<(&'static str, Vec<u64>)>,
}

#[derive(Message)]
#[rtype(result = "RemoteStats")]
pub struct GetRemoteStats;

// ---- to an Orderer ----

#[derive(Message)]
#[rtype(result = "()")]
pub struct HeadsIn(pub Vec<HeadReport>);

#[derive(Message)]
#[rtype(result = "()")]
pub struct DurableIn {
    pub system: SystemId,
    pub limit: Timestamp,
}

#[derive(Clone, Copy, Debug, Default)]
pub struct OrdererStats {
    pub candidate: Timestamp,
    pub released: Timestamp,
    pub releases: u64,
    pub laggard: Option<PairId>,
    /// The base of the resync epoch open at the orderer, if one is.
    pub epoch_base: Option<Timestamp>,
}

#[derive(Message)]
#[rtype(result = "OrdererStats")]
pub struct GetOrdererStats;

// ---- to a RemoteSite ----

/// An announced limit and the epoch it carries.
#[derive(Message, Clone, Copy, Debug)]
#[rtype(result = "()")]
pub struct AnnounceIn {
    pub limit: Timestamp,
    pub epoch: Option<Epoch>,
}

/// What a remote site reports.
#[derive(Clone, Copy, Debug, Default)]
pub struct SiteStats {
    pub system: SystemId,
    /// The resync epoch durable at the site, if one is open.
    pub epoch: Option<Epoch>,
}

#[derive(Message)]
#[rtype(result = "SiteStats")]
pub struct GetSiteStats;

// ---- to a TimeBaseActor ----

/// A probe from `from` arrived at system `at` of this process.
#[derive(Message)]
#[rtype(result = "()")]
pub struct ProbeIn {
    pub at: SystemId,
    pub from: SystemId,
    pub sent: u64,
}

/// An answer from `from` to one of our probes.
#[derive(Message)]
#[rtype(result = "()")]
pub struct ReplyIn {
    pub from: SystemId,
    pub sent: u64,
    pub remote: u64,
}

// ---- to a Link ----

/// Send `msg` to system `to` (or deliver it here, if `to` is this system).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Outbound {
    pub to: SystemId,
    pub msg: WireMessage,
}

/// Messages arriving from another system.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Deliver {
    pub from: SystemId,
    pub msgs: Vec<WireMessage>,
}

#[derive(Clone, Copy, Debug, Default)]
pub struct LinkStats {
    pub items_sent: u64,
    pub dropped: u64,
    pub duplicated: u64,
    pub delayed: u64,
}

#[derive(Message)]
#[rtype(result = "LinkStats")]
pub struct GetLinkStats;

/// Self-addressed: flush what was queued.
#[derive(Message)]
#[rtype(result = "()")]
pub(crate) struct FlushQueued;
