//! `tidemark verify [--repair]`: checks, while clients keep writing, that each remote
//! unit holds what its local unit held at a common point of the pair's stream, by
//! checksums of regions (no data crosses the link); with `--repair`, resyncs the
//! regions that differ through the ordered resync path and checks them again.
//!
//! The command talks only to the primary daemon's control socket (`verify` and
//! `repair` requests, [`crate::control`]); the primary asks the secondary over the
//! authenticated link. How live writes are kept from causing false alarms is in
//! `tidemark::verify` and `docs/design.md` (online verify): a region the two sides
//! could not compare at one point of the stream is *busy*, checked again in later
//! rounds (for at most `--busy-wait-s`), and reported as not verified if it stays busy.
//!
//! Exit codes: 0 every region matches (with `--repair`: matches now); 1 regions differ
//! (with `--repair`: still differ after the repair); 3 not everything could be checked
//! (the primary is not running, the secondary did not answer within `--timeout-s`, the
//! pair did not replicate, regions stayed busy); 2 bad usage or config.

use crate::config::Config;
use crate::control::{ask, AskError, Reply, Request, VerifyAnswer};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tidemark::verify::Verdict;
use tidemark_actors::EngineError;

/// What the command was asked.
#[derive(Clone, Debug)]
pub struct VerifyArgs {
    /// Only this pair (default: every pair).
    pub pair: Option<String>,
    pub repair: bool,
    /// Region size in bytes.
    pub region: u64,
    /// How long one request may wait for the secondary.
    pub timeout: Duration,
    /// How long busy regions are checked again.
    pub busy_wait: Duration,
    /// A progress bar on stderr.
    pub progress: bool,
}

/// Regions one control request covers (at most this many bytes, too): the daemon
/// reads them in chunks of at most 4 MiB, one at a time, between client writes.
const REQUEST_REGIONS: u64 = 64;
const REQUEST_BYTES: u64 = 64 << 20;
/// Ranges one `repair` request carries (its line stays under the socket's 4 KiB).
const REPAIR_RANGES: usize = 64;
/// Pause before the first re-check of busy regions; doubles up to [`MAX_PAUSE`].
const FIRST_PAUSE: Duration = Duration::from_millis(50);
const MAX_PAUSE: Duration = Duration::from_secs(1);

/// A byte range of a unit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Range {
    pub offset: u64,
    pub len: u64,
}

/// What verify found for one pair (`--json`: `pairs[]`).
#[derive(Clone, Debug, Default, Serialize)]
pub struct PairReport {
    pub name: String,
    pub size: u64,
    /// The first pass over the whole unit: bytes checked, how long it took, the rate.
    pub checked_bytes: u64,
    pub elapsed_ms: u64,
    pub rate_bytes_per_s: u64,
    /// Regions compared at exactly the same point of the stream on both sides.
    pub exact_regions: u64,
    /// Rounds of re-checks of busy regions.
    pub rounds: u32,
    /// Ranges (adjacent regions merged) whose bytes differ.
    pub mismatches: Vec<Range>,
    pub mismatched_regions: u64,
    /// Ranges that could not be compared (busy until the end), and why, if known.
    pub busy: Vec<Range>,
    pub busy_reason: Option<String>,
    /// `--repair`: the ranges resynced, then what checking them again found.
    pub repaired: Option<Vec<Range>>,
    pub after_repair: Option<AfterRepair>,
    /// Why the pair could not be checked (the primary is not running, the secondary
    /// did not answer, ...).
    pub error: Option<String>,
}

/// What the check after a repair found.
#[derive(Clone, Debug, Default, Serialize)]
pub struct AfterRepair {
    pub mismatches: Vec<Range>,
    pub busy: Vec<Range>,
}

/// The whole report (`--json`).
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub version: u32,
    pub region_bytes: u64,
    pub repair: bool,
    pub pairs: Vec<PairReport>,
    /// `"match"`, `"differ"`, `"repaired"` or `"incomplete"`.
    pub result: String,
}

