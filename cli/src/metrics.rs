//! Prometheus metrics of a running system, served over HTTP at `metrics_listen`
//! (`GET /metrics`, Prometheus text format 0.0.4, encoded by `prometheus-client`).
//!
//! Every figure comes from the system's [`SystemView`], refreshed by the daemon's
//! sampling loop every 500 ms ([`Metrics::update`]): counters mirror the engine's totals
//! (they only move forward; they start at 0 with the process), gauges are set. The
//! commit lag histogram gets one observation per pair (at its secondary) per sample:
//! the current commit lag (`lag_ms` of the view). Names and labels are listed in
//! `docs/operations.md`.

use crate::view::SystemView;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SystemLabels {
    system: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PairLabels {
    system: String,
    pair: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    system: String,
    pair: String,
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerLabels {
    system: String,
    peer: String,
}

type FloatGauge = Gauge<f64, AtomicU64>;
type LagHistograms = Family<PairLabels, Histogram, fn() -> Histogram>;

/// The states a pair can be in at each end, for `tidemark_pair_state`.
const PRIMARY_STATES: [&str; 4] = ["syncing", "replicating", "tracking", "resyncing"];
const SECONDARY_STATES: [&str; 2] = ["consistent", "inconsistent"];

fn lag_histogram() -> Histogram {
    // 1 ms to about 2 minutes.
    Histogram::new(exponential_buckets(0.001, 2.0, 18))
}

/// One system's metrics.
pub struct Metrics {
    registry: Registry,
    commit_lag: LagHistograms,
    commit_lag_now: Family<PairLabels, FloatGauge>,
    commit_lag_bytes: Family<PairLabels, Gauge>,
    replicated_bytes: Family<PairLabels, Counter>,
    packets: Family<PairLabels, Counter>,
    retransmits: Family<PairLabels, Counter>,
    rtt: Family<PairLabels, FloatGauge>,
    dirty_bytes: Family<PairLabels, Gauge>,
    written_seq: Family<PairLabels, Gauge>,
    acked_seq: Family<PairLabels, Gauge>,
    head_seq: Family<PairLabels, Gauge>,
    applied_seq: Family<PairLabels, Gauge>,
    pair_state: Family<StateLabels, Gauge>,
    sync_total: Family<PairLabels, Gauge>,
    sync_copied: Family<PairLabels, Gauge>,
    rpo_exceeded: Family<PairLabels, Gauge>,
    pacing_delay: Family<PairLabels, FloatGauge>,
    paced_writes: Family<PairLabels, Counter>,
    rpo_target: Family<SystemLabels, FloatGauge>,
    group_lag: Family<SystemLabels, FloatGauge>,
    group_rpo_exceeded: Family<SystemLabels, Gauge>,
    journal_used: Family<SystemLabels, Gauge>,
    journal_size: Family<SystemLabels, Gauge>,
    peer_up: Family<PeerLabels, Gauge>,
    link_bytes_out: Family<SystemLabels, Counter>,
    link_bytes_in: Family<SystemLabels, Counter>,
    link_dropped: Family<SystemLabels, Counter>,
    failed: Family<SystemLabels, Gauge>,
}

/// Sets a counter that mirrors a total kept elsewhere.
fn mirror(c: &Counter, total: u64) {
    c.inc_by(total.saturating_sub(c.get()));
}

fn gauge(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut r = Registry::with_prefix("tidemark");
        let m = Metrics {
            commit_lag: Family::new_with_constructor(lag_histogram as fn() -> Histogram),
            commit_lag_now: Family::default(),
            commit_lag_bytes: Family::default(),
            replicated_bytes: Family::default(),
            packets: Family::default(),
            retransmits: Family::default(),
            rtt: Family::default(),
            dirty_bytes: Family::default(),
            written_seq: Family::default(),
            acked_seq: Family::default(),
            head_seq: Family::default(),
            applied_seq: Family::default(),
            pair_state: Family::default(),
            sync_total: Family::default(),
            sync_copied: Family::default(),
            rpo_exceeded: Family::default(),
            pacing_delay: Family::default(),
            paced_writes: Family::default(),
            rpo_target: Family::default(),
            group_lag: Family::default(),
            group_rpo_exceeded: Family::default(),
            journal_used: Family::default(),
            journal_size: Family::default(),
            peer_up: Family::default(),
            link_bytes_out: Family::default(),
            link_bytes_in: Family::default(),
            link_dropped: Family::default(),
            failed: Family::default(),
            registry: Registry::default(),
        };
        r.register(
            "commit_lag_seconds",
            "Commit lag at the secondary (now minus the pair's commit limit), sampled every 500 ms",
            m.commit_lag.clone(),
        );
        r.register(
            "commit_lag_current_seconds",
            "Commit lag at the secondary now: how far in the past the remote unit's cut is",
            m.commit_lag_now.clone(),
        );
        r.register(
            "commit_lag_bytes",
            "Data the remote does not hold safely yet (unacknowledged, estimated, plus dirty)",
            m.commit_lag_bytes.clone(),
        );
        r.register(
            "replicated_bytes",
            "Bytes of client writes shipped to the remote",
            m.replicated_bytes.clone(),
        );
        r.register(
            "packets",
            "Data packets sent, each counted once",
            m.packets.clone(),
        );
        r.register(
            "retransmits",
            "Extra transmissions of data packets",
            m.retransmits.clone(),
        );
        r.register(
            "rtt_seconds",
            "Smoothed round trip time of the pair's packets",
            m.rtt.clone(),
        );
        r.register(
            "dirty_bytes",
            "Bytes in dirty regions not yet resynced",
            m.dirty_bytes.clone(),
        );
        r.register(
            "written_seq",
            "Last sequence number written at the primary",
            m.written_seq.clone(),
        );
        r.register(
            "acked_seq",
            "Sequence number up to which the remote acknowledged durably",
            m.acked_seq.clone(),
        );
        r.register(
            "head_seq",
            "Run head: the remote unit holds every packet up to it",
            m.head_seq.clone(),
        );
        r.register(
            "applied_seq",
            "Sequence number up to which the remote unit applied",
            m.applied_seq.clone(),
        );
        r.register(
            "pair_state",
            "1 for the pair's current state at this end, 0 for the others",
            m.pair_state.clone(),
        );
        r.register(
            "sync_total_bytes",
            "Bytes the running or last copy (initial sync or resync) has to copy",
            m.sync_total.clone(),
        );
        r.register(
            "sync_copied_bytes",
            "Bytes the running or last copy has copied",
            m.sync_copied.clone(),
        );
        r.register(
            "rpo_exceeded",
            "1 while the pair's commit lag exceeds rpo_target_ms",
            m.rpo_exceeded.clone(),
        );
        r.register(
            "pacing_delay_seconds",
            "Write pacing: the delay a write acknowledgement completing now is held",
            m.pacing_delay.clone(),
        );
        r.register(
            "paced_writes",
            "Write pacing: writes whose acknowledgement was held",
            m.paced_writes.clone(),
        );
        r.register(
            "rpo_target_seconds",
            "The group's rpo_target_ms",
            m.rpo_target.clone(),
        );
        r.register(
            "group_commit_lag_seconds",
            "Now minus the group's released commit limit (at the orderer's system)",
            m.group_lag.clone(),
        );
        r.register(
            "group_rpo_exceeded",
            "1 while the group's commit lag exceeds rpo_target_ms (at the orderer's system)",
            m.group_rpo_exceeded.clone(),
        );
        r.register(
            "journal_used_bytes",
            "Bytes the journal's segment files take",
            m.journal_used.clone(),
        );
        r.register(
            "journal_size_bytes",
            "The journal's capacity",
            m.journal_size.clone(),
        );
        r.register(
            "peer_up",
            "1 while the peer system is heard from",
            m.peer_up.clone(),
        );
        r.register(
            "link_sent_bytes",
            "Bytes of datagrams sent",
            m.link_bytes_out.clone(),
        );
        r.register(
            "link_received_bytes",
            "Bytes of datagrams received",
            m.link_bytes_in.clone(),
        );
        r.register(
            "link_dropped_datagrams",
            "Datagrams dropped on arrival (unauthenticated, replayed, malformed, ...)",
            m.link_dropped.clone(),
        );
        r.register(
            "failed",
            "1 once a part of the system failed on its disk or journal (a secondary then \
             applies nothing more and keeps reporting until restarted; the reason is in \
             status)",
            m.failed.clone(),
        );
        Metrics { registry: r, ..m }
    }

    /// Takes the figures of `v` (one system's view).
    pub fn update(&self, v: &SystemView) {
        let sys = SystemLabels {
            system: v.system.clone(),
        };
        self.journal_used
            .get_or_create(&sys)
            .set(gauge(v.journal_used_bytes));
        self.failed
            .get_or_create(&sys)
            .set(i64::from(v.failed.is_some()));
        self.journal_size
            .get_or_create(&sys)
            .set(gauge(v.journal_size_bytes));
        if let Some(t) = v.rpo_target_ms {
            self.rpo_target.get_or_create(&sys).set(t as f64 / 1000.0);
        }
        if let Some(o) = &v.orderer {
            if let Some(l) = o.lag_ms {
                self.group_lag.get_or_create(&sys).set(l as f64 / 1000.0);
            }
            if let Some(x) = o.rpo_exceeded {
                self.group_rpo_exceeded.get_or_create(&sys).set(x as i64);
            }
        }
        mirror(&self.link_bytes_out.get_or_create(&sys), v.link.bytes_out);
        mirror(&self.link_bytes_in.get_or_create(&sys), v.link.bytes_in);
        mirror(&self.link_dropped.get_or_create(&sys), v.link.dropped);
        for (peer, up) in &v.peers {
            self.peer_up
                .get_or_create(&PeerLabels {
                    system: v.system.clone(),
                    peer: peer.clone(),
                })
                .set(*up as i64);
        }
        for p in &v.pairs {
            let l = PairLabels {
                system: v.system.clone(),
                pair: p.name.clone(),
            };
            let states: &[&str] = if p.end == "primary" {
                &PRIMARY_STATES
            } else {
                &SECONDARY_STATES
            };
            for s in states {
                self.pair_state
                    .get_or_create(&StateLabels {
                        system: v.system.clone(),
                        pair: p.name.clone(),
                        state: s.to_string(),
                    })
                    .set((p.state == *s) as i64);
            }
            let set = |f: &Family<PairLabels, Gauge>, x: Option<u64>| {
                if let Some(x) = x {
                    f.get_or_create(&l).set(gauge(x));
                }
            };
            set(&self.written_seq, p.written_seq);
            set(&self.acked_seq, p.acked_seq);
            set(&self.head_seq, p.head_seq);
            set(&self.applied_seq, p.applied_seq);
            set(&self.dirty_bytes, p.dirty_bytes);
            set(&self.commit_lag_bytes, p.lag_bytes);
            set(&self.sync_total, p.sync.as_ref().map(|s| s.total_bytes));
            set(&self.sync_copied, p.sync.as_ref().map(|s| s.copied_bytes));
            set(&self.rpo_exceeded, p.rpo_exceeded.map(u64::from));
            if let Some(b) = p.bytes {
                mirror(&self.replicated_bytes.get_or_create(&l), b);
            }
            if let Some(n) = p.packets {
                mirror(&self.packets.get_or_create(&l), n);
            }
            if let Some(n) = p.retransmits {
                mirror(&self.retransmits.get_or_create(&l), n);
            }
            if let Some(ms) = p.rtt_ms {
                self.rtt.get_or_create(&l).set(ms / 1000.0);
            }
            if let Some(ms) = p.pacing_delay_ms {
                self.pacing_delay.get_or_create(&l).set(ms / 1000.0);
            }
            if let Some(n) = p.paced_writes {
                mirror(&self.paced_writes.get_or_create(&l), n);
            }
            if let Some(ms) = p.lag_ms {
                let s = ms as f64 / 1000.0;
                self.commit_lag.get_or_create(&l).observe(s);
                self.commit_lag_now.get_or_create(&l).set(s);
            }
        }
    }

    /// The metrics in Prometheus text format 0.0.4.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry);
        out
    }
}

