//! Block storage behind a trait: a file backend (positional reads and writes, flush) and
//! an in-memory one for tests and simulations.
//!
//! Every access is range-checked against the unit's size before it touches anything.
//!
//! A unit may be sparse: [`BlockStore::allocated`] names the ranges that may hold data
//! (everything else reads as zeros), so an initial copy can skip the rest, and
//! [`FileStore::write_zeroes`] deallocates the range where the file system can, so a
//! replicated trim does not cost space on the remote.

use crate::packet::Payload;
use crate::types::Offset;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("access of {len} bytes at offset {offset} is beyond the unit's size {size}")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("{path}: size is {found} bytes, configured {want}")]
    SizeMismatch {
        path: PathBuf,
        found: u64,
        want: u64,
    },
    /// A write to a unit opened read-only ([`FileStore::open_read_only`]).
    #[error("{path}: the unit is open read-only")]
    ReadOnly { path: PathBuf },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl StoreError {
    /// The file system had no room (ENOSPC, EDQUOT).
    pub fn is_no_space(&self) -> bool {
        matches!(self, StoreError::Io { source, .. } if crate::journal::is_space_errno(source))
    }
}

/// A unit's bytes. Implementations are positional; they keep no cursor.
pub trait BlockStore: Send + Sync {
    /// The unit's size in bytes.
    fn size(&self) -> u64;
    fn read_at(&self, offset: Offset, buf: &mut [u8]) -> Result<(), StoreError>;
    fn write_at(&self, offset: Offset, data: &[u8]) -> Result<(), StoreError>;
    /// Writes `pieces` back to back from `offset`. Default: one [`BlockStore::write_at`]
    /// per piece; a file store writes them with one `pwritev`. Not for merging separate
    /// client writes into one: the page cache sizes folios by the write that creates
    /// them, and small writes into large folios cost more (see `LocalUnit`).
    fn write_vectored_at(&self, offset: Offset, pieces: &[&[u8]]) -> Result<(), StoreError> {
        let mut at = offset.0;
        for p in pieces {
            self.write_at(Offset(at), p)?;
            at += p.len() as u64;
        }
        Ok(())
    }
    /// Makes `len` bytes at `offset` read as zeros; the unit's size does not change.
    /// Whether the range stays allocated is the store's choice. Nothing is changed if the
    /// range is not inside the unit.
    fn write_zeroes(&self, offset: Offset, len: u64) -> Result<(), StoreError> {
        check(self.size(), offset, len)?;
        fill_zeroes(self, offset, len)
    }
    /// The byte ranges that may hold data (offset, len), in order, not overlapping, within
    /// the unit; everything outside them reads as zeros. Default: the whole unit.
    ///
    /// Every range is non-empty and no two touch (adjacent ranges are merged). The answer
    /// describes the unit at the time of the call: a write racing with it may or may not
    /// be covered.
    fn allocated(&self) -> Result<Vec<(Offset, u64)>, StoreError> {
        Ok(whole(self.size()))
    }
    /// Makes everything written so far durable.
    fn flush(&self) -> Result<(), StoreError>;

    /// Makes sure a later write of `len` bytes at `offset` will not fail for want of
    /// space (allocates what is not allocated yet), without changing what the range
    /// reads. A primary calls it before it journals a write, so that a full file system
    /// refuses the write before anything of it is anywhere ([`StoreError::is_no_space`]).
    /// Default: nothing to do (the store is not thinly provisioned).
    fn reserve(&self, offset: Offset, len: u64) -> Result<(), StoreError> {
        check(self.size(), offset, len)
    }

    /// Applies a replicated payload (idempotent).
    fn apply(&self, payload: &Payload) -> Result<(), StoreError> {
        match payload {
            Payload::Write { offset, data } => self.write_at(*offset, data),
            Payload::Zero { offset, len } => self.write_zeroes(*offset, *len),
            Payload::Mark(_) => Ok(()),
        }
    }
}

