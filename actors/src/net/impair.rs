//! Seeded network impairment for the in-process link: loss, duplication, reordering and
//! delay, decided per packet, heartbeat, acknowledgement and control message.

use crate::error::EngineError;
use rand::Rng;
use rand_pcg::Pcg64Mcg;
use std::time::Duration;

/// How bad the network between two systems is. Every item crossing a link is dropped
/// with probability `loss`, sent twice with probability `dup`, held back by an extra
/// random delay with probability `reorder`, and delayed by `delay` (plus up to `jitter`).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Impairment {
    pub loss: f64,
    pub dup: f64,
    pub reorder: f64,
    pub delay: Duration,
    pub jitter: Duration,
}

impl Impairment {
    /// A perfect network.
    pub fn none() -> Self {
        Impairment::default()
    }

    /// Checks the probabilities: each in `[0, 1)` (`reorder` may be 1). A loss of 1
    /// would mean nothing ever arrives, which no retransmission can cure.
    pub fn validate(&self) -> Result<(), EngineError> {
        let bad = |what: &str, v: f64, max_inclusive: bool| {
            let ok = v.is_finite() && v >= 0.0 && (v < 1.0 || (max_inclusive && v <= 1.0));
            if ok {
                Ok(())
            } else {
                let range = if max_inclusive { "[0, 1]" } else { "[0, 1)" };
                Err(EngineError::Impairment(format!(
                    "{what} = {v} is outside {range}"
                )))
            }
        };
        bad("loss", self.loss, false)?;
        bad("dup", self.dup, false)?;
        bad("reorder", self.reorder, true)?;
        if self.delay > Duration::from_secs(10) || self.jitter > Duration::from_secs(10) {
            return Err(EngineError::Impairment(
                "delay and jitter must be at most 10 s".into(),
            ));
        }
        Ok(())
    }

    /// Whether anything is impaired at all (the link takes a fast path if not).
    pub fn is_perfect(&self) -> bool {
        self.loss == 0.0
            && self.dup == 0.0
            && self.reorder == 0.0
            && self.delay.is_zero()
            && self.jitter.is_zero()
    }

    /// The fate of one item: the delays of its copies (none if lost).
    pub fn fate(&self, rng: &mut Pcg64Mcg, out: &mut Vec<Duration>) {
        out.clear();
        if self.loss > 0.0 && rng.random_bool(self.loss) {
            return;
        }
        let copies = if self.dup > 0.0 && rng.random_bool(self.dup) {
            2
        } else {
            1
        };
        for _ in 0..copies {
            let mut d = self.delay;
            if !self.jitter.is_zero() {
                d += rng.random_range(Duration::ZERO..=self.jitter);
            }
            if self.reorder > 0.0 && rng.random_bool(self.reorder) {
                let max = (self.delay * 2).max(Duration::from_millis(2));
                d += rng.random_range(Duration::from_micros(500)..=max);
            }
            out.push(d);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn validate_rejects_certain_loss_and_nonsense() {
        let mut i = Impairment::none();
        assert!(i.validate().is_ok());
        i.loss = 1.0;
        assert!(i.validate().is_err());
        i.loss = -0.1;
        assert!(i.validate().is_err());
        i.loss = f64::NAN;
        assert!(i.validate().is_err());
        i.loss = 0.2;
        i.reorder = 1.0;
        assert!(i.validate().is_ok());
        i.dup = 1.0;
        assert!(i.validate().is_err());
    }

    #[test]
    fn fate_is_seeded_and_roughly_right() {
        let imp = Impairment {
            loss: 0.2,
            dup: 0.1,
            reorder: 0.5,
            delay: Duration::from_millis(1),
            jitter: Duration::ZERO,
        };
        let run = |seed| {
            let mut rng = Pcg64Mcg::seed_from_u64(seed);
            let mut out = Vec::new();
            let mut lost = 0;
            let mut copies = 0;
            let mut trace = Vec::new();
            for _ in 0..10_000 {
                imp.fate(&mut rng, &mut out);
                if out.is_empty() {
                    lost += 1;
                }
                copies += out.len();
                trace.extend(out.iter().copied());
            }
            (lost, copies, trace)
        };
        let (lost, copies, trace) = run(7);
        assert!((1_500..2_500).contains(&lost), "lost {lost}");
        assert!(copies > 8_000 - 100, "copies {copies}");
        assert_eq!(run(7).2, trace, "same seed, same fates");
        assert_ne!(run(8).2, trace, "other seed, other fates");
    }
}
