use super::*;

/// The example from the issue; it must keep working.
pub const EXAMPLE: &str = r#"
key_file = "cluster.key"
orderer = "site-b"
heartbeat_ms = 10

[[system]]
name = "site-a"
role = "primary"
listen = "127.0.0.1:7100"        # UDP
advertise = "127.0.0.1:7100"     # where peers send to (e.g. a wan-sim in front); defaults to listen
journal_dir = "run/site-a/journal"
journal_size = "256MiB"

[[system]]
name = "site-b"
role = "secondary"
listen = "127.0.0.1:7200"
journal_dir = "run/site-b/journal"

[[pair]]
name = "log"
size = "64MiB"
local  = { system = "site-a", path = "run/site-a/log.img" }
remote = { system = "site-b", path = "run/site-b/log.img" }

[[pair]]
name = "data"
size = "256MiB"
local  = { system = "site-a", path = "run/site-a/data.img" }
remote = { system = "site-b", path = "run/site-b/data.img" }
"#;

fn parse(text: &str) -> Result<Config, EngineError> {
    Config::parse(text, Path::new("/etc/tm"), Path::new("/etc/tm/t.toml"))
}

#[test]
fn the_example_parses() {
    let c = parse(EXAMPLE).expect("example is valid");
    assert_eq!(c.systems.len(), 2);
    assert_eq!(c.orderer, 1);
    assert_eq!(c.key_file, PathBuf::from("/etc/tm/cluster.key"));
    assert_eq!(c.systems[0].journal_size, 256 << 20);
    assert_eq!(c.systems[1].advertise, c.systems[1].listen);
    assert_eq!(c.pairs[1].size, 256 << 20);
    assert_eq!(
        c.pairs[0].remote_path,
        PathBuf::from("/etc/tm/run/site-b/log.img")
    );
    assert_eq!(c.heartbeat, Duration::from_millis(10));
}

