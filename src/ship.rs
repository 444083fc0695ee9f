//! The send side of one pair: hands out sequence numbers, keeps every packet until the
//! remote unit acknowledges it, retransmits what goes unacknowledged, and says when an
//! idle pair owes a heartbeat.
//!
//! Invariants kept by [`Sender`]:
//! - sequence numbers are 1, 2, 3, ... with no gaps, and each packet's time stamp is
//!   greater than the one before (the caller stamps from the hybrid clock, in order);
//! - a packet is forgotten only when an acknowledgement covers it cumulatively (I3);
//! - a heartbeat's stamp promises no later packet has a time stamp at or below it.

use crate::packet::{Ack, Heartbeat, Packet, Payload};
use crate::types::{PairId, Seq, Stamp, Timestamp};
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Round-trip estimation and retransmission timeout (RFC 6298 in spirit).
#[derive(Clone, Debug)]
pub struct Rtt {
    srtt: Option<Duration>,
    rttvar: Duration,
    min_rto: Duration,
    max_rto: Duration,
    initial: Duration,
    backoff: u32,
}

impl Rtt {
    pub fn new(initial: Duration, min_rto: Duration, max_rto: Duration) -> Self {
        Rtt {
            srtt: None,
            rttvar: Duration::ZERO,
            min_rto,
            max_rto,
            initial,
            backoff: 0,
        }
    }

    /// A round trip measured on a packet sent exactly once (Karn's rule).
    pub fn sample(&mut self, rtt: Duration) {
        self.backoff = 0;
        match self.srtt {
            None => {
                self.srtt = Some(rtt);
                self.rttvar = rtt / 2;
            }
            Some(srtt) => {
                let diff = srtt.abs_diff(rtt);
                self.rttvar = (self.rttvar * 3 + diff) / 4;
                self.srtt = Some((srtt * 7 + rtt) / 8);
            }
        }
    }

    /// The path delivers again (an acknowledgement moved forward): stop backing off.
    pub fn reset_backoff(&mut self) {
        self.backoff = 0;
    }

    /// How long a packet may trail one sent after it before it counts as lost.
    pub fn reorder_window(&self) -> Duration {
        let srtt = self.srtt.unwrap_or(self.initial);
        srtt + (srtt / 4).max(Duration::from_millis(1))
    }

    /// A retransmission timer fired: back off.
    pub fn on_timeout(&mut self) {
        self.backoff = (self.backoff + 1).min(16);
    }

    pub fn srtt(&self) -> Option<Duration> {
        self.srtt
    }

    /// The current retransmission timeout.
    pub fn rto(&self) -> Duration {
        let base = match self.srtt {
            None => self.initial,
            Some(srtt) => srtt + (self.rttvar * 4).max(Duration::from_micros(500)),
        };
        (base.max(self.min_rto) * (1u32 << self.backoff)).min(self.max_rto)
    }
}

impl Default for Rtt {
    fn default() -> Self {
        Rtt::new(
            Duration::from_millis(50),
            Duration::from_millis(2),
            Duration::from_secs(2),
        )
    }
}

#[derive(Debug)]
struct InFlight {
    packet: Packet,
    /// When it was last put on the wire; `None` if not yet.
    sent: Option<Instant>,
    transmissions: u32,
    /// The receiver holds it (selectively acknowledged): no retransmission.
    sacked: bool,
    /// Deemed lost (a later packet arrived long enough ago): retransmit at once.
    lost: bool,
}

/// Counters of the send side.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SendStats {
    pub packets: u64,
    pub retransmits: u64,
    pub heartbeats: u64,
    pub acked: u64,
}

/// The send side of one pair.
#[derive(Debug)]
pub struct Sender {
    pair: PairId,
    last: Stamp,
    acked: Seq,
    /// The stamp of the last packet acknowledged cumulatively.
    acked_stamp: Stamp,
    /// Packets above this seq are stamped but not yet written locally: held off the wire.
    writable: Seq,
    unacked: VecDeque<InFlight>,
    /// Index into `unacked` of the first packet never sent.
    unsent: usize,
    unacked_bytes: usize,
    rtt: Rtt,
    heartbeat_every: Duration,
    last_tx: Option<Instant>,
    /// No retransmission is due before this (a lower bound; `None`: nothing in flight).
    retransmit_at: Option<Instant>,
    /// Some packet is marked lost.
    lost_pending: bool,
    stats: SendStats,
}

