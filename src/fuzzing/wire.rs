//! Frame decoding (`wire`).

use crate::packet::*;
use crate::types::*;
use crate::wire::{self, Frame};
use bytes::Bytes;

/// The datagram size the daemons accept.
pub const MAX_DATAGRAM: usize = 65_507;

/// `data` as a frame (version 4 has no checksum: the fuzzer reaches its parser
/// directly), through `decode` and `decode_shared`, and `data` with a correct checksum
/// appended (so that frames of the older, checksummed versions reach the parser too).
/// Whatever decodes must encode back to a frame that decodes to itself, both decoders
/// must agree, and the sender's piecewise encodings must give the same bytes as the
/// whole-frame one.
pub fn wire(data: &[u8]) {
    check(data);
    let mut fixed = data.to_vec();
    fixed.extend_from_slice(&crc32c::crc32c(data).to_le_bytes());
    check(&fixed);
}

fn check(bytes: &[u8]) {
    let shared = wire::decode_shared(&Bytes::copy_from_slice(bytes), MAX_DATAGRAM);
    let Ok(frame) = wire::decode(bytes, MAX_DATAGRAM) else {
        assert!(shared.is_err(), "decode_shared takes what decode refuses");
        return;
    };
    assert_eq!(
        shared.as_ref(),
        Ok(&frame),
        "decode_shared and decode disagree"
    );
    round_trip(&frame);
}

/// `decode(encode(frame)) == frame`, and [`wire::encode_parts`] of the messages encoded
/// one by one is [`wire::encode`] of the frame.
pub(crate) fn round_trip(frame: &Frame) {
    let enc = wire::encode(frame);
    assert_eq!(
        wire::decode(&enc, usize::MAX).as_ref(),
        Ok(frame),
        "a decoded frame re-encodes to something else"
    );
    let items: Vec<Vec<u8>> = frame.messages.iter().map(wire::encode_item).collect();
    assert_eq!(
        wire::encode_parts(frame.from, frame.to, &items),
        enc,
        "encode_parts and encode disagree"
    );
    let mut split = Vec::new();
    wire::encode_header_into(&mut split, frame.from, frame.to, frame.messages.len());
    for m in &frame.messages {
        let (head, tail) = wire::encode_item_split(m);
        split.extend_from_slice(&head);
        split.extend_from_slice(&tail);
    }
    assert_eq!(split, enc, "encode_item_split and encode disagree");
}

/// A frame with one message of every kind.
pub(crate) fn sample_frame(from: SystemId, to: SystemId) -> Frame {
    let stamp = |ts: u64, seq: u64| Stamp::new(Timestamp(ts), Seq(seq));
    let part = Part {
        pair: PairId(3),
        stamp: stamp(10, 4),
        offset: Offset(8192),
        total: 6,
        at: 2,
        data: Bytes::from_static(b"ab"),
    };
    Frame {
        from,
        to,
        messages: vec![
            Message::Data(vec![
                Packet {
                    pair: PairId(3),
                    stamp: stamp(7, 1),
                    payload: Payload::Write {
                        offset: Offset(4096),
                        data: Bytes::from_static(b"hello"),
                    },
                },
                Packet {
                    pair: PairId(3),
                    stamp: stamp(8, 2),
                    payload: Payload::Zero {
                        offset: Offset(0),
                        len: 512,
                    },
                },
                Packet {
                    pair: PairId(3),
                    stamp: stamp(9, 3),
                    payload: Payload::Mark(Mark::ResyncBegin),
                },
            ]),
            Message::Heartbeats(vec![Heartbeat {
                pair: PairId(4),
                stamp: stamp(11, 0),
            }]),
            Message::Acks(vec![Ack {
                pair: PairId(3),
                cum: Seq(2),
                sack: vec![SeqRange {
                    first: Seq(4),
                    last: Seq(6),
                }],
                window: Seq(1 << 20),
            }]),
            Message::Heads(vec![HeadReport {
                pair: PairId(3),
                head: stamp(9, 3),
                resync: Some(Resync {
                    since: Timestamp(8),
                    done: None,
                }),
            }]),
            Message::Announce {
                limit: Timestamp(9),
                epoch: Some(crate::journal::Epoch {
                    base: Timestamp(5),
                    closes_at: Some(Timestamp(12)),
                }),
            },
            Message::Durable {
                system: SystemId(2),
                limit: Timestamp(9),
            },
            Message::Release {
                limit: Timestamp(9),
                epoch: None,
            },
            Message::Part(part.clone()),
            Message::TimeProbe { sent: 1 },
            Message::TimeReply { sent: 1, remote: 2 },
            Message::Number(7),
            Message::Receipt(Receipt {
                delay_us: 100,
                ranges: vec![(5, 7), (1, 3)],
            }),
            Message::Zipped(Zipped { raw: 64, part }),
        ],
    }
}

/// Seeds: frames of every message kind, one frame per kind (version 4, and version 3
/// without its checksum: the target appends it), and a version 1 frame (likewise).
pub fn seeds() -> Vec<Vec<u8>> {
    let (a, b) = (SystemId(1), SystemId(2));
    let whole = sample_frame(a, b);
    let mut out = vec![wire::encode(&whole)];
    for m in &whole.messages {
        let f = Frame {
            from: a,
            to: b,
            messages: vec![m.clone()],
        };
        let mut enc = wire::encode(&f);
        out.push(enc.clone());
        enc[0] = 3;
        out.push(enc);
    }
    // Version 1: Release without its epoch (variant 6, limit 9).
    out.push(vec![1, 1, 2, 1, 6, 9]);
    out
}
