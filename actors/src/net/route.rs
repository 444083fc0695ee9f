//! Where a system's link delivers what arrives: data and heartbeats to remote units by
//! pair, acknowledgements to local units, head reports and durable acknowledgements to
//! the orderer, announcements and releases to the remote site. Shared by every link.
//!
//! Recipients are held by the messages they take (`Recipient<..>`), not as addresses of
//! concrete actors: the network knows the messages (`crate::msg`) and nothing else.

use crate::msg::*;
use actix::dev::ToEnvelope;
use actix::prelude::*;
use std::cell::Cell;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use tidemark::{Message as WireMessage, PairId, SystemId};

/// Items without a recipient are logged at most once per this interval (the rest are
/// counted and the next log line says how many): a stream of them must not flood the log.
const MISROUTE_LOG_EVERY: Duration = Duration::from_secs(1);

/// The actors of one system, by what they receive.
#[derive(Clone, Default)]
pub struct Routes {
    /// Local units take acknowledgements and verify checksums.
    pub local_units: BTreeMap<PairId, LocalUnitRoute>,
    pub remote_units: BTreeMap<PairId, RemoteUnitRoute>,
    pub orderer: Option<OrdererRoute>,
    pub site: Option<SiteRoute>,
    /// The process's time base, if other primary processes stamp writes of the group.
    pub timebase: Option<TimeBaseRoute>,
    misroute_log: LogLimit,
}

/// A local unit: acknowledgements and verify checksums of its pair.
#[derive(Clone)]
pub struct LocalUnitRoute {
    pub acks: Recipient<AcksIn>,
    pub sums: Recipient<VerifySumsIn>,
}

impl LocalUnitRoute {
    pub fn of<A>(a: &Addr<A>) -> Self
    where
        A: Handler<AcksIn> + Handler<VerifySumsIn>,
        A::Context: ToEnvelope<A, AcksIn> + ToEnvelope<A, VerifySumsIn>,
    {
        LocalUnitRoute {
            acks: a.clone().recipient(),
            sums: a.clone().recipient(),
        }
    }
}

/// A remote unit: data packets, heartbeats and verify requests of its pair.
#[derive(Clone)]
pub struct RemoteUnitRoute {
    pub packets: Recipient<PacketsIn>,
    pub heartbeats: Recipient<HeartbeatsIn>,
    pub verify: Recipient<VerifyIn>,
}

impl RemoteUnitRoute {
    pub fn of<A>(a: &Addr<A>) -> Self
    where
        A: Handler<PacketsIn> + Handler<HeartbeatsIn> + Handler<VerifyIn>,
        A::Context:
            ToEnvelope<A, PacketsIn> + ToEnvelope<A, HeartbeatsIn> + ToEnvelope<A, VerifyIn>,
    {
        RemoteUnitRoute {
            packets: a.clone().recipient(),
            heartbeats: a.clone().recipient(),
            verify: a.clone().recipient(),
        }
    }
}

/// The group's orderer: head reports and durable acknowledgements.
#[derive(Clone)]
pub struct OrdererRoute {
    pub heads: Recipient<HeadsIn>,
    pub durable: Recipient<DurableIn>,
}

impl OrdererRoute {
    pub fn of<A>(a: &Addr<A>) -> Self
    where
        A: Handler<HeadsIn> + Handler<DurableIn>,
        A::Context: ToEnvelope<A, HeadsIn> + ToEnvelope<A, DurableIn>,
    {
        OrdererRoute {
            heads: a.clone().recipient(),
            durable: a.clone().recipient(),
        }
    }
}

/// A remote system's site: announced and released limits.
#[derive(Clone)]
pub struct SiteRoute {
    pub announce: Recipient<AnnounceIn>,
    pub release: Recipient<LimitIn>,
}

impl SiteRoute {
    pub fn of<A>(a: &Addr<A>) -> Self
    where
        A: Handler<AnnounceIn> + Handler<LimitIn>,
        A::Context: ToEnvelope<A, AnnounceIn> + ToEnvelope<A, LimitIn>,
    {
        SiteRoute {
            announce: a.clone().recipient(),
            release: a.clone().recipient(),
        }
    }
}

/// The process's time base: clock probes and their answers.
#[derive(Clone)]
pub struct TimeBaseRoute {
    pub probe: Recipient<ProbeIn>,
    pub reply: Recipient<ReplyIn>,
}

