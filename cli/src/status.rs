//! `tidemark status`: asks the running systems of a config over their control sockets
//! ([`crate::control`]) and shows one group view: per pair its state at both ends,
//! sequence numbers, commit lag, link figures, and which pair holds the limit back.
//!
//! The JSON (`--json`) is stable (version [`STATUS_VERSION`], fields only added) and
//! documented in `docs/operations.md`; the table fits 100 columns.

use crate::config::Config;
use crate::control::{ask_status, AskError};
use crate::view::{SyncView, SystemView};
use serde::Serialize;
use std::time::Duration;

/// The version of `tidemark status --json`.
pub const STATUS_VERSION: u32 = 1;
/// How long one system may take to answer.
pub const ASK_TIMEOUT: Duration = Duration::from_secs(3);
/// The widest line of the table.
pub const MAX_WIDTH: usize = 100;

/// The group as the asked systems see it.
#[derive(Clone, Debug, Serialize)]
pub struct GroupStatus {
    pub version: u32,
    /// The group's commit limit and lag, from the orderer's system (null fields if it was
    /// not asked or is not running).
    pub group: GroupRow,
    pub systems: Vec<SystemEntry>,
    pub pairs: Vec<PairRow>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct GroupRow {
    pub orderer: String,
    /// Nanoseconds since the Unix epoch.
    pub commit_limit: Option<u64>,
    pub lag_ms: Option<u64>,
    /// The pair whose run head holds the limit back.
    pub laggard: Option<String>,
    pub rpo_target_ms: Option<u64>,
    pub rpo_exceeded: Option<bool>,
}

/// One system of the config that was asked.
#[derive(Clone, Debug, Serialize)]
pub struct SystemEntry {
    pub name: String,
    pub role: String,
    pub running: bool,
    /// Why it gave no view (not running, no answer, ...).
    pub error: Option<String>,
    /// Its answer: the view it serves on its control socket.
    pub view: Option<SystemView>,
}

/// One pair, both ends merged: figures of an end that was not asked (or is not running)
/// are null.
#[derive(Clone, Debug, Default, Serialize)]
pub struct PairRow {
    pub name: String,
    pub primary: String,
    pub secondary: String,
    /// At the primary: syncing, replicating, tracking, resyncing.
    pub state: Option<String>,
    /// At the secondary: consistent, inconsistent.
    pub remote_state: Option<String>,
    pub sync: Option<SyncView>,
    pub dirty_bytes: Option<u64>,
    pub written_seq: Option<u64>,
    pub acked_seq: Option<u64>,
    pub head_seq: Option<u64>,
    pub applied_seq: Option<u64>,
    pub commit_limit: Option<u64>,
    pub lag_ms: Option<u64>,
    pub lag_bytes: Option<u64>,
    pub bytes: Option<u64>,
    pub rtt_ms: Option<f64>,
    pub loss_pct: Option<f64>,
    pub retransmits: Option<u64>,
    pub rpo_exceeded: Option<bool>,
    pub holds_limit: bool,
    /// At the secondary: the largest commit lag of any write applied since it started.
    pub lag_max_ms: Option<f64>,
    /// At the primary, with `pace_writes`: the delay a write acknowledgement completing
    /// now is held, and the writes held since start.
    pub pacing_delay_ms: Option<f64>,
    pub paced_writes: Option<u64>,
    /// At the primary: new writes are refused (a switchover is under way).
    pub quiesced: Option<bool>,
}

/// Asks every system of `systems` (config indices).
pub fn collect(cfg: &Config, systems: &[usize]) -> GroupStatus {
    let mut entries = Vec::new();
    for &i in systems {
        let s = &cfg.systems[i];
        let answer = ask_status(&s.control_socket(), ASK_TIMEOUT).and_then(|doc| {
            serde_json::from_value::<SystemView>(doc["view"].clone()).map_err(|e| {
                AskError::BadReply {
                    path: s.control_socket().display().to_string(),
                    error: format!("no view: {e}"),
                }
            })
        });
        let (view, error) = match answer {
            Ok(v) => (Some(v), None),
            Err(e) => (None, Some(e.to_string())),
        };
        entries.push(SystemEntry {
            name: s.name.clone(),
            role: if s.primary { "primary" } else { "secondary" }.into(),
            running: view.is_some(),
            error,
            view,
        });
    }
    merge(cfg, entries)
}

/// The group view from the systems' answers.
pub fn merge(cfg: &Config, systems: Vec<SystemEntry>) -> GroupStatus {
    let view_of = |name: &str| {
        systems
            .iter()
            .find(|e| e.name == name)
            .and_then(|e| e.view.as_ref())
    };
    let orderer = &cfg.systems[cfg.orderer].name;
    let o = view_of(orderer).and_then(|v| v.orderer.clone());
    let group = GroupRow {
        orderer: orderer.clone(),
        commit_limit: o.as_ref().map(|o| o.commit_limit),
        lag_ms: o.as_ref().and_then(|o| o.lag_ms),
        laggard: o.as_ref().and_then(|o| o.laggard.clone()),
        rpo_target_ms: cfg.rpo_target.map(|d| d.as_millis() as u64),
        rpo_exceeded: o.as_ref().and_then(|o| o.rpo_exceeded),
    };
    let mut pairs = Vec::new();
    for p in &cfg.pairs {
        let primary = &cfg.systems[p.local].name;
        let secondary = &cfg.systems[p.remote].name;
        let end = |system: &str, which: &str| {
            view_of(system)
                .and_then(|v| v.pairs.iter().find(|x| x.name == p.name && x.end == which))
                .cloned()
        };
        let mut row = PairRow {
            name: p.name.clone(),
            primary: primary.clone(),
            secondary: secondary.clone(),
            holds_limit: group.laggard.as_deref() == Some(p.name.as_str()),
            ..PairRow::default()
        };
        if let Some(a) = end(primary, "primary") {
            row.state = Some(a.state);
            row.sync = a.sync;
            row.dirty_bytes = a.dirty_bytes;
            row.written_seq = a.written_seq;
            row.acked_seq = a.acked_seq;
            row.lag_bytes = a.lag_bytes;
            row.bytes = a.bytes;
            row.rtt_ms = a.rtt_ms;
            row.loss_pct = a.loss_pct;
            row.retransmits = a.retransmits;
            row.pacing_delay_ms = a.pacing_delay_ms;
            row.paced_writes = a.paced_writes;
            row.quiesced = a.quiesced;
        }
        if let Some(b) = end(secondary, "secondary") {
            row.remote_state = Some(b.state);
            row.head_seq = b.head_seq;
            row.applied_seq = b.applied_seq;
            row.commit_limit = b.commit_limit;
            row.lag_ms = b.lag_ms;
            row.rpo_exceeded = b.rpo_exceeded;
            row.lag_max_ms = b.lag_max_ms;
        }
        pairs.push(row);
    }
    GroupStatus {
        version: STATUS_VERSION,
        group,
        systems,
        pairs,
    }
}

/// A count in at most 7 characters: `1234567`, `12.3M`, `1.2G`.
fn count(n: u64) -> String {
    match n {
        0..=9_999_999 => n.to_string(),
        10_000_000..=999_999_999 => format!("{:.1}M", n as f64 / 1e6),
        _ => format!("{:.1}G", n as f64 / 1e9),
    }
}

/// Bytes in at most 7 characters: `512B`, `12.3K`, `4.0M`, `1.5G` (powers of 1024).
fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "K", "M", "G", "T"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n}B")
    } else if v >= 100.0 {
        format!("{v:.0}{}", UNITS[u])
    } else {
        format!("{v:.1}{}", UNITS[u])
    }
}

