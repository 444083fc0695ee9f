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
//! Delivery is at most once per datagram and unordered; reliability is end to end
//! (units retransmit until acknowledged; heads and limits are re-sent state).
//!
//! Invariant (I6): nothing that fails to open, is replayed, malformed or oversized
//! reaches the caller or changes any state but the drop counters.

use crate::packet::{Message, Packet, Part, Payload};
use crate::seal::{Opener, Peer, SealError, Sealer, Session, KEY_LEN, OVERHEAD};
use crate::types::{PairId, Seq, SystemId};
use crate::wire::{self, FRAME_OVERHEAD};
use bytes::Bytes;
use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

/// Settings of a link.
#[derive(Clone, Copy, Debug)]
pub struct LinkConfig {
    /// Largest datagram sent, bytes (UDP payload).
    pub mtu: usize,
    /// Largest datagram accepted.
    pub max_datagram: usize,
    /// Pacing rate, bytes per second (0: unpaced).
    pub rate: u64,
    /// Bytes that may leave at once before pacing applies.
    pub burst: u64,
    /// A peer silent this long is down.
    pub peer_timeout: Duration,
    /// Bytes of partly reassembled packets kept at most.
    pub reassembly_bytes: usize,
    /// Partly reassembled packets kept at most.
    pub reassembly_packets: usize,
    /// Largest write accepted in parts.
    pub max_write: u32,
}

impl Default for LinkConfig {
    fn default() -> Self {
        LinkConfig {
            mtu: 1400,
            max_datagram: 65_507,
            rate: 0,
            burst: 256 * 1024,
            peer_timeout: Duration::from_secs(3),
            reassembly_bytes: 64 << 20,
            reassembly_packets: 4096,
            max_write: 32 << 20,
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
    pub reassembly_evicted: u64,
    pub unknown_peer: u64,
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
}

/// Which write packet a part belongs to: its sender and its pair, seq and stamp. Every
/// transmission of one packet carries the same identity, so the parts of a
/// retransmission fill the holes the earlier attempts left.
type PartKey = (SystemId, PairId, Seq, crate::types::Timestamp);

/// A write packet being reassembled.
#[derive(Debug)]
struct Partial {
    offset: crate::types::Offset,
    buf: Vec<u8>,
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
        self.have.len() == 1 && self.have[0] == (0, self.buf.len() as u32)
    }
}

pub struct LinkCore {
    me: SystemId,
    cfg: LinkConfig,
    sealer: Sealer,
    opener: Opener,
    queued: BTreeMap<SystemId, Vec<Vec<u8>>>,
    ready: VecDeque<(SystemId, Vec<u8>)>,
    tokens: f64,
    refilled: Option<Instant>,
    peers: BTreeMap<SystemId, PeerState>,
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
        LinkCore {
            me,
            cfg,
            sealer: Sealer::new(key, session),
            opener: Opener::new(key, me, cfg.max_datagram),
            queued: BTreeMap::new(),
            ready: VecDeque::new(),
            tokens: cfg.burst as f64,
            refilled: None,
            peers: peers
                .iter()
                .filter(|p| **p != me)
                .map(|p| {
                    (
                        *p,
                        PeerState {
                            last_heard: None,
                            up: false,
                        },
                    )
                })
                .collect(),
            events: VecDeque::new(),
            partial: BTreeMap::new(),
            partial_bytes: 0,
            touched: 0,
            counters: LinkCounters::default(),
        }
    }