/// (what is changed, the text the error must contain)
const BAD: &[(&str, &str, &str)] = &[
    ("orderer = \"site-b\"", "", "orderer"),
    (
        "orderer = \"site-b\"",
        "orderer = \"site-z\"",
        "no system is named \"site-z\"",
    ),
    ("key_file = \"cluster.key\"", "", "key_file"),
    ("name = \"data\"", "name = \"log\"", "\"log\" is used twice"),
    (
        "remote = { system = \"site-b\", path = \"run/site-b/data.img\" }",
        "remote = { system = \"site-q\", path = \"run/site-b/data.img\" }",
        "remote.system: no system is named \"site-q\"",
    ),
    (
        "remote = { system = \"site-b\", path = \"run/site-b/data.img\" }",
        "remote = { system = \"site-b\", path = \"run/site-b/log.img\" }",
        "is also used by pair \"log\"",
    ),
    (
        "local  = { system = \"site-a\", path = \"run/site-a/data.img\" }",
        "local  = { system = \"site-b\", path = \"run/site-a/data.img\" }",
        "is not a primary",
    ),
    (
        "\nsize = \"256MiB\"",
        "\nsize = \"lots\"",
        "size: \"lots\" is not a size",
    ),
    (
        "\nsize = \"256MiB\"",
        "\nsize = \"1000\"",
        "not a positive multiple of 512",
    ),
    ("role = \"secondary\"", "role = \"tertiary\"", "role"),
    (
        "listen = \"127.0.0.1:7200\"",
        "listen = \"127.0.0.1:7100\"",
        "is used by another system",
    ),
    (
        "listen = \"127.0.0.1:7200\"",
        "listen = \"nonsense\"",
        "listen",
    ),
    ("heartbeat_ms = 10", "heartbeat_ms = 0", "heartbeat_ms"),
    (
        "heartbeat_ms = 10",
        "heartbeat_ms = 10\non_journal_full = \"drop\"",
        "on_journal_full: \"drop\" is neither",
    ),
    (
        "heartbeat_ms = 10",
        "heartbeat_ms = 10\nsuspend_after_ms = 4000000",
        "suspend_after_ms",
    ),
    (
        "heartbeat_ms = 10",
        "heartbeat_ms = 10\nregion_size = \"48KiB\"",
        "region_size: 49152 bytes is not a power of two",
    ),
    (
        "heartbeat_ms = 10",
        "heartbeat_ms = 10\nregion_size = \"lots\"",
        "region_size: \"lots\" is not a size",
    ),
    (
        "heartbeat_ms = 10",
        "heartbeat_ms = 10\ncolour = \"blue\"",
        "colour",
    ),
    (
        "journal_dir = \"run/site-b/journal\"",
        "journal_dir = \"run/site-a/journal\"",
        "journal_dir",
    ),
    (
        "journal_size = \"256MiB\"",
        "journal_size = \"1MiB\"",
        "journal_size",
    ),
    (
        "path = \"run/site-b/log.img\"",
        "path = \"run/site-b/journal/log.img\"",
        "inside the journal_dir",
    ),
    // The TOML itself: syntax, types, unknown and missing keys (in the tables too).
    ("heartbeat_ms = 10", "heartbeat_ms = ", "/etc/tm/t.toml"),
    ("heartbeat_ms = 10", "heartbeat_ms = \"10\"", "invalid type"),
    (
        "journal_size = \"256MiB\"",
        "journal_size = \"256MiB\"\ncolour = \"blue\"",
        "unknown field `colour`",
    ),
    (
        "\nsize = \"64MiB\"",
        "\nsize = \"64MiB\"\nmode = \"sync\"",
        "unknown field `mode`",
    ),
    (
        "local  = { system = \"site-a\", path = \"run/site-a/log.img\" }",
        "local  = { system = \"site-a\", path = \"run/site-a/log.img\", sync = true }",
        "unknown field `sync`",
    ),
    (
        "journal_dir = \"run/site-b/journal\"",
        "",
        "missing field `journal_dir`",
    ),
    ("\nsize = \"64MiB\"", "", "missing field `size`"),
    // Group-wide settings.
    (
        "heartbeat_ms = 10",
        "heartbeat_ms = 10001\npeer_timeout_ms = 30000",
        "heartbeat_ms: 10001 is outside 1..=10000",
    ),
    (
        "heartbeat_ms = 10",
        "heartbeat_ms = 10\nmax_clock_skew_ms = 0",
        "max_clock_skew_ms: 0 is outside 1..=10000",
    ),
    (
        "heartbeat_ms = 10",
        "heartbeat_ms = 10\npeer_timeout_ms = 19",
        "peer_timeout_ms: must be at least twice heartbeat_ms",
    ),
    // The default peer timeout (3 s) is too short for a 2 s heartbeat.
    (
        "heartbeat_ms = 10",
        "heartbeat_ms = 2000",
        "peer_timeout_ms: must be at least twice heartbeat_ms",
    ),
    (
        "heartbeat_ms = 10",
        "heartbeat_ms = 10\nmtu = 575",
        "mtu: 575 is outside 576..=65000",
    ),
    (
        "heartbeat_ms = 10",
        "heartbeat_ms = 10\ncompress = \"lz5\"",
        "compress: \"lz5\" is not \"off\" or \"zstd\"",
    ),
    (
        "heartbeat_ms = 10",
        "heartbeat_ms = 10\ncompress = \"zstd\"\ncompress_level = 20",
        "compress_level: 20 is outside 1..=19",
    ),
    (
        "heartbeat_ms = 10",
        "heartbeat_ms = 10\ncompress_level = 3",
        "compress_level: set compress = \"zstd\" to use it",
    ),
    (
        "heartbeat_ms = 10",
        "heartbeat_ms = 10\nmtu = 65001",
        "mtu: 65001 is outside 576..=65000",
    ),
    (
        "heartbeat_ms = 10",
        "heartbeat_ms = 10\nrate = \"fast\"",
        "rate: \"fast\" is not a size",
    ),
    (
        "heartbeat_ms = 10",
        "heartbeat_ms = 10\nwindow = \"big\"",
        "window: \"big\" is not a size",
    ),
    (
        "heartbeat_ms = 10",
        "heartbeat_ms = 10\nprimary_journal = \"metadata\"",
        "primary_journal: \"metadata\" is neither \"data\" nor \"activity-log\"",
    ),
    // Systems.
    (
        "name = \"site-a\"",
        "name = \"\"",
        "system[0].name: must not be empty",
    ),
    (
        "name = \"site-b\"",
        "name = \"site-a\"",
        "system[1].name: \"site-a\" is used twice",
    ),
    (
        "advertise = \"127.0.0.1:7100\"",
        "advertise = \"127.0.0.1\"",
        "system[0] (site-a).advertise: \"127.0.0.1\" is not an address",
    ),
    (
        "journal_size = \"256MiB\"",
        "journal_size = \"huge\"",
        "system[0] (site-a).journal_size: \"huge\" is not a size",
    ),
    // Pairs.
    (
        "name = \"log\"",
        "name = \"\"",
        "pair[0].name: must not be empty",
    ),
    (
        "remote = { system = \"site-b\", path = \"run/site-b/log.img\" }",
        "remote = { system = \"site-a\", path = \"run/site-b/log.img\" }",
        "pair[0] (log).remote.system: \"site-a\" is not a secondary",
    ),
    (
        "remote = { system = \"site-b\", path = \"run/site-b/log.img\" }",
        "remote = { system = \"site-b\", path = \"run/site-a/log.img\" }",
        "pair[0] (log).remote.path: /etc/tm/run/site-a/log.img is also used by pair \"log\"",
    ),
    (
        "\nsize = \"64MiB\"",
        "\nsize = \"0\"",
        "pair[0] (log).size: 0 is not a positive multiple of 512",
    ),
    (
        "\nsize = \"256MiB\"",
        "\nsize = \"256MiB\"\ninitial_sync = \"always\"",
        "pair[1] (data).initial_sync: \"always\" is none of \"auto\", \"full\", \"none\"",
    ),
    (
        "\nsize = \"64MiB\"",
        "\nsize = \"64MiB\"\ninitial_sync = \"\"",
        "pair[0] (log).initial_sync: \"\" is none of",
    ),
    (
        "\nsize = \"64MiB\"",
        "\nsize = \"64MiB\"\ninitial_sync = true",
        "invalid type",
    ),
];

