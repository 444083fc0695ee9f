//! Where a system's link delivers what arrives: data and heartbeats to remote units by
//! pair, acknowledgements to local units, head reports and durable acknowledgements to
//! the orderer, announcements and releases to the remote site. Shared by every link.

use crate::local::LocalUnit;
use crate::msg::*;
use crate::orderer::OrdererActor;
use crate::remote::RemoteUnit;
use crate::site::RemoteSite;
use crate::timebase::{ProbeIn, ReplyIn, TimeBaseActor};
use actix::prelude::*;
use std::collections::BTreeMap;
use tidemark::{Message as WireMessage, PairId, SystemId};

/// The actors of one system, by what they receive.
#[derive(Clone, Default)]
pub struct Routes {
    pub local_units: BTreeMap<PairId, Addr<LocalUnit>>,
    pub remote_units: BTreeMap<PairId, Addr<RemoteUnit>>,
    pub orderer: Option<Addr<OrdererActor>>,
    pub site: Option<Addr<RemoteSite>>,
    /// The process's time base, if other primary processes stamp writes of the group.
    pub timebase: Option<Addr<TimeBaseActor>>,
}

#[derive(Message)]
#[rtype(result = "()")]
pub struct SetRoutes(pub Routes);

impl Routes {
    /// Hands messages from system `from` to this system's actors, one actix message per
    /// recipient. Returns how many items had no recipient here (dropped and logged).
    pub fn deliver(&self, me: SystemId, from: SystemId, msgs: Vec<WireMessage>) -> u64 {
        let mut data: BTreeMap<PairId, Vec<_>> = BTreeMap::new();
        let mut hbs: BTreeMap<PairId, Vec<_>> = BTreeMap::new();
        let mut acks: BTreeMap<PairId, Vec<_>> = BTreeMap::new();
        let mut heads = Vec::new();
        let mut misrouted = 0;
        let mut miss = |what: &str| {
            misrouted += 1;
            tracing::warn!(system = %me, %from, what, "no recipient here; dropped");
        };
        for m in msgs {
            match m {
                WireMessage::Data(ps) => {
                    for p in ps {
                        data.entry(p.pair).or_default().push(p);
                    }
                }
                WireMessage::Heartbeats(hs) => {
                    for h in hs {
                        hbs.entry(h.pair).or_default().push(h);
                    }
                }
                WireMessage::Acks(a) => {
                    for a in a {
                        acks.entry(a.pair).or_default().push(a);
                    }
                }
                WireMessage::Heads(h) => heads.extend(h),
                WireMessage::Announce { limit } => match &self.site {
                    Some(s) => s.do_send(AnnounceIn(limit)),
                    None => miss("announce"),
                },
                WireMessage::Release { limit } => match &self.site {
                    Some(s) => s.do_send(LimitIn(limit)),
                    None => miss("release"),
                },
                WireMessage::Durable { system, limit } => match &self.orderer {
                    Some(o) => o.do_send(DurableIn { system, limit }),
                    None => miss("durable"),
                },
                WireMessage::TimeProbe { sent } => match &self.timebase {
                    Some(t) => t.do_send(ProbeIn { at: me, from, sent }),
                    None => miss("clock probe"),
                },
                WireMessage::TimeReply { sent, remote } => match &self.timebase {
                    Some(t) => t.do_send(ReplyIn { from, sent, remote }),
                    None => miss("clock answer"),
                },
                // Links reassemble parts before delivering.
                WireMessage::Part(_) => miss("part"),
            }
        }
        for (pair, ps) in data {
            match self.remote_units.get(&pair) {
                Some(u) => u.do_send(PacketsIn(ps)),
                None => miss("data"),
            }
        }
        for (pair, hs) in hbs {
            match self.remote_units.get(&pair) {
                Some(u) => u.do_send(HeartbeatsIn(hs)),
                None => miss("heartbeat"),
            }
        }
        for (pair, a) in acks {
            match self.local_units.get(&pair) {
                Some(u) => u.do_send(AcksIn(a)),
                None => miss("ack"),
            }
        }
        if !heads.is_empty() {
            match &self.orderer {
                Some(o) => o.do_send(HeadsIn(heads)),
                None => miss("head report"),
            }
        }
        misrouted
    }
}
