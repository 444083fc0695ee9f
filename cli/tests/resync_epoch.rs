//! The resync epoch at the remote, through the real remote site, remote units (with
//! their journal and undo files on disk) and the orderer's core, and `promote` on a copy
//! of the secondary's files taken at every application (the image a SIGKILL at that
//! moment leaves).
//!
//! Two pairs on one secondary. Pair 0 goes to tracking: its writes change its local
//! model but are not shipped, while pair 1 goes on; then pair 0 ships a `ResyncBegin`
//! mark, its dirty regions in random order (each holding the local unit as of its
//! stamp), interleaved with new client writes on both pairs, and a `ResyncDone` mark.
//! Every promote must give both remote units exactly the writes stamped at or below the
//! cut it reports (the base it rolled back to, or its limit): a consistent cut. Seeded
//! (`TIDEMARK_SEED`), the seed printed.

mod common;
use actix::prelude::*;
use bytes::Bytes;
use common::epoch::{copy_dir, two_pair_config};
use rand::{Rng, SeedableRng};
use rand_pcg::Pcg64;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tidemark::journal::Epoch;
use tidemark::{
    BlockStore, FileStore, Heartbeat, Mark, Message as WireMessage, OrderAction, Orderer, Packet,
    PairId, Payload, Seq, Stamp, SystemId, Timestamp,
};
use tidemark_actors::msg::{AnnounceIn, HeartbeatsIn, LimitIn, Outbound, PacketsIn, WaitApplied};
use tidemark_actors::units::disk::Disk;
use tidemark_actors::units::journaling::SharedJournal;
use tidemark_actors::units::remote::{RemoteResume, RemoteUnit, RemoteWiring};
use tidemark_actors::units::site::{RemoteSite, SiteWiring};
use tidemark_actors::{Applied, Health};
use tidemark_cli::config::Config;

const SIZE: u64 = 64 * 1024;
/// The primary's dirty-region size (the copy's pieces).
const DIRTY: u64 = 8 * 1024;
/// The remote's undo region size.
const UNDO_REGION: u64 = 4096;

/// The orderer's system, as a link: takes the units' head reports, runs the orderer
/// core and hands its releases to the site.
struct Wire {
    core: Orderer,
    site: Option<Addr<RemoteSite>>,
    epochs: Arc<Mutex<Vec<Option<Epoch>>>>,
}

impl Actor for Wire {
    type Context = Context<Self>;
}

#[derive(Message)]
#[rtype(result = "()")]
struct SetSite(Addr<RemoteSite>);

impl Handler<SetSite> for Wire {
    type Result = ();
    fn handle(&mut self, msg: SetSite, _: &mut Context<Self>) {
        self.site = Some(msg.0);
    }
}

impl Handler<Outbound> for Wire {
    type Result = ();
    fn handle(&mut self, msg: Outbound, _: &mut Context<Self>) {
        if let WireMessage::Heads(hs) = msg.msg {
            for h in hs {
                self.core.handle_report(h.pair, h.head.ts, h.resync);
            }
        }
        while let Some(a) = self.core.poll_action() {
            let Some(site) = &self.site else { continue };
            match a {
                OrderAction::Release { limit, epoch } => {
                    if let Ok(mut v) = self.epochs.lock() {
                        v.push(epoch);
                    }
                    site.do_send(LimitIn { limit, epoch })
                }
                OrderAction::Announce { limit, epoch } => site.do_send(AnnounceIn { limit, epoch }),
            }
        }
    }
}

fn config(dir: &Path) -> Config {
    two_pair_config(dir, "4MiB", "64KiB")
}

/// A client write: (pair, ts, offset, data), shipped or tracked.
type Write = (u32, u64, u64, Vec<u8>);

