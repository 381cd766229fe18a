//! The transmission phase, sans I/O: requests, their validation, and replies.
//!
//! After the handshake the client sends requests ("Request message": magic
//! `0x25609513`, 16-bit command flags, 16-bit type, 64-bit cookie, 64-bit
//! offset, 32-bit length, and for `NBD_CMD_WRITE` *length* bytes of payload)
//! and the server answers each with either one simple reply ("Simple reply
//! message": magic `0x67446698`, 32-bit error, cookie, and for a successful
//! `NBD_CMD_READ` the data) or, if structured replies were negotiated, one or
//! more structured reply chunks ("Structured reply chunk message": magic
//! `0x668e33ef`, 16-bit flags, 16-bit type, cookie, 32-bit length, payload),
//! the last one flagged `NBD_REPLY_FLAG_DONE`. Replies may come in any order;
//! the cookie ties them to requests. The phase ends with `NBD_CMD_DISC` (no
//! reply; the server closes after finishing outstanding requests) or a hard
//! disconnect ("Terminating the transmission phase").
//!
//! A server loop built on this module:
//!
//! 1. read 28 bytes, [`Request::parse`] them (an `Err` is a hard disconnect:
//!    the stream is out of step);
//! 2. [`validate`] the request (or [`crate::Negotiated::validate`]). On
//!    [`Validation::Reject`], read and throw away `drain` payload bytes
//!    ([`crate::discard`]) and send [`error_reply`]; on
//!    [`Validation::Disconnect`], close without a reply;
//! 3. otherwise read the payload of a `NBD_CMD_WRITE`, do the work, and send
//!    the reply as one buffer: [`ReadReply`] for a read's data, [`simple_reply`]
//!    for everything else (allowed with structured replies too, except for
//!    `NBD_CMD_READ`), [`error_reply`] for failures; on `NBD_CMD_DISC`, stop.
//!
//! # Validation rules, in the order they are checked
//!
//! | # | rule | errno |
//! |---|------|-------|
//! | 0 | `NBD_CMD_DISC` (offset, length, flags ignored: the connection closes anyway) | accepted |
//! | 1 | unknown command type | `NBD_EINVAL` |
//! | 2 | unknown command flag bit (bits 5–15; bit 5 belongs to an extension that is never negotiated) | `NBD_EINVAL` |
//! | 3 | flag not valid for the command or not negotiated: `FUA` without `can_fua` (with it, FUA is accepted on *every* command, as "Command flags" requires), `DF` except on `READ` with structured replies, `NO_HOLE` except on `WRITE_ZEROES`, `REQ_ONE` except on `BLOCK_STATUS`, `FAST_ZERO` always (`NBD_FLAG_SEND_FAST_ZERO` is never advertised) | `NBD_EINVAL` |
//! | 4 | command not advertised: `FLUSH` without `can_flush`, `TRIM` without `can_trim`, `WRITE_ZEROES` without `can_write_zeroes`, `CACHE` (`NBD_FLAG_SEND_CACHE` is never advertised), `BLOCK_STATUS` (no metadata context can be negotiated) | `NBD_EINVAL` |
//! | 5 | `WRITE`, `TRIM` or `WRITE_ZEROES` on a read-only export | `NBD_EPERM` |
//! | 6 | `FLUSH` with a nonzero offset or length (reserved, MUST be zero) | `NBD_EINVAL` |
//! | 7 | length 0 (`READ`, `WRITE`, `TRIM`, `WRITE_ZEROES`; the spec leaves the behaviour unspecified and only asks not to disconnect — we choose an error so no zero-length I/O reaches the kernel) | `NBD_EINVAL` |
//! | 8 | `READ`/`WRITE` longer than the maximum payload (`min(max_payload, export maximum)`) | `NBD_EINVAL`; `NBD_EOVERFLOW` for a `READ` with structured replies (the spec's "reject large read requests up front with `NBD_EOVERFLOW`") |
//! | 9 | offset + length overflows 64 bits | `NBD_EINVAL` |
//! | 10 | offset or length not a multiple of the minimum block size | `NBD_EINVAL` |
//! | 11 | offset + length beyond the export size | `NBD_ENOSPC` for `WRITE` and `WRITE_ZEROES`, `NBD_EINVAL` for `READ` and `TRIM` ("Error values") |
//!
//! `TRIM` and `WRITE_ZEROES` carry no payload, so they may be longer than the
//! maximum payload ("Size constraints": the server SHOULD NOT fail them for
//! that alone).
//!
//! Every rejected `NBD_CMD_WRITE` has its payload drained so the stream stays
//! in step — unless its length exceeds `max(max_payload, MAX_WRITE_DRAIN)`
//! (64 MiB by default), which the spec lets a server treat as a denial of
//! service: then [`Validation::Disconnect`]. Payloads up to 2^25 bytes are
//! always drained, as the spec asks.

