//! Initial sync of a local unit: the whole unit, copied to the remote through the
//! ordered path while clients keep writing.
//!
//! The copy walks the unit front to back. An allocated extent is read in pieces, each on
//! the unit's lane at its place in stamp order, so a piece holds exactly the writes
//! stamped before it and none stamped after (it ships as an ordinary packet, and later
//! writes to the same bytes follow it in `seq` order). A hole ships as one zero-range
//! packet without a read. A `SyncBegin` mark goes before the first piece and a
//! `SyncDone` mark after the last: the remote records its unit inconsistent in between.
//!
//! A hole is where the unit held no data when the copy was planned, so it ships as
//! zeros without a read — which is right only for bytes no write stamped before the hole
//! piece touched. A client write stamped while the copy runs therefore turns the parts
//! of the holes not yet shipped that it overlaps (rounded out to [`GRAIN`]) into data,
//! read at their place like any other ([`InitialSync::written`]). The pieces are taken
//! from the plan only when they are stamped ([`InitialSync::next_piece`]), so a write
//! stamped before a piece in the same batch counts too. Pieces of the copy are never
//! written back to the local unit: it is their source.
//!
//! The copy is finite: client writes during it are shipped in order and only ever turn
//! hole into data ahead of the walk (never add bytes behind it), so it converges whatever
//! the clients' rate (they share the window with it).

use crate::msg::SyncStats;
use std::collections::BTreeMap;
use tidemark::Offset;

/// A write into a hole not yet shipped turns that much of it, aligned, into data: few
/// and larger pieces rather than one per small write.
pub const GRAIN: u64 = 64 << 10;

/// One step of the copy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Piece {
    /// Read these bytes of the unit (on the lane) and ship them.
    Data { offset: Offset, len: u64 },
    /// Ship these bytes as zeros (a hole of the local unit: nothing to read).
    Hole { offset: Offset, len: u64 },
}

/// What is left to copy, and how far the copy got.
#[derive(Debug)]
pub struct InitialSync {
    /// What is left, by offset: the pieces tile `[walk position, size)`.
    todo: BTreeMap<u64, Piece>,
    size: u64,
    chunk: u64,
    /// Bytes of data to read in all: the allocated extents, and the holes that client
    /// writes turned into data ([`InitialSync::written`]).
    pub total: u64,
    /// Bytes of data read and handed to the lane so far.
    pub issued: u64,
    /// The `SyncBegin` mark was stamped.
    pub begun: bool,
    /// Every piece was handed out and the `SyncDone` mark queued: nothing is left to copy.
    pub finished: bool,
}

impl InitialSync {
    /// A copy of a unit of `size` bytes whose data lies in `extents` (sorted, not
    /// overlapping, within the unit), read in pieces of at most `chunk` bytes.
    pub fn new(size: u64, extents: &[(Offset, u64)], chunk: u64) -> Self {
        let mut todo = Vec::new();
        let mut at = 0;
        let mut total = 0;
        for &(Offset(start), len) in extents {
            let end = start.saturating_add(len).min(size);
            if end <= start.max(at) {
                continue;
            }
            let start = start.max(at);
            if start > at {
                todo.push(Piece::Hole {
                    offset: Offset(at),
                    len: start - at,
                });
            }
            todo.push(Piece::Data {
                offset: Offset(start),
                len: end - start,
            });
            total += end - start;
            at = end;
        }
        if at < size {
            todo.push(Piece::Hole {
                offset: Offset(at),
                len: size - at,
            });
        }
        InitialSync {
            todo: todo.into_iter().map(|p| (start_of(&p), p)).collect(),
            size,
            chunk: chunk.max(1),
            total,
            issued: 0,
            begun: false,
            finished: false,
        }
    }