/// Writes `len` zero bytes at `offset` through [`BlockStore::write_at`], in chunks of
/// [`ZERO_CHUNK`]: the range ends up allocated and reading as zeros.
fn fill_zeroes<S: BlockStore + ?Sized>(s: &S, offset: Offset, len: u64) -> Result<(), StoreError> {
    let zeros = vec![0u8; ZERO_CHUNK.min(len) as usize];
    let mut done = 0;
    while done < len {
        let n = ZERO_CHUNK.min(len - done);
        s.write_at(Offset(offset.0 + done), &zeros[..n as usize])?;
        done += n;
    }
    Ok(())
}

/// The chunk size of [`fill_zeroes`] and the granularity of [`MemStore::allocated`].
const ZERO_CHUNK: u64 = 1 << 16;

/// The whole of a unit of `size` bytes as an extent list: one extent, or none if empty.
fn whole(size: u64) -> Vec<(Offset, u64)> {
    if size == 0 {
        Vec::new()
    } else {
        vec![(Offset(0), size)]
    }
}

/// Appends the non-empty `[start, end)` to `extents`, whose last extent ends at or before
/// `start`, merging the two if they touch: the list stays ordered, without overlaps and
/// without adjacent extents.
fn push_extent(extents: &mut Vec<(Offset, u64)>, start: u64, end: u64) {
    debug_assert!(start < end);
    match extents.last_mut() {
        Some((o, l)) if o.0 + *l == start => *l = end - o.0,
        _ => extents.push((Offset(start), end - start)),
    }
}

/// Checks that `len` bytes at `offset` lie inside a unit of `size` bytes.
pub fn check(size: u64, offset: Offset, len: u64) -> Result<(), StoreError> {
    match offset.0.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(StoreError::OutOfRange {
            offset: offset.0,
            len,
            size,
        }),
    }
}

/// A unit kept in a regular file (or a block device) of a fixed size.
#[derive(Debug)]
pub struct FileStore {
    file: File,
    path: PathBuf,
    size: u64,
    /// Opened without write access: every write fails with [`StoreError::ReadOnly`]
    /// before it reaches the file.
    read_only: bool,
    /// The file had every block allocated when opened, and no hole was punched since:
    /// [`BlockStore::reserve`] has nothing to do.
    dense: AtomicBool,
    /// Of a file that is not dense: the granules `reserve` allocated since (no hole
    /// punched in them since), which it does not allocate again.
    reserved: Granules,
}

/// Bytes per granule of [`Granules`].
const GRANULE: u64 = 1 << 20;

/// One bit per [`GRANULE`] of a unit: set once the granule is known allocated, so that
/// [`BlockStore::reserve`] costs a `fallocate` per granule, not per write (it was one
/// per write for ever on a unit created sparse). Exact for one writer at a time, as a
/// primary's lane is; with racing writers and hole punches a bit may outlive its
/// allocation, and a write then meets a full file system only after it was journaled, as
/// on a file system that cannot allocate ahead.
#[derive(Debug)]
struct Granules(Vec<AtomicU64>);

impl Granules {
    fn new(size: u64) -> Granules {
        let n = size.div_ceil(GRANULE).div_ceil(64);
        Granules((0..n).map(|_| AtomicU64::new(0)).collect())
    }

    /// The granules `len` (> 0) bytes at `offset` touch.
    fn span(offset: u64, len: u64) -> std::ops::RangeInclusive<u64> {
        offset / GRANULE..=(offset + len - 1) / GRANULE
    }

    fn word(&self, g: u64) -> Option<(&AtomicU64, u64)> {
        self.0.get((g / 64) as usize).map(|w| (w, 1u64 << (g % 64)))
    }

    fn all(&self, span: std::ops::RangeInclusive<u64>) -> bool {
        span.into_iter().all(|g| {
            self.word(g)
                .is_some_and(|(w, bit)| w.load(Ordering::Relaxed) & bit != 0)
        })
    }

