//! Journal tests. Randomised tests are seeded; every failure message names its seed.
//! `TIDEMARK_JOURNAL_SEED=<n>` runs one extra seed.
//!
//! The loops that reopen a journal thousands of times run in /dev/shm when it exists:
//! the code paths are the same, only the fsyncs are free there.

use super::format::{self, Frames, HEADER_LEN};
use super::*;
use crate::packet::{Packet, Payload};
use crate::types::{Offset, PairId, Seq, Stamp, Timestamp};
use bytes::Bytes;
use rand::{Rng, SeedableRng};
use rand_pcg::Pcg64;
use std::collections::BTreeMap;
use std::os::unix::fs::FileExt;
use tempfile::TempDir;

fn seeds(fixed: &[u64]) -> Vec<u64> {
    let mut v = fixed.to_vec();
    if let Some(s) = std::env::var("TIDEMARK_JOURNAL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        v.push(s);
    }
    v
}

fn tempdir() -> TempDir {
    tempfile::tempdir().expect("temp dir")
}

/// A temp dir on tmpfs if there is one (for loops of many reopens).
fn fast_tempdir() -> TempDir {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        if let Ok(d) = tempfile::Builder::new()
            .prefix("tidemark-journal")
            .tempdir_in(shm)
        {
            return d;
        }
    }
    tempdir()
}

fn opts(segment_size: u64, capacity: u64) -> JournalOptions {
    JournalOptions {
        segment_size,
        capacity,
        reserve: 4096,
    }
}

fn open(dir: &Path, o: JournalOptions) -> (Journal, Recovered) {
    Journal::open(dir, o).unwrap_or_else(|e| panic!("open {}: {e}", dir.display()))
}

fn seg_path(dir: &Path, segno: u64) -> PathBuf {
    dir.join(format::segment_name(segno))
}

/// Every file in `dir` with its bytes.
fn snapshot(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                fs::read(e.path()).unwrap(),
            )
        })
        .collect()
}

fn restore(dir: &Path, snap: &BTreeMap<String, Vec<u8>>) {
    for e in fs::read_dir(dir).unwrap() {
        fs::remove_file(e.unwrap().path()).unwrap();
    }
    for (name, bytes) in snap {
        fs::write(dir.join(name), bytes).unwrap();
    }
}

fn segment_files(dir: &Path) -> Vec<u64> {
    let mut v: Vec<u64> = fs::read_dir(dir)
        .unwrap()
        .filter_map(
            |e| match format::classify(&e.unwrap().file_name().to_string_lossy()) {
                format::FileKind::Segment(n) => Some(n),
                _ => None,
            },
        )
        .collect();
    v.sort_unstable();
    v
}

/// `(offset, frame length)` of every good frame of a segment file (checkpoint first).
fn frames_of(bytes: &[u8]) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut frames = Frames::new(bytes);
    while let Some(Ok((at, _))) = frames.next() {
        out.push((at, frames.pos() - at));
    }
    out
}

/// Generates plausible records: per pair, seqs 1, 2, 3, ... with increasing time stamps;
/// watermarks name real stamps (sometimes behind the current one); limits mostly grow.
struct Gen {
    rng: Pcg64,
    pairs: u32,
    max_data: usize,
    ts: u64,
    /// Per pair, the stamp of every seq handed out (index = seq - 1).
    history: BTreeMap<PairId, Vec<Stamp>>,
}

impl Gen {
    fn new(seed: u64, pairs: u32, max_data: usize) -> Self {
        Gen {
            rng: Pcg64::seed_from_u64(seed),
            pairs,
            max_data,
            ts: 1_000,
            history: BTreeMap::new(),
        }
    }

    fn pair(&mut self) -> PairId {
        PairId(self.rng.random_range(0..self.pairs))
    }

    fn packet_for(&mut self, pair: PairId, len: usize) -> Record {
        self.ts += self.rng.random_range(1..1_000);
        let h = self.history.entry(pair).or_default();
        let stamp = Stamp::new(Timestamp(self.ts), Seq(h.len() as u64 + 1));
        h.push(stamp);
        let offset = Offset(self.rng.random_range(0..1u64 << 20) * 512);
        let mut data = vec![0u8; len];
        self.rng.fill(&mut data[..]);
        Record::Packet(Packet {
            pair,
            stamp,
            payload: Payload::Write {
                offset,
                data: Bytes::from(data),
            },
        })
    }

    /// A packet of a random pair: a write of up to `max_data` bytes, or a zero range.
    fn packet(&mut self) -> Record {
        let pair = self.pair();
        let len = self.rng.random_range(0..=self.max_data);
        let mut r = self.packet_for(pair, len);
        if self.rng.random_bool(0.1) {
            if let Record::Packet(p) = &mut r {
                p.payload = Payload::Zero {
                    offset: p.payload.offset(),
                    len: self.rng.random_range(1..1u64 << 20),
                };
            }
        } else if self.rng.random_bool(0.15) {
            // An activity-log write: the same stamp and region, no data.
            if let Record::Packet(p) = &r {
                r = Record::Logged(crate::journal::Logged {
                    pair: p.pair,
                    stamp: p.stamp,
                    offset: p.payload.offset(),
                    len: p.payload.len(),
                });
            }
        }
        r
    }

    /// The stamp of `seq` of `pair` (`Stamp::ZERO` for seq 0).
    fn stamp_of(&self, pair: PairId, seq: u64) -> Stamp {
        match seq {
            0 => Stamp::ZERO,
            s => self.history[&pair][s as usize - 1],
        }
    }

    fn watermark(&mut self) -> (PairId, Stamp) {
        let pair = self.pair();
        let last = self.history.get(&pair).map_or(0, |h| h.len() as u64);
        let seq = self.rng.random_range(0..=last);
        (pair, self.stamp_of(pair, seq))
    }

    /// A state for a random pair.
    fn pair_state(&mut self) -> Record {
        const STATES: [PairState; 4] = [
            PairState::Syncing,
            PairState::Replicating,
            PairState::Consistent,
            PairState::Inconsistent,
        ];
        Record::PairState {
            pair: self.pair(),
            state: STATES[self.rng.random_range(0..STATES.len())],
        }
    }

    fn record(&mut self) -> Record {
        match self.rng.random_range(0..23) {
            0..=12 => self.packet(),
            21 => {
                let (pair, stamp) = self.watermark();
                Record::Reserve {
                    pair,
                    seq: Seq(stamp.seq.0 + self.rng.random_range(0..100)),
                }
            }
            22 => Record::Epoch(self.rng.random_bool(0.7).then(|| crate::journal::Epoch {
                base: Timestamp(self.ts.saturating_sub(self.rng.random_range(0..3_000))),
                closes_at: self.rng.random_bool(0.5).then_some(Timestamp(self.ts)),
            })),
            13..=14 => {
                let (pair, stamp) = self.watermark();
                Record::Released { pair, stamp }
            }
            15..=16 => {
                let (pair, stamp) = self.watermark();
                Record::Applied { pair, stamp }
            }
            17..=18 => Record::Limit {
                ts: Timestamp(self.ts.saturating_sub(self.rng.random_range(0..3_000))),
            },
            19 => Record::Prepared {
                ts: Timestamp(self.ts.saturating_sub(self.rng.random_range(0..3_000))),
            },
            _ => self.pair_state(),
        }
    }
}

/// An independent reduction of a record sequence: what recovery must return.
#[derive(Default)]
struct Model {
    released: BTreeMap<PairId, Stamp>,
    applied: BTreeMap<PairId, Stamp>,
    limit: Timestamp,
    prepared: Timestamp,
    packets: BTreeMap<PairId, BTreeMap<Seq, Packet>>,
    logged: BTreeMap<PairId, BTreeMap<Seq, crate::journal::Logged>>,
    /// The latest state of each pair.
    states: BTreeMap<PairId, PairState>,
    reserved: BTreeMap<PairId, Seq>,
    epoch: Option<crate::journal::Epoch>,
    max_ts: Timestamp,
}

impl Model {
    fn of(records: &[Record]) -> Model {
        let mut m = Model::default();
        for r in records {
            m.apply(r);
        }
        m
    }

    fn apply(&mut self, r: &Record) {
        let later =
            |old: Option<&Stamp>, new: Stamp| old.is_none_or(|o| (new.seq, new.ts) > (o.seq, o.ts));
        match r {
            Record::Packet(p) => {
                self.max_ts = self.max_ts.max(p.stamp.ts);
                self.logged.entry(p.pair).or_default().remove(&p.stamp.seq);
                self.packets
                    .entry(p.pair)
                    .or_default()
                    .insert(p.stamp.seq, p.clone());
            }
            Record::Logged(l) => {
                self.max_ts = self.max_ts.max(l.stamp.ts);
                self.packets.entry(l.pair).or_default().remove(&l.stamp.seq);
                self.logged
                    .entry(l.pair)
                    .or_default()
                    .insert(l.stamp.seq, *l);
            }
            Record::Released { pair, stamp } => {
                self.max_ts = self.max_ts.max(stamp.ts);
                if later(self.released.get(pair), *stamp) {
                    self.released.insert(*pair, *stamp);
                }
            }
            Record::Applied { pair, stamp } => {
                self.max_ts = self.max_ts.max(stamp.ts);
                if later(self.applied.get(pair), *stamp) {
                    self.applied.insert(*pair, *stamp);
                }
            }
            Record::Limit { ts } => {
                self.max_ts = self.max_ts.max(*ts);
                self.limit = self.limit.max(*ts);
            }
            Record::Prepared { ts } => {
                self.max_ts = self.max_ts.max(*ts);
                self.prepared = self.prepared.max(*ts);
            }
            Record::PairState { pair, state } => {
                self.states.insert(*pair, *state);
            }
            Record::Reserve { pair, seq } => {
                let r = self.reserved.entry(*pair).or_default();
                *r = (*r).max(*seq);
            }
            Record::Epoch(e) => {
                if let Some(e) = e {
                    self.max_ts = self.max_ts.max(e.base).max(e.closes_at.unwrap_or_default());
                }
                self.epoch = *e;
            }
        }
    }

    fn expected(&self) -> Recovered {
        let mut pairs: BTreeMap<PairId, RecoveredPair> = BTreeMap::new();
        for (&p, &s) in &self.released {
            pairs.entry(p).or_default().released = s;
        }
        for (&p, &s) in &self.applied {
            pairs.entry(p).or_default().applied = s;
        }
        for (&p, held) in &self.packets {
            let wm = pairs.get(&p).map_or(Seq::ZERO, |x| x.watermark());
            let live: Vec<Packet> = held.range(wm.next()..).map(|(_, p)| p.clone()).collect();
            if !live.is_empty() {
                pairs.entry(p).or_default().live = live;
            }
        }
        for (&p, held) in &self.logged {
            let wm = pairs.get(&p).map_or(Seq::ZERO, |x| x.watermark());
            let logged: Vec<_> = held.range(wm.next()..).map(|(_, l)| *l).collect();
            if !logged.is_empty() {
                pairs.entry(p).or_default().logged = logged;
            }
        }
        for (&p, &state) in &self.states {
            pairs.entry(p).or_default().state = Some(state);
        }
        for (&p, &seq) in &self.reserved {
            pairs.entry(p).or_default().reserved = seq;
        }
        Recovered {
            pairs,
            limit: self.limit,
            prepared: self.prepared,
            epoch: self.epoch,
            max_ts: self.max_ts,
            tail: None,
            segments: 0,
        }
    }
}

