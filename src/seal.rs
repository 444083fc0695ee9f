//! Sealing datagrams with the group key (invariant I6: only the primary writes).
//!
//! ```text
//! +---------+----------------+----------------+-------------------------+-----------+
//! | version | epoch (u64 LE) | nonce (16 B)   | counter (u64 LE)        | sealed    |
//! |  1 byte | session start  | random/session | per datagram, from 1    | frame+tag |
//! +---------+----------------+----------------+-------------------------+-----------+
//!   \_______________ authenticated, in clear (AAD) ______________________/
//! ```
//!
//! XChaCha20-Poly1305 with the 24-byte nonce `epoch ‖ random ‖ counter`: unique for every
//! datagram any process sends under the key. A session is one sender process lifetime.
//! The receiver keeps, per peer system (named inside the sealed frame, never taken from
//! the source address), the newest session and a replay window over its counters:
//! - a datagram that fails to open, is too short, too long or of another version is
//!   dropped before anything is parsed;
//! - a counter seen before, or older than the window, is a replay: dropped;
//! - a session older than the peer's newest is stale (a replay from before a restart):
//!   dropped; a newer one means the peer restarted, and is reported.
//!
//! Nothing here panics on any input.

use crate::types::SystemId;
use crate::wire::{self, Frame, WireError};
use chacha20poly1305::aead::{AeadInPlace, KeyInit};
use chacha20poly1305::{Key, Tag, XChaCha20Poly1305, XNonce};
use std::collections::HashMap;

pub const VERSION: u8 = 1;
pub const KEY_LEN: usize = 32;
const HEADER: usize = 1 + 8 + 16;
const COUNTER: usize = 8;
const TAG: usize = 16;
/// Bytes a sealed datagram adds to its frame.
pub const OVERHEAD: usize = HEADER + COUNTER + TAG;
/// Counters this far behind the newest are still accepted once.
pub const REPLAY_WINDOW: u64 = 1024;

/// Who sends: one per process lifetime. `epoch` must grow across restarts of a system
/// (wall-clock nanoseconds at start, or a persisted counter).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Session {
    pub epoch: u64,
    pub nonce: [u8; 16],
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SealError {
    #[error("datagram of {0} bytes is too short")]
    TooShort(usize),
    #[error("datagram of {len} bytes exceeds {max}")]
    TooLong { len: usize, max: usize },
    #[error("unsupported datagram version {0}")]
    Version(u8),
    #[error("datagram does not open under the group key")]
    Unauthenticated,
    #[error("replayed datagram (counter {0})")]
    Replay(u64),
    #[error("datagram from a stale session of {0}")]
    StaleSession(SystemId),
    #[error("datagram for {to}, this is {me}")]
    Misaddressed { to: SystemId, me: SystemId },
    #[error(transparent)]
    Wire(#[from] WireError),
}

/// Seals frames of one sender session.
pub struct Sealer {
    aead: XChaCha20Poly1305,
    session: Session,
    counter: u64,
}

impl Sealer {
    pub fn new(key: &[u8; KEY_LEN], session: Session) -> Self {
        Sealer {
            aead: XChaCha20Poly1305::new(Key::from_slice(key)),
            session,
            counter: 0,
        }
    }

    pub fn session(&self) -> Session {
        self.session
    }

    /// Encodes and seals `frame` into one datagram.
    pub fn seal(&mut self, frame: &Frame) -> Vec<u8> {
        self.seal_bytes(&wire::encode(frame))
    }

    /// Seals already-encoded frame bytes.
    pub fn seal_bytes(&mut self, plain: &[u8]) -> Vec<u8> {
        self.counter += 1;
        let mut out = Vec::with_capacity(OVERHEAD + plain.len());
        out.push(VERSION);
        out.extend_from_slice(&self.session.epoch.to_le_bytes());
        out.extend_from_slice(&self.session.nonce);
        out.extend_from_slice(&self.counter.to_le_bytes());
        let aad_len = out.len();
        out.extend_from_slice(plain);
        let nonce = nonce(&out[1..aad_len]);
        let (aad, body) = out.split_at_mut(aad_len);
        // Encryption in place cannot fail for buffers below the cipher's 256 GiB limit.
        let tag = self
            .aead
            .encrypt_in_place_detached(&nonce, aad, body)
            .expect("XChaCha20-Poly1305 encrypts any datagram-sized buffer");
        out.extend_from_slice(&tag);
        out
    }
}

fn nonce(header_after_version: &[u8]) -> XNonce {
    // epoch (8) ‖ random (16) ‖ counter (8) = 32 bytes; XChaCha wants 24: fold the epoch
    // into the random part so all three stay significant.
    let mut n = [0u8; 24];
    n[..16].copy_from_slice(&header_after_version[8..24]);
    for (i, b) in header_after_version[..8].iter().enumerate() {
        n[i] ^= b;
    }
    n[16..].copy_from_slice(&header_after_version[24..32]);
    *XNonce::from_slice(&n)
}

/// What an opened datagram says about its sender.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Peer {
    /// The peer's current session.
    Known,
    /// First datagram of a newer session: the peer (re)started.
    Restarted { previous: Option<Session> },
}

