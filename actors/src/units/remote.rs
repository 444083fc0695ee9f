//! `RemoteUnit`: receives one pair's packets in any order, tracks the run head, reports it
//! to the orderer whenever it moves, acknowledges what it holds, and applies what the
//! released commit limit allows, in `seq` order, off the actor thread.
//!
//! I1 on this unit: after applying under limit `L` the unit holds exactly the pair's
//! writes with `ts <= L` (the run from the applied point, cut at the first `ts > L`).
//!
//! **Resync** (`docs/design.md`, the resync epoch). The unit reports the pair's resync
//! with every head report ([`tidemark::undo::ResyncStatus`]): from the report whose head
//! includes the `ResyncBegin` mark (the status is worked out from the packets that
//! joined the run before the report is sent, so the orderer never learns of a head past
//! the mark without the resync) until it applied past the `ResyncDone` mark. While its
//! site's epoch (base `E`) is open, before it applies a packet stamped above `E` it
//! saves the regions that packet overwrites and that are not saved yet in its undo file
//! ([`crate::units::undo`]): packets at or below `E` of a batch first, then the saves
//! (one fdatasync), then the rest. If the save fails (ENOSPC or any error) the unit
//! stops applying and reports to the engine's health: the remote stays at or below the
//! cut at `E`, never applies without the save, never spins.

use crate::error::EngineError;
use crate::health::Health;
use crate::msg::*;
use crate::units::disk::Disk;
use crate::units::journaling::{Durability, SharedJournal};
use crate::units::lag::{LagSamples, LagStages};
use crate::units::undo::{UndoFile, UndoFileError};
use actix::prelude::*;
use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tidemark::journal::{Epoch, JournalError, PairState, Record};
use tidemark::run::RunTracker;
use tidemark::undo::ResyncStatus;
use tidemark::verify::{Refusal, SumsResult, VerifyRequest, VerifySums};
use tidemark::Mark;
use tidemark::{
    BlockStore, HeadReport, Heartbeat, Intake, Message as WireMessage, Packet, PairId, Resync, Seq,
    Stamp,
};
use tidemark::{SystemId, Timestamp};
use tokio::sync::oneshot;

/// What a remote unit tells an observer after applying under a limit.
pub struct Applied<'a> {
    pub pair: PairId,
    /// The limit the selection was made under.
    pub limit: Timestamp,
    /// The last packet applied (the unit holds exactly the writes up to it).
    pub applied: Stamp,
    pub store: &'a dyn BlockStore,
}

