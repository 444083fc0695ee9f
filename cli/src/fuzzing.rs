//! The config's fuzz target (see `tidemark::fuzzing` for the core's, and
//! `docs/testing.md`, Fuzzing). Not an API.

use crate::config::{reversed_text, Config};
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

/// Every target of this crate, by name (its cargo-fuzz target and corpus directory).
pub const TARGETS: &[(&str, tidemark::fuzzing::Target)] = &[("config", config)];

/// Addresses as IP literals only: the target never looks a host name up.
fn literal(s: &str) -> std::io::Result<Option<SocketAddr>> {
    s.parse::<SocketAddr>()
        .map(Some)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))
}

fn parse(text: &str) -> Result<Config, tidemark_actors::error::EngineError> {
    Config::parse_with(text, Path::new("/fuzz"), Path::new("/fuzz/t.toml"), literal)
}

/// Any text parses to a config or to an error, never a panic. A config that parses
/// holds what loading promises (`Config::parse`'s checks); and where `tidemark
/// failover` could reverse it (one primary, one secondary), the reversed text parses
/// to the same systems with the roles swapped and the same pairs with their ends
/// swapped, and reversing it back gives the original systems and pairs.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(c) = parse(text) else {
        return;
    };
    check(&c);
    let [a, b] = &c.systems[..] else {
        return;
    };
    if a.primary == b.primary {
        return;
    }
    let (primary, secondary) = if a.primary { (a, b) } else { (b, a) };
    let path = Path::new("/fuzz/t.toml");
    let rev = reversed_text(text, path, &secondary.name)
        .unwrap_or_else(|e| panic!("a valid config does not reverse: {e}"));
    let r = parse(&rev).unwrap_or_else(|e| panic!("the reversed config is invalid: {e}\n{rev}"));
    check(&r);
    assert_eq!(r.systems.len(), 2);
    for (x, y) in c.systems.iter().zip(&r.systems) {
        assert_eq!(x.name, y.name);
        assert_eq!(x.primary, !y.primary, "roles not swapped");
        assert_eq!(
            (x.listen, x.advertise, &x.journal_dir, x.journal_size),
            (y.listen, y.advertise, &y.journal_dir, y.journal_size)
        );
        assert_eq!(
            (&x.nbd_listen, x.metrics_listen),
            (&y.nbd_listen, y.metrics_listen)
        );
    }
    assert_eq!(r.systems[r.orderer].name, primary.name, "the orderer moves");
    assert_eq!(c.pairs.len(), r.pairs.len());
    for (x, y) in c.pairs.iter().zip(&r.pairs) {
        assert_eq!(
            (&x.name, x.size, x.initial_sync),
            (&y.name, y.size, y.initial_sync)
        );
        assert_eq!((x.local, &x.local_path), (y.remote, &y.remote_path));
        assert_eq!((x.remote, &x.remote_path), (y.local, &y.local_path));
    }
    assert_eq!(
        (c.heartbeat, c.peer_timeout, c.mtu, c.rate, c.window),
        (r.heartbeat, r.peer_timeout, r.mtu, r.rate, r.window)
    );
    assert_eq!(
        (
            c.max_clock_skew,
            c.region,
            c.rpo_target,
            c.compress,
            &c.key_file
        ),
        (
            r.max_clock_skew,
            r.region,
            r.rpo_target,
            r.compress,
            &r.key_file
        )
    );
    let back = reversed_text(&rev, path, &primary.name)
        .unwrap_or_else(|e| panic!("the reversed config does not reverse back: {e}"));
    let back = parse(&back).unwrap_or_else(|e| panic!("reversed back, invalid: {e}"));
    assert_eq!(back.systems, c.systems, "reversed twice, other systems");
    assert_eq!(back.pairs, c.pairs, "reversed twice, other pairs");
}

/// What a parsed config promises.
fn check(c: &Config) {
    let n = c.systems.len();
    assert!(n > 0 && c.orderer < n && !c.pairs.is_empty());
    assert!(c.heartbeat >= Duration::from_millis(1) && c.heartbeat <= Duration::from_secs(10));
    assert!(c.peer_timeout >= c.heartbeat * 2);
    assert!((576..=65_000).contains(&c.mtu));
    assert!(c.region.is_power_of_two() && (4096..=1 << 30).contains(&c.region));
    assert!(c.compress.is_none_or(|l| (1..=19).contains(&l)));
    for (i, s) in c.systems.iter().enumerate() {
        assert!(!s.name.is_empty() && s.journal_size >= 4 << 20);
        for t in &c.systems[i + 1..] {
            assert!(s.name != t.name && s.listen != t.listen && s.journal_dir != t.journal_dir);
        }
    }
    for p in &c.pairs {
        assert!(p.size > 0 && p.size % 512 == 0);
        assert!(c.systems[p.local].primary && !c.systems[p.remote].primary);
        assert!(p.local_path != p.remote_path);
        for s in &c.systems {
            assert!(!p.local_path.starts_with(&s.journal_dir));
            assert!(!p.remote_path.starts_with(&s.journal_dir));
        }
    }
}

/// Seeds: the shipped example, and configs with every optional key.
pub fn seeds(name: &str) -> Vec<Vec<u8>> {
    if name != "config" {
        return Vec::new();
    }
    let example = include_str!("../../examples/tidemark.toml");
    let minimal = r#"key_file = "k"
orderer = "b"

[[system]]
name = "a"
role = "primary"
listen = "127.0.0.1:1"
journal_dir = "ja"

[[system]]
name = "b"
role = "secondary"
listen = "[::1]:2"
journal_dir = "/abs/jb"

[[pair]]
name = "p"
size = "512"
local = { system = "a", path = "pa" }
remote = { system = "b", path = "pb" }
"#;
    let every = r#"key_file = "/etc/tidemark/key"
orderer = "c"
heartbeat_ms = 5
peer_timeout_ms = 10
mtu = 9000
rate = "1GiB"
window = "128MiB"
max_clock_skew_ms = 8
on_journal_full = "block"
suspend_after_ms = 0
region_size = "1MiB"
rpo_target_ms = 500
compress = "zstd"
compress_level = 19

[[system]]
name = "a"
role = "primary"
listen = "10.0.0.1:7100"
advertise = "10.0.0.9:7100"
journal_dir = "run/a"
journal_size = "4MiB"
nbd_listen = "unix:run/a.sock"
metrics_listen = "127.0.0.1:9100"

[[system]]
name = "a2"
role = "primary"
listen = "10.0.0.2:7100"
journal_dir = "run/a2"
nbd_listen = "/run/a2.sock"

[[system]]
name = "c"
role = "secondary"
listen = "0.0.0.0:7200"
journal_dir = "run/c"
metrics_listen = "[::]:9100"

[[pair]]
name = "log"
size = "1GiB"
local = { system = "a", path = "/dev/vdb" }
remote = { system = "c", path = "log-r.img" }
initial_sync = "none"

[[pair]]
name = "data"
size = "64 MiB"
local = { system = "a2", path = "data" }
remote = { system = "c", path = "data-r" }
initial_sync = "full"
"#;
    vec![
        example.as_bytes().to_vec(),
        minimal.as_bytes().to_vec(),
        every.as_bytes().to_vec(),
    ]
}
