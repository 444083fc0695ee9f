//! Opening sealed datagrams (`seal`), checked against a model of the replay rules.

use super::input::{Input, Script};
use super::wire::{round_trip, MAX_DATAGRAM};
use crate::packet::Message;
use crate::seal::{self, Opener, Peer, SealError, Sealer, Session, OVERHEAD, REPLAY_WINDOW};
use crate::types::{SystemId, Timestamp};
use crate::wire::{self, Frame};
use std::collections::{BTreeSet, HashMap};

pub(crate) const KEY: [u8; 32] = [0x5a; 32];
const ME: SystemId = SystemId(1);
const SENDERS: u32 = 3;
const STEPS: usize = 256;

/// What the opener should know of one peer: its newest session, the highest counter
/// accepted in it, and the counters accepted within the window below that.
struct Known {
    session: Session,
    highest: u64,
    seen: BTreeSet<u64>,
}

impl Known {
    fn new(session: Session, counter: u64) -> Self {
        Known {
            session,
            highest: counter,
            seen: BTreeSet::from([counter]),
        }
    }
}

/// The rules of `seal.rs`, written out: what opening the datagram sealed as `counter`
/// of `session` around `plain` must give, and the model updated if it is accepted.
/// Counter 0 is never sealed, so never accepted.
fn expect(
    model: &mut HashMap<SystemId, Known>,
    session: Session,
    counter: u64,
    plain: &[u8],
) -> Result<(Frame, Peer), SealError> {
    let len = OVERHEAD + plain.len();
    if len < OVERHEAD + 1 {
        return Err(SealError::TooShort(len));
    }
    if len > MAX_DATAGRAM {
        return Err(SealError::TooLong {
            len,
            max: MAX_DATAGRAM,
        });
    }
    let frame = wire::decode(plain, MAX_DATAGRAM)?;
    if frame.to != ME {
        return Err(SealError::Misaddressed {
            to: frame.to,
            me: ME,
        });
    }
    if counter == 0 {
        return Err(SealError::Replay(0));
    }
    let peer = match model.get_mut(&frame.from) {
        Some(k) if k.session == session => {
            if counter <= k.highest
                && (k.highest - counter >= REPLAY_WINDOW || k.seen.contains(&counter))
            {
                return Err(SealError::Replay(counter));
            }
            k.seen.insert(counter);
            if counter > k.highest {
                k.highest = counter;
                let low = counter.saturating_sub(REPLAY_WINDOW);
                k.seen = k.seen.split_off(&low);
            }
            Peer::Known
        }
        Some(k) if session.epoch > k.session.epoch => {
            let previous = Some(k.session);
            *k = Known::new(session, counter);
            Peer::Restarted { previous }
        }
        Some(_) => return Err(SealError::StaleSession(frame.from)),
        None => {
            model.insert(frame.from, Known::new(session, counter));
            Peer::Restarted { previous: None }
        }
    };
    Ok((frame, peer))
}

/// One sender system: its sessions (the current one last unless switched) and the
/// highest counter sealed in each.
struct Sender {
    id: SystemId,
    sessions: Vec<(Sealer, u64)>,
    current: usize,
}

fn session(epoch: u64, salt: u8) -> Session {
    Session {
        epoch,
        nonce: [salt; 16],
    }
}

