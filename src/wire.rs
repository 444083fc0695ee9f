//! The frame format: one or more [`Message`]s between two systems.
//!
//! ```text
//! version 4 (this build writes it):
//! +---------+------------------------------+
//! | version | postcard(Frame)              |
//! |  1 byte | variable                     |
//! +---------+------------------------------+
//!
//! versions 1 to 3 (still decoded):
//! +---------+------------------------------+-----------------+
//! | version | postcard(Frame)              | crc32c, LE u32  |
//! |  1 byte | variable                     | over all before |
//! +---------+------------------------------+-----------------+
//! ```
//!
//! A frame only ever travels sealed ([`crate::seal`]): the AEAD's tag authenticates every
//! byte of it, so version 4 dropped the checksum the older versions carried (the tag
//! catches any corruption the checksum would, and more). Nothing decodes a frame that
//! did not open under the group key first; the journal, which has no tag, keeps its own
//! checksums.
//!
//! Decoding checks the length and the version before it parses anything (and, for the
//! older versions, the checksum), and never panics on any input.

use crate::packet::Message;
use crate::types::SystemId;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::cell::RefCell;

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
/// open with a number), so the version changes: both ends must run version 3.
///
/// Version 4 encodes the messages as version 3 and drops the trailing CRC32C (the seal's
/// tag covers the frame). A version 3 build drops version 4 frames (their last four
/// bytes are no checksum: counted as malformed, I6), so both ends must run version 4.
/// This build still decodes versions 1 to 3, checksum and all: the same code as before,
/// behind the same seal, so keeping it is cheap and changes nothing for safety.
pub const VERSION: u8 = 4;

/// The oldest frame version this build decodes.
pub const OLDEST_VERSION: u8 = 1;

/// The newest frame version that carried a checksum.
const LAST_CHECKSUMMED: u8 = 3;

/// Smallest possible frame of a checksummed version: version + checksum.
const MIN_CHECKSUMMED: usize = 1 + 4;

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

/// Serialises `frame` with its version byte.
pub fn encode(frame: &Frame) -> Vec<u8> {
    // Serialising our own types into a Vec has no failure mode (no I/O, no size limit).
    postcard::to_extend(frame, vec![VERSION])
        .expect("postcard serialisation into a Vec cannot fail")
}

/// Builds the same bytes as [`encode`] of a frame whose messages are given already
/// serialised (each one `postcard` of a [`Message`]), so a sender can size datagrams.
pub fn encode_parts<T: AsRef<[u8]>>(from: SystemId, to: SystemId, items: &[T]) -> Vec<u8> {
    let mut out = Vec::new();
    encode_parts_into(&mut out, from, to, items);
    out
}

/// As [`encode_parts`], appending the frame to `out` (whatever `out` held before stays
/// untouched): lets a sealer write the frame after its header.
pub fn encode_parts_into<T: AsRef<[u8]>>(
    out: &mut Vec<u8>,
    from: SystemId,
    to: SystemId,
    items: &[T],
) {
    out.reserve(FRAME_OVERHEAD + items.iter().map(|i| i.as_ref().len()).sum::<usize>());
    encode_header_into(out, from, to, items.len());
    for i in items {
        out.extend_from_slice(i.as_ref());
    }
}

/// Appends the start of a frame of `count` messages to `out`: the version and the
/// frame's header. The caller appends the `count` messages, each serialised as
/// [`encode_item`] does (or as the concatenation of [`encode_item_split`]'s two
/// pieces), and has the frame [`encode`] would give.
pub fn encode_header_into(out: &mut Vec<u8>, from: SystemId, to: SystemId, count: usize) {
    out.push(VERSION);
    let header = (from, to, count);
    let mut buf = [0u8; FRAME_OVERHEAD];
    // Three varints into a buffer that holds the largest three.
    let used = postcard::to_slice(&header, &mut buf)
        .expect("three varints fit FRAME_OVERHEAD bytes")
        .len();
    out.extend_from_slice(&buf[..used]);
}

/// Serialises one message for [`encode_parts`].
pub fn encode_item(msg: &Message) -> Vec<u8> {
    postcard::to_allocvec(msg).expect("postcard serialisation into a Vec cannot fail")
}

