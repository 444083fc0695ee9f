//! The config files the process tests and the quick start use:
//!
//! - the tests' builder ([`ConfigText`]) writes what its fields say: the text parses to
//!   exactly those systems, pairs and settings;
//! - `examples/tidemark.toml` (the README's quick start) runs as written, with only its
//!   addresses moved to free ports: a secondary and a primary start from it, seeded
//!   writes through the primary's NBD exports reach the secondary, both stop cleanly,
//!   `promote` gives every write, and `export` serves the copies at the secondary's
//!   `nbd_listen`.
//!
//! The seed is printed; `TIDEMARK_SEED=<n>` replays one.

mod common;
use common::dependent::{Client, PATIENCE};
use common::*;
use rand::{Rng, SeedableRng};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tidemark::nbd::consts::*;
use tidemark_cli::config::Config;

#[test]
fn the_test_config_builder_writes_what_its_fields_say() {
    let mut spec = Site::two_sites(true)
        .max_clock_skew_ms(33)
        .system(SystemSpec::primary("site-c", 7300).nbd(10811))
        .pair(PairSpec::new("odd", 4096 + 512, "site-c", "site-b"));
    spec.system_mut("site-b").journal_size = None;
    spec.system_mut("site-b").nbd_port = Some(10812);
    let c = Config::parse(&spec.render(), Path::new("/t"), Path::new("/t/x.toml"))
        .unwrap_or_else(|e| panic!("{e}:\n{}", spec.render()));
    assert_eq!(c.key_file, PathBuf::from("/t/cluster.key"));
    assert_eq!(c.systems[c.orderer].name, "site-b", "the first secondary");
    assert_eq!(c.heartbeat, Duration::from_millis(10));
    assert_eq!(c.peer_timeout, Duration::from_millis(1000));
    assert_eq!(c.max_clock_skew, Duration::from_millis(33));
    assert_eq!(c.systems.len(), spec.systems.len());
    for (got, want) in c.systems.iter().zip(&spec.systems) {
        assert_eq!(got.name, want.name);
        assert_eq!(got.primary, want.role == config_text::Role::Primary);
        assert_eq!(got.listen.port(), want.port);
        assert_eq!(got.advertise.port(), want.reached_at());
        assert!(got.listen.ip().is_loopback() && got.advertise.ip().is_loopback());
        assert_eq!(
            got.nbd_listen,
            want.nbd_port.map(|p| format!("127.0.0.1:{p}"))
        );
        assert_eq!(
            got.journal_dir,
            Path::new("/t").join(format!("run/{}/journal", want.name))
        );
        assert_eq!(got.journal_size, want.journal_size.unwrap_or(256 << 20));
    }
    assert_eq!(c.systems[0].journal_size, 64 << 20, "the tests' default");
    assert_ne!(c.systems[0].listen, c.systems[0].advertise, "proxied");
    let names: Vec<&str> = c.systems.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(c.pairs.len(), spec.pairs.len());
    for (got, want) in c.pairs.iter().zip(&spec.pairs) {
        assert_eq!(got.name, want.name);
        assert_eq!(got.size, want.size);
        assert_eq!(names[got.local], want.local);
        assert_eq!(names[got.remote], want.remote);
        assert_eq!(
            got.local_path,
            Path::new("/t").join(format!("run/{}/{}.img", want.local, want.name))
        );
        assert_eq!(got.remote_path, Path::new("/t").join(&want.remote_path));
    }
    assert_eq!(c.pairs[2].size, 4608, "a size that is no whole MiB");

    // A key left out is left out.
    spec.key_file = None;
    let err = Config::parse(&spec.render(), Path::new("/t"), Path::new("/t/x.toml"));
    assert!(
        matches!(&err, Err(e) if e.to_string().contains("key_file")),
        "{err:?}"
    );
}

/// The shipped example.
fn example() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/tidemark.toml")
}

