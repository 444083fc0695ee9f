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
];

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
