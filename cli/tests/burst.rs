//! Bursts a path cannot carry: a plain UDP relay with the kernel's default socket
//! receive buffer (`rmem_default`, 208 KiB here) between the systems, as a NAT box or
//! VPN gateway would be. A single 1 MiB write at the default `mtu = 1400` leaves as
//! about 830 datagrams; unpaced, the relay keeps the first couple of hundred and drops
//! the same tail on every retransmission, so the write never reached the remote.
//!
//! Here the writes must reach the remote unit and be applied (bounded wait against a
//! hung test, never a measurement), and the remote unit must equal the local one.
//! The seed is printed; `TIDEMARK_SEED=<n>` replays one.

mod common;
use common::dependent::*;
use common::*;
use rand::{RngCore, SeedableRng};
use std::collections::BTreeMap;
use tidemark::nbd::consts::CMD_WRITE;
use tidemark::PairId;

/// One 1 MiB write then one 64 KiB write on export "data" through plain relays; both
/// are applied at the remote and the units are equal.
#[test]
fn a_large_write_crosses_a_relay_with_a_default_socket_buffer() {
    let seed = seed_or(20261202);
    eprintln!("seed {seed}");
    let (site, port) = Site::with_nbd_proxied(true);
    // Plain relays: no loss, no delay; only their default receive buffers.
    let relays = site.relays(&["--seed", &seed.to_string()]);
    let secondary = site.secondary();
    let mut primary = site.primary();
    wait_tcp(port, &mut primary, PATIENCE);

    let mut rng = rand_pcg::Pcg64Mcg::seed_from_u64(seed);
    let mut big = vec![0u8; 1 << 20];
    rng.fill_bytes(&mut big);
    let mut small = vec![0u8; 64 << 10];
    rng.fill_bytes(&mut small);
    let mut c = Client::connect(port, "data");
    c.request(0, CMD_WRITE, 0, big.len() as u32, &big);
    c.reply("the 1 MiB write");
    c.request(0, CMD_WRITE, 2 << 20, small.len() as u32, &small);
    c.reply("the 64 KiB write after it");
    c.disconnect();

    // "data" is the second pair: both its writes applied at the remote.
    let want = BTreeMap::from([(PairId(1), 2)]);
    site.wait_applied("site-b", &want, std::time::Duration::from_secs(60));
    let a = stop(primary);
    let b = stop(secondary);
    for r in relays {
        kill9(r);
    }
    assert!(a.status.success(), "primary: {a:?}");
    assert!(b.status.success(), "secondary: {b:?}");
    let local = std::fs::read(site.path("run/site-a/data.img")).expect("local unit");
    let remote = std::fs::read(site.path("run/site-b/data.img")).expect("remote unit");
    assert_eq!(local[..1 << 20], big[..], "seed {seed}: the local unit");
    assert!(
        local == remote,
        "seed {seed}: remote differs from local at {:?}",
        first_difference(&local, &remote)
    );
}
