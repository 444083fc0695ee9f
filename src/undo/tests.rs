use super::*;
use crate::packet::Payload;
use crate::storage::{BlockStore, MemStore};
use bytes::Bytes;
use rand::{Rng, SeedableRng};
use rand_pcg::Pcg64;

fn t(x: u64) -> Timestamp {
    Timestamp(x)
}

fn write(seq: u64, ts: u64, offset: u64, len: usize, byte: u8) -> Packet {
    Packet {
        pair: crate::PairId(0),
        stamp: Stamp::new(t(ts), Seq(seq)),
        payload: Payload::Write {
            offset: Offset(offset),
            data: Bytes::from(vec![byte; len]),
        },
    }
}

fn mark(seq: u64, ts: u64, m: Mark) -> Packet {
    Packet {
        pair: crate::PairId(0),
        stamp: Stamp::new(t(ts), Seq(seq)),
        payload: Payload::Mark(m),
    }
}

fn file(h: Header, records: &[UndoRecord]) -> Vec<u8> {
    let mut out = encode_header(&h).to_vec();
    for r in records {
        out.extend(encode_record(r));
    }
    out
}

fn sample() -> Vec<UndoRecord> {
    vec![
        UndoRecord::Saved {
            offset: Offset(0),
            data: vec![1; 512],
        },
        UndoRecord::Status(Some(Resync {
            since: t(7),
            done: None,
        })),
        UndoRecord::Saved {
            offset: Offset(1024),
            data: vec![2; 300],
        },
        UndoRecord::Status(Some(Resync {
            since: t(7),
            done: Some(t(99)),
        })),
        UndoRecord::Status(None),
        UndoRecord::Restored,
    ]
}

#[test]
fn roundtrip() {
    let h = Header {
        base: t(42),
        region: 512,
    };
    let bytes = file(h, &sample());
    let d = decode(&bytes).expect("decodes");
    assert_eq!(d.header, h);
    assert_eq!(d.records, sample());
    assert_eq!(d.valid_len, bytes.len() as u64);
    assert_eq!(d.torn, None);
    assert_eq!(last_status(&d.records), None);
    assert!(is_restored(&d.records));
    assert_eq!(
        last_status(&d.records[..2]),
        Some(Resync {
            since: t(7),
            done: None
        })
    );
}

/// Every cut of a file is either the full file or a torn tail that is dropped: the
/// frames before it decode, the torn one never does.
#[test]
fn a_torn_tail_is_cut_at_the_last_good_frame() {
    let h = Header {
        base: t(1),
        region: 512,
    };
    let records = sample();
    let bytes = file(h, &records);
    let mut ends = vec![HEADER_LEN];
    for r in &records {
        ends.push(ends[ends.len() - 1] + encode_record(r).len());
    }
    for cut in HEADER_LEN..bytes.len() {
        let d = decode(&bytes[..cut]).expect("header intact");
        let whole = ends.iter().filter(|&&e| e <= cut).count() - 1;
        assert_eq!(d.records, records[..whole], "cut at {cut}");
        assert_eq!(d.valid_len, ends[whole] as u64, "cut at {cut}");
        assert_eq!(d.torn.is_some(), cut != ends[whole], "cut at {cut}");
    }
    for cut in 0..HEADER_LEN {
        assert_eq!(decode(&bytes[..cut]), Err(UndoError::ShortHeader(cut)));
    }
}

/// A flipped bit in a frame makes it (and everything after it) a torn tail: its bytes
/// are never restored. In the header it is an error.
#[test]
fn a_corrupt_frame_is_never_restored() {
    let h = Header {
        base: t(1),
        region: 512,
    };
    let records = sample();
    let bytes = file(h, &records);
    let first = encode_record(&records[0]).len();
    for at in HEADER_LEN..bytes.len() {
        let mut bad = bytes.clone();
        bad[at] ^= 0x20;
        let d = decode(&bad).expect("header intact");
        let restored = restore_plan(&d.records);
        if at < HEADER_LEN + first {
            assert!(d.records.is_empty(), "flip at {at}");
            assert!(restored.is_empty(), "flip at {at}");
        }
        assert!(d.torn.is_some(), "flip at {at} went unnoticed");
        for (o, data) in restored {
            assert!(
                (o == Offset(0) && data == &[1u8; 512][..])
                    || (o == Offset(1024) && data == &[2u8; 300][..]),
                "flip at {at} restored {o:?}"
            );
        }
    }
    for at in 0..HEADER_LEN {
        let mut bad = bytes.clone();
        bad[at] ^= 0x01;
        assert!(decode(&bad).is_err(), "header flip at {at}");
    }
}

