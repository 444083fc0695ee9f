//! Whether a primary's last run ended with the machine going down: a marker file in the
//! journal directory holds the boot id of the run that wrote it, and a clean shutdown
//! removes it.
//!
//! Why: the primary's journal appends are written to the operating system, and synced
//! only on FLUSH/FUA and at reservations. A process crash (kill -9) loses nothing
//! written; a power loss or a kernel crash may lose an unsynced tail, with packets the
//! remote already holds. Only the second case needs the restart procedure (a `Restart`
//! mark and a full resync); the marker tells the two apart.

use crate::error::EngineError;
use std::io::Write;
use std::path::{Path, PathBuf};

/// The marker's file name in a journal directory.
pub const MARKER: &str = "running";

/// This boot of the machine (Linux: `/proc/sys/kernel/random/boot_id`); `None` where
/// it cannot be read, and then no reboot is ever detected.
fn boot_id() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

/// Reads the marker a previous run left in `dir` (before [`mark_running`] replaces it):
/// true if that run did not stop cleanly and the machine has rebooted since (a power
/// loss may have torn the journal's unsynced tail).
pub fn unclean_reboot(dir: &Path) -> bool {
    let Ok(old) = std::fs::read_to_string(dir.join(MARKER)) else {
        return false;
    };
    match boot_id() {
        Some(now) => old.trim() != now,
        None => false,
    }
}

/// Writes the marker of this run into `dir`, durably (file, then directory).
pub fn mark_running(dir: &Path) -> Result<PathBuf, EngineError> {
    let path = dir.join(MARKER);
    let io = |source| EngineError::Io {
        what: format!("{}", path.display()),
        source,
    };
    let tmp = dir.join(format!("{MARKER}.tmp"));
    let mut f = std::fs::File::create(&tmp).map_err(io)?;
    f.write_all(boot_id().unwrap_or_default().as_bytes())
        .map_err(io)?;
    f.sync_all().map_err(io)?;
    std::fs::rename(&tmp, &path).map_err(io)?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io)?;
    Ok(path)
}

/// A clean shutdown: everything journaled was synced, so the next run needs no restart
/// procedure whatever happens to the machine meanwhile.
pub fn mark_stopped(marker: &Path) {
    if let Err(e) = std::fs::remove_file(marker) {
        tracing::warn!(marker = %marker.display(), "could not remove the run marker: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_marker_of_another_boot_is_an_unclean_reboot() {
        let dir = tempfile::tempdir().unwrap();
        assert!(
            !unclean_reboot(dir.path()),
            "no marker: a first or clean start"
        );
        let m = mark_running(dir.path()).unwrap();
        assert!(
            !unclean_reboot(dir.path()),
            "same boot: a process crash at most"
        );
        if boot_id().is_some() {
            std::fs::write(&m, "another-boot").unwrap();
            assert!(unclean_reboot(dir.path()));
        }
        mark_stopped(&m);
        assert!(!unclean_reboot(dir.path()));
    }
}
