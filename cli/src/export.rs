//! `tidemark export`: after `promote`, serve the remote units of a stopped secondary
//! system read-only over NBD, one export per pair, named after the pair.
//!
//! The rule for serving (checked by [`Exporter::open`]):
//! - the system's `journal_dir/LOCK` is taken and held while serving, so the secondary
//!   is not running and cannot start meanwhile (its units do not change under clients);
//! - the recovered journal holds no packet of the system's pairs at or below the
//!   system's durable commit limit that is not applied. `promote` leaves exactly that
//!   state (it applies every packet up to the limit it records; only packets above it
//!   stay, `beyond_cut`), and so does a secondary that had applied everything up to its
//!   limit when it stopped. Then each remote unit holds exactly its writes at or below
//!   the limit: together a consistent cut (I1). Otherwise the units may lag the limit
//!   (or show a gap) and export refuses, naming `promote`;
//! - no pair of the system is *inconsistent* in the journal (an initial sync began and
//!   its last piece is not applied: the unit is a mix of old and new blocks). Otherwise
//!   export refuses ([`EngineError::SyncUnfinished`]) unless `force`, which serves the
//!   units all the same and says so (`forced`, each export's `state`). `force` does not
//!   lift the rule above: an unpromoted system is refused whatever.
//!
//! - if the journal holds a resync epoch open at the durable limit (above its base,
//!   below its `closes_at` or with none), the units are a cut only at the base, once
//!   `promote` rolled them back: every unit's undo file must be marked restored, and
//!   the rule above applies at the base (`limit_ts` is the base then). Otherwise
//!   export refuses, naming `promote`.
//!
//! The unit files are opened read-only ([`FileStore::open_read_only`]): nothing served
//! can change them.

use crate::config::Config;
use crate::daemon::{lock_system, SystemLock};
use crate::promote::state_name;
use std::path::PathBuf;
use std::sync::Arc;
use tidemark::journal::{PairState, Recovered};
use tidemark::{BlockStore, FileStore, PairId, Stamp, Timestamp};
use tidemark_actors::error::EngineError;
use tidemark_actors::nbd::ReadOnlyBackend;
use tidemark_actors::units::journaling::SharedJournal;
use tidemark_actors::units::undo::UndoFile;

/// One served remote unit.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ExportedUnit {
    /// The pair's name, which is the export name.
    pub name: String,
    pub size: u64,
    pub path: PathBuf,
    /// The last packet applied to the unit, as the journal records it.
    pub applied_seq: u64,
    pub applied_ts: u64,
    /// `"consistent"`, or `"inconsistent"` (an initial sync had not finished: only with
    /// `--force`).
    pub state: &'static str,
}

/// What `tidemark export` prints once it listens.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ExportReport {
    pub system: String,
    /// The address bound (the real port when port 0 was asked for).
    pub listen: String,
    /// The durable commit limit the units are a cut at.
    pub limit_ts: u64,
    pub read_only: bool,
    /// `--force` served units whose initial sync had not finished (their `state` is
    /// `"inconsistent"`); false when `--force` was given but not needed.
    pub forced: bool,
    pub exports: Vec<ExportedUnit>,
}

/// The pairs of `system` (by name) whose journal still holds packets at or below `cut`
/// that are not applied, with how many. Empty exactly when the remote units of `system`
/// are the cut at `cut` (every packet up to it applied, none missing).
pub fn unapplied_at_or_below(
    cfg: &Config,
    system: usize,
    recovered: &Recovered,
    cut: Timestamp,
) -> Vec<(String, usize)> {
    cfg.pairs
        .iter()
        .enumerate()
        .filter(|(_, p)| p.remote == system)
        .filter_map(|(i, p)| {
            let rp = recovered.pair(PairId(i as u32))?;
            let n = rp.live.iter().filter(|pkt| pkt.stamp.ts <= cut).count();
            (n > 0).then(|| (p.name.clone(), n))
        })
        .collect()
}

/// A stopped, promoted secondary's remote units, open read-only, with the system's lock
/// held for as long as this lives.
pub struct Exporter {
    _lock: SystemLock,
    backend: Arc<ReadOnlyBackend>,
    report: ExportReport,
}

