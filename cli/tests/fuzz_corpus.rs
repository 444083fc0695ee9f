//! The config fuzz target on stable: the committed corpus (`fuzz/corpus/config/`), the
//! saved findings (`fuzz/regressions/config/`) and the seeds, through the function the
//! cargo-fuzz crate calls (`tidemark_cli::fuzzing`).
//!
//! `cargo test -p tidemark-cli --test fuzz_corpus -- --ignored write_seeds` writes the
//! seeds into the corpus directory (`scripts/fuzz.sh seed` runs it).

use std::path::{Path, PathBuf};
use tidemark_cli::fuzzing;

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

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

#[test]
fn config() {
    for (name, target) in fuzzing::TARGETS {
        let corpus = files(&fuzz_dir().join("corpus").join(name));
        assert!(!corpus.is_empty(), "no corpus for {name}");
        let regressions = files(&fuzz_dir().join("regressions").join(name));
        for f in corpus.iter().chain(&regressions) {
            let bytes = std::fs::read(f).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
            if std::panic::catch_unwind(|| target(&bytes)).is_err() {
                panic!("{} fails", f.display());
            }
        }
        for s in fuzzing::seeds(name) {
            target(&s);
        }
    }
}

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