#[derive(Clone, Copy, Debug)]
struct Window {
    session: Session,
    highest: u64,
    /// Bit i set: counter `highest - i` was seen.
    seen: [u64; (REPLAY_WINDOW / 64) as usize],
}

impl Window {
    fn new(session: Session) -> Self {
        Window {
            session,
            highest: 0,
            seen: [0; (REPLAY_WINDOW / 64) as usize],
        }
    }

    fn check(&self, counter: u64) -> Result<(), SealError> {
        if counter == 0 {
            return Err(SealError::Replay(0));
        }
        if counter > self.highest {
            return Ok(());
        }
        let age = self.highest - counter;
        if age >= REPLAY_WINDOW {
            return Err(SealError::Replay(counter));
        }
        let (w, b) = ((age / 64) as usize, age % 64);
        if self.seen[w] & (1 << b) != 0 {
            Err(SealError::Replay(counter))
        } else {
            Ok(())
        }
    }

    fn mark(&mut self, counter: u64) {
        if counter > self.highest {
            let shift = counter - self.highest;
            self.shift(shift);
            self.highest = counter;
        }
        let age = self.highest - counter;
        let (w, b) = ((age / 64) as usize, age % 64);
        self.seen[w] |= 1 << b;
    }

    fn shift(&mut self, by: u64) {
        if by >= REPLAY_WINDOW {
            self.seen = [0; (REPLAY_WINDOW / 64) as usize];
            return;
        }
        let words = (by / 64) as usize;
        let bits = by % 64;
        let n = self.seen.len();
        for i in (0..n).rev() {
            let src = i.checked_sub(words);
            let hi = src.map_or(0, |s| self.seen[s] << bits);
            let lo = match (bits, src.and_then(|s| s.checked_sub(1))) {
                (0, _) | (_, None) => 0,
                (_, Some(s)) => self.seen[s] >> (64 - bits),
            };
            self.seen[i] = hi | lo;
        }
    }
}

/// Opens datagrams addressed to one system.
pub struct Opener {
    aead: XChaCha20Poly1305,
    me: SystemId,
    max_len: usize,
    peers: HashMap<SystemId, Window>,
}

impl Opener {
    pub fn new(key: &[u8; KEY_LEN], me: SystemId, max_len: usize) -> Self {
        Opener {
            aead: XChaCha20Poly1305::new(Key::from_slice(key)),
            me,
            max_len,
            peers: HashMap::new(),
        }
    }

    /// Authenticates, checks for replays and decodes one datagram. State changes only if
    /// the datagram is accepted.
    pub fn open(&mut self, datagram: &[u8]) -> Result<(Frame, Peer), SealError> {
        let mut buf = datagram.to_vec();
        self.open_in_place(&mut buf)
    }