/// A script of datagrams sealed by three senders (restarting, replaying, going back to
/// older sessions, jumping counters), tampered ones, raw bytes and datagrams under other
/// keys, opened by one opener. Every outcome must be the model's ([`expect`]): nothing
/// unauthenticated, replayed, stale or misaddressed opens, and everything else does, to
/// the frame sealed.
pub fn seal(data: &[u8]) {
    let mut inp = Input::new(data);
    let mut opener = Opener::new(&KEY, ME, MAX_DATAGRAM);
    let mut model: HashMap<SystemId, Known> = HashMap::new();
    let mut senders: Vec<Sender> = (0..SENDERS)
        .map(|i| Sender {
            id: SystemId(2 + i),
            sessions: vec![(Sealer::new(&KEY, session(100, i as u8)), 0)],
            current: 0,
        })
        .collect();
    // The last datagram sealed: its bytes, session, counter and plain frame bytes.
    let mut last: Option<(Vec<u8>, Session, u64, Vec<u8>)> = None;
    for _ in 0..STEPS {
        if inp.is_empty() {
            break;
        }
        match inp.u8() % 8 {
            0 => {
                // Raw bytes never open (nobody can seal without the key).
                let raw = inp.chunk(1600);
                let got = opener.open(raw);
                assert!(
                    matches!(
                        got,
                        Err(SealError::TooShort(_)
                            | SealError::TooLong { .. }
                            | SealError::Version(_)
                            | SealError::Unauthenticated)
                    ),
                    "raw bytes opened as {got:?}"
                );
            }
            op @ (1 | 2) => {
                let s = &mut senders[usize::from(inp.u8()) % SENDERS as usize];
                let plain = if op == 1 {
                    let to = if inp.u8().is_multiple_of(8) {
                        SystemId(9)
                    } else {
                        ME
                    };
                    let msg = Message::Release {
                        limit: Timestamp(inp.u64()),
                        epoch: None,
                    };
                    wire::encode(&Frame {
                        from: s.id,
                        to,
                        messages: vec![msg],
                    })
                } else {
                    // Raw frame bytes: as they are (version 4 has no checksum), or
                    // with a checksum appended if they claim an older version.
                    let mut p = inp.chunk(600).to_vec();
                    if p.first().is_some_and(|&v| v < wire::VERSION) {
                        p.extend_from_slice(&crc32c::crc32c(&p).to_le_bytes());
                    }
                    p
                };
                let (sealer, high) = &mut s.sessions[s.current];
                let counter = match inp.u8() % 8 {
                    0..=4 => high.saturating_add(1),
                    5 => high.saturating_add(u64::from(inp.u16())),
                    6 => high.saturating_sub(u64::from(inp.u16())),
                    _ => inp.u64(),
                };
                *high = (*high).max(counter);
                let d = sealer.seal_numbered(counter, &plain);
                let sess = sealer.session();
                open_and_check(&mut opener, &mut model, &d, sess, counter, &plain);
                last = Some((d, sess, counter, plain));
            }
            3 => {
                // A restart of a sender: a later epoch (usually), the same one with
                // another random part, or an earlier one.
                let s = &mut senders[usize::from(inp.u8()) % SENDERS as usize];
                let e = s.sessions[s.current].0.session().epoch;
                let epoch = match inp.u8() % 4 {
                    0 | 1 => e.saturating_add(1),
                    2 => e,
                    _ => e.saturating_sub(1 + u64::from(inp.u8())),
                };
                let salt = inp.u8();
                s.sessions
                    .push((Sealer::new(&KEY, session(epoch, salt)), 0));
                s.current = s.sessions.len() - 1;
            }
            4 => {
                // An older session of a sender seals again (a replay from before a
                // restart, or a second process with the same identity).
                let s = &mut senders[usize::from(inp.u8()) % SENDERS as usize];
                s.current = usize::from(inp.u8()) % s.sessions.len();
            }
            5 => {
                // Tampered: one bit flipped, or cut short. Never opens.
                let Some((d, ..)) = &last else { continue };
                let mut t = d.clone();
                let bit = usize::from(inp.u16()) % (t.len() * 8);
                t[bit / 8] ^= 1 << (bit % 8);
                let got = opener.open(&t);
                if t.len() < OVERHEAD + 1 {
                    // An empty frame (raw bytes sealed as they are): too short before
                    // anything else is looked at.
                    assert!(matches!(got, Err(SealError::TooShort(_))), "{got:?}");
                } else if bit < 8 {
                    assert!(matches!(got, Err(SealError::Version(_))), "{got:?}");
                } else {
                    assert_eq!(got, Err(SealError::Unauthenticated), "bit {bit} flipped");
                }
                let cut = usize::from(inp.u16()) % t.len();
                let got = opener.open(&d[..cut]);
                assert!(
                    matches!(
                        got,
                        Err(SealError::TooShort(_) | SealError::Unauthenticated)
                    ),
                    "cut to {cut}: {got:?}"
                );
            }
            6 => {
                // The last datagram again, verbatim.
                let Some((d, sess, counter, plain)) = &last else {
                    continue;
                };
                open_and_check(&mut opener, &mut model, d, *sess, *counter, plain);
            }
            _ => {
                // Sealed under another key (a generation or label this system is not at).
                let g = u64::from(inp.u8()) + 1;
                let key = seal::generation_key(&KEY, g, b"");
                let s = &senders[usize::from(inp.u8()) % SENDERS as usize];
                let plain = wire::encode(&Frame {
                    from: s.id,
                    to: ME,
                    messages: vec![Message::TimeProbe { sent: g }],
                });
                let d = Sealer::new(&key, session(100, 0)).seal_bytes(&plain);
                assert_eq!(opener.open(&d), Err(SealError::Unauthenticated));
            }
        }
    }
}

