//! The recovery plan on journals built in memory: a table of small scenarios (a few
//! segments holding packets and watermarks of one pair, some damage, the plan expected),
//! then a property over arbitrary damage. No file is touched: `plan` is given a
//! directory that does not exist.

use super::*;
use crate::journal::format::{CheckpointRef, EntryRef, FORMAT_VERSION, HEADER_LEN};
use crate::journal::segment_start;
use crate::journal::{PairState, Record};
use crate::packet::{Packet, Payload};
use crate::types::{Offset, PairId, Seq, Stamp, Timestamp};
use bytes::Bytes;
use proptest::collection::vec as any_vec;
use proptest::prelude::*;
use std::io;

/// Only named in errors; never opened.
const DIR: &str = "/nonexistent/tidemark-recovery-plan";

/// A record of a scenario; every one is of pair 0.
#[derive(Clone, Copy, Debug)]
enum R {
    /// The packet of this seq.
    P(u64),
    /// Released up to this seq.
    Rel(u64),
    /// The pair's state.
    St(PairState),
}
use R::{Rel, St, P};

fn record(r: R) -> Record {
    let stamp = |seq: u64| Stamp::new(Timestamp(seq * 10), Seq(seq));
    match r {
        P(seq) => Record::Packet(Packet {
            pair: PairId(0),
            stamp: stamp(seq),
            payload: Payload::Write {
                offset: Offset(seq * 512),
                data: Bytes::from(vec![seq as u8; 8]),
            },
        }),
        Rel(seq) => Record::Released {
            pair: PairId(0),
            stamp: stamp(seq),
        },
        St(state) => Record::PairState {
            pair: PairId(0),
            state,
        },
    }
}

/// A segment of a scenario, as the journal writes it: a header, a checkpoint of the
/// state after every record before it, its records. Segments are numbered from 1.
#[derive(Clone, Debug)]
struct Seg {
    /// Started by `write` while the segment before it was unsynced.
    flagged: bool,
    /// Written by a build of format version 1 (its checkpoint has no pair states).
    v1: bool,
    records: Vec<R>,
}

/// A segment started by `sync` (or by `open`): everything before it synced.
fn seg(records: &[R]) -> Seg {
    Seg {
        flagged: false,
        v1: false,
        records: records.to_vec(),
    }
}

/// A segment started by `write`, with [`FLAG_PREV_UNSYNCED`].
fn flagged(records: &[R]) -> Seg {
    Seg {
        flagged: true,
        v1: false,
        records: records.to_vec(),
    }
}

/// `s` as a build of format version 1 wrote it.
fn v1(s: Seg) -> Seg {
    Seg { v1: true, ..s }
}

fn frame(bytes: &mut Vec<u8>, entry: &EntryRef<'_>) {
    assert!(format::encode_frame(bytes, entry).is_some());
}

/// A journal directory in memory.
#[derive(Clone, Debug, Default)]
struct Disk {
    segments: BTreeMap<u64, Vec<u8>>,
    temps: Vec<u64>,
}

impl Disk {
    /// What `open` would list.
    fn listing(&self) -> Listing {
        Listing {
            segments: self
                .segments
                .iter()
                .map(|(&segno, bytes)| Listed {
                    segno,
                    flags: header_flags(bytes, segno),
                })
                .collect(),
            temps: self.temps.clone(),
        }
    }

    fn plan(&self) -> Result<RecoveryPlan, JournalError> {
        plan(Path::new(DIR), &self.listing(), |segno| {
            self.segments
                .get(&segno)
                .cloned()
                .ok_or_else(|| JournalError::Io {
                    path: Path::new(DIR).join(format::segment_name(segno)),
                    source: io::ErrorKind::NotFound.into(),
                })
        })
    }