/// Asserts that `got` is exactly the reduction of `records`, with a readable message.
fn check(got: &Recovered, records: &[Record], ctx: &str) {
    let want = Model::of(records).expected();
    type Summary = (PairId, Stamp, Stamp, Vec<u64>, Option<PairState>);
    let summary = |r: &Recovered| -> Vec<Summary> {
        r.pairs
            .iter()
            .map(|(p, s)| {
                (
                    *p,
                    s.released,
                    s.applied,
                    s.live.iter().map(|p| p.stamp.seq.0).collect(),
                    s.state,
                )
            })
            .collect()
    };
    assert_eq!(
        summary(got),
        summary(&want),
        "{ctx}: pairs (released, applied, live seqs, state) after {} records",
        records.len()
    );
    assert_eq!(
        (got.limit, got.prepared, got.max_ts),
        (want.limit, want.prepared, want.max_ts),
        "{ctx}: limit, prepared, max_ts"
    );
    let mut g = got.clone();
    g.tail = None;
    g.segments = 0;
    assert!(g == want, "{ctx}: packet contents differ");
}

#[test]
fn round_trip_and_unsynced_appends_are_not_recovered() {
    for seed in seeds(&[1, 2, 3]) {
        let ctx = format!("seed {seed}");
        let dir = tempdir();
        let o = JournalOptions::default();
        let (mut j, rec) = open(dir.path(), o);
        check(&rec, &[], &ctx);
        assert_eq!(rec.segments, 1, "{ctx}");
        let mut g = Gen::new(seed, 4, 300);
        let mut records = Vec::new();
        while records.len() < 400 {
            let n = g.rng.random_range(1..20);
            let batch: Vec<Record> = (0..n).map(|_| g.record()).collect();
            j.append(&batch).unwrap();
            records.extend(batch);
            if g.rng.random_bool(0.3) {
                j.sync().unwrap();
            }
        }
        j.sync().unwrap();
        assert_eq!(j.pending(), 0, "{ctx}");
        // Appended but never synced: gone after a restart.
        j.append(&[
            g.record(),
            g.packet(),
            Record::Limit {
                ts: Timestamp(u64::MAX),
            },
        ])
        .unwrap();
        assert!(j.pending() > 0, "{ctx}");
        drop(j);
        let (mut j, rec) = open(dir.path(), o);
        check(&rec, &records, &ctx);
        assert_eq!(rec.tail, None, "{ctx}");
        // And the reopened journal takes more.
        let more: Vec<Record> = (0..50).map(|_| g.record()).collect();
        j.append(&more).unwrap();
        j.sync().unwrap();
        records.extend(more);
        drop(j);
        let (_, rec) = open(dir.path(), o);
        check(&rec, &records, &ctx);
    }
}

/// Appends generated packets (kept in `records`) until one starts a new segment; returns
/// the segment that was active before.
fn append_packets_into_next_segment(
    j: &mut Journal,
    g: &mut Gen,
    records: &mut Vec<Record>,
) -> u64 {
    let start = j.position().0;
    while j.position().0 == start {
        let r = g.packet();
        j.append(std::slice::from_ref(&r)).unwrap();
        records.push(r);
    }
    start
}

#[test]
fn write_survives_a_process_restart_and_sync_makes_it_durable() {
    let ctx = "seed 101";
    let dir = tempdir();
    let o = opts(4096, 1 << 20);
    let (mut j, _) = open(dir.path(), o);
    let mut g = Gen::new(101, 2, 100);
    let mut records = Vec::new();
    for _ in 0..10 {
        let r = g.record();
        j.append(std::slice::from_ref(&r)).unwrap();
        records.push(r);
        j.write().unwrap();
        assert_eq!(j.pending(), 0, "{ctx}");
    }
    assert_eq!(j.stats().syncs, 0, "{ctx}: write must not fdatasync");
    // Dropped without a sync, as if the process died: the page cache has the records.
    drop(j);
    let (mut j, rec) = open(dir.path(), o);
    check(&rec, &records, ctx);

    // A sync after a write fdatasyncs even with nothing pending; then it is a no-op.
    let r = g.record();
    j.append(std::slice::from_ref(&r)).unwrap();
    records.push(r);
    j.write().unwrap();
    j.sync().unwrap();
    assert_eq!(j.stats().syncs, 1, "{ctx}");
    j.sync().unwrap();
    assert_eq!(j.stats().syncs, 1, "{ctx}");

    // A write that starts a segment creates it (durably, flagged: its predecessor is
    // not synced) without syncing the one it sealed; the next sync does that.
    let start = append_packets_into_next_segment(&mut j, &mut g, &mut records);
    j.write().unwrap();
    assert_eq!(j.stats().syncs, 1, "{ctx}: sealing by write must not sync");
    assert_eq!(
        segment_files(dir.path()).last(),
        Some(&(start + 1)),
        "{ctx}"
    );
    let head = std::fs::read(dir.path().join(format::segment_name(start + 1))).unwrap();
    assert_eq!(
        format::check_header(&head, start + 1),
        Ok(format::FLAG_PREV_UNSYNCED),
        "{ctx}"
    );
    drop(j);
    let (mut j, rec) = open(dir.path(), o);
    check(&rec, &records, ctx);
    // Nothing pending, but a segment sealed unsynced: a sync is not a no-op.
    let r = g.record();
    j.append(std::slice::from_ref(&r)).unwrap();
    records.push(r);
    append_packets_into_next_segment(&mut j, &mut g, &mut records);
    j.write().unwrap();
    let before = j.stats().syncs;
    j.sync().unwrap();
    assert_eq!(j.stats().syncs, before + 1, "{ctx}");
    drop(j);
    let (_, rec) = open(dir.path(), o);
    check(&rec, &records, ctx);
}

#[test]
fn duplicate_seq_last_journaled_wins_and_empty_append_is_a_no_op() {
    let dir = tempdir();
    let (mut j, _) = open(dir.path(), JournalOptions::default());
    let p = |data: &'static [u8]| {
        Record::Packet(Packet {
            pair: PairId(1),
            stamp: Stamp::new(Timestamp(10), Seq(1)),
            payload: Payload::Write {
                offset: Offset(0),
                data: Bytes::from_static(data),
            },
        })
    };
    j.append(&[]).unwrap();
    assert_eq!(j.pending(), 0);
    j.append(&[p(b"old"), p(b"new")]).unwrap();
    j.sync().unwrap();
    drop(j);
    let (_, rec) = open(dir.path(), JournalOptions::default());
    let live = &rec.pair(PairId(1)).unwrap().live;
    assert_eq!(live.len(), 1);
    assert_eq!(live[0].payload.len(), 3);
    assert_eq!(
        live[0].payload,
        Payload::Write {
            offset: Offset(0),
            data: Bytes::from_static(b"new")
        }
    );
}

#[test]
fn many_records_across_rotation_with_reopens() {
    for seed in seeds(&[11, 12]) {
        let ctx = format!("seed {seed}");
        let dir = tempdir();
        let o = opts(4096, 4 << 20);
        let (mut j, _) = open(dir.path(), o);
        let mut g = Gen::new(seed, 3, 200);
        let mut records = Vec::new();
        let mut reopens = 0;
        while records.len() < 3_000 {
            let n = g.rng.random_range(1..40);
            let batch: Vec<Record> = (0..n).map(|_| g.record()).collect();
            j.append(&batch).unwrap();
            records.extend(batch);
            if g.rng.random_bool(0.2) {
                // Written or synced, the bytes are in the files.
                if g.rng.random_bool(0.5) {
                    j.write().unwrap();
                } else {
                    j.sync().unwrap();
                }
                assert_eq!(j.pending(), 0, "{ctx}");
                // Segments on disk are contiguous and match the journal's view.
                let files = segment_files(dir.path());
                let (first, last) = j.segment_range();
                assert_eq!(files, (first..=last).collect::<Vec<_>>(), "{ctx}");
                assert_eq!(j.segments(), files.len(), "{ctx}");
                let on_disk: u64 = files
                    .iter()
                    .map(|&n| fs::metadata(seg_path(dir.path(), n)).unwrap().len())
                    .sum();
                assert_eq!(on_disk, j.used(), "{ctx}: used() counts the bytes on disk");
            }
            if g.rng.random_bool(0.02) {
                // Written is enough for a reopen by the next process.
                j.write().unwrap();
                drop(j);
                let (j2, rec) = open(dir.path(), o);
                check(&rec, &records, &format!("{ctx} reopen {reopens}"));
                j = j2;
                reopens += 1;
            }
        }
        j.sync().unwrap();
        // Segments stay near their size: a record only goes past it at the start.
        for n in segment_files(dir.path()) {
            let len = fs::metadata(seg_path(dir.path(), n)).unwrap().len();
            assert!(len <= 4096 + 512, "{ctx}: segment {n} has {len} bytes");
        }
        let last = j.position().0;
        assert!(last > 20, "{ctx}: only {last} segments");
        drop(j);
        let (_, rec) = open(dir.path(), o);
        check(&rec, &records, &ctx);
    }
}

/// Appends records that change nothing (the current watermark of pair 0 again) until a
/// new segment starts, and syncs.
fn rotate(j: &mut Journal, records: &mut Vec<Record>) {
    let start = j.position().0;
    while j.position().0 == start {
        let r = Record::Released {
            pair: PairId(0),
            stamp: j.released(PairId(0)),
        };
        j.append(std::slice::from_ref(&r)).unwrap();
        records.push(r);
    }
    j.sync().unwrap();
}

