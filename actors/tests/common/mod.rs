//! Set-up shared by the actor tests (each test file is its own crate and declares
//! `mod common;`; not every file uses every item).
#![allow(dead_code)]

use std::path::Path;
use tidemark::{PairId, SystemId};
use tidemark_actors::{EngineBuilder, PairSpec, StoreSpec};

/// A simulated engine (seeded, paused-clock friendly) with one pair `name` of `size`
/// bytes from primary "a" to secondary "b": the builder, to be configured further and
/// started, with the primary's, the secondary's and the pair's ids.
pub fn one_pair(
    seed: u64,
    name: &str,
    size: u64,
    local: StoreSpec,
    remote: StoreSpec,
) -> (EngineBuilder, SystemId, SystemId, PairId) {
    let mut b = EngineBuilder::new();
    b.simulated().seed(seed);
    let a = b.primary("a");
    let r = b.secondary("b");
    let pair = b.pair(PairSpec {
        name: name.into(),
        local: a,
        remote: r,
        size,
        local_store: local,
        remote_store: remote,
    });
    (b, a, r, pair)
}

/// [`one_pair`] "u" of file units `dir/local.img` and `dir/remote.img`, with journals of
/// `journal` bytes each in `dir` ([`journals`]).
pub fn file_pair(
    seed: u64,
    dir: &Path,
    size: u64,
    journal: u64,
) -> (EngineBuilder, SystemId, SystemId, PairId) {
    let (mut b, a, r, pair) = one_pair(
        seed,
        "u",
        size,
        StoreSpec::File(dir.join("local.img")),
        StoreSpec::File(dir.join("remote.img")),
    );
    journals(&mut b, a, r, dir, journal);
    (b, a, r, pair)
}

/// Journals of `bytes` each for both systems, in `dir/ja` (primary) and `dir/jb`.
pub fn journals(b: &mut EngineBuilder, a: SystemId, r: SystemId, dir: &Path, bytes: u64) {
    b.journal(a, dir.join("ja"), bytes)
        .journal(r, dir.join("jb"), bytes);
}
