//! `LocalUnit`: owns one local disk. Takes client writes, stamps them, journals them and
//! writes them locally (off the actor thread, on the unit's own disk lane: one thread
//! that runs the unit's jobs in the order they were stamped, several batches in flight,
//! so the journal and the disk see them in stamp order while the actor stamps the next
//! batch), tells the clients, hands the packets to the link, retransmits what the
//! remote has not acknowledged, and sends heartbeats when idle.
//!
//! I2: a write is stamped from the process-wide hybrid clock after its client issued it
//! and before its client is told it completed, so a write issued after another completed
//! gets a later stamp.
//! I3: a write is told complete only after its packet is in the journal (written to the
//! operating system; synced too on flush/FUA), so a restarted primary ships it; the
//! packet leaves for the remote only after the local write finished; the journal forgets
//! it only once the remote acknowledged it as durable.
//! I2 across primary processes: with a commit gate (see `timebase`), a write stamped `t`
//! is told complete only once the wall clock passed `t` plus the measured skew bound;
//! replies leave in stamp order.

use crate::error::EngineError;
use crate::health::Health;
use crate::msg::*;
use crate::units::disk::Disk;
use crate::units::journaling::{Durability, SharedJournal};
use crate::units::lag::LagSamples;
use crate::units::sync::{InitialSync, Piece};
use actix::prelude::*;
use bytes::Bytes;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;
use std::time::Instant;
use tidemark::dirty::{DirtyFile, DirtyMap};
use tidemark::journal::{JournalError, Logged, PairState, Record};
use tidemark::pace::{PaceInput, PaceRule};
use tidemark::ship::{NudgeBox, Sender};
use tidemark::storage::check;
use tidemark::timebase::{Commit, CommitGate};
use tidemark::verify::{self as tv, LastWrites, SumsResult, Verdict, VerifyRequest};
use tidemark::Mark;
use tidemark::{BlockStore, HybridClock, Message as WireMessage, Packet, PairId, Payload};
use tidemark::{Offset, Rtt, Seq, Stamp, SystemId};
use tokio::sync::oneshot;

type Reply<T> = oneshot::Sender<Result<T, EngineError>>;

enum Op {
    Write(Vec<Payload>, Reply<Vec<Stamp>>),
    Flush(Reply<()>),
    /// Initial sync: ship the next piece of the unit (data read on the lane, in stamp
    /// order). The piece is taken from the plan when the op is stamped, so that every
    /// write stamped before it has been seen by the plan ([`InitialSync::written`]).
    Copy,
    /// Initial sync: a mark in the stream, and the pair state the primary's journal
    /// records beside it, if any.
    Mark(Mark, Option<PairState>),
    /// Records the pair's state in the journal (no packet).
    State(PairState),
    /// The remote holds every dirty region: the lane clears the dirty map, then the
    /// journal records the pair as replicating.
    Clean,
}

impl Op {
    /// Answers a client op with `err`; an op of the unit's own has no one to tell.
    fn fail(self, err: EngineError) {
        match self {
            Op::Write(_, r) => drop(r.send(Err(err))),
            Op::Flush(r) => drop(r.send(Err(err))),
            Op::Copy | Op::Mark(..) | Op::State(_) | Op::Clean => {}
        }
    }

    fn is_sync(&self) -> bool {
        matches!(self, Op::Copy | Op::Mark(..) | Op::State(_) | Op::Clean)
    }
}

/// A batch of ops, stamped, on its way through the journal and the local disk. Kept
/// whole so that a full journal can be retried with the same stamps.
struct Batch {
    ops: Vec<Op>,
    stamps: Vec<Vec<Stamp>>,
    records: Arc<Vec<Record>>,
    /// Indices in `records` of initial-sync data packets: their payload is read on the
    /// lane (the record holds a placeholder until then).
    copies: Arc<Vec<usize>>,
    /// Indices in `records` of initial-sync hole packets (zero ranges, nothing to read).
    /// Like the data pieces they are not written to the local unit: it is their source.
    holes: Arc<Vec<usize>>,
    /// Indices in `records` of client writes the journal records without their data (an
    /// activity-log journal, [`LocalConfig::activity_log`]).
    logged: Arc<Vec<usize>>,
    /// Its last packet, if it has any: the lane having written it lets it go on the wire.
    last: Option<Seq>,
    /// The copy pieces its `Copy` ops took from the plan (given back if the batch is).
    pieces: Vec<Piece>,
    /// A tracking batch: its writes go to the local unit only, their regions marked
    /// dirty first (write-ahead); nothing is stamped or journaled.
    tracked: bool,
    /// The lane clears the dirty map (the remote acknowledged the resync's last mark).
    clear_dirty: bool,
    /// The reservation it records, synced with it.
    reserve: Option<Seq>,
}

/// How the disk job ended.
enum Outcome {
    /// With the payloads read for the batch's initial-sync packets.
    Done(Vec<(Seq, Payload)>),
    /// The journal has no room: nothing was appended; retry later.
    Full,
    /// The file system had no room (ENOSPC) for the journal or the local unit: nothing
    /// of the batch was journaled or written. Its client ops are told so.
    NoSpace(String),
    Failed(String),
    /// An earlier batch of the lane was full or failed: this one did nothing, so that
    /// nothing is journaled or written out of stamp order.
    Skipped,
}

/// Batches the lane may hold at once: enough to keep it busy while the actor stamps the
/// next one and answers the last.
const MAX_IN_FLIGHT: usize = 4;

/// A batch handed to the lane, and how its job ended (once it has).
struct InFlight {
    batch: Batch,
    acked: Stamp,
    outcome: Option<Outcome>,
}

/// What write pacing did since start.
#[derive(Clone, Copy, Debug, Default)]
struct PaceStats {
    /// The delay given to the last write.
    last: Duration,
    /// Writes given a delay, and the delays summed.
    paced_writes: u64,
    total: Duration,
}

/// A write's reply waiting for commit-wait or write pacing.
struct Pending {
    reply: Reply<Vec<Stamp>>,
    stamps: Vec<Stamp>,
    /// Write pacing: not before this wall-clock time (ns; 0: no pacing delay).
    not_before: u64,
}

impl Pending {
    /// The last stamp the client is told about (0 if none: nothing to wait for).
    fn ts(&self) -> u64 {
        self.stamps.last().map_or(0, |s| s.ts.0)
    }
}

/// A write larger than this is journaled and shipped as several packets (a block device
/// promises no atomicity beyond a sector, so a crash may show some pieces of an
/// unacknowledged large write and not others, at the primary as at the remote)…
const MAX_PART: usize = 4 << 20;
/// …nor larger than a quarter of a journal segment (a record must fit in a segment), but
/// never cut finer than this.
const MIN_PART: usize = 4 << 10;

/// Sequence numbers reserved per [`Record::Reserve`]: one synced journal append every
/// this many packets of a pair; a restart after a power loss skips at most this many.
const RESERVE_STEP: u64 = 1 << 16;

pub struct LocalUnit {
    pair: PairId,
    remote_system: SystemId,
    sender: Sender,
    /// Ages (wall clock minus stamp) of packets as they go on the wire.
    sent_lag: LagSamples,
    clock: Arc<HybridClock>,
    store: Arc<dyn BlockStore>,
    journal: Option<SharedJournal>,
    disk: Disk,
    link: Recipient<Outbound>,
    queue: Vec<Op>,
    /// Batches on the lane, oldest first; the oldest has id `next_id - inflight.len()`.
    inflight: std::collections::VecDeque<InFlight>,
    next_id: u64,
    /// Set by a job that found the journal full or failed; later jobs then skip.
    stalled: Arc<AtomicBool>,
    /// Batches to submit again (in order) once the lane is empty: a full journal.
    retry: Vec<Batch>,
    /// A batch of `retry` was refused for want of space on the file system (why): once
    /// the lane is idle its client ops are failed with ENOSPC and the rest requeued.
    nospace: Option<String>,
    /// A journal or unit write met ENOSPC: nothing new goes to the lane before the next
    /// tick (at most one refused attempt per tick while the file system is full).
    space_wait: bool,
    failed: Option<String>,
    health: Health,
    /// The release watermark the journal holds (the remote has every packet up to it).
    released: Stamp,
    /// The highest watermark handed to the lane, in a batch or on its own.
    released_sent: Stamp,
    /// A job that writes the watermark on its own is on the lane.
    marking: bool,
    /// Largest payload piece journaled as one record (a larger write is split).
    max_part: usize,
    /// The process is stopping: new writes are refused, waiting ones answered with an error.
    stopping: bool,
    window_bytes: usize,
    tick: Duration,
    bytes: u64,
    gate: Option<Arc<CommitGate>>,
    pending: VecDeque<Pending>,
    wake_at: Option<u64>,
    /// Stopping: replies the gate holds are failed instead of kept.
    abandon_held: bool,
    /// Write pacing (`pace_writes`), if on.
    pace: Option<PaceRule>,
    /// The journal logs replicating writes without their data ([`LocalConfig::activity_log`]).
    activity_log: bool,
    pace_stats: PaceStats,
    /// A planned switchover: new writes are refused until then (a lease: the command
    /// that asked renews it or lets it lapse).
    quiesced_until: Option<Instant>,
    /// The initial sync, while one runs (or ran: it then says finished).
    sync: Option<InitialSync>,
    /// The pair state the journal holds (or will, once the lane wrote it).
    state: Option<PairState>,
    /// The `seq` of the copy's last mark (`SyncDone`, `ResyncDone`), until the remote
    /// acknowledged it.
    sync_done: Option<Seq>,
    /// The copy under way is a resync (of dirty regions), not the initial sync.
    resyncing: bool,
    /// Copies planned since start (the initial sync counts), and whether the last one
    /// is a resync: for progress reports.
    copies: u64,
    last_copy_resync: bool,
    /// A resync's first mark (`ResyncBegin` or `Restart`) is stamped and its
    /// `ResyncDone` is not: the remote keeps its units undoable (the resync epoch).
    resync_open: bool,
    /// Tracking since then: writes go to the local unit only, their regions recorded in
    /// `dirty` first; no heartbeat promises anything past the tracking start.
    tracking: Option<Instant>,
    /// The pair tracked after its copy's last mark was stamped: the dirty map holds
    /// regions that copy did not cover, so it is not cleared when the mark is
    /// acknowledged.
    tracked_after_done: bool,
    /// Tracking ended: the resync is planned once no tracking batch is on the lane
    /// (their regions are in the dirty map by then).
    plan_pending: bool,
    /// Tracking batches on the lane.
    tracked_inflight: usize,
    /// The regions the remote misses, write-ahead.
    dirty: Arc<Mutex<Dirty>>,
    track: TrackConfig,
    /// When the remote last answered (anything): the suspend timer runs from here.
    last_ack_at: Instant,
    /// Sequence numbers up to here are reserved durably: none above goes on the wire
    /// before a batch reserving it is synced (restart safety after a power loss).
    reserved: Seq,
    /// A reservation on the lane, not yet durable.
    reserving: Option<Seq>,
    /// Online verify: the `seq` of the last write to each granule of the unit.
    last_writes: LastWrites,
    /// Online verify: the calls under way, and their chunks.
    verify: VerifyState,
    /// This pair's pending nudge: siblings that stamped ask it to promise past their
    /// stamp (see [`Nudge`]).
    nudge: Arc<NudgeBox>,
    /// The other local units stamping from the same hybrid clock, nudged after every
    /// batch this unit stamps if they are idle.
    siblings: Vec<Sibling>,
    /// This unit stamped a batch and has not settled since (`nudge` says so to the
    /// siblings): see [`LocalUnit::settle`].
    busy: bool,
}