/// Builds a journal of several segments from small records with syncs in between, and
/// returns the records and where each ended: `(segment, offset)`. Its last segment holds
/// a watermark for every pair up to its last packet (covering every sealed segment:
/// deleting them on the strength of it would be wrong, as a cut before it takes it back),
/// then a tail of packets and limits; the last sync writes it all.
fn build(dir: &Path, o: JournalOptions, g: &mut Gen, n: usize) -> (Vec<Record>, Vec<(u64, u64)>) {
    let (mut j, _) = open(dir, o);
    let mut records = Vec::new();
    let mut ends = Vec::new();
    let mut push = |j: &mut Journal, r: Record| {
        j.append(std::slice::from_ref(&r)).unwrap();
        records.push(r);
        ends.push(j.position());
    };
    for _ in 0..n {
        push(&mut j, g.record());
        if g.rng.random_bool(0.1) {
            j.sync().unwrap();
        }
    }
    j.sync().unwrap();
    let start = j.position().0;
    while j.position().0 == start {
        push(&mut j, g.packet());
    }
    let pairs: Vec<(PairId, Stamp)> = g
        .history
        .iter()
        .map(|(&p, h)| (p, *h.last().unwrap()))
        .collect();
    for (i, (pair, stamp)) in pairs.into_iter().enumerate() {
        if i % 2 == 0 {
            push(&mut j, Record::Released { pair, stamp });
        } else {
            push(&mut j, Record::Applied { pair, stamp });
        }
    }
    for _ in 0..30 {
        let r = match g.rng.random_range(0..10) {
            0..=6 => g.packet(),
            7..=8 => Record::Limit {
                ts: Timestamp(g.ts),
            },
            // Cutting the tail takes these off: the state before them wins.
            _ => g.pair_state(),
        };
        push(&mut j, r);
    }
    j.sync().unwrap();
    let last = ends.last().unwrap().0;
    assert_eq!(last, start + 1);
    assert_eq!(segment_files(dir).last(), Some(&last));
    (records, ends)
}

#[test]
fn torn_tail_at_every_truncation_point_recovers_exactly_the_prefix() {
    // Reclamation must not depend on anything after the last segment's checkpoint, or a
    // cut there would lose packets of deleted segments: make sure some seed deletes.
    let mut reclaimed = false;
    for seed in seeds(&[21, 22, 23]) {
        let ctx = format!("seed {seed}");
        let dir = fast_tempdir();
        let o = opts(4096, 1 << 20);
        let mut g = Gen::new(seed, 3, 40);
        // Enough for a few segments; the last one partly filled.
        let (records, ends) = build(dir.path(), o, &mut g, 250);
        let last = ends.last().unwrap().0;
        assert!(last >= 3, "{ctx}: only {last} segments");
        reclaimed |= segment_files(dir.path())[0] > 1;
        let path = seg_path(dir.path(), last);
        let full = fs::read(&path).unwrap();
        let cp_end = frames_of(&full)[0].0 + frames_of(&full)[0].1;
        let mut others = snapshot(dir.path());
        others.remove(&format::segment_name(last));
        let boundaries: Vec<u64> = std::iter::once(cp_end)
            .chain(ends.iter().filter(|e| e.0 == last).map(|e| e.1))
            .collect();
        assert_eq!(*boundaries.last().unwrap(), full.len() as u64, "{ctx}");
        for cut in 0..=full.len() {
            let ctx = format!("{ctx} cut {cut} of {}", full.len());
            fs::write(&path, &full[..cut]).unwrap();
            let res = Journal::open(dir.path(), o);
            if (cut as u64) < cp_end {
                // Header and checkpoint were durable before the segment got its name.
                match res {
                    Err(JournalError::Corrupt { segment, .. }) => {
                        assert_eq!(segment, last, "{ctx}")
                    }
                    other => panic!("{ctx}: {other:?}"),
                }
                assert_eq!(
                    fs::read(&path).unwrap(),
                    &full[..cut],
                    "{ctx}: file changed"
                );
                continue;
            }
            let (j, rec) = res.unwrap_or_else(|e| panic!("{ctx}: {e}"));
            let k = ends
                .iter()
                .filter(|(s, e)| *s < last || *e <= cut as u64)
                .count();
            check(&rec, &records[..k], &ctx);
            let clean = *boundaries.iter().rfind(|&&b| b <= cut as u64).unwrap();
            match &rec.tail {
                None => assert_eq!(clean, cut as u64, "{ctx}"),
                Some(t) => {
                    assert_eq!((t.segment, t.offset), (last, clean), "{ctx}");
                    assert_eq!(t.dropped, cut as u64 - clean, "{ctx}");
                }
            }
            assert_eq!(
                fs::metadata(&path).unwrap().len(),
                clean,
                "{ctx}: tail cut off"
            );
            assert_eq!(j.position(), (last, clean), "{ctx}");
            drop(j);
        }
        let mut now = snapshot(dir.path());
        now.remove(&format::segment_name(last));
        assert!(now == others, "{ctx}: other segments changed");

        // After a repair, more appends and a reopen work.
        for _ in 0..5 {
            let cut = g.rng.random_range(cp_end as usize..=full.len());
            let ctx = format!("{ctx} append after cut {cut}");
            fs::write(&path, &full[..cut]).unwrap();
            let (mut j, _) = open(dir.path(), o);
            let k = ends
                .iter()
                .filter(|(s, e)| *s < last || *e <= cut as u64)
                .count();
            let mut expect = records[..k].to_vec();
            let more: Vec<Record> = (0..100).map(|_| g.record()).collect();
            j.append(&more).unwrap();
            j.sync().unwrap();
            expect.extend(more);
            drop(j);
            let (_, rec) = open(dir.path(), o);
            check(&rec, &expect, &ctx);
            assert_eq!(rec.tail, None, "{ctx}");
            restore(dir.path(), &others);
        }
    }
    assert!(reclaimed, "no seed reclaimed a segment");
}

#[test]
fn bit_flip_in_the_last_segment_drops_that_record_and_everything_after() {
    for seed in seeds(&[31, 32]) {
        let ctx = format!("seed {seed}");
        let dir = fast_tempdir();
        let o = opts(4096, 1 << 20);
        let mut g = Gen::new(seed, 3, 60);
        let (mut records, _) = build(dir.path(), o, &mut g, 150);
        // End with a packet that has some data, so flips hit header, stamp and data.
        let tail_packet = g.packet_for(PairId(1), 64);
        {
            let (mut j, _) = open(dir.path(), o);
            j.append(std::slice::from_ref(&tail_packet)).unwrap();
            j.sync().unwrap();
        }
        records.push(tail_packet);
        let snap = snapshot(dir.path());
        let last = *segment_files(dir.path()).last().unwrap();
        let path = seg_path(dir.path(), last);
        let full = fs::read(&path).unwrap();
        let frames = frames_of(&full);
        let in_last = frames.len() - 1; // records in the last segment (minus checkpoint)
        assert!(in_last >= 2, "{ctx}");

        // Every bit of the last record.
        let (at, len) = *frames.last().unwrap();
        for bit in 0..len * 8 {
            let ctx = format!("{ctx} flip bit {bit} of the last record at {at}");
            let mut bytes = full.clone();
            bytes[(at + bit / 8) as usize] ^= 1 << (bit % 8);
            fs::write(&path, &bytes).unwrap();
            let (_, rec) = Journal::open(dir.path(), o).unwrap_or_else(|e| panic!("{ctx}: {e}"));
            check(&rec, &records[..records.len() - 1], &ctx);
            assert_eq!(rec.tail.as_ref().map(|t| t.offset), Some(at), "{ctx}");
            assert_eq!(fs::metadata(&path).unwrap().len(), at, "{ctx}");
        }

        // A flip in an earlier record of the last segment drops it and all after it.
        for _ in 0..40 {
            let i = g.rng.random_range(1..frames.len());
            let (at, len) = frames[i];
            let byte = at + g.rng.random_range(0..len);
            let ctx = format!("{ctx} flip in record {i} of the last segment at byte {byte}");
            let mut bytes = full.clone();
            bytes[byte as usize] ^= 1 << g.rng.random_range(0..8);
            fs::write(&path, &bytes).unwrap();
            let (_, rec) = Journal::open(dir.path(), o).unwrap_or_else(|e| panic!("{ctx}: {e}"));
            let kept = records.len() - (frames.len() - i);
            check(&rec, &records[..kept], &ctx);
            assert_eq!(rec.tail.as_ref().map(|t| t.offset), Some(at), "{ctx}");
        }

        // A flip in the last segment's header or checkpoint is corruption, not a tail.
        let cp_end = frames[0].0 + frames[0].1;
        for _ in 0..40 {
            let byte = g.rng.random_range(0..cp_end);
            let ctx = format!("{ctx} flip in header/checkpoint at byte {byte}");
            let mut bytes = full.clone();
            bytes[byte as usize] ^= 1 << g.rng.random_range(0..8);
            fs::write(&path, &bytes).unwrap();
            match Journal::open(dir.path(), o) {
                Err(JournalError::Corrupt {
                    segment, offset, ..
                }) => {
                    assert_eq!(segment, last, "{ctx}");
                    let want = if byte < HEADER_LEN as u64 {
                        0
                    } else {
                        HEADER_LEN as u64
                    };
                    assert_eq!(offset, want, "{ctx}");
                }
                other => panic!("{ctx}: {other:?}"),
            }
            assert_eq!(
                fs::read(&path).unwrap(),
                bytes,
                "{ctx}: a failed open changed the file"
            );
        }
        restore(dir.path(), &snap);
        let (_, rec) = open(dir.path(), o);
        check(&rec, &records, &ctx);
    }
}

#[test]
fn corruption_in_a_sealed_segment_is_an_error_and_changes_nothing() {
    for seed in seeds(&[41, 42]) {
        let ctx = format!("seed {seed}");
        let dir = fast_tempdir();
        let o = opts(4096, 1 << 20);
        // Packets only: nothing is released, nothing reclaimed.
        let mut g = Gen::new(seed, 3, 80);
        let (mut j, _) = open(dir.path(), o);
        let records: Vec<Record> = (0..200).map(|_| g.packet()).collect();
        j.append(&records).unwrap();
        j.sync().unwrap();
        drop(j);
        let files = segment_files(dir.path());
        assert!(files.len() >= 3, "{ctx}");
        let snap = snapshot(dir.path());
        for round in 0..60 {
            let segno = files[g.rng.random_range(0..files.len() - 1)];
            let path = seg_path(dir.path(), segno);
            let bytes = snap[&format::segment_name(segno)].clone();
            let frames = frames_of(&bytes);
            let mut bad = bytes.clone();
            let (want_offset, what) = match round % 4 {
                0 => {
                    // A bit flip in a frame.
                    let (at, len) = frames[g.rng.random_range(0..frames.len())];
                    let byte = at + g.rng.random_range(0..len);
                    bad[byte as usize] ^= 1 << g.rng.random_range(0..8);
                    (at, format!("flip at {byte}"))
                }
                1 => {
                    // Cut inside a frame (a sealed segment is never torn).
                    let (at, len) = *frames.last().unwrap();
                    let cut = at + g.rng.random_range(1..len);
                    bad.truncate(cut as usize);
                    (at, format!("cut at {cut}"))
                }
                2 => {
                    // Whole frames lost at the end: the segment reads clean, but its
                    // successor's checkpoint knows how long it was.
                    let (at, _) = frames[g.rng.random_range(1..frames.len())];
                    bad.truncate(at as usize);
                    (at, format!("cut at the frame boundary {at}"))
                }
                _ => {
                    let byte = g.rng.random_range(0..HEADER_LEN);
                    bad[byte] ^= 1 << g.rng.random_range(0..8);
                    (0, format!("header flip at {byte}"))
                }
            };
            let ctx = format!("{ctx} segment {segno}: {what}");
            fs::write(&path, &bad).unwrap();
            match Journal::open(dir.path(), o) {
                Err(JournalError::Corrupt {
                    segment, offset, ..
                }) => assert_eq!((segment, offset), (segno, want_offset), "{ctx}"),
                Err(e) => panic!("{ctx}: {e}"),
                Ok((_, rec)) => panic!("{ctx}: opened, tail {:?}", rec.tail),
            }
            let mut expect = snap.clone();
            expect.insert(format::segment_name(segno), bad);
            assert!(
                snapshot(dir.path()) == expect,
                "{ctx}: a failed open changed files"
            );
            fs::write(&path, &bytes).unwrap();
        }
        let (_, rec) = open(dir.path(), o);
        check(&rec, &records, &ctx);
    }
}