    /// Carries out `plan` as `open` does on files.
    fn carry_out(&mut self, plan: &RecoveryPlan) {
        for repair in &plan.repairs {
            match repair {
                Repair::RemoveTemp(n) => self.temps.retain(|t| t != n),
                Repair::Sync(_) => {}
                Repair::Cut { segno, len } => {
                    if let Some(bytes) = self.segments.get_mut(segno) {
                        bytes.truncate(*len as usize);
                    }
                }
                Repair::Rewrite { segno, bytes } => {
                    self.segments.insert(*segno, bytes.clone());
                }
            }
        }
        if plan.active.is_none() {
            self.segments.insert(1, segment_start(1, 0, &plan.state));
        }
        for n in &plan.delete {
            self.segments.remove(n);
        }
    }
}

/// A scenario's journal as built, before damage.
struct Built {
    disk: Disk,
    /// Per segment, where its checkpoint ends (`[0]`) and where its k-th record ends.
    ends: BTreeMap<u64, Vec<u64>>,
}

fn build(segs: &[Seg], temps: &[u64]) -> Built {
    let mut built = Built {
        disk: Disk {
            temps: temps.to_vec(),
            ..Disk::default()
        },
        ends: BTreeMap::new(),
    };
    let mut state = State::default();
    let mut prev_len = 0;
    for (segno, s) in (1..).zip(segs) {
        let flags = if s.flagged { FLAG_PREV_UNSYNCED } else { 0 };
        let mut bytes = if s.v1 {
            format::segment_start_v1(segno, flags, prev_len, &state)
        } else {
            let mut bytes = format::encode_header_with(segno, flags).to_vec();
            let cp = CheckpointRef {
                prev_len,
                state: &state,
            };
            frame(&mut bytes, &EntryRef::Checkpoint(cp));
            bytes
        };
        let mut ends = vec![bytes.len() as u64];
        for &r in &s.records {
            let record = record(r);
            frame(&mut bytes, &EntryRef::Record(&record));
            state.apply(&record);
            ends.push(bytes.len() as u64);
        }
        prev_len = bytes.len() as u64;
        built.disk.segments.insert(segno, bytes);
        built.ends.insert(segno, ends);
    }
    built
}

/// Damage done to a built journal. Records count from 1.
#[derive(Clone, Copy, Debug)]
enum Damage {
    /// Segment n ends inside its k-th record: a write torn by a crash.
    TornIn(u64, usize),
    /// A bit flipped inside segment n's k-th record.
    FlipIn(u64, usize),
    /// Segment n lost its records from the k-th on, whole frames.
    LostFrom(u64, usize),
    /// Zeros after the end of segment n: the file extended, the data never written.
    Zeros(u64),
    /// A well-formed record appended to segment n.
    Extra(u64),
    /// A second checkpoint appended to segment n.
    ExtraCheckpoint(u64),
    /// A bit flipped in segment n's header.
    Header(u64),
    /// A bit flipped in segment n's checkpoint.
    Checkpoint(u64),
    /// Segment n deleted.
    Gone(u64),
    /// Segment n's checkpoint replaced by one of the empty state, checksum and all: it
    /// holds less than the records before it.
    Behind(u64),
}
use Damage::*;

impl Built {
    /// Where the k-th record of segment n starts and ends.
    fn record_at(&self, n: u64, k: usize) -> (usize, usize) {
        let ends = &self.ends[&n];
        (ends[k - 1] as usize, ends[k] as usize)
    }

