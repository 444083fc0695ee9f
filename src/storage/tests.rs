use super::*;

fn exercise(s: &dyn BlockStore) {
    s.write_at(Offset(10), b"abcdef").expect("in range");
    s.write_zeroes(Offset(12), 2).expect("in range");
    let mut buf = [0u8; 6];
    s.read_at(Offset(10), &mut buf).expect("in range");
    assert_eq!(&buf, b"ab\0\0ef");
    assert!(matches!(
        s.write_at(Offset(4094), b"abc"),
        Err(StoreError::OutOfRange { .. })
    ));
    assert!(matches!(
        s.write_at(Offset(u64::MAX), b"a"),
        Err(StoreError::OutOfRange { .. })
    ));
    assert!(matches!(
        s.write_zeroes(Offset(4000), 100),
        Err(StoreError::OutOfRange { .. })
    ));
    // Vectored: pieces back to back (empty ones too), range checked as a whole.
    s.write_vectored_at(Offset(100), &[b"12", b"", b"345", b"6"])
        .expect("in range");
    let mut buf = [0u8; 6];
    s.read_at(Offset(100), &mut buf).expect("in range");
    assert_eq!(&buf, b"123456");
    let big = vec![9u8; 3000];
    let pieces: Vec<&[u8]> = (0..1500).map(|i| &big[i..i + 1]).collect();
    s.write_vectored_at(Offset(1000), &pieces)
        .expect("in range");
    let mut buf = vec![0u8; 1500];
    s.read_at(Offset(1000), &mut buf).expect("in range");
    assert_eq!(buf, vec![9u8; 1500]);
    assert!(matches!(
        s.write_vectored_at(Offset(4092), &[b"abc", b"def"]),
        Err(StoreError::OutOfRange { .. })
    ));
    s.flush().expect("flush");
}

#[test]
fn mem_store() {
    exercise(&MemStore::new(4096));
}

#[test]
fn file_store_creates_and_checks_size() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("u.img");
    let s = FileStore::open_or_create(&p, 4096).expect("create");
    exercise(&s);
    drop(s);
    assert!(
        FileStore::open_or_create(&p, 4096).is_ok(),
        "reopen same size"
    );
    match FileStore::open_or_create(&p, 8192) {
        Err(StoreError::SizeMismatch { found, want, .. }) => {
            assert_eq!((found, want), (4096, 8192))
        }
        other => panic!("expected a size mismatch, got {other:?}"),
    }
    assert_eq!(
        std::fs::metadata(&p).expect("meta").len(),
        4096,
        "untouched"
    );
}

#[test]
fn a_read_only_file_store_reads_and_never_writes() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("u.img");
    let bytes: Vec<u8> = (0..4096u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(&p, &bytes).expect("write");
    // No write permission at all: opening must not ask for it.
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o444)).expect("chmod");
    let s = FileStore::open_read_only(&p, 4096).expect("open read-only");
    assert!(s.is_read_only());
    let mut buf = [0u8; 100];
    s.read_at(Offset(1000), &mut buf).expect("read");
    assert_eq!(&buf[..], &bytes[1000..1100]);
    for r in [
        s.write_at(Offset(0), b"x"),
        s.write_zeroes(Offset(0), 512),
        s.apply(&crate::packet::Payload::Write {
            offset: Offset(8),
            data: bytes::Bytes::from_static(b"abc"),
        }),
    ] {
        assert!(matches!(r, Err(StoreError::ReadOnly { .. })), "{r:?}");
    }
    s.flush().expect("flush");
    assert_eq!(std::fs::read(&p).expect("read"), bytes, "unchanged");
    // Never created, never resized.
    assert!(matches!(
        FileStore::open_read_only(&dir.path().join("missing.img"), 4096),
        Err(StoreError::Io { .. })
    ));
    assert!(!dir.path().join("missing.img").exists());
    assert!(matches!(
        FileStore::open_read_only(&p, 8192),
        Err(StoreError::SizeMismatch { .. })
    ));
    assert_eq!(std::fs::metadata(&p).expect("meta").len(), 4096);
}

// ---- sparse units: allocated() and hole-punching write_zeroes ----

use std::os::unix::fs::MetadataExt;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;

/// Non-zero bytes that differ from place to place, as written at `offset`.
fn pattern(offset: u64, len: u64) -> Vec<u8> {
    (offset..offset + len)
        .map(|i| (i % 251 + 1) as u8)
        .collect()
}