impl Report {
    /// The exit code: 0 match (or repaired and matching now), 1 differ, 3 incomplete.
    pub fn exit_code(&self) -> u8 {
        match self.result.as_str() {
            "match" | "repaired" => 0,
            "differ" => 1,
            _ => 3,
        }
    }
}

/// Why a request failed: the secondary did not answer (or the primary is not
/// running), or something else.
#[derive(Debug)]
enum AskFailure {
    Incomplete(String),
    Usage(String),
}

/// Runs verify over the pairs of `cfg` (or `args.pair`).
pub fn run(cfg: &Config, args: &VerifyArgs) -> Result<Report, EngineError> {
    if !(tidemark::verify::MIN_REGION..=tidemark::verify::MAX_REGION).contains(&args.region)
        || !args.region.is_multiple_of(512)
    {
        return Err(EngineError::Config(format!(
            "--region: {} is not a multiple of 512 from {} to {}",
            args.region,
            tidemark::verify::MIN_REGION,
            tidemark::verify::MAX_REGION
        )));
    }
    let pairs: Vec<usize> = match &args.pair {
        Some(n) => match cfg.pairs.iter().position(|p| &p.name == n) {
            Some(i) => vec![i],
            None => {
                return Err(EngineError::Config(format!(
                    "--pair: no pair {n:?} in {}",
                    cfg.path.display()
                )))
            }
        },
        None => (0..cfg.pairs.len()).collect(),
    };
    let mut reports = Vec::new();
    for i in pairs {
        let p = &cfg.pairs[i];
        let socket = cfg.systems[p.local].control_socket();
        let mut report = PairReport {
            name: p.name.clone(),
            size: p.size,
            ..PairReport::default()
        };
        match check_pair(&socket, &cfg.systems[p.local].name, args, &mut report) {
            Ok(()) => {}
            Err(AskFailure::Usage(e)) => return Err(EngineError::Config(e)),
            Err(AskFailure::Incomplete(e)) => report.error = Some(e),
        }
        reports.push(report);
    }
    let differ = reports.iter().any(|r| {
        if args.repair {
            r.after_repair
                .as_ref()
                .map_or(!r.mismatches.is_empty(), |a| !a.mismatches.is_empty())
        } else {
            !r.mismatches.is_empty()
        }
    });
    let incomplete = reports.iter().any(|r| {
        r.error.is_some()
            || !r.busy.is_empty()
            || r.after_repair.as_ref().is_some_and(|a| !a.busy.is_empty())
    });
    let repaired = reports.iter().any(|r| r.repaired.is_some());
    let result = if differ {
        "differ"
    } else if incomplete {
        "incomplete"
    } else if repaired {
        "repaired"
    } else {
        "match"
    };
    Ok(Report {
        version: 1,
        region_bytes: args.region,
        repair: args.repair,
        pairs: reports,
        result: result.into(),
    })
}

