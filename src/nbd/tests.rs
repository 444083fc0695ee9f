//! Tests of the NBD server core: table-driven handshakes and requests, pausing,
//! replies, and properties (no input panics; splitting the input changes nothing).

use super::consts::*;
use super::*;
use crate::types::Offset;
use bytes::Bytes;
use proptest::prelude::*;
use std::collections::HashMap;

// ---- the client side, written independently of the server's encoder ----------------

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

fn info_data(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend(name.as_bytes());
    d.extend((infos.len() as u16).to_be_bytes());
    for i in infos {
        d.extend(i.to_be_bytes());
    }
    d
}

fn meta_data(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend(name.as_bytes());
    d.extend((queries.len() as u32).to_be_bytes());
    for q in queries {
        d.extend((q.len() as u32).to_be_bytes());
        d.extend(q.as_bytes());
    }
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

const BOTH: u32 = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES;

/// Handshake into transmission on `name`, with or without structured replies.
fn go_into(name: &str, structured: bool) -> Vec<u8> {
    let mut v = flags(BOTH);
    if structured {
        v.extend(opt(OPT_STRUCTURED_REPLY, &[]));
    }
    v.extend(opt(OPT_GO, &info_data(name, &[])));
    v
}

/// What the server sent, decoded as a client would.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Msg {
    Greeting(u16),
    Opt {
        option: u32,
        kind: u32,
        data: Vec<u8>,
    },
    ExportName {
        size: u64,
        flags: u16,
    },
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

/// Decodes the server's stream; `read_lens` gives the data length of simple read
/// replies, `export_name_padding` whether an `EXPORT_NAME` reply is expected (and its
/// padding).
fn decode(mut b: &[u8], read_lens: &HashMap<u64, u32>, export_name: Option<bool>) -> Vec<Msg> {
    fn take<'a>(b: &mut &'a [u8], n: usize) -> &'a [u8] {
        let (x, y) = b.split_at(n);
        *b = y;
        x
    }
    fn u16_(b: &mut &[u8]) -> u16 {
        u16::from_be_bytes(take(b, 2).try_into().unwrap())
    }
    fn u32_(b: &mut &[u8]) -> u32 {
        u32::from_be_bytes(take(b, 4).try_into().unwrap())
    }
    fn u64_(b: &mut &[u8]) -> u64 {
        u64::from_be_bytes(take(b, 8).try_into().unwrap())
    }
    let mut out = Vec::new();
    assert_eq!(u64_(&mut b), NBDMAGIC);
    assert_eq!(u64_(&mut b), IHAVEOPT);
    out.push(Msg::Greeting(u16_(&mut b)));
    let mut export_name = export_name;
    while !b.is_empty() {
        if b.len() >= 8 && b[..8] == OPTION_REPLY_MAGIC.to_be_bytes() {
            u64_(&mut b);
            let option = u32_(&mut b);
            let kind = u32_(&mut b);
            let len = u32_(&mut b) as usize;
            out.push(Msg::Opt {
                option,
                kind,
                data: take(&mut b, len).to_vec(),
            });
        } else if b[..4] == SIMPLE_REPLY_MAGIC.to_be_bytes() {
            u32_(&mut b);
            let error = u32_(&mut b);
            let cookie = u64_(&mut b);
            let n = if error == 0 {
                read_lens.get(&cookie).copied().unwrap_or(0) as usize
            } else {
                0
            };
            out.push(Msg::Simple {
                error,
                cookie,
                data: take(&mut b, n).to_vec(),
            });
        } else if b[..4] == STRUCTURED_REPLY_MAGIC.to_be_bytes() {
            u32_(&mut b);
            let flags = u16_(&mut b);
            let kind = u16_(&mut b);
            let cookie = u64_(&mut b);
            let len = u32_(&mut b) as usize;
            out.push(Msg::Chunk {
                flags,
                kind,
                cookie,
                payload: take(&mut b, len).to_vec(),
            });
        } else if let Some(no_zeroes) = export_name.take() {
            let size = u64_(&mut b);
            let flags = u16_(&mut b);
            if !no_zeroes {
                assert!(take(&mut b, EXPORT_NAME_PADDING).iter().all(|&z| z == 0));
            }
            out.push(Msg::ExportName { size, flags });
        } else {
            panic!("undecodable server output: {b:02x?}");
        }
    }
    out
}

fn exports() -> Vec<Export> {
    vec![
        Export::new("disk", 1 << 20).with_description("the first disk"),
        Export::new("ro", 4096).read_only(),
        Export::new("plain", 8192).with_flags(ExportFlags {
            trim: false,
            write_zeroes: false,
            flush: false,
            fua: false,
            ..ExportFlags::default()
        }),
    ]
}

fn conn() -> Connection {
    Connection::new(exports(), Limits::default())
}

fn output(c: &mut Connection) -> Vec<u8> {
    let mut v = Vec::new();
    while let Some(b) = c.poll_output() {
        v.extend_from_slice(&b);
    }
    v
}

fn events(c: &mut Connection) -> Vec<Event> {
    std::iter::from_fn(|| c.poll_event()).collect()
}

/// Option replies only, as (option, reply type).
fn opt_replies(msgs: &[Msg]) -> Vec<(u32, u32)> {
    msgs.iter()
        .filter_map(|m| match m {
            Msg::Opt { option, kind, .. } => Some((*option, *kind)),
            _ => None,
        })
        .collect()
}

// ---- handshake -------------------------------------------------------------------------

