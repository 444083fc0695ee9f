//! Sealing datagrams with the group key (invariant I6: only the primary writes).
//!
//! ```text
//! +---------+----------------+----------------+-------------------------+-----------+
//! | version | epoch (u64 LE) | random (16 B)  | counter (u64 LE)        | sealed    |
//! |  1 byte | session start  | per session    | per datagram, from 1    | frame+tag |
//! +---------+----------------+----------------+-------------------------+-----------+
//!   \_______________ authenticated, in clear (AAD) ______________________/
//! ```
//!
//! Construction (version 2): AES-256-GCM under a per-session subkey.
//! - `prk = HKDF-SHA256-Extract(salt = "tidemark seal v2", ikm = group key)`, once;
//! - `subkey = HKDF-SHA256-Expand(prk, info = "tidemark session" ‖ epoch ‖ random, 32)`:
//!   one key per sender session, a session being one sender process lifetime;
//! - nonce (96 bits) = `0u32 ‖ counter` (big endian); the counter starts at 1 and only
//!   grows, so no (subkey, nonce) pair is ever used twice, and a session seals far fewer
//!   than the 2^32 datagrams GCM allows per key before it ends;
//! - AAD = the 33 header bytes; the tag (16 B) follows the ciphertext.
//!
//! The 192-bit session (epoch ‖ 128 random bits) makes two sessions deriving the same
//! subkey as unlikely as a random 128-bit collision, even if a restarted system reuses
//! an epoch. Version 1 (XChaCha20-Poly1305 over the group key, 24-byte nonce) is no
//! longer spoken: both ends must run the same version.
//!
//! The receiver keeps, per peer system (named inside the sealed frame, never taken from
//! the source address), the newest session with its subkey and a replay window over its
//! counters:
//! - a datagram that fails to open, is too short, too long or of another version is
//!   dropped before anything is parsed;
//! - a counter seen before, or older than the window, is a replay: dropped; so is
//!   counter 0, which no sender seals (not even as a new session's first datagram);
//! - a session older than the peer's newest is stale (a replay from before a restart):
//!   dropped; a newer one means the peer restarted, and is reported.
//!
//! Nothing here panics on any input.

use crate::types::SystemId;
use crate::wire::{self, Frame, WireError};
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::hkdf;
use std::collections::HashMap;

pub const VERSION: u8 = 2;
pub const KEY_LEN: usize = 32;
const HEADER: usize = 1 + 8 + 16;
const COUNTER: usize = 8;
const TAG: usize = 16;
/// Authenticated clear header: version, session, counter.
const AAD_LEN: usize = HEADER + COUNTER;
/// Bytes a sealed datagram adds to its frame.
pub const OVERHEAD: usize = HEADER + COUNTER + TAG;
/// Counters this far behind the newest are still accepted once.
pub const REPLAY_WINDOW: u64 = 1024;
const SALT: &[u8] = b"tidemark seal v2";
const INFO: &[u8] = b"tidemark session";

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

/// The group key, extracted once; derives the subkey of any session.
struct GroupKey(hkdf::Prk);

impl GroupKey {
    fn new(key: &[u8; KEY_LEN]) -> Self {
        GroupKey(hkdf::Salt::new(hkdf::HKDF_SHA256, SALT).extract(key))
    }

    /// The AES-256-GCM key of `session`: a pure function of the group key and session.
    fn subkey(&self, session: Session) -> LessSafeKey {
        let epoch = session.epoch.to_le_bytes();
        let info = [INFO, &epoch[..], &session.nonce[..]];
        // Expanding 32 bytes (far below HKDF's 255 * 32 limit) into a key of exactly the
        // cipher's length cannot fail; neither input comes from outside the process
        // in a way that could change those lengths.
        let okm = self
            .0
            .expand(&info, &AES_256_GCM)
            .expect("HKDF-SHA256 expands 32 bytes");
        LessSafeKey::new(UnboundKey::from(okm))
    }
}