impl Exporter {
    /// Takes the lock of secondary `system` ([`EngineError::Running`] if it runs),
    /// recovers its journal, checks the rules of this module
    /// ([`EngineError::NotPromoted`], then [`EngineError::SyncUnfinished`] unless
    /// `force`) and opens every remote unit of the system read-only.
    pub fn open(cfg: &Config, system: usize, force: bool) -> Result<Exporter, EngineError> {
        let sys = &cfg.systems[system];
        if sys.primary {
            return Err(EngineError::Config(format!(
                "--system: {:?} is not a secondary",
                sys.name
            )));
        }
        let lock = lock_system(cfg, system)?;
        let (journal, recovered) = SharedJournal::open(&sys.segments_dir(), sys.journal_size)?;
        drop(journal);
        let (cut, rolled_back) = crate::promote::cut_at(&recovered, recovered.limit);
        if rolled_back {
            let dir = crate::promote::undo_dir(cfg, system);
            let mut not_restored = Vec::new();
            for (i, p) in cfg.pairs.iter().enumerate() {
                if p.remote != system {
                    continue;
                }
                let restored = UndoFile::read(&dir, PairId(i as u32))
                    .map_err(|e| EngineError::Unit(format!("undo: {e}")))?
                    .is_some_and(|d| {
                        d.header.base == cut && tidemark::undo::is_restored(&d.records)
                    });
                if !restored {
                    not_restored.push(p.name.clone());
                }
            }
            if !not_restored.is_empty() {
                return Err(EngineError::NotPromoted {
                    system: sys.name.clone(),
                    detail: format!(
                        "a resync epoch (base {}) is open at its durable commit limit {}: \
                         the units are a cut only once rolled back to the base (not yet: {})",
                        cut.0,
                        recovered.limit.0,
                        not_restored.join(", ")
                    ),
                });
            }
        }
        let behind = unapplied_at_or_below(cfg, system, &recovered, cut);
        if !behind.is_empty() {
            let detail = behind
                .iter()
                .map(|(name, n)| format!("{name}: {n}"))
                .collect::<Vec<_>>()
                .join(", ");
            return Err(EngineError::NotPromoted {
                system: sys.name.clone(),
                detail: format!(
                    "its journal holds packets at or below its durable commit limit {} \
                     that are not applied ({detail})",
                    cut.0
                ),
            });
        }
        let state = |i: usize| {
            recovered
                .pair(PairId(i as u32))
                .and_then(|r| r.state)
                .unwrap_or(PairState::Consistent)
        };
        let unfinished: Vec<String> = cfg
            .pairs
            .iter()
            .enumerate()
            .filter(|(i, p)| p.remote == system && state(*i) == PairState::Inconsistent)
            .map(|(_, p)| format!("{} ({})", p.name, sys.name))
            .collect();
        if !unfinished.is_empty() && !force {
            return Err(EngineError::SyncUnfinished {
                command: "export".into(),
                pairs: unfinished.join(", "),
            });
        }
        let mut units: Vec<(String, Arc<dyn BlockStore>)> = Vec::new();
        let mut exports = Vec::new();
        for (i, p) in cfg.pairs.iter().enumerate() {
            if p.remote != system {
                continue;
            }
            let store = FileStore::open_read_only(&p.remote_path, p.size)?;
            let applied = recovered
                .pair(PairId(i as u32))
                .map_or(Stamp::ZERO, |r| r.applied);
            exports.push(ExportedUnit {
                name: p.name.clone(),
                size: p.size,
                path: p.remote_path.clone(),
                applied_seq: applied.seq.0,
                applied_ts: applied.ts.0,
                state: state_name(state(i)),
            });
            units.push((p.name.clone(), Arc::new(store)));
        }
        if units.is_empty() {
            return Err(EngineError::Config(format!(
                "system {:?} holds no remote unit: no [[pair]] has it as remote.system",
                sys.name
            )));
        }
        Ok(Exporter {
            _lock: lock,
            backend: Arc::new(ReadOnlyBackend::new(units)),
            report: ExportReport {
                system: sys.name.clone(),
                listen: String::new(),
                limit_ts: cut.0,
                read_only: true,
                forced: !unfinished.is_empty(),
                exports,
            },
        })
    }