#[test]
fn header_checks() {
    assert_eq!(check_region(0), Err(UndoError::Region(0)));
    assert_eq!(check_region(1000), Err(UndoError::Region(1000)));
    assert_eq!(
        check_region(MAX_REGION * 2),
        Err(UndoError::Region(MAX_REGION * 2))
    );
    assert_eq!(check_region(DEFAULT_REGION), Ok(DEFAULT_REGION));
    let mut h = encode_header(&Header {
        base: t(5),
        region: 4096,
    });
    h[8] = 9;
    let crc = crc32c::crc32c(&h[..28]).to_le_bytes();
    h[28..].copy_from_slice(&crc);
    assert_eq!(decode_header(&h), Err(UndoError::Version(9)));
    assert_eq!(
        decode_header(b"TDMKJRNL............................"),
        Err(UndoError::Magic)
    );
}

#[test]
fn which_regions_a_batch_saves() {
    let mut log = UndoLog::new(t(100), 1024, 4096 + 100).expect("log");
    let batch = [
        write(1, 90, 0, 2048, 1), // at or below the base: nothing to save
        mark(2, 101, Mark::ResyncBegin),
        write(3, 102, 1000, 30, 2),  // regions 0 and 1
        write(4, 103, 1500, 10, 3),  // region 1 again
        write(5, 104, 4000, 200, 4), // region 3 and the short last one (100 bytes)
        write(6, 105, 9000, 10, 5),  // beyond the unit: the store refuses it; nothing saved
    ];
    let want = vec![
        (Offset(0), 1024),
        (Offset(1024), 1024),
        (Offset(3072), 1024),
        (Offset(4096), 100),
    ];
    assert_eq!(log.to_save(&batch), want);
    for (o, _) in &want[..2] {
        log.saved(*o, 10);
    }
    assert!(log.is_saved(Offset(1500)) && !log.is_saved(Offset(2048)));
    assert_eq!(log.to_save(&batch), want[2..].to_vec());
    assert_eq!(log.bytes(), HEADER_LEN as u64 + 20);
    let zero = Packet {
        pair: crate::PairId(0),
        stamp: Stamp::new(t(200), Seq(7)),
        payload: Payload::Zero {
            offset: Offset(2048),
            len: 2048,
        },
    };
    assert_eq!(
        log.to_save([&zero]),
        vec![(Offset(2048), 1024), (Offset(3072), 1024)]
    );
}

/// A resync's status as the run shows it, as the applied point leaves it, and as a
/// restart recovers it.
#[test]
fn resync_status_follows_the_marks() {
    let mut st = ResyncStatus::default();
    let run = [
        write(1, 10, 0, 1, 1),
        mark(2, 20, Mark::ResyncBegin),
        write(3, 30, 0, 1, 1),
        mark(4, 40, Mark::ResyncDone),
    ];
    // The head was 15 (a heartbeat) before packet 1 joined: since = max(15, 10).
    st.joined(Stamp::new(t(15), Seq(0)), &run[..2]);
    let open = Resync {
        since: t(15),
        done: None,
    };
    assert_eq!(st.get(), Some(open));
    assert_eq!(st.applied_view(Seq(1)), None);
    assert_eq!(st.applied_view(Seq(2)), Some(open));
    st.joined(Stamp::new(t(20), Seq(2)), &run[2..]);
    let done = Resync {
        since: t(15),
        done: Some(t(40)),
    };
    assert_eq!(st.get(), Some(done));
    assert_eq!(st.applied_view(Seq(3)), Some(open));
    assert_eq!(st.applied_view(Seq(4)), None);
    st.applied(Seq(3));
    assert_eq!(st.get(), Some(done));
    st.applied(Seq(4));
    assert_eq!(st.get(), None);
    // A restarted stream: the Restart mark opens it, the begin mark after it keeps
    // its since; so does a second begin mark before the done mark.
    let mut st = ResyncStatus::default();
    st.joined(
        Stamp::new(t(5), Seq(0)),
        &[
            mark(1, 50, Mark::Restart),
            mark(2, 51, Mark::ResyncBegin),
            mark(3, 60, Mark::ResyncBegin),
        ],
    );
    assert_eq!(
        st.get(),
        Some(Resync {
            since: t(5),
            done: None
        })
    );
    // A done mark without a begin (its epoch closed before a restart): nothing.
    let mut st = ResyncStatus::default();
    st.joined(Stamp::ZERO, &run[3..]);
    assert_eq!(st.get(), None);

    let e = Some(Epoch {
        base: t(12),
        closes_at: None,
    });
    // Restart with the begin mark journaled, not applied: since from the packet
    // before it, raised to the epoch's base, or to the durable limit if none is open.
    let after1 = Stamp::new(t(10), Seq(1));
    let r = ResyncStatus::recover(None, e, t(0), after1, &run[1..]);
    assert_eq!(
        r.get().map(|s| (s.since, s.done)),
        Some((t(12), Some(t(40))))
    );
    let r = ResyncStatus::recover(None, None, t(11), after1, &run[1..3]);
    assert_eq!(
        r.get(),
        Some(Resync {
            since: t(11),
            done: None
        })
    );
    // No epoch, durable limit past the begin mark: its epoch closed: nothing.
    let r = ResyncStatus::recover(None, None, t(45), after1, &run[1..]);
    assert_eq!(r.get(), None);
    // The begin mark applied before the restart: the undo file's status.
    let after2 = Stamp::new(t(20), Seq(2));
    let r = ResyncStatus::recover(Some(open), e, t(20), after2, &run[2..]);
    assert_eq!(r.get(), Some(done));
    assert_eq!(r.applied_view(Seq(3)), Some(open));
    // ... but not without an open epoch.
    let r = ResyncStatus::recover(Some(open), None, t(20), after2, &run[2..]);
    assert_eq!(r.get(), None);
}