/// The link key of a group at `generation` (the split-brain guard, DRBD's UUIDs in
/// spirit): generation 0 is the group key itself (so groups that never failed over keep
/// their key), any other is `HKDF-SHA256(salt = "tidemark generation", ikm = group key,
/// info = label ‖ generation)`. Systems at different generations (or labels) derive
/// different keys, so every datagram one seals fails to open at the other: a stale
/// primary can never replicate into a promoted group, nor a promoted primary into a
/// stale secondary (I6: dropped and counted, no state changes). `label` separates keys
/// that must not meet even at one generation (a primary waiting for its failback uses
/// its own).
pub fn generation_key(group: &[u8; KEY_LEN], generation: u64, label: &[u8]) -> [u8; KEY_LEN] {
    if generation == 0 && label.is_empty() {
        return *group;
    }
    struct Len;
    impl hkdf::KeyType for Len {
        fn len(&self) -> usize {
            KEY_LEN
        }
    }
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, b"tidemark generation").extract(group);
    let g = generation.to_le_bytes();
    let info = [label, &g[..]];
    let mut out = [0u8; KEY_LEN];
    // 32 bytes from HKDF-SHA256 (limit 255 * 32) into a buffer of exactly that length.
    prk.expand(&info, Len)
        .and_then(|okm| okm.fill(&mut out))
        .expect("HKDF-SHA256 expands 32 bytes");
    out
}

fn gcm_nonce(counter: u64) -> Nonce {
    let mut n = [0u8; NONCE_LEN];
    n[NONCE_LEN - 8..].copy_from_slice(&counter.to_be_bytes());
    Nonce::assume_unique_for_key(n)
}

/// Seals frames of one sender session.
pub struct Sealer {
    key: LessSafeKey,
    session: Session,
    counter: u64,
}

impl Sealer {
    pub fn new(key: &[u8; KEY_LEN], session: Session) -> Self {
        Sealer {
            key: GroupKey::new(key).subkey(session),
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
        self.seal_with(plain.len(), |out| out.extend_from_slice(plain))
    }

    /// Seals the frame bytes `write` appends to the buffer it is given (which holds the
    /// header already), without copying them: one allocation per datagram.
    /// `len_hint` is the expected frame length (capacity only).
    pub fn seal_with(&mut self, len_hint: usize, write: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
        self.counter += 1;
        self.seal_as(self.counter, len_hint, write)
    }

    /// Seals `plain` as datagram number `counter` of this session, whatever was sealed
    /// before: for the fuzz target's replays (a sender must never do this: a counter
    /// sealed twice reuses a nonce).
    pub(crate) fn seal_numbered(&self, counter: u64, plain: &[u8]) -> Vec<u8> {
        self.seal_as(counter, plain.len(), |out| out.extend_from_slice(plain))
    }

    fn seal_as(&self, counter: u64, len_hint: usize, write: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
        let mut out = Vec::with_capacity(OVERHEAD + len_hint);
        self.seal_as_into(counter, &mut out, write);
        out
    }

    /// Appends one sealed datagram to `out` (whatever `out` held before stays as it
    /// was): the header, the frame bytes `write` appends after it, sealed in place, and
    /// the tag. Returns the datagram's length. The frame is written once, straight into
    /// the buffer that is sent, and never copied.
    pub fn seal_into(&mut self, out: &mut Vec<u8>, write: impl FnOnce(&mut Vec<u8>)) -> usize {
        self.counter += 1;
        self.seal_as_into(self.counter, out, write)
    }

    fn seal_as_into(
        &self,
        counter: u64,
        out: &mut Vec<u8>,
        write: impl FnOnce(&mut Vec<u8>),
    ) -> usize {
        let start = out.len();
        out.push(VERSION);
        out.extend_from_slice(&self.session.epoch.to_le_bytes());
        out.extend_from_slice(&self.session.nonce);
        out.extend_from_slice(&counter.to_le_bytes());
        write(out);
        let (aad, body) = out[start..].split_at_mut(AAD_LEN);
        // Sealing fails only past GCM's 64 GiB per-message limit, far above any datagram.
        let tag = self
            .key
            .seal_in_place_separate_tag(gcm_nonce(counter), Aad::from(&*aad), body)
            .expect("AES-256-GCM seals any datagram-sized buffer");
        out.extend_from_slice(tag.as_ref());
        out.len() - start
    }
}

/// What an opened datagram says about its sender.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Peer {
    /// The peer's current session.
    Known,
    /// First datagram of a newer session: the peer (re)started.
    Restarted { previous: Option<Session> },
}

struct Window {
    session: Session,
    key: LessSafeKey,
    highest: u64,
    /// Bit i set: counter `highest - i` was seen.
    seen: [u64; (REPLAY_WINDOW / 64) as usize],
}

