//! Block storage behind a trait: a file backend (positional reads and writes, flush) and
//! an in-memory one for tests and simulations.
//!
//! Every access is range-checked against the unit's size before it touches anything.

use crate::packet::Payload;
use crate::types::Offset;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
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

/// A unit's bytes. Implementations are positional; they keep no cursor.
pub trait BlockStore: Send + Sync {
    /// The unit's size in bytes.
    fn size(&self) -> u64;
    fn read_at(&self, offset: Offset, buf: &mut [u8]) -> Result<(), StoreError>;
    fn write_at(&self, offset: Offset, data: &[u8]) -> Result<(), StoreError>;
    /// Writes `len` zero bytes at `offset`.
    fn write_zeroes(&self, offset: Offset, len: u64) -> Result<(), StoreError> {
        check(self.size(), offset, len)?;
        const CHUNK: u64 = 1 << 16;
        let zeros = vec![0u8; CHUNK.min(len) as usize];
        let mut done = 0;
        while done < len {
            let n = CHUNK.min(len - done);
            self.write_at(Offset(offset.0 + done), &zeros[..n as usize])?;
            done += n;
        }
        Ok(())
    }
    /// Makes everything written so far durable.
    fn flush(&self) -> Result<(), StoreError>;

    /// Applies a replicated payload (idempotent).
    fn apply(&self, payload: &Payload) -> Result<(), StoreError> {
        match payload {
            Payload::Write { offset, data } => self.write_at(*offset, data),
            Payload::Zero { offset, len } => self.write_zeroes(*offset, *len),
            Payload::Mark(_) => Ok(()),
        }
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
        Ok(FileStore {
            file,
            path: path.to_path_buf(),
            size,
            read_only,
        })
    }

    /// Whether the store was opened with [`FileStore::open_read_only`].
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    pub fn path(&self) -> &Path {
        &self.path
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

    fn flush(&self) -> Result<(), StoreError> {
        if self.read_only {
            // Nothing was written through this store.
            return Ok(());
        }
        self.file.sync_data().map_err(|e| self.io(e))
    }
}

/// A unit in memory. Clones share the same bytes, so a test can look at a unit the
/// engine is writing.
#[derive(Clone, Debug)]
pub struct MemStore {
    bytes: Arc<Mutex<Vec<u8>>>,
}

impl MemStore {
    pub fn new(size: u64) -> Self {
        MemStore {
            bytes: Arc::new(Mutex::new(vec![0; size as usize])),
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
        self.lock().len() as u64
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

    fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exercise(s: &dyn BlockStore) {
        s.write_at(Offset(10), b"abcdef").expect("in range");
        s.write_zeroes(Offset(12), 2).expect("in range");
        let mut buf = [0u8; 6];
        s.read_at(Offset(10), &mut buf).expect("in range");
        assert_eq!(&buf, b"ab\0\0ef");
        assert!(matches!(
            s.write_at(Offset(4094), b"abc"),
            Err(StoreError::OutOfRange { .. })
        ));
        assert!(matches!(
            s.write_at(Offset(u64::MAX), b"a"),
            Err(StoreError::OutOfRange { .. })
        ));
        assert!(matches!(
            s.write_zeroes(Offset(4000), 100),
            Err(StoreError::OutOfRange { .. })
        ));
        s.flush().expect("flush");
    }

    #[test]
    fn mem_store() {
        exercise(&MemStore::new(4096));
    }

    #[test]
    fn file_store_creates_and_checks_size() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("u.img");
        let s = FileStore::open_or_create(&p, 4096).expect("create");
        exercise(&s);
        drop(s);
        assert!(
            FileStore::open_or_create(&p, 4096).is_ok(),
            "reopen same size"
        );
        match FileStore::open_or_create(&p, 8192) {
            Err(StoreError::SizeMismatch { found, want, .. }) => {
                assert_eq!((found, want), (4096, 8192))
            }
            other => panic!("expected a size mismatch, got {other:?}"),
        }
        assert_eq!(
            std::fs::metadata(&p).expect("meta").len(),
            4096,
            "untouched"
        );
    }

    #[test]
    fn a_read_only_file_store_reads_and_never_writes() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("u.img");
        let bytes: Vec<u8> = (0..4096u32).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(&p, &bytes).expect("write");
        // No write permission at all: opening must not ask for it.
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o444)).expect("chmod");
        let s = FileStore::open_read_only(&p, 4096).expect("open read-only");
        assert!(s.is_read_only());
        let mut buf = [0u8; 100];
        s.read_at(Offset(1000), &mut buf).expect("read");
        assert_eq!(&buf[..], &bytes[1000..1100]);
        for r in [
            s.write_at(Offset(0), b"x"),
            s.write_zeroes(Offset(0), 512),
            s.apply(&crate::packet::Payload::Write {
                offset: Offset(8),
                data: bytes::Bytes::from_static(b"abc"),
            }),
        ] {
            assert!(matches!(r, Err(StoreError::ReadOnly { .. })), "{r:?}");
        }
        s.flush().expect("flush");
        assert_eq!(std::fs::read(&p).expect("read"), bytes, "unchanged");
        // Never created, never resized.
        assert!(matches!(
            FileStore::open_read_only(&dir.path().join("missing.img"), 4096),
            Err(StoreError::Io { .. })
        ));
        assert!(!dir.path().join("missing.img").exists());
        assert!(matches!(
            FileStore::open_read_only(&p, 8192),
            Err(StoreError::SizeMismatch { .. })
        ));
        assert_eq!(std::fs::metadata(&p).expect("meta").len(), 4096);
    }
}
