//! Initial-sync progress shown by the daemons: from successive stats samples (one per
//! status write, every 500 ms) each copying pair gets a percentage, a rate and an
//! estimate of the time left. They go into `status.json` (beside the engine's
//! `sync.total_bytes`, `copied_bytes`, `finished`), onto a progress bar per pair when
//! stderr is a terminal, and otherwise into an INFO log line per pair every
//! [`LOG_EVERY`].
//!
//! The figures are what the samples show, nothing more: the rate is the bytes copied
//! over the last [`WINDOW`] (none until two samples half a second apart), the estimate
//! is what is left at that rate (none while the rate is zero or unknown). `copied_bytes`
//! counts pieces read and journaled; up to the pair's `window` of them may still be on
//! their way to the remote. `total_bytes` may grow while the copy runs: a client write
//! into a hole the copy has not reached yet turns that part of the hole into data.

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};
use tidemark_actors::engine::Stats;

/// The rate is measured over this much of the recent past.
pub const WINDOW: Duration = Duration::from_secs(5);
/// Without a terminal, a log line per copying pair this often.
pub const LOG_EVERY: Duration = Duration::from_secs(5);
/// A rate needs samples at least this far apart.
const MIN_SPAN: Duration = Duration::from_millis(400);

/// What `status.json` adds to a pair's `sync`.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct SyncFigures {
    /// `copied_bytes` of `total_bytes`, 0–100 (100 once finished, or if there was
    /// nothing to copy).
    pub percent: f64,
    /// Bytes per second over the last [`WINDOW`] while the copy runs; once it finished,
    /// the average over the copy as this process saw it. `None` until measurable.
    pub rate_bytes_per_s: Option<u64>,
    /// Seconds left at that rate; 0 once finished; `None` if the rate is unknown or 0.
    pub eta_s: Option<u64>,
}

/// One pair's samples.
#[derive(Default)]
struct PairProgress {
    /// (when, copied bytes), the last [`WINDOW`] of them.
    recent: VecDeque<(Instant, u64)>,
    /// The first sample seen, for the average once finished.
    first: Option<(Instant, u64)>,
    /// The figures once the copy finished (they no longer change).
    done: Option<SyncFigures>,
    bar: Option<ProgressBar>,
    /// Which copy of the pair these figures are of (`SyncStats::copy`).
    copy: u64,
}

impl PairProgress {
    /// Adds a sample of (`total`, `copied`, `finished`) taken at `now`; the figures.
    fn sample(&mut self, now: Instant, total: u64, copied: u64, finished: bool) -> SyncFigures {
        if let Some(done) = self.done {
            return done;
        }
        let first = *self.first.get_or_insert((now, copied));
        self.recent.push_back((now, copied));
        while self
            .recent
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) > WINDOW)
        {
            self.recent.pop_front();
        }
        if finished {
            let span = now.duration_since(first.0);
            let done = SyncFigures {
                percent: 100.0,
                rate_bytes_per_s: (span >= MIN_SPAN)
                    .then(|| (copied.saturating_sub(first.1) as f64 / span.as_secs_f64()) as u64),
                eta_s: Some(0),
            };
            self.done = Some(done);
            return done;
        }
        let percent = if total == 0 {
            100.0
        } else {
            (copied.min(total) as f64 * 1000.0 / total as f64).floor() / 10.0
        };
        let rate = self.recent.front().and_then(|&(t, c)| {
            let span = now.duration_since(t);
            (span >= MIN_SPAN)
                .then(|| (copied.saturating_sub(c) as f64 / span.as_secs_f64()) as u64)
        });
        let eta_s = rate
            .filter(|&r| r > 0)
            .map(|r| total.saturating_sub(copied).div_ceil(r));
        SyncFigures {
            percent,
            rate_bytes_per_s: rate,
            eta_s,
        }
    }
}

/// The progress of every pair of this process that runs a copy (initial sync, resync).
pub struct SyncProgress {
    /// By pair name.
    pairs: BTreeMap<String, PairProgress>,
    /// Progress bars (stderr is a terminal), else log lines.
    bars: Option<MultiProgress>,
    last_log: Option<Instant>,
}

impl SyncProgress {
    /// With progress bars on stderr if `bars`, else with log lines.
    pub fn new(bars: bool) -> SyncProgress {
        SyncProgress {
            pairs: BTreeMap::new(),
            bars: bars.then(MultiProgress::new),
            last_log: None,
        }
    }

