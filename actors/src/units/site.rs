//! `RemoteSite`: the part of a remote system that speaks for all its remote units to the
//! orderer. It makes an announced limit durable before acknowledging it, and makes a
//! released limit durable before fanning it out to its units (one journal sync covers
//! whatever arrived meanwhile).
//!
//! I4 on this system: the durable limit is at least every limit its units apply under.

use crate::health::Health;
use crate::msg::*;
use crate::units::disk::Disk;
use crate::units::journaling::{Durability, SharedJournal};
use crate::units::remote::RemoteUnit;
use actix::prelude::*;
use tidemark::journal::Record;
use tidemark::{Message as WireMessage, SystemId, Timestamp};

/// What a remote site is wired to.
pub struct SiteWiring {
    pub me: SystemId,
    pub orderer_system: SystemId,
    /// The remote units of this system, to fan a released limit out to.
    pub units: Vec<Addr<RemoteUnit>>,
    pub link: Recipient<Outbound>,
    /// The system's journal (`None`: limits are not made durable, tests only).
    pub journal: Option<SharedJournal>,
    pub disk: Disk,
    /// Where the site reports that its journal failed.
    pub health: Health,
}

pub struct RemoteSite {
    w: SiteWiring,
    /// Announced and durable here.
    prepared: Timestamp,
    /// Released, durable here and handed to the units.
    released: Timestamp,
    want_prepare: Timestamp,
    want_release: Timestamp,
    busy: bool,
    /// The journal failed to make a limit durable: the site acknowledges and releases
    /// nothing more (the limit stays where it was, I4) and the engine's health says why.
    failed: bool,
}

impl RemoteSite {
    /// `prepared`/`released` are what the journal recovered.
    pub fn new(wiring: SiteWiring, prepared: Timestamp, released: Timestamp) -> Self {
        RemoteSite {
            w: wiring,
            prepared,
            released,
            want_prepare: prepared,
            want_release: released,
            busy: false,
            failed: false,
        }
    }

    fn durable_ack(&self, limit: Timestamp) {
        self.w.link.do_send(Outbound {
            to: self.w.orderer_system,
            msg: WireMessage::Durable {
                system: self.w.me,
                limit,
            },
        });
    }

    fn fan_out(&self) {
        for u in &self.w.units {
            u.do_send(LimitIn(self.released));
        }
    }

    /// Makes the wanted limits durable (one job in flight), then acts on them.
    fn pump(&mut self, ctx: &mut Context<Self>) {
        if self.busy || self.failed {
            return;
        }
        let (prepare, release) = (self.want_prepare, self.want_release);
        if prepare <= self.prepared && release <= self.released {
            return;
        }
        let Some(journal) = self.w.journal.clone() else {
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
            .w
            .disk
            .run(move || journal.append(&records, Durability::Synced));
        ctx.spawn(job.into_actor(self).map(move |res, act, ctx| {
            act.busy = false;
            match res {
                Some(Ok(())) => act.done(prepare, release),
                // Not retried: after a failed sync the journal refuses everything, so a
                // retry would spin. The limit stays where it is (nothing below an
                // undurable limit is applied) and the process stops.
                Some(Err(e)) => {
                    act.failed = true;
                    act.w.health.fail(
                        format!("system {} remote site", act.w.me),
                        format_args!("journal: limit not made durable: {e}"),
                    );
                }
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