/// Pair `pair`'s unit as of `cut`: every client write stamped at or below it.
fn model_at(history: &[Write], pair: u32, cut: u64) -> Vec<u8> {
    let mut unit = vec![0u8; SIZE as usize];
    for (p, ts, off, data) in history {
        if *p == pair && *ts <= cut {
            unit[*off as usize..*off as usize + data.len()].copy_from_slice(data);
        }
    }
    unit
}

struct Stream {
    /// What reaches the remote, in stamp order: a packet or a heartbeat.
    items: Vec<(u32, Item)>,
    history: Vec<Write>,
    since: u64,
    done: u64,
    last_seq: [u64; 2],
}

enum Item {
    Packet(Packet),
    Heartbeat(Stamp),
}

fn stream(rng: &mut Pcg64) -> Stream {
    let mut ts = 0u64;
    let mut seq = [0u64; 2];
    let mut local = [vec![0u8; SIZE as usize], vec![0u8; SIZE as usize]];
    let mut items = Vec::new();
    let mut history = Vec::new();
    let write = |pair: u32,
                 ship: bool,
                 ts: &mut u64,
                 seq: &mut [u64; 2],
                 local: &mut [Vec<u8>; 2],
                 items: &mut Vec<(u32, Item)>,
                 history: &mut Vec<Write>,
                 rng: &mut Pcg64| {
        *ts += 1;
        let len = rng.random_range(1..=3000usize);
        let off = rng.random_range(0..SIZE - len as u64);
        let data: Vec<u8> = (0..len).map(|_| rng.random()).collect();
        local[pair as usize][off as usize..off as usize + len].copy_from_slice(&data);
        history.push((pair, *ts, off, data.clone()));
        if ship {
            seq[pair as usize] += 1;
            items.push((
                pair,
                Item::Packet(Packet {
                    pair: PairId(pair),
                    stamp: Stamp::new(Timestamp(*ts), Seq(seq[pair as usize])),
                    payload: Payload::Write {
                        offset: tidemark::Offset(off),
                        data: Bytes::from(data),
                    },
                }),
            ));
        }
        off
    };
    // Replicating.
    for _ in 0..30 {
        let p = rng.random_range(0..2);
        write(
            p,
            true,
            &mut ts,
            &mut seq,
            &mut local,
            &mut items,
            &mut history,
            rng,
        );
    }
    // Pair 0's last heartbeat before tracking: its head, `since`.
    ts += 1;
    let since = ts;
    items.push((0, Item::Heartbeat(Stamp::new(Timestamp(ts), Seq(seq[0])))));
    // Tracking: pair 0's writes stay local, their regions dirty.
    let mut dirty = std::collections::BTreeSet::new();
    for _ in 0..30 {
        let p = rng.random_range(0..2);
        let off = write(
            p,
            p == 1,
            &mut ts,
            &mut seq,
            &mut local,
            &mut items,
            &mut history,
            rng,
        );
        if p == 0 {
            let len = history.last().map_or(0, |w| w.3.len() as u64);
            for r in off / DIRTY..=(off + len - 1) / DIRTY {
                dirty.insert(r);
            }
        }
    }
    // Resync: the begin mark, the dirty regions in random order (each read at its place
    // in stamp order), client writes in between, the done mark.
    let mark = |m: Mark, ts: &mut u64, seq: &mut [u64; 2], items: &mut Vec<(u32, Item)>| {
        *ts += 1;
        seq[0] += 1;
        items.push((
            0,
            Item::Packet(Packet {
                pair: PairId(0),
                stamp: Stamp::new(Timestamp(*ts), Seq(seq[0])),
                payload: Payload::Mark(m),
            }),
        ));
    };
    mark(Mark::ResyncBegin, &mut ts, &mut seq, &mut items);
    let mut regions: Vec<u64> = dirty.into_iter().collect();
    for i in (1..regions.len()).rev() {
        regions.swap(i, rng.random_range(0..=i));
    }
    for r in regions {
        for _ in 0..rng.random_range(0..3) {
            let p = rng.random_range(0..2);
            write(
                p,
                true,
                &mut ts,
                &mut seq,
                &mut local,
                &mut items,
                &mut history,
                rng,
            );
        }
        ts += 1;
        seq[0] += 1;
        let off = r * DIRTY;
        let data = local[0][off as usize..(off + DIRTY) as usize].to_vec();
        items.push((
            0,
            Item::Packet(Packet {
                pair: PairId(0),
                stamp: Stamp::new(Timestamp(ts), Seq(seq[0])),
                payload: Payload::Write {
                    offset: tidemark::Offset(off),
                    data: Bytes::from(data),
                },
            }),
        ));
    }
    mark(Mark::ResyncDone, &mut ts, &mut seq, &mut items);
    let done = ts;
    for _ in 0..20 {
        let p = rng.random_range(0..2);
        write(
            p,
            true,
            &mut ts,
            &mut seq,
            &mut local,
            &mut items,
            &mut history,
            rng,
        );
    }
    ts += 1;
    for p in 0..2u32 {
        items.push((
            p,
            Item::Heartbeat(Stamp::new(Timestamp(ts), Seq(seq[p as usize]))),
        ));
    }
    Stream {
        items,
        history,
        since,
        done,
        last_seq: seq,
    }
}