#[derive(Debug)]
enum Expect {
    Open,
    Transmission(&'static str),
    Ended(fn(&End) -> bool),
}

#[test]
fn handshakes() {
    let huge = {
        let mut v = IHAVEOPT.to_be_bytes().to_vec();
        v.extend(OPT_GO.to_be_bytes());
        v.extend(0xffff_fff0u32.to_be_bytes());
        v
    };
    let mut bad_magic = opt(OPT_LIST, &[]);
    bad_magic[0] ^= 0xff;
    // (name, input, option replies as (option, reply type), expected state)
    type Case = (&'static str, Vec<u8>, Vec<(u32, u32)>, Expect);
    let cases: Vec<Case> = vec![
        (
            "what qemu-io sends",
            [
                flags(BOTH),
                opt(OPT_EXTENDED_HEADERS, &[]),
                opt(OPT_STRUCTURED_REPLY, &[]),
                opt(
                    OPT_SET_META_CONTEXT,
                    &meta_data("disk", &["base:allocation"]),
                ),
                opt(OPT_GO, &info_data("disk", &[INFO_BLOCK_SIZE])),
            ]
            .concat(),
            vec![
                (OPT_EXTENDED_HEADERS, REP_ERR_UNSUP),
                (OPT_STRUCTURED_REPLY, REP_ACK),
                (OPT_SET_META_CONTEXT, REP_ACK),
                (OPT_GO, REP_INFO),
                (OPT_GO, REP_INFO),
                (OPT_GO, REP_ACK),
            ],
            Expect::Transmission("disk"),
        ),
        (
            "unknown client flags",
            flags(0x8000_0001),
            vec![],
            Expect::Ended(|e| matches!(e, End::Error(ProtocolError::UnknownClientFlags(_)))),
        ),
        (
            "wrong option magic",
            [flags(BOTH), bad_magic].concat(),
            vec![],
            Expect::Ended(|e| matches!(e, End::Error(ProtocolError::BadOptionMagic(_)))),
        ),
        (
            "huge option length",
            [flags(BOTH), huge].concat(),
            vec![(OPT_GO, REP_ERR_TOO_BIG)],
            Expect::Ended(|e| matches!(e, End::Error(ProtocolError::OptionTooLong { .. }))),
        ),
        (
            "list",
            [flags(BOTH), opt(OPT_LIST, &[])].concat(),
            vec![
                (OPT_LIST, REP_SERVER),
                (OPT_LIST, REP_SERVER),
                (OPT_LIST, REP_SERVER),
                (OPT_LIST, REP_ACK),
            ],
            Expect::Open,
        ),
        (
            "list with data",
            [flags(BOTH), opt(OPT_LIST, b"x")].concat(),
            vec![(OPT_LIST, REP_ERR_INVALID)],
            Expect::Open,
        ),
        (
            "info on an unknown export, then go",
            [
                flags(BOTH),
                opt(OPT_INFO, &info_data("nope", &[])),
                opt(OPT_GO, &info_data("ro", &[])),
            ]
            .concat(),
            vec![
                (OPT_INFO, REP_ERR_UNKNOWN),
                (OPT_GO, REP_INFO),
                (OPT_GO, REP_INFO),
                (OPT_GO, REP_ACK),
            ],
            Expect::Transmission("ro"),
        ),
        (
            "info asking for name and description",
            [
                flags(BOTH),
                opt(
                    OPT_INFO,
                    &info_data("disk", &[INFO_NAME, INFO_DESCRIPTION, 999]),
                ),
            ]
            .concat(),
            vec![
                (OPT_INFO, REP_INFO),
                (OPT_INFO, REP_INFO),
                (OPT_INFO, REP_INFO),
                (OPT_INFO, REP_INFO),
                (OPT_INFO, REP_ACK),
            ],
            Expect::Open,
        ),
        (
            "go whose name length runs past the data",
            [flags(BOTH), opt(OPT_GO, &[0, 0, 1, 0, b'a', 0, 0])].concat(),
            vec![(OPT_GO, REP_ERR_INVALID)],
            Expect::Open,
        ),
        (
            "go with a trailing byte",
            [
                flags(BOTH),
                opt(OPT_GO, &[info_data("disk", &[]), vec![0]].concat()),
            ]
            .concat(),
            vec![(OPT_GO, REP_ERR_INVALID)],
            Expect::Open,
        ),
        (
            "starttls and an unknown option keep the connection",
            [
                flags(BOTH),
                opt(OPT_STARTTLS, &[]),
                opt(0xdead_beef, b"whatever"),
                opt(OPT_EXPORT_NAME, b"disk"),
            ]
            .concat(),
            vec![(OPT_STARTTLS, REP_ERR_UNSUP), (0xdead_beef, REP_ERR_UNSUP)],
            Expect::Transmission("disk"),
        ),
        (
            "abort",
            [flags(BOTH), opt(OPT_ABORT, &[]), opt(OPT_LIST, &[])].concat(),
            vec![(OPT_ABORT, REP_ACK)],
            Expect::Ended(|e| *e == End::Abort),
        ),
        (
            "export name of an unknown export",
            [flags(BOTH), opt(OPT_EXPORT_NAME, b"nope")].concat(),
            vec![],
            Expect::Ended(|e| matches!(e, End::Error(ProtocolError::UnknownExport(_)))),
        ),
        (
            "a client without fixed newstyle may only send EXPORT_NAME",
            [flags(0), opt(OPT_GO, &info_data("disk", &[]))].concat(),
            vec![],
            Expect::Ended(|e| matches!(e, End::Error(ProtocolError::NotFixedNewstyle(_)))),
        ),
        (
            "meta context before structured replies",
            [
                flags(BOTH),
                opt(
                    OPT_SET_META_CONTEXT,
                    &meta_data("disk", &["base:allocation"]),
                ),
                opt(OPT_STRUCTURED_REPLY, &[]),
                opt(OPT_LIST_META_CONTEXT, &meta_data("disk", &[])),
                opt(OPT_SET_META_CONTEXT, &meta_data("nope", &[])),
                opt(
                    OPT_SET_META_CONTEXT,
                    &[0, 0, 0, 4, b'd', b'i', b's', b'k', 0, 0, 0, 9],
                ),
            ]
            .concat(),
            vec![
                (OPT_SET_META_CONTEXT, REP_ERR_INVALID),
                (OPT_STRUCTURED_REPLY, REP_ACK),
                (OPT_LIST_META_CONTEXT, REP_ACK),
                (OPT_SET_META_CONTEXT, REP_ERR_UNKNOWN),
                (OPT_SET_META_CONTEXT, REP_ERR_INVALID),
            ],
            Expect::Open,
        ),
        (
            "the empty name is ambiguous with several exports",
            [flags(BOTH), opt(OPT_GO, &info_data("", &[]))].concat(),
            vec![(OPT_GO, REP_ERR_UNKNOWN)],
            Expect::Open,
        ),
    ];
    for (name, input, want_replies, want) in cases {
        let mut c = conn();
        c.handle_input(&input);
        let out = output(&mut c);
        let msgs = decode(&out, &HashMap::new(), Some(true));
        assert_eq!(
            msgs[0],
            Msg::Greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES),
            "{name}"
        );
        assert_eq!(opt_replies(&msgs), want_replies, "{name}");
        let ev = events(&mut c);
        match want {
            Expect::Open => {
                assert!(ev.is_empty(), "{name}: {ev:?}");
                assert!(c.wants_input() && !c.is_ended(), "{name}");
            }
            Expect::Transmission(export) => {
                assert!(
                    matches!(&ev[..], [Event::ExportChosen { name, .. }] if name == export),
                    "{name}: {ev:?}"
                );
                assert!(c.in_transmission(), "{name}");
            }
            Expect::Ended(check) => {
                assert!(c.is_ended() && !c.wants_input(), "{name}");
                match &ev[..] {
                    [Event::End(e)] => assert!(check(e), "{name}: {e:?}"),
                    other => panic!("{name}: {other:?}"),
                }
            }
        }
    }
}

#[test]
fn go_reports_size_flags_and_block_size() {
    let mut c = conn();
    c.handle_input(&[flags(BOTH), opt(OPT_STRUCTURED_REPLY, &[])].concat());
    c.handle_input(&opt(OPT_GO, &info_data("ro", &[INFO_BLOCK_SIZE])));
    let msgs = decode(&output(&mut c), &HashMap::new(), None);
    let infos: Vec<&Vec<u8>> = msgs
        .iter()
        .filter_map(|m| match m {
            Msg::Opt {
                kind: REP_INFO,
                data,
                ..
            } => Some(data),
            _ => None,
        })
        .collect();
    let mut export = INFO_EXPORT.to_be_bytes().to_vec();
    export.extend(4096u64.to_be_bytes());
    export.extend(
        (FLAG_HAS_FLAGS | FLAG_READ_ONLY | FLAG_SEND_FLUSH | FLAG_SEND_FUA | FLAG_SEND_DF)
            .to_be_bytes(),
    );
    assert_eq!(infos[0], &export);
    let mut bs = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
    bs.extend(1u32.to_be_bytes());
    bs.extend(4096u32.to_be_bytes());
    bs.extend((32u32 << 20).to_be_bytes());
    assert_eq!(infos[1], &bs);
    assert_eq!(c.export().map(|(i, _)| i), Some(1));
    assert!(c.structured());
}

#[test]
fn export_name_replies_with_and_without_padding() {
    for no_zeroes in [false, true] {
        let mut c = Connection::new(vec![Export::new("only", 512)], Limits::default());
        let f = if no_zeroes {
            BOTH
        } else {
            FLAG_C_FIXED_NEWSTYLE
        };
        // The empty name picks the only export.
        c.handle_input(&[flags(f), opt(OPT_EXPORT_NAME, b"")].concat());
        let msgs = decode(&output(&mut c), &HashMap::new(), Some(no_zeroes));
        let flags = FLAG_HAS_FLAGS
            | FLAG_SEND_FLUSH
            | FLAG_SEND_FUA
            | FLAG_SEND_TRIM
            | FLAG_SEND_WRITE_ZEROES;
        assert_eq!(msgs[1], Msg::ExportName { size: 512, flags });
        assert_eq!(msgs.len(), 2);
        assert!(c.in_transmission());
    }
}

#[test]
fn too_many_options_close_the_connection() {
    let limits = Limits {
        max_options: 3,
        ..Limits::default()
    };
    let mut c = Connection::new(exports(), limits);
    let mut input = flags(BOTH);
    for _ in 0..5 {
        input.extend(opt(OPT_LIST, b"junk"));
    }
    c.handle_input(&input);
    let msgs = decode(&output(&mut c), &HashMap::new(), None);
    assert_eq!(opt_replies(&msgs).len(), 3);
    assert_eq!(c.end(), Some(&End::Error(ProtocolError::TooManyOptions(3))));
}

// ---- TLS required (FORCEDTLS) ------------------------------------------------------------

fn tls_conn() -> Connection {
    Connection::with_tls(exports(), Limits::default(), TlsPolicy::Required)
}

#[derive(Debug)]
enum TlsExpect {
    /// Still haggling in plain text.
    Open,
    /// The ACK to STARTTLS went out and the handshake is awaited.
    Handshake,
    Ended(End),
}

/// Before the TLS handshake, a server that requires TLS answers every option but
/// STARTTLS and ABORT with `NBD_REP_ERR_TLS_REQD`, hangs up on `EXPORT_NAME`, lists
/// and describes nothing, and never parses a request.
#[test]
fn handshakes_with_tls_required() {
    let every_other_option = [
        opt(OPT_LIST, &[]),
        opt(OPT_INFO, &info_data("disk", &[INFO_NAME, INFO_DESCRIPTION])),
        opt(OPT_STRUCTURED_REPLY, &[]),
        opt(OPT_LIST_META_CONTEXT, &meta_data("disk", &[])),
        opt(OPT_SET_META_CONTEXT, &meta_data("disk", &[])),
        opt(OPT_EXTENDED_HEADERS, &[]),
        opt(OPT_PEEK_EXPORT, &[]),
        opt(0xdead_beef, b"whatever"),
        opt(OPT_GO, &info_data("disk", &[])),
    ]
    .concat();
    let all_refused = vec![
        (OPT_LIST, REP_ERR_TLS_REQD),
        (OPT_INFO, REP_ERR_TLS_REQD),
        (OPT_STRUCTURED_REPLY, REP_ERR_TLS_REQD),
        (OPT_LIST_META_CONTEXT, REP_ERR_TLS_REQD),
        (OPT_SET_META_CONTEXT, REP_ERR_TLS_REQD),
        (OPT_EXTENDED_HEADERS, REP_ERR_TLS_REQD),
        (OPT_PEEK_EXPORT, REP_ERR_TLS_REQD),
        (0xdead_beef, REP_ERR_TLS_REQD),
        (OPT_GO, REP_ERR_TLS_REQD),
    ];
    // (name, input, option replies as (option, reply type), expected state)
    type Case = (&'static str, Vec<u8>, Vec<(u32, u32)>, TlsExpect);
    let cases: Vec<Case> = vec![
        (
            "every option but STARTTLS and ABORT is refused, the connection stays",
            [flags(BOTH), every_other_option.clone()].concat(),
            all_refused.clone(),
            TlsExpect::Open,
        ),
        (
            "refused options, then STARTTLS",
            [flags(BOTH), every_other_option, opt(OPT_STARTTLS, &[])].concat(),
            [all_refused, vec![(OPT_STARTTLS, REP_ACK)]].concat(),
            TlsExpect::Handshake,
        ),
        (
            "STARTTLS first, as libnbd and qemu send it",
            [flags(BOTH), opt(OPT_STARTTLS, &[])].concat(),
            vec![(OPT_STARTTLS, REP_ACK)],
            TlsExpect::Handshake,
        ),
        (
            "STARTTLS with data is invalid and changes nothing",
            [
                flags(BOTH),
                opt(OPT_STARTTLS, b"x"),
                opt(OPT_LIST, &[]),
                opt(OPT_STARTTLS, &[]),
            ]
            .concat(),
            vec![
                (OPT_STARTTLS, REP_ERR_INVALID),
                (OPT_LIST, REP_ERR_TLS_REQD),
                (OPT_STARTTLS, REP_ACK),
            ],
            TlsExpect::Handshake,
        ),
        (
            "EXPORT_NAME before TLS cannot be refused with an error: hang up",
            [flags(BOTH), opt(OPT_EXPORT_NAME, b"disk")].concat(),
            vec![],
            TlsExpect::Ended(End::Error(ProtocolError::ExportNameWithoutTls)),
        ),
        (
            "a plaintext client that sends requests after GO never reaches data",
            [
                flags(BOTH),
                opt(OPT_GO, &info_data("disk", &[])),
                req(0, CMD_WRITE, 1, 0, 4, b"evil"),
                req(0, CMD_READ, 2, 0, 512, &[]),
            ]
            .concat(),
            vec![(OPT_GO, REP_ERR_TLS_REQD)],
            TlsExpect::Ended(End::Error(ProtocolError::BadOptionMagic(
                u64::from(REQUEST_MAGIC) << 32 | 1,
            ))),
        ),
        (
            "ABORT before TLS",
            [flags(BOTH), opt(OPT_ABORT, &[]), opt(OPT_LIST, &[])].concat(),
            vec![(OPT_ABORT, REP_ACK)],
            TlsExpect::Ended(End::Abort),
        ),
        (
            "plain bytes right behind STARTTLS are never taken as protected",
            [flags(BOTH), opt(OPT_STARTTLS, &[]), opt(OPT_LIST, &[])].concat(),
            vec![(OPT_STARTTLS, REP_ACK)],
            TlsExpect::Ended(End::Error(ProtocolError::PlaintextAfterStartTls)),
        ),
        (
            "a client without fixed newstyle cannot start TLS",
            [flags(0), opt(OPT_STARTTLS, &[])].concat(),
            vec![],
            TlsExpect::Ended(End::Error(ProtocolError::NotFixedNewstyle(OPT_STARTTLS))),
        ),
        (
            "a client without fixed newstyle and EXPORT_NAME",
            [flags(0), opt(OPT_EXPORT_NAME, b"disk")].concat(),
            vec![],
            TlsExpect::Ended(End::Error(ProtocolError::ExportNameWithoutTls)),
        ),
    ];
    for (name, input, want_replies, want) in cases {
        // Whole, and one byte at a time: the same outcome.
        for bytewise in [false, true] {
            let mut c = tls_conn();
            if bytewise {
                for b in input.chunks(1) {
                    c.handle_input(b);
                }
            } else {
                c.handle_input(&input);
            }
            let msgs = decode(&output(&mut c), &HashMap::new(), None);
            assert_eq!(
                msgs[0],
                Msg::Greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES),
                "{name}"
            );
            assert_eq!(opt_replies(&msgs), want_replies, "{name}");
            assert!(
                !msgs.iter().any(|m| matches!(m, Msg::Opt { data, .. } if
                    data.windows(4).any(|w| w == b"disk"))),
                "{name}: an export name went out in plain text: {msgs:?}"
            );
            let ev = events(&mut c);
            assert!(!c.tls_active(), "{name}");
            assert!(
                !ev.iter()
                    .any(|e| matches!(e, Event::Request(_) | Event::ExportChosen { .. })),
                "{name}: {ev:?}"
            );
            match &want {
                TlsExpect::Open => {
                    assert!(ev.is_empty(), "{name}: {ev:?}");
                    assert!(c.wants_input() && !c.starting_tls(), "{name}");
                }
                TlsExpect::Handshake => {
                    assert_eq!(ev, vec![Event::StartTls], "{name}");
                    assert!(c.starting_tls() && !c.wants_input(), "{name}");
                }
                TlsExpect::Ended(end) => {
                    assert_eq!(ev.last(), Some(&Event::End(end.clone())), "{name}: {ev:?}");
                    assert!(c.is_ended() && !c.wants_input(), "{name}");
                }
            }
        }
    }
}

/// Once the layer above reports the handshake done, haggling goes on inside TLS as on
/// a plain server: STARTTLS again is invalid, nothing is answered `TLS_REQD`, and GO
/// leads to transmission.
#[test]
fn after_the_tls_handshake_haggling_goes_on_inside_tls() {
    let mut c = tls_conn();
    c.handle_input(&[flags(BOTH), opt(OPT_STARTTLS, &[])].concat());
    assert_eq!(events(&mut c), vec![Event::StartTls]);
    let plain = output(&mut c);
    assert_eq!(
        opt_replies(&decode(&plain, &HashMap::new(), None)),
        vec![(OPT_STARTTLS, REP_ACK)]
    );
    // Until the handshake is reported, nothing is taken in.
    assert!(!c.wants_input() && c.starting_tls());
    c.tls_started();
    assert!(c.tls_active() && c.wants_input() && !c.starting_tls());
    assert!(
        !c.has_output(),
        "the handshake itself is not the core's business"
    );
    c.handle_input(
        &[
            opt(OPT_STARTTLS, &[]),
            opt(OPT_LIST, &[]),
            opt(OPT_STRUCTURED_REPLY, &[]),
            opt(OPT_EXPORT_NAME, b"disk"),
        ]
        .concat(),
    );
    // The output inside TLS, decoded as a client would after the greeting.
    let mut inside = plain[..GREETING_LEN].to_vec();
    inside.extend(output(&mut c));
    let msgs = decode(&inside, &HashMap::new(), Some(true));
    assert_eq!(
        opt_replies(&msgs),
        vec![
            (OPT_STARTTLS, REP_ERR_INVALID),
            (OPT_LIST, REP_SERVER),
            (OPT_LIST, REP_SERVER),
            (OPT_LIST, REP_SERVER),
            (OPT_LIST, REP_ACK),
            (OPT_STRUCTURED_REPLY, REP_ACK),
        ]
    );
    assert!(matches!(msgs.last(), Some(Msg::ExportName { size, .. }) if *size == 1 << 20));
    assert!(matches!(&events(&mut c)[..], [Event::ExportChosen { name, .. }] if name == "disk"));
    // Requests now reach the layer above.
    c.handle_input(&req(0, CMD_READ, 5, 0, 512, &[]));
    assert!(matches!(&events(&mut c)[..], [Event::Request(r)] if r.cookie == Cookie(5)));
    // A second report of a handshake changes nothing.
    c.tls_started();
    assert!(c.in_transmission());
}

/// Without TLS, STARTTLS is unsupported and nothing asks for TLS; `tls_started` at a
/// time nobody asked for it is ignored.
#[test]
fn without_tls_starttls_is_unsupported() {
    let mut c = conn();
    c.tls_started();
    c.handle_input(&[flags(BOTH), opt(OPT_STARTTLS, &[]), opt(OPT_LIST, &[])].concat());
    let msgs = decode(&output(&mut c), &HashMap::new(), None);
    assert_eq!(opt_replies(&msgs)[0], (OPT_STARTTLS, REP_ERR_UNSUP));
    assert_eq!(opt_replies(&msgs).last(), Some(&(OPT_LIST, REP_ACK)));
    assert!(events(&mut c).is_empty());
    assert!(!c.tls_active() && !c.starting_tls());
}

// ---- transmission ----------------------------------------------------------------------

/// A connection in transmission on `export`; the handshake output is dropped.
fn ready(export: &str, structured: bool) -> Connection {
    let mut c = conn();
    c.handle_input(&go_into(export, structured));
    output(&mut c);
    assert!(matches!(events(&mut c)[..], [Event::ExportChosen { .. }]));
    c
}

/// Decodes transmission output (replies only).
fn replies(c: &mut Connection, read_lens: &[(u64, u32)]) -> Vec<Msg> {
    let mut bytes = Vec::new();
    bytes.extend(NBDMAGIC.to_be_bytes());
    bytes.extend(IHAVEOPT.to_be_bytes());
    bytes.extend(0u16.to_be_bytes());
    bytes.extend(output(c));
    let mut m = decode(&bytes, &read_lens.iter().copied().collect(), None);
    m.remove(0);
    m
}

fn error_chunk(cookie: u64, code: ErrorCode) -> impl Fn(&Msg) -> bool {
    move |m| match m {
        Msg::Chunk {
            flags: REPLY_FLAG_DONE,
            kind: REPLY_TYPE_ERROR,
            cookie: c,
            payload,
        } => *c == cookie && payload[..4] == code.code().to_be_bytes(),
        _ => false,
    }
}

#[test]
fn invalid_requests_are_answered_here() {
    // (name, export, request bytes, expected error)
    let big = 32u32 << 20;
    let cases: Vec<(&str, &str, Vec<u8>, ErrorCode)> = vec![
        (
            "read past the end",
            "disk",
            req(0, CMD_READ, 1, (1 << 20) - 10, 11, &[]),
            ErrorCode::Inval,
        ),
        (
            "read offset overflows",
            "disk",
            req(0, CMD_READ, 1, u64::MAX, 2, &[]),
            ErrorCode::Inval,
        ),
        (
            "read above the limit",
            "disk",
            req(0, CMD_READ, 1, 0, big + 1, &[]),
            ErrorCode::Inval,
        ),
        (
            "write past the end",
            "disk",
            req(0, CMD_WRITE, 1, 1 << 20, 3, b"abc"),
            ErrorCode::NoSpc,
        ),
        (
            "write on read-only",
            "ro",
            req(0, CMD_WRITE, 1, 0, 3, b"abc"),
            ErrorCode::Perm,
        ),
        (
            "trim on read-only",
            "ro",
            req(0, CMD_TRIM, 1, 0, 3, &[]),
            ErrorCode::Perm,
        ),
        (
            "write zeroes on read-only",
            "ro",
            req(0, CMD_WRITE_ZEROES, 1, 0, 512, &[]),
            ErrorCode::Perm,
        ),
        (
            "write with FUA on read-only",
            "ro",
            req(CMD_FLAG_FUA, CMD_WRITE, 1, 512, 4, b"abcd"),
            ErrorCode::Perm,
        ),
        (
            "zero-length write on read-only",
            "ro",
            req(0, CMD_WRITE, 1, 0, 0, &[]),
            ErrorCode::Perm,
        ),
        (
            "write past the end of read-only",
            "ro",
            req(0, CMD_WRITE, 1, 4095, 2, b"ab"),
            ErrorCode::Perm,
        ),
        (
            "trim past the end of read-only",
            "ro",
            req(0, CMD_TRIM, 1, 4096, 1, &[]),
            ErrorCode::Perm,
        ),
        (
            "trim past the end",
            "disk",
            req(0, CMD_TRIM, 1, 1 << 20, 1, &[]),
            ErrorCode::Inval,
        ),
        (
            "zeroes past the end",
            "disk",
            req(0, CMD_WRITE_ZEROES, 1, 1, 1 << 20, &[]),
            ErrorCode::NoSpc,
        ),
        (
            "trim unsupported",
            "plain",
            req(0, CMD_TRIM, 1, 0, 1, &[]),
            ErrorCode::Inval,
        ),
        (
            "zeroes unsupported",
            "plain",
            req(0, CMD_WRITE_ZEROES, 1, 0, 1, &[]),
            ErrorCode::Inval,
        ),
        (
            "flush unsupported",
            "plain",
            req(0, CMD_FLUSH, 1, 0, 0, &[]),
            ErrorCode::Inval,
        ),
        (
            "flush with a range",
            "disk",
            req(0, CMD_FLUSH, 1, 4, 0, &[]),
            ErrorCode::Inval,
        ),
        (
            "cache",
            "disk",
            req(0, CMD_CACHE, 1, 0, 1, &[]),
            ErrorCode::Inval,
        ),
        (
            "block status",
            "disk",
            req(0, CMD_BLOCK_STATUS, 1, 0, 1, &[]),
            ErrorCode::Inval,
        ),
        (
            "unknown command",
            "disk",
            req(0, 99, 1, 0, 1, &[]),
            ErrorCode::Inval,
        ),
        (
            "fast zero not offered",
            "disk",
            req(CMD_FLAG_FAST_ZERO, CMD_WRITE_ZEROES, 1, 0, 1, &[]),
            ErrorCode::Inval,
        ),
        (
            "don't-fragment on a write",
            "disk",
            req(CMD_FLAG_DF, CMD_WRITE, 1, 0, 1, b"x"),
            ErrorCode::Inval,
        ),
        (
            "unknown flag",
            "disk",
            req(1 << 9, CMD_READ, 1, 0, 1, &[]),
            ErrorCode::Inval,
        ),
    ];
    for (name, export, input, code) in cases {
        let mut c = ready(export, true);
        // A valid read after the bad request shows the stream stayed in step.
        c.handle_input(&[input, req(0, CMD_READ, 2, 0, 1, &[])].concat());
        let ev = events(&mut c);
        assert!(
            matches!(
                &ev[..],
                [Event::Request(Request {
                    cookie: Cookie(2),
                    ..
                })]
            ),
            "{name}: nothing but the good read is handed up: {ev:?}"
        );
        let r = replies(&mut c, &[]);
        assert_eq!(r.len(), 1, "{name}: {r:?}");
        assert!(error_chunk(1, code)(&r[0]), "{name}: {r:?}");
        assert_eq!(c.in_flight(), 1, "{name}");
    }
}

/// A read-only export: every kind of write is refused with `EPERM` and never handed up
/// (so nothing can change), while reads and flushes are, in both reply modes.
#[test]
fn a_read_only_export_hands_up_reads_and_flushes_only() {
    for structured in [false, true] {
        let mut c = ready("ro", structured);
        c.handle_input(
            &[
                req(0, CMD_WRITE, 1, 0, 3, b"abc"),
                req(0, CMD_READ, 2, 0, 8, &[]),
                req(0, CMD_TRIM, 3, 0, 4096, &[]),
                req(0, CMD_FLUSH, 4, 0, 0, &[]),
                req(CMD_FLAG_NO_HOLE, CMD_WRITE_ZEROES, 5, 8, 8, &[]),
                req(0, CMD_READ, 6, 4088, 8, &[]),
            ]
            .concat(),
        );
        let handed: Vec<(u64, Command)> = events(&mut c)
            .into_iter()
            .map(|e| match e {
                Event::Request(r) => (r.cookie.0, r.command),
                other => panic!("structured {structured}: unexpected {other:?}"),
            })
            .collect();
        assert_eq!(
            handed,
            vec![
                (
                    2,
                    Command::Read {
                        offset: Offset(0),
                        len: 8
                    }
                ),
                (4, Command::Flush),
                (
                    6,
                    Command::Read {
                        offset: Offset(4088),
                        len: 8
                    }
                ),
            ],
            "structured {structured}"
        );
        let refused = replies(&mut c, &[]);
        assert_eq!(refused.len(), 3, "structured {structured}: {refused:?}");
        for (msg, cookie) in refused.iter().zip([1u64, 3, 5]) {
            let ok = if structured {
                error_chunk(cookie, ErrorCode::Perm)(msg)
            } else {
                matches!(msg, Msg::Simple { error: 1, cookie: c, .. } if *c == cookie)
            };
            assert!(ok, "structured {structured}: cookie {cookie}: {msg:?}");
        }
        assert_eq!(c.in_flight(), 3, "structured {structured}");
    }
}

#[test]
fn simple_replies_without_structured() {
    let mut c = ready("disk", false);
    c.handle_input(
        &[
            req(0, CMD_READ, 1, 0, 4, &[]),
            req(0, CMD_READ, 2, 1 << 20, 4, &[]),
            req(0, CMD_WRITE, 3, 0, 2, b"hi"),
            req(0, CMD_READ, 4, 0, 0, &[]),
            req(CMD_FLAG_DF, CMD_READ, 5, 0, 1, &[]),
        ]
        .concat(),
    );
    let ev = events(&mut c);
    assert_eq!(ev.len(), 2, "{ev:?}");
    c.reply(Cookie(1), Reply::Data(Bytes::from_static(b"abcd")))
        .unwrap();
    c.reply(Cookie(3), Reply::Ok).unwrap();
    let r = replies(&mut c, &[(1, 4), (4, 0)]);
    assert_eq!(
        r,
        vec![
            Msg::Simple {
                error: 22,
                cookie: 2,
                data: vec![]
            },
            Msg::Simple {
                error: 0,
                cookie: 4,
                data: vec![]
            },
            Msg::Simple {
                error: 22,
                cookie: 5,
                data: vec![]
            },
            Msg::Simple {
                error: 0,
                cookie: 1,
                data: b"abcd".to_vec()
            },
            Msg::Simple {
                error: 0,
                cookie: 3,
                data: vec![]
            },
        ]
    );
}

#[test]
fn requests_are_handed_up_and_answered_out_of_order() {
    let mut c = ready("disk", true);
    let payload = vec![7u8; 1000];
    c.handle_input(
        &[
            req(0, CMD_READ, 10, 5, 3, &[]),
            req(CMD_FLAG_FUA, CMD_WRITE, 11, 1, 1000, &payload),
            req(0, CMD_FLUSH, 12, 0, 0, &[]),
            req(CMD_FLAG_FUA, CMD_TRIM, 13, 100, 50, &[]),
            req(CMD_FLAG_NO_HOLE, CMD_WRITE_ZEROES, 14, 7, 9, &[]),
            req(0, CMD_WRITE, 15, 0, 0, &[]),
        ]
        .concat(),
    );
    let ev = events(&mut c);
    let cmds: Vec<Command> = ev
        .into_iter()
        .map(|e| match e {
            Event::Request(r) => r.command,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(
        cmds,
        vec![
            Command::Read {
                offset: Offset(5),
                len: 3
            },
            Command::Write {
                offset: Offset(1),
                data: Bytes::from(payload),
                fua: true
            },
            Command::Flush,
            Command::Trim {
                offset: Offset(100),
                len: 50,
                fua: true
            },
            Command::WriteZeroes {
                offset: Offset(7),
                len: 9,
                fua: false,
                no_hole: true,
            },
        ]
    );
    assert_eq!(c.in_flight(), 5);
    // The zero-length write was answered at once.
    assert_eq!(
        replies(&mut c, &[]),
        vec![Msg::Simple {
            error: 0,
            cookie: 15,
            data: vec![]
        }]
    );
    // Answer in reverse order, one with an error.
    c.reply(Cookie(14), Reply::Ok).unwrap();
    c.reply(Cookie(13), Reply::error(ErrorCode::Io, "disk on fire"))
        .unwrap();
    c.reply(Cookie(12), Reply::Ok).unwrap();
    c.reply(Cookie(11), Reply::Ok).unwrap();
    c.reply(Cookie(10), Reply::Data(Bytes::from_static(b"xyz")))
        .unwrap();
    let r = replies(&mut c, &[]);
    assert_eq!(r.len(), 5);
    assert_eq!(
        r[0],
        Msg::Simple {
            error: 0,
            cookie: 14,
            data: vec![]
        }
    );
    assert!(error_chunk(13, ErrorCode::Io)(&r[1]));
    let mut data = 5u64.to_be_bytes().to_vec();
    data.extend(b"xyz");
    assert_eq!(
        r[4],
        Msg::Chunk {
            flags: REPLY_FLAG_DONE,
            kind: REPLY_TYPE_OFFSET_DATA,
            cookie: 10,
            payload: data
        }
    );
    assert_eq!(c.in_flight(), 0);
}

#[test]
fn wrong_replies_are_refused_and_the_request_stays_in_flight() {
    let mut c = ready("disk", true);
    c.handle_input(
        &[
            req(0, CMD_READ, 1, 0, 4, &[]),
            req(0, CMD_FLUSH, 2, 0, 0, &[]),
        ]
        .concat(),
    );
    assert_eq!(events(&mut c).len(), 2);
    assert_eq!(
        c.reply(Cookie(9), Reply::Ok),
        Err(ReplyError::UnknownCookie(Cookie(9)))
    );
    assert!(matches!(
        c.reply(Cookie(1), Reply::Data(Bytes::from_static(b"abc"))),
        Err(ReplyError::WrongLength {
            expected: 4,
            got: 3,
            ..
        })
    ));
    assert_eq!(
        c.reply(Cookie(1), Reply::Ok),
        Err(ReplyError::ReadWithoutData(Cookie(1)))
    );
    assert_eq!(
        c.reply(Cookie(2), Reply::Data(Bytes::new())),
        Err(ReplyError::DataForNonRead(Cookie(2)))
    );
    assert_eq!(c.in_flight(), 2);
    assert!(!c.has_output());
    c.reply(Cookie(1), Reply::error(ErrorCode::Io, "")).unwrap();
    c.reply(Cookie(2), Reply::Ok).unwrap();
    assert_eq!(c.in_flight(), 0);
    // A cookie may be used again once answered.
    c.handle_input(&req(0, CMD_FLUSH, 2, 0, 0, &[]));
    assert_eq!(events(&mut c).len(), 1);
}

#[test]
fn sessions_that_end() {
    // (name, requests, expected end, replies expected before the end)
    let cases: Vec<(&str, Vec<u8>, End, usize)> = vec![
        (
            "disconnect; what follows is ignored",
            [
                req(0, CMD_DISC, 1, 0, 0, &[]),
                req(0, CMD_READ, 2, 0, 1, &[]),
            ]
            .concat(),
            End::Disconnect,
            0,
        ),
        (
            "bad request magic",
            {
                let mut r = req(0, CMD_READ, 1, 0, 1, &[]);
                r[3] ^= 1;
                r
            },
            End::Error(ProtocolError::BadRequestMagic(REQUEST_MAGIC ^ 1)),
            0,
        ),
        (
            "write above the limit: EINVAL, then close",
            req(0, CMD_WRITE, 1, 0, (32 << 20) + 1, &[]),
            End::Error(ProtocolError::WriteTooLarge {
                len: (32 << 20) + 1,
                max: 32 << 20,
            }),
            1,
        ),
        (
            "a cookie reused while in flight",
            [
                req(0, CMD_READ, 7, 0, 1, &[]),
                req(0, CMD_FLUSH, 7, 0, 0, &[]),
            ]
            .concat(),
            End::Error(ProtocolError::DuplicateCookie(Cookie(7))),
            0,
        ),
    ];
    for (name, input, end, n_replies) in cases {
        let mut c = ready("disk", true);
        c.handle_input(&input);
        let ev = events(&mut c);
        assert_eq!(ev.last(), Some(&Event::End(end.clone())), "{name}");
        assert_eq!(c.end(), Some(&end), "{name}");
        assert!(!c.wants_input() && c.buffered_input() == 0, "{name}");
        assert_eq!(replies(&mut c, &[]).len(), n_replies, "{name}");
        c.handle_input(&req(0, CMD_READ, 99, 0, 1, &[]));
        assert!(
            events(&mut c).is_empty(),
            "{name}: input after the end is ignored"
        );
    }
}

#[test]
fn replies_after_disconnect_still_go_out_but_not_after_an_error() {
    let mut c = ready("disk", true);
    c.handle_input(
        &[
            req(0, CMD_FLUSH, 1, 0, 0, &[]),
            req(0, CMD_DISC, 2, 0, 0, &[]),
        ]
        .concat(),
    );
    assert_eq!(events(&mut c).len(), 2);
    c.reply(Cookie(1), Reply::Ok).unwrap();
    assert_eq!(replies(&mut c, &[]).len(), 1);

    let mut c = ready("disk", true);
    let mut bad = req(0, CMD_READ, 2, 0, 1, &[]);
    bad[0] = 0;
    c.handle_input(&[req(0, CMD_FLUSH, 1, 0, 0, &[]), bad].concat());
    assert_eq!(events(&mut c).len(), 2);
    c.reply(Cookie(1), Reply::Ok).unwrap();
    assert!(!c.has_output());
}

#[test]
fn parsing_pauses_while_too_much_is_in_flight() {
    let limits = Limits {
        max_in_flight: 2,
        max_in_flight_bytes: 10_000,
        ..Limits::default()
    };
    let mut c = Connection::new(exports(), limits);
    c.handle_input(&go_into("disk", true));
    output(&mut c);
    events(&mut c);
    let input: Vec<u8> = (0..5u64)
        .flat_map(|i| req(0, CMD_READ, i, 0, 100, &[]))
        .collect();
    c.handle_input(&input);
    assert_eq!(events(&mut c).len(), 2);
    assert!(!c.wants_input());
    c.reply(Cookie(0), Reply::Data(Bytes::from(vec![0; 100])))
        .unwrap();
    assert_eq!(events(&mut c).len(), 1, "one slot freed, one more request");
    // A large read fills the byte budget on its own.
    c.reply(Cookie(1), Reply::Data(Bytes::from(vec![0; 100])))
        .unwrap();
    c.reply(Cookie(2), Reply::Data(Bytes::from(vec![0; 100])))
        .unwrap();
    assert_eq!(events(&mut c).len(), 2);
    c.reply(Cookie(3), Reply::Data(Bytes::from(vec![0; 100])))
        .unwrap();
    c.reply(Cookie(4), Reply::Data(Bytes::from(vec![0; 100])))
        .unwrap();
    c.handle_input(
        &[
            req(0, CMD_READ, 5, 0, 20_000, &[]),
            req(0, CMD_READ, 6, 0, 1, &[]),
        ]
        .concat(),
    );
    assert_eq!(events(&mut c).len(), 1);
    assert!(!c.wants_input());
    c.reply(Cookie(5), Reply::Data(Bytes::from(vec![0; 20_000])))
        .unwrap();
    assert_eq!(events(&mut c).len(), 1);
    assert!(c.wants_input());
}

#[test]
fn a_write_payload_may_arrive_byte_by_byte() {
    let mut c = ready("disk", true);
    let data: Vec<u8> = (0..=255).collect();
    let input = req(0, CMD_WRITE, 1, 3, 256, &data);
    for b in &input {
        assert!(events(&mut c).is_empty());
        c.handle_input(std::slice::from_ref(b));
    }
    match &events(&mut c)[..] {
        [Event::Request(Request {
            command:
                Command::Write {
                    offset,
                    data: d,
                    fua: false,
                },
            ..
        })] => {
            assert_eq!(*offset, Offset(3));
            assert_eq!(&d[..], &data[..]);
        }
        other => panic!("{other:?}"),
    }
}

// ---- properties ------------------------------------------------------------------------

/// Feeds `chunks`, gathering events without answering; then answers every request in
/// the order handed up (reads with bytes of the cookie's value) until nothing new comes.
/// Returns everything the server said and did.
fn run(chunks: &[&[u8]], limits: Limits) -> (Vec<u8>, Vec<Event>) {
    run_with(chunks, limits, TlsPolicy::Off)
}

/// [`run`] under a TLS policy; a handshake asked for never happens (the client is taken
/// to speak plain text throughout).
fn run_with(chunks: &[&[u8]], limits: Limits, tls: TlsPolicy) -> (Vec<u8>, Vec<Event>) {
    let mut c = Connection::with_tls(exports(), limits, tls);
    let mut evs = Vec::new();
    let mut out = Vec::new();
    for ch in chunks {
        c.handle_input(ch);
        evs.extend(events(&mut c));
        out.extend(output(&mut c));
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
            let reply = match r.command {
                Command::Read { len, .. } => {
                    Reply::Data(Bytes::from(vec![r.cookie.0 as u8; len as usize]))
                }
                _ if r.cookie.0 % 3 == 0 => Reply::error(ErrorCode::Io, "no"),
                _ => Reply::Ok,
            };
            c.reply(r.cookie, reply)
                .expect("the reply fits its request");
        }
        evs.extend(events(&mut c));
        out.extend(output(&mut c));
    }
    assert!(c.in_flight() == 0 || c.is_ended());
    (out, evs)
}

fn any_option() -> impl Strategy<Value = Vec<u8>> {
    let name = prop_oneof![
        Just("disk".to_string()),
        Just("ro".to_string()),
        Just("plain".to_string()),
        Just(String::new()),
        "[a-z]{0,6}",
    ];
    prop_oneof![
        Just(opt(OPT_STRUCTURED_REPLY, &[])),
        Just(opt(OPT_LIST, &[])),
        Just(opt(OPT_EXTENDED_HEADERS, &[])),
        Just(opt(OPT_STARTTLS, &[])),
        (name.clone(), proptest::collection::vec(0u16..5, 0..4))
            .prop_map(|(n, i)| opt(OPT_INFO, &info_data(&n, &i))),
        (name.clone(), proptest::collection::vec(0u16..5, 0..4))
            .prop_map(|(n, i)| opt(OPT_GO, &info_data(&n, &i))),
        name.clone()
            .prop_map(|n| opt(OPT_EXPORT_NAME, n.as_bytes())),
        name.prop_map(|n| opt(OPT_SET_META_CONTEXT, &meta_data(&n, &["base:allocation"]))),
        (any::<u32>(), proptest::collection::vec(any::<u8>(), 0..40))
            .prop_map(|(o, d)| opt(o % 16, &d)),
        Just(opt(OPT_ABORT, &[])),
    ]
}

fn any_request() -> impl Strategy<Value = Vec<u8>> {
    let offset = prop_oneof![0u64..(1 << 20) + 10, Just(u64::MAX - 3)];
    let flags = prop_oneof![Just(0u16), Just(CMD_FLAG_FUA), any::<u16>()];
    prop_oneof![
        8 => (flags.clone(), 0u16..10, 0u64..8, offset.clone(), 0u32..3000).prop_map(
            |(f, k, c, o, l)| if k == CMD_WRITE {
                req(f, k, c, o, l, &vec![0xaa; l as usize])
            } else {
                req(f, k, c, o, l, &[])
            }
        ),
        1 => (0u64..8, offset).prop_map(|(c, o)| req(0, CMD_READ, c, o, 40 << 20, &[])),
        1 => proptest::collection::vec(any::<u8>(), 0..40),
    ]
}

/// A plausible session: flags, options, requests, with some garbage mixed in.
fn any_session() -> impl Strategy<Value = Vec<u8>> {
    (
        prop_oneof![8 => Just(BOTH), 1 => Just(FLAG_C_FIXED_NEWSTYLE), 1 => any::<u32>()],
        proptest::collection::vec(any_option(), 0..6),
        any::<bool>(),
        proptest::collection::vec(any_request(), 0..30),
    )
        .prop_map(|(f, opts, go, reqs)| {
            let mut v = flags(f);
            for o in opts {
                v.extend(o);
            }
            if go {
                v.extend(opt(OPT_STRUCTURED_REPLY, &[]));
                v.extend(opt(OPT_GO, &info_data("disk", &[])));
            }
            for r in reqs {
                v.extend(r);
            }
            v
        })
}

fn split<'a>(input: &'a [u8], cuts: &[usize]) -> Vec<&'a [u8]> {
    let mut points: Vec<usize> = cuts.iter().map(|c| c % (input.len() + 1)).collect();
    points.sort_unstable();
    let mut out = Vec::new();
    let mut prev = 0;
    for p in points {
        out.push(&input[prev..p]);
        prev = p;
    }
    out.push(&input[prev..]);
    out
}

