//! A system's journal as its actors use it: shared by the units and the site of one
//! system, and only ever touched from disk jobs (never on an actor thread).
//!
//! Durability policy:
//! - primary: a write's packet is appended and *written* (to the operating system)
//!   before its client is told: a crash of the process loses nothing acknowledged. Flush
//!   and FUA *sync* the journal (fdatasync) as well as the local unit: then a power loss
//!   loses nothing either (block-device write-cache semantics).
//! - remote: a received packet is synced before it is acknowledged or counted in the run
//!   head (I3); a limit is synced before anything below it is applied (I4).

use crate::error::EngineError;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use tidemark::journal::{Journal, JournalError, JournalOptions, Record, Recovered};

/// How far an append must get before it returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    /// Written to the operating system (survives a process crash).
    Written,
    /// Synced to the device (survives a power loss).
    Synced,
}

#[derive(Clone)]
pub struct SharedJournal {
    inner: Arc<Mutex<Journal>>,
    /// Group commit: appends taken and appends known durable, and one syncer at a time.
    tickets: Arc<Mutex<(u64, u64)>>,
    syncer: Arc<Mutex<()>>,
    /// `(used, capacity)` as of the last append or sync, readable on an actor thread
    /// without the journal's lock (write pacing reads it per write).
    fill: Arc<(AtomicU64, AtomicU64)>,
}

impl SharedJournal {
    /// Opens (recovering) the journal in `dir` of `capacity` bytes.
    pub fn open(dir: &Path, capacity: u64) -> Result<(SharedJournal, Recovered), EngineError> {
        std::fs::create_dir_all(dir)
            .map_err(EngineError::io(format!("journal {}", dir.display())))?;
        let (j, r) =
            Journal::open(dir, JournalOptions::with_capacity(capacity)).map_err(|source| {
                EngineError::Journal {
                    dir: dir.to_path_buf(),
                    source,
                }
            })?;
        if let Some(t) = &r.tail {
            tracing::warn!(segment = t.segment, offset = t.offset, dropped = t.dropped, reason = %t.reason,
                "journal: cut a torn tail on recovery");
        }
        let fill = Arc::new((
            AtomicU64::new(j.used()),
            AtomicU64::new(j.options().capacity),
        ));
        Ok((
            SharedJournal {
                fill,
                inner: Arc::new(Mutex::new(j)),
                tickets: Arc::new(Mutex::new((0, 0))),
                syncer: Arc::new(Mutex::new(())),
            },
            r,
        ))
    }

    fn lock(&self) -> MutexGuard<'_, Journal> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records the journal's use for [`SharedJournal::fill`].
    fn note_fill(&self, j: &Journal) {
        self.fill.0.store(j.used(), Ordering::Relaxed);
    }

    /// Bytes in use and capacity as of the last append or sync: never blocks (for an
    /// actor thread; [`SharedJournal::used`] takes the lock).
    pub fn fill(&self) -> (u64, u64) {
        (
            self.fill.0.load(Ordering::Relaxed),
            self.fill.1.load(Ordering::Relaxed),
        )
    }

    /// Appends `records` (all or none) and makes them as durable as asked. Blocking.
    /// [`JournalError::NoSpace`]: the file system was full; nothing of `records` is in
    /// the journal, which goes on (see [`Journal::append_and_write`]). Any other error
    /// fails the journal.
    /// Callers asking for `Synced` at the same time share one fdatasync (group commit):
    /// a caller whose records a concurrent sync already covered returns without its own.
    pub fn append(&self, records: &[Record], durability: Durability) -> Result<(), JournalError> {
        let ticket = {
            let mut j = self.lock();
            // Written under the lock, always: a batch the file system has no room for is
            // rolled back to the written end before it (`JournalError::NoSpace`), which
            // then holds no other caller's records.
            let synced = durability == Durability::Synced;
            match j.append_and_write(records, synced) {
                Ok(()) => {}
                Err(JournalError::Full { .. }) => {
                    // Space comes back only when a sync makes the release watermarks
                    // durable and lets covered segments go: try that once.
                    j.sync()?;
                    self.note_fill(&j);
                    j.append_and_write(records, synced)?;
                }
                Err(e) => return Err(e),
            }
            self.note_fill(&j);
            let mut t = self.tickets.lock().unwrap_or_else(|e| e.into_inner());
            t.0 += 1;
            if !synced {
                return Ok(());
            }
            t.0
        };
        let _one = self.syncer.lock().unwrap_or_else(|e| e.into_inner());
        if self.tickets.lock().unwrap_or_else(|e| e.into_inner()).1 >= ticket {
            return Ok(());
        }
        let mut j = self.lock();
        let upto = self.tickets.lock().unwrap_or_else(|e| e.into_inner()).0;
        j.sync()?;
        self.note_fill(&j);
        self.tickets.lock().unwrap_or_else(|e| e.into_inner()).1 = upto;
        Ok(())
    }

    /// Syncs everything appended so far (and lets the journal reclaim space). Blocking.
    pub fn sync(&self) -> Result<(), JournalError> {
        let mut j = self.lock();
        j.sync()?;
        self.note_fill(&j);
        Ok(())
    }

    /// The journal's sizes.
    pub fn options(&self) -> JournalOptions {
        self.lock().options()
    }

    /// Bytes in use, for status.
    pub fn used(&self) -> u64 {
        self.lock().used()
    }
}