/// Asks a local unit to promise at once, with a heartbeat from its own sender, past the
/// time stamp its [`NudgeBox`] holds: a sibling stamped a write there, and the group's
/// commit limit cannot pass that write until this idle pair's head does. At most one is
/// in a unit's mailbox at a time (the box says when to send one). See
/// `tidemark::ship::nudge` for why the answer keeps I1: the promise is made by the
/// pair's own sender, exclusive with its stamping, exactly as a timer heartbeat.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Nudge;

/// A local unit to nudge: its box and its mailbox.
#[derive(Clone)]
pub struct Sibling {
    pub nudge: Arc<NudgeBox>,
    pub addr: Recipient<Nudge>,
}

/// The other local units of this process (they stamp from the same hybrid clock).
#[derive(Message)]
#[rtype(result = "()")]
pub struct SetSiblings(pub Vec<Sibling>);

/// Online verify on the primary (see `tidemark::verify`): each call is cut into chunks
/// of at most [`tv::MAX_SUMS`] regions and [`tv::MAX_CHUNK_BYTES`] bytes; each chunk is
/// read on the lane (one at a time, so client writes go on between them) at the `seq`
/// `W` stamped last when it was handed to the lane, and asked of the remote unit with
/// `W` as its target.
#[derive(Default)]
struct VerifyState {
    next_id: u64,
    calls: std::collections::BTreeMap<u64, VerifyCall>,
    chunks: std::collections::BTreeMap<u64, VerifyChunk>,
    /// Chunks waiting for their lane read, in order.
    to_read: VecDeque<u64>,
    /// A chunk's read is on the lane.
    reading: bool,
}

struct VerifyCall {
    reply: Option<Reply<VerifyOutcome>>,
    outcome: VerifyOutcome,
    /// Chunks not judged yet.
    left: usize,
    deadline: Instant,
    timeout: Duration,
}

struct VerifyChunk {
    call: u64,
    /// Where its regions start in the call's verdicts.
    first: usize,
    req: VerifyRequest,
    ranges: Vec<(Offset, u64)>,
    /// The last write to each region as of `W` (`req.target`).
    at_w: Vec<Seq>,
    local: Option<Vec<u64>>,
    remote: Option<(Seq, Vec<u64>)>,
    /// When the request last went to the remote (`None`: not yet).
    sent_at: Option<Instant>,
}

/// Regions one verify call may name (its chunks are held until answered).
const MAX_VERIFY_REGIONS: u64 = 4096;

/// A chunk's request goes again if no answer came in this long (the datagram, or the
/// answer, may have been lost; the remote answers within its own wait of 1 s).
const VERIFY_RESEND: Duration = Duration::from_millis(1500);

/// The dirty-region map: in a file beside the journal, or in memory when the unit has
/// no journal (tests only).
pub enum Dirty {
    File(DirtyFile),
    Mem(DirtyMap),
}

impl Dirty {
    pub fn map(&self) -> &DirtyMap {
        match self {
            Dirty::File(f) => f.map(),
            Dirty::Mem(m) => m,
        }
    }

    /// Marks `ranges` dirty, durably for a file (write-ahead).
    fn mark(&mut self, ranges: &[(tidemark::Offset, u64)]) -> Result<(), String> {
        match self {
            Dirty::File(f) => f.mark(ranges).map(|_| ()).map_err(|e| e.to_string()),
            Dirty::Mem(m) => {
                for &(o, l) in ranges {
                    m.mark(o, l);
                }
                Ok(())
            }
        }
    }

    fn clear(&mut self) -> Result<(), String> {
        match self {
            Dirty::File(f) => f.clear().map_err(|e| e.to_string()),
            Dirty::Mem(m) => {
                m.clear();
                Ok(())
            }
        }
    }
}

/// When a pair stops shipping writes and tracks dirty regions instead.
#[derive(Clone, Copy, Debug, Default)]
pub struct TrackConfig {
    /// Track once the remote has not answered for this long while something waits for
    /// it (`None`: never on silence alone).
    pub suspend_after: Option<Duration>,
    /// Track when the journal refuses a batch for space (`on_journal_full = "track"`);
    /// otherwise writers wait for it ("block"). A full window alone never tracks: while
    /// the remote answers, writers waiting for its acknowledgements is back-pressure
    /// (the link is slower than the clients), and a remote that stops answering is
    /// `suspend_after`'s case.
    pub on_full: bool,
}

impl TrackConfig {
    fn enabled(&self) -> bool {
        self.on_full || self.suspend_after.is_some()
    }
}

/// How a restarted pair resumes a resync, from its journal and dirty map.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ResyncStart {
    /// Nothing to resync.
    #[default]
    None,
    /// The dirty map holds regions the remote misses: a resync begins (a new epoch).
    Begin,
    /// The journal says `Resyncing`: the remote's epoch is open; copy the map again.
    Continue,
    /// The journal lost packets the remote may hold (power loss): the stream restarts
    /// above the reservation with a `Restart` mark, and the whole unit is copied (the
    /// map was marked all dirty).
    Restart,
}

/// The process is stopping, so that no client waits on anything any more:
/// - replies the commit gate holds are failed (their writes are journaled and will still
///   reach the remote; they are just not acknowledged);
/// - writes not yet journaled (waiting for the window, or for journal space) are failed
///   and never written: the client is told, nothing of them is anywhere;
/// - later writes are refused at once. Flushes still run: they make what was
///   acknowledged durable.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Stopping;

/// Settings of a local unit.
#[derive(Clone, Copy, Debug)]
pub struct LocalConfig {
    pub heartbeat: Duration,
    /// Writers wait while this many bytes are unacknowledged by the remote.
    pub window_bytes: usize,
    pub rtt: (Duration, Duration, Duration),
    pub track: TrackConfig,
    /// The link recovers lost datagrams itself (UDP): see [`Sender::set_link_recovers`].
    pub link_recovers: bool,
    /// Write pacing: hold acknowledgements to keep the lag near the RPO target.
    pub pace: Option<PaceRule>,
    /// The journal records a replicating pair's client writes without their data (an
    /// activity log): the sender holds the data until the remote acknowledges it, and a
    /// restart resyncs the regions logged instead of resending them. Writes of an
    /// initial sync (and the copy's pieces) are journaled with their data as ever.
    pub activity_log: bool,
}

/// Where a restarted local unit stands, from its system's journal.
#[derive(Clone, Debug, Default)]
pub struct LocalResume {
    /// The remote holds everything up to here.
    pub released: Stamp,
    /// Journaled, not yet released: resent.
    pub live: Vec<Packet>,
    /// The pair state the journal recorded (`None`: never recorded).
    pub state: Option<PairState>,
    /// Copy the unit to the remote first (initial sync): where its data lies.
    pub sync: Option<Vec<(Offset, u64)>>,
    /// A resync to begin or continue.
    pub resync: ResyncStart,
    /// Sequence numbers up to here may have been handed out ([`Record::Reserve`]).
    pub reserved: Seq,
    /// Start tracking (writes go to the local unit only, their regions into the dirty
    /// map first) and stay so until the remote answers: a promoted secondary running as
    /// the primary before its failback, whose remote must not receive a write before
    /// the resync that makes it a copy begins.
    pub tracking: bool,
}

/// What a local unit is wired to.
pub struct LocalWiring {
    /// The system the pair's remote unit runs on.
    pub remote_system: SystemId,
    /// Stamps writes (I2): one per process, shared by its local units.
    pub clock: Arc<HybridClock>,
    pub store: Arc<dyn BlockStore>,
    /// The system's journal (`None`: writes are not journaled, tests only).
    pub journal: Option<SharedJournal>,
    /// The unit's own lane: one disk thread, so its batches are journaled and written in
    /// the order they were stamped while several are in flight.
    pub lane: Disk,
    pub link: Recipient<Outbound>,
    /// Replies wait for this gate (commit-wait across primary processes), if any.
    pub gate: Option<Arc<CommitGate>>,
    /// Where the unit reports that its journal or disk failed.
    pub health: Health,
    /// The dirty map, beside the journal (in memory when `None`; tests without one).
    pub dirty: Option<DirtyFile>,
    /// This pair's nudge box, shared with the sibling units that nudge it.
    pub nudge: Arc<NudgeBox>,
}

impl LocalUnit {
    pub fn new(pair: PairId, wiring: LocalWiring, resume: LocalResume, cfg: LocalConfig) -> Self {
        let LocalWiring {
            remote_system,
            clock,
            store,
            journal,
            lane,
            link,
            gate,
            health,
            dirty,
            nudge,
        } = wiring;
        let (initial, min, max) = cfg.rtt;
        let mut sender = Sender::new(
            pair,
            resume.released,
            cfg.heartbeat,
            Rtt::new(initial, min, max),
        );
        sender.set_link_recovers(cfg.link_recovers);
        for p in resume.live {
            sender.push_recovered(p);
        }
        let max_part = journal.as_ref().map_or(MAX_PART, |j| {
            let seg = j.options().segment_size as usize;
            (seg / 4).clamp(MIN_PART, MAX_PART)
        });
        let sync = resume
            .sync
            .as_ref()
            .map(|extents| InitialSync::new(store.size(), extents, max_part as u64));
        let has_sync = sync.is_some();
        let mut queue = Vec::new();
        if sync.is_none() && resume.state.is_none() {
            // No copy: the journal says so, so that a restart does not copy either.
            queue.push(Op::State(PairState::Replicating));
        }
        let dirty = match dirty {
            Some(f) => Dirty::File(f),
            None => Dirty::Mem(
                DirtyMap::new(store.size(), tidemark::dirty::DEFAULT_REGION)
                    .unwrap_or_else(|_| unreachable!("the default region size is valid")),
            ),
        };
        // A resync resumes before any write is stamped: its first mark goes first.
        let (mut resync_open, mut plan_pending) = (false, false);
        if sync.is_none() {
            match resume.resync {
                ResyncStart::None => {}
                ResyncStart::Continue => (resync_open, plan_pending) = (true, true),
                ResyncStart::Begin => {
                    queue.insert(0, Op::Mark(Mark::ResyncBegin, Some(PairState::Resyncing)));
                    (resync_open, plan_pending) = (true, true);
                }
                ResyncStart::Restart => {
                    queue.insert(0, Op::Mark(Mark::Restart, Some(PairState::Resyncing)));
                    (resync_open, plan_pending) = (true, true);
                }
            }
        }
        let tracking = resume.tracking.then(now);
        // Every write before this start has a `seq` at or below the last one recovered
        // (or was tracked, and its region is resynced before the pair replicates again).
        let (store_size, last_seq) = (store.size(), sender.last().seq);
        let state = if tracking.is_some() {
            Some(PairState::Tracking)
        } else {
            resume.state
        };
        LocalUnit {
            pair,
            remote_system,
            sender,
            sent_lag: LagSamples::default(),
            clock,
            store,
            disk: lane,
            link,
            queue,
            inflight: std::collections::VecDeque::new(),
            next_id: 0,
            stalled: Arc::new(AtomicBool::new(false)),
            retry: Vec::new(),
            nospace: None,
            space_wait: false,
            failed: None,
            health,
            released: resume.released,
            released_sent: resume.released,
            marking: false,
            max_part,
            stopping: false,
            journal,
            window_bytes: cfg.window_bytes,
            tick: (cfg.heartbeat / 2).clamp(Duration::from_millis(1), Duration::from_millis(5)),
            bytes: 0,
            gate,
            pending: VecDeque::new(),
            wake_at: None,
            abandon_held: false,
            pace: cfg.pace,
            activity_log: cfg.activity_log,
            pace_stats: PaceStats::default(),
            quiesced_until: None,
            sync,
            state,
            sync_done: None,
            resyncing: false,
            copies: u64::from(has_sync),
            last_copy_resync: false,
            resync_open,
            tracking,
            tracked_after_done: false,
            plan_pending,
            tracked_inflight: 0,
            dirty: Arc::new(Mutex::new(dirty)),
            track: cfg.track,
            last_ack_at: now(),
            reserved: resume.reserved,
            reserving: None,
            last_writes: LastWrites::new(store_size, last_seq),
            verify: VerifyState {
                // Ids of an earlier run of this process must not match new requests.
                next_id: rand::random::<u64>() >> 1,
                ..VerifyState::default()
            },
            nudge,
            siblings: Vec::new(),
            busy: false,
        }
    }