#[test]
fn full_leaves_the_journal_unchanged_and_usable() {
    let seed = 51;
    let ctx = format!("seed {seed}");
    let dir = tempdir();
    let o = opts(4096, 16384);
    let (mut j, _) = open(dir.path(), o);
    let mut g = Gen::new(seed, 2, 0);
    let mut records = Vec::new();
    // Fill with ~1 KiB packets until one is refused.
    let err = loop {
        let pair = PairId(records.len() as u32 % 2);
        let r = g.packet_for(pair, 1000);
        match j.append(std::slice::from_ref(&r)) {
            Ok(()) => {
                records.push(r);
                j.sync().unwrap();
            }
            Err(e) => break e,
        }
    };
    assert!(matches!(err, JournalError::Full { .. }), "{ctx}: {err}");
    assert!(j.used() <= o.capacity, "{ctx}");
    let before = (j.used(), j.position(), j.segments(), snapshot(dir.path()));
    // A batch whose first records would fit is refused as a whole.
    let small = g.packet_for(PairId(0), 10);
    let big = g.packet_for(PairId(1), 3000);
    assert!(
        matches!(
            j.append(&[small.clone(), big]),
            Err(JournalError::Full { .. })
        ),
        "{ctx}"
    );
    j.sync().unwrap();
    assert_eq!(
        (j.used(), j.position(), j.segments(), snapshot(dir.path())),
        before,
        "{ctx}"
    );
    assert_eq!(j.stats().full, 2, "{ctx}");
    // The seqs of the refused packets are never journaled; the caller would retry them
    // later. The model must not see them either; re-stamp what comes next.
    g.history.get_mut(&PairId(0)).unwrap().pop();
    g.history.get_mut(&PairId(1)).unwrap().pop();

    // Records without packets may go past the capacity, into the reserve...
    let mut ts = 1;
    while j.used() <= o.capacity {
        let r = Record::Limit { ts: Timestamp(ts) };
        j.append(std::slice::from_ref(&r)).unwrap();
        records.push(r);
        ts += 1;
    }
    let tiny = g.packet_for(PairId(0), 0);
    assert!(
        matches!(j.append(&[tiny]), Err(JournalError::Full { .. })),
        "{ctx}: a packet must not use the reserve"
    );
    g.history.get_mut(&PairId(0)).unwrap().pop();
    // ... so the watermarks that free it still go in, and syncing them frees segments.
    let released: Vec<Record> = [PairId(0), PairId(1)]
        .into_iter()
        .map(|pair| Record::Released {
            pair,
            stamp: *g.history[&pair].last().unwrap(),
        })
        .collect();
    j.append(&released).unwrap();
    records.extend(released);
    let segs = j.segments();
    j.sync().unwrap();
    // Short of space, the sync starts a new segment at once so it can delete old ones.
    assert_eq!(j.stats().early_rotations, 1, "{ctx}");
    assert!(j.segments() < segs, "{ctx}: nothing reclaimed");
    assert!(j.used() < o.capacity / 2, "{ctx}: used {}", j.used());
    // Packets go in again.
    for _ in 0..4 {
        let r = g.packet_for(PairId(0), 1000);
        j.append(std::slice::from_ref(&r)).unwrap();
        records.push(r);
    }
    j.sync().unwrap();
    drop(j);
    let (_, rec) = open(dir.path(), o);
    check(&rec, &records, &ctx);
    assert_eq!(rec.pair(PairId(0)).unwrap().live.len(), 4, "{ctx}");

    // Control records are never refused: past the reserve they are folded into the
    // state, and a sync makes the latest durable (the checkpoint of a new segment).
    let (mut j, _) = open(dir.path(), o);
    let used = j.used();
    let mut n = 1;
    while j.stats().folded < 10 {
        j.append(&[Record::Limit { ts: Timestamp(n) }])
            .unwrap_or_else(|e| panic!("{ctx}: limit {n} refused: {e}"));
        n += 1;
        assert!(n < 100_000, "{ctx}: control records never fill the reserve");
    }
    // A batch of pair states only is a control batch too: folded, never refused.
    let folded = j.stats().folded;
    let states = [
        Record::PairState {
            pair: PairId(1),
            state: PairState::Syncing,
        },
        Record::PairState {
            pair: PairId(9),
            state: PairState::Inconsistent,
        },
        Record::PairState {
            pair: PairId(1),
            state: PairState::Replicating,
        },
    ];
    j.append(&states)
        .unwrap_or_else(|e| panic!("{ctx}: pair states refused: {e}"));
    assert_eq!(j.stats().folded, folded + 3, "{ctx}");
    assert_eq!(
        j.pair_state(PairId(1)),
        Some(PairState::Replicating),
        "{ctx}"
    );
    assert_eq!(
        j.pair_state(PairId(9)),
        Some(PairState::Inconsistent),
        "{ctx}"
    );
    assert!(
        j.used() <= o.capacity + o.reserve,
        "{ctx}: past the reserve"
    );
    assert!(j.used() > used, "{ctx}: the reserve was used");
    assert_eq!(j.limit(), Timestamp(n - 1), "{ctx}");
    j.sync().unwrap();
    drop(j);
    let (_, rec) = open(dir.path(), o);
    assert_eq!(
        rec.limit,
        Timestamp(n - 1),
        "{ctx}: the folded limit is durable"
    );
    assert_eq!(
        rec.pair(PairId(1)).and_then(|p| p.state),
        Some(PairState::Replicating),
        "{ctx}: the folded state is durable, the latest wins"
    );
    assert_eq!(
        rec.pair(PairId(9)).map(|p| p.state),
        Some(Some(PairState::Inconsistent)),
        "{ctx}: a pair with only a state is recovered"
    );
}

#[test]
fn too_large_record_is_refused_and_changes_nothing() {
    let dir = tempdir();
    let o = opts(4096, 1 << 20);
    let (mut j, _) = open(dir.path(), o);
    let mut g = Gen::new(61, 1, 0);
    let ok = g.packet_for(PairId(0), 4000);
    j.append(std::slice::from_ref(&ok)).unwrap();
    let pos = j.position();
    let big = g.packet_for(PairId(0), 5000);
    assert!(matches!(
        j.append(&[Record::Limit { ts: Timestamp(1) }, big]),
        Err(JournalError::TooLarge { max: 4096, .. })
    ));
    assert_eq!(j.position(), pos);
    assert_eq!(j.limit(), Timestamp::ZERO);
    // A record that fills a segment on its own: it gets one.
    let ok2 = g.packet_for(PairId(0), 4000);
    j.append(std::slice::from_ref(&ok2)).unwrap();
    assert_eq!(j.position().0, pos.0 + 1);
    j.sync().unwrap();
    drop(j);
    let (_, rec) = open(dir.path(), o);
    check(&rec, &[ok, ok2], "too large");
}

#[test]
fn reclamation_deletes_covered_segments_and_recovery_keeps_what_matters() {
    for seed in seeds(&[71, 72]) {
        let ctx = format!("seed {seed}");
        let dir = tempdir();
        let o = opts(4096, 4 << 20);
        let (mut j, _) = open(dir.path(), o);
        let mut g = Gen::new(seed, 3, 0);
        // Limits and pair states only in the first segment: after reclamation only
        // checkpoints know them. Pair 7 has nothing but a state.
        let mut records = vec![
            Record::Limit { ts: Timestamp(500) },
            Record::Prepared { ts: Timestamp(700) },
            Record::PairState {
                pair: PairId(0),
                state: PairState::Syncing,
            },
            Record::PairState {
                pair: PairId(7),
                state: PairState::Inconsistent,
            },
            Record::PairState {
                pair: PairId(0),
                state: PairState::Replicating,
            },
            Record::PairState {
                pair: PairId(7),
                state: PairState::Consistent,
            },
        ];
        for i in 0..300 {
            let len = g.rng.random_range(50..150);
            records.push(g.packet_for(PairId(i % 3), len));
        }
        j.append(&records).unwrap();
        j.sync().unwrap();
        let total = j.segments();
        assert!(total >= 8, "{ctx}: {total} segments");
        assert_eq!(segment_files(dir.path()).len(), total, "{ctx}");

        // Primary-style release of pairs 0 and 1, remote-style applied point for pair 2,
        // which lags at half: it alone holds back reclamation.
        let last_seq = |g: &Gen, p: u32| g.history[&PairId(p)].len() as u64;
        let half = last_seq(&g, 2) / 2;
        let marks = vec![
            Record::Released {
                pair: PairId(0),
                stamp: g.stamp_of(PairId(0), last_seq(&g, 0)),
            },
            Record::Released {
                pair: PairId(1),
                stamp: g.stamp_of(PairId(1), last_seq(&g, 1)),
            },
            Record::Applied {
                pair: PairId(2),
                stamp: g.stamp_of(PairId(2), half),
            },
        ];
        j.append(&marks).unwrap();
        records.extend(marks);
        j.sync().unwrap();
        // With space to spare, deletion waits for the next segment's checkpoint (so that
        // no torn tail can take back a watermark a deletion relied on).
        assert_eq!(j.segment_range().0, 1, "{ctx}");
        assert_eq!(j.stats().early_rotations, 0, "{ctx}");
        rotate(&mut j, &mut records);
        let (first, _) = j.segment_range();
        assert!(first > 1, "{ctx}: nothing reclaimed");
        assert!(j.segments() < total, "{ctx}");
        assert_eq!(segment_files(dir.path()).first(), Some(&first), "{ctx}");
        // The oldest remaining segment holds a packet of pair 2 above the applied point.
        let bytes = fs::read(seg_path(dir.path(), first)).unwrap();
        let mut holds_live = false;
        for f in Frames::new(&bytes) {
            if let Ok((_, format::Entry::Record(Record::Packet(p)))) = f {
                holds_live |= p.pair == PairId(2) && p.stamp.seq.0 > half;
            }
        }
        assert!(holds_live, "{ctx}: segment {first} could have been deleted");
        drop(j);
        let (mut j, rec) = open(dir.path(), o);
        check(&rec, &records, &ctx);
        assert_eq!(
            (rec.limit, rec.prepared),
            (Timestamp(500), Timestamp(700)),
            "{ctx}"
        );
        assert_eq!(
            j.pair_state(PairId(0)),
            Some(PairState::Replicating),
            "{ctx}"
        );
        assert_eq!(
            j.pair_state(PairId(7)),
            Some(PairState::Consistent),
            "{ctx}"
        );
        assert_eq!(j.pair_state(PairId(1)), None, "{ctx}");
        assert_eq!(rec.pair(PairId(0)).unwrap().live.len(), 0, "{ctx}");
        assert_eq!(
            rec.pair(PairId(0)).unwrap().last(),
            g.stamp_of(PairId(0), last_seq(&g, 0)),
            "{ctx}: a fully released pair still knows its last stamp"
        );
        assert_eq!(
            rec.pair(PairId(2)).unwrap().live.len() as u64,
            last_seq(&g, 2) - half,
            "{ctx}"
        );

        // Everything applied: only the active segment is left, and it keeps the state.
        let rest = Record::Applied {
            pair: PairId(2),
            stamp: g.stamp_of(PairId(2), last_seq(&g, 2)),
        };
        j.append(std::slice::from_ref(&rest)).unwrap();
        records.push(rest);
        // Once a new segment starts, its checkpoint covers every sealed one: all go.
        rotate(&mut j, &mut records);
        j.sync().unwrap();
        assert_eq!(j.segments(), 1, "{ctx}");
        assert_eq!(segment_files(dir.path()), vec![j.position().0], "{ctx}");
        drop(j);
        let (_, rec) = open(dir.path(), o);
        check(&rec, &records, &ctx);
        assert_eq!(rec.live_packets(), 0, "{ctx}");
        assert_eq!(rec.segments, 1, "{ctx}");
        assert_eq!(rec.prepared, Timestamp(700), "{ctx}");
        let state = |p: u32| rec.pair(PairId(p)).and_then(|p| p.state);
        assert_eq!(state(0), Some(PairState::Replicating), "{ctx}");
        assert_eq!(state(7), Some(PairState::Consistent), "{ctx}");
        assert_eq!(state(1), None, "{ctx}");
        assert_eq!(
            rec.pair(PairId(7)).map(|p| (p.watermark(), p.live.len())),
            Some((Seq::ZERO, 0)),
            "{ctx}: a pair with only a state"
        );
    }
}

