//! The server side of one NBD connection as a state machine without I/O.
//!
//! Bytes from the client go in with [`Connection::handle_input`]; bytes for the client
//! come out of [`Connection::poll_output`]; what the layer above must do comes out of
//! [`Connection::poll_event`], and its answers go back in with [`Connection::reply`].
//!
//! Invariants:
//! - The outcome (output bytes and events) depends only on the concatenation of the
//!   input and on the replies given, never on how the input was split.
//! - No input makes it panic, and memory is bounded by [`Limits`]: a length from the
//!   client is checked against its limit before anything is allocated for it, at most
//!   one incomplete message is buffered, and no new request is parsed while
//!   `max_in_flight` requests (or `max_in_flight_bytes` bytes) await their replies.
//! - Every [`Request`] handed up is in range for its export, allowed by the export's
//!   flags and carries at most `max_request` bytes: nothing invalid reaches the layer
//!   above. Invalid requests are answered here, with the error the protocol names.
//! - Every request handed up is answered exactly once; a cookie is never in flight
//!   twice.

use super::consts::*;
use crate::types::Offset;
use bytes::{Buf, BufMut, Bytes, BytesMut};
use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::Arc;

/// The client's opaque tag for a request ("handle" in older versions of the protocol
/// document); replies carry it back.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cookie(pub u64);

impl fmt::Display for Cookie {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

/// What an export supports, turned into transmission flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExportFlags {
    /// Writes, trims and write-zeroes fail with `EPERM`.
    pub read_only: bool,
    /// `NBD_CMD_FLUSH` is supported.
    pub flush: bool,
    /// `NBD_CMD_FLAG_FUA` is honoured.
    pub fua: bool,
    /// `NBD_CMD_TRIM` is supported (ignored on a read-only export).
    pub trim: bool,
    /// `NBD_CMD_WRITE_ZEROES` is supported (ignored on a read-only export).
    pub write_zeroes: bool,
    /// Flush and FUA on one connection cover writes completed on every connection.
    pub multi_conn: bool,
}

impl Default for ExportFlags {
    /// Writable, with flush, FUA, trim and write-zeroes; no multi-connection promise.
    fn default() -> Self {
        ExportFlags {
            read_only: false,
            flush: true,
            fua: true,
            trim: true,
            write_zeroes: true,
            multi_conn: false,
        }
    }
}

/// One export as the core describes it to clients.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Export {
    pub name: String,
    /// Size in bytes. Every request is checked against it.
    pub size: u64,
    /// Shown by `NBD_INFO_DESCRIPTION` when a client asks for it.
    pub description: Option<String>,
    pub flags: ExportFlags,
}

impl Export {
    /// A writable export with the default flags.
    pub fn new(name: impl Into<String>, size: u64) -> Export {
        Export {
            name: name.into(),
            size,
            description: None,
            flags: ExportFlags::default(),
        }
    }

    pub fn read_only(mut self) -> Export {
        self.flags.read_only = true;
        self
    }

    pub fn with_flags(mut self, flags: ExportFlags) -> Export {
        self.flags = flags;
        self
    }

    pub fn with_description(mut self, description: impl Into<String>) -> Export {
        self.description = Some(description.into());
        self
    }

    /// The transmission flags sent for this export; `structured` says whether
    /// structured replies were negotiated (`NBD_FLAG_SEND_DF` needs them).
    pub fn transmission_flags(&self, structured: bool) -> u16 {
        let f = &self.flags;
        let mut out = FLAG_HAS_FLAGS;
        if f.read_only {
            out |= FLAG_READ_ONLY;
        }
        if f.flush {
            out |= FLAG_SEND_FLUSH;
        }
        if f.fua {
            out |= FLAG_SEND_FUA;
        }
        if f.trim && !f.read_only {
            out |= FLAG_SEND_TRIM;
        }
        if f.write_zeroes && !f.read_only {
            out |= FLAG_SEND_WRITE_ZEROES;
        }
        if structured {
            // A read is always answered with one chunk, so "don't fragment" holds.
            out |= FLAG_SEND_DF;
        }
        if f.multi_conn {
            out |= FLAG_CAN_MULTI_CONN;
        }
        out
    }
}

/// Bounds on what one connection may make the server hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest read or write, in bytes (advertised as the maximum block size). A read
    /// above it gets `EINVAL`; a write above it gets `EINVAL` and the connection is
    /// closed, since its payload is not taken in. Trim and write-zeroes carry no
    /// payload and may span the whole export. Clamped to `u32::MAX - 8`.
    pub max_request: u32,
    /// Largest option payload during the handshake; a longer one is answered with
    /// `NBD_REP_ERR_TOO_BIG` and the connection is closed.
    pub max_option_len: u32,
    /// Options allowed in one handshake before the connection is closed.
    pub max_options: u32,
    /// Requests handed up and not yet answered before parsing pauses.
    pub max_in_flight: usize,
    /// Bytes (read lengths plus write payloads) handed up and not yet answered before
    /// parsing pauses; one request is always allowed, whatever its size.
    pub max_in_flight_bytes: u64,
}