impl TimeBaseRoute {
    pub fn of<A>(a: &Addr<A>) -> Self
    where
        A: Handler<ProbeIn> + Handler<ReplyIn>,
        A::Context: ToEnvelope<A, ProbeIn> + ToEnvelope<A, ReplyIn>,
    {
        TimeBaseRoute {
            probe: a.clone().recipient(),
            reply: a.clone().recipient(),
        }
    }
}

/// At most one log line per [`MISROUTE_LOG_EVERY`]; counts what it held back.
#[derive(Clone, Default)]
struct LogLimit(Cell<(Option<Instant>, u64)>);

impl LogLimit {
    /// Whether to log an event at `now`; if so, how many were held back before it.
    fn allow(&self, now: Instant) -> Option<u64> {
        let (last, held) = self.0.get();
        if last.is_none_or(|t| now.saturating_duration_since(t) >= MISROUTE_LOG_EVERY) {
            self.0.set((Some(now), 0));
            Some(held)
        } else {
            self.0.set((last, held + 1));
            None
        }
    }
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
            if let Some(held_back) = self.misroute_log.allow(Instant::now()) {
                tracing::warn!(system = %me, %from, what, held_back, "no recipient here; dropped");
            }
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
                WireMessage::Announce { limit, epoch } => match &self.site {
                    Some(s) => s.announce.do_send(AnnounceIn { limit, epoch }),
                    None => miss("announce"),
                },
                WireMessage::Release { limit, epoch } => match &self.site {
                    Some(s) => s.release.do_send(LimitIn { limit, epoch }),
                    None => miss("release"),
                },
                WireMessage::Durable { system, limit } => match &self.orderer {
                    Some(o) => o.durable.do_send(DurableIn { system, limit }),
                    None => miss("durable"),
                },
                WireMessage::TimeProbe { sent } => match &self.timebase {
                    Some(t) => t.probe.do_send(ProbeIn { at: me, from, sent }),
                    None => miss("clock probe"),
                },
                WireMessage::TimeReply { sent, remote } => match &self.timebase {
                    Some(t) => t.reply.do_send(ReplyIn { from, sent, remote }),
                    None => miss("clock answer"),
                },
                // Links reassemble parts before delivering.
                WireMessage::Part(_) | WireMessage::Zipped(_) => miss("part"),
                WireMessage::Number(_) | WireMessage::Receipt(_) => miss("link message"),
                WireMessage::VerifyRequest(req) => match self.remote_units.get(&req.pair) {
                    Some(u) => u.verify.do_send(VerifyIn { from, req }),
                    None => miss("verify request"),
                },
                WireMessage::VerifySums(sums) => match self.local_units.get(&sums.pair) {
                    Some(u) => u.sums.do_send(VerifySumsIn(sums)),
                    None => miss("verify sums"),
                },
            }
        }
        for (pair, ps) in data {
            match self.remote_units.get(&pair) {
                Some(u) => u.packets.do_send(PacketsIn(ps)),
                None => miss("data"),
            }
        }
        for (pair, hs) in hbs {
            match self.remote_units.get(&pair) {
                Some(u) => u.heartbeats.do_send(HeartbeatsIn(hs)),
                None => miss("heartbeat"),
            }
        }
        for (pair, a) in acks {
            match self.local_units.get(&pair) {
                Some(u) => u.acks.do_send(AcksIn(a)),
                None => miss("ack"),
            }
        }
        if !heads.is_empty() {
            match &self.orderer {
                Some(o) => o.heads.do_send(HeadsIn(heads)),
                None => miss("head report"),
            }
        }
        misrouted
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidemark::{Heartbeat, Seq, Stamp, Timestamp};

    #[test]
    fn items_without_recipient_are_counted() {
        let routes = Routes::default();
        let hbs = (0..100)
            .map(|i| Heartbeat {
                pair: PairId(i),
                stamp: Stamp {
                    ts: Timestamp(1),
                    seq: Seq(1),
                },
            })
            .collect();
        let n = routes.deliver(SystemId(0), SystemId(1), vec![WireMessage::Heartbeats(hbs)]);
        assert_eq!(n, 100);
    }

    #[test]
    fn log_limit_allows_one_line_per_interval_and_counts_the_rest() {
        let l = LogLimit::default();
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        assert_eq!(l.allow(at(0)), Some(0));
        assert_eq!(l.allow(at(1)), None);
        assert_eq!(l.allow(at(999)), None);
        assert_eq!(l.allow(at(1000)), Some(2));
        assert_eq!(l.allow(at(1500)), None);
        assert_eq!(l.allow(at(5000)), Some(1));
        // A clock that steps back holds back too, never panics.
        assert_eq!(l.allow(at(10)), None);
    }
}