    fn damage(&self, disk: &mut Disk, damage: Damage) {
        let n = match damage {
            TornIn(n, _) | FlipIn(n, _) | LostFrom(n, _) | Zeros(n) | Extra(n) => n,
            ExtraCheckpoint(n) | Header(n) | Checkpoint(n) | Gone(n) | Behind(n) => n,
        };
        let bytes = disk
            .segments
            .get_mut(&n)
            .expect("a segment of the scenario");
        match damage {
            TornIn(n, k) => {
                let (start, end) = self.record_at(n, k);
                bytes.truncate((start + end) / 2);
            }
            FlipIn(n, k) => {
                let (start, end) = self.record_at(n, k);
                bytes[(start + end) / 2] ^= 1;
            }
            LostFrom(n, k) => bytes.truncate(self.record_at(n, k).0),
            Zeros(_) => bytes.extend([0; 16]),
            Extra(_) => frame(bytes, &EntryRef::Record(&record(P(99)))),
            ExtraCheckpoint(_) => {
                let state = State::default();
                let cp = CheckpointRef {
                    prev_len: 0,
                    state: &state,
                };
                frame(bytes, &EntryRef::Checkpoint(cp));
            }
            Header(_) => bytes[0] ^= 1,
            Checkpoint(_) => bytes[HEADER_LEN + 4] ^= 1,
            Gone(n) => {
                disk.segments.remove(&n);
            }
            Behind(n) => {
                let cp_end = self.ends[&n][0] as usize;
                let prev_len = self.ends.get(&(n - 1)).and_then(|e| e.last().copied());
                let mut out = bytes[..HEADER_LEN].to_vec();
                let state = State::default();
                let cp = CheckpointRef {
                    prev_len: prev_len.unwrap_or(0),
                    state: &state,
                };
                frame(&mut out, &EntryRef::Checkpoint(cp));
                out.extend_from_slice(&bytes[cp_end..]);
                *bytes = out;
            }
        }
    }

    /// How many records of segment n end at or before `offset`, which must be where a
    /// frame ends.
    fn records_before(&self, n: u64, offset: u64) -> usize {
        self.ends[&n]
            .iter()
            .position(|&e| e == offset)
            .unwrap_or_else(|| panic!("offset {offset} of segment {n} is not between frames"))
    }
}

/// A repair as the table writes it: positions count records, not bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fix {
    RemoveTemp(u64),
    Sync(u64),
    /// The segment cut after this many records.
    Cut(u64, usize),
    Rewrite(u64),
}
use Fix::{Cut, RemoveTemp, Rewrite, Sync};

/// An offset in a segment as the table writes it.
#[derive(Clone, Copy, Debug)]
enum At {
    Header,
    Checkpoint,
    /// After this many records.
    After(usize),
}

/// The plan a scenario expects.
#[derive(Debug)]
struct Want {
    repairs: Vec<Fix>,
    delete: Vec<u64>,
    /// The torn tail: its segment and the records kept in it.
    tail: Option<(u64, usize)>,
    /// Pair 0: the seqs of its live packets, its released watermark and its state.
    live: Vec<u64>,
    released: u64,
    state: Option<PairState>,
    /// Segments left after the plan is carried out.
    segments: usize,
}

#[derive(Debug)]
enum Outcome {
    Plan(Want),
    Corrupt(u64, At),
    Missing(u64),
}
use Outcome::{Corrupt, Missing};

struct Case {
    name: &'static str,
    segs: Vec<Seg>,
    temps: Vec<u64>,
    damage: Vec<Damage>,
    want: Outcome,
}

fn case(name: &'static str, segs: &[Seg], damage: &[Damage], want: Outcome) -> Case {
    Case {
        name,
        segs: segs.to_vec(),
        temps: Vec::new(),
        damage: damage.to_vec(),
        want,
    }
}

/// A plan with nothing torn and nothing deleted.
fn clean(repairs: &[Fix], live: &[u64], segments: usize) -> Outcome {
    Outcome::Plan(Want {
        repairs: repairs.to_vec(),
        delete: Vec::new(),
        tail: None,
        live: live.to_vec(),
        released: 0,
        state: None,
        segments,
    })
}

/// A plan with a torn tail: segment and records kept in it.
fn torn(repairs: &[Fix], tail: (u64, usize), live: &[u64], segments: usize) -> Outcome {
    Outcome::Plan(Want {
        repairs: repairs.to_vec(),
        delete: Vec::new(),
        tail: Some(tail),
        live: live.to_vec(),
        released: 0,
        state: None,
        segments,
    })
}

impl Outcome {
    /// The plan expected, with pair 0 released up to `seq`.
    fn released(mut self, seq: u64) -> Self {
        if let Outcome::Plan(w) = &mut self {
            w.released = seq;
        }
        self
    }