fn total(extents: &[(Offset, u64)]) -> u64 {
    extents.iter().map(|&(_, l)| l).sum()
}

/// The shape `allocated()` promises: ordered, non-empty, neither overlapping nor
/// touching, inside the unit.
fn assert_well_formed(extents: &[(Offset, u64)], size: u64) {
    let mut prev_end = None;
    for &(o, l) in extents {
        assert!(l > 0, "empty extent in {extents:?}");
        let end = o.0.checked_add(l).expect("extent end overflows");
        assert!(end <= size, "{extents:?} goes beyond the size {size}");
        if let Some(p) = prev_end {
            assert!(o.0 > p, "overlapping or touching extents: {extents:?}");
        }
        prev_end = Some(end);
    }
}

/// Every written range lies inside one extent (extents do not touch, so a contiguous
/// range cannot be covered by two).
fn assert_covers(extents: &[(Offset, u64)], written: &[(u64, u64)]) {
    for &(a, len) in written {
        let b = a + len;
        assert!(
            extents.iter().any(|&(o, l)| o.0 <= a && b <= o.0 + l),
            "written [{a}, {b}) is not covered by {extents:?}"
        );
    }
}

/// Everything outside the extents reads as zeros.
fn assert_zeros_outside(s: &dyn BlockStore, extents: &[(Offset, u64)]) {
    let mut buf = vec![0u8; s.size() as usize];
    s.read_at(Offset(0), &mut buf).expect("read");
    let mut pos = 0;
    for &(o, l) in extents
        .iter()
        .chain(std::iter::once(&(Offset(s.size()), 0)))
    {
        if let Some(i) = buf[pos..o.0 as usize].iter().position(|&x| x != 0) {
            panic!("byte {} is not zero but outside {extents:?}", pos + i);
        }
        pos = (o.0 + l) as usize;
    }
}

/// Sum over the written ranges of the 64 KiB-aligned span each touches: the most a file
/// system with blocks of at most 64 KiB may report for them.
fn hull_bound(written: &[(u64, u64)]) -> u64 {
    let c = ZERO_CHUNK;
    written
        .iter()
        .map(|&(a, len)| (a + len).div_ceil(c) * c - a / c * c)
        .sum()
}

/// What the file system under `dir` does with holes, tried on a scratch file with the
/// system calls themselves (not through the code under test, so a broken `sparse` cannot
/// pass for an unsupporting file system).
struct Holes {
    /// `SEEK_DATA` skips holes (a fresh sparse file has no data).
    seek_data: bool,
    /// `fallocate(PUNCH_HOLE)` works.
    punch: bool,
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn probe(dir: &Path) -> Holes {
    use std::os::fd::AsRawFd;
    let p = dir.join("probe.img");
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&p)
        .expect("create probe");
    f.set_len(MIB).expect("set_len");
    // SAFETY: no pointers; `f` is open.
    let r = unsafe { libc::lseek(f.as_raw_fd(), 0, libc::SEEK_DATA) };
    let seek_data = r < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO);
    f.write_all_at(&pattern(0, MIB), 0).expect("write");
    f.sync_data().expect("sync");
    let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    // SAFETY: as above.
    let punch = unsafe { libc::fallocate(f.as_raw_fd(), mode, 0, MIB as libc::off_t) } == 0;
    eprintln!(
        "file system under {}: SEEK_DATA {}; punch hole {}",
        dir.display(),
        if seek_data {
            "skips holes"
        } else {
            "does not skip holes (whole-unit fallback)"
        },
        if punch {
            "supported"
        } else {
            "unsupported (zeros are written)"
        },
    );
    drop(f);
    std::fs::remove_file(&p).expect("remove probe");
    Holes { seek_data, punch }
}

#[cfg(not(any(target_os = "linux", target_os = "android")))]
fn probe(_: &Path) -> Holes {
    Holes {
        seek_data: false,
        punch: false,
    }
}

fn written_bytes(p: &Path) -> u64 {
    std::fs::metadata(p).expect("meta").blocks() * 512
}