impl Default for Limits {
    /// 32 MiB requests (the size the protocol says a client may always use), 16 KiB
    /// options, 4096 options, 64 requests or 64 MiB in flight.
    fn default() -> Self {
        Limits {
            max_request: 32 << 20,
            max_option_len: 16 << 10,
            max_options: 4096,
            max_in_flight: 64,
            max_in_flight_bytes: 64 << 20,
        }
    }
}

/// Whether a connection speaks TLS (`NBD_OPT_STARTTLS`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TlsPolicy {
    /// No TLS ("NOTLS" in the protocol): `NBD_OPT_STARTTLS` is answered
    /// `NBD_REP_ERR_UNSUP` and everything else works in plain text.
    #[default]
    Off,
    /// TLS is required ("FORCEDTLS"): until the TLS handshake succeeded every option but
    /// `NBD_OPT_STARTTLS` and `NBD_OPT_ABORT` is answered `NBD_REP_ERR_TLS_REQD`
    /// (exports are neither listed nor described), `NBD_OPT_EXPORT_NAME` (which cannot
    /// be answered with an error) ends the session, and no request is ever parsed.
    Required,
}

/// An NBD error value, as sent in replies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum ErrorCode {
    Perm = 1,
    Io = 5,
    NoMem = 12,
    Inval = 22,
    NoSpc = 28,
    Overflow = 75,
    NotSup = 95,
    Shutdown = 108,
}

impl ErrorCode {
    pub fn code(self) -> u32 {
        self as u32
    }

    /// The error for a value read off the wire (unknown values read as `EINVAL`, as the
    /// protocol tells clients to treat them).
    pub fn from_code(code: u32) -> ErrorCode {
        match code {
            1 => ErrorCode::Perm,
            5 => ErrorCode::Io,
            12 => ErrorCode::NoMem,
            28 => ErrorCode::NoSpc,
            75 => ErrorCode::Overflow,
            95 => ErrorCode::NotSup,
            108 => ErrorCode::Shutdown,
            _ => ErrorCode::Inval,
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            ErrorCode::Perm => "EPERM",
            ErrorCode::Io => "EIO",
            ErrorCode::NoMem => "ENOMEM",
            ErrorCode::Inval => "EINVAL",
            ErrorCode::NoSpc => "ENOSPC",
            ErrorCode::Overflow => "EOVERFLOW",
            ErrorCode::NotSup => "ENOTSUP",
            ErrorCode::Shutdown => "ESHUTDOWN",
        };
        f.write_str(name)
    }
}

/// A valid request for the layer above. Ranges are inside the export and lengths are
/// nonzero (zero-length requests are answered by the core).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub cookie: Cookie,
    pub command: Command,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// Answer with [`Reply::Data`] of exactly `len` bytes, or an error.
    Read { offset: Offset, len: u32 },
    /// Write `data`; with `fua`, make it durable before answering.
    Write {
        offset: Offset,
        data: Bytes,
        fua: bool,
    },
    /// Make every write answered before this request durable.
    Flush,
    /// The client no longer needs these bytes. tidemark zeroes them, so that the remote
    /// copy sees the same bytes in the same order.
    Trim { offset: Offset, len: u32, fua: bool },
    /// Write `len` zero bytes. With `no_hole` the client asked that the range stay
    /// allocated (`NBD_CMD_FLAG_NO_HOLE`): it must not be punched.
    WriteZeroes {
        offset: Offset,
        len: u32,
        fua: bool,
        no_hole: bool,
    },
}

impl Command {
    /// Whether this command changes the export.
    pub fn is_write(&self) -> bool {
        matches!(
            self,
            Command::Write { .. } | Command::Trim { .. } | Command::WriteZeroes { .. }
        )
    }

    /// Whether the client asked for Force Unit Access.
    pub fn fua(&self) -> bool {
        match self {
            Command::Write { fua, .. }
            | Command::Trim { fua, .. }
            | Command::WriteZeroes { fua, .. } => *fua,
            Command::Read { .. } | Command::Flush => false,
        }
    }
}

/// What the layer above answers to a [`Request`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    /// Success of anything but a read.
    Ok,
    /// Success of a read: exactly the bytes asked for.
    Data(Bytes),
    /// Failure; the message is shown to the user when structured replies are on.
    Error { code: ErrorCode, message: String },
}

impl Reply {
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Reply {
        Reply::Error {
            code,
            message: message.into(),
        }
    }
}

/// How a session ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum End {
    /// The client sent `NBD_OPT_ABORT` during the handshake (answered with an ACK).
    Abort,
    /// The client sent `NBD_CMD_DISC`: answer what is in flight, then close.
    Disconnect,
    /// The client broke the protocol: write out what is pending (it may hold an error
    /// reply), then close. Replies given after this are discarded.
    Error(ProtocolError),
}

/// What the layer above must act on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// The handshake is over and transmission starts on `exports[index]`.
    ExportChosen { index: usize, name: String },
    /// The client sent `NBD_OPT_STARTTLS` and its `NBD_REP_ACK` is the last of the
    /// output. The layer above writes out all pending output, then runs the TLS
    /// handshake as the server on the same stream (reading nothing from it in plain
    /// text meanwhile), and calls [`Connection::tls_started`] once it succeeded; every
    /// later byte, both ways, travels inside TLS. If the handshake fails it closes the
    /// connection. No input is taken until then ([`Connection::wants_input`] is false).
    StartTls,
    /// A request to carry out and answer with [`Connection::reply`].
    Request(Request),
    /// The last event of a session.
    End(End),
}