    /// The next piece to ship, front to back: data at most `chunk` bytes long, a hole
    /// whole. `None` once everything was handed out.
    pub fn next_piece(&mut self) -> Option<Piece> {
        let (_, piece) = self.todo.pop_first()?;
        match piece {
            Piece::Data { offset, len } if len > self.chunk => {
                let rest = offset.0 + self.chunk;
                self.todo.insert(
                    rest,
                    Piece::Data {
                        offset: Offset(rest),
                        len: len - self.chunk,
                    },
                );
                self.issued += self.chunk;
                Some(Piece::Data {
                    offset,
                    len: self.chunk,
                })
            }
            Piece::Data { len, .. } => {
                self.issued += len;
                Some(piece)
            }
            hole => Some(hole),
        }
    }

    /// A copy of the dirty regions `dirty` (sorted, not overlapping) of a unit of `size`
    /// bytes whose data lies in `extents`: a resync. The dirty bytes in allocated
    /// extents are read; those in holes ship as zeros (the remote may hold data there
    /// that the local unit lost or trimmed). Bytes outside `dirty` are not copied.
    pub fn regions(
        size: u64,
        dirty: &[(Offset, u64)],
        extents: &[(Offset, u64)],
        chunk: u64,
    ) -> Self {
        let mut s = InitialSync {
            todo: BTreeMap::new(),
            size,
            chunk: chunk.max(1),
            total: 0,
            issued: 0,
            begun: false,
            finished: false,
        };
        s.add(dirty, extents);
        s
    }

    /// Adds the dirty regions `dirty` (with the unit's data in `extents`) to what is left
    /// to copy, wherever the walk stands: bytes already planned stay as planned, the rest
    /// become data (in an extent) or hole pieces. A copy that was finished is not any
    /// more if something was added.
    pub fn add(&mut self, dirty: &[(Offset, u64)], extents: &[(Offset, u64)]) {
        let mut added = false;
        for piece in intersect(dirty, extents, self.size) {
            for part in self.uncovered(piece) {
                if let Piece::Data { len, .. } = part {
                    self.total += len;
                }
                self.todo.insert(start_of(&part), part);
                added = true;
            }
        }
        if added {
            self.finished = false;
            self.merge_data(0, self.size);
        }
    }

    /// Gives a piece taken with [`InitialSync::next_piece`] back (it was never shipped:
    /// the batch that took it was given up): it is copied again.
    pub fn put_back(&mut self, piece: Piece) {
        for part in self.uncovered(piece) {
            if let Piece::Data { len, .. } = part {
                self.issued = self.issued.saturating_sub(len);
            }
            self.todo.insert(start_of(&part), part);
        }
        self.finished = false;
        self.merge_data(0, self.size);
    }

    /// The parts of `piece` no planned piece covers, as pieces of its kind.
    fn uncovered(&self, piece: Piece) -> Vec<Piece> {
        let (mut at, end) = (start_of(&piece), end_of(&piece));
        let mut out = Vec::new();
        let before = self
            .todo
            .range(..at)
            .next_back()
            .filter(|(_, p)| end_of(p) > at)
            .map(|(_, p)| *p);
        for p in before
            .into_iter()
            .chain(self.todo.range(at..end).map(|(_, p)| *p))
        {
            let (ps, pe) = (start_of(&p), end_of(&p));
            if ps > at {
                out.push(with_range(piece, at, ps.min(end)));
            }
            at = at.max(pe);
            if at >= end {
                break;
            }
        }
        if at < end {
            out.push(with_range(piece, at, end));
        }
        out
    }

    /// Whether a piece is left: [`InitialSync::next_piece`] will give one.
    pub fn has_next(&self) -> bool {
        !self.todo.is_empty()
    }