#[test]
fn allocated_covers_what_was_written_and_little_else() {
    let dir = tempfile::tempdir().expect("tempdir");
    let holes = probe(dir.path());
    let p = dir.path().join("u.img");
    let size = 16 * MIB;
    let s = FileStore::open_or_create(&p, size).expect("create");
    let written = [
        (0, 4096),
        (MIB + 100, 5000),
        (8 * MIB, 200 * KIB),
        (12 * MIB - 7, 14),
        (size - 10, 10),
    ];
    for &(o, l) in &written {
        s.write_at(Offset(o), &pattern(o, l)).expect("write");
    }
    // Before and after writeback: delayed allocation must be reported too.
    for stage in ["before flush", "after flush"] {
        let extents = s.allocated().expect("allocated");
        eprintln!("{stage}: {extents:?}");
        assert_well_formed(&extents, size);
        assert_covers(&extents, &written);
        assert_zeros_outside(&s, &extents);
        if holes.seek_data {
            let t = total(&extents);
            let w: u64 = written.iter().map(|&(_, l)| l).sum();
            assert!(w <= t && t <= hull_bound(&written), "{t} for {w} written");
            assert!(
                !extents
                    .iter()
                    .any(|&(o, l)| o.0 < 8 * MIB && o.0 + l > 2 * MIB),
                "the hole [2 MiB, 8 MiB) is reported as data: {extents:?}"
            );
        } else {
            assert_eq!(
                extents,
                vec![(Offset(0), size)],
                "the fallback is the whole unit"
            );
        }
        s.flush().expect("flush");
    }
    // Clamped to the size asked for, even inside a data extent.
    if let Some(extents) = sparse::data_extents(&s.file, size - 5).expect("seek") {
        assert_well_formed(&extents, size - 5);
        let &(o, l) = extents.last().expect("data at the end");
        assert_eq!(o.0 + l, size - 5, "{extents:?}");
    }
}

#[test]
fn a_fully_sparse_file_has_no_extents_and_a_fully_written_one_has_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let holes = probe(dir.path());

    let size = 64 * MIB;
    let sparse = FileStore::open_or_create(&dir.path().join("sparse.img"), size).expect("create");
    let extents = sparse.allocated().expect("allocated");
    assert_well_formed(&extents, size);
    if holes.seek_data {
        assert_eq!(extents, Vec::new());
    } else {
        assert_eq!(extents, vec![(Offset(0), size)]);
    }

    // An odd size: the last block is partly beyond the end.
    let size = MIB + 123;
    let full = FileStore::open_or_create(&dir.path().join("full.img"), size).expect("create");
    full.write_at(Offset(0), &pattern(0, size)).expect("write");
    for _ in 0..2 {
        assert_eq!(
            full.allocated().expect("allocated"),
            vec![(Offset(0), size)]
        );
        full.flush().expect("flush");
    }

    let empty = FileStore::open_or_create(&dir.path().join("empty.img"), 0).expect("create");
    assert_eq!(empty.allocated().expect("allocated"), Vec::new());
}

#[test]
fn a_sparse_gibibyte_reports_about_what_was_written() {
    let dir = tempfile::tempdir().expect("tempdir");
    let holes = probe(dir.path());
    let p = dir.path().join("big.img");
    let size = 1 << 30;
    let s = FileStore::open_or_create(&p, size).expect("create");
    // 40 pieces of 256 KiB = 10 MiB, spread over the unit, most of them unaligned.
    let piece = 256 * KIB;
    let written: Vec<(u64, u64)> = (0..40u64)
        .map(|i| (i * (size / 40) + i * 12_345 % ZERO_CHUNK, piece))
        .collect();
    for &(o, l) in &written {
        s.write_at(Offset(o), &pattern(o, l)).expect("write");
    }
    s.flush().expect("flush");
    let extents = s.allocated().expect("allocated");
    let t = total(&extents);
    eprintln!(
        "1 GiB unit, 10 MiB written: {} extents, {t} bytes reported, {} bytes allocated",
        extents.len(),
        written_bytes(&p)
    );
    assert_well_formed(&extents, size);
    assert_covers(&extents, &written);
    assert!(t >= 10 * MIB, "{t}");
    if holes.seek_data {
        assert!(t <= 12 * MIB && t <= hull_bound(&written), "{t}");
        assert_eq!(extents.len(), written.len(), "the pieces are far apart");
        assert!(written_bytes(&p) <= 12 * MIB, "the file is not sparse");
    } else {
        assert_eq!(extents, vec![(Offset(0), size)]);
    }
}

