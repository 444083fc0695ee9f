//! The journal's fuzz targets (inside the module, for the recovery plan): a directory of
//! segments from arbitrary bytes, planned in memory ([`plan`]) and opened on disk
//! ([`open`]). Called through [`crate::fuzzing`].

use super::format::{self, Entry, HEADER_LEN};
use super::recovery::{self, Listed, Listing, RecoveryPlan, Repair};
use super::{Journal, JournalError, JournalOptions, Record, Recovered};
use crate::fuzzing::input::{Input, Script};
use crate::packet::{Packet, Payload};
use crate::types::{Offset, PairId, Seq, Stamp, Timestamp};
use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// A journal directory in memory: segment files and leftover temporary files.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Dir {
    segments: BTreeMap<u64, Vec<u8>>,
    temps: BTreeSet<u64>,
}

const MAX_FILES: usize = 16;

impl Dir {
    /// The input: a flags byte (bit 0: fix every checksum, so that damage reaches the
    /// parser), then files: a tag (bit 0: a temporary file), a segment number (u16) and
    /// the bytes (length-prefixed).
    fn parse(inp: &mut Input<'_>) -> Dir {
        let flags = inp.u8();
        let mut dir = Dir::default();
        for _ in 0..MAX_FILES {
            if inp.is_empty() {
                break;
            }
            let tag = inp.u8();
            let segno = u64::from(inp.u16());
            let bytes = inp.chunk(u16::MAX as usize);
            if tag & 1 == 1 {
                dir.temps.insert(segno);
            } else {
                let mut b = bytes.to_vec();
                if flags & 1 == 1 {
                    fix_checksums(&mut b);
                }
                dir.segments.insert(segno, b);
            }
        }
        dir
    }

    fn listing(&self) -> Listing {
        Listing {
            segments: self
                .segments
                .iter()
                .map(|(&segno, b)| Listed {
                    segno,
                    flags: recovery::header_flags(b, segno),
                })
                .collect(),
            temps: self.temps.iter().copied().collect(),
        }
    }

    fn plan(&self) -> Result<RecoveryPlan, JournalError> {
        recovery::plan(Path::new("fuzz"), &self.listing(), |segno| {
            Ok(self.segments.get(&segno).cloned().unwrap_or_default())
        })
    }

    /// Carries a plan out, as `Journal::open` does on disk.
    fn apply(&mut self, plan: &RecoveryPlan) {
        for r in &plan.repairs {
            match r {
                Repair::RemoveTemp(n) => assert!(self.temps.remove(n), "no temp {n}"),
                Repair::Sync(n) => assert!(self.segments.contains_key(n), "no segment {n}"),
                Repair::Cut { segno, len } => {
                    let b = self.segments.get_mut(segno).expect("a cut segment exists");
                    assert!(*len <= b.len() as u64, "a cut past the end");
                    b.truncate(*len as usize);
                }
                Repair::Rewrite { segno, bytes } => {
                    let b = self
                        .segments
                        .get_mut(segno)
                        .expect("a rewritten segment exists");
                    *b = bytes.clone();
                }
            }
        }
        for n in &plan.delete {
            assert!(
                self.segments.remove(n).is_some(),
                "no segment {n} to delete"
            );
        }
    }

    fn write_to(&self, dir: &Path) {
        for (&segno, b) in &self.segments {
            fs::write(dir.join(format::segment_name(segno)), b).expect("write a segment");
        }
        for &segno in &self.temps {
            fs::write(dir.join(format::temp_name(segno)), b"partial").expect("write a temp");
        }
    }

    fn read_from(dir: &Path) -> Dir {
        let mut out = Dir::default();
        for e in fs::read_dir(dir).expect("read the directory") {
            let e = e.expect("a directory entry");
            match format::classify(&e.file_name().to_string_lossy()) {
                format::FileKind::Segment(n) => {
                    out.segments
                        .insert(n, fs::read(e.path()).expect("read a segment"));
                }
                format::FileKind::Temp(n) => {
                    out.temps.insert(n);
                }
                format::FileKind::Other => {}
            }
        }
        out
    }
}

fn le32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

/// Rewrites the header checksum and every frame checksum that the frame lengths reach.
fn fix_checksums(b: &mut [u8]) {
    if b.len() < HEADER_LEN {
        return;
    }
    let crc = crc32c::crc32c(&b[..28]);
    b[28..32].copy_from_slice(&crc.to_le_bytes());
    let mut pos = HEADER_LEN;
    while pos + 8 <= b.len() {
        let len = le32(&b[pos..]) as usize;
        let end = pos + 8 + len;
        if len == 0 || end > b.len() {
            return;
        }
        let crc = crc32c::crc32c_append(crc32c::crc32c(&b[pos..pos + 4]), &b[pos + 8..end]);
        b[pos + 4..pos + 8].copy_from_slice(&crc.to_le_bytes());
        pos = end;
    }
}