/// The undo log's promise, on a memory unit: a stream with a begin mark, region
/// writes out of write order, client writes, a done mark, applied in batches of any
/// size with the saves first; rolling back at any point between batches (after
/// applying the journaled rest at or below the base, as promote does) gives the unit
/// as of the base. Seeded; the seed is printed.
#[test]
fn rolling_back_at_any_apply_point_gives_the_cut_at_the_base() {
    let seed = crate::test_seed(0x5eed);
    for round in 0..32u64 {
        let seed = seed.wrapping_add(round);
        println!("seed {seed}");
        let mut rng = Pcg64::seed_from_u64(seed);
        let size = 8 * 1024 + 512 * rng.random_range(0..8u64);
        let region = 512 * rng.random_range(1..=4u64);
        // Packets before and after the base, ts growing with seq.
        let base = 1000;
        let mut packets = Vec::new();
        let mut ts = 0;
        for seq in 1..=60u64 {
            ts += rng.random_range(1..40);
            let p = if seq == 30 {
                mark(seq, ts.max(base + 1), Mark::ResyncBegin)
            } else if seq == 55 {
                mark(seq, ts.max(base + 1), Mark::ResyncDone)
            } else {
                let len = rng.random_range(1..2048usize);
                let off = rng.random_range(0..size - len as u64);
                write(seq, ts, off, len, rng.random())
            };
            ts = ts.max(p.stamp.ts.0);
            packets.push(p);
        }
        let unit = MemStore::new(size);
        let mut at_base = MemStore::new(size);
        for p in packets.iter().filter(|p| p.stamp.ts.0 <= base) {
            at_base.apply(&p.payload).expect("apply");
        }
        let want = at_base.snapshot();
        at_base = MemStore::new(0);
        drop(at_base);
        let mut log = UndoLog::new(t(base), region, size).expect("log");
        let mut records = Vec::new();
        let mut next = 0;
        while next < packets.len() {
            let n = rng.random_range(1..=8).min(packets.len() - next);
            let batch = &packets[next..next + n];
            // The packets at or below the base first, then the saves, then the rest.
            let split = log.split(batch);
            for p in &batch[..split] {
                unit.apply(&p.payload).expect("apply");
            }
            for (o, len) in log.to_save(&batch[split..]) {
                let mut data = vec![0u8; len as usize];
                unit.read_at(o, &mut data).expect("read");
                let r = UndoRecord::Saved { offset: o, data };
                log.saved(o, encode_record(&r).len() as u64);
                records.push(r);
            }
            for p in &batch[split..] {
                unit.apply(&p.payload).expect("apply");
            }
            next += n;
            // Roll a copy back as promote does: the journaled rest at or below the
            // base, then every saved region.
            let copy = MemStore::new(size);
            copy.write_at(Offset(0), &unit.snapshot()).expect("copy");
            for p in packets[next..].iter().filter(|p| p.stamp.ts.0 <= base) {
                copy.apply(&p.payload).expect("apply");
            }
            for (o, data) in restore_plan(&records) {
                copy.write_at(o, data).expect("restore");
            }
            let got = copy.snapshot();
            let first_diff = got.iter().zip(&want).position(|(a, b)| a != b);
            assert_eq!(
                first_diff, None,
                "seed {seed}: rolled back after {next} packets"
            );
        }
        assert!(log.bytes() <= HEADER_LEN as u64 + size + (size / region + 1) * 17);
    }
}