    fn set(&self, span: std::ops::RangeInclusive<u64>, on: bool) {
        for g in span {
            if let Some((w, bit)) = self.word(g) {
                if on {
                    w.fetch_or(bit, Ordering::Relaxed);
                } else {
                    w.fetch_and(!bit, Ordering::Relaxed);
                }
            }
        }
    }
}

impl FileStore {
    /// Opens `path`, creating it at `size` bytes if missing. An existing file of another
    /// size is an error and is left untouched.
    pub fn open_or_create(path: &Path, size: u64) -> Result<Self, StoreError> {
        let io = |source| StoreError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(io)?;
        if file.metadata().map_err(io)?.len() == 0 && size > 0 {
            file.set_len(size).map_err(io)?;
        }
        Self::sized(file, path, size, false)
    }

    /// Opens an existing `path` of exactly `size` bytes for reading only: the file is
    /// never opened for writing, never created and never resized, so nothing done
    /// through this store can change it.
    pub fn open_read_only(path: &Path, size: u64) -> Result<Self, StoreError> {
        let io = |source| StoreError::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = OpenOptions::new().read(true).open(path).map_err(io)?;
        Self::sized(file, path, size, true)
    }

    /// A store over `file`, which must be exactly `size` bytes long.
    fn sized(file: File, path: &Path, size: u64, read_only: bool) -> Result<Self, StoreError> {
        let found = file
            .metadata()
            .map_err(|source| StoreError::Io {
                path: path.to_path_buf(),
                source,
            })?
            .len();
        if found != size {
            return Err(StoreError::SizeMismatch {
                path: path.to_path_buf(),
                found,
                want: size,
            });
        }
        let dense = !read_only && sparse::dense(&file, size);
        Ok(FileStore {
            file,
            path: path.to_path_buf(),
            size,
            read_only,
            dense: AtomicBool::new(dense),
            reserved: Granules::new(if dense { 0 } else { size }),
        })
    }

    /// Whether the store was opened with [`FileStore::open_read_only`].
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether `reserve` holds every granule of `len` bytes at `offset` allocated.
    #[cfg(test)]
    pub(crate) fn reserved_granules(&self, offset: u64, len: u64) -> bool {
        self.reserved.all(Granules::span(offset, len))
    }

    fn io(&self, source: io::Error) -> StoreError {
        StoreError::Io {
            path: self.path.clone(),
            source,
        }
    }
}

impl BlockStore for FileStore {
    fn size(&self) -> u64 {
        self.size
    }

    fn write_vectored_at(&self, offset: Offset, pieces: &[&[u8]]) -> Result<(), StoreError> {
        if self.read_only {
            return Err(StoreError::ReadOnly {
                path: self.path.clone(),
            });
        }
        let len: u64 = pieces.iter().map(|p| p.len() as u64).sum();
        check(self.size, offset, len)?;
        write_all_vectored_at(&self.file, pieces, offset.0).map_err(|e| self.io(e))
    }

    fn read_at(&self, offset: Offset, buf: &mut [u8]) -> Result<(), StoreError> {
        check(self.size, offset, buf.len() as u64)?;
        self.file
            .read_exact_at(buf, offset.0)
            .map_err(|e| self.io(e))
    }

    fn write_at(&self, offset: Offset, data: &[u8]) -> Result<(), StoreError> {
        if self.read_only {
            return Err(StoreError::ReadOnly {
                path: self.path.clone(),
            });
        }
        check(self.size, offset, data.len() as u64)?;
        self.file
            .write_all_at(data, offset.0)
            .map_err(|e| self.io(e))
    }

    /// Makes the range read as zeros without allocating it: the file system deallocates it
    /// (a hole, size kept) where it can, and zeros are written where it cannot. Like a
    /// write, the result is durable after the next [`flush`](BlockStore::flush).
    /// Nothing is changed if the store is read-only or the range is not inside the unit.
    fn write_zeroes(&self, offset: Offset, len: u64) -> Result<(), StoreError> {
        if self.read_only {
            return Err(StoreError::ReadOnly {
                path: self.path.clone(),
            });
        }
        check(self.size, offset, len)?;
        if len == 0 {
            return Ok(());
        }
        if sparse::punch_hole(&self.file, offset.0, len).map_err(|e| self.io(e))? {
            self.reserved.set(Granules::span(offset.0, len), false);
            self.dense.store(false, Ordering::Relaxed);
            return Ok(());
        }
        fill_zeroes(self, offset, len)
    }

