//! Commit lag: from a write's stamp (taken when the primary completed it, just before its
//! client was told) to its application at the remote under a released limit. Both ends
//! read the same kind of wall clock; on one host (or with synchronised clocks) the
//! difference is the lag.

/// The most recent samples of one unit, in nanoseconds.
#[derive(Clone, Debug, Default)]
pub struct LagSamples {
    ring: Vec<u64>,
    next: usize,
    count: u64,
    max: u64,
}

/// Samples kept per unit.
pub const KEEP: usize = 8192;

impl LagSamples {
    pub fn record(&mut self, ns: u64) {
        self.count += 1;
        self.max = self.max.max(ns);
        if self.ring.len() < KEEP {
            self.ring.push(ns);
        } else {
            self.ring[self.next] = ns;
            self.next = (self.next + 1) % KEEP;
        }
    }

    pub fn samples(&self) -> &[u64] {
        &self.ring
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    /// The largest sample since start (0: none).
    pub fn max(&self) -> u64 {
        self.max
    }
}

/// Where a write's commit lag goes on the remote unit: its age (now minus its stamp)
/// when it reached the unit, when it was durable in the remote journal, and when a
/// released limit let it be applied (selected for an application), plus the age of each
/// limit as it arrived. The applied age is the commit lag itself ([`LagSamples`]).
#[derive(Clone, Debug, Default)]
pub struct LagStages {
    pub arrived: LagSamples,
    pub durable: LagSamples,
    pub selected: LagSamples,
    pub limit: LagSamples,
    /// Not ages: how long each synced journal append of the unit's packets took, and
    /// each flush of the unit that records its applied point.
    pub journal_sync: LagSamples,
    pub unit_flush: LagSamples,
    /// How long each synced journal append waited for a disk thread.
    pub journal_queue: LagSamples,
    /// Ages of packets as they were taken into a journal batch, and of packets that
    /// arrived above a gap (held in memory until it closes).
    pub batched: LagSamples,
    pub ahead: LagSamples,
}

impl LagStages {
    /// `(stage, recent samples)` of every stage, in the order a write passes them.
    pub fn samples(&self) -> Vec<(&'static str, Vec<u64>)> {
        vec![
            ("arrived", self.arrived.samples().to_vec()),
            ("ahead", self.ahead.samples().to_vec()),
            ("batched", self.batched.samples().to_vec()),
            ("durable", self.durable.samples().to_vec()),
            ("selected", self.selected.samples().to_vec()),
            ("limit", self.limit.samples().to_vec()),
            ("journal_sync_time", self.journal_sync.samples().to_vec()),
            ("unit_flush_time", self.unit_flush.samples().to_vec()),
            ("journal_queue_time", self.journal_queue.samples().to_vec()),
        ]
    }
}

/// The `p`-th percentile (0..=100) of `samples`, or 0 if there are none.
pub fn percentile(samples: &mut [u64], p: f64) -> u64 {
    if samples.is_empty() {
        return 0;
    }
    samples.sort_unstable();
    let rank = ((p / 100.0) * (samples.len() - 1) as f64).round() as usize;
    samples[rank.min(samples.len() - 1)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_and_ring() {
        let mut l = LagSamples::default();
        for i in 1..=100 {
            l.record(i);
        }
        let mut s = l.samples().to_vec();
        assert_eq!(percentile(&mut s, 50.0), 51);
        assert_eq!(percentile(&mut s, 99.0), 99);
        assert_eq!(percentile(&mut [], 50.0), 0);
        for i in 0..KEEP as u64 * 2 {
            l.record(1000 + i);
        }
        assert_eq!(l.samples().len(), KEEP);
        assert!(l.samples().iter().all(|&x| x >= 1000 + KEEP as u64));
        assert_eq!(l.count(), 100 + 2 * KEEP as u64);
        assert_eq!(l.max(), 1000 + 2 * KEEP as u64 - 1);
    }
}