impl Sender {
    /// A sender whose last handed-out stamp is `last` (`Stamp::ZERO` for a new pair; the
    /// recovered stamp after a restart), with everything up to `acked` acknowledged.
    pub fn new(pair: PairId, last: Stamp, heartbeat_every: Duration, rtt: Rtt) -> Self {
        Sender {
            pair,
            last,
            acked: last.seq,
            acked_stamp: last,
            writable: last.seq,
            unacked: VecDeque::new(),
            unsent: 0,
            unacked_bytes: 0,
            rtt,
            heartbeat_every,
            last_tx: None,
            retransmit_at: None,
            lost_pending: false,
            stats: SendStats::default(),
        }
    }

    pub fn pair(&self) -> PairId {
        self.pair
    }

    /// The stamp of the last packet acknowledged cumulatively (what a primary's journal
    /// may release).
    pub fn acked_stamp(&self) -> Stamp {
        self.acked_stamp
    }

    /// The last stamp handed out (data) or promised (heartbeat).
    pub fn last(&self) -> Stamp {
        self.last
    }

    /// Everything up to this seq is acknowledged.
    pub fn acked(&self) -> Seq {
        self.acked
    }

    pub fn unacked_len(&self) -> usize {
        self.unacked.len()
    }

    pub fn unacked_bytes(&self) -> usize {
        self.unacked_bytes
    }

    pub fn stats(&self) -> SendStats {
        self.stats
    }

    pub fn rtt(&self) -> &Rtt {
        &self.rtt
    }

    /// Stamps a payload with the next sequence number and the time stamp `ts`, which must
    /// come from the hybrid clock after every earlier stamp of this pair; it may go on the
    /// wire at once.
    pub fn push(&mut self, ts: Timestamp, payload: Payload) -> Stamp {
        let stamp = self.push_held(ts, payload);
        self.writable = stamp.seq;
        stamp
    }

    /// As [`Sender::push`], but the packet stays off the wire until
    /// [`Sender::mark_written`] covers it (the remote never gets a write the primary has
    /// not finished writing).
    pub fn push_held(&mut self, ts: Timestamp, payload: Payload) -> Stamp {
        debug_assert!(ts > self.last.ts, "time stamps must increase within a pair");
        let stamp = Stamp::new(ts.max(Timestamp(self.last.ts.0 + 1)), self.last.seq.next());
        self.last = stamp;
        self.unacked_bytes += payload.wire_len();
        self.unacked.push_back(InFlight {
            packet: Packet {
                pair: self.pair,
                stamp,
                payload,
            },
            sent: None,
            transmissions: 0,
            sacked: false,
            lost: false,
        });
        self.stats.packets += 1;
        stamp
    }

    /// Lets held packets up to `seq` go on the wire.
    pub fn mark_written(&mut self, seq: Seq) {
        self.writable = self.writable.max(seq.min(self.last.seq));
    }

    /// Re-queues a packet recovered from the journal after a restart (already stamped and
    /// written); packets must come in `seq` order, above the released point.
    pub fn push_recovered(&mut self, packet: Packet) {
        let newest = self
            .unacked
            .back()
            .map_or(self.acked, |f| f.packet.stamp.seq);
        if packet.stamp.seq <= newest {
            return; // released already, or a duplicate
        }
        if packet.stamp > self.last {
            self.last = packet.stamp;
        }
        self.writable = self.writable.max(packet.stamp.seq);
        self.unacked_bytes += packet.payload.wire_len();
        self.unacked.push_back(InFlight {
            packet,
            sent: None,
            transmissions: 0,
            sacked: false,
            lost: false,
        });
    }

