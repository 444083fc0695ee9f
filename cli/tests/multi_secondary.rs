//! One primary process replicating to two secondary *processes* (claims 15–17, the
//! hazard "several remote systems" of docs/design.md): export "log" goes to `site-b` (which runs the
//! orderer), export "data" to `site-d`. `site-d`'s remote unit reports its run head to
//! the orderer over the authenticated UDP link, and a limit is applied only once it is
//! durable on both.
//!
//! Dependent NBD writes alternate between the exports while both secondaries are
//! SIGKILLed together (a site disaster) once both are seen receiving, plus a seeded
//! delay, and restarted; after every kill, `promote` without `--system` on a copy of
//! both must bring both remote units to one cut of the write sequence (I1), byte for
//! byte. At the end remote == local.
//!
//! The seed is printed; `TIDEMARK_SEED=<n>` replays one.

mod common;
use common::dependent::*;
use common::*;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

fn seed() -> u64 {
    seed_or(20261130)
}

/// site-a (primary, NBD at `nbd`) sends "log" to site-b (the orderer) and "data" to
/// site-d.
fn config(nbd: u16) -> ConfigText {
    ConfigText::new()
        .orderer("site-b")
        .system(SystemSpec::primary("site-a", free_port()).nbd(nbd))
        .system(SystemSpec::secondary("site-b", free_port()))
        .system(SystemSpec::secondary("site-d", free_port()))
        .pair(PairSpec::new("log", 4 << 20, "site-a", "site-b"))
        .pair(PairSpec::new("data", 8 << 20, "site-a", "site-d"))
}

/// Copies both secondaries' state (both stopped) under `tag` and promotes every remote
/// system of the group together; returns `applied_seq` per pair and the unit images.
fn promote_both(dir: &Path, tag: &str) -> Result<(Vec<u64>, Vec<PathBuf>), String> {
    let (copy, v) = promote_systems_copy(dir, &["site-b", "site-d"], tag)?;
    let mut applied = Vec::new();
    for (i, name) in ["log", "data"].iter().enumerate() {
        let p = &v["pairs"][i];
        if p["name"] != *name {
            return Err(format!("promote's pair {i} is not {name}: {v}"));
        }
        applied.push(p["applied_seq"].as_u64().ok_or(format!("{v}"))?);
    }
    Ok((
        applied,
        vec![
            copy.join("run/site-b/log.img"),
            copy.join("run/site-d/data.img"),
        ],
    ))
}

fn spawn(dir: &Path, args: &[&str]) -> Child {
    Command::new(bin())
        .args(args)
        .arg("--config")
        .arg(dir.join("tidemark.toml"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn tidemark")
}

/// Processes still held are killed when the test ends (a failed assertion leaves none).
struct Procs(Vec<Option<Child>>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in self.0.iter_mut().filter_map(Option::take) {
            kill9(c);
        }
    }
}

#[test]
fn dependent_writes_to_two_secondary_processes_promote_together_to_cuts() {
    let seed = seed();
    eprintln!("multi-secondary test seed {seed} (TIDEMARK_SEED={seed} to replay)");
    let nbd = free_tcp_port();
    let site = Site::with_config(config(nbd));
    let dir = site.dir.path();
    let secondary = |name: &str| spawn(dir, &["secondary", "--system", name]);
    // 0: primary, 1: site-b, 2: site-d
    let mut procs = Procs(vec![
        None,
        Some(secondary("site-b")),
        Some(secondary("site-d")),
    ]);
    let mut primary = spawn(dir, &["primary"]);
    wait_tcp(nbd, &mut primary, PATIENCE);
    procs.0[0] = Some(primary);

    let remotes = ["site-b", "site-d"].map(|s| dir.join(format!("run/{s}/journal")));
    let run = writes_through_crashes(seed, [nbd, nbd], (600, 20_000), 3, &remotes, |k| {
        for i in [1, 2] {
            kill9(procs.0[i].take().expect("running"));
        }
        let result = promote_both(dir, &format!("copy{k}"));
        procs.0[1] = Some(secondary("site-b"));
        procs.0[2] = Some(secondary("site-d"));
        result
    });
    let want = counts(&run.plan[..run.done]);
    eprintln!("{want:?} writes per export");
    // Everything reaches both secondaries: wait for each one's applied_seq.
    let status_path = |s: &str| dir.join(format!("run/{s}/journal/status.json"));
    let deadline = std::time::Instant::now() + PATIENCE;
    for (i, s) in [(0usize, "site-b"), (1, "site-d")] {
        loop {
            let applied = std::fs::read_to_string(status_path(s))
                .ok()
                .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
                .and_then(|v| v["stats"]["pairs"][i]["applied_seq"].as_u64());
            if applied == Some(want[i]) {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "seed {seed}: {s} applied {applied:?} of {}",
                want[i]
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    for i in 0..3 {
        let out = stop(procs.0[i].take().expect("running"));
        assert!(
            out.status.success(),
            "process {i} did not stop cleanly: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    for (name, remote) in [("log", "site-b"), ("data", "site-d")] {
        let l = std::fs::read(dir.join(format!("run/site-a/{name}.img"))).expect("local");
        let r = std::fs::read(dir.join(format!("run/{remote}/{name}.img"))).expect("remote");
        assert!(
            l == r,
            "seed {seed}: {name}: the remote unit differs from the local unit"
        );
    }
}
