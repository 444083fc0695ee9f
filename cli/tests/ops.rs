//! Operating running systems: `tidemark status` over the control sockets, Prometheus
//! metrics at `metrics_listen` (checked by `promtool check metrics`), the RPO target,
//! and what a stopped system looks like. Real daemons on loopback, real NBD writes.

mod common;

use common::dependent::Client;
use common::*;
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tidemark::nbd::consts::CMD_WRITE;

const PATIENCE: Duration = Duration::from_secs(60);

/// Whether promtool is installed; CI (TIDEMARK_REQUIRE_PROGRAMS) requires it.
fn have_promtool() -> bool {
    let ok = Command::new("promtool")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if ok {
        return true;
    }
    if std::env::var_os("TIDEMARK_REQUIRE_PROGRAMS").is_some() {
        panic!("promtool not installed (apt-get install prometheus)");
    }
    eprintln!("SKIPPED the promtool check: promtool not installed (apt-get install prometheus)");
    false
}

/// `promtool check metrics` on `text`: it must find no problem.
fn promtool_check(text: &str, what: &str) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run promtool");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("feed promtool");
    let out = child.wait_with_output().expect("promtool");
    assert!(
        out.status.success(),
        "promtool check metrics on {what} ({}): {}{}\n{text}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `GET /metrics` on 127.0.0.1:`port`: the body, if the answer was 200.
fn scrape(port: u16) -> Result<String, String> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(PATIENCE))
        .map_err(|e| e.to_string())?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut text = String::new();
    s.read_to_string(&mut text).map_err(|e| e.to_string())?;
    let (head, body) = text.split_once("\r\n\r\n").ok_or("no HTTP head")?;
    if !head.starts_with("HTTP/1.1 200") || !head.contains("text/plain; version=0.0.4") {
        return Err(format!("not a metrics answer: {head}"));
    }
    Ok(body.to_string())
}

/// The value of the sample `name{labels}` (labels exactly as encoded).
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// `tidemark status --config CFG ARGS...`.
fn status(site: &Site, args: &[&str]) -> std::process::Output {
    let mut all = vec!["status", "--config", site.cfg()];
    all.extend_from_slice(args);
    run(&all)
}

/// `status --json` for the whole group, if it exited 0.
fn status_json(site: &Site) -> Result<serde_json::Value, String> {
    let out = status(site, &["--json"]);
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into());
    }
    serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())
}

/// Starts a daemon with `RUST_LOG=info`, its output in `logs/NN-ROLE.log`.
fn daemon(site: &Site, role: &str) -> Child {
    let logs = site.path("logs");
    std::fs::create_dir_all(&logs).expect("logs dir");
    let n = std::fs::read_dir(&logs).map(|d| d.count()).unwrap_or(0);
    let file = std::fs::File::create(logs.join(format!("{n:02}-{role}.log"))).expect("log");
    let err = file.try_clone().expect("log");
    Command::new(bin())
        .args([role, "--config", site.cfg()])
        .env("RUST_LOG", "info")
        .stdout(Stdio::from(file))
        .stderr(Stdio::from(err))
        .spawn()
        .expect("spawn tidemark")
}

fn pair<'a>(g: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    g["pairs"]
        .as_array()
        .and_then(|ps| ps.iter().find(|p| p["name"] == name))
        .unwrap_or_else(|| panic!("no pair {name} in {g}"))
}

/// One line on stderr that says the system is not running; exit 1.
fn assert_not_running(out: &std::process::Output, what: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{what}: {out:?}");
    assert_eq!(err.lines().count(), 1, "{what}: one line: {err}");
    assert!(err.contains("not running"), "{what}: {err}");
    assert!(out.stdout.is_empty(), "{what}: nothing on stdout");
}