fn small_limits() -> Limits {
    Limits {
        max_in_flight: 3,
        max_in_flight_bytes: 4096,
        max_option_len: 64,
        max_options: 5,
        ..Limits::default()
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn arbitrary_bytes_never_panic(
        prefix in any::<bool>(),
        junk in proptest::collection::vec(any::<u8>(), 0..2048),
        cuts in proptest::collection::vec(any::<usize>(), 0..8),
    ) {
        let mut input = if prefix { go_into("disk", true) } else { Vec::new() };
        input.extend(junk);
        let whole = run(&[&input], Limits::default());
        let pieces = run(&split(&input, &cuts), Limits::default());
        prop_assert_eq!(whole, pieces);
    }

    #[test]
    fn splitting_the_input_changes_nothing(
        input in any_session(),
        cuts in proptest::collection::vec(any::<usize>(), 0..12),
        small in any::<bool>(),
    ) {
        let limits = if small { small_limits() } else { Limits::default() };
        let whole = run(&[&input], limits);
        let pieces = run(&split(&input, &cuts), limits);
        prop_assert_eq!(&whole, &pieces);
        // One byte at a time, too.
        let bytes: Vec<&[u8]> = input.chunks(1).collect();
        prop_assert_eq!(&whole, &run(&bytes, limits));
        // Whatever happened, nothing invalid was handed up.
        for e in &whole.1 {
            if let Event::Request(r) = e {
                match &r.command {
                    Command::Read { offset, len } | Command::Trim { offset, len, .. }
                    | Command::WriteZeroes { offset, len, .. } => {
                        prop_assert!(*len > 0 && offset.0 + *len as u64 <= 1 << 20);
                    }
                    Command::Write { offset, data, .. } => {
                        prop_assert!(!data.is_empty() && offset.0 + data.len() as u64 <= 1 << 20);
                    }
                    Command::Flush => {}
                }
            }
        }
    }

    /// With TLS required and no handshake, any session in plain text, however split,
    /// gets the same outcome, reaches no export and hands up no request; the only
    /// option replies are refusals, the ACKs of STARTTLS and ABORT, and errors for
    /// malformed options.
    #[test]
    fn with_tls_required_plain_text_reaches_nothing(
        input in any_session(),
        cuts in proptest::collection::vec(any::<usize>(), 0..12),
        small in any::<bool>(),
    ) {
        let limits = if small { small_limits() } else { Limits::default() };
        let whole = run_with(&[&input], limits, TlsPolicy::Required);
        let pieces = run_with(&split(&input, &cuts), limits, TlsPolicy::Required);
        prop_assert_eq!(&whole, &pieces);
        for e in &whole.1 {
            prop_assert!(
                matches!(e, Event::StartTls | Event::End(_)),
                "{:?}", e
            );
        }
        let msgs = decode(&whole.0, &HashMap::new(), None);
        for (option, kind) in opt_replies(&msgs) {
            let ok = kind == REP_ERR_TLS_REQD
                || kind == REP_ERR_TOO_BIG
                || (option == OPT_ABORT && kind == REP_ACK)
                || (option == OPT_STARTTLS && (kind == REP_ACK || kind == REP_ERR_INVALID));
            prop_assert!(ok, "option {} got reply {:#x}", option, kind);
        }
    }
}
