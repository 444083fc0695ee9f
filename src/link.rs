//! The link protocol between two systems over a connectionless network, sans I/O.
//!
//! [`LinkCore`] turns messages for peer systems into sealed datagrams no larger than the
//! MTU (many small messages share a datagram; a write packet too large for one is split
//! into [`Part`]s), paces them with a token bucket, and turns arriving datagrams back
//! into messages: authenticated, replay-checked, reassembled. It tracks each peer's
//! liveness (silent for `peer_timeout` = down) and session (a new one = the peer
//! restarted). It owns no socket and reads no clock: the caller passes `now`, sends what
//! [`LinkCore::poll_transmit`] returns to the peer's address, and feeds received
//! datagrams to [`LinkCore::handle_datagram`].
//!
//! Datagrams that carry data are numbered per peer and receipted by the peer's link
//! ([`flow`]): the link paces them by its congestion window and round trip, and sends
//! the items of a lost datagram again (part by part: a lost part of a split write costs
//! that part, not the write). Other messages (acknowledgements, heads, heartbeats,
//! limits) are state that their senders re-send until superseded; they go first, in
//! datagrams of their own, unnumbered. Reliability stays end to end: units retransmit
//! until the remote unit acknowledges durably, and the link's recovery only makes that
//! rare.
//!
//! Invariant (I6): nothing that fails to open, is replayed, malformed or oversized
//! reaches the caller or changes any state but the drop counters.

pub mod flow;
mod received;

use crate::packet::{Message, Packet, Part, Payload, Zipped};
use crate::seal::{Opener, Peer, SealError, Sealer, Session, KEY_LEN, OVERHEAD};
use crate::types::{PairId, Seq, SystemId};
use crate::wire::{self, FRAME_OVERHEAD};
use bytes::Bytes;
use flow::{Flow, FlowStats, Item};
use received::Received;
use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

/// Room a datagram keeps for its [`Message::Number`] (a varint of at most 10 bytes
/// after the variant's tag).
const NUMBER_ROOM: usize = 11;

/// Settings of a link.
#[derive(Clone, Copy, Debug)]
pub struct LinkConfig {
    /// Largest datagram sent, bytes (UDP payload).
    pub mtu: usize,
    /// Largest datagram accepted.
    pub max_datagram: usize,
    /// Most bytes per second to one peer (0: as the congestion window and round trip
    /// allow; the link always paces).
    pub rate: u64,
    /// Bytes that may leave back to back before pacing applies.
    pub burst: u64,
    /// Bytes of data in flight to a peer before its first receipt (the congestion
    /// window's start).
    pub initial_window: usize,
    /// A peer silent this long is down.
    pub peer_timeout: Duration,
    /// Bytes of partly reassembled packets kept at most.
    pub reassembly_bytes: usize,
    /// Partly reassembled packets kept at most.
    pub reassembly_packets: usize,
    /// Largest write accepted in parts.
    pub max_write: u32,
    /// Compress write data on the wire with zstd at this level (`None`: off). A write
    /// travels compressed only if that makes it smaller.
    pub compress: Option<i32>,
}

impl Default for LinkConfig {
    fn default() -> Self {
        LinkConfig {
            mtu: 1400,
            max_datagram: 65_507,
            rate: 0,
            burst: 64 * 1024,
            initial_window: crate::ship::congestion::INITIAL_CWND,
            peer_timeout: Duration::from_secs(3),
            reassembly_bytes: 64 << 20,
            reassembly_packets: 4096,
            max_write: 32 << 20,
            compress: None,
        }
    }
}

/// Something the caller should know about a peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkEvent {
    /// First datagram from the peer, or first after it was down.
    Up(SystemId),
    /// Silent for `peer_timeout`.
    Down(SystemId),
    /// The peer started a new session (it restarted).
    Restarted(SystemId),
}

