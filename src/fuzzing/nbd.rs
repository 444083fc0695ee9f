//! The NBD connection input (`nbd`): handshakes, options and requests, as raw bytes or
//! as a client that knows what it sent, split anywhere.

use super::input::{Input, Script};
use crate::nbd::consts::*;
use crate::nbd::*;
use bytes::Bytes;
use std::collections::HashMap;

fn exports() -> Vec<Export> {
    let none = ExportFlags {
        read_only: false,
        flush: false,
        fua: false,
        trim: false,
        write_zeroes: false,
        multi_conn: false,
    };
    vec![
        Export::new("disk", 128 << 10),
        Export::new("ro", 64 << 10).read_only(),
        Export::new("odd", 1000).with_flags(none),
        Export::new("empty", 0).with_description("nothing"),
    ]
}

fn small_limits() -> Limits {
    Limits {
        max_request: 4096,
        max_option_len: 64,
        max_options: 5,
        max_in_flight: 3,
        max_in_flight_bytes: 4096,
    }
}

/// The bytes the layer above answers a read with.
fn read_data(cookie: u64, len: u32) -> Bytes {
    Bytes::from(vec![cookie as u8 ^ 0xa5; len as usize])
}

/// What a session gave: the bytes sent to the client, and the events.
type Outcome = (Vec<u8>, Vec<Event>);

/// Feeds `chunks` one after another, then answers every request in the order handed up
/// (reads with [`read_data`]; every third cookie fails with `EIO`; some reads are first
/// answered with the wrong length, which must be refused and leave them in flight)
/// until nothing new comes. Checks every request handed up against its export.
fn run(chunks: &[&[u8]], limits: Limits) -> Outcome {
    let exports = exports();
    let mut c = Connection::new(exports.clone(), limits);
    let mut evs = Vec::new();
    let mut out = Vec::new();
    let drain = |c: &mut Connection, evs: &mut Vec<Event>, out: &mut Vec<u8>| {
        while let Some(e) = c.poll_event() {
            evs.push(e);
        }
        while let Some(b) = c.poll_output() {
            out.extend_from_slice(&b);
        }
    };
    drain(&mut c, &mut evs, &mut out);
    for ch in chunks {
        c.handle_input(ch);
        drain(&mut c, &mut evs, &mut out);
    }
    let mut answered = 0;
    loop {
        let pending: Vec<Request> = evs[answered..]
            .iter()
            .filter_map(|e| match e {
                Event::Request(r) => Some(r.clone()),
                _ => None,
            })
            .collect();
        answered = evs.len();
        if pending.is_empty() {
            break;
        }
        for r in pending {
            let export = c.export().map(|(_, e)| e.clone());
            check_request(&r, export.as_ref(), c.limits());
            let reply = match r.command {
                Command::Read { len, .. } => {
                    if r.cookie.0 % 5 == 0 {
                        let wrong = Reply::Data(read_data(r.cookie.0, len + 1));
                        assert!(matches!(
                            c.reply(r.cookie, wrong),
                            Err(ReplyError::WrongLength { .. })
                        ));
                        assert!(matches!(
                            c.reply(r.cookie, Reply::Ok),
                            Err(ReplyError::ReadWithoutData(_))
                        ));
                    }
                    Reply::Data(read_data(r.cookie.0, len))
                }
                _ if r.cookie.0 % 3 == 0 => Reply::error(ErrorCode::Io, "injected"),
                _ => Reply::Ok,
            };
            c.reply(r.cookie, reply)
                .expect("the reply fits its request");
        }
        drain(&mut c, &mut evs, &mut out);
    }
    assert!(c.in_flight() == 0 || c.is_ended());
    (out, evs)
}