use crate::export::ExportInfo;
use crate::wire::{
    CHUNK_HEADER_LEN, Command, CommandFlags, DEFAULT_MAX_PAYLOAD, ErrorCode, MAX_STRING_LEN,
    NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_ERROR, NBD_REPLY_TYPE_ERROR_OFFSET, NBD_REPLY_TYPE_NONE,
    NBD_REPLY_TYPE_OFFSET_DATA, NBD_REPLY_TYPE_OFFSET_HOLE, NBD_REQUEST_MAGIC,
    NBD_SIMPLE_REPLY_MAGIC, NBD_STRUCTURED_REPLY_MAGIC, REQUEST_LEN, SIMPLE_REPLY_LEN,
};

/// Errors of the transmission layer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// The request does not start with `NBD_REQUEST_MAGIC`. The server cannot
    /// find the next request in the stream: hard disconnect.
    #[error("bad request magic {magic:#010x}")]
    BadMagic {
        /// The magic as received.
        magic: u32,
    },
}

/// One transmission request header ("Request message").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Request {
    /// Command flags, every bit as received.
    pub flags: CommandFlags,
    /// Command type, unknown types included.
    pub command: Command,
    /// The client's opaque cookie (formerly "handle"), echoed in replies.
    pub cookie: u64,
    /// Byte offset into the export.
    pub offset: u64,
    /// Length in bytes; for `NBD_CMD_WRITE` also the payload length.
    pub length: u32,
}

impl Request {
    /// Parses a 28-byte request header. Only the magic can be wrong; unknown
    /// types and flags are kept for [`validate`] to reject.
    pub fn parse(raw: &[u8; REQUEST_LEN]) -> Result<Request, RequestError> {
        let magic = u32::from_be_bytes(raw[0..4].try_into().expect("4 bytes"));
        if magic != NBD_REQUEST_MAGIC {
            return Err(RequestError::BadMagic { magic });
        }
        Ok(Request {
            flags: CommandFlags(u16::from_be_bytes([raw[4], raw[5]])),
            command: Command::from_u16(u16::from_be_bytes([raw[6], raw[7]])),
            cookie: u64::from_be_bytes(raw[8..16].try_into().expect("8 bytes")),
            offset: u64::from_be_bytes(raw[16..24].try_into().expect("8 bytes")),
            length: u32::from_be_bytes(raw[24..28].try_into().expect("4 bytes")),
        })
    }

    /// The 28 bytes of this header (what a client sends).
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[0..4].copy_from_slice(&NBD_REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&self.flags.bits().to_be_bytes());
        b[6..8].copy_from_slice(&self.command.to_u16().to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.length.to_be_bytes());
        b
    }

    /// How many payload bytes follow this header on the wire: *length* for
    /// `NBD_CMD_WRITE`, 0 otherwise.
    pub fn payload_len(&self) -> u32 {
        if self.command == Command::Write {
            self.length
        } else {
            0
        }
    }
}

/// Largest rejected `NBD_CMD_WRITE` payload that is drained rather than
/// answered with a hard disconnect (when `max_payload` is smaller): 2^26,
/// twice the default maximum payload.
pub const MAX_WRITE_DRAIN: u32 = 2 * DEFAULT_MAX_PAYLOAD;

/// Why [`validate`] refused a request, and what the server does about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Validation {
    /// Read and throw away `drain` bytes of payload (nonzero only for
    /// `NBD_CMD_WRITE`), then reply with `error`.
    Reject {
        /// The error to send.
        error: ErrorCode,
        /// Payload bytes still on the socket.
        drain: u32,
    },
    /// A `NBD_CMD_WRITE` whose payload is too long to drain: close the
    /// connection without a reply.
    Disconnect {
        /// The request's length.
        length: u32,
    },
}