    /// Once the remote acknowledged the copy's last mark (it holds every piece durably),
    /// the journal records the pair as replicating and the dirty map is cleared — unless
    /// the pair tracked after the mark was stamped: the map then holds regions that copy
    /// missed, and a resync follows.
    fn record_synced(&mut self) {
        if let Some(done) = self.sync_done {
            if self.sender.acked() >= done && !self.stopping && self.failed.is_none() {
                self.sync_done = None;
                let kind = if self.resyncing {
                    "resync"
                } else {
                    "initial sync"
                };
                self.resyncing = false;
                if self.tracked_after_done || self.tracking.is_some() {
                    self.tracked_after_done = false;
                    tracing::info!(pair = %self.pair, "{kind}: complete; regions written since are tracked");
                    if !self.resync_open {
                        self.state = Some(PairState::Tracking);
                        self.queue.push(Op::State(PairState::Tracking));
                    }
                    if self.tracking.is_none() {
                        self.begin_resync();
                    }
                } else {
                    tracing::info!(pair = %self.pair, "{kind}: complete");
                    self.state = Some(PairState::Replicating);
                    self.queue.push(Op::Clean);
                }
            }
        }
    }

    /// Adds the next step of the copy (initial sync or resync) to the queue, if one runs
    /// and the window admits it: one step per batch, so client writes and the copy share
    /// the window. The step goes first in the queue, so it is stamped first in its batch:
    /// every write stamped before a piece was then written to the local unit by an
    /// earlier batch of the lane before the piece is read (the lane reads a batch's
    /// pieces before it writes the batch's writes).
    fn add_sync_step(&mut self) {
        if self.stopping || self.failed.is_some() || self.queue.iter().any(Op::is_sync) {
            return;
        }
        if self.sender.unacked_bytes() > self.admit_bytes() {
            return;
        }
        let resync = self.resyncing;
        let Some(sync) = &mut self.sync else {
            return;
        };
        if sync.finished {
            return;
        }
        let kind = if resync { "resync" } else { "initial sync" };
        let mut step = Vec::with_capacity(2);
        if !sync.begun {
            sync.begun = true;
            tracing::info!(pair = %self.pair, bytes = sync.total, "{kind}: starting");
            if !resync {
                self.state = Some(PairState::Syncing);
                step.push(Op::Mark(Mark::SyncBegin, Some(PairState::Syncing)));
            }
        }
        if sync.has_next() {
            step.push(Op::Copy);
        } else {
            sync.finished = true;
            tracing::info!(pair = %self.pair, bytes = sync.total, "{kind}: every piece shipped");
            // `Replicating` is journaled only once the remote acknowledged this mark
            // (`record_synced`): a power loss that tears the copy's last packets off the
            // journal then still finds `Syncing` (`Resyncing`), and copies again.
            step.push(Op::Mark(
                if resync {
                    Mark::ResyncDone
                } else {
                    Mark::SyncDone
                },
                None,
            ));
        }
        self.queue.splice(0..0, step);
    }

    /// Enters tracking (once): from now on writes go to the local unit only, their
    /// regions marked dirty first; heartbeats stop promising anything past now.
    fn enter_tracking(&mut self, why: &str) {
        if self.tracking.is_some() || !self.track.enabled() || self.stopping {
            return;
        }
        tracing::warn!(pair = %self.pair, why, unacked = self.sender.unacked_len(),
            "tracking: writes go on locally, their regions are recorded for a resync");
        self.tracking = Some(now());
        self.plan_pending = false;
        if self.sync_done.is_some() {
            self.tracked_after_done = true;
        }
        // A clean-up not done yet would clear regions tracked from now on: dropped (the
        // resync after this tracking copies those regions again).
        let cleaned = self.queue.len();
        self.queue.retain(|op| !matches!(op, Op::Clean));
        // The journal keeps `syncing` during an initial sync (a restart copies again)
        // and `resyncing` while the remote's resync epoch is open.
        let initial = self.sync.as_ref().is_some_and(|s| !s.finished) && !self.resyncing;
        if (!initial && !self.resync_open) || self.queue.len() < cleaned {
            self.state = Some(PairState::Tracking);
            self.queue.insert(0, Op::State(PairState::Tracking));
        }
    }

    /// The remote answered while tracking: writes are shipped again, behind the resync's
    /// first mark (stamped before any of them, so that the remote learns of the resync no
    /// later than of any write after the tracked ones). The copy is planned once the
    /// tracking batches on the lane have marked their regions.
    fn leave_tracking(&mut self) {
        if self.tracking.take().is_none() {
            return;
        }
        tracing::info!(pair = %self.pair, dirty_bytes = self.dirty_bytes(), "remote answered: resync");
        self.begin_resync();
    }

    /// Queues the resync's first mark (if the remote's epoch is not open already) and
    /// has the copy planned.
    fn begin_resync(&mut self) {
        let initial = self.sync.as_ref().is_some_and(|s| !s.finished) && !self.resyncing;
        if !initial && !self.resync_open {
            self.resync_open = true;
            self.state = Some(PairState::Resyncing);
            let mark = Op::Mark(Mark::ResyncBegin, Some(PairState::Resyncing));
            self.queue.insert(0, mark);
        }
        self.plan_pending = true;
    }

    /// Plans the copy of the dirty regions, once no tracking batch is on the lane: into
    /// the initial sync if one runs, into the resync if one runs, else a new resync.
    fn plan_resync(&mut self) {
        if !self.plan_pending || self.tracked_inflight > 0 || self.tracking.is_some() {
            return;
        }
        self.plan_pending = false;
        let runs = {
            let Ok(d) = self.dirty.lock() else {
                return self.fail("dirty map lock poisoned".into());
            };
            d.map().runs()
        };
        let extents = match self.store.allocated() {
            Ok(e) => e,
            Err(e) => return self.fail(format!("local unit extents for the resync: {e}")),
        };
        match &mut self.sync {
            Some(sync) if !sync.finished => {
                // Holes planned before the tracked writes may hold data now: those
                // parts are read like data (what reads as zeros still ships as zeros).
                for &(o, l) in &runs {
                    sync.written(o, l);
                }
                sync.add(&runs, &extents);
            }
            _ => {
                self.sync = Some(InitialSync::regions(
                    self.store.size(),
                    &runs,
                    &extents,
                    self.max_part as u64,
                ));
                self.resyncing = true;
                self.copies += 1;
                self.last_copy_resync = true;
            }
        }
    }

    /// A copy (initial sync or resync) runs: a full journal or window then makes writers
    /// wait rather than track, so that the copy ends whatever the clients' rate (it would
    /// start over after every tracking spell, and never end while they write faster than
    /// the link carries). The remote going silent still tracks.
    fn copying(&self) -> bool {
        self.sync.as_ref().is_some_and(|s| !s.finished)
            || self.sync_done.is_some()
            || self.resync_open
    }

    fn dirty_bytes(&self) -> u64 {
        self.dirty.lock().map_or(0, |d| d.map().dirty_bytes())
    }

    /// The unit's journal or disk failed: it takes no more writes (they are answered
    /// with `e`), and the engine's health says so, once.
    fn fail(&mut self, e: String) {
        if self.failed.is_none() {
            self.health
                .fail(format!("pair {} local unit", self.pair), &e);
            self.failed = Some(e);
        }
    }

    /// What write pacing's rule sees now ([`tidemark::pace`]).
    fn pace_input(&self) -> PaceInput {
        let (journal_used, journal_size) = self.journal.as_ref().map_or((0, 0), |j| j.fill());
        PaceInput {
            now_ns: self.clock.wall_ns(),
            oldest_unacked_ns: self.sender.oldest_unacked_ts().map(|t| t.0),
            unacked_bytes: self.sender.unacked_bytes() as u64,
            delivery_rate: self.sender.delivery_rate(),
            journal_used,
            journal_size,
        }
    }

    /// Write pacing: the wall-clock time (ns) before which the reply to a write
    /// completing now is not sent (0: at once), counted in the pacing figures.
    fn pace_delay(&mut self) -> u64 {
        let Some(rule) = self.pace else {
            return 0;
        };
        if self.stopping {
            return 0;
        }
        let input = self.pace_input();
        let d = rule.delay(&input);
        self.pace_stats.last = d;
        if d.is_zero() {
            return 0;
        }
        self.pace_stats.paced_writes += 1;
        self.pace_stats.total += d;
        input.now_ns.saturating_add(d.as_nanos() as u64)
    }