#[test]
fn interrupted_reclamation_gap_is_finished_and_a_real_gap_is_an_error() {
    let ctx = "seed 81";
    let dir = tempdir();
    let o = opts(4096, 4 << 20);
    let (mut j, _) = open(dir.path(), o);
    let mut g = Gen::new(81, 2, 0);
    let mut records: Vec<Record> = (0..200)
        .map(|i| {
            let len = g.rng.random_range(50..150);
            g.packet_for(PairId(i % 2), len)
        })
        .collect();
    j.append(&records).unwrap();
    j.sync().unwrap();
    let before = snapshot(dir.path());
    let files = segment_files(dir.path());
    assert!(files.len() >= 5, "{ctx}");

    drop(j);
    // A segment missing from the middle with live packets before it: an error.
    fs::remove_file(seg_path(dir.path(), files[1])).unwrap();
    match Journal::open(dir.path(), o) {
        Err(JournalError::Missing { segment, .. }) => assert_eq!(segment, files[1], "{ctx}"),
        other => panic!("{ctx}: {other:?}"),
    }
    restore(dir.path(), &before);
    let (mut j, _) = open(dir.path(), o);

    // Release everything; the sync deletes every sealed segment.
    let marks: Vec<Record> = [PairId(0), PairId(1)]
        .into_iter()
        .map(|pair| Record::Released {
            pair,
            stamp: *g.history[&pair].last().unwrap(),
        })
        .collect();
    j.append(&marks).unwrap();
    records.extend(marks);
    rotate(&mut j, &mut records);
    assert_eq!(segment_files(dir.path()).len(), 1, "{ctx}");
    drop(j);
    // As if the crash came after some unlinks reached the disk and others did not.
    for &n in &files[..1] {
        let name = format::segment_name(n);
        fs::write(dir.path().join(&name), &before[&name]).unwrap();
    }
    let name = format::segment_name(files[2]);
    fs::write(dir.path().join(&name), &before[&name]).unwrap();
    let (_, rec) = open(dir.path(), o);
    check(&rec, &records, ctx);
    assert_eq!(
        segment_files(dir.path()).len(),
        1,
        "{ctx}: the gap was not cleaned up"
    );
}

#[test]
fn leftover_temp_files_are_removed_and_other_files_ignored() {
    let dir = tempdir();
    let o = opts(4096, 1 << 20);
    let (mut j, _) = open(dir.path(), o);
    let r = Record::Limit { ts: Timestamp(9) };
    j.append(std::slice::from_ref(&r)).unwrap();
    j.sync().unwrap();
    drop(j);
    fs::write(dir.path().join(format::temp_name(2)), b"half a segment").unwrap();
    fs::write(dir.path().join("README"), b"not a segment").unwrap();
    fs::write(dir.path().join("12.seg"), b"not a segment name").unwrap();
    let (_, rec) = open(dir.path(), o);
    check(&rec, &[r], "temp");
    assert!(!dir.path().join(format::temp_name(2)).exists());
    assert!(dir.path().join("README").exists());
    assert_eq!(segment_files(dir.path()), vec![1]);

    // A crash while the very first segment was being created: only its temp file.
    let fresh = tempdir();
    fs::write(fresh.path().join(format::temp_name(1)), b"half").unwrap();
    let (_, rec) = open(fresh.path(), o);
    assert_eq!(rec.segments, 1);
    assert_eq!(segment_files(fresh.path()), vec![1]);
    assert!(!fresh.path().join(format::temp_name(1)).exists());
}

#[test]
fn open_creates_a_missing_directory_and_rejects_bad_options() {
    let dir = tempdir();
    let sub = dir.path().join("a/b/journal");
    let (_, rec) = open(&sub, JournalOptions::default());
    assert_eq!(
        rec,
        Recovered {
            segments: 1,
            ..Default::default()
        }
    );
    assert_eq!(segment_files(&sub), vec![1]);
    for bad in [opts(100, 1 << 20), opts(4096, 8000), opts(2 << 30, 8 << 30)] {
        assert!(matches!(
            Journal::open(dir.path(), bad),
            Err(JournalError::Options(_))
        ));
    }
    let small = JournalOptions::with_capacity(100 << 10);
    assert_eq!(small.segment_size, 50 << 10);
    assert!(Journal::open(&dir.path().join("small"), small).is_ok());
    let d = JournalOptions::default();
    assert_eq!(
        (d.segment_size, d.capacity, d.reserve),
        (16 << 20, 256 << 20, 1 << 20)
    );
}

#[test]
fn arbitrary_damage_never_panics_and_a_successful_open_leaves_a_clean_journal() {
    for seed in seeds(&[91]) {
        let dir = fast_tempdir();
        let o = opts(4096, 1 << 20);
        let mut g = Gen::new(seed, 3, 100);
        build(dir.path(), o, &mut g, 250);
        let base = snapshot(dir.path());
        let names: Vec<String> = base.keys().cloned().collect();
        let mut opened = 0;
        for round in 0..400 {
            let ctx = format!("seed {seed} round {round}");
            restore(dir.path(), &base);
            for _ in 0..g.rng.random_range(1..4) {
                let name = &names[g.rng.random_range(0..names.len())];
                let path = dir.path().join(name);
                let Ok(mut bytes) = fs::read(&path) else {
                    continue;
                };
                match g.rng.random_range(0..7) {
                    0 if !bytes.is_empty() => {
                        let at = g.rng.random_range(0..bytes.len());
                        let n = g.rng.random_range(1..64).min(bytes.len() - at);
                        g.rng.fill(&mut bytes[at..at + n]);
                    }
                    1 => bytes.truncate(g.rng.random_range(0..=bytes.len())),
                    2 => {
                        let mut junk = vec![0u8; g.rng.random_range(1..200)];
                        g.rng.fill(&mut junk[..]);
                        bytes.extend(junk);
                    }
                    3 if !bytes.is_empty() => {
                        for _ in 0..g.rng.random_range(1..8) {
                            let at = g.rng.random_range(0..bytes.len());
                            bytes[at] ^= 1 << g.rng.random_range(0..8);
                        }
                    }
                    4 => {
                        let _ = fs::remove_file(&path);
                        continue;
                    }
                    5 => {
                        // A plausible next segment: a valid header, then junk.
                        let n = segment_files(dir.path()).last().copied().unwrap_or(0) + 1;
                        let mut b = format::encode_header(n).to_vec();
                        let mut junk = vec![0u8; g.rng.random_range(0..300)];
                        g.rng.fill(&mut junk[..]);
                        b.extend(junk);
                        fs::write(seg_path(dir.path(), n), b).unwrap();
                        continue;
                    }
                    _ => {
                        // Zeroes, as a crash can leave in an extended file.
                        let n = g.rng.random_range(1..100);
                        bytes.extend(std::iter::repeat_n(0u8, n));
                    }
                }
                fs::write(&path, &bytes).unwrap();
            }
            let Ok((j, rec)) = Journal::open(dir.path(), o) else {
                continue;
            };
            opened += 1;
            drop(j);
            // The repaired journal reopens clean, to the same state, and takes more.
            let (mut j, again) = Journal::open(dir.path(), o)
                .unwrap_or_else(|e| panic!("{ctx}: reopen after a successful open: {e}"));
            assert_eq!(again.tail, None, "{ctx}");
            let mut first = rec.clone();
            first.tail = None;
            assert!(again == first, "{ctx}: reopen recovered something else");
            j.append(&[g.record(), g.record()]).unwrap();
            j.sync().unwrap();
            drop(j);
            Journal::open(dir.path(), o)
                .unwrap_or_else(|e| panic!("{ctx}: reopen after appending: {e}"));
        }
        assert!(
            opened > 20,
            "seed {seed}: only {opened} damaged journals opened"
        );
    }
}

