//! Errors of the actor layer and the library start-up.

use tidemark::{PairId, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("system {0} is running (its journal_dir is locked)")]
    Running(String),
    /// `tidemark export` on a secondary whose remote units are not yet the cut at its
    /// durable commit limit.
    #[error("system {system} was not promoted: {detail}; run `tidemark promote` first")]
    NotPromoted { system: String, detail: String },
    #[error("config: {0}")]
    Config(String),
    #[error("invalid topology: {0}")]
    Topology(String),
    #[error("invalid impairment: {0}")]
    Impairment(String),
    #[error("{0} has no unit in this process")]
    NotHere(PairId),
    #[error("unknown pair {0}")]
    NoSuchPair(PairId),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("unit failed: {0}")]
    Unit(String),
    #[error("journal: {0}")]
    Journal(String),
    #[error("timed out: {0}")]
    Timeout(String),
    #[error("the engine has stopped")]
    Stopped,
}

impl From<actix::MailboxError> for EngineError {
    fn from(_: actix::MailboxError) -> Self {
        EngineError::Stopped
    }
}