#[test]
fn status_and_metrics_show_what_was_written_and_the_rpo_target() {
    let seed = seed_or(13);
    eprintln!("seed {seed} (TIDEMARK_SEED replays it)");
    let nbd = free_tcp_port();
    let (ma, mb) = (free_tcp_port(), free_tcp_port());
    let mut spec = Site::two_sites(false);
    spec.rpo_target_ms = Some(1000);
    spec.system_mut("site-a").nbd_port = Some(nbd);
    spec.system_mut("site-a").metrics_port = Some(ma);
    spec.system_mut("site-b").metrics_port = Some(mb);
    let site = Site::with_config(spec);

    // Nothing runs yet: one line, exit 1, for one system and for all.
    assert_not_running(
        &status(&site, &["--system", "site-b"]),
        "site-b before start",
    );
    assert_not_running(&status(&site, &[]), "the group before start");
    let bad = status(&site, &["--system", "site-z"]);
    assert_eq!(
        bad.status.code(),
        Some(2),
        "an unknown system is a usage error"
    );
    let bad = status(&site, &["--watch", "--interval-ms", "5"]);
    assert_eq!(
        bad.status.code(),
        Some(2),
        "a too short period is a usage error"
    );

    let mut d = Daemons {
        secondary: Some(daemon(&site, "secondary")),
        primary: Some(daemon(&site, "primary")),
    };
    wait_tcp(nbd, d.primary.as_mut().expect("primary"), PATIENCE);
    for s in ["site-a", "site-b"] {
        let sock = site.path(&format!("run/{s}/journal/control.sock"));
        wait_until(PATIENCE, || {
            std::fs::metadata(&sock).map_err(|e| format!("{}: {e}", sock.display()))
        })
        .unwrap_or_else(|e| panic!("{e}{}", site.log_tails()));
        let mode = std::fs::metadata(&sock)
            .expect("socket")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{}: mode {mode:o}", sock.display());
    }

    // A known workload: seeded writes to both exports, each after the previous reply.
    let mut rng = rand_pcg::Pcg64::seed_from_u64(seed);
    let mut clients: BTreeMap<&str, Client> = [("log", 4u64 << 20), ("data", 8 << 20)]
        .into_iter()
        .map(|(n, size)| (n, Client::connect_sized(nbd, n, size)))
        .collect();
    let mut writes: BTreeMap<&str, u64> = BTreeMap::new();
    let mut bytes: BTreeMap<&str, u64> = BTreeMap::new();
    for i in 0..200 {
        let (name, size) = if rng.random_bool(0.5) {
            ("log", 4u64 << 20)
        } else {
            ("data", 8 << 20)
        };
        let len = rng.random_range(1..=64u64) * 512;
        let offset = rng.random_range(0..(size - len) / 512) * 512;
        let data: Vec<u8> = (0..len).map(|_| rng.random()).collect();
        let c = clients.get_mut(name).expect("client");
        c.request(0, CMD_WRITE, offset, len as u32, &data);
        c.reply(&format!("write {i}"));
        *writes.entry(name).or_default() += 1;
        *bytes.entry(name).or_default() += len;
    }
    for (_, c) in clients {
        c.disconnect();
    }

    // status --json: every write written, acknowledged and applied, both ends merged.
    let g = wait_until(PATIENCE, || {
        let g = status_json(&site)?;
        let done = ["log", "data"].iter().all(|n| {
            let p = pair(&g, n);
            p["written_seq"] == writes[n]
                && p["acked_seq"] == writes[n]
                && p["applied_seq"] == writes[n]
        });
        if done {
            Ok(g)
        } else {
            Err(g.to_string())
        }
    })
    .unwrap_or_else(|e| panic!("{e}{}", site.log_tails()));
    assert_eq!(g["version"], 1);
    assert_eq!(g["group"]["orderer"], "site-b");
    assert_eq!(g["group"]["rpo_target_ms"], 1000);
    assert!(g["group"]["commit_limit"].as_u64().unwrap_or(0) > 0, "{g}");
    for n in ["log", "data"] {
        let p = pair(&g, n);
        assert_eq!(p["state"], "replicating", "{p}");
        assert_eq!(p["remote_state"], "consistent", "{p}");
        assert_eq!(p["bytes"], bytes[n], "bytes written to {n}: {p}");
        assert_eq!(p["primary"], "site-a");
        assert_eq!(p["secondary"], "site-b");
        assert!(p["lag_ms"].is_u64(), "{p}");
        assert!(p["rtt_ms"].is_f64(), "{p}");
    }
    let sys = g["systems"].as_array().expect("systems");
    assert_eq!(sys.len(), 2);
    for s in sys {
        assert_eq!(s["running"], true, "{s}");
        let peers = s["view"]["peers"].as_object().expect("peers");
        assert_eq!(peers.len(), 1, "{s}");
        assert!(peers.values().all(|u| u == true), "{s}");
        assert!(
            s["view"]["journal_used_bytes"].as_u64().unwrap_or(0) > 0,
            "{s}"
        );
    }
    // The same figures over the control socket, raw: one JSON line each way.
    let mut raw =
        std::os::unix::net::UnixStream::connect(site.path("run/site-a/journal/control.sock"))
            .expect("connect to the control socket");
    raw.write_all(b"{\"op\":\"stats please\"}\n").expect("send");
    let mut reply = String::new();
    raw.read_to_string(&mut reply).expect("reply");
    let reply: serde_json::Value = serde_json::from_str(&reply).expect("a JSON reply");
    assert_eq!(reply["ok"], false, "{reply}");
    assert!(
        reply["error"].as_str().unwrap_or("").contains("unknown op"),
        "{reply}"
    );

    // The table: within 100 columns, both pairs, both systems.
    let out = status(&site, &[]);
    assert!(out.status.success(), "{out:?}");
    let table = String::from_utf8_lossy(&out.stdout);
    eprintln!("{table}");
    for l in table.lines() {
        assert!(
            l.chars().count() <= 100,
            "{} columns: {l}",
            l.chars().count()
        );
    }
    for word in [
        "PAIR",
        "log",
        "data",
        "replicating",
        "consistent",
        "site-a",
        "site-b",
    ] {
        assert!(table.contains(word), "no {word} in\n{table}");
    }
    // --watch refreshes in place, --count times.
    let out = status(&site, &["--watch", "--interval-ms", "100", "--count", "2"]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.matches("\x1b[H\x1b[2J").count(), 2, "{text}");

    // Metrics: the same numbers, and promtool accepts the text.
    let (a, b) = wait_until(PATIENCE, || {
        let a = scrape(ma)?;
        let b = scrape(mb)?;
        let ok = ["log", "data"].iter().all(|n| {
            let l = format!("{{system=\"site-a\",pair=\"{n}\"}}");
            let r = format!("{{system=\"site-b\",pair=\"{n}\"}}");
            sample(&a, &format!("tidemark_replicated_bytes_total{l}")) == Some(bytes[n] as f64)
                && sample(&a, &format!("tidemark_written_seq{l}")) == Some(writes[n] as f64)
                && sample(&a, &format!("tidemark_acked_seq{l}")) == Some(writes[n] as f64)
                && sample(&b, &format!("tidemark_applied_seq{r}")) == Some(writes[n] as f64)
        });
        if ok {
            Ok((a, b))
        } else {
            Err(format!("primary:\n{a}\nsecondary:\n{b}"))
        }
    })
    .unwrap_or_else(|e| panic!("{e}"));
    for (text, series) in [
        (
            &a,
            "tidemark_pair_state{system=\"site-a\",pair=\"log\",state=\"replicating\"}",
        ),
        (
            &a,
            "tidemark_pair_state{system=\"site-a\",pair=\"log\",state=\"tracking\"}",
        ),
        (&a, "tidemark_peer_up{system=\"site-a\",peer=\"site-b\"}"),
        (
            &b,
            "tidemark_pair_state{system=\"site-b\",pair=\"data\",state=\"consistent\"}",
        ),
        (&b, "tidemark_rpo_exceeded{system=\"site-b\",pair=\"log\"}"),
        (
            &b,
            "tidemark_commit_lag_seconds_count{system=\"site-b\",pair=\"log\"}",
        ),
        (&a, "tidemark_journal_used_bytes{system=\"site-a\"}"),
        (
            &a,
            "tidemark_retransmits_total{system=\"site-a\",pair=\"log\"}",
        ),
    ] {
        assert!(sample(text, series).is_some(), "no {series} in\n{text}");
    }
    assert_eq!(
        sample(
            &a,
            "tidemark_pair_state{system=\"site-a\",pair=\"log\",state=\"replicating\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &a,
            "tidemark_pair_state{system=\"site-a\",pair=\"log\",state=\"tracking\"}"
        ),
        Some(0.0)
    );
    if have_promtool() {
        promtool_check(&a, "the primary's metrics");
        promtool_check(&b, "the secondary's metrics");
    }

    // The primary stops: its socket goes, status says so in one line; the secondary's
    // commit lag grows past the RPO target (nothing moves its limit any more).
    let out = stop(d.primary.take().expect("primary"));
    assert!(out.status.success(), "the primary stopped cleanly: {out:?}");
    assert!(
        !site.path("run/site-a/journal/control.sock").exists(),
        "a clean stop removes the control socket"
    );
    assert_not_running(&status(&site, &["--system", "site-a"]), "site-a after stop");
    wait_until(PATIENCE, || {
        let g = status_json(&site)?;
        let ok = g["group"]["rpo_exceeded"] == true
            && ["log", "data"]
                .iter()
                .all(|n| pair(&g, n)["rpo_exceeded"] == true);
        if ok {
            Ok(())
        } else {
            Err(g.to_string())
        }
    })
    .unwrap_or_else(|e| panic!("{e}{}", site.log_tails()));
    let table = String::from_utf8_lossy(&status(&site, &[]).stdout).to_string();
    assert!(table.contains("not running"), "{table}");
    assert!(table.contains("commit lag above rpo_target_ms"), "{table}");
    // It comes back: the lag falls under the target again.
    d.primary = Some(daemon(&site, "primary"));
    wait_until(PATIENCE, || {
        let g = status_json(&site)?;
        let ok = g["group"]["rpo_exceeded"] == false
            && ["log", "data"]
                .iter()
                .all(|n| pair(&g, n)["rpo_exceeded"] == false);
        if ok {
            Ok(())
        } else {
            Err(g.to_string())
        }
    })
    .unwrap_or_else(|e| panic!("{e}{}", site.log_tails()));
    d.stop_both(&site);
    assert_not_running(&status(&site, &[]), "the group after stop");

    // The secondary logged each crossing once: per pair, exceeded and met again
    // alternate, starting with exceeded and ending with met again.
    let log = secondary_log(&site.path("logs"));
    for n in ["log", "data"] {
        let events: Vec<bool> = log
            .lines()
            .filter(|l| l.contains(&format!("pair=\"{n}\"")))
            .filter_map(|l| {
                if l.contains("RPO target exceeded") {
                    Some(true)
                } else if l.contains("RPO target met again") {
                    Some(false)
                } else {
                    None
                }
            })
            .collect();
        assert!(events.len() >= 2, "pair {n}: {events:?}\n{log}");
        assert!(
            events.iter().enumerate().all(|(i, e)| *e == (i % 2 == 0)),
            "pair {n}: crossings alternate: {events:?}\n{log}"
        );
        assert_eq!(events.last(), Some(&false), "pair {n}: {events:?}");
        assert!(
            log.contains(&format!(
                "pair state changed system=\"site-b\" pair=\"{n}\""
            )),
            "{log}"
        );
    }
}

/// The secondary daemon's log (the one `daemon(.., "secondary")` wrote).
fn secondary_log(dir: &Path) -> String {
    let mut names: Vec<_> = std::fs::read_dir(dir)
        .expect("logs")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.to_string_lossy().ends_with("-secondary.log"))
        .collect();
    names.sort();
    names
        .iter()
        .map(|p| std::fs::read_to_string(p).unwrap_or_default())
        .collect()
}