/// Whole configs that the replacements above cannot make, and the error they give.
fn bad_texts() -> Vec<(String, &'static str)> {
    let first_system = EXAMPLE.find("[[system]]").expect("a system");
    let first_pair = EXAMPLE.find("[[pair]]").expect("a pair");
    vec![
        (
            EXAMPLE[..first_system].to_string(),
            "system: at least one [[system]] is needed",
        ),
        (
            EXAMPLE[..first_pair].to_string(),
            "pair: at least one [[pair]] is needed",
        ),
        // Two problems: the first in checking order is reported (a system before the
        // orderer, the orderer before a pair).
        (
            EXAMPLE
                .replacen("orderer = \"site-b\"", "orderer = \"site-z\"", 1)
                .replacen("role = \"secondary\"", "role = \"tertiary\"", 1),
            "system[1] (site-b).role: \"tertiary\" is neither",
        ),
        (
            EXAMPLE
                .replacen("orderer = \"site-b\"", "orderer = \"site-z\"", 1)
                .replacen("\nsize = \"64MiB\"", "\nsize = \"1000\"", 1),
            "orderer: no system is named \"site-z\"",
        ),
        (String::new(), "missing field `key_file`"),
    ]
}

#[test]
fn bad_configs_name_the_key() {
    for (from, to, needle) in BAD {
        assert!(EXAMPLE.contains(from), "case {from:?} does not apply");
        let text = EXAMPLE.replacen(from, to, 1);
        match parse(&text) {
            Err(EngineError::Config(m)) => assert!(
                m.contains(needle),
                "{from:?} -> {to:?}: {m:?} lacks {needle:?}"
            ),
            Err(e) => panic!("{from:?} -> {to:?}: wrong error kind {e}"),
            Ok(_) => panic!("{from:?} -> {to:?}: accepted"),
        }
    }
    for (text, needle) in bad_texts() {
        match parse(&text) {
            Err(EngineError::Config(m)) => {
                assert!(m.contains(needle), "{text}\n: {m:?} lacks {needle:?}")
            }
            Err(e) => panic!("{text}\n: wrong error kind {e}"),
            Ok(_) => panic!("{text}\n: accepted"),
        }
    }
}

