//! tidemark's core: ordering, run tracking, the send side, packets and their wire
//! format, and block storage. No runtime, no sockets, no clocks read directly: every
//! state machine here takes events (with the time, where it matters) and returns what to
//! do, so it can be tested deterministically.
//!
//! The invariants I1–I6 are stated in `docs/design.md`; the modules say which
//! of them they keep.

pub mod clock;
pub mod dirty;
#[doc(hidden)]
pub mod fuzzing;
pub mod intake;
pub mod journal;
pub mod link;
pub mod nbd;
pub mod order;
pub mod pace;
pub mod packet;
pub mod run;
pub mod seal;
pub mod ship;
pub mod storage;
pub mod timebase;
pub mod types;
pub mod undo;
pub mod verify;
pub mod wire;

pub use clock::{HybridClock, WallClock};
pub use intake::{Intake, Offer};
pub use order::{OrderAction, OrderError, Orderer};
pub use packet::{Ack, HeadReport, Heartbeat, Mark, Message, Packet, Payload, Resync, SeqRange};
pub use run::{Received, RunTracker};
pub use ship::{Rtt, Sender};
pub use storage::{BlockStore, FileStore, MemStore, StoreError};
pub use types::{Offset, PairId, Seq, Stamp, SystemId, Timestamp};

/// The seed of a seeded test: `TIDEMARK_SEED` if set (to replay a failure), else
/// `default`.
#[cfg(test)]
pub(crate) fn test_seed(default: u64) -> u64 {
    std::env::var("TIDEMARK_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}