/// The `Content-Type` of [`Metrics::encode`]'s text.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// The longest request head read.
const MAX_HEAD: usize = 8192;
/// How long a client may take to send its request.
const HEAD_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves `metrics` over HTTP/1 on `listener` until the task is dropped: `GET /metrics`
/// (or `HEAD`) answers the text format, any other path 404, any other method 405; one
/// request per connection (`Connection: close`).
pub async fn serve(listener: tokio::net::TcpListener, metrics: Arc<Metrics>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(HEAD_TIMEOUT, answer(stream, metrics)).await;
        });
    }
}

async fn answer(mut stream: tokio::net::TcpStream, metrics: Arc<Metrics>) -> std::io::Result<()> {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        head.extend_from_slice(&buf[..n]);
        if head.len() > MAX_HEAD {
            return respond(&mut stream, "431 Request Header Fields Too Large", "", "").await;
        }
    }
    let line = head.split(|&b| b == b'\r').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split(' ');
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    match (method, path) {
        ("GET", "/metrics") => {
            respond(&mut stream, "200 OK", CONTENT_TYPE, &metrics.encode()).await
        }
        ("HEAD", "/metrics") => {
            let body = metrics.encode();
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: {CONTENT_TYPE}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            stream.write_all(head.as_bytes()).await?;
            stream.shutdown().await
        }
        ("GET" | "HEAD", _) => {
            respond(&mut stream, "404 Not Found", "text/plain", "try /metrics\n").await
        }
        _ => {
            respond(
                &mut stream,
                "405 Method Not Allowed",
                "text/plain",
                "GET only\n",
            )
            .await
        }
    }
}