/// Nothing invalid reaches the layer above: a request is in range for its export,
/// nonzero, within the limit, allowed by the export's flags.
fn check_request(r: &Request, export: Option<&Export>, limits: &Limits) {
    let e = export.expect("a request before an export was chosen");
    let in_range = |offset: u64, len: u64| {
        assert!(len > 0, "{r:?}: zero length handed up");
        assert!(
            offset.checked_add(len).is_some_and(|end| end <= e.size),
            "{r:?}: out of range of {} bytes",
            e.size
        );
    };
    if r.command.is_write() {
        assert!(!e.flags.read_only, "{r:?} on a read-only export");
    }
    match &r.command {
        Command::Read { offset, len } => {
            assert!(*len <= limits.max_request);
            in_range(offset.0, u64::from(*len));
        }
        Command::Write { offset, data, .. } => {
            assert!(data.len() <= limits.max_request as usize);
            in_range(offset.0, data.len() as u64);
        }
        Command::Trim { offset, len, .. } => {
            assert!(e.flags.trim);
            in_range(offset.0, u64::from(*len));
        }
        Command::WriteZeroes { offset, len, .. } => {
            assert!(e.flags.write_zeroes);
            in_range(offset.0, u64::from(*len));
        }
        Command::Flush => assert!(e.flags.flush),
    }
}

/// Split points for `input` from `cuts`.
fn split<'a>(input: &'a [u8], cuts: &[u16]) -> Vec<&'a [u8]> {
    let mut points: Vec<usize> = cuts
        .iter()
        .map(|&c| usize::from(c) % (input.len() + 1))
        .collect();
    points.sort_unstable();
    let mut out = Vec::with_capacity(points.len() + 1);
    let mut prev = 0;
    for p in points {
        out.push(&input[prev..p]);
        prev = p;
    }
    out.push(&input[prev..]);
    out
}

/// The same session fed whole, split where the input says, and (if short) byte by byte:
/// the same outcome every time.
fn splits_agree(stream: &[u8], cuts: &[u16], limits: Limits) -> Outcome {
    let whole = run(&[stream], limits);
    let pieces = run(&split(stream, cuts), limits);
    assert!(whole == pieces, "splitting the input changed the outcome");
    if stream.len() <= 256 {
        let bytes: Vec<&[u8]> = stream.chunks(1).collect();
        assert!(
            whole == run(&bytes, limits),
            "byte by byte changed the outcome"
        );
    }
    whole
}

/// First byte: bit 0 raw bytes or a client script, bit 1 small limits. Then up to 7 cut
/// points, then the stream (raw) or the client script ([`client`]).
pub fn nbd(data: &[u8]) {
    let mut inp = Input::new(data);
    let mode = inp.u8();
    let limits = if mode & 2 == 0 {
        Limits::default()
    } else {
        small_limits()
    };
    let cuts: Vec<u16> = (0..inp.u8() % 8).map(|_| inp.u16()).collect();
    if mode & 1 == 0 {
        splits_agree(inp.rest(), &cuts, limits);
    } else {
        client(&mut inp, &cuts, limits);
    }
}

fn opt(s: &mut Vec<u8>, option: u32, data: &[u8]) {
    s.extend_from_slice(&IHAVEOPT.to_be_bytes());
    s.extend_from_slice(&option.to_be_bytes());
    s.extend_from_slice(&(data.len() as u32).to_be_bytes());
    s.extend_from_slice(data);
}

fn info_data(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        d.extend_from_slice(&i.to_be_bytes());
    }
    d
}

/// A request the client sent, and whether it must fail.
#[derive(Debug)]
struct Sent {
    kind: u16,
    len: u32,
    must_fail: bool,
}

const KINDS: [u16; 16] = [
    CMD_READ,
    CMD_WRITE,
    CMD_FLUSH,
    CMD_TRIM,
    CMD_WRITE_ZEROES,
    CMD_READ,
    CMD_WRITE,
    CMD_CACHE,
    CMD_BLOCK_STATUS,
    9,
    CMD_READ,
    CMD_WRITE,
    CMD_TRIM,
    CMD_WRITE_ZEROES,
    CMD_RESIZE,
    CMD_DISC,
];