#[test]
fn on_disk_format_is_pinned() {
    assert_eq!(
        format::encode_header(7)[..28],
        [
            b'T', b'D', b'M', b'K', b'J', b'R', b'N', b'L', 4, 0, 0, 0, 0, 0, 0, 0, 7, 0, 0, 0, 0,
            0, 0, 0, 0, 0, 0, 0
        ]
    );
    let h = format::encode_header(7);
    assert_eq!(
        u32::from_le_bytes([h[28], h[29], h[30], h[31]]),
        crc32c::crc32c(&h[..28])
    );
    let packet = Record::Packet(Packet {
        pair: PairId(3),
        stamp: Stamp::new(Timestamp(300), Seq(2)),
        payload: Payload::Write {
            offset: Offset(4096),
            data: Bytes::from_static(b"hi"),
        },
    });
    let cases: Vec<(Record, Vec<u8>)> = vec![
        // Entry::Record = 1, Record::Packet = 0, pair 3, ts 300, seq 2, Write = 0,
        // offset 4096, 2 bytes "hi" (all varints).
        (
            packet,
            vec![1, 0, 3, 0xac, 0x02, 2, 0, 0x80, 0x20, 2, b'h', b'i'],
        ),
        (
            Record::Released {
                pair: PairId(1),
                stamp: Stamp::new(Timestamp(5), Seq(4)),
            },
            vec![1, 1, 1, 5, 4],
        ),
        (
            Record::Applied {
                pair: PairId(1),
                stamp: Stamp::new(Timestamp(5), Seq(4)),
            },
            vec![1, 2, 1, 5, 4],
        ),
        (Record::Limit { ts: Timestamp(9) }, vec![1, 3, 9]),
        (Record::Prepared { ts: Timestamp(9) }, vec![1, 4, 9]),
        // Record::PairState = 5 (format version 2), pair 1, Inconsistent = 3.
        (
            Record::PairState {
                pair: PairId(1),
                state: PairState::Inconsistent,
            },
            vec![1, 5, 1, 3],
        ),
        // A mark packet: Mark = 2, SyncDone = 1.
        (
            Record::Packet(Packet {
                pair: PairId(3),
                stamp: Stamp::new(Timestamp(300), Seq(2)),
                payload: Payload::Mark(crate::packet::Mark::SyncDone),
            }),
            vec![1, 0, 3, 0xac, 0x02, 2, 2, 1],
        ),
        // Format version 3: Record::Reserve = 6, pair 1, seq 9; Record::Epoch = 7,
        // Some = 1, base 5, closes_at None = 0 / Some = 1, 8; None = 0.
        (
            Record::Reserve {
                pair: PairId(1),
                seq: Seq(9),
            },
            vec![1, 6, 1, 9],
        ),
        (
            Record::Epoch(Some(crate::journal::Epoch {
                base: Timestamp(5),
                closes_at: None,
            })),
            vec![1, 7, 1, 5, 0],
        ),
        (
            Record::Epoch(Some(crate::journal::Epoch {
                base: Timestamp(5),
                closes_at: Some(Timestamp(8)),
            })),
            vec![1, 7, 1, 5, 1, 8],
        ),
        (Record::Epoch(None), vec![1, 7, 0]),
        // Format version 4: Record::Logged = 8, pair 1, stamp (ts 300, seq 2), offset
        // 4096, len 512.
        (
            Record::Logged(crate::journal::Logged {
                pair: PairId(1),
                stamp: Stamp::new(Timestamp(300), Seq(2)),
                offset: Offset(4096),
                len: 512,
            }),
            vec![1, 8, 1, 0xac, 0x02, 2, 0x80, 0x20, 0x80, 0x04],
        ),
        // Primary states of format version 3: Tracking = 4, Resyncing = 5.
        (
            Record::PairState {
                pair: PairId(1),
                state: PairState::Resyncing,
            },
            vec![1, 5, 1, 5],
        ),
    ];
    for (record, body) in cases {
        let mut out = Vec::new();
        let len = format::encode_frame(&mut out, &format::EntryRef::Record(&record)).unwrap();
        assert_eq!(len, 8 + body.len());
        let mut want = (body.len() as u32).to_le_bytes().to_vec();
        let crc = crc32c::crc32c_append(crc32c::crc32c(&want), &body);
        want.extend_from_slice(&crc.to_le_bytes());
        want.extend_from_slice(&body);
        assert_eq!(out, want, "{record:?}");
        let (entry, n) = format::decode_frame(&out).unwrap();
        assert_eq!(n, out.len());
        assert!(matches!(entry, format::Entry::Record(r) if r == record));
    }
    // A checkpoint: Entry::Checkpoint = 0, previous segment 300 bytes, released
    // {1: (5, 4)}, applied {}, limit 6, prepared 7, states {2: Syncing = 0},
    // reserved {} and epoch None (version 3).
    let mut st = State::default();
    st.released
        .insert(PairId(1), Stamp::new(Timestamp(5), Seq(4)));
    st.limit = Timestamp(6);
    st.prepared = Timestamp(7);
    st.states.insert(PairId(2), PairState::Syncing);
    let mut out = Vec::new();
    let cp = format::CheckpointRef {
        prev_len: 300,
        state: &st,
    };
    format::encode_frame(&mut out, &format::EntryRef::Checkpoint(cp)).unwrap();
    assert_eq!(
        &out[8..],
        &[0, 0xac, 0x02, 1, 1, 5, 4, 0, 6, 7, 1, 2, 0, 0, 0]
    );
    let (entry, _) = format::decode_frame(&out).unwrap();
    assert!(matches!(entry, format::Entry::Checkpoint(c) if c.prev_len == 300 && c.state == st));
    // With a reservation and an epoch: reserved {1: 9}, Some(base 5, closes_at None).
    let mut st3 = st.clone();
    st3.reserved.insert(PairId(1), Seq(9));
    st3.epoch = Some(crate::journal::Epoch {
        base: Timestamp(5),
        closes_at: None,
    });
    let mut out3 = Vec::new();
    let cp = format::CheckpointRef {
        prev_len: 300,
        state: &st3,
    };
    format::encode_frame(&mut out3, &format::EntryRef::Checkpoint(cp)).unwrap();
    assert_eq!(
        &out3[8..],
        &[0, 0xac, 0x02, 1, 1, 5, 4, 0, 6, 7, 1, 2, 0, 1, 1, 9, 1, 5, 0]
    );
    let (entry, _) = format::decode_frame(&out3).unwrap();
    assert!(matches!(entry, format::Entry::Checkpoint(c) if c.state == st3));
    // Format version 2 (as that build wrote it): the checkpoint ends after the states
    // and reads as one with nothing reserved and no epoch.
    let mut v2 = Vec::new();
    let body: &[u8] = &[0, 0xac, 0x02, 1, 1, 5, 4, 0, 6, 7, 1, 2, 0];
    v2.extend_from_slice(&(body.len() as u32).to_le_bytes());
    let crc = crc32c::crc32c_append(crc32c::crc32c(&v2), body);
    v2.extend_from_slice(&crc.to_le_bytes());
    v2.extend_from_slice(body);
    let (entry, _) = format::decode_frame_version(&v2, 2).unwrap();
    assert!(matches!(entry, format::Entry::Checkpoint(c) if c.state == st));
    // A version-3 checkpoint in a version-2 segment is not one (trailing bytes).
    assert!(format::decode_frame_version(&out3, 2).is_err());

    // Format version 1 (pinned as that build wrote it): the same checkpoint without
    // states reads as one whose pairs have none; its records read as in version 2.
    let v1 = format::segment_start_v1(7, 0, 300, &st);
    assert_eq!(&v1[..HEADER_LEN], &format::encode_header_version(7, 0, 1));
    assert_eq!(v1[8], 1, "version 1 in the header");
    assert_eq!(&v1[HEADER_LEN + 8..], &[0, 0xac, 0x02, 1, 1, 5, 4, 0, 6, 7]);
    assert_eq!(format::check_header(&v1, 7), Ok(0));
    assert_eq!(format::header_version(&v1), 1);
    let mut frames = Frames::new(&v1);
    let Some(Ok((_, format::Entry::Checkpoint(c)))) = frames.next() else {
        panic!("the version-1 checkpoint does not decode");
    };
    let mut without = st.clone();
    without.states.clear();
    assert_eq!((c.prev_len, c.state), (300, without));
    assert!(frames.next().is_none());
    // A version-2 checkpoint in a version-1 segment is not one (trailing bytes).
    assert!(format::decode_frame_version(&out, 1).is_err());
    // A version-3 segment (as that build wrote it) decodes as version 4: a version-3
    // checkpoint and records read the same.
    let (entry, _) = format::decode_frame_version(&out3, 3).unwrap();
    assert!(matches!(entry, format::Entry::Checkpoint(c) if c.state == st3));
    assert_eq!(
        format::check_header(&format::encode_header_version(7, 0, 3), 7),
        Ok(0)
    );
    // Versions other than 1 to 4 are refused.
    for v in [0, 5, u32::MAX] {
        let h = format::encode_header_version(7, 0, v);
        assert_eq!(
            format::check_header(&h, 7),
            Err(format::HeaderError::Version(v))
        );
    }
}

use proptest::collection::vec as any_vec;
use proptest::prelude::any;

proptest::proptest! {
    /// Any bytes after a valid header: frames decode or stop with an error; no panic.
    #[test]
    fn frames_of_arbitrary_bytes_never_panic(body in any_vec(any::<u8>(), 0..600)) {
        let mut bytes = format::encode_header(1).to_vec();
        bytes.extend_from_slice(&body);
        for f in Frames::new(&bytes) {
            let _ = f;
        }
        let _ = format::check_header(&body, 1);
    }

    /// A frame whose checksum is right but whose body is garbage is rejected cleanly.
    #[test]
    fn garbage_with_a_valid_checksum_never_panics(body in any_vec(any::<u8>(), 1..300)) {
        let mut bytes = (body.len() as u32).to_le_bytes().to_vec();
        let crc = crc32c::crc32c_append(crc32c::crc32c(&bytes), &body);
        bytes.extend_from_slice(&crc.to_le_bytes());
        bytes.extend_from_slice(&body);
        let _ = format::decode_frame(&bytes);
    }
}

