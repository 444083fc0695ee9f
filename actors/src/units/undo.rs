//! The undo file of one remote unit (format and rules: [`tidemark::undo`]): created
//! durably, appended and fdatasync'd before the unit applies what it saves, reopened
//! (torn tail cut) by a restarted unit and by `promote`, removed when the epoch closes.
//!
//! One file per unit: `<undo dir>/pair<N>.undo` (`journal_dir/undo/` for the daemon).

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use tidemark::undo::{self, Decoded, Header, UndoLog, UndoRecord};
use tidemark::{BlockStore, Packet, PairId, Resync, Timestamp};

/// What can go wrong with an undo file.
#[derive(Debug, thiserror::Error)]
pub enum UndoFileError {
    #[error("undo file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("undo file {path}: {source}")]
    Format {
        path: PathBuf,
        #[source]
        source: undo::UndoError,
    },
    #[error("undo file {path}: reading the unit to save it: {source}")]
    Store {
        path: PathBuf,
        #[source]
        source: tidemark::StoreError,
    },
}

/// Where `pair`'s undo file lives in `dir`.
pub fn undo_path(dir: &Path, pair: PairId) -> PathBuf {
    dir.join(format!("pair{}.undo", pair.0))
}

fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// An open undo file and its saved set.
#[derive(Debug)]
pub struct UndoFile {
    path: PathBuf,
    file: File,
    log: UndoLog,
}

impl UndoFile {
    fn io(path: &Path) -> impl Fn(io::Error) -> UndoFileError + '_ {
        move |source| UndoFileError::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    /// Creates `pair`'s file for an epoch at `base`, durably (written to a temporary
    /// file, synced, renamed, the directory synced), replacing any older one.
    pub fn create(
        dir: &Path,
        pair: PairId,
        base: Timestamp,
        region: u64,
        unit_size: u64,
    ) -> Result<UndoFile, UndoFileError> {
        let path = undo_path(dir, pair);
        let log =
            UndoLog::new(base, region, unit_size).map_err(|source| UndoFileError::Format {
                path: path.clone(),
                source,
            })?;
        let err = Self::io(&path);
        std::fs::create_dir_all(dir).map_err(&err)?;
        let tmp = path.with_extension("undo.tmp");
        {
            let mut f = File::create(&tmp).map_err(&err)?;
            f.write_all(&undo::encode_header(&log.header()))
                .map_err(&err)?;
            f.sync_data().map_err(&err)?;
        }
        std::fs::rename(&tmp, &path).map_err(&err)?;
        fsync_dir(dir).map_err(&err)?;
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .open(&path)
            .map_err(&err)?;
        file.seek(SeekFrom::End(0)).map_err(&err)?;
        Ok(UndoFile {
            path: path.clone(),
            file,
            log,
        })
    }

    /// Reads `pair`'s file, if there is one: its header and good frames. Changes nothing.
    pub fn read(dir: &Path, pair: PairId) -> Result<Option<Decoded>, UndoFileError> {
        let path = undo_path(dir, pair);
        let mut bytes = Vec::new();
        match File::open(&path) {
            Ok(mut f) => f.read_to_end(&mut bytes).map_err(Self::io(&path))?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Self::io(&path)(e)),
        };
        undo::decode(&bytes)
            .map(Some)
            .map_err(|source| UndoFileError::Format { path, source })
    }

    /// Reopens `pair`'s file to go on saving: the torn tail, if any, is cut off (and
    /// the cut synced) first. Returns the file and what it held; `None` if there is
    /// none.
    pub fn reopen(
        dir: &Path,
        pair: PairId,
        unit_size: u64,
    ) -> Result<Option<(UndoFile, Decoded)>, UndoFileError> {
        let Some(decoded) = Self::read(dir, pair)? else {
            return Ok(None);
        };
        let path = undo_path(dir, pair);
        let err = Self::io(&path);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(&err)?;
        if decoded.torn.is_some() {
            tracing::warn!(path = %path.display(), valid = decoded.valid_len, torn = ?decoded.torn,
                "undo file: torn tail cut off");
            file.set_len(decoded.valid_len).map_err(&err)?;
            file.sync_data().map_err(&err)?;
        }
        drop(file);
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .open(&path)
            .map_err(&err)?;
        file.seek(SeekFrom::End(0)).map_err(&err)?;
        let log = UndoLog::from_decoded(&decoded, unit_size);
        Ok(Some((
            UndoFile {
                path: path.clone(),
                file,
                log,
            },
            decoded,
        )))
    }

    /// Removes `pair`'s file (and syncs the directory); no file is fine.
    pub fn remove(dir: &Path, pair: PairId) -> Result<(), UndoFileError> {
        let path = undo_path(dir, pair);
        match std::fs::remove_file(&path) {
            Ok(()) => fsync_dir(dir).map_err(Self::io(&path)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Self::io(&path)(e)),
        }
    }

    pub fn header(&self) -> Header {
        self.log.header()
    }

    pub fn base(&self) -> Timestamp {
        self.log.base()
    }

    /// Bytes of the file.
    pub fn bytes(&self) -> u64 {
        self.log.bytes()
    }

    pub fn log(&self) -> &UndoLog {
        &self.log
    }

    /// Where `batch` passes the base ([`UndoLog::split`]).
    pub fn split(&self, batch: &[Packet]) -> usize {
        self.log.split(batch)
    }

    /// Saves what `above` (packets stamped above the base, about to be applied) would
    /// overwrite and is not saved yet, read from `store` as it is now, plus a `status`
    /// frame if given; one write and one fdatasync. Only once this returned `Ok` may
    /// `above` be applied. On an error nothing new counts as saved (a frame written
    /// before a failed sync is either cut as a torn tail or, if it did reach the disk,
    /// holds the same bytes a retry would save).
    pub fn save(
        &mut self,
        store: &dyn BlockStore,
        above: &[Packet],
        status: Option<Option<Resync>>,
    ) -> Result<(), UndoFileError> {
        let regions = self.log.to_save(above);
        if regions.is_empty() && status.is_none() {
            return Ok(());
        }
        let mut out = Vec::new();
        let mut sizes = Vec::with_capacity(regions.len());
        for &(offset, len) in &regions {
            let mut data = vec![0u8; len as usize];
            store
                .read_at(offset, &mut data)
                .map_err(|source| UndoFileError::Store {
                    path: self.path.clone(),
                    source,
                })?;
            let frame = undo::encode_record(&UndoRecord::Saved { offset, data });
            sizes.push(frame.len() as u64);
            out.extend(frame);
        }
        let status_bytes = status.map(|s| undo::encode_record(&UndoRecord::Status(s)));
        if let Some(frame) = &status_bytes {
            out.extend_from_slice(frame);
        }
        let err = Self::io(&self.path);
        self.file.write_all(&out).map_err(&err)?;
        self.file.sync_data().map_err(&err)?;
        for (&(offset, _), n) in regions.iter().zip(sizes) {
            self.log.saved(offset, n);
        }
        if let Some(frame) = status_bytes {
            self.log.appended(frame.len() as u64);
        }
        Ok(())
    }

    /// Appends a [`UndoRecord::Restored`] frame, synced (`promote` rolled the unit back).
    pub fn mark_restored(&mut self) -> Result<(), UndoFileError> {
        let frame = undo::encode_record(&UndoRecord::Restored);
        let err = Self::io(&self.path);
        self.file.write_all(&frame).map_err(&err)?;
        self.file.sync_data().map_err(&err)?;
        self.log.appended(frame.len() as u64);
        Ok(())
    }
}