/// Runs the stream through the remote site and units in `dir`; returns the snapshot
/// directories, one per application, and the epochs the releases carried.
fn run(dir: &Path, s: &Stream) -> (Vec<PathBuf>, Vec<Option<Epoch>>) {
    let cfg = config(dir);
    let snaps = Arc::new(Mutex::new(Vec::new()));
    let epochs = Arc::new(Mutex::new(Vec::new()));
    let sys = &cfg.systems[1];
    let journal_dir = sys.journal_dir.clone();
    let snap_root = dir.join("snaps");
    let hook_snaps = snaps.clone();
    let hook: tidemark_actors::ApplyHook = Arc::new(move |_: &Applied<'_>| {
        if let Ok(mut v) = hook_snaps.lock() {
            let at = snap_root.join(format!("{}", v.len()));
            copy_dir(journal_dir.parent().expect("b"), &at.join("b"));
            v.push(at);
        }
    });
    let system = actix_rt::System::new();
    let wire_epochs = epochs.clone();
    system.block_on(async {
        let (journal, _) =
            SharedJournal::open(&sys.segments_dir(), sys.journal_size).expect("journal");
        let health = Health::default();
        let core = Orderer::new(&[PairId(0), PairId(1)], &[SystemId(1)], Timestamp::ZERO)
            .expect("orderer");
        let wire = Wire {
            core,
            site: None,
            epochs: wire_epochs,
        }
        .start();
        let units: Vec<Addr<RemoteUnit>> = (0..2)
            .map(|i| {
                let store: Arc<dyn BlockStore> = Arc::new(
                    FileStore::open_or_create(&cfg.pairs[i].remote_path, SIZE).expect("unit"),
                );
                RemoteUnit::new(
                    PairId(i as u32),
                    RemoteWiring {
                        local_system: SystemId(0),
                        orderer_system: SystemId(1),
                        store,
                        journal: Some(journal.clone()),
                        disk: Disk::new(0),
                        link: wire.clone().recipient(),
                        hook: Some(hook.clone()),
                        wall: Arc::new(|| 0),
                        budget: 1 << 20,
                        health: health.clone(),
                        undo_dir: Some(tidemark_cli::promote::undo_dir(&cfg, 1)),
                        undo_region: UNDO_REGION,
                    },
                    RemoteResume::default(),
                )
                .start()
            })
            .collect();
        let site = RemoteSite::new(
            SiteWiring {
                me: SystemId(1),
                orderer_system: SystemId(1),
                units: units.clone(),
                link: wire.clone().recipient(),
                journal: Some(journal.clone()),
                disk: Disk::new(0),
                health: health.clone(),
            },
            Timestamp::ZERO,
            Timestamp::ZERO,
        )
        .start();
        wire.send(SetSite(site)).await.expect("wire");
        for (pair, item) in &s.items {
            let u = &units[*pair as usize];
            match item {
                Item::Packet(p) => u.send(PacketsIn(vec![p.clone()])).await.expect("unit"),
                Item::Heartbeat(stamp) => u
                    .send(HeartbeatsIn(vec![Heartbeat {
                        pair: PairId(*pair),
                        stamp: *stamp,
                    }]))
                    .await
                    .expect("unit"),
            }
        }
        for (i, u) in units.iter().enumerate() {
            u.send(WaitApplied(Seq(s.last_seq[i])))
                .await
                .expect("unit")
                .expect("applied");
        }
        assert!(health.failure().is_none(), "{:?}", health.failure());
    });
    let snaps = snaps.lock().expect("snaps").clone();
    let epochs = epochs.lock().expect("epochs").clone();
    (snaps, epochs)
}

