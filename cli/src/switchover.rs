//! `tidemark switchover`: a planned role swap of a one-primary/one-secondary group that
//! loses nothing, against the running daemons of this host.
//!
//! Steps, each bounded by `--timeout-s`:
//!
//! 1. **check**: both systems answer on their control sockets; every pair replicates
//!    with nothing dirty at the primary and is consistent at the secondary; `--out` and
//!    the regions file do not exist.
//! 2. **quiesce**: the primary refuses new writes (NBD clients get `ESHUTDOWN`: the
//!    server is going away) for a lease longer than the whole command; writes taken
//!    before are carried out and answered as usual.
//! 3. **drain**: waits until the primary has answered every write it took and the
//!    secondary acknowledged all of them (`waiting_writes` 0, `acked_seq ==
//!    written_seq`), then until the secondary applied up to those sequence numbers.
//! 4. **stop-primary**, **stop-secondary**: SIGTERM, then waits until the system's lock
//!    is free (the daemon exited and released `journal_dir/LOCK`).
//! 5. **promote**, **failover** (`--require-drained`), **demote** (`--require-drained`),
//!    **failback**: the offline steps of [`crate::failover`], in this process.
//!
//! If a step fails, the command stops there and reports which steps were done, the
//! state of both systems, and how to go back or on ([`Outcome`]). Up to and including
//! the drain, nothing has changed: the quiesce is lifted (and would lapse with its lease
//! anyway). After that, every later step is one an operator can run by hand, and the
//! report lists the commands.

use crate::config::Config;
use crate::control::{ask, ask_status, Request};
use crate::failover::{demote, failback, failover};
use crate::view::SystemView;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tidemark_actors::error::EngineError;

