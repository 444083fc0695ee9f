//! The dirty-region map of a local unit: which regions hold writes the remote misses
//! (the pair was tracking), kept write-ahead in a file so that a primary crash forgets
//! none of them.
//!
//! ```text
//! journal_dir/dirty-<pair>.map
//! +--------------------------------------------------------------------------+
//! | header, 32 bytes: magic "TDMKDIRT" (8) | version u32 LE (4)              |
//! |   region size u32 LE (4) | unit size u64 LE (8) | reserved u32 = 0 (4)    |
//! |   crc32c u32 LE (4) of the 28 bytes before it                            |
//! +--------------------------------------------------------------------------+
//! | the bitmap: bit i (byte i / 8, bit i % 8) set = region i is dirty         |
//! +--------------------------------------------------------------------------+
//! ```
//!
//! Write-ahead (the invariant [`DirtyFile::mark`] keeps): a region's bit is durable in
//! the file before any write to the region the remote misses reaches the local unit.
//! A bit is only ever set durably ahead of the data, and cleared only once the remote
//! holds the region ([`DirtyFile::clear`]); a torn write of the bitmap can therefore only
//! leave bits set that are not needed (a larger resync), never lose one that is, so the
//! bitmap carries no checksum (one would turn a torn page into a lost map).

use crate::types::Offset;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// The first 8 bytes of a dirty-map file.
pub const MAGIC: [u8; 8] = *b"TDMKDIRT";
/// The format version this build writes and reads.
pub const VERSION: u32 = 1;
/// Bytes of the header.
pub const HEADER_LEN: u64 = 32;
/// The region size when none is configured.
pub const DEFAULT_REGION: u64 = 64 << 10;

#[derive(Debug, thiserror::Error)]
pub enum DirtyError {
    #[error("region size {0} must be a power of two between 4 KiB and 1 GiB")]
    Region(u64),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path}: not a dirty-region map of this unit: {why}")]
    Corrupt { path: PathBuf, why: String },
}

/// Which regions of a unit are dirty, in memory. Pure: no file, no clock.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirtyMap {
    region: u64,
    size: u64,
    bits: Vec<u8>,
    count: u64,
}

impl DirtyMap {
    /// A clean map of a unit of `size` bytes in regions of `region` bytes.
    pub fn new(size: u64, region: u64) -> Result<DirtyMap, DirtyError> {
        check_region(region)?;
        let regions = size.div_ceil(region);
        Ok(DirtyMap {
            region,
            size,
            bits: vec![0; regions.div_ceil(8) as usize],
            count: 0,
        })
    }

