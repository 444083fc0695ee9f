//! `LocalUnit`: owns one local disk. Takes client writes, writes them locally (off the
//! actor thread, one batch in flight so the disk sees them in order), stamps them in the
//! order they completed, hands the packets to the link, retransmits what the remote has
//! not acknowledged, and sends heartbeats when idle.
//!
//! I2: a write is stamped when its local write completed and before its client is told,
//! from the process-wide hybrid clock, so a write issued after another completed gets a
//! later stamp. The local disk applies writes in stamp order (one batch in flight), so
//! the remote, applying in stamp order, ends up with the same bytes.

use crate::disk::Disk;
use crate::error::EngineError;
use crate::msg::Outbound;
use crate::msg::*;
use crate::{now, Stop};
use actix::prelude::*;
use std::sync::Arc;
use std::time::Duration;
use tidemark::ship::Sender;
use tidemark::storage::check;
use tidemark::{BlockStore, HybridClock, Message as WireMessage, PairId, Payload, Stamp};
use tidemark::{Rtt, SystemId};
use tokio::sync::oneshot;

type Reply<T> = oneshot::Sender<Result<T, EngineError>>;

enum Op {
    Write(Vec<Payload>, Reply<Vec<Stamp>>),
    Flush(Reply<()>),
}

/// What the disk thread did with one op: how many payloads were written, and the error
/// that stopped it, if any.
type OpResult = (usize, Option<tidemark::StoreError>);

pub struct LocalUnit {
    pair: PairId,
    remote_system: SystemId,
    sender: Sender,
    clock: Arc<HybridClock>,
    store: Arc<dyn BlockStore>,
    disk: Disk,
    link: Recipient<Outbound>,
    queue: Vec<Op>,
    busy: bool,
    window_bytes: usize,
    tick: Duration,
    bytes: u64,
}

/// Settings of a local unit.
#[derive(Clone, Copy, Debug)]
pub struct LocalConfig {
    pub heartbeat: Duration,
    /// Writers wait while this many bytes are unacknowledged by the remote.
    pub window_bytes: usize,
    pub rtt: (Duration, Duration, Duration),
}

impl LocalUnit {
    pub fn new(
        pair: PairId,
        remote_system: SystemId,
        clock: Arc<HybridClock>,
        store: Arc<dyn BlockStore>,
        disk: Disk,
        link: Recipient<Outbound>,
        cfg: LocalConfig,
    ) -> Self {
        let (initial, min, max) = cfg.rtt;
        LocalUnit {
            pair,
            remote_system,
            sender: Sender::new(
                pair,
                Stamp::ZERO,
                cfg.heartbeat,
                Rtt::new(initial, min, max),
            ),
            clock,
            store,
            disk,
            link,
            queue: Vec::new(),
            busy: false,
            window_bytes: cfg.window_bytes,
            tick: (cfg.heartbeat / 2).clamp(Duration::from_millis(1), Duration::from_millis(5)),
            bytes: 0,
        }
    }

    /// Starts the next disk batch if the disk is idle and the window has room.
    fn pump(&mut self, ctx: &mut Context<Self>) {
        if self.busy || self.queue.is_empty() || self.sender.unacked_bytes() > self.window_bytes {
            return;
        }
        self.busy = true;
        let ops = std::mem::take(&mut self.queue);
        let work: Vec<Option<Vec<Payload>>> = ops
            .iter()
            .map(|op| match op {
                Op::Write(ps, _) => Some(ps.clone()),
                Op::Flush(_) => None,
            })
            .collect();
        let store = self.store.clone();
        let job = self.disk.run(move || {
            work.iter()
                .map(|w| match w {
                    Some(ps) => {
                        for (i, p) in ps.iter().enumerate() {
                            if let Err(e) = store.apply(p) {
                                return (i, Some(e));
                            }
                        }
                        (ps.len(), None)
                    }
                    None => (0, store.flush().err()),
                })
                .collect::<Vec<OpResult>>()
        });
        ctx.spawn(
            job.into_actor(self)
                .map(move |res, act, ctx| act.completed(ops, res, ctx)),
        );
    }

    /// The disk finished a batch: stamp what was written, tell the clients, ship.
    fn completed(&mut self, ops: Vec<Op>, res: Option<Vec<OpResult>>, ctx: &mut Context<Self>) {
        self.busy = false;
        let results = res.unwrap_or_default();
        for (i, op) in ops.into_iter().enumerate() {
            let (done, err) = match results.get(i) {
                Some((n, e)) => (*n, e.as_ref().map(|e| e.to_string())),
                None => (0, Some("disk pool stopped".to_string())),
            };
            match op {
                Op::Write(payloads, reply) => {
                    let mut stamps = Vec::with_capacity(done);
                    for p in payloads.into_iter().take(done) {
                        self.bytes += p.len();
                        stamps.push(self.sender.push(self.clock.now(), p));
                    }
                    let _ = reply.send(match err {
                        None => Ok(stamps),
                        Some(e) => {
                            tracing::error!(pair = %self.pair, error = %e, "local write failed");
                            Err(EngineError::Topology(format!("local write failed: {e}")))
                        }
                    });
                }
                Op::Flush(reply) => {
                    let _ = reply.send(match err {
                        None => Ok(()),
                        Some(e) => Err(EngineError::Topology(format!("flush failed: {e}"))),
                    });
                }
            }
        }
        self.transmit();
        self.pump(ctx);
    }

    fn transmit(&mut self) {
        let mut out = Vec::new();
        let re = self.sender.poll_transmit(now(), &mut out);
        if re > 0 {
            tracing::debug!(pair = %self.pair, retransmits = re, rto_us = self.sender.rtt().rto().as_micros() as u64,
                unacked = self.sender.unacked_len(), acked = %self.sender.acked(), "retransmit");
        }
        if !out.is_empty() {
            self.link.do_send(Outbound {
                to: self.remote_system,
                msg: WireMessage::Data(out),
            });
        }
    }

    fn on_tick(&mut self) {
        self.transmit();
        let t = now();
        if self.sender.heartbeat_due(t) {
            let hb = self.sender.heartbeat(t, self.clock.now());
            self.link.do_send(Outbound {
                to: self.remote_system,
                msg: WireMessage::Heartbeats(vec![hb]),
            });
        }
    }
}

impl Actor for LocalUnit {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.run_interval(self.tick, |act, _| act.on_tick());
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
        let (tx, rx) = oneshot::channel();
        self.queue.push(Op::Write(msg.0, tx));
        self.pump(ctx);
        Box::pin(async move { rx.await.unwrap_or(Err(EngineError::Stopped)) })
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
        self.pump(ctx);
    }
}

impl Handler<GetLocalStats> for LocalUnit {
    type Result = MessageResult<GetLocalStats>;

    fn handle(&mut self, _: GetLocalStats, _: &mut Context<Self>) -> Self::Result {
        let s = self.sender.stats();
        MessageResult(LocalStats {
            last: self.sender.last(),
            acked: self.sender.acked(),
            unacked: self.sender.unacked_len(),
            packets: s.packets,
            retransmits: s.retransmits,
            heartbeats: s.heartbeats,
            bytes: self.bytes,
            srtt_us: self.sender.rtt().srtt().map(|d| d.as_micros() as u64),
        })
    }
}

impl Handler<Stop> for LocalUnit {
    type Result = ();
    fn handle(&mut self, _: Stop, ctx: &mut Context<Self>) {
        ctx.stop();
    }
}