/// What the command did.
#[derive(Debug, Serialize)]
pub struct Outcome {
    pub ok: bool,
    /// The old primary and the old secondary (the new primary).
    pub old_primary: String,
    pub new_primary: String,
    /// Steps completed, in order.
    pub done: Vec<String>,
    /// The step that failed, and why.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failed_step: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Where both systems stand now, in words.
    pub state: String,
    /// What to do next (commands to run).
    pub next: Vec<String>,
    /// Per pair: the sequence number drained to (written, acknowledged and applied).
    pub drained: Vec<DrainedPair>,
    /// After the failover: the new generation, the reversed config and the regions file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub generation: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub config: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub regions: Option<PathBuf>,
    /// Per pair: the bytes the new primary will resend at its first start (0 after a
    /// drained switchover), from `failback`.
    pub resync_bytes: Vec<(String, u64)>,
    pub elapsed_ms: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct DrainedPair {
    pub name: String,
    pub seq: u64,
}

/// Why a switchover could not begin (nothing was done): a usage error, exit 2.
#[derive(Debug, thiserror::Error)]
pub enum SwitchoverError {
    #[error("{0}")]
    Refused(String),
    #[error(transparent)]
    Engine(#[from] EngineError),
}

/// How long one ask on a control socket may take.
const ASK: Duration = Duration::from_secs(5);
/// How often the drain and the stops poll.
const POLL: Duration = Duration::from_millis(50);

fn quote(p: &Path) -> String {
    let s = p.display().to_string();
    if s.chars()
        .all(|c| c.is_ascii_alphanumeric() || "/._-+=:,".contains(c))
    {
        s
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// The view of the system whose control socket is `sock`.
fn view(sock: &Path) -> Result<SystemView, String> {
    let doc = ask_status(sock, ASK).map_err(|e| e.to_string())?;
    serde_json::from_value(doc["view"].clone()).map_err(|e| format!("bad status view: {e}"))
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// `tidemark switchover --config FILE --out NEW [--regions-out FILE] [--timeout-s N]`.
/// `Err` only if nothing was done (a refusal before the quiesce); once the quiesce was
/// sent, the outcome says what happened, failed or not.
pub fn switchover(
    cfg: &Config,
    out: &Path,
    regions_out: Option<&Path>,
    timeout: Duration,
) -> Result<Outcome, SwitchoverError> {
    let started = Instant::now();
    let refuse = |m: String| Err(SwitchoverError::Refused(m));
    let (Some(pi), Some(si)) = (
        cfg.systems.iter().position(|s| s.primary),
        cfg.systems.iter().position(|s| !s.primary),
    ) else {
        return refuse("switchover: the config needs a primary and a secondary system".into());
    };
    if cfg.systems.len() != 2 {
        return refuse(
            "switchover: only a group of one primary and one secondary system can switch over"
                .into(),
        );
    }
    let (ps, ss) = (&cfg.systems[pi], &cfg.systems[si]);
    let regions = regions_out.map_or_else(
        || {
            let mut name = out.as_os_str().to_owned();
            name.push(".regions.json");
            PathBuf::from(name)
        },
        Path::to_path_buf,
    );
    for (flag, p) in [("--out", out), ("--regions-out", regions.as_path())] {
        if p.exists() {
            return refuse(format!(
                "{flag}: {} exists; it is never overwritten",
                p.display()
            ));
        }
    }
    // 1. check
    let (psock, ssock) = (ps.control_socket(), ss.control_socket());
    let pv =
        view(&psock).map_err(|e| SwitchoverError::Refused(format!("primary {}: {e}", ps.name)))?;
    let sv = view(&ssock)
        .map_err(|e| SwitchoverError::Refused(format!("secondary {}: {e}", ss.name)))?;
    if let Some(f) = pv.failed.as_ref().or(sv.failed.as_ref()) {
        return refuse(format!("switchover: a system has failed: {f}"));
    }
    for p in &pv.pairs {
        if p.state != "replicating" || p.dirty_bytes.unwrap_or(0) > 0 {
            return refuse(format!(
                "switchover: pair {} is {} at the primary ({} dirty bytes): wait until it replicates",
                p.name,
                p.state,
                p.dirty_bytes.unwrap_or(0)
            ));
        }
    }
    for p in &sv.pairs {
        if p.state != "consistent" {
            return refuse(format!(
                "switchover: pair {} is {} at the secondary",
                p.name, p.state
            ));
        }
    }
    if pv.peers.values().any(|up| !up) {
        return refuse(format!(
            "switchover: the primary {} does not hear every peer ({:?})",
            ps.name, pv.peers
        ));
    }
    let (ppid, spid) = (pv.pid, sv.pid);

    let mut o = Outcome {
        ok: false,
        old_primary: ps.name.clone(),
        new_primary: ss.name.clone(),
        done: vec!["check".into()],
        failed_step: None,
        error: None,
        state: String::new(),
        next: Vec::new(),
        drained: Vec::new(),
        generation: None,
        config: None,
        regions: None,
        resync_bytes: Vec::new(),
        elapsed_ms: 0,
    };
    let cfg_s = quote(&cfg.path);
    let out_s = quote(out);
    let regions_s = quote(&regions);
    let fail = |mut o: Outcome, step: &str, e: String, state: String, next: Vec<String>| {
        o.failed_step = Some(step.into());
        o.error = Some(e);
        o.state = state;
        o.next = next;
        o.elapsed_ms = started.elapsed().as_millis() as u64;
        Ok(o)
    };
    let resume = |why: &str| -> String {
        let r = ask(
            &psock,
            &Request {
                op: "resume".into(),
                ..Request::default()
            },
            ASK,
        );
        match r {
            Ok(r) if r.ok => format!("nothing changed: {why}; the primary takes writes again"),
            _ => format!(
                "nothing changed: {why}; the primary did not confirm the resume: it takes writes again when its quiesce lease lapses (at most {} s)",
                (timeout + QUIESCE_MARGIN).as_secs()
            ),
        }
    };

    // 2. quiesce: a lease past every bounded step that follows.
    let lease = timeout + QUIESCE_MARGIN;
    let q = ask(
        &psock,
        &Request {
            op: "quiesce".into(),
            lease_ms: Some(lease.as_millis() as u64),
            ..Request::default()
        },
        ASK,
    );
    let quiesced_at = now_ms();
    match q {
        Ok(r) if r.ok => o.done.push("quiesce".into()),
        Ok(r) => {
            let e = r.error.unwrap_or_default();
            let state = resume("the quiesce was refused");
            return fail(o, "quiesce", e, state, vec![]);
        }
        Err(e) => {
            let state = resume("the quiesce could not be sent");
            return fail(o, "quiesce", e.to_string(), state, vec![]);
        }
    }

    // 3. drain: the primary, then the secondary, each from a status sampled after the
    // quiesce took effect.
    let deadline = Instant::now() + timeout;
    let drained = loop {
        let last = match view(&psock) {
            Ok(v) if v.sampled_at_ms > quiesced_at => {
                let done = v.pairs.iter().all(|p| {
                    p.quiesced == Some(true)
                        && p.waiting_writes == Some(0)
                        && p.acked_seq == p.written_seq
                        && p.state == "replicating"
                        && p.dirty_bytes.unwrap_or(0) == 0
                });
                if done {
                    break v
                        .pairs
                        .iter()
                        .map(|p| DrainedPair {
                            name: p.name.clone(),
                            seq: p.written_seq.unwrap_or(0),
                        })
                        .collect::<Vec<_>>();
                }
                format!("{:?}", v.pairs)
            }
            Ok(_) => "no status sampled since the quiesce yet".into(),
            Err(e) => e,
        };
        if Instant::now() > deadline {
            let state = resume("the primary did not drain in time");
            return fail(o, "drain", format!("primary: {last}"), state, vec![]);
        }
        std::thread::sleep(POLL);
    };
    loop {
        let last = match view(&ssock) {
            Ok(v) => {
                let applied = |name: &str| {
                    v.pairs
                        .iter()
                        .find(|p| p.name == name)
                        .and_then(|p| p.applied_seq)
                        .unwrap_or(0)
                };
                if drained.iter().all(|d| applied(&d.name) >= d.seq) {
                    break;
                }
                format!("{:?}", v.pairs)
            }
            Err(e) => e,
        };
        if Instant::now() > deadline {
            let state = resume("the secondary did not apply everything in time");
            return fail(o, "drain", format!("secondary: {last}"), state, vec![]);
        }
        std::thread::sleep(POLL);
    }
    o.drained = drained;
    o.done.push("drain".into());

    // The offline steps, as an operator would type them.
    let promote_cmd = format!("tidemark promote --config {cfg_s} --system {}", ss.name);
    let failover_cmd = format!(
        "tidemark failover --config {cfg_s} --system {} --out {out_s} --require-drained",
        ss.name
    );
    let demote_cmd = |g: &str| {
        format!(
            "tidemark demote --config {out_s} --system {} --generation {g} --regions-out {regions_s} --require-drained",
            ps.name
        )
    };
    let failback_cmd = format!(
        "tidemark failback --config {out_s} --system {} --regions {regions_s}",
        ss.name
    );
    let start_new = vec![
        format!("tidemark primary --config {out_s}    # {}", ss.name),
        format!("tidemark secondary --config {out_s}  # {}", ps.name),
    ];
    let offline_rest = |from: usize, g: &str| -> Vec<String> {
        let all = [
            promote_cmd.clone(),
            failover_cmd.clone(),
            demote_cmd(g),
            failback_cmd.clone(),
        ];
        all[from..]
            .iter()
            .cloned()
            .chain(start_new.clone())
            .collect()
    };

    // 4. stop both.
    if let Err(e) = stop(cfg, pi, ppid, timeout) {
        let state = format!(
            "the primary {} is quiesced (drained: everything it acknowledged is applied at the secondary) and was sent SIGTERM but has not stopped; the secondary {} runs; nothing on disk changed",
            ps.name, ss.name
        );
        let mut next = vec![format!(
            "to go back: once the primary stopped, start it again: tidemark primary --config {cfg_s}"
        )];
        next.push(format!(
            "to go on: once it stopped, stop the secondary (SIGTERM to pid {spid}), then:"
        ));
        next.extend(offline_rest(0, "<generation failover prints>"));
        return fail(o, "stop-primary", e, state, next);
    }
    o.done.push("stop-primary".into());
    if let Err(e) = stop(cfg, si, spid, timeout) {
        let state = format!(
            "the primary {} stopped drained; the secondary {} was sent SIGTERM but has not stopped; nothing on disk changed",
            ps.name, ss.name
        );
        let mut next = vec![format!(
            "to go back: start the primary again: tidemark primary --config {cfg_s} (the secondary keeps running)"
        )];
        next.push("to go on: once the secondary stopped:".into());
        next.extend(offline_rest(0, "<generation failover prints>"));
        return fail(o, "stop-secondary", e, state, next);
    }
    o.done.push("stop-secondary".into());
    let both_stopped = "both systems are stopped and drained (the secondary applied every write the primary acknowledged)".to_string();

    // 5. the offline steps.
    match crate::promote::promote(cfg, &[si], true, false) {
        Ok(r) if !r.gap && r.consistent && r.rolled_back_to.is_none() => {
            o.done.push("promote".into())
        }
        Ok(r) => {
            let e = format!(
                "promote: not the drained cut (gap {}, consistent {}, rolled back to {:?})",
                r.gap, r.consistent, r.rolled_back_to
            );
            return fail(o, "promote", e, both_stopped, vec![
                "look at the secondary's journal before anything else; `tidemark promote` printed the same".into(),
            ]);
        }
        Err(e) => {
            let mut next = vec![format!(
                "to go back: start both again with {cfg_s} (secondary first)"
            )];
            next.push("to go on: fix the cause, then:".into());
            next.extend(offline_rest(0, "<generation failover prints>"));
            return fail(o, "promote", e.to_string(), both_stopped, next);
        }
    }
    let fo = match failover(cfg, si, out, true) {
        Ok(fo) => fo,
        Err(e) => {
            let state = format!(
                "{both_stopped}; the secondary {} is promoted (its units are the cut: every write); the failover changed nothing",
                ss.name
            );
            let mut next = vec![format!(
                "to go back: start both again with {cfg_s} (a promoted secondary that rolled nothing back resumes)"
            )];
            next.push("to go on: fix the cause, then:".into());
            next.extend(offline_rest(1, "<generation failover prints>"));
            return fail(o, "failover", e.to_string(), state, next);
        }
    };
    o.done.push("failover".into());
    o.generation = Some(fo.generation);
    o.config = Some(out.to_path_buf());
    let g = fo.generation.to_string();
    let new_cfg = match Config::load(out) {
        Ok(c) => c,
        Err(e) => {
            let state = format!(
                "{both_stopped}; {} is the primary of generation {g} in {out_s} (failback pending); {} is not demoted yet",
                ss.name, ps.name
            );
            return fail(
                o,
                "demote",
                format!("{out_s}: {e}"),
                state,
                offline_rest(2, &g),
            );
        }
    };
    let index = |c: &Config, name: &str| c.systems.iter().position(|s| s.name == name);
    let (Some(new_si), Some(new_pi)) = (index(&new_cfg, &ss.name), index(&new_cfg, &ps.name))
    else {
        return fail(
            o,
            "demote",
            format!("{out_s}: the systems are not there"),
            both_stopped,
            offline_rest(2, &g),
        );
    };
    match demote(&new_cfg, new_pi, fo.generation, &regions, true) {
        Ok(_) => o.done.push("demote".into()),
        Err(e) => {
            let state = format!(
                "{both_stopped}; {} is the primary of generation {g} in {out_s} (failback pending, it talks to no one until then); {} is not demoted: do not start it with {cfg_s}",
                ss.name, ps.name
            );
            return fail(o, "demote", e.to_string(), state, offline_rest(2, &g));
        }
    }
    o.regions = Some(regions.clone());
    match failback(&new_cfg, new_si, &regions) {
        Ok(fb) => {
            o.done.push("failback".into());
            o.resync_bytes = fb
                .pairs
                .into_iter()
                .map(|p| (p.name, p.resync_bytes))
                .collect();
        }
        Err(e) => {
            let state = format!(
                "{both_stopped}; {} is the primary of generation {g} (failback pending), {} is its demoted secondary; the regions file is {regions_s}",
                ss.name, ps.name
            );
            return fail(o, "failback", e.to_string(), state, offline_rest(3, &g));
        }
    }
    o.ok = true;
    o.state = format!(
        "switched over: {} is the primary and {} its secondary at generation {g}, in {out_s}; both are stopped",
        ss.name, ps.name
    );
    o.next = start_new;
    o.elapsed_ms = started.elapsed().as_millis() as u64;
    Ok(o)
}

/// How much longer than the command's timeout the quiesce lease runs: the stops and
/// offline steps after the drain.
pub const QUIESCE_MARGIN: Duration = Duration::from_secs(30);

/// Sends SIGTERM to `pid` (system `i`'s daemon) and waits until the system's lock is
/// free: the process released it by exiting.
fn stop(cfg: &Config, i: usize, pid: u32, timeout: Duration) -> Result<(), String> {
    let name = &cfg.systems[i].name;
    let Some(p) = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
    else {
        return Err(format!("{name}: pid {pid} is not a process id"));
    };
    rustix::process::kill_process(p, rustix::process::Signal::TERM)
        .map_err(|e| format!("{name}: SIGTERM to pid {pid}: {e}"))?;
    let deadline = Instant::now() + timeout;
    loop {
        match crate::daemon::lock_system(cfg, i) {
            Ok(lock) => {
                drop(lock);
                return Ok(());
            }
            Err(EngineError::Running(_)) => {}
            Err(e) => return Err(format!("{name}: {e}")),
        }
        if Instant::now() > deadline {
            return Err(format!(
                "{name}: pid {pid} still holds the system's lock {} s after SIGTERM",
                timeout.as_secs()
            ));
        }
        std::thread::sleep(POLL);
    }
}
