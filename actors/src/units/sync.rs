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
//! The copy is finite: client writes during it are shipped in order and never add to
//! it, so it converges whatever the clients' rate (they share the window with it).

use crate::msg::SyncStats;
use std::collections::VecDeque;
use tidemark::Offset;

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
    todo: VecDeque<Piece>,
    chunk: u64,
    /// Bytes of data (allocated extents) to read in all.
    pub total: u64,
    /// Bytes of data read and handed to the lane so far.
    pub issued: u64,
    /// The `SyncBegin` mark was stamped.
    pub begun: bool,
    /// The `SyncDone` mark was stamped: nothing is left to copy.
    pub finished: bool,
}

impl InitialSync {
    /// A copy of a unit of `size` bytes whose data lies in `extents` (sorted, not
    /// overlapping, within the unit), read in pieces of at most `chunk` bytes.
    pub fn new(size: u64, extents: &[(Offset, u64)], chunk: u64) -> Self {
        let mut todo = VecDeque::new();
        let mut at = 0;
        let mut total = 0;
        for &(Offset(start), len) in extents {
            let end = start.saturating_add(len).min(size);
            if end <= start.max(at) {
                continue;
            }
            let start = start.max(at);
            if start > at {
                todo.push_back(Piece::Hole {
                    offset: Offset(at),
                    len: start - at,
                });
            }
            todo.push_back(Piece::Data {
                offset: Offset(start),
                len: end - start,
            });
            total += end - start;
            at = end;
        }
        if at < size {
            todo.push_back(Piece::Hole {
                offset: Offset(at),
                len: size - at,
            });
        }
        InitialSync {
            todo,
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
        let piece = self.todo.pop_front()?;
        match piece {
            Piece::Data { offset, len } if len > self.chunk => {
                self.todo.push_front(Piece::Data {
                    offset: Offset(offset.0 + self.chunk),
                    len: len - self.chunk,
                });
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

    /// A client write to `offset..offset+len` was stamped. A hole not yet shipped is
    /// shipped as zeros without a read, so the part of it the write touched becomes a
    /// data piece (read on the lane, it then holds the write). Data not yet shipped
    /// needs nothing: its read will see the write.
    pub fn wrote(&mut self, offset: u64, len: u64) {
        let end = offset.saturating_add(len);
        if len == 0 || self.finished {
            return;
        }
        // The pieces tile the rest of the unit in order: find those that overlap.
        let first = self.todo.partition_point(|p| piece_end(p) <= offset);
        let mut i = first;
        while i < self.todo.len() {
            let (Piece::Hole {
                offset: Offset(h),
                len: hl,
            }
            | Piece::Data {
                offset: Offset(h),
                len: hl,
            }) = self.todo[i];
            if h >= end {
                break;
            }
            if let Piece::Hole { .. } = self.todo[i] {
                let (a, b) = (h.max(offset), (h + hl).min(end));
                let mut parts = Vec::with_capacity(3);
                if a > h {
                    parts.push(Piece::Hole {
                        offset: Offset(h),
                        len: a - h,
                    });
                }
                parts.push(Piece::Data {
                    offset: Offset(a),
                    len: b - a,
                });
                if h + hl > b {
                    parts.push(Piece::Hole {
                        offset: Offset(b),
                        len: h + hl - b,
                    });
                }
                self.total += b - a;
                self.todo.remove(i);
                for (k, p) in parts.into_iter().enumerate() {
                    self.todo.insert(i + k, p);
                }
            }
            i += 1;
        }
    }

    pub fn stats(&self) -> SyncStats {
        SyncStats {
            total_bytes: self.total,
            copied_bytes: self.issued,
            finished: self.finished,
        }
    }
}

fn piece_end(p: &Piece) -> u64 {
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

    /// A write into a hole not yet shipped turns that part into data (read later, so
    /// it carries the write); a write into data, or into a hole already shipped, changes
    /// nothing.
    #[test]
    fn writes_into_pending_holes_become_data() {
        let mut s = InitialSync::new(100, &[(Offset(40), 20)], 1000);
        s.wrote(10, 5); // inside the first hole
        s.wrote(45, 5); // inside data: nothing
        s.wrote(55, 10); // data then hole: the hole's first 5 bytes
        s.wrote(98, 10); // past the end: cut at the end
        let got: Vec<Piece> = std::iter::from_fn(|| s.next_piece()).collect();
        assert_eq!(
            got,
            vec![
                h(0, 10),
                d(10, 5),
                h(15, 25),
                d(40, 20),
                d(60, 5),
                h(65, 33),
                d(98, 2)
            ]
        );
        assert_eq!(s.total, 20 + 5 + 5 + 2);
        // Once shipped, a hole stays shipped: later writes follow it in order.
        let mut s = InitialSync::new(100, &[], 1000);
        assert_eq!(s.next_piece(), Some(h(0, 100)));
        s.wrote(0, 10);
        assert_eq!(s.next_piece(), None);
    }

    #[test]
    fn progress_counts_data_only() {
        let mut s = InitialSync::new(1000, &[(Offset(100), 300)], 128);
        assert_eq!(s.total, 300);
        while s.next_piece().is_some() {}
        assert_eq!(s.stats().copied_bytes, 300);
    }
}