/// Called on the remote unit's thread after every application of a limit; tests use it
/// to check each unit against the write history (I1), the demo to count.
pub type ApplyHook = Arc<dyn Fn(&Applied<'_>) + Send + Sync>;

/// Where a restarted remote unit stands, from its system's journal.
#[derive(Clone, Debug, Default)]
pub struct RemoteResume {
    /// Applied (and flushed) up to here.
    pub applied: Stamp,
    /// Journaled, not yet applied.
    pub live: Vec<Packet>,
    /// The durable commit limit: applied at once (I4: recovery re-applies up to it).
    pub limit: Timestamp,
    /// The pair state the journal recorded.
    pub state: Option<PairState>,
    /// The highest limit the system prepared (with several remote systems): with
    /// `limit`, a floor for the head's time stamp after a restart (every packet of the
    /// pair stamped at or below it was journaled before it was announced).
    pub prepared: Timestamp,
    /// The resync epoch the system's journal holds open.
    pub epoch: Option<Epoch>,
}

/// Settings and wiring of a remote unit.
pub struct RemoteWiring {
    pub local_system: SystemId,
    pub orderer_system: SystemId,
    pub store: Arc<dyn BlockStore>,
    pub journal: Option<SharedJournal>,
    pub disk: Disk,
    pub link: Recipient<Outbound>,
    pub hook: Option<ApplyHook>,
    pub wall: Wall,
    /// Bytes of received, unapplied packets this unit may keep in the journal.
    pub budget: usize,
    /// Where the unit reports that its journal or disk failed.
    pub health: Health,
    /// Where its undo file lives (`None`: no undo log; tests without a journal only).
    pub undo_dir: Option<PathBuf>,
    /// Undo region size (bytes, a multiple of 512; [`tidemark::undo::DEFAULT_REGION`]).
    pub undo_region: u64,
}

/// How long a verify request waits for the unit to apply up to its target before it is
/// answered at whatever the unit applied by then (the primary then judges each region
/// by the writes in between, `tidemark::verify::comparable`).
const VERIFY_WAIT: Duration = Duration::from_secs(1);
/// Verify requests queued at most; more are dropped (the primary resends).
const VERIFY_QUEUE: usize = 16;

/// A verify request waiting for its turn.
struct QueuedVerify {
    from: SystemId,
    req: VerifyRequest,
    /// Answered at whatever is applied once this passes.
    due: Instant,
}

/// The unit's undo file as the disk jobs see it (one job in flight at a time).
#[derive(Default)]
struct UndoSlot {
    file: Option<UndoFile>,
}

pub struct RemoteUnit {
    pair: PairId,
    local_system: SystemId,
    orderer_system: SystemId,
    /// The run tracker, the flow control, and what goes to the journal when: a pair's
    /// packets are journaled in `seq` order only, those above a gap are held in memory
    /// until it closes (so the journal can always reclaim what is applied, I5).
    intake: Intake,
    store: Arc<dyn BlockStore>,
    journal: Option<SharedJournal>,
    /// Applied to the unit but not yet flushed and recorded in the journal.
    unflushed: bool,
    /// Bytes applied since the applied point was last recorded.
    unrecorded_bytes: usize,
    recording: bool,
    budget: usize,
    /// Received while the unit was failed: dropped (the intake counts its own drops).
    failed_dropped: u64,
    disk: Disk,
    link: Recipient<Outbound>,
    limit: Timestamp,
    /// The limit the unit last finished applying under.
    applied_limit: Timestamp,
    applying: bool,
    reported: Stamp,
    waiters: Vec<(Seq, oneshot::Sender<Result<(), EngineError>>)>,
    hook: Option<ApplyHook>,
    wall: Wall,
    lag: LagSamples,
    /// The age of writes at each step before they are applied (where the lag goes).
    stages: LagStages,
    applying_ts: Vec<Timestamp>,
    applies: u64,
    limit_violations: u64,
    /// The journal or the disk failed: the unit applies and journals nothing more, and
    /// the engine's health says why.
    failed: Option<String>,
    health: Health,
    /// The pair state, as marks in the stream set it (see [`crate::units::sync`]).
    state: Option<PairState>,
    /// The resync the unit reports with its head.
    resync: ResyncStatus,
    /// The head the resync status was last brought up to.
    scanned: Stamp,
    /// The site's epoch, as the last limit said (or the journal at start).
    epoch: Option<Epoch>,
    undo_dir: Option<PathBuf>,
    undo_region: u64,
    undo: Arc<Mutex<UndoSlot>>,
    /// The epoch base the undo file on disk is for (`None`: no file), as the last disk
    /// job left it.
    undo_base: Option<Timestamp>,
    undo_bytes: u64,
    /// Something found at start that stops the unit (reported once it runs).
    init_error: Option<String>,
    /// Online verify: requests waiting, oldest first.
    verifies: VecDeque<QueuedVerify>,
    /// A verify read is on the disk pool: nothing is applied meanwhile, so the read sees
    /// the unit at exactly its applied point.
    verifying: bool,
}

impl RemoteUnit {
    pub fn new(pair: PairId, w: RemoteWiring, resume: RemoteResume) -> Self {
        let mut intake = Intake::new(RunTracker::new(pair, resume.applied), w.budget);
        for p in resume.live {
            intake.handle_durable(p);
        }
        // A restart loses the heartbeat part of the head: raise it again to the durable
        // limit. Every packet of the pair stamped at or below that limit was journaled
        // before the limit was announced, so it is in the run: nothing newer than the
        // run head exists as of the floor (what a heartbeat says). Without it the
        // orderer could see a head below a limit it released, and open an epoch below
        // what the units applied.
        let floor = resume.limit.max(resume.prepared);
        let head = intake.tracker().head();
        if floor > head.ts {
            intake.handle_heartbeat(Heartbeat {
                pair,
                stamp: Stamp::new(floor, head.seq),
            });
        }
        let mut init_error = None;
        let mut undo = UndoSlot::default();
        let mut undo_status = None;
        if let Some(dir) = &w.undo_dir {
            match Self::reopen_undo(dir, pair, resume.epoch, w.store.size()) {
                Ok((file, status)) => {
                    undo.file = file;
                    undo_status = status;
                }
                Err(e) => init_error = Some(e),
            }
        }
        let run: Vec<Packet> = intake.tracker().run().cloned().collect();
        let resync = ResyncStatus::recover(
            undo_status,
            resume.epoch,
            floor,
            intake.tracker().applied(),
            &run,
        );
        let undo_base = undo.file.as_ref().map(UndoFile::base);
        let undo_bytes = undo.file.as_ref().map_or(0, UndoFile::bytes);
        let scanned = intake.tracker().head();
        RemoteUnit {
            pair,
            local_system: w.local_system,
            orderer_system: w.orderer_system,
            intake,
            store: w.store,
            journal: w.journal,
            unflushed: false,
            unrecorded_bytes: 0,
            recording: false,
            budget: w.budget,
            failed_dropped: 0,
            disk: w.disk,
            link: w.link,
            limit: resume.limit,
            applied_limit: Timestamp::ZERO,
            applying: false,
            reported: Stamp::ZERO,
            waiters: Vec::new(),
            hook: w.hook,
            wall: w.wall,
            lag: LagSamples::default(),
            stages: LagStages::default(),
            applying_ts: Vec::new(),
            applies: 0,
            limit_violations: 0,
            failed: None,
            health: w.health,
            state: resume.state,
            resync,
            scanned,
            epoch: resume.epoch,
            undo_dir: w.undo_dir,
            undo_region: w.undo_region,
            undo: Arc::new(Mutex::new(undo)),
            undo_base,
            undo_bytes,
            init_error,
            verifies: VecDeque::new(),
            verifying: false,
        }
    }

    /// At start: the undo file to go on with, if the system's epoch is open and the
    /// file is of it (the torn tail cut), with the resync status it recorded. A file of
    /// no open epoch, or of another base, is of an epoch that closed (the site replaces
    /// its epoch only once the old one closed): removed. A file `promote` restored means
    /// the unit was rolled back: the unit refuses to run (replication cannot resume on
    /// a unit set back behind its journal's applied point).
    fn reopen_undo(
        dir: &std::path::Path,
        pair: PairId,
        epoch: Option<Epoch>,
        size: u64,
    ) -> Result<(Option<UndoFile>, Option<Resync>), String> {
        let opened = UndoFile::reopen(dir, pair, size).map_err(|e| e.to_string())?;
        match (opened, epoch) {
            (None, _) => Ok((None, None)),
            (Some((_, d)), _) if tidemark::undo::is_restored(&d.records) => Err(format!(
                "promote rolled this remote unit back to the cut at {} (undo file {}): \
                 it cannot resume replication; start it from a fresh copy",
                d.header.base,
                crate::units::undo::undo_path(dir, pair).display()
            )),
            (Some((file, d)), Some(e)) if file.base() == e.base => {
                Ok((Some(file), tidemark::undo::last_status(&d.records)))
            }
            (Some(_), _) => {
                UndoFile::remove(dir, pair).map_err(|e| e.to_string())?;
                Ok((None, None))
            }
        }
    }

    /// The resync status follows the packets that joined the run since the last call.
    fn scan_head(&mut self) {
        let head = self.intake.tracker().head();
        if head.seq > self.scanned.seq {
            let from = self.scanned.seq;
            let joined = self
                .intake
                .tracker()
                .run()
                .filter(|p| p.stamp.seq > from && p.stamp.seq <= head.seq);
            self.resync.joined(self.scanned, joined);
        }
        self.scanned = head;
    }

    /// Makes the queued packets durable in the journal, one batch in flight; only then
    /// do they count in the head and get acknowledged cumulatively (I3).
    fn journal_incoming(&mut self, ctx: &mut Context<Self>) {
        if self.failed.is_some() {
            return;
        }
        let Some(journal) = self.journal.clone() else {
            return;
        };
        let Some(batch) = self.intake.take_batch() else {
            return;
        };
        let now = (self.wall)();
        for p in &batch {
            self.stages.batched.record(now.saturating_sub(p.stamp.ts.0));
        }
        let records: Vec<Record> = batch.iter().cloned().map(Record::Packet).collect();
        let queued = std::time::Instant::now();
        let job = self.disk.run(move || {
            let t = std::time::Instant::now();
            let r = journal.append(&records, Durability::Synced);
            (r, t.elapsed(), t.saturating_duration_since(queued))
        });
        ctx.spawn(job.into_actor(self).map(move |res, act, ctx| {
            let res = res.map(|(r, took, waited)| {
                act.stages.journal_sync.record(took.as_nanos() as u64);
                act.stages.journal_queue.record(waited.as_nanos() as u64);
                r
            });
            match res {
                Some(Ok(())) => {
                    let now = (act.wall)();
                    for p in &batch {
                        act.stages.durable.record(now.saturating_sub(p.stamp.ts.0));
                    }
                    act.intake.journaled(batch);
                    act.answer();
                    act.apply(ctx);
                }
                // Not durable: the packet the head waits for is dropped, unacknowledged,
                // and the primary resends it; the rest stays held in memory. A full
                // journal is back-pressure (it frees as the unit applies), not a fault:
                // counted with the flow-control drops, not logged each time.
                Some(Err(JournalError::Full { .. })) => act.intake.refused(batch),
                Some(Err(e)) => {
                    act.intake.refused(batch);
                    act.fail(format!("journal: {e}"));
                }
                None => act.intake.refused(batch),
            }
            act.journal_incoming(ctx);
        }));
    }

    /// Acknowledge what is held, and report the head if it moved.
    fn answer(&mut self) {
        self.link.do_send(Outbound {
            to: self.local_system,
            msg: WireMessage::Acks(vec![self.intake.tracker().ack()]),
        });
        self.scan_head();
        let head = self.intake.tracker().head();
        if head != self.reported {
            self.reported = head;
            self.link.do_send(Outbound {
                to: self.orderer_system,
                msg: WireMessage::Heads(vec![HeadReport {
                    pair: self.pair,
                    head,
                    resync: self.resync.get(),
                }]),
            });
        }
    }

    /// The unit's journal or disk failed: it stops, and the engine's health says so, once.
    /// Whoever waits for an apply is told at once.
    fn fail(&mut self, e: String) {
        if self.failed.is_none() {
            self.health
                .fail(format!("pair {} remote unit", self.pair), &e);
            for (_, tx) in self.waiters.drain(..) {
                let _ = tx.send(Err(EngineError::Unit(format!("{}: {e}", self.pair))));
            }
            self.failed = Some(e);
        }
    }

    /// Applies what the limit allows, one batch in flight.
    fn apply(&mut self, ctx: &mut Context<Self>) {
        if self.applying || self.verifying || self.failed.is_some() {
            return;
        }
        let want_undo = match (&self.undo_dir, self.epoch) {
            (Some(_), Some(e)) => Some(e.base),
            _ => None,
        };
        if self.limit <= self.applied_limit {
            if want_undo != self.undo_base {
                // The epoch changed (closed, most often) with nothing to apply.
                self.run_apply(ctx, self.limit, Vec::new(), want_undo, false);
            }
            return;
        }
        let limit = self.limit;
        if self.intake.tracker().limit_violated(limit) {
            // The orderer released a limit beyond this unit's head: I1 would break.
            self.limit_violations += 1;
            tracing::error!(pair = %self.pair, %limit, head = %self.intake.tracker().head(),
                "commit limit beyond this unit's run head; applying only the run");
        }
        let mut batch: Vec<Packet> = self.intake.tracker().select(limit).cloned().collect();
        // A verify request waiting for the unit to reach its target: stop there, so that
        // it reads the unit at exactly the primary's point (not a cut of the group, only
        // a pause within this application; the rest follows at once).
        let applied = self.intake.tracker().applied().seq;
        let partial = match self.verifies.front().map(|v| v.req.target) {
            Some(target)
                if target > applied && batch.last().is_some_and(|p| p.stamp.seq > target) =>
            {
                batch.retain(|p| p.stamp.seq <= target);
                true
            }
            _ => false,
        };
        self.applying_ts = batch.iter().map(|p| p.stamp.ts).collect();
        let now = (self.wall)();
        for ts in &self.applying_ts {
            self.stages.selected.record(now.saturating_sub(ts.0));
        }
        if batch.is_empty() && want_undo == self.undo_base {
            self.finish(limit, None, partial);
            return;
        }
        self.run_apply(ctx, limit, batch, want_undo, partial);
    }

    /// Applies `batch` under `limit` on the disk pool, with the undo file brought to
    /// the epoch `want_undo` first (created, replaced or removed) and the saves made
    /// before anything above the base is applied. `partial`: the batch stops short of
    /// what `limit` allows (for a verify read): `limit` is not done yet.
    fn run_apply(
        &mut self,
        ctx: &mut Context<Self>,
        limit: Timestamp,
        batch: Vec<Packet>,
        want_undo: Option<Timestamp>,
        partial: bool,
    ) {
        let batch_bytes: usize = batch.iter().map(|p| p.payload.wire_len()).sum();
        self.applying = true;
        let store = self.store.clone();
        let journal = self.journal.clone();
        let pair = self.pair;
        // The resync status the marks of this batch leave (only if it applies one).
        let status = batch
            .iter()
            .any(|p| matches!(p.payload.mark(), Some(Mark::ResyncBegin | Mark::ResyncDone)))
            .then(|| {
                self.resync
                    .applied_view(batch.last().map_or(Seq::ZERO, |p| p.stamp.seq))
            });
        let undo = self.undo.clone();
        let undo_dir = self.undo_dir.clone();
        let region = self.undo_region;
        // The writes go to the unit only (no flush): the applied point is recorded in
        // the journal later, by `record_applied`, once a flush made them durable; until
        // then the journal keeps their packets and recovery re-applies them (I4).
        // A `SyncBegin` mark makes the unit inconsistent durably before any byte after
        // it lands; a `SyncDone` mark makes it consistent again (journaled in order
        // before the applied point that covers it, so never lost while that survives).
        let job = self.disk.run(move || {
            let mut last = None;
            let mut state = None;
            let mut slot = match undo.lock() {
                Ok(g) => g,
                Err(poisoned) => poisoned.into_inner(),
            };
            if let Some(dir) = &undo_dir {
                if let Err(e) = bring_undo(&mut slot, dir, pair, want_undo, region, store.size()) {
                    let base = slot.file.as_ref().map(UndoFile::base);
                    return (last, state, Some(format!("undo: {e}")), base, 0);
                }
            }
            let split = slot.file.as_ref().map_or(batch.len(), |f| f.split(&batch));
            for (i, p) in batch.iter().enumerate() {
                if i == split {
                    if let Some(f) = slot.file.as_mut() {
                        // Saved durably before anything above the base lands; if not,
                        // the unit stops here, at or below the cut at the base.
                        if let Err(e) = f.save(store.as_ref(), &batch[split..], status) {
                            let bytes = f.bytes();
                            return (
                                last,
                                state,
                                Some(format!(
                                    "undo: {e}; the unit stops at or below the epoch base {}",
                                    f.base()
                                )),
                                Some(f.base()),
                                bytes,
                            );
                        }
                    }
                }
                // Only the initial sync's marks change the pair state; a resync keeps
                // the unit part of a cut through the resync epoch instead.
                let marked = match p.payload.mark() {
                    Some(Mark::SyncBegin) => Some((PairState::Inconsistent, Durability::Synced)),
                    Some(Mark::SyncDone) => Some((PairState::Consistent, Durability::Written)),
                    Some(Mark::ResyncBegin | Mark::ResyncDone | Mark::Restart) | None => None,
                };
                if let Some((s, durability)) = marked {
                    if let Some(j) = &journal {
                        if let Err(e) =
                            j.append(&[Record::PairState { pair, state: s }], durability)
                        {
                            let (base, bytes) = undo_state(&slot);
                            return (last, state, Some(format!("journal: {e}")), base, bytes);
                        }
                    }
                    state = Some(s);
                }
                if let Err(e) = store.apply(&p.payload) {
                    let (base, bytes) = undo_state(&slot);
                    return (last, state, Some(e.to_string()), base, bytes);
                }
                last = Some(p.stamp.seq);
            }
            if split == batch.len() && status.is_some() {
                // Marks only at or below the base (or nothing above it): the status
                // frame still goes in.
                if let Some(f) = slot.file.as_mut() {
                    if let Err(e) = f.save(store.as_ref(), &[], status) {
                        let bytes = f.bytes();
                        return (
                            last,
                            state,
                            Some(format!("undo: {e}")),
                            Some(f.base()),
                            bytes,
                        );
                    }
                }
            }
            let (base, bytes) = undo_state(&slot);
            (last, state, None, base, bytes)
        });
        ctx.spawn(job.into_actor(self).map(move |res, act, ctx| {
            act.applying = false;
            if let Some((_, _, _, base, bytes)) = &res {
                act.undo_base = *base;
                act.undo_bytes = *bytes;
            }
            if let Some((_, Some(state), _, _, _)) = &res {
                if act.state != Some(*state) {
                    tracing::info!(pair = %act.pair, ?state, "pair state");
                }
                act.state = Some(*state);
            }
            match res {
                Some((last, _, None, _, _)) => {
                    act.finish(limit, last, partial);
                    // Applying may let a restarted stream's mark go to the journal.
                    act.journal_incoming(ctx);
                    act.unflushed = true;
                    act.unrecorded_bytes += batch_bytes;
                    if act.unrecorded_bytes > act.budget / 4 {
                        // Much is applied but still pinned in the journal: free it now.
                        act.record_applied(ctx);
                    }
                }
                Some((last, _, Some(e), _, _)) => {
                    act.fail(format!("apply: {e}"));
                    if let Some(seq) = last {
                        act.intake.mark_applied(seq);
                    }
                }
                None => act.failed = Some("disk pool stopped".into()),
            }
            // A verify read that waited for this application goes first.
            act.run_verify(ctx);
            act.apply(ctx);
        }));
    }

    /// `partial`: applied short of `limit` (a verify read wanted the unit at a `seq`
    /// inside this limit's packets): the rest is applied next, and the hook, which
    /// checks cuts, is not told.
    fn finish(&mut self, limit: Timestamp, last: Option<Seq>, partial: bool) {
        let now = (self.wall)();
        for ts in std::mem::take(&mut self.applying_ts) {
            self.lag.record(now.saturating_sub(ts.0));
        }
        if let Some(seq) = last {
            self.intake.mark_applied(seq);
            self.resync.applied(seq);
        }
        if !partial {
            self.applied_limit = limit;
        }
        self.applies += 1;
        if let (Some(hook), false) = (&self.hook, partial) {
            hook(&Applied {
                pair: self.pair,
                limit,
                applied: self.intake.tracker().applied(),
                store: self.store.as_ref(),
            });
        }
        let applied = self.intake.tracker().applied().seq;
        let (done, waiting): (Vec<_>, Vec<_>) =
            self.waiters.drain(..).partition(|(seq, _)| *seq <= applied);
        self.waiters = waiting;
        for (_, tx) in done {
            let _ = tx.send(Ok(()));
        }
    }
}

impl RemoteUnit {
    /// Answers a verify request of system `to`.
    fn send_sums(&self, to: SystemId, id: u64, applied: Seq, result: SumsResult) {
        self.link.do_send(Outbound {
            to,
            msg: WireMessage::VerifySums(VerifySums {
                pair: self.pair,
                id,
                applied,
                result,
            }),
        });
    }

    /// Reads the regions of the oldest verify request, if nothing is being applied or
    /// read and the unit has applied up to the request's target (or its wait is over):
    /// the unit is then at exactly its applied point `A`, which the answer carries.
    /// Nothing is applied until the read is done (at most `MAX_CHUNK_BYTES`, or one
    /// region).
    fn run_verify(&mut self, ctx: &mut Context<Self>) {
        if self.verifying || self.applying {
            return;
        }
        if self.failed.is_some() {
            for v in std::mem::take(&mut self.verifies) {
                self.send_sums(
                    v.from,
                    v.req.id,
                    Seq::ZERO,
                    SumsResult::Refused(Refusal::Failed),
                );
            }
            return;
        }
        let applied = self.intake.tracker().applied().seq;
        let ready = self
            .verifies
            .front()
            .is_some_and(|v| applied >= v.req.target || now() >= v.due);
        if !ready {
            return;
        }
        let Some(v) = self.verifies.pop_front() else {
            return;
        };
        self.verifying = true;
        let store = self.store.clone();
        let ranges = v.req.ranges(store.size());
        let job = self.disk.run(move || read_sums(store.as_ref(), &ranges));
        ctx.spawn(job.into_actor(self).map(move |res, act, ctx| {
            act.verifying = false;
            let result = match res {
                Some(Ok(sums)) => SumsResult::Sums(sums),
                Some(Err(e)) => {
                    tracing::error!(pair = %act.pair, "verify: cannot read the remote unit: {e}");
                    SumsResult::Refused(Refusal::Failed)
                }
                None => SumsResult::Refused(Refusal::Failed),
            };
            act.send_sums(v.from, v.req.id, applied, result);
            act.run_verify(ctx);
            act.apply(ctx);
        }));
    }
}

/// The checksums of `ranges` of `store`, in order.
pub(crate) fn read_sums(
    store: &dyn BlockStore,
    ranges: &[(tidemark::Offset, u64)],
) -> Result<Vec<u64>, String> {
    let mut buf = Vec::new();
    ranges
        .iter()
        .map(|&(offset, len)| {
            buf.resize(len as usize, 0);
            store
                .read_at(offset, &mut buf)
                .map_err(|e| format!("read {len} bytes at {}: {e}", offset.0))?;
            Ok(tidemark::verify::checksum(&buf))
        })
        .collect()
}

impl RemoteUnit {
    /// Every so often: flush the unit and record the applied point, so the journal may
    /// forget the applied packets. (Not on every apply: an fdatasync of the unit per
    /// batch would bound the remote's throughput; re-applying after a crash is harmless.)
    fn record_applied(&mut self, ctx: &mut Context<Self>) {
        if !self.unflushed || self.recording || self.applying {
            return;
        }
        let Some(journal) = self.journal.clone() else {
            return;
        };
        self.unflushed = false;
        self.unrecorded_bytes = 0;
        self.recording = true;
        let store = self.store.clone();
        let rec = Record::Applied {
            pair: self.pair,
            stamp: self.intake.tracker().applied(),
        };
        let job = self.disk.run(move || {
            let t = std::time::Instant::now();
            let r = store.flush().map_err(|e| e.to_string()).and_then(|()| {
                journal
                    .append(&[rec], Durability::Written)
                    .map_err(|e| e.to_string())
            });
            (r, t.elapsed())
        });
        ctx.spawn(job.into_actor(self).map(|res, act, _| {
            let res = res.map(|(r, took)| {
                act.stages.unit_flush.record(took.as_nanos() as u64);
                r
            });
            act.recording = false;
            // A failed flush or journal write is not retried: after a failed fsync
            // neither can be trusted again.
            if let Some(Err(e)) = res {
                act.fail(format!("applied point not recorded: {e}"));
            }
        }));
    }
}

impl Actor for RemoteUnit {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        if let Some(e) = self.init_error.take() {
            self.fail(e);
        }
        ctx.run_interval(std::time::Duration::from_millis(100), |act, ctx| {
            act.record_applied(ctx)
        });
        // After a restart: report the recovered head, apply up to the durable limit.
        self.answer();
        self.apply(ctx);
    }
}