#[test]
fn defaults_are_filled_in_and_given_values_kept() {
    let c = parse(EXAMPLE).expect("example");
    assert_eq!(c.path, PathBuf::from("/etc/tm/t.toml"));
    assert_eq!(c.peer_timeout, Duration::from_millis(3000));
    assert_eq!(c.mtu, 1400);
    assert_eq!(c.rate, 0, "unpaced");
    assert_eq!(c.window, 64 << 20);
    assert_eq!(c.primary_journal, PrimaryJournal::Data, "data by default");
    assert_eq!(c.max_clock_skew, Duration::from_millis(20));
    assert_eq!(c.rpo_target, None, "no RPO target unless given");
    let addr = |s: &str| s.parse::<SocketAddr>().expect("address");
    assert_eq!(
        c.systems[1],
        SystemConfig {
            name: "site-b".into(),
            primary: false,
            listen: addr("127.0.0.1:7200"),
            advertise: addr("127.0.0.1:7200"),
            journal_dir: PathBuf::from("/etc/tm/run/site-b/journal"),
            journal_size: 256 << 20,
            nbd_listen: None,
            nbd_tls: None,
            nbd_insecure: false,
            metrics_listen: None,
        }
    );
    assert_eq!(
        c.pairs[0],
        PairConfig {
            name: "log".into(),
            size: 64 << 20,
            local: 0,
            local_path: PathBuf::from("/etc/tm/run/site-a/log.img"),
            remote: 1,
            remote_path: PathBuf::from("/etc/tm/run/site-b/log.img"),
            initial_sync: InitialSync::Auto,
        }
    );

    let text = EXAMPLE
        .replacen(
            "heartbeat_ms = 10",
            "heartbeat_ms = 5\npeer_timeout_ms = 10\nmtu = 9000\nrate = \"1GiB\"\n\
             window = \"8MiB\"\nmax_clock_skew_ms = 7\nprimary_journal = \"activity-log\"",
            1,
        )
        .replacen(
            "listen = \"127.0.0.1:7200\"",
            "listen = \"127.0.0.1:7200\"\nadvertise = \"127.0.0.2:7201\"",
            1,
        )
        .replacen("journal_size = \"256MiB\"", "journal_size = \"4MiB\"", 1)
        .replacen("key_file = \"cluster.key\"", "key_file = \"/keys/k\"", 1)
        .replacen("\"run/site-b/data.img\"", "\"/dev/shm/data.img\"", 1)
        .replacen(
            "\nsize = \"64MiB\"",
            "\nsize = \"64MiB\"\ninitial_sync = \"none\"",
            1,
        )
        .replacen(
            "\nsize = \"256MiB\"",
            "\nsize = \"256MiB\"\ninitial_sync = \"full\"",
            1,
        );
    let c = parse(&text).expect("every optional key given");
    assert_eq!(c.heartbeat, Duration::from_millis(5));
    assert_eq!(c.peer_timeout, Duration::from_millis(10));
    assert_eq!(c.mtu, 9000);
    assert_eq!(c.rate, 1 << 30);
    assert_eq!(c.window, 8 << 20);
    assert_eq!(c.max_clock_skew, Duration::from_millis(7));
    assert_eq!(c.primary_journal, PrimaryJournal::ActivityLog);
    assert_eq!(c.systems[1].advertise, addr("127.0.0.2:7201"));
    assert_eq!(c.systems[0].journal_size, 4 << 20, "4 MiB is allowed");
    // Absolute paths stay as they are.
    assert_eq!(c.key_file, PathBuf::from("/keys/k"));
    assert_eq!(c.pairs[1].remote_path, PathBuf::from("/dev/shm/data.img"));
    assert_eq!(c.pairs[0].initial_sync, InitialSync::None);
    assert_eq!(c.pairs[1].initial_sync, InitialSync::Full);
    let auto = EXAMPLE.replacen(
        "\nsize = \"64MiB\"",
        "\nsize = \"64MiB\"\ninitial_sync = \"auto\"",
        1,
    );
    assert_eq!(
        parse(&auto).expect("auto").pairs[0].initial_sync,
        InitialSync::Auto
    );
}

