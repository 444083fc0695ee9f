//! The link's receive side (`link`): sealed datagrams from a peer, with parts to
//! reassemble, receipts for data in flight, restarts, replays and tampering.

use super::input::{Input, Script};
use super::seal::KEY;
use crate::link::{LinkConfig, LinkCore};
use crate::packet::*;
use crate::seal::{Sealer, Session};
use crate::types::*;
use crate::wire::{self, Frame, VERSION};
use bytes::Bytes;
use std::collections::HashMap;
use std::time::{Duration, Instant};

const ME: SystemId = SystemId(0);
const PEER: SystemId = SystemId(1);
const STRANGER: SystemId = SystemId(7);
const STEPS: usize = 256;

/// The byte at `i` of the data of the write `(pair, seq)` in this target: every part
/// of one packet carries the same bytes, so a reassembled packet must be exactly these.
fn pattern(pair: u32, seq: u64, i: usize) -> u8 {
    (i as u64)
        .wrapping_mul(31)
        .wrapping_add(seq.wrapping_mul(7))
        .wrapping_add(u64::from(pair)) as u8
}

fn pattern_bytes(pair: u32, seq: u64, len: usize) -> Vec<u8> {
    (0..len).map(|i| pattern(pair, seq, i)).collect()
}

/// The packet identity of a part in this target: time stamp from seq (so a part's key
/// is (pair, seq)), unless the input asks for another one.
fn stamp(seq: u64) -> Stamp {
    Stamp::new(Timestamp(1_000 + seq), Seq(seq))
}

/// The peer's side: its current session (epoch and a restart count that makes every
/// session distinct), and the session the link holds for it (`None` before the first).
struct Peer {
    sealer: Sealer,
    session: (u64, u16),
    held: Option<(u64, u16)>,
    last: Option<Vec<u8>>,
}

impl Peer {
    fn seal(&mut self, plain: &[u8]) -> Vec<u8> {
        let d = self.sealer.seal_bytes(plain);
        self.last = Some(d.clone());
        d
    }

    fn seal_messages(&mut self, from: SystemId, messages: Vec<Message>) -> Vec<u8> {
        self.seal(&wire::encode(&Frame {
            from,
            to: ME,
            messages,
        }))
    }

    fn restart(&mut self, epoch: u64) {
        self.session = (epoch, self.session.1.wrapping_add(1));
        let mut nonce = [0; 16];
        nonce[..2].copy_from_slice(&self.session.1.to_le_bytes());
        self.sealer = Sealer::new(&KEY, Session { epoch, nonce });
    }

    /// Whether the link takes a datagram of the peer's current session: its first, the
    /// one it holds, or a later epoch (a restart). Any other is stale.
    fn fresh(&self) -> bool {
        self.held
            .is_none_or(|h| h == self.session || self.session.0 > h.0)
    }

    /// A datagram of the current session was delivered.
    fn delivered(&mut self) {
        self.held = Some(self.session);
    }
}

/// Checks what `handle_datagram` returned: only messages for the units (the link's own
/// are consumed), and a packet reassembled from this target's parts holds exactly its
/// pattern.
fn check_delivered(msgs: &[Message], patterned: bool) {
    for m in msgs {
        match m {
            Message::Number(_) | Message::Receipt(_) | Message::Part(_) | Message::Zipped(_) => {
                panic!("the link handed up its own message {m:?}")
            }
            Message::Data(ps) if patterned => {
                for p in ps {
                    let Payload::Write { data, .. } = &p.payload else {
                        continue;
                    };
                    let want = pattern_bytes(p.pair.0, p.stamp.seq.0, data.len());
                    assert!(
                        data[..] == want[..],
                        "packet {:?} of pair {:?} reassembled wrong",
                        p.stamp,
                        p.pair
                    );
                }
            }
            _ => {}
        }
    }
}