    pub fn region(&self) -> u64 {
        self.region
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Dirty regions.
    pub fn count(&self) -> u64 {
        self.count
    }

    pub fn is_clean(&self) -> bool {
        self.count == 0
    }

    /// Bytes of the unit in dirty regions (the last region may be short). Constant
    /// time: status and `drain` ask for it often, on units of any size.
    pub fn dirty_bytes(&self) -> u64 {
        let regions = self.size.div_ceil(self.region);
        let short = regions * self.region - self.size;
        let last_dirty = regions > 0 && self.is_dirty(regions - 1);
        self.count * self.region - if last_dirty { short } else { 0 }
    }

    pub fn is_dirty(&self, region: u64) -> bool {
        self.bits
            .get((region / 8) as usize)
            .is_some_and(|b| b & (1 << (region % 8)) != 0)
    }

    /// Marks the regions `len` bytes at `offset` touch (clipped to the unit); returns the
    /// indices of the bitmap bytes that changed, ascending (what must reach the file).
    pub fn mark(&mut self, offset: Offset, len: u64) -> Vec<usize> {
        let mut changed = Vec::new();
        if len == 0 || offset.0 >= self.size {
            return changed;
        }
        let first = offset.0 / self.region;
        let last = (offset.0.saturating_add(len).min(self.size) - 1) / self.region;
        for r in first..=last {
            let (byte, bit) = ((r / 8) as usize, 1u8 << (r % 8));
            if self.bits[byte] & bit == 0 {
                self.bits[byte] |= bit;
                self.count += 1;
                if changed.last() != Some(&byte) {
                    changed.push(byte);
                }
            }
        }
        changed
    }

    /// Marks every region.
    pub fn mark_all(&mut self) {
        self.mark(Offset(0), self.size);
    }

    pub fn clear(&mut self) {
        self.bits.iter_mut().for_each(|b| *b = 0);
        self.count = 0;
    }

    /// The dirty bytes as maximal runs `(offset, len)`, ascending, clipped to the unit.
    pub fn runs(&self) -> Vec<(Offset, u64)> {
        let mut out: Vec<(Offset, u64)> = Vec::new();
        if self.count == 0 {
            return out;
        }
        for r in 0..self.size.div_ceil(self.region) {
            if !self.is_dirty(r) {
                continue;
            }
            let start = r * self.region;
            let end = (start + self.region).min(self.size);
            match out.last_mut() {
                Some((o, l)) if o.0 + *l == start => *l += end - start,
                _ => out.push((Offset(start), end - start)),
            }
        }
        out
    }

    /// The bitmap as the file stores it.
    pub fn bytes(&self) -> &[u8] {
        &self.bits
    }

    /// A map read back from bitmap bytes (bits past the last region are ignored).
    pub fn from_bytes(size: u64, region: u64, bytes: &[u8]) -> Result<DirtyMap, DirtyError> {
        let mut m = DirtyMap::new(size, region)?;
        let regions = size.div_ceil(region);
        for r in 0..regions {
            if bytes
                .get((r / 8) as usize)
                .is_some_and(|b| b & (1 << (r % 8)) != 0)
            {
                m.bits[(r / 8) as usize] |= 1 << (r % 8);
                m.count += 1;
            }
        }
        Ok(m)
    }
}

fn check_region(region: u64) -> Result<(), DirtyError> {
    if !region.is_power_of_two() || !(4096..=1 << 30).contains(&region) {
        return Err(DirtyError::Region(region));
    }
    Ok(())
}

/// The header of a map of a unit of `size` bytes in `region`-byte regions.
pub fn encode_header(size: u64, region: u64) -> [u8; HEADER_LEN as usize] {
    let mut h = [0u8; HEADER_LEN as usize];
    h[..8].copy_from_slice(&MAGIC);
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&(region as u32).to_le_bytes());
    h[16..24].copy_from_slice(&size.to_le_bytes());
    let crc = crc32c::crc32c(&h[..28]);
    h[28..32].copy_from_slice(&crc.to_le_bytes());
    h
}

/// `(size, region)` of a header, or why it is not one.
pub fn decode_header(h: &[u8]) -> Result<(u64, u64), String> {
    let h = h
        .get(..HEADER_LEN as usize)
        .ok_or_else(|| format!("{} bytes, shorter than a header", h.len()))?;
    if h[..8] != MAGIC {
        return Err("bad magic".into());
    }
    let le32 = |b: &[u8]| u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    if le32(&h[28..32]) != crc32c::crc32c(&h[..28]) {
        return Err("header checksum mismatch".into());
    }
    let version = le32(&h[8..12]);
    if version != VERSION {
        return Err(format!("unsupported version {version}"));
    }
    let region = u64::from(le32(&h[12..16]));
    let mut size = [0u8; 8];
    size.copy_from_slice(&h[16..24]);
    Ok((u64::from_le_bytes(size), region))
}

/// A [`DirtyMap`] kept write-ahead in a file.
#[derive(Debug)]
pub struct DirtyFile {
    path: PathBuf,
    file: File,
    map: DirtyMap,
}