/// Serialises one message as [`encode_item`] does, in two pieces whose concatenation is
/// that encoding: everything up to the write data, and the write data itself (shared,
/// not copied) if the message is one write's packet, a part or a zipped part (whose data
/// is the last field of their encoding). Other messages have an empty second piece.
/// A sender keeps the pieces and copies the data once, into the datagram.
pub fn encode_item_split(msg: &Message) -> (Vec<u8>, Bytes) {
    use crate::packet::{Packet, Part, Payload, Zipped};
    let (hollow, data) = match msg {
        Message::Data(ps) => match ps.as_slice() {
            [Packet {
                pair,
                stamp,
                payload: Payload::Write { offset, data },
            }] => (
                Message::Data(vec![Packet {
                    pair: *pair,
                    stamp: *stamp,
                    payload: Payload::Write {
                        offset: *offset,
                        data: Bytes::new(),
                    },
                }]),
                data.clone(),
            ),
            _ => return (encode_item(msg), Bytes::new()),
        },
        Message::Part(p) => (
            Message::Part(Part {
                data: Bytes::new(),
                ..p.clone()
            }),
            p.data.clone(),
        ),
        Message::Zipped(z) => (
            Message::Zipped(Zipped {
                raw: z.raw,
                part: Part {
                    data: Bytes::new(),
                    ..z.part.clone()
                },
            }),
            z.part.data.clone(),
        ),
        other => return (encode_item(other), Bytes::new()),
    };
    let mut head = encode_item(&hollow);
    // The data is the last field: its encoding, the empty byte string, is the varint 0
    // at the very end; its length goes there instead, and the data follows.
    debug_assert_eq!(head.last(), Some(&0));
    head.pop();
    push_varint(&mut head, data.len() as u64);
    (head, data)
}

/// Appends `n` as postcard writes a length (LEB128).
fn push_varint(out: &mut Vec<u8>, mut n: u64) {
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

/// The most bytes [`encode_parts`] adds around its items.
pub const FRAME_OVERHEAD: usize = 1 + 5 + 5 + 5;

/// Parses a frame; any input that is not exactly a frame this build (or an older one)
/// wrote is an error. Write data is copied out of `bytes`.
pub fn decode(bytes: &[u8], max_len: usize) -> Result<Frame, WireError> {
    if bytes.is_empty() {
        return Err(WireError::TooShort(0));
    }
    if bytes.len() > max_len {
        return Err(WireError::TooLong {
            len: bytes.len(),
            max: max_len,
        });
    }
    let body = match bytes[0] {
        VERSION => &bytes[1..],
        v @ OLDEST_VERSION..=LAST_CHECKSUMMED => {
            if bytes.len() < MIN_CHECKSUMMED {
                return Err(WireError::TooShort(bytes.len()));
            }
            let (body, crc) = bytes.split_at(bytes.len() - 4);
            let want = u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]);
            if crc32c::crc32c(body) != want {
                return Err(WireError::Checksum);
            }
            return finish(match v {
                1 => postcard::take_from_bytes::<v1::Frame>(&body[1..]).map(|(f, r)| (f.into(), r)),
                _ => postcard::take_from_bytes::<Frame>(&body[1..]),
            });
        }
        v => return Err(WireError::Version(v)),
    };
    finish(postcard::take_from_bytes::<Frame>(body))
}

fn finish(parsed: postcard::Result<(Frame, &[u8])>) -> Result<Frame, WireError> {
    let (frame, rest) = parsed.map_err(|e| WireError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(WireError::Malformed(format!(
            "{} trailing bytes after the frame",
            rest.len()
        )));
    }
    Ok(frame)
}

thread_local! {
    /// The buffer a [`decode_shared`] on this thread is decoding: write data inside it is
    /// taken as a shared slice of it instead of a copy.
    static SOURCE: RefCell<Option<Bytes>> = const { RefCell::new(None) };
}