#[test]
fn load_resolves_paths_against_the_config_files_directory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("sub").join("t.toml");
    std::fs::create_dir_all(dir.path().join("sub")).expect("mkdir");
    std::fs::write(&path, EXAMPLE).expect("write");
    let c = Config::load(&path).expect("loads");
    assert_eq!(c.path, path);
    assert_eq!(c.key_file, dir.path().join("sub/cluster.key"));
    assert_eq!(
        c.systems[0].journal_dir,
        dir.path().join("sub/run/site-a/journal")
    );
    let missing = dir.path().join("missing.toml");
    match Config::load(&missing) {
        Err(EngineError::Config(m)) => assert!(m.contains("missing.toml"), "{m}"),
        other => panic!("a missing file: {other:?}"),
    }
}

/// The shipped example (`examples/tidemark.toml`, the README's quick start) is a valid
/// config: one primary, one secondary that runs the orderer, small units.
#[test]
fn the_shipped_example_parses() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/tidemark.toml");
    let c = Config::load(&path).expect("examples/tidemark.toml is valid");
    let base = path.parent().expect("a directory");
    assert_eq!(c.key_file, base.join("cluster.key"));
    let roles: Vec<(&str, bool)> = c
        .systems
        .iter()
        .map(|s| (s.name.as_str(), s.primary))
        .collect();
    assert_eq!(roles, [("site-a", true), ("site-b", false)]);
    assert_eq!(c.systems[c.orderer].name, "site-b");
    assert!(c.systems[0].nbd_listen.is_some(), "the primary serves NBD");
    assert!(!c.pairs.is_empty());
    assert!(
        c.pairs.iter().all(|p| p.initial_sync == InitialSync::Auto),
        "the example shows initial_sync at its default"
    );
    for p in &c.pairs {
        assert!(
            p.size <= 64 << 20,
            "{}: a quick start has small units",
            p.name
        );
        assert!(p.local_path.starts_with(base) && p.remote_path.starts_with(base));
    }
    for s in &c.systems {
        assert!(s.listen.ip().is_loopback(), "{}: loopback only", s.name);
        assert!(s.journal_dir.starts_with(base));
    }
}

#[test]
fn sizes_and_keys() {
    assert_eq!(parse_size("k", "64MiB").ok(), Some(64 << 20));
    assert_eq!(parse_size("k", "4096").ok(), Some(4096));
    assert!(parse_size("k", "-1").is_err());
    let dir = tempfile::tempdir().expect("tempdir");
    let p = dir.path().join("k");
    std::fs::write(&p, "ab".repeat(32) + "\n").expect("write");
    assert_eq!(read_key(&p).ok(), Some([0xab; 32]));
    std::fs::write(&p, "abc").expect("write");
    assert!(matches!(read_key(&p), Err(EngineError::Config(m)) if m.contains("64 hex")));
    assert!(read_key(&dir.path().join("missing")).is_err());
}

#[test]
fn nbd_listen_is_kept_for_primaries_and_secondaries() {
    let text = EXAMPLE
        .replacen(
            "journal_size = \"256MiB\"\n",
            "journal_size = \"256MiB\"\nnbd_listen = \"127.0.0.1:10809\"\n",
            1,
        )
        .replacen(
            "journal_dir = \"run/site-b/journal\"\n",
            "journal_dir = \"run/site-b/journal\"\nnbd_listen = \"unix:/run/b.sock\"\n",
            1,
        );
    let c = parse(&text).expect("nbd_listen on both roles is valid");
    assert_eq!(c.systems[0].nbd_listen.as_deref(), Some("127.0.0.1:10809"));
    assert_eq!(c.systems[1].nbd_listen.as_deref(), Some("unix:/run/b.sock"));
    assert_eq!(parse(EXAMPLE).expect("example").systems[1].nbd_listen, None);
}

/// The example with extra lines for site-b (a secondary: `export` serves its NBD).
fn site_b_with(lines: &str) -> String {
    EXAMPLE.replacen(
        "journal_dir = \"run/site-b/journal\"\n",
        &format!("journal_dir = \"run/site-b/journal\"\n{lines}\n"),
        1,
    )
}