impl Handler<PacketsIn> for RemoteUnit {
    type Result = ();
    fn handle(&mut self, msg: PacketsIn, ctx: &mut Context<Self>) {
        if self.journal.is_some() {
            if self.failed.is_some() {
                // Nothing can be made durable: nothing new is acknowledged either.
                self.failed_dropped += msg.0.len() as u64;
                self.answer();
                return;
            }
            // Flow control and journal order (`tidemark::intake`): the packet right after
            // what is journaled goes to the journal with those held in memory right after
            // it; packets above a gap are held in memory, acknowledged selectively, until
            // it closes; the packet right after the head is always taken. What does not
            // fit is dropped and retransmitted later.
            let now = (self.wall)();
            for p in msg.0 {
                let age = now.saturating_sub(p.stamp.ts.0);
                self.stages.arrived.record(age);
                if let tidemark::intake::Offer::Ahead = self.intake.offer(p) {
                    self.stages.ahead.record(age);
                }
            }
            // Acknowledge what is durable already (the sender may be retransmitting it),
            // and what is held above a gap.
            self.answer();
            self.journal_incoming(ctx);
            return;
        }
        for p in msg.0 {
            self.intake.handle_durable(p);
        }
        self.answer();
        self.apply(ctx);
    }
}

impl Handler<HeartbeatsIn> for RemoteUnit {
    type Result = ();
    fn handle(&mut self, msg: HeartbeatsIn, _: &mut Context<Self>) {
        for hb in msg.0 {
            self.intake.handle_heartbeat(hb);
        }
        self.answer();
    }
}