impl DirtyFile {
    /// Opens the map at `path`, or creates a clean one (durably: file synced, then its
    /// directory). An existing map of another unit size or region size is refused
    /// (changing `region_size` needs a clean map: a stopped pair that resynced).
    pub fn open(path: &Path, size: u64, region: u64) -> Result<DirtyFile, DirtyError> {
        check_region(region)?;
        let io = |source| DirtyError::Io {
            path: path.to_path_buf(),
            source,
        };
        let bitmap_len = size.div_ceil(region).div_ceil(8);
        match std::fs::read(path) {
            Ok(bytes) => {
                let corrupt = |why: String| DirtyError::Corrupt {
                    path: path.to_path_buf(),
                    why,
                };
                let (s, r) = decode_header(&bytes).map_err(corrupt)?;
                if (s, r) != (size, region) {
                    return Err(corrupt(format!(
                        "made for a unit of {s} bytes in regions of {r}, not {size} in {region}"
                    )));
                }
                // A map cut short (a crash while it was created) reads the missing
                // bytes as clean: it was created clean and every bit set was synced.
                let map = DirtyMap::from_bytes(size, region, &bytes[HEADER_LEN as usize..])?;
                let file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(path)
                    .map_err(io)?;
                file.set_len(HEADER_LEN + bitmap_len).map_err(io)?;
                Ok(DirtyFile {
                    path: path.to_path_buf(),
                    file,
                    map,
                })
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let tmp = path.with_extension("map.tmp");
                let file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .open(&tmp)
                    .map_err(io)?;
                file.write_all_at(&encode_header(size, region), 0)
                    .map_err(io)?;
                file.set_len(HEADER_LEN + bitmap_len).map_err(io)?;
                file.sync_all().map_err(io)?;
                std::fs::rename(&tmp, path).map_err(io)?;
                if let Some(dir) = path.parent() {
                    File::open(dir).and_then(|d| d.sync_all()).map_err(io)?;
                }
                Ok(DirtyFile {
                    path: path.to_path_buf(),
                    file,
                    map: DirtyMap::new(size, region)?,
                })
            }
            Err(e) => Err(io(e)),
        }
    }

    pub fn map(&self) -> &DirtyMap {
        &self.map
    }

    /// Marks the regions of every `(offset, len)` dirty, durably: the changed bitmap
    /// bytes are written and synced before this returns, so a write to those regions
    /// may then reach the unit (write-ahead). One sync for the lot; none if every
    /// region was dirty already. On an error the map in memory still has the bits set
    /// (they are set in the file or not; either way the caller must not write the data).
    pub fn mark(&mut self, ranges: &[(Offset, u64)]) -> Result<u64, DirtyError> {
        let mut changed = Vec::new();
        for &(o, l) in ranges {
            changed.extend(self.map.mark(o, l));
        }
        if changed.is_empty() {
            return Ok(0);
        }
        changed.sort_unstable();
        changed.dedup();
        // Contiguous changed bytes go in one write.
        let mut i = 0;
        while i < changed.len() {
            let mut j = i;
            while j + 1 < changed.len() && changed[j + 1] == changed[j] + 1 {
                j += 1;
            }
            let (from, to) = (changed[i], changed[j]);
            self.file
                .write_all_at(&self.map.bytes()[from..=to], HEADER_LEN + from as u64)
                .map_err(|e| self.io(e))?;
            i = j + 1;
        }
        self.file.sync_data().map_err(|e| self.io(e))?;
        Ok(changed.len() as u64)
    }

    /// Marks the whole unit dirty, durably.
    pub fn mark_all(&mut self) -> Result<(), DirtyError> {
        self.map.mark_all();
        self.write_all()
    }

    /// Clears the map, durably: only once the remote holds every dirty region.
    pub fn clear(&mut self) -> Result<(), DirtyError> {
        self.map.clear();
        self.write_all()
    }

    fn write_all(&mut self) -> Result<(), DirtyError> {
        self.file
            .write_all_at(self.map.bytes(), HEADER_LEN)
            .map_err(|e| self.io(e))?;
        self.file.sync_data().map_err(|e| self.io(e))
    }

