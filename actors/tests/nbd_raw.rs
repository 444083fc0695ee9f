//! The NBD server against a small raw-socket client: malformed handshakes, bad and
//! out-of-range requests, pipelining with out-of-order replies, and clients that
//! vanish. Every bad client ends only its own connection: a well-behaved client is
//! served afterwards, and nothing bad reaches the units.

#[path = "nbd_support/mod.rs"]
mod support;

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::Duration;
use support::{Harness, Unit};
use tidemark::nbd::consts::*;

const SIZE: u64 = 1 << 20;

fn harness() -> Harness {
    Harness::start(&[
        Unit {
            name: "disk0",
            size: SIZE,
            file: false,
        },
        Unit {
            name: "disk1",
            size: SIZE,
            file: true,
        },
    ])
}

/// A reply as the client decodes it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Rep {
    Simple {
        error: u32,
        cookie: u64,
        data: Vec<u8>,
    },
    Chunk {
        flags: u16,
        kind: u16,
        cookie: u64,
        payload: Vec<u8>,
    },
}

impl Rep {
    fn cookie(&self) -> u64 {
        match self {
            Rep::Simple { cookie, .. } | Rep::Chunk { cookie, .. } => *cookie,
        }
    }

    /// The NBD error carried, 0 on success.
    fn error(&self) -> u32 {
        match self {
            Rep::Simple { error, .. } => *error,
            Rep::Chunk { kind, payload, .. } if kind & 0x8000 != 0 => {
                u32::from_be_bytes(payload[..4].try_into().expect("error chunk"))
            }
            Rep::Chunk { .. } => 0,
        }
    }
}

struct Raw {
    s: TcpStream,
}

impl Raw {
    fn connect(h: &Harness) -> Raw {
        let s = TcpStream::connect(h.addr).expect("connect");
        // A safety net against a hung test, not a synchronisation.
        s.set_read_timeout(Some(Duration::from_secs(120)))
            .expect("timeout");
        s.set_nodelay(true).expect("nodelay");
        let mut r = Raw { s };
        let g = r.read(18);
        assert_eq!(g[..8], NBDMAGIC.to_be_bytes());
        assert_eq!(g[8..16], IHAVEOPT.to_be_bytes());
        assert_eq!(
            u16::from_be_bytes([g[16], g[17]]),
            FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES
        );
        r
    }

    fn send(&mut self, b: &[u8]) {
        self.s.write_all(b).expect("send");
    }

    fn read(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        self.s.read_exact(&mut v).expect("read from server");
        v
    }

    fn u16(&mut self) -> u16 {
        u16::from_be_bytes(self.read(2).try_into().expect("2 bytes"))
    }

    fn u32(&mut self) -> u32 {
        u32::from_be_bytes(self.read(4).try_into().expect("4 bytes"))
    }

    fn u64(&mut self) -> u64 {
        u64::from_be_bytes(self.read(8).try_into().expect("8 bytes"))
    }

    /// The server closed the connection (end of stream or reset).
    fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        match self.s.read(&mut b) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => matches!(
                e.kind(),
                ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted | ErrorKind::BrokenPipe
            ),
        }
    }

    /// The server closes the connection after sending at most `limit` more bytes.
    fn closed_after(&mut self, limit: usize) -> bool {
        let mut rest = Vec::new();
        match (&self.s).take(limit as u64 + 1).read_to_end(&mut rest) {
            Ok(_) => rest.len() <= limit,
            Err(e) => matches!(
                e.kind(),
                ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted | ErrorKind::BrokenPipe
            ),
        }
    }

    /// One option reply: (option, reply type, data).
    fn opt_reply(&mut self) -> (u32, u32, Vec<u8>) {
        assert_eq!(self.u64(), OPTION_REPLY_MAGIC);
        let option = self.u32();
        let kind = self.u32();
        let len = self.u32() as usize;
        (option, kind, self.read(len))
    }

    /// Option replies up to the final one (ACK or an error).
    fn opt_replies(&mut self) -> Vec<(u32, u32, Vec<u8>)> {
        let mut v = Vec::new();
        loop {
            let r = self.opt_reply();
            let last = r.1 == REP_ACK || r.1 & REP_FLAG_ERROR != 0;
            v.push(r);
            if last {
                return v;
            }
        }
    }

    /// Fixed newstyle, optionally structured replies, then `NBD_OPT_GO`; returns the
    /// export's size and transmission flags.
    fn go(h: &Harness, export: &str, structured: bool) -> (Raw, u64, u16) {
        let mut r = Raw::connect(h);
        r.send(&flags(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES));
        if structured {
            r.send(&opt(OPT_STRUCTURED_REPLY, &[]));
            assert_eq!(r.opt_replies().last().map(|x| x.1), Some(REP_ACK));
        }
        r.send(&opt(OPT_GO, &go_data(export)));
        let replies = r.opt_replies();
        assert_eq!(replies.last().map(|x| x.1), Some(REP_ACK), "{replies:?}");
        let info = replies
            .iter()
            .find(|x| x.1 == REP_INFO && x.2[..2] == INFO_EXPORT.to_be_bytes())
            .expect("NBD_INFO_EXPORT");
        let size = u64::from_be_bytes(info.2[2..10].try_into().expect("size"));
        let tflags = u16::from_be_bytes(info.2[10..12].try_into().expect("flags"));
        (r, size, tflags)
    }

    /// One reply; `read_lens` gives the data length of simple read replies.
    fn reply(&mut self, read_lens: &HashMap<u64, usize>) -> Rep {
        let magic = self.u32();
        if magic == SIMPLE_REPLY_MAGIC {
            let error = self.u32();
            let cookie = self.u64();
            let n = if error == 0 {
                read_lens.get(&cookie).copied().unwrap_or(0)
            } else {
                0
            };
            Rep::Simple {
                error,
                cookie,
                data: self.read(n),
            }
        } else {
            assert_eq!(magic, STRUCTURED_REPLY_MAGIC);
            let flags = self.u16();
            let kind = self.u16();
            let cookie = self.u64();
            let len = self.u32() as usize;
            Rep::Chunk {
                flags,
                kind,
                cookie,
                payload: self.read(len),
            }
        }
    }
}

