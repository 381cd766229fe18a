//! The NBD wire protocol, server side: fixed newstyle handshake and
//! transmission phase, mostly sans I/O.
//!
//! Follows the upstream specification, `doc/proto.md` of the
//! NetworkBlockDevice/nbd repository; section names in quotes below and in the
//! modules are that document's headings.
//!
//! # Protocol phases ("Protocol phases")
//!
//! 1. **Handshake** ([`handshake`]): the server greets, the client sends its
//!    flags, then the client sends options one at a time and the server
//!    answers each ("Fixed newstyle negotiation", "Option types", "Option reply
//!    types"). It ends when the client enters transmission with `NBD_OPT_GO`
//!    or `NBD_OPT_EXPORT_NAME`, aborts with `NBD_OPT_ABORT`, or one side
//!    drops the connection ("Termination of the session during option
//!    haggling"). Oldstyle negotiation and non-fixed newstyle-only behaviour
//!    are not implemented. `NBD_OPT_STARTTLS` is answered as
//!    [`handshake::TlsMode`] says; the TLS itself is the caller's
//!    ([`negotiate_tls`]).
//! 2. **Transmission** ([`transmission`]): the client sends 28-byte requests
//!    (plus payload for writes) and the server answers each with a simple
//!    reply or, if negotiated, structured reply chunks ("Transmission",
//!    "Request types", "Structured reply types", "Error values").
//!
//! # Writing a server on top
//!
//! One host thread per connection:
//!
//! ```no_run
//! use std::io::{Read, Write};
//! use nbd::{Command, ErrorCode, ExportInfo, ExportList, HandshakeLimits, ReadReply,
//!           Request, Validation};
//!
//! fn serve(mut sock: std::net::TcpStream, exports: &ExportList) -> std::io::Result<()> {
//!     sock.set_nodelay(true)?;
//!     let session = match nbd::negotiate(&mut sock, exports, HandshakeLimits::default()) {
//!         Ok(s) => s,
//!         Err(_) => return Ok(()), // hard disconnect (or the client aborted)
//!     };
//!     let structured = session.structured_replies;
//!     loop {
//!         let mut raw = [0u8; 28];
//!         sock.read_exact(&mut raw)?;
//!         let Ok(req) = Request::parse(&raw) else { return Ok(()) };
//!         match session.validate(&req) {
//!             Err(Validation::Disconnect { .. }) => return Ok(()),
//!             Err(Validation::Reject { error, drain }) => {
//!                 nbd::discard(&mut sock, drain.into())?;
//!                 sock.write_all(&nbd::error_reply(req.cookie, error, structured))?;
//!             }
//!             Ok(()) => match req.command {
//!                 Command::Disc => return Ok(()),
//!                 Command::Read => {
//!                     let mut reply = ReadReply::new(&req, structured);
//!                     reply.data_mut().fill(0); // ...the kernel fills it in place...
//!                     sock.write_all(reply.as_bytes())?;
//!                 }
//!                 Command::Write => {
//!                     let mut data = vec![0; req.length as usize];
//!                     sock.read_exact(&mut data)?;
//!                     // ...hand it to the kernel...
//!                     sock.write_all(&nbd::simple_reply(req.cookie, Ok(&[])))?;
//!                 }
//!                 _ => sock.write_all(&nbd::simple_reply(req.cookie, Ok(&[])))?,
//!             },
//!         }
//!     }
//! }
//! # let _ = (serve, ErrorCode::Io, ExportInfo::new("", 0));
//! ```
//!
//! Errors: [`HandshakeError`] for the handshake, [`RequestError`] for request
//! parsing, [`ExportError`] for export descriptions; [`Validation`] is the
//! protocol-level refusal of a well-formed request.

#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub mod export;
#[doc(hidden)]
pub mod fuzzing;
pub mod handshake;
pub mod transmission;
pub mod wire;

pub use export::{BlockSizes, ExportError, ExportInfo, ExportList, ExportTable};
pub use handshake::{
    ClientFlags, DataPlan, HandshakeError, HandshakeLimits, InfoRequest, Negotiated, OptionData,
    OptionHaggler, OptionHeader, Step, TlsMode, negotiate, negotiate_tls,
};
pub use transmission::{
    MAX_WRITE_DRAIN, ReadReply, Request, RequestError, Validation, encode_read_reply_header,
    encode_simple_reply, error_reply, simple_reply, validate,
};
pub use wire::{Command, CommandFlags, ErrorCode, TransmissionFlags};

/// Reads exactly `len` bytes from `reader` and throws them away, through a
/// small fixed buffer: for option data the server does not parse, and for the
/// payload of a rejected `NBD_CMD_WRITE` ([`Validation::Reject`]'s `drain`).
pub fn discard<R: std::io::Read + ?Sized>(reader: &mut R, len: u64) -> std::io::Result<()> {
    let mut left = len;
    let mut buf = [0u8; 8192];
    while left > 0 {
        let n = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
        reader.read_exact(&mut buf[..n])?;
        left -= n as u64;
    }
    Ok(())
}
