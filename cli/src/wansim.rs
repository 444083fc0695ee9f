//! `tidemark wan-sim`: a one-direction UDP impairment proxy for testing a real set-up:
//! every datagram arriving at `listen` is forwarded to `forward`, unless the seeded
//! network drops it; it may also be duplicated, delayed, reordered or corrupted.

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
}

/// Counters of the proxy.
#[derive(Debug, Default)]
pub struct WanCounters {
    pub received: AtomicU64,
    pub forwarded: AtomicU64,
    pub dropped: AtomicU64,
    pub duplicated: AtomicU64,
    pub corrupted: AtomicU64,
}

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

    /// Binds the listening socket (errors here are the caller's to report).
    pub async fn bind(&self) -> std::io::Result<(UdpSocket, UdpSocket)> {
        let inbound = UdpSocket::bind(self.listen).await?;
        let any: SocketAddr = if self.forward.is_ipv4() {
            "0.0.0.0:0".parse().map_err(std::io::Error::other)?
        } else {
            "[::]:0".parse().map_err(std::io::Error::other)?
        };
        let outbound = UdpSocket::bind(any).await?;
        Ok((inbound, outbound))
    }

    /// Forwards until the task is dropped.
    pub async fn run(self, inbound: UdpSocket, outbound: UdpSocket, counters: Arc<WanCounters>) {
        let outbound = Arc::new(outbound);
        let mut rng = Pcg64Mcg::seed_from_u64(self.seed);
        let mut buf = vec![0u8; 65_536];
        let mut fates = Vec::new();
        loop {
            let n = match inbound.recv_from(&mut buf).await {
                Ok((n, _)) => n,
                Err(_) => continue,
            };
            counters.received.fetch_add(1, Ordering::Relaxed);
            self.impair.fate(&mut rng, &mut fates);
            match fates.len() {
                0 => {
                    counters.dropped.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                1 => {}
                _ => {
                    counters.duplicated.fetch_add(1, Ordering::Relaxed);
                }
            }
            for delay in fates.iter().copied() {
                let mut d = buf[..n].to_vec();
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
}