fn flags(f: u32) -> Vec<u8> {
    f.to_be_bytes().to_vec()
}

fn opt(option: u32, data: &[u8]) -> Vec<u8> {
    let mut v = IHAVEOPT.to_be_bytes().to_vec();
    v.extend(option.to_be_bytes());
    v.extend((data.len() as u32).to_be_bytes());
    v.extend(data);
    v
}

fn go_data(name: &str) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend(name.as_bytes());
    d.extend(0u16.to_be_bytes());
    d
}

fn req(flags: u16, kind: u16, cookie: u64, offset: u64, len: u32, data: &[u8]) -> Vec<u8> {
    let mut v = REQUEST_MAGIC.to_be_bytes().to_vec();
    v.extend(flags.to_be_bytes());
    v.extend(kind.to_be_bytes());
    v.extend(cookie.to_be_bytes());
    v.extend(offset.to_be_bytes());
    v.extend(len.to_be_bytes());
    v.extend(data);
    v
}

/// Sends `bytes` from another thread (the server answers while it is still reading)
/// and checks that `n` requests all succeed, each answered once.
fn send_and_expect_success(c: &mut Raw, bytes: Vec<u8>, n: usize) {
    let writer = {
        let mut s = c.s.try_clone().expect("clone");
        std::thread::spawn(move || s.write_all(&bytes).expect("send"))
    };
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..n {
        let r = c.reply(&HashMap::new());
        assert_eq!(r.error(), 0, "{r:?}");
        assert!(seen.insert(r.cookie()), "one answer per request");
    }
    writer.join().expect("writer");
}

/// A well-behaved client still gets served: write, flush, read back.
fn still_serving(h: &Harness, export: &str, at: u64) {
    let (mut c, size, _) = Raw::go(h, export, true);
    assert_eq!(size, SIZE);
    // Requests in flight together are not ordered: the read waits for the write's reply.
    c.send(&req(0, CMD_WRITE, 1, at, 5, b"alive"));
    c.send(&req(0, CMD_FLUSH, 2, 0, 0, &[]));
    let mut got = HashMap::new();
    for _ in 0..2 {
        let r = c.reply(&HashMap::new());
        got.insert(r.cookie(), r);
    }
    assert_eq!(got[&1].error(), 0);
    assert_eq!(got[&2].error(), 0);
    c.send(&req(0, CMD_READ, 3, at, 5, &[]));
    let r = c.reply(&HashMap::new());
    got.insert(r.cookie(), r);
    let mut want = at.to_be_bytes().to_vec();
    want.extend(b"alive");
    match &got[&3] {
        Rep::Chunk {
            kind: REPLY_TYPE_OFFSET_DATA,
            flags: REPLY_FLAG_DONE,
            payload,
            ..
        } => assert_eq!(payload, &want),
        other => panic!("{other:?}"),
    }
    c.send(&req(0, CMD_DISC, 4, 0, 0, &[]));
    assert!(c.closed(), "the server closes after NBD_CMD_DISC");
}