impl Validation {
    /// The error to reply with, if the connection survives.
    pub fn error(&self) -> Option<ErrorCode> {
        match *self {
            Validation::Reject { error, .. } => Some(error),
            Validation::Disconnect { .. } => None,
        }
    }
}

/// Applies the spec's rules to a request for `export` (see the module
/// documentation for the list, order and errnos).
///
/// `max_payload` is the largest `READ`/`WRITE` the server will buffer; the
/// limit applied is the smaller of it and the export's advertised maximum.
/// `structured_replies` is whether `NBD_OPT_STRUCTURED_REPLY` was negotiated
/// (it decides `NBD_CMD_FLAG_DF` and the errno of an oversized read).
///
/// On `Ok`, offset and length are aligned, nonzero and within the export for
/// every data command, and the server may execute the request.
pub fn validate(
    request: &Request,
    export: &ExportInfo,
    max_payload: u32,
    structured_replies: bool,
) -> Result<(), Validation> {
    use Command as C;
    let reject = |error| {
        if request.command == C::Write {
            if request.length > max_payload.max(MAX_WRITE_DRAIN) {
                Validation::Disconnect {
                    length: request.length,
                }
            } else {
                Validation::Reject {
                    error,
                    drain: request.length,
                }
            }
        } else {
            Validation::Reject { error, drain: 0 }
        }
    };
    let inval = || Err(reject(ErrorCode::Inval));
    let cmd = request.command;

    // 0, 1: disconnect is always fine; unknown commands are not.
    match cmd {
        C::Disc => return Ok(()),
        C::Unknown(_) => return inval(),
        _ => {}
    }
    // 2, 3: flags.
    if request.flags.unknown_bits() != 0 {
        return inval();
    }
    let mut allowed = 0u16;
    if export.can_fua {
        allowed |= CommandFlags::FUA.bits();
    }
    match cmd {
        C::Read if structured_replies => allowed |= CommandFlags::DF.bits(),
        C::WriteZeroes => allowed |= CommandFlags::NO_HOLE.bits(),
        C::BlockStatus => allowed |= CommandFlags::REQ_ONE.bits(),
        _ => {}
    }
    if request.flags.bits() & !allowed != 0 {
        return inval();
    }
    // 4: commands that were not advertised.
    let supported = match cmd {
        C::Read | C::Write => true,
        C::Flush => export.can_flush,
        C::Trim => export.can_trim,
        C::WriteZeroes => export.can_write_zeroes,
        C::Cache | C::BlockStatus | C::Disc | C::Unknown(_) => false,
    };
    if !supported {
        return inval();
    }
    // 5: read-only.
    if export.read_only && cmd.is_write() {
        return Err(reject(ErrorCode::Perm));
    }
    // 6: flush has reserved offset and length.
    if cmd == C::Flush {
        return if request.offset == 0 && request.length == 0 {
            Ok(())
        } else {
            inval()
        };
    }
    // From here on: READ, WRITE, TRIM, WRITE_ZEROES.
    // 7: zero length.
    if request.length == 0 {
        return inval();
    }
    // 8: payload limit for the commands that carry one.
    let limit = max_payload.min(export.block_sizes.max());
    if matches!(cmd, C::Read | C::Write) && request.length > limit {
        return if cmd == C::Read && structured_replies {
            Err(reject(ErrorCode::Overflow))
        } else {
            inval()
        };
    }
    // 9: overflow.
    let Some(end) = request.offset.checked_add(u64::from(request.length)) else {
        return inval();
    };
    // 10: alignment.
    let min = u64::from(export.block_sizes.min());
    if !request.offset.is_multiple_of(min) || !u64::from(request.length).is_multiple_of(min) {
        return inval();
    }
    // 11: bounds.
    if end > export.size {
        return Err(reject(match cmd {
            C::Write | C::WriteZeroes => ErrorCode::NoSpc,
            _ => ErrorCode::Inval,
        }));
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Replies.
// ---------------------------------------------------------------------------

/// The 16-byte simple reply header: magic, error (0 for success), cookie.
pub fn simple_reply_header(cookie: u64, error: Option<ErrorCode>) -> [u8; SIMPLE_REPLY_LEN] {
    let mut b = [0u8; SIMPLE_REPLY_LEN];
    b[0..4].copy_from_slice(&NBD_SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.map_or(0, ErrorCode::to_u32).to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b
}

/// Appends a whole simple reply: on `Ok(data)` a success header followed by
/// `data` (empty for everything but `NBD_CMD_READ`), on `Err(error)` the
/// error header alone (no payload follows an error).
pub fn encode_simple_reply(out: &mut Vec<u8>, cookie: u64, result: Result<&[u8], ErrorCode>) {
    match result {
        Ok(data) => {
            out.reserve(SIMPLE_REPLY_LEN + data.len());
            out.extend_from_slice(&simple_reply_header(cookie, None));
            out.extend_from_slice(data);
        }
        Err(error) => out.extend_from_slice(&simple_reply_header(cookie, Some(error))),
    }
}

/// A simple reply as one buffer, to be sent in one write (see
/// [`encode_simple_reply`]).
pub fn simple_reply(cookie: u64, result: Result<&[u8], ErrorCode>) -> Vec<u8> {
    let mut out = Vec::new();
    encode_simple_reply(&mut out, cookie, result);
    out
}

/// Appends a structured reply chunk header: magic, flags, type, cookie,
/// payload length.
pub fn encode_chunk_header(
    out: &mut Vec<u8>,
    flags: u16,
    chunk_type: u16,
    cookie: u64,
    length: u32,
) {
    out.extend_from_slice(&NBD_STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&chunk_type.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
    out.extend_from_slice(&length.to_be_bytes());
}

fn done_flag(done: bool) -> u16 {
    if done { NBD_REPLY_FLAG_DONE } else { 0 }
}

/// Appends an `NBD_REPLY_TYPE_NONE` chunk; it always carries
/// `NBD_REPLY_FLAG_DONE` and has no payload.
pub fn encode_chunk_none(out: &mut Vec<u8>, cookie: u64) {
    encode_chunk_header(out, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_NONE, cookie, 0);
}

/// Appends an `NBD_REPLY_TYPE_OFFSET_DATA` chunk: 64-bit offset then `data`
/// (payload length 8 + `data.len()`).
///
/// # Panics
///
/// If `data` is empty (a content chunk must describe at least one byte) or
/// longer than `u32::MAX - 8` bytes.
pub fn encode_chunk_offset_data(
    out: &mut Vec<u8>,
    cookie: u64,
    offset: u64,
    data: &[u8],
    done: bool,
) {
    assert!(!data.is_empty(), "OFFSET_DATA must carry at least one byte");
    let length = u32::try_from(data.len())
        .ok()
        .and_then(|l| l.checked_add(8))
        .expect("OFFSET_DATA payload fits in 32 bits");
    out.reserve(CHUNK_HEADER_LEN + 8 + data.len());
    encode_chunk_header(
        out,
        done_flag(done),
        NBD_REPLY_TYPE_OFFSET_DATA,
        cookie,
        length,
    );
    out.extend_from_slice(&offset.to_be_bytes());
    out.extend_from_slice(data);
}

/// Appends an `NBD_REPLY_TYPE_OFFSET_HOLE` chunk: 64-bit offset, 32-bit hole
/// size (payload length 12).
///
/// # Panics
///
/// If `hole_len` is 0 (the spec: MUST be nonzero).
pub fn encode_chunk_offset_hole(
    out: &mut Vec<u8>,
    cookie: u64,
    offset: u64,
    hole_len: u32,
    done: bool,
) {
    assert!(hole_len != 0, "OFFSET_HOLE size must be nonzero");
    encode_chunk_header(out, done_flag(done), NBD_REPLY_TYPE_OFFSET_HOLE, cookie, 12);
    out.extend_from_slice(&offset.to_be_bytes());
    out.extend_from_slice(&hole_len.to_be_bytes());
}

/// `message` cut to at most 4096 bytes, at a character boundary.
fn clip(message: &str) -> &str {
    let mut end = message.len().min(MAX_STRING_LEN);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    &message[..end]
}

/// Appends an `NBD_REPLY_TYPE_ERROR` chunk: 32-bit error, 16-bit message
/// length, message (payload length 6 + message length). Messages longer than
/// 4096 bytes are cut.
pub fn encode_chunk_error(
    out: &mut Vec<u8>,
    cookie: u64,
    error: ErrorCode,
    message: &str,
    done: bool,
) {
    let message = clip(message);
    encode_chunk_header(
        out,
        done_flag(done),
        NBD_REPLY_TYPE_ERROR,
        cookie,
        6 + message.len() as u32,
    );
    out.extend_from_slice(&error.to_u32().to_be_bytes());
    out.extend_from_slice(&(message.len() as u16).to_be_bytes());
    out.extend_from_slice(message.as_bytes());
}

/// Appends an `NBD_REPLY_TYPE_ERROR_OFFSET` chunk: 32-bit error, 16-bit
/// message length, message, 64-bit offset (payload length 14 + message
/// length). Messages longer than 4096 bytes are cut.
pub fn encode_chunk_error_offset(
    out: &mut Vec<u8>,
    cookie: u64,
    error: ErrorCode,
    message: &str,
    offset: u64,
    done: bool,
) {
    let message = clip(message);
    encode_chunk_header(
        out,
        done_flag(done),
        NBD_REPLY_TYPE_ERROR_OFFSET,
        cookie,
        14 + message.len() as u32,
    );
    out.extend_from_slice(&error.to_u32().to_be_bytes());
    out.extend_from_slice(&(message.len() as u16).to_be_bytes());
    out.extend_from_slice(message.as_bytes());
    out.extend_from_slice(&offset.to_be_bytes());
}

/// The whole reply for a failed request, as one buffer: with structured
/// replies an `NBD_REPLY_TYPE_ERROR` chunk flagged done (required for
/// `NBD_CMD_READ`, preferred for the rest), otherwise a simple reply with the
/// error.
pub fn error_reply(cookie: u64, error: ErrorCode, structured_replies: bool) -> Vec<u8> {
    let mut out = Vec::new();
    if structured_replies {
        encode_chunk_error(&mut out, cookie, error, "", true);
    } else {
        encode_simple_reply(&mut out, cookie, Err(error));
    }
    out
}

/// Appends the bytes that precede a successful read's data on the wire: a
/// simple reply header, or (with structured replies) an
/// `NBD_REPLY_TYPE_OFFSET_DATA` chunk header flagged done plus the offset.
/// For a server that sends the data from its own buffers (scatter-gather)
/// rather than through a [`ReadReply`]; the `request.length` data bytes must
/// follow.
///
/// # Panics
///
/// With structured replies, if the length is 0 (a validated read never is)
/// or above `u32::MAX - 8`.
pub fn encode_read_reply_header(out: &mut Vec<u8>, request: &Request, structured_replies: bool) {
    if structured_replies {
        assert!(
            request.length != 0,
            "OFFSET_DATA must carry at least one byte"
        );
        let length = request.length.checked_add(8).expect("payload fits");
        encode_chunk_header(
            out,
            NBD_REPLY_FLAG_DONE,
            NBD_REPLY_TYPE_OFFSET_DATA,
            request.cookie,
            length,
        );
        out.extend_from_slice(&request.offset.to_be_bytes());
    } else {
        out.extend_from_slice(&simple_reply_header(request.cookie, None));
    }
}

/// A successful `NBD_CMD_READ` reply built in one buffer: the header is
/// written first and the data area is left zeroed for the server to fill in
/// place ([`ReadReply::data_mut`]), so the reply goes out as one unit with no
/// copy. With structured replies it is a single `NBD_REPLY_TYPE_OFFSET_DATA`
/// chunk flagged done (so `NBD_CMD_FLAG_DF` is always honoured), otherwise a
/// simple reply.
///
/// Fill it completely before sending: if the read fails, send
/// [`error_reply`] instead and drop this buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadReply {
    bytes: Vec<u8>,
    header_len: usize,
}

impl ReadReply {
    /// A reply to the read `request` (its cookie, offset and length).
    ///
    /// # Panics
    ///
    /// With structured replies, if the length is 0 (a validated read never
    /// is) or above `u32::MAX - 8`.
    pub fn new(request: &Request, structured_replies: bool) -> ReadReply {
        let len = request.length as usize;
        let mut bytes = Vec::with_capacity(CHUNK_HEADER_LEN + 8 + len);
        encode_read_reply_header(&mut bytes, request, structured_replies);
        let header_len = bytes.len();
        bytes.resize(header_len + len, 0);
        ReadReply { bytes, header_len }
    }

    /// The data area, `length` bytes, to be filled with the export's
    /// contents.
    pub fn data_mut(&mut self) -> &mut [u8] {
        &mut self.bytes[self.header_len..]
    }

    /// The whole reply.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The whole reply, by value.
    pub fn into_bytes(self) -> Vec<u8> {
        self.bytes
    }
}
