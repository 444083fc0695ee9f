//! The frame format: one or more [`Message`]s between two systems.
//!
//! ```text
//! +---------+------------------------------+-----------------+
//! | version | postcard(Frame)              | crc32c, LE u32  |
//! |  1 byte | variable                     | over all before |
//! +---------+------------------------------+-----------------+
//! ```
//!
//! Decoding checks the length, the version and the checksum before it parses anything,
//! and never panics on any input.

use crate::packet::Message;
use crate::types::SystemId;
use serde::{Deserialize, Serialize};

/// The frame version this build writes.
///
/// Adding a variant at the end of an enum (as [`Payload::Mark`](crate::Payload::Mark)
/// was) does not change it: every frame an older build writes still decodes here, to
/// the same messages; a frame carrying the new variant is malformed to an older build,
/// which drops and counts it (I6) and changes no state. Changing what an existing
/// encoding means does.
///
/// Version 2 added a field at the end of [`HeadReport`](crate::HeadReport) (`resync`)
/// and of [`Message::Announce`] and [`Message::Release`] (`epoch`), for the resync
/// epoch. This build still decodes version 1 frames (those messages without the new
/// field: no resync, no epoch); a build that speaks only version 1 drops version 2
/// frames as of an unknown version (counted, I6). So a remote system and its orderer
/// must be upgraded together.
///
/// Version 3 encodes as version 2 and adds the link's own messages at the end of
/// [`Message`] ([`Message::Number`], [`Message::Receipt`]): receipts of datagrams
/// for the link's loss recovery, pacing and congestion control (`docs/design.md`, the
/// link). A version 2 build cannot receive a version 3 system's data (its datagrams
/// open with a number), so the version changes: both ends must run version 3. This
/// build still decodes versions 1 and 2.
pub const VERSION: u8 = 3;

/// The oldest frame version this build decodes.
pub const OLDEST_VERSION: u8 = 1;

/// Smallest possible frame: version + checksum.
const MIN_FRAME: usize = 1 + 4;

/// Messages from one system to another.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Frame {
    pub from: SystemId,
    pub to: SystemId,
    pub messages: Vec<Message>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    #[error("frame of {0} bytes is too short")]
    TooShort(usize),
    #[error("frame of {len} bytes exceeds the limit of {max}")]
    TooLong { len: usize, max: usize },
    #[error("unsupported frame version {0}")]
    Version(u8),
    #[error("frame checksum mismatch")]
    Checksum,
    #[error("malformed frame: {0}")]
    Malformed(String),
}

/// Serialises `frame` with version byte and checksum.
pub fn encode(frame: &Frame) -> Vec<u8> {
    // Serialising our own types into a Vec has no failure mode (no I/O, no size limit).
    let mut out = postcard::to_extend(frame, vec![VERSION])
        .expect("postcard serialisation into a Vec cannot fail");
    let crc = crc32c::crc32c(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

/// Builds the same bytes as [`encode`] of a frame whose messages are given already
/// serialised (each one `postcard` of a [`Message`]), so a sender can size datagrams.
pub fn encode_parts<T: AsRef<[u8]>>(from: SystemId, to: SystemId, items: &[T]) -> Vec<u8> {
    let mut out = Vec::new();
    encode_parts_into(&mut out, from, to, items);
    out
}

/// As [`encode_parts`], appending the frame to `out` (whatever `out` held before stays
/// untouched and outside the checksum): lets a sealer write the frame after its header.
pub fn encode_parts_into<T: AsRef<[u8]>>(
    out: &mut Vec<u8>,
    from: SystemId,
    to: SystemId,
    items: &[T],
) {
    let start = out.len();
    out.reserve(FRAME_OVERHEAD + items.iter().map(|i| i.as_ref().len()).sum::<usize>());
    out.push(VERSION);
    let header = (from, to, items.len());
    // Serialising our own types into a Vec has no failure mode (no I/O, no size limit).
    let mut buf = [0u8; FRAME_OVERHEAD];
    let used = postcard::to_slice(&header, &mut buf)
        .expect("three varints fit FRAME_OVERHEAD bytes")
        .len();
    out.extend_from_slice(&buf[..used]);
    for i in items {
        out.extend_from_slice(i.as_ref());
    }
    let crc = crc32c::crc32c(&out[start..]);
    out.extend_from_slice(&crc.to_le_bytes());
}

/// Serialises one message for [`encode_parts`].
pub fn encode_item(msg: &Message) -> Vec<u8> {
    postcard::to_allocvec(msg).expect("postcard serialisation into a Vec cannot fail")
}

/// The most bytes [`encode_parts`] adds around its items.
pub const FRAME_OVERHEAD: usize = 1 + 5 + 5 + 5 + 4;

/// Parses a frame; any input that is not exactly a frame this build wrote is an error.
pub fn decode(bytes: &[u8], max_len: usize) -> Result<Frame, WireError> {
    if bytes.len() < MIN_FRAME {
        return Err(WireError::TooShort(bytes.len()));
    }
    if bytes.len() > max_len {
        return Err(WireError::TooLong {
            len: bytes.len(),
            max: max_len,
        });
    }
    let (body, crc) = bytes.split_at(bytes.len() - 4);
    let want = u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]);
    if crc32c::crc32c(body) != want {
        return Err(WireError::Checksum);
    }
    let (frame, rest) = match body[0] {
        VERSION | 2 => postcard::take_from_bytes::<Frame>(&body[1..]),
        1 => postcard::take_from_bytes::<v1::Frame>(&body[1..]).map(|(f, r)| (f.into(), r)),
        v => return Err(WireError::Version(v)),
    }
    .map_err(|e| WireError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(WireError::Malformed(format!(
            "{} trailing bytes after the frame",
            rest.len()
        )));
    }
    Ok(frame)
}