    fn io(&self, source: io::Error) -> DirtyError {
        DirtyError::Io {
            path: self.path.clone(),
            source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const K: u64 = 1024;

    /// (size, region, marks) → the runs; each row checks the bits by eye.
    #[test]
    fn marks_become_runs() {
        type Row = (u64, u64, Vec<(u64, u64)>, Vec<(u64, u64)>, u64);
        let r = 64 * K;
        let rows: Vec<Row> = vec![
            (10 * r, r, vec![], vec![], 0),
            (10 * r, r, vec![(0, 1)], vec![(0, r)], 1),
            // Straddling a boundary: both regions.
            (10 * r, r, vec![(r - 1, 2)], vec![(0, 2 * r)], 2),
            (
                10 * r,
                r,
                vec![(3 * r, r), (5 * r + 7, 10)],
                vec![(3 * r, r), (5 * r, r)],
                2,
            ),
            // Adjacent regions merge; marking twice counts once.
            (
                10 * r,
                r,
                vec![(r, 1), (2 * r, 1), (r, 5)],
                vec![(r, 2 * r)],
                2,
            ),
            // The last region is short; past the end is ignored; empty marks nothing.
            (
                3 * r + 100,
                r,
                vec![(3 * r, 1000), (9 * r, 5), (0, 0)],
                vec![(3 * r, 100)],
                1,
            ),
            (4 * K, 4 * K, vec![(0, u64::MAX)], vec![(0, 4 * K)], 1),
        ];
        for (size, region, marks, want, count) in rows {
            let mut m = DirtyMap::new(size, region).unwrap();
            for &(o, l) in &marks {
                m.mark(Offset(o), l);
            }
            let got: Vec<(u64, u64)> = m.runs().iter().map(|(o, l)| (o.0, *l)).collect();
            assert_eq!(got, want, "size {size}, marks {marks:?}");
            assert_eq!(m.count(), count, "marks {marks:?}");
            assert_eq!(m.dirty_bytes(), want.iter().map(|w| w.1).sum::<u64>());
            let back = DirtyMap::from_bytes(size, region, m.bytes()).unwrap();
            assert_eq!(back, m);
        }
    }

    #[test]
    fn bad_region_sizes_are_refused() {
        for r in [0, 1, 1000, 2048, 3 * 4096, 2 << 30] {
            assert!(
                matches!(DirtyMap::new(1 << 20, r), Err(DirtyError::Region(_))),
                "{r}"
            );
        }
    }

    #[test]
    fn mark_reports_only_changed_bytes() {
        let mut m = DirtyMap::new(64 * 4096, 4096).unwrap();
        assert_eq!(m.mark(Offset(0), 4096), vec![0]);
        assert_eq!(m.mark(Offset(0), 4096), Vec::<usize>::new());
        assert_eq!(m.mark(Offset(7 * 4096), 2 * 4096), vec![0, 1]);
    }

    #[test]
    fn the_file_keeps_marks_across_reopen_and_clears() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dirty-0.map");
        let size = 100 * 64 * K + 5;
        {
            let mut f = DirtyFile::open(&path, size, 64 * K).unwrap();
            assert!(f.map().is_clean());
            assert_eq!(
                f.mark(&[(Offset(0), 1), (Offset(99 * 64 * K), 64 * K)])
                    .unwrap(),
                2
            );
            // Already dirty: nothing written.
            assert_eq!(f.mark(&[(Offset(10), 10)]).unwrap(), 0);
        }
        let mut f = DirtyFile::open(&path, size, 64 * K).unwrap();
        let runs: Vec<(u64, u64)> = f.map().runs().iter().map(|(o, l)| (o.0, *l)).collect();
        assert_eq!(runs, vec![(0, 64 * K), (99 * 64 * K, 64 * K)]);
        f.clear().unwrap();
        drop(f);
        assert!(DirtyFile::open(&path, size, 64 * K)
            .unwrap()
            .map()
            .is_clean());
        // Another unit size or region size is refused, and the file is left alone.
        let before = std::fs::read(&path).unwrap();
        assert!(matches!(
            DirtyFile::open(&path, size + 1, 64 * K),
            Err(DirtyError::Corrupt { .. })
        ));
        assert!(matches!(
            DirtyFile::open(&path, size, 128 * K),
            Err(DirtyError::Corrupt { .. })
        ));
        assert_eq!(std::fs::read(&path).unwrap(), before);
    }

    #[test]
    fn a_damaged_header_is_refused_and_a_short_bitmap_reads_clean() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.map");
        let mut f = DirtyFile::open(&path, 1 << 30, 64 * K).unwrap();
        f.mark(&[(Offset(0), 1)]).unwrap();
        drop(f);
        let good = std::fs::read(&path).unwrap();
        // Cut short: the bytes present still count, the rest read clean.
        std::fs::write(&path, &good[..HEADER_LEN as usize + 1]).unwrap();
        let f = DirtyFile::open(&path, 1 << 30, 64 * K).unwrap();
        assert_eq!(f.map().count(), 1);
        drop(f);
        let mut bad = good.clone();
        bad[13] ^= 1;
        std::fs::write(&path, &bad).unwrap();
        assert!(matches!(
            DirtyFile::open(&path, 1 << 30, 64 * K),
            Err(DirtyError::Corrupt { .. })
        ));
        std::fs::write(&path, b"short").unwrap();
        assert!(matches!(
            DirtyFile::open(&path, 1 << 30, 64 * K),
            Err(DirtyError::Corrupt { .. })
        ));
    }
}