    /// Appends to `out` the packets to put on the wire now: first transmissions, then
    /// retransmissions whose timeout has passed. Returns how many were retransmissions.
    pub fn poll_transmit(&mut self, now: Instant, out: &mut Vec<Packet>) -> usize {
        let mut retransmits = 0;
        if self.lost_pending {
            // Fast retransmission of what selective acknowledgements showed missing.
            self.lost_pending = false;
            for f in self.unacked.iter_mut().take(self.unsent) {
                if f.lost {
                    f.lost = false;
                    f.sent = Some(now);
                    f.transmissions += 1;
                    out.push(f.packet.clone());
                    retransmits += 1;
                }
            }
        }
        let fast = retransmits;
        if self.retransmit_at.is_some_and(|t| now >= t) {
            let rto = self.rtt.rto();
            for f in self.unacked.iter_mut().take(self.unsent) {
                match f.sent {
                    Some(sent) if !f.sacked && now.saturating_duration_since(sent) >= rto => {
                        f.sent = Some(now);
                        f.transmissions += 1;
                        out.push(f.packet.clone());
                        retransmits += 1;
                    }
                    _ => {}
                }
            }
            if retransmits > fast {
                self.rtt.on_timeout();
            }
            self.retransmit_at = self.oldest_unsacked().map(|s| s + self.rtt.rto());
        }
        let mut fresh = 0;
        for f in self.unacked.iter_mut().skip(self.unsent) {
            if f.packet.stamp.seq > self.writable {
                break;
            }
            f.sent = Some(now);
            f.transmissions += 1;
            out.push(f.packet.clone());
            fresh += 1;
        }
        self.unsent += fresh;
        if fresh > 0 && self.retransmit_at.is_none() {
            self.retransmit_at = Some(now + self.rtt.rto());
        }
        if fresh + retransmits > 0 {
            self.last_tx = Some(now);
        }
        self.stats.retransmits += retransmits as u64;
        retransmits
    }

    fn oldest_unsacked(&self) -> Option<Instant> {
        self.unacked
            .iter()
            .take(self.unsent)
            .filter(|f| !f.sacked)
            .filter_map(|f| f.sent)
            .min()
    }

    /// Takes an acknowledgement: frees what it covers cumulatively, marks what it covers
    /// selectively, samples the round trip. Returns the bytes freed.
    pub fn handle_ack(&mut self, now: Instant, ack: &Ack) -> usize {
        if ack.pair != self.pair || ack.cum > self.last.seq {
            return 0; // not ours, or acknowledges what we never sent: ignore
        }
        let mut freed = 0;
        // Round-trip sample: the newest packet this acknowledgement newly covers, if it
        // was sent once (Karn). Packets held behind a hole and only now acknowledged
        // cumulatively were covered earlier by a SACK, so they give no (inflated) sample.
        let mut sample: Option<(Seq, Instant)> = None;
        let mut consider = |f: &InFlight| {
            if f.transmissions == 1 && !f.sacked {
                if let Some(sent) = f.sent {
                    if sample.is_none_or(|(s, _)| f.packet.stamp.seq > s) {
                        sample = Some((f.packet.stamp.seq, sent));
                    }
                }
            }
        };
        while let Some(f) = self.unacked.front() {
            if f.packet.stamp.seq > ack.cum {
                break;
            }
            consider(f);
            freed += f.packet.payload.wire_len();
            self.acked_stamp = f.packet.stamp;
            self.unacked.pop_front();
            self.unsent = self.unsent.saturating_sub(1);
            self.stats.acked += 1;
        }
        if ack.cum > self.acked {
            self.acked = ack.cum;
            self.rtt.reset_backoff();
        }
        if !ack.sack.is_empty() {
            let mut ranges = ack.sack.iter().peekable();
            for f in self.unacked.iter_mut().take(self.unsent) {
                let seq = f.packet.stamp.seq;
                while ranges.peek().is_some_and(|r| r.last < seq) {
                    ranges.next();
                }
                match ranges.peek() {
                    Some(r) if r.contains(seq) => {
                        consider(f);
                        f.sacked = true;
                        f.lost = false;
                    }
                    Some(_) => {}
                    None => break,
                }
            }
            // A packet below the highest selectively acknowledged one, sent more than a
            // reordering window ago, is lost: the receiver holds later ones.
            let highest = ack.sack.iter().map(|r| r.last).max().unwrap_or(Seq::ZERO);
            let window = self.rtt.reorder_window();
            for f in self.unacked.iter_mut().take(self.unsent) {
                if f.packet.stamp.seq >= highest {
                    break;
                }
                let old = f
                    .sent
                    .is_some_and(|s| now.saturating_duration_since(s) >= window);
                if !f.sacked && !f.lost && old {
                    f.lost = true;
                    self.lost_pending = true;
                }
            }
        }
        if let Some((_, sent)) = sample {
            self.rtt.sample(now.saturating_duration_since(sent));
        }
        self.unacked_bytes -= freed;
        freed
    }

    /// Whether the pair has been silent long enough to owe a heartbeat.
    pub fn heartbeat_due(&self, now: Instant) -> bool {
        match self.last_tx {
            None => true,
            Some(t) => now.saturating_duration_since(t) >= self.heartbeat_every,
        }
    }

