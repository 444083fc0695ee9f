//! Per-datagram cost of sealing and opening one MTU-sized datagram (the link's hot path).
//! `cargo run --release --example seal_cost [iterations]`
use bytes::Bytes;
use std::time::Instant;
use tidemark::seal::{Opener, Sealer, Session};
use tidemark::wire::{self, Frame};
use tidemark::{Message, Offset, PairId, Payload, Seq, Stamp, SystemId, Timestamp};

fn main() {
    let n: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(200_000);
    let key = [7u8; 32];
    let session = Session {
        epoch: 1,
        nonce: [3; 16],
    };
    let frame = Frame {
        from: SystemId(0),
        to: SystemId(1),
        messages: vec![Message::Data(vec![tidemark::Packet {
            pair: PairId(1),
            stamp: Stamp::new(Timestamp(1), Seq(1)),
            payload: Payload::Write {
                offset: Offset(0),
                data: Bytes::from(vec![0xa5; 1300]),
            },
        }])],
    };
    let plain = wire::encode(&frame);
    let mut s = Sealer::new(&key, session);
    let mut o = Opener::new(&key, SystemId(1), 65_507);
    let t = Instant::now();
    let mut sealed = Vec::new();
    for _ in 0..n {
        sealed = s.seal_bytes(&plain);
    }
    let seal_ns = t.elapsed().as_nanos() as f64 / n as f64;
    let mut ok = 0u64;
    let t = Instant::now();
    let mut open_ns = 0.0;
    for _ in 0..n {
        let mut d = s.seal_bytes(&plain);
        let t1 = Instant::now();
        if o.open_in_place(&mut d).is_ok() {
            ok += 1;
        }
        open_ns += t1.elapsed().as_nanos() as f64;
    }
    let total = t.elapsed().as_nanos() as f64 / n as f64;
    println!(
        "{} B datagram: seal {:.0} ns, open (incl. decode) {:.0} ns, seal+open {:.0} ns; {ok}/{n} opened",
        sealed.len(),
        seal_ns,
        open_ns / n as f64,
        total
    );
}