/// Counters of everything a link did and dropped.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct LinkCounters {
    pub datagrams_out: u64,
    pub bytes_out: u64,
    pub datagrams_in: u64,
    pub bytes_in: u64,
    pub parts_out: u64,
    pub reassembled: u64,
    pub dropped_unauthenticated: u64,
    pub dropped_replay: u64,
    pub dropped_stale_session: u64,
    pub dropped_malformed: u64,
    pub dropped_oversize: u64,
    pub dropped_misaddressed: u64,
    pub dropped_bad_part: u64,
    /// Receipts whose ranges were not well formed (ignored).
    pub dropped_bad_receipt: u64,
    pub reassembly_evicted: u64,
    pub unknown_peer: u64,
    /// Numbered datagrams deemed lost (all peers).
    pub datagrams_lost: u64,
    /// Data items sent again by the link after their datagram was lost.
    pub items_resent: u64,
    /// Data items the link gave up on (the units retransmit them end to end).
    pub items_abandoned: u64,
    /// Losses that turned out to be reordering.
    pub spurious_losses: u64,
    /// Items sent again whose first datagram turned out to have arrived.
    pub spurious_items: u64,
    /// Numbered datagrams received from peers that went in no receipt (their senders
    /// deem them lost and send their items again).
    pub numbers_unreceipted: u64,
    /// Probe timeouts.
    pub probe_timeouts: u64,
    /// Receipts sent.
    pub receipts_out: u64,
    /// Write data offered to compression, and what it became (a write that did not
    /// shrink counts the same on both sides and travels raw).
    pub zip_raw_bytes: u64,
    pub zip_wire_bytes: u64,
    /// Compressed writes that did not decompress to their announced length (dropped).
    pub dropped_bad_zip: u64,
}

impl LinkCounters {
    /// Every datagram dropped for any reason.
    pub fn dropped(&self) -> u64 {
        self.dropped_unauthenticated
            + self.dropped_replay
            + self.dropped_stale_session
            + self.dropped_malformed
            + self.dropped_oversize
            + self.dropped_misaddressed
    }
}

#[derive(Debug)]
struct PeerState {
    last_heard: Option<Instant>,
    up: bool,
    /// Messages waiting to leave: state (unnumbered, first) and data (numbered).
    control: VecDeque<Vec<u8>>,
    data: VecDeque<Item>,
    flow: Flow,
    received: Received,
}

/// What the link shows about one peer's path.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct PathStats {
    pub srtt_us: Option<u64>,
    pub cwnd: usize,
    pub in_flight: usize,
    pub pacing_rate: f64,
    pub flow: FlowStats,
}

/// Which write packet a part belongs to: its sender and its pair, seq and stamp. Every
/// transmission of one packet carries the same identity, so the parts of a
/// retransmission fill the holes the earlier attempts left.
type PartKey = (SystemId, PairId, Seq, crate::types::Timestamp);

/// A write packet being reassembled.
#[derive(Debug)]
struct Partial {
    offset: crate::types::Offset,
    /// `Some(n)`: `buf` is compressed data that decompresses to `n` bytes.
    raw: Option<u32>,
    /// The packet's bytes up to the end of the furthest part received (its capacity is
    /// `total`: parts arriving in order are appended, never zero-filled first).
    buf: Vec<u8>,
    /// The packet's length.
    total: usize,
    /// Byte ranges received so far: sorted, disjoint, not touching.
    have: Vec<(u32, u32)>,
    /// When a part last arrived (a link-wide counter): the least recent is evicted.
    touched: u64,
}

impl Partial {
    /// Records `a..b` as received; returns how many of those bytes are new.
    fn cover(&mut self, a: u32, b: u32) -> u32 {
        let before: u32 = self.have.iter().map(|(x, y)| y - x).sum();
        let (mut lo, mut hi) = (a, b);
        self.have.retain(|&(x, y)| {
            if y < lo || x > hi {
                true
            } else {
                lo = lo.min(x);
                hi = hi.max(y);
                false
            }
        });
        let at = self.have.partition_point(|&(x, _)| x < lo);
        self.have.insert(at, (lo, hi));
        let after: u32 = self.have.iter().map(|(x, y)| y - x).sum();
        after - before
    }