    /// A heartbeat stamped `ts` (fresh from the hybrid clock): promises that no packet
    /// after the last one handed out has a time stamp at or below `ts`.
    pub fn heartbeat(&mut self, now: Instant, ts: Timestamp) -> Heartbeat {
        let ts = ts.max(Timestamp(self.last.ts.0 + 1));
        self.last = Stamp::new(ts, self.last.seq);
        self.last_tx = Some(now);
        self.stats.heartbeats += 1;
        Heartbeat {
            pair: self.pair,
            stamp: self.last,
        }
    }

    /// When `poll_transmit` or a heartbeat will next have something to do (`None`:
    /// nothing in flight and nothing ever sent, so a heartbeat is due whenever asked).
    pub fn poll_timeout(&self) -> Option<Instant> {
        let hb = self.last_tx.map(|t| t + self.heartbeat_every);
        match (self.retransmit_at, hb) {
            (Some(r), Some(h)) => Some(r.min(h)),
            (r, h) => r.or(h),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::SeqRange;
    use crate::types::Offset;
    use bytes::Bytes;

    fn w(n: u8) -> Payload {
        Payload::Write {
            offset: Offset(0),
            data: Bytes::from(vec![n; 8]),
        }
    }

    fn sender() -> Sender {
        Sender::new(
            PairId(1),
            Stamp::ZERO,
            Duration::from_millis(10),
            Rtt::new(
                Duration::from_millis(20),
                Duration::from_millis(2),
                Duration::from_secs(1),
            ),
        )
    }

    fn ack(cum: u64, sack: &[(u64, u64)]) -> Ack {
        Ack {
            pair: PairId(1),
            cum: Seq(cum),
            sack: sack
                .iter()
                .map(|(a, b)| SeqRange {
                    first: Seq(*a),
                    last: Seq(*b),
                })
                .collect(),
        }
    }

    fn seqs(v: &[Packet]) -> Vec<u64> {
        v.iter().map(|p| p.stamp.seq.0).collect()
    }

    #[test]
    fn sequence_numbers_have_no_gaps() {
        let mut s = sender();
        let a = s.push(Timestamp(10), w(1));
        let b = s.push(Timestamp(11), w(2));
        assert_eq!((a.seq, b.seq), (Seq(1), Seq(2)));
        assert!(b.ts > a.ts);
    }

    #[test]
    fn retransmits_after_rto_only_unacked_unsacked() {
        let t0 = Instant::now();
        let mut s = sender();
        for i in 0..5 {
            s.push(Timestamp(10 + i), w(i as u8));
        }
        let mut out = vec![];
        assert_eq!(s.poll_transmit(t0, &mut out), 0);
        assert_eq!(seqs(&out), vec![1, 2, 3, 4, 5]);
        s.handle_ack(t0 + Duration::from_millis(1), &ack(2, &[(4, 4)]));
        out.clear();
        assert_eq!(s.poll_transmit(t0 + Duration::from_millis(5), &mut out), 0);
        assert!(out.is_empty(), "nothing due before the rto");
        let n = s.poll_transmit(t0 + Duration::from_millis(100), &mut out);
        assert_eq!(n, 2);
        assert_eq!(seqs(&out), vec![3, 5]);
        assert_eq!(s.stats().retransmits, 2);
    }

    #[test]
    fn ack_frees_and_samples_rtt() {
        let t0 = Instant::now();
        let mut s = sender();
        s.push(Timestamp(10), w(1));
        let mut out = vec![];
        s.poll_transmit(t0, &mut out);
        let freed = s.handle_ack(t0 + Duration::from_millis(8), &ack(1, &[]));
        assert!(freed > 0);
        assert_eq!(s.unacked_len(), 0);
        assert_eq!(s.unacked_bytes(), 0);
        assert_eq!(s.rtt().srtt(), Some(Duration::from_millis(8)));
    }

    #[test]
    fn bogus_ack_beyond_last_is_ignored() {
        let mut s = sender();
        s.push(Timestamp(10), w(1));
        assert_eq!(s.handle_ack(Instant::now(), &ack(7, &[])), 0);
        assert_eq!(s.unacked_len(), 1);
    }

    #[test]
    fn heartbeat_promises_last_seq() {
        let t0 = Instant::now();
        let mut s = sender();
        assert!(s.heartbeat_due(t0));
        s.push(Timestamp(10), w(1));
        let mut out = vec![];
        s.poll_transmit(t0, &mut out);
        assert!(!s.heartbeat_due(t0 + Duration::from_millis(5)));
        assert!(s.heartbeat_due(t0 + Duration::from_millis(10)));
        let hb = s.heartbeat(t0 + Duration::from_millis(10), Timestamp(50));
        assert_eq!(hb.stamp, Stamp::new(Timestamp(50), Seq(1)));
        let next = s.push(Timestamp(60), w(2));
        assert!(next.ts > hb.stamp.ts);
    }

    #[test]
    fn sack_hole_is_retransmitted_without_waiting_for_the_rto() {
        let t0 = Instant::now();
        let mut s = sender();
        for i in 0..4 {
            s.push(Timestamp(10 + i), w(i as u8));
        }
        let mut out = vec![];
        s.poll_transmit(t0, &mut out);
        // Right away, a hole is just reordering: no retransmission yet.
        s.handle_ack(t0 + Duration::from_micros(100), &ack(1, &[(3, 4)]));
        out.clear();
        assert_eq!(
            s.poll_transmit(t0 + Duration::from_micros(200), &mut out),
            0
        );
        // Well past the reordering window but before the rto: seq 2 is resent.
        let later = t0 + s.rtt().reorder_window() + Duration::from_micros(200);
        s.handle_ack(later, &ack(1, &[(3, 4)]));
        assert!(
            later < t0 + s.rtt().rto(),
            "test assumes the rto has not fired"
        );
        out.clear();
        assert_eq!(s.poll_transmit(later, &mut out), 1);
        assert_eq!(seqs(&out), vec![2]);
    }

    #[test]
    fn packets_held_behind_a_hole_give_no_inflated_rtt_sample() {
        let t0 = Instant::now();
        let mut s = sender();
        for i in 0..3 {
            s.push(Timestamp(10 + i), w(i as u8));
        }
        let mut out = vec![];
        s.poll_transmit(t0, &mut out);
        // 2 and 3 arrive at once (sample 1 ms); 1 is lost and resent much later.
        s.handle_ack(t0 + Duration::from_millis(1), &ack(0, &[(2, 3)]));
        assert_eq!(s.rtt().srtt(), Some(Duration::from_millis(1)));
        out.clear();
        s.poll_transmit(t0 + Duration::from_millis(500), &mut out);
        assert_eq!(seqs(&out), vec![1]);
        s.handle_ack(t0 + Duration::from_millis(501), &ack(3, &[]));
        assert_eq!(
            s.rtt().srtt(),
            Some(Duration::from_millis(1)),
            "no 500 ms sample"
        );
        assert_eq!(s.unacked_len(), 0);
    }

    #[test]
    fn held_packets_wait_until_written() {
        let t0 = Instant::now();
        let mut s = sender();
        s.push_held(Timestamp(10), w(1));
        s.push_held(Timestamp(11), w(2));
        let mut out = vec![];
        s.poll_transmit(t0, &mut out);
        assert!(out.is_empty());
        s.mark_written(Seq(1));
        s.poll_transmit(t0, &mut out);
        assert_eq!(seqs(&out), vec![1]);
        s.mark_written(Seq(9));
        out.clear();
        s.poll_transmit(t0, &mut out);
        assert_eq!(seqs(&out), vec![2]);
        s.handle_ack(t0, &ack(2, &[]));
        assert_eq!(s.acked_stamp(), Stamp::new(Timestamp(11), Seq(2)));
    }

    #[test]
    fn resume_after_restart_resends_live_packets() {
        let released = Stamp::new(Timestamp(50), Seq(5));
        let mut s = Sender::new(
            PairId(1),
            released,
            Duration::from_millis(10),
            Rtt::default(),
        );
        for seq in [4, 6, 7] {
            s.push_recovered(Packet {
                pair: PairId(1),
                stamp: Stamp::new(Timestamp(10 * seq), Seq(seq)),
                payload: w(seq as u8),
            });
        }
        let mut out = vec![];
        s.poll_transmit(Instant::now(), &mut out);
        assert_eq!(seqs(&out), vec![6, 7], "released packets are not resent");
        assert_eq!(s.last(), Stamp::new(Timestamp(70), Seq(7)));
        let next = s.push(Timestamp(80), w(8));
        assert_eq!(next.seq, Seq(8));
    }

    #[test]
    fn backoff_doubles_rto() {
        let mut r = Rtt::new(
            Duration::from_millis(10),
            Duration::from_millis(1),
            Duration::from_secs(1),
        );
        let a = r.rto();
        r.on_timeout();
        assert_eq!(r.rto(), a * 2);
        r.sample(Duration::from_millis(4));
        assert!(r.rto() < a * 2);
    }
}