async fn respond(
    stream: &mut tokio::net::TcpStream,
    status: &str,
    content_type: &str,
    body: &str,
) -> std::io::Result<()> {
    let text = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(text.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::view::{PairView, SystemView};

    #[test]
    fn counters_mirror_totals_and_names_carry_units() {
        let m = Metrics::new();
        let mut v = SystemView {
            system: "site-a".into(),
            role: "primary".into(),
            journal_used_bytes: 4096,
            pairs: vec![PairView {
                name: "log".into(),
                end: "primary".into(),
                state: "replicating".into(),
                bytes: Some(1000),
                retransmits: Some(3),
                written_seq: Some(7),
                pacing_delay_ms: Some(12.5),
                paced_writes: Some(40),
                ..PairView::default()
            }],
            ..SystemView::default()
        };
        m.update(&v);
        v.pairs[0].bytes = Some(2500);
        m.update(&v);
        let text = m.encode();
        for line in [
            "tidemark_replicated_bytes_total{system=\"site-a\",pair=\"log\"} 2500",
            "tidemark_retransmits_total{system=\"site-a\",pair=\"log\"} 3",
            "tidemark_written_seq{system=\"site-a\",pair=\"log\"} 7",
            "tidemark_journal_used_bytes{system=\"site-a\"} 4096",
            "tidemark_pair_state{system=\"site-a\",pair=\"log\",state=\"replicating\"} 1",
            "tidemark_pair_state{system=\"site-a\",pair=\"log\",state=\"tracking\"} 0",
            "tidemark_pacing_delay_seconds{system=\"site-a\",pair=\"log\"} 0.0125",
            "tidemark_paced_writes_total{system=\"site-a\",pair=\"log\"} 40",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        }
    }
}
