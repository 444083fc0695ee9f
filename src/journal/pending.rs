//! Bytes appended to a segment and not written yet: encoded frames, with the data of
//! write packets kept as shared slices (not copied) and handed to the kernel in one
//! `pwritev` together with the bytes around them.

use bytes::Bytes;
use std::fs::File;
use std::io;

/// Write data at least this long is shared rather than copied into the buffer.
pub(crate) const SHARE_FROM: usize = 512;

/// Pending bytes: `own`, with shared pieces spliced in. In order, the bytes are
/// `own[..p1]`, `s1`, `own[p1..p2]`, `s2`, ..., `own[pn..]` for `shared` =
/// `[(p1, s1), ..., (pn, sn)]` (positions in `own`, never decreasing).
#[derive(Debug, Default)]
pub(crate) struct Pending {
    own: Vec<u8>,
    shared: Vec<(usize, Bytes)>,
    shared_len: usize,
}

impl From<Vec<u8>> for Pending {
    fn from(own: Vec<u8>) -> Self {
        Pending {
            own,
            shared: Vec::new(),
            shared_len: 0,
        }
    }
}

impl Pending {
    pub fn len(&self) -> usize {
        self.own.len() + self.shared_len
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The owned bytes, to append to (they go after everything pending).
    pub fn own_mut(&mut self) -> &mut Vec<u8> {
        &mut self.own
    }

    /// Appends `data` without copying it.
    pub fn push_shared(&mut self, data: Bytes) {
        if data.is_empty() {
            return;
        }
        self.shared_len += data.len();
        self.shared.push((self.own.len(), data));
    }

    /// The first `n` bytes, if they are all owned (the segment header).
    pub fn head_mut(&mut self, n: usize) -> Option<&mut [u8]> {
        if self.shared.first().is_some_and(|(p, _)| *p < n) {
            return None;
        }
        self.own.get_mut(..n)
    }

    pub fn clear(&mut self) {
        self.own.clear();
        self.shared.clear();
        self.shared_len = 0;
    }

    /// The pieces in order, as (owned range or shared bytes).
    fn pieces(&self) -> impl Iterator<Item = &[u8]> {
        let mut at = 0;
        let mut out = Vec::with_capacity(2 * self.shared.len() + 1);
        for (p, s) in &self.shared {
            out.push(&self.own[at..*p]);
            out.push(&s[..]);
            at = *p;
        }
        out.push(&self.own[at..]);
        out.into_iter().filter(|b| !b.is_empty())
    }

    /// Cuts everything from byte `len` on.
    pub fn truncate(&mut self, len: usize) {
        if len >= self.len() {
            return;
        }
        // Walk the pieces to the cut: keep the shared ones before it (the one it falls
        // in, cut short), then cut the owned bytes.
        let mut shared_before = 0;
        let mut keep = 0;
        for (p, s) in &mut self.shared {
            let start = *p + shared_before;
            if start >= len {
                break;
            }
            if start + s.len() > len {
                s.truncate(len - start);
            }
            shared_before += s.len();
            keep += 1;
        }
        self.shared.truncate(keep);
        self.shared_len = shared_before;
        self.own.truncate(len - shared_before);
    }

    /// Appends bytes `start..end` of `src` (shared pieces stay shared).
    pub fn append_range(&mut self, src: &Pending, start: usize, end: usize) {
        let mut at = 0;
        let mut take = |piece: &[u8], shared: Option<&Bytes>, this: &mut Pending| {
            let (lo, hi) = (at, at + piece.len());
            at = hi;
            let (a, b) = (lo.max(start), hi.min(end));
            if a >= b {
                return;
            }
            match shared {
                Some(s) => this.push_shared(s.slice(a - lo..b - lo)),
                None => this.own.extend_from_slice(&piece[a - lo..b - lo]),
            }
        };
        let mut own_at = 0;
        for (p, s) in &src.shared {
            take(&src.own[own_at..*p], None, self);
            take(s, Some(s), self);
            own_at = *p;
        }
        take(&src.own[own_at..], None, self);
    }

    /// Writes every pending byte at `offset` of `file` (one `pwritev` per 1024 pieces,
    /// more if the kernel writes less than asked).
    pub fn write_all_at(&self, file: &File, offset: u64) -> io::Result<()> {
        let pieces: Vec<&[u8]> = self.pieces().collect();
        crate::storage::write_all_vectored_at(file, &pieces, offset)
    }

    /// All pending bytes in one buffer (tests).
    #[cfg(test)]
    pub fn to_vec(&self) -> Vec<u8> {
        self.pieces().flatten().copied().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    fn sample() -> (Pending, Vec<u8>) {
        let mut p = Pending::from(b"head".to_vec());
        p.push_shared(Bytes::from_static(b"SHARED"));
        p.own_mut().extend_from_slice(b"mid");
        p.push_shared(Bytes::from_static(b"XY"));
        p.push_shared(Bytes::from_static(b"Z"));
        p.own_mut().extend_from_slice(b"end");
        (p, b"headSHAREDmidXYZend".to_vec())
    }

    /// A frame encoded into pending bytes (write data shared) is byte for byte the frame
    /// `encode_frame` writes, for data around the sharing threshold and for every other
    /// record, and decodes back to the record.
    #[test]
    fn shared_frames_are_the_same_bytes() {
        use super::super::format::{self, EntryRef};
        use super::super::state::Record;
        use crate::packet::{Packet, Payload};
        use crate::types::{Offset, PairId, Seq, Stamp, Timestamp};
        let mut records = Vec::new();
        for n in [0, 1, SHARE_FROM - 1, SHARE_FROM, 4096, 65_536, 200_000] {
            records.push(Record::Packet(Packet {
                pair: PairId(3),
                stamp: Stamp::new(Timestamp(1_000 + n as u64), Seq(n as u64 + 1)),
                payload: Payload::Write {
                    offset: Offset(n as u64 * 512),
                    data: Bytes::from((0..n).map(|i| i as u8).collect::<Vec<u8>>()),
                },
            }));
        }
        records.push(Record::Limit { ts: Timestamp(5) });
        records.push(Record::Packet(Packet {
            pair: PairId(1),
            stamp: Stamp::new(Timestamp(9), Seq(2)),
            payload: Payload::Zero {
                offset: Offset(0),
                len: 1 << 20,
            },
        }));
        let mut plain = b"seg".to_vec();
        let mut pending = Pending::from(b"seg".to_vec());
        for r in &records {
            let a = format::encode_frame(&mut plain, &EntryRef::Record(r));
            let b = format::encode_frame_pending(&mut pending, &EntryRef::Record(r));
            assert_eq!(a, b);
            assert_eq!(pending.to_vec(), plain, "{r:?}");
        }
        assert_eq!(
            pending.shared.len(),
            4,
            "the writes from SHARE_FROM bytes on"
        );
        let mut at = 3;
        for r in &records {
            let (entry, len) = format::decode_frame(&plain[at..]).expect("a frame");
            assert_eq!(
                format!("{entry:?}"),
                format!("{:?}", format::Entry::Record(r.clone()))
            );
            at += len;
        }
        assert_eq!(at, plain.len());
    }

    #[test]
    fn pieces_ranges_truncation_and_writes() {
        let (p, all) = sample();
        assert_eq!(p.len(), all.len());
        assert_eq!(p.to_vec(), all);
        for start in 0..=all.len() {
            for end in start..=all.len() {
                let mut q = Pending::from(b"<".to_vec());
                q.append_range(&p, start, end);
                let mut want = b"<".to_vec();
                want.extend_from_slice(&all[start..end]);
                assert_eq!(q.to_vec(), want, "{start}..{end}");
                assert_eq!(q.len(), want.len());
            }
            let (mut t, _) = sample();
            t.truncate(start);
            assert_eq!(t.to_vec(), &all[..start]);
        }
        let dir = tempfile::tempdir().unwrap();
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("f"))
            .unwrap();
        p.write_all_at(&f, 5).unwrap();
        let mut back = vec![0u8; 5 + all.len()];
        f.read_exact_at(&mut back, 0).unwrap();
        assert_eq!(&back[5..], &all[..]);
        assert_eq!(&back[..5], &[0; 5]);
        let mut h = Pending::from(b"head".to_vec());
        assert_eq!(h.head_mut(4).map(|b| b.to_vec()), Some(b"head".to_vec()));
        let mut s = Pending::default();
        s.push_shared(Bytes::from_static(b"abcd"));
        assert!(s.head_mut(4).is_none());
        h.clear();
        assert!(h.is_empty());
        // More pieces than one pwritev takes.
        let mut many = Pending::default();
        let mut want = Vec::new();
        for i in 0..3000u32 {
            many.own_mut().push(i as u8);
            many.push_shared(Bytes::from(vec![(i >> 8) as u8; 3]));
            want.push(i as u8);
            want.extend_from_slice(&[(i >> 8) as u8; 3]);
        }
        many.write_all_at(&f, 0).unwrap();
        let mut back = vec![0u8; want.len()];
        f.read_exact_at(&mut back, 0).unwrap();
        assert_eq!(back, want);
    }
}