impl Window {
    fn new(session: Session, key: LessSafeKey) -> Self {
        Window {
            session,
            key,
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
    group: GroupKey,
    me: SystemId,
    max_len: usize,
    peers: HashMap<SystemId, Window>,
}

impl Opener {
    pub fn new(key: &[u8; KEY_LEN], me: SystemId, max_len: usize) -> Self {
        Opener {
            group: GroupKey::new(key),
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

    /// As [`Opener::open`], decrypting in `buf` (write data is copied out of it).
    ///
    /// The subkey of a peer's current session is kept with its replay window; a datagram
    /// of any other session costs one HKDF expansion before it is authenticated (and the
    /// derived key is kept only if it is).
    pub fn open_in_place(&mut self, buf: &mut [u8]) -> Result<(Frame, Peer), SealError> {
        let opened = self.unseal(buf)?;
        let frame = wire::decode(&buf[AAD_LEN..AAD_LEN + opened.len], self.max_len)?;
        self.accept(frame, opened)
    }

    /// As [`Opener::open_in_place`], taking the datagram's buffer: write data in the
    /// frame is shared with it, not copied.
    pub fn open_owned(&mut self, mut buf: Vec<u8>) -> Result<(Frame, Peer), SealError> {
        let opened = self.unseal(&mut buf)?;
        let body = bytes::Bytes::from(buf).slice(AAD_LEN..AAD_LEN + opened.len);
        let frame = wire::decode_shared(&body, self.max_len)?;
        self.accept(frame, opened)
    }

    /// Checks the length and version and decrypts the datagram in place; the frame is
    /// then `buf[AAD_LEN..][..len]`. Changes no state.
    fn unseal(&self, buf: &mut [u8]) -> Result<Unsealed, SealError> {
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
        let mut derived = None;
        let (head, sealed) = buf.split_at_mut(AAD_LEN);
        let key = match self.peers.values().find(|w| w.session == session) {
            Some(w) => &w.key,
            None => derived.insert(self.group.subkey(session)),
        };
        let body = key
            .open_in_place(gcm_nonce(counter), Aad::from(&*head), sealed)
            .map_err(|_| SealError::Unauthenticated)?;
        Ok(Unsealed {
            session,
            counter,
            derived,
            len: body.len(),
        })
    }

    /// Takes an authentic datagram's frame: checks its address, its counter against the
    /// replay window and its session against the peer's, and only then marks it seen.
    fn accept(&mut self, frame: Frame, opened: Unsealed) -> Result<(Frame, Peer), SealError> {
        let Unsealed {
            session,
            counter,
            derived,
            ..
        } = opened;
        // Authentic: the frame names its sender.
        if frame.to != self.me {
            return Err(SealError::Misaddressed {
                to: frame.to,
                me: self.me,
            });
        }
        if counter == 0 {
            // Never sealed (a sender counts from 1): refused here, not only by a known
            // session's window, so it cannot open a new session either.
            return Err(SealError::Replay(0));
        }
        let group = &self.group;
        let key = move || derived.unwrap_or_else(|| group.subkey(session));
        let peer = match self.peers.get_mut(&frame.from) {
            Some(w) if w.session == session => {
                w.check(counter)?;
                w.mark(counter);
                Peer::Known
            }
            Some(w) if session.epoch > w.session.epoch => {
                let previous = Some(w.session);
                *w = Window::new(session, key());
                w.mark(counter);
                Peer::Restarted { previous }
            }
            Some(_) => return Err(SealError::StaleSession(frame.from)),
            None => {
                let mut w = Window::new(session, key());
                w.mark(counter);
                self.peers.insert(frame.from, w);
                Peer::Restarted { previous: None }
            }
        };
        Ok((frame, peer))
    }
}

/// A datagram that opened: who sealed it, its counter, the subkey derived to open it
/// (if it was not a known session's), and its frame's length.
struct Unsealed {
    session: Session,
    counter: u64,
    derived: Option<LessSafeKey>,
    len: usize,
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
                epoch: None,
            }],
        }
    }

    fn session(epoch: u64, r: u8) -> Session {
        Session {
            epoch,
            nonce: [r; 16],
        }
    }