#[test]
fn write_zeroes_punches_a_hole_that_reads_as_zeros() {
    let dir = tempfile::tempdir().expect("tempdir");
    let holes = probe(dir.path());
    let p = dir.path().join("u.img");
    let size = 4 * MIB;
    let s = FileStore::open_or_create(&p, size).expect("create");
    let mut want = pattern(0, size);
    s.write_at(Offset(0), &want).expect("write");
    s.flush().expect("flush");
    let before = written_bytes(&p);

    // One aligned range in the middle and one unaligned range within partial blocks.
    for (o, l) in [(MIB, 2 * MIB), (100, 10_000)] {
        s.write_zeroes(Offset(o), l).expect("zero");
        want[o as usize..(o + l) as usize].fill(0);
    }
    let mut got = vec![0u8; size as usize];
    s.read_at(Offset(0), &mut got).expect("read");
    assert!(
        got == want,
        "the zeroed ranges or their neighbours read wrong"
    );
    assert_eq!(std::fs::metadata(&p).expect("meta").len(), size);

    let extents = s.allocated().expect("allocated");
    assert_well_formed(&extents, size);
    assert_zeros_outside(&s, &extents);
    let after = written_bytes(&p);
    eprintln!("allocated {before} -> {after} bytes; extents {extents:?}");
    if holes.punch {
        assert!(
            after + 2 * MIB <= before,
            "{before} -> {after}: nothing freed"
        );
    } else {
        assert!(after >= before, "{before} -> {after}");
    }
    if holes.punch && holes.seek_data {
        assert!(total(&extents) <= size - 2 * MIB, "{extents:?}");
        assert!(
            !extents.iter().any(|&(o, l)| o.0 < 3 * MIB && o.0 + l > MIB),
            "the punched range is still reported: {extents:?}"
        );
    }

    // Zero bytes is a no-op, also at the very end.
    s.write_zeroes(Offset(size), 0).expect("empty range");
    s.flush().expect("flush");
    drop(s);
    assert!(std::fs::read(&p).expect("read") == want, "reopened");
}

#[test]
fn writing_zeros_allocates_where_punching_does_not() {
    // The fallback path, taken where the file system cannot punch: it must read as zeros
    // as well, and it allocates.
    let dir = tempfile::tempdir().expect("tempdir");
    let holes = probe(dir.path());
    let p = dir.path().join("u.img");
    let size = 2 * MIB;
    let s = FileStore::open_or_create(&p, size).expect("create");
    s.write_at(Offset(0), &pattern(0, 4096)).expect("write");
    fill_zeroes(&s, Offset(100), MIB).expect("fill");
    let mut want = pattern(0, 4096);
    want.resize(size as usize, 0);
    want[100..4096].fill(0);
    assert!(std::fs::read(&p).expect("read") == want);
    assert_eq!(std::fs::metadata(&p).expect("meta").len(), size);
    let extents = s.allocated().expect("allocated");
    assert_well_formed(&extents, size);
    assert_covers(&extents, &[(0, 100 + MIB)]);
    if holes.seek_data {
        assert!(total(&extents) < size, "{extents:?}");
    }
}

#[test]
fn write_zeroes_out_of_range_or_read_only_fails_and_changes_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("u.img");
    let size = MIB;
    let s = FileStore::open_or_create(&p, size).expect("create");
    s.write_at(Offset(0), &pattern(0, size)).expect("write");
    s.flush().expect("flush");
    let bytes = std::fs::read(&p).expect("read");
    let blocks = written_bytes(&p);

    for (o, l) in [
        (size - 10, 20),
        (size, 1),
        (0, size + 1),
        (u64::MAX, 1),
        (1, u64::MAX),
    ] {
        let r = s.write_zeroes(Offset(o), l);
        assert!(
            matches!(r, Err(StoreError::OutOfRange { .. })),
            "{o}+{l}: {r:?}"
        );
    }
    s.flush().expect("flush");
    drop(s);

    let ro = FileStore::open_read_only(&p, size).expect("open read-only");
    for (o, l) in [(0, size), (4096, 4096), (size, 100)] {
        let r = ro.write_zeroes(Offset(o), l);
        assert!(
            matches!(r, Err(StoreError::ReadOnly { .. })),
            "{o}+{l}: {r:?}"
        );
    }
    assert_eq!(ro.allocated().expect("allocated"), vec![(Offset(0), size)]);
    drop(ro);

    assert!(std::fs::read(&p).expect("read") == bytes, "bytes changed");
    assert_eq!(written_bytes(&p), blocks, "allocation changed");
    assert_eq!(std::fs::metadata(&p).expect("meta").len(), size);
}

