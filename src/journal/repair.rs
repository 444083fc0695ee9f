//! Recovery's file operations: what [`Journal::open`](super::Journal::open) reads of its
//! directory for [`recovery::plan`], and carrying out the plan's repairs and deletions.
//! Nothing here decides anything.

use super::format::{self, FileKind};
use super::recovery::{self, Listed, Listing, Repair};
use super::{fsync_dir, io_err, JournalError};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read};
use std::path::Path;

/// Creates `dir` if it is not a directory yet, durably (its parent fsync'd).
pub(super) fn create_dir(dir: &Path) -> Result<(), JournalError> {
    if !dir.is_dir() {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            fsync_dir(parent)?;
        }
    }
    Ok(())
}

/// The segments (with their header flags) and temporary files in `dir`; other files are
/// ignored.
pub(super) fn list(dir: &Path) -> Result<Listing, JournalError> {
    let mut segnos = Vec::new();
    let mut temps = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err(dir))? {
        let entry = entry.map_err(io_err(dir))?;
        match format::classify(&entry.file_name().to_string_lossy()) {
            FileKind::Segment(n) => segnos.push(n),
            FileKind::Temp(n) => temps.push(n),
            FileKind::Other => {}
        }
    }
    segnos.sort_unstable();
    let segments = segnos
        .into_iter()
        .map(|segno| {
            let head = read_header(dir, segno)?;
            Ok(Listed {
                segno,
                flags: recovery::header_flags(&head, segno),
            })
        })
        .collect::<Result<_, JournalError>>()?;
    Ok(Listing { segments, temps })
}

/// The first bytes of segment `segno` (its header, or fewer if the file is shorter).
fn read_header(dir: &Path, segno: u64) -> Result<Vec<u8>, JournalError> {
    let path = dir.join(format::segment_name(segno));
    let mut head = Vec::with_capacity(format::HEADER_LEN);
    File::open(&path)
        .and_then(|f| f.take(format::HEADER_LEN as u64).read_to_end(&mut head))
        .map_err(io_err(&path))?;
    Ok(head)
}

/// The bytes of segment `segno`.
pub(super) fn read_segment(dir: &Path, segno: u64) -> Result<Vec<u8>, JournalError> {
    let path = dir.join(format::segment_name(segno));
    fs::read(&path).map_err(io_err(&path))
}

/// Makes the `repairs` of a plan, in order. When it returns `Ok`, every segment kept is
/// durable as the plan left it (a rewrite also fsyncs the directory; a cut or a removal
/// of a temporary file reaches the directory with the next directory fsync).
pub(super) fn apply(dir: &Path, repairs: &[Repair]) -> Result<(), JournalError> {
    for repair in repairs {
        match repair {
            Repair::RemoveTemp(segno) => remove(&dir.join(format::temp_name(*segno)))?,
            Repair::Sync(segno) => {
                let path = dir.join(format::segment_name(*segno));
                open_for_writing(&path)?
                    .sync_data()
                    .map_err(io_err(&path))?;
            }
            Repair::Cut { segno, len } => {
                let path = dir.join(format::segment_name(*segno));
                let file = open_for_writing(&path)?;
                file.set_len(*len)
                    .and_then(|()| file.sync_all())
                    .map_err(io_err(&path))?;
            }
            Repair::Rewrite { segno, bytes } => {
                let temp = dir.join(format::temp_name(*segno));
                let path = dir.join(format::segment_name(*segno));
                fs::write(&temp, bytes)
                    .and_then(|()| File::open(&temp).and_then(|f| f.sync_all()))
                    .map_err(io_err(&temp))?;
                fs::rename(&temp, &path).map_err(io_err(&path))?;
                fsync_dir(dir)?;
            }
        }
    }
    Ok(())
}

/// Deletes the segments `segnos`, in order, then fsyncs the directory (if there were
/// any). Only once the repairs are durable: the newest checkpoint is what allows it.
pub(super) fn delete(dir: &Path, segnos: &[u64]) -> Result<(), JournalError> {
    for &segno in segnos {
        remove(&dir.join(format::segment_name(segno)))?;
    }
    if !segnos.is_empty() {
        fsync_dir(dir)?;
    }
    Ok(())
}

/// Opens segment `segno` to append to it.
pub(super) fn open_active(dir: &Path, segno: u64) -> Result<File, JournalError> {
    let path = dir.join(format::segment_name(segno));
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .map_err(io_err(&path))
}

fn open_for_writing(path: &Path) -> Result<File, JournalError> {
    OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(io_err(path))
}

/// Removes a file; one already gone is fine.
fn remove(path: &Path) -> Result<(), JournalError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err(path)(e)),
    }
}
