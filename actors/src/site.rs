//! `RemoteSite`: the part of a remote system that speaks for all its remote units to the
//! orderer. It makes an announced limit durable before acknowledging it, and fans a
//! released limit out to its units.
//!
//! I4 on this system: the durable limit is at least every limit its units apply under.
//! In this in-process engine "durable" is memory; the journal makes it real.

use crate::msg::Outbound;
use crate::msg::*;
use crate::remote::RemoteUnit;
use crate::Stop;
use actix::prelude::*;
use tidemark::{Message as WireMessage, SystemId, Timestamp};

pub struct RemoteSite {
    me: SystemId,
    orderer_system: SystemId,
    units: Vec<Addr<RemoteUnit>>,
    link: Recipient<Outbound>,
    durable: Timestamp,
    released: Timestamp,
}

impl RemoteSite {
    pub fn new(
        me: SystemId,
        orderer_system: SystemId,
        units: Vec<Addr<RemoteUnit>>,
        link: Recipient<Outbound>,
    ) -> Self {
        RemoteSite {
            me,
            orderer_system,
            units,
            link,
            durable: Timestamp::ZERO,
            released: Timestamp::ZERO,
        }
    }

    fn make_durable(&mut self, limit: Timestamp) {
        if limit > self.durable {
            self.durable = limit;
        }
    }
}

impl Actor for RemoteSite {
    type Context = Context<Self>;
}

impl Handler<AnnounceIn> for RemoteSite {
    type Result = ();
    fn handle(&mut self, msg: AnnounceIn, _: &mut Context<Self>) {
        self.make_durable(msg.0);
        self.link.do_send(Outbound {
            to: self.orderer_system,
            msg: WireMessage::Durable {
                system: self.me,
                limit: msg.0,
            },
        });
    }
}

impl Handler<LimitIn> for RemoteSite {
    type Result = ();
    fn handle(&mut self, msg: LimitIn, _: &mut Context<Self>) {
        if msg.0 <= self.released {
            return;
        }
        self.make_durable(msg.0);
        self.released = msg.0;
        for u in &self.units {
            u.do_send(msg);
        }
    }
}

impl Handler<Stop> for RemoteSite {
    type Result = ();
    fn handle(&mut self, _: Stop, ctx: &mut Context<Self>) {
        ctx.stop();
    }
}
