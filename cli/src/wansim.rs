//! `tidemark wan-sim`: a one-direction UDP impairment proxy for testing a real set-up:
//! every datagram arriving at `listen` is forwarded to `forward`, unless the seeded
//! network drops it; it may also be duplicated, delayed, reordered or corrupted. With a
//! rate it is also a bottleneck: datagrams leave one after another at that many bytes
//! per second, through a drop-tail queue that holds at most `queue` worth of sending.

use rand::{Rng, SeedableRng};
use rand_pcg::Pcg64Mcg;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tidemark_actors::net::impair::Impairment;
use tokio::net::UdpSocket;

/// What the proxy does to traffic.
#[derive(Clone, Copy, Debug)]
pub struct WanSim {
    pub listen: SocketAddr,
    pub forward: SocketAddr,
    pub impair: Impairment,
    /// Probability that a forwarded datagram has one random bit flipped.
    pub corrupt: f64,
    pub seed: u64,
    /// Bytes per second through the bottleneck (0: no bottleneck).
    pub rate: u64,
    /// The bottleneck's queue: a datagram that would wait longer than this to leave is
    /// dropped (tail drop).
    pub queue: std::time::Duration,
}

/// Counters of the proxy.
#[derive(Debug, Default)]
pub struct WanCounters {
    pub received: AtomicU64,
    pub forwarded: AtomicU64,
    pub dropped: AtomicU64,
    pub duplicated: AtomicU64,
    pub corrupted: AtomicU64,
    /// Dropped by the bottleneck's full queue.
    pub queue_dropped: AtomicU64,
    /// The receive buffer the kernel granted the listening socket (bytes). What
    /// overflows it is dropped by the kernel, apart from `dropped` (the configured
    /// loss): `/proc/net/udp` shows it in the socket's `drops` column.
    pub recv_buffer: AtomicU64,
}

/// The socket buffers wan-sim asks for, as the daemons do (`net.core.rmem_max` and
/// `wmem_max` may cap them): with the kernel's default of about 208 KiB, a burst the
/// daemons' paced link sends at loopback speed overflowed the proxy's own socket and
/// was dropped on top of the configured loss (5,634 of 130,929 datagrams in one
/// `scripts/replication.sh` loss5 run, more than the 5 % configured loss's 6,280).
pub const SOCKET_BUFFER: usize = 8 << 20;

impl WanSim {
    pub fn validate(&self) -> Result<(), tidemark_actors::EngineError> {
        self.impair.validate()?;
        if !(self.corrupt.is_finite() && (0.0..=1.0).contains(&self.corrupt)) {
            return Err(tidemark_actors::EngineError::Impairment(format!(
                "corrupt = {} is outside [0, 1]",
                self.corrupt
            )));
        }
        Ok(())
    }

    /// Binds the listening socket (errors here are the caller's to report) and asks for
    /// [`SOCKET_BUFFER`] bytes of buffer on both sockets (a smaller grant is not an
    /// error: `WanCounters::recv_buffer` shows it).
    pub async fn bind(&self) -> std::io::Result<(UdpSocket, UdpSocket)> {
        let inbound = UdpSocket::bind(self.listen).await?;
        let _ = socket2::SockRef::from(&inbound).set_recv_buffer_size(SOCKET_BUFFER);
        let any: SocketAddr = if self.forward.is_ipv4() {
            "0.0.0.0:0".parse().map_err(std::io::Error::other)?
        } else {
            "[::]:0".parse().map_err(std::io::Error::other)?
        };
        let outbound = UdpSocket::bind(any).await?;
        let _ = socket2::SockRef::from(&outbound).set_send_buffer_size(SOCKET_BUFFER);
        Ok((inbound, outbound))
    }

    /// Forwards until the task is dropped.
    pub async fn run(self, inbound: UdpSocket, outbound: UdpSocket, counters: Arc<WanCounters>) {
        counters.recv_buffer.store(
            socket2::SockRef::from(&inbound)
                .recv_buffer_size()
                .map_or(0, |n| n as u64),
            Ordering::Relaxed,
        );
        let outbound = Arc::new(outbound);
        let mut rng = Pcg64Mcg::seed_from_u64(self.seed);
        let mut buf = vec![0u8; 65_536];
        let mut fates = Vec::new();
        // The bottleneck: datagrams with their departure times, in order, to a task
        // that sends each at its time (dropped with this future, so is the task).
        let (tx, mut rx) =
            tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
        let mut next_free = tokio::time::Instant::now();
        let _bottleneck = if self.rate > 0 {
            let (sim, out, c) = (self, outbound.clone(), counters.clone());
            Some(AbortOnDrop(tokio::spawn(async move {
                let mut rng = Pcg64Mcg::seed_from_u64(sim.seed ^ 0xb0_77_1e);
                let mut fates = Vec::new();
                while let Some((at, d)) = rx.recv().await {
                    tokio::time::sleep_until(at).await;
                    sim.emit(d, &mut rng, &mut fates, &out, &c).await;
                }
            })))
        } else {
            None
        };
        loop {
            let n = match inbound.recv_from(&mut buf).await {
                Ok((n, _)) => n,
                Err(_) => continue,
            };
            counters.received.fetch_add(1, Ordering::Relaxed);
            if self.rate > 0 {
                let now = tokio::time::Instant::now();
                let start = next_free.max(now);
                if start - now > self.queue {
                    counters.queue_dropped.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                next_free = start + std::time::Duration::from_secs_f64(n as f64 / self.rate as f64);
                let _ = tx.send((next_free, buf[..n].to_vec()));
                continue;
            }
            self.emit(
                buf[..n].to_vec(),
                &mut rng,
                &mut fates,
                &outbound,
                &counters,
            )
            .await;
        }
    }

    /// Drops, duplicates, delays, corrupts and sends one datagram.
    async fn emit(
        &self,
        data: Vec<u8>,
        rng: &mut Pcg64Mcg,
        fates: &mut Vec<std::time::Duration>,
        outbound: &Arc<UdpSocket>,
        counters: &Arc<WanCounters>,
    ) {
        self.impair.fate(rng, fates);
        match fates.len() {
            0 => {
                counters.dropped.fetch_add(1, Ordering::Relaxed);
                return;
            }
            1 => {}
            _ => {
                counters.duplicated.fetch_add(1, Ordering::Relaxed);
            }
        }
        for delay in fates.iter().copied() {
            let mut d = data.clone();
            if self.corrupt > 0.0 && rng.random_bool(self.corrupt) && !d.is_empty() {
                let bit = rng.random_range(0..d.len() * 8);
                d[bit / 8] ^= 1 << (bit % 8);
                counters.corrupted.fetch_add(1, Ordering::Relaxed);
            }
            let out = outbound.clone();
            let to = self.forward;
            let c = counters.clone();
            if delay.is_zero() {
                if out.send_to(&d, to).await.is_ok() {
                    c.forwarded.fetch_add(1, Ordering::Relaxed);
                }
            } else {
                tokio::spawn(async move {
                    tokio::time::sleep(delay).await;
                    if out.send_to(&d, to).await.is_ok() {
                        c.forwarded.fetch_add(1, Ordering::Relaxed);
                    }
                });
            }
        }
    }
}

/// Aborts the task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
