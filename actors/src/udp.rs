//! `UdpLink`: a system's link over a real UDP socket, wrapping the sans-IO
//! [`tidemark::link::LinkCore`]: sealed datagrams, packing, splitting, pacing, liveness.
//!
//! Peers are known by the system id inside the authenticated datagram, never by source
//! address; every datagram goes to the peer's configured `advertise` address, so a proxy
//! or NAT in between works both ways.

use crate::msg::*;
use crate::now;
use crate::route::{Routes, SetRoutes};
use crate::Stop;
use actix::prelude::*;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tidemark::link::{LinkCore, LinkCounters, LinkEvent};
use tidemark::SystemId;
use tokio::net::UdpSocket;

/// What a UDP link shows the outside: counters and which peers are up.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct UdpStatus {
    pub counters: LinkCounters,
    pub peers_up: BTreeMap<String, bool>,
    pub send_errors: u64,
}

/// Datagrams read from the socket.
#[derive(Message)]
#[rtype(result = "()")]
struct Datagrams(Vec<Vec<u8>>);

pub struct UdpLink {
    me: SystemId,
    core: LinkCore,
    std_socket: Option<std::net::UdpSocket>,
    socket: Option<Arc<UdpSocket>>,
    addrs: BTreeMap<SystemId, SocketAddr>,
    names: BTreeMap<SystemId, String>,
    routes: Routes,
    flush_scheduled: bool,
    wake_scheduled: bool,
    send_errors: u64,
    status: Arc<Mutex<UdpStatus>>,
    tick: Duration,
}

impl UdpLink {
    /// `socket` is bound already (so a bad address fails before anything starts);
    /// `addrs` are the peers' advertise addresses.
    pub fn new(
        me: SystemId,
        core: LinkCore,
        socket: std::net::UdpSocket,
        addrs: BTreeMap<SystemId, SocketAddr>,
        names: BTreeMap<SystemId, String>,
        status: Arc<Mutex<UdpStatus>>,
        tick: Duration,
    ) -> Self {
        UdpLink {
            me,
            core,
            std_socket: Some(socket),
            socket: None,
            addrs,
            names,
            routes: Routes::default(),
            flush_scheduled: false,
            wake_scheduled: false,
            send_errors: 0,
            status,
            tick,
        }
    }

    fn name(&self, s: SystemId) -> &str {
        self.names.get(&s).map(String::as_str).unwrap_or("?")
    }

    /// Sends what the pacer lets out; schedules a wake-up for the rest.
    fn transmit(&mut self, ctx: &mut Context<Self>) {
        let Some(socket) = self.socket.clone() else {
            return;
        };
        let t = now();
        while let Some((to, d)) = self.core.poll_transmit(t) {
            let Some(addr) = self.addrs.get(&to) else {
                self.send_errors += 1;
                continue;
            };
            // A full socket buffer drops the datagram, as the network might: the units
            // retransmit end to end.
            if socket.try_send_to(&d, *addr).is_err() {
                self.send_errors += 1;
            }
        }
        if self.core.backlog() > 0 && !self.wake_scheduled {
            self.wake_scheduled = true;
            let wait = self
                .core
                .poll_timeout(t)
                .map(|w| w.saturating_duration_since(t))
                .unwrap_or(Duration::from_millis(1))
                .max(Duration::from_micros(100));
            ctx.run_later(wait, |act, ctx| {
                act.wake_scheduled = false;
                act.transmit(ctx);
            });
        }
    }

    fn events(&mut self) {
        while let Some(e) = self.core.poll_event() {
            match e {
                LinkEvent::Up(p) => {
                    tracing::info!(system = %self.name(self.me), peer = %self.name(p), "peer connected")
                }
                LinkEvent::Down(p) => {
                    tracing::warn!(system = %self.name(self.me), peer = %self.name(p), "peer disconnected (silent for peer_timeout)")
                }
                LinkEvent::Restarted(p) => {
                    tracing::info!(system = %self.name(self.me), peer = %self.name(p), "peer restarted (new session)")
                }
            }
        }
        if let Ok(mut s) = self.status.lock() {
            s.counters = self.core.counters();
            s.send_errors = self.send_errors;
            for (id, name) in &self.names {
                if *id != self.me {
                    s.peers_up.insert(name.clone(), self.core.is_up(*id));
                }
            }
        }
    }
}

