//! Shared by the resync-epoch tests (`resync_epoch.rs`, `resync_promote.rs`): their
//! config and copying a secondary's files as a crash leaves them.

use std::path::Path;
use tidemark_cli::config::Config;

/// Primary `a` and secondary `b` (the orderer) with pairs `p0` and `p1` of `size`, and
/// a `journal_size` journal at `b`; paths relative to `dir`.
pub fn two_pair_config(dir: &Path, journal_size: &str, size: &str) -> Config {
    let text = format!(
        r#"
key_file = "cluster.key"
orderer = "b"

[[system]]
name = "a"
role = "primary"
listen = "127.0.0.1:7100"
journal_dir = "a/journal"

[[system]]
name = "b"
role = "secondary"
listen = "127.0.0.1:7200"
journal_dir = "b/journal"
journal_size = "{journal_size}"

[[pair]]
name = "p0"
size = "{size}"
local  = {{ system = "a", path = "a/p0.img" }}
remote = {{ system = "b", path = "b/p0.img" }}

[[pair]]
name = "p1"
size = "{size}"
local  = {{ system = "a", path = "a/p1.img" }}
remote = {{ system = "b", path = "b/p1.img" }}
"#
    );
    Config::parse(&text, dir, &dir.join("t.toml")).expect("config")
}

/// Copies the directory tree `from` to `to` (the files a SIGKILL at this moment leaves).
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("read_dir") {
        let e = e.expect("entry");
        let target = to.join(e.file_name());
        if e.file_type().expect("type").is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), &target).expect("copy");
        }
    }
}