/// Throughput of append + sync for 4 KiB packets in batches of 64, against a plain file
/// written and fdatasync'd in the same chunks. Prints; asserts nothing about time.
/// `cargo test --release -p tidemark --lib journal::tests::throughput -- --ignored
/// --nocapture`
#[test]
#[ignore]
fn throughput_4k_packets_batches_of_64() {
    use std::time::Instant;
    let dir = tempdir();
    // 200 MiB through the default journal (256 MiB in 16 MiB segments), so segments
    // rotate and are deleted as the releases cover them.
    let batches = 800;
    let o = JournalOptions::default();
    let (mut j, _) = open(dir.path(), o);
    let data = Bytes::from(vec![0xa5u8; 4096]);
    let mut seq = 0u64;
    let mut append_time = std::time::Duration::ZERO;
    let mut batch = Vec::with_capacity(64);
    let t0 = Instant::now();
    for b in 0..batches {
        batch.clear();
        for _ in 0..64 {
            seq += 1;
            batch.push(Record::Packet(Packet {
                pair: PairId(0),
                stamp: Stamp::new(Timestamp(seq), Seq(seq)),
                payload: Payload::Write {
                    offset: Offset(seq * 4096),
                    data: data.clone(),
                },
            }));
        }
        if b > 0 {
            // Release the batch before this one, as acknowledgements would.
            let upto = seq - 64;
            batch.push(Record::Released {
                pair: PairId(0),
                stamp: Stamp::new(Timestamp(upto), Seq(upto)),
            });
        }
        let ta = Instant::now();
        j.append(&batch).unwrap();
        append_time += ta.elapsed();
        j.sync().unwrap();
    }
    let el = t0.elapsed();
    let bytes = (batches * 64 * 4096) as f64;
    let stats = j.stats();

    // The same bytes, written and fdatasync'd per batch to a plain file.
    let path = dir.path().join("plain");
    let f = File::create(&path).unwrap();
    let chunk = vec![0xa5u8; 64 * 4096];
    let t1 = Instant::now();
    for b in 0..batches {
        f.write_all_at(&chunk, (b * chunk.len()) as u64).unwrap();
        f.sync_data().unwrap();
    }
    let plain = t1.elapsed();
    println!(
        "journal: {batches} batches of 64 x 4 KiB in {:.2?}: {:.1} MiB/s, {:.0} syncs/s, \
         {:.1} us/batch appending ({:.2} GiB/s memcpy+crc), {} segments created, {} deleted",
        el,
        bytes / el.as_secs_f64() / (1 << 20) as f64,
        batches as f64 / el.as_secs_f64(),
        append_time.as_secs_f64() * 1e6 / batches as f64,
        bytes / append_time.as_secs_f64() / (1u64 << 30) as f64,
        stats.segments_created,
        stats.segments_deleted,
    );
    println!(
        "plain file, same chunks, write+fdatasync: {:.2?}: {:.1} MiB/s (journal/plain = {:.2})",
        plain,
        bytes / plain.as_secs_f64() / (1 << 20) as f64,
        plain.as_secs_f64() / el.as_secs_f64()
    );
}

/// Segments sealed by `write` alone are not synced: a power loss may tear any of them
/// (whole pages missing, garbage). Recovery cuts at the first bad frame after the last
/// sync, keeps every record before it (every synced one among them), drops every record
/// after it (their checkpoints still count), and leaves a journal that reopens clean and
/// keeps working. Damage before the last sync is still corruption.
#[test]
fn power_loss_tearing_segments_sealed_unsynced_cuts_at_the_first_tear() {
    for seed in seeds(&[61, 62, 63]) {
        let ctx = format!("seed {seed}");
        let dir = fast_tempdir();
        let o = opts(4096, 1 << 20);
        let mut g = Gen::new(seed, 3, 80);
        let (mut j, _) = open(dir.path(), o);
        let mut records = Vec::new();
        let mut ends = Vec::new();
        let mut push = |j: &mut Journal, r: Record, ends: &mut Vec<(u64, u64)>| {
            j.append(std::slice::from_ref(&r)).unwrap();
            records.push(r);
            ends.push(j.position());
            j.write().unwrap();
        };
        // Synced: watermarks and limits too, sealed by write, then one sync.
        for _ in 0..120 {
            let r = g.record();
            push(&mut j, r, &mut ends);
        }
        j.sync().unwrap();
        let sync_seg = j.position().0;
        let synced_files = segment_files(dir.path());
        // Written only: packets (their checkpoints then hold what the sync did), over
        // several segments sealed unsynced.
        while j.position().0 < sync_seg + 4 {
            let r = g.packet();
            push(&mut j, r, &mut ends);
        }
        let syncs = j.stats().syncs;
        drop(j);
        let synced = ends.iter().filter(|(s, _)| *s < sync_seg).count();
        assert_eq!(syncs, 1, "{ctx}: write alone must not sync");
        let snap = snapshot(dir.path());
        let files = segment_files(dir.path());
        let last = *files.last().unwrap();
        let (mut tears, mut corrupt) = (0, 0);
        for round in 0..45 {
            restore(dir.path(), &snap);
            let before_sync = round % 5 == 4;
            let pool: Vec<u64> = if before_sync {
                synced_files
                    .iter()
                    .copied()
                    .filter(|&n| n < sync_seg && files.contains(&n))
                    .collect()
            } else {
                files
                    .iter()
                    .copied()
                    .filter(|&n| n >= sync_seg && n < last)
                    .collect()
            };
            let Some(&segno) = pool.get(g.rng.random_range(0..pool.len().max(1))) else {
                continue;
            };
            let path = seg_path(dir.path(), segno);
            let bytes = snap[&format::segment_name(segno)].clone();
            let frames = frames_of(&bytes);
            if frames.len() < 2 {
                continue;
            }
            let (at, len) = frames[g.rng.random_range(1..frames.len())];
            let mut bad = bytes.clone();
            let what = if round % 2 == 0 {
                let byte = at + g.rng.random_range(0..len);
                bad[byte as usize] ^= 1 << g.rng.random_range(0..8);
                format!("flip at {byte}")
            } else {
                let cut = at + g.rng.random_range(0..len);
                bad.truncate(cut as usize);
                format!("cut at {cut}")
            };
            let ctx = format!("{ctx} round {round} segment {segno}: {what}");
            fs::write(&path, &bad).unwrap();
            if before_sync {
                match Journal::open(dir.path(), o) {
                    Err(JournalError::Corrupt { segment, .. }) => {
                        assert_eq!(segment, segno, "{ctx}")
                    }
                    Err(e) => panic!("{ctx}: {e}"),
                    Ok((_, rec)) => panic!("{ctx}: synced damage opened, tail {:?}", rec.tail),
                }
                corrupt += 1;
                continue;
            }
            let (j, rec) = Journal::open(dir.path(), o).unwrap_or_else(|e| panic!("{ctx}: {e}"));
            let k = ends
                .iter()
                .filter(|(s, e)| *s < segno || (*s == segno && *e <= at))
                .count();
            assert!(k >= synced, "{ctx}: the damage reached synced records");
            check(&rec, &records[..k], &ctx);
            let t = rec
                .tail
                .as_ref()
                .unwrap_or_else(|| panic!("{ctx}: no tail"));
            assert_eq!((t.segment, t.offset), (segno, at), "{ctx}");
            tears += 1;
            drop(j);
            // Repaired for good: a reopen finds nothing to cut and the same records...
            let (mut j, again) = open(dir.path(), o);
            assert_eq!(again.tail, None, "{ctx}: reopen");
            check(&again, &records[..k], &format!("{ctx}: reopen"));
            // ...and it keeps working, through a sync (which starts a strict segment).
            let mut expect = records[..k].to_vec();
            let more = Record::Limit {
                ts: Timestamp(g.ts + 1),
            };
            j.append(std::slice::from_ref(&more)).unwrap();
            expect.push(more);
            j.sync().unwrap();
            drop(j);
            let (_, rec) = open(dir.path(), o);
            assert_eq!(rec.tail, None, "{ctx}: after more");
            check(&rec, &expect, &format!("{ctx}: after more"));
        }
        assert!(
            tears >= 20 && corrupt >= 5,
            "{ctx}: {tears} tears, {corrupt} corrupt"
        );
    }
}

/// A packet of `pair` at `seq` with `len` bytes of data.
fn packet_of(pair: u32, seq: u64, len: usize) -> Record {
    Record::Packet(Packet {
        pair: PairId(pair),
        stamp: Stamp::new(Timestamp(seq * 10 + pair as u64), Seq(seq)),
        payload: Payload::Write {
            offset: Offset(seq * 512),
            data: Bytes::from(vec![seq as u8; len]),
        },
    })
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]

    /// A journal filled to capacity with packets, whose acknowledgements then arrive in
    /// any order and in any steps (each a watermark-only batch, as the primary writes
    /// them when the journal is full), while pair 0, whose packet is oldest, is
    /// acknowledged last and pins every segment: every watermark is taken (in frames, in
    /// the reserve, or folded into the state past it) and, once written, the journal
    /// takes packets again; a reopen recovers the final watermarks and nothing released.
    /// Pair states recorded in between, each on its own as a primary or remote would,
    /// are never refused either, and the latest of each pair is recovered (pairs 5 and
    /// up have nothing but states).
    #[test]
    fn a_full_journal_takes_the_watermarks_that_free_it(
        seg_kib in 4u64..32,
        segments in 2u64..6,
        reserve in 0u64..2048,
        pairs in 2u32..5,
        len in 8usize..400,
        acks in any_vec((1u32..5, 1u64..6), 1..400),
        sync_each in any::<bool>(),
        states in any_vec((0u32..7, 0usize..4), 0..60),
    ) {
        const STATES: [PairState; 4] = [
            PairState::Syncing,
            PairState::Replicating,
            PairState::Consistent,
            PairState::Inconsistent,
        ];
        let mut latest: BTreeMap<PairId, PairState> = BTreeMap::new();
        let mut states = states.into_iter();
        let dir = fast_tempdir();
        let o = JournalOptions { segment_size: seg_kib << 10, capacity: (seg_kib << 10) * segments, reserve };
        let (mut j, _) = open(dir.path(), o);
        // Fill: packets round-robin over the pairs until the journal refuses one.
        let mut last = vec![0u64; pairs as usize];
        for i in 0u64.. {
            let p = (i % pairs as u64) as u32;
            match j.append(&[packet_of(p, last[p as usize] + 1, len)]) {
                Ok(()) => last[p as usize] += 1,
                Err(JournalError::Full { .. }) => break,
                Err(e) => panic!("fill: {e}"),
            }
            j.write().unwrap();
        }
        // Acknowledgements, each recorded on its own; never refused. Pair 0 comes last.
        let stamp = |p: u32, seq: u64| Stamp::new(Timestamp(seq * 10 + p as u64), Seq(seq));
        let mut released = vec![0u64; pairs as usize];
        let steps = acks
            .iter()
            .map(|&(p, n)| (1 + p % (pairs - 1), n))
            .chain((0..pairs).rev().map(|p| (p, u64::MAX)));
        for (p, n) in steps {
            if let Some((sp, si)) = states.next() {
                let rec = Record::PairState { pair: PairId(sp), state: STATES[si] };
                j.append(&[rec]).unwrap_or_else(|e| panic!("state of pair {sp} refused: {e}"));
                latest.insert(PairId(sp), STATES[si]);
            }
            let seq = released[p as usize].saturating_add(n).min(last[p as usize]);
            if seq == released[p as usize] {
                continue;
            }
            released[p as usize] = seq;
            let rec = Record::Released { pair: PairId(p), stamp: stamp(p, seq) };
            j.append(&[rec]).unwrap_or_else(|e| panic!("watermark of pair {p} to {seq} refused: {e}"));
            if sync_each { j.sync().unwrap() } else { j.write().unwrap() }
        }
        // Everything is released: once the watermarks are written, packets fit again.
        j.sync().unwrap();
        j.append(&[packet_of(0, last[0] + 1, len)]).unwrap_or_else(|e| panic!("after release: {e}"));
        j.sync().unwrap();
        drop(j);
        let (reopened, r) = open(dir.path(), o);
        for p in 0..pairs {
            let rp = &r.pairs[&PairId(p)];
            proptest::prop_assert_eq!(rp.released, stamp(p, last[p as usize]));
            let live: Vec<u64> = rp.live.iter().map(|q| q.stamp.seq.0).collect();
            let want = if p == 0 { vec![last[0] + 1] } else { vec![] };
            proptest::prop_assert_eq!(live, want);
        }
        for p in 0..7 {
            let got = r.pairs.get(&PairId(p)).and_then(|rp| rp.state);
            proptest::prop_assert_eq!(got, latest.get(&PairId(p)).copied(), "pair {}", p);
            proptest::prop_assert_eq!(reopened.pair_state(PairId(p)), got);
        }
    }
}