    /// Counter 0 is never sealed (a sender counts from 1), so it never opens: not in a
    /// known session, and not as the first datagram of a new one either (found by the
    /// `seal` fuzz target: a new session's window took it, a known one refused it).
    #[test]
    fn counter_zero_never_opens() {
        let s = Sealer::new(&KEY, session(10, 1));
        let zero = s.seal_numbered(0, &crate::wire::encode(&frame(1, 2, 5)));
        let mut o = Opener::new(&KEY, SystemId(2), 65_536);
        assert_eq!(
            o.open(&zero),
            Err(SealError::Replay(0)),
            "first of a session"
        );
        let one = s.seal_numbered(1, &crate::wire::encode(&frame(1, 2, 5)));
        assert!(o.open(&one).is_ok());
        assert_eq!(
            o.open(&zero),
            Err(SealError::Replay(0)),
            "in a known session"
        );
        let restarted = Sealer::new(&KEY, session(11, 1));
        let zero = restarted.seal_numbered(0, &crate::wire::encode(&frame(1, 2, 6)));
        assert_eq!(
            o.open(&zero),
            Err(SealError::Replay(0)),
            "first of a restart"
        );
    }

    /// A datagram sealed at one generation never opens at another (the split-brain
    /// guard); generation 0 without a label is the group key itself.
    #[test]
    fn generations_do_not_talk() {
        assert_eq!(generation_key(&KEY, 0, b""), KEY);
        let g1 = generation_key(&KEY, 1, b"");
        let g2 = generation_key(&KEY, 2, b"");
        let pending = generation_key(&KEY, 2, b"failback pending");
        assert_ne!(g1, g2);
        assert_ne!(g2, pending);
        assert_eq!(g2, generation_key(&KEY, 2, b""), "a pure function");
        for (send, recv, opens) in [
            (g1, g1, true),
            (g1, g2, false),
            (KEY, g1, false),
            (g2, pending, false),
        ] {
            let mut s = Sealer::new(&send, session(10, 1));
            let mut o = Opener::new(&recv, SystemId(2), 65_536);
            let r = o.open(&s.seal(&frame(1, 2, 5)));
            assert_eq!(r.is_ok(), opens, "{r:?}");
            if !opens {
                assert_eq!(r, Err(SealError::Unauthenticated));
            }
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

    /// Reseals `d`'s body under `key` with `d`'s own header (same session and counter).
    fn reseal_with(key: &LessSafeKey, d: &[u8], plain: &[u8]) -> Vec<u8> {
        let mut out = d[..AAD_LEN].to_vec();
        let mut ctr = [0u8; 8];
        ctr.copy_from_slice(&d[25..33]);
        out.extend_from_slice(plain);
        let (aad, body) = out.split_at_mut(AAD_LEN);
        let tag = key
            .seal_in_place_separate_tag(gcm_nonce(u64::from_le_bytes(ctr)), Aad::from(&*aad), body)
            .expect("seal");
        out.extend_from_slice(tag.as_ref());
        out
    }

    #[test]
    fn subkeys_differ_per_session_and_key() {
        let plain = wire::encode(&frame(1, 2, 5));
        let mut s = Sealer::new(&KEY, session(10, 1));
        let d = s.seal_bytes(&plain);
        assert_eq!(d[0], VERSION);
        assert_eq!(d.len(), plain.len() + OVERHEAD);
        // The same header and counter sealed under another session's subkey, or under
        // the group key of another cluster, or with the raw group key as the AES key
        // (no derivation): none opens.
        let g = GroupKey::new(&KEY);
        let others = [
            g.subkey(session(10, 2)),
            g.subkey(session(11, 1)),
            GroupKey::new(&[8; 32]).subkey(session(10, 1)),
            LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &KEY).expect("key")),
        ];
        for (i, k) in others.iter().enumerate() {
            let mut o = Opener::new(&KEY, SystemId(2), 65_536);
            assert_eq!(
                o.open(&reseal_with(k, &d, &plain)),
                Err(SealError::Unauthenticated),
                "key {i}"
            );
        }
        // The right subkey does open it: the test above is not vacuous.
        let mut o = Opener::new(&KEY, SystemId(2), 65_536);
        assert!(o
            .open(&reseal_with(&g.subkey(session(10, 1)), &d, &plain))
            .is_ok());
        // A header moved to another session or counter does not open either.
        let mut o = Opener::new(&KEY, SystemId(2), 65_536);
        for at in [1, 9, 25] {
            let mut moved = d.clone();
            moved[at] ^= 0x80;
            assert_eq!(o.open(&moved), Err(SealError::Unauthenticated), "at {at}");
        }
        assert!(o.open(&d).is_ok());
    }