/// Plain NBD where other hosts can reach it is refused unless TLS is configured or
/// `nbd_insecure = true` is said; loopback and Unix sockets are local.
#[test]
fn an_nbd_listen_other_hosts_reach_needs_tls_or_nbd_insecure() {
    let tls = "nbd_tls_cert = \"tls/cert.pem\"\nnbd_tls_key = \"/keys/key.pem\"";
    for exposed in [
        "0.0.0.0:10809",
        "[::]:10809",
        "192.0.2.7:10809",
        "[2001:db8::1]:10809",
    ] {
        let listen = format!("nbd_listen = {exposed:?}");
        match parse(&site_b_with(&listen)) {
            Err(EngineError::Config(m)) => {
                for needle in [
                    "system[1] (site-b).nbd_listen",
                    "not a loopback address",
                    "nbd_tls_cert",
                    "nbd_insecure = true",
                ] {
                    assert!(m.contains(needle), "{exposed}: {m:?} lacks {needle:?}");
                }
            }
            other => panic!(
                "{exposed} without TLS was accepted: {:?}",
                other.map(|_| ())
            ),
        }
        let c = parse(&site_b_with(&format!("{listen}\nnbd_insecure = true")))
            .unwrap_or_else(|e| panic!("{exposed} with nbd_insecure: {e}"));
        assert!(c.systems[1].nbd_insecure && c.systems[1].nbd_tls.is_none());
        let c = parse(&site_b_with(&format!("{listen}\n{tls}")))
            .unwrap_or_else(|e| panic!("{exposed} with TLS: {e}"));
        assert_eq!(
            c.systems[1].nbd_tls,
            Some(TlsFiles {
                cert: PathBuf::from("/etc/tm/tls/cert.pem"),
                key: PathBuf::from("/keys/key.pem"),
                client_ca: None,
            }),
            "paths are relative to the config file's directory"
        );
        assert!(!c.systems[1].nbd_insecure);
    }
    for local in [
        "127.0.0.1:10809",
        "127.8.9.10:10809",
        "[::1]:10809",
        "[::ffff:127.0.0.1]:10809",
        "unix:/run/b.sock",
    ] {
        let c = parse(&site_b_with(&format!("nbd_listen = {local:?}")))
            .unwrap_or_else(|e| panic!("{local} is local: {e}"));
        assert!(!c.systems[1].nbd_insecure && c.systems[1].nbd_tls.is_none());
    }
    // The same rule for `export --listen`, with the system's settings.
    let c = parse(EXAMPLE).expect("example");
    let addr = |s: &str| s.parse::<ListenAddr>().expect("address");
    let e = c.systems[1]
        .check_nbd_exposure("--listen", &addr("0.0.0.0:0"))
        .expect_err("exposed");
    assert!(
        e.to_string()
            .contains("--listen: 0.0.0.0:0 is not a loopback"),
        "{e}"
    );
    c.systems[1]
        .check_nbd_exposure("--listen", &addr("127.0.0.1:0"))
        .expect("loopback");
}

#[test]
fn nbd_tls_keys_are_checked_together() {
    let c = parse(&site_b_with(
        "nbd_tls_cert = \"c.pem\"\nnbd_tls_key = \"k.pem\"\nnbd_tls_client_ca = \"ca.pem\"",
    ))
    .expect("all three");
    assert_eq!(
        c.systems[1]
            .nbd_tls
            .as_ref()
            .and_then(|t| t.client_ca.clone()),
        Some(PathBuf::from("/etc/tm/ca.pem"))
    );
    let bad = [
        (
            "nbd_tls_cert = \"c.pem\"",
            "system[1] (site-b).nbd_tls_key: needed with nbd_tls_cert",
        ),
        (
            "nbd_tls_key = \"k.pem\"",
            "system[1] (site-b).nbd_tls_cert: needed with nbd_tls_key",
        ),
        (
            "nbd_tls_client_ca = \"ca.pem\"",
            "system[1] (site-b).nbd_tls_client_ca: needs nbd_tls_cert and nbd_tls_key",
        ),
        (
            "nbd_tls_cert = \"c.pem\"\nnbd_tls_key = \"k.pem\"\nnbd_insecure = true",
            "system[1] (site-b).nbd_insecure: contradicts nbd_tls_cert",
        ),
        ("nbd_insecure = \"yes\"", "invalid type"),
    ];
    for (lines, needle) in bad {
        match parse(&site_b_with(lines)) {
            Err(EngineError::Config(m)) => {
                assert!(m.contains(needle), "{lines}: {m:?} lacks {needle:?}")
            }
            other => panic!("{lines} was accepted: {:?}", other.map(|_| ())),
        }
    }
    // nbd_insecure = false says what the default says.
    let c = parse(&site_b_with("nbd_insecure = false")).expect("false");
    assert!(!c.systems[1].nbd_insecure);
}