/// A journal an older build wrote (format version 1: checkpoints without pair states)
/// opens: its records are recovered as they were, no pair has a state, and its segments
/// stay as they are (a torn tail is cut as ever); appends go to a new segment of version
/// 2, so a build that only knows version 1 refuses the journal by its header rather than
/// misreading a record it cannot decode as a torn tail.
#[test]
fn a_version_1_journal_is_read_and_continued_in_a_new_segment() {
    let dir = tempdir();
    let o = opts(4096, 1 << 20);
    let mut g = Gen::new(81, 3, 0);
    let mut records = Vec::new();
    let mut state = State::default();
    let mut prev_len = 0;
    let mut seg2_start = 0;
    for segno in 1..=2u64 {
        let mut bytes = format::segment_start_v1(segno, 0, prev_len, &state);
        seg2_start = bytes.len();
        let mut batch: Vec<Record> = (0..12).map(|i| g.packet_for(PairId(i % 3), 50)).collect();
        if segno == 1 {
            batch.push(Record::Limit { ts: Timestamp(40) });
        } else {
            batch.push(Record::Released {
                pair: PairId(0),
                stamp: g.stamp_of(PairId(0), 2),
            });
            batch.push(Record::Applied {
                pair: PairId(1),
                stamp: g.stamp_of(PairId(1), 1),
            });
            batch.push(Record::Prepared { ts: Timestamp(30) });
        }
        for r in batch {
            format::encode_frame(&mut bytes, &format::EntryRef::Record(&r)).unwrap();
            state.apply(&r);
            records.push(r);
        }
        prev_len = bytes.len() as u64;
        fs::write(seg_path(dir.path(), segno), &bytes).unwrap();
    }
    let before = snapshot(dir.path());

    for torn in [false, true] {
        let ctx = if torn { "torn version 1" } else { "version 1" };
        restore(dir.path(), &before);
        let mut records = records.clone();
        if torn {
            // The last record of segment 2 torn by a crash.
            let bytes = &before[&format::segment_name(2)];
            let last = *frames_of(bytes).last().unwrap();
            fs::write(seg_path(dir.path(), 2), &bytes[..(last.0 + 3) as usize]).unwrap();
            records.pop();
        }
        let (mut j, rec) = open(dir.path(), o);
        check(&rec, &records, ctx);
        assert_eq!(rec.tail.is_some(), torn, "{ctx}");
        assert!(rec.pairs.values().all(|p| p.state.is_none()), "{ctx}");
        assert_eq!(rec.segments, 3, "{ctx}");
        assert_eq!(segment_files(dir.path()), vec![1, 2, 3], "{ctx}");
        let one = format::segment_name(1);
        assert_eq!(
            fs::read(dir.path().join(&one)).unwrap(),
            before[&one],
            "{ctx}"
        );
        let two = fs::read(seg_path(dir.path(), 2)).unwrap();
        assert!(before[&format::segment_name(2)].starts_with(&two), "{ctx}");
        assert!(two.len() > seg2_start, "{ctx}");
        let head = fs::read(seg_path(dir.path(), 3)).unwrap();
        assert_eq!(format::check_header(&head, 3), Ok(0), "{ctx}");
        assert_eq!(format::header_version(&head), FORMAT_VERSION, "{ctx}");
        assert_eq!(j.position().0, 3, "{ctx}");
        // New records, pair states among them, go to segment 3.
        let more = vec![
            Record::PairState {
                pair: PairId(0),
                state: PairState::Syncing,
            },
            g.packet_for(PairId(2), 10),
            Record::PairState {
                pair: PairId(5),
                state: PairState::Inconsistent,
            },
        ];
        j.append(&more).unwrap();
        j.sync().unwrap();
        records.extend(more);
        assert_eq!(j.position().0, 3, "{ctx}");
        drop(j);
        let (j, rec) = open(dir.path(), o);
        check(&rec, &records, &format!("{ctx}, continued"));
        assert_eq!(
            rec.segments, 3,
            "{ctx}: the last segment is of this version"
        );
        assert_eq!(
            j.pair_state(PairId(5)),
            Some(PairState::Inconsistent),
            "{ctx}"
        );
        g.history.get_mut(&PairId(2)).unwrap().pop();
    }
}

#[test]
fn a_segment_number_near_the_top_is_refused_not_overflowed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let name = format!("{:020}.seg", u64::MAX);
    std::fs::write(dir.path().join(&name), format::encode_header(u64::MAX)).expect("write");
    match Journal::open(dir.path(), JournalOptions::default()) {
        Err(JournalError::Corrupt { segment, .. }) => assert_eq!(segment, u64::MAX),
        Err(e) => panic!("{name}: {e}"),
        Ok(_) => panic!("{name} was accepted"),
    }
    // Nothing was changed.
    assert!(dir.path().join(&name).exists());
}

/// Gives back the sequence numbers of the packets of a batch the journal refused (the
/// caller hands them out again, as a primary does).
fn give_back(g: &mut Gen, batch: &[Record]) {
    for r in batch.iter().rev() {
        if let Record::Packet(p) = r {
            if let Some(h) = g.history.get_mut(&p.pair) {
                h.pop();
            }
        }
    }
}

/// A file system that fills up: writes and segment creations fail with ENOSPC at
/// random (seeded). Every refused batch is rolled back exactly (nothing of it is
/// recovered, even after its sequence numbers were handed out again with other data),
/// the journal takes the next batch, and recovery after any number of rollbacks returns
/// exactly the batches that were accepted.
#[test]
fn a_full_file_system_rolls_the_batch_back_and_the_journal_goes_on() {
    use std::sync::atomic::{AtomicU64, Ordering as O};
    use std::sync::Arc;
    for seed in seeds(&[11, 12, 13, 14]) {
        println!("seed {seed}");
        let ctx = format!("seed {seed}");
        let dir = fast_tempdir();
        let o = opts(8 << 10, 256 << 10);
        let (mut j, _) = open(dir.path(), o);
        // One draw per operation from a seeded counter: the hook fails about one write
        // or creation in four while `full` is set.
        let full = Arc::new(AtomicU64::new(0));
        let draws = Arc::new(AtomicU64::new(seed));
        let hook: fault::FaultHook = {
            let (full, draws) = (full.clone(), draws.clone());
            Arc::new(move |op, _path: &Path| {
                let n = draws.fetch_add(0x9e37_79b9_7f4a_7c15, O::Relaxed);
                let roll = (n.wrapping_mul(0xbf58_476d_1ce4_e5b9) >> 60) < 4;
                (full.load(O::Relaxed) == 1 && op != fault::IoOp::Sync && roll)
                    .then(|| io::Error::from_raw_os_error(libc::ENOSPC))
            })
        };
        let _guard = fault::inject(dir.path(), hook);
        let mut g = Gen::new(seed, 3, 700);
        let mut records = Vec::new();
        let (mut refused, mut accepted) = (0, 0);
        for step in 0..400 {
            full.store(u64::from(g.rng.random_bool(0.5)), O::Relaxed);
            let n = g.rng.random_range(1..6);
            let batch: Vec<Record> = (0..n).map(|_| g.record()).collect();
            let sync = g.rng.random_bool(0.2);
            match j.append_and_write(&batch, sync) {
                Ok(()) => {
                    accepted += 1;
                    records.extend(batch);
                }
                Err(e) if e.is_no_space() => {
                    refused += 1;
                    give_back(&mut g, &batch);
                    assert!(!j.is_failed(), "{ctx} step {step}: failed after a rollback");
                }
                Err(JournalError::Full { .. }) => {
                    give_back(&mut g, &batch);
                    full.store(0, O::Relaxed);
                    // The remote acknowledged everything: release every pair.
                    let wm: Vec<Record> = g
                        .history
                        .iter()
                        .filter_map(|(p, h)| {
                            h.last().map(|s| Record::Released {
                                pair: *p,
                                stamp: *s,
                            })
                        })
                        .collect();
                    j.append_and_write(&wm, true).expect("a watermark");
                    records.extend(wm);
                }
                Err(e) => panic!("{ctx} step {step}: {e}"),
            }
            if g.rng.random_bool(0.05) {
                // A crash of the process (written records survive it).
                full.store(0, O::Relaxed);
                drop(j);
                let (j2, rec) = open(dir.path(), o);
                check(&rec, &records, &format!("{ctx} step {step}"));
                j = j2;
            }
        }
        full.store(0, O::Relaxed);
        j.sync().expect("sync");
        drop(j);
        let (_, rec) = open(dir.path(), o);
        check(&rec, &records, &ctx);
        assert!(
            refused > 20 && accepted > 100,
            "{ctx}: {refused} refused, {accepted} accepted"
        );
        println!("{ctx}: {refused} batches refused and rolled back, {accepted} accepted");
    }
}

/// A failed fsync fails the journal even when its error is ENOSPC: after a failed
/// fsync nothing written can be trusted (the kernel may have dropped the pages).
#[test]
fn a_failed_fsync_fails_the_journal_whatever_its_errno() {
    use std::sync::Arc;
    let dir = tempdir();
    let (mut j, _) = open(dir.path(), opts(8 << 10, 256 << 10));
    let mut g = Gen::new(7, 1, 100);
    let hook: fault::FaultHook = Arc::new(|op, _: &Path| {
        (op == fault::IoOp::Sync).then(|| io::Error::from_raw_os_error(libc::ENOSPC))
    });
    let guard = fault::inject(dir.path(), hook);
    j.append_and_write(&[g.packet()], false)
        .expect("written, not synced");
    let err = j.sync().expect_err("fsync fails");
    assert!(matches!(err, JournalError::Sync { .. }), "{err}");
    assert!(j.is_failed());
    drop(guard);
    assert!(matches!(
        j.append_and_write(&[g.packet()], false),
        Err(JournalError::Failed)
    ));
}