#[test]
fn malformed_handshakes_close_only_their_connection() {
    let h = harness();
    let both = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES;
    let huge_option = {
        let mut v = IHAVEOPT.to_be_bytes().to_vec();
        v.extend(OPT_GO.to_be_bytes());
        v.extend(u32::MAX.to_be_bytes());
        v
    };
    // (name, bytes sent, option replies expected before the server closes)
    let cases: Vec<(&str, Vec<u8>, Vec<u32>)> = vec![
        ("unknown client flags", flags(0xffff_ffff), vec![]),
        (
            "wrong option magic",
            [flags(both), b"NOTMAGIC\0\0\0\x07\0\0\0\0".to_vec()].concat(),
            vec![],
        ),
        (
            "huge option length",
            [flags(both), huge_option].concat(),
            vec![REP_ERR_TOO_BIG],
        ),
        (
            "export name of an unknown export",
            [flags(both), opt(OPT_EXPORT_NAME, b"no-such-disk")].concat(),
            vec![],
        ),
        (
            "an option other than EXPORT_NAME without fixed newstyle",
            [flags(0), opt(OPT_LIST, &[])].concat(),
            vec![],
        ),
        (
            "garbage",
            (0..1000u32).map(|i| (i * 7919 % 251) as u8).collect(),
            vec![],
        ),
        (
            "abort",
            [flags(both), opt(OPT_ABORT, &[])].concat(),
            vec![REP_ACK],
        ),
    ];
    for (name, bytes, want) in cases {
        let mut c = Raw::connect(&h);
        c.send(&bytes);
        for w in want {
            assert_eq!(c.opt_reply().1, w, "{name}");
        }
        assert!(c.closed(), "{name}: the server closes the connection");
    }
    // Clients that stop halfway: the server sees the end of the stream.
    for bytes in [
        vec![0u8, 0],
        [flags(both), opt(OPT_GO, &go_data("disk0"))[..20].to_vec()].concat(),
    ] {
        let mut c = Raw::connect(&h);
        c.send(&bytes);
        c.s.shutdown(Shutdown::Write).expect("half close");
        assert!(c.closed());
    }
    still_serving(&h, "disk0", 100);
    h.finish();
}

#[test]
fn unsupported_and_invalid_options_keep_the_connection() {
    let h = harness();
    let mut c = Raw::connect(&h);
    c.send(&flags(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES));
    // (option, data, final reply expected)
    let cases: Vec<(u32, Vec<u8>, u32)> = vec![
        (OPT_EXTENDED_HEADERS, vec![], REP_ERR_UNSUP),
        (OPT_STARTTLS, vec![], REP_ERR_UNSUP),
        (0x4242, b"who knows".to_vec(), REP_ERR_UNSUP),
        (OPT_INFO, go_data("nope"), REP_ERR_UNKNOWN),
        (OPT_GO, vec![0, 0, 0, 200, b'x'], REP_ERR_INVALID),
        (OPT_LIST, b"data".to_vec(), REP_ERR_INVALID),
        (OPT_SET_META_CONTEXT, vec![0; 8], REP_ERR_INVALID), // before structured
        (OPT_STRUCTURED_REPLY, vec![], REP_ACK),
        (OPT_INFO, go_data("disk1"), REP_ACK),
        (OPT_LIST, vec![], REP_ACK),
    ];
    for (option, data, want) in cases {
        c.send(&opt(option, &data));
        let replies = c.opt_replies();
        assert!(replies.iter().all(|r| r.0 == option));
        assert_eq!(replies.last().map(|r| r.1), Some(want), "option {option}");
        if option == OPT_LIST && want == REP_ACK {
            let names: Vec<Vec<u8>> = replies[..replies.len() - 1]
                .iter()
                .map(|r| r.2[4..].to_vec())
                .collect();
            assert_eq!(names, vec![b"disk0".to_vec(), b"disk1".to_vec()]);
        }
    }
    // Then into transmission on the same connection.
    c.send(&opt(OPT_GO, &go_data("disk1")));
    assert_eq!(c.opt_replies().last().map(|r| r.1), Some(REP_ACK));
    c.send(&req(0, CMD_READ, 9, 0, 4, &[]));
    let r = c.reply(&HashMap::new());
    assert_eq!((r.cookie(), r.error()), (9, 0));
    h.finish();
}

