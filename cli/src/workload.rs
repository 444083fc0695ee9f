//! A deterministic workload: write `i` of seed `s` is always the same pair, offset and
//! bytes, so a test can recompute what any prefix of the writes leaves on the units.

use bytes::Bytes;
use rand::{Rng, SeedableRng};
use rand_pcg::Pcg64;
use tidemark::PairId;

/// One write of the workload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkItem {
    pub pair: PairId,
    pub offset: u64,
    pub data: Bytes,
}

/// Writes spread over `pairs` (id and size) at random offsets, 1 B ..= `max_write`.
pub struct Workload {
    rng: Pcg64,
    pairs: Vec<(PairId, u64)>,
    max_write: u64,
}

impl Workload {
    pub fn new(seed: u64, pairs: &[(PairId, u64)], max_write: u64) -> Self {
        Workload {
            rng: Pcg64::seed_from_u64(seed),
            pairs: pairs.to_vec(),
            max_write: max_write.max(1),
        }
    }
}

impl Iterator for Workload {
    type Item = WorkItem;

    fn next(&mut self) -> Option<WorkItem> {
        let &(pair, size) = self
            .pairs
            .get(self.rng.random_range(0..self.pairs.len().max(1)))?;
        let len = self.rng.random_range(1..=self.max_write.min(size));
        let offset = self.rng.random_range(0..=size - len);
        let mut data = vec![0u8; len as usize];
        self.rng.fill(&mut data[..]);
        Some(WorkItem {
            pair,
            offset,
            data: Bytes::from(data),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_writes_in_range() {
        let pairs = [(PairId(0), 4096), (PairId(3), 1 << 20)];
        let a: Vec<_> = Workload::new(5, &pairs, 65536).take(200).collect();
        let b: Vec<_> = Workload::new(5, &pairs, 65536).take(200).collect();
        assert_eq!(a, b);
        assert_ne!(
            a,
            Workload::new(6, &pairs, 65536)
                .take(200)
                .collect::<Vec<_>>()
        );
        for w in &a {
            let size = pairs
                .iter()
                .find(|p| p.0 == w.pair)
                .map(|p| p.1)
                .unwrap_or(0);
            assert!(w.offset + w.data.len() as u64 <= size);
            assert!(!w.data.is_empty());
        }
        assert!(a.iter().any(|w| w.pair == PairId(0)) && a.iter().any(|w| w.pair == PairId(3)));
    }
}
