//! `OrdererActor`: wraps the group's [`tidemark::Orderer`]. Takes head reports, and sends
//! announcements and releases to every remote system of the group: at most one release
//! per flush (head reports that arrive together coalesce), and the pending announcement
//! and released limit again every heartbeat interval, since the network may lose them.

use crate::msg::*;
use actix::prelude::*;
use std::time::Duration;
use tidemark::{Message as WireMessage, OrderAction, Orderer, SystemId};

pub struct OrdererActor {
    core: Orderer,
    systems: Vec<SystemId>,
    link: Recipient<Outbound>,
    resend_every: Duration,
    flush_scheduled: bool,
}

impl OrdererActor {
    pub fn new(
        core: Orderer,
        systems: Vec<SystemId>,
        link: Recipient<Outbound>,
        resend_every: Duration,
    ) -> Self {
        OrdererActor {
            core,
            systems,
            link,
            resend_every,
            flush_scheduled: false,
        }
    }

    fn broadcast(&self, action: OrderAction) {
        let msg = match action {
            OrderAction::Announce { limit, epoch } => WireMessage::Announce { limit, epoch },
            OrderAction::Release { limit, epoch } => WireMessage::Release { limit, epoch },
        };
        for s in &self.systems {
            self.link.do_send(Outbound {
                to: *s,
                msg: msg.clone(),
            });
        }
    }

    fn schedule(&mut self, ctx: &mut Context<Self>) {
        if !self.flush_scheduled {
            self.flush_scheduled = true;
            ctx.notify(FlushQueued);
        }
    }
}

impl Actor for OrdererActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.run_interval(self.resend_every, |act, _| {
            for a in act.core.resend() {
                act.broadcast(a);
            }
        });
    }
}

impl Handler<HeadsIn> for OrdererActor {
    type Result = ();
    fn handle(&mut self, msg: HeadsIn, ctx: &mut Context<Self>) {
        for r in msg.0 {
            let epoch = self.core.epoch_base();
            if !self.core.handle_report(r.pair, r.head.ts, r.resync) {
                tracing::warn!(pair = %r.pair, "head report for a pair not in the group");
            }
            match (epoch, self.core.epoch_base()) {
                (None, Some(base)) => {
                    tracing::info!(pair = %r.pair, %base, resync = ?r.resync, "resync epoch opens")
                }
                (Some(base), None) => tracing::info!(%base, "resync epoch closes"),
                _ => {}
            }
        }
        self.schedule(ctx);
    }
}

impl Handler<DurableIn> for OrdererActor {
    type Result = ();
    fn handle(&mut self, msg: DurableIn, ctx: &mut Context<Self>) {
        self.core.handle_durable(msg.system, msg.limit);
        self.schedule(ctx);
    }
}

impl Handler<FlushQueued> for OrdererActor {
    type Result = ();
    fn handle(&mut self, _: FlushQueued, _: &mut Context<Self>) {
        self.flush_scheduled = false;
        let mut release = None;
        while let Some(a) = self.core.poll_action() {
            match a {
                OrderAction::Release { .. } => release = Some(a),
                OrderAction::Announce { .. } => {
                    // A release the core made before this announcement goes first.
                    if let Some(r) = release.take() {
                        self.broadcast(r);
                    }
                    self.broadcast(a);
                }
            }
        }
        if let Some(r) = release {
            tracing::debug!(?r, laggard = ?self.core.laggard(), "release");
            self.broadcast(r);
        }
    }
}

impl Handler<GetOrdererStats> for OrdererActor {
    type Result = MessageResult<GetOrdererStats>;
    fn handle(&mut self, _: GetOrdererStats, _: &mut Context<Self>) -> Self::Result {
        MessageResult(OrdererStats {
            candidate: self.core.candidate(),
            released: self.core.released(),
            releases: self.core.releases(),
            laggard: self.core.laggard(),
            epoch_base: self.core.epoch_base(),
        })
    }
}

impl Handler<Stop> for OrdererActor {
    type Result = ();
    fn handle(&mut self, _: Stop, ctx: &mut Context<Self>) {
        ctx.stop();
    }
}