    fn complete(&self) -> bool {
        self.have.len() == 1 && self.have[0] == (0, self.total as u32)
    }
}

pub struct LinkCore {
    me: SystemId,
    cfg: LinkConfig,
    sealer: Sealer,
    opener: Opener,
    peers: BTreeMap<SystemId, PeerState>,
    /// The keys of `peers`, for the round robin of [`LinkCore::poll_transmit`].
    ids: Vec<SystemId>,
    /// The index in `ids` of the peer served first by the next `poll_transmit`.
    turn: usize,
    events: VecDeque<LinkEvent>,
    partial: BTreeMap<PartKey, Partial>,
    partial_bytes: usize,
    touched: u64,
    counters: LinkCounters,
}

impl LinkCore {
    /// A link for system `me` talking to `peers`, sealing under `key` as `session`.
    pub fn new(
        me: SystemId,
        peers: &[SystemId],
        key: &[u8; KEY_LEN],
        session: Session,
        cfg: LinkConfig,
    ) -> Self {
        let ids: Vec<SystemId> = {
            let mut v: Vec<SystemId> = peers.iter().copied().filter(|p| *p != me).collect();
            v.sort_unstable();
            v.dedup();
            v
        };
        LinkCore {
            me,
            cfg,
            sealer: Sealer::new(key, session),
            opener: Opener::new(key, me, cfg.max_datagram),
            peers: peers
                .iter()
                .filter(|p| **p != me)
                .map(|p| {
                    (
                        *p,
                        PeerState {
                            last_heard: None,
                            up: false,
                            control: VecDeque::new(),
                            data: VecDeque::new(),
                            flow: Flow::new(cfg.burst, cfg.rate, cfg.initial_window),
                            received: Received::default(),
                        },
                    )
                })
                .collect(),
            ids,
            turn: 0,
            events: VecDeque::new(),
            partial: BTreeMap::new(),
            partial_bytes: 0,
            touched: 0,
            counters: LinkCounters::default(),
        }
    }

    /// The counters, with the flows' figures summed over peers.
    pub fn counters(&self) -> LinkCounters {
        let mut c = self.counters;
        for p in self.peers.values() {
            let f = p.flow.stats();
            c.datagrams_lost += f.lost;
            c.items_resent += f.resent_items;
            c.items_abandoned += f.abandoned_items;
            c.spurious_losses += f.spurious;
            c.spurious_items += f.spurious_items;
            c.numbers_unreceipted += p.received.unreceipted();
            c.probe_timeouts += f.probe_timeouts;
        }
        c
    }

    /// What the link knows of the path to `peer`.
    pub fn path_stats(&self, peer: SystemId) -> Option<PathStats> {
        let p = self.peers.get(&peer)?;
        Some(PathStats {
            srtt_us: p.flow.srtt().map(|d| d.as_micros() as u64),
            cwnd: p.flow.cwnd(),
            in_flight: p.flow.in_flight(),
            pacing_rate: p.flow.pacing_rate(),
            flow: p.flow.stats(),
        })
    }

    /// Bytes and packets held for reassembly (the fuzz target checks the limits).
    pub(crate) fn reassembly_held(&self) -> (usize, usize) {
        (self.partial_bytes, self.partial.len())
    }

    /// Whether `peer` has been heard from within the timeout.
    pub fn is_up(&self, peer: SystemId) -> bool {
        self.peers.get(&peer).is_some_and(|p| p.up)
    }

    /// Room for items in one datagram.
    fn budget(&self) -> usize {
        self.cfg
            .mtu
            .saturating_sub(OVERHEAD + FRAME_OVERHEAD)
            .max(64)
    }

