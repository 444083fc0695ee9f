//! The config files the process tests use: the tests' builder ([`ConfigText`]) writes
//! what its fields say: the text parses to exactly those systems, pairs and settings.

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::time::Duration;
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