/// `HH:MM:SS.mmm` UTC of a time stamp (nanoseconds since the Unix epoch).
fn clock(ts_ns: u64) -> String {
    let ms = ts_ns / 1_000_000;
    let s = ms / 1000;
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        (s / 3600) % 24,
        (s / 60) % 60,
        s % 60,
        ms % 1000
    )
}

fn opt<T>(v: Option<T>, f: impl Fn(T) -> String) -> String {
    v.map(f).unwrap_or_else(|| "-".into())
}

/// The human table.
pub fn render(g: &GroupStatus) -> String {
    let mut out = String::new();
    let mut group = format!("group (orderer {}): ", g.group.orderer);
    match (g.group.commit_limit, g.group.lag_ms) {
        (Some(l), lag) if l > 0 => {
            group += &format!(
                "limit {} UTC, lag {} ms",
                clock(l),
                opt(lag, |x| x.to_string())
            );
            if let Some(p) = &g.group.laggard {
                group += &format!(", held back by {p}");
            }
        }
        (Some(_), _) => group += "no limit released yet",
        (None, _) => group += "orderer not asked or not running",
    }
    if let Some(t) = g.group.rpo_target_ms {
        let verdict = match g.group.rpo_exceeded {
            Some(true) => "EXCEEDED",
            Some(false) => "met",
            None => "?",
        };
        group += &format!("; RPO {t} ms {verdict}");
    }
    out += &group;
    out.push('\n');
    for s in &g.systems {
        let line = match &s.view {
            Some(v) => {
                let up = v.peers.values().filter(|u| **u).count();
                let mut l = format!(
                    "{:<10} {:<9} pid {:<7} peers {up}/{} up  journal {}/{}  sent {} recv {} drop {}",
                    s.name,
                    s.role,
                    v.pid,
                    v.peers.len(),
                    bytes(v.journal_used_bytes),
                    bytes(v.journal_size_bytes),
                    bytes(v.link.bytes_out),
                    bytes(v.link.bytes_in),
                    count(v.link.dropped),
                );
                if let Some(c) = v.clock.as_ref().filter(|c| *c != "ok") {
                    l += &format!("  clock {c}");
                }
                if let Some(f) = &v.failed {
                    l += &format!("  FAILED: {f}");
                }
                l
            }
            None => format!(
                "{:<10} {:<9} {}",
                s.name,
                s.role,
                s.error.as_deref().unwrap_or("not running")
            ),
        };
        out += &fit(&line);
        out.push('\n');
    }
    out.push('\n');
    let header = [
        "PAIR", "STATE", "REMOTE", "WRITTEN", "ACKED", "APPLIED", "LAG_MS", "LAG_B", "RTT_MS",
        "LOSS%", "RETX",
    ];
    let mut rows: Vec<Vec<String>> = vec![header.iter().map(|s| s.to_string()).collect()];
    for p in &g.pairs {
        let mut name: String = p.name.chars().take(12).collect();
        if p.holds_limit {
            name.push('*');
        }
        let state = match (&p.state, &p.sync) {
            (Some(s), Some(sync)) if !sync.finished && (s == "syncing" || s == "resyncing") => {
                format!("{s} {}", opt(sync.percent, |x| format!("{x:.0}%")))
            }
            (s, _) => opt(s.clone(), |s| s),
        };
        let lag = opt(p.lag_ms, |x| {
            let mark = if p.rpo_exceeded == Some(true) {
                "!"
            } else {
                ""
            };
            format!("{}{mark}", count(x))
        });
        rows.push(vec![
            name,
            state,
            opt(p.remote_state.clone(), |s| s),
            opt(p.written_seq, count),
            opt(p.acked_seq, count),
            opt(p.applied_seq, count),
            lag,
            opt(p.lag_bytes, bytes),
            opt(p.rtt_ms, |x| format!("{x:.1}")),
            opt(p.loss_pct, |x| format!("{x:.1}")),
            opt(p.retransmits, count),
        ]);
    }
    let widths: Vec<usize> = (0..header.len())
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    for r in &rows {
        let mut line = String::new();
        for (c, cell) in r.iter().enumerate() {
            if c > 0 {
                line.push(' ');
            }
            // Text left, numbers right.
            if c < 3 {
                line += &format!("{cell:<w$}", w = widths[c]);
            } else {
                line += &format!("{cell:>w$}", w = widths[c]);
            }
        }
        out += &fit(line.trim_end());
        out.push('\n');
    }
    let mut notes = Vec::new();
    if g.pairs.iter().any(|p| p.holds_limit) {
        notes.push("* holds the group's commit limit back");
    }
    if g.pairs.iter().any(|p| p.rpo_exceeded == Some(true)) {
        notes.push("! commit lag above rpo_target_ms");
    }
    if !notes.is_empty() {
        out += &notes.join("; ");
        out.push('\n');
    }
    let paced: Vec<String> = g
        .pairs
        .iter()
        .filter_map(|p| Some((&p.name, p.pacing_delay_ms.filter(|d| *d > 0.0)?)))
        .map(|(n, d)| format!("{n} {d:.1} ms"))
        .collect();
    if !paced.is_empty() {
        out += &fit(&format!(
            "pacing holds write acknowledgements: {}",
            paced.join(", ")
        ));
        out.push('\n');
    }
    if g.pairs.iter().any(|p| p.quiesced == Some(true)) {
        out += "quiesced: the primary refuses new writes (a switchover is under way)\n";
    }
    out
}