#[test]
fn bad_requests_get_errors_and_write_nothing() {
    let h = harness();
    let (mut c, size, tflags) = Raw::go(&h, "disk0", true);
    assert_eq!(size, SIZE);
    assert_ne!(tflags & FLAG_SEND_TRIM, 0);
    assert_ne!(tflags & FLAG_SEND_WRITE_ZEROES, 0);
    let inval = 22;
    let nospc = 28;
    // (request, expected NBD error)
    let cases: Vec<(Vec<u8>, u32)> = vec![
        (req(0, CMD_READ, 1, SIZE, 1, &[]), inval),
        (req(0, CMD_READ, 2, SIZE - 10, 11, &[]), inval),
        (req(0, CMD_READ, 3, u64::MAX - 1, 4, &[]), inval),
        (req(0, CMD_READ, 4, 0, 33 << 20, &[]), inval),
        (
            req(0, CMD_WRITE, 5, SIZE - 2, 4, b"\xee\xee\xee\xee"),
            nospc,
        ),
        (req(0, CMD_WRITE, 6, u64::MAX, 1, b"\xee"), nospc),
        (req(0, CMD_TRIM, 7, SIZE - 1, 2, &[]), inval),
        (req(0, CMD_WRITE_ZEROES, 8, 1, SIZE as u32, &[]), nospc),
        (req(0, 42, 9, 0, 1, &[]), inval),
        (req(0, CMD_BLOCK_STATUS, 10, 0, 512, &[]), inval),
        (req(1 << 12, CMD_WRITE, 11, 0, 1, b"\xee"), inval),
        (
            req(CMD_FLAG_FAST_ZERO, CMD_WRITE_ZEROES, 12, 0, 8, &[]),
            inval,
        ),
        (req(0, CMD_FLUSH, 13, 4, 4, &[]), inval),
    ];
    let n = cases.len();
    for (r, _) in &cases {
        c.send(r);
    }
    let mut got = HashMap::new();
    for _ in 0..n {
        let r = c.reply(&HashMap::new());
        got.insert(r.cookie(), r);
    }
    for (i, (_, want)) in cases.iter().enumerate() {
        let r = &got[&(i as u64 + 1)];
        assert_eq!(r.error(), *want, "case {}: {r:?}", i + 1);
        assert!(
            matches!(
                r,
                Rep::Chunk {
                    kind: REPLY_TYPE_ERROR,
                    flags: REPLY_FLAG_DONE,
                    ..
                }
            ),
            "structured error chunk with a message: {r:?}"
        );
    }
    // Without structured replies: a simple reply with the error and no data.
    let (mut s, _, tflags) = Raw::go(&h, "disk0", false);
    assert_eq!(tflags & FLAG_SEND_DF, 0);
    s.send(&req(0, CMD_READ, 77, SIZE, 512, &[]));
    s.send(&req(0, CMD_READ, 78, 0, 3, &[]));
    let lens = HashMap::from([(78, 3)]);
    assert_eq!(
        s.reply(&lens),
        Rep::Simple {
            error: inval,
            cookie: 77,
            data: vec![]
        }
    );
    assert_eq!(
        s.reply(&lens),
        Rep::Simple {
            error: 0,
            cookie: 78,
            data: vec![0; 3]
        }
    );
    // Requests that end the connection: an oversized write (EINVAL, then closed), a
    // bad magic, a cookie reused while in flight.
    c.send(&req(0, CMD_WRITE, 20, 0, 64 << 20, &[0xee; 100]));
    let r = c.reply(&HashMap::new());
    assert_eq!((r.cookie(), r.error()), (20, inval));
    assert!(c.closed());
    let (mut c, _, _) = Raw::go(&h, "disk0", true);
    let mut bad = req(0, CMD_READ, 1, 0, 1, &[]);
    bad[0] = 0x99;
    c.send(&bad);
    assert!(c.closed());
    let (mut c, _, _) = Raw::go(&h, "disk0", true);
    c.send(
        &[
            req(0, CMD_READ, 5, 0, 4096, &[]),
            req(0, CMD_READ, 5, 0, 1, &[]),
        ]
        .concat(),
    );
    // The first read may have been answered before the second arrived.
    assert!(c.closed_after(20 + 8 + 4096));
    // Nothing reached the unit, and what did not is not replicated either.
    h.drain();
    assert!(h.local(0).iter().all(|&b| b == 0), "nothing was written");
    h.assert_replicated(0);
    still_serving(&h, "disk0", 0);
    h.finish();
}