#[test]
fn nbd_listen_is_checked_at_load_and_a_relative_socket_is_relative_to_the_config() {
    let with = |value: &str| {
        EXAMPLE.replacen(
            "journal_dir = \"run/site-b/journal\"\n",
            &format!("journal_dir = \"run/site-b/journal\"\nnbd_listen = {value:?}\n"),
            1,
        )
    };
    let c = parse(&with("unix:run/b.sock")).expect("a relative unix socket is valid");
    assert_eq!(
        c.systems[1].nbd_listen.as_deref(),
        Some("unix:/etc/tm/run/b.sock")
    );
    for bad_value in ["nowhere", "unix:", "127.0.0.1"] {
        match parse(&with(bad_value)) {
            Err(EngineError::Config(m)) => assert!(m.contains("nbd_listen"), "{bad_value}: {m}"),
            other => panic!(
                "nbd_listen = {bad_value:?} was accepted: {:?}",
                other.map(|_| ())
            ),
        }
    }
}

#[test]
fn compress_is_off_by_default_and_zstd_takes_a_level() {
    assert_eq!(parse(EXAMPLE).expect("example").compress, None);
    let with = |extra: &str| {
        parse(&EXAMPLE.replacen(
            "heartbeat_ms = 10",
            &format!("heartbeat_ms = 10\n{extra}"),
            1,
        ))
        .expect("valid")
        .compress
    };
    assert_eq!(with("compress = \"off\""), None);
    assert_eq!(with("compress = \"zstd\""), Some(3));
    assert_eq!(with("compress = \"zstd\"\ncompress_level = 9"), Some(9));
}

#[test]
fn metrics_listen_and_rpo_target_are_kept_and_checked() {
    let text = EXAMPLE
        .replacen(
            "heartbeat_ms = 10",
            "heartbeat_ms = 10\nrpo_target_ms = 750",
            1,
        )
        .replacen(
            "journal_size = \"256MiB\"\n",
            "journal_size = \"256MiB\"\nmetrics_listen = \"127.0.0.1:9187\"\n",
            1,
        )
        .replacen(
            "journal_dir = \"run/site-b/journal\"\n",
            "journal_dir = \"run/site-b/journal\"\nmetrics_listen = \"127.0.0.1:9188\"\n",
            1,
        );
    let c = parse(&text).expect("metrics_listen and rpo_target_ms are valid");
    assert_eq!(c.rpo_target, Some(Duration::from_millis(750)));
    let addr = |s: &str| s.parse::<SocketAddr>().expect("address");
    assert_eq!(c.systems[0].metrics_listen, Some(addr("127.0.0.1:9187")));
    assert_eq!(c.systems[1].metrics_listen, Some(addr("127.0.0.1:9188")));
    assert_eq!(
        c.systems[1].control_socket(),
        PathBuf::from("/etc/tm/run/site-b/journal/control.sock")
    );
    let cases = [
        (
            text.replacen("rpo_target_ms = 750", "rpo_target_ms = 0", 1),
            "rpo_target_ms: 0 is outside",
        ),
        (
            text.replacen("rpo_target_ms = 750", "rpo_target_ms = \"1s\"", 1),
            "invalid type",
        ),
        (
            text.replacen("127.0.0.1:9188", "127.0.0.1:9187", 1),
            "system[1] (site-b).metrics_listen: 127.0.0.1:9187 is used by another system",
        ),
        (
            text.replacen("127.0.0.1:9188", "nowhere", 1),
            "system[1] (site-b).metrics_listen: \"nowhere\" is not an address",
        ),
    ];
    for (bad_text, needle) in cases {
        match parse(&bad_text) {
            Err(EngineError::Config(m)) => assert!(m.contains(needle), "{m:?} lacks {needle:?}"),
            other => panic!("accepted or wrong error: {:?}", other.map(|_| ())),
        }
    }
}