    /// The plan expected, with pair 0 in `state`.
    fn state(mut self, state: PairState) -> Self {
        if let Outcome::Plan(w) = &mut self {
            w.state = Some(state);
        }
        self
    }

    /// The plan expected, deleting `segnos`.
    fn delete(mut self, segnos: &[u64]) -> Self {
        if let Outcome::Plan(w) = &mut self {
            w.delete = segnos.to_vec();
        }
        self
    }
}

/// The scenarios. Reading a row: segments are numbered from 1; `seg` was started by
/// `sync` (or `open`), `flagged` by `write` while the one before was unsynced; `P(n)` is
/// the packet of seq n, `Rel(n)` releases up to n; damage and cuts count records from 1
/// (`Cut(2, 1)`: segment 2 cut after its first record). `clean(repairs, live, segments)`
/// and `torn(repairs, (segment, records kept), live, segments)` give the plan: its
/// repairs in order, pair 0's live packets, and the segments left.
fn cases() -> Vec<Case> {
    vec![
        case(
            "empty directory: a new journal",
            &[],
            &[],
            clean(&[], &[], 1),
        ),
        Case {
            temps: vec![1],
            ..case(
                "only a temp file (a crash creating segment 1): removed, a new journal",
                &[],
                &[],
                clean(&[RemoveTemp(1)], &[], 1),
            )
        },
        case(
            "clean: the last segment made durable as it is",
            &[seg(&[P(1), P(2), P(3)])],
            &[],
            clean(&[Sync(1)], &[1, 2, 3], 1),
        ),
        case(
            "torn last record: cut where it starts",
            &[seg(&[P(1), P(2), P(3)])],
            &[TornIn(1, 3)],
            torn(&[Cut(1, 2)], (1, 2), &[1, 2], 1),
        ),
        case(
            "bit flip in the last segment: that record and every one after it dropped",
            &[seg(&[P(1), P(2), P(3)])],
            &[FlipIn(1, 2)],
            torn(&[Cut(1, 1)], (1, 1), &[1], 1),
        ),
        case(
            "zeros after the last record (file extended, never written): cut off",
            &[seg(&[P(1), P(2), P(3)])],
            &[Zeros(1)],
            torn(&[Cut(1, 3)], (1, 3), &[1, 2, 3], 1),
        ),
        case(
            "a segment holding only its checkpoint",
            &[seg(&[P(1)]), seg(&[])],
            &[],
            clean(&[Sync(2)], &[1], 2),
        ),
        case(
            "segments started by sync: only the last may hold unsynced records",
            &[seg(&[P(1), P(2)]), seg(&[P(3)])],
            &[],
            clean(&[Sync(2)], &[1, 2, 3], 2),
        ),
        case(
            "bit flip in a segment before the last unflagged one (synced): Corrupt",
            &[seg(&[P(1), P(2)]), seg(&[P(3)])],
            &[FlipIn(1, 2)],
            Corrupt(1, At::After(1)),
        ),
        case(
            "only segments from the newest unflagged one on are made durable",
            &[
                seg(&[P(1)]),
                flagged(&[P(2)]),
                seg(&[P(3)]),
                flagged(&[P(4)]),
            ],
            &[],
            clean(&[Sync(3), Sync(4)], &[1, 2, 3, 4], 4),
        ),
        case(
            "torn record in a segment sealed unsynced: cut there, later segments rewritten",
            &[seg(&[P(1), P(2)]), flagged(&[P(3), P(4)]), flagged(&[P(5)])],
            &[FlipIn(2, 2)],
            torn(&[Sync(1), Cut(2, 1), Rewrite(3)], (2, 1), &[1, 2, 3], 3),
        ),
        case(
            "a watermark after the tear counts through the next checkpoint, and frees segments",
            &[
                seg(&[P(1), P(2)]),
                flagged(&[P(3), Rel(2), P(4)]),
                flagged(&[P(5)]),
            ],
            &[FlipIn(2, 1)],
            torn(&[Sync(1), Cut(2, 0), Rewrite(3)], (2, 0), &[], 1)
                .released(2)
                .delete(&[1, 2]),
        ),
        case(
            "tear in the newest unflagged segment: cut, the flagged ones after it rewritten",
            &[seg(&[P(1)]), seg(&[P(2), P(3)]), flagged(&[P(4)])],
            &[TornIn(2, 2)],
            torn(&[Cut(2, 1), Rewrite(3)], (2, 1), &[1, 2], 3),
        ),
        case(
            "every segment flagged (segment 1 reclaimed): all may tear",
            &[
                seg(&[P(1), Rel(1)]),
                flagged(&[P(2), P(3)]),
                flagged(&[P(4)]),
            ],
            &[Gone(1), FlipIn(2, 1)],
            torn(&[Cut(2, 0), Rewrite(3)], (2, 0), &[], 1)
                .released(1)
                .delete(&[2]),
        ),
        case(
            "tear in a flagged segment made durable since (an unflagged one follows): Corrupt",
            &[seg(&[P(1)]), flagged(&[P(2), P(3)]), seg(&[P(4)])],
            &[FlipIn(2, 2)],
            Corrupt(2, At::After(1)),
        ),
        case(
            "a segment sealed unsynced lost whole frames (shorter than the next says): torn",
            &[seg(&[P(1), P(2)]), flagged(&[P(3)])],
            &[LostFrom(1, 2)],
            torn(&[Sync(1), Rewrite(2)], (1, 1), &[1], 2),
        ),
        case(
            "a synced segment shorter than the next one says: Corrupt",
            &[seg(&[P(1), P(2)]), seg(&[P(3)])],
            &[LostFrom(1, 2)],
            Corrupt(1, At::After(1)),
        ),
        case(
            "a segment longer than the next one says: Corrupt, sealed unsynced or not",
            &[seg(&[P(1)]), flagged(&[P(2)])],
            &[Extra(1)],
            Corrupt(1, At::After(1)),
        ),
        case(
            "bad header: Corrupt even in the last segment (durable before it was named)",
            &[seg(&[P(1)])],
            &[Header(1)],
            Corrupt(1, At::Header),
        ),
        case(
            "bad checkpoint: Corrupt even in the last segment",
            &[seg(&[P(1)])],
            &[Checkpoint(1)],
            Corrupt(1, At::Checkpoint),
        ),
        case(
            "a second checkpoint is no tear: Corrupt",
            &[seg(&[P(1)])],
            &[ExtraCheckpoint(1)],
            Corrupt(1, At::After(1)),
        ),
        case(
            "oldest segment covered by the newest checkpoint (unlink lost): deleted",
            &[seg(&[P(1), P(2)]), seg(&[Rel(2), P(3)]), seg(&[P(4)])],
            &[],
            clean(&[Sync(3)], &[3, 4], 2).released(2).delete(&[1]),
        ),
        case(
            "oldest segments gone, no gap: nothing missing",
            &[seg(&[P(1), P(2)]), seg(&[Rel(2), P(3)]), seg(&[P(4)])],
            &[Gone(1)],
            clean(&[Sync(3)], &[3, 4], 2).released(2),
        ),
        case(
            "gap from an interrupted reclamation, covered by the newest checkpoint: finished",
            &[seg(&[P(1), P(2)]), seg(&[P(3), Rel(3)]), seg(&[P(4)])],
            &[Gone(2)],
            clean(&[Sync(3)], &[4], 1).released(3).delete(&[1]),
        ),
        case(
            "gap after a segment the newest checkpoint does not cover: Missing",
            &[seg(&[P(1), P(2)]), seg(&[P(3)]), seg(&[P(4)])],
            &[Gone(2)],
            Missing(2),
        ),
        case(
            "pair states: the latest wins",
            &[seg(&[
                St(PairState::Syncing),
                P(1),
                St(PairState::Replicating),
            ])],
            &[],
            clean(&[Sync(1)], &[1], 1).state(PairState::Replicating),
        ),
        case(
            "a pair with only a state",
            &[seg(&[St(PairState::Inconsistent)])],
            &[],
            clean(&[Sync(1)], &[], 1).state(PairState::Inconsistent),
        ),
        case(
            "a state torn off the last segment: the one before it wins",
            &[seg(&[
                St(PairState::Inconsistent),
                P(1),
                St(PairState::Consistent),
            ])],
            &[TornIn(1, 3)],
            torn(&[Cut(1, 2)], (1, 2), &[1], 1).state(PairState::Inconsistent),
        ),
        case(
            "a state only in a reclaimed segment (gone): the checkpoints carry it",
            &[
                seg(&[St(PairState::Syncing), P(1), P(2)]),
                seg(&[Rel(2), P(3)]),
                seg(&[P(4)]),
            ],
            &[Gone(1)],
            clean(&[Sync(3)], &[3, 4], 2)
                .released(2)
                .state(PairState::Syncing),
        ),
        case(
            "a state after the tear counts through the next checkpoint (durable)",
            &[
                seg(&[P(1)]),
                flagged(&[St(PairState::Syncing), P(2), St(PairState::Replicating)]),
                flagged(&[P(3)]),
            ],
            &[FlipIn(2, 2)],
            torn(&[Sync(1), Cut(2, 1), Rewrite(3)], (2, 1), &[1], 3).state(PairState::Replicating),
        ),
        case(
            "a later state replaces the one a checkpoint carries",
            &[
                seg(&[St(PairState::Inconsistent), P(1)]),
                seg(&[St(PairState::Consistent)]),
            ],
            &[],
            clean(&[Sync(2)], &[1], 2).state(PairState::Consistent),
        ),
        case(
            "version-1 segments (no pair states) read, a later version-2 state wins",
            &[
                v1(seg(&[P(1), Rel(1)])),
                v1(seg(&[P(2)])),
                seg(&[St(PairState::Replicating), P(3)]),
            ],
            &[],
            clean(&[Sync(3)], &[2, 3], 2)
                .released(1)
                .delete(&[1])
                .state(PairState::Replicating),
        ),
        case(
            "a torn version-1 segment: cut, the version-1 one after it rewritten",
            &[v1(seg(&[P(1), P(2)])), v1(flagged(&[P(3)]))],
            &[FlipIn(1, 2)],
            torn(&[Cut(1, 1), Rewrite(2)], (1, 1), &[1], 2),
        ),
        // Found by the journal_plan fuzz target: a checkpoint (checksum intact) behind
        // what the segments before it recorded. Deleting those (they are covered) took
        // the limit back from one recovery to the next.
        case(
            "checkpoint behind a watermark recorded before it: Corrupt",
            &[seg(&[P(1), Rel(1)]), seg(&[P(2)])],
            &[Behind(2)],
            Corrupt(2, At::Checkpoint),
        ),
        case(
            "checkpoint without a pair state recorded before it: Corrupt",
            &[seg(&[St(PairState::Replicating), P(1)]), flagged(&[P(2)])],
            &[Behind(2)],
            Corrupt(2, At::Checkpoint),
        ),
        case(
            "bad version-1 checkpoint: Corrupt",
            &[v1(seg(&[P(1)]))],
            &[Checkpoint(1)],
            Corrupt(1, At::Checkpoint),
        ),
        Case {
            temps: vec![2, 5],
            ..case(
                "leftover temp files next to segments: removed first",
                &[seg(&[P(1)])],
                &[],
                clean(&[RemoveTemp(2), RemoveTemp(5), Sync(1)], &[1], 1),
            )
        },
    ]
}

