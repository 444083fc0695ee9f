//! The fuzz targets on stable: every committed corpus input (`fuzz/corpus/TARGET/`) and
//! every saved finding (`fuzz/regressions/TARGET/`) replayed through the same target
//! functions the cargo-fuzz crate calls (`tidemark::fuzzing`), and the seeds.
//!
//! `cargo test -p tidemark --test fuzz_corpus -- --ignored write_seeds` writes the seeds
//! into the corpus directories (`scripts/fuzz.sh seed` runs it).

use std::path::{Path, PathBuf};
use tidemark::fuzzing::{self, Target};

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

/// The files of `dir` (none if it does not exist), sorted.
fn files(dir: &Path) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut v: Vec<PathBuf> = rd
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    v.sort();
    v
}

/// Runs `input` through `target`, naming `what` if it fails.
fn run(target: Target, input: &[u8], what: &str) {
    if std::panic::catch_unwind(|| target(input)).is_err() {
        panic!("{what} fails (replay it with: cargo fuzz run TARGET {what})");
    }
}

fn target(name: &str) -> Target {
    fuzzing::TARGETS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, t)| *t)
        .unwrap_or_else(|| panic!("no fuzz target {name}"))
}

/// Replays the corpus and the saved findings of `name`, and its seeds; the corpus must
/// not be empty.
fn replay(name: &str) {
    let t = target(name);
    let corpus = files(&fuzz_dir().join("corpus").join(name));
    assert!(
        !corpus.is_empty(),
        "no corpus for {name} in fuzz/corpus/{name}"
    );
    let regressions = files(&fuzz_dir().join("regressions").join(name));
    for f in corpus.iter().chain(&regressions) {
        let bytes = std::fs::read(f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        run(t, &bytes, &f.display().to_string());
    }
    for (i, s) in fuzzing::seeds(name).iter().enumerate() {
        run(t, s, &format!("seed {i} of {name}"));
    }
}

#[test]
fn wire() {
    replay("wire");
}

#[test]
fn seal() {
    replay("seal");
}

#[test]
fn link() {
    replay("link");
}

#[test]
fn nbd() {
    replay("nbd");
}

#[test]
fn journal_plan() {
    replay("journal_plan");
}

#[test]
fn journal_open() {
    replay("journal_open");
}

#[test]
fn every_target_is_replayed_here() {
    let here = [
        "wire",
        "seal",
        "link",
        "nbd",
        "journal_plan",
        "journal_open",
    ];
    let names: Vec<&str> = fuzzing::TARGETS.iter().map(|(n, _)| *n).collect();
    assert_eq!(names, here);
}

/// Writes every target's seeds into its corpus directory as `seed-N`.
#[test]
#[ignore]
fn write_seeds() {
    for (name, _) in fuzzing::TARGETS {
        let dir = fuzz_dir().join("corpus").join(name);
        std::fs::create_dir_all(&dir).expect("create the corpus directory");
        for (i, s) in fuzzing::seeds(name).iter().enumerate() {
            std::fs::write(dir.join(format!("seed-{i}")), s).expect("write a seed");
        }
    }
}
