//! Which test programs are installed (shared by the actor and the CLI tests).

use std::process::Command;

/// Whether every program is installed; if not, says which are missing (the test then
/// skips).
pub fn have(programs: &[&str]) -> bool {
    let missing: Vec<&str> = programs
        .iter()
        .copied()
        .filter(|p| {
            Command::new(p)
                .arg("--version")
                .output()
                .map(|o| !o.status.success())
                .unwrap_or(true)
        })
        .collect();
    if missing.is_empty() {
        return true;
    }
    // CI installs them (.ci/run): there, a missing program is a failure, not a skip.
    if std::env::var_os("TIDEMARK_REQUIRE_PROGRAMS").is_some() {
        panic!(
            "NBD client program(s) not installed: {}",
            missing.join(", ")
        );
    }
    eprintln!(
        "SKIPPED: NBD client program(s) not installed: {} \
         (apt-get install qemu-utils libnbd-bin fio)",
        missing.join(", ")
    );
    false
}