/// Verifies one pair through the control socket `socket` of its primary `system`,
/// filling `report`.
fn check_pair(
    socket: &Path,
    system: &str,
    args: &VerifyArgs,
    report: &mut PairReport,
) -> Result<(), AskFailure> {
    let regions = report.size.div_ceil(args.region);
    let bar = args.progress.then(|| {
        let bar = indicatif::ProgressBar::new(report.size);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "verify {prefix} {wide_bar} {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar.set_prefix(report.name.clone());
        bar
    });
    let mut verdicts = vec![Verdict::Busy; regions as usize];
    let asker = Asker {
        socket: socket.to_path_buf(),
        system: system.to_string(),
        pair: report.name.clone(),
        region: args.region,
        timeout: args.timeout,
    };
    let started = Instant::now();
    let all: Vec<u64> = (0..regions).collect();
    let mut reason = None;
    let mut exact = 0;
    asker.check(&all, &mut verdicts, &mut reason, &mut exact, |bytes| {
        if let Some(b) = &bar {
            b.inc(bytes);
        }
    })?;
    let elapsed = started.elapsed();
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    report.checked_bytes = report.size;
    report.elapsed_ms = elapsed.as_millis() as u64;
    report.rate_bytes_per_s = (report.size as f64 / elapsed.as_secs_f64().max(1e-6)) as u64;
    report.rounds = asker.settle(&mut verdicts, &mut reason, &mut exact, args.busy_wait)?;
    report.exact_regions = exact;
    let differ: Vec<u64> = indices(&verdicts, Verdict::Differ);
    report.mismatched_regions = differ.len() as u64;
    report.mismatches = ranges(&differ, args.region, report.size);
    report.busy = ranges(&indices(&verdicts, Verdict::Busy), args.region, report.size);
    report.busy_reason = reason.filter(|_| !report.busy.is_empty());
    if !args.repair || differ.is_empty() {
        return Ok(());
    }
    for part in report.mismatches.chunks(REPAIR_RANGES) {
        let req = Request {
            op: "repair".into(),
            pair: Some(report.name.clone()),
            ranges: Some(part.iter().map(|r| (r.offset, r.len)).collect()),
            ..Request::default()
        };
        // A pair that does not replicate right now (finishing an earlier resync, say)
        // is asked again until the wait is over.
        let deadline = Instant::now() + args.busy_wait;
        let mut pause = FIRST_PAUSE;
        loop {
            match asker.ask(&req) {
                Ok(_) => break,
                Err(Asked::Busy(why)) if Instant::now() < deadline => {
                    let _ = why;
                    std::thread::sleep(pause);
                    pause = (pause * 2).min(MAX_PAUSE);
                }
                Err(Asked::Busy(why)) => {
                    return Err(AskFailure::Incomplete(format!("repair: {why}")))
                }
                Err(Asked::Failed(f)) => return Err(f),
            }
        }
    }
    report.repaired = Some(report.mismatches.clone());
    // The repaired regions are busy while the resync runs and until the secondary has
    // applied the copies: checked again until they settle.
    let mut after = verdicts.clone();
    for &i in &differ {
        after[i as usize] = Verdict::Busy;
    }
    let mut reason = None;
    asker.check(&differ, &mut after, &mut reason, &mut 0, |_| {})?;
    asker.settle(&mut after, &mut reason, &mut 0, args.busy_wait)?;
    let only = |v: Verdict| -> Vec<u64> {
        differ
            .iter()
            .copied()
            .filter(|&i| after[i as usize] == v)
            .collect()
    };
    report.after_repair = Some(AfterRepair {
        mismatches: ranges(&only(Verdict::Differ), args.region, report.size),
        busy: ranges(&only(Verdict::Busy), args.region, report.size),
    });
    Ok(())
}

/// How one request ended, when not with an answer.
enum Asked {
    /// Not now (the pair does not replicate); try again.
    Busy(String),
    Failed(AskFailure),
}

/// Sends a pair's requests to its primary's control socket.
struct Asker {
    socket: PathBuf,
    system: String,
    pair: String,
    region: u64,
    timeout: Duration,
}

impl Asker {
    fn ask(&self, req: &Request) -> Result<Reply, Asked> {
        // The daemon gives up on the secondary after `timeout`; the socket waits a
        // little longer for that answer.
        let reply =
            ask(&self.socket, req, self.timeout + Duration::from_secs(5)).map_err(|e| match e {
                AskError::NotRunning(_) => Asked::Failed(AskFailure::Incomplete(format!(
                    "the primary system {} is not running ({e})",
                    self.system
                ))),
                e => Asked::Failed(AskFailure::Incomplete(format!(
                    "primary system {}: {e}",
                    self.system
                ))),
            })?;
        if reply.ok {
            return Ok(reply);
        }
        let error = reply
            .error
            .clone()
            .unwrap_or_else(|| "no reason given".into());
        Err(match reply.kind.as_deref() {
            Some("busy") => Asked::Busy(error),
            Some("usage") => Asked::Failed(AskFailure::Usage(error)),
            _ => Asked::Failed(AskFailure::Incomplete(error)),
        })
    }