    /// Sends every waiting reply the commit gate allows, in order; arranges to be woken
    /// when the first one still waiting is due (a held gate is retried every tick).
    fn release_replies(&mut self, ctx: &mut Context<Self>) {
        while let Some(p) = self.pending.front() {
            let wall = self.clock.wall_ns();
            let verdict = match &self.gate {
                None => Commit::Now,
                Some(g) => g.check(p.ts(), wall),
            };
            // Write pacing holds a reply until its time (never past stopping: the write
            // is journaled, its client may as well hear so).
            let verdict = match verdict {
                Commit::Now if p.not_before > wall && !self.stopping => Commit::At(p.not_before),
                Commit::At(due) if !self.stopping => Commit::At(due.max(p.not_before)),
                v => v,
            };
            match verdict {
                Commit::Now => {
                    if let Some(p) = self.pending.pop_front() {
                        let _ = p.reply.send(Ok(p.stamps));
                    }
                }
                Commit::At(due) => {
                    if self.wake_at.is_none_or(|w| w > due) {
                        self.wake_at = Some(due);
                        let wait = Duration::from_nanos(due.saturating_sub(self.clock.wall_ns()));
                        ctx.run_later(wait, |act, ctx| {
                            act.wake_at = None;
                            act.release_replies(ctx);
                        });
                    }
                    return;
                }
                Commit::Held if self.abandon_held => {
                    for p in self.pending.drain(..) {
                        let err = EngineError::Unit(format!(
                            "{}: stopping while the time base holds acknowledgements",
                            self.pair
                        ));
                        let _ = p.reply.send(Err(err));
                    }
                    return;
                }
                Commit::Held => return,
            }
        }
    }

    /// Starts the next batch if the lane has room and the window too: stamps it, then
    /// journals and writes it on the lane (after every batch stamped before it).
    /// How much may be unacknowledged before writers wait: a few of what the path and
    /// the remote deliver per round trip ([`Sender::delivery_window`]; so writes queue
    /// unstamped at the client, not stamped behind the network or the remote's disk,
    /// and commit lag stays near the path's own delay), never more than `window_bytes`.
    fn admit_bytes(&self) -> usize {
        self.sender.admit_bytes(self.window_bytes)
    }

    fn pump(&mut self, ctx: &mut Context<Self>) {
        if self.inflight.len() >= MAX_IN_FLIGHT || !self.retry.is_empty() || self.space_wait {
            return;
        }
        if self.tracking.is_some() {
            if let Some(e) = &self.failed {
                let e = e.clone();
                for op in self.queue.drain(..) {
                    op.fail(EngineError::Unit(format!("{}: {e}", self.pair)));
                }
                return;
            }
            // A copy's steps and marks wait for the end of tracking (stamped then, ahead
            // of any write shipped after it); the rest goes to the lane now.
            let (keep, ops): (Vec<Op>, Vec<Op>) = std::mem::take(&mut self.queue)
                .into_iter()
                .partition(|op| matches!(op, Op::Copy | Op::Mark(..)));
            self.queue = keep;
            if !ops.is_empty() {
                self.submit_tracked(ops, ctx);
            }
            return;
        }
        self.plan_resync();
        self.add_sync_step();
        if self.queue.is_empty() {
            return;
        }
        if self.sender.unacked_bytes() > self.admit_bytes() && self.failed.is_none() {
            // Writes wait for acknowledgements; a flush need not (it covers only writes
            // already told complete, none of which is queued): it goes ahead alone, so a
            // flush never waits on the remote.
            if self.queue.iter().any(|op| matches!(op, Op::Flush(_))) {
                let (flushes, writes) = std::mem::take(&mut self.queue)
                    .into_iter()
                    .partition(|op| matches!(op, Op::Flush(_)));
                self.queue = writes;
                self.submit_ops(flushes, ctx);
            }
            return;
        }
        if let Some(e) = &self.failed {
            let e = e.clone();
            for op in self.queue.drain(..) {
                op.fail(EngineError::Unit(format!("{}: {e}", self.pair)));
            }
            return;
        }
        let ops = std::mem::take(&mut self.queue);
        self.submit_ops(ops, ctx);
    }

    /// Tracking: hands `ops` to the lane as one batch that marks the regions of its
    /// writes dirty (synced, write-ahead), then writes them to the local unit; nothing is
    /// stamped, journaled or shipped. Its state records are journaled as usual.
    fn submit_tracked(&mut self, ops: Vec<Op>, ctx: &mut Context<Self>) {
        let mut stamps = Vec::with_capacity(ops.len());
        let mut records = Vec::new();
        for op in &ops {
            match op {
                Op::Write(payloads, _) => {
                    // No `seq`: the remote gets these bytes only through a resync.
                    for p in payloads {
                        self.last_writes.record_unknown(p.offset(), p.len());
                    }
                    stamps.push(vec![Stamp::ZERO; payloads.len()]);
                }
                Op::State(state) => {
                    records.push(Record::PairState {
                        pair: self.pair,
                        state: *state,
                    });
                    stamps.push(Vec::new());
                }
                _ => stamps.push(Vec::new()),
            }
        }
        let batch = Batch {
            ops,
            stamps,
            records: Arc::new(records),
            copies: Arc::new(Vec::new()),
            holes: Arc::new(Vec::new()),
            logged: Arc::new(Vec::new()),
            last: None,
            pieces: Vec::new(),
            tracked: true,
            clear_dirty: false,
            reserve: None,
        };
        self.submit(batch, ctx);
    }

    /// Stamps `ops` and hands them to the lane as one batch.
    fn submit_ops(&mut self, ops: Vec<Op>, ctx: &mut Context<Self>) {
        // About one record per payload (plus a reservation): no regrowing per batch.
        let records_hint = ops
            .iter()
            .map(|op| match op {
                Op::Write(ps, _) => ps.len(),
                _ => 2,
            })
            .sum::<usize>();
        let mut records = Vec::with_capacity(records_hint + 1);
        let mut copies = Vec::new();
        let mut holes = Vec::new();
        let mut logged = Vec::new();
        // Logged only where a restart may resync the regions instead: not while the
        // initial sync runs (a restart then copies again, and resends what it journaled).
        // (No state yet and no copy: the pair replicates from its first record on.)
        let log = self.activity_log
            && match self.state {
                Some(PairState::Replicating | PairState::Tracking | PairState::Resyncing) => true,
                None => self.sync.is_none(),
                Some(_) => false,
            };
        let mut stamps = Vec::with_capacity(ops.len());
        let mut pieces = Vec::new();
        let mut clear_dirty = false;
        for op in &ops {
            let mut v = Vec::new();
            // The piece is taken now, after the writes stamped before it told the plan.
            let piece = match op {
                Op::Copy => self.sync.as_mut().and_then(InitialSync::next_piece),
                _ => None,
            };
            pieces.extend(piece);
            match (op, piece) {
                (Op::Copy, Some(Piece::Data { offset, len })) => {
                    // A placeholder until the lane reads the bytes (`Sender::fill_held`).
                    let placeholder = Payload::Zero { offset, len };
                    let stamp = self.sender.push_held(self.clock.now(), placeholder.clone());
                    self.last_writes.record(offset, len, stamp.seq);
                    copies.push(records.len());
                    records.push(Record::Packet(Packet {
                        pair: self.pair,
                        stamp,
                        payload: placeholder,
                    }));
                }
                (Op::Copy, Some(Piece::Hole { offset, len })) => {
                    let payload = Payload::Zero { offset, len };
                    let stamp = self.sender.push_held(self.clock.now(), payload.clone());
                    self.last_writes.record(offset, len, stamp.seq);
                    holes.push(records.len());
                    records.push(Record::Packet(Packet {
                        pair: self.pair,
                        stamp,
                        payload,
                    }));
                }
                // Only one copy step is queued at a time and only it takes pieces, and
                // `add_sync_step` queued it because a piece was left: not reached.
                (Op::Copy, None) => {}
                (Op::Mark(mark, state), _) => {
                    let payload = Payload::Mark(*mark);
                    let stamp = self.sender.push_held(self.clock.now(), payload.clone());
                    records.push(Record::Packet(Packet {
                        pair: self.pair,
                        stamp,
                        payload,
                    }));
                    if let Some(state) = state {
                        records.push(Record::PairState {
                            pair: self.pair,
                            state: *state,
                        });
                    }
                    if matches!(mark, Mark::SyncDone | Mark::ResyncDone) {
                        self.sync_done = Some(stamp.seq);
                    }
                    if *mark == Mark::ResyncDone {
                        self.resync_open = false;
                    }
                }
                (Op::State(state), _) => records.push(Record::PairState {
                    pair: self.pair,
                    state: *state,
                }),
                (Op::Clean, _) => {
                    clear_dirty = true;
                    records.push(Record::PairState {
                        pair: self.pair,
                        state: PairState::Replicating,
                    });
                }
                (Op::Flush(_), _) => {}
                (Op::Write(payloads, _), _) => {
                    for p in payloads {
                        // A hole of the copy not shipped yet must not cover this write.
                        if let (Some(sync), Payload::Write { offset, data }) = (&mut self.sync, p) {
                            sync.written(*offset, data.len() as u64);
                        }
                        // A client learns the stamp of the last piece: its write is complete
                        // as of that stamp.
                        let mut last = None;
                        // One part, the common case, without the `Vec` of `split` (an
                        // allocation per packet).
                        let (mut split, mut whole);
                        let parts: &mut dyn Iterator<Item = Payload> =
                            if p.len() as usize > self.max_part {
                                split = p.clone().split(self.max_part).into_iter();
                                &mut split
                            } else {
                                whole = std::iter::once(p.clone());
                                &mut whole
                            };
                        for part in parts {
                            let stamp = self.sender.push_held(self.clock.now(), part.clone());
                            self.last_writes
                                .record(part.offset(), part.len(), stamp.seq);
                            last = Some(stamp);
                            if log && matches!(part, Payload::Write { .. }) {
                                logged.push(records.len());
                            }
                            records.push(Record::Packet(Packet {
                                pair: self.pair,
                                stamp,
                                payload: part,
                            }));
                        }
                        v.extend(last);
                    }
                }
            }
            stamps.push(v);
        }
        // Restart safety: the batch that stamps past the durable reservation reserves
        // further, synced before any of its packets can leave (a restart after a power
        // loss then never hands out a number the remote may have seen).
        let reserve = (self.sender.last().seq
            > self.reserved.max(self.reserving.unwrap_or_default()))
        .then(|| Seq(self.sender.last().seq.0 + RESERVE_STEP));
        if let Some(r) = reserve {
            self.reserving = Some(r);
            records.push(Record::Reserve {
                pair: self.pair,
                seq: r,
            });
        }
        let batch = Batch {
            ops,
            stamps,
            last: records.iter().rev().find_map(|r| match r {
                Record::Packet(p) => Some(p.stamp.seq),
                _ => None,
            }),
            records: Arc::new(records),
            copies: Arc::new(copies),
            holes: Arc::new(holes),
            logged: Arc::new(logged),
            pieces,
            tracked: false,
            clear_dirty,
            reserve,
        };
        let stamped = batch.last.is_some();
        if stamped && !self.busy {
            self.busy = true;
            self.nudge.set_busy();
        }
        self.submit(batch, ctx);
        if stamped {
            self.nudge_siblings();
        }
    }

    /// After a batch with packets was stamped: asks every idle sibling to promise past
    /// its last stamp, sending a [`Nudge`] to those that have none pending. (A busy one
    /// settles later: see `tidemark::ship::nudge`.)
    fn nudge_siblings(&self) {
        if self.siblings.is_empty() {
            return;
        }
        let ts = self.sender.last().ts;
        tidemark::ship::nudge::before_nudging();
        for s in &self.siblings {
            if s.nudge.wants(ts) {
                s.addr.do_send(Nudge);
            }
        }
    }