/// A client broke the protocol in a way that ends the session.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("client flags {0:#x} hold bits this server did not offer")]
    UnknownClientFlags(u32),
    #[error("option header magic is {0:#018x}, not IHAVEOPT")]
    BadOptionMagic(u64),
    #[error("option {option} carries {len} bytes, above the limit of {max}")]
    OptionTooLong { option: u32, len: u32, max: u32 },
    #[error("more than {0} options in one handshake")]
    TooManyOptions(u32),
    #[error("option {0} from a client that did not agree to fixed newstyle")]
    NotFixedNewstyle(u32),
    #[error("NBD_OPT_EXPORT_NAME asked for unknown export {0:?}")]
    UnknownExport(String),
    #[error("NBD_OPT_EXPORT_NAME before TLS, which this server requires")]
    ExportNameWithoutTls,
    #[error("bytes in plain text after NBD_OPT_STARTTLS, before the TLS handshake")]
    PlaintextAfterStartTls,
    #[error("request header magic is {0:#010x}, not {REQUEST_MAGIC:#010x}")]
    BadRequestMagic(u32),
    #[error("write of {len} bytes is above the {max}-byte request limit")]
    WriteTooLarge { len: u32, max: u32 },
    #[error("cookie {0} is already in flight")]
    DuplicateCookie(Cookie),
}

/// The layer above answered wrongly. The request stays in flight: answer it again.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReplyError {
    #[error("no request with cookie {0} is in flight")]
    UnknownCookie(Cookie),
    #[error("read {cookie} asked for {expected} bytes, the reply holds {got}")]
    WrongLength {
        cookie: Cookie,
        expected: u32,
        got: usize,
    },
    #[error("request {0} is not a read; its success carries no data")]
    DataForNonRead(Cookie),
    #[error("read {0} succeeded without data")]
    ReadWithoutData(Cookie),
}

/// Write payloads below this size are copied out of the input buffer, larger ones are
/// split off it without a copy.
const COPY_BELOW: usize = 64 << 10;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Waiting for the client's 32 flag bits.
    ClientFlags,
    /// Option haggling.
    Options,
    /// `NBD_OPT_STARTTLS` was acknowledged; waiting for [`Connection::tls_started`].
    StartingTls,
    Transmission,
    /// Nothing more is read.
    Ended,
}

#[derive(Clone, Copy, Debug)]
struct Pending {
    /// For a read: where and how much.
    read: Option<(Offset, u32)>,
    /// What this request counts against `max_in_flight_bytes`.
    bytes: u64,
}

/// The fixed part of a request.
#[derive(Clone, Copy, Debug)]
struct Header {
    flags: u16,
    kind: u16,
    cookie: Cookie,
    offset: u64,
    len: u32,
}

/// The server side of one NBD connection. See the module documentation.
pub struct Connection {
    exports: Arc<[Export]>,
    limits: Limits,
    phase: Phase,
    /// The client agreed to fixed newstyle.
    fixed: bool,
    /// The client agreed to leave out the `EXPORT_NAME` padding.
    no_zeroes: bool,
    tls: TlsPolicy,
    /// The TLS handshake succeeded: everything now travels inside TLS.
    tls_active: bool,
    structured: bool,
    options_seen: u32,
    export: Option<usize>,
    /// Unparsed input: at most one incomplete message, or what arrived while paused.
    input: BytesMut,
    /// Small messages are gathered here and become one chunk of `out`.
    small: BytesMut,
    out: VecDeque<Bytes>,
    events: VecDeque<Event>,
    in_flight: HashMap<Cookie, Pending>,
    in_flight_bytes: u64,
    end: Option<End>,
    /// Set on a protocol error: later replies are dropped.
    discard_output: bool,
}

impl fmt::Debug for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connection")
            .field("phase", &self.phase)
            .field("export", &self.export)
            .field("structured", &self.structured)
            .field("in_flight", &self.in_flight.len())
            .field("end", &self.end)
            .finish_non_exhaustive()
    }
}

impl Connection {
    /// A new connection without TLS; its greeting is waiting in the output.
    pub fn new(exports: impl Into<Arc<[Export]>>, limits: Limits) -> Connection {
        Connection::with_tls(exports, limits, TlsPolicy::Off)
    }

