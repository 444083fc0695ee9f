//! `UdpLink`: a system's link over a real UDP socket, wrapping the sans-IO
//! [`tidemark::link::LinkCore`]: sealed datagrams, packing, splitting, pacing, liveness.
//!
//! Peers are known by the system id inside the authenticated datagram, never by source
//! address; every datagram goes to the peer's configured `advertise` address, so a proxy
//! or NAT in between works both ways.
//!
//! Syscalls are batched through `quinn-udp`: consecutive datagrams to one peer that have
//! the same length (the full-MTU parts of split writes; the last one may be shorter) leave
//! in one `sendmsg` with UDP GSO where the kernel has it, and arrive through `recvmmsg`
//! (with UDP GRO: one buffer of several datagrams, split at `stride`). Where GSO is
//! missing or fails, datagrams leave one per syscall.

use crate::msg::*;
use crate::net::route::{Routes, SetRoutes};
use actix::prelude::*;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tidemark::link::{LinkCore, LinkCounters, LinkEvent};
use tidemark::SystemId;
use tokio::io::Interest;
use tokio::net::UdpSocket;

/// Most bytes one GSO send carries (the kernel's limit is 64 KiB of UDP payload).
const GSO_BYTES: usize = 60_000;
/// Bytes of one receive buffer: room for the largest datagram, or a GRO batch.
const RECV_SLOT: usize = 65_536;

/// What a UDP link shows the outside: counters and which peers are up.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct UdpStatus {
    pub counters: LinkCounters,
    pub peers_up: BTreeMap<String, bool>,
    /// Per peer: round trip, congestion window, bytes in flight, pacing rate and the
    /// link's loss recovery figures.
    pub paths: BTreeMap<String, tidemark::link::PathStats>,
    pub send_errors: u64,
    /// The socket's receive buffer as the kernel reports it (bytes; 0: unknown).
    pub recv_buffer: usize,
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
    state: Option<Arc<quinn_udp::UdpSocketState>>,
    /// Datagrams to one address waiting to leave in one GSO send.
    gso: GsoBatch,
    addrs: BTreeMap<SystemId, SocketAddr>,
    names: BTreeMap<SystemId, String>,
    routes: Routes,
    flush_scheduled: bool,
    /// The earliest wake-up scheduled.
    wake_at: Option<std::time::Instant>,
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
        if let Ok(mut s) = status.lock() {
            s.recv_buffer = socket2::SockRef::from(&socket)
                .recv_buffer_size()
                .unwrap_or(0);
        }
        UdpLink {
            me,
            core,
            std_socket: Some(socket),
            socket: None,
            state: None,
            gso: GsoBatch::default(),
            addrs,
            names,
            routes: Routes::default(),
            flush_scheduled: false,
            wake_at: None,
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
        let (Some(socket), Some(state)) = (self.socket.clone(), self.state.clone()) else {
            return;
        };
        let t = now();
        let max_segments = state.max_gso_segments().max(1);
        loop {
            // The link seals the next datagram straight into the batch's buffer.
            let start = self.gso.buf.len();
            let Some(to) = self.core.poll_transmit_into(t, &mut self.gso.buf) else {
                break;
            };
            let len = self.gso.buf.len() - start;
            let Some(addr) = self.addrs.get(&to).copied() else {
                self.gso.buf.truncate(start);
                self.send_errors += 1;
                continue;
            };
            if !self.gso.takes(addr, len, max_segments) {
                // Send the batch before it; the new datagram starts the next one.
                self.send_errors += self.gso.send(&socket, &state, start);
            }
            self.gso.added(addr, len);
            if self.gso.full(max_segments) {
                self.send_errors += self.gso.send(&socket, &state, self.gso.buf.len());
            }
        }
        self.send_errors += self.gso.send(&socket, &state, self.gso.buf.len());
        self.arm(ctx, t);
    }

    /// Schedules a wake-up at the core's next deadline (the pacer's next slot, a loss or
    /// probe timer) unless one at or before it is already scheduled. The periodic tick
    /// stays the safety net.
    fn arm(&mut self, ctx: &mut Context<Self>, t: std::time::Instant) {
        let Some(due) = self.core.poll_timeout(t) else {
            return;
        };
        let due = due.max(t + Duration::from_micros(100));
        if self.wake_at.is_some_and(|w| w <= due) {
            return;
        }
        self.wake_at = Some(due);
        ctx.run_later(due.saturating_duration_since(t), |act, ctx| {
            let now = now();
            if act.wake_at.is_some_and(|w| w <= now) {
                act.wake_at = None;
            }
            act.core.handle_timeout(now);
            act.events();
            act.transmit(ctx);
        });
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
                    if let Some(p) = self.core.path_stats(*id) {
                        s.paths.insert(name.clone(), p);
                    }
                }
            }
        }
    }
}