    /// Room for data items in one datagram (it also carries its number).
    fn data_budget(&self) -> usize {
        self.budget() - NUMBER_ROOM
    }

    /// Queues `msg` for `to`; datagrams are built when they may leave
    /// ([`LinkCore::poll_transmit`]), so many messages queued together share them.
    pub fn send(&mut self, to: SystemId, msg: Message) {
        let budget = self.budget();
        let data_budget = self.data_budget();
        let Some(peer) = self.peers.get_mut(&to) else {
            self.counters.unknown_peer += 1;
            return;
        };
        let mut items = Vec::new();
        explode(msg, &mut items);
        for m in items {
            match m {
                Message::Data(mut ps) if ps.len() == 1 && self.cfg.compress.is_some() => {
                    let level = self.cfg.compress.unwrap_or_default();
                    let p = ps.remove(0);
                    match zip(&p, level) {
                        Some((raw, z)) => {
                            self.counters.zip_raw_bytes += u64::from(raw);
                            self.counters.zip_wire_bytes += z.len() as u64;
                            let parts = split_bytes(&p, z, data_budget);
                            if parts.len() > 1 {
                                self.counters.parts_out += parts.len() as u64;
                            }
                            for part in parts {
                                peer.data.push_back(Item::new(wire::encode_item_split(
                                    &Message::Zipped(Zipped { raw, part }),
                                )));
                            }
                        }
                        None => {
                            let n = data_len(&p) as u64;
                            self.counters.zip_raw_bytes += n;
                            self.counters.zip_wire_bytes += n;
                            push_raw(peer, &mut self.counters, p, data_budget);
                        }
                    }
                }
                Message::Data(mut ps) if ps.len() == 1 => {
                    push_raw(peer, &mut self.counters, ps.remove(0), data_budget);
                }
                // Nothing else grows past a datagram (acks carry a bounded SACK list).
                other => {
                    let bytes = wire::encode_item(&other);
                    debug_assert!(bytes.len() <= budget || budget == 64);
                    peer.control.push_back(bytes);
                }
            }
        }
    }

    /// The next datagram to send now, and to whom; `None` if nothing may leave now (see
    /// [`LinkCore::poll_timeout`]).
    ///
    /// Per peer, in turn: owed receipts and other state messages first, in unnumbered
    /// datagrams that neither wait for the pacer nor count against the window (they are
    /// small and re-sent state); then data, lost items before new ones, in a numbered
    /// datagram, if the window has room and the pacer has tokens. Every datagram's
    /// bytes are taken from the pacer's tokens.
    pub fn poll_transmit(&mut self, now: Instant) -> Option<(SystemId, Vec<u8>)> {
        let mut d = Vec::new();
        let to = self.poll_transmit_into(now, &mut d)?;
        Some((to, d))
    }

    /// As [`LinkCore::poll_transmit`], appending the datagram to `out` (what `out` held
    /// stays): the frame is encoded and sealed in the buffer that is sent, and write data
    /// is copied once, from the packet into it. Returns to whom it goes; `out` is
    /// unchanged if nothing may leave now.
    pub fn poll_transmit_into(&mut self, now: Instant, out: &mut Vec<u8>) -> Option<SystemId> {
        let n = self.ids.len();
        for k in 0..n {
            let to = self.ids[(self.turn + k) % n];
            let start = out.len();
            if self.datagram_for(to, now, out) {
                self.turn = (self.turn + k + 1) % n;
                self.counters.datagrams_out += 1;
                self.counters.bytes_out += (out.len() - start) as u64;
                return Some(to);
            }
        }
        None
    }

