//! Small named types, so that a sequence number can never be passed where a time stamp
//! or a byte offset is expected.

use serde::{Deserialize, Serialize};
use std::fmt;

/// A time stamp from the primary's hybrid clock, in nanoseconds. Unique and strictly
/// increasing across a consistency group as handed out (invariant I2).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Timestamp(pub u64);

impl Timestamp {
    /// The value every pair starts from: below any time stamp a clock hands out.
    pub const ZERO: Timestamp = Timestamp(0);
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "t{}", self.0)
    }
}

/// A pair's own sequence number: 1, 2, 3, ... with no gaps. `Seq(0)` means "nothing yet".
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Seq(pub u64);

impl Seq {
    /// Before the first packet of a pair.
    pub const ZERO: Seq = Seq(0);

    /// The sequence number after this one.
    pub fn next(self) -> Seq {
        Seq(self.0 + 1)
    }
}

impl fmt::Display for Seq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// Identifies a remote copy pair within a consistency group.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct PairId(pub u32);

impl fmt::Display for PairId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pair{}", self.0)
    }
}

/// Identifies a system (a process holding units) within a group.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct SystemId(pub u32);

impl fmt::Display for SystemId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sys{}", self.0)
    }
}

/// A byte offset into a unit.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Offset(pub u64);

/// The stamp `(ts, seq)` carried by every packet.
///
/// For a data packet `seq` is the packet's own sequence number. For a heartbeat `seq` is
/// the last sequence number the pair had handed out when the heartbeat was stamped: it
/// promises that no packet of the pair with a higher `seq` has a time stamp `<= ts`.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Stamp {
    pub ts: Timestamp,
    pub seq: Seq,
}

impl Stamp {
    /// The stamp before anything was written.
    pub const ZERO: Stamp = Stamp {
        ts: Timestamp::ZERO,
        seq: Seq::ZERO,
    };

    pub fn new(ts: Timestamp, seq: Seq) -> Stamp {
        Stamp { ts, seq }
    }
}

impl fmt::Display for Stamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "({}, {})", self.ts, self.seq)
    }
}