/// The active segment's version: an older one's as it is (`open` then starts a new
/// segment), this build's once rewritten.
#[test]
fn the_active_segment_keeps_its_version_unless_rewritten() {
    let built = build(&[v1(seg(&[P(1), P(2)])), v1(flagged(&[P(3)]))], &[]);
    let plan = built.disk.plan().expect("plan");
    assert_eq!(plan.active.as_ref().map(|a| a.version), Some(1));
    let mut disk = built.disk.clone();
    built.damage(&mut disk, FlipIn(1, 2));
    let plan = disk.plan().expect("plan");
    assert_eq!(
        plan.active.as_ref().map(|a| a.version),
        Some(FORMAT_VERSION)
    );
    disk.carry_out(&plan);
    let again = disk.plan().expect("plan again");
    assert_eq!(
        again.active.as_ref().map(|a| a.version),
        Some(FORMAT_VERSION)
    );
}

#[test]
fn recovery_plans_of_small_journals() {
    for case in cases() {
        let name = case.name;
        let built = build(&case.segs, &case.temps);
        let mut disk = built.disk.clone();
        for &d in &case.damage {
            built.damage(&mut disk, d);
        }
        match (&case.want, disk.plan()) {
            (Outcome::Plan(want), Ok(plan)) => {
                check_plan(&built, &disk, &plan, want, name);
                check_carried_out(disk, &plan, name);
            }
            (
                &Corrupt(n, at),
                Err(JournalError::Corrupt {
                    segment, offset, ..
                }),
            ) => {
                let want = match at {
                    At::Header => 0,
                    At::Checkpoint => HEADER_LEN as u64,
                    At::After(k) => built.ends[&n][k],
                };
                assert_eq!((segment, offset), (n, want), "{name}");
            }
            (&Missing(n), Err(JournalError::Missing { segment, .. })) => {
                assert_eq!(segment, n, "{name}")
            }
            (want, got) => panic!("{name}: want {want:?}, got {got:?}"),
        }
    }
}