    /// Appends the next datagram for `to` that may leave now to `out`, if any.
    fn datagram_for(&mut self, to: SystemId, now: Instant, out: &mut Vec<u8>) -> bool {
        let budget = self.budget();
        let mtu = self.cfg.mtu;
        let me = self.me;
        let Some(peer) = self.peers.get_mut(&to) else {
            return false;
        };
        if let Some(r) = peer.received.poll_receipt(now) {
            self.counters.receipts_out += 1;
            peer.control
                .push_front(wire::encode_item(&Message::Receipt(r)));
        }
        let has_data = !peer.data.is_empty() || peer.flow.has_resend();
        if has_data && peer.flow.may_send(now, mtu) {
            // A numbered datagram: lost items first, then new ones, then state that fits.
            let number = wire::encode_item(&Message::Number(peer.flow.next_number()));
            let mut items: Vec<Item> = Vec::new();
            let mut size = number.len();
            loop {
                let (item, resent) = match peer.flow.take_resend() {
                    Some(i) => (i, true),
                    None => match peer.data.pop_front() {
                        Some(i) => (i, false),
                        None => break,
                    },
                };
                if !items.is_empty() && size + item.len() > budget {
                    if resent {
                        peer.flow.put_back(item);
                    } else {
                        peer.data.push_front(item);
                    }
                    break;
                }
                size += item.len();
                items.push(item);
            }
            let mut state: Vec<Vec<u8>> = Vec::new();
            while let Some(c) = peer.control.front() {
                if size + c.len() > budget {
                    break;
                }
                size += c.len();
                state.extend(peer.control.pop_front());
            }
            let count = 1 + items.len() + state.len();
            out.reserve(OVERHEAD + FRAME_OVERHEAD + size);
            let len = self.sealer.seal_into(out, |out| {
                wire::encode_header_into(out, me, to, count);
                out.extend_from_slice(&number);
                for i in &items {
                    i.write_to(out);
                }
                for c in &state {
                    out.extend_from_slice(c);
                }
            });
            peer.flow.spend(now, len);
            peer.flow.on_sent(now, len, items);
            return true;
        }
        if peer.control.is_empty() {
            return false;
        }
        let mut state: Vec<Vec<u8>> = Vec::new();
        let mut size = 0;
        while let Some(c) = peer.control.front() {
            if !state.is_empty() && size + c.len() > budget {
                break;
            }
            size += c.len();
            state.extend(peer.control.pop_front());
        }
        out.reserve(OVERHEAD + FRAME_OVERHEAD + size);
        let len = self
            .sealer
            .seal_into(out, |out| wire::encode_parts_into(out, me, to, &state));
        peer.flow.spend(now, len);
        true
    }

    /// Datagrams' worth of messages waiting (for the window, the pacer, or a call).
    pub fn backlog(&self) -> usize {
        self.peers
            .values()
            .map(|p| p.control.len() + p.data.len() + usize::from(p.flow.has_resend()))
            .sum()
    }

    /// When to call [`LinkCore::poll_transmit`] or [`LinkCore::handle_timeout`] again:
    /// the pacer's next slot for data the window lets go, a loss or probe timer, or the
    /// next liveness check.
    pub fn poll_timeout(&self, now: Instant) -> Option<Instant> {
        let mtu = self.cfg.mtu;
        let mut next: Option<Instant> = None;
        let mut at = |t: Instant| next = Some(next.map_or(t, |n: Instant| n.min(t)));
        for p in self.peers.values() {
            if !p.control.is_empty() {
                at(now);
            }
            if (!p.data.is_empty() || p.flow.has_resend()) && p.flow.window_open(mtu) {
                at(p.flow.pace_at(now));
            }
            if let Some(t) = p.flow.poll_timeout() {
                at(t);
            }
            if p.up {
                if let Some(t) = p.last_heard {
                    at(t + self.cfg.peer_timeout);
                }
            }
        }
        next
    }

