//! Errors of the actor layer and the library start-up.
//!
//! The variants fall in two kinds, and [`EngineError::is_usage`] tells which: a bad
//! description (config, topology, flags, a system that is already running) that the
//! operator must change before trying again, and a runtime failure (I/O, a journal, a
//! unit, a failed disk) that happened while doing what was asked. The `tidemark` binary
//! exits 2 for the first kind and 1 for the second.

use crate::health::Failure;
use std::path::PathBuf;
use tidemark::journal::JournalError;
use tidemark::{PairId, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    // --- The description is wrong (usage). ---
    /// A config file, a flag or an argument is malformed or inconsistent.
    #[error("config: {0}")]
    Config(String),
    #[error("invalid topology: {0}")]
    Topology(String),
    #[error("invalid impairment: {0}")]
    Impairment(String),
    #[error("system {0} is running (its journal_dir is locked)")]
    Running(String),
    /// `tidemark export` on a secondary whose remote units are not yet the cut at its
    /// durable commit limit.
    #[error("system {system} was not promoted: {detail}; run `tidemark promote` first")]
    NotPromoted { system: String, detail: String },
    /// `promote` or `export` on remote units whose initial sync has not finished: they
    /// are not a consistent cut. `--force` takes them as they are.
    #[error(
        "{command}: initial sync not finished for {pairs}: the remote unit is NOT a consistent \
         cut (its data is a mix of old and new blocks); nothing was changed. Let the sync \
         finish (run both sites until the primary's status shows the pair `replicating`), \
         or give --force to take the units as they are"
    )]
    SyncUnfinished { command: String, pairs: String },
    #[error("{0} has no unit in this process")]
    NotHere(PairId),
    #[error("unknown pair {0}")]
    NoSuchPair(PairId),

    // --- Something failed while running (runtime). ---
    /// An operating-system call failed: binding a socket, creating a runtime, writing a
    /// file the operator named.
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("journal {}: {source}", dir.display())]
    Journal {
        dir: PathBuf,
        #[source]
        source: JournalError,
    },
    /// A journal's content does not allow what was asked (e.g. a gap below the limit).
    #[error("journal: {0}")]
    JournalState(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("unit failed: {0}")]
    Unit(String),
    /// A write found no room on the primary's file system (its journal's or its unit's,
    /// ENOSPC): nothing of it was journaled, written or shipped, and the unit goes on.
    /// NBD clients get `NBD_ENOSPC`; the write may be retried once space is freed.
    #[error("no space: {0}")]
    NoSpace(String),
    /// A part of the engine stopped keeping its guarantees (see [`crate::health`]).
    #[error("{0}")]
    Failed(Failure),
    #[error("timed out: {0}")]
    Timeout(String),
    /// The request cannot be served in the unit's present state (a pair that does not
    /// replicate cannot be repaired); it may succeed later.
    #[error("busy: {0}")]
    Busy(String),
    /// Stopping did not finish cleanly (grace period over, or a second signal).
    #[error("shutdown: {0}")]
    Shutdown(String),
    #[error("the engine has stopped")]
    Stopped,
    /// New writes are refused for a planned switchover (`tidemark switchover`): the
    /// pair's role moves to the other site; NBD clients get `ESHUTDOWN`.
    #[error("{0}: quiesced for a planned switchover; writes are refused")]
    Quiesced(String),
}

impl EngineError {
    /// An I/O failure, with what was being done.
    pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> EngineError {
        let what = what.into();
        move |source| EngineError::Io { what, source }
    }

    /// Whether the error is the operator's description (config, flags, topology, a
    /// system already running, a pair size that does not match its disk) rather than a
    /// failure while running. Only these make the binary exit 2.
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            EngineError::Config(_)
                | EngineError::Topology(_)
                | EngineError::Impairment(_)
                | EngineError::Running(_)
                | EngineError::NotPromoted { .. }
                | EngineError::SyncUnfinished { .. }
                | EngineError::NotHere(_)
                | EngineError::NoSuchPair(_)
                | EngineError::Store(StoreError::SizeMismatch { .. })
        )
    }
}

impl From<actix::MailboxError> for EngineError {
    fn from(_: actix::MailboxError) -> Self {
        EngineError::Stopped
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_descriptions_are_usage_errors() {
        let io = || std::io::Error::other("disk on fire");
        let cases: Vec<(EngineError, bool)> = vec![
            (EngineError::Config("x".into()), true),
            (EngineError::Topology("x".into()), true),
            (EngineError::Impairment("x".into()), true),
            (EngineError::Running("a".into()), true),
            (
                EngineError::SyncUnfinished {
                    command: "promote".into(),
                    pairs: "log (site-b)".into(),
                },
                true,
            ),
            (EngineError::NoSuchPair(PairId(3)), true),
            (
                EngineError::io("cannot listen on udp 127.0.0.1:1")(io()),
                false,
            ),
            (
                EngineError::Journal {
                    dir: "/j".into(),
                    source: JournalError::Failed,
                },
                false,
            ),
            (EngineError::JournalState("gap".into()), false),
            (EngineError::Unit("p0: local write".into()), false),
            (
                EngineError::Failed(Failure {
                    component: "system b".into(),
                    error: "fsync".into(),
                }),
                false,
            ),
            (EngineError::Timeout("x".into()), false),
            (EngineError::Busy("x".into()), false),
            (EngineError::Shutdown("x".into()), false),
            (EngineError::Stopped, false),
            (EngineError::Quiesced("log".into()), false),
        ];
        for (e, usage) in cases {
            assert_eq!(e.is_usage(), usage, "{e}");
        }
    }
}
