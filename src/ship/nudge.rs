//! Nudges: an idle pair promises past a sibling's write at once, not at its next
//! heartbeat.
//!
//! The commit limit is the earliest head time stamp over the pairs of a group. When one
//! pair is written and the others are idle, the write's stamp `W` can be applied only
//! once every idle pair's head passed `W`, which a timer heartbeat does up to a
//! heartbeat interval later. So a local unit that stamps a batch (last stamp `W`)
//! **nudges** the other local units stamping from the same hybrid clock: "promise past
//! `W`". Each nudged unit answers from its own [`Sender`] with an ordinary heartbeat
//! stamped fresh from the clock ([`Sender::answer_nudge`]), and the limit passes `W` one
//! round trip after the write left, whatever the heartbeat interval.
//!
//! **Invariant (I1 is untouched).** The promise "pair Q has nothing newer than `seq` S as
//! of `ts` T" is valid only if Q's next stamp is above T. A nudge never makes a promise:
//! it only asks Q to make one *sooner*. Q makes it itself, in [`Sender::heartbeat`],
//! which takes `&mut Sender`: the same exclusive borrow every stamp of Q
//! ([`Sender::push_held`]) takes, so the promise and Q's stamping are mutually exclusive
//! by construction, and the next stamp is above the promise (`push_held` stamps at least
//! `last.ts + 1`). No other actor writes Q's head, and nothing any other actor does
//! between the nudge and the answer can make the answer wrong: it is exactly a timer
//! heartbeat that came early.
//!
//! **Only idle pairs are nudged; a busy pair settles.** A pair is *busy* from the batch
//! it stamps until nothing of it is on its disk lane or waiting to be stamped; then it
//! *settles*. [`NudgeBox`] holds an `idle` flag its own unit keeps
//! ([`NudgeBox::set_busy`], [`NudgeBox::settle`]) and the highest `W` asked and not yet
//! taken (0: none). A writer nudges only siblings whose flag says idle
//! ([`NudgeBox::wants`]); a busy pair, when it settles, reads the newest stamp the clock
//! handed out and, if it is above its own last stamp or promise, promises past it at
//! once ([`Sender::answer_nudge`] with that stamp). So under load (every pair busy) a
//! batch costs a fence and one relaxed load per sibling and sends no message.
//!
//! *No write is missed between the two.* The writer: stamps `W` (a read-modify-write of
//! the clock), a `SeqCst` fence ([`before_nudging`]), loads the sibling's flag. The
//! settling pair: stores its flag idle, a `SeqCst` fence, loads the clock's newest stamp.
//! Two `SeqCst` fences forbid both loads missing the other side's store (the
//! store-buffering pattern): either the writer sees the pair idle and nudges it, or the
//! pair's load sees `W` (or later) and it promises past `W` itself (both: one heartbeat
//! too many, harmless).
//!
//! **Coalescing.** [`NudgeBox::request`] raises the wanted stamp (`fetch_max`) and says
//! whether the caller must send the pair a nudge message (only when none was pending), so
//! a pair has at most one nudge in its mailbox however many siblings write;
//! [`NudgeBox::take`] empties it when the message is handled. A request made while one is
//! pending is not lost: the pending message's `take` sees it (both are read-modify-writes
//! of one atomic, so the request precedes the take in its modification order). A pair
//! busy again when the message arrives ignores it: it settles later, after the take, and
//! then reads a clock at or past `W`.
//!
//! **Why the answer passes `W`.** The requester stamped `W` from the hybrid clock before
//! its `request` (release); the answer reads the clock after its `take` (acquire) read
//! a value at or above `W`; so the clock hands the answer a stamp above `W` (I2: stamps
//! strictly increase as handed out). A pair that stamped or promised at or above the
//! wanted `ts` since need not answer: its head passes `W` with what it sent
//! ([`Sender::answer_nudge`] returns `None`).
//!
//! **What it costs.** A busy group: per stamped batch a fence and one relaxed load per
//! sibling, and per busy spell of a pair at most one heartbeat when it settles. An idle
//! group: nothing; the timer heartbeat still runs for a group with no traffic at all
//! (I5), and catches anything this misses (a unit that stops settling, say).