    /// The file's data extents as the file system reports them (`SEEK_DATA`/`SEEK_HOLE`),
    /// clamped to the unit's size. Where the file system cannot tell, the whole unit;
    /// file systems without hole tracking report the whole file as data.
    fn allocated(&self) -> Result<Vec<(Offset, u64)>, StoreError> {
        match sparse::data_extents(&self.file, self.size).map_err(|e| self.io(e))? {
            Some(extents) => Ok(extents),
            None => Ok(whole(self.size)),
        }
    }

    fn flush(&self) -> Result<(), StoreError> {
        if self.read_only {
            // Nothing was written through this store.
            return Ok(());
        }
        self.file.sync_data().map_err(|e| self.io(e))
    }

    /// Allocates the range (`fallocate`, size kept) unless the file is known to have no
    /// holes there: a sparse unit on a full file system then refuses the write here,
    /// with ENOSPC, instead of after it was journaled. Allocates whole granules (1 MiB,
    /// reads unchanged) and remembers them, so a granule costs one `fallocate`, not one
    /// per write. File systems (and block devices) that cannot allocate ahead are taken
    /// as they are (and not asked again).
    fn reserve(&self, offset: Offset, len: u64) -> Result<(), StoreError> {
        check(self.size, offset, len)?;
        if self.read_only || len == 0 || self.dense.load(Ordering::Relaxed) {
            return Ok(());
        }
        let span = Granules::span(offset.0, len);
        if self.reserved.all(span.clone()) {
            return Ok(());
        }
        let start = span.start() * GRANULE;
        let end = ((span.end() + 1) * GRANULE).min(self.size);
        match sparse::allocate(&self.file, start, end - start) {
            Ok(true) => {
                self.reserved.set(span, true);
                Ok(())
            }
            Ok(false) => {
                self.dense.store(true, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => Err(self.io(e)),
        }
    }
}

/// Hole-aware file operations (Linux: `lseek(SEEK_DATA/SEEK_HOLE)` and
/// `fallocate(PUNCH_HOLE)`). Each says when the file system cannot do it, so the caller
/// falls back to the dense behaviour.
#[cfg(any(target_os = "linux", target_os = "android"))]
mod sparse {
    use super::{push_extent, Offset};
    use std::fs::File;
    use std::io;
    use std::os::fd::AsRawFd;

    /// Errors meaning "this file (system) does not do that", as opposed to a failure.
    fn unsupported(e: &io::Error) -> bool {
        // EOPNOTSUPP and ENOTSUP are the same number on Linux.
        matches!(
            e.raw_os_error(),
            Some(libc::EINVAL | libc::EOPNOTSUPP | libc::ENOSYS | libc::ENODEV | libc::ESPIPE)
        )
    }

    /// An offset the kernel can take; one it cannot is reported as unsupported.
    fn off(v: u64) -> io::Result<libc::off_t> {
        libc::off_t::try_from(v).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
    }

    /// `lseek(file, offset, whence)`: the resulting position, or `None` for ENXIO (for
    /// `SEEK_DATA`: no data at or after `offset`; for `SEEK_HOLE`: `offset` is past the
    /// end of the file). Moves the descriptor's position, which positional I/O ignores.
    fn seek(file: &File, offset: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
        let offset = off(offset)?;
        // SAFETY: lseek takes no pointers; the descriptor belongs to `file`, which stays
        // open for the whole call.
        let r = unsafe { libc::lseek(file.as_raw_fd(), offset, whence) };
        if r >= 0 {
            return Ok(Some(r as u64));
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENXIO) {
            Ok(None)
        } else {
            Err(e)
        }
    }

    /// The data extents of `file`'s first `size` bytes: ordered, non-empty, not touching,
    /// clamped to `size`, covering every byte that may not read as zero. `None` if the
    /// file system cannot tell (or answers inconsistently), so the caller must assume
    /// data everywhere.
    pub(super) fn data_extents(file: &File, size: u64) -> io::Result<Option<Vec<(Offset, u64)>>> {
        let mut extents = Vec::new();
        let mut pos = 0;
        while pos < size {
            let start = match seek(file, pos, libc::SEEK_DATA) {
                Ok(Some(start)) => start,
                Ok(None) => break,
                Err(e) if unsupported(&e) => return Ok(None),
                Err(e) => return Err(e),
            };
            if start < pos {
                return Ok(None);
            }
            if start >= size {
                break;
            }
            let end = match seek(file, start, libc::SEEK_HOLE) {
                Ok(Some(end)) => end,
                // The file shrank between the two calls: assume data up to the unit's end.
                Ok(None) => size,
                Err(e) if unsupported(&e) => return Ok(None),
                Err(e) => return Err(e),
            };
            if end <= start {
                return Ok(None);
            }
            let end = end.min(size);
            push_extent(&mut extents, start, end);
            pos = end;
        }
        Ok(Some(extents))
    }

    /// Deallocates `len` (> 0) bytes at `offset` of `file`, keeping its size; the range
    /// then reads as zeros. `Ok(false)` if the file system cannot, and nothing changed.
    pub(super) fn punch_hole(file: &File, offset: u64, len: u64) -> io::Result<bool> {
        let (Ok(offset), Ok(len)) = (off(offset), off(len)) else {
            return Ok(false);
        };
        loop {
            // SAFETY: fallocate takes no pointers; the descriptor belongs to `file`, which
            // stays open for the whole call.
            let r = unsafe {
                libc::fallocate(
                    file.as_raw_fd(),
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    offset,
                    len,
                )
            };
            if r == 0 {
                return Ok(true);
            }
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return if unsupported(&e) { Ok(false) } else { Err(e) };
        }
    }

    /// Allocates `len` (> 0) bytes at `offset` of `file` where they are not allocated,
    /// keeping its size and contents. `Ok(false)` if the file system cannot.
    pub(super) fn allocate(file: &File, offset: u64, len: u64) -> io::Result<bool> {
        let (Ok(offset), Ok(len)) = (off(offset), off(len)) else {
            return Ok(false);
        };
        loop {
            // SAFETY: as in `punch_hole`.
            let r = unsafe {
                libc::fallocate(file.as_raw_fd(), libc::FALLOC_FL_KEEP_SIZE, offset, len)
            };
            if r == 0 {
                return Ok(true);
            }
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return if unsupported(&e) { Ok(false) } else { Err(e) };
        }
    }

    /// Whether every block of `file` (`size` bytes) is allocated: a write into it needs
    /// no new space. A block device, or a file that cannot be examined, counts as dense.
    pub(super) fn dense(file: &File, size: u64) -> bool {
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        match file.metadata() {
            Ok(m) if m.file_type().is_block_device() => true,
            Ok(m) => m.blocks().saturating_mul(512) >= size,
            Err(_) => true,
        }
    }
}

/// Without hole support every file is dense: whole-unit extents, zeros written.
#[cfg(not(any(target_os = "linux", target_os = "android")))]
mod sparse {
    use super::Offset;
    use std::fs::File;
    use std::io;

    pub(super) fn data_extents(_: &File, _: u64) -> io::Result<Option<Vec<(Offset, u64)>>> {
        Ok(None)
    }

    pub(super) fn punch_hole(_: &File, _: u64, _: u64) -> io::Result<bool> {
        Ok(false)
    }

    pub(super) fn allocate(_: &File, _: u64, _: u64) -> io::Result<bool> {
        Ok(false)
    }

    pub(super) fn dense(_: &File, _: u64) -> bool {
        true
    }
}

/// A unit in memory. Clones share the same bytes, so a test can look at a unit the
/// engine is writing.
#[derive(Clone, Debug)]
pub struct MemStore {
    bytes: Arc<Mutex<Vec<u8>>>,
    /// The length of `bytes`, which never changes: `size` (asked per write, to reserve
    /// space) takes no lock.
    size: u64,
}

impl MemStore {
    pub fn new(size: u64) -> Self {
        let bytes = vec![0; size as usize];
        MemStore {
            size: bytes.len() as u64,
            bytes: Arc::new(Mutex::new(bytes)),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Vec<u8>> {
        // A poisoned lock only means another thread panicked mid-copy; the bytes are
        // still bytes.
        self.bytes.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A copy of the whole unit.
    pub fn snapshot(&self) -> Vec<u8> {
        self.lock().clone()
    }
}

impl BlockStore for MemStore {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, offset: Offset, buf: &mut [u8]) -> Result<(), StoreError> {
        let b = self.lock();
        check(b.len() as u64, offset, buf.len() as u64)?;
        let o = offset.0 as usize;
        buf.copy_from_slice(&b[o..o + buf.len()]);
        Ok(())
    }

    fn write_at(&self, offset: Offset, data: &[u8]) -> Result<(), StoreError> {
        let mut b = self.lock();
        check(b.len() as u64, offset, data.len() as u64)?;
        let o = offset.0 as usize;
        b[o..o + data.len()].copy_from_slice(data);
        Ok(())
    }

    fn write_zeroes(&self, offset: Offset, len: u64) -> Result<(), StoreError> {
        let mut b = self.lock();
        check(b.len() as u64, offset, len)?;
        let o = offset.0 as usize;
        b[o..o + len as usize].fill(0);
        Ok(())
    }

    /// The runs of 64 KiB chunks (the last one possibly shorter) that hold a non-zero
    /// byte: exact at chunk granularity, so a simulation sees a sparse unit the way a
    /// file system with 64 KiB blocks would report it.
    fn allocated(&self) -> Result<Vec<(Offset, u64)>, StoreError> {
        let b = self.lock();
        let mut extents = Vec::new();
        let mut start = 0u64;
        for chunk in b.chunks(ZERO_CHUNK as usize) {
            let end = start + chunk.len() as u64;
            if chunk.iter().any(|&x| x != 0) {
                push_extent(&mut extents, start, end);
            }
            start = end;
        }
        Ok(extents)
    }

    fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests;

/// Writes `pieces` back to back at `offset` of `file`: one `pwritev` per 1024 pieces (the
/// kernel's `IOV_MAX`), more if the kernel writes less than asked.
pub(crate) fn write_all_vectored_at(
    file: &std::fs::File,
    pieces: &[&[u8]],
    mut offset: u64,
) -> std::io::Result<()> {
    use std::io;
    use std::os::unix::io::AsRawFd;
    let mut i = 0;
    let mut skip = 0; // bytes of pieces[i] already written
    while i < pieces.len() {
        let iov: Vec<libc::iovec> = pieces[i..]
            .iter()
            .take(1024)
            .enumerate()
            .map(|(k, p)| {
                let p = if k == 0 { &p[skip..] } else { p };
                libc::iovec {
                    iov_base: p.as_ptr() as *mut libc::c_void,
                    iov_len: p.len(),
                }
            })
            .collect();
        let off = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset too large"))?;
        // SAFETY: every iovec points into a slice of `pieces`, borrowed for the whole
        // call; pwritev only reads them, and `iov` outlives the call.
        let n = unsafe {
            libc::pwritev(
                file.as_raw_fd(),
                iov.as_ptr(),
                iov.len() as libc::c_int,
                off,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 && iov.iter().any(|v| v.iov_len > 0) {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "failed to write whole buffer",
            ));
        }
        let mut n = n as usize;
        offset += n as u64;
        // Past what was written, and past empty pieces.
        while i < pieces.len() && n >= pieces[i].len() - skip {
            n -= pieces[i].len() - skip;
            i += 1;
            skip = 0;
        }
        skip += n;
    }
    Ok(())
}
