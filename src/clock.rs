//! The hybrid clock every local unit of a primary process stamps from.
//!
//! Invariant I2: time stamps are unique and strictly increasing across the whole
//! process as handed out: `next = max(wall_ns, last + 1)`. The wall clock is injected, so
//! tests and simulations decide what "now" is.

use crate::types::Timestamp;
use std::sync::atomic::{AtomicU64, Ordering};

/// A source of wall-clock nanoseconds. It may stall or step backwards; the hybrid clock
/// still hands out strictly increasing stamps.
pub trait WallClock: Send + Sync {
    fn now_ns(&self) -> u64;
}

impl<F: Fn() -> u64 + Send + Sync> WallClock for F {
    fn now_ns(&self) -> u64 {
        self()
    }
}

/// Strictly increasing, unique time stamps shared by every caller (lock-free).
pub struct HybridClock<W: WallClock + ?Sized = dyn WallClock> {
    last: AtomicU64,
    wall: W,
}

impl<W: WallClock> HybridClock<W> {
    pub fn new(wall: W) -> Self {
        HybridClock {
            last: AtomicU64::new(0),
            wall,
        }
    }
}

impl<W: WallClock + ?Sized> HybridClock<W> {
    /// Hands out the next time stamp: greater than every stamp handed out before, by any
    /// thread, and not below the wall clock read during this call.
    pub fn now(&self) -> Timestamp {
        let wall = self.wall.now_ns();
        let mut last = self.last.load(Ordering::Relaxed);
        loop {
            let next = wall.max(last + 1);
            match self
                .last
                .compare_exchange_weak(last, next, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => return Timestamp(next),
                Err(seen) => last = seen,
            }
        }
    }

    /// Never hand out a stamp at or below `ts` (used after recovery, so a restarted
    /// primary keeps stamps increasing even if its wall clock went back).
    pub fn observe(&self, ts: Timestamp) {
        self.last.fetch_max(ts.0, Ordering::AcqRel);
    }

    /// The wall clock under this hybrid clock, read now (nanoseconds). Commit-wait
    /// (`timebase`) compares it with stamps.
    pub fn wall_ns(&self) -> u64 {
        self.wall.now_ns()
    }

    /// The last stamp handed out (or observed).
    pub fn last(&self) -> Timestamp {
        Timestamp(self.last.load(Ordering::Acquire))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn stalled_wall_clock_still_increases() {
        let clock = HybridClock::new(|| 1_000u64);
        let a = clock.now();
        let b = clock.now();
        let c = clock.now();
        assert_eq!(a, Timestamp(1_000));
        assert_eq!(b, Timestamp(1_001));
        assert_eq!(c, Timestamp(1_002));
    }

    #[test]
    fn wall_clock_stepping_back_is_ignored() {
        let wall = Arc::new(AtomicU64::new(5_000));
        let w = wall.clone();
        let clock = HybridClock::new(move || w.load(Ordering::SeqCst));
        let a = clock.now();
        wall.store(10, Ordering::SeqCst);
        let b = clock.now();
        assert!(b > a);
        wall.store(9_000, Ordering::SeqCst);
        assert_eq!(clock.now(), Timestamp(9_000));
    }

    #[test]
    fn observe_moves_past_recovered_stamps() {
        let clock = HybridClock::new(|| 7u64);
        clock.observe(Timestamp(100));
        assert_eq!(clock.now(), Timestamp(101));
    }

    #[test]
    fn unique_across_threads() {
        let clock = Arc::new(HybridClock::new(|| 0u64));
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let c = clock.clone();
                std::thread::spawn(move || (0..10_000).map(|_| c.now().0).collect::<Vec<_>>())
            })
            .collect();
        let mut all = Vec::new();
        for h in handles {
            let v = h.join().expect("thread");
            assert!(v.windows(2).all(|w| w[0] < w[1]), "per-thread order");
            all.extend(v);
        }
        let n = all.len();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), n, "every stamp unique");
    }
}