    /// Liveness: peers silent for `peer_timeout` go down.
    ///
    /// Also the flows' timers: losses by time and probe timeouts. A peer that goes down
    /// forgets what was in flight to it and what waited (the units send again when it
    /// is back).
    pub fn handle_timeout(&mut self, now: Instant) {
        for (id, p) in self.peers.iter_mut() {
            p.flow.handle_timeout(now);
            if p.up
                && p.last_heard
                    .is_some_and(|t| now.saturating_duration_since(t) >= self.cfg.peer_timeout)
            {
                p.up = false;
                p.flow.reset();
                p.data.clear();
                self.events.push_back(LinkEvent::Down(*id));
            }
        }
    }

    pub fn poll_event(&mut self) -> Option<LinkEvent> {
        self.events.pop_front()
    }

    /// Takes one received datagram (decrypted in place). Returns the sender and its
    /// messages (parts reassembled into whole data packets), or `None` if it was dropped.
    pub fn handle_datagram(
        &mut self,
        now: Instant,
        datagram: &mut [u8],
    ) -> Option<(SystemId, Vec<Message>)> {
        self.counters.datagrams_in += 1;
        self.counters.bytes_in += datagram.len() as u64;
        let opened = self.opener.open_in_place(datagram);
        self.take_opened(now, opened)
    }

    /// As [`LinkCore::handle_datagram`], taking the datagram's buffer: the write data of
    /// the messages returned shares it (no copy).
    pub fn handle_datagram_owned(
        &mut self,
        now: Instant,
        datagram: Vec<u8>,
    ) -> Option<(SystemId, Vec<Message>)> {
        self.counters.datagrams_in += 1;
        self.counters.bytes_in += datagram.len() as u64;
        let opened = self.opener.open_owned(datagram);
        self.take_opened(now, opened)
    }

    fn take_opened(
        &mut self,
        now: Instant,
        opened: Result<(crate::wire::Frame, Peer), SealError>,
    ) -> Option<(SystemId, Vec<Message>)> {
        let (frame, peer) = match opened {
            Ok(x) => x,
            Err(e) => {
                let c = &mut self.counters;
                match e {
                    SealError::TooShort(_) | SealError::Version(_) | SealError::Wire(_) => {
                        c.dropped_malformed += 1
                    }
                    SealError::TooLong { .. } => c.dropped_oversize += 1,
                    SealError::Unauthenticated => c.dropped_unauthenticated += 1,
                    SealError::Replay(_) => c.dropped_replay += 1,
                    SealError::StaleSession(_) => c.dropped_stale_session += 1,
                    SealError::Misaddressed { .. } => c.dropped_misaddressed += 1,
                }
                return None;
            }
        };
        let from = frame.from;
        let Some(state) = self.peers.get_mut(&from) else {
            // Authentic, but a system this link was not told about.
            self.counters.unknown_peer += 1;
            return None;
        };
        state.last_heard = Some(now);
        let came_up = !state.up;
        state.up = true;
        if let Peer::Restarted { previous: Some(_) } = peer {
            self.events.push_back(LinkEvent::Restarted(from));
            // Its numbers begin again, and nothing in flight to its old self will be
            // receipted.
            state.received.reset();
            state.flow.reset();
            // Parts of the old session can never complete.
            self.drop_partials(from);
        }
        if came_up {
            self.events.push_back(LinkEvent::Up(from));
        }
        let mut out = Vec::with_capacity(frame.messages.len());
        for m in frame.messages {
            match m {
                Message::Number(n) => {
                    if let Some(p) = self.peers.get_mut(&from) {
                        p.received.record(n, now);
                    }
                }
                Message::Receipt(r) => {
                    if !r.is_well_formed() {
                        self.counters.dropped_bad_receipt += 1;
                    } else if let Some(p) = self.peers.get_mut(&from) {
                        p.flow.on_receipt(now, &r);
                    }
                }
                Message::Part(part) => {
                    if let Some(p) = self.reassemble(from, part, None) {
                        out.push(Message::Data(vec![p]));
                    }
                }
                Message::Zipped(z) => {
                    if let Some(p) = self.reassemble(from, z.part, Some(z.raw)) {
                        out.push(Message::Data(vec![p]));
                    }
                }
                other => out.push(other),
            }
        }
        Some((from, out))
    }