/// A script against one link core (`ME`, talking to `PEER`): the peer's datagrams built
/// from raw frame bytes or from parts, receipts and numbers chosen by the input, writes
/// sent the other way and their datagrams taken out, time passing, restarts, stale and
/// stranger senders, replays, tampering and raw bytes.
///
/// Checked: nothing unauthenticated, tampered or replayed is delivered (and each such
/// datagram is counted as dropped); the link's own messages never reach the caller;
/// reassembled packets are exactly their bytes; reassembly stays within its limits.
pub fn link(data: &[u8]) {
    let mut inp = Input::new(data);
    let flags = inp.u8();
    let cfg = LinkConfig {
        mtu: if flags & 1 == 0 { 1400 } else { 600 },
        reassembly_bytes: 64 << 10,
        reassembly_packets: 8,
        max_write: 1 << 20,
        compress: (flags & 2 != 0).then_some(1),
        initial_window: if flags & 4 == 0 { 16 << 10 } else { 1 << 20 },
        ..LinkConfig::default()
    };
    let mut now = Instant::now();
    let me_session = Session {
        epoch: 50,
        nonce: [3; 16],
    };
    let mut link = LinkCore::new(ME, &[ME, PEER], &KEY, me_session, cfg);
    let mut peer = Peer {
        sealer: Sealer::new(&KEY, me_session),
        session: (0, 0),
        held: None,
        last: None,
    };
    peer.restart(100);
    let mut numbered_out = 0u64;
    // Compressed packet data by (pair, seq, length): compressed once per run.
    let mut zipped: HashMap<(u32, u64, usize), Vec<u8>> = HashMap::new();
    for _ in 0..STEPS {
        if inp.is_empty() {
            break;
        }
        let before = link.counters();
        match inp.u8() % 12 {
            0 => {
                // Raw bytes: dropped and counted.
                let mut raw = inp.chunk(1600).to_vec();
                assert!(link.handle_datagram(now, &mut raw).is_none());
                assert!(link.counters().dropped() > before.dropped());
            }
            1 => {
                // A frame of raw bytes from the peer (version 4: no checksum to fix),
                // taken as the UDP link takes it (its write data shares the buffer).
                let mut plain = vec![VERSION];
                plain.extend_from_slice(inp.chunk(1500));
                let d = peer.seal(&plain);
                if let Some((from, msgs)) = link.handle_datagram_owned(now, d) {
                    assert_eq!(from, PEER);
                    peer.delivered();
                    check_delivered(&msgs, false);
                }
            }
            op @ (2 | 3) => {
                // Parts of a write (raw, or compressed with zstd), as a sender cuts them
                // or not.
                let n = 1 + usize::from(inp.u8() % 4);
                let mut msgs = Vec::with_capacity(n);
                for _ in 0..n {
                    msgs.push(part(&mut inp, op == 3, &mut zipped));
                }
                let mut d = peer.seal_messages(PEER, msgs);
                let fresh = peer.fresh();
                let got = link.handle_datagram(now, &mut d);
                assert_eq!(got.is_some(), fresh);
                if let Some((_, msgs)) = got {
                    peer.delivered();
                    check_delivered(&msgs, true);
                }
            }
            4 => {
                // A receipt for the datagrams this link numbered, ranges near the top.
                let count = usize::from(inp.u8() % 40);
                let mut hi = numbered_out.saturating_sub(u64::from(inp.u8() % 4));
                let mut ranges = Vec::with_capacity(count);
                for _ in 0..count {
                    let len = u64::from(inp.u8() % 8);
                    let gap = u64::from(inp.u8() % 8);
                    let lo = hi.saturating_sub(len);
                    ranges.push((lo, hi));
                    hi = lo.saturating_sub(gap);
                }
                if inp.u8().is_multiple_of(8) {
                    ranges.push((inp.u64(), inp.u64()));
                }
                let r = Receipt {
                    delay_us: u32::from(inp.u16()),
                    ranges,
                };
                let mut d = peer.seal_messages(PEER, vec![Message::Receipt(r)]);
                let fresh = peer.fresh();
                let got = link.handle_datagram(now, &mut d);
                assert_eq!(got.is_some(), fresh);
                if let Some((_, msgs)) = got {
                    peer.delivered();
                    check_delivered(&msgs, false);
                }
            }
            5 => {
                // Numbered datagrams from the peer (so this link owes receipts).
                let n = inp.u64() % 4096;
                let msgs = vec![
                    Message::Number(n),
                    Message::Heartbeats(vec![Heartbeat {
                        pair: PairId(1),
                        stamp: stamp(n),
                    }]),
                ];
                let mut d = peer.seal_messages(PEER, msgs);
                let fresh = peer.fresh();
                let got = link.handle_datagram(now, &mut d);
                assert_eq!(got.is_some(), fresh);
                if let Some((_, msgs)) = got {
                    peer.delivered();
                    assert_eq!(msgs.len(), 1, "the number is the link's");
                }
            }
            6 => {
                // This link sends: a write of any size, or state.
                let len = usize::from(inp.u16()) % 9000;
                let seq = u64::from(inp.u8());
                let msg = if inp.bool() {
                    Message::Data(vec![Packet {
                        pair: PairId(2),
                        stamp: stamp(seq),
                        payload: Payload::Write {
                            offset: Offset(0),
                            data: Bytes::from(vec![seq as u8; len]),
                        },
                    }])
                } else {
                    Message::Acks(vec![Ack {
                        pair: PairId(2),
                        cum: Seq(seq),
                        sack: Vec::new(),
                        window: Seq(1 << 20),
                    }])
                };
                link.send(PEER, msg);
            }
            7 => {
                // Whatever may leave now leaves (bounded).
                for _ in 0..64 {
                    let Some((to, d)) = link.poll_transmit(now) else {
                        break;
                    };
                    assert_eq!(to, PEER);
                    assert!(d.len() <= cfg.mtu, "a datagram of {} bytes", d.len());
                    numbered_out += 1;
                }
            }
            8 => {
                // Time passes.
                now += Duration::from_micros(u64::from(inp.u16()) * 64);
                let _ = link.poll_timeout(now);
                link.handle_timeout(now);
                while link.poll_event().is_some() {}
            }
            9 => {
                // The peer restarts (a later epoch), or an older session of it sends
                // (stale: dropped).
                let e = match inp.u8() % 3 {
                    0 | 1 => peer.session.0 + 1,
                    _ => peer.session.0.saturating_sub(1 + u64::from(inp.u8())),
                };
                peer.restart(e);
                let mut d = peer.seal_messages(PEER, vec![Message::TimeProbe { sent: e }]);
                let fresh = peer.fresh();
                let got = link.handle_datagram(now, &mut d);
                assert_eq!(got.is_some(), fresh, "a datagram of epoch {e}");
                if got.is_some() {
                    peer.delivered();
                }
            }
            10 => {
                // The last datagram again (a replay), and tampered (a bit flipped).
                let Some(last) = peer.last.clone() else {
                    continue;
                };
                let mut again = last.clone();
                assert!(link.handle_datagram(now, &mut again).is_none());
                let mut t = last;
                let bit = usize::from(inp.u16()) % (t.len() * 8);
                t[bit / 8] ^= 1 << (bit % 8);
                assert!(link.handle_datagram(now, &mut t).is_none());
                assert_eq!(link.counters().dropped(), before.dropped() + 2);
            }
            _ => {
                // Authentic, from a system this link does not know.
                let mut d = peer.seal_messages(STRANGER, vec![Message::TimeProbe { sent: 1 }]);
                assert!(link.handle_datagram(now, &mut d).is_none());
            }
        }
        let (bytes, packets) = link.reassembly_held();
        assert!(bytes <= cfg.reassembly_bytes && packets <= cfg.reassembly_packets);
    }
}