/// Kills whatever is still held when the test ends.
#[derive(Default)]
struct Procs(Vec<(&'static str, Child)>);

impl Procs {
    fn take(&mut self, name: &str) -> Child {
        let i = self
            .0
            .iter()
            .position(|(n, _)| *n == name)
            .unwrap_or_else(|| panic!("{name} is not running"));
        self.0.remove(i).1
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        for (_, c) in self.0.drain(..) {
            kill9(c);
        }
    }
}

/// `tidemark ARGS --config CONFIG` with its output in `dir/NAME.log` (nothing reads a
/// daemon's pipes while it runs).
fn daemon(dir: &Path, name: &str, config: &Path, args: &[&str]) -> Child {
    let log = std::fs::File::create(dir.join(format!("{name}.log"))).expect("log");
    let err = log.try_clone().expect("log");
    Command::new(bin())
        .args(args)
        .arg("--config")
        .arg(config)
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(err))
        .spawn()
        .expect("spawn tidemark")
}

fn logs(dir: &Path) -> String {
    ["secondary", "primary"]
        .iter()
        .map(|n| {
            let text = std::fs::read_to_string(dir.join(format!("{n}.log"))).unwrap_or_default();
            format!("\n--- {n}.log\n{text}")
        })
        .collect()
}

#[test]
fn the_example_config_runs_the_quick_start() {
    let seed = seed_or(20261201);
    eprintln!("quick start test seed {seed} (TIDEMARK_SEED={seed} to replay)");
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();

    // The example as shipped, with each address on a free port of 127.0.0.1 (the same
    // address written twice, as listen and advertise, gets the same port).
    let mut text = std::fs::read_to_string(example()).expect("examples/tidemark.toml");
    let shipped = Config::parse(&text, dir, &example()).expect("the example is valid");
    let mut moved = std::collections::BTreeMap::new();
    for s in &shipped.systems {
        for (addr, port) in [
            (Some(s.listen.to_string()), free_port()),
            (Some(s.advertise.to_string()), free_port()),
            (s.nbd_listen.clone(), free_tcp_port()),
        ] {
            let Some(addr) = addr else { continue };
            if moved.contains_key(&addr) {
                continue;
            }
            let quoted = format!("\"{addr}\"");
            assert!(text.contains(&quoted), "{addr} is written as {quoted}");
            let new = format!("127.0.0.1:{port}");
            text = text.replace(&quoted, &format!("\"{new}\""));
            moved.insert(addr, new);
        }
    }
    let config = dir.join("tidemark.toml");
    std::fs::write(&config, &text).expect("config");
    let cfg = Config::load(&config).expect("the moved example is valid");
    for (a, b) in shipped.systems.iter().zip(&cfg.systems) {
        assert_ne!(a.listen, b.listen, "{}: listen was moved", a.name);
    }
    let primary = cfg.select(None, true).expect("primaries");
    let secondary = cfg.select(None, false).expect("secondaries");
    assert_eq!((primary.len(), secondary.len()), (1, 1), "one of each");
    let (pri, sec) = (&cfg.systems[primary[0]], &cfg.systems[secondary[0]]);
    let port_of = |nbd: &Option<String>| -> u16 {
        let a: std::net::SocketAddr = nbd
            .as_deref()
            .expect("an nbd_listen")
            .parse()
            .expect("a TCP address");
        a.port()
    };
    let out = run(&["keygen", "--out", cfg.key_file.to_str().expect("utf-8")]);
    assert!(out.status.success(), "keygen: {out:?}");

    // The quick start: secondary, primary, writes through NBD.
    let mut procs = Procs::default();
    procs.0.push((
        "secondary",
        daemon(dir, "secondary", &config, &["secondary"]),
    ));
    let mut p = daemon(dir, "primary", &config, &["primary"]);
    wait_tcp(port_of(&pri.nbd_listen), &mut p, PATIENCE);
    procs.0.push(("primary", p));

    let mut rng = rand_pcg::Pcg64::seed_from_u64(seed);
    let mut want: Vec<Vec<u8>> = Vec::new();
    let mut writes = Vec::new();
    for pair in &cfg.pairs {
        let mut image = vec![0u8; pair.size as usize];
        let mut c = Client::connect_sized(port_of(&pri.nbd_listen), &pair.name, pair.size);
        let n = 40;
        for i in 0..n {
            let len = rng.random_range(1..=64u32 << 10);
            let offset = rng.random_range(0..=pair.size - u64::from(len));
            let mut data = vec![0u8; len as usize];
            rng.fill(&mut data[..]);
            let flags = if i % 4 == 0 { CMD_FLAG_FUA } else { 0 };
            c.request(flags, CMD_WRITE, offset, len, &data);
            c.reply(&format!("seed {seed}: {} write {i}", pair.name));
            image[offset as usize..][..len as usize].copy_from_slice(&data);
        }
        c.disconnect();
        want.push(image);
        writes.push(n);
    }

    // The secondary applies every write (its status says so), then both stop cleanly.
    let applied = |s: &serde_json::Value| -> Vec<u64> {
        (0..cfg.pairs.len())
            .map(|i| s["stats"]["pairs"][i]["applied_seq"].as_u64().unwrap_or(0))
            .collect()
    };
    wait_until(PATIENCE, || {
        let st = tidemark_cli::daemon::read_status(&sec.journal_dir);
        let got = st.as_ref().map(applied).unwrap_or_default();
        if got == writes {
            Ok(())
        } else {
            Err(format!("applied {got:?} of {writes:?}"))
        }
    })
    .unwrap_or_else(|e| panic!("seed {seed}: {e}{}", logs(dir)));
    for name in ["primary", "secondary"] {
        let out = stop(procs.take(name));
        assert!(
            out.status.success(),
            "{name} did not stop cleanly{}",
            logs(dir)
        );
    }
    for (pair, image) in cfg.pairs.iter().zip(&want) {
        for unit in [&pair.local_path, &pair.remote_path] {
            let got = std::fs::read(unit).expect("unit");
            assert!(
                got == *image,
                "seed {seed}: {} does not hold the writes",
                unit.display()
            );
        }
    }

    // promote, then export at the secondary's nbd_listen.
    let out = run(&[
        "promote",
        "--config",
        config.to_str().expect("utf-8"),
        "--system",
        &sec.name,
    ]);
    assert!(out.status.success(), "promote: {out:?}");
    let promoted: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(promoted["consistent"], true, "{promoted}");
    for (i, n) in writes.iter().enumerate() {
        assert_eq!(promoted["pairs"][i]["applied_seq"], *n, "{promoted}");
    }
    let mut export = Command::new(bin())
        .args(["export", "--config", config.to_str().expect("utf-8")])
        .args(["--system", &sec.name])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn export");
    // It prints one line once it listens: reading it is the synchronisation.
    let mut line = String::new();
    let n = BufReader::new(export.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("read");
    if n == 0 {
        let out = export.wait_with_output().expect("wait");
        panic!(
            "export exited ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    procs.0.push(("export", export));
    let report: serde_json::Value =
        serde_json::from_str(line.trim()).unwrap_or_else(|e| panic!("{e}: {line:?}"));
    assert_eq!(
        report["listen"],
        sec.nbd_listen.clone().expect("nbd_listen")
    );
    for (i, (pair, image)) in cfg.pairs.iter().zip(&want).enumerate() {
        assert_eq!(report["exports"][i]["name"], pair.name, "{report}");
        assert_eq!(report["exports"][i]["applied_seq"], writes[i], "{report}");
        let mut c = Client::connect_sized(port_of(&sec.nbd_listen), &pair.name, pair.size);
        // The first 64 KiB that a write touched, read back from the copy.
        let at = image.iter().position(|&b| b != 0).unwrap_or(0) as u64;
        let len = (64u64 << 10).min(pair.size - at) as u32;
        c.request(0, CMD_READ, at, len, &[]);
        c.reply(&format!("read {} at {at}", pair.name));
        let got = c.read(len as usize);
        assert!(
            got[..] == image[at as usize..][..len as usize],
            "seed {seed}: export {} at {at} differs",
            pair.name
        );
        c.disconnect();
    }
    let out = stop(procs.take("export"));
    assert!(out.status.success(), "export: {out:?}");
}