/// A client that knows what it sends: a handshake into one export (or not), then
/// requests with distinct cookies, in range and out, with good and bad flags, of every
/// command. Besides what [`splits_agree`] checks, the server's replies are decoded:
/// every reply answers a request sent, once; no request that must fail (out of range,
/// a write to a read-only export, an unsupported command or flag) is answered with
/// success; a read that succeeds carries the bytes the layer above gave; and unless the
/// session ended on a protocol error, every complete request before a disconnect is
/// answered.
fn client(inp: &mut Input<'_>, cuts: &[u16], limits: Limits) {
    let exports = exports();
    let mut hs = Vec::new();
    let flags = match inp.u8() % 8 {
        0 => FLAG_C_FIXED_NEWSTYLE,
        1 => inp.u32(),
        _ => FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES,
    };
    hs.extend_from_slice(&flags.to_be_bytes());
    let pick = usize::from(inp.u8());
    let name = match exports.get(pick % 5) {
        Some(e) => e.name.clone(),
        None => "nosuch".to_string(),
    };
    match inp.u8() % 4 {
        0 => {
            opt(&mut hs, OPT_STRUCTURED_REPLY, &[]);
            opt(&mut hs, OPT_GO, &info_data(&name, &[INFO_BLOCK_SIZE]));
        }
        1 => opt(&mut hs, OPT_GO, &info_data(&name, &[])),
        2 => opt(&mut hs, OPT_EXPORT_NAME, name.as_bytes()),
        _ => {
            opt(&mut hs, OPT_LIST, &[]);
            opt(&mut hs, OPT_STARTTLS, &[]);
            opt(&mut hs, OPT_INFO, &info_data(&name, &[0, 1, 2, 3]));
            opt(&mut hs, OPT_STRUCTURED_REPLY, &[]);
            opt(&mut hs, OPT_GO, &info_data(&name, &[]));
        }
    }
    // Where the handshake leaves the session: its output comes before any reply.
    let mut probe = Connection::new(exports.clone(), limits);
    probe.handle_input(&hs);
    let mut hs_out = 0;
    while let Some(b) = probe.poll_output() {
        hs_out += b.len();
    }
    let export = probe.export().map(|(_, e)| e.clone());
    let structured = probe.structured();
    let ready = probe.in_transmission() && !probe.is_ended();

    let mut stream = hs;
    let mut sent: HashMap<u64, Sent> = HashMap::new();
    let mut complete: Vec<u64> = Vec::new();
    let size = export.as_ref().map_or(0, |e| e.size);
    for cookie in 1..=64u64 {
        if inp.is_empty() {
            break;
        }
        let kind = KINDS[usize::from(inp.u8() % 16)];
        let cflags = match inp.u8() % 8 {
            0..=3 => 0,
            4 => CMD_FLAG_FUA,
            5 => CMD_FLAG_NO_HOLE,
            6 => CMD_FLAG_FUA | CMD_FLAG_DF,
            _ => inp.u16(),
        };
        let offset = match inp.u8() % 8 {
            0..=3 => u64::from(inp.u16()) * 16,
            4 => size.saturating_sub(u64::from(inp.u16())),
            5 => size + u64::from(inp.u8()),
            6 => u64::MAX - u64::from(inp.u16()),
            _ => inp.u64(),
        };
        let len = match inp.u8() % 8 {
            0..=4 => u32::from(inp.u16()) % 4096,
            5 => 0,
            6 => inp.u32(),
            _ => u32::try_from(size.saturating_sub(offset)).unwrap_or(u32::MAX),
        };
        stream.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        stream.extend_from_slice(&cflags.to_be_bytes());
        stream.extend_from_slice(&kind.to_be_bytes());
        stream.extend_from_slice(&cookie.to_be_bytes());
        stream.extend_from_slice(&offset.to_be_bytes());
        stream.extend_from_slice(&len.to_be_bytes());
        if kind == CMD_DISC {
            break;
        }
        let Some(e) = &export else { continue };
        let in_range = offset
            .checked_add(u64::from(len))
            .is_some_and(|end| end <= e.size);
        let allowed = match kind {
            CMD_READ if structured => CMD_FLAG_FUA | CMD_FLAG_DF,
            CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE,
            _ => CMD_FLAG_FUA,
        };
        let writes = matches!(kind, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
        let must_fail = cflags & !allowed != 0
            || !matches!(
                kind,
                CMD_READ | CMD_WRITE | CMD_FLUSH | CMD_TRIM | CMD_WRITE_ZEROES
            )
            || (writes && e.flags.read_only)
            || (matches!(kind, CMD_READ | CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES) && !in_range)
            || (matches!(kind, CMD_READ | CMD_WRITE) && len > limits.max_request)
            || (kind == CMD_FLUSH && (!e.flags.flush || offset != 0 || len != 0))
            || (kind == CMD_TRIM && !e.flags.trim)
            || (kind == CMD_WRITE_ZEROES && !e.flags.write_zeroes);
        sent.insert(
            cookie,
            Sent {
                kind,
                len,
                must_fail,
            },
        );
        if kind == CMD_WRITE {
            if len > 8192 {
                // Its payload would be the rest of the session: stop here.
                break;
            }
            stream.extend((0..len).map(|i| i as u8));
        }
        complete.push(cookie);
    }
    let (out, evs) = splits_agree(&stream, cuts, limits);
    if !ready {
        return;
    }
    assert!(out.len() >= hs_out);
    let replies = decode_replies(&out[hs_out..], &sent, structured);
    let mut seen: HashMap<u64, bool> = HashMap::new();
    for (cookie, ok, data) in replies {
        let s = sent
            .get(&cookie)
            .unwrap_or_else(|| panic!("a reply to cookie {cookie}, never sent"));
        assert!(
            seen.insert(cookie, ok).is_none(),
            "cookie {cookie} answered twice"
        );
        if s.must_fail {
            assert!(!ok, "{s:?} (cookie {cookie}) must fail, and succeeded");
            continue;
        }
        let handed_up = s.len > 0 || s.kind == CMD_FLUSH;
        let want_ok = !handed_up || s.kind == CMD_READ || cookie % 3 != 0;
        assert_eq!(ok, want_ok, "{s:?} (cookie {cookie})");
        if let Some(d) = data {
            assert_eq!(s.kind, CMD_READ);
            assert!(d == read_data(cookie, s.len), "read {cookie}: wrong bytes");
        }
    }
    let protocol_error = evs.iter().any(|e| matches!(e, Event::End(End::Error(_))));
    if !protocol_error {
        for c in complete {
            assert!(seen.contains_key(&c), "cookie {c} never answered");
        }
    }
}

/// The transmission replies in `out`: (cookie, success, the data of a successful read).
fn decode_replies(
    mut out: &[u8],
    sent: &HashMap<u64, Sent>,
    structured: bool,
) -> Vec<(u64, bool, Option<Vec<u8>>)> {
    fn take<'a>(b: &mut &'a [u8], n: usize) -> &'a [u8] {
        assert!(b.len() >= n, "a reply cut short");
        let (x, y) = b.split_at(n);
        *b = y;
        x
    }
    fn be(b: &[u8]) -> u64 {
        b.iter().fold(0, |a, &x| a << 8 | u64::from(x))
    }
    let mut replies = Vec::new();
    while !out.is_empty() {
        let magic = be(take(&mut out, 4)) as u32;
        if magic == SIMPLE_REPLY_MAGIC {
            let error = be(take(&mut out, 4));
            let cookie = be(take(&mut out, 8));
            let read = sent.get(&cookie).filter(|s| s.kind == CMD_READ);
            let data = match read {
                Some(s) if error == 0 && !structured && s.len > 0 => {
                    Some(take(&mut out, s.len as usize).to_vec())
                }
                _ => None,
            };
            replies.push((cookie, error == 0, data));
        } else {
            assert_eq!(magic, STRUCTURED_REPLY_MAGIC, "not a reply");
            assert!(structured, "a chunk without structured replies");
            let flags = be(take(&mut out, 2)) as u16;
            let kind = be(take(&mut out, 2)) as u16;
            let cookie = be(take(&mut out, 8));
            let len = be(take(&mut out, 4)) as usize;
            let payload = take(&mut out, len);
            assert_eq!(flags, REPLY_FLAG_DONE, "one chunk per reply");
            match kind {
                REPLY_TYPE_OFFSET_DATA => {
                    replies.push((cookie, true, Some(payload[8..].to_vec())));
                }
                REPLY_TYPE_NONE => replies.push((cookie, true, None)),
                REPLY_TYPE_ERROR => {
                    assert!(be(&payload[..4]) != 0, "an error chunk with error 0");
                    replies.push((cookie, false, None));
                }
                other => panic!("reply chunk type {other}"),
            }
        }
    }
    replies
}