    /// A client write of `len` bytes at `offset` is being stamped: the holes not yet
    /// shipped that it overlaps, rounded out to [`GRAIN`], become data (read at their
    /// place, so they hold this write), merged with the data pieces they touch. The
    /// bytes to copy grow by as much.
    pub fn written(&mut self, offset: Offset, len: u64) {
        if len == 0 || self.todo.is_empty() {
            return;
        }
        let start = offset.0 / GRAIN * GRAIN;
        let end = offset
            .0
            .saturating_add(len)
            .div_ceil(GRAIN)
            .saturating_mul(GRAIN)
            .min(self.size);
        // The pieces overlapping [start, end): the one that starts before `start` (if
        // it reaches past it) and those that start inside.
        let before = self
            .todo
            .range(..start)
            .next_back()
            .filter(|(_, p)| end_of(p) > start)
            .map(|(k, _)| *k);
        let keys: Vec<u64> = before
            .into_iter()
            .chain(self.todo.range(start..end).map(|(k, _)| *k))
            .collect();
        let mut changed = false;
        for k in keys {
            let Some(&Piece::Hole { offset: o, len: l }) = self.todo.get(&k) else {
                continue;
            };
            let (hs, he) = (o.0, o.0 + l);
            let (cs, ce) = (hs.max(start), he.min(end));
            self.todo.remove(&k);
            if hs < cs {
                self.todo.insert(
                    hs,
                    Piece::Hole {
                        offset: Offset(hs),
                        len: cs - hs,
                    },
                );
            }
            self.todo.insert(
                cs,
                Piece::Data {
                    offset: Offset(cs),
                    len: ce - cs,
                },
            );
            if ce < he {
                self.todo.insert(
                    ce,
                    Piece::Hole {
                        offset: Offset(ce),
                        len: he - ce,
                    },
                );
            }
            self.total += ce - cs;
            changed = true;
        }
        if changed {
            self.merge_data(start, end);
        }
    }

    /// Merges the data pieces that touch, from the piece before `start` to the one after
    /// `end`.
    fn merge_data(&mut self, start: u64, end: u64) {
        let from = self
            .todo
            .range(..start)
            .next_back()
            .map_or(start, |(k, _)| *k);
        let keys: Vec<u64> = self.todo.range(from..=end).map(|(k, _)| *k).collect();
        let mut run: Option<(u64, u64)> = None;
        for k in keys {
            match (self.todo.get(&k).copied(), run) {
                (Some(Piece::Data { len, .. }), Some((rs, re))) if re == k => {
                    self.todo.remove(&k);
                    run = Some((rs, k + len));
                    self.todo.insert(
                        rs,
                        Piece::Data {
                            offset: Offset(rs),
                            len: k + len - rs,
                        },
                    );
                }
                (Some(Piece::Data { len, .. }), _) => run = Some((k, k + len)),
                _ => run = None,
            }
        }
    }

    pub fn stats(&self) -> SyncStats {
        SyncStats {
            resync: false,
            copy: 0,
            total_bytes: self.total,
            copied_bytes: self.issued,
            finished: self.finished,
        }
    }
}

/// `piece`'s kind over `[start, end)`.
fn with_range(piece: Piece, start: u64, end: u64) -> Piece {
    match piece {
        Piece::Data { .. } => Piece::Data {
            offset: Offset(start),
            len: end - start,
        },
        Piece::Hole { .. } => Piece::Hole {
            offset: Offset(start),
            len: end - start,
        },
    }
}

/// `dirty` (sorted runs) split by `extents` (sorted, not overlapping) into data pieces
/// (inside an extent) and hole pieces (outside), clipped to `size`, ascending.
fn intersect(dirty: &[(Offset, u64)], extents: &[(Offset, u64)], size: u64) -> Vec<Piece> {
    let mut out = Vec::new();
    for &(Offset(ds), dl) in dirty {
        let de = ds.saturating_add(dl).min(size);
        let mut at = ds;
        for &(Offset(es), el) in extents {
            let ee = es.saturating_add(el);
            if ee <= at || es >= de {
                continue;
            }
            if es > at {
                out.push(Piece::Hole {
                    offset: Offset(at),
                    len: es - at,
                });
            }
            let e = ee.min(de);
            out.push(Piece::Data {
                offset: Offset(es.max(at)),
                len: e - es.max(at),
            });
            at = e;
        }
        if at < de {
            out.push(Piece::Hole {
                offset: Offset(at),
                len: de - at,
            });
        }
    }
    out
}

fn start_of(p: &Piece) -> u64 {
    let (Piece::Data { offset, .. } | Piece::Hole { offset, .. }) = *p;
    offset.0
}