/// `line` cut to [`MAX_WIDTH`] characters.
fn fit(line: &str) -> String {
    if line.chars().count() <= MAX_WIDTH {
        line.to_string()
    } else {
        let mut s: String = line.chars().take(MAX_WIDTH - 1).collect();
        s.push('…');
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::view::{OrdererView, PairView};

    #[test]
    fn the_table_fits_100_columns_with_large_figures() {
        let big = PairView {
            name: "a-rather-long-pair-name".into(),
            end: "primary".into(),
            state: "resyncing".into(),
            sync: Some(SyncView {
                kind: "resync".into(),
                total_bytes: 1 << 40,
                copied_bytes: 1 << 39,
                finished: false,
                percent: Some(50.0),
                rate_bytes_per_s: None,
                eta_s: None,
            }),
            written_seq: Some(u64::MAX / 3),
            acked_seq: Some(u64::MAX / 4),
            lag_bytes: Some(u64::MAX / 2),
            bytes: Some(u64::MAX / 2),
            rtt_ms: Some(123456.7),
            loss_pct: Some(100.0),
            retransmits: Some(u64::MAX / 5),
            ..PairView::default()
        };
        let remote = PairView {
            name: big.name.clone(),
            end: "secondary".into(),
            state: "inconsistent".into(),
            applied_seq: Some(u64::MAX / 5),
            head_seq: Some(u64::MAX / 5),
            lag_ms: Some(99_999_999_999),
            rpo_exceeded: Some(true),
            ..PairView::default()
        };
        let cfg = Config::parse(
            &crate::config::tests::EXAMPLE
                .replace("name = \"log\"", "name = \"a-rather-long-pair-name\""),
            std::path::Path::new("/etc/tm"),
            std::path::Path::new("/etc/tm/t.toml"),
        )
        .expect("config");
        let systems = vec![
            SystemEntry {
                name: "site-a".into(),
                role: "primary".into(),
                running: true,
                error: None,
                view: Some(SystemView {
                    system: "site-a".into(),
                    pid: 4_000_000,
                    journal_used_bytes: u64::MAX,
                    journal_size_bytes: u64::MAX,
                    pairs: vec![big],
                    ..SystemView::default()
                }),
            },
            SystemEntry {
                name: "site-b".into(),
                role: "secondary".into(),
                running: true,
                error: None,
                view: Some(SystemView {
                    system: "site-b".into(),
                    orderer: Some(OrdererView {
                        commit_limit: 1_700_000_000_000_000_000,
                        lag_ms: Some(5),
                        laggard: Some("a-rather-long-pair-name".into()),
                        commits: 1,
                        rpo_exceeded: Some(false),
                    }),
                    pairs: vec![remote],
                    ..SystemView::default()
                }),
            },
        ];
        let g = merge(&cfg, systems);
        let text = render(&g);
        for line in text.lines() {
            assert!(
                line.chars().count() <= MAX_WIDTH,
                "{} columns: {line}",
                line.chars().count()
            );
        }
        assert!(
            text.contains("held back by a-rather-long-pair-name"),
            "{text}"
        );
        assert!(text.contains("resyncing 50%"), "{text}");
        assert!(text.contains('!'), "the RPO mark: {text}");
        assert_eq!(g.pairs[0].remote_state.as_deref(), Some("inconsistent"));
        assert_eq!(g.pairs[1].state, None, "pair data has no view");
    }
}