/// Seeds: raw sessions (a structured and a simple handshake with requests of every
/// kind, and one with options), and client scripts.
pub fn seeds() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let req = |s: &mut Vec<u8>, flags: u16, kind: u16, cookie: u64, offset: u64, len: u32| {
        s.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        s.extend_from_slice(&flags.to_be_bytes());
        s.extend_from_slice(&kind.to_be_bytes());
        s.extend_from_slice(&cookie.to_be_bytes());
        s.extend_from_slice(&offset.to_be_bytes());
        s.extend_from_slice(&len.to_be_bytes());
        if kind == CMD_WRITE {
            s.extend(std::iter::repeat_n(0xaa, len as usize));
        }
    };
    for structured in [true, false] {
        let mut s = vec![0u8, 2];
        s.extend_from_slice(&[0, 0, 5, 0]);
        s.extend_from_slice(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes());
        if structured {
            opt(&mut s, OPT_STRUCTURED_REPLY, &[]);
        }
        opt(&mut s, OPT_GO, &info_data("disk", &[INFO_BLOCK_SIZE]));
        req(&mut s, 0, CMD_WRITE, 1, 4096, 512);
        req(&mut s, CMD_FLAG_FUA, CMD_WRITE, 2, 0, 16);
        req(&mut s, 0, CMD_READ, 3, 4096, 512);
        req(&mut s, 0, CMD_FLUSH, 4, 0, 0);
        req(&mut s, 0, CMD_TRIM, 5, 0, 4096);
        req(&mut s, CMD_FLAG_NO_HOLE, CMD_WRITE_ZEROES, 6, 8192, 4096);
        req(&mut s, 0, CMD_READ, 7, (128 << 10) - 10, 20);
        req(&mut s, 0, CMD_WRITE, 8, 128 << 10, 0);
        req(&mut s, 0, CMD_DISC, 9, 0, 0);
        out.push(s);
    }
    let mut s = vec![2u8, 0];
    s.extend_from_slice(&FLAG_C_FIXED_NEWSTYLE.to_be_bytes());
    opt(&mut s, OPT_LIST, &[]);
    opt(&mut s, OPT_INFO, &info_data("ro", &[0, 1, 2, 3]));
    opt(&mut s, OPT_LIST_META_CONTEXT, &[0, 0, 0, 0, 0, 0, 0, 0]);
    opt(&mut s, OPT_EXTENDED_HEADERS, &[]);
    opt(&mut s, OPT_EXPORT_NAME, b"ro");
    req(&mut s, 0, CMD_READ, 1, 0, 100);
    req(&mut s, 0, CMD_WRITE, 2, 0, 100);
    out.push(s);
    let mut s = vec![0u8, 0];
    s.extend_from_slice(&FLAG_C_FIXED_NEWSTYLE.to_be_bytes());
    opt(&mut s, OPT_ABORT, &[]);
    out.push(s);
    // Client scripts: every handshake kind into every export, then requests.
    for (hs, export) in [(0u8, 0u8), (1, 1), (2, 2), (3, 3), (0, 4), (2, 0)] {
        let mut c = Script::default();
        c.u8(1 | (hs & 2)).u8(2).u16(30).u16(77);
        c.u8(2).u8(export).u8(hs);
        // (kind, flags: none, FUA, NO_HOLE; offset: near the start, or 100 before the
        // end, or past it; length: 512, or 0, or to the end, or 2^30).
        for kind in 0..16u8 {
            c.u8(kind).u8(4 + kind % 3);
            match kind % 4 {
                0 => c.u8(0).u16(u16::from(kind) * 32).u8(0).u16(512),
                1 => c.u8(4).u16(100).u8(7),
                2 => c.u8(5).u8(3).u8(5),
                _ => c.u8(0).u16(8).u8(6).u32(1 << 30),
            };
        }
        out.push(c.done());
    }
    out
}