    /// What is served (`listen` is filled in by the caller once bound).
    pub fn report(&self) -> &ExportReport {
        &self.report
    }

    pub fn backend(&self) -> &Arc<ReadOnlyBackend> {
        &self.backend
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;
    use tidemark::journal::Record;
    use tidemark::{Offset, Packet, Payload, Seq, Timestamp};
    use tidemark_actors::nbd::Backend;
    use tidemark_actors::units::journaling::Durability;

    fn config(dir: &Path) -> Config {
        let text = r#"
key_file = "cluster.key"
orderer = "site-b"

[[system]]
name = "site-a"
role = "primary"
listen = "127.0.0.1:7100"
journal_dir = "a/journal"

[[system]]
name = "site-b"
role = "secondary"
listen = "127.0.0.1:7200"
journal_dir = "b/journal"
journal_size = "4MiB"

[[pair]]
name = "log"
size = "4KiB"
local  = { system = "site-a", path = "a/log.img" }
remote = { system = "site-b", path = "b/log.img" }

[[pair]]
name = "data"
size = "8KiB"
local  = { system = "site-a", path = "a/data.img" }
remote = { system = "site-b", path = "b/data.img" }
"#;
        Config::parse(text, dir, &dir.join("t.toml")).expect("config")
    }

    fn packet(pair: u32, ts: u64, seq: u64, offset: u64, byte: u8) -> Record {
        Record::Packet(Packet {
            pair: PairId(pair),
            stamp: Stamp::new(Timestamp(ts), Seq(seq)),
            payload: Payload::Write {
                offset: Offset(offset),
                data: bytes::Bytes::from(vec![byte; 512]),
            },
        })
    }

    /// Site-b's journal as a killed secondary may leave it: packets received, a limit
    /// made durable, nothing applied.
    fn journal_unapplied(cfg: &Config) {
        let sys = &cfg.systems[1];
        let (j, _) = SharedJournal::open(&sys.segments_dir(), sys.journal_size).expect("j");
        j.append(
            &[
                packet(0, 10, 1, 0, 0xa1),
                packet(1, 12, 1, 512, 0xb1),
                packet(0, 20, 2, 1024, 0xa2),
                Record::Limit { ts: Timestamp(15) },
                packet(1, 30, 2, 0, 0xb2),
            ],
            Durability::Synced,
        )
        .expect("append");
    }

    fn read(backend: &ReadOnlyBackend, export: usize, offset: u64, len: u32) -> Vec<u8> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(backend.read(export, Offset(offset), len))
            .expect("read")
            .to_vec()
    }