    /// A new connection with the given TLS policy; its greeting is waiting in the
    /// output.
    pub fn with_tls(
        exports: impl Into<Arc<[Export]>>,
        limits: Limits,
        tls: TlsPolicy,
    ) -> Connection {
        let mut limits = limits;
        limits.max_request = limits.max_request.min(u32::MAX - 8);
        limits.max_in_flight = limits.max_in_flight.max(1);
        let mut c = Connection {
            exports: exports.into(),
            limits,
            phase: Phase::ClientFlags,
            fixed: false,
            no_zeroes: false,
            tls,
            tls_active: false,
            structured: false,
            options_seen: 0,
            export: None,
            input: BytesMut::new(),
            small: BytesMut::new(),
            out: VecDeque::new(),
            events: VecDeque::new(),
            in_flight: HashMap::new(),
            in_flight_bytes: 0,
            end: None,
            discard_output: false,
        };
        c.small.put_u64(NBDMAGIC);
        c.small.put_u64(IHAVEOPT);
        c.small.put_u16(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        c
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Takes bytes from the client. Any split of the stream gives the same outcome.
    /// Input after the session ended is ignored.
    pub fn handle_input(&mut self, input: &[u8]) {
        if self.phase == Phase::Ended || input.is_empty() {
            return;
        }
        self.input.extend_from_slice(input);
        self.process();
    }

    /// Lends the input buffer, so that the layer above reads from the socket straight
    /// into it (no copy of request data between the socket and the requests): append to
    /// it, then hand it back with [`Connection::return_input`]. It has spare room for
    /// at least the rest of the request being parsed, or `min_room` bytes. While it is
    /// out, the connection parses nothing.
    pub fn lend_input(&mut self, min_room: usize) -> BytesMut {
        let mut input = std::mem::take(&mut self.input);
        if input.capacity() - input.len() < min_room.min(1 << 20) {
            input.reserve(min_room);
        }
        input
    }

    /// Takes back the buffer [`Connection::lend_input`] lent, with the bytes read into it
    /// since, and parses them. Input after the session ended is ignored.
    pub fn return_input(&mut self, input: BytesMut) {
        if self.phase == Phase::Ended {
            return;
        }
        self.input = input;
        self.process();
    }

    /// The next thing for the layer above to do.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// The next bytes to send to the client, in order.
    pub fn poll_output(&mut self) -> Option<Bytes> {
        if let Some(b) = self.out.pop_front() {
            return Some(b);
        }
        if self.small.is_empty() {
            None
        } else {
            Some(self.small.split().freeze())
        }
    }

    pub fn has_output(&self) -> bool {
        !self.out.is_empty() || !self.small.is_empty()
    }

    /// Whether more input is useful now: false once the session ended, and while
    /// parsing is paused because too much is in flight.
    pub fn wants_input(&self) -> bool {
        match self.phase {
            Phase::Ended => false,
            Phase::Transmission => !self.paused(),
            Phase::ClientFlags | Phase::Options => true,
            Phase::StartingTls => false,
        }
    }

    /// The layer above finished the TLS handshake that [`Event::StartTls`] asked for:
    /// option haggling goes on inside TLS. Ignored at any other time.
    pub fn tls_started(&mut self) {
        if self.phase != Phase::StartingTls {
            return;
        }
        self.tls_active = true;
        self.phase = Phase::Options;
        // Nothing negotiated in plain text survives the upgrade (the protocol forbids
        // keeping it: a man in the middle could have injected it). Under
        // `TlsPolicy::Required` nothing could be negotiated before, but say so anyway.
        self.structured = false;
        self.process();
    }

    /// Whether the TLS handshake succeeded on this connection.
    pub fn tls_active(&self) -> bool {
        self.tls_active
    }

    /// Whether the TLS handshake that [`Event::StartTls`] asked for is awaited.
    pub fn starting_tls(&self) -> bool {
        self.phase == Phase::StartingTls
    }

    /// Requests handed up and not answered yet.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Bytes received and not parsed yet (part of a message, when the client stops).
    pub fn buffered_input(&self) -> usize {
        self.input.len()
    }

    /// Whether transmission has started (and not ended).
    pub fn in_transmission(&self) -> bool {
        self.phase == Phase::Transmission
    }

    pub fn is_ended(&self) -> bool {
        self.phase == Phase::Ended
    }

    /// How the session ended, once it has.
    pub fn end(&self) -> Option<&End> {
        self.end.as_ref()
    }

    /// Whether structured replies were negotiated.
    pub fn structured(&self) -> bool {
        self.structured
    }

    /// The export chosen for transmission, with its index.
    pub fn export(&self) -> Option<(usize, &Export)> {
        let i = self.export?;
        self.exports.get(i).map(|e| (i, e))
    }

    /// Answers a request handed up by [`Event::Request`]. Requests may be answered in
    /// any order. Answering may let parsing resume (new events).
    pub fn reply(&mut self, cookie: Cookie, reply: Reply) -> Result<(), ReplyError> {
        let p = *self
            .in_flight
            .get(&cookie)
            .ok_or(ReplyError::UnknownCookie(cookie))?;
        match (&reply, p.read) {
            (Reply::Data(d), Some((_, len))) if d.len() != len as usize => {
                return Err(ReplyError::WrongLength {
                    cookie,
                    expected: len,
                    got: d.len(),
                })
            }
            (Reply::Data(_), None) => return Err(ReplyError::DataForNonRead(cookie)),
            (Reply::Ok, Some(_)) => return Err(ReplyError::ReadWithoutData(cookie)),
            _ => {}
        }
        self.in_flight.remove(&cookie);
        self.in_flight_bytes -= p.bytes;
        if !self.discard_output {
            match reply {
                Reply::Ok => self.emit_simple(0, cookie),
                Reply::Data(data) => {
                    let offset = p.read.map(|(o, _)| o).unwrap_or_default();
                    self.emit_read(cookie, offset, data);
                }
                Reply::Error { code, message } => self.emit_error(cookie, code, &message),
            }
        }
        if self.phase == Phase::Transmission {
            self.process();
        }
        Ok(())
    }

    // ---- parsing ----------------------------------------------------------------

    fn paused(&self) -> bool {
        !self.in_flight.is_empty()
            && (self.in_flight.len() >= self.limits.max_in_flight
                || self.in_flight_bytes >= self.limits.max_in_flight_bytes)
    }

    /// Parses as many complete messages as allowed.
    fn process(&mut self) {
        loop {
            let progressed = match self.phase {
                Phase::ClientFlags => self.step_client_flags(),
                Phase::Options => self.step_option(),
                Phase::StartingTls => {
                    // The client must wait for the ACK and then speak TLS: plain bytes
                    // here were sent before the handshake (or injected by someone on
                    // the path) and must never be taken as protected.
                    if !self.input.is_empty() {
                        self.fail(ProtocolError::PlaintextAfterStartTls);
                    }
                    false
                }
                Phase::Transmission => !self.paused() && self.step_request(),
                Phase::Ended => false,
            };
            if !progressed {
                break;
            }
        }
        if self.phase == Phase::Ended {
            self.input = BytesMut::new();
        }
    }

    fn finish(&mut self, end: End) {
        if self.phase == Phase::Ended {
            return;
        }
        if matches!(end, End::Error(_)) {
            // What was emitted so far (an error reply, perhaps) still goes out.
            self.discard_output = true;
        }
        self.phase = Phase::Ended;
        self.end = Some(end.clone());
        self.events.push_back(Event::End(end));
    }

    fn fail(&mut self, e: ProtocolError) {
        self.finish(End::Error(e));
    }

    fn step_client_flags(&mut self) -> bool {
        let Some(flags) = peek_u32(&self.input, 0) else {
            return false;
        };
        self.input.advance(4);
        if flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
            self.fail(ProtocolError::UnknownClientFlags(flags));
            return false;
        }
        self.fixed = flags & FLAG_C_FIXED_NEWSTYLE != 0;
        self.no_zeroes = flags & FLAG_C_NO_ZEROES != 0;
        self.phase = Phase::Options;
        true
    }

    fn step_option(&mut self) -> bool {
        let (Some(magic), Some(option), Some(len)) = (
            peek_u64(&self.input, 0),
            peek_u32(&self.input, 8),
            peek_u32(&self.input, 12),
        ) else {
            return false;
        };
        if magic != IHAVEOPT {
            self.fail(ProtocolError::BadOptionMagic(magic));
            return false;
        }
        if len > self.limits.max_option_len {
            if self.fixed {
                let msg = format!(
                    "option data of {len} bytes is above this server's limit of {}",
                    self.limits.max_option_len
                );
                self.option_reply(option, REP_ERR_TOO_BIG, msg.as_bytes());
            }
            self.fail(ProtocolError::OptionTooLong {
                option,
                len,
                max: self.limits.max_option_len,
            });
            return false;
        }
        let total = OPTION_HEADER_LEN + len as usize;
        if self.input.len() < total {
            self.input.reserve(total - self.input.len());
            return false;
        }
        self.input.advance(OPTION_HEADER_LEN);
        let data = self.input.split_to(len as usize).freeze();
        self.options_seen = self.options_seen.saturating_add(1);
        if self.options_seen > self.limits.max_options {
            self.fail(ProtocolError::TooManyOptions(self.limits.max_options));
            return false;
        }
        if !self.fixed && option != OPT_EXPORT_NAME {
            // Without fixed newstyle there is no way to answer: hang up.
            self.fail(ProtocolError::NotFixedNewstyle(option));
            return false;
        }
        self.handle_option(option, &data);
        self.phase != Phase::Ended
    }

    fn handle_option(&mut self, option: u32, data: &[u8]) {
        if option == OPT_STARTTLS {
            self.start_tls(data);
            return;
        }
        if self.tls == TlsPolicy::Required && !self.tls_active {
            match option {
                OPT_ABORT => {}
                OPT_EXPORT_NAME => {
                    // It cannot be answered with an error: the protocol says hang up.
                    self.fail(ProtocolError::ExportNameWithoutTls);
                    return;
                }
                _ => {
                    self.option_reply(
                        option,
                        REP_ERR_TLS_REQD,
                        b"this server requires TLS: send NBD_OPT_STARTTLS first",
                    );
                    return;
                }
            }
        }
        match option {
            OPT_EXPORT_NAME => match self.find_export(data) {
                Some(i) => {
                    let e = &self.exports[i];
                    let (size, flags) = (e.size, e.transmission_flags(self.structured));
                    self.small.put_u64(size);
                    self.small.put_u16(flags);
                    if !self.no_zeroes {
                        self.small.put_bytes(0, EXPORT_NAME_PADDING);
                    }
                    self.start_transmission(i);
                }
                None => self.fail(ProtocolError::UnknownExport(shown(data))),
            },
            OPT_ABORT => {
                // Any data is ignored, as the protocol asks.
                self.option_reply(option, REP_ACK, &[]);
                self.finish(End::Abort);
            }
            OPT_LIST => {
                if !data.is_empty() {
                    self.option_reply(option, REP_ERR_INVALID, b"NBD_OPT_LIST takes no data");
                    return;
                }
                let exports = self.exports.clone();
                for e in exports.iter() {
                    let mut d = BytesMut::with_capacity(4 + e.name.len());
                    put_len_u32(&mut d, e.name.len());
                    d.put_slice(e.name.as_bytes());
                    self.option_reply(option, REP_SERVER, &d);
                }
                self.option_reply(option, REP_ACK, &[]);
            }
            OPT_INFO | OPT_GO => self.info_or_go(option, data),
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    self.option_reply(
                        option,
                        REP_ERR_INVALID,
                        b"NBD_OPT_STRUCTURED_REPLY takes no data",
                    );
                    return;
                }
                self.structured = true;
                self.option_reply(option, REP_ACK, &[]);
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => self.meta_context(option, data),
            _ => {
                // EXTENDED_HEADERS and anything unknown: keep the connection.
                let msg = format!("option {option} is not supported by this server");
                self.option_reply(option, REP_ERR_UNSUP, msg.as_bytes());
            }
        }
    }