fn end_of(p: &Piece) -> u64 {
    let (Piece::Data { offset, len } | Piece::Hole { offset, len }) = *p;
    offset.0 + len
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pieces(size: u64, extents: &[(u64, u64)], chunk: u64) -> Vec<Piece> {
        let ext: Vec<(Offset, u64)> = extents.iter().map(|&(o, l)| (Offset(o), l)).collect();
        let mut s = InitialSync::new(size, &ext, chunk);
        std::iter::from_fn(|| s.next_piece()).collect()
    }

    fn d(o: u64, l: u64) -> Piece {
        Piece::Data {
            offset: Offset(o),
            len: l,
        }
    }

    fn h(o: u64, l: u64) -> Piece {
        Piece::Hole {
            offset: Offset(o),
            len: l,
        }
    }

    /// size, extents, chunk → the pieces, in order: they tile the unit exactly.
    #[test]
    fn the_pieces_tile_the_unit() {
        type Row = (u64, Vec<(u64, u64)>, u64, Vec<Piece>);
        let rows: Vec<Row> = vec![
            (100, vec![], 10, vec![h(0, 100)]),
            (
                100,
                vec![(0, 100)],
                40,
                vec![d(0, 40), d(40, 40), d(80, 20)],
            ),
            (
                100,
                vec![(10, 20)],
                40,
                vec![h(0, 10), d(10, 20), h(30, 70)],
            ),
            (
                100,
                vec![(0, 10), (50, 50)],
                30,
                vec![d(0, 10), h(10, 40), d(50, 30), d(80, 20)],
            ),
            // An extent reaching past the unit is cut at its end; overlaps are skipped.
            (100, vec![(90, 50)], 40, vec![h(0, 90), d(90, 10)]),
            (
                100,
                vec![(0, 60), (40, 30)],
                100,
                vec![d(0, 60), d(60, 10), h(70, 30)],
            ),
            (0, vec![], 10, vec![]),
        ];
        for (size, extents, chunk, want) in rows {
            let got = pieces(size, &extents, chunk);
            assert_eq!(got, want, "size {size}, extents {extents:?}, chunk {chunk}");
            let mut at = 0;
            for p in &got {
                let (Piece::Data { offset, len } | Piece::Hole { offset, len }) = *p;
                assert_eq!(offset.0, at, "gap or overlap in {got:?}");
                at += len;
            }
            assert_eq!(at, size);
        }
    }

    /// Dirty regions × extents → the pieces of a resync: data where allocated, holes
    /// (shipped as zeros) where not, nothing outside the dirty regions.
    #[test]
    fn a_resync_copies_the_dirty_regions_only() {
        type Row = (Vec<(u64, u64)>, Vec<(u64, u64)>, Vec<Piece>);
        let rows: Vec<Row> = vec![
            (vec![], vec![(0, 100)], vec![]),
            (vec![(10, 20)], vec![(0, 100)], vec![d(10, 20)]),
            (vec![(10, 20)], vec![], vec![h(10, 20)]),
            (
                vec![(0, 40), (60, 40)],
                vec![(20, 50)],
                vec![h(0, 20), d(20, 20), d(60, 10), h(70, 30)],
            ),
            // Past the unit's end: clipped.
            (vec![(90, 50)], vec![(0, 200)], vec![d(90, 10)]),
        ];
        for (dirty, extents, want) in rows {
            let dr: Vec<(Offset, u64)> = dirty.iter().map(|&(o, l)| (Offset(o), l)).collect();
            let ex: Vec<(Offset, u64)> = extents.iter().map(|&(o, l)| (Offset(o), l)).collect();
            let mut s = InitialSync::regions(100, &dr, &ex, 1000);
            let got: Vec<Piece> = std::iter::from_fn(|| s.next_piece()).collect();
            assert_eq!(got, want, "dirty {dirty:?}, extents {extents:?}");
        }
    }

    /// Regions added while a copy runs, and a piece given back, are copied (once);
    /// what is planned already stays.
    #[test]
    fn added_regions_and_given_back_pieces_are_copied() {
        let all = [(Offset(0), 100)];
        let mut s = InitialSync::regions(100, &[(Offset(50), 20)], &all, 1000);
        let first = s.next_piece().unwrap();
        assert_eq!(first, d(50, 20));
        // Behind the walk, and overlapping what is left to copy.
        s.add(&[(Offset(0), 10), (Offset(60), 30)], &all);
        s.put_back(first);
        let got: Vec<Piece> = std::iter::from_fn(|| s.next_piece()).collect();
        assert_eq!(got, vec![d(0, 10), d(50, 40)]);
        assert_eq!(s.stats().copied_bytes, s.total);
    }

    #[test]
    fn progress_counts_data_only() {
        let mut s = InitialSync::new(1000, &[(Offset(100), 300)], 128);
        assert_eq!(s.total, 300);
        while s.next_piece().is_some() {}
        assert_eq!(s.stats().copied_bytes, 300);
    }

    /// A write into a hole not yet shipped turns its grains into data (merged with the
    /// data it touches); a write into data, into what was shipped, or of nothing changes
    /// nothing. Each row: writes (offset, len) after `taken` pieces, then the pieces left.
    #[test]
    fn writes_turn_holes_ahead_into_data() {
        const G: u64 = GRAIN;
        type Row = (Vec<(u64, u64)>, usize, Vec<(u64, u64)>, Vec<Piece>);
        // A unit of 16 grains: data in grains 0-1 and 8, holes between.
        let extents = vec![(0, 2 * G), (8 * G, G)];
        let rows: Vec<Row> = vec![
            // Into the middle of the first hole: one grain, rounded out.
            (
                extents.clone(),
                0,
                vec![(4 * G + 10, 100)],
                vec![
                    d(0, 2 * G),
                    h(2 * G, 2 * G),
                    d(4 * G, G),
                    h(5 * G, 3 * G),
                    d(8 * G, G),
                    h(9 * G, 7 * G),
                ],
            ),
            // Touching the data before it, and across two grains: merged with it.
            (
                extents.clone(),
                0,
                vec![(2 * G + 5, G)],
                vec![d(0, 4 * G), h(4 * G, 4 * G), d(8 * G, G), h(9 * G, 7 * G)],
            ),
            // A write over data and both neighbouring holes: one piece of data.
            (
                extents.clone(),
                0,
                vec![(7 * G, 3 * G)],
                vec![
                    d(0, 2 * G),
                    h(2 * G, 5 * G),
                    d(7 * G, 3 * G),
                    h(10 * G, 6 * G),
                ],
            ),
            // Into data only, and an empty write: nothing changes.
            (
                extents.clone(),
                0,
                vec![(G, 10), (8 * G, G), (3 * G, 0)],
                vec![d(0, 2 * G), h(2 * G, 6 * G), d(8 * G, G), h(9 * G, 7 * G)],
            ),
            // Behind the walk (the first two pieces were taken): nothing changes there.
            (
                extents.clone(),
                2,
                vec![(3 * G, 10), (12 * G, 10)],
                vec![d(8 * G, G), h(9 * G, 3 * G), d(12 * G, G), h(13 * G, 3 * G)],
            ),
            // The unit's end: the grain is cut at the size.
            (
                vec![],
                0,
                vec![(16 * G - 1, 1)],
                vec![h(0, 15 * G), d(15 * G, G)],
            ),
        ];
        for (extents, taken, writes, want) in rows {
            let ext: Vec<(Offset, u64)> = extents.iter().map(|&(o, l)| (Offset(o), l)).collect();
            // Pieces as large as the unit: a data piece is taken whole.
            let mut s = InitialSync::new(16 * G, &ext, 16 * G);
            for _ in 0..taken {
                s.next_piece();
            }
            for &(o, l) in &writes {
                s.written(Offset(o), l);
            }
            let got: Vec<Piece> = std::iter::from_fn(|| s.next_piece()).collect();
            assert_eq!(got, want, "writes {writes:?} after {taken} pieces");
            // Everything to copy was handed out, the data turned from holes included.
            assert_eq!(s.stats().copied_bytes, s.total, "writes {writes:?}");
        }
    }
}