    fn drop_partials(&mut self, from: SystemId) {
        let keys: Vec<_> = self
            .partial
            .keys()
            .filter(|k| k.0 == from)
            .copied()
            .collect();
        for k in keys {
            if let Some(p) = self.partial.remove(&k) {
                self.partial_bytes -= p.total;
            }
        }
    }

    /// Evicts the least recently fed partial packet (its sender retransmits it whole).
    fn evict_one(&mut self) -> bool {
        let Some(oldest) = self
            .partial
            .iter()
            .min_by_key(|(_, p)| p.touched)
            .map(|(k, _)| *k)
        else {
            return false;
        };
        if let Some(p) = self.partial.remove(&oldest) {
            self.partial_bytes -= p.total;
            self.counters.reassembly_evicted += 1;
        }
        true
    }

    /// Adds a part to its packet's reassembly; returns the packet once every byte of it
    /// arrived, in any order and over any number of (re)transmissions.
    ///
    /// Invariant: at most `reassembly_packets` partial packets holding at most
    /// `reassembly_bytes` bytes are kept; making room evicts the least recently fed ones
    /// and counts them in `reassembly_evicted`.
    ///
    /// `raw`: the part is of compressed data that decompresses to `raw` bytes (at most
    /// `max_write`; anything else is dropped and counted, never allocated).
    fn reassemble(&mut self, from: SystemId, part: Part, raw: Option<u32>) -> Option<Packet> {
        let end = u64::from(part.at) + part.data.len() as u64;
        if part.total == 0
            || part.total > self.cfg.max_write
            || raw.is_some_and(|r| r == 0 || r > self.cfg.max_write)
            || end > u64::from(part.total)
            || part.data.is_empty()
            || part.total as usize > self.cfg.reassembly_bytes
        {
            self.counters.dropped_bad_part += 1;
            return None;
        }
        let key: PartKey = (from, part.pair, part.stamp.seq, part.stamp.ts);
        self.touched += 1;
        if !self.partial.contains_key(&key) {
            let need = part.total as usize;
            while self.partial_bytes + need > self.cfg.reassembly_bytes
                || self.partial.len() >= self.cfg.reassembly_packets.max(1)
            {
                if !self.evict_one() {
                    break;
                }
            }
            self.partial_bytes += need;
            self.partial.insert(
                key,
                Partial {
                    offset: part.offset,
                    raw,
                    buf: Vec::with_capacity(need),
                    total: need,
                    have: Vec::new(),
                    touched: self.touched,
                },
            );
        }
        let p = self.partial.get_mut(&key)?;
        if p.total != part.total as usize || p.offset != part.offset || p.raw != raw {
            // Same identity, other shape: not a part of this packet.
            self.counters.dropped_bad_part += 1;
            return None;
        }
        p.touched = self.touched;
        let (a, b) = (part.at, end as u32);
        if p.cover(a, b) == 0 {
            return None; // a duplicate part
        }
        // Overlapping bytes of one packet are the same bytes: copying them again is fine.
        let (a, b) = (a as usize, b as usize);
        if p.buf.len() < a {
            p.buf.resize(a, 0); // a gap: later parts fill it
        }
        let overlap = p.buf.len().min(b) - a;
        p.buf[a..a + overlap].copy_from_slice(&part.data[..overlap]);
        p.buf.extend_from_slice(&part.data[overlap..]);
        if !p.complete() {
            return None;
        }
        let done = self.partial.remove(&key)?;
        self.partial_bytes -= done.total;
        let data = match done.raw {
            None => done.buf,
            Some(raw) => match unzip(&done.buf, raw) {
                Some(d) => d,
                None => {
                    self.counters.dropped_bad_zip += 1;
                    return None;
                }
            },
        };
        self.counters.reassembled += 1;
        Some(Packet {
            pair: part.pair,
            stamp: part.stamp,
            payload: Payload::Write {
                offset: done.offset,
                data: Bytes::from(data),
            },
        })
    }
}