    /// `NBD_OPT_STARTTLS`: refused without TLS, and inside TLS; otherwise acknowledged,
    /// and the layer above is asked to start the handshake.
    fn start_tls(&mut self, data: &[u8]) {
        const OPTION: u32 = OPT_STARTTLS;
        if self.tls == TlsPolicy::Off {
            self.option_reply(OPTION, REP_ERR_UNSUP, b"this server does not offer TLS");
        } else if self.tls_active {
            self.option_reply(OPTION, REP_ERR_INVALID, b"TLS is already running");
        } else if !data.is_empty() {
            self.option_reply(OPTION, REP_ERR_INVALID, b"NBD_OPT_STARTTLS takes no data");
        } else {
            self.option_reply(OPTION, REP_ACK, &[]);
            self.phase = Phase::StartingTls;
            self.events.push_back(Event::StartTls);
        }
    }

    fn info_or_go(&mut self, option: u32, data: &[u8]) {
        // name length (32), name, number of requests (16), requests (16 each)
        let mut r = Reader(data);
        let parsed = (|| {
            let name_len = r.u32()? as usize;
            let name = r.take(name_len)?;
            let n = r.u16()? as usize;
            let requests = r.take(n.checked_mul(2)?)?;
            r.0.is_empty().then_some((name, requests))
        })();
        let Some((name, requests)) = parsed else {
            self.option_reply(option, REP_ERR_INVALID, b"malformed NBD_OPT_INFO/GO data");
            return;
        };
        let Some(i) = self.find_export(name) else {
            let msg = format!("no export named {:?}", shown(name));
            self.option_reply(option, REP_ERR_UNKNOWN, msg.as_bytes());
            return;
        };
        let exports = self.exports.clone();
        let e = &exports[i];
        let mut d = BytesMut::with_capacity(12);
        d.put_u16(INFO_EXPORT);
        d.put_u64(e.size);
        d.put_u16(e.transmission_flags(self.structured));
        self.option_reply(option, REP_INFO, &d);
        let asked = |t: u16| requests.chunks_exact(2).any(|c| c == t.to_be_bytes());
        if asked(INFO_NAME) {
            let mut d = BytesMut::with_capacity(2 + e.name.len());
            d.put_u16(INFO_NAME);
            d.put_slice(e.name.as_bytes());
            self.option_reply(option, REP_INFO, &d);
        }
        if let (true, Some(desc)) = (asked(INFO_DESCRIPTION), &e.description) {
            let desc = truncate(desc, MAX_STRING_LEN);
            let mut d = BytesMut::with_capacity(2 + desc.len());
            d.put_u16(INFO_DESCRIPTION);
            d.put_slice(desc.as_bytes());
            self.option_reply(option, REP_INFO, &d);
        }
        // Sent whether asked or not: minimum 1, preferred 4 KiB, maximum max_request.
        let mut d = BytesMut::with_capacity(14);
        d.put_u16(INFO_BLOCK_SIZE);
        d.put_u32(1);
        d.put_u32(4096);
        d.put_u32(self.limits.max_request);
        self.option_reply(option, REP_INFO, &d);
        self.option_reply(option, REP_ACK, &[]);
        if option == OPT_GO {
            self.start_transmission(i);
        }
    }