use super::Sender;
use crate::clock::{HybridClock, WallClock};
use crate::packet::Heartbeat;
use crate::types::Timestamp;
use std::sync::atomic::{fence, AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

/// One pair's nudge state, shared with its siblings: whether it is idle, and the highest
/// time stamp a sibling asked it to promise past, not yet taken (see the module
/// documentation).
#[derive(Debug)]
pub struct NudgeBox {
    idle: AtomicBool,
    want: AtomicU64,
}

impl Default for NudgeBox {
    fn default() -> Self {
        NudgeBox {
            idle: AtomicBool::new(true),
            want: AtomicU64::new(0),
        }
    }
}

/// A writer calls this once after stamping a batch and before [`NudgeBox::wants`] on its
/// siblings: the fence that pairs with the one in [`NudgeBox::settle`].
pub fn before_nudging() {
    fence(Ordering::SeqCst);
}

impl NudgeBox {
    /// An idle pair (it has stamped nothing yet).
    pub fn new() -> Self {
        NudgeBox::default()
    }

    /// The pair's own unit: it stamped a batch (busy until it settles).
    pub fn set_busy(&self) {
        self.idle.store(false, Ordering::Relaxed);
    }

    /// The pair's own unit: nothing of it is on its lane or waiting to be stamped. Marks
    /// it idle and returns the newest stamp `clock` handed out, read after a `SeqCst`
    /// fence: a sibling that stamped below it may have seen the pair busy and not
    /// nudged it, so the unit answers as to a nudge for it.
    pub fn settle<W: WallClock + ?Sized>(&self, clock: &HybridClock<W>) -> Timestamp {
        self.idle.store(true, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        clock.last()
    }

    /// Whether the pair looks idle.
    pub fn is_idle(&self) -> bool {
        self.idle.load(Ordering::Relaxed)
    }

    /// A writer that stamped `ts` (after [`before_nudging`]): if the pair is idle, asks
    /// it to promise past `ts` and says whether to send it a nudge message
    /// ([`NudgeBox::request`]). A busy pair is left alone: it settles later.
    pub fn wants(&self, ts: Timestamp) -> bool {
        self.is_idle() && self.request(ts)
    }

    /// Asks the pair to promise past `ts` (a stamp the caller has handed out). Returns
    /// whether the caller must deliver the pair a nudge message: `false` when one is
    /// pending already, which will see `ts` too.
    pub fn request(&self, ts: Timestamp) -> bool {
        // Time stamps are never 0 (the hybrid clock hands out at least 1), and 0 means
        // "nothing pending": a request of 0 asks nothing.
        if ts.0 == 0 {
            return false;
        }
        self.want.fetch_max(ts.0, Ordering::AcqRel) == 0
    }

    /// Takes what was asked since the last take (`None`: nothing), leaving the box empty:
    /// the next request sends a new nudge message.
    pub fn take(&self) -> Option<Timestamp> {
        match self.want.swap(0, Ordering::AcqRel) {
            0 => None,
            ts => Some(Timestamp(ts)),
        }
    }

    /// What is pending, without taking it (for statistics and tests).
    pub fn pending(&self) -> Option<Timestamp> {
        match self.want.load(Ordering::Acquire) {
            0 => None,
            ts => Some(Timestamp(ts)),
        }
    }
}

impl Sender {
    /// Answers a nudge asking this pair to promise past `want`: a heartbeat stamped
    /// `fresh()` (read from the hybrid clock after the nudge was taken) if the last
    /// stamp this pair handed out or promised is below `want`; `None` if it is at or
    /// above it already (the remote's head for this pair passes `want` with what was
    /// sent). The clock is read only when a heartbeat is made.
    ///
    /// The caller decides whether the pair may promise at all (not while it tracks, or
    /// owes a resync mark: then it only probes) and whether it need not (writes wait to
    /// be stamped). Valid for the same reason as [`Sender::heartbeat`]: the promise is
    /// made by the pair's own sender, exclusive with its stamping.
    pub fn answer_nudge(
        &mut self,
        now: Instant,
        want: Timestamp,
        fresh: impl FnOnce() -> Timestamp,
    ) -> Option<Heartbeat> {
        (self.last.ts < want).then(|| self.heartbeat(now, fresh()))
    }
}

#[cfg(test)]
mod tests;
