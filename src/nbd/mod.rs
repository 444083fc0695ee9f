//! The server side of the NBD protocol (the block protocol qemu, libnbd, fio and the
//! Linux kernel speak), as a state machine with no I/O: [`Connection`] takes the bytes
//! a client sends and gives back the bytes to send it and the requests to carry out.
//! The socket layer lives in the actor crate (`tidemark_actors::nbd`).
//!
//! Written from the protocol document (`doc/proto.md` of NetworkBlockDevice/nbd):
//! fixed newstyle handshake; `NBD_OPT_EXPORT_NAME`, `ABORT`, `LIST`, `INFO`, `GO`,
//! `STRUCTURED_REPLY`, `LIST_META_CONTEXT` and `SET_META_CONTEXT` (with no contexts);
//! `STARTTLS` when TLS is on ([`TlsPolicy::Required`], the protocol's FORCEDTLS mode:
//! the core decides, and asks the layer above to run the handshake with
//! [`Event::StartTls`]; it holds no TLS code itself); every other option
//! (`EXTENDED_HEADERS`, ...) is answered `NBD_REP_ERR_UNSUP` and the connection stays
//! open. Commands `READ`, `WRITE` (with
//! FUA), `FLUSH`, `TRIM`, `WRITE_ZEROES` and `DISC`; several requests may be in flight
//! and may be answered in any order. With structured replies a read is answered with
//! one `OFFSET_DATA` chunk marked done and an error with an `ERROR` chunk carrying a
//! message.
//!
//! Deliberate choices where the protocol leaves room:
//! - A cookie reused while its request is still in flight closes the connection
//!   (the protocol only says clients SHOULD NOT; answering would be ambiguous).
//! - A write longer than [`Limits::max_request`] gets `EINVAL` and the connection is
//!   closed without taking in its payload (the protocol allows a hard disconnect).
//! - Out-of-range reads and trims get `EINVAL`, out-of-range writes and write-zeroes
//!   `ENOSPC`, as the protocol's error section recommends.
//! - Zero-length requests are answered as successes without reaching the layer above.
//! - The empty export name selects the only export when there is exactly one.

pub mod consts;
mod server;

#[cfg(test)]
mod tests;

pub use server::{
    Command, Connection, Cookie, End, ErrorCode, Event, Export, ExportFlags, Limits, ProtocolError,
    Reply, ReplyError, Request, TlsPolicy,
};