    /// Parses a meta context request and selects (or lists) no context: tidemark
    /// offers none, which the protocol allows.
    fn meta_context(&mut self, option: u32, data: &[u8]) {
        let mut r = Reader(data);
        let parsed = (|| {
            let name_len = r.u32()? as usize;
            let name = r.take(name_len)?;
            let queries = r.u32()?;
            // Each query takes at least 4 bytes, so this loop ends within data.len() / 4
            // rounds whatever the count says.
            for _ in 0..queries {
                let q = r.u32()? as usize;
                r.take(q)?;
            }
            r.0.is_empty().then_some(name)
        })();
        let Some(name) = parsed else {
            self.option_reply(option, REP_ERR_INVALID, b"malformed meta context request");
            return;
        };
        if !self.structured {
            self.option_reply(
                option,
                REP_ERR_INVALID,
                b"meta contexts need structured replies first",
            );
            return;
        }
        if self.find_export(name).is_none() {
            let msg = format!("no export named {:?}", shown(name));
            self.option_reply(option, REP_ERR_UNKNOWN, msg.as_bytes());
            return;
        }
        self.option_reply(option, REP_ACK, &[]);
    }

    /// The export a client names; the empty name is the default export, which exists
    /// only when there is exactly one export.
    fn find_export(&self, name: &[u8]) -> Option<usize> {
        if name.is_empty() && self.exports.len() == 1 {
            return Some(0);
        }
        self.exports.iter().position(|e| e.name.as_bytes() == name)
    }

