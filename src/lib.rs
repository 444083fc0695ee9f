//! tidemark's core: ordering, run tracking, the send side, packets and their wire
//! format, and block storage. No runtime, no sockets, no clocks read directly: every
//! state machine here takes events (with the time, where it matters) and returns what to
//! do, so it can be tested deterministically.
//!
//! The invariants I1–I6 are stated in `docs/design.md`; the modules say which
//! of them they keep.

pub mod clock;
pub mod dirty;
pub mod intake;
pub mod journal;
pub mod link;
pub mod nbd;
pub mod order;
pub mod packet;
pub mod run;
pub mod seal;
pub mod ship;
pub mod storage;
pub mod timebase;
pub mod types;
pub mod undo;
pub mod wire;

pub use clock::{HybridClock, WallClock};
pub use intake::{Intake, Offer};
pub use order::{OrderAction, OrderError, Orderer};
pub use packet::{Ack, HeadReport, Heartbeat, Mark, Message, Packet, Payload, Resync, SeqRange};
pub use run::{Received, RunTracker};
pub use ship::{Rtt, Sender};
pub use storage::{BlockStore, FileStore, MemStore, StoreError};
pub use types::{Offset, PairId, Seq, Stamp, SystemId, Timestamp};