impl Handler<LimitIn> for RemoteUnit {
    type Result = ();
    fn handle(&mut self, msg: LimitIn, ctx: &mut Context<Self>) {
        // The site sends its epoch with every limit, once both are durable.
        let changed = msg.epoch != self.epoch;
        self.epoch = msg.epoch;
        if msg.limit > self.limit {
            let now = (self.wall)();
            self.stages.limit.record(now.saturating_sub(msg.limit.0));
            self.limit = msg.limit;
            self.apply(ctx);
        } else if changed {
            self.apply(ctx);
        }
    }
}

impl Handler<VerifyIn> for RemoteUnit {
    type Result = ();
    fn handle(&mut self, msg: VerifyIn, ctx: &mut Context<Self>) {
        let VerifyIn { from, req } = msg;
        let applied = self.intake.tracker().applied().seq;
        let refused = if req.pair != self.pair {
            Some(Refusal::NoUnit)
        } else if !req.is_valid(self.store.size()) {
            Some(Refusal::BadRequest)
        } else if self.failed.is_some() {
            Some(Refusal::Failed)
        } else if self.state == Some(PairState::Inconsistent) {
            Some(Refusal::Inconsistent)
        } else {
            None
        };
        if let Some(r) = refused {
            self.send_sums(from, req.id, applied, SumsResult::Refused(r));
            return;
        }
        // A request resent while the first is still queued is answered once.
        if self
            .verifies
            .iter()
            .any(|v| v.from == from && v.req.id == req.id)
            || self.verifies.len() >= VERIFY_QUEUE
        {
            return;
        }
        self.verifies.push_back(QueuedVerify {
            from,
            req,
            due: now() + VERIFY_WAIT,
        });
        // Answered at whatever is applied once the wait is over, if the unit has not
        // reached the target by then (a limit held back by another pair, say).
        ctx.run_later(VERIFY_WAIT, |act, ctx| act.run_verify(ctx));
        self.run_verify(ctx);
    }
}