#[test]
fn pipelined_requests_are_answered_by_cookie_and_replicate() {
    let h = harness();
    for (unit, export) in ["disk0", "disk1"].into_iter().enumerate() {
        let (mut c, _, _) = Raw::go(&h, export, true);
        let mut model = vec![0u8; SIZE as usize];
        // 300 writes of odd sizes (more than the 64 the server keeps in flight) and a
        // FUA write, all without waiting. Requests in flight together are not ordered,
        // so these do not overlap.
        let mut batch = Vec::new();
        for i in 0..300u64 {
            let off = i * 3_000 + i % 7;
            let len = 1 + (i * 131) % 2_990;
            let fill = (i % 251) as u8;
            model[off as usize..(off + len) as usize].fill(fill);
            batch.extend(req(
                0,
                CMD_WRITE,
                1000 + i,
                off,
                len as u32,
                &vec![fill; len as usize],
            ));
        }
        batch.extend(req(CMD_FLAG_FUA, CMD_WRITE, 1300, 950_001, 3, b"fua"));
        model[950_001..950_004].copy_from_slice(b"fua");
        send_and_expect_success(&mut c, batch, 301);
        // Then zeroes and a trim over what was written, pipelined too.
        let mut batch = req(0, CMD_WRITE_ZEROES, 2000, 10_001, 20_000, &[]);
        model[10_001..30_001].fill(0);
        batch.extend(req(CMD_FLAG_FUA, CMD_TRIM, 2001, 100_000, 9_999, &[]));
        model[100_000..109_999].fill(0);
        batch.extend(req(
            CMD_FLAG_NO_HOLE,
            CMD_WRITE_ZEROES,
            2002,
            500_000,
            1,
            &[],
        ));
        model[500_000] = 0;
        send_and_expect_success(&mut c, batch, 3);
        c.send(&req(0, CMD_FLUSH, 1, 0, 0, &[]));
        assert_eq!(c.reply(&HashMap::new()).cookie(), 1);
        // Pipelined reads of many sizes, answered in whatever order.
        let mut reads = Vec::new();
        let mut want = HashMap::new();
        for i in 0..200u64 {
            let off = (i * 104_729) % (SIZE - 70_000);
            let len = 1 + (i * 347) % 65_536;
            reads.extend(req(0, CMD_READ, 5_000 + i, off, len as u32, &[]));
            want.insert(
                5_000 + i,
                (off, model[off as usize..(off + len) as usize].to_vec()),
            );
        }
        let writer = {
            let mut s = c.s.try_clone().expect("clone");
            std::thread::spawn(move || s.write_all(&reads).expect("send"))
        };
        for _ in 0..200 {
            match c.reply(&HashMap::new()) {
                Rep::Chunk {
                    kind: REPLY_TYPE_OFFSET_DATA,
                    flags: REPLY_FLAG_DONE,
                    cookie,
                    payload,
                } => {
                    let (off, data) = want.remove(&cookie).expect("an outstanding read");
                    assert_eq!(payload[..8], off.to_be_bytes());
                    assert!(payload[8..] == data[..], "read {cookie} at {off}");
                }
                other => panic!("{other:?}"),
            }
        }
        writer.join().expect("writer");
        assert!(want.is_empty());
        c.send(&req(0, CMD_DISC, 2, 0, 0, &[]));
        assert!(c.closed());
        assert!(h.local(unit) == model, "{export}: local unit");
        h.assert_replicated(unit);
    }
    h.finish();
}

#[test]
fn clients_that_vanish_mid_request_end_only_their_connection() {
    let h = harness();
    // Half a write, then gone: the write never happens.
    let (mut c, _, _) = Raw::go(&h, "disk1", true);
    let mut half = req(0, CMD_WRITE, 1, 4096, 8192, &[0xaa; 8192]);
    half.truncate(28 + 5000);
    c.send(&half);
    drop(c);
    // Big reads in flight, and nobody reading the answers.
    let (mut c, _, _) = Raw::go(&h, "disk1", true);
    for i in 0..20 {
        c.send(&req(0, CMD_READ, i, 0, 1 << 20, &[]));
    }
    drop(c);
    // Writes in flight, then gone without waiting for the answers. They may or may not
    // land, and may still be landing when this test looks: they go to another unit.
    let (mut c, _, _) = Raw::go(&h, "disk0", false);
    c.send(&req(0, CMD_WRITE, 1, 500_000, 6, b"landed"));
    c.send(&req(0, CMD_FLUSH, 2, 0, 0, &[]));
    drop(c);
    // Connected and gone at once; gone in the middle of a header.
    drop(Raw::connect(&h));
    let (mut c, _, _) = Raw::go(&h, "disk1", true);
    c.send(&req(0, CMD_READ, 1, 0, 1, &[])[..10]);
    drop(c);
    still_serving(&h, "disk1", 0);
    h.drain();
    let local = h.local(1);
    assert!(
        local[4096..4096 + 8192].iter().all(|&b| b == 0),
        "the incomplete write changed nothing"
    );
    h.assert_replicated(1);
    h.finish();
}