    /// Whether ops wait in the queue that will be stamped as packets.
    fn stamping_queued(&self) -> bool {
        self.queue
            .iter()
            .any(|op| matches!(op, Op::Write(..) | Op::Copy | Op::Mark(..)))
    }

    /// A busy unit whose lane holds nothing and which has nothing to stamp settles: it
    /// tells its siblings it is idle (they nudge it from then on), and since a sibling
    /// that stamped meanwhile saw it busy and did not nudge it, it promises past the
    /// newest stamp of the clock at once if its own last stamp is below it.
    fn settle(&mut self) {
        if !self.busy || !self.inflight.is_empty() || self.stamping_queued() {
            return;
        }
        self.busy = false;
        let newest = self.nudge.settle(&self.clock);
        self.promise_past(newest);
    }

    /// Answers a nudge. A busy unit ignores it: it settles later, and then promises past
    /// the clock's newest stamp, at or above the nudge's.
    fn answer_nudge(&mut self) {
        let Some(want) = self.nudge.take() else {
            return;
        };
        if !self.busy {
            self.promise_past(want);
        }
    }

    /// A heartbeat now if this pair's last stamp is below `want` and it may promise (not
    /// tracking, no resync mark owed); nothing if writes wait to be stamped (their
    /// stamps will pass it), or it is stopping or failed (its timer heartbeats go on as
    /// before).
    fn promise_past(&mut self, want: tidemark::Timestamp) {
        if self.stamping_queued()
            || self.stopping
            || self.failed.is_some()
            || self.heartbeat_frozen()
        {
            return;
        }
        let clock = &self.clock;
        if let Some(hb) = self.sender.answer_nudge(now(), want, || clock.now()) {
            self.link.do_send(Outbound {
                to: self.remote_system,
                msg: WireMessage::Heartbeats(vec![hb]),
            });
        }
    }

    /// Hands `batch` to the lane, behind every batch handed to it before.
    fn submit(&mut self, batch: Batch, ctx: &mut Context<Self>) {
        let store = self.store.clone();
        let journal = self.journal.clone();
        let stalled = self.stalled.clone();
        let mut records = (*batch.records).clone();
        let acked = self.sender.acked_stamp();
        if acked.seq > self.released.seq {
            records.push(Record::Released {
                pair: self.pair,
                stamp: acked,
            });
            self.released_sent = self.released_sent.max(acked);
        }
        // A pair state (and the mark beside it) is made durable at once: a restart must
        // never find a state the journal lost the records before.
        let flush = batch
            .ops
            .iter()
            .any(|o| matches!(o, Op::Flush(_) | Op::Mark(..) | Op::State(_) | Op::Clean))
            || batch.reserve.is_some();
        let (copies, holes, logged) = (
            batch.copies.clone(),
            batch.holes.clone(),
            batch.logged.clone(),
        );
        let dirty = self.dirty.clone();
        let (tracked, clear_dirty) = (batch.tracked, batch.clear_dirty);
        let writes: Vec<Payload> = if tracked {
            batch
                .ops
                .iter()
                .filter_map(|op| match op {
                    Op::Write(p, _) => Some(p.iter().cloned()),
                    _ => None,
                })
                .flatten()
                .collect()
        } else {
            Vec::new()
        };
        let job = self.disk.run(move || {
            if stalled.load(Ordering::Acquire) {
                return Outcome::Skipped;
            }
            let outcome = if tracked {
                Self::track_and_write(journal, store, &dirty, records, writes, flush)
            } else if clear_dirty {
                // The remote holds every dirty region: the map is cleared before the
                // journal says replicating (a crash in between resyncs nothing).
                match dirty
                    .lock()
                    .map_err(|_| "poisoned".to_string())
                    .and_then(|mut d| d.clear())
                {
                    Ok(()) => Self::journal_and_write(
                        journal, store, records, &copies, &holes, &logged, flush,
                    ),
                    Err(e) => Outcome::Failed(format!("dirty map: {e}")),
                }
            } else {
                Self::journal_and_write(journal, store, records, &copies, &holes, &logged, flush)
            };
            if !matches!(outcome, Outcome::Done(_)) {
                stalled.store(true, Ordering::Release);
            }
            outcome
        });
        if batch.tracked {
            self.tracked_inflight += 1;
        }
        let id = self.next_id;
        self.next_id += 1;
        self.inflight.push_back(InFlight {
            batch,
            acked,
            outcome: None,
        });
        ctx.spawn(job.into_actor(self).map(move |res, act, ctx| {
            act.landed(
                id,
                res.unwrap_or(Outcome::Failed("disk pool stopped".into())),
                ctx,
            )
        }));
    }

    /// The disk job of a tracking batch: mark the regions of its writes dirty, durably
    /// (write-ahead: a crash after the local write still finds them), then write them to
    /// the local unit; its records (states, a watermark) go to the journal, which never
    /// refuses a batch without packets.
    fn track_and_write(
        journal: Option<SharedJournal>,
        store: Arc<dyn BlockStore>,
        dirty: &Mutex<Dirty>,
        records: Vec<Record>,
        writes: Vec<Payload>,
        flush: bool,
    ) -> Outcome {
        let ranges: Vec<(Offset, u64)> = writes
            .iter()
            .filter(|p| !p.is_empty())
            .map(|p| (p.offset(), p.len()))
            .collect();
        let marked = match dirty.lock() {
            Ok(mut d) => d.mark(&ranges),
            Err(_) => Err("poisoned".into()),
        };
        if let Err(e) = marked {
            return Outcome::Failed(format!("dirty map: {e}"));
        }
        if let Err(o) = Self::reserve(store.as_ref(), writes.iter()) {
            return o;
        }
        for p in &writes {
            if let Err(e) = store.apply(p) {
                return Outcome::Failed(format!("local write: {e}"));
            }
        }
        if let (Some(j), false) = (&journal, records.is_empty()) {
            let durability = if flush {
                Durability::Synced
            } else {
                Durability::Written
            };
            if let Err(e) = j.append(&records, durability) {
                return Outcome::Failed(format!("journal: {e}"));
            }
        }
        if flush {
            if let Err(e) = store.flush() {
                return Outcome::Failed(format!("local flush: {e}"));
            }
        }
        Outcome::Done(Vec::new())
    }