    /// Takes the stats sampled at `now`: the figures of each pair (in `stats.pairs`
    /// order; `None` for a pair without a sync here), and the bars or log lines
    /// updated.
    pub fn sample(&mut self, now: Instant, stats: &Stats) -> Vec<Option<SyncFigures>> {
        let log = self.bars.is_none()
            && self
                .last_log
                .is_none_or(|t| now.duration_since(t) >= LOG_EVERY);
        let mut logged = false;
        let mut out = Vec::with_capacity(stats.pairs.len());
        for p in &stats.pairs {
            let Some(sync) = p.sync else {
                out.push(None);
                continue;
            };
            let entry = self.pairs.entry(p.name.clone()).or_default();
            if entry.copy != sync.copy {
                // A new copy (a resync after the initial sync, or another one): new figures.
                *entry = PairProgress {
                    copy: sync.copy,
                    ..PairProgress::default()
                };
            }
            let what = if sync.resync {
                "resync"
            } else {
                "initial sync"
            };
            let was_done = entry.done.is_some();
            let f = entry.sample(now, sync.total_bytes, sync.copied_bytes, sync.finished);
            if let Some(multi) = &self.bars {
                if !was_done {
                    let bar = entry.bar.get_or_insert_with(|| {
                        let bar = multi.add(ProgressBar::new(sync.total_bytes));
                        bar.set_style(
                            ProgressStyle::with_template(
                                &format!("{what} {{prefix}} {{wide_bar}} {{binary_bytes}}/{{binary_total_bytes}} {{msg}}"),
                            )
                            .unwrap_or_else(|_| ProgressStyle::default_bar()),
                        );
                        bar.set_prefix(p.name.clone());
                        bar
                    });
                    bar.set_length(sync.total_bytes);
                    bar.set_position(sync.copied_bytes.min(sync.total_bytes));
                    bar.set_message(describe(&f));
                    if sync.finished {
                        bar.finish_with_message(format!("done, {}", describe(&f)));
                    }
                }
            } else if !was_done && (log || sync.finished) {
                logged |= log;
                tracing::info!(
                    pair = %p.name,
                    percent = f.percent,
                    copied_mib = sync.copied_bytes >> 20,
                    total_mib = sync.total_bytes >> 20,
                    mb_per_s = f.rate_bytes_per_s.map(|r| (r as f64 / 1e5).round() / 10.0),
                    eta_s = f.eta_s,
                    "{what}{}",
                    if sync.finished { ": finished" } else { "" }
                );
            }
            out.push(Some(f));
        }
        if logged {
            self.last_log = Some(now);
        }
        out
    }
}

/// "12.3 MB/s, 42 s left", or what of it is known.
fn describe(f: &SyncFigures) -> String {
    let rate = f.rate_bytes_per_s.map_or("-- MB/s".to_string(), |r| {
        format!("{:.1} MB/s", r as f64 / 1e6)
    });
    match f.eta_s {
        Some(0) => rate,
        Some(s) => format!("{rate}, {s} s left"),
        None => rate,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Samples every 500 ms of a copy of 100 MB at 10 MB/s, then finished.
    #[test]
    fn percent_rate_and_eta_from_samples() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut p = PairProgress::default();
        let total = 100_000_000;
        // One sample: no rate yet, so no estimate.
        let f = p.sample(at(0), total, 0, false);
        assert_eq!((f.percent, f.rate_bytes_per_s, f.eta_s), (0.0, None, None));
        let f = p.sample(at(500), total, 5_000_000, false);
        assert_eq!(f.percent, 5.0);
        assert_eq!(f.rate_bytes_per_s, Some(10_000_000));
        assert_eq!(f.eta_s, Some(10));
        // After 6 s the window holds only the last 5 s: a slowdown shows at once.
        for i in 2..=12u64 {
            p.sample(at(500 * i), total, 5_000_000 * i, false);
        }
        let f = p.sample(at(6500), total, 60_000_000 + 1_000_000, false);
        assert_eq!(f.percent, 61.0);
        // 61 MB now, 11 MB 5 s ago... (the oldest sample within 5 s is at 1500 ms: 15 MB).
        assert_eq!(f.rate_bytes_per_s, Some(46_000_000 / 5));
        assert_eq!(f.eta_s, Some((39_000_000u64).div_ceil(46_000_000 / 5)));
        // Stalled for a whole window: rate 0, no estimate.
        let mut q = PairProgress::default();
        q.sample(at(0), total, 7, false);
        let f = q.sample(at(1000), total, 7, false);
        assert_eq!((f.rate_bytes_per_s, f.eta_s), (Some(0), None));
        // Finished: 100 %, no time left, the average over what was seen; then fixed.
        let f = p.sample(at(10_000), total, total, true);
        assert_eq!(f.percent, 100.0);
        assert_eq!(f.eta_s, Some(0));
        assert_eq!(f.rate_bytes_per_s, Some(10_000_000));
        assert_eq!(p.sample(at(20_000), total, total, true), f);
        // Nothing to copy is done from the start.
        let mut e = PairProgress::default();
        assert_eq!(e.sample(at(0), 0, 0, false).percent, 100.0);
    }
}
