//! `RemoteSite`: the part of a remote system that speaks for all its remote units to the
//! orderer. It makes an announced limit durable before acknowledging it, and makes a
//! released limit durable before fanning it out to its units (one journal sync covers
//! whatever arrived meanwhile).
//!
//! I4 on this system: the durable limit is at least every limit its units apply under.
//!
//! **The resync epoch** (`docs/design.md`). A limit the orderer sends while an epoch is
//! open carries it; the site makes `Record::Epoch(Some(e))` durable in the same synced
//! append as the `Prepared`/`Limit` record, before it acknowledges or fans out, so no
//! unit applies anything above the base before the epoch survives a crash. Once open,
//! the epoch keeps its base (a later message with another base, from a restarted
//! orderer, changes only `closes_at`): the units saved their bytes as of that base. It
//! closes when a durable *released* limit is at or above `closes_at`, or when a release
//! above the site's limit carries no epoch (the orderer releases without an epoch only
//! limits where the cut needs no rollback: its closing message was lost, or it
//! restarted with no pair resyncing): the site records `Record::Epoch(None)` with that
//! limit, and tells its units (their `LimitIn` carries no epoch: they drop their undo
//! logs).

use crate::health::Health;
use crate::msg::*;
use crate::units::disk::Disk;
use crate::units::journaling::{Durability, SharedJournal};
use crate::units::remote::RemoteUnit;
use actix::prelude::*;
use tidemark::journal::{Epoch, Record};
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
    /// The epochs the wanted announcement and release carried.
    want_prepare_epoch: Option<Epoch>,
    want_release_epoch: Option<Epoch>,
    /// The resync epoch durable here (recovered at start).
    epoch: Option<Epoch>,
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
            want_prepare_epoch: None,
            want_release_epoch: None,
            epoch: None,
            busy: false,
            failed: false,
        }
    }

    /// The resync epoch the journal recovered (open at start).
    pub fn with_epoch(mut self, epoch: Option<Epoch>) -> Self {
        self.epoch = epoch;
        self
    }

    /// The epoch after taking an announcement (`prepare`) and a release (`release`),
    /// each `(limit, the epoch it carried)` and new to the site, from `current`. Pure:
    /// the rule of the module documentation, in detail:
    ///
    /// - Only a message at or above `newest` (the highest limit the site prepared or
    ///   released before) speaks for the epoch; an older one (a reordered datagram) only
    ///   moves the limit.
    /// - An epoch it carries opens one if none is open, with its base raised to
    ///   `released` (the site's limit before: never below what the units applied). The
    ///   open epoch keeps its base when the message's epoch has the same base, or when
    ///   the open one cannot have closed yet (a restarted orderer's); it only learns
    ///   `closes_at`. If the open one has a `closes_at` at or below the message's limit,
    ///   the orderer moved past it (one announcement at a time, released in order): the
    ///   message's epoch replaces it.
    /// - A release that carries no epoch closes the open one; so does a release at or
    ///   above the open one's `closes_at`. An announcement never closes one.
    pub fn next_epoch(
        current: Option<Epoch>,
        newest: Timestamp,
        released: Timestamp,
        prepare: Option<(Timestamp, Option<Epoch>)>,
        release: Option<(Timestamp, Option<Epoch>)>,
    ) -> Option<Epoch> {
        fn take(e: &mut Option<Epoch>, m: Epoch, limit: Timestamp, released: Timestamp) {
            match e {
                Some(open) if open.base == m.base || open.closes_at.is_none_or(|c| limit < c) => {
                    if m.closes_at.is_some() {
                        open.closes_at = m.closes_at;
                    }
                }
                _ => {
                    *e = Some(Epoch {
                        base: m.base.max(released),
                        closes_at: m.closes_at,
                    })
                }
            }
        }
        let mut e = current;
        let mut newest = newest;
        if let Some((limit, carried)) = prepare {
            if limit >= newest {
                newest = limit;
                if let Some(m) = carried {
                    take(&mut e, m, limit, released);
                }
            }
        }
        if let Some((limit, carried)) = release {
            if limit >= newest {
                match carried {
                    Some(m) => take(&mut e, m, limit, released),
                    None => e = None,
                }
            }
            if e.is_some_and(|o| o.closes_at.is_some_and(|c| limit >= c)) {
                e = None;
            }
        }
        e
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
            u.do_send(LimitIn {
                limit: self.released,
                epoch: self.epoch,
            });
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
        let epoch = Self::next_epoch(
            self.epoch,
            self.prepared.max(self.released),
            self.released,
            (prepare > self.prepared).then_some((prepare, self.want_prepare_epoch)),
            (release > self.released).then_some((release, self.want_release_epoch)),
        );
        let Some(journal) = self.w.journal.clone() else {
            self.done(prepare, release, epoch);
            return;
        };
        let mut records = Vec::new();
        if prepare > self.prepared {
            records.push(Record::Prepared { ts: prepare });
        }
        if release > self.released {
            records.push(Record::Limit { ts: release });
        }
        if epoch != self.epoch {
            records.push(Record::Epoch(epoch));
        }
        self.busy = true;
        let job = self
            .w
            .disk
            .run(move || journal.append(&records, Durability::Synced));
        ctx.spawn(job.into_actor(self).map(move |res, act, ctx| {
            act.busy = false;
            match res {
                Some(Ok(())) => act.done(prepare, release, epoch),
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

    fn done(&mut self, prepare: Timestamp, release: Timestamp, epoch: Option<Epoch>) {
        if epoch != self.epoch {
            tracing::info!(system = %self.w.me, ?epoch, was = ?self.epoch, "resync epoch");
            self.epoch = epoch;
        }
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
        if msg.limit <= self.prepared.max(self.released) {
            // Durable already (a resend): say so again.
            self.durable_ack(msg.limit);
            return;
        }
        if msg.limit >= self.want_prepare {
            self.want_prepare = msg.limit;
            self.want_prepare_epoch = msg.epoch;
        }
        self.pump(ctx);
    }
}

impl Handler<LimitIn> for RemoteSite {
    type Result = ();
    fn handle(&mut self, msg: LimitIn, ctx: &mut Context<Self>) {
        if msg.limit > self.want_release {
            self.want_release = msg.limit;
            self.want_release_epoch = msg.epoch;
        }
        self.pump(ctx);
    }
}

impl Handler<GetSiteStats> for RemoteSite {
    type Result = MessageResult<GetSiteStats>;
    fn handle(&mut self, _: GetSiteStats, _: &mut Context<Self>) -> Self::Result {
        MessageResult(SiteStats {
            system: self.w.me,
            epoch: self.epoch,
        })
    }
}

impl Handler<Stop> for RemoteSite {
    type Result = ();
    fn handle(&mut self, _: Stop, ctx: &mut Context<Self>) {
        ctx.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(x: u64) -> Timestamp {
        Timestamp(x)
    }

    fn e(base: u64, closes: Option<u64>) -> Option<Epoch> {
        Some(Epoch {
            base: t(base),
            closes_at: closes.map(t),
        })
    }

    /// (case, current, newest, released, prepare, release, want)
    type Row = (
        &'static str,
        Option<Epoch>,
        u64,
        u64,
        Option<(u64, Option<Epoch>)>,
        Option<(u64, Option<Epoch>)>,
        Option<Epoch>,
    );

    #[test]
    fn how_a_site_takes_the_epoch() {
        let rows: Vec<Row> = vec![
            (
                "no epoch, none carried",
                None,
                10,
                10,
                None,
                Some((20, None)),
                None,
            ),
            (
                "a release opens",
                None,
                10,
                10,
                None,
                Some((20, e(15, None))),
                e(15, None),
            ),
            (
                "never below the released limit",
                None,
                10,
                10,
                None,
                Some((20, e(5, None))),
                e(10, None),
            ),
            (
                "an announcement opens",
                None,
                10,
                10,
                Some((20, e(15, None))),
                None,
                e(15, None),
            ),
            (
                "it keeps its base",
                e(15, None),
                20,
                20,
                None,
                Some((30, e(17, None))),
                e(15, None),
            ),
            (
                "an announcement learns closes_at",
                e(15, None),
                20,
                20,
                Some((30, e(15, Some(30)))),
                None,
                e(15, Some(30)),
            ),
            (
                "the release at closes_at closes",
                e(15, Some(30)),
                30,
                20,
                None,
                Some((30, e(15, Some(30)))),
                None,
            ),
            (
                "a release past closes_at closes (its own was lost)",
                e(15, Some(30)),
                30,
                20,
                None,
                Some((40, None)),
                None,
            ),
            (
                "a release without an epoch closes",
                e(15, None),
                20,
                20,
                None,
                Some((30, None)),
                None,
            ),
            (
                "a late release without an epoch does not",
                e(15, None),
                40,
                20,
                None,
                Some((30, None)),
                e(15, None),
            ),
            (
                "a late release of a closed epoch does not close the next",
                e(35, None),
                50,
                20,
                None,
                Some((30, e(15, Some(30)))),
                e(35, None),
            ),
            (
                "an announcement past closes_at replaces it",
                e(15, Some(30)),
                30,
                20,
                Some((40, e(35, None))),
                None,
                e(35, None),
            ),
            (
                "a release past closes_at replaces it",
                e(15, Some(30)),
                30,
                20,
                None,
                Some((40, e(35, None))),
                e(35, None),
            ),
            (
                "another base before closes_at is kept out",
                e(15, Some(30)),
                25,
                20,
                Some((28, e(17, None))),
                None,
                e(15, Some(30)),
            ),
            (
                "an announcement never closes",
                e(15, None),
                20,
                20,
                Some((30, None)),
                None,
                e(15, None),
            ),
        ];
        for (case, current, newest, released, prepare, release, want) in rows {
            let got = RemoteSite::next_epoch(
                current,
                t(newest),
                t(released),
                prepare.map(|(l, m)| (t(l), m)),
                release.map(|(l, m)| (t(l), m)),
            );
            assert_eq!(got, want, "{case}");
        }
    }
}