    /// Reserves space on the unit for the writes among `payloads` (zero ranges punch
    /// holes: they need none): `Err(NoSpace)` if the file system is full.
    fn reserve<'a>(
        store: &dyn BlockStore,
        payloads: impl Iterator<Item = &'a Payload>,
    ) -> Result<(), Outcome> {
        for p in payloads {
            if let Payload::Write { offset, data } = p {
                match store.reserve(*offset, data.len() as u64) {
                    Ok(()) => {}
                    Err(e) if e.is_no_space() => {
                        return Err(Outcome::NoSpace(format!("local unit: {e}")))
                    }
                    Err(e) => return Err(Outcome::Failed(format!("local write: {e}"))),
                }
            }
        }
        Ok(())
    }

    /// The disk job of a batch: read its initial-sync pieces, journal it (I3), then write
    /// it to the local unit (the pieces excepted, data and holes: they came from it).
    /// The writes at `logged` are journaled without their data ([`Record::Logged`]),
    /// before the local write all the same: a region the local unit may hold newer than
    /// the remote is always in the journal (or in the dirty map).
    fn journal_and_write(
        journal: Option<SharedJournal>,
        store: Arc<dyn BlockStore>,
        mut records: Vec<Record>,
        copies: &[usize],
        holes: &[usize],
        logged: &[usize],
        flush: bool,
    ) -> Outcome {
        let mut filled = Vec::with_capacity(copies.len());
        for &i in copies {
            let Some(Record::Packet(p)) = records.get_mut(i) else {
                continue;
            };
            let (offset, len) = (p.payload.offset(), p.payload.len());
            let mut buf = vec![0u8; len as usize];
            if let Err(e) = store.read_at(offset, &mut buf) {
                return Outcome::Failed(format!("local read for the initial sync: {e}"));
            }
            // A piece of zeros ships as a zero range: a few bytes on the wire, and a
            // hole (no allocation) at the remote.
            if buf.iter().any(|b| *b != 0) {
                p.payload = Payload::Write {
                    offset,
                    data: Bytes::from(buf),
                };
            }
            filled.push((p.stamp.seq, p.payload.clone()));
        }
        let records = &records[..];
        // Space on the unit first: a full file system refuses the batch before anything
        // of it is journaled (a journaled packet is shipped, whatever the local write
        // does after it).
        let local = records.iter().enumerate().filter_map(|(i, r)| match r {
            Record::Packet(p) if !copies.contains(&i) && !holes.contains(&i) => Some(&p.payload),
            _ => None,
        });
        if let Err(o) = Self::reserve(store.as_ref(), local) {
            return o;
        }
        if let Some(j) = &journal {
            let durability = if flush {
                Durability::Synced
            } else {
                Durability::Written
            };
            let activity = (!logged.is_empty()).then(|| log_without_data(records, logged));
            match j.append(activity.as_deref().unwrap_or(records), durability) {
                Ok(()) => {}
                Err(JournalError::Full { .. }) => return Outcome::Full,
                Err(e) if e.is_no_space() => return Outcome::NoSpace(format!("journal: {e}")),
                Err(e) => return Outcome::Failed(format!("journal: {e}")),
            }
        }
        // In order, one write call per client write, shaped as the client sent it (as the
        // secondary applies them). Not merged into one vectored write per run of
        // adjacent writes: the page cache sizes a file's folios by the write that creates
        // them, and a later small write into a large folio costs in proportion to the
        // folio (ext4 walks every block of it): merged 1 MiB writes made 2 MiB folios,
        // and 4 KiB random writes into them cost the primary ~25 us more each
        // (docs/benchmarks.md, "Cause of the random-write regression").
        for (i, r) in records.iter().enumerate() {
            if let Record::Packet(p) = r {
                if copies.contains(&i) || holes.contains(&i) {
                    continue;
                }
                if let Err(e) = store.apply(&p.payload) {
                    return Outcome::Failed(format!("local write: {e}"));
                }
            }
        }
        if flush {
            if let Err(e) = store.flush() {
                return Outcome::Failed(format!("local flush: {e}"));
            }
        }
        Outcome::Done(filled)
    }

    /// The lane finished batch `id`. Batches are acted on strictly in the order they were
    /// stamped: each done one tells its clients and lets its packets go (I3: journaled
    /// and written locally); a full journal sends it and every later one (skipped by
    /// the lane) round again once the lane is empty.
    fn landed(&mut self, id: u64, outcome: Outcome, ctx: &mut Context<Self>) {
        let first = self.next_id - self.inflight.len() as u64;
        if let Some(f) = id
            .checked_sub(first)
            .and_then(|i| self.inflight.get_mut(i as usize))
        {
            f.outcome = Some(outcome);
        }
        let mut sent = false;
        while self.inflight.front().is_some_and(|f| f.outcome.is_some()) {
            let Some(InFlight {
                batch,
                acked,
                outcome: Some(outcome),
            }) = self.inflight.pop_front()
            else {
                break;
            };
            if batch.tracked {
                self.tracked_inflight -= 1;
            }
            if matches!(outcome, Outcome::Full) && self.track.on_full && !self.copying() {
                // Rather than make writers wait for journal space, track.
                self.enter_tracking("journal full");
            }
            match outcome {
                Outcome::Done(filled) => {
                    self.released = self.released.max(acked);
                    if let Some(r) = batch.reserve {
                        self.reserved = self.reserved.max(r);
                    }
                    for (seq, payload) in filled {
                        if !self.sender.fill_held(seq, payload) {
                            tracing::error!(pair = %self.pair, %seq, "initial sync: a piece was no longer held");
                        }
                    }
                    if let Some(last) = batch.last {
                        self.sender.mark_written(last);
                    }
                    for (op, stamps) in batch.ops.into_iter().zip(batch.stamps) {
                        match op {
                            Op::Write(payloads, reply) => {
                                self.bytes += payloads.iter().map(Payload::len).sum::<u64>();
                                // Tracked writes (zero stamps) replicate later, by a
                                // resync: pacing them would hold nothing back.
                                let shipped = stamps.iter().any(|s| s.seq > Seq::ZERO);
                                let not_before = if shipped { self.pace_delay() } else { 0 };
                                self.pending.push_back(Pending {
                                    reply,
                                    stamps,
                                    not_before,
                                });
                            }
                            // A flush covers the writes already told complete; those
                            // still in commit-wait are not (as NBD says): it need not wait.
                            Op::Flush(reply) => {
                                let _ = reply.send(Ok(()));
                            }
                            Op::Copy | Op::Mark(..) | Op::State(_) | Op::Clean => {}
                        }
                    }
                    sent = true;
                }
                Outcome::NoSpace(e) if self.failed.is_none() => {
                    // Nothing of it is anywhere: it and the batches skipped behind it go
                    // round again once the lane is idle, minus its client ops (ENOSPC).
                    tracing::warn!(pair = %self.pair, error = %e, "no space: the batch's writes are refused");
                    self.released_sent = self.released;
                    self.nospace.get_or_insert(e);
                    self.space_wait = true;
                    self.retry.push(batch);
                }
                Outcome::Full | Outcome::Skipped if self.failed.is_none() => {
                    // Back-pressure: writers wait until acknowledgements free journal
                    // space. The watermark this batch carried was not recorded either.
                    tracing::debug!(pair = %self.pair, "journal full; retrying");
                    self.released_sent = self.released;
                    self.retry.push(batch);
                }
                Outcome::Failed(e) => {
                    self.fail_batch(batch, &e);
                    self.fail(e);
                }
                Outcome::Full | Outcome::Skipped | Outcome::NoSpace(_) => {
                    let e = self.failed.clone().unwrap_or_default();
                    self.fail_batch(batch, &e);
                }
            }
        }
        if sent {
            self.release_replies(ctx);
            self.transmit();
        }
        if self.retry.is_empty() {
            self.pump(ctx);
        } else if self.tracking.is_some() || self.nospace.is_some() {
            // The batches a full journal refused become tracking batches once the lane
            // is done with what it holds.
            self.resubmit(ctx);
        } else {
            // The journal was full. What frees it is the watermark of what the remote
            // acknowledged: record it on its own (never refused for space); the retry
            // follows when it lands (or on the next tick: another unit's watermark may
            // free a shared journal), never at once, which would only spin.
            self.mark_released(ctx);
        }
        self.settle();
    }

    /// Records the acknowledged point in the journal on its own, if no job on the lane
    /// carries it yet. Such a batch has no packet, so the journal never refuses it, and a
    /// journal full of acknowledged packets frees them (I5: a full journal waits only on
    /// acknowledgements, never on new data to carry the watermark).
    fn mark_released(&mut self, ctx: &mut Context<Self>) {
        let acked = self.sender.acked_stamp();
        if self.marking || acked.seq <= self.released_sent.seq || self.failed.is_some() {
            return;
        }
        let Some(journal) = self.journal.clone() else {
            return;
        };
        self.marking = true;
        self.released_sent = acked;
        let rec = [Record::Released {
            pair: self.pair,
            stamp: acked,
        }];
        // Not behind the lane's `stalled` flag: a watermark may go in whatever happened
        // to the data batches before it.
        let job = self
            .disk
            .run(move || journal.append(&rec, Durability::Written));
        ctx.spawn(job.into_actor(self).map(move |res, act, ctx| {
            act.marking = false;
            match res {
                Some(Ok(())) => act.released = act.released.max(acked),
                // Not recorded; tried again from the next tick on.
                Some(Err(e)) if e.is_no_space() => act.space_wait = true,
                Some(Err(e)) => act.fail(format!("journal: {e}")),
                None => act.failed = Some("disk pool stopped".into()),
            }
            act.resubmit(ctx);
        }));
    }

    /// Once the lane is done with everything a full journal refused, hands those batches
    /// to it again, in order (or fails them, if the unit failed); then takes new work.
    fn resubmit(&mut self, ctx: &mut Context<Self>) {
        if !self.inflight.is_empty() || self.marking {
            // `pump` takes no new work while batches wait for a retry.
            self.pump(ctx);
            return;
        }
        self.stalled.store(false, Ordering::Release);
        let mut retry = std::mem::take(&mut self.retry);
        let nospace = self.nospace.take();
        if self.stopping && !retry.is_empty() {
            // Stamped, never journaled, written or sent: the clients are told, and the
            // sender forgets the packets (with the lane idle, every held one is theirs).
            let dropped = self.sender.drop_held();
            tracing::info!(pair = %self.pair, packets = dropped, "stopping: writes a full journal refused are failed");
            for batch in retry {
                self.fail_unjournaled_writes(batch.ops);
            }
        } else if let (Some(e), None) = (&nospace, &self.failed) {
            // The file system had no room for the first refused batch: its writes and
            // flushes are told ENOSPC (nothing of them is anywhere: every held packet
            // is the refused batches', their numbers are handed out again). The unit's
            // own steps and the batches behind it are stamped again, from the next tick.
            self.sender.drop_held();
            self.reserving = None;
            if let Some(first) = retry.first_mut() {
                let err = format!("{}: {e}", self.pair);
                first.ops = std::mem::take(&mut first.ops)
                    .into_iter()
                    .filter_map(|op| match op {
                        Op::Write(..) | Op::Flush(_) => {
                            op.fail(EngineError::NoSpace(err.clone()));
                            None
                        }
                        own => Some(own),
                    })
                    .collect();
            }
            self.requeue(retry);
        } else if self.tracking.is_some() && self.failed.is_none() {
            // Tracking began: the refused batches give their stamps back (never
            // journaled, written or sent: with the lane idle every held packet is theirs)
            // and their ops go to the front of the queue, as tracking writes.
            self.sender.drop_held();
            self.reserving = None;
            self.requeue(retry);
        } else {
            match self.failed.clone() {
                Some(e) => retry.into_iter().for_each(|b| self.fail_batch(b, &e)),
                None => retry.into_iter().for_each(|b| self.submit(b, ctx)),
            }
        }
        self.pump(ctx);
    }

    /// Puts the ops of `batches` (stamped, never journaled, their stamps given back)
    /// back at the front of the queue, in order, undoing what stamping them did: the
    /// copy pieces they took go back to the plan, and the marks they carried are owed
    /// again. A tracking batch goes back whole.
    fn requeue(&mut self, batches: Vec<Batch>) {
        let mut ops = Vec::new();
        for batch in batches {
            if let Some(sync) = &mut self.sync {
                for piece in batch.pieces {
                    sync.put_back(piece);
                }
            }
            for op in batch.ops {
                match &op {
                    Op::Mark(Mark::SyncBegin, _) => {
                        if let Some(sync) = &mut self.sync {
                            sync.begun = false;
                        }
                        continue;
                    }
                    Op::Mark(Mark::SyncDone | Mark::ResyncDone, _) => {
                        if let Some(sync) = &mut self.sync {
                            sync.finished = false;
                        }
                        self.sync_done = None;
                        self.resync_open = self.resyncing;
                        continue;
                    }
                    // The epoch's first mark is owed before anything else is stamped.
                    Op::Mark(Mark::ResyncBegin | Mark::Restart, _) => {}
                    Op::Copy => continue,
                    _ => {}
                }
                ops.push(op);
            }
        }
        self.queue.splice(0..0, ops);
    }

    /// Stopping: answers the writes among `ops` with an error (they were never
    /// journaled, so nothing of them is anywhere) and queues the flushes again.
    /// (Steps of an initial sync are dropped: the journal still says `Syncing`, so the
    /// next start copies again.)
    fn fail_unjournaled_writes(&mut self, ops: Vec<Op>) {
        for op in ops {
            match op {
                Op::Write(_, r) => drop(r.send(Err(EngineError::Unit(
                    "stopping: the write was not journaled and is not written".into(),
                )))),
                Op::Flush(r) => self.queue.push(Op::Flush(r)),
                Op::Copy | Op::Mark(..) | Op::State(_) | Op::Clean => {}
            }
        }
    }

    fn fail_batch(&self, batch: Batch, e: &str) {
        for op in batch.ops {
            op.fail(EngineError::Unit(format!("{}: {e}", self.pair)));
        }
    }

    fn transmit(&mut self) {
        let mut out = Vec::new();
        let re = self.sender.poll_transmit(now(), &mut out);
        if re > 0 {
            tracing::debug!(pair = %self.pair, retransmits = re, rto_us = self.sender.rtt().rto().as_micros() as u64,
                unacked = self.sender.unacked_len(), acked = %self.sender.acked(), "retransmit");
        }
        if !out.is_empty() {
            let wall = self.clock.wall_ns();
            for p in &out {
                self.sent_lag.record(wall.saturating_sub(p.stamp.ts.0));
            }
            self.link.do_send(Outbound {
                to: self.remote_system,
                msg: WireMessage::Data(out),
            });
        }
    }

    fn on_tick(&mut self, ctx: &mut Context<Self>) {
        if !self.pending.is_empty() {
            self.release_replies(ctx);
        }
        if !self.verify.calls.is_empty() {
            self.verify_timers();
        }
        if self.space_wait {
            // The file system was full a tick ago: try again (a watermark first: it may
            // be what frees the journal).
            self.space_wait = false;
            self.released_sent = self.released;
            self.mark_released(ctx);
            self.pump(ctx);
        }
        if !self.retry.is_empty() {
            // Space in a journal shared with other units may come back from their
            // watermarks too: retry every tick while batches wait.
            self.mark_released(ctx);
            self.resubmit(ctx);
        }
        self.transmit();
        self.settle();
        let t = now();
        if let Some(after) = self.track.suspend_after {
            let waiting =
                self.sender.unacked_len() > 0 || !self.queue.is_empty() || !self.retry.is_empty();
            if waiting && self.tracking.is_none() && t.duration_since(self.last_ack_at) > after {
                self.enter_tracking("the remote has not answered for suspend_after_ms");
                self.resubmit(ctx);
            }
        }
        if self.sender.heartbeat_due(t) {
            // While tracking, and until the resync's first mark is stamped, the pair must
            // not promise anything past the tracking start (its head would move the
            // group's limit past writes the remote misses): it only probes, repeating
            // its last stamp, so that the remote's answer says it is back.
            let hb = if self.heartbeat_frozen() {
                self.sender.probe(t)
            } else {
                self.sender.heartbeat(t, self.clock.now())
            };
            self.link.do_send(Outbound {
                to: self.remote_system,
                msg: WireMessage::Heartbeats(vec![hb]),
            });
        }
    }

    /// Whether heartbeats must repeat the last stamp rather than promise a new one:
    /// tracking, or a resync's first mark owed but not stamped yet.
    fn heartbeat_frozen(&self) -> bool {
        self.tracking.is_some()
            || self
                .queue
                .iter()
                .any(|op| matches!(op, Op::Mark(Mark::ResyncBegin | Mark::Restart, _)))
    }
}

