//! Fault injection for tests: make the journal's own file operations fail, as a disk
//! that fills up or breaks would, without a real one. A hook is registered for a
//! directory; every journal whose directory is inside it asks the hook before each
//! write, segment creation and fsync. Nothing is registered in production, and then
//! the check is one relaxed atomic load.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// What the journal is about to do to a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoOp {
    /// A positional write of appended records into an existing segment.
    Write,
    /// Creating (and writing the first bytes of) a new segment.
    Create,
    /// An fdatasync of a segment, or an fsync of a new segment or of the directory.
    Sync,
}

/// Decides whether an operation fails: `Some(error)` makes it fail with that error
/// (before it touches the file).
pub type FaultHook = Arc<dyn Fn(IoOp, &Path) -> Option<io::Error> + Send + Sync>;

static COUNT: AtomicUsize = AtomicUsize::new(0);
static HOOKS: Mutex<Vec<(u64, PathBuf, FaultHook)>> = Mutex::new(Vec::new());
static NEXT: AtomicUsize = AtomicUsize::new(1);

/// Removes its hook when dropped.
#[must_use = "the hook is removed when the guard is dropped"]
pub struct FaultGuard(u64);

impl Drop for FaultGuard {
    fn drop(&mut self) {
        let mut hooks = HOOKS.lock().unwrap_or_else(|e| e.into_inner());
        let before = hooks.len();
        hooks.retain(|(id, _, _)| *id != self.0);
        COUNT.fetch_sub(before - hooks.len(), Ordering::Relaxed);
    }
}

/// Registers `hook` for every journal in `dir` or below it, until the guard drops.
pub fn inject(dir: &Path, hook: FaultHook) -> FaultGuard {
    let id = NEXT.fetch_add(1, Ordering::Relaxed) as u64;
    let mut hooks = HOOKS.lock().unwrap_or_else(|e| e.into_inner());
    hooks.push((id, dir.to_path_buf(), hook));
    COUNT.fetch_add(1, Ordering::Relaxed);
    FaultGuard(id)
}

/// The error the hooks want `op` on `path` (a file of a journal in `dir`) to fail with.
pub(super) fn check(dir: &Path, op: IoOp, path: &Path) -> io::Result<()> {
    if COUNT.load(Ordering::Relaxed) == 0 {
        return Ok(());
    }
    let hooks: Vec<FaultHook> = HOOKS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .filter(|(_, d, _)| dir.starts_with(d))
        .map(|(_, _, h)| h.clone())
        .collect();
    for h in hooks {
        if let Some(e) = h(op, path) {
            return Err(e);
        }
    }
    Ok(())
}

/// A torn journal, as a power loss leaves one whose last segment was never synced: the
/// last segment (by name) of the journal in `dir` loses its last third, keeping at least
/// 64 bytes. Returns that segment, its length before and after, and how many segments
/// there are. `NotFound` if `dir` holds no segment.
pub fn tear_last_segment(dir: &Path) -> io::Result<(PathBuf, u64, u64, usize)> {
    let mut segs = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let path = e?.path();
        if path.extension().is_some_and(|x| x == "seg") {
            segs.push(path);
        }
    }
    segs.sort();
    let last = segs
        .last()
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no segment"))?;
    let len = std::fs::metadata(last)?.len();
    let keep = (len * 2 / 3).max(64);
    std::fs::OpenOptions::new()
        .write(true)
        .open(last)?
        .set_len(keep)?;
    Ok((last.clone(), len, keep, segs.len()))
}