    #[test]
    fn other_versions_and_truncations_are_rejected_without_panic() {
        let mut s = Sealer::new(&KEY, session(10, 1));
        let mut o = Opener::new(&KEY, SystemId(2), 65_536);
        let d = s.seal(&frame(1, 2, 5));
        let mut v1 = d.clone();
        v1[0] = 1;
        assert_eq!(o.open(&v1), Err(SealError::Version(1)));
        for n in 0..d.len() {
            assert!(o.open(&d[..n]).is_err(), "truncated to {n}");
        }
        // Tag cut off and replaced by zeros.
        let mut zeroed = d.clone();
        let n = zeroed.len();
        zeroed[n - TAG..].fill(0);
        assert_eq!(o.open(&zeroed), Err(SealError::Unauthenticated));
        assert_eq!(
            o.open(&d).map(|(_, p)| p),
            Ok(Peer::Restarted { previous: None })
        );
        assert_eq!(o.open(&d), Err(SealError::Replay(1)));
    }

    #[test]
    fn many_sessions_keep_their_own_windows_and_keys() {
        // Two peers, each sealing with its own session; interleaved and reordered
        // datagrams all open exactly once.
        let mut p1 = Sealer::new(&KEY, session(10, 1));
        let mut p3 = Sealer::new(&KEY, session(10, 3));
        let mut o = Opener::new(&KEY, SystemId(2), 65_536);
        let mut ds = Vec::new();
        for i in 0..50 {
            ds.push(p1.seal(&frame(1, 2, i)));
            ds.push(p3.seal(&frame(3, 2, i)));
        }
        ds.reverse();
        for d in &ds {
            assert!(o.open(d).is_ok());
        }
        for d in &ds {
            assert!(matches!(o.open(d), Err(SealError::Replay(_))));
        }
    }

    #[test]
    fn window_slides() {
        let mut w = Window::new(session(1, 1), GroupKey::new(&KEY).subkey(session(1, 1)));
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
            let mut w = Window::new(session(1, 1), GroupKey::new(&KEY).subkey(session(1, 1)));
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
            prop_assert!(o.open_owned(bytes).is_err());
        }

        /// Version 4 frames carry no checksum of their own: the tag is what catches a
        /// corrupted frame. Any bit flipped anywhere in a sealed datagram of write data
        /// (header, frame or tag), and any truncation, is refused, by `open` and by
        /// `open_owned`, and changes no state: the genuine datagram still opens once,
        /// to the frame sealed.
        #[test]
        fn flipped_or_truncated_datagrams_never_open(
            data in proptest::collection::vec(any::<u8>(), 1..2000),
            flip in any::<proptest::sample::Index>(),
            bit in 0u8..8,
            cut in any::<proptest::sample::Index>(),
        ) {
            use crate::packet::{Packet, Payload};
            use crate::types::{Offset, PairId, Seq, Stamp};
            let f = Frame {
                from: SystemId(1),
                to: SystemId(2),
                messages: vec![Message::Data(vec![Packet {
                    pair: PairId(1),
                    stamp: Stamp::new(Timestamp(5), Seq(1)),
                    payload: Payload::Write {
                        offset: Offset(4096),
                        data: bytes::Bytes::from(data),
                    },
                }])],
            };
            let mut s = Sealer::new(&KEY, session(10, 1));
            let mut d = Vec::new();
            let n = s.seal_into(&mut d, |out| out.extend_from_slice(&wire::encode(&f)));
            prop_assert_eq!(n, d.len());
            let mut o = Opener::new(&KEY, SystemId(2), 65_536);
            let mut flipped = d.clone();
            let i = flip.index(flipped.len());
            flipped[i] ^= 1 << bit;
            prop_assert!(o.open(&flipped).is_err(), "flip at {}", i);
            prop_assert!(o.open_owned(flipped).is_err(), "flip at {}", i);
            let short = d[..cut.index(d.len())].to_vec();
            prop_assert!(o.open(&short).is_err());
            prop_assert!(o.open_owned(short).is_err());
            let (got, peer) = o.open_owned(d.clone()).expect("genuine");
            prop_assert_eq!(peer, Peer::Restarted { previous: None });
            prop_assert_eq!(&got, &f);
            prop_assert_eq!(o.open(&d), Err(SealError::Replay(1)));
        }
    }
}