/// Version 1 of the messages that changed in version 2, to decode frames of older
/// builds: the same variants in the same order, without the fields version 2 appended.
mod v1 {
    use crate::packet::{Ack, Heartbeat, Packet, Part};
    use crate::types::{PairId, Stamp, SystemId, Timestamp};
    use serde::Deserialize;

    #[derive(Deserialize)]
    pub(super) struct Frame {
        from: SystemId,
        to: SystemId,
        messages: Vec<Message>,
    }

    #[derive(Deserialize)]
    struct HeadReport {
        pair: PairId,
        head: Stamp,
    }

    #[derive(Deserialize)]
    enum Message {
        Data(Vec<Packet>),
        Heartbeats(Vec<Heartbeat>),
        Acks(Vec<Ack>),
        Heads(Vec<HeadReport>),
        Announce { limit: Timestamp },
        Durable { system: SystemId, limit: Timestamp },
        Release { limit: Timestamp },
        Part(Part),
        TimeProbe { sent: u64 },
        TimeReply { sent: u64, remote: u64 },
    }

    impl From<Frame> for super::Frame {
        fn from(f: Frame) -> super::Frame {
            use crate::packet::Message as M;
            let messages = f
                .messages
                .into_iter()
                .map(|m| match m {
                    Message::Data(p) => M::Data(p),
                    Message::Heartbeats(h) => M::Heartbeats(h),
                    Message::Acks(a) => M::Acks(a),
                    Message::Heads(h) => M::Heads(
                        h.into_iter()
                            .map(|h| crate::packet::HeadReport {
                                pair: h.pair,
                                head: h.head,
                                resync: None,
                            })
                            .collect(),
                    ),
                    Message::Announce { limit } => M::Announce { limit, epoch: None },
                    Message::Durable { system, limit } => M::Durable { system, limit },
                    Message::Release { limit } => M::Release { limit, epoch: None },
                    Message::Part(p) => M::Part(p),
                    Message::TimeProbe { sent } => M::TimeProbe { sent },
                    Message::TimeReply { sent, remote } => M::TimeReply { sent, remote },
                })
                .collect();
            super::Frame {
                from: f.from,
                to: f.to,
                messages,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::*;
    use crate::types::*;
    use bytes::Bytes;
    use proptest::prelude::*;

    fn sample() -> Frame {
        Frame {
            from: SystemId(1),
            to: SystemId(2),
            messages: vec![
                Message::Data(vec![
                    Packet {
                        pair: PairId(3),
                        stamp: Stamp::new(Timestamp(1_000_000), Seq(7)),
                        payload: Payload::Write {
                            offset: Offset(4096),
                            data: Bytes::from_static(b"hello"),
                        },
                    },
                    Packet {
                        pair: PairId(3),
                        stamp: Stamp::new(Timestamp(1_000_002), Seq(8)),
                        payload: Payload::Mark(Mark::SyncBegin),
                    },
                    Packet {
                        pair: PairId(3),
                        stamp: Stamp::new(Timestamp(1_000_003), Seq(9)),
                        payload: Payload::Mark(Mark::SyncDone),
                    },
                ]),
                Message::Heartbeats(vec![Heartbeat {
                    pair: PairId(4),
                    stamp: Stamp::new(Timestamp(1_000_001), Seq(0)),
                }]),
                Message::Acks(vec![Ack {
                    pair: PairId(3),
                    cum: Seq(5),
                    sack: vec![SeqRange {
                        first: Seq(7),
                        last: Seq(9),
                    }],
                    window: Seq(1 << 20),
                }]),
                Message::Release {
                    limit: Timestamp(99),
                    epoch: None,
                },
            ],
        }
    }

    #[test]
    fn round_trip() {
        let f = sample();
        let bytes = encode(&f);
        assert_eq!(decode(&bytes, 1 << 20), Ok(f));
    }

    /// The encoding of a frame an older build (without marks) writes is pinned: it still
    /// decodes to the same messages. And a mark packet's encoding is pinned too.
    #[test]
    fn older_frames_still_decode_and_marks_are_pinned() {
        let old = Frame {
            from: SystemId(1),
            to: SystemId(2),
            messages: vec![Message::Data(vec![
                Packet {
                    pair: PairId(3),
                    stamp: Stamp::new(Timestamp(5), Seq(7)),
                    payload: Payload::Write {
                        offset: Offset(1),
                        data: Bytes::from_static(b"hi"),
                    },
                },
                Packet {
                    pair: PairId(3),
                    stamp: Stamp::new(Timestamp(6), Seq(8)),
                    payload: Payload::Zero {
                        offset: Offset(2),
                        len: 3,
                    },
                },
            ])],
        };
        // version 1 | from 1, to 2, one message | Data = 0, two packets |
        // pair 3, ts 5, seq 7, Write = 0, offset 1, "hi" | pair 3, ts 6, seq 8, Zero = 1,
        // offset 2, len 3 | crc
        let mut bytes = vec![
            1, 1, 2, 1, 0, 2, 3, 5, 7, 0, 1, 2, b'h', b'i', 3, 6, 8, 1, 2, 3,
        ];
        let crc = crc32c::crc32c(&bytes).to_le_bytes();
        bytes.extend_from_slice(&crc);
        assert_eq!(decode(&bytes, 1 << 20), Ok(old.clone()));
        // Versions 2 and 3 encode these messages the same, byte for byte but the
        // version; this build writes version 3 and reads both.
        let with_version = |v: u8| {
            let mut b = bytes[..bytes.len() - 4].to_vec();
            b[0] = v;
            let crc = crc32c::crc32c(&b).to_le_bytes();
            b.extend_from_slice(&crc);
            b
        };
        assert_eq!(encode(&old), with_version(3));
        assert_eq!(decode(&with_version(2), 1 << 20), Ok(old.clone()));
        assert_eq!(decode(&with_version(3), 1 << 20), Ok(old));

        let mark = Message::Data(vec![Packet {
            pair: PairId(3),
            stamp: Stamp::new(Timestamp(9), Seq(10)),
            payload: Payload::Mark(Mark::SyncDone),
        }]);
        // Data = 0, one packet, pair 3, ts 9, seq 10, Mark = 2, SyncDone = 1.
        assert_eq!(encode_item(&mark), [0, 1, 3, 9, 10, 2, 1]);
        // A mark index this build does not know is malformed, not a panic.
        let mut bad = vec![VERSION, 1, 2, 1, 0, 1, 3, 9, 10, 2, Mark::ALL.len() as u8];
        let crc = crc32c::crc32c(&bad).to_le_bytes();
        bad.extend_from_slice(&crc);
        assert!(matches!(
            decode(&bad, 1 << 20),
            Err(WireError::Malformed(_))
        ));
    }

    /// Version 1 head reports, announcements and releases (without `resync` and
    /// `epoch`) decode to the version 2 messages without them; the version 2 encodings
    /// of the new fields are pinned.
    #[test]
    fn version_1_heads_and_limits_decode_and_version_2_is_pinned() {
        use crate::journal::Epoch;
        // version 1 | from 1, to 2, three messages | Heads = 3, one: pair 4, ts 9, seq 2 |
        // Announce = 4, limit 7 | Release = 6, limit 8 | crc
        let mut v1 = vec![1, 1, 2, 3, 3, 1, 4, 9, 2, 4, 7, 6, 8];
        let crc = crc32c::crc32c(&v1).to_le_bytes();
        v1.extend_from_slice(&crc);
        let frame = Frame {
            from: SystemId(1),
            to: SystemId(2),
            messages: vec![
                Message::Heads(vec![HeadReport {
                    pair: PairId(4),
                    head: Stamp::new(Timestamp(9), Seq(2)),
                    resync: None,
                }]),
                Message::Announce {
                    limit: Timestamp(7),
                    epoch: None,
                },
                Message::Release {
                    limit: Timestamp(8),
                    epoch: None,
                },
            ],
        };
        assert_eq!(decode(&v1, 1 << 20), Ok(frame.clone()));
        let items: Vec<Vec<u8>> = frame.messages.iter().map(encode_item).collect();
        assert_eq!(
            items,
            vec![vec![3, 1, 4, 9, 2, 0], vec![4, 7, 0], vec![6, 8, 0]]
        );
        let heads = Message::Heads(vec![HeadReport {
            pair: PairId(4),
            head: Stamp::new(Timestamp(9), Seq(2)),
            resync: Some(Resync {
                since: Timestamp(5),
                done: Some(Timestamp(6)),
            }),
        }]);
        // ..., Some, since 5, Some, done 6
        assert_eq!(encode_item(&heads), [3, 1, 4, 9, 2, 1, 5, 1, 6]);
        let release = Message::Release {
            limit: Timestamp(8),
            epoch: Some(Epoch {
                base: Timestamp(3),
                closes_at: None,
            }),
        };
        assert_eq!(encode_item(&release), [6, 8, 1, 3, 0]);
        let f = Frame {
            from: SystemId(1),
            to: SystemId(2),
            messages: vec![heads, release],
        };
        assert_eq!(decode(&encode(&f), 1 << 20), Ok(f));
    }

    /// The online verify's messages, appended after version 3's: their encodings are
    /// pinned, they round-trip, and the largest reply fits the smallest datagram.
    #[test]
    fn verify_messages_are_pinned_and_fit_a_datagram() {
        use crate::verify::*;
        let req = Message::VerifyRequest(VerifyRequest {
            pair: PairId(2),
            id: 7,
            offset: Offset(4096),
            region: 1 << 20,
            count: 3,
            target: Seq(9),
        });
        // VerifyRequest = 13, pair 2, id 7, offset 4096, region 1 MiB, count 3, target 9
        assert_eq!(
            encode_item(&req),
            [13, 2, 7, 0x80, 0x20, 0x80, 0x80, 0x40, 3, 9]
        );
        let sums = Message::VerifySums(VerifySums {
            pair: PairId(2),
            id: 7,
            applied: Seq(9),
            result: SumsResult::Sums(vec![1, 300]),
        });
        // VerifySums = 14, pair 2, id 7, applied 9, Sums = 0, two sums: 1, 300
        assert_eq!(encode_item(&sums), [14, 2, 7, 9, 0, 2, 1, 0xac, 0x02]);
        let refused = Message::VerifySums(VerifySums {
            pair: PairId(2),
            id: 7,
            applied: Seq(9),
            result: SumsResult::Refused(Refusal::Inconsistent),
        });
        assert_eq!(encode_item(&refused), [14, 2, 7, 9, 1, 0]);
        let f = Frame {
            from: SystemId(1),
            to: SystemId(2),
            messages: vec![req, sums, refused],
        };
        assert_eq!(decode(&encode(&f), 1 << 20), Ok(f));
        let largest = Message::VerifySums(VerifySums {
            pair: PairId(u32::MAX),
            id: u64::MAX,
            applied: Seq(u64::MAX),
            result: SumsResult::Sums(vec![u64::MAX; MAX_SUMS]),
        });
        // What a datagram of the smallest `mtu` (576) holds for items.
        let room = 576 - crate::seal::OVERHEAD - FRAME_OVERHEAD;
        assert!(
            encode_item(&largest).len() <= room,
            "{}",
            encode_item(&largest).len()
        );
    }

    #[test]
    fn encode_parts_equals_encode() {
        let f = sample();
        let items: Vec<Vec<u8>> = f.messages.iter().map(encode_item).collect();
        assert_eq!(encode_parts(f.from, f.to, &items), encode(&f));
        let mut prefixed = b"header".to_vec();
        encode_parts_into(&mut prefixed, f.from, f.to, &items);
        assert_eq!(&prefixed[..6], b"header");
        assert_eq!(decode(&prefixed[6..], 1 << 20), Ok(f.clone()));
        let big = Frame {
            from: SystemId(300_000),
            to: SystemId(u32::MAX),
            messages: vec![],
        };
        let bytes = encode_parts::<Vec<u8>>(big.from, big.to, &[]);
        assert_eq!(bytes, encode(&big));
        assert!(bytes.len() <= FRAME_OVERHEAD);
    }

    #[test]
    fn rejects_short_long_version_checksum() {
        let bytes = encode(&sample());
        assert_eq!(decode(&bytes[..3], 1 << 20), Err(WireError::TooShort(3)));
        assert!(matches!(decode(&bytes, 10), Err(WireError::TooLong { .. })));
        let mut flipped = bytes.clone();
        flipped[5] ^= 0x10;
        assert_eq!(decode(&flipped, 1 << 20), Err(WireError::Checksum));
        for v in [0, VERSION + 1] {
            let mut other = bytes.clone();
            other[0] = v;
            let n = other.len();
            let crc = crc32c::crc32c(&other[..n - 4]).to_le_bytes();
            other[n - 4..].copy_from_slice(&crc);
            assert_eq!(decode(&other, 1 << 20), Err(WireError::Version(v)));
        }
    }

    #[test]
    fn rejects_trailing_bytes_with_valid_checksum() {
        let mut body = encode(&sample());
        body.truncate(body.len() - 4);
        body.push(0);
        let crc = crc32c::crc32c(&body).to_le_bytes();
        body.extend_from_slice(&crc);
        assert!(matches!(
            decode(&body, 1 << 20),
            Err(WireError::Malformed(_))
        ));
    }

    fn any_payload() -> impl Strategy<Value = Payload> {
        prop_oneof![
            (any::<u64>(), proptest::collection::vec(any::<u8>(), 0..64)).prop_map(
                |(offset, data)| Payload::Write {
                    offset: Offset(offset),
                    data: Bytes::from(data),
                }
            ),
            (any::<u64>(), any::<u64>()).prop_map(|(offset, len)| Payload::Zero {
                offset: Offset(offset),
                len,
            }),
            proptest::sample::select(Mark::ALL.to_vec()).prop_map(Payload::Mark),
        ]
    }

    proptest! {
        /// Data messages of any payloads (marks included) survive a round trip, through
        /// `encode` and through `encode_parts`; every payload's `wire_len` covers its
        /// encoding.
        #[test]
        fn data_round_trips(
            packets in proptest::collection::vec(
                (any::<u32>(), any::<u64>(), any::<u64>(), any_payload()),
                0..8,
            ),
        ) {
            let packets: Vec<Packet> = packets
                .into_iter()
                .map(|(pair, ts, seq, payload)| Packet {
                    pair: PairId(pair),
                    stamp: Stamp::new(Timestamp(ts), Seq(seq)),
                    payload,
                })
                .collect();
            for p in &packets {
                let n = postcard::to_allocvec(&p.payload).unwrap().len();
                prop_assert!(p.payload.wire_len() >= n, "{:?}", p.payload);
            }
            let f = Frame {
                from: SystemId(1),
                to: SystemId(2),
                messages: vec![Message::Data(packets)],
            };
            let bytes = encode(&f);
            let items: Vec<Vec<u8>> = f.messages.iter().map(encode_item).collect();
            prop_assert_eq!(&encode_parts(f.from, f.to, &items), &bytes);
            prop_assert_eq!(decode(&bytes, 1 << 20), Ok(f));
        }

        /// Any byte string either decodes or is an error; never a panic.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode(&bytes, 1 << 20);
        }

        /// A frame with a valid checksum over garbage is still rejected cleanly.
        #[test]
        fn garbage_with_valid_checksum_never_panics(body in proptest::collection::vec(any::<u8>(), 0..256)) {
            let mut bytes = vec![VERSION];
            bytes.extend_from_slice(&body);
            let crc = crc32c::crc32c(&bytes).to_le_bytes();
            bytes.extend_from_slice(&crc);
            let _ = decode(&bytes, 1 << 20);
        }
    }
}