/// Consecutive datagrams to one address, all `segment` bytes long but the last, which may
/// be shorter: what one `sendmsg` with UDP GSO sends as separate datagrams. The link
/// seals each datagram in `buf` itself, after the batch's earlier ones (no copy).
#[derive(Default)]
struct GsoBatch {
    addr: Option<SocketAddr>,
    /// The batch's datagrams, back to back, and perhaps (at its end) one just sealed
    /// that is not counted yet.
    buf: Vec<u8>,
    segment: usize,
    count: usize,
    /// A shorter datagram ended the batch.
    closed: bool,
}

impl GsoBatch {
    /// Whether the datagram of `len` bytes to `addr` just written at the end of `buf`
    /// can join this batch.
    fn takes(&self, addr: SocketAddr, len: usize, max_segments: usize) -> bool {
        self.count == 0
            || (self.addr == Some(addr)
                && !self.closed
                && len <= self.segment
                && self.count < max_segments
                && self.buf.len() <= GSO_BYTES)
    }

    /// Counts the datagram at the end of `buf` in; the caller checked
    /// [`GsoBatch::takes`] (and sent the batch before it if not).
    fn added(&mut self, addr: SocketAddr, len: usize) {
        if self.count == 0 {
            self.addr = Some(addr);
            self.segment = len;
        } else if len < self.segment {
            self.closed = true;
        }
        self.count += 1;
    }

    /// Whether no further datagram of the batch's size could join it: send it now,
    /// rather than move the next datagram out of its way later.
    fn full(&self, max_segments: usize) -> bool {
        self.closed || self.count >= max_segments || self.buf.len() + self.segment > GSO_BYTES
    }