    #[test]
    fn refuses_until_promoted_then_serves_the_cut_read_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = config(dir.path());
        journal_unapplied(&cfg);
        match Exporter::open(&cfg, 1, false) {
            Err(EngineError::NotPromoted { system, detail }) => {
                assert_eq!(system, "site-b");
                assert!(detail.contains("limit 15"), "{detail}");
                assert!(
                    detail.contains("log: 1") && detail.contains("data: 1"),
                    "{detail}"
                );
            }
            Err(e) => panic!("wrong refusal: {e}"),
            Ok(_) => panic!("served an unpromoted secondary"),
        }
        // Refusing touched no unit.
        assert!(!cfg.pairs[0].remote_path.exists());
        let report = crate::promote::promote(&cfg, &[1], false, false).expect("promote");
        assert!(report.consistent);
        assert_eq!(report.limit_ts, 15);
        let before: Vec<Vec<u8>> = cfg
            .pairs
            .iter()
            .map(|p| std::fs::read(&p.remote_path).expect("unit"))
            .collect();
        let ex = Exporter::open(&cfg, 1, false).expect("promoted: served");
        let r = ex.report();
        assert_eq!(r.limit_ts, 15);
        let seqs: Vec<(&str, u64, u64)> = r
            .exports
            .iter()
            .map(|e| (e.name.as_str(), e.size, e.applied_seq))
            .collect();
        assert_eq!(seqs, vec![("log", 4096, 1), ("data", 8192, 1)]);
        let b = ex.backend();
        let exports = b.exports();
        assert!(exports.iter().all(|e| e.flags.read_only && !e.flags.trim));
        // The cut: each pair's packets with ts <= 15, nothing above.
        assert_eq!(read(b, 0, 0, 512), vec![0xa1; 512]);
        assert_eq!(read(b, 0, 1024, 512), vec![0; 512]);
        assert_eq!(read(b, 1, 512, 512), vec![0xb1; 512]);
        assert_eq!(read(b, 1, 0, 512), vec![0; 512]);
        // A write that reached the backend anyway is refused and changes nothing.
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let e = rt
            .block_on(b.write(
                0,
                vec![Payload::Write {
                    offset: Offset(0),
                    data: bytes::Bytes::from_static(b"x"),
                }],
            ))
            .expect_err("read-only");
        assert_eq!(e.code, tidemark_actors::nbd::ErrorCode::Perm);
        rt.block_on(b.flush(0)).expect("flush");
        // While it serves, the system is locked: no secondary, no second export.
        assert!(matches!(
            Exporter::open(&cfg, 1, false),
            Err(EngineError::Running(_))
        ));
        drop(ex);
        for (p, bytes) in cfg.pairs.iter().zip(before) {
            assert_eq!(std::fs::read(&p.remote_path).expect("unit"), bytes);
        }
        // A primary is not exported.
        assert!(matches!(
            Exporter::open(&cfg, 0, false),
            Err(EngineError::Config(_))
        ));
    }

    #[test]
    fn a_running_secondary_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = config(dir.path());
        let _running = lock_system(&cfg, 1).expect("lock");
        assert!(matches!(
            Exporter::open(&cfg, 1, false),
            Err(EngineError::Running(s)) if s == "site-b"
        ));
    }

    #[test]
    fn a_gap_below_the_limit_is_refused_after_promote_too() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = config(dir.path());
        let sys = &cfg.systems[1];
        let (j, _) = SharedJournal::open(&sys.segments_dir(), sys.journal_size).expect("j");
        // Seq 2 of "log" never arrived; seq 3 lies below the limit.
        j.append(
            &[
                packet(0, 10, 1, 0, 1),
                packet(0, 30, 3, 512, 3),
                Record::Limit { ts: Timestamp(40) },
            ],
            Durability::Synced,
        )
        .expect("append");
        drop(j);
        let report = crate::promote::promote(&cfg, &[1], false, false).expect("promote");
        assert!(!report.consistent);
        match Exporter::open(&cfg, 1, false) {
            Err(EngineError::NotPromoted { detail, .. }) => {
                assert!(detail.contains("log: 1"), "{detail}")
            }
            Err(e) => panic!("wrong refusal: {e}"),
            Ok(_) => panic!("served units with a gap below the limit"),
        }
    }

    fn mark(pair: u32, ts: u64, seq: u64, mark: tidemark::Mark) -> Record {
        Record::Packet(Packet {
            pair: PairId(pair),
            stamp: Stamp::new(Timestamp(ts), Seq(seq)),
            payload: Payload::Mark(mark),
        })
    }

    fn append(cfg: &Config, records: &[Record]) {
        let sys = &cfg.systems[1];
        let (j, _) = SharedJournal::open(&sys.segments_dir(), sys.journal_size).expect("j");
        j.append(records, Durability::Synced).expect("append");
    }

    fn recovered(cfg: &Config) -> Recovered {
        let sys = &cfg.systems[1];
        SharedJournal::open(&sys.segments_dir(), sys.journal_size)
            .expect("j")
            .1
    }

    /// "log" is in the middle of an initial sync at the durable limit (its `SyncBegin`
    /// and a piece lie below it, its `SyncDone` above): promote and export refuse,
    /// changing nothing, until `--force`, which applies up to the limit, journals the
    /// pair inconsistent and says so; once a later limit covers `SyncDone`, promote
    /// makes it consistent and both go through without `--force`.
    #[test]
    fn an_unfinished_initial_sync_is_refused_unless_forced() {
        use tidemark::Mark;
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = config(dir.path());
        append(
            &cfg,
            &[
                mark(0, 10, 1, Mark::SyncBegin),
                packet(0, 12, 2, 0, 0xa1),
                packet(1, 13, 1, 0, 0xb1),
                Record::Limit { ts: Timestamp(15) },
                mark(0, 20, 3, Mark::SyncDone),
            ],
        );
        match crate::promote::promote(&cfg, &[1], false, false) {
            Err(e @ EngineError::SyncUnfinished { .. }) => {
                let m = e.to_string();
                assert!(m.contains("promote") && m.contains("log (site-b)"), "{m}");
                assert!(!m.contains("data (site-b)"), "data is consistent: {m}");
                assert!(e.is_usage(), "exit 2");
            }
            other => panic!("not refused: {other:?}"),
        }
        // Nothing changed: no unit written, nothing journaled as applied.
        assert!(!cfg.pairs[0].remote_path.exists() && !cfg.pairs[1].remote_path.exists());
        let r = recovered(&cfg);
        assert!(r
            .pairs
            .values()
            .all(|p| p.applied == Stamp::ZERO && p.state.is_none()));
        // Not promoted is said first, forced or not.
        for force in [false, true] {
            assert!(matches!(
                Exporter::open(&cfg, 1, force),
                Err(EngineError::NotPromoted { .. })
            ));
        }

        let report = crate::promote::promote(&cfg, &[1], false, true).expect("forced");
        assert!(
            report.forced && !report.consistent && !report.gap,
            "{report:?}"
        );
        let states: Vec<(&str, &str, u64)> = report
            .pairs
            .iter()
            .map(|p| (p.name.as_str(), p.state, p.applied_seq))
            .collect();
        assert_eq!(
            states,
            vec![("log", "inconsistent", 2), ("data", "consistent", 1)]
        );
        assert_eq!(read_file(&cfg, 0, 0, 512), vec![0xa1; 512]);
        let r = recovered(&cfg);
        assert_eq!(
            r.pair(PairId(0)).and_then(|p| p.state),
            Some(PairState::Inconsistent),
            "promote journaled the state the marks left"
        );
        assert_eq!(r.pair(PairId(1)).and_then(|p| p.state), None);
        // Promoted now, but "log" is still inconsistent.
        match Exporter::open(&cfg, 1, false) {
            Err(EngineError::SyncUnfinished { command, pairs }) => {
                assert_eq!(
                    (command.as_str(), pairs.as_str()),
                    ("export", "log (site-b)")
                )
            }
            Err(e) => panic!("wrong refusal: {e}"),
            Ok(_) => panic!("served an inconsistent unit"),
        }
        let ex = Exporter::open(&cfg, 1, true).expect("forced export");
        assert!(ex.report().forced);
        let st: Vec<&str> = ex.report().exports.iter().map(|e| e.state).collect();
        assert_eq!(st, vec!["inconsistent", "consistent"]);
        drop(ex);
        // Promoting again applies nothing and changes no state: still only with --force.
        let again = crate::promote::promote(&cfg, &[1], false, true);
        assert!(
            matches!(again, Ok(ref r) if r.forced),
            "still inconsistent: {again:?}"
        );

        // The sync's last mark comes under a later limit: consistent again.
        append(&cfg, &[Record::Limit { ts: Timestamp(25) }]);
        let report = crate::promote::promote(&cfg, &[1], false, false).expect("promote");
        assert!(report.consistent && !report.forced, "{report:?}");
        assert_eq!(report.pairs[0].state, "consistent");
        assert_eq!(report.pairs[0].applied_seq, 3);
        assert_eq!(
            recovered(&cfg).pair(PairId(0)).and_then(|p| p.state),
            Some(PairState::Consistent)
        );
        let ex = Exporter::open(&cfg, 1, false).expect("consistent: served");
        assert!(!ex.report().forced);
    }

    fn read_file(cfg: &Config, pair: usize, offset: usize, len: usize) -> Vec<u8> {
        let bytes = std::fs::read(&cfg.pairs[pair].remote_path).expect("unit");
        bytes[offset..offset + len].to_vec()
    }
}