/// A part (or a zipped part) of a patterned write, as the input chooses: usually a
/// piece of the packet cut at a sender's boundaries, sometimes anything.
fn part(
    inp: &mut Input<'_>,
    zip: bool,
    zipped: &mut HashMap<(u32, u64, usize), Vec<u8>>,
) -> Message {
    let pair = u32::from(inp.u8() % 4);
    let seq = u64::from(inp.u8() % 16);
    let total = 1 + usize::from(inp.u16()) % 4096;
    let raw = pattern_bytes(pair, seq, total);
    let data = if zip {
        zipped
            .entry((pair, seq, total))
            .or_insert_with(|| zstd::bulk::compress(&raw, 1).unwrap_or_default())
            .clone()
    } else {
        raw
    };
    let n = data.len();
    let chunk = 1 + usize::from(inp.u16()) % 1200;
    let at = (usize::from(inp.u8()) * chunk).min(n.saturating_sub(1));
    let end = (at + chunk).min(n);
    let mut p = Part {
        pair: PairId(pair),
        stamp: stamp(seq),
        offset: Offset(512 * seq),
        total: n as u32,
        at: at as u32,
        data: Bytes::copy_from_slice(&data[at..end]),
    };
    let mut raw_len = total as u32;
    match inp.u8() % 16 {
        0 => p.total = inp.u32(),
        1 => p.at = inp.u32(),
        2 => p.offset = Offset(inp.u64()),
        3 => raw_len = inp.u32(),
        4 => p.data = Bytes::new(),
        _ => {}
    }
    if zip {
        Message::Zipped(Zipped {
            raw: raw_len,
            part: p,
        })
    } else {
        Message::Part(p)
    }
}

/// Seeds: a split write in order and out of order, compressed, receipts for data sent,
/// numbered datagrams, a restart, a replay, raw bytes.
pub fn seeds() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut s = Script::default();
    // A 3000-byte write of pair 1, seq 2 in three 1000-byte parts, out of order.
    s.u8(0);
    for k in [2u8, 0, 1] {
        s.u8(2).u8(0).u8(1).u8(2).u16(2999).u16(999).u8(k).u8(9);
    }
    out.push(s.done());
    // The same compressed, in one datagram of two parts.
    s.u8(2);
    s.u8(3).u8(1);
    for k in [0u8, 1] {
        s.u8(1).u8(2).u16(2999).u16(19).u8(k).u8(9);
    }
    out.push(s.done());
    // Writes sent, datagrams out, receipts back, time, numbers in.
    s.u8(0);
    s.u8(6).u16(5000).u8(1).u8(1);
    s.u8(6).u16(100).u8(2).u8(0);
    s.u8(7);
    s.u8(8).u16(200);
    s.u8(4)
        .u8(2)
        .u8(0)
        .u8(1)
        .u8(0)
        .u8(2)
        .u8(0)
        .u8(1)
        .u8(0)
        .u16(50);
    s.u8(5).u64(1).u8(5).u64(3).u8(5).u64(2);
    s.u8(7).u8(8).u16(60_000).u8(7);
    out.push(s.done());
    // Restart, stale, replay and tampering, a stranger, raw bytes, a raw frame.
    s.u8(1);
    s.u8(9).u8(0).u8(9).u8(2).u8(0);
    s.u8(10).u16(77).u8(11);
    s.u8(0).chunk(&[2; 80]);
    let f = super::wire::sample_frame(PEER, ME);
    let enc = wire::encode(&f);
    s.u8(1).chunk(&enc[1..]);
    out.push(s.done());
    out
}