/// Online verify.
impl LocalUnit {
    /// `Ok` if the pair replicates: its remote unit then holds, at every `seq` from the
    /// last copy's end on, what the local unit held at that `seq`. Otherwise why not.
    fn verifiable(&self) -> Result<(), String> {
        if let Some(e) = &self.failed {
            return Err(format!("the local unit failed: {e}"));
        }
        if self.stopping {
            return Err("the primary is stopping".into());
        }
        if self.tracking.is_some() {
            return Err("tracking (the remote does not answer)".into());
        }
        if self.copying() || self.plan_pending {
            let what = if self.resyncing || self.resync_open || self.plan_pending {
                "resyncing"
            } else {
                "syncing"
            };
            return Err(what.into());
        }
        // No state recorded yet: a pair without a copy, whose first record says
        // replicating (as status shows it).
        match self.state {
            Some(PairState::Replicating) | None => Ok(()),
            Some(s) => Err(format!("{s:?}").to_lowercase()),
        }
    }

    /// Hands the next chunk to the lane, if none is being read: its regions are read
    /// after every batch stamped so far (up to `W`, the last `seq` stamped) and before
    /// any stamped later; its request goes to the remote unit at once, with `W`.
    fn pump_verify(&mut self, ctx: &mut Context<Self>) {
        while !self.verify.reading {
            let Some(id) = self.verify.to_read.pop_front() else {
                return;
            };
            if !self.verify.chunks.contains_key(&id) {
                continue;
            }
            // Batches a full journal refused are stamped but not written: a read now
            // would miss writes at or below `W`. Busy this time.
            let why = match self.verifiable() {
                Err(why) => Some(why),
                Ok(()) if !self.retry.is_empty() => Some("the journal is full".into()),
                Ok(()) => None,
            };
            if let Some(why) = why {
                self.chunk_busy(id, why);
                continue;
            }
            let w = self.sender.last().seq;
            let Some(chunk) = self.verify.chunks.get_mut(&id) else {
                continue;
            };
            chunk.req.target = w;
            chunk.at_w = chunk
                .ranges
                .iter()
                .map(|&(o, l)| self.last_writes.last(o, l))
                .collect();
            chunk.sent_at = Some(now());
            self.link.do_send(Outbound {
                to: self.remote_system,
                msg: WireMessage::VerifyRequest(chunk.req),
            });
            let ranges = chunk.ranges.clone();
            let store = self.store.clone();
            let stalled = self.stalled.clone();
            self.verify.reading = true;
            let job = self.disk.run(move || {
                // An earlier batch of the lane found the journal full: it wrote
                // nothing, so the unit is not at `W`.
                if stalled.load(Ordering::Acquire) {
                    return Ok(None);
                }
                crate::units::remote::read_sums(store.as_ref(), &ranges).map(Some)
            });
            ctx.spawn(job.into_actor(self).map(move |res, act, ctx| {
                act.verify.reading = false;
                match res {
                    Some(Ok(Some(sums))) => {
                        if let Some(c) = act.verify.chunks.get_mut(&id) {
                            c.local = Some(sums);
                        }
                        act.judge_chunk(id);
                    }
                    Some(Ok(None)) => act.chunk_busy(id, "the journal is full".into()),
                    Some(Err(e)) => act.fail_call_of(
                        id,
                        EngineError::Unit(format!(
                            "{}: verify: cannot read the local unit: {e}",
                            act.pair
                        )),
                    ),
                    None => act.fail_call_of(id, EngineError::Stopped),
                }
                act.pump_verify(ctx);
            }));
        }
    }

    /// Both checksums of chunk `id` are in: each region gets its verdict.
    fn judge_chunk(&mut self, id: u64) {
        let ready = self
            .verify
            .chunks
            .get(&id)
            .is_some_and(|c| c.local.is_some() && c.remote.is_some());
        if !ready {
            return;
        }
        let Some(c) = self.verify.chunks.remove(&id) else {
            return;
        };
        let (Some(local), Some((applied, remote))) = (c.local, c.remote) else {
            return;
        };
        let w = c.req.target;
        let Some(call) = self.verify.calls.get_mut(&c.call) else {
            return;
        };
        for (i, &(o, l)) in c.ranges.iter().enumerate() {
            let (Some(&ls), Some(&rs), Some(&at_w)) = (local.get(i), remote.get(i), c.at_w.get(i))
            else {
                continue;
            };
            let v = tv::judge(ls, rs, w, applied, at_w, self.last_writes.last(o, l));
            if let Some(slot) = call.outcome.verdicts.get_mut(c.first + i) {
                *slot = v;
            }
            if applied == w {
                call.outcome.exact += 1;
            }
        }
        self.chunk_done(c.call);
    }

    /// Chunk `id` could not be checked this time: its regions stay busy, with `why`.
    fn chunk_busy(&mut self, id: u64, why: String) {
        if let Some(c) = self.verify.chunks.remove(&id) {
            if let Some(call) = self.verify.calls.get_mut(&c.call) {
                call.outcome.busy.get_or_insert(why);
            }
            self.chunk_done(c.call);
        }
    }

    fn chunk_done(&mut self, call: u64) {
        let Some(c) = self.verify.calls.get_mut(&call) else {
            return;
        };
        c.left = c.left.saturating_sub(1);
        if c.left == 0 {
            if let Some(mut c) = self.verify.calls.remove(&call) {
                if let Some(r) = c.reply.take() {
                    let _ = r.send(Ok(std::mem::take(&mut c.outcome)));
                }
            }
        }
    }

    /// The call chunk `id` belongs to fails with `e`; its other chunks are dropped.
    fn fail_call_of(&mut self, id: u64, e: EngineError) {
        if let Some(call) = self.verify.chunks.get(&id).map(|c| c.call) {
            self.fail_call(call, e);
        }
    }

    fn fail_call(&mut self, call: u64, e: EngineError) {
        self.verify.chunks.retain(|_, c| c.call != call);
        if let Some(mut c) = self.verify.calls.remove(&call) {
            if let Some(r) = c.reply.take() {
                let _ = r.send(Err(e));
            }
        }
    }

    /// Every tick while a call runs: resend requests not answered for a while, and give
    /// up calls past their deadline (the remote does not answer: never a hang).
    fn verify_timers(&mut self) {
        let t = now();
        for c in self.verify.chunks.values_mut() {
            if c.remote.is_none()
                && c.sent_at
                    .is_some_and(|s| t.duration_since(s) > VERIFY_RESEND)
            {
                c.sent_at = Some(t);
                self.link.do_send(Outbound {
                    to: self.remote_system,
                    msg: WireMessage::VerifyRequest(c.req),
                });
            }
        }
        let late: Vec<(u64, Duration)> = self
            .verify
            .calls
            .iter()
            .filter(|(_, c)| t >= c.deadline)
            .map(|(id, c)| (*id, c.timeout))
            .collect();
        for (call, timeout) in late {
            self.fail_call(
                call,
                EngineError::Timeout(format!(
                    "{}: the secondary system {} did not answer a verify request within {} ms (is it running and reachable?)",
                    self.pair,
                    self.remote_system,
                    timeout.as_millis()
                )),
            );
        }
    }
}

/// What the journal records of a batch whose writes at `logged` (indices of write
/// packets in `records`) it keeps without their data: each such packet becomes a
/// [`Record::Logged`] with the same pair, stamp and region; every other record is kept.
fn log_without_data(records: &[Record], logged: &[usize]) -> Vec<Record> {
    let mut out = records.to_vec();
    for &i in logged {
        if let Some(Record::Packet(Packet {
            pair,
            stamp,
            payload: Payload::Write { offset, data },
        })) = records.get(i)
        {
            out[i] = Record::Logged(Logged {
                pair: *pair,
                stamp: *stamp,
                offset: *offset,
                len: data.len() as u64,
            });
        }
    }
    out
}

impl Handler<VerifyRegions> for LocalUnit {
    type Result = ResponseFuture<Result<VerifyOutcome, EngineError>>;

    fn handle(&mut self, msg: VerifyRegions, ctx: &mut Context<Self>) -> Self::Result {
        let size = self.store.size();
        let VerifyRegions {
            offset,
            region,
            count,
            timeout,
        } = msg;
        if !(tv::MIN_REGION..=tv::MAX_REGION).contains(&region)
            || !region.is_multiple_of(512)
            || !offset.is_multiple_of(512)
            || offset >= size
            || count == 0
            || count > MAX_VERIFY_REGIONS
        {
            let e = EngineError::Config(format!(
                "verify: region {region} (a multiple of 512 from {} to {}), offset {offset} (a multiple of 512 below the unit's {size} bytes), count {count} (1 to {MAX_VERIFY_REGIONS})",
                tv::MIN_REGION,
                tv::MAX_REGION
            ));
            return Box::pin(async move { Err(e) });
        }
        let ranges = tv::regions(Offset(offset), region, count, size);
        let mut outcome = VerifyOutcome {
            verdicts: vec![Verdict::Busy; ranges.len()],
            busy: None,
            exact: 0,
        };
        if let Err(why) = self.verifiable() {
            outcome.busy = Some(why);
            return Box::pin(async move { Ok(outcome) });
        }
        let per_chunk = if region >= tv::MAX_CHUNK_BYTES {
            1
        } else {
            ((tv::MAX_CHUNK_BYTES / region) as usize).clamp(1, tv::MAX_SUMS)
        };
        let call = self.verify.next_id;
        self.verify.next_id += 1;
        let (tx, rx) = oneshot::channel();
        let mut left = 0;
        for (n, part) in ranges.chunks(per_chunk).enumerate() {
            let id = self.verify.next_id;
            self.verify.next_id += 1;
            self.verify.chunks.insert(
                id,
                VerifyChunk {
                    call,
                    first: n * per_chunk,
                    req: VerifyRequest {
                        pair: self.pair,
                        id,
                        offset: part[0].0,
                        region,
                        count: part.len() as u32,
                        target: Seq::ZERO,
                    },
                    ranges: part.to_vec(),
                    at_w: Vec::new(),
                    local: None,
                    remote: None,
                    sent_at: None,
                },
            );
            self.verify.to_read.push_back(id);
            left += 1;
        }
        self.verify.calls.insert(
            call,
            VerifyCall {
                reply: Some(tx),
                outcome,
                left,
                deadline: now() + timeout,
                timeout,
            },
        );
        self.pump_verify(ctx);
        Box::pin(async move { rx.await.unwrap_or(Err(EngineError::Stopped)) })
    }
}