    /// Checks the regions `which` (sorted indices), in requests of consecutive
    /// regions, writing each verdict into `verdicts`; `done(bytes)` after each request.
    fn check(
        &self,
        which: &[u64],
        verdicts: &mut [Verdict],
        reason: &mut Option<String>,
        exact: &mut u64,
        mut done: impl FnMut(u64),
    ) -> Result<(), AskFailure> {
        let per = REQUEST_REGIONS.min((REQUEST_BYTES / self.region).max(1));
        for run in runs(which, per) {
            let req = Request {
                op: "verify".into(),
                pair: Some(self.pair.clone()),
                offset: Some(run.start * self.region),
                region: Some(self.region),
                count: Some(run.end - run.start),
                timeout_ms: Some(self.timeout.as_millis() as u64),
                ..Request::default()
            };
            let answer = match self.ask(&req) {
                Ok(r) => r.verify.unwrap_or_default(),
                Err(Asked::Busy(why)) => VerifyAnswer {
                    busy: Some(why),
                    ..VerifyAnswer::default()
                },
                Err(Asked::Failed(f)) => return Err(f),
            };
            for (k, i) in (run.start..run.end).enumerate() {
                if let Some(slot) = verdicts.get_mut(i as usize) {
                    *slot = answer.verdicts.get(k).copied().unwrap_or(Verdict::Busy);
                }
            }
            *exact += answer.exact;
            if let Some(why) = answer.busy {
                *reason = Some(why);
            }
            done((run.end - run.start) * self.region);
        }
        Ok(())
    }