#[test]
fn promote_at_every_apply_point_of_a_resync_is_a_consistent_cut() {
    let seed: u64 = std::env::var("TIDEMARK_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(7);
    for round in 0..4 {
        let seed = seed + round;
        println!("seed {seed} (replay with TIDEMARK_SEED={seed})");
        let mut rng = Pcg64::seed_from_u64(seed);
        let s = stream(&mut rng);
        let dir = tempfile::tempdir().expect("tempdir");
        let (snaps, epochs) = run(dir.path(), &s);
        // The orderer opened an epoch at or below since and closed it past done.
        let bases: Vec<u64> = epochs.iter().flatten().map(|e| e.base.0).collect();
        assert!(!bases.is_empty(), "seed {seed}: no epoch");
        assert!(
            bases.iter().all(|&b| b <= s.since),
            "seed {seed}: {bases:?}"
        );
        assert!(
            epochs
                .iter()
                .flatten()
                .any(|e| e.closes_at.is_some_and(|c| c.0 >= s.done)),
            "seed {seed}: never closed"
        );
        let (mut rolled, mut after_close, mut before) = (0, 0, 0);
        for (k, snap) in snaps.iter().enumerate() {
            let cfg = config(snap);
            let report = tidemark_cli::promote::promote(&cfg, &[1], false, false)
                .unwrap_or_else(|e| panic!("seed {seed}, snapshot {k}: promote: {e}"));
            let cut = report.rolled_back_to.unwrap_or(report.limit_ts);
            assert!(
                cut <= s.since || cut >= s.done,
                "seed {seed}, snapshot {k}: cut {cut} inside the resync ({}, {})",
                s.since,
                s.done
            );
            for pair in 0..2u32 {
                let got = std::fs::read(&cfg.pairs[pair as usize].remote_path).expect("unit");
                let want = model_at(&s.history, pair, cut);
                let diff = got.iter().zip(&want).position(|(a, b)| a != b);
                assert_eq!(
                    diff, None,
                    "seed {seed}, snapshot {k}: pair {pair} is not the cut at {cut} \
                     (report {report:?})"
                );
            }
            match report.rolled_back_to {
                Some(_) => {
                    rolled += 1;
                    // Again: the same (idempotent); export serves the base.
                    let again = tidemark_cli::promote::promote(&cfg, &[1], false, false)
                        .expect("promote again");
                    assert_eq!(again.rolled_back_to, report.rolled_back_to);
                    let ex = tidemark_cli::export::Exporter::open(&cfg, 1, false)
                        .expect("rolled back: served");
                    assert_eq!(ex.report().limit_ts, cut);
                }
                None if cut >= s.done => after_close += 1,
                None => before += 1,
            }
        }
        println!(
            "seed {seed}: {} snapshots: {before} before the epoch, {rolled} rolled back, \
             {after_close} after it closed",
            snaps.len()
        );
        assert!(
            rolled > 0 && after_close > 0,
            "seed {seed}: the run missed a phase"
        );
    }
}