/// What the frames whose checksum matches hold, read independently of the recovery
/// code's frame iterator: from each segment's header on, frame by frame, to the first
/// frame that is short or whose checksum does not match.
#[derive(Default)]
struct Checked {
    /// Packets, postcard-encoded.
    packets: BTreeSet<Vec<u8>>,
    limits: BTreeSet<Timestamp>,
}

fn checked_frames(dir: &Dir) -> Checked {
    let mut out = Checked::default();
    out.limits.insert(Timestamp::ZERO);
    for b in dir.segments.values() {
        let version = format::header_version(b);
        let mut pos = HEADER_LEN;
        while pos + 8 <= b.len() {
            let len = le32(&b[pos..]) as usize;
            let end = pos + 8 + len;
            if len == 0 || end > b.len() {
                break;
            }
            let crc = crc32c::crc32c_append(crc32c::crc32c(&b[pos..pos + 4]), &b[pos + 8..end]);
            if crc != le32(&b[pos + 4..]) {
                break;
            }
            match format::decode_frame_version(&b[pos..], version) {
                Ok((Entry::Record(Record::Packet(p)), _)) => {
                    out.packets.insert(encode(&p));
                }
                Ok((Entry::Record(Record::Limit { ts }), _)) => {
                    out.limits.insert(ts);
                }
                Ok((Entry::Checkpoint(cp), _)) => {
                    out.limits.insert(cp.state.limit);
                }
                Ok(_) => {}
                Err(e) => {
                    assert!(!e.contains("checksum"), "a good checksum refused: {e}");
                    break;
                }
            }
            pos = end;
        }
    }
    out
}

fn encode(p: &Packet) -> Vec<u8> {
    postcard::to_allocvec(p).unwrap_or_default()
}

/// Everything recovery returned came from a frame whose checksum matched.
fn check_recovered(dir: &Dir, rec: &Recovered) {
    let checked = checked_frames(dir);
    for (pair, rp) in &rec.pairs {
        for p in &rp.live {
            assert_eq!(p.pair, *pair);
            assert!(p.stamp.seq > rp.watermark(), "a covered packet is live");
            assert!(
                checked.packets.contains(&encode(p)),
                "recovered packet {:?} of pair {pair:?} is in no frame whose checksum matched",
                p.stamp
            );
        }
        assert!(
            rp.live.windows(2).all(|w| w[0].stamp.seq < w[1].stamp.seq),
            "live packets out of seq order"
        );
    }
    assert!(
        checked.limits.contains(&rec.limit),
        "limit {:?} is in no frame whose checksum matched",
        rec.limit
    );
}

/// What must survive carrying a plan out and recovering again.
fn same_records(a: &Recovered, b: &Recovered) -> bool {
    a.pairs == b.pairs && a.limit == b.limit && a.prepared == b.prepared && a.epoch == b.epoch
}

/// A directory of arbitrary segments must plan or fail, never panic; a plan never yields
/// a record whose checksum did not match, never cuts past a segment's end, and carried
/// out, plans again to nothing but syncs, with the same records (idempotent).
pub(crate) fn plan(data: &[u8]) {
    let dir = Dir::parse(&mut Input::new(data));
    let Ok(p) = dir.plan() else { return };
    check_recovered(&dir, &p.recovered);
    let mut after = dir.clone();
    after.apply(&p);
    let again = after
        .plan()
        .unwrap_or_else(|e| panic!("a repaired journal does not plan again: {e}"));
    assert!(
        again.repairs.iter().all(|r| matches!(r, Repair::Sync(_))),
        "a second recovery repairs again: {:?}",
        again.repairs
    );
    assert!(again.delete.is_empty(), "a second recovery deletes");
    assert!(
        again.recovered.tail.is_none(),
        "a second recovery finds a tail"
    );
    assert!(
        same_records(&p.recovered, &again.recovered),
        "a second recovery returns other records:\n{:?}\n{:?}",
        p.recovered,
        again.recovered
    );
}

/// A new scratch directory name, on tmpfs if there is one (distinct per call, as tests
/// run targets on several threads).
fn scratch() -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let base = Path::new("/dev/shm");
    let base = if base.is_dir() {
        base.to_path_buf()
    } else {
        std::env::temp_dir()
    };
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    base.join(format!("tidemark-fuzz-{}-{n}", std::process::id()))
}