    fn start_transmission(&mut self, index: usize) {
        self.export = Some(index);
        self.phase = Phase::Transmission;
        let name = self.exports[index].name.clone();
        self.events.push_back(Event::ExportChosen { index, name });
    }

    fn step_request(&mut self) -> bool {
        let Some(h) = parse_header(&self.input) else {
            return false;
        };
        let magic = peek_u32(&self.input, 0).unwrap_or_default();
        if magic != REQUEST_MAGIC {
            self.fail(ProtocolError::BadRequestMagic(magic));
            return false;
        }
        let mut payload = 0usize;
        if h.kind == CMD_WRITE {
            if h.len > self.limits.max_request {
                let max = self.limits.max_request;
                let msg = format!("write of {} bytes is above the limit of {max}", h.len);
                self.emit_error(h.cookie, ErrorCode::Inval, &msg);
                self.fail(ProtocolError::WriteTooLarge { len: h.len, max });
                return false;
            }
            payload = h.len as usize;
        }
        let total = REQUEST_HEADER_LEN + payload;
        if self.input.len() < total {
            self.input.reserve(total - self.input.len());
            return false;
        }
        self.input.advance(REQUEST_HEADER_LEN);
        let data = if payload < COPY_BELOW {
            // A small payload gets its own allocation, so that it does not keep the
            // whole input buffer alive while the write travels to the remote.
            let d = Bytes::copy_from_slice(&self.input[..payload]);
            self.input.advance(payload);
            d
        } else {
            self.input.split_to(payload).freeze()
        };
        self.handle_request(h, data);
        self.phase != Phase::Ended
    }

    fn handle_request(&mut self, h: Header, data: Bytes) {
        if h.kind == CMD_DISC {
            self.finish(End::Disconnect);
            return;
        }
        if self.in_flight.contains_key(&h.cookie) {
            self.fail(ProtocolError::DuplicateCookie(h.cookie));
            return;
        }
        let is_read = h.kind == CMD_READ;
        match self.validate(&h, data) {
            Err((code, msg)) => self.emit_error(h.cookie, code, &msg),
            Ok(None) if is_read => self.emit_empty_read(h.cookie),
            Ok(None) => self.emit_simple(0, h.cookie),
            Ok(Some(command)) => {
                let (read, bytes) = match &command {
                    Command::Read { offset, len } => (Some((*offset, *len)), *len as u64),
                    Command::Write { data, .. } => (None, data.len() as u64),
                    _ => (None, 0),
                };
                self.in_flight.insert(h.cookie, Pending { read, bytes });
                self.in_flight_bytes += bytes;
                self.events.push_back(Event::Request(Request {
                    cookie: h.cookie,
                    command,
                }));
            }
        }
    }

    /// The command for a request, `None` for a zero-length one (answered here), or
    /// the error to answer with.
    fn validate(&self, h: &Header, data: Bytes) -> Result<Option<Command>, (ErrorCode, String)> {
        let inval = |m: String| Err((ErrorCode::Inval, m));
        let Some((_, export)) = self.export() else {
            return inval("no export chosen".into());
        };
        let allowed = match h.kind {
            CMD_READ if self.structured => CMD_FLAG_FUA | CMD_FLAG_DF,
            CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE,
            _ => CMD_FLAG_FUA,
        };
        if h.flags & !allowed != 0 {
            return inval(format!(
                "command flags {:#x} are not valid for command {}",
                h.flags, h.kind
            ));
        }
        let fua = h.flags & CMD_FLAG_FUA != 0;
        let offset = Offset(h.offset);
        let in_range = h
            .offset
            .checked_add(h.len as u64)
            .is_some_and(|end| end <= export.size);
        let beyond = || {
            format!(
                "{} bytes at offset {} reach beyond the export's {} bytes",
                h.len, h.offset, export.size
            )
        };
        let writable = |what: &str| {
            if export.flags.read_only {
                Err((ErrorCode::Perm, format!("{what} on a read-only export")))
            } else {
                Ok(())
            }
        };
        let len = h.len;
        match h.kind {
            CMD_READ => {
                if len > self.limits.max_request {
                    return inval(format!(
                        "read of {len} bytes is above the limit of {}",
                        self.limits.max_request
                    ));
                }
                if !in_range {
                    return inval(beyond());
                }
                Ok((len > 0).then_some(Command::Read { offset, len }))
            }
            CMD_WRITE => {
                writable("write")?;
                if !in_range {
                    return Err((ErrorCode::NoSpc, beyond()));
                }
                Ok((len > 0).then_some(Command::Write { offset, data, fua }))
            }
            CMD_FLUSH => {
                if !export.flags.flush {
                    return inval("flush is not supported on this export".into());
                }
                if h.offset != 0 || len != 0 {
                    return inval("flush needs offset and length 0".into());
                }
                Ok(Some(Command::Flush))
            }
            CMD_TRIM => {
                writable("trim")?;
                if !export.flags.trim {
                    return inval("trim is not supported on this export".into());
                }
                if !in_range {
                    return inval(beyond());
                }
                Ok((len > 0).then_some(Command::Trim { offset, len, fua }))
            }
            CMD_WRITE_ZEROES => {
                writable("write zeroes")?;
                if !export.flags.write_zeroes {
                    return inval("write zeroes is not supported on this export".into());
                }
                if !in_range {
                    return Err((ErrorCode::NoSpc, beyond()));
                }
                let no_hole = h.flags & CMD_FLAG_NO_HOLE != 0;
                Ok((len > 0).then_some(Command::WriteZeroes {
                    offset,
                    len,
                    fua,
                    no_hole,
                }))
            }
            other => inval(format!("command {other} is not supported")),
        }
    }

