//! `TimeBaseActor`: runs the time base (`tidemark::timebase`) of a primary process whose
//! group has primary systems in other processes. It probes their clocks over the
//! authenticated link, answers their probes, and publishes the commit-wait allowance to
//! the process's local units through a [`CommitGate`].
//!
//! Keeps I2 across processes: a local unit acknowledges a write stamped `t` only once
//! the wall clock passed `t + E`, `E` the measured skew bound; while a peer's clock is
//! unmeasured or beyond `max_clock_skew_ms` nothing is acknowledged.

use crate::msg::{Outbound, ProbeIn, ReplyIn, Stop};
use actix::prelude::*;
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tidemark::timebase::{Allowance, CommitGate, TimeBase};
use tidemark::{HybridClock, Message as WireMessage, SystemId};

/// The time base as `status.json` shows it.
#[derive(Clone, Debug, Default, Serialize)]
pub struct TimeStatus {
    /// "ok" or "held: <why>".
    pub state: String,
    /// The commit-wait applied to every acknowledgement, microseconds.
    pub commit_wait_us: Option<u64>,
    pub max_skew_us: u64,
    /// Per peer primary system: the skew bound and the estimated offset, microseconds.
    pub peers: BTreeMap<String, PeerTime>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct PeerTime {
    pub bound_us: Option<u64>,
    pub offset_us: Option<i64>,
}

pub struct TimeBaseActor {
    core: TimeBase,
    gate: Arc<CommitGate>,
    clock: Arc<HybridClock>,
    /// Probes leave from this system's link.
    prober: SystemId,
    links: BTreeMap<SystemId, Recipient<Outbound>>,
    names: BTreeMap<SystemId, String>,
    status: Arc<Mutex<TimeStatus>>,
    tick: Duration,
    held: Option<String>,
}

impl TimeBaseActor {
    pub fn new(
        core: TimeBase,
        gate: Arc<CommitGate>,
        clock: Arc<HybridClock>,
        prober: SystemId,
        links: BTreeMap<SystemId, Recipient<Outbound>>,
        names: BTreeMap<SystemId, String>,
        status: Arc<Mutex<TimeStatus>>,
    ) -> Self {
        let tick = (core.config().probe_every / 4)
            .clamp(Duration::from_millis(1), Duration::from_millis(25));
        TimeBaseActor {
            core,
            gate,
            clock,
            prober,
            links,
            names,
            status,
            tick,
            held: Some("not measured yet".into()),
        }
    }

    fn name(&self, s: SystemId) -> String {
        self.names.get(&s).cloned().unwrap_or_else(|| s.to_string())
    }

    /// Sends due probes, recomputes the allowance for the next two ticks, publishes it.
    fn on_tick(&mut self) {
        let now = self.clock.wall_ns();
        if let Some(link) = self.links.get(&self.prober) {
            for (peer, sent) in self.core.poll_probes(now) {
                link.do_send(Outbound {
                    to: peer,
                    msg: WireMessage::TimeProbe { sent },
                });
            }
        }
        self.publish(now);
    }

    fn publish(&mut self, now: u64) {
        let a = self.core.allowance(now, self.tick * 2);
        self.gate.publish(a);
        let held = match a {
            Allowance::Wait(_) => None,
            Allowance::Held(why) => Some(why.describe(|s| self.name(s))),
        };
        if held != self.held {
            match &held {
                Some(why) => {
                    tracing::error!(reason = %why, "clock skew not within bound: holding acknowledgements")
                }
                None => tracing::info!("clock skew within bound: acknowledging writes"),
            }
            self.held = held.clone();
        }
        let mut st = TimeStatus {
            state: held.map_or("ok".into(), |w| format!("held: {w}")),
            commit_wait_us: match a {
                Allowance::Wait(d) => Some(d.as_micros() as u64),
                Allowance::Held(_) => None,
            },
            max_skew_us: self.core.config().max_skew.as_micros() as u64,
            peers: BTreeMap::new(),
        };
        for v in self.core.view(now) {
            st.peers.insert(
                self.name(v.peer),
                PeerTime {
                    bound_us: v.bound.map(|b| b.as_micros() as u64),
                    offset_us: v.offset_ns.map(|o| o / 1000),
                },
            );
        }
        if let Ok(mut s) = self.status.lock() {
            *s = st;
        }
    }
}

impl Actor for TimeBaseActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        self.on_tick();
        ctx.run_interval(self.tick, |act, _| act.on_tick());
    }
}

impl Handler<ProbeIn> for TimeBaseActor {
    type Result = ();

    fn handle(&mut self, msg: ProbeIn, _: &mut Context<Self>) {
        if let Some(link) = self.links.get(&msg.at) {
            link.do_send(Outbound {
                to: msg.from,
                msg: WireMessage::TimeReply {
                    sent: msg.sent,
                    remote: self.clock.wall_ns(),
                },
            });
        }
    }
}

impl Handler<ReplyIn> for TimeBaseActor {
    type Result = ();

    fn handle(&mut self, msg: ReplyIn, _: &mut Context<Self>) {
        let now = self.clock.wall_ns();
        if self.core.handle_reply(msg.from, msg.sent, msg.remote, now) {
            self.publish(now);
        } else {
            tracing::debug!(from = %self.name(msg.from), "clock answer ignored");
        }
    }
}

impl Handler<Stop> for TimeBaseActor {
    type Result = ();
    fn handle(&mut self, _: Stop, ctx: &mut Context<Self>) {
        ctx.stop();
    }
}