impl Handler<WaitApplied> for RemoteUnit {
    type Result = ResponseFuture<Result<(), EngineError>>;
    fn handle(&mut self, msg: WaitApplied, _: &mut Context<Self>) -> Self::Result {
        if self.intake.tracker().applied().seq >= msg.0 {
            return Box::pin(async { Ok(()) });
        }
        if let Some(e) = &self.failed {
            let e = EngineError::Unit(format!("{}: {e}", self.pair));
            return Box::pin(async { Err(e) });
        }
        let (tx, rx) = oneshot::channel();
        self.waiters.push((msg.0, tx));
        Box::pin(async move { rx.await.unwrap_or(Err(EngineError::Stopped)) })
    }
}

impl Handler<GetRemoteStats> for RemoteUnit {
    type Result = MessageResult<GetRemoteStats>;
    fn handle(&mut self, _: GetRemoteStats, _: &mut Context<Self>) -> Self::Result {
        let t = self.intake.tracker();
        let s = t.stats();
        let i = self.intake.stats();
        MessageResult(RemoteStats {
            state: self.state,
            head: t.head(),
            applied: t.applied(),
            limit: self.limit,
            held: t.held(),
            duplicates: s.duplicates,
            stale: s.stale,
            applies: self.applies,
            limit_violations: self.limit_violations,
            flow_dropped: i.no_room + i.refused + self.failed_dropped,
            resync: self.resync.get(),
            undo_bytes: self.undo_base.map(|_| self.undo_bytes),
            lag_ns: self.lag.samples().to_vec(),
            lag_max_ns: self.lag.max(),
            stage_ns: self.stages.samples(),
        })
    }
}

impl Handler<Stop> for RemoteUnit {
    type Result = ();
    fn handle(&mut self, _: Stop, ctx: &mut Context<Self>) {
        ctx.stop();
    }
}

/// The undo file's base and size, as a disk job leaves it.
fn undo_state(slot: &UndoSlot) -> (Option<Timestamp>, u64) {
    match &slot.file {
        Some(f) => (Some(f.base()), f.bytes()),
        None => (None, 0),
    }
}

/// Brings the undo file to the epoch at `want` (`None`: none open): removed when the
/// epoch closed, created when one opened, replaced when the site moved to another
/// epoch (only once the old one closed, so nothing above the new base was applied).
fn bring_undo(
    slot: &mut UndoSlot,
    dir: &std::path::Path,
    pair: PairId,
    want: Option<Timestamp>,
    region: u64,
    size: u64,
) -> Result<(), UndoFileError> {
    let have = slot.file.as_ref().map(UndoFile::base);
    if have == want {
        return Ok(());
    }
    slot.file = None;
    match want {
        None => UndoFile::remove(dir, pair),
        Some(base) => {
            slot.file = Some(UndoFile::create(dir, pair, base, region, size)?);
            Ok(())
        }
    }
}
