//! Helpers for the outage tests (`cli/tests/outage.rs`): signals to stop and continue a
//! daemon, fio as a background process, waits on the primary's tracking and resync as
//! its status file shows them, and the comparison of unit files by content.
#![allow(dead_code)]

use super::dependent::{first_difference, payload, Op, PATIENCE};
use super::{status_since, wait_until, Site};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

/// Sends `sig` (`"-STOP"`, `"-CONT"`, ...) to process `pid`; fails the test if `kill`
/// fails.
pub fn signal(sig: &str, pid: u32) {
    let ok = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .map(|s| s.success());
    assert_eq!(ok.ok(), Some(true), "kill {sig} {pid}");
}

/// Whether process `pid` is stopped (state `T` in `/proc/PID/stat`).
pub fn is_stopped(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            // "pid (comm) S ...": the state follows the last ')'.
            let rest = &s[s.rfind(')')? + 1..];
            rest.split_whitespace().next().map(|st| st == "T")
        })
        .unwrap_or(false)
}

/// The pairs of a status (`stats.pairs`).
pub fn pairs(status: &serde_json::Value) -> Vec<serde_json::Value> {
    status["stats"]["pairs"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// The pair called `name` in a status (`Null` if there is none).
pub fn pair(status: &serde_json::Value, name: &str) -> serde_json::Value {
    pairs(status)
        .into_iter()
        .find(|p| p["name"] == name)
        .unwrap_or_default()
}

/// Waits until the primary (site-a), in a status written after `since`, shows pair
/// `name` tracking with dirty bytes; returns that status.
pub fn wait_tracking(site: &Site, name: &str, since: SystemTime) -> serde_json::Value {
    let dir = site.path("run/site-a/journal");
    wait_until(PATIENCE, || {
        let s = status_since(&dir, since).ok_or("no status since then")?;
        let p = pair(&s, name);
        if p["primary_state"] == "tracking" && p["dirty_bytes"].as_u64().unwrap_or(0) > 0 {
            Ok(s)
        } else {
            Err(p.to_string())
        }
    })
    .unwrap_or_else(|e| {
        panic!(
            "the primary never tracked {name} with dirty bytes: {e}; logs:{}",
            site.log_tails()
        )
    })
}

/// Waits until the primary (in a status written after `since`) shows every pair
/// replicating, with no dirty bytes and no copy running, and then until the secondary
/// has applied everything the primary stamped (as a status written after that shows)
/// with every pair consistent. Returns the primary's last status.
pub fn wait_converged(site: &Site, since: SystemTime) -> serde_json::Value {
    let dir = site.path("run/site-a/journal");
    wait_until(PATIENCE, || {
        let s = status_since(&dir, since).ok_or("no status since then")?;
        let done = pairs(&s).iter().all(|p| {
            p["primary_state"] == "replicating"
                && p["dirty_bytes"] == 0
                && (p["sync"].is_null() || p["sync"]["finished"] == true)
                && p["acked_seq"] == p["written_seq"]
        });
        if done {
            Ok(())
        } else {
            Err(s["stats"]["pairs"].to_string())
        }
    })
    .unwrap_or_else(|e| {
        panic!(
            "the primary never replicated everything again: {e}; secondary: {}; logs:{}",
            site.status("site-b").unwrap_or_default(),
            site.log_tails()
        )
    });
    // No client writes and no copy runs now: the written point of a status written
    // after this is final.
    let status = site.status_after("site-a", SystemTime::now(), PATIENCE);
    let want = pairs(&status)
        .iter()
        .enumerate()
        .map(|(i, p)| {
            (
                tidemark::PairId(i as u32),
                p["written_seq"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    site.wait_applied("site-b", &want, PATIENCE);
    wait_until(PATIENCE, || {
        let s = site.status("site-b").ok_or("no status")?;
        if pairs(&s)
            .iter()
            .all(|p| p["secondary_state"] == "consistent")
        {
            Ok(())
        } else {
            Err(s["stats"]["pairs"].to_string())
        }
    })
    .unwrap_or_else(|e| panic!("the secondary never became consistent: {e}"));
    status
}

/// Compares two unit files by content: sizes equal, then chunk by chunk. `Err` names
/// the first differing byte (or the sizes).
pub fn compare_units(a: &Path, b: &Path) -> Result<(), String> {
    let open = |p: &Path| std::fs::File::open(p).map_err(|e| format!("{}: {e}", p.display()));
    let (fa, fb) = (open(a)?, open(b)?);
    let len = |f: &std::fs::File, p: &Path| {
        f.metadata()
            .map(|m| m.len())
            .map_err(|e| format!("{}: {e}", p.display()))
    };
    let (la, lb) = (len(&fa, a)?, len(&fb, b)?);
    if la != lb {
        return Err(format!(
            "{} has {la} bytes, {} has {lb}",
            a.display(),
            b.display()
        ));
    }
    const CHUNK: usize = 8 << 20;
    let (mut x, mut y) = (vec![0u8; CHUNK], vec![0u8; CHUNK]);
    let mut at = 0;
    while at < la {
        let n = CHUNK.min((la - at) as usize);
        fa.read_exact_at(&mut x[..n], at)
            .map_err(|e| format!("{}: {e}", a.display()))?;
        fb.read_exact_at(&mut y[..n], at)
            .map_err(|e| format!("{}: {e}", b.display()))?;
        if let Some(i) = first_difference(&x[..n], &y[..n]) {
            return Err(format!(
                "{} and {} differ at byte {}",
                a.display(),
                b.display(),
                at + i as u64
            ));
        }
        at += n as u64;
    }
    Ok(())
}

/// Panics (naming `seed`) unless each unit `names` of site-a equals that of site-b by
/// content.
pub fn assert_units_equal(site: &Site, names: &[&str], seed: u64) {
    for name in names {
        let local = site.path(&format!("run/site-a/{name}.img"));
        let remote = site.path(&format!("run/site-b/{name}.img"));
        if let Err(e) = compare_units(&local, &remote) {
            panic!("seed {seed}: {name}: the remote unit is not the local one: {e}");
        }
    }
}

/// Applies `ops` (written with `seed`, indices from 0) to `images`, as
/// [`super::dependent::dependent_writer`] writes them.
pub fn apply_ops(images: &mut [Vec<u8>], seed: u64, ops: &[Op]) {
    for (i, op) in ops.iter().enumerate() {
        let at = op.offset as usize;
        images[op.export][at..at + op.len as usize].copy_from_slice(&payload(seed, i, op));
    }
}

/// A process of the test (fio) killed when dropped, so a failed assertion leaves none
/// behind.
pub struct Held(pub Option<Child>);

impl Drop for Held {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Starts fio's NBD engine on export `name` at `port` with `args` (after the common
/// ones: the engine, the URI, JSON output).
pub fn spawn_fio(port: u16, name: &str, args: &[String]) -> Held {
    let child = Command::new("fio")
        .args([
            "--ioengine=nbd".to_string(),
            format!("--uri=nbd://127.0.0.1:{port}/{name}"),
            "--output-format=json".to_string(),
        ])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run fio");
    Held(Some(child))
}

/// Waits (bounded by `limit`) for fio to end; fails the test (with `context()`) if it
/// is still running then or fails. Returns its first job's JSON.
pub fn wait_fio(mut fio: Held, limit: Duration, context: impl Fn() -> String) -> serde_json::Value {
    let started = Instant::now();
    loop {
        let child = fio.0.as_mut().expect("fio");
        if child.try_wait().expect("fio").is_some() {
            break;
        }
        if started.elapsed() > limit {
            panic!(
                "fio still runs after {limit:?} (a stalled disk); {}",
                context()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = fio
        .0
        .take()
        .expect("fio")
        .wait_with_output()
        .expect("fio output");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "fio failed ({}):\n{text}\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        context()
    );
    let json = text.find('{').map(|i| &text[i..]).unwrap_or(&text);
    let v: serde_json::Value =
        serde_json::from_str(json).unwrap_or_else(|e| panic!("fio JSON: {e}: {text}"));
    let job = v["jobs"][0].clone();
    assert_eq!(job["error"].as_i64(), Some(0), "{job}");
    job
}