    /// Sends the batch, the first `upto` bytes of `buf`, and returns how many datagrams
    /// could not be sent; what followed them in `buf` (a datagram not in the batch) moves
    /// to its start. A full socket buffer drops them, as the network might: the units
    /// retransmit end to end. If the GSO send fails otherwise (quinn-udp then turns GSO
    /// off for this socket), the datagrams are sent one by one.
    fn send(&mut self, socket: &UdpSocket, state: &quinn_udp::UdpSocketState, upto: usize) -> u64 {
        let Some(addr) = self.addr.take() else {
            return 0;
        };
        let count = std::mem::take(&mut self.count);
        let segment = std::mem::take(&mut self.segment);
        self.closed = false;
        let one = |contents: &[u8], segment_size: Option<usize>| {
            let t = quinn_udp::Transmit {
                destination: addr,
                ecn: None,
                contents,
                segment_size,
                src_ip: None,
            };
            socket.try_io(Interest::WRITABLE, || state.try_send(socket.into(), &t))
        };
        let batch = &self.buf[..upto];
        let failed = match one(batch, (count > 1).then_some(segment)) {
            Ok(()) => 0,
            Err(e) if count == 1 || e.kind() == std::io::ErrorKind::WouldBlock => count as u64,
            Err(_) => batch
                .chunks(segment.max(1))
                .filter(|d| one(d, None).is_err())
                .count() as u64,
        };
        self.buf.drain(..upto);
        failed
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
        let state = match quinn_udp::UdpSocketState::new((&*socket).into()) {
            Ok(s) => Arc::new(s),
            Err(e) => {
                tracing::error!(error = %e, "cannot set up the UDP socket");
                ctx.stop();
                return;
            }
        };
        self.socket = Some(socket.clone());
        self.state = Some(state.clone());
        let me = ctx.address();
        // The reader: one task per socket, taking up to BATCH_SIZE buffers (each one
        // datagram, or several coalesced by GRO) per syscall, up to 64 datagrams per
        // message to the actor.
        ctx.spawn(
            async move {
                // The buffers offered to one `recvmmsg`, sized to the load: doubled (up to
                // quinn-udp's batch) when a call fills them all, halved when a call
                // fills a quarter or less; a new buffer is allocated only when one is
                // handed on or the batch grows.
                let max_slots = quinn_udp::BATCH_SIZE.max(1);
                let mut slots = 4.min(max_slots);
                let mut bufs = vec![vec![0u8; RECV_SLOT]; slots];
                let mut meta = vec![quinn_udp::RecvMeta::default(); max_slots];
                loop {
                    if let Err(e) = socket.readable().await {
                        tracing::debug!(error = %e, "udp receive error");
                        continue;
                    }
                    let mut batch = Vec::new();
                    while batch.len() < 64 {
                        bufs.resize_with(slots, || vec![0u8; RECV_SLOT]);
                        let mut io: Vec<std::io::IoSliceMut<'_>> = bufs
                            .iter_mut()
                            .take(slots)
                            .map(|b| std::io::IoSliceMut::new(b))
                            .collect();
                        let got = socket.try_io(Interest::READABLE, || {
                            state.recv((&*socket).into(), &mut io, &mut meta[..slots])
                        });
                        let n = match got {
                            Ok(n) => n,
                            Err(e) => {
                                if e.kind() != std::io::ErrorKind::WouldBlock {
                                    tracing::debug!(error = %e, "udp receive error");
                                }
                                break;
                            }
                        };
                        drop(io);
                        if n >= slots {
                            slots = (slots * 2).min(max_slots);
                        } else if n <= slots / 4 {
                            slots = (slots / 2).max(1);
                        }
                        for (m, b) in meta.iter().zip(&mut bufs).take(n) {
                            let len = m.len.min(b.len());
                            let stride = if m.stride == 0 { len.max(1) } else { m.stride };
                            if stride >= len && len >= RECV_SLOT / 2 {
                                // One large datagram: hand the buffer itself on (the
                                // link decrypts it in place and the write data in it
                                // travels on as slices of it) and read into a new one.
                                let mut d = std::mem::replace(b, vec![0u8; RECV_SLOT]);
                                d.truncate(len);
                                batch.push(d);
                            } else {
                                batch.extend(b[..len].chunks(stride).map(<[u8]>::to_vec));
                            }
                        }
                    }
                    if !batch.is_empty() {
                        me.do_send(Datagrams(batch));
                    }
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
        self.transmit(ctx);
    }
}

impl Handler<Datagrams> for UdpLink {
    type Result = ();
    fn handle(&mut self, msg: Datagrams, ctx: &mut Context<Self>) {
        let t = now();
        let mut by_peer: BTreeMap<SystemId, Vec<tidemark::Message>> = BTreeMap::new();
        for d in msg.0 {
            if let Some((from, msgs)) = self.core.handle_datagram_owned(t, d) {
                by_peer.entry(from).or_default().extend(msgs);
            }
        }
        for (from, msgs) in by_peer {
            self.routes.deliver(self.me, from, msgs);
        }
        self.events();
        // Receipts are owed, and receipts taken may have opened the window.
        self.transmit(ctx);
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
        self.transmit(ctx);
        ctx.stop();
    }
}