/// As [`decode`], but write data (of packets and parts) is taken as slices of `bytes`,
/// not copied: the decoded frame shares the buffer.
pub fn decode_shared(bytes: &Bytes, max_len: usize) -> Result<Frame, WireError> {
    struct Reset(Option<Bytes>);
    impl Drop for Reset {
        fn drop(&mut self) {
            let previous = self.0.take();
            SOURCE.with(|s| *s.borrow_mut() = previous);
        }
    }
    let previous = SOURCE.with(|s| s.borrow_mut().replace(bytes.clone()));
    let _reset = Reset(previous);
    decode(bytes, max_len)
}

/// Deserialises write data: a slice of the buffer [`decode_shared`] is decoding if the
/// data lies inside it, else a copy (as `Bytes`' own `Deserialize` does).
pub(crate) fn shared_bytes<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Bytes, D::Error> {
    struct V;
    impl<'de> serde::de::Visitor<'de> for V {
        type Value = Bytes;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a byte string")
        }

        fn visit_borrowed_bytes<E: serde::de::Error>(self, v: &'de [u8]) -> Result<Bytes, E> {
            Ok(SOURCE.with(|s| match s.borrow().as_ref() {
                Some(src) if contains(src, v) && !v.is_empty() => src.slice_ref(v),
                _ => Bytes::copy_from_slice(v),
            }))
        }

        fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Bytes, E> {
            Ok(Bytes::copy_from_slice(v))
        }

        fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Bytes, E> {
            Ok(Bytes::from(v))
        }

        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Bytes, A::Error> {
            let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
            while let Some(b) = seq.next_element::<u8>()? {
                out.push(b);
            }
            Ok(Bytes::from(out))
        }
    }
    d.deserialize_bytes(V)
}