    /// As [`Opener::open`], decrypting in `buf`.
    pub fn open_in_place(&mut self, buf: &mut [u8]) -> Result<(Frame, Peer), SealError> {
        let len = buf.len();
        if len < OVERHEAD + 1 {
            return Err(SealError::TooShort(len));
        }
        if len > self.max_len {
            return Err(SealError::TooLong {
                len,
                max: self.max_len,
            });
        }
        if buf[0] != VERSION {
            return Err(SealError::Version(buf[0]));
        }
        let aad_len = HEADER + COUNTER;
        let mut epoch = [0u8; 8];
        epoch.copy_from_slice(&buf[1..9]);
        let mut rnd = [0u8; 16];
        rnd.copy_from_slice(&buf[9..25]);
        let mut ctr = [0u8; 8];
        ctr.copy_from_slice(&buf[25..33]);
        let session = Session {
            epoch: u64::from_le_bytes(epoch),
            nonce: rnd,
        };
        let counter = u64::from_le_bytes(ctr);
        let nonce = nonce(&buf[1..aad_len]);
        let (head, rest) = buf.split_at_mut(aad_len);
        let (body, tag) = rest.split_at_mut(rest.len() - TAG);
        let tag = *Tag::from_slice(tag);
        self.aead
            .decrypt_in_place_detached(&nonce, head, body, &tag)
            .map_err(|_| SealError::Unauthenticated)?;
        // Authentic: the frame names its sender.
        let frame = wire::decode(body, self.max_len)?;
        if frame.to != self.me {
            return Err(SealError::Misaddressed {
                to: frame.to,
                me: self.me,
            });
        }
        let peer = match self.peers.get_mut(&frame.from) {
            Some(w) if w.session == session => {
                w.check(counter)?;
                w.mark(counter);
                Peer::Known
            }
            Some(w) if session.epoch > w.session.epoch => {
                let previous = Some(w.session);
                *w = Window::new(session);
                w.mark(counter);
                Peer::Restarted { previous }
            }
            Some(_) => return Err(SealError::StaleSession(frame.from)),
            None => {
                let mut w = Window::new(session);
                w.mark(counter);
                self.peers.insert(frame.from, w);
                Peer::Restarted { previous: None }
            }
        };
        Ok((frame, peer))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::Message;
    use crate::types::Timestamp;
    use proptest::prelude::*;

    const KEY: [u8; 32] = [7; 32];

    fn frame(from: u32, to: u32, limit: u64) -> Frame {
        Frame {
            from: SystemId(from),
            to: SystemId(to),
            messages: vec![Message::Release {
                limit: Timestamp(limit),
            }],
        }
    }

    fn session(epoch: u64, r: u8) -> Session {
        Session {
            epoch,
            nonce: [r; 16],
        }
    }

    #[test]
    fn round_trip_and_replay() {
        let mut s = Sealer::new(&KEY, session(10, 1));
        let mut o = Opener::new(&KEY, SystemId(2), 65_536);
        let d1 = s.seal(&frame(1, 2, 5));
        let d2 = s.seal(&frame(1, 2, 6));
        assert_eq!(
            o.open(&d2),
            Ok((frame(1, 2, 6), Peer::Restarted { previous: None }))
        );
        assert_eq!(
            o.open(&d1),
            Ok((frame(1, 2, 5), Peer::Known)),
            "reordered is fine"
        );
        assert_eq!(o.open(&d1), Err(SealError::Replay(1)));
        assert_eq!(o.open(&d2), Err(SealError::Replay(2)));
    }

    #[test]
    fn forged_truncated_flipped_oversized_are_rejected() {
        let mut s = Sealer::new(&KEY, session(10, 1));
        let mut o = Opener::new(&KEY, SystemId(2), 200);
        let d = s.seal(&frame(1, 2, 5));
        let mut wrong = Sealer::new(&[8; 32], session(10, 1));
        assert_eq!(
            o.open(&wrong.seal(&frame(1, 2, 5))),
            Err(SealError::Unauthenticated)
        );
        assert_eq!(o.open(&d[..d.len() - 1]), Err(SealError::Unauthenticated));
        assert_eq!(o.open(&d[..10]), Err(SealError::TooShort(10)));
        for i in 0..d.len() {
            let mut f = d.clone();
            f[i] ^= 0x01;
            assert!(o.open(&f).is_err(), "bit flip at {i} accepted");
        }
        assert!(matches!(
            o.open(&vec![1u8; 201]),
            Err(SealError::TooLong { .. })
        ));
        // None of that consumed the counter: the genuine datagram still opens once.
        assert!(o.open(&d).is_ok());
    }

    #[test]
    fn misaddressed_is_rejected() {
        let mut s = Sealer::new(&KEY, session(10, 1));
        let mut o = Opener::new(&KEY, SystemId(3), 65_536);
        assert_eq!(
            o.open(&s.seal(&frame(1, 2, 5))),
            Err(SealError::Misaddressed {
                to: SystemId(2),
                me: SystemId(3)
            })
        );
    }

    #[test]
    fn peer_restart_and_stale_session() {
        let mut old = Sealer::new(&KEY, session(10, 1));
        let mut new = Sealer::new(&KEY, session(20, 2));
        let mut o = Opener::new(&KEY, SystemId(2), 65_536);
        let stale = old.seal(&frame(1, 2, 1));
        assert!(o.open(&old.seal(&frame(1, 2, 2))).is_ok());
        assert_eq!(
            o.open(&new.seal(&frame(1, 2, 3))).map(|(_, p)| p),
            Ok(Peer::Restarted {
                previous: Some(session(10, 1))
            })
        );
        assert_eq!(o.open(&stale), Err(SealError::StaleSession(SystemId(1))));
    }

    #[test]
    fn window_slides() {
        let mut w = Window::new(session(1, 1));
        for c in [1, 2, 3, 100, 70, 1500] {
            assert!(w.check(c).is_ok(), "{c}");
            w.mark(c);
        }
        assert!(w.check(100).is_err(), "too old now");
        assert!(w.check(1500).is_err());
        assert!(w.check(1499).is_ok());
        assert!(w.check(1500 - REPLAY_WINDOW + 1).is_ok());
        assert!(w.check(1500 - REPLAY_WINDOW).is_err());
    }

    proptest! {
        /// Any counter sequence: each counter is accepted at most once, and every
        /// counter within the window of the newest that was not seen is accepted.
        #[test]
        fn window_matches_a_set(counters in proptest::collection::vec(1u64..3000, 1..400)) {
            let mut w = Window::new(session(1, 1));
            let mut seen = std::collections::BTreeSet::new();
            let mut highest = 0;
            for c in counters {
                let fresh = !seen.contains(&c) && (c > highest || highest - c < REPLAY_WINDOW);
                prop_assert_eq!(w.check(c).is_ok(), fresh, "counter {}", c);
                if fresh {
                    w.mark(c);
                    seen.insert(c);
                    highest = highest.max(c);
                }
            }
        }

        #[test]
        fn arbitrary_datagrams_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let mut o = Opener::new(&KEY, SystemId(2), 65_536);
            prop_assert!(o.open(&bytes).is_err());
        }
    }
}