#[test]
fn mem_store_reports_runs_of_non_zero_chunks() {
    let c = ZERO_CHUNK;
    let size = 10 * c + 100;
    let m = MemStore::new(size);
    let check = |want: &[(Offset, u64)]| {
        let extents = m.allocated().expect("allocated");
        assert_well_formed(&extents, size);
        assert_zeros_outside(&m, &extents);
        assert_eq!(extents, want);
    };
    check(&[]);
    m.write_at(Offset(c + 5), b"x").expect("write");
    check(&[(Offset(c), c)]);
    // The next chunk: merged with it.
    m.write_at(Offset(2 * c), b"y").expect("write");
    check(&[(Offset(c), 2 * c)]);
    // The last, short chunk.
    m.write_at(Offset(size - 1), b"z").expect("write");
    check(&[(Offset(c), 2 * c), (Offset(10 * c), 100)]);
    m.write_zeroes(Offset(c), c).expect("zero");
    check(&[(Offset(2 * c), c), (Offset(10 * c), 100)]);
}

/// A store with only the required methods: the trait's defaults.
struct Dense(MemStore);

impl BlockStore for Dense {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn read_at(&self, offset: Offset, buf: &mut [u8]) -> Result<(), StoreError> {
        self.0.read_at(offset, buf)
    }
    fn write_at(&self, offset: Offset, data: &[u8]) -> Result<(), StoreError> {
        self.0.write_at(offset, data)
    }
    fn flush(&self) -> Result<(), StoreError> {
        Ok(())
    }
}

#[test]
fn the_defaults_are_the_whole_unit_and_written_zeros() {
    exercise(&Dense(MemStore::new(4096)));
    let size = 3 * ZERO_CHUNK + 7;
    let d = Dense(MemStore::new(size));
    assert_eq!(d.allocated().expect("allocated"), vec![(Offset(0), size)]);
    assert_eq!(
        Dense(MemStore::new(0)).allocated().expect("allocated"),
        vec![]
    );
    d.write_at(Offset(0), &pattern(0, size)).expect("write");
    d.write_zeroes(Offset(5), size - 10).expect("zero");
    let mut want = pattern(0, size);
    want[5..(size - 5) as usize].fill(0);
    assert!(d.0.snapshot() == want);
}

/// `reserve` on a sparse unit allocates whole 1 MiB granules, once each: a write into a
/// granule reserved before costs no allocation (it was one `fallocate` per write), a
/// punched hole makes its granules be allocated again, and reads never change.
#[test]
fn reserve_allocates_each_granule_once_and_again_after_a_hole() {
    let dir = tempfile::tempdir().expect("tempdir");
    let holes = probe(dir.path());
    let p = dir.path().join("u.img");
    let size = 4 * MIB;
    let s = FileStore::open_or_create(&p, size).expect("create");
    if !holes.punch || written_bytes(&p) > 0 {
        eprintln!("no hole support here: nothing to check");
        return;
    }
    s.reserve(Offset(MIB + 4096), 4096).expect("reserve");
    let one = written_bytes(&p);
    assert!(
        (MIB..2 * MIB).contains(&one),
        "one granule allocated: {one} bytes"
    );
    // Within the same granule: known allocated, nothing new.
    s.reserve(Offset(MIB), MIB).expect("reserve");
    assert_eq!(written_bytes(&p), one, "the granule was allocated again");
    assert!(s.reserved_granules(MIB, MIB));
    // Across into the next granule: both granules allocated.
    s.reserve(Offset(2 * MIB - 4096), 8192).expect("reserve");
    assert!(s.reserved_granules(MIB, 2 * MIB));
    assert!(written_bytes(&p) >= 2 * MIB);
    // A hole punched through the store forgets the granules it touched.
    s.write_zeroes(Offset(MIB + 8192), 4096).expect("zero");
    assert!(!s.reserved_granules(MIB, MIB));
    assert!(s.reserved_granules(2 * MIB, MIB));
    s.reserve(Offset(MIB + 8192), 4096).expect("reserve");
    assert!(s.reserved_granules(MIB, 2 * MIB));
    let mut got = vec![1u8; size as usize];
    s.read_at(Offset(0), &mut got).expect("read");
    assert!(
        got.iter().all(|b| *b == 0),
        "reserving changed what the unit reads"
    );
}
