//! The in-process `Link`: one actor per system, moving messages between systems through
//! a seeded impaired network (loss, duplication, reordering, delay on every item).
//!
//! Outbound messages from the system's actors are queued per destination and flushed
//! together (one actix message per destination per flush: many units' packets share a
//! "datagram"). Arriving messages go to this system's actors through [`Routes`].
//!
//! Reliability is end to end, not here: local units retransmit until acknowledged, and
//! heads, announcements and releases are state that is re-sent until superseded.

use crate::msg::*;
use crate::net::impair::Impairment;
use crate::net::route::{Routes, SetRoutes};
use actix::prelude::*;
use rand::SeedableRng;
use rand_pcg::Pcg64Mcg;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tidemark::{Message as WireMessage, PairId, SystemId};

/// Per-pair counters of what the network did to a pair's data packets.
#[derive(Debug, Default)]
pub struct PairCounters {
    pub dropped: AtomicU64,
    pub duplicated: AtomicU64,
}

/// The in-process links of the other systems.
#[derive(Message)]
#[rtype(result = "()")]
pub struct SetPeers(pub BTreeMap<SystemId, Addr<Link>>);

pub struct Link {
    me: SystemId,
    routes: Routes,
    peers: BTreeMap<SystemId, Addr<Link>>,
    impair: Impairment,
    rng: Pcg64Mcg,
    queued: BTreeMap<SystemId, Vec<WireMessage>>,
    flush_scheduled: bool,
    counters: Arc<[PairCounters]>,
    stats: LinkStats,
    fates: Vec<Duration>,
    /// Cut off the network (an outage): everything sent or arriving is dropped.
    down: bool,
}

/// Cuts this system off the network (`true`: an outage; every message it sends or that
/// arrives for it is dropped) or puts it back (`false`). For tests and the demo.
#[derive(Message)]
#[rtype(result = "()")]
pub struct SetDown(pub bool);

impl Handler<SetDown> for Link {
    type Result = ();
    fn handle(&mut self, msg: SetDown, _: &mut Context<Self>) {
        self.down = msg.0;
    }
}

/// Delays are rounded to this, so that items due together travel together.
const DELAY_GRAIN: Duration = Duration::from_micros(250);

impl Link {
    pub fn new(me: SystemId, impair: Impairment, seed: u64, counters: Arc<[PairCounters]>) -> Self {
        Link {
            me,
            routes: Routes::default(),
            peers: BTreeMap::new(),
            impair,
            rng: Pcg64Mcg::seed_from_u64(
                seed ^ (u64::from(me.0) + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15),
            ),
            queued: BTreeMap::new(),
            flush_scheduled: false,
            counters,
            stats: LinkStats::default(),
            fates: Vec::new(),
            down: false,
        }
    }

    /// Splits a message into items, each with its own fate on the network.
    fn items(msg: WireMessage, out: &mut Vec<(Option<PairId>, WireMessage)>) {
        match msg {
            WireMessage::Data(ps) => out.extend(
                ps.into_iter()
                    .map(|p| (Some(p.pair), WireMessage::Data(vec![p]))),
            ),
            WireMessage::Heartbeats(hs) => out.extend(
                hs.into_iter()
                    .map(|h| (None, WireMessage::Heartbeats(vec![h]))),
            ),
            WireMessage::Acks(acks) => {
                out.extend(acks.into_iter().map(|a| (None, WireMessage::Acks(vec![a]))))
            }
            WireMessage::Heads(hs) => {
                out.extend(hs.into_iter().map(|h| (None, WireMessage::Heads(vec![h]))))
            }
            other => out.push((None, other)),
        }
    }

    fn send_impaired(&mut self, to: SystemId, msgs: Vec<WireMessage>, ctx: &mut Context<Self>) {
        let Some(peer) = self.peers.get(&to).cloned().filter(|_| !self.down) else {
            self.stats.dropped += msgs.len() as u64;
            return;
        };
        if self.impair.is_perfect() {
            self.stats.items_sent += msgs.len() as u64;
            peer.do_send(Deliver {
                from: self.me,
                msgs,
            });
            return;
        }
        let mut items = Vec::new();
        for m in msgs {
            Self::items(m, &mut items);
        }
        let mut due: BTreeMap<Duration, Vec<WireMessage>> = BTreeMap::new();
        let mut fates = std::mem::take(&mut self.fates);
        for (pair, item) in items {
            self.stats.items_sent += 1;
            self.impair.fate(&mut self.rng, &mut fates);
            let counter = pair.and_then(|p| self.counters.get(p.0 as usize));
            match fates.len() {
                0 => {
                    self.stats.dropped += 1;
                    if let Some(c) = counter {
                        c.dropped.fetch_add(1, Ordering::Relaxed);
                    }
                }
                1 => {}
                _ => {
                    self.stats.duplicated += 1;
                    if let Some(c) = counter {
                        c.duplicated.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            for d in &fates {
                let grains = d.as_nanos() / DELAY_GRAIN.as_nanos();
                let d = DELAY_GRAIN * grains as u32;
                due.entry(d).or_default().push(item.clone());
            }
        }
        self.fates = fates;
        let me = self.me;
        for (d, msgs) in due {
            if d.is_zero() {
                peer.do_send(Deliver { from: me, msgs });
            } else {
                self.stats.delayed += msgs.len() as u64;
                let peer = peer.clone();
                ctx.run_later(d, move |_, _| peer.do_send(Deliver { from: me, msgs }));
            }
        }
    }
}

impl Actor for Link {
    type Context = Context<Self>;
}

impl Handler<SetRoutes> for Link {
    type Result = ();
    fn handle(&mut self, msg: SetRoutes, _: &mut Context<Self>) {
        self.routes = msg.0;
    }
}

impl Handler<SetPeers> for Link {
    type Result = ();
    fn handle(&mut self, msg: SetPeers, _: &mut Context<Self>) {
        self.peers = msg.0;
    }
}

impl Handler<Outbound> for Link {
    type Result = ();
    fn handle(&mut self, msg: Outbound, ctx: &mut Context<Self>) {
        if msg.to == self.me {
            self.stats.dropped += self.routes.deliver(self.me, self.me, vec![msg.msg]);
            return;
        }
        self.queued.entry(msg.to).or_default().push(msg.msg);
        if !self.flush_scheduled {
            self.flush_scheduled = true;
            ctx.notify(FlushQueued);
        }
    }
}

impl Handler<FlushQueued> for Link {
    type Result = ();
    fn handle(&mut self, _: FlushQueued, ctx: &mut Context<Self>) {
        self.flush_scheduled = false;
        for (to, msgs) in std::mem::take(&mut self.queued) {
            self.send_impaired(to, msgs, ctx);
        }
    }
}

impl Handler<Deliver> for Link {
    type Result = ();
    fn handle(&mut self, msg: Deliver, _: &mut Context<Self>) {
        if self.down {
            self.stats.dropped += msg.msgs.len() as u64;
            return;
        }
        self.stats.dropped += self.routes.deliver(self.me, msg.from, msg.msgs);
    }
}

impl Handler<GetLinkStats> for Link {
    type Result = MessageResult<GetLinkStats>;
    fn handle(&mut self, _: GetLinkStats, _: &mut Context<Self>) -> Self::Result {
        MessageResult(self.stats)
    }
}

impl Handler<Stop> for Link {
    type Result = ();
    fn handle(&mut self, _: Stop, ctx: &mut Context<Self>) {
        ctx.stop();
    }
}
