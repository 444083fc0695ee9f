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
use tidemark::{BlockStore, HeadReport, Message as WireMessage, Packet, PairId, Seq, Stamp};
use tidemark::{Mark, Payload};
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
    tracker: RunTracker,
    store: Arc<dyn BlockStore>,
    journal: Option<SharedJournal>,
    /// Received, waiting to be made durable before they count.
    incoming: Vec<Packet>,
    incoming_bytes: usize,
    journaling: bool,
    /// Journaled and held, not yet applied.
    held_bytes: usize,
    /// Sequence numbers held above the applied point: a retransmitted duplicate is
    /// acknowledged again but not journaled again.
    held_seqs: std::collections::BTreeSet<Seq>,
    /// Applied to the unit but not yet flushed and recorded in the journal.
    unflushed: bool,
    /// Bytes applied since the applied point was last recorded.
    unrecorded_bytes: usize,
    recording: bool,
    budget: usize,
    flow_dropped: u64,
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
        let mut tracker = RunTracker::new(pair, resume.applied);
        let mut held_bytes = 0;
        let mut held_seqs = std::collections::BTreeSet::new();
        for p in resume.live {
            let (len, seq) = (p.payload.wire_len(), p.stamp.seq);
            if tracker.handle_packet(p) == tidemark::Received::New {
                held_bytes += len;
                held_seqs.insert(seq);
            }
        }
        RemoteUnit {
            pair,
            local_system: w.local_system,
            orderer_system: w.orderer_system,
            tracker,
            store: w.store,
            journal: w.journal,
            incoming: Vec::new(),
            incoming_bytes: 0,
            journaling: false,
            held_bytes,
            held_seqs,
            unflushed: false,
            unrecorded_bytes: 0,
            recording: false,
            budget: w.budget,
            flow_dropped: 0,
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

    /// Makes received packets durable in the journal (one batch in flight); only then do
    /// they count in the head and get acknowledged (I3).
    fn journal_incoming(&mut self, ctx: &mut Context<Self>) {
        if self.failed.is_some() {
            // Nothing can be made durable: nothing is acknowledged either.
            self.flow_dropped += self.incoming.len() as u64;
            self.incoming.clear();
            self.incoming_bytes = 0;
            return;
        }
        if self.journaling || self.incoming.is_empty() {
            return;
        }
        let Some(journal) = self.journal.clone() else {
            return;
        };
        self.journaling = true;
        let batch = std::mem::take(&mut self.incoming);
        self.incoming_bytes = 0;
        let records: Vec<Record> = batch.iter().cloned().map(Record::Packet).collect();
        let job = self
            .disk
            .run(move || journal.append(&records, Durability::Synced));
        ctx.spawn(job.into_actor(self).map(move |res, act, ctx| {
            act.journaling = false;
            match res {
                Some(Ok(())) => {
                    for p in batch {
                        let (len, seq) = (p.payload.wire_len(), p.stamp.seq);
                        if act.tracker.handle_packet(p) == tidemark::Received::New {
                            act.held_bytes += len;
                            act.held_seqs.insert(seq);
                        }
                    }
                    act.answer();
                    act.apply(ctx);
                }
                // Not durable: not acknowledged either; the primary resends them. A full
                // journal is back-pressure (it frees as the unit applies), not a fault:
                // counted with the flow-control drops, not logged each time.
                Some(Err(JournalError::Full { .. })) => act.flow_dropped += batch.len() as u64,
                Some(Err(e)) => act.fail(format!("journal: {e}")),
                None => {}
            }
            act.journal_incoming(ctx);
        }));
    }

    /// Acknowledge what is held, and report the head if it moved.
    fn answer(&mut self) {
        self.link.do_send(Outbound {
            to: self.local_system,
            msg: WireMessage::Acks(vec![self.tracker.ack()]),
        });
        let head = self.tracker.head();
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
        if self.tracker.limit_violated(limit) {
            // The orderer released a limit beyond this unit's head: I1 would break.
            self.limit_violations += 1;
            tracing::error!(pair = %self.pair, %limit, head = %self.tracker.head(),
                "commit limit beyond this unit's run head; applying only the run");
        }
        let batch: Vec<Packet> = self.tracker.select(limit).cloned().collect();
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
                if let Payload::Mark(mark) = &p.payload {
                    let s = match mark {
                        Mark::SyncBegin => PairState::Inconsistent,
                        Mark::SyncDone => PairState::Consistent,
                    };
                    if let Some(j) = &journal {
                        let durability = match mark {
                            Mark::SyncBegin => Durability::Synced,
                            Mark::SyncDone => Durability::Written,
                        };
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
                    act.held_bytes = act.held_bytes.saturating_sub(batch_bytes);
                    act.finish(limit, last);
                    let applied = act.tracker.applied().seq;
                    act.held_seqs = act.held_seqs.split_off(&applied.next());
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
                        act.tracker.mark_applied(seq);
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
            self.tracker.mark_applied(seq);
        }
        self.applied_limit = limit;
        self.applies += 1;
        if let Some(hook) = &self.hook {
            hook(&Applied {
                pair: self.pair,
                limit,
                applied: self.tracker.applied(),
                store: self.store.as_ref(),
            });
        }
        let applied = self.tracker.applied().seq;
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
            stamp: self.tracker.applied(),
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
            // Flow control: out-of-order packets may fill three quarters of this unit's
            // share of the journal; the rest is kept for packets near the head of the
            // run. The packet right after the head (the one that closes the gap and lets
            // the limit, and space, move) is always taken, whatever is held: with large
            // packets, those just after it can fill the whole share (I5). What does not
            // fit is dropped and retransmitted later.
            let head = self.tracker.head().seq;
            let applied = self.tracker.applied().seq;
            for p in msg.0 {
                if p.stamp.seq <= applied
                    || self.held_seqs.contains(&p.stamp.seq)
                    || self.incoming.iter().any(|q| q.stamp.seq == p.stamp.seq)
                {
                    continue;
                }
                let len = p.payload.wire_len();
                let room = if p.stamp.seq == head.next() {
                    usize::MAX
                } else if p.stamp.seq.0 <= head.0 + 64 {
                    self.budget
                } else {
                    self.budget / 4 * 3
                };
                if self.held_bytes + self.incoming_bytes + len > room {
                    self.flow_dropped += 1;
                    continue;
                }
                self.incoming_bytes += len;
                self.incoming.push(p);
            }
            // Acknowledge what is durable already (the sender may be retransmitting it).
            self.answer();
            self.journal_incoming(ctx);
            return;
        }
        for p in msg.0 {
            self.tracker.handle_packet(p);
        }
        self.answer();
        self.apply(ctx);
    }
}

impl Handler<HeartbeatsIn> for RemoteUnit {
    type Result = ();
    fn handle(&mut self, msg: HeartbeatsIn, _: &mut Context<Self>) {
        for hb in msg.0 {
            self.tracker.handle_heartbeat(hb);
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
        if self.tracker.applied().seq >= msg.0 {
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
        let s = self.tracker.stats();
        MessageResult(RemoteStats {
            state: self.state,
            head: self.tracker.head(),
            applied: self.tracker.applied(),
            limit: self.limit,
            held: self.tracker.held(),
            duplicates: s.duplicates,
            stale: s.stale,
            applies: self.applies,
            limit_violations: self.limit_violations,
            flow_dropped: self.flow_dropped,
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
