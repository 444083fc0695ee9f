//! `RemoteSite`: the part of a remote system that speaks for all its remote units to the
//! orderer. It makes an announced limit durable before acknowledging it, and makes a
//! released limit durable before fanning it out to its units (one journal sync covers
//! whatever arrived meanwhile).
//!
//! I4 on this system: the durable limit is at least every limit its units apply under.

use crate::msg::*;
use crate::units::disk::Disk;
use crate::units::journaling::{Durability, SharedJournal};
use crate::units::remote::RemoteUnit;
use actix::prelude::*;
use tidemark::journal::Record;
use tidemark::{Message as WireMessage, SystemId, Timestamp};

pub struct RemoteSite {
    me: SystemId,
    orderer_system: SystemId,
    units: Vec<Addr<RemoteUnit>>,
    link: Recipient<Outbound>,
    journal: Option<SharedJournal>,
    disk: Disk,
    /// Announced and durable here.
    prepared: Timestamp,
    /// Released, durable here and handed to the units.
    released: Timestamp,
    want_prepare: Timestamp,
    want_release: Timestamp,
    busy: bool,
}

impl RemoteSite {
    /// `prepared`/`released` are what the journal recovered.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        me: SystemId,
        orderer_system: SystemId,
        units: Vec<Addr<RemoteUnit>>,
        link: Recipient<Outbound>,
        journal: Option<SharedJournal>,
        disk: Disk,
        prepared: Timestamp,
        released: Timestamp,
    ) -> Self {
        RemoteSite {
            me,
            orderer_system,
            units,
            link,
            journal,
            disk,
            prepared,
            released,
            want_prepare: prepared,
            want_release: released,
            busy: false,
        }
    }

    fn durable_ack(&self, limit: Timestamp) {
        self.link.do_send(Outbound {
            to: self.orderer_system,
            msg: WireMessage::Durable {
                system: self.me,
                limit,
            },
        });
    }

    fn fan_out(&self) {
        for u in &self.units {
            u.do_send(LimitIn(self.released));
        }
    }

    /// Makes the wanted limits durable (one job in flight), then acts on them.
    fn pump(&mut self, ctx: &mut Context<Self>) {
        if self.busy {
            return;
        }
        let (prepare, release) = (self.want_prepare, self.want_release);
        if prepare <= self.prepared && release <= self.released {
            return;
        }
        let Some(journal) = self.journal.clone() else {
            self.done(prepare, release);
            return;
        };
        let mut records = Vec::new();
        if prepare > self.prepared {
            records.push(Record::Prepared { ts: prepare });
        }
        if release > self.released {
            records.push(Record::Limit { ts: release });
        }
        self.busy = true;
        let job = self
            .disk
            .run(move || journal.append(&records, Durability::Synced));
        ctx.spawn(job.into_actor(self).map(move |res, act, ctx| {
            act.busy = false;
            match res {
                Some(Ok(())) => act.done(prepare, release),
                Some(Err(e)) => tracing::error!(error = %e, "journal: limit not made durable"),
                None => {}
            }
            act.pump(ctx);
        }));
    }

    fn done(&mut self, prepare: Timestamp, release: Timestamp) {
        if prepare > self.prepared {
            self.prepared = prepare;
            self.durable_ack(prepare);
        }
        if release > self.released {
            self.released = release;
            self.fan_out();
        }
    }
}

impl Actor for RemoteSite {
    type Context = Context<Self>;
}

impl Handler<AnnounceIn> for RemoteSite {
    type Result = ();
    fn handle(&mut self, msg: AnnounceIn, ctx: &mut Context<Self>) {
        if msg.0 <= self.prepared.max(self.released) {
            // Durable already (a resend): say so again.
            self.durable_ack(msg.0);
            return;
        }
        self.want_prepare = self.want_prepare.max(msg.0);
        self.pump(ctx);
    }
}

impl Handler<LimitIn> for RemoteSite {
    type Result = ();
    fn handle(&mut self, msg: LimitIn, ctx: &mut Context<Self>) {
        self.want_release = self.want_release.max(msg.0);
        self.pump(ctx);
    }
}

impl Handler<Stop> for RemoteSite {
    type Result = ();
    fn handle(&mut self, _: Stop, ctx: &mut Context<Self>) {
        ctx.stop();
    }
}