/// The plan is the one the table expects, and its tail reports exactly the bytes its
/// repairs remove.
fn check_plan(built: &Built, disk: &Disk, plan: &RecoveryPlan, want: &Want, name: &str) {
    let repairs: Vec<Fix> = plan
        .repairs
        .iter()
        .map(|r| match r {
            Repair::RemoveTemp(n) => RemoveTemp(*n),
            Repair::Sync(n) => Sync(*n),
            Repair::Cut { segno, len } => Cut(*segno, built.records_before(*segno, *len)),
            Repair::Rewrite { segno, .. } => Rewrite(*segno),
        })
        .collect();
    assert_eq!(repairs, want.repairs, "{name}: repairs");
    assert_eq!(plan.delete, want.delete, "{name}: deleted");
    let tail = plan.recovered.tail.as_ref();
    let at = tail.map(|t| (t.segment, built.records_before(t.segment, t.offset)));
    assert_eq!(at, want.tail, "{name}: tail");
    let pair = plan.recovered.pair(PairId(0)).cloned().unwrap_or_default();
    let live: Vec<u64> = pair.live.iter().map(|p| p.stamp.seq.0).collect();
    assert_eq!(live, want.live, "{name}: live packets");
    assert_eq!(pair.released.seq, Seq(want.released), "{name}: released");
    assert_eq!(pair.state, want.state, "{name}: state");
    assert_eq!(
        plan.state.states.get(&PairId(0)).copied(),
        want.state,
        "{name}: state in the journal's state"
    );
    assert_eq!(plan.recovered.segments, want.segments, "{name}: segments");
    assert_eq!(plan.sealed.len() + 1, want.segments, "{name}: sealed");
    assert_eq!(
        plan.state.watermark(PairId(0)),
        Seq(want.released),
        "{name}"
    );
    assert_eq!(
        dropped_by(disk, plan),
        tail.map_or(0, |t| t.dropped),
        "{name}"
    );
}