/// Removes the scratch directory when dropped.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// The same directory on disk through [`Journal::open`]: it opens exactly when the plan
/// succeeds, with the plan's records; an error leaves every file as it was. An open
/// journal takes a packet, syncs, and a reopen returns it beside what was recovered.
pub(crate) fn open(data: &[u8]) {
    let dir = Dir::parse(&mut Input::new(data));
    let root = Scratch(scratch());
    let _ = fs::remove_dir_all(&root.0);
    let path = root.0.join("journal");
    fs::create_dir_all(&path).expect("create the scratch directory");
    dir.write_to(&path);
    let options = JournalOptions {
        segment_size: 4096,
        capacity: 4 << 20,
        reserve: 4096,
    };
    let pure = dir.plan();
    let (mut j, rec) = match Journal::open(&path, options) {
        Err(e) => {
            assert!(pure.is_err(), "open failed where the plan succeeded: {e}");
            assert_eq!(
                Dir::read_from(&path),
                dir,
                "a failed open changed files ({e})"
            );
            return;
        }
        Ok(x) => x,
    };
    let p = pure.unwrap_or_else(|e| panic!("open succeeded where the plan failed: {e}"));
    assert!(same_records(&rec, &p.recovered) && rec.tail == p.recovered.tail);
    assert_eq!(rec.max_ts, p.recovered.max_ts);
    check_recovered(&dir, &rec);
    let pair = PairId(u32::MAX);
    let packet = Packet {
        pair,
        stamp: Stamp::new(Timestamp(u64::MAX / 2), Seq(u64::MAX / 2)),
        payload: Payload::Write {
            offset: Offset(0),
            data: bytes::Bytes::from_static(b"after recovery"),
        },
    };
    match j.append(&[Record::Packet(packet.clone())]) {
        Ok(()) => {}
        Err(JournalError::Full { .. }) => return,
        Err(e) => panic!("append after recovery: {e}"),
    }
    j.sync().expect("sync after recovery");
    drop(j);
    let (_, again) = Journal::open(&path, options).expect("reopen after recovery");
    let mut want = rec.pairs.clone();
    want.entry(pair).or_default().live.push(packet);
    assert!(
        again.pairs == want,
        "a reopen returns other records:\n{want:?}\n{:?}",
        again.pairs
    );
}

/// Seeds: real journals written by [`Journal`] (several segments, synced and only
/// written, with every kind of record), one torn, one with a leftover temporary file.
pub(crate) fn seeds() -> Vec<Vec<u8>> {
    let root = Scratch(scratch());
    let mut out = Vec::new();
    for case in 0..4u8 {
        let path = root.0.join(format!("j{case}"));
        let options = JournalOptions {
            segment_size: 4096,
            capacity: 64 << 10,
            reserve: 4096,
        };
        let Ok((mut j, _)) = Journal::open(&path, options) else {
            continue;
        };
        for i in 1..=40u64 {
            let pair = PairId((i % 3) as u32);
            let stamp = Stamp::new(Timestamp(1000 + i), Seq(i));
            let mut batch = vec![Record::Packet(Packet {
                pair,
                stamp,
                payload: match i % 4 {
                    0 => Payload::Zero {
                        offset: Offset(i * 512),
                        len: 4096,
                    },
                    1 => Payload::Mark(crate::packet::Mark::SyncBegin),
                    _ => Payload::Write {
                        offset: Offset(i * 512),
                        data: bytes::Bytes::from(vec![i as u8; 100 + 20 * i as usize]),
                    },
                },
            })];
            if i % 7 == 0 {
                let done = Stamp::new(Timestamp(1000 + i - 5), Seq(i - 5));
                batch.push(Record::Released { pair, stamp: done });
                batch.push(Record::Applied { pair, stamp: done });
                batch.push(Record::Limit { ts: done.ts });
                batch.push(Record::Prepared { ts: done.ts });
                batch.push(Record::PairState {
                    pair,
                    state: super::PairState::Replicating,
                });
                batch.push(Record::Reserve {
                    pair,
                    seq: Seq(i + 100),
                });
                batch.push(Record::Epoch(Some(super::Epoch {
                    base: done.ts,
                    closes_at: None,
                })));
            }
            if j.append(&batch).is_err() {
                break;
            }
            let r = if case % 2 == 0 || i % 5 == 0 {
                j.sync()
            } else {
                j.write()
            };
            if r.is_err() {
                break;
            }
        }
        drop(j);
        let mut dir = Dir::read_from(&path);
        if case == 2 {
            if let Some(last) = dir.segments.values_mut().last() {
                let n = last.len() * 2 / 3;
                last.truncate(n);
            }
        }
        if case == 3 {
            dir.temps
                .insert(dir.segments.keys().last().map_or(1, |n| n + 1));
        }
        let mut s = Script::default();
        s.u8(0);
        for (&segno, b) in &dir.segments {
            s.u8(0).u16(segno as u16).chunk(b);
        }
        for &segno in &dir.temps {
            s.u8(1).u16(segno as u16).chunk(&[]);
        }
        out.push(s.done());
    }
    out
}
