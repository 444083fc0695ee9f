//! Fuzz targets: one function per target, taking the fuzzer's bytes, checking the
//! properties of the code under test with assertions (a failed one is a finding, as a
//! panic in the code under test is).
//!
//! The cargo-fuzz crate (`fuzz/`) calls these, and a normal test (`tests/fuzz_corpus.rs`)
//! replays the committed corpora through them on stable, so both run the same
//! checks. [`seeds`] makes each target's seed inputs from the code itself. Not an API:
//! hidden from the documentation, and free to change with the targets. See
//! `docs/testing.md` (Fuzzing).

pub mod input;
mod link;
mod nbd;
mod seal;
mod wire;

/// A fuzz target: takes any bytes.
pub type Target = fn(&[u8]);

/// Every target of the core, by name (the name of its cargo-fuzz target and corpus
/// directory).
pub const TARGETS: &[(&str, Target)] = &[
    ("wire", wire::wire),
    ("seal", seal::seal),
    ("link", link::link),
    ("nbd", nbd::nbd),
    ("journal_plan", journal_plan),
    ("journal_open", journal_open),
];

/// Frame decoding: see `src/fuzzing/wire.rs`.
pub fn wire(data: &[u8]) {
    wire::wire(data)
}

/// Datagram opening against a model of the replay rules: see `src/fuzzing/seal.rs`.
pub fn seal(data: &[u8]) {
    seal::seal(data)
}

/// The link's receive side: see `src/fuzzing/link.rs`.
pub fn link(data: &[u8]) {
    link::link(data)
}

/// The NBD connection: see `src/fuzzing/nbd.rs`.
pub fn nbd(data: &[u8]) {
    nbd::nbd(data)
}

/// Journal recovery planned in memory: see `src/journal/fuzz.rs`.
pub fn journal_plan(data: &[u8]) {
    crate::journal::fuzz::plan(data)
}

/// Journal recovery on real files (a scratch directory on tmpfs if there is one): see
/// `src/journal/fuzz.rs`.
pub fn journal_open(data: &[u8]) {
    crate::journal::fuzz::open(data)
}

/// The seed inputs of target `name` (none for an unknown name).
pub fn seeds(name: &str) -> Vec<Vec<u8>> {
    match name {
        "wire" => wire::seeds(),
        "seal" => seal::seeds(),
        "link" => link::seeds(),
        "nbd" => nbd::seeds(),
        "journal_plan" | "journal_open" => {
            let mut v = crate::journal::fuzz::seeds();
            // The same segments with every checksum fixed up after mutation.
            let fixed: Vec<Vec<u8>> = v
                .iter()
                .map(|s| {
                    let mut s = s.clone();
                    s[0] |= 1;
                    s
                })
                .collect();
            v.extend(fixed);
            v
        }
        _ => Vec::new(),
    }
}