impl Actor for UdpLink {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        let Some(std_socket) = self.std_socket.take() else {
            return;
        };
        let socket = match UdpSocket::from_std(std_socket) {
            Ok(s) => Arc::new(s),
            Err(e) => {
                tracing::error!(error = %e, "cannot use the UDP socket");
                ctx.stop();
                return;
            }
        };
        self.socket = Some(socket.clone());
        let me = ctx.address();
        // The reader: one task per socket, batching what is already there.
        ctx.spawn(
            async move {
                let mut buf = vec![0u8; 65_536];
                loop {
                    let n = match socket.recv_from(&mut buf).await {
                        Ok((n, _)) => n,
                        Err(e) => {
                            tracing::debug!(error = %e, "udp receive error");
                            continue;
                        }
                    };
                    let mut batch = vec![buf[..n].to_vec()];
                    while batch.len() < 64 {
                        match socket.try_recv_from(&mut buf) {
                            Ok((n, _)) => batch.push(buf[..n].to_vec()),
                            Err(_) => break,
                        }
                    }
                    me.do_send(Datagrams(batch));
                }
            }
            .into_actor(self),
        );
        ctx.run_interval(self.tick, |act, ctx| {
            act.core.handle_timeout(now());
            act.events();
            act.transmit(ctx);
        });
    }
}

impl Handler<SetRoutes> for UdpLink {
    type Result = ();
    fn handle(&mut self, msg: SetRoutes, _: &mut Context<Self>) {
        self.routes = msg.0;
    }
}

impl Handler<Outbound> for UdpLink {
    type Result = ();
    fn handle(&mut self, msg: Outbound, ctx: &mut Context<Self>) {
        if msg.to == self.me {
            self.routes.deliver(self.me, self.me, vec![msg.msg]);
            return;
        }
        self.core.send(msg.to, msg.msg);
        if !self.flush_scheduled {
            self.flush_scheduled = true;
            ctx.notify(FlushQueued);
        }
    }
}

impl Handler<FlushQueued> for UdpLink {
    type Result = ();
    fn handle(&mut self, _: FlushQueued, ctx: &mut Context<Self>) {
        self.flush_scheduled = false;
        self.core.flush();
        self.transmit(ctx);
    }
}

impl Handler<Datagrams> for UdpLink {
    type Result = ();
    fn handle(&mut self, msg: Datagrams, _: &mut Context<Self>) {
        let t = now();
        let mut by_peer: BTreeMap<SystemId, Vec<tidemark::Message>> = BTreeMap::new();
        for mut d in msg.0 {
            if let Some((from, msgs)) = self.core.handle_datagram(t, &mut d) {
                by_peer.entry(from).or_default().extend(msgs);
            }
        }
        for (from, msgs) in by_peer {
            self.routes.deliver(self.me, from, msgs);
        }
        self.events();
    }
}

impl Handler<GetLinkStats> for UdpLink {
    type Result = MessageResult<GetLinkStats>;
    fn handle(&mut self, _: GetLinkStats, _: &mut Context<Self>) -> Self::Result {
        let c = self.core.counters();
        MessageResult(LinkStats {
            items_sent: c.datagrams_out,
            dropped: c.dropped(),
            duplicated: c.dropped_replay,
            delayed: 0,
        })
    }
}

impl Handler<Stop> for UdpLink {
    type Result = ();
    fn handle(&mut self, _: Stop, ctx: &mut Context<Self>) {
        self.core.flush();
        self.transmit(ctx);
        ctx.stop();
    }
}