fn data_len(p: &Packet) -> usize {
    match &p.payload {
        Payload::Write { data, .. } => data.len(),
        _ => 0,
    }
}

/// One message per item, so each can be packed (and lost) on its own.
fn explode(msg: Message, out: &mut Vec<Message>) {
    match msg {
        Message::Data(ps) => out.extend(ps.into_iter().map(|p| Message::Data(vec![p]))),
        Message::Heartbeats(hs) => out.extend(hs.into_iter().map(|h| Message::Heartbeats(vec![h]))),
        Message::Acks(a) => out.extend(a.into_iter().map(|a| Message::Acks(vec![a]))),
        Message::Heads(h) => out.extend(h.into_iter().map(|h| Message::Heads(vec![h]))),
        other => out.push(other),
    }
}

/// Queues a data packet uncompressed: whole if its encoding fits `budget`, else as
/// parts. A write whose data alone fills a datagram is split without being encoded whole
/// first (that would copy up to a whole write only to measure it).
fn push_raw(peer: &mut PeerState, counters: &mut LinkCounters, p: Packet, budget: usize) {
    let whole = (data_len(&p) < budget)
        .then(|| wire::encode_item_split(&Message::Data(vec![p.clone()])))
        .filter(|(head, tail)| head.len() + tail.len() <= budget);
    match whole {
        Some(encoded) => peer.data.push_back(Item::new(encoded)),
        None => {
            let data = match &p.payload {
                Payload::Write { data, .. } => data.clone(),
                _ => Bytes::new(),
            };
            for part in split_bytes(&p, data, budget) {
                counters.parts_out += 1;
                peer.data
                    .push_back(Item::new(wire::encode_item_split(&Message::Part(part))));
            }
        }
    }
}

/// Writes smaller than this travel raw: compressing them saves too little.
const MIN_ZIP: usize = 256;

/// The write's data compressed at `level`, with its raw length, if that is smaller than
/// the raw data (by at least the bytes a zipped part adds).
fn zip(p: &Packet, level: i32) -> Option<(u32, Bytes)> {
    let Payload::Write { data, .. } = &p.payload else {
        return None;
    };
    if data.len() < MIN_ZIP {
        return None;
    }
    let raw = u32::try_from(data.len()).ok()?;
    let z = zstd::bulk::compress(data, level).ok()?;
    (z.len() + 8 < data.len()).then(|| (raw, Bytes::from(z)))
}

/// Decompresses a zipped write; `None` unless it is exactly `raw` bytes.
fn unzip(z: &[u8], raw: u32) -> Option<Vec<u8>> {
    let d = zstd::bulk::decompress(z, raw as usize).ok()?;
    (d.len() == raw as usize).then_some(d)
}

/// Splits `data` (the packet's write data, raw or compressed) into parts of the packet
/// `p` whose encoding fits `budget`.
fn split_bytes(p: &Packet, data: Bytes, budget: usize) -> Vec<Part> {
    let Payload::Write { offset, .. } = p.payload else {
        return Vec::new();
    };
    // A part's fields other than its data take at most ~48 bytes in postcard (a zipped
    // one 5 more).
    let chunk = budget.saturating_sub(64).max(1);
    let total = data.len() as u32;
    (0..data.len())
        .step_by(chunk)
        .map(|at| Part {
            pair: p.pair,
            stamp: p.stamp,
            offset,
            total,
            at: at as u32,
            data: data.slice(at..(at + chunk).min(data.len())),
        })
        .collect()
}

#[cfg(test)]
mod tests;