/// Whether `inner` lies within `outer`'s bytes (so `Bytes::slice_ref` takes it).
fn contains(outer: &[u8], inner: &[u8]) -> bool {
    let (o, i) = (outer.as_ptr() as usize, inner.as_ptr() as usize);
    i >= o && i + inner.len() <= o + outer.len()
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
        // version; version 4 too, without the checksum. This build writes version 4 and
        // reads them all.
        let with_version = |v: u8| {
            let mut b = bytes[..bytes.len() - 4].to_vec();
            b[0] = v;
            let crc = crc32c::crc32c(&b).to_le_bytes();
            b.extend_from_slice(&crc);
            b
        };
        let mut v4 = bytes[..bytes.len() - 4].to_vec();
        v4[0] = 4;
        assert_eq!(encode(&old), v4);
        assert_eq!(decode(&v4, 1 << 20), Ok(old.clone()));
        assert_eq!(decode(&with_version(2), 1 << 20), Ok(old.clone()));
        assert_eq!(decode(&with_version(3), 1 << 20), Ok(old.clone()));
        // A version 4 frame with a checksum appended (as a version 3 build would write
        // it, but under the new version byte) is not a frame: trailing bytes.
        let mut v4_with_crc = v4.clone();
        v4_with_crc.extend_from_slice(&crc32c::crc32c(&v4).to_le_bytes());
        assert!(matches!(
            decode(&v4_with_crc, 1 << 20),
            Err(WireError::Malformed(_))
        ));
        // And a version 3 frame without its checksum fails the checksum, never parses.
        let mut v3_without = v4.clone();
        v3_without[0] = 3;
        assert!(decode(&v3_without, 1 << 20).is_err());
        let _ = old;

        let mark = Message::Data(vec![Packet {
            pair: PairId(3),
            stamp: Stamp::new(Timestamp(9), Seq(10)),
            payload: Payload::Mark(Mark::SyncDone),
        }]);
        // Data = 0, one packet, pair 3, ts 9, seq 10, Mark = 2, SyncDone = 1.
        assert_eq!(encode_item(&mark), [0, 1, 3, 9, 10, 2, 1]);
        // A mark index this build does not know is malformed, not a panic.
        let bad = vec![VERSION, 1, 2, 1, 0, 1, 3, 9, 10, 2, Mark::ALL.len() as u8];
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

    /// `frame` as version 3 wrote it: version 3, the same body, a checksum.
    fn encode_v3(frame: &Frame) -> Vec<u8> {
        let mut b = encode(frame);
        b[0] = 3;
        let crc = crc32c::crc32c(&b).to_le_bytes();
        b.extend_from_slice(&crc);
        b
    }

    #[test]
    fn rejects_short_long_version_checksum() {
        let bytes = encode(&sample());
        assert_eq!(decode(&[], 1 << 20), Err(WireError::TooShort(0)));
        for n in 1..bytes.len() {
            assert!(
                matches!(decode(&bytes[..n], 1 << 20), Err(WireError::Malformed(_))),
                "truncated to {n}"
            );
        }
        assert!(matches!(decode(&bytes, 10), Err(WireError::TooLong { .. })));
        let v3 = encode_v3(&sample());
        assert_eq!(decode(&v3, 1 << 20), Ok(sample()));
        assert_eq!(decode(&v3[..3], 1 << 20), Err(WireError::TooShort(3)));
        let mut flipped = v3.clone();
        flipped[5] ^= 0x10;
        assert_eq!(decode(&flipped, 1 << 20), Err(WireError::Checksum));
        for v in [0, VERSION + 1, 0xff] {
            let mut other = bytes.clone();
            other[0] = v;
            assert_eq!(decode(&other, 1 << 20), Err(WireError::Version(v)));
            let mut other = v3.clone();
            other[0] = v;
            assert_eq!(decode(&other, 1 << 20), Err(WireError::Version(v)));
        }
    }

    #[test]
    fn rejects_trailing_bytes() {
        let mut v4 = encode(&sample());
        v4.push(0);
        assert!(matches!(decode(&v4, 1 << 20), Err(WireError::Malformed(_))));
        let mut body = encode_v3(&sample());
        body.truncate(body.len() - 4);
        body.push(0);
        let crc = crc32c::crc32c(&body).to_le_bytes();
        body.extend_from_slice(&crc);
        assert!(matches!(
            decode(&body, 1 << 20),
            Err(WireError::Malformed(_))
        ));
    }

    /// `decode_shared` gives the frame `decode` gives, with write data (whole packets
    /// and parts) pointing into the buffer; the split encoding of every message is its
    /// encoding.
    #[test]
    fn shared_decode_borrows_the_data_and_split_items_concatenate() {
        let mut f = sample();
        f.messages.push(Message::Part(Part {
            pair: PairId(3),
            stamp: Stamp::new(Timestamp(5), Seq(9)),
            offset: Offset(0),
            total: 300,
            at: 100,
            data: Bytes::from(vec![7u8; 200]),
        }));
        f.messages.push(Message::Zipped(Zipped {
            raw: 1000,
            part: Part {
                pair: PairId(3),
                stamp: Stamp::new(Timestamp(6), Seq(10)),
                offset: Offset(0),
                total: 3,
                at: 0,
                data: Bytes::from_static(b"xyz"),
            },
        }));
        let enc = Bytes::from(encode(&f));
        let got = decode_shared(&enc, 1 << 20).unwrap();
        assert_eq!(got, f);
        let range = enc.as_ptr() as usize..enc.as_ptr() as usize + enc.len();
        let mut shared = 0;
        for m in &got.messages {
            let data = match m {
                Message::Data(ps) => match &ps[0].payload {
                    Payload::Write { data, .. } => Some(data),
                    _ => None,
                },
                Message::Part(p) => Some(&p.data),
                Message::Zipped(z) => Some(&z.part.data),
                _ => None,
            };
            if let Some(d) = data {
                assert!(range.contains(&(d.as_ptr() as usize)), "{m:?} copied");
                shared += 1;
            }
        }
        assert_eq!(shared, 3);
        // Outside `decode_shared`, data is copied (nothing points into a freed buffer).
        let plain = decode(&enc, 1 << 20).unwrap();
        if let Message::Part(p) = &plain.messages[plain.messages.len() - 2] {
            assert!(!range.contains(&(p.data.as_ptr() as usize)));
        }
        for m in &f.messages {
            let (head, tail) = encode_item_split(m);
            let mut joined = head.clone();
            joined.extend_from_slice(&tail);
            assert_eq!(joined, encode_item(m), "{m:?}");
        }
        // A packet of a 64 KiB write: its length takes three bytes of varint.
        let big = Message::Data(vec![Packet {
            pair: PairId(1),
            stamp: Stamp::new(Timestamp(1), Seq(1)),
            payload: Payload::Write {
                offset: Offset(0),
                data: Bytes::from(vec![1u8; 65_536]),
            },
        }]);
        let (head, tail) = encode_item_split(&big);
        assert_eq!(tail.len(), 65_536);
        let mut joined = head;
        joined.extend_from_slice(&tail);
        assert_eq!(joined, encode_item(&big));
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

        /// A version 3 frame with a valid checksum over garbage, and version 4 garbage
        /// (no checksum to pass), are rejected cleanly, or decode to a frame that
        /// round-trips.
        #[test]
        fn garbage_never_panics(body in proptest::collection::vec(any::<u8>(), 0..256)) {
            let mut bytes = vec![3];
            bytes.extend_from_slice(&body);
            let crc = crc32c::crc32c(&bytes).to_le_bytes();
            bytes.extend_from_slice(&crc);
            let _ = decode(&bytes, 1 << 20);
            let mut v4 = vec![VERSION];
            v4.extend_from_slice(&body);
            if let Ok(f) = decode(&v4, 1 << 20) {
                prop_assert_eq!(decode(&encode(&f), 1 << 20), Ok(f));
            }
            if let Ok(f) = decode_shared(&Bytes::from(v4.clone()), 1 << 20) {
                prop_assert_eq!(decode(&encode(&f), 1 << 20), Ok(f));
            }
        }

        /// Version 4 frames of write packets and parts: they round-trip (through
        /// `decode` and `decode_shared`, and the split encoding is the encoding); every
        /// truncation is an error; a flipped bit is an error or decodes to some frame
        /// (the seal's tag, not the frame, catches corruption: see `seal::tests`),
        /// never a panic.
        #[test]
        fn v4_round_trip_truncation_and_bit_flips(
            packets in proptest::collection::vec(
                (any::<u32>(), any::<u64>(), any::<u64>(), any_payload()),
                0..4,
            ),
            part in (any::<u32>(), any::<u32>(), proptest::collection::vec(any::<u8>(), 0..64)),
            flip in any::<proptest::sample::Index>(),
            bit in 0u8..8,
        ) {
            let mut messages: Vec<Message> = packets
                .into_iter()
                .map(|(pair, ts, seq, payload)| Message::Data(vec![Packet {
                    pair: PairId(pair),
                    stamp: Stamp::new(Timestamp(ts), Seq(seq)),
                    payload,
                }]))
                .collect();
            messages.push(Message::Part(Part {
                pair: PairId(1),
                stamp: Stamp::new(Timestamp(2), Seq(3)),
                offset: Offset(4),
                total: part.0,
                at: part.1,
                data: Bytes::from(part.2),
            }));
            let f = Frame { from: SystemId(1), to: SystemId(2), messages };
            let bytes = encode(&f);
            prop_assert_eq!(bytes[0], VERSION);
            prop_assert_eq!(decode(&bytes, 1 << 20), Ok(f.clone()));
            prop_assert_eq!(decode_shared(&Bytes::from(bytes.clone()), 1 << 20), Ok(f.clone()));
            let mut split = Vec::new();
            encode_header_into(&mut split, f.from, f.to, f.messages.len());
            for m in &f.messages {
                let (head, tail) = encode_item_split(m);
                split.extend_from_slice(&head);
                split.extend_from_slice(&tail);
            }
            prop_assert_eq!(&split, &bytes);
            for n in 0..bytes.len() {
                prop_assert!(decode(&bytes[..n], 1 << 20).is_err(), "truncated to {}", n);
            }
            let mut flipped = bytes.clone();
            let i = flip.index(flipped.len());
            flipped[i] ^= 1 << bit;
            if let Ok(g) = decode(&flipped, 1 << 20) {
                prop_assert_eq!(decode(&encode(&g), 1 << 20), Ok(g));
            }
        }
    }
}