    pub fn counters(&self) -> LinkCounters {
        self.counters
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

    /// Queues `msg` for `to`. Call [`LinkCore::flush`] when a burst of messages is queued.
    pub fn send(&mut self, to: SystemId, msg: Message) {
        if !self.peers.contains_key(&to) {
            self.counters.unknown_peer += 1;
            return;
        }
        let budget = self.budget();
        let mut items = Vec::new();
        explode(msg, &mut items);
        let q = self.queued.entry(to).or_default();
        for m in items {
            // A write whose data alone fills a datagram is split without being encoded
            // whole first (that would copy up to a whole write only to measure it).
            let bytes = match m {
                Message::Data(ps) if ps.len() == 1 && data_len(&ps[0]) >= budget => {
                    Err(Message::Data(ps))
                }
                m => {
                    let bytes = wire::encode_item(&m);
                    if bytes.len() <= budget {
                        Ok(bytes)
                    } else {
                        Err(m)
                    }
                }
            };
            match bytes {
                Ok(bytes) => q.push(bytes),
                Err(Message::Data(mut ps)) if ps.len() == 1 => {
                    let p = ps.remove(0);
                    for part in split(p, budget) {
                        self.counters.parts_out += 1;
                        q.push(wire::encode_item(&Message::Part(part)));
                    }
                }
                // Nothing else grows past a datagram (acks carry a bounded SACK list).
                Err(other) => q.push(wire::encode_item(&other)),
            }
        }
    }

    /// Packs everything queued into sealed datagrams.
    pub fn flush(&mut self) {
        let budget = self.budget();
        for (to, items) in std::mem::take(&mut self.queued) {
            let mut batch: Vec<Vec<u8>> = Vec::new();
            let mut size = 0;
            for item in items {
                if !batch.is_empty() && size + item.len() > budget {
                    let d = self.seal(to, &batch);
                    self.ready.push_back((to, d));
                    batch.clear();
                    size = 0;
                }
                size += item.len();
                batch.push(item);
            }
            if !batch.is_empty() {
                let d = self.seal(to, &batch);
                self.ready.push_back((to, d));
            }
        }
    }

    /// Encodes the frame straight after the seal header and seals it in place.
    fn seal(&mut self, to: SystemId, items: &[Vec<u8>]) -> Vec<u8> {
        let me = self.me;
        let len = FRAME_OVERHEAD + items.iter().map(Vec::len).sum::<usize>();
        self.sealer
            .seal_with(len, |out| wire::encode_parts_into(out, me, to, items))
    }

    /// The next datagram to send now, and to whom; `None` if nothing is ready or the
    /// pacer says wait (see [`LinkCore::poll_timeout`]).
    pub fn poll_transmit(&mut self, now: Instant) -> Option<(SystemId, Vec<u8>)> {
        let len = self.ready.front()?.1.len() as f64;
        if self.cfg.rate > 0 {
            self.refill(now);
            if self.tokens < len {
                return None;
            }
            self.tokens -= len;
        }
        let (to, d) = self.ready.pop_front()?;
        self.counters.datagrams_out += 1;
        self.counters.bytes_out += d.len() as u64;
        Some((to, d))
    }

    fn refill(&mut self, now: Instant) {
        if let Some(last) = self.refilled {
            let dt = now.saturating_duration_since(last).as_secs_f64();
            self.tokens = (self.tokens + dt * self.cfg.rate as f64).min(self.cfg.burst as f64);
        }
        self.refilled = Some(now);
    }

    /// Datagrams waiting for the pacer.
    pub fn backlog(&self) -> usize {
        self.ready.len()
    }

    /// When to call again: the pacer's next slot, or the next liveness check.
    pub fn poll_timeout(&self, now: Instant) -> Option<Instant> {
        let pace = match self.ready.front() {
            Some((_, d)) if self.cfg.rate > 0 && self.tokens < d.len() as f64 => {
                let need = d.len() as f64 - self.tokens;
                Some(now + Duration::from_secs_f64(need / self.cfg.rate as f64))
            }
            Some(_) => Some(now),
            None => None,
        };
        let live = self
            .peers
            .values()
            .filter(|p| p.up)
            .filter_map(|p| p.last_heard)
            .min()
            .map(|t| t + self.cfg.peer_timeout);
        match (pace, live) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Liveness: peers silent for `peer_timeout` go down.
    pub fn handle_timeout(&mut self, now: Instant) {
        for (id, p) in self.peers.iter_mut() {
            if p.up
                && p.last_heard
                    .is_some_and(|t| now.saturating_duration_since(t) >= self.cfg.peer_timeout)
            {
                p.up = false;
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
        let (frame, peer) = match self.opener.open_in_place(datagram) {
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
            // Parts of the old session can never complete.
            self.drop_partials(from);
        }
        if came_up {
            self.events.push_back(LinkEvent::Up(from));
        }
        let mut out = Vec::with_capacity(frame.messages.len());
        for m in frame.messages {
            match m {
                Message::Part(part) => {
                    if let Some(p) = self.reassemble(from, part) {
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
                self.partial_bytes -= p.buf.len();
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
            self.partial_bytes -= p.buf.len();
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
    fn reassemble(&mut self, from: SystemId, part: Part) -> Option<Packet> {
        let end = u64::from(part.at) + part.data.len() as u64;
        if part.total == 0
            || part.total > self.cfg.max_write
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
                    buf: vec![0; need],
                    have: Vec::new(),
                    touched: self.touched,
                },
            );
        }
        let p = self.partial.get_mut(&key)?;
        if p.buf.len() != part.total as usize || p.offset != part.offset {
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
        p.buf[a as usize..b as usize].copy_from_slice(&part.data);
        if !p.complete() {
            return None;
        }
        let done = self.partial.remove(&key)?;
        self.partial_bytes -= done.buf.len();
        self.counters.reassembled += 1;
        Some(Packet {
            pair: part.pair,
            stamp: part.stamp,
            payload: Payload::Write {
                offset: done.offset,
                data: Bytes::from(done.buf),
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

/// Splits a write packet into parts whose encoding fits `budget`.
fn split(p: Packet, budget: usize) -> Vec<Part> {
    let Payload::Write { offset, data } = p.payload else {
        return Vec::new();
    };
    // A part's fields other than its data take at most ~48 bytes in postcard.
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