    // ---- encoding ---------------------------------------------------------------

    fn option_reply(&mut self, option: u32, kind: u32, data: &[u8]) {
        self.small.put_u64(OPTION_REPLY_MAGIC);
        self.small.put_u32(option);
        self.small.put_u32(kind);
        put_len_u32(&mut self.small, data.len());
        self.small.put_slice(data);
    }

    fn emit_simple(&mut self, error: u32, cookie: Cookie) {
        self.small.put_u32(SIMPLE_REPLY_MAGIC);
        self.small.put_u32(error);
        self.small.put_u64(cookie.0);
    }

    fn chunk_header(&mut self, kind: u16, cookie: Cookie, len: usize) {
        self.small.put_u32(STRUCTURED_REPLY_MAGIC);
        self.small.put_u16(REPLY_FLAG_DONE);
        self.small.put_u16(kind);
        self.small.put_u64(cookie.0);
        put_len_u32(&mut self.small, len);
    }

    fn push_data(&mut self, data: Bytes) {
        if data.len() < 256 {
            self.small.put_slice(&data);
            return;
        }
        if !self.small.is_empty() {
            let head = self.small.split().freeze();
            self.out.push_back(head);
        }
        self.out.push_back(data);
    }

    /// A successful read: one `OFFSET_DATA` chunk marked done, or a simple reply
    /// followed by the data.
    fn emit_read(&mut self, cookie: Cookie, offset: Offset, data: Bytes) {
        if self.structured {
            self.chunk_header(REPLY_TYPE_OFFSET_DATA, cookie, 8 + data.len());
            self.small.put_u64(offset.0);
        } else {
            self.emit_simple(0, cookie);
        }
        self.push_data(data);
    }

    fn emit_empty_read(&mut self, cookie: Cookie) {
        if self.structured {
            self.chunk_header(REPLY_TYPE_NONE, cookie, 0);
        } else {
            self.emit_simple(0, cookie);
        }
    }

    fn emit_error(&mut self, cookie: Cookie, code: ErrorCode, message: &str) {
        if self.structured {
            let msg = truncate(message, MAX_STRING_LEN);
            self.chunk_header(REPLY_TYPE_ERROR, cookie, 6 + msg.len());
            self.small.put_u32(code.code());
            self.small.put_u16(msg.len() as u16);
            self.small.put_slice(msg.as_bytes());
        } else {
            // A failed read gets no payload in a simple reply.
            self.emit_simple(code.code(), cookie);
        }
    }
}

/// Cursor over untrusted bytes: every read is bounds-checked.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.0.len() {
            return None;
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Some(a)
    }

    fn u16(&mut self) -> Option<u16> {
        let (a, b) = self.0.split_first_chunk::<2>()?;
        self.0 = b;
        Some(u16::from_be_bytes(*a))
    }

    fn u32(&mut self) -> Option<u32> {
        let (a, b) = self.0.split_first_chunk::<4>()?;
        self.0 = b;
        Some(u32::from_be_bytes(*a))
    }
}

fn peek_u32(buf: &[u8], at: usize) -> Option<u32> {
    let b = buf.get(at..)?.first_chunk::<4>()?;
    Some(u32::from_be_bytes(*b))
}

fn peek_u64(buf: &[u8], at: usize) -> Option<u64> {
    let b = buf.get(at..)?.first_chunk::<8>()?;
    Some(u64::from_be_bytes(*b))
}

fn parse_header(buf: &[u8]) -> Option<Header> {
    let b = buf.first_chunk::<REQUEST_HEADER_LEN>()?;
    let mut r = Reader(b);
    let _magic = r.u32()?;
    let flags = r.u16()?;
    let kind = r.u16()?;
    let cookie = Cookie(u64::from_be_bytes(*r.take(8)?.first_chunk::<8>()?));
    let offset = u64::from_be_bytes(*r.take(8)?.first_chunk::<8>()?);
    let len = r.u32()?;
    Some(Header {
        flags,
        kind,
        cookie,
        offset,
        len,
    })
}

/// Writes a length known to fit in 32 bits (every caller bounds it first).
fn put_len_u32(buf: &mut BytesMut, len: usize) {
    buf.put_u32(u32::try_from(len).unwrap_or(u32::MAX));
}

/// `s` cut to at most `max` bytes on a character boundary.
fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// A client-supplied name for logs and messages: lossy, and at most 256 bytes.
fn shown(name: &[u8]) -> String {
    let s = String::from_utf8_lossy(&name[..name.len().min(256)]);
    s.into_owned()
}