fn open_and_check(
    opener: &mut Opener,
    model: &mut HashMap<SystemId, Known>,
    d: &[u8],
    session: Session,
    counter: u64,
    plain: &[u8],
) {
    let got = opener.open(d);
    let want = expect(model, session, counter, plain);
    assert_eq!(
        got, want,
        "datagram {counter} of session {session:?}: the opener and the model disagree"
    );
    if let Ok((frame, _)) = &got {
        round_trip(frame);
    }
}

/// Seeds: a session with replays, a restart and a stale sender, tampering, wrong keys.
pub fn seeds() -> Vec<Vec<u8>> {
    let mut s = Script::default();
    let mut out = Vec::new();
    // In order, a replay, a jump, an old one in the window, one below it.
    for (sender, mode) in [(0u8, 0u8), (0, 0), (1, 0), (0, 0)] {
        s.u8(1).u8(sender).u8(1).u64(42).u8(mode);
    }
    s.u8(6);
    s.u8(1).u8(0).u8(1).u64(43).u8(5).u16(2000);
    s.u8(1).u8(0).u8(1).u64(44).u8(6).u16(10);
    s.u8(1).u8(0).u8(1).u64(45).u8(6).u16(1500);
    out.push(s.done());
    // Restart, stale session, back to the old one.
    s.u8(1).u8(2).u8(1).u64(1).u8(0);
    s.u8(3).u8(2).u8(0).u8(7);
    s.u8(1).u8(2).u8(1).u64(2).u8(0);
    s.u8(4).u8(2).u8(0);
    s.u8(1).u8(2).u8(1).u64(3).u8(0);
    s.u8(3).u8(2).u8(3).u8(1).u8(9);
    s.u8(1).u8(2).u8(1).u64(4).u8(0);
    out.push(s.done());
    // Misaddressed, raw frame bytes (the sample frame), tampering, other keys, raw bytes.
    s.u8(1).u8(1).u8(0).u64(5).u8(0);
    let sample = super::wire::sample_frame(SystemId(3), ME);
    let enc = wire::encode(&sample);
    s.u8(2).u8(1).chunk(&enc).u8(0);
    s.u8(5).u16(3).u16(40);
    s.u8(5).u16(700).u16(60);
    s.u8(7).u8(0).u8(1);
    // (Sealed under another key: the target's key never seals raw bytes of a seed, or
    // the fuzzer could complete one.)
    let raw = Sealer::new(&[1; 32], session(1, 1)).seal_bytes(b"0123456789");
    s.u8(0).chunk(&raw);
    out.push(s.done());
    out
}