/// Bytes the repairs of `plan` take off the segments on `disk`.
fn dropped_by(disk: &Disk, plan: &RecoveryPlan) -> u64 {
    let len = |n: &u64| disk.segments.get(n).map_or(0, |b| b.len() as u64);
    plan.repairs
        .iter()
        .map(|r| match r {
            Repair::Cut { segno, len: to } => len(segno) - to,
            Repair::Rewrite { segno, bytes } => len(segno) - bytes.len() as u64,
            Repair::RemoveTemp(_) | Repair::Sync(_) => 0,
        })
        .sum()
}

/// Carried out, `plan` leaves the segments its bookkeeping says, no temporary file, and
/// a journal that plans again to no repair but syncs and the same records.
fn check_carried_out(mut disk: Disk, plan: &RecoveryPlan, name: &str) {
    disk.carry_out(plan);
    assert!(disk.temps.is_empty(), "{name}: temp files left");
    if let Some(active) = &plan.active {
        let kept: Vec<(u64, u64)> = plan
            .sealed
            .iter()
            .chain([&active.info])
            .map(|s| (s.segno, s.len))
            .collect();
        let files: Vec<(u64, u64)> = disk
            .segments
            .iter()
            .map(|(&n, b)| (n, b.len() as u64))
            .collect();
        assert_eq!(kept, files, "{name}: segments and their lengths");
    }
    let again = disk
        .plan()
        .unwrap_or_else(|e| panic!("{name}: after the repairs: {e}"));
    let syncs_only = again.repairs.iter().all(|r| matches!(r, Repair::Sync(_)));
    assert!(syncs_only, "{name}: repaired again: {:?}", again.repairs);
    assert_eq!(again.delete, Vec::<u64>::new(), "{name}: deleted again");
    let mut first = plan.recovered.clone();
    first.tail = None;
    assert_eq!(again.recovered, first, "{name}: recovered something else");
    assert_eq!(again.state, plan.state, "{name}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Any damage to a journal of a few segments (bit flips, truncations, zeros appended,
    /// segments deleted): the plan never panics, fails only with `Corrupt` or `Missing`,
    /// and once carried out plans again to nothing but syncs and the same records. Damage
    /// only to records of segments that may tear is a torn tail, never an error.
    #[test]
    fn any_damage_is_planned_and_a_carried_out_plan_is_clean(
        shape in any_vec((any::<bool>(), 0usize..5), 1..6),
        damage in any_vec((0usize..6, 0u8..4, any::<u64>()), 0..4),
        old in 0usize..7,
    ) {
        let mut seq = 0;
        // The first `old` segments as a build of format version 1 wrote them (no states).
        let old = old % (shape.len() + 1);
        let states = [PairState::Syncing, PairState::Replicating, PairState::Consistent];
        let segs: Vec<Seg> = shape
            .iter()
            .enumerate()
            .map(|(i, &(flagged, n))| Seg {
                flagged,
                v1: i < old,
                records: (0..n)
                    .map(|_| {
                        seq += 1;
                        match seq % 4 {
                            0 => Rel(seq - 2),
                            2 if i >= old => St(states[seq as usize % 3]),
                            _ => P(seq),
                        }
                    })
                    .collect(),
            })
            .collect();
        let built = build(&segs, &[]);
        let may_tear_from = may_tear_from(&built.disk.listing().segments) as u64 + 1;
        let mut disk = built.disk.clone();
        // Whether every damage hit only records of segments that may tear.
        let mut tearable = true;
        for &(i, kind, at) in &damage {
            let segno = (i % segs.len()) as u64 + 1;
            let Some(bytes) = disk.segments.get_mut(&segno) else {
                continue;
            };
            let records_start = built.ends[&segno][0];
            let len = bytes.len() as u64;
            tearable &= segno >= may_tear_from;
            match kind {
                0 => {
                    if len > 0 {
                        let at = at % len;
                        bytes[at as usize] ^= 1 << (at % 8);
                        tearable &= at >= records_start;
                    }
                }
                1 => {
                    let at = at % (len + 1);
                    bytes.truncate(at as usize);
                    tearable &= at >= records_start;
                }
                2 => bytes.extend(std::iter::repeat_n(0, (at % 32) as usize + 1)),
                _ => {
                    disk.segments.remove(&segno);
                    tearable = false;
                }
            }
        }
        match disk.plan() {
            Ok(plan) => check_carried_out(disk, &plan, "proptest"),
            Err(JournalError::Corrupt { .. } | JournalError::Missing { .. }) => {
                prop_assert!(!tearable, "damage to records that may tear is an error");
            }
            Err(e) => prop_assert!(false, "{}", e),
        }
    }
}