impl Handler<VerifySumsIn> for LocalUnit {
    type Result = ();

    fn handle(&mut self, msg: VerifySumsIn, _: &mut Context<Self>) {
        let s = msg.0;
        let Some(c) = self.verify.chunks.get_mut(&s.id) else {
            // An answer to a resent request, or to a call given up: nothing waits.
            return;
        };
        if c.remote.is_some() || c.sent_at.is_none() {
            return;
        }
        match s.result {
            SumsResult::Sums(sums) if sums.len() == c.ranges.len() => {
                c.remote = Some((s.applied, sums));
                self.judge_chunk(s.id);
            }
            SumsResult::Sums(sums) => {
                let e = EngineError::Unit(format!(
                    "{}: verify: the secondary answered {} checksums for {} regions",
                    self.pair,
                    sums.len(),
                    c.ranges.len()
                ));
                self.fail_call_of(s.id, e);
            }
            SumsResult::Refused(tv::Refusal::Inconsistent) => {
                self.chunk_busy(s.id, tv::Refusal::Inconsistent.to_string());
            }
            SumsResult::Refused(r) => {
                let e = EngineError::Unit(format!("{}: verify: {r}", self.pair));
                self.fail_call_of(s.id, e);
            }
        }
    }
}

impl Handler<Repair> for LocalUnit {
    type Result = ResponseFuture<Result<(), EngineError>>;

    /// Marks the ranges dirty (durably, on the lane, as a tracked write would), then
    /// starts a resync of the dirty map: `ResyncBegin`, the regions copied in stamp
    /// order, `ResyncDone`; the remote keeps its last cut recoverable meanwhile (the
    /// resync epoch). The plan of the copy waits for the marking (it counts as a
    /// tracking batch on the lane).
    fn handle(&mut self, msg: Repair, ctx: &mut Context<Self>) -> Self::Result {
        let size = self.store.size();
        let ranges = msg.0;
        if let Some(e) = ranges.iter().find_map(|&(o, l)| check(size, o, l).err()) {
            return Box::pin(async move { Err(EngineError::Store(e)) });
        }
        let busy = match self.verifiable() {
            Err(why) => Some(why),
            Ok(()) if !self.retry.is_empty() => Some("the journal is full".into()),
            // A clean-up of the map not on the lane yet would clear these regions too.
            Ok(()) if self.queue.iter().any(|op| matches!(op, Op::Clean)) => {
                Some("finishing a resync".into())
            }
            Ok(()) => None,
        };
        if let Some(why) = busy {
            let e = EngineError::Busy(format!(
                "{}: cannot repair now: the pair is {why}; try again once it replicates",
                self.pair
            ));
            return Box::pin(async move { Err(e) });
        }
        if ranges.is_empty() {
            return Box::pin(async { Ok(()) });
        }
        let bytes: u64 = ranges.iter().map(|r| r.1).sum();
        let dirty = self.dirty.clone();
        self.tracked_inflight += 1;
        let marked = ranges.clone();
        let job = self.disk.run(move || match dirty.lock() {
            Ok(mut d) => d.mark(&marked),
            Err(_) => Err("poisoned".into()),
        });
        let (tx, rx) = oneshot::channel();
        ctx.spawn(job.into_actor(self).map(move |res, act, ctx| {
            act.tracked_inflight -= 1;
            let r = match res {
                Some(Ok(())) => {
                    tracing::info!(pair = %act.pair, ranges = ranges.len(), bytes, "verify: repair: regions marked dirty; resync");
                    // Tracking since, or a resync to plan: that plan covers these
                    // regions (it waited for this marking). Otherwise a resync begins.
                    if act.tracking.is_none() && !act.plan_pending && !act.copying() {
                        act.begin_resync();
                    }
                    act.pump(ctx);
                    Ok(())
                }
                Some(Err(e)) => {
                    act.fail(format!("dirty map: {e}"));
                    Err(EngineError::Unit(format!("{}: dirty map: {e}", act.pair)))
                }
                None => Err(EngineError::Stopped),
            };
            let _ = tx.send(r);
        }));
        Box::pin(async move { rx.await.unwrap_or(Err(EngineError::Stopped)) })
    }
}

impl Actor for LocalUnit {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.run_interval(self.tick, |act, ctx| act.on_tick(ctx));
        // An initial sync, or the first state record, needs no client to start.
        self.pump(ctx);
    }
}

impl Handler<Write> for LocalUnit {
    type Result = ResponseFuture<Result<Vec<Stamp>, EngineError>>;

    fn handle(&mut self, msg: Write, ctx: &mut Context<Self>) -> Self::Result {
        // Range-check everything first: a bad request changes nothing.
        let size = self.store.size();
        if let Some(e) = msg
            .0
            .iter()
            .find_map(|p| check(size, p.offset(), p.len()).err())
        {
            return Box::pin(async move { Err(EngineError::Store(e)) });
        }
        if self.stopping {
            return Box::pin(async { Err(EngineError::Stopped) });
        }
        if let Some(until) = self.quiesced_until {
            if now() < until {
                let pair = self.pair;
                return Box::pin(async move { Err(EngineError::Quiesced(pair.to_string())) });
            }
            tracing::warn!(pair = %self.pair, "quiesce lapsed: writes are taken again");
            self.quiesced_until = None;
        }
        let (tx, rx) = oneshot::channel();
        self.queue.push(Op::Write(msg.0, tx));
        self.pump(ctx);
        Box::pin(async move { rx.await.unwrap_or(Err(EngineError::Stopped)) })
    }
}

impl Handler<Nudge> for LocalUnit {
    type Result = ();

    fn handle(&mut self, _: Nudge, _: &mut Context<Self>) {
        self.answer_nudge();
    }
}

impl Handler<SetSiblings> for LocalUnit {
    type Result = ();

    fn handle(&mut self, msg: SetSiblings, _: &mut Context<Self>) {
        self.siblings = msg.0;
    }
}

impl Handler<Stopping> for LocalUnit {
    type Result = ();

    fn handle(&mut self, _: Stopping, ctx: &mut Context<Self>) {
        self.abandon_held = true;
        self.stopping = true;
        self.release_replies(ctx);
        let queued = std::mem::take(&mut self.queue);
        self.fail_unjournaled_writes(queued);
        // Batches a full journal refused are failed once the lane is done with them.
        self.resubmit(ctx);
    }
}

impl Handler<Flush> for LocalUnit {
    type Result = ResponseFuture<Result<(), EngineError>>;

    fn handle(&mut self, _: Flush, ctx: &mut Context<Self>) -> Self::Result {
        let (tx, rx) = oneshot::channel();
        self.queue.push(Op::Flush(tx));
        self.pump(ctx);
        Box::pin(async move { rx.await.unwrap_or(Err(EngineError::Stopped)) })
    }
}

impl Handler<AcksIn> for LocalUnit {
    type Result = ();

    fn handle(&mut self, msg: AcksIn, ctx: &mut Context<Self>) {
        let t = now();
        for ack in &msg.0 {
            self.sender.handle_ack(t, ack);
        }
        self.last_ack_at = t;
        self.leave_tracking();
        self.record_synced();
        // Acknowledgements open the congestion window and reveal losses: send at once.
        self.transmit();
        self.pump(ctx);
        if self.inflight.is_empty() || !self.retry.is_empty() {
            // No batch on the lane carries the watermark: record it on its own, so space
            // comes back (and a restart resends less) when writes have stopped or the
            // journal is full.
            self.mark_released(ctx);
        }
    }
}

impl Handler<GetLocalStats> for LocalUnit {
    type Result = MessageResult<GetLocalStats>;

    fn handle(&mut self, _: GetLocalStats, _: &mut Context<Self>) -> Self::Result {
        let s = self.sender.stats();
        let mut sent = self.sent_lag.samples().to_vec();
        MessageResult(LocalStats {
            last: self.sender.last(),
            acked: self.sender.acked(),
            unacked: self.sender.unacked_len(),
            packets: s.packets,
            retransmits: s.retransmits,
            timeouts: s.timeouts,
            lost: s.lost,
            spurious: s.spurious,
            heartbeats: s.heartbeats,
            bytes: self.bytes,
            srtt_us: self.sender.rtt().srtt().map(|d| d.as_micros() as u64),
            state: if self.tracking.is_some() {
                Some(PairState::Tracking)
            } else {
                self.state
            },
            sync: self.sync.as_ref().map(|s| SyncStats {
                resync: self.last_copy_resync,
                copy: self.copies,
                ..s.stats()
            }),
            dirty_bytes: self.dirty_bytes(),
            pacing: self.pace.map(|rule| PacingStats {
                delay_now: rule.delay(&self.pace_input()),
                last_delay: self.pace_stats.last,
                paced_writes: self.pace_stats.paced_writes,
                delay_total: self.pace_stats.total,
            }),
            quiesced: self.quiesced_until.is_some_and(|u| now() < u),
            waiting_writes: self
                .queue
                .iter()
                .filter(|op| matches!(op, Op::Write(..)))
                .count()
                + self
                    .retry
                    .iter()
                    .chain(self.inflight.iter().map(|f| &f.batch))
                    .flat_map(|b| b.ops.iter())
                    .filter(|op| matches!(op, Op::Write(..)))
                    .count()
                + self.pending.len(),
            sent_lag_p50_us: crate::units::lag::percentile(&mut sent.clone(), 50.0) / 1000,
            sent_lag_p99_us: crate::units::lag::percentile(&mut sent, 99.0) / 1000,
            unacked_bytes: self.sender.unacked_bytes() as u64,
            admit_bytes: self.admit_bytes() as u64,
        })
    }
}

impl Handler<Quiesce> for LocalUnit {
    type Result = ();

    fn handle(&mut self, msg: Quiesce, _: &mut Context<Self>) {
        match msg.until {
            Some(until) => {
                if self.quiesced_until.is_none() {
                    tracing::warn!(pair = %self.pair, "quiesced: new writes are refused (ESHUTDOWN) for a planned switchover");
                }
                self.quiesced_until = Some(until);
            }
            None => {
                if self.quiesced_until.take().is_some() {
                    tracing::info!(pair = %self.pair, "quiesce lifted: writes are taken again");
                }
            }
        }
    }
}

impl Handler<Stop> for LocalUnit {
    type Result = ();
    fn handle(&mut self, _: Stop, ctx: &mut Context<Self>) {
        ctx.stop();
    }
}
