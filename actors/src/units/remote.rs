//! `RemoteUnit`: receives one pair's packets in any order, tracks the run head, reports it
//! to the orderer whenever it moves, acknowledges what it holds, and applies what the
//! released commit limit allows, in `seq` order, off the actor thread.
//!
//! I1 on this unit: after applying under limit `L` the unit holds exactly the pair's
//! writes with `ts <= L` (the run from the applied point, cut at the first `ts > L`).

use crate::error::EngineError;
use crate::health::Health;
use crate::msg::*;
use crate::units::disk::Disk;
use crate::units::journaling::{Durability, SharedJournal};
use crate::units::lag::LagSamples;
use actix::prelude::*;
use std::sync::Arc;
use tidemark::journal::{JournalError, PairState, Record};
use tidemark::run::RunTracker;
use tidemark::Mark;
use tidemark::{
    BlockStore, HeadReport, Intake, Message as WireMessage, Packet, PairId, Seq, Stamp,
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
    applying_ts: Vec<Timestamp>,
    applies: u64,
    limit_violations: u64,
    /// The journal or the disk failed: the unit applies and journals nothing more, and
    /// the engine's health says why.
    failed: Option<String>,
    health: Health,
    /// The pair state, as marks in the stream set it (see [`crate::units::sync`]).
    state: Option<PairState>,
}

impl RemoteUnit {
    pub fn new(pair: PairId, w: RemoteWiring, resume: RemoteResume) -> Self {
        let mut intake = Intake::new(RunTracker::new(pair, resume.applied), w.budget);
        for p in resume.live {
            intake.handle_durable(p);
        }
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
            applying_ts: Vec::new(),
            applies: 0,
            limit_violations: 0,
            failed: None,
            health: w.health,
            state: resume.state,
        }
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
        let records: Vec<Record> = batch.iter().cloned().map(Record::Packet).collect();
        let job = self
            .disk
            .run(move || journal.append(&records, Durability::Synced));
        ctx.spawn(job.into_actor(self).map(move |res, act, ctx| {
            match res {
                Some(Ok(())) => {
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
        let head = self.intake.tracker().head();
        if head != self.reported {
            self.reported = head;
            self.link.do_send(Outbound {
                to: self.orderer_system,
                msg: WireMessage::Heads(vec![HeadReport {
                    pair: self.pair,
                    head,
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
        if self.applying || self.failed.is_some() || self.limit <= self.applied_limit {
            return;
        }
        let limit = self.limit;
        if self.intake.tracker().limit_violated(limit) {
            // The orderer released a limit beyond this unit's head: I1 would break.
            self.limit_violations += 1;
            tracing::error!(pair = %self.pair, %limit, head = %self.intake.tracker().head(),
                "commit limit beyond this unit's run head; applying only the run");
        }
        let batch: Vec<Packet> = self.intake.tracker().select(limit).cloned().collect();
        self.applying_ts = batch.iter().map(|p| p.stamp.ts).collect();
        let batch_bytes: usize = batch.iter().map(|p| p.payload.wire_len()).sum();
        if batch.is_empty() {
            self.finish(limit, None);
            return;
        }
        self.applying = true;
        let store = self.store.clone();
        let journal = self.journal.clone();
        let pair = self.pair;
        // The writes go to the unit only (no flush): the applied point is recorded in
        // the journal later, by `record_applied`, once a flush made them durable; until
        // then the journal keeps their packets and recovery re-applies them (I4).
        // A `SyncBegin` mark makes the unit inconsistent durably before any byte after
        // it lands; a `SyncDone` mark makes it consistent again (journaled in order
        // before the applied point that covers it, so never lost while that survives).
        let job = self.disk.run(move || {
            let mut last = None;
            let mut state = None;
            for p in &batch {
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
                            return (last, state, Some(format!("journal: {e}")));
                        }
                    }
                    state = Some(s);
                }
                if let Err(e) = store.apply(&p.payload) {
                    return (last, state, Some(e.to_string()));
                }
                last = Some(p.stamp.seq);
            }
            (last, state, None)
        });
        ctx.spawn(job.into_actor(self).map(move |res, act, ctx| {
            act.applying = false;
            if let Some((_, Some(state), _)) = &res {
                if act.state != Some(*state) {
                    tracing::info!(pair = %act.pair, ?state, "pair state");
                }
                act.state = Some(*state);
            }
            match res {
                Some((last, _, None)) => {
                    act.finish(limit, last);
                    // Applying may let a restarted stream's mark go to the journal.
                    act.journal_incoming(ctx);
                    act.unflushed = true;
                    act.unrecorded_bytes += batch_bytes;
                    if act.unrecorded_bytes > act.budget / 4 {
                        // Much is applied but still pinned in the journal: free it now.
                        act.record_applied(ctx);
                    }
                }
                Some((last, _, Some(e))) => {
                    act.fail(format!("apply: {e}"));
                    if let Some(seq) = last {
                        act.intake.mark_applied(seq);
                    }
                }
                None => act.failed = Some("disk pool stopped".into()),
            }
            act.apply(ctx);
        }));
    }

    fn finish(&mut self, limit: Timestamp, last: Option<Seq>) {
        let now = (self.wall)();
        for ts in std::mem::take(&mut self.applying_ts) {
            self.lag.record(now.saturating_sub(ts.0));
        }
        if let Some(seq) = last {
            self.intake.mark_applied(seq);
        }
        self.applied_limit = limit;
        self.applies += 1;
        if let Some(hook) = &self.hook {
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
            store.flush().map_err(|e| e.to_string())?;
            journal
                .append(&[rec], Durability::Written)
                .map_err(|e| e.to_string())
        });
        ctx.spawn(job.into_actor(self).map(|res, act, _| {
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
            for p in msg.0 {
                self.intake.offer(p);
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
        if msg.0 > self.limit {
            self.limit = msg.0;
            self.apply(ctx);
        }
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
            lag_ns: self.lag.samples().to_vec(),
        })
    }
}

impl Handler<Stop> for RemoteUnit {
    type Result = ();
    fn handle(&mut self, _: Stop, ctx: &mut Context<Self>) {
        ctx.stop();
    }
}