    /// Checks the busy regions again, pausing longer each round, until none is busy or
    /// `wait` is over. Returns the rounds made.
    fn settle(
        &self,
        verdicts: &mut [Verdict],
        reason: &mut Option<String>,
        exact: &mut u64,
        wait: Duration,
    ) -> Result<u32, AskFailure> {
        let deadline = Instant::now() + wait;
        let mut pause = FIRST_PAUSE;
        let mut rounds = 0;
        loop {
            let busy = indices(verdicts, Verdict::Busy);
            if busy.is_empty() || Instant::now() + pause > deadline {
                return Ok(rounds);
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(MAX_PAUSE);
            rounds += 1;
            *reason = None;
            self.check(&busy, verdicts, reason, exact, |_| {})?;
        }
    }
}

/// The indices of the regions with verdict `v`.
fn indices(verdicts: &[Verdict], v: Verdict) -> Vec<u64> {
    verdicts
        .iter()
        .enumerate()
        .filter(|(_, x)| **x == v)
        .map(|(i, _)| i as u64)
        .collect()
}

/// Sorted indices as runs of consecutive ones, each at most `max` long.
fn runs(which: &[u64], max: u64) -> Vec<std::ops::Range<u64>> {
    let mut out: Vec<std::ops::Range<u64>> = Vec::new();
    for &i in which {
        match out.last_mut() {
            Some(r) if r.end == i && r.end - r.start < max => r.end += 1,
            _ => out.push(i..i + 1),
        }
    }
    out
}

/// Region indices as byte ranges, adjacent ones merged, the last cut at `size`.
fn ranges(which: &[u64], region: u64, size: u64) -> Vec<Range> {
    runs(which, u64::MAX)
        .into_iter()
        .map(|r| {
            let offset = r.start * region;
            Range {
                offset,
                len: (r.end * region).min(size) - offset,
            }
        })
        .collect()
}

/// `0x100000+1MiB`.
fn show(r: &Range) -> String {
    let len = match r.len {
        l if l >= 1 << 20 && l % (1 << 20) == 0 => format!("{}MiB", l >> 20),
        l if l >= 1 << 10 && l % (1 << 10) == 0 => format!("{}KiB", l >> 10),
        l => format!("{l}B"),
    };
    format!("{:#x}+{len}", r.offset)
}

fn show_all(rs: &[Range]) -> String {
    rs.iter().map(show).collect::<Vec<_>>().join(", ")
}

/// The report for a person: one line per pair, more if something differs or is busy.
pub fn render(r: &Report) -> String {
    let mut out = String::new();
    for p in &r.pairs {
        if let Some(e) = &p.error {
            out += &format!("pair {}: NOT VERIFIED: {e}\n", p.name);
            continue;
        }
        let size = bytesize::ByteSize(p.size).display().iec();
        out += &format!(
            "pair {}: {size} checked in {:.2} s ({:.1} MB/s)",
            p.name,
            p.elapsed_ms as f64 / 1000.0,
            p.rate_bytes_per_s as f64 / 1e6
        );
        if p.mismatches.is_empty() && p.busy.is_empty() {
            out += ": all regions match\n";
        } else {
            out += "\n";
        }
        if !p.mismatches.is_empty() {
            out += &format!(
                "pair {}: {} region{} differ: {}\n",
                p.name,
                p.mismatched_regions,
                if p.mismatched_regions == 1 { "" } else { "s" },
                show_all(&p.mismatches)
            );
        }
        if !p.busy.is_empty() {
            out += &format!(
                "pair {}: busy, not verified{}: {}\n",
                p.name,
                p.busy_reason
                    .as_ref()
                    .map(|w| format!(" ({w})"))
                    .unwrap_or_default(),
                show_all(&p.busy)
            );
        }
        if let (Some(rep), Some(after)) = (&p.repaired, &p.after_repair) {
            out += &format!("pair {}: repaired (resynced) {}\n", p.name, show_all(rep));
            if after.mismatches.is_empty() && after.busy.is_empty() {
                out += &format!("pair {}: repaired regions match now\n", p.name);
            }
            if !after.mismatches.is_empty() {
                out += &format!(
                    "pair {}: STILL DIFFER after the repair: {}\n",
                    p.name,
                    show_all(&after.mismatches)
                );
            }
            if !after.busy.is_empty() {
                out += &format!(
                    "pair {}: repaired but not verified again (busy): {}\n",
                    p.name,
                    show_all(&after.busy)
                );
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_and_ranges_merge_neighbours_and_cut_at_the_end() {
        assert_eq!(runs(&[0, 1, 2, 5, 7, 8], 2), vec![0..2, 2..3, 5..6, 7..9]);
        assert_eq!(runs(&[], 4), vec![]);
        let mib = 1 << 20;
        assert_eq!(
            ranges(&[1, 2, 6, 7], mib, 7 * mib + 4096),
            vec![
                Range {
                    offset: mib,
                    len: 2 * mib
                },
                Range {
                    offset: 6 * mib,
                    len: mib + 4096
                }
            ]
        );
        assert_eq!(
            show(&Range {
                offset: mib,
                len: mib
            }),
            "0x100000+1MiB"
        );
    }

    fn report(result: &str) -> Report {
        Report {
            version: 1,
            region_bytes: 1 << 20,
            repair: false,
            pairs: Vec::new(),
            result: result.into(),
        }
    }

    #[test]
    fn exit_codes_follow_cmp() {
        assert_eq!(report("match").exit_code(), 0);
        assert_eq!(report("repaired").exit_code(), 0);
        assert_eq!(report("differ").exit_code(), 1);
        assert_eq!(report("incomplete").exit_code(), 3);
    }

    #[test]
    fn render_lists_the_ranges_that_differ() {
        let mut r = report("differ");
        r.pairs.push(PairReport {
            name: "data".into(),
            size: 8 << 20,
            checked_bytes: 8 << 20,
            elapsed_ms: 100,
            rate_bytes_per_s: 80_000_000,
            mismatches: vec![
                Range {
                    offset: 1 << 20,
                    len: 1 << 20,
                },
                Range {
                    offset: 5 << 20,
                    len: 2 << 20,
                },
            ],
            mismatched_regions: 3,
            ..PairReport::default()
        });
        let text = render(&r);
        assert!(
            text.contains("pair data: 3 regions differ: 0x100000+1MiB, 0x500000+2MiB"),
            "{text}"
        );
        assert!(text.contains("80.0 MB/s"), "{text}");
    }
}
